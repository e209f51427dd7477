# GENERATED FILE: do not edit.
# bnlib.cuda is generated from chapters/05_cupy.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['KERNEL_SOURCE', 'available', 'cupy_stream', 'supports', 'module', 'kernel', 'accumulation_dtype', 'is_channels_last', 'as_layout', 'forward', 'backward', 'GPU_SHAPES', 'GPU_CONFIGS', 'copy_bandwidth', 'bench_gpu', 'format_gpu_table', 'gpu_environment']

import math

import numpy as np

KERNEL_SOURCE = r"""
// Batch-norm kernels for bnlib.cuda. T is the storage type (__half, float, double); A the
// accumulation type (float for __half and float, double for double). Two layouts:
//   "ncl": (N, C, L) C-contiguous with L > 1 (NCHW): a channel is N runs of L contiguous values;
//   "mc":  (M, C) C-contiguous (NHWC viewed as (N*H*W, C), or a 2-D (N, C) input): a channel is
//          a column with stride C.
#include <cuda_fp16.h>

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) { return v; }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// Chan, Golub & LeVeque: merge (nb, mb, qb) into (n, m, q); counts are kept in A to avoid overflow.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& m, A& q, A nb, A mb, A qb) {
    A total = n + nb;
    if (nb == A(0)) return;
    A delta = mb - m;
    A wb = nb / total;
    m += delta * wb;
    q += qb + delta * delta * n * wb;
    n = total;
}

template <typename A>
__device__ __forceinline__ void welford_step(A& n, A& m, A& q, A v) {
    n += A(1);
    A delta = v - m;
    m += delta / n;
    q += delta * (v - m);
}

// Merge the (n, m, q) of every thread of a 1-D block; thread 0 ends with the block's moments.
template <typename A>
__device__ void block_merge(A& n, A& m, A& q) {
    __shared__ A sn[32], sm[32], sq[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        A n2 = __shfl_down_sync(0xffffffffu, n, off);
        A m2 = __shfl_down_sync(0xffffffffu, m, off);
        A q2 = __shfl_down_sync(0xffffffffu, q, off);
        chan_merge(n, m, q, n2, m2, q2);
    }
    if (lane == 0) { sn[warp] = n; sm[warp] = m; sq[warp] = q; }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        n = lane < warps ? sn[lane] : A(0);
        m = lane < warps ? sm[lane] : A(0);
        q = lane < warps ? sq[lane] : A(0);
        for (int off = 16; off > 0; off >>= 1) {
            A n2 = __shfl_down_sync(0xffffffffu, n, off);
            A m2 = __shfl_down_sync(0xffffffffu, m, off);
            A q2 = __shfl_down_sync(0xffffffffu, q, off);
            chan_merge(n, m, q, n2, m2, q2);
        }
    }
}

// Forward, pass 1, layout "ncl". grid = (C, B), 1-D blocks. Block (c, b) runs Welford over the
// elements k = b*blockDim + t, stepping by blockDim*B, of channel c (K = N*L of them), and writes
// its moments to partial[c*B + b].
template <typename T>
__global__ void bn_partial_ncl(const T* __restrict__ x, long long N, long long C, long long L,
                               typename Acc<T>::type* __restrict__ pn, typename Acc<T>::type* __restrict__ pm,
                               typename Acc<T>::type* __restrict__ pq) {
    typedef typename Acc<T>::type A;
    const long long c = blockIdx.x, B = gridDim.y, K = N * L;
    A n = 0, m = 0, q = 0;
    for (long long k = (long long)blockIdx.y * blockDim.x + threadIdx.x; k < K; k += (long long)blockDim.x * B) {
        const long long i = (k / L) * C * L + c * L + (k % L);
        welford_step(n, m, q, to_acc(x[i]));
    }
    block_merge(n, m, q);
    if (threadIdx.x == 0) { pn[c * B + blockIdx.y] = n; pm[c * B + blockIdx.y] = m; pq[c * B + blockIdx.y] = q; }
}

// Forward, pass 1, layout "mc". grid = (ceil(C/32), B), blocks of (32, 8): threadIdx.x walks
// channels (coalesced), threadIdx.y rows. The 8 row-groups of a block are merged in shared memory.
template <typename T>
__global__ void bn_partial_mc(const T* __restrict__ x, long long M, long long C,
                              typename Acc<T>::type* __restrict__ pn, typename Acc<T>::type* __restrict__ pm,
                              typename Acc<T>::type* __restrict__ pq) {
    typedef typename Acc<T>::type A;
    __shared__ A sn[8][33], sm[8][33], sq[8][33];
    const long long c = (long long)blockIdx.x * 32 + threadIdx.x, B = gridDim.y;
    A n = 0, m = 0, q = 0;
    if (c < C) {
        for (long long r = (long long)blockIdx.y * 8 + threadIdx.y; r < M; r += 8 * B)
            welford_step(n, m, q, to_acc(x[r * C + c]));
    }
    sn[threadIdx.y][threadIdx.x] = n; sm[threadIdx.y][threadIdx.x] = m; sq[threadIdx.y][threadIdx.x] = q;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int j = 1; j < 8; ++j) chan_merge(n, m, q, sn[j][threadIdx.x], sm[j][threadIdx.x], sq[j][threadIdx.x]);
        pn[c * B + blockIdx.y] = n; pm[c * B + blockIdx.y] = m; pq[c * B + blockIdx.y] = q;
    }
}

// Forward, finalize: one thread per channel merges its B partials in order (Chan), then writes
// mean, biased variance and 1/sqrt(var + eps).
template <typename A>
__global__ void bn_finalize(const A* __restrict__ pn, const A* __restrict__ pm, const A* __restrict__ pq,
                            long long C, long long B, double eps,
                            A* __restrict__ mean, A* __restrict__ var, A* __restrict__ inv_std) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    A n = 0, m = 0, q = 0;
    for (long long b = 0; b < B; ++b) chan_merge(n, m, q, pn[c * B + b], pm[c * B + b], pq[c * B + b]);
    const A v = q / n;
    mean[c] = m;
    var[c] = v;
    inv_std[c] = A(1) / sqrt(v + A(eps));
}

// Forward, pass 2: y = (x - mean[c]) * scale[c] + shift[c], grid-stride over all elements.
// For "ncl" the channel of element i is (i / L) % C; for "mc" (pass L = 1) it is i % C.
template <typename T>
__global__ void bn_normalize(const T* __restrict__ x, T* __restrict__ y, long long total, long long C, long long L,
                             const typename Acc<T>::type* __restrict__ mean,
                             const typename Acc<T>::type* __restrict__ scale,
                             const typename Acc<T>::type* __restrict__ shift) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)blockDim.x * gridDim.x) {
        const long long c = (i / L) % C;
        y[i] = from_acc<T>((to_acc(x[i]) - mean[c]) * scale[c] + shift[c]);
    }
}

// Backward, pass 1: per-channel partial sums of dy and dy * (x - mean), same two layouts.
template <typename A>
__device__ void block_sum2(A& s, A& t) {
    __shared__ A ss[32], st[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) { s += __shfl_down_sync(0xffffffffu, s, off); t += __shfl_down_sync(0xffffffffu, t, off); }
    if (lane == 0) { ss[warp] = s; st[warp] = t; }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        s = lane < warps ? ss[lane] : A(0);
        t = lane < warps ? st[lane] : A(0);
        for (int off = 16; off > 0; off >>= 1) { s += __shfl_down_sync(0xffffffffu, s, off); t += __shfl_down_sync(0xffffffffu, t, off); }
    }
}

template <typename T>
__global__ void bn_backward_partial_ncl(const T* __restrict__ dy, const T* __restrict__ x, long long N, long long C,
                                        long long L, const typename Acc<T>::type* __restrict__ mean,
                                        typename Acc<T>::type* __restrict__ psum, typename Acc<T>::type* __restrict__ pdot) {
    typedef typename Acc<T>::type A;
    const long long c = blockIdx.x, B = gridDim.y, K = N * L;
    const A mu = mean[c];
    A s = 0, t = 0;
    for (long long k = (long long)blockIdx.y * blockDim.x + threadIdx.x; k < K; k += (long long)blockDim.x * B) {
        const long long i = (k / L) * C * L + c * L + (k % L);
        const A g = to_acc(dy[i]);
        s += g;
        t += g * (to_acc(x[i]) - mu);
    }
    block_sum2(s, t);
    if (threadIdx.x == 0) { psum[c * B + blockIdx.y] = s; pdot[c * B + blockIdx.y] = t; }
}

template <typename T>
__global__ void bn_backward_partial_mc(const T* __restrict__ dy, const T* __restrict__ x, long long M, long long C,
                                       const typename Acc<T>::type* __restrict__ mean,
                                       typename Acc<T>::type* __restrict__ psum, typename Acc<T>::type* __restrict__ pdot) {
    typedef typename Acc<T>::type A;
    __shared__ A ss[8][33], st[8][33];
    const long long c = (long long)blockIdx.x * 32 + threadIdx.x, B = gridDim.y;
    A s = 0, t = 0;
    if (c < C) {
        const A mu = mean[c];
        for (long long r = (long long)blockIdx.y * 8 + threadIdx.y; r < M; r += 8 * B) {
            const A g = to_acc(dy[r * C + c]);
            s += g;
            t += g * (to_acc(x[r * C + c]) - mu);
        }
    }
    ss[threadIdx.y][threadIdx.x] = s; st[threadIdx.y][threadIdx.x] = t;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int j = 1; j < 8; ++j) { s += ss[j][threadIdx.x]; t += st[j][threadIdx.x]; }
        psum[c * B + blockIdx.y] = s; pdot[c * B + blockIdx.y] = t;
    }
}

// Backward, pass 2: dx = a[c] * dy + b[c] * (x - mean[c]) + k[c], grid-stride.
template <typename T>
__global__ void bn_backward_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, long long total,
                               long long C, long long L, const typename Acc<T>::type* __restrict__ mean,
                               const typename Acc<T>::type* __restrict__ a, const typename Acc<T>::type* __restrict__ b,
                               const typename Acc<T>::type* __restrict__ k) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)blockDim.x * gridDim.x) {
        const long long c = (i / L) % C;
        dx[i] = from_acc<T>(a[c] * to_acc(dy[i]) + b[c] * (to_acc(x[i]) - mean[c]) + k[c]);
    }
}

// Explicit instantiations, so that nvcc checks every variant (CuPy's RawModule names them).
#ifdef BNLIB_INSTANTIATE
#define INST(T) \
    template __global__ void bn_partial_ncl<T>(const T*, long long, long long, long long, Acc<T>::type*, Acc<T>::type*, Acc<T>::type*); \
    template __global__ void bn_partial_mc<T>(const T*, long long, long long, Acc<T>::type*, Acc<T>::type*, Acc<T>::type*); \
    template __global__ void bn_normalize<T>(const T*, T*, long long, long long, long long, const Acc<T>::type*, const Acc<T>::type*, const Acc<T>::type*); \
    template __global__ void bn_backward_partial_ncl<T>(const T*, const T*, long long, long long, long long, const Acc<T>::type*, Acc<T>::type*, Acc<T>::type*); \
    template __global__ void bn_backward_partial_mc<T>(const T*, const T*, long long, long long, const Acc<T>::type*, Acc<T>::type*, Acc<T>::type*); \
    template __global__ void bn_backward_dx<T>(const T*, const T*, T*, long long, long long, long long, const Acc<T>::type*, const Acc<T>::type*, const Acc<T>::type*, const Acc<T>::type*);
INST(__half)
INST(float)
INST(double)
template __global__ void bn_finalize<float>(const float*, const float*, const float*, long long, long long, double, float*, float*, float*);
template __global__ void bn_finalize<double>(const double*, const double*, const double*, long long, long long, double, double*, double*, double*);
#endif
"""

_TYPES = {"float16": "__half", "float32": "float", "float64": "double"}
_KERNELS = ("bn_partial_ncl", "bn_partial_mc", "bn_normalize", "bn_backward_partial_ncl",
            "bn_backward_partial_mc", "bn_backward_dx")
_module = None


def available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:                      # no CuPy, no driver, or no device
        return False


def cupy_stream(torch_stream):
    """A CuPy stream object for a torch.cuda.Stream: the same CUDA stream, so that CuPy kernels
    are ordered with PyTorch's. Use it as a context manager (`with cupy_stream(s): ...`)."""
    import cupy
    from_external = getattr(cupy.cuda.Stream, "from_external", None)    # CuPy >= 14
    if from_external is not None:
        return from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device.index)


def supports(x) -> bool:
    """The inputs the fused kernels handle: CuPy arrays of float16/32/64 with 2+ dimensions."""
    return type(x).__module__.split(".")[0] == "cupy" and x.dtype.name in _TYPES and x.ndim >= 2


def module():
    """The compiled kernels (one cupy.RawModule, compiled by NVRTC on first use and memoized)."""
    global _module
    if _module is None:
        import cupy
        names = [f"{k}<{t}>" for k in _KERNELS for t in _TYPES.values()]
        names += ["bn_finalize<float>", "bn_finalize<double>"]
        _module = cupy.RawModule(code=KERNEL_SOURCE, options=("-std=c++17",), name_expressions=names)
    return _module


def kernel(name: str, dtype) -> object:
    """The kernel `name` instantiated for storage dtype `dtype` (bn_finalize takes the accumulation dtype)."""
    return module().get_function(f"{name}<{_TYPES[np.dtype(dtype).name]}>")


def accumulation_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _channels_last_perm(ndim):
    return (0,) + tuple(range(2, ndim)) + (1,)


def is_channels_last(a) -> bool:
    """True for an (N, C, *spatial) array stored channels-last (NHWC) and not also C-contiguous."""
    return a.ndim > 2 and not a.flags.c_contiguous and a.transpose(_channels_last_perm(a.ndim)).flags.c_contiguous


def as_layout(a):
    """Choose the kernel layout for an (N, C, *spatial) CuPy array.

    Returns (layout, view, (N or M, C, L)): "mc" with an (M, C) C-contiguous view for channels-last
    (NHWC) memory, for 2-D input and whenever L == 1; otherwise "ncl" with an (N, C, L) C-contiguous
    view. Only an input that is neither C-contiguous nor channels-last is copied.
    """
    import cupy
    n, c = a.shape[0], a.shape[1]
    if is_channels_last(a):
        view = a.transpose(_channels_last_perm(a.ndim)).reshape(-1, c)
        return "mc", view, (view.shape[0], c, 1)
    a = cupy.ascontiguousarray(a)
    l = a.size // (n * c) if n * c else 1
    if l == 1:
        return "mc", a.reshape(n, c), (n, c, 1)
    return "ncl", a.reshape(n, c, l), (n, c, l)


def _empty_output(a, view_shape):
    """An array of a's shape, channels-last if a is, and its view in the kernel layout."""
    import cupy
    if is_channels_last(a):
        out = cupy.empty_like(a)                 # order='K' keeps the channels-last strides
        return out, out.transpose(_channels_last_perm(a.ndim)).reshape(view_shape)
    out = cupy.empty(a.shape, dtype=a.dtype)
    return out, out.reshape(view_shape)


def _blocks_per_channel(count, channels, sm_count):
    """Enough blocks to fill the GPU (about 4 per SM) without blocks of less than ~1k values."""
    want = max(1, math.ceil(4 * sm_count / max(channels, 1)))
    return int(max(1, min(want, math.ceil(count / 1024))))


def _elementwise_grid(total, sm_count):
    return (int(min(max(1, math.ceil(total / 256)), 32 * sm_count)),), (256,)


def _sm_count():
    import cupy
    return cupy.cuda.Device().attributes["MultiProcessorCount"]


def forward(x, gamma, beta, eps):
    """Training forward with the fused kernels: two reading passes over x, one write of y.

    Returns y (x's shape, dtype and memory layout), mean, var (biased), inv_std (accumulation dtype).
    """
    import cupy
    layout, xv, (n, c, l) = as_layout(x)
    acc = accumulation_dtype(x.dtype)
    sms = _sm_count()
    count = n * l
    b = _blocks_per_channel(count, c if layout == "ncl" else math.ceil(c / 32), sms)
    pn, pm, pq = (cupy.empty((c, b), acc) for _ in range(3))
    if layout == "ncl":
        kernel("bn_partial_ncl", x.dtype)((c, b), (256,), (xv, np.int64(n), np.int64(c), np.int64(l), pn, pm, pq))
    else:
        kernel("bn_partial_mc", x.dtype)((math.ceil(c / 32), b), (32, 8), (xv, np.int64(n), np.int64(c), pn, pm, pq))
    mean, var, inv_std = (cupy.empty(c, acc) for _ in range(3))
    finalize = module().get_function(f"bn_finalize<{_TYPES[acc.name]}>")
    finalize((math.ceil(c / 256),), (256,), (pn, pm, pq, np.int64(c), np.int64(b), np.float64(eps), mean, var, inv_std))
    scale = inv_std if gamma is None else inv_std * gamma.astype(acc)
    shift = cupy.zeros(c, acc) if beta is None else beta.astype(acc)
    y, yv = _empty_output(x, xv.shape)
    grid, block = _elementwise_grid(xv.size, sms)
    kernel("bn_normalize", x.dtype)(grid, block, (xv, yv, np.int64(xv.size), np.int64(c), np.int64(l if layout == "ncl" else 1),
                                                  mean, scale, cupy.ascontiguousarray(shift)))
    return y, mean, var, inv_std


def backward(dy, x, mean, inv_std, gamma):
    """Training backward with the fused kernels: one pass for the two per-channel sums, one for dx.

    Returns dx (x's layout), dgamma, dbeta (accumulation dtype).
    """
    import cupy
    layout, xv, (n, c, l) = as_layout(x)
    dy_layout, dyv, _ = as_layout(dy)
    if dy_layout != layout or dyv.shape != xv.shape:      # e.g. a contiguous dy for a channels-last x
        dy_same, dyv = _empty_output(x, xv.shape)
        dy_same[...] = dy
    acc = accumulation_dtype(x.dtype)
    sms = _sm_count()
    count = n * l
    b = _blocks_per_channel(count, c if layout == "ncl" else math.ceil(c / 32), sms)
    psum, pdot = cupy.empty((c, b), acc), cupy.empty((c, b), acc)
    mean_acc = cupy.ascontiguousarray(mean.astype(acc))
    if layout == "ncl":
        kernel("bn_backward_partial_ncl", x.dtype)((c, b), (256,), (dyv, xv, np.int64(n), np.int64(c), np.int64(l),
                                                                      mean_acc, psum, pdot))
    else:
        kernel("bn_backward_partial_mc", x.dtype)((math.ceil(c / 32), b), (32, 8), (dyv, xv, np.int64(n), np.int64(c),
                                                                                    mean_acc, psum, pdot))
    inv = inv_std.astype(acc)
    dbeta = psum.sum(axis=1)
    dgamma = pdot.sum(axis=1) * inv
    a = inv if gamma is None else gamma.astype(acc) * inv
    bcoef = -a * inv * dgamma / count
    kcoef = -a * dbeta / count
    dx, dxv = _empty_output(x, xv.shape)
    grid, block = _elementwise_grid(xv.size, sms)
    kernel("bn_backward_dx", x.dtype)(grid, block, (dyv, xv, dxv, np.int64(xv.size), np.int64(c),
                                                    np.int64(l if layout == "ncl" else 1), mean_acc,
                                                    cupy.ascontiguousarray(a), cupy.ascontiguousarray(bcoef),
                                                    cupy.ascontiguousarray(kcoef)))
    return dx, dgamma, dbeta


GPU_SHAPES = [(256, 64, 56, 56), (256, 256, 14, 14), (64, 128, 28, 28), (32, 32, 112, 112), (128, 1024, 7, 7),
              (8192, 1024)]
GPU_CONFIGS = [("float32", "NCHW"), ("float32", "NHWC"), ("float16", "NHWC")]


def copy_bandwidth(nbytes=1 << 30, repeats=10):
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written per second)."""
    import cupy
    src = cupy.ones(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for i in range(repeats + 2):
        start.record()
        cupy.copyto(dst, src)
        stop.record()
        stop.synchronize()
        if i >= 2:
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * nbytes / float(np.median(times))


def bench_gpu(shapes=GPU_SHAPES, configs=GPU_CONFIGS, repeats=20, rotate=4, progress=True):
    """bnlib's CuPy kernels vs torch.nn.functional.batch_norm on the same GPU, in one process.

    CUDA events on torch's current stream, warm-up, interleaved repeats, medians; `rotate` different
    inputs per case, used in turn, and a 256 MB write between timed calls (untimed) that evicts the
    L2 cache, so that no timing runs on data a previous call left in L2. Each row also gives
    the 8-pass DRAM floor of a training step (8 x tensor bytes / copy bandwidth) and the fraction of
    it reached (floor / measured time).
    """
    import cupy
    import torch
    with cupy_stream(torch.cuda.current_stream()):    # CuPy kernels and events on torch's stream
        return _bench_gpu(cupy, torch, shapes, configs, repeats, rotate, progress)


def _bench_gpu(cupy, torch, shapes, configs, repeats, rotate, progress):
    from bnlib import functional as F
    bandwidth = copy_bandwidth()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    flush = cupy.empty(256 << 20, dtype=cupy.uint8)   # larger than any L2 (50-60 MB on H100/H200)

    def timed(fn):
        flush.fill(1)                                  # untimed: evicts what the last call cached
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3

    rows = []
    cases = [(s, d, lay) for s in shapes for d, lay in configs if not (len(s) == 2 and lay == "NHWC")]
    try:
        from tqdm.auto import tqdm
        cases_iter = tqdm(cases, desc="GPU benchmark", disable=not progress)
    except ImportError:
        cases_iter = cases
    for shape, dtype, layout in cases_iter:
        tdtype = getattr(torch, dtype)
        c = shape[1]
        fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        xs = [torch.randn(shape, device="cuda", dtype=tdtype).contiguous(memory_format=fmt) for _ in range(rotate)]
        dys = [torch.randn(shape, device="cuda", dtype=tdtype).contiguous(memory_format=fmt) for _ in range(rotate)]
        w = torch.rand(c, device="cuda") + 0.5
        b = torch.randn(c, device="cuda")
        xs_req = [x.detach().requires_grad_() for x in xs]      # same storage: same cache state as bnlib's
        cx = [cupy.from_dlpack(x) for x in xs]
        cdy = [cupy.from_dlpack(d) for d in dys]
        cw, cb = cupy.from_dlpack(w), cupy.from_dlpack(b)

        def torch_fwd(i):
            with torch.no_grad():
                torch.nn.functional.batch_norm(xs[i], None, None, w, b, training=True)

        def torch_step(i):
            xs_req[i].grad = None
            torch.nn.functional.batch_norm(xs_req[i], None, None, w, b, training=True).backward(dys[i])

        def bnlib_fwd(i):
            F.batch_norm_forward(cx[i], cw, cb)

        def bnlib_step(i):
            _, cache = F.batch_norm_forward(cx[i], cw, cb)
            F.batch_norm_backward(cdy[i], cache)

        impls = {"torch": (torch_fwd, torch_step), "bnlib": (bnlib_fwd, bnlib_step)}
        times = {k: ([], []) for k in impls}
        torch.cuda.synchronize()
        for fwd, step in impls.values():
            for i in range(rotate):
                fwd(i), step(i)
        for r in range(repeats):
            i, j = r % rotate, (r + rotate // 2) % rotate     # the step runs on other data than the forward
            for name, (fwd, step) in impls.items():
                times[name][0].append(timed(lambda: fwd(i)))
                times[name][1].append(timed(lambda: step(j)))
        floor = 8 * xs[0].numel() * xs[0].element_size() / bandwidth
        base = [float(np.median(t)) for t in times["torch"]]
        for name, (tf, ts) in times.items():
            f, s = float(np.median(tf)), float(np.median(ts))
            rows.append({"shape": list(shape), "dtype": dtype, "layout": layout, "impl": name,
                         "forward_ms": 1e3 * f, "step_ms": 1e3 * s, "forward_ratio": f / base[0],
                         "step_ratio": s / base[1], "floor_ms": 1e3 * floor, "floor_fraction": floor / s,
                         "tensor_mb": xs[0].numel() * xs[0].element_size() / 1e6,
                         "copy_bandwidth_gbs": bandwidth / 1e9})
    return rows


def format_gpu_table(rows) -> str:
    lines = [f"{'shape':>20} {'dtype':>8} {'layout':>6} {'impl':>6} {'fwd ms':>8} {'step ms':>8} "
             f"{'step/torch':>10} {'8-pass floor ms':>15} {'of floor':>8}"]
    for r in rows:
        lines.append(f"{str(tuple(r['shape'])):>20} {r['dtype']:>8} {r['layout']:>6} {r['impl']:>6} "
                     f"{r['forward_ms']:8.3f} {r['step_ms']:8.3f} {r['step_ratio']:10.2f} "
                     f"{r['floor_ms']:15.3f} {r['floor_fraction']:8.0%}")
    return "\n".join(lines)


def gpu_environment() -> dict:
    import cupy
    import torch
    props = cupy.cuda.runtime.getDeviceProperties(0)
    return {"card": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
            "date": __import__("datetime").date.today().isoformat(), "cupy": cupy.__version__,
            "torch": torch.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "driver": cupy.cuda.runtime.driverGetVersion(), "numpy": np.__version__}
