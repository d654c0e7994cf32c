"""xent_fast: fast, checked cross-entropy-family losses on arrays.

Numba-compiled batched kernels for softmax cross-entropy, binary cross-entropy, KL
divergence, entropy and log-sum-exp, with gradients in the same pass, serial or
threaded on the CPU.  ``xent_fast.reference`` holds the float64 NumPy oracle.

Importing the package compiles nothing; kernels are compiled (or loaded from Numba's
on-disk cache) on first use.  Call :func:`warmup` to pay that cost up front.
"""

from ._api import (binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy,
                   entropy, kl_div, kl_divergence, linear_cross_entropy, linear_token_stats,
                   log_softmax, logsumexp, nll_loss, sigmoid_focal_loss,
                   softmax, softmax_cross_entropy, softmax_cross_entropy_sparse,
                   softmax_js_divergence, softmax_kl_divergence,
                   softmax_kl_divergence_sparse)

__version__ = "0.1.0"

# Loaded on first use, so that ``import xent_fast`` stays light.
_LAZY = {"warmup": "_warmup", "EvalResult": "_evaluate", "EvalState": "_evaluate",
         "evaluate": "_evaluate", "evaluate_file": "_stream"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xent_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"xent_fast.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "entropy",
    "kl_div",
    "kl_divergence",
    "linear_cross_entropy",
    "linear_token_stats",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "sigmoid_focal_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_sparse",
    "softmax_js_divergence",
    "softmax_kl_divergence",
    "softmax_kl_divergence_sparse",
    "warmup",
    "EvalResult",
    "EvalState",
    "evaluate",
    "evaluate_file",
]
