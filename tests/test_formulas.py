"""The shared closing formulas (xent_fast/_formulas.py) against the reference, in float64.

The formulas are plain Python: here they run on NumPy float64 scalars, fed with row
statistics computed by NumPy, and what they close must be the reference's loss and
gradient.  Their CPU compilation is checked to keep float32 in float32.
"""

import math

import numba
import numpy as np
import pytest

from xent_fast import _formulas as F
from xent_fast import reference as R

ONE = np.float64(1.0)
ZERO = np.float64(0.0)


def _bce_elementwise(x, y, pw, w):
    loss = np.empty(x.shape)
    grad = np.empty(x.shape)
    with np.errstate(all="ignore"):
        for j, (v, t, p, wv) in enumerate(zip(x, y, pw, w)):
            e = np.exp(-abs(v))
            lp = np.log1p(e)
            l = ONE + (p - ONE) * t
            loss[j] = F.bce_logits_loss(v, t, lp, l, p * t, wv, ONE, ZERO)
            grad[j] = F.bce_logits_grad(v, t, e, l, wv, ONE, ZERO, p * t)
    return loss, grad


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_logits(weighted):
    rng = np.random.default_rng(0)
    x = np.concatenate([[np.inf, -np.inf, -1e4, -300.0, -50.0, -20.0, 0.0, 3.0, 40.0],
                        rng.normal(0, 5, 40)])
    y = np.concatenate([[0.3, 0.3, 1e-6, 1e-6, 1e-5, 1e-4, 0.5, 0.9, 0.2],
                        rng.uniform(0, 1, 40)])
    pw = rng.uniform(0.2, 3.0, x.size) if weighted else np.ones(x.size)
    w = rng.uniform(0.2, 3.0, x.size) if weighted else np.ones(x.size)
    kw = dict(pos_weight=pw, weight=w) if weighted else {}
    want, gwant = R.binary_cross_entropy_with_logits(x, y, reduction="none",
                                                     return_grad=True, **kw)
    got, ggot = _bce_elementwise(x, y, pw, w)
    # the reference sums (1 - y) x and l softplus(-x): it is off by ~ulp(|x|) itself
    with np.errstate(invalid="ignore"):
        tol = 1e-13 * np.abs(want) + 4e-16 * w * np.maximum(pw, 1) * (np.abs(x) + 1)
        close = np.abs(got - want) <= tol
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert np.all(close | same), (got, want)
    np.testing.assert_allclose(ggot, gwant, rtol=1e-12, atol=1e-300)


def test_bce_logits_large_negative_logits_do_not_cancel():
    """(1 - y) x + softplus(-x) at x = -1e4, y = 1e-6 is 1e-2: the form -pw y x keeps
    all its digits (the sum of the two large terms kept 2 of them in float32)."""
    x = np.float32(-1e4)
    y = np.float32(1e-6)
    one, zero = np.float32(1), np.float32(0)
    e = np.float32(np.exp(-abs(x)))
    got = F.bce_logits_loss(x, y, np.float32(np.log1p(e)), one, y, one, one, zero)
    assert got.dtype == np.float32
    want = R.binary_cross_entropy_with_logits(np.float64(x), np.float64(y), reduction="none")
    assert abs(float(got) - want) <= 1e-7 * abs(want)



# The grid of the gradient's cancellation: (1 - y) - l sigmoid(-x) lost every digit of
# e = exp(-|x|) at y = 0 and most of pw y at small y, for x << 0.
BCE_GRID_X = [-1e4, -300.0, -50.0, -20.0, -1.0, 0.0, 1.0, 20.0, 50.0, 300.0, 1e4,
              np.inf, -np.inf]
BCE_GRID_Y = [0.0, 1e-6, 1e-4, 0.3, 1 - 1e-6, 1.0]


def _bce_grid(dtype):
    x, y = np.meshgrid(np.array(BCE_GRID_X, dtype), np.array(BCE_GRID_Y, dtype),
                       indexing="ij")
    return x.ravel(), y.ravel()


def _bce_grad_exact(x, y, pw, w):
    """w ((1 - y) - l / (1 + exp(x))) in 1200-digit decimal arithmetic (of the float
    inputs as they are), rounded to float64."""
    import decimal

    ctx = decimal.Context(prec=1200, Emax=10**6, Emin=-10**6)
    D = ctx.create_decimal
    x, y, pw, w = (float(a) for a in (x, y, pw, w))
    if math.isnan(x):
        return math.nan
    s = D(0) if x == math.inf else D(1) if x == -math.inf else ctx.divide(
        1, ctx.add(1, ctx.exp(D(x))))
    l = ctx.add(1, ctx.multiply(ctx.subtract(D(pw), 1), D(y)))
    return float(ctx.multiply(D(w), ctx.subtract(ctx.subtract(1, D(y)), ctx.multiply(l, s))))


@pytest.mark.parametrize("pos_weight", [None, 2.5])
def test_reference_bce_logits_grad_is_exact_far_out(pos_weight):
    """The float64 reference gradient itself, against exact arithmetic on the grid."""
    x, y = _bce_grid(np.float64)
    pw, w = (1.0, 1.0) if pos_weight is None else (pos_weight, 0.7)
    kw = {} if pos_weight is None else dict(pos_weight=pw, weight=w)
    with np.errstate(all="ignore"):
        _, got = R.binary_cross_entropy_with_logits(x, y, reduction="none",
                                                    return_grad=True, **kw)
    want = np.array([_bce_grad_exact(a, b, pw, w) for a, b in zip(x, y)])
    # 4e-15: x = 0, y = 0.3, pw = 2.5 is 0.7 - 0.725 (cancellation in the definition)
    np.testing.assert_allclose(got, want, rtol=4e-15, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("pos_weight", [None, 2.5])
def test_bce_logits_grad_does_not_cancel_for_negative_logits(pos_weight, dtype, compiled):
    """(1 - y) - l sigmoid(-x) at x = -1e4, y = 1e-6 was 0.999999 - 1 in float32 (1.3%
    off -pw y), and 0 instead of exp(x) at y = 0: over 1 + e, each numerator keeps the
    gradient's digits.  Run as Python on NumPy scalars and compiled for the CPU, with
    pw y given (every caller of pos_weight) and, where l = 1, without it (pw y = y)."""
    from xent_fast._cpu import formulas as CF

    fn = CF.bce_logits_grad if compiled else F.bce_logits_grad
    f = dtype
    x, y = _bce_grid(f)
    pw, w = (f(1), f(1)) if pos_weight is None else (f(pos_weight), f(0.7))
    one, zero = f(1), f(0)
    got = np.empty(x.shape, f)
    got_l = np.empty(x.shape, f)
    with np.errstate(all="ignore"):
        for j, (v, t) in enumerate(zip(x, y)):
            e = f(np.exp(-abs(v)))
            l = one + (pw - one) * t
            got[j] = fn(v, t, e, l, w, one, zero, pw * t)
            got_l[j] = fn(v, t, e, l, w, one, zero)
        kw = {} if pos_weight is None else dict(pos_weight=np.float64(pw),
                                                 weight=np.float64(w))
        _, want = R.binary_cross_entropy_with_logits(x.astype(np.float64),
                                                     y.astype(np.float64),
                                                     reduction="none", return_grad=True, **kw)
    rtol = 1e-6 if f is np.float32 else 1e-12
    # plus a few ulps of the numerator's terms, where the definition itself cancels
    # (x = 0, y = 0.3, pw = 2.5: 0.7 - 0.725)
    e64 = np.exp(-np.abs(x.astype(np.float64)))
    y64, pt64 = y.astype(np.float64), np.float64(pw) * y
    terms = np.float64(w) * np.where(x >= 0, (1 - y64) + pt64 * e64, (1 - y64) * e64 + pt64)
    atol = 4 * np.finfo(f).eps * terms / (1 + e64) * (pos_weight is not None)
    atol += np.finfo(f).tiny  # exp(-300) is 0 in float32
    assert np.all(np.abs(got - want) <= rtol * np.abs(want) + atol), np.c_[x, y, got, want]
    if pos_weight is None:
        np.testing.assert_array_equal(got_l, got)
    if compiled:  # float32 math stays float32
        for sig, cres in CF.bce_logits_grad.overloads.items():
            if sig[0] == numba.from_dtype(np.dtype(f)):
                assert cres.signature.return_type == sig[0]


def _rows(rng, n, c):
    x = rng.normal(0, 3, (n, c))
    x[0, 1] = -np.inf  # a masked class
    x[1] *= 1e3  # a confident row
    return x


def _stats(row, piv, w):
    m = np.max(row)
    s = np.sum(np.exp(row - m))
    ls = math.log(s)
    with np.errstate(invalid="ignore"):
        wy = np.sum(np.where(w == 0, 0.0, w * (row - piv)))
    return m, s, ls, m + ls, wy


@pytest.mark.parametrize("eps, z, weighted", [(0.0, 0.0, False), (0.1, 0.0, False),
                                              (0.1, 1e-3, True), (1.0, 0.0, True)])
def test_ce_index(eps, z, weighted):
    rng = np.random.default_rng(1)
    n, c = 6, 7
    x = _rows(rng, n, c)
    t = np.array([0, 3, 2, 6, 5, 1])
    t[0] = 2  # not the masked class
    w = rng.uniform(0.5, 2.0, c) if weighted else np.ones(c)
    want, gwant = R.softmax_cross_entropy(x, t, weight=w if weighted else None,
                                          label_smoothing=eps, z_loss=z,
                                          reduction="none", return_grad=True)
    wsum = float(np.sum(w))
    for i in range(n):
        row = x[i]
        yt = row[t[i]]
        m, s, ls, lse, wy = _stats(row, yt, w)
        nll = F.nll_from(ls, yt, m)
        loss = F.ce_index_loss(nll, nll, wy, wsum, False, w[t[i]], eps, c, z, lse)
        assert loss == pytest.approx(want[i], rel=1e-12, abs=1e-300)
        k = F.ce_grad_scale(F.ce_index_mass(w[t[i]], wsum, eps, c), z, lse, s, 1.0)
        ke, kt = F.ce_index_grad_terms(w[t[i]], eps, c, 1.0)
        g = k * np.exp(row - m) - ke * w
        g[t[i]] -= kt
        np.testing.assert_allclose(g, gwant[i], rtol=1e-12, atol=1e-15)


def test_ce_index_empty_row():
    """All -inf logits: an infinite loss, smoothed or not; nothing from a weight-0 target."""
    for eps in (0.0, 0.1):
        assert F.ce_index_loss(math.nan, -math.inf, 0.0, 3.0, True, 1.0, eps, 3, 0.0,
                               -math.inf) == math.inf
    assert F.ce_index_loss(math.inf, 0.0, 0.0, 3.0, False, 0.0, 0.0, 3, 0.0, 1.0) == 0.0


@pytest.mark.parametrize("eps, z, weighted", [(0.0, 0.0, False), (0.2, 1e-3, True)])
def test_ce_prob(eps, z, weighted):
    rng = np.random.default_rng(2)
    n, c = 5, 6
    x = _rows(rng, n, c)
    p = rng.dirichlet(np.ones(c), n)
    p[0, 1] = 0.0  # no mass on the masked class
    p[0] /= p[0].sum()
    w = rng.uniform(0.5, 2.0, c) if weighted else np.ones(c)
    want, gwant = R.softmax_cross_entropy(x, p, weight=w if weighted else None,
                                          label_smoothing=eps, z_loss=z,
                                          reduction="none", return_grad=True)
    for i in range(n):
        row = x[i]
        a = ((1 - eps) * p[i] + eps / c) * w
        m, s, ls, lse, _ = _stats(row, 0.0, w)
        with np.errstate(invalid="ignore"):
            ay = np.sum(np.where(a == 0, 0.0, a * (row - m)))
        loss = F.ce_prob_loss(a.sum(), ay, m, m, ls, lse, z)
        assert loss == pytest.approx(want[i], rel=1e-12)
        g = F.ce_grad_scale(a.sum(), z, lse, s, 1.0) * np.exp(row - m) - a
        np.testing.assert_allclose(g, gwant[i], rtol=1e-11, atol=1e-15)


def test_ce_prob_infinite_rows():
    assert F.ce_prob_loss(1.0, 0.0, 0.0, -math.inf, math.nan, -math.inf, 0.0) == math.inf
    assert F.ce_prob_loss(0.0, 0.0, 0.0, -math.inf, math.nan, -math.inf, 0.0) == 0.0
    assert math.isnan(F.ce_prob_loss(1.0, math.inf, 0.0, math.inf, math.nan, math.inf, 0.0))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl(temperature):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 3, (4, 9))
    xt = rng.normal(0, 3, (4, 9))
    xt[0, 2] = -np.inf
    want, gwant = R.softmax_kl_divergence(x, xt, temperature=temperature,
                                          reduction="none", return_grad=True)
    it = 1.0 / temperature
    for i in range(x.shape[0]):
        vs, vt = x[i] * it, xt[i] * it
        ms, mt = vs.max(), vt.max()
        es, et = np.exp(vs - ms), np.exp(vt - mt)
        with np.errstate(invalid="ignore"):
            d = np.sum(np.where(et == 0, 0.0, et * (vt - vs)))
        # the CUDA kernels' form: d about the unshifted logits, the maxima apart
        kl = F.kl_finish(d, es.sum(), et.sum(), ms - mt)
        assert kl == pytest.approx(want[i], rel=1e-11, abs=1e-15)
        # the CPU's two-pass form: each logit shifted by its row's max
        with np.errstate(invalid="ignore"):
            d0 = np.sum(np.where(et == 0, 0.0, et * ((vt - mt) - (vs - ms))))
        assert F.kl_finish(d0, es.sum(), et.sum(), 0.0) == pytest.approx(want[i], rel=1e-11,
                                                                          abs=1e-15)
        ks, kt = F.kl_grad_scales(1.0, it, es.sum(), et.sum())
        np.testing.assert_allclose(ks * es - kt * et, gwant[i], rtol=1e-12, atol=1e-15)


def test_cpu_compilation_keeps_float32():
    """Compiled for the CPU, an element formula of float32 operands returns float32
    (its constants come from the caller), and the infinite logits close as the
    reference's."""
    from xent_fast._cpu import formulas as CF

    f = np.float32
    one, zero = f(1), f(0)
    r = CF.bce_logits_loss(f(np.inf), f(0.3), zero, one, f(0.3), one, one, zero)
    assert r == np.inf
    r = CF.bce_logits_loss(f(-1e4), f(1e-6), zero, one, f(1e-6), one, one, zero)
    assert r == pytest.approx(1e-2, rel=1e-7)
    sig = CF.bce_logits_loss.signatures[-1]
    assert str(CF.bce_logits_loss.overloads[sig].signature.return_type) == "float32"
    g = CF.bce_logits_grad(f(-np.inf), f(0.3), zero, one, one, one, zero)
    assert g == pytest.approx(-0.3, rel=1e-6)
    rets = {str(c.signature.return_type) for sg, c in CF.bce_logits_grad.overloads.items()
            if str(sg[0]) == "float32"}
    assert rets == {"float32"}
    # log s - (x_t - m), not lse - x_t (0 in float32 where x_t = m = 3e38)
    assert CF.nll_from(f(0.5), f(3e38), f(3e38)) == f(0.5)
