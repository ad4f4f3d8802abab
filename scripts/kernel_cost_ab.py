#!/usr/bin/env python3
"""Compares the CPU step of two builds: `benches/kernel_cost.rs` of a base
commit against the working tree, in alternating runs.

kernel_cost measures its variants side by side within one build; a change
to the backend needs the same between builds. This builds the benchmark of
BASE (in a git worktree under target/ab/) and of the working tree, runs
them in turn N times (the order swapping every run, as machine noise
drifts), and prints per configuration the median ns per parameter of each
build and their ratio (new / base; below 1 is faster), for the plain
optimizer, lra (guard off) and lra+g (guard on), and how far each build's
runs spread ("noise": a ratio within it may be chance).

    python3 scripts/kernel_cost_ab.py BASE [--runs N] [-- KERNEL_COST_ARGS...]
    python3 scripts/kernel_cost_ab.py 5ed6709 --runs 3 -- --sizes 1M,16M --opt sgd,adam --dtype bf16 --no-torch
    python3 scripts/kernel_cost_ab.py --self-test   # the parser and the ratios on canned output

Timings are printed, never asserted. Each run's full output is kept in
target/ab/ (run-<k>-<build>.txt).
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AB_DIR = os.path.join(ROOT, "target", "ab")

# A result row of kernel_cost: optimizer dtype n tensors threads | copy plain lra lra+g | ...
ROW = re.compile(
    r"^(?P<opt>[a-z]+)\s+(?P<dtype>[a-z0-9]+)\s+(?P<n>\S+)\s+(?P<tensors>\d+)\s+(?P<threads>\d+)\s+\|"
    r"\s+(?P<copy>[\d.]+)\s+(?P<plain>[\d.]+)\s+(?P<lra>[\d.]+)\s+(?P<lrag>[\d.]+)\s+\|"
)
COLUMNS = ("plain", "lra", "lrag")


def parse(text):
    """{(opt, dtype, n, tensors, threads): {column: ns per parameter}}."""
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            key = (m["opt"], m["dtype"], m["n"], m["tensors"], m["threads"])
            rows[key] = {c: float(m[c]) for c in COLUMNS}
    return rows


def compare(base_runs, new_runs):
    """Table lines and a summary from lists of parsed runs of each build."""
    keys = [k for k in base_runs[0] if all(k in r for r in base_runs + new_runs)]
    missing = sorted({k for r in base_runs + new_runs for k in r} - set(keys))
    med = lambda runs, k, c: statistics.median(r[k][c] for r in runs)
    lines = [
        f"{'optimizer':9} {'dtype':5} {'n':>6} {'tens':>4} {'thr':>3} | "
        f"{'lra base':>8} {'lra new':>8} {'new/base':>8} | {'plain n/b':>9} {'lra+g n/b':>9} | {'noise':>5}",
    ]
    ratios = {c: [] for c in COLUMNS}
    # How far one build's runs of lra spread (slowest / fastest - 1, the
    # larger of the two builds'): a ratio inside it may be noise.
    spread = lambda runs, k: max(r[k]["lra"] for r in runs) / min(r[k]["lra"] for r in runs) - 1
    for k in keys:
        r = {c: med(new_runs, k, c) / med(base_runs, k, c) for c in COLUMNS}
        for c in COLUMNS:
            ratios[c].append(r[c])
        lines.append(
            f"{k[0]:9} {k[1]:5} {k[2]:>6} {k[3]:>4} {k[4]:>3} | "
            f"{med(base_runs, k, 'lra'):8.3f} {med(new_runs, k, 'lra'):8.3f} {r['lra']:8.3f} | "
            f"{r['plain']:9.3f} {r['lrag']:9.3f} | {max(spread(base_runs, k), spread(new_runs, k)):5.0%}"
        )
    summary = {
        c: (statistics.median(v), min(v), max(v)) for c, v in ratios.items() if v
    }
    return lines, summary, missing


def cargo_bench_binary(src, target_dir):
    """Builds kernel_cost in `src` and returns its executable's path."""
    env = dict(os.environ, CARGO_TARGET_DIR=target_dir)
    out = subprocess.run(
        ["cargo", "bench", "--bench", "kernel_cost", "--no-run", "--message-format=json"],
        cwd=src, env=env, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "kernel_cost" and msg.get("executable"):
            return msg["executable"]
    sys.exit("kernel_cost_ab: cargo built no kernel_cost executable")


def run_ab(base, runs, args):
    sha = subprocess.run(["git", "rev-parse", "--verify", base + "^{commit}"], cwd=ROOT,
                         check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    os.makedirs(AB_DIR, exist_ok=True)
    tree = os.path.join(AB_DIR, "base-" + sha[:12])
    if not os.path.isdir(tree):
        subprocess.run(["git", "worktree", "add", "--detach", "-q", tree, sha], cwd=ROOT, check=True)
    try:
        print(f"kernel_cost_ab: building base {sha[:12]} and the working tree", flush=True)
        bins = {
            "base": cargo_bench_binary(tree, os.path.join(AB_DIR, "target-base")),
            "new": cargo_bench_binary(ROOT, os.path.join(ROOT, "target")),
        }
        # (the working tree's binary is overwritten by the next build there)
        for which, path in list(bins.items()):
            kept = os.path.join(AB_DIR, f"kernel_cost-{which}")
            shutil.copy2(path, kept)
            bins[which] = kept
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT)
    parsed = {"base": [], "new": []}
    for k in range(runs):
        for which in (("base", "new") if k % 2 == 0 else ("new", "base")):
            print(f"kernel_cost_ab: run {k + 1} of {runs}: {which}", flush=True)
            text = subprocess.run([bins[which]] + args, cwd=ROOT, check=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
            with open(os.path.join(AB_DIR, f"run-{k + 1}-{which}.txt"), "w") as f:
                f.write(text)
            parsed[which].append(parse(text))
    if not parsed["base"][0]:
        sys.exit("kernel_cost_ab: no result rows in the base's output (see target/ab/run-1-base.txt)")
    report(parsed, f"base {sha[:12]}, new = working tree, {runs} runs each, medians", args)


def report(parsed, what, args):
    lines, summary, missing = compare(parsed["base"], parsed["new"])
    print(f"\nns per parameter of lra in each build and new / base, also of the plain optimizer and of lra+g"
          f" ({what}); kernel_cost {' '.join(args)}")
    print("\n".join(lines))
    names = {"plain": "plain", "lra": "lra", "lrag": "lra+g"}
    for c, (m, lo, hi) in summary.items():
        print(f"{names[c]:>5} new/base: median {m:.3f}, range {lo:.3f}-{hi:.3f} over {len(lines) - 1} configurations")
    if missing:
        print(f"!!!! configurations not in every run of both builds, left out: {missing}")


def self_test():
    def out(lra):
        return "\n".join([
            "optimizer dtype      n tens thr |    copy   plain     lra   lra+g | lra/copy lra/plain  lra+g/pl",
            f"sgd       bf16     1Mi    1   1 |   0.234   0.343   {lra:.3f}   0.567 |     1.81     1.241     1.654",
            "adam      f32     64Mi  200   2 |   0.780   0.707   0.704   0.923 |     0.90     0.996     1.306",
        ])
    base = [parse(out(0.400)), parse(out(0.500)), parse(out(0.450))]
    new = [parse(out(0.900)), parse(out(0.600)), parse(out(0.540))]
    assert set(base[0]) == {("sgd", "bf16", "1Mi", "1", "1"), ("adam", "f32", "64Mi", "200", "2")}, base[0]
    assert base[0][("sgd", "bf16", "1Mi", "1", "1")] == {"plain": 0.343, "lra": 0.400, "lrag": 0.567}
    lines, summary, missing = compare(base, new)
    # medians 0.450 and 0.600: 1.333; the other row is equal in both
    assert "   1.333 |" in lines[1] and lines[1].endswith(" 67%"), lines[1]
    assert abs(summary["lra"][2] - 0.6 / 0.45) < 1e-12 and summary["lra"][1] == 1.0, summary
    new[1].pop(("adam", "f32", "64Mi", "200", "2"))
    lines, summary, missing = compare(base, new)
    assert missing == [("adam", "f32", "64Mi", "200", "2")] and len(lines) == 2, (missing, lines)
    print("kernel_cost_ab: self-test passed (rows parsed, medians and ratios, a row missing from a run left out and named)")


def main(argv):
    if argv[:1] == ["--self-test"]:
        self_test()
        return 0
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    base, rest = argv[0], argv[1:]
    runs = 3
    if rest[:1] == ["--runs"]:
        runs, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    run_ab(base, runs, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
