"""``xent-fast bench`` on a user's own case: --op/--shape/--dtype, the interleaved
median/IQR statistics, and --save/--compare, which must flag a deliberately slowed
implementation and leave an unchanged one alone across repeated runs."""

import json
import time

import numpy as np
import pytest

from xent_fast import _bench

from test_cli import run


@pytest.fixture
def fixed_bandwidth(monkeypatch):
    """The bandwidth probe (1 GB, seconds) replaced by a fixed answer."""
    monkeypatch.setattr(_bench, "measure_bandwidth", lambda *a, **k: (20.0, 10.0))


def _sleeper(seconds):
    def call():
        time.sleep(seconds)
    return call


def test_statistics_of_interleaved_calls():
    first, samples = _bench.measure({"a": _sleeper(0.002), "b": _sleeper(0.004)},
                                    budget=0.2)
    assert set(first) == set(samples) == {"a", "b"}
    assert len(samples["a"]) == len(samples["b"]) >= 3
    sa, sb = _bench.summary(samples["a"]), _bench.summary(samples["b"])
    assert sa["q1"] <= sa["median"] <= sa["q3"]
    r, lo, hi = _bench.speedup(sb, sa)
    assert lo <= r <= hi and 1.5 < r < 2.5


def _rows(case, impl_seconds, budget=0.15):
    """One result row, timed as the bench times it, of an 'implementation' that sleeps."""
    first, samples = _bench.measure({"xent_fast": _sleeper(impl_seconds)}, budget=budget)
    return [{"case": case, "times": {"xent_fast": float(np.median(samples["xent_fast"]))},
             "stats": {"xent_fast": _bench.summary(samples["xent_fast"])}}]


def test_compare_flags_a_slowed_case_and_not_an_unchanged_one():
    old = _rows("ce 64x100 float32", 0.005)
    for _ in range(3):  # repeated runs of the same implementation: never flagged
        (case, ratio, lo, hi, verdict), = _bench.compare(_rows("ce 64x100 float32", 0.005), old)
        assert verdict != "slower", (ratio, lo, hi)
    (case, ratio, lo, hi, verdict), = _bench.compare(_rows("ce 64x100 float32", 0.008), old)
    assert verdict == "slower" and ratio > 1.3
    text = _bench.format_compare([(case, ratio, lo, hi, verdict)])
    assert "SLOWER" in text and case in text
    # cases absent from the old run are left out; old runs without statistics work
    assert _bench.compare(_rows("kl 1x1 float32", 0.001), old) == []
    bare = [{"case": "ce 64x100 float32", "times": {"xent_fast": 0.005}}]
    assert _bench.compare(bare, old)[0][4] != "slower"


def test_shapes_options_and_cases():
    assert _bench.parse_shape("8192x50257") == (8192, 50257)
    assert _bench.parse_shape("8x1024x50257") == (8192, 50257)
    for bad in ("8192", "axb", "-1x5"):
        with pytest.raises(ValueError, match="--shape"):
            _bench.parse_shape(bad)
    assert _bench.parse_options("label_smoothing=0.1, z_loss=1e-4") == {
        "label_smoothing": 0.1, "z_loss": 1e-4}
    with pytest.raises(ValueError, match="--options"):
        _bench.parse_options("label_smoothing")
    cases = _bench.custom_cases(["ce", "jsd_grad"], ["4x10", "2x3x10"], ["float32", "bfloat16"])
    assert [c.name for c in cases][:2] == ["ce 4x10 float32", "ce 4x10 bfloat16"]
    assert len(cases) == 8 and cases[-1].grad
    with pytest.raises(ValueError, match="--op 'nope'"):
        _bench.custom_cases(["nope"], None, None)
    # every operation and its gradient is a case kind
    assert {"ce", "ce_grad", "jsd", "kl_sparse_grad", "focal", "nll"} <= set(_bench.op_kinds())


def test_cli_your_own_case_save_and_compare(capsys, tmp_path, fixed_bandwidth):
    out = tmp_path / "run1"
    rc, text, err = run(capsys, "bench", "--op", "ce_grad", "--shape", "2x8x300",
                        "--dtype", "float32", "bfloat16", "--peers", "numpy-ref",
                        "--options", "label_smoothing=0.1", "--out", str(out),
                        "--save", str(tmp_path / "base"), "--budget", "0.05")
    assert rc == 0, err
    assert "| ce_grad 16x300 bfloat16 |" in text and "vs numpy-ref" in text
    doc = json.loads((tmp_path / "base.json").read_text())
    row = doc["results"][0]
    assert row["options"] == {"label_smoothing": 0.1}
    st = row["stats"]["xent_fast"]
    assert st["q1"] <= st["median"] <= st["q3"] and st["n"] >= 3
    assert (out / "bench-custom.csv").read_text().startswith("case,kind,rows,cols")
    # the same again against the saved run: a comparison table, CSV on the terminal
    rc, text, err = run(capsys, "bench", "--op", "ce_grad", "--shape", "2x8x300", "--peers",
                        "numpy-ref", "--out", str(tmp_path / "run2"), "--format", "csv",
                        "--compare", str(tmp_path / "base.json"), "--budget", "0.05")
    assert rc in (0, 2), err
    assert "case,kind,rows" in text and "against" in text and "ce_grad 16x300 float32" in text


def test_cli_errors_are_one_line(capsys, tmp_path):
    for argv, msg in [(("--op", "nope"), "--op 'nope'"), (("--op", "ce", "--shape", "5"),
                                                           "--shape"),
                      (("--options", "x"), "--options"),
                      (("--compare", str(tmp_path / "missing.json")), "missing.json")]:
        rc, _, err = run(capsys, "bench", *argv, "--out", str(tmp_path / "o"))
        assert rc == 1 and err.startswith("xent-fast bench: error: ") and msg in err


def test_torch_peers_take_bfloat16_inputs():
    torch = pytest.importorskip("torch")
    case = _bench.Case("ce_grad", 8, 50, "bfloat16")
    d = _bench.make_data(case)
    fn = case.op.peer("torch", d, grad=True)
    g = fn()
    assert isinstance(g, torch.Tensor) and g.dtype == torch.bfloat16 and g.shape == (8, 50)
