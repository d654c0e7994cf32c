"""Float64 NumPy reference implementations, written straight from the formulas.

The oracle for the tests and the baseline for the benchmarks: same names and options as
the public API, clarity over speed, NumPy only (nothing from the package's kernels).
Every result is float64.
"""

import math

import numpy as np


def _f64(a):
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return a.astype(np.float64)


def _last(a, axis):
    return np.moveaxis(_f64(a), axis, -1)


def _log_mass(d):
    """log(sum(exp(d))) over the last axis for d = x - max x, with the max terms (d = 0)
    split off as SciPy does: log k + log1p(rest / k), so that a row whose max carries
    nearly all of the mass keeps the digits of the rest (log(1 + 1e-18) is 0)."""
    top = d == 0
    k = np.sum(top, axis=-1)
    rest = np.sum(np.where(top, 0.0, np.exp(d)), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 0, np.log(np.maximum(k, 1)) + np.log1p(rest / np.maximum(k, 1)),
                        np.log(rest))


def _lse_last(x):
    """log-sum-exp over the last axis with the conventions of SEMANTICS.md."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if x.shape[-1] == 0:
            return np.full(x.shape[:-1], -np.inf)
        m = np.max(x, axis=-1)
        safe = np.where(np.isfinite(m), m, 0.0)
        out = safe + _log_mass(x - safe[..., None])
        out = np.where(m == -np.inf, -np.inf, out)
        out = np.where(m == np.inf, np.inf, out)
        out = np.where(np.isnan(x).any(axis=-1), np.nan, out)
    return out


def logsumexp(x, axis=-1, keepdims=False):
    out = _lse_last(_last(x, axis))
    if keepdims:
        out = np.expand_dims(out, axis)
    return out


def _log_softmax_last(x):
    """(x - m) - log(sum(exp(x - m))): keeps log 2 at x ~ 1e38 where x - lse loses it."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if x.shape[-1] == 0:
            return x.copy()
        m = np.max(x, axis=-1, keepdims=True)
        d = x - m
        out = d - _log_mass(d)[..., None]
        lse = _lse_last(x)[..., None]
        special = ~np.isfinite(lse)
        return np.where(special, x - lse, out)


def log_softmax(x, axis=-1):
    """All -inf rows are NaN throughout (0/0), and so are rows with a +inf entry
    (inf/inf), as in SciPy and PyTorch."""
    xl = _last(x, axis)
    out = _log_softmax_last(xl)
    if xl.shape[-1]:
        out = np.where(np.max(xl, axis=-1, keepdims=True) == np.inf, np.nan, out)
    return np.moveaxis(out, -1, axis)


def softmax(x, axis=-1):
    return np.exp(log_softmax(x, axis))


def _plogq(p, q):
    """p log q with 0 log q = 0 (also at q = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p == 0, 0.0, p * np.log(q))


def _check_probs(p, name):
    bad = ~(p >= 0)
    if bad.any():
        raise ValueError(f"{name} must hold probabilities")


def entropy(p, axis=-1, base=None):
    p = _last(p, axis)
    _check_probs(p, "p")
    h = -np.sum(_plogq(p, p), axis=-1)
    return h / math.log(base) if base is not None else h


def cross_entropy(p, q, axis=-1, base=None):
    p, q = _last(p, axis), _last(q, axis)
    _check_probs(p, "p")
    _check_probs(q, "q")
    h = -np.sum(_plogq(p, q), axis=-1)
    return h / math.log(base) if base is not None else h


def kl_divergence(p, q, axis=-1, base=None):
    p, q = _last(p, axis), _last(q, axis)
    _check_probs(p, "p")
    _check_probs(q, "q")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # log(p/q) = log1p((p - q)/q) where p - q is exact: no cancellation at p ~ q
        near = (p >= q / 2) & (p <= 2 * q)
        logr = np.where(near, np.log1p((p - q) / q), np.log(p) - np.log(q))
        d = np.sum(np.where(p == 0, 0.0, p * logr), axis=-1)
    return d / math.log(base) if base is not None else d


def _reduce(rows, reduction, denominator):
    if reduction == "none":
        return rows
    total = np.sum(rows)
    if reduction == "sum":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(total) / np.float64(denominator)


def _reduce_scaled(rows, reduction, den):
    """(rows reduced, the gradient's scale): "none" and "sum" as they are (scale 1),
    "mean" and "batchmean" over ``den`` (scale 1/den, NaN for none)."""
    if reduction in ("none", "sum"):
        return _reduce(rows, reduction, 1), 1.0
    return _reduce(rows, "mean", den), (1.0 / den if den else np.nan)


def softmax_cross_entropy(logits, targets, *, axis=-1, weight=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                          return_grad=False, return_z_loss=False):
    """Loss (and gradient with ``return_grad``) by the formulas of SEMANTICS.md.

    Per row: ``sum_c a_c (lse - y_c) + z_loss lse^2`` with target weights ``a_c``.

    An empty class axis (C = 0) has no terms: each row's loss is 0 (an empty sum; the
    row carries no target mass, so it is not an all ``-inf`` row's ``+inf``), label
    smoothing has no classes to spread over (``eps / C`` is taken as 0), and only
    ``z_loss lse^2`` remains, ``+inf`` since ``lse = -inf``; the gradient is empty.
    As the kernels: with probability targets ``"mean"`` is 0 over the rows.
    """
    x = _last(logits, axis)
    c = x.shape[-1]
    y = softcap * np.tanh(x / softcap) if softcap is not None else x
    t = np.asarray(targets)
    w = np.ones(c) if weight is None else _f64(weight)
    eps = float(label_smoothing)
    spread = eps / c if c else 0.0  # C = 0: no class to smooth over (and no 0/0)
    if t.dtype.kind in "iu":
        kept = t != ignore_index
        safe_t = np.where(kept, t, 0)
        onehot = np.zeros(x.shape)
        if c:  # with no classes every target is ignore_index: nothing to set
            np.put_along_axis(onehot, safe_t[..., None], 1.0, axis=-1)
        a = ((1 - eps) * onehot + spread) * w
        a = np.where(kept[..., None], a, 0.0)
        den = np.sum(np.where(kept, w[safe_t], 0.0)) if c else 0.0
    else:
        kept = np.ones(x.shape[:-1], bool)
        a = ((1 - eps) * _last(t, axis) + spread) * w
        den = np.prod(x.shape[:-1])
    lse = _lse_last(y)
    logp = _log_softmax_last(y)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(a == 0, 0.0, -a * logp)
        rows = np.sum(terms, axis=-1)
        # an all -inf row: every target logit is -inf
        rows = np.where((lse == -np.inf) & (np.sum(a, axis=-1) > 0), np.inf, rows)
        # the z-loss is not class-weighted: under "mean" it is averaged over the kept rows
        # (0 * lse^2 would be NaN where lse^2 overflows, |lse| > 1.3e154)
        zrows = z_loss * lse ** 2 if z_loss else np.zeros_like(rows)
    rows = np.where(kept, rows, 0.0)
    zrows = np.where(kept, zrows, 0.0)
    nkept = np.count_nonzero(kept)
    if reduction == "mean":
        zterm = _reduce(zrows, "mean", nkept) if z_loss else 0.0
        loss = _reduce(rows, "mean", den) + zterm
    else:
        loss = _reduce(rows + zrows, reduction, den)
        zterm = _reduce(zrows, reduction, 1)
    if not return_grad:
        return (loss, zterm) if return_z_loss else loss
    scale = zscale = 1.0
    if reduction == "mean":
        scale = 1.0 / den if den != 0 else np.nan
        zscale = 1.0 / nkept if nkept != 0 else np.nan
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(logp)
        atot = np.sum(a, axis=-1)
        g = (atot * scale)[..., None] * p - a * scale
        if z_loss:
            g = g + (2 * z_loss * zscale * lse)[..., None] * p
        # softmax is undefined on a row with a +inf logit or with no finite one
        g = np.where(np.isfinite(lse)[..., None], g, np.nan)
        if softcap is not None:
            g = g * (1 - (y / softcap) ** 2)
    g = np.where(kept[..., None], g, 0.0)
    if return_z_loss:
        return loss, zterm, np.moveaxis(g, -1, axis)
    return loss, np.moveaxis(g, -1, axis)


def softmax_kl_divergence(logits, target_logits, *, axis=-1, temperature=1.0,
                          reduction="batchmean", return_grad=False):
    s = _last(logits, axis) / temperature
    t = _last(target_logits, axis) / temperature
    with np.errstate(invalid="ignore", divide="ignore"):
        lps = _log_softmax_last(s)
        lpt = _log_softmax_last(t)
        pt = np.exp(lpt)
        rows = np.sum(np.where(pt == 0, 0.0, pt * (lpt - lps)), axis=-1)
    n = int(np.prod(s.shape[:-1]))
    loss, scale = _reduce_scaled(rows, reduction, {"batchmean": n, "mean": n * s.shape[-1]}
                                 .get(reduction, 1))
    if not return_grad:
        return loss
    g = (np.exp(lps) - pt) / temperature * scale
    return loss, np.moveaxis(g, -1, axis)


def _masked_rows(shape, targets, ignore_index):
    """Which rows count (targets != ignore_index), all when ``targets`` is None."""
    if targets is None:
        return np.ones(shape, bool)
    return np.asarray(targets) != ignore_index


def _kl_reduce(rows, keep, c, reduction):
    """Rows (0 where not kept) reduced as the KL family reduces, batchmean over the kept
    rows and mean over their elements; and the gradient's scale, 1/denominator."""
    rows = np.where(keep, rows, 0.0)
    n = int(np.sum(keep))
    return _reduce_scaled(rows, reduction, {"batchmean": n, "mean": n * c}.get(reduction, 1))


def softmax_js_divergence(logits, target_logits, *, beta=0.5, temperature=1.0, axis=-1,
                          targets=None, ignore_index=-100, reduction="batchmean",
                          return_grad=False):
    """Generalised Jensen-Shannon divergence of P = softmax(target_logits/T) (teacher)
    and Q = softmax(logits/T) (student): beta KL(P||M) + (1-beta) KL(Q||M),
    M = beta P + (1-beta) Q; beta = 0 is KL(P||Q), beta = 1 is KL(Q||P).  Gradient with
    respect to ``logits``: (1-beta)/T Q (log Q - log M - KL(Q||M)) (the two KLs' own at
    the ends)."""
    s = _last(logits, axis) / temperature
    t = _last(target_logits, axis) / temperature
    keep = _masked_rows(s.shape[:-1], targets, ignore_index)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lq = _log_softmax_last(s)
        lp = _log_softmax_last(t)
        q, p = np.exp(lq), np.exp(lp)
        if beta == 0:
            rows = np.sum(np.where(p == 0, 0.0, p * (lp - lq)), axis=-1)
            g = q - p
        elif beta == 1:
            e = np.where(q == 0, 0.0, q * (lq - lp))
            rows = np.sum(e, axis=-1)
            g = np.where(q == 0, 0.0, e - q * rows[..., None])  # no mass, no gradient
        else:
            lm = np.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
            kp = np.sum(np.where(p == 0, 0.0, p * (lp - lm)), axis=-1)
            e = np.where(q == 0, 0.0, q * (lq - lm))
            kq = np.sum(e, axis=-1)
            rows = beta * kp + (1 - beta) * kq
            g = (1 - beta) * np.where(q == 0, 0.0, e - q * kq[..., None])
        # softmax is undefined on a row with +inf or NaN, or all -inf: NaN, as the KL
        bad = ~(np.isfinite(_lse_last(s)) & np.isfinite(_lse_last(t)))
        rows = np.where(bad, np.nan, rows)
        g = np.where(bad[..., None], np.nan, g)
    loss, scale = _kl_reduce(rows, keep, s.shape[-1], reduction)
    if not return_grad:
        return loss
    g = np.where(keep[..., None], g, 0.0) / temperature * scale
    return loss, np.moveaxis(g, -1, axis)


def _sparse_parts(logits, indices, values, axis, temperature):
    """(log q of every class at T, log q at the given classes, the values, indices),
    the class axis last."""
    s = _last(logits, axis) / temperature
    idx = np.moveaxis(np.asarray(indices), axis, -1).astype(np.int64)
    v = _last(values, axis)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lq = _log_softmax_last(s)
    return lq, np.take_along_axis(lq, idx, -1), v, idx


def _sparse_grad(q, a, idx, at_idx, scale, axis, temperature):
    """scale/T (a q everywhere, ``at_idx`` at the given classes), class axis restored."""
    g = a[..., None] * q
    np.put_along_axis(g, idx, at_idx, -1)
    return np.moveaxis(g * (scale / temperature), -1, axis)


def softmax_kl_divergence_sparse(logits, teacher_indices, teacher_logprobs, *,
                                 temperature=1.0, missing="renormalize", axis=-1,
                                 reduction="batchmean", return_grad=False):
    """KL(teacher || softmax(logits/T)) with the teacher given on k distinct classes a row.

    missing="renormalize": the teacher is softmax(teacher_logprobs/T) over its k classes.
    missing="residual": the teacher's probabilities are exp(teacher_logprobs) as given
    and its remaining mass r = 1 - sum p sits on the classes outside the k, compared
    with the student's mass there: + r log(r / (1 - sum_k q)) (none when k = C)."""
    lq, lqk, lp, idx = _sparse_parts(logits, teacher_indices, teacher_logprobs, axis,
                                     temperature)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.exp(lq)
        qk = np.exp(lqk)
        if missing == "renormalize":
            lp = lp / temperature
            lp = lp - _lse_last(lp)[..., None]
        p = np.exp(lp)
        rows = np.sum(np.where(p == 0, 0.0, p * (lp - lqk)), axis=-1)
        a = np.ones(rows.shape)
        if missing == "residual":
            r = np.maximum(1.0 - np.sum(p, axis=-1), 0.0)
            if idx.shape[-1] >= lq.shape[-1]:  # no class outside the k: no residual
                r = np.zeros_like(r)
            rest = np.log1p(-np.sum(qk, axis=-1))
            rows = rows + np.where(r > 0, r * (np.log(np.where(r > 0, r, 1.0)) - rest), 0.0)
            a = 1.0 - r / np.exp(rest)  # 1 - r / (1 - sum_k q)
        bad = ~np.isfinite(_lse_last(_last(logits, axis)))
        rows = np.where(bad, np.nan, rows)
    loss, scale = _kl_reduce(rows, np.ones(rows.shape, bool), lq.shape[-1], reduction)
    if not return_grad:
        return loss
    at = (qk - p) if missing == "residual" else a[..., None] * qk - p
    g = _sparse_grad(q, a, idx, at, scale, -1, temperature)
    g = np.where(bad[..., None], np.nan, g)
    return loss, np.moveaxis(g, -1, axis)


def softmax_cross_entropy_sparse(logits, target_indices, target_probs, *, axis=-1,
                                 reduction="mean", return_grad=False):
    """-sum_j p_j log softmax(logits)[i_j]: cross-entropy with soft targets given on k
    distinct classes a row (probabilities as given, not renormalised)."""
    lq, lqk, p, idx = _sparse_parts(logits, target_indices, target_probs, axis, 1.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        rows = -np.sum(np.where(p == 0, 0.0, p * lqk), axis=-1)
        a = np.sum(p, axis=-1)
        bad = ~np.isfinite(_lse_last(_last(logits, axis)))
        rows = np.where(bad, np.nan, rows)
        n = rows.size
        loss = _reduce(rows, reduction, n)
        if not return_grad:
            return loss
        scale = (1.0 / n if n else np.nan) if reduction == "mean" else 1.0
        g = _sparse_grad(np.exp(lq), a, idx, a[..., None] * np.exp(lqk) - p, scale, -1, 1.0)
    g = np.where(bad[..., None], np.nan, g)
    return loss, np.moveaxis(g, -1, axis)


def binary_cross_entropy(probs, targets, *, weight=None, reduction="mean"):
    p, y = _f64(probs), _f64(targets)
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("probs must lie in [0, 1]")
    with np.errstate(divide="ignore"):
        lp = np.maximum(np.log(p), -100.0)
        lq = np.maximum(np.log(1 - p), -100.0)
    out = -(y * lp + (1 - y) * lq)
    if weight is not None:
        out = out * _f64(weight)
    return _reduce(out, reduction, out.size)


def binary_cross_entropy_with_logits(logits, targets, *, weight=None, pos_weight=None,
                                     reduction="mean", return_grad=False):
    x, y = _f64(logits), _f64(targets)
    pw = 1.0 if pos_weight is None else _f64(pos_weight)
    w = 1.0 if weight is None else _f64(weight)
    l = 1 + (pw - 1) * y
    softplus_neg = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0)
    out = w * ((1 - y) * x + l * softplus_neg)
    out = np.broadcast_to(out, x.shape)
    loss = _reduce(out, reduction, x.size)
    if not return_grad:
        return loss
    scale = (1.0 / x.size if x.size else np.nan) if reduction == "mean" else 1.0
    # w ((1 - y) - l sigmoid(-x)), over the common denominator 1 + e, e = exp(-|x|):
    # ((1 - y) - pw y e) for x >= 0 and ((1 - y) e - pw y) for x < 0 (the form with
    # sigmoid(-x) cancels for x << 0: 0 instead of e at y = 0, x = -50).
    e = np.exp(-np.abs(x))
    pt = pw * y
    num = np.where(x >= 0, (1 - y) - pt * e, (1 - y) * e - pt)
    g = np.broadcast_to(w * (num / (1 + e)) * scale, x.shape)
    return loss, g


def nll_loss(log_probs, targets, *, weight=None, ignore_index=-100, axis=-1,
             reduction="mean", return_grad=False):
    """PyTorch's ``nll_loss``: -w_t x_t per row (x the given log-probabilities, class
    axis ``axis``; PyTorch's is 1); "mean" divides by the summed
    weight of the non-ignored targets."""
    x = _f64(log_probs)
    if x.ndim == 1:
        axis = 0
    xl = np.moveaxis(x, axis, -1)
    t = np.asarray(targets).astype(np.int64)
    c = xl.shape[-1]
    keep = t != ignore_index
    ts = np.where(keep, t, 0)
    w = np.ones(c) if weight is None else _f64(weight)
    wt = np.where(keep, w[ts], 0.0)
    xt = np.take_along_axis(xl, ts[..., None], -1)[..., 0]
    rows = np.where(keep, -wt * xt, 0.0)
    den = np.sum(wt)
    loss = _reduce(rows, reduction, den)
    if not return_grad:
        return loss
    scale = (1.0 / den if den else np.nan) if reduction == "mean" else 1.0
    g = np.zeros(xl.shape)
    np.put_along_axis(g, ts[..., None], (-wt * scale)[..., None], -1)
    return loss, np.moveaxis(g, -1, axis)


def kl_div(input, target, *, reduction="mean", log_target=False, return_grad=False):
    """PyTorch's pointwise ``kl_div``: target (log target - input) elementwise (0 log 0
    = 0 for the target's own term), "batchmean" = sum / input.shape[0]."""
    x, t = _f64(input), _f64(target)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if log_target:
            pt = np.exp(t)
            out = pt * (t - x)
        else:
            pt = t
            out = np.where(t == 0, 0.0, t * np.log(np.where(t == 0, 1.0, t))) - t * x
    den = {"mean": out.size, "batchmean": x.shape[0] if x.ndim else 1}.get(reduction, 1)
    loss, scale = _reduce_scaled(out, reduction, den)
    if not return_grad:
        return loss
    return loss, -pt * scale


def sigmoid_focal_loss(logits, targets, *, alpha=0.25, gamma=2.0, reduction="none",
                       return_grad=False):
    """torchvision's ``sigmoid_focal_loss``: alpha_t (1 - p_t)**gamma BCE(x, y), p_t = p y
    + (1 - p)(1 - y), alpha_t = alpha y + (1 - alpha)(1 - y) (no alpha when < 0)."""
    x, y = _f64(logits), _f64(targets)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p = 1.0 / (1.0 + np.exp(-x))
        q = 1.0 / (1.0 + np.exp(x))  # 1 - p, without the cancellation
        ce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
        one_m_pt = p * (1 - y) + q * y
        mod = one_m_pt ** gamma
        at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else np.ones_like(x)
        out = at * ce * mod
        dmod = gamma * one_m_pt ** (gamma - 1) if gamma != 0 else np.zeros_like(x)
        g = at * ((p - y) * mod + ce * dmod * p * q * (1 - 2 * y))
    loss, scale = _reduce_scaled(out, reduction, out.size)
    if not return_grad:
        return loss
    return loss, g * scale


def evaluate(logits, targets, *, axis=-1, ignore_index=-100, topk=(1, 5), n_bins=15):
    """Evaluation metrics by their formulas: a dict of aggregates and per-row arrays.

    Rows whose target is ``ignore_index`` are left out of the aggregates (and get NaN
    loss and target probability and rank -1); rank = #{logits > target logit}; ECE over
    equal-width confidence bins ((b-1)/B, b/B] with correct = rank 0.  A row with a NaN
    logit has NaN loss, target probability, entropy and confidence, prediction -1 and
    rank ``np.iinfo(np.int64).max`` (never in a top k), so the means and the ECE are
    NaN and the row counts as wrong in the accuracy.
    """
    x = _last(logits, axis)
    c = x.shape[-1]
    batch = x.shape[:-1]
    x = x.reshape(-1, c)
    t = np.asarray(targets).reshape(-1)
    kept = t != ignore_index
    safe_t = np.where(kept, t, 0)
    lse = _lse_last(x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        logp = _log_softmax_last(x)
        p = np.exp(logp)
        xt = x[np.arange(x.shape[0]), safe_t] if c else np.zeros(x.shape[0])
        loss = np.where(lse == -np.inf, np.inf, -logp[np.arange(x.shape[0]), safe_t]
                        if c else np.inf)
        prob = np.exp(-loss)
        ent = -np.sum(np.where(p == 0, 0.0, p * logp), axis=-1)
        conf = np.max(p, axis=-1) if c else np.full(x.shape[0], np.nan)
        rank = np.sum(x > xt[:, None], axis=-1)
    pred = np.argmax(x, axis=-1) if c else np.zeros(x.shape[0], np.int64)
    nan = np.isnan(x).any(axis=-1)
    for a in (loss, prob, ent, conf):
        a[nan] = np.nan
    pred = np.where(nan, -1, pred)
    rank = np.where(nan, np.iinfo(np.int64).max, rank)
    n = int(kept.sum())
    k_loss, k_ent, k_prob, k_conf, k_rank = (a[kept] for a in (loss, ent, prob, conf, rank))
    mean = (lambda a: float(np.sum(a)) / n) if n else (lambda a: math.nan)
    ce = mean(k_loss)
    ece = math.nan
    if n and not np.isnan(k_conf).any():
        b = np.clip(np.ceil(k_conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
        correct = (k_rank == 0).astype(np.float64)
        ece = sum(abs(np.sum(correct[b == i]) - np.sum(k_conf[b == i]))
                  for i in range(n_bins)) / n
    with np.errstate(over="ignore"):
        ppl = float(np.exp(ce))
    rows = {"loss": np.where(kept, loss, np.nan), "target_prob": np.where(kept, prob, np.nan),
            "entropy": ent, "confidence": conf, "prediction": pred,
            "rank": np.where(kept, rank, -1), "ignored": ~kept}
    rows = {k: v.reshape(batch) for k, v in rows.items()}
    return {"count": n, "cross_entropy": ce, "perplexity": ppl,
            "accuracy": {k: (float(np.sum(k_rank < k)) / n if n else math.nan) for k in topk},
            "entropy": mean(k_ent), "target_prob": mean(k_prob), "ece": ece, "rows": rows}


def linear_cross_entropy(hidden, weight, targets, *, bias=None, axis=-1, ignore_index=-100,
                         label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                         return_grad=False):
    """The explicit computation: the logits ``hidden @ weight.T + bias`` formed in
    float64, then :func:`softmax_cross_entropy`; gradients by the chain rule."""
    h = _last(hidden, axis)
    w = _f64(weight)
    z = h @ w.T + (0.0 if bias is None else _f64(bias))
    res = softmax_cross_entropy(z, targets, ignore_index=ignore_index,
                                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                reduction=reduction, return_grad=return_grad)
    if not return_grad:
        return res
    loss, g = res
    g2 = g.reshape(-1, g.shape[-1])
    grads = (np.moveaxis(g @ w, -1, axis), g2.T @ h.reshape(-1, h.shape[-1]))
    if bias is not None:
        grads += (g2.sum(axis=0),)
    return (loss,) + grads
