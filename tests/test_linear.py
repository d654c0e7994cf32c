"""Fused linear cross-entropy against the explicit computation (the logits formed, then
the reference), through the NumPy API and through xent_fast.torch's autograd."""

import itertools

import numpy as np
import pytest

import xent_fast as xf
from xent_fast import reference as ref

from conftest import BF16

V = 23  # classes: above the few-classes kernels' range, so no per-count compile
H = 6


def problem(n=20, dtype=np.float64, seed=0, ignore=True):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, H)).astype(dtype)
    w = (rng.standard_normal((V, H)) * 0.7).astype(dtype)
    b = rng.standard_normal(V).astype(dtype)
    t = rng.integers(0, V, n)
    if ignore:
        t[::4] = -100
    return h, w, b, t


OPTIONS = [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=4.0),
           dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}] + OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_explicit_computation(reduction, opts, with_bias):
    h, w, b, t = problem()
    bias = b if with_bias else None
    got = xf.linear_cross_entropy(h, w, t, bias=bias, reduction=reduction, return_grad=True,
                                  chunk_rows=7, **opts)  # chunk boundaries inside the batch
    want = ref.linear_cross_entropy(h, w, t, bias=bias, reduction=reduction, return_grad=True,
                                    **opts)
    assert len(got) == len(want) == (4 if with_bias else 3)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-13)
    assert np.asarray(got[0]).dtype == np.float64
    loss_only = xf.linear_cross_entropy(h, w, t, bias=bias, reduction=reduction, **opts)
    np.testing.assert_allclose(loss_only, want[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("chunk_rows", [1, 3, 20, 64, None])
def test_any_chunking_gives_the_same_result(chunk_rows):
    h, w, b, t = problem(n=21)
    got = xf.linear_cross_entropy(h, w, t, bias=b, return_grad=True, chunk_rows=chunk_rows)
    want = xf.linear_cross_entropy(h, w, t, bias=b, return_grad=True, chunk_rows=21)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-13, atol=1e-15)


def test_float32_and_batch_axes_and_feature_axis():
    h, w, b, t = problem(n=24, dtype=np.float32)
    h3 = h.reshape(4, 6, H)
    got = xf.linear_cross_entropy(h3, w, t.reshape(4, 6), reduction="none", return_grad=True)
    want = ref.linear_cross_entropy(h3, w, t.reshape(4, 6), reduction="none", return_grad=True)
    assert got[0].shape == (4, 6) and got[0].dtype == np.float32
    assert got[1].shape == h3.shape and got[1].dtype == np.float32
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6)
    # the feature axis first: (H, N)
    hf = np.ascontiguousarray(h.T)
    got = xf.linear_cross_entropy(hf, w, t, axis=0, return_grad=True)
    want = ref.linear_cross_entropy(hf, w, t, axis=0, return_grad=True)
    assert got[1].shape == hf.shape
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(BF16 is None, reason="needs ml_dtypes")
def test_bfloat16_inputs_are_computed_in_float32():
    h, w, b, t = problem()
    hb, wb = h.astype(BF16), w.astype(BF16)
    loss, gh, gw = xf.linear_cross_entropy(hb, wb, t, return_grad=True)
    want = ref.linear_cross_entropy(hb, wb, t, return_grad=True)
    assert np.asarray(loss).dtype == np.float32 and gh.dtype == BF16 and gw.dtype == BF16
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)
    np.testing.assert_allclose(gh.astype(np.float64), want[1], rtol=1e-2, atol=1e-3)


def test_finite_differences():
    h, w, b, t = problem(n=5)
    loss, gh, gw, gb = xf.linear_cross_entropy(h, w, t, bias=b, return_grad=True, z_loss=0.01,
                                               label_smoothing=0.1, chunk_rows=2)

    def f(h=h, w=w, b=b):
        return float(xf.linear_cross_entropy(h, w, t, bias=b, z_loss=0.01, label_smoothing=0.1,
                                             chunk_rows=2))

    eps = 1e-6
    for arr, grad, key in [(h, gh, "h"), (w, gw, "w"), (b, gb, "b")]:
        for idx in itertools.islice(np.ndindex(arr.shape), 0, None, 7):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            fd = (f(**{key: plus}) - f(**{key: minus})) / (2 * eps)
            assert fd == pytest.approx(grad[idx], rel=1e-6, abs=1e-8)


def test_all_ignored_and_empty_batches():
    h, w, b, t = problem(n=4)
    t[:] = -100
    loss, gh, gw = xf.linear_cross_entropy(h, w, t, return_grad=True)
    assert np.isnan(loss) and not gh.any() and not gw.any()
    assert xf.linear_cross_entropy(h, w, t, reduction="sum") == 0
    e = xf.linear_cross_entropy(h[:0], w, t[:0], reduction="none", return_grad=True)
    assert e[0].shape == (0,) and e[1].shape == (0, H) and not e[2].any()


def test_inputs_are_not_written():
    h, w, b, t = problem()
    copies = [a.copy() for a in (h, w, b, t)]
    h.flags.writeable = w.flags.writeable = False
    xf.linear_cross_entropy(h, w, t, bias=b, return_grad=True, chunk_rows=5)
    for a, c in zip((h, w, b, t), copies):
        np.testing.assert_array_equal(a, c)


def test_errors_name_the_argument():
    h, w, b, t = problem()
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 6\)"):
        xf.linear_cross_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="bias must have shape"):
        xf.linear_cross_entropy(h, w, t, bias=b[:3])
    with pytest.raises(ValueError, match="targets must have"):
        xf.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(IndexError, match=r"targets\[1\] = 23"):
        t[1] = V
        xf.linear_cross_entropy(h, w, t)
    t[1] = 0
    with pytest.raises(TypeError, match="integer class indices"):
        xf.linear_cross_entropy(h, w, t.astype(np.float64))
    with pytest.raises(ValueError, match="chunk_rows"):
        xf.linear_cross_entropy(h, w, t, chunk_rows=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        xf.linear_cross_entropy(h, w, t, label_smoothing=2.0)
    with pytest.raises(ValueError, match="reduction"):
        xf.linear_cross_entropy(h, w, t, reduction="batchmean")


# ---------------------------------------------------------------------------- PyTorch
def test_torch_linear_cross_entropy_equals_functional():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt = pytest.importorskip("xent_fast.torch")
    h, w, b, t = (torch.from_numpy(a) for a in problem(n=30))
    for reduction, with_bias, opts in itertools.product(["mean", "sum", "none"], [False, True],
                                                        [{}, dict(label_smoothing=0.1)]):
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if with_bias else None
        got = xt.linear_cross_entropy(hs, ws, t, bs, reduction=reduction, chunk_rows=8, **opts)
        want = F.cross_entropy(F.linear(hs, ws, bs), t, reduction=reduction, **opts)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        inputs = [hs, ws] + ([bs] if with_bias else [])
        r = torch.rand(got.shape, dtype=torch.float64) + 0.5
        for g1, g2 in zip(torch.autograd.grad(got, inputs, r), torch.autograd.grad(want, inputs, r)):
            torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-13)


def test_torch_gradcheck_opcheck_compile_and_tied_weights():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt = pytest.importorskip("xent_fast.torch")
    from torch.library import opcheck

    h, w, b, t = (torch.from_numpy(a) for a in problem(n=9))
    hs, ws, bs = (a.clone().requires_grad_() for a in (h, w, b))
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: xt.linear_cross_entropy(h, w, t, b, reduction=red, z_loss=0.01,
                                                    softcap=3.0, chunk_rows=4), (hs, ws, bs))
    ops = torch.ops.xent_fast
    opcheck(ops.linear_cross_entropy.default, (hs, ws, t, bs, -100, "mean", 0.1, 0.0, 0.0, 4, True,
                                               True))
    opcheck(ops.linear_cross_entropy.default, (hs, ws, t, None, -100, "none", 0.0, 0.0, 0.0, 0,
                                               False, True))
    opcheck(ops.linear_cross_entropy.default, (hs, w, t, None, -100, "sum", 0.0, 0.0, 0.0, 0,
                                               True, False))
    opcheck(ops.linear_cross_entropy_backward.default,
            (h, w, t, b, torch.rand(9, dtype=torch.float64), -100, 0.0, 0.0, 0.0, 4))
    # tied weights: an embedding whose matrix is also the output head
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, H).double()
    loss_fn = xt.LinearCrossEntropyLoss(H, V, chunk_rows=4).double()
    loss_fn.weight = emb.weight
    tokens = torch.randint(0, V, (3, 5))

    def step(tokens):
        x = torch.tanh(emb(tokens[:, :-1]))
        return loss_fn(x.reshape(-1, H), tokens[:, 1:].reshape(-1))

    for fn in (step, torch.compile(step, fullgraph=True)):
        emb.zero_grad()
        got = fn(tokens)
        got.backward()
        g_got = emb.weight.grad.clone()
        emb.zero_grad()
        x = torch.tanh(emb(tokens[:, :-1]))
        want = F.cross_entropy(F.linear(x.reshape(-1, H), emb.weight), tokens[:, 1:].reshape(-1))
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, emb.weight.grad)


def test_torch_bfloat16():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt = pytest.importorskip("xent_fast.torch")
    h, w, b, t = (torch.from_numpy(a) for a in problem(n=40))
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    got = xt.linear_cross_entropy(hb, wb, t, chunk_rows=16)
    assert got.dtype == torch.bfloat16
    h64, w64 = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    exact = F.cross_entropy(F.linear(h64, w64), t)
    assert abs(got.double() - exact) <= 2e-2 * abs(exact)
    got.backward()
    exact.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hb.grad.double(), h64.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(wb.grad.double(), w64.grad, rtol=5e-2, atol=5e-3)


# ---------------------------------------------------------------------------- token statistics
def _explicit_stats(h, w, b, t, temperature):
    z = (h.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b)) / temperature
    logp = z - ref.logsumexp(z)[:, None]
    p = np.exp(logp)
    kept = t != -100
    lp = np.where(kept, logp[np.arange(len(t)), np.where(kept, t, 0)], 0.0)
    ent = np.where(kept, -np.sum(p * logp, axis=1), 0.0)
    return lp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_stats_values(temperature, with_bias):
    h, w, b, t = problem(n=17)
    bias = b if with_bias else None
    lp, ent = xf.linear_token_stats(h, w, t, bias=bias, temperature=temperature, chunk_rows=5)
    want_lp, want_ent = _explicit_stats(h, w, bias, t, temperature)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-12, atol=1e-13)
    assert lp[0] == 0 and ent[0] == 0  # an ignored row


@pytest.mark.parametrize("which", ["logprob", "entropy", "both"])
def test_token_stats_gradients_against_autograd(which):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    h, w, b, t = problem(n=13)
    rng = np.random.default_rng(5)
    a = rng.standard_normal(13) if which != "entropy" else None
    c = rng.standard_normal(13) if which != "logprob" else None
    got = xf.linear_token_stats(h, w, t, bias=b, temperature=0.8, chunk_rows=4,
                                grad_logprob=a, grad_entropy=c)
    hs, ws, bs = (torch.from_numpy(x).requires_grad_() for x in (h, w, b))
    tt = torch.from_numpy(t)
    logp = F.log_softmax(F.linear(hs, ws, bs) / 0.8, dim=1)
    kept = tt != -100
    lp = torch.where(kept, logp.gather(1, tt.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(kept, -(logp.exp() * logp).sum(1), 0.0)
    obj = 0
    if a is not None:
        obj = obj + (torch.from_numpy(a) * lp).sum()
    if c is not None:
        obj = obj + (torch.from_numpy(c) * ent).sum()
    want = torch.autograd.grad(obj, (hs, ws, bs))
    np.testing.assert_allclose(got[0], lp.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got[1], ent.detach().numpy(), rtol=1e-12, atol=1e-13)
    for g, r in zip(got[2:], want):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-10, atol=1e-12)


def test_torch_token_stats_autograd_and_opcheck():
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xent_fast.torch")
    from torch.library import opcheck

    h, w, b, t = (torch.from_numpy(x) for x in problem(n=9))
    hs, ws, bs = (x.clone().requires_grad_() for x in (h, w, b))

    def ppo_like(h, w, b):  # a policy term and an entropy bonus
        lp, ent = xt.linear_token_stats(h, w, t, b, temperature=1.3, chunk_rows=4)
        return (lp * torch.linspace(-1, 1, 9, dtype=torch.float64)).sum() + 0.01 * ent.sum()

    assert torch.autograd.gradcheck(ppo_like, (hs, ws, bs))
    opcheck(torch.ops.xent_fast.linear_token_stats.default, (hs, ws, t, bs, 1.3, -100, 4))
    opcheck(torch.ops.xent_fast.linear_token_stats_backward.default,
            (h, w, t, None, torch.rand(9, dtype=torch.float64), torch.rand(9, dtype=torch.float64),
             1.0, -100, 0))
    compiled = torch.compile(ppo_like, fullgraph=True)
    torch.testing.assert_close(compiled(hs, ws, bs), ppo_like(hs, ws, bs))


def test_torch_frozen_head_skips_the_weight_gradient(monkeypatch):
    """A head that does not require grad (a frozen or LoRA-adapted model): no weight
    gradient is formed, and the input's is PyTorch's."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt = pytest.importorskip("xent_fast.torch")
    from xent_fast import _linear

    calls = []
    real = _linear._NumPy.add_matmul_t
    monkeypatch.setattr(_linear._NumPy, "add_matmul_t",
                        lambda self, *a: calls.append(1) or real(self, *a))
    h, w, b, t = (torch.from_numpy(a) for a in problem(n=30))
    for reduction in ("mean", "sum"):
        hs = h.clone().requires_grad_()
        got = xt.linear_cross_entropy(hs, w, t, reduction=reduction, chunk_rows=8)
        g, = torch.autograd.grad(got, hs)
        h2 = h.clone().requires_grad_()
        want = F.cross_entropy(F.linear(h2, w), t, reduction=reduction)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g, torch.autograd.grad(want, h2)[0])
    assert not calls
