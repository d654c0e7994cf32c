"""xent_fast.dask: every chunking (rows and class axis) equals the in-memory result, the
graphs are lazy, and they run on a real distributed cluster of worker processes."""

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

from dask.delayed import Delayed  # noqa: E402

import xent_fast as xf  # noqa: E402
import xent_fast.dask as xfd  # noqa: E402

from conftest import assert_close  # noqa: E402

AGG = ("cross_entropy", "entropy", "target_prob", "ece", "perplexity")
CHUNKS = [(6, 50, 37), (2, 7, 37), (3, 50, 10), (1, 13, 4), (6, 50, 1), (4, 9, 36)]
IDS = ["one", "rows", "classes", "both", "single-class", "ragged"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 50, 37)) * 3).astype(np.float32)
    x[1, 2, 5] = -np.inf
    x[2, 3, :] = x[2, 3, 0]  # a row of ties
    x[3, 4, 30:] = -np.inf
    t = rng.integers(0, 37, (6, 50))
    t[0, 3] = -100
    return x, t


def same(res, ref, rtol):
    assert res.count == ref.count
    for a in AGG:
        assert getattr(res, a) == pytest.approx(getattr(ref, a), rel=rtol), a
    assert res.accuracy == ref.accuracy


@pytest.mark.parametrize("chunks", CHUNKS, ids=IDS)
def test_evaluate_every_chunking(data, chunks):
    x, t = data
    ref = xf.evaluate(x, t, topk=(1, 3, 5), per_row=True)
    X = da.from_array(x, chunks=chunks)
    T = da.from_array(t, chunks=(4, 20))  # rechunked to the logits' rows
    lazy = xfd.evaluate(X, T, topk=(1, 3, 5))
    assert isinstance(lazy, Delayed)
    same(lazy.compute(), ref, 1e-6)
    rows = dask.compute(xfd.evaluate_rows(X, T, topk=(1, 3, 5)))[0]
    split = chunks[-1] < 37
    for k, v in ref.rows.items():
        want = np.minimum(v, 5) if (k == "rank" and split) else v
        assert_close(rows[k], want, 1e-6, what=k)


@pytest.mark.parametrize("chunks", CHUNKS, ids=IDS)
def test_losses_every_chunking(data, chunks):
    x, t = data
    rng = np.random.default_rng(0)
    X = da.from_array(x, chunks=chunks)
    w = rng.random(37) + 0.5
    for red in ("none", "sum", "mean"):
        for kw in ({}, {"weight": w, "z_loss": 1e-3}):
            got = xfd.softmax_cross_entropy(X, t, reduction=red, **kw)
            assert isinstance(got, da.Array)
            assert_close(got.compute(), xf.softmax_cross_entropy(x, t, reduction=red, **kw),
                         1e-5, what=f"ce {red} {kw}")
    xt = (rng.standard_normal(x.shape) * 2).astype(np.float32)
    for red in ("none", "sum", "mean", "batchmean"):
        assert_close(xfd.softmax_kl_divergence(X, xt, reduction=red, temperature=2.0).compute(),
                     xf.softmax_kl_divergence(x, xt, reduction=red, temperature=2.0), 1e-5,
                     what=f"kl {red}")
    assert_close(xfd.logsumexp(X).compute(), xf.logsumexp(x), 1e-6)
    assert_close(xfd.logsumexp(X, axis=1, keepdims=True).compute(),
                 xf.logsumexp(x, axis=1, keepdims=True), 1e-6)
    y = rng.random(x.shape).astype(np.float32)
    for red in ("none", "mean"):
        assert_close(xfd.binary_cross_entropy_with_logits(
            X, y, pos_weight=np.arange(37.0), reduction=red).compute(),
            xf.binary_cross_entropy_with_logits(x, y, pos_weight=np.arange(37.0),
                                                reduction=red), 1e-5)


def test_whole_class_axis_options_and_split_limits(data):
    x, t = data
    X = da.from_array(x, chunks=(2, 25, 37))
    got = xfd.softmax_cross_entropy(X, t, label_smoothing=0.1, softcap=5.0).compute()
    assert_close(got, xf.softmax_cross_entropy(x, t, label_smoothing=0.1, softcap=5.0), 1e-5)
    p = xf.softmax(x[..., ::-1])
    assert_close(xfd.softmax_cross_entropy(X, p).compute(), xf.softmax_cross_entropy(x, p),
                 1e-5)
    with pytest.raises(NotImplementedError):
        xfd.softmax_cross_entropy(X.rechunk((2, 25, 10)), t, label_smoothing=0.1)


def test_class_axis_not_last_and_errors(data):
    x, t = data
    ref = xf.evaluate(x, t)
    xa = np.moveaxis(x, -1, 0)
    same(xfd.evaluate(da.from_array(xa, chunks=(10, 3, 25)), t, axis=0).compute(), ref, 1e-6)
    bad = t.copy()
    bad[4, 44] = 99
    lazy = xfd.evaluate(da.from_array(x, chunks=(2, 7, 10)), bad)  # nothing raised yet
    with pytest.raises(IndexError, match=r"targets\[4, 44\] = 99"):
        lazy.compute()
    with pytest.raises(ValueError, match="shape"):
        xfd.evaluate(da.from_array(x), t[:, :3])


# ---------------------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=50) as c:
        with distributed.Client(c) as client:
            yield c, client


def test_distributed_cluster(cluster, data):
    c, client = cluster
    x, t = data
    X = da.from_array(x, chunks=(3, 25, 10))  # rows and classes over both workers
    res = client.compute(xfd.evaluate(X, t)).result()
    same(res, xf.evaluate(x, t), 1e-6)
    loss = client.compute(xfd.softmax_cross_entropy(X, t)).result()
    assert_close(loss, xf.softmax_cross_entropy(x, t), 1e-5)
    workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2


def test_cli_on_a_cluster(cluster, data, tmp_path, capsys):
    import json

    from xent_fast.__main__ import main

    c, _ = cluster
    x, t = data
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    rc = main(["eval", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--scheduler",
               c.scheduler_address, "--chunk-rows", "100", "--json", "--progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    j = json.loads(out)
    ref = xf.evaluate(x, t)
    assert j["count"] == ref.count
    assert j["cross_entropy"] == pytest.approx(ref.cross_entropy, rel=1e-8)  # float32 rows
    assert "100.0%" in err
    bad = t.copy()
    bad[5, 1] = 40
    np.save(tmp_path / "bad.npy", bad)
    rc = main(["eval", str(tmp_path / "x.npy"), str(tmp_path / "bad.npy"), "--scheduler",
               c.scheduler_address, "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.strip() == ("xent-fast eval: error: targets[5, 1] = 40 is not a class index "
                           "in [0, 37) nor ignore_index=-100")


# ---------------------------------------------------------------------------- NaN rule
@pytest.mark.parametrize("chunks", [(6, 3000), (2, 3000), (3, 1000), (1, 700)],
                         ids=["one", "rows", "classes", "both"])
def test_nan_rows_every_chunking(chunks):
    """A NaN in any class chunk of a row makes the row NaN (prediction -1, rank int64
    max, a miss for every k) and the means NaN, as evaluate in memory."""
    from xent_fast._evaluate import NAN_RANK

    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 3000)).astype(np.float32)
    t = rng.integers(0, 3000, 6)
    x[0, 5] = np.nan                       # first chunk, target elsewhere
    t[0] = 2500
    x[1, 2999] = np.nan                    # last chunk, next to +inf
    x[1, 1500] = np.inf
    x[2, 40] = -np.float32(np.nan)
    t[2] = 40                              # the target's own logit, sign bit set
    x[3, 7] = np.nan
    t[3] = -100                            # ignored
    t[4] = int(np.argmax(x[4]))            # a correct row
    x[5, :100] = -np.inf
    t[5] = 50                              # a -inf target: a miss
    nan_rows = np.array([True, True, True, False, False, False])
    ref = xf.evaluate(x, t, topk=(1, 5), per_row=True)
    X = da.from_array(x, chunks=chunks)
    res = xfd.evaluate(X, t, topk=(1, 5)).compute()
    assert res.count == 5
    for a in AGG:
        assert np.isnan(getattr(res, a)), a
    assert res.accuracy == ref.accuracy == {1: 0.2, 5: 0.2}
    rows = dask.compute(xfd.evaluate_rows(X, t, topk=(1, 5)))[0]
    for k in ("loss", "target_prob", "entropy", "confidence"):
        assert np.isnan(rows[k][nan_rows]).all(), k
        assert_close(rows[k], ref.rows[k], 1e-6, what=k)
    assert rows["prediction"][nan_rows].tolist() == [-1] * 3
    assert rows["rank"][nan_rows].tolist() == [NAN_RANK] * 3
    assert rows["rank"][3] == -1 and rows["rank"][4] == 0
    loss = xfd.softmax_cross_entropy(X, t, reduction="none").compute()
    assert np.isnan(loss[nan_rows]).all() and np.isfinite(loss[4])
