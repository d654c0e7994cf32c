"""Compile (or load from the on-disk cache) the kernels ahead of the first real call."""

import numpy as np

_DTYPES = {"float32": np.float32, "float64": np.float64}


def warmup(dtypes=("float32", "float64"), backends=("cpu", "parallel")):
    """Compile every kernel for ``dtypes`` on ``backends`` now, instead of on first use.

    The first call in a fresh environment compiles (seconds per kernel); later
    processes load the machine code from Numba's cache (``NUMBA_CACHE_DIR`` or the
    package's ``__pycache__``) in milliseconds.  Returns the number of kernels made ready.
    """
    from . import _api, _evaluate

    count = 0
    for name in dtypes:
        dt = np.dtype(_DTYPES.get(name, name))
        x = np.zeros((2, 3), dt)
        p = np.full((2, 3), 1 / 3, dt)
        t = np.zeros(2, np.int64)
        y = np.zeros((2, 3), dt)
        for be in backends:
            _api.logsumexp(x, backend=be)
            _api.softmax(x, backend=be)
            _api.entropy(p, backend=be)
            _api.softmax_cross_entropy(x, t, backend=be)
            _api.softmax_cross_entropy(x, t, return_grad=True, backend=be)
            _api.softmax_cross_entropy(x, p, return_grad=True, backend=be)
            _api.softmax_kl_divergence(x, x, return_grad=True, backend=be)
            _api.softmax_kl_divergence(x, x, backend=be)
            _api.binary_cross_entropy(p, y, backend=be)
            _api.binary_cross_entropy_with_logits(x, y, return_grad=True, backend=be)
            _api.binary_cross_entropy_with_logits(x, y, backend=be)
            _evaluate.evaluate(x, t, backend=be)
            count += 12
    return count
