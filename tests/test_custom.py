"""Custom objectives, custom train steps, and losses that couple the rows of a batch."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit

ROWS = 50


def forward(x):
    return hk.Linear(1)(jax.nn.tanh(hk.Linear(8)(x)))


NET = hk.without_apply_rng(hk.transform(forward))


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    return x, np.sin(x.sum(1, keepdims=True)).astype(np.float32)


def squared(apply, params, state, rng, batch):
    y_pred, state = apply(params, state, rng, batch.x)
    return jnp.mean((y_pred - batch.y) ** 2, -1), (y_pred, state)


def leaves_close(a, b, tol=1e-6):
    for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(p, q, rtol=tol, atol=tol)


def test_an_objective_of_per_example_losses_equals_the_same_loss():
    x, y = data()
    a = hkfit.Model(forward, loss="mse", metrics=["mae"], optimizer=optax.sgd(0.1), seed=1)
    b = hkfit.Model(forward, objective=squared, metrics=["mae"], optimizer=optax.sgd(0.1), seed=1)
    ha = a.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(x, y)).history
    hb = b.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(x, y)).history
    assert set(ha) == set(hb)
    for key in ha:
        np.testing.assert_allclose(ha[key], hb[key], rtol=1e-5)
    leaves_close(a.params, b.params)


def test_an_objective_with_two_forward_passes_matches_a_hand_written_loop():
    x, y = data()

    def consistent(apply, params, state, rng, batch):
        y_pred, state = apply(params, state, rng, batch.x)
        shifted, _ = apply(params, state, rng, batch.x + 0.1)
        fit = jnp.mean((y_pred - batch.y) ** 2, -1)
        return fit + 0.5 * jnp.mean((shifted - y_pred) ** 2, -1), (y_pred, state)

    model = hkfit.Model(forward, objective=consistent, optimizer=optax.adam(1e-2), seed=2)
    model.init(x)
    params = jax.tree_util.tree_map(np.array, model.params)
    history = model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)

    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def batch_loss(p, xb, yb):
        out, shifted = NET.apply(p, xb), NET.apply(p, xb + 0.1)
        per = jnp.mean((out - yb) ** 2, -1) + 0.5 * jnp.mean((shifted - out) ** 2, -1)
        return jnp.mean(per), jnp.sum(per)

    step = jax.jit(jax.value_and_grad(batch_loss, has_aux=True))
    expected = []
    for _ in range(2):
        total = 0.0
        for start in range(0, ROWS, 16):
            (_, s), grads = step(params, x[start : start + 16], y[start : start + 16])
            total += float(s)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        expected.append(total / ROWS)
    np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-5, atol=1e-6)
    leaves_close(model.params, params, 1e-5)


def test_a_scalar_objective_is_used_as_it_is():
    x, y = data()

    def scalar(apply, params, state, rng, batch):
        y_pred, state = apply(params, state, rng, batch.x)
        return jnp.mean(jnp.abs(y_pred - batch.y)), (y_pred, state)

    model = hkfit.Model(forward, objective=scalar, optimizer=optax.sgd(0.1))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    logs = model.evaluate(x, y, batch_size=ROWS, verbose=0)
    np.testing.assert_allclose(
        logs["loss"], np.mean(np.abs(model.predict(x, verbose=0) - y)), rtol=1e-5
    )


def centered(y_true, y_pred):
    """Couples the rows: each row's error is measured from the batch's mean error."""
    error = (y_pred - y_true)[:, 0]
    return (error - jnp.mean(error)) ** 2


def test_a_loss_that_couples_rows_never_sees_padding():
    x, y = data()
    seen = []

    def coupled(y_true, y_pred):
        seen.append(y_pred.shape[0])  # at trace time
        return centered(y_true, y_pred)

    coupled.couples_rows = True
    model = hkfit.Model(forward, loss=coupled, optimizer=optax.sgd(0.1))
    model.fit(x, y, epochs=1, batch_size=15, verbose=0, steps_per_execution=4)
    assert ROWS % 15 in seen  # the short last batch ran at its real size
    seen.clear()
    logs = model.evaluate(x, y, batch_size=15, verbose=0)
    assert ROWS % 15 in seen
    out = model.predict(x, verbose=0)
    expected = [np.asarray(centered(y[s : s + 15], out[s : s + 15])) for s in range(0, ROWS, 15)]
    np.testing.assert_allclose(logs["loss"], np.concatenate(expected).mean(), rtol=1e-5)


def test_an_undeclared_coupled_loss_is_padded():
    x, y = data()
    seen = []

    def coupled(y_true, y_pred):
        seen.append(y_pred.shape[0])
        return centered(y_true, y_pred)

    model = hkfit.Model(forward, loss=coupled, optimizer=optax.sgd(0.1))
    model.fit(x, y, epochs=1, batch_size=15, verbose=0)
    seen.clear()
    model.evaluate(x, y, batch_size=15, verbose=0)
    assert seen and ROWS % 15 not in seen  # padded: why coupled losses must declare it


# --- A custom train step ---------------------------------------------------------------

OPT = optax.adam(1e-2)


def my_step(ts, batch):
    def loss(params):
        return jnp.mean((NET.apply(params, batch.x) - batch.y) ** 2)

    value, grads = jax.value_and_grad(loss)(ts.params)
    updates, opt_state = OPT.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    return ts._replace(params=params, opt_state=opt_state), {"fit_loss": value}


def stepped(**kwargs):
    return hkfit.Model(forward, train_step=my_step, optimizer=OPT, seed=4, **kwargs)


def test_a_custom_step_trains_logs_and_counts_steps():
    x, y = data()
    model = stepped(loss="mse")
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(x, y))
    assert set(history.history) == {"fit_loss", "val_loss"}
    assert model.step == 2 * 4
    assert history.history["fit_loss"][1] < history.history["fit_loss"][0]
    # the same steps as a hand loop over the same batches
    plain = stepped()
    plain.init(x)
    ts = plain.train_state
    for start in range(0, ROWS, 16):
        batch = hkfit.step.Batch(x[start : start + 16], y[start : start + 16], None)
        ts, _ = my_step(ts, batch)
    fitted = stepped()
    fitted.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    leaves_close(fitted.params, ts.params, 1e-6)


def test_a_custom_step_is_exact_fused_and_resumed(tmp_path):
    x, y = data()
    one = stepped()
    one.fit(x, y, epochs=3, batch_size=16, steps_per_execution=1, verbose=0)
    fused = stepped()
    fused.fit(x, y, epochs=3, batch_size=16, steps_per_execution=8, verbose=0)
    for p, q in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(fused.params)):
        np.testing.assert_array_equal(p, q)
    first = stepped()
    first.fit(x, y, epochs=1, batch_size=16, verbose=0)
    first.save(str(tmp_path / "ckpt.npz"))
    resumed = stepped().load(str(tmp_path / "ckpt.npz"))
    resumed.fit(x, y, epochs=3, initial_epoch=1, batch_size=16, verbose=0)
    for p, q in zip(
        jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(resumed.params)
    ):
        np.testing.assert_array_equal(p, q)
    assert resumed.step == one.step


def test_a_custom_step_under_data_parallel_matches_one_device():
    x, y = data()
    a = stepped().fit(x, y, epochs=2, batch_size=16, verbose=0).history
    b = stepped(distribution=hkfit.DataParallel(data_placement="replicated")).fit(
        x, y, epochs=2, batch_size=16, verbose=0
    )
    np.testing.assert_allclose(a["fit_loss"], b.history["fit_loss"], rtol=1e-4)


def test_errors_name_the_argument():
    x, y = data()
    with pytest.raises(TypeError, match="`loss`"):
        hkfit.Model(forward)
    with pytest.raises(ValueError, match="not both"):
        hkfit.Model(forward, loss="mse", objective=squared)
    with pytest.raises(TypeError, match="`objective`"):
        hkfit.Model(forward, objective="mse")
    model = stepped()
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="needs a loss"):
        model.evaluate(x, y, verbose=0)
    with pytest.raises(ValueError, match="needs a loss"):
        stepped().fit(x, y, validation_data=(x, y), verbose=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        stepped().fit(x, y, gradient_accumulation_steps=2, verbose=0)

    def bad_step(ts, batch):
        return ts.params, {"a": 0.0}

    with pytest.raises(TypeError, match="train state"):
        hkfit.Model(forward, train_step=bad_step).fit(x, y, verbose=0)


def test_a_custom_step_may_train_on_data_that_is_not_the_forward_input():
    latent = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    samples = data()[0] + 3.0  # 4 features; the forward takes 3
    generate = hk.without_apply_rng(hk.transform(lambda z: hk.Linear(4, name="g")(z)))
    opt = optax.sgd(0.1)

    def match_means(ts, batch):
        z = jax.random.normal(jax.random.fold_in(ts.rng, ts.step), (batch.x.shape[0], 3))

        def loss(params):
            return jnp.sum((generate.apply(params, z).mean(0) - batch.x.mean(0)) ** 2)

        value, grads = jax.value_and_grad(loss)(ts.params)
        updates, opt_state = opt.update(grads, ts.opt_state, ts.params)
        return ts._replace(params=optax.apply_updates(ts.params, updates), opt_state=opt_state), {
            "gap": value
        }

    model = hkfit.Model(lambda z: hk.Linear(4, name="g")(z), train_step=match_means, optimizer=opt)
    model.init(latent)  # the forward's input: noise
    history = model.fit(samples, samples, epochs=3, batch_size=25, verbose=0)
    assert history.history["gap"][-1] < history.history["gap"][0]
    assert model.predict(latent, verbose=0).shape == (8, 4)
    with pytest.raises(ValueError, match="rows of shape"):
        model.predict(samples, verbose=0)  # predict still checks the forward's inputs
