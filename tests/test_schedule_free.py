"""Schedule-free optimizers: inference runs with their evaluation params.

``evaluate``, ``predict``, validation in ``fit``, ``test_on_batch``, ``predict_on_batch``,
model views and ``save_weights`` use ``optax.contrib.schedule_free_eval_params``; ``save``
keeps the training params and optimizer state, so a resumed run is bit-identical.
"""

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 3)).astype(np.float32)
Y = (X @ RNG.normal(size=(3, 2))).astype(np.float32)


def forward(x):
    return hk.Linear(2)(jax.nn.relu(hk.Linear(8)(x)))


def schedule_free():
    return optax.contrib.schedule_free_adamw(learning_rate=0.05, warmup_steps=2)


def fitted(optimizer=schedule_free, epochs=2, **kwargs):
    model = hkfit.Model(forward, loss="mse", optimizer=optimizer(), seed=0)
    model.fit(X, Y, epochs=epochs, batch_size=8, verbose=0, **kwargs)
    return model


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def expected_eval_params(model):
    return optax.contrib.schedule_free_eval_params(model.opt_state, model.params)


@pytest.fixture(scope="module")
def model():
    return fitted()


def test_eval_params_property(model):
    chex.assert_trees_all_close(model.eval_params, expected_eval_params(model))
    differs = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), model.eval_params, model.params
    )
    assert all(jax.tree_util.tree_leaves(differs))


def test_predict_uses_eval_params(model):
    got = model.predict(X, batch_size=16)  # three batches, the last one padded
    expected = model.apply_fn(expected_eval_params(model), model.state, X)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    raw = np.asarray(model.apply_fn(model.params, model.state, X))
    assert np.abs(got - raw).max() > 1e-3
    np.testing.assert_allclose(model.predict_on_batch(X[:5]), expected[:5], rtol=1e-6, atol=1e-6)


def test_predict_on_an_iterable_uses_eval_params(model):
    got = model.predict(iter([X[:16], X[16:]]))
    expected = model.apply_fn(expected_eval_params(model), model.state, X)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_evaluate_uses_eval_params(model):
    y_pred = np.asarray(model.apply_fn(expected_eval_params(model), model.state, X))
    by_hand = float(np.mean((y_pred - Y) ** 2))
    raw = np.asarray(model.apply_fn(model.params, model.state, X))
    assert abs(float(np.mean((raw - Y) ** 2)) - by_hand) > 1e-3
    assert model.evaluate(X, Y, batch_size=16, verbose=0)["loss"] == pytest.approx(by_hand, 1e-5)
    assert model.evaluate([(X, Y)], verbose=0)["loss"] == pytest.approx(by_hand, 1e-5)
    batch = model.test_on_batch(X[:8], Y[:8])["loss"]
    assert batch == pytest.approx(float(np.mean((y_pred[:8] - Y[:8]) ** 2)), 1e-5)


def test_model_view_uses_eval_params(model):
    views = np.stack([X, 2 * X], axis=-1)  # [rows, 3, 2 views]
    got = model.vmap(in_axes=2, out_axes=2).predict(views)
    params = expected_eval_params(model)
    for v in range(2):
        expected = model.apply_fn(params, model.state, views[..., v])
        np.testing.assert_allclose(got[..., v], expected, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(model.vmap(in_axes=2).eval_params, params)


def test_validation_in_fit_uses_eval_params():
    model = hkfit.Model(forward, loss="mse", optimizer=schedule_free(), seed=0)
    history = model.fit(X, Y, epochs=1, batch_size=8, verbose=0, validation_data=(X, Y))
    y_pred = np.asarray(model.apply_fn(expected_eval_params(model), model.state, X))
    by_hand = float(np.mean((y_pred - Y) ** 2))
    assert history.history["val_loss"][0] == pytest.approx(by_hand, 1e-5)


def test_save_weights_writes_eval_params(model, tmp_path):
    path = tmp_path / "weights.npz"
    model.save_weights(path)
    fresh = hkfit.Model(forward, loss="mse", optimizer="sgd", seed=1).load_weights(path)
    chex.assert_trees_all_close(fresh.params, expected_eval_params(model))
    expected = model.apply_fn(expected_eval_params(model), model.state, X)
    np.testing.assert_allclose(fresh.predict(X), expected, rtol=1e-6, atol=1e-6)


def test_save_load_resume_is_bit_identical(tmp_path):
    clean = fitted(epochs=3)

    first = fitted(epochs=1)
    first.save(tmp_path / "model.npz")
    resumed = hkfit.Model(forward, loss="mse", optimizer=schedule_free(), seed=0)
    resumed.load(tmp_path / "model.npz")  # training params and optimizer state
    chex.assert_trees_all_equal(host(resumed.params), host(first.params))
    resumed.fit(X, Y, epochs=3, initial_epoch=1, batch_size=8, verbose=0)

    assert resumed.step == clean.step
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))
    chex.assert_trees_all_equal(host(resumed.opt_state), host(clean.opt_state))
    np.testing.assert_array_equal(resumed.predict(X), clean.predict(X))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_other_optimizers_unaffected(optimizer, tmp_path):
    model = fitted(lambda: hkfit.optimizers.get(optimizer), epochs=1)
    assert model.eval_params is model.params
    expected = model.apply_fn(model.params, model.state, X)
    np.testing.assert_allclose(model.predict(X), expected, rtol=1e-6, atol=1e-6)
    loss = float(np.mean((np.asarray(expected) - Y) ** 2))
    assert model.evaluate(X, Y, verbose=0)["loss"] == pytest.approx(loss, 1e-5)
    model.save_weights(tmp_path / "weights.npz")
    fresh = hkfit.Model(forward, loss="mse", optimizer="sgd").load_weights(tmp_path / "weights.npz")
    chex.assert_trees_all_equal(host(fresh.params), host(model.params))


def test_restore_best_weights_restores_the_best_eval_params():
    """The evaluation params depend on the optimizer state: it is restored with them."""
    model = hkfit.Model(forward, loss="mse", optimizer=schedule_free(), seed=0)
    snapshots = []

    def on_epoch_end(epoch, logs):
        logs["score"] = [0.0, 1.0, 2.0][epoch]  # epoch 0 is the best
        snapshots.append(host(model.eval_params))

    stop = hkfit.callbacks.EarlyStopping(
        monitor="score", mode="min", patience=5, restore_best_weights=True
    )
    record = hkfit.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)
    model.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[record, stop])
    chex.assert_trees_all_close(host(model.eval_params), snapshots[0], atol=1e-6)
    assert not np.allclose(snapshots[0]["linear"]["w"], snapshots[2]["linear"]["w"])


def test_load_weights_into_a_schedule_free_model(model, tmp_path):
    """Its optimizer state restarts at the loaded params, so predict uses exactly them."""
    model.save_weights(tmp_path / "weights.npz")
    fresh = hkfit.Model(forward, loss="mse", optimizer=schedule_free(), seed=1)
    fresh.load_weights(tmp_path / "weights.npz")
    chex.assert_trees_all_close(fresh.eval_params, expected_eval_params(model), atol=1e-6)
    expected = model.apply_fn(expected_eval_params(model), model.state, X)
    np.testing.assert_allclose(fresh.predict(X), expected, rtol=1e-5, atol=1e-5)
    fresh.fit(X, Y, epochs=1, batch_size=8, verbose=0)  # and fine-tunes from there
    assert fresh.step == 5
