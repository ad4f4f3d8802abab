#!/usr/bin/env bash
# Stage nccl: the NCCL reduction adapter bindings/nccl/lra_nccl.h, without a GPU.
# 1. Against the stub CUDA/NCCL in tests/nccl/stub (always): compiles as C11
#    and C++17, and its logic runs on one simulated rank (tests/nccl/
#    lra_nccl_stub_test.c: blocking and non-blocking communicator, busy
#    stream, failed call, failed peer, wrong device, and the deadline
#    timeout_s: a peer that never joins and an enqueue that never finishes
#    end in LRA_NCCL_ERR_TIMEOUT, then the reduction fails at once;
#    lra_nccl_check_agreement with pretend peers, the device switch,
#    lra_nccl_error_string, the sleeping wait). Strict
#    C11, so the header's own clock_gettime declaration is what runs; a hang
#    is stopped after 120 s.
# 2. Against the real NCCL and CUDA runtime from PyPI (nvidia-nccl-cu12,
#    nvidia-cuda-runtime-cu12, plus nvidia-cuda-cccl-cu12 for <nv/target> and
#    nvidia-cuda-nvcc-cu12 for crt/, which the real cuda_runtime.h and nccl.h
#    include; pip-installed into python3 like ptxas, once, about 360 MB):
#    - lra_nccl.h compiles as C11 and C++17 with -Wall -Wextra -Werror;
#    - the stubs match the real API: stub_impl.c compiles against the real
#      headers (each definition against the real prototype) and every enum
#      value the stubs define is a _Static_assert against the real one;
#    - tests/nccl/lra_nccl_real_test.c links libnccl.so.2, libcudart.so.12
#      and liblra and runs every adapter path that needs no device, asserting
#      the real libraries' error codes (then again under valgrind).
#    - tests/nccl/lra_nccl_gpu_test.c (run by scripts/gpu-check.sh on a
#      GPU machine) compiles and links as gpu-check.sh --prepare builds it;
#      gpu-check.sh --nccl runs it here as on the GPU machine (finds the
#      libraries; no device: skipped), then over a pretend one-device GPU
#      (tests/nccl/fake_gpu_preload.c, LD_PRELOAD), where the test's own
#      checks must pass (all but its CUDA-handle part; its deadline part
#      holds the stream with cudaLaunchHostFunc, which the pretend GPU runs
#      on a thread).
#    The collective itself needs a GPU and never runs here.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
skip() { printf '\n!!!! SKIPPED: %s !!!!\n' "$*"; }

lib_dir="${CARGO_TARGET_DIR:-$root/target}/release"
cargo build --release --lib # a no-op after scripts/test.sh's build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cflags=(-Wall -Wextra -Werror -I include -I bindings/nccl)
lra_link=(-L "$lib_dir" -llra "-Wl,-rpath,$lib_dir")
printf '#include "lra_nccl.h"\nlra_reduce_fn f = lra_nccl_allreduce_sum;\n' > "$work/use.c"
cp "$work/use.c" "$work/use.cpp"

# ---- 1. stub CUDA/NCCL: compile checks and the one-rank logic run ------------
cc -std=c11 "${cflags[@]}" -I tests/nccl -I tests/nccl/stub tests/nccl/lra_nccl_stub_test.c \
  tests/nccl/stub/stub_impl.c "${lra_link[@]}" -o "$work/lra_nccl_stub_test"
rc=0
timeout 120 "$work/lra_nccl_stub_test" || rc=$?
[ $rc = 0 ] || { echo "FAILED: lra_nccl_stub_test (exit $rc; 124 = timed out: a hang)"; exit 1; }
# Trainers are often C++: the header must compile as C++ too.
have_cxx=0
if command -v c++ >/dev/null; then
  have_cxx=1
  c++ -std=c++17 "${cflags[@]}" -fsyntax-only -I tests/nccl/stub "$work/use.cpp"
else
  skip "no c++ (Debian: g++): lra_nccl.h was not compiled as C++"
fi

# ---- 2. real NCCL and CUDA runtime from PyPI -----------------------------------
wheels=(nvidia-nccl-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12 nvidia-cuda-nvcc-cu12)
if ! dirs=$(bash scripts/find-nccl.sh); then
  echo "installing NCCL and the CUDA runtime from PyPI (${wheels[*]}; about 360 MB, once)"
  python3 -m pip install -q --no-cache-dir --retries 2 "${wheels[@]}" > "$work/pip.log" 2>&1 \
    || tail -5 "$work/pip.log"
  dirs=$(bash scripts/find-nccl.sh) || {
    skip "no real NCCL/CUDA headers and libraries (pip install ${wheels[*]} failed, see above):" \
      "lra_nccl.h was checked against the stub declarations only, not linked or run against NCCL"
    exit 0
  }
fi
{ read -r nccl; read -r cudart; read -r cccl; read -r nvcc; } <<< "$dirs"
real_inc=(-I "$nccl/include" -I "$cudart/include" -I "$cccl/include" -I "$nvcc/include")
version=$(sed -n 's/^#define NCCL_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$/\2/p' "$nccl/include/nccl.h" \
  | paste -sd.)
echo "real NCCL $version: $nccl"

# The adapter against the real headers, as C and as C++.
cc -std=c11 "${cflags[@]}" -fsyntax-only "${real_inc[@]}" "$work/use.c"
[ $have_cxx = 0 ] || c++ -std=c++17 "${cflags[@]}" -fsyntax-only "${real_inc[@]}" "$work/use.cpp"
echo "lra_nccl.h compiles as C11$([ $have_cxx = 0 ] || echo ' and C++17')" \
  "against the real cuda_runtime.h and nccl.h"

# The stubs against the real API: a drifted signature or value is a compile error.
cc -std=c11 "${cflags[@]}" -fsyntax-only "${real_inc[@]}" tests/nccl/stub/stub_impl.c
{
  printf '#include <cuda_runtime.h>\n#include <nccl.h>\n'
  grep -ho '\b\(cuda\|nccl\)[A-Za-z0-9_]* = -\?[0-9]\+' tests/nccl/stub/*.h \
    | awk '{ printf "_Static_assert(%s == %s, \"stub %s = %s\");\n", $1, $3, $1, $3 }'
} > "$work/stub_values.c"
values=$(grep -c _Static_assert "$work/stub_values.c" || true)
[ "$values" -gt 0 ] || { echo "FAILED: no enum values found in tests/nccl/stub/*.h"; exit 1; }
cc -std=c11 "${cflags[@]}" -fsyntax-only "${real_inc[@]}" "$work/stub_values.c"
functions=$(grep -c '^\(cudaError_t\|ncclResult_t\) [a-zA-Z]*(' tests/nccl/stub/stub_impl.c || true)
echo "stubs match the real API: $functions definitions in stub_impl.c, $values enum values"

# The GPU test (tests/nccl/lra_nccl_gpu_test.c), built as
# `scripts/gpu-check.sh --prepare` builds it (by soname, no rpath), and the
# GPU machine's half of gpu-check.sh run on it here, twice: as it is (the
# libraries are found as there, the binary loads; without a device it must
# skip, with one pass), and over a pretend GPU (tests/nccl/
# fake_gpu_preload.c, preloaded; CUDA handles left out), where every check
# of the test must pass: a mistake in the test must not cost a lent GPU.
mkdir "$work/gpu-check"
cp "$lib_dir/liblra.so" "$work/gpu-check/"
LRA_GPU_CHECK_DIR="$work/gpu-check" bash scripts/gpu-check.sh --prepare-nccl
cc -std=c11 "${cflags[@]}" -shared -fPIC -pthread "${real_inc[@]}" \
  tests/nccl/fake_gpu_preload.c -o "$work/fake_gpu_preload.so"
# Runs gpu-check.sh --nccl with the environment given; prints its output
# indented and returns its summary verdict in $verdict.
gpu_check_nccl() {
  local out
  out=$(env -u LRA_REQUIRE_GPU LRA_GPU_CHECK_DIR="$work/gpu-check" "$@" \
    bash scripts/gpu-check.sh --nccl 2>&1) || true
  local line
  while IFS= read -r line; do printf '  | %s\n' "$line"; done <<< "$out"
  verdict=$(sed -n 's/^NCCL adapter (lra_nccl_gpu_test): //p' <<< "$out")
}
gpu_check_nccl
as_is=${verdict%% (*}
case $verdict in
  PASS* | "SKIPPED: no usable CUDA device"*) ;;
  *) echo "FAILED: gpu-check.sh --nccl: \"$verdict\", want PASS or the no-device SKIPPED"
    exit 1 ;;
esac
gpu_check_nccl LD_PRELOAD="$work/fake_gpu_preload.so" LRA_NCCL_GPU_TEST_HOST_ONLY=1
case $verdict in
  PASS*) ;;
  *) echo "FAILED: lra_nccl_gpu_test over the pretend GPU: \"$verdict\""; exit 1 ;;
esac
echo "lra_nccl_gpu_test: built and linked as for the GPU run; gpu-check.sh --nccl found the" \
  "libraries and ran it ($as_is); over a pretend GPU every check but the CUDA handles' passed"

# Linked against the real libraries and run: the paths that need no device.
cc -std=c11 "${cflags[@]}" "${real_inc[@]}" -I tests/nccl tests/nccl/lra_nccl_real_test.c \
  "$nccl/lib/libnccl.so.2" "$cudart/lib/libcudart.so.12" -Wl,-rpath,"$nccl/lib:$cudart/lib" \
  "${lra_link[@]}" -o "$work/lra_nccl_real_test"
rc=0
timeout 60 "$work/lra_nccl_real_test" || rc=$?
case $rc in
  0) ;;
  77) echo "nccl stage passed (stub checks and real headers; the no-device run skipped, see above)"
    exit 0 ;;
  *) echo "FAILED: lra_nccl_real_test (exit $rc; 124 = timed out: a hang)"; exit 1 ;;
esac
# The adapter must not read the garbage an uninitialised struct holds, nor leak.
if command -v valgrind >/dev/null; then
  timeout 300 valgrind --quiet --error-exitcode=3 --leak-check=full \
    --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
    "$work/lra_nccl_real_test" > /dev/null
  echo "valgrind: no invalid accesses, no definite or indirect leaks"
else
  skip "valgrind is not installed (scripts/deps.sh installs it): lra_nccl_real_test ran without it"
fi
echo "nccl stage passed (real NCCL $version, no device)"
