#!/usr/bin/env bash
# The GPU checks of chapter 05 in one run, for a machine with a CUDA GPU, CuPy and PyTorch
# (e.g. the device tool: `run` this with `carry: [".whl"]` holding the nbval/ipykernel wheels that
# tools/gpu_wheels.sh downloads). Every step has a timeout, so one slow step cannot eat the lease.
# Writes logs and bnlib/data/gpu_bench_<card>.json (results with card, date and versions: package
# data, so a chapter run alone on Colab finds it); with $OUT set (the device tool), copies of
# everything land there too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT" bnlib/data
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 BNLIB_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# 0. preflight: CuPy and torch see the GPU and NVRTC really compiles the kernels (CuPy 14's RawModule
#    is lazy: .compile() forces it); stop here with the reason otherwise
timeout 120 python3 -c "
import cupy, torch
from bnlib import cuda
assert cuda.available(), 'no GPU for CuPy'
assert torch.cuda.is_available(), 'no GPU for torch'
cuda.module().compile()
print('CuPy', cupy.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name(), '| kernels compiled')
" 2>&1 | tee "$OUT/preflight.log" || { echo "preflight failed: see preflight.log"; exit 1; }
status=0
# 1. kernels against the float64 reference, nvcc compile checks, and the GPU unit tests
#    (bnlib.cuda, and bnlib.nn on CUDA tensors)
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_nn.py \
    -k "cuda or kernel or offset or bench_gpu" 2>&1 | tee "$OUT/test_cuda.log" || status=1
# 2. the benchmark, once, recorded with card, date and versions
card=$(python3 -c "import torch; print(torch.cuda.get_device_name())" | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
timeout 150 python3 -m bnlib.bench --gpu --repeats 20 --no-progress --json "bnlib/data/gpu_bench_${card}.json" \
    2>&1 | tee "$OUT/bench_gpu.log" || status=1
cp "bnlib/data/gpu_bench_${card}.json" "$OUT/" 2>/dev/null || true
# 3. chapter 05 under nbval, as the course's tests run it (needs nbval and ipykernel: carried wheels)
if python3 -c "import nbval, ipykernel" 2>"$OUT/nbval_05.log"; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" --nbval --nbval-current-env \
        --nbval-cell-timeout=300 --nbval-sanitize-with tests/nbval_sanitize.cfg chapters/05_cupy.ipynb \
        2>&1 | tee -a "$OUT/nbval_05.log" || status=1
else
    echo "nbval or ipykernel missing (carry the wheels of tools/gpu_wheels.sh): chapter 05 not run" | tee -a "$OUT/nbval_05.log"
    status=1
fi
exit $status
