"""Softmax cross-entropy with class-index targets for at most ``SMALL_CLASSES`` classes:
one driver per class count, rows transposed so that the loop over rows vectorises."""

import numpy as np
from numba import njit

from . import avx512 as _simd
from .jit import INLINE, KERNEL
from .mathfns import cast_like, fexp, flog1p, float_key, fmax, imin
from .reduce import AHEAD, less_one, nll_from
from .row_access import block_bounds
from .rows import ce_index_row


# Up to this many classes, index-target cross-entropy runs a kernel built for the exact
# class count: with C a compile-time constant the per-class loops unroll and the loop over
# rows vectorises (16 rows to an AVX-512 vector, log included), instead of paying the
# per-row overhead of the general kernel (130 ns a row at 10 classes).  (A kernel taking
# the class count at run time, built once instead of once a class count, measured 10-50%
# slower on one core at 2, 3 and 16 classes.)  On AVX-512 hosts a vector's worth of rows
# (16 float32, 8 float64) is read as C whole vectors and transposed in registers
# (_simd.vcols_in), and its max, sum of exps and target logit come from one intrinsic
# (_simd.vsmall_stats): at 1M x 10 that took the kernel from 10.0 to 4.6 ns a row on one
# core, the strided gather having cost 5.7 of them.
SMALL_CLASSES = 16

# Rows a vector group in the few-classes kernels (T holds C x _SB logits, 8 KB at most):
# 128 spreads the per-group work (8192 x 2: 34 us a call with 32, 23 us with 128; 1M x 10:
# 5.8 and 5.4 ms).
_SB = 128


@njit(**INLINE)
def _gather_columns(xs, T, C, nrows):
    """T[c * _SB + r] = xs[r * C + c] for the first ``nrows`` rows of a group."""
    for c in range(C):
        col = xs[c:]
        Tc = T[c * _SB:(c + 1) * _SB]
        for r in range(nrows):
            Tc[r] = col[r * C]


@njit(**INLINE)
def _scatter_columns(T, out, C, nrows):
    """out[r * C + c] = T[c * _SB + r]: the inverse of _gather_columns."""
    for c in range(C):
        col = out[c:]
        Tc = T[c * _SB:(c + 1) * _SB]
        for r in range(nrows):
            col[r * C] = Tc[r]


@njit(**INLINE)
def _copy(dst, src, n):
    """dst[:n] = src[:n], as a loop: Numba's slice assignment brings its shape-mismatch
    error, whose message formatting took 5 s to compile."""
    for j in range(n):
        dst[j] = src[j]


@njit(**INLINE)
def _fill(dst, v):
    for j in range(dst.shape[0]):
        dst[j] = v


# The general row kernel, for the rare rows whose loss comes out inf or NaN here:
# called, not inlined, so that it compiles once a process and dtype for every class
# count and option set instead of into each few-classes kernel (half of its compile).
_ce_index_row_apart = njit(**KERNEL)(ce_index_row.py_func)


@njit(**INLINE)
def _store_losses(rowv, lg, nrows):
    """lg[:nrows] = rowv[:nrows]; returns the largest float_key of |loss|, which is
    at least inf's key when a loss is inf or NaN.  (An integer max: a float
    "chk += v - v" was folded to 0 by re-association, and a bool or-reduction
    stopped the loop vectorising.)"""
    chk = float_key(rowv[0] - rowv[0])
    for r in range(nrows):
        lg[r] = rowv[r]
        k = float_key(abs(rowv[r]))
        chk = k if k > chk else chk
    return chk


def make_ce_small(C, general, want_grad):
    """The few-classes driver for exactly ``C`` classes.  ``general`` (class weights or
    label smoothing: the kernel then always takes ``w``, ones when unweighted, and
    ``eps``, which may be 0) and ``want_grad`` are compile-time constants too: branches
    left in the row loop stop it vectorising.  The z-loss costs a few operations a row
    and is always computed (``z`` may be 0): one kernel fewer per class count."""
    has_w = smooth = general

    SIMD = _simd.ENABLED

    def drv(x, t, w, wsum, eps, z, ignore, gscale, g, loss, nblocks, b):
        n = x.shape[0]
        xf = x.reshape(n * C)
        gf = g.reshape(g.shape[0] * g.shape[1])
        ce = cast_like(1.0 - eps, xf)
        cs = cast_like(eps / C, xf)
        zz = cast_like(z, xf)
        gs = cast_like(gscale, xf)
        wsum_c = cast_like(wsum, xf)
        one = cast_like(1.0, xf)
        zero = cast_like(0.0, xf)
        inf_key = float_key(cast_like(np.inf, xf))
        L = _simd.lanes_of(xf)
        # ``loss`` holds a loss a row, or (for a sum or mean) one partial sum a block,
        # which saves writing and summing 8 bytes a row.
        per_row = loss.shape[0] == n  # the same thing when every block is one row
        lo, hi = block_bounds(b, nblocks, n)
        # Loop from 0 over slices of the block: a loop from ``lo`` over the whole
        # arrays compiled to gathers and ran 3x slower.
        xb = xf[lo * C:hi * C]
        tb = t[lo:hi]
        lb = loss[lo:hi] if per_row else np.empty(_SB, loss.dtype)
        total = 0.0
        gb = gf[lo * C:hi * C] if want_grad else gf[:0]
        # Rows go in groups of _SB: each class's logits of the group are gathered
        # into one vector (T[c] = column c), so every step below is a vector op over
        # _SB rows.  Interleaved loads of whole rows ran at half this speed.  The
        # last group is padded (zero rows, or on AVX-512 stale lanes past the last
        # vector block) and those lanes' results are not stored.
        T = np.zeros(C * _SB, xf.dtype)
        tv = np.empty(_SB, np.int64)
        mv = np.empty(_SB, xf.dtype)
        sv = np.empty(_SB, xf.dtype)
        kcv = np.empty(_SB, xf.dtype)
        xtv = np.empty(_SB, xf.dtype)
        wtv = np.empty(_SB, xf.dtype)
        wyv = np.empty(_SB, xf.dtype)
        rowv = np.empty(_SB, xf.dtype)
        kv = np.empty(_SB, xf.dtype)
        av = np.empty(_SB, xf.dtype)
        skv = np.empty(_SB, xf.dtype)
        wrow = np.empty(C, xf.dtype)
        pad = np.zeros(L * C, xf.dtype)
        _fill(wtv, one)
        _fill(wyv, zero)
        badv = np.empty(_SB, np.int64)
        gbad = np.empty((_SB, C if want_grad else 0), xf.dtype)
        for r0 in range(0, hi - lo, _SB):
            nv = imin(_SB, hi - lo - r0)
            xs = xb[r0 * C:(r0 + nv) * C]
            for r in range(nv):
                tv[r] = tb[r0 + r]
            for r in range(nv, _SB):
                tv[r] = ignore
            if SIMD:
                # Blocks of a vector's rows, transposed in registers; the last
                # partial block from a zero-padded copy.
                full = nv - nv % L
                for q in range(0, full, L):
                    for u in range(C):  # the block 8 KB ahead (see reduce.AHEAD)
                        _simd.prefetch(xs, q * C + (u + AHEAD) * L)
                    _simd.vcols_in(xs, q * C, C, T, q, _SB)
                    _simd.vsmall_stats(T, q, _SB, C, tv, mv, sv, xtv)
                if full < nv:
                    _fill(pad, zero)
                    _copy(pad, xs[full * C:], (nv - full) * C)
                    _simd.vcols_in(pad, 0, C, T, full, _SB)
                    _simd.vsmall_stats(T, full, _SB, C, tv, mv, sv, xtv)
            else:
                if nv == _SB:  # a constant trip count: the gathers vectorise
                    _gather_columns(xs, T, C, _SB)
                else:
                    _gather_columns(xs, T, C, nv)
                for r in range(nv, _SB):
                    for c in range(C):
                        T[c * _SB + r] = zero
                for r in range(_SB):
                    mv[r] = T[r]
                for c in range(1, C):
                    Tc = T[c * _SB:(c + 1) * _SB]
                    for r in range(_SB):
                        mv[r] = fmax(mv[r], Tc[r])
                for r in range(_SB):
                    sv[r] = zero
                    kcv[r] = zero
                    xtv[r] = zero
                # The target's logit by selects over the classes, not by indexed
                # loads: a gather per row stopped the loop from vectorising.
                for c in range(C):
                    Tc = T[c * _SB:(c + 1) * _SB]
                    for r in range(_SB):
                        v = Tc[r]
                        e = fexp(v - mv[r])
                        top = v == mv[r]
                        sv[r] += zero if top else e  # see vsmall_stats: sum - 1
                        kcv[r] += one if top else zero
                        xtv[r] = v if tv[r] == c else xtv[r]
                for r in range(_SB):
                    sv[r] = less_one(kcv[r], sv[r])
            # sv holds the sum of exps less 1, summed so that it keeps the digits of
            # the terms below the max: log s = log1p(sv) where the max carries nearly
            # all the mass (a confident right prediction's loss is then ~the rest of
            # the mass, not a rounded 0).
            if has_w or smooth:
                for r in range(_SB):
                    wtv[r] = zero if has_w else one
                    wyv[r] = zero
                for c in range(C):
                    Tc = T[c * _SB:(c + 1) * _SB]
                    wc = w[c] if has_w else one
                    for r in range(_SB):
                        if has_w:
                            wtv[r] = wc if tv[r] == c else wtv[r]
                        if smooth:
                            wyv[r] += wc * (Tc[r] - mv[r])
            for r in range(_SB):
                m = mv[r]
                s_ = sv[r] + one
                ls = flog1p(sv[r])
                lse = m + ls
                kept = tv[r] != ignore
                row = (ce * wtv[r]) * nll_from(ls, xtv[r], m)
                if smooth:
                    row += cs * (wsum_c * ls - wyv[r])
                row += zz * lse * lse  # 0 where z is 0 (non-finite rows are redone)
                rowv[r] = row if kept else zero
                if want_grad:
                    kgs = gs if kept else zero  # 0, not 0 * NaN, when all ignored
                    kv[r] = kgs * (ce * wtv[r] + cs * wsum_c + 2 * zz * lse) / s_
                    av[r] = kgs * ce * wtv[r]
                    skv[r] = kgs * cs
            lg = lb[r0:r0 + nv] if per_row else lb[:nv]
            if nv == _SB:
                chk = _store_losses(rowv, lg, _SB)
            else:
                chk = _store_losses(rowv, lg, nv)
            # Rows whose loss came out inf or NaN (a -inf target, all -inf, a +inf,
            # float32 overflow of lse^2) are redone by the general kernel, which
            # keeps SEMANTICS.md's conventions for them and works in float64 where
            # it matters.  They are redone now, from a copy of the row, while the
            # input is intact (the gradient may be written over it), and their
            # gradient rows are put in place after the scatter below.
            nbad = 0
            if chk >= inf_key:
                # the flags as run-time values: one build of the row kernel for all
                fb_w = w.shape[0] > 0 if has_w else w.shape[0] < 0
                fb_grad = gbad.shape[1] > 0
                for r in range(nv):
                    if not (abs(lg[r]) < np.inf) and tb[r0 + r] != ignore:
                        _copy(wrow, xs[r * C:], C)
                        badv[nbad] = r
                        lg[r] = _ce_index_row_apart(wrow, tb[r0 + r], w, fb_w, wsum, eps,
                                                    z, gbad[nbad], fb_grad, gscale)
                        nbad += 1
            if want_grad:
                # The gradient in the gathered layout, then scattered back to rows.
                for c in range(C):
                    Tc = T[c * _SB:(c + 1) * _SB]
                    wc = w[c] if has_w else one
                    for r in range(_SB):
                        d = kv[r] * fexp(Tc[r] - mv[r])
                        if smooth:
                            d -= skv[r] * wc
                        d -= av[r] if tv[r] == c else zero
                        # an ignored row's gradient is exactly 0, also where its
                        # logits are all -inf or hold NaN (0 * NaN would be NaN)
                        Tc[r] = d if tv[r] != ignore else zero
                gs_ = gb[r0 * C:(r0 + nv) * C]
                if SIMD:
                    full = nv - nv % L
                    for q in range(0, full, L):
                        _simd.vcols_out(T, q, _SB, C, gs_, q * C)
                    if full < nv:
                        _simd.vcols_out(T, full, _SB, C, pad, 0)
                        _copy(gs_[full * C:], pad, (nv - full) * C)
                elif nv == _SB:
                    _scatter_columns(T, gs_, C, _SB)
                else:
                    _scatter_columns(T, gs_, C, nv)
                for q in range(nbad):
                    r = badv[q]
                    _copy(gs_[r * C:], gbad[q], C)
            if not per_row:
                for r in range(nv):
                    total += lg[r]
        if not per_row:
            loss[b] = total

    drv.__name__ = drv.__qualname__ = small_name(C, general, want_grad)
    return drv


def small_name(C, general, want_grad):
    return f"ce_small{C}_{int(general)}{int(want_grad)}"
