//! The README's main job: multinomial logistic regression on the digits set
//! (bundled in data/), trained through lra's C ABI from initial η in
//! {1e-5, ..., 1}, with η fixed (the plain optimizer) and adapted (lra).
//!
//! Run: cargo run --release --example demo [-- --epochs N]

#[path = "common/mod.rs"]
mod common;

use common::{load_digits, train, Logistic, Lra};
use lra::ffi::{LRA_OPTIMIZER_ADAM, LRA_OPTIMIZER_MOMENTUM, LRA_OPTIMIZER_SGD};

fn main() {
    let mut epochs = 10usize;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        // `--epochs N` or `--epochs=N`.
        let (flag, inline) = match args[i].split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (args[i].as_str(), None),
        };
        match flag {
            "--epochs" => {
                let value = inline.or_else(|| {
                    i += 1;
                    args.get(i).map(String::as_str)
                });
                epochs = value
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &usize| n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("--epochs needs a positive integer");
                        std::process::exit(2)
                    });
            }
            "-h" | "--help" => {
                println!("usage: demo [--epochs N]   (default 10)");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?} (try --help)");
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let data = load_digits(&common::digits_path());
    let model = Logistic {
        d: data.d,
        classes: data.classes,
    };
    println!(
        "lra demo: logistic regression on digits ({} images, {} features, {} params), {epochs} epochs, batch 64",
        data.n,
        data.d,
        data.d * data.classes + data.classes
    );
    println!(
        "{:<9} {:>8} | {:>10} {:>7} {:>10} | {:>10} {:>7} {:>10}",
        "optimizer", "eta0", "fixed loss", "acc", "eta", "lra loss", "acc", "final eta"
    );
    let start = std::time::Instant::now();
    for (name, opt) in [
        ("sgd", LRA_OPTIMIZER_SGD),
        ("momentum", LRA_OPTIMIZER_MOMENTUM),
        ("adam", LRA_OPTIMIZER_ADAM),
    ] {
        for lr0 in [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0] {
            let cfg = Lra::config(opt, lr0);
            let fixed = train(&model, &data, &cfg, false, epochs, 64, 1);
            let adapted = train(&model, &data, &cfg, true, epochs, 64, 1);
            println!(
                "{:<9} {:>8.0e} | {:>10.4} {:>6.1}% {:>10.2e} | {:>10.4} {:>6.1}% {:>10.2e}",
                name,
                lr0,
                fixed.final_loss,
                100.0 * fixed.accuracy,
                fixed.final_lr,
                adapted.final_loss,
                100.0 * adapted.accuracy,
                adapted.final_lr
            );
        }
    }
    println!(
        "({:.1} s; loss = mean training cross-entropy, acc = training accuracy)",
        start.elapsed().as_secs_f64()
    );
}
