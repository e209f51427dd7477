# GENERATED FILE: do not edit.
# bnlib.cpu is generated from chapters/04_numpy.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['FAST_DTYPES', 'PARALLEL_MIN_SIZE', 'available_backends', 'get_backend', 'set_backend', 'supports', 'dense_order', 'as_acb', 'ROW_BLOCK', 'L_BLOCK', 'numpy_forward', 'numpy_backward', 'numba_forward', 'numba_backward', 'forward', 'backward', 'channels_last', 'inference']

import math

import numpy as np

try:                                   # numba is optional: without it the plain NumPy path runs
    import numba
    from numba import njit, prange
except ImportError:                    # pragma: no cover - exercised where numba is absent
    numba = None

FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
PARALLEL_MIN_SIZE = 1 << 16            # below this many elements, threads save little (chapter 04 times it)
_backend = "numba" if numba is not None else "numpy"


def available_backends() -> tuple[str, ...]:
    """'numba' (when installed), 'numpy' (the fast plain-NumPy path), 'portable' (chapters 02-03)."""
    return ("numba", "numpy", "portable") if numba is not None else ("numpy", "portable")


def get_backend() -> str:
    """The CPU path bnlib.functional uses for NumPy float32/float64 input."""
    return _backend


def set_backend(name: str) -> str:
    """Choose the CPU path: 'numba', 'numpy', or 'portable' (no fast path); returns the previous one."""
    global _backend
    if name not in available_backends():
        raise ValueError(f"backend must be one of {available_backends()}, got {name!r}")
    previous, _backend = _backend, name
    return previous


def supports(x) -> bool:
    """True for the inputs the fast CPU paths handle: NumPy float32/float64 arrays of 2+ dimensions."""
    return _backend != "portable" and isinstance(x, np.ndarray) and x.dtype in FAST_DTYPES and x.ndim >= 2


def dense_order(a):
    """The order of a's axes in memory: a permutation p of its axes with a.transpose(p) C-contiguous (outermost
    first), or None where a's values are not one dense block (a strided slice, say). (0, 1, ..., ndim - 1) for a
    C-contiguous array, reversed for a Fortran-ordered one, (0, 2, ..., ndim - 1, 1) for channels-last."""
    if a.flags.c_contiguous:
        return tuple(range(a.ndim))
    order = tuple(sorted(range(a.ndim), key=lambda i: (-abs(a.strides[i]), i)))   # largest stride outermost
    return order if a.transpose(order).flags.c_contiguous else None


def as_acb(a):
    """(N, C, *spatial) -> (a3, order): a3 a C-contiguous (A, C, B) view of a's memory, order = dense_order(a),
    A and B the products of the axes before and after the channel axis in that order. The per-channel statistics
    are sums over A and B whatever the order, so the kernels written for (N, C, L) take any dense layout without
    a copy: (N, C, L) for C order, (N * L, C, 1) for channels-last, (L, C, N) for Fortran order. A copy into C
    order only where a is not one dense block."""
    if not a.flags.c_contiguous:
        order = dense_order(a)
        if order is not None:
            t, k = a.transpose(order), order.index(1)
            return t.reshape(math.prod(t.shape[:k]), a.shape[1], -1), order
        a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], -1), tuple(range(a.ndim))     # C order: (N, C, L)


def _empty_in_order(shape, dtype, order, acb_shape):
    """An empty array of `shape` laid out in memory in `order` (as as_acb reads it), and its (A, C, B) view."""
    if order == tuple(range(len(shape))):                              # C order (the common case: no transposes)
        t = np.empty(shape, dtype=dtype)
        return t, t.reshape(acb_shape)
    t = np.empty(tuple(shape[i] for i in order), dtype=dtype)
    return t.transpose(np.argsort(order)), t.reshape(acb_shape)


ROW_BLOCK = 64                         # rows per float32 partial sum of an (N, C) reduction
L_BLOCK = 4096                         # values per float32 partial sum along a long row of an (N, C, L) array


def _row_blocks_nc(a2):
    """(N, C) -> ((N // B, B, C) view of the whole blocks, (N % B, C) view of the rest), B = ROW_BLOCK."""
    whole = a2.shape[0] - a2.shape[0] % ROW_BLOCK
    return a2[:whole].reshape(-1, ROW_BLOCK, a2.shape[1]), a2[whole:]


def _l_blocks(a3):
    """(N, C, L) -> ((N, C, L // B, B) view of the whole blocks, (N, C, L % B) view of the rest), B = L_BLOCK."""
    n, c, l = a3.shape
    whole = l - l % L_BLOCK
    return a3[:, :, :whole].reshape(n, c, -1, L_BLOCK), a3[:, :, whole:]


def _channel_sums(a3):
    """Per-channel sum (float64, (C,)) of an (N, C, L) array through BLAS matrix-vector products.

    Each float32 partial sum covers at most L_BLOCK values of one row (or a block of ROW_BLOCK rows of
    an (N, C) array); the partials are added in float64. A float32 sum of all N*L values, which NumPy
    adds down a column one row at a time, could be off by up to about N*L/2 units in the last place
    of the largest running sum: far more, relative to the result, when the sum cancels (centred data);
    so could one partial sum over a whole row of a large image, hence the blocks along L.
    """
    n, c, l = a3.shape
    if l == 1:
        blocks, rest = _row_blocks_nc(a3.reshape(n, c))
        partial = np.matmul(np.ones(ROW_BLOCK, dtype=a3.dtype), blocks)            # (N // B, C)
        return partial.sum(axis=0, dtype=np.float64) + rest.sum(axis=0, dtype=np.float64)
    if l <= L_BLOCK:
        return np.matmul(a3, np.ones(l, dtype=a3.dtype)).sum(axis=0, dtype=np.float64)
    blocks, rest = _l_blocks(a3)
    total = np.matmul(blocks, np.ones(L_BLOCK, dtype=a3.dtype)).sum(axis=(0, 2), dtype=np.float64)
    return total + np.matmul(rest, np.ones(rest.shape[2], dtype=a3.dtype)).sum(axis=0, dtype=np.float64)


def _channel_dots(a3, b3):
    """Per-channel sum (float64, (C,)) of a * b over N and L, without a tensor-sized temporary,
    in float32 partial sums of at most L_BLOCK values of a row (or a block of rows) each, added in float64."""
    n, c, l = a3.shape
    if l == 1:
        (ab, ar), (bb, br) = _row_blocks_nc(a3.reshape(n, c)), _row_blocks_nc(b3.reshape(n, c))
        partial = np.einsum("kbc,kbc->kc", ab, bb)                                   # (N // B, C)
        return partial.sum(axis=0, dtype=np.float64) + np.einsum("nc,nc->c", ar, br).astype(np.float64)
    if l <= L_BLOCK:
        return np.matmul(a3[:, :, None, :], b3[:, :, :, None]).sum(axis=(0, 2, 3), dtype=np.float64)
    (ab, ar), (bb, br) = _l_blocks(a3), _l_blocks(b3)
    total = np.matmul(ab[..., None, :], bb[..., :, None]).sum(axis=(0, 2, 3, 4), dtype=np.float64)
    return total + np.matmul(ar[:, :, None, :], br[:, :, :, None]).sum(axis=(0, 2, 3), dtype=np.float64)


def _layout(a3):
    """Views for elementwise work: (N, C) when L == 1 (so NumPy's inner loops run along C),
    else (N, C, L); and a function that shapes a (C,) vector to broadcast against them."""
    n, c, l = a3.shape
    if l == 1:
        return (lambda a: a.reshape(n, c)), (lambda v: v)
    return (lambda a: a), (lambda v: v[:, None])


def _finite_shift(x3):
    """K of the shifted-data algorithm, (C,) in x3's dtype: each channel's first value, or 0 where that value is
    infinite or NaN. An infinite K would make every x - K infinite or NaN (inf - inf), and the channel's mean NaN
    where torch and chapter 02's code give inf; with K = 0 an infinite value gives an infinite mean, as theirs."""
    k = x3[0, :, 0]
    return np.where(np.isfinite(k), k, np.zeros((), x3.dtype))


def numpy_forward(x3, gamma, beta, eps, y3):
    """Training forward on (N, C, L) in plain NumPy, writing y3; returns mean, var, inv_std (float64, (C,)).

    The shifted-data algorithm: centre on one sample per channel (K), so the sums are of small
    numbers and sum(d^2)/m - mean(d)^2 stays accurate in float32; then scale and shift in place.
    Passes over memory: d = x - K (into y), sum d (BLAS), sum d^2, y *= scale, y += shift.
    """
    n, c, l = x3.shape
    count = n * l
    view, col = _layout(x3)
    x_, y_ = view(x3), view(y3)
    shift = _finite_shift(x3)                                    # K: (C,) one sample per channel
    k = shift.astype(np.float64)
    np.subtract(x_, col(shift), out=y_)                          # d = x - K, in the output buffer
    for attempt in range(2):                                     # a second pass only if K was far away
        mean_d = _channel_sums(y3).astype(np.float64) / count
        var = np.maximum(_channel_dots(y3, y3).astype(np.float64) / count - mean_d * mean_d, 0.0)
        if attempt == 1 or not np.any(mean_d * mean_d > 16 * var):   # K within 4 sigma: float32 sums are fine
            break                        # (beyond, they lose digits: chapter 04); after a re-centre, the statistics
            #                              just taken are about the centre y holds, and are kept
        # else re-centre on the mean found so far, from x itself: fl(x - K) already lost what Sterbenz's lemma
        # does not cover when K is far from the values, and subtracting from it would keep that loss
        # (a channel whose mean is inf or NaN keeps its centre: x - inf would turn its inf mean into NaN)
        centre = np.where(np.isfinite(k + mean_d), k + mean_d, k).astype(x3.dtype)
        np.subtract(x_, col(centre), out=y_)
        k = centre.astype(np.float64)                            # (what was subtracted, not k + mean_d)
    inv_std = 1.0 / np.sqrt(var + eps)
    scale = inv_std if gamma is None else gamma * inv_std
    offset = -mean_d * scale + (0.0 if beta is None else beta)
    y_ *= col(scale.astype(x3.dtype))
    y_ += col(offset.astype(x3.dtype))
    return k + mean_d, var, inv_std


def numpy_backward(dy3, x3, mean, inv_std, gamma, dx3):
    """Training backward on (N, C, L) in plain NumPy, writing dx3; returns dgamma, dbeta (float64, (C,)).

    dx = a*dy + b*(x - mean) + c per channel, with a = gamma/s, b = -a*dgamma/(m*s), c = -a*dbeta/m,
    s = sqrt(var + eps), computed in the dx buffer without another tensor-sized temporary.
    """
    n, c, l = x3.shape
    count = n * l
    view, col = _layout(x3)
    x_, dy_, dx_ = view(x3), view(dy3), view(dx3)
    np.subtract(x_, col(mean.astype(x3.dtype)), out=dx_)        # x - mean, in the dx buffer
    # mean may be the batch mean rounded to x's dtype (the cache keeps it so): the centred values are
    # then all off by r = mean(x - mean), which comes out of the sums and the shift below
    r = _channel_sums(dx3) / count
    dbeta = _channel_sums(dy3)
    dgamma = (_channel_dots(dy3, dx3) - r * dbeta) * inv_std
    a = inv_std if gamma is None else gamma * inv_std
    b = -a * inv_std * dgamma / count
    cc = -a * dbeta / count - b * r
    # dx = a * ((x - mean) * b/a + dy + c/a); channels with a == 0 (gamma == 0) get dx = 0
    safe = a != 0
    b_over_a = np.divide(b, a, out=np.zeros_like(b), where=safe)
    c_over_a = np.divide(cc, a, out=np.zeros_like(cc), where=safe)
    dx_ *= col(b_over_a.astype(x3.dtype))
    dx_ += dy_
    dx_ += col(c_over_a.astype(x3.dtype))
    dx_ *= col(a.astype(x3.dtype))
    return dgamma, dbeta


def _kernels(parallel: bool):
    """Compile the CPU kernels (statistics, normalize, backward sums, backward dx; each for (N, C, L)
    and (N, C)), either multi-threaded (prange) or serial; returns them in a dict."""
    loop = prange if parallel else range
    jit = njit(parallel=parallel, cache=True, nogil=True, fastmath=False)
    # The reductions may be reassociated: LLVM then keeps several partial sums in SIMD lanes and adds
    # them at the end. The order of the additions changes, not their float64 precision; without it,
    # strict left-to-right summation cannot be vectorized (chapter 04 measures the difference).
    jit_sum = njit(parallel=parallel, cache=True, nogil=True, fastmath={"reassoc"})

    @jit_sum
    def stats_ncl(x, shift, mean, var):            # x (N, C, L), L > 1: threads over channels
        n, c, l = x.shape
        for j in loop(c):
            k = shift[j]
            s = 0.0
            ss = 0.0
            for i in range(n):
                for t in range(l):
                    d = np.float64(x[i, j, t] - k)   # shifted data, squared and summed in float64
                    s += d
                    ss += d * d
            md = s / (n * l)
            mean[j] = k + md
            var[j] = max(ss / (n * l) - md * md, 0.0)

    @jit_sum
    def stats_nc(x, shift, blocks, mean, var):    # x (N, C): threads over blocks of rows
        n, c = x.shape
        s = np.zeros((blocks, c))
        ss = np.zeros((blocks, c))
        rows = (n + blocks - 1) // blocks
        for b in loop(blocks):
            sb, ssb = s[b], ss[b]
            lo, hi = b * rows, min(n, (b + 1) * rows)
            four = lo + (hi - lo) // 4 * 4
            for i in range(lo, four, 4):            # four rows at a time: each partial sum is read and
                x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]      # written once per four values
                for j in range(c):
                    k = shift[j]
                    d0, d1 = np.float64(x0[j] - k), np.float64(x1[j] - k)
                    d2, d3 = np.float64(x2[j] - k), np.float64(x3[j] - k)
                    sb[j] += (d0 + d1) + (d2 + d3)
                    ssb[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            for i in range(four, hi):               # the last 0-3 rows of the block
                xi = x[i]
                for j in range(c):
                    d = np.float64(xi[j] - shift[j])
                    sb[j] += d
                    ssb[j] += d * d
        for j in range(c):                          # merge the blocks (scalar loops: an array
            st = 0.0                                # expression here would launch threads per j)
            sst = 0.0
            for b in range(blocks):
                st += s[b, j]
                sst += ss[b, j]
            md = st / n
            mean[j] = shift[j] + md
            var[j] = max(sst / n - md * md, 0.0)

    @jit
    def affine(x, mean, a, b, y):                  # y = a * (x - mean) + b per channel; (N, C, L)
        n, c, l = x.shape                          # (centring first keeps float32 accurate
        for i in loop(n):                          #  when the mean is large)
            for j in range(c):
                xij, yij, mj, aj, bj = x[i, j], y[i, j], mean[j], a[j], b[j]
                for t in range(l):
                    yij[t] = aj * (xij[t] - mj) + bj

    @jit
    def affine_nc(x, mean, a, b, y):               # the same for (N, C): vectorized along C
        n, c = x.shape
        for i in loop(n):
            xi, yi = x[i], y[i]
            for j in range(c):
                yi[j] = a[j] * (xi[j] - mean[j]) + b[j]

    @jit_sum
    def backward_sums_ncl(dy, x, mean, sum_dy, sum_dy_xc, sum_xc):
        n, c, l = x.shape
        for j in loop(c):
            mu = mean[j]
            s = 0.0
            sx = 0.0
            sc = 0.0
            for i in range(n):
                for t in range(l):
                    g = np.float64(dy[i, j, t])
                    xc = np.float64(x[i, j, t] - mu)
                    s += g
                    sx += g * xc
                    sc += xc                         # mean may be rounded: its error comes out later
            sum_dy[j] = s
            sum_dy_xc[j] = sx
            sum_xc[j] = sc

    @jit_sum
    def backward_sums_nc(dy, x, mean, blocks, sum_dy, sum_dy_xc, sum_xc):
        n, c = x.shape
        s = np.zeros((blocks, c))
        sx = np.zeros((blocks, c))
        sc = np.zeros((blocks, c))
        rows = (n + blocks - 1) // blocks
        for b in loop(blocks):
            sb, sxb, scb = s[b], sx[b], sc[b]
            lo, hi = b * rows, min(n, (b + 1) * rows)
            four = lo + (hi - lo) // 4 * 4
            for i in range(lo, four, 4):            # four rows at a time, as in stats_nc
                x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
                g0, g1, g2, g3 = dy[i], dy[i + 1], dy[i + 2], dy[i + 3]
                for j in range(c):
                    mu = mean[j]
                    a0, a1, a2, a3 = np.float64(g0[j]), np.float64(g1[j]), np.float64(g2[j]), np.float64(g3[j])
                    c0, c1 = np.float64(x0[j] - mu), np.float64(x1[j] - mu)
                    c2, c3 = np.float64(x2[j] - mu), np.float64(x3[j] - mu)
                    sb[j] += (a0 + a1) + (a2 + a3)
                    sxb[j] += (a0 * c0 + a1 * c1) + (a2 * c2 + a3 * c3)
                    scb[j] += (c0 + c1) + (c2 + c3)
            for i in range(four, hi):
                dyi, xi = dy[i], x[i]
                for j in range(c):
                    g = np.float64(dyi[j])
                    xc = np.float64(xi[j] - mean[j])
                    sb[j] += g
                    sxb[j] += g * xc
                    scb[j] += xc
        for j in range(c):
            st = 0.0
            sxt = 0.0
            sct = 0.0
            for b in range(blocks):
                st += s[b, j]
                sxt += sx[b, j]
                sct += sc[b, j]
            sum_dy[j] = st
            sum_dy_xc[j] = sxt
            sum_xc[j] = sct

    @jit
    def backward_dx(dy, x, mean, a, b, cc, dx):    # dx = a*dy + b*(x - mean) + c per channel
        n, c, l = x.shape
        for i in loop(n):
            for j in range(c):
                dyij, xij, dxij = dy[i, j], x[i, j], dx[i, j]
                mj, aj, bj, cj = mean[j], a[j], b[j], cc[j]
                for t in range(l):
                    dxij[t] = aj * dyij[t] + bj * (xij[t] - mj) + cj

    @jit
    def backward_dx_nc(dy, x, mean, a, b, cc, dx):
        n, c = x.shape
        for i in loop(n):
            dyi, xi, dxi = dy[i], x[i], dx[i]
            for j in range(c):
                dxi[j] = a[j] * dyi[j] + b[j] * (xi[j] - mean[j]) + cc[j]

    return dict(stats_ncl=stats_ncl, stats_nc=stats_nc, affine=affine, affine_nc=affine_nc,
                backward_sums_ncl=backward_sums_ncl, backward_sums_nc=backward_sums_nc,
                backward_dx=backward_dx, backward_dx_nc=backward_dx_nc)


if numba is not None:
    PARALLEL_KERNELS, SERIAL_KERNELS = _kernels(parallel=True), _kernels(parallel=False)


def _pick(x3):
    if x3.size < PARALLEL_MIN_SIZE:
        return SERIAL_KERNELS
    if not _pool_started:
        _start_pool()
    return PARALLEL_KERNELS


_pool_started = False


def _start_pool():
    """Start numba's thread pool with one tiny parallel call, keeping PyTorch's thread count: with
    numba's OpenMP threading layer, the pool's first launch can reset OpenMP's thread count, which
    torch reports and uses as its own (a user's torch.set_num_threads(1) would silently become 2)."""
    global _pool_started
    import sys
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    _touch(np.zeros(2 * numba.get_num_threads()))
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
    _pool_started = True


if numba is not None:
    @njit(parallel=True, cache=True)
    def _touch(a):
        for i in prange(a.size):
            a[i] = i


if numba is not None:
    @njit(cache=True, error_model="numpy")          # 1/0 -> inf, as in NumPy (eps = 0, constant channel)
    def _forward_coefficients(mean, var, shift, gamma, beta, eps, mean_x, scale_x, beta_x, inv_std):
        """Per-channel work between the two passes, in one compiled call (a dozen tiny NumPy
        operations would cost more than the kernels on small tensors). Returns True if the shift K
        of some channel was over 100 standard deviations from its mean (then the statistics are
        recomputed around the mean). The sums are float64, so the shifted variance stays accurate
        much farther out than the NumPy path's float32 sums (4 standard deviations): chapter 04
        measures both."""
        far = False
        for j in range(mean.shape[0]):
            if (mean[j] - shift[j]) ** 2 > 1e4 * var[j]:
                far = True
            inv = 1.0 / np.sqrt(var[j] + eps)
            inv_std[j] = inv
            mean_x[j] = mean[j]                      # rounded to x's dtype: y centres on it exactly,
            scale_x[j] = gamma[j] * inv              # and the shift adds back what the rounding lost
            beta_x[j] = beta[j] - gamma[j] * inv * (mean[j] - mean_x[j])
        return far

    @njit(cache=True)
    def _backward_coefficients(mean, inv_std, gamma, sum_dy, sum_dy_xc, sum_xc, count, mean_x, a_x, b_x, c_x, dgamma):
        """dx = a*dy + b*(x - mean) + c per channel, from the sums (equation eq-dx). mean may be the
        batch mean rounded to x's dtype; r = sum(x - mean) / count is what it is off by, and comes
        out of dgamma and c (the centred values are all r too large)."""
        for j in range(mean.shape[0]):
            r = sum_xc[j] / count
            dgamma[j] = (sum_dy_xc[j] - r * sum_dy[j]) * inv_std[j]
            a = gamma[j] * inv_std[j]
            b = -a * inv_std[j] * dgamma[j] / count
            mean_x[j] = mean[j]
            a_x[j] = a
            b_x[j] = b
            c_x[j] = -a * sum_dy[j] / count - b * r


def _row_blocks(n, kernels):
    """Blocks of rows for the (N, C) kernels: one per thread (prange hands each thread an equal share of
    the blocks, so more blocks would only add partial sums to zero and merge), one for the serial kernels,
    never more than there are rows."""
    return 1 if kernels is SERIAL_KERNELS else min(n, numba.get_num_threads())


def numba_forward(x3, gamma, beta, eps, y3):
    """Training forward on (N, C, L) with the numba kernels, writing y3; returns mean, var, inv_std.

    Two loops over memory (3 passes): one read for the statistics, one read + one write for y.
    """
    k = _pick(x3)
    n, c, l = x3.shape
    mean, var, inv_std = np.empty(c), np.empty(c), np.empty(c)
    mean_x, scale_x, beta_x = (np.empty(c, x3.dtype) for _ in range(3))
    g = np.ones(c) if gamma is None else gamma
    b = np.zeros(c) if beta is None else beta
    shift = _finite_shift(x3).astype(np.float64)    # K: each channel's first value (0 where it is not finite)
    for _ in range(2):                               # a second pass only if K was far from the mean
        if l == 1:
            k["stats_nc"](x3.reshape(n, c), shift.astype(x3.dtype), _row_blocks(n, k), mean, var)
        else:
            k["stats_ncl"](x3, shift.astype(x3.dtype), mean, var)
        far = _forward_coefficients(mean, var, shift, g, b, float(eps), mean_x, scale_x, beta_x, inv_std)
        if not far:
            break
        shift = np.where(np.isfinite(mean), mean, shift)   # an inf or NaN mean keeps its shift (x - inf: NaN)
    if l == 1:
        k["affine_nc"](x3.reshape(n, c), mean_x, scale_x, beta_x, y3.reshape(n, c))
    else:
        k["affine"](x3, mean_x, scale_x, beta_x, y3)
    return mean, var, inv_std


def numba_backward(dy3, x3, mean, inv_std, gamma, dx3):
    """Training backward on (N, C, L) with the numba kernels, writing dx3; returns dgamma, dbeta.

    Two loops (5 passes): one reading x and dy for the per-channel sums (of dy, dy * (x - mean) and x - mean),
    one reading both and writing dx.
    """
    k = _pick(x3)
    n, c, l = x3.shape
    sum_dy, sum_dy_xc, sum_xc, dgamma = np.empty(c), np.empty(c), np.empty(c), np.empty(c)
    mean_x, a_x, b_x, c_x = (np.empty(c, x3.dtype) for _ in range(4))
    mean_x[:] = mean
    if l == 1:
        k["backward_sums_nc"](dy3.reshape(n, c), x3.reshape(n, c), mean_x, _row_blocks(n, k), sum_dy, sum_dy_xc,
                                sum_xc)
    else:
        k["backward_sums_ncl"](dy3, x3, mean_x, sum_dy, sum_dy_xc, sum_xc)
    g = np.ones(c) if gamma is None else gamma
    _backward_coefficients(mean, inv_std, g, sum_dy, sum_dy_xc, sum_xc, float(n * l), mean_x, a_x, b_x, c_x, dgamma)
    if l == 1:
        k["backward_dx_nc"](dy3.reshape(n, c), x3.reshape(n, c), mean_x, a_x, b_x, c_x, dx3.reshape(n, c))
    else:
        k["backward_dx"](dy3, x3, mean_x, a_x, b_x, c_x, dx3)
    return dgamma, sum_dy


def forward(x, gamma, beta, eps):
    """Training forward for NumPy float32/float64 x (validated by the caller) on the chosen backend.

    Returns y (x's shape and dtype, laid out in memory as x is when x is one dense block, else C-contiguous), mean,
    var, inv_std (float64). x is read through as_acb: no copy for C-contiguous, channels-last, Fortran-ordered or
    any other dense layout.
    """
    x3, order = as_acb(x)
    y, y3 = _empty_in_order(x.shape, x.dtype, order, x3.shape)
    g = None if gamma is None else gamma.astype(np.float64)
    b = None if beta is None else beta.astype(np.float64)
    run = numba_forward if _backend == "numba" else numpy_forward
    mean, var, inv_std = run(x3, g, b, float(eps), y3)
    return y, mean, var, inv_std


def backward(dy, x, mean, inv_std, gamma):
    """Training backward: dy and forward's input x (the same shape), mean and inv_std from forward(); returns dx
    (laid out as x), dgamma, dbeta (float64). dy is read in x's memory order: no copy when it is laid out as x,
    one copy into x's order otherwise."""
    x3, order = as_acb(x)
    dy_t = dy if dy.flags.c_contiguous and order == tuple(range(dy.ndim)) else dy.transpose(order)
    dy3 = (dy_t if dy_t.flags.c_contiguous else np.ascontiguousarray(dy_t)).reshape(x3.shape)
    dx, dx3 = _empty_in_order(x.shape, dy.dtype, order, x3.shape)
    g = None if gamma is None else gamma.astype(np.float64)
    run = numba_backward if _backend == "numba" else numpy_backward
    dgamma, dbeta = run(dy3, x3, mean, inv_std, g, dx3)
    return dx, dgamma, dbeta



def channels_last(x) -> bool:
    """True for an (N, C, *spatial) array stored channels-last: its values in the order of an (N, *spatial, C)
    C-contiguous array (NumPy's view of a torch tensor in torch.channels_last, for instance), and not C-contiguous."""
    return x.ndim > 2 and not x.flags.c_contiguous and x.transpose(0, *range(2, x.ndim), 1).flags.c_contiguous


def inference(x, mean, scale, shift):
    """Evaluation-mode batch norm of NumPy float32/float64 x with the numba kernels: y = (x - mean) * scale + shift
    per channel, the training forward's second loop, in one loop (a read of x and a write of y: 2 passes) where chapter
    02's NumPy code makes three operations (6 passes). mean, scale and shift (None: nothing to add) are (C,) arrays of x's dtype, as
    bnlib.functional's _inference_map returns them. x must be one dense block in any axis order (dense_order(x) is
    not None: C-contiguous, channels-last, Fortran-ordered, ...), read through as_acb without a copy; y has x's
    layout. A missing shift is applied as -0.0, which leaves
    every value as it is (x + 0.0 would turn -0.0 into 0.0): every output that is not NaN is bit for bit
    chapter 02's (a NaN may carry the other sign bit)."""
    c = x.shape[1]
    b = np.full(c, -0.0, dtype=x.dtype) if shift is None else shift
    k = _pick(x)
    if dense_order(x) is None:
        raise ValueError(f"inference needs x in one dense block (any axis order), got strides {x.strides} for shape "
                         f"{x.shape}")
    x3, order = as_acb(x)                                             # a view: no copy
    y, y3 = _empty_in_order(x.shape, x.dtype, order, x3.shape)
    if x3.shape[2] == 1:                                              # rows of C values (channels-last, (N, C))
        k["affine_nc"](x3.reshape(-1, c), mean, scale, b, y3.reshape(-1, c))
    else:
        k["affine"](x3, mean, scale, b, y3)
    return y
