"""bnlib.train: gradients (checked numerically), the normalization slot, batch sources, the loop."""
import copy

import numpy as np
import pytest

from bnlib import gradcheck, train
from bnlib.layers import BatchNorm


def bn64(c):
    return BatchNorm(c, dtype=np.float64)


def toy_data(n_train=120, n_test=60, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (classes, d))
    def make(n):
        y = np.arange(n) % classes
        return (centers[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y.astype(np.int64)
    return (*make(n_train), *make(n_test))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("norm", [None, bn64])
def test_gradients_match_numerical_gradient(activation, norm):
    rng = np.random.default_rng(1)
    model = train.MLP([5, 7, 6, 3], activation, norm=norm, init="glorot", n_models=2, seed=3, dtype=np.float64)
    x = rng.normal(size=(8, 5))
    y = rng.integers(0, 3, 8)
    if norm is not None:                              # non-trivial gamma, beta
        for layer in model.norm_layers():
            layer.weight[...] = rng.uniform(0.5, 1.5, layer.weight.shape)
            layer.bias[...] = rng.normal(0, 0.3, layer.bias.shape)
    _, grads = train.loss_and_grads(model, x, y)
    for name, p in model.parameters():
        def loss_of(value, p=p):
            saved = p.copy()
            p[...] = value
            loss = train.cross_entropy(model.forward(x), y)[0].sum()
            p[...] = saved
            return np.array(loss)
        numeric = gradcheck.numerical_gradient(loss_of, p.copy(), np.array(1.0))
        assert gradcheck.relative_error(grads[name], numeric) < 1e-6, name
    # and the gradient with respect to a hidden layer's activation input z
    model.forward(x)
    model.backward(train.cross_entropy(model.forward(x), y)[1])
    assert model.gradients[0].shape == (2, 8, 7) and model.activations[1].shape == (2, 8, 6)


@pytest.mark.parametrize("norm", [None, bn64])
def test_layer_inputs_are_what_each_linear_map_reads(norm):
    # layer_inputs[l] @ W_l (+ b_l) is layer l's linear output: the input x itself for l = 0, the previous
    # layer's activation after that, and the last one gives the logits
    rng = np.random.default_rng(2)
    model = train.MLP([5, 7, 6, 3], "tanh", norm=norm, n_models=2, seed=1, dtype=np.float64)
    x = rng.normal(size=(8, 5))
    logits = model.forward(x)
    assert [h.shape for h in model.layer_inputs] == [(2, 8, 5), (2, 8, 7), (2, 8, 6)]
    np.testing.assert_array_equal(model.layer_inputs[0], np.broadcast_to(x, (2, 8, 5)))
    for l in (1, 2):
        np.testing.assert_allclose(model.layer_inputs[l], np.tanh(model.activations[l - 1]), rtol=1e-12)
    np.testing.assert_allclose(np.matmul(model.layer_inputs[2], model.weights[2]) + model.biases[2][:, None],
                               logits, rtol=1e-12)


def test_models_side_by_side_are_independent_networks():
    x, y = toy_data()[:2]
    batch = np.stack([x[:10], x[10:20]])
    both = train.MLP([6, 8, 3], "tanh", norm=BatchNorm, n_models=2, seed=5)
    logits = both.forward(batch)
    for m in range(2):
        single = train.MLP([6, 8, 3], "tanh", norm=BatchNorm, n_models=1, seed=5)
        single.weights[0][0], single.weights[1][0] = both.weights[0][m], both.weights[1][m]
        single.biases[1][0] = both.biases[1][m]
        np.testing.assert_allclose(single.forward(batch[m])[0], logits[m], rtol=1e-5, atol=1e-6)
    assert not np.allclose(both.weights[0][0], both.weights[0][1])


def test_inits_have_the_documented_scale():
    rng = np.random.default_rng(0)
    w = train.init_weights(rng, 400, 300, "he")
    assert abs(w.std() - np.sqrt(2 / 400)) < 0.01 * np.sqrt(2 / 400) * 5
    w = train.init_weights(rng, 400, 300, "glorot")
    assert abs(np.abs(w).max() - np.sqrt(6 / 700)) < 1e-3
    w = train.init_weights(rng, 400, 300, 0.05)
    assert abs(w.std() - 0.05) < 0.002
    w = train.init_weights(rng, 400, 300, "uniform")
    assert np.abs(w).max() <= 1 / 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[4]), "sizes"), (dict(activation="gelu"), "activation"), (dict(init="xavier"), "init"),
    (dict(init=-1.0), "init scale"), (dict(n_models=0), "n_models")])
def test_mlp_rejects_bad_arguments(kwargs, match):
    args = dict(sizes=[4, 5, 2])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train.MLP(**args)
    with pytest.raises(TypeError, match="norm"):
        train.MLP([4, 5, 2], norm="batch")


def test_fit_rejects_bad_arguments_without_changing_the_model():
    data = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    before = model.state()
    for kwargs, match in [(dict(steps=-1), "steps"), (dict(batch_size=0), "batch_size"),
                          (dict(steps=True), "steps"), (dict(batch_size=True), "batch_size"),
                          (dict(norm_batch_size=7), "norm_batch_size"), (dict(lr=float("nan")), "lr"),
                          (dict(trainable={"W9": True}), "unknown")]:
        args = dict(steps=5, lr=0.1, batch_size=20)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            train.fit(model, data, progress=False, **args)
    after = model.state()
    for name in before[0]:
        np.testing.assert_array_equal(before[0][name], after[0][name])
    assert after[1][0]["num_batches_tracked"] == 0


def test_fit_learns_is_seeded_and_records_history():
    data = toy_data()
    runs = []
    for _ in range(2):
        model = train.MLP([6, 16, 3], "relu", norm=BatchNorm, n_models=3, seed=0)
        calls = []
        h = train.fit(model, data, steps=60, lr=0.1, batch_size=20, eval_every=20, progress=False,
                      hooks={"z": lambda m, s: (calls.append(s), m.activations[0].shape)[1]})
        runs.append(h)
    a, b = runs
    np.testing.assert_array_equal(a.test_acc, b.test_acc)
    assert list(a.steps) == [0, 20, 40, 60] and a.test_acc.shape == (4, 3)
    assert a.hooks["z"] == [(3, 20, 16)] * 3
    assert (a.final_acc > 0.9).all() and (a.test_acc[0] < 0.7).all()
    assert np.isnan(a.train_loss[0]).all() and (a.train_loss[-1] < a.train_loss[1]).all()


def test_custom_norm_layer_fills_the_slot():
    """Any layer with BatchNorm's interface plugs in; here a per-example scale (no batch statistics)."""
    class Scale:
        def __init__(self, c):
            self.weight, self.bias = np.ones(c, np.float32), np.zeros(c, np.float32)
            self.grad_weight, self.grad_bias = np.zeros_like(self.weight), np.zeros_like(self.bias)
            self.calls = 0
        def forward(self, x):
            self.x, self.calls = x, self.calls + 1
            return x * self.weight + self.bias
        def backward(self, dy):
            self.grad_weight[...], self.grad_bias[...] = (dy * self.x).sum(0), dy.sum(0)
            return dy * self.weight
        def train(self, mode=True): return self
        def eval(self): return self
        def state_dict(self): return {"weight": self.weight.copy(), "bias": self.bias.copy()}
        def load_state_dict(self, s): self.weight[...], self.bias[...] = s["weight"], s["bias"]
    model = train.MLP([6, 8, 3], norm=Scale, n_models=2)
    h = train.fit(model, toy_data(), steps=30, lr=0.1, batch_size=20, progress=False)
    assert model.norm_layers()[0].calls > 30 and (h.final_acc > 0.8).all()
    assert not np.allclose(model.norm_layers()[0].weight, 1)          # gamma was trained


def test_class_batches_draw_from_two_classes_only():
    y = np.repeat(np.arange(10), 30)
    rng = np.random.default_rng(0)
    sample = train.class_batches(2)
    for _ in range(20):
        idx = sample(rng, y, 16)
        assert idx.shape == (16,) and len(np.unique(y[idx])) <= 2
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    train.fit(model, toy_data(), steps=5, lr=0.1, batch_size=4, sampler=sample, progress=False)


def test_norm_batch_size_normalizes_groups_and_averages_gradients():
    """Without normalization, grouping changes nothing; with BN, groups use their own statistics."""
    data = toy_data()
    results = {}
    for norm in (None, BatchNorm):
        for group in (None, 5):
            model = train.MLP([6, 8, 3], "tanh", norm=norm, seed=2)
            train.fit(model, data, steps=3, lr=0.1, batch_size=20, norm_batch_size=group, momentum=0, progress=False)
            results[norm, group] = model.weights[0].copy()
    np.testing.assert_allclose(results[None, None], results[None, 5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(results[BatchNorm, None], results[BatchNorm, 5], atol=1e-6)


def test_trainable_freezes_everything_else():
    model = train.MLP([6, 8, 3], norm=BatchNorm, n_models=2)
    before = model.state()[0]
    mask = np.zeros_like(model.weights[1])
    mask[:, :2, :] = 1
    train.fit(model, toy_data(), steps=5, lr=0.1, batch_size=20, progress=False,
              trainable={"norm0.0.weight": True, "norm0.1.weight": True, "W1": mask})
    after = model.state()[0]
    for name in before:
        changed = ~np.isclose(before[name], after[name])
        if name.endswith(".weight"):
            assert changed.any(), name
        elif name == "W1":
            assert changed[:, :2].any() and not changed[:, 2:].any()
        else:
            assert not changed.any(), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("settings", [
    dict(momentum=0.9),
    dict(momentum=0.5, weight_decay=1e-2, norm_batch_size=5),
    dict(momentum=0.0, lr_schedule=lambda step: np.float64(1.0) / step),       # a NumPy float64 rate
    dict(momentum=0.9, weight_decay=1e-3, mask=True),
])
def test_fit_takes_the_sgd_steps_its_docstring_gives(dtype, settings):
    """fit against its update rule written out (v = momentum * v + (g + weight_decay * p); p -= lr * v, the
    gradients of a batch split into normalization groups averaged), on the batches fit drew: the same
    parameters, bit for bit, after every step."""
    settings = dict(settings)
    use_mask, group = settings.pop("mask", False), settings.get("norm_batch_size")
    data = toy_data()
    def fresh():
        return train.MLP([6, 8, 7, 3], norm=lambda c: BatchNorm(c, dtype=dtype), n_models=2, seed=4, dtype=dtype)
    model, reference = fresh(), fresh()
    trainable = None
    if use_mask:
        mask = (np.random.default_rng(0).random(model.weights[1].shape) < 0.5).astype(np.float64)   # float64 mask
        trainable = {name: True for name, _ in model.parameters() if name != "W0"} | {"W1": mask}
    drawn = []
    def sampler(rng, y, batch_size):
        drawn.append(train.iid_batches(rng, y, batch_size))
        return drawn[-1]
    steps, lr, batch = 4, 0.1, 20
    snapshot = {"params": lambda m, step: {name: p.copy() for name, p in m.parameters()}}     # after each step
    history = train.fit(model, data, steps=steps, lr=lr, batch_size=batch, sampler=sampler, trainable=trainable,
                        eval_every=1, hooks=snapshot, progress=False, **settings)
    momentum, decay = settings["momentum"], settings.get("weight_decay", 0.0)
    schedule = settings.get("lr_schedule", lambda step: 1.0)
    params = dict(reference.parameters())
    velocity = {name: np.zeros_like(p) for name, p in params.items()}
    x, y = data[0], data[1]
    for step in range(1, steps + 1):
        idx = np.stack(drawn[(step - 1) * 2:step * 2])                               # (models, batch)
        parts = [idx] if group is None else [idx[:, s:s + group] for s in range(0, batch, group)]
        total = {}
        for part in parts:
            _, grads = train.loss_and_grads(reference, x[part], y[part])
            for name, g in grads.items():
                total[name] = total[name] + g if name in total else g
        for name, p in params.items():
            keep = True if trainable is None else trainable.get(name, False)
            if keep is False:
                continue
            g = total[name] * (len(parts[0][0]) / batch) if group is not None else total[name]
            g = g + decay * p if decay else g
            g = g * keep if keep is not True else g
            velocity[name] = (momentum * velocity[name] + g).astype(p.dtype)     # the buffer keeps p's dtype
            p[...] = p - (lr * schedule(step) * velocity[name]).astype(p.dtype)
        for name, p in history.hooks["params"][step - 1].items():
            np.testing.assert_array_equal(p, params[name], err_msg=f"{name} after step {step}")
    if use_mask:
        assert np.array_equal(model.weights[0], fresh().weights[0])                  # W0 was left out: frozen


@pytest.mark.parametrize("norm", ["batchnorm", "batchnorm64", "groupnorm", None])
@pytest.mark.parametrize("per_model_data", [False, True])
@pytest.mark.parametrize("limit", [None, 200])
def test_accuracy_over_several_orders_is_each_orders_own(norm, per_model_data, limit, monkeypatch):
    """seed=[...] with batch_stats=True: each row is accuracy(..., seed=s) alone, bit for bit, whether the orders
    share a pass (copies side by side) or not (a low cpu.PARALLEL_MIN_SIZE makes passes of 1 and 2 orders), with
    and without fill_last, for shared and per-model data; the model's state is left as it was."""
    from bnlib import cpu, variants
    factories = {"batchnorm": BatchNorm, "batchnorm64": bn64, "groupnorm": lambda c: variants.GroupNorm(2, c), None: None}
    data = toy_data(n_train=120, n_test=61)
    model = train.MLP([6, 8, 6, 3], norm=factories[norm], n_models=3, seed=2,
                      dtype=np.float64 if norm == "batchnorm64" else np.float32)
    train.fit(model, data, steps=5, lr=0.1, batch_size=20, progress=False)
    x, y = data[2], data[3]
    if per_model_data:
        x, y = np.stack([x, x[::-1], 2 * x]), np.stack([y, y[::-1], y])
    if limit is not None:
        monkeypatch.setattr(cpu, "PARALLEL_MIN_SIZE", limit)
    before = model.state()
    for batch, seeds in [(4, range(7)), (2, [3, 0, 3]), (61, [5, 1]), (200, (0, 2)), (5, np.arange(3))]:
        for fill_last in (False, True):
            want = np.stack([train.accuracy(model, x, y, batch, batch_stats=True, fill_last=fill_last, seed=s)
                             for s in seeds])
            got = train.accuracy(model, x, y, batch, batch_stats=True, fill_last=fill_last, seed=seeds)
            assert got.shape == (len(seeds), 3) and np.array_equal(got, want), (batch, list(seeds), fill_last)
    assert _unchanged(before, model.state())


def test_copies_side_by_side_compute_each_networks_own_logits():
    """_repeated(model, k): every copy's logits in training mode are its network's own, bit for bit, on batches of
    more than 64 rows too, on each CPU backend, for BatchNorm and for BatchRenorm with relaxed limits (whose training
    output depends on its running statistics)."""
    from bnlib import cpu, variants
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 6)).astype(np.float32)
    for backend in ("numba", "numpy"):
        previous = cpu.set_backend(backend)
        try:
            for factory in (BatchNorm, lambda c: variants.BatchRenorm(c, r_max=3.0, d_max=5.0)):
                model = train.MLP([6, 8, 6, 3], norm=factory, n_models=2, seed=5)
                train.fit(model, toy_data(), steps=5, lr=0.1, batch_size=20, progress=False)
                got = train._repeated(model, 3).train().forward(x)
                want = copy.deepcopy(model).train().forward(x)
                for j in range(3):
                    assert np.array_equal(got[2 * j:2 * j + 2], want), (backend, j)
        finally:
            cpu.set_backend(previous)


def test_accuracy_over_several_orders_with_shared_layers_hooks_and_odd_seeds():
    """Rows equal to the one-order calls when two networks share a layer (shared within each copy too), and when a layer
    has a forward of its own on the instance (then every order runs on the model itself, whose state is restored);
    a NumPy integer seed, n_models=1 and a model in evaluation mode (left in it)."""
    from bnlib import variants
    data = toy_data(n_train=120, n_test=61)
    x, y = data[2], data[3]
    def rows(model, seeds, batch=4):
        want = np.stack([train.accuracy(model, x, y, batch, batch_stats=True, fill_last=True, seed=s) for s in seeds])
        got = train.accuracy(model, x, y, batch, batch_stats=True, fill_last=True, seed=seeds)
        return got, want
    shared = train.MLP([6, 8, 6, 3], norm=lambda c: variants.BatchRenorm(c, r_max=3.0, d_max=5.0), n_models=2, seed=1)
    train.fit(shared, data, steps=5, lr=0.1, batch_size=20, progress=False)
    shared.norms[0][1] = shared.norms[0][0]
    got, want = rows(shared, range(4))
    assert np.array_equal(got, want)
    hooked = train.MLP([6, 8, 6, 3], norm=BatchNorm, n_models=2, seed=1)
    train.fit(hooked, data, steps=5, lr=0.1, batch_size=20, progress=False)
    calls = []
    for layer in hooked.norm_layers():
        layer.forward = lambda z, f=layer.forward: calls.append(1) or f(z)
    before = hooked.state()
    got, want = rows(hooked, [0, 1, 2])
    assert np.array_equal(got, want) and calls
    assert _unchanged(before, hooked.state())
    single = train.MLP([6, 8, 3], norm=BatchNorm, n_models=1, seed=2).eval()
    got, want = rows(single, [np.int64(4), 0])
    assert got.shape == (2, 1) and np.array_equal(got, want)
    assert not any(layer.training for layer in single.norm_layers())
    assert np.array_equal(train.accuracy(single, x, y, 4, batch_stats=True, fill_last=True, seed=np.int64(4)), want[0])


def test_accuracy_refuses_a_sequence_of_seeds_it_cannot_use():
    model, (x_train, y_train, x_test, y_test) = train.MLP([6, 8, 3], norm=BatchNorm), toy_data()
    for kwargs, message in [(dict(batch_stats=False, seed=[0, 1]), "needs batch_stats=True"),
                            (dict(batch_stats=True, batch_size=4, seed=[]), "at least one seed"),
                            (dict(batch_stats=True, batch_size=4, seed=[0, -1]), r"seed\[1\] must be an integer >= 0"),
                            (dict(batch_stats=True, batch_size=4, seed=np.array(3)), "seed must be an integer >= 0")]:
        with pytest.raises(ValueError, match=message):
            train.accuracy(model, x_test, y_test, **kwargs)


def test_batch_stats_accuracy_restores_state_and_precise_bn_gives_population_stats():
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    train.fit(model, data, steps=20, lr=0.1, batch_size=20, progress=False)
    before = model.norm_layers()[0].state_dict()
    acc = train.accuracy(model, x_test, y_test, batch_size=10, batch_stats=True)
    assert acc.shape == (1,)
    after = model.norm_layers()[0].state_dict()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    train.precise_bn(model, x_train, batch_size=30, num_batches=400)
    layer = model.norm_layers()[0]
    z = x_train @ model.weights[0][0]                 # the BN input over the whole training split
    np.testing.assert_allclose(layer.running_mean, z.mean(0), rtol=0.05, atol=0.02)
    np.testing.assert_allclose(layer.running_var, z.var(0), rtol=0.1)
    assert layer.momentum == 0.1


def test_batch_stats_accuracy_fills_the_last_partial_batch():
    """fill_last=True: every example counted once, the last partial batch normalized with the statistics of a full
    batch (its own examples plus the first of the order); the default leaves a last single example out."""
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm, n_models=2)
    train.fit(model, data, steps=20, lr=0.1, batch_size=20, progress=False)
    x, y = x_test[:23], y_test[:23]                     # 23 = 2 batches of 10 + a last batch of 3
    order = np.random.default_rng(4).permutation(23)
    xo, yo = x[order], y[order]
    model.train()
    expected = np.zeros(2)
    for start, extra in ((0, 0), (10, 0), (20, 7)):      # the last batch: 3 examples + the first 7 for its statistics
        xb = np.concatenate([xo[start:start + 10], xo[:extra]]) if extra else xo[start:start + 10]
        state = [layer.state_dict() for layer in model.norm_layers()]
        logits = model.forward(xb)[:, :10 - extra if extra else 10]
        for layer, s in zip(model.norm_layers(), state):
            layer.load_state_dict(s)
        expected += (logits.argmax(-1) == yo[start:start + 10]).sum(1)
    model.eval()
    sizes, forward = [], model.forward
    model.forward = lambda xb: sizes.append(xb.shape[-2]) or forward(xb)     # every batch the accuracy runs
    got = train.accuracy(model, x, y, batch_size=10, batch_stats=True, seed=4, fill_last=True)
    np.testing.assert_allclose(got, expected / 23)
    assert sizes == [10, 10, 10]                         # the last batch was filled up to 10
    assert all(not layer.training for layer in model.norm_layers())
    # without filling, 21 examples: the last one alone is left out (20 counted)
    x21, y21 = x_test[:21], y_test[:21]
    sizes.clear()
    plain = train.accuracy(model, x21, y21, batch_size=10, batch_stats=True)
    assert np.all(plain * 20 == np.round(plain * 20)) and sizes == [10, 10]
    sizes.clear()                                        # fewer examples than a batch: one batch of all of them
    train.accuracy(model, x21, y21, batch_size=30, batch_stats=True, fill_last=True)
    assert sizes == [21]
    del model.forward
    with pytest.raises(ValueError, match="pass batch_stats=True too"):
        train.accuracy(model, x21, y21, fill_last=True)


def test_chapter_full_code_path_runs_on_a_tiny_mnist_fixture(tmp_path, monkeypatch):
    """Chapter 07 with FULL = True (MNIST, long schedules), shrunk by BNLIB_SMOKE, on tiny IDX files."""
    import json
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnlib import data
    from test_data import write_mnist_fixture

    root = Path(__file__).resolve().parent.parent
    table, _ = write_mnist_fixture(tmp_path / "mnist", n_train=300, n_test=60)
    monkeypatch.setattr(data, "MNIST_FILES", table)
    monkeypatch.setattr(data, "MNIST_MIRRORS", ())              # no network: the cache must be enough
    monkeypatch.setenv("BNLIB_DATA", str(tmp_path))              # default root -> tmp_path / "mnist"
    monkeypatch.setenv("BNLIB_SMOKE", "1")
    monkeypatch.chdir(root)
    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    nb = json.loads((root / "chapters" / "07_experiments.ipynb").read_text(encoding="utf-8"))
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert sum("FULL = False" in c for c in cells) == 1
    namespace = {"__name__": "chapter07"}
    try:
        for source in cells:
            if source.lstrip().startswith("#| export") or source.lstrip().startswith("#| default_exp"):
                continue                                        # the library is imported, not redefined
            exec(compile(source.replace("FULL = False", "FULL = True"), "chapter07", "exec"), namespace)
    finally:
        if "blas_threads" in namespace:                         # the chapter pins BLAS to one thread
            namespace["blas_threads"].restore_original_limits()
    assert namespace["FULL"] and namespace["SMOKE"] and namespace["D"] == 784
    assert namespace["x_train"].shape == (300, 784)


def test_accuracy_and_trainable_reject_bad_arguments():
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        train.accuracy(model, x_test, y_test, batch_size=1, batch_stats=True)
    with pytest.raises(ValueError, match="at least 2 examples"):
        train.accuracy(model, x_test[:1], y_test[:1], batch_size=4, batch_stats=True)
    with pytest.raises(ValueError, match="mask of shape"):
        train.fit(model, data, steps=2, lr=0.1, progress=False, trainable={"W0": np.ones((2, 2))})
    assert model.norm_layers()[0].num_batches_tracked == 0


def test_lr_schedule_and_progress_bar(capsys):
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    before = model.weights[0].copy()
    train.fit(model, toy_data(), steps=3, lr=0.1, lr_schedule=lambda step: 0.0, progress=True)
    np.testing.assert_array_equal(model.weights[0], before)          # a zero multiplier: no step taken
    assert "training" in capsys.readouterr().err                     # the tqdm bar, on stderr


def _unchanged(before, after):
    return (all(np.array_equal(before[0][k], after[0][k]) for k in before[0])
            and all(all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
                    for a, b in zip(before[1], after[1])))


@pytest.mark.parametrize("change, error, match", [
    (dict(data=lambda d: d[:3]), ValueError, "data must be"),
    (dict(data=lambda d: (d[0], d[1] + 3, d[2], d[3])), ValueError, r"y_train must hold labels in \[0, 3\)"),
    (dict(data=lambda d: (d[0], d[1], d[2], d[3] - 1)), ValueError, "y_test must hold labels"),
    (dict(data=lambda d: (d[0], d[1][:50], d[2], d[3])), ValueError, r"y_train must have shape \(120,\)"),
    (dict(data=lambda d: (d[0], d[1].astype(float), d[2], d[3])), TypeError, "y_train must hold integer"),
    (dict(data=lambda d: (d[0][:, :5], d[1], d[2], d[3])), ValueError, r"x_train must have shape \(N, 6\)"),
    (dict(momentum=-0.5), ValueError, "momentum"), (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(lr="0.1"), ValueError, "lr"), (dict(eval_every=-3), ValueError, "eval_every"),
    (dict(hooks={"h": 3}), TypeError, "hooks"), (dict(sampler="iid"), TypeError, "sampler"),
    (dict(trainable=["W0"]), TypeError, "trainable"), (dict(seed=-1), ValueError, "seed must be an integer"),
    (dict(sampler=lambda rng, y, b: rng.choice(y.size, 3, replace=False)), ValueError, r"sampler must return 20 .*\(3,\)"),
    (dict(sampler=lambda rng, y, b: np.arange(b) + 110), ValueError, r"sampler .* values from 110 to 129"),
    (dict(sampler=lambda rng, y, b: np.zeros(b)), ValueError, "sampler .* dtype float64"),
    (dict(hooks=[len]), TypeError, "hooks must be None or a dict"),
    (dict(lr_schedule=lambda step: float("nan")), ValueError, "lr_schedule must return .* got nan at step 1"),
    (dict(lr_schedule=lambda step: 1.0 if step < 3 else -1.0), ValueError, "lr_schedule .* got -1.0 at step 3"),
    (dict(lr_schedule=lambda step: "x"), ValueError, "lr_schedule .* got 'x' at step 1"),
    (dict(batch_size=1), ValueError, "batch_size=1: the model's BatchNorm layers .* more than one example"),
    (dict(norm_batch_size=1), ValueError, "norm_batch_size=1: the model's BatchNorm layers")])
def test_fit_rejects_bad_data_and_options_before_touching_the_model(change, error, match):
    data = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    before = model.state()
    args = dict(steps=3, lr=0.1, batch_size=20, progress=False)
    args.update({k: v for k, v in change.items() if k != "data"})
    model.eval()                                   # and fit, refusing, leaves the layers in the mode it found
    with pytest.raises(error, match=match):
        train.fit(model, change["data"](data) if "data" in change else data, **args)
    assert _unchanged(before, model.state()) and not any(layer.training for layer in model.norm_layers())


def test_fit_takes_any_kind_of_number_from_lr_schedule_and_blames_batch_size_only_when_it_is_the_cause():
    import fractions
    for schedule in (lambda step: np.where(step < 2, 1.0, 0.1), lambda step: fractions.Fraction(1, 2),
                     lambda step: np.float32(0.5), lambda step: 1):
        train.fit(train.MLP([6, 8, 3], norm=BatchNorm), toy_data(), steps=2, lr=0.1, batch_size=20,
                  lr_schedule=schedule, progress=False)
    # eps = 0 with batch statistics is refused at every batch size: the error is the layer's, not batch_size's
    with pytest.raises(ValueError, match="eps must be > 0") as info:
        train.fit(train.MLP([6, 8, 3], norm=lambda c: BatchNorm(c, eps=0.0)), toy_data(), steps=2, lr=0.1,
                  batch_size=1, progress=False)
    assert "batch_size" not in str(info.value)


def test_fit_trains_a_group_norm_network_on_batches_of_one():
    """The batch-of-one refusal is for layers that need it: GroupNorm normalizes within each example."""
    from bnlib.variants import GroupNorm
    model = train.MLP([6, 8, 3], norm=lambda c: GroupNorm(2, c))
    train.fit(model, toy_data(), steps=2, lr=0.1, batch_size=1, progress=False)


def test_precise_bn_and_accuracy_check_inputs_before_changing_statistics():
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    train.fit(model, data, steps=5, lr=0.1, batch_size=20, progress=False)
    before = model.state()
    for kwargs, match in [(dict(batch_size=500), r"batch_size must be an integer in \[2, 120\]"),
                          (dict(batch_size=1), "batch_size"), (dict(batch_size=10, num_batches=0), "num_batches")]:
        with pytest.raises(ValueError, match=match):
            train.precise_bn(model, x_train, **kwargs)
    with pytest.raises(ValueError, match="x_train must have shape"):
        train.precise_bn(model, x_train[:, :4], batch_size=10)
    with pytest.raises(ValueError, match=r"y must have shape \(60,\)"):
        train.accuracy(model, x_test, y_test[:10])
    with pytest.raises(ValueError, match="labels in"):
        train.loss_and_grads(model, x_train[:10], y_train[:10] + 7)
    assert _unchanged(before, model.state())


def test_accuracy_leaves_the_model_in_the_mode_it_found():
    x_train, y_train, x_test, y_test = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    model.eval()
    train.accuracy(model, x_test, y_test)
    train.accuracy(model, x_test, y_test, batch_size=10, batch_stats=True)
    assert not model.norm_layers()[0].training
    model.train()
    train.accuracy(model, x_test, y_test)
    assert model.norm_layers()[0].training


def test_labels_per_model_count_each_example_once():
    """y of shape (n_models, N): one row of labels per model, accepted by every entry point alike."""
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 3], norm=BatchNorm, n_models=2)
    train.fit(model, data, steps=10, lr=0.1, batch_size=20, progress=False)
    shared = train.accuracy(model, x_test, y_test)
    np.testing.assert_array_equal(train.accuracy(model, x_test, np.stack([y_test, y_test])), shared)
    other = (y_test + 1) % 3                                         # model 1 graded against other labels
    per_model = train.accuracy(model, x_test, np.stack([y_test, other]))
    assert per_model[0] == shared[0] and per_model[1] == train.accuracy(model, x_test, other)[1]
    for kwargs in (dict(), dict(batch_size=10, batch_stats=True)):
        np.testing.assert_array_equal(train.accuracy(model, x_test, np.stack([y_test, y_test]), **kwargs),
                                      train.accuracy(model, x_test, y_test, **kwargs))
    runs = [train.fit(train.MLP([6, 8, 3], norm=BatchNorm, n_models=2), (x_train, yt, x_test, ys),
                      steps=6, lr=0.1, batch_size=20, eval_every=3, progress=False)
            for yt, ys in [(y_train, y_test), (np.stack([y_train] * 2), np.stack([y_test] * 2))]]
    np.testing.assert_array_equal(runs[0].test_acc, runs[1].test_acc)
    with pytest.raises(ValueError, match=r"y must have shape \(60,\).* or \(2, 60\)"):
        train.accuracy(model, x_test, np.stack([y_test] * 3))
    with pytest.raises(ValueError, match=r"y_test must have shape"):
        train.fit(model, (x_train, y_train, x_test, np.stack([y_test] * 3)), steps=1, lr=0.1, progress=False)


def test_fit_and_accuracy_take_per_model_inputs():
    """x of shape (n_models, N, inputs), as MLP and the checks document: model m trains on row m."""
    x_train, y_train, x_test, y_test = toy_data()
    results = []
    for xt, yt, xs in [(x_train, y_train, x_test), (np.stack([x_train] * 2), np.stack([y_train] * 2),
                                                    np.stack([x_test] * 2))]:
        model = train.MLP([6, 8, 3], norm=BatchNorm, n_models=2)
        h = train.fit(model, (xt, yt, xs, y_test), steps=6, lr=0.1, batch_size=20, eval_every=3, progress=False)
        results.append((h.test_acc, model.weights[0].copy()))
        train.accuracy(model, xs, y_test, batch_size=10, batch_stats=True)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    # different data per model: model 1 sees its inputs negated, with its own labels; the sampler sees row m
    seen = []
    def sampler(rng, y, batch_size):
        seen.append(y.shape)
        return train.iid_batches(rng, y, batch_size)
    model = train.MLP([6, 8, 3], norm=BatchNorm, n_models=2)
    train.fit(model, (np.stack([x_train, -x_train]), np.stack([y_train, (y_train + 1) % 3]), x_test, y_test),
              steps=2, lr=0.1, batch_size=20, sampler=sampler, progress=False)
    assert seen == [(120,)] * 4


def test_precise_bn_leaves_frozen_statistics_alone_and_restores_modes():
    from bnlib.variants import FrozenBatchNorm
    def frozen(c):
        layer = FrozenBatchNorm(c)
        layer.running_mean[...], layer.running_var[...] = 3.0, 4.0
        return layer
    x_train = toy_data()[0]
    model = train.MLP([6, 8, 5, 3], norm=frozen).eval()
    train.precise_bn(model, x_train, batch_size=10, num_batches=3)
    for layer in model.norm_layers():
        np.testing.assert_array_equal(layer.running_mean, 3.0)        # pretrained statistics kept
        np.testing.assert_array_equal(layer.running_var, 4.0)
        assert not layer.training                                     # and the mode it was in
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    for mode in (False, True):
        model.train(mode)
        train.precise_bn(model, x_train, batch_size=10, num_batches=3)
        layer = model.norm_layers()[0]
        assert layer.training == mode and layer.momentum == 0.1 and layer.num_batches_tracked == 3


def test_fit_records_a_diverged_network_and_non_finite_logits_count_as_wrong():
    """Evaluation of a diverged network computes NaN (as torch does); fit keeps going and records it."""
    class NaNInEval(BatchNorm):                     # evaluation with non-finite running statistics
        def forward(self, x):
            y = super().forward(x)
            return y if self.training else np.full_like(y, np.nan)
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 3], norm=NaNInEval, n_models=2)
    h = train.fit(model, data, steps=4, lr=0.1, batch_size=20, eval_every=2, progress=False)
    assert h.test_acc.shape == (3, 2) and (h.test_acc == 0).all()    # not argmax's class 0 (a third of y)
    assert np.isfinite(h.train_loss[1:]).all()
    plain = train.MLP([6, 8, 3])
    plain.weights[1][...] = np.nan
    assert (train.accuracy(plain, x_test, np.zeros_like(y_test)) == 0).all()


def test_fit_records_a_batch_norm_network_whose_running_statistics_diverged():
    """A learning rate far too large drives BatchNorm's running statistics to NaN or inf: evaluation
    computes with them (as torch does) and fit returns its History instead of raising."""
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    with np.errstate(all="ignore"):
        h = train.fit(model, toy_data(), steps=30, lr=1e6, batch_size=20, eval_every=10, progress=False)
    layers = model.norm_layers()
    assert not all(np.isfinite(l.running_var).all() and np.isfinite(l.running_mean).all() for l in layers)
    assert h.test_acc.shape == (4, 1) and np.isfinite(h.test_acc).all()


def test_progress_bar_falls_back_without_tqdm(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setitem(sys.modules, "tqdm", None)                   # as after `pip install .` (numpy only)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(sys, "stderr", Terminal())
    h = train.fit(train.MLP([6, 8, 3], norm=BatchNorm), toy_data(), steps=2, lr=0.1, batch_size=20)
    assert list(h.steps) == [0, 1, 2]


def test_class_batches_name_the_counts_they_cannot_meet():
    y = np.repeat(np.arange(3), [10, 12, 16])
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"num_classes=5\).*only 3 classes"):
        train.class_batches(5)(rng, y, 8)
    with pytest.raises(ValueError, match=r"batch_size=30 is more than the 22 examples of the 2 smallest classes"):
        train.class_batches(2)(rng, y, 30)
    assert train.class_batches(2)(rng, y, 22).shape == (22,)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        train.class_batches(0)
    model = train.MLP([6, 8, 3], norm=BatchNorm).eval()
    with pytest.raises(ValueError, match="batch_size=50"):
        train.fit(model, toy_data(), steps=1, lr=0.1, batch_size=50, sampler=train.class_batches(1), progress=False)
    assert not any(layer.training for layer in model.norm_layers())     # the refused call left the mode alone


def test_mlp_names_norm_when_it_is_given_a_layer_or_a_wrong_factory():
    with pytest.raises(TypeError, match="norm must be .*got BatchNorm instance"):
        train.MLP([4, 5, 2], norm=BatchNorm(5))                # a layer, not a factory: a common torch habit
    with pytest.raises(TypeError, match=r"norm\(5\) must return a layer .*has no forward\(\)"):
        train.MLP([4, 5, 2], norm=lambda c: object())
    assert len(train.MLP([4, 5, 2], norm=lambda c: BatchNorm(c, momentum=0.01)).norm_layers()) == 1


def test_accuracy_rejects_zero_chunks_and_empty_test_sets():
    x_train, y_train, x_test, y_test = toy_data()
    model = train.MLP([6, 8, 3])
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        train.accuracy(model, x_test, y_test, chunk=0)
    with pytest.raises(ValueError, match="no examples"):
        train.accuracy(model, x_test[:0], y_test[:0])
    with pytest.raises(ValueError, match="x_test holds no examples"):
        train.fit(model, (x_train, y_train, x_test[:0], y_test[:0]), steps=1, lr=0.1, progress=False)


def _replayed_norm_inputs(model, x_train, batch_size, num_batches, seed):
    """The inputs each normalization layer received in precise_bn's pass, batch by batch: the same batches (the same
    generator), forwarded in training mode on a copy (weights frozen; running statistics do not enter training mode)."""
    net = copy.deepcopy(model).train()
    rng = np.random.default_rng(seed)
    per_layer = [[] for _ in range(net.depth)]                   # layer l -> list of (n_models, batch, width)
    for _ in range(num_batches):
        net.forward(x_train[rng.choice(x_train.shape[0], size=batch_size, replace=False)])
        for l in range(net.depth):
            z = np.matmul(net.layer_inputs[l], net.weights[l])
            per_layer[l].append(z if net.biases[l] is None else z + net.biases[l][:, None, :])
    return [np.stack(batches) for batches in per_layer]          # (batches, n_models, batch, width)


@pytest.mark.parametrize("variance", ["pooled", "batch"])
def test_precise_bn_estimators_are_what_their_docstring_says(variance):
    """pooled: mean and variance (over the count) of every value a layer received; batch: the average of the batch
    means and of the unbiased batch variances (torch's update_bn). Two normalization layers, two stacked models."""
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 5, 3], norm=BatchNorm, n_models=2, seed=3)
    train.fit(model, data, steps=10, lr=0.1, batch_size=20, progress=False)
    inputs = _replayed_norm_inputs(model, x_train, batch_size=4, num_batches=50, seed=7)
    train.precise_bn(model, x_train, batch_size=4, num_batches=50, seed=7, variance=variance)
    for l, z in enumerate(inputs):
        for m in range(2):
            layer, zm = model.norms[l][m], z[:, m].astype(np.float64)          # (batches, batch, width)
            if variance == "pooled":
                flat = zm.reshape(-1, zm.shape[-1])
                mean, var = flat.mean(0), flat.var(0)
            else:
                mean, var = zm.mean(1).mean(0), zm.var(1, ddof=1).mean(0)
            np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(layer.running_var, var, rtol=1e-4, atol=1e-6)
            assert layer.num_batches_tracked == 50 and layer.momentum == 0.1 and "forward" not in vars(layer)


def test_precise_bn_pooled_and_batch_differ_as_expected_on_small_batches():
    """The same means; at 4 examples per batch the second layer's batch means hardly vary (its inputs come out of a
    batch-normalized layer), so the pooled variance is near the biased within-batch one, (4 - 1) / 4 of the average."""
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 16, 16, 3], norm=BatchNorm, seed=1)
    train.fit(model, data, steps=20, lr=0.1, batch_size=20, progress=False)
    pooled = train.precise_bn(copy.deepcopy(model), x_train, batch_size=4, num_batches=300, variance="pooled")
    batch = train.precise_bn(copy.deepcopy(model), x_train, batch_size=4, num_batches=300, variance="batch")
    for lp, lb in zip(pooled.norm_layers(), batch.norm_layers()):
        np.testing.assert_allclose(lp.running_mean, lb.running_mean, rtol=1e-4, atol=1e-5)
    ratio = np.median(pooled.norm_layers()[1].running_var / batch.norm_layers()[1].running_var)
    assert 0.7 < ratio < 0.85, ratio


def test_precise_bn_pooled_restores_everything_when_a_forward_raises():
    class Failing(BatchNorm):
        calls = None                                  # counting (and failing at the third call) once set to 0
        def forward(self, x):
            if Failing.calls is not None:
                Failing.calls += 1
                if Failing.calls == 3:
                    raise RuntimeError("boom")
            return super().forward(x)
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 3], norm=Failing)
    train.fit(model, data, steps=2, lr=0.1, batch_size=20, progress=False)
    model.eval()
    before = model.state()
    Failing.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        train.precise_bn(model, x_train, batch_size=10, num_batches=5)
    assert _unchanged(before, model.state())
    layer = model.norm_layers()[0]
    assert "forward" not in vars(layer) and not layer.training and layer.momentum == 0.1
    with pytest.raises(ValueError, match='variance must be "pooled"'):
        train.precise_bn(model, x_train, batch_size=10, variance="population")
    assert _unchanged(before, model.state())


def test_precise_bn_pooled_keeps_an_instance_forward_refuses_a_shared_layer_and_handles_a_far_mean():
    x_train, y_train, x_test, y_test = data = toy_data()
    model = train.MLP([6, 8, 5, 3], norm=BatchNorm, seed=2)
    train.fit(model, data, steps=5, lr=0.1, batch_size=20, progress=False)
    first, second = model.norm_layers()
    calls = []
    def own(x, forward=first.forward):                  # a per-instance forward the user had set
        calls.append(x.shape)
        return forward(x)
    first.forward = own
    train.precise_bn(model, x_train, batch_size=10, num_batches=4)
    assert vars(first)["forward"] is own and len(calls) == 4 and "forward" not in vars(second)
    shared = train.MLP([6, 8, 3], norm=BatchNorm, seed=2)
    shared.norms[0].append(shared.norms[0][0])          # one layer object listed twice
    before = shared.state()
    with pytest.raises(ValueError, match="more than once"):
        train.precise_bn(shared, x_train, batch_size=10, num_batches=2)
    assert _unchanged(before, shared.state())
    far = train.MLP([6, 8, 3], norm=BatchNorm, seed=2, dtype=np.float64)  # inputs whose mean is 1e7 standard deviations out
    far_x = (x_train.astype(np.float64) - x_train.mean(0)) * 1e-3 + 1e4
    inputs = _replayed_norm_inputs(far, far_x, batch_size=10, num_batches=30, seed=0)[0][:, 0].reshape(-1, 8)
    train.precise_bn(far, far_x, batch_size=10, num_batches=30)
    np.testing.assert_allclose(far.norm_layers()[0].running_var, inputs.var(0), rtol=1e-6)


def test_load_state_checks_everything_before_it_assigns_anything():
    """A state of another model (n_models, sizes, norm layers) raises and changes nothing: no broadcasting of one
    model's (1, ...) parameters over three, no norm layer states dropped by a zip."""
    three = train.MLP([6, 8, 3], norm=BatchNorm, n_models=3, seed=1)
    one, plain_one = train.MLP([6, 8, 3], norm=BatchNorm, n_models=1), train.MLP([6, 8, 3], n_models=1)
    before = three.state()
    params, norms = train.MLP([6, 8, 3], norm=BatchNorm, n_models=3, seed=5).state()   # another model's state
    for s in norms:
        s["running_mean"] = s["running_mean"] + 1.0                  # so that a half-done load would show
    wrong_layer_state = [dict(s) for s in norms]
    wrong_layer_state[2]["running_mean"] = np.zeros(5, np.float32)      # the last layer refuses its state dict
    for bad, error, match in [(one.state(), ValueError, "missing"), ((params, norms[:1]), ValueError, "holds 1"),
                              ((params, wrong_layer_state), ValueError, "running_mean"), (params, TypeError, "state must be")]:
        with pytest.raises(error, match=match):
            three.load_state(bad)
        assert _unchanged(before, three.state())
    plain_three = train.MLP([6, 8, 3], n_models=3, seed=1)
    with pytest.raises(ValueError, match=r"W0 has shape \(1, 6, 8\), this model's \(3, 6, 8\)"):
        plain_three.load_state(plain_one.state())
    three.load_state(train.MLP([6, 8, 3], norm=BatchNorm, n_models=3, seed=7).state())    # one that fits loads
    assert not np.array_equal(three.state()[0]["W0"], before[0]["W0"])


def test_cross_entropy_and_loss_and_grads_name_what_is_wrong():
    model = train.MLP([6, 8, 3])
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\), got values from -1"):
        train.cross_entropy(np.zeros((1, 2, 3)), np.array([0, -1]))           # would wrap around to class 2
    with pytest.raises(TypeError, match="integer class labels"):
        train.cross_entropy(np.zeros((1, 2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"logits must have shape \(M, N, classes\)"):
        train.cross_entropy(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 6\)"):      # x is named, not y
        train.loss_and_grads(model, np.zeros(6), np.zeros(1, np.int64))
    loss, d = train.cross_entropy(np.zeros((1, 2, 3)), np.array([0, 2]))
    np.testing.assert_allclose(loss, [np.log(3)])
    np.testing.assert_allclose(d.sum(-1), 0, atol=1e-12)


def test_mlp_refuses_input_that_is_not_real_and_takes_integers_and_float64():
    """A complex x lost its imaginary part with only NumPy's ComplexWarning; strings and objects gave NumPy's
    conversion errors, which do not name x."""
    model = train.MLP([6, 8, 3], seed=0)
    x = np.random.default_rng(0).normal(size=(4, 6))
    for bad in (x + 1j, x.astype(str), x.astype(object)):
        with pytest.raises(TypeError, match=f"x must hold real numbers .*got dtype {bad.dtype}"):
            model.forward(bad)
    np.testing.assert_array_equal(model.forward(x.round().astype(np.int64)), model.forward(x.round()))
    assert model.forward(x).dtype == model.dtype


@pytest.mark.parametrize("seed", [None, -1, 1.5, True])
def test_seeds_are_checked_by_name(seed):
    data = toy_data()
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        train.MLP([6, 8, 3], seed=seed)
    model = train.MLP([6, 8, 3], norm=BatchNorm)
    before = model.state()
    for call in (lambda: train.accuracy(model, data[2], data[3], batch_size=10, batch_stats=True, seed=seed),
                 lambda: train.precise_bn(model, data[0], 10, num_batches=2, seed=seed)):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            call()
        assert _unchanged(before, model.state())


def test_precise_bn_refuses_an_instance_norm_with_running_statistics_before_any_change():
    """bnlib.variants.InstanceNorm's running statistics average per-example statistics, and it has no cumulative
    average (momentum=None): precise_bn refuses it, naming the layer, instead of failing inside its forward."""
    from bnlib.variants import InstanceNorm

    class Images:                                       # the smallest model precise_bn accepts: 6 inputs as (2, 3)
        sizes, n_models = [6, 6], 1

        def __init__(self, track):
            self.norm = InstanceNorm(2, track_running_stats=track)

        def norm_layers(self):
            return [self.norm]

        def train(self, mode=True):
            self.norm.train(mode)
            return self

        def forward(self, x):
            return self.norm.forward(x.reshape(len(x), 2, 3))

    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    model = Images(track=True)
    before = model.norm.state_dict()
    with pytest.raises(ValueError, match="layer 0 is an InstanceNorm"):
        train.precise_bn(model, x, 5, num_batches=2)
    assert all(np.array_equal(v, model.norm.state_dict()[k]) for k, v in before.items()) and model.norm.momentum == 0.1
    train.precise_bn(Images(track=False), x, 5, num_batches=2)          # nothing to recompute: accepted


# ---------------------------------------------------------------- one BatchNorm call for all models (bnlib.train)
class OwnCalls(BatchNorm):
    """BatchNorm itself under another name: a subclass, so the trainer calls each model's layer on its own."""


def _joint_calls(monkeypatch):
    """Count the trainer's joint calls (so that a test of the joint path knows it ran): (layers, z's shape) for each
    joint forward that ran, ("backward", dz's shape) for each joint backward."""
    calls = []
    forward, backward = train._joint_forward, train._joint_backward
    def counting_forward(layers, z):
        out = forward(layers, z)
        if out is not None:
            calls.append((len(layers), z.shape))
        return out
    def counting_backward(layers, cache, kept, dz):
        calls.append(("backward", dz.shape))
        return backward(layers, cache, kept, dz)
    monkeypatch.setattr(train, "_joint_forward", counting_forward)
    monkeypatch.setattr(train, "_joint_backward", counting_backward)
    return calls


def _assert_same_bits(a, b, what):
    a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), what         # the bytes: NaN == NaN, -0.0 != 0.0


def _assert_same_state(joint, own):
    for (name, p), (name_own, q) in zip(joint.parameters(), own.parameters()):
        assert name == name_own
        _assert_same_bits(p, q, name)
    for k, (a, b) in enumerate(zip(joint.norm_layers(), own.norm_layers())):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            _assert_same_bits(sa[key], sb[key], f"layer {k} {key}")
        for attr in ("grad_weight", "grad_bias"):
            if getattr(a, attr) is not None:
                _assert_same_bits(getattr(a, attr), getattr(b, attr), f"layer {k} {attr}")


STACK_CASES = [   # (hidden widths, batch, models, layer kwargs, fit kwargs); the widths x batch set the groups
    ([20, 12], 16, 3, {}, {}),
    ([20, 12], 7, 2, dict(momentum=None), {}),
    ([9], 2, 4, dict(affine=False), {}),
    ([15, 11], 12, 3, dict(bias=False, eps=1e-3), dict(norm_batch_size=4)),
    ([14], 10, 3, dict(track_running_stats=False), dict(weight_decay=1e-3)),
    ([20], 60, 50, {}, {}),                   # 60,000 values in all: one call
    ([200], 60, 3, {}, {}),                   # 36,000 values: one call; 546 in evaluation (45 x 200 x 3 = 27,000)
    ([600], 60, 3, {}, {}),                   # 108,000 values: each model's call alone (the serial kernels)
    ([400], 200, 3, {}, {}),                  # 240,000 values: each model's call alone (the parallel kernels)
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(STACK_CASES)))
def test_one_call_for_all_models_trains_bit_for_bit_as_each_models_own(case, dtype, monkeypatch):
    """fit() with BatchNorm (the models' layers share a call) and with a subclass (each layer its own call): the same
    parameters, running statistics, batch counts, gradients and history, bit for bit."""
    hidden, batch, models, layer_kw, fit_kw = STACK_CASES[case]
    calls = _joint_calls(monkeypatch)
    data = toy_data(n_train=max(240, batch * 2), n_test=45, d=6)
    nets = {}
    for kind, cls in (("joint", BatchNorm), ("own", OwnCalls)):
        net = train.MLP([6, *hidden, 3], "relu", norm=lambda c, cls=cls: cls(c, dtype=dtype, **layer_kw),
                        n_models=models, seed=case, dtype=dtype)
        nets[kind] = (net, train.fit(net, data, steps=6, lr=0.05, batch_size=batch, eval_every=2, seed=case,
                                     progress=False, **fit_kw))
        if kind == "joint":
            training_calls = [shape for what, shape in calls
                              if what != "backward" and shape[1] == (fit_kw.get("norm_batch_size") or batch)]
            assert (len(training_calls) > 0) == (models * hidden[0] * batch < 65_536), calls   # PARALLEL_MIN_SIZE
            assert (("backward", training_calls[0]) in calls) if training_calls else True
            joint_calls = len(calls)
        else:
            assert len(calls) == joint_calls                    # the subclass's network made none
    (joint, h_joint), (own, h_own) = nets["joint"], nets["own"]
    _assert_same_state(joint, own)
    for field in ("steps", "test_acc", "train_loss"):
        _assert_same_bits(getattr(h_joint, field), getattr(h_own, field), field)
    for train_mode in (True, False):                   # one more step's gradients, in both modes
        joint.train(train_mode), own.train(train_mode)
        x, y = data[0][:batch], data[1][:batch]
        (loss_j, g_j), (loss_o, g_o) = train.loss_and_grads(joint, x, y), train.loss_and_grads(own, x, y)
        _assert_same_bits(loss_j, loss_o, "loss")
        assert g_j.keys() == g_o.keys()
        for name in g_j:
            _assert_same_bits(g_j[name], g_o[name], name)
        _assert_same_state(joint, own)


def test_one_call_leaves_each_layer_ready_for_its_own_backward():
    """After the joint forward, layer m's own backward(dz[m]) gives what it gives after its own forward(z[m])."""
    rng = np.random.default_rng(0)
    net = train.MLP([5, 8, 3], "relu", norm=BatchNorm, n_models=3, seed=1)
    x = rng.normal(size=(10, 5)).astype(np.float32)
    net.forward(x)
    z = np.matmul(np.broadcast_to(x, (3, 10, 5)), net.weights[0])          # the first layer's input to its norms
    dz = rng.normal(size=z.shape).astype(np.float32)
    joint = [layer.backward(dz[m]) for m, layer in enumerate(net.norms[0])]
    fresh = [copy.deepcopy(layer) for layer in net.norms[0]]
    for m, layer in enumerate(fresh):                  # the same layers one step back: their own forward, backward
        layer.running_mean[...], layer.running_var[...] = 0, 1
        layer.num_batches_tracked = 0
        layer.forward(z[m])
        _assert_same_bits(layer.backward(dz[m]), joint[m], f"model {m} dx")
        _assert_same_bits(layer.grad_weight, net.norms[0][m].grad_weight, f"model {m} grad_weight")
        _assert_same_bits(layer.running_var, net.norms[0][m].running_var, f"model {m} running_var")


def test_the_models_own_calls_where_one_call_would_not_be_the_same(monkeypatch):
    """Each model's layer gets its own call when: the layers differ in a setting, a layer's forward is an instance
    attribute (precise_bn records so), the batch has over 1,001 rows (the kernel could then re-centre), the backend
    is not numba, or a layer ran a forward of its own between the network's forward and backward."""
    from bnlib import cpu
    calls = _joint_calls(monkeypatch)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 4)).astype(np.float32), rng.integers(0, 3, 12)
    def net():
        return train.MLP([4, 6, 3], "relu", norm=BatchNorm, n_models=3, seed=0)
    different = net()
    different.norms[0][1].momentum = 0.2
    train.loss_and_grads(different, x, y)
    replaced = net()
    replaced.norms[0][2].forward = replaced.norms[0][2].forward
    train.loss_and_grads(replaced, x, y)
    train.loss_and_grads(net(), rng.normal(size=(1002, 4)).astype(np.float32), rng.integers(0, 3, 1002))
    if "numpy" in cpu.available_backends():
        previous = cpu.set_backend("numpy")
        try:
            train.loss_and_grads(net(), x, y)
        finally:
            cpu.set_backend(previous)
    assert calls == []
    precise = net()                                    # precise_bn's recording forwards: still the statistics of
    reference = net()                                  # each model's own batches
    reference.norms[0] = [OwnCalls(6) for _ in range(3)]
    for m in (precise, reference):
        train.precise_bn(m, x, batch_size=4, num_batches=3)
    for a, b in zip(precise.norm_layers(), reference.norm_layers()):
        _assert_same_bits(a.running_var, b.running_var, "precise_bn running_var")
    assert calls == []
    # a layer's own forward between the network's forward and backward: its backward reads what that forward cached
    grads = {}
    for cls in (BatchNorm, OwnCalls):
        interrupted = train.MLP([4, 6, 3], "relu", norm=cls, n_models=3, seed=0)
        logits = interrupted.forward(x)
        z = np.matmul(np.broadcast_to(x, (3, 12, 4)), interrupted.weights[0])
        interrupted.norms[0][0].forward(2 * z[0] + 1)
        grads[cls] = interrupted.backward(np.ones_like(logits) / logits.size)
    assert len(calls) == 1                             # the BatchNorm network's forward shared one call
    for name in grads[BatchNorm]:
        _assert_same_bits(grads[BatchNorm][name], grads[OwnCalls][name], name)


def _forward_both(build, x, train_mode=True):
    """Logits of the same network built with BatchNorm and with OwnCalls, and the two networks."""
    nets = [build(cls) for cls in (BatchNorm, OwnCalls)]
    for net in nets:
        net.train(train_mode)
    return [net.forward(x) for net in nets], nets


def test_one_call_on_adversarial_batches_is_still_each_models_own(monkeypatch):
    """The kernel re-centres all of a call's channels when one channel's first value seems over 100 standard
    deviations from its mean. Differences below about 1e-19 square to 0 in float32 and make it fire; Samuelson's
    extreme, one value K and 1,000 equal others, comes closest to firing it in exact arithmetic. Neither may let one
    model's values change another model's output."""
    calls = _joint_calls(monkeypatch)
    rng = np.random.default_rng(3)
    constant = train.MLP([4, 4, 3], "relu", norm=BatchNorm, n_models=2, seed=0)
    constant.weights[0][1][:, 2] = 0                  # one channel of model 1 constant: variance 0, its own call
    constant.forward(rng.normal(size=(8, 4)).astype(np.float32))
    assert calls == []
    for trial in range(300):                        # model 0's activations ~1e-22 (underflow), model 1's ordinary
        n = int(rng.integers(2, 100))
        def build(cls):
            net = train.MLP([4, 4, 3], "relu", norm=cls, n_models=2, seed=trial)
            net.weights[0][0] *= 1e-22
            return net
        x = (rng.normal(size=(n, 4)) * rng.uniform(0.1, 3) + rng.normal() * 20).astype(np.float32)
        (joint, own), nets = _forward_both(build, x)
        _assert_same_bits(joint, own, f"trial {trial}")
        _assert_same_state(*nets)
    assert calls == []                              # the variance rule kept every one of them apart
    x = np.zeros((1001, 4), np.float32)
    x[0] = rng.normal(size=4)                       # each column of z: K = x[0] @ W, then 1,000 zeros
    (joint, own), nets = _forward_both(lambda cls: train.MLP([4, 5, 3], "relu", norm=cls, n_models=3, seed=1), x)
    assert calls[0] == (3, (3, 1001, 5))
    _assert_same_bits(joint, own, "Samuelson's extreme")
    _assert_same_state(*nets)


def test_the_joint_call_follows_each_models_own_on_failure_and_mutation(monkeypatch):
    """A call that fails raises the models' own error and leaves their state; weights changed in place between
    forward and backward, shared layers, a NumPy momentum, a patched class, 1-row and empty batches: each as the
    models' own calls do it."""
    calls = _joint_calls(monkeypatch)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 5)).astype(np.float32), rng.integers(0, 3, 10)
    def build(cls):
        return train.MLP([5, 4, 3], "relu", norm=cls, n_models=3, seed=2)
    nets = [build(cls) for cls in (BatchNorm, OwnCalls)]
    errors = []
    for net in nets:                                # evaluation with a negative variance in model 1's layer
        net.eval()
        net.norms[0][1].running_var[2] = -1.0
        with pytest.raises(ValueError) as err:
            net.forward(x)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "channel 2" in errors[0]
    _assert_same_state(*nets)
    grads = []
    for net in (build(BatchNorm), build(OwnCalls)):     # gamma doubled in place after the forward
        logits = net.forward(x)
        for layer in net.norms[0]:
            layer.weight *= 2
        grads.append(net.backward(np.ones_like(logits) / logits.size))
    for name in grads[0]:
        _assert_same_bits(grads[0][name], grads[1][name], name)
    assert ("backward", (3, 10, 4)) in calls
    calls.clear()
    results = []
    for cls in (BatchNorm, OwnCalls):               # one layer object for every model: two updates per step
        shared = cls(4)
        net = train.MLP([5, 4, 3], "relu", norm=lambda c, shared=shared: shared, n_models=3, seed=2)
        _, g = train.loss_and_grads(net, x, y)
        results.append((shared.num_batches_tracked, shared.running_var.copy(), g["W0"]))
    assert results[0][0] == results[1][0] == 3
    _assert_same_bits(results[0][1], results[1][1], "shared running_var")
    _assert_same_bits(results[0][2], results[1][2], "shared W0 gradient")
    numpy_momentum = build(BatchNorm)
    numpy_momentum.norms[0][1].momentum = np.float64(0.1)       # equal to 0.1, but float64 arithmetic on the buffer
    reference = build(OwnCalls)
    reference.norms[0][1].momentum = np.float64(0.1)
    for net in (numpy_momentum, reference):
        train.loss_and_grads(net, x, y)
    _assert_same_state(numpy_momentum, reference)
    original = BatchNorm.forward
    monkeypatch.setattr(BatchNorm, "forward", lambda self, x: original(self, x))
    train.loss_and_grads(build(BatchNorm), x, y)
    monkeypatch.setattr(BatchNorm, "forward", original)
    assert calls == []
    one_row = []
    for cls in (BatchNorm, OwnCalls):
        with pytest.raises(ValueError) as err:
            build(cls).forward(x[:1])
        one_row.append(str(err.value))
    assert one_row[0] == one_row[1]
    (joint, own), nets = _forward_both(build, x[:0])
    _assert_same_bits(joint, own, "empty batch")
    _assert_same_state(*nets)
    assert calls == []


@pytest.mark.parametrize("call, error, words", [
    (lambda: train.iid_batches(np.random.default_rng(0), np.arange(5), 10), ValueError, ["batch_size", "[1, 5]", "10"]),
    (lambda: train.iid_batches(np.random.default_rng(0), np.arange(5), 0), ValueError, ["batch_size", "0"]),
    (lambda: train.init_weights(np.random.default_rng(0), 0, 3, "he"), ValueError, ["fan_in", "0"]),   # was ZeroDivisionError
    (lambda: train.init_weights(np.random.default_rng(0), 3, 2.5, "he"), ValueError, ["fan_out", "2.5"]),
    (lambda: train.init_weights(None, 3, 3, "he"), TypeError, ["rng", "NoneType"]),                   # was AttributeError
    (lambda: gradcheck.numerical_gradient(3, np.ones(2), np.ones(2)), TypeError, ["f must be", "int"]),
])
def test_public_helpers_name_the_bad_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(w in str(info.value) for w in words), str(info.value)


def test_mlp_train_takes_a_boolean_mode_even_without_norm_layers():
    model = train.MLP([4, 3, 2])                        # no normalization layers to refuse it
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        model.train("no")
    assert model.train(np.bool_(False)) is model
