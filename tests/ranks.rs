//! Several ranks in one process: threads, each with its own engine, joined
//! by an in-process all-reduce that panics when the ranks disagree on a
//! collective's size or one of them never arrives (what hangs under MPI).
//! Sharded runs must take the same η decisions as one rank holding the whole
//! model, also with an empty shard, rank-local found-inf flags and failing
//! reductions. The MPI stage (scripts/stages/mpi.sh) runs the same
//! properties through the C ABI and `mpirun`; this test needs neither.

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the test owns and keeps alive across the call
// (host slices, or its own device buffers), and null or test-owned flags
// and streams.

use lra::backend::TensorDesc;
use lra::config::Config;
use lra::controller::{Decision, SkipReason};
use lra::optim::OptimizerKind;
use lra::{Engine, Status};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Long enough for a loaded CI machine; only reached when a rank skipped a
/// collective (a hang under MPI). Not a timing assertion.
const HANG: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Round {
    generation: u64,
    slots: Vec<Option<Vec<f64>>>,
    result: Option<std::result::Result<Vec<f64>, String>>,
    /// Ranks yet to read the finished round's result.
    readers: usize,
}

/// All-reduce (sum) among `p` threads, summing in rank order so every rank
/// gets the same bits.
struct Collective {
    p: usize,
    round: Mutex<Round>,
    cv: Condvar,
}

impl Collective {
    fn new(p: usize) -> Arc<Collective> {
        Arc::new(Collective {
            p,
            round: Mutex::new(Round {
                slots: vec![None; p],
                ..Round::default()
            }),
            cv: Condvar::new(),
        })
    }

    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, Round>,
        rank: usize,
        until: impl Fn(&Round) -> bool,
    ) -> std::sync::MutexGuard<'a, Round> {
        let (g, t) = self.cv.wait_timeout_while(g, HANG, |r| !until(r)).unwrap();
        assert!(
            !t.timed_out(),
            "rank {rank}: a collective the other ranks never joined (this would hang under MPI)"
        );
        g
    }

    fn all_reduce(&self, rank: usize, v: &mut [f64]) {
        let g = self.round.lock().unwrap();
        let mut g = self.wait(g, rank, |r| r.readers == 0);
        g.slots[rank] = Some(v.to_vec());
        let generation = g.generation;
        if g.slots.iter().all(Option::is_some) {
            let parts: Vec<Vec<f64>> = g.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            g.result = Some(if parts.iter().all(|x| x.len() == parts[0].len()) {
                let mut sum = vec![0.0; parts[0].len()];
                for x in &parts {
                    for (s, a) in sum.iter_mut().zip(x) {
                        *s += a;
                    }
                }
                Ok(sum)
            } else {
                let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
                Err(format!("ranks reduce different counts: {lens:?}"))
            });
            g.readers = self.p;
            g.generation += 1;
            self.cv.notify_all();
        } else {
            g = self.wait(g, rank, |r| r.generation != generation);
        }
        let res = g.result.clone().unwrap();
        g.readers -= 1;
        if g.readers == 0 {
            g.result = None;
            self.cv.notify_all();
        }
        drop(g);
        match res {
            Ok(sum) => v.copy_from_slice(&sum),
            Err(m) => panic!("rank {rank}: {m}"),
        }
    }
}

fn config(kind: OptimizerKind, lr: f64) -> Config {
    Config {
        lr,
        threads: 1,
        sharded: true,
        ..Config::defaults(kind)
    }
}

mod support;
use support::uniform as values;

/// Tensor sizes of the global model.
const SIZES: [usize; 5] = [300, 17, 1, 64, 5];

/// f = Σ ½ c (θ − t)² over the tensors; the batch of step k moves the
/// targets a little, so the loss is stochastic like a minibatch loss.
struct Shard {
    ids: Vec<usize>,
    theta: Vec<Vec<f32>>,
    grad: Vec<Vec<f32>>,
    c: Vec<Vec<f32>>,
    t: Vec<Vec<f32>>,
}

impl Shard {
    fn new(ids: Vec<usize>) -> Shard {
        let mk = |seed: u64, lo, hi| -> Vec<Vec<f32>> {
            ids.iter()
                .map(|&i| values(SIZES[i], seed + i as u64, lo, hi))
                .collect()
        };
        Shard {
            theta: mk(10, -1.0, 1.0),
            grad: ids.iter().map(|&i| vec![0.0; SIZES[i]]).collect(),
            c: mk(20, 0.5, 1.5),
            t: mk(30, -2.0, 2.0),
            ids,
        }
    }

    /// This shard's part of the loss at step `k` (and its gradient).
    fn loss(&mut self, k: usize, with_grad: bool) -> f64 {
        let shift = 0.1 * ((k % 5) as f32 - 2.0);
        let mut f = 0.0f64;
        for j in 0..self.ids.len() {
            for e in 0..self.theta[j].len() {
                let r = self.theta[j][e] - self.t[j][e] - shift;
                f += 0.5 * (self.c[j][e] * r * r) as f64;
                if with_grad {
                    self.grad[j][e] = self.c[j][e] * r;
                }
            }
        }
        f
    }

    fn tensors(&mut self) -> Vec<TensorDesc> {
        self.theta
            .iter_mut()
            .zip(&self.grad)
            .map(|(p, g)| TensorDesc::host_f32(p, g))
            .collect()
    }
}

/// What a rank saw.
#[derive(Debug, PartialEq)]
struct Trace {
    /// Per step: η after it, the decision, the skip reason.
    steps: Vec<(f64, Decision, SkipReason)>,
    /// Final parameters by global tensor index.
    params: Vec<(usize, Vec<f32>)>,
    reductions: i64,
}

#[derive(Clone, Copy)]
struct Faults {
    /// Step at which the owner of the last tensor alone raises found-inf.
    found_inf: Option<usize>,
    /// Step at which the owner of tensor 0 alone gets a NaN gradient.
    nan_grad: Option<usize>,
    /// Step with a NaN loss on every rank.
    nan_loss: Option<usize>,
}

const STEPS: usize = 14;

fn rank_main(
    rank: usize,
    owners: &[usize],
    cfg: Config,
    faults: Faults,
    coll: Arc<Collective>,
) -> Trace {
    let p = coll.p;
    let ids: Vec<usize> = (0..SIZES.len()).filter(|&i| owners[i] == rank).collect();
    let owns_last = ids.contains(&(SIZES.len() - 1));
    let owns_first = ids.contains(&0);
    let mut shard = Shard::new(ids);
    let mut e = Engine::new(cfg).unwrap();
    let calls = Arc::new(AtomicI64::new(0));
    let (c2, coll2) = (calls.clone(), coll.clone());
    e.set_reducer(Some(Box::new(move |v: &mut [f64]| {
        c2.fetch_add(1, Ordering::SeqCst);
        coll2.all_reduce(rank, v);
        Ok(())
    })));
    // The trainer's own collective: the full loss from the shards' parts.
    // With rank-local losses each rank reports P × its part, so lra's mean
    // over ranks is the full loss again.
    let full = |part: f64| {
        let mut v = [part];
        coll.all_reduce(rank, &mut v);
        v[0]
    };
    let report = |part: f64, full_loss: f64| {
        if cfg.loss_rank_local {
            part * p as f64
        } else {
            full_loss
        }
    };
    let mut steps = Vec::new();
    for k in 0..STEPS {
        let part = shard.loss(k, true);
        let mut f = report(part, full(part));
        let mut flag = 0.0f32;
        if faults.found_inf == Some(k) && owns_last {
            flag = 1.0;
        }
        if faults.nan_grad == Some(k) && owns_first {
            shard.grad[0][3] = f32::NAN;
        }
        if faults.nan_loss == Some(k) {
            f = f64::NAN;
        }
        let t = shard.tensors();
        unsafe { e.step(&t, f, 0.0, (&flag as *const f32).cast(), null_mut()) }.unwrap();
        let part = shard.loss(k, false);
        let r = e.report_reeval(report(part, full(part))).unwrap();
        steps.push((r.lr, r.decision, r.skip));
    }
    Trace {
        steps,
        params: shard.ids.iter().copied().zip(shard.theta).collect(),
        reductions: calls.load(Ordering::SeqCst),
    }
}

fn run(owners: &[usize], p: usize, cfg: Config, faults: Faults) -> Vec<Trace> {
    let coll = Collective::new(p);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..p)
            .map(|r| {
                let c = coll.clone();
                s.spawn(move || rank_main(r, owners, cfg, faults, c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// 3 ranks (rank 2 owns nothing) against 1 rank holding everything.
fn check_matches_one_rank(cfg: Config, faults: Faults, what: &str) {
    let one = run(&[0; 5], 1, cfg, faults).pop().unwrap();
    let owners = [1, 0, 1, 0, 1];
    let many = run(&owners, 3, cfg, faults);
    let changed = one
        .steps
        .iter()
        .filter(|s| matches!(s.1, Decision::Raised | Decision::Lowered))
        .count();
    assert!(
        changed > 0,
        "{what}: η never changed; the test would prove little"
    );
    for (rank, t) in many.iter().enumerate() {
        assert_eq!(t.steps, one.steps, "{what}: rank {rank} vs 1 rank");
        assert_eq!(
            t.reductions, many[0].reductions,
            "{what}: rank {rank} reduced a different number of times"
        );
        for (id, theta) in &t.params {
            let reference = &one.params[*id].1;
            for (a, b) in theta.iter().zip(reference) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{what}: tensor {id}: {a} on rank {rank}, {b} on 1 rank"
                );
            }
        }
    }
    assert!(
        many[2].params.is_empty(),
        "rank 2 should hold an empty shard"
    );
}

const ALL_FAULTS: Faults = Faults {
    found_inf: Some(3),
    nan_grad: Some(6),
    nan_loss: Some(9),
};

#[test]
fn sharded_fused_mode_matches_one_rank() {
    let cfg = config(OptimizerKind::Adam, 0.02);
    check_matches_one_rank(cfg, ALL_FAULTS, "fused, guard on");
    let one = run(&[0; 5], 1, cfg, ALL_FAULTS).pop().unwrap();
    assert_eq!(one.steps[3].2, SkipReason::FoundInf);
    assert_eq!(one.steps[6].2, SkipReason::NonfiniteGrad);
    assert_eq!(one.steps[9].2, SkipReason::NonfiniteLoss);
}

#[test]
fn sharded_fused_mode_with_rank_local_losses_and_no_guard_matches_one_rank() {
    let mut cfg = config(OptimizerKind::Momentum, 0.05);
    cfg.loss_rank_local = true;
    cfg.check_finite = false;
    let faults = Faults {
        found_inf: None,
        nan_grad: None,
        nan_loss: Some(9),
    };
    check_matches_one_rank(cfg, faults, "fused, rank-local losses, guard off");
}

#[test]
fn sharded_polyak_mode_matches_one_rank() {
    let mut cfg = config(OptimizerKind::Sgd, 0.05);
    cfg.settings.f_star = 0.0;
    check_matches_one_rank(cfg, ALL_FAULTS, "two-pass, guard on");
    // Guard off: the rank-local found-inf flag still joins the pre-write
    // reduction, so every rank skips.
    cfg.check_finite = false;
    let faults = Faults {
        nan_grad: None,
        ..ALL_FAULTS
    };
    check_matches_one_rank(cfg, faults, "two-pass, guard off");
}

#[test]
fn rank_local_found_inf_with_guard_off_keeps_eta_identical() {
    // Fused mode without the guard has no pre-write collective: the flag
    // stays rank-local, but the re-evaluation's φ sum is poisoned so that
    // every rank skips the ratio test.
    let mut cfg = config(OptimizerKind::Adam, 0.02);
    cfg.check_finite = false;
    let faults = Faults {
        found_inf: Some(3),
        nan_grad: None,
        nan_loss: None,
    };
    let traces = run(&[1, 0, 1, 0, 1], 3, cfg, faults);
    for t in &traces {
        assert_eq!(t.steps[3].1, Decision::Skipped);
        let lrs: Vec<f64> = t.steps.iter().map(|s| s.0).collect();
        let lrs0: Vec<f64> = traces[0].steps.iter().map(|s| s.0).collect();
        assert_eq!(lrs, lrs0);
    }
    assert_eq!(
        traces[1].steps[3].2,
        SkipReason::FoundInf,
        "the flag's owner"
    );
    assert_eq!(
        traces[0].steps[3].2,
        SkipReason::NonfinitePhi,
        "another rank"
    );
}

#[test]
fn failing_reduction_fails_every_rank_and_changes_nothing() {
    let p = 2;
    let coll = Collective::new(p);
    let mut cfg = config(OptimizerKind::Adam, 0.02);
    cfg.loss_rank_local = true;
    std::thread::scope(|s| {
        for rank in 0..p {
            let coll = coll.clone();
            s.spawn(move || {
                let mut shard = Shard::new((0..SIZES.len()).filter(|i| i % p == rank).collect());
                let mut e = Engine::new(cfg).unwrap();
                let calls = Arc::new(AtomicI64::new(0));
                let fail_at = Arc::new(AtomicI64::new(-1));
                let (c2, f2, coll2) = (calls.clone(), fail_at.clone(), coll.clone());
                e.set_reducer(Some(Box::new(move |v: &mut [f64]| {
                    let call = c2.fetch_add(1, Ordering::SeqCst);
                    if call == f2.load(Ordering::SeqCst) {
                        // Every rank fails this call, without communicating.
                        lra::fail!(ReductionFailed, "injected failure at call {call}");
                    }
                    coll2.all_reduce(rank, v);
                    Ok(())
                })));
                let checkpoint = |e: &mut Engine| {
                    let mut b = vec![0u8; e.state_size().unwrap()];
                    e.save_state(&mut b).unwrap();
                    b
                };
                let mut failures = 0;
                // Runs `$op` with the `$nth` reduction from now failing on
                // every rank; it must fail with ReductionFailed and change
                // neither the engine's state nor the parameters.
                macro_rules! expect_failure {
                    ($nth:expr, $op:expr, $k:expr) => {{
                        let before = (checkpoint(&mut e), shard.theta.clone());
                        fail_at.store(calls.load(Ordering::SeqCst) + $nth, Ordering::SeqCst);
                        let status = $op.unwrap_err().status;
                        fail_at.store(-1, Ordering::SeqCst);
                        assert_eq!(status, Status::ReductionFailed, "rank {rank} step {}", $k);
                        assert!(
                            (checkpoint(&mut e), shard.theta.clone()) == before,
                            "rank {rank} step {}: a failed reduction changed something",
                            $k
                        );
                        failures += 1;
                    }};
                }
                for k in 0..6 {
                    let f = shard.loss(k, true);
                    let t = shard.tensors();
                    // Per step: [f, 1] and [non-finite, found-inf, 0] in
                    // `step`, [φ, f+, 1] in `report_reeval`.
                    if k == 2 {
                        expect_failure!(0, unsafe { e.step(&t, f, 0.0, null(), null_mut()) }, k);
                    }
                    if k == 3 {
                        expect_failure!(1, unsafe { e.step(&t, f, 0.0, null(), null_mut()) }, k);
                    }
                    unsafe { e.step(&t, f, 0.0, null(), null_mut()) }.unwrap();
                    let after = shard.loss(k, false);
                    if k == 4 {
                        expect_failure!(0, e.report_reeval(after), k);
                    }
                    let r = e.report_reeval(after).unwrap();
                    assert_ne!(r.decision, Decision::Skipped, "rank {rank} step {k}");
                }
                assert_eq!(failures, 3, "rank {rank}");
            });
        }
    });
}
