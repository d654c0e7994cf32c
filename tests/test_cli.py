"""The command line explains itself: ``--version``, help text for every option of every
subcommand (found from the parser, so a new one is covered), plain text without reST
markup, one-line errors naming the extra to install, and ``bench`` never writing over
results it was not told to replace."""

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xent_fast
from xent_fast import __main__ as cli
from xent_fast import _bench, _dispatch

ROOT = Path(__file__).resolve().parent.parent
MARKUP = ("``", ":func:", ":class:", ":meth:", "`")


def subcommands(parser):
    """{name: parser} of the subcommands of ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


PARSER = cli.build_parser()
COMMANDS = sorted(subcommands(PARSER))


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``xent-fast ARGV`` in this process."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- --version
def test_version(capsys):
    rc, out, _ = run(capsys, "--version")
    assert rc == 0
    assert out == f"xent-fast {importlib.metadata.version('xent_fast')}\n"


def test_version_falls_back_to_the_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli._version() == xent_fast.__version__
    monkeypatch.delattr(xent_fast, "__version__")
    assert cli._version() == "unknown"


def test_version_of_the_installed_command():
    """``python -m xent_fast --version``, as a shell runs it."""
    proc = subprocess.run([sys.executable, "-m", "xent_fast", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"xent-fast {importlib.metadata.version('xent_fast')}"


# ---------------------------------------------------------------------------- --help
def test_the_parser_has_the_documented_subcommands():
    assert {"demo", "bench", "eval", "warmup"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_describes_every_option_in_plain_text(command, capsys):
    parser = PARSER if command is None else subcommands(PARSER)[command]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"subcommand {choice.dest} has no help text"
            continue
        name = "/".join(action.option_strings) or action.metavar or action.dest
        assert action.help and action.help.strip(), \
            f"xent-fast {command or ''}: {name} has no help text"
    assert parser.description, f"xent-fast {command or ''} has no description"
    rc, out, err = run(capsys, *([command] if command else []), "--help")
    assert rc == 0 and err == ""
    assert out.startswith(f"usage: xent-fast{' ' + command if command else ''}")
    for mark in MARKUP:
        assert mark not in out, f"reST markup {mark!r} in xent-fast {command or ''} --help"
    # wrapped at spaces only: never inside a hyphenated name
    assert not any(line.rstrip().endswith("-") for line in out.splitlines()
                   if not line.lstrip().startswith("-")), out


def test_no_command_prints_the_help(capsys):
    rc, out, _ = run(capsys)
    assert rc == 2 and out.startswith("usage: xent-fast") and "eval" in out


# ---------------------------------------------------------------------------- eval
@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((12, 5)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 5, 12))
    return str(tmp_path / "x.npy"), str(tmp_path / "t.npy")


def test_eval_offers_every_backend_of_the_api():
    action = next(a for a in subcommands(PARSER)["eval"]._actions if a.dest == "backend")
    assert tuple(action.choices) == _dispatch.BACKENDS


def one_line_error(rc, err):
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xent-fast eval: error: "), err
    return lines[0][len("xent-fast eval: error: "):]


def test_scheduler_without_dask_names_the_extra(files, capsys, monkeypatch):
    for name in ("dask", "dask.array", "distributed"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    rc, out, err = run(capsys, "eval", *files, "--scheduler", "tcp://127.0.0.1:1")
    msg = one_line_error(rc, err)
    assert out == "" and 'pip install "xent_fast[dask]"' in msg and "--scheduler" in msg


def test_cuda_backend_with_a_scheduler_is_refused(files, capsys):
    rc, _, err = run(capsys, "eval", *files, "--backend", "cuda", "--scheduler",
                     "tcp://127.0.0.1:1")
    assert "--scheduler" in one_line_error(rc, err)


def _usable_gpu():
    if importlib.util.find_spec("numba_cuda") is None:
        return False
    from numba import cuda

    return os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and cuda.is_available()


def _api_error(files):
    with pytest.raises((ImportError, RuntimeError)) as info:
        xent_fast.evaluate(np.load(files[0]), np.load(files[1]), backend="cuda")
    return str(info.value)


def test_cuda_backend_without_a_gpu_gives_the_api_error(files, capsys):
    if _usable_gpu():
        pytest.skip("a CUDA GPU is usable here")
    rc, out, err = run(capsys, "eval", *files, "--backend", "cuda")
    msg = one_line_error(rc, err)
    assert out == "" and msg == _api_error(files) and "xent_fast[cuda]" in msg


@pytest.fixture
def no_numba_cuda(monkeypatch):
    """As if numba-cuda were not installed: the CUDA backend is imported afresh (and
    fails), finding no ``numba_cuda`` package."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "numba_cuda" else real(name, *a, **k))
    monkeypatch.delitem(_dispatch._modules, "cuda", raising=False)
    pkg = sys.modules.get("xent_fast._cuda")
    for name in ("backend", "arrays", "kernels", "device"):
        monkeypatch.delitem(sys.modules, f"xent_fast._cuda.{name}", raising=False)
        if pkg is not None:
            monkeypatch.delattr(pkg, name, raising=False)


def test_cuda_backend_without_numba_cuda_names_the_extra(files, capsys, no_numba_cuda):
    rc, out, err = run(capsys, "eval", *files, "--backend", "cuda")
    msg = one_line_error(rc, err)
    assert msg.startswith("backend='cuda' needs the numba-cuda package")
    assert "xent_fast[cuda]" in msg and msg == _api_error(files)
    with pytest.raises(ImportError, match=r"xent_fast\[cuda\]"):
        xent_fast.evaluate_file(*files, backend="cuda")


# ---------------------------------------------------------------------------- bench --out
def test_bench_default_output_is_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = 1_800_000_000.0
    first = _bench.output_dir(None, now=now)
    assert Path(first).parent == Path("bench-results") and not os.path.exists(first)
    os.makedirs(first)
    second = _bench.output_dir(None, now=now)  # the same second: never the same folder
    assert second != first and Path(second).parent == Path("bench-results")


def test_bench_out_refuses_a_folder_holding_results(tmp_path):
    assert _bench.output_dir(str(tmp_path / "new")) == str(tmp_path / "new")
    assert _bench.output_dir(str(tmp_path)) == str(tmp_path)  # empty: fine
    (tmp_path / "bench.md").write_text("old results")
    with pytest.raises(FileExistsError, match="--force"):
        _bench.output_dir(str(tmp_path))
    assert _bench.output_dir(str(tmp_path), force=True) == str(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a folder"):
        _bench.output_dir(str(tmp_path / "file"), force=True)


def test_bench_out_refuses_the_committed_results():
    results = ROOT / "benchmarks" / "results"
    if not (results / "bench.json").exists():
        pytest.skip("no committed results in this checkout")
    with pytest.raises(FileExistsError):
        _bench.output_dir(str(results))


def test_bench_command_decides_its_folder_before_running(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(_bench, "main", lambda args: ran.append(args.out) or 0)
    (tmp_path / "bench.json").write_text("{}")
    rc, _, err = run(capsys, "bench", "--quick", "--out", str(tmp_path))
    assert rc == 1 and ran == [] and err.startswith("xent-fast bench: error: ")
    assert len(err.strip().splitlines()) == 1 and "--force" in err
    assert run(capsys, "bench", "--quick", "--out", str(tmp_path), "--force")[0] == 0
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "bench", "--quick")[0] == 0
    assert ran[0] == str(tmp_path) and Path(ran[1]).parent == Path("bench-results")


# ---------------------------------------------------------------------------- demo
def test_demo_worked_examples_name_their_units():
    lines = cli._worked_examples()
    text = "\n".join(lines)
    assert "0.639 nats (0.922 bits)" in text
    assert "1.500 nats (2.163 bits)" in text
    assert "0.861 nats (1.242 bits)" in text
    assert "1.000 bits" in text and "0.469 bits" in text


# ---------------------------------------------------------------------------- warmup
def test_warmup_compiles_the_named_kernels_and_refuses_bad_arguments(capsys):
    args = ["warmup", "--functions", "binary_cross_entropy", "--dtypes", "float32",
            "--backends", "cpu", "--no-grad", "--processes", "1"]
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert out.startswith(("0 kernels ready", "1 kernels ready")), out  # 0: ready already
    rc, out, err = run(capsys, *args)
    assert rc == 0 and out.startswith("0 kernels ready"), (out, err)
    rc, out, err = run(capsys, "warmup", "--functions", "softmax_crossentropy")
    assert rc == 1 and out == ""
    assert err.startswith("xent-fast warmup: error: functions: ") and "softmax_cross_entropy" in err
    rc, out, err = run(capsys, "warmup", "--processes", "0")
    assert rc == 1 and "--processes" in err
