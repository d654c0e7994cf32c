"""CPU backends: batch the row kernels over rows, serially or on threads.

Each driver below is a plain Python function over 2-D arrays (rows x classes) that is
compiled twice: ``parallel=False`` for the ``"cpu"`` backend and ``parallel=True`` for
``"parallel"``, where ``prange`` spreads blocks of rows over Numba's thread pool.  Rows
are handed out in ``nblocks`` contiguous blocks so that work buffers are allocated once
per block, not once per row.

Compilation is lazy and memoised, with ``cache=True`` on disk.  Inputs are typed
read-only whatever their flag, so one machine-code version serves writable and read-only
arrays.  The API hands over C-contiguous row arrays (copying strided ones): only a
unit-stride row lets LLVM vectorise, and the strided 'A' version ran 10x slower.
"""

import hashlib
import os
import threading
from types import FunctionType

import numpy as np
from numba import njit, prange, types
from numba.np.numpy_support import from_dtype
from numba.core.errors import TypingError

from . import _simd, _threads
from ._rowio import (block_bounds, grad_row, half_work_row, load_row, row_at,
                     store_grad_row, task_bounds, work_row)
from ._scalar import cast_like, flog, flog1p, fexp, float_key, fmax
from ._rows import (_AHEAD, INLINE, JIT, bce_logits_row, bce_row, ce_index_row, ce_prob_row,
                    dist_row, first_bad_prob, kl_logits_row, less_one, nll_from, row_logsumexp, row_softmax,
                    softcap_grad_row, softcap_row, _row_sum)
from ._evalrows import eval_row, row_topk

# Before anything can start Numba's thread pool: every path to a kernel imports this module.
_threads.configure()


# ---------------------------------------------------------------------------- drivers
_STREAM_BYTES = 1 << 25  # 32 MiB


def _logsumexp(x, hk, out, nblocks):
    n, c = x.shape
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        for i in range(lo, hi):
            out[i] = row_logsumexp(load_row(row_at(x, i), work, hk))


def _softmax(x, hk, log, out, nblocks):
    n, c = x.shape
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        for i in range(lo, hi):
            row_softmax(load_row(row_at(x, i), work, hk), row_at(out, i), log)


def _dist(p, phk, q, qhk, mode, out, bad, nblocks):
    n, c = p.shape
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        pw = half_work_row(p, c)
        qw = half_work_row(q, c)
        for i in range(lo, hi):
            pr = load_row(row_at(p, i), pw, phk)
            qr = load_row(row_at(q, i), qw, qhk)
            k = first_bad_prob(pr)
            if k < 0 and mode != 0:
                k = first_bad_prob(qr)
                k = k + c if k >= 0 else k
            bad[i] = k
            out[i] = dist_row(pr, qr, mode) if k < 0 else np.nan


def _ce_index(x, hk, t, w, has_w, wsum, eps, z, cap, ignore, gscale, want_grad, g, ghk,
              loss, nblocks):
    n, c = x.shape
    # Non-temporal gradient stores (see _rows._ce_grad_stream) only where the gradient
    # is the output itself and larger than the caches: a smaller one is better left in
    # cache for whatever reads it next.
    stream = cap == 0 and ghk == 0 and g.size * g.itemsize >= _STREAM_BYTES
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        work = work_row(x, c) if cap > 0 else half_work_row(x, c)
        gwork = half_work_row(g, c if want_grad else 0)
        for i in range(lo, hi):
            ti = t[i]
            if ti == ignore:
                loss[i] = 0.0
                if want_grad:
                    gw = grad_row(row_at(g, i), gwork)
                    for j in range(c):
                        gw[j] = 0
                    store_grad_row(row_at(g, i), gw, ghk)
                continue
            y = load_row(row_at(x, i), work, hk)
            if cap > 0:
                softcap_row(y, cap, work)
                y = work
            if want_grad:
                gr = grad_row(row_at(g, i), gwork)
                loss[i] = ce_index_row(y, ti, w, has_w, wsum, eps, z, gr, True, gscale,
                                       stream)
                if cap > 0:
                    softcap_grad_row(y, cap, gr)
                store_grad_row(row_at(g, i), gr, ghk)
            else:
                loss[i] = ce_index_row(y, ti, w, has_w, wsum, eps, z, gwork, False, gscale)


def _ce_prob(x, hk, p, phk, w, has_w, eps, z, cap, gscale, want_grad, g, ghk, loss, nblocks):
    n, c = x.shape
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        work = work_row(x, c) if cap > 0 else half_work_row(x, c)
        pwork = half_work_row(p, c)
        gwork = half_work_row(g, c if want_grad else 0)
        for i in range(lo, hi):
            y = load_row(row_at(x, i), work, hk)
            if cap > 0:
                softcap_row(y, cap, work)
                y = work
            pr = load_row(row_at(p, i), pwork, phk)
            if want_grad:
                gr = grad_row(row_at(g, i), gwork)
                loss[i] = ce_prob_row(y, pr, w, has_w, eps, z, gr, True, gscale)
                if cap > 0:
                    softcap_grad_row(y, cap, gr)
                store_grad_row(row_at(g, i), gr, ghk)
            else:
                loss[i] = ce_prob_row(y, pr, w, has_w, eps, z, gwork, False, gscale)


def _kl_logits(x, hk, xt, thk, inv_t, gscale, want_grad, g, ghk, out, nblocks):
    n, c = x.shape
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        twork = half_work_row(xt, c)
        gwork = half_work_row(g, c if want_grad else 0)
        for i in range(lo, hi):
            y = load_row(row_at(x, i), work, hk)
            yt = load_row(row_at(xt, i), twork, thk)
            if want_grad:
                gr = grad_row(row_at(g, i), gwork)
                out[i] = kl_logits_row(y, yt, inv_t, gr, True, gscale)
                store_grad_row(row_at(g, i), gr, ghk)
            else:
                out[i] = kl_logits_row(y, yt, inv_t, gwork, False, gscale)


def _eval_stats(x, hk, t, lo, count, st, top, nblocks):
    """Per-row evaluation statistics (see _evalrows) of rows ``x``, classes ``lo ..``;
    with a non-empty ``top`` also each row's ``top.shape[1]`` largest logits."""
    n, c = x.shape
    k = top.shape[1]
    for b in prange(nblocks):
        lo_r, hi_r = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        for i in range(lo_r, hi_r):
            y = load_row(row_at(x, i), work, hk)
            eval_row(y, t[i], lo, count, row_at(st, i))
            if k > 0:
                row_topk(y, row_at(top, i))


def _bce(p, phk, y, yhk, w, has_w, keep, colblock, out, partial, bad):
    n, c = p.shape
    ncb = max(1, (c + colblock - 1) // colblock)
    for task in prange(n * ncb):
        i, lo, hi = task_bounds(task, ncb, colblock, c)
        pw = half_work_row(p, hi - lo)
        yw = half_work_row(y, hi - lo)
        ow = work_row(p, hi - lo if not keep else 0)
        pr = load_row(p[i, lo:hi], pw, phk)
        yr = load_row(y[i, lo:hi], yw, yhk)
        k = -1
        for j in range(hi - lo):
            v = pr[j]
            if not (v >= 0 and v <= 1):
                k = lo + j
                break
        bad[task] = k
        orow = out[i, lo:hi] if keep else ow
        bce_row(pr, yr, w[i, lo:hi] if has_w else w[0, :0], has_w, orow)
        partial[task] = _row_sum(orow)


def _bce_logits(x, hk, y, yhk, w, has_w, pw, has_pw, gscale, want_grad, g, ghk, keep,
                colblock, out, partial):
    n, c = x.shape
    ncb = max(1, (c + colblock - 1) // colblock)
    for task in prange(n * ncb):
        i, lo, hi = task_bounds(task, ncb, colblock, c)
        xw = half_work_row(x, hi - lo)
        yw = half_work_row(y, hi - lo)
        ow = work_row(x, hi - lo if not keep else 0)
        xr = load_row(x[i, lo:hi], xw, hk)
        yr = load_row(y[i, lo:hi], yw, yhk)
        orow = out[i, lo:hi] if keep else ow
        wr = w[i, lo:hi] if has_w else w[0, :0]
        pr = pw[i, lo:hi] if has_pw else pw[0, :0]
        if want_grad:
            gw = half_work_row(g, hi - lo)
            gr = grad_row(g[i, lo:hi], gw)
            bce_logits_row(xr, yr, wr, has_w, pr, has_pw, orow, gr, True, gscale)
            store_grad_row(g[i, lo:hi], gr, ghk)
        else:
            bce_logits_row(xr, yr, wr, has_w, pr, has_pw, orow, ow, False, gscale)
        partial[task] = _row_sum(orow)


def _targets(t, c, ignore, w, has_w):
    """(index of the first target that is neither a class nor ``ignore``, or -1;
    the summed weight of the kept targets, the "mean" denominator)."""
    den = 0.0
    nbad = 0
    for i in range(t.shape[0]):  # branch-free, so it vectorises
        ti = t[i]
        kept = ti != ignore
        bad = kept and (ti < 0 or ti >= c)
        nbad += bad
        if has_w:
            den += w[min(max(ti, 0), c - 1)] if kept else 0.0
        else:
            den += 1.0 if kept else 0.0
    if nbad:
        for i in range(t.shape[0]):
            ti = t[i]
            if ti != ignore and (ti < 0 or ti >= c):
                return i, den
    return -1, den


# ---------------------------------------------------------------------------- few classes
# Up to this many classes, index-target cross-entropy runs a kernel built for the exact
# class count: with C a compile-time constant the per-class loops unroll and the loop over
# rows vectorises (16 rows to an AVX-512 vector, log included), instead of paying the
# per-row overhead of the general kernel (130 ns a row at 10 classes).  On AVX-512 hosts
# a vector's worth of rows (16 float32, 8 float64) is read as C whole vectors and
# transposed in registers (_simd.vcols_in), and its max, sum of exps and target logit
# come from one intrinsic (_simd.vsmall_stats): at 1M x 10 that took the kernel from
# 10.0 to 4.6 ns a row on one core, the strided gather having cost 5.7 of them.
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


def _make_ce_small(C, general, want_grad):
    """The few-classes driver for exactly ``C`` classes.  ``general`` (class weights or
    label smoothing: the kernel then always takes ``w``, ones when unweighted, and
    ``eps``, which may be 0) and ``want_grad`` are compile-time constants too: branches
    left in the row loop stop it vectorising.  The z-loss costs a few operations a row
    and is always computed (``z`` may be 0): one kernel fewer per class count."""
    has_w = smooth = general

    SIMD = _simd.ENABLED

    def drv(x, t, w, wsum, eps, z, ignore, gscale, g, loss, nblocks):
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
        for b in prange(nblocks):
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
            wtv[:] = one
            wyv[:] = zero
            badv = np.empty(_SB, np.int64)
            gbad = np.empty((_SB, C if want_grad else 0), xf.dtype)
            for r0 in range(0, hi - lo, _SB):
                nv = min(_SB, hi - lo - r0)
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
                        for u in range(C):  # the block 8 KB ahead (see _rows._AHEAD)
                            _simd.prefetch(xs, q * C + (u + _AHEAD) * L)
                        _simd.vcols_in(xs, q * C, C, T, q, _SB)
                        _simd.vsmall_stats(T, q, _SB, C, tv, mv, sv, xtv)
                    if full < nv:
                        pad[:] = zero
                        pad[:(nv - full) * C] = xs[full * C:]
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
                    for r in range(nv):
                        if not (abs(lg[r]) < np.inf) and tb[r0 + r] != ignore:
                            wrow[:] = xs[r * C:(r + 1) * C]
                            badv[nbad] = r
                            lg[r] = ce_index_row(wrow, tb[r0 + r], w, has_w, wsum, eps, z,
                                                 gbad[nbad], want_grad, gscale)
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
                            gs_[full * C:] = pad[:(nv - full) * C]
                    elif nv == _SB:
                        _scatter_columns(T, gs_, C, _SB)
                    else:
                        _scatter_columns(T, gs_, C, nv)
                    for q in range(nbad):
                        r = badv[q]
                        gs_[r * C:(r + 1) * C] = gbad[q]
                if not per_row:
                    for r in range(nv):
                        total += lg[r]
            if not per_row:
                loss[b] = total

    drv.__name__ = drv.__qualname__ = small_name(C, general, want_grad)
    return drv


def small_name(C, general, want_grad):
    return f"ce_small{C}_{int(general)}{int(want_grad)}"


# Which positional arguments each driver writes (typed mutable); all others that are
# arrays are typed read-only.
_DRIVERS = {
    "targets": (_targets, set()),
    "logsumexp": (_logsumexp, {"out"}),
    "softmax": (_softmax, {"out"}),
    "dist": (_dist, {"out", "bad"}),
    "ce_index": (_ce_index, {"g", "loss"}),
    "ce_prob": (_ce_prob, {"g", "loss"}),
    "kl_logits": (_kl_logits, {"g", "out"}),
    "bce": (_bce, {"out", "partial", "bad"}),
    "eval_stats": (_eval_stats, {"st", "top"}),
    "bce_logits": (_bce_logits, {"g", "out", "partial"}),
}

_lock = threading.Lock()
_dispatchers = {}
_entry_points = {}


def _driver(name):
    """(python function, names of the arguments it writes) for driver ``name``."""
    entry = _DRIVERS.get(name)
    if entry is None and name.startswith("ce_small"):
        c, flags = name[8:].split("_")
        entry = _DRIVERS[name] = (_make_ce_small(int(c), *(f == "1" for f in flags)),
                                  {"g", "loss"})
    return entry


def _dispatcher(name, parallel):
    key = (name, parallel)
    disp = _dispatchers.get(key)
    if disp is None:
        func, _ = _driver(name)
        # Numba names a cache entry after the function and stamps it with its own file
        # only.  The name carries the threading mode (the index does not tell serial and
        # parallel builds apart) and a digest of every kernel source file, so that a
        # change to any helper compiles afresh instead of loading stale machine code.
        cname = f"{func.__name__}_{'parallel' if parallel else 'serial'}_{_source_digest()}"
        code = func.__code__.replace(co_name=cname)
        if hasattr(code, "co_qualname"):
            code = code.replace(co_qualname=cname)
        func = FunctionType(code, func.__globals__, cname, None, func.__closure__)
        func.__qualname__ = cname
        opts = dict(JIT)
        opts.update(parallel=parallel, cache=True)
        try:
            disp = njit(**opts)(func)
        except RuntimeError as e:  # no writable cache location: compile every process
            if "cannot cache" not in str(e):
                raise
            _warn_no_cache(e)
            opts.update(cache=False)
            disp = njit(**opts)(func)
        _dispatchers[key] = disp
    return disp


_warned_no_cache = False


def _warn_no_cache(err):
    global _warned_no_cache
    if not _warned_no_cache:
        _warned_no_cache = True
        import warnings

        warnings.warn(f"xent_fast: kernels are compiled without an on-disk cache ({err}); "
                      "set NUMBA_CACHE_DIR to a writable folder to keep them between "
                      "processes", RuntimeWarning, stacklevel=4)


def _numba_type(value, writable):
    if isinstance(value, np.ndarray):
        layout = "C" if value.flags.c_contiguous else "A"
        return types.Array(from_dtype(value.dtype), value.ndim, layout, readonly=not writable)
    if isinstance(value, (bool, np.bool_)):
        return types.boolean
    if isinstance(value, (int, np.integer)):
        return types.int64
    return types.float64


def _signature(name, args):
    func, outs = _driver(name)
    names = func.__code__.co_varnames[:func.__code__.co_argcount]
    return tuple(_numba_type(a, n in outs) for n, a in zip(names, args))


def _key(args):
    # Scalars are typed by position (the API passes each as bool, int or float always),
    # so only arrays vary the signature.
    return tuple([(a.dtype.num, a.ndim, a.flags.c_contiguous) if type(a) is np.ndarray
                  else type(a) for a in args])


def _compile(disp, sig):
    """Compile ``sig``, recovering from a corrupt on-disk cache by rebuilding it."""
    try:
        disp.compile(sig)
    except TypingError:
        raise
    except Exception:  # unreadable cache file: drop the cache and compile afresh
        cache = getattr(disp, "_cache", None)
        if cache is not None:
            _remove_cache_files(cache)
        disp.compile(sig)
    return disp.overloads[sig].entry_point


def _source_digest():
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        here = os.path.dirname(os.path.abspath(__file__))
        for mod in _KERNEL_SOURCES:
            with open(os.path.join(here, mod), "rb") as fh:
                h.update(fh.read())
        h.update(b"simd" if _simd.ENABLED else b"scalar")  # XENT_FAST_SIMD=0 builds apart
        _digest = h.hexdigest()[:12]
    return _digest


_KERNEL_SOURCES = ("_scalar.py", "_simd.py", "_rows.py", "_rowio.py", "_evalrows.py", "_backend_cpu.py")
_digest = None


def _remove_cache_files(cache):
    """Delete this module's cache files (only the drivers are cached)."""
    path = getattr(cache, "_cache_path", None)
    if not path or not os.path.isdir(path):
        return
    for fname in os.listdir(path):
        if fname.startswith("_backend_cpu.") and fname.endswith((".nbi", ".nbc")):
            try:
                os.remove(os.path.join(path, fname))
            except OSError:
                pass


def run(name, parallel, *args):
    """Call driver ``name`` on ``args`` (all prepared by the API layer)."""
    key = (name, parallel, _key(args))
    fn = _entry_points.get(key)
    if fn is None:
        with _lock:
            fn = _entry_points.get(key)
            if fn is None:
                disp = _dispatcher(name, parallel)
                fn = _compile(disp, _signature(name, args))
                _entry_points[key] = fn
    if parallel:
        with _threads.guard():
            return fn(*args)
    return fn(*args)


def num_threads():
    return _threads.num_threads()
