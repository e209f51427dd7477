"""bnlib.cuda's real CUDA kernels, run on the CPU (no GPU here).

tests/cuda_cpu_shim.h turns KERNEL_SOURCE into ordinary C++ (one fiber per CUDA thread, barriers
for __syncthreads and warp shuffles), g++ builds it, and a stand-in for CuPy routes
bnlib.cuda's driver launches (the packed argument table included) into it. CPU torch tensors stand
in for CUDA ones: their addresses are what the kernels read and write. So forward_torch,
backward_torch and inference_torch run end to end, host code and kernels both, and are compared
with float64 torch over shapes that take both walks, every storage dtype, channels-last and
unaligned data, and the running-statistics update. Speed, and the GPU's memory model, stay for
tools/gpu_check.sh on a real GPU.
"""
import contextlib
import ctypes
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bnlib import cuda

torch = pytest.importorskip("torch")
SHIM = Path(__file__).with_name("cuda_cpu_shim.h")


def _compile(source, folder, stem, optimize="-O1", pch=None):
    """C++ `source` (the shim, kernels and their emu_table) built by g++ into folder/stem.so, loaded. pch: a
    header whose precompiled .gch (built with the same flags) g++ reads first, if it is valid, instead of
    parsing the standard headers again."""
    (folder / f"{stem}.cpp").write_text(source)
    proc = subprocess.run(["g++", "-std=c++20", optimize, "-shared", "-fPIC", *(["-include", str(pch)] if pch else []),
                           "-o", str(folder / f"{stem}.so"), str(folder / f"{stem}.cpp")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = ctypes.CDLL(str(folder / f"{stem}.so"))
    lib.bn_emu_launch.restype = ctypes.c_int
    lib.bn_emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_void_p]
    return lib


def build(kernel_source, folder, optimize="-O1", names=None, pch=None):
    """KERNEL_SOURCE (or a changed copy) compiled with the shim into a shared library, loaded, with the kernels
    `names` (default: every one of cuda.kernel_names(); only those are instantiated) in its launch table; the
    library's `kernel_names` attribute holds them."""
    names = cuda.kernel_names() if names is None else names
    table = ("std::map<std::string, emu_kernel>& emu_table() {\n    static std::map<std::string, emu_kernel> t = {\n"
             + ",\n".join(f'        {{"{n}", [](void** p) {{ emu_invoke(&{n}, p); }}}}' for n in names)
             + "\n    };\n    return t;\n}\n")
    lib = _compile(SHIM.read_text() + kernel_source.replace("#include <cuda_fp16.h>", "") + table, folder, "kernels",
                   optimize, pch)
    lib.kernel_names = frozenset(names)
    return lib


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    folder = tmp_path_factory.mktemp("cuda_on_cpu")
    probe = folder / "probe.cpp"                     # the shim's fibers need POSIX ucontext and C++20
    probe.write_text("#include <ucontext.h>\nint main() { ucontext_t c; return getcontext(&c); }\n")
    if subprocess.run(["g++", "-std=c++20", "-o", str(folder / "probe"), str(probe)],
                      capture_output=True, timeout=120).returncode != 0:
        pytest.skip("this g++ cannot build the shim (C++20 and <ucontext.h> needed)")
    return build(cuda.KERNEL_SOURCE, folder)


SHIM_PROBES = r"""
// A block sum through shared memory and __syncthreads, then a warp sum through shuffles.
__global__ void probe_sums(const float* x, float* out) {
    __shared__ float s[256];
    const unsigned int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) s[t] += s[t + half];
        __syncthreads();
    }
    float v = x[blockIdx.x * blockDim.x + t];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (t == 0) out[2 * blockIdx.x] = s[0];
    if (t % 32 == 0) out[2 * blockIdx.x + 1] += v;
}
// Lanes that return before a shuffle (undefined on a GPU with a full mask): launch code 3.
__global__ void probe_exited_lanes(float* out) {
    if (threadIdx.x % 32 == 5) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}
// Half of a warp at __syncthreads while the other half waits in a shuffle: neither can open. Launch code 4.
__global__ void probe_split_barrier(float* out) {
    if (threadIdx.x % 32 < 16) __syncthreads(); else out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}
std::map<std::string, emu_kernel>& emu_table() {
    static std::map<std::string, emu_kernel> t = {
        {"probe_sums", [](void** p) { emu_invoke(&probe_sums, p); }},
        {"probe_exited_lanes", [](void** p) { emu_invoke(&probe_exited_lanes, p); }},
        {"probe_split_barrier", [](void** p) { emu_invoke(&probe_split_barrier, p); }},
    };
    return t;
}
"""


def _launch(lib, name, grid, block, *args):
    """Launch `name` on the shim: tensors pass as their addresses, scalars as the ctypes values given (c_longlong, c_int, ...) per the signature."""
    values = [ctypes.c_void_p(a.data_ptr()) if hasattr(a, "data_ptr") else a for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    return lib.bn_emu_launch(name.encode(), *grid, *block, params)


def test_the_shim_runs_barriers_and_shuffles_as_a_gpu_and_refuses_undefined_ones(emulator, tmp_path):
    # The shim itself, on three small kernels: sums that need every barrier and shuffle to hold, lanes that
    # exit before a shuffle (code 3), and a warp split between __syncthreads and a shuffle (code 4).
    lib = _compile(SHIM.read_text() + SHIM_PROBES, tmp_path, "probes")
    launch = lambda name, blocks, threads, *arrays: _launch(lib, name, (blocks, 1, 1), (threads, 1, 1), *arrays)

    x = torch.arange(3 * 256, dtype=torch.float32)
    out = torch.zeros(6)
    assert launch("probe_sums", 3, 256, x, out) == 0
    blocks = x.view(3, 256)
    assert torch.equal(out[0::2], blocks.sum(1))                            # the shared-memory tree
    assert torch.equal(out[1::2], blocks.view(3, 8, 32).sum(2).sum(1))      # lane 0 of each warp, added up
    assert launch("probe_exited_lanes", 1, 64, torch.zeros(64)) == 3
    assert launch("probe_split_barrier", 1, 128, torch.zeros(128)) == 4
    assert launch("probe_sums", 1, 256, x, out) == 0                        # and it recovers


@pytest.fixture
def on_cpu(emulator, monkeypatch):
    """bnlib.cuda wired to the emulator: CPU tensors pass as CUDA ones, launches run the kernels."""
    return wire(emulator, monkeypatch)


def wire(emulator, monkeypatch):
    names, launched = {}, []

    def get_function(name):          # as CuPy's RawModule: a RawKernel whose .kernel has the .ptr
        names.setdefault(name, len(names) + 1)
        return types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=names[name]))

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        name = next(n for n, i in names.items() if i == f)
        if name not in emulator.kernel_names:         # a library built with some kernels only: not a failed check
            raise RuntimeError(f"{name} is not in this library's launch table")
        launched.append(name)
        assert shared == 0 and extra == 0
        rc = emulator.bn_emu_launch(name.encode(), gx, gy, gz, bx, by, bz, params)
        assert rc == 0, (name, rc)

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: None, memGetInfo=lambda: (0, 0)),
        driver=types.SimpleNamespace(launchKernel=launch_kernel),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0), Device=lambda dev: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cuda, "LAUNCHER", "driver")
    monkeypatch.setattr(cuda, "module", lambda device=None: types.SimpleNamespace(get_function=get_function))
    monkeypatch.setattr(cuda, "_functions", {})
    monkeypatch.setattr(cuda, "_check_cuda_tensor", lambda x, name: None)
    monkeypatch.setattr(cuda, "_torch_stream", lambda device: 0)
    monkeypatch.setattr(cuda, "_sm_count", lambda dev: 1)       # small grids: few emulated blocks
    monkeypatch.setattr(cuda, "_thread", __import__("threading").local())
    return launched


def _case(shape, dtype, channels_last, aligned, seed):
    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, dtype)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 50).to(tdtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(tdtype)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    if not aligned:                        # the same values one element past a 16-byte boundary
        def shifted(t):
            flat = torch.empty(t.numel() + 1, dtype=tdtype)[1:]
            flat.copy_(t.reshape(-1) if not channels_last else t.permute(0, *range(2, t.dim()), 1).reshape(-1))
            if channels_last:
                perm_shape = (shape[0],) + shape[2:] + (shape[1],)
                return flat.view(perm_shape).permute(0, t.dim() - 1, *range(1, t.dim() - 1))
            return flat.view(shape)
        x, dy = shifted(x), shifted(dy)
        assert x.data_ptr() % 16 != 0
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == "float64" else torch.float32
    return x, dy, w.to(acc), b.to(acc)


TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-5, "float64": 1e-12}

# (shape, channels_last): large planes walk planes, small planes and 2-D inputs walk columns, one
# channel of a million values, C < 32 and C not a multiple of the vector, partial last rows
CASES = [((4, 3, 32, 64), False), ((3, 5, 7, 9), False), ((6, 3, 5, 7), True), ((40, 3), False),
         ((5, 70), False), ((2, 1, 1024, 512), False), ((3, 2, 2, 3, 300), False), ((2, 4, 3, 5, 6), True),
         ((1, 2, 1, 1031), False), ((6200, 3), False),      # threads with full rows own the partial one
         ((5, 4, 56, 56), False),                          # planes of 784 vectors (float32): the batch's last slot partial
         ((2, 3, 33, 35), False)]                          # planes of 1155 values: one per load (float32, float64)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("shape,channels_last", CASES)
def test_kernels_on_the_cpu_match_float64_torch(on_cpu, shape, channels_last, dtype):
    aligned = sum(shape) % 3 != 0                     # about a third of the cases unaligned (vector width 1)
    check_case(shape, channels_last, dtype, aligned)
    assert len(on_cpu) == 7


def check_case(shape, channels_last, dtype, aligned):
    """forward (with the running statistics, momentum=None), backward and eval forward of one case
    through bnlib.cuda, asserted against float64 torch."""
    x, dy, w, b = _case(shape, dtype, channels_last, aligned, seed=sum(shape))
    acc = w.dtype
    rm, rv = torch.zeros(shape[1], dtype=acc), torch.ones(shape[1], dtype=acc)
    nbt = torch.tensor(0)
    y, mean, var, inv_std = cuda.forward_torch(x, w, b, 1e-5, running_mean=rm, running_var=rv, momentum=None,
                                               num_batches_tracked=nbt)
    dx, dw, db = cuda.backward_torch(dy, x, mean, inv_std, w)
    y_eval = cuda.inference_torch(x, rm, rv, w, b, 1e-5)
    xr = x.double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    rm64, rv64 = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    ref = torch.nn.functional.batch_norm(xr, rm64, rv64, wr, br, training=True, momentum=1.0, eps=1e-5)
    ref.backward(dy.double())
    tol = TOL[dtype]
    scale = lambda t: max(1.0, t.abs().max().item())
    assert y.dtype == dx.dtype == x.dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert (y.double() - ref).abs().max() <= tol * scale(ref)
    assert (dx.double() - xr.grad).abs().max() <= tol * scale(xr.grad) * 4
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean.double(), x.double().mean(dims), rtol=1e-5, atol=1e-6 * 50)
    torch.testing.assert_close(var.double(), x.double().var(dims, unbiased=False), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), wr.grad, rtol=1e-4, atol=1e-4 * scale(wr.grad))
    torch.testing.assert_close(db.double(), br.grad, rtol=1e-4, atol=1e-4 * scale(br.grad))
    assert int(nbt) == 1                                # momentum=None, first batch: running = batch
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-5 * 50)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-4, atol=1e-6)
    assert y_eval.stride() == x.stride()
    ref_eval = torch.nn.functional.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(),
                                              training=False, eps=1e-5)
    assert (y_eval.double() - ref_eval).abs().max() <= tol * scale(ref_eval)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_small_planes_walked_as_planes_on_the_cpu(on_cpu, monkeypatch, dtype):
    """Small planes take the planes walk when columns would need too much scratch (plan's _COLS_SCRATCH;
    lowered to 0 here, so that a small tensor takes that walk): planes of 1023 values, one per load."""
    monkeypatch.setattr(cuda, "_COLS_SCRATCH", (0, 0))
    cuda.plan.cache_clear()
    try:
        assert cuda.plan(1, 64, 1023, dtype, True, 132).walk == "planes"
        check_case((1, 64, 31, 33), False, dtype, aligned=True)
    finally:
        cuda.plan.cache_clear()                      # no plan made under the lowered limits outlives the test
    assert len(on_cpu) == 7


def test_a_million_values_in_one_channel_far_from_zero(on_cpu):
    """One channel of 2^20 float32 values with mean 1e4 and spread 1: the shifted sums keep the
    variance (a one-pass sum of squares in float32 would lose it entirely)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 128, 128, generator=gen, dtype=torch.float64) + 1e4
    y, mean, var, inv_std = cuda.forward_torch(x.float(), None, None, 1e-5)
    exact = x.float().double()
    assert abs(mean.item() - exact.mean().item()) < 1e-3
    assert abs(var.item() / exact.var(unbiased=False).item() - 1) < 1e-4
    assert (y.double() - (exact - exact.mean()) / exact.std(unbiased=False)).abs().max() < 1e-3


MUTANTS = {   # one line of a kernel changed: a merge formula, a loop bound, shuffle offsets, an index
    "merge": ("q += qb + delta * delta * n * wb;", "q += qb + delta * delta * n;"),
    "loop bound": ("    for (; j >= 0; --j) {\n        const Vec<T, V> v = xv[(r0 + j * step) * vw + vc];",
                   "    for (; j >= 1; --j) {\n        const Vec<T, V> v = xv[(r0 + j * step) * vw + vc];"),
    "plane cursor": ("if (i >= hi) { i = lo + threadIdx.x; n += step; base += plane_stride; }",
                     "if (i >= hi) { i = lo + threadIdx.x; n += step; }"),
    "shuffle offset": ("for (int off = 16; off > 0; off >>= 1) {\n        s += __shfl_down_sync",
                       "for (int off = 8; off > 0; off >>= 1) {\n        s += __shfl_down_sync"),
    "partial index": ("return b * Wf + f * W + (long long)c * L + l;", "return b * Wf + f * W + (long long)c * L;"),
    "pair shuffle": ("theirs[j] = __shfl_down_sync(0xffffffffu, mine[j], TX);",
                     "theirs[j] = __shfl_down_sync(0xffffffffu, mine[j], TX / 2);"),
    # a barrier removed: the shim runs a block's threads one after another between barriers, in thread
    # order or in reverse, so a missing __syncthreads must still show
    "block merge barrier": ("sn[warp] = n; sm[warp] = m; sq[warp] = q; }\n    __syncthreads();",
                            "sn[warp] = n; sm[warp] = m; sq[warp] = q; }"),
    "block sum barrier": ("ss[warp] = s; st[warp] = t; }\n    __syncthreads();", "ss[warp] = s; st[warp] = t; }"),
    "row groups barrier": ("    __syncthreads();\n#pragma unroll\n    for (int h = TY / 4;",
                           "#pragma unroll\n    for (int h = TY / 4;"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_changed_kernel_line_makes_these_checks_fail(mutant_libraries, monkeypatch, mutant):
    """The checks above have teeth: each one-line change of the kernel source, built and run the same
    way, fails them on at least one of five cases (columns, planes, channels-last, many rows, several planes
    per block; float32) that
    the unchanged source passes (test_kernels_on_the_cpu_match_float64_torch)."""
    wire(mutant_libraries[mutant], monkeypatch)
    failed = 0
    for shape, channels_last in [((3, 5, 7, 9), False), ((4, 3, 32, 64), False), ((6, 3, 5, 7), True),
                                 ((6200, 3), False), ((5, 4, 56, 56), False)]:
        assert (shape, channels_last) in CASES
        try:
            check_case(shape, channels_last, "float32", aligned=sum(shape) % 3 != 0)
        except AssertionError:
            failed += 1
    assert failed > 0, f"the {mutant} change went unnoticed"


# The cases above run with the grids of a 1-SM card: few blocks, so most threads walk several rows
# or vectors. A real card's grids (the plan aims at 2 x SMs x 8 blocks) put the loops at other
# edges, and these cases take them there, with the grids an H100/H200 (132 SMs) gets or, on a
# larger tensor, those of an 8-SM card (cheaper to emulate than a large tensor on a large card, and
# the same edge): columns walks whose threads own less than one row each (some none) or between one
# and two, channels-last with 98 row groups, planes cut into 2 or 22 segments of a fractional number
# of vectors per thread, the last segment shorter.
REAL_GRID_CASES = [  # shape, channels-last, SMs, dtype; and the edge each case is there for, checked on its plan
    ((6200, 3), False, 132, "float32", "cols", 0.95),         # rows per thread
    ((256, 16, 7, 7), True, 132, "bfloat16", "cols", 1.00),   # channels-last, 98 row groups
    ((5, 4, 56, 56), False, 132, "float32", "planes", (2, 392, 392)),   # segments, vectors per segment, last
    ((2400, 40), False, 8, "float32", "cols", 1.17),
    ((3, 2, 128, 512), False, 8, "float32", "planes", (22, 745, 739))]  # 2.91 vectors per thread, the last shorter


def _edge(pl):
    """Rows per thread of a cols plan; (segments, vectors per segment, vectors in the last) of a planes plan."""
    if pl.walk == "cols":
        total, _, wf = pl.walk_args
        return round(-(-total // wf) / (pl.grid[1] * cuda.TY), 2)
    lv, seg = pl.walk_args[2:]
    return pl.grid[2], seg, lv - seg * (pl.grid[2] - 1)


@pytest.mark.parametrize("shape,channels_last,sm_count,dtype,walk,edge", REAL_GRID_CASES)
def test_kernels_on_the_cpu_with_a_real_cards_grids(on_cpu, monkeypatch, shape, channels_last, sm_count, dtype,
                                                     walk, edge):
    monkeypatch.setattr(cuda, "_sm_count", lambda dev: sm_count)
    n, c, l = shape[0], shape[1], math.prod(shape[2:])
    pl = cuda.plan(*((n * l, c, 1) if channels_last else (n, c, l)), dtype, True, sm_count)
    one_sm = cuda.plan(*((n * l, c, 1) if channels_last else (n, c, l)), dtype, True, 1)
    assert math.prod(pl.grid) > math.prod(one_sm.grid)          # more blocks than the cases above get
    assert (pl.walk, _edge(pl)) == (walk, edge) and (shape != (256, 16, 7, 7) or pl.grid[1] == 98)
    check_case(shape, channels_last, dtype, aligned=True)
    assert len(on_cpu) == 7


# The same edges with fewer, busier blocks (MIN_VECTORS_PER_THREAD, which tools/gpu_grid_sweep.py times on
# a GPU): a first-pass thread then walks about 8 or 32 rows or vectors instead of one or two.
BUSIER_CASES = [  # shape, channels-last, SMs, dtype, min_vectors; and the plan's edge, as above
    ((6200, 3), False, 132, "float32", 8, 5.4),              # rows per thread (0.95 above)
    ((256, 16, 7, 7), True, 132, "bfloat16", 32, 24.5),      # 4 row groups (98 above)
    ((5, 4, 56, 56), False, 132, "float32", 8, (1, 784, 784)),   # one segment (2 above)
    ((3, 2, 128, 512), False, 8, "float16", 8, (4, 2048, 2048))]  # 4 segments (16 for 8 SMs without the cap)


@pytest.mark.parametrize("shape,channels_last,sm_count,dtype,min_vectors,edge", BUSIER_CASES)
def test_kernels_on_the_cpu_with_busier_grids(on_cpu, monkeypatch, shape, channels_last, sm_count, dtype,
                                               min_vectors, edge):
    monkeypatch.setattr(cuda, "_sm_count", lambda dev: sm_count)
    monkeypatch.setattr(cuda, "MIN_VECTORS_PER_THREAD", min_vectors)
    n, c, l = shape[0], shape[1], math.prod(shape[2:])
    view = (n * l, c, 1) if channels_last else (n, c, l)
    pl = cuda.plan(*view, dtype, True, sm_count, min_vectors=min_vectors)
    assert math.prod(pl.grid) < math.prod(cuda.plan(*view, dtype, True, sm_count).grid)
    assert _edge(pl) == edge
    check_case(shape, channels_last, dtype, aligned=True)
    assert len(on_cpu) == 7


# NCHW planes smaller than 4 KB walked as planes (PLANES_MIN_BYTES = 0, which tools/gpu_grid_sweep.py times on a
# GPU) instead of columns: vector loads that cross many short planes, one value per load where the plane's length
# is not a multiple of the vector (7 x 7), and with fewer, busier blocks too.
PLANES_CASES = [  # shape, SMs, dtype, min_vectors; and the plan's (segments, vectors per segment, in the last)
    ((4, 6, 14, 14), 132, "float32", 1, (1, 49, 49)),        # 196 values: 49 vectors of 4 per plane, 4 planes a block
    ((64, 3, 7, 7), 1, "float32", 1, (1, 49, 49)),           # 49 values, one per load; 11 planes a block
    ((6, 4, 28, 28), 8, "bfloat16", 8, (1, 98, 98)),         # 784 values: 98 vectors of 8, busier grid
    ((96, 2, 6, 6), 1, "float16", 1, (1, 36, 36)),           # 36 values: not a multiple of 8; 12 planes a block
    ((200, 4, 7, 7), 132, "bfloat16", 8, (1, 49, 49))]       # 40 planes a block: a thread steps 7 or 8 times


@pytest.mark.parametrize("shape,sm_count,dtype,min_vectors,edge", PLANES_CASES)
def test_kernels_on_the_cpu_with_small_planes_walked_as_planes(on_cpu, monkeypatch, shape, sm_count, dtype,
                                                                min_vectors, edge):
    """Segments shorter than a block, in blocks of several planes (4 to 40): the FLAT instantiations, whose
    FlatPlaneCursor reads the block's segments of consecutive planes as one sequence; the kernels launched
    are those planes kernels at the plan's load width."""
    monkeypatch.setattr(cuda, "_sm_count", lambda dev: sm_count)
    monkeypatch.setattr(cuda, "MIN_VECTORS_PER_THREAD", min_vectors)
    monkeypatch.setattr(cuda, "PLANES_MIN_BYTES", 0)
    n, c, l = shape[0], shape[1], math.prod(shape[2:])
    assert cuda.plan(n, c, l, dtype, True, sm_count).walk == "cols"           # design 3's rule: columns
    pl = cuda.plan(n, c, l, dtype, True, sm_count, min_vectors=min_vectors, planes_min_bytes=0)
    assert pl.walk == "planes" and _edge(pl) == edge and edge[1] < cuda.PLANE_THREADS and cuda.flat_cursor(pl)
    assert pl.vec == (cuda._VEC[dtype] if l % cuda._VEC[dtype] == 0 else 1)
    check_case(shape, False, dtype, aligned=True)
    assert len(on_cpu) == 7
    data = [k for k in on_cpu if "finalize" not in k]
    suffix = f", {pl.vec}, true>"                                                  # FlatPlaneCursor
    assert data and all(k.split("<")[0].endswith("_planes") and k.endswith(suffix) for k in data), data


# FlatPlaneCursor, changed one line at a time: each change fails the small-planes checks.
SHORT_MUTANTS = {
    "next plane": ("if (i >= hi) { i -= hi - lo; n += step; base += plane_stride; }",
                   "if (i >= hi) { i -= hi - lo; n += step; }"),
    "skip": ("k.skip = (int)(PLANE_THREADS / len);", "k.skip = (int)(PLANE_THREADS / len) + 1;"),
    "start plane": ("k.n = first + (int)(threadIdx.x / len) * step;", "k.n = first;"),
}


@pytest.fixture(scope="module")
def mutant_libraries(emulator, tmp_path_factory):
    """{mutant: the kernel source with that one line changed, built with the shim and loaded}, for MUTANTS
    and SHORT_MUTANTS: twelve g++ builds, two at a time (each is one process on one core), unoptimized: a
    mutant runs five cases or fewer, and -O0 halves the build (3.5 s against 7 s on a 2.45 GHz EPYC). Each
    build instantiates only the kernels its tests launch (MUTANTS: float32; SHORT_MUTANTS: float32 and bfloat16,
    PLANES_CASES[1] and [4]; a launch of another raises RuntimeError, which no test counts as a caught change),
    and reads the standard headers precompiled once (3.8 s, once): a build took 4.1 s with every kernel and no
    precompiled headers, 1.2 s (float32) or 1.9 s (and bfloat16) so, on this 2-core EPYC alone (2026-12-01)."""
    from concurrent.futures import ThreadPoolExecutor
    changes = {**MUTANTS, **SHORT_MUTANTS}
    for old, _ in changes.values():
        assert cuda.KERNEL_SOURCE.count(old) == 1, old
    folder = tmp_path_factory.mktemp("mutant_pch")
    pch = folder / "std_headers.h"               # the shim's standard headers (it includes them all at its top)
    pch.write_text("".join(line + "\n" for line in SHIM.read_text().splitlines() if line.startswith("#include <")))
    try:                                         # if it fails, the builds go without it: slower, the same
        made = subprocess.run(["g++", "-std=c++20", "-O0", "-fPIC", "-x", "c++-header", str(pch), "-o", str(pch) + ".gch"],
                              capture_output=True, timeout=600).returncode == 0
    except subprocess.TimeoutExpired:
        made = False
    pch = pch if made else None
    of_type = lambda *names: [n for n in cuda.kernel_names() if n.split("<", 1)[1].split(",")[0].rstrip(">") in names]
    float32, float32_bfloat16 = of_type("float"), of_type("float", "bf16_t")

    def build_one(item):
        name, (old, new) = item
        return name, build(cuda.KERNEL_SOURCE.replace(old, new), tmp_path_factory.mktemp("mutant"), "-O0",
                           float32 if name in MUTANTS else float32_bfloat16, pch)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(build_one, changes.items()))


@pytest.mark.parametrize("mutant", list(SHORT_MUTANTS))
def test_a_changed_short_segment_line_makes_the_small_planes_checks_fail(mutant_libraries, monkeypatch, mutant):
    wire(mutant_libraries[mutant], monkeypatch)
    monkeypatch.setattr(cuda, "PLANES_MIN_BYTES", 0)
    failed = 0
    for shape, sm_count, dtype, min_vectors, _ in (PLANES_CASES[1], PLANES_CASES[4]):    # threads that step on
        monkeypatch.setattr(cuda, "_sm_count", lambda dev, sm_count=sm_count: sm_count)
        monkeypatch.setattr(cuda, "MIN_VECTORS_PER_THREAD", min_vectors)
        n, c, l = shape[0], shape[1], math.prod(shape[2:])
        assert cuda.flat_cursor(cuda.plan(n, c, l, dtype, True, sm_count, min_vectors=min_vectors, planes_min_bytes=0))
        try:
            check_case(shape, False, dtype, aligned=True)
        except AssertionError:
            failed += 1
    assert failed > 0, f"the {mutant} change went unnoticed"


@pytest.mark.parametrize("dtype, param_dtype, channels_last", [
    (torch.float32, torch.float32, False), (torch.float16, torch.float16, True),
    (torch.bfloat16, torch.float32, True), (torch.float64, torch.float64, False)])
def test_bnlib_nn_layer_through_the_kernels_on_the_cpu(on_cpu, monkeypatch, dtype, param_dtype, channels_last):
    """bnlib.nn.BatchNorm2d with its CUDA route taken: the module, its autograd Functions and bnlib.cuda's
    host code and kernels (emulated), for two training steps and an evaluation forward, against a float64
    torch.nn.BatchNorm2d: outputs, input and parameter gradients, running statistics. Buffers of the compute
    dtype go to the kernels (6 launches a step); float16 buffers are updated by the module; parameters
    reach the kernels in their own dtype (float16 here, converted by bnlib.cuda)."""
    from bnlib import nn as bnn
    monkeypatch.setattr(bnn, "_torch_kernels", lambda x: True)
    module_updates = []
    update = bnn._BatchNorm._update_running_stats
    monkeypatch.setattr(bnn._BatchNorm, "_update_running_stats",
                        lambda self, *a: (module_updates.append(1), update(self, *a))[1])
    ours = bnn.BatchNorm2d(6).to(param_dtype)
    ref = torch.nn.BatchNorm2d(6).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w, b = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    tol = TOL[str(dtype).split(".")[1]]
    for step in range(3):
        if step == 2:
            ours.eval(), ref.eval()
        x = (torch.randn(4, 6, 9, 20, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        if channels_last:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        ya.backward(dy)
        yb.backward(dy.double())
        assert ya.dtype == dtype and ya.stride() == x.stride() and xa.grad.stride() == x.stride()
        scale = max(1.0, yb.abs().max().item())
        assert (ya.double() - yb).abs().max() <= tol * scale
        assert (xa.grad.double() - xb.grad).abs().max() <= 4 * tol * max(1.0, xb.grad.abs().max().item())
        for name in ("weight", "bias"):
            got, want = getattr(ours, name).grad, getattr(ref, name).grad
            assert got.dtype == param_dtype
            assert (got.double() - want).abs().max() <= 1e-3 * max(1.0, want.abs().max().item()), name
            getattr(ours, name).grad = getattr(ref, name).grad = None
        for name in ("running_mean", "running_var"):
            got, want = getattr(ours, name), getattr(ref, name)
            assert got.dtype == param_dtype
            assert (got.double() - want).abs().max() <= 10 * tol * max(1.0, want.abs().max().item()), name
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == min(step + 1, 2)
    assert len(on_cpu) == 2 * 6 + 1 and sum("stats_finalize" in k for k in on_cpu) == 2
    assert len(module_updates) == (2 if param_dtype == torch.float16 else 0)   # else the finalize kernel's update


@pytest.mark.parametrize("shape,aligned,dtype", [((3, 7, 32, 64), True, "float32"), ((3, 7, 32, 64), True, "bfloat16"),
                                                 ((2, 5, 45, 47), False, "float16"), ((2, 5, 45, 47), False, "float64")])
def test_channel_chunks_on_the_cpu_match_float64_torch(on_cpu, monkeypatch, shape, aligned, dtype):
    """The kernels walking channel chunks (a working set of 4.5 channels' x: the forward in chunks of
    one or two channels, the backward, whose working set holds x, dy and dx, of one), each chunk's
    kernels given addresses into the middle of x, y, dy, dx and the per-channel vectors: the same
    checks as without chunks, the batch counted once, 3 launches per chunk."""
    n, c, l = shape[0], shape[1], math.prod(shape[2:])
    budget = int(4.5 * n * l * cuda._ITEMSIZE[dtype])
    monkeypatch.setattr(cuda, "L2_CHUNK_BYTES", budget)
    check_case(shape, False, dtype, aligned)
    fwd, bwd = (cuda.plan(n, c, l, dtype, aligned, 1, budget // a) for a in (2, 3))
    assert len(fwd.chunks) == -(-c // 2) and {sp.channels for _, sp in fwd.chunks} == {1, 2}
    assert [sp.channels for _, sp in bwd.chunks] == [1] * c
    assert len(on_cpu) == 3 * len(fwd.chunks) + 3 * len(bwd.chunks) + 1


# Chapter 05's exercises 3 and 5 answer with Python replays of the kernels' walks (book_reads_per_row,
# book_loads_per_thread), and their checkers compare a reader's answer with those replays. Here the replays
# are compared with the kernels' own code, run by the shim: the row walk of bn_stats_cols (its two index
# lines, taken from KERNEL_SOURCE, in a probe launched with 16 and with 32 row groups, and the real kernel at
# 16, whose partial counts per block the probe's walk must give) and the real PlaneCursor and FlatPlaneCursor.
CHAPTER_05 = Path(__file__).resolve().parents[1] / "chapters" / "05_cupy.ipynb"


def _chapter_function(name):
    """A function defined in a code cell of chapter 05, executed with NumPy and bnlib.cuda's constants."""
    import json
    import numpy as np
    cells = json.loads(CHAPTER_05.read_text(encoding="utf-8"))["cells"]
    source = next("".join(c["source"]) for c in cells if c["cell_type"] == "code"
                  and f"def {name}(" in "".join(c["source"]))
    namespace = {"np": np, "PLANE_THREADS": cuda.PLANE_THREADS}
    exec(source, namespace)
    return namespace[name]


def _row_walk_lines():
    """The two lines of bn_stats_cols that say which rows a thread reads: its first row and its step."""
    import re
    body = cuda.KERNEL_SOURCE[cuda.KERNEL_SOURCE.index("bn_stats_cols(const T*"):]
    body = body[:body.index("\n}\n")]
    step = re.search(r"const long long step = [^;]*;", body)
    first = re.search(r"const long long r0 = [^;]*;", body)
    assert step and first, "bn_stats_cols's row walk changed: update this probe and chapter 05's exercise 3"
    # and the loops step from r0 by `step` (four at a time, then one), below Rfull, the partial row last
    assert "r + u * step" in body and "r += UNROLL * step" in body and "r += step" in body
    return first.group(0), step.group(0)


WALK_PROBES = r"""
// bn_stats_cols's row walk (its own lines, substituted below), one vector column: seen[b * rows + r] += 1
__global__ void probe_row_walk(long long rows, int* seen) {
    FIRST_LINE
    STEP_LINE
    if (threadIdx.x == 0)
        for (long long r = r0; r < rows; r += step) seen[blockIdx.y * rows + r] += 1;
}
// A planes block's cursor over `planes` planes of `len` positions: loads per thread, and reads per position
__global__ void probe_plane_cursor(long long len, int planes, int flat, int* loads, int* seen) {
    int count = 0;
    if (flat) {
        for (FlatPlaneCursor k = flat_plane_cursor(0, 1, planes, 1, 0, len, 0, len); k.valid(); k.next()) {
            ++count; seen[k.index()] += 1;
        }
    } else {
        for (PlaneCursor k = plane_cursor(0, 1, planes, 1, 0, len, 0, len); k.valid(); k.next()) {
            ++count; seen[k.index()] += 1;
        }
    }
    loads[threadIdx.x] = count;
}
"""


@pytest.fixture(scope="module")
def walk_probes(emulator, tmp_path_factory):
    first, step = _row_walk_lines()
    source = cuda.KERNEL_SOURCE + WALK_PROBES.replace("FIRST_LINE", first).replace("STEP_LINE", step)
    return build(source, tmp_path_factory.mktemp("walks"), names=["probe_row_walk", "probe_plane_cursor",
                                                                  "bn_stats_cols<double, 1>"])


def test_chapter_05_exercise_3_replay_walks_rows_as_bn_stats_cols(walk_probes):
    book = _chapter_function("book_reads_per_row")
    for blocks, groups, rows in [(4, 16, 1000), (4, 32, 1000), (3, 32, 517), (5, 8, 999), (2, 16, 70)]:
        seen = torch.zeros(blocks * rows, dtype=torch.int32)
        assert _launch(walk_probes, "probe_row_walk", (1, blocks, 1), (cuda.TX, groups, 1),
                       ctypes.c_longlong(rows), seen) == 0
        per_block = seen.view(blocks, rows)
        assert per_block.sum(0).tolist() == list(book(blocks, groups, rows)), (blocks, groups, rows)
        if groups == cuda.TY:
            # the real kernel, as launched, on two columns whose values are the row index, the last row partial
            # (its one value in column 0, read by the thread whose walk reaches row Rfull = rows - 1): each block's
            # partial count and mean per column are those of the rows the probe's walk gave that block
            full = rows - 1
            x = torch.arange(rows, dtype=torch.float64).repeat_interleave(2)[:2 * full + 1]
            part = torch.full((3 * 2 * blocks,), float("nan"), dtype=torch.float64)
            assert _launch(walk_probes, "bn_stats_cols<double, 1>", (1, blocks, 1), (cuda.TX, cuda.TY, 1), x,
                           ctypes.c_longlong(x.numel()), ctypes.c_longlong(full), ctypes.c_int(2), part,
                           ctypes.c_longlong(2 * blocks), ctypes.c_void_p(0)) == 0
            index = torch.arange(rows, dtype=torch.float64)
            for column, reads in ((0, per_block.double()), (1, per_block[:, :full].double())):
                n = reads.sum(1)
                assert torch.equal(part[column:2 * blocks:2], n), (column, blocks, rows)
                torch.testing.assert_close(part[2 * blocks + column:4 * blocks:2], (reads @ index[:reads.shape[1]]) / n,
                                           rtol=1e-14, atol=0)


def test_chapter_05_exercise_5_replay_steps_as_the_plane_cursors(walk_probes):
    book = _chapter_function("book_loads_per_thread")
    for length, planes in [(49, 24), (49, 1), (49, 3), (7, 20), (196, 10), (300, 3), (256, 2), (7, 100), (1, 5)]:
        for flat in (0, 1):
            loads = torch.zeros(cuda.PLANE_THREADS, dtype=torch.int32)
            seen = torch.zeros(length * planes, dtype=torch.int32)
            assert _launch(walk_probes, "probe_plane_cursor", (1, 1, 1), (cuda.PLANE_THREADS, 1, 1),
                           ctypes.c_longlong(length), ctypes.c_int(planes), ctypes.c_int(flat), loads, seen) == 0
            assert loads.tolist() == list(book(length, planes, bool(flat))), (length, planes, flat)
            assert (seen == 1).all(), (length, planes, flat)          # every position read once, by either cursor
