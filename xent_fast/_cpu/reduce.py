"""Row reductions: the row max, the one-pass max and sum of exponentials, exp-and-store,
log-sum-exp and the log of a row's mass below its max; scalar and AVX-512 versions.

Sums of exponentials run in the row's own precision in chunks of ``CHUNK`` columns and
are added into a float64 total, which vectorises and keeps the relative error of a row
sum near 1e-10 in float32.
"""

import math

import numpy as np
from numba import njit
from numba.extending import overload

from . import avx512 as _simd
from .mathfns import cast_like, fexp, float_key, imin, key_float
from .formulas import nll_from as _nll_from
from .jit import EXACT_JIT, INLINE, JIT, ORDERED_JIT

CHUNK = 512
MAX_CHUNK = 2048  # the online max+exp pass: longer chunks amortise the reductions


# ---------------------------------------------------------------------------- reductions
# Vector loops leave a scalar remainder of up to VF x unroll - 1 elements, and a scalar
# exp costs ~20 cycles: at 1000 classes the remainder took as long as the vector body.
# Rows of at least V_BLOCK elements instead finish with one more full block of V_BLOCK that
# overlaps the body (masked where a sum must not count an element twice).
V_BLOCK = 64


@njit(**INLINE)
def seg_max(seg, m):
    """max(m, max(seg)) through ordered integer keys (see float_key)."""
    k = float_key(m)
    for j in range(seg.shape[0]):
        kj = float_key(seg[j])
        k = kj if kj > k else k
    return key_float(k, m)


@njit(**INLINE)
def _seg_sumexp_scalar(seg, m):
    """sum(exp(seg - m)) in the row's precision."""
    n = seg.shape[0]
    zero = m - m
    s = zero
    if n < V_BLOCK:
        for j in range(n):
            s += fexp(seg[j] - m)
        return s
    main = n - n % V_BLOCK
    body = seg[:main]
    for j in range(body.shape[0]):
        s += fexp(body[j] - m)
    if main < n:
        tail = seg[n - V_BLOCK:]  # loops from 0 over slices: offset indexing ran slower
        skip = V_BLOCK - (n - main)
        for k in range(V_BLOCK):
            e = fexp(tail[k] - m)
            s += e if k >= skip else zero
    return s


@njit(**INLINE)
def _seg_exp_store_scalar(seg, m, out):
    """out = exp(seg - m); returns the sum in the row's precision.  ``out`` may be
    ``seg``: the overlapping tail block keeps the values the body already wrote."""
    n = seg.shape[0]
    zero = m - m
    s = zero
    if n < V_BLOCK:
        for j in range(n):
            e = fexp(seg[j] - m)
            out[j] = e
            s += e
        return s
    main = n - n % V_BLOCK
    body = seg[:main]
    obody = out[:main]
    for j in range(body.shape[0]):
        e = fexp(body[j] - m)
        obody[j] = e
        s += e
    if main < n:
        tail = seg[n - V_BLOCK:]
        otail = out[n - V_BLOCK:]
        skip = V_BLOCK - (n - main)
        for k in range(V_BLOCK):
            e = fexp(tail[k] - m)  # may read an overwritten value: then not kept
            keep = k >= skip
            otail[k] = e if keep else otail[k]
            s += e if keep else zero
    return s


# With AVX-512, the same two loops on explicit vectors (see _simd): one vector of
# lanes at a time, the last partial vector handled as a full one ending at the row's
# end, its lanes already done masked out.
def _make_seg_sum_simd(acc_exp, scalar):
    """A vector sum of exp(seg - m) accumulated by the intrinsic ``acc_exp`` (all lanes,
    or the lanes below the max), with ``scalar`` for segments shorter than a vector."""

    def seg_sum(seg, m):
        n = seg.shape[0]
        lanes = _simd.lanes_of(seg)
        if n < lanes:
            return scalar(seg, m)
        mv = _simd.vsplat(m)
        acc = _simd.vsplat(m - m)
        main = n - n % lanes
        for j in range(0, main, lanes):
            acc = acc_exp(acc, _simd.vload(seg, j), mv, 0)
        if main < n:
            acc = acc_exp(acc, _simd.vload(seg, n - lanes), mv, lanes - (n - main))
        return _simd.vsum(acc)

    return njit(**INLINE)(seg_sum)


_seg_sumexp_simd = _make_seg_sum_simd(_simd.vexp_acc, _seg_sumexp_scalar)


@njit(**INLINE)
def _seg_exp_store_simd(seg, m, out):
    n = seg.shape[0]
    lanes = _simd.lanes_of(seg)
    if n < lanes:
        return _seg_exp_store_scalar(seg, m, out)
    mv = _simd.vsplat(m)
    acc = _simd.vsplat(m - m)
    main = n - n % lanes
    # The tail block is computed first: ``out`` may be ``seg``.
    et = _simd.vexp(_simd.vload(seg, n - lanes), mv)
    for j in range(0, main, lanes):
        e = _simd.vexp(_simd.vload(seg, j), mv)
        _simd.vstore(out, j, e)
        acc = _simd.vadd(acc, e)
    if main < n:
        _simd.vstore(out, n - lanes, et)
        acc = _simd.vadd(acc, _simd.vmask_head(et, lanes - (n - main)))
    return _simd.vsum(acc)


def _seg_sumexp(seg, m):
    """sum(exp(seg - m)) in the row's precision."""


@overload(_seg_sumexp, jit_options=INLINE)
def _seg_sumexp_ov(seg, m):
    if _simd.usable(seg):
        return lambda seg, m: _seg_sumexp_simd(seg, m)
    return lambda seg, m: _seg_sumexp_scalar(seg, m)


def _seg_exp_store(seg, m, out):
    """out = exp(seg - m); returns the sum in the row's precision (``out`` may be
    ``seg``)."""


@overload(_seg_exp_store, jit_options=INLINE)
def _seg_exp_store_ov(seg, m, out):
    if _simd.usable(seg) and _simd.usable(out):
        return lambda seg, m, out: _seg_exp_store_simd(seg, m, out)
    return lambda seg, m, out: _seg_exp_store_scalar(seg, m, out)


@njit(**INLINE)
def row_max(x):
    return seg_max(x, cast_like(-np.inf, x))


@njit(**INLINE)
def _row_max_sumexp_scalar(x):
    """(max, sum(exp(x - max))) in one read of the row: chunk max, then the chunk's exps
    while it is in L1, rescaling the running sum when the max grows."""
    n = x.shape[0]
    m = cast_like(-np.inf, x)
    if n <= MAX_CHUNK:  # one chunk: no slicing
        m = seg_max(x, m)
        if m == np.inf or m == -np.inf:
            return m, 0.0
        return m, float(_seg_sumexp(x, m))
    total = 0.0
    for lo in range(0, n, MAX_CHUNK):
        seg = x[lo:imin(lo + MAX_CHUNK, n)]
        cm = seg_max(seg, m)
        if cm != cm:  # a NaN ordered above +inf: the row's answer is NaN
            return cm, np.nan
        if cm == np.inf or cm == -np.inf:
            m = cm
            continue
        if cm > m:
            if m != -np.inf:
                total *= math.exp(float(m) - float(cm))
            m = cm
        total += _seg_sumexp(seg, m)
    return m, total


# One pass with AVX-512: each lane keeps its own running max and a float64 sum of
# exps relative to it.  A chunk of SIMD_CHUNK vectors is read for its lane maxima,
# the sums are rescaled only when a lane's max grew, and the chunk's exps follow
# while it is in L1.  Short chunks let the loads of the next chunk overlap the exps
# of this one: with 2048-element chunks the max pass and the exp pass took turns with
# memory and ran at 34 of the 46 GB/s.  Lanes start at the lowest finite value, so a
# -inf element needs no test (it adds exp(-inf) = 0); only an all -inf row ends with
# a zero sum, and a NaN anywhere makes the sum NaN.
SIMD_CHUNK = 16
SIMD_ONE_PASS_MIN = 256  # below: a max pass, then the exps from L1 (<= MAX_CHUNK)
# The vector loops that stream rows from memory prefetch this many vectors (8 KB)
# ahead: the hardware prefetcher alone left them waiting on memory between chunks.
# logsumexp 4096 x 32000 float32: 18.6 -> 14.6 ms on one core, 11.8 -> 10.9 ms on 2
# threads; 65536 x 1000: 6.2 -> 5.3 ms on 2 threads.
AHEAD = 128


@njit(**INLINE)
def vrescale(S, M, cm):
    return _simd.vmul(S, _simd.vwiden(_simd.vexp(M, cm)))


@njit(**INLINE)
def _short_max_sumexp_simd(x):
    """_row_max_sumexp_scalar for a row of one chunk (n <= MAX_CHUNK) where the vector
    loops apply: the same operations, without the chunked branch nor the overload
    that picks the vector sum (each was compiled apart for every forward kernel)."""
    m = seg_max(x, cast_like(-np.inf, x))
    if m == np.inf or m == -np.inf:
        return m, 0.0
    return m, float(_seg_sumexp_simd(x, m))


@njit(**INLINE)
def row_max_sumexp_simd(x):
    n = x.shape[0]
    if n < SIMD_ONE_PASS_MIN:  # a short row: its max pass leaves it in L1
        return _short_max_sumexp_simd(x)
    lanes = _simd.lanes_of(x)
    zero = cast_like(0.0, x)
    M = _simd.vlowest(zero)
    S = _simd.vzero_wide(zero)
    nv = n - n % lanes
    step = SIMD_CHUNK * lanes
    ahead = AHEAD * lanes
    two = 2 * lanes
    for lo in range(0, nv, step):
        hi = imin(lo + step, nv)
        # Two accumulators each for the max and the sum: one chain of dependent
        # max or add instructions left half the pipes idle.
        cm = M
        cm2 = M
        j = lo
        while j + two <= hi:
            _simd.prefetch(x, j + ahead)
            _simd.prefetch(x, j + ahead + lanes)
            cm = _simd.vmax(cm, _simd.vload(x, j))
            cm2 = _simd.vmax(cm2, _simd.vload(x, j + lanes))
            j += two
        if j < hi:
            cm = _simd.vmax(cm, _simd.vload(x, j))
        cm = _simd.vmax(cm, cm2)
        if _simd.vany_gt(cm, M):
            S = vrescale(S, M, cm)
            M = cm
        cs = _simd.vsplat(zero)
        cs2 = cs
        j = lo
        while j + two <= hi:
            cs = _simd.vexp_acc(cs, _simd.vload(x, j), M, 0)
            cs2 = _simd.vexp_acc(cs2, _simd.vload(x, j + lanes), M, 0)
            j += two
        if j < hi:
            cs = _simd.vexp_acc(cs, _simd.vload(x, j), M, 0)
        S = _simd.vadd(S, _simd.vwiden(_simd.vadd(cs, cs2)))
    if nv < n:  # the last lanes, as a full vector ending at n with its head masked
        v = _simd.vload(x, n - lanes)
        cm = _simd.vmax(M, v)
        if _simd.vany_gt(cm, M):
            S = vrescale(S, M, cm)
            M = cm
        cs = _simd.vexp_acc(_simd.vsplat(zero), v, M, lanes - (n - nv))
        S = _simd.vadd(S, _simd.vwiden(cs))
    m = _simd.vhmax(M)
    if m == np.inf:
        return m, 0.0
    s = _simd.vsum(_simd.vmul(S, _simd.vwiden(_simd.vexp(M, _simd.vsplat(m)))))
    if s == 0.0:  # every element -inf
        return cast_like(-np.inf, x), 0.0
    return m, s


def row_max_sumexp(x):
    """(max, sum(exp(x - max))) in one read of the row."""


@overload(row_max_sumexp, jit_options=INLINE)
def _row_max_sumexp_ov(x):
    if _simd.usable(x):
        return lambda x: row_max_sumexp_simd(x)
    return lambda x: _row_max_sumexp_scalar(x)


@njit(**INLINE)
def row_exp_store(x, m, out):
    """out[j] = exp(x[j] - m); returns the float64 sum.  Exp once per element."""
    n = x.shape[0]
    if n <= CHUNK:
        return float(_seg_exp_store(x, m, out))
    total = 0.0
    for lo in range(0, n, CHUNK):
        hi = imin(lo + CHUNK, n)
        total += _seg_exp_store(x[lo:hi], m, out[lo:hi])
    return total


@njit(**JIT)
def row_has_nan(x):
    bad = False
    for j in range(x.shape[0]):
        bad |= x[j] != x[j]
    return bad


@njit(**INLINE)
def lse_from(x, m, s):
    """Finish a log-sum-exp from the row max ``m`` and ``s = sum(exp(x - m))``."""
    if m == -np.inf or m == np.inf:  # rare rows: a NaN the max skipped is looked for
        return np.nan if row_has_nan(x) else float(m)
    return float(m) + math.log(s)


# Where the max carries nearly all of a row's mass (s = sum exp(x - max) below this),
# s = 1 + rest has lost the low digits of rest, and with them log s, which is then the
# whole of a tiny result (logsumexp([0, -40]) = 4.2e-18, the loss of a confident right
# prediction, the max's log-probability).  Such rows get log s again with the max term
# split off (a sum below 2 holds exactly one): log1p(rest), as SciPy's logsumexp.
CONCENTRATED = 1.0625


@njit(**INLINE)
def _seg_rest_scalar(seg, m):
    """sum(exp(seg - m)) over the elements that are not ``m``, in the row's precision."""
    zero = m - m
    s = zero
    for j in range(seg.shape[0]):
        v = seg[j]
        e = fexp(v - m)
        s += zero if v == m else e
    return s


_seg_rest_simd = _make_seg_sum_simd(_simd.vexp_acc_rest, _seg_rest_scalar)


def _seg_rest(seg, m):
    """sum(exp(seg - m)) over the elements that are not ``m``."""


@overload(_seg_rest, jit_options=INLINE)
def _seg_rest_ov(seg, m):
    if _simd.usable(seg):
        return lambda seg, m: _seg_rest_simd(seg, m)
    return lambda seg, m: _seg_rest_scalar(seg, m)


@njit(**JIT)
def log_mass_split(x, m):
    """log(sum(exp(x - m))) for the finite row max ``m`` of a row whose sum is below
    CONCENTRATED, hence with one max term (two would make it 2): log1p(rest)."""
    n = x.shape[0]
    rest = 0.0
    for lo in range(0, n, CHUNK):
        rest += _seg_rest(x[lo:imin(lo + CHUNK, n)], m)
    return math.log1p(rest)


@njit(**JIT)
def log_mass_split_exps(e):
    """The same from the stored exps ``e = exp(x - m)``, the max's being exactly 1."""
    n = e.shape[0]
    rest = 0.0
    one = cast_like(1.0, e)
    zero = one - one
    for lo in range(0, n, CHUNK):
        seg = e[lo:imin(lo + CHUNK, n)]
        s = zero
        for j in range(seg.shape[0]):
            v = seg[j]
            s += zero if v == one else v
        rest += s
    return math.log1p(rest)


@njit(**INLINE)
def tiny_log(x):
    """Below this a log s computed from the row sums has lost digits that matter in
    the row's precision (float32 rows are summed in float32 lanes)."""
    low = float(cast_like(1.0 + 1e-10, x)) == 1.0
    return 2.0 ** -6 if low else 2.0 ** -16


@njit(**JIT)
def row_logsumexp(x):
    m, s = row_max_sumexp(x)
    lse = lse_from(x, m, s)
    if s < CONCENTRATED and abs(lse) < 1.0 and abs(m) < np.inf:
        lse = float(m) + log_mass_split(x, m)
    return lse


@njit(**ORDERED_JIT)
def shift2(x, a, b, out):
    """out = (x - a) - b in that order: no "reassoc", which would fold a + b first."""
    for j in range(x.shape[0]):
        out[j] = (x[j] - a) - b


@njit(**EXACT_JIT)
def less_one(k, rest):
    """(k - 1) + rest, in that order (no "reassoc": with it the sum of the terms below
    the max was added to k first, and 1 + 1e-18 - 1 is 0; and w - 1 for w = 1 + r was
    folded to r, defeating Goldberg's log1p)."""
    return (k - cast_like(1.0, k)) + rest


@njit(**EXACT_JIT)
def shift_scale(v, m, it):
    """(v - m) * it with neither contraction nor re-association (the flags live on the
    instructions, so they hold where LLVM inlines this): at v = m it is exactly 0,
    where v * it - m * it under "reassoc"/"contract" is off by the rounding of m * it."""
    return (v - m) * it


# The split of a concentrated row for log_split (xent_fast/_formulas.py): k, the number
# of elements at the max (each exp 0 = 1), and rest, the sum of the others' exps.  Unlike
# log_mass_split these count k: the KL splits both rows where only one is concentrated.
@njit(**JIT)
def row_split_exps(e):
    """(k, rest) from stored exps ``e = exp(x - m)``: the max's are exactly 1."""
    n = e.shape[0]
    one = cast_like(1.0, e)
    zero = one - one
    k = 0
    rest = 0.0
    for lo in range(0, n, CHUNK):
        seg = e[lo:imin(lo + CHUNK, n)]
        s = zero
        for j in range(seg.shape[0]):
            v = seg[j]
            if v == one:
                k += 1
            else:
                s += v
        rest += s
    return float(k), rest


@njit(**JIT)
def row_split_scaled(x, m, it):
    """(k, rest) of the row as the KL reads it, d = (x - m) * it (``shift_scale``): k
    the number of d = 0, rest the sum of exp(d) over the others."""
    n = x.shape[0]
    zero = it - it
    k = 0
    rest = 0.0
    for lo in range(0, n, CHUNK):
        seg = x[lo:imin(lo + CHUNK, n)]
        s = zero
        for j in range(seg.shape[0]):
            d = shift_scale(seg[j], m, it)
            if d == zero:
                k += 1
            else:
                s += fexp(d)
        rest += s
    return float(k), rest


@njit(**JIT)
def row_split_times(x, m, it):
    """(k, rest) of the row read as x * it, about the max ``m`` of those products (as
    the one-pass KL reads it): k the number of x * it = m, rest the sum of the others'
    exp(x * it - m)."""
    n = x.shape[0]
    zero = it - it
    k = 0
    rest = 0.0
    for lo in range(0, n, CHUNK):
        seg = x[lo:imin(lo + CHUNK, n)]
        s = zero
        for j in range(seg.shape[0]):
            v = seg[j] * it
            if v == m:
                k += 1
            else:
                s += fexp(v - m)
        rest += s
    return float(k), rest


# nll_from: log s - (x_t - m), kept in that order (with "reassoc" beside lse = m + log s
# the optimiser rewrote it as lse - x_t, which is 0 in float32 at x_t ~ m ~ 3e38); the
# formula is shared with the CUDA kernels (xent_fast/_formulas.py).
nll_from = _nll_from
