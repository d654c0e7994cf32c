"""pytest-benchmark cases for the core kernels (run: python -m pytest benchmarks).

Side by side with the float64 NumPy reference in the same run; ratios, not timing
assertions.
"""

import numpy as np
import pytest

import xent_fast as xf

N, C = 4096, 32000


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C)).astype(np.float32)
    t = rng.integers(0, C, N)
    return x, t, np.empty_like(x)


@pytest.mark.parametrize("backend", ["cpu", "parallel"])
def test_ce_forward(benchmark, data, backend):
    x, t, _ = data
    xf.softmax_cross_entropy(x, t, backend=backend)
    benchmark(xf.softmax_cross_entropy, x, t, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "parallel"])
def test_ce_forward_backward(benchmark, data, backend):
    x, t, g = data
    xf.softmax_cross_entropy(x, t, grad_out=g, backend=backend)
    benchmark(xf.softmax_cross_entropy, x, t, grad_out=g, backend=backend)


def test_ce_forward_numpy_reference(benchmark, data):
    from xent_fast import reference as R

    x, t, _ = data
    benchmark.pedantic(R.softmax_cross_entropy, (x[:512], t[:512]), rounds=3)
