# GENERATED FILE: do not edit.
# bnlib.cuda is generated from chapters/05_cupy.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['KERNEL_DESIGN', 'KERNEL_COMMON', 'KERNEL_STATS', 'KERNEL_APPLY', 'KERNEL_BACKWARD_REDUCE', 'KERNEL_BACKWARD_DX', 'KERNEL_BACKWARD', 'KERNEL_SOURCE', 'kernel_names', 'instantiation_source', 'nvcc_version', 'ptxas_usage', 'resource_usage', 'PTXAS_RECORDING', 'recorded_ptxas_usage', 'Plan', 'plan', 'flat_cursor', 'available', 'NVRTC_OPTIONS', 'module', 'LAUNCHER', 'L2_CHUNK_BYTES', 'MIN_VECTORS_PER_THREAD', 'PLANES_MIN_BYTES', 'kernel_parameters', 'pack_arguments', 'cupy_stream', 'workspace_bytes', 'suggested_memory_format', 'forward_torch', 'backward_torch', 'inference_torch', 'supports', 'accumulation_dtype', 'is_channels_last']

import contextlib
import functools
import math
import numbers
import os
import re
import struct
import threading
import weakref
from typing import NamedTuple

import numpy as np

KERNEL_DESIGN = 3        # design 2 plus: running statistics in the forward's kernels, the driver launch
                         # path, merge trees in the columns reductions, reversed second passes, planes
                         # kernels that load UNROLL vectors at a time across plane boundaries (and,
                         # added since its H200 run, FLAT instantiations of the planes kernels, which
                         # plan's flat_cursor picks only for short segments shared by several planes:
                         # no benchmarked plan; the other instantiations are design 3's code)

KERNEL_COMMON = r"""
// Batch-norm kernels for bnlib.cuda, third design (the second's, with the running-statistics update in
// the forward's kernels, merge trees in the columns reductions, reversed second passes, and planes
// kernels that load UNROLL vectors at a time across plane boundaries: PlaneCursor). T is the
// storage type (__half, bf16_t, float,
// double), A the accumulation type (float, or double for double data). V values of T make one
// 16-byte vector load (V = 1: the scalar fallback for unaligned data, and for planes whose length is
// not a multiple of the vector). Two ways to walk a tensor:
//   planes: (N, C, L) C-contiguous with large L (NCHW; a small L too when PLANES_MIN_BYTES is lowered):
//           block (c, b, s) owns channel c and walks planes n = b, b + B, ... and, inside each plane,
//           its segment s of L/V vectors;
//   cols:   the tensor as rows of Wf columns (NHWC (M, C), 2-D (N, C), or NCHW with a small L as
//           (N, C*L)), rows folded so that Wf is a multiple of V and >= 16 V: a thread owns V fixed
//           columns (so fixed channels: no per-element division) and walks rows.
#include <cuda_fp16.h>

struct bf16_t { unsigned short bits; };        // bfloat16 storage: the top half of a float32

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(bf16_t v) { return __uint_as_float(((unsigned int)v.bits) << 16); }

template <typename T> struct Store;
template <> struct Store<float> { static __device__ __forceinline__ float from(float v) { return v; } };
template <> struct Store<double> { static __device__ __forceinline__ double from(double v) { return v; } };
template <> struct Store<__half> { static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); } };
template <> struct Store<bf16_t> {
    // round to nearest even, as torch does; NaN stays a (quiet) NaN
    static __device__ __forceinline__ bf16_t from(float v) {
        unsigned int u = __float_as_uint(v);
        bf16_t r;
        if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = (unsigned short)((u >> 16) | 0x40u); return r; }
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (unsigned short)(u >> 16);
        return r;
    }
};

template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

#define PLANE_THREADS 256   // planes kernels: 1-D blocks of 256 threads
#define TX 16               // cols kernels: 16 x 16 blocks, 16 vector columns by 16 row groups
#define TY 16
#define UNROLL 4            // vectors loaded before any arithmetic
#define FINALIZE_THREADS 256  // finalize kernels: one block of 256 threads per channel

// Chan, Golub & LeVeque: merge the moments (nb, mb, qb) into (n, m, q).
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& m, A& q, A nb, A mb, A qb) {
    if (nb == A(0)) return;
    const A total = n + nb;
    const A delta = mb - m;
    const A wb = nb / total;
    m += delta * wb;
    q += qb + delta * delta * n * wb;
    n = total;
}

// A thread sums d = x - K and d * d with K its own first value (shifted data: no division per
// value, and no cancellation while K is within a few standard deviations of the thread's values);
// here the sums become moments (count, mean, M2).
template <typename A>
__device__ __forceinline__ void shifted_to_moments(A cnt, A shift, A s1, A s2, A& n, A& m, A& q) {
    n = cnt;
    m = A(0);
    q = A(0);
    if (cnt > A(0)) {
        const A d = s1 / cnt;
        m = shift + d;
        q = s2 - s1 * d;
        if (q < A(0)) q = A(0);
    }
}

template <typename T, int V, typename A>
__device__ __forceinline__ void add_shifted(const Vec<T, V>& a, A shift, A& s1, A& s2) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const A d = to_acc(a.v[k]) - shift;
        s1 += d;
        s2 += d * d;
    }
}

// Merge the moments of every thread of a 1-D block (<= 1024 threads); thread 0 ends with the result.
template <typename A>
__device__ void block_merge(A& n, A& m, A& q) {
    __shared__ A sn[32], sm[32], sq[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const A n2 = __shfl_down_sync(0xffffffffu, n, off);
        const A m2 = __shfl_down_sync(0xffffffffu, m, off);
        const A q2 = __shfl_down_sync(0xffffffffu, q, off);
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
            const A n2 = __shfl_down_sync(0xffffffffu, n, off);
            const A m2 = __shfl_down_sync(0xffffffffu, m, off);
            const A q2 = __shfl_down_sync(0xffffffffu, q, off);
            chan_merge(n, m, q, n2, m2, q2);
        }
    }
}

// Sum two values over a 1-D block; thread 0 ends with the totals.
template <typename A>
__device__ void block_sum2(A& s, A& t) {
    __shared__ A ss[32], st[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_down_sync(0xffffffffu, s, off);
        t += __shfl_down_sync(0xffffffffu, t, off);
    }
    if (lane == 0) { ss[warp] = s; st[warp] = t; }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        s = lane < warps ? ss[lane] : A(0);
        t = lane < warps ? st[lane] : A(0);
        for (int off = 16; off > 0; off >>= 1) {
            s += __shfl_down_sync(0xffffffffu, s, off);
            t += __shfl_down_sync(0xffffffffu, t, off);
        }
    }
}

// The end of the columns reductions: merge the TY row groups of a block, for each of a thread's V
// columns, R values per column (R = 3 moments, or 2 sums) combined by Merge::apply(a, b), a <- a with
// b. A warp holds two row groups (lanes tx and tx + TX), so the first level is a shuffle; the other
// log2(TY) - 1 levels are a tree in shared memory over the pairs: pair g merges pair g + h, pairs
// below h are written and pairs from h on read, so none is both. Fixed order: deterministic. Row
// group 0 ends with the block's result in v. Every thread of the block must call it.
struct MergeMoments {                          // (n, mean, M2) triples, by Chan's formula
    template <typename A> __device__ static void apply(A* a, const A* b) { chan_merge(a[0], a[1], a[2], b[0], b[1], b[2]); }
};
struct MergeSums {                             // plain sums
    template <typename A> __device__ static void apply(A* a, const A* b) { a[0] += b[0]; a[1] += b[1]; }
};

template <typename Merge, int R, int V, typename A>
__device__ __forceinline__ void merge_row_groups(A (&v)[R][V], A (&sh)[TY / 2][R][V][TX]) {
    static_assert((TY & (TY - 1)) == 0 && TX == 16, "the merge tree: TY a power of 2, two row groups per warp");
    const int tx = threadIdx.x, g = threadIdx.y >> 1;
    const bool even = (threadIdx.y & 1) == 0;  // after the shuffle, row group 2g speaks for 2g and 2g + 1
#pragma unroll
    for (int k = 0; k < V; ++k) {
        A mine[R], theirs[R];
#pragma unroll
        for (int j = 0; j < R; ++j) {
            mine[j] = v[j][k];
            theirs[j] = __shfl_down_sync(0xffffffffu, mine[j], TX);     // lane tx + 16: row group ty + 1
        }
        if (even) {
            Merge::apply(mine, theirs);
#pragma unroll
            for (int j = 0; j < R; ++j) { v[j][k] = mine[j]; sh[g][j][k][tx] = mine[j]; }
        }
    }
    __syncthreads();
#pragma unroll
    for (int h = TY / 4; h > 0; h >>= 1) {
        if (even && g < h) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                A mine[R], theirs[R];
#pragma unroll
                for (int j = 0; j < R; ++j) { mine[j] = v[j][k]; theirs[j] = sh[g + h][j][k][tx]; }
                Merge::apply(mine, theirs);
#pragma unroll
                for (int j = 0; j < R; ++j) { v[j][k] = mine[j]; sh[g][j][k][tx] = mine[j]; }
            }
        }
        __syncthreads();
    }
}

// The channel of column `col` of a cols walk: rows of the original tensor are W = C * L wide, and
// a folded row holds Wf / W of them. One division per column a thread owns, not per value.
__device__ __forceinline__ int column_channel(int col, int W, int L) { return (col % W) / L; }

// Second passes (normalize, dx) walk in the reverse order of the first (stats, reduce): the data a
// first pass read last is the most likely to be still in L2, so the second pass starts there.
// planes: block (c, b, s) of a second pass takes the first pass's block (c, B-1-b, S-1-s) and its
// planes from the last down; cols: row block B-1-b and each thread's rows from the last down.
// rows_of: how many of the rows first, first + step, ... lie below `end`.
__device__ __forceinline__ long long rows_of(long long first, long long end, long long step) {
    return first < end ? (end - 1 - first) / step + 1 : 0;
}

// The vectors of a planes-walk thread, in its order: planes n = first, first + step, ... (step < 0 for
// a second pass, from the last plane down) while 0 <= n < N, and in each plane the offsets
// lo + threadIdx.x, lo + threadIdx.x + PLANE_THREADS, ... below hi. The kernels take them UNROLL at a
// time across plane boundaries, so a thread with fewer than UNROLL vectors per plane (small planes,
// 16-bit data) still has UNROLL loads in flight; moving on costs an add and a compare, no division.
struct PlaneCursor {
    long long i, lo, hi, base, plane_stride;  // base = (n * C + c) * LV, the vector index of plane n's start
    int n, step, N;
    __device__ __forceinline__ bool valid() const { return i < hi && n >= 0 && n < N; }
    __device__ __forceinline__ long long index() const { return base + i; }
    __device__ __forceinline__ void next() {
        i += PLANE_THREADS;
        if (i >= hi) { i = lo + threadIdx.x; n += step; base += plane_stride; }
    }
};

__device__ __forceinline__ PlaneCursor plane_cursor(int first, int step, int N, int C, int c, long long LV,
                                                    long long lo, long long hi) {
    PlaneCursor k;
    k.i = lo + threadIdx.x; k.lo = lo; k.hi = hi; k.n = first; k.step = step; k.N = N;
    k.base = ((long long)first * C + c) * LV;
    k.plane_stride = (long long)step * C * LV;
    return k;
}

// PlaneCursor leaves threads lo + t >= hi idle in every plane of a segment shorter than the block
// (planes under 4 KB, walked as planes when PLANES_MIN_BYTES is lowered or when plan falls back to
// planes for a wide tensor's scratch). The planes kernels' FLAT instantiations (plan's flat_cursor,
// chosen only where a segment is that short and a block has several planes) take FlatPlaneCursor: the
// block's segments of consecutive planes read as one sequence. Thread t starts at position t of it
// (plane t / len, offset t % len: two divisions, once) and steps PLANE_THREADS positions, skip =
// PLANE_THREADS / len whole planes and wrap = PLANE_THREADS % len offsets, then one plane more if the
// offset passes hi; no division per step. Every thread has work when the block's planes hold
// PLANE_THREADS positions or more; a warp's loads stay consecutive within a plane. The other
// instantiations keep PlaneCursor, so their code is design 3's.
struct FlatPlaneCursor {
    long long i, lo, hi, base, plane_stride;
    int n, step, N, skip, wrap;
    __device__ __forceinline__ bool valid() const { return i < hi && n >= 0 && n < N; }
    __device__ __forceinline__ long long index() const { return base + i; }
    __device__ __forceinline__ void next() {
        i += wrap; n += skip * step; base += skip * plane_stride;
        if (i >= hi) { i -= hi - lo; n += step; base += plane_stride; }
    }
};

__device__ __forceinline__ FlatPlaneCursor flat_plane_cursor(int first, int step, int N, int C, int c, long long LV,
                                                             long long lo, long long hi) {
    FlatPlaneCursor k;
    const long long len = hi - lo;            // > 0: plan's segments are never empty
    k.lo = lo; k.hi = hi; k.step = step; k.N = N;
    k.skip = (int)(PLANE_THREADS / len); k.wrap = (int)(PLANE_THREADS % len);
    k.i = lo + threadIdx.x % len; k.n = first + (int)(threadIdx.x / len) * step;
    k.base = ((long long)k.n * C + c) * LV;
    k.plane_stride = (long long)step * C * LV;
    return k;
}

// The cursor of planes block (c, b, s) = blockIdx: a first pass (stats, reduce) walks planes b, b + B, ...
// in segment s; a second pass takes the first pass's block (c, B-1-b, S-1-s) from its last plane down.
__device__ __forceinline__ PlaneCursor block_plane_cursor(int N, int C, long long LV, long long seg, bool second) {
    const int b = second ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
    const long long lo = (long long)(second ? gridDim.z - 1 - blockIdx.z : blockIdx.z) * seg;
    if (!second)
        return plane_cursor(b, gridDim.y, N, C, blockIdx.x, LV, lo, min(LV, lo + seg));
    return plane_cursor(b + (int)(rows_of(b, N, gridDim.y) - 1) * gridDim.y, -(int)gridDim.y, N, C, blockIdx.x,
                        LV, lo, min(LV, lo + seg));
}

// block_plane_cursor's block and planes, walked with the cursor of the kernel's instantiation.
template <bool FLAT>
__device__ __forceinline__ auto block_cursor(int N, int C, long long LV, long long seg, bool second) {
    if constexpr (!FLAT) {
        return block_plane_cursor(N, C, LV, seg, second);
    } else {
        const int b = second ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
        const long long lo = (long long)(second ? gridDim.z - 1 - blockIdx.z : blockIdx.z) * seg;
        if (!second)
            return flat_plane_cursor(b, gridDim.y, N, C, blockIdx.x, LV, lo, min(LV, lo + seg));
        return flat_plane_cursor(b + (int)(rows_of(b, N, gridDim.y) - 1) * gridDim.y, -(int)gridDim.y, N, C,
                                 blockIdx.x, LV, lo, min(LV, lo + seg));
    }
}

// The per-channel affine map of the normalize pass, y = (x - mu) * a + beta, from either the batch
// statistics (stat = inv_std) or the running ones (from_var: stat = running variance).
template <typename A>
__device__ __forceinline__ void channel_coefficients(int c, const A* __restrict__ mean, const A* __restrict__ stat,
                                                     const A* __restrict__ weight, const A* __restrict__ bias, A eps,
                                                     int from_var, A& mu, A& a, A& beta) {
    mu = mean[c];
    const A inv = from_var ? A(1) / sqrt(stat[c] + eps) : stat[c];
    a = weight ? weight[c] * inv : inv;
    beta = bias ? bias[c] : A(0);
}
"""


KERNEL_STATS = r"""
// Forward, pass 1 (planes): block (c, b, s) reduces its planes' segment to one partial (n, mean, M2),
// stored at j = (b * S + s) * C + c of the three arrays part[0:P], part[P:2P], part[2P:3P].
template <typename T, int V, bool FLAT = false>
__global__ void __launch_bounds__(PLANE_THREADS)
bn_stats_planes(const T* __restrict__ x, int N, int C, long long LV, long long seg,
                typename Acc<T>::type* __restrict__ part, long long P, long long* __restrict__ counter) {
    typedef typename Acc<T>::type A;
    if (counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0)
        *counter += 1;                        // num_batches_tracked: one batch more (the finalize reads it)
    const int c = blockIdx.x;
    const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
    A shift = A(0), s1 = A(0), s2 = A(0), cnt = A(0);
    auto cur = block_cursor<FLAT>(N, C, LV, seg, false);
    if (cur.valid())                          // the thread's first value: the shift of its sums
        shift = to_acc(xv[cur.index()].v[0]);
    while (cur.valid()) {                     // UNROLL vectors (those left), across planes, loaded, then used
        Vec<T, V> a[UNROLL];
        bool has[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            has[u] = cur.valid();
            if (has[u]) { a[u] = xv[cur.index()]; cur.next(); }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (has[u]) { add_shifted(a[u], shift, s1, s2); cnt += A(V); }
    }
    A n, m, q;
    shifted_to_moments(cnt, shift, s1, s2, n, m, q);
    block_merge(n, m, q);
    if (threadIdx.x == 0) {
        const long long j = ((long long)blockIdx.y * gridDim.z + blockIdx.z) * C + c;
        part[j] = n;
        part[P + j] = m;
        part[2 * P + j] = q;
    }
}

// Forward, pass 1 (cols): thread (tx, ty) of block (bx, b) owns vector column vc = bx * TX + tx
// (columns col0 = vc * V ... col0 + V - 1) and rows r = b * TY + ty, stepping by TY * gridDim.y.
// Rows 0 .. Rfull - 1 are full; row Rfull (if total % Wf != 0) is partial. The TY row groups are
// merged by merge_row_groups, a tree over all V columns of a thread at once (the second design merged
// one column at a time, TY - 1 merges in a row by one thread per column); the tree takes 12 KB of
// shared memory for 16-bit data. The block writes one partial per column at b * Wf + column.
template <typename T, int V>
__global__ void __launch_bounds__(TX * TY)
bn_stats_cols(const T* __restrict__ x, long long total, long long Rfull, int Wf,
              typename Acc<T>::type* __restrict__ part, long long P, long long* __restrict__ counter) {
    typedef typename Acc<T>::type A;
    if (counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0)
        *counter += 1;
    __shared__ A shared[TY / 2][3][V][TX];
    const int vc = blockIdx.x * TX + threadIdx.x;
    const int col0 = vc * V;
    const bool active = col0 < Wf;
    const long long step = (long long)TY * gridDim.y;
    const long long r0 = (long long)blockIdx.y * TY + threadIdx.y;
    A shift[V], s1[V], s2[V], cnt[V];
    if (active && r0 < Rfull) {               // the shifts: the thread's first row, one vector load
        const Vec<T, V> a = reinterpret_cast<const Vec<T, V>*>(x)[r0 * (Wf / V) + vc];
#pragma unroll
        for (int k = 0; k < V; ++k) shift[k] = to_acc(a.v[k]);
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const long long first = r0 * Wf + col0 + k;
            shift[k] = (active && first < total) ? to_acc(x[first]) : A(0);
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) { s1[k] = A(0); s2[k] = A(0); cnt[k] = A(0); }
    if (active) {
        const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
        const long long vw = Wf / V;
        long long r = r0;
        for (; r + (UNROLL - 1) * step < Rfull; r += UNROLL * step) {
            Vec<T, V> a[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) a[u] = xv[(r + u * step) * vw + vc];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A d = to_acc(a[u].v[k]) - shift[k];
                    s1[k] += d; s2[k] += d * d;
                }
#pragma unroll
            for (int k = 0; k < V; ++k) cnt[k] += A(UNROLL);
        }
        for (; r < Rfull; r += step) {
            const Vec<T, V> a = xv[r * vw + vc];
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const A d = to_acc(a.v[k]) - shift[k];
                s1[k] += d; s2[k] += d * d; cnt[k] += A(1);
            }
        }
        if (r == Rfull) {                     // the partial last row, if any, is this thread's
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const long long i = r * Wf + col0 + k;
                if (i < total) {
                    const A d = to_acc(x[i]) - shift[k];
                    s1[k] += d; s2[k] += d * d; cnt[k] += A(1);
                }
            }
        }
    }
    A mom[3][V];                              // (n, mean, M2) of each column
#pragma unroll
    for (int k = 0; k < V; ++k) shifted_to_moments(cnt[k], shift[k], s1[k], s2[k], mom[0][k], mom[1][k], mom[2][k]);
    merge_row_groups<MergeMoments>(mom, shared);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const long long p = (long long)blockIdx.y * Wf + col0 + k;
            part[p] = mom[0][k];
            part[P + p] = mom[1][k];
            part[2 * P + p] = mom[2][k];
        }
    }
}

// Where the i-th of a channel's Q partials lies. planes: GL = L = 1, Wf = W = C, so j = i * C + c.
// cols: i = (b, f, l) with f < Wf / W (folded rows) and l < L, at column f * W + c * L + l of row b.
__device__ __forceinline__ long long partial_index(long long i, int c, long long GL, long long L, long long Wf,
                                                   long long W) {
    const long long b = i / GL, rem = i - b * GL, f = rem / L, l = rem - f * L;
    return b * Wf + f * W + (long long)c * L + l;
}

// Forward, finalize: block c merges channel c's Q partials in a fixed order (deterministic), and
// writes mean[c], the biased variance var[c] and inv_std[c] = 1 / sqrt(var + eps). With running_mean
// (and running_var) given, it also updates them in place, as torch's own kernel does:
// running = (1 - f) running + f batch, with the variance unbiased (times unbias = n / (n - 1)) and
// f = momentum, or, for momentum < 0 (torch's momentum=None), the cumulative average f = 1 / *counter,
// the batch count the stats kernel has just incremented. No host round trip for either.
template <typename A>
__global__ void __launch_bounds__(FINALIZE_THREADS)
bn_stats_finalize(const A* __restrict__ part, long long P, long long Q, long long GL, long long L, long long Wf,
                  long long W, int C, A eps, A* __restrict__ mean, A* __restrict__ var,
                  A* __restrict__ inv_std, A* __restrict__ running_mean, A* __restrict__ running_var,
                  A momentum, A unbias, const long long* __restrict__ counter) {
    const int c = blockIdx.x;
    A n = A(0), m = A(0), q = A(0);
    for (long long i0 = threadIdx.x; i0 < Q; i0 += UNROLL * (long long)blockDim.x) {
        A pn[UNROLL], pm[UNROLL], pq[UNROLL];      // UNROLL partials loaded before merging any
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long i = i0 + u * (long long)blockDim.x;
            pn[u] = A(0); pm[u] = A(0); pq[u] = A(0);
            if (i < Q) {
                const long long j = partial_index(i, c, GL, L, Wf, W);
                pn[u] = part[j]; pm[u] = part[P + j]; pq[u] = part[2 * P + j];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) chan_merge(n, m, q, pn[u], pm[u], pq[u]);
    }
    block_merge(n, m, q);
    if (threadIdx.x == 0 && c < C) {
        const A v = n > A(0) ? q / n : A(0);
        mean[c] = m;
        var[c] = v;
        inv_std[c] = A(1) / sqrt(v + eps);
        if (running_mean != nullptr) {
            const A f = momentum >= A(0) ? momentum : A(1) / A(*counter);
            running_mean[c] = (A(1) - f) * running_mean[c] + f * m;
            running_var[c] = (A(1) - f) * running_var[c] + f * (v * unbias);
        }
    }
}
"""


KERNEL_APPLY = r"""
// Forward, pass 2 (and the whole eval forward): y = (x - mu) * a + beta with the channel's
// coefficients in registers (channel_coefficients), one FMA per value, same walks as pass 1.
template <typename T, int V, bool FLAT = false>
__global__ void __launch_bounds__(PLANE_THREADS)
bn_apply_planes(const T* __restrict__ x, T* __restrict__ y, int N, int C, long long LV, long long seg,
                const typename Acc<T>::type* __restrict__ mean, const typename Acc<T>::type* __restrict__ stat,
                const typename Acc<T>::type* __restrict__ weight, const typename Acc<T>::type* __restrict__ bias,
                typename Acc<T>::type eps, int from_var) {
    typedef typename Acc<T>::type A;
    const int c = blockIdx.x;
    A mu, a, beta;
    channel_coefficients(c, mean, stat, weight, bias, eps, from_var, mu, a, beta);
    const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
    Vec<T, V>* __restrict__ yv = reinterpret_cast<Vec<T, V>*>(y);
    auto cur = block_cursor<FLAT>(N, C, LV, seg, true);     // reversed: from the last plane down
    while (cur.valid()) {                     // UNROLL vectors (those left), across planes, loaded, then used
        Vec<T, V> v[UNROLL];
        long long at[UNROLL];
        bool has[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            has[u] = cur.valid();
            if (has[u]) { at[u] = cur.index(); v[u] = xv[at[u]]; cur.next(); }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (has[u]) {
                Vec<T, V> o;
#pragma unroll
                for (int k = 0; k < V; ++k) o.v[k] = Store<T>::from((to_acc(v[u].v[k]) - mu) * a + beta);
                yv[at[u]] = o;
            }
        }
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(TX * TY)
bn_apply_cols(const T* __restrict__ x, T* __restrict__ y, long long total, long long Rfull, int Wf, int W, int L,
              const typename Acc<T>::type* __restrict__ mean, const typename Acc<T>::type* __restrict__ stat,
              const typename Acc<T>::type* __restrict__ weight, const typename Acc<T>::type* __restrict__ bias,
              typename Acc<T>::type eps, int from_var) {
    typedef typename Acc<T>::type A;
    const int vc = blockIdx.x * TX + threadIdx.x;
    const int col0 = vc * V;
    if (col0 >= Wf) return;
    A mu[V], a[V], beta[V];
#pragma unroll
    for (int k = 0; k < V; ++k)
        channel_coefficients(column_channel(col0 + k, W, L), mean, stat, weight, bias, eps, from_var, mu[k], a[k], beta[k]);
    const long long step = (long long)TY * gridDim.y;
    const long long vw = Wf / V;
    const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
    Vec<T, V>* __restrict__ yv = reinterpret_cast<Vec<T, V>*>(y);
    const long long r0 = (long long)(gridDim.y - 1 - blockIdx.y) * TY + threadIdx.y;    // reversed
    const long long rows = rows_of(r0, Rfull, step);
    if (r0 + rows * step == Rfull) {          // the partial last row, if any, is this thread's
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const long long i = Rfull * Wf + col0 + k;
            if (i < total) y[i] = Store<T>::from((to_acc(x[i]) - mu[k]) * a[k] + beta[k]);
        }
    }
    long long j = rows - 1;
    for (; j >= UNROLL - 1; j -= UNROLL) {
        Vec<T, V> v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = xv[(r0 + (j - u) * step) * vw + vc];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            Vec<T, V> o;
#pragma unroll
            for (int k = 0; k < V; ++k) o.v[k] = Store<T>::from((to_acc(v[u].v[k]) - mu[k]) * a[k] + beta[k]);
            yv[(r0 + (j - u) * step) * vw + vc] = o;
        }
    }
    for (; j >= 0; --j) {
        const Vec<T, V> v = xv[(r0 + j * step) * vw + vc];
        Vec<T, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = Store<T>::from((to_acc(v.v[k]) - mu[k]) * a[k] + beta[k]);
        yv[(r0 + j * step) * vw + vc] = o;
    }
}
"""


KERNEL_BACKWARD_REDUCE = r"""
// Backward, pass 1: per-channel partial sums of dy and dy * (x - mean), same walks and partial
// layout as forward pass 1 (two arrays: part[0:P] and part[P:2P]).
template <typename T, int V, bool FLAT = false>
__global__ void __launch_bounds__(PLANE_THREADS)
bn_backward_reduce_planes(const T* __restrict__ dy, const T* __restrict__ x, int N, int C, long long LV,
                          long long seg, const typename Acc<T>::type* __restrict__ mean,
                          typename Acc<T>::type* __restrict__ part, long long P) {
    typedef typename Acc<T>::type A;
    const int c = blockIdx.x;
    const A mu = mean[c];
    const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
    const Vec<T, V>* __restrict__ gv = reinterpret_cast<const Vec<T, V>*>(dy);
    A s = A(0), t = A(0);
    auto cur = block_cursor<FLAT>(N, C, LV, seg, false);
    while (cur.valid()) {                     // UNROLL vectors (those left), across planes, loaded, then used
        Vec<T, V> xa[UNROLL], ga[UNROLL];
        bool has[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            has[u] = cur.valid();
            if (has[u]) { xa[u] = xv[cur.index()]; ga[u] = gv[cur.index()]; cur.next(); }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (has[u]) {
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A g = to_acc(ga[u].v[k]);
                    s += g;
                    t += g * (to_acc(xa[u].v[k]) - mu);
                }
            }
        }
    }
    block_sum2(s, t);
    if (threadIdx.x == 0) {
        const long long j = ((long long)blockIdx.y * gridDim.z + blockIdx.z) * C + c;
        part[j] = s;
        part[P + j] = t;
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(TX * TY)
bn_backward_reduce_cols(const T* __restrict__ dy, const T* __restrict__ x, long long total, long long Rfull, int Wf,
                        int W, int L, const typename Acc<T>::type* __restrict__ mean,
                        typename Acc<T>::type* __restrict__ part, long long P) {
    typedef typename Acc<T>::type A;
    __shared__ A shared[TY / 2][2][V][TX];
    const int vc = blockIdx.x * TX + threadIdx.x;
    const int col0 = vc * V;
    const bool active = col0 < Wf;
    A mu[V], s[V], t[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        mu[k] = active ? mean[column_channel(col0 + k, W, L)] : A(0);
        s[k] = A(0); t[k] = A(0);
    }
    if (active) {
        const long long step = (long long)TY * gridDim.y;
        const long long vw = Wf / V;
        const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
        const Vec<T, V>* __restrict__ gv = reinterpret_cast<const Vec<T, V>*>(dy);
        long long r = (long long)blockIdx.y * TY + threadIdx.y;
        for (; r + (UNROLL - 1) * step < Rfull; r += UNROLL * step) {
            Vec<T, V> xa[UNROLL], ga[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) { xa[u] = xv[(r + u * step) * vw + vc]; ga[u] = gv[(r + u * step) * vw + vc]; }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A g = to_acc(ga[u].v[k]);
                    s[k] += g;
                    t[k] += g * (to_acc(xa[u].v[k]) - mu[k]);
                }
        }
        for (; r < Rfull; r += step) {
            const Vec<T, V> xa = xv[r * vw + vc], ga = gv[r * vw + vc];
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const A g = to_acc(ga.v[k]);
                s[k] += g;
                t[k] += g * (to_acc(xa.v[k]) - mu[k]);
            }
        }
        if (r == Rfull) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const long long i = r * Wf + col0 + k;
                if (i < total) {
                    const A g = to_acc(dy[i]);
                    s[k] += g;
                    t[k] += g * (to_acc(x[i]) - mu[k]);
                }
            }
        }
    }
    A sums[2][V];                             // the TY row groups summed as in bn_stats_cols
#pragma unroll
    for (int k = 0; k < V; ++k) { sums[0][k] = s[k]; sums[1][k] = t[k]; }
    merge_row_groups<MergeSums>(sums, shared);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const long long p = (long long)blockIdx.y * Wf + col0 + k;
            part[p] = sums[0][k];
            part[P + p] = sums[1][k];
        }
    }
}

// Backward, finalize: block c sums channel c's Q partials in a fixed order, writes
// dbeta = sum dy, dgamma = inv_std * sum dy (x - mean), and the dx coefficients
// coef = (a, b, k): dx = a dy + b (x - mean) + k with a = gamma inv_std, b = -a inv_std dgamma / count,
// k = -a dbeta / count.
template <typename A>
__global__ void __launch_bounds__(FINALIZE_THREADS)
bn_backward_finalize(const A* __restrict__ part, long long P, long long Q, long long GL, long long L, long long Wf,
                     long long W, int C, const A* __restrict__ inv_std, const A* __restrict__ weight, A count,
                     A* __restrict__ dweight, A* __restrict__ dbias, A* __restrict__ coef) {
    const int c = blockIdx.x;
    A s = A(0), t = A(0);
    for (long long i0 = threadIdx.x; i0 < Q; i0 += UNROLL * (long long)blockDim.x) {
        A ps[UNROLL], pt[UNROLL];                  // UNROLL partials loaded before adding any
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const long long i = i0 + u * (long long)blockDim.x;
            ps[u] = A(0); pt[u] = A(0);
            if (i < Q) {
                const long long j = partial_index(i, c, GL, L, Wf, W);
                ps[u] = part[j]; pt[u] = part[P + j];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) { s += ps[u]; t += pt[u]; }
    }
    block_sum2(s, t);
    if (threadIdx.x == 0) {
        const A inv = inv_std[c];
        const A dg = t * inv;
        dweight[c] = dg;
        dbias[c] = s;
        const A a = weight ? weight[c] * inv : inv;
        coef[c] = a;
        coef[C + c] = -a * inv * dg / count;
        coef[2 * C + c] = -a * s / count;
    }
}
"""


KERNEL_BACKWARD_DX = r"""
// Backward, pass 2: dx = a dy + b (x - mean) + k.
template <typename T, int V, bool FLAT = false>
__global__ void __launch_bounds__(PLANE_THREADS)
bn_backward_dx_planes(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int N, int C,
                      long long LV, long long seg, const typename Acc<T>::type* __restrict__ mean,
                      const typename Acc<T>::type* __restrict__ coef) {
    typedef typename Acc<T>::type A;
    const int c = blockIdx.x;
    const A mu = mean[c], a = coef[c], b = coef[C + c], k0 = coef[2 * C + c];
    const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
    const Vec<T, V>* __restrict__ gv = reinterpret_cast<const Vec<T, V>*>(dy);
    Vec<T, V>* __restrict__ ov = reinterpret_cast<Vec<T, V>*>(dx);
    auto cur = block_cursor<FLAT>(N, C, LV, seg, true);     // reversed: from the last plane down
    while (cur.valid()) {                     // UNROLL vectors (those left), across planes, loaded, then used
        Vec<T, V> xa[UNROLL], ga[UNROLL];
        long long at[UNROLL];
        bool has[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            has[u] = cur.valid();
            if (has[u]) { at[u] = cur.index(); xa[u] = xv[at[u]]; ga[u] = gv[at[u]]; cur.next(); }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (has[u]) {
                Vec<T, V> o;
#pragma unroll
                for (int k = 0; k < V; ++k)
                    o.v[k] = Store<T>::from(a * to_acc(ga[u].v[k]) + b * (to_acc(xa[u].v[k]) - mu) + k0);
                ov[at[u]] = o;
            }
        }
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(TX * TY)
bn_backward_dx_cols(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, long long total,
                    long long Rfull, int Wf, int W, int L, int C, const typename Acc<T>::type* __restrict__ mean,
                    const typename Acc<T>::type* __restrict__ coef) {
    typedef typename Acc<T>::type A;
    const int vc = blockIdx.x * TX + threadIdx.x;
    const int col0 = vc * V;
    if (col0 >= Wf) return;
    A mu[V], a[V], b[V], k0[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const int c = column_channel(col0 + k, W, L);
        mu[k] = mean[c]; a[k] = coef[c]; b[k] = coef[C + c]; k0[k] = coef[2 * C + c];
    }
    const long long step = (long long)TY * gridDim.y;
    const long long vw = Wf / V;
    const Vec<T, V>* __restrict__ xv = reinterpret_cast<const Vec<T, V>*>(x);
    const Vec<T, V>* __restrict__ gv = reinterpret_cast<const Vec<T, V>*>(dy);
    Vec<T, V>* __restrict__ ov = reinterpret_cast<Vec<T, V>*>(dx);
    const long long r0 = (long long)(gridDim.y - 1 - blockIdx.y) * TY + threadIdx.y;    // reversed
    const long long rows = rows_of(r0, Rfull, step);
    if (r0 + rows * step == Rfull) {          // the partial last row, if any, is this thread's
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const long long i = Rfull * Wf + col0 + k;
            if (i < total) dx[i] = Store<T>::from(a[k] * to_acc(dy[i]) + b[k] * (to_acc(x[i]) - mu[k]) + k0[k]);
        }
    }
    long long j = rows - 1;
    for (; j >= UNROLL - 1; j -= UNROLL) {
        Vec<T, V> xa[UNROLL], ga[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            xa[u] = xv[(r0 + (j - u) * step) * vw + vc];
            ga[u] = gv[(r0 + (j - u) * step) * vw + vc];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            Vec<T, V> o;
#pragma unroll
            for (int k = 0; k < V; ++k)
                o.v[k] = Store<T>::from(a[k] * to_acc(ga[u].v[k]) + b[k] * (to_acc(xa[u].v[k]) - mu[k]) + k0[k]);
            ov[(r0 + (j - u) * step) * vw + vc] = o;
        }
    }
    for (; j >= 0; --j) {
        const Vec<T, V> xa = xv[(r0 + j * step) * vw + vc], ga = gv[(r0 + j * step) * vw + vc];
        Vec<T, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = Store<T>::from(a[k] * to_acc(ga.v[k]) + b[k] * (to_acc(xa.v[k]) - mu[k]) + k0[k]);
        ov[(r0 + j * step) * vw + vc] = o;
    }
}
"""


KERNEL_BACKWARD = KERNEL_BACKWARD_REDUCE + KERNEL_BACKWARD_DX
KERNEL_SOURCE = KERNEL_COMMON + KERNEL_STATS + KERNEL_APPLY + KERNEL_BACKWARD

_TYPES = {"float16": "__half", "bfloat16": "bf16_t", "float32": "float", "float64": "double"}
_VEC = {"float16": 8, "bfloat16": 8, "float32": 4, "float64": 2}          # values per 16-byte load
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_DATA_KERNELS = ("bn_stats_planes", "bn_stats_cols", "bn_apply_planes", "bn_apply_cols", "bn_backward_reduce_planes",
                 "bn_backward_reduce_cols", "bn_backward_dx_planes", "bn_backward_dx_cols")
_FINALIZE_KERNELS = ("bn_stats_finalize", "bn_backward_finalize")
PLANE_THREADS, TX, TY, FINALIZE_THREADS = 256, 16, 16, 256       # must match the #defines of KERNEL_SOURCE


def kernel_names() -> list:
    """Every kernel instantiation the host code can launch ("bn_stats_cols<float, 4>", ...), the planes
    kernels also with FlatPlaneCursor ("bn_stats_planes<float, 4, true>", see plan's flat_cursor)."""
    names = [f"{k}<{t}, {v}>" for k in _DATA_KERNELS for d, t in _TYPES.items() for v in (_VEC[d], 1)]
    names += [f"{k}<{t}, {v}, true>" for k in _DATA_KERNELS if k.endswith("_planes")
              for d, t in _TYPES.items() for v in (_VEC[d], 1)]
    return names + [f"{k}<{a}>" for k in _FINALIZE_KERNELS for a in ("float", "double")]


def instantiation_source() -> str:
    """KERNEL_SOURCE plus a table that takes the address of every instantiation, so that an offline
    compiler (nvcc) builds each one, as NVRTC does from the name expressions."""
    table = ",\n".join(f"    (void*)&{n}" for n in kernel_names())
    return KERNEL_SOURCE + f"\nvoid* bnlib_kernels[] = {{\n{table}\n}};\n"


def nvcc_version(nvcc):
    """(major, minor) of the nvcc at path `nvcc`, from `nvcc --version` (None if it does not say)."""
    import subprocess
    found = re.search(r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _compile_instantiations(arch="sm_90", flags=()):
    """nvcc's finished process (returncode, stderr) for every kernel instantiation (instantiation_source())
    compiled for `arch` with --resource-usage and `flags`, into an object file in a temporary folder; None
    without nvcc. ptxas_usage runs it, and so does the compile check below."""
    import pathlib
    import shutil
    import subprocess
    import tempfile
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "bn.cu"
        src.write_text(instantiation_source())
        return subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "--resource-usage", *flags, "-c", str(src),
                               "-o", str(pathlib.Path(tmp) / "bn.o")], capture_output=True, text=True)


def ptxas_usage(arch="sm_90"):
    """(registers per thread, static shared memory bytes per block) of every kernel instantiation
    (nvcc --resource-usage); None without nvcc, CalledProcessError if the compile fails."""
    proc = _compile_instantiations(arch)
    if proc is None:
        return None
    proc.check_returncode()
    return resource_usage(proc.stderr)


def resource_usage(nvcc_output):
    """{kernel symbol: (registers per thread, static shared memory bytes per block)} from what
    nvcc --resource-usage prints (on stderr)."""
    usage, name = {}, None
    for line in nvcc_output.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        if (m := re.search(r"Used (\d+) registers", line)) and name:
            smem = re.search(r"(\d+) bytes smem", line)
            usage[name] = (int(m.group(1)), int(smem.group(1)) if smem else 0)
    return usage


PTXAS_RECORDING = "ptxas_sm90_nvcc13.0.json"   # bnlib/data: ptxas_usage() as nvcc 13.0 gave it (tools/record_ptxas.py)


def recorded_ptxas_usage():
    """The recorded {kernel symbol: (registers, shared bytes)} for sm_90 and the SHA-256 of the instantiation
    source it was compiled from, so that a page without nvcc 13.0 (Colab's is older) uses the same counts."""
    import hashlib
    import importlib.resources
    import json
    saved = json.loads(importlib.resources.files("bnlib").joinpath("data", PTXAS_RECORDING).read_text())
    current = hashlib.sha256(instantiation_source().encode()).hexdigest()
    if saved["source_sha256"] != current:
        raise RuntimeError(f"{PTXAS_RECORDING} was compiled from other kernels than these: rerun tools/record_ptxas.py "
                           "(in a checkout of the course; elsewhere, as on Colab, the bnlib installed is not the one "
                           "this notebook was written with: reinstall it with pip install --force-reinstall --no-deps "
                           "git+https://github.com/batchnorm-book/batchnorm-book, then restart the kernel)")
    return {name: tuple(v) for name, v in saved["usage"].items()}, saved


class Plan(NamedTuple):
    """How the kernels walk one tensor shape: chosen once per (shape, dtype, alignment, card)."""
    walk: str            # "planes" or "cols"
    vec: int             # values per load (16 bytes; 1 for unaligned data and odd-length planes)
    grid: tuple
    block: tuple
    walk_args: tuple     # planes: (N, C, L/vec, segment), C the plane stride; cols: (total, full rows, Wf)
    geometry: tuple      # cols: (W, L), the channel of a column is (col % W) // L; planes: ()
    partials: int        # P: partial results per array
    finalize_args: tuple # (P, Q, GL, L, Wf, W, C): where each channel's Q partials lie
    channels: int
    count: int           # values per channel
    workspace_values: int
    chunks: tuple = ()   # channel chunks for the L2 cache: ((first channel, plan of the chunk), ...)


_MIN_WORKSPACE = 1 << 20         # bytes: the smallest scratch buffer a thread keeps (_workspace)
_COLS_SCRATCH = (8, 64 << 20)    # plan: columns give way when their scratch is over 8x the tensor and 64 MiB


def _cdiv(a, b):
    return -(-a // b)


def _planes_plan(n, c, l, v, target, stride, min_vectors=1):
    """The planes walk of channels 0 .. c-1 of a (n, stride, l) tensor (c = stride: all of it)."""
    lv = l // v
    cap = _cdiv(n * lv, PLANE_THREADS * min_vectors)   # blocks per channel: about min_vectors loads a thread
    b = max(1, min(n, _cdiv(target, c), cap, 65535))
    s = max(1, min(_cdiv(target, c * b), _cdiv(lv, 2 * PLANE_THREADS), cap // b, 65535))
    seg = _cdiv(lv, s)
    s = _cdiv(lv, seg)
    p = b * s * stride                          # slot (b * S + s) * stride + c, as the kernels write it
    return Plan("planes", v, (c, b, s), (PLANE_THREADS, 1, 1), (n, stride, lv, seg), (), p,
                (p, b * s, 1, 1, stride, stride, stride), c, n * l, 3 * p + 3 * stride)


@functools.lru_cache(maxsize=1024)
def plan(rows: int, channels: int, length: int, dtype_name: str, aligned: bool, sm_count: int,
         chunk_bytes: int = 0, scratch: bool = True, min_vectors: int = 1, planes_min_bytes: int = 4096) -> Plan:
    """The walk for a C-contiguous (rows, channels, length) tensor: NCHW is (N, C, H*W), channels-last
    memory is (N*H*W, C, 1), a 2-D input (N, C, 1). Large planes (length * itemsize >= planes_min_bytes,
    4 KB: design 3's rule; the launchers pass PLANES_MIN_BYTES, and 0 walks every plane of more than one
    value so) are walked plane by plane, in 16-byte vectors when length is a multiple of the vector and
    one value per load otherwise; everything else as columns of (rows, C*length), folded so that a row holds at least TX
    vectors. (A large plane of odd length walked as columns would give each row of the view C*length
    columns and the finalize as many partials per channel: scratch of 24 times the tensor's bytes for
    (1, 3, 999, 999) float32.) Grids aim at 2 x SMs x 8 blocks (fewer when
    the tensor has too little work for that: few planes or plane segments, or a cols walk with
    less than one row per thread). min_vectors > 1 caps a grid further: no more blocks than give each
    thread of a first pass about min_vectors loads of x (a cols thread loads one vector per row of the
    folded view); 1, the default, leaves design 3's grids as they are (the launchers pass
    MIN_VECTORS_PER_THREAD).

    Columns keep 3 partials per column of the (folded) view and row block (8 bytes of scratch reserved for
    each: float64 for float64 data, float32 written otherwise), so a wide tensor of
    few rows can need scratch many times its own bytes (96 times, 192 MiB, for (1, 1023, 1023) float16,
    whose odd rows are folded 8 into one), and a fold can pass the kernels' 32-bit row width (Wf) on a
    tensor of half a GiB. When a training walk's columns would need scratch over both _COLS_SCRATCH
    limits (8 times x and 64 MiB; common shapes, batch 1 included, never pass both: at most 12 times x
    but 37 MiB, over N = 1..32, C = 64..2048, 7x7..28x28), or the row passes 2**31 values in any walk, planes
    are walked instead if length > 1 and they need less (without L2 chunks); with length 1
    (channels-last, 2-D), columns of one value per load, which need no fold for alignment. A row still
    2**31 values wide or more raises ValueError. scratch=False (evaluation: the normalize kernel uses
    no scratch) applies only the row-width rule.

    chunk_bytes > 0 (planes walks only): the bytes of x one chunk may hold (the launchers pass
    L2_CHUNK_BYTES // 2 for the forward and // 3 for the backward, see _chunk_bytes). When x holds more,
    its channels are split into chunks of at most chunk_bytes of x each (at least one channel), as few
    as that allows, whose channel counts differ by one at most, walked one chunk after the other
    (`chunks`), so that a pass's second read of a chunk can come from the L2 cache."""
    n, c, l = rows, channels, length
    vfull = _VEC[dtype_name] if aligned else 1
    target = 16 * sm_count
    if l > 1 and l * _ITEMSIZE[dtype_name] >= planes_min_bytes:
        return _planes_walk(n, c, l, dtype_name, vfull, target, chunk_bytes, min_vectors)
    cols = _cols_plan(n, c, l, vfull, target, min_vectors)
    wide = cols.walk_args[2] >= 2 ** 31
    ratio, floor = _COLS_SCRATCH
    if wide or (scratch and cols.workspace_values * 8 > max(ratio * n * c * l * _ITEMSIZE[dtype_name], floor)):
        if l > 1:
            planes = _planes_walk(n, c, l, dtype_name, vfull, target, 0, min_vectors)
            if wide or planes.workspace_values <= cols.workspace_values:
                return planes
        elif vfull > 1:
            cols = min(cols, _cols_plan(n, c, l, 1, target, min_vectors), key=lambda p: p.workspace_values)
    if cols.walk_args[2] >= 2 ** 31:
        raise ValueError(f"a ({n}, {c}, {l}) tensor has rows of {c * l} values, beyond the 2**31 a row of the "
                         f"columns kernels can hold")
    return cols


def _planes_walk(n, c, l, dtype_name, vfull, target, chunk_bytes, min_vectors=1):
    """plan's planes walk of a (n, c, l) tensor, in channel chunks of chunk_bytes of x if that is > 0."""
    v = vfull if l % vfull == 0 else 1
    whole = _planes_plan(n, c, l, v, target, c, min_vectors)
    per_channel = n * l * _ITEMSIZE[dtype_name]
    k = max(1, chunk_bytes // per_channel) if chunk_bytes > 0 else c
    if k >= c:
        return whole
    m = _cdiv(c, k)                             # as few chunks as the budget allows, sizes within one
    edges = [j * c // m for j in range(m + 1)]
    parts = tuple((c0, _planes_plan(n, c1 - c0, l, v, target, c, min_vectors)) for c0, c1 in zip(edges, edges[1:]))
    return whole._replace(chunks=parts, workspace_values=max(p.workspace_values for _, p in parts))


def _cols_plan(n, c, l, v, target, min_vectors=1):
    """plan's columns walk of a (n, c, l) tensor, v values per load."""
    w = c * l                                   # a row of the (rows, C*L) view
    g = v // math.gcd(w, v)                     # fold g rows into one: Wf = g*W, a multiple of v ...
    if w * g < TX * v:                          # ... and at least TX vectors wide
        g *= _cdiv(TX * v, w * g)
    wf = w * g
    total = n * w
    rfull, rows_f = total // wf, _cdiv(total, wf)
    gx = _cdiv(wf // v, TX)
    b = max(1, min(_cdiv(target, gx), _cdiv(rows_f, TY * min_vectors), 65535))
    p = b * wf
    return Plan("cols", v, (gx, b, 1), (TX, TY, 1), (total, rfull, wf), (w, l), p,
                (p, b * g * l, g * l, l, wf, w, c),
                c, n * l, 3 * p + 3 * c)


def flat_cursor(pl) -> bool:
    """Whether plan pl's planes kernels take FlatPlaneCursor (their FLAT instantiations): a segment shorter
    than a block's PLANE_THREADS threads in a block of more than one plane, where PlaneCursor would leave
    threads idle in every plane. Design 3's plans need it only in plan's scratch fallback (wide tensors
    with few rows and small planes), and when PLANES_MIN_BYTES is lowered."""
    if pl.walk != "planes":
        return False
    n, _, lv, seg = pl.walk_args
    last = lv - seg * (pl.grid[2] - 1)
    return min(seg, last) < PLANE_THREADS and n > pl.grid[1]


def _pieces(pl):
    """(first channel, plan) of each chunk of pl, in order: ((0, pl),) when pl has no chunks."""
    return pl.chunks or ((0, pl),)


_modules, _functions, _sm_counts, _streams = {}, {}, {}, {}


def available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:                      # no CuPy, no driver, or no device
        return False


def _require_cupy():
    """CuPy, or an ImportError that says how to install it (torch tensors on a GPU reach the kernels
    through CuPy, which a CUDA build of torch does not bring)."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("bnlib's CUDA kernels run through CuPy, which is not installed: install the CuPy "
                          "wheel for your CUDA version, pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x "
                          "(CUDA 13), or bnlib's extra 'gpu' or 'gpu-cuda13' (pip install '.[gpu]' in a "
                          "checkout); Colab ships CuPy") from exc
    return cupy


NVRTC_OPTIONS = ("-std=c++17",)   # how NVRTC compiles KERNEL_SOURCE (module(); tests/test_cuda.py runs the same
                                   # compile on a machine without a GPU)


def module(device: int = None):
    """The kernels of KERNEL_SOURCE as one cupy.RawModule for `device` (default: the current one),
    compiled by NVRTC on first use (`.compile()` forces it) and kept."""
    import cupy
    dev = cupy.cuda.runtime.getDevice() if device is None else device
    if dev not in _modules:
        with cupy.cuda.Device(dev):
            _modules[dev] = cupy.RawModule(code=KERNEL_SOURCE, options=NVRTC_OPTIONS,
                                           name_expressions=kernel_names())
    return _modules[dev]


def _function(dev: int, name: str):
    """Kernel `name` of device dev's module as a cupy.cuda.function.Function: its .ptr is the CUfunction
    cuLaunchKernel takes (RawModule.get_function gives a RawKernel, whose .kernel is that Function)."""
    f = _functions.get((dev, name))
    if f is None:
        import cupy
        with cupy.cuda.Device(dev):
            f = _functions[(dev, name)] = module(dev).get_function(name).kernel
    return f


# How kernels are launched. "driver": the arguments are packed into one per-thread buffer and
# cuLaunchKernel is called through CuPy's thin binding of the CUDA driver; "cupy": CuPy's own kernel
# call, which builds a Python object per argument (design 2's path). Same kernels, same stream.
# BNLIB_CUDA_LAUNCH=cupy selects CuPy's; the benchmark records which one ran.
LAUNCHER = os.environ.get("BNLIB_CUDA_LAUNCH", "driver")


def _chunk_bytes_from_environment() -> int:
    text = os.environ.get("BNLIB_L2_CHUNK_MB", "0")
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not (mb >= 0 and math.isfinite(mb)):
        raise ValueError(f"BNLIB_L2_CHUNK_MB must be a number of MiB >= 0 (0: no chunks), got {text!r}")
    return int(mb * 2 ** 20)


# Channel chunks for the L2 cache (planes walks only, see plan). The budget is a chunk's working set:
# the bytes its second pass reads and writes, which should fit in L2 together. Forward: x and y, so a
# chunk holds at most half of it of x; backward: x, dy and dx, a third (_chunk_bytes). 0: no chunks.
# None: BNLIB_L2_CHUNK_MB (MiB, 2**20 bytes; 0 when unset), read at the first training call, which
# raises a ValueError naming it if it is not a size. Slower on the GPU alone at every working set
# timed on an H200 (chapter 05's design-3 report), so off unless asked for;
# tools/gpu_l2_chunks.py times it (bench_gpu's l2_chunks).
L2_CHUNK_BYTES = None
_environment_chunk_bytes = None


def _chunk_bytes(arrays: int, budget=None) -> int:
    """The x bytes of one chunk whose second pass touches `arrays` tensors (2 forward, 3 backward), for
    a working set of `budget` bytes (None: L2_CHUNK_BYTES, or BNLIB_L2_CHUNK_MB when that is None too)."""
    global _environment_chunk_bytes
    if budget is None:
        budget = L2_CHUNK_BYTES
    if budget is None:
        if _environment_chunk_bytes is None:
            _environment_chunk_bytes = _chunk_bytes_from_environment()
        budget = _environment_chunk_bytes
    elif type(budget) is not int or budget < 0:             # checked before anything runs
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not (budget >= 0 and math.isfinite(budget)):
            raise ValueError(f"bnlib.cuda.L2_CHUNK_BYTES must be None or a number of bytes >= 0, got {budget!r}")
        budget = int(budget)
    return budget // arrays


# The fewest loads of x a thread of a first pass (statistics, backward reduction) should make before the
# grid grows (plan's min_vectors; the second passes and the eval forward walk the same grid). 1 keeps
# design 3's grids, which aim at 2 x SMs x 8 blocks however little each thread then does (chapter 05,
# "The next experiments", counts what that leaves the benchmark's columns walks). Whether fewer, busier
# blocks help is measured by tools/gpu_grid_sweep.py (bench_gpu's min_vectors); until then 1 stays. An
# integer >= 1, checked before anything runs.
MIN_VECTORS_PER_THREAD = 1


def _int_setting(name: str, minimum: int) -> int:
    """Module setting `name` (MIN_VECTORS_PER_THREAD, PLANES_MIN_BYTES), checked: a ValueError naming it
    if it is not an integer >= minimum."""
    value = globals()[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"bnlib.cuda.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _min_vectors() -> int:
    return _int_setting("MIN_VECTORS_PER_THREAD", 1)


# The smallest plane (H*W values of one image and channel, in bytes) that NCHW input walks as planes
# (plan's planes_min_bytes); smaller planes are walked as columns of the (N, C*H*W) view, whose
# partial results grow with C*H*W (chapter 05, "The next experiments", counts them). 4096 is design 3's
# rule; 0 walks every plane of more than one value as planes (one value per load where the plane's
# length is not a multiple of the 16-byte vector). Whether that helps is measured by
# tools/gpu_grid_sweep.py (bench_gpu's planes_min_bytes); until then 4096 stays. An integer >= 0,
# checked before anything runs.
PLANES_MIN_BYTES = 4096


def _planes_min_bytes() -> int:
    return _int_setting("PLANES_MIN_BYTES", 0)


_MAX_ARGS = 32
_CODES = {"ptr": "Q", "int32": "i4x", "int64": "q"}               # struct codes, one 8-byte slot each
_NUMPY_TYPES = {"ptr": np.uint64, "int32": np.int32, "int64": np.int64}
_packers, _thread = {}, threading.local()


@functools.lru_cache(maxsize=None)
def kernel_parameters(source: str = None) -> dict:
    """{kernel: (kind of each parameter, ...)} read from the kernels' declarations in `source` (default
    KERNEL_SOURCE): "ptr" for a pointer, "int32" for int, "int64" for long long, "acc" for the
    accumulation type (float, or double for double data)."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", KERNEL_SOURCE if source is None else source, flags=re.S)
    pattern = r"__global__ void __launch_bounds__\([^)]*\)\s*(\w+)\((.*?)\)\s*\{"
    kinds = {}
    for name, params in re.findall(pattern, text, flags=re.S):
        found = []
        for param in filter(None, (p.split("=")[0].strip() for p in params.split(","))):
            t = " ".join(param.replace("__restrict__", "").replace("const ", "").split()[:-1])
            if "*" in param:
                found.append("ptr")
            elif t in ("int", "long long"):
                found.append("int32" if t == "int" else "int64")
            elif t == "A" or re.fullmatch(r"typename Acc<\w+>::type", t):
                found.append("acc")
            else:
                raise ValueError(f"kernel {name}: parameter {param!r} has a type the launcher cannot pack")
        kinds[name] = tuple(found)
    return kinds


def _packer(name: str):
    """(struct, parameter kinds, accumulation type) for kernel instantiation `name` ("bn_stats_cols<float, 4>"):
    the struct packs its arguments in the types of its declaration, one 8-byte slot each."""
    entry = _packers.get(name)
    if entry is None:
        base, _, template = name.partition("<")
        kinds = kernel_parameters().get(base)
        if kinds is None:
            raise ValueError(f"no kernel {base!r} in KERNEL_SOURCE")
        if len(kinds) > _MAX_ARGS:
            raise ValueError(f"{base} has {len(kinds)} parameters; the argument buffer holds {_MAX_ARGS}")
        acc = "double" if template.startswith("double") else "float"
        codes = "".join(("d" if acc == "double" else "f4x") if k == "acc" else _CODES[k] for k in kinds)
        entry = _packers[name] = (struct.Struct("<" + codes), kinds, acc)
    return entry


def pack_arguments(name: str, args: tuple) -> tuple:
    """Kernel `name`'s arguments as cuLaunchKernel takes them: each value in its own 8-byte slot of one
    buffer, at the type its parameter is declared with in KERNEL_SOURCE (an int or float in the slot's
    first 4 bytes: CUDA hosts are little-endian), and a table of the slots' addresses. Arguments are
    Python (or NumPy) numbers: integers for addresses, int and long long parameters (a bool is an
    integer, as in Python), floats for the accumulation type. Returns (values, table, table address), one set per thread, overwritten by the
    thread's next call (the driver copies the values during the launch). Raises ValueError when the
    count differs from the kernel's parameters, TypeError when a value does not fit its parameter."""
    packer, kinds, _ = _packer(name)
    if len(args) != len(kinds):
        raise ValueError(f"{name} takes {len(kinds)} arguments, got {len(args)}")
    buffers = getattr(_thread, "buffers", None)
    if buffers is None:
        values = np.zeros(_MAX_ARGS, np.uint64)
        table = np.uint64(values.ctypes.data) + np.uint64(8) * np.arange(_MAX_ARGS, dtype=np.uint64)
        buffers = _thread.buffers = (values, table, int(table.ctypes.data))
    try:
        packer.pack_into(buffers[0], 0, *args)
    except (struct.error, OverflowError) as exc:    # a float for an integer, a negative address, out of range
        bad = [f"{k} {type(a).__name__} {a!r}" for k, a in zip(kinds, args)
               if (k != "acc" and (not isinstance(a, numbers.Integral) or (k == "ptr" and a < 0)
                                   or (k == "int32" and not -2 ** 31 <= a < 2 ** 31)))
               or (k == "acc" and not isinstance(a, numbers.Real))] or [str(exc)]
        raise TypeError(f"{name}: arguments that do not fit their parameters: {', '.join(bad)}") from None
    return buffers


def _typed(name: str, args: tuple) -> tuple:
    """The arguments as NumPy scalars of the parameters' types, as CuPy's kernel call needs them, after the
    same checks as on the driver path."""
    pack_arguments(name, args)                                     # raises for what does not fit
    _, kinds, acc = _packer(name)
    acc_type = np.float64 if acc == "double" else np.float32
    return tuple((acc_type if k == "acc" else _NUMPY_TYPES[k])(a) for k, a in zip(kinds, args))


def _stream_object(dev: int, stream_ptr: int):
    """CuPy's object for the CUDA stream at address `stream_ptr` on device `dev` (cached wrappers)."""
    import cupy
    stream = _streams.get((dev, stream_ptr))
    if stream is None:
        if len(_streams) > 64:
            _streams.clear()
        if stream_ptr == 0:                      # torch's default stream is CUDA's legacy null stream
            stream = cupy.cuda.Stream.null
        else:
            try:
                stream = cupy.cuda.ExternalStream(stream_ptr, dev)
            except TypeError:                    # CuPy versions whose ExternalStream takes no device
                stream = cupy.cuda.ExternalStream(stream_ptr)
        _streams[(dev, stream_ptr)] = stream
    return stream


def _ready(dev: int, names) -> None:
    """Look up (compile, on first use) kernels `names` of device dev before a sequence of launches
    whose first changes state, so that a failed lookup raises before anything has changed."""
    for name in names:
        _function(dev, name)


def _launch(dev: int, name: str, grid: tuple, block: tuple, args: tuple, stream: int = None) -> None:
    """Every kernel launch of bnlib.cuda goes through here: kernel `name` of device `dev`, grid and
    block as 3-tuples, on the CUDA stream at address `stream` (None: CuPy's current stream). The
    tests count launches, and check their arguments, by replacing it."""
    import cupy
    if cupy.cuda.runtime.getDevice() != dev:
        with cupy.cuda.Device(dev):
            _launch_current(cupy, dev, name, grid, block, args, stream)
    else:
        _launch_current(cupy, dev, name, grid, block, args, stream)


def _launch_current(cupy, dev, name, grid, block, args, stream):
    """_launch, device dev being current."""
    runtime = cupy.cuda.runtime
    f = _function(dev, name)
    if stream is None:
        stream = cupy.cuda.get_current_stream().ptr
    if LAUNCHER == "driver":
        table = pack_arguments(name, args)[2]
        ready = getattr(_thread, "contexts", None)
        if ready is None:
            ready = _thread.contexts = set()
        if dev not in ready:                     # as CuPy does before its own launches: one runtime call per
            runtime.memGetInfo()                 # thread and device makes the device's context current
            ready.add(dev)
        cupy.cuda.driver.launchKernel(f.ptr, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0,
                                      stream, table, 0)
    elif LAUNCHER == "cupy":
        f(grid, block, _typed(name, args), stream=_stream_object(dev, stream))
    else:
        raise ValueError(f"bnlib.cuda.LAUNCHER (or BNLIB_CUDA_LAUNCH) must be 'driver' or 'cupy', got {LAUNCHER!r}")


def _sm_count(dev: int) -> int:
    if dev not in _sm_counts:
        import cupy
        _sm_counts[dev] = cupy.cuda.Device(dev).attributes["MultiProcessorCount"]
    return _sm_counts[dev]


def cupy_stream(torch_stream):
    """A CuPy stream object for a torch.cuda.Stream: the same CUDA stream, so that CuPy kernels
    are ordered with PyTorch's. Use it as a context manager (`with cupy_stream(s): ...`)."""
    import cupy
    from_external = getattr(cupy.cuda.Stream, "from_external", None)    # CuPy >= 14, torch with __cuda_stream__
    if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
        return from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device.index)


_workspace_requests = None       # a dict while _requested_workspace() counts


@contextlib.contextmanager
def _requested_workspace():
    """Count the scratch that the calls inside the block ask for. Yields a dict {(host thread, owner, device,
    stream, captured): bytes}: per buffer, the size of the largest request, that is, the buffers the calls
    would keep if no thread had one yet. bench_gpu reports it per case, where workspace_bytes() (every buffer
    held) would charge a case with the largest buffer any earlier case needed. Every thread's requests count
    (torch runs the backward of CUDA tensors on a thread of its own) while the block is open: open it around
    calls whose threads end inside it (autograd's backward() waits for its thread); not reentrant."""
    global _workspace_requests
    if _workspace_requests is not None:
        raise RuntimeError("_requested_workspace() is already counting")
    _workspace_requests = counted = {}
    try:
        yield counted
    finally:
        _workspace_requests = None


def _workspace(owner: str, dev: int, stream_ptr: int, nbytes: int, allocate, captured: bool = False) -> int:
    """A scratch buffer of at least nbytes for the partial results, kept per host thread and per
    (owner, device, stream): kernels on one stream run in order, so one thread's consecutive calls can
    share it. Per thread, because two threads launching on one stream can interleave their launches,
    and one call's finalize would then merge the other call's partials. A buffer goes back to its
    allocator (torch's or CuPy's, which reuse memory in stream order) when it is outgrown or its
    thread ends. Returns its address.

    captured=True: the call is being captured into a CUDA graph, whose replays will use the address
    for as long as the graph lives, at times no eager call is ordered with. Such calls get buffers of
    their own (never one an eager call on the stream uses), and a captured buffer is never given back:
    _captured_workspaces holds each for the life of the process, outgrown or not, and whether or not
    its thread has ended. Graphs captured on one thread and stream share that buffer, as their eager
    calls would: replay them one after another (on one stream), not at the same time."""
    cache = getattr(_thread, "workspaces", None)
    if cache is None:
        cache = _thread.workspaces = _ThreadWorkspaces()
        with _workspace_lock:
            _workspace_caches[id(cache)] = cache
    key = (owner, dev, stream_ptr, captured)
    requests = _workspace_requests                         # read once: another thread may end the count
    if requests is not None:                               # _requested_workspace() is counting
        counted = (threading.get_ident(),) + key
        requests[counted] = max(requests.get(counted, 0), nbytes, _MIN_WORKSPACE)
    entry = cache.get(key)
    if entry is None or entry[1] < nbytes:
        size = max(nbytes, _MIN_WORKSPACE)
        buffer, ptr = allocate(size)
        entry = cache[key] = (buffer, size, ptr)
        if captured:
            with _workspace_lock:
                _captured_workspaces.append(entry)
    return entry[2]


class _ThreadWorkspaces(dict):
    """One thread's scratch buffers, {(owner, device, stream, captured): (buffer, bytes, address)}: a dict that
    _workspace_caches can hold weakly (a plain dict cannot be), so that it goes with its thread."""


_workspace_caches, _workspace_lock = weakref.WeakValueDictionary(), threading.Lock()
_captured_workspaces = []        # every buffer a CUDA graph's capture was given: never given back


def workspace_bytes() -> int:
    """Bytes held by the cached scratch buffers of every live thread, all devices and streams (torch
    runs the backward of CUDA tensors on a thread of its own, which keeps its own buffers)."""
    with _workspace_lock:
        caches, kept = list(_workspace_caches.values()), list(_captured_workspaces)
    eager = sum(entry[1] for cache in caches for key, entry in list(cache.items()) if not key[3])
    return eager + sum(entry[1] for entry in kept)


# ----------------------------------------------------------------------------------- the passes
def _acc_name(dtype_name):
    return "double" if dtype_name == "float64" else "float"


def _kernel_eps(eps, dtype_name):
    """eps as the kernels take it, in the accumulation type: beyond float32's range, a float kernel gets
    inf (as torch's kernels, which cast it), where packing it would raise between launches."""
    eps = float(eps)
    if _acc_name(dtype_name) == "float":
        try:
            struct.pack("<f", eps)                 # rounds as a cast does; raises only if that gives inf
        except OverflowError:
            return math.inf
    return eps


def _kernel_name(kind, pl, dtype_name):
    return f"bn_{kind}_{pl.walk}<{_TYPES[dtype_name]}, {pl.vec}{', true' if flat_cursor(pl) else ''}>"


def _run_forward(dev, pl, dtype_name, x, y, mean, var, inv_std, weight, bias, eps, ws, stream=None, running=None):
    """Training forward, 3 launches per chunk of pl (one chunk unless pl has channel chunks): partial
    moments, finalize (writes mean, var, inv_std), normalize. x ... ws are device addresses (weight,
    bias may be 0); stream as for _launch. With running = (running_mean, running_var, momentum,
    counter) (addresses, a float or None, an address or 0), the first stats kernel adds 1 to the int64
    at `counter` and the finalize updates the running statistics (momentum None: the cumulative
    average over the counted batches)."""
    rm, rv, momentum, counter = running if running is not None else (0, 0, 0.0, 0)
    if momentum is None and not counter:
        raise ValueError("momentum=None (a cumulative average) needs the batch counter")
    unbias = pl.count / (pl.count - 1) if pl.count > 1 else 1.0
    finalize = f"bn_stats_finalize<{_acc_name(dtype_name)}>"
    _ready(dev, {finalize} | {_kernel_name(kind, sp, dtype_name) for _, sp in _pieces(pl)
                              for kind in ("stats", "apply")})
    for c0, sp in _pieces(pl):
        (x_, y_), (mean_, var_, inv_, rm_, rv_, weight_, bias_) = _offsets(
            sp, dtype_name, c0, (x, y), (mean, var, inv_std, rm, rv, weight, bias))
        _launch(dev, _kernel_name("stats", sp, dtype_name), sp.grid, sp.block,
                (x_,) + sp.walk_args + (ws, sp.partials, counter if c0 == 0 else 0), stream)
        _launch(dev, finalize, (sp.channels, 1, 1), (FINALIZE_THREADS, 1, 1),
                (ws,) + sp.finalize_args + (_kernel_eps(eps, dtype_name), mean_, var_, inv_, rm_, rv_,
                                            -1.0 if momentum is None else float(momentum), unbias, counter), stream)
        _run_apply(dev, sp, dtype_name, x_, y_, mean_, inv_, weight_, bias_, eps, from_var=False, stream=stream)


def _acc_size(dtype_name):
    return 8 if dtype_name == "float64" else 4


def _offsets(pl, dtype_name, c0, data, vectors):
    """The addresses of channel chunk c0 of plan pl: data arrays (x, y, dy, dx) advance by c0 planes,
    per-channel vectors by c0 values; 0 (no vector) stays 0. Returns (data addresses, vector addresses)."""
    if c0 == 0:
        return data, vectors
    plane = pl.walk_args[2] * pl.vec * _ITEMSIZE[dtype_name]
    acc = _acc_size(dtype_name)
    return (tuple(a + c0 * plane for a in data), tuple(a + c0 * acc if a else 0 for a in vectors))


def _run_apply(dev, pl, dtype_name, x, y, mean, stat, weight, bias, eps, from_var, stream=None):
    """y = (x - mean) * weight * inv + bias, inv = stat (inv_std) or 1/sqrt(stat + eps) (running var), in one
    launch over pl's whole walk (its chunks, if any, are the forward's business: _run_forward passes each)."""
    _launch(dev, _kernel_name("apply", pl, dtype_name), pl.grid, pl.block,
            (x, y) + pl.walk_args + pl.geometry + (mean, stat, weight, bias, _kernel_eps(eps, dtype_name),
                                                   int(from_var)), stream)


def _run_backward(dev, pl, dtype_name, dy, x, dx, mean, inv_std, weight, dweight, dbias, ws, stream=None):
    """Training backward, 3 launches per chunk of pl: partial sums, finalize (writes dweight, dbias,
    and the dx coefficients into the workspace), dx. All arguments after dtype_name are device
    addresses. Chunks go from the last channels to the first: the forward ends on the last, so the
    backward's first reads may find some of it still in L2."""
    acc = _acc_size(dtype_name)
    for c0, sp in reversed(_pieces(pl)):
        (dy_, x_, dx_), (mean_, inv_, weight_, dweight_, dbias_) = _offsets(
            sp, dtype_name, c0, (dy, x, dx), (mean, inv_std, weight, dweight, dbias))
        coef = ws + 3 * sp.partials * acc
        _launch(dev, _kernel_name("backward_reduce", sp, dtype_name), sp.grid, sp.block,
                (dy_, x_) + sp.walk_args + sp.geometry + (mean_, ws, sp.partials), stream)
        _launch(dev, f"bn_backward_finalize<{_acc_name(dtype_name)}>", (sp.channels, 1, 1), (FINALIZE_THREADS, 1, 1),
                (ws,) + sp.finalize_args + (inv_, weight_, float(sp.count), dweight_, dbias_, coef), stream)
        channels = (sp.channels,) if sp.walk == "cols" else ()
        _launch(dev, _kernel_name("backward_dx", sp, dtype_name), sp.grid, sp.block,
                (dy_, x_, dx_) + sp.walk_args + sp.geometry + channels + (mean_, coef), stream)


def _torch_dtype_name(t):
    return str(t.dtype).rsplit(".", 1)[-1]


def _check_cuda_tensor(x, name):
    import torch
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise TypeError(f"{name} must be a CUDA torch.Tensor, got {type(x).__name__}"
                        f"{' on ' + str(x.device) if isinstance(x, torch.Tensor) else ''}")


def _torch_stream(device) -> int:
    """The address of torch's current CUDA stream on `device` (0: the legacy default stream)."""
    import torch
    return torch.cuda.current_stream(device).cuda_stream


def suggested_memory_format(x):
    """The memory format torch's layers give the output for input x: torch.channels_last (4D) or
    torch.channels_last_3d (5D) when x's strides order it channels-last, dense or not (a channels-last
    tensor sliced along a dimension still is), else torch.contiguous_format. Torch's own rule
    (suggest_memory_format, c10's is_channels_last_strides_2d/3d), which Python does not expose."""
    import torch
    order = {4: (1, 3, 2, 0), 5: (1, 4, 3, 2, 0)}.get(x.dim())
    sizes, strides = x.shape, x.stride()
    if order is None or strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return torch.contiguous_format      # (the last: ambiguous strides count as contiguous)
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _torch_input(x, name):
    """x as (tensor in kernel layout, (rows, C, L)): torch's channels-last memory format (4D NHWC, 5D
    NDHWC) as (N*H*W, C, 1), anything else C-contiguous (N, C, L) (a copy only when x is neither dense
    layout). As torch's layers do on the CPU and through cuDNN, and so y and dx come back in that layout:
    a channels-last tensor sliced along a dimension is copied to dense channels-last, and an (N, C, L)
    view of an (N, L, C) tensor is copied to C-contiguous. (Torch's native CUDA kernels, used for 2-D
    input and a few other cases, keep a dense permuted input's strides instead.)"""
    import torch
    _check_cuda_tensor(x, name)
    if _torch_dtype_name(x) not in _TYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (N, C, *spatial), got {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    l = x.numel() // (n * c) if n * c else 0
    if n * l == 0 or c == 0:
        raise ValueError(f"{name} must have at least one value per channel, got shape {tuple(x.shape)}")
    if x.dim() in (4, 5) and l > 1 and not x.is_contiguous():
        if x.permute(0, *range(2, x.dim()), 1).is_contiguous():
            return x, (n * l, c, 1)
        fmt = suggested_memory_format(x)
        if fmt != torch.contiguous_format:
            return x.contiguous(memory_format=fmt), (n * l, c, 1)
    return x.contiguous(), (n, c, l)


def _torch_vector(v, name, c, acc, device, required=False):
    """A per-channel tensor as a contiguous (C,) tensor of the accumulation dtype (None stays None)."""
    import torch
    if v is None:
        if required:
            raise TypeError(f"{name} must be a tensor of shape ({c},), got None")
        return None
    if not isinstance(v, torch.Tensor) or v.device != device:
        raise TypeError(f"{name} must be a torch.Tensor on {device}, got "
                        f"{v.device if isinstance(v, torch.Tensor) else type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.numel() != c:
        raise ValueError(f"{name} must have shape ({c},), got {tuple(v.shape)}")
    if v.dtype == acc and v.dim() == 1 and v.is_contiguous():     # the usual case: no new tensor object
        return v
    return v.reshape(c).to(acc).contiguous()


def _torch_setup(x, name="x"):
    import torch
    x, (rows, c, l) = _torch_input(x, name)        # what is wrong with x first, then what is missing
    _require_cupy()
    dtype_name = _torch_dtype_name(x)
    acc = torch.float64 if dtype_name == "float64" else torch.float32
    return x, rows, c, l, dtype_name, acc, x.device.index, _torch_stream(x.device)


def _capturing(device) -> bool:
    """True while torch captures work on the current stream of `device` into a CUDA graph (torch asks the
    current device's current stream, so another device is made current for the question)."""
    import torch
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _torch_workspace(dev, stream, pl, device):
    import torch

    def allocate(nbytes):
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buffer, buffer.data_ptr()

    return _workspace("torch", dev, stream, pl.workspace_values * 8, allocate, captured=_capturing(device))


def _torch_running(x, c, acc, running_mean, running_var, momentum, num_batches_tracked):
    """Checks forward_torch's running-statistics arguments before anything runs. Returns the tensors
    the kernels update in place and the `running` tuple of _run_forward, or ((), None)."""
    import torch
    if running_mean is None and running_var is None:
        if num_batches_tracked is not None:
            raise ValueError("num_batches_tracked is counted only with running_mean and running_var")
        return (), None
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, torch.Tensor) or t.device != x.device:
            raise TypeError(f"{name} must be a torch.Tensor on {x.device} (it is updated in place), got "
                            f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != acc or t.numel() != c or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous {acc} tensor of {c} values for {x.dtype} input (it is "
                            f"updated in place), got {t.dtype} of shape {tuple(t.shape)}")
    nbytes = c * running_mean.element_size()
    if abs(running_mean.data_ptr() - running_var.data_ptr()) < nbytes:
        raise ValueError("running_mean and running_var must not share memory (both are updated in place)")
    from bnlib.functional import _check_momentum        # functional imports this module: imported here
    _check_momentum(momentum)
    counter = num_batches_tracked
    if counter is not None and (not isinstance(counter, torch.Tensor) or counter.device != x.device
                                or counter.dtype != torch.int64 or counter.numel() != 1):
        raise TypeError(f"num_batches_tracked must be an int64 tensor of one value on {x.device}, got "
                        f"{(counter.dtype, tuple(counter.shape), str(counter.device)) if isinstance(counter, torch.Tensor) else type(counter).__name__}")
    if momentum is None and counter is None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    updated = (running_mean, running_var) + ((counter,) if counter is not None else ())
    return updated, (running_mean.data_ptr(), running_var.data_ptr(), momentum,
                     counter.data_ptr() if counter is not None else 0)


def _mark_modified(tensors):
    """Bump the autograd version counters of tensors a kernel changed in place, as torch's in-place
    operations do, so that autograd refuses a backward that saved their old values."""
    import torch
    bump = getattr(torch.autograd.graph, "increment_version", None)     # torch >= 2.1
    for t in tensors:
        if bump is not None and not t.is_inference():
            bump(t)


def forward_torch(x, weight=None, bias=None, eps: float = 1e-5, running_mean=None, running_var=None,
                  momentum=0.1, num_batches_tracked=None):
    """Training-mode batch norm of a CUDA tensor with bnlib's kernels, 3 launches (3 per channel chunk
    when L2 chunks are on), no host sync.

    x: (N, C, *) float16/bfloat16/float32/float64, contiguous or channels-last; weight, bias: (C,)
    or None (float32, or x's dtype). Returns y (x's shape, dtype and memory format), mean, var
    (biased), inv_std, each (C,) in float32 (float64 for float64 x). Runs on torch's current stream.

    With running_mean and running_var (contiguous (C,) tensors of that float32/float64 dtype), the
    same launches also update them in place as torch.nn.BatchNorm does in training: running =
    (1 - m) running + m batch, with the unbiased batch variance and m = momentum. With
    num_batches_tracked (an int64 tensor of one value) the kernels add 1 to it, and momentum=None
    then averages over all counted batches, m = 1 / num_batches_tracked, read on the GPU.
    """
    import torch
    from bnlib.functional import _check_eps     # (here: bnlib.functional imports this module)
    _check_eps(eps)
    x, rows, c, l, dtype_name, acc, dev, stream = _torch_setup(x)
    if rows * l < 2:                            # as torch, before anything runs
        raise ValueError(f"batch norm in training needs more than 1 value per channel, got x of shape "
                         f"{tuple(x.shape)}")
    weight = _torch_vector(weight, "weight", c, acc, x.device)
    bias = _torch_vector(bias, "bias", c, acc, x.device)
    updated, running = _torch_running(x, c, acc, running_mean, running_var, momentum, num_batches_tracked)
    y = torch.empty_like(x)
    mean, var, inv_std = (torch.empty(c, dtype=acc, device=x.device) for _ in range(3))   # separate tensors:
                                                                                      # no shared version counter
    pl = plan(rows, c, l, dtype_name, x.data_ptr() % 16 == 0, _sm_count(dev), _chunk_bytes(2),
              min_vectors=_min_vectors(), planes_min_bytes=_planes_min_bytes())
    ws = _torch_workspace(dev, stream, pl, x.device)
    _run_forward(dev, pl, dtype_name, x.data_ptr(), y.data_ptr(), mean.data_ptr(), var.data_ptr(),
                 inv_std.data_ptr(), weight.data_ptr() if weight is not None else 0,
                 bias.data_ptr() if bias is not None else 0, eps, ws, stream, running)
    _mark_modified(updated)
    return y, mean, var, inv_std


def backward_torch(dy, x, mean, inv_std, weight=None):
    """Gradients of forward_torch, 3 launches (3 per channel chunk when L2 chunks are on), no host sync:
    (dx, dweight, dbias).

    dy, x: CUDA tensors of one shape and dtype (dy is copied to x's memory format if it differs);
    mean, inv_std: forward_torch's; weight: (C,) or None. dx has x's dtype and memory format;
    dweight and dbias are float32 (float64 for float64 x), returned even when weight is None.
    """
    import torch
    x, rows, c, l, dtype_name, acc, dev, stream = _torch_setup(x)
    if not isinstance(dy, torch.Tensor) or dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"dy must be a tensor like x {tuple(x.shape)} {x.dtype} on {x.device}, got "
                         f"{tuple(dy.shape) if isinstance(dy, torch.Tensor) else type(dy).__name__}"
                         f"{' ' + str(dy.dtype) + ' on ' + str(dy.device) if isinstance(dy, torch.Tensor) else ''}")
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    mean = _torch_vector(mean, "mean", c, acc, x.device, required=True)
    inv_std = _torch_vector(inv_std, "inv_std", c, acc, x.device, required=True)
    weight = _torch_vector(weight, "weight", c, acc, x.device)
    dx = torch.empty_like(x)
    dweight, dbias = torch.empty(c, dtype=acc, device=x.device), torch.empty(c, dtype=acc, device=x.device)
    pl = plan(rows, c, l, dtype_name, x.data_ptr() % 16 == 0 and dy.data_ptr() % 16 == 0, _sm_count(dev),
              _chunk_bytes(3), min_vectors=_min_vectors(), planes_min_bytes=_planes_min_bytes())
    ws = _torch_workspace(dev, stream, pl, x.device)
    _run_backward(dev, pl, dtype_name, dy.data_ptr(), x.data_ptr(), dx.data_ptr(), mean.data_ptr(),
                  inv_std.data_ptr(), weight.data_ptr() if weight is not None else 0, dweight.data_ptr(),
                  dbias.data_ptr(), ws, stream)
    return dx, dweight, dbias


def inference_torch(x, running_mean, running_var, weight=None, bias=None, eps: float = 1e-5):
    """Eval-mode batch norm with running statistics: one launch of the normalize kernel, no host sync.
    Returns y with x's shape, dtype and memory format."""
    import torch
    from bnlib.functional import _check_eps
    _check_eps(eps)
    x, rows, c, l, dtype_name, acc, dev, stream = _torch_setup(x)
    running_mean = _torch_vector(running_mean, "running_mean", c, acc, x.device, required=True)
    running_var = _torch_vector(running_var, "running_var", c, acc, x.device, required=True)
    weight = _torch_vector(weight, "weight", c, acc, x.device)
    bias = _torch_vector(bias, "bias", c, acc, x.device)
    y = torch.empty_like(x)
    pl = plan(rows, c, l, dtype_name, x.data_ptr() % 16 == 0, _sm_count(dev), scratch=False,
              min_vectors=_min_vectors(), planes_min_bytes=_planes_min_bytes())
    _run_apply(dev, pl, dtype_name, x.data_ptr(), y.data_ptr(), running_mean.data_ptr(), running_var.data_ptr(),
               weight.data_ptr() if weight is not None else 0, bias.data_ptr() if bias is not None else 0,
               eps, from_var=True, stream=stream)
    return y


def supports(x) -> bool:
    """The CuPy arrays bnlib.functional routes to this module, before its checks: a dtype the kernels have
    (float16, bfloat16, float32, float64) and 2+ dimensions. The checks then refuse bfloat16 with a clear
    error (CuPy's bfloat16, new and minimal in v14 through ml_dtypes, is not tested here)."""
    return type(x).__module__.split(".")[0] == "cupy" and x.dtype.name in _TYPES and x.ndim >= 2


def accumulation_dtype(dtype):
    """The dtype of the statistics the kernels compute and return for data of `dtype` (their Acc<T>): float64
    for float64 data, float32 for float32, float16 and bfloat16. bnlib.stats.accumulation_dtype, which the NumPy
    paths use, agrees on float16, float32 and float64; it has no case for bfloat16."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def is_channels_last(a) -> bool:
    """True for an (N, C, *spatial) array stored channels-last (NHWC) and not also C-contiguous: chapter 04's
    bnlib.cpu.channels_last, which reads only the shape, the flags and a transposed view, so CuPy arrays pass too."""
    from bnlib import cpu
    return cpu.channels_last(a)


def _cupy_input(a):
    """a in kernel layout and its (rows, C, L), as _torch_input."""
    import cupy
    n, c = a.shape[0], a.shape[1]
    l = a.size // (n * c) if n * c else 0
    if is_channels_last(a):
        return a, (n * l, c, 1)
    return cupy.ascontiguousarray(a), (n, c, l)


def _cupy_setup(x, dy=None):
    """x (and dy, copied to x's layout if it differs) in kernel layout, with the plan and workspace."""
    import cupy
    x, (rows, c, l) = _cupy_input(x)
    if dy is not None and dy.strides != x.strides:      # e.g. a contiguous dy for a channels-last x
        dy_same = cupy.empty_like(x)
        dy_same[...] = dy
        dy = dy_same
    dev = x.device.id
    aligned = x.data.ptr % 16 == 0 and (dy is None or dy.data.ptr % 16 == 0)
    pl = plan(rows, c, l, x.dtype.name, aligned, _sm_count(dev), _chunk_bytes(2 if dy is None else 3),
              min_vectors=_min_vectors(), planes_min_bytes=_planes_min_bytes())

    def allocate(nbytes):
        buffer = cupy.empty(nbytes, dtype=cupy.uint8)
        return buffer, buffer.data.ptr

    ws = _workspace("cupy", dev, cupy.cuda.get_current_stream().ptr, pl.workspace_values * 8, allocate)
    return x, dy, c, accumulation_dtype(x.dtype), dev, pl, ws


def _cupy_vector(v, acc):
    import cupy
    return None if v is None else cupy.ascontiguousarray(cupy.asarray(v).reshape(-1).astype(acc, copy=False))


def _forward(x, gamma, beta, eps):
    """Training forward of a CuPy array on CuPy's current stream of x's device (bnlib.functional's GPU
    route). Returns y (x's shape, dtype and memory layout), mean, var (biased), inv_std (accumulation
    dtype), all on x's device. Private: it checks nothing (a gamma of the wrong length would be read out of
    bounds); bnlib.functional.batch_norm_forward checks the arguments, then calls it.
    """
    import cupy
    with cupy.cuda.Device(x.device.id):                 # every allocation and launch on x's device
        x, _, c, acc, dev, pl, ws = _cupy_setup(x)
        gamma, beta = _cupy_vector(gamma, acc), _cupy_vector(beta, acc)
        y = cupy.empty_like(x)                          # order 'K': keeps channels-last strides
        mean, var, inv_std = cupy.empty(c, acc), cupy.empty(c, acc), cupy.empty(c, acc)
        _run_forward(dev, pl, x.dtype.name, x.data.ptr, y.data.ptr, mean.data.ptr, var.data.ptr, inv_std.data.ptr,
                     gamma.data.ptr if gamma is not None else 0, beta.data.ptr if beta is not None else 0, eps, ws)
    return y, mean, var, inv_std


def _backward(dy, x, mean, inv_std, gamma):
    """Training backward of CuPy arrays: dx (x's layout), dgamma, dbeta (accumulation dtype). Private, as
    _forward: bnlib.functional.batch_norm_backward checks dy against the forward's cache, then calls it."""
    import cupy
    with cupy.cuda.Device(x.device.id):                 # every allocation and launch on x's device
        x, dy, c, acc, dev, pl, ws = _cupy_setup(x, dy)
        mean, inv_std, gamma = _cupy_vector(mean, acc), _cupy_vector(inv_std, acc), _cupy_vector(gamma, acc)
        dx = cupy.empty_like(x)
        dgamma, dbeta = cupy.empty(c, acc), cupy.empty(c, acc)
        _run_backward(dev, pl, x.dtype.name, dy.data.ptr, x.data.ptr, dx.data.ptr, mean.data.ptr, inv_std.data.ptr,
                      gamma.data.ptr if gamma is not None else 0, dgamma.data.ptr, dbeta.data.ptr, ws)
    return dx, dgamma, dbeta
