//! CPU backend. The vectorised, threaded passes compute exactly what
//! `src/optim.rs` and the reduction order documented in
//! `src/backend/cpu.rs` say: parameters bit for bit equal to a plain
//! element-by-element loop over `optim::direction`/`optim::apply`, and φ bit
//! for bit equal to the documented sum (per chunk of `CHUNK` elements,
//! element j into lane j % LANES in order, lanes folded in the fixed tree,
//! chunk partials added in chunk order), whatever the thread count. And the
//! tensor-list validation refuses every aliasing of a written buffer, also
//! after an earlier list passed (it caches the last list that passed).

use half::bf16;
use lra::backend::cpu::{CHUNK, LANES};
use lra::ffi::*;
use lra::optim::{self, BiasPowers, Elem, Hyper, OptimizerKind, StepScalars};
use std::ptr::null_mut;

/// Deterministic values with a spread of magnitudes and signs.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let e = ((x >> 8) % 7) as i32 - 3;
            scale * u * 2f32.powi(e)
        })
        .collect()
}

/// The documented pairwise tree: adjacent pairs, then pairs of pairs, …
fn fold(a: &[f64; LANES]) -> f64 {
    let mut v = a.to_vec();
    while v.len() > 1 {
        v = v.chunks(2).map(|p| p[0] + p[1]).collect();
    }
    v[0]
}

/// The reference step over all tensors: updates params and state in
/// place, returns Σ g·d in the documented order.
fn reference_step<const K: u32, P: Elem>(
    sc: &StepScalars,
    lr: f32,
    params: &mut [Vec<P>],
    grads: &[Vec<P>],
    state: &mut [(Vec<f32>, Vec<f32>)],
) -> f64 {
    let mut total = 0.0f64;
    for ((p, g), (s0, s1)) in params.iter_mut().zip(grads).zip(state.iter_mut()) {
        for start in (0..p.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(p.len());
            let mut acc = [0.0f64; LANES];
            for i in start..end {
                let th = p[i].to_f32();
                let gi = g[i].to_f32();
                let d = optim::direction::<K>(sc, th, gi, &mut s0[i], &mut s1[i]);
                acc[(i - start) % LANES] += optim::dot_term(gi, d);
                p[i] = P::from_f32(optim::apply(th, lr, d));
            }
            total += fold(&acc);
        }
    }
    total
}

fn run_case<const K: u32, P: Elem>(sizes: &[usize], threads: u32, guard: bool, weight_decay: f64) {
    let kind = OptimizerKind::from_u32(K).unwrap();
    let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
    // SAFETY: lra_config_init fills the struct.
    let mut cfg = unsafe {
        lra_config_init(cfg.as_mut_ptr(), K);
        cfg.assume_init()
    };
    cfg.lr = 0.01;
    cfg.num_threads = threads;
    cfg.check_finite = guard as u32;
    if kind != OptimizerKind::AdamW {
        cfg.weight_decay = weight_decay;
    }
    let mut h = null_mut();
    // SAFETY: valid pointers.
    assert_eq!(unsafe { lra_create(&cfg, &mut h) }, LRA_OK);

    let mut hyper = Hyper::defaults(kind);
    hyper.weight_decay = cfg.weight_decay;
    let conv = |v: Vec<f32>| v.into_iter().map(P::from_f32).collect::<Vec<P>>();
    let mut mine: Vec<Vec<P>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| conv(values(n, 1 + i as u64, 1.0)))
        .collect();
    let mut theirs = mine.clone();
    let mut state: Vec<(Vec<f32>, Vec<f32>)> = sizes
        .iter()
        .map(|&n| (vec![0.0; n], vec![0.0; n]))
        .collect();
    let mut bias = BiasPowers::default();
    for step in 0..3u64 {
        let grads: Vec<Vec<P>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| conv(values(n, 100 * step + 7 + i as u64, 0.1)))
            .collect();
        bias = bias.advanced(&hyper);
        let sc = StepScalars::new(kind, &hyper, bias);
        let sum = reference_step::<K, P>(&sc, cfg.lr as f32, &mut mine, &grads, &mut state);
        let tensors: Vec<lra_tensor> = theirs
            .iter_mut()
            .zip(&grads)
            .map(|(p, g)| lra_tensor {
                param: p.as_mut_ptr().cast(),
                grad: g.as_ptr().cast(),
                numel: p.len() as u64,
                dtype: P::DTYPE as u32,
                reserved: 0,
            })
            .collect();
        let mut phi = 0.0;
        // SAFETY: the tensors point at live buffers of the stated sizes.
        unsafe {
            assert_eq!(
                lra_step(h, tensors.as_ptr(), tensors.len(), 1.0, 0.0, null_mut()),
                LRA_OK
            );
            assert_eq!(lra_get_last_phi(h, &mut phi), LRA_OK);
            // η must not change, so that the reference keeps its lr.
            assert_eq!(lra_report_reeval(h, 1.0, null_mut()), LRA_OK);
            assert_eq!(lra_set_lr(h, cfg.lr), LRA_OK);
        }
        let what = format!(
            "{} {:?} sizes {sizes:?} threads {threads} guard {guard} wd {weight_decay} step {step}",
            kind.name(),
            P::DTYPE
        );
        assert_eq!(phi.to_bits(), (cfg.lr * sum).to_bits(), "φ: {what}");
        for (t, (a, b)) in mine.iter().zip(&theirs).enumerate() {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_eq!(
                    x.to_f32().to_bits(),
                    y.to_f32().to_bits(),
                    "θ[{t}][{i}]: {what}"
                );
            }
        }
    }
    // SAFETY: created above.
    unsafe { lra_destroy(h) };
}

fn all_kinds<P: Elem>(sizes: &[usize], threads: u32, guard: bool, wd: f64) {
    run_case::<{ OptimizerKind::Sgd as u32 }, P>(sizes, threads, guard, wd);
    run_case::<{ OptimizerKind::Momentum as u32 }, P>(sizes, threads, guard, wd);
    run_case::<{ OptimizerKind::Nesterov as u32 }, P>(sizes, threads, guard, wd);
    run_case::<{ OptimizerKind::Adagrad as u32 }, P>(sizes, threads, guard, wd);
    run_case::<{ OptimizerKind::Rmsprop as u32 }, P>(sizes, threads, guard, wd);
    run_case::<{ OptimizerKind::Adam as u32 }, P>(sizes, threads, guard, wd);
    run_case::<{ OptimizerKind::AdamW as u32 }, P>(sizes, threads, guard, wd);
}

/// Odd sizes around the lane, sub-block and chunk boundaries.
const SMALL: &[usize] = &[1, 7, 8, 9, 63, 64, 65, 0, 511, 513];

#[test]
fn small_tensors_match_the_reference() {
    all_kinds::<f32>(SMALL, 1, true, 0.0);
    all_kinds::<bf16>(SMALL, 1, false, 0.0);
    all_kinds::<half::f16>(SMALL, 1, true, 1e-3);
    all_kinds::<f32>(SMALL, 1, false, 1e-3);
}

#[test]
fn large_steps_match_the_reference_on_every_thread_count() {
    // Enough elements for 3 threads (the backend starts at most one
    // thread per 256 Ki elements), with chunk-boundary sizes.
    let sizes = [CHUNK - 1, 48 * CHUNK + 5, 17, 2 * CHUNK, CHUNK + 1];
    assert!(sizes.iter().sum::<usize>() >= 3 << 18);
    for threads in [1, 2, 3] {
        all_kinds::<f32>(&sizes, threads, threads != 2, 0.0);
    }
    all_kinds::<bf16>(&sizes, 2, true, 1e-3);
    all_kinds::<half::f16>(&sizes, 2, true, 0.0);
}

// ---- tensor-list validation -------------------------------------------

fn handle(threads: u32) -> *mut lra_handle {
    handle_with(threads, |_| {})
}

/// An SGD handle on `threads` threads, its configuration changed by `tweak`.
fn handle_with(threads: u32, tweak: impl FnOnce(&mut lra_config)) -> *mut lra_handle {
    let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
    // SAFETY: lra_config_init fills the struct; valid pointers.
    unsafe {
        lra_config_init(cfg.as_mut_ptr(), LRA_OPTIMIZER_SGD);
        let mut cfg = cfg.assume_init();
        cfg.num_threads = threads;
        tweak(&mut cfg);
        let mut h = null_mut();
        assert_eq!(lra_create(&cfg, &mut h), LRA_OK);
        h
    }
}

fn step(h: *mut lra_handle, list: &[(*mut f32, *const f32, u64)]) -> lra_status {
    let tensors: Vec<lra_tensor> = list
        .iter()
        .map(|&(p, g, n)| lra_tensor {
            param: p.cast(),
            grad: g.cast(),
            numel: n,
            dtype: LRA_DTYPE_F32,
            reserved: 0,
        })
        .collect();
    // SAFETY: every pointer below points into a live buffer of the stated size.
    unsafe { lra_step(h, tensors.as_ptr(), tensors.len(), 1.0, 0.0, null_mut()) }
}

#[test]
fn a_parameter_inside_any_earlier_gradient_is_refused() {
    // One buffer: a long gradient [0, 100), a short one [10, 20) (gradients
    // may share memory) and a parameter [30, 40) inside the long one but
    // not inside its address-order neighbour.
    let mut buf = vec![0.0f32; 100];
    let mut p0 = vec![0.0f32; 100];
    let mut p1 = vec![0.0f32; 10];
    let g2 = [0.0f32; 10];
    let b = buf.as_mut_ptr();
    let h = handle(1);
    // SAFETY: offsets inside `buf`.
    let list = unsafe {
        [
            (p0.as_mut_ptr(), b as *const f32, 100),
            (p1.as_mut_ptr(), b.add(10) as *const f32, 10),
            (b.add(30), g2.as_ptr(), 10),
        ]
    };
    assert_eq!(step(h, &list), LRA_INVALID_ARGUMENT);
    // SAFETY: valid handle; the message is a C string.
    let msg = unsafe { std::ffi::CStr::from_ptr(lra_last_error(h)) }.to_string_lossy();
    assert!(
        msg.contains("tensors[0].grad overlaps tensors[2].param"),
        "{msg}"
    );
    // Nothing was written.
    assert!(buf.iter().chain(&p0).chain(&p1).all(|&x| x == 0.0));
    // SAFETY: created above.
    unsafe { lra_destroy(h) };
}

#[test]
fn a_list_that_passed_once_does_not_let_a_bad_one_through() {
    let mut p = vec![1.0f32; 128];
    let mut q = vec![1.0f32; 64];
    let g = vec![0.5f32; 64];
    let h = handle(1);
    let good = [
        (p.as_mut_ptr(), g.as_ptr(), 64),
        (q.as_mut_ptr(), g.as_ptr(), 64), // a shared gradient is fine
    ];
    assert_eq!(step(h, &good), LRA_OK);
    assert_eq!(step(h, &good), LRA_OK);
    // Same count and sizes (the layout check passes), but the second
    // parameter now lies inside the first.
    // SAFETY: p has 128 elements, so [8, 72) is inside it.
    let bad = [
        (p.as_mut_ptr(), g.as_ptr(), 64),
        (unsafe { p.as_mut_ptr().add(8) }, g.as_ptr(), 64),
    ];
    assert_eq!(step(h, &bad), LRA_INVALID_ARGUMENT);
    assert_eq!(step(h, &good), LRA_OK);
    // SAFETY: created above.
    unsafe { lra_destroy(h) };
}

/// The guard tests storage bits (`Elem::magnitude_bits`), not converted
/// values: every kind of non-finite gradient, in every dtype, anywhere
/// around the sub-block and chunk boundaries and in every eighth of a
/// chunk, skips the step and writes
/// nothing; the largest finite values do not. Both in the fused step (a
/// check pass first) and with f* known (the read-only dot pass finds it);
/// a signalling NaN among the parameters shows any write of a pass that
/// must not write (a write would quieten it).
#[test]
fn the_guard_finds_every_nonfinite_gradient_in_every_dtype() {
    // (dtype, element size, +inf bits, sign bit, quiet-NaN bit)
    let formats = [
        (
            LRA_DTYPE_F32,
            4,
            0x7f80_0000u32,
            0x8000_0000u32,
            0x0040_0000u32,
        ),
        (LRA_DTYPE_F16, 2, 0x7c00, 0x8000, 0x0200),
        (LRA_DTYPE_BF16, 2, 0x7f80, 0x8000, 0x0040),
    ];
    let sizes = [CHUNK + 70, 5];
    // (tensor, element): around the boundaries, and in every eighth of
    // the chunk (the check may read a chunk's parts side by side).
    let places = [
        (0, 0),
        (0, 63),
        (0, 64),
        (0, 65),
        (0, CHUNK - 1),
        (0, CHUNK),
        (0, CHUNK + 69),
        (1, 4),
    ]
    .into_iter()
    .chain((1..8).map(|k| (0, k * CHUNK / 8 + 3)))
    .collect::<Vec<_>>();
    for ((dtype, esz, inf, sign, quiet), f_star) in formats
        .into_iter()
        .flat_map(|f| [(f, None), (f, Some(0.0))])
    {
        // A handle keeps its tensor layout, dtypes included.
        let h = handle_with(1, |cfg| {
            if let Some(f) = f_star {
                cfg.f_star = f;
            }
        });
        let max = inf - 1;
        let cases = [
            (inf, true),
            (inf | sign, true),
            (inf | quiet, true),
            (inf | 1, true),
            ((sign - 1) | sign, true),
            (max, false),
            (max | sign, false),
        ];
        // Small finite values: 1/8 in every format, so the step applies.
        let eighth = match dtype {
            LRA_DTYPE_F32 => 0x3e00_0000u32,
            LRA_DTYPE_F16 => 0x3000,
            _ => 0x3e00,
        };
        let bytes = |n: usize, bits: u32| -> Vec<u8> {
            (0..n)
                .flat_map(|_| bits.to_le_bytes()[..esz].to_vec())
                .collect()
        };
        for (bits, nonfinite) in cases {
            for &(t, i) in &places {
                let mut params: Vec<Vec<u8>> = sizes.iter().map(|&n| bytes(n, eighth)).collect();
                let mut grads = params.clone();
                params[0][esz..2 * esz].copy_from_slice(&(inf | 1).to_le_bytes()[..esz]);
                grads[t][i * esz..(i + 1) * esz].copy_from_slice(&bits.to_le_bytes()[..esz]);
                let before = params.clone();
                let tensors: Vec<lra_tensor> = params
                    .iter_mut()
                    .zip(&grads)
                    .zip(sizes)
                    .map(|((p, g), n)| lra_tensor {
                        param: p.as_mut_ptr().cast(),
                        grad: g.as_ptr().cast(),
                        numel: n as u64,
                        dtype,
                        reserved: 0,
                    })
                    .collect();
                let mut info = std::mem::MaybeUninit::<lra_reeval_info>::uninit();
                // SAFETY: the tensors point at live buffers of the stated sizes.
                let info = unsafe {
                    assert_eq!(
                        lra_step(h, tensors.as_ptr(), tensors.len(), 1.0, 0.0, null_mut()),
                        LRA_OK
                    );
                    assert_eq!(lra_report_reeval(h, 0.5, info.as_mut_ptr()), LRA_OK);
                    info.assume_init()
                };
                let what = format!(
                    "dtype {dtype}, f* {f_star:?}, bits {bits:#x} at tensor {t} element {i}"
                );
                if nonfinite {
                    assert_eq!(info.skip_reason, LRA_SKIP_NONFINITE_GRAD, "{what}");
                    assert!(params == before, "{what}: parameters written");
                } else {
                    // f32's largest values square to +inf in the dot
                    // product: the step is written, then φ may skip η's test.
                    assert_ne!(info.skip_reason, LRA_SKIP_NONFINITE_GRAD, "{what}");
                    assert!(params != before, "{what}: step not applied");
                }
            }
        }
        // SAFETY: created above.
        unsafe { lra_destroy(h) };
    }
}
