"""Training objectives: per-token losses and metrics, Keras-style loss objects, the
logits warning, streaming metrics in fit, and optax transforms that need the loss."""

import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

import hkfit

VOCAB, STEPS = 11, 6


def lm(x):
    h = hk.Embed(VOCAB, 8)(x)
    return hk.Linear(VOCAB)(jax.nn.relu(hk.Linear(16)(h)))


def token_data(rows=40, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(rows, STEPS + 1)).astype(np.int32)
    lengths = rng.integers(2, STEPS + 1, size=rows)
    mask = (np.arange(STEPS)[None] < lengths[:, None]).astype(np.float32)
    return tokens[:, :-1], tokens[:, 1:], mask


def test_masked_token_lm_matches_a_hand_written_loop():
    x, y, mask = token_data()
    model = hkfit.Model(lm, loss="sparse_categorical_crossentropy", optimizer=optax.sgd(0.5))
    model.init(x)
    params = jax.tree_util.tree_map(np.array, model.params)
    history = model.fit(x, y, sample_weight=mask, batch_size=8, epochs=2, shuffle=False, verbose=0)

    net = hk.without_apply_rng(hk.transform(lm))
    opt = optax.sgd(0.5)
    opt_state = opt.init(params)

    def batch_loss(p, xb, yb, wb):
        losses = optax.losses.softmax_cross_entropy_with_integer_labels(net.apply(p, xb), yb)
        return jnp.sum(wb * losses) / jnp.sum(wb), (jnp.sum(wb * losses), jnp.sum(wb))

    grad = jax.jit(jax.grad(batch_loss, has_aux=True))
    value = jax.jit(batch_loss)
    epoch_losses = []
    for _ in range(2):
        total = count = 0.0
        for start in range(0, 40, 8):
            sl = slice(start, start + 8)
            _, (s, c) = value(params, x[sl], y[sl], mask[sl])
            total, count = total + float(s), count + float(c)
            grads, _ = grad(params, x[sl], y[sl], mask[sl])
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        epoch_losses.append(total / count)
    np.testing.assert_allclose(history.history["loss"], epoch_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_token_metrics_are_exact_for_any_batch_size():
    x, y, mask = token_data()
    model = hkfit.Model(lm, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.init(x)
    logits = model.predict(x)
    losses = np.asarray(optax.losses.softmax_cross_entropy_with_integer_labels(logits, y))
    expected_loss = float((losses * mask).sum() / mask.sum())
    expected_acc = float(((logits.argmax(-1) == y) * mask).sum() / mask.sum())
    for batch_size in (7, 40):
        logs = model.evaluate(x, y, sample_weight=mask, batch_size=batch_size, verbose=0)
        assert logs["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert logs["accuracy"] == pytest.approx(expected_acc, rel=1e-6)


def test_per_token_weights_from_an_iterable():
    x, y, mask = token_data()
    model = hkfit.Model(lm, loss="sparse_categorical_crossentropy")
    model.init(x)
    from_arrays = model.evaluate(x, y, sample_weight=mask, batch_size=8, verbose=0)
    batches = [(x[i : i + 8], y[i : i + 8], mask[i : i + 8]) for i in range(0, 40, 8)]
    assert model.evaluate(batches, verbose=0)["loss"] == pytest.approx(
        from_arrays["loss"], rel=1e-6
    )


def classifier(x):
    return hk.Linear(3)(x)


def softmax_classifier(x):
    return jax.nn.softmax(classifier(x))


def class_data(rows=30):
    rng = np.random.default_rng(1)
    return rng.normal(size=(rows, 4)).astype(np.float32), (np.arange(rows) % 3).astype(np.int32)


def test_loss_object_with_probabilities_matches_the_logits_name():
    x, y = class_data()
    on_logits = hkfit.Model(classifier, loss="sparse_categorical_crossentropy", seed=3)
    on_probs = hkfit.Model(
        softmax_classifier, loss=hkfit.losses.SparseCategoricalCrossentropy(), seed=3
    )
    a = on_logits.evaluate(x, y, verbose=0)["loss"]
    b = on_probs.evaluate(x, y, verbose=0)["loss"]
    assert a == pytest.approx(b, rel=1e-5)
    smoothed = hkfit.Model(
        classifier,
        loss=hkfit.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.2),
        seed=3,
    )
    assert smoothed.evaluate(x, y, verbose=0)["loss"] != pytest.approx(a, rel=1e-3)


def test_a_crossentropy_name_on_probabilities_warns_once():
    x, y = class_data()
    model = hkfit.Model(softmax_classifier, loss="sparse_categorical_crossentropy")
    with pytest.warns(UserWarning, match=r"from_logits=False"):
        model.fit(x, y, epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=1, verbose=0)  # once per model
        hkfit.Model(classifier, loss="sparse_categorical_crossentropy").fit(x, y, verbose=0)
        sigmoid = hkfit.Model(lambda v: jax.nn.sigmoid(hk.Linear(1)(v)), loss="mse")
        sigmoid.fit(x, (y > 0).astype(np.float32), verbose=0)  # not a crossentropy name
    with pytest.warns(UserWarning, match="BinaryCrossentropy"):
        hkfit.Model(lambda v: jax.nn.sigmoid(hk.Linear(1)(v)), loss="binary_crossentropy").fit(
            x, (y > 0).astype(np.float32), verbose=0
        )


def test_new_loss_names_train():
    x, y = class_data()
    onehot = np.eye(3, dtype=np.float32)[y]
    for name in ("categorical_hinge", "kl_divergence", "categorical_focal_crossentropy"):
        model = hkfit.Model(
            softmax_classifier if name == "kl_divergence" else classifier, loss=name
        )
        history = model.fit(x, onehot, epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all(), name


def test_streaming_metrics_in_fit_match_scikit_learn():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(90, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=90) > 0).astype(np.int32)
    model = hkfit.Model(
        lambda v: hk.Linear(1)(v),
        loss="binary_crossentropy",
        optimizer=optax.sgd(0.1),
        metrics=["auc", "precision", "recall", "f1"],
    )
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    logs = model.evaluate(x, y, batch_size=16, verbose=0)
    logits = model.predict(x)[:, 0]
    predicted = (logits > 0).astype(np.int32)
    assert logs["precision"] == pytest.approx(skm.precision_score(y, predicted), abs=1e-6)
    assert logs["recall"] == pytest.approx(skm.recall_score(y, predicted), abs=1e-6)
    assert logs["f1"] == pytest.approx(skm.f1_score(y, predicted), abs=1e-6)
    assert logs["auc"] == pytest.approx(skm.roc_auc_score(y, logits), abs=2e-2)


def test_reduce_on_plateau_gets_the_loss():
    x, y = class_data()
    plateau = optax.contrib.reduce_on_plateau(patience=1, factor=0.5, accumulation_size=1)
    model = hkfit.Model(
        classifier,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.chain(optax.sgd(0.0), plateau),
    )
    model.fit(x, y, epochs=2, batch_size=10, verbose=0)  # a flat loss: the scale drops
    scale = float(model.opt_state[1].scale)
    assert scale < 1.0


class Counter:
    """A metric object: the weighted count of rows predicted positive and labelled positive."""

    name = "true_positives"

    def empty(self):
        return jnp.zeros(())

    def update(self, state, y_true, y_pred, weights):
        hits = (y_pred[:, 0] > 0) & (y_true > 0)
        return state + jnp.sum(weights * hits)

    def merge(self, a, b):
        return a + b

    def compute(self, state):
        return state


def test_metrics_ignore_class_weights_and_weighted_metrics_use_them():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = hkfit.Model(
        lambda v: hk.Linear(1)(v),
        loss="binary_crossentropy",
        optimizer=optax.sgd(0.0),  # the predictions stay fixed: counts are checkable
        metrics=[Counter(), "precision"],
        weighted_metrics=[Counter(), "precision"],
    )
    history = model.fit(x, y, epochs=1, batch_size=10, class_weight={0: 1.0, 1: 0.01}, verbose=0)
    logits = model.predict(x)[:, 0]
    hits = int(((logits > 0) & (y > 0)).sum())
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["true_positives"] == hits
    assert logs["weighted_true_positives"] == pytest.approx(0.01 * hits, rel=1e-5)
    predicted = (logits > 0).astype(np.int32)
    assert logs["precision"] == pytest.approx(skm.precision_score(y, predicted), abs=1e-6)
    weights = np.where(y == 1, 0.01, 1.0)
    assert logs["weighted_precision"] == pytest.approx(
        skm.precision_score(y, predicted, sample_weight=weights), abs=1e-5
    )


# --- Losses added from inside the forward, and regularizers ---------------------------------


def vae(x):
    h = jax.nn.relu(hk.Linear(8)(x))
    mean, log_var = hk.Linear(2)(h), hk.Linear(2)(h)
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(hk.next_rng_key(), mean.shape)
    hkfit.add_loss(-0.5 * jnp.sum(1 + log_var - mean**2 - jnp.exp(log_var), axis=-1), name="kl")
    return hk.Linear(6)(jax.nn.relu(hk.Linear(8)(z)))


def vae_data():
    return np.random.default_rng(4).normal(size=(32, 6)).astype(np.float32)


def test_vae_with_add_loss_matches_a_hand_written_loop():
    x = vae_data()
    model = hkfit.Model(vae, loss="mse", optimizer=optax.adam(1e-2), seed=5)
    model.init(x)
    params = jax.tree_util.tree_map(np.array, model.params)
    # step s draws from fold_in(rng, s); copied, since fit donates the train state
    rng = jax.random.wrap_key_data(np.array(jax.random.key_data(model.train_state.rng)))
    history = model.fit(x, x, epochs=2, batch_size=8, shuffle=False, verbose=0)

    net = hk.transform(vae)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def objective(p, xb, key):
        (y, added) = hkfit._auxiliary.collect(net.apply, p, key, xb)
        recon = jnp.mean((y - xb) ** 2, axis=-1)
        return jnp.mean(recon) + jnp.mean(added["kl"]), (jnp.mean(recon), jnp.mean(added["kl"]))

    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    totals = []
    for epoch in range(2):
        losses = []
        for b in range(4):
            key = jax.random.fold_in(rng, epoch * 4 + b)
            (loss, _), grads = step(params, x[b * 8 : (b + 1) * 8], key)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
        totals.append(np.mean(losses))
    np.testing.assert_allclose(history.history["loss"], totals, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_added_losses_stay_out_of_state_and_predict_and_count_in_evaluate():
    x = vae_data()
    model = hkfit.Model(vae, loss="mse", optimizer=optax.sgd(0.0))
    model.fit(x, x, epochs=1, verbose=0)
    assert model.state == {}
    assert model.predict(x).shape == x.shape
    logs = model.evaluate(x, x, batch_size=32, verbose=0)
    assert logs["kl"] > 0
    recon = float(np.mean((model.predict(x, batch_size=32) - x) ** 2))
    assert logs["loss"] == pytest.approx(recon + logs["kl"], rel=1e-4)


def test_added_losses_under_multiview_are_averaged_over_views():
    def per_view(v):
        hkfit.add_loss(jnp.mean(v, axis=-1))  # one value per row
        return hk.Linear(2)(v)

    x = np.stack([np.full((8, 4), float(k), np.float32) for k in range(3)], axis=-1)
    model = hkfit.Model(hkfit.multiview(per_view, axis=-1), loss="mse", optimizer=optax.sgd(0.0))
    logs = model.evaluate(x, np.zeros((8, 2), np.float32), verbose=0)
    assert logs["aux_loss"] == pytest.approx(1.0)  # the mean of views 0, 1 and 2


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_added_losses_under_data_parallel_match_one_device():
    x = vae_data()
    single = hkfit.Model(vae, loss="mse", optimizer=optax.adam(1e-2), seed=5)
    parallel = hkfit.Model(
        vae,
        loss="mse",
        optimizer=optax.adam(1e-2),
        seed=5,
        distribution=hkfit.DataParallel(data_placement="replicated"),
    )
    a = single.fit(x, x, epochs=2, batch_size=16, verbose=0).history
    b = parallel.fit(x, x, epochs=2, batch_size=16, verbose=0).history
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
    np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-4)


def test_regularizer_is_part_of_the_objective():
    x, y = class_data()
    reg = hkfit.regularizers.l2(0.01, include=r"/w$")
    model = hkfit.Model(
        classifier,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.sgd(0.0),
        regularizer=reg,
    )
    logs = model.evaluate(x, y, verbose=0)
    penalty = 0.01 * float(np.sum(np.asarray(model.params["linear"]["w"]) ** 2))
    assert logs["regularization_loss"] == pytest.approx(penalty, rel=1e-5)
    plain = hkfit.Model(classifier, loss="sparse_categorical_crossentropy")
    plain.init(x)
    plain.params = model.params
    assert logs["loss"] == pytest.approx(
        plain.evaluate(x, y, verbose=0)["loss"] + penalty, rel=1e-5
    )
    trained = hkfit.Model(
        classifier,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.sgd(0.5),
        regularizer=hkfit.regularizers.l2(1.0),
        seed=1,
    )
    trained.fit(x, y, epochs=5, verbose=0)
    free = hkfit.Model(
        classifier, loss="sparse_categorical_crossentropy", optimizer=optax.sgd(0.5), seed=1
    )
    free.fit(x, y, epochs=5, verbose=0)
    norm = lambda m: float(np.sum(np.asarray(m.params["linear"]["w"]) ** 2))
    assert norm(trained) < norm(free)


def test_grouped_learning_rates_are_logged_and_reduced_per_group():
    x, y = class_data()
    labels = {"linear": {"w": "w", "b": "b"}}
    optimizer = optax.multi_transform(
        {
            "w": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            "b": optax.inject_hyperparams(optax.sgd)(learning_rate=0.01),
        },
        labels,
    )
    model = hkfit.Model(classifier, loss="sparse_categorical_crossentropy", optimizer=optimizer)
    plateau = hkfit.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=10
    )
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[plateau])
    # each epoch logs the rate it trained with; the plateau halves both after epoch 2
    assert history.history["learning_rate_w"] == pytest.approx([0.1, 0.1, 0.05])
    assert history.history["learning_rate_b"] == pytest.approx([0.01, 0.01, 0.005])
