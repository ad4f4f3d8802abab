//! The C ABI: the only `extern "C"` code. Every argument is validated here
//! and converted to Rust types; panics are caught so none crosses the
//! boundary; failures return a status and leave a message on the handle
//! (and on the calling thread). No algorithm here.
#![allow(non_camel_case_types)]
// Every exported function states its pointer contract in its doc comment and
// checks what can be checked (NULL, alignment, handle liveness); the C caller
// owns the rest, as with any C API.
#![allow(clippy::missing_safety_doc)]

use crate::backend::{overlaps, TensorDesc};
use crate::config::{Config, Device, ReevalSchedule};
use crate::controller::{ReevalResult, Settings};
use crate::engine::{Counters, Engine};
use crate::error::{Error, Result, Status};
use crate::fail;
use crate::optim::{DType, Hyper, OptimizerKind};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// Status of every fallible call (`LRA_OK` = 0).
pub type lra_status = u32;
pub const LRA_OK: lra_status = 0;
/// A required pointer argument was NULL.
pub const LRA_NULL_POINTER: lra_status = 1;
/// An argument was out of range, misaligned, aliased or of the wrong kind.
pub const LRA_INVALID_ARGUMENT: lra_status = 2;
/// `lra_create` rejected a configuration field (the message names it).
pub const LRA_INVALID_CONFIG: lra_status = 3;
/// A call came out of order (e.g. `lra_report_reeval` with no pending step,
/// or a call on a handle from inside its own reduction callback).
pub const LRA_CALL_ORDER: lra_status = 4;
/// Tensor count, size or dtype differs from the first step.
pub const LRA_SIZE_MISMATCH: lra_status = 5;
/// A CUDA handle was asked for, but there is no driver or no device.
pub const LRA_NO_CUDA: lra_status = 6;
/// A CUDA call failed.
pub const LRA_CUDA_ERROR: lra_status = 7;
/// A checkpoint buffer is corrupt, of another version or configuration.
pub const LRA_BAD_CHECKPOINT: lra_status = 8;
/// The caller's buffer is smaller than needed.
pub const LRA_BUFFER_TOO_SMALL: lra_status = 9;
/// A panic was caught inside lra; the handle refuses further calls.
pub const LRA_PANIC: lra_status = 10;
/// Not supported by this build or backend (reserved: no call of this
/// release returns it).
pub const LRA_UNSUPPORTED: lra_status = 11;
/// The registered cross-rank reduction returned non-zero.
pub const LRA_REDUCTION_FAILED: lra_status = 12;
/// Memory for lra's own buffers (the optimizer state: host memory, or
/// device memory for a CUDA handle) could not be allocated; nothing
/// changed, and the call may be retried once memory is freed.
pub const LRA_OUT_OF_MEMORY: lra_status = 13;

/// Wrapped optimizer (`lra_config.optimizer`).
pub type lra_optimizer = u32;
pub const LRA_OPTIMIZER_SGD: lra_optimizer = 0;
pub const LRA_OPTIMIZER_MOMENTUM: lra_optimizer = 1;
pub const LRA_OPTIMIZER_NESTEROV: lra_optimizer = 2;
pub const LRA_OPTIMIZER_ADAGRAD: lra_optimizer = 3;
pub const LRA_OPTIMIZER_RMSPROP: lra_optimizer = 4;
pub const LRA_OPTIMIZER_ADAM: lra_optimizer = 5;
pub const LRA_OPTIMIZER_ADAMW: lra_optimizer = 6;

/// Element type of a tensor's parameters and gradient.
pub type lra_dtype = u32;
pub const LRA_DTYPE_F32: lra_dtype = 0;
pub const LRA_DTYPE_F16: lra_dtype = 1;
pub const LRA_DTYPE_BF16: lra_dtype = 2;

/// Where parameters and gradients live (`lra_config.device`).
pub type lra_device = u32;
pub const LRA_DEVICE_HOST: lra_device = 0;
pub const LRA_DEVICE_CUDA: lra_device = 1;

/// Outcome of a re-evaluation (`lra_reeval_info.decision`).
pub type lra_decision = u32;
pub const LRA_DECISION_KEPT: lra_decision = 0;
pub const LRA_DECISION_RAISED: lra_decision = 1;
pub const LRA_DECISION_LOWERED: lra_decision = 2;
pub const LRA_DECISION_SKIPPED: lra_decision = 3;

/// Why a step or its ratio test was skipped (`lra_reeval_info.skip_reason`).
pub type lra_skip_reason = u32;
pub const LRA_SKIP_NONE: lra_skip_reason = 0;
/// The loss passed to `lra_step` was NaN or ±inf; nothing was written.
pub const LRA_SKIP_NONFINITE_LOSS: lra_skip_reason = 1;
/// A gradient held NaN or ±inf (guard on); nothing was written.
pub const LRA_SKIP_NONFINITE_GRAD: lra_skip_reason = 2;
/// The caller's found-inf flag was non-zero; nothing was written.
pub const LRA_SKIP_FOUND_INF: lra_skip_reason = 3;
/// φ ≤ 0 (no descent predicted): η kept. The step itself was applied
/// with the scale `lra_reeval_info.scale` says (it can be 0, no move: with
/// f* unknown when φ ≤ 0 < φ + R, with f* known when f_i ≤ f*).
pub const LRA_SKIP_NONPOSITIVE_PHI: lra_skip_reason = 4;
/// φ NaN or ±inf (guard off and a bad gradient, or overflow); η kept.
pub const LRA_SKIP_NONFINITE_PHI: lra_skip_reason = 5;
/// Reserved, never reported: a step with s = 0 (f_i ≤ f*) is judged like any
/// other (ALGORITHM.md rule 6: ρ against the unscaled φ/2, so f+ = f_i gives
/// ρ = 0 and η halves). Earlier builds skipped it with this reason; the value
/// is kept so it is not reused and their checkpoints still load.
pub const LRA_SKIP_ZERO_SCALE: lra_skip_reason = 6;

/// When to re-evaluate (`lra_config.reeval_schedule`).
pub type lra_reeval_schedule = u32;
/// Every step (the paper's Algorithm 1).
pub const LRA_REEVAL_ALWAYS: lra_reeval_schedule = 0;
/// Every `reeval_every`-th step (steps 0, k, 2k, ...).
pub const LRA_REEVAL_EVERY: lra_reeval_schedule = 1;
/// Steps 0, 1, 1+⌊r⌋, 1+⌊r⌋+⌊r²⌋, ... (r = `reeval_growth`): the gap ⌊G⌋
/// (at least 1) grows ×r at every due step, reported or not.
pub const LRA_REEVAL_GEOMETRIC: lra_reeval_schedule = 2;

/// Parameter placement across ranks (`lra_config.sharding`).
pub type lra_sharding = u32;
/// Every rank holds all parameters (data parallel, gradients all-reduced).
pub const LRA_SHARDING_REPLICATED: lra_sharding = 0;
/// Each rank holds a disjoint part of the parameters.
pub const LRA_SHARDING_SHARDED: lra_sharding = 1;

/// One parameter tensor and its gradient (same dtype, `numel` elements).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lra_tensor {
    pub param: *mut c_void,
    pub grad: *const c_void,
    pub numel: u64,
    /// An `lra_dtype`.
    pub dtype: u32,
    /// Must be 0; reserved for later use.
    pub reserved: u32,
}

// The layout every binding mirrors: 32 bytes, no padding.
const _: () = assert!(std::mem::size_of::<lra_tensor>() == 32);

/// Configuration. Always fill it with `lra_config_init` first, then change
/// fields; `struct_size` lets later versions grow it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lra_config {
    /// `sizeof(lra_config)`, set by `lra_config_init`.
    pub struct_size: u32,
    /// An `lra_optimizer`.
    pub optimizer: u32,
    /// An `lra_device`.
    pub device: u32,
    /// CUDA device ordinal (ignored on the host).
    pub device_ordinal: i32,
    /// Initial learning rate η (default 1e-3).
    pub lr: f64,
    /// β of Momentum and Nesterov (default 0.5).
    pub momentum: f64,
    /// α of RMSprop (default 0.99).
    pub alpha: f64,
    /// β1 of Adam/AdamW (default 0.5).
    pub beta1: f64,
    /// β2 of Adam/AdamW (default 0.999).
    pub beta2: f64,
    /// ε of Adagrad (default 1e-10), RMSprop, Adam, AdamW (1e-8).
    pub eps: f64,
    /// L2 decay added to the gradient; AdamW: decoupled decay (default 0, AdamW 1e-2).
    pub weight_decay: f64,
    /// Known lower bound of the loss; NaN = unknown (default).
    pub f_star: f64,
    /// η multiplier when ρ > threshold_up (default 1.2).
    pub factor_up: f64,
    /// η multiplier when ρ < threshold_down (default 0.5).
    pub factor_down: f64,
    /// Default 4/3.
    pub threshold_up: f64,
    /// Default 3/4.
    pub threshold_down: f64,
    /// Lower bound on η (default 0: none beyond the f32 safety range).
    pub lr_min: f64,
    /// Upper bound on η (default +inf).
    pub lr_max: f64,
    /// Cap on the step scale s_i (default +inf).
    pub scale_max: f64,
    /// Added to φ/2 in ρ's denominator (default 0; the authors' wrapper used 1e-12).
    pub denom_eps: f64,
    /// 1 = check gradients for NaN/inf before writing (default), 0 = off.
    pub check_finite: u32,
    /// CPU worker threads; 0 = one per core (default). A step uses at most
    /// one thread per 256 Ki elements.
    pub num_threads: u32,
    /// An `lra_reeval_schedule` (default `LRA_REEVAL_ALWAYS`).
    pub reeval_schedule: u32,
    /// k of `LRA_REEVAL_EVERY` (default 1).
    pub reeval_every: u32,
    /// Growth factor of `LRA_REEVAL_GEOMETRIC` (default 1.1).
    pub reeval_growth: f64,
    /// An `lra_sharding` (default replicated).
    pub sharding: u32,
    /// 1 = reported losses are per-rank, averaged by the reduction (default 0).
    pub loss_is_rank_local: u32,
}

/// What a re-evaluation found and decided. lra writes the whole struct,
/// so its layout is fixed for this ABI: a later version that reports more
/// adds a function rather than fields (unlike `lra_config`, which the
/// caller sizes through `struct_size`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lra_reeval_info {
    /// φ = g·v of the step (NaN when the step was skipped).
    pub phi: f64,
    /// ρ = (f_i − f+)/(φ/2); NaN when the test did not run.
    pub rho: f64,
    /// The step scale s_i used (1 in the default mode).
    pub scale: f64,
    /// η the decision started from: the step's η, or the value
    /// `lra_set_lr` set between the step and this report.
    pub lr_before: f64,
    /// η from now on.
    pub lr: f64,
    /// An `lra_decision`.
    pub decision: u32,
    /// An `lra_skip_reason` (`LRA_SKIP_NONE` unless decision is SKIPPED).
    pub skip_reason: u32,
}

/// Step and decision counters. Fixed for this ABI, as `lra_reeval_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct lra_counters {
    pub steps: u64,
    pub applied: u64,
    pub skipped: u64,
    pub reevals: u64,
    pub raised: u64,
    pub lowered: u64,
    pub kept: u64,
    pub reeval_skipped: u64,
}

/// Cross-rank sum: replace `values[0..count]` by their sums over all ranks;
/// return 0 on success, anything else on failure.
pub type lra_reduce_fn =
    Option<unsafe extern "C" fn(values: *mut f64, count: usize, user: *mut c_void) -> i32>;

/// Opaque handle: one optimizer with its adaptation state. One call at a
/// time per handle, getters taking a `const lra_handle *` included: a call
/// made while another runs on the same handle (another thread's, or one
/// from inside its reduction callback) fails with `LRA_CALL_ORDER` and
/// changes nothing. Different handles are independent.
pub struct lra_handle {
    magic: u64,
    /// Set while a call runs on the handle: a call from inside its own
    /// reduction callback (or from a second thread at the same time) would
    /// otherwise alias the engine the running call is changing.
    busy: AtomicBool,
    engine: Engine,
    last_error: CString,
    poisoned: bool,
}

const HANDLE_MAGIC: u64 = 0x6c72_615f_6861_6e64;

thread_local! {
    static THREAD_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn c_message(e: &Error) -> CString {
    CString::new(e.to_string().replace('\0', " ")).unwrap_or_default()
}

fn set_thread_error(e: &Error) {
    // `try_with`: a call from a thread-local destructor that runs after
    // this one's (a C++ `thread_local` owning a handle) must not panic:
    // the panic would cross the C boundary and abort the process. The
    // message is then lost; the status still says what happened.
    let _ = THREAD_ERROR.try_with(|t| *t.borrow_mut() = c_message(e));
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Runs `f` behind the panic boundary; records a failure on the thread.
fn boundary(name: &str, f: impl FnOnce() -> Result<()>) -> (lra_status, Option<Error>) {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Error::new(
            Status::Panic,
            format!("panic: {}", panic_message(p.as_ref())),
        ))
    });
    match r {
        Ok(()) => (LRA_OK, None),
        Err(mut e) => {
            e.message = format!("{name}: {}", e.message);
            set_thread_error(&e);
            (e.status as u32, Some(e))
        }
    }
}

fn null_error(name: &str, what: &str) -> lra_status {
    let e = Error::new(Status::NullPointer, format!("{name}: {what} is NULL"));
    set_thread_error(&e);
    LRA_NULL_POINTER
}

/// Claims a live handle for one call (see `lra_handle::busy`); on failure
/// records why on the calling thread and returns the status.
///
/// The magic number catches a stray pointer into readable memory at least
/// as large as a handle (NULL and misalignment are checked exactly). It cannot make a destroyed handle
/// safe to pass: `lra_destroy` frees the handle, and reading its magic
/// afterwards is a use after free (so is any call that may start while
/// `lra_destroy` runs on another thread). The C contract therefore says
/// a destroyed handle must not be passed again.
unsafe fn claim(h: *mut lra_handle, name: &str) -> std::result::Result<(), lra_status> {
    if h.is_null() {
        return Err(null_error(name, "handle"));
    }
    if !is_live(h) {
        let e = Error::new(
            Status::InvalidArgument,
            format!("{name}: handle {h:p} is not a live lra handle"),
        );
        set_thread_error(&e);
        return Err(LRA_INVALID_ARGUMENT);
    }
    if !try_acquire(h) {
        let e = Error::new(
            Status::CallOrder,
            format!(
                "{name}: the handle is in the middle of another call (lra functions must not be called on a handle from inside its reduction callback, nor from two threads at once)"
            ),
        );
        set_thread_error(&e);
        return Err(LRA_CALL_ORDER);
    }
    Ok(())
}

/// Whether non-null `h` looks like a handle `lra_create` made and
/// `lra_destroy` has not freed (aligned, with the magic).
unsafe fn is_live(h: *const lra_handle) -> bool {
    (h as usize).is_multiple_of(std::mem::align_of::<lra_handle>()) && (*h).magic == HANDLE_MAGIC
}

/// Marks live `h` busy; false when another call holds it. Field access
/// only: a running call holds `&mut` to the engine field.
unsafe fn try_acquire(h: *const lra_handle) -> bool {
    let busy = &*std::ptr::addr_of!((*h).busy);
    busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Ends the call that `try_acquire` let in.
unsafe fn release(h: *const lra_handle) {
    (*std::ptr::addr_of!((*h).busy)).store(false, Ordering::Release);
}

/// Checks and claims the handle, then runs `f` on its engine behind the
/// panic boundary, keeping the message on the handle. Touches the handle
/// field by field, never through one `&mut lra_handle`, so that a refused
/// re-entrant call does not alias the running one.
unsafe fn with_handle(
    h: *mut lra_handle,
    name: &str,
    f: impl FnOnce(&mut Engine) -> Result<()>,
) -> lra_status {
    if let Err(status) = claim(h, name) {
        return status;
    }
    let status = if (*h).poisoned {
        let e = Error::new(
            Status::Panic,
            format!(
                "{name}: this handle caught a panic earlier and refuses further work; destroy it"
            ),
        );
        set_thread_error(&e);
        (*h).last_error = c_message(&e);
        LRA_PANIC
    } else {
        let engine = &mut *std::ptr::addr_of_mut!((*h).engine);
        let (status, err) = boundary(name, || f(engine));
        if let Some(e) = err {
            if e.status == Status::Panic {
                (*h).poisoned = true;
            }
            (*h).last_error = c_message(&e);
        }
        status
    };
    release(h);
    status
}

fn require<T>(p: *const T, what: &str) -> Result<()> {
    if p.is_null() {
        fail!(NullPointer, "{what} is NULL");
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        fail!(
            InvalidArgument,
            "{what} = {p:p} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        );
    }
    Ok(())
}

/// Refuses a byte range no allocation can have: longer than `isize::MAX`
/// bytes, or running past the end of the address space (what
/// `slice::from_raw_parts` and pointer offsets require).
/// `what` names the range for the message; it is only formatted on failure
/// (`format_args!` at the call sites: a step checks two ranges per tensor,
/// and building their names every time cost more than the step's own work
/// for small tensors).
fn require_extent(p: usize, bytes: usize, what: impl std::fmt::Display) -> Result<()> {
    if bytes > isize::MAX as usize || p.checked_add(bytes).is_none() {
        fail!(
            InvalidArgument,
            "{what}: {bytes} bytes from {p:#x} run past the end of the address space"
        );
    }
    Ok(())
}

/// Writes `v` through an output pointer after checking it.
unsafe fn put<T>(out: *mut T, what: &str, v: T) -> Result<()> {
    require(out as *const T, what)?;
    out.write(v);
    Ok(())
}

fn config_defaults(optimizer: u32) -> lra_config {
    let kind = OptimizerKind::from_u32(optimizer).unwrap_or(OptimizerKind::Sgd);
    let h = Hyper::defaults(kind);
    let s = Settings::default();
    lra_config {
        struct_size: std::mem::size_of::<lra_config>() as u32,
        optimizer,
        device: LRA_DEVICE_HOST,
        device_ordinal: 0,
        lr: 1e-3,
        momentum: h.momentum,
        alpha: h.alpha,
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        weight_decay: h.weight_decay,
        f_star: s.f_star,
        factor_up: s.factor_up,
        factor_down: s.factor_down,
        threshold_up: s.threshold_up,
        threshold_down: s.threshold_down,
        lr_min: s.lr_min,
        lr_max: s.lr_max,
        scale_max: s.scale_max,
        denom_eps: s.denom_eps,
        check_finite: 1,
        num_threads: 0,
        reeval_schedule: LRA_REEVAL_ALWAYS,
        reeval_every: 1,
        reeval_growth: 1.1,
        sharding: LRA_SHARDING_REPLICATED,
        loss_is_rank_local: 0,
    }
}

fn flag(name: &str, v: u32) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => fail!(InvalidConfig, "{name} = {v} must be 0 or 1"),
    }
}

/// Converts and validates the C configuration.
pub fn config_from_c(c: &lra_config) -> Result<Config> {
    let kind = OptimizerKind::from_u32(c.optimizer).ok_or_else(|| {
        Error::new(
            Status::InvalidConfig,
            format!(
                "optimizer = {} is not an lra_optimizer (0..=6)",
                c.optimizer
            ),
        )
    })?;
    let device = match c.device {
        LRA_DEVICE_HOST => Device::Host,
        LRA_DEVICE_CUDA => Device::Cuda {
            ordinal: c.device_ordinal,
        },
        d => fail!(
            InvalidConfig,
            "device = {d} is not an lra_device (0 host, 1 CUDA)"
        ),
    };
    let schedule = match c.reeval_schedule {
        LRA_REEVAL_ALWAYS => ReevalSchedule::Always,
        LRA_REEVAL_EVERY => ReevalSchedule::Every(c.reeval_every as u64),
        LRA_REEVAL_GEOMETRIC => ReevalSchedule::Geometric(c.reeval_growth),
        v => fail!(
            InvalidConfig,
            "reeval_schedule = {v} is not an lra_reeval_schedule (0..=2)"
        ),
    };
    let sharded = match c.sharding {
        LRA_SHARDING_REPLICATED => false,
        LRA_SHARDING_SHARDED => true,
        v => fail!(
            InvalidConfig,
            "sharding = {v} is not an lra_sharding (0 replicated, 1 sharded)"
        ),
    };
    let cfg = Config {
        kind,
        device,
        lr: c.lr,
        hyper: Hyper {
            momentum: c.momentum,
            alpha: c.alpha,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
        },
        settings: Settings {
            f_star: c.f_star,
            factor_up: c.factor_up,
            factor_down: c.factor_down,
            threshold_up: c.threshold_up,
            threshold_down: c.threshold_down,
            lr_min: c.lr_min,
            lr_max: c.lr_max,
            scale_max: c.scale_max,
            denom_eps: c.denom_eps,
        },
        check_finite: flag("check_finite", c.check_finite)?,
        threads: c.num_threads as usize,
        schedule,
        sharded,
        loss_rank_local: flag("loss_is_rank_local", c.loss_is_rank_local)?,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Fills `cfg` with `struct_size` and every default for `optimizer`
/// (an `lra_optimizer`; an invalid value is kept and rejected by
/// `lra_create`). NULL or a misaligned `cfg` is a no-op that sets
/// `lra_thread_last_error()`.
#[no_mangle]
pub unsafe extern "C" fn lra_config_init(cfg: *mut lra_config, optimizer: u32) {
    // The function returns nothing: the thread's message is the only report.
    boundary("lra_config_init", || {
        require(cfg as *const lra_config, "cfg")?;
        cfg.write(config_defaults(optimizer));
        Ok(())
    });
}

/// Creates a handle. On failure `*out` is set to NULL and
/// `lra_thread_last_error()` says why.
#[no_mangle]
pub unsafe extern "C" fn lra_create(
    cfg: *const lra_config,
    out: *mut *mut lra_handle,
) -> lra_status {
    let (status, _) = boundary("lra_create", || {
        require(out as *const *mut lra_handle, "out")?;
        let cfg_bytes = std::mem::size_of::<lra_config>();
        if !cfg.is_null()
            && overlaps(
                out as usize,
                std::mem::size_of::<*mut lra_handle>(),
                cfg as usize,
                cfg_bytes,
            )
        {
            fail!(
                InvalidArgument,
                "out = {out:p} points into cfg = {cfg:p}: the handle would overwrite the configuration"
            );
        }
        out.write(std::ptr::null_mut());
        require(cfg, "cfg")?;
        // struct_size must be this library's size: another one means the
        // caller was compiled against another lra.h.
        let declared = (cfg as *const u32).read() as usize;
        let size = std::mem::size_of::<lra_config>();
        if declared != size {
            fail!(
                InvalidConfig,
                "struct_size = {declared}, this library's lra_config has {size} bytes (fill the struct with lra_config_init)"
            );
        }
        let c = cfg.read();
        let config = config_from_c(&c)?;
        let engine = Engine::new(config)?;
        let h = Box::new(lra_handle {
            magic: HANDLE_MAGIC,
            busy: AtomicBool::new(false),
            engine,
            last_error: CString::default(),
            poisoned: false,
        });
        out.write(Box::into_raw(h));
        Ok(())
    });
    status
}

/// Destroys a handle and its optimizer state. NULL is a no-op. Refused
/// (the handle lives on; `lra_thread_last_error()` says why) while another
/// call runs on the handle, e.g. from inside its reduction callback. Once
/// it returns, `h` is freed memory: passing it again to any lra function
/// (a second `lra_destroy` included) is undefined behaviour, as is a call
/// on `h` that another thread may start while `lra_destroy` runs.
#[no_mangle]
pub unsafe extern "C" fn lra_destroy(h: *mut lra_handle) {
    if h.is_null() || claim(h, "lra_destroy").is_err() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        (*h).magic = 0;
        drop(Box::from_raw(h));
    }));
}

/// Converts and checks the caller's tensor list.
unsafe fn tensor_list(tensors: *const lra_tensor, count: usize) -> Result<Vec<TensorDesc>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    require(tensors, "tensors")?;
    if count > isize::MAX as usize / std::mem::size_of::<lra_tensor>() {
        fail!(
            InvalidArgument,
            "count = {count} is too large: the list would exceed isize::MAX bytes"
        );
    }
    require_extent(
        tensors as usize,
        count * std::mem::size_of::<lra_tensor>(),
        "tensors, count",
    )?;
    let mut out = Vec::new();
    // A count no list can hold (a wrong size argument) is an error, not
    // an abort of the caller's process.
    if out.try_reserve_exact(count).is_err() {
        fail!(
            InvalidArgument,
            "count = {count}: lra cannot allocate its copy of that many tensors (is count the number of lra_tensor entries?)"
        );
    }
    let list = std::slice::from_raw_parts(tensors, count);
    for (i, t) in list.iter().enumerate() {
        if t.reserved != 0 {
            fail!(
                InvalidArgument,
                "tensors[{i}].reserved = {}: must be 0 (reserved for later use)",
                t.reserved
            );
        }
        let dtype = DType::from_u32(t.dtype).ok_or_else(|| {
            Error::new(
                Status::InvalidArgument,
                format!(
                    "tensors[{i}].dtype = {} is not an lra_dtype (0 f32, 1 f16, 2 bf16)",
                    t.dtype
                ),
            )
        })?;
        let numel = usize::try_from(t.numel)
            .ok()
            .filter(|n| {
                n.checked_mul(dtype.size())
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| {
                Error::new(
                    Status::InvalidArgument,
                    format!(
                        "tensors[{i}].numel = {} is too large: so many {} elements would exceed isize::MAX bytes",
                        t.numel,
                        dtype.name()
                    ),
                )
            })?;
        if numel > 0 {
            if t.param.is_null() {
                fail!(NullPointer, "tensors[{i}].param is NULL");
            }
            if t.grad.is_null() {
                fail!(NullPointer, "tensors[{i}].grad is NULL");
            }
            let bytes = numel * dtype.size();
            require_extent(t.param as usize, bytes, format_args!("tensors[{i}].param"))?;
            require_extent(t.grad as usize, bytes, format_args!("tensors[{i}].grad"))?;
        }
        out.push(TensorDesc {
            param: t.param,
            grad: t.grad,
            numel,
            dtype,
        });
    }
    Ok(out)
}

/// One iteration: the wrapped optimizer's step with the current η.
/// `loss` is f_i on this batch, `obs_var` = R_i >= 0 (0 by default),
/// `stream` a `CUstream` for CUDA handles (NULL = legacy default stream),
/// NULL for host handles. Parameters and gradients are host memory for
/// host handles (CUDA device memory is refused when the process has loaded
/// the CUDA driver) and device memory of the handle's device for CUDA
/// handles. The step is skipped (and reported by the next
/// `lra_report_reeval`) when `loss` is not finite, or, with
/// `check_finite` on, when a gradient is not finite.
///
/// `tensors` holds `count` entries, in the same order, sizes and dtypes at
/// every step. Each `param` must be writable and each `grad` readable for
/// `numel` elements of its dtype, and each aligned to the dtype's size
/// (`numel` 0: never read, any pointer); no parameter may overlap another
/// parameter or any gradient (gradients may share memory). On a CUDA
/// handle the buffers (and `found_inf`) must stay allocated until the
/// step's work on `stream` is done. lra checks what it can (alignment,
/// overlap, extents that wrap, the memory's kind and device on CUDA) and
/// refuses with `LRA_INVALID_ARGUMENT` before any write; lengths it
/// cannot see are the caller's to get right. Each `reserved` must be 0.
#[no_mangle]
pub unsafe extern "C" fn lra_step(
    h: *mut lra_handle,
    tensors: *const lra_tensor,
    count: usize,
    loss: f64,
    obs_var: f64,
    stream: *mut c_void,
) -> lra_status {
    step_impl(
        "lra_step",
        h,
        tensors,
        count,
        loss,
        obs_var,
        std::ptr::null(),
        stream,
    )
}

/// `lra_step` with a found-inf flag: `found_inf` points at one f32 (host
/// memory for host handles, device memory for CUDA handles; NULL = none;
/// aligned to 4 bytes and not inside any parameter); when it is non-zero
/// (or NaN) the step is a no-op, decided without a host sync on CUDA.
#[no_mangle]
pub unsafe extern "C" fn lra_step_ex(
    h: *mut lra_handle,
    tensors: *const lra_tensor,
    count: usize,
    loss: f64,
    obs_var: f64,
    found_inf: *const f32,
    stream: *mut c_void,
) -> lra_status {
    step_impl(
        "lra_step_ex",
        h,
        tensors,
        count,
        loss,
        obs_var,
        found_inf as *const c_void,
        stream,
    )
}

#[allow(clippy::too_many_arguments)]
unsafe fn step_impl(
    name: &str,
    h: *mut lra_handle,
    tensors: *const lra_tensor,
    count: usize,
    loss: f64,
    obs_var: f64,
    found_inf: *const c_void,
    stream: *mut c_void,
) -> lra_status {
    with_handle(h, name, |e| {
        let list = tensor_list(tensors, count)?;
        if e.config().device == Device::Host && !stream.is_null() {
            fail!(
                InvalidArgument,
                "stream must be NULL for a host (device = 0) handle"
            );
        }
        // SAFETY: the buffers, flag and stream are what the C caller
        // promises of lra_step_ex (NULL, extents and alignment are checked;
        // memory kind and overlap the backend checks before any write).
        unsafe { e.step(&list, loss, obs_var, found_inf, stream) }
    })
}

fn info_from(r: &ReevalResult) -> lra_reeval_info {
    lra_reeval_info {
        phi: r.phi,
        rho: r.rho,
        scale: r.scale,
        lr_before: r.lr_before,
        lr: r.lr,
        decision: r.decision as u32,
        skip_reason: r.skip as u32,
    }
}

/// Reports f+ = the loss on the SAME batch after the step; adapts η.
/// `out` may be NULL. Fails with `LRA_CALL_ORDER` when no step is pending.
#[no_mangle]
pub unsafe extern "C" fn lra_report_reeval(
    h: *mut lra_handle,
    loss_after: f64,
    out: *mut lra_reeval_info,
) -> lra_status {
    with_handle(h, "lra_report_reeval", |e| {
        if !out.is_null() {
            require(out as *const lra_reeval_info, "out")?;
        }
        let r = e.report_reeval(loss_after)?;
        if !out.is_null() {
            out.write(info_from(&r));
        }
        Ok(())
    })
}

/// The result of the most recent re-evaluation; `LRA_CALL_ORDER` if none.
#[no_mangle]
pub unsafe extern "C" fn lra_get_last_reeval(
    h: *const lra_handle,
    out: *mut lra_reeval_info,
) -> lra_status {
    with_handle(h as *mut lra_handle, "lra_get_last_reeval", |e| {
        // The pointer first, as every other getter: a NULL `out` is
        // LRA_NULL_POINTER whatever the handle's state.
        require(out as *const lra_reeval_info, "out")?;
        match e.last_reeval() {
            Some(r) => put(out, "out", info_from(&r)),
            None => fail!(CallOrder, "no re-evaluation has been reported yet"),
        }
    })
}

/// Current η.
#[no_mangle]
pub unsafe extern "C" fn lra_get_lr(h: *const lra_handle, lr: *mut f64) -> lra_status {
    with_handle(h as *mut lra_handle, "lra_get_lr", |e| {
        put(lr, "lr", e.lr())
    })
}

/// Sets η (inside [lr_min, lr_max] and inside f32's positive normal range,
/// about [1.2e-38, 3.4e38], since the update applies η as an f32); applies
/// from the next step.
#[no_mangle]
pub unsafe extern "C" fn lra_set_lr(h: *mut lra_handle, lr: f64) -> lra_status {
    with_handle(h, "lra_set_lr", |e| e.set_lr(lr))
}

/// φ of the most recent step (NaN before the first step or when it was
/// skipped). On CUDA this waits for that step.
#[no_mangle]
pub unsafe extern "C" fn lra_get_last_phi(h: *const lra_handle, phi: *mut f64) -> lra_status {
    with_handle(h as *mut lra_handle, "lra_get_last_phi", |e| {
        require(phi as *const f64, "phi")?;
        let v = e.last_phi()?;
        put(phi, "phi", v)
    })
}

/// Step and decision counters. On CUDA this waits for the last step.
#[no_mangle]
pub unsafe extern "C" fn lra_get_counters(
    h: *const lra_handle,
    out: *mut lra_counters,
) -> lra_status {
    with_handle(h as *mut lra_handle, "lra_get_counters", |e| {
        require(out as *const lra_counters, "out")?;
        let c: Counters = e.counters()?;
        put(
            out,
            "out",
            lra_counters {
                steps: c.steps,
                applied: c.applied,
                skipped: c.skipped,
                reevals: c.reevals,
                raised: c.raised,
                lowered: c.lowered,
                kept: c.kept,
                reeval_skipped: c.reeval_skipped,
            },
        )
    })
}

/// Whether the re-evaluation schedule wants the step just taken to be
/// re-evaluated (`*out` = 1) or not (0). `LRA_CALL_ORDER` if no step is pending.
#[no_mangle]
pub unsafe extern "C" fn lra_should_reeval(h: *const lra_handle, out: *mut u32) -> lra_status {
    with_handle(h as *mut lra_handle, "lra_should_reeval", |e| {
        require(out as *const u32, "out")?;
        let due = e.should_reeval()?;
        put(out, "out", due as u32)
    })
}

/// Bytes needed by `lra_save_state` now (depends on the tensor layout,
/// fixed by the first step).
#[no_mangle]
pub unsafe extern "C" fn lra_state_size(h: *const lra_handle, size: *mut usize) -> lra_status {
    with_handle(h as *mut lra_handle, "lra_state_size", |e| {
        put(size, "size", e.state_size()?)
    })
}

/// Writes a versioned checkpoint (η, counters, optimizer state) into `buf`
/// of `len` bytes; `written` (may be NULL) receives the size. On CUDA this
/// waits for the device. Streamed into `buf` (lra holds no copy of the
/// state); a CUDA read failing part way leaves a partial checkpoint there,
/// which no load accepts.
#[no_mangle]
pub unsafe extern "C" fn lra_save_state(
    h: *const lra_handle,
    buf: *mut c_void,
    len: usize,
    written: *mut usize,
) -> lra_status {
    with_handle(h as *mut lra_handle, "lra_save_state", |e| {
        require(buf as *const u8, "buf")?;
        require_extent(buf as usize, len, "buf, len")?;
        if !written.is_null() {
            require(written as *const usize, "written")?;
            if overlaps(
                written as usize,
                std::mem::size_of::<usize>(),
                buf as usize,
                len,
            ) {
                fail!(
                    InvalidArgument,
                    "written = {written:p} points into buf: the size would overwrite the checkpoint"
                );
            }
        }
        // Copied piece by piece, not written through a `&mut [u8]` over
        // `buf`: a C caller's buffer is often fresh from malloc, and a
        // reference to uninitialised bytes is undefined behaviour.
        let mut at = 0usize;
        let n = e.write_checkpoint(len, &mut |piece| {
            assert!(piece.len() <= len - at, "checkpoint overran its buffer");
            // SAFETY: `buf` is valid for `len` bytes of writes (the caller's
            // contract; NULL, alignment and extent checked above), the
            // piece fits (just checked), and lra's own piece cannot
            // overlap the caller's buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(piece.as_ptr(), (buf as *mut u8).add(at), piece.len())
            };
            at += piece.len();
        })?;
        if !written.is_null() {
            written.write(n);
        }
        Ok(())
    })
}

/// Restores a checkpoint written by `lra_save_state` for the same
/// optimizer and tensor layout, with the same bits of every hyper-parameter
/// the optimizer reads, whose η lies inside this handle's [lr_min, lr_max].
/// Nothing changes on error.
#[no_mangle]
pub unsafe extern "C" fn lra_load_state(
    h: *mut lra_handle,
    buf: *const c_void,
    len: usize,
) -> lra_status {
    with_handle(h, "lra_load_state", |e| {
        require(buf as *const u8, "buf")?;
        require_extent(buf as usize, len, "buf, len")?;
        e.load_state(std::slice::from_raw_parts(buf as *const u8, len))
    })
}

/// Registers the cross-rank sum used for sharded parameters and rank-local
/// losses (`reduce` NULL removes it, except on a sharded or rank-local-loss
/// handle, which needs one: `LRA_INVALID_ARGUMENT`). It must be registered on every rank
/// and is then called on every rank in the same order. It runs inside
/// calls on this handle, on the thread making the call: calls on the
/// handle from inside it fail with `LRA_CALL_ORDER`.
#[no_mangle]
pub unsafe extern "C" fn lra_set_reduction(
    h: *mut lra_handle,
    reduce: lra_reduce_fn,
    user: *mut c_void,
) -> lra_status {
    with_handle(h, "lra_set_reduction", |e| {
        let cfg = e.config();
        match reduce {
            None => {
                if cfg.sharded || cfg.loss_rank_local {
                    fail!(
                        InvalidArgument,
                        "reduce is NULL, but the configuration is sharded or has rank-local losses"
                    );
                }
                e.set_reducer(None)
            }
            Some(f) => {
                let user = SendUser(user);
                e.set_reducer(Some(Box::new(move |v: &mut [f64]| {
                    let u = &user;
                    // SAFETY: the caller registered `f` for `user`.
                    let rc = unsafe { f(v.as_mut_ptr(), v.len(), u.0) };
                    if rc != 0 {
                        fail!(ReductionFailed, "the reduction callback returned {rc}");
                    }
                    Ok(())
                })))
            }
        }
        Ok(())
    })
}

struct SendUser(*mut c_void);
// SAFETY: lra never dereferences `user`; it only hands it back to the
// caller's callback, on the thread of the call running on the handle
// (never from a worker thread). A handle may move between threads, so the
// callback must accept being called on whichever thread calls lra: part of
// the `lra_set_reduction` contract.
unsafe impl Send for SendUser {}

/// A static description of a status value ("unknown status" for others).
#[no_mangle]
pub extern "C" fn lra_status_string(status: lra_status) -> *const c_char {
    match Status::from_u32(status) {
        Some(s) => s.description().as_ptr() as *const c_char,
        None => c"unknown status".as_ptr(),
    }
}

/// The message of the handle's last failed call ("" if none; NULL handle:
/// the calling thread's last message). Valid until the next call on it.
/// While another call runs on the handle (from another thread, or the
/// call whose reduction callback asks) its message is not settled: a
/// static note saying so is returned instead. The read counts as a call
/// for the one-thread-at-a-time rule: a call on another thread that
/// overlaps it gets `LRA_CALL_ORDER`.
#[no_mangle]
pub unsafe extern "C" fn lra_last_error(h: *const lra_handle) -> *const c_char {
    if h.is_null() || !is_live(h) {
        return lra_thread_last_error();
    }
    // Claimed like any call (but without recording a refusal, which would
    // replace the thread's message): a call running on another thread
    // replaces, and frees, `last_error` while it runs.
    if !try_acquire(h) {
        return c"the handle is in the middle of another call; its message is settled when that call returns".as_ptr();
    }
    let message = (*h).last_error.as_ptr();
    release(h);
    message
}

/// The calling thread's last failure message, from any call (the only
/// place `lra_create` failures are described). Valid until the next
/// failing call on this thread.
#[no_mangle]
pub extern "C" fn lra_thread_last_error() -> *const c_char {
    THREAD_ERROR
        .try_with(|t| t.borrow().as_ptr())
        .unwrap_or(c"this thread's message is gone (called during thread exit)".as_ptr())
}

/// The version of this header, in `lra_version()`'s encoding: a program
/// can compare what it was compiled against (`LRA_HEADER_VERSION`) with the
/// library it runs on (`lra_version()`), and `#if` on it at compile time.
/// (A unit test keeps it equal to Cargo.toml's version.)
pub const LRA_HEADER_VERSION: u32 = 0x00_01_00;

/// Library version: (major << 16) | (minor << 8) | patch.
#[no_mangle]
pub extern "C" fn lra_version() -> u32 {
    let p = |s: &str| s.parse::<u32>().unwrap_or(0);
    (p(env!("CARGO_PKG_VERSION_MAJOR")) << 16)
        | (p(env!("CARGO_PKG_VERSION_MINOR")) << 8)
        | p(env!("CARGO_PKG_VERSION_PATCH"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Decision, SkipReason};

    #[test]
    fn the_header_version_is_the_library_version() {
        assert_eq!(
            LRA_HEADER_VERSION,
            lra_version(),
            "LRA_HEADER_VERSION must follow Cargo.toml's version ({})",
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn status_constants_match_the_status_enum() {
        let pairs = [
            (LRA_OK, Status::Ok),
            (LRA_NULL_POINTER, Status::NullPointer),
            (LRA_INVALID_ARGUMENT, Status::InvalidArgument),
            (LRA_INVALID_CONFIG, Status::InvalidConfig),
            (LRA_CALL_ORDER, Status::CallOrder),
            (LRA_SIZE_MISMATCH, Status::SizeMismatch),
            (LRA_NO_CUDA, Status::NoCuda),
            (LRA_CUDA_ERROR, Status::Cuda),
            (LRA_BAD_CHECKPOINT, Status::BadCheckpoint),
            (LRA_BUFFER_TOO_SMALL, Status::BufferTooSmall),
            (LRA_PANIC, Status::Panic),
            (LRA_UNSUPPORTED, Status::Unsupported),
            (LRA_REDUCTION_FAILED, Status::ReductionFailed),
            (LRA_OUT_OF_MEMORY, Status::OutOfMemory),
        ];
        assert_eq!(pairs.len(), Status::ALL.len());
        for (c, s) in pairs {
            assert_eq!(c, s as u32);
        }
    }

    /// The enums read back from numbers (C arguments, checkpoints, the
    /// device's control block) index their `ALL` tables, so each table
    /// must be in value order and complete; the header's decision and
    /// skip constants are the enums' values.
    #[test]
    fn every_enum_table_is_in_value_order_and_matches_the_header() {
        fn in_order<T: Copy + std::fmt::Debug>(all: &[T], value: impl Fn(T) -> u32) {
            for (i, &x) in all.iter().enumerate() {
                assert_eq!(value(x), i as u32, "{x:?} at index {i}");
            }
        }
        in_order(&Status::ALL, |x| x as u32);
        in_order(&OptimizerKind::ALL, |x| x as u32);
        in_order(&DType::ALL, |x| x as u32);
        in_order(&SkipReason::ALL, |x| x as u32);
        in_order(&Decision::ALL, |x| x as u32);
        let decisions = [
            LRA_DECISION_KEPT,
            LRA_DECISION_RAISED,
            LRA_DECISION_LOWERED,
            LRA_DECISION_SKIPPED,
        ];
        let skips = [
            LRA_SKIP_NONE,
            LRA_SKIP_NONFINITE_LOSS,
            LRA_SKIP_NONFINITE_GRAD,
            LRA_SKIP_FOUND_INF,
            LRA_SKIP_NONPOSITIVE_PHI,
            LRA_SKIP_NONFINITE_PHI,
            LRA_SKIP_ZERO_SCALE,
        ];
        assert_eq!(decisions, Decision::ALL.map(|d| d as u32));
        assert_eq!(skips, SkipReason::ALL.map(|r| r as u32));
    }

    #[test]
    fn a_panic_becomes_a_status_and_poisons_the_handle() {
        let (status, err) = boundary("test", || panic!("boom"));
        assert_eq!(status, LRA_PANIC);
        assert!(err.unwrap().message.contains("boom"));
        let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
        let mut h = std::ptr::null_mut();
        unsafe {
            lra_config_init(cfg.as_mut_ptr(), LRA_OPTIMIZER_SGD);
            assert_eq!(lra_create(cfg.as_ptr(), &mut h), LRA_OK);
            let st = with_handle(h, "test", |_| panic!("inside"));
            assert_eq!(st, LRA_PANIC);
            let mut lr = 0.0;
            assert_eq!(
                lra_get_lr(h, &mut lr),
                LRA_PANIC,
                "poisoned handles refuse work"
            );
            let msg = std::ffi::CStr::from_ptr(lra_last_error(h))
                .to_string_lossy()
                .into_owned();
            assert!(msg.contains("panic"), "{msg}");
            lra_destroy(h);
        }
    }
}
