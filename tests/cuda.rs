//! The CUDA backend against the CPU backend, and (the `abi_*` tests) the C
//! ABI with `device = 1` against `device = 0`. Without a CUDA driver and GPU
//! (CI), only `no_gpu_handle_reports_no_cuda` asserts; every other test
//! prints why it skips. On a GPU machine `scripts/gpu-check.sh` runs this
//! binary (prebuilt), one test at a time. `scripts/stages/fake-cuda.sh`
//! runs it on the fake driver of `fake-cuda/` (kernels in the PTX
//! interpreter), with `LRA_FAKE_CUDA` set: a test too large for the
//! interpreter prints why it skips there.

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the test owns and keeps alive across the call
// (host slices, or its own device buffers), and null or test-owned flags
// and streams.

use cudarc::driver::sys;
use lra::backend::{cpu::CpuBackend, cuda, Backend, BackendState, StepRequest, TensorDesc};
use lra::controller::{ScaleRule, SkipReason, StepOutcome};
use lra::ffi::*;
use lra::optim::{DType, Hyper, OptimizerKind};
use lra::Status;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

mod support;
use support::{counter_array, FuzzSeeds, Handle, Rng};

/// Makes the primary context of device 0 current on this thread; false
/// (with the reason printed) when there is no driver or GPU.
fn gpu(test: &str) -> bool {
    let why = (|| -> Result<(), String> {
        // SAFETY: probing calls with out-parameters.
        unsafe {
            if !sys::is_culib_present() {
                return Err("no CUDA driver library (libcuda.so)".into());
            }
            if sys::cuInit(0) != sys::CUresult::CUDA_SUCCESS {
                return Err("cuInit failed (no usable GPU)".into());
            }
            let mut n = 0;
            sys::cuDeviceGetCount(&mut n);
            if n == 0 {
                return Err("no CUDA device".into());
            }
            let mut ctx = std::ptr::null_mut();
            let mut dev = 0;
            sys::cuDeviceGet(&mut dev, 0);
            if sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) != sys::CUresult::CUDA_SUCCESS {
                return Err("cuDevicePrimaryCtxRetain failed".into());
            }
            sys::cuCtxSetCurrent(ctx);
        }
        Ok(())
    })();
    match why {
        Ok(()) => true,
        Err(why) => {
            // scripts/gpu-check.sh sets this: there a skip is a failure.
            if std::env::var_os("LRA_REQUIRE_GPU").is_some() {
                panic!("{test}: LRA_REQUIRE_GPU is set, but {why}");
            }
            support::skipped(test, &why);
            false
        }
    }
}

/// True (with the reason printed) when the driver is the fake one of
/// `fake-cuda/` (`LRA_FAKE_CUDA` set, by scripts/stages/fake-cuda.sh) and
/// this test cannot run on it (the PTX interpreter is far slower and
/// hungrier than a GPU).
fn fake_driver_cannot(test: &str, why: &str) -> bool {
    if std::env::var_os("LRA_FAKE_CUDA").is_none() {
        return false;
    }
    use std::io::Write;
    let line = format!("!!!! SKIPPED (fake driver): {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    true
}

/// A stream of a context of its own (not the primary context lra runs
/// on), destroyed with that context on drop.
struct ForeignStream {
    ctx: sys::CUcontext,
    stream: *mut c_void,
}

impl ForeignStream {
    fn new() -> ForeignStream {
        // SAFETY: driver calls with out-parameters; the created context is
        // popped again, so the caller's current context is unchanged.
        unsafe {
            let (mut dev, mut ctx, mut stream) = (0, std::ptr::null_mut(), std::ptr::null_mut());
            ok(sys::cuDeviceGet(&mut dev, 0));
            ok(sys::cuCtxCreate_v2(&mut ctx, 0, dev));
            ok(sys::cuStreamCreate(&mut stream, 1));
            let mut popped = std::ptr::null_mut();
            ok(sys::cuCtxPopCurrent_v2(&mut popped));
            ForeignStream {
                ctx,
                stream: stream as *mut c_void,
            }
        }
    }
}

/// Device memory allocated in a context of its own (not the primary
/// context lra runs on), freed with that context on drop.
struct OtherContextMemory {
    ctx: sys::CUcontext,
    ptr: u64,
}

impl OtherContextMemory {
    fn new(bytes: usize) -> OtherContextMemory {
        // SAFETY: driver calls with out-parameters; the created context is
        // popped again, so the caller's current context is unchanged.
        unsafe {
            let (mut dev, mut ctx, mut ptr) = (0, std::ptr::null_mut(), 0);
            ok(sys::cuDeviceGet(&mut dev, 0));
            ok(sys::cuCtxCreate_v2(&mut ctx, 0, dev));
            ok(sys::cuMemAlloc_v2(&mut ptr, bytes));
            let mut popped = std::ptr::null_mut();
            ok(sys::cuCtxPopCurrent_v2(&mut popped));
            OtherContextMemory { ctx, ptr }
        }
    }
}

impl Drop for OtherContextMemory {
    fn drop(&mut self) {
        // SAFETY: the context and memory made in `new`, freed once.
        unsafe {
            ok(sys::cuCtxPushCurrent_v2(self.ctx));
            ok(sys::cuMemFree_v2(self.ptr));
            let mut popped = std::ptr::null_mut();
            ok(sys::cuCtxPopCurrent_v2(&mut popped));
            ok(sys::cuCtxDestroy_v2(self.ctx));
        }
    }
}

impl Drop for ForeignStream {
    fn drop(&mut self) {
        let (ctx, stream) = (self.ctx, self.stream);
        // SAFETY: the context and stream made in `new`, destroyed once.
        unsafe {
            ok(sys::cuCtxPushCurrent_v2(ctx));
            ok(sys::cuStreamDestroy_v2(stream as sys::CUstream));
            let mut popped = std::ptr::null_mut();
            ok(sys::cuCtxPopCurrent_v2(&mut popped));
            ok(sys::cuCtxDestroy_v2(ctx));
        }
    }
}

fn ok(r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
}

/// Sets the calling thread's capture interaction mode; returns the old one.
fn exchange_capture_mode(mode: sys::CUstreamCaptureMode) -> sys::CUstreamCaptureMode {
    let mut mode = mode;
    // SAFETY: in/out-parameter.
    ok(unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) });
    mode
}

/// A new non-blocking stream of the current context; `destroy_streams`
/// once nothing queued on it is still to run.
fn non_blocking_stream() -> sys::CUstream {
    let mut stream = std::ptr::null_mut();
    // SAFETY: out-parameter; 1 = non-blocking.
    unsafe { ok(sys::cuStreamCreate(&mut stream, 1)) };
    stream
}

fn destroy_streams(streams: &[sys::CUstream]) {
    for &stream in streams {
        // SAFETY: streams made by `non_blocking_stream`, destroyed once.
        unsafe { sys::cuStreamDestroy_v2(stream) };
    }
}

/// A new stream (`flags`: 0 blocking, 1 non-blocking) of the current
/// context, capturing in thread-local mode.
fn new_capturing_stream(flags: u32) -> sys::CUstream {
    let mut stream = std::ptr::null_mut();
    // SAFETY: out-parameter; the stream made here.
    unsafe {
        ok(sys::cuStreamCreate(&mut stream, flags));
        ok(sys::cuStreamBeginCapture_v2(
            stream,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        ));
    }
    stream
}

/// Ends the capture on `stream` and destroys the graph it made, if any;
/// returns what ending it returned.
fn end_capture(stream: sys::CUstream) -> sys::CUresult {
    let mut graph = std::ptr::null_mut();
    // SAFETY: out-parameter; the graph, if any, is destroyed once.
    unsafe {
        let r = sys::cuStreamEndCapture(stream, &mut graph);
        if !graph.is_null() {
            sys::cuGraphDestroy(graph);
        }
        r
    }
}

/// The calling thread's current context (null: none).
fn current_context() -> sys::CUcontext {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: out-parameter.
    ok(unsafe { sys::cuCtxGetCurrent(&mut ctx) });
    ctx
}

/// A device allocation holding a copy of some host bytes.
struct DevBuf(u64);

impl DevBuf {
    /// `len` bytes, none written.
    fn uninit(len: usize) -> DevBuf {
        let mut p = 0;
        // SAFETY: out-parameter.
        unsafe { ok(sys::cuMemAlloc_v2(&mut p, len)) };
        DevBuf(p)
    }
    fn new(bytes: &[u8]) -> DevBuf {
        let b = DevBuf::uninit(bytes.len().max(16) + 16);
        b.write(0, bytes);
        b
    }
    fn write(&self, at: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // SAFETY: inside the allocation.
        unsafe {
            ok(sys::cuCtxSynchronize());
            ok(sys::cuMemcpyHtoD_v2(
                self.0 + at,
                bytes.as_ptr() as *const c_void,
                bytes.len(),
            ));
        }
    }
    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        if len == 0 {
            return v;
        }
        // SAFETY: inside the allocation.
        unsafe {
            ok(sys::cuCtxSynchronize());
            ok(sys::cuMemcpyDtoH_v2(
                v.as_mut_ptr() as *mut c_void,
                self.0 + at,
                len,
            ));
        }
        v
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated above.
        unsafe {
            sys::cuCtxSynchronize();
            sys::cuMemFree_v2(self.0);
        }
    }
}

/// Deterministic values: mostly in (-2, 2), with zeros, a subnormal and
/// large magnitudes sprinkled in.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            match i % 97 {
                5 => 0.0,
                11 => -0.0,
                23 => 1.0e-40,
                47 => 3.0e4 * (u - 0.5),
                _ => 4.0 * (u - 0.5),
            }
        })
        .collect()
}

fn encode(v: &[f32], dt: DType) -> Vec<u8> {
    match dt {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::Bf16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Element-wise equality of two buffers of `dt`: same bits, or both NaN
/// (NaN payloads differ between CPUs and GPUs).
fn assert_same(cpu: &[u8], gpu: &[u8], dt: DType, what: &str) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: length");
    let n = cpu.len() / dt.size();
    for i in 0..n {
        let (a, b) = match dt {
            DType::F32 => {
                let a = f32::from_le_bytes(cpu[4 * i..4 * i + 4].try_into().unwrap());
                let b = f32::from_le_bytes(gpu[4 * i..4 * i + 4].try_into().unwrap());
                if a.is_nan() && b.is_nan() {
                    continue;
                }
                (a.to_bits() as u64, b.to_bits() as u64)
            }
            _ => {
                let a = u16::from_le_bytes(cpu[2 * i..2 * i + 2].try_into().unwrap());
                let b = u16::from_le_bytes(gpu[2 * i..2 * i + 2].try_into().unwrap());
                let nan = |x: u16| match dt {
                    DType::F16 => half::f16::from_bits(x).is_nan(),
                    _ => half::bf16::from_bits(x).is_nan(),
                };
                if nan(a) && nan(b) {
                    continue;
                }
                (a as u64, b as u64)
            }
        };
        assert_eq!(
            a, b,
            "{what}: element {i} of {n} differs (cpu {a:#x}, gpu {b:#x})"
        );
    }
}

fn assert_phi_close(cpu: f64, gpu: f64, what: &str) {
    if !cpu.is_finite() {
        assert!(
            gpu.to_bits() == cpu.to_bits() || (cpu.is_nan() && gpu.is_nan()),
            "{what}: φ cpu {cpu}, gpu {gpu}"
        );
        return;
    }
    let tol = 1e-6 * cpu.abs().max(1e-300);
    assert!(
        (cpu - gpu).abs() <= tol,
        "{what}: φ cpu {cpu:e} gpu {gpu:e}"
    );
}

/// How a step finds its scale.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Fused {
        guard: bool,
    },
    /// f* known and far below: s capped at 0.5 exactly on both backends.
    Capped,
    /// f* above the loss: s = 0 exactly.
    Zero,
    /// R > 0: s = φ/(φ+R) (compared within tolerance, not bits); the
    /// one two-pass mode also run with the guard off.
    Noisy {
        guard: bool,
    },
}

impl Mode {
    fn rule(self) -> Option<ScaleRule> {
        let r = |loss, f_star, obs_var, scale_max| ScaleRule {
            loss,
            f_star,
            obs_var,
            scale_max,
        };
        match self {
            Mode::Fused { .. } => None,
            Mode::Capped => Some(r(1e30, 0.0, 0.0, 0.5)),
            Mode::Zero => Some(r(0.0, 1.0, 0.0, f64::INFINITY)),
            Mode::Noisy { .. } => Some(r(1.0, f64::NAN, 1.0, f64::INFINITY)),
        }
    }
    fn guard(self) -> bool {
        !matches!(
            self,
            Mode::Fused { guard: false } | Mode::Noisy { guard: false }
        )
    }
}

/// One tensor of a case: host copy (CPU backend) and device copy.
struct Pair {
    dt: DType,
    n: usize,
    host: Vec<u8>,
    hgrad: Vec<u8>,
    dev: DevBuf,
    dgrad: DevBuf,
    /// Byte offset of the tensor inside `dev` (misaligned vector path).
    off: u64,
}

/// A tensor's device parameter and gradient buffers, and its offset in them.
type DeviceBuffers = (DevBuf, DevBuf, u64);

struct Case {
    kind: OptimizerKind,
    hyper: Hyper,
    pairs: Vec<Pair>,
    cpu: CpuBackend,
    gpu: Box<dyn Backend>,
    stream: *mut c_void,
    /// Steps hand a (recording) cross-rank sum to both backends.
    sharded: bool,
    /// φ as the last sharded step's cross-rank sum returned it, per backend
    /// (CPU, CUDA).
    summed_phi: [Option<f64>; 2],
    /// The calling thread's current context inside each of the last
    /// sharded step's CUDA cross-rank sums.
    sum_contexts: Vec<sys::CUcontext>,
}

impl Case {
    fn new(kind: OptimizerKind, shape: &[(usize, DType, bool)], stream: *mut c_void) -> Case {
        let pairs = shape
            .iter()
            .enumerate()
            .map(|(i, &(n, dt, misalign))| {
                let off = if misalign { dt.size() as u64 } else { 0 };
                let host = encode(&values(n, 7 + i as u64), dt);
                let mut padded = vec![0u8; off as usize];
                padded.extend_from_slice(&host);
                Pair {
                    dt,
                    n,
                    hgrad: vec![0; host.len()],
                    dgrad: DevBuf::new(&padded),
                    dev: DevBuf::new(&padded),
                    host,
                    off,
                }
            })
            .collect();
        Case {
            kind,
            hyper: Hyper::defaults(kind),
            pairs,
            cpu: CpuBackend::new(kind, 1),
            gpu: cuda::create(kind, 0).expect("CUDA backend"),
            stream,
            sharded: false,
            summed_phi: [None; 2],
            sum_contexts: Vec::new(),
        }
    }

    /// A case on the legacy stream after two steps in `mode` (gradients of
    /// seeds 1 and 2, η = 0.01).
    fn after_two_steps(kind: OptimizerKind, shape: &[(usize, DType, bool)], mode: Mode) -> Case {
        let mut case = Case::new(kind, shape, std::ptr::null_mut());
        for seed in 1..3 {
            case.set_grads(seed, None);
            case.step(mode, 0.01, None);
        }
        case
    }

    /// Imports the CPU backend's state into the CUDA backend (as a
    /// checkpoint load does) and checks that both hold the same.
    fn load_cpu_state(&mut self, what: &str) {
        let st = self.cpu.export_state().unwrap();
        self.gpu.import_values(&st).unwrap();
        self.assert_state_same(what);
    }

    fn set_grads(&mut self, seed: u64, poison: Option<f32>) {
        for (i, p) in self.pairs.iter_mut().enumerate() {
            let mut g = values(p.n, seed.wrapping_mul(131).wrapping_add(i as u64));
            if let (Some(bad), true) = (poison, p.n > 0) {
                g[p.n / 2] = bad;
            }
            p.hgrad = encode(&g, p.dt);
            p.dgrad.write(p.off, &p.hgrad);
        }
    }

    /// Moves every device parameter and gradient to a fresh allocation,
    /// flipping its misalignment, as a framework that reallocates would:
    /// the next step must pick up the new pointers (and vector paths).
    /// Returns the buffers left (freed when dropped).
    fn move_device_buffers(&mut self) -> Vec<DeviceBuffers> {
        let moved = self
            .pairs
            .iter()
            .map(|p| {
                let param = p.dev.read(p.off, p.host.len());
                let off = if p.off == 0 { p.dt.size() as u64 } else { 0 };
                let mut padded = vec![0u8; off as usize];
                padded.extend_from_slice(&param);
                let dev = DevBuf::new(&padded);
                padded.truncate(off as usize);
                padded.extend_from_slice(&p.hgrad);
                (dev, DevBuf::new(&padded), off)
            })
            .collect();
        self.swap_device_buffers(moved)
    }

    /// Puts `bufs` (from [`Case::move_device_buffers`]) in place of the
    /// device buffers, which it returns.
    fn swap_device_buffers(&mut self, bufs: Vec<DeviceBuffers>) -> Vec<DeviceBuffers> {
        assert_eq!(bufs.len(), self.pairs.len());
        self.pairs
            .iter_mut()
            .zip(bufs)
            .map(|(p, (dev, dgrad, off))| {
                let old = (
                    std::mem::replace(&mut p.dev, dev),
                    std::mem::replace(&mut p.dgrad, dgrad),
                    p.off,
                );
                p.off = off;
                old
            })
            .collect()
    }

    fn descs(&mut self) -> (Vec<TensorDesc>, Vec<TensorDesc>) {
        let cpu = self
            .pairs
            .iter_mut()
            .map(|p| {
                // Empty tensors: NULL, as a C caller would pass (an empty
                // Vec's dangling pointer is not aligned for the dtype).
                let (param, grad) = if p.n == 0 {
                    (std::ptr::null_mut(), std::ptr::null())
                } else {
                    (
                        p.host.as_mut_ptr() as *mut c_void,
                        p.hgrad.as_ptr() as *const c_void,
                    )
                };
                TensorDesc {
                    param,
                    grad,
                    numel: p.n,
                    dtype: p.dt,
                }
            })
            .collect();
        let gpu = self
            .pairs
            .iter()
            .map(|p| TensorDesc {
                param: (p.dev.0 + p.off) as *mut c_void,
                grad: (p.dgrad.0 + p.off) as *const c_void,
                numel: p.n,
                dtype: p.dt,
            })
            .collect();
        (cpu, gpu)
    }

    /// The request of one step of this case (either backend).
    /// The host backend's step over `tensors` (host descriptors from
    /// [`Case::descs`]), with no flag and no reduction.
    fn cpu_step(&mut self, mode: Mode, lr: f64, tensors: &[TensorDesc]) {
        let req = self.request(
            mode,
            lr,
            tensors,
            std::ptr::null(),
            std::ptr::null_mut(),
            None,
        );
        // SAFETY: descriptors of this case's host buffers.
        unsafe { self.cpu.step(req) }.unwrap();
    }

    fn request<'a>(
        &self,
        mode: Mode,
        lr: f64,
        tensors: &'a [TensorDesc],
        found_inf: *const c_void,
        stream: *mut c_void,
        reduce: Option<lra::backend::Reducer<'a>>,
    ) -> StepRequest<'a> {
        StepRequest {
            tensors,
            kind: self.kind,
            hyper: self.hyper,
            lr,
            rule: mode.rule(),
            check_finite: mode.guard(),
            found_inf,
            stream,
            reduce,
        }
    }

    /// One step on both backends; returns both outcomes.
    fn step(
        &mut self,
        mode: Mode,
        lr: f64,
        found_inf: Option<&DevBuf>,
    ) -> (StepOutcome, StepOutcome) {
        let (c, g) = self.step_with(mode, lr, found_inf, false);
        c.unwrap();
        g.unwrap();
        let outcomes = (self.cpu.outcome().unwrap(), self.gpu.outcome().unwrap());
        // Two-pass: the φ a sharded step reports (and scales by) is the
        // sum's result, bit for bit (a garbled write-back to the device can
        // hide below the 1e-6 tolerance between the backends). Fused steps
        // sum only the flags before writing; the engine sums their φ later.
        let two_pass = !matches!(mode, Mode::Fused { .. });
        for (o, summed, who) in [
            (&outcomes.0, self.summed_phi[0], "CPU"),
            (&outcomes.1, self.summed_phi[1], "CUDA"),
        ] {
            if let (true, Some(summed), SkipReason::None) = (two_pass, summed, o.skip) {
                assert_eq!(
                    o.phi.to_bits(),
                    summed.to_bits(),
                    "{who}: φ {} is not the sum's {summed}",
                    o.phi
                );
            }
        }
        outcomes
    }

    /// One step on both backends, without reading the outcomes. Sharded:
    /// the cross-rank sum fails when `sum_fails`.
    fn step_with(
        &mut self,
        mode: Mode,
        lr: f64,
        found_inf: Option<&DevBuf>,
        sum_fails: bool,
    ) -> (lra::Result<()>, lra::Result<()>) {
        let (tc, tg) = self.descs();
        let host_flag: f32 = found_inf.map_or(0.0, |b| {
            f32::from_le_bytes(b.read(0, 4).try_into().unwrap())
        });
        self.cpu.validate(&tc).unwrap();
        self.gpu.validate(&tg).unwrap();
        let hf = if found_inf.is_some() {
            &host_flag as *const f32 as *const c_void
        } else {
            std::ptr::null()
        };
        // Sharded: the "cross-rank sum" of two ranks holding the same shard
        // (φ's part doubles; the flags stay as they are), recording what it
        // saw. Not the identity, so a step that ignored or garbled the sum's
        // result would not get the right φ by accident.
        let (mut seen_cpu, mut seen_gpu) = (Vec::new(), Vec::new());
        let sum = |seen: &mut Vec<Vec<f64>>, v: &mut [f64]| -> lra::Result<()> {
            seen.push(v.to_vec());
            if sum_fails {
                return Err(lra::Error::new(
                    Status::ReductionFailed,
                    "the test's sum fails",
                ));
            }
            v[2] *= 2.0;
            Ok(())
        };
        let mut contexts = Vec::new();
        let mut rc = |v: &mut [f64]| sum(&mut seen_cpu, v);
        let mut rg = |v: &mut [f64]| {
            contexts.push(current_context());
            sum(&mut seen_gpu, v)
        };
        let (rc, rg): (Option<lra::backend::Reducer>, Option<lra::backend::Reducer>) =
            if self.sharded {
                (Some(&mut rc), Some(&mut rg))
            } else {
                (None, None)
            };
        let cpu = unsafe {
            self.cpu
                .step(self.request(mode, lr, &tc, hf, std::ptr::null_mut(), rc))
        };
        let df = found_inf.map_or(std::ptr::null(), |b| b.0 as *const c_void);
        let gpu = unsafe {
            self.gpu
                .step(self.request(mode, lr, &tg, df, self.stream, rg))
        };
        self.sum_contexts = contexts;
        assert_eq!(seen_cpu.len(), seen_gpu.len(), "reduction calls");
        self.summed_phi = [&seen_cpu, &seen_gpu].map(|seen| seen.last().map(|v| 2.0 * v[2]));
        // [non-finite count, found-inf flag, η·Σg·d]: counts differ in
        // unit (chunks vs threads), only their being non-zero is shared.
        for (c, g) in seen_cpu.iter().zip(&seen_gpu) {
            assert_eq!(c[0] != 0.0, g[0] != 0.0, "non-finite count {c:?} {g:?}");
            assert_eq!(c[1], g[1], "found-inf flag {c:?} {g:?}");
            if c[1] == 0.0 {
                assert_phi_close(c[2], g[2], "partial φ handed to the reduction");
            } else {
                // a rank whose own flag is set reads no gradient
                let flag_alone = [0.0, 1.0, 0.0];
                assert_eq!(
                    (&c[..], &g[..]),
                    (&flag_alone[..], &flag_alone[..]),
                    "flagged rank"
                );
            }
        }
        (cpu, gpu)
    }

    /// Both backends took the same step: same skip, φ within 1e-6, state
    /// bitwise; parameters and s bitwise, except where s comes from φ
    /// (Noisy): there within tolerance, and the CPU copy re-synced so the
    /// next step compares bits again.
    fn assert_step_matches(&mut self, mode: Mode, c: &StepOutcome, g: &StepOutcome, what: &str) {
        assert_eq!(c.skip, g.skip, "{what}");
        assert_phi_close(c.phi, g.phi, what);
        if let Mode::Noisy { .. } = mode {
            assert_phi_close(c.scale, g.scale, what);
            assert_params_close(self, what);
            for p in self.pairs.iter_mut() {
                p.host = p.dev.read(p.off, p.host.len());
            }
        } else {
            assert_eq!(c.scale.to_bits(), g.scale.to_bits(), "{what}: scale");
            self.assert_params_same(what);
        }
        self.assert_state_same(what);
    }

    fn assert_params_same(&self, what: &str) {
        for (i, p) in self.pairs.iter().enumerate() {
            let dev = p.dev.read(p.off, p.host.len());
            assert_same(
                &p.host,
                &dev,
                p.dt,
                &format!("{what}: tensor {i} ({} {})", p.n, p.dt.name()),
            );
        }
    }

    fn assert_state_same(&mut self, what: &str) {
        let a: BackendState = self.cpu.export_state().unwrap();
        let b: BackendState = self.gpu.export_state().unwrap();
        assert_eq!(a.applied, b.applied, "{what}: applied steps");
        assert_eq!(a.bias.pow1.to_bits(), b.bias.pow1.to_bits(), "{what}: pow1");
        assert_eq!(a.bias.pow2.to_bits(), b.bias.pow2.to_bits(), "{what}: pow2");
        // Before the first applied step a backend may hold no state at
        // all, or a list of empty ones (the CUDA backend fixes its layout
        // at a skipped first step): both are zeros, as a checkpoint writes
        // them (`Engine::save_state`).
        let slots = self.kind.state_slots();
        let values = |s: &BackendState, i: usize, n: usize| -> Vec<u8> {
            match s.slots.get(i).filter(|v| !v.is_empty()) {
                Some(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                None => vec![0; 4 * n * slots],
            }
        };
        for s in [&a, &b] {
            assert!(
                s.slots.len() <= self.pairs.len(),
                "{what}: state of {} tensors",
                s.slots.len()
            );
        }
        for (i, p) in self.pairs.iter().enumerate() {
            let (xb, yb) = (values(&a, i, p.n), values(&b, i, p.n));
            assert_eq!(xb.len(), 4 * p.n * slots, "{what}: CPU state of tensor {i}");
            assert_same(
                &xb,
                &yb,
                DType::F32,
                &format!("{what}: state of tensor {i}"),
            );
        }
    }
}

/// Sizes around warp, block, vector and chunk edges, one misaligned.
fn shape(dt: DType) -> Vec<(usize, DType, bool)> {
    vec![
        (0, dt, false),
        (1, dt, false),
        (31, dt, false),
        (33, dt, true),
        (257, dt, false),
        (4097, dt, false),
        (9001, dt, true),
        (3 * 4096 + 5, dt, false),
    ]
}

#[test]
fn no_gpu_handle_reports_no_cuda() {
    // On a GPU machine this is the wrong test; the others cover it.
    // SAFETY: probing only.
    let present = unsafe { sys::is_culib_present() }
        && unsafe { sys::cuInit(0) } == sys::CUresult::CUDA_SUCCESS;
    if present {
        support::skipped(
            "no_gpu_handle_reports_no_cuda",
            "this machine has a CUDA driver and device",
        );
        return;
    }
    let mut cfg = std::mem::MaybeUninit::<lra::ffi::lra_config>::zeroed();
    let mut h: *mut lra::ffi::lra_handle = std::ptr::null_mut();
    // SAFETY: the C ABI as a C caller uses it.
    let (status, msg) = unsafe {
        lra::ffi::lra_config_init(cfg.as_mut_ptr(), OptimizerKind::Adam as u32);
        let mut cfg = cfg.assume_init();
        cfg.device = lra::ffi::LRA_DEVICE_CUDA;
        let status = lra::ffi::lra_create(&cfg, &mut h);
        let msg = std::ffi::CStr::from_ptr(lra::ffi::lra_thread_last_error())
            .to_string_lossy()
            .into_owned();
        (status, msg)
    };
    assert_eq!(status, lra::ffi::LRA_NO_CUDA, "{msg}");
    assert!(h.is_null());
    assert!(msg.contains("CUDA"), "{msg}");
    println!("lra_create(device = 1) on this machine: {msg}");
    // And twice (the driver probe is cached, still no panic).
    let err = cuda::create(OptimizerKind::Sgd, 0).err().unwrap();
    assert_eq!(err.status, Status::NoCuda);
}

/// A program whose first CUDA call is lra's (a Fortran or Julia code that
/// never touched the driver itself): lra initialises the driver. Then, on
/// the fake driver, which says what it holds: the kernels are loaded once
/// however many handles come and go, and a handle leaves no memory,
/// stream or event behind, nor gathers staging buffers step after step.
/// Every other test has initialised the driver already, so this one runs
/// in a process of its own.
#[test]
fn lra_initialises_the_driver_and_holds_only_what_it_uses() {
    const TEST: &str = "lra_initialises_the_driver_and_holds_only_what_it_uses";
    if !is_own_process(TEST) {
        if gpu(TEST) {
            assert!(in_own_process(TEST));
        }
        return;
    }
    // No CUDA call before lra's.
    drop(cuda::create(OptimizerKind::Adam, 0).unwrap_or_else(|e| panic!("{e:?}")));
    assert!(
        gpu(TEST),
        "the primary context, current for the test's buffers"
    );
    let Some(before) = fake_driver_holds() else {
        support::partial(
            TEST,
            "what lra holds of the driver (modules, streams, memory) is not checked: a real driver does not say",
        );
        return;
    };
    assert_eq!(before.modules, 1, "one handle: {before:?}");
    // One handle's life: steps in three modes, the tensors in new buffers
    // from the third step on (a new tensor table to upload each step).
    let modes = [
        Mode::Fused { guard: true },
        Mode::Capped,
        Mode::Noisy { guard: false },
    ];
    let life = |kind: OptimizerKind| {
        let mut case = Case::new(kind, &shape(DType::F16), std::ptr::null_mut());
        let mut held = Vec::new();
        for (t, &mode) in modes.iter().cycle().take(9).enumerate() {
            if t >= 2 {
                case.move_device_buffers();
            }
            case.set_grads(t as u64 + 1, None);
            case.step(mode, 0.01, None);
            held.push(fake_driver_holds().unwrap());
        }
        // Every mode has run once: from then on, reuse.
        assert!(
            held[3..].iter().all(|h| *h == held[3]),
            "{kind:?}, steps: {held:?}"
        );
    };
    life(OptimizerKind::Adam);
    let after_one = fake_driver_holds().unwrap();
    for kind in [
        OptimizerKind::Sgd,
        OptimizerKind::AdamW,
        OptimizerKind::Adam,
    ] {
        life(kind);
    }
    let after_four = fake_driver_holds().unwrap();
    assert_eq!(
        after_four, after_one,
        "after one handle's life, then three more"
    );
    assert_eq!(after_four.modules, 1);
}

/// What the fake driver of `fake-cuda/` holds now (its `FakeCudaHolds`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FakeDriverHolds {
    modules: usize,
    device_allocations: usize,
    pinned_allocations: usize,
    streams: usize,
    events: usize,
}

/// What the fake driver holds now (`None` on another driver).
fn fake_driver_holds() -> Option<FakeDriverHolds> {
    let f = fake_driver_function(c"fake_cuda_holds")?;
    // SAFETY: the fake declares `fake_cuda_holds` with this signature.
    let f: extern "C" fn() -> FakeDriverHolds = unsafe { std::mem::transmute(f) };
    Some(f())
}

/// Makes the fake driver fail the `n`-th call from now (1: the next) of
/// the kind its test hook `hook` counts (`fake_cuda_fail_launch`: kernel
/// launches, `fake_cuda_fail_event_record`: event records); panics on
/// another driver.
fn fake_driver_fails(hook: &std::ffi::CStr, n: u64) {
    let f = fake_driver_function(hook).expect("the fake driver");
    // SAFETY: the fake declares its `fake_cuda_fail_*` hooks with this
    // signature.
    let f: extern "C" fn(u64) = unsafe { std::mem::transmute(f) };
    f(n)
}

/// A function the fake driver of `fake-cuda/` exports beside the driver
/// API (`None` when `LRA_FAKE_CUDA` is not set).
fn fake_driver_function(name: &std::ffi::CStr) -> Option<*mut c_void> {
    std::env::var_os("LRA_FAKE_CUDA")?;
    // SAFETY: looks up the libcuda.so cudarc has loaded (RTLD_NOLOAD loads
    // nothing new, and the handle only drops the reference it took).
    unsafe {
        let lib = libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!lib.is_null(), "libcuda.so is loaded");
        let f = libc::dlsym(lib, name.as_ptr());
        libc::dlclose(lib);
        assert!(
            !f.is_null(),
            "LRA_FAKE_CUDA is set, but the driver is not the fake: no {name:?}"
        );
        Some(f)
    }
}

#[test]
fn every_kernel_matches_the_cpu_backend() {
    if !gpu("every_kernel_matches_the_cpu_backend") {
        return;
    }
    for kind in OptimizerKind::ALL {
        for dt in [DType::F32, DType::F16, DType::Bf16] {
            for mode in [
                Mode::Fused { guard: false },
                Mode::Fused { guard: true },
                Mode::Capped,
                Mode::Zero,
                Mode::Noisy { guard: true },
                Mode::Noisy { guard: false },
            ] {
                let what = format!("{} {} {mode:?}", kind.name(), dt.name());
                let mut case = Case::new(kind, &shape(dt), std::ptr::null_mut());
                // f16: hyper-parameters the defaults would hide slips in
                if dt == DType::F16 {
                    case.hyper = support::distinct_hyper(kind);
                }
                for step in 0..3 {
                    case.set_grads(step + 1, None);
                    let (c, g) = case.step(mode, 0.01, None);
                    case.assert_step_matches(mode, &c, &g, &format!("{what} step {step}"));
                }
            }
        }
    }
}

/// With s from φ (R > 0), s differs in the last bits between backends, so
/// parameters of every dtype agree within [`assert_values_close`]'s
/// tolerance instead of bitwise.
fn assert_params_close(case: &Case, what: &str) {
    for (i, p) in case.pairs.iter().enumerate() {
        let dev = p.dev.read(p.off, p.host.len());
        assert_values_close(&p.host, &dev, p.dt, &format!("{what}: tensor {i}"));
    }
}

/// Also moves every tensor to new memory half way (a new tensor table),
/// and ends with a step on each special stream handle.
#[test]
fn mixed_dtypes_in_one_launch_and_a_caller_stream() {
    if !gpu("mixed_dtypes_in_one_launch_and_a_caller_stream") {
        return;
    }
    let stream = non_blocking_stream();
    let mut shape = vec![
        (100, DType::F32, false),
        (5000, DType::Bf16, true),
        (77, DType::F16, false),
        (4096, DType::F32, true),
    ];
    // and sixty small tensors: chunks of many segments
    let dts = [DType::F32, DType::F16, DType::Bf16];
    shape.extend((0..60).map(|i| (13 * i + 1, dts[i % 3], i % 7 == 3)));
    let mut case = Case::new(OptimizerKind::AdamW, &shape, stream as *mut c_void);
    for step in 0..4 {
        if step == 2 {
            case.move_device_buffers();
        }
        case.set_grads(step + 10, None);
        let (c, g) = case.step(Mode::Fused { guard: true }, 0.003, None);
        let what = format!("mixed, step {step}");
        assert_phi_close(c.phi, g.phi, &what);
        case.assert_params_same(&what);
    }
    case.assert_state_same("mixed");
    for (handle, name) in [(1usize, "CU_STREAM_LEGACY"), (2, "CU_STREAM_PER_THREAD")] {
        case.stream = handle as *mut c_void;
        case.set_grads(20 + handle as u64, None);
        let (c, g) = case.step(Mode::Fused { guard: true }, 0.003, None);
        assert_phi_close(c.phi, g.phi, name);
        case.assert_params_same(name);
    }
    case.assert_state_same("after the special stream handles");
    drop(case);
    destroy_streams(&[stream]);
}

#[test]
fn skips_leave_everything_untouched() {
    if !gpu("skips_leave_everything_untouched") {
        return;
    }
    for mode in [Mode::Fused { guard: true }, Mode::Capped] {
        let mut case = Case::new(
            OptimizerKind::Adam,
            &shape(DType::F32),
            std::ptr::null_mut(),
        );
        case.set_grads(1, None);
        case.step(mode, 0.01, None);
        let before: Vec<Vec<u8>> = case
            .pairs
            .iter()
            .map(|p| p.dev.read(p.off, p.host.len()))
            .collect();
        // A NaN gradient with the guard on.
        case.set_grads(2, Some(f32::NAN));
        let (c, g) = case.step(mode, 0.01, None);
        assert_eq!(
            (c.skip, g.skip),
            (SkipReason::NonfiniteGrad, SkipReason::NonfiniteGrad)
        );
        // The device found_inf flag.
        case.set_grads(3, None);
        let flag = DevBuf::new(&1.0f32.to_le_bytes());
        let (c, g) = case.step(mode, 0.01, Some(&flag));
        assert_eq!(
            (c.skip, g.skip),
            (SkipReason::FoundInf, SkipReason::FoundInf)
        );
        for (p, b) in case.pairs.iter().zip(&before) {
            assert_eq!(
                &p.dev.read(p.off, p.host.len()),
                b,
                "{mode:?}: parameters changed by a skipped step"
            );
        }
        case.assert_state_same(&format!("{mode:?} after skips"));
        // A cleared flag applies the step again, with the same bias step count.
        flag.write(0, &0.0f32.to_le_bytes());
        let (c, g) = case.step(mode, 0.01, Some(&flag));
        assert_eq!((c.skip, g.skip), (SkipReason::None, SkipReason::None));
        case.assert_params_same(&format!("{mode:?} after skips"));
        case.assert_state_same(&format!("{mode:?} after skips"));
    }
}

#[test]
fn phi_is_bit_identical_across_runs() {
    if !gpu("phi_is_bit_identical_across_runs") {
        return;
    }
    if fake_driver_cannot(
        "phi_is_bit_identical_across_runs",
        "its large-chunk layout starts at 2^26 elements: gigabytes of interpreter memory",
    ) {
        return;
    }
    // Past abi::LARGE_FROM elements: the large-chunk layout.
    let shape = vec![
        (lra::backend::cuda::abi::LARGE_FROM + 3, DType::F32, false),
        (12345, DType::F16, true),
    ];
    let mut phis = Vec::new();
    for _ in 0..3 {
        let mut case = Case::new(OptimizerKind::Adam, &shape, std::ptr::null_mut());
        for step in 0..2 {
            case.set_grads(5 + step, None);
            let (c, g) = case.step(Mode::Fused { guard: false }, 0.01, None);
            assert_phi_close(c.phi, g.phi, "large layout");
            phis.push(g.phi.to_bits());
        }
        case.assert_params_same("large layout");
        case.assert_state_same("large layout");
    }
    assert!(phis.chunks(2).all(|run| run == &phis[..2]), "{phis:x?}");
}

#[test]
fn sharded_steps_sum_across_ranks_between_the_passes() {
    if !gpu("sharded_steps_sum_across_ranks_between_the_passes") {
        return;
    }
    // Noisy: the device computes s from the summed φ it is handed back.
    for mode in [
        Mode::Fused { guard: true },
        Mode::Capped,
        Mode::Zero,
        Mode::Noisy { guard: true },
        Mode::Noisy { guard: false },
    ] {
        let mut case = Case::new(
            OptimizerKind::Rmsprop,
            &shape(DType::Bf16),
            std::ptr::null_mut(),
        );
        case.sharded = true;
        for step in 0..3 {
            // (an infinite gradient where the guard skips the step)
            case.set_grads(
                20 + step,
                (step == 1 && mode.guard()).then_some(f32::INFINITY),
            );
            let (c, g) = case.step(mode, 0.02, None);
            case.assert_step_matches(mode, &c, &g, &format!("sharded {mode:?} step {step}"));
        }
        // A set found_inf joins the sum (the rank does not drop out of the
        // collective) and skips the step.
        let flag = DevBuf::new(&1.0f32.to_le_bytes());
        let (c, g) = case.step(mode, 0.02, Some(&flag));
        assert_eq!(
            (c.skip, g.skip),
            (SkipReason::FoundInf, SkipReason::FoundInf)
        );
        case.assert_params_same(&format!("sharded {mode:?} found_inf"));
        case.assert_state_same(&format!("sharded {mode:?} found_inf"));
    }
}

/// Seeded random step sequences, against the CPU backend step by step:
/// random layouts (every dtype, aligned and not, sizes around the vector,
/// warp and chunk edges), every optimizer, replicated and sharded, every
/// mode, found-inf flags (clear, set, NaN), non-finite gradients, η
/// changes, tensors moved to new memory between steps, and each step on
/// one of the legacy stream (NULL and `CU_STREAM_LEGACY`), the per-thread
/// stream and a stream of the test's own. Longer runs:
/// `LRA_CUDA_FUZZ_SEED=<seed> LRA_CUDA_FUZZ_CASES=<n>`; a failure names its
/// case's seed (rerun alone with `LRA_CUDA_FUZZ_CASES=1`).
#[test]
fn random_step_sequences_match_the_cpu_backend() {
    let test = "random_step_sequences_match_the_cpu_backend";
    if !gpu(test) {
        return;
    }
    let seeds = FuzzSeeds::from_env("LRA_CUDA_FUZZ", 0xc0da_0001, 20);
    let mut own = std::ptr::null_mut();
    // SAFETY: out-parameter; 1 = non-blocking.
    unsafe { ok(sys::cuStreamCreate(&mut own, 1)) };
    // NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD, the test's own
    let streams: [*mut c_void; 4] = [0usize, 1, 2, own as usize].map(|h| h as *mut c_void);
    let sizes = [0, 1, 3, 4, 5, 31, 33, 255, 257, 4095, 4096, 4097, 6001];
    let dtypes = [DType::F32, DType::F16, DType::Bf16];
    let modes = [
        Mode::Fused { guard: false },
        Mode::Fused { guard: true },
        Mode::Capped,
        Mode::Zero,
        Mode::Noisy { guard: true },
        Mode::Noisy { guard: false },
    ];
    // what the cases did: steps taken by skip reason, failed sums,
    // restores, moves
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for seed in seeds.seeds() {
        let mut rng = Rng(seed);
        let mut below = |n: usize| rng.index(n);
        let kind = OptimizerKind::ALL[below(7)];
        let shape: Vec<(usize, DType, bool)> = (0..1 + below(12))
            .map(|_| (sizes[below(sizes.len())], dtypes[below(3)], below(4) == 0))
            .collect();
        let mut case = Case::new(kind, &shape, streams[below(4)]);
        case.sharded = below(3) == 0;
        let steps = 2 + below(5);
        let mut trace = Vec::new();
        for k in 0..steps {
            let mode = modes[below(modes.len())];
            // A non-finite gradient that a step writes makes every later φ
            // NaN on both sides, which would prove nothing: only where the
            // guard skips the step, or on the last one.
            let poison = ((mode.guard() || k + 1 == steps) && below(5) == 0)
                .then(|| [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][below(3)]);
            let flag = match below(8) {
                0 => Some(DevBuf::new(&1.0f32.to_le_bytes())),
                1 => Some(DevBuf::new(&f32::NAN.to_le_bytes())),
                2 => Some(DevBuf::new(&0.0f32.to_le_bytes())),
                _ => None,
            };
            let moved = below(5) == 0;
            if moved {
                case.move_device_buffers();
            }
            // A restart: a fresh CUDA backend takes the CPU's state, as a
            // checkpoint moved between handles would give it.
            let restored = below(8) == 0 && case.cpu.applied_steps().unwrap() > 0;
            if restored {
                case.gpu = cuda::create(kind, 0).unwrap();
                let st = case.cpu.export_state().unwrap();
                case.gpu.import_values(&st).unwrap();
            }
            let sum_fails = case.sharded && below(4) == 0;
            case.stream = streams[below(4)];
            let lr = [1e-3, 1e-2, 5e-2][below(3)];
            case.set_grads(seed.wrapping_mul(16).wrapping_add(k as u64), poison);
            trace.push(format!(
                "{mode:?} lr {lr} stream {:?}{}{}{}{}{}",
                case.stream,
                if moved { " moved" } else { "" },
                if restored { " restored" } else { "" },
                if sum_fails { " sum fails" } else { "" },
                poison.map_or(String::new(), |p| format!(" gradient {p}")),
                flag.as_ref().map_or(String::new(), |f| format!(
                    " found_inf {}",
                    f32::from_le_bytes(f.read(0, 4).try_into().unwrap())
                )),
            ));
            let what = format!(
                "{test}: seed {seed} ({} {}, {shape:?}), steps:\n  {}\n\
                 (rerun alone: LRA_CUDA_FUZZ_SEED={seed} LRA_CUDA_FUZZ_CASES=1)",
                kind.name(),
                if case.sharded {
                    "sharded"
                } else {
                    "replicated"
                },
                trace.join("\n  ")
            );
            for (event, on) in [("moved", moved), ("restored", restored)] {
                *seen.entry(event.into()).or_default() += on as usize;
            }
            if !sum_fails {
                let (c, g) = case.step(mode, lr, flag.as_ref());
                case.assert_step_matches(mode, &c, &g, &what);
                *seen.entry(format!("{:?}", g.skip)).or_default() += 1;
                continue;
            }
            let before = (case.cpu.outcome().unwrap(), case.gpu.outcome().unwrap());
            let (c, g) = case.step_with(mode, lr, flag.as_ref(), true);
            let (c, g) = (c.err().map(|e| e.status), g.err().map(|e| e.status));
            assert_eq!(c, g, "{what}: statuses");
            if c.is_none() {
                // the step made no pre-write sum (fused, guard off)
                let (c, g) = (case.cpu.outcome().unwrap(), case.gpu.outcome().unwrap());
                case.assert_step_matches(mode, &c, &g, &what);
                continue;
            }
            assert_eq!(c, Some(Status::ReductionFailed), "{what}");
            *seen.entry("failed sum".into()).or_default() += 1;
            // nothing changed: the last outcome, parameters, state
            for (o, was, who) in [
                (case.cpu.outcome().unwrap(), before.0, "CPU"),
                (case.gpu.outcome().unwrap(), before.1, "CUDA"),
            ] {
                assert_eq!(
                    (o.skip, o.phi.to_bits(), o.scale.to_bits()),
                    (was.skip, was.phi.to_bits(), was.scale.to_bits()),
                    "{what}: {who} outcome after the failed sum"
                );
            }
            case.assert_params_same(&what);
            case.assert_state_same(&what);
        }
    }
    seeds.assert_covered(
        test,
        &seen,
        &[
            "None",
            "FoundInf",
            "NonfiniteGrad",
            "failed sum",
            "moved",
            "restored",
        ],
    );
    // SAFETY: created above; the cases that stepped on it are dropped.
    unsafe { sys::cuStreamDestroy_v2(own) };
}

/// The driver's JIT of kernels/lra.ptx keeps to `.maxnreg 64` and spills
/// nothing (CI proves both only for its own ptxas); the report, with the
/// grid lra launches, goes into the GPU run's log.
#[test]
fn the_kernel_jit_spills_nothing() {
    let test = "the_kernel_jit_spills_nothing";
    if !gpu(test)
        || fake_driver_cannot(
            test,
            "the fake driver interprets the PTX: no JIT, no registers to count",
        )
    {
        return;
    }
    let r = cuda::kernel_report(0).unwrap();
    println!("kernel as the driver's JIT built it: {r:?}");
    assert!(r.registers <= 64, "{r:?}: more registers than .maxnreg 64");
    assert_eq!(r.local_bytes, 0, "{r:?}: the JIT spilled to local memory");
}

#[test]
fn bad_pointers_are_invalid_arguments() {
    if !gpu("bad_pointers_are_invalid_arguments") {
        return;
    }
    let gpu = cuda::create(OptimizerKind::Sgd, 0).unwrap();
    let host = [0f32; 16];
    let dev = DevBuf::new(&[0u8; 64]);
    let other = OtherContextMemory::new(64);
    let t = |p: u64, g: u64, n| TensorDesc {
        param: p as *mut c_void,
        grad: g as *const c_void,
        numel: n,
        dtype: DType::F32,
    };
    // Each case must be refused by its own check (the message says which):
    // the gradient of the last one starts right after the parameter's
    // range, so that only the driver's range check can refuse it.
    let cases = [
        (
            "host pointer",
            t(host.as_ptr() as u64, dev.0, 4),
            "not CUDA memory",
        ),
        ("misaligned", t(dev.0 + 2, dev.0 + 32, 4), "not aligned"),
        (
            "past the allocation",
            t(dev.0, dev.0 + (4 << 20), 1 << 20),
            "past the end of its allocation",
        ),
        // Validated only: a launch on it would fault in lra's context.
        (
            "memory of another context",
            t(dev.0, other.ptr, 4),
            "allocated in another context",
        ),
    ];
    for (what, d, says) in cases {
        let e = gpu
            .validate(&[d])
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert_eq!(e.status, Status::InvalidArgument, "{what}: {e}");
        assert!(
            e.message.contains(says),
            "{what}: refused by another check: {e}"
        );
    }
    // Pointers that passed once are checked again when the size or dtype
    // changes (no layout is fixed: no step ran).
    let f16 = |p: u64, g: u64, n| TensorDesc {
        dtype: DType::F16,
        ..t(p, g, n)
    };
    let after_accepted = [
        (
            "grown past the allocation",
            t(dev.0, dev.0 + 32, 4),
            t(dev.0, dev.0 + (4 << 20), 1 << 20),
        ),
        (
            "f16 reread as f32",
            f16(dev.0 + 2, dev.0 + 34, 2),
            t(dev.0 + 2, dev.0 + 34, 2),
        ),
    ];
    for (what, good, bad) in after_accepted {
        gpu.validate(&[good]).unwrap();
        let e = gpu
            .validate(&[bad])
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert_eq!(e.status, Status::InvalidArgument, "{what}: {e}");
    }
}

/// An SGD case on the legacy stream after one fused step (the layout fixed),
/// its mode, and the device tensors of its next step.
fn sgd_case_after_a_step() -> (Case, Mode, Vec<TensorDesc>) {
    let mut case = Case::new(OptimizerKind::Sgd, &shape(DType::F32), std::ptr::null_mut());
    case.set_grads(1, None);
    let mode = Mode::Fused { guard: false };
    case.step(mode, 0.01, None);
    let (_, tg) = case.descs();
    (case, mode, tg)
}

/// A stream of another context, and a stream capturing a CUDA graph, are
/// refused before anything is enqueued (the capture stays valid). In a
/// process of its own: a stream created by a test running beside it could
/// take the destroyed stream's address that this test waits to see again.
#[test]
fn foreign_and_capturing_streams_are_refused() {
    if !runs_alone_here("foreign_and_capturing_streams_are_refused") {
        return;
    }
    let (mut case, mode, tg) = sgd_case_after_a_step();
    let refused = |case: &mut Case, stream: *mut c_void, what: &str| {
        let e = unsafe {
            case.gpu
                .step(case.request(mode, 0.01, &tg, std::ptr::null(), stream, None))
        }
        .err()
        .unwrap_or_else(|| panic!("{what}: step accepted"));
        assert_eq!(e.status, Status::InvalidArgument, "{what}: {e}");
        println!("{what}: {e}");
    };
    let foreign = ForeignStream::new();
    refused(&mut case, foreign.stream, "a stream of another context");
    drop(foreign);
    // A stream accepted once, destroyed, and its address handed out again
    // to a stream of another context: checked anew, not remembered.
    let foreign = unsafe {
        let mut mine = std::ptr::null_mut();
        ok(sys::cuStreamCreate(&mut mine, 1));
        case.stream = mine as *mut c_void;
        case.step(mode, 0.01, None);
        case.stream = std::ptr::null_mut();
        ok(sys::cuStreamSynchronize(mine));
        ok(sys::cuStreamDestroy_v2(mine));
        let foreign = ForeignStream::new();
        if foreign.stream == mine as *mut c_void {
            println!("the destroyed stream's address came back in another context");
        } else {
            // The fake driver reuses it (as a real one may); a GPU need not.
            assert!(
                std::env::var_os("LRA_FAKE_CUDA").is_none(),
                "the fake driver did not hand the destroyed stream's address out again"
            );
            println!(
                "this driver gave the new stream another address; the refusal is checked anyway"
            );
        }
        foreign
    };
    refused(
        &mut case,
        foreign.stream,
        "a reused stream address of another context",
    );
    drop(foreign);
    // SAFETY: driver calls with out-parameters on handles made here.
    unsafe {
        let capturing = new_capturing_stream(1);
        refused(&mut case, capturing as *mut c_void, "a capturing stream");
        ok(end_capture(capturing));
        ok(sys::cuStreamDestroy_v2(capturing));
    }
    // The handle still works and still matches the CPU backend.
    case.set_grads(2, None);
    let (c, g) = case.step(mode, 0.01, None);
    assert_phi_close(c.phi, g.phi, "after refused streams");
    case.assert_params_same("after refused streams");
}

/// Whether `test`'s body runs here: a GPU is present (else the skip is
/// printed) and this is the process of its own that [`in_own_process`]
/// started for it (else that process ran it).
fn runs_alone_here(test: &str) -> bool {
    gpu(test) && !in_own_process(test)
}

/// For a test of what only the fake driver can stage (a switch among
/// `vars`, or a request through its own functions): true in the process
/// of its own where the test's body runs (with `vars` set); in the test's
/// first process false, after running it there, or after saying why not
/// (no driver, or a real one, which has no such switch).
fn runs_alone_on_the_fake_driver(test: &str, vars: &[(&str, &str)], stages: &str) -> bool {
    if is_own_process(test) {
        for &(var, value) in vars {
            assert_eq!(std::env::var(var).as_deref(), Ok(value), "{var}");
        }
        return true;
    }
    if gpu(test) {
        if std::env::var_os("LRA_FAKE_CUDA").is_none() {
            support::skipped(test, &format!("only the fake driver {stages}"));
        } else {
            assert!(in_own_process_with(test, vars));
        }
    }
    false
}

/// Names the test that [`in_own_process`] runs in a process of its own.
const OWN_PROCESS: &str = "LRA_CUDA_TEST_ALONE";

/// Whether this is the process [`in_own_process`] started for `test`.
fn is_own_process(test: &str) -> bool {
    std::env::var(OWN_PROCESS).is_ok_and(|t| t == test)
}

/// Runs `test` alone in a process of its own (this test binary, filtered
/// to it) and checks that it ran there and passed; returns false in that
/// process, where the test's body runs. For tests that affect, or depend
/// on, the whole driver: a capture in global mode makes the driver refuse
/// other threads' allocations and context-wide waits, one on a blocking
/// stream makes the legacy stream unusable, and a freed stream address
/// goes to whichever thread creates the next stream.
fn in_own_process(test: &str) -> bool {
    in_own_process_with(test, &[])
}

/// [`in_own_process`], the process's environment with `vars` added (for
/// the fake driver's switches, read once per process).
fn in_own_process_with(test: &str, vars: &[(&str, &str)]) -> bool {
    if is_own_process(test) {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(OWN_PROCESS, test)
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    // Past libtest's capture, as `skipped` writes: the suite's log must
    // show the child's lines (scripts/stages/fake-cuda.sh checks them for
    // the fake driver's refusals).
    use std::io::Write;
    let _ = std::io::stderr().write_all(text.as_bytes());
    assert!(
        out.status.success() && text.contains("test result: ok. 1 passed"),
        "{test} in a process of its own: {}\n{text}",
        out.status
    );
    true
}

/// The legacy stream while a blocking stream captures: the driver forbids
/// it then; refused as an argument (not a driver error), and the capture
/// stays valid.
#[test]
fn the_legacy_stream_is_refused_while_a_blocking_stream_captures() {
    if !runs_alone_here("the_legacy_stream_is_refused_while_a_blocking_stream_captures") {
        return;
    }
    let (mut case, mode, tg) = sgd_case_after_a_step();
    // SAFETY: driver calls with out-parameters on handles made here.
    unsafe {
        let blocking = new_capturing_stream(0);
        let r = case.gpu.step(case.request(
            mode,
            0.01,
            &tg,
            std::ptr::null(),
            std::ptr::null_mut(),
            None,
        ));
        let ended = end_capture(blocking);
        ok(sys::cuStreamDestroy_v2(blocking));
        let e = r.expect_err("a step on the legacy stream was accepted");
        assert_eq!(e.status, Status::InvalidArgument, "{e}");
        assert!(e.message.contains("legacy stream"), "{e}");
        println!("refused: {e}");
        assert_eq!(
            ended,
            sys::CUresult::CUDA_SUCCESS,
            "the capture after lra's refusal"
        );
    }
    // The handle still works and still matches the CPU backend.
    case.set_grads(2, None);
    let (c, g) = case.step(mode, 0.01, None);
    assert_phi_close(c.phi, g.phi, "after the refused legacy stream");
    case.assert_params_same("after the refused legacy stream");
}

/// A CUDA graph that another thread captures in global mode (PyTorch's
/// default) survives lra's calls meanwhile: a first step (allocations, a
/// table upload that queries an event) and its outcome (a wait). In the
/// thread's default mode the driver refuses such calls during the capture
/// and invalidates it; lra makes them in relaxed mode.
#[test]
fn a_global_capture_in_another_thread_survives_a_step() {
    if !runs_alone_here("a_global_capture_in_another_thread_survives_a_step") {
        return;
    }
    let mut case = Case::new(
        OptimizerKind::Adam,
        &shape(DType::F32),
        std::ptr::null_mut(),
    );
    case.set_grads(1, None);
    let mut capturing = std::ptr::null_mut();
    // SAFETY: out-parameter.
    unsafe { ok(sys::cuStreamCreate(&mut capturing, 1)) };
    // Raw pointers are not Send: the handles cross as addresses.
    let (stream, ctx) = (capturing as usize, current_context() as usize);
    let (began_tx, began) = std::sync::mpsc::channel();
    let (end, end_rx) = std::sync::mpsc::channel::<()>();
    let capturer = std::thread::spawn(move || {
        // SAFETY: the test's stream and context, live until joined.
        unsafe {
            let s = stream as sys::CUstream;
            ok(sys::cuCtxPushCurrent_v2(ctx as sys::CUcontext));
            ok(sys::cuStreamBeginCapture_v2(
                s,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
            ));
            began_tx.send(()).unwrap();
            let _ = end_rx.recv();
            let r = end_capture(s);
            let mut popped = std::ptr::null_mut();
            ok(sys::cuCtxPopCurrent_v2(&mut popped));
            r
        }
    });
    began.recv().unwrap();
    // The caller's own mode is the default, global; lra gives it back.
    use sys::CUstreamCaptureMode as M;
    let harness_mode = exchange_capture_mode(M::CU_STREAM_CAPTURE_MODE_GLOBAL);
    let mode = Mode::Fused { guard: true };
    let (c, g) = case.step(mode, 0.01, None);
    let after = exchange_capture_mode(harness_mode);
    drop(end);
    assert_eq!(
        after,
        M::CU_STREAM_CAPTURE_MODE_GLOBAL,
        "the caller's capture mode after lra's calls"
    );
    assert_eq!(
        capturer.join().unwrap(),
        sys::CUresult::CUDA_SUCCESS,
        "lra's calls invalidated another thread's capture"
    );
    assert_phi_close(c.phi, g.phi, "during another thread's capture");
    case.assert_params_same("during another thread's capture");
    case.assert_state_same("during another thread's capture");
    // SAFETY: created above; nothing is queued on it.
    unsafe { ok(sys::cuStreamDestroy_v2(capturing)) };
}

/// A sharded Adam case on the legacy stream, gradients set.
fn sharded_adam_case(dt: DType) -> Case {
    let mut case = Case::new(OptimizerKind::Adam, &shape(dt), std::ptr::null_mut());
    case.sharded = true;
    case.set_grads(1, None);
    case
}

/// A sharded step whose cross-rank sum fails (an MPI error) changes
/// nothing: the last step's outcome, parameters and state stay, as on the
/// CPU backend, and the next step matches it again.
#[test]
fn a_failed_cross_rank_sum_changes_nothing() {
    if !gpu("a_failed_cross_rank_sum_changes_nothing") {
        return;
    }
    for mode in [Mode::Fused { guard: true }, Mode::Capped] {
        let mut case = sharded_adam_case(DType::F16);
        let (c1, g1) = case.step(mode, 0.02, None);
        // A non-finite gradient: the guard's flag is set before the sum.
        case.set_grads(2, Some(f32::NAN));
        let (c, g) = case.step_with(mode, 0.02, None, true);
        let what = format!("{mode:?}, failed sum");
        assert_eq!(
            c.err().map(|e| e.status),
            Some(Status::ReductionFailed),
            "{what}"
        );
        assert_eq!(
            g.err().map(|e| e.status),
            Some(Status::ReductionFailed),
            "{what}"
        );
        let (c, g) = (case.cpu.outcome().unwrap(), case.gpu.outcome().unwrap());
        assert_eq!(
            (c.skip, c.phi.to_bits()),
            (c1.skip, c1.phi.to_bits()),
            "{what}: CPU"
        );
        assert_eq!(g.skip, g1.skip, "{what}: outcome of the step before");
        assert_eq!(
            g.phi.to_bits(),
            g1.phi.to_bits(),
            "{what}: φ of the step before"
        );
        assert_eq!(g.scale.to_bits(), g1.scale.to_bits(), "{what}: scale");
        case.assert_params_same(&what);
        case.assert_state_same(&what);
        case.set_grads(3, None);
        let (c, g) = case.step(mode, 0.02, None);
        case.assert_step_matches(mode, &c, &g, &format!("{what}, next step"));
    }
}

/// The cross-rank sum is the caller's code, so it runs with the calling
/// thread's own context stack: the step pops the context it pushed before
/// calling it and pushes it again after. Whatever runs on the thread while
/// the sum waits (another task of a cooperative scheduler, such as Julia's)
/// then finds no lra context there, and cannot replace it under lra's
/// launches. Here the thread has no current context at all.
#[test]
fn the_cross_rank_sum_runs_outside_lras_context() {
    if !gpu("the_cross_rank_sum_runs_outside_lras_context") {
        return;
    }
    for mode in [Mode::Fused { guard: true }, Mode::Capped] {
        let mut case = sharded_adam_case(DType::F32);
        let primary = current_context();
        // SAFETY: unbinds the thread's context (rebound below).
        ok(unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) });
        let (c, g) = case.step_with(mode, 0.02, None, false);
        let after = current_context();
        // SAFETY: the context `gpu` made current.
        ok(unsafe { sys::cuCtxSetCurrent(primary) });
        let what = format!("{mode:?}");
        c.unwrap();
        g.unwrap();
        assert!(!case.sum_contexts.is_empty(), "{what}: no cross-rank sum");
        assert!(
            case.sum_contexts.iter().all(|c| c.is_null()),
            "{what}: the sum ran with a context current: {:?}",
            case.sum_contexts
        );
        assert!(after.is_null(), "{what}: the step left a context current");
        let (c, g) = (case.cpu.outcome().unwrap(), case.gpu.outcome().unwrap());
        case.assert_step_matches(mode, &c, &g, &what);
        case.assert_params_same(&what);
        case.assert_state_same(&what);
    }
}

/// A first step that fails after the state was allocated (a failed
/// cross-rank sum) fixes no layout: the next first step may bring other
/// sizes, as on the CPU backend.
#[test]
fn a_failed_first_step_fixes_no_layout() {
    if !gpu("a_failed_first_step_fixes_no_layout") {
        return;
    }
    let mode = Mode::Capped;
    let mut small = Case::new(
        OptimizerKind::Adam,
        &shape(DType::F32)[..4],
        std::ptr::null_mut(),
    );
    small.sharded = true;
    small.set_grads(1, None);
    let (c, g) = small.step_with(mode, 0.02, None, true);
    assert!(
        c.is_err() && g.is_err(),
        "the failing sum must fail the step"
    );
    let mut large = Case::new(
        OptimizerKind::Adam,
        &shape(DType::F32),
        std::ptr::null_mut(),
    );
    large.sharded = true;
    large.cpu = small.cpu;
    large.gpu = small.gpu;
    for step in 0..2 {
        large.set_grads(2 + step, None);
        let (c, g) = large.step(mode, 0.02, None);
        let what = format!("first layout after a failed first step, step {step}");
        large.assert_step_matches(mode, &c, &g, &what);
    }
}

/// The CPU backend's state imported into a fresh CUDA backend, and into
/// one whose failed first step left another layout, continues as the CPU
/// backend does (the next step on a new non-blocking stream).
#[test]
fn imported_state_continues_as_on_the_cpu() {
    if !gpu("imported_state_continues_as_on_the_cpu") {
        return;
    }
    let mode = Mode::Fused { guard: true };
    let kind = OptimizerKind::Adam;
    let mut case = Case::after_two_steps(kind, &shape(DType::F32), mode);
    let mut stale = Case::new(kind, &shape(DType::F32)[..3], std::ptr::null_mut());
    stale.sharded = true;
    stale.set_grads(1, None);
    assert!(stale.step_with(Mode::Capped, 0.01, None, true).1.is_err());
    let stream = non_blocking_stream();
    for (i, (what, gpu)) in [
        ("fresh", cuda::create(kind, 0).unwrap()),
        ("stale layout", stale.gpu),
    ]
    .into_iter()
    .enumerate()
    {
        // The device parameters already equal the CPU's, bit for bit.
        case.gpu = gpu;
        case.load_cpu_state(what);
        case.set_grads(10 + i as u64, None);
        case.stream = stream as *mut c_void;
        let (c, g) = case.step(mode, 0.01, None);
        case.assert_step_matches(mode, &c, &g, what);
        case.stream = std::ptr::null_mut();
    }
    drop(case);
    destroy_streams(&[stream]);
}

/// Holds a stream in a host function until opened. After 30 s it lets go
/// by itself and says so, which the tests report as a failure (lra waited
/// for the held stream) instead of hanging.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    ran: AtomicBool,
    timed_out: AtomicBool,
}

unsafe extern "C" fn hold_stream(arg: *mut c_void) {
    // SAFETY: a leaked `Gate` (see `Gate::hold`).
    let gate = unsafe { &*(arg as *const Gate) };
    let start = Instant::now();
    while !gate.open.load(SeqCst) {
        if start.elapsed() > Duration::from_secs(30) {
            gate.timed_out.store(true, SeqCst);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    gate.ran.store(true, SeqCst);
}

impl Gate {
    fn hold(stream: sys::CUstream) -> &'static Gate {
        let gate: &'static Gate = Box::leak(Box::default());
        // SAFETY: the gate lives for the process.
        unsafe {
            ok(sys::cuLaunchHostFunc(
                stream,
                Some(hold_stream),
                gate as *const Gate as *mut c_void,
            ))
        };
        gate
    }

    /// Checks that the calls since the gate was held did not wait for it on
    /// the host and that `behind`'s work waits for it on the device
    /// (`what` names that work), then opens it and waits for `behind`.
    fn assert_waited_on_the_device(&'static self, behind: sys::CUstream, what: &str) {
        assert!(
            !self.timed_out.load(SeqCst) && !self.ran.load(SeqCst),
            "{what}: a call waited for the held stream"
        );
        // SAFETY: a live stream.
        let state = unsafe { sys::cuStreamQuery(behind) };
        assert_eq!(
            state,
            sys::CUresult::CUDA_ERROR_NOT_READY,
            "{what}: did not wait on the device"
        );
        let opener = self.open_soon();
        // SAFETY: a live stream.
        unsafe { ok(sys::cuStreamSynchronize(behind)) };
        opener.join().unwrap();
        assert!(self.ran.load(SeqCst) && !self.timed_out.load(SeqCst));
    }

    /// Opens the gate from another thread after a moment, so that the
    /// calling thread is already waiting (if it waits) when it opens.
    fn open_soon(&'static self) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            self.open.store(true, SeqCst);
        })
    }
}

/// Step N on stream A while A is held, step N+1 (new gradient buffers, so a
/// new tensor table) on stream B: neither call waits for the device, B's
/// work waits for A's on the device, and the outcome read on the host after
/// A is released is step N+1's, equal to two CPU steps.
#[test]
fn steps_on_two_streams_are_ordered_on_the_device() {
    if !gpu("steps_on_two_streams_are_ordered_on_the_device") {
        return;
    }
    let (a, b) = (non_blocking_stream(), non_blocking_stream());
    let shape = [
        (4097, DType::F32, false),
        (300, DType::Bf16, true),
        (77, DType::F16, false),
    ];
    let mode = Mode::Fused { guard: true };
    let mut case = Case::new(OptimizerKind::Adam, &shape, a as *mut c_void);
    case.set_grads(1, None);
    case.step(mode, 0.01, None);
    // Step N's gradients, then step N+1's in new device buffers, all
    // written before A is held (writes synchronise the context).
    case.set_grads(2, None);
    let (tc1, tg1) = case.descs();
    case.cpu_step(mode, 0.01, &tc1);
    let mut old_grads = Vec::new();
    for (i, p) in case.pairs.iter_mut().enumerate() {
        p.hgrad = encode(&values(p.n, 300 + i as u64), p.dt);
        let mut padded = vec![0u8; p.off as usize];
        padded.extend_from_slice(&p.hgrad);
        old_grads.push(std::mem::replace(&mut p.dgrad, DevBuf::new(&padded)));
    }
    let (tc2, tg2) = case.descs();
    case.cpu_step(mode, 0.01, &tc2);
    case.gpu.validate(&tg2).unwrap();

    let gate = Gate::hold(a);
    let req = case.request(mode, 0.01, &tg1, std::ptr::null(), a as *mut c_void, None);
    unsafe { case.gpu.step(req) }.unwrap();
    let req = case.request(mode, 0.01, &tg2, std::ptr::null(), b as *mut c_void, None);
    unsafe { case.gpu.step(req) }.unwrap();
    gate.assert_waited_on_the_device(b, "step N+1 on stream B, behind step N on held stream A");
    let c = case.cpu.outcome().unwrap();
    let g = case.gpu.outcome().unwrap();
    case.assert_step_matches(mode, &c, &g, "two streams");
    drop(case);
    drop(old_grads);
    destroy_streams(&[a, b]);
}

/// `prepare` (what a rank-local-loss step does before its loss sum) queues
/// the first layout's state memset and table uploads on stream A; when the
/// sum fails, the retry may come on stream B. B's kernels must wait on the
/// device for A's uploads (they read uninitialised tables otherwise), and
/// neither call waits on the host.
#[test]
fn a_step_on_another_stream_waits_for_what_prepare_queued() {
    if !gpu("a_step_on_another_stream_waits_for_what_prepare_queued") {
        return;
    }
    let (a, b) = (non_blocking_stream(), non_blocking_stream());
    let mode = Mode::Fused { guard: true };
    let mut case = Case::new(OptimizerKind::Adam, &shape(DType::F32), a as *mut c_void);
    case.set_grads(1, None);
    let (tc, tg) = case.descs();
    case.cpu_step(mode, 0.01, &tc);

    let gate = Gate::hold(a);
    case.gpu.prepare(&tg, a as *mut c_void).unwrap();
    let req = case.request(mode, 0.01, &tg, std::ptr::null(), b as *mut c_void, None);
    unsafe { case.gpu.step(req) }.unwrap();
    gate.assert_waited_on_the_device(
        b,
        "the step on stream B, behind the uploads prepare queued on held stream A",
    );
    let c = case.cpu.outcome().unwrap();
    let g = case.gpu.outcome().unwrap();
    case.assert_step_matches(mode, &c, &g, "prepare on A, step on B");
    drop(case);
    destroy_streams(&[a, b]);
}

/// Destroying a handle whose last step is still queued behind a held
/// stream waits for that step before freeing its buffers.
#[test]
fn destroy_waits_for_a_step_still_queued() {
    if !gpu("destroy_waits_for_a_step_still_queued") {
        return;
    }
    let a = non_blocking_stream();
    let mode = Mode::Capped;
    let mut case = Case::new(OptimizerKind::Adam, &shape(DType::F32), a as *mut c_void);
    // A first step outside the hold: it allocates, and may wait.
    case.set_grads(1, None);
    case.step(mode, 0.01, None);
    case.set_grads(2, None);
    let (_, tg) = case.descs();
    let gate = Gate::hold(a);
    let req = case.request(mode, 0.01, &tg, std::ptr::null(), a as *mut c_void, None);
    unsafe { case.gpu.step(req) }.unwrap();
    let opener = gate.open_soon();
    drop(case.gpu);
    assert!(
        gate.ran.load(SeqCst),
        "the handle was destroyed before its queued step ran"
    );
    assert!(!gate.timed_out.load(SeqCst));
    opener.join().unwrap();
    // SAFETY: no step touched freed memory, or this reports it.
    unsafe { ok(sys::cuCtxSynchronize()) };
    destroy_streams(&[a]);
}

// ---------------------------------------------------------------------------
// The C ABI with `device = 1`, end to end, as a C caller uses it: the same
// scripted training runs on a device = 1 and a device = 0 handle, compared
// call by call against what README.md promises between backends ("CUDA
// backend" → Dtypes; "The contract": η decisions are f64 arithmetic on the
// losses and φ); checkpoints of a CUDA handle; argument checks.

/// A `lra_config` as `lra_config_init` fills it, on `device`.
fn abi_config(optimizer: lra_optimizer, device: lra_device, lr: f64) -> lra_config {
    let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
    // SAFETY: lra_config_init fills the whole struct.
    let mut cfg = unsafe {
        lra_config_init(cfg.as_mut_ptr(), optimizer);
        cfg.assume_init()
    };
    cfg.device = device;
    cfg.lr = lr;
    cfg.num_threads = 1;
    cfg
}

/// Memory a C caller hands to lra: host memory for a device = 0 handle,
/// device memory for a device = 1 handle.
enum Mem {
    Host(Vec<u8>),
    Dev(DevBuf),
}

impl Mem {
    fn new(cuda: bool, bytes: &[u8]) -> Mem {
        if cuda {
            Mem::Dev(DevBuf::new(bytes))
        } else {
            Mem::Host(bytes.to_vec())
        }
    }
    fn ptr(&mut self) -> *mut c_void {
        match self {
            Mem::Host(v) => v.as_mut_ptr().cast(),
            Mem::Dev(d) => d.0 as *mut c_void,
        }
    }
    fn read(&self, len: usize) -> Vec<u8> {
        match self {
            Mem::Host(v) => v[..len].to_vec(),
            Mem::Dev(d) => d.read(0, len),
        }
    }
    fn write(&mut self, bytes: &[u8]) {
        match self {
            Mem::Host(v) => v[..bytes.len()].copy_from_slice(bytes),
            Mem::Dev(d) => d.write(0, bytes),
        }
    }
}

/// Several tensors of every dtype, odd sizes among them.
const ABI_SHAPE: [(usize, DType); 5] = [
    (256, DType::F32),
    (301, DType::F16),
    (129, DType::Bf16),
    (1001, DType::F32),
    (3, DType::Bf16),
];

fn abi_dtype(dt: DType) -> lra_dtype {
    match dt {
        DType::F32 => LRA_DTYPE_F32,
        DType::F16 => LRA_DTYPE_F16,
        DType::Bf16 => LRA_DTYPE_BF16,
    }
}

fn decode(b: &[u8], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        DType::Bf16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
    }
}

/// Values in [-2, 2] (zeros and a subnormal among them).
fn bounded(n: usize, seed: u64) -> Vec<f32> {
    values(n, seed).iter().map(|x| x.clamp(-2.0, 2.0)).collect()
}

/// The batch loss of step t: ½ Σ a_j (θ_j − c_j − δ_tj)², a least-squares
/// problem whose minimum (0) moves a little from batch to batch. Computed
/// on the host in f64 from the parameters read back.
fn batch_loss_and_grad(params: &[Vec<f32>], t: usize) -> (f64, Vec<Vec<f32>>) {
    let mut loss = 0.0;
    let grads = params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.len();
            let target = bounded(n, 100 + i as u64);
            let weight = values(n, 200 + i as u64);
            let shift = values(n, 1000 + 17 * t as u64 + i as u64);
            (0..n)
                .map(|j| {
                    let a = 0.5 + 0.75 * (weight[j].clamp(-2.0, 2.0) as f64 + 2.0) / 2.0;
                    let r = p[j] as f64 - target[j] as f64 - 0.1 * shift[j].clamp(-2.0, 2.0) as f64;
                    loss += 0.5 * a * r * r;
                    (a * r) as f32
                })
                .collect()
        })
        .collect();
    (loss, grads)
}

/// What a scripted run configures and feeds (one wrapped optimizer each,
/// so the modes also spread over the optimizers).
struct AbiMode {
    name: &'static str,
    optimizer: lra_optimizer,
    lr: f64,
    f_star: f64,
    scale_max: f64,
    obs_var: f64,
    check_finite: u32,
    /// README: element-wise results equal bit for bit for the same step
    /// size, which holds when s does not come from φ (s = 1, or capped).
    params_exact: bool,
}

const MODE_FUSED: AbiMode = AbiMode {
    name: "default fused (f* unknown, guard on)",
    optimizer: LRA_OPTIMIZER_ADAM,
    lr: 0.2,
    f_star: f64::NAN,
    scale_max: f64::INFINITY,
    obs_var: 0.0,
    check_finite: 1,
    params_exact: true,
};

const ABI_MODES: [AbiMode; 6] = [
    MODE_FUSED,
    AbiMode {
        name: "fused, guard off",
        optimizer: LRA_OPTIMIZER_NESTEROV,
        lr: 0.5,
        check_finite: 0,
        ..MODE_FUSED
    },
    AbiMode {
        name: "Polyak (f* = 0 known)",
        optimizer: LRA_OPTIMIZER_MOMENTUM,
        lr: 0.05,
        f_star: 0.0,
        params_exact: false,
        ..MODE_FUSED
    },
    AbiMode {
        name: "R > 0 (obs_var = 20)",
        optimizer: LRA_OPTIMIZER_RMSPROP,
        lr: 0.05,
        obs_var: 20.0,
        params_exact: false,
        ..MODE_FUSED
    },
    AbiMode {
        name: "cap (scale_max = 0.5, f* far below)",
        optimizer: LRA_OPTIMIZER_ADAMW,
        lr: 3.0,
        f_star: -1e9,
        scale_max: 0.5,
        params_exact: true,
        ..MODE_FUSED
    },
    AbiMode {
        name: "cap alone (scale_max = 0.5, f* unknown)",
        optimizer: LRA_OPTIMIZER_SGD,
        lr: 0.5,
        scale_max: 0.5,
        params_exact: true,
        ..MODE_FUSED
    },
];

/// The script every run follows.
const ABI_STEPS: usize = 24;
/// A NaN in one gradient (guard on: skipped as a non-finite gradient).
const NAN_GRAD_STEP: usize = 7;
/// The device flag (`lra_step_ex`'s found_inf) is 1 here, 0 on the other
/// even steps; odd steps use `lra_step`.
const FOUND_INF_STEP: usize = 12;
/// `lra_set_lr(0.7 η)` before this step.
const SET_LR_STEP: usize = 15;
/// Steps without a re-evaluation.
fn unreported(t: usize) -> bool {
    t % 6 == 5
}

/// One handle with the caller-owned memory it steps on.
struct AbiRun {
    h: Handle,
    cuda: bool,
    /// The caller's stream (CUDA): odd steps use it, even steps NULL.
    stream: *mut c_void,
    params: Vec<Mem>,
    grads: Vec<Mem>,
    flag: Mem,
}

/// What one step of a run reported, through the read-back calls.
#[derive(Debug)]
struct StepRecord {
    step_status: lra_status,
    phi: f64,
    should: u32,
    info: Option<lra_reeval_info>,
    counters: [u64; 8],
    lr: f64,
}

impl AbiRun {
    fn new(mode: &AbiMode, cuda: bool, stream: *mut c_void) -> AbiRun {
        let device = if cuda {
            LRA_DEVICE_CUDA
        } else {
            LRA_DEVICE_HOST
        };
        let mut cfg = abi_config(mode.optimizer, device, mode.lr);
        cfg.f_star = mode.f_star;
        cfg.scale_max = mode.scale_max;
        cfg.check_finite = mode.check_finite;
        // Narrow thresholds: η moves both ways on this easy problem.
        cfg.threshold_up = 1.05;
        cfg.threshold_down = 0.95;
        let params = ABI_SHAPE
            .iter()
            .enumerate()
            .map(|(i, &(n, dt))| Mem::new(cuda, &encode(&bounded(n, 7 + i as u64), dt)))
            .collect();
        let grads = ABI_SHAPE
            .iter()
            .map(|&(n, dt)| Mem::new(cuda, &vec![0; n * dt.size()]))
            .collect();
        AbiRun {
            h: Handle::create(&cfg),
            cuda,
            stream: if cuda { stream } else { std::ptr::null_mut() },
            params,
            grads,
            flag: Mem::new(cuda, &0f32.to_le_bytes()),
        }
    }

    /// A fresh handle of the same configuration on `cuda`, restored from
    /// `ckpt`, stepping on a copy of this run's parameters (the caller
    /// restores its parameters with the checkpoint).
    fn resumed(&self, mode: &AbiMode, cuda: bool, stream: *mut c_void, ckpt: &[u8]) -> AbiRun {
        let mut r = AbiRun::new(mode, cuda, stream);
        let st = r.h.load(ckpt);
        assert_eq!(st, LRA_OK, "lra_load_state: {}", r.h.error());
        for (mine, theirs) in r.params.iter_mut().zip(self.param_bytes()) {
            mine.write(&theirs);
        }
        r
    }

    fn param_bytes(&self) -> Vec<Vec<u8>> {
        self.params
            .iter()
            .zip(ABI_SHAPE)
            .map(|(p, (n, dt))| p.read(n * dt.size()))
            .collect()
    }

    fn param_values(&self) -> Vec<Vec<f32>> {
        self.param_bytes()
            .iter()
            .zip(ABI_SHAPE)
            .map(|(b, (_, dt))| decode(b, dt))
            .collect()
    }

    fn tensors(&mut self) -> Vec<lra_tensor> {
        let ptrs: Vec<_> = (self.params.iter_mut())
            .zip(self.grads.iter_mut())
            .map(|(p, g)| (p.ptr(), g.ptr() as *const c_void))
            .collect();
        ptrs.iter()
            .zip(ABI_SHAPE)
            .map(|(&(param, grad), (n, dt))| lra_tensor {
                param,
                grad,
                numel: n as u64,
                dtype: abi_dtype(dt),
                reserved: 0,
            })
            .collect()
    }

    /// Step t with the loss and gradients the reference run computed.
    fn step(&mut self, mode: &AbiMode, t: usize, loss: f64, grads: &[Vec<f32>]) -> lra_status {
        for ((g, mem), (_, dt)) in grads.iter().zip(&mut self.grads).zip(ABI_SHAPE) {
            let mut g = g.clone();
            if t == NAN_GRAD_STEP && mode.check_finite == 1 {
                let at = g.len() / 2;
                g[at] = f32::NAN;
            }
            mem.write(&encode(&g, dt));
        }
        let tensors = self.tensors();
        // Even steps: lra_step_ex with the flag, on the legacy NULL stream;
        // odd steps: lra_step on the caller's stream.
        let even = t.is_multiple_of(2);
        let stream = if even {
            std::ptr::null_mut()
        } else {
            self.stream
        };
        // SAFETY: tensors of live caller memory, as a C caller passes them.
        unsafe {
            if even {
                let inf = if t == FOUND_INF_STEP { 1f32 } else { 0.0 };
                self.flag.write(&inf.to_le_bytes());
                let flag = self.flag.ptr() as *const f32;
                lra_step_ex(
                    self.h.0,
                    tensors.as_ptr(),
                    tensors.len(),
                    loss,
                    mode.obs_var,
                    flag,
                    stream,
                )
            } else {
                lra_step(
                    self.h.0,
                    tensors.as_ptr(),
                    tensors.len(),
                    loss,
                    mode.obs_var,
                    stream,
                )
            }
        }
    }

    /// The report of step t (None: not re-evaluated).
    fn report(&mut self, t: usize, loss_after: f64) -> Option<lra_reeval_info> {
        if unreported(t) {
            return None;
        }
        let mut info = std::mem::MaybeUninit::<lra_reeval_info>::uninit();
        // SAFETY: live handle, out-pointer.
        let st = unsafe { lra_report_reeval(self.h.0, loss_after, info.as_mut_ptr()) };
        assert_eq!(st, LRA_OK, "lra_report_reeval: {}", self.h.error());
        // SAFETY: filled on LRA_OK.
        Some(unsafe { info.assume_init() })
    }

    fn should_reeval(&self) -> u32 {
        let mut v = 0;
        // SAFETY: live handle, out-pointer.
        assert_eq!(unsafe { lra_should_reeval(self.h.0, &mut v) }, LRA_OK);
        v
    }
}

/// Where a test may act on the runs: before step t, or with step t
/// pending (taken, not yet reported).
#[derive(Clone, Copy, Debug, PartialEq)]
enum At {
    Before(usize),
    Pending(usize),
}

/// Runs the script on `runs` in lockstep: every run gets the loss and
/// gradients computed from the parameters of `runs[0]` (so all see the
/// same inputs), and after every step each run's records and parameters
/// are compared with `runs[0]`'s. `at` may add runs or act on them.
fn abi_script(
    mode: &AbiMode,
    runs: &mut Vec<AbiRun>,
    steps: std::ops::Range<usize>,
    exact_phi: bool,
    mut at: impl FnMut(At, &mut Vec<AbiRun>),
) {
    for t in steps {
        at(At::Before(t), runs);
        if t == SET_LR_STEP {
            let lr = 0.7 * runs[0].h.lr();
            for r in runs.iter() {
                // SAFETY: live handle.
                assert_eq!(unsafe { lra_set_lr(r.h.0, lr) }, LRA_OK);
            }
        }
        let (loss, grads) = batch_loss_and_grad(&runs[0].param_values(), t);
        let status: Vec<_> = runs
            .iter_mut()
            .map(|r| r.step(mode, t, loss, &grads))
            .collect();
        at(At::Pending(t), runs);
        let phi: Vec<_> = runs.iter().map(|r| r.h.phi()).collect();
        let should: Vec<_> = runs.iter().map(|r| r.should_reeval()).collect();
        let (loss_after, _) = batch_loss_and_grad(&runs[0].param_values(), t);
        let records: Vec<StepRecord> = runs
            .iter_mut()
            .enumerate()
            .map(|(i, r)| StepRecord {
                // (a run added at the pending point did not take this step)
                step_status: *status.get(i).unwrap_or(&LRA_OK),
                phi: phi[i],
                should: should[i],
                info: r.report(t, loss_after),
                counters: counter_array(&r.h.counters()),
                lr: r.h.lr(),
            })
            .collect();
        let reference = runs[0].param_bytes();
        for (i, (rec, run)) in records.iter().zip(runs.iter()).enumerate().skip(1) {
            let what = format!("{}: step {t}: run {i} (cuda {})", mode.name, run.cuda);
            assert_records(&records[0], rec, exact_phi, &what);
            let exact = mode.params_exact || exact_phi;
            for ((a, b), (_, dt)) in reference.iter().zip(run.param_bytes()).zip(ABI_SHAPE) {
                if exact {
                    assert_same(a, &b, dt, &what);
                } else {
                    assert_values_close(a, &b, dt, &what);
                }
            }
        }
        let r = &records[0];
        assert_eq!(r.step_status, LRA_OK, "{}: step {t}", mode.name);
        // The script's events happen (skips are reported as such).
        let skip = r.info.map(|i| i.skip_reason);
        if t == NAN_GRAD_STEP && mode.check_finite == 1 {
            assert_eq!(skip, Some(LRA_SKIP_NONFINITE_GRAD), "{}", mode.name);
        } else if t == FOUND_INF_STEP {
            assert_eq!(skip, Some(LRA_SKIP_FOUND_INF), "{}", mode.name);
        } else if let Some(info) = r.info {
            assert_ne!(
                info.decision, LRA_DECISION_SKIPPED,
                "{}: step {t}: {info:?}",
                mode.name
            );
        }
    }
}

fn assert_records(a: &StepRecord, b: &StepRecord, exact_phi: bool, what: &str) {
    assert_eq!(a.step_status, b.step_status, "{what}: step status");
    assert_eq!(a.should, b.should, "{what}: lra_should_reeval");
    assert_eq!(a.counters, b.counters, "{what}: counters");
    assert_eq!(
        a.lr.to_bits(),
        b.lr.to_bits(),
        "{what}: η {} vs {}",
        a.lr,
        b.lr
    );
    let close = |x: f64, y: f64, tol: f64, name: &str| {
        if exact_phi {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "{what}: {name} {x:e} vs {y:e} (bits)"
            );
        } else if x.is_finite() {
            assert!(
                (x - y).abs() <= tol * x.abs(),
                "{what}: {name} {x:e} vs {y:e}"
            );
        } else {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "{what}: {name} {x:e} vs {y:e}"
            );
        }
    };
    close(a.phi, b.phi, 1e-6, "lra_get_last_phi");
    match (a.info, b.info) {
        (None, None) => {}
        (Some(x), Some(y)) => {
            assert_eq!(x.decision, y.decision, "{what}: decision ({x:?} vs {y:?})");
            assert_eq!(x.skip_reason, y.skip_reason, "{what}: skip reason");
            assert_eq!(
                x.lr_before.to_bits(),
                y.lr_before.to_bits(),
                "{what}: lr_before"
            );
            assert_eq!(x.lr.to_bits(), y.lr.to_bits(), "{what}: η after");
            close(x.phi, y.phi, 1e-6, "info.phi");
            // s = φ/(φ+R) or 2(f − f*)/φ: within φ's tolerance (twice,
            // for the quotient); ρ = (f − f+)/(φ/2) likewise.
            close(x.scale, y.scale, 2e-6, "info.scale");
            close(x.rho, y.rho, 2e-6, "info.rho");
        }
        _ => panic!("{what}: one run reported, the other not"),
    }
}

/// With s from φ, parameters agree to φ's tolerance carried through one
/// rounding to the dtype: a relative 1e-5 for f32, and for f16 / bf16 a
/// difference of at most one unit in the last place where the f32 results
/// straddle a rounding boundary.
fn assert_values_close(a: &[u8], b: &[u8], dt: DType, what: &str) {
    let rel = match dt {
        DType::F32 => 1e-5,
        DType::F16 => 2f32.powi(-9),
        DType::Bf16 => 2f32.powi(-6),
    };
    for (j, (x, y)) in decode(a, dt).iter().zip(decode(b, dt)).enumerate() {
        assert!(
            x == &y
                || (x.is_nan() && y.is_nan())
                || (x - y).abs() <= rel * x.abs().max(y.abs()).max(1.0),
            "{what}: {} element {j}: {x} vs {y}",
            dt.name()
        );
    }
}

/// A blocking stream (ordered after the legacy stream the test's copies
/// run on), destroyed after the handles that step on it.
struct AbiStream(sys::CUstream);

impl AbiStream {
    fn new() -> AbiStream {
        let mut s = std::ptr::null_mut();
        // SAFETY: out-parameter; 0 = a blocking stream.
        unsafe { ok(sys::cuStreamCreate(&mut s, 0)) };
        AbiStream(s)
    }
    fn ptr(&self) -> *mut c_void {
        self.0 as *mut c_void
    }
}

impl Drop for AbiStream {
    fn drop(&mut self) {
        // SAFETY: created above; its handles are gone (lra_destroy waited).
        unsafe {
            sys::cuStreamSynchronize(self.0);
            sys::cuStreamDestroy_v2(self.0);
        }
    }
}

/// Every mode on a device = 1 and a device = 0 handle with the same
/// inputs: η decisions, counters and statuses identical, φ within 1e-6,
/// parameters bit-identical where s does not come from φ.
#[test]
fn abi_cuda_handle_matches_a_host_handle() {
    if !gpu("abi_cuda_handle_matches_a_host_handle") {
        return;
    }
    let stream = AbiStream::new();
    for mode in &ABI_MODES {
        let mut runs = vec![
            AbiRun::new(mode, false, std::ptr::null_mut()),
            AbiRun::new(mode, true, stream.ptr()),
        ];
        abi_script(mode, &mut runs, 0..ABI_STEPS, false, |_, _| {});
        let c = counter_array(&runs[0].h.counters());
        println!(
            "{}: counters {c:?}, η {} → {}, loss {:.4e}",
            mode.name,
            mode.lr,
            runs[0].h.lr(),
            batch_loss_and_grad(&runs[0].param_values(), ABI_STEPS).0,
        );
        // Decisions moved η (else η matching proves little).
        assert!(c[4] + c[5] > 0, "{}: η never moved: {c:?}", mode.name);
    }
}

/// Checkpoints of a device = 1 handle, in every mode: saved with a step
/// pending (a skipped one too) and between steps, loaded into a fresh
/// device = 1 handle that then runs on beside the uninterrupted one:
/// every status, φ, report, counter, η and parameter has the same bits
/// (README: "a resumed run continues bit-exactly as if never
/// interrupted"; φ has the same bits on every run).
#[test]
fn abi_cuda_checkpoints_resume_bit_exactly() {
    if !gpu("abi_cuda_checkpoints_resume_bit_exactly") {
        return;
    }
    let stream = AbiStream::new();
    let saves = [
        At::Pending(NAN_GRAD_STEP),
        At::Pending(10),
        At::Pending(FOUND_INF_STEP),
        At::Before(14),
    ];
    for mode in &ABI_MODES {
        let mut runs = vec![AbiRun::new(mode, true, stream.ptr())];
        abi_script(mode, &mut runs, 0..ABI_STEPS, true, |at, runs| {
            if saves.contains(&at) {
                let ckpt = runs[0].h.checkpoint();
                let resumed = runs[0].resumed(mode, true, stream.ptr(), &ckpt);
                // Nothing is lost in a save and a load.
                assert!(
                    resumed.h.checkpoint() == ckpt,
                    "{}: {at:?}: the restored handle saves other bytes",
                    mode.name
                );
                runs.push(resumed);
            }
        });
        assert_eq!(runs.len(), 1 + saves.len());
        let last = runs[0].h.checkpoint();
        for (i, r) in runs.iter().enumerate().skip(1) {
            assert!(
                r.h.checkpoint() == last,
                "{}: resumed run {i}: final checkpoint differs",
                mode.name
            );
        }
    }
}

/// README: a checkpoint records no device, and "everything else is taken
/// from the handle and may change across a restart". A device = 1
/// checkpoint loads into a device = 0 handle and a device = 0 one into a
/// device = 1 handle, with a step pending and between steps; each resumed
/// run then goes on as the uninterrupted runs do, within the promise
/// between backends (parameters bit for bit where s is not from φ, φ
/// within 1e-6, the same decisions).
#[test]
fn abi_checkpoints_move_between_cuda_and_host_handles() {
    if !gpu("abi_checkpoints_move_between_cuda_and_host_handles") {
        return;
    }
    let stream = AbiStream::new();
    for mode in ABI_MODES.iter().filter(|m| m.params_exact) {
        let mut runs = vec![
            AbiRun::new(mode, false, std::ptr::null_mut()),
            AbiRun::new(mode, true, stream.ptr()),
        ];
        abi_script(mode, &mut runs, 0..ABI_STEPS, false, |at, runs| {
            if at != At::Pending(10) && at != At::Before(16) {
                return;
            }
            let from_host = runs[0].h.checkpoint();
            let from_cuda = runs[1].h.checkpoint();
            let on_host = runs[1].resumed(mode, false, std::ptr::null_mut(), &from_cuda);
            let on_cuda = runs[0].resumed(mode, true, stream.ptr(), &from_host);
            assert!(
                on_host.h.checkpoint() == from_cuda && on_cuda.h.checkpoint() == from_host,
                "{}: {at:?}: a checkpoint moved to the other device saves other bytes",
                mode.name
            );
            runs.extend([on_host, on_cuda]);
        });
        assert_eq!(runs.len(), 6, "{}", mode.name);
    }
}

/// Checks a call that must be refused as LRA_INVALID_ARGUMENT by the check
/// whose message contains `says`, changing nothing: checkpoint bytes,
/// parameters and counters as before.
fn assert_refused(
    run: &mut AbiRun,
    what: &str,
    says: &str,
    call: impl FnOnce(&mut AbiRun) -> lra_status,
) {
    let before = (
        run.h.checkpoint(),
        run.param_bytes(),
        counter_array(&run.h.counters()),
    );
    let st = call(run);
    let msg = run.h.error();
    assert_eq!(st, LRA_INVALID_ARGUMENT, "{what}: {msg}");
    assert!(
        msg.contains(says),
        "{what}: refused by another check: {msg}"
    );
    println!("{what}: {msg}");
    let after = (
        run.h.checkpoint(),
        run.param_bytes(),
        counter_array(&run.h.counters()),
    );
    assert!(before.0 == after.0, "{what}: the checkpoint changed");
    assert!(before.1 == after.1, "{what}: the parameters changed");
    assert_eq!(before.2, after.2, "{what}: counters");
}

/// `lra_step` / `lra_step_ex` on a device = 1 handle with a host pointer,
/// a misaligned pointer, a range past its allocation, a host found_inf and
/// a stream of another context: LRA_INVALID_ARGUMENT with a message, and
/// nothing changes (also the pending step: its report and the next steps
/// still match the device = 0 twin).
#[test]
fn abi_cuda_bad_arguments_change_nothing() {
    if !gpu("abi_cuda_bad_arguments_change_nothing") {
        return;
    }
    let stream = AbiStream::new();
    let mode = &MODE_FUSED;
    let mut runs = vec![
        AbiRun::new(mode, false, std::ptr::null_mut()),
        AbiRun::new(mode, true, stream.ptr()),
    ];
    let mut refusals = 0;
    abi_script(mode, &mut runs, 0..6, false, |at, runs| {
        if at != At::Pending(3) && at != At::Before(4) {
            return;
        }
        refusals += 1;
        let run = &mut runs[1];
        let step = |run: &mut AbiRun, tensors: &[lra_tensor], flag: *const f32, s: *mut c_void| {
            // SAFETY: the test's pointers; lra must refuse them unread.
            unsafe { lra_step_ex(run.h.0, tensors.as_ptr(), tensors.len(), 1.0, 0.0, flag, s) }
        };
        let (n3, _) = ABI_SHAPE[3];
        let mut host = vec![0f32; n3];
        let mut tensors = run.tensors();
        tensors[3].param = host.as_mut_ptr().cast();
        assert_refused(run, "host parameter", "not CUDA memory", |r| {
            step(r, &tensors, std::ptr::null(), std::ptr::null_mut())
        });
        let mut tensors = run.tensors();
        tensors[3].grad = (tensors[3].grad as u64 + 2) as *const c_void;
        assert_refused(run, "misaligned gradient", "not aligned", |r| {
            step(r, &tensors, std::ptr::null(), std::ptr::null_mut())
        });
        // An allocation of the tensor's bytes (DevBuf adds 16), used from
        // its middle: the range ends about 2000 bytes past it (far beyond
        // any rounding of the allocation's size).
        let short = DevBuf::new(&vec![0u8; 4 * n3]);
        let mut tensors = run.tensors();
        tensors[3].param = (short.0 + 2000) as *mut c_void;
        assert_refused(
            run,
            "parameter past its allocation",
            "past the end of its allocation",
            |r| step(r, &tensors, std::ptr::null(), std::ptr::null_mut()),
        );
        let tensors = run.tensors();
        let host_flag = 0f32;
        assert_refused(run, "host found_inf", "not CUDA memory", |r| {
            step(r, &tensors, &host_flag, std::ptr::null_mut())
        });
        // Each block reads the flag on its own while others write the
        // parameters: inside one, it could skip part of the step.
        let inside = (tensors[3].param as u64 + 4) as *const f32;
        assert_refused(
            run,
            "found_inf inside a parameter",
            "shares memory with tensors[3].param",
            |r| step(r, &tensors, inside, std::ptr::null_mut()),
        );
        let foreign = ForeignStream::new();
        assert_refused(
            run,
            "a stream of another context",
            "another device or context",
            |r| step(r, &tensors, std::ptr::null(), foreign.stream),
        );
    });
    assert_eq!(refusals, 2);
}

/// A host (`device = 0`) handle handed device memory (a CUDA tensor passed
/// to the wrong handle) would read and write it on the host and crash the
/// process. With the driver loaded, lra asks it about a host handle's new
/// pointers: device parameters, gradients and found_inf flags are
/// LRA_INVALID_ARGUMENT and change nothing, on the first step and after
/// the layout is fixed. Pinned host and (on a GPU) managed memory are host
/// memory: accepted.
#[test]
fn a_host_handle_refuses_device_memory() {
    if !gpu("a_host_handle_refuses_device_memory") {
        return;
    }
    let mut run = AbiRun::new(&MODE_FUSED, false, std::ptr::null_mut());
    let step = |run: &mut AbiRun, tensors: &[lra_tensor], flag: *const f32| {
        // SAFETY: host memory of the run, or device memory lra must refuse
        // unread.
        unsafe {
            lra_step_ex(
                run.h.0,
                tensors.as_ptr(),
                tensors.len(),
                1.0,
                0.0,
                flag,
                std::ptr::null_mut(),
            )
        }
    };
    let (n3, _) = ABI_SHAPE[3];
    let device = DevBuf::new(&vec![0u8; 4 * n3]);
    let device_flag = DevBuf::new(&0f32.to_le_bytes());
    for first in [true, false] {
        if !first {
            let tensors = run.tensors();
            assert_eq!(
                step(&mut run, &tensors, std::ptr::null()),
                LRA_OK,
                "{}",
                run.h.error()
            );
        }
        let says = "is CUDA device memory";
        let mut tensors = run.tensors();
        tensors[3].param = device.0 as *mut c_void;
        assert_refused(&mut run, "device parameter", says, |r| {
            step(r, &tensors, std::ptr::null())
        });
        let mut tensors = run.tensors();
        tensors[3].grad = device.0 as *const c_void;
        assert_refused(&mut run, "device gradient", says, |r| {
            step(r, &tensors, std::ptr::null())
        });
        let tensors = run.tensors();
        assert_refused(&mut run, "device found_inf", says, |r| {
            step(r, &tensors, device_flag.0 as *const f32)
        });
    }
    let mut pinned = std::ptr::null_mut();
    // SAFETY: out-parameter; four bytes, written before the step reads them.
    unsafe {
        ok(sys::cuMemAllocHost_v2(&mut pinned, 4));
        (pinned as *mut f32).write(0.0);
    }
    let tensors = run.tensors();
    let st = step(&mut run, &tensors, pinned as *const f32);
    // SAFETY: allocated above, no longer used.
    unsafe { ok(sys::cuMemFreeHost(pinned)) };
    assert_eq!(st, LRA_OK, "pinned host found_inf: {}", run.h.error());
    // Managed memory is host memory too. The fake driver has none: the
    // test runs, this part does not (a PARTIAL line, which the fake-cuda
    // stage expects by name).
    if std::env::var_os("LRA_FAKE_CUDA").is_some() {
        support::partial(
            "a_host_handle_refuses_device_memory",
            "managed memory not checked (the fake driver has none)",
        );
        return;
    }
    let mut managed = 0;
    // SAFETY: out-parameter; four bytes, written (no kernel runs) before
    // the step reads them.
    unsafe {
        ok(sys::cuMemAllocManaged(&mut managed, 4, 1)); // CU_MEM_ATTACH_GLOBAL
        ok(sys::cuCtxSynchronize());
        (managed as *mut f32).write(0.0);
    }
    let tensors = run.tensors();
    let st = step(&mut run, &tensors, managed as *const f32);
    // SAFETY: allocated above, no longer used.
    unsafe { ok(sys::cuMemFree_v2(managed)) };
    assert_eq!(st, LRA_OK, "managed found_inf: {}", run.h.error());
}

/// One side of [`abi_random_calls_match_a_host_handle`]: a handle and the
/// caller's memory for it (host memory for device = 0, device memory for
/// device = 1).
struct Twin {
    h: Handle,
    cuda: bool,
    params: Vec<Mem>,
    grads: Vec<Mem>,
    flag: Mem,
}

impl Twin {
    fn new(cfg: &lra_config, layout: &[(usize, DType)], seed: u64) -> Twin {
        let cuda = cfg.device == LRA_DEVICE_CUDA;
        let mem = |bytes: &[u8]| Mem::new(cuda, bytes);
        Twin {
            h: Handle::create(cfg),
            cuda,
            params: (layout.iter().enumerate())
                .map(|(i, &(n, dt))| mem(&encode(&bounded(n, seed + i as u64), dt)))
                .collect(),
            grads: (layout.iter())
                .map(|&(n, dt)| mem(&vec![0; n * dt.size()]))
                .collect(),
            flag: mem(&0f32.to_le_bytes()),
        }
    }

    fn tensors(&mut self, layout: &[(usize, DType)]) -> Vec<lra_tensor> {
        (self.params.iter_mut().zip(&mut self.grads).zip(layout))
            .map(|((p, g), &(n, dt))| {
                // Empty tensors: NULL, as a C caller would pass (an empty
                // Vec's dangling pointer is not aligned for the dtype).
                let (param, grad) = if n == 0 {
                    (std::ptr::null_mut(), std::ptr::null_mut())
                } else {
                    (p.ptr(), g.ptr())
                };
                lra_tensor {
                    param,
                    grad,
                    numel: n as u64,
                    dtype: abi_dtype(dt),
                    reserved: 0,
                }
            })
            .collect()
    }

    fn param_bytes(&self, layout: &[(usize, DType)]) -> Vec<Vec<u8>> {
        (self.params.iter().zip(layout))
            .map(|(p, &(n, dt))| p.read(n * dt.size()))
            .collect()
    }

    /// What the read-back calls say now, with `status` and `info` of the
    /// call just made, and that call's message.
    fn record(&self, status: lra_status, info: Option<lra_reeval_info>) -> (StepRecord, String) {
        let message = self.h.error();
        let mut should = 0;
        // SAFETY: live handle, out-pointer.
        let st = unsafe { lra_should_reeval(self.h.0, &mut should) };
        let record = StepRecord {
            step_status: status,
            phi: self.h.phi(),
            // (no pending step: LRA_CALL_ORDER, told apart from 0 and 1)
            should: if st == LRA_OK { should } else { 100 + st },
            info,
            counters: counter_array(&self.h.counters()),
            lr: self.h.lr(),
        };
        (record, message)
    }
}

/// Seeded random C ABI call sequences on a device = 1 handle and a
/// device = 0 twin of the same configuration, given the same inputs:
/// random configurations (every optimizer, f* known or not with a cap on
/// s, R > 0, guard on or off, every re-evaluation schedule), layouts of
/// 0–5 tensors of every dtype, and 10–40 calls drawn from `lra_step` / `lra_step_ex`
/// (random gradients, non-finite ones, found_inf clear or set, the legacy,
/// per-thread and a caller's stream), `lra_report_reeval` (also with no
/// step pending), `lra_set_lr` (also out of bounds) and checkpoints moved
/// from one handle into the other (also while a step is pending). After
/// every call: the same status, counters, η bits, schedule answer and
/// decisions, φ, ρ and s within 1e-6, parameters bit for bit (within s's
/// tolerance when s comes from φ; the host copy is then resynchronised).
/// Longer runs: `LRA_ABI_FUZZ_SEED=<seed> LRA_ABI_FUZZ_CASES=<n>`.
#[test]
fn abi_random_calls_match_a_host_handle() {
    let test = "abi_random_calls_match_a_host_handle";
    if !gpu(test) {
        return;
    }
    let seeds = FuzzSeeds::from_env("LRA_ABI_FUZZ", 0xab1_0001, 12);
    let stream = AbiStream::new();
    let streams = [std::ptr::null_mut(), 2 as *mut c_void, stream.ptr()];
    let sizes = [0, 1, 3, 5, 33, 257, 4096, 4099];
    let dtypes = [DType::F32, DType::F16, DType::Bf16];
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for seed in seeds.seeds() {
        let mut d = Rng(seed);
        let optimizer = d.index(7) as lra_optimizer;
        let mut cfg = abi_config(optimizer, LRA_DEVICE_HOST, d.pick(&[1e-3, 1e-2, 0.1]));
        if d.index(3) == 0 {
            cfg.f_star = 0.0;
            cfg.scale_max = d.pick(&[0.5, 1.0, 2.0]);
        }
        let obs_var = d.pick(&[0.0, 0.0, 0.1]);
        cfg.check_finite = d.pick(&[0, 1, 1]);
        cfg.reeval_schedule = d.index(3) as lra_reeval_schedule;
        cfg.reeval_every = 2;
        cfg.reeval_growth = 1.5;
        let layout: Vec<(usize, DType)> = (0..d.index(6))
            .map(|_| (d.pick(&sizes), d.pick(&dtypes)))
            .collect();
        let mut twins = [LRA_DEVICE_HOST, LRA_DEVICE_CUDA]
            .map(|device| Twin::new(&lra_config { device, ..cfg }, &layout, seed.wrapping_mul(7)));
        // s from φ: parameters agree within its tolerance, not bit for bit
        let scale_from_phi = !cfg.f_star.is_nan() || obs_var > 0.0;
        let mut trace = Vec::new();
        for call in 0..10 + d.index(31) {
            let what = |trace: &[String]| {
                format!(
                    "{test}: seed {seed} (optimizer {optimizer}, f* {}, s ≤ {}, R {obs_var}, \
                     guard {}, schedule {}, layout {layout:?}), calls:\n  {}\n\
                     (rerun alone: LRA_ABI_FUZZ_SEED={seed} LRA_ABI_FUZZ_CASES=1)",
                    cfg.f_star,
                    cfg.scale_max,
                    cfg.check_finite,
                    cfg.reeval_schedule,
                    trace.join("\n  ")
                )
            };
            let op = d.index(10);
            let (records, stepped) = match op {
                0..=4 => {
                    let poison = cfg.check_finite == 1 && d.index(6) == 0;
                    let flag = d.pick(&[None, None, Some(0f32), Some(1.0)]);
                    let stream = d.pick(&streams);
                    let loss = d.pick(&[0.5, 1.0, 2.0]);
                    trace.push(format!(
                        "{call}: step (loss {loss}, stream {stream:?}, found_inf {flag:?}{})",
                        if poison { ", a NaN gradient" } else { "" }
                    ));
                    let grad_seed = seed.wrapping_mul(64).wrapping_add(call as u64);
                    let records = twins.each_mut().map(|t| {
                        for (i, (g, &(n, dt))) in t.grads.iter_mut().zip(&layout).enumerate() {
                            let mut v = bounded(n, grad_seed + i as u64);
                            if poison && n > 0 {
                                v[n / 2] = f32::NAN;
                            }
                            g.write(&encode(&v, dt));
                        }
                        let tensors = t.tensors(&layout);
                        let flag_ptr = match flag {
                            Some(f) => {
                                t.flag.write(&f.to_le_bytes());
                                t.flag.ptr() as *const f32
                            }
                            None => std::ptr::null(),
                        };
                        // SAFETY: the twin's live memory, as a C caller passes it.
                        let st = unsafe {
                            lra_step_ex(
                                t.h.0,
                                tensors.as_ptr(),
                                tensors.len(),
                                loss,
                                obs_var,
                                flag_ptr,
                                if t.cuda { stream } else { std::ptr::null_mut() },
                            )
                        };
                        t.record(st, None)
                    });
                    (records, true)
                }
                5..=7 => {
                    let loss_after = d.pick(&[0.2, 0.6, 0.9, 0.99, 1.5]);
                    trace.push(format!("{call}: report (loss after {loss_after})"));
                    let records = twins.each_mut().map(|t| {
                        let mut info = std::mem::MaybeUninit::<lra_reeval_info>::uninit();
                        // SAFETY: live handle, out-pointer.
                        let st = unsafe { lra_report_reeval(t.h.0, loss_after, info.as_mut_ptr()) };
                        // SAFETY: filled on LRA_OK.
                        let info = (st == LRA_OK).then(|| unsafe { info.assume_init() });
                        t.record(st, info)
                    });
                    (records, false)
                }
                8 => {
                    let lr = d.pick(&[1e-40, 1e-4, 3e-2, 0.5]);
                    trace.push(format!("{call}: set η {lr}"));
                    // SAFETY: live handles.
                    let records = twins.each_mut().map(|t| {
                        let st = unsafe { lra_set_lr(t.h.0, lr) };
                        t.record(st, None)
                    });
                    (records, false)
                }
                _ => {
                    // A restart from the other handle's checkpoint: the
                    // caller restores its parameters with it.
                    let from = d.index(2);
                    trace.push(format!("{call}: checkpoint of twin {from} into both"));
                    let ckpt = twins[from].h.checkpoint();
                    let params = twins[from].param_bytes(&layout);
                    let records = twins.each_mut().map(|t| {
                        let st = t.h.load(&ckpt);
                        for (p, b) in t.params.iter_mut().zip(&params) {
                            p.write(b);
                        }
                        t.record(st, None)
                    });
                    (records, false)
                }
            };
            let [(host, host_says), (cuda, cuda_says)] = &records;
            let what = format!(
                "{}\n  messages: host {host_says:?}, CUDA {cuda_says:?}",
                what(&trace)
            );
            assert_records(host, cuda, false, &what);
            let [a, b] = twins.each_ref().map(|t| t.param_bytes(&layout));
            for ((x, y), &(_, dt)) in a.iter().zip(&b).zip(&layout) {
                if scale_from_phi {
                    assert_values_close(x, y, dt, &what);
                } else {
                    assert_same(x, y, dt, &what);
                }
            }
            if scale_from_phi && stepped {
                // the next step starts from the same bits on both
                for (p, bytes) in twins[0].params.iter_mut().zip(&b) {
                    p.write(bytes);
                }
            }
            let name = match (op, host.step_status) {
                (0..=4, LRA_OK) => "step",
                (5..=7, LRA_OK) => "report",
                (8, LRA_OK) => "set η",
                (_, LRA_OK) => "checkpoint moved",
                _ => "refused",
            };
            *seen.entry(name.into()).or_default() += 1;
            if let Some(i) = host.info {
                *seen.entry(format!("decision {}", i.decision)).or_default() += 1;
            }
        }
    }
    seeds.assert_covered(
        test,
        &seen,
        &[
            "step",
            "report",
            "set η",
            "checkpoint moved",
            "refused",
            "decision 1",
            "decision 2",
            "decision 3",
        ],
    );
}

/// A layout whose optimizer state the device cannot hold: `lra_step` is
/// LRA_OUT_OF_MEMORY (not LRA_CUDA_ERROR: the one failure a caller can act
/// on), with the driver's error named, and changes nothing; the handle's
/// next first step may bring another layout.
#[test]
fn abi_cuda_state_out_of_memory_changes_nothing() {
    if !gpu("abi_cuda_state_out_of_memory_changes_nothing") {
        return;
    }
    let mut total = 0usize;
    // SAFETY: out-parameter; device 0 is the one `gpu` made current.
    unsafe { ok(sys::cuDeviceTotalMem_v2(&mut total, 0)) };
    // f16 parameters and gradients of 3/10 of the device each: Adam's state
    // (two f32 per element, 12/10 of the device) cannot fit in what is
    // left. Only their first bytes are written (the fake driver maps the
    // rest on demand).
    let numel = total * 3 / 10 / 2;
    let (param, grad) = (DevBuf::uninit(2 * numel), DevBuf::uninit(2 * numel));
    let head: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    param.write(0, &head);
    grad.write(0, &head);
    let mut run = AbiRun::new(&MODE_FUSED, true, std::ptr::null_mut());
    let h = &run.h;
    let huge = [lra_tensor {
        param: param.0 as *mut c_void,
        grad: grad.0 as *const c_void,
        numel: numel as u64,
        dtype: LRA_DTYPE_F16,
        reserved: 0,
    }];
    let before = (h.checkpoint(), counter_array(&h.counters()));
    // SAFETY: device memory of `numel` f16 each.
    let st = unsafe { lra_step(h.0, huge.as_ptr(), 1, 1.0, 0.0, std::ptr::null_mut()) };
    let msg = h.error();
    assert_eq!(st, LRA_OUT_OF_MEMORY, "{msg}");
    assert!(msg.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{msg}");
    println!("{numel} f16 parameters on a device of {total} bytes: {msg}");
    assert!(before.0 == h.checkpoint(), "the checkpoint changed");
    assert_eq!(before.1, counter_array(&h.counters()), "counters");
    assert!(param.read(0, head.len()) == head, "the parameters changed");

    // A rank-local loss: each step first sums the loss across ranks, so
    // memory this rank cannot have must fail before that sum (the other
    // ranks would meet the retry the status invites in their next sum).
    unsafe extern "C" fn count_sums(_: *mut f64, _: usize, user: *mut c_void) -> i32 {
        // SAFETY: `user` is the counter below, alive through the step.
        unsafe { *(user as *mut usize) += 1 };
        0
    }
    let mut cfg = abi_config(LRA_OPTIMIZER_ADAM, LRA_DEVICE_CUDA, 1e-3);
    cfg.loss_is_rank_local = 1;
    let local = Handle::create(&cfg);
    let mut sums = 0usize;
    // SAFETY: the counter outlives the handle's steps below.
    let st = unsafe {
        lra_set_reduction(
            local.0,
            Some(count_sums),
            &mut sums as *mut usize as *mut c_void,
        )
    };
    assert_eq!(st, LRA_OK, "{}", local.error());
    // SAFETY: device memory of `numel` f16 each.
    let st = unsafe { lra_step(local.0, huge.as_ptr(), 1, 1.0, 0.0, std::ptr::null_mut()) };
    assert_eq!(st, LRA_OUT_OF_MEMORY, "rank-local loss: {}", local.error());
    assert_eq!(
        sums, 0,
        "the loss was summed across ranks before the step failed"
    );
    drop(local);
    drop((param, grad));

    let tensors = run.tensors();
    // SAFETY: the run's device tensors.
    let st = unsafe {
        lra_step(
            run.h.0,
            tensors.as_ptr(),
            tensors.len(),
            1.0,
            0.0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, LRA_OK, "{}", run.h.error());
    assert_eq!(run.h.counters().steps, 1);
}

/// A negative `device_ordinal` is "no such device" (`LRA_NO_CUDA`, as an
/// ordinal past the device count), refused before any driver call with
/// it: not a `cuDeviceGet` failure (`LRA_CUDA_ERROR`).
#[test]
fn a_negative_device_ordinal_is_no_cuda() {
    if !gpu("a_negative_device_ordinal_is_no_cuda") {
        return;
    }
    for ordinal in [-1, i32::MIN] {
        let e = cuda::create(OptimizerKind::Adam, ordinal)
            .err()
            .expect("a negative device ordinal was accepted");
        assert_eq!(e.status, Status::NoCuda, "ordinal {ordinal}: {e}");
        assert!(
            e.message.contains(&format!("device_ordinal = {ordinal}")),
            "ordinal {ordinal}: {e}"
        );
    }
}

/// An address range reserved with `cuMemAddressReserve`, `segments`
/// granules long, with granules `i..i + count` mapped (`cuMemCreate` +
/// `cuMemMap`, a physical allocation of their own, as PyTorch grows an
/// expandable segment) for each `(i, count, flags)`, with that access for
/// device 0 (`None`: no `cuMemSetAccess`). Unmapped, released and freed on
/// drop.
struct Vmm {
    base: u64,
    granule: usize,
    segments: usize,
    /// (address, bytes, handle)
    mapped: Vec<(u64, usize, sys::CUmemGenericAllocationHandle)>,
    /// Granules whose `cuMemSetAccess` the driver refused, and why (a
    /// read-only mapping may not be supported everywhere).
    access_refused: Vec<(usize, sys::CUresult)>,
}

impl Vmm {
    /// Pinned memory of device 0, as the test maps it.
    fn prop() -> sys::CUmemAllocationProp {
        // SAFETY: plain data; every field is set or zero is its meaning.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: 0,
        };
        prop
    }

    /// The driver's minimum granularity for that memory.
    fn granularity() -> usize {
        let mut granule = 0usize;
        // SAFETY: out-parameter and a filled-in property.
        ok(unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut granule,
                &Vmm::prop(),
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        });
        granule
    }

    fn new(segments: usize, mapped: &[(usize, usize, Option<sys::CUmemAccess_flags>)]) -> Vmm {
        let prop = Vmm::prop();
        let location = prop.location;
        let granule = Vmm::granularity();
        let mut base = 0;
        // SAFETY: out-parameter; the reservation is freed by drop.
        unsafe {
            ok(sys::cuMemAddressReserve(
                &mut base,
                segments * granule,
                0,
                0,
                0,
            ));
        }
        let mut vmm = Vmm {
            base,
            granule,
            segments,
            mapped: Vec::new(),
            access_refused: Vec::new(),
        };
        for &(i, count, access) in mapped {
            let (at, bytes) = (vmm.at(i, 0), count * granule);
            let mut h = 0;
            // SAFETY: granules of the reservation, mapped once.
            unsafe {
                ok(sys::cuMemCreate(&mut h, bytes, &prop, 0));
                ok(sys::cuMemMap(at, bytes, 0, h, 0));
                vmm.mapped.push((at, bytes, h));
                if let Some(flags) = access {
                    let desc = sys::CUmemAccessDesc { location, flags };
                    let r = sys::cuMemSetAccess(at, bytes, &desc, 1);
                    if r != sys::CUresult::CUDA_SUCCESS {
                        // Read and write is what every allocator grants.
                        assert_ne!(
                            flags,
                            sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
                            "cuMemSetAccess: {r:?}"
                        );
                        vmm.access_refused.push((i, r));
                    }
                }
            }
        }
        vmm
    }

    /// The address `offset` bytes into granule `i`.
    fn at(&self, i: usize, offset: i64) -> u64 {
        ((self.base + (i * self.granule) as u64) as i64 + offset) as u64
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        // SAFETY: what `new` mapped and reserved, no longer used.
        unsafe {
            ok(sys::cuCtxSynchronize());
            for &(at, bytes, h) in &self.mapped {
                ok(sys::cuMemUnmap(at, bytes));
                ok(sys::cuMemRelease(h));
            }
            ok(sys::cuMemAddressFree(
                self.base,
                self.segments * self.granule,
            ));
        }
    }
}

/// Mapped memory whose access the driver will not say (it refuses
/// `CU_POINTER_ATTRIBUTE_ACCESS_FLAGS` there): the driver's error, never
/// an unchecked pass. The fake driver refuses it with
/// `FAKE_CUDA_MAPPED_ACCESS_FLAGS=refused`, set for this test's own
/// process; a real driver answers, so there it has nothing to show.
#[test]
fn mapped_memory_whose_access_the_driver_will_not_say_is_refused() {
    const TEST: &str = "mapped_memory_whose_access_the_driver_will_not_say_is_refused";
    const REFUSE: (&str, &str) = ("FAKE_CUDA_MAPPED_ACCESS_FLAGS", "refused");
    if !runs_alone_on_the_fake_driver(TEST, &[REFUSE], "refuses the access flags") {
        return;
    }
    assert!(gpu(TEST));
    let rw = Some(sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    let m = Vmm::new(2, &[(0, 1, rw), (1, 1, rw)]);
    let grad = DevBuf::uninit(m.granule);
    let n = m.granule / 4;
    let lra_gpu = cuda::create(OptimizerKind::Sgd, 0).unwrap();
    let t = TensorDesc {
        param: m.at(0, 64) as *mut c_void,
        grad: grad.0 as *const c_void,
        numel: n,
        dtype: DType::F32,
    };
    let e = lra_gpu.validate(&[t]).expect_err("access unknown: refused");
    assert_eq!(e.status, Status::Cuda, "{}", e.message);
    assert!(
        e.message.contains("cuPointerGetAttributes"),
        "{}",
        e.message
    );
    // Device memory of lra's context is not asked for its access.
    let plain = DevBuf::uninit(m.granule);
    let t = TensorDesc {
        param: plain.0 as *mut c_void,
        ..t
    };
    lra_gpu.validate(&[t]).unwrap();
}

/// The optimizer state crosses between device and host in pieces of
/// `cuda::STATE_PIECE` values (checkpoints): a tensor of more than one
/// piece is saved and loaded piece by piece, each in its place.
#[test]
fn checkpoints_of_a_tensor_larger_than_a_staging_piece() {
    if !gpu("checkpoints_of_a_tensor_larger_than_a_staging_piece") {
        return;
    }
    let mode = Mode::Fused { guard: false };
    let kind = OptimizerKind::Adam;
    let shape = [
        (100, DType::F16, false),
        (cuda::STATE_PIECE + 3, DType::F32, false),
        (37, DType::F32, false),
    ];
    let mut case = Case::after_two_steps(kind, &shape, mode);
    case.assert_state_same("saved");
    // Loaded into a fresh handle: the same state, and the same next step.
    case.gpu = cuda::create(kind, 0).unwrap();
    case.load_cpu_state("loaded");
    case.set_grads(3, None);
    let (c, g) = case.step(mode, 0.01, None);
    case.assert_step_matches(mode, &c, &g, "after loading");
}

/// A step that fails after part of it was enqueued (the fake driver
/// refuses its second launch, out of memory) leaves the optimizer state possibly
/// half-updated: the step's error is the driver's, and every later call
/// that would use the state refuses, saying to load a checkpoint, until
/// state is loaded; then the steps continue as on the CPU. In a process of
/// its own (the refusal is the next launch of the whole process); a real
/// driver has no such switch: skipped there.
#[test]
fn a_step_that_fails_half_way_is_refused_until_state_is_loaded() {
    const TEST: &str = "a_step_that_fails_half_way_is_refused_until_state_is_loaded";
    if !runs_alone_on_the_fake_driver(TEST, &[], "refuses a launch on request") {
        return;
    }
    assert!(gpu(TEST));
    let mode = Mode::Capped;
    let mut case = Case::new(
        OptimizerKind::Adam,
        &shape(DType::F32),
        std::ptr::null_mut(),
    );
    case.set_grads(1, None);
    case.step(mode, 0.01, None);
    case.set_grads(2, None);
    // Two passes: the first is enqueued, the second refused.
    fake_driver_fails(c"fake_cuda_fail_launch", 2);
    let (c, g) = case.step_with(mode, 0.01, None, false);
    c.unwrap();
    let e = g.expect_err("the refused launch fails the step");
    // The driver's out of memory, but not LRA_OUT_OF_MEMORY (retryable,
    // nothing changed): the first pass ran.
    assert_eq!(e.status, Status::Cuda, "{e}");
    assert!(e.message.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{e}");
    let (_, tg) = case.descs();
    let null = std::ptr::null_mut();
    for (call, r) in [
        ("check_step", case.gpu.check_step(std::ptr::null(), null)),
        ("prepare", case.gpu.prepare(&tg, null)),
        ("outcome", case.gpu.outcome().map(drop)),
        ("state_meta", case.gpu.state_meta().map(drop)),
    ] {
        let e = r.expect_err(call);
        assert_eq!(e.status, Status::Cuda, "{call}: {e}");
        assert!(e.message.contains("half-updated"), "{call}: {e}");
        assert!(e.message.contains("lra_load_state"), "{call}: {e}");
    }
    // The caller restores a checkpoint: the CPU twin's state and
    // parameters.
    case.load_cpu_state("after loading");
    for p in &case.pairs {
        p.dev.write(p.off, &p.host);
    }
    for step in 3..5 {
        case.set_grads(step, None);
        let (c, g) = case.step(mode, 0.01, None);
        case.assert_step_matches(mode, &c, &g, &format!("after loading, step {step}"));
    }
}

/// A step whose tensor-table upload was queued but whose event record then
/// failed is refused, and leaves the device table unknown: the next step
/// of the previous tensor list uploads that list's table again rather than
/// run on the failed step's pointers (which the caller may free). In a
/// process of its own (the failure is the next record of the whole
/// process); a real driver has no such switch: skipped there.
#[test]
fn a_table_upload_whose_record_failed_is_uploaded_again() {
    const TEST: &str = "a_table_upload_whose_record_failed_is_uploaded_again";
    if !runs_alone_on_the_fake_driver(TEST, &[], "refuses an event record on request") {
        return;
    }
    assert!(gpu(TEST));
    let mode = Mode::Fused { guard: false };
    let mut case = Case::new(
        OptimizerKind::Adam,
        &shape(DType::F32),
        std::ptr::null_mut(),
    );
    case.set_grads(1, None);
    let (c, g) = case.step(mode, 0.01, None);
    case.assert_step_matches(mode, &c, &g, "first step");
    // A step of the CUDA backend alone on other buffers, whose upload's
    // record fails (the first record of a step); the first buffers are
    // kept.
    let first = case.move_device_buffers();
    case.set_grads(2, None);
    let (_, tg) = case.descs();
    case.gpu.validate(&tg).unwrap();
    fake_driver_fails(c"fake_cuda_fail_event_record", 1);
    let req = case.request(mode, 0.01, &tg, std::ptr::null(), case.stream, None);
    let e = unsafe { case.gpu.step(req) }.expect_err("the failed record fails the step");
    assert_eq!(e.status, Status::Cuda, "{e}");
    assert!(e.message.contains("CUDA_ERROR_UNKNOWN"), "{e}");
    // Back on the first buffers, with the other ones still allocated (so a
    // stale table would update them rather than fault).
    let other = case.swap_device_buffers(first);
    case.set_grads(3, None);
    let (c, g) = case.step(mode, 0.01, None);
    case.assert_step_matches(mode, &c, &g, "back on the first buffers");
    drop(other);
}

/// Memory of a context whose allocation range the driver does not report
/// (a range size of 0) is refused: lra could not check that the tensor
/// fits it. The fake driver hides the range with
/// `FAKE_CUDA_ALLOCATION_RANGE=zero`, set for this test's own process; a
/// real driver has no such switch: skipped there.
#[test]
fn memory_whose_allocation_range_is_not_reported_is_refused() {
    const TEST: &str = "memory_whose_allocation_range_is_not_reported_is_refused";
    const NO_RANGE: (&str, &str) = ("FAKE_CUDA_ALLOCATION_RANGE", "zero");
    if !runs_alone_on_the_fake_driver(TEST, &[NO_RANGE], "can hide an allocation's range") {
        return;
    }
    assert!(gpu(TEST));
    let mut case = Case::new(
        OptimizerKind::Sgd,
        &[(64, DType::F32, false)],
        std::ptr::null_mut(),
    );
    let (_, tg) = case.descs();
    let e = case.gpu.validate(&tg).expect_err("an unchecked extent");
    assert_eq!(e.status, Status::InvalidArgument, "{e}");
    assert!(e.message.contains("reports no allocation range"), "{e}");
}

/// A driver whose JIT is older than the kernels' PTX: `lra_create` says
/// so, with the JIT's own log, and changes nothing (a later create tries
/// again from scratch and fails the same way). The fake driver plays a
/// CUDA 10.2 driver's JIT (PTX 6.5) with `FAKE_CUDA_PTX_ISA=6.5`, set for
/// this test's own process; a real driver has no such switch: skipped.
#[test]
fn a_driver_too_old_for_the_kernels_is_a_clear_error() {
    const TEST: &str = "a_driver_too_old_for_the_kernels_is_a_clear_error";
    const OLD_JIT: (&str, &str) = ("FAKE_CUDA_PTX_ISA", "6.5");
    if !runs_alone_on_the_fake_driver(TEST, &[OLD_JIT], "plays an older JIT") {
        return;
    }
    let version = lra::backend::cuda::abi::PTX
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version"))
        .expect("the kernels' PTX names its version")
        .trim();
    assert_cuda_create_refused(
        LRA_CUDA_ERROR,
        &[
            "cuModuleLoadDataEx",
            "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
            &format!("Unsupported .version {version}; current version is '6.5'"),
            "update the NVIDIA driver",
        ],
    );
}

/// `lra_create` of a CUDA handle fails with `status` and a message holding
/// each of `parts`, also when tried again.
fn assert_cuda_create_refused(status: lra_status, parts: &[&str]) {
    for attempt in 0..2 {
        let cfg = abi_config(LRA_OPTIMIZER_ADAM, LRA_DEVICE_CUDA, 1e-3);
        let mut h: *mut lra_handle = std::ptr::null_mut();
        // SAFETY: the C ABI as a C caller uses it.
        let got = unsafe { lra_create(&cfg, &mut h) };
        let msg = support::thread_error();
        assert_eq!(got, status, "attempt {attempt}: {msg}");
        assert!(h.is_null());
        for part in parts {
            assert!(msg.contains(part), "attempt {attempt}: {part:?} in {msg}");
        }
        println!("lra_create, attempt {attempt}: {msg}");
    }
}

/// A driver older than CUDA 11.0 lacks entry points lra calls
/// (`cuDevicePrimaryCtxRelease_v2`; a real loader's missing symbol made
/// `lra_create` an `LRA_PANIC`): it is refused by its version, before any
/// of them is called (the fake driver stops the process if one is).
#[test]
fn a_driver_older_than_cuda_11_is_refused_by_its_version() {
    const TEST: &str = "a_driver_older_than_cuda_11_is_refused_by_its_version";
    const CUDA_10_2: (&str, &str) = ("FAKE_CUDA_POINTER_ATTRIBUTES", "10.2");
    if !runs_alone_on_the_fake_driver(TEST, &[CUDA_10_2], "plays a CUDA 10.2 driver") {
        return;
    }
    assert_cuda_create_refused(
        LRA_NO_CUDA,
        &["CUDA 10.2", "11.0 or newer", "update the NVIDIA driver"],
    );
}

/// Memory mapped through the virtual memory management API (PyTorch's
/// expandable segments) as lra's pointer check sees it: tensors across
/// mappings are accepted; one reaching unmapped memory (past the mapped
/// part, a hole, past the reservation) or memory this device may not
/// access as the step needs is refused. Public reports disagree on what
/// `CU_POINTER_ATTRIBUTE_RANGE_SIZE` gives for such memory (one mapping,
/// or the whole reservation); lra does not use it here, and the fake
/// driver runs this test under both readings and with a CUDA 11.0 driver's
/// attributes. On a GPU it prints what the driver reports.
#[test]
fn memory_mapped_through_the_vmm_api_is_checked_by_its_mapped_extent() {
    if !gpu("memory_mapped_through_the_vmm_api_is_checked_by_its_mapped_extent") {
        return;
    }
    use sys::CUmemAccess_flags::*;
    let rw = Some(CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    let mut lra_gpu = cuda::create(OptimizerKind::Sgd, 0).unwrap();
    // Gradients for tensors up to a whole 4-granule reservation.
    let grad = DevBuf::uninit(4 * Vmm::granularity());
    let f32s = |p: u64, g: u64, n: usize| TensorDesc {
        param: p as *mut c_void,
        grad: g as *const c_void,
        numel: n,
        dtype: DType::F32,
    };
    // What each case's refusal must say: a tensor that starts in unmapped
    // memory (an address the driver may not know at all), or one that
    // starts in mapped memory and runs past it.
    const UNMAPPED: &[&str] = &["is not mapped device memory", "not CUDA memory"];
    const RUNS_PAST: &[&str] = &["runs past its mapped memory"];
    const NO_ACCESS: &[&str] = &["may not"];
    // (case, lra's verdict, None: must accept / Some(what the refusal says))
    type Verdict = (
        &'static str,
        Result<(), lra::Error>,
        Option<&'static [&'static str]>,
    );
    let mut verdicts: Vec<Verdict> = Vec::new();
    {
        // Four granules, the first three mapped.
        let m = Vmm::new(4, &[(0, 1, rw), (1, 1, rw), (2, 1, rw)]);
        let n = m.granule / 4;
        let probe = m.at(1, -64);
        println!(
            "vmm: granule {} bytes, reservation {:#x} + {}, mapped + {}; at {probe:#x}: {}",
            m.granule,
            m.base,
            4 * m.granule,
            3 * m.granule,
            cuda::describe_pointer(probe)
        );
        let g = grad.0;
        for (what, t, refused) in [
            ("across two mappings", f32s(probe, g, 32), None),
            (
                "across three mappings",
                f32s(m.at(0, 64), g, 3 * n - 16),
                None,
            ),
            (
                "ending where the mapping ends",
                f32s(m.at(1, 0), g, 2 * n),
                None,
            ),
            ("inside one mapping", f32s(m.at(1, 64), g, n - 16), None),
            (
                "4 bytes past the mapped part",
                f32s(m.at(1, 0), g, 2 * n + 1),
                Some(RUNS_PAST),
            ),
            (
                "from inside a mapping, 64 bytes past the mapped part",
                f32s(m.at(2, 64), g, n),
                Some(RUNS_PAST),
            ),
            (
                "starting in the unmapped granule",
                f32s(m.at(3, 0), g, 16),
                Some(UNMAPPED),
            ),
            (
                "gradient past the mapped part",
                f32s(g, m.at(2, 0), n + 1),
                Some(RUNS_PAST),
            ),
        ] {
            verdicts.push((what, lra_gpu.validate(&[t]), refused));
        }
    }
    {
        // All four mapped, the first three by one allocation: up to the
        // reservation's end, not past it.
        let m = Vmm::new(4, &[(0, 3, rw), (3, 1, rw)]);
        let n = m.granule / 4;
        let g = grad.0;
        for (what, t, refused) in [
            ("the whole reservation", f32s(m.base, g, 4 * n), None),
            (
                "ending at the reservation's end",
                f32s(m.at(3, 0), g, n),
                None,
            ),
            (
                "4 bytes past the reservation",
                f32s(m.at(3, 0), g, n + 1),
                Some(RUNS_PAST),
            ),
        ] {
            verdicts.push((what, lra_gpu.validate(&[t]), refused));
        }
        let flag = lra_gpu.check_step(m.at(4, -4) as *const c_void, std::ptr::null_mut());
        verdicts.push(("found_inf in the last 4 bytes", flag, None));
    }
    {
        // A hole: granules 0, 1 and 3 mapped, 2 not.
        let m = Vmm::new(4, &[(0, 1, rw), (1, 1, rw), (3, 1, rw)]);
        let n = m.granule / 4;
        let across = lra_gpu.validate(&[f32s(m.at(0, 64), grad.0, 4 * n - 32)]);
        verdicts.push(("across the hole", across, Some(RUNS_PAST)));
        let flag = lra_gpu.check_step(m.at(2, 64) as *const c_void, std::ptr::null_mut());
        verdicts.push(("found_inf in the hole", flag, Some(UNMAPPED)));
    }
    // lra asks for access rights from CUDA 11.2's pointer attributes on
    // (by the driver's version); with an older driver it accepts.
    let access_known = {
        let mut version = 0;
        // SAFETY: out-parameter.
        ok(unsafe { sys::cuDriverGetVersion(&mut version) });
        version >= 11020
    };
    if !access_known {
        println!(
            "vmm: a driver before CUDA 11.2 does not report access: the access cases expect acceptance"
        );
    }
    let no_access: Option<&[&str]> = if access_known { Some(NO_ACCESS) } else { None };
    {
        // Access: read and write, read only, none.
        let m = Vmm::new(
            3,
            &[
                (0, 1, rw),
                (1, 1, Some(CU_MEM_ACCESS_FLAGS_PROT_READ)),
                (2, 1, None),
            ],
        );
        let n = m.granule / 4;
        // A driver that refuses a read-only mapping: those cases do not apply.
        let read_only = !m.access_refused.iter().any(|&(i, _)| i == 1);
        if !read_only {
            println!(
                "vmm: read-only access refused here ({:?}): its cases not run",
                m.access_refused
            );
        }
        for (what, t, refused) in [
            ("gradient read-only", f32s(m.at(0, 0), m.at(1, 0), n), None),
            (
                "parameter read-only",
                f32s(m.at(1, 0), grad.0, n),
                no_access,
            ),
            (
                "gradient without access",
                f32s(grad.0, m.at(2, 0), 16),
                no_access,
            ),
            (
                "parameter running into read-only",
                f32s(m.at(0, 64), grad.0, n),
                no_access,
            ),
        ] {
            if read_only || !what.contains("read-only") {
                verdicts.push((what, lra_gpu.validate(&[t]), refused));
            }
        }
    }
    for (what, verdict, refused) in verdicts {
        match (verdict, refused) {
            (Ok(()), None) => {}
            (Err(e), None) => panic!("{what}: refused: {e}"),
            (Ok(()), Some(_)) => panic!("{what}: accepted"),
            (Err(e), Some(says)) => {
                assert_eq!(e.status, Status::InvalidArgument, "{what}: {e}");
                assert!(
                    says.iter().any(|s| e.message.contains(s)),
                    "{what}: refused by another check: {e}"
                );
            }
        }
    }
}

/// Memory of a stream-ordered pool (`cuMemAllocAsync`: CUDA.jl's default
/// allocator, PyTorch's `backend:cudaMallocAsync`) has no context, so lra
/// checks it as mapped memory (mapped, accessible to the pool's device):
/// it must be accepted. The fake driver's pool memory reads
/// `ACCESS_FLAGS` 0 (the worst case nothing documents away): lra must ask
/// the pool; with `FAKE_CUDA_POOL_ACCESS_FLAGS=refused` it refuses
/// `ACCESS_FLAGS`: lra must ask again without it.
#[test]
fn stream_ordered_pool_memory_is_accepted() {
    if !gpu("stream_ordered_pool_memory_is_accepted") {
        return;
    }
    let lra_gpu = cuda::create(OptimizerKind::Sgd, 0).unwrap();
    let n = 1 << 20;
    let (mut p, mut g) = (0, 0);
    // SAFETY: out-parameters; the legacy stream.
    unsafe {
        ok(sys::cuMemAllocAsync(&mut p, 4 * n, std::ptr::null_mut()));
        ok(sys::cuMemAllocAsync(&mut g, 4 * n, std::ptr::null_mut()));
        ok(sys::cuCtxSynchronize());
    }
    let t = |p: u64, n: usize| TensorDesc {
        param: p as *mut c_void,
        grad: g as *const c_void,
        numel: n,
        dtype: DType::F32,
    };
    let whole = lra_gpu.validate(&[t(p, n)]);
    let tail = lra_gpu.validate(&[t(p + 4 * n as u64 - 64, 16)]);
    println!("pool memory at {p:#x}: {}", cuda::describe_pointer(p));
    // SAFETY: allocated above, no longer used.
    unsafe {
        ok(sys::cuMemFreeAsync(p, std::ptr::null_mut()));
        ok(sys::cuMemFreeAsync(g, std::ptr::null_mut()));
        ok(sys::cuCtxSynchronize());
    }
    whole.expect("a whole pool allocation was refused");
    tail.expect("the last 16 elements of a pool allocation were refused");
}
