"""Property tests (hypothesis) and gradients against finite differences of the reference."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import xent_fast as xf
from xent_fast import reference as R

from conftest import assert_close

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

logit_values = st.one_of(
    st.floats(-50, 50, allow_nan=False, width=64),
    st.just(-np.inf),
    st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False),
)


@st.composite
def logits_and_targets(draw):
    n = draw(st.integers(0, 6))
    # Each class count from 2 to 16 compiles a few-classes kernel of its own: a few of
    # them here (tests/test_fast_paths.py takes that path through its edge cases), and the
    # general kernel's counts around its vector widths.
    c = draw(st.one_of(st.sampled_from([1, 2, 3]), st.integers(17, 40)))
    x = draw(hnp.arrays(np.float64, (n, c), elements=logit_values))
    t = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    # keep each target's logit finite unless the test asks for -inf targets
    rows = np.arange(n)
    x[rows, t] = np.where(np.isfinite(x[rows, t]), x[rows, t], 0.0)
    ignored = draw(hnp.arrays(np.bool_, (n,)))
    t = np.where(ignored, -100, t)
    return x, t


@FAST
@given(logits_and_targets(), st.sampled_from(["cpu", "parallel"]),
       st.sampled_from(["mean", "sum", "none"]))
def test_ce_matches_reference(data, backend, reduction):
    x, t = data
    loss, g = xf.softmax_cross_entropy(x, t, reduction=reduction, return_grad=True,
                                       backend=backend)
    rl, rg = R.softmax_cross_entropy(x, t, reduction=reduction, return_grad=True)
    assert_close(loss, rl, 1e-9, atol=1e-9 * (1 + np.nanmax(np.abs(np.atleast_1d(rl)),
                                                            initial=0)))
    assert_close(g, rg, 1e-9, atol=1e-12)
    assert not np.isnan(g).any()


@FAST
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7),
                  elements=logit_values), st.sampled_from(["cpu", "parallel"]))
def test_logsumexp_and_log_softmax(x, backend):
    assert_close(xf.logsumexp(x, backend=backend), R.logsumexp(x), 1e-12)
    assert_close(xf.log_softmax(x, backend=backend), R.log_softmax(x), 1e-12, atol=1e-12)


@FAST
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 5), st.integers(1, 30)),
                  elements=st.floats(0, 1)), st.sampled_from(["cpu", "parallel"]))
def test_entropy_family(p, backend):
    q = p[::-1].copy()
    assert_close(xf.entropy(p, backend=backend), R.entropy(p), 1e-11, atol=1e-12)
    assert_close(xf.cross_entropy(p, q, backend=backend), R.cross_entropy(p, q), 1e-11,
                 atol=1e-12)
    assert_close(xf.kl_divergence(p, q, backend=backend), R.kl_divergence(p, q), 1e-11,
                 atol=1e-12)


# ---------------------------------------------------------------------------- finite differences
def _fd(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (float(np.sum(f(xp))) - float(np.sum(f(xm)))) / (2 * h)
    return g


# 3 classes (the few-classes kernels) and 19 (the general one)
@pytest.mark.parametrize("c", [3, 19])
@pytest.mark.parametrize("kw", [
    {}, {"weight": True}, {"label_smoothing": 0.2},
    {"z_loss": 0.05}, {"softcap": 2.0}, {"reduction": "none"},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 0.01, "softcap": 3.0,
     "reduction": "sum"},
], ids=lambda kw: ",".join(kw) or "plain")
def test_ce_gradient_matches_finite_differences(kw, c):
    rng = np.random.default_rng(7)
    if kw.get("weight") is True:
        kw = dict(kw, weight=rng.random(c) * 2 + 0.2)
    x = rng.standard_normal((4, c)) * 2
    t = np.array([0, c - 1, -100, 1])
    _, g = xf.softmax_cross_entropy(x, t, return_grad=True, **kw)
    fd = _fd(lambda z: R.softmax_cross_entropy(z, t, **kw), x)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    p = R.softmax(rng.standard_normal((4, c)))
    _, g = xf.softmax_cross_entropy(x, p, return_grad=True, **kw)
    fd = _fd(lambda z: R.softmax_cross_entropy(z, p, **kw), x)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kw", [{}, {"temperature": 3.0}, {"reduction": "sum"},
                                {"reduction": "mean"}])
def test_kl_gradient_matches_finite_differences(kw):
    rng = np.random.default_rng(8)
    x, xt = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    _, g = xf.softmax_kl_divergence(x, xt, return_grad=True, **kw)
    fd = _fd(lambda z: R.softmax_kl_divergence(z, xt, **kw), x)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kw", [{}, {"weight": np.array([0.5, 2.0, 1.0])},
                                {"pos_weight": np.array([3.0, 0.5, 1.0])},
                                {"reduction": "sum"}])
def test_bce_gradient_matches_finite_differences(kw):
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((4, 3)) * 3, rng.random((4, 3))
    _, g = xf.binary_cross_entropy_with_logits(x, y, return_grad=True, **kw)
    fd = _fd(lambda z: R.binary_cross_entropy_with_logits(z, y, **kw), x)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
