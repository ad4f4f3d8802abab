#!/usr/bin/env bash
# Stage mpi: lra under MPI with the real engine (tests/mpi/lra_mpi_test.c,
# bindings/mpi/lra_mpi.h). For each case, 1 rank writes the reference
# trajectory and 2 ranks (data parallel, sharded, an empty shard, Polyak
# two-pass, failing callbacks) must reproduce its η decisions exactly and its
# parameters within f32 rounding; so must runs that checkpoint, recreate and
# restore every rank's handle mid-run. All of it under Open MPI and again under
# MPICH when installed. (The NCCL adapter has its own stage, nccl.sh.)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
skip() { printf '\n!!!! SKIPPED: %s !!!!\n' "$*"; }

lib_dir="${CARGO_TARGET_DIR:-$root/target}/release"
cargo build --release --lib # a no-op after scripts/test.sh's build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- MPI ---------------------------------------------------------------------
# Every case runs under each MPI implementation found (scripts/find-mpi.sh):
# Open MPI and MPICH, by their Debian names (mpicc.openmpi, mpicc.mpich, ...),
# else by the default names when they are that implementation's. The two
# differ in ABI (Open MPI's handles are pointers, MPICH's integers), which
# lra_mpi.h must compile against and pass through `user` unchanged.
have() { command -v "$1" >/dev/null 2>&1; }
zcat data/digits.csv.gz > "$work/digits.csv"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Shared memory only: every rank runs on this machine.
export OMPI_MCA_btl=self,vader

# The cases of tests/mpi/lra_mpi_test.c and the README's example trainer,
# built with the C compiler wrapper $2 and run with the launcher $3 (plus
# its options); $1 names the implementation in the output and the files.
suite() { # NAME MPICC MPIRUN...
  local name=$1 cc=$2 dir="$work/$1"
  shift 2
  local launch=("$@")
  mkdir "$dir"
  "$cc" -O2 -std=c11 -Wall -Wextra -Werror -I include -I bindings/mpi \
    tests/mpi/lra_mpi_test.c -L "$lib_dir" -llra -Wl,-rpath,"$lib_dir" -lm \
    -o "$dir/lra_mpi_test"
  run() { # NP MODE OPTIMIZER [restart]
    timeout 120 "${launch[@]}" -np "$1" \
      "$dir/lra_mpi_test" "$2" "$3" "$dir/ref-$2-$3.txt" "$work/digits.csv" ${4:+"$4"} || {
      echo "FAILED ($name): mpirun -np $1 lra_mpi_test $2 $3${4:+ $4} (exit $?; 124 = timed out: a hang)"
      exit 1
    }
  }
  for case in "dp adam" "dp momentum" "sharded adam" "sharded sgd" "empty adam" \
    "polyak sgd" "polyak momentum" "fail adam" "polyakfail momentum"; do
    # shellcheck disable=SC2086
    run 1 $case
    # shellcheck disable=SC2086
    run 2 $case
  done
  # Three ranks: uneven shards (4, 3 and 3 classes), and two empty shards.
  run 3 sharded adam
  run 3 empty adam
  run 2 poison adam
  # Per-rank checkpoints: every rank saves, recreates and restores its handle
  # twice (once with a step awaiting re-evaluation); same trajectory as above.
  run 2 sharded adam restart
  run 3 empty adam restart
  run 2 polyak momentum restart
  run 2 dp adam restart

  # The README's example trainer, both set-ups.
  "$cc" -O2 -std=c11 -Wall -Wextra -Werror -I include -I bindings/mpi bindings/mpi/example.c \
    -L "$lib_dir" -llra -Wl,-rpath,"$lib_dir" -lm -o "$dir/lra_mpi_example"
  for mode in dp sharded; do
    timeout 120 "${launch[@]}" -np 2 "$dir/lra_mpi_example" "$mode" | tail -1
  done
  echo "---- $name: every case passed"
}

ran=0
if read -r cc run < <(scripts/find-mpi.sh openmpi mpicc); then
  echo "==== Open MPI ($("$run" --version 2>&1 | head -1))"
  if have mpicxx; then # as C++ (the MPI C++ bindings left out)
    printf '#include "lra_mpi.h"\nlra_reduce_fn f = lra_mpi_allreduce_sum;\n' > "$work/mpi.cpp"
    mpicxx -std=c++17 -DOMPI_SKIP_MPICXX -DMPICH_SKIP_MPICXX -Wall -Wextra -Werror -fsyntax-only \
      -I include -I bindings/mpi "$work/mpi.cpp"
  fi
  suite openmpi "$cc" "$run" --allow-run-as-root --oversubscribe
  ran=$((ran + 1))
else
  skip "Open MPI not found (Debian: openmpi-bin libopenmpi-dev): lra_mpi.h was not run against Open MPI"
fi
if read -r cc run < <(scripts/find-mpi.sh mpich mpicc); then
  echo "==== MPICH ($("$run" --version 2>&1 | grep -m1 -i "version" | tr -s ' \t' ' '))"
  suite mpich "$cc" "$run"
  ran=$((ran + 1))
else
  skip "MPICH not found (Debian: mpich libmpich-dev): lra_mpi.h was not run against MPICH"
fi
echo "mpi stage passed ($ran MPI implementation(s))"
