"""Module-level jobs for the worker-process tests (spawn and forkserver must pickle them).

The parent runs every public function on the parallel backend first, so that Numba's
thread pool is running when the workers start; then the workers run them all again.
"""

import numpy as np

import xent_fast as xf


def job(seed):
    """One number per public function, each computed on the parallel backend."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, 400)).astype(np.float32)
    xt = rng.standard_normal((300, 400)).astype(np.float32)
    t = rng.integers(0, 400, 300)
    p = xf.softmax(xt, backend="parallel")
    q = xf.softmax(x, backend="parallel")
    y = rng.random((300, 400)).astype(np.float32)
    par = dict(backend="parallel")
    results = [
        xf.logsumexp(x, **par).sum(),
        xf.log_softmax(x, **par).sum(),
        q.sum(),
        xf.entropy(p, **par).sum(),
        xf.cross_entropy(p, q, **par).sum(),
        xf.kl_divergence(p, q, **par).sum(),
        xf.softmax_cross_entropy(x, t, **par),
        xf.softmax_cross_entropy(x, t, return_grad=True, **par)[1].sum(),
        xf.softmax_cross_entropy(x, p, return_grad=True, **par)[1].sum(),
        xf.softmax_kl_divergence(x, xt, return_grad=True, **par)[1].sum(),
        xf.binary_cross_entropy(q, y, **par),
        xf.binary_cross_entropy_with_logits(x, y, return_grad=True, **par)[1].sum(),
        xf.evaluate(x, t, **par).cross_entropy,
    ]
    return [float(v) for v in results]


def main(method, executor=False):
    import multiprocessing as mp

    import numba

    parent = job(1)
    ctx = mp.get_context(method)
    if executor:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2, mp_context=ctx) as ex:
            res = list(ex.map(job, [1, 2, 3]))
    else:
        with ctx.Pool(2) as pool:
            res = pool.map(job, [1, 2, 3])
    assert res[0] == parent, (res[0], parent)
    assert res[1] != parent
    print(numba.threading_layer())
    print("ok")
