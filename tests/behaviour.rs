//! Behaviour (issue 2, test 3): the Polyak mode converges linearly on a
//! strongly convex quadratic with known f*; on logistic regression η started
//! far too small rises and η started too large falls, each into a range
//! where the loss decreases.

#[path = "../examples/common/mod.rs"]
mod common;

use common::{load_digits, train, Logistic, Lra, Rng};
use lra::ffi::*;

/// f(θ) = ½ Σ a_i θ_i², a_i ∈ [1, 10] (condition number 10), f* = 0.
#[test]
fn polyak_mode_converges_linearly_on_a_quadratic() {
    let n = 1000;
    let mut rng = Rng::new(7);
    let a: Vec<f64> = (0..n)
        .map(|i| 1.0 + 9.0 * i as f64 / (n - 1) as f64)
        .collect();
    let theta: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let mut params = vec![theta.clone()];
    let mut grads = vec![vec![0.0f32; n]];
    let f = |p: &[f32]| -> f64 {
        p.iter()
            .zip(&a)
            .map(|(&x, &ai)| 0.5 * ai * (x as f64).powi(2))
            .sum()
    };
    let mut cfg = Lra::config(LRA_OPTIMIZER_SGD, 1e-3);
    cfg.f_star = 0.0;
    let mut opt = Lra::new(&cfg);
    let f0 = f(&params[0]);
    let mut losses = vec![f0];
    for _ in 0..60 {
        for i in 0..n {
            grads[0][i] = (a[i] * params[0][i] as f64) as f32;
        }
        let loss = f(&params[0]);
        opt.step(&mut params, &grads, loss);
        losses.push(f(&params[0]));
    }
    // Linear convergence: every block of 10 steps shrinks f by a factor of
    // at least 3, so after 60 steps f fell by more than 3^6 = 729 at a steady rate.
    for k in (10..=60).step_by(10) {
        let ratio = losses[k] / losses[k - 10];
        assert!(
            ratio < 1.0 / 3.0,
            "f fell only by {ratio:.3} over steps {}..{k}: {:?}",
            k - 10,
            &losses[k - 10..=k]
        );
    }
    assert!(losses[60] < 1e-6 * f0, "f60/f0 = {}", losses[60] / f0);
    // The initial η is irrelevant in Polyak mode (s·η is what moves θ).
    let mut cfg2 = cfg;
    cfg2.lr = 1e-1;
    let mut params2 = vec![theta.clone()];
    let mut opt2 = Lra::new(&cfg2);
    for i in 0..n {
        grads[0][i] = (a[i] * params2[0][i] as f64) as f32;
    }
    let loss2 = f(&params2[0]);
    opt2.step(&mut params2, &grads, loss2);
    assert!((f(&params2[0]) - losses[1]).abs() <= 1e-5 * losses[1]);
}

fn digits_setup() -> (common::Dataset, Logistic) {
    let data = load_digits(&common::digits_path());
    let model = Logistic {
        d: data.d,
        classes: data.classes,
    };
    (data, model)
}

/// Whether plain training at fixed η makes progress: the training loss after
/// two epochs is finite and below the loss after one.
fn loss_decreases_at(
    model: &Logistic,
    data: &common::Dataset,
    optimizer: lra_optimizer,
    lr: f64,
) -> bool {
    let cfg = Lra::config(optimizer, lr);
    let one = train(model, data, &cfg, false, 1, 64, 3).final_loss;
    let two = train(model, data, &cfg, false, 2, 64, 3).final_loss;
    one.is_finite() && two < one
}

#[test]
fn small_initial_lr_rises_and_large_falls() {
    let (data, model) = digits_setup();
    let init_loss = (10.0f64).ln();
    for (optimizer, name) in [(LRA_OPTIMIZER_SGD, "sgd"), (LRA_OPTIMIZER_ADAM, "adam")] {
        let cfg = Lra::config(optimizer, 1e-5);
        let up = train(&model, &data, &cfg, true, 3, 64, 1);
        assert!(
            up.final_lr > 1e-3,
            "{name}: η from 1e-5 only reached {}",
            up.final_lr
        );
        assert!(
            up.final_loss < 0.5 * init_loss,
            "{name}: loss {}",
            up.final_loss
        );
        assert!(
            loss_decreases_at(&model, &data, optimizer, up.final_lr),
            "{name}: η = {} does not decrease the loss",
            up.final_lr
        );
    }
    // Adam at η = 1 overshoots on this problem; the adaptation pulls η down.
    let cfg = Lra::config(LRA_OPTIMIZER_ADAM, 1.0);
    let down = train(&model, &data, &cfg, true, 3, 64, 1);
    assert!(
        down.final_lr < 0.5,
        "adam: η from 1.0 ended at {}",
        down.final_lr
    );
    assert!(
        down.final_loss < 0.5 * init_loss,
        "adam: loss {}",
        down.final_loss
    );
    assert!(loss_decreases_at(
        &model,
        &data,
        LRA_OPTIMIZER_ADAM,
        down.final_lr
    ));
    // SGD with a clearly too large η (100) falls as well.
    let cfg = Lra::config(LRA_OPTIMIZER_SGD, 100.0);
    let down = train(&model, &data, &cfg, true, 3, 64, 1);
    assert!(
        down.final_lr < 50.0,
        "sgd: η from 100 ended at {}",
        down.final_lr
    );
    assert!(loss_decreases_at(
        &model,
        &data,
        LRA_OPTIMIZER_SGD,
        down.final_lr
    ));
}
