"""The CUDA backend's tests (tests/cuda) under Numba's CUDA simulator, in their own process.

The simulator must be chosen before Numba is imported, which this process has done
already.  On a machine with a usable GPU, run ``python -m pytest tests/cuda`` directly to
test the real device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_cuda_backend_under_the_simulator():
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (extra 'test')")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::RuntimeWarning", str(HERE / "cuda")],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, tail
