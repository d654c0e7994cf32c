"""xent_fast on Dask arrays: the losses and ``evaluate``, lazily, on any scheduler.

Every function here builds a Dask graph and computes nothing: losses return Dask
arrays (0-d for ``"sum"``/``"mean"``), :func:`evaluate` a ``dask.delayed`` object
whose ``.compute()`` is an :class:`xent_fast.EvalResult`.  They run on the threaded
scheduler or on a ``distributed`` cluster alike (the workers need xent_fast installed).

Arrays may be chunked along the rows and along the class axis.  Each block is handed
to the compiled kernels; a row split over several class chunks is put back together
exactly, from per-chunk partial states merged by the log-sum-exp rule (maximum, sum of
exponentials rescaled to the common maximum, and the sums that ride on them), in a
tree reduction, so a vocabulary can be spread over workers.  Chunking changes results
only by the rounding of the merges.

``backend`` applies inside each block and defaults to ``"cpu"`` (serial): Dask already
runs blocks in parallel, and threads inside threads would oversubscribe the cores.

Needs ``dask[array]`` (``pip install "xent_fast[dask]"``).
"""

import math
import operator

import dask
import dask.array as da
import numpy as np
from numpy.lib.array_utils import normalize_axis_index

from . import _inputs
from ._api import (binary_cross_entropy_with_logits as _bce_logits, logsumexp as _logsumexp,
                   softmax_cross_entropy as _softmax_ce, softmax_kl_divergence as _softmax_kl)
from ._cpu.arrays import HostFloat
from ._evaluate import (NAN_RANK, NFIELDS, EvalState, check_backend, check_bins,
                        check_targets, check_topk, merge_class_stats, merge_states,
                        row_stats, rows_from_stats, ROW_METRICS)

__all__ = ["binary_cross_entropy_with_logits", "evaluate", "evaluate_rows", "logsumexp",
           "softmax_cross_entropy", "softmax_kl_divergence"]

_LETTERS = "abcdefghijklmnopqrstuvwxy"  # "z" is the field axis of partial states
_SPLIT_EVERY = 8


def _out_dtype(dtype):
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def _class_last(logits, axis, name="logits"):
    x = da.asarray(logits)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis)")
    ax = normalize_axis_index(operator.index(axis), x.ndim, msg_prefix="axis")
    if ax != x.ndim - 1:
        x = da.moveaxis(x, ax, -1)
    return x, ax


def _aligned(arr, chunks, shape, name, what):
    a = da.asarray(arr)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have {what} {tuple(shape)}; got {tuple(a.shape)}")
    return a.rechunk(chunks) if a.chunks != tuple(chunks) else a


def _starts(x, i):
    """A Dask array along axis ``i`` chunked like ``x`` whose blocks start with their
    offset in the whole array (how a block learns where it lies)."""
    return da.arange(x.shape[i], chunks=(x.chunks[i],), dtype=np.int64)


def _first(o):
    return int(o[0]) if o.shape[0] else 0


def _safe_div(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.float64(a) / np.float64(b))


def _reduce_rows(rows, den, reduction, out_dtype):
    """Reduce float64 per-row losses (ignored rows 0) lazily."""
    if reduction == "none":
        return rows.astype(out_dtype)
    total = rows.sum(dtype=np.float64)
    if reduction == "sum":
        return total.astype(out_dtype)
    return da.map_blocks(_safe_div, total, den, dtype=np.float64).astype(out_dtype)


# ---------------------------------------------------------------------------- partial states
def _stats_block(xb, tb, *offs, c, ignore, k, whole, backend):
    f = HostFloat(xb, "logits")
    rows = np.ascontiguousarray(f.arr.reshape(-1, xb.shape[-1]))
    origin = tuple(_first(o) for o in offs[:-1])
    tf = check_targets(tb, tb.shape, c, ignore, origin)
    st, top = row_stats(rows, f.hk, tf, _first(offs[-1]), whole, k, backend)
    out = np.concatenate([st, top], axis=1) if k else st
    return out.reshape(xb.shape[:-1] + (1, out.shape[1]))


def _merge_block(p, axis, keepdims, k):
    ax = axis[0] if isinstance(axis, tuple) else axis
    st, top = merge_class_stats(p[..., :NFIELDS], p[..., NFIELDS:], k)
    out = np.concatenate([st, top], axis=-1) if k else st
    return np.expand_dims(out, ax) if keepdims else out


def _identity(p, axis, keepdims):
    return p if keepdims else np.squeeze(p, axis)


def _row_stats(x, t, ignore, k, backend):
    """Per-row statistics (batch + (6 [+ k],)) of class-last ``x``; ``k`` > 0 only when
    the class axis is split (the rank then saturates at ``k``)."""
    nd = x.ndim
    idx = _LETTERS[:nd]
    split = len(x.chunks[-1]) > 1
    k = k if split else 0
    nf = NFIELDS + k
    args = [x, idx, t, idx[:-1]]
    for i in range(nd):
        args += [_starts(x, i), idx[i]]
    part = da.blockwise(_stats_block, idx + "z", *args, new_axes={"z": nf},
                        adjust_chunks={idx[-1]: 1}, dtype=np.float64,
                        meta=np.empty((0,) * (nd + 1), np.float64), c=x.shape[-1],
                        ignore=ignore, k=k, whole=not split, backend=backend)
    if not split:
        return part[..., 0, :], 0
    merged = da.reduction(part, chunk=_identity,
                          combine=lambda p, axis, keepdims: _merge_block(p, axis, keepdims, k),
                          aggregate=lambda p, axis, keepdims: _merge_block(p, axis, keepdims,
                                                                           k),
                          axis=nd - 1, keepdims=False, dtype=np.float64,
                          split_every=_SPLIT_EVERY, concatenate=True,
                          meta=np.empty((0,) * nd, np.float64))
    return merged, k


def _prepare(logits, targets, axis, ignore_index, backend):
    check_backend(backend)
    x, ax = _class_last(logits, axis)
    if x.dtype.kind == "c":
        raise TypeError(f"logits must be real, got complex dtype {x.dtype}")
    t = da.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got dtype {t.dtype}")
    t = _aligned(t, x.chunks[:-1], x.shape[:-1], "targets",
                 "the logits' shape without the class axis")
    return x, t, operator.index(ignore_index)


# ---------------------------------------------------------------------------- evaluate
def _rows_block(s, tb, ignore, k):
    n = tb.size
    sf = s.reshape(n, s.shape[-1])
    r = rows_from_stats(sf[:, :NFIELDS], tb.reshape(-1).astype(np.int64), ignore,
                        sf[:, NFIELDS:] if k else None)
    cols = [np.asarray(r[m], np.float64) for m in ROW_METRICS]
    # NAN_RANK (int64 max) does not survive the float64 table: NaN there, see _rank_col
    cols[ROW_METRICS.index("rank")][r["rank"] == NAN_RANK] = np.nan
    out = np.stack(cols, axis=-1)
    return out.reshape(tb.shape + (len(ROW_METRICS),))


def _rank_col(a):
    out = np.full(a.shape, NAN_RANK, np.int64)
    ok = ~np.isnan(a)
    out[ok] = a[ok].astype(np.int64)
    return out


def _state_block(s, tb, ignore, topk, n_bins, k):
    n = tb.size
    sf = s.reshape(n, s.shape[-1])
    r = rows_from_stats(sf[:, :NFIELDS], tb.reshape(-1).astype(np.int64), ignore,
                        sf[:, NFIELDS:] if k else None)
    return EvalState(topk, n_bins).add_rows(r)


def _block_states(logits, targets, axis, ignore_index, topk, n_bins, backend):
    """One delayed :class:`EvalState` per row block, and each block's row count."""
    topk = check_topk(topk)
    n_bins = check_bins(n_bins)
    x, t, ignore = _prepare(logits, targets, axis, ignore_index, backend)
    s, k = _row_stats(x, t, ignore, max(topk), backend)
    sd = s.to_delayed().reshape(-1)  # the field axis is one chunk
    td = t.to_delayed().reshape(-1)
    counts = [math.prod(t.chunks[d][i] for d, i in enumerate(ix))
              for ix in np.ndindex(*t.numblocks)]
    fn = dask.delayed(_state_block, pure=True)
    return [fn(a, b, ignore, topk, n_bins, k) for a, b in zip(sd, td)], counts, topk, n_bins


def evaluate(logits, targets, *, axis=-1, ignore_index=-100, topk=(1, 5), n_bins=15,
             backend="cpu"):
    """:func:`xent_fast.evaluate` on Dask arrays: a ``dask.delayed`` that computes to an
    :class:`xent_fast.EvalResult` (without per-row arrays; see :func:`evaluate_rows`).

    ``logits`` may be chunked along any axis, the class axis included; ``targets``
    (class indices, the logits' shape without the class axis; a NumPy array is fine)
    are rechunked to match.  Row blocks give mergeable states that are tree-reduced.
    An out-of-range target raises ``IndexError`` (with its position in the whole
    array) when the graph is computed.  With the class axis split, top-k accuracy
    comes from each slice's ``max(topk)`` largest logits, which decide every rank below
    ``max(topk)`` exactly.  A NaN in any chunk of a row makes the row NaN, as in
    :func:`xent_fast.evaluate` (NaN means, a miss in the accuracy).

    Examples
    --------
    >>> import dask.array as da, numpy as np, xent_fast.dask as xfd
    >>> x = da.from_array(np.log([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]), chunks=(1, 2))
    >>> round(xfd.evaluate(x, np.array([0, 2])).compute().cross_entropy, 4)
    0.7803
    """
    parts, _, topk, n_bins = _block_states(logits, targets, axis, ignore_index, topk,
                                           n_bins, backend)
    if not parts:
        parts = [dask.delayed(EvalState)(topk, n_bins)]
    merge = dask.delayed(merge_states, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i:i + _SPLIT_EVERY]) if len(parts[i:i + _SPLIT_EVERY]) > 1
                 else parts[i] for i in range(0, len(parts), _SPLIT_EVERY)]
    return dask.delayed(EvalState.result, pure=True)(parts[0])


def evaluate_rows(logits, targets, *, axis=-1, ignore_index=-100, topk=(1, 5),
                  backend="cpu"):
    """The per-row metrics of :func:`xent_fast.evaluate` as a dict of lazy Dask arrays
    (batch shape, chunked like the rows): ``loss``, ``target_prob``, ``entropy``,
    ``confidence`` (float64), ``prediction``, ``rank`` (int64) and ``ignored`` (bool).
    With the class axis split over chunks ``rank`` saturates at ``max(topk)``.  Rows with
    a NaN logit: NaN metrics, ``prediction`` -1 and ``rank`` ``np.iinfo(np.int64).max``."""
    topk = check_topk(topk)
    x, t, ignore = _prepare(logits, targets, axis, ignore_index, backend)
    s, k = _row_stats(x, t, ignore, max(topk), backend)
    nd = t.ndim
    idx = _LETTERS[:nd]
    table = da.blockwise(_rows_block, idx + "z", s, idx + "z", t, idx,
                         adjust_chunks={"z": len(ROW_METRICS)}, dtype=np.float64,
                         meta=np.empty((0,) * (nd + 1), np.float64), ignore=ignore, k=k)
    kinds = {"prediction": np.int64, "ignored": bool}
    return {m: (table[..., i].map_blocks(_rank_col, dtype=np.int64) if m == "rank"
                else table[..., i].astype(kinds.get(m, np.float64)))
            for i, m in enumerate(ROW_METRICS)}


# ---------------------------------------------------------------------------- losses
def _lse_merge(p, axis, keepdims):
    with np.errstate(all="ignore"):
        m = np.max(p, axis=axis, keepdims=True)
        fin = np.isfinite(m)
        safe = np.where(fin, m, 0.0)
        out = safe + np.log(np.sum(np.exp(p - safe), axis=axis, keepdims=True))
        out = np.where(fin, out, m)  # all -inf: -inf; +inf: +inf; NaN: NaN
    return out if keepdims else np.squeeze(out, axis)


def _lse_chunk(xb, axis, keepdims, backend):
    ax = axis[0] if isinstance(axis, tuple) else axis
    out = np.asarray(_logsumexp(xb, axis=ax, keepdims=True, backend=backend),
                     np.float64)
    return out if keepdims else np.squeeze(out, ax)


def logsumexp(x, axis=-1, keepdims=False, *, backend="cpu"):
    """:func:`xent_fast.logsumexp` of a Dask array: per-chunk log-sum-exps merged by
    the log-sum-exp rule along a split class axis.  Returns a lazy Dask array."""
    check_backend(backend)
    a = da.asarray(x)
    if a.dtype.kind == "c":
        raise TypeError(f"x must be real, got complex dtype {a.dtype}")
    ax = normalize_axis_index(operator.index(axis), a.ndim, msg_prefix="axis")
    out = da.reduction(a, chunk=lambda b, axis, keepdims: _lse_chunk(b, axis, keepdims,
                                                                     backend),
                       combine=_lse_merge, aggregate=_lse_merge, axis=ax, keepdims=keepdims,
                       dtype=np.float64, split_every=_SPLIT_EVERY, concatenate=True,
                       meta=np.empty((0,) * (a.ndim - (0 if keepdims else 1)), np.float64))
    return out.astype(_out_dtype(a.dtype) if a.dtype.kind == "f" else np.float64)


def _ce_whole_block(xb, tb, weight, backend, kw):
    """Per-row losses (ignored rows 0) of one block whose rows are complete."""
    return np.asarray(_softmax_ce(xb, tb, reduction="none", weight=weight,
                                                 backend=backend, **kw), np.float64)


def _ce_den_block(tb, c, ignore, weight):
    t = np.asarray(tb)
    if t.dtype.kind not in "iu":  # probability targets: every row counts once
        return np.ones(t.shape[:-1], np.float64)
    kept = t != ignore
    if weight is None:
        return kept.astype(np.float64)
    w = np.asarray(weight, np.float64)
    return np.where(kept, w[np.clip(t, 0, c - 1)], 0.0)


def _ce_z_block(xb, tb, ignore, z_loss, softcap, backend):
    """z_loss * lse^2 of the kept rows of one block whose rows are complete."""
    x = np.asarray(xb)
    if softcap is not None:
        x = softcap * np.tanh(HostFloat(x, "logits").source.astype(np.float64) / softcap)
    with np.errstate(all="ignore"):
        lse = np.asarray(_logsumexp(x, backend=backend), np.float64)
        return np.where(np.asarray(tb) != ignore, z_loss * lse * lse, 0.0)


def _ce_split_block(s, tb, ignore, weight, z_loss, c, z_only=False):
    tf = tb.reshape(-1).astype(np.int64)
    sf = s.reshape(tf.size, s.shape[-1])
    r = rows_from_stats(sf[:, :NFIELDS], tf, ignore)
    loss = np.zeros(tf.size) if z_only else r["loss"]
    if weight is not None:
        loss = loss * np.asarray(weight, np.float64)[np.clip(tf, 0, c - 1)]
    if z_loss:
        with np.errstate(all="ignore"):
            m = sf[:, 0]
            lse = np.where(np.isfinite(m), m + np.log(sf[:, 1]), m)
            loss = loss + z_loss * lse * lse
    loss = np.where(r["ignored"], 0.0, loss)
    return loss.reshape(tb.shape)


def softmax_cross_entropy(logits, targets, *, axis=-1, weight=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                          backend="cpu"):
    """:func:`xent_fast.softmax_cross_entropy` (forward) on Dask arrays, lazily.

    Rows may be chunked freely.  With the class axis in one chunk every option works
    block by block; with it split over chunks, integer targets with ``weight``,
    ``ignore_index`` and ``z_loss`` are supported (the row's log-sum-exp and target
    logit are merged across chunks), while ``label_smoothing``, ``softcap`` and
    probability targets raise ``NotImplementedError`` (rechunk the class axis to one
    chunk for them).  Returns a Dask array: per row for ``"none"``, 0-d otherwise.
    """
    _inputs.reduction(reduction)
    check_backend(backend)
    x, ax = _class_last(logits, axis)
    c = x.shape[-1]
    out_dtype = _out_dtype(x.dtype) if x.dtype.kind == "f" else np.dtype(np.float64)
    if weight is not None:
        weight = np.asarray(weight)
        if weight.shape != (c,):
            raise ValueError(f"weight must have shape ({c},) (one weight per class), "
                             f"got {weight.shape}")
    ignore = _inputs.ignore_index_option(ignore_index)
    t = da.asarray(targets)
    nd = x.ndim
    idx = _LETTERS[:nd]
    if t.dtype.kind in "iu":
        t = _aligned(t, x.chunks[:-1], x.shape[:-1], "integer targets",
                     "the logits' shape without the class axis")
        tidx = idx[:-1]
    elif t.dtype.kind == "f":
        if len(x.chunks[-1]) > 1:
            raise NotImplementedError("probability targets need the class axis in one "
                                      "chunk: rechunk it ({axis: -1})")
        t = _aligned(da.moveaxis(t, ax, -1) if ax != t.ndim - 1 else t, x.chunks, x.shape,
                     "probability targets", "the logits' shape")
        tidx = idx
    else:
        raise TypeError(f"targets must be integer class indices or float probabilities, "
                        f"got dtype {t.dtype}")
    # The z-loss is not class-weighted: under "mean" with weights its rows are summed
    # apart and divided by the number of kept rows, not by the summed weight.
    z_apart = (reduction == "mean" and bool(z_loss) and weight is not None
               and t.dtype.kind in "iu")
    zrows = None
    meta = np.empty((0,) * (nd - 1), np.float64)
    if len(x.chunks[-1]) == 1:
        kw = dict(ignore_index=ignore, label_smoothing=label_smoothing,
                  z_loss=0.0 if z_apart else z_loss, softcap=softcap)
        rows = da.blockwise(_ce_whole_block, idx[:-1], x, idx, t, tidx, dtype=np.float64,
                            concatenate=True, meta=meta, weight=weight, backend=backend,
                            kw=kw)
        if z_apart:
            zrows = da.blockwise(_ce_z_block, idx[:-1], x, idx, t, tidx, dtype=np.float64,
                                 concatenate=True, meta=meta, ignore=ignore,
                                 z_loss=float(z_loss), softcap=softcap, backend=backend)
    else:
        if label_smoothing or softcap is not None:
            raise NotImplementedError("label_smoothing and softcap need the class axis in "
                                      "one chunk: rechunk it ({axis: -1})")
        s, _ = _row_stats(x, t, ignore, 0, backend)
        rows = da.blockwise(_ce_split_block, idx[:-1], s, idx[:-1] + "z", t, idx[:-1],
                            dtype=np.float64, concatenate=True, meta=meta, ignore=ignore,
                            weight=weight, z_loss=0.0 if z_apart else float(z_loss), c=c)
        if z_apart:
            zrows = da.blockwise(_ce_split_block, idx[:-1], s, idx[:-1] + "z", t, idx[:-1],
                                 dtype=np.float64, concatenate=True, meta=meta,
                                 ignore=ignore, weight=None, z_loss=float(z_loss), c=c,
                                 z_only=True)
    if zrows is not None:
        kept = da.map_blocks(_ce_den_block, t, dtype=np.float64, c=c, ignore=ignore,
                             weight=None).sum()
        den = da.map_blocks(_ce_den_block, t, dtype=np.float64, c=c, ignore=ignore,
                            weight=weight).sum()
        return (_reduce_rows(rows, den, "mean", np.dtype(np.float64))
                + _reduce_rows(zrows, kept, "mean", np.dtype(np.float64))).astype(out_dtype)
    if reduction == "mean":
        if t.dtype.kind in "iu":
            den = da.map_blocks(_ce_den_block, t, dtype=np.float64, c=c, ignore=ignore,
                                weight=weight).sum()
        else:
            den = math.prod(x.shape[:-1])
    else:
        den = None
    return _reduce_rows(rows, den, reduction, out_dtype)


def _kl_part(xb, tb, inv_t):
    """Per-row partial state of KL over one class slice, float64:
    (max s, sum e^(s-max), max u, sum e^(u-max), sum e^(u-max) (u - s))."""
    s = np.asarray(xb, np.float64) * inv_t
    u = np.asarray(tb, np.float64) * inv_t
    with np.errstate(all="ignore"):
        ms = np.max(s, axis=-1, keepdims=True) if s.shape[-1] else \
            np.full(s.shape[:-1] + (1,), -np.inf)
        mu = np.max(u, axis=-1, keepdims=True) if u.shape[-1] else \
            np.full(u.shape[:-1] + (1,), -np.inf)
        es = np.exp(s - np.where(np.isfinite(ms), ms, 0.0))
        eu = np.exp(u - np.where(np.isfinite(mu), mu, 0.0))
        du = np.sum(np.where(eu == 0, 0.0, eu * (u - s)), axis=-1)
        out = np.stack([ms[..., 0], np.sum(es, axis=-1), mu[..., 0], np.sum(eu, axis=-1),
                        du], axis=-1)
    return out[..., None, :]


def _kl_merge(p, axis, keepdims):
    ax = axis[0] if isinstance(axis, tuple) else axis
    ms, ss, mu, su, du = (p[..., i] for i in range(5))
    with np.errstate(all="ignore"):
        def rescale(m):
            big = np.max(m, axis=-1, keepdims=True)
            fin = np.isfinite(big)
            return np.where(fin & (m != -np.inf), np.exp(m - np.where(fin, big, 0.0)), 0.0), \
                big[..., 0]
        rs, bs = rescale(ms)
        ru, bu = rescale(mu)
        out = np.stack([bs, np.sum(rs * ss, -1), bu, np.sum(ru * su, -1),
                        np.sum(np.where(ru == 0, 0.0, ru * du), -1)], axis=-1)
    return np.expand_dims(out, ax) if keepdims else out


def _kl_finish(p):
    ms, ss, mu, su, du = (p[..., i] for i in range(5))
    with np.errstate(all="ignore"):
        return du / su + (ms - mu) + (np.log(ss) - np.log(su))


def _kl_whole_block(xb, tb, temperature, backend):
    return np.asarray(_softmax_kl(xb, tb, temperature=temperature,
                                                 reduction="none", backend=backend),
                      np.float64)


def softmax_kl_divergence(logits, target_logits, *, axis=-1, temperature=1.0,
                          reduction="batchmean", backend="cpu"):
    """:func:`xent_fast.softmax_kl_divergence` (forward) on Dask arrays, lazily.

    With the class axis split over chunks each slice keeps (max, sum of exps) of both
    scaled logit rows and ``sum exp(u - max_u) (u - s)``; the slices merge by the
    log-sum-exp rule in float64.  No ``T**2`` factor.  Returns a Dask array.
    """
    _inputs.reduction(reduction, ("none", "sum", "mean", "batchmean"))
    check_backend(backend)
    temp = _inputs.real_option(temperature, "temperature", 0.0, None, lo_open=True)
    x, ax = _class_last(logits, axis)
    t, _ = _class_last(target_logits, axis, "target_logits")
    if t.shape != x.shape:
        raise ValueError(f"target_logits must have the logits' shape "
                         f"{tuple(da.moveaxis(x, -1, ax).shape)}; got "
                         f"{tuple(da.moveaxis(t, -1, ax).shape)}")
    t = t.rechunk(x.chunks)
    nd = x.ndim
    idx = _LETTERS[:nd]
    c = x.shape[-1]
    out_dtype = _out_dtype(x.dtype) if x.dtype.kind == "f" else np.dtype(np.float64)
    if len(x.chunks[-1]) == 1:
        rows = da.blockwise(_kl_whole_block, idx[:-1], x, idx, t, idx, dtype=np.float64,
                            concatenate=True, meta=np.empty((0,) * (nd - 1), np.float64),
                            temperature=temp, backend=backend)
    else:
        part = da.blockwise(_kl_part, idx + "z", x, idx, t, idx, new_axes={"z": 5},
                            adjust_chunks={idx[-1]: 1}, dtype=np.float64,
                            meta=np.empty((0,) * (nd + 1), np.float64), inv_t=1.0 / temp)
        merged = da.reduction(part, chunk=_identity, combine=_kl_merge, aggregate=_kl_merge,
                              axis=nd - 1, keepdims=False, dtype=np.float64,
                              split_every=_SPLIT_EVERY, concatenate=True,
                              meta=np.empty((0,) * nd, np.float64))
        rows = merged.map_blocks(_kl_finish, drop_axis=nd - 1, dtype=np.float64)
    n = math.prod(x.shape[:-1])
    if reduction == "batchmean":
        return _reduce_rows(rows, n, "mean", out_dtype)
    if reduction == "mean":
        return _reduce_rows(rows, n * c, "mean", out_dtype)
    return _reduce_rows(rows, None, reduction, out_dtype)


def _bce_block(xb, yb, *rest, has_w, has_pw, backend):
    rest = list(rest)
    w = rest.pop(0) if has_w else None
    pw = rest.pop(0) if has_pw else None
    return np.asarray(_bce_logits(
        xb, yb, weight=w, pos_weight=pw, reduction="none", backend=backend))


def binary_cross_entropy_with_logits(logits, targets, *, weight=None, pos_weight=None,
                                     reduction="mean", backend="cpu"):
    """:func:`xent_fast.binary_cross_entropy_with_logits` (forward) on Dask arrays,
    elementwise block by block (``weight`` and ``pos_weight`` broadcast as in PyTorch).
    Returns a Dask array: elementwise for ``"none"``, 0-d otherwise."""
    _inputs.reduction(reduction)
    check_backend(backend)
    x = da.asarray(logits)
    y = _aligned(targets, x.chunks, x.shape, "targets", "the logits' shape")
    out_dtype = _out_dtype(x.dtype) if x.dtype.kind == "f" else np.dtype(np.float64)
    args = [x, y]
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None:
            wa = da.asarray(w)
            try:
                wa = da.broadcast_to(wa, x.shape)
            except ValueError:
                raise ValueError(f"{name} of shape {wa.shape} does not broadcast to the "
                                 f"input shape {x.shape}") from None
            args.append(wa.rechunk(x.chunks))
    el = da.map_blocks(_bce_block, *args, dtype=out_dtype, has_w=weight is not None,
                       has_pw=pos_weight is not None, backend=backend)
    if reduction == "none":
        return el
    total = el.sum(dtype=np.float64)
    if reduction == "sum":
        return total.astype(out_dtype)
    return da.map_blocks(_safe_div, total, x.size, dtype=np.float64).astype(out_dtype)


# ---------------------------------------------------------------------------- files on a cluster
def _file_arrays(logits_path, targets_path, axis, chunk_rows):
    """Dask arrays over stored logits and targets, chunked by row slabs (class axis
    whole), read on the workers (sources pickle as their paths)."""
    from dask.base import tokenize

    from . import _stream

    lsrc = _stream.open_source(logits_path, "logits")
    tsrc = _stream.open_source(targets_path, "targets")
    _stream.check_logits_dtype(lsrc)
    _stream.check_targets_dtype(tsrc)
    ax, ca, length, slabs = _stream.plan(lsrc, tsrc, axis, chunk_rows)
    sizes = tuple(hi - lo for lo, hi in slabs)
    lchunks = tuple((sizes if (ca is not None and i == ca) else (n,))
                    for i, n in enumerate(lsrc.shape))
    tchunks = tuple((sizes if i == 0 else (n,)) for i, n in enumerate(tsrc.shape))

    def stamp(src):
        p = getattr(src, "path", "")
        try:
            import os

            st = os.stat(p)
            return (p, st.st_size, st.st_mtime_ns)
        except OSError:
            return (p,)

    x = da.from_array(lsrc, chunks=lchunks, lock=False, asarray=True,
                      name="xent-logits-" + tokenize(stamp(lsrc), lsrc.shape, str(lsrc.dtype)),
                      meta=np.empty((0,) * lsrc.ndim, lsrc.dtype))
    t = da.from_array(tsrc, chunks=tchunks, lock=False, asarray=True,
                      name="xent-targets-" + tokenize(stamp(tsrc), tsrc.shape,
                                                      str(tsrc.dtype)),
                      meta=np.empty((0,) * tsrc.ndim, tsrc.dtype))
    return x, t, ax


def _evaluate_files_on_cluster(logits_path, targets_path, address, *, axis=-1,
                               ignore_index=-100, topk=(1, 5), n_bins=15, chunk_rows=None,
                               progress=None):
    """``xent-fast eval --scheduler``: the row blocks' states computed on a
    ``distributed`` cluster, merged here as they arrive (which drives the progress
    bar)."""
    from distributed import Client, as_completed

    x, t, ax = _file_arrays(logits_path, targets_path, axis, chunk_rows)
    parts, counts, topk, n_bins = _block_states(x, t, ax, ignore_index, topk, n_bins, "cpu")
    total = sum(counts)
    state = EvalState(topk, n_bins)
    with Client(address, set_as_default=False) as client:
        futures = client.compute(parts)
        rows_of = {f.key: n for f, n in zip(futures, counts)}
        done = 0
        for fut in as_completed(futures, loop=client.loop):
            state = state.merge(fut.result())
            done += rows_of[fut.key]
            if progress is not None:
                progress(done, total)
    if progress is not None and total == 0:
        progress(0, 0)
    return state.result()
