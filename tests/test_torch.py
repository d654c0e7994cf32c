"""xent_fast.torch against torch.nn.functional: values, gradients, autograd, custom-op
registration, torch.compile, training, memory behaviour and errors (CPU tensors; the
CUDA cases run where a GPU is present)."""

import itertools
import multiprocessing
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
xt = pytest.importorskip("xent_fast.torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}
ATOL = {torch.float64: 1e-14, torch.float32: 2e-7}


def close(a, b, dtype=torch.float64, scale=1.0, rtol=None):
    torch.testing.assert_close(a, b, rtol=rtol or RTOL[dtype], atol=ATOL[dtype] * scale,
                               equal_nan=True)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def logits(shape, dtype=torch.float64, seed=0):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * 3).to(dtype)


def index_targets(batch, c, seed=1, ignore=None):
    t = torch.randint(0, c, batch, generator=gen(seed))
    if ignore is not None and t.numel() > 1:
        t.view(-1)[::3] = ignore
    return t


def prob_targets(shape, dim, dtype=torch.float64, seed=2):
    return torch.softmax(torch.randn(shape, generator=gen(seed), dtype=torch.float64),
                         dim).to(dtype)


def grads(loss, inputs, seed=3):
    """Gradients of <loss, r> for a random r: every element of a "none" loss counts."""
    r = torch.rand(loss.shape, generator=gen(seed), dtype=loss.dtype) + 0.5
    return torch.autograd.grad(loss, inputs, grad_outputs=r)


# ---------------------------------------------------------------------------- cross-entropy
# Class-index cases use 17 classes or more: from 2 to 16 the CPU backend has kernels
# specialised per class count (checked against the reference in test_fast_paths.py),
# which would each compile here again for every dtype and option.
C = 17
SHAPES = [(7, C), (3, C, 2, 3), (C,)]  # (N, C), (N, C, d1, d2), unbatched (C,)
CE_CASES = [case for case in itertools.product(
    SHAPES, ["index", "prob"], [False, True], [None, 2], ["mean", "sum", "none"], [0.0, 0.15])
    if case[1] == "index" or case[3] is None]  # ignore_index applies to class indices only


def _ce_case(shape, kind, weighted, ignore, dtype):
    x = logits(shape, dtype).requires_grad_()
    cdim = 1 if len(shape) > 1 else 0
    c = shape[cdim]
    batch = shape[:cdim] + shape[cdim + 1:]
    if kind == "index":
        t = index_targets(batch, c, ignore=ignore)
    else:
        t = prob_targets(shape, cdim, dtype).requires_grad_()
    w = torch.rand(c, generator=gen(4), dtype=dtype) + 0.2 if weighted else None
    kw = {} if ignore is None else {"ignore_index": ignore}
    return x, t, w, kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,kind,weighted,ignore,reduction,eps", CE_CASES)
def test_cross_entropy_equals_pytorch(shape, kind, weighted, ignore, reduction, eps, dtype):
    x, t, w, kw = _ce_case(shape, kind, weighted, ignore, dtype)
    before = x.detach().clone()
    got = xt.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps, **kw)
    want = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    close(got, want, dtype)
    inputs = (x, t) if kind == "prob" else (x,)
    for g, h in zip(grads(got, inputs), grads(want, inputs)):
        close(g, h, dtype)
    assert torch.equal(x.detach(), before)  # the input is never written


def test_ignore_index_with_probability_targets_is_an_error_as_in_pytorch():
    x = logits((4, C))
    p = torch.softmax(logits((4, C), seed=1), 1)
    for f in (F.cross_entropy, xt.cross_entropy):
        with pytest.raises(RuntimeError, match="ignore_index is not supported"):
            f(x, p, ignore_index=3)
    close(xt.cross_entropy(x, p, ignore_index=-100), F.cross_entropy(x, p))


def test_module_matches_pytorch_module():
    w = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    ours = xt.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = logits((9, C)).requires_grad_()
    t = index_targets((9,), C)
    close(ours(x, t), theirs(x, t))
    # PyTorch's deprecated size_average/reduce spellings mean what they mean there
    with pytest.warns(UserWarning):
        legacy = xt.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    close(legacy(x, t), F.cross_entropy(x, t, reduction="sum"))
    with pytest.warns(UserWarning):
        close(xt.cross_entropy(x, t, None, None, -100, False), F.cross_entropy(x, t, reduction="none"))


def test_z_loss_and_softcap_gradients():
    x = logits((6, C)).requires_grad_()
    t = index_targets((6,), C, ignore=-100)

    def by_hand(x):
        y = 30.0 * torch.tanh(x / 30.0)
        lse = torch.logsumexp(y, 1)
        keep = t != -100
        ce = F.cross_entropy(y, t, reduction="sum")
        return (ce + 1e-3 * (lse[keep] ** 2).sum()) / keep.sum()

    got = xt.cross_entropy(x, t, z_loss=1e-3, softcap=30.0)
    close(got, by_hand(x))
    close(torch.autograd.grad(got, x)[0], torch.autograd.grad(by_hand(x), x)[0])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 6), c=st.one_of(st.just(1), st.integers(C, C + 8)), reduction=st.sampled_from(["mean", "sum", "none"]),
       eps=st.floats(0, 1), weighted=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_cross_entropy_random_against_pytorch(n, c, reduction, eps, weighted, seed):
    x = logits((n, c), seed=seed).requires_grad_()
    t = torch.randint(0, c, (n,), generator=gen(seed + 1))
    w = torch.rand(c, generator=gen(seed + 2), dtype=torch.float64) if weighted else None
    got = xt.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)
    want = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)
    close(got, want)
    if n and not (torch.isnan(want).any()):
        close(grads(got, x)[0], grads(want, x)[0])


def test_minus_inf_logits_mask_classes():
    x = logits((4, C))
    x[:, 3] = -torch.inf
    x.requires_grad_()
    t = torch.tensor([0, 1, 2, 4])
    got = xt.cross_entropy(x, t)
    close(got, F.cross_entropy(x, t))
    g = torch.autograd.grad(got, x)[0]
    assert torch.all(g[:, 3] == 0) and torch.isfinite(g).all()


# ---------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_as_accurate_as_pytorch(dtype):
    """Both against float64 computed from the same half-precision values: the loss is
    computed in float32 and rounded once, so it is no further off than PyTorch's."""
    x = logits((64, 300), dtype).requires_grad_()
    t = index_targets((64,), 300)
    got = xt.cross_entropy(x, t)
    want = F.cross_entropy(x, t)
    x64 = x.detach().double().requires_grad_()
    exact = F.cross_entropy(x64, t)
    assert got.dtype == dtype and got.shape == ()
    err_ours = abs(got.double() - exact).item()
    err_theirs = abs(want.double() - exact).item()
    ulp = abs(exact.item()) * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11)
    assert err_ours <= max(err_theirs, ulp)
    g_ours, = torch.autograd.grad(got, x)
    g_theirs, = torch.autograd.grad(want, x)
    g_exact, = torch.autograd.grad(exact, x64)
    assert g_ours.dtype == dtype
    e_ours = (g_ours.double() - g_exact).abs().max().item()
    e_theirs = (g_theirs.double() - g_exact).abs().max().item()
    assert e_ours <= max(e_theirs, g_exact.abs().max().item() * 2.0 ** -7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_as_pytorch_requires_them(dtype):
    """PyTorch asks a half-precision model for weights of its dtype: they are taken
    (bfloat16 ones were a TypeError), for the class weights of cross_entropy and
    nll_loss and the elementwise ones of the binary losses."""
    x = logits((16, 300), dtype)
    t = index_targets((16,), 300)
    w = (torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    y = torch.rand(16, 300, generator=torch.Generator().manual_seed(2)).to(dtype)
    ew = torch.rand(16, 1, generator=torch.Generator().manual_seed(3)).to(dtype)
    pw = (torch.rand(300, generator=torch.Generator().manual_seed(4)) * 2).to(dtype)
    lp = torch.log_softmax(x.float(), -1).to(dtype)
    p = torch.sigmoid(x.float()).to(dtype)
    pairs = [
        (xt.cross_entropy(x, t, weight=w), F.cross_entropy(x.float(), t, weight=w.float())),
        (xt.cross_entropy(x, y, weight=w), F.cross_entropy(x.float(), y.float(), weight=w.float())),
        (xt.nll_loss(lp, t, weight=w), F.nll_loss(lp.float(), t, weight=w.float())),
        (xt.binary_cross_entropy_with_logits(x, y, weight=ew, pos_weight=pw),
         F.binary_cross_entropy_with_logits(x.float(), y.float(), weight=ew.float(),
                                            pos_weight=pw.float())),
        (xt.binary_cross_entropy(p, y, weight=ew),
         F.binary_cross_entropy(p.float(), y.float(), weight=ew.float())),
    ]
    rel = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for got, want in pairs:
        assert got.dtype == dtype
        assert abs(got.item() - want.item()) <= rel * abs(want.item())


def test_bfloat16_read_through_its_bits_without_a_copy(monkeypatch):
    """A bfloat16 CPU tensor reaches the kernels as a view of its own memory."""
    from xent_fast import _api

    seen = []
    real = _api.softmax_cross_entropy

    def spy(x, t, **kw):
        seen.append(x)
        return real(x, t, **kw)

    monkeypatch.setattr(_api, "softmax_cross_entropy", spy)
    x = logits((8, 2 * C), torch.bfloat16)[:, ::2]  # a strided view
    xt.cross_entropy(x, index_targets((8,), C))
    assert seen[0].dtype.name == "bfloat16"
    assert seen[0].__array_interface__["data"][0] == x.data_ptr()


# ---------------------------------------------------------------------------- other losses
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_softmax_kl_divergence_equals_kl_div(reduction, temperature):
    x = logits((5, 6)).requires_grad_()
    z = logits((5, 6), seed=9).requires_grad_()
    got = xt.softmax_kl_divergence(x, z, temperature=temperature, reduction=reduction)
    want = F.kl_div(F.log_softmax(x / temperature, 1), F.log_softmax(z / temperature, 1),
                    reduction=reduction, log_target=True)
    if reduction == "none":
        want = want.sum(1)
    close(got, want)
    for g, h in zip(grads(got, (x, z)), grads(want, (x, z))):
        close(g, h)
    mod = xt.SoftmaxKLDivergenceLoss(temperature=temperature, reduction=reduction)
    close(mod(x, z), got)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,pos", [(False, False), (True, False), (False, True), (True, True)])
def test_binary_cross_entropy_with_logits_equals_pytorch(reduction, weighted, pos, dtype):
    x = logits((6, 4), dtype).requires_grad_()
    y = torch.rand((6, 4), generator=gen(5), dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.rand((4,), generator=gen(6), dtype=dtype) if weighted else None
    pw = torch.rand((4,), generator=gen(7), dtype=dtype) * 3 if pos else None
    got = xt.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)
    want = F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)
    close(got, want, dtype, scale=10)
    for g, h in zip(grads(got, (x, y)), grads(want, (x, y))):
        close(g, h, dtype, scale=10)
    mod = xt.BCEWithLogitsLoss(weight=w, reduction=reduction, pos_weight=pw)
    assert isinstance(mod, torch.nn.BCEWithLogitsLoss)
    close(mod(x, y), want, dtype, scale=10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_cross_entropy_equals_pytorch(reduction, weighted):
    p = torch.rand((5, 3), generator=gen(8), dtype=torch.float64)
    p[0, 0], p[1, 1] = 0.0, 1.0  # clamped logs stay finite
    p.requires_grad_()
    y = torch.rand((5, 3), generator=gen(9), dtype=torch.float64).requires_grad_()
    w = torch.rand((5, 3), generator=gen(10), dtype=torch.float64) if weighted else None
    got = xt.binary_cross_entropy(p, y, w, reduction=reduction)
    want = F.binary_cross_entropy(p, y, w, reduction=reduction)
    close(got, want)
    (gp, gy), (hp, hy) = grads(got, (p, y)), grads(want, (p, y))
    close(gp, hp)  # up to 1/eps at p in {0, 1}: the relative error counts
    # d/dy is the derivative of the loss as computed, logs clamped at -100: finite at
    # p in {0, 1}, where PyTorch's target gradient is infinite (a documented difference)
    assert torch.isinf(hy[0, 0]) and torch.isinf(hy[1, 1])
    assert torch.isfinite(gy).all()
    hy[0, 0], hy[1, 1] = gy[0, 0], gy[1, 1]
    close(gy, hy)
    r = torch.rand(got.shape, generator=gen(3), dtype=torch.float64) + 0.5
    for i, j, sign in [(0, 0, 1), (1, 1, -1)]:
        w_ij = 1.0 if w is None else w[i, j]
        r_ij = r[i, j] if reduction == "none" else r
        n = 1 if reduction != "mean" else p.numel()
        close(gy[i, j], sign * 100 * w_ij * r_ij / n)
    close(xt.BCELoss(weight=w, reduction=reduction)(p, y), want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_z_loss_gives_the_term_alone_as_liger(reduction):
    """(loss, z_term): the z term as it enters the loss (mean over the kept rows, 0 at
    ignored rows), the loss unchanged, in place too; the term is not differentiable."""
    x = logits((6, C)).requires_grad_()
    t = index_targets((6,), C, ignore=-100)
    w = torch.rand(C, generator=gen(4), dtype=torch.float64) + 0.2
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    loss, zt = xt.cross_entropy(x, t, w, softcap=6.0, return_z_loss=True, **kw)
    lse = torch.logsumexp(6.0 * torch.tanh(x.detach() / 6.0), 1)
    kept = t != -100
    rows = torch.where(kept, 1e-2 * lse ** 2, torch.zeros_like(lse))
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / kept.sum()}[reduction]
    close(zt, want)
    assert not zt.requires_grad and zt.dtype == x.dtype
    close(loss, xt.cross_entropy(x, t, w, softcap=6.0, **kw))
    g, = grads(loss, x)
    y = x.detach().clone().requires_grad_()
    y2 = y * 1.0  # a non-leaf, so that the in-place gradient may overwrite it
    loss2, zt2 = xt.CrossEntropyLoss(w, softcap=6.0, inplace_backward=True,
                                     return_z_loss=True, **kw)(y2, t)
    close(zt2, want)
    close(grads(loss2, y)[0], g)


# ---------------------------------------------------------------------------- NLL, pointwise KL
@pytest.mark.parametrize("shape", [(7, C), (3, C, 2, 3), (C,), (0, C)])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_equals_pytorch(shape, weighted):
    cdim = 1 if len(shape) > 1 else 0
    x = torch.log_softmax(logits(shape), cdim).requires_grad_()
    t = index_targets(shape[:cdim] + shape[cdim + 1:], C, ignore=-100)
    w = torch.rand(C, generator=gen(4), dtype=torch.float64) + 0.2 if weighted else None
    for reduction in ("mean", "sum", "none"):
        got, want = xt.nll_loss(x, t, w, reduction=reduction), F.nll_loss(x, t, w, reduction=reduction)
        close(got, want)
        if x.numel():
            close(grads(got, x)[0], grads(want, x)[0])
    t3 = t.clamp(min=0)  # class 3 ignored instead of -100
    close(xt.NLLLoss(w, ignore_index=3)(x, t3), torch.nn.NLLLoss(w, ignore_index=3)(x, t3))


@pytest.mark.parametrize("shapes", [((4, C), (4, C)), ((2, 3, C), (2, 3, C)), ((), ()),
                                    ((4, C), (C,)), ((C,), (3, C)), ((1, C), (3, C))])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_equals_pytorch(shapes, log_target):
    """Every reduction, both gradients (target included), zero targets, and PyTorch's
    broadcasting ("batchmean" divides by the input's own first size)."""
    x = torch.log_softmax(logits(shapes[0]), -1) if shapes[0] else logits(())
    x = x.detach().requires_grad_()
    y = torch.rand(shapes[1], generator=gen(5), dtype=torch.float64)
    if y.dim():
        y[..., 0] = 0.0
    y = (y.log() if log_target else y).requires_grad_()
    for reduction in ("mean", "batchmean", "sum", "none"):
        got = xt.kl_div(x, y, reduction=reduction, log_target=log_target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's note on what "mean" divides by
            want = F.kl_div(x, y, reduction=reduction, log_target=log_target)
        close(got, want)
        for a, b in zip(grads(got, (x, y)), grads(want, (x, y))):
            close(a, b)
    close(xt.KLDivLoss(reduction="batchmean", log_target=log_target)(x, y),
          torch.nn.KLDivLoss(reduction="batchmean", log_target=log_target)(x, y))


def test_nll_loss_and_kl_div_errors_name_the_argument():
    x = logits((3, C))
    with pytest.raises(IndexError, match="targets"):
        xt.nll_loss(x, torch.tensor([0, C, 1]))
    with pytest.raises(TypeError, match="target"):
        xt.nll_loss(x, torch.rand(3))
    with pytest.raises(ValueError, match="weight"):
        xt.nll_loss(x, torch.tensor([0, 1, 2]), torch.rand(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        xt.kl_div(x, x, reduction="avg")
    with pytest.raises(TypeError, match="target"):
        xt.kl_div(x, torch.ones(3, C, dtype=torch.long))


# ---------------------------------------------------------------------------- autograd
def test_gradcheck_every_function():
    x = logits((3, C)).requires_grad_()
    t = index_targets((3,), C, ignore=-100)
    p = prob_targets((3, C), 1).requires_grad_()
    w = torch.rand(C, generator=gen(4), dtype=torch.float64) + 0.1
    z = logits((3, C), seed=7).requires_grad_()
    y = torch.rand((3, C), generator=gen(5), dtype=torch.float64).requires_grad_()
    pr = (torch.rand((3, C), generator=gen(6), dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    gradcheck = torch.autograd.gradcheck
    for red in ("mean", "none"):
        assert gradcheck(lambda x: xt.cross_entropy(x, t, w, reduction=red, label_smoothing=0.1,
                                                    z_loss=0.01, softcap=4.0), (x,))
        assert gradcheck(lambda x, p: xt.cross_entropy(x, p, w, reduction=red,
                                                       label_smoothing=0.2, softcap=4.0), (x, p))
        assert gradcheck(lambda x, y: xt.binary_cross_entropy_with_logits(
            x, y, reduction=red, pos_weight=w), (x, y))
        assert gradcheck(lambda p, y: xt.binary_cross_entropy(p, y, reduction=red), (pr, y))
    for red in ("batchmean", "none"):
        assert gradcheck(lambda x, z: xt.softmax_kl_divergence(x, z, temperature=1.7,
                                                               reduction=red), (x, z))
    lp = torch.log_softmax(x.detach(), 1).requires_grad_()
    for red in ("mean", "none"):
        assert gradcheck(lambda lp: xt.nll_loss(lp, t, w, reduction=red), (lp,))
    for red in ("batchmean", "none"):
        assert gradcheck(lambda lp, y: xt.kl_div(lp, y, reduction=red), (lp, y))
        assert gradcheck(lambda lp, z: xt.kl_div(lp, z, reduction=red, log_target=True), (lp, z))


def test_retain_graph_gives_the_same_gradient_twice():
    x = logits((5, C)).requires_grad_()
    t = index_targets((5,), C)
    loss = xt.cross_entropy(x, t)
    g1, = torch.autograd.grad(loss, x, retain_graph=True)
    g2, = torch.autograd.grad(loss * 3, x)
    close(g2, 3 * g1)
    close(g1, torch.autograd.grad(F.cross_entropy(x, t), x)[0])


def test_double_backward_is_refused():
    x = logits((5, C)).requires_grad_()
    loss = xt.cross_entropy(x, index_targets((5,), C))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_weights_are_not_differentiable_as_in_pytorch():
    x = logits((5, C)).requires_grad_()
    w = torch.ones(C, dtype=torch.float64, requires_grad=True)
    loss = xt.cross_entropy(x, index_targets((5,), C), w)  # the forward pass works
    with pytest.raises(RuntimeError, match="'weight' is not implemented"):
        loss.backward()
    loss = xt.binary_cross_entropy_with_logits(x, torch.rand(5, C, dtype=torch.float64),
                                               pos_weight=w)
    with pytest.raises(RuntimeError, match="'pos_weight' is not implemented"):
        loss.backward()


def test_the_operator_without_its_gradient_says_so():
    x = logits((5, C)).requires_grad_()
    loss, _ = torch.ops.xent_fast.cross_entropy(x, index_targets((5,), C), None, -100, "mean",
                                                0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="without its gradient"):
        loss.backward()


def test_no_gradient_is_computed_when_none_is_needed(monkeypatch):
    from xent_fast import _api

    seen = []
    real = _api.softmax_cross_entropy
    monkeypatch.setattr(_api, "softmax_cross_entropy",
                        lambda *a, **k: seen.append(k.get("grad_out")) or real(*a, **k))
    x = logits((5, C)).requires_grad_()
    t = index_targets((5,), C)
    with torch.no_grad():
        xt.cross_entropy(x, t)
    xt.cross_entropy(x.detach(), t)
    assert seen == [None, None]


# ---------------------------------------------------------------------------- memory
def test_backward_hands_on_the_forward_gradient_without_a_copy():
    """The gradient buffer the forward pass filled is the one autograd gives the leaf:
    scaled in place, never copied (no second logits-sized buffer)."""
    t = index_targets((6,), C)
    for reduction, scale in [("mean", 1.0), ("sum", 2.5), ("none", 0.5)]:
        x = logits((6, C)).requires_grad_()
        loss, grad = torch.ops.xent_fast.cross_entropy(x, t, None, -100, reduction, 0.0, 0.0,
                                                       0.0, True)
        ptr = grad.data_ptr()
        del grad
        (loss.sum() * scale).backward()
        assert x.grad.data_ptr() == ptr
        want, = torch.autograd.grad(F.cross_entropy(x, t, reduction=reduction).sum() * scale, x)
        close(x.grad, want)


def test_inplace_backward_writes_the_gradient_over_the_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, C).double()
    h = torch.randn(10, 8, dtype=torch.float64)
    t = index_targets((10,), C, ignore=-100)
    z = head(h)
    loss = xt.cross_entropy(z, t, label_smoothing=0.1, inplace_backward=True)
    ref_head = torch.nn.Linear(8, C).double()
    ref_head.load_state_dict(head.state_dict())
    ref_z = ref_head(h)
    ref = F.cross_entropy(ref_z, t, label_smoothing=0.1)
    close(loss, ref)
    close(z.detach(), torch.autograd.grad(ref, ref_z, retain_graph=True)[0])  # z now holds it
    (2 * loss).backward()
    (2 * ref).backward()
    close(head.weight.grad, ref_head.weight.grad)
    close(head.bias.grad, ref_head.bias.grad)
    with pytest.raises(ValueError, match="inplace_backward"):
        xt.cross_entropy(logits((3, 4)).requires_grad_(), prob_targets((3, 4), 1).requires_grad_(),
                         inplace_backward=True)


# ---------------------------------------------------------------------------- custom ops
def test_opcheck_every_operator():
    from torch.library import opcheck

    x = logits((6, C)).requires_grad_()
    t = index_targets((6,), C, ignore=-100)
    p = prob_targets((6, C), 1).requires_grad_()
    w = torch.rand(C, generator=gen(4), dtype=torch.float64)
    y = torch.rand((6, C), generator=gen(5), dtype=torch.float64).requires_grad_()
    ops = torch.ops.xent_fast
    for args in [(x, t, w, -100, "mean", 0.1, 0.01, 0.0, True),
                 (x, p, None, -100, "none", 0.0, 0.0, 5.0, True),
                 (x.detach(), t, None, -100, "sum", 0.0, 0.0, 0.0, False)]:
        opcheck(ops.cross_entropy.default, args)
    opcheck(ops.cross_entropy_inplace_.default, (x.detach().clone(), t, w, -100, "sum", 0.0, 0.0, 0.0))
    opcheck(ops.cross_entropy_z_term.default, (x.detach(), t, w, -100, "none", 0.1, 1e-3, 4.0))
    opcheck(ops.softmax_kl_divergence.default, (x, y, 2.0, "batchmean", True))
    opcheck(ops.softmax_js_divergence.default, (x, y, t, 0.3, 2.0, -100, "batchmean", True))
    opcheck(ops.softmax_js_divergence.default, (x.detach(), y, None, 0.0, 1.0, -100, "none", False))
    ti = torch.argsort(y.detach(), dim=1, descending=True)[:, :4].contiguous()
    tv = torch.log_softmax(y.detach(), 1).gather(1, ti)
    opcheck(ops.softmax_kl_divergence_sparse.default, (x, ti, tv, 2.0, "residual", "sum", True))
    opcheck(ops.sigmoid_focal_loss.default, (x, y.detach().sigmoid(), 0.25, 2.0, "mean", True))
    opcheck(ops.binary_cross_entropy_with_logits.default, (x, y, None, w, "none", True))
    lp = torch.log_softmax(x.detach(), 1).requires_grad_()
    opcheck(ops.nll_loss.default, (lp, t, w, -100, "mean", True))
    opcheck(ops.nll_loss.default, (lp.detach(), t, None, -100, "none", False))
    opcheck(ops.kl_div.default, (lp, y, "batchmean", False, True))
    opcheck(ops.kl_div.default, (lp, y.detach(), "none", True, True))
    opcheck(ops.binary_cross_entropy.default, (torch.sigmoid(x.detach()).requires_grad_(), y, w,
                                               "mean"))


LOSSES = {
    "ce": lambda z, t, y: xt.cross_entropy(z, t, label_smoothing=0.05),
    "ce_inplace": lambda z, t, y: xt.cross_entropy(z, t, inplace_backward=True),
    "ce_module": lambda z, t, y: xt.CrossEntropyLoss(z_loss=1e-3)(z, t),
    "ce_z_term": lambda z, t, y: sum(xt.cross_entropy(z, t, z_loss=1e-3, return_z_loss=True)),
    "kl": lambda z, t, y: xt.softmax_kl_divergence(z, y, temperature=2.0),
    "jsd": lambda z, t, y: xt.JSDLoss(beta=0.3, temperature=2.0)(z, y, t),
    "focal": lambda z, t, y: xt.sigmoid_focal_loss(z, torch.sigmoid(y), reduction="mean"),
    "bce_logits": lambda z, t, y: xt.binary_cross_entropy_with_logits(z, torch.sigmoid(y)),
    "bce": lambda z, t, y: xt.binary_cross_entropy(torch.sigmoid(z), torch.sigmoid(y)),
    "nll": lambda z, t, y: xt.nll_loss(torch.log_softmax(z, 1), t),
    "kl_div": lambda z, t, y: xt.kl_div(torch.log_softmax(z, 1), torch.softmax(y, 1),
                                        reduction="batchmean"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_compile_fullgraph(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
    h, t = torch.randn(12, 8), torch.randint(0, C, (12,))
    y = torch.randn(12, C)

    def step(h, t, y):
        return LOSSES[name](model(h), t, y)

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(h, t, y)
    got.backward()
    g_got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = step(h, t, y)
    want.backward()
    close(got, want, torch.float32)
    for a, b in zip(g_got, (p.grad for p in model.parameters())):
        close(a, b, torch.float32)


# ---------------------------------------------------------------------------- training
def _train(loss_fn, steps=50):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(C + 1, 32), torch.nn.ReLU(), torch.nn.Linear(32, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    h = torch.randn(256, C + 1, generator=gen(11))
    t = (h[:, :C].argmax(1) + (h[:, C] > 1).long()) % C
    losses = []
    for i in range(steps):
        idx = slice((i * 64) % 256, (i * 64) % 256 + 64)
        opt.zero_grad()
        loss = loss_fn(model(h[idx]), t[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_loop_follows_pytorch():
    ours = _train(xt.CrossEntropyLoss(label_smoothing=0.05))
    theirs = _train(torch.nn.CrossEntropyLoss(label_smoothing=0.05))
    assert ours[-1] < 0.6 * ours[0]  # it learns
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    inplace = _train(xt.CrossEntropyLoss(label_smoothing=0.05, inplace_backward=True))
    np.testing.assert_allclose(inplace, theirs, rtol=0, atol=1e-6)


class _Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        z = torch.arange(C, dtype=torch.float32) * (0.1 * i)
        return xt.cross_entropy(z, torch.tensor(i % C)), torch.tensor(i)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_dataloader_with_forked_workers_after_the_loss_ran():
    xt.cross_entropy(logits((4096, 64), torch.float32), index_targets((4096,), 64))  # threads
    loader = torch.utils.data.DataLoader(_Squares(), batch_size=4, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got = torch.cat([v for v, _ in loader])
    want = torch.stack([F.cross_entropy(torch.arange(C, dtype=torch.float32) * (0.1 * i),
                                        torch.tensor(i % C)) for i in range(8)])
    close(got, want, torch.float32)


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x = logits((4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        xt.cross_entropy(x.long(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(IndexError, match=r"targets\[2\] = 7"):
        xt.cross_entropy(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="reduction"):
        xt.cross_entropy(x, torch.tensor([0, 1, 2, 2]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        xt.cross_entropy(x, torch.tensor([0, 1, 2, 2]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        xt.cross_entropy(x, torch.tensor([0, 1, 2, 2]), softcap=0)
    with pytest.raises(ValueError, match="Target size"):
        xt.binary_cross_entropy_with_logits(x, torch.rand(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="probs must lie in"):
        xt.binary_cross_entropy(x, torch.rand(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        xt.cross_entropy(x, [0, 1, 2, 2])
    with pytest.raises(ValueError, match="at least one dimension"):
        xt.cross_entropy(torch.tensor(1.0), torch.tensor(0))


# ---------------------------------------------------------------------------- CUDA tensors
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tensors(dtype):
    x = logits((64, 1000), dtype).cuda().requires_grad_()
    t = index_targets((64,), 1000, ignore=-100).cuda()
    got = xt.cross_entropy(x, t, label_smoothing=0.1)
    assert got.device == x.device and got.dtype == dtype
    exact = F.cross_entropy(x.detach().double().cpu(), t.cpu(), label_smoothing=0.1)
    assert abs(got.double().cpu() - exact) <= 1e-2 * abs(exact)
    got.backward()
    assert x.grad.device == x.device and x.grad.dtype == dtype
    ref = x.detach().double().cpu().requires_grad_()
    F.cross_entropy(ref, t.cpu(), label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad.double().cpu(), ref.grad, rtol=2e-2, atol=1e-4)


def test_import_does_not_start_threads():
    """Importing xent_fast.torch registers the operators and compiles nothing."""
    code = ("import sys, xent_fast.torch, torch; "
            "assert hasattr(torch.ops.xent_fast, 'cross_entropy'); "
            "assert 'numba' not in sys.modules, 'numba imported'")
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


# ---------------------------------------------------------------------------- the NumPy API
def test_numpy_api_takes_cpu_tensors_as_they_are():
    """The array API reads CPU tensors in place too: ones that require grad, bfloat16
    ones, and a tensor as grad_out (written, and returned as given)."""
    import xent_fast as xf

    x = logits((8, C), torch.float32).requires_grad_()
    t = index_targets((8,), C)
    assert xf.softmax_cross_entropy(x, t) == pytest.approx(F.cross_entropy(x, t).item(), rel=1e-6)
    g = torch.empty(8, C)
    loss, grad = xf.softmax_cross_entropy(x, t, grad_out=g)
    assert grad is g
    close(g, torch.autograd.grad(F.cross_entropy(x, t), x)[0], torch.float32)
    xb = x.detach().bfloat16()
    want = xf.softmax_cross_entropy(xb.float().numpy(), t.numpy())
    assert xf.softmax_cross_entropy(xb, t) == want
    gb = torch.empty(8, C, dtype=torch.bfloat16)
    assert xf.softmax_cross_entropy(xb, t, grad_out=gb)[1] is gb
    close(gb.float(), torch.from_numpy(xf.softmax_cross_entropy(
        xb.float().numpy(), t.numpy(), return_grad=True)[1]), torch.float32, scale=2e4)


def test_what_pytorch_accepts_at_the_edges():
    """0-d binary inputs; probability targets wider than the logits promote the loss's
    dtype, as PyTorch's; an empty batch's mean is NaN."""
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(1.0, dtype=torch.float64)
    close(xt.binary_cross_entropy_with_logits(a, y), F.binary_cross_entropy_with_logits(a, y))
    p = torch.tensor(0.3, dtype=torch.float64)
    close(xt.binary_cross_entropy(p, y), F.binary_cross_entropy(p, y))
    x = logits((4, C), torch.float32).requires_grad_()
    q = prob_targets((4, C), 1, torch.float64).requires_grad_()
    got, want = xt.cross_entropy(x, q), F.cross_entropy(x, q)
    assert got.dtype == want.dtype == torch.float64
    close(got, want, torch.float32)
    for g, h in zip(torch.autograd.grad(got, (x, q)), torch.autograd.grad(want, (x, q))):
        assert g.dtype == h.dtype
        close(g, h, torch.float32)
    empty = xt.cross_entropy(logits((0, C)), torch.zeros(0, dtype=torch.long))
    assert empty.shape == () and torch.isnan(empty)
