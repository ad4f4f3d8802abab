#!/usr/bin/env bash
# Stage "fortran": proves the Fortran binding (bindings/fortran/lra.f90).
#  1. static check: gfortran -fc-prototypes of the module against include/lra.h
#     (every function, argument and its name, const-ness, struct field,
#     constant), with a
#     self-test that injected drift is caught;
#  2. layout: sizes and field offsets of the bind(C) types (gfortran) equal
#     the C structs' (cc, offsetof);
#  3. examples/fortran/flat_buffer.f90 built with -std=f2008 -Wall -Wextra
#     -Werror -fcheck=all against target/release and run: Adam from eta 1e-5
#     and 1.0 on one flat buffer, every lra function, error paths, a Fortran
#     reduction callback, a bit-identical checkpoint resume (exits non-zero
#     on any failure); then once more under valgrind; then
#     tests/fortran/strided_tensor.f90: strided arrays stop with lra's message;
#  4. the same example built the README's way against an installed prefix
#     (scripts/install.sh, PREFIX/include/lra.f90, pkg-config), then with LLVM
#     flang when installed (module with -pedantic -Werror, layout, example,
#     strided arrays);
#  5. MPI (Open MPI and MPICH, each by its Debian names mpifort.openmpi /
#     mpifort.mpich or by the default names): bindings/fortran/lra_mpi.f90's callback
#     checked against lra.h (check_interfaces.py --mpi, with a self-test), then
#     examples/fortran/mpi_data_parallel.f90 run with mpirun -np 1 (writes the
#     reference trajectories) and -np 2 and 3 (must reproduce them: data
#     parallel and sharded, failing reductions, a real MPI error, per-rank
#     checkpoint restarts); once more built from the installed prefix; then
#     all of it again with MPICH (mpifort.mpich, mpirun.mpich) when installed.
# Uses target/ (or $CARGO_TARGET_DIR); prints "!!!! SKIPPED:" for a missing dependency.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
case "$CARGO_TARGET_DIR" in /*) ;; *) CARGO_TARGET_DIR="$root/$CARGO_TARGET_DIR" ;; esac
lib="$CARGO_TARGET_DIR/release"

say() { printf -- '---- fortran: %s\n' "$*"; }
skip() { printf '\n!!!! SKIPPED: %s !!!!\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }

fc="${FC:-gfortran}"
if ! have "$fc"; then
  skip "$fc not found: the Fortran binding was not compiled or run (apt-get install gfortran; scripts/deps.sh does)"
  exit 0
fi
cargo build --release --lib # a no-op after scripts/test.sh's build; current when run alone

work="$(mktemp -d "${TMPDIR:-/tmp}/lra-fortran.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# -finit-*: integers nobody set (derived-type fields too) read -77777, so a
# helper that forgets one of its result's fields fails the example. (It
# also makes a forgotten type(c_ptr) NULL: the installed-prefix build below,
# without these flags, is the one where a helper's missing NULL shows.)
fflags=(-std=f2008 -Wall -Wextra -Werror -fcheck=all -finit-derived -finit-integer=-77777 -O1 -g)
# shellcheck disable=SC2054  # -Wl,-rpath,DIR is one word
link=(-L"$lib" -llra -Wl,-rpath,"$lib")

say "static check of lra.f90 against include/lra.h ($("$fc" --version | head -n 1))"
if have python3; then
  FC="$fc" python3 bindings/fortran/check_interfaces.py --self-test
else
  skip "python3 not found: the static interface check of lra.f90 did not run"
fi

say "module lra (bindings/fortran/lra.f90)"
"$fc" "${fflags[@]}" -J "$work" -c bindings/fortran/lra.f90 -o "$work/lra.o"

say "struct layout: gfortran bind(C) types vs the C compiler's lra.h structs"
if have cc; then
  cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude bindings/fortran/layout.c -o "$work/layout_c"
  # lra.o's helpers call into liblra (lra_set_reduction_proc): link it.
  "$fc" "${fflags[@]}" -I"$work" bindings/fortran/layout.f90 "$work/lra.o" "${link[@]}" -o "$work/layout_f"
  "$work/layout_c" >"$work/layout_c.txt"
  "$work/layout_f" >"$work/layout_f.txt"
  if ! diff -u "$work/layout_c.txt" "$work/layout_f.txt"; then
    echo "the Fortran types' layout differs from lra.h's structs (- C, + Fortran)" >&2
    exit 1
  fi
  echo "$(grep -c '^sizeof' "$work/layout_c.txt") structs, $(grep -vc '^sizeof' "$work/layout_c.txt") fields: same sizes and offsets"
else
  skip "cc not found: the Fortran/C layout comparison did not run"
fi

say "example: examples/fortran/flat_buffer.f90 against $lib"
"$fc" "${fflags[@]}" -I"$work" -J "$work" examples/fortran/flat_buffer.f90 "$work/lra.o" "${link[@]}" -o "$work/flat_buffer"
"$work/flat_buffer"
if have valgrind; then
  valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect "$work/flat_buffer" >/dev/null
  echo "valgrind: no invalid accesses, no definite or indirect leaks"
else
  skip "valgrind is not installed: the example did not run under valgrind (scripts/deps.sh installs it)"
fi

# tests/fortran/strided_tensor.f90 built as $1: dense arrays are accepted,
# and each strided case stops with lra_tensor_*'s message (flang accepted a
# strided pointer where the dummies were CONTIGUOUS, and lra stepped the
# wrong elements).
strided_tensors_refused() {
  "$1" dense
  local case out
  for case in f32 f32-grad 16; do
    if out="$("$1" "$case" 2>&1)"; then
      echo "strided_tensor $case: a strided array was accepted" >&2
      exit 1
    fi
    if ! grep -q "is strided (not contiguous)" <<<"$out"; then
      echo "strided_tensor $case: not stopped by lra's contiguity check: $out" >&2
      exit 1
    fi
  done
  echo "strided arrays: each stopped with lra_tensor_*'s message"
}

say "tests/fortran/strided_tensor.f90: strided arrays are refused"
"$fc" "${fflags[@]}" -I"$work" -J "$work" tests/fortran/strided_tensor.f90 "$work/lra.o" "${link[@]}" -o "$work/strided_tensor"
strided_tensors_refused "$work/strided_tensor"

say "example built against an installed prefix (scripts/install.sh, include/lra.f90, pkg-config)"
if have pkg-config && have objdump; then
  prefix="$work/prefix"
  LRA_SKIP_BUILD=1 scripts/install.sh "$prefix" >/dev/null
  mkdir "$work/app"
  (
    cd "$work/app"
    # shellcheck disable=SC2030  # set for this subshell only
    export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
    "$fc" -c "$prefix/include/lra.f90"
    # shellcheck disable=SC2046  # pkg-config output is a word list
    "$fc" "$root/examples/fortran/flat_buffer.f90" lra.o $(pkg-config --libs lra) \
      -Wl,-rpath,"$prefix/lib" -o flat_buffer
  )
  "$work/app/flat_buffer" | tail -n 1
else
  skip "pkg-config or objdump not found: the installed-prefix build did not run"
fi

# A second compiler: LLVM flang (another front end, another runtime and .mod
# format; Open MPI's and MPICH's mpi_f08 modules are gfortran's, so the MPI
# module stays gfortran's).
flang=""
for cand in flang-new flang-new-19 flang; do
  if have "$cand" && "$cand" --version 2>/dev/null | grep -qi flang; then
    flang=$cand
    break
  fi
done
say "LLVM flang: module lra, struct layout, examples/fortran/flat_buffer.f90, strided arrays${flang:+ ($("$flang" --version | head -n 1))}"
if [ -n "$flang" ]; then
  fl="$work/flang"
  mkdir "$fl"
  flflags=(-pedantic -Werror -O1)
  "$flang" "${flflags[@]}" -module-dir "$fl" -c bindings/fortran/lra.f90 -o "$fl/lra.o"
  if [ -x "$work/layout_c" ]; then
    "$flang" "${flflags[@]}" -I"$fl" -module-dir "$fl" bindings/fortran/layout.f90 "$fl/lra.o" "${link[@]}" -o "$fl/layout_f"
    "$fl/layout_f" >"$fl/layout_f.txt"
    if ! diff -u "$work/layout_c.txt" "$fl/layout_f.txt"; then
      echo "flang: the Fortran types' layout differs from lra.h's structs (- C, + Fortran)" >&2
      exit 1
    fi
    echo "flang: same sizes and offsets as the C structs"
  else
    skip "cc not found: flang's layout comparison did not run"
  fi
  "$flang" "${flflags[@]}" -I"$fl" -module-dir "$fl" examples/fortran/flat_buffer.f90 "$fl/lra.o" "${link[@]}" \
    -o "$fl/flat_buffer"
  "$fl/flat_buffer" | tail -n 1
  "$flang" "${flflags[@]}" -I"$fl" -module-dir "$fl" tests/fortran/strided_tensor.f90 "$fl/lra.o" "${link[@]}" \
    -o "$fl/strided_tensor"
  strided_tensors_refused "$fl/strided_tensor"
else
  skip "no LLVM flang (Debian: flang-19): the Fortran binding was built and run with gfortran only"
fi

# lra_mpi.f90 and examples/fortran/mpi_data_parallel.f90 built with the
# Fortran wrapper $2 (its own lra.mod: FC may name another compiler) and run
# with the launcher $3 (plus its options) on 1, 2 and 3 ranks; $1 names the
# MPI implementation.
mpi_suite() { # NAME MPIFORT MPIRUN...
  local name=$1 mpifort=$2 mpi="$work/mpi-$1"
  shift 2
  local launch=("$@")
  mkdir "$mpi" "$mpi/ref"
  "$mpifort" "${fflags[@]}" -J "$mpi" -c bindings/fortran/lra.f90 -o "$mpi/lra.o"
  "$mpifort" "${fflags[@]}" -I"$mpi" -J "$mpi" -c bindings/fortran/lra_mpi.f90 -o "$mpi/lra_mpi.o"
  if have python3; then
    FC_MPI="$mpifort" python3 bindings/fortran/check_interfaces.py --mpi "$mpi" --self-test
  else
    skip "python3 not found: the static interface check of lra_mpi.f90 did not run"
  fi
  "$mpifort" "${fflags[@]}" -I"$mpi" -J "$mpi" examples/fortran/mpi_data_parallel.f90 "$mpi/lra_mpi.o" "$mpi/lra.o" \
    "${link[@]}" -o "$mpi/mpi_data_parallel"
  mpi_run() { # NP PROGRAM
    timeout 120 "${launch[@]}" -np "$1" "$2" "$mpi/ref" || {
      echo "FAILED ($name): mpirun -np $1 $2 (exit $?; 124 = timed out: a hang)" >&2
      exit 1
    }
  }
  for np in 1 2 3; do
    echo "$name: mpirun -np $np mpi_data_parallel:"
    mpi_run "$np" "$mpi/mpi_data_parallel"
  done
}

say "MPI (Open MPI): bindings/fortran/lra_mpi.f90, examples/fortran/mpi_data_parallel.f90"
if read -r ompi_fort ompi_run < <(scripts/find-mpi.sh openmpi mpifort); then
  # As scripts/stages/mpi.sh runs Open MPI: as root if need be, shared memory only.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader
  mpi_suite openmpi "$ompi_fort" "$ompi_run" --allow-run-as-root --oversubscribe
  if [ -d "${prefix:-}" ]; then
    echo "built from the installed prefix (include/lra.f90, include/lra_mpi.f90), mpirun -np 2:"
    (
      cd "$work/app"
      # shellcheck disable=SC2031  # set for this subshell only
      export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
      "$ompi_fort" -c "$prefix/include/lra.f90" "$prefix/include/lra_mpi.f90"
      # shellcheck disable=SC2046  # pkg-config output is a word list
      "$ompi_fort" "$root/examples/fortran/mpi_data_parallel.f90" lra_mpi.o lra.o $(pkg-config --libs lra) \
        -Wl,-rpath,"$prefix/lib" -o mpi_data_parallel
    )
    timeout 120 "$ompi_run" --allow-run-as-root --oversubscribe -np 2 "$work/app/mpi_data_parallel" \
      "$work/mpi-openmpi/ref" | tail -n 1 || {
      echo "FAILED: mpirun -np 2 of the installed prefix's build (exit $?)" >&2
      exit 1
    }
  fi
else
  skip "Open MPI's mpifort/mpirun not found (Debian: openmpi-bin libopenmpi-dev): lra_mpi.f90 was not compiled or run against Open MPI"
fi

# MPICH: another MPI ABI (integer handles) and its own mpi_f08 module.
say "MPI (MPICH): the same with MPICH's mpifort and mpirun"
if read -r mpich_fort mpich_run < <(scripts/find-mpi.sh mpich mpifort); then
  mpi_suite mpich "$mpich_fort" "$mpich_run"
else
  skip "MPICH's mpifort/mpirun not found (Debian: mpich libmpich-dev): lra_mpi.f90 was not compiled or run against MPICH"
fi

say "all Fortran checks passed"
