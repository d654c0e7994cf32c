"""PyTorch's cross_entropy semantics pinned by values derived by hand from its formulas.

PyTorch is not needed: each expected value below is written out from the definition
(log-softmax, weighted mean over the non-ignored targets, smoothing as PyTorch mixes it).
"""

import math

import numpy as np
import pytest

import xent_fast as xf

X = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
LSE0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))  # 3.40760596...
LSE1 = 1.0 + math.log(3.0)


def test_plain_mean():
    want = ((LSE0 - 3.0) + (LSE1 - 1.0)) / 2
    assert xf.softmax_cross_entropy(X, np.array([2, 0])) == pytest.approx(want, rel=1e-14)
    assert want == pytest.approx((0.40760596444437 + 1.09861228866811) / 2, rel=1e-12)


def test_weighted_mean_divides_by_summed_target_weight():
    w = np.array([0.5, 1.0, 2.0])
    want = (2.0 * (LSE0 - 3.0) + 0.5 * (LSE1 - 1.0)) / (2.0 + 0.5)
    got = xf.softmax_cross_entropy(X, np.array([2, 0]), weight=w)
    assert got == pytest.approx(want, rel=1e-14)


def test_ignore_index_drops_rows_from_the_mean():
    got = xf.softmax_cross_entropy(X, np.array([2, -100]))
    assert got == pytest.approx(LSE0 - 3.0, rel=1e-14)
    assert xf.softmax_cross_entropy(X, np.array([2, 5]), ignore_index=5) == \
        pytest.approx(LSE0 - 3.0, rel=1e-14)


def test_label_smoothing_mixes_uniform_mass():
    eps = 0.1
    # row 0: (1-eps)(lse - x_t) + eps/C * sum_c (lse - x_c)
    r0 = (1 - eps) * (LSE0 - 3.0) + eps / 3 * (3 * LSE0 - 6.0)
    r1 = (1 - eps) * (LSE1 - 1.0) + eps / 3 * (3 * LSE1 - 3.0)
    got = xf.softmax_cross_entropy(X, np.array([2, 0]), label_smoothing=eps, reduction="none")
    np.testing.assert_allclose(got, [r0, r1], rtol=1e-14)


def test_label_smoothing_with_weight_and_mean():
    eps, w = 0.2, np.array([0.5, 1.0, 2.0])
    logp0 = np.array([1.0, 2.0, 3.0]) - LSE0
    logp1 = np.zeros(3) + 1.0 - LSE1
    nll = (-(2.0 * logp0[2]) - 0.5 * logp1[0]) / (2.0 + 0.5)
    smooth = (-(w * logp0).sum() - (w * logp1).sum()) / (2.0 + 0.5)
    want = (1 - eps) * nll + eps / 3 * smooth
    got = xf.softmax_cross_entropy(X, np.array([2, 0]), weight=w, label_smoothing=eps)
    assert got == pytest.approx(want, rel=1e-14)


def test_probability_targets_mean_over_rows():
    p = np.array([[0.0, 0.25, 0.75], [0.5, 0.5, 0.0]])
    w = np.array([0.5, 1.0, 2.0])
    logp0 = np.array([1.0, 2.0, 3.0]) - LSE0
    logp1 = np.ones(3) - LSE1
    want = -((p[0] * w * logp0).sum() + (p[1] * w * logp1).sum()) / 2
    assert xf.softmax_cross_entropy(X, p, weight=w) == pytest.approx(want, rel=1e-14)
    eps = 0.3
    ps = p * (1 - eps) + eps / 3
    want_s = -((ps[0] * logp0).sum() + (ps[1] * logp1).sum())
    got = xf.softmax_cross_entropy(X, p, label_smoothing=eps, reduction="sum")
    assert got == pytest.approx(want_s, rel=1e-14)


def test_z_loss_and_softcap():
    got = xf.softmax_cross_entropy(X, np.array([2, 0]), z_loss=0.01, reduction="none")
    np.testing.assert_allclose(got, [LSE0 - 3.0 + 0.01 * LSE0 ** 2,
                                     LSE1 - 1.0 + 0.01 * LSE1 ** 2], rtol=1e-14)
    capped = 2.0 * np.tanh(X[0] / 2.0)
    lse_c = math.log(np.exp(capped).sum())
    got = xf.softmax_cross_entropy(X[:1], np.array([2]), softcap=2.0)
    assert got == pytest.approx(lse_c - capped[2], rel=1e-14)


def test_gradient_is_softmax_minus_onehot_over_n():
    _, g = xf.softmax_cross_entropy(X, np.array([2, 0]), return_grad=True)
    p0 = np.exp(X[0] - LSE0)
    want = np.array([p0 - [0, 0, 1], [1 / 3 - 1, 1 / 3, 1 / 3]]) / 2
    np.testing.assert_allclose(g, want, rtol=1e-13, atol=1e-16)


def test_bce_with_logits_pos_weight():
    x, y, pw = np.array([0.5, -1.0]), np.array([1.0, 0.0]), np.array([3.0, 3.0])
    sp = lambda v: math.log1p(math.exp(-v))  # -log sigmoid(v)  # noqa: E731
    want = [3.0 * sp(0.5), -(-1.0) * 0 + sp(1.0)]  # y=0: -log(1 - sigmoid(-1)) = softplus(-1)
    want[1] = math.log1p(math.exp(-1.0))
    got = xf.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-14)
