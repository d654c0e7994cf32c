import math
import os

import numpy as np
import pytest

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)]
if BF16 is not None:
    DTYPES.append(BF16)
# The backends the parametrised tests run on: the CPU's in the main process, "cuda" in
# the process tests/test_cuda_sim.py starts under Numba's CUDA simulator, or on a GPU
# machine with XENT_FAST_TEST_BACKENDS=cuda (the same test ids, the same tolerances).
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
BACKENDS = os.environ.get("XENT_FAST_TEST_BACKENDS", "cuda" if SIM else "cpu,parallel").split(",")
# The simulator runs every GPU thread as a Python thread: cases above this many
# elements run on a real device only.
SIM_MAX_ELEMENTS = 12_000
if SIM:
    import sys
    import threading

    # Each simulated block polls its Python threads while they run and wait at barriers;
    # a short GIL switch interval lets them take turns at once (7x faster here).
    sys.setswitchinterval(5e-5)

    def _one_shared_array_a_block():
        """The simulator gives a block's threads one shared array per call site: the
        first thread to ask creates it, the others look it up.  Its look-up and store
        are not locked, so two threads that ask at once can each create one, and a
        block reduction then reads slots that its other threads wrote elsewhere (a
        loss off by a row, or doubled, seen in a full run on a loaded host).  The same
        look-up, under a lock; the call site is read off the caller's frame."""
        from numba.core import types
        from numba.cuda.simulator import kernelapi
        from numba.np import numpy_support

        plain = kernelapi.FakeCUDAShared.array
        lock = threading.Lock()

        def array(self, shape, dtype, alignment=None):
            if shape == 0 or alignment is not None:  # dynamic memory, or refused
                return plain(self, shape, dtype, alignment)
            if isinstance(dtype, types.Type):
                dtype = numpy_support.as_dtype(dtype)
            site = sys._getframe(1)
            key = (site.f_code.co_filename, site.f_lineno)
            with lock:
                if key not in self._allocations:
                    self._allocations[key] = np.empty(shape, dtype)
                return self._allocations[key]

        kernelapi.FakeCUDAShared.array = array

    _one_shared_array_a_block()

# Relative tolerance of a loss or row value against the float64 reference, by input dtype.
# Half inputs are compared with the reference on the same (rounded) values, and are
# computed in float32, so they share float32's tolerance for values; gradients come back
# in the input dtype and carry its rounding.
VALUE_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
GRAD_TOL = {"float64": 1e-10, "float32": 2e-6, "float16": 1e-3, "bfloat16": 8e-3}


def tol(dtype):
    return VALUE_RTOL[np.dtype(dtype).name]


def gtol(dtype):
    return GRAD_TOL[np.dtype(dtype).name]


def assert_close(actual, expected, rtol, atol=None, what=""):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    if atol is None:
        atol = rtol
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def assert_grad_close(actual, expected, dtype, what="grad", term=1e-6):
    """Gradients: elementwise relative tolerance plus an absolute one scaled by the
    largest reference entry, or by ``term``, the size of one row's terms, where the
    exact gradient is 0 (entries that cancel carry the rounding of their terms)."""
    e = np.asarray(expected, dtype=np.float64)
    scale = float(np.nanmax(np.abs(e[np.isfinite(e)]))) if np.isfinite(e).any() else 1.0
    # Half gradients below the normal range carry absolute errors of their subnormal
    # spacing; a row whose exact gradient is 0 (one class) carries its terms' rounding.
    sub = float(np.finfo(np.float16).smallest_subnormal) if np.dtype(dtype) == np.float16 \
        else 0.0
    assert_close(actual, expected, gtol(dtype), atol=gtol(dtype) * max(scale, term) + 2 * sub,
                 what=what)


# tests/cuda (what only device arrays have) runs in the CUDA process only: under the
# simulator (tests/test_cuda_sim.py: it must be chosen before Numba is imported), or on
# a machine with a GPU.
collect_ignore = [] if "cuda" in BACKENDS else ["cuda"]


def _elements(params):
    """The number of input elements of a parametrised case (None: no shape parameter)."""
    if "shape" in params:
        return math.prod(params["shape"])
    if "batch" in params and "c" in params:
        return math.prod(params["batch"]) * params["c"]
    if "c" in params:  # a class count alone: the tests that take one use ~10 rows
        return 16 * params["c"]
    return None


def _simulated(params):
    """Whether a CUDA case runs under the simulator: small shapes only (a real GPU runs
    them all).  Every option set runs in float32 and, below 1000 classes, in float64 (the
    other compute dtype); half precision (float32 arithmetic behind other loads and
    stores), and float64 at a block a row, run the plain and the all-options sets only:
    the dtype changes the loads and stores, the same in every option set (0.5-4 s a case
    here).  The same for the in-place test's 100-class case, which other dtypes cover
    at 33 classes."""
    if (_elements(params) or 0) > SIM_MAX_ELEMENTS:
        return False
    opts = params.get("opts")
    dt = np.dtype(params.get("dtype", np.float32))
    f32 = dt == np.float32
    if isinstance(opts, dict) and 0 < len(opts) < 4:
        return f32 or (dt == np.float64 and params.get("c", 0) < 1000)
    # the in-place gradient test at 100 classes (a partial last vector on the CPU): on
    # CUDA the 33-class case already ends its rows mid-team in every dtype (8-10 s a case)
    if params.get("c") == 100 and "dtype" in params and "opts" not in params:
        return f32
    return True


def pytest_collection_modifyitems(session, config, items):
    if "cuda" in BACKENDS:
        # Only the cases parametrised over the backend run for CUDA (the rest test the
        # CPU or the reference), and under the simulator only small ones.
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if item.path.parent.name == "cuda":
                keep.append(item)
            elif params.get("backend") != "cuda":
                drop.append(item)
            elif SIM and not _simulated(params):
                drop.append(item)
            else:
                keep.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    waits = [item for item in items if item.name == "test_cuda_backend_under_the_simulator"]
    if waits:
        from test_cuda_sim import OFFLOAD, start_simulator_run

        # With the whole suite selected (no -k / -m), the files of OFFLOAD run after the
        # simulator in its process: the simulator alone left that core idle for minutes.
        whole = not config.option.keyword and not config.option.markexpr
        offload = sorted({item.path.name for item in items if item.path.name in OFFLOAD
                          and item.path.parent.name == "tests"}) if whole else []
        # overlaps the rest of the suite; the test waits for it
        if start_simulator_run(offload) is not None and offload:
            moved = [item for item in items if item.path.name in offload
                     and item.path.parent.name == "tests"]
            config.hook.pytest_deselected(items=moved)
            items[:] = [item for item in items if item not in moved]
        # ... last, so that the main run is not held up while the simulator finishes
        # (in file order it waited about a minute with one core idle)
        items[:] = [item for item in items if item not in waits] + waits


def pytest_terminal_summary(terminalreporter):
    """The summary line of each run in the simulator's process (see test_cuda_sim.py)."""
    import sys

    sim = sys.modules.get("test_cuda_sim")
    run = getattr(sim, "_run", None)
    if run is None or run[0].poll() is None:
        return
    run[1].seek(0)
    for part in run[1].read().split(sim._MARK)[1:]:
        label, _, text = part.partition("\n")
        lines = text.strip().splitlines()
        terminalreporter.write_line(f"in a second process, {label}: "
                                    f"{lines[-1].strip('= ') if lines else 'no output'}")
