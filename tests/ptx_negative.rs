//! The PTX checks can fail: copies of the real `kernels/lra.ptx`, edited
//! at test time (so they track the real kernel), each with one bug, are
//! reported by the interpreter or by the comparison against the CPU
//! backend.

mod ptx_common;
mod support;

use lra::backend::cuda::abi;
use lra::optim::{DType, OptimizerKind};
use ptx_common::*;
use ptx_interp::{ErrorKind, Module, Schedule};

/// `abi::PTX` with `from` replaced by `to` at its `nth` occurrence; the
/// pattern must exist, so a kernel rewrite cannot silently void the test.
fn edit(from: &str, to: &str, nth: usize) -> String {
    let at = abi::PTX
        .match_indices(from)
        .nth(nth)
        .unwrap_or_else(|| panic!("kernels/lra.ptx no longer contains {from:?} #{nth}"))
        .0;
    format!("{}{}{}", &abi::PTX[..at], to, &abi::PTX[at + from.len()..])
}

fn load(src: &str) -> Module {
    Module::load(src).unwrap_or_else(|e| panic!("edited kernel does not load: {e}"))
}

/// Two chunks per block (four chunks, grid 2; the last spans both
/// tensors), a vector and a scalar tail, the dot product on, non-finite gradients in a checking pass: every
/// barrier, shuffle and cross-block hand-over of the kernel runs.
fn case<'a>(specs: &'a [Spec], steps: &'a [StepPlan]) -> Case<'a> {
    Case {
        name: "edited kernel".into(),
        kind: OptimizerKind::Adam,
        specs,
        hyper: hyper(OptimizerKind::Adam, false),
        steps,
        nonfinite_init: false,
        seed: 3,
        grid: Some(2),
        block: abi::BLOCK,
        schedule: Schedule::InOrder,
    }
}

const SPECS: [Spec; 2] = [
    Spec {
        dtype: DType::F32,
        numel: 3 * 4096 + 33,
        misalign: false,
    },
    Spec {
        dtype: DType::Bf16,
        numel: 33,
        misalign: false,
    },
];

/// One chunk of work: with `grid: Some(2)`, block 1 has none.
const ONE_CHUNK: [Spec; 1] = [Spec {
    dtype: DType::F32,
    numel: abi::CHUNK - 5,
    misalign: false,
}];

/// SPECS and ONE_CHUNK, each in order and reversed: the cases the barrier
/// test searches, which the unedited kernel must pass.
fn layouts_in_order_and_reversed(steps: &[StepPlan]) -> impl Iterator<Item = Case<'_>> {
    [&SPECS[..], &ONE_CHUNK[..]]
        .into_iter()
        .flat_map(move |specs| {
            [Schedule::InOrder, Schedule::Reversed].map(|schedule| Case {
                schedule,
                ..case(specs, steps)
            })
        })
}

fn steps() -> [StepPlan; 3] {
    let p = StepPlan {
        nonfinite_grads: false,
        ..plan(Pass::Fused, 1e-2)
    };
    let scaled = StepPlan {
        pass: Pass::Scaled {
            f_star: 0.5,
            obs_var: 0.0,
        },
        ..p
    };
    [
        p,
        scaled,
        StepPlan {
            nonfinite_grads: true,
            ..scaled
        },
    ]
}

/// The interpreter error of running `src`, which must fail.
fn interp_error(src: &str) -> String {
    let m = load(src);
    let steps = steps();
    match try_run(&m, &case(&SPECS, &steps)) {
        Ok(_) => panic!("the edited kernel passed"),
        Err(e) => e,
    }
}

fn kind_of(msg: &str) -> Option<ErrorKind> {
    [
        ErrorKind::Race,
        ErrorKind::Barrier,
        ErrorKind::Warp,
        ErrorKind::Deadlock,
        ErrorKind::OutOfBounds,
        ErrorKind::Misaligned,
        ErrorKind::Undefined,
    ]
    .into_iter()
    .find(|k| msg.contains(&format!("interpreter: {k:?}:")))
}

#[test]
fn the_unedited_kernel_passes_the_same_case() {
    // the layout the comment on `case` describes
    let plan = abi::chunk_table(&SPECS.map(|s| s.numel));
    assert_eq!(plan.chunks.len(), 4);
    assert_eq!(plan.chunks[3].end - plan.chunks[3].first, 2);
    assert_eq!(
        abi::chunk_table(&ONE_CHUNK.map(|s| s.numel)).chunks.len(),
        1
    );
    let steps = steps();
    let m = load(abi::PTX);
    for c in layouts_in_order_and_reversed(&steps) {
        try_run(&m, &c).unwrap();
    }
}

#[test]
fn removing_any_barrier_is_reported() {
    // #0: threads stage the next chunk's rows while others still read the
    // last ones (in the check pass: no block reduction in between); the
    // barrier also keeps the next chunk's reduction from overwriting the
    // per-warp sums while warp 0 reads them; #1: threads read staged rows
    // before they were written; #2: warp 0 reads the per-warp sums before
    // the other warps wrote them; #4: threads read the last-block flag
    // before thread 0 wrote it. #3: a block counts itself out (fence +
    // atomic) before all its threads raised the non-finite flag. That shows
    // when such a late raise is the flag's last write before the last
    // block reads it: with one chunk, block 1 has no work and raises
    // nothing, and in order block 0's threads raise after its thread 0
    // counted out. (SPECS in random schedules found it only in about one
    // in ten, and a kernel edit moved the first one past the search.)
    let n = abi::PTX.matches("bar.sync 0;").count();
    assert_eq!(
        n, 5,
        "kernels/lra.ptx changed its barriers: revisit this test"
    );
    let steps = steps();
    for nth in 0..n {
        let m = load(&edit("bar.sync 0;", "", nth));
        let found = layouts_in_order_and_reversed(&steps).find_map(|c| try_run(&m, &c).err());
        let e = found.unwrap_or_else(|| panic!("bar.sync #{nth} removed: no case reported it"));
        // a race, or a read of shared memory no thread has written yet
        assert!(
            matches!(kind_of(&e), Some(ErrorKind::Race | ErrorKind::Undefined)),
            "bar.sync #{nth} removed: {e}"
        );
    }
}

#[test]
fn removing_either_membar_gl_is_reported() {
    // The kernel's atomics are relaxed, so the fences carry the ordering
    // (PTX ISA 8.8, release and acquire patterns). #0: the blocks' partials
    // and non-finite counts are not released before thread 0's atom.inc;
    // #1: the last block reads them without acquiring what its atom.inc
    // read. The interpreter's fence model reports both as races.
    let n = abi::PTX.matches("membar.gl;").count();
    assert_eq!(
        n, 2,
        "kernels/lra.ptx changed its fences: revisit this test"
    );
    for nth in 0..n {
        let e = interp_error(&edit("membar.gl;", "", nth));
        assert_eq!(
            kind_of(&e),
            Some(ErrorKind::Race),
            "membar.gl #{nth} removed: {e}"
        );
        assert!(
            e.contains("gpu-scope fence (membar.gl)"),
            "membar.gl #{nth} removed: {e}"
        );
    }
}

#[test]
fn a_wrong_shuffle_mask_is_reported() {
    // lane 31 left out of the member mask of the warp sum
    let e = interp_error(&edit("31, -1;", "31, 0x7fffffff;", 0));
    assert_eq!(kind_of(&e), Some(ErrorKind::Warp), "{e}");
    assert!(e.contains("not in the member mask"), "{e}");
}

#[test]
fn an_off_by_one_index_is_out_of_bounds() {
    // a tensor's last unit takes one element more than it has: past the
    // tensor's end, out of bounds (each buffer ends where its tensor ends)
    let src = edit(
        "sub.u32 %n, %len, %e;",
        "sub.u32 %n, %len, %e;\n\tadd.u32 %n, %n, 1;",
        0,
    );
    let steps = steps();
    let e = try_run(
        &load(&src),
        &Case {
            grid: Some(1),
            ..case(&SPECS, &steps)
        },
    )
    .expect_err("the edited kernel passed");
    assert_eq!(kind_of(&e), Some(ErrorKind::OutOfBounds), "{e}");
}

#[test]
fn an_early_return_before_a_barrier_is_reported() {
    // warps 1.. leave after storing their sums instead of meeting warp 0 at
    // the barrier that ends the reduction
    let e = interp_error(&edit(
        "setp.ge.u32 %p, %tx, 32;\n\t@%p bra REDUCED;",
        "setp.ge.u32 %p, %tx, 32;\n\t@%p ret;",
        0,
    ));
    assert_eq!(kind_of(&e), Some(ErrorKind::Barrier), "{e}");
    assert!(e.contains("exited"), "{e}");
}

#[test]
fn returning_instead_of_finishing_the_chunks_is_caught() {
    // every thread leaves after its first chunk's segments: no barrier is
    // ever reached, but the later chunks are never updated
    let e = interp_error(&edit(
        "@%p bra STAGE;\n\tbra CHUNK_END;",
        "@%p bra STAGE;\n\tret;",
        0,
    ));
    assert!(e.contains("parameters differ"), "{e}");
}

#[test]
fn a_deal_that_does_not_go_on_into_the_next_segment_is_caught() {
    // a lane moving to the next segment keeps its unit index instead of
    // continuing the deal there: the last chunk's second segment (the
    // whole bf16 tensor) is dealt from the wrong units
    let e = interp_error(&edit(
        "sub.u32 %q4, %q4, %x;\n\tadd.u32 %seg, %seg, 1;",
        "add.u32 %seg, %seg, 1;",
        0,
    ));
    assert!(e.contains("parameters differ"), "{e}");
}

#[test]
fn an_fma_contraction_changes_parameters_and_is_caught() {
    // what ptxas may do to an unrounded mul/sub pair: θ − lr·d as one fma
    let src = edit(
        "mul.rn.f32 %xf, %lr, %d;\n\tsub.rn.f32 %th, %th, %xf;",
        "neg.f32 %xf, %lr;\n\tfma.rn.f32 %th, %xf, %d, %th;",
        0,
    );
    let e = interp_error(&src);
    assert!(e.contains("parameters differ"), "{e}");
}

#[test]
fn another_reduction_order_changes_phi_and_is_caught() {
    // butterfly offsets 1, 2, 4, 8, 16 instead of 16, 8, 4, 2, 1
    let first = edit("mov.u32 %off, 16;", "mov.u32 %off, 1;", 0);
    let src = first.replacen(
        "shr.u32 %off, %off, 1;\n\tsetp.ne.u32 %p, %off, 0;",
        "shl.b32 %off, %off, 1;\n\tsetp.ne.u32 %p, %off, 32;",
        1,
    );
    assert_ne!(src, first, "loop edit did not apply");
    let m = load(&src);
    // Sums of few, similar terms are exact in f64 in any order; on some of
    // these inputs the order shows in the bits, and there it must be caught.
    let steps = steps();
    let mut caught = 0;
    for kind in [
        OptimizerKind::Sgd,
        OptimizerKind::Momentum,
        OptimizerKind::Adam,
    ] {
        for seed in 0..4 {
            let c = Case {
                kind,
                seed,
                hyper: hyper(kind, false),
                ..case(&SPECS, &steps)
            };
            match try_run(&m, &c) {
                Ok(_) => {}
                Err(e) => {
                    assert!(e.contains("but the kernel's order gives"), "{e}");
                    caught += 1;
                }
            }
        }
    }
    assert!(caught > 0, "no input showed the changed reduction order");
}

#[test]
fn an_unrounded_add_in_the_kernel_is_a_load_error() {
    let src = edit("add.rn.f32", "add.f32", 0);
    let e = Module::load(&src).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Load, "{e}");
    assert!(e.message.contains("contract"), "{e}");
}

#[test]
fn a_32_bit_segment_start_is_caught_past_two_to_the_32() {
    // the segment's first element read as 32 bits: element 2^32 becomes 0
    let src = edit(
        "ld.global.u64 %start, [%cd+0];",
        "ld.global.u32 %lo, [%cd+0];\n\tcvt.u64.u32 %start, %lo;",
        0,
    );
    let m = load(&src);
    let (w, specs) = past_two_to_the_32();
    let steps = [StepPlan {
        nonfinite_grads: false,
        ..plan(Pass::Fused, 1e-2)
    }];
    // every other test has starts far below 2^32: the edit passes them
    try_run(&m, &case(&SPECS, &steps)).unwrap();
    let e =
        try_run_window(&m, &case(&specs, &steps), Some(&w)).expect_err("the edited kernel passed");
    assert_eq!(kind_of(&e), Some(ErrorKind::OutOfBounds), "{e}");
}

#[test]
fn a_tensor_index_cut_to_8_bits_is_caught_by_300_tensors() {
    let src = edit(
        "ld.global.u32 %tix, [%cd+8];",
        "ld.global.u32 %tix, [%cd+8];\n\tand.b32 %tix, %tix, 255;",
        0,
    );
    let m = load(&src);
    let specs = many_tensors(300);
    let steps = [StepPlan {
        nonfinite_grads: false,
        ..plan(Pass::Fused, 1e-2)
    }];
    try_run(&m, &case(&many_tensors(40), &steps)).unwrap();
    let e = try_run(&m, &case(&specs, &steps)).expect_err("the edited kernel passed");
    assert!(e.contains("differ") || kind_of(&e).is_some(), "{e}");
}

#[test]
fn adding_a_wrong_partial_in_the_final_sum_is_caught() {
    // the tenth of the sixteen partials a thread loads per round is added
    // in place of the eleventh: only a sum of more than 10 × 256 partials
    // has one
    let m = load(&edit(
        "@%p add.rn.f64 %acc, %acc, %v10;",
        "@%p add.rn.f64 %acc, %acc, %v9;",
        0,
    ));
    let mut rng = Rng(5);
    let sum = |n: usize, rng: &mut Rng| {
        let parts: Vec<f64> = (0..n).map(|_| rng.value() as f64).collect();
        let got = final_stage_phi(&m, &parts, 1.0, (2, abi::BLOCK), Schedule::InOrder).unwrap();
        got.to_bits() == final_sum(&parts, 1.0, &BFLY, abi::BLOCK as usize).to_bits()
    };
    assert!(sum(257, &mut rng), "few partials do not show the edit");
    assert!(!sum(4097, &mut rng), "the edited final sum passed");
}

#[test]
fn ignoring_another_ranks_found_inf_is_caught() {
    // bit 31 of control.nonfinite (some rank's found_inf) not tested: the
    // step skips, but as a non-finite gradient
    let m = load(&edit(
        "and.b32 %y, %x, -2147483648;",
        "and.b32 %y, %x, 0;",
        0,
    ));
    let steps = [StepPlan {
        nonfinite_grads: false,
        ..plan(
            Pass::ShardedPeers {
                rule: Some((0.5, 0.0)),
                peers: [0.0, 1.0, 0.0],
            },
            1e-2,
        )
    }];
    let e = try_run(&m, &case(&SPECS, &steps)).expect_err("the edited kernel passed");
    assert!(e.contains("skip reason"), "{e}");
}

#[test]
fn an_unclamped_scale_is_caught() {
    // scale_max not applied (every other case runs with scale_max = +inf)
    let m = load(&edit("min.f64 %s, %s, %xd;", "", 0));
    let steps = [StepPlan {
        nonfinite_grads: false,
        ..plan(
            Pass::Clamped {
                f_star: -1e30,
                obs_var: 0.0,
                scale_max: 0.75,
            },
            1e-2,
        )
    }];
    let e = try_run(&m, &case(&SPECS, &steps)).expect_err("the edited kernel passed");
    // θ moves by s·η·d with s about 1e30·2/φ instead of 0.75
    assert!(e.contains("parameters differ"), "{e}");
}
