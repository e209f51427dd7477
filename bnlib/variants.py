# GENERATED FILE: do not edit.
# bnlib.variants is generated from chapters/08_variants.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['normalize', 'normalize_backward', 'LayerNorm', 'GroupNorm', 'InstanceNorm', 'BatchRenorm', 'batch_renorm_limits', 'GhostBatchNorm', 'FrozenBatchNorm']

import numbers
import operator

import numpy as np

from bnlib import functional as F
from bnlib.layers import BatchNorm, _bias_repr, _check_flag, _check_param_dtype, _load_state, _state_copies
from bnlib.stats import accumulation_dtype, channel_shape, reduction_axes


def _axes_of(axes, ndim):
    """`axes` (one axis, or a sequence of distinct axes, negative ones counted from the end) as a sorted tuple of
    non-negative axes of an array of `ndim` dimensions; anything else is refused, naming axes."""
    def index(a):                      # what NumPy takes as an axis (an int, a NumPy integer), but not a bool
        return None if isinstance(a, (bool, np.bool_)) else operator.index(a)
    try:
        items = (index(axes),)
    except TypeError:
        try:
            items = tuple(index(a) for a in axes)
        except TypeError:
            items = ()
    if (not items or None in items or any(not -ndim <= a < ndim for a in items)
            or len({a % ndim for a in items}) != len(items)):
        raise ValueError(f"axes must be an axis or a non-empty sequence of distinct axes of an array of {ndim} "
                         f"dimensions, got {axes!r}")
    return tuple(sorted(a % ndim for a in items))


def normalize(x, axes, eps=1e-5):
    """Standardize x over `axes`: x_hat = (x - mean) / sqrt(var + eps), biased var, two passes.

    x: any float array; axes: the axes that share one mean and variance (an axis, or a sequence of distinct
    axes, negative ones counted from the end; anything else is a ValueError that names axes).
    Returns x_hat (x's shape) and inv_std (x's shape with size 1 on `axes`), both in the
    accumulation dtype (float32 for float16 x, x's dtype otherwise). An empty x comes back as it is
    (inv_std all ones), without the warnings of a mean over nothing.
    """
    if getattr(getattr(x, "dtype", None), "kind", None) != "f":
        raise TypeError(f"normalize needs a floating-point NumPy array, got {getattr(x, 'dtype', type(x).__name__)}")
    axes = _axes_of(axes, x.ndim)
    F._check_eps(eps)
    acc = accumulation_dtype(x.dtype)
    if x.size == 0:
        return x.astype(acc), np.ones([1 if i in axes else n for i, n in enumerate(x.shape)], acc)
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64).astype(acc)
    x_hat = x.astype(acc) - mean                                # a new array: x is never modified
    var = (x_hat * x_hat).mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + acc.type(eps))
    x_hat *= inv_std
    return x_hat, inv_std


def normalize_backward(dx_hat, x_hat, inv_std, axes):
    """Gradient of `normalize` with respect to its input, chapter 03's compact formula over `axes`:

    dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)), means over `axes`.
    dx_hat is the gradient with respect to x_hat (dy times the scale); all arrays of x's shape
    except inv_std (size 1 on `axes`), as `normalize` returns them; other shapes (which NumPy would
    broadcast into a wrong gradient, silently) and non-float arrays are refused by name.
    """
    for a, name in ((dx_hat, "dx_hat"), (x_hat, "x_hat"), (inv_std, "inv_std")):
        if getattr(getattr(a, "dtype", None), "kind", None) != "f":
            raise TypeError(f"normalize_backward needs floating-point NumPy arrays, got {name} of "
                            f"{getattr(a, 'dtype', type(a).__name__)}")
    axes = _axes_of(axes, x_hat.ndim)
    if dx_hat.shape != x_hat.shape:
        raise ValueError(f"dx_hat must have x_hat's shape {x_hat.shape}, got {dx_hat.shape}")
    kept = tuple(1 if i in axes else n for i, n in enumerate(x_hat.shape))
    if inv_std.shape != kept:
        raise ValueError(f"inv_std must have shape {kept} (x_hat's, with size 1 on axes {axes}), got {inv_std.shape}")
    if dx_hat.size == 0:                                        # nothing to differentiate, no warnings
        return inv_std * dx_hat
    mean_g = dx_hat.mean(axis=axes, keepdims=True)
    mean_gx = (dx_hat * x_hat).mean(axis=axes, keepdims=True)
    return inv_std * (dx_hat - mean_g - x_hat * mean_gx)


_FLOAT_DTYPES = ("float16", "float32", "float64")


def _check_eps_dtype(eps, dtype):
    F._check_eps(eps)
    return float(eps), _check_param_dtype(dtype)       # float32 or float64; None: float32, as layers.BatchNorm


def _check_array(x, name="x"):
    if not (isinstance(x, np.ndarray)):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array: normalization would use the masked values too (and drop the "
                        f"mask); pass the values to normalize as a plain array")
    if x.dtype.name not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {x.dtype}")


def _check_dy(dy, x_shape, x_dtype):
    """dy: a NumPy array of the forward input's shape and dtype (of any rank: LayerNorm takes unbatched input)."""
    _check_array(dy, "dy")
    F._check_like_input(dy, x_shape, x_dtype)


class _Normalization:
    """Plumbing shared by LayerNorm, GroupNorm and InstanceNorm: modes and the state dict.

    A subclass calls _init_parameters() and lists any buffers in _state_shapes(): name -> shape
    (None for the integer scalar num_batches_tracked).
    """

    training = True

    def __call__(self, x):
        return self.forward(x)                         # so that a subclass's forward is what a call runs

    def train(self, mode: bool = True):
        if not isinstance(mode, (bool, np.bool_)):        # as torch: "mode" would otherwise be truthy or not
            raise ValueError(f"training mode is expected to be boolean (True or False), got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _init_parameters(self, shape, affine, bias=True):
        """weight = 1 and (with bias) bias = 0 of `shape`, with their gradients; None where absent: all four
        without affine, bias and grad_bias with bias=False (torch's weight-only layers)."""
        make = lambda fill, present: np.full(shape, fill, self.dtype) if present else None
        with_bias = bool(_check_flag(bias, "bias") and affine)
        self.weight, self.grad_weight = make(1, affine), make(0, affine)
        self.bias, self.grad_bias = make(0, with_bias), make(0, with_bias)
        self._param_shape = tuple(shape) if affine else None
        self.training, self._cache = True, None

    def _state_shapes(self):
        shapes = {} if self._param_shape is None else {"weight": self._param_shape}
        if self.bias is not None:
            shapes["bias"] = self._param_shape
        return shapes

    def _affine(self, x_hat, x_dtype, shape):
        """x_hat * weight + bias (the parameters reshaped to `shape`), in x's dtype; a copy of x_hat without
        parameters (backward needs x_hat as it is, whatever the caller does to y, an in-place ReLU say)."""
        if self.weight is None:
            return x_hat.astype(x_dtype)
        y = x_hat * self.weight.reshape(shape)
        if self.bias is not None:
            y += self.bias.reshape(shape)
        return y.astype(x_dtype, copy=False)

    def state_dict(self):
        """Copies of the parameters and buffers, under torch's key names."""
        return _state_copies(self, self._state_shapes())

    def load_state_dict(self, state, strict: bool = True):
        """Load a state dict (NumPy arrays or torch tensors). Every key, shape and dtype is checked
        before anything is assigned: a load that raises changes nothing."""
        return _load_state(self, state, self._state_shapes(), self.dtype, strict)


class LayerNorm(_Normalization):
    """Layer normalization (Ba et al., 2016) for NumPy arrays, torch.nn.LayerNorm's conventions.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, one mean and (biased) variance per
    example, over the last len(normalized_shape) axes; weight and bias have normalized_shape.
    No batch statistics: training and evaluation compute the same thing.

    Args:
        normalized_shape: int or tuple, the trailing shape of the input that is normalized
        eps: added to the variance inside the square root (default 1e-5)
        elementwise_affine: learn weight (ones) and bias (zeros) of normalized_shape (default True)
        bias: with elementwise_affine, whether there is a bias (default True; False: weight only, as
            torch.nn.LayerNorm(..., bias=False), whose state dicts then load); keyword only
        dtype: dtype of the parameters (default float32)

    Shape: input (*, *normalized_shape); output the same. backward(dy) returns dx and stores
    grad_weight, grad_bias. A call that raises changes no state.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, dtype=np.float32, *, bias=True):
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
        if not (isinstance(shape, (tuple, list)) and all(isinstance(s, numbers.Integral) for s in shape)):
            raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {normalized_shape!r}")
        shape = tuple(F._check_positive_int(s, "every entry of normalized_shape") for s in shape)
        if not shape:
            raise ValueError("normalized_shape must have at least one entry, got ()")
        self.eps, self.dtype = _check_eps_dtype(eps, dtype)
        self.normalized_shape, self.elementwise_affine = shape, _check_flag(elementwise_affine, "elementwise_affine")
        self._init_parameters(shape, self.elementwise_affine, bias)

    def forward(self, x):
        """Normalize every example over its trailing normalized_shape axes."""
        _check_array(x)
        k = len(self.normalized_shape)
        if x.shape[x.ndim - k:] != self.normalized_shape or x.ndim < k:
            raise ValueError(f"expected input of shape (*, {', '.join(map(str, self.normalized_shape))}) "
                             f"(normalized_shape), got {x.shape}")
        axes = tuple(range(x.ndim - k, x.ndim))
        x_hat, inv_std = normalize(x, axes, self.eps)                  # inv_std: (*, 1, ..., 1)
        self._cache = (x_hat, inv_std, axes, x.dtype)
        return self._affine(x_hat, x.dtype, self.normalized_shape)

    def backward(self, dy):
        """dx for the last forward's input; stores grad_weight and grad_bias (summed over examples)."""
        if self._cache is None:
            raise ValueError("backward() needs a forward() first: no cached input")
        x_hat, inv_std, axes, x_dtype = self._cache
        _check_dy(dy, x_hat.shape, x_dtype)
        dx_hat = dy if self.weight is None else dy * self.weight
        dx = normalize_backward(dx_hat.astype(x_hat.dtype, copy=False), x_hat, inv_std, axes)
        if self.weight is not None:
            lead = tuple(range(dy.ndim - len(axes)))
            self.grad_weight[...] = (dy * x_hat).sum(axis=lead)
            if self.bias is not None:
                self.grad_bias[...] = dy.sum(axis=lead, dtype=x_hat.dtype)
        return dx.astype(x_dtype, copy=False)

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps:g}, elementwise_affine={self.elementwise_affine}"
                f"{_bias_repr(self.weight, self.bias)})")


class GroupNorm(_Normalization):
    """Group normalization (Wu & He, 2018) for NumPy arrays, torch.nn.GroupNorm's conventions.

    The C channels are split into num_groups groups of C / num_groups consecutive channels; each
    example gets one mean and (biased) variance per group, over the group's channels and all
    spatial positions. Then a per-channel affine map. num_groups = C gives instance
    normalization, num_groups = 1 layer normalization over (C, *spatial) with a per-channel affine.

    Args:
        num_groups: G, must divide num_channels;  num_channels: C
        eps: added to the variance inside the square root (default 1e-5)
        affine: learn per-channel weight (ones) and bias (zeros) (default True)
        bias: with affine, whether there is a bias (default True; False: weight only, as torch's
            bias=False, whose state dicts then load); keyword only
        dtype: dtype of the parameters (default float32)

    Shape: input (N, C, *spatial); output the same. No batch statistics: training and
    evaluation compute the same thing. A call that raises changes no state.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32, *, bias=True):
        self.num_groups = F._check_positive_int(num_groups, "num_groups")
        self.num_channels = F._check_positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.eps, self.dtype = _check_eps_dtype(eps, dtype)
        self.affine = _check_flag(affine, "affine")
        self._init_parameters((self.num_channels,), self.affine, bias)

    def _check_input(self, x):
        _check_array(x)
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected input of shape (N, {self.num_channels}, *spatial) "
                             f"({self.num_channels} = num_channels), got {x.shape}")

    def _group_view(self, a):
        """(N, C, *spatial) -> (N, G, C/G * prod(spatial)): the values that share statistics in one row."""
        group_size = self.num_channels // self.num_groups * int(np.prod(a.shape[2:], dtype=np.int64))
        return a.reshape(a.shape[0], self.num_groups, group_size)     # from the shape: N = 0 keeps M

    def forward(self, x):
        """Normalize every (example, group) over the group's channels and positions."""
        self._check_input(x)
        x_hat, inv_std = normalize(self._group_view(x), (2,), self.eps)   # (N, G, M), (N, G, 1)
        x_hat = x_hat.reshape(x.shape)
        self._cache = (x_hat, inv_std, x.dtype)
        return self._affine(x_hat, x.dtype, channel_shape(x.ndim, self.num_channels))

    def backward(self, dy):
        """dx for the last forward's input; stores grad_weight and grad_bias (per channel)."""
        if self._cache is None:
            raise ValueError("backward() needs a forward() first: no cached input")
        x_hat, inv_std, x_dtype = self._cache
        _check_dy(dy, x_hat.shape, x_dtype)
        shape, axes = channel_shape(dy.ndim, self.num_channels), reduction_axes(dy.ndim)
        dx_hat = (dy if self.weight is None else dy * self.weight.reshape(shape)).astype(x_hat.dtype, copy=False)
        dx = normalize_backward(self._group_view(dx_hat), self._group_view(x_hat), inv_std, (2,))
        if self.weight is not None:
            self.grad_weight[...] = (dy * x_hat).sum(axis=axes)
            if self.bias is not None:
                self.grad_bias[...] = dy.sum(axis=axes, dtype=x_hat.dtype)
        return dx.reshape(dy.shape).astype(x_dtype, copy=False)

    def __repr__(self):
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps:g}, affine={self.affine}{_bias_repr(self.weight, self.bias)})"


class InstanceNorm(GroupNorm):
    """Instance normalization (Ulyanov et al., 2016), torch.nn.InstanceNorm1d/2d/3d's conventions.

    One mean and (biased) variance per example and channel, over the spatial positions: GroupNorm
    with one channel per group. With track_running_stats=True, training also keeps running
    averages (the batch-mean of the per-instance means and unbiased variances, as torch does), and
    evaluation normalizes with them; num_batches_tracked is kept for torch's state dicts and, as
    in torch, never advanced.

    Args:
        num_features: C;  eps: inside the square root (default 1e-5)
        affine: learn per-channel weight and bias (default False, as in torch)
        bias: with affine, whether there is a bias (default True; keyword only, as in torch)
        track_running_stats: keep running_mean / running_var (default False, as in torch)
        momentum: running = (1 - momentum) * running + momentum * batch, a number in [0, 1] (0.1)
        dtype: dtype of parameters and buffers (default float32)

    Shape: input (N, C, *spatial) with at least 2 positions (when instance statistics are used).
    In evaluation with running statistics, backward() reads the forward's input itself, not a copy
    (as layers.BatchNorm): do not change x in place between the two.
    """

    def __init__(self, num_features, eps=1e-5, affine=False, track_running_stats=False, momentum=0.1,
                 dtype=np.float32, *, bias=True):
        if momentum is None or isinstance(momentum, bool) or not (isinstance(momentum, numbers.Real)
                                                                 and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r} "
                             f"(torch's InstanceNorm has no cumulative average)" + F._bool_note(momentum))
        num_features = F._check_positive_int(num_features, "num_features")   # named as the caller named it
        super().__init__(num_features, num_features, eps=eps, affine=affine, dtype=dtype, bias=bias)
        self.num_features, self.momentum = self.num_channels, float(momentum)
        self.track_running_stats = _check_flag(track_running_stats, "track_running_stats")
        if self.track_running_stats:
            self.running_mean = np.zeros(num_features, self.dtype)
            self.running_var = np.ones(num_features, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._eval_input = None

    def _state_shapes(self):
        shapes = super()._state_shapes()
        if self.track_running_stats:
            c = (self.num_features,)
            shapes.update(running_mean=c, running_var=c, num_batches_tracked=None)
        return shapes

    def forward(self, x):
        self._check_input(x)
        if not self.training and self.track_running_stats:             # a fixed affine map, as eval BN
            y = F.batch_norm_inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
            self._cache, self._eval_input = None, x
            return y
        positions = int(np.prod(x.shape[2:], dtype=np.int64))                # per example and channel
        if positions < 2:
            raise ValueError(f"instance statistics need more than 1 spatial position per channel, got input "
                             f"of shape {x.shape}")
        y = super().forward(x)
        self._eval_input = None
        if self.training and self.track_running_stats and x.shape[0] > 0:
            view = self._group_view(x).astype(np.float64)                      # (N, C, positions)
            mean = view.mean(axis=(0, 2))                                      # (C,) batch-mean of instance means
            unbiased = view.var(axis=2, ddof=1).mean(axis=0)                   # (C,)
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * unbiased
        return y

    def backward(self, dy):
        if self._eval_input is not None:                                 # eval: BatchNorm's fixed map
            dx, dgamma, dbeta = BatchNorm._inference_backward(self, dy, self._eval_input)
            if self.affine:
                self.grad_weight[...] = dgamma
            if self.bias is not None:
                self.grad_bias[...] = dbeta
            return dx
        return super().backward(dy)

    def __repr__(self):
        return (f"InstanceNorm({self.num_features}, eps={self.eps:g}, affine={self.affine}{_bias_repr(self.weight, self.bias)}, "
                f"track_running_stats={self.track_running_stats}, momentum={self.momentum})")


def _check_renorm_limits(r_max, d_max):
    """(r_max, d_max) as floats, or ValueError: r_max >= 1 and d_max >= 0, both finite."""
    if isinstance(r_max, bool) or not (isinstance(r_max, numbers.Real) and np.isfinite(r_max) and r_max >= 1):
        raise ValueError(f"r_max must be a finite number >= 1, got {r_max!r}")
    if isinstance(d_max, bool) or not (isinstance(d_max, numbers.Real) and np.isfinite(d_max) and d_max >= 0):
        raise ValueError(f"d_max must be a finite number >= 0, got {d_max!r}")
    return float(r_max), float(d_max)


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) for NumPy arrays, with layers.BatchNorm's interface.

    Training, per channel, with batch mean mu_B, sigma_B = sqrt(var_B + eps) and the running
    sigma = sqrt(running_var + eps) *before* this batch's update:
        r = clip(sigma_B / sigma, 1 / r_max, r_max),  d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias
    r and d are constants in the backward pass (no gradient flows through them). Unclipped, this
    is exactly the evaluation-mode map (x - running_mean) / sigma; with r_max = 1, d_max = 0 it
    is BatchNorm, bit for bit. Running statistics are updated as BatchNorm's (momentum, unbiased
    variance); evaluation uses them, as BatchNorm's. (The paper averages sigma itself; keeping
    running_var keeps torch's BatchNorm state-dict keys. The two differ most at small batches: with
    2 values per channel the average of sigma_B is about sigma / sqrt(pi), so r here tends to be smaller.)

    Args:
        num_features: C;  eps: inside the square root (1e-5);  momentum: as BatchNorm's (0.1)
        r_max >= 1, d_max >= 0: the clipping limits (default 1 and 0: plain BN); change them
            during training with set_limits(), e.g. from batch_renorm_limits(step)
        dtype: dtype of parameters and buffers (float32)
        bias: whether there is a shift (default True; False: weight only, as BatchNorm's); keyword only

    Shape: input (N, C) or (N, C, *spatial); output the same. A call that raises changes no state.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, r_max=1.0, d_max=0.0, dtype=np.float32, *,
                 bias=True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True,
                         dtype=dtype, bias=bias)
        self.set_limits(r_max, d_max)

    def set_limits(self, r_max, d_max):
        """Set the clipping limits: r in [1/r_max, r_max], d in [-d_max, d_max]."""
        self.r_max, self.d_max = _check_renorm_limits(r_max, d_max)
        return self

    def correction(self, mean, var):
        """(r, d) for a batch with per-channel mean and biased variance var (arrays of shape (C,))."""
        sigma = np.sqrt(self.running_var + self.eps)
        r = np.clip(np.sqrt(var + self.eps) / sigma, 1.0 / self.r_max, self.r_max)
        d = np.clip((mean - self.running_mean) / sigma, -self.d_max, self.d_max)
        return r.astype(self.dtype), d.astype(self.dtype)

    def forward(self, x):
        """Renormalize x in training (updating the running statistics); BatchNorm's map in evaluation."""
        if not self.training or getattr(x, "size", 1) == 0:   # empty: BatchNorm's empty output
            return super().forward(x)
        self._check_channels(x)
        _, stats = F.batch_norm_forward(x, None, None, self.eps)          # batch mean and variance
        r, d = self.correction(stats.mean, stats.var)
        scale, shift = self.weight * r, self.weight * d                    # r = 1, d = 0: weight, bias exactly
        if self.bias is not None:
            shift = shift + self.bias
        y, cache = F.batch_norm_forward(x, scale, shift, self.eps)
        steps = self.num_batches_tracked + 1
        mean, var = F.update_running_stats(self.running_mean, self.running_var, cache, self.momentum,
                                           num_batches_tracked=steps)
        self.running_mean[...], self.running_var[...], self.num_batches_tracked = mean, var, steps
        self._cache = ("renorm", (cache, r, d))
        self.last_r, self.last_d = r, d
        return y

    def __call__(self, x):
        return self.forward(x)                         # a subclass's forward is what a call runs

    def backward(self, dy):
        """dx with r and d held constant: BatchNorm's backward with scale weight * r."""
        if self._cache is None or self._cache[0] != "renorm":
            return super().backward(dy)
        cache, r, d = self._cache[1]
        dx, sum_dy_xhat, sum_dy = F.batch_norm_backward(dy, cache)        # (C,): sum dy*x_hat, sum dy
        self.grad_weight[...] = r * sum_dy_xhat + d * sum_dy             # y = weight * (r x_hat + d) + bias
        if self.grad_bias is not None:
            self.grad_bias[...] = sum_dy
        return dx

    def __repr__(self):
        return (f"BatchRenorm({self.num_features}, eps={self.eps:g}, momentum={self.momentum}, "
                f"r_max={self.r_max:g}, d_max={self.d_max:g}{_bias_repr(self.weight, self.bias)})")


def batch_renorm_limits(step, warmup_steps=5000, r_max=3.0, r_max_step=40000, d_max=5.0, d_max_step=25000):
    """(r_max, d_max) at a training step: plain BN (1, 0) for the first warmup_steps, then relaxed
    linearly to reach r_max at r_max_step and d_max at d_max_step, constant afterwards.

    The defaults are the end points of Ioffe (2017)'s Inception schedule; the paper relaxes the limits
    "gradually" without saying how, and the linear ramp is this library's choice. Scale the step
    counts to a shorter run.
    """
    for name, value in (("step", step), ("warmup_steps", warmup_steps), ("r_max_step", r_max_step),
                        ("d_max_step", d_max_step)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    r_max, d_max = _check_renorm_limits(r_max, d_max)
    if r_max_step <= warmup_steps or d_max_step <= warmup_steps:
        raise ValueError(f"r_max_step ({r_max_step}) and d_max_step ({d_max_step}) must be later than "
                         f"warmup_steps ({warmup_steps})")

    def ramp(start, end, end_step):
        t = min(max((step - warmup_steps) / (end_step - warmup_steps), 0.0), 1.0)
        return start + t * (end - start)

    return ramp(1.0, float(r_max), r_max_step), ramp(0.0, float(d_max), d_max_step)


class GhostBatchNorm(BatchNorm):
    """Ghost batch normalization (Hoffer et al., 2017): BatchNorm applied to virtual batches.

    In training the batch is cut along axis 0 into consecutive virtual batches of
    virtual_batch_size examples (the last one may be smaller; each needs more than one value per
    channel); each is normalized with its own statistics, exactly as BatchNorm would normalize it
    alone. Running statistics: one update per call, with the average over the virtual batches of
    their means and of their unbiased variances, weighted by their sizes (the mean is then the
    whole batch's mean); with a single virtual batch this is BatchNorm's update. (Hoffer et al.'s
    algorithm instead makes one momentum step per virtual batch, in sequence; one update per call
    is the simplification Keras's virtual_batch_size makes.) Evaluation uses the running
    statistics, as BatchNorm.

    Args:
        num_features: C;  virtual_batch_size: examples per virtual batch
        eps (1e-5), momentum (0.1; None: cumulative average), dtype (float32), bias (True; keyword only):
            as BatchNorm's

    Shape: input (N, C) or (N, C, *spatial); output the same. A call that raises changes no state.
    """

    def __init__(self, num_features, virtual_batch_size, eps=1e-5, momentum=0.1, dtype=np.float32, *, bias=True):
        self.virtual_batch_size = F._check_positive_int(virtual_batch_size, "virtual_batch_size")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True,
                         dtype=dtype, bias=bias)

    def forward(self, x):
        """Normalize each virtual batch with its own statistics (training); BatchNorm's map in evaluation."""
        self._check_channels(x)
        F._check_input(x)                                     # a NumPy or CuPy array of a float dtype
        if not self.training or x.size == 0:                  # empty: BatchNorm's empty output
            return super().forward(x)
        n, vbs = x.shape[0], self.virtual_batch_size
        per_example = x.size // max(n * x.shape[1], 1)                    # values per example and channel
        last = n - (n - 1) // vbs * vbs if n else 0                        # examples in the last virtual batch
        if last * per_example < 2:
            raise ValueError(f"every virtual batch needs more than 1 value per channel: input of shape {x.shape} "
                             f"in virtual batches of {vbs} (virtual_batch_size) leaves a last one with "
                             f"{last * per_example} value(s) per channel")
        ys, caches = [], []
        for start in range(0, x.shape[0], self.virtual_batch_size):
            y, cache = F.batch_norm_forward(x[start:start + self.virtual_batch_size], self.weight, self.bias,
                                            self.eps)
            ys.append(y)
            caches.append(cache)
        sizes = np.array([c.x.shape[0] for c in caches], dtype=np.float64)[:, None]
        means = np.stack([c.mean for c in caches]).astype(np.float64)
        unbiased = np.stack([c.var * (k * per_example / (k * per_example - 1))
                             for c, k in zip(caches, sizes[:, 0])]).astype(np.float64)
        steps = self.num_batches_tracked + 1
        m = 1.0 / steps if self.momentum is None else self.momentum
        self.running_mean[...] = (1 - m) * self.running_mean + m * (sizes * means).sum(0) / sizes.sum()
        self.running_var[...] = (1 - m) * self.running_var + m * (sizes * unbiased).sum(0) / sizes.sum()
        self.num_batches_tracked = steps
        self._cache = ("ghost", caches)
        return np.concatenate(ys, axis=0)

    def __call__(self, x):
        return self.forward(x)                         # a subclass's forward is what a call runs

    def backward(self, dy):
        """dx, per virtual batch as BatchNorm's; grad_weight and grad_bias summed over them."""
        if self._cache is None or self._cache[0] != "ghost":
            return super().backward(dy)
        caches = self._cache[1]
        n = sum(c.x.shape[0] for c in caches)
        full_shape = (n,) + caches[0].x.shape[1:]
        _check_dy(dy, full_shape, caches[0].x.dtype)
        dxs, grad_w, grad_b, start = [], 0, 0, 0
        for cache in caches:
            dx, dw, db = F.batch_norm_backward(dy[start:start + cache.x.shape[0]], cache)
            dxs.append(dx)
            grad_w, grad_b, start = grad_w + dw, grad_b + db, start + cache.x.shape[0]
        self.grad_weight[...] = grad_w
        if self.grad_bias is not None:
            self.grad_bias[...] = grad_b
        return np.concatenate(dxs, axis=0)

    def __repr__(self):
        return (f"GhostBatchNorm({self.num_features}, virtual_batch_size={self.virtual_batch_size}, "
                f"eps={self.eps:g}, momentum={self.momentum}{_bias_repr(self.weight, self.bias)})")


class FrozenBatchNorm(BatchNorm):
    """Batch normalization with fixed statistics and affine parameters, as detection libraries use
    it for pretrained backbones trained with small per-GPU batches.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias in every mode: evaluation-mode
    BatchNorm whose train() changes nothing. Nothing is learned: backward(dy) returns dx only
    (grad_weight and grad_bias stay None). load_state_dict() takes a BatchNorm state dict
    (num_batches_tracked, if present, is ignored); state_dict() has weight, bias, running_mean,
    running_var.

    Args: num_features (C), eps (1e-5; use the eps the statistics were trained with), dtype (float32),
    bias (True; False for the state dict of a BatchNorm without a shift; keyword only).
    Shape: input (N, C) or (N, C, *spatial); output the same.
    """

    def __init__(self, num_features, eps=1e-5, dtype=np.float32, *, bias=True):
        super().__init__(num_features, eps=eps, momentum=0.0, affine=True, track_running_stats=True, dtype=dtype,
                         bias=bias)
        self.grad_weight = self.grad_bias = None
        self.num_batches_tracked = None

    def _uses_batch_stats(self):
        return False

    def _state_keys(self):
        return [k for k in super()._state_keys() if k != "num_batches_tracked"]   # BatchNorm's keys but the count

    def load_state_dict(self, state, strict: bool = True):
        if hasattr(state, "keys") and "num_batches_tracked" in state:
            state = {k: v for k, v in state.items() if k != "num_batches_tracked"}
        return super().load_state_dict(state, strict)

    def backward(self, dy):
        """dx = dy * weight / sqrt(running_var + eps), per channel."""
        if self._cache is None:
            raise ValueError("backward() needs a forward() first: no cached input")
        dx, _, _ = self._inference_backward(dy, self._cache[1])
        return dx

    def __repr__(self):
        return f"FrozenBatchNorm({self.num_features}, eps={self.eps:g}{_bias_repr(self.weight, self.bias)})"
