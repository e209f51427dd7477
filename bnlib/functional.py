# GENERATED FILE: do not edit.
# bnlib.functional is generated from chapters/02_forward.ipynb, chapters/03_backward.ipynb, chapters/04_numpy.ipynb, chapters/05_cupy.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['SUPPORTED_DTYPES', 'get_array_module', 'BNCache', 'batch_norm_forward', 'batch_norm_inference', 'update_running_stats', 'batch_norm_backward', 'portable_batch_norm_forward', 'portable_batch_norm_backward', 'portable_batch_norm_inference']

import numbers
from typing import NamedTuple

import numpy as np

from bnlib.stats import _check_positive_int, accumulation_dtype, channel_shape, reduction_axes

SUPPORTED_DTYPES = ("float16", "float32", "float64")
# the same as scalar types, for the check below: x.dtype.type is read in 0.2 µs, x.dtype.name in 5 µs (it builds a
# string each time), and a layer checks its input on every forward and backward call
_SUPPORTED_TYPES = tuple(np.dtype(name).type for name in SUPPORTED_DTYPES)


def get_array_module(x):
    """The array library of x: CuPy for CuPy arrays (imported only when one is seen), else NumPy."""
    if _library(x) == "CuPy":
        import cupy
        return cupy
    return np


def _library(a) -> str:
    return "CuPy" if type(a).__module__.split(".")[0] == "cupy" else "NumPy"


def _check_same_library(v, name: str, x, x_name: str = "x"):
    """v lives where x lives: NumPy with NumPy, CuPy with CuPy, as CuPy and torch require (CuPy refuses to mix
    the two in arithmetic, so a NumPy x with a CuPy gamma failed deep inside the computation)."""
    if _library(v) != _library(x):
        raise TypeError(f"{name} is a {_library(v)} array and {x_name} a {_library(x)} array: pass arrays of one "
                        f"library (cupy.asarray(a) puts a NumPy array on the GPU, cupy.asnumpy(a) brings one back)")


class BNCache(NamedTuple):
    """What batch_norm_forward keeps for batch_norm_backward (no copy of x_hat is kept).

    x:       (N, C, *spatial) the input itself, not a copy
    mean:    (C,) batch mean, in the accumulation dtype (float32 for float16 and float32 data: the float64 mean
             rounded, which update_running_stats then feeds to the running mean)
    var:     (C,) biased batch variance
    inv_std: (C,) 1 / sqrt(var + eps)           gamma: (C,) scale, or None for gamma = 1
    eps:     the epsilon used
    """
    x: object
    mean: object
    var: object
    inv_std: object
    gamma: object
    eps: float


def _check_input(x, name: str = "x") -> int:
    """Validate an (N, C, *spatial) floating-point array; return C."""
    if not (hasattr(x, "ndim") and isinstance(getattr(x, "dtype", None), np.dtype) and hasattr(x, "shape")):
        hint = " (for torch tensors, use bnlib.nn's layers)" if type(x).__name__ == "Tensor" else ""
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}{hint}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array: batch normalization would use the masked values too (and drop "
                        f"the mask); pass the values to normalize as a plain array")
    if isinstance(x, np.matrix):                   # its * is a matrix product and it stays 2-D after a reduction
        raise TypeError(f"{name} is a np.matrix, which NumPy's array code does not handle as an array: "
                        f"pass np.asarray({name})")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C) or (N, C, *spatial), "
                         f"got shape {tuple(x.shape)} with {x.ndim} dimension(s)")
    if x.dtype.type not in _SUPPORTED_TYPES:          # a big-endian float32 ('>f4') passes: refused below
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {x.dtype}")
    if not x.dtype.isnative:
        raise TypeError(f"{name} must be in this machine's byte order, got {x.dtype.str} "
                        f"({name}.astype({name}.dtype.newbyteorder('=')) converts it)")
    return x.shape[1]


def _check_channel_vector(v, name: str, num_channels: int, x, required: bool = False):
    """Validate a per-channel parameter or statistic for input x: a float array of shape (C,) of x's library
    (NumPy or CuPy), or None if not required."""
    if v is None and not required:
        return
    if not (hasattr(v, "shape") and isinstance(getattr(v, "dtype", None), np.dtype)):
        hint = " (for torch tensors, use bnlib.nn's layers)" if type(v).__name__ == "Tensor" else ""
        raise TypeError(f"{name} must be a NumPy or CuPy array of shape ({num_channels},)"
                        f"{'' if required else ' or None'}, got {type(v).__name__}{hint}")
    _check_same_library(v, name, x)
    if tuple(v.shape) != (num_channels,):
        raise ValueError(f"{name} must have shape (C,) = ({num_channels},) for x of shape {tuple(x.shape)}, "
                         f"got shape {tuple(v.shape)}")
    if v.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating-point dtype, got {v.dtype}")


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}" + _bool_note(eps))


def _bool_note(value):
    """What a refusal adds for a bool: True and False pass isinstance(x, numbers.Real) and 0 <= True <= 1, and
    torch's constructors read them as 1 and 0, so the message says why a bool is refused."""
    if not isinstance(value, bool):
        return ""
    return (f" (a bool, which torch would read as {int(value)}: was it meant for another argument, such as "
            "BatchNorm's affine?)")


def _check_forward_args(x, gamma, beta, eps) -> int:
    """Validate the arguments of a training-mode forward pass; return C.

    One value per channel is an error (no variance); a zero-size batch is not (as in torch)."""
    num_channels = _check_input(x)
    _check_channel_vector(gamma, "gamma", num_channels, x)
    _check_channel_vector(beta, "beta", num_channels, x)
    _check_eps(eps)
    count = x.size // num_channels if num_channels else 0
    if count == 1:
        raise ValueError(f"batch norm with batch statistics (training mode, or no running statistics) needs "
                         f"more than 1 value per channel, got x of shape {tuple(x.shape)} ({count} value(s) per channel)")
    return num_channels


def _empty_batch_forward(x, gamma, eps):
    """A zero-size batch, as torch: an empty y (x's shape, dtype and memory layout) and a cache whose
    statistics are NaN (no values: no mean, no variance). Nothing is computed, nothing launched."""
    xp = get_array_module(x)
    nan = xp.full(x.shape[1], np.nan, dtype=accumulation_dtype(x.dtype))   # (C,)
    return xp.empty_like(x), BNCache(x, nan, nan.copy(), nan.copy(), gamma, float(eps))


def batch_norm_forward(x, gamma=None, beta=None, eps: float = 1e-5):
    """Training-mode batch norm: normalize x with its own per-channel batch statistics.

    Inputs:  x (N, C, *spatial) float16/32/64; gamma, beta (C,) or None (= 1 and 0); eps >= 0
    Returns: y with x's shape and dtype, and a BNCache for batch_norm_backward.
    y = gamma * (x - mean) / sqrt(var + eps) + beta, mean and biased var over all axes but 1.
    A zero-size x gives an empty y, as in torch; one value per channel raises ValueError.
    """
    num_channels = _check_forward_args(x, gamma, beta, eps)
    if x.size == 0:
        return _empty_batch_forward(x, gamma, eps)
    xp = get_array_module(x)
    acc = accumulation_dtype(x.dtype)
    axes, shape = reduction_axes(x.ndim), channel_shape(x.ndim, num_channels)
    mean64 = x.mean(axis=axes, dtype=np.float64)             # (C,) summed in float64: a float32 running sum drifts
    mean = mean64.astype(acc)                                # (C,) rounded to the accumulation dtype ...
    residual = mean64 - mean                                 # (C,) ... which loses this much (tiny, float64)
    centered = x - mean.reshape(shape)                       # (N, C, *spatial), exact for values near the mean
    # biased two-pass variance about the exact mean: mean((c - r)^2) = mean(c^2) - r^2, since mean(c) = r
    var64 = (centered * centered).mean(axis=axes, dtype=np.float64) - residual * residual
    var = xp.maximum(var64, 0).astype(acc)                   # (C,)
    inv_std = 1.0 / xp.sqrt(var + acc.type(eps))             # (C,)
    scale = inv_std if gamma is None else gamma.astype(acc) * inv_std
    shift = (-residual * scale).astype(acc)                  # (C,) centre on the exact mean, not the rounded one
    if beta is not None:
        shift += beta.astype(acc)
    centered *= scale.reshape(shape)
    centered += shift.reshape(shape)
    y = centered.astype(x.dtype, copy=False)
    return y, BNCache(x, mean, var, inv_std, gamma, float(eps))


def batch_norm_inference(x, running_mean, running_var, gamma=None, beta=None, eps: float = 1e-5):
    """Inference-mode batch norm (Algorithm 2): a fixed per-channel affine map.

    Inputs:  x (N, C, *spatial); running_mean, running_var (C,), var >= 0;
             gamma, beta (C,) or None.  Returns y with x's shape and dtype:
    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta, centred first: folded into
    x * scale + shift, the two terms cancel when |running_mean| is large against the spread, and
    float32 loses digits (chapter 02 measures it).
    NaN or inf in the running statistics (a network whose training diverged) is not an error: as in
    torch, a NaN gives NaN in that channel's output and an infinite variance gives beta.
    """
    mean, scale, shift = _inference_map(x, running_mean, running_var, gamma, beta, eps)
    shape = channel_shape(x.ndim, x.shape[1])
    y = x - mean.reshape(shape)                              # (N, C, *spatial), in acc: a new array
    y *= scale.reshape(shape)
    if shift is not None:
        y += shift.reshape(shape)
    return y.astype(x.dtype, copy=False)


def _inference_map(x, running_mean, running_var, gamma, beta, eps):
    """batch_norm_inference's arguments checked, and its map y = (x - mean) * scale (+ shift): mean, scale and
    shift (None when there is nothing to add), (C,) arrays in the working dtype. (Chapter 04's one-pass
    kernel applies the same map.)"""
    num_channels = _check_input(x)
    _check_channel_vector(running_mean, "running_mean", num_channels, x, required=True)
    _check_channel_vector(running_var, "running_var", num_channels, x, required=True)
    _check_channel_vector(gamma, "gamma", num_channels, x)
    _check_channel_vector(beta, "beta", num_channels, x)
    _check_eps(eps)
    xp = get_array_module(x)
    if bool((running_var < 0).any()):
        k = int(xp.argmax(running_var < 0))
        raise ValueError(f"running_var must be >= 0 everywhere, got {float(running_var[k])!r} at channel {k}")
    acc = accumulation_dtype(x.dtype)
    scale = 1.0 / xp.sqrt(running_var.astype(acc) + acc.type(eps))
    if gamma is not None:
        scale = scale * gamma.astype(acc)
    mean = running_mean.astype(acc)                          # (C,)
    shift = None
    if running_mean.dtype.itemsize > acc.itemsize:           # a wider running mean (float64 for float32 data):
        with np.errstate(invalid="ignore"):                  # inf - inf (a diverged network): NaN, set to 0 below
            residual = running_mean - mean                   # put back what rounding it to acc lost, as the
        residual = xp.where(xp.isfinite(residual), residual, 0)   # training forward does (NaN or inf: nothing)
        shift = (-residual * scale).astype(acc)
    if beta is not None:
        shift = beta.astype(acc) if shift is None else shift + beta.astype(acc)
    return mean, scale, shift


def _check_momentum(momentum):
    """momentum: a number in [0, 1], or None for a cumulative average. A bool is refused, though torch takes
    True as 1: BatchNorm2d(64, 1e-3, True) meant affine=True."""
    if momentum is not None and (isinstance(momentum, bool) or not (isinstance(momentum, numbers.Real)
                                                                  and 0.0 <= momentum <= 1.0)):
        raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}"
                         + _bool_note(momentum))


def update_running_stats(running_mean, running_var, cache: BNCache, momentum=0.1, num_batches_tracked=None):
    """New (running_mean, running_var) after one training batch, with PyTorch's conventions.

    running = (1 - alpha) * running + alpha * batch, with the unbiased batch variance, where
    alpha = momentum, or 1 / num_batches_tracked when momentum is None (a cumulative average;
    num_batches_tracked, required then, counts the batches seen including this one). Nothing is
    changed in place.
    A zero-size batch has no statistics: both come back unchanged (as copies), as torch leaves its
    buffers (torch.nn.BatchNorm still counts such a batch in num_batches_tracked).
    Each new value keeps its buffer's dtype; running_mean and running_var must be float arrays of the
    shape of the cache's statistics, (C,) (a caller may narrow those: chapter 07 keeps one group's).
    """
    if not isinstance(cache, BNCache):
        raise TypeError(f"cache must be the BNCache returned by batch_norm_forward, got {type(cache).__name__}")
    for stat, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        _check_channel_vector(stat, name, len(cache.mean), cache.x, required=True)
    _check_momentum(momentum)
    if momentum is None:
        momentum = 1.0 / _check_positive_int(num_batches_tracked, "num_batches_tracked (needed with momentum=None)")
    if cache.x.size == 0:
        return running_mean.copy(), running_var.copy()
    count = cache.x.size // cache.x.shape[1]
    unbiased_var = cache.var * (count / (count - 1))
    new_mean = ((1 - momentum) * running_mean + momentum * cache.mean).astype(running_mean.dtype, copy=False)
    new_var = ((1 - momentum) * running_var + momentum * unbiased_var).astype(running_var.dtype, copy=False)
    return new_mean, new_var


def _check_dy(dy, x_shape, x_dtype):
    """dy for a forward input of shape x_shape and dtype x_dtype: an array of that shape and dtype.
    (The layers of chapter 04 check their dy with it too.)"""
    _check_input(dy, "dy")
    _check_like_input(dy, x_shape, x_dtype)


def _check_like_input(dy, x_shape, x_dtype):
    """The shape and dtype half of _check_dy (chapter 08's layers, which take inputs of any rank, use it alone)."""
    if tuple(dy.shape) != tuple(x_shape):
        raise ValueError(f"dy must have the shape of the forward input {tuple(x_shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x_dtype:
        raise TypeError(f"dy must have the dtype of the forward input ({x_dtype}), got {dy.dtype}")


def _check_backward_args(dy, cache):
    """Validate dy against the cache of the forward pass it belongs to."""
    if not isinstance(cache, BNCache):
        raise TypeError(f"cache must be the BNCache returned by batch_norm_forward, got {type(cache).__name__}")
    _check_dy(dy, cache.x.shape, cache.x.dtype)
    _check_same_library(dy, "dy", cache.x, "the forward input x")


def batch_norm_backward(dy, cache: BNCache):
    """Gradients of training-mode batch norm, equations (eq-dgamma-dbeta) and (eq-dx).

    Inputs:  dy (N, C, *spatial), the gradient of the loss with respect to y, same shape and
             dtype as the forward input; cache, the BNCache that batch_norm_forward returned.
    Returns: dx (N, C, *spatial) in x's dtype; dgamma, dbeta (C,) (in gamma's dtype, or the
             accumulation dtype when gamma is None).
    dx = gamma / s * (dy - mean(dy) - x_hat * mean(dy * x_hat)), s = sqrt(var + eps), means over all axes but 1.
    A zero-size batch gives an empty dx (x's layout) and zero dgamma, dbeta, as in torch.
    """
    _check_backward_args(dy, cache)
    x = cache.x
    num_channels = x.shape[1]
    acc = accumulation_dtype(x.dtype)
    param_dtype = acc if cache.gamma is None else cache.gamma.dtype
    if x.size == 0:                                                          # nothing to differentiate
        xp = get_array_module(x)
        return xp.empty_like(x), xp.zeros(num_channels, param_dtype), xp.zeros(num_channels, param_dtype)
    count = x.size // num_channels
    axes, shape = reduction_axes(x.ndim), channel_shape(x.ndim, num_channels)
    x_hat = x - cache.mean.reshape(shape)                                    # (N, C, *spatial), in acc
    # cache.mean is rounded: below float64 it is the float64 mean rounded to acc, and in float64 the computed
    # mean carries float64's own rounding. Either way every x_hat of a channel is off by the same
    # delta = mean(x - cache.mean) / s, which the sums below take back out, for every dtype.
    # The per-channel sums run in float64, as chapter 02's: a float32 running sum drifts.
    delta = x_hat.mean(axis=axes, dtype=np.float64) * cache.inv_std          # (C,)
    x_hat *= cache.inv_std.reshape(shape)                                    # recomputed in place
    dbeta = dy.sum(axis=axes, dtype=np.float64)                              # (C,)  sum of g
    dgamma = (dy * x_hat).sum(axis=axes, dtype=np.float64) - delta * dbeta   # (C,)  sum of g * (x_hat - delta)
    mean_g_xhat = dgamma / count                                             # (C,)  mean of g * x_hat
    mean_g = dbeta / count - delta * mean_g_xhat                             # (C,)  mean of g, and delta's share
    scale = cache.inv_std if cache.gamma is None else cache.gamma.astype(acc) * cache.inv_std
    dx = x_hat                                                               # the buffer becomes dx:
    dx *= -mean_g_xhat.astype(acc).reshape(shape)                            #   - x_hat * mean(g x_hat)
    dx += dy                                                                 #   + g
    dx -= mean_g.astype(acc).reshape(shape)                                  #   - mean(g)
    dx *= scale.reshape(shape)                                               #   times gamma / s
    return dx.astype(x.dtype, copy=False), dgamma.astype(param_dtype), dbeta.astype(param_dtype)


from bnlib import cpu

portable_batch_norm_forward = batch_norm_forward       # chapters 02-03: any array library, float16 too
portable_batch_norm_backward = batch_norm_backward
portable_batch_norm_inference = batch_norm_inference


def batch_norm_forward(x, gamma=None, beta=None, eps: float = 1e-5):
    """Training-mode batch norm: normalize x with its own per-channel batch statistics.

    Inputs:  x (N, C, *spatial) float16/32/64; gamma, beta (C,) or None (= 1 and 0); eps >= 0
    Returns: y with x's shape and dtype, and a BNCache for batch_norm_backward.
    NumPy float32/float64 input runs on bnlib.cpu's fast path (chapter 04); anything else, and a
    zero-size batch (an empty y, as in torch), on portable_batch_norm_forward (chapter 02).
    """
    if not cpu.supports(x) or x.size == 0:
        return portable_batch_norm_forward(x, gamma, beta, eps)
    _check_forward_args(x, gamma, beta, eps)
    y, mean, var, inv_std = cpu.forward(x, gamma, beta, eps)
    stats = (a.astype(x.dtype) for a in (mean, var, inv_std))
    return y, BNCache(x, *stats, gamma, float(eps))


def batch_norm_backward(dy, cache: BNCache):
    """Gradients of training-mode batch norm: dx (x's dtype), dgamma, dbeta (C,).

    dx = gamma / s * (dy - mean(dy) - x_hat * mean(dy * x_hat)), s = sqrt(var + eps), means over all axes but 1.
    NumPy float32/float64 runs on bnlib.cpu's fast path; anything else, and a zero-size batch, on
    portable_batch_norm_backward.
    """
    _check_backward_args(dy, cache)
    if not cpu.supports(cache.x) or cache.x.size == 0:
        return portable_batch_norm_backward(dy, cache)
    dx, dgamma, dbeta = cpu.backward(dy, cache.x, cache.mean.astype(np.float64),
                                     cache.inv_std.astype(np.float64), cache.gamma)
    param_dtype = cache.x.dtype if cache.gamma is None else cache.gamma.dtype
    return dx, dgamma.astype(param_dtype), dbeta.astype(param_dtype)


def batch_norm_inference(x, running_mean, running_var, gamma=None, beta=None, eps: float = 1e-5):
    """Inference-mode batch norm (Algorithm 2): y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

    Inputs and checks as portable_batch_norm_inference (chapter 02). NumPy float32/float64 input on the numba
    backend, in one dense block (C-contiguous, channels-last, Fortran-ordered, ...), runs bnlib.cpu.inference: the same map in one loop (2 passes), every output that is
    not NaN the same bit for bit (NaN where chapter 02 gives NaN), y in x's layout. Anything else (the numpy and
    portable backends, other layouts, float16, CuPy arrays, a zero-size batch) runs chapter 02's code.
    """
    if (not cpu.supports(x) or cpu.get_backend() != "numba" or x.size == 0
            or cpu.dense_order(x) is None):
        return portable_batch_norm_inference(x, running_mean, running_var, gamma, beta, eps)
    return cpu.inference(x, *_inference_map(x, running_mean, running_var, gamma, beta, eps))


from bnlib import cuda

_cpu_or_portable_forward = batch_norm_forward       # chapter 04's dispatch (NumPy fast paths, portable)
_cpu_or_portable_backward = batch_norm_backward


def batch_norm_forward(x, gamma=None, beta=None, eps: float = 1e-5):
    """Training-mode batch norm: normalize x with its own per-channel batch statistics.

    Inputs:  x (N, C, *spatial) float16/32/64; gamma, beta (C,) or None (= 1 and 0); eps >= 0
    Returns: y with x's shape and dtype, and a BNCache for batch_norm_backward.
    CuPy input runs bnlib.cuda's fused kernels (chapter 05), NumPy float32/float64 input
    bnlib.cpu's fast path (chapter 04), anything else portable_batch_norm_forward (chapter 02).
    A zero-size batch launches no kernel: chapter 02's early return gives an empty y, as in torch.
    """
    if not cuda.supports(x) or x.size == 0:
        return _cpu_or_portable_forward(x, gamma, beta, eps)
    _check_forward_args(x, gamma, beta, eps)
    y, mean, var, inv_std = cuda._forward(x, gamma, beta, eps)
    return y, BNCache(x, mean, var, inv_std, gamma, float(eps))


def batch_norm_backward(dy, cache: BNCache):
    """Gradients of training-mode batch norm: dx (x's dtype), dgamma, dbeta (C,); dx laid
    out as x from the NumPy fast paths when x is one dense block, else C-contiguous.

    dx = gamma / s * (dy - mean(dy) - x_hat * mean(dy * x_hat)), s = sqrt(var + eps), means over all axes but 1.
    A zero-size batch launches no kernel: an empty dx and zero dgamma, dbeta (chapter 03).
    """
    _check_backward_args(dy, cache)
    if not cuda.supports(cache.x) or cache.x.size == 0:
        return _cpu_or_portable_backward(dy, cache)
    dx, dgamma, dbeta = cuda._backward(dy, cache.x, cache.mean, cache.inv_std, cache.gamma)
    param_dtype = dgamma.dtype if cache.gamma is None else cache.gamma.dtype
    return dx, dgamma.astype(param_dtype), dbeta.astype(param_dtype)
