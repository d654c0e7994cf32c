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
