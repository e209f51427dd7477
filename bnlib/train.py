# GENERATED FILE: do not edit.
# bnlib.train is generated from chapters/07_experiments.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['ACTIVATIONS', 'INITS', 'init_weights', 'MLP', 'cross_entropy', 'check_labels', 'loss_and_grads', 'iid_batches', 'class_batches', 'History', 'accuracy', 'precise_bn', 'fit']

import numbers
import sys

import numpy as np

from bnlib import cpu
from bnlib import functional as F
from bnlib.data import _check_seed, _is_int
from bnlib.layers import BatchNorm


ACTIVATIONS = ("sigmoid", "tanh", "relu")
INITS = ("uniform", "glorot", "he")


def _activate(name, z):
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))        # = 1 / (1 + exp(-z)), without overflow
    if name == "tanh":
        return np.tanh(z)
    return np.maximum(z, 0)


def _activation_grad(name, z, a, da):
    """d loss / d z from d loss / d a, for a = activation(z)."""
    if name == "sigmoid":
        return da * a * (1 - a)
    if name == "tanh":
        return da * (1 - a * a)
    return da * (z > 0)


def init_weights(rng, fan_in, fan_out, init, dtype=np.float32):
    """One (fan_in, fan_out) weight matrix.

    init: "uniform" U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch.nn.Linear's default);
          "glorot"  U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010);
          "he"      N(0, 2 / fan_in) (He et al. 2015, for ReLU);
          a number s > 0: N(0, s^2), the same scale in every layer.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    for size, name in ((fan_in, "fan_in"), (fan_out, "fan_out")):
        if not (_is_int(size) and size >= 1):
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if isinstance(init, numbers.Real) and not isinstance(init, bool):
        if not (init > 0 and np.isfinite(init)):
            raise ValueError(f"init scale must be a finite number > 0, got {init!r}")
        w = rng.normal(0.0, float(init), (fan_in, fan_out))
    elif init == "uniform":
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_in, fan_out))
    elif init == "glorot":
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-bound, bound, (fan_in, fan_out))
    elif init == "he":
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
    else:
        raise ValueError(f"init must be one of {INITS} or a positive number, got {init!r}")
    return w.astype(dtype)


def _norm_layer(norm, num_features):
    """norm(num_features), checked for the methods the trainer calls, so that a wrong factory fails here, naming norm."""
    layer = norm(num_features)
    missing = [m for m in ("forward", "backward", "train", "state_dict", "load_state_dict")
               if not callable(getattr(layer, m, None))]
    if missing:
        raise TypeError(f"norm({num_features}) must return a layer with BatchNorm's interface; what it returned, of "
                        f"type {type(layer).__name__}, has no {', '.join(m + '()' for m in missing)}")
    return layer


# One call for all models' layers. Model m's BatchNorm normalizes its own (N, C) activations, channel by channel;
# the models' activations side by side, (N, models * C), are one batch of models * C channels, and one BatchNorm
# call on them does the work of the models' calls for the fixed cost of one (on the order of 0.1 ms, which on
# small activations is most of a call). It is the same computation, bit for bit, under these conditions
# (tests/test_train.py compares whole training runs, and adversarial batches):
# - the layers are distinct bnlib.layers.BatchNorm objects, not a subclass, with BatchNorm's own forward and
#   backward (an instance whose methods were replaced, as precise_bn does, or a patched class may compute
#   something else), with the same settings (of the same types: a NumPy float64 momentum makes NumPy update a
#   float32 buffer in float64) and the same number of batches seen, and parameters and buffers of shape (C,);
# - the numba backend: its kernels sum each column down the rows alone, in an order that depends only on N and
#   the number of threads (the NumPy backend's BLAS sums and its per-call choice to re-centre offer no such promise);
# - with batch statistics, N <= 1001 rows, and every channel's variance, as the joint call returns it, at least
#   1e-30 (1e-280 in float64) or NaN. The kernel re-centres every channel of a call when one channel's first value
#   K lies over 100 standard deviations from the channel's mean (then the statistics are summed again around the
#   mean). In exact arithmetic (mean - K)^2 <= (N - 1) * var for any value K of the channel (Samuelson's
#   inequality), ten times out of reach with N - 1 <= 1000. In floating point only underflow can fire it: squares
#   (x - K)^2 below about 1e-38 (float32) round to 0 or lose their digits, which matters only for a channel whose
#   variance is itself that small, and such a channel comes out of either pass with a variance under 1e-30. So a
#   joint call that returns no such variance did not re-centre, nor would any model's own call have; one that does
#   (a constant channel included, whose variance is 0) is dropped before it changed anything, and each model gets
#   its own call. NaN (a diverged network) never fires the test.
# The joint call is made only below cpu.PARALLEL_MIN_SIZE values, where it runs the serial kernels as each model's
# call would: the parallel kernels, right after a NumPy matrix product (as the trainer's normalizations come),
# can wait for the BLAS library's threads to let go of the cores (5.8 to 14 ms a call, measured on this book's
# 2-core machine with NumPy's OpenBLAS threads and numba's OpenMP ones). Larger activations gain little anyway.
# A joint call that raises changes nothing, and the models' own calls then run, to raise their own errors.
_JOINT_SETTINGS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "training", "dtype",
                   "num_batches_tracked")
_JOINT_MAX_ROWS = 1001
_JOINT_MIN_VAR = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-280}
_BATCHNORM_METHODS = (BatchNorm.forward, BatchNorm.backward)       # as bnlib.layers defines them


def _joint_call(layers, z):
    """Whether the models' layers can normalize z (models, N, C) in one call (see the conditions above); the
    conditions on z's values are checked by _joint_forward."""
    if len(layers) < 2 or cpu.get_backend() != "numba" or not 0 < z.size < cpu.PARALLEL_MIN_SIZE:
        return False
    if (BatchNorm.forward, BatchNorm.backward) != _BATCHNORM_METHODS or not all(
            type(layer) is BatchNorm and "forward" not in vars(layer) and "backward" not in vars(layer)
            for layer in layers):
        return False
    first = layers[0]
    if z.dtype != first.dtype or any(type(getattr(layer, name)) is not type(getattr(first, name))
                                     or getattr(layer, name) != getattr(first, name)
                                     for layer in layers[1:] for name in _JOINT_SETTINGS):
        return False
    arrays = []                                         # every layer's parameters and buffers that exist
    for layer in layers:
        for name in ("weight", "bias", "running_mean", "running_var"):
            a = getattr(layer, name)
            if (a is None) != (getattr(first, name) is None):
                return False
            if a is not None:
                if not (type(a) is np.ndarray and a.shape == (first.num_features,) and a.dtype == first.dtype):
                    return False
                arrays.append(a)
    if len({id(layer) for layer in layers}) != len(layers) or len({id(a) for a in arrays}) != len(arrays):
        return False                                    # a layer, or an array, shared between models
    if first._uses_batch_stats():
        return first.eps > 0 and 2 <= z.shape[1] <= _JOINT_MAX_ROWS   # else each layer raises its own error
    return True


def _joint_forward(layers, z):
    """Every model's layers[m].forward(z[m]) in one call, leaving every layer's state (running statistics, batch
    count, the cache its own backward() reads) as that call leaves it. Returns y (models, N, C) and the joint
    cache (None in evaluation mode); None instead when z's values do not allow the joint call."""
    first = layers[0]
    m, n, c = z.shape
    columns = np.ascontiguousarray(z.transpose(1, 0, 2)).reshape(n, m * c)   # column k * C + j: model k's channel j
    def joined(name):
        return None if getattr(first, name) is None else np.concatenate([getattr(layer, name) for layer in layers])
    gamma, beta = joined("weight"), joined("bias")
    parts = [slice(k * c, (k + 1) * c) for k in range(m)]
    if first._uses_batch_stats():
        y, cache = F.batch_norm_forward(columns, gamma, beta, first.eps)
        if not np.all((cache.var >= _JOINT_MIN_VAR[columns.dtype]) | np.isnan(cache.var)):
            return None                                # it may have re-centred: nothing is changed yet
        if first.training and first.track_running_stats:
            steps = first.num_batches_tracked + 1
            mean, var = F.update_running_stats(joined("running_mean"), joined("running_var"), cache, first.momentum,
                                               num_batches_tracked=steps)
            for layer, part in zip(layers, parts):
                layer.running_mean[...], layer.running_var[...] = mean[part], var[part]
                layer.num_batches_tracked = steps
        for k, (layer, part) in enumerate(zip(layers, parts)):
            layer._cache = ("train", F.BNCache(z[k], cache.mean[part], cache.var[part], cache.inv_std[part],
                                               layer.weight, cache.eps))
    else:
        y = F.batch_norm_inference(columns, joined("running_mean"), joined("running_var"), gamma, beta, first.eps)
        cache = None
        for k, layer in enumerate(layers):
            layer._cache = ("eval", z[k])
    return np.ascontiguousarray(y.reshape(n, m, c).transpose(1, 0, 2)), cache


def _joint_backward(layers, cache, kept, dz):
    """Every model's layers[m].backward(dz[m]) in one call, after _joint_forward in training (kept: the caches it
    left the layers): dx (models, N, C), and each layer's grad_weight and grad_bias filled as its own backward()
    fills them."""
    m, n, c = dz.shape
    columns = np.ascontiguousarray(dz.transpose(1, 0, 2)).reshape(n, m * c)
    if cache.gamma is not None:                        # each layer's cache holds its weight array itself, as
        cache = cache._replace(gamma=np.concatenate([saved.gamma for _, saved in kept]))   # its own forward keeps it
    dx, dgamma, dbeta = F.batch_norm_backward(columns, cache)
    for k, layer in enumerate(layers):
        part = slice(k * c, (k + 1) * c)
        if layer.grad_weight is not None:
            layer.grad_weight[...] = dgamma[part]
        if layer.grad_bias is not None:
            layer.grad_bias[...] = dbeta[part]
    return np.ascontiguousarray(dx.reshape(n, m, c).transpose(1, 0, 2))


class MLP:
    """A fully connected classifier, optionally with a normalization layer after every hidden linear map.

    Layer l (hidden): z = x @ W_l (+ b_l);  z = norm_l(z) if norm;  x = activation(z).
    Output: logits = x @ W_L + b_L, trained with softmax cross-entropy.

    Args:
        sizes: [inputs, hidden_1, ..., hidden_k, classes], e.g. [64, 100, 100, 100, 10]
        activation: "sigmoid", "tanh" or "relu"
        norm: None, or a callable num_features -> layer with bnlib.layers.BatchNorm's interface
            (forward(x), backward(dy) -> dx, weight, bias, grad_weight, grad_bias, train(), eval(),
            state_dict(), load_state_dict()); the layer sees (N, hidden) arrays. With a norm layer the
            hidden linear maps have no bias (the normalization's shift beta replaces it).
        init: "uniform", "glorot", "he" or a weight standard deviation (see init_weights)
        n_models: how many independent networks to train side by side in one vectorized pass
            (separate weights, normalization layers, batches; model m is seeded by (seed, m))
        seed: seeds the weights (and, in fit(), the batches)
        dtype: float32 (default) or float64 (for gradient checks)

    Shapes: inputs (N, inputs) (the same batch for every model) or (n_models, N, inputs);
    logits (n_models, N, classes). After forward(), ``activations[l]`` holds layer l's
    activation input z (n_models, N, hidden) and ``layer_inputs[l]`` the input of layer l's linear map
    (n_models, N, sizes[l]; l = 0 is x); after backward(), ``gradients[l]`` holds d loss / d z
    and ``grads`` the parameter gradients, by name (see ``parameters()``).
    """

    def __init__(self, sizes, activation="relu", norm=None, init="he", n_models=1, seed=0, dtype=np.float32):
        sizes = list(sizes)
        if len(sizes) < 2 or not all(_is_int(s) and s > 0 for s in sizes):
            raise ValueError(f"sizes must be a list of >= 2 positive integers, got {sizes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        is_layer = not isinstance(norm, type) and hasattr(norm, "forward")          # BatchNorm(7), not BatchNorm
        if norm is not None and (not callable(norm) or is_layer):
            raise TypeError(f"norm must be None or a callable num_features -> layer (a class such as BatchNorm, or "
                            f"lambda c: BatchNorm(c, momentum=0.01)), got {type(norm).__name__}"
                            + (" instance: MLP makes one layer per hidden layer and model" if is_layer else ""))
        if not (_is_int(n_models) and n_models >= 1):
            raise ValueError(f"n_models must be a positive integer, got {n_models!r}")
        _check_seed(seed)
        if np.dtype(dtype).name not in ("float32", "float64"):
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        init_weights(np.random.default_rng(0), 1, 1, init)           # validates init before any state
        self.sizes, self.activation, self.init = sizes, activation, init
        self.n_models, self.seed, self.dtype = int(n_models), seed, np.dtype(dtype)
        self.has_norm = norm is not None
        rngs = [np.random.default_rng([seed, m]) for m in range(self.n_models)]
        self.weights, self.biases, self.norms = [], [], []
        for l, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            hidden = l < len(sizes) - 2
            self.weights.append(np.stack([init_weights(r, fan_in, fan_out, init, self.dtype) for r in rngs]))
            use_bias = not (hidden and self.has_norm)
            self.biases.append(np.zeros((self.n_models, fan_out), self.dtype) if use_bias else None)
            if hidden and self.has_norm:
                self.norms.append([_norm_layer(norm, fan_out) for _ in range(self.n_models)])
        self._forget_pass()

    def _forget_pass(self):
        """No forward or backward pass yet: what the last one recorded (activations, caches, gradients) is cleared."""
        self.activations, self.layer_inputs, self.gradients, self.grads = [], [], [], {}
        self._cache, self._joint = None, {}

    @property
    def depth(self):
        """Number of hidden layers."""
        return len(self.sizes) - 2

    # ---------------------------------------------------------------- parameters
    def parameters(self):
        """[(name, array)]: W{l}, b{l} of shape (n_models, ...), and norm{l}.{m}.weight / .bias."""
        params = []
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            params.append((f"W{l}", w))
            if b is not None:
                params.append((f"b{l}", b))
        for l, layers in enumerate(self.norms):
            for m, layer in enumerate(layers):
                for attr in ("weight", "bias"):
                    if getattr(layer, attr, None) is not None:
                        params.append((f"norm{l}.{m}.{attr}", getattr(layer, attr)))
        return params

    def norm_layers(self):
        return [layer for layers in self.norms for layer in layers]

    def train(self, mode: bool = True):
        if not isinstance(mode, (bool, np.bool_)):        # checked here too: a model without norm layers has none to ask
            raise ValueError(f"training mode is expected to be boolean (True or False), got {mode!r}")
        for layer in self.norm_layers():
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def state(self):
        """Copies of every parameter and every normalization layer's state dict (see load_state)."""
        return ({name: p.copy() for name, p in self.parameters()},
                [layer.state_dict() for layer in self.norm_layers()])

    def load_state(self, state):
        """Load what state() returned, from a model of the same sizes, norm and n_models. Every name, shape and
        the number of normalization layers are checked before anything is assigned, and a layer that refuses
        its state dict puts everything back: a state that does not fit raises and changes nothing."""
        if not (isinstance(state, (tuple, list)) and len(state) == 2 and isinstance(state[0], dict)):
            raise TypeError(f"state must be (parameters, normalization layer states), as state() returns, got "
                            f"{type(state).__name__}")
        params, norm_states = state
        mine, layers = dict(self.parameters()), self.norm_layers()
        missing, unexpected = sorted(set(mine) - set(params)), sorted(set(params) - set(mine))
        if missing or unexpected:
            raise ValueError(f"state does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in mine.items():
            if np.shape(params[name]) != p.shape:          # no broadcasting: one model's (1, ...) into n_models
                raise ValueError(f"state's {name} has shape {np.shape(params[name])}, this model's {p.shape}")
        if len(norm_states) != len(layers):
            raise ValueError(f"state holds {len(norm_states)} normalization layer states, this model has {len(layers)}")
        saved = self.state()
        try:
            for name, p in mine.items():
                p[...] = params[name]
            for layer, s in zip(layers, norm_states):
                layer.load_state_dict(s)
        except BaseException:
            for name, p in self.parameters():
                p[...] = saved[0][name]
            for layer, s in zip(layers, saved[1]):
                layer.load_state_dict(s)
            raise

    # ---------------------------------------------------------------- forward / backward
    def _inputs(self, x):
        if not hasattr(x, "ndim") or x.ndim not in (2, 3) or x.shape[-1] != self.sizes[0]:
            raise ValueError(f"x must have shape (N, {self.sizes[0]}) or ({self.n_models}, N, {self.sizes[0]}), "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if x.ndim == 3 and x.shape[0] != self.n_models:
            raise ValueError(f"x of shape {x.shape} has {x.shape[0]} models in axis 0, expected {self.n_models}")
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":                  # complex, strings, objects: not a real-valued input
            raise TypeError(f"x must hold real numbers (a float, integer or bool dtype), got dtype {x.dtype}")
        x = x.astype(self.dtype, copy=False)
        return np.broadcast_to(x, (self.n_models,) + x.shape) if x.ndim == 2 else x

    def forward(self, x):
        """Logits (n_models, N, classes) for inputs x (N, inputs) or (n_models, N, inputs)."""
        h = self._inputs(x)
        inputs, zs, outs = [], [], []
        self._joint = {}                     # hidden layer -> (joint cache, the cache each layer was left), training
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            inputs.append(h)
            z = np.matmul(h, w)                                        # (M, N, out)
            if b is not None:
                z += b[:, None, :]
            if l == self.depth:
                self._cache = (inputs, zs, outs)
                self.activations, self.layer_inputs = zs, inputs
                return z
            joint = None
            if self.has_norm and _joint_call(self.norms[l], z):
                try:
                    joint = _joint_forward(self.norms[l], z)
                except Exception:                   # it changed nothing: the layers' own calls raise their own errors
                    pass
            if joint is not None:
                z, cache = joint
                if cache is not None:
                    self._joint[l] = (cache, [layer._cache for layer in self.norms[l]])
            elif self.has_norm:
                z = np.stack([layer.forward(z[m]) for m, layer in enumerate(self.norms[l])])
            h = _activate(self.activation, z)
            zs.append(z)
            outs.append(h)

    def backward(self, dlogits):
        """Back-propagate d loss / d logits (n_models, N, classes); fills grads and gradients."""
        if self._cache is None:
            raise ValueError("backward() needs a forward() first")
        inputs, zs, outs = self._cache
        grads, gradients = {}, [None] * self.depth
        dz = dlogits
        for l in range(self.depth, -1, -1):
            grads[f"W{l}"] = np.matmul(inputs[l].transpose(0, 2, 1), dz)
            if self.biases[l] is not None:
                grads[f"b{l}"] = dz.sum(axis=1)
            if l == 0:
                break
            dh = np.matmul(dz, self.weights[l].transpose(0, 2, 1))
            dz = _activation_grad(self.activation, zs[l - 1], outs[l - 1], dh)
            gradients[l - 1] = dz
            if self.has_norm:
                layers = self.norms[l - 1]
                cache, kept = self._joint.get(l - 1, (None, ()))
                # the joint cache while every layer still holds what _joint_forward left it (no forward of its own
                # since); else each layer's own backward, which reads its own cache
                joint = None
                if cache is not None and all(layer._cache is k for layer, k in zip(layers, kept)):
                    try:
                        joint = _joint_backward(layers, cache, kept, dz)
                    except Exception:               # it changed nothing: the layers' own calls raise their own errors
                        pass
                dz = joint if joint is not None else np.stack(
                    [layer.backward(np.ascontiguousarray(dz[m])) for m, layer in enumerate(layers)])
                for m, layer in enumerate(layers):
                    for attr in ("weight", "bias"):
                        g = getattr(layer, f"grad_{attr}", None)
                        if g is not None:
                            grads[f"norm{l - 1}.{m}.{attr}"] = np.array(g, copy=True)
        self.grads, self.gradients = grads, gradients
        return grads


def cross_entropy(logits, y):
    """Mean softmax cross-entropy per model and its gradient.

    logits: (M, N, classes); y: (N,) or (M, N) int labels in [0, classes) (checked). Returns (loss (M,),
    dlogits (M, N, classes)), dlogits being the gradient of the per-model mean loss.
    """
    if np.ndim(logits) != 3:
        raise ValueError(f"logits must have shape (M, N, classes), got {np.shape(logits)}")
    return _cross_entropy(logits, check_labels(y, logits.shape[1], logits.shape[2], n_models=logits.shape[0]))


def _cross_entropy(logits, y):
    """cross_entropy for labels already checked (loss_and_grads checks them before the forward pass)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    y = np.broadcast_to(y, logits.shape[:2])
    n = logits.shape[1]
    picked = np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]      # (M, N)
    d = np.exp(logp)
    np.put_along_axis(d, y[..., None], np.take_along_axis(d, y[..., None], axis=-1) - 1, axis=-1)
    return -picked.mean(axis=1), d / n


def check_labels(y, n, classes, name="y", n_models=None):
    """y as an int64 array of n labels in [0, classes); a ValueError/TypeError naming ``name`` otherwise.

    y: (n,), the same labels for every model, or (n_models, n), one row of labels per model
    (any number of rows when n_models is None).
    """
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.shape[-1:] != (n,) or y.ndim not in (1, 2) or (y.ndim == 2 and n_models is not None
                                                          and y.shape[0] != n_models):
        per_model = f"({'M' if n_models is None else n_models}, {n})"
        raise ValueError(f"{name} must have shape ({n},), one label per example, or {per_model}, one row "
                         f"per model, got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{name} must hold labels in [0, {classes}), got values from {y.min()} to {y.max()}")
    return y.astype(np.int64, copy=False)


def _check_inputs(model, x, name):
    """x as an array of shape (N, inputs) or (n_models, N, inputs) for ``model``, else a ValueError/TypeError."""
    if not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a NumPy array of shape (N, {model.sizes[0]}), got {type(x).__name__}")
    if x.ndim not in (2, 3) or x.shape[-1] != model.sizes[0] or (x.ndim == 3 and x.shape[0] != model.n_models):
        raise ValueError(f"{name} must have shape (N, {model.sizes[0]}) or ({model.n_models}, N, {model.sizes[0]}), "
                         f"got {x.shape}")
    return x


def loss_and_grads(model, x, y):
    """Training-mode forward and backward on one batch: (loss per model (M,), grads by name).

    x: (N, inputs) or (n_models, N, inputs); y: (N,) or (n_models, N) labels in [0, classes).
    Labels are checked before the forward pass, so a bad call leaves the running statistics alone.
    """
    x = _check_inputs(model, x, "x")
    y = check_labels(y, x.shape[-2], model.sizes[-1], n_models=model.n_models)
    logits = model.forward(x)
    loss, dlogits = _cross_entropy(logits, y)
    return loss, model.backward(dlogits.astype(model.dtype, copy=False))


import copy
from dataclasses import dataclass, field

from bnlib.stats import Moments, merge_moments, moments


def iid_batches(rng, y_train, batch_size):
    """The usual sampler: batch_size distinct training indices, uniformly at random."""
    if not (_is_int(batch_size) and 1 <= batch_size <= y_train.size):
        raise ValueError(f"batch_size must be an integer in [1, {y_train.size}] (the training examples, drawn without "
                         f"replacement), got {batch_size!r}")
    return rng.choice(y_train.size, size=batch_size, replace=False)


def class_batches(num_classes=2):
    """A non-i.i.d. sampler: every batch is drawn from ``num_classes`` randomly chosen classes only.

    Each call checks, before drawing, that y_train has at least num_classes classes and that the
    num_classes smallest of them hold at least batch_size examples together (so that any batch can
    be filled from the classes drawn for it); a ValueError names num_classes or batch_size otherwise.
    """
    if not (_is_int(num_classes) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    def sample(rng, y_train, batch_size):
        labels, counts = np.unique(y_train, return_counts=True)
        if num_classes > labels.size:
            raise ValueError(f"class_batches(num_classes={num_classes}): the training labels hold only "
                             f"{labels.size} classes")
        smallest = int(np.sort(counts)[:num_classes].sum())
        if batch_size > smallest:
            raise ValueError(f"class_batches(num_classes={num_classes}): batch_size={batch_size} is more than the "
                             f"{smallest} examples of the {num_classes} smallest classes (classes hold {counts.min()} "
                             f"to {counts.max()} examples), so a batch could not always be filled: use batch_size "
                             f"<= {smallest} or a larger num_classes")
        classes = rng.choice(labels, size=num_classes, replace=False)
        pool = np.flatnonzero(np.isin(y_train, classes))
        return rng.choice(pool, size=batch_size, replace=False)
    return sample


@dataclass
class History:
    """What fit() recorded. steps (T,): the step after which each evaluation ran (0 = before training);
    test_acc (T, M): held-out accuracy per model; train_loss (T, M): mean training loss over the steps
    since the previous evaluation (nan at step 0); hooks: name -> [value at each evaluation]."""
    steps: np.ndarray
    test_acc: np.ndarray
    train_loss: np.ndarray
    hooks: dict = field(default_factory=dict)

    @property
    def final_acc(self):
        return self.test_acc[-1]


def accuracy(model, x, y, batch_size=None, batch_stats=False, seed=0, chunk=2048, fill_last=False):
    """Held-out accuracy per model, (M,), for x (N, inputs) or (M, N, inputs) and labels y (N,) or (M, N).

    An example counts as correct for a model when its largest logit is at the label; an example whose
    logits are not all finite (a diverged network: NaN or inf) counts as wrong, whatever argmax says.
    batch_stats=False: evaluation mode (running statistics), in chunks of ``chunk`` examples.
    batch_stats=True: the normalization uses the statistics of test batches of ``batch_size``
    examples, drawn in a random order fixed by ``seed`` (as training batches are), and the layers'
    state (running statistics included) is restored afterwards. A last batch of a single example is
    left out (it has no variance). fill_last=True: a last, partial batch is filled up to ``batch_size``
    with examples from the start of the order, which set its statistics but are not counted again, so that
    every example is counted once and normalized with the statistics of a full batch (with fewer than
    ``batch_size`` examples in all, they make one batch). Every layer is left in the mode it was in.
    seed may also be a sequence of seeds (batch_stats=True only): one order of the batches per seed, accuracies
    (len(seed), M), each row what seed=s alone gives, bit for bit, computed in fewer passes: copies of the networks
    side by side, one per order, made with copy.deepcopy, so the layers must keep in their state what their training
    forward depends on (a layer that draws random numbers draws from the same state for every order of a pass). A
    layer with a method set on the instance (a hook, a recorder) makes every order run on the model itself. After a
    pass with copies, the model's activations and caches are not those of the last batch.
    """
    x = _check_inputs(model, x, "x")
    y = check_labels(y, x.shape[-2], model.sizes[-1], n_models=model.n_models)
    n = x.shape[-2]                                        # examples per model
    if n == 0:
        raise ValueError(f"x and y hold no examples (x has shape {x.shape}): accuracy needs at least one")
    if not (_is_int(chunk) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer (examples per forward pass), got {chunk!r}")
    if batch_stats and not (_is_int(batch_size) and 2 <= batch_size):
        raise ValueError(f"batch_stats=True needs batch_size >= 2 (a batch's own statistics), got {batch_size!r}")
    if batch_stats and n < 2:
        raise ValueError(f"batch_stats=True needs at least 2 examples, got {n}")
    if fill_last and not batch_stats:
        raise ValueError("fill_last=True fills the last batch of batch_stats=True: pass batch_stats=True too")
    if isinstance(seed, (list, tuple, range)) or (isinstance(seed, np.ndarray) and seed.ndim == 1):
        seeds = list(seed)
        if not (batch_stats and seeds):
            raise ValueError(f"a sequence of seeds (one order of the batches each) needs batch_stats=True and at least "
                             f"one seed, got {len(seeds)} seed(s) with batch_stats={batch_stats}")
        for i, s in enumerate(seeds):
            _check_seed(s, f"seed[{i}]")
        return _accuracy_orders(model, x, y, batch_size, seeds, fill_last)
    _check_seed(seed)
    if batch_stats:
        order = np.random.default_rng(seed).permutation(n)
        x, y = x[..., order, :], y[..., order]
    correct, counted = np.zeros(model.n_models), 0
    modes = [getattr(layer, "training", True) for layer in model.norm_layers()]
    if batch_stats:
        saved = [layer.state_dict() for layer in model.norm_layers()]
        model.train()
        step = batch_size
    else:
        model.eval()
        step = chunk
    try:
        for start in range(0, n, step):
            stop = min(start + step, n)
            filler = min(step - (stop - start), start) if fill_last else 0   # from the start, for the statistics only
            if batch_stats and stop - start < 2 and not filler:
                break                                      # a 1-example batch has no variance
            xb = x[..., start:stop, :]
            if filler:
                xb = np.concatenate([xb, x[..., :filler, :]], axis=-2)
            logits = model.forward(xb)[..., :stop - start, :]                   # (M, B, classes)
            right = (logits.argmax(axis=-1) == y[..., start:stop]) & np.isfinite(logits).all(axis=-1)
            correct += right.sum(axis=1)
            counted = stop
    finally:
        if batch_stats:
            for layer, s in zip(model.norm_layers(), saved):
                layer.load_state_dict(s)
        for layer, mode in zip(model.norm_layers(), modes):   # back to the mode the model was in
            layer.train(mode)
    return correct / counted


_ORDERS_BYTES = 64 * 2 ** 20          # the examples copied for one pass of accuracy() over several orders, at most


def _repeated(model, k):
    """A copy of model holding its networks k times over (network i * n_models + m is a copy of network m, with
    copies of its normalization layers), for accuracy() to evaluate k orders of batches in one pass."""
    rep = copy.copy(model)
    rep.n_models = model.n_models * k
    rep.weights = [np.concatenate([w] * k) for w in model.weights]
    rep.biases = [None if b is None else np.concatenate([b] * k) for b in model.biases]
    copies = [copy.deepcopy(model.norms) for _ in range(k)]           # one per order: what networks share, they
    rep.norms = [[layer for c in copies for layer in c[l]] for l in range(len(model.norms))]   # share within it
    rep._forget_pass()                                                 # nothing of the model's last pass
    return rep


def _accuracy_orders(model, x, y, batch_size, seeds, fill_last):
    """accuracy(..., batch_stats=True) for each seed of seeds, (len(seeds), M), with several orders per pass: order j
    runs on copies of the networks placed side by side (the matrix products of the networks are separate calls, and the
    BatchNorm layers' joint call is bit for bit each layer's own), fed the examples so that accuracy()'s own shuffle
    puts them in order j's order. As many orders go into a pass as keep a hidden layer's activations under
    cpu.PARALLEL_MIN_SIZE values, the joint call's limit, and the copied examples under _ORDERS_BYTES; one order per
    pass runs on the model itself, as does every order when a layer has a method of its own (set on the instance: it
    may reach objects a copy does not copy)."""
    m, n = model.n_models, x.shape[-2]
    x, y = np.broadcast_to(x, (m, n, x.shape[-1])), np.broadcast_to(y, (m, n))
    widest = max(model.sizes[1:-1], default=1)
    order_bytes = m * n * x.shape[-1] * x.itemsize                    # one order's copy of the examples
    per_pass = min((cpu.PARALLEL_MIN_SIZE - 1) // (m * widest * min(batch_size, n)), _ORDERS_BYTES // order_bytes)
    if any(callable(v) for layer in model.norm_layers() for v in getattr(layer, "__dict__", {}).values()):
        per_pass = 1
    per_pass = max(1, per_pass)
    shuffle = np.random.default_rng(seeds[0]).permutation(n)          # what accuracy() applies with seed=seeds[0]
    rows = []
    for start in range(0, len(seeds), per_pass):
        part = seeds[start:start + per_pass]
        fed = []
        for s in part:                                                 # fed[shuffle] is order s
            f = np.empty(n, dtype=np.intp)
            f[shuffle] = np.random.default_rng(s).permutation(n)
            fed.append(f)
        xs = np.concatenate([x[:, f] for f in fed])
        ys = np.concatenate([y[:, f] for f in fed])
        net = model if len(part) == 1 else _repeated(model, len(part))
        rows.append(accuracy(net, xs, ys, batch_size, batch_stats=True, seed=seeds[0],
                             fill_last=fill_last).reshape(len(part), m))
    return np.concatenate(rows)


def _updates_running_stats(layer):
    """Whether training mode updates this layer's running statistics: it has running_mean and
    running_var, tracks them (track_running_stats, where the layer has the flag) and its momentum is
    None (a cumulative average) or a number other than 0. Momentum 0 keeps the buffers as they are:
    bnlib.variants.FrozenBatchNorm (pretrained statistics that training never changes) is built so."""
    if getattr(layer, "running_mean", None) is None or getattr(layer, "running_var", None) is None:
        return False
    if not getattr(layer, "track_running_stats", True) or not hasattr(layer, "momentum"):
        return False
    return layer.momentum is None or layer.momentum != 0


def precise_bn(model, x_train, batch_size, num_batches=200, seed=0, variance="pooled"):
    """PreciseBN (Wu & Johnson 2021): replace the running statistics by population statistics.

    With the weights frozen, ``num_batches`` training batches of ``batch_size`` are forwarded in
    training mode, and every normalization layer whose running statistics training updates gets new ones:
    variance="pooled" (the default; Wu and Johnson's code, fvcore's update_bn_stats): the mean and the
        variance of every value the layer received in the pass, per channel, the batches pooled, so the
        spread between the batches' means counts (the variance divides by the number of values);
    variance="batch" (the batch-norm paper's estimator, as torch.optim.swa_utils.update_bn computes it):
        momentum=None, a cumulative average of the batch means and of the batches' unbiased variances.
    For batches of equal size the means are the same. The variances differ where a batch's values are not
    independent: one source per batch (pooled larger: chapter 09, Q11), or after a batch-normalized layer,
    where small batches have nearly equal means (pooled smaller, down to (n - 1) / n of the batch average
    for n values per batch: half at 2). num_batches_tracked counts the pass's batches either way. During
    the pass the layers normalize with batch statistics; a layer whose training output also depends on its
    running statistics (bnlib.variants.BatchRenorm with relaxed limits) sees them rebuilt from reset values.
    A layer listed twice in model.norm_layers() is refused, and so is a bnlib.variants.InstanceNorm with
    running statistics (they average per-example statistics, and it has no cumulative average).
    Layers whose statistics training leaves alone (momentum 0, as bnlib.variants.FrozenBatchNorm) and
    layers without running statistics keep their state exactly. Afterwards every layer has its
    momentum back and is in the mode (training or evaluation) it was in; if a forward pass raises,
    every layer's state is restored as well.
    x_train: (N, inputs) or (n_models, N, inputs); batch_size in [2, N]; num_batches >= 1 (checked
    before any buffer changes).
    """
    x_train = _check_inputs(model, x_train, "x_train")
    n = x_train.shape[-2]
    if not (_is_int(batch_size) and 2 <= batch_size <= n):
        raise ValueError(f"batch_size must be an integer in [2, {n}] (the training examples), got {batch_size!r}")
    if not (_is_int(num_batches) and num_batches >= 1):
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    if variance not in ("pooled", "batch"):
        raise ValueError(f'variance must be "pooled" (Wu and Johnson) or "batch" (update_bn), got {variance!r}')
    _check_seed(seed)
    norms = model.norm_layers()
    from bnlib.variants import InstanceNorm                # chapter 08; imported here, as train comes first
    for i, l in enumerate(norms):
        if isinstance(l, InstanceNorm) and _updates_running_stats(l):
            raise ValueError(f"precise_bn recomputes batch statistics; normalization layer {i} is an InstanceNorm, "
                             f"whose running statistics average per-example ones (and which, as torch's, has no "
                             f"cumulative average): recompute it by training it, or build it with "
                             f"track_running_stats=False")
    recompute = [_updates_running_stats(l) for l in norms]
    saved = [l.state_dict() for l in norms]
    modes = [getattr(l, "training", None) for l in norms]
    if len({id(l) for l in norms}) != len(norms):
        raise ValueError("precise_bn: a normalization layer appears more than once in model.norm_layers()")
    momenta = [l.momentum if r else None for l, r in zip(norms, recompute)]
    pooled = {}                                    # layer index -> Moments of the values it received (float64)
    own_forward = {}                               # layer index -> a forward the instance itself had, restored below

    def recording(i, forward):
        def forward_and_record(x):                 # chapter 02: two-pass moments per call, Chan's merge across calls
            pooled[i] = merge_moments(pooled[i], moments(np.asarray(x, dtype=np.float64)))
            return forward(x)
        return forward_and_record

    rng = np.random.default_rng(seed)
    done = False
    try:
        for i, (l, r) in enumerate(zip(norms, recompute)):
            if r:
                l.momentum = None
                l.running_mean[...] = 0
                l.running_var[...] = 1
                l.num_batches_tracked = 0
                if variance == "pooled":
                    pooled[i] = Moments(0, None, None)
                    if "forward" in vars(l):
                        own_forward[i] = vars(l)["forward"]
                    l.forward = recording(i, l.forward)    # an instance attribute, removed below
        model.train()
        for _ in range(num_batches):
            model.forward(x_train[..., rng.choice(n, size=batch_size, replace=False), :])
        for i, total in pooled.items():
            norms[i].running_mean[...] = total.mean
            norms[i].running_var[...] = total.var
        done = True
    finally:
        for i, (l, r, state, mode, momentum) in enumerate(zip(norms, recompute, saved, modes, momenta)):
            if i in pooled:
                if i in own_forward:
                    l.forward = own_forward[i]     # the instance's own forward, as it was
                else:
                    del l.forward                  # the class's forward again
            if r:
                l.momentum = momentum
            if not (r and done):                   # left alone, or a failed call: the state it had
                l.load_state_dict(state)
            if mode is not None:
                l.train(mode)
    return model


def fit(model, data, *, steps, lr, batch_size=60, momentum=0.9, weight_decay=0.0, sampler=None,
        norm_batch_size=None, eval_every=None, hooks=None, trainable=None, lr_schedule=None,
        seed=0, progress=None, desc="training"):
    """Train ``model`` with SGD (momentum, weight decay) on softmax cross-entropy; returns a History.

    data: (x_train, y_train, x_test, y_test), e.g. bnlib.data.load_digits(); accuracy is always
        measured on the held-out (x_test, y_test) in evaluation mode (see accuracy(): an example whose
        logits are not finite, as after divergence, counts as wrong, and training goes on).
        x_*: (N, inputs), shared by every model, or (n_models, N, inputs), one data set per model;
        y_*: (N,) or (n_models, N). With per-model training labels the sampler sees model m's row.
    steps, lr, batch_size: number of SGD steps, learning rate, examples per step and model.
    momentum, weight_decay: PyTorch's SGD: v = momentum * v + (g + weight_decay * p); p -= lr * v.
    sampler: callable (rng, y_train, batch_size) -> indices (batch_size,), one call per model and
        step; default iid_batches (see also class_batches for non-i.i.d. batches).
    norm_batch_size: normalize over groups of this many examples (it must divide batch_size; a group of one is
        refused up front when the model's norm layers need more than one example, as BatchNorm does):
        each group runs its own forward/backward (its own batch statistics) and the gradients of
        the groups are averaged before the step, as in data-parallel training.
    eval_every: evaluate (and call hooks) every this many steps and after the last (default steps // 20).
    hooks: {name: f(model, step) -> value}, called at each evaluation right after the training
        step, while model.activations / model.gradients / model.grads still hold that step's
        values; the values are collected in History.hooks[name].
    trainable: None (train everything) or {parameter name: True or a 0/1 mask of its shape};
        parameters not named stay frozen.
    lr_schedule: optional callable step -> multiplier of lr (a finite number >= 0), for steps 1..steps; it is
        called for every step before training starts, so that a bad value raises before anything changes.
    seed: seeds the batches (model m uses (seed, m, 1)).
    progress: a tqdm bar (on stderr) when tqdm is installed, none otherwise; None = only on a TTY.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 4):
        raise ValueError(f"data must be (x_train, y_train, x_test, y_test), got "
                         f"{type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}")
    x_train, y_train, x_test, y_test = data
    x_train, x_test = _check_inputs(model, x_train, "x_train"), _check_inputs(model, x_test, "x_test")
    y_train = check_labels(y_train, x_train.shape[-2], model.sizes[-1], "y_train", n_models=model.n_models)
    y_test = check_labels(y_test, x_test.shape[-2], model.sizes[-1], "y_test", n_models=model.n_models)
    n_train = x_train.shape[-2]                                    # training examples per model
    if x_test.shape[-2] == 0:
        raise ValueError(f"x_test holds no examples (shape {x_test.shape}): fit measures held-out accuracy on it")
    def real(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not (_is_int(steps) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (_is_int(batch_size) and 1 <= batch_size <= n_train):
        raise ValueError(f"batch_size must be an integer in [1, {n_train}], got {batch_size!r}")
    if norm_batch_size is not None and not (_is_int(norm_batch_size)
                                            and norm_batch_size >= 1 and batch_size % norm_batch_size == 0):
        raise ValueError(f"norm_batch_size must be a positive divisor of batch_size={batch_size}, "
                         f"got {norm_batch_size!r}")
    if not (real(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not (real(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if eval_every is not None and not (_is_int(eval_every) and eval_every >= 1):
        raise ValueError(f"eval_every must be None or a positive integer, got {eval_every!r}")
    if hooks is not None and not isinstance(hooks, dict):
        raise TypeError(f"hooks must be None or a dict {{name: f(model, step)}}, got {type(hooks).__name__}")
    for what, f in [("sampler", sampler), ("lr_schedule", lr_schedule), *((f"hooks[{k!r}]", v) for k, v in (hooks or {}).items())]:
        if f is not None and not callable(f):
            raise TypeError(f"{what} must be callable, got {type(f).__name__}")
    _check_seed(seed)
    if trainable is not None and not isinstance(trainable, dict):
        raise TypeError(f"trainable must be None or a dict {{parameter name: True or mask}}, got {type(trainable).__name__}")
    multipliers = []                           # lr_schedule's values as it returns them (the same arithmetic as calling it
    if lr_schedule is not None:                # at each step)
        for step in range(1, steps + 1):
            value = lr_schedule(step)
            try:                                   # a number of any kind (a 0-d array, a Fraction), not a string
                ok = not isinstance(value, (str, bytes, bool, np.bool_)) and np.ndim(value) == 0
                number = float(value) if ok else None
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not (ok and np.isfinite(number) and number >= 0):
                raise ValueError(f"lr_schedule must return a finite number >= 0 (a multiplier of lr) for every step "
                                 f"1..{steps}, got {value!r} at step {step}")
            multipliers.append(value)
    group = norm_batch_size or batch_size
    if group == 1 and steps:                   # a norm layer that needs more than one example fails at once, and says so
        def refuses(layer, examples, width):   # on a copy of the layer, in training mode: the ValueError, or None
            try:
                probe = copy.deepcopy(layer)
            except Exception:                  # a layer that cannot be copied is not probed
                return None
            probe.train(True)
            try:
                probe.forward(np.zeros((examples, width), model.dtype))
            except ValueError as error:
                return error
            return None
        for l, layers in enumerate(model.norms):          # hidden layer l: one norm layer per model, all alike
            error = refuses(layers[0], 1, model.sizes[l + 1])
            if error is not None and refuses(layers[0], 2, model.sizes[l + 1]) is None:     # the size of the group, not the layer
                which = "norm_batch_size" if norm_batch_size else "batch_size"
                raise ValueError(f"{which}=1: the model's {type(layers[0]).__name__} layers normalize each group of "
                                 f"examples with its own statistics, which need more than one example ({error})") from error
    sampler = sampler or iid_batches
    hooks = dict(hooks or {})
    eval_every = eval_every or max(1, steps // 20)
    params = model.parameters()
    names = [name for name, _ in params]
    if trainable is not None:
        unknown = sorted(set(trainable) - set(names))
        if unknown:
            raise ValueError(f"trainable names unknown parameters {unknown[:5]}; parameters are {names[:6]}...")
        for name, p in params:
            mask = trainable.get(name, False)
            if not isinstance(mask, bool) and np.shape(mask) != p.shape:
                raise ValueError(f"trainable[{name!r}] must be True, False or a mask of shape {p.shape}, "
                                 f"got shape {np.shape(mask)}")
    masks = {name: (None if trainable is None else trainable.get(name, False)) for name in names}
    velocity = {name: np.zeros_like(p) for name, p in params}
    update = {name: np.empty_like(p) for name, p in params}      # rate * velocity, written in place at every step
    rngs = [np.random.default_rng([seed, m, 1]) for m in range(model.n_models)]
    recorded_steps, accs, losses = [0], [accuracy(model, x_test, y_test)], [np.full(model.n_models, np.nan)]
    hook_values = {name: [] for name in hooks}
    running_loss, since = np.zeros(model.n_models), 0
    models = np.arange(model.n_models)[:, None]                   # (M, 1): row m of per-model data
    def rows(a, part, shared_ndim):                                # a batch (M, B, ...) of shared or per-model data
        return a[part] if a.ndim == shared_ndim else a[models, part]
    def draw():
        idx = [np.asarray(sampler(r, y_train if y_train.ndim == 1 else y_train[m], batch_size))
               for m, r in enumerate(rngs)]
        for got in idx:                        # a wrong sampler would train on other batches, or fail in indexing
            if got.shape != (batch_size,) or got.dtype.kind not in "iu" or not 0 <= got.min() <= got.max() < n_train:
                values = f", values from {got.min()} to {got.max()}" if got.size and got.dtype.kind in "iuf" else ""
                raise ValueError(f"sampler must return {batch_size} integer indices in [0, {n_train}) (batch_size "
                                 f"training examples), got shape {got.shape}, dtype {got.dtype}{values}")
        return np.stack(idx)                                                       # (M, B)
    first = draw() if steps else None          # a sampler that refuses its arguments raises before any change
    step_range = range(1, steps + 1)
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from bnlib.bench import _progress                           # tqdm if installed, else no bar
        step_range = _progress(step_range, True, desc=desc, leave=False)
    model.train()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for step in step_range:
            idx = first if step == 1 else draw()
            total = {}
            for start in range(0, batch_size, group):
                part = idx[:, start:start + group]
                loss, grads = loss_and_grads(model, rows(x_train, part, 2), rows(y_train, part, 1))
                running_loss += loss * (group / batch_size)
                for name, g in grads.items():
                    total[name] = total[name] + g if name in total else g
            rate = lr * (multipliers[step - 1] if lr_schedule else 1.0)
            scale = group / batch_size
            for name, p in params:
                mask = masks[name]
                if mask is False or name not in total:
                    continue
                g = total[name] if scale == 1 else total[name] * scale          # (x * 1 is x, bit for bit)
                if weight_decay:
                    g = g + weight_decay * p
                if mask is not None and mask is not True:
                    g = g * mask
                v = velocity[name]
                v *= momentum
                v += g
                p -= np.multiply(rate, v, out=update[name])     # rounded to p's dtype, as (rate * v).astype would
            since += 1
            if step % eval_every == 0 or step == steps:
                for name, f in hooks.items():
                    hook_values[name].append(f(model, step))
                recorded_steps.append(step)
                accs.append(accuracy(model, x_test, y_test))
                losses.append(running_loss / since)
                running_loss, since = np.zeros(model.n_models), 0
    return History(np.array(recorded_steps), np.array(accs), np.array(losses), hook_values)
