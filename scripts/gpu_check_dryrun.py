#!/usr/bin/env python3
"""CI dry run of scripts/gpu_check.py: no GPU needed.

A lent GPU is rare and its time short, so a typo in the GPU script's
benchmark code must fail CI, not the GPU run. This runs the script's own
functions (the ctypes binding on a torch stream, the TorchOptimizer
adapter, the allocator check's step, the benchmark table, the A/B of two libraries) on the CPU: host (device = 0) handles, CPU tensors,
CUDA events replaced by perf_counter stamps, tiny sizes. The figures mean
nothing; the check is that every code path runs and prints its rows.

Usage: python3 scripts/gpu_check_dryrun.py path/to/liblra.so [baseline/liblra.so]

With a second library, the A/B loads it as the baseline (as the GPU run's
--baseline-lib does), so a binding that asks an older build for a symbol it
lacks fails here; without one, the library is its own baseline.
"""
import contextlib
import io
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402


class HostEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def on_cpu(factory):
    def make(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return make


class TorchOnCpu:
    """torch with the factories gpu_check calls with device="cuda" on the CPU."""

    randn = staticmethod(on_cpu(torch.randn))
    empty = staticmethod(on_cpu(torch.empty))
    Generator = staticmethod(on_cpu(torch.Generator))

    def __getattr__(self, name):
        return getattr(torch, name)


def patch_cuda_away():
    torch.cuda.Event = HostEvent
    torch.cuda.synchronize = lambda: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.current_stream = lambda: types.SimpleNamespace(cuda_stream=None)
    # Only gpu_check's own torch.* factories move to the CPU: replacing
    # torch.Generator in torch itself breaks torch 2.x modules that import
    # later and annotate with it (torch.distributed, via fused Adam).
    gpu_check.torch = TorchOnCpu()
    adam = torch.optim.Adam
    # Fused Adam on the CPU needs a newer torch than Debian's.
    torch.optim.Adam = lambda *a, **k: adam(*a, **{**k, "fused": False})
    if not hasattr(torch, "_foreach_copy_"):
        # Debian's torch predates it; the placement control's code still runs.
        torch._foreach_copy_ = lambda dst, src: [d.copy_(s) for d, s in zip(dst, src)]
    gpu_check.CUDA = gpu_check.HOST


def main():
    lib = sys.argv[1]
    patch_cuda_away()
    lra = gpu_check.Lra(lib)
    base = gpu_check.Lra(sys.argv[2] if len(sys.argv) > 2 else lib, "lra_baseline")
    gpu_check.training_on_a_torch_stream(lra, "cpu")
    gpu_check.torch_adapter(lra, "cpu")
    gpu_check.allocator_check(lra, "cpu", n=1 << 12)
    gpu_check.allocators(lib)  # the subprocess path: argv, environment, exit status
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = gpu_check.benchmark(lra, [1 << 12], [1, 200])
        gpu_check.compare_libraries(lra, base, [1 << 12], [1, 200])
    text = out.getvalue()
    print(text)
    table_rows = [line for line in text.splitlines() if line.startswith("| 0M |")]
    assert len(table_rows) == 6, "expected 2 benchmark rows and 4 A/B rows (guard off and on)"
    assert all(t > 0 for r in rows.values() for t in r.values()), rows
    for needle in ("200 tensors / 1 tensor (fused, guard off)", "200 views of one buffer",
                   "placement control, torch._foreach_copy_", "guard off: 200 tensors / 1 tensor: this lra",
                   "guard on: 200 tensors / 1 tensor: this lra"):
        assert needle in text, needle
    print("gpu_check.py dry run on the CPU: every benchmark path ran (figures meaningless here)")


if __name__ == "__main__":
    main()
