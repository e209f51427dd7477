"""bnlib.nn (chapter 06): the torch drop-ins, conversion, folding and SyncBatchNorm over gloo,
mixed precision, empty batches, PyTorch's own ModuleInfo samples, and (on GPUs) CUDA tensors, SyncBatchNorm
over NCCL included."""
import copy
import datetime
import inspect
import os
import tempfile

import numpy as np
import pytest
import torch

from bnlib import nn as bnn
from reference import check_layouts_like_torch, strides_that_matter, tensor_layouts

TORCH_BN_HAS_BIAS = bnn._TORCH_BN_HAS_BIAS       # torch >= 2.12: BatchNorm(..., bias=False)

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
BNLIB_BN = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("seed", range(16))
def test_modules_match_torch_over_steps(seed):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dims, C = int(rng.integers(2, 6)), int(rng.integers(1, 7))
    momentum = [0.1, None, float(rng.uniform(0, 1))][seed % 3]
    eps = float(10 ** rng.uniform(-6, -2))
    affine, track, bias = seed % 4 != 3, seed % 5 != 4, seed % 7 != 6
    dtype = [torch.float64, torch.float32][seed % 2]
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    if not bias:
        if not TORCH_BN_HAS_BIAS:
            pytest.skip(f"torch {torch.__version__} has no BatchNorm(bias=False) to compare with")
        kwargs["bias"] = False
    theirs = TORCH_BN[dims](C, **kwargs)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5, generator=gen)
            if bias:
                theirs.bias.normal_(generator=gen)
    ours = BNLIB_BN[dims](C, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert repr(ours) == repr(theirs)
    shape = (int(rng.integers(2, 9)), C) + tuple(int(rng.integers(1, 5)) for _ in range(dims - 2))
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for step in range(5):
        if step == 4:
            theirs.eval(), ours.eval()
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(yb, ya, atol=tol, rtol=tol)
        torch.testing.assert_close(xb.grad, xa.grad, atol=tol * 10, rtol=tol)
        for name in ("weight", "bias"):
            if getattr(theirs, name) is not None:
                torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, atol=tol * 10, rtol=tol)
                getattr(theirs, name).grad = getattr(ours, name).grad = None
        if track:
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=tol, rtol=tol)
            torch.testing.assert_close(ours.running_var, theirs.running_var, atol=tol, rtol=tol)
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
    back = TORCH_BN[dims](C, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)


def test_gradcheck_float64():
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for layer in (bnn.BatchNorm1d(3).double(), bnn.BatchNorm1d(3).double().eval()):
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    assert torch.autograd.gradcheck(lambda x, w, b: bnn.BatchNormFunction.apply(x, w, b, 1e-5)[0], (x, w, b))


def test_backward_is_not_handed_zero_gradients_for_the_statistics(monkeypatch):
    """The batch statistics are outputs without gradients: autograd hands backward None for them, not
    materialized zero tensors (on CUDA, three allocations and fill kernels per step), and the
    gradients still match torch's."""
    received = []
    backward = bnn.BatchNormFunction.backward

    def recording(ctx, dy, *rest):
        received.append(rest)
        return backward(ctx, dy, *rest)

    monkeypatch.setattr(bnn.BatchNormFunction, "backward", staticmethod(recording))
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    ours, theirs = bnn.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    ours(xo).backward(dy)
    theirs(xt).backward(dy)
    assert received == [(None, None, None)]
    torch.testing.assert_close(xo.grad, xt.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


def test_cpu_tensors_are_not_copied():
    t = torch.randn(4, 3)
    assert bnn._as_array(t).ctypes.data == t.data_ptr()
    y = torch.from_numpy(np.ones((2, 2)))
    assert bnn._as_tensor(y.numpy()).data_ptr() == y.data_ptr()


@pytest.mark.parametrize("call, error, words", [
    (lambda: bnn.BatchNorm2d(4)(torch.randn(8, 4)), ValueError, ["expected 4D input (got 2D input)"]),
    (lambda: bnn.BatchNorm1d(4)(torch.randn(8, 4, 2, 2)), ValueError, ["expected 2D or 3D input (got 4D input)"]),
    (lambda: bnn.BatchNorm3d(4)(torch.randn(8, 4, 2, 2)), ValueError, ["expected 5D input (got 4D input)"]),
    (lambda: bnn.BatchNorm2d(4)(torch.randn(8, 3, 5, 5)), ValueError, ["4 channels", "(8, 3, 5, 5)"]),
    (lambda: bnn.BatchNorm2d(4)(torch.randn(8, 4, 5, 5, dtype=torch.float64)), TypeError, ["torch.float64", "torch.float32"]),
    (lambda: bnn.BatchNorm1d(4).half()(torch.randn(8, 4, dtype=torch.float64)), TypeError,
     ["input dtype torch.float64", "weight", "torch.float16"]),
    (lambda: bnn.BatchNorm1d(4).double()(torch.randn(8, 4, dtype=torch.float16)), TypeError,
     ["torch.float16 or torch.float32", "torch.float64"]),
    (lambda: bnn.BatchNorm1d(4).half()(torch.randn(8, 4, dtype=torch.bfloat16)), TypeError,
     ["torch.bfloat16 or torch.float32", "torch.float16"]),
    (lambda: bnn.BatchNorm1d(4)(torch.ones(8, 4, dtype=torch.int64)), TypeError, ["bfloat16", "torch.int64"]),
    (lambda: bnn.BatchNorm1d(4)(torch.randn(1, 4)), ValueError, ["more than 1 value per channel"]),
    (lambda: bnn.BatchNorm1d(4, track_running_stats=False).eval()(torch.randn(1, 4)), ValueError,
     ["more than 1 value per channel"]),
    (lambda: bnn.BatchNorm1d(4)(np.zeros((4, 4))), TypeError, ["torch.Tensor", "ndarray"]),
    (lambda: bnn.BatchNorm1d(0), ValueError, ["num_features"]),
    (lambda: bnn.BatchNorm1d(3, momentum=2.0), ValueError, ["momentum"]),
    # a bool is refused where torch takes it as a number: BatchNorm2d(64, 1e-3, True) meant affine=True
    (lambda: bnn.BatchNorm2d(3, 1e-3, True), ValueError, ["momentum", "True", "a bool", "another argument"]),
    (lambda: bnn.BatchNorm2d(3, eps=True), ValueError, ["eps", "True", "a bool"]),
])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(w in str(info.value) for w in words), str(info.value)


def test_failed_forward_changes_no_buffer():
    layer = bnn.BatchNorm1d(4)
    layer(torch.randn(8, 4))
    before = copy.deepcopy(layer.state_dict())
    for bad in (torch.randn(1, 4), torch.randn(8, 3), torch.randn(8, 4, dtype=torch.float64),
                torch.ones(8, 4, dtype=torch.int32)):
        with pytest.raises((ValueError, TypeError)):
            layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_eval_without_running_stats_uses_batch_statistics_like_torch():
    x = torch.randn(6, 3)
    ours, theirs = bnn.BatchNorm1d(3, track_running_stats=False).eval(), torch.nn.BatchNorm1d(3, track_running_stats=False).eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_convert_batchnorm_keeps_state_and_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 3), torch.nn.BatchNorm1d(3, affine=False))
    model(torch.randn(5, 1, 6, 6))
    model.eval()
    converted = bnn.convert_batchnorm(copy.deepcopy(model))
    assert isinstance(converted[1], bnn.BatchNorm2d) and isinstance(converted[4], bnn.BatchNorm1d)
    assert not converted[1].training
    x = torch.randn(3, 1, 6, 6)
    torch.testing.assert_close(converted(x), model(x))
    assert isinstance(bnn.convert_batchnorm(torch.nn.BatchNorm3d(2)), bnn.BatchNorm3d)


@pytest.mark.parametrize("make", [
    lambda: (torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5), (4, 7)),
    lambda: (torch.nn.Linear(7, 5, bias=False), bnn.BatchNorm1d(5), (4, 7)),
    lambda: (torch.nn.Conv1d(3, 6, 3, groups=3), torch.nn.BatchNorm1d(6), (2, 3, 8)),
    lambda: (torch.nn.Conv2d(4, 8, 3, groups=4, bias=False), torch.nn.BatchNorm2d(8), (2, 4, 6, 6)),
    lambda: (torch.nn.Conv2d(4, 8, 1, stride=2), bnn.BatchNorm2d(8, affine=False), (2, 4, 6, 6)),
    lambda: (torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4), (2, 2, 4, 4, 4)),
])
def test_fold_batch_norm(make):
    layer, bn, shape = make()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 4.0)
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    layer.eval(), bn.eval()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (layer, bn)]
    fused = fold_batch_norm_checked(layer, bn, shape)
    for m, state in zip((layer, bn), before):                 # inputs untouched: weights, biases, buffers
        after = m.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert type(fused) is type(layer)


def fold_batch_norm_checked(layer, bn, shape):
    fused = bnn.fold_batch_norm(layer, bn)
    x = torch.randn(shape)
    with torch.no_grad():
        want, got = bn(layer(x)), fused(x)
    assert float((want - got).abs().max() / want.abs().max()) < 1e-5
    return fused


def test_fold_batch_norm_errors():
    with pytest.raises(TypeError, match="Linear or Conv"):
        bnn.fold_batch_norm(torch.nn.ReLU(), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="4 channels"):
        bnn.fold_batch_norm(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="track_running_stats"):
        bnn.fold_batch_norm(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(TypeError, match="bn must"):
        bnn.fold_batch_norm(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    no_var = torch.nn.BatchNorm1d(4).eval()
    no_var.running_var = None                              # by hand: only the variance gone
    with pytest.raises(ValueError, match="no running statistics"):
        bnn.fold_batch_norm(torch.nn.Linear(3, 4), no_var)
    with pytest.raises(ValueError, match="lazy layer not built yet"):
        bnn.fold_batch_norm(torch.nn.LazyConv2d(4, 3), torch.nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match=r"bn \(LazyBatchNorm2d\) is a lazy layer not built yet"):
        bnn.fold_batch_norm(torch.nn.Conv2d(3, 4, 3), torch.nn.LazyBatchNorm2d().eval())
    negative = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        negative.running_var[2] = -0.5                     # folded, it would give NaN weights
    with pytest.raises(ValueError, match="running_var must be >= 0 everywhere, got -0.5 at channel 2"):
        bnn.fold_batch_norm(torch.nn.Conv2d(3, 4, 3), negative)
    for module, bn in [(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm1d(4)), (torch.nn.Linear(3, 4), bnn.BatchNorm3d(4)),
                       (torch.nn.Conv1d(3, 4, 3), torch.nn.BatchNorm2d(4))]:     # pairs that cannot run in sequence
        with pytest.raises(ValueError, match=f"cannot follow {type(module).__name__}"):
            bnn.fold_batch_norm(module, bn.eval())
    bnn.fold_batch_norm(torch.nn.Conv3d(3, 4, 3), bnn.SyncBatchNorm(4).eval())   # SyncBatchNorm: any rank


def test_eps_zero_refused_with_batch_statistics_as_in_torch_allowed_in_evaluation():
    x = torch.randn(8, 4)
    for make in (torch.nn.BatchNorm1d, bnn.BatchNorm1d, bnn.SyncBatchNorm):
        with pytest.raises(ValueError, match="eps must be positive"):
            make(4, eps=0.0)(torch.randn(0, 4))                # an empty batch too, as torch
        layer = make(4, eps=0.0)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
            layer(x)
        if make is not torch.nn.BatchNorm1d:                   # bnlib: nothing changed (torch has counted the batch)
            assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
        assert torch.isfinite(layer.eval()(x)).all()           # evaluation with running statistics: fine
        with pytest.raises(ValueError, match="eps must be positive"):
            make(4, eps=0.0, track_running_stats=False).eval()(x)     # no buffers: batch statistics again


def test_eval_running_statistics_are_constants_as_in_torch():
    x = torch.randn(5, 3, dtype=torch.float64)
    for module in (torch.nn.BatchNorm1d(3).double().eval(), bnn.BatchNorm1d(3).double().eval()):
        def f(mean, module=module):
            y = torch.func.functional_call(module, {"running_mean": mean}, (x,))
            return (y ** 2).sum()
        mean = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            f(mean)                                                           # refused at the forward, as torch
        assert torch.func.jacfwd(f)(mean.detach()).abs().max() == 0          # forward mode: a zero tangent


def test_training_running_statistics_requiring_grad_are_refused_before_any_change():
    """torch raises in training too when a buffer it updates requires grad (and has already counted the batch
    then); bnlib raises at the forward with nothing changed. Under no_grad both train; an empty batch too."""
    x = torch.randn(5, 3)
    ours, theirs = bnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for layer in (ours, theirs):
        layer.running_var.requires_grad_(True)
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_var'"):
            layer(x)
    assert ours.num_batches_tracked == 0 and torch.equal(ours.running_var.detach(), torch.ones(3))
    for layer in (ours, theirs):
        with torch.no_grad():
            layer(x)
        layer(x[:0])
    torch.testing.assert_close(ours.running_var.detach(), theirs.running_var.detach())
    assert ours.num_batches_tracked == 2


def test_half_running_statistics_round_once_per_step():
    """Buffers in float16/bfloat16 (a module converted with .half()): each update is computed in float32 and
    rounded once. Rounded twice per step in the buffer's dtype (as before), a float16 running_var drifted to 6x
    torch's error over 300 steps at momentum 0.01; now the float16 buffers are torch's CPU ones bit for bit.
    torch's bfloat16 CPU path rounds otherwise (in the step below, twice): one step whose two roundings differ
    from one shows bnlib's rule, and torch's."""
    gen = torch.Generator().manual_seed(0)
    ours, theirs = bnn.BatchNorm1d(8, momentum=0.01).half(), torch.nn.BatchNorm1d(8, momentum=0.01).half()
    for _ in range(300):
        x = (torch.randn(64, 8, generator=gen, dtype=torch.float64) * 3 + 5).half()
        ours(x), theirs(x)
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.running_var, theirs.running_var)
    layer = bnn.BatchNorm1d(1, momentum=0.01).to(torch.bfloat16)
    with torch.no_grad():
        layer.running_mean.fill_(1.0)
    layer(torch.tensor([[2.0], [4.0]], dtype=torch.bfloat16))        # batch mean 3, exact in any arithmetic
    # 0.99 * 1 + 0.01 * 3 = 1.02: one rounding to bfloat16 gives 1.0234375; rounding 0.99 first (0.98828125)
    # and then the sum (1.01828125) gives 1.015625
    assert layer.running_mean.item() == 1.0234375
    torch_layer = torch.nn.BatchNorm1d(1, momentum=0.01).to(torch.bfloat16)
    with torch.no_grad():
        torch_layer.running_mean.fill_(1.0)
    torch_layer(torch.tensor([[2.0], [4.0]], dtype=torch.bfloat16))
    assert torch_layer.running_mean.item() == 1.015625                # torch: two roundings in this step


def test_torch_jit_script_is_refused_by_name():
    """TorchScript cannot compile NumPy or CuPy code: scripting a model that holds a bnlib layer names the layer
    (it failed inside the forward's wrapper, on 'python value of type tuple'); tracing is not affected."""
    for model in (bnn.BatchNorm2d(3), torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bnn.SyncBatchNorm(3))):
        with pytest.raises(TypeError, match="cannot be compiled by torch.jit.script"):
            torch.jit.script(model)


def _pruned(conv):
    import torch.nn.utils.prune
    torch.nn.utils.prune.l1_unstructured(conv, "weight", 0.5)
    return conv


def _bias_parametrized(conv):
    torch.nn.utils.parametrize.register_parametrization(conv, "bias", torch.nn.Identity())
    return conv


@pytest.mark.filterwarnings("ignore::FutureWarning")               # the older torch.nn.utils.weight_norm
@pytest.mark.parametrize("reparametrize", [
    torch.nn.utils.parametrizations.weight_norm, torch.nn.utils.parametrizations.spectral_norm,
    torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm, _pruned, _bias_parametrized])
def test_fold_batch_norm_refuses_a_training_bn_and_a_reparametrized_weight(reparametrize):
    """A BN in training mode normalizes with batch statistics (torch's fuse_conv_bn_eval refuses it too),
    and a weight_norm'ed, spectral_norm'ed or pruned weight (or a reparametrized bias) is recomputed at
    every call, so scaling a copy of it would be lost: both raise, and neither input changes."""
    conv, bn = torch.nn.Conv2d(4, 6, 1), bnn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="training mode"):
        bnn.fold_batch_norm(conv, bn)
    assert bn.training and all(torch.equal(v, bn.state_dict()[k]) for k, v in state.items())
    bn.eval()
    wrapped = reparametrize(torch.nn.Conv2d(4, 6, 1))
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(TypeError, match="is computed at every call"):
        bnn.fold_batch_norm(wrapped, bn)
    assert all(torch.equal(v, wrapped.state_dict()[k]) for k, v in before.items())
    fold_batch_norm_checked(conv, bn, (2, 4, 3, 3))                # the plain pair still folds


# ----------------------------------------------------------------------------- SyncBatchNorm

@pytest.mark.parametrize("splits, shape_tail", [([(4, 7), (1, 3)], ()), ([(1, 5, 3), (3, 3, 1)], (2, 2))])
def test_sync_batchnorm_equals_bn_on_the_concatenated_batch(splits, shape_tail):
    worst = bnn.sync_batchnorm_check(splits, shape_tail)
    assert max(worst) < 1e-12, worst


def test_sync_batchnorm_with_an_empty_rank_spawn_gloo():
    """3 gloo ranks started by torch.multiprocessing spawn, one with an empty batch in each split:
    nobody hangs, the others compute what BatchNorm on the concatenated batch computes, and every
    rank (the empty one too) ends with the global running statistics, as torch.nn.SyncBatchNorm."""
    worst = bnn.sync_batchnorm_check([(4, 0, 5), (0, 3, 2), (5, 4, 0)], shape_tail=(3,), start_method="spawn")
    assert max(worst) < 1e-12, worst


def test_sync_batchnorm_without_process_group_is_plain_bn():
    x = torch.randn(6, 3, 2)
    torch.testing.assert_close(bnn.SyncBatchNorm(3)(x), torch.nn.BatchNorm1d(3)(x))
    with pytest.raises(ValueError, match="at least 2D"):
        bnn.SyncBatchNorm(3)(torch.randn(3))
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), bnn.BatchNorm1d(3))
    converted = bnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], bnn.SyncBatchNorm) and isinstance(converted[2], bnn.SyncBatchNorm)


def test_convert_sync_batchnorm_takes_every_batch_norm_as_torchs_does():
    """As torch's converter: torch's SyncBatchNorm (which refuses CPU tensors) becomes bnlib's, and a
    bnlib SyncBatchNorm converted again takes the new process group; an unbuilt lazy layer stays."""
    group = object()                                   # stands for a process group: only stored here
    torch_sync, ours = torch.nn.SyncBatchNorm(3), bnn.SyncBatchNorm(3)
    lazy, bare_lazy = torch.nn.LazyBatchNorm1d(), torch.nn.LazyBatchNorm1d(affine=False, track_running_stats=False)
    model = torch.nn.Sequential(torch_sync, ours, lazy, bare_lazy)        # (the last has no parameters at all)
    converted = bnn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert type(converted[0]) is bnn.SyncBatchNorm and converted[0].weight is torch_sync.weight
    assert converted[0].process_group is group and converted[1].process_group is group
    assert converted[1].running_mean is ours.running_mean and converted[2] is lazy and converted[3] is bare_lazy
    assert converted[0](torch.randn(6, 3)).shape == (6, 3)        # CPU tensors: bnlib runs them


def test_in_place_change_of_the_input_is_detected_like_torch():
    x = torch.randn(8, 3, requires_grad=True)
    for layer in (torch.nn.BatchNorm1d(3), bnn.BatchNorm1d(3)):
        h = x * 1.0
        y = layer(h)
        h.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_sync_batchnorm_in_eval_without_running_stats_uses_the_local_batch():
    x = torch.randn(5, 3)
    layer = bnn.SyncBatchNorm(3, track_running_stats=False).eval()
    torch.testing.assert_close(layer(x), torch.nn.BatchNorm1d(3, track_running_stats=False).eval()(x))


# ----------------------------------------------------------------------------- torch's module semantics

def _legacy_state_dict(module, version):
    """module's state dict as torch wrote it before num_batches_tracked existed: no such key, and the
    layer's metadata version `version` (None: no metadata at all, as a hand-made dict)."""
    sd = module.state_dict()
    for key in [k for k in sd if k.endswith("num_batches_tracked")]:
        del sd[key]
    if version is None:
        return dict(sd)
    for meta in sd._metadata.values():
        meta["version"] = version
    return sd


@pytest.mark.parametrize("version", [1, None])
def test_legacy_state_dict_without_num_batches_tracked_loads_strictly_like_torch(version):
    source = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    source(torch.randn(4, 1, 5, 5))
    sd = _legacy_state_dict(source, version)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    ours = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), bnn.BatchNorm2d(3))
    with torch.no_grad():
        theirs[1].num_batches_tracked.fill_(7)
        ours[1].num_batches_tracked.fill_(7)
    theirs.load_state_dict(copy.deepcopy(sd), strict=True)
    result = ours.load_state_dict(copy.deepcopy(sd), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in theirs.state_dict().items():          # the count: the layer's own (7), as torch
        assert torch.equal(ours.state_dict()[key], value), key
    assert int(theirs[1].num_batches_tracked) == int(ours[1].num_batches_tracked) == 7   # kept, not reset to 0


@pytest.mark.parametrize("make", [lambda: bnn.BatchNorm2d(3), lambda: bnn.BatchNorm1d(3, affine=False),
                                  lambda: bnn.SyncBatchNorm(3), lambda: bnn.FrozenBatchNorm2d(3)])
@pytest.mark.parametrize("assign", [False, True])
def test_a_state_dict_load_that_raises_changes_nothing(make, assign):
    """torch's load_state_dict copies the entries that fit before it reports the one that does not (a layer
    would be left half loaded); bnlib's layers raise the same error and keep their tensors and values."""
    layer = make()
    tensors = dict([*layer.named_parameters(), *layer.named_buffers()])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = {k: (torch.full_like(v, 7.0) if v.is_floating_point() else v + 5) for k, v in before.items()}
    bad["running_var"] = torch.ones(4)                    # the wrong shape, among entries that fit
    with pytest.raises(RuntimeError, match="size mismatch for running_var"):
        layer.load_state_dict(bad, assign=assign)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert all(getattr(layer, name) is tensor for name, tensor in tensors.items())
    missing = {k: v for k, v in bad.items() if k != "running_var"}
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict(missing, assign=assign)     # strict: running_var missing, the rest would load
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    layer.load_state_dict({**missing, "running_var": torch.full((3,), 2.0)}, assign=assign)
    assert float(layer.running_var[0]) == 2.0 and float(layer.running_mean[0]) == 7.0


def test_a_failed_load_leaves_a_pending_backward_alone_like_torch():
    """Only what the failed load wrote is put back: a tensor it never touched keeps its version counter, so a
    backward through an earlier forward still runs (a copy into every tensor broke it)."""
    layer, x = bnn.BatchNorm1d(4), torch.randn(8, 4, requires_grad=True)
    y = layer(x)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict({"weight": torch.ones(5)})
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_legacy_state_dict_on_a_meta_layer_gets_a_zero_count_like_torch():
    source = torch.nn.BatchNorm1d(3)
    source(torch.randn(4, 3))
    sd = _legacy_state_dict(source, 1)
    theirs, ours = torch.nn.BatchNorm1d(3, device="meta"), bnn.BatchNorm1d(3, device="meta")
    theirs.load_state_dict(copy.deepcopy(sd), strict=True, assign=True)
    ours.load_state_dict(copy.deepcopy(sd), strict=True, assign=True)
    assert ours.num_batches_tracked.device.type == "cpu" and int(ours.num_batches_tracked) == 0
    assert int(theirs.num_batches_tracked) == 0


def test_version_2_state_dict_without_num_batches_tracked_is_still_missing_like_torch():
    sd = _legacy_state_dict(torch.nn.BatchNorm1d(3), 2)
    for layer in (torch.nn.BatchNorm1d(3), bnn.BatchNorm1d(3)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            layer.load_state_dict(copy.deepcopy(sd), strict=True)


@pytest.mark.parametrize("flag_after", [False, True])
@pytest.mark.parametrize("built_with", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_track_running_stats_changed_after_construction_like_torch(built_with, flag_after, momentum):
    """torch decides by the buffers, not the flag: in evaluation it normalizes with the running
    statistics whenever they exist, and in training it updates them only when the flag is set."""
    gen = torch.Generator().manual_seed(int(built_with) * 2 + int(flag_after))
    theirs = torch.nn.BatchNorm1d(3, momentum=momentum, track_running_stats=built_with).double()
    ours = bnn.BatchNorm1d(3, momentum=momentum, track_running_stats=built_with).double()
    if built_with:
        with torch.no_grad():
            theirs.running_mean.uniform_(-2, 2, generator=gen)
            theirs.running_var.uniform_(0.5, 3, generator=gen)
    ours.load_state_dict(theirs.state_dict())
    theirs.track_running_stats = ours.track_running_stats = flag_after
    for training in (True, False, True, False):
        theirs.train(training), ours.train(training)
        x = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        ya.sum().backward()
        yb.sum().backward()
        for name, want, got in _pairs(theirs, ours, ya, yb, xa, xb):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=lambda m: f"{training} {name}: {m}")
        theirs.weight.grad = theirs.bias.grad = ours.weight.grad = ours.bias.grad = None
    if built_with and not flag_after:                       # the case the flag alone decided wrongly
        assert int(ours.num_batches_tracked) == 0


def test_flag_off_with_buffers_evaluates_with_the_running_statistics():
    layer = bnn.BatchNorm1d(2).eval()
    with torch.no_grad():
        layer.running_mean.fill_(3.0)
        layer.running_var.fill_(4.0)
    layer.track_running_stats = False
    y = layer(torch.tensor([[5.0, 1.0], [7.0, 3.0]]))
    torch.testing.assert_close(y, torch.tensor([[1.0, -1.0], [2.0, 0.0]]), atol=1e-5, rtol=0)


@pytest.mark.usefixtures("cpu_backend")
def test_double_backward_matches_torch():
    """A gradient penalty, |dL/dx|^2, differentiated again: what torch's batch norm supports."""
    gen = torch.Generator().manual_seed(3)
    for dims, training, momentum in [(2, True, 0.1), (4, True, None), (3, False, 0.1)]:
        theirs = TORCH_BN[dims](3, momentum=momentum).double()
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5, generator=gen)
            theirs.bias.normal_(generator=gen)
            theirs.running_mean.normal_(generator=gen)
        ours = BNLIB_BN[dims](3, momentum=momentum).double()
        ours.load_state_dict(theirs.state_dict())
        theirs.train(training), ours.train(training)
        shape = (5, 3) + (2,) * (dims - 2)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        target = torch.randn(shape, generator=gen, dtype=torch.float64)
        results = []
        for m in (theirs, ours):
            xi = x.clone().requires_grad_()
            loss = ((m(xi) - target) ** 3).sum()
            gx, = torch.autograd.grad(loss, xi, create_graph=True)
            penalty = (gx ** 2).sum()
            penalty.backward()
            results.append([gx.detach(), xi.grad, m.weight.grad, m.bias.grad])
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)) or \
                torch.allclose(getattr(ours, name), getattr(theirs, name), atol=1e-12)


def test_gradgradcheck_of_the_functions():
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradgradcheck(lambda x, w, b: bnn.BatchNormFunction.apply(x, w, b, 1e-5)[0], (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: bnn.BatchNormInferenceFunction.apply(x, rm, rv, w, b, 1e-5),
                                        (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x: bnn.BatchNormFunction.apply(x, None, None, 1e-5)[0], (x,))


def test_double_backward_in_mixed_precision_keeps_dtypes():
    layer = bnn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2).to(torch.bfloat16).requires_grad_()
    gx, = torch.autograd.grad((layer(x).float() ** 2).sum(), x, create_graph=True)
    assert gx.dtype == torch.bfloat16 and gx.requires_grad
    (gx.float() ** 2).sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_sync_batchnorm_double_backward_raises_clearly():
    """Synchronized (here a one-process gloo group, calling the Function directly), the backward goes
    through an all_reduce, which autograd cannot differentiate: a second differentiation must raise, not
    silently drop terms."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
            w = torch.ones(3, dtype=torch.float64, requires_grad=True)
            y = bnn.SyncBatchNormFunction.apply(x, w, None, 1e-5, dist.group.WORLD, {})
            gx, = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
            with pytest.raises(RuntimeError, match="once_differentiable"):
                (gx ** 2).sum().backward()
        finally:
            dist.destroy_process_group()


def test_synchronized_layouts_are_torchs():
    """The synchronized Function (a one-process gloo group, called directly) gives y and dx the layouts
    of the plain layer and of torch: channels-last for channels-last input, C-contiguous otherwise (its
    torch arithmetic would keep a permuted input's strides), with the plain layer's values."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    base, dy = torch.randn(4, 3, 5, 2, dtype=torch.float64), torch.randn(4, 3, 5, 2, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            for name, x in tensor_layouts(base):
                xs, xp = x.detach().requires_grad_(), x.detach().requires_grad_()   # views, as given
                w = torch.rand(3, dtype=torch.float64) + 0.5
                ys = bnn.SyncBatchNormFunction.apply(xs, w, None, 1e-5, dist.group.WORLD, {})
                plain = bnn.BatchNorm2d(3, affine=False, track_running_stats=False).double()
                yp = plain(xp) * w.reshape(1, 3, 1, 1)
                (dxs,), (dxp,) = torch.autograd.grad(ys, xs, dy), torch.autograd.grad(yp, xp, dy)  # as returned
                torch.testing.assert_close(ys, yp)
                torch.testing.assert_close(dxs, dxp)
                xt = x.detach().requires_grad_()
                yt = torch.nn.BatchNorm2d(3).double()(xt)
                dxt, = torch.autograd.grad(yt, xt, dy)
                assert strides_that_matter(ys) == strides_that_matter(yt), name
                assert strides_that_matter(dxs) == strides_that_matter(dxt), name
        finally:
            dist.destroy_process_group()


def test_batchnorm_types_select_both_libraries_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), bnn.BatchNorm2d(4),
                                bnn.SyncBatchNorm(4), torch.nn.Linear(4, 2), torch.nn.LayerNorm(2))
    found = [i for i, m in enumerate(model) if isinstance(m, bnn.BATCHNORM_TYPES)]
    assert found == [1, 2, 3]
    assert not isinstance(model[2], torch.nn.modules.batchnorm._BatchNorm)     # the documented limitation


# ----------------------------------------------------------------------------- mixed precision

HALF_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}      # about one unit in the last place


def _pairs(theirs, ours, ya, yb, xa, xb):
    """(name, torch's, bnlib's) for output, input gradient, parameter gradients and buffers."""
    out = [("output", ya, yb), ("input gradient", xa.grad, xb.grad)]
    for name in ("weight", "bias"):
        if getattr(theirs, name) is not None:
            out.append((f"{name} gradient", getattr(theirs, name).grad, getattr(ours, name).grad))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(theirs, name) is not None:
            out.append((name, getattr(theirs, name), getattr(ours, name)))
    return out


@pytest.mark.parametrize("dims", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_parameters_matches_torch(dtype, dims):
    """What autocast produces: half input, float32 weight, bias and buffers, as torch.nn.BatchNorm*d."""
    gen = torch.Generator().manual_seed(dims)
    C = 3
    theirs = TORCH_BN[dims](C, momentum=None if dims == 3 else 0.1)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5, generator=gen)
        theirs.bias.normal_(generator=gen)
    ours = BNLIB_BN[dims](C, momentum=theirs.momentum)
    ours.load_state_dict(theirs.state_dict())
    shape = (6, C) + (3,) * (dims - 2)
    tol = HALF_TOL[dtype]
    for step in range(4):
        if step == 3:
            theirs.eval(), ours.eval()
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        dy = torch.randn(shape, generator=gen).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert yb.dtype == xb.grad.dtype == dtype
        assert ours.weight.grad.dtype == ours.bias.grad.dtype == ours.running_mean.dtype == torch.float32
        assert ours.running_var.dtype == torch.float32
        for name, want, got in _pairs(theirs, ours, ya, yb, xa, xb):
            t = tol if got.dtype == dtype else 1e-5
            torch.testing.assert_close(got, want, atol=t, rtol=t, msg=lambda m: f"{name}: {m}")
        for m in (theirs, ours):
            m.weight.grad = m.bias.grad = None


@pytest.mark.parametrize("split", ["float32 parameters, half buffers", "half parameters, float32 buffers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_takes_parameters_and_buffers_of_different_dtypes(dtype, split):
    """Chapter 06's one leniency beyond torch: with half input, the parameters and the buffers may each be float32 or
    the input's dtype (torch 2.13's CPU kernel refuses both mixes). The result is torch's on the layer with every
    tensor float32, rounded as the dtypes ask; the buffers keep their dtypes."""
    gen = torch.Generator().manual_seed(5)
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5, generator=gen)
        reference.bias.normal_(generator=gen)
    ours = bnn.BatchNorm2d(3)
    ours.load_state_dict(reference.state_dict())
    half_params = split.startswith("half")
    for name in ("weight", "bias") if half_params else ("running_mean", "running_var"):
        getattr(ours, name).data = getattr(ours, name).data.to(dtype)
    x = (torch.randn(6, 3, 4, 4, generator=gen) * 2 + 1).to(dtype)
    if half_params:                      # the reference sees the parameters as rounded to the input's dtype
        with torch.no_grad():
            reference.weight.copy_(reference.weight.to(dtype).float())
            reference.bias.copy_(reference.bias.to(dtype).float())
    tol = 2 * HALF_TOL[dtype]
    for training in (True, False):
        reference.train(training), ours.train(training)
        want, got = reference(x.float()), ours(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.to(dtype).float(), atol=tol, rtol=tol)
        for name in ("running_mean", "running_var"):
            assert getattr(ours, name).dtype == (torch.float32 if half_params else dtype), name
            torch.testing.assert_close(getattr(ours, name).float(), getattr(reference, name), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_half_parameters_matches_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    theirs = torch.nn.BatchNorm2d(4).to(dtype)
    ours = bnn.BatchNorm2d(4).to(dtype)
    x = (torch.randn(5, 4, 3, 3, generator=gen) * 2 - 1).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    ya.backward(dy)
    yb.backward(dy)
    tol = 2 * HALF_TOL[dtype]
    for name, want, got in _pairs(theirs, ours, ya, yb, xa, xb):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=tol * (10 if "gradient" in name else 1), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_input_gives_channels_last_output_like_torch(dtype):
    theirs, ours = torch.nn.BatchNorm2d(5), bnn.BatchNorm2d(5)
    x = torch.randn(4, 5, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 5, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        ya.backward(dy)
        yb.backward(dy)
        tol = HALF_TOL.get(dtype, 1e-5)
        torch.testing.assert_close(yb, ya, atol=tol, rtol=tol)
        torch.testing.assert_close(xb.grad, xa.grad, atol=tol, rtol=tol)
        assert yb.is_contiguous(memory_format=torch.channels_last) == ya.is_contiguous(memory_format=torch.channels_last)
        assert xb.grad.is_contiguous(memory_format=torch.channels_last) == \
            xa.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("dims", [2, 3, 4, 5])
def test_output_and_gradient_layouts_are_torchs(dims):
    """y and dx have the strides torch's layer gives them, for every input layout: channels-last
    stays channels-last, and anything else comes back C-contiguous. A permuted input used to give a
    permuted y (NumPy keeps strides), on which a following .view() fails, as it does not after torch."""
    check_layouts_like_torch(lambda: BNLIB_BN[dims](3), lambda: TORCH_BN[dims](3), (4, 3, 5, 2, 3)[:dims])


def _digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y)


def _small_cnn():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        torch.nn.Linear(32, 10))


def _train_losses(model, images, targets, steps, autocast_dtype=None, device="cpu"):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=gen)
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def test_cnn_trains_under_cpu_autocast_bfloat16_like_torch():
    """A CNN with bnlib layers under torch.autocast("cpu", bfloat16) tracks the same CNN with torch's
    layers: their loss gap is no larger than what bfloat16 itself does to torch's run (vs float32)."""
    pytest.importorskip("sklearn")
    torch.set_num_threads(1)
    images, targets = _digits()
    torch_model = _small_cnn()
    bnlib_model = bnn.convert_batchnorm(copy.deepcopy(torch_model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch_model[0](images[:4])
        assert h.dtype == torch.bfloat16 and bnlib_model[1](h).dtype == torch.bfloat16
    steps = 100
    loss_torch = _train_losses(torch_model, images, targets, steps, torch.bfloat16)
    loss_bnlib = _train_losses(bnlib_model, images, targets, steps, torch.bfloat16)
    loss_fp32 = _train_losses(_small_cnn(), images, targets, steps)
    gap = np.abs(loss_bnlib - loss_torch)
    bf16_effect = np.abs(loss_torch - loss_fp32)
    assert loss_bnlib[-10:].mean() < 0.1 * loss_bnlib[0]            # it trains
    assert gap.max() < 0.05, gap.max()
    assert gap.mean() < 2 * bf16_effect.mean(), (gap.mean(), bf16_effect.mean())
    for m in bnlib_model.modules():
        if isinstance(m, bnn._BatchNorm):
            assert m.running_mean.dtype == m.weight.dtype == torch.float32


# The torch-level kernels chapter 05 adds to bnlib.cuda (forward_torch, backward_torch, inference_torch),
# written here in torch with the contract bnlib.nn relies on, to test bnlib.nn's side of it on the CPU.
def _contract_forward(x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1,
                      num_batches_tracked=None):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert all(p is None or p.dtype in (acc, x.dtype) for p in (weight, bias)), "weight/bias: None, acc or x's dtype"
    assert all(t is None or (t.dtype == acc and t.is_contiguous()) for t in (running_mean, running_var))
    weight, bias = (None if p is None else p.to(acc) for p in (weight, bias))
    axes, shape = [0] + list(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    xc = x.to(acc)
    mean, var = xc.mean(axes), xc.var(axes, unbiased=False)
    inv_std = torch.rsqrt(var + eps)
    y = (xc - mean.reshape(shape)) * inv_std.reshape(shape)
    y = y if weight is None else y * weight.reshape(shape)
    y = y if bias is None else y + bias.reshape(shape)
    if running_mean is not None:                # the update the kernels make in the same launches
        with torch.no_grad():
            num_batches_tracked.add_(1)
            f = 1.0 / int(num_batches_tracked) if momentum is None else momentum
            count = x.numel() // x.shape[1]
            running_mean.mul_(1 - f).add_(mean, alpha=f)
            running_var.mul_(1 - f).add_(var * (count / (count - 1)), alpha=f)
    return y.to(x.dtype), mean, var, inv_std


def _contract_backward(dy, x, mean, inv_std, weight):
    acc = mean.dtype
    assert weight is None or weight.dtype in (acc, x.dtype), "weight: None, acc or x's dtype"
    weight = None if weight is None else weight.to(acc)
    axes, shape = [0] + list(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x.to(acc) - mean.reshape(shape)) * inv_std.reshape(shape)
    g = dy.to(acc)
    dbias, dweight = g.sum(axes), (g * x_hat).sum(axes)
    scale = inv_std if weight is None else inv_std * weight
    count = x.numel() // x.shape[1]
    dx = scale.reshape(shape) * (g - (dbias / count).reshape(shape) - x_hat * (dweight / count).reshape(shape))
    return dx.to(x.dtype), dweight, dbias


def _contract_inference(x, running_mean, running_var, weight, bias, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert all(t is None or t.dtype in (acc, x.dtype) for t in (running_mean, running_var, weight, bias))
    mean, scale, shift = bnn._inference_coefficients(running_mean, running_var, weight, bias, eps, acc, x.dim())
    y = (x.to(acc) - mean) * scale                                   # centred first, as the kernels
    return (y if shift is None else y + shift).to(x.dtype)


def _use_kernel_contract(monkeypatch, wrap=lambda fn: fn):
    """Route bnlib.nn's CUDA branch (chapter 05's torch-level kernels) to the contract above, on the CPU."""
    from bnlib import cuda
    monkeypatch.setattr(bnn, "_torch_kernels", lambda x: True)
    for name, fn in [("forward_torch", _contract_forward), ("backward_torch", _contract_backward),
                     ("inference_torch", _contract_inference)]:
        monkeypatch.setattr(cuda, name, wrap(fn), raising=False)


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_level_kernel_hooks_are_used_with_their_contract(monkeypatch, dtype, param_dtype, momentum):
    """bnlib.nn's side of bnlib.cuda.forward_torch/backward_torch/inference_torch, exercised on the CPU
    with reference implementations of the contract (the real kernels need a GPU: -k cuda). The
    running statistics go to forward_torch when they have the compute dtype (updated there once,
    not again by the module), and are updated by the module otherwise (float16 buffers)."""
    calls, fused = [], []

    def spy(fn):
        def call(*a, **k):
            calls.append(fn.__name__)
            fused.append(len(a) > 4 or "running_mean" in k)   # positionally, as bnlib.nn passes them
            return fn(*a, **k)
        return call
    _use_kernel_contract(monkeypatch, spy)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum).to(param_dtype)
    ours = bnn.BatchNorm2d(3, momentum=momentum).to(param_dtype)
    gen = torch.Generator().manual_seed(1)
    tol = HALF_TOL.get(dtype, 1e-10 if dtype == torch.float64 else 1e-5)
    for step in range(3):
        if step == 2:
            theirs.eval(), ours.eval()
        x = (torch.randn(4, 3, 3, 3, generator=gen) * 2 + 1).to(dtype)
        dy = torch.randn(x.shape, generator=gen).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        ya.backward(dy)
        yb.backward(dy)
        for name, want, got in _pairs(theirs, ours, ya, yb, xa, xb):
            assert got.dtype == want.dtype, name
            t = tol if got.dtype in HALF_TOL else max(tol, 1e-5 if got.dtype == torch.float32 else 0)
            torch.testing.assert_close(got, want, atol=t * 10, rtol=t, msg=lambda m: f"{name}: {m}")
        theirs.weight.grad = theirs.bias.grad = ours.weight.grad = ours.bias.grad = None
    assert calls == ["_contract_forward", "_contract_backward"] * 2 + ["_contract_inference"]
    assert fused[0] == fused[2] == (param_dtype != torch.float16)


# ----------------------------------------------------------------------------- empty batches

@pytest.mark.parametrize("dims", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
def test_empty_batch_like_torch(dims, momentum, affine, track):
    """A zero-size batch in training and evaluation: empty output, zero parameter gradients,
    num_batches_tracked counts it, running statistics kept; the next batch then matches too."""
    C = 3
    theirs = TORCH_BN[dims](C, momentum=momentum, affine=affine, track_running_stats=track).double()
    ours = BNLIB_BN[dims](C, momentum=momentum, affine=affine, track_running_stats=track).double()
    full = (5, C) + (2,) * (dims - 2)
    empties = [(0,) + full[1:]] + ([full[:2] + (0,) + full[3:]] if dims > 2 else [])
    batches = [full] + empties + [full] + empties
    gen = torch.Generator().manual_seed(0)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        for shape in batches:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = theirs(xa), ours(xb)
            assert yb.shape == x.shape and yb.dtype == x.dtype
            ya.sum().backward()
            yb.sum().backward()
            for name, want, got in _pairs(theirs, ours, ya, yb, xa, xb):
                torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=lambda m: f"{shape} {name}: {m}")
            for m in (theirs, ours):
                if affine:
                    m.weight.grad = m.bias.grad = None


def test_empty_batch_in_mixed_precision_keeps_dtypes():
    layer = bnn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and layer.weight.grad.dtype == torch.float32
    assert int(layer.num_batches_tracked) == 1 and torch.equal(layer.running_var, torch.ones(3))


# ----------------------------------------------------------------------------- no hidden host reads

def _host_reads(fn):
    """How many times fn reads a tensor value back to the host (aten._local_scalar_dense: .item(),
    int(t), bool(t)); on a GPU each is a synchronisation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("momentum, expected", [(0.1, 0), (None, 1)])
def test_running_stat_update_reads_the_step_count_only_for_momentum_none(momentum, expected):
    layer = bnn.BatchNorm2d(3, momentum=momentum)
    x = torch.randn(4, 3, 2, 2)
    assert _host_reads(lambda: layer(x)) == expected          # torch reads it for momentum=None too
    layer.eval()
    assert _host_reads(lambda: layer(x)) == 0


# ----------------------------------------------------------------------------- PyTorch's ModuleInfo samples

def _module_samples(name, dtype, training):
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (see requirements.txt)")
    from torch.testing._internal.common_modules import module_db
    info = next(m for m in module_db if m.name == f"nn.{name}")
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_pytorch_module_info_samples(name, dtype, training):
    """Every sample PyTorch's own test suite feeds torch.nn.BatchNorm*d (module_db), through bnlib.nn:
    outputs, input and parameter gradients, and buffers after the call."""
    samples = _module_samples(name, dtype, training)
    assert samples
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    gen = torch.Generator().manual_seed(0)
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        theirs = getattr(torch.nn, name)(*args, **kwargs).to(dtype)
        ours = getattr(bnn, name)(*args, **kwargs).to(dtype)
        if theirs.weight is not None:
            with torch.no_grad():
                theirs.weight.uniform_(0.5, 1.5, generator=gen)
        if theirs.bias is not None:
            with torch.no_grad():
                theirs.bias.normal_(generator=gen)
        if theirs.running_var is not None:
            with torch.no_grad():
                theirs.running_mean.normal_(generator=gen)
                theirs.running_var.uniform_(0.5, 2.0, generator=gen)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.train(training), ours.train(training)
        (x,), fkwargs = sample.forward_input.args, sample.forward_input.kwargs
        xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        ya, yb = theirs(xa, **fkwargs), ours(xb, **fkwargs)
        dy = torch.randn(ya.shape, generator=gen, dtype=dtype)
        ya.backward(dy)
        yb.backward(dy)
        for what, want, got in _pairs(theirs, ours, ya, yb, xa, xb):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol,
                                       msg=lambda m: f"{name}{args}{kwargs} on {tuple(x.shape)}, {what}: {m}")


# ----------------------------------------------------------------------------- SyncBatchNorm, all ranks empty

def _all_empty_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        sync = bnn.SyncBatchNorm(2)
        x = torch.randn(0, 2, 3, requires_grad=True)
        sync(x).sum().backward()
        result = (int(sync.num_batches_tracked), sync.running_mean.tolist(), sync.running_var.tolist())
        try:
            sync(torch.randn(1 - rank, 2))                  # one value per channel over both ranks
            result += ("no error",)
        except ValueError as err:
            result += (str(err),)
        # mixed precision across processes: bfloat16 input, float32 parameters and buffers
        gen = torch.Generator().manual_seed(3)
        xs = [(torch.randn(n, 2, 3, generator=gen) * 2 + 1).to(torch.bfloat16) for n in (3, 5)]
        ref = torch.nn.BatchNorm1d(2)
        ref.load_state_dict(sync.state_dict())
        y_ref, y = ref(torch.cat(xs)), sync(xs[rank])
        lo, hi = (0, 3) if rank == 0 else (3, 8)
        assert y.dtype == torch.bfloat16 and sync.running_var.dtype == torch.float32
        result += (float((y.float() - y_ref[lo:hi].float()).abs().max()),
                   float((sync.running_var - ref.running_var).abs().max()))
    except Exception as err:
        result = repr(err)
    finally:
        torch.distributed.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_sync_batchnorm_all_ranks_empty_one_value_and_bfloat16_gloo():
    # forked, as the other gloo tests on a machine without CUDA (nothing to re-import; spawn took 15.3 s in a
    # clean-clone CI run of 25fcc91): test_sync_batchnorm_with_an_empty_rank_spawn_gloo covers spawn
    reports = _run_processes(_all_empty_worker, 2, "spawn" if torch.cuda.is_available() else "fork")
    for report in reports:
        steps, mean, var, error, y_gap, var_gap = report
        assert steps == 1 and mean == [0.0, 0.0] and var == [1.0, 1.0]
        assert "more than 1 value per channel" in error
        assert y_gap <= 2 * HALF_TOL[torch.bfloat16] * 4 and var_gap < 1e-5, (y_gap, var_gap)


# ----------------------------------------------------------------------------- SyncBatchNorm: the GPU path's arithmetic

SYNC_C = 3


def _sync_case(sizes, dtype, shape_tail, seed):
    """One global batch, built the same on every process: per-process inputs and output gradients (CPU
    tensors of `dtype`), and a BN state dict with non-trivial weight and bias, its floating-point entries
    in the parameters' dtype (float32 for 16-bit input, as autocast keeps them)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn((n, SYNC_C) + tuple(shape_tail), generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
          for n in sizes]
    dys = [torch.randn((n, SYNC_C) + tuple(shape_tail), generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    layer = torch.nn.BatchNorm1d(SYNC_C, momentum=None)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.normal_(generator=gen)
    state = {k: v.to(param_dtype) if v.is_floating_point() else v for k, v in layer.state_dict().items()}
    return xs, dys, state


def _sync_steps(layer, x, dy, steps=2):
    """`steps` training steps of `layer` on the same (x, dy): per step, what it computed, on the CPU
    (None for a gradient that autograd left at None: an empty process)."""
    out = []
    for _ in range(steps):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        cpu = lambda t: None if t is None else t.detach().cpu()         # noqa: E731
        out.append({"output": cpu(y), "input gradient": cpu(xi.grad),
                    "weight gradient": cpu(layer.weight.grad), "bias gradient": cpu(layer.bias.grad),
                    "running_mean": cpu(layer.running_mean), "running_var": cpu(layer.running_var),
                    "num_batches_tracked": cpu(layer.num_batches_tracked)})
        layer.weight.grad = layer.bias.grad = None
    return out


# (dtype, per-process batch sizes, spatial shape after (N, C)); 4-D cases are channels-last
SYNC_CUDA_RULE_CASES = [(torch.float32, (3, 5), (4,)), (torch.float32, (4, 0), (2, 3)),
                        (torch.bfloat16, (3, 5), (2, 3)), (torch.float16, (2, 6), (4,))]


def _cuda_rule_worker(rank, init_file, out_dir):
    """Process `rank` of 2 gloo processes: SyncBatchNorm on CPU tensors with the dtype rule of its CUDA path
    (float32 statistics and arithmetic for float32 and 16-bit input), every collective's tensor recorded."""
    dist = torch.distributed
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    _report(rank, out_dir, lambda: _cuda_rule_steps(rank))


def _cuda_rule_steps(rank):
    """_cuda_rule_worker's work: per case, what SyncBatchNorm computed; the collectives' tensors; the
    one-value error and whether the state stayed as it was."""
    dist = torch.distributed
    bnn._sync_dtype = bnn._compute_dtype           # the CUDA rule, in this process only (spawned or forked)
    seen = []
    for name in ("all_gather", "all_reduce"):
        original = getattr(dist, name)

        def record(*args, _original=original, _name=name, **kwargs):
            sent = args[1] if _name == "all_gather" else args[0]
            seen.append((_name, sent.dtype, tuple(sent.shape), sent.device.type, sent.is_contiguous()))
            return _original(*args, **kwargs)
        setattr(dist, name, record)
    results = []
    for k, (dtype, sizes, tail) in enumerate(SYNC_CUDA_RULE_CASES):
        xs, dys, state = _sync_case(sizes, dtype, tail, seed=k)
        layer = bnn.SyncBatchNorm(SYNC_C, momentum=None, dtype=state["weight"].dtype)
        layer.load_state_dict(state)
        x, dy = xs[rank], dys[rank]
        if x.dim() == 4:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        results.append(_sync_steps(layer, x, dy))
    # one value per channel over both processes: both raise, and neither changes its state
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        layer(torch.randn(1 - rank, SYNC_C, dtype=torch.float32))
        error = "no error"
    except ValueError as err:
        error = str(err)
    unchanged = all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    return results, seen, error, unchanged


def _report(rank, out_dir, work):
    """Run work() in process `rank`, destroy the process group, and save what work returned, or the error
    with its traceback, where the test reads it: a failing process reports its reason."""
    try:
        result = work()
    except Exception as err:
        import traceback
        result = f"process {rank}: {err!r}\n{traceback.format_exc()}"
    finally:
        torch.distributed.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run_processes(worker, nprocs, start_method, timeout=180):
    """Start `nprocs` processes of worker(rank, init_file, out_dir); their reports, in rank order."""
    import torch.multiprocessing as tmp_mp
    with tempfile.TemporaryDirectory() as tmp:
        context = tmp_mp.start_processes(worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=nprocs,
                                         join=False, start_method=start_method)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while not context.join(timeout=1):
            if datetime.datetime.now() > deadline:
                for p in context.processes:
                    p.kill()
                pytest.fail(f"{worker.__name__}: processes did not finish in {timeout} s")
        reports = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]
    for report in reports:
        assert not isinstance(report, str), report
    return reports


def _reference_steps(case, sizes, steps=2):
    """torch.nn.BatchNorm on the concatenated batch of `case` (CPU, the case's dtypes), `steps` steps."""
    xs, dys, state = case
    x, dy = torch.cat(xs), torch.cat(dys)
    reference = TORCH_BN[x.dim()](SYNC_C, momentum=None).to(state["weight"].dtype)
    reference.load_state_dict(state)
    return _sync_steps(reference, x, dy, steps)


def _assert_close_to_slice(ours, full, rank, sizes, tol, param_tol, what):
    """bnlib's per-process results against a single-process run on the concatenated batch: outputs and
    input gradients on this process's slice, parameter gradients summed over processes elsewhere."""
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for name in ("output", "input gradient"):
        if sizes[rank]:
            torch.testing.assert_close(ours[name], full[name][lo:hi], atol=tol, rtol=tol,
                                       msg=lambda m: f"{what}, {name}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(ours[name], full[name], atol=param_tol, rtol=param_tol,
                                   msg=lambda m: f"{what}, {name}: {m}")


def test_sync_batchnorm_float32_arithmetic_of_the_gpu_path_gloo():
    """The CUDA path's arithmetic, run on CPU tensors over gloo: 2 processes compute their statistics in
    float32 (16-bit input included), as SyncBatchNorm does on CUDA tensors, and match torch.nn.BatchNorm
    on the concatenated batch to float32 (or 16-bit) round-off: outputs, input gradients, summed parameter
    gradients, running statistics, channels-last input and an empty process included. Every collective
    sends a contiguous float64 tensor on the input's device, (3, C) gathered, (2, C) reduced (what NCCL
    needs on a GPU); one value per channel over both processes raises on both and changes no state."""
    start = "spawn" if torch.cuda.is_available() else "fork"
    reports = _run_processes(_cuda_rule_worker, 2, start)
    for k, (dtype, sizes, tail) in enumerate(SYNC_CUDA_RULE_CASES):
        full = _reference_steps(_sync_case(sizes, dtype, tail, seed=k), sizes)
        tol = 2 * HALF_TOL[dtype] if dtype in HALF_TOL else 1e-5
        for step, want in enumerate(full):
            what = f"{dtype}, batches {sizes}, step {step + 1}"
            for rank, (results, *_) in enumerate(reports):
                assert results[k][step]["output"].dtype == dtype
                _assert_close_to_slice(results[k][step], want, rank, sizes, tol, 1e-5, what)
            for name in ("weight gradient", "bias gradient"):
                summed = sum(r[0][k][step][name] for r in reports if r[0][k][step][name] is not None)
                torch.testing.assert_close(summed, want[name], atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{what}, {name}: {m}")
    for results, seen, error, unchanged in reports:
        assert {(name, shape) for name, _, shape, _, _ in seen} == {("all_gather", (3, SYNC_C)),
                                                                     ("all_reduce", (2, SYNC_C))}
        assert all(dtype == torch.float64 and device == "cpu" and contiguous
                   for _, dtype, _, device, contiguous in seen), seen
        assert "more than 1 value per channel" in error and unchanged, (error, unchanged)


def test_sync_batchnorm_with_one_process_or_none_is_plain_bn_and_never_synchronizes(monkeypatch):
    """No process group, then a one-process gloo group: SyncBatchNorm takes plain BatchNorm's path
    (on CUDA tensors, chapter 05's kernels) and never calls SyncBatchNormFunction, as torch falls back."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")

    def no_sync(*args):
        raise AssertionError("SyncBatchNormFunction called without a group of 2 or more processes")
    monkeypatch.setattr(bnn.SyncBatchNormFunction, "apply", no_sync)

    def compare():
        x = torch.randn(6, 3, 4, dtype=torch.float64)
        sync, plain = bnn.SyncBatchNorm(3).double(), bnn.BatchNorm1d(3).double()
        torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(sync, name), getattr(plain, name), rtol=0, atol=0)
    compare()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            compare()
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- CUDA (run with -k cuda on a GPU)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("BNLIB_REQUIRE_GPU") != "1",
                               reason="needs a CUDA GPU; set BNLIB_REQUIRE_GPU=1 to make this a failure")


def _cuda_pair(cls_t, cls_b, C, dtype=torch.float32):
    assert torch.cuda.is_available(), "BNLIB_REQUIRE_GPU=1 but torch sees no CUDA GPU"
    gen = torch.Generator().manual_seed(0)
    theirs = cls_t(C)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5, generator=gen)
        theirs.bias.normal_(generator=gen)
    ours = cls_b(C)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to("cuda", dtype), ours.to("cuda", dtype)


def _compare_step(theirs, ours, x, dy, tol, param_tol=1e-4, keep_grads=False):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    ya.backward(dy)
    yb.backward(dy)
    assert yb.dtype == x.dtype and xb.grad.dtype == x.dtype
    for name, want, got in _pairs(theirs, ours, ya, yb, xa, xb):
        assert got.dtype == want.dtype and got.device == want.device, name
        if param_tol is None and name in ("weight gradient", "bias gradient"):
            continue                                # the caller checks these against a float64 reference
        t = tol if got.dtype == x.dtype else param_tol
        torch.testing.assert_close(got, want, atol=t, rtol=t, msg=lambda m: f"{name}: {m}")
    if not keep_grads:
        for m in (theirs, ours):
            m.weight.grad = m.bias.grad = None
    return yb, xb.grad


@needs_gpu
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_graph_replays_a_training_step_as_eager_runs_it(monkeypatch, momentum):
    """A training step with bnlib.nn captured in a CUDA graph (torch.cuda.graph, after a warm-up on a side stream,
    as torch's documentation does it), replayed on three new batches copied into the captured input, gives what
    the same step run eagerly gives: outputs, input and parameter gradients, running statistics and the batch
    count (momentum=None reads it on the GPU). A replay repeats the kernel launches with almost no host work
    (one graph launch)."""
    assert torch.cuda.is_available(), "BNLIB_REQUIRE_GPU=1 but torch sees no CUDA GPU"
    # the same convolution arithmetic in the graph and eagerly: no TF32, one deterministic algorithm
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bnn.BatchNorm2d(8, momentum=momentum),
                                torch.nn.ReLU()).cuda()
    eager = copy.deepcopy(model)
    batches = [torch.randn(16, 3, 10, 10, device="cuda") for _ in range(3)]
    static_x = batches[0].clone().requires_grad_()

    def step(m, x):
        y = m(x)
        y.square().sum().backward()
        return y

    warm = copy.deepcopy(model)                         # compiles the kernels and readies this thread and autograd's
    side = torch.cuda.Stream()                          # device thread for launches, outside the capture (the
    #                                                     capture's scratch buffers are its own: _workspace)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(warm, batches[0].clone().requires_grad_())
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(model, static_x)
    for x in batches:
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        xe = x.clone().requires_grad_()
        ye = step(eager, xe)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(static_x.grad, xe.grad, rtol=1e-4, atol=1e-4)
        for (name, got), want in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-3, msg=lambda m: f"{name}: {m}")
        bn, bn_eager = model[1], eager[1]
        torch.testing.assert_close(bn.running_mean, bn_eager.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, bn_eager.running_var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == int(bn_eager.num_batches_tracked)
    assert int(model[1].num_batches_tracked) == 3


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_half_and_full_precision_train_and_eval_match_torch(dtype):
    theirs, ours = _cuda_pair(torch.nn.BatchNorm2d, bnn.BatchNorm2d, 8,
                              dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    tol = HALF_TOL.get(dtype, 1e-10 if dtype == torch.float64 else 1e-4)
    half = dtype in HALF_TOL
    # For half input the float32 parameter gradients are held to a float64 reference run on the same
    # rounded values, not to torch: on an H200 (torch 2.11) torch's own bfloat16 dweight was off from
    # float64 by up to 5e-3 relative, and its float16 eval-mode dweight by 6e-4, while bnlib's stayed
    # within 2e-7. Outputs, input gradients and buffers are still compared with torch's.
    ref = copy.deepcopy(theirs).double() if half else None
    for step in range(3):
        if step == 2:
            for m in (theirs, ours) + ((ref,) if half else ()):
                m.eval()
        x = (torch.randn(16, 8, 7, 7, device="cuda") * 3 + 1).to(dtype)
        dy = torch.randn(16, 8, 7, 7, device="cuda").to(dtype)
        _compare_step(theirs, ours, x, dy, tol, param_tol=None if half else 1e-4, keep_grads=True)
        if half:                                    # one forward per step each, so the buffers stay in step
            ref(x.double().requires_grad_()).backward(dy.double())
            for name in ("weight", "bias"):
                want, got = getattr(ref, name).grad, getattr(ours, name).grad.double()
                rel = ((got - want).abs().max() / want.abs().max()).item()
                assert rel < 1e-5, (name, step, rel)
        for m in (theirs, ours) + ((ref,) if half else ()):
            m.weight.grad = m.bias.grad = None


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_channels_last_keeps_layout_and_matches_torch(dtype):
    theirs, ours = _cuda_pair(torch.nn.BatchNorm2d, bnn.BatchNorm2d, 32)
    x = (torch.randn(8, 32, 9, 9, device="cuda") * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(8, 32, 9, 9, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    half = dtype in HALF_TOL
    reference = copy.deepcopy(theirs).double() if half else None      # before the step: the same parameters
    y, dx = _compare_step(theirs, ours, x, dy, HALF_TOL.get(dtype, 1e-4), param_tol=None if half else 1e-4,
                          keep_grads=half)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    if half:   # 16-bit input: the float32 parameter gradients against float64 on the same rounded values, as
        # test_cuda_half_and_full_precision_train_and_eval_match_torch does (torch's own are less accurate there)
        want = torch.autograd.grad(reference(x.double()), (reference.weight, reference.bias), dy.double())
        for name, w, got in zip(("weight", "bias"), want, (ours.weight.grad, ours.bias.grad)):
            rel = ((got.double() - w).abs().max() / w.abs().max()).item()
            assert rel < 1e-5, (name, rel)


def test_suggested_memory_format_is_the_layout_torchs_layers_give():
    """bnlib.cuda.suggested_memory_format, a port of torch's C++ rule, against what torch's BatchNorm2d/3d
    really return, on 400 random strided 4-D and 5-D tensors: permuted, sliced with steps, some made
    channels-last, sizes of 1 included (where the rule has its ambiguous cases)."""
    from bnlib import cuda
    rng = np.random.default_rng(12)
    for _ in range(400):
        dims = int(rng.integers(4, 6))
        shape = [int(rng.integers(1, 4)) for _ in range(dims)]
        x = torch.randn([2 * n for n in shape]).permute(*[int(d) for d in rng.permutation(dims)])
        x = x[tuple(slice(0, None, int(rng.integers(1, 3))) for _ in range(dims))]
        x = x[tuple(slice(0, n) for n in shape)]
        if rng.random() < 0.2:
            x = x.contiguous(memory_format=torch.channels_last if dims == 4 else torch.channels_last_3d)
        y = TORCH_BN[dims](x.shape[1]).eval()(x)
        assert y.is_contiguous(memory_format=cuda.suggested_memory_format(x)), (tuple(x.shape), x.stride(), y.stride())


@needs_gpu
@pytest.mark.parametrize("dims", [2, 3, 4, 5])
def test_cuda_layouts_are_torchs(dims):
    """On CUDA tensors too (chapter 05's kernels), y and dx have torch's layout for every input layout:
    among them the (N, C, L) view of an (N, L, C) tensor, which the kernels walk as channels-last
    columns but torch returns C-contiguous."""
    check_layouts_like_torch(lambda: BNLIB_BN[dims](3), lambda: TORCH_BN[dims](3), (4, 3, 5, 2, 3)[:dims],
                             device="cuda", dtype=torch.float32, tol=1e-4)


@needs_gpu
def test_cuda_non_default_stream_is_respected():
    """Input made on a side stream and used there: bnlib must run on torch's current stream (the side
    one); on another stream it could read x before it is written and differ from torch."""
    theirs, ours = _cuda_pair(torch.nn.BatchNorm2d, bnn.BatchNorm2d, 16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = torch.randn(64, 16, 32, 32, device="cuda") * 2 + 3      # produced on the side stream
        dy = torch.randn_like(x)
        _compare_step(theirs, ours, x, dy, 1e-4)
        ours.eval()
        theirs.eval()
        ye = ours(x)
        torch.testing.assert_close(ye, theirs(x), atol=1e-4, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_cnn_tracks_torch(dtype):
    """A CNN under torch.autocast("cuda", dtype) with bnlib's layers follows the one with torch's: their
    loss gap is of the size of what the half precision itself does to torch's run (vs float32)."""
    gen = torch.Generator().manual_seed(0)                # a learnable synthetic task (no sklearn needed)
    images = torch.randn(1024, 1, 8, 8, generator=gen)
    targets = (images.flatten(1) @ torch.randn(64, 10, generator=gen)).argmax(1)
    images, targets = images.cuda(), targets.cuda()
    torch_model = _small_cnn().cuda()
    bnlib_model = bnn.convert_batchnorm(copy.deepcopy(torch_model))
    with torch.autocast("cuda", dtype=dtype):
        h = torch_model[0](images[:4])
        assert h.dtype == dtype and bnlib_model[1](h).dtype == dtype
    loss_torch = _train_losses(torch_model, images, targets, 60, dtype, device="cuda")
    loss_bnlib = _train_losses(bnlib_model, images, targets, 60, dtype, device="cuda")
    loss_fp32 = _train_losses(_small_cnn().cuda(), images, targets, 60, device="cuda")
    gap, precision_effect = np.abs(loss_bnlib - loss_torch), np.abs(loss_torch - loss_fp32)
    assert loss_bnlib[-10:].mean() < 0.7 * loss_bnlib[0]
    assert gap.mean() < 2 * precision_effect.mean() + 1e-3, (gap.mean(), precision_effect.mean())


@needs_gpu
def test_cuda_eval_and_running_stats_do_not_synchronize():
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising torch call."""
    theirs, ours = _cuda_pair(torch.nn.BatchNorm2d, bnn.BatchNorm2d, 8)
    x = torch.randn(16, 8, 5, 5, device="cuda")
    ours(x)                                     # warm-up (kernel compilation may synchronise)
    ours.eval()
    ours(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours(x)                                 # evaluation
        ours.train()
        ours(x)                                 # training step with momentum=0.1: running-stat update
        ours.momentum = None
        ours(x)                                 # and with momentum=None: the kernel reads the count itself
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_running_statistics_updated_by_the_kernels_match_torch(momentum, dtype):
    """Five training steps: running_mean, running_var and num_batches_tracked, updated inside bnlib's
    forward launches (float32 buffers for bfloat16 input, as autocast keeps them), against torch's."""
    theirs, ours = _cuda_pair(torch.nn.BatchNorm2d, bnn.BatchNorm2d, 6, torch.float64 if dtype == torch.float64
                              else torch.float32)
    theirs.momentum = ours.momentum = momentum
    gen = torch.Generator(device="cuda").manual_seed(4)
    for step in range(5):
        x = (torch.randn(10, 6, 7, 7, device="cuda", generator=gen) * 2 + step).to(dtype)
        with torch.no_grad():
            theirs(x.to(theirs.running_mean.dtype) if dtype == torch.bfloat16 else x)
            ours(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 5
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=tol, atol=tol, msg=name)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_double_backward_matches_torch(dtype):
    """A gradient penalty on CUDA tensors: create_graph=True takes _backward_with_graph (torch operations)
    after forward_torch; its gradients must match torch's."""
    theirs, ours = _cuda_pair(torch.nn.BatchNorm2d, bnn.BatchNorm2d, 8, dtype)
    x = torch.randn(16, 8, 5, 5, device="cuda", dtype=dtype) * 2 + 1
    grads = []
    for m in (theirs, ours):
        xi = x.clone().requires_grad_()
        gx, = torch.autograd.grad((m(xi) ** 3).sum(), xi, create_graph=True)
        (gx ** 2).sum().backward()
        grads.append([gx.detach(), xi.grad, m.weight.grad, m.bias.grad])
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    for name, want, got in zip(("dx", "x.grad", "weight.grad", "bias.grad"), *grads):
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- SyncBatchNorm on CUDA tensors over NCCL
# GPU-ONLY. Written on a machine without a GPU. The first needs one CUDA GPU (a one-process NCCL group;
# it passed on an H200), the second two GPUs (NCCL will not put two processes on one device; not yet run).

needs_nccl = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_nccl_available()),
                                reason="needs torch.distributed with NCCL (a CUDA build of torch)")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="GPU-ONLY: needs 2 CUDA GPUs (NCCL runs "
                                    "one process per device); skipped even with BNLIB_REQUIRE_GPU=1")


@needs_gpu
@needs_nccl
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_sync_batchnorm_function_over_a_one_process_nccl_group(dtype, monkeypatch):
    """GPU-ONLY (passed on an H200). A one-process NCCL group on cuda:0: the module falls back to plain
    BatchNorm (chapter 05's kernels; SyncBatchNormFunction is never called), and SyncBatchNormFunction
    called directly (all_gather and all_reduce over NCCL on CUDA tensors, float32 arithmetic for
    float32 and 16-bit input) matches torch's CUDA batch norm, channels-last input included."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    torch.cuda.set_device(0)
    xs, dys, state = _sync_case((6,), dtype, (3, 4), seed=11)
    x = xs[0].cuda().contiguous(memory_format=torch.channels_last)
    dy = dys[0].cuda().contiguous(memory_format=torch.channels_last)
    weight, bias = (state[k].cuda() for k in ("weight", "bias"))
    tol = 2 * HALF_TOL[dtype] if dtype in HALF_TOL else (1e-10 if dtype == torch.float64 else 1e-4)
    param_tol = 1e-10 if dtype == torch.float64 else 1e-4
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            stats = {}
            xb, wb, bb = (t.clone().requires_grad_() for t in (x, weight, bias))
            yb = bnn.SyncBatchNormFunction.apply(xb, wb, bb, 1e-5, dist.group.WORLD, stats)
            yb.backward(dy)
            torch.cuda.synchronize()

            def no_sync(*args):
                raise AssertionError("SyncBatchNormFunction called in a one-process group")
            monkeypatch.setattr(bnn.SyncBatchNormFunction, "apply", no_sync)
            sync, plain = (cls(SYNC_C).to("cuda", weight.dtype) for cls in (bnn.SyncBatchNorm, bnn.BatchNorm2d))
            for m in (sync, plain):
                m.load_state_dict(state)
            torch.testing.assert_close(sync(x), plain(x), rtol=tol, atol=tol)
        finally:
            dist.destroy_process_group()
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, weight, bias))
    ya = torch.nn.functional.batch_norm(xa, None, None, wa, ba, training=True, eps=1e-5)
    ya.backward(dy)
    assert yb.dtype == dtype and yb.device == x.device and xb.grad.dtype == dtype
    for name, got, want, t in (("output", yb, ya, tol), ("input gradient", xb.grad, xa.grad, tol),
                               ("weight gradient", wb.grad, wa.grad, param_tol),
                               ("bias gradient", bb.grad, ba.grad, param_tol)):
        torch.testing.assert_close(got, want, atol=t, rtol=t, msg=lambda m: f"{name}: {m}")
    x64 = x.double()
    assert stats["count"] == 6 * 3 * 4
    torch.testing.assert_close(stats["mean"], x64.mean((0, 2, 3)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats["var"], x64.var((0, 2, 3), correction=0), atol=1e-5, rtol=1e-5)


# (dtype, per-process batch sizes, spatial shape after (N, C)); 4-D cases are channels-last. torch's
# SyncBatchNorm sends an empty process's statistics in the input's dtype, which for 16-bit input does not
# match the float32 statistics of the others: the empty process is tried with float32 and float64 only.
SYNC_NCCL_CASES = [(torch.float32, (3, 5), (2, 3)), (torch.float64, (4, 3), (4,)), (torch.float16, (3, 5), (2, 3)),
                   (torch.bfloat16, (2, 6), (4,)), (torch.float32, (4, 0), (4,)), (torch.float64, (0, 5), (2, 3))]


def _nccl_worker(rank, init_file, out_dir):
    """Process `rank` of 2 NCCL processes, one per GPU: bnlib's SyncBatchNorm and torch's, same state,
    the same slice of every case's global batch, two training steps and one evaluation step."""
    dist = torch.distributed
    try:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
    except Exception as err:
        torch.save(f"process {rank}: init failed: {err!r}", os.path.join(out_dir, f"rank{rank}.pt"))
        return
    _report(rank, out_dir, lambda: _nccl_steps(rank, device))


def _nccl_steps(rank, device):
    """_nccl_worker's work: per case, what bnlib's and torch's SyncBatchNorm computed on this GPU."""
    results = []
    for k, (dtype, sizes, tail) in enumerate(SYNC_NCCL_CASES):
        xs, dys, state = _sync_case(sizes, dtype, tail, seed=100 + k)
        x, dy = xs[rank].to(device), dys[rank].to(device)
        if x.dim() == 4:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        case = {}
        for lib, cls in (("bnlib", bnn.SyncBatchNorm), ("torch", torch.nn.SyncBatchNorm)):
            layer = cls(SYNC_C, momentum=None).to(device, state["weight"].dtype)
            layer.load_state_dict(state)
            steps = _sync_steps(layer, x, dy)
            layer.eval()
            with torch.no_grad():
                evaluated = layer(x).cpu() if sizes[rank] else None
            case[lib] = (steps, evaluated)
        results.append(case)
    return results


@needs_two_gpus
@needs_nccl
def test_cuda_sync_batchnorm_two_processes_over_nccl_match_torch_sync_batchnorm():
    """GPU-ONLY (not yet run): needs 2 CUDA GPUs. Two spawned processes, one per GPU, NCCL: bnlib's
    SyncBatchNorm against torch.nn.SyncBatchNorm on the same slices (unequal sizes, an empty process,
    float32/float64/float16/bfloat16 input with float32 parameters for 16-bit input, channels-last):
    outputs, input gradients, each process's own parameter gradients, running statistics and step
    counts over two training steps, then evaluation; and in float64 both against torch.nn.BatchNorm
    on the concatenated batch."""
    reports = _run_processes(_nccl_worker, 2, "spawn", timeout=240)
    for k, (dtype, sizes, tail) in enumerate(SYNC_NCCL_CASES):
        tol = 2 * HALF_TOL[dtype] if dtype in HALF_TOL else (1e-10 if dtype == torch.float64 else 1e-4)
        param_tol = 1e-10 if dtype == torch.float64 else (1e-3 if dtype in HALF_TOL else 1e-4)
        full = _reference_steps(_sync_case(sizes, dtype, tail, seed=100 + k), sizes) \
            if dtype == torch.float64 else None
        for rank, results in enumerate(reports):
            (ours, ours_eval), (theirs, theirs_eval) = results[k]["bnlib"], results[k]["torch"]
            for step, (got, want) in enumerate(zip(ours, theirs)):
                what = f"rank {rank}, {dtype}, batches {sizes}, step {step + 1}"
                for name in want:
                    if want[name] is None or got[name] is None:      # an empty process's gradients: None in both
                        assert got[name] is None and want[name] is None and sizes[rank] == 0, (what, name)
                        continue
                    t = tol if name in ("output", "input gradient") else param_tol
                    assert got[name].dtype == want[name].dtype, (what, name, got[name].dtype, want[name].dtype)
                    torch.testing.assert_close(got[name], want[name], atol=t, rtol=t,
                                               msg=lambda m: f"{what}, {name} against torch.nn.SyncBatchNorm: {m}")
                if full is not None:
                    _assert_close_to_slice(got, full[step], rank, sizes, 1e-10, 1e-10,
                                           f"{what} against BatchNorm on the concatenated batch")
            if ours_eval is not None:
                torch.testing.assert_close(ours_eval, theirs_eval, atol=tol, rtol=tol,
                                           msg=lambda m: f"rank {rank}, {dtype}, batches {sizes}, evaluation: {m}")


# ----------------------------------------------------------------------------- the layers' apply


def _refuse_binding(*args, **kwargs):
    raise AssertionError("inspect.Signature.bind called")


@pytest.mark.parametrize("training", [True, False])
def test_layers_call_their_functions_without_binding_arguments(training, monkeypatch):
    """Outside torch.func, the layers skip Function.apply's per-call binding of arguments (nn._apply):
    a step must not reach inspect's bind, and must give what Function.apply gives, gradients included."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    dy = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    ours = bnn.BatchNorm2d(4).double().train(training)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.uniform_(-1, 1, generator=gen)
        ours.running_mean.uniform_(-1, 1, generator=gen)
        ours.running_var.uniform_(0.5, 2, generator=gen)
    reference = copy.deepcopy(ours)
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(inspect.Signature, "bind", _refuse_binding)
        y = ours(xr)
        y.backward(dy)
        with pytest.raises(AssertionError, match="bind called"):    # the public route still binds
            (bnn.BatchNormFunction if training else bnn.BatchNormInferenceFunction).apply(
                *((x, ours.weight, ours.bias, 1e-5) if training else
                  (x, ours.running_mean, ours.running_var, ours.weight, ours.bias, 1e-5)))
    monkeypatch.setattr(bnn, "_apply", lambda function, *args: function.apply(*args))
    ys = reference(xs)
    ys.backward(dy)
    torch.testing.assert_close(y, ys, rtol=0, atol=0)
    for a, b in ((xr.grad, xs.grad), (ours.weight.grad, reference.weight.grad), (ours.bias.grad, reference.bias.grad),
                 (ours.running_mean, reference.running_mean), (ours.running_var, reference.running_var),
                 (ours.num_batches_tracked, reference.num_batches_tracked)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_batch_norm_calls_its_function_without_binding_arguments(monkeypatch):
    """FrozenBatchNorm2d (dozens of layers in a detection backbone) goes through nn._apply as well."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    frozen = bnn.FrozenBatchNorm2d(3).double()
    with torch.no_grad():
        frozen.running_var.uniform_(0.5, 2, generator=gen)
    expected = bnn.BatchNormInferenceFunction.apply(x, frozen.running_mean, frozen.running_var, frozen.weight,
                                                    frozen.bias, frozen.eps)
    with monkeypatch.context() as m:
        m.setattr(inspect.Signature, "bind", _refuse_binding)
        y = frozen(x)
        y.sum().backward()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.autograd.grad(expected.sum(), x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_a_call_that_records_nothing_skips_the_function_with_the_same_bits(monkeypatch, dtype, training):
    """Under torch.no_grad (and for frozen parameters on a frozen input) a layer calls its Function's forward
    directly, not Function.apply (nn._needs_autograd): the same output and running buffers, bit for bit, as the
    call through autograd; FrozenBatchNorm2d too."""
    gen = torch.Generator().manual_seed(7)
    for shape in [(16, 5), (8, 3, 4, 4)]:
        x = torch.randn(shape, generator=gen, dtype=dtype)
        through = BNLIB_BN[len(shape)](shape[1]).to(dtype).train(training)
        with torch.no_grad():
            through.running_mean.uniform_(-1, 1, generator=gen)
            through.running_var.uniform_(0.5, 2, generator=gen)
            through.weight.uniform_(0.5, 2, generator=gen)
        direct, frozen = copy.deepcopy(through), copy.deepcopy(through).requires_grad_(False)
        expected = [through(x.clone().requires_grad_()).detach() for _ in range(2)]   # weight requires grad: apply
        with monkeypatch.context() as m:
            refuse = lambda *a: pytest.fail("Function.apply called for a call that records nothing")
            m.setattr(bnn, "_apply", refuse)
            for function in (bnn.BatchNormFunction, bnn.BatchNormInferenceFunction):   # apply always calls it
                m.setattr(function, "setup_context", staticmethod(refuse))
            with torch.no_grad():
                got = [direct(x) for _ in range(2)]
            got_frozen = [frozen(x) for _ in range(2)]                                 # grad enabled, nothing requires it
            if len(shape) == 4:
                folded = bnn.FrozenBatchNorm2d.from_batch_norm(through.eval())
                with torch.no_grad():
                    got_folded = folded(x)
        for want, a, b in zip(expected, got, got_frozen):
            assert torch.equal(a, want) and torch.equal(b, want) and not b.requires_grad
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(direct, name), getattr(through, name)), name
            assert torch.equal(getattr(frozen, name), getattr(through, name)), name
        if len(shape) == 4:
            assert torch.equal(got_folded, through.eval()(x.clone().requires_grad_()).detach())


def test_calls_under_no_grad_still_go_through_the_function_for_tangents_and_vmap():
    """torch.no_grad does not stop forward-mode AD, and torch.func.vmap's wrapped tensors need the Functions'
    rules: both still reach them (the same tangents and outputs as torch's layers)."""
    import torch.autograd.forward_ad as fwAD
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    tangent = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    for training in (True, False):
        ours, theirs = bnn.BatchNorm1d(3).double().train(training), torch.nn.BatchNorm1d(3).double().train(training)
        with torch.no_grad(), fwAD.dual_level():
            y = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent)))
            expected = fwAD.unpack_dual(theirs(fwAD.make_dual(x, tangent)))
        assert y.tangent is not None
        torch.testing.assert_close(y.primal, expected.primal)
        torch.testing.assert_close(y.tangent, expected.tangent)
        if not training:
            with torch.no_grad():
                torch.testing.assert_close(torch.func.vmap(ours)(x.unsqueeze(1)), torch.func.vmap(theirs)(x.unsqueeze(1)))


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64])
def test_the_in_place_running_update_gives_the_bits_of_compute_then_copy(monkeypatch, buffer_dtype, stat_dtype):
    """_update_running_stats updates float32/float64 buffers in place (each buffer's version counter moves by 2: mul_,
    add_); the values are those of the compute-then-copy path, which runs under torch.func and for 16-bit buffers
    (forced here through _transforms_active), bit for bit: 37 channels (the vectorized loops and their tail),
    float64 statistics (SyncBatchNorm's on the CPU) into float32 buffers included."""
    gen = torch.Generator().manual_seed(9)
    for momentum, count in [(0.1, 64), (0.37, 5), (None, 2), (1.0, 3), (0.0, 3)]:
        layers = [bnn.BatchNorm2d(37, momentum=momentum).to(buffer_dtype) for _ in range(2)]
        with torch.no_grad():
            layers[0].running_mean.uniform_(-1, 1, generator=gen)
            layers[0].running_var.uniform_(0.5, 2, generator=gen)
            layers[0].num_batches_tracked.fill_(3)
        layers[1].load_state_dict(layers[0].state_dict())
        mean, var = torch.randn(37, generator=gen, dtype=stat_dtype), torch.rand(37, generator=gen, dtype=stat_dtype)
        versions = [layers[0].running_mean._version, layers[0].running_var._version]
        layers[0]._update_running_stats(mean, var, count)
        assert [layers[0].running_mean._version, layers[0].running_var._version] == [v + 2 for v in versions]
        with monkeypatch.context() as m:
            m.setattr(bnn, "_transforms_active", lambda: True)           # the compute-then-copy path
            layers[1]._update_running_stats(mean, var, count)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(layers[0], name), getattr(layers[1], name)), (momentum, name)
        assert int(layers[0].num_batches_tracked) == 4


def test_a_running_update_that_cannot_apply_changes_nothing():
    """Statistics that cannot go into the buffers (a meta-device batch's; the wrong length; a float16 running_var
    beside a float32 running_mean, which must not be updated in float16) never take the in-place path: the
    meta and length cases raise with the buffers and the count as they were; the mixed case rounds once."""
    layer = bnn.BatchNorm1d(4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError):
        layer(torch.empty(8, 4, device="meta"))                      # torch's in-place add would skip these silently
    with pytest.raises(RuntimeError):
        layer._update_running_stats(torch.zeros(1), torch.ones(5), 8)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    mixed = bnn.BatchNorm1d(4)
    mixed.running_var = mixed.running_var.half()
    var = torch.tensor([0.3, 1.7, 2.9, 0.01])
    mixed._update_running_stats(torch.zeros(4), var, 8)
    once = torch.add(torch.ones(4).mul(0.9), var * (8 / 7), alpha=0.1).half()      # in float32, rounded once
    assert mixed.running_var.dtype == torch.float16 and torch.equal(mixed.running_var, once)


def test_layers_forward_mode_dual_tensors_match_torch():
    """torch.autograd.forward_ad's dual tensors reach the Functions' jvp through the C++ apply that
    nn._apply calls directly (no functorch transform is active, so it takes its fast path)."""
    import torch.autograd.forward_ad as fwAD
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    tangent = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    for training in (True, False):
        ours, theirs = bnn.BatchNorm1d(3).double().train(training), torch.nn.BatchNorm1d(3).double().train(training)
        with fwAD.dual_level():
            y = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent)))
            expected = fwAD.unpack_dual(theirs(fwAD.make_dual(x, tangent)))
        torch.testing.assert_close(y.primal, expected.primal)
        torch.testing.assert_close(y.tangent, expected.tangent)


# ----------------------------------------------------------------------------- torch.func

def _small_net(bn_class, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), bn_class(4), torch.nn.ReLU()).double()


def _as_dict(named):
    return {k: v.clone() for k, v in named}


@pytest.mark.parametrize("dims", [2, 4])
def test_torch_func_grad_and_maml_second_order_match_torch(dims):
    """torch.func.grad through functional_call (buffers passed in, as torch.func requires), and the
    gradient of a loss after one inner gradient step (MAML), in training mode: gradients and the
    updated buffers equal torch's."""
    x = torch.randn((8, 3, 5, 5) if dims == 4 else (8, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for lib in (torch.nn, bnn):
        if dims == 4:
            model = _small_net(lib.BatchNorm2d)
        else:
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Linear(3, 4).double(), lib.BatchNorm1d(4).double(), torch.nn.Tanh())
        params, buffers = _as_dict(model.named_parameters()), _as_dict(model.named_buffers())
        loss = lambda p, b, x: (torch.func.functional_call(model, {**p, **b}, (x,)) ** 2).sum()

        def outer(p, b, x):
            inner = torch.func.grad(loss)(p, b, x)
            return loss({k: p[k] - 0.1 * inner[k] for k in p}, b, x)
        first = torch.func.grad(loss)(params, buffers, x)
        second = torch.func.grad(outer)(params, buffers, x)
        results.append((first, second, buffers))
    (f_t, s_t, b_t), (f_b, s_b, b_b) = results
    for want, got in [(f_t, f_b), (s_t, s_b), (b_t, b_b)]:
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10, msg=lambda m: f"{k}: {m}")
    assert int(b_b["1.num_batches_tracked"]) == 3          # one forward in grad, two in the MAML step


def test_torch_func_vmap_ensemble_and_eval_match_torch():
    """vmap over stacked parameters (model ensembling, batch statistics) and over inputs in evaluation
    mode: the same outputs as torch's layers; bnlib's Functions run once per slice."""
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outputs = []
    for lib in (torch.nn, bnn):
        models = [_small_net(lambda c: lib.BatchNorm2d(c, track_running_stats=False), seed=s) for s in range(3)]
        params, buffers = torch.func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        ensemble = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))
        frozen = _small_net(lib.BatchNorm2d).eval()
        with torch.no_grad():
            frozen[1].running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(4))
            frozen[1].running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(5))
        per_example = torch.func.vmap(frozen)(x.unsqueeze(1))
        outputs.append((ensemble(params, buffers, x), per_example, torch.stack([m(x) for m in models])))
    (e_t, p_t, _), (e_b, p_b, loop_b) = outputs
    torch.testing.assert_close(e_b, e_t, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(e_b, loop_b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(p_b, p_t, atol=1e-12, rtol=1e-12)


def test_torch_func_vmap_with_running_statistics_raises_clearly_and_changes_nothing():
    """As torch's: training mode under vmap cannot put batched statistics into unbatched buffers."""
    x = torch.randn(4, 6, 3, 5, 5, dtype=torch.float64)
    for lib in (torch.nn, bnn):
        model = _small_net(lib.BatchNorm2d)
        params, buffers = _as_dict(model.named_parameters()), _as_dict(model.named_buffers())
        before = {k: v.clone() for k, v in buffers.items()}
        with pytest.raises(RuntimeError) as info:
            torch.func.vmap(lambda b, x: torch.func.functional_call(model, {**params, **b}, (x,)),
                            in_dims=(None, 0))(buffers, x)
        if lib is bnn:
            assert "running statistics" in str(info.value) and "track_running_stats=False" in str(info.value)
            for k in before:
                assert torch.equal(buffers[k], before[k]), k


@pytest.mark.parametrize("training", [True, False])
def test_torch_func_forward_mode_matches_torch(training):
    """jvp, jacfwd and hessian (forward over reverse) through both Functions, against torch's batch
    norm; in evaluation also with tangents for the running statistics, which torch (and bnlib) refuse beside
    other tangents and treat as constants alone."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=gen)
    w = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    b = torch.randn(3, dtype=torch.float64, generator=gen)
    rm, rv = torch.randn(3, dtype=torch.float64, generator=gen), torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    tx, tw, tb, trm, trv = (torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in (x, w, b, rm, rv))
    if training:
        theirs = lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
        ours = lambda x, w, b: bnn.BatchNormFunction.apply(x, w, b, 1e-5)[0]
    else:
        theirs = lambda x, w, b: torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
        ours = lambda x, w, b: bnn.BatchNormInferenceFunction.apply(x, rm, rv, w, b, 1e-5)
    close = lambda got, want: torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    close(torch.func.jvp(ours, (x, w, b), (tx, tw, tb))[1], torch.func.jvp(theirs, (x, w, b), (tx, tw, tb))[1])
    close(torch.func.jvp(lambda x: ours(x, w, b), (x,), (tx,))[1], torch.func.jvp(lambda x: theirs(x, w, b), (x,), (tx,))[1])
    for j_ours, j_theirs in zip(torch.func.jacfwd(ours, argnums=(0, 1, 2))(x, w, b),
                                torch.func.jacfwd(theirs, argnums=(0, 1, 2))(x, w, b)):
        close(j_ours, j_theirs)
    cube = lambda f: (lambda x: (f(x, w, b) ** 3).sum())
    close(torch.func.hessian(cube(ours))(x), torch.func.hessian(cube(theirs))(x))
    if not training:   # tangents of the running statistics: refused beside any other tangent, zero alone (as torch)
        ours_all = lambda x, rm, rv: bnn.BatchNormInferenceFunction.apply(x, rm, rv, w, b, 1e-5)
        theirs_all = lambda x, rm, rv: torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
        for f in (ours_all, theirs_all):
            with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
                torch.func.jvp(f, (x, rm, rv), (tx, trm, trv))
            close(torch.func.jvp(lambda rm, rv: f(x, rm, rv), (rm, rv), (trm, trv))[1], torch.zeros_like(x))


def test_torch_level_kernel_path_under_torch_func_grad(monkeypatch):
    """The CUDA route (chapter 05's torch-level kernels, replaced here by their contract in torch) under
    torch.func.grad: the differentiable backward is used, and the running statistics are updated once."""
    _use_kernel_contract(monkeypatch)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = []
    for lib in (torch.nn, bnn):
        model = _small_net(lib.BatchNorm2d)
        params, buffers = _as_dict(model.named_parameters()), _as_dict(model.named_buffers())
        g = torch.func.grad(lambda p, b: (torch.func.functional_call(model, {**p, **b}, (x,)) ** 2).sum())(params, buffers)
        grads.append((g, buffers))
    for part in range(2):
        for k in grads[0][part]:
            torch.testing.assert_close(grads[1][part][k], grads[0][part][k], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- conversions and odd devices


@pytest.mark.parametrize("convert", [bnn.convert_batchnorm, bnn.SyncBatchNorm.convert_sync_batchnorm])
def test_conversion_keeps_the_parameter_and_buffer_objects(convert):
    """As torch's convert_sync_batchnorm: an optimizer built before the conversion trains the new layer."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    old = model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model = convert(model)
    assert type(model[1]) is not type(old)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(model[1], name) is getattr(old, name), name
    model(torch.randn(6, 3)).sum().backward()
    before = model[1].bias.detach().clone()
    opt.step()
    assert not torch.equal(model[1].bias, before)                  # the optimizer's parameter is the layer's


def test_conversions_refuse_what_is_not_a_module():
    for call in (lambda: bnn.convert_batchnorm(None), lambda: bnn.SyncBatchNorm.convert_sync_batchnorm("model")):
        with pytest.raises(TypeError, match="torch.nn.Module"):
            call()


@pytest.mark.parametrize("convert", [bnn.convert_batchnorm, bnn.SyncBatchNorm.convert_sync_batchnorm])
def test_a_refused_layer_names_itself_and_leaves_the_model_as_it_was(convert):
    """Every new layer is built before any is put in: a refusal (here eps < 0, which torch accepts at
    construction) converts nothing, and the error names the layer."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3),
                                torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3, eps=-1.0)),
                                torch.nn.BatchNorm2d(3))
    before = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"layer '1\.1' \(BatchNorm2d\): eps must be"):
        convert(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    with pytest.raises(ValueError, match=r"layer \(the module itself\) \(BatchNorm1d\): momentum"):
        convert(torch.nn.BatchNorm1d(3, momentum=2.0))


@pytest.mark.parametrize("convert", [bnn.convert_batchnorm, bnn.SyncBatchNorm.convert_sync_batchnorm])
def test_a_layer_used_twice_becomes_one_layer_used_twice(convert):
    shared = torch.nn.BatchNorm1d(4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), shared, torch.nn.Linear(4, 4), shared)
    convert(model)
    assert type(model[1]) is not torch.nn.BatchNorm1d and model[1] is model[3] and model[1].weight is shared.weight


def test_sync_conversion_does_not_search_inside_a_replaced_layer_but_meets_its_parts_elsewhere():
    """A layer inside a replaced layer is left as it is there, and converted where it is used outside it."""
    class WithChild(torch.nn.BatchNorm1d):
        def __init__(self, n, inner):
            super().__init__(n)
            self.inner = inner
    for order in ("inside first", "outside first"):
        b = torch.nn.BatchNorm1d(3)
        holder = WithChild(3, torch.nn.Sequential(b))
        model = torch.nn.Sequential(holder, b) if order == "inside first" else torch.nn.Sequential(b, holder)
        bnn.SyncBatchNorm.convert_sync_batchnorm(model)
        outside, replaced = (model[1], model[0]) if order == "inside first" else (model[0], model[1])
        assert type(outside) is bnn.SyncBatchNorm and type(replaced) is bnn.SyncBatchNorm, order
        assert type(holder.inner[0]) is torch.nn.BatchNorm1d, order         # the discarded layer is not changed


def test_conversion_reaches_a_layer_registered_under_a_dotted_name():
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.BatchNorm1d(3))
    setattr(model, "a.b", torch.nn.BatchNorm1d(3))         # Module.__setattr__ takes the name add_module refuses
    bnn.convert_batchnorm(model)
    assert type(model._modules["a"]) is bnn.BatchNorm1d and type(model._modules["a.b"]) is bnn.BatchNorm1d


def test_convert_batchnorm_leaves_subclasses_alone():
    class MyBN(torch.nn.BatchNorm2d):
        pass
    layer = MyBN(3)
    assert bnn.convert_batchnorm(layer) is layer


@pytest.mark.parametrize("training", [True, False])
def test_meta_device_gives_shapes_as_torch(training):
    for cls in (torch.nn.BatchNorm2d, bnn.BatchNorm2d):
        layer = cls(3, device="meta").train(training)
        y = layer(torch.empty(2, 3, 4, 4, device="meta"))
        assert y.shape == (2, 3, 4, 4) and y.device.type == "meta"


class _ConvBNConv(torch.nn.Module):
    """A model with its own forward around each bnlib layer, so that the code between them can be compiled."""
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = torch.nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)
        self.frozen, self.sync = bnn.FrozenBatchNorm2d(2), bnn.SyncBatchNorm(2)

    def forward(self, x):
        return self.sync(self.frozen(self.conv2(torch.relu(self.bn(self.conv1(x)))))) * 2


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_runs_the_layers_eagerly_with_the_same_results(training):
    """torch.compile cannot trace NumPy/numba code: each bnlib layer steps outside the graph (a graph
    break), the code around it is compiled (the graphs are counted), and the compiled model computes
    what the eager one does."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _ConvBNConv().double().train(training)
    twin = copy.deepcopy(net)
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    y, y_twin = torch.compile(net, backend=counting)(x), twin(x_twin)
    y.sum().backward()
    y_twin.sum().backward()
    convs = [sum(node.op == "call_function" and "conv2d" in str(node.target) for node in g.graph.nodes) for g in graphs]
    assert convs == [1, 1, 0], convs                 # conv1 | bn | relu, conv2 | frozen, sync | * 2
    torch.testing.assert_close(y, y_twin, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x_twin.grad, atol=1e-12, rtol=1e-12)
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_is_refused_by_name(strict):
    with pytest.raises(Exception) as info:
        torch.export.export(_ConvBNConv().eval(), (torch.randn(2, 3, 5, 5),), strict=strict)
    assert not isinstance(info.value, RecursionError)
    assert "cannot be exported" in str(info.value) or strict, str(info.value)[:300]


def test_torch_level_kernel_path_refuses_training_vmap_without_touching_the_buffers(monkeypatch):
    """On CUDA the kernels update the running buffers inside the forward; under vmap the Function runs
    once per slice, so it must refuse (as the CPU route does) rather than update the buffers N times."""
    _use_kernel_contract(monkeypatch)
    layer = bnn.BatchNorm2d(3).double()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 6, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda b, x: torch.func.functional_call(layer, b, (x,)), in_dims=(None, 0))(
            dict(layer.named_buffers()), x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@needs_gpu
def test_cuda_torch_func_and_compile_match_torch():
    """The CUDA route (chapter 05's kernels, running buffers updated inside them) under torch.func.grad,
    eval vmap, refused training vmap, and torch.compile: as on the CPU, against torch's layers."""
    assert torch.cuda.is_available(), "BNLIB_REQUIRE_GPU=1 but torch sees no CUDA GPU"
    x = torch.randn(8, 3, 9, 9, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for lib in (torch.nn, bnn):
        model = _small_net(lib.BatchNorm2d).float().cuda()
        params, buffers = _as_dict(model.named_parameters()), _as_dict(model.named_buffers())
        grads = torch.func.grad(lambda p, b: (torch.func.functional_call(model, {**p, **b}, (x,)) ** 2).mean())(
            params, buffers)
        evaluated = torch.func.vmap(model.eval())(x.unsqueeze(1))
        results.append((grads, buffers, evaluated))
    (g_t, b_t, e_t), (g_b, b_b, e_b) = results
    for want, got in [(g_t, g_b), (b_t, b_b)]:
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(e_b, e_t, atol=1e-5, rtol=1e-5)
    layer = bnn.BatchNorm2d(3).cuda()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda b, x: torch.func.functional_call(layer, b, (x,)), in_dims=(None, 0))(
            dict(layer.named_buffers()), torch.randn(4, 6, 3, 2, 2, device="cuda"))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    torch._dynamo.reset()
    net = _ConvBNConv().cuda()
    twin = copy.deepcopy(net)
    xc = torch.randn(6, 3, 5, 5, device="cuda")
    torch.testing.assert_close(torch.compile(net, backend="eager")(xc), twin(xc), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- precise_bn

def _pbn_model(seed=0, bnlib_first=True):
    torch.manual_seed(seed)
    first = bnn.BatchNorm2d(6) if bnlib_first else torch.nn.BatchNorm2d(6)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, bias=False), first, torch.nn.ReLU(), torch.nn.Dropout(0.5),
                               torch.nn.Conv2d(6, 5, 1, bias=False), torch.nn.BatchNorm2d(5))


def _bn_inputs(model, batches):
    """Each batch-norm layer's inputs over the batches, recorded on a copy in training mode (as precise_bn runs)."""
    net = copy.deepcopy(model).train()
    seen = {name: [] for name, m in net.named_modules() if isinstance(m, bnn.BATCHNORM_TYPES)}
    hooks = [m.register_forward_pre_hook(lambda m, i, name=name: seen[name].append(i[0].detach().double()))
             for name, m in net.named_modules() if name in seen]
    torch.manual_seed(99)
    with torch.no_grad():
        for b in batches:
            net(b)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("channels_last", [False, True])
def test_precise_bn_pooled_is_the_variance_of_every_value_and_batch_is_update_bn(channels_last):
    model = _pbn_model().eval()
    model[3].p = 0.0                                     # no dropout: the recorded inputs are the ones precise_bn saw
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batches = [(torch.randn(8, 3, 7, 7) * (1 + k % 3) + k % 4).contiguous(memory_format=fmt) for k in range(12)]
    seen = _bn_inputs(model, batches)
    pooled = bnn.precise_bn(copy.deepcopy(model), batches)
    batch = bnn.precise_bn(copy.deepcopy(model), [(b, None) for b in batches], variance="batch")   # (x, y) pairs
    for name, xs in seen.items():
        layer_p, layer_b = pooled.get_submodule(name), batch.get_submodule(name)
        allx = torch.cat(xs)
        torch.testing.assert_close(layer_p.running_mean.double(), allx.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer_p.running_var.double(), allx.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
        means = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        variances = torch.stack([x.var((0, 2, 3)) for x in xs]).mean(0)                # unbiased, per batch
        torch.testing.assert_close(layer_b.running_mean.double(), means, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer_b.running_var.double(), variances, rtol=1e-5, atol=1e-6)
        assert int(layer_p.num_batches_tracked) == int(layer_b.num_batches_tracked) == 12
        assert layer_p.momentum == 0.1 and not layer_p._forward_pre_hooks
    torch_only = _pbn_model(bnlib_first=False).eval()
    torch_only[3].p = 0.0
    ours = bnn.precise_bn(copy.deepcopy(torch_only), batches, variance="batch")
    theirs = copy.deepcopy(torch_only)
    torch.optim.swa_utils.update_bn(batches, theirs)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not any(m.training for m in pooled.modules())


def test_precise_bn_restores_modes_and_buffers_keeps_unreached_layers_and_checks_its_arguments():
    class WithSpare(torch.nn.Module):                    # a batch-norm layer that forward never calls
        def __init__(self):
            super().__init__()
            self.body, self.spare = _pbn_model(), bnn.BatchNorm1d(4)
        def forward(self, x):
            return self.body(x)
    model = WithSpare().train()
    model.body[3].eval()                                 # a mix of modes, restored one module at a time
    model.spare.running_mean.fill_(2.0)
    body = model.body
    before = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    bnn.precise_bn(model, batches)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(model.spare.running_mean, torch.full((4,), 2.0))
    assert int(model.spare.num_batches_tracked) == int(before["spare.num_batches_tracked"])
    assert not torch.equal(body[1].running_mean, before["body.1.running_mean"])
    model.load_state_dict(before)

    class Boom(Exception):
        pass
    calls = []
    def fail_on_third(module, inputs):
        calls.append(1)
        if len(calls) == 3:
            raise Boom
    handle = body[4].register_forward_pre_hook(fail_on_third)
    with pytest.raises(Boom):
        bnn.precise_bn(model, batches)
    handle.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert body[1].momentum == 0.1 and body[5].momentum == 0.1
    with pytest.raises(ValueError, match='variance must be "pooled"'):
        bnn.precise_bn(model, batches, variance="population")
    with pytest.raises(ValueError, match="at least one batch"):
        bnn.precise_bn(model, [])
    with pytest.raises(ValueError, match="batch 1 is an empty tuple; each batch must be an input tensor"):
        bnn.precise_bn(model, [batches[0], ()])             # after a batch that ran: its statistics are undone too
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _Twice(torch.nn.Module):
    """One batch-norm layer called twice per forward (by keyword the second time), a second one that only inputs
    with 3 dimensions reach, and one without running statistics."""
    def __init__(self, bn, rare, plain):
        super().__init__()
        self.bn, self.rare, self.plain = bn, rare, plain
        self.keyword = "x" if isinstance(bn, bnn.BATCHNORM_TYPES[1]) else "input"   # bnlib's forward(x), torch's forward(input)
    def forward(self, x):
        y = self.bn(x) + self.bn(**{self.keyword: x * 2 + 1})
        if x.ndim == 3:
            self.rare(x)
        return self.plain(y)


@pytest.mark.parametrize("kind", ["torch", "bnlib", "sync"])
def test_precise_bn_pools_every_call_skips_empty_batches_and_leaves_untracked_layers(kind):
    make = {"torch": torch.nn.BatchNorm1d, "bnlib": bnn.BatchNorm1d, "sync": torch.nn.SyncBatchNorm}[kind]
    model = _Twice(make(3), make(3), make(3, track_running_stats=False))
    torch.manual_seed(1)
    batches = ([torch.randn(0, 3, 5)] + [torch.randn(6, 3) * 0.01 + 1e4 for _ in range(3)]      # 2-D, far from 0
               + [torch.randn(4, 3, 5) for _ in range(2)])                                     # 3-D: reach `rare`
    bnn.precise_bn(model, batches, device="cpu")
    seen = [x for x in batches if x.shape[0]] + [x * 2 + 1 for x in batches if x.shape[0]]
    flat = torch.cat([x.double().transpose(0, 1).reshape(3, -1) for x in seen], dim=1)
    torch.testing.assert_close(model.bn.running_mean.double(), flat.mean(1), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(model.bn.running_var.double(), flat.var(1, unbiased=False), rtol=1e-4, atol=1e-6)
    assert int(model.bn.num_batches_tracked) == 10                 # its calls: 2 per non-empty batch
    rare = torch.cat([x.double().transpose(0, 1).reshape(3, -1) for x in batches[-2:]], dim=1)
    torch.testing.assert_close(model.rare.running_var.double(), rare.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
    assert model.plain.running_mean is None and not torch.isnan(model.bn.running_mean).any()
    batch = bnn.precise_bn(model, batches, variance="batch")
    assert batch.bn.momentum == 0.1 and batch.rare.momentum == 0.1
    # the empty call first: counted (as torch's and bnlib's layers count it), it would give the first call a weight
    # of 1/2 and every call after it less than its share of the average
    call_means = torch.stack([x.double().transpose(0, 1).reshape(3, -1).mean(1) for x in seen])
    torch.testing.assert_close(batch.bn.running_mean.double(), call_means.mean(0), rtol=1e-6, atol=1e-3)
    assert int(batch.bn.num_batches_tracked) == 10


def test_precise_bn_keeps_half_buffers_half_handles_5d_input_and_explains_lazy_layers():
    bn = bnn.BatchNorm3d(2).half()
    x = torch.randn(3, 2, 2, 3, 4)
    bnn.precise_bn(torch.nn.Sequential(bn), [x.half(), (x * 3).half()])
    assert bn.running_var.dtype == torch.float16
    both = torch.cat([x.half(), (x * 3).half()]).double().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(bn.running_var.double(), both.var(1, unbiased=False), rtol=2e-3, atol=1e-3)
    with pytest.raises(ValueError, match="lazy"):
        bnn.precise_bn(torch.nn.Sequential(torch.nn.LazyBatchNorm1d()), [torch.randn(4, 3)])


def test_precise_bn_leaves_layers_with_momentum_zero_alone():
    frozen = torch.nn.BatchNorm1d(3, momentum=0.0)
    frozen.running_mean.fill_(5.0)
    model = torch.nn.Sequential(bnn.BatchNorm1d(3), frozen)
    bnn.precise_bn(model, [torch.randn(8, 3) for _ in range(3)])
    assert torch.equal(frozen.running_mean, torch.full((3,), 5.0)) and int(frozen.num_batches_tracked) == 0
    assert int(model[0].num_batches_tracked) == 3


def test_precise_bn_names_a_model_that_is_no_module_and_layers_read_tensors_with_the_negative_bit():
    with pytest.raises(TypeError, match="precise_bn takes a torch.nn.Module, got function"):
        bnn.precise_bn(lambda x: x, [torch.randn(4, 3)])
    x = torch._neg_view(torch.randn(6, 3, 4))                       # a lazy -t: NumPy cannot read it directly
    assert x.is_neg()
    ours, theirs = bnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


class _GroupHadValues(bnn.BatchNorm1d):
    """Stands for a SyncBatchNorm whose rank got an empty batch while the group had values: the call updates the
    running statistics with the group's (here, fixed) values."""
    group_values = torch.arange(12.0).reshape(4, 3)

    def forward(self, x):
        return super().forward(self.group_values)[:0] if x.shape[0] == 0 else super().forward(x)


def test_precise_bn_counts_an_empty_call_that_changed_the_statistics():
    layer = _GroupHadValues(3)
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(5, 3) + 3
    bnn.precise_bn(torch.nn.Sequential(layer), [a, torch.randn(0, 3), b], variance="batch")
    expected = torch.stack([a.mean(0), _GroupHadValues.group_values.mean(0), b.mean(0)]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected)              # three calls of equal weight
    assert int(layer.num_batches_tracked) == 3


class _KeepsBatchNormInEval(torch.nn.Sequential):
    """A model whose train() keeps its first batch norm (a frozen part) in evaluation mode."""

    def train(self, mode=True):
        super().train(mode)
        self[1].eval()
        return self


@pytest.mark.parametrize("make", [torch.nn.BatchNorm2d, bnn.BatchNorm2d])
@pytest.mark.parametrize("variance", ["batch", "pooled"])
def test_precise_bn_leaves_a_layer_kept_in_evaluation_mode_alone_and_recomputes_the_next(make, variance):
    """A layer the model's train() keeps in evaluation mode is not selected (as fvcore's get_bn_modules): it keeps
    its statistics and normalizes with them during the pass, so that the next layer's recomputed statistics are
    those of the activations the model produces. It used to be reset to 0 and 1 (update_bn's way) for the pass,
    which also corrupted the next layer's statistics, and with "pooled" it was overwritten."""
    torch.manual_seed(0)
    model = _KeepsBatchNormInEval(torch.nn.Conv2d(3, 3, 1), make(3), torch.nn.Conv2d(3, 3, 1), make(3))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(9.0)
    model[1].num_batches_tracked.fill_(7)
    batches = [torch.randn(8, 3, 4, 4) for _ in range(6)] + [torch.randn(0, 3, 4, 4)]
    bnn.precise_bn(model, batches, variance=variance)
    torch.testing.assert_close(model[1].running_mean, torch.full((3,), 5.0))
    torch.testing.assert_close(model[1].running_var, torch.full((3,), 9.0))
    assert int(model[1].num_batches_tracked) == 7 and int(model[3].num_batches_tracked) == 6
    with torch.no_grad():
        model.eval()
        inputs = torch.cat([model[2](model[1](model[0](b))) for b in batches])       # what the next layer sees
    torch.testing.assert_close(model[3].running_mean, inputs.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)


class _SwitchesToEvalInForward(torch.nn.Sequential):
    """A model whose forward puts its first layer in evaluation mode before calling it."""

    def forward(self, x):
        self[0].eval()
        return super().forward(x)


@pytest.mark.parametrize("make", [torch.nn.BatchNorm1d, bnn.BatchNorm1d])
@pytest.mark.parametrize("variance", ["batch", "pooled"])
def test_precise_bn_gives_a_layer_the_forward_switches_to_evaluation_its_statistics_back(make, variance):
    """Such a layer is selected (model.train() leaves it in training mode), reset, and then counts no call: it
    gets its statistics back, with either estimator. With "pooled" it used to keep the pooled statistics of
    inputs it had normalized with 0 and 1, and a count of 0."""
    torch.manual_seed(0)
    model = _SwitchesToEvalInForward(make(3), make(3))
    with torch.no_grad():
        model[0].running_mean.fill_(5.0)
        model[0].running_var.fill_(9.0)
    model[0].num_batches_tracked.fill_(7)
    batches = [torch.randn(8, 3) for _ in range(4)]
    bnn.precise_bn(model, batches, variance=variance)
    torch.testing.assert_close(model[0].running_mean, torch.full((3,), 5.0))
    torch.testing.assert_close(model[0].running_var, torch.full((3,), 9.0))
    assert int(model[0].num_batches_tracked) == 7 and int(model[1].num_batches_tracked) == 4
    assert model[0].training and model[1].training                          # modes restored as they were
    # during the pass the first layer normalized with its own statistics (5, 9), not with 0 and 1: the next
    # layer's statistics are those of what the model really feeds it
    fed = torch.cat([(b - 5.0) / torch.sqrt(torch.tensor(9.0) + model[0].eps) for b in batches])
    torch.testing.assert_close(model[1].running_mean, fed.mean(0), rtol=1e-5, atol=1e-5)


class _EvalOnOddCalls(torch.nn.Sequential):
    """A model whose forward puts its first layer in evaluation mode on every other call."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.calls = 0

    def forward(self, x):
        self[0].train(self.calls % 2 == 0)
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("variance", ["batch", "pooled"])
def test_precise_bn_records_only_the_training_mode_calls_of_a_layer_the_forward_switches(variance):
    """The calls in evaluation mode normalize with the layer's own statistics and leave the pass's statistics (the
    cumulative average with "batch") as they were; the training-mode calls alone make the result."""
    torch.manual_seed(0)
    model = _EvalOnOddCalls(bnn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].running_mean.fill_(5.0)
    batches = [torch.randn(8, 3) + k for k in range(6)]
    bnn.precise_bn(model, batches, variance=variance)
    trained = torch.stack([b.mean(0) for b in batches[::2]])               # the calls in training mode
    torch.testing.assert_close(model[0].running_mean, trained.mean(0), rtol=1e-5, atol=1e-5)
    assert int(model[0].num_batches_tracked) == 3


def test_precise_bn_uncounts_an_empty_call_after_a_nan_batch():
    """The empty call leaves NaN statistics as they were: it is not counted (a bitwise comparison, NaN != NaN,
    counted it)."""
    model = torch.nn.Sequential(bnn.BatchNorm1d(3))
    bnn.precise_bn(model, [torch.full((4, 3), float("nan")), torch.randn(0, 3), torch.randn(4, 3)], variance="batch")
    assert int(model[0].num_batches_tracked) == 2


@pytest.mark.parametrize("dy_format", ["channels-last", "contiguous"])
def test_cpu_training_step_copies_no_channels_last_tensor(dy_format, monkeypatch):
    """On the CPU fast paths a channels-last x is read in place (chapter 04's as_acb), and so is a channels-last dy
    in the backward pass (bnlib.nn hands dy over in its own layout); a C-contiguous dy with a channels-last x is
    copied once, into x's memory order. Counted: the tensor-sized arrays np.ascontiguousarray is asked to copy.
    The gradients match torch's layer."""
    from bnlib import cpu
    if cpu.get_backend() == "portable":
        pytest.skip("the portable path has no fast layout handling")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 6, 5, 7, generator=gen)
    dy = dy.contiguous(memory_format=torch.channels_last) if dy_format == "channels-last" else dy.contiguous()
    theirs = torch.nn.BatchNorm2d(6)
    ours = bnn.convert_batchnorm(copy.deepcopy(theirs))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    copies, real = [], np.ascontiguousarray

    def counting(a, *args, **kwargs):
        if getattr(a, "size", 0) == x.numel():
            copies.append(np.asarray(a).strides)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(np, "ascontiguousarray", counting)
    y = ours(xa)
    y.backward(dy)
    monkeypatch.setattr(np, "ascontiguousarray", real)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert len(copies) == (0 if dy_format == "channels-last" else 1), copies
    theirs(xb).backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-4)
