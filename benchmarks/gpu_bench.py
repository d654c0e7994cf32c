"""GPU benchmark of softmax cross-entropy: xent_fast's CUDA backend against PyTorch and
Liger-Kernel (when importable), on PyTorch CUDA tensors.

    python benchmarks/gpu_bench.py [--repeat 20] [--out DIR] [--quick]

For each case it first checks correctness against the float64 reference (the loss of
the whole batch, and the loss and gradient of a slice of rows), then times, with CUDA
events (median of ``--repeat`` after warm-up, compile time excluded):

- forward: mean loss;
- forward+backward: xent_fast writes the gradient in place (``grad_out=logits``);
  PyTorch runs ``cross_entropy`` then ``backward()``; Liger-Kernel's loss computes its
  gradient in place inside the forward, then ``backward()``.

Each row gives the time, the bandwidth it implies (the bytes that must move: logits
read once, plus the gradient written for forward+backward), the ratios, and the peak
device memory each call allocated beyond its inputs (PyTorch's allocator counts
everything here: xent_fast allocates its results through PyTorch). The device-to-device
copy bandwidth measured first is the yardstick.  No network is needed.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

CASES = [
    ((8192, 128256), "float32"),
    ((8192, 128256), "bfloat16"),
    ((32768, 32000), "float32"),
]
CHECK_ROWS = 64


def _import_peers():
    import torch
    import torch.nn.functional as F
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss()
        import liger_kernel
        liger_version = getattr(liger_kernel, "__version__", None)
        if liger_version is None:
            from importlib.metadata import version
            liger_version = version("liger-kernel")
    except Exception as exc:  # noqa: BLE001 - any failure means the peer is absent
        print(f"Liger-Kernel not available ({type(exc).__name__}: {exc}); skipped",
              file=sys.stderr)
        liger, liger_version = None, None
    return torch, F, liger, liger_version


def timed(torch, fn, repeat, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return float(np.median(times))


def peak_extra(torch, fn):
    """Bytes PyTorch's allocator held at peak during ``fn`` beyond what it held before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base)


def copy_bandwidth(torch, repeat):
    n = 1 << 30  # 4 GiB of float32 each way
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    a.fill_(1.0)
    t = timed(torch, lambda: b.copy_(a), repeat)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 4 / t  # bytes read + written per second


def check(xf, torch, F, x, t, dtype_name):
    """Max relative errors against the float64 reference: whole-batch loss (reference
    computed by PyTorch in float64 on the device) and a slice's loss and gradient (on
    the host, by xent_fast.reference)."""
    from xent_fast import reference as R
    ref = F.cross_entropy(x.double(), t).item()
    got = float(xf.softmax_cross_entropy(x, t))
    loss_err = abs(got - ref) / abs(ref)
    xs = x[:CHECK_ROWS].clone()
    ts = t[:CHECK_ROWS]
    xh = xs.float().cpu().numpy().astype(np.float64)
    th = ts.cpu().numpy()
    want, gwant = R.softmax_cross_entropy(xh, th, return_grad=True)
    loss, g = xf.softmax_cross_entropy(xs, ts, grad_out=xs)
    assert g is xs
    gh = xs.float().cpu().numpy().astype(np.float64)
    slice_err = abs(float(loss) - want) / abs(want)
    grad_err = float(np.max(np.abs(gh - gwant)) / np.max(np.abs(gwant)))
    return dict(loss_rel_err=loss_err, slice_loss_rel_err=slice_err,
                grad_err_rel_to_max=grad_err)


def run_case(xf, torch, F, liger, shape, dtype_name, repeat, copy_bw):
    n, c = shape
    tdt = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * 2).to(tdt)
    t = torch.randint(0, c, (n,), generator=gen, device="cuda")
    item = x0.element_size()
    read = n * c * item
    res = dict(shape=list(shape), dtype=dtype_name)
    res["check"] = check(xf, torch, F, x0, t, dtype_name)
    x = x0.clone()

    # forward
    res["xent_fast_fwd_s"] = timed(torch, lambda: xf.softmax_cross_entropy(x, t), repeat)
    res["xent_fast_fwd_extra_bytes"] = peak_extra(torch, lambda: xf.softmax_cross_entropy(x, t))
    res["torch_fwd_s"] = timed(torch, lambda: F.cross_entropy(x, t), repeat)
    res["torch_fwd_extra_bytes"] = peak_extra(torch, lambda: F.cross_entropy(x, t))

    # forward + backward, xent_fast in place
    xg = x0.clone()
    res["xent_fast_fwdbwd_s"] = timed(
        torch, lambda: xf.softmax_cross_entropy(xg, t, grad_out=xg), repeat)
    xg.copy_(x0)
    res["xent_fast_fwdbwd_extra_bytes"] = peak_extra(
        torch, lambda: xf.softmax_cross_entropy(xg, t, grad_out=xg))
    del xg

    xt = x0.clone().requires_grad_(True)

    def torch_fb():
        loss = F.cross_entropy(xt, t)
        loss.backward()
        xt.grad = None

    res["torch_fwdbwd_s"] = timed(torch, torch_fb, repeat)
    res["torch_fwdbwd_extra_bytes"] = peak_extra(torch, torch_fb)
    del xt
    torch.cuda.empty_cache()

    if liger is not None:
        xl = x0.clone().requires_grad_(True)

        def liger_fwd():
            with torch.no_grad():
                return liger(xl, t)

        def liger_fb():
            loss = liger(xl, t)
            loss.backward()
            xl.grad = None

        try:
            res["liger_fwd_s"] = timed(torch, liger_fwd, repeat)
            res["liger_fwdbwd_s"] = timed(torch, liger_fb, repeat)
            xl.data.copy_(x0)
            res["liger_fwdbwd_extra_bytes"] = peak_extra(torch, liger_fb)
        except Exception as exc:  # noqa: BLE001
            print(f"Liger-Kernel failed on {shape} {dtype_name}: {exc}", file=sys.stderr)
        del xl
        torch.cuda.empty_cache()

    res["fwd_bytes"] = read
    res["fwdbwd_bytes"] = 2 * read  # read the logits, write the gradient (once each)
    res["copy_bw"] = copy_bw
    del x, x0
    torch.cuda.empty_cache()
    return res


def fmt_row(r):
    gb = 1e9
    shape = "x".join(str(s) for s in r["shape"])
    rows = []
    for kind, key in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
        ours = r[f"xent_fast_{key}_s"]
        bw = r[f"{key}_bytes"] / ours
        tor = r.get(f"torch_{key}_s")
        lig = r.get(f"liger_{key}_s")
        rows.append("| {} {} | {} | {:.3f} | {:.0f} ({:.0%}) | {:.3f} ({:.2f}x) | {} | {:.2f} / {:.2f} / {} |".format(
            shape, r["dtype"], kind, ours * 1e3, bw / gb, bw / r["copy_bw"],
            tor * 1e3, tor / ours,
            f"{lig * 1e3:.3f} ({lig / ours:.2f}x)" if lig else "—",
            r[f"xent_fast_{key}_extra_bytes"] / gb, r[f"torch_{key}_extra_bytes"] / gb,
            f"{r[f'liger_{key}_extra_bytes'] / gb:.2f}" if f"liger_{key}_extra_bytes" in r
            else "—"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=None, help="folder for gpu_bench.json and gpu_bench.md")
    ap.add_argument("--quick", action="store_true", help="only the first case, 5 repeats")
    args = ap.parse_args(argv)
    t_start = time.time()
    torch, F, liger, liger_version = _import_peers()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device")
    import numba
    import xent_fast as xf
    from numba import cuda
    repeat = 5 if args.quick else args.repeat
    cases = CASES[:1] if args.quick else CASES
    # compile every kernel the cases use before any timing
    for (n, c), dt in cases:
        x = torch.randn((4, c), device="cuda").to(getattr(torch, dt))
        t = torch.zeros(4, dtype=torch.int64, device="cuda")
        xf.softmax_cross_entropy(x, t)
        xf.softmax_cross_entropy(x, t, grad_out=x)
    torch.cuda.synchronize()
    copy_bw = copy_bandwidth(torch, repeat)
    props = torch.cuda.get_device_properties(0)
    meta = dict(
        device=props.name, sms=props.multi_processor_count, date=time.strftime("%Y-%m-%d"),
        python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
        numba_cuda=_version("numba-cuda"), torch=torch.__version__,
        liger_kernel=liger_version, xent_fast=xf.__version__, repeat=repeat,
        copy_bandwidth_gbs=copy_bw / 1e9,
        timing="CUDA events around each call, median; compile time excluded; "
               "xent_fast's call includes its host-side validation and the one 8-byte "
               "read of the device error flag")
    results = []
    for shape, dt in cases:
        results.append(run_case(xf, torch, F, liger, shape, dt, repeat, copy_bw))
        print(f"done {shape} {dt} at {time.time() - t_start:.0f} s", file=sys.stderr)
    lines = [
        f"# GPU benchmark: softmax cross-entropy on {meta['device']}",
        "",
        f"{meta['date']}; numba {meta['numba']}, numba-cuda {meta['numba_cuda']}, numpy "
        f"{meta['numpy']}, PyTorch {meta['torch']}, Liger-Kernel {meta['liger_kernel']}, "
        f"Python {meta['python']}. Device-to-device copy: {copy_bw / 1e9:.0f} GB/s "
        f"(read + write). {meta['timing']}.",
        "",
        "| case | pass | xent_fast ms | GB/s (of copy bw) | PyTorch ms (speed-up) | "
        "Liger ms (speed-up) | extra GB: ours / torch / liger |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines += fmt_row(r)
    lines += ["", "Correctness against float64 (whole-batch loss; loss and gradient of "
              f"the first {CHECK_ROWS} rows):", ""]
    for r in results:
        c = r["check"]
        lines.append(f"- {'x'.join(map(str, r['shape']))} {r['dtype']}: loss rel. err "
                     f"{c['loss_rel_err']:.1e}, slice loss {c['slice_loss_rel_err']:.1e}, "
                     f"gradient max err / max |grad| {c['grad_err_rel_to_max']:.1e}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_bench.md").write_text(text)
        (out / "gpu_bench.json").write_text(json.dumps(dict(meta=meta, results=results),
                                                       indent=1))
    print(f"total {time.time() - t_start:.0f} s", file=sys.stderr)


def _version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
