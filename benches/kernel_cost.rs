//! Kernel-cost benchmark of the CPU backend (a program, not a timed test).
//!
//! For each optimizer, dtype, size (1e4 .. 1e8 parameters), layout (1 or
//! 200 tensors) and thread count it measures, interleaved in one run so
//! that machine noise hits every variant alike:
//!
//! - `copy`:  a plain copy moving the same bytes as the fused step (read +
//!   write = the step's bytes; the memory-bandwidth bound), split over the
//!   same number of threads;
//! - `plain`: the same optimizer with adaptation off (the backend's own
//!   chunks, threads and element math, no dot product, no guard);
//! - `lra`:   `lra_step` + `lra_report_reeval` through the C ABI with the
//!   non-finite guard off (`check_finite = 0`: exactly the plain bytes);
//! - `lra+g`: the same with the guard on (the default; one extra read of g);
//! - `torch`: `torch.optim` on the same sizes (`scripts/bench-torch.py`, run
//!   with `/usr/bin/python3` when it imports torch; skipped loudly otherwise).
//!
//! Each variant reports the minimum over its repetitions, in ns per
//! parameter, and the table prints the ratios.
//!
//! Parameters and gradients are two allocations; `--flat` puts them in one,
//! the gradients right after the parameters (a C code's single buffer), and
//! `--flat-gap BYTES` leaves that many bytes between them.
//! Torch always gets its own tensors.
//!
//! ```text
//! cargo bench --bench kernel_cost                      # default matrix
//! cargo bench --bench kernel_cost -- --quick           # CI-sized smoke run
//! cargo bench --bench kernel_cost -- --sizes 64M --opt adam --dtype f32 --threads 1,2
//! cargo bench --bench kernel_cost -- --sizes 64M --opt adam --dtype f32 --tensors 1 --flat
//! ```

// `unsafe` blocks in this file call `Engine::step`, `Backend::step` or
// `CpuBackend::step_plain`, which take raw pointers: every call passes
// descriptors of buffers the benchmark owns and keeps alive across the call
// (host slices, or its own device buffers), and null or its own flags
// and streams.

use lra::backend::cpu::CpuBackend;
use lra::backend::TensorDesc;
use lra::ffi::*;
use lra::{DType, Hyper, OptimizerKind};
use std::ffi::c_void;
use std::process::Command;
use std::time::Instant;

struct Options {
    sizes: Vec<usize>,
    layouts: Vec<usize>,
    threads: Vec<usize>,
    kinds: Vec<OptimizerKind>,
    dtypes: Vec<DType>,
    /// Seconds of measurement per variant and configuration (at least
    /// `min_reps` repetitions).
    budget: f64,
    min_reps: usize,
    torch: bool,
    /// Parameters and gradients in one allocation, the gradients this many
    /// bytes after the parameters' end (`--flat`: 0, `--flat-gap BYTES`);
    /// `None`: two allocations (the default).
    flat: Option<usize>,
    clock: Clock,
    stat: Stat,
}

/// Which of a variant's repetitions a row reports.
#[derive(Clone, Copy, PartialEq)]
enum Stat {
    /// The fastest: what the code can do, with the machine's noise left
    /// out (the default).
    Min,
    /// The middle one (of an even count, the slower middle one): what a
    /// step typically costs, including costs that vary from call to call,
    /// such as starting threads (a minimum hides most of those).
    Median,
}

impl Stat {
    fn name(self) -> &'static str {
        match self {
            Stat::Min => "min",
            Stat::Median => "median",
        }
    }
}

/// What a repetition's time is.
#[derive(Clone, Copy, PartialEq)]
enum Clock {
    /// Wall-clock time.
    Wall,
    /// CPU time of the whole process divided by the thread count: on a
    /// shared machine this leaves out the time other processes held our
    /// cores, the main noise there (it cannot leave out their use of the
    /// memory bus, and it reads low when threads wait for each other).
    Cpu,
}

fn parse_size(s: &str) -> usize {
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('M') => (&s[..s.len() - 1], 1048576.0),
        Some('m') => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    (num.parse::<f64>()
        .unwrap_or_else(|_| panic!("bad size {s}"))
        * mul) as usize
}

fn parse_kind(s: &str) -> OptimizerKind {
    *OptimizerKind::ALL
        .iter()
        .find(|k| k.name() == s)
        .unwrap_or_else(|| panic!("unknown optimizer {s}"))
}

fn parse_dtype(s: &str) -> DType {
    match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::Bf16,
        _ => panic!("unknown dtype {s}"),
    }
}

fn list<T>(s: &str, f: impl Fn(&str) -> T) -> Vec<T> {
    s.split(',').filter(|x| !x.is_empty()).map(f).collect()
}

fn options() -> Options {
    use OptimizerKind::*;
    let mut o = Options {
        // 1e4 .. 1e8 and 64Mi, the issue's reference size.
        sizes: vec![
            10_000,
            100_000,
            1_000_000,
            10_000_000,
            64 << 20,
            100_000_000,
        ],
        layouts: vec![1, 200],
        threads: vec![1, 2],
        kinds: vec![Sgd, Momentum, Adagrad, Rmsprop, Adam],
        dtypes: vec![DType::F32, DType::F16, DType::Bf16],
        budget: 0.2,
        min_reps: 3,
        torch: true,
        flat: None,
        clock: Clock::Wall,
        stat: Stat::Min,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut val = || {
            i += 1;
            args.get(i)
                .cloned()
                .unwrap_or_else(|| panic!("{a} needs a value"))
        };
        match a {
            "--sizes" => o.sizes = list(&val(), parse_size),
            "--tensors" => o.layouts = list(&val(), |x| x.parse().unwrap()),
            "--threads" => o.threads = list(&val(), |x| x.parse().unwrap()),
            "--opt" => o.kinds = list(&val(), parse_kind),
            "--dtype" => o.dtypes = list(&val(), parse_dtype),
            "--budget" => o.budget = val().parse().unwrap(),
            "--reps" => o.min_reps = val().parse().unwrap(),
            "--no-torch" => o.torch = false,
            "--flat" => o.flat = Some(0),
            "--flat-gap" => {
                let gap: usize = val().parse().unwrap();
                // The gradients must stay aligned for every dtype.
                assert!(
                    gap.is_multiple_of(4),
                    "--flat-gap {gap}: a multiple of 4 bytes"
                );
                o.flat = Some(gap);
            }
            "--clock" => {
                o.clock = match val().as_str() {
                    "wall" => Clock::Wall,
                    "cpu" => Clock::Cpu,
                    c => panic!("--clock {c}: wall or cpu"),
                }
            }
            "--stat" => {
                o.stat = match val().as_str() {
                    "min" => Stat::Min,
                    "median" => Stat::Median,
                    v => panic!("--stat {v}: min or median"),
                }
            }
            "--quick" => {
                o.sizes = vec![10_000, 1_000_000];
                o.kinds = vec![Sgd, Adam];
                o.budget = 0.05;
                o.min_reps = 2;
            }
            // cargo bench passes --bench to every harness = false program.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "options: --sizes 10k,1M,64M (k = 1e3, m = 1e6, M = 2^20) --tensors 1,200 --threads 1,2 \
                     --opt sgd,momentum,adagrad,rmsprop,adam --dtype f32,f16,bf16 \
                     --budget SECONDS --reps N --clock wall|cpu --stat min|median --no-torch --flat --flat-gap BYTES --quick"
                );
                std::process::exit(0);
            }
            _ => panic!("unknown argument {a} (try --help)"),
        }
        i += 1;
    }
    o
}

/// Bytes one parameter moves in the fused step without the guard: θ read
/// and written, g read, each f32 state slot read and written.
fn step_bytes(kind: OptimizerKind, dtype: DType) -> usize {
    3 * dtype.size() + 8 * kind.state_slots()
}

/// Parameter and gradient storage of one configuration, cut into tensors.
struct Model {
    /// The parameters' bytes; when `flat` is `Some(gap)`, followed by `gap`
    /// bytes and the gradients' bytes.
    params: Vec<u8>,
    /// The gradients' bytes (empty when `flat`).
    grads: Vec<u8>,
    flat: Option<usize>,
    /// (offset in elements, numel) per tensor.
    spans: Vec<(usize, usize)>,
    dtype: DType,
}

/// Tensor sizes: `n` split into `tensors` parts of unequal sizes (a model's
/// layers are not all alike), each at least 1 element when n allows.
fn spans(n: usize, tensors: usize) -> Vec<(usize, usize)> {
    let tensors = tensors.min(n).max(1);
    // Weights 1, 2, 3, 1, 2, 3, ...
    let w: Vec<usize> = (0..tensors).map(|i| 1 + i % 3).collect();
    let total: usize = w.iter().sum();
    let mut out = Vec::with_capacity(tensors);
    let mut off = 0;
    for (i, wi) in w.iter().enumerate() {
        let len = if i + 1 == tensors {
            n - off
        } else {
            (n * wi / total).max(1)
        };
        out.push((off, len));
        off += len;
    }
    out
}

impl Model {
    fn new(n: usize, tensors: usize, dtype: DType, flat: Option<usize>) -> Model {
        let esz = dtype.size();
        let (mut params, mut grads) = (vec![0u8; n * esz], vec![0u8; n * esz]);
        // Deterministic values of moderate size: θ in [-1, 1), g in [-0.01, 0.01).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for i in 0..n {
            let (p, g) = (next(), 0.01 * next());
            match dtype {
                DType::F32 => {
                    params[4 * i..4 * i + 4].copy_from_slice(&p.to_ne_bytes());
                    grads[4 * i..4 * i + 4].copy_from_slice(&g.to_ne_bytes());
                }
                DType::Bf16 => {
                    let (p, g) = (half::bf16::from_f32(p), half::bf16::from_f32(g));
                    params[2 * i..2 * i + 2].copy_from_slice(&p.to_bits().to_ne_bytes());
                    grads[2 * i..2 * i + 2].copy_from_slice(&g.to_bits().to_ne_bytes());
                }
                DType::F16 => {
                    let (p, g) = (half::f16::from_f32(p), half::f16::from_f32(g));
                    params[2 * i..2 * i + 2].copy_from_slice(&p.to_bits().to_ne_bytes());
                    grads[2 * i..2 * i + 2].copy_from_slice(&g.to_bits().to_ne_bytes());
                }
            }
        }
        if let Some(gap) = flat {
            params.resize(n * esz + gap, 0);
            params.append(&mut grads);
        }
        Model {
            params,
            grads,
            flat,
            spans: spans(n, tensors),
            dtype,
        }
    }

    fn c_tensors(&mut self) -> Vec<lra_tensor> {
        let esz = self.dtype.size();
        let p = self.params.as_mut_ptr();
        let g = if let Some(gap) = self.flat {
            // SAFETY: a flat buffer holds the gradients after the
            // parameters and the gap.
            unsafe { p.add((self.params.len() + gap) / 2) as *const u8 }
        } else {
            self.grads.as_ptr()
        };
        self.spans
            .iter()
            .map(|&(off, len)| lra_tensor {
                // SAFETY: spans lie inside the buffers.
                param: unsafe { p.add(off * esz) } as *mut c_void,
                grad: unsafe { g.add(off * esz) } as *const c_void,
                numel: len as u64,
                dtype: self.dtype as u32,
                reserved: 0,
            })
            .collect()
    }

    fn descs(&mut self) -> Vec<TensorDesc> {
        self.c_tensors()
            .iter()
            .map(|t| TensorDesc {
                param: t.param,
                grad: t.grad,
                numel: t.numel as usize,
                dtype: self.dtype,
            })
            .collect()
    }
}

/// The memory-bandwidth bound: copies `src` into `dst` on `threads`
/// threads, each a contiguous share (what `memcpy` does per thread).
fn copy_split(dst: &mut [u8], src: &[u8], threads: usize) {
    if threads <= 1 {
        dst.copy_from_slice(src);
        return;
    }
    let per = src.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}

struct LraHandle(*mut lra_handle);

impl LraHandle {
    fn new(kind: OptimizerKind, threads: usize, guard: bool) -> LraHandle {
        // SAFETY: plain C ABI use: init, create, checked status.
        unsafe {
            let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
            lra_config_init(cfg.as_mut_ptr(), kind as u32);
            let mut cfg = cfg.assume_init();
            cfg.num_threads = threads as u32;
            cfg.check_finite = guard as u32;
            cfg.lr = 1e-4;
            let mut h = std::ptr::null_mut();
            let st = lra_create(&cfg, &mut h);
            assert_eq!(st, LRA_OK, "lra_create failed");
            LraHandle(h)
        }
    }

    /// One iteration as a trainer runs it: step, then report f+.
    fn iterate(&mut self, tensors: &[lra_tensor], loss: f64) {
        // SAFETY: the tensors point into a live Model.
        unsafe {
            let st = lra_step(
                self.0,
                tensors.as_ptr(),
                tensors.len(),
                loss,
                0.0,
                std::ptr::null_mut(),
            );
            assert_eq!(st, LRA_OK, "lra_step failed");
            let st = lra_report_reeval(self.0, loss * 0.999, std::ptr::null_mut());
            assert_eq!(st, LRA_OK, "lra_report_reeval failed");
        }
    }
}

impl Drop for LraHandle {
    fn drop(&mut self) {
        // SAFETY: created by lra_create, destroyed once.
        unsafe { lra_destroy(self.0) }
    }
}

fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Times one call of `f` in seconds on `clock` (`threads` = the threads it uses).
fn time_one(clock: Clock, threads: usize, f: &mut dyn FnMut()) -> f64 {
    match clock {
        Clock::Wall => {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        }
        Clock::Cpu => {
            let t = process_cpu_seconds();
            f();
            (process_cpu_seconds() - t) / threads as f64
        }
    }
}

/// Seconds per call of each closure (`o.stat` of its calls), measured
/// round-robin (the starting closure rotating) until the budget is spent
/// and every closure ran at least `min_reps` times.
fn race(o: &Options, threads: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let (budget, min_reps) = (o.budget, o.min_reps);
    for f in fs.iter_mut() {
        f(); // warm-up: page faults, state allocation
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    let start = Instant::now();
    let mut reps = 0;
    // At least one repetition, so that every variant has a time.
    while reps < min_reps.max(1) || start.elapsed().as_secs_f64() < budget * fs.len() as f64 {
        // Rotate who goes first, so no variant always follows the same one.
        let k = fs.len();
        for j in 0..k {
            let i = (j + reps) % k;
            times[i].push(time_one(o.clock, threads, fs[i]));
        }
        reps += 1;
        if reps >= 1000 {
            break;
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            match o.stat {
                Stat::Min => t[0],
                Stat::Median => t[t.len() / 2],
            }
        })
        .collect()
}

/// One measured configuration.
struct Row {
    kind: OptimizerKind,
    dtype: DType,
    n: usize,
    tensors: usize,
    threads: usize,
    /// ns per parameter: copy, plain, lra, lra + guard.
    copy: f64,
    plain: f64,
    lra: f64,
    lra_guard: f64,
}

fn measure(
    o: &Options,
    kind: OptimizerKind,
    dtype: DType,
    n: usize,
    tensors: usize,
    threads: usize,
) -> Row {
    let mut model = Model::new(n, tensors, dtype, o.flat);
    let c_tensors = model.c_tensors();
    let descs = model.descs();
    let copy_bytes = step_bytes(kind, dtype) * n / 2;
    let src = vec![1u8; copy_bytes];
    let mut dst = vec![0u8; copy_bytes];
    let mut plain = CpuBackend::new(kind, threads);
    // The threads the step starts (fewer than allowed for small steps):
    // the copy gets as many, and CPU time is divided by them.
    let used = plain.threads_for_step(&descs);
    let hyper = Hyper::defaults(kind);
    let mut lra = LraHandle::new(kind, threads, false);
    let mut lra_guard = LraHandle::new(kind, threads, true);
    let t = race(
        o,
        used,
        &mut [
            &mut || copy_split(&mut dst, &src, used),
            &mut || unsafe { plain.step_plain(&descs, &hyper, 1e-4) },
            &mut || lra.iterate(&c_tensors, 1.0),
            &mut || lra_guard.iterate(&c_tensors, 1.0),
        ],
    );
    let ns = |s: f64| s * 1e9 / n as f64;
    Row {
        kind,
        dtype,
        n,
        tensors,
        threads,
        copy: ns(t[0]),
        plain: ns(t[1]),
        lra: ns(t[2]),
        lra_guard: ns(t[3]),
    }
}

/// One line of `scripts/bench-torch.py`.
struct TorchRow {
    optimizer: String,
    dtype: String,
    n: usize,
    tensors: usize,
    threads: usize,
    ns_per_param: f64,
}

/// torch.optim timings keyed like the rows, from `scripts/bench-torch.py`;
/// None (with a loud line) when torch is not available.
fn torch_times(o: &Options) -> Option<Vec<TorchRow>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-torch.py");
    let names = |v: &[OptimizerKind]| v.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
    let dtypes = o
        .dtypes
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(",");
    let join = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let out = Command::new("/usr/bin/python3")
        // Idle OpenMP workers sleep instead of spinning, so that CPU time
        // (--clock cpu) counts only work.
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .arg(script)
        .args(["--opt", &names(&o.kinds), "--dtype", &dtypes])
        .args(["--sizes", &join(&o.sizes), "--tensors", &join(&o.layouts)])
        .args(["--threads", &join(&o.threads)])
        .args([
            "--budget",
            &o.budget.to_string(),
            "--reps",
            &o.min_reps.to_string(),
        ])
        .args([
            "--clock",
            match o.clock {
                Clock::Wall => "wall",
                Clock::Cpu => "cpu",
            },
        ])
        .args(["--stat", o.stat.name()])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut v = Vec::new();
            // What torch cannot run (e.g. CPU Adam in f16; a configuration
            // has a row if either implementation ran): say why.
            for line in text.lines().filter_map(|l| l.strip_prefix("# ")) {
                println!("torch.optim could not run {line}");
            }
            for line in text.lines().filter(|l| l.starts_with("torch ")) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // torch <opt> <dtype> <n> <tensors> <threads> <ns/param>
                v.push(TorchRow {
                    optimizer: f[1].to_string(),
                    dtype: f[2].to_string(),
                    n: f[3].parse().unwrap(),
                    tensors: f[4].parse().unwrap(),
                    threads: f[5].parse().unwrap(),
                    ns_per_param: f[6].parse().unwrap(),
                });
            }
            Some(v)
        }
        Ok(out) => {
            println!(
                "!!!! SKIPPED: torch.optim comparison: {script} failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            None
        }
        Err(e) => {
            println!("!!!! SKIPPED: torch.optim comparison: cannot run /usr/bin/python3: {e}");
            None
        }
    }
}

fn size_name(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}Mi", n >> 20)
    } else if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn main() {
    let o = options();
    println!(
        "lra kernel-cost benchmark (CPU backend): ns per parameter, {} over repetitions; \
         {} logical CPUs",
        match o.stat {
            Stat::Min => "minimum",
            Stat::Median => "median",
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "clock: {}",
        match o.clock {
            Clock::Wall => "wall time",
            Clock::Cpu => "process CPU time / threads (--clock cpu)",
        }
    );
    println!(
        "copy = a plain copy of the fused step's bytes (memory bound); plain = same optimizer, \
         adaptation off; lra = lra_step+lra_report_reeval, guard off; lra+g = guard on"
    );
    println!(
        "thr = threads allowed; a step starts at most one per 256 Ki elements, and the copy \
         as many as the step"
    );
    if let Some(gap) = o.flat {
        println!(
            "flat: parameters and gradients in one allocation, the gradients {gap} bytes after the parameters' end"
        );
    }
    let mut rows = Vec::new();
    println!(
        "{:<9} {:<5} {:>6} {:>4} {:>3} | {:>7} {:>7} {:>7} {:>7} | {:>8} {:>9} {:>9}",
        "optimizer",
        "dtype",
        "n",
        "tens",
        "thr",
        "copy",
        "plain",
        "lra",
        "lra+g",
        "lra/copy",
        "lra/plain",
        "lra+g/pl"
    );
    for &threads in &o.threads {
        for &kind in &o.kinds {
            for &dtype in &o.dtypes {
                for &n in &o.sizes {
                    for &tensors in &o.layouts {
                        let r = measure(&o, kind, dtype, n, tensors, threads);
                        println!(
                            "{:<9} {:<5} {:>6} {:>4} {:>3} | {:>7.3} {:>7.3} {:>7.3} {:>7.3} | {:>8.2} {:>9.3} {:>9.3}",
                            kind.name(),
                            dtype.name(),
                            size_name(n),
                            tensors,
                            threads,
                            r.copy,
                            r.plain,
                            r.lra,
                            r.lra_guard,
                            r.lra / r.copy,
                            r.lra / r.plain,
                            r.lra_guard / r.plain
                        );
                        rows.push(r);
                    }
                }
            }
        }
    }
    if !o.torch {
        println!("torch.optim comparison not requested (--no-torch)");
        return;
    }
    let Some(torch) = torch_times(&o) else { return };
    println!();
    println!("against torch.optim (same sizes, torch.set_num_threads = threads; best of its single-tensor and foreach implementations)");
    println!(
        "{:<9} {:<5} {:>6} {:>4} {:>3} | {:>7} {:>7} {:>7} | {:>10} {:>12}",
        "optimizer",
        "dtype",
        "n",
        "tens",
        "thr",
        "torch",
        "lra",
        "lra+g",
        "torch/lra",
        "torch/lra+g"
    );
    for r in &rows {
        let Some(t) = torch.iter().find(|t| {
            t.optimizer == r.kind.name()
                && t.dtype == r.dtype.name()
                && t.n == r.n
                && t.tensors == r.tensors
                && t.threads == r.threads
        }) else {
            continue;
        };
        println!(
            "{:<9} {:<5} {:>6} {:>4} {:>3} | {:>7.3} {:>7.3} {:>7.3} | {:>10.2} {:>12.2}",
            r.kind.name(),
            r.dtype.name(),
            size_name(r.n),
            r.tensors,
            r.threads,
            t.ns_per_param,
            r.lra,
            r.lra_guard,
            t.ns_per_param / r.lra,
            t.ns_per_param / r.lra_guard
        );
    }
}
