"""Which backend runs a call: ``"cpu"`` (serial), ``"parallel"`` (threads), ``"cuda"``, or
``"auto"`` (CUDA for GPU arrays, else threads for large inputs).

The backends are imported on first use: the CPU one imports Numba, the CUDA one
numba-cuda, so ``import xent_fast`` touches neither.  Each backend module offers the same
entry points (``logsumexp``, ``softmax``, ``dist``, ``softmax_cross_entropy``,
``softmax_kl_divergence``, ``binary_cross_entropy``, ``binary_cross_entropy_with_logits``,
``eval_stats``) with the same keyword options, plus ``operand`` (an input described
for the checks of ``_inputs``).
"""

import numpy as np

from ._inputs import is_gpu_array

BACKENDS = ("auto", "cpu", "parallel", "cuda")
# Below this many elements a call runs serially: starting threads costs more than it saves.
PARALLEL_MIN_ELEMENTS = 1 << 16

_modules = {}


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def on_gpu(backend, *arrays):
    """Whether this call runs on the CUDA backend: asked for, or GPU arrays under auto."""
    if backend == "auto":
        for a in arrays:
            if type(a) is not np.ndarray and a is not None and is_gpu_array(a):
                return True
        return False
    return check_backend(backend) == "cuda"


def threads(backend, size):
    """Whether a CPU call of ``size`` elements runs on threads."""
    check_backend(backend)
    if backend == "auto":
        return size >= PARALLEL_MIN_ELEMENTS
    return backend == "parallel"


def cpu():
    """The CPU backend module (imports Numba on first use)."""
    mod = _modules.get("cpu")
    if mod is None:
        from ._cpu import backend as mod

        _modules["cpu"] = mod
    return mod


def cuda():
    """The CUDA backend module (imports numba-cuda on first use)."""
    mod = _modules.get("cuda")
    if mod is None:
        from ._cuda import backend as mod

        _modules["cuda"] = mod
    return mod


def backend_for(backend, *arrays):
    """The backend module that runs a call on ``arrays``."""
    return cuda() if on_gpu(backend, *arrays) else cpu()
