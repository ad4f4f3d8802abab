#!/usr/bin/env bash
# Static proof of kernels/lra.ptx without a GPU (issue 3):
# - ptxas assembles it for sm_70, sm_80 and sm_90 with -Werror, and reports
#   0 bytes of stack and 0 bytes of spills for every entry;
# - assembling with --fmad=false gives the same cubin, byte for byte (so no
#   multiply-add contraction happened: every f32 add/sub/mul carries .rn);
# - the rounding lint (a Rust test: backend::cuda::abi::tests::
#   every_float_operation_rounds_to_nearest) runs with the cargo tests.
# One module serves every dtype, bf16 included (converted with exact integer
# operations), so "bf16 from sm_80" holds trivially: it assembles from sm_70.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! PTXAS=$(scripts/find-ptxas.sh); then
  printf '\n!!!! SKIPPED: ptx stage: no ptxas (install PyPI nvidia-cuda-nvcc-cu12, see scripts/deps.sh) !!!!\n'
  exit 0
fi
echo "ptxas: $PTXAS ($("$PTXAS" --version | tail -1))"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for ptx in kernels/*.ptx; do
  name=$(basename "$ptx" .ptx)
  for arch in sm_70 sm_80 sm_90; do
    log="$work/$name.$arch.log"
    if ! "$PTXAS" -arch "$arch" -Werror -v "$ptx" -o "$work/$name.$arch.cubin" >"$log" 2>&1; then
      echo "FAIL: $ptx for $arch:"; cat "$log"; status=1; continue
    fi
    "$PTXAS" -arch "$arch" -Werror --fmad=false "$ptx" -o "$work/$name.$arch.nofma.cubin"
    entries=$(grep -c 'Function properties for' "$log" || true)
    clean=$(grep -c '0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads' "$log" || true)
    regs=$(grep -o 'Used [0-9]* registers' "$log" | tr '\n' ' ')
    if [ "$entries" -eq 0 ] || [ "$entries" != "$clean" ]; then
      echo "FAIL: $ptx for $arch: stack or spills:"; cat "$log"; status=1
    elif ! cmp -s "$work/$name.$arch.cubin" "$work/$name.$arch.nofma.cubin"; then
      echo "FAIL: $ptx for $arch: --fmad=false changes the cubin (an operation was contracted)"; status=1
    else
      echo "ok: $ptx $arch: $entries entry, 0 stack, 0 spills, $regs, identical with --fmad=false"
    fi
  done
done
exit $status
