"""bnlib.cuda (chapter 05). The kernel source is compile-checked wherever nvcc exists; everything
that runs kernels needs CuPy and a CUDA device and skips cleanly without them (tools/gpu_check.sh
runs this file on a GPU machine)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bnlib import cuda
from bnlib import functional as F
from conftest import ROOT

# tools/gpu_check.sh sets BNLIB_REQUIRE_GPU=1: there, a missing or broken CuPy must fail, not skip
REQUIRE_GPU = os.environ.get("BNLIB_REQUIRE_GPU") == "1"
if REQUIRE_GPU and not cuda.available():
    raise RuntimeError("BNLIB_REQUIRE_GPU=1 but CuPy sees no CUDA device (is CuPy installed and working?)")
needs_gpu = pytest.mark.skipif(not cuda.available(), reason="needs CuPy and a CUDA device (tools/gpu_check.sh)")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
def test_kernel_source_compiles_for_every_dtype(tmp_path, arch):
    src = tmp_path / "bn.cu"
    src.write_text(cuda.KERNEL_SOURCE)
    proc = subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-DBNLIB_INSTANTIATE", "-Werror", "all-warnings",
                           "-c", str(src), "-o", str(tmp_path / "bn.o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_numpy_input_never_goes_to_the_gpu_path():
    assert not cuda.supports(np.ones((4, 3), np.float32))
    y, cache = F.batch_norm_forward(np.ones((4, 3), np.float32) + np.arange(3, dtype=np.float32))
    assert isinstance(y, np.ndarray)


def test_bench_gpu_flag_without_gpu_fails_clearly():
    if cuda.available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "-m", "bnlib.bench", "--gpu", "--no-progress"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


# ----------------------------------------------------------------------------- on a GPU

SHAPES = [(3, 1, 5, 7), (2, 1), (1000, 3), (7, 1024, 1, 1), (5, 3, 33, 17), (2, 2049), (9, 70, 3, 3), (4, 5, 2, 3, 3),
          (300, 2, 1), (16, 513)]


def _case(shape, dtype, channels_last, seed):
    import cupy
    rng = np.random.default_rng(seed)
    x64 = rng.normal(loc=rng.uniform(-20, 20), scale=rng.uniform(0.1, 5), size=shape)
    dy64 = rng.normal(size=shape)
    pdtype = np.float32 if dtype == "float16" else dtype
    g64, b64 = rng.uniform(0.5, 1.5, shape[1]), rng.normal(size=shape[1])
    x, dy = cupy.asarray(x64.astype(dtype)), cupy.asarray(dy64.astype(dtype))
    if channels_last:
        perm = (0,) + tuple(range(2, len(shape))) + (1,)
        inverse = tuple(np.argsort(perm))
        x = cupy.ascontiguousarray(x.transpose(perm)).transpose(inverse)
    return x, dy, cupy.asarray(g64.astype(pdtype)), cupy.asarray(b64.astype(pdtype)), g64, b64


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_float64_reference(shape, dtype, channels_last):
    import cupy
    if channels_last and len(shape) < 3:
        pytest.skip("channels-last needs spatial dimensions")
    x, dy, g, b, g64, b64 = _case(shape, dtype, channels_last, seed=len(shape) * 100 + shape[1])
    y, cache = F.batch_norm_forward(x, g, b)
    dx, dg, db = F.batch_norm_backward(dy, cache)
    assert isinstance(y, cupy.ndarray) and y.dtype == x.dtype and y.strides == x.strides
    xr, dyr = cupy.asnumpy(x).astype(np.float64), cupy.asnumpy(dy).astype(np.float64)
    yr, cr = F.portable_batch_norm_forward(xr, g64, b64)
    dxr, dgr, dbr = F.portable_batch_norm_backward(dyr, cr)
    tol = {"float16": 1e-2, "float32": 1e-4, "float64": 1e-11}[dtype]
    scale = float(np.abs(g64).max() * cr.inv_std.max() * np.abs(dyr).max())
    assert np.abs(cupy.asnumpy(y).astype(np.float64) - yr).max() <= tol * max(1.0, np.abs(yr).max())
    assert np.abs(cupy.asnumpy(dx).astype(np.float64) - dxr).max() <= tol * scale
    assert np.abs(cupy.asnumpy(dg) - dgr).max() <= tol * np.abs(dgr).max()
    assert np.abs(cupy.asnumpy(db) - dbr).max() <= tol * np.abs(dbr).max()


@needs_gpu
def test_large_offset_float32_stays_accurate():
    import cupy
    x = cupy.asarray((1e4 + np.random.default_rng(0).normal(size=(4096, 3, 8, 8))).astype(np.float32))
    _, cache = F.batch_norm_forward(x)
    ref = cupy.asnumpy(x).astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(cupy.asnumpy(cache.var), ref, rtol=1e-3)


@needs_gpu
def test_bench_gpu_smoke():
    rows = cuda.bench_gpu(shapes=[(8, 4, 8, 8), (64, 16)], repeats=2, rotate=2, progress=False)
    assert {r["impl"] for r in rows} == {"torch", "bnlib"}
    assert all(r["step_ms"] > 0 and 0 < r["floor_fraction"] for r in rows)
