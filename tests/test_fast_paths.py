"""The explicit-vector exp and row loops of ``_simd`` (AVX-512 hosts), and the scalar
loops that replace them elsewhere (``XENT_FAST_SIMD=0``)."""

import numpy as np
import pytest
from numba import njit

import xent_fast as xf
from xent_fast._cpu import avx512 as _simd
from xent_fast import reference as R

from test_runtime import _run

needs_simd = pytest.mark.skipif(not _simd.ENABLED, reason="host without AVX-512F")


@njit
def _vexp_all(x, out):
    lanes = 64 // x.itemsize
    zero = _simd.vsplat(x.dtype.type(0.0))
    for j in range(0, x.shape[0] - lanes + 1, lanes):
        _simd.vstore(out, j, _simd.vexp(_simd.vload(x, j), zero))


@needs_simd
@pytest.mark.parametrize("dtype, lo", [(np.float32, -87.3), (np.float64, -708.3)])
def test_vector_exp_is_within_about_one_ulp(dtype, lo):
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(lo, 0.0, 1 << 20), rng.uniform(-30, 0, 1 << 20),
                        rng.uniform(-1e-3, 0, 1 << 16)]).astype(dtype)
    out = np.empty_like(x)
    _vexp_all(x, out)
    ref = np.exp(x.astype(np.longdouble))
    ulp = np.abs(out - ref) / np.spacing(ref.astype(dtype)).astype(np.longdouble)
    assert float(ulp.max()) < 1.2  # measured: 0.99 (float32), 1.11 (float64)


@needs_simd
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_exp_special_values(dtype):
    big = 1e30 if dtype == np.float32 else 1e300
    x = np.array([-np.inf, np.nan, 0.0, -0.0, -big, -800.0, -1e-30, 1.0, 10.0, 80.0,
                  -20.5, -3.0, -0.25, 0.5, -60.0, -7.0], dtype)
    out = np.empty_like(x)
    _vexp_all(x, out)
    assert out[0] == 0.0 and np.isnan(out[1]) and out[2] == 1.0 and out[3] == 1.0
    assert out[4] == 0.0 and out[5] == 0.0
    np.testing.assert_allclose(out[6:], np.exp(x[6:].astype(np.float64)), rtol=3e-7)


def _rows_with_specials(c, dtype, rng):
    x = (rng.standard_normal((10, c)) * 4).astype(dtype)
    x[1, ::3] = -np.inf
    x[2] = -np.inf
    x[3, c - 1] = np.inf
    x[4, c // 2] = np.nan
    x[5] += dtype(1e4)
    x[6, c - 1] = 60.0   # the max in the last (partial) vector
    x[7, 0] = 60.0       # the max first: every later chunk rescaled by nothing
    x[8] = np.linspace(-50, 50, c)  # the max grows in every chunk
    x[9, :] = -np.finfo(dtype).max
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 7, 8, 15, 16, 17, 255, 256, 257, 4095, 4097, 32000])
def test_one_pass_row_sums_across_vector_and_chunk_edges(dtype, c):
    x = _rows_with_specials(c, dtype, np.random.default_rng(c))
    x64 = x.astype(np.float64)
    rt = 5e-7 if dtype == np.float32 else 1e-14
    with np.errstate(all="ignore"):
        want = R.logsumexp(x64)
        np.testing.assert_allclose(xf.logsumexp(x, backend="cpu"), want, rtol=rt, atol=rt)
        if c == 1 or c > 16:  # (the few-classes kernels: test_few_classes_against_...)
            t = np.arange(10) % c
            want_ce = R.softmax_cross_entropy(x64, t, reduction="none")
            got_ce = xf.softmax_cross_entropy(x, t, reduction="none", backend="cpu")
            np.testing.assert_allclose(got_ce, want_ce, rtol=rt * 10, atol=rt * 10)
        sm = xf.softmax(x, backend="cpu")
        # exp(x - max) of a tiny probability inherits the rounding of x - max: a
        # relative error of |x - max| eps, so tiny values get an absolute bound.
        np.testing.assert_allclose(sm, R.softmax(x64), rtol=rt * 4, atol=rt * 1e-12)


def test_scalar_loops_without_simd(tmp_path):
    from xent_fast._cpu import avx512 as _simd

    if not _simd.ENABLED:
        pytest.skip("no AVX-512 on this CPU: the whole suite runs the scalar loops")
    out = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast import reference as R
        from xent_fast._cpu import avx512 as _simd
        assert not _simd.ENABLED
        rng = np.random.default_rng(1)
        for dt, rt in ((np.float32, 5e-7), (np.float64, 1e-14)):
            for c in ((5,) if dt == np.float64 else ()) + (100, 1000, 2100):
                x = (rng.standard_normal((6, c)) * 3).astype(dt)
                x[1, ::2] = -np.inf
                t = rng.integers(0, c, 6)
                np.testing.assert_allclose(xf.logsumexp(x), R.logsumexp(x.astype(float)),
                                           rtol=rt)
                l, g = xf.softmax_cross_entropy(x, t, return_grad=True)
                xi = x.copy()
                l2, g2 = xf.softmax_cross_entropy(xi, t, grad_out=xi)
                np.testing.assert_allclose(g2, g, rtol=rt * 4, atol=rt * 1e-3)
                np.testing.assert_allclose(l, R.softmax_cross_entropy(x.astype(float), t),
                                           rtol=rt * 10)
        print("ok")
    """, {"XENT_FAST_SIMD": "0", "NUMBA_CACHE_DIR": str(tmp_path)})
    assert out.strip() == "ok"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_gradient_of_a_large_batch(dtype):
    # At least 32 MiB of gradient: written by non-temporal stores.  An odd class count
    # and a grad_out one element off alignment give every row an unaligned head and a
    # partial last vector.
    c = 32771
    rows = 256 if dtype == np.float32 else 128
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((rows, c)) * 3).astype(dtype)
    x[3, ::5] = -np.inf
    t = rng.integers(0, c, rows)
    t[5] = -100
    rt = 2e-5 if dtype == np.float32 else 1e-12
    for eps in (0.0, 0.1):
        _, want = R.softmax_cross_entropy(x.astype(np.float64), t, label_smoothing=eps,
                                          return_grad=True)
        g = np.empty(x.size + 1, dtype)[1:].reshape(x.shape)
        xf.softmax_cross_entropy(x, t, label_smoothing=eps, grad_out=g)
        np.testing.assert_allclose(g, want, rtol=rt, atol=rt / rows / c)
        xi = x.copy()
        xf.softmax_cross_entropy(xi, t, label_smoothing=eps, grad_out=xi)
        np.testing.assert_allclose(xi, want, rtol=rt, atol=rt / rows / c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [7, 255, 256, 257, 300, 4097, 32000])
def test_one_pass_kl_from_logits(dtype, c):
    rng = np.random.default_rng(c + 1)
    x = _rows_with_specials(c, dtype, rng)
    xt = _rows_with_specials(c, dtype, rng)[::-1].copy()
    xt[0] = (rng.standard_normal(c) * 4).astype(dtype)
    x[0, 3] = -np.inf  # target mass on a -inf logit: +inf
    rt = 2e-6 if dtype == np.float32 else 1e-12
    for temperature in (1.0, 2.5):
        with np.errstate(all="ignore"):
            got = xf.softmax_kl_divergence(x, xt, temperature=temperature, reduction="none")
            want = R.softmax_kl_divergence(x.astype(np.float64), xt.astype(np.float64),
                                           temperature=temperature, reduction="none")
        np.testing.assert_allclose(got, want, rtol=rt, atol=rt)


def _few_class_rows(n, c, dtype, rng):
    """n rows of c classes with targets, and the conventions' cases among them."""
    x = (rng.standard_normal((n, c)) * 4).astype(dtype)
    t = rng.integers(0, c, n)
    if n >= 12:
        x[1] = -np.inf                      # all -inf: +inf
        x[2, t[2]] = -np.inf                # -inf target: +inf
        x[3, (t[3] + 1) % c] = np.inf       # +inf elsewhere: NaN
        x[4, 0] = np.nan                    # NaN
        x[5, (t[5] + 1) % c] = -np.inf      # masked class: finite, exact 0 gradient
        x[6] *= 1e30 if dtype == np.float64 else 1e7  # far from 0, exps still in range
        x[7] = 0.0                          # ties
        t[8] = -100                         # ignored
        # lse^2 overflows the row's float with z_loss: redone in float64
        x[9] = 3e19 if dtype == np.float32 else np.finfo(dtype).max / 2
    return x, t


# 2 and 16 bound the few-classes path (C <= 16), 10 is the headline case, 3 is odd;
# 15, 16, 17, 33 and 300 rows put the vector blocks (16 or 8 rows) and the 128-row
# groups off their edges.
@pytest.mark.parametrize("c, dtype", [(2, np.float32), (10, np.float32), (16, np.float32),
                                      (3, np.float64)])
def test_few_classes_against_the_reference(c, dtype):
    rng = np.random.default_rng(c)
    rt = 2e-6 if dtype == np.float32 else 1e-13
    w = (rng.random(c) + 0.5).astype(dtype)
    # every option at once where the row count is odd (each combination of options is
    # a kernel of its own, and compiling them all would double this test's time)
    options = [{}] + ([{"weight": w, "label_smoothing": 0.1, "z_loss": 1e-3}]
                      if c in (3, 10) else [])
    for n in (1, 15, 17, 33, 300):
        x, t = _few_class_rows(n, c, dtype, rng)
        x64 = x.astype(np.float64)
        for kw in options:
            kw64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
                    for k, v in kw.items()}
            with np.errstate(all="ignore"):
                want, want_g = R.softmax_cross_entropy(x64, t, reduction="none",
                                                       return_grad=True, **kw64)
                got, g = xf.softmax_cross_entropy(x, t, reduction="none", return_grad=True,
                                                  backend="cpu", **kw)
            np.testing.assert_allclose(got, want, rtol=rt, atol=rt, equal_nan=True)
            np.testing.assert_allclose(g, want_g, rtol=10 * rt, atol=rt, equal_nan=True)
            xi = x.copy()
            xf.softmax_cross_entropy(xi, t, reduction="none", grad_out=xi, **kw)
            np.testing.assert_array_equal(xi, g)
            assert got.dtype == dtype
            if n >= 12 and not kw:
                assert not np.isnan(g[5]).any() and g[5, (t[5] + 1) % c] == 0
    # "mean" and "sum" add one partial sum a block of rows: on threads, several blocks
    x, t = _few_class_rows(5000, c, dtype, rng)
    x[:12] = 0.0
    with np.errstate(all="ignore"):
        for red in ("mean", "sum"):
            want = R.softmax_cross_entropy(x.astype(np.float64), t, reduction=red)
            for backend in ("cpu", "parallel") if c == 10 else ("cpu",):
                got = xf.softmax_cross_entropy(x, t, reduction=red, backend=backend)
                np.testing.assert_allclose(got, want, rtol=rt)
        if c == 10:  # on threads, with and without every option, loss and gradient
            x, t = _few_class_rows(5000, c, dtype, rng)
            w = (rng.random(c) + 0.5).astype(dtype)
            for kw in ({}, {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-3}):
                kw64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
                        for k, v in kw.items()}
                for red in ("none", "mean"):
                    want, want_g = R.softmax_cross_entropy(x.astype(np.float64), t,
                                                           reduction=red, return_grad=True,
                                                           **kw64)
                    got, g = xf.softmax_cross_entropy(x, t, reduction=red, return_grad=True,
                                                      backend="parallel", **kw)
                    np.testing.assert_allclose(got, want, rtol=rt, atol=rt, equal_nan=True)
                    np.testing.assert_allclose(g, want_g, rtol=10 * rt, atol=rt,
                                               equal_nan=True)
                    got = xf.softmax_cross_entropy(x, t, reduction=red, backend="parallel",
                                                   **kw)
                    np.testing.assert_allclose(got, want, rtol=rt, atol=rt, equal_nan=True)
