"""torch.optim reference for tests/conformance_torch.rs.

Reads a little-endian binary file: u32 optimizer, u32 n, u32 steps, f64 lr,
then n f32 initial parameters and steps*n f32 gradients. Runs the matching
torch.optim optimizer (lra's defaults: beta/beta1 = 0.5) and writes the n
f32 parameters after each step (steps*n f32) to the output path.
"""
import struct
import sys

import torch

src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    kind, n, steps = struct.unpack("<III", f.read(12))
    (lr,) = struct.unpack("<d", f.read(8))
    p0 = torch.frombuffer(bytearray(f.read(4 * n)), dtype=torch.float32)
    grads = torch.frombuffer(bytearray(f.read(4 * n * steps)), dtype=torch.float32).reshape(steps, n)

p = torch.nn.Parameter(p0.clone())
make = {
    0: lambda: torch.optim.SGD([p], lr=lr),
    1: lambda: torch.optim.SGD([p], lr=lr, momentum=0.5),
    2: lambda: torch.optim.SGD([p], lr=lr, momentum=0.5, nesterov=True),
    3: lambda: torch.optim.Adagrad([p], lr=lr, eps=1e-10),
    4: lambda: torch.optim.RMSprop([p], lr=lr, alpha=0.99, eps=1e-8),
    5: lambda: torch.optim.Adam([p], lr=lr, betas=(0.5, 0.999), eps=1e-8),
    6: lambda: torch.optim.AdamW([p], lr=lr, betas=(0.5, 0.999), eps=1e-8, weight_decay=1e-2),
}
opt = make[kind]()
out = []
for k in range(steps):
    p.grad = grads[k].clone()
    opt.step()
    out.append(p.detach().clone())
with open(dst, "wb") as f:
    f.write(torch.stack(out).numpy().astype("<f4").tobytes())
