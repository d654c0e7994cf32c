"""CPU drivers: batch the row kernels over rows, serially or on threads.

Each driver is a plain Python function over 2-D arrays (rows x classes) that does one
block of rows: block ``b`` of ``nblocks`` contiguous blocks (the elementwise drivers:
of tasks), so that work buffers are allocated once per block, not once per row.
``backend.py`` compiles a driver once, serially; the ``"cpu"`` backend calls it with
the whole batch as one block, and the ``"parallel"`` backend through
:func:`parallel_blocks`, a ``prange`` over the blocks that calls it, compiled beside it.
The row code is then compiled once for both backends, and Numba's parallel passes only
ever see that one loop, not a driver's inlined rows.  Only unit-stride rows vectorise:
the backend hands over C-contiguous row arrays (copying strided ones).
"""

import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .eval_rows import eval_row, row_topk
from .mathfns import imax, imin
from .reduce import row_logsumexp
from .row_access import (block_bounds, grad_row, half_work_row, load_row, row_at,
                         store_grad_row, task_bounds, unit_slice, work_row)
from .rows import (bce_logits_row, bce_row, ce_index_row, ce_prob_row, dist_row, first_bad_prob,
                   jsd_row, kl_logits_row, pointwise_row, row_softmax, sparse_kd_row, row_sum, softcap_grad_row, softcap_row)


# ---------------------------------------------------------------------------- drivers
_STREAM_BYTES = 1 << 25  # 32 MiB


@intrinsic
def call_block(typingctx, kernel, args, b):
    """Call the compiled driver whose native function is at address ``kernel`` on
    ``*args, b``.  A call through the address, not a link: the thread loop's module
    holds only itself, so its compile neither types nor optimises the driver again."""
    if not (isinstance(kernel, types.Integer) and isinstance(args, types.BaseTuple)):
        return None
    argtys = tuple(args.types) + (b,)

    def codegen(context, builder, sig, llargs):
        addr, tup, bv = llargs
        fnty = context.call_conv.get_function_type(types.none, argtys)
        fn = builder.inttoptr(addr, fnty.as_pointer())
        vals = [builder.extract_value(tup, i) for i in range(len(args.types))] + [bv]
        status, _ = context.call_conv.call_function(builder, fn, types.none, argtys, vals)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(kernel, args, b), codegen


def parallel_blocks(kernel, args):
    """Run the driver at address ``kernel`` on every block of ``args`` (its arguments,
    the block count last) on Numba's threads."""
    nblocks = args[-1]
    for b in prange(nblocks):
        call_block(kernel, args, np.int64(b))


def _variant(drv, want_grad, stream=False):
    """Name a driver built by a ``make_*`` factory after its variant.

    Drivers that can write a gradient are built twice, with ``want_grad`` a constant
    of the closure: Numba then drops the branch that is not taken before typing it, so
    that a forward call never compiles the gradient code, and the cache keeps the two
    apart by name.  ``stream``: the variant for gradients large enough to stream."""
    suffix = ("_grad" if want_grad else "") + ("_stream" if stream else "")
    drv.__name__ = drv.__qualname__ = drv.__name__ + suffix
    return drv


def logsumexp(x, hk, out, nblocks, b):
    n, c = x.shape
    lo, hi = block_bounds(b, nblocks, n)
    work = half_work_row(x, c)
    for i in range(lo, hi):
        out[i] = row_logsumexp(load_row(row_at(x, i), work, hk))


def make_softmax(log):
    """The softmax driver, or with ``log`` the log_softmax one: a compile-time constant,
    so that each compiles only its own way of finishing a row."""

    def softmax(x, hk, out, nblocks, b):
        n, c = x.shape
        lo, hi = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        for i in range(lo, hi):
            row_softmax(load_row(row_at(x, i), work, hk), row_at(out, i), log)

    if log:
        softmax.__name__ = softmax.__qualname__ = "log_softmax"
    return softmax


def dist(p, phk, q, qhk, mode, out, bad, nblocks, b):
    n, c = p.shape
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


def streams(cap, ghk, g, forced=False):
    """Does a gradient ``g`` go out with non-temporal stores (see rows._ce_grad_stream)?
    Only where it is the output itself and larger than the caches (or ``forced``): a
    smaller one is better left in cache for whatever reads it next."""
    return cap == 0 and ghk == 0 and (forced or g.size * g.itemsize >= _STREAM_BYTES)


def make_ce_index(want_grad, stream=False):
    """The ce_index driver with ``want_grad`` a compile-time constant.  ``stream``: the
    gradient variant that streams (the backend runs it where :func:`streams`), also a
    constant, so that the others do not compile the streaming path (nor the one-pass
    forward it follows)."""

    def ce_index(x, hk, t, w, has_w, wsum, eps, z, cap, ignore, gscale, g, ghk, loss,
                 nblocks, b):
        n, c = x.shape
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
    return _variant(ce_index, want_grad, stream)


def make_ce_prob(want_grad):
    """The ce_prob driver with ``want_grad`` a compile-time constant."""

    def ce_prob(x, hk, p, phk, w, has_w, eps, z, cap, gscale, g, ghk, loss, nblocks, b):
        n, c = x.shape
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
    return _variant(ce_prob, want_grad)


def make_kl_logits(want_grad):
    """The kl_logits driver with ``want_grad`` a compile-time constant."""

    def kl_logits(x, hk, xt, thk, inv_t, gscale, g, ghk, out, nblocks, b):
        n, c = x.shape
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
    return _variant(kl_logits, want_grad)



def make_jsd(want_grad):
    """The jsd driver with ``want_grad`` a compile-time constant; rows whose ``keep`` is 0
    (an empty ``keep``: none) give 0 and a zero gradient."""

    def jsd(x, hk, xt, thk, keep, inv_t, beta, mode, gscale, g, ghk, out, nblocks, b):
        n, c = x.shape
        lo, hi = block_bounds(b, nblocks, n)
        masked = keep.shape[0] > 0
        work = half_work_row(x, c)
        twork = half_work_row(xt, c)
        gwork = half_work_row(g, c if want_grad else 0)
        e = work_row(x, c)
        f = work_row(x, c)
        for i in range(lo, hi):
            if masked and keep[i] == 0:
                out[i] = 0.0
                if want_grad:
                    grow = row_at(g, i)
                    for j in range(c):
                        grow[j] = 0
                continue
            y = load_row(row_at(x, i), work, hk)
            yt = load_row(row_at(xt, i), twork, thk)
            if want_grad:
                gr = grad_row(row_at(g, i), gwork)
                out[i] = jsd_row(y, yt, inv_t, beta, mode, e, f, gr, True, gscale)
                store_grad_row(row_at(g, i), gr, ghk)
            else:
                out[i] = jsd_row(y, yt, inv_t, beta, mode, e, f, gwork, False, gscale)
    return _variant(jsd, want_grad)


def make_sparse_kd(want_grad):
    """The sparse-target driver (see rows.sparse_kd_row) with ``want_grad`` a
    compile-time constant: ``idx``, ``v`` (n, k) int64 and float64 rows."""

    def sparse_kd(x, hk, idx, v, inv_t, mode, gscale, g, ghk, out, nblocks, b):
        n, c = x.shape
        k = idx.shape[1]
        lo, hi = block_bounds(b, nblocks, n)
        work = half_work_row(x, c)
        gwork = half_work_row(g, c if want_grad else 0)
        pk = np.empty(k)
        lqk = np.empty(k)
        for i in range(lo, hi):
            y = load_row(row_at(x, i), work, hk)
            if want_grad:
                gr = grad_row(row_at(g, i), gwork)
                out[i] = sparse_kd_row(y, idx[i], v[i], inv_t, mode, pk, lqk, gr, True,
                                       gscale)
                store_grad_row(row_at(g, i), gr, ghk)
            else:
                out[i] = sparse_kd_row(y, idx[i], v[i], inv_t, mode, pk, lqk, gwork, False,
                                       gscale)
    return _variant(sparse_kd, want_grad)

def eval_stats(x, hk, t, lo, count, st, top, nblocks, b):
    """Per-row evaluation statistics (see eval_rows.py) of rows ``x``, classes ``lo ..``;
    with a non-empty ``top`` also each row's ``top.shape[1]`` largest logits."""
    n, c = x.shape
    k = top.shape[1]
    lo_r, hi_r = block_bounds(b, nblocks, n)
    work = half_work_row(x, c)
    for i in range(lo_r, hi_r):
        y = load_row(row_at(x, i), work, hk)
        eval_row(y, t[i], lo, count, row_at(st, i))
        if k > 0:
            row_topk(y, row_at(top, i))


def bce(p, phk, y, yhk, w, has_w, keep, colblock, out, partial, bad, nblocks, b):
    n, c = p.shape
    ncb = imax(1, (c + colblock - 1) // colblock)
    t_lo, t_hi = block_bounds(b, nblocks, n * ncb)
    for task in range(t_lo, t_hi):
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
        bce_row(pr, yr, unit_slice(w, i, lo, hi, has_w), has_w, orow)
        partial[task] = row_sum(orow)


def _make_elementwise(task_row, name, want_grad):
    """An elementwise driver: tasks of ``colblock`` columns of a row, each read (widened
    from half precision where it is stored so), handed with its row ``i`` and columns
    ``lo:hi`` to ``task_row`` (rows.bce_logits_row, rows.pointwise_row) with the options
    ``o1 .. o4``, and summed into ``partial``; ``want_grad`` a compile-time constant."""

    def drv(x, hk, y, yhk, o1, o2, o3, o4, gscale, g, ghk, keep, colblock, out, partial,
            nblocks, b):
        n, c = x.shape
        ncb = imax(1, (c + colblock - 1) // colblock)
        t_lo, t_hi = block_bounds(b, nblocks, n * ncb)
        for task in range(t_lo, t_hi):
            i, lo, hi = task_bounds(task, ncb, colblock, c)
            xw = half_work_row(x, hi - lo)
            yw = half_work_row(y, hi - lo)
            ow = work_row(x, hi - lo if not keep else 0)
            xr = load_row(x[i, lo:hi], xw, hk)
            yr = load_row(y[i, lo:hi], yw, yhk)
            orow = out[i, lo:hi] if keep else ow
            if want_grad:
                gw = half_work_row(g, hi - lo)
                gr = grad_row(g[i, lo:hi], gw)
                task_row(xr, yr, i, lo, hi, o1, o2, o3, o4, orow, gr, True, gscale)
                store_grad_row(g[i, lo:hi], gr, ghk)
            else:
                task_row(xr, yr, i, lo, hi, o1, o2, o3, o4, orow, ow, False, gscale)
            partial[task] = row_sum(orow)

    drv.__name__ = drv.__qualname__ = name
    return _variant(drv, want_grad)


def make_bce_logits(want_grad):
    """The bce_logits driver: options ``w, has_w, pw, has_pw``."""
    return _make_elementwise(bce_logits_row, "bce_logits", want_grad)


def make_pointwise(want_grad):
    """The driver of rows.pointwise_row (focal loss, kl_div): options ``mode, alpha,
    gamma`` and an unused fourth."""
    return _make_elementwise(pointwise_row, "pointwise", want_grad)


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
            den += w[imin(imax(ti, 0), c - 1)] if kept else 0.0
        else:
            den += 1.0 if kept else 0.0
    if nbad:
        for i in range(t.shape[0]):
            ti = t[i]
            if ti != ignore and (ti < 0 or ti >= c):
                return i, den
    return -1, den
