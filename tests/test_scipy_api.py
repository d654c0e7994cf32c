"""xent_fast.scipy against SciPy itself: logsumexp (axis None/int/tuple, b of any sign,
keepdims, return_sign), softmax, log_softmax and scipy.stats.entropy, on random and
adversarial inputs."""

import numpy as np
import pytest

sp = pytest.importorskip("scipy.special")
stats = pytest.importorskip("scipy.stats")
xs = pytest.importorskip("xent_fast.scipy")

INF = np.inf
AXES = [None, 0, 1, -1, (0, 2), (1, 2), (0, 1, 2), ()]


def same(got, want, rtol=1e-12, atol=1e-300):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "parallel"])
def test_logsumexp_axes(axis, keepdims, backend):
    a = np.random.default_rng(0).standard_normal((3, 4, 5)) * 10
    same(xs.logsumexp(a, axis=axis, keepdims=keepdims, backend=backend),
         sp.logsumexp(a, axis=axis, keepdims=keepdims))


@pytest.mark.parametrize("axis", [None, 1, (0, 2)], ids=str)
@pytest.mark.parametrize("kind", ["positive", "signed", "zeros", "broadcast"])
def test_logsumexp_weights_and_sign(axis, kind):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4, 5)) * 5
    b = {"positive": rng.random((3, 4, 5)), "signed": rng.standard_normal((3, 4, 5)),
         "zeros": np.where(rng.random((3, 4, 5)) < 0.5, 0.0, rng.standard_normal((3, 4, 5))),
         "broadcast": rng.standard_normal(5)}[kind]
    for keepdims in (False, True):
        got = xs.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=True)
        want = sp.logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=True)
        same(got[0], want[0])
        same(got[1], want[1])
        with np.errstate(invalid="ignore"):
            same(xs.logsumexp(a, axis=axis, b=b, keepdims=keepdims),
                 sp.logsumexp(a, axis=axis, b=b, keepdims=keepdims))


ADVERSARIAL = [
    ([-INF, -INF], None), ([1.0, 2.0], None), ([1.0, 2.0], [0.0, 0.0]), ([INF, 1.0], None),
    ([INF, 1.0], [-1.0, 1.0]), ([1.0, 2.0], [-1.0, -1.0]), ([np.nan, 1.0], None),
    ([1.0, 2.0], [np.nan, 1.0]), ([INF, 1.0], [0.0, 1.0]), ([-INF, 1.0], [-1.0, 0.0]),
    ([1.0, 1.0], [1.0, -1.0]), ([INF, INF], [1.0, -1.0]), ([1e308, 1e308], None),
    ([-1e308, 0.0], [1.0, 2.0]), ([0.0, -40.0], None), (np.zeros(0), None), (3.5, None),
]


@pytest.mark.parametrize("a,b", ADVERSARIAL, ids=str)
def test_logsumexp_adversarial(a, b):
    with np.errstate(all="ignore"):
        got = xs.logsumexp(np.asarray(a), b=b, return_sign=True)
        want = sp.logsumexp(np.asarray(a), b=b, return_sign=True)
        same(got[0], want[0])
        same(got[1], want[1])
        same(xs.logsumexp(np.asarray(a), b=b), sp.logsumexp(np.asarray(a), b=b))


def test_logsumexp_dtypes():
    a32 = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    assert xs.logsumexp(a32).dtype == sp.logsumexp(a32).dtype == np.float32
    same(xs.logsumexp(a32, axis=1), sp.logsumexp(a32, axis=1), rtol=1e-6)
    ints = np.arange(6).reshape(2, 3)
    same(xs.logsumexp(ints, axis=0), sp.logsumexp(ints, axis=0))


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "parallel"])
def test_softmax_and_log_softmax(axis, backend):
    x = np.random.default_rng(3).standard_normal((3, 4, 5)) * 8
    x[0, 0, 0] = -INF
    same(xs.softmax(x, axis=axis, backend=backend), sp.softmax(x, axis=axis))
    # near 0 (a row's dominant class) both round x - lse: absolute error ~ eps |x|
    same(xs.log_softmax(x, axis=axis, backend=backend), sp.log_softmax(x, axis=axis),
         atol=1e-14)


def test_zero_d_and_defaults():
    same(xs.softmax(np.float64(2.0)), sp.softmax(np.float64(2.0)))
    same(xs.logsumexp(2.0), sp.logsumexp(2.0))
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    same(xs.softmax(x), sp.softmax(x))  # axis=None: one distribution over all four


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("base", [None, 2.0])
def test_entropy_as_scipy_stats(axis, base):
    rng = np.random.default_rng(4)
    pk = rng.random((4, 5)) * 3  # unnormalised, as scipy.stats.entropy allows
    qk = rng.random((4, 5))
    pk[1, 2] = 0.0
    same(xs.entropy(pk, base=base, axis=axis), stats.entropy(pk, base=base, axis=axis))
    same(xs.entropy(pk, qk, base=base, axis=axis), stats.entropy(pk, qk, base=base, axis=axis))
    same(xs.entropy([0.8, 0.1, 0.1], [0.2, 0.2, 0.6]), 0.8605448239171124)
    assert xs.entropy([0.5, 0.5], base=2) == pytest.approx(1.0, rel=1e-15)
    with pytest.raises(ValueError, match="probabilities"):
        xs.entropy([0.5, -0.5, 1.0])


def test_entropy_axis_none_undefined_distributions_and_scalars():
    """axis=None (one distribution of every element), keepdims; a distribution that
    cannot be renormalised (all zeros, an infinite entry) is NaN as in SciPy, and does
    not spoil its neighbours; an empty axis is 0; one number is one distribution."""
    rng = np.random.default_rng(6)
    pk = rng.random((4, 5))
    qk = rng.random((4, 5))
    pk[:, 1] = 0.0
    pk[2, 3] = INF
    qk[:, 2] = 0.0
    for axis in (None, 0, 1, -1):
        for keepdims in (False, True):
            same(xs.entropy(pk, axis=axis, keepdims=keepdims),
                 stats.entropy(pk, axis=axis, keepdims=keepdims))
            same(xs.entropy(pk, qk, axis=axis, base=2, keepdims=keepdims),
                 stats.entropy(pk, qk, axis=axis, base=2, keepdims=keepdims))
    assert np.isnan(xs.entropy(pk)[1]) and np.isfinite(xs.entropy(pk)[0])
    assert np.isnan(xs.entropy([1.0, 2.0], [0.0, 0.0]))
    same(xs.entropy(np.zeros((0, 3))), stats.entropy(np.zeros((0, 3))))
    same(xs.entropy(np.zeros((3, 0)), axis=1), stats.entropy(np.zeros((3, 0)), axis=1))
    same(xs.entropy(3.0), stats.entropy(3.0))
    same(xs.entropy(3.0, keepdims=True), stats.entropy(3.0, keepdims=True))
    with pytest.raises(ValueError, match=r"qk\[\(1, 0\)\] = nan"):
        xs.entropy(pk[:, :2], np.array([[0.5, 0.5], [np.nan, 1.0], [1, 1], [1, 1]]), axis=1)
    with pytest.raises(ValueError, match=r"pk\[\(0,\)\] = -0.5"):
        xs.entropy([-0.5, 1.5])


def test_errors():
    with pytest.raises(np.exceptions.AxisError):
        xs.logsumexp(np.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match="repeated axis"):
        xs.logsumexp(np.zeros((2, 3)), axis=(0, 0))
    with pytest.raises(ValueError):
        xs.logsumexp(np.zeros((2, 3)), b=np.zeros(4))


def test_logsumexp_of_complex_input_as_scipy():
    """Complex a (or b): the principal log of sum(b e^a), shifted by the largest real
    part; with return_sign the log of the modulus and a unit phase; dtypes kept."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal((3, 4)) + 3j * rng.standard_normal((3, 4))
    b = rng.standard_normal((3, 4))
    for kw in ({}, {"axis": 1}, {"axis": 0, "keepdims": True}, {"axis": 1, "b": b},
               {"axis": 1, "b": b + 1j}, {"axis": (0, 1)}):
        for sign in (False, True):
            got = xs.logsumexp(a, return_sign=sign, **kw)
            want = sp.logsumexp(a, return_sign=sign, **kw)
            for g, w in zip(got if sign else [got], want if sign else [want]):
                assert np.asarray(g).dtype == np.asarray(w).dtype
                same(g, w)
    same(xs.logsumexp(a * 300, axis=1), sp.logsumexp(a * 300, axis=1))  # shifted
    for x in (np.array([1 + 0j, 1 + np.pi * 1j]), np.array([-np.inf + 0j, -np.inf + 1j]),
              np.array([], complex), a.astype(np.complex64)):
        got, want = xs.logsumexp(x), sp.logsumexp(x)
        assert np.asarray(got).dtype == np.asarray(want).dtype
        same(got, want, rtol=1e-6)
