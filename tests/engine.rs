//! The engine through its Rust API: skips, call order, layout checks,
//! checkpoints (bit-exact resume), φ determinism across thread counts,
//! mixed dtypes and the scaled (two-pass) modes.

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the test owns and keeps alive across the call
// (host slices, or its own device buffers), and null or test-owned flags
// and streams.

use half::{bf16, f16};
use lra::backend::TensorDesc;
use lra::config::Config;
use lra::controller::{Decision, SkipReason};
use lra::optim::{BiasPowers, DType, Hyper, OptimizerKind, StepScalars};
use lra::{Engine, Status};
use std::ptr::{null, null_mut};

fn config(kind: OptimizerKind, lr: f64) -> Config {
    Config {
        lr,
        ..Config::defaults(kind)
    }
}

mod support;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    support::uniform(n, seed, -1.0, 1.0)
}

struct Model {
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
}

impl Model {
    fn new(sizes: &[usize], seed: u64) -> Model {
        Model {
            params: sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, seed + i as u64))
                .collect(),
            grads: sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, seed + 100 + i as u64))
                .collect(),
        }
    }
    fn tensors(&mut self) -> Vec<TensorDesc> {
        self.params
            .iter_mut()
            .zip(&self.grads)
            .map(|(p, g)| TensorDesc::host_f32(p, g))
            .collect()
    }
    /// New gradients for the next step (a function of the step index).
    fn regrad(&mut self, step: u64) {
        for (i, g) in self.grads.iter_mut().enumerate() {
            *g = values(g.len(), 1000 * step + i as u64);
        }
    }
}

fn checkpoint(e: &mut Engine) -> Vec<u8> {
    let mut buf = vec![0u8; e.state_size().unwrap()];
    let n = e.save_state(&mut buf).unwrap();
    assert_eq!(n, buf.len());
    buf
}

#[test]
fn nonfinite_loss_skips_and_changes_nothing() {
    let mut e = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut m = Model::new(&[10, 3], 1);
    unsafe { e.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
    e.report_reeval(0.9).unwrap();
    let before = (m.params.clone(), checkpoint(&mut e));
    for bad in [f64::NAN, f64::INFINITY] {
        unsafe { e.step(&m.tensors(), bad, 0.0, null(), null_mut()) }.unwrap();
        assert_eq!(m.params, before.0);
        let r = e.report_reeval(0.5).unwrap();
        assert_eq!(
            (r.decision, r.skip),
            (Decision::Skipped, SkipReason::NonfiniteLoss)
        );
    }
    let c = e.counters().unwrap();
    assert_eq!((c.steps, c.applied, c.skipped), (3, 1, 2));
}

#[test]
fn nonfinite_gradient_is_caught_before_any_write() {
    for two_pass in [false, true] {
        let mut cfg = config(OptimizerKind::Momentum, 1e-2);
        if two_pass {
            cfg.settings.f_star = 0.0;
        }
        let mut e = Engine::new(cfg).unwrap();
        let mut m = Model::new(&[40_000, 7], 2);
        unsafe { e.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
        let before = (m.params.clone(), e.optimizer_state().unwrap());
        m.grads[1][3] = f32::NAN;
        unsafe { e.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
        assert_eq!(m.params, before.0, "two_pass={two_pass}");
        assert_eq!(e.optimizer_state().unwrap(), before.1);
        let r = e.report_reeval(0.5).unwrap();
        assert_eq!(r.skip, SkipReason::NonfiniteGrad);
        assert_eq!(r.lr, 1e-2);
    }
}

#[test]
fn guard_off_lets_nan_through_and_reports_nonfinite_phi() {
    let mut cfg = config(OptimizerKind::Sgd, 1e-2);
    cfg.check_finite = false;
    let mut e = Engine::new(cfg).unwrap();
    let mut m = Model::new(&[5], 3);
    m.grads[0][0] = f32::INFINITY;
    unsafe { e.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
    assert!(!m.params[0][0].is_finite());
    let r = e.report_reeval(0.5).unwrap();
    assert_eq!(
        (r.decision, r.skip),
        (Decision::Skipped, SkipReason::NonfinitePhi)
    );
    assert_eq!(r.lr, 1e-2);
}

#[test]
fn found_inf_flag_skips() {
    let mut e = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut m = Model::new(&[5], 4);
    let p0 = m.params.clone();
    let flag = 1.0f32;
    unsafe {
        e.step(
            &m.tensors(),
            1.0,
            0.0,
            (&flag as *const f32).cast(),
            null_mut(),
        )
    }
    .unwrap();
    assert_eq!(m.params, p0);
    assert_eq!(e.report_reeval(0.5).unwrap().skip, SkipReason::FoundInf);
    let zero = 0.0f32;
    unsafe {
        e.step(
            &m.tensors(),
            1.0,
            0.0,
            (&zero as *const f32).cast(),
            null_mut(),
        )
    }
    .unwrap();
    assert_ne!(m.params, p0);
}

#[test]
fn call_order_and_layout_errors_change_nothing() {
    let mut e = Engine::new(config(OptimizerKind::Sgd, 0.1)).unwrap();
    assert_eq!(e.report_reeval(1.0).unwrap_err().status, Status::CallOrder);
    assert_eq!(e.should_reeval().unwrap_err().status, Status::CallOrder);
    let mut m = Model::new(&[4, 4], 5);
    unsafe { e.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
    e.report_reeval(0.9).unwrap();
    assert_eq!(
        e.report_reeval(0.9).unwrap_err().status,
        Status::CallOrder,
        "one re-evaluation per step"
    );
    let p = m.params.clone();
    let mut other = Model::new(&[4, 5], 6);
    let err = unsafe { e.step(&other.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap_err();
    assert_eq!(err.status, Status::SizeMismatch);
    assert!(err.message.contains("tensors[1]"), "{}", err.message);
    let mut fewer = Model::new(&[4], 6);
    assert_eq!(
        unsafe { e.step(&fewer.tensors(), 1.0, 0.0, null(), null_mut()) }
            .unwrap_err()
            .status,
        Status::SizeMismatch
    );
    let err = unsafe { e.step(&m.tensors(), 1.0, -1.0, null(), null_mut()) }.unwrap_err();
    assert_eq!(err.status, Status::InvalidArgument);
    assert!(err.message.contains("obs_var"));
    // Aliasing: a parameter that overlaps a gradient.
    let mut t = m.tensors();
    t[1].grad = t[0].param.cast_const();
    assert_eq!(
        unsafe { e.step(&t, 1.0, 0.0, null(), null_mut()) }
            .unwrap_err()
            .status,
        Status::InvalidArgument
    );
    // Misaligned.
    let mut t = m.tensors();
    t[0].param = unsafe { t[0].param.cast::<u8>().add(1).cast() };
    let err = unsafe { e.step(&t, 1.0, 0.0, null(), null_mut()) }.unwrap_err();
    assert!(err.message.contains("aligned"), "{}", err.message);
    assert_eq!(m.params, p);
    assert_eq!(e.counters().unwrap().steps, 1);
    assert_eq!(e.report_reeval(0.5).unwrap_err().status, Status::CallOrder);
}

/// Runs `steps` steps with re-evaluation on a model, from step index `from`.
fn run(e: &mut Engine, m: &mut Model, from: u64, steps: u64) {
    for k in from..from + steps {
        m.regrad(k);
        let loss = 1.0 + 1.0 / (k + 1) as f64;
        unsafe { e.step(&m.tensors(), loss, 0.0, null(), null_mut()) }.unwrap();
        let after = loss - (e.last_phi().unwrap() * if k % 3 == 0 { 1.0 } else { 0.2 });
        e.report_reeval(after).unwrap();
    }
}

#[test]
fn checkpoint_resume_is_bit_exact() {
    for kind in OptimizerKind::ALL {
        let sizes = [300, 17];
        let mut a = Engine::new(config(kind, 1e-2)).unwrap();
        let mut ma = Model::new(&sizes, 9);
        run(&mut a, &mut ma, 0, 10);
        let ckpt = checkpoint(&mut a);
        let params_at_ckpt = ma.params.clone();
        run(&mut a, &mut ma, 10, 10);

        let mut b = Engine::new(config(kind, 1e-2)).unwrap();
        b.load_state(&ckpt).unwrap();
        let mut mb = Model::new(&sizes, 9);
        mb.params = params_at_ckpt;
        run(&mut b, &mut mb, 10, 10);
        assert_eq!(ma.params, mb.params, "{kind:?}");
        assert_eq!(a.lr().to_bits(), b.lr().to_bits());
        assert_eq!(a.counters().unwrap(), b.counters().unwrap());
        assert_eq!(checkpoint(&mut a), checkpoint(&mut b));
    }
}

#[test]
fn foreign_or_corrupt_checkpoints_are_rejected_without_change() {
    let mut a = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut m = Model::new(&[8], 1);
    run(&mut a, &mut m, 0, 3);
    let ckpt = checkpoint(&mut a);

    let mut sgd = Engine::new(config(OptimizerKind::Sgd, 1e-2)).unwrap();
    assert_eq!(
        sgd.load_state(&ckpt).unwrap_err().status,
        Status::BadCheckpoint
    );

    let mut other_beta = config(OptimizerKind::Adam, 1e-2);
    other_beta.hyper.beta1 = 0.9;
    let err = Engine::new(other_beta)
        .unwrap()
        .load_state(&ckpt)
        .unwrap_err();
    assert!(err.message.contains("beta1"), "{}", err.message);

    let mut b = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut mb = Model::new(&[9], 1);
    run(&mut b, &mut mb, 0, 1);
    let before = checkpoint(&mut b);
    assert_eq!(
        b.load_state(&ckpt).unwrap_err().status,
        Status::BadCheckpoint,
        "layout differs"
    );
    let mut corrupt = ckpt.clone();
    corrupt[40] ^= 1;
    assert_eq!(
        b.load_state(&corrupt).unwrap_err().status,
        Status::BadCheckpoint
    );
    assert_eq!(
        b.load_state(&ckpt[..ckpt.len() - 3]).unwrap_err().status,
        Status::BadCheckpoint
    );
    assert_eq!(checkpoint(&mut b), before);
    let mut small = vec![0u8; 10];
    assert_eq!(
        b.save_state(&mut small).unwrap_err().status,
        Status::BufferTooSmall
    );
}

#[test]
fn phi_has_the_same_bits_whatever_the_thread_count() {
    // Enough for 8 threads (the CPU backend starts at most one thread per 256 Ki
    // elements).
    let sizes = [2_000_000, 3, 170_001];
    let mut phis = Vec::new();
    let mut outs = Vec::new();
    for threads in [1, 2, 3, 8] {
        let mut cfg = config(OptimizerKind::Adam, 1e-3);
        cfg.threads = threads;
        let mut e = Engine::new(cfg).unwrap();
        let mut m = Model::new(&sizes, 11);
        unsafe { e.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
        phis.push(e.last_phi().unwrap().to_bits());
        outs.push(m.params);
    }
    assert!(phis.iter().all(|&p| p == phis[0]), "{phis:?}");
    assert!(outs.iter().all(|o| *o == outs[0]));
}

/// Mixed dtypes: each element equals the reference element math applied in
/// f32 and rounded to the storage type.
#[test]
fn mixed_dtypes_follow_the_element_math() {
    let n = 1000;
    let p32 = values(n, 1);
    let g32 = values(n, 2);
    let mut p16: Vec<f16> = p32.iter().map(|&v| f16::from_f32(v)).collect();
    let g16: Vec<f16> = g32.iter().map(|&v| f16::from_f32(v)).collect();
    let mut pb: Vec<bf16> = p32.iter().map(|&v| bf16::from_f32(v)).collect();
    let gb: Vec<bf16> = g32.iter().map(|&v| bf16::from_f32(v)).collect();
    let (p16_0, pb_0) = (p16.clone(), pb.clone());
    let mut p = p32.clone();
    let kind = OptimizerKind::Adam;
    let mut e = Engine::new(config(kind, 1e-2)).unwrap();
    let t = [
        TensorDesc {
            param: p.as_mut_ptr().cast(),
            grad: g32.as_ptr().cast(),
            numel: n,
            dtype: DType::F32,
        },
        TensorDesc {
            param: p16.as_mut_ptr().cast(),
            grad: g16.as_ptr().cast(),
            numel: n,
            dtype: DType::F16,
        },
        TensorDesc {
            param: pb.as_mut_ptr().cast(),
            grad: gb.as_ptr().cast(),
            numel: n,
            dtype: DType::Bf16,
        },
    ];
    unsafe { e.step(&t, 1.0, 0.0, null(), null_mut()) }.unwrap();
    let h = Hyper::defaults(kind);
    let sc = StepScalars::new(kind, &h, BiasPowers::default().advanced(&h));
    let reference = |th: f32, g: f32| {
        let (mut a, mut b) = (0.0, 0.0);
        let d = lra::optim::direction::<{ OptimizerKind::Adam as u32 }>(&sc, th, g, &mut a, &mut b);
        lra::optim::apply(th, 1e-2f64 as f32, d)
    };
    for i in 0..n {
        assert_eq!(p[i].to_bits(), reference(p32[i], g32[i]).to_bits());
        assert_eq!(
            p16[i],
            f16::from_f32(reference(p16_0[i].to_f32(), g16[i].to_f32()))
        );
        assert_eq!(
            pb[i],
            bf16::from_f32(reference(pb_0[i].to_f32(), gb[i].to_f32()))
        );
    }
}

#[test]
fn obs_var_and_f_star_scale_the_step() {
    // SGD, one tensor: φ = η g·g, and the step is s·η·g.
    let g = [1.0f32, 2.0, 2.0]; // g·g = 9
    for (f_star, obs_var, expect_scale) in [
        (f64::NAN, 0.0, 1.0),
        (f64::NAN, 0.09, 0.9 / (0.9 + 0.09)), // φ = 0.9 with η = 0.1
        (0.0, 0.0, 2.0 * 4.5 / 0.9),          // Polyak: 2(f − f*)/φ with f = 4.5
        (5.0, 0.0, 0.0),                      // f < f*: no step
    ] {
        let mut cfg = config(OptimizerKind::Sgd, 0.1);
        cfg.settings.f_star = f_star;
        let mut e = Engine::new(cfg).unwrap();
        let mut p = vec![0.0f32; 3];
        let t = [TensorDesc {
            param: p.as_mut_ptr().cast(),
            grad: g.as_ptr().cast(),
            numel: 3,
            dtype: DType::F32,
        }];
        unsafe { e.step(&t, 4.5, obs_var, null(), null_mut()) }.unwrap();
        let r = e.report_reeval(4.0).unwrap();
        assert!(
            (r.scale - expect_scale).abs() < 1e-12,
            "f*={f_star} R={obs_var}: s={}",
            r.scale
        );
        assert!((r.phi - 0.9).abs() < 1e-7);
        let lr_eff = (expect_scale * 0.1) as f32;
        assert_eq!(p, vec![-lr_eff, -2.0 * lr_eff, -2.0 * lr_eff]);
        // ρ is against the unscaled step's φ/2 whatever s is, s = 0 included
        // (ALGORITHM.md rule 6): (4.5 − 4.0) / 0.45.
        assert_eq!(r.skip, SkipReason::None, "f*={f_star} R={obs_var}");
        assert!((r.rho - 0.5 / 0.45).abs() < 1e-6, "ρ = {}", r.rho);
    }
}

#[test]
fn empty_and_zero_sized_tensor_lists_work() {
    let mut e = Engine::new(config(OptimizerKind::Adam, 0.1)).unwrap();
    unsafe { e.step(&[], 1.0, 0.0, null(), null_mut()) }.unwrap();
    let r = e.report_reeval(0.5).unwrap();
    assert_eq!(
        r.skip,
        SkipReason::NonpositivePhi,
        "φ = 0 with no parameters"
    );
    let mut e = Engine::new(config(OptimizerKind::Adam, 0.1)).unwrap();
    let t = [TensorDesc {
        param: null_mut(),
        grad: null(),
        numel: 0,
        dtype: DType::F16,
    }];
    unsafe { e.step(&t, 1.0, 0.0, null(), null_mut()) }.unwrap();
}

#[test]
fn checkpoint_after_a_skipped_first_step() {
    let mut e = Engine::new(config(OptimizerKind::Adam, 0.1)).unwrap();
    let mut m = Model::new(&[6], 1);
    unsafe { e.step(&m.tensors(), f64::NAN, 0.0, null(), null_mut()) }.unwrap();
    let ckpt = checkpoint(&mut e);
    let mut f = Engine::new(config(OptimizerKind::Adam, 0.1)).unwrap();
    f.load_state(&ckpt).unwrap();
    assert_eq!(f.counters().unwrap().steps, 1);
    let r = f.report_reeval(0.5).unwrap();
    assert_eq!(
        r.skip,
        SkipReason::NonfiniteLoss,
        "the pending skipped step survives the checkpoint"
    );
}

/// The pending-step flags of a checkpoint are 0, or bit 0 (pending) with
/// bit 3 (its outcome recorded) and bits 1-2: `save_state` writes nothing
/// else, and anything else is refused with the handle unchanged. (The
/// checksum is recomputed so that the flags, not the checksum, are what is
/// refused.)
#[test]
fn forged_pending_step_flags_are_refused() {
    let mut a = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut m = Model::new(&[8, 3], 1);
    unsafe { a.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
    let ckpt = checkpoint(&mut a);
    // magic, version, optimizer, six hyper-parameters, tensor count and
    // 12 bytes a tensor; then seven counters, η, the schedule's next step
    // and gap, the last report (a flag, five f64 and a word)
    let flags_at = 72 + 12 * 2 + 7 * 8 + 3 * 8 + 4 + 5 * 8 + 4;
    let flags = u32::from_le_bytes(ckpt[flags_at..flags_at + 4].try_into().unwrap());
    assert_eq!(flags & 0b1001, 0b1001, "a pending step's flags: {flags:#x}");

    let mut b = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut mb = Model::new(&[8, 3], 2);
    unsafe { b.step(&mb.tensors(), 2.0, 0.0, null(), null_mut()) }.unwrap();
    let before = checkpoint(&mut b);
    for forged in [flags & !0b1000, 0b1000, flags | 0b1_0000, flags | 1 << 31] {
        let mut bytes = ckpt.clone();
        bytes[flags_at..flags_at + 4].copy_from_slice(&forged.to_le_bytes());
        support::reseal(&mut bytes);
        let e = b.load_state(&bytes).unwrap_err();
        assert_eq!(e.status, Status::BadCheckpoint, "{forged:#x}: {e}");
        assert!(e.message.contains("pending-step flags"), "{forged:#x}: {e}");
        assert_eq!(checkpoint(&mut b), before, "{forged:#x} changed the handle");
    }
    b.load_state(&ckpt).unwrap();
    assert_eq!(checkpoint(&mut b), ckpt);
    assert_eq!(b.report_reeval(0.5).unwrap(), a.report_reeval(0.5).unwrap());
}

/// The last-report flag is 0 or 1, and an empty slot (no report yet,
/// nothing pending) holds the zeros `save_state` writes: a checkpoint with
/// anything else there did not come from lra and is refused, the handle
/// unchanged, so every accepted checkpoint saves back to its own bytes.
#[test]
fn forged_empty_checkpoint_slots_are_refused() {
    // magic … the schedule (see above), then the last report: a flag, five
    // f64 and a word; then the pending step: flags, its loss, φ, s, a word.
    let last_at = 72 + 12 * 2 + 7 * 8 + 3 * 8;
    let pending_at = last_at + 4 + 5 * 8 + 4;
    let mut a = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut m = Model::new(&[8, 3], 1);
    // Stepped, not reported: the last-report slot is empty.
    unsafe { a.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
    let unreported = checkpoint(&mut a);
    // Reported: the pending slot is empty, the last-report slot full.
    a.report_reeval(0.5).unwrap();
    let reported = checkpoint(&mut a);
    let read = |c: &[u8], at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
    assert_eq!(
        (read(&unreported, last_at), read(&reported, last_at)),
        (0, 1)
    );
    assert_eq!(read(&reported, pending_at), 0);

    let mut b = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut mb = Model::new(&[8, 3], 2);
    unsafe { b.step(&mb.tensors(), 2.0, 0.0, null(), null_mut()) }.unwrap();
    let before = checkpoint(&mut b);
    let word = |v: u32| v.to_le_bytes().to_vec();
    let double = |v: f64| v.to_le_bytes().to_vec();
    let forgeries = [
        (&reported, last_at, word(2), "last-report flag"),
        (&unreported, last_at, word(2), "last-report flag"),
        (&unreported, last_at + 4, double(1.5), "last-report slot"),
        (
            &unreported,
            last_at + 4 + 5 * 8,
            word(1),
            "last-report slot",
        ),
        (&reported, pending_at + 4, double(1.0), "pending-step slot"),
        (
            &reported,
            pending_at + 4 + 16,
            double(-0.0),
            "pending-step slot",
        ),
        (&reported, pending_at + 4 + 24, word(4), "pending-step slot"),
    ];
    for (ckpt, at, value, what) in forgeries {
        let mut bytes = ckpt.clone();
        bytes[at..at + value.len()].copy_from_slice(&value);
        support::reseal(&mut bytes);
        let e = b.load_state(&bytes).unwrap_err();
        assert_eq!(e.status, Status::BadCheckpoint, "{what} at {at}: {e}");
        assert!(e.message.contains(what), "{what} at {at}: {e}");
        assert_eq!(
            checkpoint(&mut b),
            before,
            "{what} at {at} changed the handle"
        );
    }
    for ckpt in [&unreported, &reported] {
        b.load_state(ckpt).unwrap();
        assert_eq!(&checkpoint(&mut b), ckpt);
    }
}

/// A checkpoint cut anywhere (or grown by a byte) with its checksum made
/// valid again is refused, never read past its end, and changes nothing:
/// every field is read through a length check.
#[test]
fn resealed_truncated_checkpoints_are_refused() {
    let mut a = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let mut m = Model::new(&[5, 3], 1);
    run(&mut a, &mut m, 0, 2);
    unsafe { a.step(&m.tensors(), 1.0, 0.0, null(), null_mut()) }.unwrap();
    let ckpt = checkpoint(&mut a);
    let mut b = Engine::new(config(OptimizerKind::Adam, 1e-2)).unwrap();
    let before = checkpoint(&mut b);
    let body = ckpt.len() - 8;
    let mut cuts: Vec<Vec<u8>> = (8..body)
        .map(|keep| {
            let mut c = ckpt[..keep].to_vec();
            c.extend_from_slice(&[0; 8]);
            c
        })
        .collect();
    let mut longer = ckpt[..body].to_vec();
    longer.extend_from_slice(&[0; 9]);
    cuts.push(longer);
    for mut c in cuts {
        support::reseal(&mut c);
        let e = b.load_state(&c).unwrap_err();
        assert_eq!(e.status, Status::BadCheckpoint, "{} bytes: {e}", c.len());
    }
    assert_eq!(checkpoint(&mut b), before);
    b.load_state(&ckpt).unwrap();
}
