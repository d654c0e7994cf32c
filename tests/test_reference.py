"""The float64 reference against SciPy and closed forms (it is the oracle for the rest)."""

import numpy as np
import pytest
import scipy.special as sp

from xent_fast import reference as R


def test_logsumexp_softmax_match_scipy(rng):
    x = rng.standard_normal((7, 11)) * 10
    np.testing.assert_allclose(R.logsumexp(x), sp.logsumexp(x, axis=-1), rtol=1e-14)
    np.testing.assert_allclose(R.logsumexp(x, axis=0, keepdims=True),
                               sp.logsumexp(x, axis=0, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(R.softmax(x), sp.softmax(x, axis=-1), rtol=1e-13)
    np.testing.assert_allclose(R.log_softmax(x, axis=0), sp.log_softmax(x, axis=0), rtol=1e-13,
                               atol=1e-13)


def test_logsumexp_conventions():
    x = np.array([[-np.inf, -np.inf], [np.inf, 1.0], [np.nan, 1.0], [np.inf, np.nan]])
    out = R.logsumexp(x)
    assert out[0] == -np.inf and out[1] == np.inf
    assert np.isnan(out[2]) and np.isnan(out[3])
    assert R.logsumexp(np.zeros((3, 0)))[0] == -np.inf
    assert np.isnan(R.softmax(np.array([-np.inf, -np.inf]))).all()


def test_entropy_family_match_scipy(rng):
    p = rng.dirichlet(np.ones(9), 5)
    q = rng.dirichlet(np.ones(9), 5)
    np.testing.assert_allclose(R.entropy(p), sp.entr(p).sum(-1), rtol=1e-13)
    np.testing.assert_allclose(R.kl_divergence(p, q), sp.rel_entr(p, q).sum(-1), rtol=1e-13)
    np.testing.assert_allclose(R.cross_entropy(p, q), -sp.xlogy(p, q).sum(-1), rtol=1e-13)


def test_seed_article_examples():
    # a fair coin is 1 bit, a 90:10 coin 0.469 bits
    assert R.entropy([0.5, 0.5], base=2) == pytest.approx(1.0, abs=1e-15)
    assert R.entropy([0.9, 0.1], base=2) == pytest.approx(0.4690, abs=5e-5)
    # the bag of red/yellow/green balls
    p, q = [0.8, 0.1, 0.1], [0.2, 0.2, 0.6]
    assert R.entropy(p) == pytest.approx(0.639, abs=5e-4)
    assert R.cross_entropy(p, q) == pytest.approx(1.500, abs=5e-4)
    assert R.kl_divergence(p, q) == pytest.approx(0.861, abs=5e-4)
    assert R.kl_divergence(p, q) == pytest.approx(R.cross_entropy(p, q) - R.entropy(p))


def test_reference_softmax_ce_closed_form():
    x = np.array([[2.0, 1.0, 0.1]])
    expected = -np.log(np.exp(2.0) / np.exp(x).sum())
    assert R.softmax_cross_entropy(x, np.array([0])) == pytest.approx(expected, rel=1e-15)


def test_reference_bce_with_logits_closed_form():
    x, y = np.array([0.0, 2.0, -3.0]), np.array([1.0, 0.0, 1.0])
    sig = 1 / (1 + np.exp(-x))
    expected = -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
    np.testing.assert_allclose(R.binary_cross_entropy_with_logits(x, y, reduction="none"),
                               expected, rtol=1e-14)
    np.testing.assert_allclose(R.binary_cross_entropy(sig, y, reduction="none"), expected,
                               rtol=1e-14)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"z_loss": 0.1},
                                  {"weight": np.zeros(0)}, {"softcap": 2.0}],
                         ids=["plain", "smoothing", "z_loss", "weight", "softcap"])
def test_reference_softmax_ce_empty_class_axis(opts):
    """C = 0: no terms, so a row's loss is 0 (+inf with z_loss, lse = -inf), without a
    warning or a division by zero, and the same as the kernels on every CPU backend."""
    import warnings

    import xent_fast as xf

    x = np.zeros((2, 0))
    z = np.inf if "z_loss" in opts else 0.0
    for t, mean in ((np.zeros((2, 0)), z), (np.full(2, -100), np.nan)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows = R.softmax_cross_entropy(x, t, reduction="none", **opts)
            m, g = R.softmax_cross_entropy(x, t, return_grad=True, **opts)
        want = np.full(2, z if t.dtype.kind == "f" else 0.0)
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_array_equal(m, mean)
        assert g.shape == (2, 0)
        for backend in ("cpu", "parallel"):
            for red in ("none", "sum", "mean"):
                np.testing.assert_array_equal(
                    R.softmax_cross_entropy(x, t, reduction=red, **opts),
                    xf.softmax_cross_entropy(x, t, reduction=red, backend=backend, **opts),
                    err_msg=f"{backend} {red}")
