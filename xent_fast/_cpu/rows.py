"""Row kernels: the math for one row (one distribution along the class axis).

Plain loops over 1-D slices, no allocation, no globals but constants.  A row here is a
float32 or float64 array; half-precision rows are widened by the backends before they
arrive.  Sums of exponentials run in the row's own precision in chunks of ``CHUNK``
columns and are added into a float64 total, which vectorises and keeps the relative
error of a row sum near 1e-10 in float32.

Conventions kept here (see SEMANTICS.md): an all ``-inf`` row has log-sum-exp ``-inf``,
any ``+inf`` gives ``+inf``, NaN propagates; a ``-inf`` logit that carries no target mass
contributes exactly 0 to losses and gradients.
"""

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from . import avx512 as _simd
from .mathfns import cast_like, fexp, flog, flog1p, fmax, imin
from .formulas import (bce_logits_grad, bce_logits_loss, ce_grad_scale, ce_index_grad_terms,
                       ce_index_loss, ce_index_mass, ce_prob_loss, kl_finish,
                       kl_finish_logs, kl_grad_scales, log_split, nll_from)
from .jit import INLINE, JIT
from .row_access import unit_slice
from .reduce import (AHEAD, CHUNK, CONCENTRATED, SIMD_CHUNK, SIMD_ONE_PASS_MIN,
                     less_one, log_mass_split, log_mass_split_exps, lse_from,
                     row_exp_store, row_max, row_max_sumexp, row_split_exps, row_split_scaled,
                     row_split_times, shift2, shift_scale, tiny_log, vrescale)


@njit(**JIT)
def row_softmax(x, out, log):
    """softmax (or log_softmax when ``log``) of ``x`` into ``out``.

    Written as exp(x - m) / s and (x - m) - log s: x - lse would lose the low bits of
    log s when |x| is large.
    """
    m, s = row_max_sumexp(x)
    if m == -np.inf or m == np.inf:
        # All -inf: 0/0, NaN throughout (as SciPy).  A +inf entry: inf/inf, so NaN
        # throughout too (as SciPy and PyTorch), not NaN there and 0 beside it.
        c = cast_like(np.nan if m == np.inf else lse_from(x, m, 0.0), out)
        for j in range(x.shape[0]):
            out[j] = x[j] - c if log else fexp(x[j] - c)
        return
    mm = cast_like(m, out)
    if log:
        ls = math.log(s)
        if s < CONCENTRATED and ls < tiny_log(x):  # the max's own log-probability
            ls = log_mass_split(x, m)
        shift2(x, mm, cast_like(ls, out), out)
    else:
        inv = cast_like(1.0 / s, out)
        for j in range(x.shape[0]):
            out[j] = fexp(x[j] - mm) * inv


@njit(**JIT)
def _row_dot_about(w, has_w, y, pivot):
    """sum(w * (y - pivot)) (w = 1 without ``has_w``) in float64: the differences in
    float64 too, so a float32 row's cannot overflow."""
    n = y.shape[0]
    total = 0.0
    for lo in range(0, n, CHUNK):
        hi = imin(lo + CHUNK, n)
        sy = y[lo:hi]
        s = 0.0
        if has_w:
            sw = w[lo:hi]
            for j in range(sy.shape[0]):  # a weight of 0 is no mass, even at y = -inf
                s += np.float64(sw[j]) * (np.float64(sy[j]) - pivot) if sw[j] != 0 else 0.0
        else:
            for j in range(sy.shape[0]):
                s += np.float64(sy[j]) - pivot
        total += s
    return total


# ---------------------------------------------------------------------------- softmax CE
@njit(**INLINE)
def _row_max_lse(y, gr, want_grad, known_max=None):
    """(max m, sum s of exp(y - m), log s, log-sum-exp); exps stored into ``gr`` if wanted.

    Forward only: one read of the row (online max).  With a gradient: a max pass (none
    when the caller has ``known_max``, the row's max), then an exp pass that writes each
    exp once into ``gr`` while the row is in cache.  For a row whose max is infinite,
    log s is NaN and the lse follows SEMANTICS.md.
    """
    if not want_grad:
        m, s = row_max_sumexp(y)
    else:
        if known_max is None:
            m = row_max(y)
        else:
            m = known_max
        if m == -np.inf or m == np.inf:
            for j in range(gr.shape[0]):
                gr[j] = np.nan  # softmax is undefined on this row
            s = 0.0
        else:
            s = row_exp_store(y, m, gr)
    if m == -np.inf or m == np.inf:
        return m, s, np.nan, lse_from(y, m, 0.0)
    ls = math.log(s)
    return m, s, ls, float(m) + ls


@njit(**INLINE)
def _ce_grad_stream_scalar(y, gr, m, k, ke):
    for j in range(y.shape[0]):
        gr[j] = k * fexp(y[j] - m) - ke


@njit(**INLINE)
def _ce_grad_stream_simd(y, gr, m, k, ke):
    """gr = k exp(y - m) - ke, read from ``y`` (in cache after the one-pass sum) and
    written with non-temporal stores: a gradient row that is not read again goes to
    memory without the read-for-ownership a plain store makes (a third of the traffic
    of a forward+backward).  ``gr`` may be ``y``."""
    n = y.shape[0]
    lanes = _simd.lanes_of(y)
    addr = gr.ctypes.data
    head = ((64 - addr % 64) % 64) // gr.itemsize if addr % gr.itemsize == 0 else n
    if n < head + 2 * lanes:
        _ce_grad_stream_scalar(y, gr, m, k, ke)
        return
    mv = _simd.vsplat(m)
    kv = _simd.vsplat(k)
    kev = _simd.vsplat(ke)
    # The first and last whole vectors are computed first (``gr`` may be ``y``) and
    # stored last with plain stores, over the unaligned head and the partial tail.
    first = _simd.vsub(_simd.vmul(kv, _simd.vexp(_simd.vload(y, 0), mv)), kev)
    last = _simd.vsub(_simd.vmul(kv, _simd.vexp(_simd.vload(y, n - lanes), mv)), kev)
    end = head + (n - head) // lanes * lanes
    for j in range(head, end, lanes):
        e = _simd.vexp(_simd.vload(y, j), mv)
        _simd.vstore_stream(gr, j, _simd.vsub(_simd.vmul(kv, e), kev))
    _simd.store_fence()
    _simd.vstore(gr, 0, first)
    _simd.vstore(gr, n - lanes, last)


def _stream_ok(y, gr):
    return _simd.usable(y) and _simd.usable(gr) and y.dtype == gr.dtype


def _streams(y, gr):
    """At typing time: can the gradient be written by _ce_grad_stream_simd?"""


@overload(_streams, jit_options=INLINE)
def _streams_ov(y, gr):
    ok = _stream_ok(y, gr)
    return lambda y, gr: ok


def _ce_grad_stream(y, gr, m, k, ke):
    """gr = k exp(y - m) - ke: streamed where _streams(y, gr), else a plain loop."""


@overload(_ce_grad_stream, jit_options=INLINE)
def _ce_grad_stream_ov(y, gr, m, k, ke):
    if _stream_ok(y, gr):
        return lambda y, gr, m, k, ke: _ce_grad_stream_simd(y, gr, m, k, ke)
    return lambda y, gr, m, k, ke: _ce_grad_stream_scalar(y, gr, m, k, ke)


@njit(**JIT)
def ce_index_row(y, t, w, has_w, wsum, eps, z, gr, want_grad, gscale, stream=False):
    """Softmax cross-entropy of one row with class index ``t``.

    loss = (1-eps) w_t (lse - y_t) + eps/C sum_c w_c (lse - y_c) + z lse^2.
    With ``want_grad`` writes ``gscale * dloss/dy`` into ``gr`` (which may be ``y``
    itself: everything read from ``y`` is read before ``gr`` is written).
    """
    C = y.shape[0]
    w_t = w[t] if has_w else 1.0
    y_t = float(y[t])
    # sum_c w_c (y_c - y_t): about the target, so that it neither overflows nor
    # cancels at huge logits (sum_c w_c y_c did both)
    pivot = y_t if abs(y_t) < np.inf else 0.0
    wy = 0.0
    if eps > 0.0:
        wy = _row_dot_about(w, has_w, y, pivot)
    # ``stream``: ``gr`` is the caller's output row, not read again here; then the
    # gradient is written in one pass after a one-pass forward (see _ce_grad_stream).
    # (a constant False ``stream`` drops the streaming code before typing: see
    # drivers.make_ce_index)
    fast = False
    if stream:
        fast = want_grad and not has_w and _streams(y, gr) and C >= 64
    if fast:
        m, s, ls, lse = _row_max_lse(y, gr, False)
    else:
        m, s, ls, lse = _row_max_lse(y, gr, want_grad)
    # lse - y_t as log(s) - (y_t - m): exact even where lse and y_t are ~1e38
    fm = float(m)
    finite = m != np.inf and m != -np.inf
    nll = nll_from(ls, y_t, fm) if finite else lse - y_t
    if finite and s < CONCENTRATED and nll < tiny_log(y):
        # a confident right prediction: its loss is log s, recomputed to keep its digits
        # (from the stored exps where the gradient pass has written them, maybe over y)
        ls = log_mass_split_exps(gr) if want_grad and not fast else log_mass_split(y, m)
        nll = nll_from(ls, y_t, fm)
        lse = fm + ls
    # sum_c w_c (lse - y_c) = wsum (lse - pivot) - wy, where lse - y_t is nll; a target
    # of weight 0 carries no mass: exactly 0, even where its logit is -inf
    loss = ce_index_loss(nll, nll if pivot == y_t else lse, wy, wsum, lse == -np.inf, w_t,
                         eps, C, z, lse)
    if want_grad:
        k = cast_like(ce_grad_scale(ce_index_mass(w_t, wsum, eps, C), z, lse, s, gscale), gr)
        ke64, kt64 = ce_index_grad_terms(w_t, eps, C, gscale)
        if fast and finite:
            _ce_grad_stream(y, gr, cast_like(m, gr), k, cast_like(ke64, gr))
            gr[t] -= cast_like(kt64, gr)
            return loss
        if fast:  # an infinite max: softmax is undefined on this row
            for j in range(C):
                gr[j] = np.nan
        if eps > 0.0:
            ke = cast_like(ke64, gr)
            if has_w:
                for j in range(C):
                    gr[j] = k * gr[j] - ke * w[j]
            else:
                for j in range(C):
                    gr[j] = k * gr[j] - ke
        else:
            for j in range(C):
                gr[j] = k * gr[j]
        gr[t] -= cast_like(kt64, gr)
    return loss


@njit(**JIT)
def row_sum(y):
    n = y.shape[0]
    total = 0.0
    for lo in range(0, n, CHUNK):
        seg = y[lo:imin(lo + CHUNK, n)]
        s = cast_like(0.0, seg)
        for j in range(seg.shape[0]):
            s += seg[j]
        total += s
    return total


@njit(**JIT)
def _prob_dot_about(y, p, w, has_w, eps, piv):
    """sum_c a_c (y_c - piv), a_c = ((1-eps) p_c + eps/C) w_c, all in float64."""
    C = y.shape[0]
    cs = eps / C
    total = 0.0
    for j in range(C):
        a = (1.0 - eps) * np.float64(p[j]) + cs
        if has_w:
            a *= np.float64(w[j])
        total += a * (np.float64(y[j]) - piv) if a != 0.0 else 0.0
    return total


@njit(**JIT)
def ce_prob_row(y, p, w, has_w, eps, z, gr, want_grad, gscale):
    """Softmax cross-entropy of one row against target probabilities ``p``.

    a_c = ((1-eps) p_c + eps/C) w_c;  loss = sum_c a_c (lse - y_c) + z lse^2, where a
    term with a_c = 0 is 0 even at y_c = -inf.  ``gr`` may be ``y`` itself.
    """
    C = y.shape[0]
    zero = cast_like(0.0, y)
    ce = cast_like(1.0 - eps, y)
    cs = cast_like(eps / C, y) if C > 0 else zero
    # ay = sum_c a_c (y_c - piv) about the row max: every term has one sign, so it
    # neither cancels nor overflows (sum_c a_c y_c lost 1e-5 of the loss at logits
    # near 1e4 in float32, and everything near the largest float)
    mrow = row_max(y)
    piv = mrow if abs(mrow) < np.inf else zero
    a_tot = 0.0
    ay = 0.0
    for lo in range(0, C, CHUNK):
        hi = imin(lo + CHUNK, C)
        sy = y[lo:hi]
        sp = p[lo:hi]
        sa = zero
        say = zero
        if has_w:
            sw = w[lo:hi]
            for j in range(sy.shape[0]):
                a = (ce * sp[j] + cs) * sw[j]
                sa += a
                say += a * (sy[j] - piv) if a != zero else zero
        else:
            for j in range(sy.shape[0]):
                a = ce * sp[j] + cs
                sa += a
                say += a * (sy[j] - piv) if a != zero else zero
        a_tot += sa
        ay += say
    if not (abs(ay) < np.inf) and abs(mrow) < np.inf:
        # y_c - piv overflowed the row's precision (logits near +-2e38 in float32), or a
        # target class has a -inf logit: again in float64, which tells the two apart
        ay = _prob_dot_about(y, p, w, has_w, eps, np.float64(piv))
    m, s, ls, lse = _row_max_lse(y, gr, want_grad, mrow)
    # a confident row whose targets sit on its max: the loss a log s - ay (ay <= 0 about
    # the max) is then mostly log s, recomputed to keep its digits (from the stored exps
    # where the gradient pass has written them, maybe over y), as ce_index_row does
    if (s < CONCENTRATED and ls < tiny_log(y) and abs(mrow) < np.inf
            and a_tot * ls - ay < tiny_log(y) * a_tot):
        ls = log_mass_split_exps(gr) if want_grad else log_mass_split(y, m)
        lse = float(m) + ls
    loss = ce_prob_loss(a_tot, ay, float(piv), float(m), ls, lse, z)
    if want_grad:
        k = cast_like(ce_grad_scale(a_tot, z, lse, s, gscale), gr)
        g = cast_like(gscale, gr)
        if has_w:
            for j in range(C):
                gr[j] = k * gr[j] - g * ((ce * p[j] + cs) * w[j])
        else:
            for j in range(C):
                gr[j] = k * gr[j] - g * (ce * p[j] + cs)
    return loss


@njit(**JIT)
def softcap_row(x, cap, out):
    """out = cap * tanh(x / cap) (Gemma 2's logit soft-capping)."""
    c = cast_like(cap, out)
    ic = cast_like(1.0 / cap, out)
    for j in range(x.shape[0]):
        out[j] = c * math.tanh(x[j] * ic)


@njit(**JIT)
def softcap_grad_row(y, cap, gr):
    """Chain rule through the soft cap: d(cap tanh(x/cap))/dx = 1 - (y/cap)^2."""
    ic = cast_like(1.0 / cap, gr)
    one = cast_like(1.0, gr)
    for j in range(y.shape[0]):
        u = y[j] * ic
        gr[j] = gr[j] * (one - u * u)


# ---------------------------------------------------------------------------- distillation KL
@njit(**INLINE)
def _kl_chunk_scalar(sx, sxt, it, ms, mt):
    """(sum e_s, sum e_t, sum e_t (v_t - v_s)) over a chunk, e = exp(v - max)."""
    zero = it - it
    a = zero
    b = zero
    c = zero
    for j in range(sx.shape[0]):
        vs = sx[j] * it
        vt = sxt[j] * it
        es = fexp(vs - ms)
        et = fexp(vt - mt)
        a += es
        b += et
        c += et * (vt - vs) if et != zero else zero
    return a, b, c


@njit(**INLINE)
def _kl_chunk_simd(sx, sxt, it, ms, mt):
    n = sx.shape[0]
    lanes = _simd.lanes_of(sx)
    main = n - n % lanes
    itv = _simd.vsplat(it)
    msv = _simd.vsplat(ms)
    mtv = _simd.vsplat(mt)
    va = _simd.vsplat(it - it)
    vb = va
    vc = va
    for j in range(0, main, lanes):
        vs = _simd.vmul(_simd.vload(sx, j), itv)
        vt = _simd.vmul(_simd.vload(sxt, j), itv)
        es = _simd.vexp(vs, msv)
        et = _simd.vexp(vt, mtv)
        va = _simd.vadd(va, es)
        vb = _simd.vadd(vb, et)
        vc = _simd.vkl_acc(vc, et, vt, vs)
    a, b, c = _kl_chunk_scalar(sx[main:], sxt[main:], it, ms, mt)
    return a + _simd.vsum(va), b + _simd.vsum(vb), c + _simd.vsum(vc)


def _kl_chunk(sx, sxt, it, ms, mt):
    """(sum e_s, sum e_t, sum e_t (v_t - v_s)) over a chunk, e = exp(v - max)."""


@overload(_kl_chunk, jit_options=INLINE)
def _kl_chunk_ov(sx, sxt, it, ms, mt):
    if _simd.usable(sx) and _simd.usable(sxt):
        return lambda sx, sxt, it, ms, mt: _kl_chunk_simd(sx, sxt, it, ms, mt)
    return lambda sx, sxt, it, ms, mt: _kl_chunk_scalar(sx, sxt, it, ms, mt)


@njit(**INLINE)
def _kl_one_pass_simd(x, xt, it):
    """(done, KL) in one read of both rows, as row_max_sumexp_simd does for one: lane
    maxima of x/T and xt/T per chunk, float64 lane sums rescaled when a max grows.
    Rows with an infinite max or an all -inf row are left to the two-pass kernel."""
    n = x.shape[0]
    lanes = _simd.lanes_of(x)
    zero = cast_like(0.0, x)
    itv = _simd.vsplat(it)
    Ms = _simd.vlowest(zero)
    Mt = Ms
    A = _simd.vzero_wide(zero)
    B = A
    D = A
    nv = n - n % lanes
    step = SIMD_CHUNK * lanes
    ahead = AHEAD * lanes
    for lo in range(0, nv, step):
        hi = imin(lo + step, nv)
        tail = hi == nv and nv < n  # the last lanes, as a vector ending at n
        cs = Ms
        ct = Mt
        for j in range(lo, hi, lanes):
            _simd.prefetch(x, j + ahead)
            _simd.prefetch(xt, j + ahead)
            cs = _simd.vmax(cs, _simd.vmul(_simd.vload(x, j), itv))
            ct = _simd.vmax(ct, _simd.vmul(_simd.vload(xt, j), itv))
        if tail:
            cs = _simd.vmax(cs, _simd.vmul(_simd.vload(x, n - lanes), itv))
            ct = _simd.vmax(ct, _simd.vmul(_simd.vload(xt, n - lanes), itv))
        if _simd.vany_gt(cs, Ms):
            A = vrescale(A, Ms, cs)
            Ms = cs
        if _simd.vany_gt(ct, Mt):
            f = _simd.vwiden(_simd.vexp(Mt, ct))
            B = _simd.vmul(B, f)
            D = _simd.vmul(D, f)
            Mt = ct
        a = _simd.vsplat(zero)
        b = a
        c = a
        for j in range(lo, hi, lanes):
            vs = _simd.vmul(_simd.vload(x, j), itv)
            vt = _simd.vmul(_simd.vload(xt, j), itv)
            et = _simd.vexp(vt, Mt)
            a = _simd.vadd(a, _simd.vexp(vs, Ms))
            b = _simd.vadd(b, et)
            c = _simd.vkl_acc(c, et, vt, vs)
        if tail:
            skip = lanes - (n - nv)
            vs = _simd.vmul(_simd.vload(x, n - lanes), itv)
            vt = _simd.vmul(_simd.vload(xt, n - lanes), itv)
            et = _simd.vmask_head(_simd.vexp(vt, Mt), skip)
            a = _simd.vadd(a, _simd.vmask_head(_simd.vexp(vs, Ms), skip))
            b = _simd.vadd(b, et)
            c = _simd.vkl_acc(c, et, vt, vs)
        A = _simd.vadd(A, _simd.vwiden(a))
        B = _simd.vadd(B, _simd.vwiden(b))
        D = _simd.vadd(D, _simd.vwiden(c))
    ms = _simd.vhmax(Ms)
    mt = _simd.vhmax(Mt)
    if not (abs(ms) < _KL_BIG and abs(mt) < _KL_BIG):  # inf, or x_t - x may overflow
        return False, 0.0
    ft = _simd.vwiden(_simd.vexp(Mt, _simd.vsplat(mt)))
    ss = _simd.vsum(_simd.vmul(A, _simd.vwiden(_simd.vexp(Ms, _simd.vsplat(ms)))))
    st = _simd.vsum(_simd.vmul(B, ft))
    d = _simd.vsum(_simd.vmul(D, ft))
    if ss == 0.0 or st == 0.0:  # an all -inf row
        return False, 0.0
    dm = float(ms) - float(mt)
    kl = kl_finish(d, ss, st, dm)
    if _kl_concentrated(ss, st, kl, x):  # both logs split, in one more read of the rows
        ks_, rs_ = row_split_times(x, ms, it)
        kt_, rt_ = row_split_times(xt, mt, it)
        kl = kl_finish_logs(d, st, dm, log_split(ks_, rs_), log_split(kt_, rt_))
    return True, kl


@njit(**INLINE)
def _kl_concentrated(ss, st, kl, x):
    """Nearly equal rows with a dominant max: log S_s - log S_t is then mostly the low
    digits that sums near 1 lose (KL([0, -40] || [0, -41]) came out -1.6e-18)."""
    return (ss < CONCENTRATED or st < CONCENTRATED) and abs(kl) < tiny_log(x)


_KL_BIG = 1e30  # beyond: x_t/T - x/T may overflow in the one pass; two passes instead


def _kl_one_pass(x, xt, it):
    """(done, KL): the one-pass vector kernel where it applies."""


@overload(_kl_one_pass, jit_options=INLINE)
def _kl_one_pass_ov(x, xt, it):
    if _simd.usable(x) and _simd.usable(xt) and x.dtype == xt.dtype:
        return lambda x, xt, it: _kl_one_pass_simd(x, xt, it)
    return lambda x, xt, it: (False, 0.0)


@njit(**JIT)
def kl_logits_row(x, xt, inv_t, gr, want_grad, gscale):
    """KL(softmax(xt/T) || softmax(x/T)) for one row, without forming either.

    With ``want_grad`` writes ``gscale * dKL/dx = gscale/T (softmax(x/T) - softmax(xt/T))``
    (``gr`` may be ``x`` itself: each element is read before it is written).

    Outside the one-pass forward, every logit is shifted by its row's max before the
    division by T, ``d = (x - max x)/T``: the max then gives exactly exp(0), whereas
    ``x/T - max/T`` (one multiply-add under "contract") keeps the rounding of max/T,
    which at 1e8 is a whole unit of the exponent.  With ``d_s``, ``d_t`` so,
    KL = sum e_t (d_t - d_s) / sum e_t + log(sum e_s) - log(sum e_t), which neither
    overflows nor loses the max's digits at the largest floats.
    """
    C = x.shape[0]
    it = cast_like(inv_t, x)
    if not want_grad and C >= SIMD_ONE_PASS_MIN:
        done, kl = _kl_one_pass(x, xt, it)
        if done:
            return kl
    if C == 0:
        return 0.0
    mx = row_max(x)
    mxt = row_max(xt)
    if not (abs(mx) < np.inf and abs(mxt) < np.inf):
        return _kl_infinite(gr, want_grad)
    zero = cast_like(0.0, x)
    st = 0.0
    ss = 0.0
    d = 0.0
    for lo in range(0, C, CHUNK):
        hi = imin(lo + CHUNK, C)
        sx = x[lo:hi]
        sxt = xt[lo:hi]
        a = zero
        b = zero
        c = zero
        if want_grad:
            sg = gr[lo:hi]
            for j in range(sx.shape[0]):
                ds = shift_scale(sx[j], mx, it)
                dt = shift_scale(sxt[j], mxt, it)
                es = fexp(ds)
                et = fexp(dt)
                sg[j] = es
                a += es
                b += et
                c += et * (dt - ds) if et != zero else zero
        else:
            for j in range(sx.shape[0]):
                ds = shift_scale(sx[j], mx, it)
                dt = shift_scale(sxt[j], mxt, it)
                es = fexp(ds)
                et = fexp(dt)
                a += es
                b += et
                c += et * (dt - ds) if et != zero else zero
        ss += a
        st += b
        d += c
    kl = kl_finish(d, ss, st, 0.0)  # d about each row's own max: no m_s - m_t
    if _kl_concentrated(ss, st, kl, x):  # both logs split (the exps of x are in gr)
        ks_, rs_ = row_split_exps(gr) if want_grad else row_split_scaled(x, mx, it)
        kt_, rt_ = row_split_scaled(xt, mxt, it)
        kl = kl_finish_logs(d, st, 0.0, log_split(ks_, rs_), log_split(kt_, rt_))
    if want_grad:
        ks64, kt64 = kl_grad_scales(gscale, inv_t, ss, st)
        ks = cast_like(ks64, gr)
        kt = cast_like(kt64, gr)
        for j in range(C):
            gr[j] = ks * gr[j] - kt * fexp(shift_scale(xt[j], mxt, it))
    return kl


@njit(**JIT)
def _kl_infinite(gr, want_grad):
    """A row with a +inf, an all -inf row or a NaN (either input): softmax is undefined
    there, so the KL and its gradient are NaN, as in the reference."""
    if want_grad:
        for j in range(gr.shape[0]):
            gr[j] = np.nan
    return np.nan



@njit(**JIT)
def _jsd_exps(x, mx, xt, mxt, it, e, f):
    """(sum e, sum f), storing e = exp((x - max x)/T) and f, the same of xt, in the work
    rows (float64 sums across chunks)."""
    C = x.shape[0]
    ss = 0.0
    st = 0.0
    for lo in range(0, C, CHUNK):
        hi = imin(lo + CHUNK, C)
        sx = x[lo:hi]
        sxt = xt[lo:hi]
        se = e[lo:hi]
        sf = f[lo:hi]
        a = cast_like(0.0, x)
        b = cast_like(0.0, x)
        for j in range(sx.shape[0]):
            ev = fexp(shift_scale(sx[j], mx, it))
            fv = fexp(shift_scale(sxt[j], mxt, it))
            se[j] = ev
            sf[j] = fv
            a += ev
            b += fv
        ss += a
        st += b
    return ss, st


@njit(**JIT)
def _jsd_terms(x, mx, lq0, iq, xt, mxt, lp0, ip, it, bc, lb, l1b, mode, e, f, want_grad):
    """(sum of the teacher's terms, sum of the student's terms) of one row from the
    stored exps (q = e/S_s, p = f/S_t), leaving in ``f`` what the gradient reads.

    Log-probabilities come from the logits (lq = (x - max)/T - log S_s, exact at -inf);
    mode 2 (0 < beta < 1) sums bp (lp - lm) and bq (lq - lm), bp = beta p,
    bq = (1-beta) q, lm = log(bp + bq), or exactly log(1-beta) + lq where bp is 0 and
    log beta + lp where bq is 0 (a one-hot row's terms cancel to exactly 0);
    mode 0 sums p (lp - lq), mode 1 q (lq - lp).  A term whose probability is 0 adds
    exactly 0 (a -inf logit).  One log an element: the exps are the stored ones."""
    C = x.shape[0]
    zero = cast_like(0.0, x)
    one = cast_like(1.0, x)
    ta = 0.0
    tb = 0.0
    for lo in range(0, C, CHUNK):
        hi = imin(lo + CHUNK, C)
        sx = x[lo:hi]
        sxt = xt[lo:hi]
        se = e[lo:hi]
        sf = f[lo:hi]
        a_ = zero
        b_ = zero
        if mode == 2:
            for j in range(sx.shape[0]):
                lq = shift_scale(sx[j], mx, it) - lq0
                lp = shift_scale(sxt[j], mxt, it) - lp0
                bp = bc * (sf[j] * ip)
                bq = (one - bc) * (se[j] * iq)
                m = bp + bq
                lm = lq + l1b if bp == zero else (lp + lb if bq == zero else flog(m))
                a_ += bp * (lp - lm) if bp != zero else zero
                b_ += bq * (lq - lm) if bq != zero else zero
                if want_grad:
                    sf[j] = lq - lm
        elif mode == 0:
            for j in range(sx.shape[0]):
                lq = shift_scale(sx[j], mx, it) - lq0
                lp = shift_scale(sxt[j], mxt, it) - lp0
                p = sf[j] * ip
                a_ += p * (lp - lq) if p != zero else zero
                if want_grad:
                    sf[j] = p
        else:
            for j in range(sx.shape[0]):
                lq = shift_scale(sx[j], mx, it) - lq0
                lp = shift_scale(sxt[j], mxt, it) - lp0
                q = se[j] * iq
                b_ += q * (lq - lp) if q != zero else zero
                if want_grad:
                    sf[j] = lq - lp
        ta += a_
        tb += b_
    return ta, tb


@njit(**JIT)
def _jsd_grad(e, iq, mode, k, scale, f, gr):
    """The gradient into ``gr`` (which may be the logits: they are not read here) from
    the stored exps and what _jsd_terms left in ``f``: mode 0 scale (q - p), ``f``
    holding p; else scale q (r - k), r = ``f`` the log-ratio, k its q-weighted mean (0
    where q is)."""
    zero = cast_like(0.0, gr)
    s = cast_like(scale, gr)
    kk = cast_like(k, gr)
    qs = cast_like(iq, gr)
    for j in range(gr.shape[0]):
        q = e[j] * qs
        if mode == 0:
            gr[j] = s * (q - f[j])
        else:
            gr[j] = s * (q * (f[j] - kk)) if q != zero else zero


@njit(**JIT)
def jsd_row(x, xt, inv_t, beta, mode, e, f, gr, want_grad, gscale):
    """Generalised Jensen-Shannon divergence of P = softmax(xt/T) and Q = softmax(x/T),
    beta KL(P||M) + (1-beta) KL(Q||M) with M = beta P + (1-beta) Q (``mode`` 2), or
    KL(P||Q) (mode 0, beta = 0) or KL(Q||P) (mode 1, beta = 1).

    A max read of each row, then one pass that stores both rows' exps in the work rows
    ``e``, ``f`` (C values each) while summing them, then the terms from the stored
    exps: two exps and one log an element.  With ``want_grad`` writes into ``gr``
    (which may be ``x``) ``gscale`` times the gradient with respect to ``x``,
    (1-beta)/T q (log q - log m - KL(Q||M)) (mode 0: (q - p)/T; mode 1: q (log q -
    log p - KL(Q||P))/T).  A row with a +inf, a NaN or all -inf (either input) gives
    NaN, as the KL."""
    C = x.shape[0]
    if C == 0:
        return 0.0
    it = cast_like(inv_t, x)
    mx = row_max(x)
    mxt = row_max(xt)
    if not (abs(mx) < np.inf and abs(mxt) < np.inf):
        return _kl_infinite(gr, want_grad)
    ss, st = _jsd_exps(x, mx, xt, mxt, it, e, f)
    lq0 = cast_like(math.log(ss), x)
    lp0 = cast_like(math.log(st), x)
    iq = cast_like(1.0 / ss, x)
    ip = cast_like(1.0 / st, x)
    bc = cast_like(beta, x)
    l1b = cast_like(math.log1p(-beta) if beta < 1 else 0.0, x)
    lb = cast_like(math.log(beta) if beta > 0 else 0.0, x)
    ta, tb = _jsd_terms(x, mx, lq0, iq, xt, mxt, lp0, ip, it, bc, lb, l1b, mode, e, f,
                        want_grad)
    loss = ta + tb
    if want_grad:
        if mode == 2:
            _jsd_grad(e, 1.0 / ss, mode, tb / (1.0 - beta), gscale * inv_t * (1.0 - beta), f,
                      gr)
        else:
            _jsd_grad(e, 1.0 / ss, mode, tb, gscale * inv_t, f, gr)
    return loss


@njit(**JIT)
def _scaled_sumexp(x, mx, it):
    """sum exp((x - max x)/T), in float64 across chunks."""
    C = x.shape[0]
    s = 0.0
    for lo in range(0, C, CHUNK):
        sx = x[lo:imin(lo + CHUNK, C)]
        a = cast_like(0.0, x)
        for j in range(sx.shape[0]):
            a += fexp(shift_scale(sx[j], mx, it))
        s += a
    return s


@njit(**JIT)
def sparse_kd_row(x, idx, v, inv_t, mode, pk, lqk, gr, want_grad, gscale):
    """The student softmax(x/T) against a target given on the classes ``idx`` (distinct)
    with values ``v``: mode 0 KL from the teacher's log-probabilities renormalised over
    the k at T, mode 1 KL with the teacher's remaining mass r = 1 - sum p on the other
    classes (+ r log(r / (1 - sum_k q))), mode 2 cross-entropy -sum v log q (``v``
    probabilities).  The student's log-normaliser costs two reads of the row, the k
    entries are gathered in float64 (``lqk``, ``pk``: work of k values).

    With ``want_grad`` writes ``gscale/T`` times the gradient into ``gr`` (which may be
    ``x``): a q everywhere, then at the k classes b q - p, where a = b = 1 (mode 0),
    a = 1 - r/(1 - sum_k q) and b = 1 (mode 1), a = b = sum p (mode 2)."""
    C = x.shape[0]
    k = idx.shape[0]
    if C == 0:
        return 0.0
    it = cast_like(inv_t, x)
    mx = row_max(x)
    if not abs(mx) < np.inf:
        return _kl_infinite(gr, want_grad)
    lq0 = math.log(_scaled_sumexp(x, mx, it))
    m64 = np.float64(mx)
    for j in range(k):
        lqk[j] = (np.float64(x[idx[j]]) - m64) * inv_t - lq0
    loss = 0.0
    a = 1.0
    if mode == 0:
        mt = -np.inf
        for j in range(k):
            mt = max(mt, v[j] * inv_t)
        st = 0.0
        for j in range(k):
            st += math.exp(v[j] * inv_t - mt) if mt > -np.inf else np.nan
        lst = math.log(st) if k else 0.0
        for j in range(k):
            lp = v[j] * inv_t - mt - lst
            p = math.exp(lp)
            pk[j] = p
            if p != 0:
                loss += p * (lp - lqk[j])
    elif mode == 1:
        total = 0.0
        s = 0.0
        for j in range(k):
            p = math.exp(v[j])
            pk[j] = p
            total += p
            s += math.exp(lqk[j])
            if p != 0:
                loss += p * (v[j] - lqk[j])
        r = max(1.0 - total, 0.0) if k < C else 0.0  # k = C: no class to hold it
        rest = math.log1p(-s) if s < 1 else -np.inf
        if r > 0:
            loss += r * (math.log(r) - rest)
        a = 1.0 - r / math.exp(rest) if r > 0 else 1.0
    else:
        a = 0.0
        for j in range(k):
            p = v[j]
            pk[j] = p
            a += p
            if p != 0:
                loss -= p * lqk[j]
    if want_grad:
        sc = gscale * inv_t
        sa = cast_like(sc * a, gr)
        lqc = cast_like(lq0, x)
        for c in range(C):
            gr[c] = sa * fexp(shift_scale(x[c], mx, it) - lqc)
        b = 1.0 if mode == 1 else a
        for j in range(k):
            gr[idx[j]] = sc * (b * math.exp(lqk[j]) - pk[j])
    return loss


# ---------------------------------------------------------------------------- distributions
@njit(**JIT)
def first_bad_prob(p):
    """Index of the first negative or NaN entry, or -1."""
    bad = False
    for j in range(p.shape[0]):
        bad |= not (p[j] >= 0)
    if not bad:
        return -1
    for j in range(p.shape[0]):
        if not (p[j] >= 0):
            return j
    return -1


@njit(**JIT)
def dist_row(p, q, mode):
    """mode 0: -sum p log p;  1: -sum p log q;  2: sum p log(p/q).  0 log 0 = 0."""
    n = p.shape[0]
    total = 0.0
    if n == 0:
        return total
    zero = cast_like(0.0, p)
    half = cast_like(0.5, p)
    two = cast_like(2.0, p)
    one = cast_like(1.0, p)
    for lo in range(0, n, CHUNK):
        hi = imin(lo + CHUNK, n)
        sp = p[lo:hi]
        sq = q[lo:hi]
        s = zero
        if mode == 0:
            for j in range(sp.shape[0]):
                v = sp[j]
                s -= v * flog(v) if v != zero else zero
        elif mode == 1:
            for j in range(sp.shape[0]):
                v = sp[j]
                s -= v * flog(sq[j]) if v != zero else zero
        else:
            # log(p/q) as log1p((p - q)/q) where p and q are within a factor 2 (p - q is
            # then exact): log p - log q cancels to a few ulps of log p there
            # (the two logs shared by both cases: log1p(r) = log(1 + r) r / ((1 + r) - 1))
            for j in range(sp.shape[0]):
                v = sp[j]
                u = sq[j]
                near = v >= half * u and v <= two * u
                r = (v - u) / u
                w = one + r
                dw = less_one(w, zero)
                la = flog(w if near else v)
                lb = flog(one if near else u)
                d = (r if dw == zero else la * (r / dw)) if near else la - lb
                s += v * d if v != zero else zero
        total += s
    return total


# ---------------------------------------------------------------------------- binary CE
@njit(**JIT)
def bce_row(p, y, w, has_w, out):
    """-w (y max(log p, -100) + (1-y) max(log(1-p), -100)), elementwise (PyTorch's clamp)."""
    n = p.shape[0]
    if n == 0:
        return
    one = cast_like(1.0, p)
    lo_clamp = cast_like(-100.0, p)
    for j in range(n):
        v = p[j]
        t = y[j]
        lp = fmax(flog(v), lo_clamp)
        lq = fmax(flog(one - v), lo_clamp)
        r = -(t * lp + (one - t) * lq)
        out[j] = r * w[j] if has_w else r


@njit(**INLINE)
def _bce_logits_simd(x, y, out, gr, want_grad, gscale):
    n = x.shape[0]
    lanes = _simd.lanes_of(x)
    main = n - n % lanes
    gv = _simd.vsplat(cast_like(gscale, x))
    ahead = AHEAD * lanes
    for j in range(0, main, lanes):
        _simd.prefetch(x, j + ahead)
        _simd.prefetch(y, j + ahead)
        v = _simd.vload(x, j)
        t = _simd.vload(y, j)
        loss, e = _simd.vbce_logits(v, t)
        _simd.vstore(out, j, loss)
        if want_grad:
            _simd.vstore(gr, j, _simd.vbce_logits_grad(v, t, e, gv))
    return main


def _bce_logits_fast(x, y, out, gr, want_grad, gscale):
    """The vector loop over the leading whole vectors of an unweighted float32 row;
    returns how many elements it did (0 where it does not apply)."""


@overload(_bce_logits_fast, jit_options=INLINE)
def _bce_logits_fast_ov(x, y, out, gr, want_grad, gscale):
    if (all(_simd.usable(a) for a in (x, y, out, gr))
            and x.dtype == y.dtype == out.dtype == gr.dtype == types.float32):
        return lambda x, y, out, gr, want_grad, gscale: _bce_logits_simd(
            x, y, out, gr, want_grad, gscale)
    return lambda x, y, out, gr, want_grad, gscale: 0


@njit(**JIT)
def pointwise_row(x, y, i, lo, hi, mode, alpha, gamma, _unused, out, gr, want_grad,
                  gscale):
    """Elementwise losses of ``x`` against ``y`` into ``out`` (and ``gscale`` times their
    gradient w.r.t. ``x`` into ``gr``); ``i, lo, hi`` (where ``x`` lies in its input) and
    the fourth option are unused, the elementwise drivers' common signature:

    mode 0, torchvision's sigmoid focal loss of logits x and targets y:
        a_t (1 - p_t)**gamma ce,  ce = max(x, 0) - x y + log1p(exp(-|x|)),
        1 - p_t = p (1 - y) + (1 - p) y with p = sigmoid(x) and 1 - p = sigmoid(-x)
        (both without cancellation), a_t = alpha y + (1 - alpha)(1 - y) (1 if alpha < 0);
        gradient a_t ((p - y) m + ce gamma (1 - p_t)**(gamma - 1) p (1 - p) (1 - 2 y));
    mode 1, PyTorch's kl_div of log-probabilities x and probabilities y:
        xlogy(y, y) - y x (so 0 log 0 = 0, and y < 0 gives NaN), gradient -y;
    mode 2, the same with log-probability targets: exp(y) (y - x), gradient -exp(y).
    """
    n = x.shape[0]
    one = cast_like(1.0, x)
    zero = cast_like(0.0, x)
    g = cast_like(gscale, x)
    if mode == 0:
        a = cast_like(alpha, x)
        gm = cast_like(gamma, x)
        for j in range(n):
            v = x[j]
            t = y[j]
            e = fexp(-abs(v))
            s = one / (one + e)
            p = s if v >= zero else e * s
            q = e * s if v >= zero else s
            ce = fmax(v, zero) - v * t + flog1p(e)
            omp = p * (one - t) + q * t
            m = omp ** gm if gamma != 0 else one
            at = a * t + (one - a) * (one - t) if alpha >= 0 else one
            out[j] = at * ce * m
            if want_grad:
                dm = gm * omp ** (gm - one) if gamma != 0 else zero
                gr[j] = g * (at * ((p - t) * m + ce * dm * p * q * (one - t - t)))
    elif mode == 1:
        for j in range(n):
            t = y[j]
            out[j] = (t * math.log(t) if t != zero else zero) - t * x[j]
            if want_grad:
                gr[j] = -g * t
    else:
        for j in range(n):
            pt = math.exp(y[j])
            out[j] = pt * (y[j] - x[j])
            if want_grad:
                gr[j] = -g * pt


@njit(**JIT)
def bce_logits_row(x, y, i, lo, hi, w2, has_w, pw2, has_pw, out, gr, want_grad, gscale):
    """(1-y) x + l (log1p(exp(-|x|)) + max(-x, 0)), l = 1 + (pw-1) y, times w.

    This is PyTorch's stable form; without pos_weight it equals max(x,0) - x y +
    log1p(exp(-|x|)).  Gradient: w ((1-y) - l sigmoid(-x)).  ``x``, ``y`` are columns
    ``lo:hi`` of row ``i``; ``w2``, ``pw2`` the weights (and pos_weights) of the whole
    input, 2-D, maybe with zero strides, read where ``has_w`` (``has_pw``).
    """
    w = unit_slice(w2, i, lo, hi, has_w)
    pw = unit_slice(pw2, i, lo, hi, has_pw)
    done = 0
    if not has_w and not has_pw and x.shape[0] >= 16:
        done = _bce_logits_fast(x, y, out, gr, want_grad, gscale)
    if done == 0:
        _bce_logits_row_scalar(x, y, w, has_w, pw, has_pw, out, gr, want_grad, gscale)
    elif done < x.shape[0]:
        _bce_logits_row_scalar(x[done:], y[done:], w, has_w, pw, has_pw, out[done:],
                               gr[done:] if want_grad else gr, want_grad, gscale)


@njit(**JIT)
def _bce_logits_row_scalar(x, y, w, has_w, pw, has_pw, out, gr, want_grad, gscale):
    """(1-y) x + l (log1p(exp(-|x|)) + max(-x, 0)), l = 1 + (pw-1) y, times w.

    This is PyTorch's stable form; without pos_weight it equals max(x,0) - x y +
    log1p(exp(-|x|)).  Gradient: w ((1-y) - l sigmoid(-x)).
    """
    n = x.shape[0]
    if n == 0:
        return
    one = cast_like(1.0, x)
    zero = cast_like(0.0, x)
    g = cast_like(gscale, x)
    for j in range(n):
        v = x[j]
        t = y[j]
        e = fexp(-abs(v))
        lp = flog1p(e)
        l = one + (pw[j] - one) * t if has_pw else one
        pt = pw[j] * t if has_pw else t
        wv = w[j] if has_w else one
        # (1-t) v + l max(-v, 0) is -pw t v for v < 0: written so, without the
        # cancellation of (1-t) v against l (-v); infinite v keeps PyTorch's form.
        out[j] = bce_logits_loss(v, t, lp, l, pt, wv, one, zero)
        if want_grad:
            gr[j] = bce_logits_grad(v, t, e, l, g * wv, one, zero, pt)
