//! `kernels/lra.ptx` (the text the library embeds) run by the PTX
//! interpreter against the CPU backend: every optimizer × dtype × size ×
//! special values, in every pass of a step. Parameters and optimizer state
//! must equal the CPU backend bit for bit (any NaN equals any NaN: payloads
//! differ between x86 and PTX); φ must equal a host reproduction of the
//! kernel's reduction order bit for bit, and stay identical under permuted
//! block and thread schedules and grid sizes.

mod ptx_common;

use lra::backend::cuda::abi;
use lra::optim::{DType, OptimizerKind};
use ptx_common::*;
use ptx_interp::{Module, Schedule};

const SIZES: [usize; 10] = [0, 1, 31, 32, 33, 255, 256, 257, 4097, 3 * 4096 + 1001];

fn module() -> Module {
    Module::load(abi::PTX).unwrap_or_else(|e| panic!("kernels/lra.ptx does not load: {e}"))
}

/// Fused steps (the default mode) of every optimizer at every size, as
/// single tensors (aligned, and misaligned so the scalar path runs) and
/// mixed in one launch (six tensors; forty small ones sharing chunks).
fn fused_matrix(dt: DType) {
    let m = module();
    let steps = [
        plan(Pass::Fused, 1e-2),
        plan(Pass::Fused, 5e-2),
        plan(Pass::Fused, 1e-3),
    ];
    let finite_steps = steps.map(|s| StepPlan {
        nonfinite_grads: false,
        ..s
    });
    let mut stats = PhiStats::default();
    for (ki, kind) in OptimizerKind::ALL.into_iter().enumerate() {
        let mut layouts: Vec<Vec<Spec>> = SIZES.iter().map(|&n| vec![spec(dt, n)]).collect();
        for n in [257, 4097] {
            layouts.push(vec![Spec {
                dtype: dt,
                numel: n,
                misalign: true,
            }]);
        }
        layouts.push(vec![
            spec(dt, 33),
            Spec {
                dtype: DType::F16,
                numel: 4097,
                misalign: true,
            },
            spec(DType::Bf16, 0),
            spec(DType::Bf16, 300),
            spec(DType::F32, 1),
            spec(dt, 4096),
        ]);
        // many small tensors: chunks made of many segments, tensors cut
        // across chunk boundaries, vector and scalar paths side by side
        layouts.push(
            (0..40)
                .map(|i| Spec {
                    dtype: [dt, DType::F16, DType::Bf16, DType::F32][i % 4],
                    numel: (i * 97) % 613 + i % 3,
                    misalign: i % 5 == 2,
                })
                .collect(),
        );
        for (li, specs) in layouts.iter().enumerate() {
            for nonfinite in [true, false] {
                let c = Case {
                    name: format!(
                        "{}/{}/{:?}/nonfinite {nonfinite}",
                        kind.name(),
                        dt.name(),
                        specs
                            .iter()
                            .map(|s| (s.dtype, s.numel, s.misalign))
                            .collect::<Vec<_>>()
                    ),
                    kind,
                    specs,
                    hyper: hyper(kind, (ki + li) % 2 == 1),
                    steps: if nonfinite { &steps } else { &finite_steps },
                    nonfinite_init: nonfinite,
                    seed: 1000 * ki as u64 + li as u64 + 17 * dt as u64 + 7919 * nonfinite as u64,
                    grid: None,
                    schedule: Schedule::InOrder,
                };
                let finite = run(&m, &c).1;
                if !nonfinite {
                    stats.add(finite);
                }
            }
        }
    }
    stats.assert_meaningful(&format!("fused {}", dt.name()));
}

#[test]
fn fused_f32_every_optimizer_and_size_equals_cpu() {
    fused_matrix(DType::F32);
}

#[test]
fn fused_f16_every_optimizer_and_size_equals_cpu() {
    fused_matrix(DType::F16);
}

#[test]
fn fused_bf16_every_optimizer_and_size_equals_cpu() {
    fused_matrix(DType::Bf16);
}

/// The guard, found_inf (1 and NaN), two-pass with f* known or R > 0, and
/// the sharded split, for every optimizer, on a mixed multi-chunk layout.
#[test]
fn guarded_two_pass_sharded_and_found_inf_steps_equal_cpu() {
    let m = module();
    let specs = [
        spec(DType::F32, 4097),
        Spec {
            dtype: DType::Bf16,
            numel: 1001,
            misalign: true,
        },
        spec(DType::F16, 64),
    ];
    let finite = |p: Pass, lr: f64, loss: f64| StepPlan {
        pass: p,
        lr,
        loss,
        nonfinite_grads: false,
        found_inf: None,
    };
    let steps = [
        finite(Pass::Guarded, 1e-2, 1.0),
        StepPlan {
            nonfinite_grads: true,
            ..finite(Pass::Guarded, 1e-2, 1.0)
        },
        finite(
            Pass::Scaled {
                f_star: 0.25,
                obs_var: 0.0,
            },
            2e-2,
            1.0,
        ),
        finite(
            Pass::Scaled {
                f_star: f64::NAN,
                obs_var: 0.3,
            },
            1e-2,
            2.0,
        ),
        StepPlan {
            found_inf: Some(1.0),
            ..finite(Pass::Fused, 1e-2, 1.0)
        },
        StepPlan {
            found_inf: Some(f32::NAN),
            ..finite(
                Pass::Scaled {
                    f_star: 0.0,
                    obs_var: 0.0,
                },
                1e-2,
                1.0,
            )
        },
        StepPlan {
            found_inf: Some(0.0),
            ..finite(Pass::Guarded, 1e-2, 1.0)
        },
        finite(
            Pass::Sharded {
                f_star: f64::NAN,
                obs_var: 0.1,
            },
            1e-2,
            1.0,
        ),
        StepPlan {
            nonfinite_grads: true,
            ..finite(
                Pass::Sharded {
                    f_star: 0.5,
                    obs_var: 0.0,
                },
                1e-2,
                1.0,
            )
        },
        finite(Pass::Fused, 3e-2, 1.0),
    ];
    let mut stats = PhiStats::default();
    for (ki, kind) in OptimizerKind::ALL.into_iter().enumerate() {
        let (_, st) = run(
            &m,
            &Case {
                name: format!("{}/mixed passes", kind.name()),
                kind,
                specs: &specs,
                hyper: hyper(kind, ki % 2 == 0),
                steps: &steps,
                nonfinite_init: false,
                seed: 77 + ki as u64,
                grid: None,
                schedule: Schedule::InOrder,
            },
        );
        stats.add(st);
    }
    stats.assert_meaningful("guarded/two-pass/sharded");
}

/// Same inputs, different block orders, thread interleavings and grid
/// sizes: the same bits everywhere (parameters, state, φ).
#[test]
fn results_and_phi_are_identical_under_every_schedule_and_grid() {
    let m = module();
    let specs = [
        spec(DType::F32, 2 * 4096 + 5),
        Spec {
            dtype: DType::F16,
            numel: 4096 + 3,
            misalign: true,
        },
        spec(DType::Bf16, 31),
    ];
    let steps = [
        StepPlan {
            nonfinite_grads: false,
            ..plan(Pass::Fused, 1e-2)
        },
        StepPlan {
            nonfinite_grads: false,
            ..plan(
                Pass::Scaled {
                    f_star: 0.5,
                    obs_var: 0.0,
                },
                1e-2,
            )
        },
    ];
    let nchunks = abi::chunk_table(&specs.iter().map(|s| s.numel).collect::<Vec<_>>())
        .chunks
        .len() as u32;
    for kind in [OptimizerKind::Adam, OptimizerKind::Nesterov] {
        let case = |grid: Option<u32>, schedule: Schedule| Case {
            name: format!("{}/grid {grid:?}/{schedule:?}", kind.name()),
            kind,
            specs: &specs,
            hyper: hyper(kind, false),
            steps: &steps,
            nonfinite_init: false,
            seed: 5,
            grid,
            schedule,
        };
        let (base, stats) = run(&m, &case(Some(2), Schedule::InOrder));
        assert_eq!(
            stats.finite_phi,
            stats.phi_checks,
            "{}: every φ of this case is finite",
            kind.name()
        );
        let variants = [
            (Some(1), Schedule::InOrder),
            (Some(nchunks), Schedule::Reversed),
            (
                Some(2),
                Schedule::Random {
                    seed: 11,
                    resident: 2,
                    max_quantum: 7,
                },
            ),
            (
                Some(nchunks),
                Schedule::Random {
                    seed: 12,
                    resident: nchunks as usize,
                    max_quantum: 1,
                },
            ),
            (
                Some(3),
                Schedule::Random {
                    seed: 13,
                    resident: 3,
                    max_quantum: 200,
                },
            ),
        ];
        for (grid, sched) in variants {
            let (r, _) = run(&m, &case(grid, sched.clone()));
            assert_eq!(
                r,
                base,
                "{} grid {grid:?} {sched:?}: results differ from grid 2 in order",
                kind.name()
            );
        }
    }
}
