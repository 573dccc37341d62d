"""Multi-output models: a loss, a weight, metrics and sample weights per output."""

import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit

ROWS = 50


def two_heads(x):
    h = jax.nn.relu(hk.Linear(16)(x))
    return {"age": hk.Linear(1)(h)[:, 0], "kind": hk.Linear(3)(h)}


def data(rows=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = {"age": x.sum(1), "kind": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)}
    w = {
        "age": rng.uniform(0.5, 2.0, rows).astype(np.float32),
        "kind": rng.integers(0, 2, rows).astype(np.float32),
    }
    return x, y, w


LOSS = {"age": "mse", "kind": "sparse_categorical_crossentropy"}
LOSS_WEIGHTS = {"age": 0.5, "kind": 2.0}


def model(**kwargs):
    kwargs.setdefault("optimizer", optax.adam(1e-2))
    return hkfit.Model(two_heads, loss=LOSS, loss_weights=LOSS_WEIGHTS, seed=3, **kwargs)


def test_multi_output_matches_a_hand_written_loop():
    x, y, w = data()
    m = model()
    m.init(x)
    params = jax.tree_util.tree_map(np.array, m.params)
    history = m.fit(x, y, sample_weight=w, batch_size=16, epochs=2, shuffle=False, verbose=0)

    net = hk.without_apply_rng(hk.transform(two_heads))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def head_sums(p, xb, yb, wb):
        out = net.apply(p, xb)
        age = (out["age"] - yb["age"]) ** 2
        kind = optax.losses.softmax_cross_entropy_with_integer_labels(out["kind"], yb["kind"])
        return {
            "age": (jnp.sum(wb["age"] * age), jnp.sum(wb["age"])),
            "kind": (jnp.sum(wb["kind"] * kind), jnp.sum(wb["kind"])),
        }

    def objective(p, xb, yb, wb):
        sums = head_sums(p, xb, yb, wb)
        tiny = jnp.finfo(jnp.float32).tiny  # a batch may have no weight for an output
        return sum(LOSS_WEIGHTS[k] * s / jnp.maximum(c, tiny) for k, (s, c) in sums.items())

    grad = jax.jit(jax.grad(objective))
    sums_of = jax.jit(head_sums)
    expected = {"loss": [], "age_loss": [], "kind_loss": []}
    for _ in range(2):
        totals = {"age": [0.0, 0.0], "kind": [0.0, 0.0]}
        for start in range(0, ROWS, 16):  # the last batch has 2 rows
            batch = jax.tree_util.tree_map(lambda a, s=start: a[s : s + 16], (x, y, w))
            for k, (s, c) in sums_of(params, *batch).items():
                totals[k][0] += float(s)
                totals[k][1] += float(c)
            updates, opt_state = opt.update(grad(params, *batch), opt_state, params)
            params = optax.apply_updates(params, updates)
        means = {k: s / c for k, (s, c) in totals.items()}
        expected["age_loss"].append(means["age"])
        expected["kind_loss"].append(means["kind"])
        expected["loss"].append(sum(LOSS_WEIGHTS[k] * v for k, v in means.items()))
    for key, values in expected.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_logs_per_output_and_exact_evaluate():
    x, y, w = data()
    m = model(
        metrics={"age": ["mae"], "kind": ["accuracy"]}, weighted_metrics={"kind": ["accuracy"]}
    )
    history = m.fit(x, y, epochs=1, batch_size=16, verbose=0, validation_data=(x, y, w))
    assert set(history.history) == {
        "loss",
        "age_loss",
        "kind_loss",
        "age_mae",
        "kind_accuracy",
        "kind_weighted_accuracy",
        "learning_rate",
        "val_loss",
        "val_age_loss",
        "val_kind_loss",
        "val_age_mae",
        "val_kind_accuracy",
        "val_kind_weighted_accuracy",
    } - {"learning_rate"}
    a = m.evaluate(x, y, sample_weight=w, batch_size=7, verbose=0)
    b = m.evaluate(x, y, sample_weight=w, batch_size=ROWS, verbose=0)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    np.testing.assert_allclose(
        a["loss"], LOSS_WEIGHTS["age"] * a["age_loss"] + LOSS_WEIGHTS["kind"] * a["kind_loss"]
    )
    out = m.predict(x, verbose=0)
    age = np.asarray(out["age"])
    np.testing.assert_allclose(
        a["age_loss"], np.sum(w["age"] * (age - y["age"]) ** 2) / np.sum(w["age"]), rtol=1e-5
    )
    np.testing.assert_allclose(a["age_mae"], np.mean(np.abs(age - y["age"])), rtol=1e-5)
    # a weighted metric sees the output's own weights, a plain one every real row
    kind_pred = np.asarray(out["kind"])
    plain = np.mean(np.argmax(kind_pred, -1) == y["kind"])
    np.testing.assert_allclose(a["kind_accuracy"], plain, rtol=1e-5)
    hits = np.argmax(kind_pred, -1) == y["kind"]
    weighted = np.sum(w["kind"] * hits) / np.sum(w["kind"])
    np.testing.assert_allclose(a["kind_weighted_accuracy"], weighted, rtol=1e-5)


def test_list_outputs_are_named_in_order_and_an_output_without_loss_is_not_trained():
    def forward(x):
        return hk.Linear(1, name="first")(x), hk.Linear(2, name="second")(x)

    x, _, _ = data()
    y = (x[:, :1], x[:, :2])
    m = hkfit.Model(
        forward,
        loss=["mse", None],
        metrics=[["mae"], ["mse"]],
        optimizer=optax.sgd(0.1),
    )
    m.init(x)
    before = jax.tree_util.tree_map(np.array, m.params)
    logs = m.fit(x, y, epochs=1, batch_size=10, verbose=0).history
    assert set(logs) == {"loss", "output_1_loss", "output_1_mae", "output_2_mse"}
    np.testing.assert_allclose(logs["loss"], logs["output_1_loss"])
    np.testing.assert_array_equal(m.params["second"]["w"], before["second"]["w"])
    assert not np.allclose(m.params["first"]["w"], before["first"]["w"])


def test_per_output_weights_from_an_iterable_match_arrays():
    x, y, w = data()

    def batches():
        for start in range(0, ROWS, 10):
            yield jax.tree_util.tree_map(lambda a, s=start: a[s : s + 10], (x, y, w))

    a = model(optimizer=optax.sgd(0.05))
    b = model(optimizer=optax.sgd(0.05))
    ha = a.fit(x, y, sample_weight=w, epochs=1, batch_size=10, shuffle=False, verbose=0)
    hb = b.fit(batches(), epochs=1, verbose=0)
    for key in ("loss", "age_loss", "kind_loss"):
        np.testing.assert_allclose(ha.history[key], hb.history[key], rtol=1e-5)
    for p, q in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_per_token_output_next_to_a_per_row_output():
    vocab = 7

    def forward(x):
        h = hk.Embed(vocab, 8)(x)
        return {"next": hk.Linear(vocab)(h), "length": hk.Linear(1)(h.mean(1))[:, 0]}

    rng = np.random.default_rng(1)
    x = rng.integers(0, vocab, (24, 5)).astype(np.int32)
    mask = (np.arange(5)[None] < rng.integers(1, 6, 24)[:, None]).astype(np.float32)
    y = {"next": np.roll(x, -1, axis=1), "length": mask.sum(1)}
    m = hkfit.Model(
        forward,
        loss={"next": "sparse_categorical_crossentropy", "length": "mse"},
        metrics={"next": ["accuracy"]},
    )
    m.fit(x, y, sample_weight={"next": mask}, epochs=1, batch_size=8, verbose=0)
    logs = m.evaluate(x, y, sample_weight={"next": mask}, batch_size=5, verbose=0)
    out = m.predict(x, verbose=0)
    logits = np.asarray(out["next"])
    losses = np.asarray(optax.losses.softmax_cross_entropy_with_integer_labels(logits, y["next"]))
    np.testing.assert_allclose(logs["next_loss"], np.sum(mask * losses) / mask.sum(), rtol=1e-5)
    hits = (np.argmax(logits, -1) == y["next"]) * mask
    np.testing.assert_allclose(logs["next_accuracy"], hits.sum() / mask.sum(), rtol=1e-5)
    length = np.mean((np.asarray(out["length"]) - y["length"]) ** 2)
    np.testing.assert_allclose(logs["length_loss"], length, rtol=1e-5)


def test_multi_output_under_data_parallel_matches_one_device():
    x, y, w = data()
    single = model()
    parallel = model(distribution=hkfit.DataParallel(data_placement="replicated"))
    a = single.fit(x, y, sample_weight=w, epochs=2, batch_size=16, verbose=0).history
    b = parallel.fit(x, y, sample_weight=w, epochs=2, batch_size=16, verbose=0).history
    for key in ("loss", "age_loss", "kind_loss"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4)


def test_errors_say_what_to_pass():
    x, y, w = data()
    with pytest.raises(ValueError, match=r"loss=\{'age': 'mse', 'kind': 'mse'\}"):
        hkfit.Model(two_heads, loss="mse").fit(x, y, verbose=0)
    with pytest.raises(ValueError, match="one loss per output"):
        hkfit.Model(two_heads, loss=hkfit.losses.MeanSquaredError()).fit(x, y, verbose=0)
    with pytest.raises(ValueError, match="loss_weights"):
        hkfit.Model(two_heads, loss="mse", loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights"):
        hkfit.Model(two_heads, loss=LOSS, loss_weights={"agee": 1.0})
    with pytest.raises(TypeError, match="loss_weights"):
        hkfit.Model(two_heads, loss=LOSS, loss_weights={"age": "big"})
    with pytest.raises(ValueError, match="'size'"):
        hkfit.Model(two_heads, loss=LOSS, metrics={"size": ["mae"]})
    with pytest.raises(ValueError, match=r"Missing: \[.kind.\]"):
        model().fit(x, {"age": y["age"]}, verbose=0)
    with pytest.raises(ValueError, match="does not output"):
        model().fit(x, {**y, "other": y["age"]}, verbose=0)
    with pytest.raises(ValueError, match="forward returns"):
        hkfit.Model(lambda x: hk.Linear(1)(x), loss={"a": "mse"}).fit(x, x[:, :1], verbose=0)
    with pytest.raises(ValueError, match="class_weight"):
        model().fit(x, y, sample_weight=w, class_weight={0: 1.0}, verbose=0)
    m = model()
    m.init(x)
    before = jax.tree_util.tree_map(np.array, m.params)
    with pytest.raises(ValueError, match="'extra'"):
        m.fit(x, y, sample_weight={**w, "extra": w["age"]}, verbose=0)
    for p, q in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(p, q)  # nothing trained


def test_a_callable_loss_still_takes_the_whole_output_pytree():
    x, y, _ = data()

    def loss(y_true, y_pred):
        return (y_pred["age"] - y_true["age"]) ** 2

    m = hkfit.Model(two_heads, loss=loss, optimizer=optax.sgd(0.01))
    logs = m.fit(x, y, epochs=1, verbose=0).history
    assert set(logs) == {"loss"}


def test_gradient_accumulation_equals_larger_batches_and_refuses_per_output_weights():
    x, y, w = data()
    a, b = model(optimizer=optax.sgd(0.05)), model(optimizer=optax.sgd(0.05))
    a.fit(x, y, batch_size=20, shuffle=False, verbose=0)
    b.fit(x, y, batch_size=10, gradient_accumulation_steps=2, shuffle=False, verbose=0)
    for p, q in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
    before = jax.tree_util.tree_map(np.array, b.params)
    with pytest.raises(ValueError, match="per-output `sample_weight`"):
        b.fit(x, y, sample_weight=w, batch_size=10, gradient_accumulation_steps=2, verbose=0)
    for p, q in zip(jax.tree_util.tree_leaves(b.params), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(p, q)


def test_the_logits_warning_reads_each_output():
    def softmax_kind(x):
        h = jax.nn.relu(hk.Linear(8)(x))
        return {"age": hk.Linear(1)(h)[:, 0], "kind": jax.nn.softmax(hk.Linear(3)(h))}

    x, y, _ = data()
    with pytest.warns(UserWarning, match="sparse_categorical_crossentropy.*from_logits=False"):
        hkfit.Model(softmax_kind, loss=LOSS).fit(x, y, epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logits on every output: no warning
        model().fit(x, y, epochs=1, verbose=0)
