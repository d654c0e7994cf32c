"""``xent-fast bench``: time xent_fast against its peers and against the machine's floor.

Each case is one loss at one shape and dtype.  Every implementation that is importable
(xent_fast serial and threaded, the float64 NumPy reference, SciPy, PyTorch CPU, JAX CPU)
runs the same case in the same process, so ratios are side by side.  The floor of a case
is the bytes it must move (inputs read once, outputs written once) over this machine's
read and write bandwidth, measured at the start of the run with two threaded Numba
loops.  Times are the best of several calls, compile and first-touch excluded.
"""

import dataclasses
import json
import math
import os
import platform
import time

import numpy as np

from . import _ops
from ._cpu import threads as _threads

# ---------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    kind: str  # an operation's kind in _ops.OPS (ce, kl, bce_logits, ...), "_grad" added
    rows: int
    cols: int
    dtype: str = "float32"

    @property
    def name(self):
        return f"{self.kind} {self.rows}x{self.cols} {self.dtype}"

    @property
    def grad(self):
        return self.kind.endswith("_grad")

    @property
    def op(self):
        return _ops.BY_KIND[self.kind.removesuffix("_grad")]

    def nbytes(self):
        """(bytes read, bytes written) that any implementation must move."""
        return self.op.nbytes(self.rows, self.cols, self.dtype, self.grad)


HEADLINE = [
    Case("ce", 4096, 32000), Case("ce_grad", 4096, 32000),
    Case("ce", 4096, 32000, "float64"), Case("ce_grad", 4096, 32000, "float64"),
    Case("ce", 1024, 128256), Case("ce_grad", 1024, 128256),
    Case("ce", 65536, 1000), Case("ce_grad", 65536, 1000),
    Case("ce", 1_000_000, 10), Case("ce_grad", 1_000_000, 10),
    Case("ce", 8192, 2), Case("ce_grad", 8192, 2),
    Case("bce_logits", 1, 10_000_000), Case("bce_logits_grad", 1, 10_000_000),
    Case("kl", 4096, 32000), Case("kl_grad", 4096, 32000),
    Case("logsumexp", 4096, 32000),
    Case("jsd", 4096, 32000), Case("jsd_grad", 4096, 32000),
    Case("kl_sparse", 4096, 32000), Case("kl_sparse_grad", 4096, 32000),
]
# every other public function once, at the shape its entry gives (the CE headline shape)
BLOCKS = [Case(op.kind, *op.bench_shape) for op in _ops.OPS if op.bench_shape]
QUICK = [Case("ce", 4096, 32000), Case("ce_grad", 4096, 32000), Case("ce", 1_000_000, 10),
         Case("ce", 8192, 2), Case("bce_logits", 1, 10_000_000), Case("kl", 4096, 32000),
         Case("jsd", 1024, 32000), Case("jsd_grad", 1024, 32000),
         Case("kl_sparse", 4096, 32000), Case("kl_sparse_grad", 4096, 32000)]
# throughput against class count at a fixed 2^27 elements, for the plot
SWEEP = [Case("ce", (1 << 27) // c, c) for c in (2, 10, 100, 1000, 10_000, 32000, 128_000)]


def make_data(case, seed=0):
    return case.op.make_inputs(case.rows, case.cols, case.dtype, seed)


# ---------------------------------------------------------------------------- implementations
def _xent(backend):
    import xent_fast as xf

    def build(case, d):
        op = case.op
        kw = {"backend": backend}
        if op.grad:
            kw["grad_out"] = np.empty_like(d["x"]) if case.grad else None
        return op.call(_ops.bound(xf), d, **kw)

    return build


def _peer(name):
    def build(case, d):
        return case.op.peer(name, d, case.grad)

    return build


PEERS = {name: _peer(name) for name in _ops.PEERS}


def available_peers(names=None):
    """The peers among ``names`` (default all) whose package imports."""
    import importlib.util

    find = importlib.util.find_spec
    return [n for n in (names or PEERS) if find(_ops.PEERS[n]) is not None]


# ---------------------------------------------------------------------------- timing
def best_time(fn, budget=1.0, min_repeat=3, max_repeat=200, warm=True):
    """Best wall time of ``fn`` within about ``budget`` seconds.

    A warm-up call comes first (compilation, first touch of memory); with ``warm=False``
    the warm-up is itself timed, for implementations that compile nothing and are slow
    enough that calling them twice would dominate the run.  At least ``min_repeat``
    timed calls unless a single call already exceeds the budget.
    """
    if warm:
        fn()
    best = math.inf
    n = 0
    spent = 0.0
    while n < max_repeat:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        n += 1
        if spent >= budget and (n >= min_repeat or dt >= budget):
            break
    return best


def measure_bandwidth(nbytes=1 << 30):
    """(read GB/s, write GB/s) of this machine with Numba's threads."""
    _threads.configure()  # this probe may be the process's first parallel code
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def read_sum(a):
        nb = 256
        n = a.shape[0]
        acc = np.zeros(nb, np.float32)
        for b in prange(nb):
            seg = a[b * n // nb:(b + 1) * n // nb]  # a slice: unit-stride vector loads
            t = np.float32(0)
            for j in range(seg.shape[0]):
                t += seg[j]
            acc[b] = t
        return acc.sum()

    @njit(parallel=True, fastmath=True)
    def fill(a, v):
        nb = 256
        n = a.shape[0]
        for b in prange(nb):
            seg = a[b * n // nb:(b + 1) * n // nb]
            for j in range(seg.shape[0]):
                seg[j] = v

    a = np.ones(nbytes // 4, np.float32)
    read = best_time(lambda: read_sum(a), budget=1.0, min_repeat=5)
    write = best_time(lambda: fill(a, np.float32(2)), budget=1.0, min_repeat=5)
    return nbytes / read / 1e9, nbytes / write / 1e9


def max_rel_error(case, d):
    """Max relative error of xent_fast's result (loss or gradient) against the float64
    reference, on at most 256 rows."""
    import xent_fast as xf
    from xent_fast import reference as R

    op = case.op
    k = min(case.rows, 256)
    if op.elementwise:
        sub = {key: v[:1_000_000] for key, v in d.items()}
    else:
        sub = {key: (v[:k] if v.ndim else v) for key, v in d.items()}
    kw = {"return_grad": case.grad} if op.grad else {}
    got, want = op.call(xf, sub, **kw), op.call(R, sub, **kw)
    if case.grad:
        got, want = got[1], want[1]
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if want.size else 1.0
    return float(np.max(np.abs(got - want)) / scale) if want.size else 0.0


# ---------------------------------------------------------------------------- run + report
def environment():
    import numba

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "threads": _threads.num_threads(),
        "threading_layer": numba.threading_layer(),
    }
    for mod in ("scipy", "torch", "jax"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(cases, peers, budget=0.5, log=print, bandwidth=None):
    # Measured before any peer is imported: their thread pools, idle or not, have been
    # seen to cost the probe up to a third of its bandwidth.
    rd, wr = bandwidth or measure_bandwidth()
    peers = {name: PEERS[name] for name in available_peers(peers)}
    try:
        import torch

        torch.set_num_threads(_threads.num_threads())
    except ImportError:
        pass
    env = environment()
    env.update(read_GBps=round(rd, 1), write_GBps=round(wr, 1))
    log(f"peers: {', '.join(peers) or 'none'}; {len(cases)} cases")
    log(f"bandwidth: read {rd:.1f} GB/s, write {wr:.1f} GB/s ({env['threads']} threads)")
    results = []
    for case in cases:
        started = time.perf_counter()
        d = make_data(case)
        reads, writes = case.nbytes()
        floor = reads / (rd * 1e9) + writes / (wr * 1e9)
        row = {"case": case.name, "kind": case.kind, "rows": case.rows, "cols": case.cols,
               "dtype": case.dtype, "floor_s": floor, "times": {}}
        for label, backend in (("xent_fast", "auto"), ("xent_fast-serial", "cpu")):
            row["times"][label] = best_time(_xent(backend)(case, d), budget)
        row["max_rel_error"] = max_rel_error(case, d)
        for name, build in peers.items():
            try:
                fn = build(case, d)
            except Exception as e:  # a peer without this case
                log(f"  {name}: skipped ({type(e).__name__})")
                continue
            if fn is None:
                continue
            t0 = time.perf_counter()
            row["times"][name] = best_time(fn, budget)
            log(f"  {name}: {time.perf_counter() - t0:.1f} s")
        row["wall_s"] = round(time.perf_counter() - started, 1)
        results.append(row)
        log(format_row(row) + f"  [{row['wall_s']} s]")
    return env, results


def format_row(row):
    t = row["times"]
    ours = t["xent_fast"]
    peers = "  ".join(f"{k} {v / ours:6.1f}x" for k, v in t.items() if not
                      k.startswith("xent_fast"))
    return (f"{row['case']:34s} {_fmt_time(ours):>9s}  floor x{ours / row['floor_s']:4.2f}  "
            f"serial {_fmt_time(t['xent_fast-serial']):>9s}  err {row['max_rel_error']:.1e}  "
            f"{peers}")


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms"


def markdown(env, results):
    peers = []
    for r in results:
        for k in r["times"]:
            if not k.startswith("xent_fast") and k not in peers:
                peers.append(k)
    lines = [
        f"Machine: {env['machine']}, {env['cpus']} CPUs; {env['threads']} threads; "
        f"measured bandwidth read {env['read_GBps']} GB/s, write {env['write_GBps']} GB/s.  ",
        "Versions: " + ", ".join(f"{k} {env[k]}" for k in
                                 ("python", "numpy", "numba", "scipy", "torch", "jax")
                                 if k in env) + f".  Date: {env['date']}.  ",
        "Best of several calls, compile excluded; xent_fast with backend='auto' (threads "
        "from 65 536 elements), 'serial' with backend='cpu'; speed-up = peer time / "
        "xent_fast time in the same run; floor = bytes moved / measured bandwidth.",
        "",
        "| case | xent_fast | floor multiple | serial | max rel. error | "
        + " | ".join(f"vs {p}" for p in peers) + " |",
        "|---|---|---|---|---|" + "---|" * len(peers),
    ]
    for r in results:
        t = r["times"]
        ours = t["xent_fast"]
        cells = [f"{t[p] / ours:.1f}x" if p in t else "—" for p in peers]
        lines.append(f"| {r['case']} | {_fmt_time(ours)} | {ours / r['floor_s']:.2f} | "
                     f"{_fmt_time(t['xent_fast-serial'])} | {r['max_rel_error']:.1e} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Throughput (elements/s) against class count for the CE forward sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [r for r in results if r["kind"] == "ce" and r["dtype"] == "float32"]
    if not sweep:
        return False
    sweep.sort(key=lambda r: r["cols"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = []
    for r in sweep:
        names.extend(k for k in r["times"] if k not in names)
    for name in names:
        pts = [(r["cols"], r["rows"] * r["cols"] / r["times"][name]) for r in sweep
               if name in r["times"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    floor = [(r["cols"], r["rows"] * r["cols"] / r["floor_s"]) for r in sweep]
    ax.plot(*zip(*floor), "k--", label="memory floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes")
    ax.set_ylabel("logits per second")
    ax.set_title("softmax cross-entropy forward, float32")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# The files a run writes (``main``): a folder holding any of them holds results.
RESULT_FILES = tuple(stem + ext for stem in ("bench", "bench-quick")
                     for ext in (".json", ".md", ".png"))
DEFAULT_OUT = "bench-results"


def output_dir(out=None, *, force=False, now=None):
    """The folder a run writes into, decided before the run starts.

    Without ``out``: a new folder ``bench-results/YYYYmmdd-HHMMSS`` (``now``, seconds
    since the epoch, default the current time; ``-2``, ``-3``, ... added if it exists),
    so that no run overwrites another, nor the results committed with the project.
    With ``out``: that folder, unless it already holds results (``RESULT_FILES``), which
    is a ``FileExistsError`` unless ``force``; a file of that name is refused always.
    """
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        path = os.path.join(DEFAULT_OUT, stamp)
        n = 1
        while os.path.exists(path):
            n += 1
            path = os.path.join(DEFAULT_OUT, f"{stamp}-{n}")
        return path
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file, not a folder")
    held = [f for f in RESULT_FILES if os.path.exists(os.path.join(out, f))]
    if held and not force:
        raise FileExistsError(
            f"{out} already holds results ({', '.join(held)}): pass --force to overwrite "
            f"them, or leave out --out to write into a new {DEFAULT_OUT}/TIMESTAMP folder")
    return out


def main(args):
    """Run the cases and write the report into ``args.out`` (a folder ``output_dir``
    chose)."""
    if args.quick:
        cases, budget = QUICK, 0.2
    else:
        cases, budget = HEADLINE + BLOCKS + ([] if args.no_sweep else SWEEP), 0.5
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only)]
    env, results = run(cases, args.peers, budget)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench-quick" if args.quick else "bench")
    with open(stem + ".json", "w") as fh:
        json.dump({"environment": env, "results": results}, fh, indent=1)
    md = markdown(env, results)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    made = plot(results, stem + ".png")
    print()
    print(md)
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if made else ""))
    return 0

