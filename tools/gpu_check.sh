#!/usr/bin/env bash
# The GPU checks of chapter 05 in one run, for a machine with a CUDA GPU, CuPy and PyTorch
# (e.g. the device tool: `run` this with `carry: [".whl"]` holding nbval/ipykernel wheels).
# Writes logs and chapters/data/gpu_bench_<card>.json (results with card, date and versions);
# with $OUT set (the device tool), copies of everything land there too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 BNLIB_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 0. preflight: CuPy sees the GPU and NVRTC compiles the kernels (CuPy needs the CUDA headers:
#    cuda-pathfinder + nvidia-cuda-runtime, or CUDA_PATH); stop here with the reason otherwise
python3 -c "import cupy, torch; from bnlib import cuda; assert cuda.available(), 'no GPU for CuPy'; cuda.module(); print('CuPy', cupy.__version__, 'torch', torch.__version__, 'kernels compiled')" \
    2>&1 | tee "$OUT/preflight.log" || { echo "preflight failed: see preflight.log"; exit 1; }
status=0
# 1. kernels against the float64 reference, and the GPU unit tests (bnlib.cuda and bnlib.nn on CUDA tensors)
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_nn.py -k "cuda or kernels or offset or bench_gpu" \
    2>&1 | tee "$OUT/test_cuda.log" || status=1
# 2. the benchmark, recorded with card, date and versions
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
python3 -m bnlib.bench --gpu --repeats 20 --no-progress --json "chapters/data/gpu_bench_${card}.json" \
    2>&1 | tee "$OUT/bench_gpu.log" || status=1
cp "chapters/data/gpu_bench_${card}.json" "$OUT/" 2>/dev/null || true
# 3. chapter 05 under nbval, as the course's tests run it (needs nbval and ipykernel)
python3 -m pytest -q -p no:cacheprovider -o addopts="" --nbval --nbval-current-env \
    --nbval-sanitize-with tests/nbval_sanitize.cfg chapters/05_cupy.ipynb 2>&1 | tee "$OUT/nbval_05.log" || status=1
exit $status
