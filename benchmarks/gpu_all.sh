#!/usr/bin/env bash
# Everything the GPU needs checked, in one go, each step under its own time limit:
# the CUDA tests, the backend-parametrised suite on the device, the PyTorch front end
# on CUDA tensors, and the three GPU benchmarks.  Logs and results go to $OUT (default
# gpu-results/); a step that fails or runs out of time is recorded and the next runs.
#
#   OUT=/some/dir bash benchmarks/gpu_all.sh [quick]
#
# Peers' wheels (Liger-Kernel, Cut Cross-Entropy), when a folder .whl/ holds them
# (pip download --no-deps liger-kernel cut-cross-entropy -d .whl), are installed into
# a private folder put on PYTHONPATH; nothing needs the network.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
QUICK=${1:-}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --target .peers .whl/*.whl \
        > "$OUT/peers-install.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$PWD/.peers"
fi

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import numba, numpy, torch; print('numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
} > "$OUT/machine.txt" 2>&1
step tests-cuda 240 python -m pytest -q -x tests/cuda -p no:cacheprovider
step tests-on-device 420 env XENT_FAST_TEST_BACKENDS=cuda python -m pytest -q -p no:cacheprovider \
    tests/test_against_reference.py tests/test_edge_cases.py tests/test_trust.py
step tests-torch-cuda 180 python -m pytest -q -p no:cacheprovider tests/test_torch.py -k cuda
if [ "$QUICK" = quick ]; then
    step gpu-bench 300 python benchmarks/gpu_bench.py --quick --out "$OUT"
else
    step gpu-bench 420 python benchmarks/gpu_bench.py --out "$OUT"
    step torch-train 300 python benchmarks/torch_train.py --device cuda --out "$OUT/torch-train.md"
    step linear-ce 300 python benchmarks/linear_ce.py --device cuda --out "$OUT/linear-ce.md"
fi
cat "$OUT/summary.txt"
