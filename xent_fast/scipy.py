"""SciPy's conventions on xent_fast's kernels: drop-ins for ``scipy.special.logsumexp``,
``softmax``, ``log_softmax`` and ``scipy.stats.entropy``.

    from xent_fast.scipy import logsumexp, softmax, log_softmax, entropy

The functions of ``xent_fast`` itself reduce one axis, the last by default (one
distribution a row); these take SciPy's signatures and defaults instead: ``axis=None``
(every element one distribution) or a tuple of axes for the ``scipy.special``
functions, ``b`` weights (negative ones included) and ``return_sign`` for
``logsumexp``, and ``scipy.stats.entropy``'s ``axis=0`` and renormalisation.  The reduced
axes are moved last and merged into one, so the same row kernels run (serial or
threaded); weighted ``logsumexp`` (``b`` given) is computed in NumPy.  NumPy arrays in,
NumPy arrays out (as SciPy); ``backend`` as everywhere (``"cuda"`` copies to the device and
back).  SciPy itself is not needed.  Equal to SciPy 1.17 to 1e-12
relative on the tests' random and adversarial inputs (``log_softmax`` near 0, where
both round ``x - lse``, to 1e-14 absolute).

Where this differs from SciPy: a negative or NaN probability given to ``entropy`` is a
``ValueError`` naming its position (SciPy returns NaN or ``inf``); complex input is a
``TypeError`` except to ``logsumexp``, which computes complex rows in NumPy.
"""

import operator

import numpy as np

from . import _api, _inputs
from ._cpu.arrays import host

__all__ = ["logsumexp", "softmax", "log_softmax", "entropy"]


def _axes(axis, ndim):
    """The reduced axes, normalised and sorted (``None``: all of them)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if np.ndim(axis) == 0 else tuple(axis)
    out = []
    for ax in axes:
        a = operator.index(ax)
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(a, ndim)
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis!r}")
    return tuple(sorted(out))


def _rows(a, axes):
    """``a`` with ``axes`` moved last and merged: (the array, the kept shape)."""
    rest = [d for d in range(a.ndim) if d not in axes]
    moved = np.transpose(a, rest + list(axes)) if a.ndim else a.reshape(1)
    kept = tuple(a.shape[d] for d in rest)
    return moved.reshape(kept + (-1,)), kept


def _unrows(r, a_shape, axes, keepdims):
    """A per-row result back in shape: the kept axes, with 1s at ``axes`` if asked."""
    if not keepdims:
        return r
    shape = list(a_shape)
    for d in axes:
        shape[d] = 1
    return np.reshape(r, shape)


def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, backend="auto"):
    """``log(sum(b * exp(a)))`` over ``axis`` (default: all elements), as
    ``scipy.special.logsumexp``: ``b`` broadcasts against ``a``, elements with ``b = 0``
    do not count, a negative sum gives NaN (or, with ``return_sign``, its magnitude's log
    and sign -1); an empty or zero sum gives ``-inf`` (sign 0).  Without ``b`` the row
    kernel of :func:`xent_fast.logsumexp` computes it."""
    a = host(a)
    if b is not None:
        a, bb = np.broadcast_arrays(a, host(b))
    axes = _axes(axis, a.ndim)
    rows, kept = _rows(a, axes)
    empty = rows.shape[-1] == 0
    if rows.dtype.kind == "c" or (b is not None and bb.dtype.kind == "c"):
        out, sign = _complex(rows, None if b is None else _rows(bb, axes)[0], return_sign)
        out = _unrows(out, a.shape, axes, keepdims)
        if return_sign:
            return out[()], _unrows(sign, a.shape, axes, keepdims)[()]
        return out[()]
    if b is None:
        out = np.asarray(_api.logsumexp(rows, axis=-1, backend=backend))
        sign = np.where(np.isnan(out), np.nan, np.where(out == -np.inf, 0.0, 1.0))
        if empty:
            sign = np.full(out.shape, -1.0)  # as SciPy: the sign of an empty sum is -1
    else:
        out, sign = _weighted(rows, _rows(bb, axes)[0])
    out = _unrows(out, a.shape, axes, keepdims)
    sign = _unrows(sign.astype(out.dtype, copy=False), a.shape, axes, keepdims)
    if return_sign:
        return out[()], sign[()]
    return out[()] if empty else np.where(sign < 0, np.nan, out)[()]


def _weighted(rows, b):
    """(log |sum b e^a|, sign) per row, in float64 (float32 for float32 inputs)."""
    dt = np.result_type(rows.dtype, b.dtype, np.float32)
    if dt.kind != "f":
        raise TypeError(f"a and b must be real, got {rows.dtype} and {b.dtype}")
    a = rows.astype(dt, copy=False)
    b = b.astype(dt, copy=False)
    live = b != 0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        a_live = np.where(live, a, -np.inf)
        m = np.max(a_live, axis=-1, initial=-np.inf)
        top = live & (a_live == m[..., None])
        m_fin = np.where(np.isfinite(m), m, 0.0)
        s = np.sum(np.where(live, b * np.exp(a_live - m_fin[..., None]), 0.0), axis=-1)
        s_top = np.sum(np.where(top, b, 0.0), axis=-1)
        # +inf terms: their weights decide the sign (weights summing to 0: inf - inf)
        s = np.where(m == np.inf, np.where(s_top == 0, np.nan, s_top), s)
        out = np.where(np.isnan(m) | np.isnan(s), np.nan, m_fin + np.log(np.abs(s)))
        out = np.where(m == np.inf, np.where(np.isnan(s), np.nan, np.inf), out)
        out = np.where((m == -np.inf) & ~np.isnan(s), -np.inf, out)
        sign = np.where(np.isnan(out), np.nan, np.where(out == -np.inf, 0.0, np.sign(s)))
    return out.astype(dt, copy=False), sign


def _complex(rows, b, return_sign):
    """Complex rows (in NumPy): ``log(sum(b e^a))`` with the principal logarithm, shifted
    by the largest real part; with ``return_sign`` (log of the modulus, unit phase), as
    SciPy's.  Elements whose ``b`` is 0 do not count."""
    dt = np.result_type(rows.dtype, np.complex64 if b is None else b.dtype, np.complex64)
    a = rows.astype(dt, copy=False)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if b is not None:
            b = b.astype(dt, copy=False)
            a = np.where(b == 0, -np.inf, a)
        re = a.real
        m = np.max(re, axis=-1, initial=-np.inf)
        m_fin = np.where(np.isfinite(m), m, 0.0).astype(re.dtype)
        e = np.exp(a - m_fin[..., None])
        s = np.sum(e if b is None else b * e, axis=-1)
        if return_sign:
            mag = np.abs(s)
            out = np.log(mag) + m_fin
            sign = np.where(mag == 0, s, s / mag) if a.shape[-1] else np.full(s.shape, -1 + 0j)
            return out.astype(re.dtype, copy=False), sign.astype(dt, copy=False)
        out = np.log(s) + m_fin
    return out.astype(dt, copy=False), None


def _dist(fn, x, axis, backend):
    x = host(x)
    axes = _axes(axis, x.ndim)
    rows = _rows(x, axes)[0] if x.ndim else x.reshape(1, 1)
    res = np.asarray(fn(rows, axis=-1, backend=backend))
    rest = [d for d in range(x.ndim) if d not in axes]
    moved_shape = tuple(x.shape[d] for d in rest) + tuple(x.shape[d] for d in axes)
    back = np.argsort(rest + list(axes))
    return np.transpose(res.reshape(moved_shape), back) if x.ndim else res.reshape(())


def softmax(x, axis=None, *, backend="auto"):
    """``exp(x - logsumexp(x, axis, keepdims=True))`` as ``scipy.special.softmax``
    (default: all elements one distribution; a tuple of axes allowed)."""
    return _dist(_api.softmax, x, axis, backend)


def log_softmax(x, axis=None, *, backend="auto"):
    """``x - logsumexp(x, axis, keepdims=True)`` as ``scipy.special.log_softmax``."""
    return _dist(_api.log_softmax, x, axis, backend)


def entropy(pk, qk=None, base=None, axis=0, *, keepdims=False, backend="auto"):
    """``scipy.stats.entropy``: ``pk`` (and ``qk``) renormalised to sum to 1 along
    ``axis`` (default 0; ``None``: all elements, one distribution), then
    ``-sum(pk log pk)``, or with ``qk`` the KL divergence ``sum(pk log(pk / qk))``;
    ``base`` the logarithm's base (default e).  A distribution that cannot be
    renormalised (all zeros, or an infinite entry) gives NaN, as in SciPy."""
    p = _probabilities(pk, "pk")
    q = None if qk is None else _probabilities(qk, "qk")
    if q is not None:
        p, q = np.broadcast_arrays(p, q)
    if p.ndim == 0:  # one number: a distribution of one element, as SciPy takes it
        p = p.reshape(1)
        q = None if q is None else q.reshape(1)
    shape = p.shape
    if axis is None:
        p = p.reshape(-1)
        q = None if q is None else q.reshape(-1)
        ax = 0
    else:
        ax = operator.index(axis) % p.ndim
    p, undefined = _renormalised(p, ax)
    if q is not None:
        q, q_undefined = _renormalised(q, ax)
        undefined = undefined | q_undefined
    res = np.asarray(_api.entropy(p, axis=ax, base=base, backend=backend) if q is None
                     else _api.kl_divergence(p, q, axis=ax, base=base, backend=backend))
    undefined = np.squeeze(undefined, axis=ax) if undefined.ndim else undefined
    if undefined.any():
        res = np.where(undefined, np.nan, res).astype(res.dtype, copy=False)
    if keepdims:
        res = np.ones((1,) * len(shape), res.dtype) * res if axis is None \
            else np.expand_dims(res, ax)
    return res[()]


def _probabilities(a, name):
    """A ``scipy.stats.entropy`` input as floats (integers as float64), checked as given:
    a negative or NaN entry is a ``ValueError`` naming it (SciPy returns NaN or -inf)."""
    a = host(a, name)
    a = a.astype(np.result_type(a.dtype, np.float64 if a.dtype.kind in "biu" else a.dtype))
    if a.dtype.kind == "c":
        raise TypeError(f"{name} must be real, got complex dtype {a.dtype}")
    bad = ~(a >= 0)
    if bad.any():
        pos = np.unravel_index(int(np.argmax(bad)), a.shape)
        raise _inputs.not_probability(name, tuple(int(i) for i in pos), a[pos])
    return a


def _renormalised(a, ax):
    """``a`` divided by its sums along ``ax``; where a sum is 0 or infinite the
    distribution is undefined: (zeros there, the mask of those sums)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = np.sum(a, axis=ax, keepdims=True)
        # (an empty axis sums to 0 and is no distribution: its entropy is 0, as SciPy's)
        undefined = ~(np.isfinite(s) & (s > 0)) & (a.shape[ax] > 0)
        a = a / s
    if undefined.any():
        a = np.where(undefined, 0, a).astype(a.dtype, copy=False)
    return a, undefined
