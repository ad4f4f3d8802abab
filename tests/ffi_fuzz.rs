//! A stateful, model-based, deterministic-seeded fuzzer of the C ABI.
//!
//! Each iteration creates one or two host handles with random valid (and
//! many invalid) configurations and drives them with about 50 random calls
//! drawn from every exported function, valid and invalid, exactly as a C
//! caller would. A model of each handle (call order, layout, η, counters,
//! schedule, pending step, checkpoint pool) predicts every status, and
//! after every call the fuzzer checks:
//! - no `LRA_PANIC` (a Rust panic inside lra), no abort;
//! - every non-OK status leaves a non-empty message naming the function;
//! - a failed call (and every read-only call) leaves the handle's
//!   checkpoint bytes and the caller's parameters as they were, and a
//!   refused step joins no reduction;
//! - `LRA_CALL_ORDER` exactly when the model has no pending step
//!   (`lra_report_reeval`, `lra_should_reeval`), and the schedule's answer;
//! - η finite and inside [lr_min, lr_max]; the decision follows ρ and the
//!   thresholds; counters equal the model's (hence monotone);
//! - a successful load followed by a save gives back the loaded bytes, and
//!   a fresh handle of the same configuration restores a checkpoint to the
//!   same bytes and then steps to the same parameters and bytes;
//! - parameters stay finite while every gradient and loss was finite.
//!
//! CI runs a fixed list of seeds. Longer runs:
//! `LRA_FUZZ_SEED=<first seed> LRA_FUZZ_ITERS=<iterations> cargo test
//! --release --test ffi_fuzz -- --nocapture`. A failure prints the
//! iteration's own seed (rerun it alone with `LRA_FUZZ_ITERS=1`) and the
//! call trace.

mod support;

use support::Rng;

use half::{bf16, f16};
use lra::ffi::*;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_void, CStr};
use std::mem::MaybeUninit;
use std::ptr::{null, null_mut};
use std::rc::Rc;

// ---- deterministic randomness ----------------------------------------------

/// The seed of iteration `i` of a run started at `seed`: the first
/// iteration runs `seed` itself, so a printed seed reruns alone.
fn iteration_seed(seed: u64, i: u64) -> u64 {
    if i == 0 {
        seed
    } else {
        Rng(seed ^ i.wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
    }
}

// ---- the checkpoint format (as tests/ffi_adversarial.rs reads it) ----------

/// Byte offset of the first field after the tensor layout (the counters):
/// magic, version, optimizer, six f64 hyper-parameters, tensor count, and
/// 12 bytes per tensor.
fn after_layout(ckpt: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(ckpt.get(64..72)?.try_into().ok()?);
    72usize.checked_add(12usize.checked_mul(usize::try_from(n).ok()?)?)
}

// ---- tensors ---------------------------------------------------------------

const DTYPES: [lra_dtype; 3] = [LRA_DTYPE_F32, LRA_DTYPE_F16, LRA_DTYPE_BF16];

fn dtype_size(d: lra_dtype) -> usize {
    if d == LRA_DTYPE_F32 {
        4
    } else {
        2
    }
}

fn encode(d: lra_dtype, x: f32) -> u32 {
    match d {
        LRA_DTYPE_F32 => x.to_bits(),
        LRA_DTYPE_F16 => f16::from_f32(x).to_bits() as u32,
        _ => bf16::from_f32(x).to_bits() as u32,
    }
}

/// One tensor's parameter and gradient memory. Each buffer holds twice the
/// f32 bytes of `numel` plus slack, so that a defect accepting a larger
/// numel or a wider dtype reads and writes memory that exists (the fuzzer
/// then reports it instead of crashing on it).
struct Buffer {
    numel: usize,
    dtype: lra_dtype,
    param: Vec<u64>,
    grad: Vec<u64>,
}

impl Buffer {
    fn new(numel: usize, dtype: lra_dtype) -> Buffer {
        let words = numel + 4;
        Buffer {
            numel,
            dtype,
            param: vec![0; words],
            grad: vec![0; words],
        }
    }
    fn set(buf: &mut [u64], dtype: lra_dtype, i: usize, x: f32) {
        let bytes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len() * 8) };
        let s = dtype_size(dtype);
        let v = encode(dtype, x).to_le_bytes();
        bytes[i * s..(i + 1) * s].copy_from_slice(&v[..s]);
    }
    fn get(buf: &[u64], dtype: lra_dtype, i: usize) -> f32 {
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), buf.len() * 8) };
        match dtype {
            LRA_DTYPE_F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
            LRA_DTYPE_F16 => {
                f16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap()).to_f32()
            }
            _ => bf16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap()).to_f32(),
        }
    }
    fn tensor(&mut self) -> lra_tensor {
        lra_tensor {
            param: self.param.as_mut_ptr().cast(),
            grad: self.grad.as_ptr().cast(),
            numel: self.numel as u64,
            dtype: self.dtype,
            reserved: 0,
        }
    }
}

/// A handle's tensor list: its planned layout (fixed by the first step).
struct Tensors {
    bufs: Vec<Buffer>,
    /// A non-finite gradient was applied (guard off) or η·s left f32's
    /// range: the parameters may hold NaN/inf from then on.
    tainted: bool,
}

impl Tensors {
    fn random(rng: &mut Rng) -> Tensors {
        let count = rng.pick(&[0usize, 1, 1, 2, 2, 3, 4]);
        let specs: Vec<(usize, lra_dtype)> = (0..count)
            .map(|_| {
                let n = if rng.chance(0.15) {
                    0
                } else if rng.chance(0.05) {
                    rng.index(20_000) + 1
                } else {
                    rng.index(300) + 1
                };
                (n, rng.pick(&DTYPES))
            })
            .collect();
        Tensors::with_layout(rng, &specs)
    }
    fn with_layout(rng: &mut Rng, specs: &[(usize, lra_dtype)]) -> Tensors {
        let mut bufs: Vec<Buffer> = specs.iter().map(|&(n, d)| Buffer::new(n, d)).collect();
        for b in &mut bufs {
            for i in 0..b.numel {
                let x = (rng.unit() * 2.0 - 1.0) as f32;
                Buffer::set(&mut b.param, b.dtype, i, x);
            }
        }
        Tensors {
            bufs,
            tainted: false,
        }
    }
    fn layout(&self) -> Vec<(usize, lra_dtype)> {
        self.bufs.iter().map(|b| (b.numel, b.dtype)).collect()
    }
    fn list(&mut self) -> Vec<lra_tensor> {
        self.bufs.iter_mut().map(Buffer::tensor).collect()
    }
    /// Fills the gradients; returns whether all of them are finite.
    fn fill_grads(&mut self, rng: &mut Rng) -> bool {
        let scale = rng.pick(&[0.0f32, 1e-20, 1e-3, 1.0, 1.0, 1.0, 10.0]);
        let mut finite = true;
        for b in &mut self.bufs {
            for i in 0..b.numel {
                let x = (rng.unit() * 2.0 - 1.0) as f32 * scale;
                Buffer::set(&mut b.grad, b.dtype, i, x);
            }
            if b.numel > 0 && rng.chance(0.03) {
                let bad = rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
                let at = rng.index(b.numel);
                Buffer::set(&mut b.grad, b.dtype, at, bad);
                finite = false;
            }
        }
        finite
    }
    fn params(&self) -> Vec<Vec<u64>> {
        self.bufs.iter().map(|b| b.param.clone()).collect()
    }
    /// The first non-finite parameter of an f32/bf16 tensor, if any (f16
    /// overflows at 65504 by design of the format: not checked).
    fn nonfinite_param(&self) -> Option<(usize, usize, f32)> {
        for (t, b) in self.bufs.iter().enumerate() {
            if b.dtype == LRA_DTYPE_F16 {
                continue;
            }
            for i in 0..b.numel {
                let x = Buffer::get(&b.param, b.dtype, i);
                if !x.is_finite() {
                    return Some((t, i, x));
                }
            }
        }
        None
    }
}

// ---- the reduction callback ------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// One rank: the sum is the value.
    Identity,
    /// Two identical ranks.
    Double,
    /// Returns this non-zero code.
    Fail(i32),
    /// Writes arbitrary values (a broken reduction): only "no panic, η in
    /// bounds" is checked while it is registered.
    Garbage,
    /// Identity, and calls back into its own handle (all refused).
    ReenterSelf,
    /// Identity, and calls getters on the other handle (allowed).
    CallSibling,
}

impl Mode {
    /// Values come back as a sum over identical ranks: the model predicts.
    fn exact(self) -> bool {
        !matches!(self, Mode::Garbage)
    }
}

/// What the callback does; lives at a fixed address for the handle's life.
/// Shared through an `Rc`: lra keeps a raw pointer to it, which moving a
/// `Box` would invalidate (a `Box` asserts unique access when moved).
struct ReduceCtl {
    mode: Cell<Mode>,
    calls: Cell<u64>,
    me: Cell<*mut lra_handle>,
    sibling: Cell<*mut lra_handle>,
    garbage: Cell<u64>,
    /// The first broken rule seen inside the callback.
    problem: RefCell<Option<String>>,
}

impl ReduceCtl {
    fn new(mode: Mode, seed: u64) -> Rc<ReduceCtl> {
        Rc::new(ReduceCtl {
            mode: Cell::new(mode),
            calls: Cell::new(0),
            me: Cell::new(null_mut()),
            sibling: Cell::new(null_mut()),
            garbage: Cell::new(seed),
            problem: RefCell::new(None),
        })
    }
    fn user(&self) -> *mut c_void {
        (self as *const ReduceCtl).cast_mut().cast()
    }
    fn note(&self, what: String) {
        self.problem.borrow_mut().get_or_insert(what);
    }
}

unsafe extern "C" fn reduce_cb(values: *mut f64, count: usize, user: *mut c_void) -> i32 {
    let ctl = &*(user as *const ReduceCtl);
    ctl.calls.set(ctl.calls.get() + 1);
    if values.is_null() || !(1..=3).contains(&count) {
        ctl.note(format!(
            "reduction called with values {values:p}, count {count}"
        ));
        return 0;
    }
    let v = std::slice::from_raw_parts_mut(values, count);
    match ctl.mode.get() {
        Mode::Identity => 0,
        Mode::Double => {
            v.iter_mut().for_each(|x| *x *= 2.0);
            0
        }
        Mode::Fail(code) => code,
        Mode::Garbage => {
            let mut r = Rng(ctl.garbage.get());
            for x in v.iter_mut() {
                *x = r.pick(&[
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    -1.0,
                    0.0,
                    1e-300,
                    1e300,
                    *x,
                ]);
            }
            ctl.garbage.set(r.0);
            0
        }
        Mode::ReenterSelf => {
            let h = ctl.me.get();
            let mut lr = 0.0;
            let mut size = 0usize;
            let mut due = 0u32;
            let calls = [
                ("lra_get_lr", lra_get_lr(h, &mut lr)),
                ("lra_set_lr", lra_set_lr(h, 0.5)),
                ("lra_step", lra_step(h, null(), 0, 1.0, 0.0, null_mut())),
                ("lra_report_reeval", lra_report_reeval(h, 1.0, null_mut())),
                ("lra_should_reeval", lra_should_reeval(h, &mut due)),
                ("lra_state_size", lra_state_size(h, &mut size)),
                ("lra_set_reduction", lra_set_reduction(h, None, null_mut())),
            ];
            for (name, st) in calls {
                if st != LRA_CALL_ORDER {
                    ctl.note(format!("{name} from inside the callback returned {st}"));
                }
            }
            // The same from another thread while this call holds the handle
            // (deterministic: the call waits here for the thread).
            let addr = h as usize;
            let other = std::thread::spawn(move || {
                let h = addr as *mut lra_handle;
                let mut lr = 0.0;
                let st = (lra_get_lr(h, &mut lr), lra_set_lr(h, 0.25));
                (st, thread_error())
            })
            .join();
            match other {
                Ok(((LRA_CALL_ORDER, LRA_CALL_ORDER), why)) if why.contains("lra_set_lr") => {}
                other => ctl.note(format!(
                    "calls from another thread while the handle is busy: {other:?}"
                )),
            }
            lra_destroy(h);
            let why = thread_error();
            if !why.contains("lra_destroy") {
                ctl.note(format!("lra_destroy from the callback: message '{why}'"));
            }
            0
        }
        Mode::CallSibling => {
            let s = ctl.sibling.get();
            if !s.is_null() {
                let mut lr = 0.0;
                let mut c = lra_counters::default();
                for (name, st) in [
                    ("lra_get_lr", lra_get_lr(s, &mut lr)),
                    ("lra_get_counters", lra_get_counters(s, &mut c)),
                ] {
                    if st != LRA_OK {
                        ctl.note(format!(
                            "{name} on the other handle, from inside a callback, returned {st}: {}",
                            thread_error()
                        ));
                    }
                }
            }
            0
        }
    }
}

// ---- small C-call helpers ---------------------------------------------------

fn thread_error() -> String {
    unsafe { CStr::from_ptr(lra_thread_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn handle_error(h: *const lra_handle) -> String {
    unsafe { CStr::from_ptr(lra_last_error(h)) }
        .to_string_lossy()
        .into_owned()
}

fn config_init(optimizer: u32) -> lra_config {
    let mut c = MaybeUninit::<lra_config>::uninit();
    unsafe {
        lra_config_init(c.as_mut_ptr(), optimizer);
        c.assume_init()
    }
}

const LR_FLOOR: f64 = f32::MIN_POSITIVE as f64;
const LR_CEIL: f64 = f32::MAX as f64;

fn lr_bounds(c: &lra_config) -> (f64, f64) {
    (c.lr_min.max(LR_FLOOR), c.lr_max.min(LR_CEIL))
}

fn lr_allowed(c: &lra_config, lr: f64) -> bool {
    (LR_FLOOR..=LR_CEIL).contains(&lr) && lr >= c.lr_min && lr <= c.lr_max
}

fn clamp_lr(c: &lra_config, lr: f64) -> f64 {
    let (lo, hi) = lr_bounds(c);
    lr.max(lo).min(hi)
}

/// What a checkpoint must match to load: the optimizer and the
/// hyper-parameters it reads (README, `lra_load_state`); the others are
/// written as 0, so they are 0 in the key too.
fn config_key(c: &lra_config) -> [u64; 7] {
    let o = c.optimizer;
    let momentum = o == LRA_OPTIMIZER_MOMENTUM || o == LRA_OPTIMIZER_NESTEROV;
    let adam = o == LRA_OPTIMIZER_ADAM || o == LRA_OPTIMIZER_ADAMW;
    let eps = adam || o == LRA_OPTIMIZER_ADAGRAD || o == LRA_OPTIMIZER_RMSPROP;
    let read = |v: f64, read: bool| if read { v.to_bits() } else { 0 };
    [
        o as u64,
        read(c.momentum, momentum),
        read(c.alpha, o == LRA_OPTIMIZER_RMSPROP),
        read(c.beta1, adam),
        read(c.beta2, adam),
        read(c.eps, eps),
        c.weight_decay.to_bits(),
    ]
}

fn needs_reduction(c: &lra_config) -> bool {
    c.sharding == LRA_SHARDING_SHARDED || c.loss_is_rank_local == 1
}

fn same_f64(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

// ---- configurations -----------------------------------------------------------

fn random_config(rng: &mut Rng) -> lra_config {
    let mut c = config_init(rng.below(7) as u32);
    c.num_threads = rng.pick(&[1, 1, 2]);
    c.lr = rng.log_uniform(1e-4, 1.0);
    if rng.chance(0.3) {
        c.lr_min = c.lr * rng.log_uniform(1e-3, 1.0);
    }
    if rng.chance(0.3) {
        c.lr_max = c.lr * rng.log_uniform(1.0, 1e3);
    }
    if rng.chance(0.05) {
        (c.lr_min, c.lr_max) = (c.lr, c.lr);
    }
    if rng.chance(0.3) {
        c.f_star = rng.pick(&[0.0, -1.0, 0.5, 2.0]);
    }
    if rng.chance(0.3) {
        c.scale_max = rng.pick(&[0.5, 1.0, 2.0, 10.0]);
    }
    if rng.chance(0.2) {
        c.denom_eps = rng.pick(&[1e-12, 1.0]);
    }
    if rng.chance(0.2) {
        c.factor_up = 1.0 + rng.unit();
        c.factor_down = rng.pick(&[1.0, 0.1, 0.9]);
    }
    if rng.chance(0.1) {
        c.threshold_down = rng.unit();
        c.threshold_up = c.threshold_down + rng.unit() * 2.0;
    }
    if rng.chance(0.3) {
        c.check_finite = 0;
    }
    c.reeval_schedule = rng.pick(&[LRA_REEVAL_ALWAYS, LRA_REEVAL_EVERY, LRA_REEVAL_GEOMETRIC]);
    c.reeval_every = rng.below(5) as u32 + 1;
    c.reeval_growth = if rng.chance(0.1) {
        1e300
    } else {
        1.0 + rng.unit() * 2.0
    };
    if rng.chance(0.3) {
        c.sharding = LRA_SHARDING_SHARDED;
    }
    if rng.chance(0.3) {
        c.loss_is_rank_local = 1;
    }
    if rng.chance(0.3) {
        c.weight_decay = rng.pick(&[0.0, 1e-4, 1e-2]);
    }
    if rng.chance(0.2) {
        c.momentum = rng.pick(&[0.0, 0.9]);
        c.beta1 = rng.pick(&[0.0, 0.9]);
        c.beta2 = rng.pick(&[0.5, 0.99]);
        c.alpha = rng.pick(&[0.0, 0.9]);
        c.eps = rng.pick(&[1e-8, 1e-3]);
    }
    c
}

/// A configuration with one field made invalid, and the field's name.
fn broken_config(rng: &mut Rng) -> (lra_config, &'static str) {
    let mut c = random_config(rng);
    let name = match rng.below(24) {
        0 => {
            c.struct_size -= 8;
            "struct_size"
        }
        1 => {
            c.optimizer = 7 + rng.below(100) as u32;
            "optimizer"
        }
        2 => {
            c.device = 2 + rng.below(5) as u32;
            "device"
        }
        3 => {
            c.lr = rng.pick(&[0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 1e-300]);
            "lr"
        }
        4 => {
            c.momentum = rng.pick(&[1.0, -0.1, f64::NAN, 1.0 - 1e-10, 1e-45]);
            "momentum"
        }
        5 => {
            c.beta2 = rng.pick(&[1.0, -0.1, f64::NAN, 1.0 - 1e-10]);
            "beta2"
        }
        6 => {
            c.eps = rng.pick(&[0.0, -1e-8, f64::INFINITY, 1e-50, 1e39]);
            "eps"
        }
        7 => {
            c.weight_decay = rng.pick(&[-1.0, f64::NAN, f64::INFINITY, 1e-50, 1e39]);
            "weight_decay"
        }
        8 => {
            c.f_star = rng.pick(&[f64::INFINITY, f64::NEG_INFINITY]);
            "f_star"
        }
        9 => {
            c.factor_up = rng.pick(&[0.9, f64::NAN, f64::INFINITY]);
            "factor_up"
        }
        10 => {
            c.factor_down = rng.pick(&[0.0, 1.5, f64::NAN]);
            "factor_down"
        }
        11 => {
            c.threshold_down = f64::NAN;
            "threshold_down"
        }
        12 => {
            c.threshold_up = c.threshold_down - 0.1;
            "threshold_up"
        }
        13 => {
            c.lr_min = rng.pick(&[-1.0, f64::NAN, f64::INFINITY]);
            "lr_min"
        }
        14 => {
            (c.lr_min, c.lr_max) = (c.lr, c.lr * 0.5);
            "lr_max"
        }
        15 => {
            c.lr_min = c.lr * 2.0;
            c.lr_max = f64::INFINITY;
            "lr = "
        }
        16 => {
            c.scale_max = rng.pick(&[0.0, -1.0, f64::NAN]);
            "scale_max"
        }
        17 => {
            c.denom_eps = rng.pick(&[-1.0, f64::NAN, f64::INFINITY]);
            "denom_eps"
        }
        18 => {
            c.check_finite = 2 + rng.below(1000) as u32;
            "check_finite"
        }
        19 => {
            c.reeval_schedule = 3 + rng.below(10) as u32;
            "reeval_schedule"
        }
        20 => {
            c.reeval_schedule = LRA_REEVAL_EVERY;
            c.reeval_every = 0;
            "reeval_every"
        }
        21 => {
            c.reeval_schedule = LRA_REEVAL_GEOMETRIC;
            c.reeval_growth = rng.pick(&[0.5, f64::NAN, f64::INFINITY]);
            "reeval_growth"
        }
        22 => {
            c.sharding = 2 + rng.below(5) as u32;
            "sharding"
        }
        _ => {
            c.loss_is_rank_local = 2;
            "loss_is_rank_local"
        }
    };
    (c, name)
}

// ---- the model ---------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
struct PendingModel {
    /// f_i as the engine saw it (after the rank average).
    loss: f64,
    fused: bool,
    due: bool,
    /// The skip reason the step's inputs decide (NaN loss, found-inf flag,
    /// guarded non-finite gradient, unguarded one), when known.
    skip: Option<u32>,
}

/// What the handle's checkpoint holds, as the fuzzer predicts it.
#[derive(Clone, Debug, PartialEq)]
struct Model {
    layout: Option<Vec<(usize, lra_dtype)>>,
    pending: Option<PendingModel>,
    lr: f64,
    last: Option<[u64; 7]>,
    steps: u64,
    applied: u64,
    /// reevals by decision: kept, raised, lowered, skipped.
    decisions: [u64; 4],
    sched_next: u64,
    sched_gap: f64,
    /// Predictions hold (no garbage reduction changed a value).
    exact: bool,
    /// A non-finite gradient reached the optimizer state.
    state_tainted: bool,
}

impl Model {
    fn new(c: &lra_config) -> Model {
        Model {
            layout: None,
            pending: None,
            lr: c.lr,
            last: None,
            steps: 0,
            applied: 0,
            decisions: [0; 4],
            sched_next: 0,
            sched_gap: 1.0,
            exact: true,
            state_tainted: false,
        }
    }

    /// The engine's schedule, step `index`.
    fn due(&mut self, c: &lra_config, index: u64) -> bool {
        match c.reeval_schedule {
            LRA_REEVAL_ALWAYS => true,
            LRA_REEVAL_EVERY => index.is_multiple_of(c.reeval_every as u64),
            _ => {
                if index < self.sched_next {
                    return false;
                }
                let gap = self.sched_gap.floor().max(1.0) as u64;
                self.sched_next = index.saturating_add(gap);
                self.sched_gap *= c.reeval_growth;
                true
            }
        }
    }
}

/// A checkpoint the fuzzer saved, with the model state it encodes.
struct Saved {
    bytes: Vec<u8>,
    model: Model,
    key: [u64; 7],
}

struct Slot {
    h: *mut lra_handle,
    cfg: lra_config,
    model: Model,
    tensors: Tensors,
    /// Registered reduction (None: none registered).
    ctl: Option<Rc<ReduceCtl>>,
}

impl Slot {
    fn mode(&self) -> Option<Mode> {
        self.ctl.as_ref().map(|c| c.mode.get())
    }
    fn ctl_calls(&self) -> u64 {
        self.ctl.as_ref().map_or(0, |c| c.calls.get())
    }
}

// ---- the fuzzer --------------------------------------------------------------

struct Fuzz {
    seed: u64,
    rng: Rng,
    trace: Vec<String>,
    slots: Vec<Slot>,
    pool: Vec<Saved>,
    /// (function, status) → how often: what the run covered.
    seen: RefCell<BTreeMap<(String, lra_status), u64>>,
}

const CALLS_PER_ITERATION: usize = 50;
/// Largest effective η (s·η) for which steps must keep parameters finite.
const SANE_LR: f64 = 10.0;
const TRACE_SHOWN: usize = 150;

impl Fuzz {
    fn log(&mut self, s: String) {
        self.trace.push(s);
    }

    #[track_caller]
    fn ensure(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let from = self.trace.len().saturating_sub(TRACE_SHOWN);
            panic!(
                "lra C ABI fuzz: {}\nreproduce alone: LRA_FUZZ_SEED={} LRA_FUZZ_ITERS=1 cargo test --release --test ffi_fuzz -- --nocapture\ncall trace ({} calls, last {} shown):\n  {}",
                what(),
                self.seed,
                self.trace.len(),
                self.trace.len() - from,
                self.trace[from..].join("\n  ")
            );
        }
    }

    /// Common checks of any call's status: never a panic; a failure leaves
    /// a non-empty message naming the function (on the thread, and on a
    /// live handle).
    #[track_caller]
    fn status(&self, name: &str, st: lra_status, h: Option<*mut lra_handle>) {
        *self
            .seen
            .borrow_mut()
            .entry((name.to_string(), st))
            .or_default() += 1;
        self.ensure(st != LRA_PANIC, || {
            format!("{name} caught a panic: {}", thread_error())
        });
        self.ensure(st <= LRA_OUT_OF_MEMORY, || {
            format!("{name} returned unknown status {st}")
        });
        for s in &self.slots {
            if let Some(ctl) = &s.ctl {
                let p = ctl.problem.borrow().clone();
                self.ensure(p.is_none(), || {
                    format!("inside the reduction callback: {}", p.unwrap())
                });
            }
        }
        if st != LRA_OK {
            let msg = thread_error();
            self.ensure(!msg.is_empty() && msg.contains(name), || {
                format!("{name} returned {st} with thread message '{msg}'")
            });
            if let Some(h) = h {
                let hm = handle_error(h);
                self.ensure(hm == msg, || {
                    format!("{name}: handle message '{hm}' differs from thread message '{msg}'")
                });
            }
        }
    }

    fn checkpoint_of(&self, h: *mut lra_handle) -> Vec<u8> {
        let mut size = 0usize;
        let st = unsafe { lra_state_size(h, &mut size) };
        self.ensure(st == LRA_OK, || format!("lra_state_size: {st}"));
        let mut buf = vec![0u8; size];
        let mut written = 0usize;
        let st = unsafe { lra_save_state(h, buf.as_mut_ptr().cast(), size, &mut written) };
        self.ensure(st == LRA_OK && written == size, || {
            format!(
                "lra_save_state: {st}, {written} of {size}: {}",
                handle_error(h)
            )
        });
        buf
    }

    fn counters_of(&self, h: *mut lra_handle) -> lra_counters {
        let mut c = lra_counters::default();
        let st = unsafe { lra_get_counters(h, &mut c) };
        self.ensure(st == LRA_OK, || format!("lra_get_counters: {st}"));
        c
    }

    fn lr_of(&self, h: *mut lra_handle) -> f64 {
        let mut lr = f64::NAN;
        let st = unsafe { lra_get_lr(h, &mut lr) };
        self.ensure(st == LRA_OK, || format!("lra_get_lr: {st}"));
        lr
    }

    /// The model's claims about slot `i`, checked through the getters.
    fn check_model(&self, i: usize) {
        let s = &self.slots[i];
        let lr = self.lr_of(s.h);
        let (lo, hi) = lr_bounds(&s.cfg);
        self.ensure(lr.is_finite() && lr >= lo && lr <= hi, || {
            format!("handle {i}: η = {lr} outside [{lo}, {hi}]")
        });
        self.ensure(lr == s.model.lr, || {
            format!("handle {i}: η = {lr}, the model says {}", s.model.lr)
        });
        let c = self.counters_of(s.h);
        let m = &s.model;
        let d = m.decisions;
        let reevals = d.iter().sum::<u64>();
        self.ensure(
            c.steps == m.steps
                && c.reevals == reevals
                && [c.kept, c.raised, c.lowered, c.reeval_skipped] == d
                && c.applied <= c.steps
                && c.skipped == c.steps - c.applied,
            || format!("handle {i}: counters {c:?}, model {m:?}"),
        );
        if m.exact {
            self.ensure(c.applied == m.applied, || {
                format!(
                    "handle {i}: {} applied steps, the model says {}",
                    c.applied, m.applied
                )
            });
        }
        let mut due = 7u32;
        let st = unsafe { lra_should_reeval(s.h, &mut due) };
        match m.pending {
            Some(p) => self.ensure(st == LRA_OK && due == p.due as u32, || {
                format!("handle {i}: lra_should_reeval {st}, due {due}, model {p:?}")
            }),
            None => self.ensure(st == LRA_CALL_ORDER && due == 7, || {
                format!("handle {i}: lra_should_reeval without a pending step: {st}, due {due}")
            }),
        }
        let mut info = MaybeUninit::<lra_reeval_info>::zeroed();
        let st = unsafe { lra_get_last_reeval(s.h, info.as_mut_ptr()) };
        match m.last {
            Some(bits) => {
                let got = support::info_bits(unsafe { &info.assume_init() });
                self.ensure(st == LRA_OK && got == bits, || {
                    format!("handle {i}: lra_get_last_reeval {st}, {got:?} != {bits:?}")
                });
            }
            None => self.ensure(st == LRA_CALL_ORDER, || {
                format!("handle {i}: lra_get_last_reeval before any report: {st}")
            }),
        }
        if !s.tensors.tainted && !m.state_tainted {
            let bad = s.tensors.nonfinite_param();
            self.ensure(bad.is_none(), || {
                format!("handle {i}: parameter tensors[{:?}] is not finite, though every gradient and loss was", bad.unwrap())
            });
        }
    }

    // ---- handles --------------------------------------------------------

    fn create(&mut self, cfg: &lra_config) -> (lra_status, *mut lra_handle) {
        let mut h = 0x10 as *mut lra_handle;
        let st = unsafe { lra_create(cfg, &mut h) };
        self.log(format!("lra_create({cfg:?}) = {st}, {h:p}"));
        self.status("lra_create", st, None);
        self.ensure((st == LRA_OK) != h.is_null(), || {
            format!("lra_create returned {st} and handle {h:p}")
        });
        (st, h)
    }

    fn new_slot(&mut self, cfg: lra_config) {
        let (st, h) = self.create(&cfg);
        self.ensure(st == LRA_OK, || {
            format!("a valid config was refused: {}", thread_error())
        });
        let tensors = Tensors::random(&mut self.rng);
        let mut slot = Slot {
            h,
            cfg,
            model: Model::new(&cfg),
            tensors,
            ctl: None,
        };
        if (needs_reduction(&cfg) && self.rng.chance(0.9)) || self.rng.chance(0.2) {
            let ctl = ReduceCtl::new(Mode::Identity, self.rng.next());
            ctl.me.set(h);
            let st = unsafe { lra_set_reduction(h, Some(reduce_cb), ctl.user()) };
            self.log(format!(
                "lra_set_reduction(h{}, identity) = {st}",
                self.slots.len()
            ));
            self.status("lra_set_reduction", st, Some(h));
            self.ensure(st == LRA_OK, || "lra_set_reduction refused".into());
            slot.ctl = Some(ctl);
        }
        self.slots.push(slot);
        let n = self.slots.len();
        if n == 2 {
            let (a, b) = (self.slots[0].h, self.slots[1].h);
            for (s, other) in self.slots.iter().zip([b, a]) {
                if let Some(c) = &s.ctl {
                    c.sibling.set(other);
                }
            }
        }
    }

    fn destroy_all(&mut self) {
        for s in &self.slots {
            if let Some(c) = &s.ctl {
                c.sibling.set(null_mut());
            }
        }
        for s in std::mem::take(&mut self.slots) {
            unsafe { lra_destroy(s.h) };
        }
    }

    // ---- one iteration ----------------------------------------------------

    fn run(seed: u64) -> BTreeMap<(String, lra_status), u64> {
        let mut f = Fuzz {
            seed,
            rng: Rng(seed),
            trace: Vec::new(),
            slots: Vec::new(),
            pool: Vec::new(),
            seen: RefCell::default(),
        };
        // Invalid configurations: refused with a message naming the field.
        for _ in 0..f.rng.below(3) {
            let (cfg, field) = broken_config(&mut f.rng);
            let (st, _) = f.create(&cfg);
            f.ensure(st == LRA_INVALID_CONFIG, || {
                format!("broken {field}: lra_create returned {st}")
            });
            let msg = thread_error();
            f.ensure(msg.contains(field), || {
                format!("broken {field}: message '{msg}'")
            });
        }
        let first = random_config(&mut f.rng);
        f.new_slot(first);
        if f.rng.chance(0.6) {
            // Half the time a near twin: checkpoints may then cross over.
            let second = if f.rng.chance(0.5) {
                let mut c = random_config(&mut f.rng);
                c.optimizer = first.optimizer;
                for (dst, src) in [
                    (&mut c.momentum, first.momentum),
                    (&mut c.alpha, first.alpha),
                    (&mut c.beta1, first.beta1),
                    (&mut c.beta2, first.beta2),
                    (&mut c.eps, first.eps),
                    (&mut c.weight_decay, first.weight_decay),
                ] {
                    *dst = src;
                }
                c
            } else {
                random_config(&mut f.rng)
            };
            f.new_slot(second);
        }
        for _ in 0..CALLS_PER_ITERATION {
            let i = f.rng.index(f.slots.len());
            f.one_call(i);
        }
        for i in 0..f.slots.len() {
            f.twin_check(i, false);
            f.check_model(i);
        }
        f.destroy_all();
        f.seen.into_inner()
    }

    fn one_call(&mut self, i: usize) {
        if self.slots[i].model.layout.is_none() && self.rng.chance(0.1) {
            // Until a step succeeds, any layout may come (a failed first
            // step fixes nothing).
            self.slots[i].tensors = Tensors::random(&mut self.rng);
        }
        let h = self.slots[i].h;
        let before = self.checkpoint_of(h);
        let params = self.slots[i].tensors.params();
        let calls = self.slots[i].ctl_calls();
        // (name, status, whether the call may change the handle)
        let (name, st, mutating) = match self.rng.below(100) {
            0..=24 => self.valid_step(i, false),
            25..=34 => self.valid_step(i, true),
            35..=47 => self.invalid_step(i),
            48..=61 => self.report(i),
            62..=65 => self.getters(i),
            66..=70 => self.set_lr(i),
            71..=76 => self.save(i),
            77..=86 => self.load(i),
            87..=89 => {
                self.twin_check(i, true);
                self.check_model(i);
                return;
            }
            90..=94 => self.set_reduction(i),
            95..=96 => {
                self.forged_load(i);
                return;
            }
            _ => {
                self.misc(i);
                ("misc", LRA_OK, false)
            }
        };
        let s = &self.slots[i];
        if st != LRA_OK || !mutating {
            let after = self.checkpoint_of(h);
            self.ensure(after == before, || {
                format!("{name} returned {st} but changed the checkpoint")
            });
            self.ensure(s.tensors.params() == params, || {
                format!("{name} returned {st} but wrote parameters")
            });
        }
        if st != LRA_OK && st != LRA_REDUCTION_FAILED {
            self.ensure(s.ctl_calls() == calls, || {
                format!("{name} was refused with {st} after calling the reduction")
            });
        }
        self.check_model(i);
    }

    // ---- steps ------------------------------------------------------------

    /// A step with the handle's own tensors (which fix or match its layout).
    fn valid_step(&mut self, i: usize, ex: bool) -> (&'static str, lra_status, bool) {
        let rng = &mut self.rng;
        let s = &mut self.slots[i];
        let grads_finite = s.tensors.fill_grads(rng);
        let loss = if rng.chance(0.05) {
            rng.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY])
        } else {
            rng.unit() * 4.0 - 0.5
        };
        let obs_var = if rng.chance(0.2) {
            rng.pick(&[0.1, 1.0, 1e-30])
        } else {
            0.0
        };
        let flag: Option<f32> = if ex && rng.chance(0.8) {
            Some(rng.pick(&[0.0, -0.0, 1.0, 1.0, f32::NAN, f32::INFINITY]))
        } else {
            None
        };
        let flag_cell = [flag.unwrap_or(0.0)];
        let flag_ptr = if flag.is_some() {
            flag_cell.as_ptr()
        } else {
            null()
        };
        let list = s.tensors.list();
        let tptr = if list.is_empty() && rng.chance(0.5) {
            null()
        } else {
            list.as_ptr()
        };
        let before_params = s.tensors.params();
        let calls = s.ctl_calls();
        let st = unsafe {
            if ex {
                lra_step_ex(s.h, tptr, list.len(), loss, obs_var, flag_ptr, null_mut())
            } else {
                lra_step(s.h, tptr, list.len(), loss, obs_var, null_mut())
            }
        };
        let name = if ex { "lra_step_ex" } else { "lra_step" };
        let layout = s.tensors.layout();
        self.log(format!(
            "h{i}.{name}(layout {layout:?}, loss {loss}, obs_var {obs_var}, found_inf {flag:?}, grads finite {grads_finite}) = {st}"
        ));
        let s = &self.slots[i];
        self.status(name, st, Some(s.h));
        let mode = s.mode();
        let cfg = s.cfg;
        // s = 1 without looking at φ: f* unknown, R = 0 and no cap below 1
        let fused = cfg.f_star.is_nan() && obs_var == 0.0 && cfg.scale_max >= 1.0;
        let sharded = cfg.sharding == LRA_SHARDING_SHARDED;
        let rank_local = cfg.loss_is_rank_local == 1;
        let prewrite = sharded && loss.is_finite() && (!fused || cfg.check_finite == 1);
        let expect_calls = rank_local as u64 + prewrite as u64;
        let layout_ok = s.model.layout.as_ref().is_none_or(|l| *l == layout);
        let expected = if needs_reduction(&cfg) && mode.is_none() {
            LRA_CALL_ORDER
        } else if !layout_ok {
            LRA_SIZE_MISMATCH
        } else if matches!(mode, Some(Mode::Fail(_))) && expect_calls > 0 {
            LRA_REDUCTION_FAILED
        } else {
            LRA_OK
        };
        self.ensure(st == expected, || {
            format!(
                "{name} returned {st}, the model expected {expected}: {}",
                thread_error()
            )
        });
        if st != LRA_OK {
            return (name, st, true);
        }
        let exact = mode.is_none_or(Mode::exact);
        if exact {
            let got = s.ctl_calls() - calls;
            self.ensure(got == expect_calls, || {
                format!("{name} called the reduction {got} times, expected {expect_calls}")
            });
        }
        let found = flag.is_some_and(|x| x != 0.0);
        let skip = if !loss.is_finite() {
            Some(LRA_SKIP_NONFINITE_LOSS)
        } else if found {
            Some(LRA_SKIP_FOUND_INF)
        } else if !grads_finite && cfg.check_finite == 1 {
            Some(LRA_SKIP_NONFINITE_GRAD)
        } else if !grads_finite && !s.tensors.tainted && !s.model.state_tainted {
            Some(LRA_SKIP_NONFINITE_PHI)
        } else {
            None
        };
        let writes = !matches!(
            skip,
            Some(LRA_SKIP_NONFINITE_LOSS | LRA_SKIP_FOUND_INF | LRA_SKIP_NONFINITE_GRAD)
        );
        if exact && !writes {
            self.ensure(s.tensors.params() == before_params, || {
                format!("{name}: a skipped step ({skip:?}) wrote parameters")
            });
        }
        let insane = writes && self.effective_lr(i, loss, obs_var) > SANE_LR;
        let s = &mut self.slots[i];
        let m = &mut s.model;
        if m.layout.is_none() {
            m.layout = Some(layout);
        }
        if insane {
            s.tensors.tainted = true;
        }
        let index = m.steps;
        m.steps += 1;
        let due = m.due(&cfg, index);
        if !exact {
            m.exact = false;
        }
        if m.exact && writes {
            m.applied += 1;
        }
        // An effective η above SANE_LR may legitimately overflow parameters
        // (η up to f32::MAX is allowed): finiteness is only promised below.
        if (writes && !grads_finite) || !exact {
            s.tensors.tainted = true;
            m.state_tainted = true;
        }
        m.pending = Some(PendingModel {
            loss,
            fused,
            due,
            skip: if m.exact { skip } else { None },
        });
        (name, st, true)
    }

    /// The effective η (s·η) of the step just applied on slot `i`, s as
    /// `ScaleRule::scale` computes it from the step's φ. With f* known, s =
    /// 2(f − f*)/(φ + R) is unbounded (scale_max = inf by default) when φ + R
    /// is tiny: a tiny gradient, or φ ≤ 0 with a tiny R, which then moves
    /// the parameters by s·η·d with d from the optimizer's state. Such steps
    /// may overflow parameters as any huge η does (s·η itself saturates at
    /// f32::MAX: see the Polyak test below).
    fn effective_lr(&self, i: usize, loss: f64, obs_var: f64) -> f64 {
        let s = &self.slots[i];
        let c = &s.cfg;
        if c.f_star.is_nan() && obs_var == 0.0 && c.scale_max >= 1.0 {
            return s.model.lr;
        }
        let mut phi = f64::NAN;
        let st = unsafe { lra_get_last_phi(s.h, &mut phi) };
        self.ensure(st == LRA_OK, || format!("lra_get_last_phi: {st}"));
        let denom = phi + obs_var;
        let delta = if c.f_star.is_nan() {
            phi * 0.5
        } else {
            loss - c.f_star
        };
        // at or below a known f*: no step, whatever φ is
        let scale = if !c.f_star.is_nan() && delta <= 0.0 {
            0.0
        } else if denom > 0.0 {
            2.0 * delta / denom
        } else {
            1.0
        };
        let scale = if scale.is_nan() { 1.0 } else { scale };
        scale.max(0.0).min(c.scale_max) * s.model.lr
    }

    /// A step with one thing wrong; the handle must refuse it untouched.
    fn invalid_step(&mut self, i: usize) -> (&'static str, lra_status, bool) {
        let rng = &mut self.rng;
        let s = &mut self.slots[i];
        s.tensors.fill_grads(rng);
        let mut list = s.tensors.list();
        let mut extra = Buffer::new(8, LRA_DTYPE_F32);
        let mut fake_handle = vec![0u64; 2048];
        let mut h = s.h;
        let mut count = list.len();
        let mut tptr: *const lra_tensor = list.as_ptr();
        let mut obs_var = 0.0;
        let mut stream: *mut c_void = null_mut();
        let flag_words = [0u64; 2];
        let mut flag: *const f32 = null();
        let nonempty: Vec<usize> = (0..list.len()).filter(|&t| list[t].numel > 0).collect();
        let fixed = s.model.layout.is_some();
        // (what, expected status)
        let (what, want) = match rng.below(16) {
            0 => {
                tptr = null();
                count = count.max(1);
                ("tensors NULL", LRA_NULL_POINTER)
            }
            1 if !nonempty.is_empty() => {
                let t = rng.pick(&nonempty);
                if rng.chance(0.5) {
                    list[t].param = null_mut();
                } else {
                    list[t].grad = null();
                }
                ("param/grad NULL", LRA_NULL_POINTER)
            }
            2 if !nonempty.is_empty() => {
                let t = rng.pick(&nonempty);
                let off = if list[t].dtype == LRA_DTYPE_F32 {
                    rng.pick(&[1usize, 2, 3])
                } else {
                    1
                };
                if rng.chance(0.5) {
                    list[t].param = list[t].param.cast::<u8>().wrapping_add(off).cast();
                } else {
                    list[t].grad = list[t].grad.cast::<u8>().wrapping_add(off).cast();
                }
                ("misaligned", LRA_INVALID_ARGUMENT)
            }
            3 if !nonempty.is_empty() => {
                let t = rng.pick(&nonempty);
                let u = rng.pick(&nonempty);
                let size = dtype_size(list[u].dtype);
                match rng.below(3) {
                    0 => list[t].param = list[t].grad.cast_mut(),
                    1 if t != u => list[t].param = list[u].param,
                    _ => {
                        // Inside u's param or grad, at an aligned offset.
                        let base = if rng.chance(0.5) {
                            list[u].param.cast_const()
                        } else {
                            list[u].grad
                        };
                        let at = rng.index(list[u].numel as usize) * size;
                        let p = base.cast::<u8>().wrapping_add(at);
                        if (p as usize).is_multiple_of(dtype_size(list[t].dtype))
                            && (t != u || base != list[t].param.cast_const())
                        {
                            list[t].param = p.cast_mut().cast();
                        } else {
                            list[t].param = list[t].grad.cast_mut();
                        }
                    }
                }
                ("aliasing", LRA_INVALID_ARGUMENT)
            }
            4 if !list.is_empty() => {
                let t = rng.index(list.len());
                list[t].dtype = rng.pick(&[3u32, 4, 255, u32::MAX]);
                ("dtype not an lra_dtype", LRA_INVALID_ARGUMENT)
            }
            5 if !list.is_empty() => {
                let t = rng.index(list.len());
                list[t].numel = rng.pick(&[u64::MAX, 1 << 62, (isize::MAX as u64) / 2 + 1]);
                list[t].dtype = LRA_DTYPE_F32;
                ("numel too large", LRA_INVALID_ARGUMENT)
            }
            6 if fixed && !list.is_empty() => {
                let t = rng.index(list.len());
                if list[t].numel > 0 && rng.chance(0.5) {
                    list[t].numel -= 1;
                } else if rng.chance(0.5) {
                    list[t].numel += 1;
                } else {
                    list[t].dtype = DTYPES[(list[t].dtype as usize + 1 + rng.index(2)) % 3];
                }
                ("numel/dtype changed", LRA_SIZE_MISMATCH)
            }
            7 if fixed => {
                if !list.is_empty() && rng.chance(0.5) {
                    count -= 1;
                } else {
                    list.push(extra.tensor());
                    count += 1;
                    tptr = list.as_ptr();
                }
                ("count changed", LRA_SIZE_MISMATCH)
            }
            8 => {
                obs_var = rng.pick(&[f64::NAN, -1.0, f64::INFINITY, -0.5e-300]);
                ("obs_var", LRA_INVALID_ARGUMENT)
            }
            9 => {
                stream = 0x1000 as *mut c_void;
                ("stream on a host handle", LRA_INVALID_ARGUMENT)
            }
            10 => {
                flag = flag_words
                    .as_ptr()
                    .cast::<u8>()
                    .wrapping_add(rng.pick(&[1, 2, 3]))
                    .cast();
                ("found_inf misaligned", LRA_INVALID_ARGUMENT)
            }
            11 => {
                h = null_mut();
                ("handle NULL", LRA_NULL_POINTER)
            }
            12 => {
                h = fake_handle.as_mut_ptr().cast();
                ("handle not live", LRA_INVALID_ARGUMENT)
            }
            13 => {
                h = s.h.cast::<u8>().wrapping_add(4).cast();
                ("handle misaligned", LRA_INVALID_ARGUMENT)
            }
            _ => {
                tptr = list.as_ptr().cast::<u8>().wrapping_add(4).cast();
                count = count.max(1);
                ("tensors misaligned", LRA_INVALID_ARGUMENT)
            }
        };
        let loss = rng.unit();
        let use_ex = !flag.is_null() || rng.chance(0.5);
        let st = unsafe {
            if use_ex {
                lra_step_ex(h, tptr, count, loss, obs_var, flag, stream)
            } else {
                lra_step(h, tptr, count, loss, obs_var, stream)
            }
        };
        let name = if use_ex { "lra_step_ex" } else { "lra_step" };
        self.log(format!("h{i}.{name}({what}, count {count}) = {st}"));
        let s = &self.slots[i];
        let live = h == s.h;
        self.status(name, st, live.then_some(s.h));
        // The reducer check comes first on a handle that needs one.
        let no_reducer = live && needs_reduction(&s.cfg) && s.ctl.is_none();
        self.ensure(
            st == want || (no_reducer && st == LRA_CALL_ORDER && want != LRA_NULL_POINTER),
            || {
                format!(
                    "{what}: step returned {st}, expected {want}: {}",
                    thread_error()
                )
            },
        );
        (name, st, true)
    }

    // ---- re-evaluation ------------------------------------------------------

    fn report(&mut self, i: usize) -> (&'static str, lra_status, bool) {
        let rng = &mut self.rng;
        let loss_after = if rng.chance(0.08) {
            rng.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY])
        } else {
            rng.unit() * 4.0 - 0.5
        };
        let out_kind = rng.below(10);
        let s = &self.slots[i];
        let mut out = [0u64; 8];
        let sentinel = out;
        let out_ptr: *mut lra_reeval_info = match out_kind {
            0 => null_mut(),
            1 => out.as_mut_ptr().cast::<u8>().wrapping_add(4).cast(),
            _ => out.as_mut_ptr().cast(),
        };
        let mut phi_before = f64::NAN;
        let phi_st = unsafe { lra_get_last_phi(s.h, &mut phi_before) };
        self.status("lra_get_last_phi", phi_st, Some(s.h));
        let calls = s.ctl_calls();
        let st = unsafe { lra_report_reeval(s.h, loss_after, out_ptr) };
        self.log(format!(
            "h{i}.lra_report_reeval({loss_after}, out kind {out_kind}) = {st}"
        ));
        let s = &self.slots[i];
        self.status("lra_report_reeval", st, Some(s.h));
        let cfg = s.cfg;
        let mode = s.mode();
        let sharded = cfg.sharding == LRA_SHARDING_SHARDED;
        let rank_local = cfg.loss_is_rank_local == 1;
        let Some(p) = s.model.pending else {
            let want = if out_kind == 1 {
                LRA_INVALID_ARGUMENT
            } else {
                LRA_CALL_ORDER
            };
            self.ensure(st == want, || {
                format!("report without a pending step: {st}")
            });
            return ("lra_report_reeval", st, true);
        };
        let reduces = (sharded && p.fused) || rank_local;
        let want = if out_kind == 1 {
            LRA_INVALID_ARGUMENT
        } else if reduces && matches!(mode, Some(Mode::Fail(_))) {
            LRA_REDUCTION_FAILED
        } else if reduces && mode.is_none() {
            // Only after restoring a pending step (lra_step refuses to run
            // without the reduction): refused like lra_step.
            LRA_CALL_ORDER
        } else {
            LRA_OK
        };
        self.ensure(st == want, || {
            format!("report: {st}, expected {want}: {}", thread_error())
        });
        if st != LRA_OK {
            self.ensure(out == sentinel, || "a failed report wrote its out".into());
            return ("lra_report_reeval", st, true);
        }
        let exact = s.model.exact && mode.is_none_or(Mode::exact);
        if exact {
            let got = s.ctl_calls() - calls;
            let reduces = reduces && mode.is_some();
            self.ensure(got == reduces as u64, || {
                format!("report called the reduction {got} times")
            });
        }
        let lr_now = self.lr_of(s.h);
        let mut info = lra_reeval_info {
            phi: 0.0,
            rho: 0.0,
            scale: 0.0,
            lr_before: 0.0,
            lr: 0.0,
            decision: 9,
            skip_reason: 9,
        };
        let st2 = unsafe { lra_get_last_reeval(s.h, &mut info) };
        self.ensure(st2 == LRA_OK, || {
            format!("lra_get_last_reeval after a report: {st2}")
        });
        if out_kind >= 2 {
            let written: lra_reeval_info = unsafe { out.as_ptr().cast::<lra_reeval_info>().read() };
            self.ensure(
                support::info_bits(&written) == support::info_bits(&info),
                || format!("report wrote {written:?}, lra_get_last_reeval says {info:?}"),
            );
        }
        let m = &s.model;
        let lr0 = m.lr;
        self.ensure(info.lr_before == lr0 && info.lr == lr_now, || {
            format!("info {info:?}: η before {lr0}, η now {lr_now}")
        });
        if exact && !(sharded && p.fused && mode == Some(Mode::Double)) {
            self.ensure(same_f64(info.phi, phi_before), || {
                format!(
                    "info.phi {} but lra_get_last_phi said {phi_before}",
                    info.phi
                )
            });
        }
        if let (true, Some(skip)) = (exact, p.skip) {
            self.ensure(
                info.decision == LRA_DECISION_SKIPPED && info.skip_reason == skip,
                || format!("pending {p:?}: info {info:?}"),
            );
        }
        if info.decision == LRA_DECISION_SKIPPED {
            self.ensure(
                // 6 (s = 0) is reserved: an s = 0 step is judged like any other.
                info.lr == lr0 && info.rho.is_nan() && (1..=5).contains(&info.skip_reason),
                || format!("skipped re-evaluation changed η or lacks a reason: {info:?}"),
            );
        } else {
            self.ensure(
                info.skip_reason == LRA_SKIP_NONE && info.phi.is_finite() && info.phi > 0.0,
                || format!("decided on a step that should have been skipped: {info:?}"),
            );
            if exact {
                let rho = if loss_after.is_finite() {
                    (p.loss - loss_after) / (info.phi * 0.5 + cfg.denom_eps)
                } else {
                    f64::NEG_INFINITY
                };
                self.ensure(same_f64(rho, info.rho), || {
                    format!("ρ = {}, the model computes {rho} ({p:?})", info.rho)
                });
            }
            let (dec, lr) = if info.rho > cfg.threshold_up {
                (LRA_DECISION_RAISED, clamp_lr(&cfg, lr0 * cfg.factor_up))
            } else if info.rho < cfg.threshold_down {
                (LRA_DECISION_LOWERED, clamp_lr(&cfg, lr0 * cfg.factor_down))
            } else {
                (LRA_DECISION_KEPT, lr0)
            };
            self.ensure(info.decision == dec && info.lr == lr, || {
                format!(
                    "ρ = {} gives decision {dec}, η {lr}; got {info:?}",
                    info.rho
                )
            });
        }
        let bits = support::info_bits(&info);
        let s = &mut self.slots[i];
        let m = &mut s.model;
        m.pending = None;
        m.lr = info.lr;
        m.last = Some(bits);
        let k = match info.decision {
            LRA_DECISION_KEPT => 0,
            LRA_DECISION_RAISED => 1,
            LRA_DECISION_LOWERED => 2,
            _ => 3,
        };
        m.decisions[k] += 1;
        if !mode.is_none_or(Mode::exact) {
            m.exact = false;
        }
        ("lra_report_reeval", st, true)
    }

    // ---- getters and setters --------------------------------------------------

    /// Out-pointers: valid, NULL or misaligned; a refused call writes nothing.
    fn getters(&mut self, i: usize) -> (&'static str, lra_status, bool) {
        let h = self.slots[i].h;
        let which = self.rng.below(6);
        let kind = self.rng.below(4);
        let mut words = [0x5a5a_5a5a_5a5a_5a5au64; 12];
        let sentinel = words;
        let p: *mut u8 = match kind {
            0 => null_mut(),
            1 => words.as_mut_ptr().cast::<u8>().wrapping_add(1),
            _ => words.as_mut_ptr().cast(),
        };
        let (name, st) = unsafe {
            match which {
                0 => ("lra_get_lr", lra_get_lr(h, p.cast())),
                1 => ("lra_get_last_phi", lra_get_last_phi(h, p.cast())),
                2 => ("lra_get_counters", lra_get_counters(h, p.cast())),
                3 => ("lra_should_reeval", lra_should_reeval(h, p.cast())),
                4 => ("lra_state_size", lra_state_size(h, p.cast())),
                _ => ("lra_get_last_reeval", lra_get_last_reeval(h, p.cast())),
            }
        };
        self.log(format!("h{i}.{name}(out kind {kind}) = {st}"));
        self.status(name, st, Some(h));
        let m = &self.slots[i].model;
        let order_error = (which == 3 && m.pending.is_none()) || (which == 5 && m.last.is_none());
        // Every getter checks its out-pointer before the handle's state.
        let want = match kind {
            0 => LRA_NULL_POINTER,
            1 => LRA_INVALID_ARGUMENT,
            _ if order_error => LRA_CALL_ORDER,
            _ => LRA_OK,
        };
        self.ensure(st == want, || format!("{name}: {st}, expected {want}"));
        if st != LRA_OK {
            self.ensure(words == sentinel, || {
                format!("a refused {name} wrote its out")
            });
        }
        if which == 4 && st == LRA_OK {
            let size = words[0] as usize;
            let ckpt = self.checkpoint_of(h);
            self.ensure(size == ckpt.len(), || {
                format!("state size {size} != {}", ckpt.len())
            });
        }
        (name, st, false)
    }

    fn set_lr(&mut self, i: usize) -> (&'static str, lra_status, bool) {
        let cfg = self.slots[i].cfg;
        let (lo, hi) = lr_bounds(&cfg);
        let rng = &mut self.rng;
        let lr = match rng.below(6) {
            0 => rng.pick(&[f64::NAN, f64::INFINITY, -1.0, 0.0, -0.0, 1e300, 1e-300]),
            1 => lo,
            2 => hi,
            3 => lo * 0.5,
            4 => hi * 2.0,
            _ => rng.log_uniform(lo.max(1e-6), hi.min(10.0).max(lo.max(1e-6))),
        };
        let h = self.slots[i].h;
        let st = unsafe { lra_set_lr(h, lr) };
        self.log(format!("h{i}.lra_set_lr({lr}) = {st}"));
        self.status("lra_set_lr", st, Some(h));
        let want = if lr_allowed(&cfg, lr) {
            LRA_OK
        } else {
            LRA_INVALID_ARGUMENT
        };
        self.ensure(st == want, || {
            format!("lra_set_lr({lr}): {st}, expected {want}")
        });
        if st == LRA_OK {
            self.slots[i].model.lr = lr;
        }
        ("lra_set_lr", st, true)
    }

    fn set_reduction(&mut self, i: usize) -> (&'static str, lra_status, bool) {
        let rng = &mut self.rng;
        let mode = match rng.below(10) {
            0 => None,
            1 | 2 => Some(Mode::Fail(rng.pick(&[1, -1, 7, i32::MIN]))),
            3 => Some(Mode::Double),
            4 => Some(Mode::Garbage),
            5 => Some(Mode::ReenterSelf),
            6 => Some(Mode::CallSibling),
            _ => Some(Mode::Identity),
        };
        let seed = rng.next();
        let h = self.slots[i].h;
        let other = self
            .slots
            .get(1 - i.min(1))
            .filter(|_| self.slots.len() == 2)
            .map(|s| s.h);
        let (st, ctl) = match mode {
            None => (unsafe { lra_set_reduction(h, None, null_mut()) }, None),
            Some(m) => {
                // Usually just change what the registered one does.
                if let (Some(c), true) = (&self.slots[i].ctl, rng.chance(0.7)) {
                    c.mode.set(m);
                    self.log(format!("h{i}: reduction now {m:?}"));
                    return ("lra_set_reduction", LRA_OK, false);
                }
                let ctl = ReduceCtl::new(m, seed);
                ctl.me.set(h);
                ctl.sibling.set(other.unwrap_or(null_mut()));
                (
                    unsafe { lra_set_reduction(h, Some(reduce_cb), ctl.user()) },
                    Some(ctl),
                )
            }
        };
        self.log(format!("h{i}.lra_set_reduction({mode:?}) = {st}"));
        self.status("lra_set_reduction", st, Some(h));
        let want = if mode.is_none() && needs_reduction(&self.slots[i].cfg) {
            LRA_INVALID_ARGUMENT
        } else {
            LRA_OK
        };
        self.ensure(st == want, || {
            format!("lra_set_reduction: {st}, expected {want}")
        });
        let s = &mut self.slots[i];
        if st == LRA_OK {
            // lra dropped the previous registration: nothing points at the
            // old control any more.
            s.ctl = ctl;
        }
        ("lra_set_reduction", st, false)
    }

    // ---- checkpoints ------------------------------------------------------------

    fn save(&mut self, i: usize) -> (&'static str, lra_status, bool) {
        let h = self.slots[i].h;
        let size = self.checkpoint_of(h).len();
        let rng = &mut self.rng;
        let kind = rng.below(7);
        let len = match kind {
            0 => size + rng.index(64) + 1,
            1 => rng.index(size),
            _ => size,
        };
        let mut buf = vec![0xa5u8; len + 16];
        let bufp: *mut u8 = if kind == 2 {
            null_mut()
        } else {
            buf.as_mut_ptr()
        };
        let mut written = 0x77usize;
        let wp: *mut usize = match kind {
            3 => null_mut(),
            // Inside the buffer: refused whatever its alignment.
            4 => unsafe { buf.as_mut_ptr().add(rng.index(len)) }.cast(),
            5 => (&mut written as *mut usize)
                .cast::<u8>()
                .wrapping_add(3)
                .cast(),
            _ => &mut written,
        };
        let call_len = if kind == 6 {
            isize::MAX as usize + 1
        } else {
            len
        };
        let st = unsafe { lra_save_state(h, bufp.cast(), call_len, wp) };
        self.log(format!(
            "h{i}.lra_save_state(kind {kind}, len {len} of {size}) = {st}"
        ));
        self.status("lra_save_state", st, Some(h));
        let want = match kind {
            1 => LRA_BUFFER_TOO_SMALL,
            2 => LRA_NULL_POINTER,
            4..=6 => LRA_INVALID_ARGUMENT,
            _ => LRA_OK,
        };
        self.ensure(st == want, || {
            format!("save kind {kind}: {st}, expected {want}")
        });
        if st == LRA_OK {
            let reference = self.checkpoint_of(h);
            self.ensure(buf[..size] == reference[..], || "saved bytes differ".into());
            self.ensure(buf[size..].iter().all(|&b| b == 0xa5), || {
                "save wrote past the checkpoint".into()
            });
            if kind != 3 {
                self.ensure(written == size, || format!("written {written} != {size}"));
            }
            let s = &self.slots[i];
            self.pool.push(Saved {
                bytes: reference,
                model: s.model.clone(),
                key: config_key(&s.cfg),
            });
        } else {
            self.ensure(buf.iter().all(|&b| b == 0xa5) && written == 0x77, || {
                "a refused save wrote".into()
            });
        }
        ("lra_save_state", st, false)
    }

    /// Whether `saved` must load into slot `i`.
    fn loads(&self, i: usize, saved: &Saved) -> bool {
        let s = &self.slots[i];
        let mine = &s.model.layout;
        saved.key == config_key(&s.cfg)
            && lr_allowed(&s.cfg, saved.model.lr)
            && match &saved.model.layout {
                None => mine.is_none(),
                Some(l) => mine.as_ref().is_none_or(|m| m == l),
            }
    }

    fn load(&mut self, i: usize) -> (&'static str, lra_status, bool) {
        let h = self.slots[i].h;
        if self.pool.is_empty() || self.rng.chance(0.2) {
            let ckpt = self.checkpoint_of(h);
            let s = &self.slots[i];
            self.pool.push(Saved {
                bytes: ckpt,
                model: s.model.clone(),
                key: config_key(&s.cfg),
            });
        }
        let k = self.rng.index(self.pool.len());
        let mut bytes = self.pool[k].bytes.clone();
        let rng = &mut self.rng;
        let kind = rng.below(10);
        let mut ptr: *const u8 = bytes.as_ptr();
        let mut len = bytes.len();
        match kind {
            0 => len = rng.index(len),
            1 => {
                let at = rng.index(len);
                bytes[at] ^= 1 << rng.below(8);
                ptr = bytes.as_ptr();
            }
            2 => ptr = null(),
            3 => {
                for b in bytes.iter_mut() {
                    *b = rng.next() as u8;
                }
                ptr = bytes.as_ptr();
            }
            4 => {
                bytes.push(0);
                len += 1;
                ptr = bytes.as_ptr();
            }
            _ => {}
        }
        let st = unsafe { lra_load_state(h, ptr.cast(), len) };
        self.log(format!(
            "h{i}.lra_load_state(pool[{k}], kind {kind}, len {len}) = {st}"
        ));
        self.status("lra_load_state", st, Some(h));
        let want = match kind {
            2 => LRA_NULL_POINTER,
            0 | 1 | 3 | 4 => LRA_BAD_CHECKPOINT,
            _ if self.loads(i, &self.pool[k]) => LRA_OK,
            _ => LRA_BAD_CHECKPOINT,
        };
        self.ensure(st == want, || {
            format!(
                "load kind {kind} of pool[{k}]: {st}, expected {want}: {}",
                thread_error()
            )
        });
        if st == LRA_OK {
            let now = self.checkpoint_of(h);
            self.ensure(now == self.pool[k].bytes, || {
                "a loaded checkpoint does not save back to the same bytes".into()
            });
            let model = self.pool[k].model.clone();
            let s = &mut self.slots[i];
            if let Some(l) = &model.layout {
                if *l != s.tensors.layout() {
                    s.tensors = Tensors::with_layout(&mut self.rng, l);
                }
            }
            s.model = model;
        }
        ("lra_load_state", st, true)
    }

    /// A checksum-valid checkpoint with forged fields, loaded into a
    /// throwaway handle which then takes a few calls: refused or not, no
    /// call panics and η stays in bounds.
    fn forged_load(&mut self, i: usize) {
        let h = self.slots[i].h;
        let mut bytes = self.checkpoint_of(h);
        let Some(base) = after_layout(&bytes) else {
            return;
        };
        let body = bytes.len() - 8;
        for _ in 0..self.rng.below(3) + 1 {
            let rng = &mut self.rng;
            let at = if rng.chance(0.7) && base + 184 <= body {
                // A field after the layout, 4-byte aligned.
                base + 4 * rng.index(46)
            } else {
                rng.index(body.saturating_sub(8)) / 4 * 4
            };
            let random = rng.next();
            let v: u64 = rng.pick(&[
                u64::MAX,
                0,
                1,
                1 << 63,
                f64::NAN.to_bits(),
                f64::INFINITY.to_bits(),
                (u64::MAX - 1),
                0xffff_ffff,
                random,
            ]);
            let w = (body - at).min(8);
            bytes[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
        }
        support::reseal(&mut bytes);
        let cfg = self.slots[i].cfg;
        let (st, t) = self.create(&cfg);
        self.ensure(st == LRA_OK, || "lra_create".into());
        let ctl = ReduceCtl::new(Mode::Identity, 0);
        ctl.me.set(t);
        unsafe { lra_set_reduction(t, Some(reduce_cb), ctl.user()) };
        let st = unsafe { lra_load_state(t, bytes.as_ptr().cast(), bytes.len()) };
        self.log(format!("throwaway.lra_load_state(forged) = {st}"));
        self.status("lra_load_state", st, Some(t));
        self.ensure(st == LRA_OK || st == LRA_BAD_CHECKPOINT, || {
            format!("forged load: {st}")
        });
        if st == LRA_OK {
            let mut list = self.slots[i].tensors.list();
            let mut copies: Vec<Vec<u64>> = self.slots[i].tensors.params();
            for (t, c) in list.iter_mut().zip(copies.iter_mut()) {
                t.param = c.as_mut_ptr().cast();
            }
            for k in 0..6 {
                let (name, st) = unsafe {
                    match k {
                        0 | 3 => (
                            "lra_step",
                            lra_step(t, list.as_ptr(), list.len(), 1.0, 0.0, null_mut()),
                        ),
                        1 | 4 => ("lra_report_reeval", lra_report_reeval(t, 0.5, null_mut())),
                        2 => {
                            let mut c = lra_counters::default();
                            ("lra_get_counters", lra_get_counters(t, &mut c))
                        }
                        _ => {
                            let mut sz = 0usize;
                            ("lra_state_size", lra_state_size(t, &mut sz))
                        }
                    }
                };
                self.log(format!("throwaway.{name} = {st}"));
                self.status(name, st, Some(t));
                let lr = self.lr_of(t);
                let (lo, hi) = lr_bounds(&cfg);
                self.ensure(lr >= lo && lr <= hi, || format!("forged: η = {lr}"));
            }
            let _ = self.checkpoint_of(t);
        }
        unsafe { lra_destroy(t) };
        drop(ctl);
    }

    /// A fresh handle of the same configuration restores slot `i`'s
    /// checkpoint to the same bytes; with `step`, both then take the same
    /// step (and re-evaluation) to the same parameters and bytes.
    fn twin_check(&mut self, i: usize, step: bool) {
        let s = &self.slots[i];
        let cfg = s.cfg;
        let h = s.h;
        let ckpt = self.checkpoint_of(h);
        let (st, t) = self.create(&cfg);
        self.ensure(st == LRA_OK, || "twin lra_create".into());
        let mode = self.slots[i].mode();
        let ctl = ReduceCtl::new(
            match mode {
                Some(Mode::Double) => Mode::Double,
                _ => Mode::Identity,
            },
            0,
        );
        ctl.me.set(t);
        if mode.is_some() {
            let st = unsafe { lra_set_reduction(t, Some(reduce_cb), ctl.user()) };
            self.status("lra_set_reduction", st, Some(t));
        }
        let st = unsafe { lra_load_state(t, ckpt.as_ptr().cast(), ckpt.len()) };
        self.log(format!("twin of h{i}: lra_load_state = {st}"));
        self.status("lra_load_state", st, Some(t));
        self.ensure(st == LRA_OK, || {
            format!("a fresh twin refused the checkpoint: {}", thread_error())
        });
        self.ensure(self.checkpoint_of(t) == ckpt, || {
            "the twin saves other bytes".into()
        });
        let plain = matches!(
            mode,
            None | Some(Mode::Identity | Mode::Double | Mode::CallSibling)
        );
        if step && plain {
            let grads_finite = {
                let s = &mut self.slots[i];
                s.tensors.fill_grads(&mut self.rng)
            };
            let loss = self.rng.unit() * 3.0;
            let loss_after = self.rng.unit() * 3.0;
            let s = &mut self.slots[i];
            let mut copies = s.tensors.params();
            let list = s.tensors.list();
            let mut twin_list = list.clone();
            for (tt, c) in twin_list.iter_mut().zip(copies.iter_mut()) {
                tt.param = c.as_mut_ptr().cast();
            }
            let a = unsafe { lra_step(h, list.as_ptr(), list.len(), loss, 0.0, null_mut()) };
            let b = unsafe {
                lra_step(
                    t,
                    twin_list.as_ptr(),
                    twin_list.len(),
                    loss,
                    0.0,
                    null_mut(),
                )
            };
            self.log(format!("h{i} and twin: lra_step(loss {loss}) = {a}, {b}"));
            self.status("lra_step", a, Some(h));
            self.ensure(a == b, || format!("handle {a}, twin {b}"));
            let s = &self.slots[i];
            self.ensure(s.tensors.params() == copies, || {
                "the twin stepped to other parameters".into()
            });
            if a == LRA_OK {
                let ra = unsafe { lra_report_reeval(h, loss_after, null_mut()) };
                let rb = unsafe { lra_report_reeval(t, loss_after, null_mut()) };
                self.log(format!(
                    "h{i} and twin: lra_report_reeval({loss_after}) = {ra}, {rb}"
                ));
                self.ensure(ra == LRA_OK && rb == LRA_OK, || {
                    format!("reports {ra}, {rb}")
                });
                let (ca, cb) = (self.checkpoint_of(h), self.checkpoint_of(t));
                self.ensure(ca == cb, || "the twin's checkpoint diverged".into());
                let insane = self.effective_lr(i, loss, 0.0) > SANE_LR;
                // Bring the model along: the twin was the reference here.
                self.resync(i);
                if !grads_finite || insane {
                    self.slots[i].tensors.tainted = true;
                    self.slots[i].model.state_tainted = true;
                }
            }
        }
        unsafe { lra_destroy(t) };
        drop(ctl);
    }

    /// After a step the model did not drive: take η, counters, the
    /// schedule's pending answer and the last re-evaluation from the handle.
    fn resync(&mut self, i: usize) {
        let h = self.slots[i].h;
        let lr = self.lr_of(h);
        let c = self.counters_of(h);
        let mut info = MaybeUninit::<lra_reeval_info>::zeroed();
        let st = unsafe { lra_get_last_reeval(h, info.as_mut_ptr()) };
        self.ensure(st == LRA_OK, || "resync".into());
        let info = unsafe { info.assume_init() };
        let layout = self.slots[i].tensors.layout();
        let cfg = self.slots[i].cfg;
        let m = &mut self.slots[i].model;
        let index = m.steps;
        let _ = m.due(&cfg, index);
        m.layout.get_or_insert(layout);
        m.lr = lr;
        m.steps = c.steps;
        m.applied = c.applied;
        m.decisions = [c.kept, c.raised, c.lowered, c.reeval_skipped];
        m.pending = None;
        m.last = Some(support::info_bits(&info));
    }

    // ---- everything else ----------------------------------------------------

    fn misc(&mut self, i: usize) {
        let which = self.rng.below(6);
        let status = self.rng.next() as u32 % 20;
        unsafe {
            match which {
                0 => lra_destroy(null_mut()),
                1 => {
                    let s = CStr::from_ptr(lra_status_string(status)).to_string_lossy();
                    self.ensure(!s.is_empty(), || {
                        format!("status string of {status} is empty")
                    });
                    let known = status <= LRA_OUT_OF_MEMORY;
                    self.ensure(known != (s == "unknown status"), || {
                        format!("status {status}: '{s}'")
                    });
                }
                2 => {
                    let v = lra_version();
                    self.ensure(v != 0, || "lra_version is 0".into());
                }
                3 => {
                    lra_config_init(null_mut(), 0);
                    let mut words = [0u64; 40];
                    let p = words
                        .as_mut_ptr()
                        .cast::<u8>()
                        .wrapping_add(4)
                        .cast::<lra_config>();
                    lra_config_init(p, 0);
                    self.ensure(words.iter().all(|&w| w == 0), || {
                        "lra_config_init wrote through a misaligned pointer".into()
                    });
                }
                4 => {
                    let e = CStr::from_ptr(lra_last_error(null()))
                        .to_string_lossy()
                        .into_owned();
                    self.ensure(e == thread_error(), || "lra_last_error(NULL)".into());
                }
                _ => {
                    // lra_create's own argument checks.
                    let cfg = self.slots[i].cfg;
                    let st = lra_create(&cfg, null_mut());
                    self.status("lra_create", st, None);
                    self.ensure(st == LRA_NULL_POINTER, || format!("out NULL: {st}"));
                    let mut h = 0x10 as *mut lra_handle;
                    let st = lra_create(null(), &mut h);
                    self.status("lra_create", st, None);
                    self.ensure(st == LRA_NULL_POINTER && h.is_null(), || {
                        format!("cfg NULL: {st}")
                    });
                }
            }
        }
        self.log(format!("misc {which} ({status})"));
    }
}

/// Runs `iters` iterations from `seed`; adds what they covered to `seen`.
fn fuzz(seed: u64, iters: u64, seen: &mut BTreeMap<(String, lra_status), u64>) {
    for i in 0..iters {
        for (k, n) in Fuzz::run(iteration_seed(seed, i)) {
            *seen.entry(k).or_default() += n;
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The CI seeds (bounded to a few seconds in release on 2 cores), or
/// `LRA_FUZZ_SEED` / `LRA_FUZZ_ITERS` for a longer local run.
#[test]
fn the_c_abi_survives_random_call_sequences() {
    let (seeds, iters): (Vec<u64>, u64) = match env_u64("LRA_FUZZ_SEED") {
        Some(s) => (vec![s], env_u64("LRA_FUZZ_ITERS").unwrap_or(1000)),
        None => (
            vec![1, 2, 3, 0x5eed, 0xdead_beef],
            env_u64("LRA_FUZZ_ITERS").unwrap_or(150),
        ),
    };
    let start = std::time::Instant::now();
    let mut seen = BTreeMap::new();
    for &seed in &seeds {
        fuzz(seed, iters, &mut seen);
    }
    let calls: u64 = seen.values().sum();
    println!(
        "ffi fuzz: seeds {seeds:?}, {iters} iterations each, {calls} checked calls in {:.2?}",
        start.elapsed()
    );
    let mut by_name: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((name, st), n) in &seen {
        by_name.entry(name).or_default().push(format!("{st}: {n}"));
    }
    for (name, counts) in by_name {
        println!("  {name:<22} status: count  {}", counts.join(", "));
    }
    // The CI seeds reach every function, with failures as well as successes.
    if std::env::var_os("LRA_FUZZ_SEED").is_some() {
        return;
    }
    for name in [
        "lra_step",
        "lra_step_ex",
        "lra_report_reeval",
        "lra_load_state",
        "lra_save_state",
        "lra_set_lr",
        "lra_set_reduction",
        "lra_create",
    ] {
        let ok = seen.get(&(name.to_string(), LRA_OK)).copied().unwrap_or(0);
        let failed: u64 = seen
            .iter()
            .filter(|((n, st), _)| n == name && *st != LRA_OK)
            .map(|(_, c)| c)
            .sum();
        assert!(ok > 0 && failed > 0, "{name}: {ok} OK, {failed} failed");
    }
}

/// Known lower bound f* and a tiny gradient: s = 2(f − f*)/φ is finite but
/// s·η exceeds f32's range. Converted to f32 unclamped it was inf, and the
/// parameters became ±inf (NaN where the gradient is 0) though the true
/// step 2(f − f*)·g/‖g‖² is finite; s·η now saturates at f32::MAX.
#[test]
fn a_polyak_scale_times_lr_beyond_f32_does_not_make_parameters_infinite() {
    let mut cfg = config_init(LRA_OPTIMIZER_SGD);
    cfg.lr = 0.5;
    cfg.f_star = 0.0;
    cfg.num_threads = 1;
    let mut h = null_mut();
    assert_eq!(unsafe { lra_create(&cfg, &mut h) }, LRA_OK);
    let mut p = [1.0f32, 1.0, 1.0, 1.0];
    let g = [1e-20f32, 1e-20, 0.0, 0.0];
    let t = [lra_tensor {
        param: p.as_mut_ptr().cast(),
        grad: g.as_ptr().cast(),
        numel: 4,
        dtype: LRA_DTYPE_F32,
        reserved: 0,
    }];
    let st = unsafe { lra_step(h, t.as_ptr(), 1, 1.0, 0.0, null_mut()) };
    assert_eq!(st, LRA_OK);
    let mut phi = 0.0;
    assert_eq!(unsafe { lra_get_last_phi(h, &mut phi) }, LRA_OK);
    unsafe { lra_destroy(h) };
    println!("φ = {phi:e}, s = {:e}, parameters {p:?}", 2.0 / phi);
    assert!(p.iter().all(|x| x.is_finite()), "parameters {p:?}");
}

/// A sharded handle without a registered reduction refuses lra_step
/// (LRA_CALL_ORDER: η would drift apart across ranks, and the ranks that
/// did register would wait in a collective this one never joins). A step
/// restored from a checkpoint must be refused at lra_report_reeval for the
/// same reason; it used to be decided from this rank's φ alone.
#[test]
fn a_restored_pending_step_is_not_reported_without_the_reduction() {
    unsafe extern "C" fn identity(_v: *mut f64, _n: usize, _u: *mut c_void) -> i32 {
        0
    }
    let mut cfg = config_init(LRA_OPTIMIZER_SGD);
    cfg.lr = 0.1;
    cfg.num_threads = 1;
    cfg.sharding = LRA_SHARDING_SHARDED;
    let (mut a, mut b) = (null_mut(), null_mut());
    unsafe {
        assert_eq!(lra_create(&cfg, &mut a), LRA_OK);
        assert_eq!(lra_create(&cfg, &mut b), LRA_OK);
        assert_eq!(lra_set_reduction(a, Some(identity), null_mut()), LRA_OK);
    }
    let mut p = [1.0f32; 4];
    let g = [0.5f32; 4];
    let t = [lra_tensor {
        param: p.as_mut_ptr().cast(),
        grad: g.as_ptr().cast(),
        numel: 4,
        dtype: LRA_DTYPE_F32,
        reserved: 0,
    }];
    let st = unsafe { lra_step(a, t.as_ptr(), 1, 1.0, 0.0, null_mut()) };
    assert_eq!(st, LRA_OK);
    let mut size = 0;
    assert_eq!(unsafe { lra_state_size(a, &mut size) }, LRA_OK);
    let mut ckpt = vec![0u8; size];
    let st = unsafe { lra_save_state(a, ckpt.as_mut_ptr().cast(), size, null_mut()) };
    assert_eq!(st, LRA_OK);
    // b: no reduction registered; its own steps are refused...
    let st = unsafe { lra_step(b, t.as_ptr(), 1, 1.0, 0.0, null_mut()) };
    assert_eq!(st, LRA_CALL_ORDER);
    // ... and so must be the report of the step it restored.
    assert_eq!(
        unsafe { lra_load_state(b, ckpt.as_ptr().cast(), size) },
        LRA_OK
    );
    let st = unsafe { lra_report_reeval(b, 0.0, null_mut()) };
    let why = handle_error(b);
    unsafe {
        lra_destroy(a);
        lra_destroy(b);
    }
    assert_eq!(st, LRA_CALL_ORDER, "{why}");
}

/// A checksum-valid checkpoint whose step counter is u64::MAX (the applied
/// count no larger) used to load, and the next step's `steps += 1`
/// overflowed: a caught panic (LRA_PANIC, handle poisoned) in debug
/// builds, a silent wrap to 0 in release builds. Loading must refuse
/// counters no real run has.
#[test]
fn a_checkpoint_with_counters_at_the_u64_limit_is_refused() {
    let mut cfg = config_init(LRA_OPTIMIZER_SGD);
    cfg.lr = 0.1;
    cfg.num_threads = 1;
    let (mut a, mut b) = (null_mut(), null_mut());
    unsafe {
        assert_eq!(lra_create(&cfg, &mut a), LRA_OK);
        assert_eq!(lra_create(&cfg, &mut b), LRA_OK);
    }
    let mut p = [1.0f32; 4];
    let g = [0.5f32; 4];
    let t = [lra_tensor {
        param: p.as_mut_ptr().cast(),
        grad: g.as_ptr().cast(),
        numel: 4,
        dtype: LRA_DTYPE_F32,
        reserved: 0,
    }];
    assert_eq!(
        unsafe { lra_step(a, t.as_ptr(), 1, 1.0, 0.0, null_mut()) },
        LRA_OK
    );
    let mut size = 0;
    assert_eq!(unsafe { lra_state_size(a, &mut size) }, LRA_OK);
    let mut ckpt = vec![0u8; size];
    let st = unsafe { lra_save_state(a, ckpt.as_mut_ptr().cast(), size, null_mut()) };
    assert_eq!(st, LRA_OK);
    // The step counter is the first u64 after the layout. u64::MAX − 1
    // overflowed after two more steps (found by a debug-build fuzz run).
    let at = after_layout(&ckpt).unwrap();
    assert_eq!(ckpt[at..at + 8], 1u64.to_le_bytes());
    let mut outcomes = Vec::new();
    for forged in [u64::MAX, u64::MAX - 1, 1 << 63] {
        ckpt[at..at + 8].copy_from_slice(&forged.to_le_bytes());
        support::reseal(&mut ckpt);
        let loaded = unsafe { lra_load_state(b, ckpt.as_ptr().cast(), size) };
        let stepped: Vec<lra_status> = (0..2)
            .map(|_| unsafe { lra_step(b, t.as_ptr(), 1, 1.0, 0.0, null_mut()) })
            .collect();
        outcomes.push((forged, loaded, stepped));
    }
    unsafe {
        lra_destroy(a);
        lra_destroy(b);
    }
    for (forged, loaded, stepped) in outcomes {
        assert_eq!(
            loaded, LRA_BAD_CHECKPOINT,
            "steps = {forged} loaded ({loaded}), then steps {stepped:?}"
        );
    }
}

/// A sharded first step whose reduction fails sizes the optimizer state for
/// its tensors and fixes nothing; the next first step, with other sizes and
/// a NaN loss, fixes the layout without touching the backend. The state is
/// then sized for the failed step, and saving the checkpoint hit the size
/// accounting assertion: LRA_PANIC, handle poisoned (fixed: the state
/// saved is zero, sized for the layout).
#[test]
fn a_checkpoint_after_a_failed_then_skipped_first_step_saves() {
    unsafe extern "C" fn fail_first(_v: *mut f64, _n: usize, user: *mut c_void) -> i32 {
        let calls = &*(user as *const Cell<u32>);
        calls.set(calls.get() + 1);
        (calls.get() == 1) as i32
    }
    let mut cfg = config_init(LRA_OPTIMIZER_ADAM);
    cfg.lr = 0.01;
    cfg.num_threads = 1;
    cfg.sharding = LRA_SHARDING_SHARDED;
    let calls = Cell::new(0u32);
    let mut h = null_mut();
    unsafe {
        assert_eq!(lra_create(&cfg, &mut h), LRA_OK);
        let user = (&calls as *const Cell<u32>).cast_mut().cast();
        assert_eq!(lra_set_reduction(h, Some(fail_first), user), LRA_OK);
    }
    let step = |n: usize, loss: f64| {
        let mut p = vec![1.0f32; n];
        let g = vec![0.5f32; n];
        let t = [lra_tensor {
            param: p.as_mut_ptr().cast(),
            grad: g.as_ptr().cast(),
            numel: n as u64,
            dtype: LRA_DTYPE_F32,
            reserved: 0,
        }];
        unsafe { lra_step(h, t.as_ptr(), 1, loss, 0.0, null_mut()) }
    };
    assert_eq!(step(16, 1.0), LRA_REDUCTION_FAILED);
    assert_eq!(step(40, f64::NAN), LRA_OK);
    let mut size = 0;
    assert_eq!(unsafe { lra_state_size(h, &mut size) }, LRA_OK);
    let mut ckpt = vec![0u8; size];
    let st = unsafe { lra_save_state(h, ckpt.as_mut_ptr().cast(), size, null_mut()) };
    let why = handle_error(h);
    unsafe { lra_destroy(h) };
    assert_eq!(st, LRA_OK, "{why}");
}
