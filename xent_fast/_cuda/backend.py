"""The CUDA backend's entry points: the CPU backend's names and keyword options, for device
arrays (see ``arrays``): allocate in the input's library, launch, finish on the device.

Arguments arrive checked by the front end (``_api``, ``_inputs``).  What is raised here
is the device's own: no usable GPU, or a layout that cannot be written in place; data
errors (a bad target, a negative probability) use ``_inputs``'s texts.  Nothing is
copied to the host but what an error message or a Python number needs.
"""

import math

import numpy as np

from .. import _inputs
from . import kernels as K
from .arrays import (NO_BAD, Dev, aligned_view, bad_flag, device_weights, dummy, element,
                     expand, flat2, flat_out, is_device_array, merged_stride, per_row_out,
                     require_gpu, rows3_from, scalar_out, to_host, vec_width, weight2, zeros)
from .kernels import cuda, kernels, launch, team_size


# ---------------------------------------------------------------------------- inputs
def operand(value, name):
    require_gpu()
    return Dev(value, name)


def describe(value, name="input"):
    """(shape, dtype) of an input, without moving it."""
    if is_device_array(value):
        d = Dev(value, "array", allow_int=True)
        return d.shape, ("bfloat16" if d.bf16 else d.dtype)
    a = _inputs.rectangular(value, name)
    return a.shape, a.dtype


def describe_grad(grad_out, x):
    """(shape, dtype, writeable) of a ``grad_out``: a device array of the logits'
    library, or a NumPy array when the logits are host arrays."""
    if x.host is not None and isinstance(grad_out, np.ndarray):
        return grad_out.shape, grad_out.dtype, grad_out.flags.writeable
    if not is_device_array(grad_out):
        raise TypeError("grad_out must be a device array (of the logits' library) when "
                        "computing on the GPU")
    g = Dev(grad_out, "grad_out", allow_int=True)
    return g.shape, ("bfloat16" if g.bf16 else g.dtype), True


def _grad_out(want_grad, grad_out, dev, ax):
    """(gradient result or None, 3-D Numba view the kernels write, finisher or None)."""
    if not want_grad:
        return None, dummy(dev.dtype, 3), None
    if grad_out is None:
        res, view = dev.empty(dev.shape, dev.dtype)
        return res, rows3_from(view, ax), None
    if dev.host is not None and isinstance(grad_out, np.ndarray):
        # host arrays on the GPU backend: compute into a device buffer, copy back after
        res, view = dev.empty(dev.shape, dev.dtype)

        def finish():
            h = view.copy_to_host()
            grad_out[...] = h.view(grad_out.dtype) if dev.bf16 else h

        return grad_out, rows3_from(view, ax), finish
    return grad_out, Dev(grad_out, "grad_out").rows3(ax, copy_ok=False), None


def _with_grad(out, want_grad, grad, finish, dev):
    if not want_grad:
        return out
    if finish is not None:
        finish()
        return out, grad
    return out, dev.finish(grad)


# ---------------------------------------------------------------------------- building blocks
def logsumexp(x, *, axis, keepdims, threads=False):
    x3 = x.rows3(axis)
    c = x3.shape[1]
    res, flat = per_row_out(x, _inputs.batch_shape(x.shape, axis), x.out_dtype)
    n = x3.shape[0] * x3.shape[2]
    if n:
        v = vec_width(x, x3, c)
        ts = team_size(c)
        blocks, nthreads = launch(n, ts)
        kernels(v, x.out_dtype == np.float64)["lse"][blocks, nthreads](x3, flat, ts)
    if keepdims:
        res = expand(res, axis, x)
    return x.finish(res)


def softmax(x, *, axis, log, threads=False):
    x3 = x.rows3(axis)
    res, view = x.empty(x.shape, x.out_dtype)
    o3 = rows3_from(view, axis)
    n = x3.shape[0] * x3.shape[2]
    c = x3.shape[1]
    if n:
        v = vec_width(x, x3, c)
        if v > 1 and (x.out_dtype.itemsize != x.dtype.itemsize):
            v = 1
        ts = team_size(c)
        blocks, nthreads = launch(n, ts)
        kernels(v, x.out_dtype == np.float64)["softmax"][blocks, nthreads](x3, bool(log), o3, ts)
    return x.finish(res)


def dist(p, q, *, axis, mode, scale, threads=False):
    """Entropy (mode 0, ``q`` unused), cross-entropy (1) or KL divergence (2) of rows."""
    p3 = p.rows3(axis)
    q3 = q.rows3(axis) if q is not p else p3
    batch = _inputs.batch_shape(p.shape, axis)
    n = p3.shape[0] * p3.shape[2]
    c = p3.shape[1]
    out = cuda.device_array(n, np.float64)
    bad = bad_flag()
    if n:
        ts = team_size(c)
        blocks, nthreads = launch(n, ts)
        f64 = p.out_dtype == np.float64 or q.out_dtype == np.float64
        kernels(1, f64)["dist"][blocks, nthreads](p3, q3, mode, out, bad, ts)
    b = int(bad.copy_to_host()[0])
    if b != NO_BAD:
        i, j = divmod(b, 2 * c)
        name, src = ("p", p) if j < c else ("q", q)
        pos = _inputs.position(batch, axis, i, j % c)
        raise _inputs.not_probability(name, pos, element(src, pos))
    res, flat = per_row_out(p, batch, p.out_dtype)
    if n:
        K.scale_kernel[max(1, -(-n // K.FLAT_THREADS)), K.FLAT_THREADS](out, 1.0 / scale, flat)
    return p.finish(res)


# ---------------------------------------------------------------------------- softmax CE
def _index_targets(targets, n, c, ignore):
    """Integer targets as an int64 device vector (and the device input, if one)."""
    if not is_device_array(targets):
        th = np.asarray(targets)
        return cuda.to_device(_inputs.index_targets(th, c, ignore)), None, th
    dt = Dev(targets, "targets", allow_int=True)
    if merged_stride(dt.shape, dt.desc["strides"]) is None:
        dt.make_contiguous()
    step = merged_stride(dt.shape, dt.desc["strides"]) or dt.dtype.itemsize
    return dt.view((n,), (step,)), dt, None


def softmax_cross_entropy(x, targets, *, axis, kind, weight, ignore_index, label_smoothing,
                          z_loss, softcap, reduction, want_grad, grad_out, threads=False):
    eps, z, cap = label_smoothing, z_loss, softcap
    x3 = x.rows3(axis)
    c = x3.shape[1]
    n = x3.shape[0] * x3.shape[2]
    batch = _inputs.batch_shape(x.shape, axis)
    f64 = x.out_dtype == np.float64
    w, has_w, wsum = device_weights(weight, c, x.out_dtype)
    keep = reduction == "none"
    acc = zeros(1, np.float64)
    res, loss_flat = (per_row_out(x, batch, x.out_dtype) if keep
                      else (None, dummy(x.out_dtype, 1)))
    ts = team_size(c)
    blocks, nthreads = launch(n, ts)
    mean = reduction == "mean"
    if kind == "index":
        ignore = ignore_index
        tdev, dt, th = _index_targets(targets, n, c, ignore)
        den = zeros(2, np.float64)  # summed weight, number of kept targets
        bad = bad_flag()
        if n:
            K.targets_kernel[min(1024, max(1, -(-n // K.FLAT_THREADS))), K.FLAT_THREADS](
                tdev, c, ignore, w, has_w, den, bad)
        grad, g3, gfin = _grad_out(want_grad, grad_out, x, axis)
        v = vec_width(x, x3, c)
        if want_grad and v > 1 and (g3.strides != x3.strides or not aligned_view(g3, 16)):
            v = 1
        if n:
            kernels(v, f64)["ce_index"][blocks, nthreads](
                x3, tdev, w, has_w, wsum, eps, z, cap, ignore, den, mean, want_grad, g3, keep,
                loss_flat, acc, ts)
        b = int(bad.copy_to_host()[0])  # the only host round trip: the error flag
        if b != NO_BAD:
            val = int(th.reshape(-1)[b]) if dt is None else element(
                dt, np.unravel_index(b, dt.shape))
            raise _inputs.bad_target(batch, b, val, c, ignore)
        out = x.finish(res) if keep else scalar_out(x, acc, den, True, 0.0, mean, x.out_dtype)
    else:
        p3 = x.companion(targets, "targets").rows3(axis)
        gscale = (1.0 / n if n else math.nan) if mean else 1.0
        grad, g3, gfin = _grad_out(want_grad, grad_out, x, axis)
        if n:
            kernels(1, f64)["ce_prob"][blocks, nthreads](
                x3, p3, w, has_w, eps, z, cap, gscale, want_grad, g3, keep, loss_flat, acc, ts)
        out = x.finish(res) if keep else scalar_out(x, acc, None, False, float(n), mean,
                                                    x.out_dtype)
    return _with_grad(out, want_grad, grad, gfin, x)


def softmax_kl_divergence(x, t, *, axis, temperature, reduction, want_grad, grad_out,
                          threads=False):
    x3 = x.rows3(axis)
    t3 = t.rows3(axis)
    n = x3.shape[0] * x3.shape[2]
    c = x3.shape[1]
    batch = _inputs.batch_shape(x.shape, axis)
    den = _inputs.kl_denominator(reduction, n, c)
    gscale = 1.0 / den if den else math.nan
    keep = reduction == "none"
    acc = zeros(1, np.float64)
    res, flat = (per_row_out(x, batch, x.out_dtype) if keep else (None, dummy(x.out_dtype, 1)))
    grad, g3, gfin = _grad_out(want_grad, grad_out, x, axis)
    if n:
        ts = team_size(c)
        blocks, nthreads = launch(n, ts)
        kernels(1, x.out_dtype == np.float64)["kl_logits"][blocks, nthreads](
            x3, t3, 1.0 / temperature, gscale, want_grad, g3, keep, flat, acc, ts)
    if keep:
        out = x.finish(res)
    else:
        out = scalar_out(x, acc, None, False, float(den), reduction in ("mean", "batchmean"),
                         x.out_dtype)
    return _with_grad(out, want_grad, grad, gfin, x)



def softmax_js_divergence(x, t, *, axis, beta, temperature, targets, ignore_index, reduction,
                          want_grad, grad_out, threads=False):
    x3 = x.rows3(axis)
    t3 = t.rows3(axis)
    n = x3.shape[0] * x3.shape[2]
    c = x3.shape[1]
    batch = _inputs.batch_shape(x.shape, axis)
    mean = reduction in ("mean", "batchmean")
    masked = targets is not None
    den = zeros(1, np.float64)
    if masked:  # the denominator counts the kept rows, on the device
        tdev = _index_targets(targets, n, c, None)[0]
        if n and mean:
            K.kept_rows_kernel[min(1024, max(1, -(-n // K.FLAT_THREADS))), K.FLAT_THREADS](
                tdev, ignore_index, float(c) if reduction == "mean" else 1.0, den)
        ignore = ignore_index
    else:
        tdev, ignore = dummy(np.int64, 1), 0
    host_den = _inputs.kl_denominator(reduction, n, c)
    gscale = 1.0 / host_den if host_den else math.nan
    use_den = masked and mean
    keep = reduction == "none"
    acc = zeros(1, np.float64)
    res, flat = (per_row_out(x, batch, x.out_dtype) if keep else (None, dummy(x.out_dtype, 1)))
    grad, g3, gfin = _grad_out(want_grad, grad_out, x, axis)
    mode = 0 if beta == 0 else 1 if beta == 1 else 2
    if n:
        ts = team_size(c)
        blocks, nthreads = launch(n, ts)
        kernels(1, x.out_dtype == np.float64)["jsd"][blocks, nthreads](
            x3, t3, tdev, masked, ignore, 1.0 / temperature, float(beta), mode, gscale, den,
            use_den, want_grad, g3, keep, flat, acc, ts)
    if keep:
        out = x.finish(res)
    else:
        out = scalar_out(x, acc, den, use_den, float(host_den), mean, x.out_dtype)
    return _with_grad(out, want_grad, grad, gfin, x)


def sparse_targets(x, indices, values, *, axis, temperature, mode, reduction, want_grad,
                   grad_out, threads=False):
    x3 = x.rows3(axis)
    di = Dev(indices, "indices", allow_int=True)
    i3 = di.rows3(axis)
    v3 = x.companion(values, "values").rows3(axis)
    n = x3.shape[0] * x3.shape[2]
    c, k = x3.shape[1], i3.shape[1]
    batch = _inputs.batch_shape(x.shape, axis)
    den = _inputs.sparse_denominator(mode, reduction, n, c)
    gscale = 1.0 / den if den else math.nan
    keep = reduction == "none"
    acc = zeros(1, np.float64)
    bad = cuda.to_device(np.array([NO_BAD, NO_BAD], np.int64))
    res, flat = (per_row_out(x, batch, x.out_dtype) if keep else (None, dummy(x.out_dtype, 1)))
    grad, g3, gfin = _grad_out(want_grad, grad_out, x, axis)
    if n:
        ts = team_size(c)
        blocks, nthreads = launch(n, ts)
        kernels(1, x.out_dtype == np.float64)["sparse_kd"][blocks, nthreads](
            x3, i3, v3, 1.0 / temperature, mode, gscale, want_grad, g3, keep, flat, acc, bad,
            ts)
    flags = bad.copy_to_host()  # the only host round trip: the error flags
    name = "target_indices" if mode == 2 else "teacher_indices"
    if flags.min() != NO_BAD:
        which = 0 if flags[0] != NO_BAD else 1
        i, j = divmod(int(flags[which]), k)
        pos = _inputs.position(batch, axis, i, j)
        val = element(di, pos)
        if which == 0:
            raise ValueError(f"{name} must lie in [0, {c}); got {val} at {pos}")
        raise ValueError(f"{name} must be distinct within a row; class {val} appears twice "
                         f"in row {i}")
    if keep:
        out = x.finish(res)
    else:
        out = scalar_out(x, acc, None, False, float(den), reduction != "sum", x.out_dtype)
    return _with_grad(out, want_grad, grad, gfin, x)

# ---------------------------------------------------------------------------- binary CE
def _flat_blocks(size):
    return min(4096, -(-size // K.FLAT_THREADS)), K.FLAT_THREADS


def binary_cross_entropy(p, y, *, weight, reduction, threads=False):
    shape = p.shape
    p2, y2 = flat2(p), flat2(y)
    w2, has_w = weight2(weight, shape, p.out_dtype, "weight")
    keep = reduction == "none"
    size = math.prod(shape)
    res, view = p.empty(shape, p.out_dtype) if keep else (None, None)
    o2 = flat_out(view, res, shape, p.out_dtype) if keep else dummy(p.out_dtype, 2)
    acc = zeros(1, np.float64)
    bad = bad_flag()
    if size:
        K.bce_kernel[_flat_blocks(size)](p2, y2, w2, has_w, keep, o2, acc, bad)
    b = int(bad.copy_to_host()[0])
    if b != NO_BAD:
        pos = tuple(_inputs.flat_position(shape, b))
        raise _inputs.probs_out_of_range(pos, element(p, pos))
    if keep:
        return p.finish(res)
    return scalar_out(p, acc, None, False, float(size), reduction == "mean", p.out_dtype)


def _flat_result(x, keep, shape):
    """An elementwise result (``keep``: reduction "none") and its flat 2-D view."""
    res, view = x.empty(shape, x.out_dtype) if keep else (None, None)
    return res, (flat_out(view, res, shape, x.out_dtype) if keep else dummy(x.out_dtype, 2))


def _flat_grad(x, want_grad, grad_out, shape):
    """(gradient result, flat 2-D view the kernel writes, finisher or None) of an
    elementwise loss."""
    if not want_grad:
        return None, dummy(x.dtype, 2), None
    if grad_out is None:
        grad, gview = x.empty(shape, x.dtype)
        return grad, flat_out(gview, grad, shape, x.dtype), None
    if x.host is not None and isinstance(grad_out, np.ndarray):
        buf, gview = x.empty(shape, x.dtype)

        def copy_back():
            h = gview.copy_to_host()
            grad_out[...] = h.view(grad_out.dtype) if x.bf16 else h

        return grad_out, flat_out(gview, buf, shape, x.dtype), copy_back
    return grad_out, flat2(Dev(grad_out, "grad_out"), copy_ok=False), None


def pointwise(x, y, *, mode, alpha, gamma, reduction, den, want_grad, grad_out,
              threads=False):
    shape = x.shape
    size = math.prod(shape)
    x2, y2 = flat2(x), flat2(y)
    gscale = 1.0 if reduction in ("none", "sum") else (1.0 / den if den else math.nan)
    keep = reduction == "none"
    res, o2 = _flat_result(x, keep, shape)
    grad, g2, gfin = _flat_grad(x, want_grad, grad_out, shape)
    acc = zeros(1, np.float64)
    if size:
        K.pointwise_kernel[_flat_blocks(size)](x2, y2, mode, float(alpha), float(gamma), gscale,
                                               want_grad, g2, keep, o2, acc)
    out = x.finish(res) if keep else scalar_out(x, acc, None, False, float(den),
                                                reduction != "sum", x.out_dtype)
    return _with_grad(out, want_grad, grad, gfin, x)


def nll_loss(x, targets, *, axis, weight, ignore_index, reduction, want_grad, grad_out,
             threads=False):
    x3 = x.rows3(axis)
    c = x3.shape[1]
    n = x3.shape[0] * x3.shape[2]
    batch = _inputs.batch_shape(x.shape, axis)
    w, has_w, _ = device_weights(weight, c, x.out_dtype)
    tdev, dt, th = _index_targets(targets, n, c, ignore_index)
    den = zeros(2, np.float64)
    bad = bad_flag()
    if n:
        K.targets_kernel[min(1024, max(1, -(-n // K.FLAT_THREADS))), K.FLAT_THREADS](
            tdev, c, ignore_index, w, has_w, den, bad)
    keep = reduction == "none"
    acc = zeros(1, np.float64)
    res, flat = (per_row_out(x, batch, x.out_dtype) if keep else (None, dummy(x.out_dtype, 1)))
    grad, g3, gfin = _grad_out(want_grad, grad_out, x, axis)
    mean = reduction == "mean"
    if n:
        K.nll_kernel[max(1, -(-n // K.FLAT_THREADS)), K.FLAT_THREADS](
            x3, tdev, w, has_w, ignore_index, den, mean, want_grad, g3, keep, flat, acc)
    b = int(bad.copy_to_host()[0])
    if b != NO_BAD:
        val = int(th.reshape(-1)[b]) if dt is None else element(
            dt, np.unravel_index(b, dt.shape))
        raise _inputs.bad_target(batch, b, val, c, ignore_index)
    out = x.finish(res) if keep else scalar_out(x, acc, den, mean, 0.0, mean, x.out_dtype)
    return _with_grad(out, want_grad, grad, gfin, x)


def binary_cross_entropy_with_logits(x, y, *, weight, pos_weight, reduction, want_grad,
                                     grad_out, threads=False):
    shape = x.shape
    size = math.prod(shape)
    x2, y2 = flat2(x), flat2(y)
    w2, has_w = weight2(weight, shape, x.out_dtype, "weight")
    pw2, has_pw = weight2(pos_weight, shape, x.out_dtype, "pos_weight")
    gscale = (1.0 / size if size else math.nan) if reduction == "mean" else 1.0
    keep = reduction == "none"
    res, o2 = _flat_result(x, keep, shape)
    grad, g2, gfin = _flat_grad(x, want_grad, grad_out, shape)
    acc = zeros(1, np.float64)
    if size:
        K.bce_logits_kernel[_flat_blocks(size)](x2, y2, w2, has_w, pw2, has_pw, gscale,
                                                want_grad, g2, keep, o2, acc)
    out = x.finish(res) if keep else scalar_out(x, acc, None, False, float(size),
                                                reduction == "mean", x.out_dtype)
    return _with_grad(out, want_grad, grad, gfin, x)


# ---------------------------------------------------------------------------- evaluate
def eval_stats(x, targets, *, axis, ignore_index, threads=False):
    """(statistics (n, 6) float64 on the host, targets as a flat int64 host array): the
    logits are read once on the device; only n x 6 numbers come back."""
    x3 = x.rows3(axis)
    n = x3.shape[0] * x3.shape[2]
    c = x3.shape[1]
    th = to_host(targets) if is_device_array(targets) else np.asarray(targets)
    tf = _inputs.index_targets(th, c, ignore_index)
    bad = np.flatnonzero((tf != ignore_index) & ((tf < 0) | (tf >= c)))
    if bad.size:
        raise _inputs.bad_target(th.shape, int(bad[0]), int(tf[bad[0]]), c, ignore_index)
    st = cuda.device_array((n, 6), np.float64)
    if n:
        ts = team_size(c)
        blocks, nthreads = launch(n, ts)
        kernels(1, x.out_dtype == np.float64)["eval"][blocks, nthreads](
            x3, cuda.to_device(tf), st, ts)
    return st.copy_to_host(), tf
