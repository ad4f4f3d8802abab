//! Device memory handed to a host handle.
//!
//! A host (`device = 0`) handle reads and writes the caller's pointers
//! itself, so CUDA device memory handed to one (a CUDA tensor passed to the
//! wrong handle) would crash the caller's process. Only a process that has
//! loaded the CUDA driver can hold device memory: then lra asks that driver
//! about a host handle's new pointers. A process without the driver is
//! never made to load it (whether it is loaded is read from the dynamic
//! linker's list of loaded objects, which touches no file), and a driver
//! that cannot tell (not initialised, an error) leaves the pointers
//! accepted, as without a driver.

use cudarc::driver::sys::{CUmemorytype, CUpointer_attribute, CUstreamCaptureMode};
use once_cell::sync::OnceCell;
use std::ffi::c_void;

type GetAttributes = unsafe extern "C" fn(u32, *mut u32, *mut *mut c_void, u64) -> u32;
type ExchangeCaptureMode = unsafe extern "C" fn(*mut u32) -> u32;

/// The functions of the driver the process has loaded. Its library stays
/// loaded: the `dlopen` reference taken to find them is never dropped.
#[cfg_attr(any(not(target_os = "linux"), miri), allow(dead_code))]
struct Driver {
    get_attributes: GetAttributes,
    exchange_capture_mode: Option<ExchangeCaptureMode>,
    /// The process that found it: a child forked from a process that used
    /// CUDA may not call the driver (CUDA does not support it), so there
    /// the pointers are accepted unasked.
    pid: u32,
}

#[cfg_attr(any(not(target_os = "linux"), miri), allow(dead_code))]
static DRIVER: OnceCell<Driver> = OnceCell::new();

/// The path of the loaded CUDA driver library (a file name that starts
/// with `libcuda.so`), from the dynamic linker's list.
#[cfg(all(target_os = "linux", not(miri)))]
fn loaded_driver_path() -> Option<std::ffi::CString> {
    use std::ffi::{c_int, CStr, CString};
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _: usize,
        found: *mut c_void,
    ) -> c_int {
        // SAFETY: the dynamic linker passes a valid entry whose name is
        // null or a NUL-terminated path; `found` is the Option below.
        unsafe {
            let name = (*info).dlpi_name;
            if name.is_null() {
                return 0;
            }
            let path = CStr::from_ptr(name);
            let file = path
                .to_bytes()
                .rsplit(|&b| b == b'/')
                .next()
                .unwrap_or_default();
            if !file.starts_with(b"libcuda.so") {
                return 0;
            }
            *(found as *mut Option<CString>) = Some(path.to_owned());
            1 // found: stop
        }
    }
    let mut found: Option<CString> = None;
    // SAFETY: `visit` only writes `found`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut found as *mut Option<CString>).cast()) };
    found
}

/// The driver, if the process has loaded it (looked for again while it
/// has not).
#[cfg(all(target_os = "linux", not(miri)))]
fn loaded_driver() -> Option<&'static Driver> {
    DRIVER
        .get_or_try_init(|| {
            let path = loaded_driver_path().ok_or(())?;
            // SAFETY: RTLD_NOLOAD only takes a reference to a library
            // already loaded; it runs no initialiser.
            let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
            if lib.is_null() {
                return Err(());
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
                return Err(());
            }
            // SAFETY: the driver API's signatures of these symbols (enums
            // are 32-bit, CUdeviceptr is 64-bit).
            Ok(unsafe {
                Driver {
                    get_attributes: std::mem::transmute::<*mut c_void, GetAttributes>(get),
                    exchange_capture_mode: (!exchange.is_null())
                        .then(|| std::mem::transmute::<*mut c_void, ExchangeCaptureMode>(exchange)),
                    pid: std::process::id(),
                }
            })
        })
        .ok()
}

/// (Elsewhere, and under Miri, which cannot call into a loaded library:
/// no driver.)
#[cfg(any(not(target_os = "linux"), miri))]
fn loaded_driver() -> Option<&'static Driver> {
    None
}

/// The index of the first of `ptrs` that the loaded CUDA driver says is
/// device memory the host cannot access (not managed memory, not pinned
/// host memory); None when there is none, or no driver to ask.
pub fn first_device_pointer(ptrs: impl IntoIterator<Item = *const c_void>) -> Option<usize> {
    let d = loaded_driver().filter(|d| d.pid == std::process::id())?;
    // Relaxed capture mode for the queries, as the CUDA backend's driver
    // calls: another thread's graph capture must not refuse them (nor be
    // invalidated by them).
    let mut mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED as u32;
    // SAFETY: the driver's function with a valid out-parameter.
    let exchanged = d
        .exchange_capture_mode
        .is_some_and(|f| unsafe { f(&mut mode) } == 0);
    let found = ptrs.into_iter().position(|ptr| {
        let mut attributes = [
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE as u32,
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED as u32,
        ];
        // Zeroed 8-byte slots, as the CUDA backend's query: the flags read
        // the same whether the driver writes 1, 4 or 8 bytes.
        let (mut memory_type, mut managed) = (0u64, 0u64);
        let mut data = [
            (&mut memory_type as *mut u64).cast::<c_void>(),
            (&mut managed as *mut u64).cast::<c_void>(),
        ];
        // SAFETY: valid out-parameters; a pointer query reads nothing at
        // `ptr`.
        let r = unsafe {
            (d.get_attributes)(2, attributes.as_mut_ptr(), data.as_mut_ptr(), ptr as u64)
        };
        r == 0
            && memory_type as u32 == CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
            && managed as u32 == 0
    });
    if exchanged {
        if let Some(f) = d.exchange_capture_mode {
            // SAFETY: gives the thread its mode back.
            unsafe { f(&mut mode) };
        }
    }
    found
}
