"""Compile (or load from the on-disk cache) the kernels ahead of the first real call.

Compiling is single-threaded (Numba holds one lock), so :func:`warmup` shares the work
out between processes, one a core: this one and workers that fill Numba's on-disk
cache, from which this process then loads their kernels.  Each dtype's operations stay
together where the cores allow (the row helpers they share compile once a process and
dtype), and operations that run the same driver go to the same process.  Every
signature of a driver has a cache index of its own (see the CPU backend), so that
processes never rewrite each other's; a kernel that a worker did not leave is
compiled here.
"""

import json
import os
import subprocess
import sys

import numpy as np

from . import _dispatch, _ops

_DTYPES = {"float32": np.float32, "float64": np.float64}
# Wide enough for the general kernels: index targets over at most SMALL_CLASSES (16)
# classes take kernels built for the exact class count, compiled on first use.
_WARM_CLASSES = 64
_WARM_ROWS = 2
# Operations (by _ops kind) that share a driver, or most of its helpers, with another:
# they are warmed together.
_SHARES_DRIVER = {"log_softmax": "softmax", "cross_entropy": "entropy",
                  "kl_divergence": "entropy", "evaluate": "ce"}
# Rough compile seconds of an operation per dtype (loss and gradient), to balance the
# workers; an operation not listed counts 1.
_COST = {"ce": 7.0, "ce_probs": 5.0, "kl": 5.0, "bce_logits": 3.5, "logsumexp": 2.5,
         "entropy": 1.5, "softmax": 1.5, "evaluate": 2.0}


def warmup(dtypes=("float32", "float64"), backends=("cpu", "parallel"), processes=None, *,
           functions=None, grad=True, classes=()):
    """Compile the kernels of ``functions`` for ``dtypes`` on ``backends`` now, instead
    of on first use.

    ``functions``: names of public functions (``"softmax_cross_entropy"``, ...), or
    ``None`` for all of them.  Covers what the first call of each runs on C-contiguous
    inputs of those dtypes, with a gradient too where ``grad`` (a loss and its gradient
    are two kernels: each compiles only the code it runs), except the few-classes
    cross-entropy kernels, which are built per class count (2 to 16): name the counts
    you use in ``classes`` (``classes=[10]`` for ten classes) to build theirs too (with
    and without class weights or label smoothing, which are two kernels there).
    The first call in a fresh environment compiles (1-3 s per kernel; all of them
    take 25-40 s on 2 cores) in up to ``processes`` worker processes at once
    (default: one a CPU; 1 compiles here only); later processes load the machine code
    from Numba's cache (``NUMBA_CACHE_DIR`` or the package's ``__pycache__``) in
    milliseconds.  Name only what you call to compile less: a training loop's
    ``warmup(["float32"], functions=["softmax_cross_entropy"])``.  Returns the number of
    kernels made ready in this process by this call (0 when all were ready already).
    """
    from ._dispatch import cpu

    kinds = _kinds(functions)
    kinds += _small_kinds(classes) if "ce" in kinds else []
    dtypes = _dtype_names(dtypes)
    backends = list(backends)
    grad = bool(grad)
    if processes is None:
        processes = os.cpu_count() or 1
    be = cpu()
    before = be.kernels_ready()
    todo = [(k, d, b, g) for k in kinds for d in dtypes for b in backends
            for g in (False, True)[:1 + grad] if (k, d, b, g) not in _done]
    if todo:
        todo_kinds = list(dict.fromkeys(k for k, _, _, _ in todo))
        shares = _shares(dtypes, int(processes), todo_kinds) if be.caches_to_disk() else []
        workers = [_start_worker(ks, dts, backends, grad) for ks, dts in shares[1:]]
        if shares:  # this process's share first, while the workers compile theirs
            _warm(*shares[0], backends, grad)
        for w in workers:
            w.wait()
        _warm(todo_kinds, dtypes, backends, grad)  # from the cache, or compiled
        _done.update(todo)
    return be.kernels_ready() - before


def _kinds(functions):
    """The operations (``_ops`` kinds) that the named public functions run."""
    if functions is None:
        return [op.kind for op in _ops.OPS]
    if isinstance(functions, str):
        functions = [functions]
    by_name = {}
    for op in _ops.OPS:
        by_name.setdefault(op.name.split(" ")[0], []).append(op.kind)
    kinds = []
    for name in functions:
        if name not in by_name:
            raise ValueError(f"functions: no kernels to warm for {name!r}; one of "
                             f"{', '.join(sorted(by_name))}")
        kinds += by_name[name]
    return list(dict.fromkeys(kinds))


def _small_kinds(classes):
    """Pseudo-kinds ``"ce_small:C"`` for the few-classes kernels of ``classes``."""
    from ._cpu.few_classes import SMALL_CLASSES

    if isinstance(classes, (int, np.integer)):
        classes = [classes]
    kinds = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) \
                or not 2 <= c <= SMALL_CLASSES:
            raise ValueError(f"classes: class counts from 2 to {SMALL_CLASSES} (more "
                             f"classes run the general kernels, warmed anyway); got {c!r}")
        kinds.append(f"ce_small:{int(c)}")
    return list(dict.fromkeys(kinds))


def _dtype_names(dtypes):
    if isinstance(dtypes, str):
        dtypes = [dtypes]
    names = []
    for d in dtypes:
        try:
            names.append(np.dtype(_DTYPES.get(d, d)).name)
        except TypeError:
            raise TypeError(f"dtypes: {d!r} is not a dtype (float32 or float64, say)") \
                from None
    return names


def _cost(kind):
    return 4.0 if kind.startswith("ce_small:") else _COST.get(kind, 1)


_done = set()  # (kind, dtype, backend, grad) a warmup() of this process has covered


def _warm(kinds, dtypes, backends, grad=True):
    """Every operation of ``kinds`` once per dtype and backend, without a gradient and
    (where ``grad``) with one, on inputs of its own."""
    import xent_fast as xf

    ops = [op for op in _ops.OPS if op.kind in kinds]
    small = [int(k.split(":")[1]) for k in kinds if k.startswith("ce_small:")]
    for name in dtypes:
        dt = np.dtype(name)
        inputs = [(op, op.make_inputs(_WARM_ROWS, _WARM_CLASSES, dt)) for op in ops]
        for be in backends:
            for op, d in inputs:
                op.call(xf, d, backend=be)
                if op.grad and grad:
                    op.call(xf, d, backend=be, return_grad=True)
                if op.kind == "ce" and grad:  # and the variant of gradients that stream
                    with _dispatch.cpu().streaming_forced():
                        op.call(xf, d, backend=be, return_grad=True)
            if be == backends[0]:
                for scan in _target_scans(kinds, dt):
                    _dispatch.cpu().warm_target_scan(scan)
            for c in small:  # plain, and weighted or smoothed: two kernels a count
                x = np.zeros((_WARM_ROWS, c), dt)
                t = np.arange(_WARM_ROWS) % c
                for kw in ({}, {"label_smoothing": 0.1}):
                    for want in (False, True)[:1 + grad]:
                        xf.softmax_cross_entropy(x, t, backend=be, return_grad=want, **kw)


def _target_scans(kinds, dt):
    """The weight dtypes of the compiled target scans that the operations of ``kinds``
    run on ``dt`` inputs of 2^15 targets or more (fewer are scanned by NumPy)."""
    scans = []
    if "ce" in kinds:
        scans.append(dt)  # the class weights in the logits' dtype
    if {"nll", "evaluate"} & set(kinds) and np.dtype(np.float64) not in scans:
        scans.append(np.dtype(np.float64))
    return scans


def _groups(kinds=None):
    """The operations' kinds (of ``kinds``), those that share a driver together,
    costliest first."""
    groups = {}
    for kind in [op.kind for op in _ops.OPS] if kinds is None else kinds:
        groups.setdefault(_SHARES_DRIVER.get(kind, kind), []).append(kind)
    return sorted(groups.values(), key=lambda ks: -sum(_cost(k) for k in ks))


def _shares(dtypes, count, kinds=None):
    """At most ``count`` shares of the work on ``kinds`` (all operations by default),
    (kinds, dtypes) each, of about equal compile time: whole dtypes while there are
    fewer processes than dtypes, else each dtype's operations spread over its
    processes."""
    count = max(1, count)
    every = [op.kind for op in _ops.OPS] if kinds is None else list(kinds)
    if count <= len(dtypes):
        return [(every, dtypes[i::count]) for i in range(count)]
    shares = []
    for i, dt in enumerate(dtypes):
        n = count // len(dtypes) + (i < count % len(dtypes))
        parts, load = [[] for _ in range(n)], [0.0] * n
        for group in _groups(every):
            j = load.index(min(load))
            parts[j] += group
            load[j] += sum(_cost(k) for k in group)
        shares += [(part, [dt]) for part in parts if part]
    return shares


def _start_worker(kinds, dtypes, backends, grad):
    """A process that compiles ``kinds`` for ``dtypes`` on ``backends`` into the cache
    (its output is dropped: whatever it fails to leave is compiled by the caller)."""
    import xent_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(xent_fast.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    code = ("import sys, json; from xent_fast._warmup import _warm; "
            "_warm(*json.loads(sys.argv[1]))")
    args = json.dumps([kinds, dtypes, backends, grad])
    return subprocess.Popen([sys.executable, "-c", code, args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
