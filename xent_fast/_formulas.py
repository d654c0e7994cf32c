"""Closing formulas of a row (or of an element), written once for both backends.

Plain-Python scalar functions, compiled twice: for the CPU by ``_cpu/jit.py`` (Numba
``njit`` without "reassoc", so that the order written here is the order computed) and
for CUDA by ``_cuda/device.py`` (device functions; run as Python under the simulator).
They also run as they are on Python or NumPy scalars, which is how the tests check them
against ``reference.py``.

Each backend keeps its own exp, log and vector loops: what arrives here are the row's
statistics (max, sum of exponentials, their log, weighted sums about a pivot), and what
leaves is the loss of the row and the coefficients of its gradient.

Types.  The softmax closings (``nll_from`` excepted) work in float64 on both backends:
their operands are float64 and so are their literals.  ``nll_from`` and the element
formulas of binary cross-entropy run in the row's own precision and take their
constants (``one``, ``zero``) from the caller, typed like the input: a float literal
would widen float32 math to float64, and ``v - v`` is NaN for infinite ``v``.
"""

import math


# ---------------------------------------------------------------------------- softmax CE
def nll_from(ls, xt, m):
    """The negative log-likelihood of the target from the row's statistics:

        nll = log s - (x_t - m),    s = sum_c exp(x_c - m),  m = max_c x_c,

    in that order: lse - x_t with lse = m + log s cancels (it is 0 in float32 at
    x_t ~ m ~ 3e38, and loses log s's low digits wherever |m| >> log s).
    """
    return ls - (xt - m)


def ce_index_loss(nll, d_piv, wy, wsum, empty, wt, eps, C, z, lse):
    """Softmax cross-entropy of a row with a class-index target (float64):

        loss = (1 - eps) w_t nll + eps/C smooth + z lse^2,
        smooth = sum_c w_c (lse - x_c) = wsum (lse - piv) - sum_c w_c (x_c - piv),

    given ``d_piv`` = lse - piv and ``wy`` = sum_c w_c (x_c - piv) about the caller's
    pivot ``piv`` (a sum about a pivot neither cancels nor overflows).  An ``empty`` row
    (all logits -inf) has nll = smooth = +inf.  A target of weight 0 (or eps = 1)
    contributes exactly 0, even where its nll is inf or NaN.
    """
    smooth = wsum * d_piv - wy
    if empty:
        nll = math.inf
        smooth = math.inf
    loss = (1.0 - eps) * wt * nll if eps < 1.0 and wt != 0 else 0.0
    if eps > 0.0:
        loss += eps / C * smooth
    if z != 0.0:
        loss += z * lse * lse
    return loss


def ce_index_mass(wt, wsum, eps, C):
    """Target mass of a class-index row: a = sum_c a_c = (1 - eps) w_t + eps/C wsum."""
    return (1.0 - eps) * wt + eps / C * wsum


def ce_grad_scale(a_tot, z, lse, s, g):
    """Coefficient k of the softmax CE gradient, g dloss/dx_c = k exp(x_c - m) - g a_c:

        k = g (a + 2 z lse) / s,    a = sum_c a_c (the row's target mass).
    """
    return (a_tot + 2.0 * z * lse) / s * g


def ce_index_grad_terms(wt, eps, C, g):
    """(ke, kt): the constant parts of g dloss/dx_c for a class-index row,

        g dloss/dx_c = k exp(x_c - m) - ke w_c - [c = t] kt,
        ke = g eps/C (0 without smoothing),  kt = g (1 - eps) w_t.
    """
    ke = g * eps / C if eps > 0.0 else 0.0
    return ke, g * (1.0 - eps) * wt


def ce_prob_loss(a_tot, ay, piv, m, ls, lse, z):
    """Softmax cross-entropy of a row against target probabilities (float64):

        loss = sum_c a_c (lse - x_c) + z lse^2 = a log s - ay + a (m - piv) + z lse^2,

    with a = sum_c a_c and ay = sum_c a_c (x_c - piv) about the pivot ``piv``, log s
    ``ls`` and the row max ``m``.  All -inf logits: inf where there is target mass, else
    0; a +inf logit: a lse - (ay + a piv), as the definition gives.
    """
    if m == -math.inf:
        loss = math.inf if a_tot > 0 else 0.0
    elif m == math.inf:
        loss = a_tot * lse - (ay + a_tot * piv)
    else:
        loss = a_tot * ls - ay + a_tot * (m - piv)
    if z != 0.0:
        loss += z * lse * lse
    return loss


# ---------------------------------------------------------------------------- distillation KL
def kl_finish(d, ss, st, dm):
    """KL(softmax(x_t/T) || softmax(x/T)) of a row whose maxima are finite (float64):

        KL = D / S_t + (m_s - m_t) + (log S_s - log S_t),
        S_s = sum e_s,  S_t = sum e_t,  D = sum e_t (v_t - v_s),  e = exp(v - max v),

    v = x/T, ``dm`` = m_s - m_t (0 where D was summed over logits already shifted by
    their maxima).  log S_s - log S_t is taken as written: both sums are >= 1.
    """
    return d / st + dm + (math.log(ss) - math.log(st))


def kl_grad_scales(g, inv_t, ss, st):
    """(ks, kt) of g dKL/dx_c = ks e_s,c - kt e_t,c:  ks = g/(T S_s), kt = g/(T S_t)."""
    return g * inv_t / ss, g * inv_t / st


# ---------------------------------------------------------------------------- binary CE
def bce_logits_loss(v, t, lp, l, pt, wv, one, zero):
    """Binary cross-entropy with logits of one element, cancellation-free:

        loss = w ((1 - y) x + l softplus(-x)),  softplus(-x) = log1p(e) + max(-x, 0),
        l = 1 + (pw - 1) y,  e = exp(-|x|),  ``lp`` = log1p(e),  ``pt`` = pw y,

    written for x < 0 as w (-pw y x + l log1p(e)) and for x >= 0 as
    w ((1 - y) x + l log1p(e)): the term (1 - y) x no longer cancels against l (-x)
    (2% off in float32 at x = -1e4, y = 1e-6).  Infinite x keeps the definition's form
    (PyTorch's): +inf at x = +inf, NaN at x = -inf for 0 < y < 1.
    """
    if abs(v) == math.inf:
        fin = (one - t) * v + l * (lp + (-v if v < zero else zero))
    elif v < zero:
        fin = -pt * v + l * lp
    else:
        fin = (one - t) * v + l * lp
    return wv * fin


def bce_logits_grad(v, t, e, l, gw, one, zero, pt=None):
    """g dloss/dx of binary cross-entropy with logits, ``gw`` = g w, cancellation-free:

        g w ((1 - y) - l sigmoid(-x)) = g w ((1 - y) - pw y e) / (1 + e)   for x >= 0,
                                        g w ((1 - y) e - pw y) / (1 + e)   for x < 0,

    e = exp(-|x|) <= 1, l = 1 + (pw - 1) y, ``pt`` = pw y.  Written with sigmoid(-x),
    (1 - y) - l sigmoid(-x) cancels for x << 0 (0.999999 - 1 in float32 at x = -1e4,
    y = 1e-6: 1.3% off -pw y); here the two terms of each numerator have the gradient's
    own size or do not cancel.  x = +-inf give 1 - y and -pw y, NaN stays NaN.
    Without ``pt`` (callers that pass only l), pw y is taken as (l - 1) + y: exact
    where l = 1 (no pos_weight), as inexact as l's rounding elsewhere.
    """
    if pt is None:
        q = (l - one) + t
    else:
        q = pt
    num = ((one - t) - q * e) if v >= zero else ((one - t) * e - q)
    return gw * (num / (one + e))


# ---------------------------------------------------------------------------- concentrated rows
def log_split(k, rest):
    """log s of a row whose max carries nearly all of its mass (float64):

        log s = log k + log1p(rest / k),  s = k + rest,

    ``k`` the number of logits equal to the max m (each exp(0) = 1), ``rest`` the sum of
    exp(x - m) over the others.  Summed as one s, s = 1 + rest has lost the low digits
    of rest, and log s, the whole of a tiny result (logsumexp([0, -40]) = 4.2e-18, the
    loss of a confident right prediction), with them.
    """
    return math.log(k) + math.log1p(rest / k)


def kl_finish_logs(d, st, dm, ls_s, ls_t):
    """``kl_finish`` from log S_s and log S_t (``ls_s``, ``ls_t``) rather than the sums,
    for rows where a sum near 1 is taken through ``log_split``:

        KL = D / S_t + (m_s - m_t) + (log S_s - log S_t).
    """
    return d / st + dm + (ls_s - ls_t)
