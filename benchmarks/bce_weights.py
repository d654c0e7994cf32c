"""Binary cross-entropy (with logits) with broadcast weights against PyTorch, one core.

Run:  python benchmarks/bce_weights.py
10M float32 elements (1000 x 10000); best of 5; xent_fast on backend="cpu" and PyTorch
with one thread, in the same process.
"""
import time, numpy as np, xent_fast as xf
rng = np.random.default_rng(0)
x = rng.standard_normal((1000, 10000)).astype(np.float32); y = rng.random((1000, 10000)).astype(np.float32)
wb = rng.random((1, 10000)).astype(np.float32); wf = np.ascontiguousarray(np.broadcast_to(wb, x.shape)); pw = rng.random(10000).astype(np.float32)
for name, f in [("none", lambda: xf.binary_cross_entropy_with_logits(x, y, backend="cpu")),
                ("w full C", lambda: xf.binary_cross_entropy_with_logits(x, y, weight=wf, backend="cpu")),
                ("w bcast", lambda: xf.binary_cross_entropy_with_logits(x, y, weight=wb, backend="cpu")),
                ("pw bcast", lambda: xf.binary_cross_entropy_with_logits(x, y, pos_weight=pw, backend="cpu")),
                ("w bcast grad", lambda: xf.binary_cross_entropy_with_logits(x, y, weight=wb, return_grad=True, backend="cpu"))]:
    f(); r = []
    for _ in range(5):
        t0 = time.perf_counter(); f(); r.append(time.perf_counter() - t0)
    r.sort(); print(f"{name} {r[0]*1e3:.1f}", end=" | ")
import torch
X, Y, W, PW = map(torch.from_numpy, (x, y, wb, pw))
torch.set_num_threads(1)
for name, f in [("torch w", lambda: torch.nn.functional.binary_cross_entropy_with_logits(X, Y, weight=W)), ("torch pw", lambda: torch.nn.functional.binary_cross_entropy_with_logits(X, Y, pos_weight=PW))]:
    f(); r = []
    for _ in range(5):
        t0 = time.perf_counter(); f(); r.append(time.perf_counter() - t0)
    r.sort(); print(f"{name} {r[0]*1e3:.1f}", end=" | ")
print()
