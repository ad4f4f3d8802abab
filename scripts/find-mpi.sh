#!/usr/bin/env bash
# Prints "WRAPPER MPIRUN" for MPI implementation $1 (openmpi or mpich) and
# compiler wrapper $2 (mpicc, mpifort): their Debian names (mpicc.openmpi,
# mpirun.mpich, ...), else the default names when `mpirun --version` says
# they are that implementation's. Exits 1 when there are none, so that a
# stage never runs one implementation's launcher with the other's flags.
set -u
impl=$1 wrapper=$2
case "$impl" in
  openmpi) says="Open MPI" ;;
  mpich) says="HYDRA" ;;
  *) echo "find-mpi.sh: unknown MPI implementation '$impl'" >&2; exit 2 ;;
esac
have() { command -v "$1" >/dev/null 2>&1; }
if have "$wrapper.$impl" && have "mpirun.$impl"; then
  echo "$wrapper.$impl mpirun.$impl"
elif have "$wrapper" && have mpirun && mpirun --version 2>&1 | grep -qi "$says"; then
  echo "$wrapper mpirun"
else
  exit 1
fi
