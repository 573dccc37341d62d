"""Engine behaviour through the public API: callbacks, pacing, data feeds and model state.

Covered:
  * callback hooks: begin hooks get ``logs={}``; ``on_predict_batch_end`` gets the
    execution's ``{"outputs": ...}``; the Keras aliases ``on_batch_begin`` /
    ``on_batch_end`` fire like the train batch hooks;
  * ``steps_per_execution="auto"`` runs one step per execution when a callback overrides a
    batch hook, and ``ModelCheckpoint(save_freq=1)`` saves after every batch;
  * validation inside ``fit`` fires the test hooks every run and uses fit's
    ``steps_per_execution``; an exhausted one-shot ``validation_data`` drops the ``val_*``
    keys with one warning; ``evaluate`` of an empty iterable raises;
  * ``steps_per_epoch`` on arrays runs exactly that many steps;
  * evaluate / predict on host arrays fire batch hooks once per execution;
  * ``train_on_batch`` / ``test_on_batch`` and fit on an iterable build once per input
    structure;
  * ``fit(iterable, y=...)`` is refused; successive ``fit`` calls continue the epoch count
    (shuffling), so two ``fit(epochs=1)`` equal one ``fit(epochs=2)``;
  * inference draws a different key per batch, reproducibly; an example without a batch
    axis is refused;
  * ``load`` of a checkpoint written with another optimizer restores params and state
    with a warning; ``model.learning_rate``; ``class_weight`` with non-integer keys;
  * evaluate reads its logs from the device only when needed;
  * float64 / int64 inputs train without warnings; bfloat16 NaN inputs are refused;
  * ``hkfit.with_is_training`` for a transform whose apply takes ``is_training``;
  * ``DataParallel`` with ``param_sharding`` keeps unmatched parameters replicated and
    compiles its training step once per fit;
  * a forward that fails is traced once, and its own error propagates.
"""

import logging
import os
import re
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit
from hkfit import callbacks as C


def forward(x):
    return hk.Linear(3)(x)


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.arange(n) % 3).astype(np.int32)
    return x, y


def make_model(**kwargs):
    kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    kwargs.setdefault("optimizer", optax.sgd(0.1))
    return hkfit.Model(forward, **kwargs)


def host(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a, copy=True), tree)


class Recorder(C.Callback):
    """Records ``(hook, index, logs)``; see :func:`recorder` for which hooks it overrides."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def indices(self, hook):
        return [index for name, index, _ in self.calls if name == hook]

    def logs(self, hook):
        return [logs for name, _, logs in self.calls if name == hook]


def _recording_hook(name):
    if "batch" in name or "epoch" in name:

        def hook(self, index, logs=None):
            self.calls.append((name, index, logs))
    else:

        def hook(self, logs=None):
            self.calls.append((name, None, logs))

    return hook


def recorder(*hooks):
    """A :class:`Recorder` overriding only ``hooks`` (so an epoch recorder is no batch callback)."""
    return type("Recording", (Recorder,), {name: _recording_hook(name) for name in hooks})()


# --- Callback hooks -------------------------------------------------------------------------


def test_begin_hooks_get_an_empty_dict():
    x, y = data(16)
    model = make_model()
    begins = ("on_train_begin", "on_epoch_begin", "on_test_begin", "on_predict_begin")
    rec = recorder(*begins)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[rec])
    model.evaluate(x, y, batch_size=8, verbose=0, callbacks=[rec])
    model.predict(x, batch_size=8, callbacks=[rec])
    for hook in begins:
        assert rec.logs(hook) == [{}], hook


def test_predict_batch_end_logs_hold_the_outputs():
    x, _ = data(20)
    model = make_model()
    model.init(x)
    rec = recorder("on_predict_batch_end")
    out = model.predict(x, batch_size=8, steps_per_execution=1, callbacks=[rec])
    assert rec.indices("on_predict_batch_end") == [0, 1, 2]
    logs = rec.logs("on_predict_batch_end")
    assert all(set(entry) == {"outputs"} for entry in logs)
    np.testing.assert_allclose(
        np.concatenate([np.asarray(e["outputs"]) for e in logs]), out, atol=1e-6
    )


def test_keras_batch_aliases_fire_like_train_batch_hooks():
    x, y = data(40)  # 10 batches of 4
    model = make_model()
    rec = recorder("on_batch_begin", "on_batch_end")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[rec])
    assert rec.indices("on_batch_begin") == list(range(10))
    assert rec.indices("on_batch_end") == list(range(10))
    assert all("loss" in logs for logs in rec.logs("on_batch_end"))


def test_auto_steps_per_execution_is_one_with_a_batch_callback():
    x, y = data(40)  # 10 batches of 4
    model = make_model()
    rec = recorder("on_train_batch_end")
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[rec])
    assert rec.indices("on_train_batch_end") == list(range(10)) * 2


def test_checkpoint_save_freq_one_saves_every_batch(tmp_path):
    x, y = data(40)  # 10 batches of 4
    model = make_model()
    cb = C.ModelCheckpoint(str(tmp_path / "m-{epoch}-{batch}.npz"), save_freq=1)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[cb])
    assert sorted(os.listdir(tmp_path)) == sorted(f"m-1-{b}.npz" for b in range(1, 11))


# --- Validation inside fit ------------------------------------------------------------------


def test_validation_fires_test_hooks_every_run():
    x, y = data(16)
    xv, yv = data(12, seed=1)  # 3 validation batches of 4
    model = make_model()
    hooks = ("on_test_begin", "on_test_batch_begin", "on_test_batch_end", "on_test_end")
    rec = recorder(*hooks)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, validation_data=(xv, yv), callbacks=[rec])
    assert len(rec.indices("on_test_begin")) == 2
    assert len(rec.indices("on_test_end")) == 2
    assert rec.indices("on_test_batch_begin") == [0, 1, 2] * 2
    assert rec.indices("on_test_batch_end") == [0, 1, 2] * 2


def test_validation_uses_fits_steps_per_execution():
    x, y = data(12)
    xv, yv = data(100, seed=1)  # 10 validation batches of 10
    model = make_model()
    rec = recorder("on_test_batch_end")
    model.fit(
        x,
        y,
        epochs=1,
        batch_size=4,
        verbose=0,
        validation_data=(xv, yv),
        validation_batch_size=10,
        steps_per_execution=3,
        callbacks=[rec],
    )
    assert rec.indices("on_test_batch_end") == [2, 5, 8, 9]  # ceil(10 / 3) executions


def test_exhausted_validation_generator_drops_val_keys_with_one_warning():
    x, y = data(16)
    xv, yv = data(8, seed=1)
    one_shot = ((xv[i : i + 4], yv[i : i + 4]) for i in range(0, 8, 4))
    model = make_model()
    rec = recorder("on_epoch_end")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x, y, epochs=3, batch_size=4, verbose=0, validation_data=one_shot, callbacks=[rec]
        )
    epoch_logs = rec.logs("on_epoch_end")
    assert len(epoch_logs) == 3
    assert "val_loss" in epoch_logs[0]
    assert [k for logs in epoch_logs[1:] for k in logs if k.startswith("val_")] == []
    about_validation = [
        w
        for w in caught
        if issubclass(w.category, UserWarning) and "validation" in str(w.message).lower()
    ]
    assert len(about_validation) == 1, [str(w.message) for w in caught]


def test_evaluate_on_an_empty_iterable_raises():
    x, _ = data(8)
    model = make_model()
    model.init(x)
    with pytest.raises(ValueError, match=r"(?i)no batch|empty"):
        model.evaluate(iter([]), verbose=0)


# --- Steps and batch hooks over arrays ------------------------------------------------------


def test_steps_per_epoch_on_arrays_runs_exactly_that_many_steps():
    x, y = data(23)
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=5, steps_per_epoch=2, verbose=0)
    assert model.step == 2


def test_inference_batch_hooks_fire_once_per_execution():
    x, y = data(100)  # 7 batches of 16
    model = make_model()
    model.init(x)
    for steps_per_execution, expected in [(1, list(range(7))), (3, [2, 5, 6])]:
        rec = recorder("on_test_batch_end", "on_predict_batch_end")
        model.evaluate(
            x, y, batch_size=16, verbose=0, steps_per_execution=steps_per_execution, callbacks=[rec]
        )
        model.predict(x, batch_size=16, steps_per_execution=steps_per_execution, callbacks=[rec])
        assert rec.indices("on_test_batch_end") == expected, steps_per_execution
        assert rec.indices("on_predict_batch_end") == expected, steps_per_execution


# --- Build once per input structure ---------------------------------------------------------


def count_eval_shape(monkeypatch):
    counter = {"n": 0}
    original = jax.eval_shape

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(jax, "eval_shape", counted)
    return counter


def test_on_batch_methods_build_once(monkeypatch):
    x, y = data(8)
    counter = count_eval_shape(monkeypatch)
    model = make_model()
    model.train_on_batch(x, y)
    model.test_on_batch(x, y)
    warm = counter["n"]
    assert warm <= 10
    for _ in range(10):
        model.train_on_batch(x, y)
        model.test_on_batch(x, y)
    assert counter["n"] == warm


def test_fit_on_an_iterable_builds_once(monkeypatch):
    x, y = data(16)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    counter = count_eval_shape(monkeypatch)
    snapshots = []
    model = make_model()
    model.fit(
        batches,
        epochs=3,
        verbose=0,
        callbacks=[C.LambdaCallback(on_epoch_end=lambda e, l: snapshots.append(counter["n"]))],
    )
    assert len(snapshots) == 3
    assert snapshots[1] == snapshots[2] == snapshots[0]


# --- Argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)],
        lambda x, y: ((x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)),
    ],
    ids=["list", "generator"],
)
def test_fit_refuses_y_with_an_iterable(make):
    x, y = data(16)
    model = make_model()
    with pytest.raises(ValueError) as info:
        model.fit(make(x, y), y, epochs=1, verbose=0)
    message = str(info.value)
    assert "iterable" in message.lower() and re.search(r"\by\b", message), message


def test_class_weight_with_non_integer_keys_is_refused():
    x, y = data(12)
    model = make_model()
    with pytest.raises(ValueError, match="class_weight"):
        model.fit(x, y, epochs=1, verbose=0, class_weight={"a": 1.0})


def test_example_without_batch_axis_is_refused():
    model = make_model()
    model.init(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="batch axis"):
        model.predict(np.zeros(3, np.float32))


# --- Epoch count and randomness -------------------------------------------------------------


def test_successive_fits_continue_the_epoch_count():
    x, y = data(20)
    a, b = make_model(seed=3), make_model(seed=3)
    a.fit(x, y, epochs=1, batch_size=5, verbose=0, steps_per_execution=1)
    a.fit(x, y, epochs=1, batch_size=5, verbose=0, steps_per_execution=1)
    b.fit(x, y, epochs=2, batch_size=5, verbose=0, steps_per_execution=1)
    assert a.step == b.step == 8
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(a.params), host(b.params))


def test_inference_draws_a_key_per_batch_reproducibly():
    def noisy(x):
        return x + jax.random.normal(hk.next_rng_key(), x.shape)

    model = hkfit.Model(noisy, loss="mse")
    x = np.zeros((64, 2), np.float32)
    first = model.predict(x, batch_size=32)
    assert not np.allclose(first[0], first[32])
    np.testing.assert_array_equal(model.predict(x, batch_size=32), first)


# --- Checkpoints and learning rate ----------------------------------------------------------


def test_load_with_another_optimizer_restores_weights_with_a_warning(tmp_path):
    x, _ = data(16)
    y = np.zeros((16, 3), np.float32)
    saver = hkfit.Model(forward, loss="mse", optimizer=optax.adam(1e-3))
    saver.fit(x, y, epochs=1, batch_size=8, verbose=0)
    saver.save(tmp_path / "m.npz")
    fresh = hkfit.Model(forward, loss="mse")  # "adam": an inject_hyperparams state
    with pytest.warns(UserWarning, match="optimizer"):
        fresh.load(tmp_path / "m.npz")
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(fresh.params), host(saver.params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(fresh.state), host(saver.state))
    np.testing.assert_allclose(fresh.predict(x), saver.predict(x), atol=1e-6)


def test_learning_rate_property():
    x, y = data(16)
    model = make_model(optimizer="adam")
    model.init(x)
    assert model.learning_rate == pytest.approx(1e-3)
    model.learning_rate = 0.0
    before = host(model.params)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(model.params), before)

    plain = make_model(optimizer=optax.adam(1e-3))
    plain.init(x)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        plain.learning_rate
    with pytest.raises(ValueError, match="inject_hyperparams"):
        plain.learning_rate = 0.1
    with pytest.raises(ValueError, match="inject_hyperparams"):
        plain.fit(x, y, epochs=1, verbose=0, callbacks=[C.LearningRateScheduler(lambda epoch: 0.1)])


# --- Host syncs -----------------------------------------------------------------------------


def count_device_get(monkeypatch):
    counter = {"n": 0}
    original = jax.device_get

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(jax, "device_get", counted)
    return counter


def test_evaluate_reads_logs_only_when_needed(monkeypatch):
    x, y = data(100)  # 10 batches of 10
    model = make_model()
    model.init(x)
    model.evaluate(x, y, batch_size=10, verbose=0, steps_per_execution=1)  # compile first
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 100, 10)]
    model.evaluate(batches, verbose=0)
    counter = count_device_get(monkeypatch)
    model.evaluate(x, y, batch_size=10, verbose=0, steps_per_execution=1)
    assert counter["n"] <= 2
    counter["n"] = 0
    model.evaluate(batches, verbose=0)
    assert counter["n"] <= 2


# --- Input dtypes ---------------------------------------------------------------------------


def test_float64_and_int64_inputs_train_without_warnings():
    x, y = data(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hkfit.Model(forward, loss="mse").fit(
            x.astype(np.float64), np.zeros((16, 3)), epochs=1, verbose=0
        )
        make_model().fit(x, y.astype(np.int64), epochs=1, verbose=0)


def test_bfloat16_nan_inputs_are_refused():
    x = np.array([[np.nan, 1.0]] * 4, dtype=jnp.bfloat16)
    model = hkfit.Model(lambda x: hk.Linear(1)(x), loss="mse")
    with pytest.raises(ValueError):
        model.fit(x, np.zeros((4, 1), np.float32), epochs=1, verbose=0)


# --- Forwards -------------------------------------------------------------------------------


def test_with_is_training_uses_moving_statistics_at_inference():
    def bn(x, is_training):
        x = hk.Linear(4)(x)
        return hk.BatchNorm(True, True, 0.9)(x, is_training)

    transformed = hk.transform_with_state(bn)
    x, _ = data(16)
    y = np.ones((16, 4), np.float32)
    model = hkfit.Model(hkfit.with_is_training(transformed), loss="mse")
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2
    expected, _ = transformed.apply(model.params, model.state, None, x, is_training=False)
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-5)
    batch_stats, _ = transformed.apply(model.params, model.state, None, x, is_training=True)
    assert not np.allclose(model.predict(x), batch_stats, atol=1e-3)


# --- Distribution ---------------------------------------------------------------------------


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_param_sharding_keeps_unmatched_params_replicated(caplog):
    from jax.sharding import PartitionSpec as P

    def two_layers(x):
        return hk.Linear(2, name="head")(jax.nn.relu(hk.Linear(8, name="linear")(x)))

    strategy = hkfit.DataParallel(
        mesh_shape={"data": 4, "model": 2}, param_sharding=[("linear/w", P(None, "model"))]
    )
    x, _ = data(32)
    model = hkfit.Model(two_layers, loss="mse", optimizer="sgd", distribution=strategy)
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        model.fit(
            x,
            np.zeros((32, 2), np.float32),
            epochs=2,
            batch_size=8,
            verbose=0,
            steps_per_execution=2,
        )
    train_compiles = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("Compiling")
        and ("jit(run)" in r.getMessage() or "Compiling run " in r.getMessage())
    ]
    assert len(train_compiles) == 1, train_compiles  # pinned output shardings: once per fit
    assert model.params["head"]["w"].sharding.is_fully_replicated
    assert model.params["head"]["b"].sharding.is_fully_replicated
    split = model.params["linear"]["w"]
    assert not split.sharding.is_fully_replicated
    assert split.addressable_shards[0].data.shape == (4, 4)


# --- Initialization ----------------------------------------------------------------------


def test_a_broken_forward_is_traced_once():
    traces = []

    def broken(x):
        traces.append(1)
        raise RuntimeError("a bug in the forward")

    model = hkfit.Model(broken, loss="mse")
    with pytest.raises(RuntimeError, match="a bug in the forward"):
        model.init(np.zeros((2, 3), np.float32))
    assert len(traces) == 1
