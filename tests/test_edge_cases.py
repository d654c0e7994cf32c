"""SEMANTICS.md conventions, errors, layouts, and inputs left untouched."""

import numpy as np
import pytest

import xent_fast as xf
from xent_fast import reference as R

from conftest import BACKENDS, SIM, assert_close, gtol, tol

NINF, INF, NAN = -np.inf, np.inf, np.nan


@pytest.mark.parametrize("backend", BACKENDS)
def test_logsumexp_and_softmax_conventions(backend):
    x = np.array([[NINF, NINF, NINF], [INF, 1.0, 2.0], [NAN, 1.0, 2.0], [NINF, 0.0, 1e30]])
    lse = xf.logsumexp(x, backend=backend)
    assert lse[0] == NINF and lse[1] == INF and np.isnan(lse[2]) and lse[3] == 1e30
    assert xf.logsumexp(np.zeros((2, 0)), backend=backend).tolist() == [NINF, NINF]
    sm = xf.softmax(x[[0, 3]], backend=backend)
    assert np.isnan(sm[0]).all()
    assert sm[1].tolist() == [0.0, 0.0, 1.0]
    lsm = xf.log_softmax(x[[3]], backend=backend)
    assert lsm[0, 0] == NINF and lsm[0, 2] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pad", [0, 16])
def test_masked_logits_give_exact_zero_gradient(backend, dtype, pad):
    # 2 classes (the few-classes kernels) and 4 padded with -inf columns to 20 (the
    # general kernels): class counts other tests build too (each count is a kernel)
    if pad:
        x = np.array([[NINF, 1.0, 2.0, NINF], [0.5, NINF, 3.0, 1.0]], dtype)
        x = np.concatenate([x, np.full((2, pad), NINF, dtype)], axis=1)
        t, masked, bad_t = np.array([2, 0]), [(0, 0), (0, 3), (1, 1)], np.array([0, 2])
        p = np.zeros(x.shape, dtype)
        p[0, 1:3] = 0.5
        p[1, [0, 2, 3]] = [0.2, 0.4, 0.4]
    else:
        x = np.array([[NINF, 2.0], [0.5, NINF]], dtype)
        t, masked, bad_t = np.array([1, 0]), [(0, 0), (1, 1)], np.array([0, 0])
        p = np.array([[0.0, 1.0], [1.0, 0.0]], dtype)
    loss, g = xf.softmax_cross_entropy(x, t, return_grad=True, backend=backend)
    assert np.isfinite(loss)
    assert all(g[i, j] == 0.0 for i, j in masked)
    assert not np.isnan(g).any()
    rl, rg = R.softmax_cross_entropy(x, t, return_grad=True)
    assert_close(loss, rl, 1e-6)
    assert_close(g, rg, 1e-6)
    # a target whose logit is -inf gives +inf
    assert xf.softmax_cross_entropy(x, bad_t, reduction="none", backend=backend)[0] == INF
    # probability targets with zero mass on -inf logits: finite, no NaN
    loss, g = xf.softmax_cross_entropy(x, p, return_grad=True, backend=backend)
    assert np.isfinite(loss) and not np.isnan(g).any()
    assert all(g[i, j] == 0.0 for i, j in masked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [2, 20])
def test_huge_logits_stay_finite(backend, c):
    # 2 classes (few-classes kernels) and 20 (general), with the huge values in front
    x = np.full((2, c), -3e38, np.float32)
    x[0, :2] = [1e30, -1e30]
    x[1, :2] = [3e38, 3e38]
    t = np.array([0, 1])
    loss, g = xf.softmax_cross_entropy(x, t, reduction="none", return_grad=True,
                                       backend=backend)
    rl, rg = R.softmax_cross_entropy(x, t, reduction="none", return_grad=True)
    assert_close(loss, rl, 1e-6)
    assert_close(g, rg, 1e-6)
    assert np.isfinite(xf.logsumexp(x, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smoothing_and_soft_targets_at_large_logits(dtype, backend):
    # Their sums over the classes are taken about the row max: a plain sum of w_c y_c
    # cancelled (1e-5 of the loss at logits near 1e4 in float32, 1% near 1e6) and
    # overflowed near the largest float (-inf or 1e291 for a loss of log 3).
    rng = np.random.default_rng(11)
    big = np.finfo(dtype).max / 2
    x = np.concatenate([rng.standard_normal((3, 40)) + off for off in (1e4, 1e6)]
                       + [np.full((1, 40), big), np.full((1, 40), -big)]).astype(dtype)
    x[-2, 5] = big / 4
    t = np.arange(x.shape[0]) % 40
    p = rng.random(x.shape).astype(dtype)
    p /= p.sum(1, keepdims=True)
    w = np.linspace(0.5, 1.5, 40).astype(dtype)
    x64, p64, w64 = x.astype(np.float64), p.astype(np.float64), w.astype(np.float64)
    rt = 1e-6 if dtype == np.float32 else 1e-12
    # (the few-classes kernel takes its sums about the row max already, and its
    # huge rows are in test_fast_paths's few-classes test)
    for kw, kw64 in (({"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
                     ({"label_smoothing": 0.2, "weight": w}, {"label_smoothing": 0.2,
                                                              "weight": w64})):
        got = xf.softmax_cross_entropy(x, t, reduction="none", backend=backend, **kw)
        want = R.softmax_cross_entropy(x64, t, reduction="none", **kw64)
        assert_close(got, want, rt, what=str(list(kw)))
    got = xf.softmax_cross_entropy(x, p, reduction="none", backend=backend)
    assert_close(got, R.softmax_cross_entropy(x64, p64, reduction="none"), rt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch(backend):
    # 20 classes: the general kernel (the few-classes ones: tests/test_trust.py)
    x = np.random.default_rng(0).standard_normal((4, 20))
    t = np.full(4, -100)
    assert np.isnan(xf.softmax_cross_entropy(x, t, backend=backend))
    assert xf.softmax_cross_entropy(x, t, reduction="sum", backend=backend) == 0.0
    none, g = xf.softmax_cross_entropy(x, t, reduction="none", return_grad=True,
                                       backend=backend)
    assert none.tolist() == [0.0] * 4 and (g == 0).all()
    assert np.isnan(xf.softmax_cross_entropy(np.zeros((0, 20)), np.zeros(0, int),
                                             backend=backend))


def test_custom_ignore_index():
    x = np.random.default_rng(0).standard_normal((3, 3))
    t = np.array([1, 7, 2])
    got = xf.softmax_cross_entropy(x, t, ignore_index=7)
    assert got == pytest.approx(R.softmax_cross_entropy(x, t, ignore_index=7), rel=1e-12)


def test_probability_conventions():
    assert xf.entropy([1.0, 0.0]) == 0.0
    assert xf.cross_entropy([0.0, 1.0], [0.0, 1.0]) == 0.0  # 0 log 0 where q = 0 too
    assert xf.cross_entropy([0.5, 0.5], [0.0, 1.0]) == INF
    assert xf.kl_divergence([0.5, 0.5], [1.0, 0.0]) == INF
    assert xf.kl_divergence([0.0, 1.0], [0.5, 0.5]) == pytest.approx(np.log(2))
    # not renormalised (unlike scipy.stats.entropy)
    assert xf.entropy([1.0, 1.0]) == 0.0


def test_seed_article_examples():
    assert xf.entropy([0.5, 0.5], base=2) == pytest.approx(1.0, abs=1e-12)
    assert xf.entropy([0.9, 0.1], base=2) == pytest.approx(0.469, abs=5e-4)
    p, q = np.array([0.8, 0.1, 0.1]), np.array([0.2, 0.2, 0.6])
    assert xf.entropy(p) == pytest.approx(0.639, abs=5e-4)
    assert xf.cross_entropy(p, q) == pytest.approx(1.500, abs=5e-4)
    assert xf.kl_divergence(p, q) == pytest.approx(0.861, abs=5e-4)


def test_bce_clamps_logs_at_minus_100():
    p = np.array([0.0, 1.0, 0.0, 1.0])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    assert xf.binary_cross_entropy(p, y, reduction="none").tolist() == [100.0, 100.0, 0.0, 0.0]


def test_bce_with_logits_is_stable_far_out():
    x = np.array([-1000.0, 1000.0, 40.0, -40.0])
    y = np.array([0.0, 1.0, 1.0, 0.0])
    out = xf.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert np.isfinite(out).all()
    assert_close(out, R.binary_cross_entropy_with_logits(x, y, reduction="none"), 1e-12,
                 atol=1e-15)


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x = np.zeros((3, 4))
    with pytest.raises(IndexError, match=r"targets\[1\] = 4"):
        xf.softmax_cross_entropy(x, np.array([0, 4, 1]))
    with pytest.raises(IndexError, match=r"targets\[2\] = -1"):
        xf.softmax_cross_entropy(x, np.array([0, 1, -1]))
    with pytest.raises(ValueError, match="reduction"):
        xf.softmax_cross_entropy(x, np.array([0, 1, 1]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        xf.softmax_cross_entropy(x, np.array([0, 1, 1]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        xf.softmax_cross_entropy(x, np.array([0, 1, 1]), softcap=0.0)
    with pytest.raises(ValueError, match="z_loss"):
        xf.softmax_cross_entropy(x, np.array([0, 1, 1]), z_loss=-1.0)
    with pytest.raises(ValueError, match="weight"):
        xf.softmax_cross_entropy(x, np.array([0, 1, 1]), weight=np.ones(3))
    with pytest.raises(ValueError, match="targets"):
        xf.softmax_cross_entropy(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="probability targets"):
        xf.softmax_cross_entropy(x, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="temperature"):
        xf.softmax_kl_divergence(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="target_logits"):
        xf.softmax_kl_divergence(x, x[:2])
    with pytest.raises(TypeError, match="complex"):
        xf.logsumexp(np.zeros(3, complex))
    with pytest.raises(ValueError, match="probs must lie in"):
        xf.binary_cross_entropy(np.array([0.5, 1.5]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"p\[\(1, 0\)\]"):
        xf.entropy(np.array([[0.5, 0.5], [-0.1, 1.1]]))
    with pytest.raises(ValueError, match=r"q\[\(1,\)\]"):
        xf.kl_divergence(np.array([0.5, 0.5]), np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="backend"):
        xf.logsumexp(x, backend="gpu")
    with pytest.raises(ValueError, match="grad_out"):
        xf.softmax_cross_entropy(x, np.array([0, 1, 1]), grad_out=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="axis"):
        xf.logsumexp(x, axis=2)
    with pytest.raises(ValueError, match="base"):
        xf.entropy([0.5, 0.5], base=1)
    with pytest.raises(TypeError, match="axis must be an integer, got 1.5"):
        xf.logsumexp(x, axis=1.5)
    # nested lists of unequal lengths: named, not NumPy's message alone
    with pytest.raises(ValueError, match="logits is not a rectangular array"):
        xf.softmax_cross_entropy([[1.0, 2.0], [3.0]], np.array([0, 1]))
    with pytest.raises(ValueError, match="targets is not a rectangular array"):
        xf.softmax_cross_entropy(x, [[1], [0, 1], [1]])
    with pytest.raises(ValueError, match="weight is not a rectangular array"):
        xf.binary_cross_entropy_with_logits(x, x, weight=[[1.0], [1.0, 2.0]])


def test_integer_and_bool_logits_become_float64():
    out = xf.logsumexp(np.array([[1, 2, 3]]))
    assert out.dtype == np.float64
    assert out[0] == pytest.approx(R.logsumexp(np.array([1.0, 2.0, 3.0])), rel=1e-15)


# ---------------------------------------------------------------------------- layouts
def _layouts(x):
    big = np.repeat(np.repeat(x, 2, axis=0), 2, axis=1)
    ro = x.copy()
    ro.flags.writeable = False
    return {
        "strided": big[::2, ::2],
        "fortran": np.asfortranarray(x),
        "readonly": ro,
        "bigendian": x.astype(x.dtype.newbyteorder(">")),
        "transposed-view": np.ascontiguousarray(x.T).T,
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_layout_gives_the_same_answer(backend, tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 2)).astype(np.float32)  # (2 classes: kernels other tests build)
    t = rng.integers(0, 2, 6)
    want_l, want_g = xf.softmax_cross_entropy(x, t, return_grad=True, backend=backend)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=x.dtype, shape=x.shape)
    mm[...] = x
    mm.flush()
    cases = dict(_layouts(x), memmap=np.load(tmp_path / "x.npy", mmap_mode="r"))
    for name, arr in cases.items():
        before = np.array(arr, copy=True)
        loss, g = xf.softmax_cross_entropy(arr, t, return_grad=True, backend=backend)
        # equal up to summation order (vector loops peel by alignment)
        assert_close(loss, want_l, 1e-6, what=name)
        assert_close(g, want_g, 1e-6, atol=1e-8, what=name)
        np.testing.assert_array_equal(arr, before, err_msg=name)  # untouched
        assert_close(xf.logsumexp(arr, backend=backend), R.logsumexp(x), 1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_rows_at_any_row_stride_are_read_in_place(dtype):
    """Unit-stride rows at other row strides (a column slice, every other row, reversed
    rows, one row broadcast) go to the kernels without a copy, and give the answers of
    the same values in C order, for every row function and gradient.  (The row access
    is one code for every dtype: float32 for rows read as they are, float16 for rows
    widened on the way in; each dtype compiles every kernel again, ~22 s.)"""
    rng = np.random.default_rng(11)
    big = (rng.standard_normal((24, 1040)) * 3).astype(dtype)
    views = {"column-slice": big[:8, :1000], "every-other-row": big[::3, :1000],
             "reversed-rows": big[7::-1, :1000],
             "broadcast-row": np.broadcast_to(big[0, :1000], (8, 1000))}
    t = rng.integers(0, 1000, 8)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    for name, x in views.items():
        assert x.strides[-1] == x.itemsize and not x.flags.c_contiguous
        c = np.ascontiguousarray(x)
        before = np.array(x, copy=True)
        for f in ("logsumexp", "softmax", "log_softmax"):
            assert_close(getattr(xf, f)(x), getattr(xf, f)(c), tol, what=f"{name} {f}")
        loss, g = xf.softmax_cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
        want, gwant = xf.softmax_cross_entropy(c, t, return_grad=True, label_smoothing=0.1)
        assert_close(loss, want, tol, what=name)
        assert_close(g, gwant, tol, what=name)
        kl, kg = xf.softmax_kl_divergence(x, x[::-1], return_grad=True)
        kwant, kgwant = xf.softmax_kl_divergence(c, c[::-1].copy(), return_grad=True)
        assert_close(kl, kwant, tol, atol=1e-7, what=name)
        assert_close(kg, kgwant, tol, what=name)
        assert_close(xf.evaluate(x, t).cross_entropy, xf.evaluate(c, t).cross_entropy, tol)
        np.testing.assert_array_equal(x, before, err_msg=name)
    x = big[:8, :1000]  # writable column slice, gradient in place
    rest = big[:8, 1000:].copy()
    want, gwant = xf.softmax_cross_entropy(x.copy(), t, return_grad=True)
    loss, g = xf.softmax_cross_entropy(x, t, grad_out=x)
    assert g is x
    assert_close(loss, want, tol)
    assert_close(x, gwant, 0)
    np.testing.assert_array_equal(big[:8, 1000:], rest)  # the columns beside it untouched


def test_row_strided_inputs_share_the_contiguous_kernels():
    """A column slice (``logits[:, :-1]``) or every other row runs the machine code of
    the C-contiguous call of the same dtype: no second compile of the same driver."""
    from xent_fast._cpu import backend as be

    rng = np.random.default_rng(12)
    big = rng.standard_normal((12, 41)).astype(np.float32)
    c = np.ascontiguousarray(big[::2, :40])
    t = rng.integers(0, 40, 6)
    calls = [lambda a: xf.logsumexp(a), lambda a: xf.log_softmax(a),
             lambda a: xf.softmax_cross_entropy(a, t, return_grad=True),
             lambda a: xf.softmax_kl_divergence(a, c, return_grad=True),
             lambda a: xf.evaluate(a, t).cross_entropy]
    for call in calls:
        call(c)  # compiles (or loads) the kernels of C-contiguous rows
        before = dict(be._dispatchers)
        overloads = {k: len(d.overloads) for k, d in before.items()}
        for x in (big[:6, :40], big[::2, :40]):
            assert not x.flags.c_contiguous
            got, want = call(x), call(np.ascontiguousarray(x))
            for a, b in zip(got if isinstance(got, tuple) else [got],
                            want if isinstance(want, tuple) else [want]):
                assert_close(a, b, 1e-6, atol=1e-7)
        assert dict(be._dispatchers) == before
        assert {k: len(d.overloads) for k, d in be._dispatchers.items()} == overloads


def test_inputs_are_never_modified():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3))
    p = R.softmax(rng.standard_normal((5, 3)))
    t = rng.integers(0, 3, 5)
    w = rng.random(3)
    copies = [a.copy() for a in (x, p, t, w)]
    xf.softmax_cross_entropy(x, t, weight=w, label_smoothing=0.1, softcap=2.0,
                             return_grad=True)
    xf.softmax_cross_entropy(x, p, weight=w, return_grad=True)
    xf.softmax_kl_divergence(x, p, return_grad=True)
    xf.binary_cross_entropy_with_logits(x, p, weight=w, pos_weight=w, return_grad=True)
    xf.kl_divergence(p, p)
    for a, c in zip((x, p, t, w), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("c", [33, 100, 1000])  # 100, 1000: a partial last vector
def test_gradient_in_place_and_into_grad_out(backend, dtype, c):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, c)).astype(dtype)
    t = rng.integers(0, c, 8)
    # equal up to summation order (vector loops peel by alignment) and output rounding
    rt = {np.float64: 1e-13, np.float32: 1e-6, np.float16: 2e-3}[dtype]

    def same(a, b):
        assert_close(a, b, rt, atol=rt * 1e-2)

    want_l, want_g = xf.softmax_cross_entropy(x, t, return_grad=True, backend=backend)
    out = np.empty_like(x)
    l2, g2 = xf.softmax_cross_entropy(x, t, grad_out=out, backend=backend)
    assert g2 is out
    same(l2, want_l)
    same(out, want_g)
    xi = x.copy()
    l3, g3 = xf.softmax_cross_entropy(xi, t, grad_out=xi, backend=backend)
    assert g3 is xi
    same(l3, want_l)
    same(xi, want_g)
    # a Fortran-ordered grad_out is filled too
    fo = np.asfortranarray(np.empty_like(x))
    xf.softmax_cross_entropy(x, t, grad_out=fo, backend=backend)
    same(fo, want_g)
    # KL and BCE-with-logits in place
    xt = rng.standard_normal(x.shape).astype(dtype)
    _, kg = xf.softmax_kl_divergence(x, xt, return_grad=True, backend=backend)
    xk = x.copy()
    xf.softmax_kl_divergence(xk, xt, grad_out=xk, backend=backend)
    same(xk, kg)
    y = rng.random(x.shape).astype(dtype)
    _, bg = xf.binary_cross_entropy_with_logits(x, y, return_grad=True, backend=backend)
    xb = x.copy()
    xf.binary_cross_entropy_with_logits(xb, y, grad_out=xb, backend=backend)
    same(xb, bg)


def test_gpu_backend_without_a_gpu_is_a_clear_error():
    """No usable GPU (or no numba-cuda): an error that names the extra to install."""
    try:
        from numba import cuda
        if cuda.is_available():
            pytest.skip("a GPU is usable here: tests/cuda covers it")
    except ImportError:
        pass
    with pytest.raises((RuntimeError, ImportError), match=r"xent_fast\[cuda\]"):
        xf.logsumexp(np.zeros((2, 2)), backend="cuda")


def test_gpu_arrays_on_a_cpu_backend_are_refused():
    class FakeDeviceArray:  # anything exporting the CUDA array interface
        __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f4", "data": (0, False),
                                    "version": 3}

    with pytest.raises(TypeError, match="GPU array"):
        xf.logsumexp(FakeDeviceArray(), backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos_weight", [None, 2.5])
@pytest.mark.parametrize("n", [5, 16, 37, 1007])
def test_bce_with_logits_has_no_cancellation(n, pos_weight, backend):
    # (1 - y) x + log1p(exp(-|x|)) + max(-x, 0) cancels for x < 0 and small y: the
    # kernels write it as -y x + log1p(...), so every element keeps float32 accuracy.
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((3, n)) * 5).astype(np.float32)
    y = rng.random((3, n)).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, 0.0, np.nan]
    pw = None if pos_weight is None else np.float32(pos_weight)
    with np.errstate(all="ignore"):
        got, g = xf.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none",
                                                     return_grad=True, backend=backend)
        want, gw = R.binary_cross_entropy_with_logits(
            x.astype(np.float64), y.astype(np.float64), pos_weight=pos_weight,
            reduction="none", return_grad=True)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6)
    np.testing.assert_allclose(g[ok], gw[ok], rtol=1e-5, atol=2e-7)  # (1 - y) - sigmoid(-x)
    # +-inf logits: PyTorch's values (+inf loss where the wrong side is certain)
    np.testing.assert_array_equal(got[0, :2], want[0, :2])
    np.testing.assert_allclose(g[0, :2], gw[0, :2], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_mistake_gets_the_same_message_on_every_backend(backend):
    x, t = np.zeros((2, 3)), np.array([0, 1])
    msg = (r"grad_out must have the logits' shape \(2, 3\) and the gradient dtype float64; "
           r"got \(2, 3\) and float32")
    with pytest.raises(ValueError, match=msg):
        xf.softmax_cross_entropy(x, t, grad_out=np.zeros((2, 3), np.float32), backend=backend)
    with pytest.raises(ValueError, match="grad_out is read-only"):
        g = np.zeros((2, 3))
        g.flags.writeable = False
        xf.softmax_kl_divergence(x, x, grad_out=g, backend=backend)
    with pytest.raises(IndexError, match=r"targets\[1\] = 3 is not a class index in \[0, 3\)"):
        xf.softmax_cross_entropy(x, np.array([0, 3]), backend=backend)
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]; probs\[\[1\]\] = 1.5"):
        xf.binary_cross_entropy(np.array([0.5, 1.5]), np.array([0.0, 1.0]), backend=backend)
    with pytest.raises(ValueError, match=r"q must hold probabilities"):
        xf.kl_divergence(np.array([0.5, 0.5]), np.array([0.5, -0.5]), backend=backend)
    with pytest.raises(TypeError, match="logits must be real, got complex"):
        xf.softmax_cross_entropy(np.zeros((2, 3), complex), t, backend=backend)
    with pytest.raises(ValueError, match="integer targets must have the logits' shape"):
        xf.softmax_cross_entropy(x, np.array([0, 1, 2]), backend=backend)


BCE_GRID_X = [-1e4, -300.0, -50.0, -20.0, -1.0, 0.0, 1.0, 20.0, 50.0, 300.0, 1e4,
              np.inf, -np.inf]
BCE_GRID_Y = [0.0, 1e-6, 1e-4, 0.3, 1 - 1e-6, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "pos_weight,weight"])
@pytest.mark.parametrize("shape", [(6, 13), (1007,)], ids=str)  # scalar rows; vectors
def test_bce_with_logits_grad_does_not_cancel_for_negative_logits(shape, weighted, dtype,
                                                                  backend):
    # (1 - y) - l sigmoid(-x) is 0.999999 - 1 at x = -1e4, y = 1e-6 (1.3% off -pw y in
    # float32) and 0 for exp(x) at y = 0: the kernels (scalar rows, the AVX-512 vector
    # loop at 1007 unweighted float32 elements, CUDA) take it over 1 + exp(-|x|).
    n = int(np.prod(shape))
    x, y = np.meshgrid(np.array(BCE_GRID_X), np.array(BCE_GRID_Y), indexing="ij")
    x = np.resize(x.ravel(), shape).astype(dtype)
    y = np.resize(y.ravel(), shape).astype(dtype)
    kw = {}
    if weighted:
        kw = dict(pos_weight=np.full(shape[-1], 2.5, dtype),
                  weight=np.linspace(0.5, 1.5, n).astype(dtype).reshape(shape))
    with np.errstate(all="ignore"):
        _, g = xf.binary_cross_entropy_with_logits(x, y, reduction="none", return_grad=True,
                                                   backend=backend, **kw)
        _, want = R.binary_cross_entropy_with_logits(
            x.astype(np.float64), y.astype(np.float64), reduction="none", return_grad=True,
            **{k: v.astype(np.float64) for k, v in kw.items()})
    assert g.dtype == dtype
    f32 = dtype == np.float32
    # 1e-6 (1e-12) relative, plus a few ulps of the numerator's terms where the definition
    # itself cancels (x = 0, y = 0.3, pw = 2.5: 0.7 - 0.725), and float32's underflow
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    e = np.exp(-np.abs(x64))
    pt = (kw["pos_weight"].astype(np.float64) if weighted else 1.0) * y64
    w = kw["weight"].astype(np.float64) if weighted else 1.0
    terms = w * np.where(x64 >= 0, (1 - y64) + pt * e, (1 - y64) * e + pt) / (1 + e)
    eps = np.finfo(dtype).eps
    tol = (1e-6 if f32 else 1e-12) * np.abs(want) + 8 * eps * terms + np.finfo(dtype).tiny
    bad = ~(np.abs(g - want) <= tol)
    assert not bad.any(), np.c_[x[bad], y[bad], g[bad], want[bad]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 600, 3000])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_nan_in_a_row_of_minus_inf_is_nan(backend, c, sign):
    """A NaN (either sign bit) in a row of -inf: NaN, never the empty row's -inf / +inf,
    whichever chunk of a wide row holds it."""
    x = np.full((2, c), -np.inf)
    x[0, c - 1] = sign * np.nan
    x[1, 0] = sign * np.nan
    t = np.array([1, 1])
    assert np.isnan(xf.logsumexp(x, backend=backend)).all()
    assert np.isnan(xf.softmax_cross_entropy(x, t, reduction="none", backend=backend)).all()
    loss, g = xf.softmax_cross_entropy(x, t, reduction="none", return_grad=True,
                                       backend=backend)
    assert np.isnan(loss).all() and np.isnan(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 600])
def test_softmax_of_a_row_with_plus_inf_is_nan(backend, c):
    """A +inf entry makes softmax inf/inf: NaN across its row, as SciPy and PyTorch give
    (not NaN there and 0 beside it); all -inf rows are NaN too, the others untouched.
    logsumexp of such a row is +inf."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, c))
    x[0, 1] = np.inf
    x[1, :] = -np.inf
    x[2, [0, c - 1]] = np.inf
    x[3, 2] = -np.inf
    for f in ("softmax", "log_softmax"):
        got = getattr(xf, f)(x, backend=backend)
        assert np.isnan(got[:3]).all(), f
        assert not np.isnan(got[3:]).any(), f
        assert_close(got, getattr(R, f)(x), 1e-12, atol=1e-300, what=f)
        assert_close(getattr(xf, f)(x.astype(np.float32), backend=backend),
                     getattr(R, f)(x), 1e-5, atol=1e-30, what=f)
    np.testing.assert_array_equal(xf.logsumexp(x, backend=backend)[:3], [np.inf, -np.inf, np.inf])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_broadcast_weights_of_the_binary_losses(backend, dtype):
    """Weights and pos_weights broadcast over the input (per class, per row, one number,
    in full), over rows longer than one task of the CPU's elementwise kernels (16384
    columns): each task reads its own slice of them (small rows under the simulator)."""
    rng = np.random.default_rng(13)
    shape = (3, 40 if SIM else 20000)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    y = rng.random(shape).astype(dtype)
    p = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(dtype)
    rt, gt = tol(dtype), gtol(dtype)
    for ws in [shape[-1:], (3, 1), (1, 1), shape, (1, shape[-1])]:
        w = rng.random(ws) + 0.5
        pw = rng.random(shape[-1:]) * 3
        for kw in ({"weight": w}, {"pos_weight": pw}, {"weight": w, "pos_weight": pw}):
            kwd = {k: v.astype(dtype) for k, v in kw.items()}
            got, g = xf.binary_cross_entropy_with_logits(x, y, reduction="none",
                                                         return_grad=True, backend=backend,
                                                         **kwd)
            want, wg = R.binary_cross_entropy_with_logits(x, y, reduction="none",
                                                          return_grad=True, **kwd)
            assert_close(got, want, rt, atol=rt, what=f"{ws} {list(kw)}")
            assert_close(g, wg, gt, atol=gt, what=f"grad {ws} {list(kw)}")
        got = xf.binary_cross_entropy(p, y, weight=w.astype(dtype), reduction="none",
                                      backend=backend)
        want = R.binary_cross_entropy(p, y, weight=w.astype(dtype), reduction="none")
        assert_close(got, want, rt, atol=rt, what=f"bce {ws}")
