"""Compile (or load from the on-disk cache) the kernels ahead of the first real call."""

import numpy as np

from . import _ops

_DTYPES = {"float32": np.float32, "float64": np.float64}
# Wide enough for the general kernels: index targets over at most SMALL_CLASSES (16)
# classes take kernels built for the exact class count, compiled on first use.
_WARM_CLASSES = 64
_WARM_ROWS = 2


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
    import xent_fast as xf
    from ._dispatch import cpu

    before = cpu().kernels_ready()
    for name in dtypes:
        dt = np.dtype(_DTYPES.get(name, name))
        # every operation of the table once, on its own inputs (gradient included)
        inputs = [(op, op.make_inputs(_WARM_ROWS, _WARM_CLASSES, dt)) for op in _ops.OPS]
        for be in backends:
            for op, d in inputs:
                op.call(xf, d, backend=be, **({"return_grad": True} if op.grad else {}))
    return cpu().kernels_ready() - before
