"""Compiled steps shared by program text across models (hkfit._executables)."""

import logging

import chex
import haiku as hk
import jax
import numpy as np
import optax

import hkfit
from hkfit import _executables as executables

RNG = np.random.default_rng(0)
X = RNG.normal(size=(96, 6)).astype(np.float32)
Y = RNG.integers(0, 3, 96)


def dropout_mlp(x, is_training):
    h = jax.nn.relu(hk.Linear(16)(x))
    if is_training:
        h = hk.dropout(hk.next_rng_key(), 0.5, h)
    return hk.Linear(3)(h)


def model(forward=dropout_mlp, seed=0, learning_rate=1e-2):
    return hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(learning_rate),
        metrics=["accuracy"],
        seed=seed,
    )


def compiles(caplog, run):
    """The names of the programs XLA compiles during ``run()`` (JAX logs "Compiling" when
    it lowers a program, which a lookup by program text does too)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        run()
    done = "Finished XLA compilation of "
    return [
        r.getMessage()[len(done) :].split(" in ")[0]
        for r in caplog.records
        if r.getMessage().startswith(done)
    ]


def fit(m):
    history = m.fit(X, Y, batch_size=16, epochs=2, verbose=0, validation_split=0.25)
    return history.history, jax.device_get(m.params)


def test_a_rebuilt_model_compiles_nothing_and_trains_the_same(caplog):
    first = fit(model())
    programs = set(executables._CACHE)
    names = compiles(caplog, lambda: fit(model()))
    assert not [n for n in names if "run" in n]  # the fused train and eval loops
    assert set(executables._CACHE) == programs
    again = fit(model())
    chex.assert_trees_all_equal(again, first)


def test_other_settings_get_their_own_program():
    reference = fit(model())
    programs = set(executables._CACHE)
    fit(model(learning_rate=0.1))  # the learning rate is a constant of the program
    assert set(executables._CACHE) - programs
    seeded = fit(model(seed=1))  # the seed is data (a key in the train state): shared
    assert not np.allclose(seeded[1]["linear"]["w"], reference[1]["linear"]["w"])


def test_other_parameter_names_are_not_mixed_up():
    fit(model())

    def renamed(x, is_training):
        h = jax.nn.relu(hk.Linear(16, name="hidden")(x))
        if is_training:
            h = hk.dropout(hk.next_rng_key(), 0.5, h)
        return hk.Linear(3, name="head")(h)

    m = model(renamed)
    _, params = fit(m)
    assert set(params) == {"hidden", "head"}


def test_the_process_cache_is_bounded():
    for width in range(executables.CACHE_SIZE + 4):
        f = executables.shared(lambda a: a * 2, fixed=0)
        f(np.ones(width + 1, np.float32))
    assert len(executables._CACHE) <= executables.CACHE_SIZE


def test_calls_inside_a_transformation_use_jit():
    f = executables.shared(lambda a, b: (a + b, b), fixed=1)
    a, b = np.ones(3, np.float32), np.arange(3.0, dtype=np.float32)
    direct = f(a, b)
    traced = jax.jit(lambda a, b: f(a, b))(a, b)
    chex.assert_trees_all_equal(direct, traced)
    with jax.disable_jit():
        chex.assert_trees_all_equal(f(a, b), direct)
