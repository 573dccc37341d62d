"""``run_eagerly=True``: every step op by op, with Python debugging inside the forward."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit

SEEN: list = []


def forward(x, is_training):
    h = hk.Linear(8)(x)
    if jax.config.jax_disable_jit:  # values exist only when running op by op
        SEEN.append(float(jnp.mean(jax.lax.stop_gradient(h))))
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.2, h)
    return hk.Linear(1)(jax.nn.relu(h))


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    return x, np.tanh(x[:, :1] + x[:, 1:2])


def model():
    return hkfit.Model(forward, loss="mse", metrics=["mae"], optimizer=optax.adam(1e-2), seed=3)


def test_eager_results_equal_compiled_ones():
    x, y = data()
    eager, compiled = model(), model()
    SEEN.clear()
    he = eager.fit(x, y, epochs=2, batch_size=16, validation_data=(x, y), run_eagerly=True)
    assert len(SEEN) >= 2 * 3  # the forward ran op by op, once per training batch at least
    hc = compiled.fit(x, y, epochs=2, batch_size=16, validation_data=(x, y), verbose=0)
    for key in hc.history:
        np.testing.assert_allclose(he.history[key], hc.history[key], rtol=1e-5, atol=1e-6)
    for p, q in zip(
        jax.tree_util.tree_leaves(eager.params), jax.tree_util.tree_leaves(compiled.params)
    ):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
    a = eager.evaluate(x, y, batch_size=7, verbose=0, run_eagerly=True)
    b = compiled.evaluate(x, y, batch_size=7, verbose=0)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    np.testing.assert_allclose(
        eager.predict(x, batch_size=7, verbose=0, run_eagerly=True),
        compiled.predict(x, batch_size=7, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_python_reads_values_inside_the_forward(capsys):
    x, y = data()

    def inspecting(x):
        h = hk.Linear(3)(x)
        print("mean activation", float(jnp.mean(h)))  # a concrete value, not a tracer
        return hk.Linear(1)(h)

    m = hkfit.Model(inspecting, loss="mse")
    m.predict(x, batch_size=20, verbose=0, run_eagerly=True)
    printed = capsys.readouterr().out
    assert "mean activation" in printed and "Tracer" not in printed
    m.evaluate(x, y, batch_size=20, verbose=0, run_eagerly=True)
    with pytest.raises(jax.errors.ConcretizationTypeError):
        hkfit.Model(inspecting, loss="mse").predict(x, verbose=0)  # compiled: no values


def test_jax_disable_jit_works_around_a_whole_fit():
    x, y = data()
    m = model()
    with jax.disable_jit():
        history = m.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_nan_debugging_for_one_fit():
    x, y = data()

    def log_of_negative(x):
        return jnp.log(hk.Linear(1)(x) - 100.0)  # NaN from the first batch

    m = hkfit.Model(log_of_negative, loss="mse")
    with jax.debug_nans(True), pytest.raises(FloatingPointError):
        m.fit(x, y, epochs=1, verbose=0, steps_per_execution=1)
    assert not jax.config.jax_debug_nans  # only for that fit


def test_run_eagerly_must_be_a_bool():
    x, y = data()
    with pytest.raises(TypeError, match="run_eagerly"):
        model().fit(x, y, run_eagerly="yes")
