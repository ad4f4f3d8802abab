#!/usr/bin/env bash
# Prints the path of a ptxas (PATH first, then the PyPI nvidia-cuda-nvcc-cu12 wheel).
command -v ptxas && exit 0
for py in python3 /usr/bin/python3; do
  d=$($py -c 'import nvidia.cuda_nvcc as m; print(list(m.__path__)[0])' 2>/dev/null) || continue
  [ -x "$d/bin/ptxas" ] && { echo "$d/bin/ptxas"; exit 0; }
done
exit 1
