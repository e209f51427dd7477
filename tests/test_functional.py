"""bnlib.stats and bnlib.functional (chapter 02) against a float64 reference and PyTorch."""
import warnings

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("cpu_backend")   # every test runs on each CPU path

from bnlib import functional as F
from bnlib import stats
from reference import bn_forward_ref, numpy_channels_last, random_input

SEEDS = range(30)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_matches_reference_and_torch(seed, dtype):
    rng = np.random.default_rng(seed)
    x = random_input(rng, dtype)
    C = x.shape[1]
    gamma, beta = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    eps = float(10 ** rng.uniform(-6, -1))
    y, cache = F.batch_norm_forward(x, gamma, beta, eps=eps)
    ref, mu, var = bn_forward_ref(x, gamma, beta, eps)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(cache.mean, mu, rtol=1e-5, atol=1e-5 * np.abs(mu).max())
    np.testing.assert_allclose(cache.var, var, rtol=1e-4)
    np.testing.assert_allclose(cache.inv_std, 1 / np.sqrt(var + eps), rtol=1e-4)
    assert cache.x is x
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma),
                                        torch.from_numpy(beta), training=True, eps=eps)
    np.testing.assert_allclose(y, yt.numpy(), atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", range(10))
def test_running_stats_and_inference_match_torch_over_steps(seed):
    rng = np.random.default_rng(100 + seed)
    x0 = random_input(rng)
    C = x0.shape[1]
    momentum = [0.1, 0.3, None][seed % 3]
    gamma, beta = rng.normal(size=C), rng.normal(size=C)
    rm, rv = np.zeros(C), np.ones(C)
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(1, 6):
        xb = rng.normal(loc=1.0, scale=2.0, size=x0.shape)
        _, cache = F.batch_norm_forward(xb, gamma, beta)
        rm, rv = F.update_running_stats(rm, rv, cache, momentum=momentum, num_batches_tracked=step)
        torch_momentum = 1.0 / step if momentum is None else momentum
        torch.nn.functional.batch_norm(torch.from_numpy(xb), trm, trv, training=True, momentum=torch_momentum)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)
    y = F.batch_norm_inference(x0, rm, rv, gamma, beta, eps=1e-3)
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x0), trm, trv, torch.from_numpy(gamma),
                                        torch.from_numpy(beta), training=False, eps=1e-3)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-12, atol=1e-12)


def test_float16_accumulates_in_float32():
    rng = np.random.default_rng(0)
    x = (100 + rng.normal(size=(256, 3, 4, 4))).astype(np.float16)
    y, cache = F.batch_norm_forward(x)
    assert y.dtype == np.float16 and cache.mean.dtype == np.float32
    ref, _, _ = bn_forward_ref(x, None, None, 1e-5)
    assert np.abs(y.astype(np.float64) - ref).max() < 4e-3
    y_inf = F.batch_norm_inference(x, cache.mean, cache.var)
    assert y_inf.dtype == np.float16


def test_noncontiguous_and_fortran_inputs():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 8, 5, 7))
    for x in (base[:, ::2], np.asfortranarray(base), base.transpose(0, 1, 3, 2)):
        y, _ = F.batch_norm_forward(x)
        np.testing.assert_allclose(y, bn_forward_ref(x, None, None, 1e-5)[0], atol=1e-12)


def test_float32_large_offset_variance_is_accurate():
    """E[x^2]-E[x]^2 would be useless here; the two-pass variance is not."""
    x = (1e4 + np.random.default_rng(2).normal(size=(4096, 2))).astype(np.float32)
    _, cache = F.batch_norm_forward(x)
    ref = x.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(cache.var, ref, rtol=1e-4)


def test_portable_forward_output_is_accurate_at_a_large_offset():
    """Mean 1e4, std 0.1 in float32: centring on the mean rounded to float32 alone would be off by ~5e-3."""
    for shape in [(4096, 2), (16, 3, 8, 8)]:
        x = (1e4 + 0.1 * np.random.default_rng(4).normal(size=shape)).astype(np.float32)
        gamma, beta = np.array([1.5, -0.5, 2.0][:shape[1]], np.float32), np.array([0.3, 0.0, -1.0][:shape[1]], np.float32)
        ref, mu, var = bn_forward_ref(x, gamma, beta, 1e-5)
        y, cache = F.portable_batch_norm_forward(x, gamma, beta)
        assert y.dtype == np.float32
        assert np.abs(y - ref).max() < 1e-5
        np.testing.assert_allclose(cache.var, var, rtol=1e-6)
        np.testing.assert_allclose(cache.mean, mu, rtol=1e-7)


def test_inference_is_accurate_at_a_large_offset():
    """Mean 1e4, std 0.1 in float32: the folded form x * scale + shift would be off by ~7e-3; centred first,
    with float32 or float64 running statistics (the wider mean's residual put back), the error is float32's."""
    x = (1e4 + 0.1 * np.random.default_rng(5).normal(size=(16, 3, 8, 8))).astype(np.float32)
    x64 = x.astype(np.float64)
    mean64, var64 = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    gamma, beta = np.array([1.5, -0.5, 2.0]), np.array([0.3, 0.0, -1.0])
    shape = (1, 3, 1, 1)
    for dtype in (np.float32, np.float64):
        rm, rv, g, b = (a.astype(dtype) for a in (mean64, var64, gamma, beta))
        ref = ((x64 - rm.astype(np.float64).reshape(shape)) / np.sqrt(rv.astype(np.float64).reshape(shape) + 1e-5)
               * g.astype(np.float64).reshape(shape) + b.astype(np.float64).reshape(shape))
        y = F.batch_norm_inference(x, rm, rv, g, b)
        assert y.dtype == np.float32
        assert np.abs(y - ref).max() < 1e-5, dtype


def test_inference_with_wider_statistics_passes_non_finite_values_through_quietly():
    """float32 x, float64 running statistics holding inf and NaN (a diverged network): no warning, and the
    channels come out as torch's rule says (inf mean: -inf or inf from x - inf; NaN mean: NaN)."""
    x = np.ones((4, 3), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.batch_norm_inference(x, np.array([0.0, np.inf, np.nan]), np.ones(3))
    assert y.dtype == np.float32 and np.isfinite(y[:, 0]).all() and np.isneginf(y[:, 1]).all() and np.isnan(y[:, 2]).all()


@pytest.mark.parametrize("seed", range(6))
def test_inference_fast_path_equals_the_portable_code_bit_for_bit(seed, monkeypatch):
    """On the numba backend, NumPy float32/float64 input in one dense block (C-contiguous, channels-last, Fortran
    order, ...) takes bnlib.cpu.inference (one pass). Every output that is not NaN must be chapter 02's bit for bit,
    zeros' signs included, NaN must stand where chapter 02 has NaN (its sign bit may differ: of two NaN factors, the
    CPU returns one, by operand order), and y must have chapter 02's layout. Random shapes; C-contiguous,
    channels-last and Fortran-ordered input; statistics of x's dtype or another; NaN and inf in the statistics and
    in x; gamma or beta absent; eps 0; and sizes on both sides of PARALLEL_MIN_SIZE (the serial and the threaded
    kernels, both dtypes, with and without a shift)."""
    from bnlib import cpu
    fast_calls = []
    if cpu.get_backend() == "numba":
        real = cpu.inference
        monkeypatch.setattr(cpu, "inference", lambda *a: fast_calls.append(a[0].shape) or real(*a))
    rng = np.random.default_rng(seed)
    expected_fast = 0
    for case in range(25):
        dtype = (np.float32, np.float64)[(case + seed) % 2]
        shape = [int(rng.integers(1, 9)), int(rng.integers(1, 7))] + [int(rng.integers(1, 6))
                                                                     for _ in range(int(rng.integers(0, 3)))]
        if case < 2:                                                     # over PARALLEL_MIN_SIZE values
            shape = [3000, 40] if (seed + case) % 2 else [64, 32, 40]
            assert np.prod(shape) > cpu.PARALLEL_MIN_SIZE
        x = (rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.uniform(-50, 50)).astype(dtype)
        x.flat[::7] = 0.0                                                # exact zeros: (0 - 0) * -1 = -0
        x.flat[3::11] = np.nan if case % 4 == 3 else x.flat[3::11]       # NaN input, with NaN statistics too below
        if case % 4 == 1:                                                # infinite input: (inf - m) * s + t
            x.flat[5::13], x.flat[6::17] = np.inf, -np.inf
        layout = ("C", "channels-last", "F")[case % 3] if x.ndim >= 3 else "C"
        if layout == "channels-last":                                    # the values of an (N, *spatial, C) array
            x = numpy_channels_last(x)
            assert cpu.channels_last(x) or x.flags.c_contiguous            # (C-contiguous too if dims are 1)
        elif layout == "F":
            x = np.asfortranarray(x)
        c = shape[1]
        stat = (dtype, np.float64, np.float32)[case % 3]
        rm, rv = (rng.normal(size=c) * 30).astype(stat), rng.uniform(0, 5, size=c).astype(stat)
        rm[-1] = 0.0
        if case % 4 == 3:
            rm[0], rv[-1] = np.nan, np.inf
        g = None if (case + seed) % 4 == 0 else np.where(rng.random(c) < 0.2, -1.0, rng.normal(size=c)).astype(dtype)
        if case % 4 == 3 and g is not None:
            g[c // 2] = np.nan                                           # NaN times NaN
        b = None if (case + seed) % 5 < 2 else rng.normal(size=c).astype(dtype)
        eps = (0.0, 1e-5, 1e-3)[case % 3]
        with np.errstate(all="ignore"):
            fast = F.batch_norm_inference(x, rm, rv, g, b, eps)
            slow = F.portable_batch_norm_inference(x, rm, rv, g, b, eps)
        expected_fast += cpu.dense_order(x) is not None     # every layout here is one dense block (C, channels-last, F)
        assert fast.shape == slow.shape and fast.dtype == slow.dtype == dtype
        layout_of = lambda a: [st for st, n in zip(a.strides, a.shape) if n > 1]   # a dim of size 1 has any stride
        assert layout_of(fast) == layout_of(slow), (layout, fast.strides, slow.strides)
        nan = np.isnan(slow)
        assert np.array_equal(np.isnan(fast), nan), (shape, case)
        bits = f"u{np.dtype(dtype).itemsize}"
        assert np.array_equal(np.where(nan, 0, fast).view(bits), np.where(nan, 0, slow).view(bits)), (shape, case)
    if cpu.get_backend() == "numba":                                     # the fast path did run, where it should
        assert len(fast_calls) == expected_fast > 0


def test_update_running_stats_keeps_each_buffers_dtype():
    _, cache = F.batch_norm_forward(np.random.default_rng(6).normal(size=(8, 3)).astype(np.float32))
    new_mean, new_var = F.update_running_stats(np.zeros(3, np.float32), np.ones(3, np.float64), cache)
    assert new_mean.dtype == np.float32 and new_var.dtype == np.float64


@pytest.mark.parametrize("length", [1 << 20, 4097, 3 * 4096 + 5])
def test_forward_and_backward_stay_accurate_along_a_long_row(length):
    """L = 2^20 values per row (one large image): one float32 partial sum per row would leave the variance
    off by about 1e-6 and dgamma by about 5e-3 in the NumPy path; its partial sums cover at most
    bnlib.cpu.L_BLOCK values (the other lengths take the blocks' remainder branch)."""
    rng = np.random.default_rng(7)
    x = (3 + rng.normal(size=(3, 2, length))).astype(np.float32)            # N = 3: the sums over the batch too
    dy = rng.normal(size=x.shape).astype(np.float32)
    _, cache = F.batch_norm_forward(x)
    x64 = x.astype(np.float64)
    var64 = x64.var(axis=(0, 2))
    assert (np.abs(cache.var - var64) / var64).max() < 3e-7
    _, dgamma, dbeta = F.batch_norm_backward(dy, cache)
    x_hat = (x64 - x64.mean(axis=(0, 2))[None, :, None]) / np.sqrt(var64 + 1e-5)[None, :, None]
    # dgamma is what the blocks fixed (3.2e-3 off before, 4.4e-4 after, at N = 3); dbeta, a sum of dy alone, was
    # never off by much, and its tolerance only guards against gross mistakes
    np.testing.assert_allclose(dgamma, (dy * x_hat).sum(axis=(0, 2)), rtol=0, atol=2e-3)
    np.testing.assert_allclose(dbeta, dy.astype(np.float64).sum(axis=(0, 2)), rtol=0, atol=1e-2)


def test_stats_welford_and_chan_agree_with_two_pass():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=5.0, size=(37, 3, 2))
    whole = stats.moments(x)
    for chunk in (1, 4, 36, 100):
        streamed = stats.welford(x, chunk_size=chunk)
        assert streamed.count == whole.count == 74
        np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-12)
        np.testing.assert_allclose(streamed.m2, whole.m2, rtol=1e-10)
    np.testing.assert_allclose(whole.unbiased_var, x.transpose(1, 0, 2).reshape(3, -1).var(axis=1, ddof=1))
    with pytest.raises(ValueError, match="chunk_size"):
        stats.welford(x, chunk_size=0)
    assert stats.reduction_axes(2) == (0,) and stats.reduction_axes(5) == (0, 2, 3, 4)


# --------------------------------------------------------------------------- bad input

X = np.ones((4, 3, 2, 2))


@pytest.mark.parametrize("call, error, words", [
    (lambda: F.batch_norm_forward(np.ones(5)), ValueError, ["x", "(5,)", "(N, C)"]),
    (lambda: F.batch_norm_forward(np.float64(1.0)), ValueError, ["x", "()"]),
    (lambda: F.batch_norm_forward(X, np.ones(4), None), ValueError, ["gamma", "(3,)", "(4,)"]),
    (lambda: F.batch_norm_forward(X, None, np.ones((3, 1))), ValueError, ["beta", "(3,)", "(3, 1)"]),
    (lambda: F.batch_norm_forward(np.ones((4, 3), dtype=np.int32)), TypeError, ["x", "int32", "float32"]),
    (lambda: F.batch_norm_forward(np.ones((4, 3), dtype=complex)), TypeError, ["x", "complex128"]),
    (lambda: F.batch_norm_forward(np.ones((4, 3), dtype=bool)), TypeError, ["x", "bool"]),
    (lambda: F.batch_norm_forward(X, np.ones(3, dtype=np.int64)), TypeError, ["gamma", "int64"]),
    (lambda: F.batch_norm_forward(np.ones((1, 3))), ValueError, ["more than 1 value per channel", "(1, 3)"]),
    (lambda: F.batch_norm_forward(np.ones((1, 3, 1, 1))), ValueError, ["more than 1 value per channel"]),
    (lambda: F.batch_norm_forward([[1.0, 2.0]]), TypeError, ["x", "list"]),
    (lambda: F.batch_norm_forward(X, eps=-1.0), ValueError, ["eps"]),
    (lambda: F.batch_norm_forward(X, eps=float("nan")), ValueError, ["eps"]),
    (lambda: F.batch_norm_inference(X, np.zeros(2), np.ones(3)), ValueError, ["running_mean", "(3,)", "(2,)"]),
    (lambda: F.batch_norm_inference(X, np.zeros(3), np.ones(4)), ValueError, ["running_var", "(3,)", "(4,)"]),
    (lambda: F.batch_norm_inference(X, np.zeros(3), np.array([1, -1.0, 1])), ValueError, ["running_var", "-1.0", "channel 1"]),
    (lambda: F.batch_norm_inference(np.ones(3), np.zeros(3), np.ones(3)), ValueError, ["x", "(3,)"]),
    (lambda: F.update_running_stats(np.zeros(3), np.ones(3), F.batch_norm_forward(X)[1], momentum=1.5), ValueError, ["momentum", "1.5"]),
    (lambda: F.update_running_stats(np.zeros(3), np.ones(3), F.batch_norm_forward(X)[1], momentum=True), ValueError,
     ["momentum", "True", "a bool"]),
    (lambda: F.update_running_stats(np.zeros(3), np.ones(3), F.batch_norm_forward(X)[1], momentum=None,
                                    num_batches_tracked=0), ValueError, ["num_batches_tracked"]),
    # a cumulative average without the count used to be a silent copy of the batch (a default count of 1)
    (lambda: F.update_running_stats(np.zeros(3), np.ones(3), F.batch_norm_forward(X)[1], momentum=None),
     ValueError, ["num_batches_tracked", "None"]),
    # running statistics of the wrong kind used to be truncated (integers), broadcast (shape (1,)) or
    # raise AttributeError (a list; a cache that is a plain tuple)
    (lambda: F.update_running_stats(np.zeros(3, np.int64), np.ones(3), F.batch_norm_forward(X)[1]), TypeError,
     ["running_mean", "int64"]),
    (lambda: F.update_running_stats(np.zeros(3), np.ones(1), F.batch_norm_forward(X)[1]), ValueError,
     ["running_var", "(3,)", "(1,)"]),
    (lambda: F.update_running_stats([0.0] * 3, np.ones(3), F.batch_norm_forward(X)[1]), TypeError,
     ["running_mean", "list"]),
    (lambda: F.update_running_stats(np.zeros(3), np.ones(3), tuple(F.batch_norm_forward(X)[1])), TypeError,
     ["cache", "BNCache", "tuple"]),
    # a torch tensor, or None, where an array belongs (AttributeError and a comparison error before)
    (lambda: F.batch_norm_forward(X, torch.ones(3)), TypeError, ["gamma", "Tensor", "bnlib.nn"]),
    (lambda: F.batch_norm_inference(X, None, np.ones(3)), TypeError, ["running_mean", "NoneType"]),
    (lambda: F.batch_norm_inference(X, np.zeros(3), None), TypeError, ["running_var", "NoneType"]),
])
def test_bad_input_names_what_was_wrong(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in message: {info.value}"


def test_failing_and_successful_calls_change_no_state():
    rm, rv = np.zeros(3), np.array([1.0, -1.0, 1.0])
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(ValueError):
        F.batch_norm_inference(X, rm, rv)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    x = np.random.default_rng(4).normal(size=(5, 3))
    x0, g = x.copy(), np.ones(3)
    y, cache = F.batch_norm_forward(x, g, np.zeros(3))
    rm, rv = np.zeros(3), np.ones(3)
    F.update_running_stats(rm, rv, cache)
    F.batch_norm_inference(x, rm, rv, g)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_inference_accepts_a_batch_of_one_and_zero_eps():
    y = F.batch_norm_inference(np.array([[2.0, 4.0]]), np.array([1.0, 2.0]), np.array([4.0, 1.0]), eps=0.0)
    np.testing.assert_allclose(y, [[0.5, 2.0]])


# --------------------------------------------------------------------------- empty batches, as torch

EMPTY_SHAPES = {"(0, C)": ((0, 3), None), "(0, C, H, W)": ((0, 3, 4, 5), None),
                "(0, C, H, W) channels-last": ((0, 4, 5, 3), (0, 3, 1, 2)), "(N, C, 0)": ((2, 3, 0), None)}


def _empty(name, dtype):
    """An empty x of EMPTY_SHAPES[name]: channels-last is an (N, H, W, C) array seen as (N, C, H, W)."""
    shape, perm = EMPTY_SHAPES[name]
    x = np.zeros(shape, dtype)
    return x if perm is None else x.transpose(perm)


@pytest.mark.parametrize("name", list(EMPTY_SHAPES))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_empty_batch_in_training_matches_torch(name, dtype, affine):
    """DESIGN.md: a zero-size batch in training returns an empty output. torch gives an empty y, an
    empty dx and zero weight/bias gradients; so must forward and backward here, on every path."""
    x = _empty(name, dtype)
    C = x.shape[1]
    pdtype = np.float32 if dtype == np.float16 else dtype          # float16 data, float32 parameters (autocast)
    gamma, beta = (np.full(C, 1.5, pdtype), np.full(C, 0.5, pdtype)) if affine else (None, None)
    y, cache = F.batch_norm_forward(x, gamma, beta)
    dy = np.zeros_like(x)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)

    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = ((torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_())
              if affine else (None, None))
    yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
    yt.backward(torch.from_numpy(dy))

    assert y.shape == dx.shape == tuple(yt.shape) == tuple(xt.grad.shape) == x.shape
    assert y.dtype == dx.dtype == x.dtype and str(yt.dtype) == f"torch.{x.dtype}"
    assert y is not x and dx is not dy
    for a in (y, dx):                                               # x's memory layout (for NumPy, an empty
        assert (a.flags.c_contiguous, a.flags.f_contiguous) == (x.flags.c_contiguous, x.flags.f_contiguous)
        if EMPTY_SHAPES[name][1] is not None:                       # array is both C- and F-contiguous)
            assert a.transpose(0, 2, 3, 1).flags.c_contiguous
    expected = pdtype if affine else (np.float32 if dtype == np.float16 else dtype)
    for g in (dgamma, dbeta):
        assert g.shape == (C,) and g.dtype == expected and not g.any()
    if affine:
        np.testing.assert_array_equal(dgamma, wt.grad.numpy())
        np.testing.assert_array_equal(dbeta, bt.grad.numpy())
    assert cache.x is x and cache.mean.shape == cache.var.shape == cache.inv_std.shape == (C,)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_leaves_running_statistics_as_torch_does(momentum):
    """An empty batch changes no running statistic (torch's buffers stay as they were); torch.nn.BatchNorm
    counts it in num_batches_tracked, so with momentum=None the next batch has weight 1/2."""
    rng = np.random.default_rng(7)
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    _, cache = F.batch_norm_forward(np.zeros((0, 3, 2, 2)))
    new_rm, new_rv = F.update_running_stats(rm, rv, cache, momentum=momentum, num_batches_tracked=1)
    np.testing.assert_array_equal(new_rm, rm)
    np.testing.assert_array_equal(new_rv, rv)
    assert new_rm is not rm and new_rv is not rv                     # new arrays, as for any batch

    module = torch.nn.BatchNorm2d(3, momentum=momentum, affine=False, dtype=torch.float64)
    module.running_mean.copy_(torch.from_numpy(rm))
    module.running_var.copy_(torch.from_numpy(rv))
    module(torch.zeros(0, 3, 2, 2, dtype=torch.float64))
    np.testing.assert_array_equal(module.running_mean.numpy(), rm)
    np.testing.assert_array_equal(module.running_var.numpy(), rv)
    xb = rng.normal(size=(4, 3, 2, 2))
    module(torch.from_numpy(xb))
    _, cache = F.batch_norm_forward(xb)
    rm, rv = F.update_running_stats(new_rm, new_rv, cache, momentum=momentum,
                                    num_batches_tracked=int(module.num_batches_tracked))
    assert int(module.num_batches_tracked) == 2
    np.testing.assert_allclose(rm, module.running_mean.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, module.running_var.numpy(), rtol=1e-12)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 3, 1)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_one_value_per_channel_still_raises_as_in_torch(shape, dtype):
    x = np.ones(shape, dtype)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1 value\(s\) per channel\)"):
        F.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))


def test_cupy_route_returns_early_for_an_empty_batch(monkeypatch):
    """No GPU here: a stand-in for CuPy (NumPy under CuPy's module name) takes bnlib.functional's CuPy
    route, which must answer an empty batch before any bnlib.cuda kernel, and still refuse one value
    per channel before any kernel."""
    import sys

    from bnlib import cuda
    stand_in = type("ndarray", (np.ndarray,), {"__module__": "cupy"})
    monkeypatch.setitem(sys.modules, "cupy", np)

    def no_launch(*args, **kwargs):
        raise AssertionError("bnlib.cuda reached for an empty batch")
    monkeypatch.setattr(cuda, "_forward", no_launch)
    monkeypatch.setattr(cuda, "_backward", no_launch)
    for dtype in (np.float16, np.float32, np.float64):
        x = np.zeros((0, 4, 5, 3), dtype).transpose(0, 3, 1, 2).view(stand_in)
        assert cuda.supports(x)
        gamma = np.ones(3, np.float32 if dtype == np.float16 else dtype).view(stand_in)
        y, cache = F.batch_norm_forward(x, gamma, None)
        dx, dgamma, dbeta = F.batch_norm_backward(np.zeros_like(x), cache)
        assert type(y) is type(dx) is stand_in and y.shape == dx.shape == x.shape and y.dtype == dx.dtype == dtype
        assert dgamma.dtype == dbeta.dtype == gamma.dtype and not dgamma.any() and not dbeta.any()
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm_forward(np.ones((1, 3), dtype).view(stand_in), gamma, None)


def test_numpy_and_cupy_arrays_are_not_mixed(monkeypatch):
    """Every array of a call lives where x lives, as CuPy and torch require: a NumPy x with a CuPy gamma failed
    deep inside the computation, a CuPy x with a NumPy gamma copied it to the GPU on every call. The refusal
    names the argument and both libraries, and changes nothing. No GPU here: a stand-in for CuPy arrays
    (NumPy under CuPy's module name), which the CuPy route's checks refuse before any kernel."""
    import sys

    from bnlib import cuda
    stand_in = type("ndarray", (np.ndarray,), {"__module__": "cupy"})
    monkeypatch.setitem(sys.modules, "cupy", np)
    monkeypatch.setattr(cuda, "_forward", lambda *a: pytest.fail("a kernel ran"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 2)).astype(np.float32)
    g, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    _, cache = F.batch_norm_forward(x, g, b)
    cupy_x, cupy_g = x.view(stand_in), g.view(stand_in)
    message = r"{} is a {} array and {} a {} array: pass arrays of one library \(cupy.asarray"
    cases = [
        (lambda: F.batch_norm_forward(x, cupy_g, b), ("gamma", "CuPy", "x", "NumPy")),
        (lambda: F.batch_norm_forward(x, g, b.view(stand_in)), ("beta", "CuPy", "x", "NumPy")),
        (lambda: F.batch_norm_forward(cupy_x, g, None), ("gamma", "NumPy", "x", "CuPy")),
        (lambda: F.batch_norm_inference(x, rm, rv.view(stand_in), g, b), ("running_var", "CuPy", "x", "NumPy")),
        (lambda: F.batch_norm_inference(cupy_x, rm.view(stand_in), rv, None, None), ("running_var", "NumPy", "x", "CuPy")),
        (lambda: F.update_running_stats(rm.view(stand_in), rv, cache), ("running_mean", "CuPy", "x", "NumPy")),
        (lambda: F.batch_norm_backward(x.view(stand_in), cache), ("dy", "CuPy", "the forward input x", "NumPy")),
    ]
    before = [a.copy() for a in (x, g, b, rm, rv)]
    for call, words in cases:
        with pytest.raises(TypeError, match=message.format(*words)):
            call()
    assert all(np.array_equal(a, c) for a, c in zip((x, g, b, rm, rv), before))
    # arrays of one library pass the check (the stand-in's forward would need the GPU: not reached here)
    F.batch_norm_inference(x, rm, rv, g, b)
    F.update_running_stats(rm, rv, cache)


def test_torch_tensor_input_is_refused_by_name():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="got Tensor.*bnlib.nn"):
        F.batch_norm_forward(torch.ones(4, 3))
    with pytest.raises(TypeError, match="got Tensor"):
        F.batch_norm_inference(torch.ones(4, 3), np.zeros(3), np.ones(3))


def test_moments_and_welford_refuse_what_they_would_get_wrong():
    from bnlib import stats
    with pytest.raises(TypeError, match="floating-point"):
        stats.moments(np.array([[0], [1]]))           # an integer mean would be truncated to 0
    with pytest.raises(ValueError, match="channel"):
        stats.moments(np.zeros((3, 0)))
    for bad in (2.5, None, True, 0):
        with pytest.raises(ValueError, match="chunk_size"):
            stats.welford(np.ones((4, 2)), bad)
    with pytest.raises(ValueError, match="at least 1 value per channel, got 0"):
        stats.welford(np.ones((0, 2))).var          # no values: a clear error, not None / 0
    empty = stats.welford(np.ones((0, 2)))          # as moments of no values: count 0 and zeros (was None)
    assert empty.count == 0 and np.array_equal(empty.mean, np.zeros(2)) and np.array_equal(empty.m2, np.zeros(2))
    with pytest.raises(TypeError, match="welford needs an array of shape .*, got list"):
        stats.welford([[1.0, 2.0]])                 # was an AttributeError on .shape
    with pytest.raises(TypeError, match="welford needs an array .*, got int"):
        stats.welford(5)
    with pytest.raises(ValueError, match=r"welford needs an array .*, got shape \(3,\)"):
        stats.welford(np.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        stats.welford(np.ones((4, 2), np.int64))     # moments' dtype check, before any chunk
    masked = np.ma.masked_array(np.arange(8.0).reshape(4, 2), mask=[[0, 0], [0, 0], [0, 0], [1, 0]])
    with pytest.raises(TypeError, match="x is a masked array"):
        F.batch_norm_forward(masked)                # its mask would be ignored: the masked 6.0 in the statistics


def test_a_numpy_matrix_is_refused_by_every_function_on_every_backend(cpu_backend):
    """np.matrix (NumPy's deprecated 2-D subclass: * is a matrix product, reductions stay 2-D) once gave an
    ndarray from the numba training forward, an IndexError from its evaluation path and a misleading shape error
    from the portable code; now the same TypeError everywhere, before any work."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        m = np.matrix(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    plain = np.asarray(m)
    stats = (np.zeros(4, np.float32), np.ones(4, np.float32))
    for call in (lambda: F.batch_norm_forward(m), lambda: F.batch_norm_inference(m, *stats),
                 lambda: F.batch_norm_backward(m, F.batch_norm_forward(plain)[1])):
        with pytest.raises(TypeError, match=r"is a np.matrix, .*: pass np.asarray\((x|dy)\)"):
            call()
    y, cache = F.batch_norm_forward(plain)           # the advice works
    assert type(y) is np.ndarray and type(F.batch_norm_inference(plain, *stats)) is np.ndarray


@pytest.mark.parametrize("shape", [(0, 3), (4, 3, 0), (0, 3, 5, 5)])
def test_moments_of_no_values_are_count_zero_and_merge_away(shape):
    """An empty batch (or empty spatial extent) has count 0 and zero moments, with no NaN and no warning,
    so that merging it into other moments changes nothing (as SyncBatchNorm's empty processes do)."""
    import warnings
    from bnlib import stats
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = stats.moments(np.zeros(shape, np.float32))
    assert empty.count == 0 and empty.mean.shape == (3,) and empty.mean.dtype == np.float32
    assert not np.any(empty.mean) and not np.any(empty.m2)
    full = stats.moments(np.random.default_rng(0).normal(size=(6, 3)))
    for merged in (stats.merge_moments(empty, full), stats.merge_moments(full, empty)):
        assert merged.count == 6 and np.array_equal(merged.mean, full.mean) and np.array_equal(merged.m2, full.m2)
    with pytest.raises(ValueError, match="got 0"):
        empty.var


def test_merge_moments_refuses_moments_of_other_channels():
    from bnlib import stats
    rng = np.random.default_rng(0)
    for other in ((5, 1), (5, 3)):                      # (5, 1) would broadcast silently
        with pytest.raises(ValueError, match=r"same channels.*\(4,\) and \(%d,\)" % other[1]):
            stats.merge_moments(stats.moments(rng.normal(size=(4, 4))), stats.moments(rng.normal(size=other)))
    with pytest.raises(ValueError, match="same channels"):              # an empty side has its channels too
        stats.merge_moments(stats.moments(np.zeros((0, 1))), stats.moments(rng.normal(size=(5, 4))))
    assert stats.merge_moments(stats.Moments(0, None, None), stats.moments(rng.normal(size=(5, 4)))).count == 5
    full = stats.moments(rng.normal(size=(5, 4)))
    for a, b, name in (((5, full.mean, full.m2), full, "a"), (full, None, "b")):   # was an AttributeError
        with pytest.raises(TypeError, match=f"two Moments.*got {name} of type"):
            stats.merge_moments(a, b)


def test_non_finite_running_statistics_reach_the_output_as_in_torch():
    """A diverged network's NaN or inf running statistics are not an error in evaluation: as torch's
    batch_norm, the affected channels come out NaN (NaN mean or variance) or 0 (infinite variance)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(5).normal(size=(6, 4, 3))
    rm, rv = np.array([0.0, np.nan, 0.0, 1.0]), np.array([1.0, 1.0, np.inf, np.nan])
    g, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.0, -1.0, 0.0])
    y = F.batch_norm_inference(x, rm, rv, g, b)
    want = torch.nn.functional.batch_norm(*(torch.from_numpy(a) for a in (x, rm, rv, g, b))).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-12, equal_nan=True)
    assert np.isnan(y[:, [1, 3]]).all() and (y[:, 2] == -1.0).all() and np.isfinite(y[:, 0]).all()


def _count_arguments():
    """(name, build(value)) for every count a constructor or helper of bnlib takes; all go through
    bnlib.stats._check_positive_int, so the refusals and their messages are one rule."""
    from bnlib import bench, layers, nn, variants as V
    X = np.ones((4, 3))
    cache = F.batch_norm_forward(X)[1]
    return [
        ("chunk_size", lambda v: stats.welford(X, v)),
        ("num_batches_tracked", lambda v: F.update_running_stats(np.zeros(3), np.ones(3), cache, momentum=None,
                                                                 num_batches_tracked=v)),
        ("num_features", lambda v: layers.BatchNorm(v)),
        ("num_features", lambda v: nn.BatchNorm2d(v)),
        ("num_features", lambda v: nn.FrozenBatchNorm2d(v)),
        ("num_features", lambda v: V.InstanceNorm(v)),          # was reported as num_groups (GroupNorm's)
        ("num_features", lambda v: V.FrozenBatchNorm(v)),
        ("num_features", lambda v: V.BatchRenorm(v)),
        ("num_groups", lambda v: V.GroupNorm(v, 4)),
        ("num_channels", lambda v: V.GroupNorm(1, v)),
        ("normalized_shape", lambda v: V.LayerNorm(v)),
        ("virtual_batch_size", lambda v: V.GhostBatchNorm(3, v)),
        ("repeats", lambda v: bench.bench_cpu([(8, 4)], repeats=v, progress=False)),
        ("threads", lambda v: bench.bench_cpu([(8, 4)], threads=v, progress=False)),
    ]


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "3", None])
def test_every_count_argument_refuses_what_is_not_a_positive_integer(bad, monkeypatch):
    from bnlib import bench
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: pytest.fail("ran before its arguments were checked"))
    for name, build in _count_arguments():
        if bad is None and name in ("threads",):
            continue                                  # threads=None means torch's own count
        with pytest.raises((ValueError, TypeError)) as info:
            build(bad)
        message = str(info.value)
        assert name in message and repr(bad) in message, (name, bad, message)


def test_counts_accept_numpy_integers_and_store_python_ints():
    from bnlib import layers, nn, variants as V
    two = np.int64(2)
    assert F._check_positive_int is stats._check_positive_int
    assert stats.welford(np.ones((4, 3)), two).count == 4
    for layer in (layers.BatchNorm(two), nn.BatchNorm2d(two), nn.FrozenBatchNorm2d(two), V.InstanceNorm(two),
                  V.GhostBatchNorm(two, two)):
        assert type(layer.num_features) is int and layer.num_features == 2
    assert type(V.GroupNorm(two, 4).num_groups) is int


def test_stats_helpers_refuse_what_would_pass_for_a_number():
    """A bool is an int to Python: ndim=True would read as 1, and a negative count would 'unmerge' moments."""
    with pytest.raises(TypeError, match="ndim must be an integer .* got True"):
        stats.reduction_axes(True)
    with pytest.raises(ValueError, match="got 1 dimension"):
        stats.channel_shape(1, 3)
    assert stats.channel_shape(4, -1) == (1, -1, 1, 1)             # -1 stays allowed, as in a reshape
    good = stats.Moments(2, np.zeros(3), np.zeros(3))
    for bad in (stats.Moments(-3, np.zeros(3), np.zeros(3)), stats.Moments(2.5, np.zeros(3), np.zeros(3))):
        with pytest.raises(ValueError, match="counts that are integers >= 0"):
            stats.merge_moments(good, bad)


@pytest.mark.parametrize("where", ["first", "later"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("shape, far", [((8, 2), 0.0), ((8, 2, 3), 0.0), ((64, 2), 50.0), ((16384, 2), 1e3),
                                        ((64, 2, 256), 1e3)])
def test_a_non_finite_value_gives_torchs_batch_mean_wherever_it_lies(where, value, shape, far):
    """An infinite value gives an infinite mean and a NaN variance, as in torch and chapter 02's code, also when it is
    the channel's first value: the fast paths shift by that value (K), and an infinite K once gave a NaN mean. With
    far > 0 the other channel's K lies far out, so that a path re-centres every channel, and the re-centring must not
    bring the NaN back: about 8 standard deviations for (64, 2) (beyond 4: the NumPy path re-centres; an outlier among
    64 values can lie at most sqrt(63) from their mean), about 127 for the two larger shapes (beyond 100: numba's
    (N, C) and (N, C, L) kernels re-centre too)."""
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    x[(0 if where == "first" else 3, 0) + (0,) * (len(shape) - 2)] = value     # (0, 0, 0...) is the channel's K
    x[(0, 1) + (0,) * (len(shape) - 2)] += far
    with np.errstate(invalid="ignore"):
        _, cache = F.batch_norm_forward(x, np.ones(2, np.float32), np.zeros(2, np.float32), 1e-5)
    rm, rv = torch.zeros(2), torch.ones(2)
    torch.nn.functional.batch_norm(torch.from_numpy(x), rm, rv, training=True, momentum=1.0)
    assert np.isnan(cache.var[0]) and np.isnan(rv[0].item())
    if np.isnan(value):
        assert np.isnan(cache.mean[0]) and np.isnan(rm[0].item())
    else:
        assert cache.mean[0] == rm[0].item() == value
    assert np.isfinite(cache.mean[1]) and np.isclose(cache.mean[1], rm[1].item(), rtol=1e-6, atol=1e-6)
