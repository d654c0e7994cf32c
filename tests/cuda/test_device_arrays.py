"""What only the CUDA backend has: device arrays of each library in and out, device
strides and in-place device gradients, rows too wide for the simulator.

Every op, option, dtype and error against the reference is tested once for all
backends, by the backend-parametrised tests of tests/test_against_reference.py,
test_edge_cases.py and test_trust.py (run for "cuda" by ``tests/test_cuda_sim.py``
under Numba's CUDA simulator, or on a GPU with ``XENT_FAST_TEST_BACKENDS=cuda``).
"""

import os

import numpy as np
import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
cuda_mod = pytest.importorskip("numba.cuda")
if not SIM and not cuda_mod.is_available():
    pytest.skip("no usable GPU (set NUMBA_ENABLE_CUDASIM=1 to use the simulator)",
                allow_module_level=True)

import xent_fast as xf  # noqa: E402
from xent_fast import reference as R  # noqa: E402

from conftest import GRAD_TOL, VALUE_RTOL  # noqa: E402

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

cuda = cuda_mod
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)] + (
    [BF16] if BF16 is not None else [])
# the suite's one tolerance table (conftest.py): CUDA is held to the CPU's accuracy
RTOL, GTOL = VALUE_RTOL, GRAD_TOL
# (batch, classes): one class; two; odd; 4-aligned narrow (vector loads); a wide row
# (a block per row: above 16 x the simulator's 64-thread block); an empty batch
SHAPES = [((3,), 1), ((5,), 2), ((7,), 37), ((6,), 64), ((2,), 1100), ((0,), 5)]
IDS = [f"{b}x{c}" for b, c in SHAPES]


def close(got, want, rtol, atol=None, what=""):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol if atol is None else atol,
                               equal_nan=True, err_msg=what)


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def dev(a):
    """A Numba device array of ``a``; bfloat16 stays a NumPy array (Numba has no
    bfloat16 dtype), which backend="cuda" copies over and back."""
    if BF16 is not None and a.dtype == BF16:
        return a
    return cuda.to_device(np.ascontiguousarray(a))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def logits(rng, shape, dtype, scale=4.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def probs(rng, shape, dtype):
    p = rng.random(shape) + 0.01
    return (p / p.sum(-1, keepdims=True)).astype(dtype)


# ---------------------------------------------------------------------------- device arrays
def test_device_arrays_in_and_out(rng):
    x = logits(rng, (9, 40), np.float32)
    d = cuda.to_device(x)
    got = xf.logsumexp(d)  # auto picks CUDA for a device array
    assert not isinstance(got, np.ndarray) and hasattr(got, "copy_to_host")
    close(host(got), R.logsumexp(x), 2e-5)
    sm = xf.softmax(d, axis=0)
    assert sm.shape == x.shape
    close(host(sm), R.softmax(x, axis=0), 2e-5)
    close(host(xf.logsumexp(d, axis=0, keepdims=True)), R.logsumexp(x, axis=0, keepdims=True),
          2e-5)
    np.testing.assert_array_equal(host(d), x)  # the input is untouched
    # strided and Fortran-ordered device arrays, read in place
    big = logits(np.random.default_rng(3), (6, 80), np.float32)
    sd = cuda.to_device(big)[1::2, ::2]
    close(host(xf.logsumexp(sd)), R.logsumexp(big[1::2, ::2]), 2e-5)
    fd = cuda.to_device(np.asfortranarray(big))
    loss, g = xf.softmax_cross_entropy(fd, np.arange(6), return_grad=True)
    want, gwant = R.softmax_cross_entropy(big, np.arange(6), return_grad=True)
    close(host(loss), want, 2e-5)
    close(host(g), gwant, 1e-5, atol=1e-5 * float(np.abs(gwant).max()))
    v = xf.logsumexp(np.log([0.25, 0.75]), backend="cuda")  # NumPy in: a NumPy scalar out
    assert isinstance(v, np.float64) and abs(v) < 1e-12
    v = xf.softmax_cross_entropy(x, np.arange(9), backend="cuda")
    assert isinstance(v, np.float32)
    close(v, R.softmax_cross_entropy(x, np.arange(9)), 2e-5)


def test_integer_device_arrays_become_float64():
    # SEMANTICS.md: integer logits are converted to float64, on the device as on the host
    xi = np.array([[1, 2, 3], [0, -4, 7]])
    got = xf.logsumexp(dev(xi))
    assert host(got).dtype == np.float64
    close(host(got), R.logsumexp(xi.astype(np.float64)), 1e-12)
    loss, g = xf.softmax_cross_entropy(dev(xi), dev(np.array([2, 0])), return_grad=True)
    close(host(loss), R.softmax_cross_entropy(xi.astype(np.float64), np.array([2, 0])), 1e-12)
    assert host(g).dtype == np.float64
    close(host(xf.binary_cross_entropy_with_logits(dev(xi), dev(np.ones((2, 3))))),
          R.binary_cross_entropy_with_logits(xi.astype(np.float64), np.ones((2, 3))), 1e-12)


def test_special_values():
    inf, nan = np.inf, np.nan
    x = np.array([[-inf, -inf, -inf, -inf], [0.0, inf, 1.0, 2.0], [1.0, nan, 2.0, 3.0],
                  [-inf, 0.0, -inf, 1.0], [1e30, -1e30, 1e30, 0.0]], np.float32)
    for name in ("logsumexp", "softmax", "log_softmax"):
        close(getattr(xf, name)(x, backend="cuda"), getattr(R, name)(x), 1e-6, what=name)
    t = np.array([0, 1, 2, 3, 0])
    close(xf.softmax_cross_entropy(x[3:], t[3:] - np.array([2, 0]), reduction="none",
                                   backend="cuda"),
          R.softmax_cross_entropy(x[3:], t[3:] - np.array([2, 0]), reduction="none"), 1e-6)
    loss, g = xf.softmax_cross_entropy(x[3:4], np.array([0]), reduction="none",
                                       return_grad=True, backend="cuda")
    assert loss[0] == np.inf
    loss, g = xf.softmax_cross_entropy(x[3:4], np.array([1]), return_grad=True,
                                       backend="cuda")
    assert np.isfinite(loss) and g[0, 0] == 0 and g[0, 2] == 0  # -inf logits: exactly 0


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=lambda d: d.name)
def test_ce_grad_in_place_and_axis1(rng, dtype):
    x = logits(rng, (3, 12, 5), dtype)  # PyTorch's (N, C, d) layout, axis=1
    t = rng.integers(0, 12, (3, 5))
    want, gwant = R.softmax_cross_entropy(x, t, axis=1, return_grad=True)
    d = dev(x)
    loss, g = xf.softmax_cross_entropy(d, t, axis=1, grad_out=d, backend="cuda")
    assert g is d
    close(host(loss), want, 1e-4)
    gh = host(d).view(dtype) if dtype == BF16 else host(d)
    close(gh, gwant, GTOL[dtype.name], atol=GTOL[dtype.name] * float(np.abs(gwant).max()))
    # the wide, vectorised path in place
    x = logits(rng, (2, 1024), dtype)
    t = rng.integers(0, 1024, 2)
    want, gwant = R.softmax_cross_entropy(x, t, reduction="sum", return_grad=True)
    d = dev(x)
    loss, _ = xf.softmax_cross_entropy(d, t, reduction="sum", grad_out=d, backend="cuda")
    close(host(loss), want, 1e-4)
    gh = host(d).view(dtype) if dtype == BF16 else host(d)
    close(gh, gwant, GTOL[dtype.name], atol=GTOL[dtype.name] * float(np.abs(gwant).max()))


def test_ce_all_ignored_and_errors(rng):
    x = logits(rng, (4, 6), np.float32)
    t = np.full(4, -100)
    assert np.isnan(xf.softmax_cross_entropy(x, t, backend="cuda"))
    assert xf.softmax_cross_entropy(x, t, reduction="sum", backend="cuda") == 0
    bad = np.array([0, 6, 1, -3])
    with pytest.raises(IndexError, match=r"targets\[1\] = 6"):
        xf.softmax_cross_entropy(dev(x), dev(bad))
    # the device error flag leaves the context usable
    close(host(xf.softmax_cross_entropy(dev(x), dev(np.array([0, 1, 2, 3])))),
          R.softmax_cross_entropy(x, np.array([0, 1, 2, 3])), 1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        xf.softmax_cross_entropy(dev(x), dev(t), label_smoothing=2.0)
    with pytest.raises(ValueError, match="reduction"):
        xf.softmax_cross_entropy(dev(x), dev(t), reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        xf.softmax_cross_entropy(dev(x), dev(np.zeros(3, np.int64)))
    with pytest.raises(ValueError, match="weight"):
        xf.softmax_cross_entropy(dev(x), dev(t), weight=np.ones(5))
    with pytest.raises(TypeError, match="GPU array"):
        xf.logsumexp(dev(x), backend="cpu")


# ---------------------------------------------------------------------------- KL, BCE
def test_bad_probabilities(rng):
    p = probs(rng, (3, 5), np.float32)
    p[2, 3] = -0.5
    with pytest.raises(ValueError, match=r"p\[\(2, 3\)\]"):
        xf.entropy(p, backend="cuda")
    q = probs(rng, (3, 5), np.float32)
    q[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"q\[\(1, 0\)\]"):
        xf.kl_divergence(probs(rng, (3, 5), np.float32), q, backend="cuda")


# ---------------------------------------------------------------------------- other libraries
def _torch_cuda():
    if SIM:
        pytest.skip("PyTorch CUDA tensors need a real GPU")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    return torch


@pytest.mark.parametrize("tdtype", ["float32", "bfloat16", "float16"])
def test_torch_tensors(rng, tdtype):
    torch = _torch_cuda()
    dt = getattr(torch, tdtype)
    x = torch.randn(6, 1000, device="cuda").mul(3).to(dt)
    t = torch.randint(0, 1000, (6,), device="cuda")
    xh = x.float().cpu().numpy().astype(np.float64)
    th = t.cpu().numpy()
    loss = xf.softmax_cross_entropy(x, t)
    assert isinstance(loss, torch.Tensor) and loss.is_cuda and loss.dtype == torch.float32
    want, gwant = R.softmax_cross_entropy(xh, th, return_grad=True)
    close(loss.item(), want, 1e-5)
    lse = xf.logsumexp(x)
    assert isinstance(lse, torch.Tensor) and lse.shape == (6,)
    close(lse.cpu().numpy(), R.logsumexp(xh), 1e-5)
    loss2, g = xf.softmax_cross_entropy(x, t, grad_out=x)  # in place, bf16 included
    assert g is x and x.dtype == dt
    tol = {"float32": 1e-5, "bfloat16": 1.6e-2, "float16": 2e-3}[tdtype]
    close(x.float().cpu().numpy(), gwant, tol, atol=tol * float(np.abs(gwant).max()))
    # requires_grad tensors and PyTorch's (N, C, d) layout
    y = torch.randn(2, 37, 3, device="cuda", requires_grad=True)
    ty = torch.randint(0, 37, (2, 3), device="cuda")
    got = xf.softmax_cross_entropy(y, ty, axis=1, reduction="none")
    close(got.cpu().numpy(), torch.nn.functional.cross_entropy(
        y.double(), ty, reduction="none").detach().cpu().numpy(), 1e-5)


def test_cupy_arrays(rng):
    if SIM:
        pytest.skip("CuPy arrays need a real GPU")
    cp = pytest.importorskip("cupy")
    x = logits(rng, (5, 64), np.float32)
    t = rng.integers(0, 64, 5)
    loss, g = xf.softmax_cross_entropy(cp.asarray(x), cp.asarray(t), return_grad=True)
    assert isinstance(loss, cp.ndarray) and isinstance(g, cp.ndarray)
    want, gwant = R.softmax_cross_entropy(x, t, return_grad=True)
    close(float(loss), want, 1e-5)
    close(cp.asnumpy(g), gwant, 1e-5, atol=1e-5 * float(np.abs(gwant).max()))


def test_large_rows_on_the_device(rng):
    """A few rows of a real vocabulary, every dtype, forward and in-place backward."""
    if SIM:
        pytest.skip("too large for the simulator")
    for dtype in DTYPES:
        x = logits(rng, (3, 128256), dtype)
        t = rng.integers(0, 128256, 3)
        want, gwant = R.softmax_cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
        loss, g = xf.softmax_cross_entropy(x, t, return_grad=True, label_smoothing=0.1,
                                           backend="cuda")
        close(loss, want, 10 * RTOL[dtype.name], what=dtype.name)
        close(np.asarray(g, np.float64), gwant, GTOL[dtype.name],
              atol=GTOL[dtype.name] * float(np.abs(gwant).max()), what=dtype.name)


def test_evaluate(rng):
    """evaluate on the device equals evaluate on the CPU, per row and in aggregate."""
    for shape in ((9, 37), (3, 1100)):
        x = logits(rng, shape, np.float32)
        x[0, :5] = -np.inf
        t = rng.integers(0, shape[1], shape[0])
        t[1] = -100
        t[2] = int(np.argmax(x[2]))
        want = xf.evaluate(x, t, topk=(1, 3), per_row=True, backend="cpu")
        got = xf.evaluate(dev(x), dev(t), topk=(1, 3), per_row=True)
        for k in ("loss", "target_prob", "entropy", "confidence"):
            close(got.rows[k], want.rows[k], 1e-5, what=k)
        for k in ("prediction", "rank", "ignored"):
            np.testing.assert_array_equal(got.rows[k], want.rows[k], err_msg=k)
        a, b = got.as_dict(), want.as_dict()
        for k in a:
            if isinstance(a[k], dict):
                for kk in a[k]:
                    close(a[k][kk], b[k][kk], 1e-5, what=f"{k}{kk}")
            elif isinstance(a[k], float):
                close(a[k], b[k], 1e-5, what=k)
            else:
                assert a[k] == b[k], k
    with pytest.raises(IndexError, match="targets"):
        xf.evaluate(dev(x), dev(np.array([0, 1, 5000])))


def test_evaluate_file_reads_each_chunk_on_the_device(rng, tmp_path, monkeypatch):
    """evaluate_file(backend="cuda") runs every chunk on the GPU (never the CPU's row
    kernel) and equals the CPU's result, targets checked with their place in the file."""
    import xent_fast._evaluate as ev

    x = logits(rng, (3, 20, 37), np.float32)
    t = rng.integers(0, 37, (3, 20))
    t[1, 4] = -100
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    want = xf.evaluate_file(tmp_path / "x.npy", tmp_path / "t.npy", topk=(1, 3),
                            per_row=True, backend="cpu")

    def no_cpu(*args, **kwargs):
        raise AssertionError("the CPU's row kernel ran under backend='cuda'")

    monkeypatch.setattr(ev, "row_stats", no_cpu)
    got = xf.evaluate_file(tmp_path / "x.npy", tmp_path / "t.npy", topk=(1, 3),
                           per_row=True, chunk_rows=7, backend="cuda")
    for k in ("loss", "target_prob", "entropy", "confidence"):
        close(got.rows[k], want.rows[k], 1e-5, what=k)
    for k in ("prediction", "rank", "ignored"):
        np.testing.assert_array_equal(got.rows[k], want.rows[k], err_msg=k)
    assert got.count == want.count == 59 and got.accuracy == want.accuracy
    close(got.cross_entropy, want.cross_entropy, 1e-5, what="cross_entropy")
    t[2, 5] = 99
    np.save(tmp_path / "t.npy", t)
    with pytest.raises(IndexError, match=r"targets\[2, 5\] = 99"):
        xf.evaluate_file(tmp_path / "x.npy", tmp_path / "t.npy", chunk_rows=7,
                         backend="cuda")


def test_evaluate_nan_rows():
    """The NaN rule on the device as on the CPU: a NaN anywhere in a row (the target's
    logit, next to +-inf, sign bit set, in a wide row) gives NaN metrics, prediction -1
    and rank int64 max; the means are NaN and the NaN rows are misses."""
    from xent_fast._evaluate import NAN_RANK

    for c in (6, 1100):
        x = np.zeros((7, c), np.float32)
        x[:, 1] = 2.0
        t = np.full(7, 1)
        x[1, 1] = np.nan                   # the target's logit
        x[2, c - 1] = np.nan               # the last class, next to +inf
        x[2, 0] = np.inf
        x[3, 0] = -np.float32(np.nan)      # sign bit set, next to -inf
        x[3, 2] = -np.inf
        x[4, 3] = np.nan
        t[4] = -100                        # ignored
        x[5, :] = -np.inf
        x[5, 4] = np.nan
        nan_rows = np.array([False, True, True, True, False, True, False])
        want = xf.evaluate(x, t, topk=(1, 3), per_row=True, backend="cpu")
        got = xf.evaluate(dev(x), dev(t), topk=(1, 3), per_row=True)
        for k in ("loss", "target_prob", "entropy", "confidence"):
            assert np.isnan(got.rows[k][nan_rows]).all(), (c, k)
            close(got.rows[k], want.rows[k], 1e-5, what=k)
        assert got.rows["prediction"][nan_rows].tolist() == [-1] * 4
        assert got.rows["rank"][nan_rows].tolist() == [NAN_RANK] * 4
        for k in ("prediction", "rank", "ignored"):
            np.testing.assert_array_equal(got.rows[k], want.rows[k], err_msg=k)
        assert got.count == 6
        for k in ("cross_entropy", "perplexity", "entropy", "target_prob", "ece"):
            assert np.isnan(getattr(got, k)), k
        assert got.accuracy == want.accuracy == {1: 2 / 6, 3: 2 / 6}


# ---------------------------------------------------------------------------- the CPU's fixes, here too
def test_z_loss_mean_is_over_kept_rows_not_summed_weight(rng):
    x = logits(rng, (6, 37), np.float32)
    t = rng.integers(0, 37, 6)
    t[2] = -100
    got = [float(host(xf.softmax_cross_entropy(dev(x), dev(t), weight=np.full(37, s),
                                               z_loss=0.1, backend="cuda")))
           for s in (1.0, 2.0, 10.0)]
    want = R.softmax_cross_entropy(x, t, weight=np.full(37, 10.0), z_loss=0.1)
    close(got, [want] * 3, 1e-5)
    w = rng.random(37) + 0.5
    loss, g = xf.softmax_cross_entropy(dev(x), dev(t), weight=w, z_loss=0.1,
                                       return_grad=True, backend="cuda")
    want, gwant = R.softmax_cross_entropy(x, t, weight=w, z_loss=0.1, return_grad=True)
    close(host(loss), want, 1e-5)
    close(host(g), gwant, 1e-5, atol=1e-6)


def test_weight_zero_target_at_minus_inf_contributes_zero(rng):
    x = logits(rng, (3, 37), np.float64)
    t = np.array([4, 5, 6])
    x[0, 4] = -np.inf
    w = np.ones(37)
    w[4] = 0.0
    for opts in (dict(), dict(label_smoothing=0.1)):
        loss, g = xf.softmax_cross_entropy(dev(x), dev(t), weight=w, reduction="none",
                                           return_grad=True, backend="cuda", **opts)
        want, gwant = R.softmax_cross_entropy(x, t, weight=w, reduction="none",
                                              return_grad=True, **opts)
        close(host(loss), want, 1e-10)
        close(host(g), gwant, 1e-10)


def test_probability_targets_near_the_largest_float32():
    x = np.array([[2e38, -2e38, 0.0]], np.float32)
    p = np.array([[0.5, 0.5, 0.0]], np.float32)
    got = float(host(xf.softmax_cross_entropy(dev(x), dev(p), backend="cuda")))
    want = R.softmax_cross_entropy(x, p)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-6)

