# GENERATED FILE: do not edit.
# bnlib.nn is generated from chapters/06_pytorch.ipynb, chapters/08_variants.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['BatchNormFunction', 'BatchNormInferenceFunction', 'BatchNorm1d', 'BatchNorm2d', 'BatchNorm3d', 'convert_batchnorm', 'fold_batch_norm', 'SyncBatchNormFunction', 'SyncBatchNorm', 'FrozenBatchNorm2d']

import contextlib
import copy
import numbers

import numpy as np
import torch

from bnlib import functional as F
from bnlib.stats import Moments, merge_moments, moments


def _as_array(t):
    """A tensor's data as an array without copying: a NumPy view on the CPU, a CuPy view
    (DLPack) on CUDA. The array keeps the tensor's memory alive."""
    t = t.detach()
    if t.is_cuda:
        import cupy
        return cupy.from_dlpack(t)
    return t.numpy()


def _as_tensor(a):
    """The inverse of _as_array: wrap a NumPy or CuPy array as a tensor without copying."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


@contextlib.contextmanager
def _on_tensor_stream(t):
    """Run CuPy work on the CUDA device and current stream of tensor t, so that it is ordered with
    PyTorch's kernels on that stream; a no-op for CPU tensors."""
    if not t.is_cuda:
        yield
        return
    import cupy

    from bnlib import cuda
    with cupy.cuda.Device(t.device.index), cuda.cupy_stream(torch.cuda.current_stream(t.device)):
        yield


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm as an autograd Function around bnlib.functional.

    forward(x, weight, bias, eps, stats) -> y; `stats` (a dict or None) receives the batch mean,
    biased variance and count, for the running-statistics update done by the module.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, stats=None):
        ctx.save_for_backward(x, weight)        # lets autograd detect in-place changes before backward
        arrays = [None if t is None else _as_array(t) for t in (x, weight, bias)]
        with _on_tensor_stream(x):
            y, cache = F.batch_norm_forward(*arrays, eps=eps)
        ctx.cache = cache
        ctx.param_grads = (weight is not None, bias is not None)
        if stats is not None:
            stats.update(cache=cache)
        return _as_tensor(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        ctx.saved_tensors                       # raises if x or weight was modified in place
        with _on_tensor_stream(dy):
            # CuPy kernels take dy in any layout; the CPU path wants NumPy-friendly contiguous memory
            dx, dgamma, dbeta = F.batch_norm_backward(_as_array(dy if dy.is_cuda else dy.contiguous()), ctx.cache)
        need_w, need_b = ctx.param_grads
        return (_as_tensor(dx), _as_tensor(dgamma) if need_w else None,
                _as_tensor(dbeta) if need_b else None, None, None)


class BatchNormInferenceFunction(torch.autograd.Function):
    """Evaluation-mode batch norm (a fixed per-channel affine map) with its gradients."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        xa, rm, rv = _as_array(x), _as_array(running_mean), _as_array(running_var)
        wa = None if weight is None else _as_array(weight)
        ba = None if bias is None else _as_array(bias)
        ctx.save_for_backward(x, running_mean, running_var, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        with _on_tensor_stream(x):
            return _as_tensor(F.batch_norm_inference(xa, rm, rv, wa, ba, eps))

    @staticmethod
    def backward(ctx, dy):
        x, running_mean, running_var, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        axes = [0] + list(range(2, x.dim()))
        inv_std = torch.rsqrt(running_var.to(dy.dtype) + ctx.eps).reshape(shape)
        scale = inv_std if weight is None else inv_std * weight.reshape(shape)
        dx = dy * scale
        dweight = (dy * (x - running_mean.reshape(shape)) * inv_std).sum(axes) if weight is not None else None
        dbias = dy.sum(axes) if ctx.has_bias else None
        return dx, None, None, dweight, dbias, None


class _BatchNorm(torch.nn.Module):
    """Common code of the bnlib drop-ins for torch.nn.BatchNorm1d/2d/3d (same arguments,
    parameters, buffers and state-dict keys); the arithmetic is bnlib.functional's."""

    _version = 2                      # as torch's: state dicts carry num_batches_tracked

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if momentum is not None and not (isinstance(momentum, numbers.Real) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
        if not (isinstance(eps, numbers.Real) and np.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:          # torch >= 2.13: bias=False keeps the scale, drops the shift
            self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _check_input_dim(self, x):
        raise NotImplementedError

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float16, torch.float32, torch.float64):
            raise TypeError(f"{type(self).__name__} supports float16, float32 and float64 input, got {x.dtype}")
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels "
                             f"in dimension 1, got input of shape {tuple(x.shape)}")
        for name in ("weight", "running_mean"):
            t = getattr(self, name)
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"input dtype {x.dtype} does not match the layer's {name} dtype {t.dtype}: "
                                f"convert the module (e.g. .to({x.dtype})) or the input")

    def _batch_statistics(self, x):
        """y with batch statistics; returns (y, cache) and updates running statistics in training."""
        stats = {}
        y = BatchNormFunction.apply(x, self.weight, self.bias, self.eps, stats)
        return y, stats["cache"]

    def _update_running_stats(self, mean, var, count):
        """running = (1 - m) * running + m * batch (unbiased var), m = momentum or 1/num_batches_tracked."""
        with torch.no_grad():
            steps = int(self.num_batches_tracked) + 1
            momentum = 1.0 / steps if self.momentum is None else self.momentum
            unbiased = var * (count / (count - 1)) if count > 1 else var
            self.running_mean.mul_(1 - momentum).add_(torch.as_tensor(mean, dtype=self.running_mean.dtype,
                                                                      device=self.running_mean.device), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(torch.as_tensor(unbiased, dtype=self.running_var.dtype,
                                                                     device=self.running_var.device), alpha=momentum)
            self.num_batches_tracked.add_(1)

    def forward(self, x):
        self._check_input(x)
        if self.training or not self.track_running_stats:
            y, cache = self._batch_statistics(x)
            if self.training and self.track_running_stats:
                count = cache.x.size // self.num_features
                self._update_running_stats(_as_tensor(cache.mean), _as_tensor(cache.var), count)
            return y
        return BatchNormInferenceFunction.apply(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                self.eps)


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2D or 3D input, (N, C) or (N, C, L): torch.nn.BatchNorm1d's drop-in.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, per channel over N (and L).

    Args: num_features (C), eps=1e-5, momentum=0.1 (None: cumulative average), affine=True,
        track_running_stats=True, device=None, dtype=None, and keyword-only bias=True, all as in torch.
    Shape: input (N, C) or (N, C, L); output the same.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4D input (N, C, H, W): torch.nn.BatchNorm2d's drop-in.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, per channel over N, H, W.

    Args: as BatchNorm1d.  Shape: input (N, C, H, W); output the same.
    """

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5D input (N, C, D, H, W): torch.nn.BatchNorm3d's drop-in.

    Args: as BatchNorm1d.  Shape: input (N, C, D, H, W); output the same.
    """

    def _check_input_dim(self, x):
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")


_TORCH_TO_BNLIB = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                   torch.nn.BatchNorm3d: BatchNorm3d}


def _copy_bn(source, cls, **extra):
    """A new `cls` layer with the settings, state, device, dtype and mode of the BN layer `source`."""
    like = source.weight if source.affine else source.running_mean
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    new = cls(source.num_features, eps=source.eps, momentum=source.momentum, affine=source.affine,
              track_running_stats=source.track_running_stats, **factory, **extra,
              bias=getattr(source, "bias", None) is not None)
    new.load_state_dict(source.state_dict())
    for name in ("weight", "bias"):
        if getattr(source, name) is not None:
            getattr(new, name).requires_grad_(getattr(source, name).requires_grad)
    return new.train(source.training)


def convert_batchnorm(module):
    """Replace every torch.nn.BatchNorm1d/2d/3d inside `module` with bnlib's, state preserved.

    Returns the converted module (the same object, changed in place, unless `module` itself is a
    torch BatchNorm layer, in which case the new layer is returned).
    """
    cls = _TORCH_TO_BNLIB.get(type(module))
    if cls is not None:
        return _copy_bn(module, cls)
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child))
    return module


_FOLDABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def fold_batch_norm(module, bn):
    """Fold an inference-mode batch norm into the Linear or ConvNd layer that feeds it.

    With s = weight_bn / sqrt(running_var + eps) per output channel, module followed by bn equals
    one module with weight W * s (per output channel) and bias (b - running_mean) * s + bias_bn.
    Returns a new module (the inputs are not changed); grouped convolutions are fine, since each
    output channel has its own filter.
    """
    if not isinstance(module, _FOLDABLE):
        raise TypeError(f"fold_batch_norm folds into Linear or Conv1d/2d/3d, got {type(module).__name__}")
    if not isinstance(bn, (torch.nn.modules.batchnorm._BatchNorm, _BatchNorm)):
        raise TypeError(f"bn must be a torch or bnlib BatchNorm1d/2d/3d, got {type(bn).__name__}")
    if bn.running_mean is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): in inference it uses "
                         "batch statistics, which cannot be folded into fixed weights")
    out_features = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
    if bn.num_features != out_features:
        raise ValueError(f"bn has {bn.num_features} channels but {type(module).__name__} produces {out_features}")
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        fused = copy.deepcopy(module).eval()
        w = fused.weight
        w.copy_((w.double() * scale.reshape((-1,) + (1,) * (w.dim() - 1))).to(w.dtype))
        bias = shift if module.bias is None else module.bias.double() * scale + shift
        if fused.bias is None:
            fused.bias = torch.nn.Parameter(torch.empty(out_features, dtype=w.dtype, device=w.device))
        fused.bias.copy_(bias.to(w.dtype))
    return fused


import torch.distributed as dist

from bnlib.stats import channel_shape, reduction_axes


def _gather_moments(local: Moments, group) -> Moments:
    """Every process's (count, mean, M2), all-gathered and merged with Chan's formula (chapter 02)."""
    c = local.mean.shape[0]
    packed = torch.from_numpy(np.concatenate([[float(local.count)], local.mean, local.m2]))
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    total = Moments(0, None, None)
    for part in (p.numpy() for p in parts):
        total = merge_moments(total, Moments(int(part[0]), part[1:1 + c], part[1 + c:]))
    return total


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm whose statistics span all processes of a torch.distributed group (CPU tensors).

    forward: this process's per-channel (count, mean, M2) in float64 are all-gathered and merged
    with Chan's formula; y = (x - mean) / sqrt(var + eps) * weight + bias is computed locally.
    backward: the per-channel sums (sum dy, sum dy * x_hat) are all-reduced, so dx is exactly this
    process's slice of the single-process gradient on the concatenated batch. dweight and dbias
    are this process's own sums, as in torch.nn.SyncBatchNorm (DistributedDataParallel then
    averages parameter gradients across processes).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, stats):
        xa = _as_array(x)
        total = _gather_moments(moments(xa.astype(np.float64)), group)
        if total.count < 2:
            raise ValueError(f"SyncBatchNorm in training needs more than 1 value per channel over all "
                             f"processes, got {total.count}")
        shape = channel_shape(xa.ndim, xa.shape[1])
        inv_std = 1.0 / np.sqrt(total.var + eps)
        scale = inv_std if weight is None else inv_std * _as_array(weight).astype(np.float64)
        y = (xa - total.mean.reshape(shape)) * scale.reshape(shape)
        if bias is not None:
            y += _as_array(bias).astype(np.float64).reshape(shape)
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.inv_std, ctx.count, ctx.group = total.mean, inv_std, total.count, group
        ctx.has_bias = bias is not None
        stats.update(mean=total.mean, var=total.var, count=total.count)
        return torch.from_numpy(y.astype(xa.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        xa, dya = _as_array(x), _as_array(dy).astype(np.float64)
        shape, axes, c = channel_shape(xa.ndim, xa.shape[1]), reduction_axes(xa.ndim), xa.shape[1]
        x_hat = (xa - ctx.mean.reshape(shape)) * ctx.inv_std.reshape(shape)
        local = np.concatenate([dya.sum(axis=axes), (dya * x_hat).sum(axis=axes)])   # (2C,)
        total = torch.from_numpy(local.copy())
        dist.all_reduce(total, group=ctx.group)                                      # sums over processes
        sum_dy, sum_dy_xhat = total.numpy()[:c], total.numpy()[c:]
        scale = ctx.inv_std if weight is None else ctx.inv_std * _as_array(weight).astype(np.float64)
        dx = scale.reshape(shape) * (dya - (sum_dy / ctx.count).reshape(shape)
                                     - x_hat * (sum_dy_xhat / ctx.count).reshape(shape))
        dweight = None if weight is None else torch.from_numpy(local[c:].astype(_as_array(weight).dtype))
        dbias = torch.from_numpy(local[:c].astype(xa.dtype)) if ctx.has_bias else None
        return torch.from_numpy(dx.astype(xa.dtype)), dweight, dbias, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over all processes of a torch.distributed group:
    torch.nn.SyncBatchNorm's drop-in for CPU tensors (gloo backend).

    Args: as BatchNorm1d, plus process_group (default: the whole world).
    Shape: input (N, C, *spatial); output the same. Processes may hold different batch sizes.
    Without an initialized process group (or with a group of one process) it is plain batch
    norm, as torch.nn.SyncBatchNorm is.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        self._check_input(x)
        # as torch: statistics are synchronized in training only (an evaluating process must
        # not wait for the others); evaluation without running statistics uses the local batch
        synced = self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.process_group) > 1
        if not synced:
            return super().forward(x)
        if x.is_cuda:
            raise TypeError("bnlib's SyncBatchNorm reduces through NumPy on CPU tensors (gloo); "
                            "for CUDA tensors use torch.nn.SyncBatchNorm with NCCL")
        stats = {}
        group = self.process_group or dist.group.WORLD
        y = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group, stats)
        if self.training and self.track_running_stats:
            self._update_running_stats(torch.from_numpy(stats["mean"]), torch.from_numpy(stats["var"]), stats["count"])
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every BatchNorm1d/2d/3d (torch's or bnlib's) in `module` with SyncBatchNorm, state kept."""
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                               BatchNorm1d, BatchNorm2d, BatchNorm3d)):
            return _copy_bn(module, cls, process_group=process_group)
        for name, child in module.named_children():
            setattr(module, name, cls.convert_sync_batchnorm(child, process_group))
        return module


class FrozenBatchNorm2d(torch.nn.Module):
    r"""BatchNorm2d with fixed statistics and affine parameters: the layer detection libraries
    (torchvision.ops.FrozenBatchNorm2d, detectron2) put in pretrained backbones.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias in train and eval mode alike.
    weight, bias, running_mean and running_var are buffers, not parameters: nothing is learned and
    nothing is updated. load_state_dict() takes a torch.nn.BatchNorm2d (or bnlib.nn.BatchNorm2d)
    state dict unchanged: its num_batches_tracked entry is dropped.

    Args: num_features (C), eps=1e-5 (use the eps the statistics were trained with), device, dtype.
    Shape: input (N, C, H, W); output the same. Gradients flow to the input only.
    """

    def __init__(self, num_features, eps=1e-5, device=None, dtype=None):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if not (isinstance(eps, numbers.Real) and np.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.num_features, self.eps = int(num_features), float(eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batch_norm(cls, bn):
        """A FrozenBatchNorm2d with the eps, statistics and affine parameters of a BatchNorm2d `bn`."""
        if not (bn.affine and bn.track_running_stats):
            raise ValueError("from_batch_norm needs a BatchNorm with affine=True and track_running_stats=True")
        frozen = cls(bn.num_features, eps=bn.eps, device=bn.weight.device, dtype=bn.weight.dtype)
        frozen.load_state_dict(bn.state_dict())
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FrozenBatchNorm2d expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm2d({self.num_features}) expected input of shape "
                             f"(N, {self.num_features}, H, W), got {tuple(x.shape)}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {self.weight.dtype}: "
                            f"convert the module (e.g. .to({x.dtype})) or the input")
        return BatchNormInferenceFunction.apply(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"
