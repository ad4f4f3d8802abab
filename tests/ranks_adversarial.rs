//! The reduction callback's contract, seen from one rank: which values lra
//! hands to the registered cross-rank sum in each configuration (the table
//! in the README's "Distributed training" section), and that calls lra
//! refuses never reach it. A call that fails on one rank after entering a
//! collective, or that skips one the other ranks enter, hangs them under
//! MPI; `tests/ranks.rs` runs several ranks against each other, this file
//! pins what a single rank sends.

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the test owns and keeps alive across the call
// (host slices, or its own device buffers), and null or test-owned flags
// and streams.

use lra::backend::TensorDesc;
use lra::config::Config;
use lra::controller::Decision;
use lra::optim::OptimizerKind;
use lra::{Engine, Status};
use std::ffi::c_void;
use std::ptr::{null, null_mut};
use std::sync::{Arc, Mutex};

const LR: f64 = 0.1;

/// The vectors the engine passed to its reduction, in call order. The
/// reduction itself is the identity (one rank).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Vec<f64>>>>);

impl Log {
    fn take(&self) -> Vec<Vec<f64>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn engine(sharded: bool, loss_rank_local: bool, guard: bool, f_star: f64) -> (Engine, Log) {
    engine_of(OptimizerKind::Sgd, sharded, loss_rank_local, guard, f_star)
}

fn engine_of(
    kind: OptimizerKind,
    sharded: bool,
    loss_rank_local: bool,
    guard: bool,
    f_star: f64,
) -> (Engine, Log) {
    let mut cfg = Config {
        lr: LR,
        threads: 1,
        sharded,
        loss_rank_local,
        check_finite: guard,
        ..Config::defaults(kind)
    };
    cfg.settings.f_star = f_star;
    let mut e = Engine::new(cfg).unwrap();
    let log = Log::default();
    let l = log.clone();
    e.set_reducer(Some(Box::new(move |v: &mut [f64]| {
        l.0.lock().unwrap().push(v.to_vec());
        Ok(())
    })));
    (e, log)
}

/// One rank's shard: θ and g (SGD, so the direction is g and the local
/// φ = η·Σg²).
struct Shard {
    theta: Vec<f32>,
    grad: Vec<f32>,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            theta: vec![1.0, 2.0, 3.0, 4.0],
            grad: vec![0.5, -1.0, 0.25, 2.0],
        }
    }
    fn tensors(&mut self) -> Vec<TensorDesc> {
        vec![TensorDesc::host_f32(&mut self.theta, &self.grad)]
    }
    fn phi(&self, lr: f64) -> f64 {
        lr * self
            .grad
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
    }
}

/// Equal, NaN equal to NaN, finite values within 1e-12 relative.
fn assert_calls(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
    let same = got.len() == want.len()
        && got.iter().zip(want).all(|(a, b)| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
                })
        });
    assert!(same, "{what}: the reduction got {got:?}, want {want:?}");
}

const F: f64 = 2.0;
const F_PLUS: f64 = 1.5;

/// One step and its re-evaluation; returns the reductions of each.
fn step_and_reeval(
    e: &mut Engine,
    log: &Log,
    shard: &mut Shard,
    loss: f64,
    found_inf: f32,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let t = shard.tensors();
    unsafe { e.step(&t, loss, 0.0, (&found_inf as *const f32).cast(), null_mut()) }.unwrap();
    let in_step = log.take();
    e.report_reeval(F_PLUS).unwrap();
    (in_step, log.take())
}

#[test]
fn each_configuration_reduces_what_the_readme_table_says() {
    let nan = f64::NAN;
    let phi = Shard::new().phi(LR);
    // (sharded, rank-local losses, guard, f*, loss, found-inf, NaN gradient,
    //  reductions in lra_step, reductions in lra_report_reeval)
    type Case = (
        bool,
        bool,
        bool,
        f64,
        f64,
        f32,
        bool,
        Vec<Vec<f64>>,
        Vec<Vec<f64>>,
    );
    let cases: Vec<(&str, Case)> = vec![
        (
            "replicated, rank-local losses",
            (
                false,
                true,
                true,
                nan,
                F,
                0.0,
                false,
                vec![vec![F, 1.0]],
                vec![vec![F_PLUS, 1.0]],
            ),
        ),
        (
            "replicated, global losses: nothing to reduce",
            (false, false, true, nan, F, 0.0, false, vec![], vec![]),
        ),
        (
            "sharded fused, guard on",
            (
                true,
                false,
                true,
                nan,
                F,
                0.0,
                false,
                vec![vec![0.0, 0.0, 0.0]],
                vec![vec![phi]],
            ),
        ),
        (
            "sharded fused, guard off: no pre-write sum",
            (
                true,
                false,
                false,
                nan,
                F,
                0.0,
                false,
                vec![],
                vec![vec![phi]],
            ),
        ),
        (
            "sharded two-pass (f* known)",
            (
                true,
                false,
                true,
                0.0,
                F,
                0.0,
                false,
                vec![vec![0.0, 0.0, phi]],
                vec![],
            ),
        ),
        (
            "sharded fused, rank-local losses",
            (
                true,
                true,
                true,
                nan,
                F,
                0.0,
                false,
                vec![vec![F, 1.0], vec![0.0, 0.0, 0.0]],
                vec![vec![phi, F_PLUS, 1.0]],
            ),
        ),
        (
            "sharded fused, rank-local losses, this rank's found-inf flag",
            (
                true,
                true,
                true,
                nan,
                F,
                1.0,
                false,
                vec![vec![F, 1.0], vec![0.0, 1.0, 0.0]],
                vec![vec![nan, F_PLUS, 1.0]],
            ),
        ),
        (
            "sharded fused, guard off, this rank's found-inf flag: φ poisoned",
            (
                true,
                false,
                false,
                nan,
                F,
                1.0,
                false,
                vec![],
                vec![vec![nan]],
            ),
        ),
        (
            "sharded fused, rank-local losses, a NaN gradient here",
            (
                true,
                true,
                true,
                nan,
                F,
                0.0,
                true,
                vec![vec![F, 1.0], vec![1.0, 0.0, 0.0]],
                vec![vec![nan, F_PLUS, 1.0]],
            ),
        ),
        (
            "sharded fused, rank-local losses, NaN loss: known before the pre-write sum",
            (
                true,
                true,
                true,
                nan,
                nan,
                0.0,
                false,
                vec![vec![nan, 1.0]],
                vec![vec![nan, F_PLUS, 1.0]],
            ),
        ),
    ];
    for (what, (sharded, local, guard, f_star, loss, flag, nan_grad, in_step, in_reeval)) in cases {
        let (mut e, log) = engine(sharded, local, guard, f_star);
        let mut shard = Shard::new();
        if nan_grad {
            shard.grad[1] = f32::NAN;
        }
        let (s, r) = step_and_reeval(&mut e, &log, &mut shard, loss, flag);
        assert_calls(&s, &in_step, &format!("{what}: lra_step"));
        assert_calls(&r, &in_reeval, &format!("{what}: lra_report_reeval"));
    }
}

/// Each call sums this step's values, never a running total: the second
/// step's φ part is η₂·Σg₂² alone.
#[test]
fn every_reduction_carries_the_current_step_only() {
    let (mut e, log) = engine(true, true, true, f64::NAN);
    let mut shard = Shard::new();
    let (_, first) = step_and_reeval(&mut e, &log, &mut shard, F, 0.0);
    assert_eq!(first.len(), 1);
    let lr2 = e.lr();
    assert_ne!(
        lr2, LR,
        "η should have changed after the first re-evaluation"
    );
    shard.grad = vec![0.125, 0.25, -0.5, 1.0];
    let (in_step, second) = step_and_reeval(&mut e, &log, &mut shard, 3.0, 0.0);
    assert_calls(
        &in_step,
        &[vec![3.0, 1.0], vec![0.0, 0.0, 0.0]],
        "second lra_step",
    );
    assert_calls(
        &second,
        &[vec![shard.phi(lr2), F_PLUS, 1.0]],
        "second lra_report_reeval",
    );
}

/// Everything lra refuses is refused before the first collective, so a
/// rank that makes the mistake fails alone instead of leaving the others
/// in a collective it never joins with a different count (its own failure
/// is then fatal, but it does not corrupt the others' sums). Queries,
/// checkpoints and η changes never reduce at all.
#[test]
fn refused_calls_never_enter_the_collective() {
    for f_star in [f64::NAN, 0.0] {
        let (mut e, log) = engine(true, true, true, f_star);
        let mut shard = Shard::new();
        let what = if f_star.is_nan() { "fused" } else { "two-pass" };

        let err = e.report_reeval(F_PLUS).unwrap_err();
        assert_eq!(err.status, Status::CallOrder, "{what}");
        assert!(e.should_reeval().is_err(), "{what}");

        let t = shard.tensors();
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let err = unsafe { e.step(&t, F, bad, null(), null_mut()) }.unwrap_err();
            assert_eq!(err.status, Status::InvalidArgument, "{what}: obs_var {bad}");
        }
        let misaligned = 2usize as *const c_void;
        let err = unsafe { e.step(&t, F, 0.0, misaligned, null_mut()) }.unwrap_err();
        assert_eq!(err.status, Status::InvalidArgument, "{what}: found_inf");
        assert_calls(&log.take(), &[], &format!("{what}: refused first calls"));

        // The first step fixes the layout; then a different one is refused.
        unsafe { e.step(&t, F, 0.0, null(), null_mut()) }.unwrap();
        assert!(!log.take().is_empty(), "{what}: a valid step reduces");
        let mut more = vec![0.0f32; 5];
        let g5 = vec![1.0f32; 5];
        let wrong_count = vec![t[0], TensorDesc::host_f32(&mut more, &g5)];
        let wrong_size = vec![TensorDesc::host_f32(&mut more, &g5)];
        for (name, tensors) in [("count", &wrong_count), ("size", &wrong_size)] {
            let err = unsafe { e.step(tensors, F, 0.0, null(), null_mut()) }.unwrap_err();
            assert_eq!(err.status, Status::SizeMismatch, "{what}: tensor {name}");
        }

        // Neither queries nor checkpoints nor η changes reduce.
        assert!(e.should_reeval().unwrap(), "{what}");
        let _ = e.last_phi().unwrap();
        let _ = e.counters().unwrap();
        let mut ckpt = vec![0u8; e.state_size().unwrap()];
        e.save_state(&mut ckpt).unwrap();
        e.load_state(&ckpt).unwrap();
        e.set_lr(0.05).unwrap();
        assert_calls(
            &log.take(),
            &[],
            &format!("{what}: refused calls and queries"),
        );

        let r = e.report_reeval(F_PLUS).unwrap();
        assert_ne!(r.decision, Decision::Skipped, "{what}");
        assert_eq!(
            log.take().len(),
            1,
            "{what}: the re-evaluation reduces once"
        );
    }
}

/// Optimizer state this rank cannot allocate (memory pressure differs
/// between ranks) fails its first step before any collective: the loss sum
/// of rank-local losses used to come first, so the rank had joined one
/// collective when it returned LRA_OUT_OF_MEMORY, and the retry the status
/// invites met the other ranks in their next one (a different quantity of
/// the same size: η drifted apart with every call returning LRA_OK).
#[test]
#[cfg_attr(
    miri,
    ignore = "Miri stops at an allocation it cannot make instead of failing it"
)]
fn memory_a_rank_cannot_have_fails_its_step_before_any_collective() {
    for (sharded, local) in [(false, true), (true, true), (true, false)] {
        let what = format!("sharded {sharded}, rank-local losses {local}");
        let (mut e, log) = engine_of(OptimizerKind::Adam, sharded, local, true, f64::NAN);
        // 2^58 f16 elements at made-up addresses, never touched: Adam's
        // two f32 slots would need 2^61 bytes.
        let numel = 1usize << 58;
        let huge = [TensorDesc {
            param: 0x1000 as *mut c_void,
            grad: (0x2000 + 2 * numel) as *const c_void,
            numel,
            dtype: lra::optim::DType::F16,
        }];
        let err = unsafe { e.step(&huge, F, 0.0, null(), null_mut()) }.unwrap_err();
        assert_eq!(err.status, Status::OutOfMemory, "{what}: {}", err.message);
        assert_calls(&log.take(), &[], &format!("{what}: the failed step"));
        // The retry reduces exactly what a first step reduces.
        let mut shard = Shard::new();
        let (in_step, _) = step_and_reeval(&mut e, &log, &mut shard, F, 0.0);
        let (mut fresh, fresh_log) = engine_of(OptimizerKind::Adam, sharded, local, true, f64::NAN);
        let (want, _) = step_and_reeval(&mut fresh, &fresh_log, &mut Shard::new(), F, 0.0);
        assert_calls(&in_step, &want, &format!("{what}: the retried step"));
    }
}

/// A sharded or rank-local-loss handle without a registered reduction is
/// refused before anything happens, on every rank alike, instead of
/// deciding η from this rank's part alone.
#[test]
fn a_distributed_configuration_without_a_reduction_is_refused() {
    for (sharded, local) in [(true, false), (false, true), (true, true)] {
        let cfg = Config {
            lr: LR,
            threads: 1,
            sharded,
            loss_rank_local: local,
            ..Config::defaults(OptimizerKind::Sgd)
        };
        let mut e = Engine::new(cfg).unwrap();
        let mut shard = Shard::new();
        let t = shard.tensors();
        let err = unsafe { e.step(&t, F, 0.0, null(), null_mut()) }.unwrap_err();
        assert_eq!(
            err.status,
            Status::CallOrder,
            "sharded {sharded}, rank-local {local}"
        );
        assert_eq!(shard.theta, Shard::new().theta, "nothing may move");
    }
}

/// A checkpoint taken while a step awaits re-evaluation, restored into a
/// new handle, saves the same bytes again.
#[test]
fn a_restored_pending_step_saves_the_same_checkpoint() {
    let (mut e, log) = engine(true, true, true, f64::NAN);
    let mut shard = Shard::new();
    let t = shard.tensors();
    unsafe { e.step(&t, F, 0.0, null(), null_mut()) }.unwrap();
    let mut a = vec![0u8; e.state_size().unwrap()];
    e.save_state(&mut a).unwrap();
    let (mut f, _) = engine(true, true, true, f64::NAN);
    f.load_state(&a).unwrap();
    let mut b = vec![0u8; f.state_size().unwrap()];
    f.save_state(&mut b).unwrap();
    assert!(a == b, "save, load, save: the checkpoints differ");
    log.take();
}
