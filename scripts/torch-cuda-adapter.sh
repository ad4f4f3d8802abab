#!/usr/bin/env bash
# Builds bindings/cpp/tests/test_lra_torch.cpp with LRA_TORCH_CUDA (the CUDA
# path of lra_torch.hpp, which Debian's CPU-only LibTorch cannot compile)
# against a CUDA build of LibTorch, and runs it.
#
#   bash scripts/torch-cuda-adapter.sh --wheel LIBLRA INCLUDE_DIR...
#       Here (no GPU): the LibTorch inside PyPI's torch wheel (a CUDA build,
#       pinned below), downloaded with its CUDA runtime headers into
#       target/torch-wheel/ once (about 530 MB; 500 MB of it kept, unpacked).
#       Linked without libtorch_cuda (it needs cuBLAS, cuDNN and more:
#       gigabytes), so LibTorch sees no device: every CPU check runs against
#       this LibTorch, and the CUDA checks print a SKIPPED line. Exit status
#       2: the wheels could not be downloaded (the caller prints why).
#   bash scripts/torch-cuda-adapter.sh --python LIBLRA INCLUDE_DIR...
#       On a GPU machine (scripts/gpu-check.sh): the LibTorch inside the torch
#       of python3 (or of $LRA_TORCH_PYTHON), linked with libtorch_cuda; the
#       CUDA runtime headers of that Python's nvidia packages or of
#       /usr/local/cuda, with crt/host_defines.h from beside them or else
#       from the copy `--crt DIR` made ($LRA_TORCH_CRT_DIR, default
#       target/gpu-check/cuda-crt; CUDA 13 moved crt/ into a wheel of its own,
#       which torch does not pull in). Export LRA_REQUIRE_GPU=1 to make a
#       missing device a failure. --wheel is this search over the wheels.
#   bash scripts/torch-cuda-adapter.sh --crt DIR
#       Puts the pinned nvidia-cuda-crt wheel's headers into DIR/include
#       (for scripts/gpu-check.sh --prepare).
#
# LIBLRA is liblra.so (any name: it is linked by its SONAME); INCLUDE_DIRs
# hold lra.h, lra.hpp and lra_torch.hpp; relative paths are taken from the
# repository's root. Needs python3, c++ and objdump. The test binary goes to
# $LRA_TORCH_TEST_DIR (default: a temporary directory, removed afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

# The wheels of --wheel and --crt: torch 2.15.0 is built for CUDA 13.2.
torch_pin="torch==2.15.0"
cuda_pins=("nvidia-cuda-runtime==13.2.86" "nvidia-cuda-crt==13.2.86" "nvidia-cuda-cupti==13.2.86")
wheels=$(realpath -m "${CARGO_TARGET_DIR:-target}/torch-wheel")

die() { echo "torch-cuda-adapter: $*" >&2; exit 1; }

# first_dir_with FILE < DIRS: the first of the directories (one a line)
# that holds FILE; nothing when none does.
first_dir_with() {
  local d
  while IFS= read -r d; do
    if [ -n "$d" ] && [ -e "$d/$1" ]; then echo "$d"; return; fi
  done
}

# fetch DEST FILTER PIN...: downloads the wheels of PIN... (no dependencies)
# and extracts their members matching the Python regex FILTER into DEST.
# Returns 2 when pip cannot download them.
fetch() {
  local dest=$1 filter=$2
  shift 2
  mkdir -p "$wheels/download"
  # Linux x86_64 wheels for CPython 3.11, whatever python3 is here (the C++
  # libraries in them are the same for every Python).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$wheels/download" "$@" >"$wheels/pip.log" 2>&1 || {
    echo "pip download $* failed (log: $wheels/pip.log):" >&2
    tail -n 5 "$wheels/pip.log" >&2
    return 2
  }
  python3 - "$wheels/download" "$dest" "$filter" "$@" <<'EOF'
import glob, os, re, sys, zipfile
download, dest, keep, pins = sys.argv[1], sys.argv[2], re.compile(sys.argv[3]), sys.argv[4:]
for pin in pins:
    name, version = pin.split("==")
    stem = name.replace("-", "_")
    found = glob.glob(os.path.join(download, f"{stem}-{version}-*.whl"))
    if len(found) != 1:
        sys.exit(f"{pin}: expected one wheel in {download}, found {found}")
    with zipfile.ZipFile(found[0]) as z:
        z.extractall(dest, [m for m in z.namelist() if keep.search(m)])
EOF
}

# The wheel's LibTorch and CUDA 13.2 headers and libraries, laid out as the
# wheels install them (torch/, nvidia/cu13/), which libtorch_cpu's RUNPATH
# ($ORIGIN/../../nvidia/cu13/lib) expects. Extracted once (a stamp).
wheel_tree() {
  local tree=$wheels/tree stamp="$torch_pin ${cuda_pins[*]}"
  if [ "$(cat "$tree/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$tree"
    fetch "$tree" '^torch/(include/|lib/lib(c10|c10_cuda|torch|torch_cpu|gomp)\.so)|^nvidia/cu13/(include/|lib/lib(cudart|cupti)\.so\.13$)|^torch/share/cmake/Torch/TorchConfig\.cmake$' \
      "$torch_pin" "${cuda_pins[@]}" || return $?
    echo "$stamp" >"$tree/.stamp"
    rm -rf "$wheels/download" # the wheels themselves (530 MB) are not needed again
  fi
  echo "$tree"
}

# The directories of python3's torch and of every nvidia/*/ package on its
# path, in the path's order; found, not imported (importing torch takes
# seconds; an nvidia/__init__.py of an older wheel would hide the others).
# First line: torch's.
python_dirs() {
  "${LRA_TORCH_PYTHON:-python3}" - <<'EOF'
import glob, importlib.util, os, sys
spec = importlib.util.find_spec("torch")
if spec is None or not spec.submodule_search_locations:
    sys.exit("python3 has no torch")
print(os.path.abspath(list(spec.submodule_search_locations)[0]))
for entry in sys.path:
    for d in sorted(glob.glob(os.path.join(entry or ".", "nvidia", "*"))):
        if os.path.isdir(d):
            print(os.path.abspath(d))
EOF
}

# build_and_run TORCH WITH_CUDA_LIB LIBLRA INCLUDE_DIRS CUDA_INCLUDE_DIRS LIB_DIRS
# (the three lists newline-separated): compiles and runs the test.
build_and_run() {
  local torch=$1 with_cuda=$2 liblra=$3 lra_includes=$4 cuda_includes=$5 lib_dirs=$6
  local dir=$testdir std abi soname cudart cudart_dir flags=() libs=() d
  mkdir -p "$dir/lib"
  # lra by its SONAME, from a directory of its own on the rpath.
  soname=$(objdump -p "$liblra" | sed -n 's/^ *SONAME *//p')
  [ -n "$soname" ] || die "$liblra has no SONAME"
  ln -sf "$(readlink -f "$liblra")" "$dir/lib/$soname"
  # LibTorch from 2.10 on needs C++20; Debian's 1.13 builds with C++17.
  std=c++20
  echo 'int main(){}' | c++ -std=c++20 -x c++ -o /dev/null - 2>/dev/null || std=c++17
  # The std::string ABI LibTorch was built with (TORCH_CXX_FLAGS).
  abi=$(grep -o -m1 '_GLIBCXX_USE_CXX11_ABI=[01]' "$torch/share/cmake/Torch/TorchConfig.cmake" 2>/dev/null || true)
  while IFS= read -r d; do [ -z "$d" ] || flags+=(-I "$d"); done <<<"$lra_includes"
  flags+=(-isystem "$torch/include" -isystem "$torch/include/torch/csrc/api/include")
  while IFS= read -r d; do [ -z "$d" ] || flags+=(-isystem "$d"); done <<<"$cuda_includes"
  [ -z "$abi" ] || flags+=("-D$abi")
  libs=(-L "$dir/lib" "-l:$soname" -L "$torch/lib" -Wl,--no-as-needed)
  [ "$with_cuda" = 0 ] || libs+=(-ltorch -ltorch_cuda)
  libs+=(-ltorch_cpu -lc10 -lc10_cuda -Wl,--as-needed)
  # c10's CUDA guard, inlined into the test, calls the CUDA runtime: the
  # libcudart that libc10_cuda was linked with, by name.
  cudart=$(objdump -p "$torch/lib/libc10_cuda.so" | sed -n 's/^ *NEEDED *\(libcudart\.so\.[0-9]*\)$/\1/p')
  [ -n "$cudart" ] || die "$torch/lib/libc10_cuda.so names no libcudart.so.N"
  cudart_dir=$(first_dir_with "$cudart" <<<"$lib_dirs"$'\n'"$torch/lib"$'\n'/usr/local/cuda/lib64)
  [ -n "$cudart_dir" ] || die "no $cudart beside python3's torch"
  libs+=(-L "$cudart_dir" "-l:$cudart")
  # LibTorch's own dependencies (cudart, cupti, cuBLAS…) are found through
  # its RUNPATH when the test runs; the link is shown where they are, and
  # does not insist on seeing every symbol they need.
  while IFS= read -r d; do [ -z "$d" ] || libs+=("-Wl,-rpath-link,$d"); done <<<"$lib_dirs"
  libs+=(-Wl,--allow-shlib-undefined)
  # Warnings fail the build here (--wheel: the compiler CI knows), not on
  # a GPU machine, whose compiler may warn of more and whose minutes count.
  [ "$mode" != --wheel ] || flags+=(-Werror)
  echo "test_lra_torch with LRA_TORCH_CUDA: $(c++ --version | head -n 1), -std=$std${abi:+, -D$abi}; LibTorch $torch"
  c++ -std="$std" -O1 -DLRA_TORCH_CUDA=1 -Wall -Wextra "${flags[@]}" \
    bindings/cpp/tests/test_lra_torch.cpp -o "$dir/test_lra_torch" "${libs[@]}" \
    -Wl,--disable-new-dtags,-rpath,"$dir/lib:$torch/lib:$cudart_dir"
  "$dir/test_lra_torch"
}

testdir=${LRA_TORCH_TEST_DIR:-}
if [ -z "$testdir" ]; then
  testdir=$(mktemp -d)
  trap 'rm -rf "$testdir"' EXIT
fi

mode=${1:-}
case $mode in
  --crt)
    [ $# = 2 ] || die "usage: $0 --crt DIR"
    rm -rf "$2"
    fetch "$2" '^nvidia/cu13/include/crt/' "${cuda_pins[1]}" || exit $?
    mv "$2/nvidia/cu13/include" "$2/include"
    rm -rf "$2/nvidia"
    exit 0
    ;;
  --wheel)
    [ $# -ge 3 ] || die "usage: $0 --wheel LIBLRA INCLUDE_DIR..."
    # The extracted wheels stand in for python3's site-packages: the same
    # search as on a GPU machine finds them (ahead of any torch of python3's).
    tree=$(wheel_tree) || exit $?
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
    ;;
  --python) [ $# -ge 3 ] || die "usage: $0 --python LIBLRA INCLUDE_DIR..." ;;
  *) die "usage: $0 --wheel|--python LIBLRA INCLUDE_DIR... | --crt DIR" ;;
esac
liblra=$2
shift 2

dirs=$(python_dirs) || die "no python3 with torch"
torch=$(head -n 1 <<<"$dirs")
with_cuda=1
if [ ! -e "$torch/lib/libtorch_cuda.so" ]; then
  with_cuda=0
  [ "$mode" = --wheel ] ||
    echo "!!!! $torch has no lib/libtorch_cuda.so (a CPU-only torch?): linked without it, LibTorch sees no device !!!!"
fi
# The runtime headers: python3's CUDA packages first (they match torch's
# libcudart), then a toolkit's. crt/ lies beside them (a toolkit, CUDA 13's
# nvidia-cuda-crt wheel), or in CUDA 12's nvcc wheel next to the runtime's,
# or else in the --crt copy (CUDA 13.2: for a CUDA 13 torch without it;
# CUDA 13.0's runtime headers compile with it), or a toolkit's.
candidates=$(sed 1d <<<"$dirs" | sed 's|$|/include|'; printf '%s\n' /usr/local/cuda/include /usr/local/cuda-*/include)
runtime=$(first_dir_with cuda_runtime_api.h <<<"$candidates")
[ -n "$runtime" ] || die "no cuda_runtime_api.h in python3's nvidia packages nor in /usr/local/cuda*"
crt=$(first_dir_with crt/host_defines.h <<<"$runtime"$'\n'"${runtime%/cuda_runtime/include}/cuda_nvcc/include"$'\n'"$(realpath -m "${LRA_TORCH_CRT_DIR:-target/gpu-check/cuda-crt}")/include"$'\n'"$(printf '%s\n' /usr/local/cuda/include /usr/local/cuda-*/include)")
[ -n "$crt" ] || die "no crt/host_defines.h beside $runtime, in a --crt copy or in /usr/local/cuda*"
echo "CUDA runtime headers: $runtime ($(grep -m1 -o 'CUDART_VERSION *[0-9]*' "$runtime/cuda_runtime_api.h" || echo 'no CUDART_VERSION'))$([ "$crt" = "$runtime" ] || echo ", crt/ from $crt")"
build_and_run "$torch" "$with_cuda" "$liblra" "$(printf '%s\n' "$@")" \
  "$(printf '%s\n' "$runtime" "$crt" | uniq)" "$(sed 1d <<<"$dirs" | sed 's|$|/lib|')"
