"""``xent-fast bench``: time xent_fast against its peers and against the machine's floor.

Each case is one loss at one shape and dtype.  Every implementation that is importable
(xent_fast serial and threaded, the float64 NumPy reference, SciPy, PyTorch CPU, JAX CPU)
runs the same case in the same process, so ratios are side by side.  The floor of a case
is the bytes it must move (inputs read once, outputs written once) over this machine's
read and write bandwidth, measured before and after the run with two threaded Numba
loops (its spread is shown with every floor multiple).

Timing: the implementations of a case run interleaved, one call each a round in a
shuffled order, so that the machine's noise hits them alike, until every one's
interquartile range is within 5% of its median or the time budget is spent (at least
three rounds); the first call of each (compilation, first touch; torch.compile's
compile) is timed apart.  Reported: the median and the interquartile range, and a
speed-up's range from the quartiles.  ``--save``/``--compare`` (see ``compare``) set one
run against another case by case.
"""

import dataclasses
import json
import math
import os
import platform
import random
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
def _xent(backend, options=None):
    import xent_fast as xf

    def build(case, d):
        op = case.op
        kw = dict(options or {}, backend=backend)
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


def measure(impls, budget=0.5, min_rounds=3, max_rounds=200, spread=0.05, seed=0):
    """Interleaved timing of ``impls`` ({name: call}): ({name: first-call seconds},
    {name: list of the later calls' seconds}).  Each round calls every implementation
    once, in a shuffled order; rounds go on until each one's interquartile range is
    within ``spread`` of its median, or ``budget`` seconds of rounds are spent, after at
    least ``min_rounds`` (unless one round alone takes five budgets)."""
    first = {}
    for name, fn in impls.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    samples = {name: [] for name in impls}
    order = list(impls)
    rng = random.Random(seed)
    spent = 0.0
    for n in range(1, max_rounds + 1):
        rng.shuffle(order)
        t_round = time.perf_counter()
        for name in order:
            t0 = time.perf_counter()
            impls[name]()
            samples[name].append(time.perf_counter() - t0)
        round_s = time.perf_counter() - t_round
        spent += round_s
        if n < min_rounds and round_s < 5 * budget:
            continue
        if spent >= budget or all(_rel_iqr(s) <= spread for s in samples.values()):
            break
    return first, samples


def _rel_iqr(s):
    q1, med, q3 = np.percentile(s, [25, 50, 75])
    return (q3 - q1) / med if med > 0 else math.inf


def summary(s):
    """{"median", "q1", "q3", "n"} of a list of seconds."""
    q1, med, q3 = (float(v) for v in np.percentile(s, [25, 50, 75]))
    return {"median": med, "q1": q1, "q3": q3, "n": len(s)}


def speedup(peer, ours):
    """(ratio of medians, low, high) of a peer's time over xent_fast's, the range from
    the quartiles: the peer's first quartile over our third, and its third over our
    first."""
    return (peer["median"] / ours["median"], peer["q1"] / ours["q3"],
            peer["q3"] / ours["q1"])


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


def max_rel_error(case, d, options=None):
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
    kw = dict(options or {})
    if op.grad:
        kw["return_grad"] = case.grad
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


def run(cases, peers, budget=0.5, log=print, bandwidth=None, backend=None, options=None):
    """Time ``cases`` on xent_fast (``backend``: one backend; default "auto" and the
    serial "cpu") and on ``peers``; returns (environment, result rows).  ``options`` are
    keywords of xent_fast's call (and the reference's); the peers run without them."""
    # Measured before any peer is imported: their thread pools, idle or not, have been
    # seen to cost the probe up to a third of its bandwidth.
    bw = [bandwidth or measure_bandwidth()]
    peers = {name: PEERS[name] for name in available_peers(peers)}
    try:
        import torch

        torch.set_num_threads(_threads.num_threads())
    except ImportError:
        pass
    env = environment()
    log(f"peers: {', '.join(peers) or 'none'}; {len(cases)} cases")
    log(f"bandwidth: read {bw[0][0]:.1f} GB/s, write {bw[0][1]:.1f} GB/s "
        f"({env['threads']} threads)")
    ours = [("xent_fast", backend)] if backend else [("xent_fast", "auto"),
                                                     ("xent_fast-serial", "cpu")]
    results = []
    for case in cases:
        started = time.perf_counter()
        d = make_data(case)
        impls = {label: _xent(be, options)(case, d) for label, be in ours}
        for name, build in peers.items():
            try:
                fn = build(case, d)
            except Exception as e:  # a peer without this case
                log(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            if fn is not None:
                impls[name] = fn
        first, samples = measure(impls, budget)
        stats = {name: summary(s) for name, s in samples.items()}
        row = {"case": case.name, "kind": case.kind, "rows": case.rows, "cols": case.cols,
               "dtype": case.dtype, "reads_writes": list(case.nbytes()),
               "times": {k: v["median"] for k, v in stats.items()}, "stats": stats,
               "first_call_s": first}
        if options:
            row["options"] = dict(options)
        row["max_rel_error"] = max_rel_error(case, d, options)
        row["wall_s"] = round(time.perf_counter() - started, 1)
        results.append(row)
        if "torch.compile" in first:
            log(f"  torch.compile: first call (compile) {first['torch.compile']:.1f} s")
    bw.append(measure_bandwidth())
    env.update(read_GBps=[round(b[0], 1) for b in bw], write_GBps=[round(b[1], 1) for b in bw])
    for row in results:
        floors = [row["reads_writes"][0] / (r * 1e9) + row["reads_writes"][1] / (w * 1e9)
                  for r, w in bw]
        row["floor_s"] = float(np.mean(floors))
        row["floor_range_s"] = [min(floors), max(floors)]
        log(format_row(row) + f"  [{row['wall_s']} s]")
    return env, results


def _iqr_text(st):
    return f"{_fmt_time(st['median'])} [{_fmt_time(st['q1'])}-{_fmt_time(st['q3'])}]"


def _speedups(row):
    """{peer: (ratio, low, high)} against xent_fast, from the rows' statistics (rows of
    older runs without them: the single times)."""
    st = row.get("stats") or {k: {"median": v, "q1": v, "q3": v} for k, v in
                              row["times"].items()}
    ours = st["xent_fast"]
    return {k: speedup(v, ours) for k, v in st.items() if not k.startswith("xent_fast")}


def _floor_text(row):
    ours = row["times"]["xent_fast"]
    lo, hi = row.get("floor_range_s", [row["floor_s"]] * 2)
    return f"{ours / row['floor_s']:.2f} ({ours / hi:.2f}-{ours / lo:.2f})"


def format_row(row):
    st = row.get("stats") or {k: {"median": v, "q1": v, "q3": v} for k, v in
                              row["times"].items()}
    peers = "  ".join(f"{k} {r:.1f}x ({lo:.1f}-{hi:.1f})"
                      for k, (r, lo, hi) in _speedups(row).items())
    serial = (f"serial {_fmt_time(row['times']['xent_fast-serial'])}  "
              if "xent_fast-serial" in row["times"] else "")
    return (f"{row['case']:34s} {_iqr_text(st['xent_fast'])}  floor x{_floor_text(row)}  "
            f"{serial}err {row['max_rel_error']:.1e}  {peers}")


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 10:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _bw_text(v):
    v = v if isinstance(v, list) else [v]
    return f"{min(v)}" if min(v) == max(v) else f"{min(v)}-{max(v)}"


def markdown(env, results):
    peers = []
    for r in results:
        for k in r["times"]:
            if not k.startswith("xent_fast") and k not in peers:
                peers.append(k)
    serial = any("xent_fast-serial" in r["times"] for r in results)
    lines = [
        f"Machine: {env['machine']}, {env['cpus']} CPUs; {env['threads']} threads; "
        f"measured bandwidth read {_bw_text(env['read_GBps'])} GB/s, write "
        f"{_bw_text(env['write_GBps'])} GB/s (before and after the run).  ",
        "Versions: " + ", ".join(f"{k} {env[k]}" for k in
                                 ("python", "numpy", "numba", "scipy", "torch", "jax")
                                 if k in env) + f".  Date: {env['date']}.  ",
        "Median [interquartile range] of interleaved calls, first calls (compilation) "
        "excluded; xent_fast with backend='auto' (threads from 65 536 elements)"
        + (", 'serial' with backend='cpu'" if serial else "") + "; speed-up = peer time "
        "/ xent_fast time in the same run (range from the quartiles); floor = bytes "
        "moved / measured bandwidth (range over the bandwidth probes).",
        "",
        "| case | xent_fast | floor multiple | " + ("serial | " if serial else "")
        + "max rel. error | " + " | ".join(f"vs {p}" for p in peers) + " |",
        "|---|---|---|" + ("---|" if serial else "") + "---|" + "---|" * len(peers),
    ]
    for r in results:
        st = r.get("stats") or {k: {"median": v, "q1": v, "q3": v} for k, v in
                                r["times"].items()}
        sp = _speedups(r)
        cells = [f"{sp[p][0]:.1f}x ({sp[p][1]:.1f}-{sp[p][2]:.1f})" if p in sp else "—"
                 for p in peers]
        ser = f"{_fmt_time(r['times']['xent_fast-serial'])} | " if serial and \
            "xent_fast-serial" in r["times"] else ("— | " if serial else "")
        lines.append(f"| {r['case']} | {_iqr_text(st['xent_fast'])} | {_floor_text(r)} | "
                     f"{ser}{r['max_rel_error']:.1e} | " + " | ".join(cells) + " |")
    first = {k: v for r in results for k, v in r.get("first_call_s", {}).items()
             if k == "torch.compile"}
    if first:
        lines += ["", "torch.compile's first call (its compile) is timed apart: " + ", ".join(
            f"{r['case']} {r['first_call_s']['torch.compile']:.1f} s" for r in results
            if "torch.compile" in r.get("first_call_s", {}))]
    return "\n".join(lines) + "\n"


def csv_text(results):
    """One line a case and implementation: case, op, rows, cols, dtype, implementation,
    median, q1, q3, calls (seconds)."""
    out = ["case,kind,rows,cols,dtype,implementation,median_s,q1_s,q3_s,calls"]
    for r in results:
        st = r.get("stats") or {k: {"median": v, "q1": v, "q3": v, "n": 1} for k, v in
                                r["times"].items()}
        for name, s in st.items():
            out.append(f"{r['case']},{r['kind']},{r['rows']},{r['cols']},{r['dtype']},{name},"
                       f"{s['median']:.6g},{s['q1']:.6g},{s['q3']:.6g},{s['n']}")
    return "\n".join(out) + "\n"


def compare(new, old, tolerance=0.05):
    """Case by case, xent_fast's median time now over then, with its range from the
    quartiles (now's first over then's third, now's third over then's first).  A case
    is "slower" when even the low end exceeds 1 + ``tolerance`` (the two runs' ranges
    do not overlap and differ by more than that), "faster" when the high end is below
    1 - ``tolerance``.  Returns [(case, ratio, low, high, verdict)]."""
    then = {r["case"]: r for r in old}
    out = []
    for r in new:
        o = then.get(r["case"])
        if o is None:
            continue
        a = (r.get("stats") or {}).get("xent_fast") or {"median": r["times"]["xent_fast"],
                                                        "q1": r["times"]["xent_fast"],
                                                        "q3": r["times"]["xent_fast"]}
        b = (o.get("stats") or {}).get("xent_fast") or {"median": o["times"]["xent_fast"],
                                                        "q1": o["times"]["xent_fast"],
                                                        "q3": o["times"]["xent_fast"]}
        ratio, lo, hi = a["median"] / b["median"], a["q1"] / b["q3"], a["q3"] / b["q1"]
        verdict = ("slower" if lo > 1 + tolerance else "faster" if hi < 1 - tolerance
                   else "same")
        out.append((r["case"], ratio, lo, hi, verdict))
    return out


def format_compare(rows):
    lines = [f"{'case':34s} now/then  range        verdict"]
    for case, ratio, lo, hi, verdict in rows:
        flag = "  <-- SLOWER" if verdict == "slower" else ""
        lines.append(f"{case:34s} {ratio:7.3f}  {lo:.3f}-{hi:.3f}  {verdict}{flag}")
    return "\n".join(lines)


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
RESULT_FILES = tuple(stem + ext for stem in ("bench", "bench-quick", "bench-custom")
                     for ext in (".json", ".md", ".png", ".csv"))
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


def op_kinds():
    """Every case kind ``--op`` takes: each operation's kind, and KIND_grad where it has a
    gradient."""
    return [k for op in _ops.OPS for k in ((op.kind, op.kind + "_grad") if op.grad
                                           else (op.kind,))]


def parse_shape(text):
    """"8192x50257" -> (8192, 50257); more axes are batch axes: "8x1024x50257" ->
    (8192, 50257)."""
    try:
        dims = [int(v) for v in text.lower().replace("×", "x").split("x")]
    except ValueError:
        raise ValueError(f"--shape {text!r}: expected ROWSxCLASSES, e.g. 8192x50257") from None
    if len(dims) < 2 or min(dims) < 0:
        raise ValueError(f"--shape {text!r}: expected ROWSxCLASSES (or BATCHxSEQxCLASSES)")
    return math.prod(dims[:-1]), dims[-1]


def parse_options(text):
    """"label_smoothing=0.1,z_loss=1e-4" -> {"label_smoothing": 0.1, "z_loss": 0.0001}."""
    import ast

    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--options {part!r}: expected NAME=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def custom_cases(ops, shapes, dtypes):
    kinds = op_kinds()
    cases = []
    for kind in ops:
        if kind not in kinds:
            raise ValueError(f"--op {kind!r}: not an operation; one of {', '.join(kinds)}")
        base = _ops.BY_KIND[kind.removesuffix("_grad")]
        for shape in shapes or [f"{r}x{c}" for r, c in [base.bench_shape or (4096, 32000)]]:
            rows, cols = parse_shape(shape)
            for dt in dtypes or ["float32"]:
                _ops.dtype_of(dt)
                cases.append(Case(kind, rows, cols, dt))
    return cases


def load_results(path):
    with open(path) as fh:
        return json.load(fh)["results"]


def main(args):
    """Run the cases and write the report into ``args.out`` (a folder ``output_dir``
    chose); with ``--compare``, set the run against a saved one (exit status 2 when a
    case got slower beyond the noise)."""
    options = parse_options(getattr(args, "options", None))
    old = load_results(args.compare) if getattr(args, "compare", None) else None
    if getattr(args, "op", None):
        cases, budget, stem_name = custom_cases(args.op, args.shape, args.dtype), 1.0, \
            "bench-custom"
    elif args.quick:
        cases, budget, stem_name = QUICK, 0.2, "bench-quick"
    else:
        cases, budget, stem_name = HEADLINE + BLOCKS + ([] if args.no_sweep else SWEEP), \
            0.5, "bench"
    if getattr(args, "dtype", None) and not getattr(args, "op", None):
        cases = [dataclasses.replace(c, dtype=dt) for c in cases for dt in args.dtype]
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only)]
    if getattr(args, "budget", None) is not None:
        budget = args.budget
    env, results = run(cases, args.peers, budget, backend=getattr(args, "backend", None),
                       options=options)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, stem_name)
    doc = {"environment": env, "results": results}
    with open(stem + ".json", "w") as fh:
        json.dump(doc, fh, indent=1)
    if getattr(args, "save", None):
        path = args.save if args.save.endswith(".json") else args.save + ".json"
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
    md = markdown(env, results)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    csv = csv_text(results)
    with open(stem + ".csv", "w") as fh:
        fh.write(csv)
    made = plot(results, stem + ".png")
    print()
    print(csv if getattr(args, "format", "table") == "csv" else md)
    print(f"wrote {stem}.json, {stem}.md, {stem}.csv" + (f", {stem}.png" if made else ""))
    if old is not None:
        rows = compare(results, old)
        print()
        print(f"against {args.compare}:")
        print(format_compare(rows) if rows else "no case in common")
        if any(v == "slower" for *_, v in rows):
            return 2
    return 0
