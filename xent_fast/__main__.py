"""Command line: xent-fast demo, xent-fast bench and xent-fast eval (also
python -m xent_fast).  Plain text: argparse shows this as the description."""

import argparse
import math
import sys
import textwrap
import time

import numpy as np

from . import _ops
from ._cpu import threads as _threads


def _timeit(fn, repeat):
    fn()  # compile / warm
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _worked_examples():
    """The demo's worked examples, one line each: the bag of balls in nats (natural log)
    with bits (base 2) beside, and two coins in bits."""
    import xent_fast as xf

    p, q = np.array([0.8, 0.1, 0.1]), np.array([0.2, 0.2, 0.6])
    lines = ["Worked examples (nats: natural log; bits: base 2):",
             f"  fair coin entropy            {float(xf.entropy([0.5, 0.5], base=2)):.3f} bits",
             f"  90:10 coin entropy           {float(xf.entropy([0.9, 0.1], base=2)):.3f} bits"]
    for label, fn, operands in (("bag p=(.8,.1,.1) H(p)", xf.entropy, (p,)),
                                ("guess q=(.2,.2,.6) H(p,q)", xf.cross_entropy, (p, q)),
                                ("KL(p||q) = H(p,q) - H(p)", xf.kl_divergence, (p, q))):
        lines.append(f"  {label:28s} {float(fn(*operands)):.3f} nats "
                     f"({float(fn(*operands, base=2)):.3f} bits)")
    return lines


def _demo(args):
    import xent_fast as xf
    from xent_fast import reference as R

    print("xent_fast demo: the worked examples, a check of every kernel, and speed\n")
    print("\n".join(_worked_examples()) + "\n")

    rng = np.random.default_rng(0)
    d = _ops.demo_inputs(rng)
    print("Every kernel against the float64 reference (float32 input, 257 x 1000):")
    worst = 0.0
    for op in _ops.OPS:
        if op.check is None:
            continue
        g, w = op.call(xf, d, **op.check), op.call(R, d, **op.check)
        if op.check.get("return_grad"):  # the gradient is what is compared
            g, w = g[1], w[1]
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = float(np.max(np.abs(g - w) / (np.abs(w) + 1e-6)))
        worst = max(worst, err)
        print(f"  {op.name:34s} max rel. error {err:.1e}  {'ok' if err < 1e-4 else 'FAIL'}")

    n, c = args.rows, args.classes
    big = rng.standard_normal((n, c)).astype(np.float32)
    tb = rng.integers(0, c, n)
    grad = np.empty_like(big)
    print(f"\nSpeed on ({n}, {c}) float32 logits, best of {args.repeat}, "
          f"{_threads.describe()}, compile excluded:")
    print(f"  {'case':38s} {'xent_fast':>10s} {'NumPy ref':>10s} {'speed-up':>9s}")
    cases = [
        ("softmax_cross_entropy forward", lambda: xf.softmax_cross_entropy(big, tb),
         lambda: R.softmax_cross_entropy(big, tb)),
        ("softmax_cross_entropy fwd+bwd", lambda: xf.softmax_cross_entropy(big, tb, grad_out=grad),
         lambda: R.softmax_cross_entropy(big, tb, return_grad=True)),
        ("logsumexp", lambda: xf.logsumexp(big), lambda: R.logsumexp(big)),
        ("softmax_kl_divergence", lambda: xf.softmax_kl_divergence(big, big[::-1]),
         lambda: R.softmax_kl_divergence(big, big[::-1])),
    ]
    for name, fast, ref in cases:
        tf = _timeit(fast, args.repeat)
        tr = _timeit(ref, 1)
        print(f"  {name:38s} {tf * 1e3:8.1f}ms {tr * 1e3:8.1f}ms {tr / tf:8.1f}x")
    return 0 if worst < 1e-4 else 1


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, stream, width=30):
        self.stream = stream
        self.width = width
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done, total, final=False):
        now = time.perf_counter()
        if not final and done < total and now - self.last < 0.1:
            return
        self.last = now
        frac = done / total if total else 1.0
        fill = int(frac * self.width)
        rate = done / (now - self.t0) if now > self.t0 else 0.0
        self.stream.write(f"\r[{'#' * fill}{'.' * (self.width - fill)}] {frac:6.1%} "
                          f"{done}/{total} rows  {rate:,.0f} rows/s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _json_number(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _inspect_logits(path, axis):
    """Refuse a logits file with no rows (every metric would be NaN: a wrong path or an
    empty dump, not a result); note on stderr when integer or bool logits are read as
    float64.  Other problems are left to the evaluation, which names them."""
    from . import _stream

    src = _stream.open_source(path, "logits")
    try:
        shape, dtype, name = tuple(src.shape), src.dtype, src.name
    finally:
        src.close()
    if shape and -len(shape) <= axis < len(shape):
        batch = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]
        if math.prod(batch) == 0:
            raise ValueError(f"{name} holds no rows (shape {shape}, class axis "
                             f"{axis % len(shape)}): nothing to evaluate")
    if dtype.kind in "iub":
        print(f"xent-fast eval: note: {name} holds {dtype} values, read as float64 logits",
              file=sys.stderr)
    elif dtype.kind == "V" and dtype.itemsize == 2 and dtype.name != "bfloat16" \
            and dtype.fields is None:
        print(f"xent-fast eval: note: {name} holds 2-byte raw values ({dtype.str}), "
              "read as bfloat16 (how np.save stores ml_dtypes.bfloat16)", file=sys.stderr)


def _eval(args):
    import json

    from . import _stream

    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = _ProgressBar(sys.stderr) if show else None
    opts = dict(axis=args.axis, ignore_index=args.ignore_index, topk=tuple(args.topk),
                n_bins=args.n_bins, chunk_rows=args.chunk_rows)
    if args.scheduler and args.backend not in ("auto", "cpu"):
        print(f"xent-fast eval: error: --backend {args.backend} does not apply with "
              "--scheduler (the workers run the serial CPU kernels)", file=sys.stderr)
        return 1
    missing = _missing_extra(args)
    if missing:
        print(f"xent-fast eval: error: {missing}", file=sys.stderr)
        return 1
    try:
        _inspect_logits(args.logits, args.axis)
        if args.scheduler:
            from .dask import _evaluate_files_on_cluster

            res = _evaluate_files_on_cluster(args.logits, args.targets, args.scheduler,
                                             progress=bar, **opts)
        else:
            res = _stream.evaluate_file(args.logits, args.targets, progress=bar,
                                        backend=args.backend, **opts)
    except KeyboardInterrupt:
        print("\nxent-fast eval: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        if bar is not None and bar.last:
            sys.stderr.write("\n")
        msg = str(e) or type(e).__name__
        if type(e) not in (ValueError, IndexError, TypeError, FileNotFoundError,
                           NotImplementedError):
            msg = f"{type(e).__name__}: {msg}"
        print(f"xent-fast eval: error: {msg.splitlines()[0] if msg else msg}",
              file=sys.stderr)
        return 1
    if res.nan_count:
        print(f"xent-fast eval: warning: {res.nan_count} of {res.count} rows hold NaN "
              "logits: their metrics are NaN, so are the means and the ECE, and they count "
              "as wrong in the accuracy", file=sys.stderr)
    if args.format == "json":
        d = res.as_dict()
        d["accuracy"] = {k: _json_number(v) for k, v in d["accuracy"].items()}
        print(json.dumps({k: (_json_number(v) if not isinstance(v, dict) else v)
                          for k, v in d.items()}, indent=2))
    else:
        print(res.table())
    return 0


def _version():
    """The installed distribution's version, else the package's ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("xent_fast")
    except metadata.PackageNotFoundError:
        import xent_fast

        return getattr(xent_fast, "__version__", "unknown")


def _missing_extra(args):
    """One line naming the extra to install when an ``eval`` option needs a package
    that is missing (or a GPU that is not there); None when everything is at hand."""
    if args.scheduler:
        import importlib

        try:
            for name in ("dask.array", "distributed"):
                importlib.import_module(name)
        except ImportError as e:
            return (f"--scheduler needs Dask and distributed ({e}): "
                    'pip install "xent_fast[dask]"')
    if args.backend == "cuda":
        from ._stream import _gpu_backend

        try:
            _gpu_backend()
        except (ImportError, RuntimeError) as e:  # the API's message, naming the extra
            return str(e).splitlines()[0]
    return None


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, wrapping lines at spaces only: never inside a hyphenated
    name such as bench-results or xent-fast."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


DESCRIPTION = ("Fast, checked cross-entropy kernels: run the worked examples and check "
               "every kernel (demo), time them against their peers (bench), evaluate "
               "stored logits (eval), or compile the kernels ahead of use (warmup).  "
               "Also: python -m xent_fast.")


def build_parser():
    """The argument parser of ``xent-fast`` (its subcommands are ``demo``, ``bench``,
    ``eval`` and ``warmup``)."""
    parser = argparse.ArgumentParser(prog="xent-fast", description=DESCRIPTION,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"xent-fast {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo", formatter_class=_HelpFormatter,
        help="worked examples, kernel checks and a speed table",
        description="Print the worked examples (entropy, cross-entropy and KL of a bag of "
                    "balls, in nats and bits), check every kernel against the float64 "
                    "reference, and time a few against the NumPy reference.  The first "
                    "call of each function compiles its kernels.")
    d.add_argument("--rows", type=int, default=4096, metavar="N",
                   help="rows of the logits timed (default 4096)")
    d.add_argument("--classes", type=int, default=32000, metavar="C",
                   help="classes of the logits timed (default 32000)")
    d.add_argument("--repeat", type=int, default=5, metavar="R",
                   help="calls timed per case, the best one reported (default 5)")
    b = sub.add_parser(
        "bench", formatter_class=_HelpFormatter,
        help="time every headline case against the peers and the measured memory floor; "
             "write JSON, markdown and a plot",
        description="Time every headline case against the peers installed beside "
                    "xent_fast (NumPy reference, SciPy, PyTorch, JAX) and against the "
                    "machine's memory floor.  Prints the table and writes JSON, markdown "
                    "and a plot into a new folder, bench-results/TIMESTAMP/, unless --out "
                    "names one.")
    b.add_argument("--quick", action="store_true", help="a subset, under 2 minutes")
    b.add_argument("--only", nargs="+", metavar="TEXT",
                   help="run only cases whose name contains TEXT (e.g. 'ce 4096')")
    b.add_argument("--peers", nargs="+", choices=list(_ops.PEERS),
                   help="peers to compare against (default: every one importable)")
    b.add_argument("--no-sweep", action="store_true", help="skip the class-count sweep")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the JSON, markdown and PNG (default: a new "
                        "bench-results/TIMESTAMP/ folder); a folder that already holds "
                        "results is refused unless --force is given")
    b.add_argument("--force", action="store_true",
                   help="write into --out even if it holds results (they are overwritten)")
    b.add_argument("--op", nargs="+", metavar="OP",
                   help="time your own case instead of the built-in ones: an operation "
                        "(ce, ce_grad, ce_probs, kl, kl_grad, jsd, kl_sparse, bce_logits, "
                        "logsumexp, softmax, evaluate, nll, kl_div, focal, ...; KIND_grad "
                        "times the gradient too) at each --shape and --dtype")
    b.add_argument("--shape", nargs="+", metavar="SHAPE",
                   help="with --op: ROWSxCLASSES (e.g. 8192x50257), or BATCHxSEQxCLASSES "
                        "(the batch axes become rows); default the operation's own")
    b.add_argument("--dtype", nargs="+", metavar="DTYPE",
                   choices=["float32", "float64", "float16", "bfloat16"],
                   help="input dtype(s): float32 (default), float64, float16, bfloat16")
    b.add_argument("--backend", choices=["auto", "cpu", "parallel", "cuda"], default=None,
                   help="time xent_fast on this backend only (default: auto and the "
                        "serial cpu)")
    b.add_argument("--options", metavar="K=V,...",
                   help="keywords of xent_fast's call (and the reference's), e.g. "
                        "label_smoothing=0.1,z_loss=1e-4; the peers run without them")
    b.add_argument("--save", metavar="NAME",
                   help="also write the run's JSON to NAME(.json), for a later --compare")
    b.add_argument("--compare", metavar="OLD.json",
                   help="set this run against a saved one, case by case: the ratio "
                        "now/then with its range, cases slower beyond the noise flagged "
                        "(exit status 2)")
    b.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="seconds of timed rounds a case may take once every "
                        "implementation has run three times (default 0.2 with --quick, "
                        "1 with --op, else 0.5); rounds stop sooner when every "
                        "interquartile range is within 5%% of its median")
    b.add_argument("--format", choices=["table", "csv"], default="table",
                   help="print the markdown table (default) or CSV (the files hold both)")
    e = sub.add_parser(
        "eval", formatter_class=_HelpFormatter,
        help="evaluation metrics (cross-entropy, perplexity, top-k accuracy, entropy, "
             "target probability, ECE) of stored logits, streamed",
        description="Evaluate stored logits against class-index targets in one pass over "
                    "row chunks (bounded memory). LOGITS and TARGETS are .npy files "
                    "(memory-mapped), .npz files (FILE.npz or FILE.npz:KEY) or Zarr "
                    "array directories.  A bad file is one line on stderr and exit "
                    "status 1.")
    e.add_argument("logits", metavar="LOGITS",
                   help="the logits: FILE.npy, FILE.npz, FILE.npz:KEY or a Zarr array")
    e.add_argument("targets", metavar="TARGETS",
                   help="the class-index targets (integers), in the same formats")
    e.add_argument("--axis", type=int, default=-1, help="the class axis (default -1)")
    e.add_argument("--ignore-index", type=int, default=-100,
                   help="target value of rows to leave out (default -100)")
    e.add_argument("--topk", type=int, nargs="+", default=[1, 5], metavar="K",
                   help="top-k accuracies to report (default 1 5)")
    e.add_argument("--n-bins", type=int, default=15, help="ECE confidence bins (default 15)")
    e.add_argument("--chunk-rows", type=int, default=None, metavar="N",
                   help="rows per chunk (default: about 32 MB of logits)")
    e.add_argument("--format", choices=["table", "json"], default="table",
                   help="print a table (default) or JSON")
    e.add_argument("--json", dest="format", action="store_const", const="json",
                   help="same as --format json")
    e.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")
    e.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never draw the progress bar")
    e.add_argument("--backend", choices=["auto", "cpu", "parallel", "cuda"], default="auto",
                   help="where the kernels run: auto (threads for large chunks; the "
                        "default), cpu (one thread), parallel (threads) or cuda (each "
                        "chunk copied to the GPU; pip install \"xent_fast[cuda]\"); with "
                        "--scheduler the workers run the serial CPU kernels")
    e.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run on a Dask distributed cluster (e.g. tcp://host:8786; "
                        'pip install "xent_fast[dask]"); the workers must see the files '
                        "at the same paths")
    w = sub.add_parser(
        "warmup", formatter_class=_HelpFormatter,
        help="compile kernels now into the on-disk cache (say, in a container build)",
        description="Compile the kernels of the named functions (default: every one) "
                    "for the dtypes and backends given into Numba's on-disk cache "
                    "(NUMBA_CACHE_DIR, else the package's __pycache__), sharing the work "
                    "over one process a core, so that later processes load them instead "
                    "of compiling.  The same as xent_fast.warmup().")
    w.add_argument("--functions", nargs="+", metavar="NAME",
                   help="public functions whose kernels to compile, e.g. "
                        "softmax_cross_entropy (default: every function)")
    w.add_argument("--dtypes", nargs="+", metavar="DTYPE", default=["float32", "float64"],
                   choices=["float32", "float64"],
                   help="input dtypes: float32, float64 (default both)")
    w.add_argument("--backends", nargs="+", metavar="BACKEND", default=["cpu", "parallel"],
                   choices=["cpu", "parallel"],
                   help="CPU backends: cpu (one thread), parallel (threads); default both")
    w.add_argument("--no-grad", action="store_true",
                   help="leave out the gradient kernels")
    w.add_argument("--classes", nargs="+", type=int, default=[], metavar="C",
                   help="class counts from 2 to 16 whose cross-entropy kernels to compile "
                        "too (they are built per count, e.g. --classes 10 for ten classes)")
    w.add_argument("--processes", type=int, default=None, metavar="N",
                   help="processes compiling at once (default: one a CPU)")
    return parser


def _warmup_command(args):
    import time

    from . import _warmup
    from ._dispatch import cpu

    if not cpu().caches_to_disk():
        print("xent-fast warmup: error: no writable cache folder, so compiled kernels "
              "cannot be kept; set NUMBA_CACHE_DIR to one", file=sys.stderr)
        return 1
    if args.processes is not None and args.processes < 1:
        print("xent-fast warmup: error: --processes must be at least 1", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        made = _warmup.warmup(args.dtypes, args.backends, args.processes,
                              functions=args.functions, grad=not args.no_grad,
                              classes=args.classes)
    except ValueError as err:
        print(f"xent-fast warmup: error: {err}", file=sys.stderr)
        return 1
    print(f"{made} kernels ready in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "warmup":
        return _warmup_command(args)
    if args.command == "bench":
        from . import _bench

        try:
            args.out = _bench.output_dir(args.out, force=args.force)
            if args.op:
                _bench.custom_cases(args.op, args.shape, args.dtype)  # checked up front
            _bench.parse_options(args.options)
            if args.compare:
                _bench.load_results(args.compare)
        except (FileExistsError, ValueError, OSError, KeyError) as err:
            print(f"xent-fast bench: error: {err}", file=sys.stderr)
            return 1
        return _bench.main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
