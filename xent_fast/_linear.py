"""Fused linear cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` over row chunks,
so that only one chunk of logits ever exists.

Per chunk of rows: the array library's BLAS forms the chunk's logits, the fused
cross-entropy kernel turns them into their gradient in place (``grad_out=logits``), and
BLAS multiplies that back: ``grad_hidden[chunk] = g @ weight`` and ``grad_weight += g.T @
hidden[chunk]`` (a GEMM with beta = 1, so the weight's gradient is accumulated where it
lies, for tensors; through an 8 MiB slab for NumPy arrays).  No matrix product is
written here: NumPy arrays use NumPy's BLAS, PyTorch tensors PyTorch's (MKL on the CPU,
cuBLAS on the GPU), and the kernels run through ``_api`` on either backend.

Works on shapes and a small array-library adapter; imports neither Numba nor PyTorch.
"""

import math

import numpy as np

from . import _api, _inputs
from ._cpu.arrays import host

# A chunk's logits fill about this many bytes (at least MIN_CHUNK_ROWS rows): a fixed,
# small buffer whatever the batch, and rows enough for BLAS to run at full speed.
CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 64


def chunk_rows_for(n, v, itemsize, chunk_rows=None):
    """The rows a chunk holds: ``chunk_rows`` if given, else as many as fill
    ``CHUNK_BYTES`` of logits, at least ``MIN_CHUNK_ROWS``; at most ``n``."""
    if chunk_rows is not None:
        try:
            c = int(chunk_rows)
        except (TypeError, ValueError):
            raise TypeError(f"chunk_rows must be a positive int, got {chunk_rows!r}") from None
        if c != chunk_rows or c < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    else:
        c = max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(v * itemsize, 1))
    return max(1, min(c, n))


# ---------------------------------------------------------------------------- array libraries
class _NumPy:
    """NumPy arrays: products by NumPy's BLAS; half precision computed in float32."""

    name = "numpy"

    def __init__(self, *arrays):
        dts = [host(a).dtype for a in arrays if a is not None]
        self.dtype = np.dtype(np.float64 if all(d == np.float64 for d in dts) else np.float32)

    def compute(self, a):
        """``a`` as a C-contiguous array of the compute dtype (a view where it is one)."""
        return np.ascontiguousarray(host(a), dtype=self.dtype)

    def matrix(self, a, ax):
        a = host(a)
        if ax != a.ndim - 1:
            a = np.moveaxis(a, ax, -1)
        return self.compute(a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a)

    def empty(self, shape):
        return np.empty(shape, self.dtype)

    def zeros(self, shape):
        return np.zeros(shape, self.dtype)

    def matmul(self, a, b, out):
        np.matmul(a, b, out=out)

    def add_matmul_t(self, c, g, h, tmp):
        """``c += g.T @ h`` with ``c`` (V, H), ``g`` (n, V), ``h`` (n, H), all C order.

        NumPy's matmul has no accumulating form (GEMM's beta), so the product goes
        through a slab of ``tmp`` (8 MiB) and is added there.  SciPy's GEMM would
        accumulate in place, but its BLAS is a second library with its own threads, which
        spin beside NumPy's and the kernels': measured 25% slower end to end."""
        step = tmp.shape[0]
        for s in range(0, c.shape[0], step):
            e = min(s + step, c.shape[0])
            np.matmul(g[:, s:e].T, h, out=tmp[:e - s])
            c[s:e] += tmp[:e - s]

    def tmp_for(self, v, h):
        """Scratch for ``add_matmul_t``: a slab of the weight's gradient, 8 MiB."""
        return np.empty((max(1, min(v, (8 << 20) // max(h * self.dtype.itemsize, 1))), h),
                        self.dtype)

    def add_rows_sum(self, out, g):
        out += g.sum(axis=0)

    def asarray(self, a):
        return np.asarray(a)

    def rows_index(self, n):
        return np.arange(n)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def finish(self, a, like):
        """A result in the dtype of the input it is the gradient of."""
        dt = host(like).dtype
        return a if a.dtype == dt else a.astype(dt)


class _Torch:
    """PyTorch tensors (CPU or CUDA): products by PyTorch, in the inputs' dtype
    (bfloat16 products accumulate in float32 inside the GEMM, as ``F.linear``)."""

    name = "torch"

    def __init__(self, hidden, weight, bias):
        import torch

        self.torch = torch
        self.dtype = hidden.dtype
        self.device = hidden.device
        if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
            raise TypeError(f"hidden, weight and bias must have one dtype, got {hidden.dtype}, "
                            f"{weight.dtype}" + ("" if bias is None else f", {bias.dtype}"))

    def compute(self, a):
        return a.detach().contiguous()

    def matrix(self, a, ax):
        a = a.detach()
        if ax != a.dim() - 1:
            a = a.movedim(ax, -1)
        return a.reshape(-1, a.shape[-1]).contiguous()

    def empty(self, shape):
        return self.torch.empty(shape, dtype=self.dtype, device=self.device)

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device)

    def matmul(self, a, b, out):
        self.torch.matmul(a, b, out=out)

    def add_matmul_t(self, c, g, h, tmp):
        c.addmm_(g.t(), h)

    def tmp_for(self, v, h):
        return None

    def add_rows_sum(self, out, g):
        out += g.sum(dim=0)

    def asarray(self, a):
        return self.torch.as_tensor(a, device=self.device)

    def rows_index(self, n):
        return self.torch.arange(n, device=self.device)

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)

    def finish(self, a, like):
        return a


def _lib(hidden, weight, bias):
    mod = type(hidden).__module__ or ""
    if mod.startswith("torch"):
        lib = _Torch(hidden, weight, bias)
        if hidden.device.type == "cpu" and hidden.dtype in (lib.torch.float32,
                                                             lib.torch.float64):
            # NumPy's BLAS on views of the tensors: measured faster here at these shapes
            # (4.5 s against 5.5 s for 4096 x 1024 x 32000 float32) than PyTorch's
            return _NumPy(hidden, weight, bias)
        return lib
    if _inputs.is_gpu_array(hidden):
        raise TypeError("linear_cross_entropy takes NumPy arrays or PyTorch tensors; for other "
                        "GPU arrays form the logits and call softmax_cross_entropy")
    return _NumPy(hidden, weight, bias)


# ---------------------------------------------------------------------------- the loss
def linear_cross_entropy(hidden, weight, targets, *, bias=None, axis=-1, ignore_index=-100,
                         label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                         return_grad=False, chunk_rows=None, row_scale=None, weight_grad=True,
                         backend="auto"):
    """See ``xent_fast.linear_cross_entropy``.  ``row_scale`` (one factor a row, an
    array of the library's kind): the gradient returned is that of ``sum(row_scale *
    loss_rows)`` (the backward pass of ``reduction="none"``).  ``weight_grad=False``
    skips the weight's gradient (a frozen head: a third of the products), returned as
    None."""
    o = _inputs.CEOptions(reduction, label_smoothing, z_loss, softcap, return_grad, None)
    want_grad = o.want_grad or row_scale is not None
    if o.cap:
        _inputs.check_inverse(o.cap, "softcap", np.dtype(np.float32))
    lib = _lib(hidden, weight, bias)
    p = _Problem(lib, hidden, weight, targets, bias, axis, ignore_index)
    scale = None if row_scale is None else lib.compute(row_scale).reshape(-1)
    none = o.reduction == "none"
    rows_loss = [] if none else None
    total = 0.0
    if want_grad:
        gh, gw, gb, tmp = p.grad_buffers(weight_grad)
    for s, e, hc, zc in p.chunks(chunk_rows):
        res = _api.softmax_cross_entropy(zc, p.t[s:e], ignore_index=p.ignore,
                                         label_smoothing=o.eps, z_loss=o.z,
                                         softcap=o.cap or None,
                                         reduction="none" if none else "sum",
                                         grad_out=zc if want_grad else None, backend=backend)
        loss_c = res[0] if want_grad else res
        if none:
            rows_loss.append(loss_c)
        else:
            total += float(loss_c)
        if want_grad:
            if row_scale is not None:
                zc *= scale[s:e, None]
            p.backward_chunk(zc, hc, s, e, gh, gw, gb, tmp)
    loss = _finish_loss(lib, o.reduction, total, p.kept, rows_loss, p.batch)
    if not want_grad:
        return loss
    if o.reduction == "mean" and row_scale is None and p.kept:
        for g in (gh, gw, gb):
            if g is not None:
                g *= 1.0 / p.kept
    return (loss,) + p.grads(gh, gw, gb, hidden, weight, bias)


def _targets(lib, targets, v, ignore, batch):
    """Flat int64 targets, checked against [0, V) before any work; the number kept."""
    if lib.name == "torch":
        t = targets.detach().reshape(-1)
        if t.dtype.is_floating_point or t.dtype == lib.torch.bool:
            raise TypeError(f"targets must be integer class indices, got {t.dtype}")
        t = t.to(lib.torch.int64)
        bad = ((t < 0) | (t >= v)) & (t != ignore)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise _inputs.bad_target(batch, i, int(t[i]), v, ignore)
        return t, int((t != ignore).sum())
    tn = host(targets)
    if tn.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got dtype {tn.dtype}")
    t = _inputs.index_targets(tn, v, ignore)
    bad = np.flatnonzero(((t < 0) | (t >= v)) & (t != ignore))
    if bad.size:
        raise _inputs.bad_target(batch, int(bad[0]), int(t[bad[0]]), v, ignore)
    return t, int(np.count_nonzero(t != ignore))


def _finish_loss(lib, reduction, total, kept, rows_loss, batch):
    out_dt = np.dtype(np.float64 if str(lib.dtype).endswith("float64") else np.float32)
    if reduction == "none":
        if lib.name == "torch":
            parts = [lib.torch.as_tensor(r) for r in rows_loss]
            res = lib.torch.cat(parts) if parts else lib.torch.empty(0)
            return res.reshape(batch)
        res = np.concatenate(rows_loss) if rows_loss else np.empty(0, out_dt)
        return res.astype(out_dt, copy=False).reshape(batch)
    value = total if reduction == "sum" else _inputs.mean_of(total, kept)
    return out_dt.type(value)


def _unmatrix(lib, g, shape, ax):
    """The (N, H) gradient in the hidden's shape (feature axis back at ``ax``)."""
    moved = shape[:ax] + shape[ax + 1:] + (shape[ax],)
    g = g.reshape(moved)
    if ax == len(shape) - 1:
        return g
    return np.moveaxis(g, -1, ax) if lib.name == "numpy" else g.movedim(-1, ax)


# ---------------------------------------------------------------------------- token statistics
def linear_token_stats(hidden, weight, targets, *, bias=None, axis=-1, temperature=1.0,
                       ignore_index=-100, chunk_rows=None, grad_logprob=None, grad_entropy=None,
                       backend="auto"):
    """See ``xent_fast.linear_token_stats``."""
    temp = _inputs.real_option(temperature, "temperature", 0.0, None, lo_open=True)
    _inputs.check_inverse(temp, "temperature", np.dtype(np.float32))
    lib = _lib(hidden, weight, bias)
    p = _Problem(lib, hidden, weight, targets, bias, axis, ignore_index)
    want_grad = grad_logprob is not None or grad_entropy is not None
    ups = []
    for name, g in (("grad_logprob", grad_logprob), ("grad_entropy", grad_entropy)):
        if g is not None and tuple(g.shape) != p.batch:
            raise ValueError(f"{name} must have the targets' shape {p.batch}; got "
                             f"{tuple(g.shape)}")
        ups.append(None if g is None else lib.compute(g).reshape(-1))
    logprob, entropy = lib.zeros((p.n,)), lib.zeros((p.n,))
    if want_grad:
        gh, gw, gb, tmp = p.grad_buffers()
    for s, e, hc, zc in p.chunks(chunk_rows):
        zc *= 1.0 / temp
        tc = p.t[s:e]
        kept = tc != p.ignore
        safe = lib.where(kept, tc, 0 * tc)
        rows = lib.rows_index(e - s)
        lse = lib.asarray(_api.logsumexp(zc, backend=backend))
        probs = lib.asarray(_api.softmax(zc, backend=backend))
        ent = lib.asarray(_api.entropy(probs, backend=backend))
        zero = 0 * lse
        logprob[s:e] = lib.where(kept, zc[rows, safe] - lse, zero)
        entropy[s:e] = lib.where(kept, ent, zero)
        if not want_grad:
            continue
        # d logprob_t / dy = onehot_t - p;  d entropy / dy_c = -p_c (y_c - sum p y), y = z / T
        a = zero if ups[0] is None else lib.where(kept, ups[0][s:e], zero)
        b = zero if ups[1] is None else lib.where(kept, ups[1][s:e], zero)
        mu = lse - ent
        centred = lib.where(probs > 0, zc - mu[:, None], 0 * zc)
        zc[...] = probs * -(a[:, None] + b[:, None] * centred)
        zc[rows, safe] += a
        zc *= 1.0 / temp
        p.backward_chunk(zc, hc, s, e, gh, gw, gb, tmp)
    shape = p.batch
    out = (logprob.reshape(shape), entropy.reshape(shape))
    if not want_grad:
        return out
    return out + p.grads(gh, gw, gb, hidden, weight, bias)


class _Problem:
    """A linear head's inputs checked and laid out as (N, H) rows, (V, H) weight."""

    def __init__(self, lib, hidden, weight, targets, bias, axis, ignore_index):
        self.lib = lib
        if lib.name == "numpy":
            for name, a in (("hidden", hidden), ("weight", weight), ("bias", bias)):
                if a is not None:
                    _inputs.float_policy(host(a).dtype, name)
        self.hshape = tuple(hidden.shape)
        self.ax = _inputs.class_axis(self.hshape, axis, "hidden")
        self.batch = _inputs.batch_shape(self.hshape, self.ax)
        h_dim = self.hshape[self.ax]
        if len(weight.shape) != 2 or tuple(weight.shape)[1] != h_dim:
            raise ValueError(f"weight must have shape (V, {h_dim}) (classes, hidden features), "
                             f"got {tuple(weight.shape)}")
        self.v = v = int(weight.shape[0])
        if bias is not None and tuple(bias.shape) != (v,):
            raise ValueError(f"bias must have shape ({v},) (one per class), got "
                             f"{tuple(bias.shape)}")
        if tuple(targets.shape) != self.batch:
            raise ValueError(f"targets must have hidden's shape without the feature axis, "
                             f"{self.batch}; got {tuple(targets.shape)}")
        self.ignore = _inputs.ignore_index_option(ignore_index)
        self.n = math.prod(self.batch)
        self.h_dim = h_dim
        self.h2 = lib.matrix(hidden, self.ax)
        self.w2 = lib.compute(weight)
        self.b2 = None if bias is None else lib.compute(bias)
        self.t, self.kept = _targets(lib, targets, v, self.ignore, self.batch)
        dt = str(lib.dtype)
        self.itemsize = 2 if dt.endswith("float16") else 8 if dt.endswith("float64") else 4

    def chunks(self, chunk_rows):
        """(start, end, hidden rows, their logits) chunk by chunk: one logits buffer,
        refilled by BLAS for each chunk."""
        lib = self.lib
        chunk = chunk_rows_for(self.n, self.v, self.itemsize, chunk_rows)
        z = lib.empty((chunk, self.v)) if self.n else None
        for s in range(0, self.n, chunk):
            e = min(s + chunk, self.n)
            hc, zc = self.h2[s:e], z[:e - s]
            lib.matmul(hc, self.w2.T, out=zc)
            if self.b2 is not None:
                zc += self.b2
            yield s, e, hc, zc

    def grad_buffers(self, weight_grad=True):
        """(grad hidden, grad weight, grad bias, scratch); no weight gradient (nor
        scratch) without ``weight_grad``."""
        lib = self.lib
        gb = None if self.b2 is None else lib.zeros((self.v,))
        if not weight_grad:
            return lib.empty((self.n, self.h_dim)), None, gb, None
        return (lib.empty((self.n, self.h_dim)), lib.zeros((self.v, self.h_dim)), gb,
                lib.tmp_for(self.v, self.h_dim))

    def backward_chunk(self, g, hc, s, e, gh, gw, gb, tmp):
        """A chunk's logit gradient ``g`` multiplied back into the three gradients."""
        lib = self.lib
        lib.matmul(g, self.w2, out=gh[s:e])
        if gw is not None:
            lib.add_matmul_t(gw, g, hc, tmp)
        if gb is not None:
            lib.add_rows_sum(gb, g)

    def grads(self, gh, gw, gb, hidden, weight, bias):
        lib = self.lib
        out = (lib.finish(_unmatrix(lib, gh, self.hshape, self.ax), hidden),
               None if gw is None else lib.finish(gw, weight))
        if bias is not None:
            out += (lib.finish(gb, bias),)
        return out
