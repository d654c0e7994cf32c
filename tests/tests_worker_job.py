"""A module-level job for the spawn/forkserver worker tests (they must pickle it)."""

import numpy as np

import xent_fast as xf


def job(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, 400))
    t = rng.integers(0, 400, 300)
    return float(xf.softmax_cross_entropy(x, t, backend="parallel"))


def main(method):
    import multiprocessing as mp

    parent = job(1)
    with mp.get_context(method).Pool(2) as pool:
        res = pool.map(job, [1, 2, 3])
    assert abs(res[0] - parent) < 1e-12, (res, parent)
    print("ok")
