"""bnlib.cuda (chapter 05). The kernel source is compile-checked wherever nvcc exists, and the walks
the host code plans are checked on the CPU by replaying the kernels' loops; everything that runs
kernels needs CuPy, torch and a CUDA device and skips cleanly without them (tools/gpu_check.sh runs
this file on a GPU machine with BNLIB_REQUIRE_GPU=1, where a broken CuPy fails instead)."""
import math
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from bnlib import cuda
from bnlib import functional as F
from conftest import ROOT

# tools/gpu_check.sh sets BNLIB_REQUIRE_GPU=1: there, a missing or broken CuPy must fail, not skip
REQUIRE_GPU = os.environ.get("BNLIB_REQUIRE_GPU") == "1"
if REQUIRE_GPU and not cuda.available():
    raise RuntimeError("BNLIB_REQUIRE_GPU=1 but CuPy sees no CUDA device (is CuPy installed and working?)")


def _torch_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


needs_gpu = pytest.mark.skipif(not cuda.available(), reason="needs CuPy and a CUDA device (tools/gpu_check.sh)")
needs_torch_gpu = pytest.mark.skipif(not (cuda.available() and _torch_cuda()),
                                     reason="needs CuPy, torch and a CUDA device (tools/gpu_check.sh)")


# ----------------------------------------------------------------------------- without a GPU
NVCC_ARCHS = ("sm_75", "sm_80", "sm_90")       # a Colab T4, an A100, an H100 or H200


@pytest.fixture(scope="module")
def nvcc_objects(tmp_path_factory):
    """{arch: (CompletedProcess, object path)}: instantiation_source() compiled by nvcc for every arch of
    NVCC_ARCHS, the compiles started together (each is one process on one core; on two cores that halves
    the wait). Warnings are errors with any nvcc, on purpose: the tests hold the code to the book's own
    compiler (13.0); chapter 05's check, which readers run with whatever nvcc they have, is strict only
    from nvcc 13 on."""
    from concurrent.futures import ThreadPoolExecutor
    tmp = tmp_path_factory.mktemp("nvcc")
    src = tmp / "bn.cu"
    src.write_text(cuda.instantiation_source())

    def build(arch):
        obj = tmp / f"bn_{arch}.o"
        return arch, (subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", "--resource-usage",
                                      "-c", str(src), "-o", str(obj)], capture_output=True, text=True, timeout=600), obj)

    with ThreadPoolExecutor(max_workers=len(NVCC_ARCHS)) as pool:
        return dict(pool.map(build, NVCC_ARCHS))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", NVCC_ARCHS)
def test_every_kernel_instantiation_compiles(nvcc_objects, arch):
    proc, obj = nvcc_objects[arch]
    assert proc.returncode == 0, proc.stderr
    if shutil.which("cuobjdump"):              # every kernel the host can launch is in the object file
        listing = subprocess.run(["cuobjdump", "-symbols", str(obj)], capture_output=True, text=True)
        assert listing.stdout.count("STT_FUNC") >= len(cuda.kernel_names()), listing.stdout[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None or cuda.nvcc_version(shutil.which("nvcc")) != (13, 0),
                    reason="needs nvcc 13.0, the version the recording is of")
def test_the_recorded_register_counts_are_what_nvcc_13_gives_for_these_kernels(nvcc_objects):
    """Chapter 05's occupancy model reads bnlib/data/ptxas_sm90_nvcc13.0.json (tools/record_ptxas.py); it must be
    of these kernels (its source hash, checked by recorded_ptxas_usage) and agree with the compiler here (the
    sm_90 compile of the nvcc_objects fixture, which asks for the resource usage)."""
    usage, record = cuda.recorded_ptxas_usage()
    assert record["nvcc"] == "13.0" and record["arch"] == "sm_90" and len(usage) == len(cuda.kernel_names())
    proc, _ = nvcc_objects["sm_90"]
    assert proc.returncode == 0 and cuda.resource_usage(proc.stderr) == usage, "run tools/record_ptxas.py"


def test_a_recording_of_other_kernels_is_refused(monkeypatch):
    monkeypatch.setattr(cuda, "instantiation_source", lambda: "// other kernels")
    with pytest.raises(RuntimeError, match="other kernels than these: rerun tools/record_ptxas.py"):
        cuda.recorded_ptxas_usage()


NVRTC_PINNED = {12: (12, 0), 13: (13, 0)}     # the NVRTC releases requirements.txt installs (major: (major, minor))


def _cudart_version(include):
    """CUDART_VERSION of the headers in `include` (12000 for CUDA 12.0), or None."""
    import re
    path = os.path.join(include, "cuda_runtime_api.h")
    if not (os.path.exists(path) and os.path.exists(os.path.join(include, "cuda_fp16.h"))):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        found = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", f.read())
    return int(found.group(1)) if found else None


def _nvrtc_installs():
    """{CUDA major version: (libnvrtc, its builtins library, an include folder with that major version's
    cuda_fp16.h)} for each NVRTC found; nothing is loaded here. NVRTC is the compiler CuPy's RawModule runs
    on the GPU machine; it needs no GPU. CUDA 13 (cupy-cuda13x, the GPU machine's CuPy): the library from
    the nvidia-cuda-nvrtc wheel or a CUDA toolkit, the headers from the nvidia-cuda-runtime wheel or a
    toolkit. CUDA 12 (cupy-cuda12x, what a Colab T4 runs): the nvidia-cuda-nvrtc-cu12 wheel and the headers
    of the nvidia-cuda-runtime-cu12 wheel. requirements.txt pins all four wheels (NVRTC_PINNED). Headers of
    another major version are never taken (their CUDART_VERSION is read)."""
    import glob
    import site
    packages = [os.path.join(d, "nvidia") for d in site.getsitepackages() + [site.getusersitepackages()]]
    roots = []
    if shutil.which("nvcc"):
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    roots += [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    roots = [r for r in roots if r]
    where = {   # major: (library folders, include folders), the wheels' first
        13: ([os.path.join(p, "cu13", "lib") for p in packages] + [os.path.join(r, "lib64") for r in roots],
             [os.path.join(p, "cu13", "include") for p in packages] + [os.path.join(r, "include") for r in roots]),
        12: ([os.path.join(p, "cuda_nvrtc", "lib") for p in packages],
             [os.path.join(p, "cuda_runtime", "include") for p in packages]),
    }
    found = {}
    for major, (lib_dirs, includes) in where.items():
        include = next((d for d in includes if (_cudart_version(d) or 0) // 1000 == major), None)
        for d in lib_dirs:
            libs = sorted(glob.glob(os.path.join(d, f"libnvrtc.so.{major}*")))
            builtins = sorted(glob.glob(os.path.join(d, f"libnvrtc-builtins.so.{major}*")))
            if libs and builtins and include:
                found[major] = (libs[0], builtins[0], include)
                break
    return found


# One NVRTC per process (the compile runs in a child): two NVRTC versions' builtins libraries would
# otherwise share a process. Prints one JSON line per architecture.
_NVRTC_COMPILE = r"""
import ctypes, json, sys
from concurrent.futures import ThreadPoolExecutor
from bnlib import cuda
library, builtins, include = sys.argv[1:4]
ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)      # libnvrtc opens it by name at compile time
lib = ctypes.CDLL(library)
lib.nvrtcGetErrorString.restype = ctypes.c_char_p
major, minor = ctypes.c_int(), ctypes.c_int()
assert lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) == 0


def compile_for(arch):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), cuda.KERNEL_SOURCE.encode(), b"bn.cu", 0, None, None) == 0
    try:
        for name in cuda.kernel_names():
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0, name
        options = [o.encode() for o in (*cuda.NVRTC_OPTIONS, f"--gpu-architecture={arch}", f"-I{include}")]
        rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered, cubin = [], ctypes.c_size_t(0)
        if rc == 0:
            for name in cuda.kernel_names():
                out = ctypes.c_char_p()
                assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0, name
                lowered.append(out.value.decode())
            assert lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) == 0, arch
        return dict(arch=arch, version=[major.value, minor.value], rc=rc, error=lib.nvrtcGetErrorString(rc).decode(),
                    log=log.value.decode().strip(), lowered=lowered, cubin_bytes=cubin.value)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


with ThreadPoolExecutor(max_workers=2) as pool:     # the archs compiled at once: ctypes releases the GIL
    for result in pool.map(compile_for, sys.argv[4:]):
        print(json.dumps(result))
"""


# Skipped on the GPU machine (tools/gpu_check.sh), where CuPy's own NVRTC compiles the module for every GPU
# test: a second NVRTC there would test nothing more.
@pytest.mark.skipif(REQUIRE_GPU, reason="the GPU machine: CuPy's own NVRTC compiles the module there")
@pytest.mark.parametrize("major", (12, 13))
def test_nvrtc_compiles_the_module_as_cupy_will_with_every_name_expression(major, request):
    # module() hands KERNEL_SOURCE, NVRTC_OPTIONS and kernel_names() to cupy.RawModule, which runs NVRTC on
    # the GPU machine: one failure there breaks every kernel. The same compile, here, for a Colab T4 and an
    # H100/H200, with every name expression lowered: with CUDA 13's NVRTC (cupy-cuda13x, the GPU machine's
    # CuPy) and with the first CUDA 12 release's (cupy-cuda12x, as on Colab, whose CUDA 12 may be a later
    # release: a GPU machine's CuPy may run another NVRTC than the two compiled with here).
    import json
    installs = _nvrtc_installs()
    if major not in installs:
        why = (f"no CUDA {major} NVRTC library with CUDA {major} headers (requirements.txt's nvidia-cuda-nvrtc and "
               f"nvidia-cuda-runtime wheels)")
        if os.environ.get("CI"):              # CI installs them: a missing one fails there instead of skipping
            pytest.fail(why)
        pytest.skip(why)
    # NVRTC 13.0 is nvcc 13.0's compiler: where that nvcc is here and compiled the kernels for sm_75 (the
    # nvcc_objects fixture, which test_every_kernel_instantiation_compiles checks), what NVRTC does otherwise (name
    # expressions, __CUDACC_RTC__, the wheel's headers, its log) does not depend on the arch, so the GPU machine's
    # arch is enough (half the test's time)
    nvcc = shutil.which("nvcc")
    archs = ["sm_75", "sm_90"]
    if major == 13 and nvcc and cuda.nvcc_version(nvcc) == (13, 0):
        if request.getfixturevalue("nvcc_objects")["sm_75"][0].returncode == 0:
            archs = ["sm_90"]
    proc = subprocess.run([sys.executable, "-c", _NVRTC_COMPILE, *installs[major], *archs],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["arch"] for r in results] == archs
    headers = _cudart_version(installs[major][2])
    for r in results:
        assert tuple(r["version"]) == NVRTC_PINNED[major], r["version"]           # the release named in the book
        assert headers // 1000 == major and headers % 1000 // 10 == r["version"][1], (headers, r["version"])
        assert r["rc"] == 0, (r["arch"], r["error"], r["log"][-3000:])
        assert r["log"] == "", (r["arch"], r["log"][-3000:])                 # no warnings either
        assert len(set(r["lowered"])) == len(cuda.kernel_names()), r["arch"]   # one kernel per name expression
        assert r["cubin_bytes"] > 0, r["arch"]


def test_kernel_names_cover_every_dtype_and_walk():
    names = cuda.kernel_names()
    assert len(names) == len(set(names)) == 8 * 4 * 2 + 4 * 4 * 2 + 2 * 2       # + the planes kernels' FLAT ones
    for dtype, ctype in [("float16", "__half"), ("bfloat16", "bf16_t"), ("float32", "float"), ("float64", "double")]:
        for walk in ("planes", "cols"):
            assert f"bn_stats_{walk}<{ctype}, {cuda._VEC[dtype]}>" in names and f"bn_stats_{walk}<{ctype}, 1>" in names


def _replay(pl, total=None, offset=0):
    """Replay the loops of the kernels for plan `pl` in NumPy: for every (block, thread) the flat
    indices it reads and the partial slot it writes. Returns (values read per element, the
    channel each partial slot was written from, slot per element). A chunk's plan (channels
    c0 .. of a larger tensor) is replayed with that tensor's size `total` and the chunk's first
    element `offset`; its channels are numbered from 0, as the kernels number them."""
    total = pl.channels * pl.count if total is None else total
    seen = np.zeros(total, np.int64)
    slot_channel = {}
    slot_of = np.full(total, -1, np.int64)
    if pl.walk == "planes":
        n_, c_, lv, seg = (int(a) for a in pl.walk_args)
        v = pl.vec
        gc, gb, gs = pl.grid
        for c in range(gc):
            for b in range(gb):
                for s in range(gs):
                    lo, hi = s * seg, min(lv, s * seg + seg)
                    j = (b * gs + s) * c_ + c
                    for n in range(b, n_, gb):
                        for t in range(cuda.PLANE_THREADS):
                            for i in range(lo + t, hi, cuda.PLANE_THREADS):
                                idx = offset + ((n * c_ + c) * lv + i) * v + np.arange(v)
                                seen[idx] += 1
                                slot_of[idx] = j
                    slot_channel.setdefault(j, set()).add(c)
    else:
        total_, rfull, wf = (int(a) for a in pl.walk_args)
        w, l = (int(a) for a in pl.geometry)
        v = pl.vec
        gx, gb, _ = pl.grid
        step = cuda.TY * gb
        for bx in range(gx):
            for tx in range(cuda.TX):
                col0 = (bx * cuda.TX + tx) * v
                if col0 >= wf:
                    continue
                for b in range(gb):
                    for ty in range(cuda.TY):
                        for r in range(b * cuda.TY + ty, rfull + 1, step):
                            for k in range(v):
                                i = r * wf + col0 + k
                                if i < total_:
                                    seen[i] += 1
                                    slot_of[i] = b * wf + col0 + k
                        for k in range(v):
                            slot_channel.setdefault(b * wf + col0 + k, set()).add(((col0 + k) % w) // l)
    return seen, slot_channel, slot_of


def _finalize_slots(pl, c):
    p, q, gl, l, wf, w, _ = (int(a) for a in pl.finalize_args)
    out = []
    for i in range(q):
        b, rem = divmod(i, gl)
        f, li = divmod(rem, l)
        out.append(b * wf + f * w + c * l + li)
    return out


def _assert_finalize_finds_each_channels_slots(pl, slot_channel, slot_of, channel_of):
    """For each channel c of plan pl (numbered as its kernels number them): the finalize's slots are
    distinct and exactly those c's blocks wrote, and every value of c went to one of them."""
    for c in range(pl.channels):
        expected = {j for j, chs in slot_channel.items() if c in chs}
        got = _finalize_slots(pl, c)
        assert len(got) == len(set(got)) and set(got) == expected
        assert set(slot_of[channel_of == c]) <= expected


def _assert_plan_reads_each_value_once(pl, rows, channels, length):
    """Plan pl of a (rows, channels, length) tensor, replayed: every value read once, no partial slot mixing
    channels, each channel's finalize finding exactly its slots, and the workspace holding them all."""
    seen, slot_channel, slot_of = _replay(pl)
    assert (seen == 1).all(), "a value read twice or never"
    channel_of = (np.arange(rows * channels * length) // length) % channels
    assert all(len(chs) == 1 for chs in slot_channel.values()), "a partial slot mixes channels"
    _assert_finalize_finds_each_channels_slots(pl, slot_channel, slot_of, channel_of)
    assert max(slot_channel) < pl.partials and 3 * pl.partials + 3 * channels == pl.workspace_values


@pytest.mark.parametrize("rows,channels,length,dtype,aligned,sms", [
    (3, 1, 35, "float32", True, 2), (2, 1, 1, "float32", True, 1), (1000, 3, 1, "float16", True, 3),
    (5, 3, 561, "float32", True, 2), (2, 2049, 1, "float64", True, 4), (9, 70, 9, "bfloat16", True, 2),
    (4, 5, 18, "float32", False, 2), (6, 2, 2048, "float16", True, 2), (3, 4, 1024, "float32", True, 1),
    (8, 2, 4096, "float64", True, 3), (7, 3, 1, "float32", True, 2), (40 * 3, 5, 1, "bfloat16", True, 2),
    (2, 3, 1030, "float32", True, 2), (3, 2, 1027, "float32", True, 2), (2, 2, 2050, "float16", True, 3)])
def test_planned_walks_read_every_value_once_and_finalize_finds_every_partial(rows, channels, length, dtype,
                                                                               aligned, sms):
    pl = cuda.plan(rows, channels, length, dtype, aligned, sms)
    large_planes = length > 1 and length * cuda._ITEMSIZE[dtype] >= 4096      # odd lengths too: scalar loads
    assert pl.walk == ("planes" if large_planes else "cols")
    vectors = aligned and (pl.walk == "cols" or length % cuda._VEC[dtype] == 0)
    assert pl.vec == (cuda._VEC[dtype] if vectors else 1)
    _assert_plan_reads_each_value_once(pl, rows, channels, length)
    assert pl.count == rows * length



@pytest.mark.parametrize("rows,channels,length,dtype,aligned,sms,design3_grid", [
    (1000, 3, 1, "float16", True, 132, (2, 2, 1)), (40, 3, 1030, "float32", True, 132, (3, 40, 3)),
    (6200, 3, 1, "float32", True, 132, (2, 17, 1)), (2000, 5, 9, "bfloat16", True, 132, (3, 16, 1)),
    (300, 70, 9, "float32", False, 132, (40, 19, 1)), (12, 2, 2048, "float16", True, 132, (2, 12, 1)),
    (3, 2, 1027, "float32", True, 8, (2, 3, 3))])
def test_min_vectors_caps_the_grid_and_keeps_every_walk_whole(rows, channels, length, dtype, aligned, sms,
                                                                design3_grid):
    """plan's min_vectors (bnlib.cuda.MIN_VECTORS_PER_THREAD): 1, the default, is design 3's plan (its grids
    frozen here as design 3's code gave them); a larger value never
    adds blocks, caps them so that a first-pass thread loads about that many vectors (columns: rows of
    the folded view per row block; planes: a channel's vectors per block), and every plan it gives still
    reads each value once, with the finalize finding every partial."""
    default = cuda.plan(rows, channels, length, dtype, aligned, sms)
    assert default.grid == design3_grid                  # the default keeps design 3's grid (computed with 4a6a148)
    assert cuda.plan(rows, channels, length, dtype, aligned, sms, min_vectors=1) == default
    blocks = [math.prod(default.grid)]
    for k in (2, 8, 64):
        pl = cuda.plan(rows, channels, length, dtype, aligned, sms, min_vectors=k)
        assert pl.walk == default.walk and pl.vec == default.vec
        blocks.append(math.prod(pl.grid))
        if pl.walk == "cols":
            total, _, wf = pl.walk_args
            assert pl.grid[1] <= max(1, -(-(-(-total // wf)) // (cuda.TY * k)))
        else:
            n, _, lv, _ = pl.walk_args
            assert pl.grid[1] * pl.grid[2] <= max(1, -(-(n * lv) // (cuda.PLANE_THREADS * k)))
        _assert_plan_reads_each_value_once(pl, rows, channels, length)
    assert blocks == sorted(blocks, reverse=True) and blocks[-1] < blocks[0], blocks


def _check_setting_before_any_launch(monkeypatch, name, bad_values, message, x, good_values):
    """bnlib.cuda's setting `name` at each of bad_values raises a ValueError (`message`, a regex) from every
    torch call before any launch, the running statistics untouched; at each of good_values the results of a
    training step (forward and backward, the emulated device) are the same. Returns {good value: [(kernel,
    grid) launched by its forward]}."""
    torch = pytest.importorskip("torch")
    device = _emulated_torch_device(monkeypatch)
    launched = []

    def launch(dev, kernel, grid, block, args, stream=None):
        launched.append((kernel, grid))
        device.launch(dev, kernel, grid, block, args, stream)
    monkeypatch.setattr(cuda, "_launch", launch)
    monkeypatch.setattr(cuda, "_sm_count", lambda d: 132)
    c = x.shape[1]
    rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.tensor(7)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for bad in bad_values:
        monkeypatch.setattr(cuda, name, bad)
        with pytest.raises(ValueError, match=message):
            cuda.forward_torch(x, None, None, 1e-5, running_mean=rm, running_var=rv, num_batches_tracked=nbt)
        with pytest.raises(ValueError, match=name):
            cuda.backward_torch(dy, x, torch.zeros(c), torch.ones(c))
        with pytest.raises(ValueError, match=name):
            cuda.inference_torch(x, rm, rv)
    assert launched == [] and (rm == 0).all() and (rv == 1).all() and int(nbt) == 7
    results, launches = [], {}
    for value in good_values:
        monkeypatch.setattr(cuda, name, value)
        launched.clear()
        y, mean, var, inv_std = cuda.forward_torch(x, None, None, 1e-5)
        launches[value] = list(launched)
        results.append((y, mean, var) + cuda.backward_torch(dy, x, mean, inv_std)[:2])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return launches


def test_min_vectors_setting_is_checked_before_any_launch(monkeypatch):
    """MIN_VECTORS_PER_THREAD that is not an integer >= 1 raises a ValueError naming it from every torch
    call before any launch, the running statistics untouched; a valid value changes the grids the
    launches get, not the results (the emulated device)."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    launches = _check_setting_before_any_launch(
        monkeypatch, "MIN_VECTORS_PER_THREAD", (0, -3, 2.5, "8", True, None),
        r"bnlib.cuda.MIN_VECTORS_PER_THREAD must be an integer >= 1, got ", x, (1, 8))
    # (4000, 3) as columns: rows of 3 folded 24 into one (72 values, 18 vectors: 2 block columns), 167 rows
    assert launches[1][0][1] == (2, 11, 1) and launches[8][0][1] == (2, 2, 1)


def test_bench_gpu_refuses_bad_min_vectors_before_touching_a_gpu():
    pytest.importorskip("torch")
    from bnlib import bench
    for bad in ((0,), (2.5,), (True,), ("8",)):
        with pytest.raises(ValueError, match="min_vectors must be integers >= 1"):
            bench.bench_gpu(min_vectors=bad)


@pytest.mark.parametrize("rows,channels,length,dtype,aligned,sms", [
    (5, 3, 49, "float32", True, 2), (4, 6, 196, "float32", True, 132), (3, 5, 784, "bfloat16", True, 132),
    (6, 4, 196, "bfloat16", True, 3), (2, 7, 2, "float16", True, 1), (3, 4, 18, "float32", False, 2),
    (64, 3, 784, "float32", True, 132), (2, 3, 255, "float64", True, 2)])
def test_planes_min_bytes_walks_small_planes_as_planes_and_keeps_every_walk_whole(rows, channels, length, dtype,
                                                                                    aligned, sms):
    """plan's planes_min_bytes (bnlib.cuda.PLANES_MIN_BYTES): 4096, the default, is design 3's rule (planes under
    4 KB walked as columns); 0 walks every plane of more than one value as planes, in 16-byte vectors when
    the plane's length is a multiple of the vector, else one value per load; with min_vectors too. Every such
    plan reads each value once, with the finalize finding every partial, and keeps far fewer partials than
    the columns walk it replaces."""
    default = cuda.plan(rows, channels, length, dtype, aligned, sms)
    assert default.walk == "cols" and cuda.plan(rows, channels, length, dtype, aligned, sms,
                                                  planes_min_bytes=4096) == default
    for k in (1, 8):
        pl = cuda.plan(rows, channels, length, dtype, aligned, sms, min_vectors=k, planes_min_bytes=0)
        assert pl.walk == "planes"
        assert pl.vec == (cuda._VEC[dtype] if aligned and length % cuda._VEC[dtype] == 0 else 1)
        assert pl.partials < default.partials
        _assert_plan_reads_each_value_once(pl, rows, channels, length)
    # a plane between the two thresholds: planes at 0 and at its own size, columns one byte above it
    size = length * cuda._ITEMSIZE[dtype]
    assert cuda.plan(rows, channels, length, dtype, aligned, sms, planes_min_bytes=size).walk == "planes"
    assert cuda.plan(rows, channels, length, dtype, aligned, sms, planes_min_bytes=size + 1).walk == "cols"


def test_flat_cursor_is_taken_only_where_a_short_segment_shares_a_block_with_other_planes():
    """flat_cursor(plan) (the planes kernels' FLAT instantiations, with FlatPlaneCursor) holds exactly where a
    segment is shorter than a block's threads and a block has several planes. Over a sample of shapes, dtypes,
    alignments, SM counts and min_vectors, design 3's default plans need it only where plan fell back from
    columns to planes for a wide tensor's scratch (planes under 4 KB, e.g. (2, 3001, 121) float16), and none
    of the benchmark's cases does: their kernels are design 3's."""
    flat = short_alone = 0
    shapes = [(n, c, l) for n in (1, 2, 3, 8, 64, 256) for c in (1, 3, 64, 1024)
              for l in (1024, 1030, 3136, 4096, 50176, 262144, 998001)]
    shapes += [(n, c, l) for n in (2, 3, 4) for c in (2001, 3001, 4095) for l in (49, 121, 201, 225)]
    for n, c, l in shapes:
        for dtype in ("float16", "float32", "float64"):
            for aligned in (True, False):
                for sms in (1, 8, 132):
                    for k in (1, 8):
                        pl = cuda.plan(n, c, l, dtype, aligned, sms, min_vectors=k)
                        if pl.walk != "planes":
                            assert not cuda.flat_cursor(pl)
                            continue
                        lv, seg = pl.walk_args[2:]
                        short = min(seg, lv - seg * (pl.grid[2] - 1)) < cuda.PLANE_THREADS
                        assert cuda.flat_cursor(pl) == (short and len(range(0, n, pl.grid[1])) > 1)
                        if cuda.flat_cursor(pl):
                            assert l * cuda._ITEMSIZE[dtype] < 4096, (n, c, l, dtype, aligned, sms, k)
                            flat += 1
                        short_alone += short and not cuda.flat_cursor(pl)
    assert flat > 0 and short_alone > 0                # the sample reaches both kinds
    assert cuda.flat_cursor(cuda.plan(2, 3001, 121, "float16", True, 132))        # the chapter's example
    names = set(cuda.kernel_names())                   # every kernel a sampled plan launches is instantiated
    for n, c, l in shapes[::7] + [(64, 3, 49), (4, 6, 196), (2, 3001, 121)]:
        for dtype in ("float16", "bfloat16", "float32", "float64"):
            for aligned in (True, False):
                for b in (4096, 0):
                    pl = cuda.plan(n, c, l, dtype, aligned, 132, planes_min_bytes=b)
                    for kind in ("stats", "apply", "backward_reduce", "backward_dx"):
                        assert {cuda._kernel_name(kind, sp, dtype) for _, sp in cuda._pieces(pl)} <= names
    from bnlib import bench
    for s_, d, lay in [(s_, d, lay) for s_ in bench.GPU_SHAPES for d, lay in bench.GPU_CONFIGS]:
        view = (s_[0], s_[1], math.prod(s_[2:])) if lay == "NCHW" else (s_[0] * math.prod(s_[2:]), s_[1], 1)
        assert not cuda.flat_cursor(cuda.plan(*view, d, True, 132))


def test_planes_min_bytes_leaves_channels_last_and_2d_input_as_columns():
    for rows, channels in ((50176, 128), (8192, 1024), (7, 3)):
        for dtype in ("float32", "bfloat16"):
            assert cuda.plan(rows, channels, 1, dtype, True, 132, planes_min_bytes=0) == \
                cuda.plan(rows, channels, 1, dtype, True, 132)


def test_planes_min_bytes_setting_is_checked_before_any_launch(monkeypatch):
    """PLANES_MIN_BYTES that is not an integer >= 0 raises a ValueError naming it from every torch call before
    any launch, the running statistics untouched; 0 changes the walk the launches get (NCHW planes of 16
    values walked as planes instead of columns), not the results (the emulated device)."""
    torch = pytest.importorskip("torch")
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    launches = _check_setting_before_any_launch(
        monkeypatch, "PLANES_MIN_BYTES", (-1, 2.5, "0", True, None),
        r"bnlib.cuda.PLANES_MIN_BYTES must be an integer >= 0, got ", x, (4096, 0))
    walks = {b: {kernel.split("<")[0].rsplit("_", 1)[1] for kernel, _ in launches[b] if "finalize" not in kernel}
             for b in launches}
    assert walks == {4096: {"cols"}, 0: {"planes"}}


@pytest.mark.parametrize("view,dtype", [((64, 128, 784), "float32"), ((64, 128, 784), "bfloat16"),
                                        ((256, 256, 196), "bfloat16"), ((50176, 128, 1), "float16"),
                                        ((256, 64, 3136), "float32"), ((16, 32, 196), "float32"), ((100, 64, 1), "float32")])
def test_bench_gpu_grid_rows_time_each_distinct_plan_once(view, dtype):
    """bench_gpu's grid sweep rows (_other_plans), on benchmark-like views at 132 SMs with min_vectors (4, 8, 16, 32)
    and planes_min_bytes (0,): every setting tried is the default's plan, a row's, or listed in that row's
    same values; no two rows (nor a row and the default) share a walk and grid; names say the setting."""
    from bnlib import bench

    def plan_with(k, b):
        return cuda.plan(*view, dtype, True, 132, min_vectors=k, planes_min_bytes=b)
    ks, planes = (4, 8, 16, 32), (0,)
    rows = bench._other_plans(plan_with, (1, 4096), ks, planes)
    keys = [(p.walk, p.grid) for _, _, _, p, _ in rows] + [(plan_with(1, 4096).walk, plan_with(1, 4096).grid)]
    assert len(set(keys)) == len(keys)
    for name, k, b, pl, same in rows:
        assert pl == plan_with(k, b)
        assert name == (f"bnlib [>={k} vec]" if b == 4096 else f"bnlib [planes >={b} B]" if k == 1
                        else f"bnlib [planes >={b} B, >={k} vec]")
        for other in same:
            assert (plan_with(other, b).walk, plan_with(other, b).grid) == (pl.walk, pl.grid) and other != k
    for k, b in [(k, 4096) for k in ks] + [(k, b) for b in planes for k in (1,) + ks]:   # every setting is timed
        assert (plan_with(k, b).walk, plan_with(k, b).grid) in keys, (k, b)
    if view[2] == 1 or view[2] * cuda._ITEMSIZE[dtype] >= 4096:   # channels-last, 2-D, large planes: no planes row
        assert not any("planes" in name for name, *_ in rows)
    if view == (16, 32, 196):        # 784-byte planes: as planes, k = 4 caps the grid to 1 block per channel
        assert [(name, pl.grid, same) for name, _, _, pl, same in rows] == [
            ("bnlib [planes >=0 B]", (32, 4, 1), []), ("bnlib [planes >=0 B, >=4 vec]", (32, 1, 1), [8, 16, 32])]
    assert bench._other_plans(plan_with, (1, 4096)) == []                  # nothing asked: no rows


def test_bench_gpu_refuses_bad_planes_min_bytes_before_touching_a_gpu():
    pytest.importorskip("torch")
    from bnlib import bench
    for bad in ((-1,), (2.5,), (True,), ("0",)):
        with pytest.raises(ValueError, match="planes_min_bytes must be integers >= 0"):
            bench.bench_gpu(planes_min_bytes=bad)


def test_kernel_parameters_are_read_from_the_declarations():
    """bnlib.cuda packs each launch's arguments at the types its kernel declares: the parser's reading
    of every kernel, written out here by hand from the declarations, and its refusals."""
    p, i, q, a = "ptr", "int32", "int64", "acc"
    expected = {
        "bn_stats_planes": (p, i, i, q, q, p, q, p),
        "bn_stats_cols": (p, q, q, i, p, q, p),
        "bn_stats_finalize": (p, q, q, q, q, q, q, i, a, p, p, p, p, p, a, a, p),
        "bn_apply_planes": (p, p, i, i, q, q, p, p, p, p, a, i),
        "bn_apply_cols": (p, p, q, q, i, i, i, p, p, p, p, a, i),
        "bn_backward_reduce_planes": (p, p, i, i, q, q, p, p, q),
        "bn_backward_reduce_cols": (p, p, q, q, i, i, i, p, p, q),
        "bn_backward_finalize": (p, q, q, q, q, q, q, i, p, p, a, p, p, p),
        "bn_backward_dx_planes": (p, p, p, i, i, q, q, p, p),
        "bn_backward_dx_cols": (p, p, p, q, q, i, i, i, i, p, p)}
    assert cuda.kernel_parameters() == expected
    assert {n.split("<")[0] for n in cuda.kernel_names()} == set(expected)
    other = cuda.kernel_parameters("__global__ void __launch_bounds__(64) k(const float *a /* x, y */, long long n,\n"
                                   " int m = 4, // a comment, with a comma\n A s) {}\n"
                                   "__global__ void __launch_bounds__(64) e() {}")
    assert other == {"k": (p, q, i, a), "e": ()}
    with pytest.raises(ValueError, match="kernel k: parameter 'unsigned int m' has a type the launcher cannot pack"):
        cuda.kernel_parameters("__global__ void __launch_bounds__(64) k(float* a, unsigned int m) {}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_launch_arguments_match_the_kernel_signatures(monkeypatch, dtype):
    """Every launch of a training step and an eval forward passes as many arguments as the kernel
    has parameters, each of the kind its parameter is declared with (a non-negative integer for a
    pointer, an integer in range for int and long long, a float for the accumulation type A), packs
    at those types, and has a grid and block the kernel was written for."""
    import numbers
    sigs = cuda.kernel_parameters()
    launched = []

    def check(dev, name, grid, block, args, stream=None):
        base = name.split("<")[0]
        kinds = sigs[base]
        assert len(args) == len(kinds), (name, len(args), len(kinds))
        for i, (a, k) in enumerate(zip(args, kinds)):
            if k == "acc":
                assert isinstance(a, float), (name, i, type(a), k)
            else:
                assert isinstance(a, numbers.Integral) and not isinstance(a, bool), (name, i, type(a), k)
                assert a >= 0 if k == "ptr" else -2 ** 31 <= a < 2 ** 31 if k == "int32" else True, (name, i, a)
        cuda.pack_arguments(name, args)
        assert name in cuda.kernel_names()
        threads = math.prod(block)
        assert threads == (cuda.FINALIZE_THREADS if "finalize" in base else
                           cuda.PLANE_THREADS if "planes" in base else cuda.TX * cuda.TY)
        assert all(0 < g < 2 ** 31 for g in grid) and all(g < 65536 for g in grid[1:])
        assert len(grid) == len(block) == 3 and stream == 4352           # cuLaunchKernel takes 3-D sizes
        launched.append(base)

    monkeypatch.setattr(cuda, "_launch", check)
    monkeypatch.setattr(cuda, "_ready", lambda dev, names: None)
    for rows, c, l in [(256, 64, 3136), (8, 3, 1030), (256 * 196, 256, 1), (5, 7, 1), (2, 1, 4096)]:
        for aligned in (True, False):
            pl = cuda.plan(rows, c, l, dtype, aligned, 132)
            launched.clear()
            cuda._run_forward(0, pl, dtype, 256, 512, 768, 1024, 1280, 1536, 0, 1e-5, 4096, 4352)
            cuda._run_backward(0, pl, dtype, 256, 512, 768, 1024, 1280, 0, 1536, 1792, 4096, 4352)
            cuda._run_apply(0, pl, dtype, 256, 512, 768, 1024, 0, 1280, 1e-5, from_var=True, stream=4352)
            for momentum in (0.1, None):          # with the running statistics and the batch counter
                cuda._run_forward(0, pl, dtype, 256, 512, 768, 1024, 1280, 1536, 0, 1e-5, 4096, 4352,
                                  running=(4608, 4864, momentum, 5120))
            assert len(launched) == 7 + 6 and len(set(launched)) == 6


class _EmulatedDevice:
    """A CPU stand-in for the GPU that checks the host code end to end: buffers at made-up addresses,
    and each kernel's contract (which partial slot every value goes to, what the finalize kernels
    and the elementwise kernels compute) in NumPy, bound to the kernel's own parameter names parsed
    from KERNEL_SOURCE. It checks the launchers' wiring (which address goes where, the workspace
    offsets, the slots the finalize kernels read) and the per-channel formulas; not the CUDA code."""

    STORAGE = {"__half": np.float16, "float": np.float32, "double": np.float64, "bf16_t": np.uint16}

    def __init__(self):
        import re
        self.buffers, self.next = {}, 1 << 20
        pattern = r"__global__ void __launch_bounds__\([^)]*\)\s*(\w+)\((.*?)\)\s*\{"
        self.params = {name: [p.split()[-1] for p in params.split(",")]
                       for name, params in re.findall(pattern, cuda.KERNEL_SOURCE, flags=re.S)}

    def alloc(self, nbytes):
        addr = self.next
        self.buffers[addr] = np.zeros(nbytes, np.uint8)
        self.next += nbytes // 256 * 256 + 512
        return addr

    def view(self, addr, dtype, count):
        for base, buf in self.buffers.items():
            if base <= int(addr) < base + buf.size:
                off = int(addr) - base
                assert off + count * np.dtype(dtype).itemsize <= buf.size, "access past the end of a buffer"
                return buf[off:off + count * np.dtype(dtype).itemsize].view(dtype)
        import ctypes                      # not ours: a CPU tensor's memory (the torch interface test)
        return np.frombuffer((ctypes.c_uint8 * (count * np.dtype(dtype).itemsize)).from_address(int(addr)), dtype)

    def load(self, addr, t, count):
        v = self.view(addr, self.STORAGE[t], count)
        if t == "bf16_t":
            return (v.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return v.astype(np.float64)

    def store(self, addr, t, values, at=None):
        """values into storage type t at addr, or at the elements `at` of it."""
        at = np.arange(values.size) if at is None else at
        out = self.view(addr, self.STORAGE[t], int(at.max()) + 1 if at.size else 0)
        if t == "bf16_t":
            import torch
            out[at] = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            out[at] = values

    def gather(self, addr, t):
        """The values the current kernel reads at addr (its elements self.at), as float64."""
        return self.load(addr, t, int(self.at.max()) + 1)[self.at]

    def launch(self, dev, name, grid, block, args, stream=None):
        kernel = name.split("<")[0]
        targs = [s.strip() for s in name.split("<")[1].rstrip(">").split(",")]
        a = dict(zip(self.params[kernel], args))
        t, acc = targs[0], (np.float64 if targs[0] == "double" else np.float32)
        if "finalize" in kernel:
            return getattr(self, kernel)(a, acc, grid[0])
        vec = int(targs[1])
        for p in ("x", "y", "dy", "dx"):                    # a vector load needs its 16-byte boundary
            assert vec == 1 or int(a.get(p, 0)) % 16 == 0, f"{name}: {p} at {int(a[p])} is not 16-byte aligned"
        if kernel.endswith("_planes"):                      # channels 0 .. grid[0]-1, planes C apart
            n_, c_, lv, seg = (int(a[k]) for k in ("N", "C", "LV", "seg"))
            n, c, i = np.meshgrid(np.arange(n_), np.arange(grid[0]), np.arange(lv), indexing="ij")
            slot = ((n % grid[1]) * grid[2] + i // seg) * c_ + c
            at = ((n * c_ + c) * lv + i)[..., None] * vec + np.arange(vec)
            slot, chan = (np.repeat(s.reshape(-1), vec) for s in (slot, c))
            at = at.reshape(-1)
        else:
            e = np.arange(int(a["total"]))
            col, wf = e % int(a["Wf"]), int(a["Wf"])
            slot = ((e // wf) // cuda.TY) % grid[1] * wf + col
            chan = (col % int(a["W"])) // int(a["L"]) if "W" in a else None
            at = e
        self.at = at                                        # the elements the kernel reads and writes
        getattr(self, kernel.rsplit("_", 1)[0])(a, t, acc, slot, chan)

    def bn_stats(self, a, t, acc, slot, chan):
        if int(a["counter"]):                               # num_batches_tracked, one batch more
            self.view(a["counter"], np.int64, 1)[0] += 1
        x, p = self.gather(a["x"], t), int(a["P"])
        n = np.bincount(slot, minlength=p)
        mean = np.bincount(slot, x, minlength=p) / np.maximum(n, 1)
        m2 = np.bincount(slot, (x - mean[slot]) ** 2, minlength=p)
        self.view(a["part"], acc, 3 * p)[:] = np.concatenate([n, mean, m2])

    def _slots(self, a, c):
        q, gl, l, wf, w = (int(a[k]) for k in ("Q", "GL", "L", "Wf", "W"))
        i = np.arange(q)
        return (i // gl) * wf + ((i % gl) // l) * w + c * l + (i % gl) % l

    def _vector(self, addr, acc, count, default):
        return self.view(addr, acc, count).astype(np.float64) if int(addr) else np.full(count, default)

    def bn_stats_finalize(self, a, acc, blocks):
        c_, p = min(int(a["C"]), blocks), int(a["P"])      # blocks c < C write channel c
        part = self.view(a["part"], acc, 3 * p).astype(np.float64)
        out = {k: self.view(a[k], acc, c_) for k in ("mean", "var", "inv_std")}
        for c in range(c_):
            s = self._slots(a, c)
            n, m, q = part[s], part[p + s], part[2 * p + s]
            mu = (n * m).sum() / n.sum()
            var = (q + n * (m - mu) ** 2).sum() / n.sum()
            out["mean"][c], out["var"][c], out["inv_std"][c] = mu, var, 1 / np.sqrt(var + float(a["eps"]))
            if int(a["running_mean"]):                      # torch's update, the variance unbiased
                m = float(a["momentum"])
                f = m if m >= 0 else 1.0 / float(self.view(a["counter"], np.int64, 1)[0])
                rm, rv = self.view(a["running_mean"], acc, c_), self.view(a["running_var"], acc, c_)
                rm[c] = (1 - f) * rm[c] + f * mu
                rv[c] = (1 - f) * rv[c] + f * var * float(a["unbias"])

    def bn_apply(self, a, t, acc, slot, chan):
        x, c_ = self.gather(a["x"], t), int(chan.max()) + 1
        mu, stat = self._vector(a["mean"], acc, c_, 0), self._vector(a["stat"], acc, c_, 0)
        inv = 1 / np.sqrt(stat + float(a["eps"])) if int(a["from_var"]) else stat
        scale, shift = self._vector(a["weight"], acc, c_, 1.0) * inv, self._vector(a["bias"], acc, c_, 0.0)
        self.store(a["y"], t, (x - mu[chan]) * scale[chan] + shift[chan], self.at)

    def bn_backward_reduce(self, a, t, acc, slot, chan):
        x, dy, p = self.gather(a["x"], t), self.gather(a["dy"], t), int(a["P"])
        mu = self._vector(a["mean"], acc, int(chan.max()) + 1, 0)
        self.view(a["part"], acc, 2 * p)[:] = np.concatenate(
            [np.bincount(slot, dy, minlength=p), np.bincount(slot, dy * (x - mu[chan]), minlength=p)])

    def bn_backward_finalize(self, a, acc, blocks):
        c_, p, count = int(a["C"]), int(a["P"]), float(a["count"])   # coef: 3 arrays of C (the stride)
        part = self.view(a["part"], acc, 2 * p).astype(np.float64)
        inv, w = self._vector(a["inv_std"], acc, blocks, 0), self._vector(a["weight"], acc, blocks, 1.0)
        dw, db, coef = self.view(a["dweight"], acc, blocks), self.view(a["dbias"], acc, blocks), self.view(a["coef"], acc, 3 * c_)
        for c in range(blocks):
            s = self._slots(a, c)
            dg, dbeta, av = part[p + s].sum() * inv[c], part[s].sum(), w[c] * inv[c]
            dw[c], db[c] = dg, dbeta
            coef[c], coef[c_ + c], coef[2 * c_ + c] = av, -av * inv[c] * dg / count, -av * dbeta / count

    def bn_backward_dx(self, a, t, acc, slot, chan):
        x, dy = self.gather(a["x"], t), self.gather(a["dy"], t)
        c_ = int(a["C"])                                    # coef: 3 arrays of C (the plane stride, or C)
        mu, coef = self._vector(a["mean"], acc, int(chan.max()) + 1, 0), self._vector(a["coef"], acc, 3 * c_, 0)
        self.store(a["dx"], t, coef[chan] * dy + coef[c_ + chan] * (x - mu[chan]) + coef[2 * c_ + chan], self.at)


@pytest.mark.parametrize("shape,channels_last,dtype,aligned", [
    ((6, 3, 32, 64), False, "float32", True), ((3, 2, 100, 100), False, "float16", True),
    ((5, 3, 33, 17), False, "float64", True), ((40, 3), False, "bfloat16", True), ((4, 5, 6, 7), True, "float32", True),
    ((2, 2049), False, "float32", True), ((9, 70, 3, 3), True, "bfloat16", True), ((4, 5, 2, 3, 3), False, "float16", True),
    ((6, 3, 32, 64), False, "float32", False), ((7, 3, 5), False, "float64", False), ((300, 2, 1), False, "float32", True)])
def test_launchers_end_to_end_on_an_emulated_device(monkeypatch, shape, channels_last, dtype, aligned):
    torch = pytest.importorskip("torch")
    device = _EmulatedDevice()
    monkeypatch.setattr(cuda, "_launch", device.launch)
    monkeypatch.setattr(cuda, "_ready", lambda dev, names: None)
    rng = np.random.default_rng(sum(shape))
    x64, dy64 = rng.normal(3.0, 2.0, size=shape), rng.normal(size=shape)
    g64, b64 = rng.uniform(0.5, 1.5, shape[1]), rng.normal(size=shape[1])
    tdtype = getattr(torch, dtype)
    x64 = torch.from_numpy(x64).to(tdtype).double().numpy()           # the values storage can hold
    dy64 = torch.from_numpy(dy64).to(tdtype).double().numpy()
    n, c, l = shape[0], shape[1], math.prod(shape[2:])
    if channels_last:
        to_kernel = lambda a: np.moveaxis(a, 1, -1).reshape(-1)                      # (N, *spatial, C)
        from_kernel = lambda v: np.moveaxis(v.reshape((n,) + shape[2:] + (c,)), -1, 1)
        rows, length = n * l, 1
    else:
        to_kernel, from_kernel, rows, length = (lambda a: a.reshape(-1)), (lambda v: v.reshape(shape)), n, l
    pl = cuda.plan(rows, c, length, dtype, aligned, 2)
    t = cuda._TYPES[dtype]
    size = x64.size * cuda._ITEMSIZE[dtype]
    accb = 8 if dtype == "float64" else 4
    X, DY, Y, DX = (device.alloc(size) for _ in range(4))
    M, V, I, G, B, DW, DB, RM, RV = (device.alloc(c * accb) for _ in range(9))
    CNT = device.alloc(8)
    WS = device.alloc(pl.workspace_values * 8)
    device.store(X, t, to_kernel(x64))
    device.store(DY, t, to_kernel(dy64))
    acc = np.float64 if dtype == "float64" else np.float32
    device.view(G, acc, c)[:], device.view(B, acc, c)[:] = g64, b64
    cuda._run_forward(0, pl, dtype, X, Y, M, V, I, G, B, 1e-5, WS)
    cuda._run_backward(0, pl, dtype, DY, X, DX, M, I, G, DW, DB, WS)
    yr, cr = F.portable_batch_norm_forward(x64, g64, b64)
    dxr, dgr, dbr = F.portable_batch_norm_backward(dy64, cr)
    tol = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    y, dx = from_kernel(device.load(Y, t, x64.size)), from_kernel(device.load(DX, t, x64.size))
    assert np.abs(y - yr).max() <= tol * np.abs(yr).max()
    assert np.abs(dx - dxr).max() <= tol * np.abs(g64).max() * cr.inv_std.max() * np.abs(dy64).max()
    np.testing.assert_allclose(device.load(M, "double" if acc is np.float64 else "float", c), cr.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(device.view(DW, acc, c), dgr, rtol=1e-4, atol=1e-4 * np.abs(dgr).max())
    np.testing.assert_allclose(device.view(DB, acc, c), dbr, rtol=1e-4, atol=1e-4 * np.abs(dbr).max())
    count = x64.size // c
    for momentum, batches in ((0.1, 0), (None, 4)):          # the running statistics, updated by the forward
        rm0, rv0 = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
        device.view(RM, acc, c)[:], device.view(RV, acc, c)[:] = rm0, rv0
        device.view(CNT, np.int64, 1)[0] = batches
        cuda._run_forward(0, pl, dtype, X, Y, M, V, I, G, B, 1e-5, WS, running=(RM, RV, momentum, CNT))
        assert device.view(CNT, np.int64, 1)[0] == batches + 1
        f = 1.0 / (batches + 1) if momentum is None else momentum
        np.testing.assert_allclose(device.view(RM, acc, c), (1 - f) * rm0 + f * cr.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(device.view(RV, acc, c), (1 - f) * rv0 + f * cr.var * count / (count - 1),
                                   rtol=1e-5, atol=1e-5)
    device.view(RM, acc, c)[:], device.view(RV, acc, c)[:] = cr.mean, cr.var                 # eval with these
    cuda._run_apply(0, pl, dtype, X, Y, RM, RV, G, B, 1e-5, from_var=True)
    assert np.abs(from_kernel(device.load(Y, t, x64.size)) - yr).max() <= tol * np.abs(yr).max()


@pytest.mark.parametrize("shape,channels_last,dtype,param", [
    ((6, 3, 32, 64), False, "float32", "float32"), ((6, 3, 32, 64), True, "bfloat16", "float32"),
    ((5, 3, 33, 17), True, "float16", "float16"), ((40, 3), False, "float64", "float64"),
    ((4, 5, 6, 7), False, "bfloat16", None), ((3, 4, 5), False, "float32", "float32"),
    ((1, 255, 33), False, "float16", "float32")])        # (the last: small planes, walked as planes)
def test_torch_interface_end_to_end_on_an_emulated_device(monkeypatch, shape, channels_last, dtype, param):
    """forward_torch, backward_torch and inference_torch with CPU tensors standing in for CUDA ones
    (the CUDA check, stream, SM count and launches replaced by the emulated device): layouts, output
    allocation and memory format, parameter dtypes, and results against float64 torch."""
    torch = pytest.importorskip("torch")
    _emulated_torch_device(monkeypatch)
    gen = torch.Generator().manual_seed(sum(shape))
    tdtype = getattr(torch, dtype)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(tdtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(tdtype)      # contiguous even when x is not
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = None if param is None else (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).to(getattr(torch, param))
    b = None if param is None else torch.randn(shape[1], generator=gen, dtype=torch.float64).to(getattr(torch, param))
    y, mean, var, inv_std = cuda.forward_torch(x, w, b, 1e-5)
    dx, dw, db = cuda.backward_torch(dy, x, mean, inv_std, w)
    acc = torch.float64 if dtype == "float64" else torch.float32
    assert y.dtype == dx.dtype == x.dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert mean.dtype == var.dtype == inv_std.dtype == dw.dtype == db.dtype == acc
    x64 = x.double().requires_grad_()
    w64 = None if w is None else w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    ref = torch.nn.functional.batch_norm(x64, None, None, w64, b64, training=True, eps=1e-5)
    ref.backward(dy.double())
    tol = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (dx.double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(var.double(), x.double().var(dims, unbiased=False), rtol=1e-4, atol=1e-6)
    if w is not None:
        torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(db.double(), b64.grad, rtol=1e-4, atol=1e-4)
    y_eval = cuda.inference_torch(x, mean, var, w, b, 1e-5)
    assert y_eval.stride() == x.stride() and (y_eval.double() - ref).abs().max() <= tol * ref.abs().max()


def _emulated_torch_device(monkeypatch):
    """The emulated device behind forward_torch/backward_torch/inference_torch, CPU tensors standing
    in for CUDA ones."""
    device = _EmulatedDevice()
    monkeypatch.setattr(cuda, "_launch", device.launch)
    monkeypatch.setattr(cuda, "_ready", lambda dev, names: None)
    monkeypatch.setattr(cuda, "_check_cuda_tensor", lambda x, name: None)
    monkeypatch.setattr(cuda, "_torch_stream", lambda d: 0)
    monkeypatch.setattr(cuda, "_sm_count", lambda d: 2)
    monkeypatch.setattr(cuda, "_thread", threading.local())      # no cached workspace or argument buffer
    monkeypatch.setattr(cuda, "_require_cupy", lambda: None)      # no CuPy needed: nothing reaches it
    return device


@pytest.mark.parametrize("dims", [2, 3, 4, 5])
def test_nn_layers_give_torchs_layouts_on_an_emulated_device(monkeypatch, dims):
    """bnlib.nn's layers on the CUDA route (forward_torch, backward_torch, inference_torch on the emulated
    device) give y and dx the values and strides torch.nn's give, for every input layout: among them the
    (N, C, L) view of an (N, L, C) tensor, walked as channels-last columns but returned C-contiguous."""
    torch = pytest.importorskip("torch")
    from bnlib import nn as bnn
    from reference import check_layouts_like_torch
    _emulated_torch_device(monkeypatch)
    monkeypatch.setattr(bnn, "_torch_kernels", lambda x: True)
    ours = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}[dims]
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[dims]
    check_layouts_like_torch(lambda: ours(3), lambda: theirs(3), (4, 3, 5, 2, 3)[:dims], dtype=torch.float32, tol=1e-5)


def test_a_large_plane_of_odd_length_is_walked_as_planes_with_little_scratch():
    """A plane of 4 KB or more whose length is not a multiple of the vector is walked as planes, one value
    per load, not as columns: as columns each row of the view would be C * H * W values wide, and the
    partial results (the workspace) larger than the tensor itself."""
    for rows, c, l, dtype in [(1, 3, 999 * 999, "float32"), (8, 64, 150 * 150, "float16"), (2, 32, 225 * 225, "float32")]:
        pl = cuda.plan(rows, c, l, dtype, True, 132)
        assert pl.walk == "planes" and pl.vec == 1
        assert pl.workspace_values * 8 < 0.01 * rows * c * l * cuda._ITEMSIZE[dtype]


def test_without_cupy_the_torch_route_says_how_to_install_it(monkeypatch):
    """A CUDA build of torch without CuPy: forward_torch, backward_torch, inference_torch and bnlib.nn's
    layers on the CUDA route raise an ImportError naming the package extras, before anything runs."""
    torch = pytest.importorskip("torch")
    from bnlib import nn as bnn
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` raises ImportError
    monkeypatch.setattr(cuda, "_check_cuda_tensor", lambda x, name: None)
    monkeypatch.setattr(bnn, "_torch_kernels", lambda x: True)
    x, v, layer = torch.randn(4, 3, 5, 5), torch.ones(3), bnn.BatchNorm2d(3)
    calls = [lambda: cuda.forward_torch(x), lambda: cuda.backward_torch(x, x, v, v),
             lambda: cuda.inference_torch(x, v, v), lambda: layer(x), lambda: bnn.BatchNorm2d(3).eval()(x)]
    for call in calls:
        with pytest.raises(ImportError, match=r"pip install cupy-cuda12x \(CUDA 12\) or cupy-cuda13x"):
            call()
    assert int(layer.num_batches_tracked) == 0 and not layer.running_mean.any()    # nothing changed


def test_workspace_bytes_counts_the_buffers_of_every_live_thread(monkeypatch):
    """workspace_bytes() (every buffer held, for a memory report) sums every live thread's buffers: torch runs the
    backward of CUDA tensors on a thread of its own. A thread's buffers go when the thread ends."""
    import gc
    import weakref
    monkeypatch.setattr(cuda, "_thread", threading.local())
    monkeypatch.setattr(cuda, "_workspace_caches", weakref.WeakValueDictionary())
    allocate = lambda nbytes: (bytearray(8), 4096)            # (buffer object, address)
    cuda._workspace("torch", 0, 0, 10, allocate)               # this thread: the 1 MB minimum
    ready, finish = threading.Event(), threading.Event()

    def other():
        cuda._workspace("torch", 0, 0, 3 << 20, allocate)
        ready.set()
        finish.wait(60)

    worker = threading.Thread(target=other)
    worker.start()
    assert ready.wait(60)
    assert cuda.workspace_bytes() == (1 << 20) + (3 << 20)
    finish.set()
    worker.join()
    gc.collect()
    assert cuda.workspace_bytes() == 1 << 20


def test_requested_workspace_counts_each_calls_own_scratch_per_thread_not_the_cached_buffer(monkeypatch):
    """bench_gpu's memory column adds the scratch a case's step asks for, counted by _requested_workspace: per
    host thread and buffer, the largest request inside the block. The buffer a thread keeps is the largest any
    earlier call needed (workspace_bytes()), which would charge a small case with a large one's scratch. The
    backward on another thread (as torch's autograd thread) is a buffer of its own. The emulated device."""
    torch = pytest.importorskip("torch")
    _emulated_torch_device(monkeypatch)
    monkeypatch.setattr(cuda, "_sm_count", lambda dev: 132)
    import weakref
    monkeypatch.setattr(cuda, "_workspace_caches", weakref.WeakValueDictionary())
    small, large = torch.randn(4, 3, 5, 6), torch.randn(1000, 2000)          # scratch: the 1 MiB minimum, 3 MB
    cuda.forward_torch(large, None, None, 1e-5)                               # this thread now keeps 3 MB
    kept = cuda.workspace_bytes()
    assert kept > cuda._MIN_WORKSPACE
    with cuda._requested_workspace() as requested:
        _, mean, _, inv_std = cuda.forward_torch(small, None, None, 1e-5)
        done = []
        worker = threading.Thread(target=lambda: done.append(cuda.backward_torch(torch.randn_like(small), small,
                                                                                 mean, inv_std, None)))
        worker.start()
        worker.join(60)
        assert done
    assert sorted(requested.values()) == [cuda._MIN_WORKSPACE] * 2            # not the 3 MB kept from before
    assert len({key[0] for key in requested}) == 2 and threading.get_ident() in {key[0] for key in requested}
    assert {key[1:] for key in requested} == {("torch", small.device.index, 0, False)}
    with cuda._requested_workspace() as requested:                           # a large call counts what it needs
        cuda.forward_torch(large, None, None, 1e-5)
    assert list(requested.values()) == [kept]
    with pytest.raises(RuntimeError, match="already counting"), cuda._requested_workspace():
        with cuda._requested_workspace():
            pass
    assert cuda._workspace_requests is None                                   # reset after the error too


def test_a_captured_call_gets_a_workspace_no_eager_call_uses_and_never_gives_it_back(monkeypatch):
    """While torch captures a CUDA graph (_capturing), forward_torch's scratch buffer is not the one eager calls on
    the same stream use, so that eager calls never write where a replay of the graph does; a captured buffer
    that a larger capture outgrows is kept alive (_captured_workspaces), not given back to the allocator, since
    the first graph's replays still use its address. The emulated device: capture is only pretended."""
    import gc
    import weakref
    torch = pytest.importorskip("torch")
    _emulated_torch_device(monkeypatch)
    monkeypatch.setattr(cuda, "_thread", threading.local())
    monkeypatch.setattr(cuda, "_captured_workspaces", [])
    capturing = [False]
    monkeypatch.setattr(cuda, "_capturing", lambda device: capturing[0])
    monkeypatch.setattr(cuda, "_sm_count", lambda dev: 132)
    small, large = torch.randn(4, 3, 5, 6), torch.randn(1000, 2000)          # scratch: the 1 MiB minimum, 3 MB
    assert cuda.plan(1000, 2000, 1, "float32", True, 132).workspace_values * 8 > cuda._MIN_WORKSPACE
    cuda.forward_torch(small, None, None, 1e-5)
    eager = {k: v for k, v in cuda._thread.workspaces.items()}
    capturing[0] = True
    cuda.forward_torch(small, None, None, 1e-5)
    captured = {k: v for k, v in cuda._thread.workspaces.items() if k not in eager}
    assert len(captured) == 1 and next(iter(captured))[3] is True
    assert next(iter(captured.values()))[2] != next(iter(eager.values()))[2]   # another address
    first = weakref.ref(next(iter(captured.values()))[0])
    cuda.forward_torch(large, None, None, 1e-5)                               # outgrows the captured buffer
    gc.collect()
    assert first() is not None and cuda._captured_workspaces[0][0] is first()  # kept, not given back
    capturing[0] = False
    cuda.forward_torch(small, None, None, 1e-5)                               # eager again: the eager buffer
    assert {k: v[2] for k, v in cuda._thread.workspaces.items() if not k[3]} == {k: v[2] for k, v in eager.items()}
    assert len(cuda._captured_workspaces) == 2                                # both captured buffers, held
    assert cuda.workspace_bytes() == next(iter(eager.values()))[1] + sum(e[1] for e in cuda._captured_workspaces)
    eager_buffer = weakref.ref(next(iter(eager.values()))[0])
    eager.clear()                                                             # (this test's own references)
    cuda.forward_torch(large, None, None, 1e-5)                               # an eager buffer outgrown: given back
    gc.collect()
    assert eager_buffer() is None


def test_two_host_threads_on_one_stream_have_their_own_workspace(monkeypatch):
    """Two threads call forward_torch on the same stream and their launches interleave (both stats kernels
    before either finalize): each call still gets its own input's statistics, because each thread keeps
    its own scratch buffer. With one buffer per stream the first finalize merged the other call's partials."""
    torch = pytest.importorskip("torch")
    device = _emulated_torch_device(monkeypatch)
    barrier, launch = threading.Barrier(2, timeout=60), device.launch

    def interleaved(dev, name, grid, block, args, stream=None):
        launch(dev, name, grid, block, args, stream)
        if name.startswith("bn_stats_") and not name.startswith("bn_stats_finalize"):
            barrier.wait()                      # the other thread's stats kernel runs before this finalize

    monkeypatch.setattr(cuda, "_launch", interleaved)
    xs = [torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(s)) * (s + 1) + 10 * s for s in range(2)]
    results = [None, None]

    def call(i):
        try:
            results[i] = cuda.forward_torch(xs[i], None, None, 1e-5)
        except BaseException as exc:            # re-raised below, in the test's thread
            results[i] = exc
            barrier.abort()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, result in zip(xs, results):
        if isinstance(result, BaseException):
            raise result
        _, mean, var, _ = result
        torch.testing.assert_close(mean, x.mean((0, 2, 3)))
        torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))


@pytest.mark.parametrize("dtype,channels_last", [("float32", False), ("bfloat16", True), ("float64", False),
                                                 ("float16", True)])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
def test_forward_torch_updates_running_statistics_as_torch_does(monkeypatch, dtype, channels_last, momentum):
    """forward_torch(..., running_mean, running_var, momentum, num_batches_tracked) on the emulated
    device, three batches, against torch.nn.functional.batch_norm's own update in float64 (momentum
    None: torch.nn.BatchNorm's cumulative average, 1 / num_batches_tracked after the count)."""
    torch = pytest.importorskip("torch")
    _emulated_torch_device(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    acc = torch.float64 if dtype == "float64" else torch.float32
    rm, rv = torch.randn(5, generator=gen, dtype=acc), torch.rand(5, generator=gen, dtype=acc) + 0.5
    nbt = torch.tensor(2, dtype=torch.int64)
    rm64, rv64, n = rm.double(), rv.double(), 2
    for step in range(3):
        x = (torch.randn(6, 5, 4, 3, generator=gen, dtype=torch.float64) * 3 + 2).to(getattr(torch, dtype))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        versions = rm._version, rv._version, nbt._version
        y, mean, var, inv_std = cuda.forward_torch(x, None, None, 1e-5, running_mean=rm, running_var=rv,
                                                   momentum=momentum, num_batches_tracked=nbt)
        n += 1
        f = 1.0 / n if momentum is None else momentum
        torch.nn.functional.batch_norm(x.double(), rm64, rv64, training=True, momentum=f, eps=1e-5)
        assert int(nbt) == n and rm.dtype == rv.dtype == acc
        tol = 1e-12 if dtype == "float64" else 1e-5
        torch.testing.assert_close(rm.double(), rm64, rtol=tol, atol=tol)
        torch.testing.assert_close(rv.double(), rv64, rtol=tol, atol=tol)
        assert rm._version > versions[0] and rv._version > versions[1] and nbt._version > versions[2]


# ------------------------------------------------------------------ channel chunks for the L2 cache
@pytest.mark.parametrize("rows,channels,length,dtype,aligned,chunk_bytes", [
    (3, 7, 1024, "float32", True, 30_000), (2, 5, 1155, "float32", True, 20_000), (4, 9, 2048, "float16", True, 70_000),
    (2, 3, 1030, "float64", False, 1), (3, 64, 2048, "bfloat16", True, 200_000), (2, 64, 1024, "float32", True, 81_920)])
def test_channel_chunks_read_every_value_once_and_finalize_finds_every_partial(rows, channels, length, dtype, aligned,
                                                                                chunk_bytes):
    """A chunked plan: as few chunks of consecutive channels as the byte budget allows (each within it, or
    one channel), their sizes within one of each other, whose replayed walks together read every value
    of the tensor once; each chunk's finalize finds exactly its own channels' slots, and the workspace
    holds the largest chunk's partials."""
    pl = cuda.plan(rows, channels, length, dtype, aligned, 2, chunk_bytes)
    whole = cuda.plan(rows, channels, length, dtype, aligned, 2)
    per_channel = rows * length * cuda._ITEMSIZE[dtype]
    assert pl.walk == "planes" and len(pl.chunks) == -(-channels // max(1, chunk_bytes // per_channel))
    sizes = [sp.channels for _, sp in pl.chunks]
    assert [c0 for c0, _ in pl.chunks] == list(np.cumsum([0] + sizes[:-1]))
    assert sum(sizes) == channels and max(sizes) - min(sizes) <= 1
    assert all(k * per_channel <= chunk_bytes or k == 1 for k in sizes)
    assert pl._replace(chunks=(), workspace_values=whole.workspace_values) == whole    # the rest: the whole's
    total = rows * channels * length
    seen = np.zeros(total, np.int64)
    for c0, sp in pl.chunks:
        assert sp.walk_args[1] == channels and sp.vec == whole.vec and not sp.chunks    # planes C apart
        part_seen, slot_channel, slot_of = _replay(sp, total, c0 * length)
        seen += part_seen
        channel_of = (np.arange(total) // length) % channels - c0
        assert all(len(chs) == 1 for chs in slot_channel.values())
        _assert_finalize_finds_each_channels_slots(sp, slot_channel, slot_of, channel_of)
        assert max(slot_channel) < sp.partials and 3 * sp.partials + 3 * channels <= pl.workspace_values
    assert (seen == 1).all(), "a value read twice or never"


def _unset_chunk_environment(monkeypatch, value=None):
    """L2_CHUNK_BYTES left to the environment (its default), the cached reading cleared; value sets
    BNLIB_L2_CHUNK_MB (None: unset)."""
    monkeypatch.setattr(cuda, "L2_CHUNK_BYTES", None)
    monkeypatch.setattr(cuda, "_environment_chunk_bytes", None)
    if value is None:
        monkeypatch.delenv("BNLIB_L2_CHUNK_MB", raising=False)
    else:
        monkeypatch.setenv("BNLIB_L2_CHUNK_MB", value)


def test_channel_chunks_only_where_they_can_help(monkeypatch):
    """Off by default; no chunks without a budget, for a tensor within it, or for a columns walk (whose
    kernels walk whole rows); on the largest benchmark shape every chunk still fills a card's 132 SMs
    with 8 blocks each."""
    _unset_chunk_environment(monkeypatch)
    assert cuda._chunk_bytes(2) == cuda._chunk_bytes(3) == 0
    assert not cuda.plan(256, 64, 3136, "float32", True, 132).chunks
    assert not cuda.plan(256, 64, 3136, "float32", True, 132, 256 * 64 * 3136 * 4).chunks
    assert len(cuda.plan(256, 64, 3136, "float32", True, 132, 256 * 64 * 3136 * 4 - 1).chunks) == 2
    assert not cuda.plan(256 * 3136, 64, 1, "float32", True, 132, 1 << 20).chunks          # channels-last
    assert not cuda.plan(256, 256, 196, "float32", True, 132, 1 << 20).chunks              # small planes
    pl = cuda.plan(256, 64, 3136, "float32", True, 132, 16 << 20)
    assert len(pl.chunks) == 13 and min(math.prod(sp.grid) for _, sp in pl.chunks) >= 132 * 8


@pytest.mark.parametrize("value,expected", [("0", 0), ("16", 16 << 20), ("0.5", 1 << 19), ("-1", None),
                                            ("big", None), ("nan", None), ("inf", None), ("16MB", None)])
def test_l2_chunk_size_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("BNLIB_L2_CHUNK_MB", value)
    if expected is None:
        with pytest.raises(ValueError, match=f"BNLIB_L2_CHUNK_MB must be a number of MiB >= 0 .*got '{value}'"):
            cuda._chunk_bytes_from_environment()
    else:
        assert cuda._chunk_bytes_from_environment() == expected


def test_the_environment_sets_the_working_set_at_the_first_call_and_a_bad_value_changes_nothing(monkeypatch):
    """BNLIB_L2_CHUNK_MB is read at the first training call (importing bnlib never fails on it), as a
    working set: the forward's chunks hold half of it of x, the backward's a third; L2_CHUNK_BYTES, when
    set, wins, and must be a number of bytes. A value that is not a size raises a ValueError naming the
    variable before any launch, the running statistics unchanged."""
    torch = pytest.importorskip("torch")
    _unset_chunk_environment(monkeypatch, "24")
    assert (cuda._chunk_bytes(2), cuda._chunk_bytes(3)) == (12 << 20, (24 << 20) // 3)
    monkeypatch.setenv("BNLIB_L2_CHUNK_MB", "48")                   # read once: later changes are not seen
    assert cuda._chunk_bytes(2) == 12 << 20
    monkeypatch.setattr(cuda, "L2_CHUNK_BYTES", 6 << 20)             # the module variable wins
    assert cuda._chunk_bytes(3) == 2 << 20
    monkeypatch.setattr(cuda, "L2_CHUNK_BYTES", 6e6)                 # any real number of bytes
    assert cuda._chunk_bytes(2) == 3_000_000
    for bad in (-1, float("inf"), "16", True):
        monkeypatch.setattr(cuda, "L2_CHUNK_BYTES", bad)
        with pytest.raises(ValueError, match="L2_CHUNK_BYTES must be None or a number of bytes >= 0, got"):
            cuda._chunk_bytes(2)
    device = _emulated_torch_device(monkeypatch)
    launched = []
    monkeypatch.setattr(cuda, "_launch", lambda *a, **k: launched.append(a[1]) or device.launch(*a, **k))
    _unset_chunk_environment(monkeypatch, "16MB")
    x, rm, rv, nbt = torch.randn(4, 3, 32, 32), torch.zeros(3), torch.ones(3), torch.tensor(2)
    with pytest.raises(ValueError, match="BNLIB_L2_CHUNK_MB must be a number of MiB >= 0 .*got '16MB'"):
        cuda.forward_torch(x, None, None, 1e-5, running_mean=rm, running_var=rv, momentum=None, num_batches_tracked=nbt)
    assert not launched and (rm == 0).all() and (rv == 1).all() and int(nbt) == 2


@pytest.mark.parametrize("shape,dtype,channels_last", [
    ((3, 7, 32, 32), "float32", False), ((2, 5, 33, 35), "float64", False), ((4, 6, 64, 32), "bfloat16", False),
    ((3, 5, 32, 64), "float32", True)])
def test_channel_chunks_end_to_end_on_an_emulated_device(monkeypatch, shape, dtype, channels_last):
    """forward_torch and backward_torch with a working set of 4.5 channels' x: forward chunks of 1 or 2
    channels (x and y), backward chunks of 1 (x, dy and dx). Each chunk's 3 launches in turn, its
    addresses c0 planes in, the backward's chunks from the last channels; the batch counted once; the same results as without chunks: outputs,
    statistics, gradients and running statistics. Channels-last memory keeps one chunk."""
    torch = pytest.importorskip("torch")
    device = _emulated_torch_device(monkeypatch)
    launched = []
    monkeypatch.setattr(cuda, "_launch", lambda *a, **k: launched.append((a[1], a[4])) or device.launch(*a, **k))
    gen = torch.Generator().manual_seed(sum(shape))
    tdtype = getattr(torch, dtype)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(tdtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(tdtype)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    acc = torch.float64 if dtype == "float64" else torch.float32
    c, length = shape[1], math.prod(shape[2:])
    per_channel = shape[0] * length * cuda._ITEMSIZE[dtype]
    w, b = torch.rand(c, generator=gen, dtype=acc) + 0.5, torch.randn(c, generator=gen, dtype=acc)
    results = {}
    for budget in (0, int(4.5 * per_channel)):
        monkeypatch.setattr(cuda, "L2_CHUNK_BYTES", budget)
        rm, rv, nbt = torch.zeros(c, dtype=acc), torch.ones(c, dtype=acc), torch.tensor(4)
        launched.clear()
        y, mean, var, inv_std = cuda.forward_torch(x, w, b, 1e-5, running_mean=rm, running_var=rv, momentum=None,
                                                   num_batches_tracked=nbt)
        dx, dw, db = cuda.backward_torch(dy, x, mean, inv_std, w)
        results[budget] = (y, mean, var, inv_std, dx, dw, db, rm, rv)
        assert int(nbt) == 5
        rows, length_ = (shape[0], length) if not channels_last else (x.numel() // c, 1)
        fwd, bwd = (cuda._pieces(cuda.plan(rows, c, length_, dtype, True, 2, budget // a)) for a in (2, 3))
        kinds = [name.split("<")[0].split("_", 1)[1].rsplit("_", 1)[0] if "finalize" not in name else "finalize"
                 for name, _ in launched]
        assert kinds == ["stats", "finalize", "apply"] * len(fwd) + ["backward_reduce", "finalize", "backward_dx"] * len(bwd)
        firsts = [args[0] for name, args in launched if "bn_stats_" in name and "finalize" not in name]
        assert firsts == [x.data_ptr() + c0 * length_ * x.element_size() for c0, _ in fwd]     # x of each chunk
        firsts = [args[1] for name, args in launched if "backward_reduce" in name]
        assert firsts == [x.data_ptr() + c0 * length_ * x.element_size() for c0, _ in reversed(bwd)]
        if budget and not channels_last:
            assert len(fwd) == -(-c // 2) and max(sp.channels for _, sp in fwd) == 2 and len(bwd) == c
        if channels_last:
            assert len(fwd) == len(bwd) == 1
    tol = {"bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    for got, want in zip(results[int(4.5 * per_channel)], results[0]):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_forward_torch_rejects_bad_running_statistics_and_changes_nothing(monkeypatch):
    torch = pytest.importorskip("torch")
    device = _emulated_torch_device(monkeypatch)
    launched = []
    monkeypatch.setattr(cuda, "_launch", lambda *a, **k: launched.append(a[1]) or device.launch(*a, **k))
    x = torch.randn(4, 3, 5)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(7)
    shared = torch.zeros(4)                              # two overlapping views of one buffer
    cases = [
        (dict(running_mean=rm.double(), running_var=rv), TypeError, "running_mean must be a contiguous torch.float32"),
        (dict(running_mean=rm, running_var=torch.ones(4)), TypeError, "running_var must be a contiguous"),
        (dict(running_mean=rm, running_var=torch.ones(6)[::2]), TypeError, "running_var must be a contiguous"),
        (dict(running_mean=rm, running_var=[1.0, 1.0, 1.0]), TypeError, "running_var must be a torch.Tensor"),
        (dict(running_mean=rm, running_var=None), TypeError, "running_var must be a torch.Tensor"),
        (dict(running_mean=rm, running_var=rm), ValueError, "must not share memory"),
        (dict(running_mean=shared[:3], running_var=shared[1:]), ValueError, "must not share memory"),
        (dict(num_batches_tracked=nbt), ValueError, "num_batches_tracked is counted only with"),
        (dict(running_mean=rm, running_var=rv, momentum=None), ValueError, "momentum=None .* needs num_batches"),
        (dict(running_mean=rm, running_var=rv, momentum=1.5), ValueError, "momentum must be a number in \\[0, 1\\]"),
        (dict(running_mean=rm, running_var=rv, num_batches_tracked=torch.tensor(7.0)), TypeError,
         "num_batches_tracked must be an int64 tensor"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            cuda.forward_torch(x, None, None, 1e-5, **kwargs)
    assert launched == [] and (rm == 0).all() and (rv == 1).all() and int(nbt) == 7


def test_torch_calls_refuse_before_any_launch_and_pack_any_eps(monkeypatch):
    """eps that is not a finite number >= 0, one value per channel in training (torch refuses it too) and
    an integer or bool weight each raise before any launch, the buffers untouched. An eps above float32's
    largest value is taken as torch takes it, inf in float32 arithmetic (y = bias): it used to fail to
    pack at the finalize, after the stats kernel had counted the batch. Every launch's arguments are
    packed here as the driver path packs them (the emulated device itself does not pack)."""
    torch = pytest.importorskip("torch")
    device = _emulated_torch_device(monkeypatch)
    launched = []

    def launch(dev, name, grid, block, args, stream=None):
        cuda.pack_arguments(name, args)                  # raises for what cuLaunchKernel could not be given
        launched.append(name)
        device.launch(dev, name, grid, block, args, stream)
    monkeypatch.setattr(cuda, "_launch", launch)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(7)
    running = dict(running_mean=rm, running_var=rv, num_batches_tracked=nbt)
    x, b = torch.randn(4, 3, 5), torch.randn(3)
    for eps in (float("nan"), float("inf"), -1e-5, "1e-5", None, True):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            cuda.forward_torch(x, None, None, eps, **running)
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            cuda.inference_torch(x, rm, rv, None, None, eps)
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got x of shape \(1, 3\)"):
        cuda.forward_torch(torch.randn(1, 3), None, None, 1e-5, **running)
    for bad in (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
            cuda.forward_torch(x, bad, None, 1e-5, **running)
    assert launched == [] and (rm == 0).all() and (rv == 1).all() and int(nbt) == 7
    y, _, var, inv_std = cuda.forward_torch(x, None, b, 1e39, **running)
    assert int(nbt) == 8 and (inv_std == 0).all()
    torch.testing.assert_close(y, b.reshape(1, 3, 1).expand_as(x))
    torch.testing.assert_close(cuda.inference_torch(x, rm, rv, None, b, 1e39), b.reshape(1, 3, 1).expand_as(x))
    double = cuda.forward_torch(x.double(), None, None, 1e39)[3]       # float64 arithmetic: a finite eps
    torch.testing.assert_close(double, torch.full((3,), 1e39 ** -0.5, dtype=torch.float64))


def test_columns_give_way_when_their_scratch_would_outweigh_the_tensor():
    """A wide tensor of few rows walked as columns needed scratch many times its size (96x, 192 MiB, for
    (1, 1023, 1023) float16, whose odd rows were folded 8 into one), and folds of 16-bit tensors of half
    a GiB passed the kernels' 32-bit row width. Past both _COLS_SCRATCH limits (8x the tensor and
    64 MiB) such a training walk is now planes (or, with no planes to walk, columns of one value per
    load); a row of 2**31 values or more takes planes in any walk, and raises where there are none.
    Common shapes, batch 1 included, keep their columns, and evaluation (no scratch) keeps them too."""
    ratio, floor = cuda._COLS_SCRATCH
    for (n, c, l), dtype in [((1, 1023, 1023), "float16"), ((2, 255, 1999), "float16"), ((4, 511, 1001), "float16"),
                             ((1, 89478487, 3), "float16"), ((2, 131201, 2047), "float16")]:
        cols = cuda._cols_plan(n, c, l, cuda._VEC[dtype], 16 * 132)
        pl = cuda.plan(n, c, l, dtype, True, 132)
        assert pl.walk == "planes" and pl.workspace_values < cols.workspace_values, (n, c, l, dtype)
        assert cols.workspace_values * 8 > max(ratio * n * c * l * cuda._ITEMSIZE[dtype], floor) \
            or cols.walk_args[2] >= 2 ** 31
    assert cuda.plan(1, 1023, 1023, "float16", True, 132, scratch=False).walk == "cols"
    assert cuda.plan(1, 89478487, 3, "float16", True, 132, scratch=False).walk == "planes"   # Wf past 2**31
    for (n, c, l), dtype in [((2, 511, 1001), "float32"), ((1, 2048, 49), "float32"), ((1, 2048, 784), "float16"),
                             ((32, 2048, 196), "float16")]:
        assert cuda.plan(n, c, l, dtype, True, 132).walk == "cols", (n, c, l, dtype)
    wide = cuda.plan(2, 4194305, 1, "float16", True, 132)         # (N, C): no planes, so unfolded columns
    assert wide.walk == "cols" and wide.vec == 1 and wide.walk_args[2] == 4194305
    assert 4 * wide.workspace_values < cuda._cols_plan(2, 4194305, 1, 8, 16 * 132).workspace_values
    with pytest.raises(ValueError, match=r"rows of 2147483648 values, beyond the 2\*\*31"):
        cuda.plan(1, 2 ** 31, 1, "float32", True, 132)


def test_driver_launch_passes_every_argument_at_its_kernel_parameter(monkeypatch):
    """bnlib.cuda._launch's "driver" path with a stand-in for CuPy: each launch of a training step and
    an eval forward reaches cuLaunchKernel with 3-D sizes, the stream, and a table whose k-th entry
    points at the k-th argument, read back here with the kernel's own parameter types; the device is
    switched (and restored) when another is current, and a context is made current once per thread
    and device. The "cupy" path hands CuPy the same arguments and the stream object."""
    import ctypes
    import types
    sigs = cuda.kernel_parameters()
    launches, events = [], []
    current = [1]

    class Device:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            events.append(("enter", self.d))
            self.prev, current[0] = current[0], self.d

        def __exit__(self, *exc):
            current[0] = self.prev
            events.append(("exit", self.d))

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        # the values the table points at now (the driver copies them during the launch)
        raw = [ctypes.string_at(ctypes.c_uint64.from_address(params + 8 * k).value, 8) for k in range(cuda._MAX_ARGS)]
        launches.append((f, (gx, gy, gz), (bx, by, bz), shared, stream, raw, extra, current[0]))

    class Function:
        def __init__(self, name):
            self.ptr, self.name = 1000 + len(cuda.kernel_names()) + hash(name) % 997, name

        def __call__(self, grid, block, args, stream=None):
            launches.append(("cupy", self.name, grid, block, args, stream))

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: current[0], memGetInfo=lambda: events.append("context")),
        driver=types.SimpleNamespace(launchKernel=launch_kernel), Device=Device,
        get_current_stream=lambda: types.SimpleNamespace(ptr=555),
        Stream=types.SimpleNamespace(null="null stream"), ExternalStream=lambda ptr, dev=None: ("external", ptr, dev))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    functions = {}

    class RawKernel:                 # as CuPy's: no .ptr of its own; .kernel is the Function that has one
        def __init__(self, name):
            self.kernel = functions.setdefault(name, Function(name))

    monkeypatch.setattr(cuda, "module", lambda device=None: types.SimpleNamespace(get_function=RawKernel))
    monkeypatch.setattr(cuda, "_functions", {})
    monkeypatch.setattr(cuda, "_streams", {})
    monkeypatch.setattr(cuda, "_thread", __import__("threading").local())
    monkeypatch.setattr(cuda, "LAUNCHER", "driver")
    import struct
    for dtype in ("float32", "float64", "bfloat16"):
        codes = {"ptr": "<Q", "int32": "<i", "int64": "<q", "acc": "<d" if dtype == "float64" else "<f"}
        for rows, c, l in [(256, 64, 3136), (300, 2, 1)]:
            pl = cuda.plan(rows, c, l, dtype, True, 132)
            sent = []
            record = lambda dev, name, grid, block, args, stream=None: (sent.append((name, args, stream)),
                                                                        real(dev, name, grid, block, args, stream))
            real = cuda._launch
            monkeypatch.setattr(cuda, "_launch", record)
            launches.clear()
            cuda._run_forward(0, pl, dtype, 256, 512, 768, 1024, 1280, 1536, 0, 1e-5, 4096, 4352,
                              running=(4608, 4864, None, 5120))
            cuda._run_backward(0, pl, dtype, 256, 512, 768, 1024, 1280, 0, 1536, 1792, 4096, None)
            cuda._run_apply(0, pl, dtype, 256, 512, 768, 1024, 0, 1280, 1e-3, from_var=True, stream=0)
            monkeypatch.setattr(cuda, "_launch", real)
            assert len(launches) == len(sent) == 7
            for (name, args, stream), (f, grid, block, shared, s, raw, extra, dev_then) in zip(sent, launches):
                kinds = sigs[name.split("<")[0]]
                assert f == functions[name].ptr and shared == 0 and extra == 0 and dev_then == 0
                assert s == (555 if stream is None else stream) and len(grid) == len(block) == 3
                for k, (a, kind) in enumerate(zip(args, kinds)):
                    got = struct.unpack_from(codes[kind], raw[k])[0]
                    assert got == (np.float32(a) if codes[kind] == "<f" else a), (name, k, kind, got, a)
    assert current == [1] and events.count("context") == 1                 # device 0 restored to 1
    assert events[0] == ("enter", 0) and events.count(("enter", 0)) == events.count(("exit", 0))
    monkeypatch.setattr(cuda, "LAUNCHER", "cupy")
    launches.clear()
    current[0] = 0
    pl = cuda.plan(8, 3, 1030, "float32", True, 2)
    cuda._run_apply(0, pl, "float32", 256, 512, 768, 1024, 0, 1280, 1e-3, from_var=True, stream=0)
    cuda._run_apply(0, pl, "float32", 256, 512, 768, 1024, 0, 1280, 1e-3, from_var=True, stream=77)
    assert [(l[0], l[5]) for l in launches] == [("cupy", "null stream"), ("cupy", ("external", 77, 0))]
    name = launches[0][1]                                          # CuPy gets NumPy scalars of the declared types
    kinds = sigs[name.split("<")[0]]
    want = {"ptr": np.uint64, "int32": np.int32, "int64": np.int64, "acc": np.float32}
    assert [type(a) for a in launches[0][4]] == [want[k] for k in kinds]
    assert [float(a) for a in launches[0][4]][:2] == [256, 512] and launches[0][4][-2] == np.float32(1e-3)
    monkeypatch.setattr(cuda, "LAUNCHER", "fast")
    with pytest.raises(ValueError, match="must be 'driver' or 'cupy', got 'fast'"):
        cuda._run_apply(0, pl, "float32", 256, 512, 768, 1024, 0, 1280, 1e-3, from_var=True, stream=0)


def test_pack_arguments_packs_at_the_declared_types_and_refuses_what_does_not_fit():
    name = "bn_apply_cols<float, 4>"       # ptr ptr int64 int64 int32 int32 int32 ptr ptr ptr ptr A int32
    args = (2 ** 63 + 5, 7, -2 ** 40, 3, -3, 4, 5, 8, 9, 10, 11, 0.1, 1)
    vals, table, addr = cuda.pack_arguments(name, args)
    assert int(table[0]) == vals.ctypes.data and addr == table.ctypes.data and (np.diff(table[:13]) == 8).all()
    assert int(vals[0]) == 2 ** 63 + 5 and vals.view(np.int64)[2] == -2 ** 40 and vals.view(np.int32)[8] == -3
    assert vals.view(np.float32)[22] == np.float32(0.1) and vals.view(np.int32)[24] == 1
    vals = cuda.pack_arguments("bn_apply_cols<double, 2>", args)[0]
    assert vals.view(np.float64)[11] == 0.1                           # A is double for double data
    assert cuda.pack_arguments(name, tuple(np.int64(a) if isinstance(a, int) and a < 2 ** 62 else a
                                           for a in args))[0].view(np.int32)[8] == -3    # NumPy integers pack too
    with pytest.raises(ValueError, match="bn_apply_cols<float, 4> takes 13 arguments, got 12"):
        cuda.pack_arguments(name, args[:-1])
    with pytest.raises(TypeError, match="int64 float 1.5"):
        cuda.pack_arguments(name, args[:2] + (1.5,) + args[3:])
    with pytest.raises(TypeError, match="ptr int -8"):
        cuda.pack_arguments(name, (-8,) + args[1:])
    with pytest.raises(TypeError, match="int32 int 2147483648"):
        cuda.pack_arguments(name, args[:4] + (2 ** 31,) + args[5:])
    with pytest.raises(TypeError, match="too large"):
        cuda.pack_arguments(name, args[:11] + (1e40,) + args[12:])
    with pytest.raises(ValueError, match="no kernel 'bn_nope'"):
        cuda.pack_arguments("bn_nope<float, 4>", args)
    typed = cuda._typed(name, args)                                   # CuPy's launcher: the same values, typed
    assert [type(t) for t in typed] == [np.uint64] * 2 + [np.int64] * 2 + [np.int32] * 3 + [np.uint64] * 4 + \
        [np.float32, np.int32]
    assert [int(t) for t in typed[:11]] == list(args[:11]) and typed[11] == np.float32(0.1)
    assert type(cuda._typed("bn_apply_cols<double, 2>", args)[11]) is np.float64
    with pytest.raises(ValueError, match="takes 13 arguments, got 5"):
        cuda._typed(name, args[:5])
    with pytest.raises(TypeError, match="int64 float 1.5"):
        cuda._typed(name, args[:2] + (1.5,) + args[3:])


def test_grids_fill_the_card_on_the_benchmark_shapes():
    for shape in [(256, 64, 56, 56), (256, 256, 14, 14), (64, 128, 28, 28), (32, 32, 112, 112), (128, 1024, 7, 7)]:
        n, c, l = shape[0], shape[1], math.prod(shape[2:])
        for dtype in ("float32", "float16", "bfloat16"):
            for rows, length in ((n, l), (n * l, 1)):          # NCHW and channels-last
                pl = cuda.plan(rows, c, length, dtype, True, 132)
                if pl.walk == "cols":                 # enough blocks, or already one row per thread
                    total, _, wf = (int(a) for a in pl.walk_args)
                    assert math.prod(pl.grid) >= 2 * 132 * 8 or pl.grid[1] == math.ceil(total / wf / cuda.TY)
                else:
                    assert math.prod(pl.grid) >= 2 * 132 * 8
                assert pl.vec == cuda._VEC[dtype]


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


def test_torch_functions_reject_cpu_tensors_clearly():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="x must be a CUDA torch.Tensor"):
        cuda.forward_torch(torch.ones(4, 3))
    with pytest.raises(TypeError, match="x must be a CUDA torch.Tensor"):
        cuda.inference_torch(torch.ones(4, 3), torch.zeros(3), torch.ones(3))


# ----------------------------------------------------------------------------- on a GPU: CuPy arrays
SHAPES = [(3, 1, 5, 7), (2, 1), (1000, 3), (7, 1024, 1, 1), (5, 3, 33, 17), (2, 2049), (9, 70, 3, 3), (4, 5, 2, 3, 3),
          (300, 2, 1), (16, 513), (6, 2, 32, 64), (3, 4, 40, 41)]


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


TOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-4, "float64": 1e-11}


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
    tol = TOL[dtype]
    scale = float(np.abs(g64).max() * cr.inv_std.max() * np.abs(dyr).max())
    assert np.abs(cupy.asnumpy(y).astype(np.float64) - yr).max() <= tol * max(1.0, np.abs(yr).max())
    assert np.abs(cupy.asnumpy(dx).astype(np.float64) - dxr).max() <= tol * scale
    assert np.abs(cupy.asnumpy(dg) - dgr).max() <= tol * np.abs(dgr).max()
    assert np.abs(cupy.asnumpy(db) - dbr).max() <= tol * np.abs(dbr).max()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, perm", [((0, 3), None), ((0, 3, 4, 5), None), ((0, 4, 5, 3), (0, 3, 1, 2))])
def test_empty_batch_launches_nothing(monkeypatch, shape, perm, dtype):
    """A zero-size CuPy batch, as torch: an empty y and dx (x's shape, dtype and layout), zero dgamma and
    dbeta, and no kernel launched (functional's CuPy route returns early); one value per channel raises."""
    import cupy

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel launched for an empty batch")
    monkeypatch.setattr(cuda, "_launch", no_launch)
    x = cupy.zeros(shape, dtype)
    x = x if perm is None else x.transpose(perm)
    gamma = cupy.ones(x.shape[1], "float32" if dtype == "float16" else dtype)
    y, cache = F.batch_norm_forward(x, gamma, cupy.zeros_like(gamma))
    dx, dgamma, dbeta = F.batch_norm_backward(cupy.zeros_like(x), cache)
    for a in (y, dx):
        assert isinstance(a, cupy.ndarray) and a.shape == x.shape and a.dtype == x.dtype
        assert (a.flags.c_contiguous, a.flags.f_contiguous) == (x.flags.c_contiguous, x.flags.f_contiguous)
    for g in (dgamma, dbeta):
        assert isinstance(g, cupy.ndarray) and g.shape == (x.shape[1],) and g.dtype == gamma.dtype
        assert int(cupy.count_nonzero(g)) == 0
    rm, rv = F.update_running_stats(cupy.zeros(3), cupy.ones(3), cache)
    assert int(cupy.count_nonzero(rm)) == 0 and bool((rv == 1).all())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(cupy.ones((1, 3), dtype))


@needs_gpu
def test_large_offset_float32_stays_accurate():
    import cupy
    x = cupy.asarray((1e4 + np.random.default_rng(0).normal(size=(4096, 3, 8, 8))).astype(np.float32))
    _, cache = F.batch_norm_forward(x)
    ref = cupy.asnumpy(x).astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(cupy.asnumpy(cache.var), ref, rtol=1e-3)


@needs_gpu
def test_unaligned_views_use_the_scalar_kernels():
    import cupy
    base = cupy.asarray(np.random.default_rng(1).normal(size=4 * 3 * 64 + 1).astype(np.float32))
    x = base[1:].reshape(4, 3, 64)                     # 4 bytes past an aligned address
    y, cache = F.batch_norm_forward(x)
    ref, _ = F.portable_batch_norm_forward(cupy.asnumpy(x).astype(np.float64))
    assert np.abs(cupy.asnumpy(y) - ref).max() < 1e-4


# ----------------------------------------------------------------------------- on a GPU: torch tensors
def _torch_case(shape, dtype, channels_last, seed, param_dtype="float32"):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=g, dtype=torch.float64)
    tdtype = getattr(torch, dtype)
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    xs = x.to("cuda", tdtype).contiguous(memory_format=fmt)
    dys = dy.to("cuda", tdtype).contiguous(memory_format=fmt)
    pdt = getattr(torch, param_dtype) if dtype != "float64" else torch.float64
    return xs, dys, w.to("cuda", pdt), b.to("cuda", pdt)


def _reference(xs, dys, w, b, eps=1e-5):
    """torch.nn.functional.batch_norm in float64 on the same (rounded) values: the reference."""
    import torch
    x64 = xs.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y = torch.nn.functional.batch_norm(x64, None, None, w64, b64, training=True, eps=eps)
    y.backward(dys.double())
    dims = [0] + list(range(2, xs.dim()))
    return y.detach(), x64.grad, w64.grad, b64.grad, x64.detach().mean(dims), x64.detach().var(dims, unbiased=False)


def _close(ours, ref, tol, scale=None):
    err = (ours.double() - ref).abs().max().item()
    return err <= tol * (scale if scale is not None else max(1.0, ref.abs().max().item()))


TORCH_SHAPES = [(3, 1, 5, 7), (2, 1), (1000, 3), (7, 1024, 1, 1), (5, 3, 33, 17), (2, 2049), (9, 70, 3, 3),
                (16, 513), (6, 2, 32, 64), (3, 4, 40, 41), (4, 5, 2, 3, 3), (64, 16, 28, 28),
                (16, 256, 32, 64)]     # the last: NCHW planes with more planes than block rows on a real card
                                       # (PlaneCursor crossing planes), as on the benchmark's largest shape


@needs_torch_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_torch_functions_match_float64_torch(shape, dtype, channels_last):
    import torch
    if channels_last and len(shape) != 4:
        pytest.skip("torch's channels_last is for 4-D tensors")
    xs, dys, w, b = _torch_case(shape, dtype, channels_last, seed=len(shape) * 1000 + shape[1])
    y, mean, var, inv_std = cuda.forward_torch(xs, w, b, 1e-5)
    dx, dw, db = cuda.backward_torch(dys, xs, mean, inv_std, w)
    yr, dxr, dwr, dbr, mr, vr = _reference(xs, dys, w, b)
    acc = torch.float64 if dtype == "float64" else torch.float32
    assert y.dtype == dx.dtype == xs.dtype and y.stride() == xs.stride() and dx.stride() == xs.stride()
    assert mean.dtype == var.dtype == inv_std.dtype == dw.dtype == db.dtype == acc
    tol = TOL[dtype]
    assert _close(y, yr, tol)
    assert _close(mean, mr, tol) and _close(var, vr, tol, scale=vr.abs().max().item())
    assert _close(inv_std, 1 / torch.sqrt(vr + 1e-5), tol, scale=(1 / torch.sqrt(vr + 1e-5)).max().item())
    scale = (w.double().abs().max() * (1 / torch.sqrt(vr + 1e-5)).max() * dys.double().abs().max()).item()
    assert _close(dx, dxr, tol, scale=scale)
    assert _close(dw, dwr, tol, scale=dwr.abs().max().item()) and _close(db, dbr, tol, scale=dbr.abs().max().item())


@needs_torch_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_parameters_and_no_parameters(dtype):
    import torch
    xs, dys, w, b = _torch_case((8, 6, 9, 9), dtype, True, seed=7, param_dtype=dtype)
    assert w.dtype == xs.dtype
    y, mean, var, inv_std = cuda.forward_torch(xs, w, b)
    dx, dw, db = cuda.backward_torch(dys, xs, mean, inv_std, w)
    yr, dxr, dwr, dbr, _, vr = _reference(xs, dys, w, b)
    assert _close(y, yr, TOL[dtype]) and dw.dtype == torch.float32
    y0, m0, _, s0 = cuda.forward_torch(xs, None, None)
    yr0 = (xs.double() - xs.double().mean((0, 2, 3), keepdim=True)) * (1 / torch.sqrt(vr + 1e-5)).view(1, -1, 1, 1)
    assert _close(y0, yr0, TOL[dtype])
    dx0, _, _ = cuda.backward_torch(dys, xs, m0, s0, None)
    assert torch.isfinite(dx0.float()).all()


@needs_torch_gpu
def test_a_single_channel_of_a_million_values():
    import torch
    for shape in [(1, 1, 1000, 1000), (1_000_000, 1), (1000, 1, 1000)]:
        xs, dys, w, b = _torch_case(shape, "float32", False, seed=3)
        y, mean, var, inv_std = cuda.forward_torch(xs, w, b)
        dx, dw, db = cuda.backward_torch(dys, xs, mean, inv_std, w)
        yr, dxr, dwr, dbr, mr, vr = _reference(xs, dys, w, b)
        assert _close(y, yr, 1e-4) and _close(var, vr, 1e-4, scale=vr.item())
        assert _close(dx, dxr, 1e-4, scale=(w.abs().max() / torch.sqrt(vr + 1e-5) * dys.abs().max()).item())
        assert _close(dw, dwr, 1e-4, scale=dwr.abs().max().item()) and _close(db, dbr, 1e-4, scale=dbr.abs().max().item())


@needs_torch_gpu
def test_eval_forward_uses_running_statistics_without_sync():
    import torch
    for dtype, cl in [("float32", False), ("float16", True), ("bfloat16", False), ("float64", True)]:
        xs, _, w, b = _torch_case((4, 7, 6, 5), dtype, cl, seed=11)
        acc = torch.float64 if dtype == "float64" else torch.float32
        rm = torch.randn(7, device="cuda", dtype=acc)
        rv = torch.rand(7, device="cuda", dtype=acc) + 0.5
        y = cuda.inference_torch(xs, rm, rv, w, b, 1e-3)
        ref = torch.nn.functional.batch_norm(xs.double(), rm.double(), rv.double(), w.double(), b.double(),
                                             training=False, eps=1e-3)
        assert y.dtype == xs.dtype and y.stride() == xs.stride() and _close(y, ref, TOL[dtype])


@needs_torch_gpu
def test_non_default_stream_orders_with_torch():
    import torch
    stream = torch.cuda.Stream()
    xs, dys, w, b = _torch_case((32, 8, 20, 20), "float32", True, seed=5)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        x2 = xs * 2 + 1                          # produced on the side stream, consumed right after
        y, mean, var, inv_std = cuda.forward_torch(x2, w, b)
        dx, dw, db = cuda.backward_torch(dys, x2, mean, inv_std, w)
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()
    yr, dxr, dwr, dbr, _, vr = _reference(x2, dys, w, b)
    assert _close(y, yr, 1e-4) and _close(dw, dwr, 1e-4, scale=dwr.abs().max().item())
    assert (dx.double() - dxr).abs().max().item() < 1e-3


@needs_torch_gpu
def test_at_most_six_launches_per_training_step_and_one_for_eval(monkeypatch):
    import torch
    launched = []
    real = cuda._launch
    monkeypatch.setattr(cuda, "_launch", lambda dev, name, *a: (launched.append(name), real(dev, name, *a)))
    for shape, cl in [((64, 16, 56, 56), False), ((64, 16, 14, 14), False), ((64, 16, 14, 14), True), ((512, 64), False)]:
        xs, dys, w, b = _torch_case(shape, "float32", cl, seed=1)
        launched.clear()
        y, mean, var, inv_std = cuda.forward_torch(xs, w, b)
        cuda.backward_torch(dys, xs, mean, inv_std, w)
        assert len(launched) == 6, launched
        launched.clear()
        cuda.inference_torch(xs, mean, var, w, b)
        assert len(launched) == 1
    torch.cuda.synchronize()


@needs_torch_gpu
def test_both_launch_paths_give_identical_results(monkeypatch):
    """The driver path (packed arguments, cuLaunchKernel) and CuPy's kernel call launch the same
    kernels with the same arguments: bit-identical outputs, running statistics and counts."""
    import torch
    xs, dys, w, b = _torch_case((16, 8, 9, 9), "bfloat16", True, seed=2)
    results = []
    for launcher in ("driver", "cupy"):
        monkeypatch.setattr(cuda, "LAUNCHER", launcher)
        rm, rv, nbt = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda"), torch.zeros((), dtype=torch.long,
                                                                                               device="cuda")
        y, mean, var, inv_std = cuda.forward_torch(xs, w, b, 1e-5, running_mean=rm, running_var=rv, momentum=None,
                                                   num_batches_tracked=nbt)
        dx, dw, db = cuda.backward_torch(dys, xs, mean, inv_std, w)
        results.append([y, mean, var, inv_std, dx, dw, db, rm, rv, nbt, cuda.inference_torch(xs, rm, rv, w, b)])
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)
    assert int(results[0][9]) == 1


@needs_torch_gpu
def test_forward_torch_running_statistics_match_torch_on_the_gpu():
    import torch
    for dtype, cl, momentum in [("float32", False, 0.1), ("float16", True, None), ("float64", False, 0.3)]:
        xs, _, w, b = _torch_case((12, 5, 6, 7), dtype, cl, seed=8)
        acc = torch.float64 if dtype == "float64" else torch.float32
        rm, rv = torch.randn(5, device="cuda", dtype=acc), torch.rand(5, device="cuda", dtype=acc) + 0.5
        nbt = torch.tensor(3, device="cuda")
        rm64, rv64 = rm.double(), rv.double()
        cuda.forward_torch(xs, w, b, 1e-5, running_mean=rm, running_var=rv, momentum=momentum, num_batches_tracked=nbt)
        f = 1 / 4 if momentum is None else momentum
        torch.nn.functional.batch_norm(xs.double(), rm64, rv64, training=True, momentum=f)
        tol = 1e-12 if dtype == "float64" else 1e-5
        assert int(nbt) == 4 and _close(rm, rm64, tol) and _close(rv, rv64, tol)


def test_ratio_quartiles_pair_repeats_round_by_round():
    """bench_gpu's step_ratio_quartiles: the quartiles of times[r] / base[r], repeat by repeat (not a ratio of
    medians), and None where the repeats cannot be paired."""
    from bnlib import bench
    # ratios 2, 4, 3, 4, 5: quartiles 3, 4, 4 (the ratio of the medians, 6 / 2, would say 3)
    assert bench._ratio_quartiles([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 1.0, 2.0, 2.0, 2.0]) == [3.0, 4.0, 4.0]
    # paired, a round that is slow for both rows cancels out
    assert bench._ratio_quartiles([1.0, 1.0, 9.0], [1.0, 1.0, 9.0]) == [1.0, 1.0, 1.0]
    assert bench._ratio_quartiles([1.0, 2.0], [1.0]) is None                      # a dropped repeat: unpaired
    assert bench._ratio_quartiles([], []) is None and bench._ratio_quartiles([1.0], [0.0]) is None


@needs_torch_gpu
def test_bench_gpu_smoke():
    from bnlib import bench
    rows = bench.bench_gpu(shapes=[(8, 4, 8, 8), (64, 16)], repeats=2, rotate=2, progress=False)
    assert {r["impl"] for r in rows} == {"torch", "bnlib"}
    assert all(r["step_ms"] > 0 and 0 < r["floor_fraction"] for r in rows)
    assert all(r["launches_per_step"] == 6 for r in rows if r["impl"] == "bnlib")
    # every repeat kept, and the per-repeat ratio's quartiles in order (torch's own: 1)
    assert all(len(r["step_repeats_ms"]) == len(r["forward_repeats_ms"]) == 2 for r in rows)
    assert all(r["step_ratio_quartiles"][0] <= r["step_ratio_quartiles"][1] <= r["step_ratio_quartiles"][2]
               for r in rows)
    assert all(r["step_ratio_quartiles"] == [1.0, 1.0, 1.0] for r in rows if r["impl"] == "torch")
    import torch
    if hasattr(torch.cuda, "_sleep"):           # GPU time alone: no host time, so at most the queued time
        assert all(0 < r["step_device_ms"] and 0 < r["host_step_ms"] and r["repeats"] == 2 for r in rows)
        assert all(r["step_device_ms"] <= 1.5 * r["step_ms"] + 0.05 for r in rows)
        assert all(2 - r["device_samples_dropped"] <= len(r["step_device_repeats_ms"]) <= 2 for r in rows)


@needs_torch_gpu
def test_bench_gpu_portable_row_runs_chapter_02_code_on_cupy():
    from bnlib import bench
    rows = bench.bench_gpu(shapes=[(8, 4, 8, 8)], configs=[("float32", "NCHW"), ("float16", "NHWC"),
                                                           ("bfloat16", "NCHW")], repeats=2, rotate=2,
                           progress=False, portable=True)
    portable = [r for r in rows if r["impl"] == "cupy portable"]
    assert {(r["dtype"], r["layout"]) for r in portable} == {("float32", "NCHW"), ("float16", "NHWC")}
    assert all(r["step_ms"] > 0 and r["launches_per_step"] is None for r in portable)


@needs_torch_gpu
def test_bench_gpu_launchers_add_rows_through_the_other_path():
    from bnlib import bench
    rows = bench.bench_gpu(shapes=[(8, 4, 8, 8)], configs=[("float32", "NCHW")], repeats=2, rotate=2,
                           progress=False, modules=True, launchers=("cupy",))
    impls = {r["impl"]: r for r in rows}
    assert set(impls) == {"torch", "bnlib", "torch.nn", "bnlib.nn", "bnlib [cupy]", "bnlib.nn [cupy]"}
    assert impls["bnlib"]["launcher"] == cuda.LAUNCHER and impls["bnlib [cupy]"]["launcher"] == "cupy"
    assert impls["bnlib [cupy]"]["launches_per_step"] == impls["bnlib.nn [cupy]"]["launches_per_step"] == 6


@needs_torch_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("aligned", [True, False])
def test_channel_chunks_match_float64_torch_on_the_gpu(monkeypatch, dtype, aligned):
    """Channel chunks for the L2 cache on a GPU (a working set of 4.5 channels' x: forward chunks of one
    or two channels, backward chunks of one), through both routes: forward_torch with the running
    statistics (momentum 0.1 and None, the batch counter) and backward_torch, and bnlib.functional on
    CuPy arrays (float16/32/64: bnlib refuses CuPy's bfloat16), against float64 torch; aligned data, and data one element past a
    16-byte boundary (scalar loads)."""
    import cupy
    import torch
    shape = (3, 7, 32, 64)
    c = shape[1]
    xs, dys, w, b = _torch_case(shape, dtype, False, seed=7)
    if not aligned:
        def shifted(t):
            flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
            flat.copy_(t.reshape(-1))
            return flat.view(t.shape)
        xs, dys = shifted(xs), shifted(dys)
        assert xs.data_ptr() % 16 != 0
    monkeypatch.setattr(cuda, "L2_CHUNK_BYTES", int(4.5 * shape[0] * shape[2] * shape[3] * xs.element_size()))
    acc = torch.float64 if dtype == "float64" else torch.float32
    yr, dxr, dwr, dbr, mr, vr = _reference(xs, dys, w, b)
    tol = TOL[dtype]
    count = xs.numel() // c
    dx_scale = (w.double().abs().max() * (1 / torch.sqrt(vr + 1e-5)).max() * dys.double().abs().max()).item()
    for momentum in (0.1, None):
        rm, rv = torch.zeros(c, dtype=acc, device="cuda"), torch.ones(c, dtype=acc, device="cuda")
        nbt = torch.zeros((), dtype=torch.long, device="cuda")
        y, mean, var, inv_std = cuda.forward_torch(xs, w, b, 1e-5, running_mean=rm, running_var=rv, momentum=momentum,
                                                   num_batches_tracked=nbt)
        dx, dw, db = cuda.backward_torch(dys, xs, mean, inv_std, w)
        f = 1.0 if momentum is None else momentum                 # None: the first counted batch, 1 / 1
        assert int(nbt) == 1
        assert _close(y, yr, tol) and _close(mean, mr, tol) and _close(var, vr, tol, scale=vr.abs().max().item())
        assert _close(rm, f * mr, tol) and _close(rv, (1 - f) + f * vr * count / (count - 1), tol)
        assert _close(dx, dxr, tol, scale=dx_scale)
        assert _close(dw, dwr, tol, scale=dwr.abs().max().item()) and _close(db, dbr, tol, scale=dbr.abs().max().item())
    if dtype != "bfloat16":
        y2, cache = F.batch_norm_forward(cupy.from_dlpack(xs), cupy.from_dlpack(w), cupy.from_dlpack(b))
        dx2, dg2, db2 = F.batch_norm_backward(cupy.from_dlpack(dys), cache)
        assert _close(torch.from_dlpack(y2), yr, tol) and _close(torch.from_dlpack(dx2), dxr, tol, scale=dx_scale)
        assert _close(torch.from_dlpack(dg2), dwr, tol, scale=dwr.abs().max().item())


@needs_torch_gpu
def test_bench_gpu_l2_chunk_rows_where_a_forward_walks_chunks():
    """l2_chunks adds a row per working set only to cases that chunk at that size (a planes walk of a
    tensor larger than a chunk: (4, 6, 32, 64) float32, 32 KB per channel, at 0.2 MB takes 2 forward
    chunks of 3 channels and 3 backward chunks of 2; the 2-D case none), with 3 launches per chunk."""
    from bnlib import bench
    saved = cuda.L2_CHUNK_BYTES
    rows = bench.bench_gpu(shapes=[(4, 6, 32, 64), (64, 16)], configs=[("float32", "NCHW")], repeats=2, rotate=2,
                           progress=False, l2_chunks=(0.2, 64))
    chunked = [r for r in rows if r["impl"].startswith("bnlib [L2")]
    assert [(r["impl"], r["shape"]) for r in chunked] == [("bnlib [L2 0.2 MiB]", [4, 6, 32, 64])]
    r = chunked[0]
    assert (r["l2_chunk_mb"], r["chunks_forward"], r["chunks_backward"], r["launches_per_step"]) == (0.2, 2, 3, 15)
    assert r["launcher"] == cuda.LAUNCHER and r["step_ms"] > 0 and r["step_ratio_vs_bnlib"] > 0
    import torch
    if hasattr(torch.cuda, "_sleep"):
        assert r["step_device_ratio_vs_bnlib"] > 0 and r["step_device_passes"] > 0
    assert cuda.L2_CHUNK_BYTES == saved                                                 # restored after the rows


@needs_torch_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape,channels_last", [((64, 128, 28, 28), True), ((64, 32, 14, 14), False),
                                                 ((8, 16, 64, 64), False), ((8192, 64), False)])
def test_busier_grids_match_float64_torch_on_the_gpu(monkeypatch, shape, channels_last, dtype):
    """MIN_VECTORS_PER_THREAD = 8 and 32 (fewer, busier blocks than design 3's grids, tools/gpu_grid_sweep.py)
    on a real card: forward with the running statistics, backward and the eval forward against float64
    torch, columns and planes walks."""
    xs, dys, w, b = _torch_case(shape, dtype, channels_last, seed=11)
    check = _training_step_checker(xs, dys, w, b, dtype)
    for k in (8, 32):
        monkeypatch.setattr(cuda, "MIN_VECTORS_PER_THREAD", k)
        check()


def _training_step_checker(xs, dys, w, b, dtype):
    """A function that runs forward_torch (with running statistics, momentum 1) and backward_torch on the
    case and asserts them against float64 torch, and returns (mean, var)."""
    import torch
    yr, dxr, dwr, dbr, mr, vr = _reference(xs, dys, w, b)
    tol = TOL[dtype]
    dx_scale = (w.double().abs().max() * (1 / torch.sqrt(vr + 1e-5)).max() * dys.double().abs().max()).item()

    def check():
        c = xs.shape[1]
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        y, mean, var, inv_std = cuda.forward_torch(xs, w, b, 1e-5, running_mean=rm, running_var=rv, momentum=1.0)
        dx, dw, db = cuda.backward_torch(dys, xs, mean, inv_std, w)
        assert _close(y, yr, tol) and _close(mean, mr, tol) and _close(var, vr, tol, scale=vr.abs().max().item())
        assert _close(rm, mr, tol)
        assert _close(dx, dxr, tol, scale=dx_scale)
        assert _close(dw, dwr, tol, scale=dwr.abs().max().item()) and _close(db, dbr, tol, scale=dbr.abs().max().item())
        y_eval = cuda.inference_torch(xs, mean, var, w, b)
        assert _close(y_eval, yr, tol)
    return check


@needs_torch_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(64, 128, 28, 28), (32, 64, 14, 14), (16, 96, 7, 7), (8, 5, 6, 6)])
def test_small_planes_walked_as_planes_match_float64_torch_on_the_gpu(monkeypatch, shape, dtype):
    """PLANES_MIN_BYTES = 0 (NCHW planes under 4 KB walked as planes, tools/gpu_grid_sweep.py), alone and with
    MIN_VECTORS_PER_THREAD = 8, on a real card: forward with the running statistics, backward and the eval
    forward against float64 torch, and the kernels launched are the planes kernels at the plan's load width:
    16-byte vectors for 28 x 28 (both dtypes), 14 x 14 float32 and 6 x 6 float32; one value per load for
    14 x 14 and 6 x 6 in 16 bits and for 7 x 7."""
    xs, dys, w, b = _torch_case(shape, dtype, False, seed=12)
    check = _training_step_checker(xs, dys, w, b, dtype)
    monkeypatch.setattr(cuda, "PLANES_MIN_BYTES", 0)
    launched, real_launch = [], cuda._launch
    monkeypatch.setattr(cuda, "_launch", lambda *a, **kw: (launched.append(a[1]), real_launch(*a, **kw))[1])
    n, c, l = shape[0], shape[1], shape[2] * shape[3]
    vec = cuda._VEC[dtype] if l % cuda._VEC[dtype] == 0 else 1
    for k in (1, 8):
        monkeypatch.setattr(cuda, "MIN_VECTORS_PER_THREAD", k)
        launched.clear()
        check()
        pl = cuda.plan(n, c, l, dtype, True, cuda._sm_count(0), min_vectors=k, planes_min_bytes=0)
        suffix = f", {vec}, true>" if cuda.flat_cursor(pl) else f", {vec}>"
        data = [name for name in launched if "finalize" not in name]
        assert len(data) == 5 and all(name.split("<")[0].endswith("_planes") and name.endswith(suffix)
                                      for name in data), data


@needs_torch_gpu
def test_bench_gpu_times_each_planes_plan_once():
    """planes_min_bytes adds a row per plan it changes, alone and with each min_vectors value, each plan timed once
    (the rows expected are computed from plan here): NCHW (16, 32, 14, 14) float32 (784-byte planes, columns by
    default) gets its planes rows; the same tensor channels-last, and (2, 4, 64, 64) NCHW (16 KB planes, planes
    already), get none."""
    import torch
    from bnlib import bench
    saved = (cuda.MIN_VECTORS_PER_THREAD, cuda.PLANES_MIN_BYTES)
    shapes = [(16, 32, 14, 14), (2, 4, 64, 64)]
    rows = bench.bench_gpu(shapes=shapes, configs=[("float32", "NCHW"), ("float32", "NHWC")], repeats=2, rotate=2,
                           progress=False, min_vectors=(8,), planes_min_bytes=(0,))
    sms = cuda._sm_count(0)
    for shape in shapes:
        for layout in ("NCHW", "NHWC"):
            view = (shape[0], shape[1], shape[2] * shape[3]) if layout == "NCHW" else (shape[0] * shape[2] * shape[3], shape[1], 1)
            plans = {(k, b): cuda.plan(*view, "float32", True, sms, min_vectors=k, planes_min_bytes=b)
                     for k in (1, 8) for b in (4096, 0)}
            expected, seen = [], {(plans[1, 4096].walk, plans[1, 4096].grid)}
            for (k, b), name in (((8, 4096), "bnlib [>=8 vec]"), ((1, 0), "bnlib [planes >=0 B]"),
                                 ((8, 0), "bnlib [planes >=0 B, >=8 vec]")):
                key = (plans[k, b].walk, plans[k, b].grid)
                if key not in seen:
                    seen.add(key)
                    expected.append((name, plans[k, b].walk, math.prod(plans[k, b].grid)))
            got = [(r["impl"], r["walk"], r["blocks"]) for r in rows if r["impl"].startswith("bnlib [")
                   and list(r["shape"]) == list(shape) and r["layout"] == layout]
            assert got == expected, (shape, layout)
            if layout == "NHWC" or shape == (2, 4, 64, 64):
                assert not any("planes" in name for name, _, _ in got)
    for r in (r for r in rows if r["impl"].startswith("bnlib [")):          # what the row's step launched
        data = [k for k in r["kernels"] if "finalize" not in k]
        assert len(data) == 4 and all(k.split("<")[0].endswith("_" + r["walk"]) for k in data), (r["impl"], data)
    planes = [r for r in rows if r["impl"] == "bnlib [planes >=0 B]"]
    assert len(planes) == 1 and planes[0]["planes_min_bytes"] == 0 and planes[0]["min_vectors"] == 1
    assert planes[0]["launches_per_step"] == 6 and planes[0]["step_ms"] > 0 and planes[0]["step_ratio_vs_bnlib"] > 0
    assert (cuda.MIN_VECTORS_PER_THREAD, cuda.PLANES_MIN_BYTES) == saved               # restored after the rows


@needs_torch_gpu
def test_bench_gpu_times_each_busier_grid_once():
    """min_vectors adds a row per grid it changes, each grid timed once: a (64, 8) tensor has one row
    block already (no row); (100, 64) float32, 100 rows, gets 7 row blocks by default and 1 at both 8
    and 16 (one row, 16 listed as the same grid); (32768, 64) float32 has 32768 rows of 16 vectors, whose
    grid of min(16 x SMs, 2048) row blocks 8 caps at 256 and 16 at 128 (rows on a card of more than 16 SMs)."""
    import torch
    from bnlib import bench
    if torch.cuda.get_device_properties(0).multi_processor_count <= 16:
        pytest.skip("a card of 16 SMs or fewer already gives (32768, 64) 256 row blocks or fewer")
    saved = cuda.MIN_VECTORS_PER_THREAD
    rows = bench.bench_gpu(shapes=[(32768, 64), (100, 64), (64, 8)], configs=[("float32", "NCHW")], repeats=2,
                           rotate=2, progress=False, min_vectors=(16, 8))
    extra = [r for r in rows if r["impl"].startswith("bnlib [>=")]
    assert [(r["impl"], r["shape"], r["min_vectors_same"], r["blocks"]) for r in extra] == [
        ("bnlib [>=8 vec]", [32768, 64], [], 256), ("bnlib [>=16 vec]", [32768, 64], [], 128),
        ("bnlib [>=8 vec]", [100, 64], [16], 1)]
    assert extra[0]["blocks_default"] == min(16 * cuda._sm_count(0), 2048) and extra[2]["blocks_default"] == 7
    r = extra[0]
    assert r["min_vectors"] == 8 and r["walk"] == "cols" and r["launches_per_step"] == 6
    assert r["step_ms"] > 0 and r["step_ratio_vs_bnlib"] > 0
    assert cuda.MIN_VECTORS_PER_THREAD == saved                                         # restored after the rows


@needs_torch_gpu
def test_bench_gpu_drops_an_extra_row_that_fails_and_keeps_the_others(monkeypatch, capsys):
    """An extra row whose warm-up raises (here bnlib.nn's module, made to fail) is reported and left
    out; torch, bnlib and torch.nn are still timed."""
    from bnlib import bench
    from bnlib import nn as bnn

    def broken(self, x):
        raise RuntimeError("made to fail")
    monkeypatch.setattr(bnn.BatchNorm2d, "forward", broken)
    rows = bench.bench_gpu(shapes=[(8, 4, 8, 8)], configs=[("float32", "NCHW")], repeats=2, rotate=2,
                           progress=False, modules=True)
    assert {r["impl"] for r in rows} == {"torch", "bnlib", "torch.nn"}
    assert "dropped bnlib.nn on (8, 4, 8, 8) float32 NCHW: RuntimeError: made to fail" in capsys.readouterr().out


@needs_torch_gpu
def test_bench_gpu_modules_pair_both_through_autograd():
    """modules=True adds torch.nn vs bnlib.nn rows (the like-for-like comparison) and keeps the old rows."""
    from bnlib import bench
    rows = bench.bench_gpu(shapes=[(8, 4, 8, 8), (64, 16)], configs=[("float32", "NCHW"), ("bfloat16", "NHWC")],
                           repeats=2, rotate=2, progress=False, modules=True)
    assert {r["impl"] for r in rows} == {"torch", "bnlib", "torch.nn", "bnlib.nn"}
    assert all(r["launches_per_step"] == 6 for r in rows if r["impl"] in ("bnlib", "bnlib.nn"))
    pair = [r for r in rows if r["impl"] in ("torch.nn", "bnlib.nn")]
    assert all(r["step_ratio_vs_module"] > 0 for r in pair)
    assert all(r["step_ratio_vs_module"] == 1.0 for r in pair if r["impl"] == "torch.nn")
    assert all("step_ratio_vs_module" not in r for r in rows if r["impl"] in ("torch", "bnlib"))


def test_gpu_profile_rows_run_on_an_emulated_device(monkeypatch):
    """tools/gpu_profile.py's steps (step 5 of tools/gpu_check.sh), each run on the emulated device with
    CPU tensors, so that a GPU session does not find a broken row: among them the rows that take
    bnlib.nn's module step apart (an empty autograd.Function, BatchNormFunction alone, the module's
    forward alone). Each step leaves gradients where its backward puts them, and the steps that share
    the input tensor clear its gradient first. (The Functions' values on this route are checked
    against torch by the emulated-device tests above.)"""
    torch = pytest.importorskip("torch")
    import importlib.util

    from bnlib import nn as bnn
    _emulated_torch_device(monkeypatch)
    monkeypatch.setattr(bnn, "_torch_kernels", lambda x: True)
    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "tools" / "gpu_profile.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    w, b = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    impls = tool.make_impls(torch, cuda, bnn, x, dy, w, b, device="cpu")
    assert {"empty autograd.Function", "BatchNormFunction [driver]", "bnlib.nn forward [driver]"} <= set(impls)
    for name, (step, launcher) in impls.items():
        monkeypatch.setattr(cuda, "LAUNCHER", launcher or "driver")
        for _ in range(2):                      # twice: a step must not depend on state the first left
            step()


@needs_torch_gpu
def test_precise_bn_on_cuda_tensors_matches_the_cpu():
    """bnlib.nn.precise_bn on a CUDA model (bnlib's layers on the CuPy kernels, torch's on cuDNN), both estimators,
    against the same model and batches on the CPU (added before any GPU run; not yet run on a GPU)."""
    import copy
    import torch
    from bnlib import nn as bnn
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), bnn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(8, 3, 9, 9) + k for k in range(4)]
    for variance in ("pooled", "batch"):
        on_cpu = bnn.precise_bn(copy.deepcopy(model), batches, variance=variance)
        on_gpu = bnn.precise_bn(copy.deepcopy(model).cuda(), [(b, None) for b in batches], variance=variance,
                                device="cuda")
        assert not any(m.training for m in on_gpu.modules())
        for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
            assert b.is_cuda, name
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5, msg=f"{variance}: {name}")
