"""evaluate_file and `xent-fast eval`: every file format and chunking gives the in-memory
result; memory stays bounded on a file many chunks long; every bad file is one line."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xent_fast as xf
from xent_fast.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGG = ("cross_entropy", "entropy", "target_prob", "ece", "perplexity")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 50, 37)) * 3).astype(np.float32)
    t = rng.integers(0, 37, (6, 50))
    t[1, 3] = -100
    np.save(d / "x.npy", x)
    np.save(d / "t.npy", t)
    np.save(d / "x_class_first.npy", np.ascontiguousarray(np.moveaxis(x, -1, 0)))
    np.save(d / "x_fortran.npy", np.asfortranarray(x))
    np.savez(d / "both.npz", logits=x, targets=t)
    np.savez_compressed(d / "x.npz", x)
    np.save(d / "x16.npy", x.astype(np.float16))
    return d, x, t


# Per-row values come from the same kernel on the same rows; they may still differ in
# the last bit of a float32 row sum when a chunk sits at another memory alignment
# (vector loops peel differently), and the float64 sums merge in another order.
def same(res, ref, rtol=1e-8):
    assert res.count == ref.count
    for a in AGG:
        assert getattr(res, a) == pytest.approx(getattr(ref, a), rel=rtol, nan_ok=True), a
    assert res.accuracy == ref.accuracy


@pytest.mark.parametrize("chunk_rows", [1, 49, 50, 120, None, 10_000])
@pytest.mark.parametrize("files", [("x.npy", "t.npy"), ("both.npz", "both.npz"),
                                   ("x.npz", "t.npy"), ("both.npz:logits", "both.npz:targets"),
                                   ("x_fortran.npy", "t.npy")])
def test_files_equal_in_memory(data, files, chunk_rows):
    d, x, t = data
    ref = xf.evaluate(x, t, per_row=True)
    res = xf.evaluate_file(str(d / files[0]), str(d / files[1]), chunk_rows=chunk_rows,
                           per_row=True)
    same(res, ref)
    for k, v in ref.rows.items():
        np.testing.assert_allclose(res.rows[k], v, rtol=1e-7, atol=1e-12, err_msg=k)


def test_class_axis_first_and_half_precision(data):
    d, x, t = data
    ref = xf.evaluate(x, t)
    same(xf.evaluate_file(d / "x_class_first.npy", d / "t.npy", axis=0, chunk_rows=70), ref)
    same(xf.evaluate_file(d / "x16.npy", d / "t.npy", chunk_rows=33),
         xf.evaluate(x.astype(np.float16), t))


def test_zarr_and_array_likes(data):
    zarr = pytest.importorskip("zarr")
    d, x, t = data
    z = zarr.open_array(str(d / "x.zarr"), mode="w", shape=x.shape, dtype=x.dtype,
                        chunks=(2, 25, 37))
    z[...] = x
    ref = xf.evaluate(x, t)
    for cr in (25, 100, None):
        same(xf.evaluate_file(str(d / "x.zarr"), str(d / "t.npy"), chunk_rows=cr), ref)
    same(xf.evaluate_file(z, t, chunk_rows=60), ref)
    same(xf.evaluate_file(np.load(d / "x.npy", mmap_mode="r"), t, chunk_rows=60), ref)


def test_progress_and_target_errors_name_the_global_position(data):
    d, x, t = data
    calls = []
    xf.evaluate_file(d / "x.npy", d / "t.npy", chunk_rows=100, progress=lambda a, b:
                     calls.append((a, b)))
    assert calls == [(2, 6), (4, 6), (6, 6)]
    bad = t.copy()
    bad[4, 17] = 37
    np.save(d / "t_bad.npy", bad)
    with pytest.raises(IndexError, match=r"targets\[4, 17\] = 37"):
        xf.evaluate_file(d / "x.npy", d / "t_bad.npy", chunk_rows=50)


def test_memory_stays_bounded_on_a_file_many_chunks_long(tmp_path):
    """A 96 MB memory-mapped file read in 1 MB chunks: the peak resident set grows by
    far less than the file, and the result equals the in-memory one."""
    rows, c = 6144, 4096
    x = np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.float32, (rows, c))
    rng = np.random.default_rng(0)
    for lo in range(0, rows, 512):
        x[lo:lo + 512] = rng.standard_normal((512, c), np.float32)
    x.flush()
    del x
    np.save(tmp_path / "t.npy", rng.integers(0, c, rows))
    code = f"""
        import resource, numpy as np, xent_fast as xf
        c = {c}
        t = np.load({str(tmp_path / 't.npy')!r})
        small = np.zeros((64, c), np.float32)
        xf.evaluate_file(small, t[:64], chunk_rows=64)  # compile / load the kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = xf.evaluate_file({str(tmp_path / 'big.npy')!r}, {str(tmp_path / 't.npy')!r},
                               chunk_rows=64)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        ref = xf.evaluate(np.load({str(tmp_path / 'big.npy')!r}), t)
        assert abs(res.cross_entropy - ref.cross_entropy) <= 1e-12 * ref.cross_entropy
        assert res.accuracy == ref.accuracy
        print(grew // 1024)
    """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_mb = int(out.stdout.split()[-1])
    assert grew_mb < 24, f"peak RSS grew by {grew_mb} MB over a 96 MB file"


# ---------------------------------------------------------------------------- CLI
def run_cli(capsys, *args):
    rc = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_table_json_and_progress(data, capsys):
    import json

    d, x, t = data
    ref = xf.evaluate(x, t, topk=(1, 3))
    rc, out, err = run_cli(capsys, d / "x.npy", d / "t.npy", "--topk", "1", "3",
                           "--chunk-rows", "100", "--json", "--progress")
    assert rc == 0
    j = json.loads(out)
    assert j["count"] == ref.count
    assert j["cross_entropy"] == pytest.approx(ref.cross_entropy, rel=1e-8)  # float32 rows
    assert j["accuracy"] == {"top1": ref.accuracy[1], "top3": ref.accuracy[3]}
    assert "100.0%" in err and err.endswith("\n")
    rc, out, err = run_cli(capsys, d / "x_class_first.npy", d / "t.npy", "--axis", "0",
                           "--no-progress")
    assert rc == 0 and err == ""
    assert "perplexity" in out and f"{ref.perplexity:.6g}" in out


def _bad_files(d, x, t):
    """(name, logits, targets, expected words in the one error line)."""
    np.save(d / "t_float.npy", t.astype(np.float32))
    np.save(d / "t_short.npy", t[:, :49])
    np.save(d / "x_int_strings.npy", np.array(["a", "b"]))
    np.save(d / "x_obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    raw = (d / "x.npy").read_bytes()
    (d / "x_trunc.npy").write_bytes(raw[:len(raw) // 2])
    (d / "x_noheader.npy").write_bytes(b"not an array at all")
    npz = (d / "both.npz").read_bytes()
    (d / "x_trunc.npz").write_bytes(npz[:len(npz) // 2])
    bad = t.copy()
    bad[5, 2] = 99
    np.save(d / "t_range.npy", bad)
    neg = t.copy()
    neg[0, 0] = -3
    np.save(d / "t_neg.npy", neg)
    return [
        ("missing logits", d / "nope.npy", d / "t.npy", "does not exist"),
        ("missing targets", d / "x.npy", d / "nope.npy", "does not exist"),
        ("truncated npy", d / "x_trunc.npy", d / "t.npy", "truncated"),
        ("not npy", d / "x_noheader.npy", d / "t.npy", "not a .npy"),
        ("truncated npz", d / "x_trunc.npz", d / "t.npy", "npz"),
        ("npz missing key", f"{d / 'both.npz'}:nokey", d / "t.npy", "no array 'nokey'"),
        ("float targets", d / "x.npy", d / "t_float.npy", "integer class indices"),
        ("string logits", d / "x_int_strings.npy", d / "t.npy", "real numbers"),
        ("object logits", d / "x_obj.npy", d / "t.npy", "objects"),
        ("targets wrong shape", d / "x.npy", d / "t_short.npy", "shape"),
        ("axis out of range", d / "x.npy", d / "t.npy", "axis"),
        ("target out of range", d / "x.npy", d / "t_range.npy", "targets[5, 2] = 99"),
        ("negative target", d / "x.npy", d / "t_neg.npy", "targets[0, 0] = -3"),
        ("directory not zarr", d, d / "t.npy", "Zarr"),
    ]


def test_cli_bad_files_give_one_line_and_nonzero_exit(data, capsys):
    d, x, t = data
    for name, lg, tg, words in _bad_files(d, x, t):
        extra = ["--axis", "5"] if name == "axis out of range" else []
        rc, out, err = run_cli(capsys, lg, tg, "--no-progress", *extra)
        assert rc == 1, name
        assert out == "", name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xent-fast eval: error: "), (name, err)
        assert words in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_cli_entry_point_process(data):
    """The installed command path: a bad file in a real process prints no traceback."""
    d, _, _ = data
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "xent_fast", "eval", str(d / "x.npy"),
                        str(d / "missing.npy")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- NaN rule
def test_nan_rows_streamed_as_in_memory(tmp_path):
    """NaN logits in the first and last 2048-class chunk of a row, in the target, next to
    +-inf, in an ignored row: every file format and chunking gives evaluate's NaN rows
    (NaN metrics, prediction -1, rank int64 max) and NaN means."""
    from xent_fast._evaluate import NAN_RANK

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3000)).astype(np.float32)
    t = rng.integers(0, 3000, 6)
    x[0, 5] = np.nan                       # first chunk; target in the second
    t[0] = 2500
    x[2, 2999] = np.nan                    # last chunk
    x[2, 0] = np.inf
    x[3, 17] = np.nan
    t[3] = 17                              # the target's own logit
    x[4, 100] = np.nan
    t[4] = -100                            # ignored
    x[5, :10] = -np.inf
    t[5] = 3                               # a -inf target: loss +inf, a miss
    t[1] = int(np.argmax(x[1]))            # the one correct row
    nan_rows = np.array([True, False, True, True, False, False])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    np.savez(tmp_path / "both.npz", logits=x, targets=t)
    ref = xf.evaluate(x, t, per_row=True)
    for name in AGG:
        assert np.isnan(getattr(ref, name)), name
    assert ref.count == 5 and ref.accuracy == {1: 0.2, 5: 0.2}
    specs = [("x.npy", "t.npy"), ("both.npz", "both.npz")]
    zarr = None
    try:
        import zarr
    except ImportError:
        pass
    if zarr is not None:
        z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=x.shape,
                            dtype=x.dtype, chunks=(2, 3000))
        z[...] = x
        specs.append(("x.zarr", "t.npy"))
    for lg, tg in specs:
        for chunk_rows in (1, 4, None):
            res = xf.evaluate_file(str(tmp_path / lg), str(tmp_path / tg),
                                   chunk_rows=chunk_rows, per_row=True)
            what = (lg, chunk_rows)
            assert res.count == 5, what
            for name in AGG:
                assert np.isnan(getattr(res, name)), (name, what)
            assert res.accuracy == ref.accuracy, what
            for k in ("loss", "entropy", "confidence"):
                assert np.isnan(res.rows[k][nan_rows]).all(), (k, what)
                np.testing.assert_allclose(res.rows[k], ref.rows[k], rtol=1e-6, err_msg=k)
            assert (res.rows["rank"][nan_rows & (t != -100)] == NAN_RANK).all(), what
            assert (res.rows["prediction"][nan_rows] == -1).all(), what
            np.testing.assert_array_equal(res.rows["rank"], ref.rows["rank"])


# ---------------------------------------------------------------------------- file changes
_CHANGING = """
import os, sys, time
import numpy as np
import xent_fast as xf
from xent_fast import __main__ as cli

path, tpath, how = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.load(path)

def change(*_):
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 3)  # pages of later slabs now gone
    else:
        time.sleep(0.05)  # past the file system's timestamp granularity
        np.save(path, x[::-1])  # same size, in place: other values
    change.done = True

def once(fn):
    def f(*a):
        if not getattr(change, "done", False):
            fn(*a)
    return f

if sys.argv[4] == "api":
    try:
        xf.evaluate_file(path, tpath, chunk_rows=16, progress=once(change))
    except ValueError as e:
        print("ValueError:", e)
else:
    cli._ProgressBar.__call__ = lambda self, *a, **k: once(change)()
    sys.exit(cli.main(["eval", path, tpath, "--chunk-rows", "16", "--progress"]))
"""


@pytest.mark.parametrize("front", ["api", "cli"])
@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_npy_changed_while_read_is_an_error_not_sigbus(tmp_path, how, front):
    """The .npy is memory-mapped: truncated between chunks, touching the lost pages was
    a SIGBUS (the process died with no message); rewritten in place, the result mixed
    two arrays.  Both are now a one-line ValueError naming the file.  In a child
    process, so that a SIGBUS fails this test instead of killing pytest."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((128, 4096)).astype(np.float32)  # 8 chunks of 256 KB
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", rng.integers(0, 4096, 128))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _CHANGING, str(tmp_path / "x.npy"),
                        str(tmp_path / "t.npy"), how, front], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {p.stderr[-2000:]}"
    words = "was truncated while being read" if how == "truncate" else \
        "was modified while being read"
    if front == "api":
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("ValueError: logits file "), p.stdout
        assert words in p.stdout, p.stdout
    else:
        assert p.returncode == 1, p.stderr
        assert p.stdout == ""
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith("xent-fast eval: error: logits file ") and words in line, \
            p.stderr
        assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- CLI inputs
def test_cli_warns_about_nan_rows_and_still_reports(tmp_path, capsys):
    import json

    x = np.zeros((10, 3000), np.float32)
    x[:, 3] = 2.0
    x[2, 5] = np.nan                       # a chunk that was silently dropped
    x[7, 3] = np.nan                       # the target's logit
    t = np.full(10, 3)
    t[9] = -100
    x[9, 0] = np.nan                       # ignored: not counted, not warned about
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    rc, out, err = run_cli(capsys, tmp_path / "x.npy", tmp_path / "t.npy", "--json",
                           "--no-progress")
    assert rc == 0
    j = json.loads(out)
    assert j["count"] == 9 and j["cross_entropy"] is None and j["ece"] is None
    assert j["accuracy"]["top1"] == pytest.approx(7 / 9)
    assert err == ("xent-fast eval: warning: 2 of 9 rows hold NaN logits: their metrics "
                   "are NaN, so are the means and the ECE, and they count as wrong in the "
                   "accuracy\n")
    rc, out, err = run_cli(capsys, tmp_path / "x.npy", tmp_path / "t.npy", "--no-progress")
    assert rc == 0 and "nan" in out and "warning: 2 of 9 rows" in err


def test_cli_reads_bfloat16_npy_and_npz(tmp_path, capsys):
    import json

    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((40, 37)) * 3).astype(ml_dtypes.bfloat16)
    t = rng.integers(0, 37, 40)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", logits=x, targets=t)
    np.save(tmp_path / "t.npy", t)
    assert np.load(tmp_path / "x.npy").dtype == np.dtype("V2")  # how NumPy gives it back
    ref = xf.evaluate(x, t)
    for lg, tg in (("x.npy", "t.npy"), ("x.npz", "x.npz")):
        rc, out, err = run_cli(capsys, tmp_path / lg, tmp_path / tg, "--json",
                               "--no-progress", "--chunk-rows", "16")
        assert rc == 0, err
        j = json.loads(out)
        assert j["cross_entropy"] == pytest.approx(ref.cross_entropy, rel=1e-12), lg
        assert j["accuracy"]["top1"] == ref.accuracy[1]
        assert "read as bfloat16" in err and err.count("\n") == 1
    res = xf.evaluate_file(tmp_path / "x.npy", tmp_path / "t.npy", chunk_rows=7)
    assert res.cross_entropy == pytest.approx(ref.cross_entropy, rel=1e-12)


def test_cli_bool_and_integer_logits_as_the_api(tmp_path, capsys):
    import json

    rng = np.random.default_rng(6)
    t = rng.integers(0, 9, 30)
    np.save(tmp_path / "t.npy", t)
    for x in (rng.random((30, 9)) > 0.5, rng.integers(-5, 5, (30, 9)),
              rng.integers(0, 5, (30, 9)).astype(np.uint8)):
        np.save(tmp_path / "x.npy", x)
        rc, out, err = run_cli(capsys, tmp_path / "x.npy", tmp_path / "t.npy", "--json",
                               "--no-progress")
        assert rc == 0, err
        ref = xf.evaluate(x, t)
        assert json.loads(out)["cross_entropy"] == pytest.approx(ref.cross_entropy,
                                                                 rel=1e-12)
        assert ref.cross_entropy == pytest.approx(
            xf.evaluate(x.astype(np.float64), t).cross_entropy, rel=1e-15)
        assert err == (f"xent-fast eval: note: logits file {tmp_path / 'x.npy'} holds "
                       f"{x.dtype} values, read as float64 logits\n")


def test_cli_empty_logits_file_is_an_error(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((0, 37), np.float32))
    np.save(tmp_path / "t.npy", np.zeros(0, np.int64))
    np.save(tmp_path / "x3.npy", np.zeros((4, 0, 37), np.float32))
    np.save(tmp_path / "t3.npy", np.zeros((4, 0), np.int64))
    for lg, tg in (("x.npy", "t.npy"), ("x3.npy", "t3.npy")):
        rc, out, err = run_cli(capsys, tmp_path / lg, tmp_path / tg, "--no-progress")
        assert rc == 1 and out == ""
        assert err.startswith(f"xent-fast eval: error: logits file {tmp_path / lg} holds "
                              "no rows") and err.count("\n") == 1, err
    # the API keeps evaluate's convention: no counted rows, NaN means
    assert np.isnan(xf.evaluate_file(tmp_path / "x.npy", tmp_path / "t.npy").cross_entropy)
