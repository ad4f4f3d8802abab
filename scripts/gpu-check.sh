#!/usr/bin/env bash
# GPU proof of the CUDA backend (issue 3) and of the NCCL adapter, in two
# halves so the GPU machine needs no Rust toolchain:
#
#   bash scripts/gpu-check.sh --prepare   # here: builds, copies what the GPU
#                                         # run needs into target/gpu-check/
#   bash scripts/gpu-check.sh             # on the GPU machine (CUDA driver,
#                                         # python3 with torch): runs them
#
# `--prepare --baseline REV` also builds liblra.so of git revision REV (a
# worktree in target/gpu-check-baseline-src) into target/gpu-check/baseline/
# and dry-runs the A/B with it on the CPU (scripts/gpu_check_dryrun.py);
# the GPU run then times the fused step of both libraries side by side.
# `--prepare` records the sources' checksums (INPUTS.sha256); the GPU run
# warns loudly, in its summary too, when the tree beside it differs, and
# `bash scripts/gpu-check.sh --check-bundle` asks the same here.
# `--prepare` also builds tests/nccl/lra_nccl_gpu_test.c into
# target/gpu-check/nccl/ when the PyPI NCCL/CUDA runtime wheels are installed
# here (scripts/find-nccl.sh; scripts/stages/nccl.sh installs them), linked
# by soname, with this machine's libcudart.so.12 beside it (0.7 MB) as a
# fallback; libnccl.so.2 (470 MB) does not travel.
#
# The GPU run (a few minutes at most; the 256M benchmarks take seconds):
# 1. tests/cuda.rs (prebuilt): every kernel x optimizer x dtype x mode
#    against the CPU backend (elementwise bit for bit, phi within 1e-6
#    relative), phi bit-identical over repeated runs, skips, bad pointers,
#    seeded random step sequences, device memory refused by host handles;
# 2. scripts/gpu_check.py: lra on a PyTorch side stream with PyTorch tensors
#    (bit-identical to the host backend), then the benchmark table (fused
#    Adam vs a device-to-device copy of the same bytes and vs
#    torch.optim.Adam(fused=True), 1M/16M/256M parameters, 1 and 200 tensors);
# 3. with a baseline: the fused step of both libraries, guard off and on;
# 4. the NCCL adapter (bindings/nccl/lra_nccl.h) on a one-rank communicator
#    of device 0 (tests/nccl/lra_nccl_gpu_test.c: exact sums on the legacy
#    and a created stream, host and CUDA handles identical to runs without
#    NCCL, a non-blocking communicator, a stream held past `timeout_s` ->
#    LRA_NCCL_ERR_TIMEOUT, ncclCommAbort -> LRA_REDUCTION_FAILED)
#    against this machine's own libnccl.so.2 (python3's nvidia.* packages,
#    torch/lib, ldconfig, /usr/local/cuda*), under a 60 s timeout; the
#    summary says PASS, FAIL, SKIPPED (no libnccl.so.2 here, or no test
#    binary) or STOPPED (the run's time budget ran out).
# 5. lra_torch.hpp's CUDA path (bindings/cpp/tests/test_lra_torch.cpp with
#    LRA_TORCH_CUDA), compiled here against python3's torch (LibTorch with
#    libtorch_cuda; a C++ compiler needed) by scripts/torch-cuda-adapter.sh
#    --python, and run: CUDA parameters of 7 optimizers x 3 dtypes stepped
#    on a pool stream bit for bit as on the host, without waiting for the
#    device, found_inf, checkpoints across devices. CUDA 13 torch wheels
#    may lack crt/host_defines.h: --prepare brings a copy (cuda-crt/).
# 6. compute-sanitizer, when the machine has one (PATH, /usr/local/cuda*):
#    memcheck over every test of step 1 (failed driver calls not counted:
#    the tests check those), racecheck and synccheck over the
#    kernel-vs-CPU test. Their logs go to $LRA_GPU_CHECK_LOGS (default
#    $out/logs); the output shows each one's error summary. A sanitizer that
#    refuses the device (it does under gVisor: "Device not supported") is
#    listed as skipped, not failed.
# Steps 1 and 2 run under 300 s limits each, the sanitizer steps under 240 s
# (memcheck) and 120 s, and the whole run within LRA_GPU_CHECK_BUDGET
# seconds (default 500, so that a run fits a 10-minute slot), or
# LRA_GPU_CHECK_LIMIT - 60 if that is less: a step that would start with
# less than 20 s left is skipped, one the budget cuts short is listed as
# stopped. No step's failure or hang stops the next; the summary
# ($LRA_GPU_CHECK_LOGS/summary.txt, written as each step ends) names the
# bundle's revision and lists how each step ended. The verdict is FAILED
# for a failure or a hang, INCOMPLETE when the budget skipped or stopped a
# step, and either, or a stale bundle, makes the exit status 1.
#
# On a lent GPU machine (the device tool), make this the session's first
# device call, so that no earlier call has used the device time that its
# limit comes out of. The bundle must be prepared in the checkout the tool
# sends (the session's own, not a helper's copy), with no edit since
# (`--check-bundle` says). Then `run` with timeout_s 600, carry
# ["target/gpu-check"] and the command
#   set -o pipefail; LRA_GPU_CHECK_LOGS=$OUT bash scripts/gpu-check.sh 2>&1 | tee $OUT/gpu-check.log
# Where status shows less than about 12 minutes of device time left (a
# start takes 1-2), prefix LRA_GPU_CHECK_LIMIT=<seconds the command will
# get> so the budget ends before the tool kills the run.
#
# `bash scripts/gpu-check.sh --nccl` runs step 4 alone; it keeps the
# caller's LRA_REQUIRE_GPU (unset: a machine without a device skips, which is
# how scripts/stages/nccl.sh dry-runs it). `--prepare-nccl` builds only its
# binary, next to an existing liblra.so. LRA_GPU_CHECK_DIR replaces
# target/gpu-check.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${LRA_GPU_CHECK_DIR:-target/gpu-check}

# Builds tests/nccl/lra_nccl_gpu_test.c into $out/nccl/ against the real
# NCCL and CUDA runtime headers of the PyPI wheels and $out/liblra.so, linked
# by soname (NEEDED libnccl.so.2, libcudart.so.12, liblra.so.0.1) without an
# rpath: the GPU half supplies the libraries through LD_LIBRARY_PATH. Returns
# 2 when the wheels are not installed here, 1 when the build fails.
prepare_nccl() {
  local dirs nccl cudart cccl nvcc
  rm -rf "$out/nccl"
  dirs=$(bash scripts/find-nccl.sh) || return 2
  { read -r nccl; read -r cudart; read -r cccl; read -r nvcc; } <<< "$dirs"
  mkdir -p "$out/nccl"
  cc -std=c11 -Wall -Wextra -Werror -I include -I bindings/nccl -I tests/nccl \
    -I "$nccl/include" -I "$cudart/include" -I "$cccl/include" -I "$nvcc/include" \
    tests/nccl/lra_nccl_gpu_test.c \
    -L "$nccl/lib" -l:libnccl.so.2 -L "$cudart/lib" -l:libcudart.so.12 -L "$out" -l:liblra.so \
    -o "$out/nccl/lra_nccl_gpu_test" || return 1
  cp "$cudart/lib/libcudart.so.12" "$out/nccl/libcudart.so.12"
}

# The files the bundle is built from (liblra.so, the tests/cuda.rs binary,
# the NCCL test), tracked or not yet tracked.
bundle_inputs() {
  local f
  git ls-files -z --cached --others --exclude-standard -- Cargo.toml Cargo.lock build.rs \
    src kernels include ptx-interp tests/cuda.rs tests/support tests/nccl bindings/nccl \
    | while IFS= read -r -d '' f; do
        if [ -e "$f" ]; then printf '%s\0' "$f"; fi # tracked but deleted: not an input
      done
}

# Checks the tree against the checksums --prepare wrote (the GPU machine has
# the tree but no git). Succeeds when every input is as the bundle was built
# from; else prints why (at most 20 lines) and fails.
bundle_matches_tree() {
  local diff
  [ -e "$out/INPUTS.sha256" ] || { echo "no $out/INPUTS.sha256 (no bundle there, or one prepared before this check)"; return 1; }
  command -v sha256sum >/dev/null 2>&1 || { echo "no sha256sum on this machine: cannot tell"; return 1; }
  diff=$(sha256sum --quiet -c "$out/INPUTS.sha256" 2>&1) && return 0
  printf '%s\n' "$diff" | head -n 20
  return 1
}

# Directories that may hold a CUDA library on this machine, most specific
# first: the lib/ of every package in python3's `nvidia` namespace (the
# nvidia-nccl-cu12/-cu13 and CUDA runtime wheels PyTorch depends on), torch's
# own lib/, what ldconfig knows, the CUDA toolkit's.
library_dirs() {
  local py
  for py in python3 /usr/bin/python3; do
    "$py" - 2>/dev/null <<'EOF' || true
import glob, importlib.util, os
dirs = []
try:
    import nvidia
    for p in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(p, "*", "lib")))
except ImportError:
    pass
spec = importlib.util.find_spec("torch")  # found, not imported (slow)
for p in (spec.submodule_search_locations or []) if spec else []:
    dirs.append(os.path.join(p, "lib"))
print("\n".join(dirs))
EOF
  done
  ldconfig -p 2>/dev/null \
    | awk '$1 ~ /^lib(nccl|cudart)\.so/ { sub(/\/[^\/]*$/, "", $NF); print $NF }'
  printf '%s\n' /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/lib/x86_64-linux-gnu
}

# The first directory of library_dirs holding the file $1.
find_library() {
  local dir
  while read -r dir; do
    [ -e "$dir/$1" ] && { echo "$dir"; return 0; }
  done < <(library_dirs)
  return 1
}

# Step 4 (run_nccl [SECONDS [shortened]], default 60 s): sets nccl_result to
# "PASS ...", "FAIL: ...", "SKIPPED: ..." or, when the run's time budget
# (shortened) cut it, "STOPPED: ...".
nccl_result=
run_nccl() {
  local dir test nccl_dir cudart_dir links rc=0 limit=${1:-60} shortened=${2:-}
  dir=$(cd "$out" && pwd)
  test="$dir/nccl/lra_nccl_gpu_test"
  if [ ! -x "$test" ]; then
    nccl_result="SKIPPED: $test was not built (see the output of --prepare)"
    return
  fi
  if ! nccl_dir=$(find_library libnccl.so.2); then
    nccl_result="SKIPPED: no libnccl.so.2 on this machine (searched:"
    nccl_result+=" $(library_dirs | sort -u | paste -sd' '))"
    return
  fi
  if ! cudart_dir=$(find_library libcudart.so.12); then
    cudart_dir="$dir/nccl" # the copy --prepare brought along
  fi
  echo "libnccl.so.2 from $nccl_dir; libcudart.so.12 from $cudart_dir"
  [ -z "${LRA_NCCL_GPU_TEST_HOST_ONLY+set}" ] || echo "!!!! LRA_NCCL_GPU_TEST_HOST_ONLY is set" \
    "(a dry run): the CUDA handles are left out !!!!"
  links=$(mktemp -d)
  ln -s "$dir/liblra.so" "$links/liblra.so.0.1" # the soname the test was linked with
  NCCL_DEBUG=${NCCL_DEBUG:-WARN} \
    LD_LIBRARY_PATH="$links:$nccl_dir:$cudart_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    timeout -k 10 "$limit" "$test" || rc=$?
  rm -rf "$links"
  case $rc in
    0) nccl_result="PASS (libnccl.so.2 from $nccl_dir, libcudart.so.12 from $cudart_dir)" ;;
    77) nccl_result="SKIPPED: no usable CUDA device (see above)" ;;
    124 | 137)
      if [ -n "$shortened" ]; then
        nccl_result="STOPPED: lra_nccl_gpu_test after $limit s: the run's time budget ran out"
      else
        nccl_result="FAIL: lra_nccl_gpu_test timed out after $limit s (a hang?)"
      fi ;;
    *) nccl_result="FAIL: lra_nccl_gpu_test exited with $rc (see above)" ;;
  esac
}

# Prints the NCCL line of the summary; fails on FAIL.
report_nccl() {
  echo "NCCL adapter (lra_nccl_gpu_test): $nccl_result"
  [ "${nccl_result%%:*}" != FAIL ]
}

case "${1:-}" in
  --prepare-nccl)
    rc=0
    prepare_nccl || rc=$?
    [ $rc != 2 ] || echo "no NCCL/CUDA runtime wheels here (scripts/find-nccl.sh)"
    exit $rc ;;
  --check-bundle)
    if why=$(bundle_matches_tree); then
      echo "$out matches this tree (built from: $(paste -sd' ' "$out/REVISION" 2>/dev/null))"
      exit 0
    fi
    echo "!!!! $out is STALE: run 'bash scripts/gpu-check.sh --prepare' again !!!!"
    printf '%s\n' "$why"
    exit 1 ;;
  --nccl)
    echo "==== NCCL adapter on one rank (tests/nccl/lra_nccl_gpu_test.c)"
    run_nccl
    echo "==== summary"
    report_nccl
    exit ;;
esac

if [ "${1:-}" = "--prepare" ]; then
  baseline=
  if [ "${2:-}" = "--baseline" ]; then
    baseline=${3:?--baseline needs a git revision}
  fi
  cargo build --release --lib
  # The GPU tests as the suite runs them: the `checked` profile (release
  # optimisation with debug assertions and overflow checks). Built first
  # with cargo's own output, so a compile error shows here (with
  # --message-format=json it would go to stdout as JSON); the second run
  # builds nothing and only names the binary.
  cargo test --profile checked --test cuda --no-run
  exe=$(cargo test --profile checked --test cuda --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  [ -x "$exe" ] || { echo "could not find the tests/cuda.rs binary"; exit 1; }
  lib="${CARGO_TARGET_DIR:-target}/release/liblra.so"
  mkdir -p "$out"
  cp "$exe" "$out/cuda-tests"
  cp "$lib" "$out/liblra.so"
  # Which commit the figures belong to (the tree may move on before the run).
  { git log -1 --format='%h %s'
    git status --porcelain --untracked-files=no | grep -q . && echo "(plus uncommitted changes)"
  } >"$out/REVISION" || true
  # And exactly which sources: the GPU half checks the tree it travels with
  # against these (finding a bundle older than the tree without git).
  if git rev-parse --git-dir >/dev/null 2>&1; then
    bundle_inputs | xargs -0 -r sha256sum >"$out/INPUTS.sha256"
  else
    rm -f "$out/INPUTS.sha256"
    echo "!!!! not a git checkout: no $out/INPUTS.sha256; the GPU run cannot tell a stale bundle !!!!"
  fi
  # Line tables only matter here; keep what travels small.
  strip --strip-debug "$out/cuda-tests" "$out/liblra.so" 2>/dev/null || true
  rc=0
  prepare_nccl || rc=$?
  case $rc in
    0) echo "built $out/nccl/lra_nccl_gpu_test (the NCCL adapter's GPU test)" ;;
    2) echo "!!!! NOT BUILT: $out/nccl/lra_nccl_gpu_test: no NCCL/CUDA runtime wheels here" \
      "(run scripts/stages/nccl.sh once to install them); the GPU run will skip it !!!!" ;;
    *) echo "!!!! NOT BUILT: $out/nccl/lra_nccl_gpu_test failed to compile (see above);" \
      "the GPU run will skip it !!!!" ;;
  esac
  if bash scripts/torch-cuda-adapter.sh --crt "$out/cuda-crt"; then
    echo "copied CUDA 13.2's crt/ headers into $out/cuda-crt (for step 5, where the GPU machine lacks them)"
  else
    echo "!!!! NOT COPIED: $out/cuda-crt (above); step 5 needs crt/ headers of the GPU machine's own !!!!"
  fi
  rm -rf "$out/baseline"
  if [ -n "$baseline" ]; then
    src=target/gpu-check-baseline-src
    git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"
    # A worktree an interrupted prepare left registered, whose folder is
    # gone since, would make `add` refuse the path.
    git worktree prune
    git worktree add --detach "$src" "$baseline"
    (cd "$src" && CARGO_TARGET_DIR="$PWD/../gpu-check-baseline-target" cargo build --release --lib)
    mkdir -p "$out/baseline"
    cp target/gpu-check-baseline-target/release/liblra.so "$out/baseline/liblra.so"
    git -C "$src" log -1 --format='%h %s' >"$out/baseline/REVISION"
    git worktree remove --force "$src"
    strip --strip-debug "$out/baseline/liblra.so" 2>/dev/null || true
    # The A/B loads the baseline through today's binding (lra.py); a symbol
    # the binding gained since REV, or a moved ABI version, would lose the
    # A/B on the GPU. The dry run (CPU, about 15 s) loads both for real.
    py=
    for cand in /usr/bin/python3 python3; do
      if "$cand" -c 'import torch' 2>/dev/null; then py=$cand; break; fi
    done
    if [ -z "$py" ]; then
      echo "!!!! no python3 with torch here: the A/B against $baseline was not dry-run !!!!"
    elif ! "$py" scripts/gpu_check_dryrun.py "$out/liblra.so" "$out/baseline/liblra.so"; then
      echo "!!!! the dry run of the A/B against $baseline failed (above): the GPU run would lose it !!!!"
      exit 1
    fi
  fi
  ls -laR "$out"
  echo "now, with no edit or commit in between, on the GPU machine (carry $out): bash scripts/gpu-check.sh"
  echo "('bash scripts/gpu-check.sh --check-bundle' tells whether the bundle still matches the tree)"
  exit 0
fi

for f in cuda-tests liblra.so; do
  [ -e "$out/$f" ] || { echo "missing $out/$f: run 'bash scripts/gpu-check.sh --prepare' on a machine with Rust first"; exit 1; }
done
start=$(date +%s)
# The copy to the GPU machine may not keep modes; without the x bit every
# test step would fail with exit 126 and NCCL would read as not built.
chmod +x "$out/cuda-tests" "$out/nccl/lra_nccl_gpu_test" 2>/dev/null || true
revision=$(paste -sd' ' "$out/REVISION" 2>/dev/null || true)
echo "==== library under test: ${revision:-unknown (no REVISION)}"
# A bundle built from other sources than the tree beside it is run all the
# same, with a loud warning, not refused: by now the machine's start is
# paid for, and an older build's results (the benchmark figures, kernels
# unchanged since) are still worth having. The summary and the verdict say
# it, and the exit status is 1, so a stale run never reads as a pass for
# this tree. (`--check-bundle` asks the same before the device call.)
stale=
if ! why=$(bundle_matches_tree); then
  stale="the sources differ from the bundle's (sha256sum -c $out/INPUTS.sha256)"
  echo "!!!! STALE BUNDLE: $stale: the results below are of ${revision:-another build}, not of this tree !!!!"
  printf '%s\n' "$why"
fi
# Here a test that cannot find the GPU fails instead of skipping.
export LRA_REQUIRE_GPU=1
echo "==== device"
timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# Each step runs under a time limit and a failure does not stop the next
# one: a GPU machine is lent for minutes, and one run should bring back
# every result (a kernel that hangs or a failed test still leaves the
# benchmark figures, and the reverse). The summary says how each ended.
summary=()
failed=0
incomplete=0
# The time budget: LRA_GPU_CHECK_BUDGET seconds (default 500, for a command
# the device tool runs under timeout_s 600), and at most
# LRA_GPU_CHECK_LIMIT - 60 where the caller says how long the command may
# run (the last step's 10 s kill grace and the summary need the rest).
budget=${LRA_GPU_CHECK_BUDGET:-500}
if ! [[ $budget =~ ^[1-9][0-9]{0,5}$ ]]; then
  echo "!!!! LRA_GPU_CHECK_BUDGET='$budget' is not a number of seconds: 500 instead !!!!"
  budget=500
fi
if [ -n "${LRA_GPU_CHECK_LIMIT:-}" ]; then
  if ! [[ $LRA_GPU_CHECK_LIMIT =~ ^[1-9][0-9]{0,5}$ ]]; then
    echo "!!!! LRA_GPU_CHECK_LIMIT='$LRA_GPU_CHECK_LIMIT' is not a number of seconds: ignored !!!!"
  elif [ "$budget" -gt $((LRA_GPU_CHECK_LIMIT - 60)) ]; then
    budget=$((LRA_GPU_CHECK_LIMIT - 60))
  fi
fi
echo "==== time budget: $budget s"
deadline=$((start + budget))
logs=${LRA_GPU_CHECK_LOGS:-$out/logs}
mkdir -p "$logs"
# The summary so far, appended to as each step ends: a run the device tool
# kills at its own limit still leaves how each finished step ended.
: >"$logs/summary.txt"
note() { summary+=("$1"); printf '%s\n' "$1" >>"$logs/summary.txt"; }
note "library under test: ${revision:-unknown (no REVISION)}"
[ -z "$stale" ] || note "bundle: STALE: $stale"
# Seconds left of the run's time budget.
budget_left() { echo $((deadline - $(date +%s))); }
# run_step NAME SECONDS COMMAND...: records "NAME: passed|FAILED|TIMED OUT",
# "STOPPED" when the budget cut it short, or "SKIPPED" when the budget
# leaves less than 20 s to start it. A command that ignores SIGTERM is
# killed 10 s later. A step the budget stopped or skipped makes the run
# INCOMPLETE, not FAILED: it says nothing about the code.
run_step() {
  local name=$1 limit=$2 rc=0 left shortened=0
  shift 2
  left=$(budget_left)
  if [ "$left" -lt 20 ]; then
    echo "!!!! SKIPPED: $name: the run's time budget (LRA_GPU_CHECK_BUDGET) is spent !!!!"
    note "$name: SKIPPED (time budget spent)"
    incomplete=1
    return
  fi
  [ "$left" -ge "$limit" ] || { limit=$left; shortened=1; }
  timeout -k 10 "$limit" "$@" || rc=$?
  case $rc in
    0) note "$name: passed" ;;
    77) note "$name: SKIPPED (see above)" ;;
    124 | 137)
      if [ $shortened = 1 ]; then
        note "$name: STOPPED after $limit s: the run's time budget ran out"
        incomplete=1
      else
        note "$name: TIMED OUT after $limit s (a hang?)"
        failed=1
      fi ;;
    *) note "$name: FAILED (exit $rc; see above)"; failed=1 ;;
  esac
}

echo "==== tests/cuda.rs (kernels vs the CPU backend)"
# --show-output: what passing tests print too (the VMM and pool tests print
# the driver's pointer attributes, which no machine without a GPU can tell).
run_step "tests/cuda.rs" 300 "$out/cuda-tests" --test-threads=1 --show-output

echo "==== PyTorch: stream, tensors, benchmarks"
py=
for cand in python3 /usr/bin/python3; do
  if "$cand" -c 'import torch' 2>/dev/null; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  echo "!!!! SKIPPED: gpu_check.py: no python3 with torch"
  note "gpu_check.py: SKIPPED (no python3 with torch)"
  incomplete=1
else
  base=()
  if [ -e "$out/baseline/liblra.so" ]; then
    echo "baseline library: $(cat "$out/baseline/REVISION" 2>/dev/null)"
    base=(--baseline-lib "$out/baseline/liblra.so")
  else
    echo "!!!! no $out/baseline/liblra.so (--prepare without --baseline): no A/B this run !!!!"
  fi
  # -u: a step the budget stops is killed by a signal, and Python's buffer
  # (its stdout is a pipe here) would be lost with the lines after the
  # last flush=True (the 200/1, views and placement ratios).
  run_step "gpu_check.py" 300 "$py" -u scripts/gpu_check.py --lib "$out/liblra.so" ${base[@]+"${base[@]}"}
fi

echo "==== NCCL adapter on one rank (tests/nccl/lra_nccl_gpu_test.c)"
left=$(budget_left)
if [ "$left" -lt 20 ]; then
  nccl_result="SKIPPED: the run's time budget (LRA_GPU_CHECK_BUDGET) is spent"
  incomplete=1
elif [ "$left" -lt 60 ]; then
  run_nccl "$left" shortened
else
  run_nccl 60
fi
# In summary.txt now, not at the end: the sanitizers may outlast the run.
note "NCCL adapter (lra_nccl_gpu_test): $nccl_result"
case $nccl_result in
  FAIL*) failed=1 ;;
  STOPPED*) incomplete=1 ;;
esac

echo "==== LibTorch adapter on CUDA (test_lra_torch with LRA_TORCH_CUDA)"
if [ -z "$py" ]; then
  note "test_lra_torch (LRA_TORCH_CUDA): SKIPPED (no python3 with torch)"
  incomplete=1
elif ! command -v c++ >/dev/null 2>&1; then
  echo "!!!! SKIPPED: test_lra_torch: no C++ compiler (c++) on this machine !!!!"
  note "test_lra_torch (LRA_TORCH_CUDA): SKIPPED (no c++)"
  incomplete=1
else
  run_step "test_lra_torch (LRA_TORCH_CUDA)" 150 env LRA_TORCH_PYTHON="$py" \
    LRA_TORCH_CRT_DIR="$out/cuda-crt" bash scripts/torch-cuda-adapter.sh --python \
    "$out/liblra.so" include bindings/cpp
fi

# compute-sanitizer NAME SECONDS SANITIZER-OPTION... -- [TEST FILTER]: one
# tool over the test binary, its log in $logs/NAME.log; prints the log's
# error summary.
sanitize() {
  local name=$1 limit=$2 opts=()
  shift 2
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  run_step "compute-sanitizer $name" "$limit" bash -c '
    log=$1; shift
    "$@" >"$log" 2>&1; rc=$?
    if grep -q "Device not supported" "$log"; then
      echo "!!!! SKIPPED: compute-sanitizer cannot instrument this machine:" \
        "$(grep -m1 "Device not supported" "$log") !!!!"
      exit 77
    fi
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|Program hit" "$log" || tail -n 20 "$log"
    exit $rc' _ "$logs/$name.log" \
    "$sanitizer" "${opts[@]}" --error-exitcode 1 "$out/cuda-tests" --test-threads=1 "$@"
}

echo "==== compute-sanitizer"
sanitizer=
for cand in compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" --version >/dev/null 2>&1; then
    sanitizer=$(command -v "$cand"); break
  fi
done
if [ -z "$sanitizer" ]; then
  echo "!!!! SKIPPED: compute-sanitizer: not on the PATH nor in /usr/local/cuda*/bin !!!!"
  note "compute-sanitizer: SKIPPED (none found)"
else
  echo "$sanitizer: $("$sanitizer" --version | tail -n 1); logs in $logs/"
  # memcheck is here for the kernels' memory accesses. By default it also
  # counts every failed driver call as an error, and some fail on purpose
  # or by design: cuMemAlloc in the out-of-memory test, cuStreamIsCapturing
  # on the legacy stream during a capture, and lra's own retry of
  # cuPointerGetAttributes with fewer attributes, which a driver may refuse
  # for pool or unmapped VMM memory (mapped_memory_info in
  # src/backend/cuda/driver.rs). The tests assert on those results
  # themselves, and step 1 runs them without a sanitizer; so API errors are
  # not reported (--report-api-errors, which compute-sanitizer took over
  # from cuda-memcheck). The machine's sanitizer version is unknown: where
  # its --help does not list the option, memcheck skips the tests whose
  # driver calls may fail instead.
  help=$(timeout -k 5 20 "$sanitizer" --help 2>&1 || true)
  if [[ $help == *--report-api-errors* ]]; then
    memcheck=(--tool memcheck --report-api-errors no --)
    echo "memcheck: --report-api-errors no (the tests check the driver's answers): every test"
  else
    memcheck=(--tool memcheck -- --skip abi_cuda_state_out_of_memory_changes_nothing
      --skip the_legacy_stream_is_refused_while_a_blocking_stream_captures
      --skip stream_ordered_pool_memory_is_accepted
      --skip memory_mapped_through_the_vmm_api_is_checked_by_its_mapped_extent)
    echo "!!!! this compute-sanitizer lists no --report-api-errors: memcheck skips the 4 tests" \
      "whose driver calls fail on purpose or may be refused !!!!"
  fi
  # The random tests run their full default cases in step 1; here a few
  # each, to stay well inside memcheck's limit.
  export LRA_CUDA_FUZZ_CASES=4 LRA_ABI_FUZZ_CASES=4
  sanitize memcheck 240 "${memcheck[@]}"
  unset LRA_CUDA_FUZZ_CASES LRA_ABI_FUZZ_CASES
  sanitize racecheck 120 --tool racecheck -- every_kernel_matches_the_cpu_backend
  sanitize synccheck 120 --tool synccheck -- every_kernel_matches_the_cpu_backend
fi

echo "==== summary"
printf '%s\n' "${summary[@]}"
verdict="passed"
[ $incomplete -eq 0 ] || verdict="INCOMPLETE (the time budget skipped or stopped steps)"
[ $failed -eq 0 ] || verdict="FAILED"
[ -z "$stale" ] || verdict+=", on a STALE bundle (of ${revision:-another build}, not this tree)"
echo "==== gpu-check $verdict in $(( $(date +%s) - start )) s" | tee -a "$logs/summary.txt"
[ "$verdict" = passed ]
