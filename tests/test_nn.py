"""bnlib.nn (chapter 06): the torch drop-ins, conversion, folding and SyncBatchNorm over gloo."""
import copy
import multiprocessing
import os
import tempfile

import numpy as np
import pytest
import torch

from bnlib import nn as bnn

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
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype, bias=bias)
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
    assert torch.autograd.gradcheck(lambda x, w, b: bnn.BatchNormFunction.apply(x, w, b, 1e-5, None), (x, w, b))


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
    (lambda: bnn.BatchNorm1d(4)(torch.randn(1, 4)), ValueError, ["more than 1 value per channel"]),
    (lambda: bnn.BatchNorm1d(4, track_running_stats=False).eval()(torch.randn(1, 4)), ValueError,
     ["more than 1 value per channel"]),
    (lambda: bnn.BatchNorm1d(4)(np.zeros((4, 4))), TypeError, ["torch.Tensor", "ndarray"]),
    (lambda: bnn.BatchNorm1d(0), ValueError, ["num_features"]),
    (lambda: bnn.BatchNorm1d(3, momentum=2.0), ValueError, ["momentum"]),
])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(w in str(info.value) for w in words), str(info.value)


def test_failed_forward_changes_no_buffer():
    layer = bnn.BatchNorm1d(4)
    layer(torch.randn(8, 4))
    before = copy.deepcopy(layer.state_dict())
    for bad in (torch.randn(1, 4), torch.randn(8, 3), torch.randn(8, 4, dtype=torch.float64)):
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
    weight_before = layer.weight.clone()
    fused = fold_batch_norm_checked(layer, bn, shape)
    assert torch.equal(layer.weight, weight_before)          # inputs untouched
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


# ----------------------------------------------------------------------------- SyncBatchNorm

def _sync_worker(rank, sizes, shape_tail, init_file, results):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(sizes))
    try:
        gen = torch.Generator().manual_seed(5)
        C = 3
        xs = [torch.randn((n, C) + shape_tail, generator=gen, dtype=torch.float64) * 2 + 1 for n in sizes]
        dys = [torch.randn((n, C) + shape_tail, generator=gen, dtype=torch.float64) for n in sizes]
        ref = (torch.nn.BatchNorm1d if len(shape_tail) < 2 else torch.nn.BatchNorm2d)(C, momentum=0.3).double()
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen)
            ref.bias.normal_(generator=gen)
        sync = bnn.SyncBatchNorm(C, momentum=0.3).double()
        sync.load_state_dict(ref.state_dict())
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        worst = 0.0
        for _ in range(3):
            x = xs[rank].clone().requires_grad_()
            y = sync(x)
            y.backward(dys[rank])
            xa = torch.cat(xs).requires_grad_()
            ya = ref(xa)
            ya.backward(torch.cat(dys))
            gw, gb = sync.weight.grad.clone(), sync.bias.grad.clone()
            torch.distributed.all_reduce(gw)
            torch.distributed.all_reduce(gb)
            diffs = [y - ya[lo:hi], x.grad - xa.grad[lo:hi], gw - ref.weight.grad, gb - ref.bias.grad,
                     sync.running_mean - ref.running_mean, sync.running_var - ref.running_var]
            worst = max(worst, max(float(d.detach().abs().max()) for d in diffs))
            assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
            sync.weight.grad = sync.bias.grad = ref.weight.grad = ref.bias.grad = None
        results.put((rank, worst))
    except Exception as err:       # report, so the parent fails with the reason
        results.put((rank, repr(err)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("sizes, shape_tail", [((4, 7), ()), ((1, 5, 3), ()), ((2, 1), (3, 3)), ((3, 3, 1), (2,))])
def test_sync_batchnorm_equals_bn_on_the_concatenated_batch(sizes, shape_tail):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_sync_worker, args=(r, sizes, shape_tail, init, results)) for r in range(len(sizes))]
        for p in procs:
            p.start()
        reports = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    for rank, worst in reports:
        assert not isinstance(worst, str), f"rank {rank}: {worst}"
        assert worst < 1e-12, f"rank {rank}: difference {worst}"
    assert all(p.exitcode == 0 for p in procs)


def test_sync_batchnorm_without_process_group_is_plain_bn():
    x = torch.randn(6, 3, 2)
    torch.testing.assert_close(bnn.SyncBatchNorm(3)(x), torch.nn.BatchNorm1d(3)(x))
    with pytest.raises(ValueError, match="at least 2D"):
        bnn.SyncBatchNorm(3)(torch.randn(3))
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), bnn.BatchNorm1d(3))
    converted = bnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], bnn.SyncBatchNorm) and isinstance(converted[2], bnn.SyncBatchNorm)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("BNLIB_REQUIRE_GPU") != "1",
                    reason="needs a CUDA GPU (and CuPy); see chapter 05")
def test_cuda_tensors_match_torch():
    import cupy  # noqa: F401  (on a GPU machine a missing CuPy is a failure, not a skip)
    x = torch.randn(16, 4, 5, 5, device="cuda")
    ours, theirs = bnn.BatchNorm2d(4).cuda(), torch.nn.BatchNorm2d(4).cuda()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_in_place_change_of_the_input_is_detected_like_torch():
    x = torch.randn(8, 3, requires_grad=True)
    for layer in (torch.nn.BatchNorm1d(3), bnn.BatchNorm1d(3)):
        h = x * 1.0
        y = layer(h)
        h.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_bfloat16_is_refused_clearly():
    with pytest.raises(TypeError, match="bfloat16"):
        bnn.BatchNorm1d(3).to(torch.bfloat16)(torch.randn(4, 3, dtype=torch.bfloat16))


def test_sync_batchnorm_in_eval_without_running_stats_uses_the_local_batch():
    x = torch.randn(5, 3)
    layer = bnn.SyncBatchNorm(3, track_running_stats=False).eval()
    torch.testing.assert_close(layer(x), torch.nn.BatchNorm1d(3, track_running_stats=False).eval()(x))
