"""Numba's thread pool, made safe to call from many Python threads and worker processes.

Numba's ``workqueue`` layer aborts the process when two Python threads enter parallel
code at once, and the GNU OpenMP layer kills a child forked after it has run.  TBB is
safe on both counts, so it is preferred (it is a dependency where wheels exist).  The
``tbb`` wheel puts ``libtbb.so.12`` in the environment's ``lib/`` folder, off the
loader's path, so Numba alone never finds it inside a virtual environment: it is
loaded here by its full path first.  Without TBB the layer is ``workqueue``, which is
fork-safe (its pool restarts in a forked child), and calls into parallel code are
serialised with a lock; OpenMP comes last and only if nothing else loads.

:func:`configure` must run before anything starts Numba's pool (a parallel call,
``numba.get_num_threads()``, ``numba.threading_layer()``): the CPU backend calls it when
it is imported, before it imports Numba, and every query of the pool here goes
through it.  A layer the user chose (``NUMBA_THREADING_LAYER`` or
``numba.config.THREADING_LAYER``) is respected.
"""

import contextlib
import ctypes
import os
import sys
import threading

_configured = False
_layer = None
_lock = threading.RLock()
_NOOP = contextlib.nullcontext()
_TBB_NAMES = {"linux": "libtbb.so.12", "win32": "tbb12.dll"}


def _tbb_library():
    """Path of the TBB runtime the ``tbb`` distribution installed, or ``None``."""
    name = _TBB_NAMES.get(sys.platform)
    if name is None:
        return None
    try:
        from importlib import metadata

        files = metadata.distribution("tbb").files or ()
        for f in files:
            if f.name == name:
                path = os.path.realpath(f.locate())
                if os.path.isfile(path):
                    return path
    except Exception:  # noqa: BLE001 - not installed, or metadata unreadable
        pass
    # no metadata (vendored environments): the environment's own lib/ folder
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = os.path.join(prefix, "Library", "bin" if sys.platform == "win32" else "lib",
                            name)
        if os.path.isfile(path):
            return path
    return None


def _preload_tbb():
    """Load the TBB runtime globally so that Numba's ``tbbpool`` finds it by name."""
    path = _tbb_library()
    if path is None:
        return False
    try:
        if sys.platform == "win32":  # pragma: no cover - Windows only
            os.add_dll_directory(os.path.dirname(path))
            ctypes.WinDLL(path)
        else:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


def configure():
    """Choose the threading layer before Numba's pool starts (idempotent, cheap)."""
    global _configured
    if _configured:
        return
    with _lock:
        if _configured:
            return
        from numba import config

        if "NUMBA_THREADING_LAYER" not in os.environ and config.THREADING_LAYER == "default":
            _preload_tbb()
            # workqueue before OpenMP: a child forked after GNU OpenMP ran dies.
            config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]
        _configured = True


def layer():
    """The threading layer in use, once the pool has started (else ``None``)."""
    global _layer
    if _layer is None:
        try:
            from numba.np.ufunc import parallel

            if parallel._is_initialized:
                import numba

                _layer = numba.threading_layer()
        except Exception:  # pragma: no cover - numba internals moved
            return None
    return _layer


def guard():
    """A context to hold around a call into parallel code."""
    if layer() in ("tbb", "omp"):
        return _NOOP
    return _lock


def num_threads():
    """Numba's thread count (starts the pool, on the layer :func:`configure` chose)."""
    configure()
    import numba

    return numba.get_num_threads()


def describe():
    """One line for reports: the threading layer and thread count, starting the pool."""
    n = num_threads()
    import numba

    return f"{numba.threading_layer()} threading layer, {n} threads"


def _after_fork_in_child():
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
