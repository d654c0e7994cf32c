"""Regression tests for the trust fixes made after 4459cf3, each named after what broke.

Every test asserts values against ``xent_fast.reference`` (float64 NumPy) or against an
exact expectation (Python's ``decimal``, closed forms), not just shapes.  Grouped by
theme: distillation (softmax_kl_divergence) at large logits, ``grad_out`` aliasing, the
z-loss under class weights, digits near 1 in log-sum-exp, bad targets, the few-classes
kernel's ignored rows, overflow in soft targets, zero-weight targets, mixed dtypes,
empty binary inputs, option validation, and compiling without a writable cache.

Kernels compile per (dtype, backend, class count <= 16), so the shapes are few and
reused: C = 37 or 300 for the general kernels, C = 3 for the few-classes one.
"""

import decimal
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xent_fast as xf
from xent_fast import reference as R

from conftest import BACKENDS, assert_close, assert_grad_close, gtol, tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _pad(a, c):
    """``a`` (rows, k) padded with zero columns to ``c`` classes."""
    out = np.zeros((a.shape[0], c), a.dtype)
    out[:, :a.shape[1]] = a
    return out


# ------------------------------------------------------- distillation at large logits
# (x - max)/T, not x/T - max/T: the latter, contracted to one multiply-add, kept the
# rounding of max/T (a whole unit of the exponent at 1e8), and the gradient was wrong.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 300])
@pytest.mark.parametrize("dtype,scale", [(F32, 1e8), (F64, 1e20)])
def test_kl_gradient_with_temperature_at_large_logits(dtype, scale, c, backend):
    x = _pad(np.array([[1.0, 0.5, 0.0]]) * scale, c).astype(dtype)
    t = _pad(np.array([[0.2, 1.0, 0.0]]) * scale, c).astype(dtype)
    loss, g = xf.softmax_kl_divergence(x, t, temperature=3.0, return_grad=True,
                                       backend=backend)
    want_loss, want_g = R.softmax_kl_divergence(x, t, temperature=3.0, return_grad=True)
    exact = np.zeros((1, c))
    exact[0, :2] = [1 / 3, -1 / 3]
    assert_close(want_g, exact, 1e-12, what="reference grad")  # the oracle agrees
    assert_close(loss, want_loss, tol(dtype), what="loss")
    assert_close(loss, 0.5 * scale / 3, tol(dtype), what="loss, closed form")
    assert g.dtype == dtype
    assert_grad_close(g, want_g, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_in_place_gradient_beyond_1e30(backend):
    # the rows beyond +-1e30 took a path that read the logits after the in-place
    # gradient had overwritten them
    x = np.array([[1e35, 5e34, 0.0]], np.float32)
    t = np.array([[2e34, 1e35, 0.0]], np.float32)
    plain = xf.softmax_kl_divergence(x.copy(), t, backend=backend)
    want_loss, want_g = R.softmax_kl_divergence(x, t, return_grad=True)
    g_in = x.copy()
    loss, g = xf.softmax_kl_divergence(g_in, t, grad_out=g_in, backend=backend)
    assert g is g_in
    assert_close(plain, want_loss, tol(F32), what="loss without grad_out")
    assert_close(loss, plain, tol(F32), what="loss with grad_out=logits")
    assert_close(loss, 5e34, tol(F32), what="loss, closed form")
    assert_grad_close(g_in, want_g, F32)
    assert_close(g_in, [[1.0, -1.0, 0.0]], gtol(F32), what="grad, closed form")


# ------------------------------------------------------------- grad_out aliasing inputs
# The kernels read the targets (or target logits) after writing the gradient: a
# grad_out that is one of them must go through a temporary.
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_out_aliasing_probability_targets(backend, rng):
    x = rng.standard_normal((3, 37))
    p = R.softmax(rng.standard_normal((3, 37)))
    want = xf.softmax_cross_entropy(x.copy(), p.copy(), return_grad=True, backend=backend)
    ref = R.softmax_cross_entropy(x, p, return_grad=True)
    alias = p.copy()
    loss, g = xf.softmax_cross_entropy(x, alias, grad_out=alias, backend=backend)
    assert g is alias
    assert_close(loss, want[0], tol(F64), what="loss")
    assert_close(loss, ref[0], tol(F64), what="loss vs reference")
    assert_grad_close(alias, want[1], F64)
    assert_grad_close(alias, ref[1], F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_out_aliasing_target_logits(backend, rng):
    x = rng.standard_normal((3, 37))
    t = rng.standard_normal((3, 37))
    want = xf.softmax_kl_divergence(x.copy(), t.copy(), return_grad=True, backend=backend)
    ref = R.softmax_kl_divergence(x, t, return_grad=True)
    alias = t.copy()
    loss, g = xf.softmax_kl_divergence(x, alias, grad_out=alias, backend=backend)
    assert g is alias
    assert_close(loss, want[0], tol(F64), what="loss")
    assert_close(loss, ref[0], tol(F64), what="loss vs reference")
    assert_grad_close(alias, want[1], F64)
    assert_grad_close(alias, ref[1], F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_of_logits_with_themselves_in_place(backend, rng):
    x = rng.standard_normal((3, 37))
    # the target a copy: in place on the logits only
    a = x.copy()
    loss, g = xf.softmax_kl_divergence(a, x.copy(), grad_out=a, backend=backend)
    assert g is a
    assert_close(loss, 0.0, 1e-12, what="loss, copy")
    assert_close(a, np.zeros_like(x), 1e-12, what="grad, copy")
    # one array for logits, target logits and gradient
    b = x.copy()
    loss, g = xf.softmax_kl_divergence(b, b, grad_out=b, backend=backend)
    assert g is b
    assert_close(loss, 0.0, 1e-12, what="loss, x x x")
    assert_close(b, np.zeros_like(x), 1e-12, what="grad, x x x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_out_aliasing_binary_targets(backend, rng):
    x = rng.standard_normal((3, 37))
    y = rng.random((3, 37))
    want = xf.binary_cross_entropy_with_logits(x.copy(), y.copy(), return_grad=True,
                                               backend=backend)
    ref = R.binary_cross_entropy_with_logits(x, y, return_grad=True)
    assert_close(want[0], ref[0], tol(F64), what="loss vs reference")
    assert_grad_close(want[1], ref[1], F64)
    # grad_out the targets themselves (elementwise: each target is read before its
    # gradient is written, so this one held at 4459cf3 too)
    alias = y.copy()
    loss, g = xf.binary_cross_entropy_with_logits(x, alias, grad_out=alias, backend=backend)
    assert g is alias
    assert_close(loss, want[0], tol(F64), what="loss, grad_out=targets")
    assert_grad_close(alias, want[1], F64, what="grad, grad_out=targets")
    # grad_out one element ahead of the targets in the same buffer: writing gradient j
    # overwrote target j + 1 before it was read
    buf = np.zeros(y.size + 1)
    targets = buf[:-1].reshape(y.shape)
    gout = buf[1:].reshape(y.shape)
    targets[...] = y
    loss, g = xf.binary_cross_entropy_with_logits(x, targets, grad_out=gout,
                                                  backend=backend)
    assert g is gout
    assert_close(loss, want[0], tol(F64), what="loss, overlapping grad_out")
    assert_grad_close(gout, want[1], F64, what="grad, overlapping grad_out")


# ------------------------------------------------------------- z-loss and class weights
# The z-loss is not class-weighted: under "mean" it is averaged over the kept rows, so
# scaling every class weight leaves the loss (and gradient) unchanged.
ZL = 0.25


def _zloss_case(rng, c):
    x = rng.standard_normal((4, c)) * 3
    t = np.array([1, -100, 2, 0])  # row 1 ignored
    w = np.ones(c)
    return x, t, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 37])
def test_z_loss_mean_does_not_scale_with_class_weights(c, backend, rng):
    x, t, w = _zloss_case(rng, c)
    plain = xf.softmax_cross_entropy(x, t, z_loss=ZL, return_grad=True, backend=backend)
    ref_plain = R.softmax_cross_entropy(x, t, z_loss=ZL, return_grad=True)
    assert_close(plain[0], ref_plain[0], tol(F64), what="unweighted loss")
    for s in (1.0, 2.0, 10.0):
        ws = w * s
        loss, g = xf.softmax_cross_entropy(x, t, weight=ws, z_loss=ZL, return_grad=True,
                                           backend=backend)
        ref = R.softmax_cross_entropy(x, t, weight=ws, z_loss=ZL, return_grad=True)
        assert_close(ref[0], ref_plain[0], 1e-12, what=f"reference loss, weight {s}")
        assert_close(loss, ref[0], tol(F64), what=f"loss, weight {s}")
        assert_close(loss, plain[0], tol(F64), what=f"loss vs unweighted, weight {s}")
        assert_grad_close(g, ref[1], F64, what=f"grad, weight {s}")
        assert_grad_close(g, plain[1], F64, what=f"grad vs unweighted, weight {s}")
    # by hand: mean CE over kept weight + z * mean lse^2 over kept rows
    keep = t != -100
    lse = R.logsumexp(x)
    nll = lse - x[np.arange(4), np.where(keep, t, 0)]
    hand = nll[keep].mean() + ZL * np.mean(lse[keep] ** 2)
    loss = xf.softmax_cross_entropy(x, t, weight=w * 10, z_loss=ZL, backend=backend)
    assert_close(loss, hand, tol(F64), what="loss by hand")


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_mean_with_zero_summed_weight_is_the_references(backend, rng):
    # every kept target of weight 0: the mean is 0/0 (NaN) or x/0, z-loss or not
    x, t, w = _zloss_case(rng, 37)
    w = np.ones(37)
    w[np.where(t != -100, t, 0)] = 0.0
    for eps in (0.0, 0.1):
        got = xf.softmax_cross_entropy(x, t, weight=w, z_loss=ZL, label_smoothing=eps,
                                       backend=backend)
        with np.errstate(all="ignore"):
            want = R.softmax_cross_entropy(x, t, weight=w, z_loss=ZL, label_smoothing=eps)
        assert_close(got, want, tol(F64), what=f"eps {eps}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 37])
def test_z_loss_sum_and_none_add_z_lse_squared_per_row(c, backend, rng):
    # a guard that the "mean" fix left these alone (held at 4459cf3 too)
    x, t, _ = _zloss_case(rng, c)
    w = rng.random(c) + 0.5
    keep = t != -100
    lse2 = np.where(keep, R.logsumexp(x) ** 2, 0.0)
    for red in ("none", "sum"):
        with_z = xf.softmax_cross_entropy(x, t, weight=w, z_loss=ZL, reduction=red,
                                          backend=backend)
        without = xf.softmax_cross_entropy(x, t, weight=w, reduction=red, backend=backend)
        ref = R.softmax_cross_entropy(x, t, weight=w, z_loss=ZL, reduction=red)
        assert_close(with_z, ref, tol(F64), what=red)
        want = ZL * lse2 if red == "none" else ZL * lse2.sum()
        assert_close(np.asarray(with_z) - np.asarray(without), want, 1e-9, what=red)
    loss, g = xf.softmax_cross_entropy(x, t, weight=w, z_loss=ZL, reduction="sum",
                                       return_grad=True, backend=backend)
    ref = R.softmax_cross_entropy(x, t, weight=w, z_loss=ZL, reduction="sum",
                                  return_grad=True)
    assert_grad_close(g, ref[1], F64)


# ------------------------------------------------- log-sum-exp of a nearly one-hot row
# log(1 + 4e-18) is 0 in float64: the max term's exp(0) = 1 is split off and the rest
# taken through log1p, so a confident row keeps its digits.
TINY = np.logaddexp(0.0, -40.0)  # 4.248354255291589e-18


@pytest.mark.parametrize("backend", BACKENDS)
def test_logsumexp_keeps_the_digits_of_a_dominant_max(backend):
    assert TINY == pytest.approx(4.248354255291589e-18, rel=1e-12, abs=0)
    row = np.array([0.0, -40.0])
    got = xf.logsumexp(row, backend=backend)
    assert got != 0.0
    assert float(got) == pytest.approx(TINY, rel=1e-12, abs=0)
    assert float(R.logsumexp(row)) == pytest.approx(TINY, rel=1e-12, abs=0)
    ls = xf.log_softmax(row, backend=backend)
    assert float(ls[0]) == pytest.approx(-TINY, rel=1e-12, abs=0)
    assert float(ls[1]) == pytest.approx(-40.0 - TINY, rel=1e-15, abs=0)
    rows = np.array([[0.0, -40.0], [-40.0, 0.0]], np.float32)
    got32 = xf.logsumexp(rows, backend=backend)
    assert got32.dtype == np.float32
    assert_close(got32, [TINY, TINY], 1e-5, atol=0.0, what="float32 rows")
    assert_close(xf.log_softmax(rows, backend=backend).max(axis=-1), [-TINY, -TINY], 1e-5,
                 atol=0.0, what="float32 log_softmax")


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_correct_row_keeps_its_loss_digits(backend):
    x = np.array([[0.0, -40.0]])
    got = xf.softmax_cross_entropy(x, np.array([0]), reduction="none", backend=backend)
    assert float(got[0]) == pytest.approx(TINY, rel=1e-12, abs=0)
    want = R.softmax_cross_entropy(x, np.array([0]), reduction="none")
    assert_close(got, want, 1e-12, atol=0.0)


# KL of nearly equal probabilities: p log(p/q) loses the digits of p/q - 1 in the
# division; p log1p((p - q)/q) keeps them.
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_divergence_of_nearly_equal_probabilities(backend):
    p, q = 0.9456657713430001, 0.9456657713430094
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        exact = float(decimal.Decimal(p) * (decimal.Decimal(p) / decimal.Decimal(q)).ln())
    assert exact == pytest.approx(p * math.log1p((p - q) / q), rel=1e-9, abs=0)
    assert exact == pytest.approx(-9.3259e-15, rel=1e-4, abs=0)
    got = xf.kl_divergence(np.array([[p]]), np.array([[q]]), backend=backend)
    assert float(got[0]) == pytest.approx(exact, rel=1e-6, abs=0)


# -------------------------------------------------------------------------- bad targets
# uint64 targets were cast to int64 first: 2**64 - 100 wrapped onto ignore_index (-100)
# and the row was silently ignored.
BIG = 2 ** 64 - 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint64_target_wrapping_onto_ignore_index_is_an_error(backend):
    x = np.zeros((2, 37))
    t = np.array([0, BIG], np.uint64)
    with pytest.raises(IndexError, match=r"targets\[1\].*18446744073709551516"):
        xf.softmax_cross_entropy(x, t, backend=backend)
    with pytest.raises(IndexError, match=r"targets\[1\].*18446744073709551516"):
        xf.softmax_cross_entropy(x, t, return_grad=True, backend=backend)
    # the same array with an in-range target is fine (and its value is right)
    ok = np.array([0, 36], np.uint64)
    assert_close(xf.softmax_cross_entropy(x, ok, backend=backend),
                 R.softmax_cross_entropy(x, ok.astype(np.int64)), tol(F64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint64_target_wrapping_onto_ignore_index_in_evaluate(backend):
    x = np.zeros((2, 37))
    t = np.array([0, BIG], np.uint64)
    with pytest.raises(IndexError, match="18446744073709551516") as e:
        xf.evaluate(x, t, backend=backend)
    assert "targets[1]" in str(e.value)
    # evaluate mapped every target above 2**62 to -2**62 (so as to report it), which an
    # ignore_index of -2**62 then ignored silently
    with pytest.raises(IndexError, match=r"targets\[1\].*18446744073709551516"):
        xf.evaluate(x, t, ignore_index=-2 ** 62, backend=backend)
    with pytest.raises(ValueError, match="ignore_index"):
        xf.evaluate(x, np.array([0, 1]), ignore_index=2 ** 70, backend=backend)
    # in range, the uint64 targets give the reference's metrics
    ok = np.array([0, 36], np.uint64)
    got = xf.evaluate(np.eye(2, 37) * 3, ok, backend=backend)
    want = R.evaluate(np.eye(2, 37) * 3, ok.astype(np.int64))
    assert got.count == want["count"] == 2
    assert_close(got.cross_entropy, want["cross_entropy"], tol(F64), what="evaluate loss")


@pytest.mark.parametrize("ignore", [-100, 3, 40])
def test_the_numpy_and_compiled_target_scans_agree(ignore, rng):
    """Small target arrays are scanned by NumPy, large ones by a compiled pass: both
    give the first bad target and the same "mean" denominator, weighted or not."""
    from xent_fast._cpu import backend as cpu

    c = 37
    w = rng.random(c).astype(np.float32)
    for n in (0, 1, 5, 1000, cpu._COMPILED_SCAN_MIN):
        for case in ("clean", "ignored", "bad", "negative"):
            t = rng.integers(0, c, n).astype(np.int64)
            if n and case != "clean":
                t[rng.random(n) < 0.3] = ignore
            if n > 1 and case in ("bad", "negative"):
                t[n // 2] = c if case == "bad" else -1 - (ignore == -1)
                t[n - 1] = c + 5
            for has_w, weights in ((False, np.ones(1)), (True, w)):
                args = (t, c, ignore, weights, has_w)
                got = cpu.scan_targets(*args)
                want = cpu.run("targets", False, *args)
                assert got[0] == want[0], (n, case, has_w)
                if want[0] < 0:
                    assert got[1] == pytest.approx(want[1], rel=1e-12, abs=0), (n, case)
                    kept = t[t != ignore]
                    exact = np.sum(w[kept], dtype=np.float64) if has_w else kept.size
                    assert got[1] == pytest.approx(exact, rel=1e-12, abs=0)
                else:
                    assert t[want[0]] != ignore and not 0 <= t[want[0]] < c
                    head = t[:want[0]]
                    assert np.all((head == ignore) | ((0 <= head) & (head < c)))


# --------------------------------------------- few-classes kernel: ignored garbage rows
# The gradient of an ignored row was 0 * exp(NaN) = NaN when its logits were all -inf or
# held a NaN; it is exactly 0.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_few_classes_ignored_row_of_inf_or_nan_has_zero_gradient(dtype, backend, rng):
    x = rng.standard_normal((4, 3))  # (3 classes: kernels other tests build too)
    x[1] = -np.inf
    x[3, 2] = np.nan
    x = x.astype(dtype)
    t = np.array([2, -100, 1, -100])
    for red in ("mean", "sum", "none"):
        loss, g = xf.softmax_cross_entropy(x, t, reduction=red, return_grad=True,
                                           backend=backend)
        ref_loss, ref_g = R.softmax_cross_entropy(x, t, reduction=red, return_grad=True)
        assert_close(loss, ref_loss, tol(dtype), what=f"{red} loss")
        assert np.isfinite(g).all(), red
        assert (g[[1, 3]] == 0).all(), red
        assert_grad_close(g, ref_g, dtype, what=f"{red} grad")


# --------------------------------------------- soft targets near the float32 maximum
# y_c - pivot overflowed float32 at logits near +-2e38: the loss was inf.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 300])
def test_soft_targets_at_float32_extremes_do_not_overflow(c, backend):
    x = _pad(np.array([[2e38, -2e38, 0.0]], np.float32), c)
    p = _pad(np.array([[0.5, 0.5, 0.0]], np.float32), c)
    loss, g = xf.softmax_cross_entropy(x, p, return_grad=True, backend=backend)
    ref_loss, ref_g = R.softmax_cross_entropy(x, p, return_grad=True)
    assert np.isfinite(ref_loss)
    assert_close(loss, ref_loss, tol(F32), what="soft loss")
    assert_close(loss, 2e38, tol(F32), what="soft loss, closed form")
    assert_grad_close(g, ref_g, F32)
    # sanity: a one-hot soft target on class 2 is the index target 2
    onehot = np.zeros_like(p)
    onehot[0, 2] = 1.0
    hard = xf.softmax_cross_entropy(x, np.array([2]), backend=backend)
    soft = xf.softmax_cross_entropy(x, onehot, backend=backend)
    assert_close(hard, 2e38, tol(F32), what="index target")
    assert_close(soft, hard, tol(F32), what="one-hot soft target vs index target")


# ----------------------------------------------------- zero-weight target at -inf logit
# (1 - eps) * 0 * inf was NaN: a target of class weight 0 carries no mass, even where its
# logit is -inf.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [3, 37])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_zero_weight_target_with_minus_inf_logit(eps, c, backend, rng):
    x = rng.standard_normal((3, c))
    x[0, 1] = -np.inf
    t = np.array([1, 2, 0])
    w = rng.random(c) + 0.5
    w[1] = 0.0
    for red in ("none", "sum"):
        loss, g = xf.softmax_cross_entropy(x, t, weight=w, label_smoothing=eps,
                                           reduction=red, return_grad=True, backend=backend)
        ref_loss, ref_g = R.softmax_cross_entropy(x, t, weight=w, label_smoothing=eps,
                                                  reduction=red, return_grad=True)
        assert np.isfinite(loss).all() and np.isfinite(g).all(), red
        assert_close(loss, ref_loss, tol(F64), what=f"{red} loss")
        assert_grad_close(g, ref_g, F64, what=f"{red} grad")
        if eps == 0.0:
            assert (g[0] == 0).all(), red
            if red == "none":
                assert loss[0] == 0.0
            else:  # the row adds nothing to the sum
                rest = xf.softmax_cross_entropy(x[1:], t[1:], weight=w, reduction="sum",
                                                backend=backend)
                assert_close(loss, rest, tol(F64), what="sum without row 0")
        else:  # every other class still has mass: a finite, nonzero row
            assert g[0, 1] == 0.0  # exp(-inf) = 0 and no target mass
            assert np.abs(g[0]).sum() > 0


# ------------------------------------------------------------------- mixed input dtypes
# float64 logits with float16 target logits met a kernel that mixed a float64 row with a
# float32 one: a Numba TypingError.
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_with_float64_logits_and_float16_targets(backend, rng):
    z = xf.softmax_kl_divergence(np.zeros((2, 300)), np.zeros((2, 300), np.float16),
                                 backend=backend)
    assert z == 0.0
    x = rng.standard_normal((2, 300))
    t = rng.standard_normal((2, 300)).astype(np.float16)
    loss, g = xf.softmax_kl_divergence(x, t, temperature=2.0, return_grad=True,
                                       backend=backend)
    ref_loss, ref_g = R.softmax_kl_divergence(x, t.astype(np.float64), temperature=2.0,
                                              return_grad=True)
    assert ref_loss > 0
    assert_close(loss, ref_loss, tol(F64), what="loss")
    assert g.dtype == np.float64
    assert_grad_close(g, ref_g, F64)


# ------------------------------------------------------------------ empty binary inputs
# Reshaping a (2, 0) input with -1 failed: ValueError: cannot reshape.
@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_losses_of_empty_inputs_with_weights(backend):
    e = np.zeros((2, 0))
    w = np.ones(0)
    calls = {
        "bce": lambda red: xf.binary_cross_entropy(e, e, weight=w, reduction=red,
                                                   backend=backend),
        "bce_logits": lambda red: xf.binary_cross_entropy_with_logits(
            e, e, weight=w, reduction=red, backend=backend),
        "bce_logits_pos": lambda red: xf.binary_cross_entropy_with_logits(
            e, e, weight=w, pos_weight=w, reduction=red, backend=backend),
    }
    for name, call in calls.items():
        assert call("sum") == 0.0, name
        assert np.isnan(call("mean")), name
        none = call("none")
        assert isinstance(none, np.ndarray) and none.shape == (2, 0), name
    assert np.isnan(R.binary_cross_entropy(e, e, weight=w, reduction="mean"))
    loss, g = xf.binary_cross_entropy_with_logits(e, e, weight=w, pos_weight=w,
                                                  reduction="sum", return_grad=True,
                                                  backend=backend)
    assert loss == 0.0 and g.shape == (2, 0)


# ------------------------------------------------------ options: errors name the option
X37 = np.zeros((2, 37))
T37 = np.array([0, 5])


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(ignore_index=2 ** 70), ValueError, "ignore_index"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(z_loss="1"), TypeError, "z_loss"),
    (dict(softcap=1e-310), ValueError, "softcap"),
])
def test_bad_cross_entropy_options_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        xf.softmax_cross_entropy(X37, T37, backend="cpu", **kwargs)


@pytest.mark.parametrize("temperature,dtype,exc", [
    ("2", F64, TypeError),
    (1e-310, F64, ValueError),  # 1/T overflows: was a silent NaN
    (1e-39, F32, ValueError),  # 1/T overflows float32
])
def test_bad_temperature_names_the_argument(temperature, dtype, exc):
    x = X37.astype(dtype)
    with pytest.raises(exc, match="temperature"):
        xf.softmax_kl_divergence(x, x, temperature=temperature, backend="cpu")


def test_good_options_still_give_reference_values(rng):
    # the checks above reject only what they should (a guard: passes at 4459cf3 too)
    x = rng.standard_normal((2, 37))
    t = np.array([3, 2 ** 40])
    got = xf.softmax_cross_entropy(x, t, ignore_index=2 ** 40, label_smoothing=np.float32(0.1),
                                   z_loss=np.float64(0.01), softcap=30, backend="cpu")
    want = R.softmax_cross_entropy(x, t, ignore_index=2 ** 40, label_smoothing=0.1,
                                   z_loss=0.01, softcap=30.0)
    assert_close(got, want, tol(F64))
    # and a temperature just inside float32's range is accepted
    xs = (x * 1e-3).astype(np.float32)
    got = xf.softmax_kl_divergence(xs, xs[::-1].copy(), temperature=1e-38, backend="cpu")
    want = R.softmax_kl_divergence(xs, xs[::-1], temperature=1e-38)
    assert np.isfinite(want) and want > 0
    assert_close(got, want, tol(F32))


# ------------------------------------------------------- compiling without a disk cache
def test_compiles_when_no_cache_locator_is_available():
    # A read-only package folder and no writable cache dir: Numba has no locator and
    # njit(cache=True) raised "RuntimeError: cannot cache function ... no locator".
    code = textwrap.dedent("""
        import numpy as np
        from numba.core import caching
        for cls in caching.CacheImpl._locator_classes:
            cls.from_function = classmethod(lambda cls, py_func, py_file: None)
        import xent_fast as xf
        print(xf.__file__)
        print(repr(float(xf.logsumexp(np.zeros((2, 3)), backend="cpu")[1])))
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    where, value = proc.stdout.split()
    assert where.startswith(os.path.join(ROOT, "xent_fast"))
    assert float(value) == pytest.approx(math.log(3), rel=1e-14, abs=0)
    assert "RuntimeWarning" in proc.stderr
    assert "Error" not in proc.stderr


# ---------------------------------------------------------------- inputs left unchanged
def test_inputs_are_not_modified(rng):
    """Every call above except through grad_out leaves its inputs as they were."""
    x37 = rng.standard_normal((3, 37))
    p37 = R.softmax(rng.standard_normal((3, 37)))
    x5 = rng.standard_normal((4, 3))
    x5[1] = -np.inf
    x5[3, 2] = np.nan
    t5 = np.array([2, -100, 1, -100])
    xw = rng.standard_normal((3, 37))
    xw[0, 1] = -np.inf
    w = rng.random(37) + 0.5
    w[1] = 0.0
    big32 = np.array([[1e35, 5e34, 0.0]], np.float32)
    tbig32 = np.array([[2e34, 1e35, 0.0]], np.float32)
    ext = np.array([[2e38, -2e38, 0.0]], np.float32)
    pext = np.array([[0.5, 0.5, 0.0]], np.float32)
    h16 = rng.standard_normal((2, 300)).astype(np.float16)
    x300 = rng.standard_normal((2, 300))
    y37 = rng.random((3, 37))
    tiny = np.array([[0.0, -40.0]])
    tz = np.array([1, -100, 2])
    inputs = [x37, p37, x5, t5, xw, w, big32, tbig32, ext, pext, h16, x300, y37, tiny, tz]
    saved = [a.copy() for a in inputs]
    calls = [
        lambda be: xf.softmax_kl_divergence(big32, tbig32, temperature=3.0,
                                            return_grad=True, backend=be),
        lambda be: xf.softmax_kl_divergence(x37, p37, return_grad=True, backend=be),
        lambda be: xf.softmax_kl_divergence(x37, x37, return_grad=True, backend=be),
        lambda be: xf.softmax_cross_entropy(x37, p37, return_grad=True, backend=be),
        lambda be: xf.softmax_cross_entropy(x37, tz, weight=w * 2, z_loss=ZL,
                                            return_grad=True, backend=be),
        lambda be: xf.softmax_cross_entropy(x5, t5, return_grad=True, backend=be),
        lambda be: xf.softmax_cross_entropy(xw, np.array([1, 2, 0]), weight=w,
                                            label_smoothing=0.1, return_grad=True,
                                            backend=be),
        lambda be: xf.softmax_cross_entropy(ext, pext, return_grad=True, backend=be),
        lambda be: xf.softmax_kl_divergence(x300, h16, return_grad=True, backend=be),
        lambda be: xf.binary_cross_entropy_with_logits(x37, y37, weight=w, pos_weight=w,
                                                       return_grad=True, backend=be),
        lambda be: xf.binary_cross_entropy(p37, y37, weight=w, backend=be),
        lambda be: xf.logsumexp(tiny, backend=be),
        lambda be: xf.log_softmax(tiny, backend=be),
        lambda be: xf.softmax_cross_entropy(tiny, np.array([0]), reduction="none",
                                            backend=be),
        lambda be: xf.kl_divergence(p37, p37[::-1], backend=be),
    ]
    for backend in BACKENDS:
        for i, call in enumerate(calls):
            with np.errstate(all="ignore"):
                call(backend)
            for a, s in zip(inputs, saved):
                np.testing.assert_array_equal(a, s, err_msg=f"call {i} on {backend}")


# --------------------------------- a dominant max: soft-target CE and the KL from logits
# The split of log s (see the log-sum-exp tests above) reaches the probability-target
# cross-entropy and the KL from two logit arrays: on the CPU the first gave 0.0 for a
# confident right row, the second a negative KL, -1.6e-18, for [0, -40] || [0, -41].
def _exact(f):
    """f(D) evaluated with 60 digits (D: decimal.Decimal), as a float."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        return float(f(decimal.Decimal))


def _kl_of_shifted(a, b):
    """KL(softmax(b) || softmax(a)) of two rows with their max 0 first and one other
    logit each, a and b below it (exactly, about 1e-18 at -40 and -41)."""
    def f(D):
        ea, eb = D(a).exp(), D(b).exp()
        la, lb = (1 + ea).ln(), (1 + eb).ln()
        return (la - lb) + eb / (1 + eb) * (D(b) - D(a))
    return _exact(f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("row,target,exact", [
    ([0.0, -40.0], [1.0, 0.0], _exact(lambda D: (1 + D(-40).exp()).ln())),
    ([-40.0, 0.0, -45.0], [0.0, 1.0, 0.0],
     _exact(lambda D: (1 + D(-40).exp() + D(-45).exp()).ln())),
    # k = 2: s = 2 + rest is no concentrated row; log 2 keeps the digits that matter
    ([0.0, 0.0, -40.0], [0.5, 0.5, 0.0], _exact(lambda D: (2 + D(-40).exp()).ln())),
])
def test_probability_target_ce_keeps_the_digits_of_a_dominant_max(row, target, exact,
                                                                    dtype, backend):
    if exact < 0.5:  # one max at 0: log1p of the rest, the split by hand
        below = math.fsum(math.exp(v) for v in row if v < 0)
        assert exact == pytest.approx(math.log1p(below), rel=1e-12, abs=0)
    rtol = 1e-12 if dtype == F64 else 1e-6
    x = np.array([row], dtype)
    p = np.array([target], dtype)
    got = xf.softmax_cross_entropy(x, p, reduction="none", backend=backend)
    assert float(got[0]) == pytest.approx(exact, rel=rtol, abs=0)
    loss, g = xf.softmax_cross_entropy(x, p, reduction="none", return_grad=True,
                                       backend=backend)
    assert float(loss[0]) == pytest.approx(exact, rel=rtol, abs=0)
    want_loss, want_g = R.softmax_cross_entropy(x, p, reduction="none", return_grad=True)
    assert float(want_loss[0]) == pytest.approx(exact, rel=1e-12, abs=0)  # the oracle
    assert g.dtype == dtype
    assert_grad_close(g, want_g, dtype)
    if dtype == F64 and row == [0.0, -40.0]:  # soft-capped first: 30 tanh(x / 30)
        low = 30.0 * math.tanh(-40.0 / 30.0)
        want = _exact(lambda D: (1 + D(low).exp()).ln())
        got = xf.softmax_cross_entropy(x, p, softcap=30.0, reduction="none",
                                       backend=backend)
        assert float(got[0]) == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("c", [2, 300])  # 300: the one-pass vector kernel's rows
@pytest.mark.parametrize("student,teacher,temperature", [
    ([0.0, -40.0], [0.0, -41.0], 1.0),
    ([-41.0, 0.0], [-40.0, 0.0], 1.0),  # the teacher's tail above the student's
    ([5.0, -35.0], [5.0, -37.0], 2.0),  # on x/T: [0, -20] || [0, -21]
])
def test_kl_from_logits_of_a_dominant_max_is_positive_and_exact(student, teacher,
                                                                  temperature, c, dtype,
                                                                  backend):
    srt = sorted(student, reverse=True)
    trt = sorted(teacher, reverse=True)
    exact = _kl_of_shifted((srt[1] - srt[0]) / temperature, (trt[1] - trt[0]) / temperature)
    assert exact > 0
    rtol = 1e-12 if dtype == F64 else 1e-6
    x = np.full((1, c), -np.inf)
    t = np.full((1, c), -np.inf)
    x[0, :2] = student
    t[0, :2] = teacher
    x, t = x.astype(dtype), t.astype(dtype)
    got = xf.softmax_kl_divergence(x, t, temperature=temperature, reduction="none",
                                   backend=backend)
    assert float(got[0]) > 0
    assert float(got[0]) == pytest.approx(exact, rel=rtol, abs=0)
    loss, g = xf.softmax_kl_divergence(x, t, temperature=temperature, reduction="none",
                                       return_grad=True, backend=backend)
    assert float(loss[0]) == pytest.approx(exact, rel=rtol, abs=0)
    want_loss, want_g = R.softmax_kl_divergence(x, t, temperature=temperature,
                                                reduction="none", return_grad=True)
    assert g.dtype == dtype
    # g/T (softmax(x/T) - softmax(xt/T)): at the max, 1/S_s - 1/S_t carries the rounding
    # of terms of size 1/T (the gradient is not split)
    assert_grad_close(g, want_g, dtype, term=1.0 / temperature)
