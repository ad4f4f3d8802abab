//! The robustness figure (the shape of the paper's Figure 3, at CPU scale):
//! logistic regression and an MLP, trained through lra's C ABI with SGD,
//! Momentum, Adagrad, RMSprop and Adam from initial η = 1e-5 … 1, with η
//! fixed (the plain optimizer) and adapted (lra), over several seeds. Prints
//! the final training loss and accuracy per point and their spread across
//! the sweep, then what the re-evaluation schedules (every k-th step,
//! geometric) do to final accuracy and to the number of forward passes.
//! Writes `docs/sweep-<data>.svg` (and a PNG when `rsvg-convert` is
//! installed): per problem, one panel per optimizer and mode with the
//! training accuracy per epoch for every initial η, and the η trajectories.
//!
//! ```text
//! cargo run --release --example sweep                    # digits, a few minutes on 2 cores
//! cargo run --release --example sweep -- --data mnist    # MNIST test set (10k images), longer
//! cargo run --release --example sweep -- --help
//! ```

#[path = "common/mod.rs"]
mod common;

use common::{load_digits, load_mnist, train_observed, Dataset, Logistic, Lra, Mlp, Model};
use lra::ffi::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const OPTIMIZERS: [(&str, lra_optimizer); 5] = [
    ("SGD", LRA_OPTIMIZER_SGD),
    ("Momentum", LRA_OPTIMIZER_MOMENTUM),
    ("Adagrad", LRA_OPTIMIZER_ADAGRAD),
    ("RMSprop", LRA_OPTIMIZER_RMSPROP),
    ("Adam", LRA_OPTIMIZER_ADAM),
];

/// When the trainer re-evaluates (`None`: never, η fixed).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Schedule {
    Fixed,
    Always,
    Every(u32),
    Geometric(f64),
}

impl Schedule {
    fn name(self) -> String {
        match self {
            Schedule::Fixed => "fixed η".into(),
            Schedule::Always => "always".into(),
            Schedule::Every(k) => format!("every {k}"),
            Schedule::Geometric(r) => format!("geometric {r}"),
        }
    }
    fn configure(self, cfg: &mut lra_config) {
        match self {
            Schedule::Fixed | Schedule::Always => cfg.reeval_schedule = LRA_REEVAL_ALWAYS,
            Schedule::Every(k) => {
                cfg.reeval_schedule = LRA_REEVAL_EVERY;
                cfg.reeval_every = k;
            }
            Schedule::Geometric(r) => {
                cfg.reeval_schedule = LRA_REEVAL_GEOMETRIC;
                cfg.reeval_growth = r;
            }
        }
    }
}

struct Options {
    data: String,
    epochs: usize,
    batch: usize,
    seeds: u64,
    hidden: usize,
    threads: usize,
    lrs: Vec<f64>,
    out: PathBuf,
    schedules: bool,
    mnist_limit: usize,
}

fn options() -> Options {
    let mut o = Options {
        data: "digits".into(),
        epochs: 20,
        batch: 32,
        seeds: 3,
        hidden: 32,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        lrs: vec![1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("docs"),
        schedules: true,
        mnist_limit: 10_000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut val = || {
            i += 1;
            args.get(i).cloned().unwrap_or_else(|| {
                eprintln!("{a} needs a value");
                std::process::exit(2)
            })
        };
        let num = |s: String| -> f64 {
            s.parse().unwrap_or_else(|_| {
                eprintln!("{a}: not a number: {s}");
                std::process::exit(2)
            })
        };
        match a {
            "--data" => o.data = val(),
            "--epochs" => o.epochs = num(val()) as usize,
            "--batch" => o.batch = num(val()) as usize,
            "--seeds" => o.seeds = num(val()) as u64,
            "--hidden" => o.hidden = num(val()) as usize,
            "--threads" => o.threads = num(val()) as usize,
            "--mnist-limit" => o.mnist_limit = num(val()) as usize,
            "--lrs" => o.lrs = val().split(',').map(|s| num(s.to_string())).collect(),
            "--out" => o.out = PathBuf::from(val()),
            "--no-schedules" => o.schedules = false,
            "--quick" => {
                o.epochs = 4;
                o.seeds = 1;
                o.lrs = vec![1e-5, 1e-3, 1e-1];
                o.schedules = false;
            }
            "-h" | "--help" => {
                println!(
                    "usage: sweep [--data digits|mnist] [--epochs N (20)] [--batch B (32)] \
                     [--seeds S (3)] [--hidden H (32)] [--threads T (all cores)] \
                     [--lrs 1e-5,1e-4,...] [--mnist-limit N (10000)] [--out DIR (docs)] \
                     [--no-schedules] [--quick]"
                );
                std::process::exit(0);
            }
            _ => {
                eprintln!("unknown argument {a:?} (try --help)");
                std::process::exit(2);
            }
        }
        i += 1;
    }
    if o.epochs == 0 || o.batch == 0 || o.seeds == 0 || o.threads == 0 || o.lrs.is_empty() {
        eprintln!("--epochs, --batch, --seeds, --threads and --lrs must be positive / non-empty");
        std::process::exit(2);
    }
    o
}

fn load(o: &Options) -> Dataset {
    match o.data.as_str() {
        "digits" => load_digits(&common::digits_path()),
        "mnist" => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
            load_mnist(
                &dir.join("mnist-t10k-images-idx3-ubyte.gz"),
                &dir.join("mnist-t10k-labels-idx1-ubyte.gz"),
                o.mnist_limit,
            )
        }
        d => {
            eprintln!("--data {d}: digits or mnist");
            std::process::exit(2)
        }
    }
}

/// One training run to do.
#[derive(Clone, Copy)]
struct Job {
    problem: usize,
    optimizer: usize,
    lr: usize,
    schedule: Schedule,
    seed: u64,
}

/// What one run produced.
#[derive(Clone)]
struct Outcome {
    loss: f64,
    accuracy: f64,
    /// Training accuracy and η after each epoch.
    acc_trace: Vec<f64>,
    lr_trace: Vec<f64>,
    forward_passes: u64,
}

/// Runs `jobs` on `threads` workers, printing one progress line per run.
fn run_all(
    o: &Options,
    data: &Dataset,
    problems: &[(&str, Box<dyn Model + Sync>)],
    jobs: &[Job],
    what: &str,
) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; jobs.len()]);
    let start = Instant::now();
    let all: Vec<usize> = (0..data.n).collect();
    std::thread::scope(|s| {
        for _ in 0..o.threads.min(jobs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let (pname, model) = &problems[job.problem];
                let (oname, opt) = OPTIMIZERS[job.optimizer];
                let lr0 = o.lrs[job.lr];
                let mut cfg = Lra::config(opt, lr0);
                cfg.num_threads = 1; // the workers already use the cores
                job.schedule.configure(&mut cfg);
                let adapt = job.schedule != Schedule::Fixed;
                let t = Instant::now();
                let mut acc_trace = Vec::with_capacity(o.epochs);
                let r = train_observed(
                    model.as_ref(),
                    data,
                    &cfg,
                    adapt,
                    o.epochs,
                    o.batch,
                    job.seed,
                    &mut |_, p| acc_trace.push(model.accuracy(p, data, &all)),
                );
                let k = done.fetch_add(1, Ordering::Relaxed) + 1;
                eprintln!(
                    "[{what} {k:>3}/{}] {pname:<6} {oname:<8} η0={lr0:<6.0e} {:<13} seed {} → loss {:<9.4} acc {:5.1}% final η {:.2e}  ({:.1} s, {:.0} s elapsed)",
                    jobs.len(),
                    job.schedule.name(),
                    job.seed,
                    r.final_loss,
                    100.0 * r.accuracy,
                    r.final_lr,
                    t.elapsed().as_secs_f64(),
                    start.elapsed().as_secs_f64()
                );
                results.lock().unwrap()[i] = Some(Outcome {
                    loss: r.final_loss,
                    accuracy: r.accuracy,
                    acc_trace,
                    lr_trace: r.lr_trace,
                    forward_passes: r.forward_passes,
                });
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect()
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = v
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n as f64
}

/// A non-finite loss (diverged run) prints as "diverged" and counts as
/// +inf in the spread.
fn fmt_loss(l: f64) -> String {
    if l.is_finite() {
        format!("{l:.4}")
    } else {
        "diverged".into()
    }
}

fn main() {
    let o = options();
    let data = load(&o);
    let problems: Vec<(&str, Box<dyn Model + Sync>)> = vec![
        (
            "logreg",
            Box::new(Logistic {
                d: data.d,
                classes: data.classes,
            }),
        ),
        (
            "mlp",
            Box::new(Mlp {
                d: data.d,
                hidden: o.hidden,
                classes: data.classes,
            }),
        ),
    ];
    println!(
        "lra robustness sweep: {} ({} images, {} features); logreg and MLP (tanh, {} hidden); \
         {} epochs, batch {}, {} seed(s), {} worker thread(s)",
        o.data, data.n, data.d, o.hidden, o.epochs, o.batch, o.seeds, o.threads
    );
    let t0 = Instant::now();

    // ---- the sweep: fixed vs adapted (re-evaluating every step) ----
    let modes = [Schedule::Fixed, Schedule::Always];
    let mut jobs = Vec::new();
    for problem in 0..problems.len() {
        for optimizer in 0..OPTIMIZERS.len() {
            for lr in 0..o.lrs.len() {
                for &schedule in &modes {
                    for seed in 0..o.seeds {
                        jobs.push(Job {
                            problem,
                            optimizer,
                            lr,
                            schedule,
                            seed,
                        });
                    }
                }
            }
        }
    }
    let results = run_all(&o, &data, &problems, &jobs, "sweep");
    // Seed means per (problem, optimizer, lr, mode).
    let point = |p: usize, opt: usize, lr: usize, mode: Schedule| -> Vec<&Outcome> {
        jobs.iter()
            .zip(&results)
            .filter(|(j, _)| {
                j.problem == p && j.optimizer == opt && j.lr == lr && j.schedule == mode
            })
            .map(|(_, r)| r)
            .collect()
    };

    let mut report = String::new();
    for (p, (pname, _)) in problems.iter().enumerate() {
        writeln!(
            report,
            "\n{pname} on {}: final training loss and accuracy, mean over {} seed(s)",
            o.data, o.seeds
        )
        .unwrap();
        writeln!(
            report,
            "| optimizer | η0 | fixed: loss | fixed: acc | lra: loss | lra: acc | lra: final η |\n|---|---|---|---|---|---|---|"
        )
        .unwrap();
        for (opt, (oname, _)) in OPTIMIZERS.iter().enumerate() {
            for (li, lr0) in o.lrs.iter().enumerate() {
                let f = point(p, opt, li, Schedule::Fixed);
                let a = point(p, opt, li, Schedule::Always);
                let final_lr = mean(a.iter().map(|r| r.lr_trace.last().unwrap().ln())).exp();
                writeln!(
                    report,
                    "| {oname} | {lr0:.0e} | {} | {:.1}% | {} | {:.1}% | {final_lr:.2e} |",
                    fmt_loss(mean(f.iter().map(|r| r.loss))),
                    100.0 * mean(f.iter().map(|r| r.accuracy)),
                    fmt_loss(mean(a.iter().map(|r| r.loss))),
                    100.0 * mean(a.iter().map(|r| r.accuracy)),
                )
                .unwrap();
            }
        }
        writeln!(
            report,
            "\n{pname}: spread across the {} initial η (seed means): accuracy worst … best, and loss worst … best",
            o.lrs.len()
        )
        .unwrap();
        writeln!(
            report,
            "| optimizer | fixed: acc range | fixed: loss range | lra: acc range | lra: loss range |\n|---|---|---|---|---|"
        )
        .unwrap();
        for (opt, (oname, _)) in OPTIMIZERS.iter().enumerate() {
            let spread = |mode| {
                let accs: Vec<f64> = (0..o.lrs.len())
                    .map(|li| mean(point(p, opt, li, mode).iter().map(|r| r.accuracy)))
                    .collect();
                let losses: Vec<f64> = (0..o.lrs.len())
                    .map(|li| {
                        let l = mean(point(p, opt, li, mode).iter().map(|r| r.loss));
                        if l.is_finite() {
                            l
                        } else {
                            f64::INFINITY
                        }
                    })
                    .collect();
                let lo = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = |v: &[f64]| v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                format!(
                    "{:.1}% … {:.1}% | {} … {}",
                    100.0 * lo(&accs),
                    100.0 * hi(&accs),
                    fmt_loss(hi(&losses)),
                    fmt_loss(lo(&losses))
                )
            };
            writeln!(
                report,
                "| {oname} | {} | {} |",
                spread(Schedule::Fixed),
                spread(Schedule::Always)
            )
            .unwrap();
        }
    }
    print!("{report}");

    std::fs::create_dir_all(&o.out).expect("cannot create the output directory");
    let svg_path = o.out.join(format!("sweep-{}.svg", o.data));
    let svg = figure(&o, &problems, &|p, opt, li, mode| point(p, opt, li, mode));
    std::fs::write(&svg_path, svg).expect("cannot write the SVG");
    println!("\nwrote {}", svg_path.display());
    to_png(&svg_path);

    // ---- re-evaluation schedules ----
    if o.schedules {
        schedules(&o, &data, &problems);
    }
    println!("\ntotal {:.0} s", t0.elapsed().as_secs_f64());
}

/// What every-k and geometric re-evaluation do to final accuracy and to
/// the number of forward passes (MLP; SGD and Adam; a small, a middle and
/// a large initial η).
fn schedules(o: &Options, data: &Dataset, problems: &[(&str, Box<dyn Model + Sync>)]) {
    let schedules = [
        Schedule::Fixed,
        Schedule::Always,
        Schedule::Every(2),
        Schedule::Every(4),
        Schedule::Every(10),
        Schedule::Geometric(1.001),
        Schedule::Geometric(1.01),
        Schedule::Geometric(1.1),
    ];
    let optimizers = [0usize, 4]; // SGD, Adam
    let lr_points: Vec<usize> = [1e-4, 1e-2, 1.0]
        .iter()
        .filter_map(|x| o.lrs.iter().position(|y| y == x))
        .collect();
    let problem = 1; // the MLP
    let mut jobs = Vec::new();
    for &schedule in &schedules {
        for &optimizer in &optimizers {
            for &lr in &lr_points {
                for seed in 0..o.seeds {
                    jobs.push(Job {
                        problem,
                        optimizer,
                        lr,
                        schedule,
                        seed,
                    });
                }
            }
        }
    }
    if lr_points.is_empty() {
        println!("\n(re-evaluation schedules skipped: --lrs holds none of 1e-4, 1e-2, 1)");
        return;
    }
    let results = run_all(o, data, problems, &jobs, "schedules");
    let steps_per_epoch = data.n.div_ceil(o.batch) as u64;
    let grad_passes = steps_per_epoch * o.epochs as u64;
    println!(
        "\nre-evaluation schedules: {} on {}, SGD and Adam, η0 ∈ {{{}}}, {} seed(s); \
         {} steps per run (one forward+backward each); the last column is the \
         whole training cost in forward passes relative to re-evaluating every step \
         (a backward pass counted as two forward passes)",
        problems[problem].0,
        o.data,
        lr_points
            .iter()
            .map(|&i| format!("{:.0e}", o.lrs[i]))
            .collect::<Vec<_>>()
            .join(", "),
        o.seeds,
        grad_passes
    );
    println!(
        "| schedule | SGD acc (per η0) | Adam acc (per η0) | mean acc | re-evaluations per run | forward passes per run | cost vs always |\n|---|---|---|---|---|---|---|"
    );
    let cost = |fwd: f64| fwd + 2.0 * grad_passes as f64;
    let always_fwd = 2.0 * grad_passes as f64;
    for &schedule in &schedules {
        let pick = |opt: usize, lr: usize| -> Vec<&Outcome> {
            jobs.iter()
                .zip(&results)
                .filter(|(j, _)| j.schedule == schedule && j.optimizer == opt && j.lr == lr)
                .map(|(_, r)| r)
                .collect()
        };
        let per = |opt: usize| {
            lr_points
                .iter()
                .map(|&li| {
                    format!(
                        "{:.1}",
                        100.0 * mean(pick(opt, li).iter().map(|r| r.accuracy))
                    )
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let mine: Vec<&Outcome> = jobs
            .iter()
            .zip(&results)
            .filter(|(j, _)| j.schedule == schedule)
            .map(|(_, r)| r)
            .collect();
        let fwd = mean(mine.iter().map(|r| r.forward_passes as f64));
        println!(
            "| {} | {} | {} | {:.1}% | {:.0} | {:.0} | {:.2} |",
            schedule.name(),
            per(0),
            per(4),
            100.0 * mean(mine.iter().map(|r| r.accuracy)),
            fwd - grad_passes as f64,
            fwd,
            cost(fwd) / cost(always_fwd)
        );
    }
}

// ------------------------------------------------------------- figure ----

/// Colour of initial η number `i` of `n`: dark blue (smallest) to yellow
/// (largest), a viridis-like ramp.
fn colour(i: usize, n: usize) -> String {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if n <= 1 {
        0.0
    } else {
        i as f64 / (n - 1) as f64
    } * (STOPS.len() - 1) as f64;
    let k = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - k as f64;
    let (a, b) = (STOPS[k], STOPS[k + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(a.0, b.0),
        mix(a.1, b.1),
        mix(a.2, b.2)
    )
}

/// A panel: a frame at (x, y) of size (w, h) with axes mapping data to it.
struct Panel {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    /// x range (epochs) and y range (linear, or log10 when `log`).
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    log: bool,
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        self.x + (x - self.x0) / (self.x1 - self.x0) * self.w
    }
    fn py(&self, y: f64) -> f64 {
        let y = if self.log { y.log10() } else { y };
        let y = y.clamp(self.y0, self.y1);
        self.y + self.h - (y - self.y0) / (self.y1 - self.y0) * self.h
    }
    fn frame(&self, svg: &mut String, title: &str, thick: bool, yticks: &[(f64, &str)]) {
        writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="white" stroke="{}" stroke-width="{}"/>"##,
            self.x,
            self.y,
            self.w,
            self.h,
            if thick { "black" } else { "#999" },
            if thick { 2 } else { 1 }
        )
        .unwrap();
        writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{title}</text>"#,
            self.x + self.w / 2.0,
            self.y - 4.0
        )
        .unwrap();
        for &(v, label) in yticks {
            let yy = self.py(v);
            writeln!(
                svg,
                r##"<line x1="{:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="end">{label}</text>"##,
                self.x,
                self.x + self.w,
                self.x - 3.0,
                yy + 3.0
            )
            .unwrap();
        }
    }
    /// `ys[i]` at x = x0 + i.
    fn curve(&self, svg: &mut String, ys: &[f64], colour: &str) {
        let pts: Vec<String> = ys
            .iter()
            .enumerate()
            .filter(|(_, y)| y.is_finite())
            .map(|(i, &y)| format!("{:.1},{:.1}", self.px(self.x0 + i as f64), self.py(y)))
            .collect();
        if !pts.is_empty() {
            writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
                pts.join(" ")
            )
            .unwrap();
        }
    }
}

type PointFn<'a> = dyn Fn(usize, usize, usize, Schedule) -> Vec<&'a Outcome> + 'a;

/// The SVG: per problem, a row of accuracy panels (per optimizer: fixed η
/// with a thin grey frame, lra with a thick black one, as in the paper) and
/// a row of η trajectories of the lra runs (log scale).
fn figure(o: &Options, problems: &[(&str, Box<dyn Model + Sync>)], point: &PointFn<'_>) -> String {
    let (pw, ph, gap, left, top) = (120.0, 90.0, 14.0, 50.0, 60.0);
    let row_h = ph + 40.0;
    let width = left + OPTIMIZERS.len() as f64 * (2.0 * pw + gap + 22.0) + 20.0;
    let height = top + problems.len() as f64 * 2.0 * row_h + 40.0;
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif">"#
    )
    .unwrap();
    writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#).unwrap();
    writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="14">Training accuracy per epoch, {} ({} seed mean): fixed η (thin frame) vs lra (thick frame); η of the lra runs below</text>"#,
        o.data, o.seeds
    )
    .unwrap();
    // Legend: initial η colours.
    for (i, lr) in o.lrs.iter().enumerate() {
        let x = left + i as f64 * 70.0;
        writeln!(
            svg,
            r#"<line x1="{x}" y1="36" x2="{:.0}" y2="36" stroke="{}" stroke-width="3"/><text x="{:.0}" y="40" font-size="10">η0={lr:.0e}</text>"#,
            x + 18.0,
            colour(i, o.lrs.len()),
            x + 22.0
        )
        .unwrap();
    }
    let epochs = o.epochs as f64;
    // Range of η for the trajectory panels: all lra runs.
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in 0..problems.len() {
        for opt in 0..OPTIMIZERS.len() {
            for li in 0..o.lrs.len() {
                for r in point(p, opt, li, Schedule::Always) {
                    for &v in &r.lr_trace {
                        lo = lo.min(v.log10());
                        hi = hi.max(v.log10());
                    }
                }
            }
        }
    }
    let (lo, hi) = (lo.floor().min(-5.0), hi.ceil().max(0.0));
    for (p, (pname, _)) in problems.iter().enumerate() {
        let y_acc = top + 2.0 * p as f64 * row_h + 20.0;
        let y_lr = y_acc + row_h;
        writeln!(
            svg,
            r#"<text x="12" y="{:.0}" font-size="12" transform="rotate(-90 12 {:.0})" text-anchor="middle">{pname}</text>"#,
            y_acc + row_h / 2.0,
            y_acc + row_h / 2.0
        )
        .unwrap();
        for (opt, (oname, _)) in OPTIMIZERS.iter().enumerate() {
            let x0 = left + opt as f64 * (2.0 * pw + gap + 22.0);
            for (k, mode) in [Schedule::Fixed, Schedule::Always].into_iter().enumerate() {
                let panel = Panel {
                    x: x0 + k as f64 * (pw + gap),
                    y: y_acc,
                    w: pw,
                    h: ph,
                    x0: 1.0,
                    x1: epochs.max(2.0),
                    y0: 0.0,
                    y1: 1.0,
                    log: false,
                };
                let title = format!("{oname}, {}", if k == 0 { "fixed" } else { "lra" });
                let ticks: &[(f64, &str)] = if k == 0 {
                    &[(0.0, "0"), (0.5, "0.5"), (1.0, "1")]
                } else {
                    &[(0.0, ""), (0.5, ""), (1.0, "")]
                };
                panel.frame(&mut svg, &title, k == 1, ticks);
                for li in 0..o.lrs.len() {
                    let runs = point(p, opt, li, mode);
                    let ys: Vec<f64> = (0..o.epochs)
                        .map(|e| mean(runs.iter().map(|r| r.acc_trace[e])))
                        .collect();
                    panel.curve(&mut svg, &ys, &colour(li, o.lrs.len()));
                }
            }
            let panel = Panel {
                x: x0,
                y: y_lr,
                w: 2.0 * pw + gap,
                h: ph,
                x0: 0.0,
                x1: epochs.max(2.0),
                y0: lo,
                y1: hi,
                log: true,
            };
            let labels: Vec<(f64, String)> = (lo as i32..=hi as i32)
                .step_by(2)
                .map(|e| (10f64.powi(e), format!("1e{e}")))
                .collect();
            let ticks: Vec<(f64, &str)> = labels.iter().map(|(v, s)| (*v, s.as_str())).collect();
            panel.frame(
                &mut svg,
                &format!("{oname}: lra η per epoch"),
                false,
                &ticks,
            );
            for li in 0..o.lrs.len() {
                // From η0 at epoch 0 (geometric mean over seeds).
                let runs = point(p, opt, li, Schedule::Always);
                let ys: Vec<f64> = std::iter::once(o.lrs[li])
                    .chain(
                        (0..o.epochs).map(|e| mean(runs.iter().map(|r| r.lr_trace[e].ln())).exp()),
                    )
                    .collect();
                panel.curve(&mut svg, &ys, &colour(li, o.lrs.len()));
            }
        }
    }
    writeln!(
        svg,
        r#"<text x="{left}" y="{:.0}" font-size="10">x: epoch (accuracy from 1, η from 0)…{}; written by cargo run --release --example sweep -- --data {}</text>"#,
        height - 12.0,
        o.epochs,
        o.data
    )
    .unwrap();
    svg.push_str("</svg>\n");
    svg
}

/// A PNG beside the SVG when `rsvg-convert` (Debian's librsvg2-bin) is
/// installed; otherwise says so.
fn to_png(svg: &Path) {
    let png = svg.with_extension("png");
    match std::process::Command::new("rsvg-convert")
        .args(["--zoom", "1.5", "--output"])
        .arg(&png)
        .arg(svg)
        .output()
    {
        Ok(out) if out.status.success() => println!("wrote {}", png.display()),
        Ok(out) => println!(
            "(no PNG: rsvg-convert failed: {})",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ),
        Err(_) => println!("(no PNG: rsvg-convert is not installed; apt-get install librsvg2-bin)"),
    }
}
