"""Numba's thread pool, made safe to call from many Python threads and worker processes.

Numba's ``workqueue`` layer aborts the process when two Python threads enter parallel
code at once, and the GNU OpenMP layer kills a child forked after it has run.  TBB is
safe on both counts, so it is preferred (it is a dependency where wheels exist).  When
Numba ends up on another layer (no TBB, or the user chose one through
``NUMBA_THREADING_LAYER``), calls into parallel code are serialised with a lock.
"""

import contextlib
import os
import threading

_configured = False
_layer = None
_lock = threading.RLock()
_NOOP = contextlib.nullcontext()


def configure():
    """Choose the threading layer before Numba's pool starts (idempotent)."""
    global _configured
    if _configured:
        return
    from numba import config

    if "NUMBA_THREADING_LAYER" not in os.environ and config.THREADING_LAYER == "default":
        # OpenMP last: a forked child of a process that ran GNU OpenMP dies.
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
    import numba

    return numba.get_num_threads()


def _after_fork_in_child():
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
