"""Compile (or load from the on-disk cache) the kernels ahead of the first real call."""

import numpy as np

_DTYPES = {"float32": np.float32, "float64": np.float64}
# Wide enough for the general kernels: index targets over at most SMALL_CLASSES (16)
# classes take kernels built for the exact class count, compiled on first use.
_WARM_CLASSES = 64


def warmup(dtypes=("float32", "float64"), backends=("cpu", "parallel")):
    """Compile every kernel for ``dtypes`` on ``backends`` now, instead of on first use.

    Covers what the first call of each public function runs on C-contiguous inputs of
    those dtypes (gradients included: they share their kernel with the loss), except the
    few-classes cross-entropy kernels, which are built per class count (2 to 16) on first
    use.  The first call in a fresh environment compiles (seconds per kernel); later
    processes load the machine code from Numba's cache (``NUMBA_CACHE_DIR`` or the
    package's ``__pycache__``) in milliseconds.  Returns the number of kernels made
    ready by this call (0 when all were ready already).
    """
    from . import _api, _evaluate
    from ._cpu import backend as _backend_cpu

    before = len(_backend_cpu._entry_points)
    c = _WARM_CLASSES
    for name in dtypes:
        dt = np.dtype(_DTYPES.get(name, name))
        x = np.zeros((2, c), dt)
        p = np.full((2, c), 1 / c, dt)
        t = np.zeros(2, np.int64)
        y = np.zeros((2, c), dt)
        for be in backends:
            _api.logsumexp(x, backend=be)
            _api.softmax(x, backend=be)
            _api.entropy(p, backend=be)
            _api.softmax_cross_entropy(x, t, return_grad=True, backend=be)
            _api.softmax_cross_entropy(x, p, return_grad=True, backend=be)
            _api.softmax_kl_divergence(x, x, return_grad=True, backend=be)
            _api.binary_cross_entropy(p, y, backend=be)
            _api.binary_cross_entropy_with_logits(x, y, return_grad=True, backend=be)
            _evaluate.evaluate(x, t, backend=be)
    return len(_backend_cpu._entry_points) - before
