//! The few CUDA driver calls the backend makes, through cudarc's
//! dynamically loaded `sys` bindings: errors become [`Error`]s, a missing
//! driver becomes `NoCuda` (never a panic), and every call runs with the
//! device's primary context pushed and the thread relaxed about graph
//! captures (both given back after), so the caller's current context and
//! capture mode are left as they were.

use super::abi;
use crate::error::{Error, Result, Status};
use cudarc::driver::sys;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

pub use sys::{CUdeviceptr, CUevent, CUstream};

/// `Err(Cuda)` naming the failed call and the driver's error name.
pub fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or fails.
    let named = unsafe { sys::cuGetErrorName(r, &mut name) } == sys::CUresult::CUDA_SUCCESS;
    let name = if named && !name.is_null() {
        // SAFETY: a NUL-terminated static string owned by the driver.
        unsafe { std::ffi::CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{r:?}")
    };
    // Out of memory is the one failure a caller can act on (free memory and
    // retry), so it gets its own status, as frameworks give it its own error.
    let status = if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Status::OutOfMemory
    } else {
        Status::Cuda
    };
    Err(Error::new(status, format!("{what} failed: {name}")))
}

/// Loads libcuda and runs `cuInit` once per process. `NoCuda` when the
/// library is missing, fails to initialise, or has no device.
pub fn init() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let r = INIT.get_or_init(|| {
        // cudarc panics when the library is absent: look first, and catch
        // any panic from a library that loads but lacks a symbol.
        let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() });
        if !matches!(present, Ok(true)) {
            return Err("the CUDA driver library (libcuda.so) was not found".into());
        }
        let init_and_version = || unsafe {
            let r = sys::cuInit(0);
            let mut version = 0;
            if r == sys::CUresult::CUDA_SUCCESS {
                check(sys::cuDriverGetVersion(&mut version), "cuDriverGetVersion")
                    .map_err(|e| e.message)?;
            }
            Ok::<_, String>((r, version))
        };
        match std::panic::catch_unwind(init_and_version) {
            Ok(Err(m)) => Err(m),
            // Entry points lra calls came later (cuDevicePrimaryCtxRelease_v2
            // in 11.0, and the kernels' PTX ISA 7.0): a loader that does not
            // find one panics, so an older driver is refused before any.
            Ok(Ok((sys::CUresult::CUDA_SUCCESS, v))) if v < 11000 => Err(format!(
                "the CUDA driver supports CUDA {}.{}, lra needs 11.0 or newer: update the NVIDIA driver",
                v / 1000,
                v % 1000 / 10
            )),
            Ok(Ok((sys::CUresult::CUDA_SUCCESS, _))) => Ok(()),
            // cudarc opens `libcuda.so` before `libcuda.so.1`: a toolkit's
            // stubs directory on the library path wins over the driver.
            Ok(Ok((sys::CUresult::CUDA_ERROR_STUB_LIBRARY, _))) => Err(
                "cuInit failed: CUDA_ERROR_STUB_LIBRARY (the CUDA toolkit's stub libcuda.so was loaded instead of the driver's; remove the toolkit's lib64/stubs directory from LD_LIBRARY_PATH)"
                    .into(),
            ),
            Ok(Ok((e, _))) => Err(format!("cuInit failed: {e:?} (no usable GPU or driver)")),
            Err(_) => Err("the CUDA driver library could not be used (missing symbols)".into()),
        }
    });
    r.clone().map_err(|m| Error::new(Status::NoCuda, m))
}

/// Number of CUDA devices (after [`init`]).
pub fn device_count() -> Result<i32> {
    init()?;
    let mut n = 0;
    // SAFETY: plain out-parameter.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n)
}

/// One device's primary context with the kernels loaded: created once per
/// device and kept for the process lifetime (the module is "loaded once
/// per context").
pub struct Device {
    pub ordinal: i32,
    ctx: sys::CUcontext,
    func: sys::CUfunction,
    /// Blocks that keep every SM busy: SMs × resident blocks per SM.
    pub max_grid: u32,
    /// The virtual memory management API's minimum granularity here:
    /// every mapping, and its access rights, starts and ends on a multiple
    /// of it.
    pub vmm_granule: u64,
}

// SAFETY: driver handles may be used from any thread once a context is
// current; every use pushes the context first.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

/// Sets the calling thread's stream-capture interaction mode; returns the
/// one it had.
fn exchange_capture_mode(mode: sys::CUstreamCaptureMode) -> Result<sys::CUstreamCaptureMode> {
    let mut mode = mode;
    // SAFETY: in/out-parameter.
    check(
        unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) },
        "cuThreadExchangeStreamCaptureMode",
    )?;
    Ok(mode)
}

/// lra's time on a thread: the device's primary context pushed, and the
/// thread's stream-capture interaction mode RELAXED. In the default
/// (global) mode the driver refuses lra's allocations, event queries and
/// waits while any other thread captures a CUDA graph, and the refused
/// call invalidates that thread's capture; lra's own streams and events
/// are never captured, so relaxed mode is what its calls need. Dropping it
/// gives the thread back its mode and pops the context (unless
/// [`Device::outside`] left it popped).
pub struct Entered {
    pushed: bool,
    /// The thread's mode before lra's (None while it is the thread's own).
    caller_mode: Option<sys::CUstreamCaptureMode>,
}

impl Entered {
    /// Pushes `ctx` (retained by the caller) and makes the thread relaxed.
    fn push(ctx: sys::CUcontext) -> Result<Entered> {
        // SAFETY: a retained context; popped by the guard.
        check(unsafe { sys::cuCtxPushCurrent_v2(ctx) }, "cuCtxPushCurrent")?;
        let mut entered = Entered {
            pushed: true,
            caller_mode: None,
        };
        entered.caller_mode = Some(exchange_capture_mode(RELAXED)?);
        Ok(entered)
    }

    /// Whether the context is pushed (false after [`Device::outside`]
    /// failed to push it again).
    pub fn is_pushed(&self) -> bool {
        self.pushed
    }
}

const RELAXED: sys::CUstreamCaptureMode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;

impl Drop for Entered {
    fn drop(&mut self) {
        if let Some(mode) = self.caller_mode.take() {
            let _ = exchange_capture_mode(mode);
        }
        if !self.pushed {
            return;
        }
        let mut old: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: balances the push in `enter` (or `outside`).
        unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
    }
}

impl Device {
    /// The device `ordinal`, its primary context retained and the module
    /// loaded on first use.
    pub fn get(ordinal: i32) -> Result<Arc<Device>> {
        static DEVICES: Mutex<Vec<Arc<Device>>> = Mutex::new(Vec::new());
        let count = device_count()?;
        // Negative too: cuDeviceGet would fail with INVALID_DEVICE, a
        // driver error (LRA_CUDA_ERROR) for what is "no such device".
        if ordinal < 0 || ordinal >= count {
            return Err(Error::new(
                Status::NoCuda,
                format!(
                    "device_ordinal = {ordinal}, but the driver reports {count} CUDA device(s)"
                ),
            ));
        }
        let mut list = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = list.iter().find(|d| d.ordinal == ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(Device::load(ordinal)?);
        list.push(d.clone());
        Ok(d)
    }

    fn load(ordinal: i32) -> Result<Device> {
        // SAFETY: out-parameters; the context is pushed before use.
        unsafe {
            let mut dev = 0;
            check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            let mut ctx = std::ptr::null_mut();
            check(
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            let loaded = Device::load_in(ordinal, dev, ctx);
            if loaded.is_err() {
                // A later lra_create retries from scratch: give the retain back.
                sys::cuDevicePrimaryCtxRelease_v2(dev);
            }
            loaded
        }
    }

    /// Loads the kernels into `ctx`, which the caller has retained.
    fn load_in(ordinal: i32, dev: sys::CUdevice, ctx: sys::CUcontext) -> Result<Device> {
        // SAFETY (whole body): out-parameters; `ctx` is retained and pushed.
        unsafe {
            let _pop = Entered::push(ctx)?;
            let mut sms = 0;
            check(
                sys::cuDeviceGetAttribute(
                    &mut sms,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                    dev,
                ),
                "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)",
            )?;
            let text = CString::new(abi::PTX).expect("the PTX has no NUL byte");
            let mut module = std::ptr::null_mut();
            // The JIT's error log goes into the message if it fails.
            let mut log = vec![0u8; 4096];
            let mut opts = [
                sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
                sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            ];
            let mut vals = [log.as_mut_ptr() as *mut c_void, log.len() as *mut c_void];
            let r = sys::cuModuleLoadDataEx(
                &mut module,
                text.as_ptr() as *const c_void,
                opts.len() as u32,
                opts.as_mut_ptr(),
                vals.as_mut_ptr(),
            );
            if let Err(mut e) = check(r, "cuModuleLoadDataEx (JIT of kernels/lra.ptx)") {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                e.message += &format!(": {}", String::from_utf8_lossy(&log[..end]).trim());
                if r == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                    e.message +=
                        " (the driver is older than the kernels' PTX: update the NVIDIA driver)";
                }
                return Err(e);
            }
            // Any failure from here on gives the module back.
            let func_and_occupancy = || -> Result<(sys::CUfunction, i32)> {
                let mut func = std::ptr::null_mut();
                let name = CString::new(abi::ENTRY).unwrap();
                check(
                    sys::cuModuleGetFunction(&mut func, module, name.as_ptr()),
                    "cuModuleGetFunction(lra_pass)",
                )?;
                let mut per_sm = 0;
                check(
                    sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        &mut per_sm,
                        func,
                        abi::BLOCK as i32,
                        0,
                    ),
                    "cuOccupancyMaxActiveBlocksPerMultiprocessor",
                )?;
                Ok((func, per_sm))
            };
            let (func, per_sm) = match func_and_occupancy() {
                Ok(v) => v,
                Err(e) => {
                    sys::cuModuleUnload(module);
                    return Err(e);
                }
            };
            Ok(Device {
                ordinal,
                ctx,
                func,
                max_grid: (sms.max(1) * per_sm.max(1)) as u32,
                // 64 KiB without an answer: smaller than any granularity
                // seen, so the walk cannot step over a mapping.
                vmm_granule: vmm_granularity(ordinal).unwrap_or(64 << 10),
            })
        }
    }

    /// What the driver's JIT made of the kernel: (registers per thread,
    /// local memory per thread in bytes, static shared memory per block in
    /// bytes).
    pub fn kernel_resources(&self) -> Result<(i32, i32, i32)> {
        use sys::CUfunction_attribute as A;
        let _ctx = self.enter()?;
        let attribute = |a: A, name: &str| -> Result<i32> {
            let mut v = 0;
            // SAFETY: out-parameter; the loaded function.
            check(
                unsafe { sys::cuFuncGetAttribute(&mut v, a, self.func) },
                name,
            )?;
            Ok(v)
        };
        Ok((
            attribute(
                A::CU_FUNC_ATTRIBUTE_NUM_REGS,
                "cuFuncGetAttribute(NUM_REGS)",
            )?,
            attribute(
                A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
                "cuFuncGetAttribute(LOCAL_SIZE_BYTES)",
            )?,
            attribute(
                A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                "cuFuncGetAttribute(SHARED_SIZE_BYTES)",
            )?,
        ))
    }

    /// Whether `context` (a pointer's `CU_POINTER_ATTRIBUTE_CONTEXT`) is
    /// this device's primary context, the one lra's kernels run in.
    pub fn is_own_context(&self, context: u64) -> bool {
        context == self.ctx as u64
    }

    /// Whether `stream` belongs to this device's primary context. The
    /// special handles (NULL, legacy, per-thread) always belong to the
    /// current context, which `enter` made this one.
    pub fn owns_stream(&self, stream: CUstream) -> Result<bool> {
        if (stream as usize) <= 2 {
            return Ok(true);
        }
        let mut ctx = std::ptr::null_mut();
        // SAFETY: out-parameter; the stream is the caller's.
        check(
            unsafe { sys::cuStreamGetCtx(stream, &mut ctx) },
            "cuStreamGetCtx",
        )?;
        Ok(ctx == self.ctx)
    }

    /// Makes the primary context current, and the thread relaxed about
    /// graph captures, until the guard drops (see [`Entered`]).
    pub fn enter(&self) -> Result<Entered> {
        Entered::push(self.ctx)
    }

    /// Runs `f`, the caller's code (the cross-rank sum), with the context
    /// `entered` pushed popped again and the thread's own capture mode,
    /// then takes both back. `f` sees the thread as the caller left it,
    /// and so does whatever runs on the thread while `f` waits (another
    /// task of a cooperative scheduler, such as Julia's): no lra context for
    /// it to find, or to replace under lra's launches.
    pub fn outside<T>(&self, entered: &mut Entered, f: impl FnOnce() -> T) -> Result<T> {
        if let Some(mode) = entered.caller_mode {
            exchange_capture_mode(mode)?;
            entered.caller_mode = None;
        }
        let mut top: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the push `entered` holds; out-parameter.
        check(
            unsafe { sys::cuCtxPopCurrent_v2(&mut top) },
            "cuCtxPopCurrent",
        )?;
        entered.pushed = false;
        debug_assert_eq!(top, self.ctx, "lra's context was on top of the stack");
        let r = f();
        // SAFETY: a retained context; popped by `entered`.
        check(
            unsafe { sys::cuCtxPushCurrent_v2(self.ctx) },
            "cuCtxPushCurrent",
        )?;
        entered.pushed = true;
        entered.caller_mode = Some(exchange_capture_mode(RELAXED)?);
        Ok(r)
    }

    /// Launches `lra_pass` with `grid` blocks on `stream`.
    /// # Safety
    /// `params` must point at values laid out as the kernel's parameters,
    /// and the device addresses inside them must be valid for the launch.
    pub unsafe fn launch(
        &self,
        grid: u32,
        stream: CUstream,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        check(
            sys::cuLaunchKernel(
                self.func,
                grid,
                1,
                1,
                abi::BLOCK,
                1,
                1,
                0,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            ),
            "cuLaunchKernel(lra_pass)",
        )
    }
}

/// Device memory owned by a handle (freed on drop, context current).
pub struct DeviceBuffer {
    pub ptr: CUdeviceptr,
}

impl DeviceBuffer {
    pub fn new(bytes: usize) -> Result<DeviceBuffer> {
        let mut ptr = 0;
        // SAFETY: out-parameter; at least 16 bytes so the address is valid.
        check(
            unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(16)) },
            "cuMemAlloc",
        )?;
        Ok(DeviceBuffer { ptr })
    }
}

impl DeviceBuffer {
    /// An empty placeholder (nothing to free), for dropping the real one
    /// while the context is current.
    pub fn none() -> DeviceBuffer {
        DeviceBuffer { ptr: 0 }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by cuMemAlloc; the owner synchronised first.
            unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// A CUDA event without timing.
pub struct Event(pub CUevent);

impl Event {
    pub fn new() -> Result<Event> {
        let mut e = std::ptr::null_mut();
        // SAFETY: out-parameter. 2 = CU_EVENT_DISABLE_TIMING.
        check(unsafe { sys::cuEventCreate(&mut e, 2) }, "cuEventCreate")?;
        Ok(Event(e))
    }
    pub fn record(&self, stream: CUstream) -> Result<()> {
        // SAFETY: a live event; the stream is the caller's (or ours).
        check(
            unsafe { sys::cuEventRecord(self.0, stream) },
            "cuEventRecord",
        )
    }
    /// Waits for everything recorded before.
    pub fn wait(&self) {
        // SAFETY: a live event.
        unsafe { sys::cuEventSynchronize(self.0) };
    }
    /// Whether everything recorded before has finished (never waits). An
    /// error (e.g. queried during another thread's graph capture) is an
    /// error, not "still busy".
    pub fn is_done(&self) -> Result<bool> {
        // SAFETY: a live event.
        match unsafe { sys::cuEventQuery(self.0) } {
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => check(r, "cuEventQuery").map(|()| true),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cuEventCreate.
            unsafe { sys::cuEventDestroy_v2(self.0) };
        }
    }
}

/// A non-blocking stream of the handle's own, for read-backs that must not
/// wait for the caller's later work.
pub struct Stream(pub CUstream);

impl Stream {
    pub fn new() -> Result<Stream> {
        let mut s = std::ptr::null_mut();
        // SAFETY: out-parameter. 1 = CU_STREAM_NON_BLOCKING.
        check(unsafe { sys::cuStreamCreate(&mut s, 1) }, "cuStreamCreate")?;
        Ok(Stream(s))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by cuStreamCreate.
            unsafe { sys::cuStreamDestroy_v2(self.0) };
        }
    }
}

/// Makes `stream` wait (on the device) for `event`.
pub fn wait_event(stream: CUstream, event: &Event) -> Result<()> {
    // SAFETY: live handles.
    check(
        unsafe { sys::cuStreamWaitEvent(stream, event.0, 0) },
        "cuStreamWaitEvent",
    )
}

/// Copies `dst.len()` bytes from the device into host memory on `stream`
/// and waits for that stream (only).
pub fn read(dst: &mut [u8], src: CUdeviceptr, stream: &Stream) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: `src` holds at least `dst.len()` bytes (the caller's buffer).
    unsafe {
        check(
            sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len(), stream.0),
            "cuMemcpyDtoHAsync",
        )?;
        check(sys::cuStreamSynchronize(stream.0), "cuStreamSynchronize")
    }
}

/// Copies host bytes to the device on `stream` and waits for that stream.
pub fn write_now(dst: CUdeviceptr, src: &[u8], stream: &Stream) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: `dst` holds at least `src.len()` bytes.
    unsafe {
        check(
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, src.len(), stream.0),
            "cuMemcpyHtoDAsync",
        )?;
        check(sys::cuStreamSynchronize(stream.0), "cuStreamSynchronize")
    }
}

/// Copies `bytes` bytes between device buffers, ordered on `stream`.
pub fn copy_device(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> Result<()> {
    // SAFETY: both buffers hold `bytes` bytes (the caller's buffers).
    check(
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream) },
        "cuMemcpyDtoDAsync",
    )
}

/// Whether work may be enqueued on `stream` with respect to CUDA graph
/// captures.
#[derive(Debug, PartialEq, Eq)]
pub enum Capture {
    None,
    /// The stream is capturing (or its capture was invalidated).
    Active,
    /// The legacy stream, unusable while a blocking stream of its context
    /// captures (the driver's CUDA_ERROR_STREAM_CAPTURE_IMPLICIT).
    Implicit,
}

/// The capture state of `stream`.
pub fn capture_state(stream: CUstream) -> Result<Capture> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: out-parameter; the stream is the caller's.
    match unsafe { sys::cuStreamIsCapturing(stream, &mut status) } {
        sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT => Ok(Capture::Implicit),
        r => {
            check(r, "cuStreamIsCapturing")?;
            Ok(match status {
                sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => Capture::None,
                _ => Capture::Active,
            })
        }
    }
}

/// Waits for everything queued on `stream` (best effort: on an error path).
pub fn sync_stream(stream: CUstream) {
    // SAFETY: the stream is live (the caller's or ours).
    unsafe { sys::cuStreamSynchronize(stream) };
}

/// Sets `count` u32 words at `dst` to `value`, ordered on `stream`.
pub fn set_words(dst: CUdeviceptr, value: u32, count: usize, stream: CUstream) -> Result<()> {
    // SAFETY: `dst` holds `count` words (the caller's buffer).
    check(
        unsafe { sys::cuMemsetD32Async(dst, value, count, stream) },
        "cuMemsetD32Async",
    )
}

/// Pinned host buffers for uploads that must not wait: a buffer is reused
/// only once the copy that read it has finished, otherwise a new one is
/// allocated, so `upload` never blocks.
#[derive(Default)]
pub struct Staging {
    slots: Vec<(*mut u8, usize, Event)>,
}

// SAFETY: the pinned pointers are owned by this value alone.
unsafe impl Send for Staging {}

impl Staging {
    /// Enqueues a copy of `src` to `dst` on `stream`.
    pub fn upload(&mut self, dst: CUdeviceptr, src: &[u8], stream: CUstream) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let mut free = None;
        for (i, (_, cap, ev)) in self.slots.iter().enumerate() {
            if *cap >= src.len() && ev.is_done()? {
                free = Some(i);
                break;
            }
        }
        let i = match free {
            Some(i) => i,
            None => {
                // One more slot that fits: slots too small for `src` do
                // not count (counting them would allocate one new slot for
                // each of them too).
                let fitting = self.slots.iter().filter(|s| s.1 >= src.len()).count();
                self.reserve(fitting + 1, src.len())?;
                self.slots.len() - 1
            }
        };
        let (p, _, ev) = &self.slots[i];
        // SAFETY: the slot holds `cap >= src.len()` bytes and no copy reads
        // it any more; `dst` holds `src.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), *p, src.len());
            check(
                sys::cuMemcpyHtoDAsync_v2(dst, *p as *const c_void, src.len(), stream),
                "cuMemcpyHtoDAsync",
            )?;
        }
        if let Err(e) = ev.record(stream) {
            // The copy may still read the slot, and its event no longer
            // says when it is done: never reuse or free it (a few KiB
            // lost, after a driver error only).
            self.slots.swap_remove(i);
            return Err(e);
        }
        Ok(())
    }

    /// Keeps at least `count` buffers of `bytes` bytes ready, so that
    /// uploads while earlier ones are in flight (the host running ahead of
    /// the device, pointers changing every step) do not allocate pinned
    /// memory, which may synchronise the device.
    pub fn reserve(&mut self, count: usize, bytes: usize) -> Result<()> {
        let cap = bytes.next_power_of_two().max(4096);
        while self.slots.iter().filter(|s| s.1 >= bytes).count() < count {
            // The event first: a failed cuEventCreate then leaks no pinned
            // buffer.
            let done = Event::new()?;
            let mut p = std::ptr::null_mut();
            // SAFETY: out-parameter.
            check(
                unsafe { sys::cuMemAllocHost_v2(&mut p, cap) },
                "cuMemAllocHost",
            )?;
            self.slots.push((p as *mut u8, cap, done));
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for (p, _, ev) in self.slots.drain(..) {
            // SAFETY: the owner synchronised; allocated by cuMemAllocHost.
            unsafe {
                sys::cuEventSynchronize(ev.0);
                sys::cuMemFreeHost(p as *mut c_void);
            }
        }
    }
}

/// What the driver says about a pointer the caller handed in.
#[derive(Debug)]
pub struct PointerInfo {
    pub device_memory: bool,
    pub ordinal: i32,
    pub range_start: u64,
    pub range_size: u64,
    /// Allocated in a context (`cuMemAlloc`/`cudaMalloc`, whose range is
    /// exactly the allocation). Memory mapped through the virtual memory
    /// management API and stream-ordered pool memory have no context.
    pub in_context: bool,
    /// That context (`CU_POINTER_ATTRIBUTE_CONTEXT`; 0: none).
    pub context: u64,
    /// `CU_POINTER_ATTRIBUTE_MAPPED`: backed by physical memory.
    pub mapped: bool,
    /// `CU_POINTER_ATTRIBUTE_ACCESS_FLAGS`: what the current context's
    /// device may do there (0 nothing, 1 read, 3 read and write; a new
    /// mapping starts with nothing; pool memory: the pool's access,
    /// `cuMemPoolGetAccess`). Only from [`mapped_memory_info`], and `None`
    /// from a driver older than CUDA 11.2.
    pub access: Option<u32>,
    /// `CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE`: the stream-ordered pool the
    /// memory comes from (0: none, or not asked).
    pub pool: u64,
    /// `CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR`/`MAPPING_SIZE`: the one
    /// physical mapping around the pointer (CUDA 11.7 and later).
    pub mapping: Option<(u64, u64)>,
}

/// Asks the driver about `ptr`; `None` when the driver does not know it
/// (a plain host pointer). The query succeeds for pointers the driver does
/// not know (their attributes read as zero), so a failure is the driver's
/// own (`LRA_CUDA_ERROR`), not a verdict on the pointer.
pub fn pointer_info(ptr: u64) -> Result<Option<PointerInfo>> {
    query_pointer(ptr, 0)
}

/// [`pointer_info`] with the access rights of device `ordinal` and the
/// mapping around `ptr`, for memory without a context, where the driver
/// knows them. A failure is the driver's, as for [`pointer_info`]: which
/// attributes to ask for comes from the driver's version, never from one
/// pointer's answer.
pub fn mapped_memory_info(ptr: u64, ordinal: i32) -> Result<Option<PointerInfo>> {
    let mut asked = newer_attributes();
    let mut answer = query_pointer(ptr, asked);
    let mut refused = None;
    // Refused (nothing documents the newer attributes for pool memory):
    // again without the mapping attributes (the walk then goes by
    // granules), then with MEMPOOL_HANDLE alone (a pool's access is asked
    // of the pool below), then with the plain ones: 4, 2, 1, 0.
    while asked > 0 {
        match answer {
            Err(e) => {
                refused.get_or_insert(e);
            }
            Ok(_) => break,
        }
        asked /= 2;
        answer = query_pointer(ptr, asked);
    }
    let mut info = answer?;
    // Pool memory: its access is the pool's (documented: accessible from
    // its own device unless changed), asked as NVIDIA's CCCL asks it,
    // rather than ACCESS_FLAGS, whose answer for pools nothing documents.
    if let Some(i) = info.as_mut().filter(|i| i.pool != 0) {
        let mut location = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal,
        };
        let mut flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_NONE;
        // SAFETY: out-parameter; a pool handle the driver just gave.
        let r = unsafe {
            sys::cuMemPoolGetAccess(&mut flags, i.pool as sys::CUmemoryPool, &mut location)
        };
        check(r, "cuMemPoolGetAccess")?;
        i.access = Some(flags as u32);
    }
    // A driver may refuse the newer attributes where nothing is mapped, an
    // address refused anyway. Mapped memory whose access could not be asked
    // (not pool memory) is the driver's error, never an unchecked pass.
    let unchecked = info
        .as_ref()
        .is_some_and(|i| i.mapped && i.access.is_none());
    match refused {
        Some(e) if unchecked => Err(e),
        _ => Ok(info),
    }
}

/// How many of the attributes after `MAPPED` this driver knows:
/// `MEMPOOL_HANDLE` and `ACCESS_FLAGS` (CUDA 11.2's headers; asked from
/// 11.2 on), `MAPPING_BASE_ADDR`/`MAPPING_SIZE` (11.7). [`query_pointer`]
/// also takes 1: `MEMPOOL_HANDLE` alone.
fn newer_attributes() -> usize {
    static KNOWN: OnceLock<usize> = OnceLock::new();
    *KNOWN.get_or_init(|| {
        let mut v = 0;
        // SAFETY: out-parameter.
        let ok = unsafe { sys::cuDriverGetVersion(&mut v) } == sys::CUresult::CUDA_SUCCESS;
        match v {
            _ if !ok => 0,
            v if v >= 11070 => 4,
            v if v >= 11020 => 2,
            _ => 0,
        }
    })
}

fn query_pointer(ptr: u64, newer: usize) -> Result<Option<PointerInfo>> {
    use sys::CUpointer_attribute as A;
    // Zeroed 8-byte slots: each attribute writes at most 8 bytes, and the
    // flags and booleans read the same whether the driver writes 1 or 4.
    let mut v = [0u64; 11];
    let attrs = [
        A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        A::CU_POINTER_ATTRIBUTE_IS_MANAGED,
        A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        A::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        A::CU_POINTER_ATTRIBUTE_CONTEXT,
        A::CU_POINTER_ATTRIBUTE_MAPPED,
        // CUDA 11.2 and later:
        A::CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE,
        A::CU_POINTER_ATTRIBUTE_ACCESS_FLAGS,
        // CUDA 11.7 and later:
        A::CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR,
        A::CU_POINTER_ATTRIBUTE_MAPPING_SIZE,
    ];
    let n = 7 + newer;
    let mut attrs = attrs;
    let mut data: Vec<*mut c_void> = v.iter_mut().map(|x| x as *mut u64 as *mut c_void).collect();
    // SAFETY: every attribute writes at most 8 bytes into its slot.
    let r = unsafe {
        sys::cuPointerGetAttributes(n as u32, attrs.as_mut_ptr(), data.as_mut_ptr(), ptr)
    };
    check(r, "cuPointerGetAttributes")?;
    let [mem_type, managed, ordinal, start, size, ctx, mapped, pool, access, map_base, map_size] =
        v;
    if mem_type as u32 == 0 {
        return Ok(None);
    }
    Ok(Some(PointerInfo {
        device_memory: mem_type as u32 == 2 || managed as u32 != 0,
        ordinal: ordinal as u32 as i32,
        range_start: start,
        range_size: size,
        in_context: ctx != 0,
        context: ctx,
        mapped: mapped as u32 != 0,
        access: (newer >= 2).then_some(access as u32),
        pool,
        mapping: (newer >= 4 && map_size != 0).then_some((map_base, map_size)),
    }))
}

/// The minimum granularity of the virtual memory management API on device
/// `ordinal`, if the driver gives one (a power of two).
fn vmm_granularity(ordinal: i32) -> Option<u64> {
    // SAFETY: plain data; zero is the meaning of every field not set.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal;
    let mut granule = 0usize;
    // SAFETY: out-parameter and a filled-in property.
    let r = unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut granule,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    };
    (r == sys::CUresult::CUDA_SUCCESS && granule.is_power_of_two()).then_some(granule as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload larger than every staging slot adds one slot, not one
    /// for each existing slot as well. Needs a driver (a GPU, or the fake
    /// of `fake-cuda/` on the library path); says why it skips without.
    #[test]
    fn an_upload_larger_than_every_slot_adds_one_slot() {
        let dev = match Device::get(0) {
            Ok(dev) => dev,
            Err(e) => {
                // Past libtest's capture, as tests/cuda.rs prints its skips.
                use std::io::Write;
                let line =
                    format!("!!!! SKIPPED: an_upload_larger_than_every_slot_adds_one_slot: {e}\n");
                let _ = std::io::stderr().write_all(line.as_bytes());
                return;
            }
        };
        let _ctx = dev.enter().unwrap();
        let dst = DeviceBuffer::new(1 << 16).unwrap();
        let stream = Stream::new().unwrap();
        let mut staging = Staging::default();
        // As a first step's layout: four slots for tensor tables, then
        // chunk and segment tables larger than them.
        staging.reserve(4, 40).unwrap();
        staging.upload(dst.ptr, &[1u8; 1 << 15], stream.0).unwrap();
        assert_eq!(staging.slots.len(), 5, "slots after a 32 KiB upload");
        staging.upload(dst.ptr, &[2u8; 1 << 16], stream.0).unwrap();
        assert_eq!(staging.slots.len(), 6, "slots after a 64 KiB upload");
        sync_stream(stream.0);
    }
}
