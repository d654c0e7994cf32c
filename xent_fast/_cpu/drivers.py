"""CPU drivers: batch the row kernels over rows, serially or on threads.

Each driver is a plain Python function over 2-D arrays (rows x classes) that
``backend.py`` compiles twice: ``parallel=False`` for the ``"cpu"`` backend and
``parallel=True`` for ``"parallel"``, where ``prange`` spreads blocks of rows over Numba's
thread pool.  Rows are handed out in ``nblocks`` contiguous blocks so that work buffers
are allocated once per block, not once per row.  Only unit-stride rows vectorise: the
backend hands over C-contiguous row arrays (copying strided ones).
"""

import numpy as np
from numba import prange

from .eval_rows import eval_row, row_topk
from .reduce import row_logsumexp
from .row_access import (block_bounds, grad_row, half_work_row, load_row, row_at,
                         store_grad_row, task_bounds, work_row)
from .rows import (bce_logits_row, bce_row, ce_index_row, ce_prob_row, dist_row, first_bad_prob,
                   kl_logits_row, row_softmax, row_sum, softcap_grad_row, softcap_row)


# ---------------------------------------------------------------------------- drivers
_STREAM_BYTES = 1 << 25  # 32 MiB


def logsumexp(x, hk, out, nblocks):
    n, c = x.shape
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        for i in range(lo, hi):
            out[i] = row_logsumexp(load_row(row_at(x, i), work, hk))


def softmax(x, hk, log, out, nblocks):
    n, c = x.shape
    for b in prange(nblocks):
        lo, hi = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        for i in range(lo, hi):
            row_softmax(load_row(row_at(x, i), work, hk), row_at(out, i), log)


def dist(p, phk, q, qhk, mode, out, bad, nblocks):
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


def ce_index(x, hk, t, w, has_w, wsum, eps, z, cap, ignore, gscale, want_grad, g, ghk,
              loss, nblocks):
    n, c = x.shape
    # Non-temporal gradient stores (see rows._ce_grad_stream) only where the gradient
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


def ce_prob(x, hk, p, phk, w, has_w, eps, z, cap, gscale, want_grad, g, ghk, loss, nblocks):
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


def kl_logits(x, hk, xt, thk, inv_t, gscale, want_grad, g, ghk, out, nblocks):
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


def eval_stats(x, hk, t, lo, count, st, top, nblocks):
    """Per-row evaluation statistics (see eval_rows.py) of rows ``x``, classes ``lo ..``;
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


def bce(p, phk, y, yhk, w, has_w, keep, colblock, out, partial, bad):
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
        partial[task] = row_sum(orow)


def bce_logits(x, hk, y, yhk, w, has_w, pw, has_pw, gscale, want_grad, g, ghk, keep,
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
        partial[task] = row_sum(orow)


def targets(t, c, ignore, w, has_w):
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
