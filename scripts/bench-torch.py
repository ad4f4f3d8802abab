#!/usr/bin/env python3
"""torch.optim side of lra's kernel-cost benchmark (benches/kernel_cost.rs).

Times one optimizer step of torch.optim on CPU for the same optimizers,
dtypes, sizes, tensor layouts and thread counts as the Rust benchmark and
prints one line per configuration:

    torch <optimizer> <dtype> <numel> <tensors> <threads> <ns per parameter>

the minimum (or, with --stat median, the median) over repetitions of the
faster of torch's single-tensor
(foreach=False) and multi-tensor (foreach=True) implementations. Hyper-
parameters match lra's defaults (Momentum beta 0.5, Adam beta1 0.5). Note
that torch keeps optimizer state in the parameter dtype (bf16 state for
bf16 parameters) where lra keeps f32 state. Run with Debian's
/usr/bin/python3 (the one with torch).
"""
import argparse
import time

import torch


def spans(n, tensors):
    """Same split as the Rust benchmark: weights 1, 2, 3, 1, 2, 3, ..."""
    tensors = max(1, min(tensors, n))
    w = [1 + i % 3 for i in range(tensors)]
    total = sum(w)
    out, off = [], 0
    for i, wi in enumerate(w):
        ln = n - off if i + 1 == tensors else max(1, n * wi // total)
        out.append(ln)
        off += ln
    return out


def make(kind, params, foreach):
    lr = 1e-4
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=foreach)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.5, foreach=foreach)
    if kind == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.5, nesterov=True, foreach=foreach)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, foreach=foreach)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, foreach=foreach)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), foreach=foreach)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.5, 0.999), foreach=foreach)
    raise SystemExit(f"unknown optimizer {kind}")


def time_step(opt, budget, reps, clock, threads, stat):
    """Minimum (stat "min") or median (of an even count, the slower middle
    one, as on the Rust side) seconds per step; clock "cpu" =
    process CPU time / threads (what the Rust side's --clock cpu
    measures)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    scale = 1.0 if clock == "wall" else 1.0 / threads
    opt.step()  # warm-up: allocates the state
    times = []
    start = time.perf_counter()
    while len(times) < max(reps, 1) or time.perf_counter() - start < budget:
        t = now()
        opt.step()
        times.append((now() - t) * scale)
        if len(times) >= 1000:
            break
    times.sort()
    return times[0] if stat == "min" else times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--opt", default="sgd,momentum,adagrad,rmsprop,adam")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--tensors", default="1,200")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--stat", choices=("min", "median"), default="min")
    a = ap.parse_args()
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    torch.manual_seed(0)
    for threads in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for kind in a.opt.split(","):
            for dname in a.dtype.split(","):
                for n in [int(x) for x in a.sizes.split(",")]:
                    for tensors in [int(x) for x in a.tensors.split(",")]:
                        params = []
                        for ln in spans(n, tensors):
                            p = torch.empty(ln, dtype=dtypes[dname]).uniform_(-1, 1)
                            p.grad = torch.empty(ln, dtype=dtypes[dname]).uniform_(-0.01, 0.01)
                            params.append(p)
                        best = float("inf")
                        for foreach in (False, True):
                            try:
                                opt = make(kind, params, foreach)
                                best = min(best, time_step(opt, a.budget, a.reps, a.clock, threads, a.stat))
                            except (RuntimeError, TypeError) as e:
                                print(f"# {kind} {dname} foreach={foreach}: {e}", flush=True)
                            del opt
                        if best < float("inf"):
                            print(f"torch {kind} {dname} {n} {tensors} {threads} {best * 1e9 / n:.4f}", flush=True)
                        del params


if __name__ == "__main__":
    main()
