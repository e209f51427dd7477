# GENERATED FILE: do not edit.
# bnlib.nn is generated from chapters/06_pytorch.ipynb, chapters/08_variants.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['BatchNormFunction', 'BatchNormInferenceFunction', 'BatchNorm1d', 'BatchNorm2d', 'BatchNorm3d', 'BATCHNORM_TYPES', 'convert_batchnorm', 'fold_batch_norm', 'SyncBatchNormFunction', 'SyncBatchNorm', 'sync_batchnorm_check', 'precise_bn', 'FrozenBatchNorm2d']

import contextlib
import copy
import functools
import inspect

import numpy as np
import torch

from bnlib import cuda
from bnlib import functional as F
from bnlib.stats import Moments, channel_shape, merge_moments, reduction_axes

_HALF = (torch.float16, torch.bfloat16)

# torch.compile cannot follow numba's compiled kernels or CuPy (it breaks its graph around them), and the layers'
# fast path to these autograd Functions, _apply, stops it with an error (torch 2.13). So every layer's forward
# is passed through torch.compiler.disable and called from a small wrapper,
# _outside_torch_graphs: Dynamo traces the wrapper, never the disabled forward, and where it meets the
# call it ends the graph (a graph break), runs the layer eagerly and starts a new graph after it. Outside
# a compilation the wrapper costs one more Python call and the switch of Dynamo's hook (not timed on its own here).
# torch.export cannot leave anything out, so the wrapper refuses it by name.


def _is_exporting():
    """True while torch.export traces (strict or not). It reads the flag torch.export sets: Dynamo in
    torch 2.11 answers torch.compiler.is_exporting() with True under torch.compile as well, and a layer
    that then raised its export error while Dynamo traced broke the compiled run (on an H200, the CUDA
    compile test failed with an AttributeError; torch 2.13 reads this flag itself)."""
    return getattr(torch.compiler, "_is_exporting_flag", False)


def _outside_torch_graphs(forward):
    """A layer's forward(self, x), run eagerly and outside any graph torch.compile builds (a graph
    break at the layer); under torch.export, a TypeError that names the layer."""
    eager = torch.compiler.disable(forward)

    @functools.wraps(forward)
    def wrapped(self, x):
        if _is_exporting():
            raise TypeError(f"{type(self).__name__} cannot be exported with torch.export: its arithmetic is NumPy "
                            "or CuPy code outside torch; export a model with torch's batch-norm layers instead")
        return eager(self, x)
    return wrapped


def _refuse_scripting(self):
    """Every layer's __prepare_scriptable__: torch.jit.script calls it on each module of a model before it
    compiles anything, so scripting a model that holds a bnlib layer stops with a message that names it
    (TorchScript would otherwise fail deep inside the forward's wrapper)."""
    raise TypeError(f"{type(self).__name__} cannot be compiled by torch.jit.script: its arithmetic is NumPy or "
                    "CuPy code outside torch; script a model with torch's batch-norm layers instead")


def _as_array(t):
    """A tensor's data as an array without copying: a NumPy view on the CPU, a CuPy view
    (DLPack) on CUDA. The array keeps the tensor's memory alive. A tensor with its negative bit set
    (torch's lazy view of -t, which neither NumPy nor DLPack can read) is resolved first: a copy."""
    t = t.detach().resolve_neg()
    if t.is_cuda:
        import cupy
        return cupy.from_dlpack(t)
    return t.numpy()


def _as_tensor(a):
    """The inverse of _as_array: wrap a NumPy or CuPy array as a tensor without copying."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


def _compute_dtype(x):
    """The dtype bnlib computes in for input x: float32 for float16/bfloat16, x's dtype otherwise."""
    return torch.float32 if x.dtype in _HALF else x.dtype


def _for_arrays(t, dtype):
    """Tensor t (or None) as bnlib's array code takes it. NumPy has no bfloat16 and bnlib's CuPy route
    takes none (CuPy's, minimal in v14, is refused), so bfloat16 (and, on the CPU, float16) tensors are
    converted to `dtype` here, at the torch boundary (a copy); CuPy's kernels read float16 directly.
    Other tensors are not copied."""
    if t is None:
        return None
    keep = t.dtype == dtype or (t.is_cuda and t.dtype == torch.float16)
    return _as_array(t if keep else t.to(dtype))


def _in_format_of(t, x):
    """t in the memory format torch's layers give for input x (chapter 05's suggested_memory_format):
    channels-last for channels-last x, dense or sliced, C-contiguous for any other layout (NumPy keeps
    a permuted input's strides in its results, and a permuted output would break a later .view(),
    which torch's contiguous output allows). A no-op when t already has that layout."""
    return t.contiguous(memory_format=cuda.suggested_memory_format(x))


def _torch_kernels(x):
    """True when x is a CUDA tensor and bnlib.cuda has the torch-level kernels (chapter 05)."""
    return x.is_cuda and hasattr(cuda, "forward_torch")


_NO_STREAM = contextlib.nullcontext()


def _on_tensor_stream(t):
    """A context manager that runs CuPy work on the CUDA device and current stream of tensor t, so that
    it is ordered with PyTorch's kernels on that stream; for CPU tensors a shared null context (the
    layers enter this on every call: no generator is built for the CPU path)."""
    return _cuda_stream_of(t) if t.is_cuda else _NO_STREAM


@contextlib.contextmanager
def _cuda_stream_of(t):
    import cupy
    with cupy.cuda.Device(t.device.index), cuda.cupy_stream(torch.cuda.current_stream(t.device)):
        yield


def _signature_once(function):
    """Class decorator for the Functions below. For a Function with setup_context (the form torch.func
    needs), torch's Function.apply binds the arguments to forward's signature on every call, and
    inspect.signature builds that signature anew each time unless the function carries it in
    __signature__. Stored once here, for the calls that still bind: under torch.func's transforms and
    from users' own Function.apply (the layers skip the binding otherwise, _apply below)."""
    function.forward.__signature__ = inspect.signature(function.forward)
    return function


# What Function.apply does after binding, outside torch.func's transforms (torch >= 2.0): unwrap
# functorch wrappers whose transform has ended, then call the C++ apply of torch._C._FunctionBase.
try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead
except ImportError:                             # a torch without them: _apply is Function.apply
    _unwrap_dead = None
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _apply(function, *args):
    """function.apply(*args) for the layers' own calls, which give every argument of forward
    positionally. Function.apply binds them to forward's signature on every call (inspect's bind,
    for keyword arguments and defaults, which these calls never leave to it): a few microseconds of
    each step's host time. Outside torch.func's transforms this skips the binding and does the rest
    of what Function.apply does; under a transform, or on a torch without those internals, it is
    Function.apply."""
    if _unwrap_dead is None or _transforms_active is None or _transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*_unwrap_dead(args))


def _needs_autograd(*tensors):
    """False when a layer's call can skip its autograd Function and call the Function's forward directly:
    no tensor of `tensors` (None allowed) requires grad while grad is enabled (evaluation under torch.no_grad
    or torch.inference_mode, a frozen layer on a frozen input), no torch.func transform is active (its
    wrapped tensors need the Function's vmap and jvp rules) and no forward-mode AD level is open
    (torch.autograd.forward_ad: tangents travel whether or not grad is enabled). The Function would record
    nothing in that case, but its apply has a fixed cost per call of its own (not timed on its own here; the
    per-call cost table below times whole evaluation calls). One visible difference: torch.profiler then shows no event named after the Function.
    A torch without these internals takes the Function."""
    level = getattr(torch.autograd.forward_ad, "_current_level", 0)        # -1 outside any dual level
    if _transforms_active is None or _transforms_active() or level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fusable_running(running, dtype):
    """`running` = (running_mean, running_var, momentum, num_batches_tracked) if forward_torch can
    update them in its own launches (buffers present, contiguous, of the compute dtype), else None."""
    mean, var, momentum, count = running
    if mean is None or var is None or count is None or not all(t.dtype == dtype and t.is_contiguous()
                                                               for t in (mean, var)):
        return None
    return running


_VMAP_RUNNING_STATS = ("under torch.func.vmap, batched statistics cannot go into unbatched running buffers: use evaluation "
                       "mode, or track_running_stats=False with running_mean and running_var set to None, as for "
                       "torch's batch norm")


def _vmap_by_slices(function, info, in_dims, *args):
    """A vmap rule for the Functions below: bnlib's arithmetic is NumPy or CuPy, which torch.func.vmap
    cannot look into, so run `function` once per index of the mapped dimension and stack the results."""
    results = [function.apply(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
               for i in range(info.batch_size)]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
    return torch.stack(results), 0


@_signature_once
class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm as an autograd Function around bnlib.functional.

    apply(x, weight, bias, eps, running=None) -> (y, mean, var, inv_std): y in x's dtype, and the
    batch statistics per channel, (C,) in the compute dtype (float32 for float16/bfloat16 x, else
    x's): mean, biased variance and 1/sqrt(var + eps), for the running-statistics update; they are
    not differentiable. x may be float16/bfloat16 with float32 (or same-dtype) weight and bias.
    `running`, for CUDA tensors that chapter 05's torch-level kernels take: (running_mean,
    running_var, momentum, num_batches_tracked), updated in place in the same launches; the module
    passes it only when _fusable_running allows (buffers contiguous, of the compute dtype).

    Twice differentiable, as torch's batch norm: a backward run with create_graph=True (gradient
    penalties, MAML) computes the gradients with torch operations that autograd records
    (_backward_with_graph) instead of bnlib's kernels, so that they can be differentiated again.
    Written in the form torch.func needs (forward without ctx, setup_context): torch.func.grad, vjp
    and jacrev go through that same differentiable backward, and vmap runs the Function once per slice.
    """

    @staticmethod
    def forward(x, weight, bias, eps, running=None):
        acc = _compute_dtype(x)
        if x.is_meta:                           # shapes only (deferred initialization, shape inference)
            return torch.empty_like(x), *(x.new_empty(x.shape[1], dtype=acc) for _ in range(3))
        if _torch_kernels(x):                   # chapter 05's kernels, torch tensors in and out (they take the
            return cuda.forward_torch(x, weight, bias, eps, *(running or ()))   # parameters in any float dtype)
        if running is not None:
            raise ValueError("running statistics are updated inside the forward only by bnlib.cuda's kernels "
                             "on CUDA tensors; pass running=None and update them from the returned mean and var")
        with _on_tensor_stream(x):
            ya, cache = F.batch_norm_forward(_for_arrays(x, acc), _for_arrays(weight, acc),
                                             _for_arrays(bias, acc), eps=eps)
        return (_in_format_of(_as_tensor(ya).to(x.dtype), x),
                *(_as_tensor(a) for a in (cache.mean, cache.var, cache.inv_std)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs[:4]
        _, mean, var, inv_std = output
        ctx.mark_non_differentiable(mean, var, inv_std)
        ctx.save_for_backward(x, weight, mean, var, inv_std)   # autograd detects in-place changes to x, weight
        ctx.save_for_forward(x, weight, mean, inv_std)
        ctx.acc, ctx.eps = _compute_dtype(x), eps
        ctx.param_grads = (weight is not None, bias is not None)
        ctx.param_dtype = ctx.acc if weight is None else weight.dtype
        # the statistics never get a gradient; autograd would otherwise hand backward a zero tensor for
        # each of them (on CUDA: three allocations and three fill kernels per step)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, *_):                  # the statistics' gradients are always None
        if dy is None:                          # not materialized: y received no gradient either
            return None, None, None, None, None
        x, weight, mean, var, inv_std = ctx.saved_tensors
        acc, kernels = ctx.acc, False
        if torch.is_grad_enabled():             # create_graph=True, or torch.func: differentiable gradients
            dx, dgamma, dbeta = _backward_with_graph(dy, x, weight, ctx.eps, acc)
        elif _torch_kernels(x):                 # dx comes back in x's dtype and memory format
            kernels = True
            dx, dgamma, dbeta = cuda.backward_torch(dy, x, mean, inv_std, weight)
        else:
            # the forward's cache, rebuilt from the saved tensors without copying (a float16/bfloat16 x on
            # the CPU is converted again); the CuPy and CPU paths both take dy in any layout (CuPy copies it into
            # x's strides when they differ; the CPU path reads it in x's memory order: no copy when a
            # float32/float64 dy is laid out as x, one otherwise)
            cache = F.BNCache(_for_arrays(x, acc), *(_as_array(t) for t in (mean, var, inv_std)),
                              _for_arrays(weight, acc), ctx.eps)
            dya = _for_arrays(dy, acc)
            with _on_tensor_stream(dy):
                dx, dgamma, dbeta = (_as_tensor(a) for a in F.batch_norm_backward(dya, cache))
        need_w, need_b = ctx.param_grads
        if not kernels:                         # (bnlib.cuda's dx already has x's dtype and layout)
            dx = _in_format_of(dx.to(x.dtype), x)
        return (dx, dgamma.to(ctx.param_dtype) if need_w else None,
                dbeta.to(ctx.param_dtype) if need_b else None, None, None)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        """Forward mode (torch.func.jvp, jacfwd): the tangent of y, in torch operations. The Jacobian
        of y with respect to x is symmetric within each channel, so x_t maps to y's tangent by the
        backward's dx formula (chapter 03) with x_t in place of dy; weight_t * x_hat + bias_t is added."""
        x, weight, mean, inv_std = ctx.saved_tensors
        axes, shape = reduction_axes(x.dim()), channel_shape(x.dim(), x.shape[1])
        x_hat = (x.to(ctx.acc) - mean.reshape(shape)) * inv_std.reshape(shape)
        y_t = torch.zeros_like(x_hat)
        if x_t is not None:
            g = x_t.to(ctx.acc)
            scale = inv_std if weight is None else inv_std * weight.to(ctx.acc)
            y_t = _dx_from_means(g, x_hat, scale.reshape(shape), g.mean(axes), (g * x_hat).mean(axes), shape)
        if weight_t is not None:
            y_t = y_t + weight_t.to(ctx.acc).reshape(shape) * x_hat
        if bias_t is not None:
            y_t = y_t + bias_t.to(ctx.acc).reshape(shape)
        return y_t.to(x.dtype), None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        if len(args) > 4 and args[4] is not None:   # the CUDA kernels would update the buffers once per slice
            raise RuntimeError(_VMAP_RUNNING_STATS)
        return _vmap_by_slices(BatchNormFunction, info, in_dims, *args)


def _backward_with_graph(dy, x, weight, eps, acc):
    """Training-mode (dx, dweight, dbias) in torch operations, in dtype `acc`: the compact formula of
    chapter 03, with the batch statistics recomputed from x, so that autograd records how the
    gradients depend on x, weight and dy (double backward). Used only when the graph is wanted."""
    axes, shape = reduction_axes(x.dim()), channel_shape(x.dim(), x.shape[1])
    xc, g = x.to(acc), dy.to(acc)
    mean = xc.mean(axes, keepdim=True)
    inv_std = torch.rsqrt(xc.var(axes, correction=0, keepdim=True) + eps)
    x_hat = (xc - mean) * inv_std
    dbias, dweight = g.sum(axes), (g * x_hat).sum(axes)
    scale = inv_std if weight is None else inv_std * weight.to(acc).reshape(shape)
    n = x.numel() // x.shape[1]
    return _dx_from_means(g, x_hat, scale, dbias / n, dweight / n, shape), dweight, dbias


def _dx_from_means(g, x_hat, scale, mean_g, mean_g_xhat, shape):
    """dx = scale * (g - mean(g) - x_hat * mean(g * x_hat)) (chapter 03), the per-channel means given."""
    return scale * (g - mean_g.reshape(shape) - x_hat * mean_g_xhat.reshape(shape))


def _constant_statistics(running_mean, running_var):
    """As torch, at the forward: the running statistics a batch norm reads (evaluation) or updates (training)
    cannot require grad while grad is enabled (torch.nn.functional.batch_norm raises; under no_grad both
    compute). Checked before anything changes (torch has already counted the batch when it raises)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if torch.is_grad_enabled() and t is not None and t.requires_grad:
            raise RuntimeError(f"batch norm is not differentiable with respect to argument '{name}': this input "
                               "cannot have requires_grad True")


@_signature_once
class BatchNormInferenceFunction(torch.autograd.Function):
    """Evaluation-mode batch norm (a fixed per-channel affine map) with its gradients.

    x may be float16/bfloat16 with float32 statistics and parameters; y has x's dtype. The backward
    is written in torch operations, so it can be differentiated again (create_graph=True).
    """

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps):
        acc = _compute_dtype(x)
        if x.is_meta:
            return torch.empty_like(x)
        if _torch_kernels(x):
            return cuda.inference_torch(x, running_mean, running_var, weight, bias, eps)
        if x.is_cuda:       # torch arithmetic: F.batch_norm_inference checks values on the host (a sync)
            mean, scale, shift = _inference_coefficients(running_mean, running_var, weight, bias, eps, acc, x.dim())
            y = (x.to(acc) - mean) * scale
            return (y if shift is None else y + shift).to(x.dtype)
        arrays = [_for_arrays(t, acc) for t in (x, running_mean, running_var, weight, bias)]
        return _in_format_of(_as_tensor(F.batch_norm_inference(*arrays, eps)).to(x.dtype), x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, weight, bias, eps = inputs
        ctx.save_for_backward(x, running_mean, running_var, weight)
        ctx.save_for_forward(x, running_mean, running_var, weight)
        ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)        # absent tangents and gradients come as None, not zeros (jvp tells them)

    @staticmethod
    def backward(ctx, dy):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:   # as torch: the running statistics are constants
            name = "running_mean" if ctx.needs_input_grad[1] else "running_var"
            raise RuntimeError(f"batch norm is not differentiable with respect to argument '{name}'")
        if dy is None:                          # y received no gradient
            return None, None, None, None, None, None
        x, running_mean, running_var, weight = ctx.saved_tensors
        acc = _compute_dtype(x)
        shape, axes = channel_shape(x.dim(), -1), reduction_axes(x.dim())
        inv_std = torch.rsqrt(running_var.to(acc) + ctx.eps).reshape(shape)
        scale = inv_std if weight is None else inv_std * weight.to(acc).reshape(shape)
        dyc = dy.to(acc)
        dx = (dyc * scale).to(x.dtype)          # in torch's layout, not dy's: on CUDA, C-contiguous as the
        dx = dx.contiguous() if x.is_cuda else _in_format_of(dx, x)   # native backward gives it in evaluation
        dweight = dbias = None
        if weight is not None:
            x_hat = (x.to(acc) - running_mean.to(acc).reshape(shape)) * inv_std
            dweight = (dyc * x_hat).sum(axes).to(weight.dtype)
        if ctx.bias_dtype is not None:
            dbias = dyc.sum(axes).to(ctx.bias_dtype)
        return dx, None, None, dweight, dbias, None

    @staticmethod
    def jvp(ctx, x_t, mean_t, var_t, weight_t, bias_t, _):
        """Forward mode: the tangent of y = (x - mean) * inv_std * weight + bias, inv_std = (var + eps)^(-1/2),
        with respect to x, weight and bias. The running statistics are constants: as in torch, a tangent for them
        together with any other tangent raises, and alone it gives a zero tangent."""
        if (mean_t is not None or var_t is not None) and any(t is not None for t in (x_t, weight_t, bias_t)):
            raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, they cannot have "
                               "forward grad defined")
        x, running_mean, running_var, weight = ctx.saved_tensors
        acc, shape = _compute_dtype(x), channel_shape(x.dim(), -1)
        inv_std = torch.rsqrt(running_var.to(acc) + ctx.eps).reshape(shape)
        w = 1.0 if weight is None else weight.to(acc).reshape(shape)
        centered = x.to(acc) - running_mean.to(acc).reshape(shape)
        y_t = torch.zeros_like(centered)
        if x_t is not None:
            y_t = y_t + x_t.to(acc) * inv_std * w
        if weight_t is not None:
            y_t = y_t + centered * inv_std * weight_t.to(acc).reshape(shape)
        if bias_t is not None:
            y_t = y_t + bias_t.to(acc).reshape(shape)
        return y_t.to(x.dtype)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_slices(BatchNormInferenceFunction, info, in_dims, *args)


def _inference(x, running_mean, running_var, weight, bias, eps):
    """Evaluation-mode batch norm with fixed statistics, as the layers call it: the statistics checked to be
    constants at the forward (_constant_statistics), then BatchNormInferenceFunction, or only its forward when
    nothing needs a gradient (_needs_autograd)."""
    _constant_statistics(running_mean, running_var)
    if not _needs_autograd(x, weight, bias):      # (the statistics cannot require grad here: checked above)
        return BatchNormInferenceFunction.forward(x, running_mean, running_var, weight, bias, eps)
    return _apply(BatchNormInferenceFunction, x, running_mean, running_var, weight, bias, eps)


def _inference_coefficients(running_mean, running_var, weight, bias, eps, dtype, ndim):
    """Per-channel (mean, scale, shift or None), shaped to broadcast over (N, C, *spatial), of
    y = (x - mean) * scale (+ shift): centred first, as chapter 05's kernels and chapter 02's batch_norm_inference
    (folded into one scale and shift, float32 would lose about |mean| * scale times its rounding)."""
    shape = channel_shape(ndim, -1)
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = None if bias is None else bias.to(dtype).reshape(shape)
    return running_mean.to(dtype).reshape(shape), scale.reshape(shape), shift


# torch >= 2.12 has BatchNorm's keyword-only `bias=`; older torch neither takes it nor prints it
_TORCH_BN_HAS_BIAS = "bias" in inspect.signature(torch.nn.BatchNorm1d.__init__).parameters
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _load_state_dict_atomically(module, load):
    """Call load() (torch.nn.Module.load_state_dict on `module`) so that a load that raises changes nothing.
    torch's copies every entry that fits before it reports those that do not, so a layer given a mismatched
    checkpoint would be left half loaded; here its parameters and buffers (the tensors themselves, which
    assign=True would replace, and their values) are put back before the error is raised, unchanged.
    Only the layer's own tensors: a model that holds it loads through torch's own recursion, as torch's do."""
    stores = (module._parameters, module._buffers)
    kept = [(store, name, tensor, None if tensor is None else (tensor._version, tensor.detach().clone()))
            for store in stores for name, tensor in store.items()]
    try:
        return load()
    except BaseException:
        with torch.no_grad():
            for store, name, tensor, saved in kept:
                store[name] = tensor                       # the tensor itself, if assign=True replaced it
                if saved is not None and tensor._version != saved[0]:
                    tensor.copy_(saved[1])                 # only what the load wrote: a tensor it left alone
        raise                                              # keeps its version, and a pending backward its inputs


class _BatchNorm(torch.nn.Module):
    """Common code of the bnlib drop-ins for torch.nn.BatchNorm1d/2d/3d (same arguments,
    parameters, buffers and state-dict keys); the arithmetic is bnlib.functional's.

    Not a subclass of torch's classes: isinstance(layer, torch.nn.BatchNorm2d) (or torch's
    _BatchNorm) is False, so code that picks batch-norm layers that way (weight-decay groups,
    torch.nn.SyncBatchNorm.convert_sync_batchnorm) passes bnlib's by. Test for both:
    isinstance(m, bnlib.nn.BATCHNORM_TYPES).
    One difference in evaluation: on CPU tensors a negative running_var raises ValueError (naming the
    channel) where torch gives NaN in that channel; on CUDA tensors nothing is checked on the host (a
    check would cost a synchronization).
    """

    _version = 2                      # as torch's: state dicts carry num_batches_tracked
    __prepare_scriptable__ = _refuse_scripting    # torch.jit.script: refused by name (torch.export: forward)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__()
        num_features = F._check_positive_int(num_features, "num_features")   # not a bool either
        F._check_momentum(momentum)     # a bool is refused (torch takes it): BatchNorm2d(64, 1e-3, True) meant affine=True
        F._check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:          # as torch >= 2.12: bias=False keeps the scale, drops the shift
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # As torch: a state dict saved before num_batches_tracked existed (version 1, or no version
        # recorded) loads, strict or not; the count is the layer's own, or 0 if it has none to give.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            own = self.num_batches_tracked
            usable = own is not None and own.device.type != "meta"
            state_dict[key] = own if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """torch.nn.Module.load_state_dict, the same arguments, result and errors, except that a load that
        raises leaves the layer as it was (torch's keeps the entries it copied before the error)."""
        return _load_state_dict_atomically(self, lambda: super(_BatchNorm, self).load_state_dict(state_dict, *args,
                                                                                                   **kwargs))

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
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
        if _TORCH_BN_HAS_BIAS or (self.affine and self.bias is None):    # repr as the installed torch's
            text += f"bias={self.bias is not None}, "
        return text + f"track_running_stats={self.track_running_stats}"

    def _check_input_dim(self, x):
        raise NotImplementedError

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{type(self).__name__} supports float16, bfloat16, float32 and float64 input, "
                            f"got {x.dtype}")
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels "
                             f"in dimension 1, got input of shape {tuple(x.shape)}")
        # as torch: parameters and buffers in x's dtype, or float32 for float16/bfloat16 x (autocast)
        allowed = (x.dtype, torch.float32) if x.dtype in _HALF else (x.dtype,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(self, name)
            if t is not None and t.dtype not in allowed:
                expected = " or ".join(str(d) for d in allowed)
                raise TypeError(f"input dtype {x.dtype} needs the layer's {name} in {expected}, got {t.dtype}: "
                                f"convert the module (e.g. .to({x.dtype})) or the input")

    def _update_running_stats(self, mean, var, count):
        """running = (1 - m) * running + m * batch (unbiased var), m = momentum or 1/num_batches_tracked.

        mean, var: (C,) tensors on the buffers' device; count: values per channel (a Python int).
        Nothing is read back to the host, except num_batches_tracked when momentum is None (as torch).
        As torch, a buffer that is None is skipped (and momentum=None without a count gives m = 0).
        An update that fails changes nothing: float32 and float64 buffers are updated in place only when
        the statistics are on their device with their shape (and no torch.func transform is active), where the
        in-place operations cannot fail halfway; otherwise the new values are computed before any buffer is
        written (under torch.func.vmap batched statistics cannot go into unbatched buffers; a meta-device
        batch's statistics cannot go into real buffers, where torch's in-place add would skip them silently).
        """
        with torch.no_grad():
            if count == 0 or self.running_mean is None or self.running_var is None:
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)     # an empty batch: counted, as torch does, no statistics
                return
            if self.momentum is not None:
                momentum = self.momentum
            else:
                momentum = 0.0 if self.num_batches_tracked is None else 1.0 / (int(self.num_batches_tracked) + 1)
            unbiased = var * (count / (count - 1)) if count > 1 else var
            running_mean, running_var = self.running_mean, self.running_var
            in_place = (running_mean.dtype not in _HALF and running_var.dtype not in _HALF
                        and all(s.device == b.device and s.shape == b.shape
                                for s, b in ((mean, running_mean), (var, running_var)))
                        and not (_transforms_active and _transforms_active()))
            if in_place:
                # the operations below, in place: the same values, without two new tensors and two copies
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
            else:
                # in float32 for float16/bfloat16 buffers, rounded once by copy_: two roundings per step in the
                # buffer's dtype let a float16 running_var drift (float16: torch's CPU buffers bit for bit; torch's
                # bfloat16 CPU path rounds otherwise, and its buffers drift further from the exact average than these)
                acc = torch.float32 if running_mean.dtype in _HALF else running_mean.dtype
                new_mean = torch.add(running_mean.to(acc).mul(1 - momentum), mean.to(acc), alpha=momentum)
                new_var = torch.add(running_var.to(acc).mul(1 - momentum), unbiased.to(acc), alpha=momentum)
                try:
                    running_mean.copy_(new_mean)
                except RuntimeError as err:
                    raise RuntimeError(f"{type(self).__name__} could not update its running statistics in place: "
                                       f"{err}\nUnder torch.func transforms the buffers must be inputs "
                                       "(torch.func.functional_call); " + _VMAP_RUNNING_STATS) from None
                running_var.copy_(new_var)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)

    def _empty_batch(self, x):
        """As torch for a zero-size batch: an empty output still connected to the graph (so backward
        gives zero parameter gradients); in training, num_batches_tracked counts it, the statistics stay."""
        if self.training and self.track_running_stats:
            self._update_running_stats(None, None, 0)
        y = x.clone()
        if self.weight is not None:
            y = y * self.weight[0]
        if self.bias is not None:
            y = y + self.bias[0]
        return y

    def _refuse_zero_eps(self):
        """torch's rule and message for batch statistics (an empty batch included), checked before any change."""
        if not self.eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")

    def _uses_batch_statistics(self):
        """torch's rule: batch statistics in training, and in evaluation when the layer has no running
        buffers. It asks whether the buffers exist, not track_running_stats: a layer whose flag is
        switched off after construction still has its buffers, and normalizes with them in evaluation."""
        return self.training or (self.running_mean is None and self.running_var is None)

    @_outside_torch_graphs        # torch.compile: eagerly, outside the graph; torch.export: refused
    def forward(self, x):
        self._check_input(x)
        batch_statistics = self._uses_batch_statistics()
        if batch_statistics:
            self._refuse_zero_eps()
        if x.numel() == 0:
            return self._empty_batch(x)
        if batch_statistics:
            # as torch, the buffers are updated only in training with track_running_stats set (the flag
            # off but buffers kept: batch statistics, buffers untouched)
            tracking = self.training and self.track_running_stats
            if tracking:
                _constant_statistics(self.running_mean, self.running_var)
            running = None                      # the buffers, if chapter 05's kernels update them in place
            if tracking and _torch_kernels(x):
                running = _fusable_running((self.running_mean, self.running_var, self.momentum,
                                            self.num_batches_tracked), _compute_dtype(x))
            args = (x, self.weight, self.bias, self.eps, running)
            if _needs_autograd(x, self.weight, self.bias):
                y, mean, var, _ = _apply(BatchNormFunction, *args)
            else:                               # nothing to record (torch.no_grad, frozen parameters and input)
                y, mean, var, _ = BatchNormFunction.forward(*args)
            if tracking and running is None:
                self._update_running_stats(mean, var, x.numel() // x.shape[1])
            return y
        return _inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2D or 3D input, (N, C) or (N, C, L): torch.nn.BatchNorm1d's drop-in.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, per channel over N (and L).

    Args: num_features (C), eps=1e-5, momentum=0.1 (None: cumulative average), affine=True,
        track_running_stats=True, device=None, dtype=None, and keyword-only bias=True, all as in torch.
    Shape: input (N, C) or (N, C, L); output the same.
    Not a subclass of torch.nn.BatchNorm1d: to find batch-norm layers of either library, use
    isinstance(m, bnlib.nn.BATCHNORM_TYPES). State dicts, train/eval and double backward as torch's.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4D input (N, C, H, W): torch.nn.BatchNorm2d's drop-in.

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, per channel over N, H, W.

    Args: as BatchNorm1d.  Shape: input (N, C, H, W); output the same.
    Not a subclass of torch.nn.BatchNorm2d: to find batch-norm layers of either library, use
    isinstance(m, bnlib.nn.BATCHNORM_TYPES).
    """

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5D input (N, C, D, H, W): torch.nn.BatchNorm3d's drop-in.

    Args: as BatchNorm1d.  Shape: input (N, C, D, H, W); output the same.
    Not a subclass of torch.nn.BatchNorm3d: to find batch-norm layers of either library, use
    isinstance(m, bnlib.nn.BATCHNORM_TYPES).
    """

    def _check_input_dim(self, x):
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")


# isinstance(m, BATCHNORM_TYPES): True for torch's batch-norm layers and bnlib's (SyncBatchNorm included)
BATCHNORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, _BatchNorm)

_TORCH_TO_BNLIB = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                   torch.nn.BatchNorm3d: BatchNorm3d}


def _copy_bn(source, cls, **extra):
    """A new `cls` layer with the settings and mode of the BN layer `source`, holding the very same
    parameter and buffer objects (as torch's convert_sync_batchnorm does): an optimizer built before
    the conversion keeps training them, and nothing is copied."""
    like = source.weight if source.affine else source.running_mean
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    new = cls(source.num_features, eps=source.eps, momentum=source.momentum, affine=source.affine,
              track_running_stats=source.track_running_stats, **factory, **extra,
              bias=getattr(source, "bias", None) is not None)
    for name in list(new._parameters) + list(new._buffers):
        setattr(new, name, getattr(source, name, None))
    return new.train(source.training)


def _check_module(module, what):
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{what} takes a torch.nn.Module, got {type(module).__name__}")


def _replace_layers(module, make, what):
    """module with every submodule for which make(layer) returns a new layer replaced by it, in place (or the
    new layer, when module itself is one). Every replacement is built before any is put in, so a layer
    refused (re-raised with the layer's name) leaves the model as it was; a layer that appears twice gets one
    replacement, and the inside of a replaced layer is neither searched nor changed."""
    def built(layer, name):
        try:
            return make(layer)
        except Exception as error:
            where = f"{what}: layer {repr(name) if name else '(the module itself)'} ({type(layer).__name__})"
            if type(error) in (ValueError, TypeError):
                raise type(error)(f"{where}: {error}") from error
            error.add_note(where)                          # another type may take other arguments: keep it
            raise
    top = built(module, "")
    if top is not None:
        return top
    new, slots, seen = {}, [], {id(module)}
    def walk(parent, prefix):                              # _modules itself: named_modules() skips a repeat
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in new:                           # a layer met before, already replaced: this slot too
                slots.append((parent, name))
                continue
            if id(child) in seen:
                continue
            seen.add(id(child))
            made = built(child, prefix + name)
            if made is None:
                walk(child, prefix + name + ".")
            else:                                          # not searched inside: its children stay as they are
                new[id(child)] = made
                slots.append((parent, name))
    walk(module, "")
    for parent, name in slots:
        setattr(parent, name, new[id(parent._modules[name])])
    return module


def convert_batchnorm(module):
    """Replace every torch.nn.BatchNorm1d/2d/3d inside `module` with bnlib's, state preserved.

    Returns the converted module (the same object, changed in place, unless `module` itself is a
    torch BatchNorm layer, in which case the new layer is returned). The new layers hold the same
    parameter and buffer objects as the old ones (a layer used twice becomes one bnlib layer, used twice).
    Only the exact classes are replaced: a subclass of torch's BatchNorm may change its forward, and is
    left as it is, as is a lazy layer (LazyBatchNorm*d), which becomes a BatchNorm*d of torch's at its
    first call. A layer that bnlib's would refuse (eps < 0, say) raises an error that names it, and the
    model is left as it was: every new layer is built before any is put in.
    """
    _check_module(module, "convert_batchnorm")
    def make(layer):
        cls = _TORCH_TO_BNLIB.get(type(layer))
        return None if cls is None else _copy_bn(layer, cls)
    return _replace_layers(module, make, "convert_batchnorm")


_RANKS = {torch.nn.Linear: 1, torch.nn.Conv1d: 1, torch.nn.Conv2d: 2, torch.nn.Conv3d: 3}   # the BatchNorm{k}d each feeds


def _bn_rank(bn):
    """k for a BatchNorm{k}d of torch or bnlib, None for a layer of any rank (SyncBatchNorm)."""
    for rank, classes in enumerate(_TORCH_TO_BNLIB.items(), 1):      # (torch's class, bnlib's) for 1d, 2d, 3d
        if isinstance(bn, classes):
            return rank
    return None


def fold_batch_norm(module, bn):
    """Fold an inference-mode batch norm into the Linear or ConvNd layer that feeds it.

    With s = weight_bn / sqrt(running_var + eps) per output channel, module followed by bn equals
    one module with weight W * s (per output channel) and bias (b - running_mean) * s + bias_bn.
    Returns a new module (the inputs are not changed); grouped convolutions are fine, since each
    output channel has its own filter. bn must be in evaluation mode, of the rank the module feeds (BatchNorm1d
    after Linear or Conv1d, 2d after Conv2d, 3d after Conv3d; SyncBatchNorm after any), and the module's weight and
    bias plain parameters (not weight_norm'ed, spectral_norm'ed or pruned): otherwise it raises. A Linear is
    taken to feed bn its output features in dimension 1, as with (N, features) input; after a Linear applied to
    (N, L, features), BatchNorm1d would normalize dimension 1, the L positions, and the fold would not hold.
    """
    feeds = next((rank for kind, rank in _RANKS.items() if isinstance(module, kind)), None)
    if feeds is None:
        raise TypeError(f"fold_batch_norm folds into Linear or Conv1d/2d/3d, got {type(module).__name__}")
    if not isinstance(bn, BATCHNORM_TYPES):
        raise TypeError(f"bn must be a torch or bnlib BatchNorm1d/2d/3d, got {type(bn).__name__}")
    if _bn_rank(bn) not in (None, feeds):
        raise ValueError(f"{type(bn).__name__} cannot follow {type(module).__name__}, which feeds a BatchNorm{feeds}d")
    if isinstance(bn, torch.nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"bn ({type(bn).__name__}) is a lazy layer not built yet (it has no channels until its "
                         "first call): run the model on one batch first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False, or a buffer set to None): in "
                         "inference it uses batch statistics, which cannot be folded into fixed weights")
    out_features = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
    if bn.num_features != out_features:
        raise ValueError(f"bn has {bn.num_features} channels but {type(module).__name__} produces {out_features}")
    if bn.training:                  # as torch.nn.utils.fuse_conv_bn_eval, which asserts it
        raise ValueError("bn is in training mode, where it normalizes with batch statistics, which cannot be "
                         "folded into fixed weights: call bn.eval() (or model.eval()) first")
    negative = (bn.running_var < 0).nonzero()
    if len(negative):                # a variance cannot be negative; folded, it would give NaN weights
        k = int(negative[0, 0])
        raise ValueError(f"bn's running_var must be >= 0 everywhere, got {bn.running_var[k].item()!r} at channel {k}")
    # a reparametrized tensor (parametrize, the older weight_norm/spectral_norm hooks, prune) is no longer a
    # Parameter of the module itself; looked up without computing it (which could update spectral norm's state)
    params = module._parameters
    if any(torch.nn.parameter.is_lazy(p) for p in params.values() if p is not None):
        raise ValueError(f"{type(module).__name__} is a lazy layer not built yet (its weight has no shape until "
                         "its first call): run the model on one batch first")
    computed = [name for name in ("weight", "bias") if name not in params
                or (params[name] is not None and type(params[name]) is not torch.nn.Parameter)]
    if computed:
        raise TypeError(f"{type(module).__name__}'s {' and '.join(computed)} is computed at every call "
                        "(weight_norm, spectral_norm, pruning or another reparametrization), so a folded copy "
                        "would not keep the scaling: remove it first (torch.nn.utils.parametrize."
                        "remove_parametrizations, remove_weight_norm, remove_spectral_norm, prune.remove)")
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


def _sync_dtype(x):
    """The dtype SyncBatchNorm computes its per-element arithmetic in for input x. On the CPU, float64
    whatever x's dtype, for exactness (it matches BN on the concatenated batch to 1e-12), at a cost: a
    float64 copy of x (twice float32's memory, four times a float16's) and more time in the moments than
    float32 would take (not measured here). On CUDA, float32 for float16/bfloat16/float32 input and float64 for float64, as
    torch.nn.SyncBatchNorm and bnlib's own CUDA batch norm do: float64 runs at a small fraction of
    float32's speed on most GPUs, and a float64 copy of a float16 activation is four times its size.
    The C-length moments are exchanged and merged in float64 on every device."""
    return _compute_dtype(x) if x.is_cuda else torch.float64


def _local_moments(x, acc) -> Moments:
    """This process's per-channel (count, mean, M2) of x in dtype `acc`, two-pass as chapter 02's
    moments(), in torch operations on x's device. An empty x gives count 0 and zeros: the process
    still takes part in the exchange, and Chan's merge ignores it."""
    c = x.shape[1]
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return Moments(0, zeros, zeros)
    axes, shape = reduction_axes(x.dim()), channel_shape(x.dim(), c)
    xc = x.to(acc)
    mean = xc.mean(axes)                                          # (C,)
    centered = xc - mean.reshape(shape)
    return Moments(x.numel() // c, mean, (centered * centered).sum(axes))


def _gather_moments(local: Moments, group) -> Moments:
    """Every process's (count, mean, M2), all-gathered and merged with Chan's formula (chapter 02).

    Each process sends one (3, C) float64 tensor on its input's device (NCCL takes CUDA tensors,
    gloo CPU ones): its count (repeated over the channels), mean and M2. The merge runs in float64
    on that device; the counts are read back to the host (on a GPU one synchronization, as in
    torch.nn.SyncBatchNorm, which skips it while a CUDA graph is being captured; this read-back does not, so a
    synchronized step cannot be captured), since the merge weights and the error check need them as numbers.
    """
    count = torch.full_like(local.mean, local.count, dtype=torch.float64)
    packed = torch.stack([count, local.mean.double(), local.m2.double()])             # (3, C)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    counts = [int(n) for n in torch.stack([p[0, 0] for p in parts]).tolist()]      # one read back
    total = Moments(0, None, None)
    for n, part in zip(counts, parts):
        total = merge_moments(total, Moments(n, part[1], part[2]))
    return total


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm whose statistics span all processes of a torch.distributed group, in torch
    operations on the input's device: CPU tensors over gloo, CUDA tensors over NCCL.

    forward: this process's per-channel (count, mean, M2) (in _sync_dtype(x)) are all-gathered and
    merged with Chan's formula in float64; y = (x - mean) / sqrt(var + eps) * weight + bias is
    computed locally. backward: the per-channel sums (sum dy, sum dy * x_hat) are all-reduced, so dx
    is exactly this process's slice of the single-process gradient on the concatenated batch.
    dweight and dbias are this process's own sums, as in torch.nn.SyncBatchNorm
    (DistributedDataParallel then averages parameter gradients across processes).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, stats):
        acc = _sync_dtype(x)
        local = _local_moments(x, acc)
        total = _gather_moments(local, group)      # an empty process takes part with count 0, as in torch
        if total.count == 1:                       # every process sees the same total, so all raise
            raise ValueError(f"SyncBatchNorm in training needs more than 1 value per channel over all "
                             f"processes, got {total.count}")
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.count, ctx.acc = group, total.count, acc
        ctx.param_dtypes = (_dtype_of(weight), _dtype_of(bias))
        if total.count:                            # the global statistics, for the running ones (float64)
            stats.update(mean=total.mean, var=total.var, count=total.count)
        else:                                      # every process empty: nothing to update
            stats.update(mean=None, var=None, count=0)
        if x.numel() == 0:                         # nothing to normalize here; statistics still shared
            ctx.mean = ctx.inv_std = None
            return x.clone()
        shape = channel_shape(x.dim(), x.shape[1])
        inv_std = torch.sqrt(total.var + eps).reciprocal()                 # (C,), float64
        scale = inv_std if weight is None else inv_std * weight.double()
        y = (x.to(acc) - total.mean.to(acc).reshape(shape)) * scale.to(acc).reshape(shape)
        if bias is not None:
            y = y + bias.to(acc).reshape(shape)
        ctx.mean, ctx.inv_std = total.mean.to(acc), inv_std.to(acc)
        return _in_format_of(y.to(x.dtype), x)   # torch's layout: channels-last or C-contiguous

    @staticmethod
    @torch.autograd.function.once_differentiable     # all_reduce is not differentiable: a second
    def backward(ctx, dy):                           # differentiation raises rather than drop terms
        x, weight = ctx.saved_tensors
        c = x.shape[1]
        if ctx.mean is None:                       # empty here: take part in the all-reduce, as torch does,
            dist.all_reduce(torch.zeros(2, c, dtype=torch.float64, device=x.device), group=ctx.group)
            return None, None, None, None, None, None   # (autograd reads None as zero gradients)
        acc = ctx.acc
        shape, axes = channel_shape(x.dim(), c), reduction_axes(x.dim())
        x_hat = (x.to(acc) - ctx.mean.reshape(shape)) * ctx.inv_std.reshape(shape)
        g = dy.to(acc)
        local = torch.stack([g.sum(axes), (g * x_hat).sum(axes)])                 # (2, C): sum dy, sum dy*x_hat
        total = local.to(torch.float64, copy=True)                               # summed in float64
        dist.all_reduce(total, group=ctx.group)                                  # sums over processes
        mean_dy, mean_dy_xhat = (total / ctx.count).to(acc)
        scale = ctx.inv_std if weight is None else ctx.inv_std * weight.to(acc)
        dx = _dx_from_means(g, x_hat, scale.reshape(shape), mean_dy, mean_dy_xhat, shape)
        weight_dtype, bias_dtype = ctx.param_dtypes
        dweight = None if weight_dtype is None else local[1].to(weight_dtype)
        dbias = None if bias_dtype is None else local[0].to(bias_dtype)
        return _in_format_of(dx.to(x.dtype), x), dweight, dbias, None, None, None


def _dtype_of(t):
    return None if t is None else t.dtype


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over all processes of a torch.distributed group:
    torch.nn.SyncBatchNorm's drop-in, for CPU tensors (gloo backend) and CUDA tensors (NCCL backend:
    on an H200 on 2026-12-04 SyncBatchNormFunction's all_gather and all_reduce ran over NCCL in a group of one
    process, which receives nothing from others, and matched torch's CUDA batch norm in four dtypes (the tests'
    places in pytest's progress line; the log names failures only); across two GPUs it has not run).

    Args: as BatchNorm1d, plus process_group (default: the whole world).
    Shape: input (N, C, *spatial); output the same. Processes may hold different batch sizes, an
    empty one included: it still takes part in the exchanges (so no process waits for it until the group's timeout)
    and contributes nothing to the statistics, as in torch.nn.SyncBatchNorm.
    Without an initialized process group (or with a group of one process) it is plain batch
    norm (on CUDA tensors, chapter 05's kernels), as torch.nn.SyncBatchNorm is on CUDA tensors; on CPU
    tensors torch's raises in training once a process group is initialized, even one of one process, where this
    computes. Synchronized, its
    backward goes through an all-reduce, which autograd cannot differentiate: a double backward
    (create_graph=True) raises rather than leave out terms.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    @_outside_torch_graphs
    def forward(self, x):
        self._check_input(x)
        # as torch: statistics are synchronized in training only (an evaluating process must
        # not wait for the others); evaluation without running statistics uses the local batch
        synced = self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.process_group) > 1
        if not synced:
            return super().forward(x)
        self._refuse_zero_eps()             # as unsynchronized (torch's synced path would compute with it), before any exchange
        stats = {}
        group = self.process_group or dist.group.WORLD
        y = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group, stats)
        if self.track_running_stats:   # with the global statistics, on an empty process too (as torch)
            self._update_running_stats(stats["mean"], stats["var"], stats["count"])
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every batch-norm layer in `module` (torch's or bnlib's BatchNorm1d/2d/3d, subclasses
        included, and SyncBatchNorm of either library, which then syncs over `process_group`) with
        bnlib's SyncBatchNorm holding the same parameter and buffer objects, as torch's
        convert_sync_batchnorm does. A lazy layer not yet built (its class is still Lazy*: it has no number
        of features yet) is left as it is. As convert_batchnorm, it builds every new layer before it puts any
        in: a layer refused raises an error that names it, and the model is left as it was."""
        _check_module(module, "convert_sync_batchnorm")
        def make(layer):
            if isinstance(layer, BATCHNORM_TYPES) and not isinstance(layer, torch.nn.modules.lazy.LazyModuleMixin):
                return _copy_bn(layer, cls, process_group=process_group)
            return None
        return _replace_layers(module, make, "convert_sync_batchnorm")

_TORCH_BN_FOR_NDIM = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def _sync_check_worker(rank, splits, shape_tail, momentum, init_file, out_dir):
    """Process `rank` of sync_batchnorm_check (a module-level function, so that spawn can start it)."""
    import datetime
    import os
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(splits[0]),
                            timeout=datetime.timedelta(seconds=120))
    worst = []
    try:
        for sizes in splits:
            gen = torch.Generator().manual_seed(len(worst))   # every process builds the same global batch
            C = 3
            xs = [torch.randn((n, C) + tuple(shape_tail), generator=gen, dtype=torch.float64) * 2 + 1 for n in sizes]
            dys = [torch.randn((n, C) + tuple(shape_tail), generator=gen, dtype=torch.float64) for n in sizes]
            reference = _TORCH_BN_FOR_NDIM[2 + len(shape_tail)](C, momentum=momentum).double()
            with torch.no_grad():
                reference.weight.uniform_(0.5, 1.5, generator=gen)
                reference.bias.normal_(generator=gen)
            sync = SyncBatchNorm(C, momentum=momentum).double()
            sync.load_state_dict(reference.state_dict())
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            diffs = []
            for _ in range(3):
                x = xs[rank].clone().requires_grad_()
                y = sync(x)
                y.backward(dys[rank])
                x_all = torch.cat(xs).requires_grad_()
                y_all = reference(x_all)
                y_all.backward(torch.cat(dys))
                grads = [torch.zeros(C, dtype=torch.float64) if p.grad is None else p.grad.clone()
                         for p in (sync.weight, sync.bias)]           # None on an empty process, as torch
                for g in grads:
                    dist.all_reduce(g)                 # summed over processes (DistributedDataParallel averages)
                diffs += [grads[0] - reference.weight.grad, grads[1] - reference.bias.grad,
                          sync.running_mean - reference.running_mean, sync.running_var - reference.running_var,
                          (sync.num_batches_tracked - reference.num_batches_tracked).double()]
                if sizes[rank]:
                    diffs += [y - y_all[lo:hi], x.grad - x_all.grad[lo:hi]]
                for m in (sync, reference):
                    m.weight.grad = m.bias.grad = None
            worst.append(max(float(d.detach().abs().max()) for d in diffs))
        result = worst
    except Exception as err:                       # reported, so that the caller fails with the reason
        result = f"process {rank}: {err!r}"
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def sync_batchnorm_check(splits, shape_tail=(), momentum=None, start_method=None, timeout=240):
    """Check SyncBatchNorm against torch's batch norm on the concatenated batch, over gloo: BatchNorm1d for 2-D
    and 3-D input, BatchNorm2d for 4-D, BatchNorm3d for 5-D.

    Starts len(splits[0]) CPU processes with torch.multiprocessing; process r holds splits[k][r]
    examples (0 allowed) of shape (C=3, *shape_tail) in split k, for 3 training steps per split.
    start_method: "fork" (fast: nothing to re-import) or "spawn"; by default fork on Linux, spawn where
    torch sees a GPU (autograd's GPU threads do not survive a fork) and on other systems (Windows has no
    fork; macOS's is unsafe with threads).
    Returns, per split, the largest difference over all processes in outputs, input gradients,
    summed parameter gradients, running statistics and num_batches_tracked.
    """
    import datetime
    import os
    import sys
    import tempfile

    import torch.multiprocessing as mp
    if len({len(s) for s in splits}) != 1:
        raise ValueError(f"every split must have one batch size per process, got {splits}")
    with tempfile.TemporaryDirectory() as tmp:
        args = (list(splits), tuple(shape_tail), momentum, os.path.join(tmp, "rendezvous"), tmp)
        if start_method is None:
            fork_ok = sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            start_method = "fork" if fork_ok and not torch.cuda.is_available() else "spawn"
        context = mp.start_processes(_sync_check_worker, args=args, nprocs=len(splits[0]), join=False,
                                     start_method=start_method)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while not context.join(timeout=1):
            if datetime.datetime.now() > deadline:
                for p in context.processes:
                    p.kill()
                raise TimeoutError(f"SyncBatchNorm check with splits {splits} did not finish in {timeout} s")
        reports = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(len(splits[0]))]
    for report in reports:
        if isinstance(report, str):
            raise RuntimeError(report)
    return [max(per_split) for per_split in zip(*reports)]


def _bn_layers(model):
    """model's batch-norm layers (torch's and bnlib's) that keep running statistics, as two lists: those whose
    statistics training updates, and those with momentum 0, whose statistics training never changes."""
    layers = [m for m in model.modules()
              if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats and m.running_mean is not None]
    for m in layers:
        if isinstance(m.running_mean, torch.nn.parameter.UninitializedBuffer):
            raise ValueError(f"{type(m).__name__} has not been built yet (a lazy layer): run the model once first")
    return [m for m in layers if m.momentum != 0], [m for m in layers if m.momentum == 0]


def precise_bn(model, batches, variance="pooled", device=None):
    """PreciseBN: recompute the running statistics of model's batch-norm layers with the weights as they are.

    batches: an iterable of inputs, each a tensor or a tuple/list whose first item is the input (as a
    DataLoader yields (x, y)); model(x) is run on each under torch.no_grad(), after x is moved to `device` if
    one is given. The whole model runs in training mode for the pass, as in torch.optim.swa_utils.update_bn:
    dropout draws random numbers, and other modules that keep statistics in training mode update them.
    Every batch-norm layer (torch's or bnlib's, track_running_stats=True) that the batches reach then holds:
    variance="pooled" (the default; Wu and Johnson's PreciseBN, fvcore's update_bn_stats): the mean and the
        variance of every value the layer received, per channel, the batches (and the calls of a layer used
        more than once per forward) pooled, divided by the count; each call's moments are taken in float32
        (float64 for float64 input) and merged in float64 with Chan's formula;
    variance="batch" (update_bn's estimate): the average of the calls' means and unbiased variances.
    num_batches_tracked counts the layer's calls; momentum is kept; a layer no batch reaches keeps its
    statistics, and calls on empty batches are skipped (not counted either, unless a SyncBatchNorm's group had
    values). A layer that model.train() leaves in evaluation mode (a model whose train() keeps a frozen part so)
    is left exactly as it was and normalizes with its own statistics during the pass, as fvcore's
    get_bn_modules selects only layers in training mode (update_bn would reset it, and it would normalize with
    0 and 1 for the layers after it). A layer that the model's forward itself switches to evaluation mode
    normalizes with its own statistics in those calls, as a layer kept in evaluation mode does, and records
    nothing from them; if no call reaches it in training mode, it keeps its statistics. A layer with momentum 0, whose statistics training
    never changes, is left exactly as it was (num_batches_tracked too), as bnlib.train.precise_bn leaves
    it (update_bn would recompute it). Every module is left in the mode (train or eval) it
    was in; if a forward raises, every layer gets its buffers back. The pooled statistics are this process's
    own; with variance="batch" a SyncBatchNorm in a group of several processes synchronizes as in training.
    Returns model.
    """
    _check_module(model, "precise_bn")
    if variance not in ("pooled", "batch"):
        raise ValueError(f'variance must be "pooled" (Wu and Johnson) or "batch" (update_bn), got {variance!r}')
    candidates, frozen = _bn_layers(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()                                  # as update_bn; then only the layers in training mode
        layers = [layer for layer in candidates if layer.training]
        frozen = frozen + [layer for layer in candidates if not layer.training]   # kept in evaluation: left alone
    except BaseException:
        for m, mode in modes:
            m.train(mode)
        raise
    saved = {layer: {k: v.clone() for k, v in layer.state_dict().items()} for layer in layers}   # before the pass
    frozen_saved = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in frozen]
    momenta = [layer.momentum for layer in layers]
    totals = {layer: Moments(0, None, None) for layer in layers}      # what each layer received (float64)

    empty_before = {}                    # layer: (running_mean, running_var, num_batches_tracked) before an empty call
    in_eval = {}                         # layer: the pass's statistics, set aside while a call in evaluation mode runs

    def swap_back(layer):
        """The pass's statistics back into a layer after a call in evaluation mode (or one that raised)."""
        statistics = in_eval.pop(layer, None)
        if statistics is not None:
            layer.running_mean.copy_(statistics[0])
            layer.running_var.copy_(statistics[1])
        return statistics is not None

    def record(layer, args, kwargs):
        x = (args[0] if args else next(iter(kwargs.values()))).detach()   # input= (torch), x= (bnlib)
        empty_before.pop(layer, None)                                  # (an earlier call that raised)
        swap_back(layer)
        if not layer.training:           # the model's forward switched it to evaluation mode: like a layer kept in
            in_eval[layer] = (layer.running_mean.clone(), layer.running_var.clone())   # evaluation, it normalizes
            layer.running_mean.copy_(saved[layer]["running_mean"])                 # with its own statistics and
            layer.running_var.copy_(saved[layer]["running_var"])                   # records nothing
            return
        if x.numel() == 0 and layer.num_batches_tracked is not None:
            empty_before[layer] = (layer.running_mean.clone(), layer.running_var.clone(),
                                   int(layer.num_batches_tracked))
        if variance == "batch":                                        # only whether the layer was reached
            totals[layer] = totals[layer]._replace(count=totals[layer].count + x.numel() // x.shape[1])
            return
        local = _local_moments(x, torch.float64 if x.dtype == torch.float64 else torch.float32)   # SyncBatchNorm's
        totals[layer] = merge_moments(totals[layer], Moments(local.count, local.mean.double(), local.m2.double()))

    def uncount_empty(layer, args, kwargs, output):
        """An empty call that counted itself and left the statistics as they were (every empty call in training
        mode but a SyncBatchNorm's whose group had values) is not counted: torch's layers and bnlib's count it,
        and with momentum=None the count sets the weight of every later call (A, empty, B would average A's and
        B's means as 2/3 and 1/3). A layer that stayed in evaluation mode counted nothing and is left alone."""
        if swap_back(layer):
            return
        before = empty_before.pop(layer, None)
        if before is None:
            return
        mean, var, count = before
        same = all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
                   for a, b in ((mean, layer.running_mean), (var, layer.running_var)))
        if same and int(layer.num_batches_tracked) == count + 1:
            layer.num_batches_tracked.sub_(1)

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    hooks += [layer.register_forward_hook(uncount_empty, with_kwargs=True) for layer in layers]
    done = False
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None                                      # a cumulative average
        count = 0
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, (tuple, list)) and not batch:
                    raise ValueError(f"precise_bn: batch {count} is an empty {type(batch).__name__}; each batch must be "
                                     "an input tensor, or a tuple or list whose first item is the input")
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x if device is None else x.to(device))
                count += 1
        if count == 0:
            raise ValueError("precise_bn needs at least one batch, got an empty iterable")
        for layer, total in totals.items():
            if total.count and variance == "pooled":
                layer.running_mean.copy_(total.mean)
                layer.running_var.copy_(total.var)
        done = True
    finally:
        for hook in hooks:
            hook.remove()
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
            if not done or totals[layer].count == 0:                  # a failed call, or a layer never reached
                layer.load_state_dict(saved[layer])                    # in training mode
        for layer, state in zip(frozen, frozen_saved):                # the pass counted its batches: undone
            layer.load_state_dict(state)
        for m, mode in modes:
            m.train(mode)
    return model


class FrozenBatchNorm2d(torch.nn.Module):
    r"""BatchNorm2d with fixed statistics and affine parameters: the layer detection libraries
    (torchvision.ops.FrozenBatchNorm2d, detectron2) put in pretrained backbones.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias in train and eval mode alike.
    weight, bias, running_mean and running_var are buffers, not parameters: nothing is learned and
    nothing is updated. load_state_dict() takes a torch.nn.BatchNorm2d (or bnlib.nn.BatchNorm2d)
    state dict unchanged: its num_batches_tracked entry is dropped.

    Args: num_features (C), eps=1e-5 (use the eps the statistics were trained with), device, dtype.
    Shape: input (N, C, H, W); output the same. Gradients flow to the input (and to weight or bias
    only if one is made to require grad); running statistics that require grad are refused at the
    forward, as torch's evaluation-mode batch norm refuses them (torchvision's layer, written in plain
    tensor operations, would differentiate them instead). Input dtypes as
    bnlib.nn.BatchNorm2d's: the buffers' dtype, or float16/bfloat16 input with float32 buffers
    (what autocast produces; computed in float32, output in the input's dtype).
    """

    __prepare_scriptable__ = _refuse_scripting    # torch.jit.script: refused by name

    def __init__(self, num_features, eps=1e-5, device=None, dtype=None):
        super().__init__()
        num_features = F._check_positive_int(num_features, "num_features")   # not a bool either
        F._check_eps(eps)
        self.num_features, self.eps = num_features, float(eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batch_norm(cls, bn):
        """A FrozenBatchNorm2d with the eps, statistics and affine parameters of a batch-norm layer `bn`
        (torch's or bnlib's BatchNorm1d/2d/3d or SyncBatchNorm: the statistics are per channel whatever the input's rank;
        the frozen layer takes 4-D input; a bn built with bias=False gives a zero bias)."""
        if not isinstance(bn, BATCHNORM_TYPES):
            raise TypeError(f"from_batch_norm takes a batch-norm layer (torch's or bnlib's), got {type(bn).__name__}")
        if not (bn.affine and bn.track_running_stats):
            raise ValueError("from_batch_norm needs a BatchNorm with affine=True and track_running_stats=True")
        absent = [name for name in ("weight", "running_mean", "running_var") if getattr(bn, name, None) is None]
        if absent:                            # flags still True, the tensors set to None by hand
            raise ValueError(f"from_batch_norm needs bn's weight and running statistics, but bn.{absent[0]} is None")
        frozen = cls(bn.num_features, eps=bn.eps, device=bn.weight.device, dtype=bn.weight.dtype)
        state = bn.state_dict()
        if getattr(bn, "bias", None) is None:                 # torch >= 2.12's BatchNorm(..., bias=False)
            state["bias"] = torch.zeros_like(bn.weight.detach())
        frozen.load_state_dict(state)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """torch.nn.Module.load_state_dict, except that a load that raises leaves the layer as it was."""
        return _load_state_dict_atomically(self, lambda: super(FrozenBatchNorm2d, self).load_state_dict(
            state_dict, *args, **kwargs))

    @_outside_torch_graphs        # torch.compile: eagerly, outside the graph; torch.export: refused
    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FrozenBatchNorm2d expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm2d({self.num_features}) expected input of shape "
                             f"(N, {self.num_features}, H, W), got {tuple(x.shape)}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"FrozenBatchNorm2d supports float16, bfloat16, float32 and float64 input, got {x.dtype}")
        allowed = (x.dtype, torch.float32) if x.dtype in _HALF else (x.dtype,)   # as BatchNorm2d (autocast)
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(self, name).dtype not in allowed:
                raise TypeError(f"input dtype {x.dtype} needs the layer's {name} in "
                                f"{' or '.join(str(d) for d in allowed)}, got {getattr(self, name).dtype}: "
                                f"convert the module (e.g. .to({x.dtype})) or the input")
        return _inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"
