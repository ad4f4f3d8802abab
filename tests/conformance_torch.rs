//! Conformance (issue 2, test 2): for each optimizer, 20 steps with the
//! adaptation idle (no re-evaluation) match torch.optim (Debian's
//! python3-torch) on the same random tensors within 1e-6 relative in f32.

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the test owns and keeps alive across the call
// (host slices, or its own device buffers), and null or test-owned flags
// and streams.

use lra::backend::TensorDesc;
use lra::config::Config;
use lra::optim::{DType, OptimizerKind};
use lra::Engine;
use std::process::Command;

mod support;
use std::ptr::{null, null_mut};

const PYTHON: &str = "/usr/bin/python3";

fn torch_available() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import torch"])
        .status()
        .is_ok_and(|s| s.success())
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = support::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1));
    (0..n)
        .map(|_| {
            let (u, v) = (rng.unit().max(1e-300), rng.unit());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

#[test]
fn twenty_steps_match_torch_optim() {
    if !torch_available() {
        support::skipped(
            "twenty_steps_match_torch_optim",
            &format!("{PYTHON} cannot import torch (install Debian's python3-torch; scripts/deps.sh does)"),
        );
        return;
    }
    let (n, steps, lr) = (4096usize, 20usize, 1e-2f64);
    let dir = std::env::temp_dir().join(format!("lra-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut worst_overall = 0.0f64;
    for kind in OptimizerKind::ALL {
        let p0 = gaussian(n, 1);
        // Gradient scales vary per step so adaptive optimizers see changes.
        let grads: Vec<Vec<f32>> = (0..steps)
            .map(|k| {
                gaussian(n, 100 + k as u64)
                    .iter()
                    .map(|g| g * (1.0 + k as f32 / 4.0))
                    .collect()
            })
            .collect();
        let input = dir.join(format!("in-{}", kind.name()));
        let output = dir.join(format!("out-{}", kind.name()));
        let mut bytes = Vec::new();
        for v in [kind as u32, n as u32, steps as u32] {
            bytes.extend(v.to_le_bytes());
        }
        bytes.extend(lr.to_le_bytes());
        bytes.extend(p0.iter().flat_map(|v| v.to_le_bytes()));
        for g in &grads {
            bytes.extend(g.iter().flat_map(|v| v.to_le_bytes()));
        }
        std::fs::write(&input, bytes).unwrap();
        let st = Command::new(PYTHON)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/torch_reference.py"
            ))
            .arg(&input)
            .arg(&output)
            .status()
            .unwrap();
        assert!(st.success(), "torch reference failed for {kind:?}");
        let reference: Vec<f32> = std::fs::read(&output)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(reference.len(), n * steps);

        let mut e = Engine::new(Config {
            lr,
            ..Config::defaults(kind)
        })
        .unwrap();
        let mut p = p0.clone();
        let mut worst = 0.0f64;
        for (k, g) in grads.iter().enumerate() {
            let t = [TensorDesc {
                param: p.as_mut_ptr().cast(),
                grad: g.as_ptr().cast(),
                numel: n,
                dtype: DType::F32,
            }];
            unsafe { e.step(&t, 1.0, 0.0, null(), null_mut()) }.unwrap();
            // Relative error in the max norm, per step: ‖lra − torch‖∞ / ‖torch‖∞.
            // (Element-wise it would blow up where a parameter passes through
            // zero: one rounding of lr·d, which torch may fuse into an FMA,
            // is then large relative to θ itself.)
            let want = &reference[k * n..(k + 1) * n];
            let scale = want.iter().fold(0.0f64, |m, &b| m.max(b.abs() as f64));
            let (i, diff) = p
                .iter()
                .zip(want)
                .map(|(&a, &b)| (a as f64 - b as f64).abs())
                .enumerate()
                .fold(
                    (0, 0.0f64),
                    |best, (i, d)| if d > best.1 { (i, d) } else { best },
                );
            let rel = diff / scale;
            worst = worst.max(rel);
            assert!(
                rel <= 1e-6,
                "{kind:?} step {k}: element {i} lra {} vs torch {} (rel {rel:e})",
                p[i],
                want[i]
            );
        }
        println!(
            "{:<9} worst relative difference over {steps} steps: {worst:.2e}",
            kind.name()
        );
        worst_overall = worst_overall.max(worst);
    }
    println!("all optimizers within {worst_overall:.2e} of torch.optim");
    std::fs::remove_dir_all(&dir).ok();
}
