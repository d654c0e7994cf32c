"""xent_fast.torch against PyTorch eager and torch.compile, in a PyTorch training step.

Run:  python benchmarks/torch_train.py [--quick] [--out benchmarks/results/torch-train.md]

For each shape, on the CPU (or the GPU with --device cuda, where Liger-Kernel joins
when installed): the loss alone, forward (no gradient) and forward+backward (logits a
leaf that requires grad), and a training step (a linear head (N, H) -> (N, C), the
loss, backward into the head's weight).  Each is timed (median of the repeats, after
warm-up calls that also compile) and its peak extra memory measured: the most memory
in use during one call beyond what was in use before it, as a multiple of one logits
array.  On the CPU that is the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs before each call); on the GPU torch.cuda.max_memory_allocated.
The gradient itself counts: a forward+backward that keeps only its gradient shows 1.0x.

Peers: PyTorch's F.cross_entropy eager, the same under torch.compile (Inductor), and
xent_fast.torch.cross_entropy eager, with ``inplace_backward=True``, and under
torch.compile (a custom operator: no graph break).  Not a test: speeds are reported as
ratios in one run, never asserted.
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import xent_fast
import xent_fast.torch as xt

SHAPES = [((4096, 32000), "float32"), ((4096, 32000), "bfloat16"), ((32768, 1000), "float32")]
HIDDEN = 64  # the head's input width: small, so that the loss is not hidden by the matmul


# ---------------------------------------------------------------------------- memory
class Peak:
    """Peak extra memory of a call, in bytes."""

    def __init__(self, device):
        self.device = device

    def _rss(self, key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def __call__(self, fn, prepare=None):
        if prepare is not None:
            prepare()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = self._rss("VmRSS:")
        fn()
        return self._rss("VmHWM:") - before


def timed(fn, repeat, sync, prepare):
    ts = []
    for _ in range(repeat):
        prepare()  # untimed: drop the last gradient (and refill overwritten logits)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---------------------------------------------------------------------------- cases
def loss_fns(device):
    """name -> (loss function, compiled?)"""
    fns = {
        "PyTorch eager": lambda x, t: F.cross_entropy(x, t),
        "torch.compile": torch.compile(lambda x, t: F.cross_entropy(x, t)),
        "xent_fast": lambda x, t: xt.cross_entropy(x, t),
        "xent_fast inplace_backward": lambda x, t: xt.cross_entropy(x, t, inplace_backward=True),
        "xent_fast + torch.compile": torch.compile(lambda x, t: xt.cross_entropy(x, t),
                                                   fullgraph=True),
    }
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
            fns["Liger-Kernel"] = lambda x, t: liger_cross_entropy(x, t)
        except ImportError:
            pass
    return fns


def run_shape(shape, dtype, device, repeat, results, only=None):
    n, c = shape
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.randn(n, c, generator=gen) * 2).to(device=device, dtype=dt)
    t = torch.randint(0, c, (n,), generator=gen).to(device)
    h = torch.randn(n, HIDDEN, generator=gen).to(device=device, dtype=dt)
    w0 = (torch.randn(c, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(device=device, dtype=dt)
    logits_bytes = x0.numel() * x0.element_size()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = Peak(device)
    for name, fn in loss_fns(device).items():
        if only and name not in only:
            continue
        x = x0.clone()
        xg = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()

        def forward():
            with torch.no_grad():
                return fn(x, t)

        def forward_backward():
            fn(xg, t).backward()

        def step():
            fn(h @ w.t(), t).backward()

        def clear():
            xg.grad = w.grad = None
            if "inplace" in name:  # the last call overwrote the logits with the gradient
                xg.data.copy_(x0)

        modes = {"forward": forward, "forward+backward": forward_backward, "train step": step}
        if "inplace" in name:
            modes.pop("forward")
        for mode, call in modes.items():
            for _ in range(2):  # warm-up: compiles
                clear()
                call()
            sync()
            sec = timed(call, repeat, sync, clear)
            extra = peak(call, clear)
            results.append(dict(shape=f"({n}, {c})", dtype=dtype, impl=name, mode=mode,
                                ms=sec * 1e3, extra=extra / logits_bytes))
            r = results[-1]
            print(f"{r['shape']:>14} {dtype:>8} {mode:>16} {name:>28}: {r['ms']:9.2f} ms, "
                  f"peak extra {r['extra']:.2f}x logits", flush=True)
        gc.collect()


def table(results):
    lines = ["| shape | dtype | mode | implementation | time (ms) | vs PyTorch eager | "
             "vs torch.compile | peak extra memory (x logits) |", "|---|---|---|---|---|---|---|---|"]
    base = {(r["shape"], r["dtype"], r["mode"], r["impl"]): r["ms"] for r in results}
    for r in results:
        key = (r["shape"], r["dtype"], r["mode"])
        eager, comp = base.get(key + ("PyTorch eager",)), base.get(key + ("torch.compile",))
        ratio = lambda b: f"{b / r['ms']:.1f}x" if b else "-"  # noqa: E731
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                     f"{r['ms']:.1f} | {ratio(eager)} | {ratio(comp)} | {r['extra']:.2f} |")
    return "\n".join(lines)


def header(device):
    import numba
    threads = torch.get_num_threads()
    dev = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or \
        platform.machine()
    return (f"Machine: {dev}, {os.cpu_count()} CPUs; {threads} threads (PyTorch and "
            f"xent_fast); python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}, numba {numba.__version__}, xent_fast "
            f"{xent_fast.__version__}. Train step: a linear head ({HIDDEN} -> C), the loss, "
            "backward into the head's weight.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one shape, 3 repeats")
    ap.add_argument("--repeat", type=int, default=7, help="timed calls per case (median)")
    ap.add_argument("--only", nargs="*", help="implementations to run (by name)")
    ap.add_argument("--out", help="write the table (Markdown) to this file")
    a = ap.parse_args(argv)
    shapes = SHAPES[:1] if a.quick else SHAPES
    repeat = 3 if a.quick else a.repeat
    results = []
    print(header(a.device), flush=True)
    for shape, dtype in shapes:
        run_shape(shape, dtype, a.device, repeat, results, a.only)
    text = header(a.device) + "\n\n" + table(results) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
