//! Algorithm 1's scalar logic (ALGORITHM.md): η, the step scale s_i, the
//! ratio test and its decision. Pure f64 arithmetic on scalars: no pointers,
//! no backend, so every backend and every rank decides the same.

/// How the step scale s_i is found. `None` in a step request means the fused
/// mode (f* unknown and R = 0, so s_i = 1 without looking at φ).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleRule {
    /// The step's loss f_i (finite: checked before any work).
    pub loss: f64,
    /// Known lower bound f*, or NaN when unknown.
    pub f_star: f64,
    /// Observation variance R_i >= 0.
    pub obs_var: f64,
    /// Upper cap on s_i (+inf = none).
    pub scale_max: f64,
}

impl ScaleRule {
    /// s_i = 2Δf / (φ + R), Δf = f_i − f* (f* known) or φ/2; 0 when f* is
    /// known and f_i ≤ f* (at or below the bound: no step, whatever φ);
    /// else falls back to 1 when φ + R ≤ 0 or NaN (never a reversed step);
    /// clamped to [0, scale_max]. φ = +inf (an f32 product g·d overflowed)
    /// takes the formula's limit: 0 with f* known (an exploding step gets
    /// no step), 1 without (φ/(φ + R) → 1, inf/inf falls back to 1). The
    /// CUDA kernels compute this same expression in f64, operation for
    /// operation.
    pub fn scale(&self, phi: f64) -> f64 {
        let denom = phi + self.obs_var;
        let f_star_known = !self.f_star.is_nan();
        let delta_f = if f_star_known {
            self.loss - self.f_star
        } else {
            phi * 0.5
        };
        let s = if f_star_known && delta_f <= 0.0 {
            0.0
        } else if denom > 0.0 {
            (2.0 * delta_f) / denom
        } else {
            1.0
        };
        // NaN (e.g. φ NaN with f* known) also falls back to 1.
        let s = if s.is_nan() { 1.0 } else { s };
        s.max(0.0).min(self.scale_max)
    }
}

/// Adaptation settings (validated before they reach here).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// NaN = unknown.
    pub f_star: f64,
    pub factor_up: f64,
    pub factor_down: f64,
    pub threshold_up: f64,
    pub threshold_down: f64,
    pub lr_min: f64,
    pub lr_max: f64,
    pub scale_max: f64,
    /// Added to φ/2 in the ratio's denominator (the authors' wrapper uses
    /// 1e-12; 0 by default).
    pub denom_eps: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            f_star: f64::NAN,
            factor_up: 1.2,
            factor_down: 0.5,
            threshold_up: 4.0 / 3.0,
            threshold_down: 0.75,
            lr_min: 0.0,
            lr_max: f64::INFINITY,
            scale_max: f64::INFINITY,
            denom_eps: 0.0,
        }
    }
}

/// Why an iteration's ratio test did not run. Values are ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    None = 0,
    /// f_i was NaN or ±inf: nothing was written.
    NonfiniteLoss = 1,
    /// A gradient held NaN/inf (the guard): nothing was written.
    NonfiniteGrad = 2,
    /// The caller's found-inf flag was set: nothing was written.
    FoundInf = 3,
    /// φ ≤ 0: the direction is not a descent direction for this batch.
    NonpositivePhi = 4,
    /// φ is NaN or ±inf (guard off and a non-finite gradient, or overflow).
    NonfinitePhi = 5,
    /// Reserved, never reported: earlier builds skipped the ratio test of a
    /// step with s_i = 0. ALGORITHM.md rule 6 judges every step against the
    /// unscaled φ_i/2, s_i = 0 included, so its report now runs the test.
    /// Kept so the value is not reused and old checkpoints still load.
    ZeroScale = 6,
}

impl SkipReason {
    /// Every reason, in value order (`ALL[v]` has value `v`).
    pub const ALL: [SkipReason; 7] = [
        SkipReason::None,
        SkipReason::NonfiniteLoss,
        SkipReason::NonfiniteGrad,
        SkipReason::FoundInf,
        SkipReason::NonpositivePhi,
        SkipReason::NonfinitePhi,
        SkipReason::ZeroScale,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
}

/// The decision of one re-evaluation. Values are ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Kept = 0,
    Raised = 1,
    Lowered = 2,
    Skipped = 3,
}

impl Decision {
    /// Every decision, in value order (`ALL[v]` has value `v`).
    pub const ALL: [Decision; 4] = [
        Decision::Kept,
        Decision::Raised,
        Decision::Lowered,
        Decision::Skipped,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
}

/// What the backend found when it ran a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// `NonfiniteGrad` / `FoundInf` when the step was not applied.
    pub skip: SkipReason,
    /// φ = η·Σ g·d over all tensors (NaN when skipped).
    pub phi: f64,
    /// The scale s_i used (1 in fused mode).
    pub scale: f64,
}

/// Result of a re-evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReevalResult {
    pub phi: f64,
    pub rho: f64,
    pub scale: f64,
    pub lr_before: f64,
    pub lr: f64,
    pub decision: Decision,
    pub skip: SkipReason,
}

/// The smallest and largest η ever used: positive and finite in f32, since
/// the update multiplies by η as an f32.
pub const LR_FLOOR: f64 = f32::MIN_POSITIVE as f64;
pub const LR_CEIL: f64 = f32::MAX as f64;

/// The f32 step size the update applies: s·η, saturated at f32::MAX. s·η
/// can pass f32's range while s·η·d does not (f* known and a tiny φ);
/// converted unclamped it would be inf, making parameters ±inf, and NaN
/// where d = 0. The kernels' `F_DECIDE` computes the same.
pub fn effective_lr(scale: f64, lr: f64) -> f32 {
    (scale * lr).min(LR_CEIL) as f32
}

/// Why `lr` cannot be η under `s` (`None` when it can): η must lie inside
/// the always-on safety range [`LR_FLOOR`, `LR_CEIL`] and inside
/// [lr_min, lr_max]. Initial, set and restored η all pass this check.
pub fn lr_problem(lr: f64, s: &Settings) -> Option<String> {
    if !(LR_FLOOR..=LR_CEIL).contains(&lr) {
        return Some(format!(
            "lr = {lr:?} must be a positive finite number in [{LR_FLOOR:e}, {LR_CEIL:e}] (η is applied as an f32)"
        ));
    }
    if lr < s.lr_min || lr > s.lr_max {
        return Some(format!(
            "lr = {lr:?} lies outside [lr_min, lr_max] = [{:?}, {:?}]",
            s.lr_min, s.lr_max
        ));
    }
    None
}

/// Keep η inside the configured bounds and the always-on safety range.
pub fn clamp_lr(lr: f64, s: &Settings) -> f64 {
    let lo = s.lr_min.max(LR_FLOOR);
    let hi = s.lr_max.min(LR_CEIL);
    lr.max(lo).min(hi)
}

/// The ratio test for one iteration: given f_i, f+ and the step's outcome,
/// returns the decision and the new η.
pub fn decide(s: &Settings, lr: f64, loss: f64, loss_after: f64, o: &StepOutcome) -> ReevalResult {
    let mut r = ReevalResult {
        phi: o.phi,
        rho: f64::NAN,
        scale: o.scale,
        lr_before: lr,
        lr,
        decision: Decision::Skipped,
        skip: o.skip,
    };
    if o.skip != SkipReason::None {
        return r;
    }
    if !o.phi.is_finite() {
        r.skip = SkipReason::NonfinitePhi;
        return r;
    }
    if o.phi <= 0.0 {
        r.skip = SkipReason::NonpositivePhi;
        return r;
    }
    // f+ not finite counts as a failed step (ρ = −inf): η halves.
    r.rho = if loss_after.is_finite() {
        (loss - loss_after) / (o.phi * 0.5 + s.denom_eps)
    } else {
        f64::NEG_INFINITY
    };
    let (decision, new_lr) = if r.rho > s.threshold_up {
        (Decision::Raised, lr * s.factor_up)
    } else if r.rho < s.threshold_down {
        (Decision::Lowered, lr * s.factor_down)
    } else {
        (Decision::Kept, lr)
    };
    r.decision = decision;
    r.lr = clamp_lr(new_lr, s);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(phi: f64) -> StepOutcome {
        StepOutcome {
            skip: SkipReason::None,
            phi,
            scale: 1.0,
        }
    }

    #[test]
    fn ratio_above_upper_threshold_raises() {
        let s = Settings::default();
        // predicted decrease φ/2 = 1, observed 2 → ρ = 2 > 4/3.
        let r = decide(&s, 0.1, 10.0, 8.0, &outcome(2.0));
        assert_eq!(r.decision, Decision::Raised);
        assert!((r.lr - 0.12).abs() < 1e-15);
        assert_eq!(r.rho, 2.0);
    }

    #[test]
    fn ratio_below_lower_threshold_lowers() {
        let s = Settings::default();
        let r = decide(&s, 0.1, 10.0, 9.5, &outcome(2.0));
        assert_eq!(r.decision, Decision::Lowered);
        assert_eq!(r.lr, 0.05);
    }

    #[test]
    fn ratio_between_thresholds_keeps() {
        let s = Settings::default();
        let r = decide(&s, 0.1, 10.0, 9.0, &outcome(2.0));
        assert_eq!(r.decision, Decision::Kept);
        assert_eq!(r.lr, 0.1);
        // Exactly at the thresholds: kept (strict inequalities).
        let r = decide(&s, 0.1, 10.0, 10.0 - 0.75, &outcome(2.0));
        assert_eq!(r.decision, Decision::Kept);
        let r = decide(&s, 0.1, 4.0 / 3.0, 0.0, &outcome(2.0));
        assert_eq!(r.decision, Decision::Kept);
    }

    #[test]
    fn loss_increase_and_nonfinite_after_lower() {
        let s = Settings::default();
        assert_eq!(
            decide(&s, 0.1, 10.0, 11.0, &outcome(2.0)).decision,
            Decision::Lowered
        );
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let r = decide(&s, 0.1, 10.0, bad, &outcome(2.0));
            assert_eq!(r.decision, Decision::Lowered, "{bad}");
            assert_eq!(r.lr, 0.05);
        }
    }

    #[test]
    fn nonpositive_or_nonfinite_phi_skips() {
        let s = Settings::default();
        for (phi, why) in [
            (0.0, SkipReason::NonpositivePhi),
            (-1.0, SkipReason::NonpositivePhi),
            (f64::NAN, SkipReason::NonfinitePhi),
            (f64::INFINITY, SkipReason::NonfinitePhi),
        ] {
            let r = decide(&s, 0.1, 10.0, 1.0, &outcome(phi));
            assert_eq!(r.decision, Decision::Skipped);
            assert_eq!(r.skip, why);
            assert_eq!(r.lr, 0.1);
        }
    }

    #[test]
    fn backend_skips_keep_lr_and_zero_scale_is_judged() {
        let s = Settings::default();
        for why in [SkipReason::NonfiniteGrad, SkipReason::FoundInf] {
            let o = StepOutcome {
                skip: why,
                phi: f64::NAN,
                scale: 1.0,
            };
            let r = decide(&s, 0.1, 10.0, 1.0, &o);
            assert_eq!((r.decision, r.skip, r.lr), (Decision::Skipped, why, 0.1));
        }
        let o = StepOutcome {
            skip: SkipReason::None,
            phi: 1.0,
            scale: 0.0,
        };
        // s = 0 (f_i ≤ f*): θ did not move, so f+ = f_i and ρ = 0 < 3/4.
        let r = decide(&s, 0.1, 10.0, 10.0, &o);
        assert_eq!(
            (r.decision, r.skip, r.rho, r.lr),
            (Decision::Lowered, SkipReason::None, 0.0, 0.05)
        );
    }

    #[test]
    fn bounds_clamp_lr() {
        let s = Settings {
            lr_min: 0.04,
            lr_max: 0.11,
            ..Settings::default()
        };
        assert_eq!(decide(&s, 0.1, 10.0, 0.0, &outcome(2.0)).lr, 0.11);
        assert_eq!(decide(&s, 0.06, 10.0, 11.0, &outcome(2.0)).lr, 0.04);
        // Safety range even without bounds.
        let s = Settings::default();
        assert_eq!(clamp_lr(1e-300, &s), LR_FLOOR);
        assert_eq!(clamp_lr(1e300, &s), LR_CEIL);
    }

    #[test]
    fn denom_eps_enters_ratio() {
        let s = Settings {
            denom_eps: 1.0,
            ..Settings::default()
        };
        let r = decide(&s, 0.1, 10.0, 8.0, &outcome(2.0));
        assert_eq!(r.rho, 1.0);
        assert_eq!(r.decision, Decision::Kept);
    }

    #[test]
    fn scale_rule_branches() {
        let unknown = ScaleRule {
            loss: 5.0,
            f_star: f64::NAN,
            obs_var: 0.0,
            scale_max: f64::INFINITY,
        };
        // f* unknown, R = 0: s = 1 exactly.
        assert_eq!(unknown.scale(3.0), 1.0);
        // R > 0 shrinks the step: 2·(φ/2)/(φ+R).
        let noisy = ScaleRule {
            obs_var: 1.0,
            ..unknown
        };
        assert_eq!(noisy.scale(3.0), 0.75);
        // Polyak: 2(f − f*)/φ.
        let polyak = ScaleRule {
            f_star: 1.0,
            ..unknown
        };
        assert_eq!(polyak.scale(4.0), 2.0);
        // f_i < f*: clamped to 0 (no step).
        let below = ScaleRule {
            f_star: 6.0,
            ..unknown
        };
        assert_eq!(below.scale(4.0), 0.0);
        // At or below f*, no step whatever φ is (the fallback to 1 is for
        // f_i above the bound).
        for phi in [0.0, -2.0, f64::NAN, f64::INFINITY] {
            assert_eq!(below.scale(phi), 0.0, "φ = {phi}");
        }
        let at = ScaleRule {
            f_star: 5.0,
            ..unknown
        };
        assert_eq!(at.scale(-2.0), 0.0);
        // Cap.
        let capped = ScaleRule {
            scale_max: 1.5,
            ..polyak
        };
        assert_eq!(capped.scale(4.0), 1.5);
        // φ + R ≤ 0 or NaN: fall back to 1.
        assert_eq!(polyak.scale(0.0), 1.0);
        assert_eq!(polyak.scale(-2.0), 1.0);
        assert_eq!(polyak.scale(f64::NAN), 1.0);
        // φ = +inf: the formula's limit, no step with f* known, 1 without.
        assert_eq!(polyak.scale(f64::INFINITY), 0.0);
        assert_eq!(noisy.scale(f64::INFINITY), 1.0);
        // φ < 0 but φ + R > 0: Δf = φ/2 < 0 gives s < 0, clamped to 0.
        assert_eq!(noisy.scale(-0.5), 0.0);
    }
}
