"""Input handling shared by every backend: the dtype policy, the class axis, option,
shape and target checks, and every error text the public functions raise.

Works on shapes, dtypes and small host arrays only, so that the CPU and the CUDA
backend see the same checks and the same messages: a backend describes its arrays
(shape, dtype) and this module decides.  Imports NumPy only.
"""

import math
import operator

import numpy as np
from numpy.lib.array_utils import normalize_axis_index

REDUCTIONS = ("none", "sum", "mean")
KL_REDUCTIONS = ("none", "sum", "mean", "batchmean")


# ---------------------------------------------------------------------------- arrays
def is_gpu_array(obj):
    """A CuPy array, a PyTorch CUDA tensor or a Numba device array (no import needed)."""
    if isinstance(obj, np.ndarray):
        return False
    mod = type(obj).__module__ or ""
    if mod.startswith("torch"):
        return bool(getattr(obj, "is_cuda", False))
    if "numba" in mod and type(obj).__name__ == "FakeCUDAArray":
        return True  # Numba's CUDA simulator
    return hasattr(obj, "__cuda_array_interface__")


def is_bfloat16(dt):
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16"


def float_policy(dtype, name):
    """How an input of ``dtype`` is read: (half kind, kernel dtype, compute dtype).

    Half kind 0 is float32/float64, 1 float16, 2 bfloat16 (both read as uint16 bits and
    computed in float32); integers and booleans become float64; long double float64.
    """
    try:
        return _POLICY[dtype]  # a dict lookup: this runs on every call of every function
    except (KeyError, TypeError):
        pass
    policy = _float_policy(np.dtype(dtype), name)
    _POLICY[dtype] = policy
    return policy


_POLICY = {}


def _float_policy(dt, name):
    if dt.kind == "f":
        if dt.itemsize == 2:
            return 1, np.dtype(np.float16), np.dtype(np.float32)
        if dt.itemsize > 8:
            return 0, np.dtype(np.float64), np.dtype(np.float64)
        return 0, dt.newbyteorder("="), np.dtype(dt.type)
    if dt.kind in "biu":
        return 0, np.dtype(np.float64), np.dtype(np.float64)
    if dt.kind == "c":
        raise TypeError(f"{name} must be real, got complex dtype {dt}")
    if is_bfloat16(dt):
        return 2, dt, np.dtype(np.float32)
    raise TypeError(f"{name} must be a real numeric array, got dtype {dt}")


def dtype_name(dtype):
    """A dtype's name ("float32", "bfloat16"); names pass through (a device library's
    bfloat16 has no NumPy dtype without ml_dtypes)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def compute_dtype(dtype):
    """The precision the kernels compute in, and the results' dtype."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def rectangular(value, name):
    """``np.asarray(value)``; nested sequences of unequal lengths are a ValueError that
    names ``name`` (NumPy's own names no argument)."""
    try:
        return np.asarray(value)
    except ValueError as e:
        raise ValueError(f"{name} is not a rectangular array ({e})") from None


# ---------------------------------------------------------------------------- axes and shapes
def class_axis(shape, axis, name):
    """The class axis ``axis`` of an array of ``shape``, normalised."""
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis)")
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {axis!r}") from None
    return normalize_axis_index(ax, len(shape), msg_prefix="axis")


def batch_shape(shape, ax):
    """The shape without the class axis."""
    shape = tuple(shape)
    return shape[:ax] + shape[ax + 1:]


def position(batch, ax, i, j):
    """Index tuple in the original array of row i (flattened batch), class j."""
    idx = list(np.unravel_index(i, batch)) if batch else []
    idx.insert(ax, j)
    return tuple(int(v) for v in idx)


def flat_position(shape, i):
    return [int(v) for v in np.unravel_index(i, shape)] if shape else []


def same_shape(shape, other, what):
    """``what`` is the message's start, e.g. "target_logits must have the logits' shape"."""
    if tuple(other) != tuple(shape):
        raise ValueError(f"{what} {tuple(shape)}; got {tuple(other)}")


def check_pair(pshape, qshape):
    if tuple(qshape) != tuple(pshape):
        raise ValueError(f"p and q must have the same shape, got {tuple(pshape)} and "
                         f"{tuple(qshape)}")


# ---------------------------------------------------------------------------- options
def reduction(value, allowed=REDUCTIONS):
    if value not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {value!r}")
    return value


def real_option(value, name, lo=None, hi=None, lo_open=False):
    """A finite real number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if type(value) is float or type(value) is int:  # the common case, checked fast
        v = float(value)
    elif isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.ndim):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or (lo is not None and (v < lo or (lo_open and v == lo))) or (
            hi is not None and v > hi):
        lo_s = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {lo_s}{lo}, {hi if hi is not None else 'inf'}], "
                         f"got {value!r}")
    return v


def ignore_index_option(value):
    """``ignore_index`` as an int64-sized Python int."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {value!r}") from None
    if not -2 ** 63 <= v < 2 ** 63:
        raise ValueError(f"ignore_index must fit in a signed 64-bit integer, got {v}")
    return v


def log_base(base):
    """The natural log of a logarithm ``base`` (1.0 for None: natural logs)."""
    if base is None:
        return 1.0
    b = real_option(base, "base", 0.0, None, lo_open=True)
    if b == 1.0:
        raise ValueError("base must not be 1")
    return math.log(b)


def check_inverse(v, name, dtype):
    """A divisor option whose reciprocal must be finite in the compute precision."""
    with np.errstate(over="ignore"):
        if not np.isfinite(dtype.type(1.0 / v)):
            raise ValueError(f"{name} must be at least {1 / float(np.finfo(dtype).max):.3g} "
                             f"for {dtype} computation (1/{name} overflows), got {v!r}")


def check_topk(topk):
    """``topk`` as a sorted tuple of distinct positive ints."""
    ks = (topk,) if isinstance(topk, (int, np.integer)) else tuple(topk)
    try:
        ks = tuple(sorted({operator.index(k) for k in ks}))
    except TypeError:
        raise TypeError(f"topk must be a positive int or a sequence of them, got {topk!r}") \
            from None
    if any(k < 1 for k in ks):
        raise ValueError(f"topk values must be >= 1, got {topk!r}")
    return ks


def check_bins(n_bins):
    try:
        b = operator.index(n_bins)
    except TypeError:
        raise TypeError(f"n_bins must be a positive int, got {n_bins!r}") from None
    if b < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
    return b


class CEOptions:
    """The validated options of a softmax cross-entropy call."""

    __slots__ = ("reduction", "eps", "z", "cap", "want_grad")

    def __init__(self, reduction_, label_smoothing, z_loss, softcap, return_grad, grad_out):
        self.reduction = reduction(reduction_)
        self.eps = real_option(label_smoothing, "label_smoothing", 0.0, 1.0)
        self.z = real_option(z_loss, "z_loss", 0.0, None)
        self.cap = 0.0 if softcap is None else real_option(softcap, "softcap", 0.0, None, True)
        self.want_grad = bool(return_grad) or grad_out is not None


# ---------------------------------------------------------------------------- targets and weights
def ce_target_kind(tdtype, tshape, batch, shape):
    """"index" (integer class indices of the batch shape) or "prob" (float
    probabilities of the logits' shape) for softmax cross-entropy targets."""
    if not isinstance(tdtype, np.dtype):
        tdtype = np.dtype(tdtype)
    if tdtype.kind in "iu":
        if tuple(tshape) != tuple(batch):
            raise ValueError(f"integer targets must have the logits' shape without the "
                             f"class axis, {tuple(batch)}; got {tuple(tshape)}")
        return "index"
    if tdtype.kind == "f" or is_bfloat16(tdtype):
        if tuple(tshape) != tuple(shape):
            raise ValueError(f"probability targets must have the logits' shape "
                             f"{tuple(shape)}; got {tuple(tshape)} (class-index targets must "
                             "be integers)")
        return "prob"
    raise TypeError(f"targets must be integer class indices or float probabilities, "
                    f"got dtype {tdtype}")


def check_index_targets(tdtype, tshape, batch):
    """Targets of ``evaluate``: integer class indices of the batch shape."""
    if np.dtype(tdtype).kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got dtype {np.dtype(tdtype)}")
    if tuple(tshape) != tuple(batch):
        raise ValueError(f"targets must have the logits' shape without the class axis, "
                         f"{tuple(batch)}; got {tuple(tshape)}")


def sparse_shape(shape, ax, ishape, vshape, iname, vname):
    """Checks the shapes of a sparse target: ``iname`` (integers) and ``vname`` of the
    logits' shape but for the class axis (k entries); returns k."""
    ishape, vshape = tuple(ishape), tuple(vshape)
    if len(ishape) != len(shape) or batch_shape(ishape, ax) != batch_shape(shape, ax):
        raise ValueError(f"{iname} must have the logits' shape with k entries along the "
                         f"class axis, {batch_shape(shape, ax)} and k; got {ishape}")
    if vshape != ishape:
        raise ValueError(f"{vname} must have the shape of {iname}, {ishape}; got {vshape}")
    return ishape[ax]


def check_sparse_indices(idx, c, batch, ax, name):
    """(n, k) class indices: each in [0, c) and distinct within its row."""
    if not idx.size:
        return
    out = (idx < 0) | (idx >= c)
    if out.any():
        i, j = np.argwhere(out)[0]
        raise ValueError(f"{name} must lie in [0, {c}); got {int(idx[i, j])} at "
                         f"{position(batch, ax, int(i), int(j))}")
    s = np.sort(idx, axis=1)
    dup = s[:, 1:] == s[:, :-1]
    if dup.any():
        i, j = np.argwhere(dup)[0]
        raise ValueError(f"{name} must be distinct within a row; class {int(s[i, j])} "
                         f"appears twice in row {int(i)}")


def index_targets(t, c, ignore, origin=None):
    """Integer targets as a flat int64 array, checked before the cast: a uint64 target
    beyond the int64 range would wrap (onto ``ignore_index`` even) and is an error."""
    flat = t.reshape(-1)
    if t.dtype.kind == "u" and t.dtype.itemsize == 8 and flat.size:
        big = np.flatnonzero(flat > np.iinfo(np.int64).max)
        if big.size:
            raise bad_target(t.shape, int(big[0]), int(flat[big[0]]), c, ignore, origin)
    return np.ascontiguousarray(flat, dtype=np.int64)


def bad_target(shape, i, value, c, ignore, origin=None):
    """The IndexError for flat target ``i`` (of value ``value``) of targets of ``shape``
    (``origin``: the offset of a chunk's position in the whole array)."""
    pos = flat_position(shape, i)
    if origin is not None:
        pos = [p + o for p, o in zip(pos, origin)]
    return IndexError(f"targets{pos} = {int(value)} is not a class index in "
                      f"[0, {c}) nor ignore_index={ignore}")


def _number(value):
    """An element for a message: a Python float, whatever array library it came from."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def not_probability(name, pos, value):
    return ValueError(f"{name} must hold probabilities (>= 0, not NaN); "
                      f"{name}[{pos}] = {_number(value)!r}")


def probs_out_of_range(pos, value):
    return ValueError(f"probs must lie in [0, 1]; probs[{list(pos)}] = {_number(value)!r}")


def class_weight(weight, c, name="weight"):
    """A class weight (a small host array) checked: one real weight per class, float64."""
    if weight is None:
        return None
    w = np.asarray(weight)
    if not _real_weight(w.dtype):
        raise TypeError(f"{name} must be a real array, got dtype {w.dtype}")
    if w.dtype.kind not in "biuf":  # bfloat16 (what PyTorch asks of a bfloat16 model)
        w = w.astype(np.float32)
    if w.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one weight per class), "
                         f"got {w.shape}")
    return w


def _real_weight(dtype):
    """Can weights be of ``dtype`` (a NumPy dtype, or a device library's "bfloat16")?"""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return True
    dt = np.dtype(dtype)
    return dt.kind in "biuf" or is_bfloat16(dt)


def broadcast_weight(wshape, wdtype, shape, name):
    """An elementwise weight of ``wshape`` must broadcast to the input ``shape``."""
    if not _real_weight(wdtype):
        raise TypeError(f"{name} must be a real array, got dtype {dtype_name(wdtype)}")
    try:
        b = np.broadcast_shapes(tuple(wshape), tuple(shape))
    except ValueError:
        b = None
    if b != tuple(shape):
        raise ValueError(f"{name} of shape {tuple(wshape)} does not broadcast to the input "
                         f"shape {tuple(shape)}")


# ---------------------------------------------------------------------------- gradients
def check_grad_out(shape, dtype, gshape, gdtype, writeable):
    """``grad_out`` must have the logits' shape and the gradient dtype (the logits')."""
    want, got = dtype_name(dtype), dtype_name(gdtype)
    if tuple(gshape) != tuple(shape) or got != want:
        raise ValueError(f"grad_out must have the logits' shape {tuple(shape)} and the "
                         f"gradient dtype {want}; got {tuple(gshape)} and {got}")
    if not writeable:
        raise ValueError("grad_out is read-only")


# ---------------------------------------------------------------------------- reductions
def mean_of(total, denominator):
    """``total / denominator`` with PyTorch's conventions for an empty mean: 0/0 is NaN
    and x/0 an infinity of x's sign."""
    if denominator == 0:
        return math.nan if total == 0 or total != total else math.copysign(math.inf, total)
    return total / denominator


def kl_denominator(reduction_, n, c):
    return {"batchmean": n, "mean": n * c, "sum": 1, "none": 1}[reduction_]


def sparse_denominator(mode, reduction_, n, c):
    """The mean's denominator of a sparse-target loss: the KL's (modes 0, 1), or the
    number of rows for the cross-entropy form (mode 2, reductions of ``REDUCTIONS``)."""
    if mode != 2:
        return kl_denominator(reduction_, n, c)
    return n if reduction_ == "mean" else 1
