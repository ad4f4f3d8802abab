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
            "{name} = {v} must be a positive finite number"
        );
    }
    Ok(())
}

fn in_unit_interval(name: &str, v: f64, closed_low: bool) -> Result<()> {
    let ok = v.is_finite() && v < 1.0 && (v > 0.0 || (closed_low && v == 0.0));
    if !ok {
        let lo = if closed_low { "[0" } else { "(0" };
        fail!(InvalidConfig, "{name} = {v} must lie in {lo}, 1)");
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
            "{name} = {v} is outside f32's normal range (about 1.2e-38 to 3.4e38): the update computes with it as an f32 ({f})"
        );
    }
    if below_one && f >= 1.0 {
        fail!(
            InvalidConfig,
            "{name} = {v} rounds to 1 as an f32, which the update computes with: it must be below 1 - 2^-25"
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
            in_unit_interval(name, v, true)?;
            usable_as_f32(name, v, true)?;
        }
        positive_finite("eps", h.eps)?;
        usable_as_f32("eps", h.eps, false)?;
        if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
            fail!(
                InvalidConfig,
                "weight_decay = {} must be finite and >= 0",
                h.weight_decay
            );
        }
        usable_as_f32("weight_decay", h.weight_decay, false)?;
        let s = &self.settings;
        if s.f_star.is_infinite() {
            fail!(
                InvalidConfig,
                "f_star = {} must be finite, or NaN for unknown",
                s.f_star
            );
        }
        if !(s.factor_up.is_finite() && s.factor_up >= 1.0) {
            fail!(
                InvalidConfig,
                "factor_up = {} must be finite and >= 1",
                s.factor_up
            );
        }
        if !(s.factor_down > 0.0 && s.factor_down <= 1.0) {
            fail!(
                InvalidConfig,
                "factor_down = {} must lie in (0, 1]",
                s.factor_down
            );
        }
        if !s.threshold_down.is_finite() {
            fail!(
                InvalidConfig,
                "threshold_down = {} must be finite",
                s.threshold_down
            );
        }
        if !(s.threshold_up.is_finite() && s.threshold_up >= s.threshold_down) {
            fail!(
                InvalidConfig,
                "threshold_up = {} must be finite and >= threshold_down = {}",
                s.threshold_up,
                s.threshold_down
            );
        }
        if !(s.lr_min.is_finite() && s.lr_min >= 0.0) {
            fail!(
                InvalidConfig,
                "lr_min = {} must be finite and >= 0",
                s.lr_min
            );
        }
        if !(s.lr_max > 0.0 && s.lr_max >= s.lr_min) {
            fail!(
                InvalidConfig,
                "lr_max = {} must be > 0 and >= lr_min = {}",
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
                "scale_max = {} must be > 0 (+inf for no cap)",
                s.scale_max
            );
        }
        if !(s.denom_eps.is_finite() && s.denom_eps >= 0.0) {
            fail!(
                InvalidConfig,
                "denom_eps = {} must be finite and >= 0",
                s.denom_eps
            );
        }
        match self.schedule {
            ReevalSchedule::Every(0) => {
                fail!(InvalidConfig, "reeval_every = 0 must be >= 1")
            }
            ReevalSchedule::Geometric(r) if !(r.is_finite() && r >= 1.0) => {
                fail!(InvalidConfig, "reeval_growth = {r} must be finite and >= 1")
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
