"""NumPy-compatible front ends: validation, dtype policy, axis handling, reductions.

Nothing here imports Numba: the CPU backend module is imported on the first call, so
``import xent_fast`` stays cheap and compiles nothing.
"""

import math
import operator

import numpy as np
from numpy.lib.array_utils import normalize_axis_index

_BACKENDS = ("auto", "cpu", "parallel", "cuda")
# Below this many elements a call runs serially: starting threads costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 16
_ELEMENTWISE_BLOCK = 16384


# ---------------------------------------------------------------------------- helpers
_backend = None


def _backend_module():
    global _backend
    if _backend is None:  # imported on first use: it imports Numba
        from ._cpu import backend

        _backend = backend
    return _backend


_cuda = None


def _cuda_api():
    global _cuda
    if _cuda is None:  # imported on first use: it imports numba-cuda
        from ._cuda import backend

        _cuda = backend
    return _cuda


def _is_gpu_array(obj):
    """A CuPy array, a PyTorch CUDA tensor or a Numba device array (no import needed)."""
    if isinstance(obj, np.ndarray):
        return False
    mod = type(obj).__module__ or ""
    if mod.startswith("torch"):
        return bool(getattr(obj, "is_cuda", False))
    if "numba" in mod and type(obj).__name__ == "FakeCUDAArray":
        return True  # Numba's CUDA simulator
    return hasattr(obj, "__cuda_array_interface__")


def _on_gpu(backend, *arrays):
    """Whether this call runs on the CUDA backend: asked for, or GPU arrays under auto."""
    if backend == "cuda":
        return True
    if backend == "auto":
        return any(_is_gpu_array(a) for a in arrays)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return False


def _parallel(backend, size):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return size >= _PARALLEL_MIN_ELEMENTS
    return backend == "parallel"


def _nblocks(n, parallel):
    if not parallel:
        return 1
    return max(1, min(n, 8 * _backend_module().num_threads()))


class _Float:
    """An input array prepared for the kernels.

    ``arr`` is what the kernels read (uint16 bits for half precision), ``hk`` the half
    kind, ``dtype`` the array's own float dtype and ``out_dtype`` the result dtype, which
    is also the precision the kernels compute in.
    """

    __slots__ = ("arr", "hk", "dtype", "out_dtype", "source")

    def __init__(self, value, name):
        if _is_gpu_array(value):
            raise TypeError(f"{name} is a GPU array: use backend='cuda' (or 'auto'), or copy "
                            "it to the host for the CPU backends")
        a = np.asarray(value)
        self.source = a
        kind = a.dtype.kind
        if kind == "f":
            self.hk = 1 if a.dtype.itemsize == 2 else 0
            if a.dtype.itemsize > 8:
                a = a.astype(np.float64)
        elif kind in "biu":
            a = a.astype(np.float64)
            self.hk = 0
        elif kind == "c":
            raise TypeError(f"{name} must be real, got complex dtype {a.dtype}")
        elif _is_bfloat16(a.dtype):
            self.hk = 2
        else:
            raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        self.dtype = a.dtype
        self.out_dtype = np.dtype(np.float64 if a.dtype == np.float64 else np.float32)
        self.arr = a.view(np.uint16) if self.hk else a

    def companion(self, value, name):
        """Another float input read with this one (targets, target logits): kept as is
        when half precision, else brought to this input's compute dtype."""
        other = _Float(value, name)
        if other.hk and self.out_dtype == np.float64:
            # float64 logits with half targets: widened once here, so that no kernel
            # mixes a float64 row with a float32 one
            other.arr = other.source.astype(np.float64)
            other.hk = 0
        elif other.hk == 0 and other.dtype != self.out_dtype:
            other.arr = other.arr.astype(self.out_dtype)
        return other


def _is_bfloat16(dt):
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16"


def _class_rows(a, axis, name):
    """Move the class axis last and flatten the batch axes: (rows, C), batch shape."""
    if a.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis)")
    ax = normalize_axis_index(operator.index(axis), a.ndim, msg_prefix="axis")
    m = a if ax == a.ndim - 1 else np.moveaxis(a, ax, -1)
    # Kernels take rows at any row stride (a column slice, every other row, reversed
    # rows) but vectorise only over unit-stride rows: copy anything else once.
    r = m.reshape(_rows_shape(m.shape))  # a view where the batch axes merge
    if r.shape[1] > 1 and r.strides[1] != r.itemsize:
        r = np.ascontiguousarray(r)
    return r, m.shape[:-1], ax


def _rows_shape(shape):
    """(rows, C) for an array whose last axis is the class axis."""
    return math.prod(shape[:-1]), shape[-1]


def _grad_target(want_grad, grad_out, logits, f, ax, shape2, others=()):
    """The gradient array, the kernels' 2-D view of it, and a finisher to call after.

    The kernels see the logits moved to put axis ``ax`` last (no move for ``None``) and
    reshaped to ``shape2``; the gradient is written through the same view of
    ``grad_out`` when that view is C-contiguous, either is the logits (in place) or
    overlaps them nowhere, and overlaps none of the ``others`` (the call's other array
    inputs: targets, target logits, weights), which the kernels read after writing the
    gradient; else into a temporary copied back by the finisher.
    """
    if not want_grad:  # the kernels still take an array argument
        return None, np.empty((0, 0), f.arr.dtype), None
    shape = f.source.shape
    moved_shape = shape if ax is None else shape[:ax] + shape[ax + 1:] + (shape[ax],)
    if grad_out is None:
        moved = np.empty(moved_shape, f.dtype)
        grad = moved if ax is None else np.moveaxis(moved, -1, ax)
        view = moved.reshape(shape2)
        return grad, (view.view(np.uint16) if f.hk else view), None
    if not isinstance(grad_out, np.ndarray):
        raise TypeError("grad_out must be a NumPy array")
    if grad_out.shape != shape or grad_out.dtype != f.dtype:
        raise ValueError(f"grad_out must have the logits' shape {shape} and the gradient "
                         f"dtype {f.dtype}; got {grad_out.shape} and {grad_out.dtype}")
    if not grad_out.flags.writeable:
        raise ValueError("grad_out is read-only")
    moved = grad_out if ax is None else np.moveaxis(grad_out, ax, -1)
    in_place = grad_out is logits or (
        grad_out.__array_interface__["data"][0] == f.source.__array_interface__["data"][0]
        and grad_out.strides == f.source.strides)
    view = None
    apart = not any(o is not None and np.may_share_memory(grad_out, o) for o in others)
    if apart and (in_place or not np.may_share_memory(grad_out, f.source)):
        try:
            view = moved.reshape(shape2, copy=False)
        except (ValueError, TypeError):
            view = None
    if view is not None and view.flags.c_contiguous:
        return grad_out, (view.view(np.uint16) if f.hk else view), None
    tmp = np.empty(shape2, f.dtype)

    def finish():
        moved[...] = tmp.reshape(moved_shape)

    return grad_out, (tmp.view(np.uint16) if f.hk else tmp), finish


def _check_reduction(reduction, allowed=("none", "sum", "mean")):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def _reduce(rows, batch_shape, reduction, denominator, out_dtype):
    if reduction == "none":
        return rows.reshape(batch_shape).astype(out_dtype, copy=False)
    total = float(rows.sum())  # rows are float64
    if reduction == "sum":
        return out_dtype.type(total)
    if denominator == 0:
        return out_dtype.type(math.nan if total == 0 or total != total else
                              math.copysign(math.inf, total))
    return out_dtype.type(total / denominator)


def _scalar_option(value, name, lo=None, hi=None, lo_open=False):
    if isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.ndim):
        raise TypeError(f"{name} must be a real number, got {value!r}")
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


def index_targets(t, c, ignore, origin=None):
    """Integer targets as a flat int64 array, checked before the cast: a uint64 target
    beyond the int64 range would wrap (onto ``ignore_index`` even) and is an error."""
    flat = t.reshape(-1)
    if t.dtype.kind == "u" and t.dtype.itemsize == 8 and flat.size:
        big = np.flatnonzero(flat > np.iinfo(np.int64).max)
        if big.size:
            bad_target(t, int(big[0]), c, ignore, origin)
    return np.ascontiguousarray(flat, dtype=np.int64)


def bad_target(t, i, c, ignore, origin=None):
    """Raise the IndexError for flat target ``i`` of ``t`` (``origin``: the offset of a
    chunk's position in the whole array)."""
    pos = [int(v) for v in np.unravel_index(i, t.shape)] if t.ndim else []
    if origin is not None:
        pos = [p + o for p, o in zip(pos, origin)]
    raise IndexError(f"targets{pos} = {int(t.reshape(-1)[i])} is not a class index in "
                     f"[0, {c}) nor ignore_index={ignore}")


def _check_inverse(v, name, dtype):
    """A divisor option whose reciprocal must be finite in the compute precision."""
    with np.errstate(over="ignore"):
        if not np.isfinite(dtype.type(1.0 / v)):
            raise ValueError(f"{name} must be at least {1 / float(np.finfo(dtype).max):.3g} "
                             f"for {dtype} computation (1/{name} overflows), got {v!r}")


# placeholders for an absent class weight (the kernels take an array either way)
_NO_WEIGHT = {np.dtype(d).char: np.ones(1, d) for d in (np.float32, np.float64)}


def _class_weight(weight, c, dtype, name="weight"):
    if weight is None:
        return _NO_WEIGHT[dtype.char], False, float(c)
    w = np.asarray(weight)
    if w.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real array, got dtype {w.dtype}")
    if w.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one weight per class), "
                         f"got {w.shape}")
    w = np.ascontiguousarray(w, dtype=dtype)
    return w, True, float(np.sum(w, dtype=np.float64))


# ---------------------------------------------------------------------------- building blocks
def logsumexp(x, axis=-1, keepdims=False, *, backend="auto"):
    """Log of the sum of exponentials along ``axis``, shifted by the row max.

    ``log(sum(exp(x)))`` computed as ``m + log(sum(exp(x - m)))``, ``m = max(x)``.

    Conventions: a row of all ``-inf`` (or an empty class axis) gives ``-inf``; any
    ``+inf`` gives ``+inf``; NaN propagates.  Unlike ``scipy.special.logsumexp`` only one
    axis is reduced and there is no ``b`` scaling.

    Examples
    --------
    >>> float(logsumexp([0.0, 0.0]))  # log 2
    0.6931471805599453
    """
    if _on_gpu(backend, x):
        return _cuda_api().logsumexp(x, axis, keepdims)
    f = _Float(x, "x")
    rows, batch, ax = _class_rows(f.arr, axis, "x")
    out = np.empty(rows.shape[0], f.out_dtype)
    par = _parallel(backend, rows.size)
    _backend_module().run("logsumexp", par, rows, f.hk, out, _nblocks(rows.shape[0], par))
    res = out.reshape(batch)
    if keepdims:
        res = np.expand_dims(res, ax)
    return res[()] if res.ndim == 0 else res


def _softmax_common(x, axis, log, backend):
    if _on_gpu(backend, x):
        return _cuda_api().softmax_common(x, axis, log)
    f = _Float(x, "x")
    rows, batch, ax = _class_rows(f.arr, axis, "x")
    out = np.empty(rows.shape, f.out_dtype)
    par = _parallel(backend, rows.size)
    _backend_module().run("softmax", par, rows, f.hk, log, out, _nblocks(rows.shape[0], par))
    return np.moveaxis(out.reshape(batch + (rows.shape[1],)), -1, ax)


def softmax(x, axis=-1, *, backend="auto"):
    """``exp(x - logsumexp(x))`` along ``axis``.

    ``-inf`` entries give 0; a row of all ``-inf`` gives NaN (as SciPy).
    """
    return _softmax_common(x, axis, False, backend)


def log_softmax(x, axis=-1, *, backend="auto"):
    """``x - logsumexp(x)`` along ``axis``.

    ``-inf`` entries give ``-inf``; a row of all ``-inf`` gives NaN (as SciPy).
    """
    return _softmax_common(x, axis, True, backend)


def _log_base(base):
    if base is None:
        return 1.0
    b = _scalar_option(base, "base", 0.0, None, lo_open=True)
    if b == 1.0:
        raise ValueError("base must not be 1")
    return math.log(b)


def _dist(p, q, axis, base, mode, backend):
    if _on_gpu(backend, p, q):
        return _cuda_api().dist(p, q, axis, base, mode)
    fp = _Float(p, "p")
    fq = _Float(q, "q") if q is not None else fp
    if fq.source.shape != fp.source.shape:
        raise ValueError(f"p and q must have the same shape, got {fp.source.shape} and "
                         f"{fq.source.shape}")
    scale = _log_base(base)
    prow, batch, ax = _class_rows(fp.arr, axis, "p")
    qrow, _, _ = _class_rows(fq.arr, axis, "q")
    out = np.empty(prow.shape[0], np.float64)
    bad = np.empty(prow.shape[0], np.int64)
    par = _parallel(backend, prow.size)
    _backend_module().run("dist", par, prow, fp.hk, qrow, fq.hk, mode, out, bad,
                          _nblocks(prow.shape[0], par))
    hits = np.flatnonzero(bad >= 0)
    if hits.size:
        i = int(hits[0])
        j = int(bad[i])
        c = prow.shape[1]
        name, src = ("p", fp.source) if j < c else ("q", fq.source)
        j = j % c if c else j
        pos = _position(batch, ax, i, j)
        raise ValueError(f"{name} must hold probabilities (>= 0, not NaN); "
                         f"{name}[{pos}] = {src[pos]!r}")
    if scale != 1.0:
        out /= scale
    res = out.astype(fp.out_dtype, copy=False).reshape(batch)
    return res[()] if res.ndim == 0 else res


def _position(batch, ax, i, j):
    """Index tuple in the original array of row i (flattened batch), class j."""
    idx = list(np.unravel_index(i, batch)) if batch else []
    idx.insert(ax, j)
    return tuple(int(v) for v in idx)


def entropy(p, axis=-1, base=None, *, backend="auto"):
    """Shannon entropy ``-sum(p log p)`` along ``axis``; ``0 log 0 = 0``.

    ``p`` is used as given: unlike ``scipy.stats.entropy`` it is not renormalised, and the
    reduction is along ``axis`` (default last), not axis 0.  ``base=2`` gives bits.
    A negative or NaN probability raises ``ValueError``.

    Examples
    --------
    >>> round(float(entropy([0.5, 0.5], base=2)), 3)  # a fair coin
    1.0
    >>> round(float(entropy([0.9, 0.1], base=2)), 3)  # a 90:10 coin
    0.469
    """
    return _dist(p, None, axis, base, 0, backend)


def cross_entropy(p, q, axis=-1, base=None, *, backend="auto"):
    """Cross-entropy ``H(p, q) = -sum(p log q)`` along ``axis``.

    Terms with ``p = 0`` are 0 even where ``q = 0``; ``p > 0`` with ``q = 0`` gives ``+inf``.

    Examples
    --------
    >>> round(float(cross_entropy([0.8, 0.1, 0.1], [0.2, 0.2, 0.6])), 3)
    1.5
    """
    return _dist(p, q, axis, base, 1, backend)


def kl_divergence(p, q, axis=-1, base=None, *, backend="auto"):
    """Kullback-Leibler divergence ``sum(p log(p/q)) = H(p, q) - H(p)`` along ``axis``.

    Not SciPy's ``kl_div`` (which is elementwise ``p log(p/q) - p + q``).  ``0 log 0 = 0``;
    ``p > 0`` with ``q = 0`` gives ``+inf``.

    Examples
    --------
    >>> round(float(kl_divergence([0.8, 0.1, 0.1], [0.2, 0.2, 0.6])), 3)
    0.861
    """
    return _dist(p, q, axis, base, 2, backend)


# ---------------------------------------------------------------------------- softmax CE
def softmax_cross_entropy(logits, targets, *, axis=-1, weight=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                          return_grad=False, grad_out=None, backend="auto"):
    """Softmax cross-entropy from logits, as ``torch.nn.functional.cross_entropy``.

    Per row, with ``lse = logsumexp(y)``, ``y`` the (optionally soft-capped) logits and
    target weights ``a_c``::

        loss = sum_c a_c (lse - y_c) + z_loss * lse**2

    Integer ``targets`` (the logits' shape without the class axis) give
    ``a_c = (1 - eps) w_t [c = t] + eps/C w_c``; float targets of the logits' full shape
    are probabilities ``p`` and give ``a_c = ((1 - eps) p_c + eps/C) w_c``
    (``eps = label_smoothing``, ``w`` = ``weight`` or ones).

    Reductions follow PyTorch: ``"mean"`` divides by the summed weight of the
    non-ignored targets (by the number of rows for probability targets); an all-ignored
    batch gives NaN for ``"mean"`` and 0 for ``"sum"``; ``"none"`` gives 0 for ignored
    rows.  ``z_loss`` is added per row before the reduction.  ``softcap`` replaces the
    logits by ``softcap * tanh(logits / softcap)`` first.

    A target whose logit is ``-inf`` gives ``+inf``; other ``-inf`` logits contribute
    exactly 0 to the loss and gradient (with label smoothing every class is a partial
    target, so any ``-inf`` logit makes the loss ``+inf``).

    With ``return_grad=True`` (implied by ``grad_out``) returns ``(loss, grad)``, the
    gradient of the reduced loss (of the sum of the rows for ``"none"``) with respect to
    ``logits``, in the logits' dtype, computed in the same pass.  ``grad_out=logits``
    computes it in place, overwriting the logits.

    Examples
    --------
    >>> import numpy as np
    >>> round(float(softmax_cross_entropy(np.array([[2.0, 1.0, 0.1]]), np.array([0]))), 4)
    0.417
    """
    if _on_gpu(backend, logits, targets):
        return _cuda_api().softmax_cross_entropy(
            logits, targets, axis=axis, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            reduction=reduction, return_grad=return_grad, grad_out=grad_out)
    _check_reduction(reduction)
    eps = _scalar_option(label_smoothing, "label_smoothing", 0.0, 1.0)
    z = _scalar_option(z_loss, "z_loss", 0.0, None)
    cap = 0.0 if softcap is None else _scalar_option(softcap, "softcap", 0.0, None, True)
    want_grad = bool(return_grad) or grad_out is not None
    f = _Float(logits, "logits")
    if cap:
        _check_inverse(cap, "softcap", f.out_dtype)
    rows, batch, ax = _class_rows(f.arr, axis, "logits")
    n, c = rows.shape
    t = np.asarray(targets)
    w, has_w, wsum = _class_weight(weight, c, f.out_dtype)
    if t.dtype.kind in "iu":
        if t.shape != batch:
            raise ValueError(f"integer targets must have the logits' shape without the "
                             f"class axis, {batch}; got {t.shape}")
        ignore = ignore_index_option(ignore_index)
        tf = index_targets(t, c, ignore)
        # one compiled pass: the first bad target, and the mean's denominator
        i, den = _backend_module().run("targets", False, tf, c, ignore, w, has_w)
        if i >= 0:
            bad_target(t, i, c, ignore)
        kind = "ce_index"
    elif t.dtype.kind == "f" or _is_bfloat16(t.dtype):
        if t.shape != f.source.shape:
            raise ValueError(f"probability targets must have the logits' shape "
                             f"{f.source.shape}; got {t.shape} (class-index targets must "
                             "be integers)")
        ft = f.companion(t, "targets")
        trows, _, _ = _class_rows(ft.arr, axis, "targets")
        den = float(n)
        kind = "ce_prob"
    else:
        raise TypeError(f"targets must be integer class indices or float probabilities, "
                        f"got dtype {t.dtype}")
    gscale = 1.0
    if reduction == "mean":
        gscale = 1.0 / den if den != 0 else math.nan
        if z != 0.0 and has_w and kind == "ce_index":
            # The z-loss is not class-weighted: its mean is over the kept rows, not over
            # the summed weight the kernels divide by, so it enters them rescaled.
            # (With a summed weight of 0 the mean is 0/0 or x/0 whatever the z-loss.)
            kept = np.count_nonzero(tf != ignore)
            z = z * den / kept if kept else z
    grad, g2, finish = _grad_target(want_grad, grad_out, logits, f, ax, rows.shape,
                                    (t, weight))
    par = _parallel(backend, rows.size)
    nb = _nblocks(n, par)
    be = _backend_module()
    small = kind == "ce_index" and 2 <= c <= be.SMALL_CLASSES and f.hk == 0 and cap == 0.0
    # a loss a row, or for the few-classes kernels' sums and means one partial sum a block
    loss = np.empty(nb if small and reduction != "none" else n, np.float64)
    if small:
        rows = np.ascontiguousarray(rows)  # the few-classes kernels read rows back to back
        general = has_w or eps > 0  # the kernel that weighs and smooths, with w = 1 if unweighted
        if general and not has_w:
            w = np.ones(c, f.out_dtype)
        be.run(be.small_name(c, general, want_grad), par, rows, tf, w, wsum, eps, z, ignore,
               gscale, g2, loss, nb)
    elif kind == "ce_index":
        be.run("ce_index", par, rows, f.hk, tf, w, has_w, wsum, eps, z, cap, ignore, gscale,
               want_grad, g2, f.hk, loss, nb)
    else:
        be.run("ce_prob", par, rows, f.hk, trows, ft.hk, w, has_w, eps, z, cap, gscale,
               want_grad, g2, f.hk, loss, nb)
    if finish is not None:
        finish()
    res = _reduce(loss, batch, reduction, den, f.out_dtype)
    return (res, grad) if want_grad else res


def softmax_kl_divergence(logits, target_logits, *, axis=-1, temperature=1.0,
                          reduction="batchmean", return_grad=False, grad_out=None,
                          backend="auto"):
    """KL(softmax(target_logits/T) || softmax(logits/T)) per row, for distillation.

    Computed from the two logit arrays in one pass, without forming either
    distribution::

        KL = sum_c p_c (t_c - s_c) + lse(s) - lse(t),  s = logits/T, t = target_logits/T

    Reductions: ``"batchmean"`` (sum over rows / number of rows, the mathematically
    right mean), ``"sum"``, ``"mean"`` (sum / number of elements, as PyTorch's
    ``kl_div``) and ``"none"``.  There is no ``T**2`` factor: multiply by it yourself if
    you follow Hinton et al.  The gradient is with respect to ``logits``.
    """
    if _on_gpu(backend, logits, target_logits):
        return _cuda_api().softmax_kl_divergence(
            logits, target_logits, axis=axis, temperature=temperature, reduction=reduction,
            return_grad=return_grad, grad_out=grad_out)
    _check_reduction(reduction, ("none", "sum", "mean", "batchmean"))
    temp = _scalar_option(temperature, "temperature", 0.0, None, lo_open=True)
    want_grad = bool(return_grad) or grad_out is not None
    f = _Float(logits, "logits")
    _check_inverse(temp, "temperature", f.out_dtype)
    ft = f.companion(target_logits, "target_logits")
    if ft.source.shape != f.source.shape:
        raise ValueError(f"target_logits must have the logits' shape {f.source.shape}; "
                         f"got {ft.source.shape}")
    rows, batch, ax = _class_rows(f.arr, axis, "logits")
    trows, _, _ = _class_rows(ft.arr, axis, "target_logits")
    n, c = rows.shape
    den = {"batchmean": n, "mean": n * c, "sum": 1, "none": 1}[reduction]
    gscale = 1.0 / den if den else math.nan
    grad, g2, finish = _grad_target(want_grad, grad_out, logits, f, ax, rows.shape,
                                    (ft.source,))
    out = np.empty(n, np.float64)
    par = _parallel(backend, rows.size)
    _backend_module().run("kl_logits", par, rows, f.hk, trows, ft.hk, 1.0 / temp, gscale,
                          want_grad, g2, f.hk, out, _nblocks(n, par))
    if finish is not None:
        finish()
    if reduction in ("batchmean", "mean"):
        res = _reduce(out, batch, "mean", den, f.out_dtype)
    else:
        res = _reduce(out, batch, reduction, 1, f.out_dtype)
    return (res, grad) if want_grad else res


# ---------------------------------------------------------------------------- binary CE
def _elementwise_rows(arrays, shape):
    """2-D (rows, cols) views for elementwise kernels; one long row when contiguous."""
    if all(a is None or (a.shape == shape and a.flags.c_contiguous) for a in arrays):
        return [None if a is None else a.reshape(1, -1) for a in arrays]
    shape2 = _rows_shape(shape) if shape else (1, 1)  # explicit: -1 fails for size 0
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
        elif a.shape == shape:
            out.append(np.ascontiguousarray(a.reshape(shape2)))
        else:  # a broadcast weight: keep its zero strides rather than materialise it
            out.append(np.broadcast_to(a, shape).reshape(shape2))
    return out


def _elementwise_buffers(shape2, keep, dtype):
    """Output rows (kept only for ``"none"``) and one partial sum per kernel task."""
    n, c = shape2
    out = np.empty((n, c) if keep else (0, 0), dtype)
    ncb = max(1, -(-c // _ELEMENTWISE_BLOCK))
    return out, np.empty(n * ncb, np.float64), ncb


def _broadcast_weight(weight, shape, dtype, name):
    if weight is None:
        return None
    w = np.asarray(weight)
    if w.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real array, got dtype {w.dtype}")
    try:
        np.broadcast_shapes(w.shape, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {w.shape} does not broadcast to the input "
                         f"shape {shape}") from None
    if np.broadcast_shapes(w.shape, shape) != tuple(shape):
        raise ValueError(f"{name} of shape {w.shape} does not broadcast to the input "
                         f"shape {shape}")
    return w.astype(dtype, copy=False)


def _binary_inputs(x, targets, xname):
    fx = _Float(x, xname)
    fy = fx.companion(targets, "targets")
    if fy.source.shape != fx.source.shape:
        raise ValueError(f"targets must have the {xname}' shape {fx.source.shape}; "
                         f"got {fy.source.shape}")
    return fx, fy


def binary_cross_entropy(probs, targets, *, weight=None, reduction="mean", backend="auto"):
    """Binary cross-entropy from probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    ``-w (y log p + (1 - y) log(1 - p))`` elementwise with each log clamped at -100, so
    ``p`` in {0, 1} stays finite.  Probabilities outside [0, 1] raise ``ValueError``;
    soft targets in [0, 1] are allowed.  ``"mean"`` averages over all elements.
    """
    if _on_gpu(backend, probs, targets):
        return _cuda_api().binary_cross_entropy(probs, targets, weight=weight,
                                                reduction=reduction)
    _check_reduction(reduction)
    fp, fy = _binary_inputs(probs, targets, "probs")
    shape = fp.source.shape
    w = _broadcast_weight(weight, shape, fp.out_dtype, "weight")
    p2, y2, w2 = _elementwise_rows([fp.arr, fy.arr, w], shape)
    c = p2.shape[1]
    keep = reduction == "none"
    out, partial, ncb = _elementwise_buffers(p2.shape, keep, fp.out_dtype)
    bad = np.empty(partial.size, np.int64)
    par = _parallel(backend, p2.size)
    _backend_module().run("bce", par, p2, fp.hk, y2, fy.hk,
                          w2 if w2 is not None else np.ones((1, 0), fp.out_dtype),
                          w2 is not None, keep, _ELEMENTWISE_BLOCK, out, partial, bad)
    hits = np.flatnonzero(bad >= 0)
    if hits.size:
        task = int(hits[0])
        row, col = task // ncb, int(bad[task])
        flat = row * c + col
        pos = tuple(int(v) for v in np.unravel_index(flat, shape)) if shape else ()
        raise ValueError(f"probs must lie in [0, 1]; probs[{list(pos)}] = "
                         f"{fp.source[pos]!r}")
    if keep:
        return out.reshape(shape)
    return _reduce(partial, (), reduction, p2.size, fp.out_dtype)


def binary_cross_entropy_with_logits(logits, targets, *, weight=None, pos_weight=None,
                                     reduction="mean", return_grad=False, grad_out=None,
                                     backend="auto"):
    """Binary cross-entropy from logits, as PyTorch's ``binary_cross_entropy_with_logits``.

    Computed stably, elementwise::

        loss = w ((1 - y) x + l (log1p(exp(-|x|)) + max(-x, 0))),  l = 1 + (pos_weight - 1) y

    which without ``pos_weight`` is ``max(x, 0) - x y + log1p(exp(-|x|))``.  ``weight``
    broadcasts against the logits; ``pos_weight`` broadcasts along the last axis (one per
    class, as PyTorch).  Gradient ``w ((1 - y) - l sigmoid(-x))``, i.e. ``sigmoid(x) - y``
    without weights, scaled for the reduction.
    """
    if _on_gpu(backend, logits, targets):
        return _cuda_api().binary_cross_entropy_with_logits(
            logits, targets, weight=weight, pos_weight=pos_weight, reduction=reduction,
            return_grad=return_grad, grad_out=grad_out)
    _check_reduction(reduction)
    want_grad = bool(return_grad) or grad_out is not None
    fx, fy = _binary_inputs(logits, targets, "logits")
    shape = fx.source.shape
    w = _broadcast_weight(weight, shape, fx.out_dtype, "weight")
    pw = _broadcast_weight(pos_weight, shape, fx.out_dtype, "pos_weight")
    size = int(np.prod(shape, dtype=np.int64))
    gscale = (1.0 / size if size else math.nan) if reduction == "mean" else 1.0
    x2, y2, w2, pw2 = _elementwise_rows([fx.arr, fy.arr, w, pw], shape)
    grad, g2, finish = _grad_target(want_grad, grad_out, logits, fx, None, x2.shape,
                                    (fy.source, w, pw))
    keep = reduction == "none"
    out, partial, _ = _elementwise_buffers(x2.shape, keep, fx.out_dtype)
    dummy = np.ones((1, 0), fx.out_dtype)
    par = _parallel(backend, x2.size)
    _backend_module().run("bce_logits", par, x2, fx.hk, y2, fy.hk,
                          w2 if w2 is not None else dummy, w2 is not None,
                          pw2 if pw2 is not None else dummy, pw2 is not None, gscale,
                          want_grad, g2, fx.hk, keep, _ELEMENTWISE_BLOCK, out, partial)
    if finish is not None:
        finish()
    res = out.reshape(shape) if keep else _reduce(partial, (), reduction, size, fx.out_dtype)
    return (res, grad) if want_grad else res
