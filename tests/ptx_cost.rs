//! What the kernels' own work costs when one layout is split into many
//! tensors, counted by the PTX interpreter (`LaunchReport`): instructions,
//! global bytes, and global round trips on the critical path (a model of
//! in-order issue, `ptx_interp::LaunchReport::latency_rounds`). Counts, not
//! timings: they are the same on every run and every machine, so they can
//! be asserted. What they leave out (bandwidth, the caller's allocations,
//! launch latency) is measured by `scripts/gpu-check.sh` on a GPU.

mod ptx_common;
mod support;

use lra::backend::cuda::abi;
use lra::optim::{DType, OptimizerKind};
use ptx_common::*;
use ptx_interp::{LaunchReport, Module};

/// The grid the CUDA backend picks on an H200: 132 SMs × 4 resident blocks
/// (ptxas: 56 registers × 256 threads for sm_90, so 4 blocks fill the
/// 64K-register file). Only layouts of more than 528 chunks notice it.
const H200_GRID: u32 = 132 * 4;

/// `n` elements in `k` tensors the way `scripts/gpu_check.py` splits them:
/// `n / k` each, the remainder in the last.
fn split(dtype: DType, n: usize, k: usize) -> Vec<Spec> {
    let mut sizes = vec![n / k; k];
    sizes[k - 1] += n - (n / k) * k;
    sizes.into_iter().map(|s| spec(dtype, s)).collect()
}

/// One step's launches added up: work adds, latency rounds too (the
/// launches run one after another on the stream).
#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    launches: usize,
    instructions: u64,
    load_bytes: u64,
    store_bytes: u64,
    bytes_read: u64,
    bytes_written: u64,
    atomics: u64,
    rounds: u32,
}

impl Cost {
    fn of(reports: &[LaunchReport]) -> Cost {
        reports.iter().fold(Cost::default(), |c, r| Cost {
            launches: c.launches + 1,
            instructions: c.instructions + r.instructions,
            load_bytes: c.load_bytes + r.global_load_bytes,
            store_bytes: c.store_bytes + r.global_store_bytes,
            bytes_read: c.bytes_read + r.global_bytes_read,
            bytes_written: c.bytes_written + r.global_bytes_written,
            atomics: c.atomics + r.global_atomics,
            rounds: c.rounds + r.latency_rounds,
        })
    }
}

/// The cost of one step of `kind` over `specs` (finite values, so every
/// pass runs to its end) on the H200's grid.
fn step_cost(m: &Module, kind: OptimizerKind, specs: &[Spec], pass: Pass) -> Cost {
    let mut rng = Rng(7);
    let slots = kind.state_slots();
    let numels: Vec<usize> = specs.iter().map(|s| s.numel).collect();
    let nchunks = abi::chunk_table(&numels).chunks.len() as u32;
    let mut gpu = Gpu::new(m, kind, specs, Some(abi::grid(nchunks, H200_GRID)));
    let draw = |rng: &mut Rng, dt: DType, n: usize| values(rng, dt, n, 13, 5, true);
    let params: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| draw(&mut rng, s.dtype, s.numel))
        .collect();
    let grads: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| draw(&mut rng, s.dtype, s.numel))
        .collect();
    let state: Vec<Vec<f32>> = specs
        .iter()
        .map(|s| {
            let raw = draw(&mut rng, DType::F32, slots * s.numel);
            (0..slots * s.numel)
                .map(|i| to_f32(DType::F32, &raw, i).abs())
                .collect()
        })
        .collect();
    gpu.write_params(&params);
    gpu.write_grads(&grads);
    gpu.set_state(&state);
    let hyper = hyper(kind, false);
    gpu.step(pass, &hyper, 1e-3, 1.0, false)
        .unwrap_or_else(|e| panic!("{kind:?} {pass:?}: {e}"));
    assert_eq!(gpu.control().skip, 0, "the step must run to its end");
    Cost::of(&gpu.reports)
}

/// The split costs its table work and no more: under 3% more
/// instructions than one tensor.
fn assert_few_more_instructions(what: &str, many: &Cost, one: &Cost) {
    assert!(
        ratio(many.instructions, one.instructions) < 1.03,
        "{what}: instructions {} vs {}",
        many.instructions,
        one.instructions
    );
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

/// One step over 1M parameters as 1 tensor and as `split` tensors, in
/// the three kinds of step; prints the counts side by side. Returns
/// (pass name, cost of 1 tensor, cost of the split).
fn compare(m: &Module, split_into: usize) -> Vec<(&'static str, Cost, Cost)> {
    let n = 1 << 20;
    let passes = [
        ("fused, guard off", Pass::Fused),
        ("fused, guard on", Pass::Guarded),
        (
            "two-pass (f* known)",
            Pass::Scaled {
                f_star: 0.0,
                obs_var: 0.0,
            },
        ),
    ];
    println!("| Adam f32, 1M parameters | tensors | launches | instructions | bytes loaded (per thread) | distinct bytes read | distinct bytes written | latency rounds |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut out = Vec::new();
    for (name, pass) in passes {
        let one = step_cost(m, OptimizerKind::Adam, &split(DType::F32, n, 1), pass);
        let many = step_cost(
            m,
            OptimizerKind::Adam,
            &split(DType::F32, n, split_into),
            pass,
        );
        for (k, c) in [(1, one), (split_into, many)] {
            println!(
                "| {name} | {k} | {} | {} | {} | {} | {} | {} |",
                c.launches, c.instructions, c.load_bytes, c.bytes_read, c.bytes_written, c.rounds
            );
        }
        out.push((name, one, many));
    }
    for (name, one, many) in &out {
        println!(
            "{name}: {split_into} tensors / 1: instructions {:.4}, distinct bytes read {:.4}, latency rounds {} vs {}",
            ratio(many.instructions, one.instructions),
            ratio(many.bytes_read, one.bytes_read),
            many.rounds,
            one.rounds
        );
    }
    out
}

/// The split the GPU benchmark measures (`scripts/gpu_check.py`: 200
/// tensors against 1 of the same total size, the issue's "no more than 5%
/// over 1 tensor"). With a chunk's descriptors staged together and its
/// 4-element units dealt out across segments as if it held one tensor, a
/// chunk shared by two tensors waits for its tables as often as a chunk
/// of one and every thread has the same number of units; the guard's
/// check pass fills each thread's group of four loads across segments,
/// an f32 tensor's partial last unit (this split's 5242-element tensors
/// end 2 elements into one) included: every step waits exactly as long.
#[test]
fn two_hundred_tensors_wait_as_long_as_one_tensor() {
    let m = kernel_module();
    for (name, one, many) in compare(&m, 200) {
        // the same elements and state are moved: tables are the difference
        assert!(
            ratio(many.bytes_read, one.bytes_read) < 1.005,
            "{name}: distinct bytes read {} vs {}",
            many.bytes_read,
            one.bytes_read
        );
        assert!(
            ratio(many.bytes_written, one.bytes_written) < 1.0001,
            "{name}: distinct bytes written {} vs {}",
            many.bytes_written,
            one.bytes_written
        );
        assert_few_more_instructions(name, &many, &one);
        assert_eq!(many.rounds, one.rounds, "{name}: latency rounds");
    }
}

/// Half-precision gradients in the guarded step: 200 bf16 tensors wait
/// exactly as long as 1 tensor, whether they are whole vectors (multiples
/// of 4 elements, as weights, biases and norms usually are) or end in a
/// partial unit of 1-3 halves (the check pass loads those half by half
/// into a slot of the thread's open group, as it does an f32 tail).
#[test]
fn two_hundred_half_tensors_in_the_guarded_step() {
    let m = kernel_module();
    let n = 1 << 20;
    let each = n / 200 / 4 * 4;
    let mut whole: Vec<Spec> = (0..199).map(|_| spec(DType::Bf16, each)).collect();
    whole.push(spec(DType::Bf16, n - 199 * each));
    assert!(whole.iter().all(|s| s.numel % 4 == 0));
    let odd = split(DType::Bf16, n, 200);
    assert!(odd.iter().all(|s| s.numel % 4 != 0));
    let one = step_cost(
        &m,
        OptimizerKind::Adam,
        &split(DType::Bf16, n, 1),
        Pass::Guarded,
    );
    for (what, specs) in [("whole vectors", &whole), ("odd sizes", &odd)] {
        let many = step_cost(&m, OptimizerKind::Adam, specs, Pass::Guarded);
        println!(
            "fused, guard on, bf16, 200 tensors ({what}): latency rounds {} vs {}, instructions {:.4}",
            many.rounds,
            one.rounds,
            ratio(many.instructions, one.instructions)
        );
        assert_eq!(many.rounds, one.rounds, "{what}: latency rounds");
        assert_few_more_instructions(what, &many, &one);
    }
}
