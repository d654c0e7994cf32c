"""Fused linear cross-entropy against forming the logits: time and peak extra memory.

Run:  python benchmarks/linear_ce.py [--quick] [--out benchmarks/results/linear-ce.md]

Forward+backward of ``cross_entropy(hidden @ weight.T, targets)`` with respect to the
hidden states and the weight, at (4096 rows, 1024 hidden, 32000 classes) on the CPU in
float32 and bfloat16 (--device cuda: 8192 x 4096 x 128256 bfloat16, Liger-Kernel and
Cut Cross-Entropy joining where importable).  Peers: PyTorch's ``F.linear`` +
``F.cross_entropy`` eager and under ``torch.compile``; xent_fast.torch's
``linear_cross_entropy``; xent_fast's NumPy ``linear_cross_entropy(return_grad=True)``;
and NumPy forming the logits (float32 products, xent_fast's fused cross-entropy
kernel with its gradient, the two products back).  Peak extra memory as in
torch_train.py: the most memory in use during the call beyond what was in use before
it, the gradients themselves included, in GB and as a multiple of one logits array.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train import Peak, header, timed  # noqa: E402

import xent_fast as xf  # noqa: E402
import xent_fast.torch as xt  # noqa: E402

CPU_CASES = [((4096, 1024, 32000), "float32"), ((4096, 1024, 32000), "bfloat16")]
GPU_CASES = [((8192, 4096, 128256), "bfloat16")]


def peers(device):
    def torch_eager(h, w, t):
        F.cross_entropy(F.linear(h, w), t).backward()

    compiled = torch.compile(lambda h, w, t: F.cross_entropy(F.linear(h, w), t))
    fns = {
        "PyTorch eager": torch_eager,
        "torch.compile": lambda h, w, t: compiled(h, w, t).backward(),
        "xent_fast.torch": lambda h, w, t: xt.linear_cross_entropy(h, w, t).backward(),
    }
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            fns["Liger-Kernel"] = lambda h, w, t: liger_fused_linear_cross_entropy(
                h, w, t).backward()
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
            fns["Cut Cross-Entropy"] = lambda h, w, t: cce(h, w, t).backward()
        except ImportError:
            pass
    return fns


def numpy_peers(dtype):
    def fused(h, w, t):
        xf.linear_cross_entropy(h, w, t, return_grad=True)

    def formed(h, w, t):
        z = h @ w.T
        _, g = xf.softmax_cross_entropy(z, t, return_grad=True)
        return g @ w, g.T @ h

    return {"xent_fast NumPy": fused, "NumPy, logits formed": formed}


def run_case(shape, dtype, device, repeat, results, only):
    n, hdim, v = shape
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    h0 = torch.randn(n, hdim, generator=gen).to(device=device, dtype=dt)
    w0 = (torch.randn(v, hdim, generator=gen) / hdim ** 0.5).to(device=device, dtype=dt)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    logits_bytes = n * v * h0.element_size()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = Peak(device)
    h = h0.clone().requires_grad_()
    w = w0.clone().requires_grad_()

    def clear():
        h.grad = w.grad = None

    cases = [(name, lambda fn=fn: fn(h, w, t)) for name, fn in peers(device).items()]
    if device == "cpu":
        if dtype == "bfloat16":
            import ml_dtypes
            hn = h0.float().numpy().astype(ml_dtypes.bfloat16)
            wn = w0.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            hn, wn = h0.numpy(), w0.numpy()
        tn = t.numpy()
        cases += [(name, lambda fn=fn: fn(hn, wn, tn)) for name, fn in numpy_peers(dtype).items()
                  if dtype == "float32" or name != "NumPy, logits formed"]
    for name, call in cases:
        if only and name not in only:
            continue
        for _ in range(1):  # warm-up: compiles
            clear()
            call()
        sync()
        sec = timed(call, repeat, sync, clear)
        extra = peak(call, clear)
        results.append(dict(shape=f"{n} x {hdim} x {v}", dtype=dtype, impl=name, ms=sec * 1e3,
                            gb=extra / 1e9, x=extra / logits_bytes))
        r = results[-1]
        print(f"{r['shape']:>20} {dtype:>8} {name:>22}: {r['ms']:9.1f} ms, peak extra "
              f"{r['gb']:.3f} GB ({r['x']:.2f}x logits)", flush=True)


def table(results):
    lines = ["| rows x hidden x classes | dtype | implementation | forward+backward (ms) | "
             "vs PyTorch eager | peak extra (GB) | vs PyTorch eager's memory |",
             "|---|---|---|---|---|---|---|"]
    base = {(r["shape"], r["dtype"], r["impl"]): r for r in results}
    for r in results:
        e = base.get((r["shape"], r["dtype"], "PyTorch eager"))
        sp = f"{e['ms'] / r['ms']:.2f}x" if e else "-"
        mem = f"1/{e['gb'] / r['gb']:.1f}" if e and r["gb"] > 0 else "-"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r['ms']:.0f} | {sp} | "
                     f"{r['gb']:.3f} | {mem} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="float32 only, 2 repeats")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per case (median)")
    ap.add_argument("--only", nargs="*", help="implementations to run (by name)")
    ap.add_argument("--out", help="write the table (Markdown) to this file")
    a = ap.parse_args(argv)
    cases = GPU_CASES if a.device == "cuda" else CPU_CASES
    if a.quick:
        cases = cases[:1]
    results = []
    print(header(a.device), flush=True)
    for shape, dtype in cases:
        run_case(shape, dtype, a.device, 2 if a.quick else a.repeat, results, a.only)
    text = (header(a.device).split(" Train step")[0] + "\n\n" + table(results) + "\n")
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
