"""PyTorch's and torchvision's remaining losses of the family: nll_loss, pointwise
kl_div and sigmoid_focal_loss, against the float64 reference and the peers' own
formulas in float64."""

import numpy as np
import pytest

import xent_fast as xf
from xent_fast import reference as R

from conftest import BACKENDS, DTYPES, SIM, assert_close, assert_grad_close, tol

SHAPES = [(1,), (37,), (4, 37), (2, 3, 5), (0, 4), (3, 4100)]


def _trim(dtype, backend):
    if SIM and dtype.name != "float32":
        pytest.skip("the simulator runs float32 only (the dtypes are the CPU's)")
    if backend == "parallel" and dtype.name not in ("float32", "float64"):
        pytest.skip("half precision on threads: the same kernel as on 'cpu'")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pointwise_against_reference(rng, shape, dtype, backend):
    _trim(dtype, backend)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = rng.random(shape).astype(dtype)
    lp = np.log(rng.random(shape) + 0.01).astype(dtype)
    cases = [("sigmoid_focal_loss", x, y, {}),
             ("sigmoid_focal_loss", x, y, {"alpha": -1.0, "gamma": 1.5, "reduction": "mean"}),
             ("sigmoid_focal_loss", x, y, {"alpha": 0.5, "gamma": 0.0, "reduction": "sum"}),
             ("kl_div", lp, y, {}), ("kl_div", lp, y, {"reduction": "batchmean"}),
             ("kl_div", lp, np.log(y + 0.01).astype(dtype),
              {"log_target": True, "reduction": "none"})]
    for name, a, b, opts in cases:
        what = f"{name} {opts}"
        loss, grad = getattr(xf, name)(a, b, return_grad=True, backend=backend, **opts)
        rloss, rgrad = getattr(R, name)(a, b, return_grad=True, **opts)
        assert_close(loss, rloss, tol(dtype) * 20, atol=tol(dtype) * 20, what=what)
        assert grad.dtype == a.dtype and grad.shape == a.shape
        assert_grad_close(grad, rgrad, dtype, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nll_loss_against_reference(rng, dtype, backend):
    _trim(dtype, backend)
    x = np.log(rng.random((9, 37)) + 0.01).astype(dtype)
    t = rng.integers(0, 37, 9)
    t[2] = -100
    w = rng.random(37) + 0.5
    for opts in ({}, {"weight": w}, {"reduction": "sum"}, {"reduction": "none", "weight": w}):
        loss, grad = xf.nll_loss(x, t, return_grad=True, backend=backend, **opts)
        rloss, rgrad = R.nll_loss(x, t, return_grad=True, **opts)
        assert_close(loss, rloss, tol(dtype), what=str(opts))
        assert grad.dtype == x.dtype
        assert_grad_close(grad, rgrad, dtype, what=str(opts))
    # (N, C, d) with the class axis 1, and an all-ignored batch: NaN mean, 0 sum
    x3 = np.log(rng.random((4, 6, 5)) + 0.01).astype(dtype)
    t3 = rng.integers(0, 6, (4, 5))
    assert_close(xf.nll_loss(x3, t3, axis=1, backend=backend), R.nll_loss(x3, t3, axis=1),
                 tol(dtype))
    none = np.full(9, -100)
    assert np.isnan(xf.nll_loss(x, none, backend=backend))
    assert xf.nll_loss(x, none, reduction="sum", backend=backend) == 0
    with pytest.raises(IndexError, match="targets"):
        xf.nll_loss(x, np.full(9, 37), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_untouched_and_grad_out_in_place(rng, backend):
    """Strided read-only inputs give what their contiguous copies give and are not
    written; ``grad_out`` the input itself receives the gradient after the loss has
    read it (the loss is the same as without)."""
    dtype = np.dtype(np.float32)
    x = (rng.standard_normal((9, 74)) * 3).astype(dtype)[:, ::2]
    y = rng.random((9, 74)).astype(dtype)[:, 1::2]
    lp = np.log(rng.random((9, 74)) + 0.01).astype(dtype)[:, ::2]
    t = rng.integers(0, 37, 9)
    t[4] = -100
    cases = [("nll_loss", lp, t, {"reduction": "sum"}),
             ("kl_div", lp, y, {"reduction": "batchmean"}),
             ("sigmoid_focal_loss", x, y, {"reduction": "mean"})]
    for name, a, b, opts in cases:
        fn = getattr(xf, name)
        for arr in (a, b):
            arr.flags.writeable = False
        before = (a.copy(), b.copy())
        loss, grad = fn(a, b, return_grad=True, backend=backend, **opts)
        assert (a == before[0]).all() and (b == before[1]).all(), name
        closs, cgrad = fn(np.ascontiguousarray(a), np.ascontiguousarray(b),
                          return_grad=True, backend=backend, **opts)
        assert_close(loss, closs, 1e-6, what=name)
        assert_close(grad, cgrad, 1e-6, atol=1e-7, what=name)
        own = a.copy()
        iloss, igrad = fn(own, b, grad_out=own, backend=backend, **opts)
        assert igrad is own, name
        assert_close(iloss, closs, 1e-6, what=name)
        assert_close(own, cgrad, 1e-6, atol=1e-7, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_to_pytorch_and_torchvision_in_float64(rng, backend):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = torch.tensor(rng.standard_normal((6, 5, 3)) * 3, requires_grad=True)
    lp = torch.log_softmax(x.detach(), 1)
    t = torch.tensor(rng.integers(0, 5, (6, 3)))
    t[0, 1] = -100
    w = torch.tensor(rng.random(5) + 0.5)
    for red in ("mean", "sum", "none"):
        z = lp.clone().requires_grad_()
        want = F.nll_loss(z, t, weight=w, reduction=red)
        g, = torch.autograd.grad(want.sum(), z)
        got, gg = xf.nll_loss(lp.numpy(), t.numpy(), weight=w.numpy(), axis=1, reduction=red,
                              return_grad=True, backend=backend)
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gg, g.numpy(), rtol=1e-12, atol=1e-15)
    y = torch.tensor(rng.random((6, 5, 3)))
    for lt in (False, True):
        for red in ("mean", "batchmean", "sum", "none"):
            tt = y.log() if lt else y
            z = lp.clone().requires_grad_()
            want = F.kl_div(z, tt, reduction=red, log_target=lt)
            g, = torch.autograd.grad(want.sum(), z)
            got, gg = xf.kl_div(lp.numpy(), tt.numpy(), reduction=red, log_target=lt,
                                return_grad=True, backend=backend)
            np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(gg, g.numpy(), rtol=1e-12, atol=1e-15)

    def focal(inputs, targets, alpha, gamma, reduction):  # torchvision.ops's formula
        p = torch.sigmoid(inputs)
        ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]

    yb = (y > 0.5).double()
    for alpha, gamma in ((0.25, 2.0), (-1.0, 1.0), (0.6, 3.5)):
        for red in ("none", "mean", "sum"):
            for tgt in (y, yb):
                z = x.detach().clone().requires_grad_()
                want = focal(z, tgt, alpha, gamma, red)
                g, = torch.autograd.grad(want.sum(), z)
                got, gg = xf.sigmoid_focal_loss(x.detach().numpy(), tgt.numpy(), alpha=alpha,
                                                gamma=gamma, reduction=red, return_grad=True,
                                                backend=backend)
                np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(gg, g.numpy(), rtol=1e-12,
                                           atol=1e-12 * np.abs(g.numpy()).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_loss_at_extreme_logits(backend):
    """+-1000 logits: finite losses and gradients where the naive 1 - sigmoid cancels."""
    x = np.array([1000.0, -1000.0, 40.0, -40.0, 0.0])
    y = np.array([1.0, 0.0, 0.0, 1.0, 0.5])
    loss, g = xf.sigmoid_focal_loss(x, y, return_grad=True, backend=backend)
    rloss, rg = R.sigmoid_focal_loss(x, y, return_grad=True)
    assert np.isfinite(loss).all() and np.isfinite(g).all()
    assert_close(loss, rloss, 1e-12, atol=1e-300)
    assert_close(g, rg, 1e-12, atol=1e-300)
    assert loss[0] == 0 and loss[1] == 0
    assert loss[2] == pytest.approx(0.75 * 40.0, rel=1e-12)


@pytest.mark.parametrize("call,err,msg", [
    (lambda: xf.sigmoid_focal_loss(np.zeros(3), np.zeros(4)), ValueError, "targets"),
    (lambda: xf.sigmoid_focal_loss(np.zeros(3), np.zeros(3), gamma=-1), ValueError, "gamma"),
    (lambda: xf.sigmoid_focal_loss(np.zeros(3), np.zeros(3), alpha="x"), TypeError, "alpha"),
    (lambda: xf.kl_div(np.zeros(3), np.zeros(2)), ValueError, "target"),
    (lambda: xf.kl_div(np.zeros(3), np.zeros(3), reduction="avg"), ValueError, "reduction"),
    (lambda: xf.nll_loss(np.zeros((2, 3)), np.zeros(2)), TypeError, "targets"),
    (lambda: xf.nll_loss(np.zeros((2, 3)), np.zeros(3, int)), ValueError, "targets"),
    (lambda: xf.nll_loss(np.zeros((2, 3)), np.zeros(2, int), weight=np.ones(2)), ValueError,
     "weight"),
])
def test_errors_name_the_argument(call, err, msg):
    with pytest.raises(err, match=msg):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.dtype(np.float64), np.dtype(np.float32)], ids=str)
def test_return_z_loss(rng, dtype, backend):
    """The z-loss term alone, as Liger-Kernel's return_z_loss: reduced as it enters the
    loss (over the kept rows under "mean"), included in the loss."""
    _trim(dtype, backend)
    x = (rng.standard_normal((11, 40)) * 4).astype(dtype)
    t = rng.integers(0, 40, 11)
    t[3] = -100
    w = rng.random(40) + 0.5
    p = R.softmax(rng.standard_normal((11, 40))).astype(dtype)
    for tg, opts in [(t, {}), (t, {"weight": w, "reduction": "sum"}),
                     (t, {"reduction": "none", "label_smoothing": 0.1}),
                     (t, {"softcap": 5.0}), (p, {"reduction": "mean"})]:
        kw = dict(z_loss=1e-3, **opts)
        loss, zt, g = xf.softmax_cross_entropy(x, tg, return_z_loss=True, return_grad=True,
                                               backend=backend, **kw)
        rl, rz, rg = R.softmax_cross_entropy(x, tg, return_z_loss=True, return_grad=True, **kw)
        assert_close(loss, rl, tol(dtype) * 10, what=str(opts))
        assert_close(zt, rz, tol(dtype) * 10, atol=1e-300, what=str(opts))
        assert_grad_close(g, rg, dtype, what=str(opts))
        no_z = xf.softmax_cross_entropy(x, tg, backend=backend, **dict(kw, z_loss=0.0))
        if "weight" not in opts:
            assert_close(np.asarray(loss) - np.asarray(zt), no_z, tol(dtype) * 10)
    # without a gradient: (loss, z_term); in place, the term comes from the logits as given
    y = x.copy()
    loss, zt, g = xf.softmax_cross_entropy(y, t, z_loss=1e-2, return_z_loss=True, grad_out=y,
                                           backend=backend)
    assert g is y
    assert_close(zt, R.softmax_cross_entropy(x, t, z_loss=1e-2, return_z_loss=True)[1],
                 tol(dtype) * 10)
    assert len(xf.softmax_cross_entropy(x, t, return_z_loss=True, backend=backend)) == 2


def test_torch_sigmoid_focal_loss():
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xent_fast.torch")
    from xent_fast.torch import _focal_dense

    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    for alpha, gamma, red in ((0.25, 2.0, "none"), (-1.0, 1.5, "mean"), (0.4, 3.0, "sum")):
        def f(a, b):
            return xt.sigmoid_focal_loss(a, b, alpha, gamma, red)
        assert torch.autograd.gradcheck(f, (x, y))
        torch.testing.assert_close(f(x, y), _focal_dense(x, y, alpha, gamma, red),
                                   rtol=1e-12, atol=1e-15)
    loss = xt.sigmoid_focal_loss(x.float(), (y > 0.5).float(), reduction="mean")
    assert loss.dtype == torch.float32
