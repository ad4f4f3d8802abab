#!/usr/bin/env python3
"""lra on a GPU with PyTorch (run by scripts/gpu-check.sh; needs no Rust).

1. Drives lra through its C ABI (ctypes on liblra.so) with PyTorch CUDA
   tensors on a PyTorch side stream, for a small MLP trained with
   re-evaluation, and checks every step bit for bit against a host (device
   = 0) lra handle fed the same gradients; also the device found_inf flag.
2. Benchmarks the fused Adam step against a device-to-device copy of the
   same bytes and against torch.optim.Adam(fused=True), at 1M, 16M and 256M
   parameters in 1 and in 200 tensors, and prints a markdown table. Each
   lra row also gives the host's own time to enqueue one step: where it
   reaches the device time, the loop was host-bound (the 1M question).
3. With --baseline-lib (another build of lra, e.g. an earlier commit), times
   both libraries' fused step on the same tensors, alternating, and prints
   their ratios side by side (an A/B of a kernel change).
4. Under PyTorch's other allocators, each in a process of its own
   (PYTORCH_CUDA_ALLOC_CONF is read once): expandable segments (memory
   mapped through the virtual memory management API) and cudaMallocAsync
   (a stream-ordered pool): tensors larger than one mapping step bit for
   bit like the host backend, and a pointer whose memory the allocator gave
   back to the driver is refused, not stepped on.

Usage: gpu_check.py --lib path/to/liblra.so [--baseline-lib other/liblra.so]
                    [--cpu-selftest] [--quick] [--allocator-check]
CI runs these code paths on the CPU: scripts/gpu_check_dryrun.py.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import time
import traceback

import torch

ADAM, HOST, CUDA = 5, 0, 1
INVALID_ARGUMENT = 2  # lra_status (include/lra.h)
ALLOCATORS = ("expandable_segments:True", "backend:cudaMallocAsync")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class Lra:
    """This script's view of bindings/python/lra.py, the project's one ctypes
    binding (so the GPU run exercises it too)."""

    def __init__(self, path, module_name="lra"):
        # A fresh instance of the binding module per library, so two builds
        # of liblra (a baseline) can be loaded side by side.
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python", "lra.py")
        spec = importlib.util.spec_from_file_location(module_name, src)
        binding = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(binding)
        binding.load_library(os.path.abspath(path))
        self.b = binding

    def create(self, device, **fields):
        return self.b.Optimizer(fields.pop("optimizer", ADAM), device=device, **fields)

    def tensors(self, params, grads):
        arr = (self.b.Tensor * len(params))()
        for i, (p, g) in enumerate(zip(params, grads)):
            arr[i] = self.b.Tensor(p.data_ptr(), g.data_ptr(), p.numel(), DTYPES[p.dtype])
        return arr

    def step(self, h, arr, loss, stream=None, found_inf=None):
        h.step(arr, loss, 0.0, stream, found_inf)

    def reeval(self, h, loss_after):
        return h.report_reeval(loss_after)

    def destroy(self, h):
        h.close()


def bits(t):
    return t.detach().cpu().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def training_on_a_torch_stream(lra, device):
    """A small MLP trained by lra on a side stream; every step equals the
    host backend bit for bit (same gradients, same η decisions)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(device)
    params = list(model.parameters())
    host = [p.detach().cpu().clone() for p in params]
    x, y = torch.randn(512, 32, device=device), torch.randn(512, 1, device=device)
    hdev = lra.create(CUDA if device == "cuda" else HOST, lr=1e-2)
    hcpu = lra.create(HOST, lr=1e-2, num_threads=1)
    stream = torch.cuda.Stream() if device == "cuda" else None
    if stream is not None:
        # x, y (and the model) were written on the current stream; the side
        # stream is non-blocking, so it must wait for them explicitly.
        stream.wait_stream(torch.cuda.current_stream())
    first = last = None
    lrs = []
    with (torch.cuda.stream(stream) if stream is not None else _null()):
        for it in range(40):
            model.zero_grad(set_to_none=True)  # new gradient buffers every step
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            f = loss.item()
            first = f if first is None else first
            grads = [p.grad for p in params]
            raw = stream.cuda_stream if stream is not None else None
            lra.step(hdev, lra.tensors(params, grads), f, raw)
            hgrads = [g.detach().cpu().clone() for g in grads]
            lra.step(hcpu, lra.tensors(host, hgrads), f)
            with torch.no_grad():
                f_after = torch.nn.functional.mse_loss(model(x), y).item()
            a, b = lra.reeval(hdev, f_after), lra.reeval(hcpu, f_after)
            assert abs(a.phi - b.phi) <= 1e-6 * abs(b.phi), (it, a.phi, b.phi)
            assert (a.decision, a.lr) == (b.decision, b.lr), (it, a.decision, b.decision)
            for p, q in zip(params, host):
                assert torch.equal(bits(p), bits(q)), f"step {it}: parameters differ from the host backend"
            lrs.append(a.lr)
            last = f_after
    assert last < first, (first, last)
    # A set found_inf flag (device memory) makes the step a no-op.
    flag = torch.ones(1, device=device)
    before = [bits(p) for p in params]
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    lra.step(hdev, lra.tensors(params, [p.grad for p in params]), 1.0, None, flag.data_ptr())
    info = lra.reeval(hdev, 1.0)
    assert info.skip_reason == 3, info.skip_reason
    assert all(torch.equal(b, bits(p)) for b, p in zip(before, params))
    lra.destroy(hdev)
    lra.destroy(hcpu)
    print(f"torch-stream training: 40 steps bit-identical to the host backend, loss {first:.4f} -> {last:.4f}, "
          f"lr 1e-2 -> {lrs[-1]:.3g}; found_inf skip ok")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def torch_adapter(lra, device):
    """bindings/python's TorchOptimizer on `device` parameters (CUDA: the
    current stream): fresh .grad tensors, every tenth step a gradient in
    transposed layout (copied into the parameter's layout for the step),
    re-evaluation closure under no_grad; it must learn."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    x, y = torch.randn(256, 16, device=device), torch.randn(256, 1, device=device)
    opt = lra.b.TorchOptimizer(model.parameters(), optimizer="adam", lr=1e-4)
    loss_fn = torch.nn.functional.mse_loss
    first = loss_fn(model(x), y).item()
    weight = model[0].weight
    for i in range(150):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if i % 10 == 0:
            weight.grad = weight.grad.t().contiguous().t()
            assert not weight.grad.is_contiguous()
        opt.step(loss)
        opt.reeval(lambda: loss_fn(model(x), y))
    final = loss_fn(model(x), y).item()
    assert final < 0.5 * first, (first, final)
    assert opt.lr > 1e-4, opt.lr
    print(f"bindings/python TorchOptimizer on {device}: loss {first:.4f} -> {final:.4f}, lr 1e-4 -> {opt.lr:.3g}")
    opt.close()


def allocator_check(lra, device, n=24 << 20):
    """Three tensors of `n` parameters from PyTorch's allocator as configured
    (24M f32: 96 MB each, more than one 20 MiB expandable-segment mapping)
    take one Adam step bit-identical to a host handle's. On CUDA, a pointer
    into memory the allocator has given back to the driver (freed, then
    torch.cuda.empty_cache) must be refused with LRA_INVALID_ARGUMENT."""
    conf = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default"
    torch.manual_seed(2)
    params = [torch.randn(n, device=device) for _ in range(3)]
    grads = [torch.randn(n, device=device) for _ in range(3)]
    host = [p.detach().cpu().clone() for p in params]
    hgrads = [g.detach().cpu().clone() for g in grads]
    hdev = lra.create(CUDA if device == "cuda" else HOST, lr=1e-3)
    hcpu = lra.create(HOST, lr=1e-3)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else None
    lra.step(hdev, lra.tensors(params, grads), 1.0, stream)
    lra.step(hcpu, lra.tensors(host, hgrads), 1.0)
    for i, (p, q) in enumerate(zip(params, host)):
        assert torch.equal(bits(p), bits(q)), f"[{conf}] tensor {i} differs from the host backend"
    if device == "cuda":
        # The allocator the label names is the one that served the tensors.
        backend = torch.cuda.get_allocator_backend()
        want = "cudaMallocAsync" if "cudaMallocAsync" in conf else "native"
        assert backend == want, f"[{conf}] allocator backend is {backend}, not {want}"
        if "expandable_segments:True" in conf:
            segments = torch.cuda.memory_snapshot()
            if any("is_expandable" in seg for seg in segments):
                assert any(seg["is_expandable"] for seg in segments), f"[{conf}] no expandable segment"
    print(f"allocator [{conf}]: one Adam step over 3 x {n:,} parameters, bit-identical to the host backend",
          flush=True)
    lra.destroy(hcpu)
    if device == "cuda":
        # Made before the free, so that none of its own allocations can land
        # in the range given back. A fresh handle: hdev's layout (3 tensors)
        # would refuse a 1-tensor list for that reason alone.
        hstale = lra.create(CUDA, lr=1e-3)
        victim = torch.empty(n, device=device)
        # Its middle: expandable segments map and unmap whole 20 MiB pages,
        # and the victim's first page is shared with a live tensor (6 x 96
        # MiB is not a multiple of 20 MiB), so its first byte stays mapped.
        half = n // 2
        stale = victim.data_ptr() + 4 * half
        del victim
        torch.cuda.synchronize()
        try:
            try:
                reserved = torch.cuda.memory_reserved()
                torch.cuda.empty_cache()
                given_back = reserved - torch.cuda.memory_reserved()
            except RuntimeError as e:  # an allocator backend without these statistics
                given_back, why = 0, f"memory_reserved: {e}"
            else:
                why = f"empty_cache gave back {given_back} bytes, less than the freed tensor's {4 * n}"
            if given_back < 4 * n:
                print(f"allocator [{conf}]: stale pointer not checked ({why})")
            else:
                arr = (lra.b.Tensor * 1)(lra.b.Tensor(stale, grads[0].data_ptr(), n - half, 0))
                try:
                    lra.step(hstale, arr, 1.0, stream)
                except lra.b.LraError as e:
                    assert e.status == INVALID_ARGUMENT and "tensors[0].param" in e.message, e
                    print(f"allocator [{conf}]: a pointer into memory given back to the driver is refused "
                          f"(empty_cache gave back {given_back} bytes): {e.message}")
                else:
                    raise AssertionError(f"[{conf}] lra stepped on memory given back to the driver ({stale:#x})")
        finally:
            lra.destroy(hstale)
    lra.destroy(hdev)


def allocators(lib):
    """allocator_check under each of ALLOCATORS, each in a process of its own."""
    failed = []
    for conf in ALLOCATORS:
        # torch >= 2.9 reads PYTORCH_ALLOC_CONF first (PYTORCH_CUDA_ALLOC_CONF
        # only when it is unset); older torch reads only the latter.
        env = dict(os.environ, PYTORCH_ALLOC_CONF=conf, PYTORCH_CUDA_ALLOC_CONF=conf)
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "--lib", lib, "--allocator-check"]
        try:
            rc = subprocess.run(cmd, env=env, timeout=60).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout (60 s)"
        if rc != 0:
            failed.append(f"{conf}: {rc}")
    assert not failed, f"allocator checks failed: {failed}"


class Timing:
    """Median seconds per call: `device` between CUDA events on the current
    stream, `host` the caller's own time to enqueue the calls (perf_counter
    around the loop, before waiting). Where `host` reaches `device` the
    loop is host-bound and `device` measures the host, not the kernels."""

    def __init__(self, device, host):
        self.device, self.host = device, host


def timed(fn, iters, reps=5):
    """A `Timing` of `fn`, median over `reps` rounds of `iters` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dev, host = [], []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # One untimed call first: the device works on it while the host
        # prepares the first timed one, so `device` leaves out the host's
        # time to the first launch (torch's Adam over 200 tensors takes
        # ~0.55 ms of host time a step, docs/gpu-check-h200-final.log at
        # 16M; spread over 5 iterations at 256M, ~0.1 ms a step).
        fn()
        s.record()
        h0 = time.perf_counter()
        for _ in range(iters):
            fn()
        h1 = time.perf_counter()
        e.record()
        e.synchronize()
        dev.append(s.elapsed_time(e) * 1e-3 / iters)
        host.append((h1 - h0) / iters)
    dev.sort()
    host.sort()
    return Timing(dev[len(dev) // 2], host[len(host) // 2])


def split(n, k, device, fill):
    sizes = [n // k] * k
    sizes[-1] += n - sum(sizes)
    return [fill(s, device) for s in sizes]


def benchmark(lra, sizes, counts):
    dev = "cuda"
    stream = torch.cuda.current_stream().cuda_stream
    rows = {}
    fcopy = {}
    print()
    print("Times: median per step between CUDA events on the stream; host: the Python caller's own time per call "
          "(binding included); where host >= device the row is host-bound. GB/s: 28 B per parameter / time.")
    print("| parameters | tensors | lra fused (guard off) | copy, same bytes | lra / copy bandwidth | lra (guard on) "
          "| torch Adam fused | torch time / lra time | host per call: lra (guard off), torch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        iters = max(5, min(200, (200 << 20) // n))
        for k in counts:
            g = torch.Generator(device=dev).manual_seed(1)
            params = split(n, k, dev, lambda s, d: torch.randn(s, device=d, generator=g))
            grads = split(n, k, dev, lambda s, d: torch.randn(s, device=d, generator=g))
            arr = lra.tensors(params, grads)
            t = {}
            for guard in (0, 1):
                h = lra.create(CUDA, lr=1e-6, check_finite=guard)
                timing = timed(lambda: lra.step(h, arr, 1.0, stream), iters)
                t[guard] = timing.device
                if guard == 0:
                    host = timing.host
                lra.destroy(h)
            # Adam fp32 fused step moves 28 B per parameter (read θ, g, m, v;
            # write θ, m, v): a copy of 14 B per parameter moves the same.
            src = torch.empty(14 * n, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            t_copy = timed(lambda: dst.copy_(src), iters).device
            del src, dst
            # Placement control, first side: copies every gradient into a
            # fresh tensor of the same shape (the other side, in
            # contiguous_views, copies 200 views of one buffer).
            t_fcopy = foreach_copy_time(grads, iters) if k > 1 else None
            tp = [p.clone().requires_grad_(True) for p in params]
            for p, gr in zip(tp, grads):
                p.grad = gr.clone()
            opt = torch.optim.Adam(tp, lr=1e-6, betas=(0.5, 0.999), fused=True)
            torch_timing = timed(opt.step, iters)
            t_torch = torch_timing.device
            del opt, tp, params, grads, arr
            torch.cuda.empty_cache()
            bw = 28 * n / t[0] / 1e9
            rows[(n, k)] = t
            fcopy[(n, k)] = t_fcopy
            print(f"| {n >> 20}M | {k} | {t[0] * 1e6:.1f} us ({bw:.0f} GB/s) | {t_copy * 1e6:.1f} us "
                  f"({28 * n / t_copy / 1e9:.0f} GB/s) | {t_copy / t[0]:.3f} | {t[1] * 1e6:.1f} us "
                  f"| {t_torch * 1e6:.1f} us | {t_torch / t[0]:.3f} | {host * 1e6:.1f} us, "
                  f"{torch_timing.host * 1e6:.1f} us |", flush=True)
    print()
    for n in sizes:
        if (n, 1) in rows and (n, 200) in rows:
            r = rows[(n, 200)][0] / rows[(n, 1)][0]
            print(f"{n >> 20}M parameters: 200 tensors / 1 tensor (fused, guard off) = {r:.3f}")
            # The same 200 tensors as views into one contiguous buffer per
            # array: separates lra's per-tensor cost from the spread of the
            # caller's separate allocations.
            views, views_fcopy = contiguous_views(lra, n, 200, stream)
            print(f"{n >> 20}M parameters: 200 views of one buffer / 1 tensor (fused, guard off) = "
                  f"{views / rows[(n, 1)][0]:.3f}")
            if fcopy[(n, 200)] and views_fcopy:
                # Same tensor count and sizes on both sides, so the same
                # grid: only where the 200 gradients lie differs. (Torch's
                # multi-tensor apply gives each tensor its own 65536-element
                # chunks, one block each: 1 tensor of 1M makes 16 blocks,
                # 200 tensors 200, so 200 against 1 compares grids.)
                print(f"{n >> 20}M parameters: placement control, torch._foreach_copy_ of 200 separate "
                      f"allocations / of 200 views of one buffer (no lra) = {fcopy[(n, 200)] / views_fcopy:.3f}")
    return rows


def foreach_copy_time(tensors, iters, dst=None):
    """Seconds per `torch._foreach_copy_` of `tensors` into `dst` (default:
    fresh tensors of the same shapes), or None where this torch lacks it."""
    if not hasattr(torch, "_foreach_copy_"):
        print("note: this torch has no _foreach_copy_; placement control skipped")
        return None
    if dst is None:
        dst = [torch.empty_like(t) for t in tensors]
    t = timed(lambda: torch._foreach_copy_(dst, tensors), iters).device
    del dst
    return t


def contiguous_views(lra, n, k, stream):
    g = torch.Generator(device="cuda").manual_seed(1)
    flat_p = torch.randn(n, device="cuda", generator=g)
    flat_g = torch.randn(n, device="cuda", generator=g)
    sizes = [n // k] * k
    sizes[-1] += n - sum(sizes)
    # Cut at multiples of 4 elements so every view keeps 16-byte alignment.
    sizes = [s - s % 4 for s in sizes[:-1]]
    sizes.append(n - sum(sizes))
    params = list(torch.split(flat_p, sizes))
    grads = list(torch.split(flat_g, sizes))
    iters = max(5, min(200, (200 << 20) // n))
    h = lra.create(CUDA, lr=1e-6, check_finite=0)
    arr = lra.tensors(params, grads)
    t = timed(lambda: lra.step(h, arr, 1.0, stream), iters).device
    lra.destroy(h)
    # The placement control's other side: the same copy with source and
    # destination each 200 views of one buffer.
    flat_d = torch.empty_like(flat_g)
    t_fcopy = foreach_copy_time(grads, iters, list(torch.split(flat_d, sizes)))
    del flat_p, flat_g, flat_d, params, grads, arr
    torch.cuda.empty_cache()
    return t, t_fcopy


def compare_libraries(lra, base, sizes, counts):
    """The fused step of two builds of lra on the same tensors, with the
    non-finite guard off and on, timed alternately (new, baseline, new, ...)
    so both see the same conditions; prints times and ratios."""
    stream = torch.cuda.current_stream().cuda_stream
    print()
    print("A/B against the baseline library (fused Adam; medians of alternating rounds)")
    print("| parameters | tensors | guard | this lra | baseline | time this / baseline (< 1: this faster) "
          "| host per call: this, baseline |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    per = {}
    for n in sizes:
        iters = max(5, min(200, (200 << 20) // n))
        for k in counts:
            g = torch.Generator(device="cuda").manual_seed(1)
            params = split(n, k, "cuda", lambda s, d: torch.randn(s, device=d, generator=g))
            grads = split(n, k, "cuda", lambda s, d: torch.randn(s, device=d, generator=g))
            for guard in (0, 1):
                times = {}
                for name, lib in (("this", lra), ("base", base)):
                    h = lib.create(CUDA, lr=1e-6, check_finite=guard)
                    times[name] = (lib, h, lib.tensors(params, grads), [])
                for _ in range(5):
                    for name, (lib, h, arr, out) in times.items():
                        out.append(timed(lambda: lib.step(h, arr, 1.0, stream), iters, reps=1))
                med, host = {}, {}
                for name, (lib, h, arr, out) in times.items():
                    lib.destroy(h)
                    med[name] = sorted(x.device for x in out)[len(out) // 2]
                    host[name] = sorted(x.host for x in out)[len(out) // 2]
                per[(n, k, guard)] = med
                del times
                print(f"| {n >> 20}M | {k} | {'on' if guard else 'off'} | {med['this'] * 1e6:.1f} us "
                      f"| {med['base'] * 1e6:.1f} us | {med['this'] / med['base']:.3f} "
                      f"| {host['this'] * 1e6:.1f} us, {host['base'] * 1e6:.1f} us |", flush=True)
            del params, grads
            torch.cuda.empty_cache()
    for n in sizes:
        for guard in (0, 1):
            if (n, 1, guard) in per and (n, 200, guard) in per:
                a, b = (per[(n, 200, guard)][x] / per[(n, 1, guard)][x] for x in ("this", "base"))
                print(f"{n >> 20}M parameters, guard {'on' if guard else 'off'}: 200 tensors / 1 tensor: "
                      f"this lra {a:.3f}, baseline {b:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--cpu-selftest", action="store_true", help="check the ctypes binding on a host handle")
    ap.add_argument("--quick", action="store_true", help="benchmark 1M and 16M only")
    ap.add_argument("--baseline-lib", help="another liblra.so to compare the fused step with")
    ap.add_argument("--allocator-check", action="store_true",
                    help="only the allocator check, under PYTORCH_CUDA_ALLOC_CONF as set (part 4)")
    a = ap.parse_args()
    lra = Lra(a.lib)
    if a.cpu_selftest:
        training_on_a_torch_stream(lra, "cpu")
        return
    if a.allocator_check:
        # Without CUDA (scripts/gpu_check_dryrun.py runs this path): tiny
        # tensors on the CPU.
        if torch.cuda.is_available():
            allocator_check(lra, "cuda")
        else:
            allocator_check(lra, "cpu", n=1 << 12)
        return
    if not torch.cuda.is_available():
        print("!!!! SKIPPED: gpu_check.py: torch sees no CUDA device")
        sys.exit(1 if os.environ.get("LRA_REQUIRE_GPU") else 0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    t0 = time.time()
    failed = []

    def part(name, fn, *args):
        # One lent GPU run must bring back every figure: a failed check
        # does not stop the benchmarks after it (the exit status says it).
        try:
            fn(*args)
        except Exception:
            traceback.print_exc()
            print(f"!!!! FAILED: {name} (the parts after it still run) !!!!", flush=True)
            failed.append(name)

    part("torch-stream training", training_on_a_torch_stream, lra, "cuda")
    part("TorchOptimizer on CUDA", torch_adapter, lra, "cuda")
    sizes = [1 << 20, 16 << 20] + ([] if a.quick else [256 << 20])
    part("benchmark", benchmark, lra, sizes, [1, 200])
    if a.baseline_lib:
        part("A/B against the baseline", lambda: compare_libraries(lra, Lra(a.baseline_lib, "lra_baseline"),
                                                                 sizes, [1, 200]))
    part("PyTorch's allocators", allocators, a.lib)
    print(f"\ngpu_check.py finished in {time.time() - t0:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
