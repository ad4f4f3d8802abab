//! Checkpoints, re-evaluation schedules and the read-back calls through the
//! C ABI, audited against what README.md promises:
//!
//! - `lra_load_state`: "a resumed run continues bit-exactly as if never
//!   interrupted", from ANY position (before the first step, with a step
//!   pending, after a report, after a skipped or refused call, in the
//!   middle of an every-k or geometric schedule), into a fresh handle with
//!   another thread count or into a handle that already stepped: every
//!   later status, `lra_should_reeval` answer, `lra_get_last_reeval`,
//!   `lra_get_last_phi`, counter, η and parameter has the bits of the
//!   uninterrupted run.
//! - what a load refuses: η outside the new [lr_min, lr_max] (and nothing
//!   changes), a pre-step checkpoint into a handle with a layout; and that
//!   changed adaptation settings apply from the restart, to the restored
//!   pending step too.
//! - `lra_get_counters` / `lra_get_last_reeval` / `lra_get_last_phi` after
//!   every kind of step and report, refused ones included.
//! - the schedules' documented sequences and the sweep's re-evaluation
//!   counts, whoever reports what, and what a checkpoint does under
//!   another schedule.
//!
//! `tests/ffi_fuzz.rs` checks random sequences against a model that mirrors
//! the engine; the tests here check fixed scripts against the README's text
//! and against the uninterrupted run itself.

use lra::ffi::*;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ptr::null_mut;

mod support;
use support::{counter_array, thread_error, Handle};

fn config(optimizer: lra_optimizer, lr: f64) -> lra_config {
    let mut cfg = MaybeUninit::<lra_config>::uninit();
    // SAFETY: lra_config_init fills the whole struct.
    let mut cfg = unsafe {
        lra_config_init(cfg.as_mut_ptr(), optimizer);
        cfg.assume_init()
    };
    cfg.lr = lr;
    cfg.num_threads = 1;
    cfg
}

/// The cross-rank sum over two ranks that hold the same values: a
/// restored step whose φ was left rank-local, or reduced twice, shows.
unsafe extern "C" fn two_equal_ranks(values: *mut f64, count: usize, _user: *mut c_void) -> i32 {
    // SAFETY: lra passes `count` valid values.
    for v in unsafe { std::slice::from_raw_parts_mut(values, count) } {
        *v *= 2.0;
    }
    0
}

impl Handle {
    /// `Handle::create`, with the two-rank reduction registered where the
    /// configuration needs one.
    fn new(cfg: &lra_config) -> Handle {
        let h = Handle::create(cfg);
        if cfg.sharding == LRA_SHARDING_SHARDED || cfg.loss_is_rank_local == 1 {
            // SAFETY: valid handle; the callback needs no user data.
            let st = unsafe { lra_set_reduction(h.0, Some(two_equal_ranks), null_mut()) };
            assert_eq!(st, LRA_OK, "lra_set_reduction: {}", thread_error());
        }
        h
    }

    /// `lra_should_reeval`: its status and answer (7 when not written).
    fn due(&self) -> (lra_status, u32) {
        let mut due = 7u32;
        // SAFETY: valid handle and out pointer.
        let st = unsafe { lra_should_reeval(self.0, &mut due) };
        (st, due)
    }

    /// `lra_get_last_reeval`: its status and the report's bits (0 when not
    /// written).
    fn last(&self) -> (lra_status, [u64; 7]) {
        let mut info = MaybeUninit::<lra_reeval_info>::zeroed();
        // SAFETY: valid handle and out pointer; all-zero is a valid value.
        let st = unsafe { lra_get_last_reeval(self.0, info.as_mut_ptr()) };
        (st, support::info_bits(&unsafe { info.assume_init() }))
    }

    fn report(&self, loss_after: f64) -> (lra_status, lra_reeval_info) {
        let mut info = MaybeUninit::<lra_reeval_info>::zeroed();
        // SAFETY: valid handle and out pointer; all-zero is a valid value.
        let st = unsafe { lra_report_reeval(self.0, loss_after, info.as_mut_ptr()) };
        (st, unsafe { info.assume_init() })
    }
}

// ---- a problem whose losses and gradients depend on the parameters -------

/// f_b(θ) = 20 + Σ_j ½ a_j θ_j² + n_bj θ_j over the elements of all tensors,
/// with fixed curvatures a ∈ [0.5, 1.5) and batch noise n_b ∈ [-0.5, 0.5).
/// Everything is a function of the parameters' bits and the batch index,
/// so two runs with the same parameters see the same losses.
struct Problem {
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    curvature: Vec<Vec<f32>>,
    /// The latest batch's noise (a step and its report share it).
    noise: std::cell::RefCell<(u64, Vec<Vec<f32>>)>,
}

impl Problem {
    fn new(sizes: &[usize], seed: u64) -> Problem {
        let gen = |salt: u64, lo: f32, hi: f32| -> Vec<Vec<f32>> {
            sizes
                .iter()
                .enumerate()
                .map(|(t, &n)| support::uniform(n, seed * 1000 + salt + t as u64, lo, hi))
                .collect()
        };
        Problem {
            params: gen(1, -2.0, 2.0),
            grads: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            curvature: gen(100, 0.5, 1.5),
            noise: std::cell::RefCell::new((u64::MAX, Vec::new())),
        }
    }

    fn noise(&self, batch: u64) -> std::cell::Ref<'_, (u64, Vec<Vec<f32>>)> {
        if self.noise.borrow().0 != batch {
            let fresh = self
                .params
                .iter()
                .enumerate()
                .map(|(t, p)| {
                    support::uniform(p.len(), 7_000_000 + 64 * batch + t as u64, -0.5, 0.5)
                })
                .collect();
            *self.noise.borrow_mut() = (batch, fresh);
        }
        self.noise.borrow()
    }

    fn loss(&self, batch: u64) -> f64 {
        let noise = self.noise(batch);
        let mut f = 20.0;
        for ((p, a), n) in self.params.iter().zip(&self.curvature).zip(&noise.1) {
            for ((&x, &a), &n) in p.iter().zip(a).zip(n) {
                let x = x as f64;
                f += 0.5 * a as f64 * x * x + n as f64 * x;
            }
        }
        f
    }

    fn fill_grads(&mut self, batch: u64) {
        let noise = self.noise(batch).1.clone();
        for (((g, p), a), n) in self
            .grads
            .iter_mut()
            .zip(&self.params)
            .zip(&self.curvature)
            .zip(&noise)
        {
            for (((g, &x), &a), &n) in g.iter_mut().zip(p).zip(a).zip(n) {
                *g = a * x + n;
            }
        }
    }

    fn tensors(&mut self) -> Vec<lra_tensor> {
        self.params
            .iter_mut()
            .zip(&self.grads)
            .map(|(p, g)| lra_tensor {
                param: p.as_mut_ptr().cast(),
                grad: g.as_ptr().cast(),
                numel: p.len() as u64,
                dtype: LRA_DTYPE_F32,
                reserved: 0,
            })
            .collect()
    }

    fn param_bits(&self) -> Vec<Vec<u32>> {
        self.params
            .iter()
            .map(|p| p.iter().map(|x| x.to_bits()).collect())
            .collect()
    }
}

// ---- scripted runs --------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum StepKind {
    /// The batch's loss and gradient.
    Plain,
    /// The same with R = 0.5 (the scaled two-pass mode).
    Noisy,
    NanLoss,
    /// One gradient element NaN (the guard skips the step).
    NanGrad,
    /// `lra_step_ex` with found_inf = 1.
    FoundInf,
    /// Loss 0 = f* of the Polyak configurations (s = 0 there; an ordinary
    /// low loss elsewhere).
    AtFStar,
    /// All gradients 0: φ = 0 (Adam's state still moves the parameters).
    ZeroGrad,
}

#[derive(Clone, Copy, Debug)]
enum After {
    /// The loss on the step's batch at the new parameters.
    Observed,
    /// One more than that (η is lowered).
    Worse,
    Inf,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Step(StepKind),
    /// The documented use: report exactly when `lra_should_reeval` says 1.
    ReportIfDue,
    /// Report whatever the schedule says (refused when nothing is pending).
    Report(After),
    /// η ← 0.75·η (refused below lr_min).
    ScaleLr,
    /// A step with one tensor too few: refused, changes nothing.
    BadStep,
}

/// What a caller can observe after a call: every read-back function and
/// the parameters, as bits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observation {
    due: (lra_status, u32),
    last: (lra_status, [u64; 7]),
    phi: u64,
    counters: [u64; 8],
    lr: u64,
    params: Vec<Vec<u32>>,
}

fn observe(h: &Handle, p: &Problem) -> Observation {
    let c = h.counters();
    // Invariants README's counter list implies, checked on every call.
    assert_eq!(c.steps, c.applied + c.skipped, "{c:?}");
    assert_eq!(
        c.reevals,
        c.raised + c.lowered + c.kept + c.reeval_skipped,
        "{c:?}"
    );
    Observation {
        due: h.due(),
        last: h.last(),
        phi: h.phi().to_bits(),
        counters: counter_array(&c),
        lr: h.lr().to_bits(),
        params: p.param_bits(),
    }
}

/// The batch of the step a report at `script[i]` judges: the latest step
/// before it (batch = its index in the script).
fn batch_of_report(script: &[Op], i: usize) -> u64 {
    script[..i]
        .iter()
        .rposition(|op| matches!(op, Op::Step(_)))
        .unwrap_or(0) as u64
}

/// Runs `script[i]` on `h`; returns its status.
fn apply(h: &Handle, p: &mut Problem, script: &[Op], i: usize) -> lra_status {
    let batch = i as u64;
    match script[i] {
        Op::Step(kind) => {
            p.fill_grads(batch);
            let mut loss = p.loss(batch);
            let mut obs_var = 0.0;
            let mut flag = 0.0f32;
            match kind {
                StepKind::Plain => {}
                StepKind::Noisy => obs_var = 0.5,
                StepKind::NanLoss => loss = f64::NAN,
                StepKind::NanGrad => p.grads[0][0] = f32::NAN,
                StepKind::FoundInf => flag = 1.0,
                StepKind::AtFStar => loss = 0.0,
                StepKind::ZeroGrad => p.grads.iter_mut().for_each(|g| g.fill(0.0)),
            }
            let list = p.tensors();
            // SAFETY: the tensors point at live buffers; the flag is one f32.
            unsafe {
                lra_step_ex(
                    h.0,
                    list.as_ptr(),
                    list.len(),
                    loss,
                    obs_var,
                    &flag,
                    null_mut(),
                )
            }
        }
        Op::ReportIfDue => match h.due() {
            (LRA_OK, 1) => h.report(p.loss(batch_of_report(script, i))).0,
            (st, _) => st,
        },
        Op::Report(after) => {
            let f = p.loss(batch_of_report(script, i));
            let f = match after {
                After::Observed => f,
                After::Worse => f + 1.0,
                After::Inf => f64::INFINITY,
            };
            h.report(f).0
        }
        // SAFETY: valid handle.
        Op::ScaleLr => unsafe { lra_set_lr(h.0, 0.75 * h.lr()) },
        Op::BadStep => {
            p.fill_grads(batch);
            let list = p.tensors();
            // SAFETY: the first count - 1 tensors point at live buffers.
            unsafe { lra_step(h.0, list.as_ptr(), list.len() - 1, 1.0, 0.0, null_mut()) }
        }
    }
}

/// Every kind of call, in the positions that matter: a step reported and
/// one not, a pending step replaced by the next, reports refused, skips of
/// each cause, s = 0, φ = 0, f+ = inf, refused calls, η set by hand with
/// and without a step pending, and enough plain steps to cross several
/// re-evaluations of each schedule.
fn script() -> Vec<Op> {
    use After::*;
    use Op::*;
    use StepKind::*;
    let mut s = vec![
        Step(Plain),
        ReportIfDue,
        Step(Plain),
        Report(Observed),
        Step(NanLoss),
        ReportIfDue,
        Step(Plain),
        Step(Plain),
        ScaleLr,
        ReportIfDue,
        Report(Observed),
        Step(NanGrad),
        ReportIfDue,
        Step(FoundInf),
        Step(Plain),
        Report(Worse),
        BadStep,
        ScaleLr,
        Step(AtFStar),
        Report(Observed),
        Step(Noisy),
        Report(Inf),
        Step(ZeroGrad),
        ReportIfDue,
    ];
    for _ in 0..6 {
        s.extend([Step(Plain), ReportIfDue]);
    }
    s.extend([Step(Noisy), Step(Plain)]);
    s
}

/// Runs `script` uninterrupted on a handle of `cfg` (one thread), saving a
/// checkpoint before every call (`only`: before these calls); then, for
/// each such position, loads the checkpoint into a fresh handle with each
/// of `threads` threads (and, with `dirty`, into a handle that already
/// stepped on other data and has a step pending), gives it the parameters
/// of that position and runs the rest of the script. Every observation
/// after every call must have the bits of the uninterrupted run's, and the
/// final checkpoints the same bytes.
fn resume_everywhere(
    what: &str,
    script: &[Op],
    cfg: &lra_config,
    sizes: &[usize],
    threads: &[u32],
    dirty: bool,
    only: Option<&[usize]>,
) {
    let n = script.len();
    let run_cfg = lra_config {
        num_threads: 1,
        ..*cfg
    };
    let positions: Vec<usize> = match only {
        Some(list) => list.to_vec(),
        None => (0..=n).collect(),
    };
    let h = Handle::new(&run_cfg);
    let mut p = Problem::new(sizes, 1);
    let start = observe(&h, &p);
    // Checkpoint and parameters before call i (i = n: after the last).
    let (mut saved, mut trace) = (vec![None; n + 1], Vec::new());
    for i in 0..n {
        if positions.contains(&i) {
            saved[i] = Some((h.checkpoint(), p.params.clone()));
        }
        let st = apply(&h, &mut p, script, i);
        assert!(
            st == LRA_OK || st == LRA_CALL_ORDER || st == LRA_SIZE_MISMATCH,
            "{what}: {:?} returned {st}: {}",
            script[i],
            thread_error()
        );
        trace.push((st, observe(&h, &p)));
    }
    let end = h.checkpoint();
    saved[n] = Some((end.clone(), p.params.clone()));
    let c = trace.last().unwrap().1.counters;
    assert!(c[3] >= 6, "{what}: only {} reports: too few", c[3]);

    let mut targets: Vec<(u32, bool)> = threads.iter().map(|&t| (t, false)).collect();
    if dirty {
        targets.push((2, true));
    }
    for k in positions {
        let (ckpt, params) = saved[k].as_ref().unwrap();
        for &(t, stepped) in &targets {
            let at = format!(
                "{what}: resumed before {k} ({:?}), {t} threads, stepped {stepped}",
                script.get(k)
            );
            let r = Handle::new(&lra_config {
                num_threads: t,
                ..*cfg
            });
            if stepped {
                let mut other = Problem::new(sizes, 2);
                for op in [
                    Op::Step(StepKind::Plain),
                    Op::Report(After::Worse),
                    Op::Step(StepKind::Plain),
                ] {
                    apply(&r, &mut other, &[op], 0);
                }
            }
            let before = r.checkpoint();
            let st = r.load(ckpt);
            if stepped && k == 0 {
                // README: a checkpoint saved before any step does not load
                // into a handle whose layout is already fixed.
                assert_eq!(st, LRA_BAD_CHECKPOINT, "{at}");
                assert_eq!(
                    r.checkpoint(),
                    before,
                    "{at}: a refused load changed the handle"
                );
                continue;
            }
            assert_eq!(st, LRA_OK, "{at}: {}", thread_error());
            let mut q = Problem::new(sizes, 1);
            q.params = params.clone();
            let expect = if k == 0 { &start } else { &trace[k - 1].1 };
            assert_eq!(&observe(&r, &q), expect, "{at}: right after the load");
            for i in k..n {
                let st = apply(&r, &mut q, script, i);
                assert_eq!(
                    (st, observe(&r, &q)),
                    trace[i],
                    "{at}: after {i} ({:?})",
                    script[i]
                );
            }
            assert_eq!(r.checkpoint(), end, "{at}: final checkpoint");
        }
    }
}

/// Every optimizer, every schedule, the fused, Polyak (f* known, capped)
/// and bounded-η modes, sharded parameters and rank-local losses (with a
/// reduction over two equal ranks): resumed at every position of the
/// script, into a fresh handle with 2 or 3 threads and into one that
/// already stepped.
#[test]
fn a_run_resumed_at_any_position_continues_bit_exactly() {
    let sizes = [37, 6];
    let mut cases = Vec::new();
    let mut c = config(LRA_OPTIMIZER_ADAM, 1e-2);
    cases.push(("adam, always", c));
    c = config(LRA_OPTIMIZER_MOMENTUM, 0.3);
    c.reeval_schedule = LRA_REEVAL_EVERY;
    c.reeval_every = 3;
    c.lr_max = 0.4;
    cases.push(("momentum, every 3, lr_max", c));
    c = config(LRA_OPTIMIZER_ADAMW, 1e-2);
    c.reeval_schedule = LRA_REEVAL_GEOMETRIC;
    c.reeval_growth = 1.5;
    c.f_star = 0.0;
    c.scale_max = 3.0;
    cases.push(("adamw, geometric 1.5, polyak", c));
    c = config(LRA_OPTIMIZER_ADAGRAD, 0.1);
    c.reeval_schedule = LRA_REEVAL_GEOMETRIC;
    c.reeval_growth = 2.0;
    c.lr_min = 0.02;
    cases.push(("adagrad, geometric 2, lr_min", c));
    c = config(LRA_OPTIMIZER_RMSPROP, 1e-2);
    c.reeval_schedule = LRA_REEVAL_EVERY;
    c.reeval_every = 2;
    c.f_star = 0.0;
    c.scale_max = 2.0;
    cases.push(("rmsprop, every 2, polyak", c));
    c = config(LRA_OPTIMIZER_NESTEROV, 0.2);
    c.weight_decay = 0.01;
    cases.push(("nesterov, always, weight decay", c));
    c = config(LRA_OPTIMIZER_SGD, 0.5);
    c.reeval_schedule = LRA_REEVAL_GEOMETRIC;
    c.reeval_growth = 1.1;
    c.f_star = 0.0;
    cases.push(("sgd, geometric 1.1, polyak uncapped", c));
    c = config(LRA_OPTIMIZER_ADAM, 1e-2);
    c.sharding = LRA_SHARDING_SHARDED;
    cases.push(("adam, sharded (fused: φ reduced at the report)", c));
    c.f_star = 0.0;
    c.scale_max = 2.0;
    c.reeval_schedule = LRA_REEVAL_EVERY;
    c.reeval_every = 2;
    cases.push(("adam, sharded polyak (φ reduced at the step)", c));
    c = config(LRA_OPTIMIZER_MOMENTUM, 0.1);
    c.loss_is_rank_local = 1;
    cases.push(("momentum, rank-local losses", c));
    for (what, cfg) in cases {
        resume_everywhere(what, &script(), &cfg, &sizes, &[2, 3], true, None);
    }
}

/// README: φ has the same bits whatever the thread count, so a checkpoint
/// moves between thread counts: tensors big enough to be split over 3
/// threads (the backend starts at most one thread per 256 Ki elements), saved
/// by one thread, resumed by 2 and 3.
#[test]
fn a_checkpoint_resumes_bit_exactly_with_another_thread_count() {
    let sizes = [800_000, 7];
    let adam = config(LRA_OPTIMIZER_ADAM, 1e-3);
    let mut polyak = config(LRA_OPTIMIZER_ADAMW, 1e-3);
    polyak.f_star = 0.0;
    polyak.scale_max = 2.0;
    polyak.reeval_schedule = LRA_REEVAL_GEOMETRIC;
    polyak.reeval_growth = 1.5;
    for (what, cfg) in [("adam, threads", adam), ("adamw polyak, threads", polyak)] {
        // With a step pending: plain, a second one with η set by hand,
        // skipped (NaN gradient), s = 0; and in the middle of the schedule.
        let positions = [1, 9, 12, 19, 31];
        resume_everywhere(
            what,
            &script(),
            &cfg,
            &sizes,
            &[2, 3],
            false,
            Some(&positions),
        );
    }
}

// ---- changed settings across a restart -----------------------------------

/// One plain step on `p` (batch `b`); returns its loss.
fn plain_step(h: &Handle, p: &mut Problem, b: u64) -> f64 {
    p.fill_grads(b);
    let loss = p.loss(b);
    let list = p.tensors();
    // SAFETY: the tensors point at live buffers.
    let st = unsafe { lra_step(h.0, list.as_ptr(), list.len(), loss, 0.0, null_mut()) };
    assert_eq!(st, LRA_OK, "lra_step: {}", thread_error());
    loss
}

/// Reports f+ such that ρ = (f − f+)/(φ/2) is about `rho`.
fn report_rho(h: &Handle, loss: f64, rho: f64) -> lra_reeval_info {
    let (st, info) = h.report(loss - rho * 0.5 * h.phi());
    assert_eq!(st, LRA_OK, "lra_report_reeval: {}", thread_error());
    info
}

/// README: "Adaptation settings (factors, thresholds, bounds) are taken
/// from the handle, so they may be changed across a restart, but a saved η
/// outside the new [lr_min, lr_max] is rejected too." The bounds are
/// inclusive on both sides, a refused load changes nothing, and the new
/// settings already decide the restored pending step (f* and the scale cap
/// apply from the next step: the pending one was taken).
#[test]
fn changed_adaptation_settings_apply_from_the_restart() {
    let cfg = config(LRA_OPTIMIZER_SGD, 0.1);
    let a = Handle::new(&cfg);
    let mut p = Problem::new(&[9], 3);
    for b in 0..3 {
        let f = plain_step(&a, &mut p, b);
        assert_eq!(report_rho(&a, f, 2.0).decision, LRA_DECISION_RAISED);
    }
    let eta = a.lr();
    let f = plain_step(&a, &mut p, 3);
    let phi = a.phi();
    let ckpt = a.checkpoint();
    let below = f64::from_bits(eta.to_bits() - 1);
    let above = f64::from_bits(eta.to_bits() + 1);

    // η one ulp outside either bound: refused, the handle as it was.
    for (lo, hi, start) in [(0.0, below, 0.1), (above, f64::INFINITY, 1.0)] {
        let b = Handle::new(&lra_config {
            lr_min: lo,
            lr_max: hi,
            lr: start,
            ..cfg
        });
        plain_step(&b, &mut Problem::new(&[9], 4), 0);
        let before = b.checkpoint();
        assert_eq!(b.load(&ckpt), LRA_BAD_CHECKPOINT, "bounds [{lo}, {hi}]");
        assert_eq!(b.checkpoint(), before, "a refused load changed the handle");
    }

    // η exactly at both bounds: loads; the pending step's raise stays at
    // the bound and is reported as raised (README "Ratio test").
    let b = Handle::new(&lra_config {
        lr_min: eta,
        lr_max: eta,
        lr: eta,
        ..cfg
    });
    assert_eq!(b.load(&ckpt), LRA_OK, "{}", thread_error());
    let info = report_rho(&b, f, 2.0);
    assert_eq!(info.decision, LRA_DECISION_RAISED);
    assert_eq!(info.phi.to_bits(), phi.to_bits());
    assert_eq!(
        (
            info.lr_before.to_bits(),
            info.lr.to_bits(),
            b.lr().to_bits()
        ),
        (eta.to_bits(), eta.to_bits(), eta.to_bits())
    );

    // Another factor_up decides the restored pending step.
    let b = Handle::new(&lra_config {
        factor_up: 1.5,
        ..cfg
    });
    assert_eq!(b.load(&ckpt), LRA_OK);
    assert_eq!(report_rho(&b, f, 2.0).lr.to_bits(), (eta * 1.5).to_bits());

    // Another threshold_down and factor_down: the ρ that the uninterrupted
    // run keeps η at lowers it ×0.25 after the restart.
    let b = Handle::new(&lra_config {
        threshold_down: 0.9,
        factor_down: 0.25,
        ..cfg
    });
    assert_eq!(b.load(&ckpt), LRA_OK);
    let resumed = report_rho(&b, f, 0.8);
    let uninterrupted = report_rho(&a, f, 0.8);
    assert_eq!(uninterrupted.decision, LRA_DECISION_KEPT);
    assert_eq!(resumed.decision, LRA_DECISION_LOWERED);
    assert_eq!(resumed.rho.to_bits(), uninterrupted.rho.to_bits());
    assert_eq!(b.lr().to_bits(), (eta * 0.25).to_bits());

    // f* and the scale cap too: the restored step keeps its own s (1, the
    // fused step it was), the next step is a capped Polyak step.
    let b = Handle::new(&lra_config {
        f_star: 0.0,
        scale_max: 0.5,
        ..cfg
    });
    assert_eq!(b.load(&ckpt), LRA_OK);
    assert_eq!(report_rho(&b, f, 1.0).scale, 1.0);
    let f = plain_step(&b, &mut p, 4);
    assert_eq!(report_rho(&b, f, 1.0).scale, 0.5);
}

/// README: a load compares, bit for bit, the hyper-parameters the optimizer
/// reads, and only those. Each optimizer's handle loads a checkpoint saved
/// with another value of every field it does not read, and then continues
/// with the bits of the uninterrupted run (so the field really is unread)
/// and saves back to the very bytes it loaded (an unread field is written
/// as +0, and a checkpoint with anything else there is refused); a field it
/// reads is refused by name and changes nothing.
#[test]
fn a_load_compares_exactly_the_hyper_parameters_the_optimizer_reads() {
    type Field = (&'static str, fn(&mut lra_config));
    let fields: [Field; 6] = [
        ("momentum", |c| c.momentum = 0.9),
        ("alpha", |c| c.alpha = 0.9),
        ("beta1", |c| c.beta1 = 0.9),
        ("beta2", |c| c.beta2 = 0.99),
        ("eps", |c| c.eps = 1e-3),
        ("weight_decay", |c| c.weight_decay = 0.25),
    ];
    // From ALGORITHM.md's update rules, written out here independently of
    // the library's own list.
    let reads = |opt: lra_optimizer| -> &'static [&'static str] {
        match opt {
            LRA_OPTIMIZER_SGD => &["weight_decay"],
            LRA_OPTIMIZER_MOMENTUM | LRA_OPTIMIZER_NESTEROV => &["momentum", "weight_decay"],
            LRA_OPTIMIZER_ADAGRAD => &["eps", "weight_decay"],
            LRA_OPTIMIZER_RMSPROP => &["alpha", "eps", "weight_decay"],
            _ => &["beta1", "beta2", "eps", "weight_decay"],
        }
    };
    let run = |h: &Handle, p: &mut Problem, batches: std::ops::Range<u64>| {
        for b in batches {
            plain_step(h, p, b);
            let after = p.loss(b);
            assert_eq!(h.report(after).0, LRA_OK, "{}", thread_error());
        }
    };
    for opt in LRA_OPTIMIZER_SGD..=LRA_OPTIMIZER_ADAMW {
        let saved_cfg = config(opt, 0.05);
        for (index, (name, change)) in fields.into_iter().enumerate() {
            let mut cfg = saved_cfg;
            change(&mut cfg);
            let saver = Handle::new(&saved_cfg);
            let mut p = Problem::new(&[5, 12], 11);
            run(&saver, &mut p, 0..3);
            let ckpt = saver.checkpoint();
            let resumed = Handle::new(&cfg);
            let mut q = Problem::new(&[5, 12], 11);
            q.params.clone_from(&p.params);
            if reads(opt).contains(&name) {
                let before = resumed.checkpoint();
                assert_eq!(resumed.load(&ckpt), LRA_BAD_CHECKPOINT, "{opt} {name}");
                let msg = thread_error();
                assert!(msg.contains(name), "optimizer {opt}, {name}: '{msg}'");
                assert_eq!(
                    resumed.checkpoint(),
                    before,
                    "a refused load changed the handle"
                );
                continue;
            }
            assert_eq!(
                resumed.load(&ckpt),
                LRA_OK,
                "optimizer {opt} does not read {name}: {}",
                thread_error()
            );
            assert_eq!(resumed.checkpoint(), ckpt, "optimizer {opt}, {name}");
            // After magic, version and optimizer, the six in `fields` order.
            let at = 16 + 8 * index;
            assert_eq!(ckpt[at..at + 8], [0; 8], "optimizer {opt} wrote {name}");
            let mut forged = ckpt.clone();
            forged[at..at + 8].copy_from_slice(&0.9f64.to_le_bytes());
            support::reseal(&mut forged);
            let fresh = Handle::new(&cfg);
            assert_eq!(fresh.load(&forged), LRA_BAD_CHECKPOINT, "{opt} {name}");
            let msg = thread_error();
            assert!(
                msg.contains(name) && msg.contains("does not read"),
                "optimizer {opt}, {name}: '{msg}'"
            );
            run(&saver, &mut p, 3..7);
            run(&resumed, &mut q, 3..7);
            assert_eq!(
                (q.param_bits(), resumed.lr().to_bits()),
                (p.param_bits(), saver.lr().to_bits()),
                "optimizer {opt} with another {name} diverged after the restart"
            );
        }
    }
}

// ---- counters, last re-evaluation and last φ -------------------------------

/// One step of `kind` (batch 0); returns its status.
fn step_kind(h: &Handle, p: &mut Problem, kind: StepKind) -> lra_status {
    apply(h, p, &[Op::Step(kind)], 0)
}

/// Counters as [steps, applied, skipped, reevals, raised, lowered, kept,
/// reeval_skipped].
fn assert_counters(h: &Handle, want: [u64; 8], when: &str) {
    assert_eq!(counter_array(&h.counters()), want, "counters {when}");
}

/// README (ABI reference): `lra_get_counters` counts steps (skipped ones
/// included: "The schedule counts lra_step calls (skipped steps
/// included)"), applied steps (s = 0 counts: "applied counts it") and the
/// decisions; `lra_get_last_phi` is "φ of the latest step (NaN before the
/// first or after a skipped one)"; `lra_get_last_reeval` is "the latest
/// re-evaluation's result (LRA_CALL_ORDER before the first)". Walked
/// through every kind of step and report, and the refused ones, which
/// change nothing.
#[test]
fn counters_last_reeval_and_last_phi_after_every_kind_of_step() {
    let mut cfg = config(LRA_OPTIMIZER_SGD, 0.05);
    cfg.f_star = 0.0;
    cfg.scale_max = 1.0;
    let h = Handle::new(&cfg);
    let mut p = Problem::new(&[12, 3], 4);

    // Fresh: nothing to read back; a report is refused and counts nothing.
    assert_counters(&h, [0; 8], "fresh");
    assert_eq!(h.last().0, LRA_CALL_ORDER);
    assert!(h.phi().is_nan());
    assert_eq!(h.due().0, LRA_CALL_ORDER);
    let fresh = observe(&h, &p);
    assert_eq!(h.report(1.0).0, LRA_CALL_ORDER);
    assert_eq!(observe(&h, &p), fresh, "a refused report changed something");

    // An applied step: counted, φ readable, no re-evaluation yet.
    let f = p.loss(0);
    assert_eq!(step_kind(&h, &mut p, StepKind::Plain), LRA_OK);
    let phi1 = h.phi();
    assert!(phi1 > 0.0 && phi1.is_finite());
    assert_counters(&h, [1, 1, 0, 0, 0, 0, 0, 0], "after an applied step");
    assert_eq!(h.last().0, LRA_CALL_ORDER);
    assert_eq!(h.due(), (LRA_OK, 1));

    // Its report: raised; φ stays readable; the report is the last one.
    let info = report_rho(&h, f, 2.0);
    assert_eq!((info.decision, info.skip_reason), (LRA_DECISION_RAISED, 0));
    assert_eq!(info.phi.to_bits(), phi1.to_bits());
    assert!(info.scale > 0.0 && info.scale <= 1.0);
    assert_eq!(info.lr.to_bits(), h.lr().to_bits());
    assert_eq!(h.last(), (LRA_OK, support::info_bits(&info)));
    assert_eq!(h.phi().to_bits(), phi1.to_bits());
    assert_counters(&h, [1, 1, 0, 1, 1, 0, 0, 0], "after a raise");
    assert_eq!(h.due().0, LRA_CALL_ORDER);
    // Reported twice: refused, nothing changes.
    let reported = observe(&h, &p);
    assert_eq!(h.report(f).0, LRA_CALL_ORDER);
    assert_eq!(observe(&h, &p), reported);

    // Each cause of a skipped step: counted as a step, not as applied; φ
    // NaN; the last report stays until this step's own report, which is a
    // skipped decision naming the cause, with ρ NaN and η kept.
    let mut want = [1, 1, 0, 1, 1, 0, 0, 0];
    for (kind, reason) in [
        (StepKind::NanLoss, LRA_SKIP_NONFINITE_LOSS),
        (StepKind::NanGrad, LRA_SKIP_NONFINITE_GRAD),
        (StepKind::FoundInf, LRA_SKIP_FOUND_INF),
    ] {
        let params = p.param_bits();
        let eta = h.lr();
        let last = h.last();
        assert_eq!(step_kind(&h, &mut p, kind), LRA_OK);
        want[0] += 1;
        want[2] += 1;
        assert_counters(&h, want, &format!("after {kind:?}"));
        assert!(h.phi().is_nan(), "{kind:?}");
        assert_eq!(h.last(), last, "{kind:?}");
        assert_eq!(p.param_bits(), params, "{kind:?}");
        let (st, info) = h.report(0.5);
        assert_eq!(st, LRA_OK);
        assert_eq!(
            (info.decision, info.skip_reason),
            (LRA_DECISION_SKIPPED, reason)
        );
        assert!(info.phi.is_nan() && info.rho.is_nan(), "{kind:?}: {info:?}");
        assert_eq!((info.lr_before, info.lr, h.lr()), (eta, eta, eta));
        want[3] += 1;
        want[7] += 1;
        assert_counters(&h, want, &format!("after reporting {kind:?}"));
        assert_eq!(h.last(), (LRA_OK, support::info_bits(&info)));
        assert!(h.phi().is_nan());
    }

    // s = 0 (f_i = f* = 0): applied, the parameters stay, φ is the step's;
    // its report runs the ratio test like any other (ALGORITHM.md rule 6):
    // f+ = f_i gives ρ = 0, so η halves.
    let params = p.param_bits();
    let eta = h.lr();
    assert_eq!(step_kind(&h, &mut p, StepKind::AtFStar), LRA_OK);
    assert_eq!(p.param_bits(), params, "s = 0 moved the parameters");
    let phi = h.phi();
    assert!(phi > 0.0 && phi.is_finite());
    want[0] += 1;
    want[1] += 1;
    assert_counters(&h, want, "after s = 0");
    let (st, info) = h.report(0.0);
    assert_eq!(st, LRA_OK);
    assert_eq!(
        (info.decision, info.skip_reason, info.rho),
        (LRA_DECISION_LOWERED, LRA_SKIP_NONE, 0.0)
    );
    assert_eq!((info.scale, info.phi.to_bits()), (0.0, phi.to_bits()));
    assert_eq!(
        (info.lr_before, info.lr, h.lr()),
        (eta, eta * 0.5, eta * 0.5)
    );
    want[3] += 1;
    want[5] += 1;
    assert_counters(&h, want, "after reporting s = 0");

    // φ = 0 (zero gradient): applied; reported as φ ≤ 0.
    assert_eq!(step_kind(&h, &mut p, StepKind::ZeroGrad), LRA_OK);
    assert_eq!(h.phi(), 0.0);
    let (_, info) = h.report(0.0);
    assert_eq!(info.skip_reason, LRA_SKIP_NONPOSITIVE_PHI);
    want[0] += 1;
    want[1] += 1;
    want[3] += 1;
    want[7] += 1;
    assert_counters(&h, want, "after φ = 0");

    // A refused step changes nothing, with or without a step pending.
    let quiet = observe(&h, &p);
    assert_eq!(apply(&h, &mut p, &[Op::BadStep], 0), LRA_SIZE_MISMATCH);
    assert_eq!(observe(&h, &p), quiet);
    let f = p.loss(0);
    assert_eq!(step_kind(&h, &mut p, StepKind::Plain), LRA_OK);
    let pending = observe(&h, &p);
    assert_eq!(apply(&h, &mut p, &[Op::BadStep], 0), LRA_SIZE_MISMATCH);
    assert_eq!(
        observe(&h, &p),
        pending,
        "a refused step touched the pending one"
    );
    assert_eq!(report_rho(&h, f, 0.0).decision, LRA_DECISION_LOWERED);
    let f = plain_step(&h, &mut p, 0);
    assert_eq!(report_rho(&h, f, 1.0).decision, LRA_DECISION_KEPT);
    want[0] += 2;
    want[1] += 2;
    want[3] += 2;
    want[5] += 1;
    want[6] += 1;
    assert_counters(&h, want, "after lowered and kept");

    // A step left unreported is replaced by the next: the report judges
    // the latest step.
    plain_step(&h, &mut p, 1);
    let f = plain_step(&h, &mut p, 2);
    let phi = h.phi();
    assert_eq!(report_rho(&h, f, 2.0).phi.to_bits(), phi.to_bits());
    want[0] += 2;
    want[1] += 2;
    want[3] += 1;
    want[4] += 1;
    assert_counters(&h, want, "after an unreported step");

    // Guard off: a NaN gradient is applied (it poisons the parameters, as
    // in the plain optimizer), φ is NaN, the report says NONFINITE_PHI.
    let g = Handle::new(&lra_config {
        check_finite: 0,
        ..cfg
    });
    let mut q = Problem::new(&[12, 3], 4);
    assert_eq!(step_kind(&g, &mut q, StepKind::NanGrad), LRA_OK);
    assert!(g.phi().is_nan());
    assert!(q.params[0][0].is_nan());
    assert_counters(&g, [1, 1, 0, 0, 0, 0, 0, 0], "guard off, NaN gradient");
    let (_, info) = g.report(1.0);
    assert_eq!(info.skip_reason, LRA_SKIP_NONFINITE_PHI);
    assert_counters(&g, [1, 1, 0, 1, 0, 0, 0, 1], "guard off, reported");
}

// ---- schedules ----------------------------------------------------------------

/// Steps a 3-element problem `steps` times with `reports(index, due)`
/// deciding whether to report, and `kinds(index)` the kind of each step;
/// returns the indices `lra_should_reeval` called due.
fn due_indices(
    cfg: &lra_config,
    steps: u64,
    kinds: impl Fn(u64) -> StepKind,
    reports: impl Fn(u64, bool) -> bool,
) -> Vec<u64> {
    let h = Handle::new(cfg);
    let mut p = Problem::new(&[3], 5);
    let mut due = Vec::new();
    for i in 0..steps {
        assert_eq!(step_kind(&h, &mut p, kinds(i)), LRA_OK);
        let (st, d) = h.due();
        assert_eq!(st, LRA_OK);
        if d == 1 {
            due.push(i);
        }
        if reports(i, d == 1) {
            assert_eq!(h.report(p.loss(0)).0, LRA_OK);
        }
    }
    due
}

fn schedule(kind: lra_reeval_schedule, every: u32, growth: f64) -> lra_config {
    let mut c = config(LRA_OPTIMIZER_SGD, 0.05);
    c.reeval_schedule = kind;
    c.reeval_every = every;
    c.reeval_growth = growth;
    c
}

/// README "Fewer re-evaluations": the sweep's table lists the
/// re-evaluations of a 1140-step run per schedule (every 2, 4, 10: 570,
/// 285, 114; geometric 1.001, 1.01, 1.1: 917, 263, 50), and says r = 1.1
/// re-evaluates "every one of the first 9 steps". A caller that reports
/// exactly when told gets those counts from the C ABI.
#[test]
fn the_sweep_table_reevaluation_counts_follow_from_the_schedules() {
    for (cfg, want) in [
        (schedule(LRA_REEVAL_ALWAYS, 1, 1.1), 1140),
        (schedule(LRA_REEVAL_EVERY, 2, 1.1), 570),
        (schedule(LRA_REEVAL_EVERY, 4, 1.1), 285),
        (schedule(LRA_REEVAL_EVERY, 10, 1.1), 114),
        (schedule(LRA_REEVAL_GEOMETRIC, 1, 1.001), 917),
        (schedule(LRA_REEVAL_GEOMETRIC, 1, 1.01), 263),
        (schedule(LRA_REEVAL_GEOMETRIC, 1, 1.1), 50),
    ] {
        let due = due_indices(&cfg, 1140, |_| StepKind::Plain, |_, d| d);
        assert_eq!(due.len(), want, "{cfg:?}");
        if cfg.reeval_schedule == LRA_REEVAL_GEOMETRIC && cfg.reeval_growth == 1.1 {
            assert_eq!(due[..10], [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]);
        }
    }
}

/// README: G "multiplied by r after each re-evaluation", and "The schedule
/// counts lra_step calls (skipped steps included), not reports". What
/// grows G is a due step, whatever the caller reports: reporting every
/// step, only the due ones, none, or only the others gives the same due
/// steps; and a skipped step (NaN loss, found-inf flag, NaN gradient) on a
/// due position uses that position up and grows G like any other.
#[test]
fn geometric_gaps_grow_at_due_steps_whoever_reports_and_whatever_is_skipped() {
    let plain = |_| StepKind::Plain;
    for cfg in [
        schedule(LRA_REEVAL_GEOMETRIC, 1, 2.0),
        schedule(LRA_REEVAL_GEOMETRIC, 1, 1.5),
        schedule(LRA_REEVAL_EVERY, 3, 1.1),
    ] {
        let reference = due_indices(&cfg, 40, plain, |_, d| d);
        assert_eq!(due_indices(&cfg, 40, plain, |_, _| true), reference);
        assert_eq!(due_indices(&cfg, 40, plain, |_, _| false), reference);
        assert_eq!(due_indices(&cfg, 40, plain, |_, d| !d), reference);
        let skips = |i: u64| match i {
            3 => StepKind::NanLoss,
            7 => StepKind::FoundInf,
            8 => StepKind::NanGrad,
            _ => StepKind::Plain,
        };
        assert_eq!(due_indices(&cfg, 40, skips, |_, d| d), reference);
    }
    // The r = 2 sequence spelled out: 0, 1, 3 (the skipped step), 7 (the
    // found-inf step), 15, 31.
    let cfg = schedule(LRA_REEVAL_GEOMETRIC, 1, 2.0);
    assert_eq!(due_indices(&cfg, 40, plain, |_, d| d), [0, 1, 3, 7, 15, 31]);
}

/// The first steps skipped (found-inf flag, NaN gradient, NaN loss) leave
/// the optimizer state unallocated; a checkpoint then holds zeros for it.
/// Resumed at every position, the first applied step after them must still
/// be the optimizer's first (Momentum's m = g, Adam's t = 1).
#[test]
fn a_run_whose_first_steps_were_skipped_resumes_bit_exactly() {
    use After::*;
    use Op::*;
    use StepKind::*;
    let mut script = vec![
        Step(FoundInf),
        ReportIfDue,
        Step(NanGrad),
        Step(NanLoss),
        Report(Observed),
        Step(FoundInf),
    ];
    for _ in 0..5 {
        script.extend([Step(Plain), ReportIfDue, Step(Plain), Report(Worse)]);
    }
    for (what, optimizer) in [
        ("momentum, skipped first", LRA_OPTIMIZER_MOMENTUM),
        ("adam, skipped first", LRA_OPTIMIZER_ADAM),
    ] {
        let cfg = config(optimizer, 1e-2);
        resume_everywhere(what, &script, &cfg, &[37, 6], &[2], true, None);
    }
}

/// README leaves open what a checkpoint does under another schedule. What
/// the engine does (see the report; proposed README text): the schedule's
/// kind and parameters come from the handle, its position from the
/// checkpoint. The restored pending step keeps the answer it was given;
/// EVERY k counts the whole run's steps; GEOMETRIC continues from the
/// saved gap, which a handle of another kind never advances but carries
/// along from a checkpoint it loaded (so from a checkpoint that never
/// passed through a geometric handle it starts afresh: due now, G = 1).
#[test]
fn the_schedule_comes_from_the_handle_and_its_position_from_the_checkpoint() {
    let run = |cfg: &lra_config, from: &lra_config, saved_after: u64| -> Vec<u64> {
        let a = Handle::new(from);
        let mut p = Problem::new(&[5], 6);
        for b in 0..saved_after {
            plain_step(&a, &mut p, b);
        }
        let b = Handle::new(cfg);
        assert_eq!(b.load(&a.checkpoint()), LRA_OK, "{}", thread_error());
        assert_eq!(b.due(), a.due(), "the pending step's answer");
        let mut due = Vec::new();
        for i in saved_after..saved_after + 30 {
            plain_step(&b, &mut p, i);
            if b.due().1 == 1 {
                due.push(i);
            }
        }
        due
    };
    let always = schedule(LRA_REEVAL_ALWAYS, 1, 1.1);
    let every4 = schedule(LRA_REEVAL_EVERY, 4, 1.1);
    let geo2 = schedule(LRA_REEVAL_GEOMETRIC, 1, 2.0);
    let geo3 = schedule(LRA_REEVAL_GEOMETRIC, 1, 3.0);
    // EVERY 4 after 10 steps of ALWAYS: steps 12, 16, ... of the run.
    assert_eq!(run(&every4, &always, 10), [12, 16, 20, 24, 28, 32, 36]);
    // GEOMETRIC 2 after 10 steps of ALWAYS or EVERY 4: afresh at step 10.
    assert_eq!(run(&geo2, &always, 10), [10, 11, 13, 17, 25]);
    assert_eq!(run(&geo2, &every4, 10), [10, 11, 13, 17, 25]);
    // GEOMETRIC 3 after 8 steps of GEOMETRIC 2 (due 0, 1, 3, 7; next at
    // 15 with G = 16): 15, then gaps 16, 48.
    assert_eq!(run(&geo3, &geo2, 8), [15, 31]);
    // A handle of another kind carries a loaded position along unread, so
    // that load-then-save gives back the same bytes: EVERY 4 that loaded
    // GEOMETRIC 2's position (next due 15, G = 16) passes it on, and
    // GEOMETRIC 2 after it continues from there, not afresh.
    let mut p = Problem::new(&[5], 6);
    let a = Handle::new(&geo2);
    for i in 0..8 {
        plain_step(&a, &mut p, i);
    }
    let b = Handle::new(&every4);
    assert_eq!(b.load(&a.checkpoint()), LRA_OK, "{}", thread_error());
    assert!(
        b.checkpoint() == a.checkpoint(),
        "load then save changed the bytes"
    );
    for i in 8..10 {
        plain_step(&b, &mut p, i);
    }
    let c = Handle::new(&geo2);
    assert_eq!(c.load(&b.checkpoint()), LRA_OK, "{}", thread_error());
    let mut due = Vec::new();
    for i in 10..40 {
        plain_step(&c, &mut p, i);
        if c.due().1 == 1 {
            due.push(i);
        }
    }
    assert_eq!(due, [15, 31]);
}
