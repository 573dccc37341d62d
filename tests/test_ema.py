"""Weight averaging, ``Model(ema=...)``: an EMA of the params kept in the optimizer state.

The average is updated inside the compiled step (fused and data-parallel runs agree with
step-by-step ones), checkpointed with the optimizer state, and used for inference unless
``model.use_ema_for_inference`` is False.
"""

import chex
import haiku as hk
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import hkfit
from hkfit import _ema as ema_lib

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 3)).astype(np.float32)
Y = (X @ RNG.normal(size=(3, 2))).astype(np.float32)


def forward(x):
    return hk.Linear(2)(jax.nn.relu(hk.Linear(8)(x)))


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def make(ema=0.9, optimizer="sgd", seed=0, **kwargs):
    return hkfit.Model(forward, loss="mse", optimizer=optimizer, ema=ema, seed=seed, **kwargs)


def fitted(epochs=2, ema=0.9, optimizer="sgd", fit_kwargs=None, **kwargs):
    model = make(ema, optimizer, **kwargs)
    model.fit(X, Y, epochs=epochs, batch_size=8, verbose=0, **(fit_kwargs or {}))
    return model


def by_hand(iterates, decay, debias):
    """The average of the params after each step, in float64."""
    average = None
    for t, params in enumerate(iterates, start=1):
        if debias:
            weight = (1 - decay) / (1 - decay**t)
        else:
            weight = 1.0 if t == 1 else 1 - decay
        params = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), params)
        average = (
            params
            if average is None
            else jax.tree_util.tree_map(lambda a, p: (1 - weight) * a + weight * p, average, params)
        )
    return average


@pytest.fixture(scope="module")
def model():
    return fitted()


# --- the average ------------------------------------------------------------------------


@pytest.mark.parametrize("debias", [True, False])
def test_average_equals_the_hand_computed_one(debias):
    model = make(hkfit.EMA(0.8, debias=debias), optimizer=optax.sgd(0.1))
    model.init(X[:8])
    chex.assert_trees_all_equal(host(model.ema_params), host(model.params))  # before a step
    iterates = []
    for b in range(5):
        model.train_on_batch(X[8 * b : 8 * b + 8], Y[8 * b : 8 * b + 8])
        iterates.append(host(model.params))
        if b == 0:  # after one step both forms are exactly the params of that step
            chex.assert_trees_all_equal(host(model.ema_params), iterates[0])
    assert int(model.opt_state.steps) == 5
    chex.assert_trees_all_close(host(model.ema_params), by_hand(iterates, 0.8, debias), rtol=1e-5)


def test_training_is_unchanged_and_no_ema_is_the_default(model):
    plain, averaged = fitted(ema=None), model
    assert plain.ema is None and averaged.ema == hkfit.EMA(0.9)
    assert ema_lib.average(plain.opt_state) is None
    assert plain.eval_params is plain.params
    chex.assert_trees_all_equal(host(averaged.params), host(plain.params))
    chex.assert_trees_all_equal(host(averaged.opt_state.inner_state), host(plain.opt_state))
    with pytest.raises(ValueError, match=r"ema=0\.999"):
        _ = plain.ema_params


def test_fused_equals_step_by_step_bit_for_bit():
    one = fitted(epochs=2, fit_kwargs={"steps_per_execution": 1})
    fused = fitted(epochs=2, fit_kwargs={"steps_per_execution": 4})  # 5 steps: 4 + 1
    assert fused.step == one.step == 10
    chex.assert_trees_all_equal(host(fused.params), host(one.params))
    chex.assert_trees_all_equal(host(fused.opt_state), host(one.opt_state))


def test_data_parallel_equals_one_device(model):
    distribution = hkfit.DataParallel(
        mesh_shape={"data": 4, "model": 2},
        param_sharding=[(r"^linear/w$", P(None, "model"))],
        data_placement="replicated",
    )
    one, dp = model, fitted(distribution=distribution)
    w, average = dp.params["linear"]["w"], dp.ema_params["linear"]["w"]
    assert average.sharding.is_equivalent_to(w.sharding, 2)  # laid out like its parameter
    assert average.addressable_shards[0].data.shape == (8, 1)  # w: [8, 2]
    assert dp.step == one.step
    chex.assert_trees_all_close(host(dp.ema_params), host(one.ema_params), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(host(dp.params), host(one.params), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dp.predict(X), one.predict(X), rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_updates_the_average_once_per_step():
    big_batches = make()
    big_batches.fit(X, Y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    accumulated = make()
    accumulated.fit(
        X, Y, epochs=1, batch_size=8, shuffle=False, verbose=0, gradient_accumulation_steps=2
    )
    assert accumulated.step == big_batches.step == 3  # 16 + 16 + 8 rows
    assert int(accumulated.opt_state.steps) == 3
    chex.assert_trees_all_close(
        host(accumulated.ema_params), host(big_batches.ema_params), rtol=1e-5, atol=1e-6
    )


# --- inference --------------------------------------------------------------------------


def test_inference_uses_the_average_by_default(model):
    average = host(model.ema_params)
    assert model.use_ema_for_inference
    chex.assert_trees_all_equal(host(model.eval_params), average)
    expected = np.asarray(model.apply_fn(average, model.state, X))
    raw = np.asarray(model.apply_fn(model.params, model.state, X))
    assert np.abs(expected - raw).max() > 1e-3
    np.testing.assert_allclose(model.predict(X, batch_size=16), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.predict_on_batch(X[:5]), expected[:5], rtol=1e-6, atol=1e-6)
    loss = float(np.mean((expected - Y) ** 2))
    assert model.evaluate(X, Y, batch_size=16, verbose=0)["loss"] == pytest.approx(loss, 1e-5)
    batch = float(np.mean((expected[:8] - Y[:8]) ** 2))
    assert model.test_on_batch(X[:8], Y[:8])["loss"] == pytest.approx(batch, 1e-5)
    views = np.stack([X, 2 * X], axis=-1)
    got = model.vmap(in_axes=2, out_axes=2).predict(views)
    np.testing.assert_allclose(got[..., 1], model.apply_fn(average, model.state, 2 * X), atol=1e-6)


def test_the_switch_uses_the_raw_params(model):
    try:
        model.use_ema_for_inference = False
        assert model.eval_params is model.params
        raw = np.asarray(model.apply_fn(model.params, model.state, X))
        np.testing.assert_allclose(model.predict(X), raw, rtol=1e-6, atol=1e-6)
        loss = float(np.mean((raw - Y) ** 2))
        assert model.evaluate(X, Y, verbose=0)["loss"] == pytest.approx(loss, 1e-5)
        view = model.vmap(in_axes=2, out_axes=2)  # a view follows its model
        got = view.predict(np.stack([X, X], axis=-1))
        np.testing.assert_allclose(got[..., 0], raw, rtol=1e-6, atol=1e-6)
    finally:
        model.use_ema_for_inference = True
    with pytest.raises(TypeError, match="use_ema_for_inference"):
        model.use_ema_for_inference = "no"


def test_validation_in_fit_uses_the_average():
    model = make()
    history = model.fit(X, Y, epochs=1, batch_size=8, verbose=0, validation_data=(X, Y))
    y_pred = np.asarray(model.apply_fn(model.ema_params, model.state, X))
    loss = float(np.mean((y_pred - Y) ** 2))
    assert history.history["val_loss"][0] == pytest.approx(loss, 1e-5)


# --- saving -----------------------------------------------------------------------------


def test_save_load_resume_is_bit_identical(tmp_path):
    clean = fitted(epochs=1, optimizer="adam")
    clean.save(tmp_path / "model.npz")
    resumed = make(optimizer="adam").load(tmp_path / "model.npz")
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))
    chex.assert_trees_all_equal(host(resumed.ema_params), host(clean.ema_params))
    assert not np.allclose(resumed.ema_params["linear"]["w"], resumed.params["linear"]["w"])
    clean.fit(X, Y, epochs=3, initial_epoch=1, batch_size=8, verbose=0)
    resumed.fit(X, Y, epochs=3, initial_epoch=1, batch_size=8, verbose=0)
    assert resumed.step == clean.step
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))
    chex.assert_trees_all_equal(host(resumed.opt_state), host(clean.opt_state))
    np.testing.assert_array_equal(resumed.predict(X), clean.predict(X))


def test_save_weights_writes_the_average(model, tmp_path):
    path = tmp_path / "weights.npz"
    model.save_weights(path)
    fresh = hkfit.Model(forward, loss="mse", optimizer="sgd", seed=1).load_weights(path)
    chex.assert_trees_all_equal(host(fresh.params), host(model.ema_params))
    np.testing.assert_allclose(fresh.predict(X), model.predict(X), rtol=1e-6, atol=1e-6)
    # Into a model with `ema`: the average restarts at the loaded params.
    averaged = make(seed=1).load_weights(path)
    chex.assert_trees_all_equal(host(averaged.ema_params), host(model.ema_params))
    chex.assert_trees_all_equal(host(averaged.params), host(model.ema_params))
    assert int(averaged.opt_state.steps) == 0
    averaged.fit(X, Y, epochs=1, batch_size=8, verbose=0)  # and fine-tunes from there
    assert int(averaged.opt_state.steps) == 5


def test_a_checkpoint_without_an_average_starts_one_at_its_params(tmp_path):
    plain = hkfit.Model(forward, loss="mse", optimizer="sgd").init(X)
    plain.save(tmp_path / "plain.npz")
    with pytest.warns(UserWarning, match="optimizer state starts fresh"):
        averaged = make().load(tmp_path / "plain.npz")
    chex.assert_trees_all_equal(host(averaged.params), host(plain.params))
    chex.assert_trees_all_equal(host(averaged.ema_params), host(plain.params))


def test_restore_best_weights_restores_params_and_average_together():
    model = make()
    snapshots = []

    def on_epoch_end(epoch, logs):
        logs["score"] = [0.0, 1.0, 2.0][epoch]  # epoch 0 is the best
        snapshots.append(host((model.params, model.ema_params)))

    stop = hkfit.callbacks.EarlyStopping(
        monitor="score", mode="min", patience=5, restore_best_weights=True
    )
    record = hkfit.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)
    model.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[record, stop])
    chex.assert_trees_all_equal(host((model.params, model.ema_params)), snapshots[0])
    assert not np.allclose(snapshots[0][1]["linear"]["w"], snapshots[2][1]["linear"]["w"])


# --- optimizers through the wrapper -----------------------------------------------------


def test_learning_rate_helpers_see_through_the_wrapper():
    model = fitted(epochs=1)
    assert model.learning_rate == pytest.approx(0.01)
    assert hkfit.optimizers.learning_rates(model.opt_state) == {"": pytest.approx(0.01)}
    model.learning_rate = 0.5
    assert isinstance(model.opt_state, ema_lib.EmaState)
    assert hkfit.optimizers.learning_rate(model.opt_state.inner_state) == 0.5
    state = hkfit.optimizers.set_learning_rate(model.opt_state, 0.25)
    assert hkfit.optimizers.learning_rate(state) == 0.25
    history = model.fit(X, Y, epochs=2, initial_epoch=1, batch_size=8, verbose=0)
    assert history.history["learning_rate"] == [0.5]


def test_reduce_lr_on_plateau_and_scheduler():
    model = make()
    plateau = hkfit.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=1e9
    )
    history = model.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[plateau])
    assert history.history["learning_rate"] == pytest.approx([0.01, 0.01, 0.005])
    scheduler = hkfit.callbacks.LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1))
    history = model.fit(
        X, Y, epochs=5, initial_epoch=3, batch_size=8, verbose=0, callbacks=[scheduler]
    )
    assert history.history["learning_rate"] == pytest.approx([0.025, 0.02])


def test_value_reaches_an_inner_reduce_on_plateau():
    def optimizer():
        return optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1))

    plain = fitted(epochs=1, ema=None, optimizer=optimizer())
    averaged = fitted(epochs=1, optimizer=optimizer())
    plateau = averaged.opt_state.inner_state[1]
    assert np.isfinite(float(plateau.best_value))  # it saw the losses
    chex.assert_trees_all_equal(host(averaged.opt_state.inner_state), host(plain.opt_state))
    chex.assert_trees_all_equal(host(averaged.params), host(plain.params))


def test_schedule_free_averages_its_evaluation_params():
    model = make(optimizer=optax.contrib.schedule_free_adamw(0.05, warmup_steps=2))
    model.train_on_batch(X[:8], Y[:8])  # one step: the average is that step's eval params
    inner = model.opt_state.inner_state
    expected = optax.contrib.schedule_free_eval_params(inner, model.params)
    chex.assert_trees_all_close(host(model.ema_params), host(expected), rtol=1e-6)
    model.fit(X, Y, epochs=1, batch_size=8, verbose=0)
    chex.assert_trees_all_equal(host(model.eval_params), host(model.ema_params))
    expected = optax.contrib.schedule_free_eval_params(model.opt_state.inner_state, model.params)
    chex.assert_trees_all_close(
        host(hkfit.optimizers.eval_params(model.opt_state, model.params)), host(expected)
    )
    model.use_ema_for_inference = False  # the optimizer's own evaluation params
    chex.assert_trees_all_close(host(model.eval_params), host(expected))


def test_the_wrapper_needs_params():
    sgd = ema_lib.wrap(optax.sgd(0.1), hkfit.EMA(0.9))
    params = {"w": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="needs `params`"):
        sgd.update(params, sgd.init(params))


# --- bad values -------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [0.0, 1.0, 1, -0.5, 1.5, float("nan"), float("inf")])
def test_a_decay_out_of_range_raises(ema):
    with pytest.raises(
        ValueError, match=r"Expected `ema` to be a decay in \(0, 1\).*Received: ema="
    ):
        make(ema)


@pytest.mark.parametrize("ema", [True, "0.9", [0.9], {"decay": 0.9}])
def test_a_value_of_another_type_raises(ema):
    with pytest.raises(
        TypeError, match=r"Expected `ema` to be a decay in \(0, 1\).*Received: ema="
    ):
        make(ema)


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"`decay`.*Received: decay=2"):
        hkfit.EMA(2)
    with pytest.raises(TypeError, match="debias"):
        hkfit.EMA(0.9, debias="yes")
    assert make(np.float32(0.5)).ema == hkfit.EMA(0.5)


def test_a_custom_train_step_refuses_ema():
    def train_step(ts, batch):
        return ts, {}

    with pytest.raises(ValueError, match="train_step"):
        hkfit.Model(forward, train_step=train_step, ema=0.9)


def test_training_continues_from_the_average():
    model = fitted(epochs=1)
    model.params = model.ema_params  # shares no buffer with opt_state: the step donates both
    chex.assert_trees_all_equal(host(model.params), host(model.ema_params))
    model.fit(X, Y, epochs=2, initial_epoch=1, batch_size=8, verbose=0)
    model.params = model.ema_params
    model.train_on_batch(X[:8], Y[:8])
    assert model.step == 11
