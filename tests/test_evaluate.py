"""evaluate: per-row metrics and aggregates against the float64 reference, conventions,
and the exact merge of partial states (row chunks and class slices)."""

import math

import numpy as np
import pytest

import xent_fast as xf
from xent_fast import reference as R
from xent_fast._evaluate import (merge_class_stats, row_stats, rows_from_stats,
                                 check_targets)

from conftest import BACKENDS, DTYPES, assert_close, tol

AGGREGATES = ("cross_entropy", "entropy", "target_prob", "ece", "perplexity")


def _data(rng, shape, dtype, scale=3.0):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    t = rng.integers(0, shape[-1], shape[:-1])
    if t.size > 3:
        t.reshape(-1)[2] = -100
    return x, t


def check_result(res, ref, rtol, rows=True):
    assert res.count == ref["count"]
    for name in AGGREGATES:
        assert_close(getattr(res, name), ref[name], rtol, what=name)
    assert res.accuracy == pytest.approx(ref["accuracy"], abs=1e-12, nan_ok=True)
    if rows:
        for k, v in ref["rows"].items():
            assert_close(res.rows[k], v, rtol, what=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(40, 1), (33, 2), (5, 7, 37), (3, 5000), (0, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_evaluate_matches_reference(rng, shape, dtype, backend):
    x, t = _data(rng, shape, dtype)
    res = xf.evaluate(x, t, topk=(1, 2, 5), per_row=True, backend=backend)
    ref = R.evaluate(x, t, topk=(1, 2, 5))
    check_result(res, ref, tol(dtype) * 10)
    assert res.rows["loss"].shape == shape[:-1]


def test_worked_example_and_formulas():
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    res = xf.evaluate(np.log(p), np.array([0, 2]), topk=(1, 2), n_bins=10, per_row=True)
    assert res.cross_entropy == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert res.perplexity == pytest.approx(math.exp(res.cross_entropy))
    assert res.accuracy == {1: 0.5, 2: 1.0}
    h = -np.sum(p * np.log(p), axis=1)
    assert res.entropy == pytest.approx(h.mean())
    assert res.target_prob == pytest.approx(0.5)
    # bins (0.6, 0.7] holds row 0 (correct, conf 0.7); (0.4, 0.5] row 1 (wrong, conf 0.5)
    assert res.ece == pytest.approx((abs(1 - 0.7) + abs(0 - 0.5)) / 2)
    assert res.rows["prediction"].tolist() == [0, 1]
    assert res.rows["rank"].tolist() == [0, 1]
    assert res.rows["confidence"] == pytest.approx([0.7, 0.5])


def test_ties_count_for_the_target_and_argmax_is_first():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    res = xf.evaluate(x, np.array([2, 3]), topk=(1,), per_row=True)
    assert res.rows["rank"].tolist() == [0, 0]
    assert res.rows["prediction"].tolist() == [1, 0]
    assert res.accuracy[1] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_and_extreme_logits(backend):
    ninf = -np.inf
    x = np.array([[ninf, 1.0, 2.0, ninf], [0.5, ninf, 3.0, 1.0], [1e30, -1e30, 0.0, 5.0],
                  [ninf, ninf, ninf, ninf]], np.float32)
    t = np.array([2, 1, 0, 0])
    res = xf.evaluate(x, t, per_row=True, backend=backend)
    ref = R.evaluate(x, t)
    r = res.rows
    assert np.isfinite(r["entropy"][:3]).all()  # 0 * -inf counted as 0
    assert r["loss"][1] == np.inf and r["target_prob"][1] == 0.0
    assert r["loss"][3] == np.inf and np.isnan(r["entropy"][3])
    for k in ("loss", "target_prob", "entropy", "confidence", "rank", "prediction"):
        assert_close(r[k], ref["rows"][k], 1e-6, what=k)
    assert res.cross_entropy == np.inf


def test_all_ignored_gives_nan_means():
    x = np.zeros((3, 4))
    res = xf.evaluate(x, np.full(3, -1), ignore_index=-1)
    assert res.count == 0
    assert all(math.isnan(getattr(res, a)) for a in AGGREGATES)
    assert math.isnan(res.accuracy[1])


def test_axis_and_batch_axes(rng):
    x, t = _data(rng, (4, 6, 11), np.float64)
    a = xf.evaluate(np.moveaxis(x, -1, 1), t, axis=1, per_row=True)
    b = xf.evaluate(x, t, per_row=True)
    assert a.cross_entropy == pytest.approx(b.cross_entropy, rel=1e-14)
    assert np.array_equal(a.rows["rank"], b.rows["rank"])


def test_errors(rng):
    x, t = _data(rng, (5, 4), np.float32)
    bad = t.copy()
    bad[3] = 4
    with pytest.raises(IndexError, match=r"targets\[3\] = 4"):
        xf.evaluate(x, bad)
    with pytest.raises(ValueError, match="shape"):
        xf.evaluate(x, t[:4])
    with pytest.raises(TypeError, match="integer"):
        xf.evaluate(x, t.astype(np.float32))
    with pytest.raises(ValueError, match="topk"):
        xf.evaluate(x, t, topk=(0,))
    with pytest.raises(ValueError, match="n_bins"):
        xf.evaluate(x, t, n_bins=0)
    try:
        from numba import cuda
        gpu = cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:  # on the GPU, tests/cuda checks evaluate
        with pytest.raises((RuntimeError, ImportError), match=r"xent_fast\[cuda\]"):
            xf.evaluate(x, t, backend="cuda")


def test_row_chunks_merge(rng):
    x, t = _data(rng, (101, 13), np.float64)
    whole = xf.evaluate(x, t)
    for step in (1, 7, 50):
        state = None
        for lo in range(0, 101, step):
            part = xf.evaluate(x[lo:lo + step], t[lo:lo + step]).state
            state = part if state is None else state + part
        res = state.result()
        for name in AGGREGATES:
            assert getattr(res, name) == pytest.approx(getattr(whole, name), rel=1e-13)
        assert res.accuracy == whole.accuracy
        assert np.array_equal(res.state.bin_count, whole.state.bin_count)


def test_eval_state_repr_says_what_it_holds():
    """One line with the rows counted, the NaN rows, the sums and the hits of each k;
    ignored rows are not counted."""
    x = np.log([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    x[3, 0] = np.nan
    state = xf.evaluate(x, np.array([0, 2, -100, 1]), topk=(1, 2), n_bins=10).state
    text = repr(state)
    assert "\n" not in text
    assert text == ("EvalState(count=3, nan_count=1, sum_loss=nan, sum_entropy=nan, "
                    "sum_target_prob=nan, correct=(top1=1, top2=2), n_bins=10, binned=2)")
    assert repr(xf.EvalState()) == (
        "EvalState(count=0, nan_count=0, sum_loss=0, sum_entropy=0, sum_target_prob=0, "
        "correct=(top1=0, top5=0), n_bins=15, binned=0)")
    merged = state + state
    assert repr(merged).startswith("EvalState(count=6, nan_count=2, ")
    assert repr(merged.result()).startswith("EvalResult(count=6, ")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cuts", [(0, 13), (0, 1, 13), (0, 4, 5, 9, 13), (0, 6, 7, 13)])
def test_class_slices_merge_exactly(rng, dtype, cuts):
    x, t = _data(rng, (60, 13), dtype)
    x[0, :] = -np.inf
    x[1, 4:9] = -np.inf
    x[2, [3, 10]] = x[2].max() + 1  # tied maxima in different slices
    tf = check_targets(t, (60,), 13, -100)
    whole, _ = row_stats(x, 0, tf)
    parts, tops = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        st, top = row_stats(np.ascontiguousarray(x[:, lo:hi]), 0, tf, lo, False, 3)
        parts.append(st)
        tops.append(top)
    merged, top = merge_class_stats(np.stack(parts, 1), np.stack(tops, 1), 3)
    a = rows_from_stats(whole, tf, -100)
    b = rows_from_stats(merged, tf, -100, top)
    rt = 1e-12 if dtype == np.float64 else 1e-6
    for k in ("loss", "target_prob", "entropy", "confidence", "prediction"):
        assert_close(b[k], a[k], rt, what=k)
    assert np.array_equal(b["rank"], np.minimum(a["rank"], 3))
    assert b["prediction"][2] == 3


# ---------------------------------------------------------------------------- NaN rule
def _nan_rows(c, dtype):
    """Rows with NaN logits in every kind of place, a clean row first and an ignored
    NaN row; returns (x, t, which rows hold a NaN and are counted)."""
    ninf, inf = -np.inf, np.inf
    mid = c // 2
    x = np.zeros((12, c), dtype)
    x[:, 1] = 1.0
    t = np.full(12, 1)
    x[1, 1] = np.nan                      # the target's logit
    x[2, 0] = np.nan                      # the first class (first chunk)
    x[3, c - 1] = np.nan                  # the last class (last chunk)
    x[4, mid] = np.nan
    x[4, 0] = inf                         # and a +inf elsewhere
    x[5, mid] = np.nan
    x[5, 2:mid] = ninf                    # and -inf logits
    x[6, mid] = -np.float64(np.nan)       # a NaN with its sign bit set
    x[7, 0] = np.nan
    x[7, 1] = inf                         # NaN with +inf at the target
    x[8, :] = ninf
    x[8, c - 1] = np.nan                  # NaN in a row of -inf
    x[9, 2] = np.nan
    t[9] = -100                           # ignored: stays out whatever its logits
    x[10, 2] = np.nan                     # first chunk; the target at the max elsewhere
    t[10] = c - 2
    x[10, c - 2] = 5.0
    x[11, c - 1] = -np.float64(np.nan)    # negative NaN in a -inf/+inf row
    x[11, 0] = inf
    x[11, 2] = ninf
    nan_rows = np.array([False] + [True] * 8 + [False, True, True])
    return x, t, nan_rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("c", [5, 3000, 4100])
def test_nan_logits_make_every_metric_of_the_row_nan(backend, dtype, c):
    from xent_fast._evaluate import NAN_RANK

    x, t, nan_rows = _nan_rows(c, dtype)
    res = xf.evaluate(x, t, topk=(1, 5), per_row=True, backend=backend)
    r = res.rows
    for k in ("loss", "target_prob", "entropy", "confidence"):
        assert np.isnan(r[k][nan_rows]).all(), (k, r[k])
    assert (r["prediction"][nan_rows] == -1).all()
    assert (r["rank"][nan_rows] == NAN_RANK).all()
    # the loss agrees with softmax_cross_entropy row by row (NaN where it is NaN)
    ce = np.asarray(xf.softmax_cross_entropy(x, t, reduction="none", backend=backend),
                    np.float64)
    assert np.isnan(ce[nan_rows]).all()
    # the clean row is untouched: uniform over c - 1 classes but the target's 1.0
    want = math.log(math.e + c - 1) - 1.0
    assert r["loss"][0] == pytest.approx(want, rel=1e-6)
    assert r["rank"][0] == 0 and r["prediction"][0] == 1
    # the ignored NaN row stays ignored
    assert r["ignored"][9] and r["rank"][9] == -1 and np.isnan(r["loss"][9])
    # aggregates: NaN means, the NaN rows count as misses
    assert res.count == 11
    for name in AGGREGATES:
        assert math.isnan(getattr(res, name)), name
    assert res.accuracy == {1: 1 / 11, 5: 1 / 11}
    ref = R.evaluate(x, t, topk=(1, 5))
    check_result(res, ref, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_leave_the_other_rows_and_an_all_ignored_nan_batch(backend):
    x = np.zeros((4, 3000), np.float32)
    x[:, 7] = 3.0
    x[0, 5] = np.nan
    t = np.array([2500, 7, 7, 7])
    res = xf.evaluate(x, t, per_row=True, backend=backend)
    # before the fix: the 2048-class chunk holding the NaN was dropped, loss log(952)
    assert np.isnan(res.rows["loss"][0])
    # float32 rows: the documented 1e-5 (sums of 3000 exps in float32 lanes)
    assert res.rows["loss"][1:] == pytest.approx([math.log(math.exp(3) + 2999) - 3] * 3,
                                                 rel=1e-5)
    assert math.isnan(res.cross_entropy) and res.accuracy[1] == 0.75
    ok = xf.evaluate(x, np.array([-100, 7, 7, 7]), backend=backend)  # NaN row ignored
    assert ok.count == 3 and ok.accuracy[1] == 1.0
    assert ok.cross_entropy == pytest.approx(math.log(math.exp(3) + 2999) - 3, rel=1e-5)
    assert math.isfinite(ok.ece) and math.isfinite(ok.entropy)


def test_nan_target_logit_is_never_a_correct_prediction():
    x = np.array([[np.nan, 0.0, 0.0], [0.0, np.nan, 1.0]])
    res = xf.evaluate(x, np.array([0, 1]), topk=(1, 2, 3), per_row=True)
    assert res.accuracy == {1: 0.0, 2: 0.0, 3: 0.0}
    assert res.rows["prediction"].tolist() == [-1, -1]
    assert math.isnan(res.ece) and math.isnan(res.perplexity)


@pytest.mark.parametrize("cuts", [(0, 13), (0, 4, 13), (0, 4, 5, 9, 13)])
def test_class_slices_merge_nan(cuts):
    from xent_fast._evaluate import NAN_RANK

    x = np.tile(np.arange(13.0), (4, 1))
    x[0, 4] = np.nan                      # alone in a slice for (0, 4, 5, 9, 13)
    x[1, 12] = np.nan
    x[2, 0] = -np.float64(np.nan)
    t = np.array([12, 0, 5, 12])
    tf = check_targets(t, (4,), 13, -100)
    parts, tops = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        st, top = row_stats(np.ascontiguousarray(x[:, lo:hi]), 0, tf, lo, False, 3)
        parts.append(st)
        tops.append(top)
    merged, top = merge_class_stats(np.stack(parts, 1), np.stack(tops, 1), 3)
    r = rows_from_stats(merged, tf, -100, top)
    for k in ("loss", "target_prob", "entropy", "confidence"):
        assert np.isnan(r[k][:3]).all() and np.isfinite(r[k][3]), k
    assert r["prediction"].tolist() == [-1, -1, -1, 12]
    assert r["rank"].tolist() == [NAN_RANK] * 3 + [0]
