//! Adversarial use of the C ABI, called exactly as a C caller would: every
//! misuse gets a status and a message, and leaves the handle as it was
//! (checkpoint bytes, parameters, a pending step). Each test here covers a
//! case that was wrong once, or whose "nothing changed" half no other test
//! checks; the plain argument checks live in tests/c/abi_test.c.

use lra::ffi::*;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ptr::null_mut;

mod support;
use support::{thread_error, Handle};

fn config(optimizer: lra_optimizer, lr: f64) -> lra_config {
    let mut c = MaybeUninit::<lra_config>::uninit();
    unsafe {
        lra_config_init(c.as_mut_ptr(), optimizer);
        let mut c = c.assume_init();
        c.lr = lr;
        c.num_threads = 1;
        c
    }
}

impl Handle {
    /// Asserts `status` is `want` and the handle's message contains `words`.
    fn expect(&self, status: lra_status, want: lra_status, words: &str) {
        let msg = self.error();
        assert_eq!(status, want, "status {status}, message '{msg}'");
        assert!(msg.contains(words), "message '{msg}' lacks '{words}'");
    }

    fn step(&self, t: &[lra_tensor], loss: f64) -> lra_status {
        unsafe { lra_step(self.0, t.as_ptr(), t.len(), loss, 0.0, null_mut()) }
    }

    fn report(&self, loss_after: f64) -> lra_reeval_info {
        let mut info = MaybeUninit::<lra_reeval_info>::uninit();
        let st = unsafe { lra_report_reeval(self.0, loss_after, info.as_mut_ptr()) };
        assert_eq!(st, LRA_OK, "lra_report_reeval: {}", self.error());
        unsafe { info.assume_init() }
    }

    fn should_reeval(&self) -> bool {
        let mut due = 9;
        assert_eq!(unsafe { lra_should_reeval(self.0, &mut due) }, LRA_OK);
        due == 1
    }
}

fn f32_tensor(param: &mut [f32], grad: &[f32]) -> lra_tensor {
    assert_eq!(param.len(), grad.len());
    lra_tensor {
        param: param.as_mut_ptr().cast(),
        grad: grad.as_ptr().cast(),
        numel: param.len() as u64,
        dtype: LRA_DTYPE_F32,
        reserved: 0,
    }
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * (1.0 + i as f32 / n as f32))
        .collect()
}

/// `ckpt` with the bytes at `at`, which must be `was`, replaced by `now`,
/// under a valid checksum.
fn forge(ckpt: &[u8], at: usize, was: &[u8], now: &[u8]) -> Vec<u8> {
    let mut forged = ckpt.to_vec();
    assert_eq!(&forged[at..at + was.len()], was, "the field is elsewhere");
    forged[at..at + now.len()].copy_from_slice(now);
    support::reseal(&mut forged);
    forged
}

/// A fresh SGD handle refuses `forged` (the message has `words`) and keeps
/// its checkpoint; returned for more loads.
fn refused_by_a_fresh_sgd_handle(forged: &[u8], words: &str) -> Handle {
    let fresh = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    let before = fresh.checkpoint();
    fresh.expect(fresh.load(forged), LRA_BAD_CHECKPOINT, words);
    assert_eq!(fresh.checkpoint(), before);
    fresh
}

/// A mid-training Adam handle with a step awaiting re-evaluation: every bad
/// call leaves checkpoint bytes and parameters as they were, and the
/// pending step is then re-evaluated exactly as if nothing had happened.
#[test]
fn bad_calls_on_a_pending_step_change_nothing() {
    let mut p = ramp(64, 0.5);
    let g = ramp(64, 0.25);
    let mut q = ramp(8, -1.0);
    let gq = ramp(8, 0.75);
    let twin_start = (p.clone(), q.clone());
    let run = |p: &mut Vec<f32>, q: &mut Vec<f32>, bad_calls: bool| -> (Vec<u8>, f64) {
        let h = Handle::create(&config(LRA_OPTIMIZER_ADAM, 1e-2));
        let t = [f32_tensor(p, &g), f32_tensor(q, &gq)];
        assert_eq!(h.step(&t, 2.0), LRA_OK);
        h.report(1.0);
        assert_eq!(h.step(&t, 1.5), LRA_OK);
        if bad_calls {
            let before = h.checkpoint();
            let params = (t[0].param as *const f32, t[1].param as *const f32);
            let snapshot = unsafe {
                (
                    std::slice::from_raw_parts(params.0, 64).to_vec(),
                    std::slice::from_raw_parts(params.1, 8).to_vec(),
                )
            };
            let mut bad = t;
            bad[1].dtype = 7;
            h.expect(h.step(&bad, 1.0), LRA_INVALID_ARGUMENT, "dtype");
            let mut bad = t;
            bad[1].reserved = 1;
            h.expect(
                h.step(&bad, 1.0),
                LRA_INVALID_ARGUMENT,
                "tensors[1].reserved",
            );
            let mut bad = t;
            bad[1].numel = 7;
            h.expect(h.step(&bad, 1.0), LRA_SIZE_MISMATCH, "tensors[1]");
            let mut bad = t;
            bad[1].param = bad[0].param;
            h.expect(h.step(&bad, 1.0), LRA_INVALID_ARGUMENT, "overlaps");
            let mut bad = t;
            bad[0].grad = unsafe { bad[0].grad.cast::<u8>().add(2).cast() };
            h.expect(h.step(&bad, 1.0), LRA_INVALID_ARGUMENT, "aligned");
            h.expect(h.step(&t[..1], 1.0), LRA_SIZE_MISMATCH, "first step");
            let st = unsafe { lra_step(h.0, t.as_ptr(), 2, 1.0, f64::NAN, null_mut()) };
            h.expect(st, LRA_INVALID_ARGUMENT, "obs_var");
            // Words, so that one byte in is misaligned wherever the array
            // lands (a byte array may start at any address).
            let words = [0u32; 2];
            let flag = unsafe { words.as_ptr().cast::<u8>().add(1) }.cast::<f32>();
            let st = unsafe { lra_step_ex(h.0, t.as_ptr(), 2, 1.0, 0.0, flag, null_mut()) };
            h.expect(st, LRA_INVALID_ARGUMENT, "found_inf");
            h.expect(
                unsafe { lra_set_lr(h.0, f64::NAN) },
                LRA_INVALID_ARGUMENT,
                "lr",
            );
            h.expect(
                h.load(&before[..before.len() - 1]),
                LRA_BAD_CHECKPOINT,
                "checksum",
            );
            let mut flipped = before.clone();
            flipped[100] ^= 0x10;
            h.expect(h.load(&flipped), LRA_BAD_CHECKPOINT, "checksum");
            let mut small = vec![0u8; before.len() - 1];
            let st =
                unsafe { lra_save_state(h.0, small.as_mut_ptr().cast(), small.len(), null_mut()) };
            h.expect(st, LRA_BUFFER_TOO_SMALL, "needs");
            assert_eq!(h.checkpoint(), before, "a failed call changed the handle");
            let now = unsafe {
                (
                    std::slice::from_raw_parts(params.0, 64).to_vec(),
                    std::slice::from_raw_parts(params.1, 8).to_vec(),
                )
            };
            assert_eq!(now, snapshot, "a failed call wrote parameters");
        }
        let info = h.report(1.2);
        (h.checkpoint(), info.lr)
    };
    let (mut p2, mut q2) = twin_start;
    let clean = run(&mut p2, &mut q2, false);
    let poked = run(&mut p, &mut q, true);
    assert_eq!(poked, clean);
    assert_eq!((p, q), (p2, q2));
}

/// `lra_tensor.reserved` (the struct's last 4 bytes, padding before it was
/// a field) must be 0, so that a later version can give it a meaning: any
/// other value is refused, naming the field, before anything is read or
/// written, on every tensor, an empty one included, and on a first step
/// it fixes no layout.
#[test]
fn a_non_zero_reserved_field_is_refused() {
    assert_eq!(std::mem::size_of::<lra_tensor>(), 32);
    assert_eq!(std::mem::offset_of!(lra_tensor, reserved), 28);
    let h = Handle::create(&config(LRA_OPTIMIZER_ADAM, 1e-2));
    let before = h.checkpoint();
    let (mut p, g) = (ramp(16, 0.5), ramp(16, 0.25));
    let (mut q, gq) = (ramp(4, -1.0), ramp(4, 0.75));
    let start = (p.clone(), q.clone());
    let empty = lra_tensor {
        param: null_mut(),
        grad: std::ptr::null(),
        numel: 0,
        dtype: LRA_DTYPE_F32,
        reserved: 0,
    };
    let t = [f32_tensor(&mut p, &g), empty, f32_tensor(&mut q, &gq)];
    for (i, value) in [(0, 1), (1, 0x8000_0000), (2, u32::MAX)] {
        let mut bad = t;
        bad[i].reserved = value;
        let st =
            unsafe { lra_step_ex(h.0, bad.as_ptr(), 3, 1.0, 0.0, std::ptr::null(), null_mut()) };
        h.expect(st, LRA_INVALID_ARGUMENT, &format!("tensors[{i}].reserved"));
        assert_eq!(h.checkpoint(), before, "tensors[{i}]: the handle changed");
        assert_eq!(h.counters().steps, 0);
    }
    assert_eq!(
        (&p, &q),
        (&start.0, &start.1),
        "a refused step wrote parameters"
    );
    // No layout was fixed: a first step with another tensor list works.
    assert_eq!(h.step(&t[..1], 1.0), LRA_OK, "{}", h.error());
}

/// Sharded handle whose reduction fails on the first step: the step fails
/// after the backend sized its state for that layout. The next first step,
/// with the same tensor count but other sizes, must start from scratch.
/// (Used to write past the end of the state sized for the failed step: the
/// heap corruption aborted the test process.)
#[test]
fn a_failed_first_step_leaves_no_state_behind() {
    unsafe extern "C" fn fail_first(_v: *mut f64, _n: usize, user: *mut c_void) -> i32 {
        let calls = &mut *(user as *mut u32);
        *calls += 1;
        (*calls == 1) as i32
    }
    let mut cfg = config(LRA_OPTIMIZER_ADAM, 1e-2);
    cfg.sharding = LRA_SHARDING_SHARDED;
    let mut calls = 0u32;
    let h = Handle::create(&cfg);
    let st = unsafe { lra_set_reduction(h.0, Some(fail_first), (&mut calls as *mut u32).cast()) };
    assert_eq!(st, LRA_OK);
    let mut small = vec![1.0f32; 16];
    let gs = vec![0.5f32; 16];
    h.expect(
        h.step(&[f32_tensor(&mut small, &gs)], 1.0),
        LRA_REDUCTION_FAILED,
        "reduction",
    );
    assert_eq!(small, vec![1.0f32; 16]);

    let mut calls_ref = 1u32; // never fails
    let reference = Handle::create(&cfg);
    let st = unsafe {
        lra_set_reduction(
            reference.0,
            Some(fail_first),
            (&mut calls_ref as *mut u32).cast(),
        )
    };
    assert_eq!(st, LRA_OK);
    let (mut a, mut b) = (ramp(40, 1.0), ramp(40, 1.0));
    let g = ramp(40, 0.5);
    assert_eq!(h.step(&[f32_tensor(&mut a, &g)], 1.0), LRA_OK);
    assert_eq!(reference.step(&[f32_tensor(&mut b, &g)], 1.0), LRA_OK);
    assert_eq!(a, b);
    assert_eq!(h.checkpoint(), reference.checkpoint());
}

/// `len` beyond `isize::MAX` cannot describe a buffer; it is refused before
/// anything reads or writes through `buf`.
#[test]
fn impossible_buffer_lengths_are_refused() {
    let h = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    let before = h.checkpoint();
    let mut buf = before.clone();
    let huge = isize::MAX as usize + 1;
    let st = unsafe { lra_load_state(h.0, buf.as_ptr().cast(), huge) };
    h.expect(st, LRA_INVALID_ARGUMENT, "len");
    let mut written = 7usize;
    let st = unsafe { lra_save_state(h.0, buf.as_mut_ptr().cast(), huge, &mut written) };
    h.expect(st, LRA_INVALID_ARGUMENT, "len");
    assert_eq!(written, 7);
    assert_eq!(buf, before);
    assert_eq!(h.checkpoint(), before);
}

/// Out-parameters that point into the caller's own input are refused
/// untouched: `out` inside the config of `lra_create`, `written` inside the
/// checkpoint buffer.
#[test]
fn out_parameters_aliasing_inputs_are_refused() {
    let cfg = config(LRA_OPTIMIZER_ADAM, 1e-3);
    let copy = cfg;
    let inside = std::ptr::addr_of!(cfg.lr) as *mut *mut lra_handle;
    let st = unsafe { lra_create(&cfg, inside) };
    assert_eq!(st, LRA_INVALID_ARGUMENT, "{}", thread_error());
    assert!(thread_error().contains("out"), "{}", thread_error());
    assert_eq!(
        format!("{cfg:?}"),
        format!("{copy:?}"),
        "the config was written"
    );

    let h = Handle::create(&cfg);
    let ckpt = h.checkpoint();
    let mut buf = vec![0u8; ckpt.len() + 8];
    let written = buf.as_mut_ptr().cast::<usize>();
    let st = unsafe { lra_save_state(h.0, buf.as_mut_ptr().cast(), buf.len(), written) };
    h.expect(st, LRA_INVALID_ARGUMENT, "written");
    assert!(buf.iter().all(|&b| b == 0));

    // `written` right before or right after the buffer shares no byte with
    // it (say struct { size_t written; char buf[N]; }): accepted. One byte
    // into it is refused. A buffer of 0 bytes overlaps nothing: it is only
    // too small (and `written` is left alone, as on every failure).
    let k = ckpt.len().div_ceil(8);
    for (buf_at, len, written_word, want) in [
        (8, ckpt.len(), 0, LRA_OK),
        (0, 8 * k, k, LRA_OK),
        (7, ckpt.len(), 0, LRA_INVALID_ARGUMENT),
        (0, 8 * k + 1, k, LRA_INVALID_ARGUMENT),
        (4, 0, 0, LRA_BUFFER_TOO_SMALL),
    ] {
        let mut words = vec![0usize; k + 2];
        let base = words.as_mut_ptr().cast::<u8>();
        // SAFETY: both ranges lie inside `words`.
        let st = unsafe {
            lra_save_state(
                h.0,
                base.add(buf_at).cast(),
                len,
                base.add(8 * written_word).cast(),
            )
        };
        let what = format!("buf at byte {buf_at}, {len} bytes, written at word {written_word}");
        assert_eq!(st, want, "{what}: {}", h.error());
        if want != LRA_OK {
            let cause = if want == LRA_INVALID_ARGUMENT {
                "written"
            } else {
                "too small"
            };
            assert!(h.error().contains(cause), "{what}: {}", h.error());
            assert!(
                words.iter().all(|&w| w == 0),
                "{what}: something was written"
            );
        } else {
            assert_eq!(words[written_word], ckpt.len(), "{what}");
            // SAFETY: inside `words`, which is still alive.
            let saved = unsafe { std::slice::from_raw_parts(base.add(buf_at), ckpt.len()) };
            assert_eq!(saved, &ckpt[..], "{what}");
        }
    }
}

/// A tensor whose byte range would wrap around the address space cannot be
/// real memory; it is refused before any pointer arithmetic on it.
#[test]
fn a_tensor_wrapping_the_address_space_is_refused() {
    let h = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    let g = [0.0f32; 4];
    let t = [lra_tensor {
        param: (usize::MAX - 63) as *mut c_void,
        grad: g.as_ptr().cast(),
        numel: 1 << 20,
        dtype: LRA_DTYPE_F32,
        reserved: 0,
    }];
    h.expect(h.step(&t, 1.0), LRA_INVALID_ARGUMENT, "address");
    assert_eq!(h.counters().steps, 0);
    // The descriptor array itself: its 32 bytes would wrap (this crashed
    // in lra before the array's own extent was checked).
    let wrapping = (usize::MAX - 7) as *const lra_tensor;
    let st = unsafe { lra_step(h.0, wrapping, 1, 1.0, 0.0, null_mut()) };
    h.expect(st, LRA_INVALID_ARGUMENT, "tensors, count");
    assert_eq!(h.counters().steps, 0);
}

/// A count far beyond any list (a wrong size argument) is an error that
/// names it, not an abort of the caller's process when lra copies the
/// list.
#[test]
#[cfg_attr(
    miri,
    ignore = "Miri stops at an allocation it cannot make instead of failing it"
)]
fn a_count_no_list_can_hold_is_refused() {
    let h = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    let (mut p, g) = (vec![1.0f32; 8], vec![0.5f32; 8]);
    let t = [f32_tensor(&mut p, &g)];
    let st = unsafe { lra_step(h.0, t.as_ptr(), 1 << 50, 1.0, 0.0, null_mut()) };
    h.expect(st, LRA_INVALID_ARGUMENT, "count = 1125899906842624");
    assert_eq!(h.counters().steps, 0);
    assert_eq!(p, [1.0; 8]);
}

/// An empty tensor's pointers are never dereferenced: NULL and misaligned
/// ones are accepted alike.
#[test]
fn an_empty_tensor_takes_any_pointers() {
    let (mut p, g) = (vec![1.0f32; 8], vec![0.5f32; 8]);
    for (param, grad) in [(0usize, 0usize), (0x1001, 0x2003)] {
        let h = Handle::create(&config(LRA_OPTIMIZER_ADAM, 0.1));
        let empty = lra_tensor {
            param: param as *mut c_void,
            grad: grad as *const c_void,
            numel: 0,
            dtype: LRA_DTYPE_F32,
            reserved: 0,
        };
        let st = h.step(&[empty, f32_tensor(&mut p, &g)], 1.0);
        assert_eq!(st, LRA_OK, "{param:#x}, {grad:#x}: {}", h.error());
    }
}

/// A found_inf flag inside a parameter the step writes is refused: on CUDA
/// every block reads the flag on its own, so such a step could be applied
/// to some elements and skipped for the others. (A flag inside a gradient
/// is fine: gradients are only read.)
#[test]
fn a_found_inf_flag_inside_a_parameter_is_refused() {
    let h = Handle::create(&config(LRA_OPTIMIZER_ADAM, 1e-2));
    let mut p = ramp(8, 1.0);
    let g = ramp(8, 0.5);
    let t = [f32_tensor(&mut p, &g)];
    assert_eq!(h.step(&t, 1.0), LRA_OK);
    let (params, before) = (p.clone(), h.checkpoint());
    let inside = unsafe { (t[0].param as *const f32).add(7) };
    let st = unsafe { lra_step_ex(h.0, t.as_ptr(), 1, 1.0, 0.0, inside, null_mut()) };
    h.expect(
        st,
        LRA_INVALID_ARGUMENT,
        "shares memory with tensors[0].param",
    );
    assert_eq!(h.checkpoint(), before);
    assert_eq!(p, params);
    // An f16 parameter (2-byte aligned) may begin in the flag's upper half.
    let mut words = [0u32; 4];
    let base = words.as_mut_ptr();
    let flag = base as *const f32;
    let half_param = unsafe { (base as *mut u16).add(1) };
    let g16 = [0x3c00u16; 6]; // 1.0
    let h16 = Handle::create(&config(LRA_OPTIMIZER_ADAM, 1e-2));
    let t16 = [lra_tensor {
        param: half_param.cast(),
        grad: g16.as_ptr().cast(),
        numel: 6,
        dtype: LRA_DTYPE_F16,
        reserved: 0,
    }];
    let st = unsafe { lra_step_ex(h16.0, t16.as_ptr(), 1, 1.0, 0.0, flag, null_mut()) };
    h16.expect(
        st,
        LRA_INVALID_ARGUMENT,
        "shares memory with tensors[0].param",
    );
    assert_eq!(words, [0; 4], "the refused step wrote");
    let in_grad = unsafe { (t[0].grad as *const f32).add(7) };
    let st = unsafe { lra_step_ex(h.0, t.as_ptr(), 1, 1.0, 0.0, in_grad, null_mut()) };
    assert_eq!(st, LRA_OK, "{}", h.error());
}

/// `lra_config_init` returns nothing: on a misaligned (or NULL) `cfg` it
/// writes nothing and leaves the reason in the thread's message.
#[test]
fn config_init_on_a_misaligned_pointer_writes_nothing_and_says_why() {
    let mut raw = [0x55u8; std::mem::size_of::<lra_config>() + 8];
    // (Address arithmetic: `align_offset` may give up under Miri.)
    let at = (8 - raw.as_ptr() as usize % 8) % 8 + 4;
    unsafe { lra_config_init(raw.as_mut_ptr().add(at).cast(), LRA_OPTIMIZER_SGD) };
    assert!(raw.iter().all(|&b| b == 0x55), "bytes were written");
    assert!(
        thread_error().contains("lra_config_init") && thread_error().contains("aligned"),
        "{}",
        thread_error()
    );
    unsafe { lra_config_init(null_mut(), LRA_OPTIMIZER_SGD) };
    assert!(thread_error().contains("cfg is NULL"), "{}", thread_error());
}

/// A checkpoint whose pending step was already re-evaluated (more reports
/// than steps once it is reported again) is refused: loaded, it would lead
/// to counters that its own next checkpoint could not reload.
#[test]
fn a_forged_pending_step_that_was_already_reported_is_refused() {
    // SGD over the empty tensor list: no state, so the pending-step word
    // sits at a fixed offset (header 64, count 8, counters 56, η 8,
    // schedule 16, last report 4 + 40 + 4).
    const PENDING: usize = 200;
    let h = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    assert_eq!(h.step(&[], 1.0), LRA_OK);
    let pending = h.checkpoint();
    assert_eq!(pending[PENDING..PENDING + 4], 15u32.to_le_bytes());
    h.report(0.5);
    let ckpt = h.checkpoint();
    let forged = forge(&ckpt, PENDING, &0u32.to_le_bytes(), &15u32.to_le_bytes());
    let fresh = refused_by_a_fresh_sgd_handle(&forged, "inconsistent");
    assert_eq!(fresh.load(&pending), LRA_OK, "{}", fresh.error());
}

/// What the reduction callback tried, and what lra answered.
struct Reentry {
    h: *mut lra_handle,
    set_lr: lra_status,
    get_lr: lra_status,
}

/// A reduction callback that calls back into its own handle gets
/// `LRA_CALL_ORDER` (the handle is in the middle of a call), and
/// `lra_destroy` from there is refused: the outer call still runs on it.
#[test]
fn calls_from_inside_the_reduction_callback_are_refused() {
    unsafe extern "C" fn reenter(_v: *mut f64, _n: usize, user: *mut c_void) -> i32 {
        let r = &mut *(user as *mut Reentry);
        r.set_lr = lra_set_lr(r.h, 0.5);
        let mut lr = 0.0;
        r.get_lr = lra_get_lr(r.h, &mut lr);
        lra_destroy(r.h);
        0
    }
    let mut cfg = config(LRA_OPTIMIZER_SGD, 0.1);
    cfg.loss_is_rank_local = 1;
    let h = Handle::create(&cfg);
    let mut r = Reentry {
        h: h.0,
        set_lr: LRA_OK,
        get_lr: LRA_OK,
    };
    let st = unsafe { lra_set_reduction(h.0, Some(reenter), (&mut r as *mut Reentry).cast()) };
    assert_eq!(st, LRA_OK);
    let mut p = ramp(8, 1.0);
    let g = ramp(8, 1.0);
    assert_eq!(h.step(&[f32_tensor(&mut p, &g)], 1.0), LRA_OK);
    assert_eq!((r.set_lr, r.get_lr), (LRA_CALL_ORDER, LRA_CALL_ORDER));
    let why = thread_error();
    assert!(
        why.contains("lra_destroy") && why.contains("callback"),
        "{why}"
    );
    assert_eq!(h.lr(), 0.1, "the handle survived and η is unchanged");
    assert_eq!(h.counters().steps, 1);
}

/// A failing reduction during `lra_report_reeval` keeps the step pending:
/// nothing changed, and the retry decides as if the failure never happened.
#[test]
fn a_failed_reduction_in_report_keeps_the_step_pending() {
    unsafe extern "C" fn fail_when_armed(_v: *mut f64, _n: usize, user: *mut c_void) -> i32 {
        (*(user as *const std::cell::Cell<bool>)).get() as i32
    }
    let mut cfg = config(LRA_OPTIMIZER_MOMENTUM, 0.05);
    cfg.loss_is_rank_local = 1;
    let h = Handle::create(&cfg);
    let armed = std::cell::Cell::new(false);
    let st = unsafe {
        lra_set_reduction(
            h.0,
            Some(fail_when_armed),
            (&armed as *const std::cell::Cell<bool>).cast_mut().cast(),
        )
    };
    assert_eq!(st, LRA_OK);
    let mut p = ramp(32, 1.0);
    let g = ramp(32, 1.0);
    assert_eq!(h.step(&[f32_tensor(&mut p, &g)], 3.0), LRA_OK);
    let before = h.checkpoint();
    armed.set(true);
    let mut info = MaybeUninit::<lra_reeval_info>::uninit();
    let st = unsafe { lra_report_reeval(h.0, 0.0, info.as_mut_ptr()) };
    h.expect(st, LRA_REDUCTION_FAILED, "callback returned 1");
    assert_eq!(h.checkpoint(), before);
    armed.set(false);
    let info = h.report(0.0);
    assert_eq!(info.decision, LRA_DECISION_RAISED);
    assert_eq!(h.counters().reevals, 1);
}

/// The geometric schedule's next index saturates instead of wrapping: with
/// a huge growth factor only steps 0 and 1 are due. (Used to wrap around in
/// release builds, making every later step due, and to panic in debug.)
#[test]
fn a_huge_geometric_growth_does_not_wrap_the_schedule() {
    let mut cfg = config(LRA_OPTIMIZER_SGD, 0.1);
    cfg.reeval_schedule = LRA_REEVAL_GEOMETRIC;
    cfg.reeval_growth = 1e300;
    let h = Handle::create(&cfg);
    let mut p = ramp(4, 1.0);
    let g = ramp(4, 1.0);
    let t = [f32_tensor(&mut p, &g)];
    let due: Vec<bool> = (0..6)
        .map(|_| {
            assert_eq!(h.step(&t, 1.0), LRA_OK, "{}", h.error());
            h.should_reeval()
        })
        .collect();
    assert_eq!(due, [true, true, false, false, false, false]);
}

/// η is applied as an f32: an initial η, `lra_set_lr` value or restored η
/// outside f32's positive normal range (or outside the handle's own
/// [lr_min, lr_max]) is refused, not silently turned into inf or 0.
#[test]
fn an_lr_the_update_cannot_use_is_refused() {
    for lr in [1e300, 1e-300] {
        let mut h = null_mut();
        let st = unsafe { lra_create(&config(LRA_OPTIMIZER_SGD, lr), &mut h) };
        assert_eq!(st, LRA_INVALID_CONFIG, "lr = {lr}");
        assert!(h.is_null());
        assert!(thread_error().contains("lr = "), "{}", thread_error());
    }
    let h = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    for lr in [1e300, 1e-300] {
        h.expect(
            unsafe { lra_set_lr(h.0, lr) },
            LRA_INVALID_ARGUMENT,
            "lr = ",
        );
        assert_eq!(h.lr(), 0.1);
    }
    let ckpt = h.checkpoint();
    let mut bounded = config(LRA_OPTIMIZER_SGD, 0.01);
    bounded.lr_max = 0.05;
    let b = Handle::create(&bounded);
    let before = b.checkpoint();
    b.expect(b.load(&ckpt), LRA_BAD_CHECKPOINT, "lr_max");
    assert_eq!(b.checkpoint(), before);
}

/// The other hyper-parameters the update reads as f32 follow η's rule: a
/// value that f32 would turn into 0, inf or (for the decay rates) 1 is
/// refused at `lra_create`. Accepted, `eps = 1e-50` made every parameter
/// with a zero gradient NaN (0 / (0 + 0)), `weight_decay = 1e39` made
/// parameters ±inf and NaN, and `eps = 1e39` made every step a no-op.
#[test]
fn hyper_parameters_the_f32_update_cannot_use_are_refused() {
    type Set = fn(&mut lra_config, f64);
    let (tiny, below_one) = (f32::MIN_POSITIVE as f64, 1.0 - 2f64.powi(-24));
    // Per field: values refused, and the nearest ones f32 keeps (accepted).
    let fields: [(&str, Set, &[f64], &[f64]); 6] = [
        (
            "eps",
            |c, v| c.eps = v,
            &[1e-50, 1e-40, 1e39],
            &[tiny, 3e38],
        ),
        (
            "weight_decay",
            |c, v| c.weight_decay = v,
            &[1e-50, 1e39],
            &[0.0, tiny, 3e38],
        ),
        (
            "momentum",
            |c, v| c.momentum = v,
            &[1.0 - 1e-10, 1e-45],
            &[0.0, tiny, below_one],
        ),
        ("alpha", |c, v| c.alpha = v, &[1.0 - 1e-9], &[below_one]),
        ("beta1", |c, v| c.beta1 = v, &[1.0 - 1e-10], &[below_one]),
        (
            "beta2",
            |c, v| c.beta2 = v,
            &[1.0 - 2f64.powi(-25)],
            &[below_one],
        ),
    ];
    for (name, set, refused, kept) in fields {
        for &v in refused {
            let mut c = config(LRA_OPTIMIZER_ADAMW, 1e-3);
            set(&mut c, v);
            let mut h = null_mut();
            let st = unsafe { lra_create(&c, &mut h) };
            assert_eq!(st, LRA_INVALID_CONFIG, "{name} = {v} was accepted");
            assert!(h.is_null());
            let msg = thread_error();
            assert!(msg.contains(&format!("{name} = ")), "{name} = {v}: {msg}");
        }
        for &v in kept {
            let mut c = config(LRA_OPTIMIZER_ADAMW, 1e-3);
            set(&mut c, v);
            drop(Handle::create(&c));
        }
    }
}

/// A checkpoint whose checksum is right but whose counters contradict each
/// other (more applied steps than steps) is refused, not loaded into
/// counters that later underflow.
#[test]
fn a_forged_checkpoint_with_inconsistent_counters_is_refused() {
    let h = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    let mut p = ramp(4, 1.0);
    let g = ramp(4, 1.0);
    for _ in 0..2 {
        assert_eq!(h.step(&[f32_tensor(&mut p, &g)], 1.0), LRA_OK);
    }
    let ckpt = h.checkpoint();
    // SGD keeps no slots: the applied-step count is the u64 before the checksum.
    let at = ckpt.len() - 16;
    let forged = forge(&ckpt, at, &2u64.to_le_bytes(), &3u64.to_le_bytes());
    refused_by_a_fresh_sgd_handle(&forged, "applied");
}

/// A checkpoint's tensor sizes follow `lra_step`'s rule: more than
/// `isize::MAX` bytes is refused. (SGD keeps no state, so no state bytes
/// bound such a size, and the handle then refused every step.)
#[test]
fn a_forged_tensor_size_no_step_could_pass_is_refused() {
    // Header 64 bytes, tensor count 8: the first tensor's numel is next.
    const NUMEL: usize = 72;
    let h = Handle::create(&config(LRA_OPTIMIZER_SGD, 0.1));
    let (mut p, g) = (ramp(4, 1.0), ramp(4, 1.0));
    assert_eq!(h.step(&[f32_tensor(&mut p, &g)], 1.0), LRA_OK);
    let ckpt = h.checkpoint();
    let forged = forge(
        &ckpt,
        NUMEL,
        &4u64.to_le_bytes(),
        &(1u64 << 62).to_le_bytes(),
    );
    refused_by_a_fresh_sgd_handle(&forged, "more than any tensor can hold");
}

/// A handle whose layout is the empty tensor list (steps with count 0)
/// round-trips through a checkpoint: the restored handle keeps the empty
/// layout and the applied-step count. (Used to come back with no layout at
/// all and applied = 0.)
#[test]
fn an_empty_layout_survives_a_checkpoint() {
    let a = Handle::create(&config(LRA_OPTIMIZER_ADAM, 0.1));
    assert_eq!(a.step(&[], 1.0), LRA_OK);
    a.report(0.5);
    let ckpt = a.checkpoint();
    let b = Handle::create(&config(LRA_OPTIMIZER_ADAM, 0.1));
    let unstepped = b.checkpoint();
    assert_eq!(b.load(&ckpt), LRA_OK, "{}", b.error());
    // ... and, like any fixed layout, refuses a checkpoint taken before any step.
    a.expect(a.load(&unstepped), LRA_BAD_CHECKPOINT, "before any step");
    assert_eq!(a.checkpoint(), ckpt);
    assert_eq!(b.checkpoint(), ckpt);
    assert_eq!(b.counters().applied, a.counters().applied);
    let mut p = [1.0f32; 2];
    let g = [1.0f32; 2];
    let t = [f32_tensor(&mut p, &g)];
    a.expect(a.step(&t, 1.0), LRA_SIZE_MISMATCH, "first step");
    b.expect(b.step(&t, 1.0), LRA_SIZE_MISMATCH, "first step");
}

/// One f16 tensor of `numel` elements at made-up addresses (parameters,
/// then gradients): only for steps lra refuses before touching memory.
fn untouchable_f16_tensor(numel: u64) -> [lra_tensor; 1] {
    [lra_tensor {
        param: 0x1000 as *mut c_void,
        grad: (0x2000 + (numel << 1)) as *const c_void,
        numel,
        dtype: LRA_DTYPE_F16,
        reserved: 0,
    }]
}

/// A tensor list the optimizer state cannot be allocated for (sizes that
/// fit the address space, but not memory) is LRA_OUT_OF_MEMORY, not an
/// abort of the caller's process; the handle then takes a normal first
/// step.
#[test]
#[cfg_attr(
    miri,
    ignore = "Miri stops at an allocation it cannot make instead of failing it"
)]
fn an_unallocatable_optimizer_state_is_an_error() {
    let h = Handle::create(&config(LRA_OPTIMIZER_ADAM, 1e-2));
    // 2^58 f16 elements: 2^59 bytes each (never touched), and Adam's two
    // f32 slots would need 2^61 bytes.
    let huge = untouchable_f16_tensor(1 << 58);
    h.expect(h.step(&huge, 1.0), LRA_OUT_OF_MEMORY, "out of memory");
    let (mut p, g) = (vec![1.0f32; 8], vec![0.5f32; 8]);
    assert_eq!(
        h.step(&[f32_tensor(&mut p, &g)], 1.0),
        LRA_OK,
        "{}",
        h.error()
    );
    assert!(
        p.iter().all(|&x| x < 1.0),
        "the step after moved nothing: {p:?}"
    );
}

/// A first step fixes the layout even when it is skipped and allocates no
/// state (a non-finite loss): a layout whose checkpoint could not exist
/// (Adam's state for 2^61 f16 elements: 2^64 bytes) is refused there, as
/// an invalid argument (no freed memory would make it fit). It
/// used to be accepted; `lra_state_size` then wrapped around to a small
/// size and `lra_save_state` panicked, which poisoned the handle.
#[test]
fn a_layout_whose_checkpoint_cannot_exist_is_refused_by_a_skipped_step() {
    let h = Handle::create(&config(LRA_OPTIMIZER_ADAM, 1e-2));
    let huge = untouchable_f16_tensor(1 << 61);
    let before = h.checkpoint();
    h.expect(h.step(&huge, f64::NAN), LRA_INVALID_ARGUMENT, "isize::MAX");
    assert_eq!(h.checkpoint(), before);
    let (mut p, g) = (vec![1.0f32; 8], vec![0.5f32; 8]);
    assert_eq!(h.step(&[f32_tensor(&mut p, &g)], f64::NAN), LRA_OK);
    assert_eq!(h.counters().steps, 1);
    assert!(h.checkpoint().len() > before.len());
}

/// Checkpoint fields no run can produce are refused even under a valid
/// checksum: a re-evaluation gap that is NaN or below 1 (it would re-evaluate
/// every step) and bias powers outside [0, 1] (Adam's bias correction would
/// turn negative or NaN). A gap of +inf is what a huge growth factor makes,
/// so it loads.
#[test]
fn forged_schedule_gaps_and_bias_powers_are_refused() {
    let mut p = ramp(16, 0.5);
    let g = ramp(16, 0.25);
    let mut cfg = config(LRA_OPTIMIZER_ADAM, 1e-2);
    cfg.reeval_schedule = LRA_REEVAL_GEOMETRIC;
    cfg.reeval_growth = 2.0;
    let h = Handle::create(&cfg);
    let t = [f32_tensor(&mut p, &g)];
    for _ in 0..3 {
        assert_eq!(h.step(&t, 2.0), LRA_OK);
        h.report(1.0);
    }
    let good = h.checkpoint();
    // The fixed fields after the header (64 bytes), the tensor count and
    // one 12-byte layout row: 7 counters, η, the schedule's next step and
    // gap, ..., then the bias powers at +160 and +168.
    let base = 64 + 8 + 12;
    let (gap_at, pow1_at, pow2_at) = (base + 72, base + 160, base + 168);
    let f64_at = |b: &[u8], at: usize| f64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    // Due at steps 0 and 1 (gap 1, then 2): the gap is now 4; three applied
    // Adam steps with β1 = 0.5.
    assert_eq!(f64_at(&good, gap_at), 4.0, "offset of the gap");
    assert_eq!(f64_at(&good, pow1_at), 0.125, "offset of beta1^t");
    assert_eq!(f64_at(&good, pow2_at), 0.999f64 * 0.999 * 0.999);
    let forge = |at: usize, v: f64| {
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        support::reseal(&mut b);
        b
    };
    for (at, v, words) in [
        (gap_at, f64::NAN, "gap"),
        (gap_at, 0.5, "gap"),
        (gap_at, -5.0, "gap"),
        (gap_at, f64::NEG_INFINITY, "gap"),
        (pow1_at, 1.5, "beta1^t"),
        (pow1_at, -0.0625, "beta1^t"),
        (pow2_at, f64::NAN, "beta2^t"),
    ] {
        let fresh = Handle::create(&cfg);
        fresh.expect(fresh.load(&forge(at, v)), LRA_BAD_CHECKPOINT, words);
        assert_eq!(
            fresh.counters().steps,
            0,
            "a refused load changed the handle"
        );
    }
    let fresh = Handle::create(&cfg);
    assert_eq!(fresh.load(&forge(gap_at, f64::INFINITY)), LRA_OK);
    assert_eq!(fresh.load(&good), LRA_OK);
    assert_eq!(fresh.checkpoint(), good);
}

/// `lra_last_error` claims the handle like any call: while another call
/// runs on it (here: the call whose reduction callback asks, and a failing
/// call on another thread) the running call's message is not read, since
/// that call replaces and frees it. Under Miri (stage `miri`) the second
/// half is a data race without the claim.
#[test]
fn the_handle_message_is_never_read_while_another_call_writes_it() {
    const BUSY: &str = "in the middle of another call";
    unsafe extern "C" fn ask(_v: *mut f64, _n: usize, user: *mut c_void) -> i32 {
        let r = &mut *(user as *mut (*mut lra_handle, String));
        r.1 = std::ffi::CStr::from_ptr(lra_last_error(r.0))
            .to_string_lossy()
            .into_owned();
        0
    }
    let mut cfg = config(LRA_OPTIMIZER_SGD, 0.1);
    cfg.loss_is_rank_local = 1;
    let h = Handle::create(&cfg);
    let mut r = (h.0, String::new());
    let st = unsafe {
        lra_set_reduction(
            h.0,
            Some(ask),
            (&mut r as *mut (*mut lra_handle, String)).cast(),
        )
    };
    assert_eq!(st, LRA_OK);
    let mut p = ramp(8, 1.0);
    let g = ramp(8, 1.0);
    assert_eq!(h.step(&[f32_tensor(&mut p, &g)], 1.0), LRA_OK);
    assert!(r.1.contains(BUSY), "from inside the callback: '{}'", r.1);

    struct Shared(*mut lra_handle);
    // SAFETY: the handle may be used from any thread (the ABI's promise).
    unsafe impl Sync for Shared {}
    let shared = Shared(h.0);
    let shared = &shared;
    // The message the reader may see before the writer's first call.
    assert_eq!(unsafe { lra_set_lr(h.0, -1.0) }, LRA_INVALID_ARGUMENT);
    std::thread::scope(|s| {
        s.spawn(move || {
            for _ in 0..10 {
                // A read of the message counts as a call on the handle: a
                // call overlapping it is refused, as any overlapping call.
                let st = unsafe { lra_set_lr(shared.0, -1.0) };
                assert!(st == LRA_INVALID_ARGUMENT || st == LRA_CALL_ORDER, "{st}");
            }
        });
        s.spawn(move || {
            for _ in 0..10 {
                // Only the call is checked here, not the text: the message
                // is valid until the next call on the handle, which the
                // other thread may start at any moment, so reading it here
                // would be this test's own data race (Miri reports it).
                let m = unsafe { lra_last_error(shared.0) };
                assert!(!m.is_null());
            }
        });
    });
    // No call runs now: the message is the last failing lra_set_lr's.
    let m = unsafe { std::ffi::CStr::from_ptr(lra_last_error(h.0)) };
    let m = m.to_string_lossy();
    assert!(m.contains("lra_set_lr"), "'{m}'");
}

/// A C caller's checkpoint buffer fresh from `malloc` is uninitialised;
/// `lra_save_state` writes it without forming a `&mut [u8]` over it (the
/// stage `miri` runs this test with `-Zmiri-recursive-validation`, which
/// checks what references point at).
#[test]
fn a_checkpoint_goes_into_an_uninitialised_buffer() {
    let h = Handle::create(&config(LRA_OPTIMIZER_ADAM, 1e-3));
    let mut p = ramp(8, 1.0);
    let g = ramp(8, 0.5);
    assert_eq!(h.step(&[f32_tensor(&mut p, &g)], 1.0), LRA_OK);
    let mut size = 0usize;
    assert_eq!(unsafe { lra_state_size(h.0, &mut size) }, LRA_OK);
    let mut buf: Vec<u8> = Vec::with_capacity(size); // uninitialised, like malloc
    let mut written = 0usize;
    let st = unsafe { lra_save_state(h.0, buf.as_mut_ptr().cast(), size, &mut written) };
    assert_eq!(st, LRA_OK, "{}", h.error());
    assert_eq!(written, size);
    // SAFETY: lra_save_state initialised `written` bytes.
    unsafe { buf.set_len(written) };
    assert_eq!(
        buf,
        h.checkpoint(),
        "the same bytes as into an initialised buffer"
    );
}

/// A failing call from a thread-local destructor that runs after lra's own
/// thread-local message was destroyed (a C++ `thread_local` that owns a
/// handle) returns its status; it used to panic inside the `extern "C"`
/// function, which aborts the process.
#[test]
fn a_failing_call_during_thread_exit_returns_its_status() {
    use std::sync::atomic::{AtomicU32, Ordering};
    static STATUS: AtomicU32 = AtomicU32::new(u32::MAX);
    struct Late;
    impl Drop for Late {
        fn drop(&mut self) {
            let mut h = null_mut();
            STATUS.store(
                unsafe { lra_create(std::ptr::null(), &mut h) },
                Ordering::SeqCst,
            );
            let m = unsafe { std::ffi::CStr::from_ptr(lra_thread_last_error()) };
            assert!(!m.to_bytes().is_empty());
        }
    }
    thread_local! { static LATE: Late = const { Late }; }
    std::thread::spawn(|| {
        // Destructors run in the reverse order of first use: LATE's after
        // lra's thread-local message, which the failing call creates.
        LATE.with(|_| {});
        let mut h = null_mut();
        assert_eq!(
            unsafe { lra_create(std::ptr::null(), &mut h) },
            LRA_NULL_POINTER
        );
    })
    .join()
    .unwrap();
    assert_eq!(STATUS.load(Ordering::SeqCst), LRA_NULL_POINTER);
}
