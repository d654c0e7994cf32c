"""The suite's backend-parametrised tests for ``backend="cuda"``, under Numba's CUDA
simulator, in their own process: the reference and edge-case tests (their small shapes:
the simulator runs every GPU thread as a Python thread) and tests/cuda (device arrays).

The simulator must be chosen before Numba is imported, which this process has done
already.  The run starts as soon as collection selects this test (see conftest.py), so
that it overlaps the rest of the suite on a second core; the test, which collection
moves to the end of the run, waits for it.  On a
machine with a usable GPU, ``XENT_FAST_TEST_BACKENDS=cuda python -m pytest tests`` runs
the same tests on the real device, every shape included.
"""

import importlib.util
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
_run = None


def start_simulator_run():
    """Start ``pytest tests/cuda`` under the simulator once; returns (process, log) or None."""
    global _run
    if _run is None and importlib.util.find_spec("numba_cuda") is not None:
        log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONDONTWRITEBYTECODE="1",
                   XENT_FAST_TEST_BACKENDS="cuda")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
             "ignore::RuntimeWarning", *(str(HERE / f) for f in _CUDA_FILES)],
            cwd=HERE.parent, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
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
    tail = out[-8000:]
    assert rc == 0, tail
    last = out.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, tail
