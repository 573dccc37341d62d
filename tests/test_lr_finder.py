"""hkfit.find_learning_rate: the range test leaves the model untouched, sweeps exponentially
through the optimizer's injected rate, stops when the loss diverges, and suggests a rate
that trains well."""

import logging
import math
import re

import haiku as hk
import jax
import numpy as np
import optax
import pytest

import hkfit
from hkfit import _lr_finder


def regression(n=256, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return x, x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)


def linear_model(optimizer="sgd", seed=0):
    return hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse", optimizer=optimizer, seed=seed)


def mlp_model(seed=0):
    def forward(x, is_training):
        x = jax.nn.relu(hk.Linear(32)(x))
        x = hk.BatchNorm(True, True, 0.9)(x, is_training)  # Haiku state too
        return hk.Linear(1)(x)

    return hkfit.Model(forward, loss="mse", optimizer="adam", metrics=["mae"], seed=seed)


def host_values(tree):
    """numpy copies of every leaf (a typed PRNG key as its key data)."""

    def host(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.array(leaf)

    return jax.tree_util.tree_map(host, tree)


def snapshot(model):
    ts = model.train_state
    return {
        "train_state": host_values(ts),
        "leaves": jax.tree_util.tree_leaves(ts),
        "objects": (ts, ts.params, ts.state, ts.opt_state),
        "step": model.step,
        "epoch": model.epoch,
        "history": (
            list(model.history.epoch),
            {k: list(v) for k, v in model.history.history.items()},
        ),
        "learning_rate": model.learning_rate,
    }


def test_the_model_is_left_bit_identical():
    x, y = regression()
    model, twin = mlp_model(), mlp_model()
    for m in (model, twin):
        m.fit(x, y, epochs=2, batch_size=32, verbose=0)
    before = snapshot(model)

    result = hkfit.find_learning_rate(model, x, y, min_lr=1e-5, max_lr=1e3, steps=60)
    assert result.diverged  # the copy trained to ruin; the model must not notice

    after = snapshot(model)
    equal = jax.tree_util.tree_map(np.array_equal, before["train_state"], after["train_state"])
    assert all(jax.tree_util.tree_leaves(equal))
    assert all(a is b for a, b in zip(before["objects"], after["objects"]))  # restored as is
    assert not any(leaf.is_deleted() for leaf in before["leaves"])  # never donated
    for key in ("step", "epoch", "history", "learning_rate"):
        assert before[key] == after[key], key

    # and training goes on exactly as if the sweep never ran
    for m in (model, twin):
        m.fit(x, y, epochs=3, batch_size=32, verbose=0)
    same = jax.tree_util.tree_map(np.array_equal, model.params, twin.params)
    assert all(jax.tree_util.tree_leaves(same))
    assert model.history.history == twin.history.history


def test_an_unbuilt_model_is_built_as_fit_would():
    x, y = regression()
    model, fresh = linear_model(), linear_model()
    hkfit.find_learning_rate(model, x, y, steps=5)
    fresh.init(x)
    assert model.step == 0
    np.testing.assert_array_equal(model.params["linear"]["w"], fresh.params["linear"]["w"])


def test_rates_are_exponentially_spaced_and_reach_the_optimizer():
    seen = []

    def recording_sgd(learning_rate):
        def update(updates, state, params=None):
            jax.debug.callback(lambda lr: seen.append(float(lr)), learning_rate, ordered=True)
            return jax.tree_util.tree_map(lambda g: -learning_rate * g, updates), state

        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

    x, y = regression()
    model = linear_model(optax.inject_hyperparams(recording_sgd)(learning_rate=0.1))
    result = hkfit.find_learning_rate(model, x, y, min_lr=1e-6, max_lr=1e-2, steps=25)
    jax.effects_barrier()

    rates = result.learning_rates
    assert not result.diverged and len(rates) == len(result.losses) == 25
    assert rates[0] == pytest.approx(1e-6, rel=1e-12) and rates[-1] == pytest.approx(1e-2)
    np.testing.assert_allclose(np.diff(np.log(rates)), math.log(1e4) / 24, rtol=1e-9)
    np.testing.assert_allclose(seen, rates, rtol=1e-6)  # the rate each step trained with
    assert model.learning_rate == pytest.approx(0.1)


def test_smoothing_and_suggestion():
    x, y = regression()
    beta = 0.9
    result = hkfit.find_learning_rate(linear_model(), x, y, max_lr=1e-1, steps=40, beta=beta)
    losses, average, expected = result.losses, 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        expected.append(average / (1 - beta ** (i + 1)))
    np.testing.assert_allclose(result.smoothed_losses, expected, rtol=1e-12)
    assert result.smoothed_losses[0] == losses[0]  # bias-corrected: no pull towards 0
    lowest = np.argmin(result.smoothed_losses)
    assert result.suggestion == pytest.approx(result.learning_rates[lowest] / 10)
    assert losses[-1] < losses[0]  # it learned


def test_divergence_stops_the_sweep():
    x, y = regression()
    factor = 4.0
    result = hkfit.find_learning_rate(
        linear_model(), x, y, min_lr=1e-4, max_lr=1e2, steps=100, diverge_factor=factor
    )
    smoothed = result.smoothed_losses
    assert result.diverged and 2 < len(smoothed) < 100
    assert len(result.learning_rates) == len(result.losses) == len(smoothed)
    best_before = smoothed[:-1].min()
    assert not np.isfinite(smoothed[-1]) or smoothed[-1] > factor * best_before
    for i in range(1, len(smoothed) - 1):  # no earlier step met the condition
        assert smoothed[i] <= factor * smoothed[:i].min()
    # the rates run are the first ones of the full sweep
    np.testing.assert_allclose(result.learning_rates, np.geomspace(1e-4, 1e2, 100)[: len(smoothed)])


def test_steps_beyond_the_data_reshuffle_and_cycle():
    batches = [rows.tolist() for rows in _lr_finder._batches(20, 8, 7, True, 0)]
    assert len(batches) == 7 and all(len(set(b)) == 8 for b in batches)
    for start in (0, 2, 4):  # two batches per pass, disjoint within it
        assert not set(batches[start]) & set(batches[start + 1])
    assert batches[0] != batches[2]  # each pass is reshuffled
    in_order = [rows.tolist() for rows in _lr_finder._batches(20, 8, 3, False, 0)]
    assert in_order == [list(range(8)), list(range(8, 16)), list(range(8))]

    x, y = regression(20)
    result = hkfit.find_learning_rate(linear_model(), x, y, batch_size=8, steps=30, max_lr=0.1)
    assert len(result.losses) == 30


def test_pytree_inputs_and_sample_weight():
    x, y = regression()
    model = hkfit.Model(lambda x: hk.Linear(1)(x["a"] + x["b"]), loss="mse", optimizer="adam")
    result = hkfit.find_learning_rate(
        model, {"a": x, "b": x}, y, sample_weight=np.ones(len(x)), steps=10, min_lr=1e-3
    )
    assert len(result.losses) == 10 and np.isfinite(result.losses).all()


def test_the_sweep_compiles_the_train_step_once(caplog):
    x, y = regression()
    model = linear_model()
    compiled = re.compile(r"Compiling (jit\()?train_step\b")
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        hkfit.find_learning_rate(model, x, y, steps=20)
        first = sum(bool(compiled.search(r.getMessage())) for r in caplog.records)
        caplog.clear()
        hkfit.find_learning_rate(model, x, y, min_lr=1e-3, max_lr=1e-1, steps=20)
        second = sum(bool(compiled.search(r.getMessage())) for r in caplog.records)
    assert (first, second) == (1, 0)


def test_errors():
    x, y = regression()
    with pytest.raises(ValueError, match=r"inject_hyperparams\(optax.adam\)"):
        hkfit.find_learning_rate(linear_model(optax.adam(1e-3)), x, y)
    schedule = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="schedule"):
        hkfit.find_learning_rate(linear_model(schedule), x, y, steps=5)
    model = linear_model()
    with pytest.raises(ValueError, match=r"max_lr.*Received: min_lr=0.1, max_lr=0.01"):
        hkfit.find_learning_rate(model, x, y, min_lr=0.1, max_lr=0.01)
    with pytest.raises(ValueError, match="min_lr"):
        hkfit.find_learning_rate(model, x, y, min_lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        hkfit.find_learning_rate(model, x, y, steps=1)
    with pytest.raises(ValueError, match="diverge_factor"):
        hkfit.find_learning_rate(model, x, y, diverge_factor=1.0)
    with pytest.raises(TypeError, match="Received: x of type generator"):
        hkfit.find_learning_rate(model, (b for b in [x]), y)
    assert not model.built  # refused before anything ran


def test_plot(tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="needs the plot extra")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = regression()
    result = hkfit.find_learning_rate(linear_model(), x, y, min_lr=1e-4, max_lr=1e2, steps=50)
    figure = result.plot()
    (ax,) = figure.axes
    try:
        drawn = {line.get_label(): line for line in ax.lines}
        loss, smoothed = drawn["loss"], drawn["smoothed loss"]
        np.testing.assert_array_equal(loss.get_xdata(), result.learning_rates)
        np.testing.assert_array_equal(loss.get_ydata(), result.losses)
        np.testing.assert_array_equal(smoothed.get_ydata(), result.smoothed_losses)
        (mark,) = [line for label, line in drawn.items() if label.startswith("suggestion")]
        assert list(mark.get_xdata()) == [result.suggestion] * 2
        assert ax.get_xscale() == "log"
        path = tmp_path / "lr.png"
        figure.savefig(path)
        assert path.stat().st_size > 1000
        other, given = plt.subplots()
        assert result.plot(ax=given) is other and len(given.lines) == 3
    finally:
        plt.close("all")


def test_suggestion_for_adam_on_digits_trains_well():
    """The suggested rate trains an MLP well in 2 epochs; 100x it and 1/100 of it do not.

    So the suggestion sits inside the band of good rates, not at an edge of it, and it
    does at least as well as Adam's usual 1e-3 over the same short run.
    """
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1500], order[1500:]

    def model():
        def forward(x):
            return hk.nets.MLP([64, 64, 10])(x)

        return hkfit.Model(
            forward,
            loss="sparse_categorical_crossentropy",
            optimizer="adam",
            metrics=["accuracy"],
            seed=0,
        )

    result = hkfit.find_learning_rate(model(), x[train], y[train], batch_size=64)
    suggestion = result.suggestion
    assert 1e-4 < suggestion < 1e-1, suggestion

    def trained(rate):
        m = model()
        m.init(x[train])
        m.learning_rate = rate
        m.fit(x[train], y[train], epochs=2, batch_size=64, verbose=0)
        return m.evaluate(x[test], y[test], verbose=0)

    good, high, low, usual = (
        trained(r) for r in (suggestion, suggestion * 100, suggestion / 100, 1e-3)
    )
    assert good["accuracy"] > 0.85, (suggestion, good)
    assert high["accuracy"] < 0.5 and low["accuracy"] < 0.6, (suggestion, high, low)
    assert good["loss"] <= usual["loss"], (suggestion, good, usual)
