//! A fake CUDA driver (`libcuda.so`) for tests on machines without a GPU:
//! the driver API functions lra's CUDA backend calls, with the ABI of
//! `cuda.h` (cudarc's generated bindings supply the types), running kernels
//! in the repository's PTX interpreter (`ptx-interp`, with its race,
//! bounds, alignment and undefined-value checks).
//!
//! Streams are asynchronous, as on a GPU: every stream has a queue and a
//! worker thread that runs its operations in order, one operation of the
//! whole device at a time (the interpreter holds the device lock), waiting
//! where the stream waits for an event or, for the legacy default stream
//! and blocking streams, for each other. A host function runs on its
//! stream's worker and holds that stream until it returns. A destroyed
//! stream's handle, once its work is done, goes to the next stream created
//! (in any context), as a real driver's freed addresses come back. Copies follow
//! the driver's rules: from pageable memory a copy to the device takes its
//! bytes at the call, from pinned memory when it runs; a copy to pageable
//! memory returns when done. `cuMemFree`/`cuMemFreeHost` wait for the whole
//! device, as the driver's do. A kernel fault is a sticky error of its
//! context, returned by every later launch, copy and wait there, and printed with the interpreter's explanation.
//! Device memory lives in one `ptx_interp::Device`; pinned host memory is
//! real host memory. The virtual memory management API is modelled with
//! one interpreter buffer per reserved range and one mapping per physical
//! allocation; kernels may touch its unmapped bytes without a fault. One
//! default stream-ordered pool serves `cuMemAllocAsync`. What the fake
//! does not model (recording work into a graph, most attributes) fails
//! with `CUDA_ERROR_NOT_SUPPORTED` and a note on stderr, never silently.
//! The per-thread default stream (handle 2) is a blocking stream per
//! thread and context.
//! Beyond the driver API it exports functions for tests:
//! `fake_cuda_holds` (what it holds now: modules, allocations, streams,
//! events), `fake_cuda_fail_launch` (a later launch fails) and
//! `fake_cuda_fail_event_record` (a later event record fails).
//!
//! Environment: `FAKE_CUDA_SCHEDULE` picks the interpreter's block and
//! thread order (see `fn schedule`); `FAKE_CUDA_TRACE` prints every
//! allocation and launch (instructions executed), and a failed launch's
//! arguments; `FAKE_CUDA_VMM_RANGE` picks what the pointer attributes'
//! ranges describe for mapped memory (see `fn vmm_range_is_reservation`),
//! `FAKE_CUDA_POINTER_ATTRIBUTES` an older driver's version and attributes
//! (see `fn driver_version`), `FAKE_CUDA_POOL_ACCESS_FLAGS` what
//! `CU_POINTER_ATTRIBUTE_ACCESS_FLAGS` does for pool memory (see
//! `fn pool_access_flags_refused`), `FAKE_CUDA_MAPPED_ACCESS_FLAGS` what it
//! does for memory mapped through `cuMemMap` (see
//! `fn mapped_access_flags_refused`), `FAKE_CUDA_ALLOCATION_RANGE` whether
//! `cuMemAlloc` memory's range size is reported (see
//! `fn allocation_range_hidden`), `FAKE_CUDA_PTX_ISA` the newest PTX
//! version the JIT takes (see `fn jit_refusal`).
//!
//! # Safety
//!
//! Every exported function has the contract of its namesake in the CUDA
//! driver API (`cuda.h`): out-parameters and host buffers must be valid for
//! what the call writes or reads (an asynchronous copy's pinned buffer until
//! it has run), handles must be ones this driver gave out. Handles and
//! device addresses it can check, it checks.

#![allow(non_snake_case)] // the driver's own names
// One contract for all of them: the crate's `# Safety` above.
#![allow(clippy::missing_safety_doc)]

use cudarc::driver::sys;
use ptx_interp::{Arg, ErrorKind, LaunchConfig, Module, Schedule};
use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use sys::CUresult as R;

/// Multiprocessors reported: small, so that lra's grids (SMs × resident
/// blocks) are small and blocks loop over several chunks.
const SM_COUNT: c_int = 2;
/// Resident blocks per SM reported by the occupancy query.
const BLOCKS_PER_SM: c_int = 1;
/// Device memory reported, and what `cuMemAlloc` hands out before it
/// fails with `CUDA_ERROR_OUT_OF_MEMORY` as a full device does. Buffers
/// are host memory zeroed on demand, so a test may allocate most of it
/// without touching it.
const DEVICE_MEMORY: usize = 4 << 30;
/// Alignment of pinned host allocations (a page, like the driver's).
const PINNED_ALIGN: usize = 4096;
/// How long a synchronising call waits before it reports a hang.
const WAIT_LIMIT: Duration = Duration::from_secs(300);
/// Granularity of the virtual memory management API (a GPU's 2 MiB page).
const VMM_GRANULARITY: usize = 2 << 20;

/// What `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`/`RANGE_SIZE` describe for
/// memory of the virtual memory management API, from `FAKE_CUDA_VMM_RANGE`
/// (public reports disagree on what the driver does): `mapping` (the
/// default) the one physical mapping around the pointer, an unmapped
/// address being unknown to the driver; `reservation` the whole reserved
/// address range, mapped or not (`CU_POINTER_ATTRIBUTE_MAPPED` tells).
fn vmm_range_is_reservation() -> bool {
    static CHOSEN: OnceLock<bool> = OnceLock::new();
    *CHOSEN.get_or_init(|| env_switch("FAKE_CUDA_VMM_RANGE", "mapping", "reservation"))
}

/// Whether the environment variable `var` says `on` rather than `off`
/// (the default, also when unset); any other value is the test's mistake.
fn env_switch(var: &str, off: &str, on: &str) -> bool {
    match std::env::var(var).unwrap_or_default().as_str() {
        "" => false,
        v if v == off => false,
        v if v == on => true,
        v => panic!("{var}={v}: expected {off} or {on}"),
    }
}

/// The CUDA version that introduced pointer attribute `a` (the raw enum
/// value), for those newer than 11.0. A driver older than that refuses a
/// query naming it with `CUDA_ERROR_INVALID_VALUE` (no note: it is the
/// modelled driver's answer, not a gap of the fake).
fn pointer_attribute_since(a: u32) -> c_int {
    use sys::CUpointer_attribute as A;
    if a == A::CU_POINTER_ATTRIBUTE_ACCESS_FLAGS as u32
        || a == A::CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE as u32
    {
        11020
    } else if a == A::CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR as u32
        || a == A::CU_POINTER_ATTRIBUTE_MAPPING_SIZE as u32
    {
        11070
    } else {
        0
    }
}

/// The modelled driver's version (`cuDriverGetVersion`, which pointer
/// attributes it knows, and which entry points it has: see [`since`]):
/// 12040, or what `FAKE_CUDA_POINTER_ATTRIBUTES` names: `10.2` (a driver
/// lra refuses), `11.0` (none of the newer attributes), `11.4`
/// (`ACCESS_FLAGS` and `MEMPOOL_HANDLE`, not `MAPPING_BASE_ADDR`/`MAPPING_SIZE`).
fn driver_version() -> c_int {
    static CHOSEN: OnceLock<c_int> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        match std::env::var("FAKE_CUDA_POINTER_ATTRIBUTES")
            .unwrap_or_default()
            .as_str()
        {
            "" => 12040,
            "10.2" => 10020,
            "11.0" => 11000,
            "11.4" => 11040,
            v => panic!("FAKE_CUDA_POINTER_ATTRIBUTES={v}: expected 10.2, 11.0, 11.4 or nothing"),
        }
    })
}

/// What `CU_POINTER_ATTRIBUTE_ACCESS_FLAGS` does for pool memory (nothing
/// documents it), from `FAKE_CUDA_POOL_ACCESS_FLAGS`: `zero` (the default)
/// answers 0, no access; `refused` fails the query with
/// `CUDA_ERROR_INVALID_VALUE` (no note: the modelled driver's answer).
fn pool_access_flags_refused() -> bool {
    static CHOSEN: OnceLock<bool> = OnceLock::new();
    *CHOSEN.get_or_init(|| env_switch("FAKE_CUDA_POOL_ACCESS_FLAGS", "zero", "refused"))
}

/// What `CU_POINTER_ATTRIBUTE_ACCESS_FLAGS` does for memory mapped through
/// `cuMemMap`, from `FAKE_CUDA_MAPPED_ACCESS_FLAGS`: `answered` (the
/// default) gives the access set with `cuMemSetAccess`; `refused` fails
/// the query with `CUDA_ERROR_INVALID_VALUE` (a driver that will not say:
/// lra must then refuse the memory, never pass it unchecked).
fn mapped_access_flags_refused() -> bool {
    static CHOSEN: OnceLock<bool> = OnceLock::new();
    *CHOSEN.get_or_init(|| env_switch("FAKE_CUDA_MAPPED_ACCESS_FLAGS", "answered", "refused"))
}

/// What `CU_POINTER_ATTRIBUTE_RANGE_SIZE` gives for memory of a context
/// (`cuMemAlloc`), from `FAKE_CUDA_ALLOCATION_RANGE`: `reported` (the
/// default) the allocation's size; `zero` 0, a driver that does not fill
/// it (lra must then refuse the memory: it cannot check the extent).
fn allocation_range_hidden() -> bool {
    static CHOSEN: OnceLock<bool> = OnceLock::new();
    *CHOSEN.get_or_init(|| env_switch("FAKE_CUDA_ALLOCATION_RANGE", "reported", "zero"))
}

/// An entry point that first came with CUDA `version`: a driver of the
/// modelled version lacks the symbol, where a real loader finds nothing
/// (cudarc panics). The fake stops the process instead, which fails the
/// test that made lra call it.
fn since(name: &str, version: c_int) {
    if driver_version() < version {
        note(
            name,
            format!("no such entry point in a CUDA {} driver", driver_version()),
        );
        std::process::abort();
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> R {
    if version.is_null() {
        return R::CUDA_ERROR_INVALID_VALUE;
    }
    version.write(driver_version());
    R::CUDA_SUCCESS
}

/// The interpreter's block and thread order, from `FAKE_CUDA_SCHEDULE`:
/// `in-order` (the default), `reversed`, or `random:SEED` (blocks all
/// resident, threads interleaved in quanta of 1..=7 instructions, the seed
/// mixed with the launch's number). Every one is a schedule the hardware
/// could run; a correct kernel gives the same results under all.
fn schedule(launch: u64) -> Schedule {
    static CHOSEN: OnceLock<Schedule> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| {
        let v = std::env::var("FAKE_CUDA_SCHEDULE").unwrap_or_default();
        match v.as_str() {
            "" | "in-order" => Schedule::InOrder,
            "reversed" => Schedule::Reversed,
            _ => match v.strip_prefix("random:").map(str::parse::<u64>) {
                Some(Ok(seed)) => Schedule::Random {
                    seed,
                    resident: usize::MAX,
                    max_quantum: 7,
                },
                _ => panic!("FAKE_CUDA_SCHEDULE={v}: expected in-order, reversed or random:SEED"),
            },
        }
    });
    match chosen {
        Schedule::Random {
            seed,
            resident,
            max_quantum,
        } => Schedule::Random {
            seed: seed ^ launch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            resident: *resident,
            max_quantum: *max_quantum,
        },
        other => other.clone(),
    }
}

/// Prints why a call failed (the caller only sees the code).
fn note(what: &str, why: impl std::fmt::Display) {
    eprintln!("fake-cuda: {what}: {why}");
}

fn trace() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FAKE_CUDA_TRACE").is_some())
}

type Res = Result<(), R>;

fn code(r: Res) -> R {
    match r {
        Ok(()) => R::CUDA_SUCCESS,
        Err(e) => e,
    }
}

/// Where a copy to the device takes its bytes.
enum HostBytes {
    /// Pageable memory: copied at the call.
    Copied(Vec<u8>),
    /// Pinned memory: read when the copy runs.
    Pinned { ptr: usize, n: usize },
}

/// One queued stream operation.
enum Op {
    Launch {
        module: Arc<Module>,
        name: String,
        cfg: LaunchConfig,
        args: Vec<Arg>,
    },
    ToDevice {
        dst: u64,
        src: HostBytes,
    },
    ToHost {
        dst: usize,
        src: u64,
        n: usize,
    },
    OnDevice {
        dst: u64,
        src: u64,
        n: usize,
    },
    Memset32 {
        dst: u64,
        value: u32,
        count: usize,
    },
    /// Completes the event's record number `generation`.
    Record {
        event: usize,
        generation: u64,
    },
    /// Waits for the event's record number `generation`.
    WaitEvent {
        event: usize,
        generation: u64,
    },
    /// Waits until `stream` has run `count` operations (the legacy
    /// stream's implicit ordering).
    WaitStream {
        stream: usize,
        count: u64,
    },
    HostFn {
        f: unsafe extern "C" fn(*mut c_void),
        data: usize,
    },
}

struct Stream {
    ctx: usize,
    /// The context's legacy default stream (handles 0 and 1).
    legacy: bool,
    /// Ordered with the legacy stream (created without
    /// CU_STREAM_NON_BLOCKING).
    blocking: bool,
    /// The capture under way: its mode and the thread that began it.
    capture: Option<(sys::CUstreamCaptureMode, ThreadId)>,
    /// A prohibited call during the capture invalidated it: ending it
    /// fails.
    capture_invalidated: bool,
    queue: VecDeque<Op>,
    /// Operations enqueued and run so far.
    enqueued: u64,
    done: u64,
    /// Destroyed by the caller: its worker finishes the queue, then the
    /// stream is gone.
    destroyed: bool,
    /// Tells this stream's worker from the worker of an earlier stream
    /// that had the same handle.
    serial: usize,
}

struct Event {
    ctx: usize,
    /// Records enqueued and completed so far.
    recorded: u64,
    completed: u64,
    live: bool,
}

struct Context {
    primary: bool,
    /// Its legacy stream, made on first use.
    legacy: Option<usize>,
    /// Each thread's per-thread default stream (handle 2), made on first
    /// use: a blocking stream, ordered with the legacy one.
    per_thread: HashMap<ThreadId, usize>,
    /// The first asynchronous failure of its work: every later launch,
    /// copy and wait in it returns it, as the driver's sticky errors.
    sticky: Option<R>,
}

struct Reservation {
    size: usize,
    /// Mapped parts: address → (bytes, physical handle).
    mappings: BTreeMap<u64, (usize, usize)>,
    /// Device 0's access flags to each mapping (by its address): none
    /// until cuMemSetAccess, as the driver documents.
    access: BTreeMap<u64, u32>,
}

struct Physical {
    size: usize,
    /// `cuMemCreate` and each `cuMemRetainAllocationHandle`, less each
    /// `cuMemRelease`: freed at zero once unmapped.
    refs: u32,
    /// Where it is mapped (the fake maps physical memory once: the bytes
    /// are the reservation's, so two mappings could not share them).
    mapped_at: Option<u64>,
}

struct Driver {
    initialised: bool,
    next_handle: usize,
    dev: ptx_interp::Device,
    /// Device allocations: address → bytes.
    allocs: BTreeMap<u64, usize>,
    /// Those of `allocs` that came from the default pool (cuMemAllocAsync).
    pooled: BTreeSet<u64>,
    /// Those of `allocs` made by cuMemAlloc in a context other than the
    /// primary one: address → that context.
    other_context_allocs: HashMap<u64, usize>,
    /// Pinned host allocations: address → bytes.
    pinned: BTreeMap<usize, usize>,
    /// Address ranges of `cuMemAddressReserve`: base → reservation. Each is
    /// one interpreter buffer, so that kernels run across its mappings.
    reservations: BTreeMap<u64, Reservation>,
    /// Physical memory of `cuMemCreate`: handle → allocation.
    physical: HashMap<usize, Physical>,
    contexts: HashMap<usize, Context>,
    primary: usize,
    primary_refs: u32,
    streams: HashMap<usize, Stream>,
    /// Handles of streams that are gone, with their last operation count,
    /// most recent last: a new stream takes one back, as a real driver's
    /// allocator hands a freed stream's address out again.
    freed_streams: Vec<(usize, u64)>,
    events: HashMap<usize, Event>,
    modules: HashMap<usize, Arc<Module>>,
    /// Functions: handle → (module, kernel name).
    functions: HashMap<usize, (usize, String)>,
    graphs: Vec<usize>,
    /// Kernels run so far (varies the random schedule's seed).
    launches: u64,
    /// `cuLaunchKernel` calls to the one that fails (`fake_cuda_fail_launch`).
    fail_launch: FailIn,
    /// `cuEventRecord` calls to the one that fails
    /// (`fake_cuda_fail_event_record`).
    fail_event_record: FailIn,
}

/// A countdown of calls to the one a test asked to fail (0: none).
#[derive(Default)]
struct FailIn(u64);

impl FailIn {
    /// Counts one call; true for the one that fails.
    fn due(&mut self) -> bool {
        match self.0 {
            0 => false,
            n => {
                self.0 = n - 1;
                n == 1
            }
        }
    }
}

thread_local! {
    /// This thread's context stack (top = current).
    static CTX_STACK: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    /// This thread's stream-capture interaction mode
    /// (cuThreadExchangeStreamCaptureMode; global unless changed).
    static CAPTURE_MODE: Cell<sys::CUstreamCaptureMode> =
        const { Cell::new(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL) };
}

fn current_ctx() -> Option<usize> {
    CTX_STACK.with(|s| s.borrow().last().copied())
}

/// Signalled whenever an operation completes or is enqueued.
static WAKE: Condvar = Condvar::new();

fn driver() -> MutexGuard<'static, Driver> {
    static DRIVER: OnceLock<Mutex<Driver>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            // Handles are small odd-looking integers: never 0, never the
            // special stream handles 1 and 2, never dereferenceable.
            let primary = 0x1000;
            let ctx = Context {
                primary: true,
                legacy: None,
                per_thread: HashMap::new(),
                sticky: None,
            };
            Mutex::new(Driver {
                initialised: false,
                next_handle: primary + 0x10,
                dev: ptx_interp::Device::new(),
                allocs: BTreeMap::new(),
                pooled: BTreeSet::new(),
                other_context_allocs: HashMap::new(),
                pinned: BTreeMap::new(),
                reservations: BTreeMap::new(),
                physical: HashMap::new(),
                contexts: HashMap::from([(primary, ctx)]),
                primary,
                primary_refs: 0,
                streams: HashMap::new(),
                freed_streams: Vec::new(),
                events: HashMap::new(),
                modules: HashMap::new(),
                functions: HashMap::new(),
                graphs: Vec::new(),
                launches: 0,
                fail_launch: FailIn::default(),
                fail_event_record: FailIn::default(),
            })
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The initialised driver, or the error every call returns now.
fn ready(what: &str) -> Result<MutexGuard<'static, Driver>, R> {
    let d = driver();
    if !d.initialised {
        note(what, "called before cuInit");
        return Err(R::CUDA_ERROR_NOT_INITIALIZED);
    }
    Ok(d)
}

/// Runs `f` on the initialised driver.
fn with(what: &str, f: impl FnOnce(&mut Driver) -> Res) -> R {
    match ready(what) {
        Ok(mut d) => code(f(&mut d)),
        Err(e) => e,
    }
}

/// Runs `f` on the initialised driver, then waits until the condition it
/// returns holds (all the work it names has run).
fn with_wait(
    what: &str,
    f: impl FnOnce(&mut Driver) -> Result<Box<dyn Fn(&Driver) -> bool>, R>,
) -> R {
    let mut d = match ready(what) {
        Ok(d) => d,
        Err(e) => return e,
    };
    if let Some(e) = d.sticky(current_ctx()) {
        return e;
    }
    let done = match f(&mut d) {
        Ok(done) => done,
        Err(e) => return e,
    };
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(e) = d.sticky(current_ctx()) {
            return e;
        }
        if done(&d) {
            return R::CUDA_SUCCESS;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            note(
                what,
                format!("waited {WAIT_LIMIT:?} for the device: a stream never finished"),
            );
            return R::CUDA_ERROR_LAUNCH_TIMEOUT;
        }
        d = WAKE
            .wait_timeout(d, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Writes `v` through an out-parameter, refusing NULL.
unsafe fn put<T>(p: *mut T, v: T) -> Res {
    if p.is_null() {
        return Err(R::CUDA_ERROR_INVALID_VALUE);
    }
    p.write(v);
    Ok(())
}

fn need_ctx(what: &str) -> Result<usize, R> {
    current_ctx().ok_or_else(|| {
        note(what, "no current context");
        R::CUDA_ERROR_INVALID_CONTEXT
    })
}

/// Where a pointer points.
enum Place {
    Device {
        base: u64,
        size: usize,
    },
    Pinned {
        base: u64,
        size: usize,
    },
    /// Mapped memory of a reservation: the mapping, its physical handle.
    Mapped {
        base: u64,
        size: usize,
        handle: usize,
        reservation: u64,
        reserved: usize,
    },
    /// A reserved address that is not mapped.
    Reserved {
        reservation: u64,
        reserved: usize,
    },
    Unknown,
}

/// A stream's worker: runs the queue in order until the stream is
/// destroyed and drained.
fn worker(h: usize, serial: usize) {
    let mut d = driver();
    loop {
        let op = loop {
            let s = match d.streams.get(&h) {
                Some(s) if s.serial == serial => s,
                // Gone already (destroyed idle), perhaps handed out again.
                _ => return,
            };
            match s.queue.front() {
                Some(op) if d.runnable(op) => {
                    break d.streams.get_mut(&h).unwrap().queue.pop_front().unwrap()
                }
                None if s.destroyed => {
                    d.free_stream(h);
                    return;
                }
                _ => d = WAKE.wait(d).unwrap_or_else(|p| p.into_inner()),
            }
        };
        match op {
            Op::HostFn { f, data } => {
                drop(d);
                // SAFETY: the caller's function and data (cuLaunchHostFunc).
                unsafe { f(data as *mut c_void) };
                d = driver();
            }
            // After a fault no more work runs in the context; records
            // still complete, so that nothing waits for them forever.
            op @ Op::Record { .. } => d.run(0, op),
            op => {
                let ctx = d.streams[&h].ctx;
                if d.sticky(Some(ctx)).is_none() {
                    d.run(ctx, op)
                }
            }
        }
        d.streams.get_mut(&h).unwrap().done += 1;
        WAKE.notify_all();
    }
}

impl Driver {
    /// What cuMemAlloc and cuMemCreate have handed out.
    fn device_memory_used(&self) -> usize {
        self.allocs.values().sum::<usize>() + self.physical.values().map(|p| p.size).sum::<usize>()
    }

    fn handle(&mut self) -> usize {
        self.next_handle += 0x10;
        self.next_handle
    }

    fn place(&self, ptr: u64) -> Place {
        if let Some((&reservation, r)) = self.reservations.range(..=ptr).next_back() {
            if ptr < reservation + r.size as u64 {
                if let Some((&base, &(size, handle))) = r.mappings.range(..=ptr).next_back() {
                    if ptr < base + size as u64 {
                        return Place::Mapped {
                            base,
                            size,
                            handle,
                            reservation,
                            reserved: r.size,
                        };
                    }
                }
                return Place::Reserved {
                    reservation,
                    reserved: r.size,
                };
            }
        }
        if let Some((&base, &size)) = self.allocs.range(..=ptr).next_back() {
            if ptr < base + size as u64 {
                return Place::Device { base, size };
            }
        }
        if let Some((&base, &size)) = self.pinned.range(..=ptr as usize).next_back() {
            if (ptr as usize) < base + size {
                return Place::Pinned {
                    base: base as u64,
                    size,
                };
            }
        }
        Place::Unknown
    }

    /// Whether `len` bytes at `ptr` are all mapped (through one mapping
    /// or several, one after another).
    fn mapped_through(&self, mut ptr: u64, len: usize) -> bool {
        let end = ptr + len as u64;
        while ptr < end {
            match self.place(ptr) {
                Place::Mapped { base, size, .. } => ptr = base + size as u64,
                _ => return false,
            }
        }
        true
    }

    /// `len` bytes at `ptr` inside one device allocation, or mapped.
    fn device_range(&self, what: &str, ptr: u64, len: usize) -> Res {
        match self.place(ptr) {
            Place::Mapped { .. } | Place::Reserved { .. } if self.mapped_through(ptr, len) => {
                Ok(())
            }
            Place::Mapped { .. } | Place::Reserved { .. } => {
                note(what, format!("{len} bytes at {ptr:#x} are not all mapped"));
                Err(R::CUDA_ERROR_INVALID_VALUE)
            }
            Place::Device { base, size } if ptr - base + len as u64 <= size as u64 => Ok(()),
            Place::Device { base, size } => {
                note(
                    what,
                    format!(
                        "{len} bytes at {ptr:#x} run past the allocation at {base:#x} ({size} bytes)"
                    ),
                );
                Err(R::CUDA_ERROR_INVALID_VALUE)
            }
            _ => {
                note(what, format!("{ptr:#x} is not device memory"));
                Err(R::CUDA_ERROR_INVALID_VALUE)
            }
        }
    }

    /// A host buffer of `n` bytes: pinned (wholly inside one pinned
    /// allocation) or not; never one of the interpreter's device addresses
    /// (which are not mapped here).
    fn host_buffer(&self, what: &str, ptr: *const c_void, n: usize) -> Result<bool, R> {
        if ptr.is_null() {
            note(what, "NULL host pointer");
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        match self.place(ptr as u64) {
            Place::Device { .. } | Place::Mapped { .. } | Place::Reserved { .. } => {
                note(what, format!("host pointer {ptr:?} is device memory"));
                Err(R::CUDA_ERROR_INVALID_VALUE)
            }
            Place::Pinned { base, size } => Ok(ptr as u64 + n as u64 <= base + size as u64),
            Place::Unknown => Ok(false),
        }
    }

    /// A live stream of the caller's (the legacy handles 0 and 1 name the
    /// current context's legacy stream, made on first use).
    fn stream(&mut self, what: &str, s: sys::CUstream) -> Result<usize, R> {
        match s as usize {
            0 | 1 => {
                let ctx = need_ctx(what)?;
                if let Some(h) = self.contexts[&ctx].legacy {
                    return Ok(h);
                }
                let h = self.new_stream(ctx, true, true);
                self.contexts.get_mut(&ctx).unwrap().legacy = Some(h);
                Ok(h)
            }
            2 => {
                let ctx = need_ctx(what)?;
                let me = std::thread::current().id();
                if let Some(&h) = self.contexts[&ctx].per_thread.get(&me) {
                    return Ok(h);
                }
                let h = self.new_stream(ctx, false, true);
                self.contexts
                    .get_mut(&ctx)
                    .unwrap()
                    .per_thread
                    .insert(me, h);
                Ok(h)
            }
            h if self.streams.get(&h).is_some_and(|st| !st.destroyed) => Ok(h),
            _ => {
                note(what, format!("{s:?} is not a live stream"));
                Err(R::CUDA_ERROR_INVALID_HANDLE)
            }
        }
    }

    fn new_stream(&mut self, ctx: usize, legacy: bool, blocking: bool) -> usize {
        let serial = self.handle();
        // Operation counts go on from the freed stream's, so that a wait
        // for its operations (done by then) stays done.
        let (h, ops) = self.freed_streams.pop().unwrap_or((serial, 0));
        self.streams.insert(
            h,
            Stream {
                ctx,
                legacy,
                blocking,
                capture: None,
                capture_invalidated: false,
                queue: VecDeque::new(),
                enqueued: ops,
                done: ops,
                destroyed: false,
                serial,
            },
        );
        std::thread::Builder::new()
            .name(format!("fake-cuda stream {h:#x}"))
            .spawn(move || worker(h, serial))
            .expect("a thread for the stream");
        h
    }

    /// Refuses a potentially unsafe call (an allocation, a synchronous
    /// copy, an event or stream query or wait) while a capture prohibits
    /// it, as the driver does: for a thread in global mode, any other
    /// thread's global capture or its own non-relaxed one; in thread-local
    /// mode, its own non-relaxed one; in relaxed mode, none. The refusal
    /// invalidates the captures that prohibited the call.
    fn unsafe_call(&mut self, what: &str) -> Res {
        use sys::CUstreamCaptureMode as M;
        let mine = CAPTURE_MODE.with(Cell::get);
        let me = std::thread::current().id();
        let prohibits = |s: &Stream| match s.capture {
            Some((mode, thread)) if thread == me => {
                mode != M::CU_STREAM_CAPTURE_MODE_RELAXED
                    && mine != M::CU_STREAM_CAPTURE_MODE_RELAXED
            }
            Some((mode, _)) => {
                mode == M::CU_STREAM_CAPTURE_MODE_GLOBAL && mine == M::CU_STREAM_CAPTURE_MODE_GLOBAL
            }
            None => false,
        };
        let mut refused = false;
        for st in self.streams.values_mut().filter(|st| prohibits(st)) {
            st.capture_invalidated = true;
            refused = true;
        }
        if refused {
            note(
                what,
                format!("prohibited during a graph capture in this thread's capture mode ({mine:?}); the capture is invalidated"),
            );
            return Err(R::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        Ok(())
    }

    /// Removes stream `h`, which has run all its work; its handle may be
    /// handed out again.
    fn free_stream(&mut self, h: usize) {
        let s = self.streams.remove(&h).unwrap();
        self.freed_streams.push((h, s.done));
        WAKE.notify_all();
    }

    /// Checks that work may be enqueued on `s` now: a stream of the
    /// current context, not capturing (the fake records no graphs).
    fn work_on(&mut self, what: &str, s: sys::CUstream) -> Result<usize, R> {
        let cur = need_ctx(what)?;
        if let Some(e) = self.sticky(Some(cur)) {
            return Err(e);
        }
        let h = self.stream(what, s)?;
        let st = &self.streams[&h];
        if st.ctx != cur {
            note(
                what,
                format!("stream {s:?} belongs to another context than the current one"),
            );
            return Err(R::CUDA_ERROR_INVALID_HANDLE);
        }
        if st.capture.is_some() {
            note(
                what,
                format!("stream {s:?} is capturing a graph: recording work into graphs is not supported by the fake driver"),
            );
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        if self.legacy_held_by_capture(h) {
            note(
                what,
                "the legacy stream is unusable while a blocking stream of its context captures",
            );
            return Err(R::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
        }
        Ok(h)
    }

    /// Whether `h` is a legacy stream and a blocking stream of its context
    /// is capturing (which makes the legacy stream unusable).
    fn legacy_held_by_capture(&self, h: usize) -> bool {
        let st = &self.streams[&h];
        st.legacy
            && self
                .streams
                .values()
                .any(|o| o.ctx == st.ctx && o.blocking && !o.legacy && o.capture.is_some())
    }

    /// Appends `op` to stream `h`, after the legacy stream's implicit
    /// ordering: the legacy stream waits for the blocking streams' work so
    /// far, a blocking stream for the legacy stream's. Returns the number
    /// of operations the stream must have run for `op` to be done.
    fn push(&mut self, h: usize, op: Op) -> u64 {
        let st = &self.streams[&h];
        let (ctx, legacy, blocking) = (st.ctx, st.legacy, st.blocking);
        let waits: Vec<Op> = self
            .streams
            .iter()
            .filter(|(&o, other)| {
                o != h
                    && other.ctx == ctx
                    && other.done < other.enqueued
                    && (legacy && other.blocking || blocking && other.legacy)
            })
            .map(|(&o, other)| Op::WaitStream {
                stream: o,
                count: other.enqueued,
            })
            .collect();
        let st = self.streams.get_mut(&h).unwrap();
        for w in waits.into_iter().chain([op]) {
            st.queue.push_back(w);
            st.enqueued += 1;
        }
        WAKE.notify_all();
        st.enqueued
    }

    /// Enqueues `op` on `s` (checked with [`Driver::work_on`]).
    fn enqueue(&mut self, what: &str, s: sys::CUstream, op: Op) -> Result<(usize, u64), R> {
        let h = self.work_on(what, s)?;
        Ok((h, self.push(h, op)))
    }

    fn runnable(&self, op: &Op) -> bool {
        match op {
            Op::WaitEvent { event, generation } => self.events[event].completed >= *generation,
            Op::WaitStream { stream, count } => {
                self.streams.get(stream).is_none_or(|s| s.done >= *count)
            }
            _ => true,
        }
    }

    /// Whether stream `h` has run its first `count` operations.
    fn reached(&self, h: usize, count: u64) -> bool {
        self.streams.get(&h).is_none_or(|s| s.done >= count)
    }

    /// A condition that holds once every stream for which `which` holds
    /// has run what it holds now.
    fn drained(&self, which: impl Fn(&Stream) -> bool) -> Box<dyn Fn(&Driver) -> bool> {
        let targets: Vec<(usize, u64)> = self
            .streams
            .iter()
            .filter(|(_, s)| which(s))
            .map(|(&h, s)| (h, s.enqueued))
            .collect();
        Box::new(move |d: &Driver| targets.iter().all(|&(h, n)| d.reached(h, n)))
    }

    /// The sticky error of context `ctx`, if any.
    fn sticky(&self, ctx: Option<usize>) -> Option<R> {
        self.contexts.get(&ctx?)?.sticky
    }

    /// Runs one operation of a stream of context `ctx` (the device lock
    /// held); a failure becomes the context's sticky error.
    fn run(&mut self, ctx: usize, op: Op) {
        let fail = |d: &mut Driver, what: &str, why: &dyn std::fmt::Display, e: R| {
            note(what, why);
            if let Some(c) = d.contexts.get_mut(&ctx) {
                c.sticky.get_or_insert(e);
            }
        };
        match op {
            Op::Launch {
                module,
                name,
                mut cfg,
                args,
            } => {
                self.launches += 1;
                cfg.schedule = schedule(self.launches);
                match self.dev.launch(&module, &name, &cfg, &args) {
                    Ok(report) => {
                        if trace() {
                            note(
                                "cuLaunchKernel",
                                format!(
                                    "{name} grid {:?} block {:?}: {} instructions",
                                    cfg.grid, cfg.block, report.instructions
                                ),
                            );
                        }
                    }
                    Err(e) => {
                        if trace() {
                            let params = module.kernel_params(&name).unwrap_or_default();
                            for ((pname, _), a) in params.iter().zip(&args) {
                                note("cuLaunchKernel", format!("  {pname} = {a:x?}"));
                            }
                        }
                        let why = format!(
                            "{name} (grid {:?}, block {:?}) failed in the PTX interpreter: {e}",
                            cfg.grid, cfg.block
                        );
                        fail(self, "cuLaunchKernel", &why, launch_error(e.kind));
                    }
                }
            }
            Op::ToDevice { dst, src } => {
                let bytes = match src {
                    HostBytes::Copied(v) => v,
                    // SAFETY: pinned memory lives until cuMemFreeHost,
                    // which waits for the device first.
                    HostBytes::Pinned { ptr, n } => unsafe {
                        std::slice::from_raw_parts(ptr as *const u8, n).to_vec()
                    },
                };
                if let Err(e) = self.dev.write(dst, &bytes) {
                    fail(
                        self,
                        "copy to the device",
                        &e,
                        R::CUDA_ERROR_ILLEGAL_ADDRESS,
                    );
                }
            }
            Op::ToHost { dst, src, n } => match self.dev.read(src, n) {
                // SAFETY: the caller's buffer holds `n` bytes and lives
                // until the copy has run (pageable: the call waits).
                Ok(b) => unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst as *mut u8, n) },
                Err(e) => fail(self, "copy to the host", &e, R::CUDA_ERROR_ILLEGAL_ADDRESS),
            },
            Op::OnDevice { dst, src, n } => {
                let r = self.dev.read(src, n).and_then(|b| self.dev.write(dst, &b));
                if let Err(e) = r {
                    fail(
                        self,
                        "copy on the device",
                        &e,
                        R::CUDA_ERROR_ILLEGAL_ADDRESS,
                    );
                }
            }
            Op::Memset32 { dst, value, count } => {
                let bytes: Vec<u8> = std::iter::repeat_n(value.to_le_bytes(), count)
                    .flatten()
                    .collect();
                if let Err(e) = self.dev.write(dst, &bytes) {
                    fail(self, "cuMemsetD32Async", &e, R::CUDA_ERROR_ILLEGAL_ADDRESS);
                }
            }
            Op::Record { event, generation } => {
                let e = self
                    .events
                    .get_mut(&event)
                    .expect("events are never removed");
                e.completed = e.completed.max(generation);
            }
            Op::WaitEvent { .. } | Op::WaitStream { .. } | Op::HostFn { .. } => {}
        }
    }
}

// ------------------------------------------------------------ init, device

#[no_mangle]
pub unsafe extern "C" fn cuInit(Flags: c_uint) -> R {
    if Flags != 0 {
        return R::CUDA_ERROR_INVALID_VALUE;
    }
    driver().initialised = true;
    R::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(error: R, pStr: *mut *const c_char) -> R {
    static NAMES: Mutex<BTreeMap<u32, &'static CStr>> = Mutex::new(BTreeMap::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let name = *names.entry(error as u32).or_insert_with(|| {
        let s = CString::new(format!("{error:?}")).expect("no NUL in an enum name");
        Box::leak(s.into_boxed_c_str())
    });
    code(put(pStr, name.as_ptr()))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> R {
    with("cuDeviceGetCount", |_| put(count, 1))
}

fn device_ordinal(what: &str, dev: sys::CUdevice) -> Res {
    if dev != 0 {
        note(what, format!("device {dev}: the fake has one device, 0"));
        return Err(R::CUDA_ERROR_INVALID_DEVICE);
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut sys::CUdevice, ordinal: c_int) -> R {
    with("cuDeviceGet", |_| {
        device_ordinal("cuDeviceGet", ordinal)?;
        put(device, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: sys::CUdevice) -> R {
    with("cuDeviceTotalMem", |_| {
        device_ordinal("cuDeviceTotalMem", dev)?;
        put(bytes, DEVICE_MEMORY)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: sys::CUdevice_attribute,
    dev: sys::CUdevice,
) -> R {
    use sys::CUdevice_attribute as A;
    with("cuDeviceGetAttribute", |_| {
        device_ordinal("cuDeviceGetAttribute", dev)?;
        let v = match attrib {
            A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT => SM_COUNT,
            A::CU_DEVICE_ATTRIBUTE_WARP_SIZE => 32,
            A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK => 1024,
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR => 7,
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR => 0,
            A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING => 1,
            other => {
                note("cuDeviceGetAttribute", format!("{other:?} is not modelled"));
                return Err(R::CUDA_ERROR_NOT_SUPPORTED);
            }
        };
        put(pi, v)
    })
}

// ------------------------------------------------------------ contexts

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(
    pctx: *mut sys::CUcontext,
    dev: sys::CUdevice,
) -> R {
    with("cuDevicePrimaryCtxRetain", |d| {
        device_ordinal("cuDevicePrimaryCtxRetain", dev)?;
        put(pctx, d.primary as sys::CUcontext)?;
        d.primary_refs += 1;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: sys::CUdevice) -> R {
    since("cuDevicePrimaryCtxRelease_v2", 11000);
    with("cuDevicePrimaryCtxRelease", |d| {
        device_ordinal("cuDevicePrimaryCtxRelease", dev)?;
        if d.primary_refs == 0 {
            note(
                "cuDevicePrimaryCtxRelease",
                "released more often than retained",
            );
            return Err(R::CUDA_ERROR_INVALID_CONTEXT);
        }
        d.primary_refs -= 1;
        Ok(())
    })
}

fn live_ctx(d: &Driver, what: &str, ctx: sys::CUcontext) -> Result<usize, R> {
    let h = ctx as usize;
    if d.contexts.contains_key(&h) {
        Ok(h)
    } else {
        note(what, format!("{ctx:?} is not a live context"));
        Err(R::CUDA_ERROR_INVALID_CONTEXT)
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(
    pctx: *mut sys::CUcontext,
    flags: c_uint,
    dev: sys::CUdevice,
) -> R {
    with("cuCtxCreate", |d| {
        device_ordinal("cuCtxCreate", dev)?;
        let _ = flags; // scheduling hints
        let h = d.handle();
        put(pctx, h as sys::CUcontext)?;
        let ctx = Context {
            primary: false,
            legacy: None,
            per_thread: HashMap::new(),
            sticky: None,
        };
        d.contexts.insert(h, ctx);
        CTX_STACK.with(|s| s.borrow_mut().push(h));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: sys::CUcontext) -> R {
    with("cuCtxDestroy", |d| {
        let h = live_ctx(d, "cuCtxDestroy", ctx)?;
        if d.contexts[&h].primary {
            note("cuCtxDestroy", "the primary context cannot be destroyed");
            return Err(R::CUDA_ERROR_INVALID_CONTEXT);
        }
        d.contexts.remove(&h);
        for s in d.streams.values_mut().filter(|s| s.ctx == h) {
            s.destroyed = true;
        }
        for e in d.events.values_mut().filter(|e| e.ctx == h) {
            e.live = false;
        }
        WAKE.notify_all();
        CTX_STACK.with(|s| {
            let mut s = s.borrow_mut();
            if s.last() == Some(&h) {
                s.pop();
            }
        });
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: sys::CUcontext) -> R {
    with("cuCtxPushCurrent", |d| {
        let h = live_ctx(d, "cuCtxPushCurrent", ctx)?;
        CTX_STACK.with(|s| s.borrow_mut().push(h));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut sys::CUcontext) -> R {
    with("cuCtxPopCurrent", |_| {
        let top = CTX_STACK.with(|s| s.borrow_mut().pop());
        match top {
            Some(h) => {
                if !pctx.is_null() {
                    pctx.write(h as sys::CUcontext);
                }
                Ok(())
            }
            None => {
                note("cuCtxPopCurrent", "the context stack is empty");
                Err(R::CUDA_ERROR_INVALID_CONTEXT)
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: sys::CUcontext) -> R {
    with("cuCtxSetCurrent", |d| {
        if ctx.is_null() {
            CTX_STACK.with(|s| s.borrow_mut().pop());
            return Ok(());
        }
        let h = live_ctx(d, "cuCtxSetCurrent", ctx)?;
        CTX_STACK.with(|s| {
            let mut s = s.borrow_mut();
            s.pop();
            s.push(h);
        });
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut sys::CUcontext) -> R {
    with("cuCtxGetCurrent", |_| {
        let top = CTX_STACK.with(|s| s.borrow().last().copied());
        put(
            pctx,
            top.map_or(std::ptr::null_mut(), |h| h as sys::CUcontext),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> R {
    with_wait("cuCtxSynchronize", |d| {
        let cur = need_ctx("cuCtxSynchronize")?;
        d.unsafe_call("cuCtxSynchronize")?;
        Ok(d.drained(|s| s.ctx == cur))
    })
}

// ------------------------------------------------------------ streams

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(phStream: *mut sys::CUstream, Flags: c_uint) -> R {
    with("cuStreamCreate", |d| {
        let ctx = need_ctx("cuStreamCreate")?;
        if Flags > 1 || phStream.is_null() {
            note("cuStreamCreate", format!("flags {Flags}"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        // Flags 1: CU_STREAM_NON_BLOCKING.
        let h = d.new_stream(ctx, false, Flags == 0);
        put(phStream, h as sys::CUstream)
    })
}

/// A stream the caller created (not a legacy handle).
fn created_stream(d: &Driver, what: &str, s: sys::CUstream) -> Result<usize, R> {
    let h = s as usize;
    match d.streams.get(&h) {
        Some(st) if !st.destroyed && !st.legacy => Ok(h),
        _ => {
            note(
                what,
                format!("{s:?} is not a stream created by cuStreamCreate"),
            );
            Err(R::CUDA_ERROR_INVALID_HANDLE)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(hStream: sys::CUstream) -> R {
    with("cuStreamDestroy", |d| {
        let h = created_stream(d, "cuStreamDestroy", hStream)?;
        // Like the driver: queued work still runs, then the stream goes
        // (an idle one at once, so that its handle can come back).
        let s = d.streams.get_mut(&h).unwrap();
        s.destroyed = true;
        if s.done == s.enqueued && s.queue.is_empty() {
            d.free_stream(h);
        }
        WAKE.notify_all();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(hStream: sys::CUstream) -> R {
    with_wait("cuStreamSynchronize", |d| {
        let h = d.stream("cuStreamSynchronize", hStream)?;
        d.unsafe_call("cuStreamSynchronize")?;
        let st = &d.streams[&h];
        if st.capture.is_some() {
            note(
                "cuStreamSynchronize",
                format!("stream {hStream:?} is capturing a graph"),
            );
            return Err(R::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        let n = st.enqueued;
        Ok(Box::new(move |d: &Driver| d.reached(h, n)))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(hStream: sys::CUstream) -> R {
    with("cuStreamQuery", |d| {
        let h = d.stream("cuStreamQuery", hStream)?;
        d.unsafe_call("cuStreamQuery")?;
        let st = &d.streams[&h];
        if st.done < st.enqueued {
            return Err(R::CUDA_ERROR_NOT_READY);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCtx(hStream: sys::CUstream, pctx: *mut sys::CUcontext) -> R {
    with("cuStreamGetCtx", |d| {
        let h = d.stream("cuStreamGetCtx", hStream)?;
        put(pctx, d.streams[&h].ctx as sys::CUcontext)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(
    hStream: sys::CUstream,
    captureStatus: *mut sys::CUstreamCaptureStatus,
) -> R {
    use sys::CUstreamCaptureStatus as S;
    with("cuStreamIsCapturing", |d| {
        let h = d.stream("cuStreamIsCapturing", hStream)?;
        if d.legacy_held_by_capture(h) {
            return Err(R::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
        }
        let status = if d.streams[&h].capture.is_some() {
            S::CU_STREAM_CAPTURE_STATUS_ACTIVE
        } else {
            S::CU_STREAM_CAPTURE_STATUS_NONE
        };
        put(captureStatus, status)
    })
}

/// The calling thread's interaction mode with graph captures: swaps
/// `*mode` with it (no driver state: it is the thread's).
#[no_mangle]
pub unsafe extern "C" fn cuThreadExchangeStreamCaptureMode(
    mode: *mut sys::CUstreamCaptureMode,
) -> R {
    since("cuThreadExchangeStreamCaptureMode", 10010);
    if mode.is_null() {
        return R::CUDA_ERROR_INVALID_VALUE;
    }
    let new = mode.read();
    mode.write(CAPTURE_MODE.with(|m| m.replace(new)));
    R::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(
    hStream: sys::CUstream,
    mode: sys::CUstreamCaptureMode,
) -> R {
    with("cuStreamBeginCapture", |d| {
        let h = created_stream(d, "cuStreamBeginCapture", hStream)
            .map_err(|_| R::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)?;
        let s = d.streams.get_mut(&h).unwrap();
        if s.capture.is_some() {
            return Err(R::CUDA_ERROR_ILLEGAL_STATE);
        }
        s.capture = Some((mode, std::thread::current().id()));
        s.capture_invalidated = false;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(
    hStream: sys::CUstream,
    phGraph: *mut sys::CUgraph,
) -> R {
    with("cuStreamEndCapture", |d| {
        let h = created_stream(d, "cuStreamEndCapture", hStream)?;
        let s = d.streams.get_mut(&h).unwrap();
        if s.capture.take().is_none() {
            note(
                "cuStreamEndCapture",
                format!("{hStream:?} is not capturing"),
            );
            return Err(R::CUDA_ERROR_ILLEGAL_STATE);
        }
        if s.capture_invalidated {
            note(
                "cuStreamEndCapture",
                "the capture was invalidated by a prohibited call",
            );
            put(phGraph, std::ptr::null_mut())?;
            return Err(R::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
        }
        // An empty graph: no work can have been captured (`work_on`).
        let g = d.handle();
        d.graphs.push(g);
        put(phGraph, g as sys::CUgraph)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(hGraph: sys::CUgraph) -> R {
    with("cuGraphDestroy", |d| {
        match d.graphs.iter().position(|&g| g == hGraph as usize) {
            Some(i) => {
                d.graphs.swap_remove(i);
                Ok(())
            }
            None => {
                note("cuGraphDestroy", format!("{hGraph:?} is not a graph"));
                Err(R::CUDA_ERROR_INVALID_VALUE)
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(
    hStream: sys::CUstream,
    hEvent: sys::CUevent,
    Flags: c_uint,
) -> R {
    with("cuStreamWaitEvent", |d| {
        let e = live_event(d, "cuStreamWaitEvent", hEvent)?;
        if Flags != 0 {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        // The work recorded so far (none: nothing to wait for).
        let generation = d.events[&e].recorded;
        d.enqueue(
            "cuStreamWaitEvent",
            hStream,
            Op::WaitEvent {
                event: e,
                generation,
            },
        )
        .map(|_| ())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(
    hStream: sys::CUstream,
    fn_: sys::CUhostFn,
    userData: *mut c_void,
) -> R {
    with("cuLaunchHostFunc", |d| {
        let Some(f) = fn_ else {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        };
        let op = Op::HostFn {
            f,
            data: userData as usize,
        };
        d.enqueue("cuLaunchHostFunc", hStream, op).map(|_| ())
    })
}

// ------------------------------------------------------------ events

fn live_event(d: &Driver, what: &str, e: sys::CUevent) -> Result<usize, R> {
    let h = e as usize;
    if d.events.get(&h).is_some_and(|e| e.live) {
        Ok(h)
    } else {
        note(what, format!("{e:?} is not a live event"));
        Err(R::CUDA_ERROR_INVALID_HANDLE)
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(phEvent: *mut sys::CUevent, Flags: c_uint) -> R {
    with("cuEventCreate", |d| {
        let ctx = need_ctx("cuEventCreate")?;
        let _ = Flags; // timing and blocking-sync hints
        let h = d.handle();
        put(phEvent, h as sys::CUevent)?;
        let event = Event {
            ctx,
            recorded: 0,
            completed: 0,
            live: true,
        };
        d.events.insert(h, event);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(hEvent: sys::CUevent) -> R {
    with("cuEventDestroy", |d| {
        let e = live_event(d, "cuEventDestroy", hEvent)?;
        // Kept for queued records and waits; the handle is dead.
        d.events.get_mut(&e).unwrap().live = false;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(hEvent: sys::CUevent, hStream: sys::CUstream) -> R {
    with("cuEventRecord", |d| {
        if d.fail_event_record.due() {
            return Err(R::CUDA_ERROR_UNKNOWN);
        }
        let e = live_event(d, "cuEventRecord", hEvent)?;
        let h = d.work_on("cuEventRecord", hStream)?;
        if d.streams[&h].ctx != d.events[&e].ctx {
            note("cuEventRecord", "event and stream of different contexts");
            return Err(R::CUDA_ERROR_INVALID_HANDLE);
        }
        let ev = d.events.get_mut(&e).unwrap();
        ev.recorded += 1;
        let generation = ev.recorded;
        d.push(
            h,
            Op::Record {
                event: e,
                generation,
            },
        );
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(hEvent: sys::CUevent) -> R {
    with("cuEventQuery", |d| {
        let e = live_event(d, "cuEventQuery", hEvent)?;
        d.unsafe_call("cuEventQuery")?;
        let e = &d.events[&e];
        if e.completed < e.recorded {
            return Err(R::CUDA_ERROR_NOT_READY);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(hEvent: sys::CUevent) -> R {
    with_wait("cuEventSynchronize", |d| {
        let e = live_event(d, "cuEventSynchronize", hEvent)?;
        d.unsafe_call("cuEventSynchronize")?;
        let g = d.events[&e].recorded;
        Ok(Box::new(move |d: &Driver| d.events[&e].completed >= g))
    })
}

// ------------------------------------------------------------ memory

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut sys::CUdeviceptr, bytesize: usize) -> R {
    with("cuMemAlloc", |d| {
        let ctx = need_ctx("cuMemAlloc")?;
        d.unsafe_call("cuMemAlloc")?;
        if dptr.is_null() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let a = d.alloc_device("cuMemAlloc", bytesize)?;
        if ctx != d.primary {
            d.other_context_allocs.insert(a, ctx);
        }
        put(dptr, a)
    })
}

/// The default pool of device 0, the one pool the fake has.
const DEFAULT_POOL: usize = 0x900;

/// Stream-ordered allocation from the default pool: allocated at once (a
/// valid order: before the stream's later work), memory without a context.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut sys::CUdeviceptr,
    bytesize: usize,
    hStream: sys::CUstream,
) -> R {
    let what = "cuMemAllocAsync";
    with(what, |d| {
        d.stream(what, hStream)?;
        if dptr.is_null() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let a = d.alloc_device(what, bytesize)?;
        d.pooled.insert(a);
        put(dptr, a)
    })
}

/// Frees once the whole device has run what was queued before (later than
/// the stream's order asks: a valid order).
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: sys::CUdeviceptr, hStream: sys::CUstream) -> R {
    let what = "cuMemFreeAsync";
    if let Err(e) = ready(what).and_then(|mut d| d.stream(what, hStream)) {
        return e;
    }
    free_after_device(what, |d| {
        if !d.pooled.remove(&dptr) {
            note(what, format!("{dptr:#x} is not memory of a pool"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        d.allocs.remove(&dptr);
        d.free_buffer(what, dptr)
    })
}

/// The default pool's memory is readable and writable from its device.
#[no_mangle]
pub unsafe extern "C" fn cuMemPoolGetAccess(
    flags: *mut sys::CUmemAccess_flags,
    memPool: sys::CUmemoryPool,
    location: *mut sys::CUmemLocation,
) -> R {
    let what = "cuMemPoolGetAccess";
    with(what, |_| {
        if memPool as usize != DEFAULT_POOL || location.is_null() {
            note(what, format!("{memPool:?} is not a pool of the fake"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let location = &*location;
        if location.type_ != sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE {
            note(what, "only device locations are modelled");
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        device_ordinal(what, location.id)?;
        put(
            flags,
            sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        )
    })
}

impl Driver {
    /// Frees the interpreter buffer at `addr` (an allocation or reservation
    /// the caller has just forgotten).
    fn free_buffer(&mut self, what: &str, addr: u64) -> Res {
        self.dev.free(addr).map_err(|e| {
            note(what, e);
            R::CUDA_ERROR_INVALID_VALUE
        })
    }

    /// `bytesize` bytes of device memory, uninitialised like cudaMalloc's
    /// (a kernel reading a byte nothing wrote is an interpreter error).
    fn alloc_device(&mut self, what: &str, bytesize: usize) -> Result<u64, R> {
        if bytesize == 0 {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let used = self.device_memory_used();
        if bytesize > DEVICE_MEMORY - used {
            if trace() {
                note(
                    what,
                    format!("{bytesize} bytes: out of memory ({used} of {DEVICE_MEMORY} in use)"),
                );
            }
            return Err(R::CUDA_ERROR_OUT_OF_MEMORY);
        }
        let a = self.dev.alloc(bytesize);
        self.allocs.insert(a, bytesize);
        if trace() {
            note(what, format!("{bytesize} bytes at {a:#x}"));
        }
        Ok(a)
    }
}

/// Frees what `free` names once the whole device has run what was queued
/// before (the driver's frees synchronise too).
fn free_after_device(what: &str, free: impl FnOnce(&mut Driver) -> Res) -> R {
    let r = with_wait(what, |d| {
        d.unsafe_call(what)?;
        Ok(d.drained(|_| true))
    });
    if r != R::CUDA_SUCCESS {
        return r;
    }
    with(what, free)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: sys::CUdeviceptr) -> R {
    free_after_device("cuMemFree", |d| {
        if d.allocs.remove(&dptr).is_none() {
            note("cuMemFree", format!("{dptr:#x} is not a device allocation"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        d.pooled.remove(&dptr);
        d.other_context_allocs.remove(&dptr);
        d.free_buffer("cuMemFree", dptr)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> R {
    with("cuMemAllocHost", |d| {
        need_ctx("cuMemAllocHost")?;
        d.unsafe_call("cuMemAllocHost")?;
        if bytesize == 0 || pp.is_null() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let layout = Layout::from_size_align(bytesize, PINNED_ALIGN)
            .map_err(|_| R::CUDA_ERROR_OUT_OF_MEMORY)?;
        // SAFETY: a non-zero size.
        let p = std::alloc::alloc(layout);
        if p.is_null() {
            return Err(R::CUDA_ERROR_OUT_OF_MEMORY);
        }
        d.pinned.insert(p as usize, bytesize);
        put(pp, p as *mut c_void)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> R {
    free_after_device("cuMemFreeHost", |d| match d.pinned.remove(&(p as usize)) {
        Some(size) => {
            // SAFETY: allocated by cuMemAllocHost with this layout; no
            // queued copy reads it any more.
            std::alloc::dealloc(
                p as *mut u8,
                Layout::from_size_align(size, PINNED_ALIGN).expect("valid when allocated"),
            );
            Ok(())
        }
        None => {
            note("cuMemFreeHost", format!("{p:?} is not a pinned allocation"));
            Err(R::CUDA_ERROR_INVALID_VALUE)
        }
    })
}

/// Enqueues a copy of `n` host bytes at `src` to `dst` on `s`: pageable
/// bytes are taken now, pinned ones when the copy runs. `wait`: returns
/// once it has run (the synchronous cuMemcpy).
fn copy_to_device(
    what: &str,
    dst: u64,
    src: *const c_void,
    n: usize,
    s: sys::CUstream,
    wait: bool,
) -> R {
    with_wait(what, |d| {
        if n == 0 {
            return Ok(Box::new(|_: &Driver| true));
        }
        d.device_range(what, dst, n)?;
        let src = if d.host_buffer(what, src, n)? {
            HostBytes::Pinned {
                ptr: src as usize,
                n,
            }
        } else {
            // SAFETY: the caller's buffer holds `n` bytes.
            HostBytes::Copied(unsafe { std::slice::from_raw_parts(src as *const u8, n) }.to_vec())
        };
        let (h, count) = d.enqueue(what, s, Op::ToDevice { dst, src })?;
        Ok(if wait {
            Box::new(move |d: &Driver| d.reached(h, count))
        } else {
            Box::new(|_: &Driver| true)
        })
    })
}

/// Enqueues a copy of `n` device bytes at `src` to host memory at `dst`
/// on `s`; returns once it has run when `dst` is pageable or `wait`.
fn copy_to_host(
    what: &str,
    dst: *mut c_void,
    src: u64,
    n: usize,
    s: sys::CUstream,
    wait: bool,
) -> R {
    with_wait(what, |d| {
        if n == 0 {
            return Ok(Box::new(|_: &Driver| true));
        }
        d.device_range(what, src, n)?;
        let pinned = d.host_buffer(what, dst, n)?;
        let op = Op::ToHost {
            dst: dst as usize,
            src,
            n,
        };
        let (h, count) = d.enqueue(what, s, op)?;
        Ok(if wait || !pinned {
            Box::new(move |d: &Driver| d.reached(h, count))
        } else {
            Box::new(|_: &Driver| true)
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dstDevice: sys::CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
) -> R {
    let legacy = std::ptr::null_mut();
    copy_to_device("cuMemcpyHtoD", dstDevice, srcHost, ByteCount, legacy, true)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dstDevice: sys::CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
    hStream: sys::CUstream,
) -> R {
    copy_to_device(
        "cuMemcpyHtoDAsync",
        dstDevice,
        srcHost,
        ByteCount,
        hStream,
        false,
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dstHost: *mut c_void,
    srcDevice: sys::CUdeviceptr,
    ByteCount: usize,
) -> R {
    let legacy = std::ptr::null_mut();
    copy_to_host("cuMemcpyDtoH", dstHost, srcDevice, ByteCount, legacy, true)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dstHost: *mut c_void,
    srcDevice: sys::CUdeviceptr,
    ByteCount: usize,
    hStream: sys::CUstream,
) -> R {
    copy_to_host(
        "cuMemcpyDtoHAsync",
        dstHost,
        srcDevice,
        ByteCount,
        hStream,
        false,
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dstDevice: sys::CUdeviceptr,
    srcDevice: sys::CUdeviceptr,
    ByteCount: usize,
    hStream: sys::CUstream,
) -> R {
    let what = "cuMemcpyDtoDAsync";
    with(what, |d| {
        if ByteCount == 0 {
            return Ok(());
        }
        d.device_range(what, srcDevice, ByteCount)?;
        d.device_range(what, dstDevice, ByteCount)?;
        let op = Op::OnDevice {
            dst: dstDevice,
            src: srcDevice,
            n: ByteCount,
        };
        d.enqueue(what, hStream, op).map(|_| ())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dstDevice: sys::CUdeviceptr,
    ui: c_uint,
    N: usize,
    hStream: sys::CUstream,
) -> R {
    let what = "cuMemsetD32Async";
    with(what, |d| {
        if !dstDevice.is_multiple_of(4) {
            note(what, format!("{dstDevice:#x} is not 4-byte aligned"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        if N == 0 {
            return Ok(());
        }
        d.device_range(what, dstDevice, N * 4)?;
        let op = Op::Memset32 {
            dst: dstDevice,
            value: ui,
            count: N,
        };
        d.enqueue(what, hStream, op).map(|_| ())
    })
}

/// What the fake's pointer attributes say of an address.
struct Described {
    /// 0 unknown, 1 host (pinned), 2 device.
    mem_type: u32,
    start: u64,
    size: usize,
    /// The context it was allocated in (cuMemAlloc, cuMemAllocHost); 0 for
    /// memory of the virtual memory management API and pool memory.
    context: usize,
    mapped: bool,
    /// Device 0's access flags (`CU_POINTER_ATTRIBUTE_ACCESS_FLAGS`).
    access: u32,
    /// `CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE`.
    pool: usize,
    /// The physical mapping (or allocation) around the address.
    mapping: (u64, usize),
}

impl Driver {
    fn describe(&self, ptr: u64) -> Described {
        let unknown = Described {
            mem_type: 0,
            start: 0,
            size: 0,
            context: 0,
            mapped: false,
            access: 0,
            pool: 0,
            mapping: (0, 0),
        };
        let reservation_range = vmm_range_is_reservation();
        match self.place(ptr) {
            // Pool memory has no context. What ACCESS_FLAGS says of it is
            // documented nowhere: the fake answers 0 (no access), the worst
            // case, so a caller must ask the pool (cuMemPoolGetAccess), or
            // refuses it (pool_access_flags_refused); the mapping
            // attributes it refuses (write_attribute).
            Place::Device { base, size } if self.pooled.contains(&base) => Described {
                mem_type: 2,
                start: base,
                size,
                context: 0,
                mapped: true,
                access: 0,
                pool: DEFAULT_POOL,
                mapping: (base, size),
            },
            Place::Device { base, size } => Described {
                mem_type: 2,
                start: base,
                size,
                context: self
                    .other_context_allocs
                    .get(&base)
                    .copied()
                    .unwrap_or(self.primary),
                mapped: true,
                access: 3,
                pool: 0,
                mapping: (base, size),
            },
            Place::Pinned { base, size } => Described {
                mem_type: 1,
                start: base,
                size,
                context: self.primary,
                mapped: true,
                access: 3,
                pool: 0,
                mapping: (base, size),
            },
            Place::Mapped {
                base,
                size,
                reservation,
                reserved,
                ..
            } => {
                let (start, range) = if reservation_range {
                    (reservation, reserved)
                } else {
                    (base, size)
                };
                Described {
                    mem_type: 2,
                    start,
                    size: range,
                    context: 0,
                    mapped: true,
                    access: self.reservations[&reservation]
                        .access
                        .get(&base)
                        .copied()
                        .unwrap_or(0),
                    pool: 0,
                    mapping: (base, size),
                }
            }
            Place::Reserved {
                reservation,
                reserved,
            } if reservation_range => Described {
                mem_type: 2,
                start: reservation,
                size: reserved,
                context: 0,
                mapped: false,
                access: 0,
                pool: 0,
                mapping: (0, 0),
            },
            Place::Reserved { .. } | Place::Unknown => unknown,
        }
    }

    /// Writes attribute `a` (the raw enum value) of `ptr` to `out`.
    unsafe fn write_attribute(&self, what: &str, a: u32, ptr: u64, out: *mut c_void) -> Res {
        use sys::CUpointer_attribute as A;
        if out.is_null() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let d = self.describe(ptr);
        let known = d.mem_type != 0;
        if a == A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE as u32 {
            (out as *mut u32).write(d.mem_type);
        } else if a == A::CU_POINTER_ATTRIBUTE_IS_MANAGED as u32 {
            (out as *mut u32).write(0);
        } else if a == A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL as u32 {
            (out as *mut c_int).write(if known { 0 } else { -2 });
        } else if a == A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR as u32 {
            (out as *mut u64).write(d.start);
        } else if a == A::CU_POINTER_ATTRIBUTE_RANGE_SIZE as u32 {
            let hidden = d.context != 0 && allocation_range_hidden();
            (out as *mut usize).write(if hidden { 0 } else { d.size });
        } else if a == A::CU_POINTER_ATTRIBUTE_CONTEXT as u32 {
            (out as *mut sys::CUcontext).write(d.context as sys::CUcontext);
        } else if a == A::CU_POINTER_ATTRIBUTE_MAPPED as u32 {
            (out as *mut u32).write(d.mapped as u32);
        } else if pointer_attribute_since(a) > driver_version() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        } else if d.pool != 0 && pointer_attribute_since(a) == 11070 {
            // Pool memory is not mapped by cuMemMap: what the driver says of
            // its mapping is documented nowhere. The worst case: a refusal
            // (no note: the modelled driver's answer).
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        } else if a == A::CU_POINTER_ATTRIBUTE_ACCESS_FLAGS as u32
            && if d.pool != 0 {
                pool_access_flags_refused()
            } else {
                d.mapped && d.context == 0 && mapped_access_flags_refused()
            }
        {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        } else if a == A::CU_POINTER_ATTRIBUTE_ACCESS_FLAGS as u32 {
            (out as *mut u32).write(d.access);
        } else if a == A::CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE as u32 {
            (out as *mut usize).write(d.pool);
        } else if a == A::CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR as u32 {
            (out as *mut u64).write(d.mapping.0);
        } else if a == A::CU_POINTER_ATTRIBUTE_MAPPING_SIZE as u32 {
            (out as *mut usize).write(d.mapping.1);
        } else if a == A::CU_POINTER_ATTRIBUTE_DEVICE_POINTER as u32 {
            (out as *mut u64).write(if known { ptr } else { 0 });
        } else if a == A::CU_POINTER_ATTRIBUTE_HOST_POINTER as u32 {
            let host = if d.mem_type == 1 { ptr } else { 0 };
            (out as *mut usize).write(host as usize);
        } else {
            note(what, format!("attribute {a} is not modelled"));
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        Ok(())
    }
}

/// Like the driver: device memory, mapped memory and pinned host memory are
/// described; any other pointer gets NULL (zero) values and success (the
/// documented behaviour of cuPointerGetAttributes, unlike
/// cuPointerGetAttribute).
#[no_mangle]
pub unsafe extern "C" fn cuPointerGetAttributes(
    numAttributes: c_uint,
    attributes: *mut sys::CUpointer_attribute,
    data: *mut *mut c_void,
    ptr: sys::CUdeviceptr,
) -> R {
    let what = "cuPointerGetAttributes";
    with(what, |d| {
        if numAttributes > 0 && (attributes.is_null() || data.is_null()) {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        for i in 0..numAttributes as usize {
            // Read as the raw enum value: a caller's unknown value is an
            // error here, not undefined behaviour.
            let a = (attributes as *const u32).add(i).read();
            d.write_attribute(what, a, ptr, *data.add(i))?;
        }
        Ok(())
    })
}

// ------------------------------------------------------------ virtual memory management

/// The one allocation kind the fake models: pinned memory of device 0.
unsafe fn device_allocation_prop(what: &str, prop: *const sys::CUmemAllocationProp) -> Res {
    if prop.is_null() {
        return Err(R::CUDA_ERROR_INVALID_VALUE);
    }
    let prop = &*prop;
    if prop.type_ != sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED
        || prop.location.type_ != sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
    {
        note(what, "only pinned device memory is modelled");
        return Err(R::CUDA_ERROR_NOT_SUPPORTED);
    }
    device_ordinal(what, prop.location.id)
}

/// `bytes` must be a non-zero multiple of the granularity.
fn granular(what: &str, bytes: u64) -> Res {
    if bytes == 0 || !bytes.is_multiple_of(VMM_GRANULARITY as u64) {
        note(
            what,
            format!("{bytes:#x} is not a multiple of the granularity {VMM_GRANULARITY:#x}"),
        );
        return Err(R::CUDA_ERROR_INVALID_VALUE);
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    prop: *const sys::CUmemAllocationProp,
    _option: sys::CUmemAllocationGranularity_flags,
) -> R {
    let what = "cuMemGetAllocationGranularity";
    with(what, |_| {
        device_allocation_prop(what, prop)?;
        put(granularity, VMM_GRANULARITY)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut sys::CUdeviceptr,
    size: usize,
    alignment: usize,
    addr: sys::CUdeviceptr,
    flags: u64,
) -> R {
    let what = "cuMemAddressReserve";
    with(what, |d| {
        granular(what, size as u64)?;
        if addr != 0 || flags != 0 || (alignment != 0 && alignment > VMM_GRANULARITY) {
            note(
                what,
                "a fixed address, flags or an alignment above the granularity are not modelled",
            );
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        // Address space only: it does not count as device memory in use.
        let base = d.dev.alloc_aligned(size, VMM_GRANULARITY as u64);
        d.reservations.insert(
            base,
            Reservation {
                size,
                mappings: BTreeMap::new(),
                access: BTreeMap::new(),
            },
        );
        put(ptr, base)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAddressFree(ptr: sys::CUdeviceptr, size: usize) -> R {
    let what = "cuMemAddressFree";
    free_after_device(what, |d| {
        match d.reservations.get(&ptr) {
            Some(r) if r.size == size && r.mappings.is_empty() => {}
            Some(r) if r.size == size => {
                note(what, format!("{ptr:#x} is still mapped"));
                return Err(R::CUDA_ERROR_INVALID_VALUE);
            }
            _ => {
                note(what, format!("{ptr:#x} + {size:#x} is not a reservation"));
                return Err(R::CUDA_ERROR_INVALID_VALUE);
            }
        }
        d.reservations.remove(&ptr);
        d.free_buffer(what, ptr)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut sys::CUmemGenericAllocationHandle,
    size: usize,
    prop: *const sys::CUmemAllocationProp,
    flags: u64,
) -> R {
    let what = "cuMemCreate";
    with(what, |d| {
        device_allocation_prop(what, prop)?;
        granular(what, size as u64)?;
        if flags != 0 {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        if size > DEVICE_MEMORY - d.device_memory_used() {
            return Err(R::CUDA_ERROR_OUT_OF_MEMORY);
        }
        let h = d.handle();
        d.physical.insert(
            h,
            Physical {
                size,
                refs: 1,
                mapped_at: None,
            },
        );
        put(handle, h as sys::CUmemGenericAllocationHandle)
    })
}

impl Driver {
    /// Drops one reference to physical memory `h`: freed at zero refs
    /// once unmapped.
    fn release_physical(&mut self, h: usize) {
        let p = self.physical.get_mut(&h).expect("a live handle");
        p.refs -= 1;
        if p.refs == 0 && p.mapped_at.is_none() {
            self.physical.remove(&h);
        }
    }

    fn live_physical(&self, what: &str, h: sys::CUmemGenericAllocationHandle) -> Result<usize, R> {
        let h = h as usize;
        match self.physical.get(&h) {
            Some(p) if p.refs > 0 => Ok(h),
            _ => {
                note(what, format!("{h:#x} is not a live allocation handle"));
                Err(R::CUDA_ERROR_INVALID_VALUE)
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemRelease(handle: sys::CUmemGenericAllocationHandle) -> R {
    let what = "cuMemRelease";
    with(what, |d| {
        let h = d.live_physical(what, handle)?;
        d.release_physical(h);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemRetainAllocationHandle(
    handle: *mut sys::CUmemGenericAllocationHandle,
    addr: *mut c_void,
) -> R {
    let what = "cuMemRetainAllocationHandle";
    with(what, |d| match d.place(addr as u64) {
        Place::Mapped { handle: h, .. } => {
            put(handle, h as sys::CUmemGenericAllocationHandle)?;
            d.physical.get_mut(&h).expect("mapped memory is live").refs += 1;
            Ok(())
        }
        _ => {
            note(what, format!("{addr:?} is not mapped"));
            Err(R::CUDA_ERROR_INVALID_VALUE)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemMap(
    ptr: sys::CUdeviceptr,
    size: usize,
    offset: usize,
    handle: sys::CUmemGenericAllocationHandle,
    flags: u64,
) -> R {
    let what = "cuMemMap";
    with(what, |d| {
        let h = d.live_physical(what, handle)?;
        let physical = &d.physical[&h];
        if offset != 0 || size != physical.size || flags != 0 {
            note(what, "only whole allocations at offset 0 are modelled");
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        if let Some(at) = physical.mapped_at {
            note(
                what,
                format!(
                    "handle {h:#x} is mapped at {at:#x} already (one mapping each is modelled)"
                ),
            );
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        granular(what, ptr)?;
        let reservation = match d.place(ptr) {
            Place::Reserved {
                reservation,
                reserved,
            } if ptr + size as u64 <= reservation + reserved as u64 => reservation,
            _ => {
                note(
                    what,
                    format!("{ptr:#x} + {size:#x} is not unmapped reserved address space"),
                );
                return Err(R::CUDA_ERROR_INVALID_VALUE);
            }
        };
        let r = d.reservations.get_mut(&reservation).expect("just found");
        if r.mappings.range(ptr..ptr + size as u64).next().is_some() {
            note(what, format!("{ptr:#x} + {size:#x} overlaps a mapping"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        r.mappings.insert(ptr, (size, h));
        d.physical.get_mut(&h).expect("live").mapped_at = Some(ptr);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemUnmap(ptr: sys::CUdeviceptr, size: usize) -> R {
    let what = "cuMemUnmap";
    // Like a free: once the device has run what was queued before.
    free_after_device(what, |d| {
        let end = ptr + size as u64;
        // Whole mappings, one after another from `ptr` to `end`.
        let reservation = match d.place(ptr) {
            Place::Mapped {
                base, reservation, ..
            } if base == ptr && d.mapped_through(ptr, size) => reservation,
            _ => {
                note(what, format!("{ptr:#x} + {size:#x} is not a mapped range"));
                return Err(R::CUDA_ERROR_INVALID_VALUE);
            }
        };
        let r = d.reservations.get_mut(&reservation).expect("just found");
        let last = r
            .mappings
            .range(ptr..end)
            .next_back()
            .map(|(&a, &(n, _))| a + n as u64);
        if last != Some(end) {
            note(what, format!("{ptr:#x} + {size:#x} ends inside a mapping"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let unmapped: Vec<usize> = r.mappings.range(ptr..end).map(|(_, &(_, h))| h).collect();
        r.mappings.retain(|&a, _| a < ptr || a >= end);
        // A new mapping here starts without access again.
        r.access.retain(|&a, _| a < ptr || a >= end);
        for h in unmapped {
            let p = d.physical.get_mut(&h).expect("mapped memory is live");
            p.mapped_at = None;
            if p.refs == 0 {
                d.physical.remove(&h);
            }
        }
        Ok(())
    })
}

/// Access is recorded (and reported by `CU_POINTER_ATTRIBUTE_ACCESS_FLAGS`)
/// for whole mappings, not enforced: kernels may touch any mapped byte.
#[no_mangle]
pub unsafe extern "C" fn cuMemSetAccess(
    ptr: sys::CUdeviceptr,
    size: usize,
    desc: *const sys::CUmemAccessDesc,
    count: usize,
) -> R {
    let what = "cuMemSetAccess";
    with(what, |d| {
        if count == 0 || desc.is_null() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        for i in 0..count {
            let a = &*desc.add(i);
            if a.location.type_ != sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE {
                note(what, "only device locations are modelled");
                return Err(R::CUDA_ERROR_NOT_SUPPORTED);
            }
            device_ordinal(what, a.location.id)?;
        }
        if !d.mapped_through(ptr, size) {
            note(what, format!("{ptr:#x} + {size:#x} is not all mapped"));
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let Place::Mapped {
            base, reservation, ..
        } = d.place(ptr)
        else {
            unreachable!("mapped through")
        };
        let end = ptr + size as u64;
        let r = d.reservations.get_mut(&reservation).expect("mapped");
        let last_end = r
            .mappings
            .range(..end)
            .next_back()
            .map(|(&a, &(n, _))| a + n as u64);
        if base != ptr || last_end != Some(end) {
            note(
                what,
                format!("{ptr:#x} + {size:#x}: access to part of a mapping is not modelled"),
            );
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        // The last descriptor for device 0 wins.
        let flags = (*desc.add(count - 1)).flags as u32;
        let bases: Vec<u64> = r.mappings.range(ptr..end).map(|(&a, _)| a).collect();
        for a in bases {
            r.access.insert(a, flags);
        }
        Ok(())
    })
}

// ------------------------------------------------------------ modules

/// Not a driver function: what the driver holds now, in all contexts, for
/// tests of what a process loads and leaks (found with `dlsym`; the tests
/// declare the same struct).
#[repr(C)]
pub struct FakeCudaHolds {
    pub modules: usize,
    pub device_allocations: usize,
    pub pinned_allocations: usize,
    pub streams: usize,
    pub events: usize,
}

#[no_mangle]
pub extern "C" fn fake_cuda_holds() -> FakeCudaHolds {
    let d = driver();
    FakeCudaHolds {
        modules: d.modules.len(),
        device_allocations: d.allocs.len(),
        pinned_allocations: d.pinned.len(),
        // Destroyed ones stay until their queued work has run.
        streams: d.streams.values().filter(|s| !s.destroyed).count(),
        events: d.events.values().filter(|e| e.live).count(),
    }
}

/// Not a driver function: makes the `n`-th `cuLaunchKernel` call from now
/// (1: the next) fail with `CUDA_ERROR_OUT_OF_MEMORY` (a launch's failure
/// lra must not report as retryable), launching nothing, for tests of a
/// step that fails half-way (0: none).
#[no_mangle]
pub extern "C" fn fake_cuda_fail_launch(n: u64) {
    driver().fail_launch = FailIn(n);
}

/// Not a driver function: makes the `n`-th `cuEventRecord` call from now
/// (1: the next) fail with `CUDA_ERROR_UNKNOWN`, recording nothing, for
/// tests of what a failed record leaves (0: none).
#[no_mangle]
pub extern "C" fn fake_cuda_fail_event_record(n: u64) {
    driver().fail_event_record = FailIn(n);
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut sys::CUmodule,
    image: *const c_void,
    numOptions: c_uint,
    options: *mut sys::CUjit_option,
    optionValues: *mut *mut c_void,
) -> R {
    use sys::CUjit_option as O;
    with("cuModuleLoadDataEx", |d| {
        need_ctx("cuModuleLoadDataEx")?;
        d.unsafe_call("cuModuleLoadDataEx")?;
        if image.is_null() || module.is_null() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let (mut log, mut log_len): (*mut u8, usize) = (std::ptr::null_mut(), 0);
        for i in 0..numOptions as usize {
            let o = (options as *const u32).add(i).read();
            let v = *optionValues.add(i);
            if o == O::CU_JIT_ERROR_LOG_BUFFER as u32 {
                log = v as *mut u8;
            } else if o == O::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES as u32 {
                log_len = v as usize;
            } else {
                note(
                    "cuModuleLoadDataEx",
                    format!("JIT option {o} is not modelled"),
                );
                return Err(R::CUDA_ERROR_NOT_SUPPORTED);
            }
        }
        let text = CStr::from_ptr(image as *const c_char).to_string_lossy();
        if let Some(refusal) = jit_refusal(&text) {
            // What an older driver's JIT says (no note: the modelled
            // driver's answer).
            write_log(log, log_len, &refusal);
            return Err(R::CUDA_ERROR_UNSUPPORTED_PTX_VERSION);
        }
        match Module::load(&text) {
            Ok(m) => {
                let h = d.handle();
                d.modules.insert(h, Arc::new(m));
                put(module, h as sys::CUmodule)
            }
            Err(e) => {
                note("cuModuleLoadDataEx", &e);
                write_log(log, log_len, &e.to_string());
                Err(R::CUDA_ERROR_INVALID_PTX)
            }
        }
    })
}

/// Writes `msg` into a JIT log buffer of `len` bytes (NUL-terminated,
/// cut to fit), as `CU_JIT_ERROR_LOG_BUFFER` is filled.
unsafe fn write_log(log: *mut u8, len: usize, msg: &str) {
    if !log.is_null() && len > 0 {
        let n = msg.len().min(len - 1);
        std::ptr::copy_nonoverlapping(msg.as_ptr(), log, n);
        log.add(n).write(0);
    }
}

/// The JIT's refusal of a module whose `.version` is newer than
/// `FAKE_CUDA_PTX_ISA` (unset: any version), in a driver's words.
fn jit_refusal(text: &str) -> Option<String> {
    let max = std::env::var("FAKE_CUDA_PTX_ISA").ok()?;
    let version = |v: &str| -> (u32, u32) {
        let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
        (major.parse().unwrap_or(0), minor.parse().unwrap_or(0))
    };
    let (line, asked) = text.lines().enumerate().find_map(|(i, l)| {
        let v = l.trim().strip_prefix(".version")?.trim();
        Some((i + 1, v.to_string()))
    })?;
    (version(&asked) > version(&max)).then(|| {
        format!(
            "ptxas application ptx input, line {line}; fatal   : Unsupported .version {asked}; current version is '{max}'"
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    hfunc: *mut sys::CUfunction,
    hmod: sys::CUmodule,
    name: *const c_char,
) -> R {
    with("cuModuleGetFunction", |d| {
        let m = hmod as usize;
        let Some(module) = d.modules.get(&m) else {
            note("cuModuleGetFunction", format!("{hmod:?} is not a module"));
            return Err(R::CUDA_ERROR_INVALID_HANDLE);
        };
        if name.is_null() {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let name = CStr::from_ptr(name).to_string_lossy().into_owned();
        if !module.kernel_names().contains(&name.as_str()) {
            note("cuModuleGetFunction", format!("no kernel named {name}"));
            return Err(R::CUDA_ERROR_NOT_FOUND);
        }
        let h = d.handle();
        put(hfunc, h as sys::CUfunction)?;
        d.functions.insert(h, (m, name));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(hmod: sys::CUmodule) -> R {
    with("cuModuleUnload", |d| {
        let m = hmod as usize;
        if d.modules.remove(&m).is_none() {
            note("cuModuleUnload", format!("{hmod:?} is not a module"));
            return Err(R::CUDA_ERROR_INVALID_HANDLE);
        }
        d.functions.retain(|_, (owner, _)| *owner != m);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    numBlocks: *mut c_int,
    func: sys::CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
) -> R {
    with("cuOccupancyMaxActiveBlocksPerMultiprocessor", |d| {
        if !d.functions.contains_key(&(func as usize)) {
            return Err(R::CUDA_ERROR_INVALID_HANDLE);
        }
        if !(1..=1024).contains(&blockSize) {
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        let _ = dynamicSMemSize;
        put(numBlocks, BLOCKS_PER_SM)
    })
}

/// The CUDA error a failed interpreted launch reports.
fn launch_error(kind: ErrorKind) -> R {
    match kind {
        ErrorKind::Launch => R::CUDA_ERROR_INVALID_VALUE,
        ErrorKind::OutOfBounds => R::CUDA_ERROR_ILLEGAL_ADDRESS,
        ErrorKind::Misaligned => R::CUDA_ERROR_MISALIGNED_ADDRESS,
        ErrorKind::Load => R::CUDA_ERROR_INVALID_PTX,
        ErrorKind::Deadlock | ErrorKind::StepLimit => R::CUDA_ERROR_LAUNCH_TIMEOUT,
        ErrorKind::Race | ErrorKind::Barrier | ErrorKind::Warp | ErrorKind::Undefined => {
            R::CUDA_ERROR_LAUNCH_FAILED
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: sys::CUfunction,
    gridDimX: c_uint,
    gridDimY: c_uint,
    gridDimZ: c_uint,
    blockDimX: c_uint,
    blockDimY: c_uint,
    blockDimZ: c_uint,
    sharedMemBytes: c_uint,
    hStream: sys::CUstream,
    kernelParams: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> R {
    with("cuLaunchKernel", |d| {
        if d.fail_launch.due() {
            // As a driver refuses a launch (no note: asked for).
            return Err(R::CUDA_ERROR_OUT_OF_MEMORY);
        }
        if !extra.is_null() {
            note(
                "cuLaunchKernel",
                "`extra` parameter packing is not modelled",
            );
            return Err(R::CUDA_ERROR_NOT_SUPPORTED);
        }
        let Some((m, name)) = d.functions.get(&(f as usize)).cloned() else {
            note("cuLaunchKernel", format!("{f:?} is not a function"));
            return Err(R::CUDA_ERROR_INVALID_HANDLE);
        };
        let module = d.modules[&m].clone();
        let params = module.kernel_params(&name).expect("a loaded kernel");
        if !params.is_empty() && kernelParams.is_null() {
            note(
                "cuLaunchKernel",
                format!("{name} takes parameters, none given"),
            );
            return Err(R::CUDA_ERROR_INVALID_VALUE);
        }
        // Each `kernelParams[i]` points at the value of parameter i, of the
        // size the kernel declares; the values are taken now.
        let args: Vec<Arg> = params
            .iter()
            .enumerate()
            .map(|(i, (_, size))| {
                let p = *kernelParams.add(i) as *const u8;
                Arg::Bytes(std::slice::from_raw_parts(p, *size).to_vec())
            })
            .collect();
        let mut cfg = LaunchConfig::linear(1, 1);
        cfg.grid = [gridDimX, gridDimY, gridDimZ];
        cfg.block = [blockDimX, blockDimY, blockDimZ];
        cfg.dynamic_shared = sharedMemBytes as usize;
        let op = Op::Launch {
            module,
            name,
            cfg,
            args,
        };
        d.enqueue("cuLaunchKernel", hStream, op).map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver initialised and the primary context current on this
    /// thread (tests run on threads of their own).
    fn setup() {
        // SAFETY: out-parameters.
        unsafe {
            assert_eq!(cuInit(0), R::CUDA_SUCCESS);
            let mut ctx = std::ptr::null_mut();
            assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, 0), R::CUDA_SUCCESS);
            assert_eq!(cuCtxSetCurrent(ctx), R::CUDA_SUCCESS);
        }
    }

    /// (memory type, ordinal, range start, range size) of `ptr`.
    fn attributes(ptr: u64) -> (u32, i32, u64, usize) {
        use sys::CUpointer_attribute as A;
        let (mut ty, mut ordinal, mut start, mut size) = (7u32, 7i32, 7u64, 7usize);
        let mut attrs = [
            A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            A::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        ];
        let mut data: [*mut c_void; 4] = [
            &mut ty as *mut u32 as *mut c_void,
            &mut ordinal as *mut i32 as *mut c_void,
            &mut start as *mut u64 as *mut c_void,
            &mut size as *mut usize as *mut c_void,
        ];
        // SAFETY: each data pointer matches its attribute's type.
        let r = unsafe { cuPointerGetAttributes(4, attrs.as_mut_ptr(), data.as_mut_ptr(), ptr) };
        assert_eq!(r, R::CUDA_SUCCESS);
        (ty, ordinal, start, size)
    }

    #[test]
    fn pointer_attributes_describe_device_pinned_and_unknown_memory() {
        setup();
        // SAFETY: out-parameters; the pointers are freed once.
        unsafe {
            let mut dev = 0;
            assert_eq!(cuMemAlloc_v2(&mut dev, 64), R::CUDA_SUCCESS);
            assert_ne!(dev, 0);
            assert_eq!(attributes(dev + 8), (2, 0, dev, 64));
            assert_eq!(attributes(dev + 64).0, 0, "one past the end");
            let mut host = std::ptr::null_mut();
            assert_eq!(cuMemAllocHost_v2(&mut host, 100), R::CUDA_SUCCESS);
            assert_eq!(attributes(host as u64 + 99), (1, 0, host as u64, 100));
            let plain = [0u8; 4];
            assert_eq!(attributes(plain.as_ptr() as u64).0, 0);
            assert_eq!(cuMemFree_v2(dev), R::CUDA_SUCCESS);
            assert_eq!(attributes(dev).0, 0, "freed");
            assert_eq!(cuMemFree_v2(dev), R::CUDA_ERROR_INVALID_VALUE);
            assert_eq!(cuMemFreeHost(host), R::CUDA_SUCCESS);
        }
    }

    const STORE_KERNEL: &str = "
.version 7.0
.target sm_70
.address_size 64
.visible .entry store(.param .u64 p_at, .param .u32 p_value)
{
    .reg .b64 %a;
    .reg .b32 %v;
    ld.param.u64 %a, [p_at];
    ld.param.u32 %v, [p_value];
    st.global.u32 [%a], %v;
    exit;
}
";

    #[test]
    fn launches_pass_their_parameters_and_faults_are_sticky() {
        setup();
        // SAFETY: out-parameters and parameter values that outlive the
        // launch calls (which take the values).
        unsafe {
            let text = CString::new(STORE_KERNEL).unwrap();
            let (mut module, mut func) = (std::ptr::null_mut(), std::ptr::null_mut());
            let r = cuModuleLoadDataEx(
                &mut module,
                text.as_ptr() as *const c_void,
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            assert_eq!(r, R::CUDA_SUCCESS);
            assert_eq!(
                cuModuleGetFunction(&mut func, module, c"store".as_ptr()),
                R::CUDA_SUCCESS
            );
            let mut buf = 0;
            assert_eq!(cuMemAlloc_v2(&mut buf, 16), R::CUDA_SUCCESS);
            let launch = |at: u64, value: u32| {
                let (mut at, mut value) = (at, value);
                let mut params = [
                    &mut at as *mut u64 as *mut c_void,
                    &mut value as *mut u32 as *mut c_void,
                ];
                cuLaunchKernel(
                    func,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    0,
                    std::ptr::null_mut(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(launch(buf + 4, 0xC0DE), R::CUDA_SUCCESS);
            let mut back = 0u32;
            let r = cuMemcpyDtoH_v2(&mut back as *mut u32 as *mut c_void, buf + 4, 4);
            assert_eq!((r, back), (R::CUDA_SUCCESS, 0xC0DE));
            // A fault in a context of its own: it poisons that context.
            let mut ctx = std::ptr::null_mut();
            assert_eq!(cuCtxCreate_v2(&mut ctx, 0, 0), R::CUDA_SUCCESS);
            assert_eq!(launch(buf + 16, 1), R::CUDA_SUCCESS, "reported later");
            assert_eq!(cuCtxSynchronize(), R::CUDA_ERROR_ILLEGAL_ADDRESS);
            assert_eq!(launch(buf + 4, 1), R::CUDA_ERROR_ILLEGAL_ADDRESS);
            assert_eq!(cuCtxDestroy_v2(ctx), R::CUDA_SUCCESS);
            // The primary context is untouched, the write after the fault
            // never ran.
            let mut back = 0u32;
            let r = cuMemcpyDtoH_v2(&mut back as *mut u32 as *mut c_void, buf + 4, 4);
            assert_eq!((r, back), (R::CUDA_SUCCESS, 0xC0DE));
            assert_eq!(cuMemFree_v2(buf), R::CUDA_SUCCESS);
            assert_eq!(cuModuleUnload(module), R::CUDA_SUCCESS);
        }
    }

    /// A host function holds its stream; another stream waits for it
    /// through an event; nothing waits on the host until asked to.
    #[test]
    fn streams_run_asynchronously_in_order_and_wait_for_events() {
        setup();
        static OPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        unsafe extern "C" fn hold(_: *mut c_void) {
            while !OPEN.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // SAFETY: out-parameters on handles made here; `word` outlives
        // the copies (the stream is synchronised before it goes).
        unsafe {
            let (mut a, mut b, mut ev, mut dev) = (
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
            assert_eq!(cuStreamCreate(&mut a, 1), R::CUDA_SUCCESS);
            assert_eq!(cuStreamCreate(&mut b, 1), R::CUDA_SUCCESS);
            assert_eq!(cuEventCreate(&mut ev, 2), R::CUDA_SUCCESS);
            assert_eq!(cuMemAlloc_v2(&mut dev, 4), R::CUDA_SUCCESS);
            assert_eq!(
                cuLaunchHostFunc(a, Some(hold), std::ptr::null_mut()),
                R::CUDA_SUCCESS
            );
            assert_eq!(cuMemsetD32Async(dev, 7, 1, a), R::CUDA_SUCCESS);
            assert_eq!(cuEventRecord(ev, a), R::CUDA_SUCCESS);
            assert_eq!(cuStreamWaitEvent(b, ev, 0), R::CUDA_SUCCESS);
            let mut pinned = std::ptr::null_mut();
            assert_eq!(cuMemAllocHost_v2(&mut pinned, 4), R::CUDA_SUCCESS);
            let word = pinned as *mut u32;
            word.write(0);
            assert_eq!(cuMemcpyDtoHAsync_v2(pinned, dev, 4, b), R::CUDA_SUCCESS);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(cuStreamQuery(a), R::CUDA_ERROR_NOT_READY);
            assert_eq!(cuStreamQuery(b), R::CUDA_ERROR_NOT_READY);
            assert_eq!(cuEventQuery(ev), R::CUDA_ERROR_NOT_READY);
            assert_eq!(word.read_volatile(), 0, "the copy waits for the event");
            OPEN.store(true, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(cuStreamSynchronize(b), R::CUDA_SUCCESS);
            assert_eq!(word.read_volatile(), 7);
            assert_eq!(cuEventQuery(ev), R::CUDA_SUCCESS);
            assert_eq!(cuStreamQuery(a), R::CUDA_SUCCESS);
            for s in [a, b] {
                assert_eq!(cuStreamDestroy_v2(s), R::CUDA_SUCCESS);
            }
            assert_eq!(cuEventDestroy_v2(ev), R::CUDA_SUCCESS);
            assert_eq!(cuMemFreeHost(pinned), R::CUDA_SUCCESS);
            assert_eq!(cuMemFree_v2(dev), R::CUDA_SUCCESS);
        }
    }

    #[test]
    fn work_on_a_capturing_stream_is_refused_not_run() {
        setup();
        // SAFETY: out-parameters on handles made here.
        unsafe {
            let (mut s, mut dev, mut graph) = (std::ptr::null_mut(), 0, std::ptr::null_mut());
            assert_eq!(cuStreamCreate(&mut s, 1), R::CUDA_SUCCESS);
            assert_eq!(cuMemAlloc_v2(&mut dev, 16), R::CUDA_SUCCESS);
            let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
            assert_eq!(cuStreamBeginCapture_v2(s, mode), R::CUDA_SUCCESS);
            let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
            assert_eq!(cuStreamIsCapturing(s, &mut status), R::CUDA_SUCCESS);
            assert_eq!(
                status,
                sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE
            );
            assert_eq!(cuMemsetD32Async(dev, 0, 4, s), R::CUDA_ERROR_NOT_SUPPORTED);
            assert_eq!(cuStreamEndCapture(s, &mut graph), R::CUDA_SUCCESS);
            assert_eq!(cuGraphDestroy(graph), R::CUDA_SUCCESS);
            assert_eq!(cuMemsetD32Async(dev, 0, 4, s), R::CUDA_SUCCESS);
            assert_eq!(cuStreamDestroy_v2(s), R::CUDA_SUCCESS);
            assert_eq!(cuStreamQuery(s), R::CUDA_ERROR_INVALID_HANDLE);
            assert_eq!(cuMemFree_v2(dev), R::CUDA_SUCCESS);
        }
    }
}
