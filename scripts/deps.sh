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
    install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >>/tmp/lra-apt.log 2>&1; }
    : >/tmp/lra-apt.log
    apt-get update -q >>/tmp/lra-apt.log 2>&1 || echo "apt-get update failed (log: /tmp/lra-apt.log)"
    # One transaction is all or nothing: if it fails (one package missing
    # from this release or architecture), the packages one at a time, so one
    # bad name does not cost every other stage its tools.
    for lean in "" --no-install-recommends; do
      if [ -z "$lean" ]; then set -- "${need_apt[@]}"; else set -- "${need_lean[@]}"; fi
      [ $# -gt 0 ] || continue
      install $lean "$@" && continue
      for pkg in "$@"; do
        install $lean "$pkg" || { echo "apt-get could not install $pkg (log: /tmp/lra-apt.log)"; status=1; }
      done
    done
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
  echo "installing the Julia syntax, ccall and name checkers from PyPI (tree-sitter, tree-sitter-julia)"
  python3 -m pip install -q "tree-sitter>=0.23" "tree-sitter-julia>=0.23" >/tmp/lra-pip-ts.log 2>&1 \
    || { echo "pip install tree-sitter tree-sitter-julia failed (log: /tmp/lra-pip-ts.log)"; status=1; }
fi
# numpy has no bfloat16; the Python binding accepts ml_dtypes' one, tested
# with Debian's python3 (the one with torch). Installed beside the build,
# not into Debian's python (pip refuses that: PEP 668); scripts/stages/
# bindings.sh puts it on PYTHONPATH. ml_dtypes 0.5 needs numpy 1.25.
py_deps="${CARGO_TARGET_DIR:-target}/python-deps"
if /usr/bin/python3 -c 'import numpy' 2>/dev/null \
  && ! PYTHONPATH="$py_deps" /usr/bin/python3 -c 'import ml_dtypes' 2>/dev/null; then
  echo "installing ml_dtypes from PyPI into $py_deps (numpy's bfloat16 for the Python binding's test)"
  pin=$(/usr/bin/python3 -c 'import numpy; v = tuple(map(int, numpy.__version__.split(".")[:2])); print("ml_dtypes<0.5" if v < (1, 25) else "ml_dtypes")')
  /usr/bin/python3 -m pip install -q --no-deps --upgrade --target "$py_deps" "$pin" >/tmp/lra-pip-mld.log 2>&1 \
    && PYTHONPATH="$py_deps" /usr/bin/python3 -c 'import ml_dtypes' >>/tmp/lra-pip-mld.log 2>&1 \
    || { echo "ml_dtypes for /usr/bin/python3 failed (log: /tmp/lra-pip-mld.log)"; status=1; }
fi
exit $status
