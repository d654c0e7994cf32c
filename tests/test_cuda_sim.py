"""The suite's backend-parametrised tests for ``backend="cuda"``, under Numba's CUDA
simulator, in their own process: the reference and edge-case tests (their small shapes:
the simulator runs every GPU thread as a Python thread) and tests/cuda (device arrays).

The simulator must be chosen before Numba is imported, which this process has done
already.  The run starts as soon as collection selects this test (see conftest.py), so
that it overlaps the rest of the suite on a second core; the test, which collection
moves to the end of the run, waits for it.  When the whole suite runs, the files of
``OFFLOAD`` (tests that start processes of their own) follow the simulator run in that
second process instead of running here, so that both cores stay busy to the end.  On a
machine with a usable GPU, ``XENT_FAST_TEST_BACKENDS=cuda python -m pytest tests`` runs
the same tests on the real device, every shape included.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# the files whose backend-parametrised tests run for CUDA too
_CUDA_FILES = ("test_against_reference.py", "test_edge_cases.py", "test_trust.py",
               "test_distillation.py", "test_peer_losses.py", "cuda")
# CPU test files that run after the simulator in its process when the whole suite runs
OFFLOAD = ("test_runtime.py", "test_startup.py", "test_dask.py", "test_torch.py",
           "test_linear.py", "test_readme.py", "test_stream.py", "test_cli.py",
           "test_bench.py")
_MARK = "=== xent_fast run: "
_RUNNER = """
import json, subprocess, sys
rc = 0
for label, cmd, env in json.loads(sys.argv[1]):
    print(%r + label, flush=True)
    rc |= subprocess.call(cmd, env=env)
sys.exit(rc)
""" % _MARK
_run = None


def start_simulator_run(offload=()):
    """Start ``pytest`` on the CUDA files under the simulator once, then (in the same
    process, on the same core) ``pytest`` on the CPU test files ``offload``; returns
    (process, log) or None where numba-cuda is missing (``offload`` then runs here)."""
    global _run
    if _run is None and importlib.util.find_spec("numba_cuda") is not None:
        log = tempfile.TemporaryFile(mode="w+")
        pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        sim_env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONDONTWRITEBYTECODE="1",
                       XENT_FAST_TEST_BACKENDS="cuda")
        runs = [("cuda simulator", pytest_cmd + ["-W", "ignore::RuntimeWarning"]
                 + [str(HERE / f) for f in _CUDA_FILES], sim_env)]
        if offload:
            runs.append((" ".join(offload), pytest_cmd + [str(HERE / f) for f in offload],
                         dict(os.environ)))
        proc = subprocess.Popen([sys.executable, "-c", _RUNNER, json.dumps(runs)],
                                cwd=HERE.parent, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        _run = (proc, log)
    return _run


def test_cuda_backend_under_the_simulator():
    run = start_simulator_run()
    if run is None:
        pytest.skip("numba-cuda is not installed (extra 'test')")
    proc, log = run
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log.seek(0)
    out = log.read()
    for part in out.split(_MARK)[1:]:  # each run's own summary
        label, _, text = part.partition("\n")
        tail = text[-8000:]
        last = text.strip().splitlines()[-1] if text.strip() else ""
        assert " passed" in last and "failed" not in last and "error" not in last, \
            f"{label}:\n{tail}"
    assert rc == 0, out[-8000:]
    assert out.count(_MARK) >= 1, out[-8000:]
