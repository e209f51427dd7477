"""An independent float64 reference for batch norm, written from the equations for clarity."""
import numpy as np


def bn_forward_ref(x, gamma, beta, eps):
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    g = np.ones(shape) if gamma is None else np.asarray(gamma, np.float64).reshape(shape)
    b = np.zeros(shape) if beta is None else np.asarray(beta, np.float64).reshape(shape)
    return g * (x - mu) / np.sqrt(var + eps) + b, mu.ravel(), var.ravel()


def random_input(rng, dtype=np.float64, max_ndim=5):
    ndim = int(rng.integers(2, max_ndim + 1))
    shape = [int(rng.integers(2, 9)), int(rng.integers(1, 8))] + [int(rng.integers(1, 6)) for _ in range(ndim - 2)]
    x = rng.normal(loc=rng.uniform(-20, 20), scale=rng.uniform(0.1, 5), size=shape)
    return x.astype(dtype)
