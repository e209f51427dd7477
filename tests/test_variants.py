"""bnlib.variants (chapter 08) against torch's ops and modules, numerical gradients and BatchNorm itself."""
import copy
import warnings

import numpy as np
import pytest
import torch

from bnlib import variants as V
from bnlib.gradcheck import numerical_gradient, relative_error
from bnlib.layers import BatchNorm
from bnlib.nn import _TORCH_BN_HAS_BIAS as TORCH_BN_HAS_BIAS, FrozenBatchNorm2d

TOL = 1e-10


def _random_shape(rng, channels=None, min_ndim=2):
    ndim = int(rng.integers(min_ndim, 6))
    c = int(rng.integers(1, 7)) if channels is None else channels
    return (int(rng.integers(2, 6)), c) + tuple(int(rng.integers(2, 5)) for _ in range(ndim - 2))


def _torch_grads(fn, x, dy, *params):
    """Output and gradients (x first, then params) of a torch function, in float64 NumPy."""
    xt = torch.tensor(x, requires_grad=True)
    pt = [None if p is None else torch.tensor(p, requires_grad=True) for p in params]
    y = fn(xt, *pt)
    y.backward(torch.from_numpy(dy))
    return y.detach().numpy(), [t.grad.numpy() for t in [xt] + [p for p in pt if p is not None]]


def _close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _randomize(layer, rng):
    if getattr(layer, "weight", None) is not None:
        layer.weight[...] = rng.uniform(0.5, 1.5, layer.weight.shape)
    if getattr(layer, "bias", None) is not None:
        layer.bias[...] = rng.normal(size=layer.bias.shape)
    return layer


# ---------------------------------------------------------------- LayerNorm, GroupNorm, InstanceNorm vs torch
def _compare_with_torch(ours, fn, module, x, dy):
    """ours (a variants layer) against the torch function fn(x, weight, bias) and module: y, dx,
    grad_weight, grad_bias; the module loads our state dict and we load its one back."""
    affine = ours.weight is not None
    y, dx = ours(x), ours.backward(dy)
    params = (ours.weight, ours.bias) if affine else ()
    yt, grads = _torch_grads(fn, x, dy, *params)
    _close(y, yt)
    _close(dx, grads[0])
    if affine:
        _close(ours.grad_weight, grads[1])
    if ours.bias is not None:
        _close(ours.grad_bias, grads[2])
    module.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    _close(module(torch.from_numpy(x)).detach().numpy(), y)
    assert ours.load_state_dict(module.state_dict()).state_dict().keys() == module.state_dict().keys()


@pytest.mark.parametrize("seed", range(8))
def test_layer_norm_matches_torch(seed):
    rng = np.random.default_rng(seed)
    shape = _random_shape(rng)
    k = int(rng.integers(1, len(shape)))                      # normalize the last k axes
    normalized = shape[len(shape) - k:]
    affine, eps = seed % 3 != 2, float(10 ** rng.uniform(-6, -2))
    bias = seed % 4 != 1                                        # seed 1: weight only (torch's bias=False); 5: no affine
    ours = _randomize(V.LayerNorm(normalized, eps=eps, elementwise_affine=affine, bias=bias, dtype=np.float64), rng)
    _compare_with_torch(ours, lambda a, *p: torch.nn.functional.layer_norm(a, normalized, *p, eps=eps),
                        torch.nn.LayerNorm(normalized, eps=eps, elementwise_affine=affine, bias=bias,
                                           dtype=torch.float64),
                        rng.normal(2.0, 3.0, shape), rng.normal(size=shape))


@pytest.mark.parametrize("seed", range(10))
def test_group_norm_matches_torch(seed):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 4))
    per_group = [1, int(rng.integers(1, 4))][seed % 2]
    c = groups * per_group                                      # seeds 0, 2, ...: one channel per group
    if seed == 9:
        groups = 1                                              # one group of all channels
    shape = _random_shape(rng, channels=c)
    affine, eps = seed % 4 != 3, float(10 ** rng.uniform(-6, -2))
    bias = seed % 3 != 1                                        # seeds 1, 4: weight only (torch's bias=False); 7: no affine
    ours = _randomize(V.GroupNorm(groups, c, eps=eps, affine=affine, bias=bias, dtype=np.float64), rng)
    _compare_with_torch(ours, lambda a, *p: torch.nn.functional.group_norm(a, groups, *p, eps=eps),
                        torch.nn.GroupNorm(groups, c, eps=eps, affine=affine, bias=bias, dtype=torch.float64),
                        rng.normal(-1.0, 2.0, shape), rng.normal(size=shape))


TORCH_IN = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d, 5: torch.nn.InstanceNorm3d}


@pytest.mark.parametrize("seed", range(8))
def test_instance_norm_matches_torch_over_steps(seed):
    rng = np.random.default_rng(seed)
    shape = _random_shape(rng, min_ndim=3)
    c = shape[1]
    affine, track = bool(seed % 2), seed % 4 >= 2
    bias = seed not in (3, 5)                                   # affine, weight only (torch's bias=False)
    momentum, eps = float(rng.uniform(0.05, 0.9)), float(10 ** rng.uniform(-6, -2))
    ours = V.InstanceNorm(c, eps=eps, affine=affine, track_running_stats=track, momentum=momentum,
                          dtype=np.float64, bias=bias)
    theirs = TORCH_IN[len(shape)](c, eps=eps, affine=affine, track_running_stats=track, momentum=momentum,
                                  dtype=torch.float64, bias=bias)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if bias:
                theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for step in range(4):
        if step == 3:
            ours.eval(), theirs.eval()
        x = rng.normal(1.0, 2.0, shape)
        dy = rng.normal(size=shape)
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.from_numpy(dy))
        y, dx = ours(x), ours.backward(dy)
        _close(y, yt.detach().numpy())
        _close(dx, xt.grad.numpy())
        if affine:
            _close(ours.grad_weight, theirs.weight.grad.numpy())
            if bias:
                _close(ours.grad_bias, theirs.bias.grad.numpy())
            else:
                assert ours.bias is None and ours.grad_bias is None and "bias" not in ours.state_dict()
            theirs.zero_grad()
        for key, value in theirs.state_dict().items():
            _close(ours.state_dict()[key], value.numpy())


def test_group_norm_limits_are_instance_and_layer_norm():
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(3, 6, 4, 2)), rng.normal(size=(3, 6, 4, 2))
    pairs = [(V.GroupNorm(6, 6, dtype=np.float64), V.InstanceNorm(6, affine=True, dtype=np.float64)),
             (V.GroupNorm(1, 6, dtype=np.float64), V.LayerNorm((6, 4, 2), dtype=np.float64))]
    for group, other in pairs:
        _close(group(x), other(x))
        _close(group.backward(dy), other.backward(dy))


WEIGHT_ONLY = [  # (our class, torch's class, constructor arguments, an input shape): torch's bias=False layers
    (V.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=4), (3, 5, 4)),
    (V.GroupNorm, torch.nn.GroupNorm, dict(num_groups=2, num_channels=4), (3, 4, 5)),
    (V.InstanceNorm, torch.nn.InstanceNorm1d, dict(num_features=4, affine=True, track_running_stats=True), (3, 4, 5)),
]


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs, shape", WEIGHT_ONLY)
def test_weight_only_layers_load_torch_state_and_refuse_the_other_kind(ours_cls, torch_cls, kwargs, shape):
    ours, theirs = ours_cls(**kwargs, bias=False), torch_cls(**kwargs, bias=False)
    assert ours.bias is None and ours.grad_bias is None and "bias=False" in repr(ours)
    assert ours.load_state_dict(theirs.state_dict()).state_dict().keys() == theirs.state_dict().keys()
    for layer, state in ((ours, torch_cls(**kwargs).state_dict()),                   # a bias where none is wanted,
                         (ours_cls(**kwargs), theirs.state_dict())):                 # none where one is: refused,
        before = copy.deepcopy(layer.state_dict())                                     # nothing changed
        with pytest.raises(ValueError, match="bias"):
            layer.load_state_dict(state)
        assert all(np.array_equal(v, layer.state_dict()[k]) for k, v in before.items())
    rng = np.random.default_rng(4)
    for dtype in (np.float16, np.float32):                      # half input keeps its dtype; float32 gradients
        x = rng.normal(size=shape).astype(dtype)
        y, dx = ours(x), ours.backward(np.ones_like(x))
        assert y.dtype == dtype and dx.dtype == dtype and ours.grad_weight.dtype == np.float32
    empty = np.zeros((0,) + shape[1:], np.float32)              # an empty batch
    assert ours(empty).shape == empty.shape and not ours.backward(empty).size and not ours.grad_weight.any()


# ---------------------------------------------------------------- numerical gradients
def _check_numerical(layer, x, dy, tol=1e-6):
    layer(x)
    dx = layer.backward(dy)
    assert relative_error(dx, numerical_gradient(lambda a: layer(a), x, dy)) < tol
    if getattr(layer, "grad_weight", None) is not None:
        layer(x)
        layer.backward(dy)
        names = ("weight", "bias") if getattr(layer, "bias", None) is not None else ("weight",)
        grads = [getattr(layer, "grad_" + name).copy() for name in names]
        for name, grad in zip(names, grads):
            original = getattr(layer, name).copy()

            def f(p, name=name):
                getattr(layer, name)[...] = p
                return layer(x)
            numeric = numerical_gradient(f, original.copy(), dy)
            getattr(layer, name)[...] = original
            assert relative_error(grad, numeric) < tol, name


@pytest.mark.parametrize("make", [
    lambda: V.LayerNorm((3, 4), dtype=np.float64),
    lambda: V.GroupNorm(3, 6, dtype=np.float64),
    lambda: V.GroupNorm(1, 6, dtype=np.float64),
    lambda: V.InstanceNorm(6, affine=True, dtype=np.float64),
    lambda: V.InstanceNorm(6, affine=True, track_running_stats=True, dtype=np.float64).eval(),
    lambda: V.LayerNorm((3, 4), dtype=np.float64, bias=False),            # weight only (torch's bias=False)
    lambda: V.GroupNorm(3, 6, dtype=np.float64, bias=False),
    lambda: V.InstanceNorm(6, affine=True, dtype=np.float64, bias=False),
    lambda: V.InstanceNorm(6, affine=True, track_running_stats=True, dtype=np.float64, bias=False).eval(),
    lambda: V.GhostBatchNorm(6, 2, momentum=0.0, dtype=np.float64),
    lambda: V.FrozenBatchNorm(6, dtype=np.float64),
])
def test_backward_matches_numerical_gradient(make):
    rng = np.random.default_rng(3)
    layer = _randomize(make(), rng)
    if isinstance(layer, V.FrozenBatchNorm):
        layer.running_mean[...], layer.running_var[...] = rng.normal(size=6), rng.uniform(0.5, 2, 6)
    shape = (5, 6, 4) if not isinstance(layer, V.LayerNorm) else (5, 2, 3, 4)
    _check_numerical(layer, rng.normal(1.0, 2.0, shape), rng.normal(size=shape))


# ---------------------------------------------------------------- BatchRenorm
def test_batch_renorm_with_default_limits_is_batch_norm_bit_for_bit():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        bn, brn = BatchNorm(5, dtype=dtype), V.BatchRenorm(5, dtype=dtype)
        _randomize(bn, rng)
        brn.load_state_dict(bn.state_dict())
        for step in range(4):
            if step == 3:
                bn.eval(), brn.eval()
            x = rng.normal(3.0, 2.0, (8, 5, 3)).astype(dtype)
            dy = rng.normal(size=(8, 5, 3)).astype(dtype)
            assert np.array_equal(bn(x), brn(x))
            assert np.array_equal(bn.backward(dy), brn.backward(dy))
            assert np.array_equal(bn.grad_weight, brn.grad_weight)
            assert np.array_equal(bn.grad_bias, brn.grad_bias)
            for key, value in bn.state_dict().items():
                assert np.array_equal(value, brn.state_dict()[key]), key


def _torch_renorm(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """Reference: Ioffe (2017), Algorithm 1, in torch, with r and d detached (stop_gradient)."""
    axes = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = x.mean(axes), x.var(axes, unbiased=False)
    sigma_b, sigma = torch.sqrt(var + eps), torch.sqrt(running_var + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - running_mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mean.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    return x_hat * weight.reshape(shape) + bias.reshape(shape)


@pytest.mark.parametrize("seed", range(6))
def test_batch_renorm_matches_torch_reference_with_constant_r_d(seed):
    rng = np.random.default_rng(seed)
    shape = _random_shape(rng)
    c = shape[1]
    r_max, d_max = float(rng.uniform(1, 3)), float(rng.uniform(0, 2))
    ours = _randomize(V.BatchRenorm(c, r_max=r_max, d_max=d_max, dtype=np.float64), rng)
    ours.running_mean[...], ours.running_var[...] = rng.normal(size=c), rng.uniform(0.2, 5, c)
    before = copy.deepcopy(ours)
    x, dy = rng.normal(1.0, 2.0, shape), rng.normal(size=shape)
    y, dx = ours(x), ours.backward(dy)
    yt, grads = _torch_grads(lambda a, w, b: _torch_renorm(a, w, b, torch.from_numpy(before.running_mean),
                                                            torch.from_numpy(before.running_var), ours.eps,
                                                            r_max, d_max),
                             x, dy, before.weight, before.bias)
    _close(y, yt)
    _close(dx, grads[0])
    _close(ours.grad_weight, grads[1])
    _close(ours.grad_bias, grads[2])
    reference = BatchNorm(c, dtype=np.float64).load_state_dict(before.state_dict())
    reference(x)                                               # running statistics: updated as BatchNorm's
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        _close(ours.state_dict()[key], reference.state_dict()[key])


def test_batch_renorm_gradient_treats_r_and_d_as_constants():
    rng = np.random.default_rng(5)
    x, dy = rng.normal(1.0, 2.0, (6, 3)), rng.normal(size=(6, 3))
    # Running statistics far from the batch's: r and d sit at their limits, so they really are constant
    # near x and the numerical gradient of the whole layer must agree with backward().
    clipped = V.BatchRenorm(3, r_max=1.5, d_max=0.5, momentum=0.0, dtype=np.float64)
    clipped.running_mean[...], clipped.running_var[...] = 10.0, 100.0
    clipped(x)
    assert np.allclose(clipped.last_r, 1 / 1.5) and np.allclose(clipped.last_d, -0.5)
    _check_numerical(clipped, x, dy)
    # Unclipped, the layer's output is the fixed map (x - running_mean) / sigma, whose true derivative
    # differs from backward(): backward holds r and d constant, as the paper prescribes.
    free = V.BatchRenorm(3, r_max=100.0, d_max=100.0, momentum=0.0, dtype=np.float64)
    free.running_mean[...], free.running_var[...] = 0.5, 2.0
    y = free(x)
    _close(y, (x - 0.5) / np.sqrt(2.0 + free.eps))
    dx = free.backward(dy)
    assert relative_error(dx, numerical_gradient(free.forward, x, dy)) > 0.1
    r, d = free.last_r, free.last_d
    frozen_r_d = numerical_gradient(lambda a: (a - a.mean(0)) / np.sqrt(a.var(0) + free.eps) * r + d, x, dy)
    assert relative_error(dx, frozen_r_d) < 1e-6


def test_batch_renorm_limits_schedule():
    assert V.batch_renorm_limits(0) == (1.0, 0.0)
    assert V.batch_renorm_limits(5000) == (1.0, 0.0)
    assert V.batch_renorm_limits(25000) == pytest.approx((1 + 2 * 20 / 35, 5.0))
    assert V.batch_renorm_limits(40000) == (3.0, 5.0)
    assert V.batch_renorm_limits(10 ** 6) == (3.0, 5.0)
    r1, d1 = V.batch_renorm_limits(10, warmup_steps=4, r_max_step=16, d_max_step=10)
    assert (r1, d1) == pytest.approx((1 + 2 * 6 / 12, 5.0))
    with pytest.raises(ValueError, match="step"):
        V.batch_renorm_limits(-1)
    with pytest.raises(ValueError, match="later than"):
        V.batch_renorm_limits(3, warmup_steps=10, r_max_step=5)


# ---------------------------------------------------------------- GhostBatchNorm
@pytest.mark.parametrize("n, vbs", [(12, 4), (10, 4), (9, 3), (8, 8), (8, 20)])
def test_ghost_batch_norm_is_batch_norm_per_chunk(n, vbs):
    rng = np.random.default_rng(n * vbs)
    ghost = _randomize(V.GhostBatchNorm(3, vbs, dtype=np.float64), rng)
    x, dy = rng.normal(2.0, 3.0, (n, 3, 2)), rng.normal(size=(n, 3, 2))
    y, dx = ghost(x), ghost.backward(dy)
    grad_w, grad_b, means, vars_ = 0, 0, [], []
    for s in range(0, n, vbs):
        bn = BatchNorm(3, momentum=1.0, dtype=np.float64).load_state_dict(
            {"weight": ghost.weight, "bias": ghost.bias}, strict=False)
        _close(y[s:s + vbs], bn(x[s:s + vbs]))
        _close(dx[s:s + vbs], bn.backward(dy[s:s + vbs]))
        grad_w, grad_b = grad_w + bn.grad_weight, grad_b + bn.grad_bias
        means.append(bn.running_mean * len(x[s:s + vbs]))
        vars_.append(bn.running_var * len(x[s:s + vbs]))
    _close(ghost.grad_weight, grad_w)
    _close(ghost.grad_bias, grad_b)
    _close(ghost.running_mean, 0.9 * 0 + 0.1 * np.sum(means, 0) / n)        # size-weighted average
    _close(ghost.running_var, 0.9 * 1 + 0.1 * np.sum(vars_, 0) / n)
    if vbs >= n:                                                             # one virtual batch: BatchNorm
        bn = BatchNorm(3, dtype=np.float64).load_state_dict({"weight": ghost.weight, "bias": ghost.bias},
                                                            strict=False)
        bn(x)
        _close(ghost.running_var, bn.running_var)


def test_ghost_batch_norm_eval_uses_running_statistics():
    rng = np.random.default_rng(2)
    ghost = V.GhostBatchNorm(4, 2, momentum=None, dtype=np.float64)
    for _ in range(3):
        ghost(rng.normal(size=(6, 4)))
    bn = BatchNorm(4, dtype=np.float64).load_state_dict(ghost.state_dict()).eval()
    x = rng.normal(size=(5, 4))
    _close(ghost.eval()(x), bn(x))
    assert ghost.num_batches_tracked == 3


# ---------------------------------------------------------------- FrozenBatchNorm and nn.FrozenBatchNorm2d
def _trained_torch_bn(rng, c=4):
    bn = torch.nn.BatchNorm2d(c, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    for _ in range(3):
        bn(torch.from_numpy(rng.normal(1.0, 2.0, (6, c, 3, 3))))
    return bn.eval()


def test_frozen_batch_norm_equals_eval_batch_norm():
    rng = np.random.default_rng(4)
    bn = _trained_torch_bn(rng)
    frozen = V.FrozenBatchNorm(4, dtype=np.float64).load_state_dict(bn.state_dict()).train()
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x, dy = rng.normal(size=(5, 4, 3, 3)), rng.normal(size=(5, 4, 3, 3))
    xt = torch.tensor(x, requires_grad=True)
    yt = bn(xt)
    yt.backward(torch.from_numpy(dy))
    _close(frozen(x), yt.detach().numpy())
    _close(frozen.backward(dy), xt.grad.numpy())
    assert frozen.grad_weight is None and frozen.grad_bias is None
    _close(frozen.running_mean, bn.running_mean.numpy())       # train() and forward changed nothing


def test_nn_frozen_batch_norm_2d_loads_batch_norm_2d():
    rng = np.random.default_rng(6)
    bn = _trained_torch_bn(rng)
    frozen = FrozenBatchNorm2d(4, dtype=torch.float64)
    frozen.load_state_dict(bn.state_dict())                     # unchanged checkpoint, num_batches_tracked too
    assert list(frozen.parameters()) == []
    frozen.train()
    x = torch.tensor(rng.normal(size=(3, 4, 5, 5)), requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = torch.from_numpy(rng.normal(size=(3, 4, 5, 5)))
    frozen(x).backward(dy)
    bn(x2).backward(dy)
    _close(frozen(x).detach().numpy(), bn(x2).detach().numpy())
    _close(x.grad.numpy(), x2.grad.numpy())
    same = FrozenBatchNorm2d.from_batch_norm(bn)
    _close(same(x).detach().numpy(), frozen(x).detach().numpy())
    if TORCH_BN_HAS_BIAS:                                       # a bn without bias: a frozen zero bias
        from bnlib.nn import BatchNorm2d
        for make in (torch.nn.BatchNorm2d, BatchNorm2d):
            no_bias = make(4, bias=False, dtype=torch.float64)
            no_bias.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "bias"})
            no_bias.eval()
            _close(FrozenBatchNorm2d.from_batch_norm(no_bias)(x).detach().numpy(), no_bias(x).detach().numpy())
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        frozen(torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        frozen(torch.zeros(2, 4, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nn_frozen_batch_norm_2d_half_input_with_float32_buffers(dtype):
    """What autocast produces, as torch.nn.BatchNorm2d in eval mode: float16/bfloat16 input with float32
    buffers is accepted; y and dx have the input's dtype, computed in float32; the buffers stay float32."""
    rng = np.random.default_rng(8)
    bn = _trained_torch_bn(rng).float()
    frozen = FrozenBatchNorm2d.from_batch_norm(bn).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.from_numpy(rng.normal(1.0, 2.0, (3, 4, 5, 5))).to(dtype).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = torch.from_numpy(rng.normal(size=(3, 4, 5, 5))).to(dtype)
    y, y_torch = frozen(x), bn(x2)
    y.backward(dy)
    y_torch.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(y, y_torch)                      # the dtype's default tolerances
    torch.testing.assert_close(x.grad, x2.grad)
    # computed in float32: within one rounding of the float64 result (y's values are below 16 in size)
    def per_channel(t):
        return t.detach().double()[:, None, None]

    exact = ((x.detach().double() - per_channel(bn.running_mean)) / torch.sqrt(per_channel(bn.running_var) + bn.eps)
             * per_channel(bn.weight) + per_channel(bn.bias))
    assert exact.abs().max().item() < 16
    assert (y.detach().double() - exact).abs().max().item() <= 16 * torch.finfo(dtype).eps
    for k, v in frozen.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])


def test_nn_frozen_batch_norm_2d_buffers_that_require_grad():
    """weight and bias made to require grad get torch's eval-mode gradients; a running statistic that
    requires grad is refused at the forward (as torch.nn.functional.batch_norm in eval refuses it), not
    at the backward, and computes under no_grad."""
    rng = np.random.default_rng(10)
    bn = _trained_torch_bn(rng)
    x = torch.from_numpy(rng.normal(size=(3, 4, 5, 5)))
    dy = torch.from_numpy(rng.normal(size=(3, 4, 5, 5)))
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    frozen.weight.requires_grad_(True)
    frozen.bias.requires_grad_(True)
    frozen(x).backward(dy)
    bn.zero_grad()
    bn(x).backward(dy)
    _close(frozen.weight.grad.numpy(), bn.weight.grad.numpy())
    _close(frozen.bias.grad.numpy(), bn.bias.grad.numpy())
    for name in ("running_mean", "running_var"):
        frozen = FrozenBatchNorm2d.from_batch_norm(bn)
        getattr(frozen, name).requires_grad_(True)
        before = {k: v.detach().clone() for k, v in frozen.state_dict().items()}
        with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{name}'"):
            frozen(x)
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            torch.nn.functional.batch_norm(x, frozen.running_mean, frozen.running_var, training=False)
        for k, v in frozen.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)
        with torch.no_grad():
            _close(frozen(x).numpy(), bn(x).detach().numpy())


def test_nn_frozen_batch_norm_2d_invalid_dtypes_raise_and_change_no_state():
    rng = np.random.default_rng(9)
    frozen = FrozenBatchNorm2d.from_batch_norm(_trained_torch_bn(rng).float())
    frozen.running_var = frozen.running_var.to(torch.bfloat16)  # a buffer that fits neither float16 nor float64
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    cases = [(torch.float64, "float64 input, float32 buffers", r"weight in torch\.float64, got torch\.float32"),
             (torch.float16, "bfloat16 running_var",
              r"running_var in torch\.float16 or torch\.float32, got torch\.bfloat16"),
             (torch.int32, "integer input", r"supports float16, bfloat16, float32 and float64 input, got torch\.int32")]
    for dtype, what, match in cases:
        x = torch.ones(2, 4, 3, 3, dtype=dtype)
        with pytest.raises(TypeError, match=match):
            frozen(x)
        for k, v in frozen.state_dict().items():
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), (what, k)
        assert torch.equal(x, torch.ones_like(x)), what


# ---------------------------------------------------------------- errors and state on error
def _ghost_after_forward():
    ghost = V.GhostBatchNorm(3, 4)
    ghost(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    return ghost


def test_layer_norm_takes_unbatched_input_both_ways_and_dtype_none_is_float32():
    """torch.nn.LayerNorm takes input of just normalized_shape (no batch axis), and so does the forward here; the
    backward used to refuse the same shape for dy (it checked dy as batch-norm input, of 2 or more axes)."""
    rng = np.random.default_rng(0)
    ours, theirs = V.LayerNorm(5, dtype=np.float64), torch.nn.LayerNorm(5, dtype=torch.float64)
    x, dy = rng.normal(1.0, 2.0, 5), rng.normal(size=5)
    xt = torch.from_numpy(x).requires_grad_()
    theirs(xt).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(ours.forward(x), theirs(xt).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(ours.backward(dy), xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), atol=1e-12)
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward input \(5,\), got \(1, 5\)"):
        ours.backward(dy[None])
    for layer in (V.LayerNorm(3, dtype=None), V.GroupNorm(1, 3, dtype=None), V.InstanceNorm(3, affine=True, dtype=None)):
        assert layer.weight.dtype == np.float32                 # as torch's dtype=None and layers.BatchNorm's


@pytest.mark.parametrize("make", [lambda: V.BatchRenorm(3, bias=False), lambda: V.GhostBatchNorm(3, 8, bias=False)])
def test_batch_norm_variants_without_a_bias_are_batch_norm_without_one(make):
    """bias=False (torch.nn.BatchNorm2d's, a weight-only layer): BatchRenorm at r = 1, d = 0 and GhostBatchNorm with
    one virtual batch are then BatchNorm(bias=False) bit for bit, with no bias gradient and no 'bias' key."""
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(8, 3, 2)).astype(np.float32), rng.normal(size=(8, 3, 2)).astype(np.float32)
    ours, plain = make(), BatchNorm(3, bias=False)
    np.testing.assert_array_equal(ours.forward(x), plain.forward(x))
    np.testing.assert_array_equal(ours.backward(dy), plain.backward(dy))
    np.testing.assert_allclose(ours.grad_weight, plain.grad_weight, rtol=1e-6)
    assert ours.grad_bias is None and "bias" not in ours.state_dict() and "bias=False" in repr(ours)


@pytest.mark.skipif(not TORCH_BN_HAS_BIAS, reason="torch.nn.BatchNorm2d has bias= from torch 2.12 on")
def test_frozen_batch_norm_loads_a_weight_only_checkpoint():
    theirs = torch.nn.BatchNorm2d(3, bias=False).eval()
    with torch.no_grad():
        theirs.running_var.uniform_(0.5, 2.0)
        theirs.running_mean.normal_()
        theirs.weight.uniform_(0.5, 1.5)
    frozen = V.FrozenBatchNorm(3, bias=False).load_state_dict(theirs.state_dict())     # strict
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(frozen.forward(x), theirs(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    assert list(frozen.state_dict()) == ["weight", "running_mean", "running_var"]


def _without_running_var():
    bn = torch.nn.BatchNorm2d(3)
    bn.running_var = None
    return bn


@pytest.mark.parametrize("call, error, match", [
    (lambda: V.LayerNorm(0), ValueError, "normalized_shape"),
    (lambda: V.LayerNorm("4"), TypeError, "normalized_shape"),
    (lambda: V.GroupNorm(4, 6), ValueError, "divisible"),
    (lambda: V.GroupNorm(2, 6, eps=-1), ValueError, "eps"),
    (lambda: V.GroupNorm(2, 6, dtype=np.int32), TypeError, "dtype"),
    (lambda: V.LayerNorm(3, dtype=torch.float32), TypeError, "dtype must be NumPy's float32 or float64, got torch"),
    (lambda: V.LayerNorm(2)(np.ma.masked_array(np.ones((3, 2)), mask=[[0, 1]] * 3)), TypeError, "x is a masked array"),
    (lambda: V.InstanceNorm(3, momentum=None), ValueError, "momentum"),
    (lambda: V.InstanceNorm(3, momentum=True), ValueError, r"got True.*a bool, which torch would read as 1"),
    (lambda: V.BatchRenorm(3, r_max=0.5), ValueError, "r_max"),
    (lambda: V.BatchRenorm(3, d_max=-1), ValueError, "d_max"),
    (lambda: V.GhostBatchNorm(3, 0), ValueError, "virtual_batch_size"),
    (lambda: V.GhostBatchNorm(3, 4)(np.zeros((9, 3), np.float32)), ValueError, r"\(9, 3\).*virtual_batch_size"),
    (lambda: V.GhostBatchNorm(3, 4)(np.zeros((5, 3, 1), np.float32)), ValueError, r"virtual_batch_size"),
    (lambda: V.LayerNorm(4)(np.zeros((2, 5))), ValueError, r"\(\*, 4\)"),
    (lambda: V.GroupNorm(2, 4)(np.zeros((2, 3, 5))), ValueError, "num_channels"),
    (lambda: V.GroupNorm(2, 4)(np.zeros((2, 4), dtype=np.int64)), TypeError, "dtype"),
    (lambda: V.InstanceNorm(4)(np.zeros((2, 4))), ValueError, "spatial position"),
    (lambda: V.LayerNorm(4).backward(np.zeros((2, 4))), ValueError, "forward"),
    (lambda: V.normalize(np.arange(6).reshape(2, 3), (1,)), TypeError, "floating-point"),
    (lambda: V.normalize(np.ones((2, 3)), (1,), eps=-1e-3), ValueError, "eps must be a finite number >= 0"),
    (lambda: V.batch_renorm_limits(10, r_max=0.5), ValueError, "r_max"),
    (lambda: V.batch_renorm_limits(10, d_max=-1.0), ValueError, "d_max"),
    (lambda: V.GhostBatchNorm(3, 4)(torch.zeros(8, 3)), TypeError, "Tensor"),
    (lambda: V.BatchRenorm(3)(torch.zeros(8, 3)), TypeError, "Tensor"),
    (lambda: FrozenBatchNorm2d.from_batch_norm(torch.nn.Linear(3, 3)), TypeError, "Linear"),
    (lambda: FrozenBatchNorm2d(3, eps=True), ValueError, "eps"),
    # the flags are booleans: 'no' or 1 used to be read as True
    (lambda: V.LayerNorm(4, elementwise_affine="no"), TypeError, "elementwise_affine must be True or False, got 'no'"),
    (lambda: V.GroupNorm(2, 4, affine=1), TypeError, "affine must be True or False, got 1"),
    (lambda: V.InstanceNorm(4, track_running_stats="yes"), TypeError, "track_running_stats must be True or False"),
    (lambda: V.GroupNorm(2, 4, affine=False, bias=None), TypeError, "bias must be True or False, got None"),
    # a BN whose statistics were set to None by hand, its flags still True (it had failed in load_state_dict)
    (lambda: FrozenBatchNorm2d.from_batch_norm(_without_running_var()), ValueError, "bn.running_var is None"),
    (lambda: torch.jit.script(torch.nn.Sequential(FrozenBatchNorm2d(3))), TypeError, "FrozenBatchNorm2d cannot be compiled"),
    # a tensor dy used to be reported as a shape mismatch ("got torch.Size([8, 3])")
    (lambda: _ghost_after_forward().backward(torch.zeros(8, 3)), TypeError, "dy must be a NumPy array, got Tensor"),
])
def test_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("make, good_shape, bad_shape", [
    (lambda: V.BatchRenorm(3, r_max=2, d_max=1), (4, 3), (1, 3)),
    (lambda: V.GhostBatchNorm(3, 2), (4, 3), (5, 3)),                         # last virtual batch of 1
    (lambda: V.InstanceNorm(3, track_running_stats=True, affine=True), (4, 3, 2), (4, 3, 1)),
    (lambda: V.GroupNorm(1, 3), (4, 3, 2), (4, 2, 2)),
    (lambda: V.LayerNorm(3), (4, 3), (4, 2)),
])
def test_a_raising_call_changes_no_state(make, good_shape, bad_shape):
    rng = np.random.default_rng(7)
    layer = make()
    layer(rng.normal(size=good_shape).astype(np.float32))
    before = copy.deepcopy(layer.__dict__)
    with pytest.raises(ValueError):
        layer(rng.normal(size=bad_shape).astype(np.float32))
    with pytest.raises((ValueError, TypeError)):
        layer.load_state_dict({k: np.zeros(7, np.float32) for k in layer.state_dict()})
    with pytest.raises((ValueError, TypeError)):
        layer.backward(np.zeros((9, 9), np.float32))
    for key, value in before.items():
        now = layer.__dict__[key]
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, now), key
        elif key != "_cache":
            assert value == now, key
    assert layer._cache is not None                                  # the good forward's cache survives


@pytest.mark.parametrize("make", [lambda: V.LayerNorm(4), lambda: V.GroupNorm(2, 4), lambda: V.BatchRenorm(4),
                                  lambda: V.GhostBatchNorm(4, 3), lambda: V.FrozenBatchNorm(4)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_and_gradient_keep_the_input_dtype(make, dtype):
    layer = make()
    x = np.random.default_rng(8).normal(size=(6, 4)).astype(dtype)
    assert layer(x).dtype == dtype and layer.backward(np.ones_like(x)).dtype == dtype
    assert all(v.dtype in (np.float32, np.int64) for v in layer.state_dict().values())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_instance_norm_output_and_gradient_keep_the_input_dtype(dtype, training):
    layer = V.InstanceNorm(4, affine=True, track_running_stats=True)
    x = np.random.default_rng(8).normal(size=(6, 4, 5)).astype(dtype)
    layer(x)                                                          # running statistics to evaluate with
    layer.train(training)
    assert layer(x).dtype == dtype and layer.backward(np.ones_like(x)).dtype == dtype
    assert all(v.dtype in (np.float32, np.int64) for v in layer.state_dict().values())


def test_normalize_backward_refuses_what_would_broadcast_into_a_wrong_gradient():
    x_hat, inv_std = V.normalize(np.random.default_rng(1).normal(size=(2, 3)), (1,))
    dx = V.normalize_backward(np.ones((2, 3)), x_hat, inv_std, 1)
    assert dx.shape == (2, 3) and np.abs(dx).max() < 1e-12            # a constant upstream gradient: zero
    for call, error, words in [
            (lambda: V.normalize_backward(np.ones((2, 3)), np.ones((1, 3)), np.ones((2, 1)), (1,)), ValueError,
             ["dx_hat", "(1, 3)", "(2, 3)"]),                        # was broadcast into a (2, 3) result
            (lambda: V.normalize_backward(np.ones((2, 3)), x_hat, np.ones((1, 3)), (1,)), ValueError,
             ["inv_std", "(2, 1)", "(1, 3)"]),
            (lambda: V.normalize_backward(np.ones((2, 3), int), x_hat, inv_std, (1,)), TypeError, ["dx_hat", "int"]),
            (lambda: V.normalize_backward([[1.0] * 3] * 2, x_hat, inv_std, (1,)), TypeError, ["dx_hat", "list"]),
            (lambda: V.normalize_backward(np.ones((2, 3)), x_hat, inv_std, (5,)), ValueError, ["axes must be"])]:
        with pytest.raises(error) as info:
            call()
        assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("make", [
    lambda: V.LayerNorm(5, elementwise_affine=False), lambda: V.LayerNorm(5), lambda: V.GroupNorm(2, 4, affine=False),
    lambda: V.GroupNorm(2, 4), lambda: V.InstanceNorm(4), lambda: V.InstanceNorm(4, affine=True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_changing_the_output_in_place_leaves_the_gradient_alone(make, dtype):
    """The output is the caller's to change (an in-place ReLU): it must not be the x_hat the layer keeps
    for backward. Without affine parameters (InstanceNorm's default) it was that very array."""
    rng = np.random.default_rng(11)
    x, dy = rng.normal(size=(3, 4, 5)).astype(dtype), rng.normal(size=(3, 4, 5)).astype(dtype)
    layer = make()
    layer(x)
    clean = layer.backward(dy)
    y = layer(x)
    np.maximum(y, 0, out=y)
    np.testing.assert_array_equal(layer.backward(dy), clean)


def test_a_call_runs_a_subclass_forward():
    class Scheduled(V.BatchRenorm):                      # as the chapter's scheduled renorm does it
        def forward(self, x):
            self.set_limits(*V.batch_renorm_limits(self.num_batches_tracked, warmup_steps=1, r_max_step=3,
                                                   d_max_step=2))
            return super().forward(x)

    layer = Scheduled(3)
    x = np.random.default_rng(9).normal(size=(4, 3)).astype(np.float32)
    for _ in range(3):
        layer(x)
    assert (layer.r_max, layer.d_max) == (2.0, 5.0) and layer.num_batches_tracked == 3


def test_instance_norm_empty_batch_returns_empty_and_keeps_running_statistics():
    warnings.simplefilter("error")                              # no "Mean of empty slice" RuntimeWarning
    layer = V.InstanceNorm(3, affine=True, track_running_stats=True)
    before = layer.state_dict()
    y = layer(np.zeros((0, 3, 4), np.float32))
    assert y.shape == (0, 3, 4) and y.dtype == np.float32
    assert all(np.array_equal(v, layer.state_dict()[k]) for k, v in before.items())
    layer.grad_weight[...] = 7.0
    dx = layer.backward(np.zeros((0, 3, 4), np.float32))
    assert dx.shape == (0, 3, 4) and not layer.grad_weight.any() and not layer.grad_bias.any()
    group = V.GroupNorm(2, 4)
    assert group(np.zeros((0, 4, 3, 2), np.float32)).shape == (0, 4, 3, 2)
    assert group.backward(np.zeros((0, 4, 3, 2), np.float32)).shape == (0, 4, 3, 2)
    with pytest.raises(ValueError, match="spatial position"):
        layer(np.zeros((0, 3, 1), np.float32))


@pytest.mark.parametrize("make", [lambda: V.BatchRenorm(3, r_max=2.0, d_max=1.0), lambda: V.GhostBatchNorm(3, 4)])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (6, 3, 0)])
def test_renorm_and_ghost_empty_batch_return_empty_and_keep_state(make, shape):
    """As BatchNorm: an empty batch in training gives an empty output, an empty dx, zero parameter
    gradients, and leaves every parameter and buffer as it was."""
    layer = make()
    layer(np.random.default_rng(0).normal(size=(8, 3, 4)).astype(np.float32))      # some state first
    before = layer.state_dict()
    y = layer(np.zeros(shape, np.float32))
    assert y.shape == shape and y.dtype == np.float32
    assert all(np.array_equal(v, layer.state_dict()[k]) for k, v in before.items())
    layer.grad_weight[...] = 7.0
    dx = layer.backward(np.zeros(shape, np.float32))
    assert dx.shape == shape and not layer.grad_weight.any() and not layer.grad_bias.any()


@pytest.mark.filterwarnings("error")                  # torch is silent here, and so must we be
@pytest.mark.parametrize("make, shape", [(lambda: V.GroupNorm(3, 6), (4, 6, 0)), (lambda: V.LayerNorm(4), (0, 4)),
                                         (lambda: V.GroupNorm(2, 4), (0, 4, 3))])
def test_zero_size_input_gives_empty_output_without_warnings(make, shape):
    layer = make()
    x = np.ones(shape, np.float32)
    y = layer(x)
    dx = layer.backward(np.ones_like(x))
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == np.float32


def test_normalize_takes_an_axis_or_distinct_axes_and_names_axes_otherwise():
    normalize = V.normalize
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    want, _ = normalize(x, (0, 2))
    for same in ([0, 2], (2, 0), (0, -1), np.array([0, 2])):
        np.testing.assert_array_equal(normalize(x, same)[0], want)
    np.testing.assert_array_equal(normalize(x, 1)[0], normalize(x, (1,))[0])
    assert normalize(np.ones((0, 3)), 1)[1].shape == (0, 1)          # an empty x takes the same axes
    for bad in ((2, 2), (), "a", (True,), 3, (0.5,), None):
        with pytest.raises(ValueError, match="axes must be"):
            normalize(x, bad)


@pytest.mark.parametrize("make", [lambda: BatchNorm(3), lambda: V.LayerNorm(3), lambda: V.GroupNorm(1, 3),
                                  lambda: V.InstanceNorm(3), lambda: V.BatchRenorm(3), lambda: V.GhostBatchNorm(3, 2)])
def test_train_takes_a_boolean_mode_only_as_torch_does(make):
    layer = make()
    for bad in ("no", 0, 1, None):                     # "no" was truthy: training mode, silently
        with pytest.raises(ValueError, match="training mode is expected to be boolean"):
            layer.train(bad)
        assert layer.training is True                  # unchanged by the call that raised
    assert layer.train(np.bool_(False)).training is False and layer.eval().training is False
