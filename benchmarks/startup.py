"""Start-up cost: cold compile, warm-cache first call and warmup(), in new processes.

Run:  python benchmarks/startup.py [--out benchmarks/results/startup.md]

For each public function a fresh interpreter imports xent_fast and makes one small call,
timed from before the import; first with an empty Numba cache (cold: compiles), then
again with the cache that run left (warm: loads machine code, best of 3).  Then the
whole API once in one process (cold and warm), the first threaded call after a serial
one, and ``xent_fast.warmup()`` with its defaults on an empty cache.  The three targets
are checked at the end: a cold first call of each function <= 2 s, a warm-cache first
call of the whole API <= 0.35 s, warmup() <= 30 s.  Beside them, the floor any Numba
program pays in a new process: ``import numpy`` + ``import numba``, and the first call
of a one-line ``@njit(cache=True)`` function from a warm cache.

The processes write and use Python's bytecode cache as an installed package does
(``PYTHONDONTWRITEBYTECODE`` is dropped), so that no time goes to compiling Python.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import textwrap

CALLS = {
    "logsumexp": "xf.logsumexp(x)",
    "softmax": "xf.softmax(x)",
    "log_softmax": "xf.log_softmax(x)",
    "entropy": "xf.entropy(p)",
    "cross_entropy": "xf.cross_entropy(p, p)",
    "kl_divergence": "xf.kl_divergence(p, p)",
    "softmax_cross_entropy": "xf.softmax_cross_entropy(x, t)",
    "softmax_cross_entropy (grad)": "xf.softmax_cross_entropy(x, t, return_grad=True)",
    "softmax_kl_divergence": "xf.softmax_kl_divergence(x, x)",
    "binary_cross_entropy": "xf.binary_cross_entropy(p, p)",
    "binary_cross_entropy_with_logits": "xf.binary_cross_entropy_with_logits(x, p)",
    "evaluate": "xf.evaluate(x, t)",
}
# The first call big enough for threads (backend="auto" picks them from 65 536
# elements), after a small serial one.
PARALLEL = ["xf.softmax_cross_entropy(x, t)", "mark()",
            "xf.softmax_cross_entropy(xb, tb)"]

TEMPLATE = """
import time
t0 = time.perf_counter()
import numpy as np
import xent_fast as xf
x = np.linspace(-1, 1, 6 * 40, dtype=np.float32).reshape(6, 40)
p = np.full((6, 40), 1 / 40, np.float32)
t = np.arange(6) % 40
xb = np.linspace(-1, 1, 2048 * 40, dtype=np.float32).reshape(2048, 40)
tb = np.arange(2048) % 40
def mark():
    global t0
    t0 = time.perf_counter()
{calls}
print(time.perf_counter() - t0)
"""
TARGETS = {"cold": 2.0, "warm": 0.35, "warmup": 30.0}


FLOOR = """
import time
t0 = time.perf_counter()
import numpy as np
import numba
{body}
print(time.perf_counter() - t0)
"""
ONE_LINE = """
from xent_fast_startup_probe import f
f(1.0)
"""


def _env(cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed(calls, cache):
    code = textwrap.dedent(TEMPLATE).format(calls="\n".join(calls))
    return _time(code, _env(cache))


def _time(code, env):
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def floor():
    """(import numpy + numba, + first call of a one-line cached @njit function) in new
    processes, best of 3 each, from a warm cache."""
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "xent_fast_startup_probe.py"), "w") as fh:
        fh.write("from numba import njit\n\n\n@njit(cache=True)\ndef f(x):\n"
                 "    return x + 1.0\n")
    env = _env(tempfile.mkdtemp())
    env["PYTHONPATH"] = folder
    imports = min(_time(FLOOR.format(body=""), env) for _ in range(3))
    one = FLOOR.format(body=ONE_LINE)
    _time(one, env)  # compiles it into the cache
    return imports, min(_time(one, env) for _ in range(3))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    args = ap.parse_args()
    import numba
    import numpy

    rows = ["| function | cold (compile) | warm cache |", "|---|---|---|"]
    timed([], tempfile.mkdtemp())  # leaves the bytecode cache that later runs use
    base = min(timed([], tempfile.mkdtemp()) for _ in range(3))
    numba_floor, one_line = floor()
    worst_cold = 0.0
    for name, call in CALLS.items():
        cache = tempfile.mkdtemp()
        cold = timed([call], cache)
        warm = min(timed([call], cache) for _ in range(3))
        worst_cold = max(worst_cold, cold)
        rows.append(f"| {name} | {cold:.2f} s | {warm:.3f} s |")
        print(rows[-1], flush=True)
    cache = tempfile.mkdtemp()
    cold_all = timed(list(CALLS.values()), cache)
    warm_all = min(timed(list(CALLS.values()), cache) for _ in range(3))
    rows.append(f"| **whole API, one call each** | {cold_all:.2f} s | {warm_all:.3f} s |")
    cache = tempfile.mkdtemp()
    par_cold = timed(PARALLEL, cache)
    par_warm = min(timed(PARALLEL, cache) for _ in range(3))
    rows.append(f"| first threaded call, after a serial one | {par_cold:.2f} s | "
                f"{par_warm:.3f} s |")
    print(rows[-1], flush=True)
    cache = tempfile.mkdtemp()
    warmup = timed(["xf.warmup()"], cache)
    warmup_again = timed(["xf.warmup()"], cache)
    named = timed(["xf.warmup(['float32'], functions=['softmax_cross_entropy'])"],
                  tempfile.mkdtemp())
    ok = {"cold": worst_cold <= TARGETS["cold"], "warm": warm_all <= TARGETS["warm"],
          "warmup": warmup <= TARGETS["warmup"]}
    verdict = lambda k: "met" if ok[k] else "missed"  # noqa: E731
    text = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}, numpy {numpy.__version__}, numba "
        f"{numba.__version__}.\n\n"
        "Time from before `import xent_fast` to the end of the call(s), in a new "
        f"process; `import numpy` + `import xent_fast` alone: {base:.3f} s.  The floor "
        f"of any Numba program here: `import numpy` + `import numba` {numba_floor:.3f} s; "
        f"with the first call of a one-line `@njit(cache=True)` function from a warm "
        f"cache {one_line:.3f} s.\n\n"
        + "\n".join(rows) + "\n\n"
        f"`xent_fast.warmup()` with its defaults (float32 and float64, serial and "
        f"threaded; {os.cpu_count()} processes compiling at once): {warmup:.1f} s on an "
        f"empty cache, {warmup_again:.2f} s in a new process once the cache is filled.  "
        f"What a float32 training loop needs, `xf.warmup(['float32'], "
        f"functions=['softmax_cross_entropy'])` (index and probability targets, with "
        f"and without the gradient, serial and threaded): {named:.1f} s on an empty "
        f"cache.\n\n"
        "| target | measured | |\n|---|---|---|\n"
        f"| cold first call of each function <= {TARGETS['cold']:g} s | worst "
        f"{worst_cold:.2f} s | {verdict('cold')} |\n"
        f"| warm-cache first call of the whole API <= {TARGETS['warm']:g} s | "
        f"{warm_all:.3f} s ({warm_all - numba_floor:.3f} s above `import numpy, numba`) "
        f"| {verdict('warm')} |\n"
        f"| warmup() with defaults <= {TARGETS['warmup']:g} s | {warmup:.1f} s | "
        f"{verdict('warmup')} |\n")
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
