"""CUDA backend: batched row kernels on the GPU (numba-cuda), built lazily and memoised.

A row (one slice along the class axis) belongs to a *team* of ``ts`` threads: the whole
block for wide rows (``ts`` = 256..1024, one row per block), or a power of two up to 32
lanes for narrow rows (several rows per block).  Each thread streams its share of the
row once, keeping an online maximum and a sum of exponentials rescaled whenever the
maximum grows (Milakov & Gimelshein's online softmax); the team merges them, and a
second pass over the row, in reverse order so that its freshest part is still in L2,
writes the softmax or the gradient, in place when asked.

Arrays arrive 3-D, ``(outer, C, inner)``: the class axis in the middle, so that PyTorch's
``(N, C, d1, ...)`` layout needs no transpose; row ``r`` is ``(r // inner, :, r % inner)``.
Rows that are unit-stride and aligned are read ``V`` elements per memory instruction
(16 bytes), with ``U`` such loads in flight per thread.
"""

import math
import warnings
from functools import lru_cache

import numpy as np

from .device import (CONCENTRATED, SIM, VEC, bce_logits_grad, bce_logits_loss, cast_like,
                     ce_grad_scale, ce_index_grad_terms, ce_index_loss, ce_index_mass,
                     ce_prob_loss, cuda, decode, device, encode, kl_finish, kl_finish_logs,
                     kl_grad_scales, lockstep_any, log_split, lse_finish, merge_max_sum,
                     nll_from, team_max, team_sum)

# Small inputs launch small grids on purpose, and numba-cuda warns at every launch of
# fewer than 128 blocks; that one message is silenced (for this process).
warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU "
                        r"under-utilization")

NEG_INF = -math.inf
U = 2  # vector loads in flight per thread (16 bytes each; 32 KB a 1024-thread block)
MAX_THREADS = 64 if SIM else 1024
# The simulator runs each GPU thread as a Python thread, polled by its block: small
# blocks there keep the suite's CUDA run short (narrow rows still share a block).
FLAT_THREADS = 16 if SIM else 256
NARROW_THREADS = 16 if SIM else 256
# float64 slots of shared scratch: one a warp; the simulator's reductions use one a thread
SHARED = 1024 if SIM else 32


# At most 64 registers a thread, so that any block up to 1024 threads can launch (the
# register file holds 64K); the wide kernels need 48-68 in float32/half, a few spill.
KERNEL = {} if SIM else dict(max_registers=64)


def team_size(c):
    """Threads per row: about 8 elements a thread for narrow rows, up to a block."""
    ts = 1
    while ts < MAX_THREADS and ts * 16 < c:
        ts *= 2
    return ts


def launch(n_rows, ts):
    """(blocks, threads) for ``n_rows`` rows of ``ts`` threads each."""
    threads = ts if ts > 32 else max(ts, NARROW_THREADS)
    rpb = threads // ts
    return max(1, -(-n_rows // rpb)), threads


@device
def log0(v):
    """log v with log 0 = -inf and NaN below 0, as on the GPU (the simulator's Python
    math.log raises there instead)."""
    if v > 0:
        return math.log(v)
    return -math.inf if v == 0 else math.nan


# ---------------------------------------------------------------------------- row kernels
@lru_cache(maxsize=None)
def kernels(v, f64):
    """The kernels for rows read ``v`` elements at a time, computing in float64 or float32."""
    FT = np.float64 if f64 else np.float32
    load_vec, store_vec = VEC[v]
    UV = U * v
    # Below this a log s from the row sum has lost digits that matter in the compute
    # precision (float32 sums are float32 in each thread): see tiny_log in _cpu/reduce.py.
    TINY_LOG = 2.0 ** -16 if f64 else 2.0 ** -6

    @device
    def row_pass1(row, nv, lane, ts, cap, raw, m, s, nanf):
        """Fold the row's vectors lane, lane+ts, ... into (m, s, nan flag)."""
        fcap = FT(cap)
        icap = FT(1.0 / cap) if cap > 0 else FT(0.0)
        for base in range(lane, nv, ts * U):
            for u in range(U):  # U independent loads first: bytes in flight
                kk = base + u * ts
                if kk < nv:
                    load_vec(row, kk, raw, u * v)
            gm = m
            for u in range(U):
                if base + u * ts < nv:
                    for e in range(v):
                        y = decode(raw[u * v + e])
                        if cap > 0:
                            y = fcap * math.tanh(y * icap)
                        nanf = nanf | (1 if y != y else 0)
                        gm = y if y > gm else gm
            if gm > m:
                s = s * math.exp(m - gm)
                m = gm
            if m != NEG_INF:
                acc = FT(0.0)
                for u in range(U):  # decoded again rather than kept: registers
                    if base + u * ts < nv:
                        for e in range(v):
                            y = decode(raw[u * v + e])
                            if cap > 0:
                                y = fcap * math.tanh(y * icap)
                            acc += math.exp(y - m)
                s += acc
        return m, s, nanf

    @device
    def row_stats(row, nv, lane, ts, cap, sm, raw):
        """Team-wide (max, sum of exp(y - max), any NaN) of a row."""
        m, s, nanf = row_pass1(row, nv, lane, ts, cap, raw, FT(NEG_INF), FT(0.0), 0)
        mm, ss = merge_max_sum(m, s, ts, sm)
        return mm, ss, team_max(nanf, ts, sm)

    @device
    def row_split(row, nv, lane, ts, cap, m, sm, raw):
        """Team-wide (number of elements equal to the row max ``m``, sum of exp(y - m)
        over the others): s split for log_split, in a second read of the row.  ``nv`` = 0
        on a thread whose row needs no split: it only takes part in the reductions."""
        fcap = FT(cap)
        icap = FT(1.0 / cap) if cap > 0 else FT(0.0)
        k = 0
        rest = FT(0.0)
        for j in range(lane, nv, ts):
            load_vec(row, j, raw, 0)
            for e in range(v):
                y = decode(raw[e])
                if cap > 0:
                    y = fcap * math.tanh(y * icap)
                if y == m:
                    k += 1
                else:
                    rest += math.exp(y - m)
        return team_sum(np.float64(k), ts, sm), team_sum(np.float64(rest), ts, sm)

    @device
    def scaled_split(row, cnt, lane, ts, it, m, sm):
        """row_split of the row scaled by ``it`` (as the KL kernel reads it), read one
        element at a time; ``cnt`` = 0 where no split is needed."""
        k = 0
        rest = FT(0.0)
        for c in range(lane, cnt, ts):
            y = decode(row[c]) * it
            if y == m:
                k += 1
            else:
                rest += math.exp(y - m)
        return team_sum(np.float64(k), ts, sm), team_sum(np.float64(rest), ts, sm)

    @device
    def row_index(ts, n):
        rpb = cuda.blockDim.x // ts
        tid = cuda.threadIdx.x
        r = np.int64(cuda.blockIdx.x) * rpb + tid // ts
        return r, tid % ts, r < n

    @device
    def block_add(val, acc, sm):
        """acc[0] += the block's sum of val (one atomic a block)."""
        tot = team_sum(np.float64(val), cuda.blockDim.x, sm)
        if cuda.threadIdx.x == 0:
            cuda.atomic.add(acc, 0, tot)

    @cuda.jit(**KERNEL)
    def lse_kernel(x, out, ts):
        sm = cuda.shared.array(SHARED, np.float64)
        raw = cuda.local.array(UV, x.dtype)
        inner = x.shape[2]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        row = x[rr // inner, :, rr % inner]
        nv = x.shape[1] // v if active else 0
        m, s, nanf = row_stats(row, nv, lane, ts, 0.0, sm, raw)
        lse = lse_finish(m, s, nanf)
        # a dominant max: log s again, split (the CPU's row_logsumexp)
        conc = (nanf == 0 and abs(m) < math.inf and s < CONCENTRATED and abs(lse) < 1.0)
        if lockstep_any(conc, ts):
            kc, rest = row_split(row, nv if conc else 0, lane, ts, 0.0, FT(m), sm, raw)
            if conc:
                lse = np.float64(m) + log_split(kc, rest)
        if active and lane == 0:
            out[r] = lse

    @cuda.jit(**KERNEL)
    def softmax_kernel(x, log, out, ts):
        sm = cuda.shared.array(SHARED, np.float64)
        raw = cuda.local.array(UV, x.dtype)
        ob = cuda.local.array(v, out.dtype)
        inner = x.shape[2]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        row = x[rr // inner, :, rr % inner]
        orow = out[rr // inner, :, rr % inner]
        nv = x.shape[1] // v if active else 0
        m, s, nanf = row_stats(row, nv, lane, ts, 0.0, sm, raw)
        lse = lse_finish(m, s, nanf)
        special = nanf != 0 or m == NEG_INF or m == math.inf
        mm = FT(m)
        ls = FT(math.log(s)) if not special else FT(0.0)
        # the max's own log-probability, -log s: split where the max dominates
        conc = log and not special and s < CONCENTRATED and ls < TINY_LOG
        if lockstep_any(conc, ts):
            kc, rest = row_split(row, nv if conc else 0, lane, ts, 0.0, mm, sm, raw)
            if conc:
                ls = FT(log_split(kc, rest))
        inv = FT(1.0 / s) if not special else FT(0.0)
        c = FT(math.nan) if m == math.inf else FT(lse)  # a +inf entry: NaN throughout
        for j in range(lane, nv, ts):
            kk = nv - 1 - j
            load_vec(row, kk, raw, 0)
            for e in range(v):
                y = decode(raw[e])
                if special:
                    o = y - c if log else math.exp(y - c)
                elif log:
                    o = (y - mm) - ls
                else:
                    o = math.exp(y - mm) * inv
                ob[e] = o
            store_vec(orow, kk, ob, 0)

    @cuda.jit(**KERNEL)
    def ce_index_kernel(x, t, w, has_w, wsum, eps, z, cap, ignore, den, use_den, want_grad,
                        g, keep, loss, acc, ts):
        sm = cuda.shared.array(SHARED, np.float64)
        raw = cuda.local.array(UV, x.dtype)
        gb = cuda.local.array(v, g.dtype)
        inner = x.shape[2]
        C = x.shape[1]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        row = x[rr // inner, :, rr % inner]
        ti = np.int64(t[rr])
        ignored = (not active) or ti == ignore or ti < 0 or ti >= C
        nv = C // v if not ignored else 0
        if use_den and has_w and z != 0.0 and den[1] != 0.0:
            # the z-loss is not class-weighted: its mean is over the kept rows
            z = z * den[0] / den[1]
        yt = FT(0.0)
        if not ignored:
            yt = decode(row[ti])
            if cap > 0:
                yt = FT(cap) * math.tanh(yt * FT(1.0 / cap))
        m, s, nanf = row_stats(row, nv, lane, ts, cap, sm, raw)
        finite = nanf == 0 and m != NEG_INF and m != math.inf
        # sum_c w_c (y_c - m) for the smoothing term: about the row max, every term of
        # one sign, so it neither cancels nor overflows near the largest float
        piv = FT(m) if finite else FT(0.0)
        sy = 0.0
        if eps > 0.0:
            fcap = FT(cap)
            icap = FT(1.0 / cap) if cap > 0 else FT(0.0)
            part = FT(0.0)
            for c in range(lane, nv * v, ts):
                y = decode(row[c])
                if cap > 0:
                    y = fcap * math.tanh(y * icap)
                if has_w:  # a weight of 0 is no mass, even at y = -inf
                    part += FT(w[c]) * (y - piv) if w[c] != 0 else FT(0.0)
                else:
                    part += y - piv
            sy = team_sum(np.float64(part), ts, sm)
        lse = lse_finish(m, s, nanf)
        fm = np.float64(m)
        # the smoothing sum sy is about piv: lse - piv is log s (finite rows), else lse
        ls = math.log(np.float64(s)) if finite else 0.0
        nll = 0.0
        if not ignored:
            nll = nll_from(ls, np.float64(yt), fm) if finite else lse - yt
        # a confident right prediction: its loss is log s, split to keep its digits
        conc = (not ignored) and finite and s < CONCENTRATED and nll < TINY_LOG
        if lockstep_any(conc, ts):
            kc, rest = row_split(row, nv if conc else 0, lane, ts, cap, FT(m), sm, raw)
            if conc:
                ls = log_split(kc, rest)
                nll = nll_from(ls, np.float64(yt), fm)
                lse = fm + ls
        lossv = 0.0
        wt = 1.0
        if not ignored:
            wt = np.float64(w[ti]) if has_w else 1.0
            dpiv = ls if finite else lse
            lossv = ce_index_loss(nll, dpiv, sy, wsum, m == NEG_INF and nanf == 0, wt, eps,
                                  C, z, lse)
        if keep:
            if active and lane == 0:
                loss[r] = lossv
        else:
            block_add(lossv if lane == 0 else 0.0, acc, sm)
        if not want_grad or not active:
            return
        gs = 1.0
        if use_den:
            gs = 1.0 / den[0] if den[0] != 0.0 else math.nan
        grow = g[rr // inner, :, rr % inner]
        mode = 1 if ignored else (0 if finite else 2)
        k = FT(ce_grad_scale(ce_index_mass(wt, wsum, eps, C), z, lse, s, gs)) \
            if mode == 0 else FT(0.0)
        ke64, kt64 = ce_index_grad_terms(wt, eps, C, gs)
        ke = FT(ke64)
        kt = FT(kt64)
        mm = FT(m)
        fcap = FT(cap)
        icap = FT(1.0 / cap) if cap > 0 else FT(0.0)
        nvg = C // v
        fill = FT(0.0) if mode == 1 else FT(math.nan)
        for base in range(lane, nvg, ts * U):
            for u in range(U):  # reverse order: the row's tail is freshest in L2
                j = base + u * ts
                if j < nvg and mode == 0:
                    load_vec(row, nvg - 1 - j, raw, u * v)
            for u in range(U):
                j = base + u * ts
                if j < nvg:
                    kk = nvg - 1 - j
                    for e in range(v):
                        if mode == 0:
                            c = kk * v + e
                            y = decode(raw[u * v + e])
                            if cap > 0:
                                y = fcap * math.tanh(y * icap)
                            gv = k * math.exp(y - mm)
                            if eps > 0.0:
                                gv -= ke * FT(w[c]) if has_w else ke
                            if c == ti:
                                gv -= kt
                            if cap > 0:
                                uu = y * icap
                                gv = gv * (FT(1.0) - uu * uu)
                        else:
                            gv = fill
                        gb[e] = encode(gv, g)
                    store_vec(grow, kk, gb, 0)

    @cuda.jit(**KERNEL)
    def ce_prob_kernel(x, p, w, has_w, eps, z, cap, gscale, want_grad, g, keep, loss, acc,
                       ts):
        sm = cuda.shared.array(SHARED, np.float64)
        raw = cuda.local.array(UV, x.dtype)
        inner = x.shape[2]
        C = x.shape[1]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        row = x[rr // inner, :, rr % inner]
        prow = p[rr // inner, :, rr % inner]
        nv = C // v if active else 0
        fcap = FT(cap)
        icap = FT(1.0 / cap) if cap > 0 else FT(0.0)
        ce = FT(1.0 - eps)
        cs = FT(eps / C) if C > 0 else FT(0.0)
        m, s, nanf = row_stats(row, nv, lane, ts, cap, sm, raw)
        # sum_c a_c (y_c - m): about the row max (see ce_index_kernel)
        piv = FT(m) if nanf == 0 and m != NEG_INF and m != math.inf else FT(0.0)
        pa = FT(0.0)
        pay = 0.0  # float64: y - piv overflows float32 at logits near +-2e38
        fpiv = np.float64(piv)
        for c in range(lane, nv * v, ts):
            a = ce * decode(prow[c]) + cs
            if has_w:
                a = a * FT(w[c])
            y = decode(row[c])
            if cap > 0:
                y = fcap * math.tanh(y * icap)
            pa += a
            pay += np.float64(a) * (np.float64(y) - fpiv) if a != 0 else 0.0
        a_tot = team_sum(np.float64(pa), ts, sm)
        ay = team_sum(np.float64(pay), ts, sm)
        lse = lse_finish(m, s, nanf)
        finite = nanf == 0 and m != NEG_INF and m != math.inf
        ls = math.log(np.float64(s)) if finite else 0.0
        # a confident row whose targets sit on its max: the loss a log s - ay (ay <= 0
        # about the max) is then mostly log s, split to keep its digits
        conc = (active and finite and s < CONCENTRATED and ls < TINY_LOG
                and a_tot * ls - ay < TINY_LOG * a_tot)
        if lockstep_any(conc, ts):
            kc, rest = row_split(row, nv if conc else 0, lane, ts, cap, FT(m), sm, raw)
            if conc:
                ls = log_split(kc, rest)
                lse = np.float64(m) + ls
        lossv = ce_prob_loss(a_tot, ay, fpiv, np.float64(m), ls, lse, z)
        if nanf != 0:
            lossv = math.nan
        if not active:
            lossv = 0.0
        if keep:
            if active and lane == 0:
                loss[r] = lossv
        else:
            block_add(lossv if lane == 0 else 0.0, acc, sm)
        if not want_grad or not active:
            return
        grow = g[rr // inner, :, rr % inner]
        k = FT(ce_grad_scale(a_tot, z, lse, s, gscale)) if finite else FT(math.nan)
        gsf = FT(gscale)
        mm = FT(m)
        for j in range(lane, C, ts):
            c = C - 1 - j
            y = decode(row[c])
            if cap > 0:
                y = fcap * math.tanh(y * icap)
            a = ce * decode(prow[c]) + cs
            if has_w:
                a = a * FT(w[c])
            gv = k * math.exp(y - mm) - gsf * a if finite else FT(math.nan)
            if cap > 0:
                uu = y * icap
                gv = gv * (FT(1.0) - uu * uu)
            grow[c] = encode(gv, g)

    @cuda.jit(**KERNEL)
    def kl_logits_kernel(x, xt, inv_t, gscale, want_grad, g, keep, out, acc, ts):
        sm = cuda.shared.array(SHARED, np.float64)
        inner = x.shape[2]
        C = x.shape[1]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        row = x[rr // inner, :, rr % inner]
        trow = xt[rr // inner, :, rr % inner]
        cnt = C if active else 0
        it = FT(inv_t)
        ms = FT(NEG_INF)
        mt = FT(NEG_INF)
        ss = FT(0.0)
        st = FT(0.0)
        d = FT(0.0)
        nanf = 0
        for c in range(lane, cnt, ts):
            vs = decode(row[c]) * it
            vt = decode(trow[c]) * it
            nanf = nanf | (1 if vs != vs or vt != vt else 0)
            if vs > ms:
                ss = ss * math.exp(ms - vs)
                ms = vs
            if vt > mt:
                sc = math.exp(mt - vt)
                st = st * sc
                d = d * sc
                mt = vt
            if ms != NEG_INF:
                ss += math.exp(vs - ms)
            if mt != NEG_INF:
                et = math.exp(vt - mt)
                st += et
                d += et * (vt - vs) if et != 0 else FT(0.0)
        nanf = team_max(nanf, ts, sm)
        gms = team_max(ms, ts, sm)
        gmt = team_max(mt, ts, sm)
        fs = FT(0.0) if (gms == NEG_INF or ms == NEG_INF) else (
            FT(1.0) if ms == gms else math.exp(ms - gms))
        ft = FT(0.0) if (gmt == NEG_INF or mt == NEG_INF) else (
            FT(1.0) if mt == gmt else math.exp(mt - gmt))
        ss = team_sum(np.float64(ss * fs), ts, sm)
        st = team_sum(np.float64(st * ft), ts, sm)
        d = team_sum(np.float64(d * ft), ts, sm)
        kl = 0.0
        fin = gms != NEG_INF and gmt != NEG_INF and gms != math.inf and gmt != math.inf
        dm = np.float64(gms) - np.float64(gmt) if fin else 0.0
        if C > 0:
            lse_s = lse_finish(gms, ss, nanf) if gms != NEG_INF else NEG_INF
            lse_t = lse_finish(gmt, st, nanf) if gmt != NEG_INF else NEG_INF
            if nanf != 0:
                kl = math.nan
            elif fin:
                kl = kl_finish(d, ss, st, dm)
            else:
                kl = d / st + lse_s - lse_t
        # nearly equal rows with a dominant max: log S_s - log S_t is then mostly the
        # low digits that sums near 1 lose; both logs split
        conc = (C > 0 and nanf == 0 and fin and (ss < CONCENTRATED or st < CONCENTRATED)
                and abs(kl) < TINY_LOG)
        if lockstep_any(conc, ts):
            # FT(): team_max's result is float64 on the device (its shared slots are)
            ks_, rs_ = scaled_split(row, cnt if conc else 0, lane, ts, it, FT(gms), sm)
            kt_, rt_ = scaled_split(trow, cnt if conc else 0, lane, ts, it, FT(gmt), sm)
            if conc:
                kl = kl_finish_logs(d, st, dm, log_split(ks_, rs_), log_split(kt_, rt_))
        if not active:
            kl = 0.0
        if keep:
            if active and lane == 0:
                out[r] = kl
        else:
            block_add(kl if lane == 0 else 0.0, acc, sm)
        if not want_grad or not active:
            return
        grow = g[rr // inner, :, rr % inner]
        ks64, kt64 = kl_grad_scales(gscale, inv_t, ss, st)
        ks = FT(ks64)
        kt = FT(kt64)
        ams = FT(gms)
        amt = FT(gmt)
        for j in range(lane, C, ts):
            c = C - 1 - j
            gv = ks * math.exp(decode(row[c]) * it - ams) - kt * math.exp(decode(trow[c]) * it - amt)
            grow[c] = encode(gv, g)

    @device
    def jsd_terms(y, yt, m, mt, it, lq0, lp0, lb, l1b, mode):
        """(teacher's term, student's term, what the gradient reads) of one element:
        see _cpu/rows.py's _jsd_terms and _jsd_grad."""
        lq = (y - m) * it - lq0
        lp = (yt - mt) * it - lp0
        zero = FT(0.0)
        if mode == 2:
            a = lb + lp
            b = l1b + lq
            hi = a if a > b else b
            lm = hi + math.log1p(math.exp(-abs(a - b))) if hi != NEG_INF else hi
            ea = math.exp(a)
            eb = math.exp(b)
            return (ea * (lp - lm) if ea != zero else zero,
                    eb * (lq - lm) if eb != zero else zero, lq, lq - lm)
        if mode == 0:
            p = math.exp(lp)
            return p * (lp - lq) if p != zero else zero, zero, lq, p
        q = math.exp(lq)
        return zero, q * (lq - lp) if q != zero else zero, lq, lq - lp

    @cuda.jit(**KERNEL)
    def jsd_kernel(x, xt, t, masked, ignore, inv_t, beta, mode, gscale, den, use_den,
                   want_grad, g, keep, out, acc, ts):
        sm = cuda.shared.array(SHARED, np.float64)
        inner = x.shape[2]
        C = x.shape[1]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        row = x[rr // inner, :, rr % inner]
        trow = xt[rr // inner, :, rr % inner]
        kept = active and not (masked and np.int64(t[rr]) == ignore)
        cnt = C if kept else 0
        it = FT(inv_t)
        ms = FT(NEG_INF)
        mt = FT(NEG_INF)
        ss = FT(0.0)
        st = FT(0.0)
        nanf = 0
        for c in range(lane, cnt, ts):
            ys = decode(row[c])
            yt = decode(trow[c])
            nanf = nanf | (1 if ys != ys or yt != yt else 0)
            if ys > ms:
                ss = ss * math.exp((ms - ys) * it) if ms != NEG_INF else FT(0.0)
                ms = ys
            if yt > mt:
                st = st * math.exp((mt - yt) * it) if mt != NEG_INF else FT(0.0)
                mt = yt
            if ms != NEG_INF and ms != math.inf:
                ss += math.exp((ys - ms) * it)
            if mt != NEG_INF and mt != math.inf:
                st += math.exp((yt - mt) * it)
        nanf = team_max(nanf, ts, sm)
        gms = team_max(ms, ts, sm)
        gmt = team_max(mt, ts, sm)
        fin = (nanf == 0 and gms != NEG_INF and gmt != NEG_INF and gms != math.inf
               and gmt != math.inf)
        fs = FT(0.0) if (not fin or ms == NEG_INF) else math.exp((ms - FT(gms)) * it)
        ft = FT(0.0) if (not fin or mt == NEG_INF) else math.exp((mt - FT(gmt)) * it)
        ss64 = team_sum(np.float64(ss * fs), ts, sm)
        st64 = team_sum(np.float64(st * ft), ts, sm)
        am = FT(gms) if fin else FT(0.0)
        amt = FT(gmt) if fin else FT(0.0)
        lq0 = FT(math.log(ss64)) if fin else FT(0.0)
        lp0 = FT(math.log(st64)) if fin else FT(0.0)
        lb = FT(math.log(beta)) if beta > 0 else FT(0.0)
        l1b = FT(math.log1p(-beta)) if beta < 1 else FT(0.0)
        ta = FT(0.0)
        tb = FT(0.0)
        for c in range(lane, cnt if fin else 0, ts):
            a_, b_, _, _ = jsd_terms(decode(row[c]), decode(trow[c]), am, amt, it, lq0, lp0,
                                     lb, l1b, mode)
            ta += a_
            tb += b_
        ta64 = team_sum(np.float64(ta), ts, sm)
        tb64 = team_sum(np.float64(tb), ts, sm)
        loss = 0.0
        if kept and C > 0:
            loss = ta64 + tb64 if fin else math.nan
        if keep:
            if active and lane == 0:
                out[r] = loss
        else:
            block_add(loss if lane == 0 else 0.0, acc, sm)
        if not want_grad or not active:
            return
        grow = g[rr // inner, :, rr % inner]
        gs = gscale
        if use_den:
            gs = 1.0 / den[0] if den[0] != 0.0 else math.nan
        k = FT(tb64 / (1.0 - beta)) if mode == 2 else FT(tb64)
        sc = FT(gs * inv_t * (1.0 - beta)) if mode == 2 else FT(gs * inv_t)
        for j in range(lane, C, ts):
            c = C - 1 - j
            gv = FT(0.0)
            if not kept:
                gv = FT(0.0)
            elif not fin:
                gv = FT(math.nan)
            else:
                _, _, lq, w = jsd_terms(decode(row[c]), decode(trow[c]), am, amt, it, lq0,
                                        lp0, lb, l1b, mode)
                q = math.exp(lq)
                if mode == 0:
                    gv = sc * (q - w)
                elif q != FT(0.0):
                    gv = sc * (q * (w - k))
            grow[c] = encode(gv, g)

    @device
    def sparse_p(vj, mode, it, mt, lst):
        """(teacher log-probability or probability, probability) of one given entry."""
        if mode == 0:
            lp = vj * it - mt - lst
            return lp, math.exp(lp)
        if mode == 1:
            return vj, math.exp(vj)
        return vj, vj

    @cuda.jit(**KERNEL)
    def sparse_kd_kernel(x, idx, v, inv_t, mode, gscale, want_grad, g, keep, out, acc, bad,
                         ts):
        """See _cpu/rows.py's sparse_kd_row; ``idx``, ``v`` (outer, k, inner).  Indices
        out of [0, C) set bad[0], repeated ones bad[1] (the lowest row * k + entry)."""
        sm = cuda.shared.array(SHARED, np.float64)
        inner = x.shape[2]
        C = x.shape[1]
        k = idx.shape[1]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        o, ii = rr // inner, rr % inner
        row = x[o, :, ii]
        cnt = C if active else 0
        kc = k if active else 0
        for j in range(lane, kc, ts):  # the indices' checks
            ij = np.int64(idx[o, j, ii])
            if ij < 0 or ij >= C:
                cuda.atomic.min(bad, 0, np.int64(r * k + j))
            for jj in range(j):
                if np.int64(idx[o, jj, ii]) == ij:
                    cuda.atomic.min(bad, 1, np.int64(r * k + j))
        it = FT(inv_t)
        m = FT(NEG_INF)
        s = FT(0.0)
        nanf = 0
        for c in range(lane, cnt, ts):
            y = decode(row[c])
            nanf = nanf | (1 if y != y else 0)
            if y > m:
                s = s * math.exp((m - y) * it) if m != NEG_INF else FT(0.0)
                m = y
            if m != NEG_INF and m != math.inf:
                s += math.exp((y - m) * it)
        nanf = team_max(nanf, ts, sm)
        gm = team_max(m, ts, sm)
        fin = nanf == 0 and gm != NEG_INF and gm != math.inf
        f = 0.0 if (not fin or m == NEG_INF) else math.exp((np.float64(m) - gm) * inv_t)
        s64 = team_sum(np.float64(s) * f, ts, sm)
        lq0 = math.log(s64) if fin else 0.0
        gm64 = np.float64(gm) if fin else 0.0
        mt = NEG_INF
        for j in range(lane, kc if mode == 0 else 0, ts):
            mt = max(mt, np.float64(decode(v[o, j, ii])) * inv_t)
        mt = team_max(mt, ts, sm)
        st = 0.0
        for j in range(lane, kc if mode == 0 else 0, ts):
            st += math.exp(np.float64(decode(v[o, j, ii])) * inv_t - mt) if mt > NEG_INF \
                else math.nan
        st = team_sum(st, ts, sm)
        lst = log0(st) if k > 0 and mode == 0 else 0.0
        part = 0.0
        tot = 0.0
        sq = 0.0
        for j in range(lane, kc, ts):
            ij = min(max(np.int64(idx[o, j, ii]), 0), C - 1)
            lq = (np.float64(decode(row[ij])) - gm64) * inv_t - lq0
            lp, p = sparse_p(np.float64(decode(v[o, j, ii])), mode, inv_t, mt, lst)
            tot += p
            sq += math.exp(lq)
            if p != 0:
                part += p * (lp - lq) if mode != 2 else -p * lq
        part = team_sum(part, ts, sm)
        tot = team_sum(tot, ts, sm)
        sq = team_sum(sq, ts, sm)
        loss = part
        a = tot if mode == 2 else 1.0
        if mode == 1:
            rr_ = max(1.0 - tot, 0.0) if k < C else 0.0
            rest = math.log1p(-sq) if sq < 1 else NEG_INF
            if rr_ > 0:
                loss += rr_ * (math.log(rr_) - rest)
                a = 1.0 - rr_ / math.exp(rest) if rest > NEG_INF else NEG_INF
        if not fin:
            loss = math.nan
        if not active or C == 0:
            loss = 0.0
        if keep:
            if active and lane == 0:
                out[r] = loss
        else:
            block_add(loss if lane == 0 else 0.0, acc, sm)
        if not want_grad:
            return
        grow = g[o, :, ii]
        sc = gscale * inv_t
        sa = FT(sc * a) if fin else FT(math.nan)
        mm = FT(gm64)
        lqc = FT(lq0)
        for jj in range(lane, cnt, ts):
            c = C - 1 - jj
            grow[c] = encode(sa * math.exp((decode(row[c]) - mm) * it - lqc), g)
        cuda.syncthreads()
        b = 1.0 if mode == 1 else a
        for j in range(lane, kc if fin else 0, ts):
            ij = np.int64(idx[o, j, ii])
            if ij >= 0 and ij < C:
                lq = (np.float64(decode(row[ij])) - gm64) * inv_t - lq0
                _, p = sparse_p(np.float64(decode(v[o, j, ii])), mode, inv_t, mt, lst)
                grow[ij] = encode(FT(sc * (b * math.exp(lq) - p)), g)

    @cuda.jit(**KERNEL)
    def dist_kernel(p, q, mode, out, bad, ts):
        sm = cuda.shared.array(SHARED, np.float64)
        inner = p.shape[2]
        C = p.shape[1]
        n = p.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        prow = p[rr // inner, :, rr % inner]
        qrow = q[rr // inner, :, rr % inner]
        cnt = C if active else 0
        tot = FT(0.0)
        first = np.int64(2 * C)
        for c in range(lane, cnt, ts):
            pv = decode(prow[c])
            qv = decode(qrow[c])
            if not (pv >= 0):
                first = min(first, np.int64(c))
            if mode != 0 and not (qv >= 0):
                first = min(first, np.int64(C + c))
            if pv != 0:
                if mode == 0:
                    tot -= pv * log0(pv)
                elif mode == 1:
                    tot -= pv * log0(qv)
                elif pv >= FT(0.5) * qv and pv <= FT(2.0) * qv:
                    # log(p/q) as log1p((p - q)/q) (p - q exact within a factor 2):
                    # log p - log q cancels to a few ulps of log p there
                    tot += pv * math.log1p((pv - qv) / qv)
                else:
                    tot += pv * (log0(pv) - log0(qv))
        total = team_sum(np.float64(tot), ts, sm)
        worst = np.int64(-team_max(-first, ts, sm))
        if active and lane == 0:
            out[r] = total if worst == 2 * C else math.nan
            if worst < 2 * C:
                cuda.atomic.min(bad, 0, r * 2 * C + worst)

    @cuda.jit(**KERNEL)
    def eval_kernel(x, t, st, ts):
        """Per row for ``evaluate``: max, sum e, sum e (x - max), target logit, count of
        logits above it, first argmax (e = exp(x - max)), into st[r, 0:6] (float64).
        A row with a NaN gets NaN max, sums and target logit and argmax -1, as on the
        CPU (``_cpu/eval_rows.eval_row``): every metric of the row is then NaN."""
        sm = cuda.shared.array(SHARED, np.float64)
        inner = x.shape[2]
        C = x.shape[1]
        n = x.shape[0] * inner
        r, lane, active = row_index(ts, n)
        rr = r if active else 0
        row = x[rr // inner, :, rr % inner]
        ti = np.int64(t[rr])
        has_t = active and ti >= 0 and ti < C
        xt = decode(row[ti]) if has_t else FT(0.0)
        cnt = C if active else 0
        m = FT(NEG_INF)
        s = FT(0.0)
        d = FT(0.0)
        g = 0
        nanf = 0
        big = np.int64(C)
        best = big
        for c in range(lane, cnt, ts):
            y = decode(row[c])
            if y != y:
                nanf = 1
            if has_t and y > xt:
                g += 1
            if y > m:
                if m != NEG_INF and y != math.inf:
                    delta = m - y
                    q = math.exp(delta)
                    d = q * (d + delta * s)
                    s = q * s
                m = y
                best = np.int64(c)
            if m != NEG_INF and m != math.inf:
                u = y - m
                e = math.exp(u)
                s += e
                d += e * u if e != 0 else FT(0.0)
        mm = team_max(m, ts, sm)
        fin = mm != NEG_INF and mm != math.inf
        sf = 0.0
        df = 0.0
        if fin and m != NEG_INF:
            delta = np.float64(m) - np.float64(mm)
            q = math.exp(delta)
            sf = q * np.float64(s)
            df = q * (np.float64(d) + delta * np.float64(s))
        stot = team_sum(sf, ts, sm)
        dtot = team_sum(df, ts, sm)
        gtot = team_sum(np.float64(g), ts, sm)
        cand = best if m == mm else big
        am = np.int64(-team_max(np.float64(-cand), ts, sm))
        anynan = team_max(nanf, ts, sm)
        if active and lane == 0:
            if anynan != 0:
                st[r, 0] = math.nan
                st[r, 1] = math.nan
                st[r, 2] = math.nan
                st[r, 3] = math.nan
                st[r, 4] = 0.0
                st[r, 5] = -1.0
            else:
                st[r, 0] = np.float64(mm)
                st[r, 1] = stot
                st[r, 2] = dtot
                st[r, 3] = np.float64(xt)
                st[r, 4] = gtot
                st[r, 5] = am

    return dict(lse=lse_kernel, softmax=softmax_kernel, ce_index=ce_index_kernel,
                ce_prob=ce_prob_kernel, kl_logits=kl_logits_kernel, jsd=jsd_kernel,
                sparse_kd=sparse_kd_kernel,
                dist=dist_kernel,
                eval=eval_kernel)


# ---------------------------------------------------------------------------- flat kernels
@cuda.jit(**KERNEL)
def fill_kernel(a, value):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = value


@cuda.jit(**KERNEL)
def scale_kernel(src, k, dst):
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = src[i] * k


@device
def _grid_add(val, acc, sm, i):
    tot = team_sum(np.float64(val), cuda.blockDim.x, sm)
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(acc, i, tot)


@device
def _grid_loop(total):
    """(first element, stride, trips) of this thread's grid-stride loop over ``total``
    elements: the same trip count on every thread, as a block-wide sum follows."""
    step = np.int64(cuda.gridsize(1))
    return np.int64(cuda.grid(1)), step, (total + step - 1) // step


@cuda.jit(**KERNEL)
def targets_kernel(t, C, ignore, w, has_w, den, bad):
    """den[0] += summed weight of kept targets, den[1] += their number; bad[0] = min
    index of a bad target."""
    sm = cuda.shared.array(SHARED, np.float64)
    n = t.shape[0]
    start, step, trips = _grid_loop(n)
    part = 0.0
    kept = 0.0
    for k in range(trips):
        i = start + k * step
        if i < n:
            ti = np.int64(t[i])
            if ti != ignore:
                if ti < 0 or ti >= C:
                    cuda.atomic.min(bad, 0, np.int64(i))
                else:
                    part += np.float64(w[ti]) if has_w else 1.0
                    kept += 1.0
    _grid_add(part, den, sm, 0)
    _grid_add(kept, den, sm, 1)


@cuda.jit(**KERNEL)
def nll_kernel(x, t, w, has_w, ignore, den, mean, want_grad, g, keep, out, acc):
    """One thread a row: -w_t x_t (den[0] the summed weight, from targets_kernel), and
    with ``want_grad`` the row's gradient, zero but at the target."""
    sm = cuda.shared.array(SHARED, np.float64)
    inner = x.shape[2]
    C = x.shape[1]
    n = x.shape[0] * inner
    r = cuda.grid(1)
    v = 0.0
    if r < n:
        o, ii = r // inner, r % inner
        ti = np.int64(t[r])
        ok = ti != ignore and ti >= 0 and ti < C
        wt = (np.float64(w[ti]) if has_w else 1.0) if ok else 0.0
        if ok:
            v = -wt * np.float64(decode(x[o, ti, ii]))
        if keep:
            out[r] = v
        if want_grad:
            gs = (1.0 / den[0] if den[0] != 0.0 else math.nan) if mean else 1.0
            grow = g[o, :, ii]
            for c in range(C):
                grow[c] = encode(cast_like(0.0, decode(x[o, 0, ii])), g)
            if ok:
                grow[ti] = encode(cast_like(-wt * gs, decode(x[o, 0, ii])), g)
    if not keep:
        _grid_add(v, acc, sm, 0)


@cuda.jit(**KERNEL)
def kept_rows_kernel(t, ignore, per_row, den):
    """den[0] += per_row times the number of targets other than ``ignore``."""
    sm = cuda.shared.array(SHARED, np.float64)
    n = t.shape[0]
    start, step, trips = _grid_loop(n)
    kept = 0.0
    for k in range(trips):
        i = start + k * step
        if i < n and np.int64(t[i]) != ignore:
            kept += per_row
    _grid_add(kept, den, sm, 0)


@cuda.jit(**KERNEL)
def finish_kernel(acc, den, use_den, den_host, mean, out):
    """out[0] = acc[0] (sum) or acc[0] / denominator (mean), with the CPU's rules."""
    if cuda.grid(1) != 0:
        return
    total = acc[0]
    if not mean:
        out[0] = total
        return
    d = den[0] if use_den else den_host
    if d == 0.0:
        if total == 0.0 or total != total:
            out[0] = math.nan
        else:
            out[0] = math.inf if total > 0 else -math.inf
    else:
        out[0] = total / d


@cuda.jit(**KERNEL)
def bce_kernel(p, y, w, has_w, keep, out, acc, bad):
    sm = cuda.shared.array(SHARED, np.float64)
    n, L = p.shape
    total = n * L
    start, step, trips = _grid_loop(total)
    part = 0.0
    for k in range(trips):
        e = start + k * step
        if e < total:
            i = e // L
            j = e % L
            pv = decode(p[i, j])
            yv = decode(y[i, j])
            if not (pv >= 0 and pv <= 1):
                cuda.atomic.min(bad, 0, e)
            one = cast_like(1.0, pv)  # not pv - pv + 1: NaN at an (invalid) infinite pv
            lp = max(log0(pv), -100.0)
            lq = max(log0(one - pv), -100.0)
            rv = -(yv * lp + (one - yv) * lq)
            if has_w:
                rv = rv * w[i, j]
            if keep:
                out[i, j] = rv
            else:
                part += rv
    if not keep:
        _grid_add(part, acc, sm, 0)


@cuda.jit(**KERNEL)
def pointwise_kernel(x, y, mode, alpha, gamma, gscale, want_grad, g, keep, out, acc):
    """The elementwise losses of _cpu/rows.py's pointwise_row (0 focal, 1 kl_div,
    2 kl_div with log targets)."""
    sm = cuda.shared.array(SHARED, np.float64)
    n, L = x.shape
    total = n * L
    start, step, trips = _grid_loop(total)
    part = 0.0
    for k in range(trips):
        e = start + k * step
        if e < total:
            i = e // L
            j = e % L
            v = decode(x[i, j])
            t = decode(y[i, j])
            one = cast_like(1.0, v)
            zero = cast_like(0.0, v)
            gv = zero
            if mode == 0:
                ex = math.exp(-abs(v))
                s = one / (one + ex)
                p = s if v >= zero else ex * s
                q = ex * s if v >= zero else s
                ce = (v if v > zero else zero) - v * t + math.log1p(ex)
                omp = p * (one - t) + q * t
                gm = cast_like(gamma, v)
                m = omp ** gm if gamma != 0 else one
                a = cast_like(alpha, v)
                at = a * t + (one - a) * (one - t) if alpha >= 0 else one
                rv = at * ce * m
                if want_grad:
                    dm = gm * omp ** (gm - one) if gamma != 0 else zero
                    gv = at * ((p - t) * m + ce * dm * p * q * (one - t - t))
            elif mode == 1:
                rv = (t * math.log(t) if t > zero else (zero if t == zero else
                                                        cast_like(math.nan, v))) - t * v
                gv = -t
            else:
                pt = math.exp(t)
                rv = pt * (t - v)
                gv = -pt
            if keep:
                out[i, j] = rv
            else:
                part += rv
            if want_grad:
                g[i, j] = encode(cast_like(gscale, v) * gv, g)
    if not keep:
        _grid_add(part, acc, sm, 0)


@cuda.jit(**KERNEL)
def bce_logits_kernel(x, y, w, has_w, pw, has_pw, gscale, want_grad, g, keep, out, acc):
    sm = cuda.shared.array(SHARED, np.float64)
    n, L = x.shape
    total = n * L
    start, step, trips = _grid_loop(total)
    part = 0.0
    for k in range(trips):
        e = start + k * step
        if e < total:
            i = e // L
            j = e % L
            v = decode(x[i, j])
            t = decode(y[i, j])
            one = cast_like(1.0, v)
            zero = cast_like(0.0, v)
            ex = math.exp(-abs(v))
            lp = math.log1p(ex)
            lw = one + (pw[i, j] - one) * t if has_pw else one
            pt = pw[i, j] * t if has_pw else t
            wv = w[i, j] if has_w else one
            rv = bce_logits_loss(v, t, lp, lw, pt, wv, one, zero)
            if keep:
                out[i, j] = rv
            else:
                part += rv
            if want_grad:
                gw = cast_like(gscale, v) * wv
                g[i, j] = encode(bce_logits_grad(v, t, ex, lw, gw, one, zero, pt), g)
    if not keep:
        _grid_add(part, acc, sm, 0)
