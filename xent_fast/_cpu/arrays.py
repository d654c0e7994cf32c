"""Host (NumPy) arrays prepared for the CPU kernels: half precision read as uint16 bits,
the class axis moved last and the batch axes flattened into rows, gradient buffers.

NumPy only: ``_evaluate``, ``_stream`` and ``dask`` use these without importing Numba.
"""

import math

import numpy as np

from .. import _inputs


def host(value, name="input"):
    """An input as a NumPy array: PyTorch CPU tensors through a view of their memory
    (``requires_grad`` ones too; bfloat16 through its bits where ml_dtypes is
    installed, else widened to float32), anything else through ``np.asarray``."""
    if type(value) is np.ndarray:
        return value
    if (type(value).__module__ or "").startswith("torch") and hasattr(value, "detach"):
        return _torch_host(value)
    return _inputs.rectangular(value, name)


def _torch_host(t):
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        raise TypeError(f"a tensor on {t.device} is not a host array")
    t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            return t.float().numpy()
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class HostFloat:
    """A float input prepared for the kernels.

    ``arr`` is what the kernels read (uint16 bits for half precision), ``hk`` the half
    kind (0 float32/float64, 1 float16, 2 bfloat16), ``dtype`` the array's own float
    dtype (the gradient's), ``out_dtype`` the result dtype, which is also the precision
    the kernels compute in, and ``source`` the array as given.
    """

    __slots__ = ("arr", "hk", "dtype", "out_dtype", "source")

    def __init__(self, value, name):
        if _inputs.is_gpu_array(value):
            raise TypeError(f"{name} is a GPU array: use backend='cuda' (or 'auto'), or copy "
                            "it to the host for the CPU backends")
        a = host(value, name)
        self.source = a
        self.hk, kernel_dtype, self.out_dtype = _inputs.float_policy(a.dtype, name)
        if self.hk == 0 and a.dtype != kernel_dtype:
            a = a.astype(kernel_dtype)
        elif not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        self.dtype = a.dtype
        self.arr = a.view(np.uint16) if self.hk else a

    @property
    def shape(self):
        return self.source.shape

    @property
    def grad_dtype(self):
        return self.dtype

    def companion(self, value, name):
        """Another float input read with this one (targets, target logits): kept as is
        when half precision, else brought to this input's compute dtype."""
        other = HostFloat(value, name)
        if other.hk and self.out_dtype == np.float64:
            # float64 logits with half targets: widened once here, so that no kernel
            # mixes a float64 row with a float32 one
            other.arr = other.source.astype(np.float64)
            other.hk = 0
        elif other.hk == 0 and other.dtype != self.out_dtype:
            other.arr = other.arr.astype(self.out_dtype)
        return other


def describe(value, name="input"):
    """(shape, dtype) of a host input, as the checks of ``_inputs`` take them."""
    a = host(value, name)
    return a.shape, a.dtype


def to_host(value, name="input"):
    """A small input (class weights) as a NumPy array."""
    return None if value is None else host(value, name)


def class_rows(a, ax):
    """Move the (normalised) class axis ``ax`` last and flatten the batch axes:
    (rows, C), batch shape."""
    m = a if ax == a.ndim - 1 else np.moveaxis(a, ax, -1)
    # Kernels take rows at any row stride (a column slice, every other row, reversed
    # rows) but vectorise only over unit-stride rows: copy anything else once.
    r = m.reshape(rows_shape(m.shape))  # a view where the batch axes merge
    if r.shape[1] > 1 and r.strides[1] != r.itemsize:
        r = np.ascontiguousarray(r)
    return r, m.shape[:-1]


def rows_shape(shape):
    """(rows, C) for an array whose last axis is the class axis."""
    return math.prod(shape[:-1]), shape[-1]


def grad_target(want_grad, grad_out, f, ax, shape2, others=()):
    """The gradient array, the kernels' 2-D view of it, and a finisher to call after.

    The kernels see the logits moved to put axis ``ax`` last (no move for ``None``) and
    reshaped to ``shape2``; the gradient is written through the same view of
    ``grad_out`` when that view is C-contiguous, either is the logits (in place) or
    overlaps them nowhere, and overlaps none of the ``others`` (the call's other array
    inputs: targets, target logits, weights), which the kernels read after writing the
    gradient; else into a temporary copied back by the finisher.  ``grad_out`` has
    been checked (shape, dtype, writeable) by the front end.
    """
    if not want_grad:  # the kernels still take an array argument
        return None, np.empty((0, 0), f.arr.dtype), None
    given = grad_out
    if grad_out is not None:
        grad_out = host(grad_out)
    shape = f.source.shape
    moved_shape = shape if ax is None else shape[:ax] + shape[ax + 1:] + (shape[ax],)
    if grad_out is None:
        moved = np.empty(moved_shape, f.dtype)
        grad = moved if ax is None else np.moveaxis(moved, -1, ax)
        view = moved.reshape(shape2)
        return grad, (view.view(np.uint16) if f.hk else view), None
    moved = grad_out if ax is None else np.moveaxis(grad_out, ax, -1)
    in_place = grad_out is f.source or (
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
        return given, (view.view(np.uint16) if f.hk else view), None
    tmp = np.empty(shape2, f.dtype)

    def finish():
        moved[...] = tmp.reshape(moved_shape)

    return given, (tmp.view(np.uint16) if f.hk else tmp), finish


def describe_grad(grad_out, x=None):
    """(shape, dtype, writeable) of a ``grad_out``: a NumPy array (or a PyTorch CPU
    tensor) on the CPU."""
    if not isinstance(grad_out, np.ndarray):
        if not (type(grad_out).__module__ or "").startswith("torch"):
            raise TypeError("grad_out must be a NumPy array (or a PyTorch CPU tensor)")
        grad_out = host(grad_out)
    return grad_out.shape, grad_out.dtype, grad_out.flags.writeable


def elementwise_rows(arrays, shape):
    """2-D (rows, cols) views for elementwise kernels; one long row when contiguous."""
    if all(a is None or (a.shape == shape and a.flags.c_contiguous) for a in arrays):
        return [None if a is None else a.reshape(1, -1) for a in arrays]
    shape2 = rows_shape(shape) if shape else (1, 1)  # explicit: -1 fails for size 0
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
        elif a.shape == shape:
            out.append(np.ascontiguousarray(a.reshape(shape2)))
        else:  # a broadcast weight: keep its zero strides rather than materialise it
            out.append(np.broadcast_to(a, shape).reshape(shape2))
    return out


def reduce_rows(rows, batch_shape, reduction, denominator, out_dtype):
    """A loss from float64 per-row (or per-block) values: the rows for ``"none"``, else
    their sum or mean."""
    if reduction == "none":
        return rows.reshape(batch_shape).astype(out_dtype, copy=False)
    total = float(rows.sum())  # rows are float64
    if reduction == "sum":
        return out_dtype.type(total)
    return out_dtype.type(_inputs.mean_of(total, denominator))
