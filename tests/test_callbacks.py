"""Tests for the built-in callbacks of hkfit.callbacks and optimizers.set_learning_rate.

Callback logic is tested with a small fake model (no compilation); end-to-end behaviour
uses one shared, already-compiled Model so the file stays fast.
"""

import csv
import logging
import os
import struct

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit
from hkfit import callbacks as C
from hkfit import checkpoint, optimizers


def counting_loss(y_true, y_pred):
    return optax.softmax_cross_entropy_with_integer_labels(y_pred, y_true)


def compilations(caplog, run):
    """How many XLA compilations ``run()`` triggers, besides the small helper ops that
    set a learning rate or place restored arrays (compiled once per shape)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        run()
    helpers = ("_where", "_adopt_all")  # logged as "jit(_where)" on JAX >= 0.7, "_where" before
    return sum(
        r.getMessage().startswith("Compiling")
        and not any(
            f"Compiling {h} " in r.getMessage() or f"jit({h})" in r.getMessage() for h in helpers
        )
        for r in caplog.records
    )


def forward(x, is_training):
    h = jax.nn.relu(hk.Linear(6)(x))
    h = hk.BatchNorm(True, True, 0.9)(h, is_training)
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.2, h)
    return hk.Linear(3)(h)


X = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
Y = np.arange(32) % 3


@pytest.fixture(scope="module")
def model():
    """One compiled model shared by the end-to-end tests (each sets what it relies on)."""
    return hkfit.Model(forward, loss=counting_loss, optimizer="sgd", metrics=["accuracy"], seed=0)


def fit(model, callbacks, epochs=3, **kwargs):
    kwargs.setdefault("validation_split", 0.25)
    return model.fit(X, Y, epochs=epochs, batch_size=8, verbose=0, callbacks=callbacks, **kwargs)


def inject(values, key="fake"):
    """A callback putting ``values[epoch]`` into the epoch logs under ``key``."""
    return C.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update({key: values[epoch]}))


def host_copy(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a, copy=True), tree)


class Snapshots(C.Callback):
    """Host copies of (params, state) at every epoch end."""

    def __init__(self):
        super().__init__()
        self.at = {}

    def on_epoch_end(self, epoch, logs=None):
        self.at[epoch] = host_copy((self.model.params, self.model.state))


def weights_of(model):
    return host_copy((model.params, model.state))


class FakeModel:
    """What callbacks touch on a model, with a params leaf that records the epoch."""

    def __init__(self, learning_rate=1.0):
        self.stop_training = False
        self.built = True
        self.params = {"w": jnp.zeros(2)}
        self.state = {"s": jnp.zeros(1)}
        self.optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
        self.opt_state = self.optimizer.init(self.params)

    @property
    def learning_rate(self):  # as hkfit.Model's: read from the injected hyperparameters
        value = optimizers.learning_rate(self.opt_state)
        if value is None:
            raise ValueError(optimizers.NO_LEARNING_RATE)
        return value

    @learning_rate.setter
    def learning_rate(self, value):
        self.opt_state = optimizers.set_learning_rate(self.opt_state, value)


def drive(callback, values, monitor="val_loss", fake=None):
    """Runs ``callback`` like fit does over epochs with ``values`` of ``monitor``.

    Returns the epochs run and the learning rate in effect during each.
    """
    fake = fake or FakeModel()
    callback.set_model(fake)
    callback.on_train_begin()
    ran, rates = [], []
    for epoch, value in enumerate(values):
        fake.params = {"w": jnp.full(2, float(epoch))}
        fake.state = {"s": jnp.full(1, float(epoch))}
        callback.on_epoch_begin(epoch)
        rates.append(optimizers.learning_rate(fake.opt_state))
        callback.on_epoch_end(epoch, {monitor: value})
        ran.append(epoch)
        if fake.stop_training:
            break
    callback.on_train_end()
    return ran, rates, fake


# --- EarlyStopping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, kwargs, stopped, best_epoch",
    [
        ([5, 4, 3, 3.5, 3.6, 3.7, 2], dict(patience=2), 4, 2),
        ([5, 4, 3, 3.5], dict(patience=10), 0, 2),
        ([1.0, 0.95, 0.9], dict(patience=1, min_delta=0.1), 1, 0),
        ([1, 1, 1, 1], dict(patience=2), 2, 0),
        ([1, 1, 1, 1], dict(patience=2, baseline=0.5), 1, 0),
        ([1, 9, 5, 6], dict(patience=1), 1, 0),
        ([1, 9, 5, 6], dict(patience=1, start_from_epoch=2), 3, 2),
    ],
)
def test_early_stopping_logic(values, kwargs, stopped, best_epoch):
    es = C.EarlyStopping(restore_best_weights=True, **kwargs)
    ran, _, fake = drive(es, values)
    assert es.stopped_epoch == stopped
    assert ran[-1] == (stopped if stopped else len(values) - 1)
    assert es.best_epoch == best_epoch
    assert float(fake.params["w"][0]) == best_epoch and float(fake.state["s"][0]) == best_epoch


def test_early_stopping_mode_auto_maximizes_accuracy():
    es = C.EarlyStopping(monitor="val_accuracy", patience=1)
    assert es.mode == "max"
    ran, _, _ = drive(es, [0.1, 0.5, 0.4, 0.3], monitor="val_accuracy")
    assert ran == [0, 1, 2] and es.best == 0.5


def test_early_stopping_without_restore_keeps_last_weights():
    ran, _, fake = drive(C.EarlyStopping(patience=1), [1, 2, 3])
    assert ran == [0, 1] and float(fake.params["w"][0]) == 1


def test_early_stopping_missing_monitor_warns_once():
    es = C.EarlyStopping(monitor="val_nope")
    with pytest.warns(UserWarning, match="val_nope") as record:
        drive(es, [1, 2, 3], monitor="loss")
    assert len(record) == 1 and es.stopped_epoch == 0


def test_early_stopping_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        C.EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="patience"):
        C.EarlyStopping(patience=-1)


@pytest.mark.parametrize(
    "values, epochs_run, stopped, best",
    [
        ([3, 2, 1.5, 2.5, 2.6, 2.7, 2.8, 2.9], 5, 4, 2),  # stops at epoch 4
        ([3, 2, 1.5, 2.5], 4, 0, 2),  # never stops: still restored
    ],
)
def test_early_stopping_restores_real_weights(model, values, epochs_run, stopped, best):
    snaps = Snapshots()
    es = C.EarlyStopping(monitor="fake", patience=2, restore_best_weights=True)
    history = fit(model, [inject(values), snaps, es], epochs=len(values))
    assert len(history.epoch) == epochs_run and es.stopped_epoch == stopped
    assert es.best_epoch == best
    chex.assert_trees_all_equal(weights_of(model), snaps.at[best])
    assert not jax.tree_util.tree_all(
        jax.tree_util.tree_map(np.array_equal, snaps.at[best], snaps.at[epochs_run - 1])
    )
    model.predict(X[:2])  # the restored buffers are alive (not donated)


# --- ModelCheckpoint -----------------------------------------------------------------------


def test_checkpoint_file_names_from_logs(model, tmp_path):
    pattern = str(tmp_path / "m-{epoch:02d}-{val_loss:.4f}.npz")
    cb = C.ModelCheckpoint(pattern)
    history = fit(model, [cb], epochs=2)
    expected = [
        f"m-{e + 1:02d}-{v:.4f}.npz" for e, v in zip(history.epoch, history.history["val_loss"])
    ]
    assert sorted(os.listdir(tmp_path)) == expected
    assert checkpoint.read(tmp_path / expected[-1])[0]["kind"] == "model"
    assert cb.last_saved == str(tmp_path / expected[-1])


def test_load_does_not_recompile(model, tmp_path, caplog):
    fit(model, [], epochs=1)
    model.save(tmp_path / "m.npz")
    assert compilations(caplog, lambda: (model.load(tmp_path / "m.npz"), fit(model, []))) == 0


def test_checkpoint_best_only_keeps_the_best(model, tmp_path):
    snaps = Snapshots()
    cb = C.ModelCheckpoint(
        str(tmp_path / "best-{epoch}.npz"),
        monitor="fake",
        save_best_only=True,
        save_weights_only=True,
    )
    fit(model, [inject([3, 1, 2, 0.5]), snaps, cb], epochs=4)
    assert sorted(os.listdir(tmp_path)) == ["best-1.npz", "best-2.npz", "best-4.npz"]
    assert checkpoint.read(tmp_path / "best-4.npz")[0]["kind"] == "weights"
    single = C.ModelCheckpoint(str(tmp_path / "single.npz"), monitor="fake", save_best_only=True)
    fit(model, [inject([3, 1, 2, 4]), snaps, single], epochs=4)
    restored = hkfit.Model(forward, loss=counting_loss, optimizer="sgd").load(
        tmp_path / "single.npz"
    )
    chex.assert_trees_all_equal(weights_of(restored), snaps.at[1])
    assert restored.epoch == 2


def test_checkpoint_every_n_batches(model, tmp_path):
    cb = C.ModelCheckpoint(str(tmp_path / "e{epoch}-b{batch}.npz"), save_freq=2)
    fit(model, [cb], epochs=2, steps_per_execution=1)  # 3 batches per epoch
    assert sorted(os.listdir(tmp_path)) == ["e1-b2.npz", "e2-b1.npz", "e2-b3.npz"]


def test_checkpoint_bad_placeholder_and_freq(model, tmp_path):
    with pytest.raises(ValueError, match="val_auc"):
        fit(model, [C.ModelCheckpoint(str(tmp_path / "{val_auc}.npz"))], epochs=1)
    with pytest.raises(ValueError, match="save_freq"):
        C.ModelCheckpoint("x.npz", save_freq=0)


# --- CSVLogger -----------------------------------------------------------------------------


def read_csv(path, separator=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=separator))


def test_csv_logger_rows_equal_history(model, tmp_path):
    path = tmp_path / "log.csv"
    history = fit(model, [C.CSVLogger(path, separator=";")], epochs=2)
    rows = read_csv(path, ";")
    keys = sorted(history.history)
    assert rows[0] == ["epoch", *keys] and "learning_rate" in keys
    for row, epoch in zip(rows[1:], history.epoch):
        assert int(row[0]) == epoch
        assert [float(v) for v in row[1:]] == [history.history[k][epoch] for k in keys]
    assert len(rows) == 3


def test_csv_logger_append_and_late_columns(model, tmp_path):
    path = tmp_path / "log.csv"
    fit(model, [C.CSVLogger(path)], epochs=3, validation_freq=2)
    rows = read_csv(path)
    assert "val_loss" in rows[0]
    column = rows[0].index("val_loss")
    assert [r[column] for r in rows[1:]][0::2] == ["NA", "NA"] and rows[2][column] != "NA"
    fit(model, [C.CSVLogger(path, append=True)], epochs=5, initial_epoch=3)
    rows = read_csv(path)
    assert [r[0] for r in rows] == ["epoch", "0", "1", "2", "3", "4"]


# --- TensorBoard ---------------------------------------------------------------------------


def read_scalars(run_dir):
    """{tag: [(step, value)]} from the TFRecord event files of one run."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for name in sorted(os.listdir(run_dir)):
        with open(os.path.join(run_dir, name), "rb") as f:
            raw = f.read()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset : offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_writes_train_and_validation_runs(model, tmp_path):
    history = fit(model, [C.TensorBoard(tmp_path)], epochs=2)
    train = read_scalars(tmp_path / "train")
    validation = read_scalars(tmp_path / "validation")
    assert set(train) == {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"}
    assert set(validation) == {"epoch_loss", "epoch_accuracy"}
    as32 = lambda values: [(e, float(np.float32(v))) for e, v in zip(history.epoch, values)]
    assert train["epoch_loss"] == as32(history.history["loss"])
    assert train["epoch_learning_rate"] == as32(history.history["learning_rate"])
    assert validation["epoch_loss"] == as32(history.history["val_loss"])


def test_tensorboard_without_tensorboardx_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "tensorboardX", None)
    with pytest.raises(ImportError, match=r"pip install hkfit\[tensorboard\]"):
        C.TensorBoard(tmp_path)


# --- TerminateOnNaN, LambdaCallback --------------------------------------------------------


def test_terminate_on_nan_stops_at_the_bad_batch():
    def log_forward(x):
        return hk.Linear(1)(jnp.log(x))

    x = np.ones((16, 2), np.float32)
    x[5, 0] = -1.0  # finite input, NaN output: in the second batch of 4
    y = np.zeros((16, 1), np.float32)
    model = hkfit.Model(log_forward, loss="mse", optimizer="sgd")
    history = model.fit(
        x,
        y,
        epochs=3,
        batch_size=4,
        shuffle=False,
        verbose=0,
        steps_per_execution=1,
        callbacks=[C.TerminateOnNaN()],
    )
    assert model.step == 2 and history.epoch == [0]
    assert np.isnan(history.history["loss"][0])


def test_lambda_callback_calls_every_hook(model):
    calls = []
    record = lambda name: lambda *args: calls.append((name, *args))
    names = [n for n in C.base.HOOKS]
    cb = C.LambdaCallback(**{n: record(n) for n in names})
    assert cb.wants_batch_logs()
    fit(model, [cb], epochs=1, steps_per_execution=4)
    model.evaluate(X, Y, batch_size=8, verbose=0, callbacks=[cb])
    model.predict(X, batch_size=8, callbacks=[cb])
    seen = [c[0] for c in calls]
    assert set(seen) == set(names)
    epoch_end = next(c for c in calls if c[0] == "on_epoch_end")
    assert epoch_end[1] == 0 and "loss" in epoch_end[2] and "val_loss" in epoch_end[2]
    assert next(c for c in calls if c[0] == "on_train_begin") == ("on_train_begin", {})  # as Keras
    assert [c[1] for c in calls if c[0] == "on_train_batch_end"] == [2]  # 3 batches, one call


def test_lambda_callback_rejects_unknown_and_non_callables():
    with pytest.raises(TypeError, match="on_epoch_finish"):
        C.LambdaCallback(on_epoch_finish=print)
    with pytest.raises(TypeError, match="on_epoch_end"):
        C.LambdaCallback(on_epoch_end=3)
    assert not C.LambdaCallback(on_epoch_end=print).wants_batch_logs()


# --- Learning rate -------------------------------------------------------------------------


class SetLearningRateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_pure_and_keeps_dtype(self):
        optimizer = optax.chain(
            optax.clip(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
        )
        state = optimizer.init({"w": jnp.zeros(3)})
        new = self.variant(optimizers.set_learning_rate)(state, 0.25)
        assert optimizers.learning_rate(new) == 0.25
        assert optimizers.learning_rate(state) == pytest.approx(0.1)
        lr = new[1].hyperparams["learning_rate"]
        assert lr.dtype == jnp.float32 and lr.shape == ()
        assert type(new[1]) is type(state[1])
        chex.assert_trees_all_equal(new[1].inner_state, state[1].inner_state)


def test_set_learning_rate_errors():
    with pytest.raises(ValueError, match=r"inject_hyperparams\(optax.adam\)"):
        optimizers.set_learning_rate(optax.adam(1e-3).init({"w": jnp.zeros(2)}), 0.1)
    state = optimizers.get("sgd").init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="learning_rate"):
        optimizers.set_learning_rate(state, -1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        optimizers.set_learning_rate(state, float("nan"))


def test_scheduler_changes_lr_in_history_without_recompiling(model, caplog):
    fit(model, [], epochs=1)  # everything compiled
    histories = []
    scheduler = C.LearningRateScheduler(lambda epoch, lr: 0.01 * (epoch + 1))
    assert compilations(caplog, lambda: histories.append(fit(model, [scheduler]))) == 0
    assert histories[0].history["learning_rate"] == [float(np.float32(0.01 * k)) for k in (1, 2, 3)]
    one_arg = fit(model, [C.LearningRateScheduler(lambda epoch: 0.5**epoch)], epochs=3)
    assert one_arg.history["learning_rate"] == [1.0, 0.5, 0.25]


def test_scheduler_on_iterable_source_with_fresh_model():
    def batches():
        for i in range(0, 32, 8):
            yield X[i : i + 8], Y[i : i + 8]

    fresh = hkfit.Model(
        hk.transform(lambda x: hk.Linear(3)(x)),
        loss="sparse_categorical_crossentropy",
        optimizer="sgd",
    )
    history = fresh.fit(
        _Reiterable(batches),
        epochs=2,
        verbose=0,
        callbacks=[C.LearningRateScheduler(lambda epoch, lr: 0.125 * (epoch + 1))],
    )
    assert history.history["learning_rate"] == [0.125, 0.25]


class _Reiterable:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


def test_scheduler_errors(model):
    with pytest.raises(ValueError, match="schedule"):
        fit(model, [C.LearningRateScheduler(lambda epoch, lr: "fast")], epochs=1)
    with pytest.raises(TypeError, match="schedule"):
        C.LearningRateScheduler(0.1)
    fake = FakeModel()
    fake.opt_state = optax.sgd(0.1).init(fake.params)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        drive(C.LearningRateScheduler(lambda epoch, lr: lr), [1], fake=fake)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        drive(C.ReduceLROnPlateau(patience=0), [1, 2], fake=fake)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(patience=2), [1, 1, 1, 0.5, 0.5, 0.25]),
        (dict(patience=1), [1, 1, 0.5, 0.25, 0.125, 0.0625]),
        (dict(patience=1, cooldown=2), [1, 1, 0.5, 0.5, 0.25, 0.25]),
        (dict(patience=2, min_lr=0.3), [1, 1, 1, 0.5, 0.5, 0.3]),
    ],
)
def test_reduce_lr_on_plateau_logic(kwargs, expected):
    cb = C.ReduceLROnPlateau(factor=0.5, **kwargs)
    _, rates, _ = drive(cb, [5] * 6)
    assert rates == pytest.approx(expected)


def test_reduce_lr_on_plateau_in_history(model):
    fit(model, [C.LearningRateScheduler(lambda epoch, lr: 0.5)], epochs=1)
    cb = C.ReduceLROnPlateau(monitor="fake", factor=0.5, patience=1, min_delta=0)
    history = fit(model, [inject([3, 2, 2, 2]), cb], epochs=4)
    assert history.history["learning_rate"] == [0.5, 0.5, 0.5, 0.25]
    with pytest.raises(ValueError, match="factor"):
        C.ReduceLROnPlateau(factor=1.5)


def test_history_records_what_callbacks_add_to_epoch_logs(model):
    """As in Keras, History runs after the user's callbacks."""

    class AddsAScore(hkfit.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = 10.0 + epoch

    history = fit(model, [AddsAScore()], epochs=2)
    assert history.history["score"] == [10.0, 11.0]


def test_memory_usage_logs_peak_memory(model):
    history = fit(model, [hkfit.callbacks.MemoryUsage()], epochs=2)
    rss = history.history["rss_peak_mb"]
    assert len(rss) == 2 and all(10 < value < 100_000 for value in rss)  # a Python process
    # the CPU backend reports no device statistics; other backends add device_peak_mb
    reported = hkfit.callbacks.memory.device_peak_bytes() is not None
    assert ("device_peak_mb" in history.history) == reported
