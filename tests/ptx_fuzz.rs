//! A seeded random differential test of `kernels/lra.ptx` against the CPU
//! backend, on the PTX interpreter.
//!
//! `ptx_kernels.rs` checks chosen layouts and step sequences; this draws
//! them. Each case is a random layout (1 to 300 tensors of every dtype,
//! aligned and not, sizes around 0, the 4-element units and the 4096-element
//! chunks), a random optimizer and hyper-parameters, and 2 to 6 random steps
//! mixing every pass (fused, guarded, two-pass with f* and/or R, sharded
//! with and without the guard and with other ranks' flags and φ, clamped
//! scale), found-inf flags (±0, 1, NaN, a subnormal, +inf, -1) and
//! non-finite gradients, run on a random grid
//! size, block size and block/thread schedule. Every step is checked as in
//! `ptx_kernels.rs` (`ptx_common::try_run`): parameters and state bit for
//! bit, the control block, φ in the kernel's documented order, and what
//! each side hands the cross-rank sum.
//!
//! CI runs a fixed seed. Longer runs: `LRA_PTX_FUZZ_SEED=<seed>
//! LRA_PTX_FUZZ_CASES=<n> cargo test --release --test ptx_fuzz --
//! --nocapture`. A failure prints the case's own seed; rerun it alone with
//! `LRA_PTX_FUZZ_CASES=1`.

mod ptx_common;
mod support;

use lra::backend::cuda::abi;
use lra::optim::{DType, Hyper, OptimizerKind};
use ptx_common::*;
use ptx_interp::{Module, Schedule};
use std::collections::BTreeMap;

/// Elements a case may hold in all: keeps one case near a second.
const MAX_ELEMENTS: usize = 24_000;

/// A tensor size near the edges the kernel cares about: empty, a few
/// elements (tails of 1–3 past the 4-element units), and just around
/// multiples of the 4096-element chunk.
fn size(rng: &mut Rng, small: bool) -> usize {
    match rng.index(if small { 3 } else { 5 }) {
        0 => 0,
        1 => 1 + rng.index(8),
        2 => rng.index(64),
        3 => (1 + rng.index(2)) * abi::CHUNK + rng.index(9) - 4,
        _ => 1 + rng.index(6000),
    }
}

fn layout(rng: &mut Rng) -> Vec<Spec> {
    // one tensor, a few, dozens, or hundreds of tiny ones (table indices
    // past 255, chunks of hundreds of segments)
    let (n, small) = match rng.index(10) {
        0..=2 => (1, false),
        3..=6 => (2 + rng.index(7), false),
        7 | 8 => (9 + rng.index(56), true),
        _ => (200 + rng.index(101), true),
    };
    let mut total = 0;
    (0..n)
        .map(|_| {
            let numel = size(rng, small).min(MAX_ELEMENTS.saturating_sub(total));
            total += numel;
            Spec {
                dtype: rng.pick(&[DType::F32, DType::F16, DType::Bf16]),
                numel,
                misalign: rng.chance(0.25),
            }
        })
        .collect()
}

fn rule(rng: &mut Rng) -> (f64, f64) {
    // f* known, R > 0, or both (f* unknown with R = 0 is the fused step)
    match rng.index(3) {
        0 => (rng.pick(&[0.0, 0.25, 0.5, 0.99]), 0.0),
        1 => (f64::NAN, rng.pick(&[1e-3, 0.1, 0.3])),
        _ => (rng.pick(&[0.25, 0.5]), rng.pick(&[1e-3, 0.1])),
    }
}

fn pass(rng: &mut Rng) -> Pass {
    match rng.index(7) {
        0 => Pass::Fused,
        1 => Pass::Guarded,
        2 => {
            let (f_star, obs_var) = rule(rng);
            Pass::Scaled { f_star, obs_var }
        }
        3 => {
            let (f_star, obs_var) = rule(rng);
            Pass::Sharded { f_star, obs_var }
        }
        6 => {
            let (f_star, obs_var) = rule(rng);
            Pass::ShardedUnguarded { f_star, obs_var }
        }
        4 => {
            // what the other ranks add to [non-finite count, found_inf
            // flags, φ]: mostly nothing to skip for, so the step runs
            let peers = [
                if rng.chance(0.15) { 1.0 } else { 0.0 },
                if rng.chance(0.15) { 1.0 } else { 0.0 },
                rng.pick(&[0.0, 3e-3, -1e-4, 2.5]),
            ];
            let rule = if rng.chance(0.5) {
                Some(rule(rng))
            } else {
                None
            };
            Pass::ShardedPeers { rule, peers }
        }
        _ => {
            let (f_star, obs_var) = rule(rng);
            Pass::Clamped {
                f_star,
                obs_var,
                scale_max: rng.pick(&[0.5, 1.0, 3.0]),
            }
        }
    }
}

/// Each hyper-parameter from a few values: 0, the defaults, values where
/// β and 1 − β differ and β^t is not dyadic, eps 0 (0/0 = NaN on both
/// sides), and a weight decay of ±0 or either sign.
fn hyper_params(rng: &mut Rng) -> Hyper {
    let beta = [0.0, 0.5, 0.8, 0.9, 0.99];
    Hyper {
        momentum: rng.pick(&beta),
        alpha: rng.pick(&beta),
        beta1: rng.pick(&beta),
        beta2: rng.pick(&[0.9, 0.95, 0.999]),
        // eps 0 less often: its NaN directions leave fewer finite φ
        eps: rng.pick(&[0.0, 1e-8, 1e-8, 1e-3, 1e-3]),
        weight_decay: rng.pick(&[0.0, -0.0, 1e-3, -1e-3, 0.1]),
    }
}

/// Counts the draws [`COVERED`] names: the hyper-parameters a case's
/// optimizer reads, and each step's found_inf flag.
fn tally(kind: OptimizerKind, h: &Hyper, steps: &[StepPlan], seen: &mut BTreeMap<String, usize>) {
    for (name, v) in h.read_by(kind) {
        let class = match name {
            "weight_decay" if v == 0.0 && v.is_sign_negative() => "-0",
            "weight_decay" if v < 0.0 => "negative",
            "eps" if v == 0.0 => "0",
            // not an f32: a kernel reading an f32 copy (β^t) gets other bits
            "momentum" | "alpha" | "beta1" if v as f32 as f64 != v => "inexact in f32",
            _ => continue,
        };
        *seen.entry(format!("{name} {class}")).or_default() += 1;
    }
    for f in steps.iter().filter_map(|s| s.found_inf) {
        *seen.entry(format!("found_inf {f:e}")).or_default() += 1;
    }
}

/// The draws the default cases must include (`FuzzSeeds::assert_covered`).
const COVERED: [&str; 13] = [
    "momentum inexact in f32",
    "alpha inexact in f32",
    "beta1 inexact in f32",
    "eps 0",
    "weight_decay -0",
    "weight_decay negative",
    "found_inf 0e0",
    "found_inf -0e0",
    "found_inf 1e0",
    "found_inf NaN",
    "found_inf 1e-45",
    "found_inf inf",
    "found_inf -1e0",
];

fn steps(rng: &mut Rng) -> Vec<StepPlan> {
    let n = 2 + rng.index(5);
    (0..n)
        .map(|k| {
            let p = pass(rng);
            // A non-finite gradient that a step writes poisons every later
            // φ (NaN equals NaN, so those comparisons would prove nothing):
            // only on the last step, or where the guard skips the step.
            let guarded = p.shape().guard;
            let nonfinite_grads = (k + 1 == n || guarded) && rng.chance(0.2);
            // set (skips the step) or clear, each as often as before; any
            // non-zero float is set, -0.0 is not
            let found_inf = match rng.index(10) {
                0 | 1 => Some(rng.pick(&[1.0, f32::NAN, f32::from_bits(1), f32::INFINITY, -1.0])),
                2 | 3 => Some(rng.pick(&[0.0, -0.0])),
                _ => None,
            };
            StepPlan {
                pass: p,
                lr: rng.pick(&[1e-3, 1e-2, 3e-2, 0.1]),
                loss: rng.pick(&[1.0, 0.6, 2.0]),
                nonfinite_grads,
                found_inf,
            }
        })
        .collect()
}

fn schedule(rng: &mut Rng) -> Schedule {
    match rng.index(4) {
        0 | 1 => Schedule::InOrder,
        2 => Schedule::Reversed,
        _ => Schedule::Random {
            seed: rng.next(),
            resident: 1 + rng.index(4),
            max_quantum: 1 + rng.index(40) as u32,
        },
    }
}

/// Runs one case drawn from `seed`; returns its description and how it
/// went (the first difference on failure).
fn one_case(
    m: &Module,
    seed: u64,
    seen: &mut BTreeMap<String, usize>,
) -> (String, Result<PhiStats, String>) {
    let mut rng = Rng(seed);
    let specs = layout(&mut rng);
    let kind = rng.pick(&OptimizerKind::ALL);
    let hyper = hyper_params(&mut rng);
    let steps = steps(&mut rng);
    tally(kind, &hyper, &steps, seen);
    let grid = if rng.chance(0.3) {
        Some(1 + rng.index(5) as u32)
    } else {
        None
    };
    let block = if rng.chance(0.25) {
        rng.pick(&[32, 96, 512, 1024])
    } else {
        abi::BLOCK
    };
    let case = Case {
        name: format!("seed {seed}"),
        kind,
        specs: &specs,
        hyper,
        steps: &steps,
        nonfinite_init: rng.chance(0.1),
        seed: rng.next(),
        grid,
        block,
        schedule: schedule(&mut rng),
    };
    let elements: usize = specs.iter().map(|s| s.numel).sum();
    let what = format!(
        "seed {seed}: {} {:?}, {} tensors ({elements} elements), grid {grid:?}, \
         {block} threads, {:?}, steps {:?}",
        kind.name(),
        hyper.read_by(kind).collect::<Vec<_>>(),
        specs.len(),
        case.schedule,
        steps
            .iter()
            .map(|s| format!("{:?} found_inf {:?}", s.pass, s.found_inf))
            .collect::<Vec<_>>()
    );
    (what, try_run(m, &case).map(|(_, stats)| stats))
}

#[test]
fn random_layouts_and_step_sequences_equal_cpu() {
    let m = kernel_module();
    let seeds = support::FuzzSeeds::from_env("LRA_PTX_FUZZ", 0x5eed_0001, 40);
    let (first, cases) = (seeds.first, seeds.cases);
    let mut stats = PhiStats::default();
    let mut failures = Vec::new();
    let mut seen = BTreeMap::new();
    for seed in seeds.seeds() {
        let (what, result) = one_case(&m, seed, &mut seen);
        match result {
            Ok(s) => stats.add(s),
            Err(e) => {
                eprintln!("FAILED {what}\n  {e}");
                failures.push(format!(
                    "{e}\n  case: {what}\n  reproduce alone: LRA_PTX_FUZZ_SEED={seed} \
                     LRA_PTX_FUZZ_CASES=1 cargo test --release --test ptx_fuzz -- --nocapture"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    stats.assert_meaningful(&format!("{cases} random cases from seed {first}"));
    seeds.assert_covered("ptx_fuzz", &seen, &COVERED);
}
