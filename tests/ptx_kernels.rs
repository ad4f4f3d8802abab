//! `kernels/lra.ptx` (the text the library embeds) run by the PTX
//! interpreter against the CPU backend: every optimizer × dtype × size ×
//! special values, in every pass of a step. Parameters and optimizer state
//! must equal the CPU backend bit for bit (any NaN equals any NaN: payloads
//! differ between x86 and PTX); φ must equal a host reproduction of the
//! kernel's reduction order bit for bit, and stay identical under permuted
//! block and thread schedules and grid sizes.

mod ptx_common;
mod support;

use half::{bf16, f16};
use lra::backend::cuda::abi;
use lra::optim::{DType, Hyper, OptimizerKind};
use ptx_common::*;
use ptx_interp::Schedule;

const SIZES: [usize; 10] = [0, 1, 31, 32, 33, 255, 256, 257, 4097, 3 * 4096 + 1001];

/// Fused steps (the default mode) of every optimizer at every size, as
/// single tensors (aligned, and misaligned so the scalar path runs) and
/// mixed in one launch (six tensors; forty small ones sharing chunks).
fn fused_matrix(dt: DType) {
    let m = kernel_module();
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
                    block: abi::BLOCK,
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
    let m = kernel_module();
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
            &Case::plain(
                format!("{}/mixed passes", kind.name()),
                kind,
                &specs,
                hyper(kind, ki % 2 == 0),
                &steps,
                77 + ki as u64,
            ),
        );
        stats.add(st);
    }
    stats.assert_meaningful("guarded/two-pass/sharded");
}

/// Same inputs, different block orders, thread interleavings and grid
/// sizes: the same bits everywhere (parameters, state, φ).
#[test]
fn results_and_phi_are_identical_under_every_schedule_and_grid() {
    let m = kernel_module();
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
            block: abi::BLOCK,
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

/// The library launches 256 threads per block; kernels/README.md says the
/// kernel works for any multiple of 32 up to 1024 (one warp to a full
/// block, and 96: warps that do not fill the reduction's 32 slots). At
/// each, every pass on a layout with scalar tails, a misaligned tensor,
/// mixed dtypes and a chunk of more segments than one staging batch (256,
/// or fewer threads) equals the CPU bit for bit, and φ equals the reduction
/// order written for that many threads; the final stage too, over three to
/// four partials per thread.
#[test]
fn every_allowed_block_size_equals_cpu_in_every_pass() {
    let m = kernel_module();
    let mut specs = vec![
        spec(DType::F32, 2 * 4096 + 1001),
        Spec {
            dtype: DType::F16,
            numel: 4097,
            misalign: true,
        },
        spec(DType::Bf16, 31),
    ];
    // 600 tensors of 0 to 12 elements: a chunk of 385 segments
    specs.extend((0..600).map(|i| Spec {
        dtype: [DType::F32, DType::F16, DType::Bf16][i % 3],
        numel: i % 13,
        misalign: i % 11 == 4,
    }));
    let chunks = abi::chunk_table(&specs.iter().map(|s| s.numel).collect::<Vec<_>>());
    assert!(chunks.chunks.iter().any(|c| c.end - c.first > 256));
    // non-finite gradients only where they cannot poison later steps: the
    // guard skips the third step; the last one writes NaNs
    let steps = [
        finite(Pass::Fused, 1e-2),
        finite(Pass::Guarded, 1e-2),
        plan(Pass::Guarded, 1e-2),
        finite(
            Pass::Scaled {
                f_star: 0.25,
                obs_var: 0.1,
            },
            2e-2,
        ),
        finite(
            Pass::Sharded {
                f_star: f64::NAN,
                obs_var: 0.1,
            },
            1e-2,
        ),
        StepPlan {
            found_inf: Some(1.0),
            ..finite(Pass::Guarded, 1e-2)
        },
        finite(Pass::Fused, 3e-2),
        plan(Pass::Fused, 1e-2),
    ];
    let mut rng = Rng(9);
    let mut final_order_shows = false;
    // the block size shapes the deal, the staging and the reductions, not
    // the per-element math: one optimizer without state, one with
    for block in [32, 96, 1024] {
        let mut stats = PhiStats::default();
        for kind in [OptimizerKind::Sgd, OptimizerKind::Nesterov] {
            let c = Case {
                block,
                ..Case::plain(
                    format!("{}/{block} threads", kind.name()),
                    kind,
                    &specs,
                    hyper(kind, true),
                    &steps,
                    31 + block as u64,
                )
            };
            stats.add(run(&m, &c).1);
        }
        stats.assert_meaningful(&format!("{block} threads"));
        assert!(
            stats.block_order_shows > 0,
            "{block} threads: no φ whose bits tell this order from 256 threads' ({stats:?})"
        );
        let parts: Vec<f64> = (0..3 * block as usize + 17)
            .map(|_| rng.value() as f64 * (1.0 + rng.value() as f64))
            .collect();
        let want = final_sum(&parts, 0.01, &BFLY, block as usize);
        let got = final_stage_phi(&m, &parts, 0.01, (3, block), Schedule::InOrder).unwrap();
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "final stage at {block} threads: {got:e} vs {want:e}"
        );
        final_order_shows |= want.to_bits() != final_sum(&parts, 0.01, &BFLY, 256).to_bits();
    }
    assert!(
        final_order_shows,
        "the partials do not tell block sizes apart"
    );
}

/// A small mixed layout (vector and scalar paths, two chunks) for the
/// skip and clamp tests below.
fn small_mixed() -> [Spec; 3] {
    [
        spec(DType::F32, 4097),
        spec(DType::F16, 33),
        Spec {
            dtype: DType::Bf16,
            numel: 7,
            misalign: true,
        },
    ]
}

fn finite(pass: Pass, lr: f64) -> StepPlan {
    StepPlan {
        nonfinite_grads: false,
        ..plan(pass, lr)
    }
}

/// found_inf set (1 or NaN) on the very first step of a handle, in every
/// pass: nothing is written (parameters, state, bias powers, step count)
/// and φ is NaN; the next step is a first step. No launch may read the φ
/// partials then: no chunk wrote them yet (GradScaler's first steps with
/// fp16 overflow routinely), and the interpreter rejects reading them.
#[test]
fn found_inf_on_the_first_step_is_a_no_op_in_every_pass() {
    let m = kernel_module();
    let specs = small_mixed();
    let passes = [
        Pass::Fused,
        Pass::Guarded,
        Pass::Scaled {
            f_star: 0.5,
            obs_var: 0.0,
        },
        Pass::Sharded {
            f_star: f64::NAN,
            obs_var: 0.2,
        },
        Pass::ShardedPeers {
            rule: None,
            peers: [0.0; 3],
        },
    ];
    for (i, pass) in passes.into_iter().enumerate() {
        for flag in [1.0, f32::NAN] {
            let kind = [OptimizerKind::Adam, OptimizerKind::Momentum][i % 2];
            let steps = [
                StepPlan {
                    found_inf: Some(flag),
                    ..finite(pass, 1e-2)
                },
                StepPlan {
                    found_inf: Some(0.0),
                    ..finite(pass, 1e-2)
                },
            ];
            run(
                &m,
                &Case::plain(
                    format!("{}/{pass:?}/found_inf {flag} first", kind.name()),
                    kind,
                    &specs,
                    hyper(kind, true),
                    &steps,
                    40 + i as u64,
                ),
            );
        }
    }
}

/// Every optimizer with hyper-parameters that differ from one another
/// (`support::distinct_hyper`), in every pass: the defaults make Adam's
/// β1 and 1 − β1 both 0.5 and β1^t exact, so swapped operands or an f32 β1
/// in the bias correction would pass every other test here.
#[test]
fn non_default_hyper_parameters_equal_cpu() {
    let m = kernel_module();
    let specs = small_mixed();
    let passes = [
        Pass::Fused,
        Pass::Guarded,
        Pass::Scaled {
            f_star: 0.25,
            obs_var: 0.1,
        },
        Pass::Sharded {
            f_star: f64::NAN,
            obs_var: 0.3,
        },
    ];
    // three rounds, so the bias powers are past β^1
    let steps: Vec<StepPlan> = (0..12).map(|k| finite(passes[k % 4], 1e-2)).collect();
    let mut stats = PhiStats::default();
    for (ki, kind) in OptimizerKind::ALL.into_iter().enumerate() {
        let (_, st) = run(
            &m,
            &Case::plain(
                format!("{}/distinct hyper", kind.name()),
                kind,
                &specs,
                support::distinct_hyper(kind),
                &steps,
                7 + ki as u64,
            ),
        );
        stats.add(st);
    }
    stats.assert_meaningful("distinct hyper-parameters");
}

/// found_inf is tested as a float (`!= 0`), as the CPU backend does: -0.0
/// is clear and the step runs; the smallest subnormal (no flush to zero),
/// +inf and -1 are set and skip it. A test of the raw bits would skip on
/// -0.0 on the device alone.
#[test]
fn found_inf_minus_zero_runs_and_subnormal_inf_or_negative_skip() {
    let m = kernel_module();
    let specs = small_mixed();
    let passes = [
        Pass::Fused,
        Pass::Guarded,
        Pass::Scaled {
            f_star: 0.5,
            obs_var: 0.0,
        },
        Pass::Sharded {
            f_star: f64::NAN,
            obs_var: 0.2,
        },
    ];
    for flag in [-0.0f32, f32::from_bits(1), f32::INFINITY, -1.0] {
        let steps: Vec<StepPlan> = passes
            .into_iter()
            .map(|p| StepPlan {
                found_inf: Some(flag),
                ..finite(p, 1e-2)
            })
            .collect();
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            let (dev, _) = run(
                &m,
                &Case::plain(
                    format!("{}/found_inf {flag:e}", kind.name()),
                    kind,
                    &specs,
                    hyper(kind, true),
                    &steps,
                    11,
                ),
            );
            // a skipped step reports φ = NaN (run checked the CPU agrees)
            let ran = dev.phis.iter().map(|&b| !f64::from_bits(b).is_nan());
            for (k, ran) in ran.enumerate() {
                assert_eq!(
                    ran,
                    flag == 0.0,
                    "{} found_inf {flag:e} step {k}",
                    kind.name()
                );
            }
        }
    }
}

/// Sharded steps where the other ranks' part of the pre-write sum decides:
/// some rank's found_inf (bit 31 of `control.nonfinite`, written by the
/// host) skips this rank as FoundInf with its own flag clear; some rank's
/// non-finite gradient skips it as NonfiniteGrad; the scale of a two-pass
/// step comes from the summed φ. Fused (check launch only before the sum)
/// and two-pass, equal to the CPU backend given the same sum.
#[test]
fn other_ranks_flags_and_phi_decide_sharded_steps() {
    let m = kernel_module();
    let specs = small_mixed();
    let mut steps = Vec::new();
    for rule in [None, Some((0.25, 0.0)), Some((f64::NAN, 0.1))] {
        // (φ = +inf from the sum: the scale rule's limit, 0 with f* known)
        for peers in [
            [0.0, 1.0, 0.0],
            [2.0, 0.0, 0.0],
            [0.0, 0.0, 3e-3],
            [0.0, 0.0, f64::INFINITY],
            [0.0; 3],
        ] {
            steps.push(finite(Pass::ShardedPeers { rule, peers }, 1e-2));
        }
        // this rank's own non-finite gradient, and its own found_inf
        steps.push(StepPlan {
            nonfinite_grads: true,
            ..finite(
                Pass::ShardedPeers {
                    rule,
                    peers: [0.0; 3],
                },
                1e-2,
            )
        });
        steps.push(StepPlan {
            found_inf: Some(1.0),
            ..finite(
                Pass::ShardedPeers {
                    rule,
                    peers: [0.0, 0.0, 3e-3],
                },
                1e-2,
            )
        });
    }
    for kind in [OptimizerKind::Adam, OptimizerKind::Nesterov] {
        run(
            &m,
            &Case::plain(
                format!("{}/other ranks", kind.name()),
                kind,
                &specs,
                hyper(kind, false),
                &steps,
                61,
            ),
        );
    }
}

/// A finite `scale_max` clamps the device's scale as `ScaleRule::scale`
/// does: above (f* far below the loss), and the fallback s = 1 when
/// φ + R is not positive, except at or below f*, where s = 0 whatever φ
/// is. Every other test runs with `scale_max` = +inf.
/// Last, with no clamp, s·η beyond f32's range saturates at f32::MAX.
#[test]
fn scale_max_clamps_the_device_scale() {
    let m = kernel_module();
    let specs = small_mixed();
    let steps = [
        finite(
            Pass::Clamped {
                f_star: -1e30,
                obs_var: 0.0,
                scale_max: 0.75,
            },
            1e-2,
        ),
        finite(
            Pass::Clamped {
                f_star: f64::NAN,
                obs_var: -1e30,
                scale_max: 0.5,
            },
            1e-2,
        ),
        finite(
            Pass::Clamped {
                f_star: 0.9,
                obs_var: 1e-6,
                scale_max: 2.0,
            },
            1e-2,
        ),
        // f_i below f* with φ + R ≤ 0: no step (s = 0), not the fallback 1
        finite(
            Pass::Clamped {
                f_star: 1e30,
                obs_var: -1e30,
                scale_max: 2.0,
            },
            1e-2,
        ),
        // No clamp, and s·η far beyond f32's range: the effective η
        // saturates at f32::MAX (unclamped it would be inf, and elements
        // whose direction is 0 would turn NaN instead of staying put).
        finite(
            Pass::Clamped {
                f_star: -1e300,
                obs_var: 0.0,
                scale_max: f64::INFINITY,
            },
            1e-2,
        ),
    ];
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        run(
            &m,
            &Case::plain(
                format!("{}/scale_max", kind.name()),
                kind,
                &specs,
                hyper(kind, false),
                &steps,
                71,
            ),
        );
    }
}

/// A non-finite count left in the control block (a step that failed
/// between its launches) must not split an unguarded fused step: F_DECIDE
/// applies it (the guard is off), so the chunks must be written too.
#[test]
fn a_stale_nonfinite_count_does_not_split_an_unguarded_step() {
    let m = kernel_module();
    let specs = small_mixed();
    let kind = OptimizerKind::Adam;
    let h = hyper(kind, false);
    let mut rng = Rng(9);
    let params: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| values(&mut rng, s.dtype, s.numel, 0, 0, true))
        .collect();
    let grads: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| values(&mut rng, s.dtype, s.numel, 0, 0, true))
        .collect();
    let state: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0; 2 * s.numel]).collect();
    let mut gpu = Gpu::new(&m, kind, &specs, None);
    gpu.write_params(&params);
    gpu.set_state(&state);
    gpu.write_grads(&grads);
    gpu.dev
        .write(gpu.control + abi::CONTROL_NONFINITE, &1u32.to_le_bytes())
        .unwrap();
    let mut host = Host::new(kind, &specs, &params, &state);
    let out = host.step(Pass::Fused, &h, 1e-2, 1.0, &grads, false);
    gpu.step(Pass::Fused, &h, 1e-2, 1.0, false).unwrap();
    let ctl = gpu.control();
    assert_eq!(ctl.skip, skip_code(out.skip), "skip reason");
    assert_eq!(ctl.applied, 1);
    assert_eq!(ctl.nonfinite, 0, "F_END clears the count");
    for (t, (h, g)) in host.params().iter().zip(gpu.params()).enumerate() {
        assert_eq!(diff(specs[t].dtype, h, &g), None, "tensor {t}");
    }
}

/// The chunking's edges, in every pass: no tensors, only empty ones,
/// tensors ending exactly on a chunk boundary, tensors whose rounding to 4
/// ends on one, and 300 tensors (table indices past 255) of mixed dtypes,
/// alignments and sizes 0..60, and 700 tiny tensors (a chunk of more than
/// 512 segments, whose descriptors are staged 256 at a time).
#[test]
fn chunking_edges_in_every_pass_equal_cpu() {
    let m = kernel_module();
    let passes = [
        Pass::Fused,
        Pass::Guarded,
        Pass::Scaled {
            f_star: 0.5,
            obs_var: 0.0,
        },
        Pass::Sharded {
            f_star: f64::NAN,
            obs_var: 0.1,
        },
    ];
    let steps = passes.map(|p| finite(p, 1e-2));
    let many = many_tensors(300);
    // 700 tensors of 1..7 elements: a chunk of more than 512 segments,
    // staged 256 at a time
    let tiny: Vec<Spec> = (0..700)
        .map(|i| Spec {
            dtype: [DType::F32, DType::F16, DType::Bf16][i % 3],
            numel: 1 + i % 7,
            misalign: i % 5 == 2,
        })
        .collect();
    let layouts = [
        vec![],
        vec![spec(DType::F32, 0), spec(DType::Bf16, 0)],
        vec![
            spec(DType::F32, 4096),
            spec(DType::F16, 4096),
            spec(DType::Bf16, 5),
        ],
        vec![
            spec(DType::F16, 4093),
            spec(DType::F32, 3),
            spec(DType::Bf16, 4095),
            spec(DType::F32, 1),
        ],
        many,
        tiny,
    ];
    let plans: Vec<_> = layouts
        .iter()
        .map(|l| abi::chunk_table(&l.iter().map(|s| s.numel).collect::<Vec<_>>()))
        .collect();
    // the layouts are what they say: a tensor starts a chunk
    assert!(plans[0].chunks.is_empty() && plans[1].chunks.is_empty());
    for p in &plans[2..4] {
        assert!(p.chunks.len() >= 2);
        assert_eq!(p.segments[p.chunks[1].first as usize].start, 0);
    }
    assert!(plans[4].segments.iter().any(|s| s.tensor > 255));
    assert!(plans[5].chunks.iter().any(|c| c.end - c.first > 512));
    for (li, specs) in layouts.iter().enumerate() {
        for kind in [OptimizerKind::ALL[li % 7], OptimizerKind::ALL[(li + 3) % 7]] {
            run(
                &m,
                &Case {
                    name: format!("{}/edge layout {li}", kind.name()),
                    kind,
                    specs,
                    hyper: hyper(kind, li % 2 == 0),
                    steps: &steps,
                    nonfinite_init: false,
                    seed: 80 + li as u64,
                    grid: None,
                    block: abi::BLOCK,
                    schedule: Schedule::InOrder,
                },
            );
        }
    }
}

/// Chunks past 2^32 elements ([`past_two_to_the_32`]): 64-bit element
/// starts and byte offsets, 16384-element chunks, a chunk of three
/// tensors. The kernel gets the layout's real table rows; only the
/// elements those chunks touch are allocated.
#[test]
fn chunks_past_two_to_the_32_elements_equal_cpu() {
    let m = kernel_module();
    let (w, specs) = past_two_to_the_32();
    let (rows, _) = w.rows();
    assert!(rows.segments.iter().any(|s| s.start >= 1 << 32));
    assert_eq!(rows.chunks[1].end - rows.chunks[1].first, 3);
    let steps = [
        finite(Pass::Fused, 1e-2),
        finite(
            Pass::Scaled {
                f_star: 0.5,
                obs_var: 0.0,
            },
            1e-2,
        ),
    ];
    for kind in [OptimizerKind::Adam, OptimizerKind::Rmsprop] {
        let c = Case::plain(
            format!("{}/past 2^32", kind.name()),
            kind,
            &specs,
            hyper(kind, true),
            &steps,
            90,
        );
        try_run_window(&m, &c, Some(&w)).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The final stage alone over thousands of partials (the tests above have
/// at most a few chunks): one to many partials per thread, and more than
/// its sixteen loads in flight (4096 = 16 × 256), with any grid and block
/// order: φ has the bits of the fixed order (kernels/README.md, step 4),
/// which a plain sequential sum of these inputs does not have. The count
/// also ends inside each of a thread's sixteen loads in turn (each has its
/// own bounds test), at the smallest block (fewer partials to sum).
#[test]
fn phi_over_thousands_of_partials_is_in_the_fixed_order() {
    let m = kernel_module();
    let mut rng = Rng(5);
    let mut order_shows = false;
    let mut counts = vec![
        (1, 1, abi::BLOCK, Schedule::InOrder),
        (257, 2, abi::BLOCK, Schedule::Reversed),
        (4097, 3, abi::BLOCK, Schedule::InOrder),
        (
            2 * 4096 + 17,
            4,
            abi::BLOCK,
            Schedule::Random {
                seed: 3,
                resident: 2,
                max_quantum: 50,
            },
        ),
    ];
    counts.extend((1..16).map(|k| (32 * k + 1 + 7 * k % 31, 1, 32, Schedule::InOrder)));
    for (n, grid, block, schedule) in counts {
        let parts: Vec<f64> = (0..n)
            .map(|_| rng.value() as f64 * (1.0 + rng.value() as f64))
            .collect();
        let lr = 0.01;
        let want = final_sum(&parts, lr, &BFLY, block as usize);
        let got = final_stage_phi(&m, &parts, lr, (grid, block), schedule).unwrap();
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{n} partials at {block} threads: {got:e} vs {want:e}"
        );
        order_shows |= (parts.iter().sum::<f64>() * lr).to_bits() != want.to_bits();
    }
    assert!(order_shows, "the inputs do not tell summation orders apart");
}

/// The arguments of a check-pass launch (it reads only the gradients).
fn check_args(h: &Hyper) -> StepArgs<'_> {
    StepArgs {
        hyper: h,
        lr: 1e-2,
        rule: abi::NO_RULE,
        found_inf: false,
    }
}

/// The guard's check pass (`M_CHECK` alone) loads four vector items per
/// thread at a time and tests exponent bits per 32-bit word. Every full
/// chunk below is one block's, so `control.nonfinite` counts the threads
/// that saw a non-finite value: exactly one per chunk where one was put,
/// at every lane of every one of the four loads (both halves of a word for
/// f16/bf16), among finite neighbours that sit at the edges of the finite
/// range (±max, subnormals, −0), which must not count. At the library's
/// block size and at the others the kernel allows (a 4096-element chunk
/// gives each of 1024 threads one load, each of 32 threads eight groups of
/// four: there the first load of the second group and the chunk's last
/// load too, since a thread goes on to its next group after testing one).
#[test]
fn the_check_pass_finds_each_nonfinite_value_in_its_four_loads() {
    for block in [abi::BLOCK, 32, 96, 1024] {
        check_pass_finds_each_nonfinite_value(block as usize);
    }
}

fn check_pass_finds_each_nonfinite_value(block: usize) {
    let m = kernel_module();
    for dt in [DType::F32, DType::F16, DType::Bf16] {
        let specials = special_bits(dt);
        let is_finite = |bits: u32| match dt {
            DType::F32 => bits & 0x7f80_0000 != 0x7f80_0000,
            DType::F16 => bits & 0x7c00 != 0x7c00,
            DType::Bf16 => bits & 0x7f80 != 0x7f80,
        };
        let finite: Vec<u32> = specials.iter().copied().filter(|&b| is_finite(b)).collect();
        let mut bad: Vec<u32> = specials
            .iter()
            .copied()
            .filter(|&b| !is_finite(b))
            .collect();
        // NaN payloads: signalling, all ones
        bad.extend(match dt {
            DType::F32 => [0x7f80_0001, 0xffff_ffff],
            _ => [0x7c01 | ((dt == DType::Bf16) as u32 * 0x0380), 0xffff],
        });
        assert!(bad.iter().all(|&b| !is_finite(b)) && finite.len() >= 6);
        // one chunk per (load j of the thread, lane, thread): every load of
        // its first group, then the first of its second group and its last;
        // a last chunk with no non-finite value
        let units = abi::CHUNK / (4 * block);
        let mut loads: Vec<usize> = (0..units.min(4)).collect();
        if units > 4 {
            loads.extend([4, units - 1]);
        }
        let mut places = Vec::new();
        for tx in [0, block / 2 + 3, block - 1] {
            for lane in 0..4 {
                for &j in &loads {
                    places.push(4 * (tx + block * j) + lane);
                }
            }
        }
        let nchunks = places.len() + 1;
        let numel = nchunks * abi::CHUNK;
        let mut words: Vec<u32> = (0..numel).map(|i| finite[i % finite.len()]).collect();
        for (k, at) in places.iter().enumerate() {
            words[k * abi::CHUNK + at] = bad[k % bad.len()];
        }
        let grads: Vec<u8> = match dt {
            DType::F32 => words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            _ => words
                .iter()
                .flat_map(|&w| (w as u16).to_le_bytes())
                .collect(),
        };
        let specs = [spec(dt, numel)];
        let kind = OptimizerKind::Sgd;
        let h = hyper(kind, false);
        let mut gpu = Gpu::new(&m, kind, &specs, Some(nchunks as u32));
        gpu.block = block as u32;
        gpu.write_grads(&[grads]);
        let args = check_args(&h);
        let what = format!("{} at {block} threads", dt.name());
        gpu.launch(abi::mode::CHECK, &args, nchunks as u32, nchunks as u32)
            .unwrap_or_else(|e| panic!("{what}: check pass: {e}"));
        assert_eq!(
            gpu.control().nonfinite,
            places.len() as u32,
            "{what}: threads that saw a non-finite gradient"
        );
    }
}

/// Segments shorter than four vector items per thread (most segments when
/// many tensors share chunks): the check pass fills a thread's group of
/// four loads across segments, testing it early at a change of dtype or
/// before a partial or misaligned unit. One
/// non-finite value anywhere (any of the four loads, the last vector item,
/// the scalar tail, a misaligned tensor, either tensor of a shared chunk,
/// of one dtype or two) must be seen; all-finite gradients must count
/// nothing. A tail of 1-3 elements is loaded element by element into
/// whichever slot of the group it falls in: every length in every slot is
/// run, the tensor ending its buffer so that a load past it is an error.
#[test]
fn the_check_pass_finds_a_nonfinite_value_anywhere_in_a_short_segment() {
    let m = kernel_module();
    let nt = abi::BLOCK as usize;
    let h = hyper(OptimizerKind::Sgd, false);
    let args = check_args(&h);
    let one = |dt: DType| match dt {
        DType::F32 => 1f32.to_le_bytes().to_vec(),
        DType::F16 => f16::ONE.to_le_bytes().to_vec(),
        DType::Bf16 => bf16::ONE.to_le_bytes().to_vec(),
    };
    let nan = |dt: DType| match dt {
        DType::F32 => f32::NAN.to_le_bytes().to_vec(),
        DType::F16 => f16::NAN.to_le_bytes().to_vec(),
        DType::Bf16 => bf16::NAN.to_le_bytes().to_vec(),
    };
    let dtypes = [DType::F32, DType::F16, DType::Bf16];
    let mut launches = 0;
    for (di, &dt) in dtypes.iter().enumerate() {
        // (leading tensor and its dtype, checked tensor, misaligned): the
        // checked one starts a chunk, or shares the first chunk with a
        // 1000-element one of its own or of another dtype (a thread's group
        // of loads runs on across the two segments, or is tested between)
        let other = dtypes[(di + 1) % 3];
        let mut layouts = vec![
            (0, dt, 4, false),
            (0, dt, 7, false),
            (0, dt, 4 * (nt + 3) + 2, false),
            (0, dt, 4 * (3 * nt + 5) + 3, false),
            (0, dt, 4 * (4 * nt) - 1, false),
            (1000, dt, 2000, false),
            (1000, other, 2000, false),
            (0, dt, 4 * (2 * nt) + 1, true),
            (0, dt, 4 * (4 * nt) + 3, true),
        ];
        let full = layouts.len();
        // a tail of every length in every slot of thread 3's group (its
        // unit `slot` of the chunk), aligned and not: each reads its own
        // elements and no further (the tensor ends its buffer)
        for slot in 0..4 {
            for tail in 1..4 {
                for misalign in [false, true] {
                    layouts.push((0, dt, 4 * (slot * nt + 3) + tail, misalign));
                }
            }
        }
        for (li, (lead, lead_dt, len, misalign)) in layouts.into_iter().enumerate() {
            let nvec = len / 4;
            let mut at: Vec<usize> = vec![0, len - 1, 4 * nvec.max(1) - 1, 4 * nvec.max(1) - 4];
            if li >= full {
                // the tail's first and last element only
                at = vec![4 * nvec, len - 1];
            }
            // the j-th load of threads 0, 3 and the last, lane j; every
            // lane of every load of thread 3
            for j in (1..4).filter(|_| li < full) {
                for tx in [0, 3, nt - 1] {
                    at.push(4 * (tx + j * nt) + j);
                }
            }
            for j in (0..4).filter(|_| li < full) {
                for lane in 0..4 {
                    at.push(4 * (3 + j * nt) + lane);
                }
            }
            at.retain(|&p| p < len);
            at.sort_unstable();
            at.dedup();
            // (tensor, element): none, each place in the checked tensor,
            // and the leading tensor's first, last and a middle element
            let mut places: Vec<Option<(usize, usize)>> = vec![None];
            places.extend(at.into_iter().map(|p| Some((1, p))));
            if lead > 0 {
                places.extend([0, lead / 2 + 1, lead - 1].map(|p| Some((0, p))));
            }
            for bad in places {
                let specs = [
                    spec(lead_dt, lead),
                    Spec {
                        dtype: dt,
                        numel: len,
                        misalign,
                    },
                ];
                let mut grads = vec![one(lead_dt).repeat(lead), one(dt).repeat(len)];
                if let Some((t, p)) = bad {
                    let w = specs[t].dtype.size();
                    grads[t][p * w..(p + 1) * w].copy_from_slice(&nan(specs[t].dtype));
                }
                let mut gpu = Gpu::new(&m, OptimizerKind::Sgd, &specs, None);
                gpu.write_grads(&grads);
                let n = gpu.plan.chunks.len() as u32;
                gpu.launch(abi::mode::CHECK, &args, n, n)
                    .unwrap_or_else(|e| panic!("{}: check pass: {e}", dt.name()));
                launches += 1;
                let seen = gpu.control().nonfinite;
                assert_eq!(
                    seen != 0,
                    bad.is_some(),
                    "{}: {len} elements after {lead} {} (misaligned: {misalign}), NaN at {bad:?}: nonfinite count {seen}",
                    dt.name(),
                    lead_dt.name()
                );
            }
        }
    }
    assert!(launches > 100, "only {launches} launches");
}

/// A thread whose group fills with tails (units of 1-3 elements, loaded
/// element by element) tests it before its fifth unit, which would
/// otherwise go into slot 0 again over the first. 512 tensors of 5
/// elements (8 places each, a tensor's start rounded to 4) fill one
/// chunk: units alternate vector, tail, so at 32 threads each odd thread
/// gets only tails, sixteen of them (thread 1: tensors 0, 16, 32, ...). A
/// NaN in any of its first five tails, or the chunk's last, must be seen.
#[test]
fn the_check_pass_tests_a_group_of_tails_before_its_fifth_unit() {
    let m = kernel_module();
    let h = hyper(OptimizerKind::Sgd, false);
    let args = check_args(&h);
    let (count, len) = (512, 5);
    for dt in [DType::F32, DType::Bf16] {
        let specs: Vec<Spec> = (0..count).map(|_| spec(dt, len)).collect();
        let (one, nan) = match dt {
            DType::F32 => (1f32.to_le_bytes().to_vec(), f32::NAN.to_le_bytes().to_vec()),
            _ => (
                bf16::ONE.to_le_bytes().to_vec(),
                bf16::NAN.to_le_bytes().to_vec(),
            ),
        };
        let tails = [0, 16, 32, 48, 64, count - 1];
        for bad in std::iter::once(None).chain(tails.map(Some)) {
            let mut grads = vec![one.repeat(len); count];
            if let Some(t) = bad {
                let w = dt.size();
                grads[t][(len - 1) * w..len * w].copy_from_slice(&nan);
            }
            let mut gpu = Gpu::new(&m, OptimizerKind::Sgd, &specs, None);
            assert_eq!(gpu.plan.chunks.len(), 1, "one chunk");
            gpu.block = 32;
            gpu.write_grads(&grads);
            gpu.launch(abi::mode::CHECK, &args, 1, 1)
                .unwrap_or_else(|e| panic!("{}: check pass: {e}", dt.name()));
            let seen = gpu.control().nonfinite;
            assert_eq!(
                seen != 0,
                bad.is_some(),
                "{}: NaN in the tail of tensor {bad:?}: nonfinite count {seen}",
                dt.name()
            );
        }
    }
}

/// A bf16 result of zero in a segment numbered 64 or more, where a thread
/// takes several units of one segment: the bf16 store's rounding leaves a
/// small number (x >> 16 | 64, so 64 for a result of 0) in a register
/// that also holds the batch's end, so the unit loop must read that end
/// again for every unit. 64 tensors of 4 elements, then one of 3840 (15
/// units per thread, segment 64); θ = g = 1 and η = 1: every element
/// steps to 0.
#[test]
fn zero_results_in_a_late_bf16_segment_are_all_written() {
    let m = kernel_module();
    let h = hyper(OptimizerKind::Sgd, false);
    let mut lens = vec![4; 64];
    lens.push(3840);
    let specs: Vec<Spec> = lens.iter().map(|&n| spec(DType::Bf16, n)).collect();
    let ones: Vec<Vec<u8>> = lens
        .iter()
        .map(|&n| bf16::ONE.to_le_bytes().repeat(n))
        .collect();
    let mut gpu = Gpu::new(&m, OptimizerKind::Sgd, &specs, None);
    assert_eq!(gpu.plan.chunks.len(), 1, "one chunk");
    gpu.write_params(&ones);
    gpu.write_grads(&ones);
    gpu.step(Pass::Fused, &h, 1.0, 1.0, false).unwrap();
    for (t, p) in gpu.params().iter().enumerate() {
        let wrong = p.chunks(2).filter(|b| *b != [0, 0]).count();
        assert_eq!(wrong, 0, "tensor {t}: {wrong} elements are not 0");
    }
}

/// kernels/README.md lists the kernel's opcodes (the interpreter's subset);
/// the list must stay exactly what `kernels/lra.ptx` uses.
#[test]
fn the_kernel_readme_lists_exactly_the_opcodes_used() {
    let readme = include_str!("../kernels/README.md");
    let listed: std::collections::BTreeSet<&str> = readme
        .split("Exactly these opcodes")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("kernels/README.md: the opcode list")
        .split_whitespace()
        .collect();
    let used: std::collections::BTreeSet<&str> = abi::PTX
        .lines()
        .map(|l| l.split("//").next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.ends_with(':') && !l.starts_with('.'))
        .filter(|l| !matches!(*l, "{" | "}" | ")"))
        .filter_map(|l| {
            let l = if l.starts_with('@') {
                l.split_once(char::is_whitespace)?.1.trim_start()
            } else {
                l
            };
            l.split(|c: char| c.is_whitespace() || c == ';').next()
        })
        .collect();
    assert_eq!(
        listed.difference(&used).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "listed in kernels/README.md but not used"
    );
    assert_eq!(
        used.difference(&listed).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "used in kernels/lra.ptx but not listed"
    );
}

/// f* known and the loss exactly at it: no step (s = 0), also when φ + R
/// is 0, where s would otherwise fall back to 1. SGD with weight decay
/// and zero gradients has φ = 0 but the direction λθ, so s = 1 would move
/// θ; a bound just below the loss does fall back and move it. Device and
/// CPU backend agree bit for bit.
#[test]
fn at_the_bound_exactly_nothing_moves_even_with_phi_zero() {
    let m = kernel_module();
    let kind = OptimizerKind::Sgd;
    let h = hyper(kind, true);
    let specs = [spec(DType::F32, 1000)];
    let params = vec![(0..1000u32)
        .flat_map(|i| (1.0f32 + i as f32 / 8.0).to_le_bytes())
        .collect::<Vec<u8>>()];
    let zeros = vec![vec![0u8; 4000]];
    let loss = 1.0;
    for (f_star, moves) in [(loss, false), (loss - 1e-9, true)] {
        let pass = Pass::Scaled {
            f_star,
            obs_var: 0.0,
        };
        let mut gpu = Gpu::new(&m, kind, &specs, None);
        gpu.write_params(&params);
        gpu.write_grads(&zeros);
        gpu.step(pass, &h, 0.1, loss, false)
            .unwrap_or_else(|e| panic!("f* = {f_star}: {e}"));
        let mut host = Host::new(kind, &specs, &params, &[vec![]]);
        let outcome = host.step(pass, &h, 0.1, loss, &zeros, false);
        assert_eq!(outcome.phi, 0.0, "f* = {f_star}");
        assert_eq!(
            outcome.scale,
            if moves { 1.0 } else { 0.0 },
            "f* = {f_star}"
        );
        assert!(
            gpu.params() == host.params(),
            "f* = {f_star}: device and CPU parameters differ"
        );
        assert_eq!(gpu.params() != params, moves, "f* = {f_star}: θ moved");
    }
}

/// f* unknown and R > 0 with a direction that ascends (φ < 0 < φ + R):
/// s = φ/(φ + R) is negative and is clamped to 0, so θ stays (the state
/// still advances); an unclamped s would step backwards. Momentum whose
/// stored m points against the gradient gives such a direction. Device
/// and CPU backend agree bit for bit.
#[test]
fn an_ascending_direction_with_r_takes_no_step() {
    let m = kernel_module();
    let kind = OptimizerKind::Momentum;
    let h = hyper(kind, false);
    let n = 1000;
    let specs = [spec(DType::F32, n)];
    let params = vec![(0..n)
        .flat_map(|i| (1.0f32 + i as f32 / 8.0).to_le_bytes())
        .collect::<Vec<u8>>()];
    let ones = vec![1f32.to_le_bytes().repeat(n)];
    let state = vec![vec![-10f32; n]];
    let lr = 0.1;
    // m = β·(-10) + 1 < 0, φ = η·Σ g·m < 0; R ten times |φ|
    let phi = lr * n as f64 * (h.momentum * -10.0 + 1.0);
    assert!(phi < 0.0);
    let pass = Pass::Scaled {
        f_star: f64::NAN,
        obs_var: -10.0 * phi,
    };
    let mut gpu = Gpu::new(&m, kind, &specs, None);
    gpu.write_params(&params);
    gpu.set_state(&state);
    gpu.write_grads(&ones);
    gpu.step(pass, &h, lr, 1.0, false)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut host = Host::new(kind, &specs, &params, &state);
    let outcome = host.step(pass, &h, lr, 1.0, &ones, false);
    assert!(outcome.phi < 0.0, "φ = {}", outcome.phi);
    assert_eq!(outcome.scale, 0.0);
    assert!(
        gpu.params() == host.params(),
        "device and CPU parameters differ"
    );
    assert!(gpu.params() == params, "θ moved");
    assert!(
        gpu.state() == host.state().slots,
        "device and CPU state differ"
    );
    assert!(gpu.state() != state, "the state did not advance");
}
