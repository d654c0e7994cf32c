"""The CPU backend's entry points, and the compile-and-cache machinery behind them.

Each driver (``drivers.py``, ``few_classes.py``) is compiled lazily and memoised, with
``cache=True`` on disk, once for ``parallel=False`` (the ``"cpu"`` backend) and once for
``parallel=True`` (``"parallel"``).  Inputs are typed read-only whatever their flag, so
one machine-code version serves writable and read-only arrays.
"""

import hashlib
import os
import threading
from types import FunctionType

import numpy as np
from numba import njit, types
from numba.np.numpy_support import from_dtype
from numba.core.errors import TypingError

from . import avx512 as _simd
from . import threads as _threads
from .drivers import (_bce, _bce_logits, _ce_index, _ce_prob, _dist, _eval_stats, _kl_logits,
                      _logsumexp, _softmax, _targets)
from .few_classes import SMALL_CLASSES, make_ce_small, small_name
from .jit import JIT

# Before anything can start Numba's thread pool: every path to a kernel imports this module.
_threads.configure()


# Which positional arguments each driver writes (typed mutable); all others that are
# arrays are typed read-only.
_DRIVERS = {
    "targets": (_targets, set()),
    "logsumexp": (_logsumexp, {"out"}),
    "softmax": (_softmax, {"out"}),
    "dist": (_dist, {"out", "bad"}),
    "ce_index": (_ce_index, {"g", "loss"}),
    "ce_prob": (_ce_prob, {"g", "loss"}),
    "kl_logits": (_kl_logits, {"g", "out"}),
    "bce": (_bce, {"out", "partial", "bad"}),
    "eval_stats": (_eval_stats, {"st", "top"}),
    "bce_logits": (_bce_logits, {"g", "out", "partial"}),
}

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


def _dispatcher(name, parallel):
    key = (name, parallel)
    disp = _dispatchers.get(key)
    if disp is None:
        func, _ = _driver(name)
        # Numba names a cache entry after the function and stamps it with its own file
        # only.  The name carries the threading mode (the index does not tell serial and
        # parallel builds apart) and a digest of every kernel source file, so that a
        # change to any helper compiles afresh instead of loading stale machine code.
        cname = f"{func.__name__}_{'parallel' if parallel else 'serial'}_{_source_digest()}"
        code = func.__code__.replace(co_name=cname)
        if hasattr(code, "co_qualname"):
            code = code.replace(co_qualname=cname)
        func = FunctionType(code, func.__globals__, cname, None, func.__closure__)
        func.__qualname__ = cname
        opts = dict(JIT)
        opts.update(parallel=parallel, cache=True)
        try:
            disp = njit(**opts)(func)
        except RuntimeError as e:  # no writable cache location: compile every process
            if "cannot cache" not in str(e):
                raise
            _warn_no_cache(e)
            opts.update(cache=False)
            disp = njit(**opts)(func)
        _dispatchers[key] = disp
    return disp


_warned_no_cache = False


def _warn_no_cache(err):
    global _warned_no_cache
    if not _warned_no_cache:
        _warned_no_cache = True
        import warnings

        warnings.warn(f"xent_fast: kernels are compiled without an on-disk cache ({err}); "
                      "set NUMBA_CACHE_DIR to a writable folder to keep them between "
                      "processes", RuntimeWarning, stacklevel=4)


def _numba_type(value, writable):
    if isinstance(value, np.ndarray):
        layout = "C" if value.flags.c_contiguous else "A"
        return types.Array(from_dtype(value.dtype), value.ndim, layout, readonly=not writable)
    if isinstance(value, (bool, np.bool_)):
        return types.boolean
    if isinstance(value, (int, np.integer)):
        return types.int64
    return types.float64


def _signature(name, args):
    func, outs = _driver(name)
    names = func.__code__.co_varnames[:func.__code__.co_argcount]
    return tuple(_numba_type(a, n in outs) for n, a in zip(names, args))


def _key(args):
    # Scalars are typed by position (the API passes each as bool, int or float always),
    # so only arrays vary the signature.
    return tuple([(a.dtype.num, a.ndim, a.flags.c_contiguous) if type(a) is np.ndarray
                  else type(a) for a in args])


def _compile(disp, sig):
    """Compile ``sig``, recovering from a corrupt on-disk cache by rebuilding it."""
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


def run(name, parallel, *args):
    """Call driver ``name`` on ``args`` (all prepared by the API layer)."""
    key = (name, parallel, _key(args))
    fn = _entry_points.get(key)
    if fn is None:
        with _lock:
            fn = _entry_points.get(key)
            if fn is None:
                disp = _dispatcher(name, parallel)
                fn = _compile(disp, _signature(name, args))
                _entry_points[key] = fn
    if parallel:
        with _threads.guard():
            return fn(*args)
    return fn(*args)


def num_threads():
    return _threads.num_threads()
