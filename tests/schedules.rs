//! Re-evaluation schedules through the C ABI: `lra_config.reeval_schedule`
//! (ALWAYS / EVERY k / GEOMETRIC r) and `lra_should_reeval` after each
//! `lra_step`, as documented in `include/lra.h` and `src/config.rs`.

use lra::ffi::*;
use std::ptr::{null, null_mut};

fn config(schedule: lra_reeval_schedule, every: u32, growth: f64) -> lra_config {
    let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
    // SAFETY: lra_config_init fills the whole struct.
    let mut cfg = unsafe {
        lra_config_init(cfg.as_mut_ptr(), LRA_OPTIMIZER_SGD);
        cfg.assume_init()
    };
    cfg.lr = 0.1;
    cfg.num_threads = 1;
    cfg.reeval_schedule = schedule;
    cfg.reeval_every = every;
    cfg.reeval_growth = growth;
    cfg
}

struct Handle(*mut lra_handle);

impl Handle {
    fn new(cfg: &lra_config) -> Handle {
        let mut h = null_mut();
        // SAFETY: valid config and out pointer.
        let st = unsafe { lra_create(cfg, &mut h) };
        assert_eq!(st, LRA_OK);
        Handle(h)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by lra_create.
        unsafe { lra_destroy(self.0) }
    }
}

/// A one-tensor problem f(θ) = ½|θ|² with its gradient g = θ.
struct Quadratic {
    theta: Vec<f32>,
    grad: Vec<f32>,
}

impl Quadratic {
    fn new() -> Quadratic {
        Quadratic {
            theta: vec![1.0, -2.0, 0.5, 3.0],
            grad: vec![0.0; 4],
        }
    }
    fn loss(&self) -> f64 {
        self.theta.iter().map(|&x| 0.5 * (x as f64).powi(2)).sum()
    }
    /// One `lra_step` with loss `loss` (the true loss when None).
    fn step(&mut self, h: &Handle, loss: Option<f64>) {
        self.grad.copy_from_slice(&self.theta);
        let t = lra_tensor {
            param: self.theta.as_mut_ptr().cast(),
            grad: self.grad.as_ptr().cast(),
            numel: 4,
            dtype: LRA_DTYPE_F32,
            reserved: 0,
        };
        let loss = loss.unwrap_or_else(|| self.loss());
        // SAFETY: the tensor points at live buffers.
        let st = unsafe { lra_step(h.0, &t, 1, loss, 0.0, null_mut()) };
        assert_eq!(st, LRA_OK);
    }
}

fn should(h: &Handle) -> bool {
    let mut due = 7u32;
    // SAFETY: valid handle and out pointer.
    let st = unsafe { lra_should_reeval(h.0, &mut due) };
    assert_eq!(st, LRA_OK);
    assert!(due <= 1, "lra_should_reeval wrote {due}");
    due == 1
}

fn report(h: &Handle, loss_after: f64) {
    // SAFETY: valid handle; out may be NULL.
    let st = unsafe { lra_report_reeval(h.0, loss_after, null_mut()) };
    assert_eq!(st, LRA_OK);
}

fn counters(h: &Handle) -> lra_counters {
    let mut c = lra_counters::default();
    // SAFETY: valid handle and out pointer.
    assert_eq!(unsafe { lra_get_counters(h.0, &mut c) }, LRA_OK);
    c
}

fn lr(h: &Handle) -> f64 {
    let mut v = 0.0;
    // SAFETY: valid handle and out pointer.
    assert_eq!(unsafe { lra_get_lr(h.0, &mut v) }, LRA_OK);
    v
}

/// Steps the problem `steps` times, re-evaluating exactly when the schedule
/// says so; returns the indices of the due steps.
fn due_steps(h: &Handle, q: &mut Quadratic, steps: usize) -> Vec<usize> {
    let mut due = Vec::new();
    for i in 0..steps {
        q.step(h, None);
        if should(h) {
            due.push(i);
            report(h, q.loss());
        }
    }
    due
}

#[test]
fn always_is_every_step() {
    let h = Handle::new(&config(LRA_REEVAL_ALWAYS, 1, 1.1));
    let due = due_steps(&h, &mut Quadratic::new(), 12);
    assert_eq!(due, (0..12).collect::<Vec<_>>());
    assert_eq!(counters(&h).reevals, 12);
}

#[test]
fn every_k_is_steps_0_k_2k() {
    for k in [1u32, 2, 3, 7] {
        let h = Handle::new(&config(LRA_REEVAL_EVERY, k, 1.1));
        let due = due_steps(&h, &mut Quadratic::new(), 30);
        let expect: Vec<usize> = (0..30).filter(|i| i % k as usize == 0).collect();
        assert_eq!(due, expect, "k = {k}");
        let c = counters(&h);
        assert_eq!((c.steps, c.reevals), (30, expect.len() as u64), "k = {k}");
    }
}

/// The documented rule: due at 0; after a re-evaluation at step i with
/// current gap G (starting at 1) the next is due at i + max(1, ⌊G⌋), and G
/// grows by r.
fn geometric_reference(r: f64, steps: usize) -> Vec<usize> {
    let (mut next, mut gap, mut out) = (0usize, 1.0f64, Vec::new());
    for i in 0..steps {
        if i >= next {
            out.push(i);
            next = i + (gap.floor() as usize).max(1);
            gap *= r;
        }
    }
    out
}

#[test]
fn geometric_gaps_grow_by_the_factor() {
    // Spelled out for r = 2: gaps 1, 2, 4, 8, 16.
    let h = Handle::new(&config(LRA_REEVAL_GEOMETRIC, 1, 2.0));
    assert_eq!(
        due_steps(&h, &mut Quadratic::new(), 40),
        vec![0, 1, 3, 7, 15, 31]
    );
    // r = 1.5: gaps ⌊1⌋, ⌊1.5⌋, ⌊2.25⌋, ⌊3.375⌋, ⌊5.06⌋ = 1, 1, 2, 3, 5.
    let h = Handle::new(&config(LRA_REEVAL_GEOMETRIC, 1, 1.5));
    assert_eq!(
        due_steps(&h, &mut Quadratic::new(), 13),
        vec![0, 1, 2, 4, 7, 12]
    );
    for r in [1.0, 1.05, 1.1, 1.3, 3.0] {
        let h = Handle::new(&config(LRA_REEVAL_GEOMETRIC, 1, r));
        let due = due_steps(&h, &mut Quadratic::new(), 200);
        assert_eq!(due, geometric_reference(r, 200), "r = {r}");
    }
    // r = 1 is every step.
    assert_eq!(geometric_reference(1.0, 50), (0..50).collect::<Vec<_>>());
}

#[test]
fn the_schedule_does_not_depend_on_whether_the_caller_reports() {
    // A caller that ignores the answer and never reports sees the same
    // sequence: the schedule counts steps, not re-evaluations.
    for cfg in [
        config(LRA_REEVAL_EVERY, 4, 1.1),
        config(LRA_REEVAL_GEOMETRIC, 1, 1.5),
    ] {
        let h = Handle::new(&cfg);
        let mut q = Quadratic::new();
        let mut due = Vec::new();
        for i in 0..40 {
            q.step(&h, None);
            if should(&h) {
                due.push(i);
            }
        }
        let h2 = Handle::new(&cfg);
        assert_eq!(due, due_steps(&h2, &mut Quadratic::new(), 40));
        assert_eq!(counters(&h).reevals, 0);
    }
}

#[test]
fn eta_only_moves_on_reevaluated_steps() {
    let h = Handle::new(&config(LRA_REEVAL_EVERY, 3, 1.1));
    let mut q = Quadratic::new();
    let mut moved = Vec::new();
    for i in 0..15 {
        let before = lr(&h);
        q.step(&h, None);
        if should(&h) {
            // A loss increase on the same batch: η halves.
            report(&h, q.loss() * 10.0 + 1.0);
        }
        if lr(&h) != before {
            moved.push(i);
        }
    }
    assert_eq!(moved, vec![0, 3, 6, 9, 12]);
    // Five exact halvings (powi promises no exactness: Miri perturbs it).
    assert_eq!(lr(&h), 0.1 / 32.0);
}

#[test]
fn skipped_steps_count_in_the_schedule() {
    // A step with a non-finite loss writes nothing but is still a step:
    // with k = 2, steps 0, 2, 4 are due whatever their losses.
    let h = Handle::new(&config(LRA_REEVAL_EVERY, 2, 1.1));
    let mut q = Quadratic::new();
    let mut due = Vec::new();
    for i in 0..6 {
        let loss = if i == 2 { Some(f64::NAN) } else { None };
        q.step(&h, loss);
        if should(&h) {
            due.push(i);
            let mut info = std::mem::MaybeUninit::<lra_reeval_info>::uninit();
            // SAFETY: valid handle and out pointer.
            let st = unsafe { lra_report_reeval(h.0, q.loss(), info.as_mut_ptr()) };
            assert_eq!(st, LRA_OK);
            // SAFETY: written on success.
            let info = unsafe { info.assume_init() };
            if i == 2 {
                assert_eq!(info.decision, LRA_DECISION_SKIPPED);
                assert_eq!(info.skip_reason, LRA_SKIP_NONFINITE_LOSS);
            }
        }
    }
    assert_eq!(due, vec![0, 2, 4]);
    let c = counters(&h);
    assert_eq!((c.steps, c.applied, c.skipped), (6, 5, 1));
}

#[test]
fn the_schedule_position_survives_a_checkpoint() {
    let cfg = config(LRA_REEVAL_GEOMETRIC, 1, 1.5);
    let h = Handle::new(&cfg);
    let mut q = Quadratic::new();
    let first = due_steps(&h, &mut q, 5);
    assert_eq!(first, vec![0, 1, 2, 4]);
    let mut size = 0usize;
    // SAFETY: valid handle and out pointers; the buffer has `size` bytes.
    let buf = unsafe {
        assert_eq!(lra_state_size(h.0, &mut size), LRA_OK);
        let mut buf = vec![0u8; size];
        assert_eq!(
            lra_save_state(h.0, buf.as_mut_ptr().cast(), size, null_mut()),
            LRA_OK
        );
        buf
    };
    let mut q2 = Quadratic {
        theta: q.theta.clone(),
        grad: vec![0.0; 4],
    };
    let resumed = Handle::new(&cfg);
    // SAFETY: the buffer holds a checkpoint of `size` bytes.
    assert_eq!(
        unsafe { lra_load_state(resumed.0, buf.as_ptr().cast(), size) },
        LRA_OK
    );
    // Steps 5.. of the original and of the resumed handle: due at 7, 12, ...
    let rest = due_steps(&h, &mut q, 20);
    assert_eq!(rest, due_steps(&resumed, &mut q2, 20));
    let absolute: Vec<usize> = rest.iter().map(|i| i + 5).collect();
    assert_eq!(
        absolute,
        geometric_reference(1.5, 25)
            .into_iter()
            .filter(|&i| i >= 5)
            .collect::<Vec<_>>()
    );
    assert_eq!(q.theta, q2.theta);
}

#[test]
fn should_reeval_needs_a_pending_step() {
    let h = Handle::new(&config(LRA_REEVAL_ALWAYS, 1, 1.1));
    let mut due = 0u32;
    // SAFETY: valid handle and out pointer.
    assert_eq!(unsafe { lra_should_reeval(h.0, &mut due) }, LRA_CALL_ORDER);
    let mut q = Quadratic::new();
    q.step(&h, None);
    assert!(should(&h));
    // Asking twice is fine; after the report nothing is pending.
    assert!(should(&h));
    report(&h, q.loss());
    // SAFETY: as above.
    assert_eq!(unsafe { lra_should_reeval(h.0, &mut due) }, LRA_CALL_ORDER);
    // SAFETY: a NULL out pointer is refused, not written.
    q.step(&h, None);
    assert_eq!(
        unsafe { lra_should_reeval(h.0, null_mut()) },
        LRA_NULL_POINTER
    );
    // SAFETY: a NULL handle is refused.
    assert_eq!(
        unsafe { lra_should_reeval(null(), &mut due) },
        LRA_NULL_POINTER
    );
}

#[test]
fn bad_schedule_parameters_are_refused() {
    let bad = [
        config(LRA_REEVAL_EVERY, 0, 1.1),
        config(LRA_REEVAL_GEOMETRIC, 1, 0.5),
        config(LRA_REEVAL_GEOMETRIC, 1, f64::NAN),
        config(LRA_REEVAL_GEOMETRIC, 1, f64::INFINITY),
        config(3, 1, 1.1),
    ];
    for cfg in bad {
        let mut h = null_mut();
        // SAFETY: valid pointers.
        let st = unsafe { lra_create(&cfg, &mut h) };
        assert_eq!(st, LRA_INVALID_CONFIG, "{cfg:?}");
        assert!(h.is_null());
    }
    // Parameters of the schedules not selected are not checked.
    let h = Handle::new(&config(LRA_REEVAL_ALWAYS, 0, 0.0));
    assert!(!h.0.is_null());
}
