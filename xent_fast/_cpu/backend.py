"""The CPU backend's entry points, and the compile-and-cache machinery behind them.

Each driver (``drivers.py``, ``few_classes.py``) does one block of rows.  It is
compiled lazily and memoised, with ``cache=True`` on disk, serially (the ``"cpu"``
backend runs the whole batch as one block), and for the ``"parallel"`` backend a copy
of ``drivers.parallel_blocks`` is compiled with ``parallel=True`` around it, a
``prange`` over the blocks that calls the serial build: the row code is compiled once
for both.  Inputs are typed read-only whatever their flag, so one machine-code version
serves writable and read-only arrays.
"""

import contextlib
import hashlib
import math
import os
import threading
from types import FunctionType

import numpy as np
from numba import njit, types
from numba.np.numpy_support import from_dtype
from numba.core.errors import TypingError

from .. import _inputs
from . import avx512 as _simd
from . import threads as _threads
from . import arrays as _arrays
from .arrays import HostFloat, class_rows, elementwise_rows, grad_target, host, reduce_rows
from . import drivers
from .few_classes import SMALL_CLASSES, make_ce_small, small_name
from .jit import KERNEL, collector_paused, load_numba_math

# Before anything can start Numba's thread pool: every path to a kernel imports this module.
_threads.configure()


# Which positional arguments each driver writes (typed mutable); all others that are
# arrays are typed read-only.
_DRIVERS = {
    "targets": (drivers.targets, set()),
    "logsumexp": (drivers.logsumexp, {"out"}),
    "softmax": (drivers.make_softmax(False), {"out"}),
    "log_softmax": (drivers.make_softmax(True), {"out"}),
    "dist": (drivers.dist, {"out", "bad"}),
    "bce": (drivers.bce, {"out", "partial", "bad"}),
    "eval_stats": (drivers.eval_stats, {"st", "top"}),
}
# The drivers that can write a gradient, as two variants each: NAME and NAME_grad.
for _name, _outs in (("ce_index", {"g", "loss"}), ("ce_prob", {"g", "loss"}),
                     ("kl_logits", {"g", "out"}), ("jsd", {"g", "out"}),
                     ("sparse_kd", {"g", "out"}), ("pointwise", {"g", "out", "partial"}),
                     ("bce_logits", {"g", "out", "partial"})):
    for _grad in (False, True):
        _DRIVERS[_name + ("_grad" if _grad else "")] = (
            getattr(drivers, "make_" + _name)(_grad), _outs)
# The gradient that streams out (large ones only): the variant with the streaming path.
_DRIVERS["ce_index_grad_stream"] = (drivers.make_ce_index(True, True), {"g", "loss"})

_lock = threading.Lock()
_dispatchers = {}
_entry_points = {}


def _driver(name):
    """(python function, names of the arguments it writes) for driver ``name``."""
    entry = _DRIVERS.get(name)
    if entry is None and name.startswith("ce_small"):
        c, flags = name[8:].split("_")
        entry = _DRIVERS[name] = (make_ce_small(int(c), *(f == "1" for f in flags)),
                                  {"g", "loss"})
    return entry


def _family(name):
    """A driver's name without its gradient variant's suffix."""
    for suffix in ("_grad", "_grad_stream"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _blocked(func):
    """Does the driver do one block of rows (its last arguments ``nblocks, b``)?"""
    code = func.__code__
    return code.co_varnames[code.co_argcount - 1] == "b"


def _dispatcher(name, parallel, sig):
    """The dispatcher of driver ``name`` (serial), or of the parallel loop
    (``drivers.parallel_blocks``) that runs it on threads, for signature ``sig``.

    One dispatcher a signature, so that each of its cache entries has an index file of
    its own: worker processes compiling different signatures of one driver at once
    (see _warmup) never rewrite one index file and drop each other's entry.  The loop
    calls a driver by address, so a driver and its gradient variant (the same argument
    types) share one build of it."""
    family = _family(name)
    key = (family if parallel else name, parallel, sig)
    disp = _dispatchers.get(key)
    if disp is None:
        # Numba names a cache entry after the function and stamps it with its own file
        # only.  The name carries the threading mode and the signature (the index does
        # not tell them apart), and a digest of every kernel source file, so that a
        # change to any helper compiles afresh instead of loading stale machine code.
        tag = hashlib.sha256(repr(sig).encode()).hexdigest()[:8]
        if parallel:
            func = drivers.parallel_blocks
            cname = f"{family}_parallel_{tag}_{_source_digest()}"
            disp = _jit(_renamed(func, cname, func.__globals__, None), parallel=True)
        else:
            func, _ = _driver(name)
            cname = f"{func.__name__}_serial_{tag}_{_source_digest()}"
            disp = _jit(_renamed(func, cname, func.__globals__, func.__closure__),
                        parallel=False)
        _dispatchers[key] = disp
    return disp


def caches_to_disk():
    """Do compiled kernels go to an on-disk cache (else each process compiles)?"""
    from numba.core.caching import NullCache

    disp = _dispatcher("logsumexp", False, ())
    return not isinstance(getattr(disp, "_cache", None), (NullCache, type(None)))


def _renamed(func, name, glb, closure):
    code = func.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    func = FunctionType(code, glb, name, None, closure)
    func.__qualname__ = name
    return func


def _jit(func, parallel):
    opts = dict(KERNEL)
    opts.update(parallel=parallel, cache=True)
    try:
        return _light_cache_load(njit(**opts)(func))
    except RuntimeError as e:  # no writable cache location: compile every process
        if "cannot cache" not in str(e):
            raise
        _warn_no_cache(e)
        load_numba_math()
        opts.update(cache=False)
        return njit(**opts)(func)


def _light_cache_load(disp):
    """Load ``disp``'s cached machine code without readying Numba's compiler.

    Numba readies its whole compiler before it looks in its cache: it imports and
    registers the implementation of every Python and NumPy feature it can compile
    (0.2-0.5 s, most of a first call from a warm cache, the same for one kernel or
    fifty).  Running cached machine code needs none of that, only Numba's
    reference-counting runtime, which the code links against.  So a lookup here starts
    the runtime and reads the cache; only when it misses is the compiler readied, by
    the compile that follows (Numba's own, which readies it first).  Numba's own
    lookup is used where its cache class lacks the methods used, and for an entry that
    fails to load this way (so that a Numba release that needs more than its runtime
    to load machine code costs time, never the cache: an entry that fails there too is
    corrupt, and the caller rebuilds it).  Entries are written lighter too (see
    :func:`_symbols_only`).
    """
    cache = getattr(disp, "_cache", None)
    guard = getattr(cache, "_guard_against_spurious_io_errors", None)
    load = getattr(cache, "_load_overload", None)
    if guard is None or load is None:
        load_numba_math()
        return disp
    numba_load = cache.load_overload

    def load_overload(sig, target_context):
        from numba.core.runtime import rtsys

        rtsys.initialize(target_context)
        found = None
        try:
            with guard():  # as Numba's own lookup (it swallows some I/O errors on Windows)
                found = load(sig, target_context)
        except Exception:  # noqa: BLE001 - retried, with the compiler readied
            load_numba_math()
            return numba_load(sig, target_context)
        if found is None:
            load_numba_math()  # a compile follows: keep SciPy out of it
        return found

    cache.load_overload = load_overload
    _stable_index_key(cache)
    impl = getattr(cache, "_impl", None)
    if impl is not None and hasattr(impl, "reduce"):
        numba_reduce = impl.reduce
        impl.reduce = lambda cres: _symbols_only(numba_reduce(cres))
    return disp


def _stable_index_key(cache):
    """Key ``cache``'s entries by the names of the jitted functions in the driver's
    closure, not by their pickles.

    Numba keys an entry by the driver's bytecode and a pickle of its closure; a jitted
    function's pickle carries an id drawn afresh in every process, so a driver built
    around one (the elementwise drivers take their row function so) was never found
    again: compiled in every process, 1.2 s of each warm start.  The cache names carry
    the digest of every kernel source, so the name of a jitted function stands for its
    code.  Other closures keep Numba's key.
    """
    from numba.core.dispatcher import Dispatcher

    func = getattr(cache, "_py_func", None)
    cells = getattr(func, "__closure__", None) or ()
    values = [cell.cell_contents for cell in cells]
    if not any(isinstance(v, Dispatcher) for v in values) or not hasattr(cache, "_index_key"):
        return
    names = repr(tuple((v.py_func.__module__, v.py_func.__qualname__)
                       if isinstance(v, Dispatcher) else v for v in values)).encode()

    def index_key(sig, codegen):
        return (sig, codegen.magic_tuple(), (hashlib.sha256(func.__code__.co_code).hexdigest(),
                                             hashlib.sha256(names).hexdigest()))

    cache._index_key = index_key


def _symbols_only(data):
    """A compile result as Numba caches it, with the LLVM module kept beside the machine
    code (for inlining the function into other compiled code, which never happens to a
    driver: they are called by address) cut down to the names it defines.

    Loading an entry parses that module and walks its symbols, only to learn which names
    the machine code defines: 3-5 ms a kernel, a tenth of a warm start of the whole API.
    A module of empty functions of the same names answers the same question at once.
    Anything not shaped as expected is cached unchanged.
    """
    try:
        lib, rest = data[0], data[1:]
        name, kind, (objcode, bitcode) = lib
        if kind != "object" or not isinstance(bitcode, bytes):
            return data
        import llvmlite.binding as ll

        mod = ll.parse_bitcode(bitcode)
        lines = [f'define void @"{_llvm_name(f.name)}"() {{\n  ret void\n}}'
                 for f in mod.functions if not f.is_declaration]
        lines += [f'@"{_llvm_name(g.name)}" = global i8 0'
                  for g in mod.global_variables if not g.is_declaration]
        stub = ll.parse_assembly("\n".join(lines))
        stub.verify()
        return ((name, kind, (objcode, stub.as_bitcode())),) + tuple(rest)
    except Exception:  # noqa: BLE001 - a format this does not know: cache it whole
        return data


def _llvm_name(name):
    """``name`` escaped for a quoted LLVM identifier."""
    return "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:02X}"
                   for b in name.encode("utf-8"))


_warned_no_cache = False


def _warn_no_cache(err):
    global _warned_no_cache
    if not _warned_no_cache:
        _warned_no_cache = True
        import warnings

        warnings.warn(f"xent_fast: kernels are compiled without an on-disk cache ({err}); "
                      "set NUMBA_CACHE_DIR to a writable folder to keep them between "
                      "processes", RuntimeWarning, stacklevel=4)


# Drivers that touch their 2-D arrays only a row at a time, through
# ``row_access.row_at`` (a unit-stride 'C' row at any row stride).  Their 2-D arrays
# are typed 'A' whatever the array's layout: a C-contiguous batch and a row-strided
# one (a column slice such as ``logits[:, :-1]``, every other row) then run one
# machine code, where each compiled the whole driver again (a second cold compile of
# 3-9 s for the same code).  The elementwise drivers slice their arrays and the
# few-classes ones reshape them: they keep the exact layout.
_ROW_DRIVERS = frozenset({"logsumexp", "softmax", "log_softmax", "dist", "eval_stats",
                          "ce_index", "ce_prob", "kl_logits", "jsd", "sparse_kd"})


def _numba_type(value, writable, rows_only=False):
    if isinstance(value, np.ndarray):
        layout = "C" if value.flags.c_contiguous else "A"
        if rows_only and value.ndim == 2:
            layout = "A"
        return types.Array(from_dtype(value.dtype), value.ndim, layout, readonly=not writable)
    if isinstance(value, (bool, np.bool_)):
        return types.boolean
    if isinstance(value, (int, np.integer)):
        return types.int64
    return types.float64


def _signature(name, args, parallel):
    """The driver's types for ``args``; a serial block driver also takes the block
    number, and the parallel loop takes the serial driver's address and the arguments
    as one tuple."""
    func, outs = _driver(name)
    names = func.__code__.co_varnames[:func.__code__.co_argcount]
    rows_only = _family(name) in _ROW_DRIVERS
    sig = tuple(_numba_type(a, n in outs, rows_only) for n, a in zip(names, args))
    if not _blocked(func):
        return sig
    return (types.int64, types.Tuple(sig)) if parallel else sig + (types.int64,)


def _key(args):
    # Scalars are typed by position (the API passes each as bool, int or float always),
    # so only arrays vary the signature.
    return tuple([(a.dtype.num, a.ndim, a.flags.c_contiguous) if type(a) is np.ndarray
                  else type(a) for a in args])


def _compile(disp, sig):
    """Compile ``sig``, recovering from a corrupt on-disk cache by rebuilding it."""
    with collector_paused():
        try:
            disp.compile(sig)
        except TypingError:
            raise
        except Exception:  # unreadable cache file: drop the cache and compile afresh
            cache = getattr(disp, "_cache", None)
            if cache is not None:
                _remove_cache_files(cache)
            disp.compile(sig)
    return disp.overloads[sig].entry_point


def _source_digest():
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        for path in _kernel_sources():
            with open(path, "rb") as fh:
                h.update(os.path.basename(path).encode() + b"\0" + fh.read())
        h.update(b"simd" if _simd.ENABLED else b"scalar")  # XENT_FAST_SIMD=0 builds apart
        _digest = h.hexdigest()[:12]
    return _digest


def _kernel_sources():
    """Every file compiled code can come from: this folder, and the shared per-row
    formulas beside it."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py"))
    formulas = os.path.join(os.path.dirname(here), "_formulas.py")
    return files + ([formulas] if os.path.exists(formulas) else [])


_digest = None


def _remove_cache_files(cache):
    """Delete this module's cache files (only the drivers are cached)."""
    path = getattr(cache, "_cache_path", None)
    if not path or not os.path.isdir(path):
        return
    for fname in os.listdir(path):
        if fname.startswith(("drivers.", "few_classes.")) and fname.endswith((".nbi", ".nbc")):
            try:
                os.remove(os.path.join(path, fname))
            except OSError:
                pass


def _entry(name, parallel, args):
    """(compiled function, its kind) for driver ``name`` on ``args``: "plain" (called
    with ``args``), "block" (``args`` and the block number) or the address of the serial
    block driver that the parallel loop calls."""
    func = _driver(name)[0]
    sig = _signature(name, args, parallel)
    fn = _compile(_dispatcher(name, parallel, sig), sig)
    if not _blocked(func):
        return fn, "plain"
    if not parallel:
        return fn, "block"
    sig = _signature(name, args, False)
    serial = _dispatcher(name, False, sig)
    _compile(serial, sig)
    cres = serial.overloads[sig]
    return fn, cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)


def run(name, parallel, *args):
    """Call driver ``name`` on ``args`` (all prepared by the API layer; a block driver's
    last argument is its block count: 1 serially, unless partial sums a block are
    wanted)."""
    key = (name, parallel, _key(args))
    entry = _entry_points.get(key)
    if entry is None:
        with _lock:
            entry = _entry_points.get(key)
            if entry is None:
                entry = _entry_points[key] = _entry(name, parallel, args)
    fn, kind = entry
    if kind == "plain":
        return fn(*args)
    if kind == "block":
        for b in range(args[-1]):
            fn(*args, b)
        return None
    with _threads.guard():
        fn(kind, args)
    return None


def num_threads():
    return _threads.num_threads()


def kernels_ready():
    """How many compiled kernels this process holds (for ``warmup``'s count)."""
    return len(_entry_points)


# ---------------------------------------------------------------------------- entry points
# The same names and keyword options as the CUDA backend's (see _dispatch).  Arguments
# arrive checked by the front end (_api, _inputs); ``threads`` says whether to spread
# rows over threads.  Here: allocation, kernel choice, blocking and the reductions.
operand = HostFloat
describe = _arrays.describe
describe_grad = _arrays.describe_grad
to_host = _arrays.to_host

_ELEMENTWISE_BLOCK = 16384
_NO_WEIGHT = {np.dtype(d).char: np.ones(1, d) for d in (np.float32, np.float64)}


def _grad_variant(name, want_grad):
    return name + "_grad" if want_grad else name


def _nblocks(n, threads):
    return max(1, min(n, 8 * num_threads())) if threads else 1


def _weights(weight, c, dtype):
    """(kernel weights, has weights, summed weight) for a checked class weight."""
    if weight is None:
        return _NO_WEIGHT[dtype.char], False, float(c)
    w = np.ascontiguousarray(weight, dtype=dtype)
    return w, True, float(np.sum(w, dtype=np.float64))


def logsumexp(x, *, axis, keepdims, threads):
    rows, batch = class_rows(x.arr, axis)
    out = np.empty(rows.shape[0], x.out_dtype)
    run("logsumexp", threads, rows, x.hk, out, _nblocks(rows.shape[0], threads))
    res = out.reshape(batch)
    if keepdims:
        res = np.expand_dims(res, axis)
    return res[()] if res.ndim == 0 else res


def softmax(x, *, axis, log, threads):
    rows, batch = class_rows(x.arr, axis)
    out = np.empty(rows.shape, x.out_dtype)
    run("log_softmax" if log else "softmax", threads, rows, x.hk, out,
        _nblocks(rows.shape[0], threads))
    return np.moveaxis(out.reshape(batch + (rows.shape[1],)), -1, axis)


def dist(p, q, *, axis, mode, scale, threads):
    """Entropy (mode 0, ``q`` unused), cross-entropy (1) or KL divergence (2) of rows."""
    prow, batch = class_rows(p.arr, axis)
    qrow, _ = class_rows(q.arr, axis)
    out = np.empty(prow.shape[0], np.float64)
    bad = np.empty(prow.shape[0], np.int64)
    run("dist", threads, prow, p.hk, qrow, q.hk, mode, out, bad, _nblocks(prow.shape[0], threads))
    hits = np.flatnonzero(bad >= 0)
    if hits.size:
        i = int(hits[0])
        j = int(bad[i])
        c = prow.shape[1]
        name, src = ("p", p.source) if j < c else ("q", q.source)
        pos = _inputs.position(batch, axis, i, j % c if c else j)
        raise _inputs.not_probability(name, pos, src[pos])
    if scale != 1.0:
        out /= scale
    res = out.astype(p.out_dtype, copy=False).reshape(batch)
    return res[()] if res.ndim == 0 else res


# Below this many targets they are scanned by NumPy, above by a compiled pass (one read,
# no temporaries: 0.2-0.7 ms for 2^20 targets where NumPy takes 0.2-4.9 ms).  Small
# batches then never wait for that pass to compile, a first call's 0.4 s.
_COMPILED_SCAN_MIN = 1 << 15


def scan_targets(tf, c, ignore, w, has_w):
    """(index of the first of the flat int64 targets ``tf`` that is neither a class in
    [0, c) nor ``ignore``, or -1; the summed weight ``w`` of the kept targets (their count
    without ``has_w``), the "mean" denominator)."""
    if tf.shape[0] >= _COMPILED_SCAN_MIN:
        return run("targets", False, tf, c, ignore, w, has_w)
    if tf.shape[0] and 0 <= tf.min() and tf.max() < c and not 0 <= ignore < c:
        kept = None  # every target a class, none ignored
    else:
        kept = tf != ignore
        bad = kept & ((tf < 0) | (tf >= c))
        if bad.any():
            return int(bad.argmax()), 0.0
    if not has_w:
        return -1, float(tf.shape[0] if kept is None else np.count_nonzero(kept))
    if kept is None:
        return -1, float(np.sum(w[tf], dtype=np.float64))
    return -1, float(np.sum(w[tf[kept]], dtype=np.float64))


_streaming_forced = False


@contextlib.contextmanager
def streaming_forced():
    """Index-target gradients that may stream run the streaming variant of their driver,
    whatever their size (for warmup: a small call then builds the kernel a large one
    runs)."""
    global _streaming_forced
    _streaming_forced = True
    try:
        yield
    finally:
        _streaming_forced = False


def warm_target_scan(dtype):
    """Compile (or load) the compiled target scan for class weights of ``dtype``."""
    run("targets", False, np.zeros(1, np.int64), 1, -100, _NO_WEIGHT[np.dtype(dtype).char],
        False)


def check_targets(t, c, ignore, origin=None):
    """Integer host targets as a flat int64 array and the mean's denominator (the
    count of kept targets); an IndexError naming the first that is neither a class
    in [0, c) nor ``ignore``."""
    tf = _inputs.index_targets(t, c, ignore, origin)
    i, den = scan_targets(tf, c, ignore, _NO_WEIGHT["d"], False)
    if i >= 0:
        raise _inputs.bad_target(t.shape, i, tf[i], c, ignore, origin)
    return tf


def softmax_cross_entropy(x, targets, *, axis, kind, weight, ignore_index, label_smoothing,
                          z_loss, softcap, reduction, want_grad, grad_out, threads):
    rows, batch = class_rows(x.arr, axis)
    n, c = rows.shape
    eps, z, cap = label_smoothing, z_loss, softcap
    w, has_w, wsum = _weights(weight, c, x.out_dtype)
    if kind == "index":
        t = host(targets)
        ignore = ignore_index
        tf = _inputs.index_targets(t, c, ignore)
        i, den = scan_targets(tf, c, ignore, w, has_w)
        if i >= 0:
            raise _inputs.bad_target(t.shape, i, tf[i], c, ignore)
    else:
        t = x.companion(targets, "targets")
        trows, _ = class_rows(t.arr, axis)
        den = float(n)
    gscale = 1.0
    if reduction == "mean":
        gscale = 1.0 / den if den != 0 else math.nan
        if z != 0.0 and has_w and kind == "index":
            # The z-loss is not class-weighted: its mean is over the kept rows, not over
            # the summed weight the kernels divide by, so it enters them rescaled.
            # (With a summed weight of 0 the mean is 0/0 or x/0 whatever the z-loss.)
            kept = np.count_nonzero(tf != ignore)
            z = z * den / kept if kept else z
    others = (t if kind == "index" else t.source, weight)
    grad, g2, finish = grad_target(want_grad, grad_out, x, axis, rows.shape, others)
    nb = _nblocks(n, threads)
    small = kind == "index" and 2 <= c <= SMALL_CLASSES and x.hk == 0 and cap == 0.0
    # a loss a row, or for the few-classes kernels' sums and means one partial sum a block
    loss = np.empty(nb if small and reduction != "none" else n, np.float64)
    if small:
        rows = np.ascontiguousarray(rows)  # the few-classes kernels read rows back to back
        general = has_w or eps > 0  # the kernel that weighs and smooths, with w = 1 if unweighted
        if general and not has_w:
            w = np.ones(c, x.out_dtype)
        run(small_name(c, general, want_grad), threads, rows, tf, w, wsum, eps, z, ignore,
            gscale, g2, loss, nb)
    elif kind == "index":
        name = _grad_variant("ce_index", want_grad)
        if want_grad and drivers.streams(cap, x.hk, g2, _streaming_forced):
            name += "_stream"
        run(name, threads, rows, x.hk, tf, w, has_w, wsum, eps, z, cap, ignore, gscale, g2,
            x.hk, loss, nb)
    else:
        run(_grad_variant("ce_prob", want_grad), threads, rows, x.hk, trows, t.hk, w, has_w,
            eps, z, cap, gscale, g2, x.hk, loss, nb)
    if finish is not None:
        finish()
    res = reduce_rows(loss, batch, reduction, den, x.out_dtype)
    return (res, grad) if want_grad else res


def _reduce_kl(out, batch, reduction, den, out_dtype):
    """Per-row values reduced as the KL family reduces: any mean ("mean", "batchmean")
    divides the sum by ``den``."""
    return reduce_rows(out, batch, "mean" if reduction in ("mean", "batchmean") else reduction,
                       den, out_dtype)


def softmax_kl_divergence(x, t, *, axis, temperature, reduction, want_grad, grad_out,
                          threads):
    rows, batch = class_rows(x.arr, axis)
    trows, _ = class_rows(t.arr, axis)
    n, c = rows.shape
    den = _inputs.kl_denominator(reduction, n, c)
    gscale = 1.0 / den if den else math.nan
    grad, g2, finish = grad_target(want_grad, grad_out, x, axis, rows.shape, (t.source,))
    out = np.empty(n, np.float64)
    run(_grad_variant("kl_logits", want_grad), threads, rows, x.hk, trows, t.hk,
        1.0 / temperature, gscale, g2, x.hk, out, _nblocks(n, threads))
    if finish is not None:
        finish()
    res = _reduce_kl(out, batch, reduction, den, x.out_dtype)
    return (res, grad) if want_grad else res



def softmax_js_divergence(x, t, *, axis, beta, temperature, targets, ignore_index, reduction,
                          want_grad, grad_out, threads):
    rows, batch = class_rows(x.arr, axis)
    trows, _ = class_rows(t.arr, axis)
    n, c = rows.shape
    if targets is None:
        kept, keep = n, np.empty(0, np.uint8)
    else:
        keep = (host(targets).reshape(-1) != ignore_index).view(np.uint8)
        kept = int(np.count_nonzero(keep))
    den = _inputs.kl_denominator(reduction, kept, c)
    gscale = 1.0 / den if den else math.nan
    grad, g2, finish = grad_target(want_grad, grad_out, x, axis, rows.shape, (t.source,))
    out = np.empty(n, np.float64)
    mode = 0 if beta == 0 else 1 if beta == 1 else 2
    run(_grad_variant("jsd", want_grad), threads, rows, x.hk, trows, t.hk, keep,
        1.0 / temperature, float(beta), mode, gscale, g2, x.hk, out, _nblocks(n, threads))
    if finish is not None:
        finish()
    res = _reduce_kl(out, batch, reduction, den, x.out_dtype)
    return (res, grad) if want_grad else res


def sparse_targets(x, indices, values, *, axis, temperature, mode, reduction, want_grad,
                   grad_out, threads):
    """KL to a teacher (mode 0 renormalised, 1 residual) or cross-entropy (mode 2) with the
    target given on k classes a row: ``indices`` and ``values`` of the logits' shape with
    k along the class axis."""
    rows, batch = class_rows(x.arr, axis)
    n, c = rows.shape
    hi = np.moveaxis(host(indices), axis, -1)
    k = hi.shape[-1]
    idx = np.ascontiguousarray(hi.reshape(n, k), np.int64)
    _inputs.check_sparse_indices(idx, c, batch, axis, "target_indices" if mode == 2
                                 else "teacher_indices")
    v = np.ascontiguousarray(np.moveaxis(host(values), axis, -1).reshape(n, k), np.float64)
    den = _inputs.sparse_denominator(mode, reduction, n, c)
    gscale = 1.0 / den if den else math.nan
    grad, g2, finish = grad_target(want_grad, grad_out, x, axis, rows.shape, (idx, v))
    out = np.empty(n, np.float64)
    run(_grad_variant("sparse_kd", want_grad), threads, rows, x.hk, idx, v, 1.0 / temperature,
        mode, gscale, g2, x.hk, out, _nblocks(n, threads))
    if finish is not None:
        finish()
    res = _reduce_kl(out, batch, reduction, den, x.out_dtype)
    return (res, grad) if want_grad else res

def _elementwise_buffers(shape2, keep, dtype):
    """Output rows (kept only for ``"none"``) and one partial sum per kernel task."""
    n, c = shape2
    out = np.empty((n, c) if keep else (0, 0), dtype)
    ncb = max(1, -(-c // _ELEMENTWISE_BLOCK))
    return out, np.empty(n * ncb, np.float64), ncb


def _elementwise_weight(weight, dtype):
    return None if weight is None else host(weight).astype(dtype, copy=False)


def binary_cross_entropy(p, y, *, weight, reduction, threads):
    shape = p.shape
    w = _elementwise_weight(weight, p.out_dtype)
    p2, y2, w2 = elementwise_rows([p.arr, y.arr, w], shape)
    c = p2.shape[1]
    keep = reduction == "none"
    out, partial, ncb = _elementwise_buffers(p2.shape, keep, p.out_dtype)
    bad = np.empty(partial.size, np.int64)
    run("bce", threads, p2, p.hk, y2, y.hk,
        w2 if w2 is not None else np.ones((1, 0), p.out_dtype), w2 is not None, keep,
        _ELEMENTWISE_BLOCK, out, partial, bad, _nblocks(partial.size, threads))
    hits = np.flatnonzero(bad >= 0)
    if hits.size:
        task = int(hits[0])
        flat = (task // ncb) * c + int(bad[task])
        pos = tuple(int(v) for v in np.unravel_index(flat, shape)) if shape else ()
        raise _inputs.probs_out_of_range(pos, p.source[pos])
    if keep:
        return out.reshape(shape)
    return reduce_rows(partial, (), reduction, p2.size, p.out_dtype)


def binary_cross_entropy_with_logits(x, y, *, weight, pos_weight, reduction, want_grad,
                                     grad_out, threads):
    shape = x.shape
    w = _elementwise_weight(weight, x.out_dtype)
    pw = _elementwise_weight(pos_weight, x.out_dtype)
    size = math.prod(shape)
    gscale = (1.0 / size if size else math.nan) if reduction == "mean" else 1.0
    x2, y2, w2, pw2 = elementwise_rows([x.arr, y.arr, w, pw], shape)
    grad, g2, finish = grad_target(want_grad, grad_out, x, None, x2.shape, (y.source, w, pw))
    keep = reduction == "none"
    out, partial, _ = _elementwise_buffers(x2.shape, keep, x.out_dtype)
    dummy = np.ones((1, 0), x.out_dtype)
    run(_grad_variant("bce_logits", want_grad), threads, x2, x.hk, y2, y.hk,
        w2 if w2 is not None else dummy, w2 is not None, pw2 if pw2 is not None else dummy,
        pw2 is not None, gscale, g2, x.hk, keep, _ELEMENTWISE_BLOCK, out, partial,
        _nblocks(partial.size, threads))
    if finish is not None:
        finish()
    res = out.reshape(shape) if keep else reduce_rows(partial, (), reduction, size, x.out_dtype)
    return (res, grad) if want_grad else res



def pointwise(x, y, *, mode, alpha, gamma, reduction, den, want_grad, grad_out, threads):
    """An elementwise loss of rows.pointwise_row (``mode``), reduced: "none" keeps it,
    "sum" sums, any mean divides the sum by ``den``."""
    shape = x.shape
    x2, y2 = elementwise_rows([x.arr, y.arr], shape)
    gscale = 1.0 if reduction in ("none", "sum") else (1.0 / den if den else math.nan)
    grad, g2, finish = grad_target(want_grad, grad_out, x, None, x2.shape, (y.source,))
    keep = reduction == "none"
    out, partial, _ = _elementwise_buffers(x2.shape, keep, x.out_dtype)
    run(_grad_variant("pointwise", want_grad), threads, x2, x.hk, y2, y.hk, mode,
        float(alpha), float(gamma), 0, gscale, g2, x.hk, keep, _ELEMENTWISE_BLOCK, out,
        partial, _nblocks(partial.size, threads))
    if finish is not None:
        finish()
    if keep:
        res = out.reshape(shape)
    else:
        res = _reduce_kl(partial, (), reduction, den, x.out_dtype)
    return (res, grad) if want_grad else res


def nll_loss(x, targets, *, axis, weight, ignore_index, reduction, want_grad, grad_out,
             threads):
    """-w_t x_t per row: a gather (the rows' other entries are not read), and a gradient
    that is zero but at the targets."""
    src = host(x.source)
    c = src.shape[axis]
    batch = _inputs.batch_shape(src.shape, axis)
    tf = check_targets(host(targets), c, ignore_index)
    keep = tf != ignore_index
    ts = np.where(keep, tf, 0)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    wt = np.where(keep, w[ts], 0.0)
    idx = np.expand_dims(ts.reshape(batch), axis)
    picked = np.take_along_axis(src, idx, axis).astype(np.float64).reshape(-1)
    loss_rows = np.where(keep, -wt * picked, 0.0)
    den = float(wt.sum())
    res = reduce_rows(loss_rows, batch, reduction, den, x.out_dtype)
    if not want_grad:
        return res
    scale = (1.0 / den if den else math.nan) if reduction == "mean" else 1.0
    grad = np.zeros(src.shape, x.dtype) if grad_out is None else grad_out
    g = host(grad)
    g[...] = 0
    vals = np.expand_dims((-wt * scale).reshape(batch), axis).astype(g.dtype)
    np.put_along_axis(g, idx, vals, axis)
    return res, grad

def row_stats(rows, hk, tf, *, lo=0, whole=True, k=0, threads=False):
    """Evaluation statistics of (n, c) kernel rows whose first class is ``lo``: (n, 6)
    float64 and, with ``k``, each row's ``k`` largest logits.  ``whole``: the rows are
    complete, so the count of logits above the target's is exact."""
    n = rows.shape[0]
    st = np.empty((n, 6), np.float64)
    top = np.empty((n, k), np.float64)
    run("eval_stats", threads, rows, hk, tf, int(lo), bool(whole), st, top, _nblocks(n, threads))
    return st, top


def eval_stats(x, targets, *, axis, ignore_index, threads):
    """(statistics (n, 6) float64, targets as a flat int64 array) of whole rows."""
    rows, _ = class_rows(x.arr, axis)
    tf = check_targets(host(targets), rows.shape[1], ignore_index)
    st, _ = row_stats(rows, x.hk, tf, threads=threads)
    return st, tf
