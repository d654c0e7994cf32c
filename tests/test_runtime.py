"""Import cost, warm-up, the JIT cache, and safety under threads and worker processes.

Each concurrency case runs in a fresh subprocess so that an abort fails the test instead
of killing the test run.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env=None, timeout=300, cwd=None):
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_import_is_cheap_and_compiles_nothing():
    out = _run("""
        import sys
        import xent_fast
        print("numba" in sys.modules)
    """)  # (its time is measured by benchmarks/startup.py, not asserted here)
    assert out.strip() == "False"


CONCURRENT = """
    import threading, numpy as np, xent_fast as xf
    from xent_fast import reference as R
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 700)).astype(np.float32)
    t = rng.integers(0, 700, 256)
    want = R.softmax_cross_entropy(x, t)
    errors = []
    def work():
        try:
            for _ in range(20):
                got = xf.softmax_cross_entropy(x, t, backend="parallel")
                assert abs(got - want) < 1e-5 * abs(want), (got, want)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(8)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert not errors, errors
    print("ok")
"""


def test_many_python_threads_on_the_parallel_backend():
    assert _run(CONCURRENT).strip().endswith("ok")


def test_many_python_threads_with_the_workqueue_layer():
    # Numba's workqueue layer aborts on concurrent entry; the library serialises it.
    assert _run(CONCURRENT, env={"NUMBA_THREADING_LAYER": "workqueue"}).strip() \
        .endswith("ok")


def _worker_run(method, executor=False, prelude="", env=None):
    # The parent runs every public function on the thread pool first, then starts
    # workers that use it too (tests_worker_job).
    tests_dir = os.path.join(ROOT, "tests")
    full_env = {"PYTHONPATH": ROOT + os.pathsep + tests_dir}
    full_env.update(env or {})
    out = _run(prelude + f"""
import tests_worker_job
if __name__ == "__main__":
    tests_worker_job.main({method!r}, executor={executor!r})
""", env=full_env, timeout=600)
    assert out.strip().endswith("ok")
    return out.split()[-2]  # the threading layer the parent ran on


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_worker_processes(method):
    _worker_run(method)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_executor(method):
    _worker_run(method, executor=True)


def _tbb_installed():
    from importlib import metadata

    try:
        metadata.distribution("tbb")
    except metadata.PackageNotFoundError:
        return False
    return sys.platform == "linux"


@pytest.mark.skipif(not _tbb_installed(), reason="the tbb wheel is not installed")
def test_tbb_loads_from_the_environment():
    # The tbb wheel's libtbb.so.12 lies off the loader's path inside a virtual
    # environment; the library loads it so that Numba's TBB layer is the one in use.
    out = _run("""
        import numpy as np, xent_fast as xf, numba
        xf.logsumexp(np.zeros((4, 3)), backend="parallel")
        print(numba.threading_layer())
    """)
    assert out.split()[-1] == "tbb"


def test_first_call_anywhere_chooses_the_layer():
    # Whatever starts the pool first (here the thread count the API asks for with
    # backend="auto"), the layer is chosen before: never GNU OpenMP when others exist.
    out = _run("""
        import numpy as np, xent_fast as xf, numba
        xf.softmax_cross_entropy(np.zeros((512, 256), np.float32), np.zeros(512, int))
        print(numba.threading_layer())
    """)
    assert out.split()[-1] in ("tbb", "workqueue")


# Numba without TBB: its tbbpool module cannot be imported, as where no wheel exists.
_NO_TBB = "import sys; sys.modules['numba.np.ufunc.tbbpool'] = None\n"


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_worker_processes_without_tbb(method):
    assert _worker_run(method, prelude=_NO_TBB) == "workqueue"


def test_many_python_threads_without_tbb():
    assert _run(_NO_TBB + textwrap.dedent(CONCURRENT)).strip().endswith("ok")


def test_corrupt_cache_is_rebuilt(tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    code = """
        import numpy as np, xent_fast as xf
        x = np.arange(12.0).reshape(3, 4)
        print(float(xf.logsumexp(x, backend="cpu").sum()))
    """
    first = _run(code, env)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert any(f.endswith(".nbi") for f in files)
    for f in files:
        with open(f, "wb") as fh:
            fh.write(b"\\x00garbage, not a pickle")
    assert _run(code, env) == first


def test_after_warmup_the_first_calls_compile_nothing():
    # warm-up covers what the first call of each public function runs (it used to probe
    # with 3 classes, which take the few-classes kernels, never the general one)
    out = _run("""
        import numpy as np, xent_fast as xf
        from xent_fast._cpu import backend
        made = xf.warmup(dtypes=("float32",), backends=("cpu",))
        ready = backend.kernels_ready()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 1000)).astype(np.float32)
        x2 = rng.standard_normal((64, 1000)).astype(np.float32)
        t = rng.integers(0, 1000, 64)
        p = xf.softmax(x2, backend="cpu")
        y = rng.random((64, 1000)).astype(np.float32)
        xf.logsumexp(x, backend="cpu"); xf.log_softmax(x, backend="cpu")
        xf.entropy(p, backend="cpu"); xf.cross_entropy(p, p, backend="cpu")
        xf.kl_divergence(p, p, backend="cpu")
        xf.softmax_cross_entropy(x, t, backend="cpu")
        xf.softmax_cross_entropy(x, t, return_grad=True, backend="cpu")
        xf.softmax_cross_entropy(x, p, backend="cpu", label_smoothing=0.1)
        xf.softmax_kl_divergence(x, x2, backend="cpu", temperature=2.0)
        xf.binary_cross_entropy(p, y, backend="cpu")
        xf.binary_cross_entropy_with_logits(x, y, return_grad=True, backend="cpu")
        xf.evaluate(x, t, backend="cpu")
        xf.softmax_js_divergence(x, x2, return_grad=True, backend="cpu")
        ti = np.tile(np.arange(8), (64, 1))
        xf.softmax_kl_divergence_sparse(x, ti, x2[:, :8], return_grad=True, backend="cpu")
        xf.nll_loss(x, t, return_grad=True, backend="cpu")
        xf.kl_div(x, p, reduction="batchmean", return_grad=True, backend="cpu")
        xf.sigmoid_focal_loss(x, y, reduction="mean", return_grad=True, backend="cpu")
        print(made, ready, backend.kernels_ready(), xf.warmup(dtypes=("float32",),
                                                                      backends=("cpu",)))
    """)  # kernels loaded from the suite's cache count as made ready too
    made, ready, after, again = map(int, out.split())
    assert made == ready >= 9
    assert after == ready, "a call after warmup() compiled a kernel"
    assert again == 0


def test_a_changed_helper_is_never_served_from_a_stale_cache(tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "xent_fast"), pkg / "xent_fast",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(pkg)}
    code = """
        import numpy as np, xent_fast as xf
        print(float(xf.logsumexp(np.zeros(4), backend="cpu")))
    """
    assert float(_run(code, env, cwd=tmp_path)) == pytest.approx(np.log(4))

    def index_files():
        return sorted(f for _, _, fs in os.walk(tmp_path / "cache") for f in fs
                      if f.endswith(".nbi"))

    # a kernel helper of _cpu/, then a per-row formula shared with CUDA
    for changed in (("_cpu", "mathfns.py"), ("_formulas.py",)):
        before = index_files()
        src = pkg.joinpath("xent_fast", *changed)
        src.write_text(src.read_text() + "\n# a change to a helper only\n")
        assert float(_run(code, env, cwd=tmp_path)) == pytest.approx(np.log(4))
        after = index_files()
        assert len(after) == len(before) + 1, changed  # compiled afresh under a new name
