"""bnlib.functional.batch_norm_backward and bnlib.gradcheck (chapter 03)."""
import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("cpu_backend")   # every test runs on each CPU path

from bnlib import functional as F
from bnlib.gradcheck import numerical_gradient, relative_error
from reference import random_input


def torch_grads(x, gamma, beta, dy, eps):
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=eps).backward(torch.from_numpy(dy))
    return xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_matches_torch_autograd(seed, dtype):
    rng = np.random.default_rng(1000 + seed)
    x = random_input(rng, dtype)
    C = x.shape[1]
    gamma, beta = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    eps = float(10 ** rng.uniform(-6, -2))
    _, cache = F.batch_norm_forward(x, gamma, beta, eps)
    dx, dg, db = F.batch_norm_backward(dy, cache)
    assert dx.dtype == dtype and dg.dtype == dtype and db.dtype == dtype
    # float64 torch gradients are the reference for both dtypes
    ref = torch_grads(*(a.astype(np.float64) for a in (x, gamma, beta, dy)), eps)
    tol = 1e-11 if dtype == np.float64 else 2e-4
    # dx can cancel to nearly zero (m = 2): measure its error against the size of its terms
    dx_scale = np.abs(gamma).max() * cache.inv_std.max() * np.abs(dy).max()
    assert np.abs(dx - ref[0]).max() <= tol * dx_scale
    for got, want in zip((dg, db), ref[1:]):
        assert relative_error(got, want) < tol


@pytest.mark.parametrize("seed", range(5))
def test_backward_matches_finite_differences(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 3, 2))
    g, b, dy = rng.normal(size=3), rng.normal(size=3), rng.normal(size=x.shape)
    _, cache = F.batch_norm_forward(x, g, b, 1e-3)
    dx, dg, db = F.batch_norm_backward(dy, cache)
    assert relative_error(dx, numerical_gradient(lambda t: F.batch_norm_forward(t, g, b, 1e-3)[0], x, dy)) < 1e-7
    assert relative_error(dg, numerical_gradient(lambda t: F.batch_norm_forward(x, t, b, 1e-3)[0], g, dy)) < 1e-7
    assert relative_error(db, numerical_gradient(lambda t: F.batch_norm_forward(x, g, t, 1e-3)[0], b, dy)) < 1e-7


def test_dx_sums_to_zero_and_is_orthogonal_to_x_hat_without_eps():
    rng = np.random.default_rng(7)
    x, dy = rng.normal(size=(9, 4, 3, 3)), rng.normal(size=(9, 4, 3, 3))
    _, cache = F.batch_norm_forward(x, rng.normal(size=4), None, eps=0.0)
    dx, _, _ = F.batch_norm_backward(dy, cache)
    x_hat = (x - cache.mean.reshape(1, 4, 1, 1)) * cache.inv_std.reshape(1, 4, 1, 1)
    assert np.abs(dx.sum(axis=(0, 2, 3))).max() < 1e-12
    assert np.abs((dx * x_hat).sum(axis=(0, 2, 3))).max() < 1e-12


def test_affine_false_and_float16():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(16, 3, 4)).astype(np.float16)
    dy = rng.normal(size=x.shape).astype(np.float16)
    _, cache = F.batch_norm_forward(x)
    dx, dg, db = F.batch_norm_backward(dy, cache)
    assert dx.dtype == np.float16 and dg.dtype == np.float32
    ref = torch_grads(x.astype(np.float64), np.ones(3), np.zeros(3), dy.astype(np.float64), 1e-5)
    assert relative_error(dx, ref[0]) < 5e-3 and relative_error(dg, ref[1]) < 1e-3


def test_numerical_gradient_leaves_x_alone_and_checks_input():
    x = np.array([1.0, 2.0, 3.0])
    x0 = x.copy()
    grad = numerical_gradient(lambda t: t ** 2, x, np.ones(3))
    np.testing.assert_allclose(grad, 2 * x0, rtol=1e-8)
    np.testing.assert_array_equal(x, x0)
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(np.sin, x.astype(np.float32), np.ones(3))
    with pytest.raises(ValueError, match="h must"):
        numerical_gradient(np.sin, x, np.ones(3), h=0.0)
    with pytest.raises(ValueError, match=r"f\(x\) has shape \(3,\), but dy has shape \(2, 3\)"):
        numerical_gradient(np.sin, x, np.ones((2, 3)))      # would broadcast to a wrong gradient, silently
    with pytest.raises(ValueError, match="shapes"):
        relative_error(np.ones(2), np.ones(3))
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0


@pytest.mark.parametrize("call, error, words", [
    (lambda c: F.batch_norm_backward(np.ones((4, 2)), c), ValueError, ["dy", "(4, 3)", "(4, 2)"]),
    (lambda c: F.batch_norm_backward(np.ones((4, 3), np.float32), c), TypeError, ["dy", "float64", "float32"]),
    (lambda c: F.batch_norm_backward(np.ones((4, 3)), None), TypeError, ["cache", "NoneType"]),
    (lambda c: F.batch_norm_backward(np.ones(3), c), ValueError, ["dy", "(3,)"]),
])
def test_backward_bad_input(call, error, words):
    _, cache = F.batch_norm_forward(np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.raises(error) as info:
        call(cache)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_portable_backward_is_accurate_at_a_large_offset():
    """Mean 1e4, std 0.1 in float32: x_hat recomputed from the float32-rounded mean is off by ~5e-3 unless corrected."""
    for shape in [(4096, 2), (16, 2, 8, 8)]:
        rng = np.random.default_rng(8)
        x = (1e4 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        gamma, beta = np.array([1.5, -0.5], np.float32), np.array([0.2, 0.1], np.float32)
        _, cache = F.portable_batch_norm_forward(x, gamma, beta)
        dx, dgamma, dbeta = F.portable_batch_norm_backward(dy, cache)
        ref = torch_grads(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), dy.astype(np.float64), 1e-5)
        assert dx.dtype == dgamma.dtype == dbeta.dtype == np.float32
        for got, want in zip((dx, dgamma, dbeta), ref):
            assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("make", [lambda a: a, lambda a: a.T, lambda a: np.asfortranarray(a), lambda a: a[:, ::2],
                                  lambda a: a[::-1]])
def test_numerical_gradient_for_every_memory_order(make):
    """The perturbed copy must be the array f sees, whatever the input's memory order (a Fortran-ordered
    copy once made every difference 0)."""
    x = make(np.random.default_rng(0).normal(size=(4, 6)))
    dy = np.random.default_rng(1).normal(size=x.shape)
    grad = numerical_gradient(lambda t: t ** 2, x, dy)
    np.testing.assert_allclose(grad, 2 * x * dy, rtol=1e-7, atol=1e-9)


def test_numerical_gradient_divides_by_the_step_taken():
    """Far from zero, x + h rounds: at 1e8 (spacing 1.5e-8) dividing by the nominal 2h is off by ~1e-4
    for a linear loss; dividing by the step actually taken is exact. A step that rounds away is refused."""
    for value in [1e8, -3e7, 0.5]:                    # one value each: the loss's own sum would round too
        assert numerical_gradient(lambda t: t, np.array([value]), np.ones(1))[0] == 1.0
    with pytest.raises(ValueError, match=r"spacing of float64 numbers at x.flat\[1\] = 1e\+20"):
        numerical_gradient(lambda t: t, np.array([0.0, 1e20]), np.ones(2))


@pytest.mark.parametrize("h", [None, "1e-5", 0, -1e-3, float("nan"), True])
def test_numerical_gradient_refuses_a_bad_step(h):
    with pytest.raises(ValueError, match="h must be"):
        numerical_gradient(lambda t: t, np.ones(2), np.ones(2), h=h)


@pytest.mark.parametrize("seed", [11, 13, 15])
def test_float64_backward_takes_the_means_rounding_out(seed):
    """float64 data far from zero (mean 1e6, std 1e-3), on every CPU path: the computed float64 mean carries its own
    rounding, and the backward pass takes it back out of x_hat (chapter 03). dgamma against an exact reference:
    d = x - mean is exact (the two numbers are this close), and math.fsum adds without intermediate rounding."""
    x = 1e6 + 1e-3 * np.random.default_rng(seed).normal(size=(4096, 2))
    dy = np.random.default_rng(seed + 1).normal(size=x.shape)
    _, cache = F.batch_norm_forward(x)
    _, dg, _ = F.batch_norm_backward(dy, cache)
    d = x - cache.mean
    want = np.empty(2)
    for c in range(2):
        centred = d[:, c] - math.fsum(d[:, c]) / len(d)
        want[c] = math.fsum(dy[:, c] * centred) / math.sqrt(math.fsum(centred * centred) / len(d) + 1e-5)
    assert relative_error(dg, want) < 1e-11


def test_relative_error_refuses_complex_arrays():
    """Cast to float64, the imaginary parts would be dropped: 1j and 2j would compare as equal."""
    with pytest.raises(TypeError, match=r"real arrays, got complex a \(complex128\)"):
        relative_error(np.array([1j]), np.array([2j]))
    with pytest.raises(TypeError, match="complex b"):
        relative_error(np.ones(2), np.ones(2, np.complex64))
