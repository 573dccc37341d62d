"""Model: fit / evaluate / predict semantics, determinism, traces, forwards and progress."""

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit
from hkfit import losses
from hkfit import step as step_lib


def mlp(x, is_training):
    x = jax.nn.relu(hk.Linear(16)(x))
    if is_training:
        x = hk.dropout(hk.next_rng_key(), 0.1, x)
    return hk.Linear(3)(x)


def bn_mlp(x, is_training):
    x = hk.Linear(16)(x)
    x = hk.BatchNorm(True, True, 0.9)(x, is_training)
    return hk.Linear(3)(jax.nn.relu(x))


def make_data(n=50, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.argmax(x[:, :classes], axis=1)).astype(np.int32)
    return x, y


def make_model(forward=mlp, **kwargs):
    kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    kwargs.setdefault("optimizer", optax.adam(1e-2))
    kwargs.setdefault("metrics", ["accuracy"])
    return hkfit.Model(forward, **kwargs)


def copy_tree(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


# --- fit ---------------------------------------------------------------------------------


def test_fit_learns_and_returns_history():
    x, y = make_data(200)
    model = make_model()
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0, validation_split=0.2)
    assert isinstance(history, hkfit.History)
    assert history is model.history
    assert history.epoch == list(range(8))
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(isinstance(v, float) for v in history.history["loss"])
    assert history.history["loss"][-1] < history.history["loss"][0] * 0.7
    assert history.history["accuracy"][-1] > 0.8
    assert model.step == 8 * 10  # 160 training rows / 16


def test_same_seed_same_data_gives_bit_identical_params():
    x, y = make_data(64)
    a, b = make_model(seed=3), make_model(seed=3)
    ha = a.fit(x, y, epochs=3, batch_size=10, verbose=0)
    hb = b.fit(x, y, epochs=3, batch_size=10, verbose=0)
    chex.assert_trees_all_equal(a.params, b.params)
    assert ha.history == hb.history
    c = make_model(seed=4)
    c.fit(x, y, epochs=3, batch_size=10, verbose=0)
    assert not np.array_equal(a.params["linear"]["w"], c.params["linear"]["w"])


def test_seed_may_be_a_jax_key():
    x, y = make_data(20)
    a = make_model(seed=jax.random.key(5))
    b = make_model(seed=jax.random.PRNGKey(5))
    a.fit(x, y, epochs=1, verbose=0)
    b.fit(x, y, epochs=1, verbose=0)
    chex.assert_trees_all_equal(a.params, b.params)


@pytest.mark.parametrize("k", [3, 7])
def test_steps_per_execution_does_not_change_results(k):
    x, y = make_data(61)  # 61 = 6 * 10 + 1: an uneven tail
    a, b = make_model(seed=1), make_model(seed=1)
    ha = a.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=k)
    hb = b.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=1)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-6)
    assert a.step == b.step == 2 * 7


def test_fused_auto_matches_explicit_fusion_bitwise():
    x, y = make_data(61)
    a, b = make_model(seed=1), make_model(seed=1)
    a.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution="auto")
    b.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=2)
    chex.assert_trees_all_equal(a.params, b.params)


def test_initial_epoch_and_epochs_count_as_in_keras():
    x, y = make_data(20)
    model = make_model()
    history = model.fit(x, y, epochs=5, initial_epoch=2, verbose=0)
    assert history.epoch == [2, 3, 4]
    assert model.fit(x, y, epochs=2, initial_epoch=2, verbose=0).epoch == []


def test_epoch_loss_is_exact_weighted_mean_of_batch_losses():
    # With lr=0 nothing changes, so the epoch loss must equal the full-data mean loss.
    x, y = make_data(37)
    w = np.linspace(0.5, 2.0, 37).astype(np.float32)
    model = make_model(forward=lambda x: hk.Linear(3)(x), optimizer=optax.sgd(0.0))
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0, sample_weight=w)
    per_example = losses.sparse_categorical_crossentropy(
        y, model.apply_fn(model.params, model.state, x)
    )
    expected = float(np.sum(w * per_example) / np.sum(w))
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)


def test_class_weight_equals_matching_sample_weight():
    x, y = make_data(40)
    cw = {0: 2.0, 1: 0.5, 2: 1.0}
    a, b = make_model(seed=2), make_model(seed=2)
    a.fit(x, y, epochs=2, batch_size=8, verbose=0, class_weight=cw)
    b.fit(
        x,
        y,
        epochs=2,
        batch_size=8,
        verbose=0,
        sample_weight=np.array([cw[int(c)] for c in y], np.float32),
    )
    chex.assert_trees_all_close(a.params, b.params, atol=1e-6)


def test_validation_split_takes_the_last_rows_before_shuffling():
    x, y = make_data(50)
    model = make_model(optimizer=optax.sgd(0.0))
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0, validation_split=0.2)
    expected = model.evaluate(x[40:], y[40:], verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][0], expected["loss"], rtol=1e-6)
    assert model.step == 5  # 40 training rows / 8


def test_validation_data_and_validation_freq():
    x, y = make_data(30)
    model = make_model()
    history = model.fit(
        x, y, epochs=4, verbose=0, validation_data=(x[:10], y[:10]), validation_freq=2
    )
    assert len(history.history["loss"]) == 4
    assert len(history.history["val_loss"]) == 2
    history = model.fit(
        x,
        y,
        epochs=3,
        verbose=0,
        validation_data=(x[:10], y[:10], np.ones(10)),
        validation_freq=[1, 3],
    )
    assert len(history.history["val_loss"]) == 2


def test_shuffle_is_seeded_and_differs_per_epoch():
    key = jax.random.key(0)
    first, _ = hkfit._data.epoch_order(key, 0, num_rows=20, batch_size=5, shuffle=True)
    again, _ = hkfit._data.epoch_order(key, 0, num_rows=20, batch_size=5, shuffle=True)
    second, _ = hkfit._data.epoch_order(key, 1, num_rows=20, batch_size=5, shuffle=True)
    other, _ = hkfit._data.epoch_order(
        jax.random.key(1), 0, num_rows=20, batch_size=5, shuffle=True
    )
    plain, tail = hkfit._data.epoch_order(key, 0, num_rows=22, batch_size=5, shuffle=False)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, other)
    assert sorted(np.ravel(first).tolist()) == list(range(20))
    np.testing.assert_array_equal(plain.ravel(), np.arange(20))
    np.testing.assert_array_equal(tail, [[20, 21]])
    padded, none = hkfit._data.epoch_order(
        key, 0, num_rows=22, batch_size=5, shuffle=False, pad_tail=True
    )
    assert none is None and padded.shape == (5, 5)
    np.testing.assert_array_equal(padded[-1], [20, 21, 22, 22, 22])  # 22: zero-weight padding


def test_padded_tail_trains_like_a_short_last_batch():
    # A stateless model pads the last batch into the fused call; BatchNorm models do not.
    x, y = make_data(23)
    deterministic = lambda x: hk.Linear(3)(jax.nn.relu(hk.Linear(16)(x)))  # no dropout draws
    a, b = make_model(deterministic, seed=0), make_model(deterministic, seed=0)
    a.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=2)  # padded tail
    b.fit(x, y, epochs=2, batch_size=10, verbose=0, steps_per_execution=1)  # separate tail call
    assert a.step == b.step == 6
    chex.assert_trees_all_close(a.params, b.params, atol=1e-6, rtol=1e-5)


def test_shuffle_false_trains_in_order():
    x, y = make_data(30)
    a, b = make_model(seed=0), make_model(seed=0)
    a.fit(x, y, epochs=1, batch_size=10, shuffle=False, verbose=0)
    b.init(x)
    for i in range(3):
        b.train_on_batch(x[i * 10 : (i + 1) * 10], y[i * 10 : (i + 1) * 10])
    chex.assert_trees_all_close(a.params, b.params, atol=1e-6)


def test_batchnorm_state_updated_by_fit_untouched_by_evaluate_and_predict():
    x, y = make_data(40)
    model = make_model(forward=bn_mlp)
    model.init(x)
    initial = copy_tree(model.state)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    trained = copy_tree(model.state)
    assert not np.allclose(
        initial["batch_norm/~/mean_ema"]["hidden"], trained["batch_norm/~/mean_ema"]["hidden"]
    )
    model.evaluate(x, y, verbose=0)
    model.predict(x)
    chex.assert_trees_all_equal(copy_tree(model.state), trained)


def test_last_partial_training_batch_is_not_padded():
    # BatchNorm statistics of a 3-row tail batch must come from those 3 rows only.
    x, y = make_data(13)
    model = make_model(forward=bn_mlp, optimizer=optax.sgd(0.0), seed=0)
    model.fit(x, y, epochs=1, batch_size=5, shuffle=False, verbose=0)
    reference = make_model(forward=bn_mlp, optimizer=optax.sgd(0.0), seed=0)
    reference.init(x)
    for rows in (slice(0, 5), slice(5, 10), slice(10, 13)):
        reference.train_on_batch(x[rows], y[rows])
    chex.assert_trees_all_close(model.state, reference.state, atol=1e-6)


def test_dropout_gets_a_fresh_key_each_step_and_predict_is_deterministic():
    def drop(x, is_training):
        return (
            hk.dropout(hk.next_rng_key(), 0.5, hk.Linear(3)(x)) if is_training else hk.Linear(3)(x)
        )

    x, y = make_data(8)
    model = make_model(forward=drop, optimizer=optax.sgd(0.0))
    first = model.train_on_batch(x, y)["loss"]
    second = model.train_on_batch(x, y)["loss"]
    assert first != second  # same params (lr 0), different dropout masks
    np.testing.assert_array_equal(model.predict(x), model.predict(x))


# --- evaluate / predict --------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 7, 32, 100])
def test_evaluate_is_exact_over_every_row(batch_size):
    x, y = make_data(45)
    model = make_model(metrics=["accuracy", "sparse_top_k_categorical_accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    y_pred = model.apply_fn(model.params, model.state, x)
    expected_loss = float(np.mean(losses.sparse_categorical_crossentropy(y, y_pred)))
    result = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    assert set(result) == {"loss", "accuracy", "sparse_top_k_categorical_accuracy"}
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(result["accuracy"], np.mean(np.argmax(y_pred, -1) == y), rtol=1e-6)
    assert result["sparse_top_k_categorical_accuracy"] == 1.0  # 3 classes, k=5


def test_evaluate_with_sample_weight():
    x, y = make_data(21)
    model = make_model()
    model.init(x)
    w = np.arange(21, dtype=np.float32)
    per_example = losses.sparse_categorical_crossentropy(
        y, model.apply_fn(model.params, model.state, x)
    )
    result = model.evaluate(x, y, sample_weight=w, batch_size=4, verbose=0)
    np.testing.assert_allclose(result["loss"], np.sum(w * per_example) / np.sum(w), rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 6, 64])
def test_predict_returns_one_row_per_input_equal_to_apply_fn(batch_size):
    x, y = make_data(23)
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    out = model.predict(x, batch_size=batch_size)
    assert isinstance(out, np.ndarray) and out.shape == (23, 3)
    np.testing.assert_allclose(out, model.apply_fn(model.params, model.state, x), atol=1e-6)


def test_dict_inputs_and_pytree_outputs():
    def two_inputs(x):
        a = hk.Linear(4, name="a")(x["image"])
        b = hk.Linear(4, name="b")(x["meta"])
        return {"logits": hk.Linear(3)(a + b), "aux": a}

    rng = np.random.default_rng(0)
    x = {
        "image": rng.normal(size=(30, 6)).astype(np.float32),
        "meta": rng.normal(size=(30, 2)).astype(np.float32),
    }
    y = rng.integers(0, 3, size=30)
    model = hkfit.Model(
        two_inputs, loss=lambda t, p: losses.sparse_categorical_crossentropy(t, p["logits"])
    )
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2
    out = model.predict(x, batch_size=7)
    assert out["logits"].shape == (30, 3) and out["aux"].shape == (30, 4)


def test_predict_and_evaluate_on_iterables():
    x, y = make_data(25)
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 25, 10)]
    np.testing.assert_allclose(model.predict(iter(batches)), model.predict(x), atol=1e-6)
    np.testing.assert_allclose(model.predict(b[0] for b in batches), model.predict(x), atol=1e-6)
    np.testing.assert_allclose(
        model.evaluate(batches, verbose=0)["loss"],
        model.evaluate(x, y, verbose=0)["loss"],
        rtol=1e-5,
    )


# --- iterables ----------------------------------------------------------------------------


def test_fit_on_a_reiterable_list_of_batches():
    x, y = make_data(40)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    a, b = make_model(seed=0), make_model(seed=0)
    history = a.fit(batches, epochs=2, verbose=0)
    b.fit(x, y, epochs=2, batch_size=10, shuffle=False, verbose=0)
    assert history.epoch == [0, 1]
    chex.assert_trees_all_close(a.params, b.params, atol=1e-6)


def test_fit_on_an_infinite_generator_with_steps_per_epoch():
    x, y = make_data(40)

    def forever():
        while True:
            for i in range(0, 40, 8):
                yield x[i : i + 8], y[i : i + 8], np.ones(8)

    model = make_model()
    history = model.fit(forever(), epochs=3, steps_per_epoch=4, verbose=0)
    assert history.epoch == [0, 1, 2]
    assert model.step == 12


def test_one_shot_generator_stops_with_a_warning_after_first_epoch():
    x, y = make_data(20)
    generator = ((x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5))
    model = make_model()
    with pytest.warns(UserWarning, match="ran out before epoch 2"):
        history = model.fit(generator, epochs=3, verbose=0)
    assert history.epoch == [0]
    assert model.step == 4


def test_iterable_running_out_before_steps_per_epoch_keeps_completed_steps():
    x, y = make_data(20)
    generator = ((x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5))
    model = make_model()
    with pytest.warns(UserWarning, match="ran out after 1 of 3 steps in epoch 2"):
        history = model.fit(generator, epochs=5, steps_per_epoch=3, verbose=0)
    assert model.step == 4
    assert history.epoch == [0, 1]


# --- forwards ----------------------------------------------------------------------------


def test_forward_without_is_training_and_haiku_transforms():
    x, y = make_data(20)

    def plain(x):
        return hk.Linear(3)(x)

    for forward in (
        plain,
        hk.transform(plain),
        hk.without_apply_rng(hk.transform(plain)),
        hk.transform_with_state(plain),
    ):
        model = hkfit.Model(forward, loss="sparse_categorical_crossentropy", seed=0)
        history = model.fit(x, y, epochs=2, verbose=0)
        assert len(history.history["loss"]) == 2
        assert model.predict(x).shape == (20, 3)


def test_apply_fn_composes_with_jax_transforms():
    x, y = make_data(6)
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    jac = jax.jacrev(model.apply_fn, argnums=2)(model.params, model.state, x[:2])
    assert jac.shape == (2, 3, 2, 4)
    per_example = jax.vmap(lambda row: model.apply_fn(model.params, model.state, row[None])[0])(x)
    np.testing.assert_allclose(per_example, model.predict(x), atol=1e-6)


@pytest.mark.parametrize(
    "loss,y_maker,out",
    [
        ("mse", lambda n: np.zeros((n, 2), np.float32), 2),
        ("mae", lambda n: np.zeros((n, 2), np.float32), 2),
        ("huber", lambda n: np.zeros((n, 1), np.float32), 1),
        ("binary_crossentropy", lambda n: np.ones((n,), np.float32), 1),
        ("categorical_crossentropy", lambda n: np.eye(3, dtype=np.float32)[np.arange(n) % 3], 3),
    ],
)
def test_named_losses_train(loss, y_maker, out):
    x, _ = make_data(24)
    model = hkfit.Model(
        lambda x: hk.Linear(out)(x),
        loss=loss,
        optimizer="adam",
        metrics=["accuracy"] if "crossentropy" in loss else ["mae"],
    )
    history = model.fit(x, y_maker(24), epochs=5, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop"])
def test_named_optimizers_log_learning_rate(name):
    x, y = make_data(16)
    model = make_model(optimizer=name)
    history = model.fit(x, y, epochs=1, verbose=0)
    assert history.history["learning_rate"][0] == pytest.approx({"sgd": 1e-2}.get(name, 1e-3))


# --- single batches and summary -----------------------------------------------------------


def test_on_batch_methods():
    x, y = make_data(10)
    model = make_model()
    logs = model.train_on_batch(x, y)
    assert set(logs) == {"loss", "accuracy"} and model.step == 1
    test_logs = model.test_on_batch(x, y)
    np.testing.assert_allclose(
        test_logs["loss"], model.evaluate(x, y, verbose=0)["loss"], rtol=1e-6
    )
    np.testing.assert_allclose(model.predict_on_batch(x), model.predict(x), atol=1e-6)


def test_summary_lists_modules_and_counts():
    x, _ = make_data(10)
    model = make_model(forward=bn_mlp)
    model.init(x)
    text = model.summary(print_fn=None)
    assert "batch_norm" in text and "linear_1" in text
    assert f"Total params: {4 * 16 + 16 + 2 * 16 + 16 * 3 + 3:,}" in text
    assert "Total state:" in text


# --- traces ------------------------------------------------------------------------------


def test_steps_trace_once_per_shape_across_epochs_and_fits(monkeypatch):
    counts = {"train": 0, "eval": 0, "predict": 0}

    def counting(maker, key):
        def make(*args, **kwargs):
            inner = maker(*args, **kwargs)

            def counted(*a, **k):
                counts[key] += 1
                return inner(*a, **k)

            return counted

        return make

    monkeypatch.setattr(step_lib, "make_train_step", counting(step_lib.make_train_step, "train"))
    monkeypatch.setattr(step_lib, "make_eval_step", counting(step_lib.make_eval_step, "eval"))
    monkeypatch.setattr(
        step_lib, "make_predict_step", counting(step_lib.make_predict_step, "predict")
    )
    x, y = make_data(53)  # 53 = 5 * 10 + 3: full batches and a tail
    model = make_model()
    model.fit(x, y, epochs=3, batch_size=10, verbose=0, validation_split=0.2)
    model.fit(x, y, epochs=2, batch_size=10, verbose=0, validation_split=0.2)
    assert counts["train"] <= 2  # full batches + the last partial batch
    assert counts["eval"] == 1
    model.predict(x, batch_size=10)
    model.predict(x, batch_size=10)
    assert counts["predict"] == 1


def test_assert_max_traces_on_a_model_step():
    x, y = make_data(30)
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=10, verbose=0)
    fused = model._program.train_run(model.train_state, fuse=True)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def epoch(ts, logs, data, idx):
        return fused(ts, logs, data, idx, 0, 3)

    data = jax.device_put(step_lib.Batch(x, y, np.ones(30, np.float32)))
    idx = jnp.arange(30, dtype=jnp.int32).reshape(3, 10)
    for _ in range(3):
        model.train_state, _ = epoch(model.train_state, model._program.empty_logs(), data, idx)


# --- progress output ---------------------------------------------------------------------


def test_verbose_modes(capsys):
    x, y = make_data(20)
    model = make_model()
    model.fit(x, y, epochs=2, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    model.fit(x, y, epochs=2, verbose=2)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("Epoch")]
    assert len(lines) == 2 and "loss:" in lines[0] and "accuracy:" in lines[0]
    model.fit(x, y, epochs=1, verbose=1, validation_split=0.2)
    captured = capsys.readouterr()
    assert "Epoch 1/1" in captured.err and "val_loss" in captured.err
    assert hkfit.callbacks.resolve_verbose("auto") == 2  # pytest's stderr is not a terminal


def test_evaluate_and_predict_progress(capsys):
    x, y = make_data(20)
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    model.evaluate(x, y, verbose=2, batch_size=8)
    assert capsys.readouterr().out.startswith("evaluate - ")
    model.evaluate(x, y, verbose=1, batch_size=8)
    err = capsys.readouterr().err
    assert "evaluate" in err and "3/3" in err and "loss:" in err
    model.predict(x, verbose=1, batch_size=8)
    assert "predict" in capsys.readouterr().err
    model.predict(x)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("steps_per_execution", ["auto", 1])
def test_streamed_evaluate_and_predict_are_exact_across_chunks(monkeypatch, steps_per_execution):
    monkeypatch.setattr(hkfit._feeds, "CHUNK_BYTES", 3 * 7 * 4 * 4)  # 3 batches of 7 rows
    x, y = make_data(45)  # 45 rows = 2 full chunks of 21 + a padded chunk of 3 rows
    w = np.linspace(0.1, 1.0, 45).astype(np.float32)
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    y_pred = np.asarray(model.apply_fn(model.params, model.state, x))
    per_example = np.asarray(losses.sparse_categorical_crossentropy(y, y_pred))
    result = model.evaluate(
        x, y, sample_weight=w, batch_size=7, verbose=0, steps_per_execution=steps_per_execution
    )
    np.testing.assert_allclose(result["loss"], np.sum(w * per_example) / np.sum(w), rtol=1e-5)
    out = model.predict(x, batch_size=7, steps_per_execution=steps_per_execution)
    np.testing.assert_allclose(out, y_pred, atol=1e-6)
    assert model.predict(x, batch_size=7, steps=2).shape == (14, 3)
    np.testing.assert_allclose(
        model.evaluate(x, y, batch_size=7, steps=2, verbose=0)["loss"],
        per_example[:14].mean(),
        rtol=1e-5,
    )


def test_building_the_same_model_again_reuses_the_compiled_init():
    from hkfit import _compat

    x = np.ones((4, 3), np.float32)

    def build(name, seed):
        return hkfit.Model(lambda x: hk.Linear(2, name=name)(x), loss="mse", seed=seed).init(x)

    first = build("alpha", 0)
    compiled = dict(_compat._ONCE_CACHE)
    again = build("alpha", 1)
    assert _compat._ONCE_CACHE.keys() == compiled.keys()  # nothing new compiled
    assert not np.array_equal(first.params["alpha"]["w"], again.params["alpha"]["w"])  # the seed
    other = build("beta", 0)  # the same program text with other param names
    assert list(other.params) == ["beta"]
    np.testing.assert_array_equal(other.params["beta"]["w"], first.params["alpha"]["w"])
