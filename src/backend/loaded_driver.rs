//! Device memory handed to a host handle.
//!
//! A host (`device = 0`) handle reads and writes the caller's pointers
//! itself, so CUDA device memory handed to one (a CUDA tensor passed to the
//! wrong handle) would crash the caller's process. Only a process that has
//! loaded the CUDA driver can hold device memory: then lra asks that driver
//! about each new pointer of a host handle. A process without the driver is
//! never made to load it, and a driver that cannot tell (not initialised,
//! an error) leaves the pointer accepted, as without a driver.

use cudarc::driver::sys::{CUmemorytype, CUpointer_attribute, CUstreamCaptureMode};
use once_cell::sync::OnceCell;
use std::ffi::c_void;

type GetAttributes = unsafe extern "C" fn(u32, *mut u32, *mut *mut c_void, u64) -> u32;
type ExchangeCaptureMode = unsafe extern "C" fn(*mut u32) -> u32;

/// The functions of the driver the process has loaded. Its library stays
/// loaded: the `dlopen` reference taken to find them is never dropped.
struct Driver {
    get_attributes: GetAttributes,
    exchange_capture_mode: Option<ExchangeCaptureMode>,
}

static DRIVER: OnceCell<Driver> = OnceCell::new();

/// The driver, if the process has loaded it (asked again while it has not).
#[cfg(all(unix, not(miri)))]
fn loaded_driver() -> Option<&'static Driver> {
    DRIVER
        .get_or_try_init(|| {
            for name in [c"libcuda.so.1", c"libcuda.so"] {
                // SAFETY: RTLD_NOLOAD only looks the name up among the
                // libraries already loaded; it runs no initialiser.
                let lib =
                    unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
                if lib.is_null() {
                    continue;
                }
                // SAFETY: symbol lookups in a loaded library.
                let (get, exchange) = unsafe {
                    (
                        libc::dlsym(lib, c"cuPointerGetAttributes".as_ptr()),
                        libc::dlsym(lib, c"cuThreadExchangeStreamCaptureMode".as_ptr()),
                    )
                };
                if get.is_null() {
                    // SAFETY: the reference taken above.
                    unsafe { libc::dlclose(lib) };
                    continue;
                }
                // SAFETY: the driver API's signatures of these symbols
                // (enums are 32-bit, CUdeviceptr is 64-bit).
                return Ok(unsafe {
                    Driver {
                        get_attributes: std::mem::transmute::<*mut c_void, GetAttributes>(get),
                        exchange_capture_mode: (!exchange.is_null()).then(|| {
                            std::mem::transmute::<*mut c_void, ExchangeCaptureMode>(exchange)
                        }),
                    }
                });
            }
            Err(())
        })
        .ok()
}

/// (Miri cannot call into a loaded library; it runs without a driver.)
#[cfg(any(not(unix), miri))]
fn loaded_driver() -> Option<&'static Driver> {
    None
}

/// True when the loaded CUDA driver says `ptr` is device memory that the
/// host cannot access: not managed memory, not pinned host memory.
pub fn is_device_memory(ptr: *const c_void) -> bool {
    let Some(d) = loaded_driver() else {
        return false;
    };
    let mut attributes = [
        CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE as u32,
        CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED as u32,
    ];
    let (mut memory_type, mut managed) = (0u32, 0u32);
    let mut data = [
        (&mut memory_type as *mut u32).cast::<c_void>(),
        (&mut managed as *mut u32).cast::<c_void>(),
    ];
    // Relaxed capture mode for the query, as the CUDA backend's driver
    // calls: another thread's graph capture must not refuse it (nor be
    // invalidated by it).
    let mut mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED as u32;
    // SAFETY: the driver's functions with valid out-parameters; a
    // pointer query reads nothing at `ptr`.
    unsafe {
        let exchanged = d.exchange_capture_mode.is_some_and(|f| f(&mut mode) == 0);
        let r = (d.get_attributes)(2, attributes.as_mut_ptr(), data.as_mut_ptr(), ptr as u64);
        if exchanged {
            if let Some(f) = d.exchange_capture_mode {
                f(&mut mode);
            }
        }
        r == 0 && memory_type == CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 && managed == 0
    }
}
