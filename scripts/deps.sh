#!/usr/bin/env bash
# Installs the test suite's external needs when missing. Never fatal: each
# stage checks for what it uses and prints why it skips when it is absent.
set -u
need_apt=()
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v cc >/dev/null || need_apt+=(gcc)
command -v c++ >/dev/null || need_apt+=(g++)
command -v gfortran >/dev/null || need_apt+=(gfortran)
# A second Fortran compiler for the binding (scripts/stages/fortran.sh).
command -v flang-new-19 >/dev/null || command -v flang-new >/dev/null || need_apt+=(flang-19)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v mpirun.openmpi >/dev/null || command -v ompi_info >/dev/null || need_apt+=(openmpi-bin libopenmpi-dev)
# A second MPI implementation (another ABI), beside Open MPI, which stays the
# default mpicc/mpirun (Debian's alternatives rank it higher).
command -v mpirun.mpich >/dev/null || need_apt+=(mpich libmpich-dev)
/usr/bin/python3 -c 'import torch' 2>/dev/null || need_apt+=(python3-torch)
/usr/bin/python3 -c 'import numpy' 2>/dev/null || need_apt+=(python3-numpy)
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
[ -e /usr/include/torch/csrc/api/include/torch/torch.h ] || [ -n "$(find /usr/lib /usr/share -path '*Torch*Config.cmake' -print -quit 2>/dev/null)" ] || need_apt+=(libtorch-dev)
# A second C/C++ compiler (scripts/stages/c-abi.sh), without its recommends
# (the whole LLVM toolchain): installed on its own.
need_lean=()
command -v clang-19 >/dev/null || command -v clang >/dev/null || need_lean+=(clang-19)
status=0
if [ $((${#need_apt[@]} + ${#need_lean[@]})) -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]} ${need_lean[*]}"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -q \
      && { [ ${#need_apt[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"; } \
      && { [ ${#need_lean[@]} -eq 0 ] \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_lean[@]}"; }) \
      >/tmp/lra-apt.log 2>&1 \
      || { echo "apt-get failed (log: /tmp/lra-apt.log)"; tail -5 /tmp/lra-apt.log; status=1; }
  else
    echo "cannot install (${need_apt[*]} ${need_lean[*]}): not root or no apt-get"; status=1
  fi
fi
if ! scripts/find-ptxas.sh >/dev/null 2>&1; then
  echo "installing ptxas from PyPI (nvidia-cuda-nvcc-cu12)"
  python3 -m pip install -q nvidia-cuda-nvcc-cu12 >/tmp/lra-pip.log 2>&1 \
    || { echo "pip install nvidia-cuda-nvcc-cu12 failed (log: /tmp/lra-pip.log)"; status=1; }
fi
if ! python3 -c 'import tree_sitter, tree_sitter_julia' >/dev/null 2>&1; then
  echo "installing the Julia syntax checker from PyPI (tree-sitter, tree-sitter-julia)"
  python3 -m pip install -q "tree-sitter>=0.23" "tree-sitter-julia>=0.23" >/tmp/lra-pip-ts.log 2>&1 \
    || { echo "pip install tree-sitter tree-sitter-julia failed (log: /tmp/lra-pip-ts.log)"; status=1; }
fi
exit $status
