"""Distillation losses against the float64 reference and the peers' formulas:
the generalised Jensen-Shannon divergence (softmax_js_divergence)."""

import math

import numpy as np
import pytest

import xent_fast as xf
from xent_fast import reference as R

from conftest import BACKENDS, DTYPES, SIM, assert_close, assert_grad_close, tol

# (batch shape, classes): one class, a few, a wide row, an empty batch, a 3-D batch
SHAPES = [((5,), 1), ((13,), 37), ((3,), 32000), ((0,), 37), ((2, 3), 300)]
IDS = [f"{b}x{c}" for b, c in SHAPES]
BETAS = [0.0, 0.1, 0.5, 1.0]
# The simulator runs each GPU thread as a Python thread: its arrays are kept small.
ROWS = 12 if SIM else 64


def _trim(batch, dtype, backend):
    """Keep the suite's time: the simulator runs float32 only; the threaded backend
    (the same row kernels as "cpu", behind a prange) float32 and float64."""
    if SIM and dtype.name != "float32":
        pytest.skip("the simulator runs float32 only (the dtypes are the CPU's)")
    if backend == "parallel" and dtype.name not in ("float32", "float64"):
        pytest.skip("half precision on threads: the same row kernel as on 'cpu'")


def _logits(rng, shape, dtype, scale=4.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("batch,c", SHAPES, ids=IDS)
def test_jsd_against_reference(rng, batch, c, dtype, backend):
    _trim(batch, dtype, backend)
    x = _logits(rng, batch + (c,), dtype)
    xt = _logits(rng, batch + (c,), dtype)
    targets = rng.integers(0, 3, batch) - 1  # some rows at -1: ignored below
    cases = [(0.0, {}), (0.5, {"temperature": 2.5}), (1.0, {"reduction": "sum"}),
             (0.1, {"targets": targets, "ignore_index": -1}),
             (0.5, {"reduction": "none", "targets": targets, "ignore_index": -1}),
             (0.7, {"reduction": "mean"})]
    for beta, opts in cases[3:5] if SIM else cases:
        what = f"beta={beta} {sorted(opts)}"
        loss, grad = xf.softmax_js_divergence(x, xt, beta=beta, return_grad=True,
                                              backend=backend, **opts)
        rloss, rgrad = R.softmax_js_divergence(x, xt, beta=beta, return_grad=True, **opts)
        assert_close(loss, rloss, tol(dtype) * 20, atol=tol(dtype) * 20, what=what)
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_grad_close(grad, rgrad, dtype, term=1.0 / max(1, x.shape[0]), what=what)
        assert_close(xf.softmax_js_divergence(x, xt, beta=beta, backend=backend, **opts),
                     rloss, tol(dtype) * 20, atol=tol(dtype) * 20, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_ends_are_the_two_kls(rng, backend):
    """beta = 0 is KL(P||Q) (softmax_kl_divergence), beta = 1 KL(Q||P), as Liger's
    LigerJSD defines them; beta = 0.5 is symmetric and at most log 2."""
    x, xt = _logits(rng, (ROWS, 50), np.float64), _logits(rng, (ROWS, 50), np.float64)
    for red in ("batchmean", "none"):
        kw = dict(reduction=red, return_grad=True, backend=backend, temperature=1.5)
        l0, g0 = xf.softmax_js_divergence(x, xt, beta=0.0, **kw)
        lk, gk = xf.softmax_kl_divergence(x, xt, **kw)
        assert_close(l0, lk, 1e-12)
        assert_close(g0, gk, 1e-12, atol=1e-15)
        l1 = xf.softmax_js_divergence(x, xt, beta=1.0, reduction=red, backend=backend)
        assert_close(l1, R.softmax_kl_divergence(xt, x, reduction=red), 1e-12)
    half = xf.softmax_js_divergence(x, xt, beta=0.5, reduction="none", backend=backend)
    assert_close(half, xf.softmax_js_divergence(xt, x, beta=0.5, reduction="none",
                                                backend=backend), 1e-12)
    assert (half >= 0).all() and (half <= math.log(2)).all()
    assert xf.softmax_js_divergence(x, x, beta=0.3, backend=backend) == pytest.approx(0, abs=1e-15)


def _liger_jsd(torch, x, xt, beta, T):
    """Liger-Kernel's JSD formula in PyTorch (its test suite's torch reference), on the
    log-probabilities at temperature T: student x, teacher xt; batchmean."""
    lq = torch.log_softmax(x / T, -1)
    lp = torch.log_softmax(xt / T, -1)
    if beta == 0:
        rows = (lp.exp() * (lp - lq)).sum(-1)
    elif beta == 1:
        rows = (lq.exp() * (lq - lp)).sum(-1)
    else:
        m = beta * lp.exp() + (1 - beta) * lq.exp()
        lm = m.log()
        rows = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    return rows.sum() / x.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0] if SIM else [0.0, 0.25, 0.5, 0.9, 1.0])
def test_jsd_equals_liger_formula_in_float64(rng, backend, beta):
    torch = pytest.importorskip("torch")
    x, xt = _logits(rng, (ROWS, 300), np.float64), _logits(rng, (ROWS, 300), np.float64)
    tx = torch.tensor(x, requires_grad=True)
    ref = _liger_jsd(torch, tx, torch.tensor(xt), beta, 2.0)
    ref.backward()
    loss, grad = xf.softmax_js_divergence(x, xt, beta=beta, temperature=2.0, return_grad=True,
                                          backend=backend)
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    # 1e-12 of the gradient's scale: entries near 0 are q (r - k), a difference that
    # carries the rounding of its terms in either computation
    g = tx.grad.numpy()
    np.testing.assert_allclose(grad, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_adversarial_rows(backend):
    """-inf entries (one side or both), huge logits, an all -inf row, +inf and NaN."""
    x = np.array([[0.0, -np.inf, 1.0, 2.0],   # student -inf where the teacher has mass
                  [0.0, 1.0, -np.inf, 2.0],   # both -inf at one class
                  [3e38, -3e38, 1e38, 0.0],   # huge
                  [1.0, 2.0, 3.0, 4.0],       # teacher all -inf
                  [1.0, np.inf, 0.0, 0.0],    # +inf
                  [1.0, np.nan, 0.0, 0.0]])   # NaN
    xt = np.array([[1.0, 0.5, -np.inf, 0.0],
                   [2.0, -1.0, -np.inf, 0.0],
                   [-3e38, 3e38, 0.0, 1e38],
                   [-np.inf] * 4,
                   [0.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 0.0]])
    for beta in BETAS:
        for temp in (1.0, 3.0):
            loss, grad = xf.softmax_js_divergence(x, xt, beta=beta, temperature=temp,
                                                  reduction="none", return_grad=True,
                                                  backend=backend)
            rloss, rgrad = R.softmax_js_divergence(x, xt, beta=beta, temperature=temp,
                                                   reduction="none", return_grad=True)
            what = f"beta={beta} T={temp}"
            assert_close(loss, rloss, 1e-12, atol=1e-300, what=what)
            assert_close(grad, rgrad, 1e-12, atol=1e-300, what=what)
            assert np.isnan(loss[3:]).all() and np.isnan(grad[3:]).all()
    # beta in (0, 1): the student's -inf class under teacher mass is finite (M > 0 there)
    assert np.isfinite(xf.softmax_js_divergence(x[:1], xt[:1], beta=0.5, backend=backend))
    assert xf.softmax_js_divergence(x[:1], xt[:1], beta=0.0, backend=backend) == np.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_masks_layouts_and_in_place(rng, backend):
    x = _logits(rng, (6, 9, 4), np.float32)
    xt = _logits(rng, (6, 9, 4), np.float32)
    t = rng.integers(0, 9, (6, 4))
    t[0] = -100
    kw = dict(beta=0.4, axis=1, targets=t, return_grad=True)
    loss, grad = xf.softmax_js_divergence(x, xt, backend=backend, **kw)
    rloss, rgrad = R.softmax_js_divergence(x, xt, **kw)
    assert_close(loss, rloss, 1e-5)
    assert_grad_close(grad, rgrad, np.float32)
    assert (grad[0] == 0).all()
    # strided, read-only inputs are not modified; grad_out=logits writes in place
    xs = np.asfortranarray(x)
    xs.flags.writeable = False
    before = xs.copy()
    assert_close(xf.softmax_js_divergence(xs, xt, backend=backend, **kw)[0], rloss, 1e-5)
    assert (xs == before).all()
    y = x.copy()
    out = xf.softmax_js_divergence(y, xt, backend=backend, grad_out=y, beta=0.4, axis=1,
                                   targets=t)
    assert out[1] is y
    assert_grad_close(y, rgrad, np.float32)
    # all rows ignored: batchmean is NaN (0/0), sum is 0
    none = np.full((6, 4), -100)
    assert np.isnan(xf.softmax_js_divergence(x, xt, axis=1, targets=none, backend=backend))
    assert xf.softmax_js_divergence(x, xt, axis=1, targets=none, reduction="sum",
                                    backend=backend) == 0


@pytest.mark.parametrize("kw,err,msg", [
    ({"beta": 1.5}, ValueError, "beta"),
    ({"beta": "a"}, TypeError, "beta"),
    ({"temperature": 0}, ValueError, "temperature"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"targets": np.zeros(3)}, TypeError, "targets"),
    ({"targets": np.zeros(2, int)}, ValueError, "targets"),
    ({"ignore_index": 1.5, "targets": np.zeros(3, int)}, TypeError, "ignore_index"),
])
def test_jsd_errors(kw, err, msg):
    x = np.zeros((3, 4))
    with pytest.raises(err, match=msg):
        xf.softmax_js_divergence(x, x, **kw)
    with pytest.raises(ValueError, match="target_logits"):
        xf.softmax_js_divergence(x, np.zeros((3, 5)))


# ---------------------------------------------------------------------------- PyTorch
def test_torch_jsd_gradients_and_mask():
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xent_fast.torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7, 3), generator=g)
    t[2] = -100
    for beta in (0.0, 0.4, 1.0):
        for red in ("batchmean", "none", "mean"):
            def f(a, b):
                return xt.softmax_js_divergence(a, b, t, beta=beta, temperature=1.7,
                                                reduction=red)
            assert torch.autograd.gradcheck(f, (x, z))
            ref = R.softmax_js_divergence(x.detach().numpy(), z.detach().numpy(), beta=beta,
                                          temperature=1.7, axis=1, targets=t.numpy(),
                                          reduction=red)
            np.testing.assert_allclose(f(x, z).detach().numpy(), ref, rtol=1e-12, atol=1e-15)
    # the module: LigerJSD's arguments, float32, a training step's gradient
    loss = xt.JSDLoss(beta=0.5)(x.float(), z.float(), t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and (x.grad[2] == 0).all()


# ---------------------------------------------------------------------------- sparse top-k
def _topk_teacher(rng, shape, k, axis=-1):
    """(teacher logits, the k top classes of each row, their log-probabilities)."""
    z = rng.standard_normal(shape) * 3
    lz = R.log_softmax(z, axis=axis)
    idx = np.argsort(-z, axis=axis).take(np.arange(k), axis=axis)
    return z, idx, np.take_along_axis(lz, idx, axis)


SPARSE_SHAPES = [((5,), 1, 1), ((13,), 37, 5), ((3,), 32000, 64), ((0,), 37, 4),
                 ((2, 3), 300, 40), ((4,), 12, 12), ((4,), 50, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("batch,c,k", SPARSE_SHAPES, ids=lambda v: str(v))
def test_sparse_against_reference(rng, batch, c, k, dtype, backend):
    _trim(batch, dtype, backend)
    x = _logits(rng, batch + (c,), dtype)
    _, idx, lp = _topk_teacher(rng, batch + (c,), k)
    cases = [("kl", {}), ("kl", {"missing": "residual", "reduction": "sum"}),
             ("kl", {"temperature": 2.0, "reduction": "none"}),
             ("kl", {"missing": "residual", "temperature": 0.5, "reduction": "mean"}),
             ("ce", {}), ("ce", {"reduction": "none"})]
    for kind, opts in cases[:2] + cases[4:5] if SIM else cases:
        what = f"{kind} {opts}"
        name = {"kl": "softmax_kl_divergence_sparse", "ce": "softmax_cross_entropy_sparse"}[kind]
        vals = lp if kind == "kl" else np.exp(lp)
        loss, grad = getattr(xf, name)(x, idx, vals.astype(dtype), return_grad=True,
                                       backend=backend, **opts)
        rloss, rgrad = getattr(R, name)(x, idx, vals.astype(dtype), return_grad=True, **opts)
        assert_close(loss, rloss, tol(dtype) * 20, atol=tol(dtype) * 20, what=what)
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_grad_close(grad, rgrad, dtype, term=1.0 / max(1, x.shape[0]), what=what)
        assert_close(getattr(xf, name)(x, idx, vals.astype(dtype), backend=backend, **opts),
                     rloss, tol(dtype) * 20, atol=tol(dtype) * 20, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_equals_the_dense_computations(rng, backend):
    """renormalize: the dense KL against a teacher at -inf off its k classes; residual:
    the dense KL against a teacher spreading its remaining mass as the student does;
    the cross-entropy form: dense probability targets."""
    x = _logits(rng, (ROWS, 40), np.float64)
    z, idx, lp = _topk_teacher(rng, (ROWS, 40), 6)
    for temp in (1.0, 2.5):
        dense = np.full_like(z, -np.inf)
        np.put_along_axis(dense, idx, np.take_along_axis(z, idx, -1), -1)
        got = xf.softmax_kl_divergence_sparse(x, idx, lp, temperature=temp, return_grad=True,
                                              backend=backend)
        want = xf.softmax_kl_divergence(x, dense, temperature=temp, return_grad=True,
                                        backend=backend)
        assert_close(got[0], want[0], 1e-12)
        assert_close(got[1], want[1], 1e-12, atol=1e-16)
    q = R.softmax(x)
    p = np.exp(lp)
    r = 1 - p.sum(-1)
    pd = q * (r / (1 - np.take_along_axis(q, idx, -1).sum(-1)))[:, None]
    np.put_along_axis(pd, idx, p, -1)
    want = np.sum(pd * (np.log(pd) - np.log(q))) / x.shape[0]
    got = xf.softmax_kl_divergence_sparse(x, idx, lp, missing="residual", backend=backend)
    assert got == pytest.approx(want, rel=1e-12)
    pdense = np.zeros_like(x)
    np.put_along_axis(pdense, idx, p, -1)
    for red in ("mean", "none"):
        got = xf.softmax_cross_entropy_sparse(x, idx, p, reduction=red, return_grad=True,
                                              backend=backend)
        want = xf.softmax_cross_entropy(x, pdense, reduction=red, return_grad=True,
                                        backend=backend)
        assert_close(got[0], want[0], 1e-12)
        assert_close(got[1], want[1], 1e-12, atol=1e-16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_adversarial_rows_and_layouts(rng, backend):
    x = np.array([[0.0, -np.inf, 1.0, 2.0, 0.5],     # the student -inf at a teacher class
                  [3e38, -3e38, 1e38, 0.0, 1.0],     # huge
                  [-np.inf] * 5,                      # all -inf
                  [1.0, np.inf, 0.0, 0.0, 0.0],      # +inf
                  [1.0, np.nan, 0.0, 0.0, 0.0]])     # NaN
    idx = np.array([[1, 0], [0, 2], [0, 1], [2, 3], [3, 4]])
    lp = np.log(np.array([[0.5, 0.3], [0.2, 0.6], [0.5, 0.5], [0.4, 0.4], [0.1, 0.1]]))
    lp[1, 0] = -np.inf  # a padded entry: adds nothing
    for opts in ({}, {"missing": "residual"}, {"temperature": 3.0}):
        loss, grad = xf.softmax_kl_divergence_sparse(x, idx, lp, reduction="none",
                                                     return_grad=True, backend=backend, **opts)
        rloss, rgrad = R.softmax_kl_divergence_sparse(x, idx, lp, reduction="none",
                                                      return_grad=True, **opts)
        assert_close(loss, rloss, 1e-12, atol=1e-300, what=str(opts))
        assert_close(grad, rgrad, 1e-12, atol=1e-300, what=str(opts))
        assert loss[0] == np.inf and np.isnan(loss[2:]).all() and np.isnan(grad[2:]).all()
    # class axis 1, strided read-only inputs unchanged, the gradient in place
    x3 = _logits(rng, (4, 30, 3), np.float32)
    _, i3, l3 = _topk_teacher(rng, (4, 30, 3), 5, axis=1)
    want = R.softmax_kl_divergence_sparse(x3, i3, l3, axis=1, return_grad=True)
    xs = np.asfortranarray(x3)
    xs.flags.writeable = False
    got = xf.softmax_kl_divergence_sparse(xs, i3, l3, axis=1, return_grad=True, backend=backend)
    assert_close(got[0], want[0], 1e-5)
    assert_grad_close(got[1], want[1], np.float32)
    assert (xs == x3).all()
    y = x3.copy()
    out = xf.softmax_kl_divergence_sparse(y, i3, l3, axis=1, grad_out=y, backend=backend)
    assert out[1] is y
    assert_grad_close(y, want[1], np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx,msg", [([[0, 4]], r"must lie in \[0, 4\); got 4 at \(0, 1\)"),
                                     ([[-1, 2]], r"must lie in \[0, 4\); got -1"),
                                     ([[2, 2]], "must be distinct within a row; class 2 appears twice")])
def test_sparse_index_errors(backend, idx, msg):
    x = np.zeros((1, 4))
    v = np.log(np.full((1, 2), 0.25))
    with pytest.raises(ValueError, match="teacher_indices " + msg):
        xf.softmax_kl_divergence_sparse(x, np.array(idx), v, backend=backend)
    with pytest.raises(ValueError, match="target_indices " + msg):
        xf.softmax_cross_entropy_sparse(x, np.array(idx), np.exp(v), backend=backend)


@pytest.mark.parametrize("kw,err,msg", [
    ({"missing": "drop"}, ValueError, "missing"),
    ({"temperature": -1}, ValueError, "temperature"),
    ({"reduction": "avg"}, ValueError, "reduction"),
])
def test_sparse_option_errors(kw, err, msg):
    x = np.zeros((3, 4))
    i = np.zeros((3, 1), int)
    with pytest.raises(err, match=msg):
        xf.softmax_kl_divergence_sparse(x, i, np.zeros((3, 1)), **kw)
    with pytest.raises(TypeError, match="teacher_indices must be integer"):
        xf.softmax_kl_divergence_sparse(x, i.astype(float), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="teacher_logprobs must have the shape"):
        xf.softmax_kl_divergence_sparse(x, i, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="teacher_indices must have the logits' shape"):
        xf.softmax_kl_divergence_sparse(x, np.zeros((2, 1), int), np.zeros((2, 1)))


def test_torch_sparse_kd_gradients():
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xent_fast.torch")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 20, 2, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 20, 2, generator=g, dtype=torch.float64)
    idx = torch.argsort(z, dim=1, descending=True)[:, :5]
    lp = torch.log_softmax(z, 1).gather(1, idx)
    for missing in ("renormalize", "residual"):
        for red in ("batchmean", "none"):
            def f(a):
                return xt.softmax_kl_divergence_sparse(a, idx, lp, temperature=1.5,
                                                       missing=missing, reduction=red)
            assert torch.autograd.gradcheck(f, (x,))
            ref = R.softmax_kl_divergence_sparse(x.detach().numpy(), idx.numpy(), lp.numpy(),
                                                 temperature=1.5, missing=missing, axis=1,
                                                 reduction=red)
            np.testing.assert_allclose(f(x).detach().numpy(), ref, rtol=1e-12, atol=1e-15)
    with pytest.raises(RuntimeError, match="teacher_logprobs"):
        xt.softmax_kl_divergence_sparse(x, idx, lp.clone().requires_grad_()).backward()
