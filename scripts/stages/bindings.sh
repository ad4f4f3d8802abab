#!/usr/bin/env bash
# Stage "bindings": proves each language binding with a real program.
#  1. static ABI check of the Julia and Python bindings against include/lra.h
#     (with a self-test that injected drift is caught), and a syntax check of
#     the Julia files, a check of the values each Julia ccall passes and a
#     check that every name the Julia files use resolves (all three
#     tree-sitter-julia, the last two with a self-test; Julia itself cannot
#     be installed here);
#  2. scripts/install.sh into a temporary PREFIX (lib, headers, CMake config, lra.pc;
#     libraries stripped of debug info; the manifest), and its --uninstall;
#  3. plain C flat-buffer example built through pkg-config (shared and static), run;
#  4. C++ binding tests built through find_package(lra) (+ the LibTorch adapter test),
#     the reduction-lifetime test under valgrind;
#  5. LibTorch digits MLP through find_package(lra COMPONENTS torch): Adam from
#     lr 1e-4 and from lr 1.0 must each reach >= 90% training accuracy; the
#     LibTorch adapter test again with LRA_TORCH_CUDA, against the CUDA build
#     of LibTorch in PyPI's torch wheel (scripts/torch-cuda-adapter.sh: its
#     CUDA checks need a GPU and say so);
#  6. Python ctypes binding tests, training a torch model with Debian's python3;
#  7. a CPU dry run of scripts/gpu_check.py's code paths (the GPU script must
#     not first break on a lent GPU).
# Uses target/ (or $CARGO_TARGET_DIR); prints "!!!! SKIPPED:" for a missing dependency.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
lib="$CARGO_TARGET_DIR/release/liblra.so"

say() { printf -- '---- bindings: %s\n' "$*"; }
skip() { printf '\n!!!! SKIPPED: %s !!!!\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/lra-bindings.XXXXXX")"
trap 'rm -rf "$work"' EXIT
jobs="$(nproc 2>/dev/null || echo 2)"

say "static ABI check (Julia ccalls, Python prototypes vs include/lra.h)"
if have python3; then
  python3 bindings/check_abi.py --self-test
else
  skip "python3 not found: the Julia/Python ABI check did not run"
fi

# A tree-sitter check of the Julia binding; exit status 2: tree-sitter is missing.
julia_tree_sitter_check() {
  local what="$1" rc=0
  shift
  if have python3; then python3 "$@" || rc=$?; else rc=2; fi
  if [ "$rc" = 2 ]; then
    skip "python3 lacks tree_sitter / tree_sitter_julia (pip install tree-sitter tree-sitter-julia): $what did not run"
  elif [ "$rc" != 0 ]; then
    exit 1
  fi
}
say "Julia syntax (tree-sitter-julia: the binding cannot run here)"
julia_tree_sitter_check "the Julia syntax check" bindings/julia/check_syntax.py
say "Julia ccall values: arguments by C parameter name, out-parameters as Ref variables, GC.@preserve"
julia_tree_sitter_check "the Julia ccall value check" bindings/julia/check_ccalls.py --self-test
say "Julia names: every name used is bound in its file, imported, or a listed Julia name"
julia_tree_sitter_check "the Julia name check" bindings/julia/check_names.py --self-test

say "install into a temporary prefix"
prefix="$work/prefix"
scripts/install.sh "$prefix"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

say "installed shared library: liblra.so -> liblra.so.<abi> (its SONAME) -> liblra.so.<version>"
# A second install over the first must leave the same layout.
LRA_SKIP_BUILD=1 scripts/install.sh "$prefix" >/dev/null
version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)"
major="${version%%.*}"
minor="${version#*.}"; minor="${minor%%.*}"
if [ "$major" = 0 ]; then want_soname="liblra.so.0.$minor"; else want_soname="liblra.so.$major"; fi
soname="$(objdump -p "$prefix/lib/liblra.so.$version" | sed -n 's/^ *SONAME *//p')"
if [ "$soname" != "$want_soname" ] \
  || [ "$(readlink "$prefix/lib/$soname")" != "liblra.so.$version" ] \
  || [ "$(readlink "$prefix/lib/liblra.so")" != "$soname" ] \
  || [ ! -f "$prefix/lib/liblra.so.$version" ] || [ -L "$prefix/lib/liblra.so.$version" ]; then
  echo "installed layout is wrong (SONAME '$soname', want '$want_soname'):" >&2
  ls -l "$prefix/lib" >&2
  exit 1
fi
say "install.sh: a missing build is an error that names it, before the prefix is touched; a prefix with sed and shell metacharacters lands in lra.pc as it is"
out="$(CARGO_TARGET_DIR="$work/no-build" LRA_SKIP_BUILD=1 scripts/install.sh "$work/untouched" 2>&1)" && {
  echo "install.sh succeeded without a build" >&2; exit 1; }
if ! grep -q "no $work/no-build/release/liblra.so" <<<"$out" || [ -e "$work/untouched" ]; then
  echo "install.sh without a build: '$out' (and the prefix: $(ls -d "$work/untouched" 2>&1))" >&2
  exit 1
fi
odd="$work/odd&prefix|with\\chars"
LRA_SKIP_BUILD=1 scripts/install.sh "$odd" >/dev/null
if [ "$(sed -n 's/^prefix=//p' "$odd/lib/pkgconfig/lra.pc")" != "$odd" ]; then
  echo "lra.pc of prefix '$odd' says: $(grep '^prefix=' "$odd/lib/pkgconfig/lra.pc")" >&2
  exit 1
fi
# The build tree offers the same name (build.rs), for programs linked there.
if [ "$(readlink "$CARGO_TARGET_DIR/release/$soname")" != liblra.so ]; then
  echo "$CARGO_TARGET_DIR/release/$soname is not a link to liblra.so" >&2
  exit 1
fi
say "install.sh: the installed libraries lose their debug info (LRA_INSTALL_DEBUG=1 keeps it), not their SONAME or lra_* symbols; the manifest lists exactly what is installed"
debug_info() { [[ "$(objdump -h "$1")" == *" .debug_info "* ]]; }
exports() { nm -D --defined-only "$1" | sed -n 's/.* T \(lra_.*\)/\1/p' | sort; }
LRA_INSTALL_DEBUG=1 LRA_SKIP_BUILD=1 scripts/install.sh "$work/debug" >/dev/null
for f in "$prefix/lib/liblra.so.$version" "$prefix/lib/liblra.a"; do
  if debug_info "$f" || ! debug_info "$lib" || ! debug_info "$work/debug/lib/${f##*/}"; then
    echo "debug info: want none in $f, some in $lib and in the LRA_INSTALL_DEBUG=1 install" >&2
    exit 1
  fi
done
if ! grep -qx lra_create <<<"$(exports "$prefix/lib/liblra.so.$version")" \
  || [ "$(exports "$prefix/lib/liblra.so.$version")" != "$(exports "$lib")" ]; then
  echo "the installed liblra.so exports other lra_* symbols than $lib" >&2
  exit 1
fi
if [ "$(cd "$prefix" && find . -type f -o -type l | sed 's|^\./||' | sort)" \
  != "$(grep -v '/$' "$prefix/share/lra/install_manifest.txt" | sort)" ]; then
  echo "$prefix/share/lra/install_manifest.txt is not the list of installed files" >&2
  exit 1
fi
ls -l "$prefix/lib/liblra.so.$version" "$prefix/lib/liblra.a" "$lib"

# An upgrade keeps the earlier install's files that are still there listed.
touch "$odd/lib/liblra.so.0.0.1"
printf 'lib/liblra.so.0.0.1\n' >>"$odd/share/lra/install_manifest.txt"
LRA_SKIP_BUILD=1 scripts/install.sh "$odd" >/dev/null
grep -qx lib/liblra.so.0.0.1 "$odd/share/lra/install_manifest.txt" \
  || { echo "a re-install dropped an earlier install's file from the manifest" >&2; exit 1; }

say "install.sh --uninstall: removes what the manifest lists and the emptied directories; no manifest, or a line leading out of the prefix, is an error that removes nothing"
for p in "$odd" "$work/debug"; do
  scripts/install.sh --uninstall "$p"
  if [ -n "$(find "$p" -mindepth 1)" ]; then
    echo "left in $p after --uninstall:" >&2; find "$p" -mindepth 1 >&2; exit 1
  fi
done
# Directories that were there before the install stay, empty or not.
mkdir -p "$work/pre/include" "$work/pre/lib"
LRA_SKIP_BUILD=1 scripts/install.sh "$work/pre" >/dev/null
scripts/install.sh --uninstall "$work/pre" >/dev/null
if [ "$(cd "$work/pre" && find . -mindepth 1 | sort | paste -sd' ')" != "./include ./lib" ]; then
  echo "--uninstall of a prefix that had include/ and lib/ left: $(cd "$work/pre" && find . -mindepth 1)" >&2
  exit 1
fi
out="$(scripts/install.sh --uninstall "$odd" 2>&1)" && { echo "--uninstall without a manifest succeeded" >&2; exit 1; }
grep -qF "no $odd/share/lra/install_manifest.txt" <<<"$out" || { echo "--uninstall without a manifest: '$out'" >&2; exit 1; }
mkdir -p "$work/evil/p/share/lra" "$work/evil/p/lib"
touch "$work/evil/x" "$work/evil/p/lib/liblra.a"
for bad in ../x "$work/evil/x"; do
  printf 'lib/liblra.a\n%s\nshare/lra/install_manifest.txt\n' "$bad" >"$work/evil/p/share/lra/install_manifest.txt"
  out="$(scripts/install.sh --uninstall "$work/evil/p" 2>&1)" && { echo "--uninstall followed '$bad'" >&2; exit 1; }
  if ! grep -qF "'$bad'" <<<"$out" || [ ! -e "$work/evil/x" ] || [ ! -e "$work/evil/p/lib/liblra.a" ] \
    || [ ! -e "$work/evil/p/share/lra/install_manifest.txt" ]; then
    echo "--uninstall of a manifest listing '$bad': '$out'" >&2; exit 1
  fi
done

say "plain C example (one flat parameter buffer)"
if have cc && have pkg-config; then
  pkg-config --exists lra
  # shellcheck disable=SC2046  # pkg-config output is a word list
  cc -std=c99 -Wall -Wextra -pedantic -Werror -O2 examples/c/flat_buffer.c \
    $(pkg-config --cflags --libs lra) -Wl,-rpath,"$prefix/lib" -lm -o "$work/flat_buffer"
  needed="$(readelf -d "$work/flat_buffer" | sed -n 's/.*(NEEDED).*\[\(liblra[^]]*\)\].*/\1/p')"
  if [ "$needed" != "$soname" ]; then
    echo "flat_buffer records '$needed' instead of the ABI name $soname" >&2
    exit 1
  fi
  "$work/flat_buffer"
  # The same program against the static library and lra.pc's Libs.private.
  # shellcheck disable=SC2046
  cc -std=c99 -O2 examples/c/flat_buffer.c $(pkg-config --cflags lra) "$prefix/lib/liblra.a" \
    $(pkg-config --static --libs lra | sed 's/-llra//') -lm -o "$work/flat_buffer_static"
  if readelf -d "$work/flat_buffer_static" | grep -q 'liblra'; then
    echo "flat_buffer_static still needs liblra.so" >&2
    exit 1
  fi
  "$work/flat_buffer_static" | tail -n 1
else
  skip "cc or pkg-config not found: the plain C example did not run"
fi

torch_dir=""
for d in "${Torch_DIR:-}" /usr/lib/*/cmake/Torch /usr/share/cmake/Torch /usr/local/share/cmake/Torch; do
  if [ -n "$d" ] && [ -f "$d/TorchConfig.cmake" ]; then
    torch_dir="$d"
    break
  fi
done

if have cmake && have c++; then
  say "C++ binding tests (find_package(lra))"
  cmake -S bindings/cpp/tests -B "$work/cpp-tests" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix${torch_dir:+;$torch_dir}" >"$work/cpp-tests.log" 2>&1 ||
    { cat "$work/cpp-tests.log"; exit 1; }
  cmake --build "$work/cpp-tests" -j "$jobs"
  "$work/cpp-tests/test_lra_hpp"
  "$work/cpp-tests/test_lra_hpp_static"
  "$work/cpp-tests/test_lra_hpp_dso"
  if have valgrind; then
    valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
      --show-leak-kinds=definite,indirect "$work/cpp-tests/test_lra_hpp_lifetime"
    echo "valgrind: no invalid accesses, no definite or indirect leaks"
  else
    "$work/cpp-tests/test_lra_hpp_lifetime"
    skip "valgrind is not installed: test_lra_hpp_lifetime ran without it, so a leaked or freed reduction went unseen (scripts/deps.sh installs it)"
  fi
  if [ -x "$work/cpp-tests/test_lra_torch" ]; then
    "$work/cpp-tests/test_lra_torch"
  else
    skip "LibTorch (TorchConfig.cmake) not found: lra_torch.hpp was not tested (install libtorch-dev)"
  fi

  if [ -n "$torch_dir" ]; then
    say "LibTorch digits MLP (find_package(lra COMPONENTS torch))"
    cmake -S examples/libtorch -B "$work/libtorch" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$prefix;$torch_dir" >"$work/libtorch.log" 2>&1 ||
      { cat "$work/libtorch.log"; exit 1; }
    cmake --build "$work/libtorch" -j "$jobs"
    for lr in 1e-4 1.0; do
      "$work/libtorch/digits_mlp" --data data/digits.csv.gz --optimizer adam --lr "$lr" \
        --epochs 20 --min-accuracy 0.9
    done
  else
    skip "LibTorch (TorchConfig.cmake) not found: the LibTorch digits trainer did not run (install libtorch-dev)"
  fi

  say "lra_torch.hpp with LRA_TORCH_CUDA, against the CUDA build of LibTorch in PyPI's torch wheel"
  rc=0
  bash scripts/torch-cuda-adapter.sh --wheel "$prefix/lib/liblra.so" "$prefix/include" || rc=$?
  case $rc in
    0) ;;
    2) skip "PyPI's torch wheel could not be downloaded (above): lra_torch.hpp's CUDA path (LRA_TORCH_CUDA) was not compiled, nor its tests run against a current LibTorch" ;;
    *) exit 1 ;;
  esac
else
  skip "cmake or a C++ compiler not found: C++ tests and the LibTorch trainer did not run"
fi

say "Python ctypes binding"
# ml_dtypes (numpy's bfloat16), where scripts/deps.sh installs it.
export PYTHONPATH="$CARGO_TARGET_DIR/python-deps${PYTHONPATH:+:$PYTHONPATH}"
torch_python=""
for py in /usr/bin/python3 python3; do
  if have "$py" && "$py" -c 'import torch' >/dev/null 2>&1; then
    torch_python="$py"
    break
  fi
done
py_for_tests="${torch_python:-python3}"
if have "$py_for_tests" && ! "$py_for_tests" -c 'import ml_dtypes' >/dev/null 2>&1; then
  skip "$py_for_tests cannot import ml_dtypes (scripts/deps.sh installs it into $CARGO_TARGET_DIR/python-deps): the Python binding's bfloat16 numpy test did not run"
fi
if [ -n "$torch_python" ]; then
  LRA_LIBRARY="$lib" "$torch_python" -m unittest -v bindings/python/test_lra.py
  say "GPU check script, dry run on the CPU (scripts/gpu_check_dryrun.py)"
  "$torch_python" scripts/gpu_check_dryrun.py "$lib"
elif have python3; then
  skip "no python3 with torch (Debian python3-torch): the torch training tests and the gpu_check.py dry run did not run"
  LRA_LIBRARY="$lib" python3 -m unittest -v bindings/python/test_lra.py
else
  skip "python3 not found: the Python binding did not run"
fi

say "Python package: pip install of bindings/python, used with the installed library"
pip_python=""
for py in /usr/bin/python3 python3; do
  if have "$py" && "$py" -m pip --version >/dev/null 2>&1 && "$py" -c 'import setuptools, wheel' >/dev/null 2>&1; then
    pip_python="$py"
    break
  fi
done
if [ -n "$pip_python" ]; then
  # Built from a copy: a build in the tree would leave build/ and *.egg-info there.
  mkdir "$work/pysrc"
  cp bindings/python/pyproject.toml bindings/python/lra.py "$work/pysrc/"
  "$pip_python" -m pip install -q --no-deps --no-build-isolation --no-index \
    --root-user-action=ignore --target "$work/site" "$work/pysrc"
  (cd "$work" && LRA_LIBRARY="$prefix/lib/liblra.so" PYTHONPATH="$work/site" \
    "$pip_python" - "$work/site" <<'PY'
import ctypes, glob, os, sys
import lra
assert lra.__file__.startswith(sys.argv[1]), f"imported {lra.__file__}, not the installed package"
dist = glob.glob(os.path.join(sys.argv[1], "lra-*.dist-info"))
assert dist == [os.path.join(sys.argv[1], f"lra-{lra.__version__}.dist-info")], dist
# one SGD step on a host buffer through the installed library
p = (ctypes.c_float * 2)(1.0, -1.0)
g = (ctypes.c_float * 2)(1.0, -1.0)
with lra.Optimizer("sgd", lr=0.5) as opt:
    opt.step([(ctypes.addressof(p), ctypes.addressof(g), 2, 0)], 1.0)
    info = opt.report_reeval(0.0)
assert list(p) == [0.5, -0.5], list(p)
print(f"pip-installed lra {lra.__version__} (library {lra.version()}): one step ok, eta {info.lr_before} -> {info.lr}")
PY
  )
else
  skip "no python3 with pip, setuptools and wheel (Debian python3-pip): the pip install of bindings/python did not run"
fi

say "all binding checks passed"
