//! Conformance of the scalar algorithm and the optimizer directions to the
//! contract (`ALGORITHM.md`), checked against references written from the
//! contract's text, not from `src/`: the directions table in f64, the step
//! scale, the ratio test, skips, η's bounds and defaults. Only what no
//! other test pins is here (`tests/engine.rs`, `tests/behaviour.rs`,
//! `tests/conformance_torch.rs`, `tests/schedules.rs` and the unit tests
//! of `src/controller.rs` pin the rest). Everything runs through the C ABI
//! (`lra::ffi`) except where the optimizer state itself is compared, which
//! uses `Engine::optimizer_state`.

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the test owns and keeps alive across the call
// (host slices, or its own device buffers), and null or test-owned flags
// and streams.

use lra::backend::TensorDesc;
use lra::config::Config;
use lra::controller::SkipReason;
use lra::ffi::*;
use lra::optim::OptimizerKind;
use lra::Engine;
use std::ptr::{null, null_mut};

mod support;
use support::Handle;

const ALL: [u32; 7] = [
    LRA_OPTIMIZER_SGD,
    LRA_OPTIMIZER_MOMENTUM,
    LRA_OPTIMIZER_NESTEROV,
    LRA_OPTIMIZER_ADAGRAD,
    LRA_OPTIMIZER_RMSPROP,
    LRA_OPTIMIZER_ADAM,
    LRA_OPTIMIZER_ADAMW,
];

fn config(optimizer: u32) -> lra_config {
    let mut c = std::mem::MaybeUninit::<lra_config>::uninit();
    // SAFETY: lra_config_init fills the whole struct.
    unsafe {
        lra_config_init(c.as_mut_ptr(), optimizer);
        c.assume_init()
    }
}

fn no_info() -> lra_reeval_info {
    lra_reeval_info {
        phi: 0.0,
        rho: 0.0,
        scale: 0.0,
        lr_before: 0.0,
        lr: 0.0,
        decision: u32::MAX,
        skip_reason: u32::MAX,
    }
}

impl Handle {
    /// `lra_step_ex` over `params`/`grads` (one f32 tensor each), with the
    /// found-inf flag when `found_inf` is given.
    fn step_ex(
        &self,
        params: &mut [Vec<f32>],
        grads: &[Vec<f32>],
        loss: f64,
        obs_var: f64,
        found_inf: Option<f32>,
    ) {
        let t: Vec<lra_tensor> = params
            .iter_mut()
            .zip(grads)
            .map(|(p, g)| {
                assert_eq!(p.len(), g.len());
                lra_tensor {
                    param: p.as_mut_ptr().cast(),
                    grad: g.as_ptr().cast(),
                    numel: p.len() as u64,
                    dtype: LRA_DTYPE_F32,
                    reserved: 0,
                }
            })
            .collect();
        let flag = found_inf.unwrap_or(0.0);
        let flag_ptr: *const f32 = if found_inf.is_some() { &flag } else { null() };
        // SAFETY: the tensors point at live buffers of the stated sizes.
        let st = unsafe {
            lra_step_ex(
                self.0,
                t.as_ptr(),
                t.len(),
                loss,
                obs_var,
                flag_ptr,
                null_mut(),
            )
        };
        assert_eq!(st, LRA_OK, "lra_step_ex: {}", self.error());
    }

    fn step(&self, params: &mut [Vec<f32>], grads: &[Vec<f32>], loss: f64, obs_var: f64) {
        self.step_ex(params, grads, loss, obs_var, None)
    }

    fn report(&self, loss_after: f64) -> lra_reeval_info {
        let mut info = no_info();
        // SAFETY: live handle, valid out pointer.
        let st = unsafe { lra_report_reeval(self.0, loss_after, &mut info) };
        assert_eq!(st, LRA_OK, "lra_report_reeval: {}", self.error());
        info
    }
}

/// Deterministic values in [lo, hi).
fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    support::uniform(n, seed, lo, hi)
}

// ---- the directions table, in f64, from ALGORITHM.md ------------------------

/// The wrapped optimizer as ALGORITHM.md's table states it (PyTorch
/// semantics; state starts at 0; t counts applied steps from 1), over one
/// flat vector of all tensors' elements.
struct Table {
    kind: u32,
    beta: f64,
    alpha: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    wd: f64,
    m: Vec<f64>,
    s: Vec<f64>,
    t: i32,
}

impl Table {
    fn new(c: &lra_config, n: usize) -> Table {
        Table {
            kind: c.optimizer,
            beta: c.momentum,
            alpha: c.alpha,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            wd: c.weight_decay,
            m: vec![0.0; n],
            s: vec![0.0; n],
            t: 0,
        }
    }

    /// `W g` at learning rate 1 for parameters `theta` and raw gradient
    /// `g`; advances the state. Coupled decay (g + λθ) for every optimizer
    /// but AdamW, whose λθ is added to the direction.
    fn direction(&mut self, theta: &[f64], g: &[f64]) -> Vec<f64> {
        self.t += 1;
        let t = self.t;
        (0..g.len())
            .map(|i| {
                let gw = if self.kind == LRA_OPTIMIZER_ADAMW {
                    g[i]
                } else {
                    g[i] + self.wd * theta[i]
                };
                let (m, s) = (&mut self.m[i], &mut self.s[i]);
                match self.kind {
                    LRA_OPTIMIZER_SGD => gw,
                    LRA_OPTIMIZER_MOMENTUM => {
                        *m = self.beta * *m + gw;
                        *m
                    }
                    LRA_OPTIMIZER_NESTEROV => {
                        *m = self.beta * *m + gw;
                        gw + self.beta * *m
                    }
                    LRA_OPTIMIZER_ADAGRAD => {
                        *s += gw * gw;
                        gw / (s.sqrt() + self.eps)
                    }
                    LRA_OPTIMIZER_RMSPROP => {
                        *s = self.alpha * *s + (1.0 - self.alpha) * gw * gw;
                        gw / (s.sqrt() + self.eps)
                    }
                    _ => {
                        *m = self.beta1 * *m + (1.0 - self.beta1) * gw;
                        *s = self.beta2 * *s + (1.0 - self.beta2) * gw * gw;
                        let d = (*m / (1.0 - self.beta1.powi(t)))
                            / ((*s / (1.0 - self.beta2.powi(t))).sqrt() + self.eps);
                        if self.kind == LRA_OPTIMIZER_ADAMW {
                            d + self.wd * theta[i]
                        } else {
                            d
                        }
                    }
                }
            })
            .collect()
    }
}

fn flat(v: &[Vec<f32>]) -> Vec<f64> {
    v.iter().flatten().map(|&x| x as f64).collect()
}

/// Table rows 1–2 and the defaults' neighbours: for every optimizer, with
/// and without weight decay and with non-default hyper-parameters (so each
/// configuration field is seen to reach the math), four steps over two
/// tensors follow the f64 table within f32 rounding, and φ = g·v with v =
/// η·W g, g the RAW gradient (not g + λθ, not a momentum buffer), summed
/// over both tensors. `tests/conformance_torch.rs` covers the defaults
/// without coupled decay against torch; this covers the rest.
#[test]
fn directions_and_phi_follow_the_table_with_coupled_and_decoupled_decay() {
    let sizes = [5usize, 3];
    let lr = 0.05;
    for kind in ALL {
        for wd in [0.0, 0.1] {
            let mut c = config(kind);
            c.lr = lr;
            c.momentum = 0.7;
            c.alpha = 0.9;
            c.beta1 = 0.8;
            c.beta2 = 0.99;
            c.eps = 1e-3;
            c.weight_decay = wd;
            c.num_threads = 1;
            let h = Handle::create(&c);
            let mut params: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, 10 + i as u64, -1.0, 1.0))
                .collect();
            let mut table = Table::new(&c, sizes.iter().sum());
            let mut theta = flat(&params);
            for step in 0..4u64 {
                // Gradient scales change per step so every state matters.
                let scale = 0.5 * (1.0 + step as f32);
                let grads: Vec<Vec<f32>> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| values(n, 100 * step + i as u64, -scale, scale))
                    .collect();
                let g = flat(&grads);
                let d = table.direction(&theta, &g);
                let phi_want: f64 = lr * g.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>();
                // Neither the decayed gradient nor the direction itself.
                let phi_decayed: f64 = lr
                    * g.iter()
                        .zip(&theta)
                        .zip(&d)
                        .map(|((gi, th), di)| {
                            (if kind == LRA_OPTIMIZER_ADAMW {
                                *gi
                            } else {
                                gi + wd * th
                            }) * di
                        })
                        .sum::<f64>();
                for (x, di) in theta.iter_mut().zip(&d) {
                    *x -= lr * di;
                }
                h.step(&mut params, &grads, 1.0, 0.0);
                let got = flat(&params);
                let what = format!("optimizer {kind} wd {wd} step {step}");
                for (i, (a, b)) in got.iter().zip(&theta).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{what}: θ[{i}] = {a}, the table gives {b}"
                    );
                }
                let phi = h.phi();
                assert!(
                    (phi - phi_want).abs() <= 1e-5 * phi_want.abs(),
                    "{what}: φ = {phi}, the table gives g·v = {phi_want}"
                );
                if wd != 0.0 && kind != LRA_OPTIMIZER_ADAMW {
                    assert!(
                        (phi_decayed - phi_want).abs() > 1e-3 * phi_want.abs(),
                        "{what}: the case does not tell raw from decayed g"
                    );
                }
            }
            assert_eq!(h.lr(), lr, "{kind}: no report, η unchanged");
        }
    }
}

// ---- the optimizer state does not see s -----------------------------------

fn engine(kind: OptimizerKind, lr: f64, f_star: f64) -> Engine {
    let mut cfg = Config {
        lr,
        threads: 1,
        ..Config::defaults(kind)
    };
    cfg.settings.f_star = f_star;
    Engine::new(cfg).unwrap()
}

fn descs(params: &mut [Vec<f32>], grads: &[Vec<f32>]) -> Vec<TensorDesc> {
    params
        .iter_mut()
        .zip(grads)
        .map(|(p, g)| TensorDesc::host_f32(p, g))
        .collect()
}

/// Step 1 of the contract: the state advances exactly as in the plain
/// optimizer and is never rescaled by s. For every optimizer, a handle
/// whose steps are scaled (R > 0 with f* unknown; Polyak with f* known,
/// including a step with s = 0 because f_i < f*) holds, after every step,
/// the very bits of state (moments, accumulators, bias powers, t) of a
/// handle taking the plain steps on the same gradients. With s = 0 the
/// parameters stay where they were; the step still counts as applied.
#[test]
fn the_state_advances_as_the_plain_optimizer_whatever_the_scale() {
    for kind in OptimizerKind::ALL {
        // (f*, per step: (loss, R)) for the scaled handle.
        let cases: [(f64, [(f64, f64); 3]); 2] = [
            (f64::NAN, [(1.0, 0.3), (1.0, 0.0), (1.0, 2.0)]),
            (0.0, [(5.0, 0.0), (-1.0, 0.0), (2.0, 0.1)]),
        ];
        for (f_star, steps) in cases {
            let mut scaled = engine(kind, 0.1, f_star);
            let mut plain = engine(kind, 0.1, f64::NAN);
            let mut ps = vec![values(6, 1, -1.0, 1.0), values(2, 2, -1.0, 1.0)];
            let mut pp = ps.clone();
            for (k, &(loss, r)) in steps.iter().enumerate() {
                let grads = vec![
                    values(6, 50 + k as u64, 0.1, 1.0),
                    values(2, 60 + k as u64, 0.1, 1.0),
                ];
                let before = (ps.clone(), pp.clone());
                unsafe { scaled.step(&descs(&mut ps, &grads), loss, r, null(), null_mut()) }
                    .unwrap();
                unsafe { plain.step(&descs(&mut pp, &grads), loss, 0.0, null(), null_mut()) }
                    .unwrap();
                let what = format!("{kind:?} f* {f_star} step {k}");
                let a = scaled.optimizer_state().unwrap();
                let b = plain.optimizer_state().unwrap();
                assert_eq!(a, b, "{what}: the state saw the scale");
                let report = scaled.report_reeval(loss).unwrap();
                let s = report.scale;
                // s = 2Δf/(φ + R), Δf = f_i − f* or φ/2, from the contract.
                let phi = report.phi;
                let delta = if f_star.is_nan() {
                    phi / 2.0
                } else {
                    loss - f_star
                };
                let want = if delta <= 0.0 && !f_star.is_nan() {
                    0.0
                } else {
                    (2.0 * delta / (phi + r)).max(0.0)
                };
                assert!(phi + r > 0.0, "{what}: φ = {phi}");
                assert!(
                    (s - want).abs() <= 1e-12 * want,
                    "{what}: s = {s}, want {want}"
                );
                assert_eq!(plain.report_reeval(loss).unwrap().scale, 1.0);
                if s == 0.0 {
                    assert_eq!(ps, before.0, "{what}: s = 0 moved θ");
                } else if k == 0 {
                    assert_ne!(s, 1.0, "{what}: the case must scale");
                    // Same θ before: the scaled move is s times the plain one.
                    for (t, ((a1, a0), (b1, b0))) in flat(&ps)
                        .iter()
                        .zip(&flat(&before.0))
                        .zip(flat(&pp).iter().zip(&flat(&before.1)))
                        .enumerate()
                    {
                        let want = s * (b1 - b0);
                        assert!(
                            (a1 - a0 - want).abs() <= 1e-5 * want.abs() + 1e-7,
                            "{what}: θ[{t}] moved {} , s·plain = {want}",
                            a1 - a0
                        );
                    }
                }
            }
            let applied = |e: &mut Engine| e.counters().unwrap().applied;
            assert_eq!(applied(&mut scaled), 3, "{kind:?}: s = 0 still applied");
            assert_eq!(applied(&mut plain), 3);
        }
    }
}

/// AdamW's λθ is part of v, so s and η scale it like the rest: where the
/// gradient is 0, Adam's part of the direction is exactly 0 and the
/// element moves by exactly f32(s·η)·(λθ), not by η·λθ (PyTorch's
/// unscaled θ ← θ(1 − ηλ)).
#[test]
fn adamw_decay_is_inside_v_and_scaled_by_s() {
    let mut c = config(LRA_OPTIMIZER_ADAMW);
    c.lr = 0.5;
    c.num_threads = 1;
    let h = Handle::create(&c);
    let theta0 = values(8, 3, 1.0, 4.0);
    let mut params = vec![theta0.clone()];
    let mut g = vec![0.0f32; 8];
    g[0] = 0.25;
    // f* unknown, R > 0: s = φ/(φ + R), strictly between 0 and 1.
    h.step(&mut params, &[g], 1.0, 0.05);
    let info = h.report(0.9);
    assert!(info.scale > 0.0 && info.scale < 0.9, "s = {}", info.scale);
    let lr_eff = (info.scale * c.lr) as f32;
    let wd = c.weight_decay as f32;
    for i in 1..8 {
        let want = theta0[i] - lr_eff * (wd * theta0[i]);
        assert_eq!(params[0][i].to_bits(), want.to_bits(), "θ[{i}]");
        let unscaled = theta0[i] - (c.lr as f32) * (wd * theta0[i]);
        assert_ne!(params[0][i], unscaled, "θ[{i}]: decay not scaled by s");
    }
}

// ---- step scale ---------------------------------------------------------------

/// A Momentum handle whose second step points uphill: m = β·g1 + g2 with
/// g2 = −0.1·g1, so φ = η g2·m < 0. The second step reports `loss`.
/// Returns the parameters before and after the second step, its report
/// and m.
fn uphill_second_step_at(
    f_star: f64,
    obs_var: f64,
    loss: f64,
) -> (Vec<f32>, Vec<f32>, lra_reeval_info, f32) {
    let mut c = config(LRA_OPTIMIZER_MOMENTUM);
    c.lr = 0.1;
    c.f_star = f_star;
    let h = Handle::create(&c);
    let mut params = vec![vec![1.0f32, -2.0]];
    h.step(&mut params, &[vec![1.0, 1.0]], 1.0, 0.0);
    let before = params[0].clone();
    let g2 = -0.1f32;
    h.step(&mut params, &[vec![g2, g2]], loss, obs_var);
    let info = h.report(loss - 0.5);
    let m = 0.5f32 * 1.0 + g2;
    (before, params[0].clone(), info, m)
}

/// φ ≤ 0: reported, η unchanged; s falls back to 1 when φ + R ≤ 0 (the
/// plain step, never a reversed one), and is clamped to 0 (no move) when
/// f* is unknown and φ ≤ 0 < φ + R.
#[test]
fn uphill_phi_keeps_eta_and_never_reverses_the_step() {
    // φ = 0.1 · 2 · (−0.1 · 0.4) ≈ −0.008.
    for (f_star, obs_var, want_scale) in [
        (0.0, 0.0, 1.0),        // Polyak, φ + R = φ < 0: fallback 1
        (0.0, 0.001, 1.0),      // φ + R < 0: fallback 1
        (f64::NAN, 0.001, 1.0), // f* unknown, φ + R < 0: fallback 1
        (f64::NAN, 0.1, 0.0),   // f* unknown, φ < 0 < φ + R: s = φ/(φ+R) < 0 → 0
    ] {
        let what = format!("f* {f_star} R {obs_var}");
        let (before, after, info, m) = uphill_second_step_at(f_star, obs_var, 1.0);
        assert!(
            info.phi < 0.0 && info.phi > -0.01,
            "{what}: φ = {}",
            info.phi
        );
        assert_eq!(info.scale, want_scale, "{what}");
        assert_eq!(
            (info.decision, info.skip_reason),
            (LRA_DECISION_SKIPPED, LRA_SKIP_NONPOSITIVE_PHI),
            "{what}"
        );
        assert!(info.rho.is_nan(), "{what}");
        assert_eq!((info.lr_before, info.lr), (0.1, 0.1), "{what}");
        let lr_eff = (want_scale * 0.1) as f32;
        for i in 0..2 {
            assert_eq!(after[i], before[i] - lr_eff * m, "{what}: θ[{i}]");
        }
    }
}

/// f_i = f* exactly (Δf = 0) gives s = 0 like f_i < f*: θ stays, and the
/// ratio test still runs against the unscaled φ/2 (ALGORITHM.md rule 6:
/// "always against φ_i/2 … even when s_i ≠ 1"). Here f+ = 0 < f_i: with
/// φ = η g·g = 0.2, ρ = 0.25 / 0.1 = 2.5 > 4/3 and η rises; f+ = f_i
/// (nothing moved, a deterministic loss) gives ρ = 0 and η halves.
#[test]
fn loss_at_f_star_does_not_move() {
    let mut c = config(LRA_OPTIMIZER_SGD);
    c.lr = 0.1;
    c.f_star = 0.25;
    let h = Handle::create(&c);
    let mut params = vec![vec![1.0f32, -1.0]];
    h.step(&mut params, &[vec![1.0, -1.0]], 0.25, 0.0);
    assert_eq!(params[0], vec![1.0, -1.0]);
    let info = h.report(0.0);
    assert_eq!(info.scale, 0.0);
    assert!((info.rho - 2.5).abs() < 1e-6, "ρ = {}", info.rho);
    assert_eq!(
        (info.decision, info.skip_reason, info.lr),
        (LRA_DECISION_RAISED, LRA_SKIP_NONE, 0.1 * 1.2)
    );
    h.step(&mut params, &[vec![1.0, -1.0]], 0.25, 0.0);
    assert_eq!(params[0], vec![1.0, -1.0]);
    let info = h.report(0.25);
    assert_eq!(info.scale, 0.0);
    assert_eq!(
        (info.decision, info.skip_reason, info.rho, info.lr),
        (LRA_DECISION_LOWERED, LRA_SKIP_NONE, 0.0, 0.1 * 1.2 * 0.5)
    );
}

/// "f_i < f* means: no step" (ALGORITHM.md) also when φ + R is not a
/// positive finite number: the fallback s = 1 must not win, or a step below
/// f* would go the whole way along a direction that points uphill (φ < 0)
/// or whose φ overflowed.
#[test]
fn below_f_star_never_steps_even_when_phi_is_not_positive() {
    // Uphill Momentum step (φ ≈ −0.008), loss −1 below f* = 0.
    let (before, after, info, _) = uphill_second_step_at(0.0, 0.0, -1.0);
    assert!(info.phi < 0.0, "φ = {}", info.phi);
    assert_eq!(info.scale, 0.0, "uphill step below f*");
    assert_eq!(after, before, "uphill step below f* moved θ");
    // SGD with an overflowing φ, loss below f*.
    let mut c = config(LRA_OPTIMIZER_SGD);
    c.lr = 0.1;
    c.f_star = 0.0;
    let h = Handle::create(&c);
    let mut params = vec![vec![0.0f32, 1.0]];
    h.step(&mut params, &[vec![1e30, 0.0]], -1.0, 0.0);
    let info = h.report(-2.0);
    assert_eq!(info.scale, 0.0, "φ = {} below f*", info.phi);
    assert_eq!(params[0], vec![0.0, 1.0], "overflowing φ below f* moved θ");
}

/// A φ that overflows from finite gradients (f32 products g·d = inf) is
/// non-finite: reported, η kept. The step takes s = 2Δf/(φ + R) at its
/// limit: the plain step (s = 1) with f* unknown, and with f* known s = 0
/// (ALGORITHM.md falls back to 1 only when φ + R ≤ 0): a Polyak step does
/// not go the whole way along an exploding direction.
#[test]
fn overflowing_phi_is_reported_and_keeps_eta() {
    for (f_star, scale) in [(f64::NAN, 1.0f32), (0.0, 0.0)] {
        let mut c = config(LRA_OPTIMIZER_SGD);
        c.lr = 0.1;
        c.f_star = f_star;
        let h = Handle::create(&c);
        let mut params = vec![vec![0.0f32, 1.0]];
        let g = 1e30f32;
        h.step(&mut params, &[vec![g, 0.0]], 1.0, 0.0);
        assert_eq!(params[0], vec![-(scale * 0.1f32) * g, 1.0], "f* {f_star}");
        let info = h.report(0.5);
        assert_eq!(info.phi, f64::INFINITY, "f* {f_star}");
        assert_eq!(info.scale, scale as f64, "f* {f_star}");
        assert_eq!(
            (info.decision, info.skip_reason, info.lr),
            (LRA_DECISION_SKIPPED, LRA_SKIP_NONFINITE_PHI, 0.1),
            "f* {f_star}"
        );
    }
}

/// `scale_max` caps s in the scaled (two-pass) modes through the ABI.
#[test]
fn scale_max_caps_the_polyak_step() {
    let mut c = config(LRA_OPTIMIZER_SGD);
    c.lr = 0.1;
    c.f_star = 0.0;
    c.scale_max = 1.5;
    let h = Handle::create(&c);
    let mut params = vec![vec![0.0f32; 2]];
    // φ = 0.1·(1 + 1) = 0.2; uncapped s = 2·4/0.2 = 40.
    h.step(&mut params, &[vec![1.0, -1.0]], 4.0, 0.0);
    let info = h.report(3.0);
    assert_eq!(info.scale, 1.5);
    let step = (1.5f64 * 0.1) as f32;
    assert_eq!(params[0], vec![-step, step]);
}

/// `scale_max` caps s_i in every mode: with f* unknown and R = 0 the plain
/// step (s = 1) is capped too, exactly as with R = 1e-300.
#[test]
fn scale_max_below_one_caps_the_fused_step_too() {
    let mut c = config(LRA_OPTIMIZER_SGD);
    c.lr = 0.1;
    c.scale_max = 0.5;
    for obs_var in [1e-300, 0.0] {
        let h = Handle::create(&c);
        let mut params = vec![vec![0.0f32; 2]];
        h.step(&mut params, &[vec![1.0, -1.0]], 4.0, obs_var);
        let info = h.report(3.0);
        assert!(
            info.scale <= c.scale_max,
            "R = {obs_var}: s = {} above scale_max = {}",
            info.scale,
            c.scale_max
        );
        let step = (0.5f64 * 0.1) as f32;
        assert_eq!(params[0], vec![-step, step], "R = {obs_var}");
    }
}

// ---- ratio test ----------------------------------------------------------------

/// ρ is measured against φ/2, the unscaled step's prediction, also when a
/// Polyak step has s ≫ 1: f+ = f_i − φ gives ρ = 2 (raise) although the
/// scaled step predicted a decrease s·φ/2 far larger than what happened.
#[test]
fn rho_is_against_the_unscaled_prediction_when_s_is_not_one() {
    for (drop, want) in [(1.0, LRA_DECISION_RAISED), (0.25, LRA_DECISION_LOWERED)] {
        let mut c = config(LRA_OPTIMIZER_SGD);
        c.lr = 0.1;
        c.f_star = 0.0;
        let h = Handle::create(&c);
        let mut params = vec![vec![3.0f32; 4]];
        let loss = 10.0;
        h.step(&mut params, &[vec![0.5; 4]], loss, 0.0);
        let phi = h.phi();
        assert!((phi - 0.1).abs() < 1e-9, "φ = η·|g|² = {phi}");
        let loss_after = loss - drop * phi;
        let info = h.report(loss_after);
        assert!(
            (info.scale - 2.0 * loss / phi).abs() < 1e-9,
            "s = {}",
            info.scale
        );
        let rho = (loss - loss_after) / (info.phi * 0.5);
        assert_eq!(info.rho.to_bits(), rho.to_bits(), "ρ = {}", info.rho);
        assert_eq!(info.decision, want, "ρ = {rho}");
        let factor = if want == LRA_DECISION_RAISED {
            1.2
        } else {
            0.5
        };
        assert_eq!(info.lr, 0.1 * factor);
    }
}

/// Strict thresholds end to end: φ = 1.5 exactly (SGD, η = 1.5, g = 1),
/// so ρ = (f_i − f+)/0.75 hits 4/3 and 3/4 exactly; there η is kept, and
/// one ulp of f+ beyond either side moves it.
#[test]
fn thresholds_are_strict_at_the_exact_boundaries() {
    let loss = 2.0f64;
    let up = 1.0f64; // ρ = 1/0.75 = 4/3
    let down = 1.4375f64; // ρ = 0.5625/0.75 = 3/4
    let below = |x: f64| f64::from_bits(x.to_bits() - 2);
    let above = |x: f64| f64::from_bits(x.to_bits() + 2);
    for (loss_after, want_rho, want) in [
        (up, Some(4.0 / 3.0), LRA_DECISION_KEPT),
        (below(up), None, LRA_DECISION_RAISED),
        (down, Some(0.75), LRA_DECISION_KEPT),
        (above(down), None, LRA_DECISION_LOWERED),
    ] {
        let mut c = config(LRA_OPTIMIZER_SGD);
        c.lr = 1.5;
        let h = Handle::create(&c);
        let mut params = vec![vec![0.0f32]];
        h.step(&mut params, &[vec![1.0]], loss, 0.0);
        let info = h.report(loss_after);
        assert_eq!(info.phi, 1.5);
        if let Some(r) = want_rho {
            assert_eq!(info.rho, r, "f+ = {loss_after}");
        }
        assert_eq!(info.decision, want, "f+ = {loss_after}: ρ = {}", info.rho);
        let lr = match want {
            LRA_DECISION_RAISED => 1.5 * 1.2,
            LRA_DECISION_LOWERED => 0.75,
            _ => 1.5,
        };
        assert_eq!(info.lr, lr);
    }
}

/// The new η applies from the next iteration only: the report does not
/// touch the parameters, the step after it uses the new η exactly, and a
/// report always refers to the latest step (here a skipped one, whose
/// report keeps η whatever f+ says).
#[test]
fn new_eta_applies_from_the_next_step_and_reports_refer_to_the_latest_step() {
    let mut c = config(LRA_OPTIMIZER_SGD);
    c.lr = 0.25;
    let h = Handle::create(&c);
    let g = vec![vec![0.5f32, -0.25]];
    let mut params = vec![vec![1.0f32, 1.0]];
    let expect_step = |p: &[f32], lr: f64| -> Vec<f32> {
        p.iter()
            .zip(&g[0])
            .map(|(&t, &gi)| t - (lr as f32) * gi)
            .collect()
    };
    let mut want = expect_step(&params[0], 0.25);
    h.step(&mut params, &g, 1.0, 0.0);
    assert_eq!(params[0], want);
    let info = h.report(-10.0);
    assert_eq!((info.decision, info.lr_before), (LRA_DECISION_RAISED, 0.25));
    assert_eq!(params[0], want, "the report moved θ");
    want = expect_step(&params[0], 0.25 * 1.2);
    h.step(&mut params, &g, 1.0, 0.0);
    assert_eq!(params[0], want, "step after a raise");
    let info = h.report(2.0);
    assert_eq!(info.decision, LRA_DECISION_LOWERED);
    let lr = 0.25 * 1.2 * 0.5;
    assert_eq!(h.lr(), lr);
    // An applied step, then a skipped one (found-inf flag), then the
    // report: it judges the skipped step.
    want = expect_step(&params[0], lr);
    h.step(&mut params, &g, 1.0, 0.0);
    assert_eq!(params[0], want);
    h.step_ex(&mut params, &g, 1.0, 0.0, Some(1.0));
    assert_eq!(params[0], want, "the flagged step wrote");
    let info = h.report(-1e9);
    assert_eq!(
        (info.decision, info.skip_reason),
        (LRA_DECISION_SKIPPED, LRA_SKIP_FOUND_INF)
    );
    assert!(info.phi.is_nan() && info.rho.is_nan());
    assert_eq!((info.lr_before, info.lr, h.lr()), (lr, lr, lr));
    let n = h.counters();
    assert_eq!((n.steps, n.applied, n.skipped, n.reevals), (4, 3, 1, 3));
}

// ---- skips ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Skip {
    NanLoss,
    InfLoss,
    NanGrad,
    InfGrad,
    Flag,
}

/// A skipped step changes nothing at all: for every optimizer, cause and
/// mode (fused; two-pass with f* known), "step, skip, step, step" leaves
/// the parameters, the state, the bias powers and t bit for bit where
/// "step, step, step" leaves them, so the steps after a skip are the plain
/// optimizer's (Adam's bias corrections included), and the skip's report
/// keeps η.
#[test]
fn a_skipped_step_changes_nothing_not_even_t() {
    let causes = [
        Skip::NanLoss,
        Skip::InfLoss,
        Skip::NanGrad,
        Skip::InfGrad,
        Skip::Flag,
    ];
    for kind in OptimizerKind::ALL {
        for f_star in [f64::NAN, -1.0] {
            for cause in causes {
                let what = format!("{kind:?} f* {f_star} {cause:?}");
                let mut with_skip = engine(kind, 0.01, f_star);
                let mut without = engine(kind, 0.01, f_star);
                let mut pa = vec![values(7, 4, -1.0, 1.0), values(3, 5, -1.0, 1.0)];
                let mut pb = pa.clone();
                let grads =
                    |k: u64| vec![values(7, 70 + k, -1.0, 1.0), values(3, 80 + k, -1.0, 1.0)];
                for k in 0..3u64 {
                    if k == 1 {
                        let before = (pa.clone(), with_skip.optimizer_state().unwrap());
                        let mut bad = grads(9);
                        let (mut loss, mut flag) = (0.5, 0.0f32);
                        match cause {
                            Skip::NanLoss => loss = f64::NAN,
                            Skip::InfLoss => loss = f64::INFINITY,
                            Skip::NanGrad => bad[1][2] = f32::NAN,
                            Skip::InfGrad => bad[1][2] = f32::NEG_INFINITY,
                            Skip::Flag => flag = 1.0,
                        }
                        unsafe {
                            with_skip.step(
                                &descs(&mut pa, &bad),
                                loss,
                                0.0,
                                (&flag as *const f32).cast(),
                                null_mut(),
                            )
                        }
                        .unwrap();
                        assert_eq!(pa, before.0, "{what}: θ written");
                        assert_eq!(
                            with_skip.optimizer_state().unwrap(),
                            before.1,
                            "{what}: state written"
                        );
                        let r = with_skip.report_reeval(-100.0).unwrap();
                        assert_ne!(r.skip, SkipReason::None, "{what}");
                        assert_eq!((r.lr_before, r.lr), (0.01, 0.01), "{what}");
                    }
                    let g = grads(k);
                    for (e, p) in [(&mut with_skip, &mut pa), (&mut without, &mut pb)] {
                        unsafe { e.step(&descs(p, &g), 0.5, 0.0, null(), null_mut()) }.unwrap();
                        // No report: η stays, the trajectories stay comparable.
                    }
                    assert_eq!(pa, pb, "{what}: step {k}");
                    assert_eq!(
                        with_skip.last_phi().unwrap().to_bits(),
                        without.last_phi().unwrap().to_bits(),
                        "{what}: φ of step {k}"
                    );
                }
                assert_eq!(
                    with_skip.optimizer_state().unwrap(),
                    without.optimizer_state().unwrap(),
                    "{what}"
                );
                let (a, b) = (with_skip.counters().unwrap(), without.counters().unwrap());
                assert_eq!((a.steps, a.applied, a.skipped), (4, 3, 1), "{what}");
                assert_eq!((b.steps, b.applied, b.skipped), (3, 3, 0), "{what}");
            }
        }
    }
}

/// Guard off: with finite gradients the pass writes exactly what the
/// guarded one writes; a NaN gradient goes through as in the plain
/// optimizer (that element poisoned, every other element updated as
/// usual, the step counted as applied) and shows as a non-finite φ,
/// reported with η unchanged.
#[test]
fn guard_off_moves_the_plain_bytes() {
    for kind in ALL {
        let mut c = config(kind);
        c.lr = 0.01;
        let guarded = Handle::create(&c);
        c.check_finite = 0;
        let open = Handle::create(&c);
        let mut pg = vec![values(9, 6, -1.0, 1.0)];
        let mut po = pg.clone();
        for k in 0..3u64 {
            let g = vec![values(9, 90 + k, -1.0, 1.0)];
            guarded.step(&mut pg, &g, 1.0, 0.0);
            open.step(&mut po, &g, 1.0, 0.0);
            assert_eq!(pg, po, "optimizer {kind} step {k}");
            assert_eq!(guarded.phi().to_bits(), open.phi().to_bits());
        }
        let mut g = vec![values(9, 99, -1.0, 1.0)];
        let mut zeroed = g.clone();
        g[0][4] = f32::NAN;
        zeroed[0][4] = 0.0;
        guarded.step(&mut pg, &zeroed, 1.0, 0.0);
        open.step(&mut po, &g, 1.0, 0.0);
        assert!(po[0][4].is_nan(), "optimizer {kind}: θ[4] = {}", po[0][4]);
        for i in (0..9).filter(|&i| i != 4) {
            assert_eq!(po[0][i].to_bits(), pg[0][i].to_bits(), "{kind}: θ[{i}]");
        }
        let info = open.report(0.5);
        assert_eq!(
            (info.decision, info.skip_reason),
            (LRA_DECISION_SKIPPED, LRA_SKIP_NONFINITE_PHI),
            "optimizer {kind}"
        );
        assert_eq!(info.lr, 0.01);
        let n = open.counters();
        assert_eq!((n.applied, n.skipped), (4, 0), "optimizer {kind}");
    }
}

// ---- η and the defaults --------------------------------------------------------

/// η stays positive, finite and inside [lr_min, lr_max] in both
/// directions; without bounds it stops at the f32 safety range (never 0,
/// never inf). At a bound the decision is still reported (Raised/Lowered)
/// while η stays.
#[test]
fn eta_bounds_hold_in_both_directions() {
    // (lr_min, lr_max, lowest, highest)
    let lo = f32::MIN_POSITIVE as f64;
    let hi = f32::MAX as f64;
    for (lr_min, lr_max, lowest, highest) in
        [(1e-4, 1e-2, 1e-4, 1e-2), (0.0, f64::INFINITY, lo, hi)]
    {
        let mut c = config(LRA_OPTIMIZER_SGD);
        c.lr = 1e-3;
        c.lr_min = lr_min;
        c.lr_max = lr_max;
        let h = Handle::create(&c);
        let mut params = vec![vec![0.0f32]];
        let g = vec![vec![1e-3f32]];
        for (f_after, bound, want) in [
            (-1e300, highest, LRA_DECISION_RAISED),
            (2.0, lowest, LRA_DECISION_LOWERED),
        ] {
            let mut last = no_info();
            for _ in 0..600 {
                h.step(&mut params, &g, 1.0, 0.0);
                last = h.report(f_after);
                assert_eq!(last.decision, want);
                assert!(last.lr > 0.0 && last.lr.is_finite());
                assert!(last.lr >= lr_min && last.lr <= lr_max);
            }
            assert_eq!(last.lr, bound, "bounds [{lr_min}, {lr_max}]");
            assert_eq!(last.lr_before, bound, "η stays at the bound");
        }
    }
}

/// `lra_config_init` fills exactly the contract's defaults for every
/// optimizer: η 1e-3; β = 0.5 (Momentum, Nesterov), β1 = 0.5 and β2 =
/// 0.999 (Adam, AdamW); α = 0.99; ε 1e-10 for Adagrad and 1e-8 otherwise;
/// weight decay 0 except AdamW's PyTorch default 1e-2; f* unknown; factors
/// 1.2 / 0.5; thresholds 4/3 / 3/4; no η bounds, no scale cap, no ρ
/// epsilon; guard on; every step re-evaluated.
#[test]
fn config_init_fills_the_contract_defaults() {
    for kind in ALL {
        let c = config(kind);
        assert_eq!(c.optimizer, kind);
        assert_eq!(c.struct_size as usize, std::mem::size_of::<lra_config>());
        assert_eq!(c.lr, 1e-3);
        assert_eq!(c.momentum, 0.5);
        assert_eq!(c.beta1, 0.5);
        assert_eq!(c.beta2, 0.999);
        assert_eq!(c.alpha, 0.99);
        let eps = if kind == LRA_OPTIMIZER_ADAGRAD {
            1e-10
        } else {
            1e-8
        };
        assert_eq!(c.eps, eps, "optimizer {kind}");
        let wd = if kind == LRA_OPTIMIZER_ADAMW {
            1e-2
        } else {
            0.0
        };
        assert_eq!(c.weight_decay, wd, "optimizer {kind}");
        assert!(c.f_star.is_nan());
        assert_eq!((c.factor_up, c.factor_down), (1.2, 0.5));
        assert_eq!((c.threshold_up, c.threshold_down), (4.0 / 3.0, 3.0 / 4.0));
        assert_eq!((c.lr_min, c.lr_max), (0.0, f64::INFINITY));
        assert_eq!((c.scale_max, c.denom_eps), (f64::INFINITY, 0.0));
        assert_eq!(c.check_finite, 1);
        assert_eq!(c.reeval_schedule, LRA_REEVAL_ALWAYS);
        let h = Handle::create(&c);
        assert_eq!(h.lr(), 1e-3);
    }
}

// ---- f64 decisions are the same whatever the thread count ---------------------

/// η (and, in the scaled modes, s) is decided in f64 from the reduced φ:
/// over several iterations on tensors large enough to be split over
/// threads, in the fused, Polyak and R > 0 modes, every report (φ, ρ, s,
/// η, decision) and every parameter has the same bits with 1, 2 and 5
/// threads. (One fused step's φ is pinned in `tests/engine.rs`; CPU
/// against CUDA in `tests/cuda.rs`.)
#[test]
fn decisions_have_the_same_bits_whatever_the_thread_count() {
    // Enough for 5 threads (the CPU backend starts at most one thread per 256 Ki
    // elements).
    let n = 1_400_000;
    for (f_star, obs_var) in [(f64::NAN, 0.0), (0.0, 0.0), (f64::NAN, 1e-3)] {
        let mut runs = Vec::new();
        for threads in [1u32, 2, 5] {
            let mut c = config(LRA_OPTIMIZER_ADAM);
            c.lr = 1e-2;
            c.f_star = f_star;
            c.num_threads = threads;
            let h = Handle::create(&c);
            let mut params = vec![values(n, 21, -1.0, 1.0), values(17, 22, -1.0, 1.0)];
            let loss = |p: &[Vec<f32>]| -> f64 {
                p.iter()
                    .flatten()
                    .map(|&x| 0.5 * (x as f64) * (x as f64))
                    .sum::<f64>()
                    / n as f64
            };
            let mut infos = Vec::new();
            for _ in 0..4 {
                let grads: Vec<Vec<f32>> = params.clone();
                let f = loss(&params);
                h.step(&mut params, &grads, f, obs_var);
                let i = h.report(loss(&params));
                infos.push([
                    i.phi.to_bits(),
                    i.rho.to_bits(),
                    i.scale.to_bits(),
                    i.lr.to_bits(),
                    i.decision as u64,
                ]);
            }
            runs.push((infos, params));
        }
        for r in &runs[1..] {
            assert_eq!(r.0, runs[0].0, "f* {f_star} R {obs_var}");
            assert!(
                r.1 == runs[0].1,
                "f* {f_star} R {obs_var}: parameters differ"
            );
        }
    }
}
