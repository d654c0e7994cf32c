"""Start-up cost: cold compile and warm-cache first call, per function, in new processes.

Run:  python benchmarks/startup.py [--out benchmarks/results/startup.md]

For each public function a fresh interpreter imports xent_fast and makes one small call,
timed from before the import; first with an empty Numba cache (cold: compiles), then
again with the cache that run left (warm: loads machine code).  A last process calls
the whole API once with the warm cache.
"""

import argparse
import os
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
}

TEMPLATE = """
import time
t0 = time.perf_counter()
import numpy as np
import xent_fast as xf
x = np.linspace(-1, 1, 6 * 40, dtype=np.float32).reshape(6, 40)
p = np.full((6, 40), 1 / 40, np.float32)
t = np.arange(6) % 40
{calls}
print(time.perf_counter() - t0)
"""


def timed(calls, cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    code = textwrap.dedent(TEMPLATE).format(calls="\n".join(calls))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = ["| function | cold (compile) | warm cache |", "|---|---|---|"]
    base = timed([], tempfile.mkdtemp())
    for name, call in CALLS.items():
        cache = tempfile.mkdtemp()
        cold = timed([call], cache)
        warm = min(timed([call], cache) for _ in range(3))
        rows.append(f"| {name} | {cold:.2f} s | {warm:.3f} s |")
        print(rows[-1], flush=True)
    cache = tempfile.mkdtemp()
    cold_all = timed(list(CALLS.values()), cache)
    warm_all = min(timed(list(CALLS.values()), cache) for _ in range(3))
    rows.append(f"| **whole API, one call each** | {cold_all:.2f} s | {warm_all:.3f} s |")
    text = ("Time from before `import xent_fast` to the end of the call(s), in a new "
            f"process; `import numpy` + `import xent_fast` alone: {base:.3f} s.\n\n"
            + "\n".join(rows) + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
