//! The CUDA backend: the hand-written PTX of `kernels/lra.ptx` run on the
//! caller's device pointers, on the caller's stream, in the device's
//! primary context. `step` never waits for the device: the per-step
//! scalars that depend on earlier steps (bias powers, applied-step count,
//! skip flags, φ, the scale) live in a device control block; `outcome`,
//! state export/import and `applied_steps` wait. Sharded steps with a
//! registered cross-rank sum wait too (the sum runs on the host).

pub mod abi;
mod driver;

use super::{le_value, Backend, StateImport, StateMeta, StepRequest, TensorDesc, ValidatedTensors};
use crate::controller::{SkipReason, StepOutcome};
use crate::error::{Error, Result, Status};
use crate::fail;
use crate::optim::{BiasPowers, OptimizerKind, StepScalars};
use abi::{Control, TensorEntry};
use driver::{CUdeviceptr, CUstream, Device, DeviceBuffer, Event, Staging, Stream};
use std::ffi::c_void;
use std::sync::Arc;

const CONTROL_BYTES: usize = std::mem::size_of::<Control>();

/// What the driver says of `ptr` (memory type, device, range, context,
/// mapped, access, mapping), for diagnostics: the GPU tests print it.
pub fn describe_pointer(ptr: u64) -> String {
    let ordinal = driver::pointer_info(ptr)
        .ok()
        .flatten()
        .map_or(0, |i| i.ordinal);
    match driver::mapped_memory_info(ptr, ordinal) {
        Ok(Some(info)) => format!("{info:?}"),
        Ok(None) => "not known to the driver".into(),
        Err(e) => e.to_string(),
    }
}

/// The kernel as the driver's JIT built it on device `ordinal`, for
/// diagnostics (the GPU tests check and print it): CI's `ptxas` proves no
/// spills only for its own compiler version.
#[derive(Debug)]
pub struct KernelReport {
    pub registers: i32,
    pub local_bytes: i32,
    pub static_shared_bytes: i32,
    /// Blocks of a launch: SMs × resident blocks per SM.
    pub max_grid: u32,
}

pub fn kernel_report(ordinal: i32) -> Result<KernelReport> {
    let dev = Device::get(ordinal)?;
    let (registers, local_bytes, static_shared_bytes) = dev.kernel_resources()?;
    Ok(KernelReport {
        registers,
        local_bytes,
        static_shared_bytes,
        max_grid: dev.max_grid,
    })
}

/// Creates the backend of a `device = 1` handle. `NoCuda` (with the reason)
/// when there is no driver, no device, or no such ordinal.
pub fn create(kind: OptimizerKind, ordinal: i32) -> Result<Box<dyn Backend>> {
    let dev = Device::get(ordinal)?;
    let _ctx = dev.enter()?;
    // The control block, then room for a copy of it (sharded steps).
    let control = DeviceBuffer::new(2 * CONTROL_BYTES)?;
    let reader = Stream::new()?;
    driver::write_now(control.ptr, abi::rows_bytes(&[Control::initial()]), &reader)?;
    Ok(Box::new(CudaBackend {
        kind,
        done: Event::new()?,
        reader,
        control,
        layout: None,
        staging: Staging::default(),
        state_piece: Vec::new(),
        uploaded: Vec::new(),
        validated: ValidatedTensors::default(),
        validated_flag: 0,
        step_checked: None,
        partial: false,
        broken: None,
        dev,
    }))
}

/// Buffers sized by the tensor layout (fixed by the first step).
struct Layout {
    numels: Vec<usize>,
    /// f32 element offset of each tensor's slot 0 in `state`.
    offsets: Vec<usize>,
    state: Option<DeviceBuffer>,
    chunks: DeviceBuffer,
    segments: DeviceBuffer,
    nchunks: u32,
    tensors: DeviceBuffer,
    partials: DeviceBuffer,
}

pub struct CudaBackend {
    kind: OptimizerKind,
    /// Recorded after every step on the step's stream.
    done: Event,
    /// The handle's own non-blocking stream for read-backs.
    reader: Stream,
    control: DeviceBuffer,
    layout: Option<Layout>,
    staging: Staging,
    /// Host staging for the optimizer state crossing to or from the host
    /// (checkpoints), up to [`STATE_PIECE`] values: taken by `state_meta`
    /// and `import_state` before anything is written, and kept, so that a
    /// save cannot run out of host memory half way through its output.
    state_piece: Vec<f32>,
    /// The tensor table as last uploaded.
    uploaded: Vec<TensorEntry>,
    validated: ValidatedTensors,
    /// The found_inf pointer last checked with the driver (0: none yet).
    validated_flag: u64,
    /// (found_inf, stream) `check_step` accepted for the coming step.
    step_checked: Option<(u64, *mut c_void)>,
    /// Set once the current step has enqueued a launch: a failure after
    /// that leaves the device state half-updated.
    partial: bool,
    /// Why this handle's device state can no longer be trusted (a step
    /// failed half way); every later call but an import fails with it.
    broken: Option<String>,
    // Last: the context must outlive every buffer above (drop order).
    dev: Arc<Device>,
}

// SAFETY: the raw driver handles inside are only used through `&mut self`
// (or `&self` for `validate`, which only reads the device and its cache
// behind a mutex), with the context pushed.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// `bytes` (> 0) at `p` must be device memory of this handle's device,
    /// all of it inside memory the driver has mapped, and (memory of the
    /// virtual memory management API) readable there, writable too with
    /// `write`.
    fn check_device_pointer(
        &self,
        what: impl std::fmt::Display,
        p: u64,
        bytes: usize,
        write: bool,
    ) -> Result<()> {
        let ordinal = self.dev.ordinal;
        let Some(info) = driver::pointer_info(p)? else {
            fail!(
                InvalidArgument,
                "{what} = {p:#x} is not CUDA memory (a host pointer?); a device = 1 handle takes device pointers of device {ordinal}"
            );
        };
        if !info.device_memory {
            fail!(
                InvalidArgument,
                "{what} = {p:#x} is host memory known to CUDA (pinned?), not device memory of device {ordinal}"
            );
        }
        if info.ordinal != ordinal {
            fail!(
                InvalidArgument,
                "{what} = {p:#x} is memory of device {}, this handle runs on device {ordinal}",
                info.ordinal
            );
        }
        let Some(end) = p.checked_add(bytes as u64) else {
            fail!(
                InvalidArgument,
                "{what} = {p:#x} + {bytes} bytes wraps around the address space"
            );
        };
        if !info.in_context {
            return self.check_mapped_extent(what, p, end, write);
        }
        // A context has its own address space on the device: lra's kernels,
        // in the primary context, would fault on another context's memory,
        // and the fault would be sticky in the primary context (every
        // framework of the process on it would fail from then on).
        if !self.dev.is_own_context(info.context) {
            fail!(
                InvalidArgument,
                "{what} = {p:#x} was allocated in another context ({:#x}) than the primary context of device {ordinal}, where lra runs; allocate it in the primary context (the CUDA runtime, PyTorch and CUDA.jl do)",
                info.context
            );
        }
        // cuMemAlloc memory: the range is the allocation, exactly. A driver
        // that does not say leaves the extent unchecked: refused, since a
        // kernel running past an allocation corrupts or faults the
        // primary context every framework of the process shares.
        if info.range_size == 0 {
            fail!(
                InvalidArgument,
                "{what} = {p:#x}: the driver reports no allocation range for it, so lra cannot check that {bytes} bytes fit; allocate it with cuMemAlloc (the CUDA runtime, PyTorch and CUDA.jl do)"
            );
        }
        if end > info.range_start.saturating_add(info.range_size) {
            fail!(
                InvalidArgument,
                "{what} = {p:#x} + {bytes} bytes runs past the end of its allocation ({:#x} + {} bytes)",
                info.range_start,
                info.range_size
            );
        }
        Ok(())
    }

    /// Memory without a context: mapped through the virtual memory
    /// management API (PyTorch's expandable segments) or from a
    /// stream-ordered pool (CUDA.jl's default). Its range attributes are
    /// not used: public reports disagree on whether they give the one
    /// physical mapping around the pointer or the whole reserved range,
    /// holes included. Every mapping, and its access rights, starts and
    /// ends on the device's granularity, so lra asks about each mapping the
    /// tensor touches (hopping a whole mapping at a time where the driver
    /// says where it ends, CUDA 11.7 and later; one granule otherwise):
    /// mapped, of this device, without a context, and accessible to it.
    fn check_mapped_extent(
        &self,
        what: impl std::fmt::Display,
        p: u64,
        end: u64,
        write: bool,
    ) -> Result<()> {
        const READ: u32 = 1;
        const READ_WRITE: u32 = 3;
        let ordinal = self.dev.ordinal;
        let bytes = end - p;
        let need = if write { READ_WRITE } else { READ };
        let granule = self.dev.vmm_granule;
        let mut at = p;
        loop {
            let info = driver::mapped_memory_info(at, ordinal)?;
            let usable = info.as_ref().is_some_and(|i| {
                i.device_memory && i.ordinal == ordinal && i.mapped && !i.in_context
            });
            if !usable {
                if at == p {
                    fail!(
                        InvalidArgument,
                        "{what} = {p:#x} is not mapped device memory (memory of the virtual memory management API whose physical memory was unmapped, or freed?)"
                    );
                }
                fail!(
                    InvalidArgument,
                    "{what} = {p:#x} + {bytes} bytes runs past its mapped memory: {at:#x} is not mapped device memory of device {ordinal}"
                );
            }
            let info = info.expect("usable");
            if let Some(access) = info.access.filter(|a| a & need != need) {
                fail!(
                    InvalidArgument,
                    "{what} = {p:#x} + {bytes} bytes: device {ordinal} may not {} the memory at {at:#x} (access flags {access}; cuMemSetAccess, or cuMemPoolSetAccess for pool memory, grants it)",
                    if write { "write" } else { "read" }
                );
            }
            // Strictly past `at` (saturating: `end` is at most u64::MAX).
            at = match info.mapping {
                Some((base, size)) if base <= at && at - base < size => base.saturating_add(size),
                _ => (at / granule).saturating_add(1).saturating_mul(granule),
            };
            if at >= end {
                return Ok(());
            }
        }
    }

    fn check_not_broken(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::new(Status::Cuda, why.clone())),
            None => Ok(()),
        }
    }

    /// The caller's stream must be of this device's primary context and not
    /// capturing a CUDA graph: a step waits on an event recorded outside
    /// any capture, reuses pinned upload buffers a replay would read again,
    /// and a sharded step waits for the device. Asked of the driver at
    /// every step, not cached by address: a destroyed stream's address may
    /// come back as a stream of another context.
    fn check_stream(&self, stream: CUstream) -> Result<()> {
        if !self.dev.owns_stream(stream)? {
            fail!(
                InvalidArgument,
                "stream {stream:p} belongs to another device or context; a device = 1 handle runs on the primary context of device {}",
                self.dev.ordinal
            );
        }
        match driver::capture_state(stream)? {
            driver::Capture::None => Ok(()),
            driver::Capture::Active => fail!(
                InvalidArgument,
                "stream {stream:p} is capturing a CUDA graph; lra_step cannot be captured (run it outside the graph)"
            ),
            driver::Capture::Implicit => fail!(
                InvalidArgument,
                "the legacy stream ({stream:p}) cannot be used while a blocking stream captures a CUDA graph; step on a non-blocking stream, or outside the capture"
            ),
        }
    }

    /// The layout of `tensors` (context entered). Checked here too, not
    /// only by the engine: a first step that failed after allocating left
    /// a layout the engine did not fix.
    fn layout_for(&mut self, tensors: &[TensorDesc], stream: CUstream) -> Result<()> {
        let same_sizes = self.layout.as_ref().is_some_and(|l| {
            l.numels.len() == tensors.len()
                && l.numels.iter().zip(tensors).all(|(&n, t)| n == t.numel)
        });
        if !same_sizes {
            let numels: Vec<usize> = tensors.iter().map(|t| t.numel).collect();
            self.ensure_layout(&numels, stream)?;
        }
        Ok(())
    }

    /// Allocates the state, tables and partials for this layout (first step
    /// or first import). State starts at zero.
    fn ensure_layout(&mut self, numels: &[usize], stream: CUstream) -> Result<()> {
        if let Some(l) = &self.layout {
            if l.numels == numels {
                return Ok(());
            }
            // The engine refuses a layout other than the one it fixed, so
            // this one is left by a first step that failed after
            // allocating (which fixes nothing, as on the CPU backend): free
            // it once the work queued with it is done.
            self.done.wait();
            self.layout = None;
            self.uploaded.clear();
        }
        let plan = abi::chunk_table(numels);
        // The kernel indexes tensors, segments and chunks (no more than
        // segments) with u32, and its loops step past the last index by up
        // to 16 blocks' worth: keep every count below that.
        let limit = (u32::MAX - 16 * abi::BLOCK) as usize;
        if plan.segments.len() > limit || numels.len() > limit {
            fail!(
                InvalidArgument,
                "too many elements or tensors for one handle (about 2^32 chunk segments or tensors)"
            );
        }
        // Every allocation first: a failed one then frees nothing that
        // queued work still uses.
        let (offsets, total) = abi::state_layout(numels, self.kind);
        let state = if total > 0 {
            Some(DeviceBuffer::new(total * 4)?)
        } else {
            None
        };
        let chunks = DeviceBuffer::new(std::mem::size_of_val(plan.chunks.as_slice()))?;
        let segments = DeviceBuffer::new(std::mem::size_of_val(plan.segments.as_slice()))?;
        let table_bytes = numels.len() * std::mem::size_of::<TensorEntry>();
        let tensors = DeviceBuffer::new(table_bytes)?;
        let partials = DeviceBuffer::new(plan.chunks.len() * 8)?;
        // Pinned buffers for the tables below, and for uploads of new
        // tensor tables while earlier ones are in flight (a framework that
        // reallocates gradients every step, the host a few steps ahead).
        self.staging.reserve(4, table_bytes)?;
        let mut enqueue = || -> Result<()> {
            if let Some(b) = &state {
                driver::set_words(b.ptr, 0, total, stream)?;
            }
            self.staging
                .upload(chunks.ptr, abi::rows_bytes(&plan.chunks), stream)?;
            self.staging
                .upload(segments.ptr, abi::rows_bytes(&plan.segments), stream)
        };
        if let Err(e) = enqueue() {
            // The buffers are freed on return: not before what was queued
            // on them has run.
            driver::sync_stream(stream);
            return Err(e);
        }
        let nchunks = plan.chunks.len() as u32;
        self.uploaded.clear();
        self.layout = Some(Layout {
            numels: numels.to_vec(),
            offsets,
            state,
            chunks,
            segments,
            nchunks,
            tensors,
            partials,
        });
        Ok(())
    }

    fn tensor_table(&self, tensors: &[TensorDesc]) -> Vec<TensorEntry> {
        let l = self.layout.as_ref().expect("layout allocated");
        let base = l.state.as_ref().map_or(0, |b| b.ptr);
        tensors
            .iter()
            .zip(&l.offsets)
            .map(|(t, &off)| {
                abi::tensor_entry(
                    self.kind,
                    (t.param as u64, t.grad as u64),
                    t.numel,
                    t.dtype,
                    base,
                    off,
                )
            })
            .collect()
    }

    /// Waits for the last step and reads the control block.
    fn read_control(&mut self) -> Result<Control> {
        driver::wait_event(self.reader.0, &self.done)?;
        let mut buf = [0u8; std::mem::size_of::<Control>()];
        driver::read(&mut buf, self.control.ptr, &self.reader)?;
        Ok(Control::from_bytes(&buf))
    }

    /// Runs the step's launches; on success the last one has been enqueued.
    /// `ctx` is the step's pushed context, popped around the caller's
    /// cross-rank sum.
    fn run_step(
        &mut self,
        req: StepRequest<'_>,
        stream: CUstream,
        ctx: &mut driver::Entered,
    ) -> Result<()> {
        self.layout_for(req.tensors, stream)?;
        let current = abi::table_is_current(
            &self.uploaded,
            req.tensors
                .iter()
                .map(|t| (t.param as u64, t.grad as u64, t.dtype)),
        );
        let l = self.layout.as_ref().expect("layout allocated");
        if !current {
            let table = self.tensor_table(req.tensors);
            // Unknown until the upload succeeds: a failure after its copy
            // was queued (its event not recorded) may still land the new
            // table, and a later step of the old list must upload again
            // rather than run on pointers the caller may have freed.
            self.uploaded.clear();
            self.staging
                .upload(l.tensors.ptr, abi::rows_bytes(&table), stream)?;
            self.uploaded = table;
        }
        let h = req.hyper;
        let mut args = abi::KernelArgs {
            tensors: l.tensors.ptr,
            chunks: l.chunks.ptr,
            segments: l.segments.ptr,
            nchunks: l.nchunks,
            control: self.control.ptr,
            partials: l.partials.ptr,
            found_inf: req.found_inf as u64,
            kind: self.kind,
            mode: 0,
            lr: req.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            rule: req.rule.unwrap_or(abi::NO_RULE),
            sc: StepScalars::new(self.kind, &h, BiasPowers::default()),
        };
        let nchunks = l.nchunks;
        let grid = abi::grid(nchunks, self.dev.max_grid);
        let two_pass = req.rule.is_some();
        let guard = req.check_finite;
        match req.reduce {
            Some(reduce) if two_pass || guard => {
                let (before, after) = abi::sharded_split(two_pass, guard);
                // The passes before the cross-rank sum write the control
                // block only (φ, the non-finite flag): kept, so that a
                // failed sum (an MPI error) leaves the last step's outcome
                // and nothing else changed.
                let backup = self.control.ptr + CONTROL_BYTES as u64;
                driver::copy_device(backup, self.control.ptr, CONTROL_BYTES, stream)?;
                let dev = self.dev.clone();
                let summed = self
                    .read_only_passes(&mut args, grid, before, req.found_inf, stream)
                    .and_then(|(c, found_inf)| {
                        // Every rank joins the sum, its own found_inf flag
                        // included (as the CPU backend does): the others
                        // wait for it. With the flag set the dot pass did
                        // no work: no partial φ.
                        let phi = if two_pass && !found_inf { c.phi } else { 0.0 };
                        let mut v = [c.nonfinite as f64, found_inf as u32 as f64, phi];
                        dev.outside(ctx, || reduce(&mut v))??;
                        Ok(v)
                    });
                let v = match summed {
                    Ok(v) => v,
                    Err(e) => {
                        // Without lra's context (pushing it again after the
                        // sum failed) the restore cannot run: the step then
                        // counts as partial, and the handle as broken.
                        if ctx.is_pushed()
                            && driver::copy_device(self.control.ptr, backup, CONTROL_BYTES, stream)
                                .is_ok()
                        {
                            self.partial = false;
                        }
                        return Err(e);
                    }
                };
                let flags = (v[0] != 0.0) as u32
                    | if v[1] != 0.0 {
                        abi::NONFINITE_FOUND_INF
                    } else {
                        0
                    };
                driver::set_words(self.control.ptr + abi::CONTROL_NONFINITE, flags, 1, stream)?;
                if two_pass {
                    let phi = v[2].to_bits();
                    driver::set_words(self.control.ptr + abi::CONTROL_PHI, phi as u32, 1, stream)?;
                    driver::set_words(
                        self.control.ptr + abi::CONTROL_PHI + 4,
                        (phi >> 32) as u32,
                        1,
                        stream,
                    )?;
                }
                for (m, final_only) in after {
                    args.mode = m;
                    args.nchunks = if final_only { 0 } else { nchunks };
                    self.launch(&args, abi::grid(args.nchunks, grid), stream)?;
                }
            }
            _ => {
                for m in abi::step_launches(two_pass, guard) {
                    args.mode = m;
                    self.launch(&args, grid, stream)?;
                }
            }
        }
        Ok(())
    }

    /// The read-only passes of a sharded step (`before`); waits for them
    /// and returns the control block and whether the found_inf flag is set.
    fn read_only_passes(
        &mut self,
        args: &mut abi::KernelArgs,
        grid: u32,
        before: Vec<u32>,
        found_inf: *const c_void,
        stream: CUstream,
    ) -> Result<(Control, bool)> {
        for m in before {
            args.mode = m;
            self.launch(args, grid, stream)?;
        }
        self.done.record(stream)?;
        let c = self.read_control()?;
        Ok((c, self.found_inf_set(found_inf)?))
    }

    fn found_inf_set(&self, found_inf: *const c_void) -> Result<bool> {
        if found_inf.is_null() {
            return Ok(false);
        }
        let mut v = [0u8; 4];
        driver::read(&mut v, found_inf as CUdeviceptr, &self.reader)?;
        Ok(f32::from_ne_bytes(v) != 0.0)
    }

    fn launch(&mut self, a: &abi::KernelArgs, grid: u32, stream: CUstream) -> Result<()> {
        let mut values = a.params();
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        // SAFETY: the parameters follow kernels/README.md; every address
        // is a live buffer of this handle or a validated caller pointer.
        unsafe { self.dev.launch(grid, stream, &mut params) }?;
        self.partial = true;
        Ok(())
    }
}

/// f32 values per host staging piece when the optimizer state crosses
/// between device and host (checkpoints): 4 MiB, not a copy of the whole.
pub const STATE_PIECE: usize = 1 << 20;

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 is plain data.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl Backend for CudaBackend {
    fn validate(&self, tensors: &[TensorDesc]) -> Result<()> {
        // Asking the driver about 400 pointers costs more than the step: a
        // list equal to the last accepted one is not asked again.
        self.validated.check_once(tensors, || {
            super::check_alignment_and_aliasing(tensors)?;
            let _ctx = self.dev.enter()?;
            for (i, t) in tensors.iter().enumerate() {
                if t.numel == 0 {
                    continue;
                }
                let bytes = t.numel * t.dtype.size();
                self.check_device_pointer(
                    format_args!("tensors[{i}].param"),
                    t.param as u64,
                    bytes,
                    true,
                )?;
                self.check_device_pointer(
                    format_args!("tensors[{i}].grad"),
                    t.grad as u64,
                    bytes,
                    false,
                )?;
            }
            Ok(())
        })
    }

    fn check_step(&mut self, found_inf: *const c_void, stream: *mut c_void) -> Result<()> {
        self.step_checked = None;
        self.check_not_broken()?;
        let _ctx = self.dev.enter()?;
        // The stream first: on a capturing stream only capture-safe queries.
        self.check_stream(stream as CUstream)?;
        let flag = found_inf as u64;
        if flag != 0 && flag != self.validated_flag {
            self.check_device_pointer("found_inf", flag, 4, false)?;
            self.validated_flag = flag;
        }
        self.step_checked = Some((flag, stream));
        Ok(())
    }

    fn prepare(&mut self, tensors: &[TensorDesc], stream: *mut c_void) -> Result<()> {
        self.check_not_broken()?;
        let _ctx = self.dev.enter()?;
        let stream = stream as CUstream;
        // Ordered like a step: after the previous one, and the next step
        // after what this queues (a new layout's state memset and tables),
        // whatever stream it comes on: the loss sum that follows may fail
        // and the retry come on another stream.
        driver::wait_event(stream, &self.done)?;
        self.layout_for(tensors, stream)?;
        if let Err(e) = self.done.record(stream) {
            // Not ordered by `done`: let the queued uploads finish here.
            driver::sync_stream(stream);
            return Err(e);
        }
        Ok(())
    }

    unsafe fn step(&mut self, req: StepRequest<'_>) -> Result<()> {
        // The engine has just checked these; callers of the backend that
        // skip the engine (tests) get the check here.
        if self.step_checked.take() != Some((req.found_inf as u64, req.stream)) {
            self.check_step(req.found_inf, req.stream)?;
            self.step_checked = None;
        }
        let mut ctx = self.dev.enter()?;
        let stream = req.stream as CUstream;
        // Our buffers are ordered after the previous step whatever stream
        // it ran on (frameworks switch streams): a device-side wait only.
        driver::wait_event(stream, &self.done)?;
        self.partial = false;
        // The step's own error first: a failed record only follows from it.
        let r = self.run_step(req, stream, &mut ctx);
        let r = r.and_then(|()| self.done.record(stream));
        let r = match r {
            Err(e) if self.partial => {
                // Launches ran (or may run) that the engine will not count,
                // or the next step cannot be ordered after them.
                self.broken = Some(format!(
                    "a step failed after part of it was enqueued ({e}); this handle's optimizer state may be half-updated: load a checkpoint (lra_load_state) or destroy the handle"
                ));
                // Not a retryable LRA_OUT_OF_MEMORY: something changed.
                Err(Error::new(Status::Cuda, e.message))
            }
            r => r,
        };
        if r.is_err() {
            // Order what was enqueued before whatever comes next.
            let _ = self.done.record(stream);
        }
        r
    }

    fn outcome(&mut self) -> Result<StepOutcome> {
        self.check_not_broken()?;
        let _ctx = self.dev.enter()?;
        let c = self.read_control()?;
        let Some(skip) = SkipReason::from_u32(c.skip) else {
            fail!(
                Cuda,
                "the device's control block holds skip code {}, which lra never writes (device memory corrupted?)",
                c.skip
            );
        };
        Ok(StepOutcome {
            skip,
            phi: c.phi,
            scale: c.scale,
        })
    }

    fn state_meta(&mut self) -> Result<StateMeta> {
        self.check_not_broken()?;
        let _ctx = self.dev.enter()?;
        let c = self.read_control()?;
        let slots = self.kind.state_slots();
        let (lens, largest) = match &self.layout {
            Some(l) if l.state.is_some() => (
                l.numels.iter().map(|&n| n * slots).collect(),
                l.numels.iter().copied().max().unwrap_or(0),
            ),
            Some(l) => (vec![0; l.numels.len()], 0),
            None => (Vec::new(), 0),
        };
        // The staging `export_slots` reads through, before a checkpoint
        // writes its first byte.
        self.ensure_state_piece(if slots > 0 { largest } else { 0 })?;
        Ok(StateMeta {
            bias: BiasPowers {
                pow1: c.pow1,
                pow2: c.pow2,
            },
            applied: c.applied,
            lens,
        })
    }

    fn export_slots(&mut self, tensor: usize, sink: &mut dyn FnMut(&[f32])) -> Result<()> {
        self.check_not_broken()?;
        let _ctx = self.dev.enter()?;
        // After the last step (the reads below are on the reader stream).
        driver::wait_event(self.reader.0, &self.done)?;
        let slots = self.kind.state_slots();
        // Already there after `state_meta`, as in a checkpoint.
        let numel = self.layout.as_ref().and_then(|l| l.numels.get(tensor));
        self.ensure_state_piece(numel.copied().unwrap_or(0))?;
        let Some(l) = &self.layout else {
            return Ok(());
        };
        let (Some(state), Some(&n), Some(&off)) =
            (&l.state, l.numels.get(tensor), l.offsets.get(tensor))
        else {
            return Ok(());
        };
        let piece = &mut self.state_piece;
        for s in 0..slots {
            let base = state.ptr + 4 * (off + s * abi::slot_stride(n)) as u64;
            for start in (0..n).step_by(STATE_PIECE) {
                let values = &mut piece[..STATE_PIECE.min(n - start)];
                // SAFETY: f32 is plain data.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(
                        values.as_mut_ptr() as *mut u8,
                        std::mem::size_of_val(values),
                    )
                };
                driver::read(bytes, base + 4 * start as u64, &self.reader)?;
                sink(values);
            }
        }
        Ok(())
    }

    fn import_state(&mut self, state: &StateImport<'_>) -> Result<()> {
        let _ctx = self.dev.enter()?;
        self.read_control()?;
        let slots = self.kind.state_slots();
        if slots > 0 {
            if let Some(b) = state.slots.iter().find(|b| b.len() % (4 * slots) != 0) {
                fail!(
                    BadCheckpoint,
                    "state of {} bytes is not {slots} f32 slots of one tensor",
                    b.len()
                );
            }
            let numels: Vec<usize> = state.slots.iter().map(|b| b.len() / (4 * slots)).collect();
            // Before anything changes: the staging the writes go through.
            self.ensure_state_piece(numels.iter().copied().max().unwrap_or(0))?;
            self.ensure_layout(&numels, self.reader.0)?;
        }
        let r = self.write_state(state);
        if let Err(e) = &r {
            self.broken = Some(format!(
                "a checkpoint import failed half way ({e}); load a checkpoint (lra_load_state) or destroy the handle"
            ));
        }
        r
    }

    fn applied_steps(&mut self) -> Result<u64> {
        self.check_not_broken()?;
        let _ctx = self.dev.enter()?;
        Ok(self.read_control()?.applied)
    }
}

impl CudaBackend {
    /// Host staging for tensors of up to `numel` elements (in pieces of
    /// [`STATE_PIECE`]), before a checkpoint's save or load changes
    /// anything; `OutOfMemory` when it cannot be had.
    fn ensure_state_piece(&mut self, numel: usize) -> Result<()> {
        let len = numel.min(STATE_PIECE);
        if self.state_piece.len() < len {
            let mut v = Vec::new();
            if v.try_reserve_exact(len).is_err() {
                fail!(
                    OutOfMemory,
                    "cannot allocate {} bytes of host staging for the optimizer state: out of memory",
                    4 * len
                );
            }
            v.resize(len, 0.0);
            self.state_piece = v;
        }
        Ok(())
    }

    /// Writes an imported state and control block (context entered, last
    /// step done, layout allocated, `state_piece` as large as the largest
    /// tensor or [`STATE_PIECE`]).
    fn write_state(&mut self, state: &StateImport<'_>) -> Result<()> {
        let slots = self.kind.state_slots();
        let piece = &mut self.state_piece;
        if let Some(l) = &self.layout {
            for ((bytes, &n), &off) in state.slots.iter().zip(&l.numels).zip(&l.offsets) {
                if let Some(buf) = &l.state {
                    for s in 0..slots {
                        let base = buf.ptr + 4 * (off + s * abi::slot_stride(n)) as u64;
                        for start in (0..n).step_by(STATE_PIECE) {
                            let values = &mut piece[..STATE_PIECE.min(n - start)];
                            for (j, v) in values.iter_mut().enumerate() {
                                *v = le_value(bytes, s * n + start + j);
                            }
                            let dst = base + 4 * start as u64;
                            driver::write_now(dst, f32_bytes(values), &self.reader)?;
                        }
                    }
                }
            }
        }
        let c = Control {
            pow1: state.bias.pow1,
            pow2: state.bias.pow2,
            applied: state.applied,
            ..Control::initial()
        };
        driver::write_now(self.control.ptr, abi::rows_bytes(&[c]), &self.reader)?;
        // The whole state and control block were just rewritten.
        self.broken = None;
        // Later steps on any stream must see the import.
        self.done.record(self.reader.0)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Free everything with the context current, once the last step's
        // kernels (which may still use these buffers) are done.
        let Ok(_ctx) = self.dev.enter() else {
            // The driver is gone (process teardown): freeing without the
            // context would fail and could touch memory still in use.
            // Leave it all to the process's end.
            std::mem::forget(self.layout.take());
            std::mem::forget(std::mem::take(&mut self.staging));
            std::mem::forget(std::mem::replace(&mut self.control, DeviceBuffer::none()));
            std::mem::forget(std::mem::replace(
                &mut self.reader,
                Stream(std::ptr::null_mut()),
            ));
            std::mem::forget(std::mem::replace(
                &mut self.done,
                Event(std::ptr::null_mut()),
            ));
            return;
        };
        self.done.wait();
        self.layout = None;
        self.staging = Staging::default();
        drop(std::mem::replace(&mut self.control, DeviceBuffer::none()));
        drop(std::mem::replace(
            &mut self.reader,
            Stream(std::ptr::null_mut()),
        ));
        drop(std::mem::replace(
            &mut self.done,
            Event(std::ptr::null_mut()),
        ));
    }
}
