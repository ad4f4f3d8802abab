#!/usr/bin/env bash
# GPU proof of the CUDA backend (issue 3), in two halves so the GPU machine
# needs no Rust toolchain:
#
#   bash scripts/gpu-check.sh --prepare   # here: builds, copies what the GPU
#                                         # run needs into target/gpu-check/
#   bash scripts/gpu-check.sh             # on the GPU machine (CUDA driver,
#                                         # python3 with torch): runs them
#
# `--prepare --baseline REV` also builds liblra.so of git revision REV (a
# worktree in target/gpu-check-baseline-src) into target/gpu-check/baseline/;
# the GPU run then times the fused step of both libraries side by side.
#
# The GPU run (a few minutes at most; the 256M benchmarks take seconds):
# 1. tests/cuda.rs (prebuilt): every kernel x optimizer x dtype x mode
#    against the CPU backend (elementwise bit for bit, phi within 1e-6
#    relative), phi bit-identical over repeated runs, skips, bad pointers;
# 2. scripts/gpu_check.py: lra on a PyTorch side stream with PyTorch tensors
#    (bit-identical to the host backend), then the benchmark table (fused
#    Adam vs a device-to-device copy of the same bytes and vs
#    torch.optim.Adam(fused=True), 1M/16M/256M parameters, 1 and 200 tensors);
# 3. with a baseline: the fused step of both libraries, guard off and on.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check

if [ "${1:-}" = "--prepare" ]; then
  baseline=
  if [ "${2:-}" = "--baseline" ]; then
    baseline=${3:?--baseline needs a git revision}
  fi
  cargo build --release --lib
  exe=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  [ -x "$exe" ] || { echo "could not find the tests/cuda.rs binary"; exit 1; }
  lib="${CARGO_TARGET_DIR:-target}/release/liblra.so"
  mkdir -p "$out"
  cp "$exe" "$out/cuda-tests"
  cp "$lib" "$out/liblra.so"
  # Line tables only matter here; keep what travels small.
  strip --strip-debug "$out/cuda-tests" "$out/liblra.so" 2>/dev/null || true
  rm -rf "$out/baseline"
  if [ -n "$baseline" ]; then
    src=target/gpu-check-baseline-src
    git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"
    git worktree add --detach "$src" "$baseline"
    (cd "$src" && CARGO_TARGET_DIR="$PWD/../gpu-check-baseline-target" cargo build --release --lib)
    mkdir -p "$out/baseline"
    cp target/gpu-check-baseline-target/release/liblra.so "$out/baseline/liblra.so"
    git -C "$src" log -1 --format='%h %s' >"$out/baseline/REVISION"
    git worktree remove --force "$src"
    strip --strip-debug "$out/baseline/liblra.so" 2>/dev/null || true
  fi
  ls -laR "$out"
  echo "now on the GPU machine (carry $out): bash scripts/gpu-check.sh"
  exit 0
fi

for f in cuda-tests liblra.so; do
  [ -e "$out/$f" ] || { echo "missing $out/$f: run 'bash scripts/gpu-check.sh --prepare' on a machine with Rust first"; exit 1; }
done
start=$(date +%s)
# Here a test that cannot find the GPU fails instead of skipping.
export LRA_REQUIRE_GPU=1
echo "==== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "==== tests/cuda.rs (kernels vs the CPU backend)"
"$out/cuda-tests" --test-threads=1

echo "==== PyTorch: stream, tensors, benchmarks"
py=
for cand in python3 /usr/bin/python3; do
  if "$cand" -c 'import torch' 2>/dev/null; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  echo "!!!! SKIPPED: gpu_check.py: no python3 with torch"
else
  base=()
  if [ -e "$out/baseline/liblra.so" ]; then
    echo "baseline library: $(cat "$out/baseline/REVISION" 2>/dev/null)"
    base=(--baseline-lib "$out/baseline/liblra.so")
  fi
  "$py" scripts/gpu_check.py --lib "$out/liblra.so" ${base[@]+"${base[@]}"}
fi
echo "==== gpu-check passed in $(( $(date +%s) - start )) s"
