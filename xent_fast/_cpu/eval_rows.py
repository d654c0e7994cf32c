"""Row kernels for one-pass evaluation: the mergeable statistics of one row of logits.

For a row ``x`` (or a contiguous slice of the class axis starting at class ``lo``) and
a target class ``t`` one read of the row gives

    m   = max x                          s  = sum exp(x - m)
    d   = sum exp(x - m) (x - m)         xt = x[t]  (0 when t is outside the slice)
    gt  = #{c : x_c > xt}                am = first index of the max (global)

from which every per-row metric follows (see ``_evaluate``): the loss is
``log s - (xt - m)``, the confidence ``1/s`` and the predictive entropy ``log s - d/s``.
Two slices of one row merge exactly: with ``M = max(m1, m2)`` and ``r_i = exp(m_i - M)``,
``s = r1 s1 + r2 s2`` and ``d = sum r_i (d_i + (m_i - M) s_i)``.  ``gt`` needs the
target logit before the row is read, so a slice that may not hold the target instead
keeps its ``K`` largest values (``row_topk``), which decide every rank below ``K``.

``exp(x - m) (x - m)`` is taken as 0 where the exp is 0, so ``-inf`` logits (masked
classes) add exactly nothing, never ``0 * -inf = NaN``.

A row (or slice) holding a NaN gets ``m = s = d = xt = NaN`` and ``am = -1``: the row's
every metric is NaN (see ``rows_from_stats``), and NaN survives ``merge_class_stats``.
"""

import math

import numpy as np
from numba import njit

from .jit import INLINE, JIT
from .mathfns import cast_like, fexp, imin
from .reduce import MAX_CHUNK, seg_max

# Field order of a row's statistics (the driver writes them into a float64 row).
M, S, D, XT, GT, AM = range(6)
NFIELDS = 6

_TOPK_BLOCK = 64


@njit(**INLINE)
def _seg_stats(seg, m, xt, count):
    """(sum e, sum e (x - m), #{x > xt}) with e = exp(x - m), in the row's precision."""
    zero = m - m
    s = zero
    d = zero
    g = 0
    if count:
        for j in range(seg.shape[0]):
            u = seg[j] - m
            e = fexp(u)
            s += e
            d += e * u if e != zero else zero
            g += 1 if seg[j] > xt else 0
    else:
        for j in range(seg.shape[0]):
            u = seg[j] - m
            e = fexp(u)
            s += e
            d += e * u if e != zero else zero
    return s, d, g


@njit(**INLINE)
def _seg_count_greater(seg, xt):
    g = 0
    for j in range(seg.shape[0]):
        g += 1 if seg[j] > xt else 0
    return g


@njit(**INLINE)
def _seg_has_nan(seg):
    for j in range(seg.shape[0]):
        if seg[j] != seg[j]:
            return True
    return False


@njit(**JIT)
def eval_row(x, t, lo, count, st):
    """Write the statistics of row slice ``x`` (classes ``lo ..``) for target ``t`` into
    ``st``.  ``count``: the slice is the whole row, so count the logits above the
    target's.  One read of the row: chunk max, then the chunk's sums while it is in L1,
    rescaling the running sums when the max grows (Milakov & Gimelshein's online
    softmax, extended to the sum of ``e (x - m)``).

    NaN: the max runs on ordered integer keys, where a positive NaN orders above
    ``+inf`` (the chunk max comes out NaN) and a negative one below ``-inf`` (the max
    skips it, but ``exp(NaN - m)`` makes the sum NaN).  Both must be caught here: a
    NaN chunk max compares false with everything, so without the check the chunk was
    silently left out of the row (a finite loss over the other chunks)."""
    n = x.shape[0]
    j_t = t - lo
    has_t = j_t >= 0 and j_t < n
    xt = x[j_t] if has_t else cast_like(0.0, x)
    cnt = count and has_t
    m = cast_like(-np.inf, x)
    s = 0.0
    d = 0.0
    g = 0
    best = 0
    nan = False
    for clo in range(0, n, MAX_CHUNK):
        seg = x[clo:imin(clo + MAX_CHUNK, n)]
        cm = seg_max(seg, m)
        if cm != cm:  # a positive NaN: the rest of the row cannot change the answer
            nan = True
            break
        if cm > m:
            best = clo
            if m != -np.inf and cm != np.inf:
                delta = float(m) - float(cm)
                r = math.exp(delta)
                # r = 0 (the max grew past all that was summed): nothing is left, and
                # 0 * (d + delta * s) would be 0 * -inf where delta overflows
                d = r * (d + delta * s) if s != 0.0 and r != 0.0 else 0.0
                s = r * s
            m = cm
        if m == np.inf or m == -np.inf:
            # no sums here to carry a negative NaN: look for one (inf rows are rare)
            if _seg_has_nan(seg):
                nan = True
                break
            if cnt:
                g += _seg_count_greater(seg, xt)
            continue
        cs, cd, cg = _seg_stats(seg, m, xt, cnt)
        s += cs
        d += cd
        g += cg
    if nan or s != s:  # NaN somewhere in the row (a negative one shows in s)
        st[M] = np.nan
        st[S] = np.nan
        st[D] = np.nan
        st[XT] = np.nan
        st[GT] = 0.0
        st[AM] = -1.0
        return
    # the first index of the max lies in the chunk where the max last grew
    am = best
    seg = x[best:imin(best + MAX_CHUNK, n)]
    for j in range(seg.shape[0]):
        if seg[j] == m:
            am = best + j
            break
    st[M] = m
    st[S] = s
    st[D] = d
    st[XT] = xt
    st[GT] = g
    st[AM] = am + lo


@njit(**JIT)
def row_topk(x, out):
    """The ``len(out)`` largest values of ``x``, descending, ``-inf`` padded; NaN skipped.

    A block of 64 is scanned element by element only when its (vectorised) max beats
    the current K-th value, which after the first few blocks is rare.
    """
    k = out.shape[0]
    if k == 0:
        return
    for j in range(k):
        out[j] = -np.inf
    thr = cast_like(-np.inf, x)
    n = x.shape[0]
    for lo in range(0, n, _TOPK_BLOCK):
        seg = x[lo:imin(lo + _TOPK_BLOCK, n)]
        bm = seg_max(seg, cast_like(-np.inf, x))
        if not (bm > thr) and bm == bm:
            continue
        for j in range(seg.shape[0]):
            v = seg[j]
            if v > thr:
                p = k - 1
                while p > 0 and out[p - 1] < v:
                    out[p] = out[p - 1]
                    p -= 1
                out[p] = v
                thr = cast_like(out[k - 1], x)
