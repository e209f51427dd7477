# GENERATED FILE: do not edit.
# bnlib.layers is generated from chapters/04_numpy.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['BatchNorm']

import numpy as np

from bnlib import functional as F
from bnlib.stats import channel_shape, reduction_axes


def _to_numpy(value):
    """A state-dict value as a NumPy array: NumPy arrays, numbers, and torch tensors (via .numpy()).
    A floating-point tensor with no NumPy dtype (bfloat16, the float8 types) comes as float32,
    which holds each of its values exactly."""
    if hasattr(value, "detach"):                       # a torch.Tensor from a torch checkpoint
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4 and str(value.dtype) != "torch.float16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _state_copies(layer, shapes):
    """state_dict() of a NumPy layer: copies of the attributes named in `shapes` (torch's key names;
    shape None marks a non-negative integer scalar such as num_batches_tracked, given as int64)."""
    return {key: np.array(getattr(layer, key), dtype=np.int64) if shape is None else getattr(layer, key).copy()
            for key, shape in shapes.items()}


def _load_state(layer, state, shapes, dtype, strict=True):
    """load_state_dict() of a NumPy layer. `shapes`: key -> expected shape, or None for a non-negative
    integer scalar. Every key, shape and dtype is checked before anything is assigned, so a load that
    raises changes nothing; strict=False ignores missing and unexpected keys (shapes still checked), and a
    missing num_batches_tracked is allowed either way (the layer keeps its count).
    Values may be NumPy arrays, numbers or torch tensors; arrays are stored in `dtype`."""
    if not hasattr(state, "keys"):
        raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    # as torch: a state dict without num_batches_tracked (saved before torch had it) loads; the layer keeps its count
    missing = [k for k in shapes if k not in state and k != "num_batches_tracked"]
    unexpected = [k for k in state if k not in shapes]
    if strict and (missing or unexpected):
        raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected} "
                         f"(expected exactly {list(shapes)})")
    staged = {}
    for key, shape in shapes.items():
        if key not in state:
            continue
        try:
            value = _to_numpy(state[key])
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:   # e.g. a meta tensor
            raise TypeError(f"{key} cannot be read as a NumPy array ({type(state[key]).__name__}): {err}") from None
        if shape is None:
            # int64 as the state dict gives it (and as torch stores it): a uint64 beyond its range is refused
            if value.shape != () or value.dtype.kind not in "iu" or not 0 <= value <= np.iinfo(np.int64).max:
                shown = f"{value.item()!r} of " if value.size == 1 else ""
                raise ValueError(f"{key} must be a non-negative integer scalar within int64, got {shown}shape "
                                 f"{value.shape}, dtype {value.dtype}")
            staged[key] = int(value)
        elif value.shape != shape:
            raise ValueError(f"{key} must have shape {shape}, got {value.shape}")
        elif value.dtype.kind != "f":
            raise TypeError(f"{key} must be floating point, got {value.dtype}")
        elif key == "running_var" and np.any(value < 0):     # no batch gives one (NaN, from a diverged run, loads)
            raise ValueError(f"running_var must not be negative, got {int(np.sum(value < 0))} negative "
                             f"value(s), the first {float(value[value < 0][0])!r} in channel {int(np.argmax(value < 0))}")
        else:
            staged[key] = value.astype(dtype)
    for key, value in staged.items():
        if shapes[key] is None:
            setattr(layer, key, value)
        else:
            getattr(layer, key)[...] = value
    return layer


def _check_flag(value, name):
    """A True/False argument (a NumPy bool too) as a Python bool; anything else is refused, since
    'no', 1 or None would otherwise be read as True or False without a word."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_param_dtype(dtype):
    """The dtype of a layer's parameters and buffers: NumPy's float32 or float64 (None: float32, as torch's
    dtype=None), else a TypeError naming dtype (a torch dtype such as torch.float32 included)."""
    if dtype is None:
        dtype = np.float32
    try:
        name = np.dtype(dtype).name
    except TypeError:                                 # e.g. torch.float32
        name = None
    if name not in ("float32", "float64"):
        raise TypeError(f"dtype must be NumPy's float32 or float64, got {dtype!r}")
    return np.dtype(dtype)


def _bias_repr(weight, bias):
    """', bias=False' for a layer with a weight but no bias (torch's bias=False), else '': the end of its repr."""
    return ", bias=False" if weight is not None and bias is None else ""


class BatchNorm:
    """Batch normalization layer for NumPy arrays, with PyTorch's conventions.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, statistics per channel (axis 1) over
    every other axis: batch statistics in training, running statistics in evaluation.

    Args:
        num_features: C, the number of channels of the (N, C, *spatial) input
        eps: added to the variance inside the square root (default 1e-5); 0 only where running
            statistics are used (as torch, batch statistics need eps > 0)
        momentum: running = (1 - momentum) * running + momentum * batch (default 0.1);
            None for a cumulative average over all batches seen
        affine: learn a per-channel scale `weight` and shift `bias` (default True)
        bias: with affine, whether there is a shift `bias` (default True; False: `weight` only, as
            torch.nn.BatchNorm2d(..., bias=False), whose state dicts then load); keyword only
        track_running_stats: keep running_mean / running_var / num_batches_tracked (default True);
            if False, batch statistics are used in evaluation too
        dtype: dtype of parameters and running statistics (default float32, as in torch; None too)

    Shape: input (N, C) or (N, C, *spatial); output the same. Gradients of the last backward()
    are in grad_weight and grad_bias. A call that raises changes no state. An empty batch (size 0)
    gives an empty output and changes no state, in training too (torch also leaves the running
    statistics alone, though it counts the batch in num_batches_tracked); its backward gives an
    empty dx and zero parameter gradients. Training on one value per channel raises ValueError.
    In evaluation, as in torch, a NaN running statistic (training diverged) gives NaN, an infinite running
    variance gives the bias, and an infinite running mean gives an infinite output.
    State dicts may hold NumPy arrays or torch tensors, bfloat16 ones included (read exactly as float32).
    backward() reads the forward's input itself, not a copy (functional's cache keeps x, to save a
    pass): change x in place between forward and backward and the gradients are silently wrong.
    torch detects that with tensor version counters; NumPy arrays have none.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=np.float32, *, bias=True):
        num_features = F._check_positive_int(num_features, "num_features")   # not a bool either
        F._check_eps(eps)                                 # a finite number >= 0, not a bool (0: with running statistics only)
        affine, bias = _check_flag(affine, "affine"), _check_flag(bias, "bias")
        track_running_stats = _check_flag(track_running_stats, "track_running_stats")
        F._check_momentum(momentum)                       # in [0, 1] or None, not a bool
        dtype = _check_param_dtype(dtype)
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.dtype = dtype
        c = self.num_features
        self.weight = np.ones(c, self.dtype) if affine else None
        self.bias = np.zeros(c, self.dtype) if affine and bias else None
        self.grad_weight = np.zeros(c, self.dtype) if affine else None
        self.grad_bias = np.zeros(c, self.dtype) if affine and bias else None
        if track_running_stats:
            self.running_mean = np.zeros(c, self.dtype)
            self.running_var = np.ones(c, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self._cache = None

    # ---------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        if not isinstance(mode, (bool, np.bool_)):        # as torch: "mode" would otherwise be truthy or not
            raise ValueError(f"training mode is expected to be boolean (True or False), got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _check_channels(self, x):
        if not (hasattr(x, "ndim") and hasattr(x, "shape")):
            raise TypeError(f"expected a NumPy array of shape (N, {self.num_features}) or "
                            f"(N, {self.num_features}, *spatial), got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"expected input of shape (N, {self.num_features}) or (N, {self.num_features}, *spatial), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (num_features) in axis 1, "
                             f"got input of shape {tuple(x.shape)} with {x.shape[1]}")
        if self._uses_batch_stats() and not self.eps > 0:     # as torch: a constant channel would give 0 / 0
            raise ValueError(f"eps must be > 0 when batch statistics are used (training, or "
                             f"track_running_stats=False), got {self.eps:g}: a constant channel would give NaN")

    # ---------------------------------------------------------------- forward / backward
    def forward(self, x):
        """Normalize x; in training mode also update the running statistics."""
        self._check_channels(x)
        if x.size == 0:                                  # an empty batch: nothing to normalize or learn from
            F._check_input(x)                            # (but the same type errors as any batch)
            self._cache = ("empty", x)
            return x.copy()
        if not self._uses_batch_stats():
            y = F.batch_norm_inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
            self._cache = ("eval", x)
            return y
        y, cache = F.batch_norm_forward(x, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            steps = self.num_batches_tracked + 1
            mean, var = F.update_running_stats(self.running_mean, self.running_var, cache,
                                               self.momentum, num_batches_tracked=steps)
            self.running_mean[...], self.running_var[...] = mean, var     # commit only after everything worked
            self.num_batches_tracked = steps
        self._cache = ("train", cache)
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient with respect to the last forward's input; stores grad_weight and grad_bias."""
        if self._cache is None:
            raise ValueError("backward() needs a forward() first: no cached input")
        kind, saved = self._cache
        if kind == "empty":
            F._check_dy(dy, saved.shape, saved.dtype)
            for grad in (self.grad_weight, self.grad_bias):
                if grad is not None:
                    grad[...] = 0
            return dy.copy()
        if kind == "train":
            dx, dgamma, dbeta = F.batch_norm_backward(dy, saved)
        else:
            dx, dgamma, dbeta = self._inference_backward(dy, saved)
        if self.grad_weight is not None:
            self.grad_weight[...] = dgamma
        if self.grad_bias is not None:
            self.grad_bias[...] = dbeta
        return dx

    def _inference_backward(self, dy, x):
        """Gradients of the fixed affine map of evaluation mode (chapter 03, exercise 1)."""
        F._check_dy(dy, x.shape, x.dtype)
        shape, axes = channel_shape(x.ndim, self.num_features), reduction_axes(x.ndim)
        inv_std = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        x_hat = (x - self.running_mean.reshape(shape)) * inv_std.reshape(shape)
        scale = inv_std if self.weight is None else inv_std * self.weight
        dx = (dy * scale.reshape(shape)).astype(x.dtype, copy=False)
        return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes, dtype=np.float64)

    # ---------------------------------------------------------------- state
    def _state_keys(self):
        keys = [k for k in ("weight", "bias") if getattr(self, k) is not None]
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def _state_shapes(self):
        return {key: None if key == "num_batches_tracked" else (self.num_features,) for key in self._state_keys()}

    def state_dict(self):
        """Copies of the parameters and buffers, under torch.nn.BatchNorm*d's key names."""
        return _state_copies(self, self._state_shapes())

    def load_state_dict(self, state, strict: bool = True):
        """Load a state dict (NumPy arrays or torch tensors, e.g. from torch.nn.BatchNorm2d).

        Every key, shape and dtype is checked before anything is assigned: a load that raises
        changes nothing. strict=False ignores missing and unexpected keys (shapes still checked). A state
        dict without num_batches_tracked loads either way, the layer keeping its count, as torch loads one
        without its version record (torch refuses a current state_dict() with the key deleted).
        """
        return _load_state(self, state, self._state_shapes(), self.dtype, strict)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps:g}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}"
                f"{_bias_repr(self.weight, self.bias)})")
