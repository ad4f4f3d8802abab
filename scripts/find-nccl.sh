#!/usr/bin/env bash
# Prints the directories of the four PyPI wheels that building against the
# real NCCL needs, one a line: nvidia-nccl-cu12 (include/nccl.h,
# lib/libnccl.so.2), nvidia-cuda-runtime-cu12 (include/cuda_runtime.h,
# lib/libcudart.so.12), nvidia-cuda-cccl-cu12 (include/nv/target) and
# nvidia-cuda-nvcc-cu12 (include/crt/), from the first Python that has them
# all (python3, then /usr/bin/python3, as find-ptxas.sh looks). Exits 1 when
# none has. Used by scripts/stages/nccl.sh and scripts/gpu-check.sh --prepare.
for py in python3 /usr/bin/python3; do
  "$py" - 2>/dev/null <<'EOF' && exit 0
import os, sys
import nvidia.nccl, nvidia.cuda_runtime, nvidia.cuda_cccl, nvidia.cuda_nvcc
dirs = [list(m.__path__)[0] for m in
        (nvidia.nccl, nvidia.cuda_runtime, nvidia.cuda_cccl, nvidia.cuda_nvcc)]
need = [["include/nccl.h", "lib/libnccl.so.2"], ["include/cuda_runtime.h", "lib/libcudart.so.12"],
        ["include/nv/target"], ["include/crt/host_config.h"]]
for d, files in zip(dirs, need):
    if not all(os.path.exists(os.path.join(d, f)) for f in files):
        sys.exit(1)
print("\n".join(dirs))
EOF
done
exit 1
