#!/usr/bin/env bash
# Issue 6: smoke runs of the programs behind the README's numbers, at toy
# sizes, so that they keep working: the robustness sweep (tables, SVG) and
# the kernel-cost benchmark (with torch.optim when /usr/bin/python3 has
# torch; it prints a !!!! SKIPPED: line otherwise), and the parser of the
# two-build comparison (scripts/kernel_cost_ab.py). Timings are printed,
# never asserted.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "-- sweep (quick)"
cargo run --quiet --release --example sweep -- --quick --out "$out" 2>&1 | tee "$out/sweep.txt"
grep -q "spread across" "$out/sweep.txt"
grep -q "^<svg" "$out/sweep-digits.svg"
echo "-- kernel-cost benchmark (quick)"
cargo bench --quiet --bench kernel_cost -- --quick | tee "$out/bench.txt"
grep -Eq "^adam +f32 +1M " "$out/bench.txt"
grep -Eq "^adam +f16 +1M " "$out/bench.txt"
echo "-- kernel_cost_ab.py (the two-build comparison; its parser on canned output)"
python3 scripts/kernel_cost_ab.py --self-test
