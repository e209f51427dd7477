"""bnlib.layers.BatchNorm (chapter 04) against torch.nn.BatchNorm1d/2d/3d over random settings."""
import numpy as np
import pytest
import torch

from bnlib.layers import BatchNorm
from bnlib.nn import _TORCH_BN_HAS_BIAS

pytestmark = pytest.mark.usefixtures("cpu_backend")

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


@pytest.mark.parametrize("seed", range(12))
def test_layer_matches_torch_over_steps(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 6))
    C = int(rng.integers(1, 6))
    shape = (int(rng.integers(2, 7)), C) + tuple(int(rng.integers(1, 5)) for _ in range(ndim - 2))
    momentum = [0.1, None, float(rng.uniform(0, 1))][seed % 3]
    eps = float(10 ** rng.uniform(-6, -2))
    affine, track = bool(seed % 4 != 1), bool(seed % 5 != 2)
    dtype = [np.float64, np.float32][seed % 2]
    ours = BatchNorm(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    theirs = TORCH_BN[ndim](C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    if dtype == np.float64:
        theirs = theirs.double()
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
        ours.load_state_dict(theirs.state_dict())
    tol = 1e-10 if dtype == np.float64 else 3e-4
    for step in range(5):
        if step == 4:
            ours.eval(), theirs.eval()
        x = rng.normal(loc=2.0, scale=3.0, size=shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.from_numpy(dy))
        y, dx = ours(x), ours.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=tol, rtol=tol)
        scale = float(np.abs(dy).max() * (np.abs(ours.weight).max() if affine else 1.0) / np.sqrt(eps) * 0 + 1)
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=tol * 10 * scale, rtol=tol)
        if affine:
            np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), atol=tol * 10, rtol=tol)
            np.testing.assert_allclose(ours.grad_bias, theirs.bias.grad.numpy(), atol=tol * 10, rtol=tol)
            theirs.weight.grad = theirs.bias.grad = None
        if track:
            np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), atol=tol, rtol=tol)
            np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), atol=tol, rtol=tol)
            assert ours.num_batches_tracked == int(theirs.num_batches_tracked)


def test_state_dict_round_trip_with_torch():
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3))
    ours = BatchNorm(4).load_state_dict(theirs.state_dict())
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert list(BatchNorm(4, affine=False).state_dict()) == list(torch.nn.BatchNorm2d(4, affine=False).state_dict())
    assert list(BatchNorm(4, track_running_stats=False).state_dict()) == ["weight", "bias"]
    state["running_mean"][:] = 99            # state_dict returns copies
    assert ours.running_mean[0] != 99


@pytest.mark.skipif(not _TORCH_BN_HAS_BIAS, reason="torch.nn.BatchNorm2d has bias= from torch 2.12 on")
def test_bias_false_is_torchs_weight_only_layer_and_its_state_dict_loads_both_ways():
    theirs = torch.nn.BatchNorm2d(3, bias=False)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    dy = torch.randn(6, 3, 4, 4)
    ours = BatchNorm(3, bias=False).load_state_dict(theirs.state_dict())          # strict: no 'bias' key
    assert ours.bias is None and ours.grad_bias is None and list(ours.state_dict()) == list(theirs.state_dict())
    y = ours.forward(x.detach().numpy())
    theirs(x).backward(dy)
    np.testing.assert_allclose(y, theirs(x.detach()).detach().numpy(), atol=1e-5)   # (a second step for torch's stats)
    dx = ours.backward(dy.numpy())
    np.testing.assert_allclose(dx, x.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    assert "bias=False" in repr(ours)
    torch.nn.BatchNorm2d(3, bias=False).load_state_dict({k: torch.as_tensor(v) for k, v in ours.state_dict().items()})
    with pytest.raises(ValueError, match=r"unexpected keys \['bias'\]"):
        BatchNorm(3, bias=False).load_state_dict(torch.nn.BatchNorm2d(3).state_dict())
    with pytest.raises(TypeError, match="bias must be True or False"):
        BatchNorm(3, bias=None)


def test_a_state_dict_without_num_batches_tracked_loads_as_in_torch():
    """torch loads a state dict saved before num_batches_tracked existed, strict or not, keeping the layer's count."""
    old = {k: v for k, v in torch.nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked"}
    old["running_mean"] = torch.full((3,), 2.0)
    ours, theirs = BatchNorm(3), torch.nn.BatchNorm2d(3)
    ours.num_batches_tracked = 7
    theirs.num_batches_tracked.fill_(7)
    ours.load_state_dict(old)
    theirs.load_state_dict(old)
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked) == 7
    np.testing.assert_array_equal(ours.running_mean, [2.0] * 3)


def test_eps_zero_is_refused_with_batch_statistics_as_in_torch_and_allowed_in_evaluation():
    x = np.ones((4, 2), np.float32)
    for layer in (BatchNorm(2, eps=0.0), BatchNorm(2, eps=0.0, track_running_stats=False).eval()):
        before = snapshot(layer)
        with pytest.raises(ValueError, match="eps must be > 0 when batch statistics are used"):
            layer.forward(x)                        # was NaN for the constant channels, without a word
        assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        torch.nn.BatchNorm1d(2, eps=0.0)(torch.from_numpy(x))
    np.testing.assert_array_equal(BatchNorm(2, eps=0.0).eval().forward(x), x)       # running var 1: finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_torch_checkpoints_load_exactly(dtype):
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3) * 3 + 1)
    state = theirs.to(dtype).state_dict()
    for layer_dtype in (np.float32, np.float64):
        ours = BatchNorm(4, dtype=layer_dtype).load_state_dict(state)
        for key, value in state.items():
            expected = value.double().numpy() if value.is_floating_point() else value.numpy()
            np.testing.assert_array_equal(np.asarray(getattr(ours, key), np.float64), expected)
            if value.is_floating_point():
                assert getattr(ours, key).dtype == layer_dtype


def snapshot(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    after = snapshot(layer)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def _eval_backward(layer, dy):
    """An evaluation-mode forward (it changes no state), then backward(dy) through its fixed affine map."""
    layer.eval().forward(np.ones((8, 3), np.float32))
    return layer.backward(dy)


def _empty_backward(layer, dy):
    """A forward of an empty batch (it changes no state), then backward(dy)."""
    layer.forward(np.ones((0, 3), np.float32))
    return layer.backward(dy)


@pytest.mark.parametrize("call, error, words", [
    (lambda l: l.forward(np.ones((4, 5), np.float32)), ValueError, ["3 channels", "(4, 5)"]),
    (lambda l: l.forward(np.ones((1, 3), np.float32)), ValueError, ["more than 1 value per channel"]),
    (lambda l: l.forward(np.ones(3, np.float32)), ValueError, ["(3,)"]),
    (lambda l: l.forward(np.ones((4, 3), np.int32)), TypeError, ["int32"]),
    (lambda l: l.forward(np.ones((4, 3), np.complex64)), TypeError, ["complex64"]),
    (lambda l: l.forward([[1.0, 2.0, 3.0]]), TypeError, ["list"]),
    (lambda l: l.forward(np.ones((4, 3), ">f4")), TypeError, ["byte order", ">f4"]),
    (lambda l: l.backward(np.ones((8, 3), ">f4")), TypeError, ["dy", "byte order"]),
    (lambda l: l.load_state_dict({**snapshot(l), "weight": torch.empty(3, device="meta")}), TypeError, ["weight", "Tensor"]),
    (lambda l: l.backward(np.ones((8, 2), np.float32)), ValueError, ["dy", "(8, 3)"]),
    (lambda l: l.backward(np.ones((8, 3), np.float64)), TypeError, ["dy", "float32"]),
    (lambda l: l.load_state_dict({"weight": np.ones(3)}), ValueError, ["missing", "bias"]),
    (lambda l: l.load_state_dict({**snapshot(l), "extra": np.ones(3)}), ValueError, ["unexpected", "extra"]),
    (lambda l: l.load_state_dict({**snapshot(l), "running_var": np.ones(4)}), ValueError, ["running_var", "(3,)", "(4,)"]),
    (lambda l: l.load_state_dict({**snapshot(l), "weight": np.ones(3, np.int64)}), TypeError, ["weight", "int64"]),
    (lambda l: l.load_state_dict({**snapshot(l), "num_batches_tracked": np.ones(2, np.int64)}), ValueError,
     ["num_batches_tracked"]),
    (lambda l: l.load_state_dict([1, 2]), TypeError, ["mapping"]),
    (lambda l: l.load_state_dict({**snapshot(l), "num_batches_tracked": np.int64(-1)}), ValueError,
     ["num_batches_tracked", "-1"]),
    # a negative running variance (no batch gives one; torch loads it) and a count beyond int64 are refused
    (lambda l: l.load_state_dict({**snapshot(l), "running_var": torch.tensor([1.0, -0.5, 2.0])}), ValueError,
     ["running_var", "negative", "-0.5", "channel 1"]),
    (lambda l: l.load_state_dict({**snapshot(l), "num_batches_tracked": np.uint64(2**63)}), ValueError,
     ["num_batches_tracked", "int64", "9223372036854775808"]),
    # dy of the wrong kind after an evaluation or an empty batch (training's backward checked it already): a
    # tensor was reported as a dtype mismatch ("got torch.float32"), a list as a shape mismatch
    (lambda l: _eval_backward(l, torch.ones(8, 3)), TypeError, ["dy", "Tensor", "bnlib.nn"]),
    (lambda l: _eval_backward(l, [[1.0] * 3] * 8), TypeError, ["dy", "list"]),
    (lambda l: _eval_backward(l, np.ones((8, 2), np.float32)), ValueError, ["dy", "(8, 3)", "(8, 2)"]),
    (lambda l: _empty_backward(l, torch.ones(0, 3)), TypeError, ["dy", "Tensor", "bnlib.nn"]),
    (lambda l: _empty_backward(l, []), TypeError, ["dy", "list"]),
])
def test_failing_calls_raise_clearly_and_change_nothing(call, error, words):
    layer = BatchNorm(3)
    layer.forward(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    layer.momentum = 0.5
    before = snapshot(layer)
    with pytest.raises(error) as info:
        call(layer)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert_unchanged(layer, before)


def test_partial_load_with_bad_value_changes_nothing():
    layer = BatchNorm(3)
    before = snapshot(layer)
    bad = {"weight": np.full(3, 7.0), "bias": np.full(3, 7.0), "running_mean": np.full(3, 7.0),
           "running_var": np.ones(5), "num_batches_tracked": np.array(3)}
    with pytest.raises(ValueError):
        layer.load_state_dict(bad)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_features=0), ["num_features"]), (dict(num_features=2.5), ["num_features"]),
    (dict(num_features=3, eps=-1), ["eps"]), (dict(num_features=3, momentum=1.5), ["momentum"]),
    (dict(num_features=3, dtype=np.int32), ["dtype"]),
    # bools are refused (BatchNorm(3, 1e-3, True) meant affine=True), and a torch dtype is named
    (dict(num_features=3, eps=True), ["eps", "True"]), (dict(num_features=3, momentum=True), ["momentum", "True"]),
    (dict(num_features=3, dtype=torch.float32), ["dtype", "torch.float32"]),
    # flags that are not True or False: torch reads affine="no" as true
    (dict(num_features=3, affine="no"), ["affine", "'no'"]), (dict(num_features=3, track_running_stats=1), ["track_running_stats", "1"]),
    (dict(num_features=3, bias=None), ["bias", "None"]),
])
def test_constructor_checks(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as info:
        BatchNorm(**kwargs)
    assert all(w in str(info.value) for w in words)


def test_dtype_none_is_the_default_as_in_torch():
    """np.dtype(None) is float64; the layer reads dtype=None as torch does, the default float32."""
    layer = BatchNorm(3, dtype=None)
    assert layer.dtype == np.float32 and layer.weight.dtype == np.float32 and layer.running_var.dtype == np.float32


def test_float16_noncontiguous_and_fortran_inputs():
    rng = np.random.default_rng(3)
    layer = BatchNorm(6, dtype=np.float32)
    base = rng.normal(size=(10, 12, 4, 3))
    ref = torch.nn.functional.batch_norm(torch.from_numpy(base[:, ::2]), None, None, training=True).numpy()
    for x in (base[:, ::2].astype(np.float32), np.asfortranarray(base[:, ::2]).astype(np.float32)):
        np.testing.assert_allclose(layer.forward(x), ref, atol=2e-5)
    y16 = layer.forward(base[:, ::2].astype(np.float16))
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16.astype(np.float64), ref, atol=5e-3)


def test_backward_before_forward_and_eval_backward():
    layer = BatchNorm(2, dtype=np.float64)
    with pytest.raises(ValueError, match="forward"):
        layer.backward(np.ones((3, 2)))
    layer.eval()
    x, dy = np.random.default_rng(1).normal(size=(3, 2)), np.ones((3, 2))
    layer.forward(x)
    np.testing.assert_allclose(layer.backward(dy), dy / np.sqrt(1 + 1e-5))
    np.testing.assert_allclose(layer.grad_bias, [3.0, 3.0])


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (5, 3, 0), (2, 3, 0, 4)])
@pytest.mark.parametrize("training, track", [(True, True), (False, True), (True, False), (False, False)])
def test_empty_batch_gives_empty_output_and_changes_nothing(shape, training, track):
    """A zero-size batch: empty output of x's dtype, no change to parameters or running statistics
    (num_batches_tracked included); backward: empty dx, zero parameter gradients."""
    layer = BatchNorm(3, track_running_stats=track)
    layer.forward(np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    layer.train(training)
    before = snapshot(layer)
    y = layer.forward(np.zeros(shape, np.float32))
    assert y.shape == shape and y.dtype == np.float32
    assert_unchanged(layer, before)
    layer.grad_weight[...], layer.grad_bias[...] = 5.0, 5.0
    dx = layer.backward(np.zeros(shape, np.float32))
    assert dx.shape == shape and dx.dtype == np.float32
    assert not layer.grad_weight.any() and not layer.grad_bias.any()
    with pytest.raises(ValueError, match="shape"):
        layer.backward(np.zeros((1,) + shape[1:], np.float32))
    with pytest.raises(TypeError, match="int32"):
        layer.forward(np.zeros(shape, np.int32))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_raises_like_torch(shape):
    layer = BatchNorm(3)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer.forward(np.ones(shape, np.float32))
    assert_unchanged(layer, before)
    layer.eval()
    assert layer.forward(np.ones(shape, np.float32)).shape == shape          # evaluation: running statistics


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")     # NumPy's warnings for 1/0, 0 * inf
def test_eps_zero_constant_channel_is_nan_on_every_cpu_path():
    """eps = 0 is allowed by the functional API (the layer refuses it with batch statistics, as torch); a channel
    with zero variance then divides by zero. Every CPU path gives NaN for that channel (as NumPy's 0 * inf does)
    and the same finite values elsewhere; none raises."""
    from bnlib import functional as F
    from bnlib import cpu
    rng = np.random.default_rng(3)
    for shape in [(6, 3), (6, 3, 5), (70000, 3)]:              # the last one runs numba's threaded kernels
        x = rng.normal(size=shape).astype(np.float32)
        x[:, 1] = 2.5                                          # channel 1 is constant
        outputs = {}
        previous = cpu.get_backend()
        try:
            for backend in cpu.available_backends():
                cpu.set_backend(backend)
                y, cache = F.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), eps=0.0)
                dx = F.batch_norm_backward(np.ones_like(x), cache)[0]
                outputs[backend] = y, dx
        finally:
            cpu.set_backend(previous)
        for backend, (y, dx) in outputs.items():
            assert np.isnan(y[:, 1]).all(), (backend, shape)
            assert np.isfinite(np.delete(y, 1, axis=1)).all() and np.isfinite(np.delete(dx, 1, axis=1)).all()
            np.testing.assert_allclose(np.delete(y, 1, axis=1), np.delete(outputs["portable"][0], 1, axis=1),
                                       rtol=1e-4, atol=1e-5)


def test_nan_running_var_loads_and_numpy_bools_are_flags():
    """Only a negative running variance is refused: NaN (a diverged run) loads, as in torch, and evaluation passes it
    on; np.True_ is a flag like True."""
    layer = BatchNorm(3, affine=np.True_, track_running_stats=np.bool_(True))
    assert layer.affine is True and layer.track_running_stats is True
    layer.load_state_dict({**layer.state_dict(), "running_var": np.array([1.0, np.nan, 0.0])})
    y = layer.eval().forward(np.ones((4, 3), np.float32))
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
