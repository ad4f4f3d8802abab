//! The validated Rust-side configuration. The C struct `lra_config` is
//! converted into this in `ffi`; every check that names a field lives here.

use crate::controller::Settings;
use crate::error::Result;
use crate::fail;
use crate::optim::{Hyper, OptimizerKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Host,
    Cuda { ordinal: i32 },
}

/// When the caller should re-evaluate (answer of `lra_should_reeval`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReevalSchedule {
    /// Every step (the paper's Algorithm 1).
    Always,
    /// Steps 0, k, 2k, ...
    Every(u64),
    /// Steps 0, 1, 1+⌊r⌋, ...: the gap between re-evaluations starts at 1
    /// and grows by the factor r after each one (the paper's suggestion to
    /// re-evaluate less often later in training).
    Geometric(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub kind: OptimizerKind,
    pub device: Device,
    pub lr: f64,
    pub hyper: Hyper,
    pub settings: Settings,
    pub check_finite: bool,
    /// CPU worker threads; 0 = one per available core.
    pub threads: usize,
    pub schedule: ReevalSchedule,
    /// Parameters are split over ranks (φ is a sum of per-rank partials).
    pub sharded: bool,
    /// Reported losses are per-rank values to be averaged across ranks.
    pub loss_rank_local: bool,
}

fn positive_finite(name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        fail!(
            InvalidConfig,
            "{name} = {v:?} must be a positive finite number"
        );
    }
    Ok(())
}

fn in_half_open_unit_interval(name: &str, v: f64) -> Result<()> {
    if !(0.0..1.0).contains(&v) {
        fail!(InvalidConfig, "{name} = {v:?} must lie in [0, 1)");
    }
    Ok(())
}

/// The update computes in f32 (on both backends): a hyper-parameter whose
/// f32 value is not the number asked for in kind (0 for a positive value,
/// inf for a finite one, 1 for one below 1) is refused, like η.
fn usable_as_f32(name: &str, v: f64, below_one: bool) -> Result<()> {
    let f = v as f32;
    if v != 0.0 && !(f.is_finite() && f.abs() >= f32::MIN_POSITIVE) {
        fail!(
            InvalidConfig,
            "{name} = {v:?} is outside f32's normal range (about 1.2e-38 to 3.4e38): the update computes with it as an f32 ({f:?})"
        );
    }
    if below_one && f >= 1.0 {
        fail!(
            InvalidConfig,
            "{name} = {v:?} rounds to 1 as an f32, which the update computes with: it must be below 1 - 2^-25"
        );
    }
    Ok(())
}

impl Config {
    /// A host configuration with every default `lra_config_init` fills in
    /// (initial η 1e-3, the paper's β/β1 = 0.5, guard on, one thread per
    /// core, re-evaluation every step, one rank).
    pub fn defaults(kind: OptimizerKind) -> Config {
        Config {
            kind,
            device: Device::Host,
            lr: 1e-3,
            hyper: Hyper::defaults(kind),
            settings: Settings::default(),
            check_finite: true,
            threads: 0,
            schedule: ReevalSchedule::Always,
            sharded: false,
            loss_rank_local: false,
        }
    }

    /// Checks every field; the message names the first bad one. Negated
    /// comparisons are deliberate: they also reject NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let h = &self.hyper;
        for (name, v) in [
            ("momentum", h.momentum),
            ("alpha", h.alpha),
            ("beta1", h.beta1),
            ("beta2", h.beta2),
        ] {
            in_half_open_unit_interval(name, v)?;
            usable_as_f32(name, v, true)?;
        }
        positive_finite("eps", h.eps)?;
        usable_as_f32("eps", h.eps, false)?;
        if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
            fail!(
                InvalidConfig,
                "weight_decay = {:?} must be finite and >= 0",
                h.weight_decay
            );
        }
        usable_as_f32("weight_decay", h.weight_decay, false)?;
        let s = &self.settings;
        if s.f_star.is_infinite() {
            fail!(
                InvalidConfig,
                "f_star = {:?} must be finite, or NaN for unknown",
                s.f_star
            );
        }
        if !(s.factor_up.is_finite() && s.factor_up >= 1.0) {
            fail!(
                InvalidConfig,
                "factor_up = {:?} must be finite and >= 1",
                s.factor_up
            );
        }
        if !(s.factor_down > 0.0 && s.factor_down <= 1.0) {
            fail!(
                InvalidConfig,
                "factor_down = {:?} must lie in (0, 1]",
                s.factor_down
            );
        }
        if !s.threshold_down.is_finite() {
            fail!(
                InvalidConfig,
                "threshold_down = {:?} must be finite",
                s.threshold_down
            );
        }
        if !(s.threshold_up.is_finite() && s.threshold_up >= s.threshold_down) {
            fail!(
                InvalidConfig,
                "threshold_up = {:?} must be finite and >= threshold_down = {:?}",
                s.threshold_up,
                s.threshold_down
            );
        }
        if !(s.lr_min.is_finite() && s.lr_min >= 0.0) {
            fail!(
                InvalidConfig,
                "lr_min = {:?} must be finite and >= 0",
                s.lr_min
            );
        }
        if !(s.lr_max > 0.0 && s.lr_max >= s.lr_min) {
            fail!(
                InvalidConfig,
                "lr_max = {:?} must be > 0 and >= lr_min = {:?}",
                s.lr_max,
                s.lr_min
            );
        }
        if let Some(why) = crate::controller::lr_problem(self.lr, s) {
            fail!(InvalidConfig, "{why}");
        }
        if !(s.scale_max > 0.0) {
            fail!(
                InvalidConfig,
                "scale_max = {:?} must be > 0 (+inf for no cap)",
                s.scale_max
            );
        }
        if !(s.denom_eps.is_finite() && s.denom_eps >= 0.0) {
            fail!(
                InvalidConfig,
                "denom_eps = {:?} must be finite and >= 0",
                s.denom_eps
            );
        }
        match self.schedule {
            ReevalSchedule::Every(0) => {
                fail!(InvalidConfig, "reeval_every = 0 must be >= 1")
            }
            ReevalSchedule::Geometric(r) if !(r.is_finite() && r >= 1.0) => {
                fail!(
                    InvalidConfig,
                    "reeval_growth = {r:?} must be finite and >= 1"
                )
            }
            _ => {}
        }
        if let Device::Cuda { ordinal } = self.device {
            if ordinal < 0 {
                fail!(InvalidConfig, "device_ordinal = {ordinal} must be >= 0");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Edit = fn(&mut Config);

    /// Each bound: edits that land just inside it (accepted) and just past
    /// it (refused, the message naming the field first), so moving a bound
    /// by one comparison operator fails here, not only in the C test.
    #[test]
    fn every_bound_accepts_its_edge_and_refuses_past_it() {
        let inside: &[(&str, Edit)] = &[
            ("momentum", |c| c.hyper.momentum = 0.0),
            ("momentum", |c| c.hyper.momentum = -0.0),
            ("beta2", |c| c.hyper.beta2 = 1.0 - 1e-7),
            ("eps", |c| c.hyper.eps = 1e-37),
            ("weight_decay", |c| c.hyper.weight_decay = 0.0),
            ("f_star", |c| c.settings.f_star = -1e300),
            ("factor_up", |c| c.settings.factor_up = 1.0),
            ("factor_down", |c| c.settings.factor_down = 1.0),
            ("threshold_down", |c| c.settings.threshold_down = -1e300),
            ("threshold_up", |c| {
                c.settings.threshold_up = c.settings.threshold_down
            }),
            ("lr_min", |c| c.settings.lr_min = 0.0),
            ("lr_max", |c| {
                (c.settings.lr_min, c.settings.lr_max) = (c.lr, c.lr)
            }),
            ("lr_max", |c| c.settings.lr_max = f64::INFINITY),
            ("scale_max", |c| c.settings.scale_max = 1e-300),
            ("denom_eps", |c| c.settings.denom_eps = 0.0),
            ("reeval_every", |c| c.schedule = ReevalSchedule::Every(1)),
            ("reeval_growth", |c| {
                c.schedule = ReevalSchedule::Geometric(1.0)
            }),
            ("device_ordinal", |c| c.device = Device::Cuda { ordinal: 0 }),
        ];
        let past: &[(&str, Edit)] = &[
            ("momentum", |c| c.hyper.momentum = 1.0),
            ("momentum", |c| c.hyper.momentum = -1e-300),
            ("lr", |c| c.lr = 1e-300),
            ("alpha", |c| c.hyper.alpha = f64::NAN),
            ("beta1", |c| c.hyper.beta1 = 1.0),
            ("beta2", |c| c.hyper.beta2 = 1.0 - 1e-10),
            ("eps", |c| c.hyper.eps = 0.0),
            ("eps", |c| c.hyper.eps = 1e-39),
            ("weight_decay", |c| c.hyper.weight_decay = -1e-300),
            ("f_star", |c| c.settings.f_star = f64::NEG_INFINITY),
            ("factor_up", |c| c.settings.factor_up = 1.0 - 1e-12),
            ("factor_up", |c| c.settings.factor_up = f64::INFINITY),
            ("factor_down", |c| c.settings.factor_down = 0.0),
            ("factor_down", |c| c.settings.factor_down = 1.0 + 1e-12),
            ("threshold_down", |c| c.settings.threshold_down = f64::NAN),
            ("threshold_up", |c| {
                c.settings.threshold_up = c.settings.threshold_down - 1e-12
            }),
            ("threshold_up", |c| c.settings.threshold_up = f64::INFINITY),
            ("lr_min", |c| c.settings.lr_min = -1e-300),
            ("lr_min", |c| c.settings.lr_min = f64::INFINITY),
            ("lr_max", |c| c.settings.lr_max = 0.0),
            ("lr_max", |c| {
                (c.settings.lr_min, c.settings.lr_max) = (c.lr, c.lr * (1.0 - 1e-12))
            }),
            ("lr", |c| c.settings.lr_max = c.lr * (1.0 - 1e-12)),
            ("scale_max", |c| c.settings.scale_max = 0.0),
            ("denom_eps", |c| c.settings.denom_eps = f64::INFINITY),
            ("denom_eps", |c| c.settings.denom_eps = -1e-300),
            ("reeval_every", |c| c.schedule = ReevalSchedule::Every(0)),
            ("reeval_growth", |c| {
                c.schedule = ReevalSchedule::Geometric(1.0 - 1e-12)
            }),
            ("reeval_growth", |c| {
                c.schedule = ReevalSchedule::Geometric(f64::INFINITY)
            }),
            ("device_ordinal", |c| {
                c.device = Device::Cuda { ordinal: -1 }
            }),
        ];
        let base = Config::defaults(OptimizerKind::Adam);
        base.validate().expect("the defaults are valid");
        for (i, (name, edit)) in inside.iter().enumerate() {
            let mut c = base;
            edit(&mut c);
            if let Err(e) = c.validate() {
                panic!("inside edit {i} of {name} refused: {e}");
            }
        }
        for (i, (name, edit)) in past.iter().enumerate() {
            let mut c = base;
            edit(&mut c);
            match c.validate() {
                Ok(()) => panic!("edit {i} past {name}'s bound accepted"),
                Err(e) => {
                    assert_eq!(e.status, crate::Status::InvalidConfig, "{e}");
                    assert!(
                        e.message.starts_with(&format!("{name} = ")),
                        "edit {i} past {name}'s bound: {e}"
                    );
                    // Values print in exponent form where that is shorter
                    // (-1e-300, not 300 zeros): a message stays readable.
                    assert!(e.message.len() < 200, "edit {i}: {e}");
                }
            }
        }
    }
}
