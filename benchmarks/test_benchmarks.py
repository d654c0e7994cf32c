"""pytest-benchmark suite: every headline case x implementation, side by side.

Run:  python -m pytest benchmarks --benchmark-group-by=param:case --benchmark-json=b.json

The cases and the peers' implementations are those of ``xent-fast bench`` (one source
of truth, ``xent_fast._bench``); peers that are not installed are skipped.  Timings
only: no assertion depends on speed.
"""

import pytest

from xent_fast import _bench as B

CASES = B.HEADLINE + B.BLOCKS
IMPLS = ["xent_fast", "xent_fast-serial", "numpy-ref", "scipy", "torch", "jax"]
_data = {}


def _get(case):
    if case.name not in _data:
        _data.clear()  # keep one case's arrays alive at a time
        _data[case.name] = B.make_data(case)
    return _data[case.name]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_case(benchmark, case, impl):
    if impl.startswith("xent_fast"):
        fn = B._xent("cpu" if impl.endswith("serial") else "auto")(case, _get(case))
    else:
        if impl not in B.available_peers([impl]):
            pytest.skip(f"{impl} is not installed")
        fn = B.PEERS[impl](case, _get(case))
        if fn is None:
            pytest.skip(f"{impl} has no {case.kind}")
    benchmark.group = case.name
    big = case.rows * case.cols > 20_000_000 and impl in ("numpy-ref", "scipy")
    fn()  # compile / first touch, outside the timing
    if big:
        benchmark.pedantic(fn, rounds=1, iterations=1)
    else:
        benchmark(fn)
