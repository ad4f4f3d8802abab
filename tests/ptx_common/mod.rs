//! Shared harness of the PTX-interpreter tests: drives `kernels/lra.ptx`
//! (the text the library embeds, `abi::PTX`) through the same tables and
//! launch plan as the CUDA backend (`lra::backend::cuda::abi`), on the CPU
//! with `ptx-interp`, next to the CPU backend on the same inputs.
#![allow(dead_code)]

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the test owns and keeps alive across the call
// (host slices, or its own device buffers), and null or test-owned flags
// and streams.

use half::{bf16, f16};
use lra::backend::cpu::CpuBackend;
use lra::backend::cuda::abi::{self, ChunkEntry, ChunkPlan, Control, SegmentEntry, TensorEntry};
use lra::backend::{Backend, BackendState, StepRequest, TensorDesc};
use lra::controller::{ScaleRule, SkipReason, StepOutcome};
use lra::optim::{self, BiasPowers, DType, Hyper, OptimizerKind, StepScalars};
use ptx_interp::{Arg, Device, LaunchConfig, LaunchReport, Module, Schedule};

pub use super::support::Rng;

/// The kernel under test: `abi::PTX`, the text the library embeds, unless
/// `LRA_PTX_KERNEL` names a file holding another (`scripts/ptx-mutants.py`
/// runs the interpreter tests on edited copies of the kernel, to see which
/// edits they notice).
pub fn kernel_module() -> Module {
    match std::env::var_os("LRA_PTX_KERNEL") {
        None => {
            Module::load(abi::PTX).unwrap_or_else(|e| panic!("kernels/lra.ptx does not load: {e}"))
        }
        Some(path) => {
            let src = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("LRA_PTX_KERNEL = {path:?}: {e}"));
            Module::load(&src)
                .unwrap_or_else(|e| panic!("LRA_PTX_KERNEL = {path:?} does not load: {e}"))
        }
    }
}

/// ±0, smallest and largest subnormal, smallest normal, ±inf, NaN, ±max
/// finite: as raw bits of each storage type.
pub fn special_bits(dt: DType) -> &'static [u32] {
    match dt {
        DType::F32 => &[
            0x0000_0000,
            0x8000_0000,
            0x0000_0001,
            0x807f_ffff,
            0x0080_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f7f_ffff,
            0xff7f_ffff,
        ],
        DType::F16 => &[
            0x0000, 0x8000, 0x0001, 0x83ff, 0x0400, 0x7c00, 0xfc00, 0x7e00, 0x7bff, 0xfbff,
        ],
        DType::Bf16 => &[
            0x0000, 0x8000, 0x0001, 0x807f, 0x0080, 0x7f80, 0xff80, 0x7fc0, 0x7f7f, 0xff7f,
        ],
    }
}

/// `n` elements of `dt` as little-endian bytes; every `every`-th element
/// (from `phase`) is a special value, the rest ordinary numbers. With
/// `small_finite_only` the specials are restricted to ±0, subnormals and the
/// smallest normal, so sums over them stay finite and φ is a real number.
pub fn values(
    rng: &mut Rng,
    dt: DType,
    n: usize,
    every: usize,
    phase: usize,
    small_finite_only: bool,
) -> Vec<u8> {
    let sp: Vec<u32> = special_bits(dt)
        .iter()
        .copied()
        .filter(|&b| {
            let x = to_f32(dt, &b.to_le_bytes(), 0);
            !small_finite_only || (x.is_finite() && x.abs() <= 1.0)
        })
        .collect();
    let mut out = Vec::with_capacity(n * dt.size());
    for i in 0..n {
        let bits = if every > 0 && i % every == phase {
            sp[(rng.next() % sp.len() as u64) as usize]
        } else {
            let v = rng.value();
            match dt {
                DType::F32 => v.to_bits(),
                DType::F16 => f16::from_f32(v).to_bits() as u32,
                DType::Bf16 => bf16::from_f32(v).to_bits() as u32,
            }
        };
        out.extend_from_slice(&bits.to_le_bytes()[..dt.size()]);
    }
    out
}

pub fn to_f32(dt: DType, b: &[u8], i: usize) -> f32 {
    match dt {
        DType::F32 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()),
        DType::F16 => f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
        DType::Bf16 => bf16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
    }
}

/// Bitwise equality where any NaN equals any NaN (payloads differ between
/// x86 and PTX).
pub fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

pub fn same_f64(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Compares two buffers of `dt` element by element; returns the first
/// mismatch as text.
pub fn diff(dt: DType, a: &[u8], b: &[u8]) -> Option<String> {
    assert_eq!(a.len(), b.len());
    (0..a.len() / dt.size()).find_map(|i| {
        let (x, y) = (to_f32(dt, a, i), to_f32(dt, b, i));
        let nan_same = x.is_nan() && y.is_nan();
        let bytes_same =
            a[i * dt.size()..(i + 1) * dt.size()] == b[i * dt.size()..(i + 1) * dt.size()];
        (!(bytes_same || nan_same)).then(|| format!("element {i}: {x:e} vs {y:e}"))
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pod_bytes<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: plain-old-data repr(C) rows of the ABI tables.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        .to_vec()
}

/// One tensor of a test case.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub dtype: DType,
    pub numel: usize,
    /// Offset the parameter by one element so the vector path is off.
    pub misalign: bool,
}

pub fn spec(dtype: DType, numel: usize) -> Spec {
    Spec {
        dtype,
        numel,
        misalign: false,
    }
}

/// A few consecutive chunks of a layout too large to allocate (billions of
/// elements): [`Gpu::new_window`] runs chunks `chunks` of
/// `abi::chunk_table(&numels)`.
pub struct Window {
    pub numels: Vec<usize>,
    pub chunks: std::ops::Range<usize>,
}

impl Window {
    /// The selected chunks' rows (segment numbers from 0, starts as in the
    /// layout), and per tensor the elements `lo..hi` they cover (`lo == hi`
    /// when none).
    pub fn rows(&self) -> (ChunkPlan, Vec<(usize, usize)>) {
        let full = abi::chunk_table(&self.numels);
        let sel = &full.chunks[self.chunks.clone()];
        let (first, end) = (sel[0].first, sel[sel.len() - 1].end);
        let segments = full.segments[first as usize..end as usize].to_vec();
        let chunks = sel
            .iter()
            .map(|c| ChunkEntry {
                first: c.first - first,
                end: c.end - first,
            })
            .collect();
        let mut spans = vec![(0, 0); self.numels.len()];
        for s in &segments {
            let span = &mut spans[s.tensor as usize];
            let (a, b) = (s.start as usize, (s.start + s.len as u64) as usize);
            if span.0 == span.1 {
                *span = (a, b);
            } else {
                assert_eq!(span.1, a, "a tensor's segments are consecutive");
                span.1 = b;
            }
        }
        (ChunkPlan { chunks, segments }, spans)
    }

    /// The buffers of the window: per tensor, `like`'s dtype and alignment
    /// with the number of elements the chunks touch.
    pub fn specs(&self, like: &[Spec]) -> Vec<Spec> {
        let (_, spans) = self.rows();
        like.iter()
            .zip(spans)
            .map(|(s, (lo, hi))| Spec {
                numel: hi - lo,
                ..*s
            })
            .collect()
    }
}

/// Two chunks of a layout of 2^32 + 6 f16 elements followed by an f32 and
/// a misaligned bf16 tensor: segment starts of 2^32 − 16384 and 2^32 (byte
/// offsets past 2^33), chunks of 16384 elements (what layouts of 2^26
/// elements and more get), the second chunk shared by all three tensors.
/// Returns the window and the specs of its buffers.
pub fn past_two_to_the_32() -> (Window, Vec<Spec>) {
    let w = Window {
        numels: vec![(1 << 32) + 6, 5000, 33],
        chunks: (1 << 32) / abi::CHUNK_LARGE - 1..(1 << 32) / abi::CHUNK_LARGE + 1,
    };
    let specs = w.specs(&[
        spec(DType::F16, 0),
        spec(DType::F32, 0),
        Spec {
            dtype: DType::Bf16,
            numel: 0,
            misalign: true,
        },
    ]);
    (w, specs)
}

/// `n` tensors of every dtype, aligned and not, of 0 to 60 elements.
pub fn many_tensors(n: usize) -> Vec<Spec> {
    (0..n)
        .map(|i| Spec {
            dtype: [DType::F32, DType::F16, DType::Bf16][i % 3],
            numel: (i * 37) % 61,
            misalign: i % 7 == 3,
        })
        .collect()
}

/// Which passes a step runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pass {
    /// f* unknown, R = 0, guard off: one fused launch.
    Fused,
    /// Fused with the non-finite guard: check launch, fused launch.
    Guarded,
    /// f* known and/or R > 0: dot launch, update launch (scale on the device).
    Scaled { f_star: f64, obs_var: f64 },
    /// Two-pass with a registered (single-rank) reduction: the host reads
    /// φ and the non-finite count between launches and writes them back.
    Sharded { f_star: f64, obs_var: f64 },
    /// [`Pass::Sharded`] with the guard off (a non-finite gradient is
    /// written, not skipped for).
    ShardedUnguarded { f_star: f64, obs_var: f64 },
    /// A registered reduction with the guard on and other ranks in the sum:
    /// `peers` is what they add to `[non-finite count, found_inf flags, φ]`.
    /// `rule`: `Some((f_star, obs_var))` two-pass, `None` fused (only the
    /// check launch runs before the sum).
    ShardedPeers {
        rule: Option<(f64, f64)>,
        peers: [f64; 3],
    },
    /// [`Pass::Scaled`] with a finite `scale_max` (else +inf).
    Clamped {
        f_star: f64,
        obs_var: f64,
        scale_max: f64,
    },
}

/// What a [`Pass`] is made of: the scale rule's (f*, R) for two-pass steps,
/// the guard, and (sharded) what the other ranks add to the pre-write sum.
pub struct Shape {
    pub rule: Option<(f64, f64)>,
    pub guard: bool,
    pub peers: Option<[f64; 3]>,
    pub scale_max: f64,
}

impl Pass {
    pub fn shape(self) -> Shape {
        let (rule, guard, peers) = match self {
            Pass::Fused => (None, false, None),
            Pass::Guarded => (None, true, None),
            Pass::Scaled { f_star, obs_var } => (Some((f_star, obs_var)), false, None),
            Pass::Sharded { f_star, obs_var } => (Some((f_star, obs_var)), true, Some([0.0; 3])),
            Pass::ShardedUnguarded { f_star, obs_var } => {
                (Some((f_star, obs_var)), false, Some([0.0; 3]))
            }
            Pass::ShardedPeers { rule, peers } => (rule, true, Some(peers)),
            Pass::Clamped {
                f_star,
                obs_var,
                scale_max,
            } => {
                return Shape {
                    rule: Some((f_star, obs_var)),
                    guard: false,
                    peers: None,
                    scale_max,
                }
            }
        };
        Shape {
            rule,
            guard,
            peers,
            scale_max: f64::INFINITY,
        }
    }
}

/// The per-step scalars of every launch of a step.
pub struct StepArgs<'a> {
    pub hyper: &'a Hyper,
    pub lr: f64,
    pub rule: ScaleRule,
    /// Pass the found_inf flag's address (else 0).
    pub found_inf: bool,
}

/// The device half of one handle, driven exactly like `CudaBackend`.
pub struct Gpu<'m> {
    pub dev: Device,
    module: &'m Module,
    kind: OptimizerKind,
    specs: Vec<Spec>,
    /// (param, grad) device addresses.
    pub ptrs: Vec<(u64, u64)>,
    state: u64,
    offsets: Vec<usize>,
    pub control: u64,
    tensors: u64,
    chunks: u64,
    segments: u64,
    nchunks: u32,
    partials: u64,
    found_inf: u64,
    pub grid: u32,
    /// Threads per block (`abi::BLOCK` unless a test sets another).
    pub block: u32,
    pub schedule: Schedule,
    pub table: Vec<TensorEntry>,
    pub plan: ChunkPlan,
    /// What each launch so far did (instructions, bytes, latency rounds).
    pub reports: Vec<LaunchReport>,
    /// What the last step handed the cross-rank sum (sharded steps).
    pub sum_input: Option<[f64; 3]>,
}

impl<'m> Gpu<'m> {
    pub fn new(
        module: &'m Module,
        kind: OptimizerKind,
        specs: &[Spec],
        grid: Option<u32>,
    ) -> Gpu<'m> {
        let mut dev = Device::new();
        let numels: Vec<usize> = specs.iter().map(|s| s.numel).collect();
        let ptrs: Vec<(u64, u64)> = specs
            .iter()
            .map(|s| {
                let esz = s.dtype.size();
                let extra = s.misalign as usize;
                // the buffer ends exactly where the tensor ends: any overrun is out of bounds
                let p = dev.alloc((s.numel + extra) * esz) + (extra * esz) as u64;
                let g = dev.alloc(s.numel * esz);
                (p, g)
            })
            .collect();
        let (offsets, total) = abi::state_layout(&numels, kind);
        let state = dev.alloc(total * 4);
        let table: Vec<TensorEntry> = specs
            .iter()
            .zip(&ptrs)
            .zip(&offsets)
            .map(|((s, &ptr), &off)| abi::tensor_entry(kind, ptr, s.numel, s.dtype, state, off))
            .collect();
        let plan = abi::chunk_table(&numels);
        let nchunks = plan.chunks.len() as u32;
        let tensors = dev.alloc_from(&pod_bytes(&table));
        let chunks = dev.alloc_from(&pod_bytes(&plan.chunks));
        let segments = dev.alloc_from(&pod_bytes(&plan.segments));
        let partials = dev.alloc(8 * plan.chunks.len());
        let control = dev.alloc_from(&pod_bytes(&[Control::initial()]));
        let found_inf = dev.alloc(4);
        let grid = grid.unwrap_or(nchunks.clamp(1, 3));
        Gpu {
            dev,
            module,
            kind,
            specs: specs.to_vec(),
            ptrs,
            state,
            offsets,
            control,
            tensors,
            chunks,
            segments,
            nchunks,
            partials,
            found_inf,
            grid,
            block: abi::BLOCK,
            schedule: Schedule::InOrder,
            table,
            plan,
            reports: Vec::new(),
            sum_input: None,
        }
    }

    /// The device half of a handle whose layout is `w.numels`, running
    /// only the chunks `w.chunks`; `specs` (from [`Window::specs`]) are the
    /// elements those chunks touch, the buffers the test reads and writes.
    /// The kernel gets the layout's real segment rows (element starts of
    /// billions) and table rows pointing `lo` elements before the windows.
    pub fn new_window(
        module: &'m Module,
        kind: OptimizerKind,
        specs: &[Spec],
        w: &Window,
        grid: Option<u32>,
    ) -> Gpu<'m> {
        let mut gpu = Gpu::new(module, kind, specs, grid);
        let (rows, spans) = w.rows();
        assert_eq!(specs.len(), spans.len());
        let (offsets, _) = abi::state_layout(&w.numels, kind);
        let slots = kind.state_slots();
        let table: Vec<TensorEntry> = (0..specs.len())
            .map(|t| {
                let (s, lo) = (specs[t], spans[t].0 as u64);
                assert_eq!(s.numel, spans[t].1 - spans[t].0, "Window::specs");
                let esz = s.dtype.size() as u64;
                let (p, g) = gpu.ptrs[t];
                let mut row = abi::tensor_entry(
                    kind,
                    (p - lo * esz, g - lo * esz),
                    w.numels[t],
                    s.dtype,
                    0,
                    offsets[t],
                );
                assert_eq!(row.vec, gpu.table[t].vec, "alignment kept");
                // the window's state slots, `lo` elements on
                let slot = |k: usize| {
                    gpu.state + 4 * (gpu.offsets[t] + k * abi::slot_stride(s.numel)) as u64 - 4 * lo
                };
                if slots >= 1 {
                    row.state0 = slot(0);
                }
                if slots >= 2 {
                    row.state1 = slot(1);
                }
                row
            })
            .collect();
        gpu.tensors = gpu.dev.alloc_from(&pod_bytes(&table));
        gpu.chunks = gpu.dev.alloc_from(&pod_bytes(&rows.chunks));
        gpu.segments = gpu.dev.alloc_from(&pod_bytes(&rows.segments));
        gpu.nchunks = rows.chunks.len() as u32;
        gpu.partials = gpu.dev.alloc(8 * rows.chunks.len());
        gpu.grid = grid.unwrap_or(gpu.nchunks.clamp(1, 3));
        gpu.table = table;
        // φ's reference reads the window's elements: starts from `lo`
        gpu.plan = ChunkPlan {
            chunks: rows.chunks,
            segments: rows
                .segments
                .iter()
                .map(|s| SegmentEntry {
                    start: s.start - spans[s.tensor as usize].0 as u64,
                    ..*s
                })
                .collect(),
        };
        gpu
    }

    pub fn write_params(&mut self, params: &[Vec<u8>]) {
        for (p, &(pa, _)) in params.iter().zip(&self.ptrs) {
            self.dev.write(pa, p).unwrap();
        }
    }

    pub fn write_grads(&mut self, grads: &[Vec<u8>]) {
        for (g, &(_, ga)) in grads.iter().zip(&self.ptrs) {
            self.dev.write(ga, g).unwrap();
        }
    }

    pub fn params(&self) -> Vec<Vec<u8>> {
        self.specs
            .iter()
            .zip(&self.ptrs)
            .map(|(s, &(p, _))| self.dev.read(p, s.numel * s.dtype.size()).unwrap())
            .collect()
    }

    /// Per tensor, slot-major state (the `BackendState` layout).
    pub fn state(&self) -> Vec<Vec<f32>> {
        let slots = self.kind.state_slots();
        self.specs
            .iter()
            .zip(&self.offsets)
            .map(|(s, &off)| {
                let mut v = Vec::new();
                for k in 0..slots {
                    let a = self.state + 4 * (off + k * abi::slot_stride(s.numel)) as u64;
                    let b = self.dev.read(a, 4 * s.numel).unwrap();
                    v.extend(
                        b.chunks(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
                    );
                }
                v
            })
            .collect()
    }

    pub fn set_state(&mut self, st: &[Vec<f32>]) {
        for ((s, &off), v) in self.specs.iter().zip(&self.offsets).zip(st) {
            for (k, slot) in v.chunks(s.numel.max(1)).enumerate() {
                let a = self.state + 4 * (off + k * abi::slot_stride(s.numel)) as u64;
                self.dev.write(a, &f32_bytes(slot)).unwrap();
            }
        }
    }

    pub fn control(&self) -> Control {
        let b = self.dev.read(self.control, 64).unwrap();
        let f64at = |o: usize| f64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Control {
            pow1: f64at(0),
            pow2: f64at(8),
            applied: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            nonfinite: u32at(24),
            skip: u32at(28),
            phi: f64at(32),
            scale: f64at(40),
            lr_eff: f32::from_bits(u32at(48)),
            done: u32at(52),
            reserved: [u32at(56), u32at(60)],
        }
    }

    pub fn set_found_inf(&mut self, v: f32) {
        self.dev.write(self.found_inf, &v.to_le_bytes()).unwrap();
    }

    fn found_inf_value(&self) -> f32 {
        let b = self.dev.read(self.found_inf, 4).unwrap();
        f32::from_le_bytes(b.try_into().unwrap())
    }

    /// One launch of `lra_pass`, arguments in kernels/README.md order.
    pub fn launch(
        &mut self,
        m: u32,
        a: &StepArgs,
        nchunks: u32,
        grid: u32,
    ) -> ptx_interp::Result<()> {
        // The backend's own argument packing (abi::KernelArgs), so the test
        // launches exactly what the CUDA backend launches.
        let args: Vec<Arg> = abi::KernelArgs {
            tensors: self.tensors,
            chunks: self.chunks,
            segments: self.segments,
            nchunks,
            control: self.control,
            partials: self.partials,
            found_inf: if a.found_inf { self.found_inf } else { 0 },
            kind: self.kind,
            mode: m,
            lr: a.lr,
            beta1: a.hyper.beta1,
            beta2: a.hyper.beta2,
            rule: a.rule,
            sc: StepScalars::new(self.kind, a.hyper, BiasPowers::default()),
        }
        .params()
        .into_iter()
        .map(Arg::Bytes)
        .collect();
        let cfg = LaunchConfig::linear(grid, self.block).with_schedule(self.schedule.clone());
        let report = self.dev.launch(self.module, abi::ENTRY, &cfg, &args)?;
        self.reports.push(report);
        Ok(())
    }

    /// The launches of one step, as `CudaBackend::run_step` makes them.
    pub fn step(
        &mut self,
        pass: Pass,
        hyper: &Hyper,
        lr: f64,
        loss: f64,
        found_inf: bool,
    ) -> ptx_interp::Result<()> {
        let Shape {
            rule,
            guard,
            peers,
            scale_max,
        } = pass.shape();
        let two_pass = rule.is_some();
        let rule = ScaleRule {
            loss: if rule.is_some() { loss } else { 0.0 },
            f_star: rule.map_or(f64::NAN, |r| r.0),
            obs_var: rule.map_or(0.0, |r| r.1),
            scale_max,
        };
        let (grid, n) = (self.grid, self.nchunks);
        self.sum_input = None;
        let a = StepArgs {
            hyper,
            lr,
            rule,
            found_inf,
        };
        if let Some(peers) = peers {
            let (before, after) = abi::sharded_split(two_pass, guard);
            for m in before {
                self.launch(m, &a, n, grid)?;
            }
            // what CudaBackend::run_step does between the launches: its own
            // found_inf flag and φ (none with the flag set) join the sum;
            // the sums go back as flags (bit 31: some found_inf) and φ
            let c = self.control();
            let found = found_inf && self.found_inf_value() != 0.0;
            let phi = if two_pass && !found { c.phi } else { 0.0 };
            let mut v = [c.nonfinite as f64, found as u32 as f64, phi];
            self.sum_input = Some(v);
            for (x, p) in v.iter_mut().zip(peers) {
                *x += p;
            }
            let flags = (v[0] != 0.0) as u32
                | if v[1] != 0.0 {
                    abi::NONFINITE_FOUND_INF
                } else {
                    0
                };
            self.dev
                .write(self.control + abi::CONTROL_NONFINITE, &flags.to_le_bytes())
                .unwrap();
            if two_pass {
                self.dev
                    .write(self.control + abi::CONTROL_PHI, &v[2].to_le_bytes())
                    .unwrap();
            }
            for (m, final_only) in after {
                if final_only {
                    self.launch(m, &a, 0, 1)?;
                } else {
                    self.launch(m, &a, n, grid)?;
                }
            }
        } else {
            for m in abi::step_launches(two_pass, guard) {
                self.launch(m, &a, n, grid)?;
            }
        }
        Ok(())
    }
}

/// Host buffers for the CPU backend, 4-byte aligned, with the same bytes.
pub struct Host {
    pub specs: Vec<Spec>,
    params: Vec<Vec<u32>>,
    grads: Vec<Vec<u32>>,
    pub cpu: CpuBackend,
    pub kind: OptimizerKind,
    /// What the last step handed the cross-rank sum (sharded steps).
    pub sum_input: Option<[f64; 3]>,
}

fn words(bytes: &[u8]) -> Vec<u32> {
    let mut w = vec![0u32; bytes.len().div_ceil(4)];
    // SAFETY: `w` holds at least `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), w.as_mut_ptr() as *mut u8, bytes.len())
    };
    w
}

fn word_bytes(w: &[u32], len: usize) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).take(len).collect()
}

impl Host {
    pub fn new(
        kind: OptimizerKind,
        specs: &[Spec],
        params: &[Vec<u8>],
        state: &[Vec<f32>],
    ) -> Host {
        let mut cpu = CpuBackend::new(kind, 1);
        cpu.import_values(&BackendState {
            bias: BiasPowers::default(),
            applied: 0,
            slots: state.to_vec(),
        })
        .unwrap();
        Host {
            specs: specs.to_vec(),
            params: params.iter().map(|p| words(p)).collect(),
            grads: specs
                .iter()
                .map(|s| vec![0; (s.numel * s.dtype.size()).div_ceil(4)])
                .collect(),
            cpu,
            kind,
            sum_input: None,
        }
    }

    pub fn params(&self) -> Vec<Vec<u8>> {
        self.params
            .iter()
            .zip(&self.specs)
            .map(|(w, s)| word_bytes(w, s.numel * s.dtype.size()))
            .collect()
    }

    pub fn step(
        &mut self,
        pass: Pass,
        hyper: &Hyper,
        lr: f64,
        loss: f64,
        grads: &[Vec<u8>],
        found_inf: bool,
    ) -> StepOutcome {
        for (g, b) in self.grads.iter_mut().zip(grads) {
            *g = words(b);
        }
        let descs: Vec<TensorDesc> = self
            .specs
            .iter()
            .zip(self.params.iter_mut().zip(&self.grads))
            .map(|(s, (p, g))| TensorDesc {
                param: p.as_mut_ptr() as *mut _,
                grad: g.as_ptr() as *const _,
                numel: s.numel,
                dtype: s.dtype,
            })
            .collect();
        let flag = 1.0f32;
        let shape = pass.shape();
        let rule = |f_star: f64, obs_var: f64| ScaleRule {
            loss,
            f_star,
            obs_var,
            scale_max: shape.scale_max,
        };
        let peers = shape.peers.unwrap_or_default();
        let (rule, check, sharded) = (
            shape.rule.map(|(f, r)| rule(f, r)),
            shape.guard,
            shape.peers.is_some(),
        );
        // the other ranks' part of the sum
        let mut handed = None;
        let mut add_peers = |v: &mut [f64]| -> lra::Result<()> {
            handed = Some([v[0], v[1], v[2]]);
            for (x, p) in v.iter_mut().zip(peers) {
                *x += p;
            }
            Ok(())
        };
        let req = StepRequest {
            tensors: &descs,
            kind: self.kind,
            hyper: *hyper,
            lr,
            rule,
            check_finite: check,
            found_inf: if found_inf {
                &flag as *const f32 as *const _
            } else {
                std::ptr::null()
            },
            stream: std::ptr::null_mut(),
            reduce: if sharded { Some(&mut add_peers) } else { None },
        };
        unsafe { self.cpu.step(req) }.unwrap();
        self.sum_input = handed;
        self.cpu.outcome().unwrap()
    }

    pub fn state(&mut self) -> BackendState {
        self.cpu.export_state().unwrap()
    }
}

/// `direction::<K>` with a second (unused) parameter, the shape
/// `dispatch_kind!` needs.
fn dir_one<const K: u32, const UNUSED: u8>(
    sc: &StepScalars,
    th: f32,
    g: f32,
    a: &mut f32,
    b: &mut f32,
) -> f32 {
    optim::direction::<K>(sc, th, g, a, b)
}

/// Per tensor, the φ term `(f64)(g·d)` of every element, from the state
/// before the step (`src/optim.rs`, the per-element source of truth).
pub fn dot_terms(
    kind: OptimizerKind,
    hyper: &Hyper,
    bias: BiasPowers,
    specs: &[Spec],
    params: &[Vec<u8>],
    grads: &[Vec<u8>],
    state: &[Vec<f32>],
) -> Vec<Vec<f64>> {
    let sc = StepScalars::new(kind, hyper, bias.advanced(hyper));
    let slots = kind.state_slots();
    specs
        .iter()
        .enumerate()
        .map(|(t, s)| {
            (0..s.numel)
                .map(|i| {
                    let th = to_f32(s.dtype, &params[t], i);
                    let g = to_f32(s.dtype, &grads[t], i);
                    let mut a = if slots >= 1 { state[t][i] } else { 0.0 };
                    let mut b = if slots >= 2 {
                        state[t][s.numel + i]
                    } else {
                        0.0
                    };
                    let d = lra::dispatch_kind!(kind, dir_one::<0>(&sc, th, g, &mut a, &mut b));
                    optim::dot_term(g, d)
                })
                .collect()
        })
        .collect()
}

/// The kernel's butterfly offsets (kernels/README.md, reduction step 2).
pub const BFLY: [usize; 5] = [16, 8, 4, 2, 1];

/// `acc = acc + shfl.bfly(acc, off)` for each offset: lane 0's result.
fn warp_sum(mut v: [f64; 32], offsets: &[usize]) -> f64 {
    for &off in offsets {
        let old = v;
        for (l, x) in v.iter_mut().enumerate() {
            *x = old[l] + old[l ^ off];
        }
    }
    v[0]
}

/// kernels/README.md, reduction order steps 2 and 3, for `T` threads.
fn block_sum(acc: &[f64], offsets: &[usize]) -> f64 {
    let warps: Vec<f64> = acc
        .chunks(32)
        .map(|w| warp_sum(w.try_into().unwrap(), offsets))
        .collect();
    let mut v = [0.0f64; 32];
    v[..warps.len()].copy_from_slice(&warps);
    warp_sum(v, offsets)
}

/// φ in the kernel's reduction order (kernels/README.md, "Reduction order
/// of φ") for blocks of `t_n` threads, bit for bit, from the per-element
/// terms.
pub fn phi_reference(terms: &[Vec<f64>], plan: &ChunkPlan, lr: f64, t_n: usize) -> f64 {
    let partials: Vec<f64> = plan
        .chunks
        .iter()
        .map(|c| {
            let segments = &plan.segments[c.first as usize..c.end as usize];
            let acc: Vec<f64> = (0..t_n)
                .map(|t| {
                    // thread t's sum runs on across the chunk's segments,
                    // whose units (4 elements, fewer at a tensor's end) are
                    // dealt out in turn from thread 0
                    let (mut a, mut rot) = (0.0f64, 0);
                    for s in segments {
                        let (start, l) = (s.start as usize, s.len as usize);
                        let x = &terms[s.tensor as usize][start..start + l];
                        let units = l.div_ceil(4);
                        let mut u = (t + t_n - rot) % t_n;
                        while u < units {
                            for v in &x[4 * u..(4 * u + 4).min(l)] {
                                a += v;
                            }
                            u += t_n;
                        }
                        rot = (rot + units) % t_n;
                    }
                    a
                })
                .collect();
            block_sum(&acc, &BFLY)
        })
        .collect();
    final_sum(&partials, lr, &BFLY, t_n)
}

/// The final stage (kernels/README.md, reduction order step 4): φ of the
/// chunk partials, in blocks of `t_n` threads.
pub fn final_sum(partials: &[f64], lr: f64, offsets: &[usize], t_n: usize) -> f64 {
    let acc: Vec<f64> = (0..t_n)
        .map(|t| partials.iter().skip(t).step_by(t_n).fold(0.0, |a, p| a + p))
        .collect();
    lr * block_sum(&acc, offsets)
}

/// Runs only the final stage (`F_SUM`) of `lra_pass` over `partials`
/// written by the host (chunks without segments, so no block writes one)
/// with `grid` blocks of `block` threads; returns φ from the control block.
pub fn final_stage_phi(
    m: &Module,
    partials: &[f64],
    lr: f64,
    (grid, block): (u32, u32),
    schedule: Schedule,
) -> ptx_interp::Result<f64> {
    let mut dev = Device::new();
    let n = partials.len();
    let chunks = dev.alloc_from(&pod_bytes(&vec![abi::ChunkEntry::default(); n]));
    let p_bytes: Vec<u8> = partials.iter().flat_map(|x| x.to_le_bytes()).collect();
    let parts = dev.alloc_from(&p_bytes);
    let control = dev.alloc_from(&pod_bytes(&[Control::initial()]));
    let kind = OptimizerKind::Sgd;
    let hyper = Hyper::defaults(kind);
    let args: Vec<Arg> = abi::KernelArgs {
        // no chunk has a segment: the tables are never read
        tensors: dev.alloc(0),
        chunks,
        segments: dev.alloc(0),
        nchunks: n as u32,
        control,
        partials: parts,
        found_inf: 0,
        kind,
        // chunk work without M_THETA is the guard's check (over no
        // segments here), which must say so (kernels/README.md)
        mode: abi::mode::CHECK | abi::mode::F_SUM,
        lr,
        beta1: hyper.beta1,
        beta2: hyper.beta2,
        rule: abi::NO_RULE,
        sc: StepScalars::new(kind, &hyper, BiasPowers::default()),
    }
    .params()
    .into_iter()
    .map(Arg::Bytes)
    .collect();
    let cfg = LaunchConfig::linear(grid, block).with_schedule(schedule);
    dev.launch(m, abi::ENTRY, &cfg, &args)?;
    let b = dev.read(control + abi::CONTROL_PHI, 8)?;
    Ok(f64::from_le_bytes(b.try_into().unwrap()))
}

/// Skip reason codes of the control block.
pub fn skip_code(s: SkipReason) -> u32 {
    s as u32
}

/// `panic!`/`assert!` that return the message as `Err` instead, so the
/// negative tests can show that a wrong kernel fails the comparison.
macro_rules! fail {
    ($($t:tt)*) => { return Err(format!($($t)*)) };
}
macro_rules! check {
    ($c:expr, $($t:tt)*) => {
        match $c {
            true => {}
            false => return Err(format!($($t)*)),
        }
    };
}
macro_rules! check_eq {
    ($a:expr, $b:expr, $($t:tt)*) => {{
        let (a, b) = (&$a, &$b);
        if a != b { return Err(format!("{}: {:?} != {:?}", format!($($t)*), a, b)); }
    }};
}

/// How one step of a case is fed.
#[derive(Clone, Copy)]
pub struct StepPlan {
    pub pass: Pass,
    pub lr: f64,
    pub loss: f64,
    /// Gradients may hold ±inf/NaN (else only finite specials).
    pub nonfinite_grads: bool,
    /// The caller's found_inf flag (None: no flag passed).
    pub found_inf: Option<f32>,
}

pub fn plan(pass: Pass, lr: f64) -> StepPlan {
    StepPlan {
        pass,
        lr,
        loss: 1.0,
        nonfinite_grads: true,
        found_inf: None,
    }
}

pub struct Case<'a> {
    pub name: String,
    pub kind: OptimizerKind,
    pub specs: &'a [Spec],
    pub hyper: Hyper,
    pub steps: &'a [StepPlan],
    /// Initial parameters and state may hold ±inf/NaN (else only small
    /// finite specials, so that φ is finite and its bits mean something).
    pub nonfinite_init: bool,
    pub seed: u64,
    pub grid: Option<u32>,
    /// Threads per block.
    pub block: u32,
    pub schedule: Schedule,
}

impl<'a> Case<'a> {
    /// A case with finite initial values, the default grid, blocks in order.
    pub fn plain(
        name: String,
        kind: OptimizerKind,
        specs: &'a [Spec],
        hyper: Hyper,
        steps: &'a [StepPlan],
        seed: u64,
    ) -> Case<'a> {
        Case {
            name,
            kind,
            specs,
            hyper,
            steps,
            nonfinite_init: false,
            seed,
            grid: None,
            block: abi::BLOCK,
            schedule: Schedule::InOrder,
        }
    }
}

/// What the device ended with (for schedule comparisons).
#[derive(PartialEq, Debug)]
pub struct DeviceResult {
    pub params: Vec<Vec<u8>>,
    pub state_bits: Vec<Vec<u32>>,
    pub phis: Vec<u64>,
}

/// How many φ comparisons were made, and how many compared a finite,
/// non-zero φ (a NaN-equals-NaN comparison proves nothing about the order).
#[derive(Default, Debug)]
pub struct PhiStats {
    pub phi_checks: usize,
    pub finite_phi: usize,
    /// Cases at another block size than `abi::BLOCK`: comparisons whose
    /// expected bits differ from `abi::BLOCK` threads' order (so they tell
    /// the block sizes' orders apart).
    pub block_order_shows: usize,
}

impl PhiStats {
    pub fn add(&mut self, o: PhiStats) {
        self.phi_checks += o.phi_checks;
        self.finite_phi += o.finite_phi;
        self.block_order_shows += o.block_order_shows;
    }
    /// Most φ comparisons must be between real numbers.
    pub fn assert_meaningful(&self, what: &str) {
        println!(
            "{what}: {} φ comparisons, {} of finite non-zero φ",
            self.phi_checks, self.finite_phi
        );
        assert!(
            self.phi_checks > 0 && self.finite_phi * 2 >= self.phi_checks,
            "{what}: no φ compared, or too few finite ones: {self:?}"
        );
    }
}

/// Runs a case on the interpreter and on the CPU backend, asserting after
/// every step; returns the device's final bits.
pub fn try_run(m: &Module, c: &Case) -> Result<(DeviceResult, PhiStats), String> {
    try_run_window(m, c, None)
}

/// [`try_run`] on a [`Window`] of a larger layout (`c.specs` from
/// [`Window::specs`]), or on the whole layout of `c.specs`.
pub fn try_run_window(
    m: &Module,
    c: &Case,
    window: Option<&Window>,
) -> Result<(DeviceResult, PhiStats), String> {
    let mut stats = PhiStats::default();
    let mut rng = Rng(c.seed);
    let slots = c.kind.state_slots();
    let small = !c.nonfinite_init;
    let params: Vec<Vec<u8>> = c
        .specs
        .iter()
        .map(|s| values(&mut rng, s.dtype, s.numel, 13, 5, small))
        .collect();
    let state: Vec<Vec<f32>> = c
        .specs
        .iter()
        .map(|s| {
            let raw = values(&mut rng, DType::F32, slots * s.numel, 19, 2, small);
            (0..slots * s.numel)
                .map(|i| {
                    let v = to_f32(DType::F32, &raw, i);
                    // real second moments are non-negative; the non-finite
                    // specials include negative ones (sqrt → NaN)
                    if i % 19 == 2 && !small {
                        v
                    } else {
                        v.abs()
                    }
                })
                .collect()
        })
        .collect();
    let mut gpu = match window {
        Some(w) => Gpu::new_window(m, c.kind, c.specs, w, c.grid),
        None => Gpu::new(m, c.kind, c.specs, c.grid),
    };
    gpu.schedule = c.schedule.clone();
    gpu.block = c.block;
    gpu.write_params(&params);
    gpu.set_state(&state);
    let mut host = Host::new(c.kind, c.specs, &params, &state);
    let mut phis = Vec::new();
    for (k, st) in c.steps.iter().enumerate() {
        let ctx = format!("{} step {k}", c.name);
        let grads: Vec<Vec<u8>> = c
            .specs
            .iter()
            .map(|s| values(&mut rng, s.dtype, s.numel, 11, 7, !st.nonfinite_grads))
            .collect();
        let before = host.state();
        let before_params = host.params();
        let out = host.step(
            st.pass,
            &c.hyper,
            st.lr,
            st.loss,
            &grads,
            st.found_inf.is_some_and(|f| f != 0.0),
        );
        gpu.write_grads(&grads);
        if let Some(f) = st.found_inf {
            gpu.set_found_inf(f);
        }
        gpu.step(st.pass, &c.hyper, st.lr, st.loss, st.found_inf.is_some())
            .map_err(|e| format!("{ctx}: interpreter: {e}"))?;

        // parameters and state, bit for bit
        let (hp, gp) = (host.params(), gpu.params());
        for (t, s) in c.specs.iter().enumerate() {
            if let Some(d) = diff(s.dtype, &hp[t], &gp[t]) {
                fail!(
                    "{ctx}: tensor {t} ({:?}, {} elements) parameters differ (CPU vs PTX) at {d}",
                    s.dtype,
                    s.numel
                );
            }
        }
        let after = host.state();
        let gs = gpu.state();
        for (t, (a, b)) in after.slots.iter().zip(&gs).enumerate() {
            if let Some(i) = (0..a.len()).find(|&i| !same_f32(a[i], b[i])) {
                fail!(
                    "{ctx}: tensor {t} state value {i} differs: CPU {:e} vs PTX {:e}",
                    a[i],
                    b[i]
                );
            }
        }

        // the step's φ terms (f64), from the values before it
        let terms = dot_terms(
            c.kind,
            &c.hyper,
            before.bias,
            c.specs,
            &before_params,
            &grads,
            &before.slots,
        );

        // what each side handed the cross-rank sum: the non-finite count
        // (in units that differ: chunks, elements) alike zero or not, its
        // own found_inf flag, and its partial φ (0 with the flag set: a
        // flagged rank reads no gradient)
        match (host.sum_input, gpu.sum_input) {
            (None, None) => {}
            (Some(h), Some(g)) => {
                check_eq!(
                    (h[0] != 0.0, h[1]),
                    (g[0] != 0.0, g[1]),
                    "{ctx}: non-finite count and flag handed to the sum: CPU {h:?}, PTX {g:?}"
                );
                // (the two sum in different orders: close to Σ|terms|)
                let mag = terms.iter().flatten().map(|t| t.abs()).sum::<f64>() * st.lr;
                check!(
                    same_f64(h[2], g[2])
                        || (h[2].is_finite() == g[2].is_finite()
                            && (!mag.is_finite() || (h[2] - g[2]).abs() <= 1e-9 * mag)),
                    "{ctx}: partial φ handed to the sum: CPU {h:?}, PTX {g:?}"
                );
                if h[1] != 0.0 {
                    check_eq!(
                        (h[0], h[2], g[0], g[2]),
                        (0.0, 0.0, 0.0, 0.0),
                        "{ctx}: a flagged rank's sum"
                    );
                }
            }
            (h, g) => fail!("{ctx}: only one side joined the sum: CPU {h:?}, PTX {g:?}"),
        }

        // control block: skip reason, bias powers, applied steps, scale, φ
        let ctl = gpu.control();
        check_eq!(ctl.skip, skip_code(out.skip), "{ctx}: skip reason");
        check_eq!(
            (ctl.pow1.to_bits(), ctl.pow2.to_bits()),
            (after.bias.pow1.to_bits(), after.bias.pow2.to_bits()),
            "{ctx}: bias powers"
        );
        check_eq!(ctl.applied, after.applied, "{ctx}: applied steps");
        check_eq!(ctl.done, 0, "{ctx}: last-block counter must wrap to 0");
        if out.skip != SkipReason::None {
            check!(
                ctl.phi.is_nan() && out.phi.is_nan(),
                "{ctx}: a skipped step reports φ = NaN"
            );
            // kernels/README.md, F_DECIDE: a skip leaves scale 1, lr_eff (f32)η
            check_eq!(
                (ctl.scale, ctl.lr_eff),
                (1.0, lra::controller::effective_lr(1.0, st.lr)),
                "{ctx}: a skipped step's scale and effective learning rate"
            );
            check_eq!(hp, before_params, "{ctx}: a skipped step writes nothing");
            // the device's own values too (equal to the CPU's above, but a
            // skip both sides got wrong alike would pass that)
            let untouched = (0..c.specs.len())
                .find_map(|t| diff(c.specs[t].dtype, &before_params[t], &gp[t]).map(|d| (t, d)));
            check!(
                untouched.is_none(),
                "{ctx}: a skipped step wrote parameters: {untouched:?}"
            );
            let unchanged = gs
                .iter()
                .zip(&before.slots)
                .all(|(a, b)| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_f32(*x, *y)));
            check!(unchanged, "{ctx}: a skipped step writes no optimizer state");
            check_eq!(
                (ctl.pow1.to_bits(), ctl.pow2.to_bits(), ctl.applied),
                (
                    before.bias.pow1.to_bits(),
                    before.bias.pow2.to_bits(),
                    before.applied
                ),
                "{ctx}: a skipped step advances nothing"
            );
        } else {
            let shape = st.pass.shape();
            // two-pass sharded steps report the sum over the ranks (the
            // host's one f64 addition); fused ones the local φ
            let local = phi_reference(&terms, &gpu.plan, st.lr, c.block as usize);
            let (want, peer_phi) = match shape.peers {
                Some(p) if shape.rule.is_some() => (local + p[2], p[2]),
                _ => (local, 0.0),
            };
            check!(
                same_f64(ctl.phi, want),
                "{ctx}: φ {:e} ({:#x}) but the kernel's order gives {want:e} ({:#x})",
                ctl.phi,
                ctl.phi.to_bits(),
                want.to_bits()
            );
            if want.is_finite() && want != 0.0 {
                stats.finite_phi += 1;
            }
            if c.block != abi::BLOCK
                && !same_f64(
                    local,
                    phi_reference(&terms, &gpu.plan, st.lr, abi::BLOCK as usize),
                )
            {
                stats.block_order_shows += 1;
            }
            stats.phi_checks += 1;
            // the CPU backend sums in another order: close, not equal
            let mag: f64 =
                terms.iter().flatten().map(|t| t.abs()).sum::<f64>() * st.lr + peer_phi.abs();
            if want.is_finite() && mag.is_finite() {
                check!(
                    (out.phi - want).abs() <= 1e-9 * mag,
                    "{ctx}: φ CPU {:e} vs PTX {want:e}",
                    out.phi
                );
            } else {
                check_eq!(
                    out.phi.is_finite(),
                    want.is_finite(),
                    "{ctx}: φ CPU {:e} vs PTX {want:e}",
                    out.phi
                );
            }
            match shape.rule {
                None => check_eq!(
                    (ctl.scale, ctl.lr_eff),
                    (1.0, lra::controller::effective_lr(1.0, st.lr)),
                    "{ctx}: scale and effective learning rate"
                ),
                Some((f_star, obs_var)) => {
                    let rule = ScaleRule {
                        loss: st.loss,
                        f_star,
                        obs_var,
                        scale_max: shape.scale_max,
                    };
                    check!(
                        same_f64(ctl.scale, rule.scale(ctl.phi)),
                        "{ctx}: device scale {} vs ScaleRule {}",
                        ctl.scale,
                        rule.scale(ctl.phi)
                    );
                    // The CPU scales by its own φ; equal parameters above need equal (f32)(s·η).
                    check_eq!(
                        ctl.lr_eff,
                        lra::controller::effective_lr(out.scale, st.lr),
                        "{ctx}: effective learning rate"
                    );
                }
            }
        }
        phis.push(ctl.phi.to_bits());
    }
    let r = DeviceResult {
        params: gpu.params(),
        state_bits: gpu
            .state()
            .iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect(),
        phis,
    };
    Ok((r, stats))
}

/// [`try_run`], panicking with the first difference.
pub fn run(m: &Module, c: &Case) -> (DeviceResult, PhiStats) {
    try_run(m, c).unwrap_or_else(|e| panic!("{e}"))
}

pub fn hyper(kind: OptimizerKind, decay: bool) -> Hyper {
    let mut h = Hyper::defaults(kind);
    if decay {
        // AdamW decays by default: its variant is a weight decay of -0.0,
        // which must act as itself (the CPU backend once replaced it by
        // +0.0 and lost the sign of zero results).
        h.weight_decay = if kind == OptimizerKind::AdamW {
            -0.0
        } else {
            1e-3
        };
    }
    h
}
