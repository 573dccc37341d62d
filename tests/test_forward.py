"""Adapters from forward functions and Haiku transforms to pure init/apply functions."""

import doctest

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkfit import _forward
from hkfit._forward import TrainingFlag, with_is_training, wrap

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
X2 = jax.random.normal(jax.random.PRNGKey(2), (8, 3)) * 3.0 + 5.0  # other batch statistics


def batchnorm_net(x, is_training):
    x = hk.Linear(4)(x)
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.5)(x, is_training)


def test_with_is_training_drives_batchnorm_in_both_modes():
    transformed = hk.transform_with_state(batchnorm_net)
    forward = wrap(with_is_training(transformed))
    params, state = forward.init(KEY, X)
    chex.assert_trees_all_close((params, state), transformed.init(KEY, X, is_training=True))

    state = forward.apply_train(params, state, KEY, X)[1]
    y_train, new_state = forward.apply_train(params, state, KEY, X2)
    expected_y, expected_state = transformed.apply(params, state, KEY, X2, is_training=True)
    chex.assert_trees_all_close((y_train, new_state), (expected_y, expected_state))
    # Batch statistics: every output channel has mean 0 over the batch.
    chex.assert_trees_all_close(jnp.mean(y_train, axis=0), jnp.zeros(4), atol=1e-4)
    moving = lambda s: s["batch_norm/~/mean_ema"]["average"]
    assert not np.allclose(moving(new_state), moving(state))  # the statistics moved

    for s in (state, new_state):  # Eval mode reads the moving averages it is given.
        chex.assert_trees_all_close(
            forward.apply_eval(params, s, KEY, X2),
            transformed.apply(params, s, KEY, X2, is_training=False)[0],
        )
    y_eval = forward.apply_eval(params, new_state, KEY, X2)
    assert not np.allclose(y_eval, y_train, atol=1e-2)
    assert not np.allclose(y_eval, forward.apply_eval(params, state, KEY, X2), atol=1e-2)


def _recording(seen):
    def f(x, training):
        seen.append(("init" if hk.running_init() else "apply", training))
        return x * hk.get_parameter("w", [], init=jnp.ones) * (2.0 if training else 1.0)

    return f


@pytest.mark.parametrize(
    "transform",
    [
        hk.transform,
        hk.transform_with_state,
        lambda f: hk.without_apply_rng(hk.transform(f)),
        lambda f: hk.without_apply_rng(hk.transform_with_state(f)),
    ],
    ids=["transform", "transform_with_state", "without_apply_rng", "without_apply_rng_state"],
)
def test_with_is_training_passes_the_flag_to_every_kind_of_transform(transform):
    seen = []
    forward = wrap(with_is_training(transform(_recording(seen)), name="training"))
    params, state = forward.init(KEY, X)
    y_train, new_state = forward.apply_train(params, state, KEY, X)
    y_eval = forward.apply_eval(params, state, None, X)
    assert seen == [("init", True), ("apply", True), ("apply", False)]
    chex.assert_trees_all_close((y_train, y_eval, new_state), (2.0 * X, X, state))


def test_with_is_training_summary_transform_runs_in_training_mode():
    seen = []
    forward = wrap(with_is_training(hk.transform_with_state(_recording(seen)), "training"))
    table = hk.experimental.tabulate(forward.transformed)(X)
    assert seen and all(training for _, training in seen)
    assert isinstance(table, str)


def test_with_is_training_returns_a_frozen_pair():
    transformed = hk.transform_with_state(batchnorm_net)
    flag = with_is_training(transformed)
    assert flag == TrainingFlag(transformed, "is_training")
    with pytest.raises(AttributeError):
        flag.name = "training"


def test_plain_function_with_is_training_is_unchanged():
    seen = []
    recording = _recording(seen)
    forward = wrap(lambda x, is_training: recording(x, is_training))
    params, state = forward.init(KEY, X)
    chex.assert_trees_all_close(forward.apply_train(params, state, KEY, X)[0], 2.0 * X)
    chex.assert_trees_all_close(forward.apply_eval(params, state, KEY, X), X)
    assert seen == [("init", True), ("apply", True), ("apply", False)]


@pytest.mark.parametrize(
    "transformed, kwargs, error, message",
    [
        (
            batchnorm_net,
            {},
            TypeError,
            r"Expected `transformed` to be an hk.Transformed or "
            r"hk.TransformedWithState .* Received: transformed of type function\. A plain function "
            r"with an `is_training` parameter gets the flag without with_is_training",
        ),
        (
            with_is_training(hk.transform(batchnorm_net)),
            {},
            TypeError,
            r"Received: transformed of type TrainingFlag\.",
        ),
        (
            hk.transform(batchnorm_net),
            {"name": 1},
            TypeError,
            r"Expected `name` to be a str, the name of the training flag argument\. "
            r"Received: name=1\.",
        ),
        (
            hk.transform(batchnorm_net),
            {"name": "is training"},
            ValueError,
            r"Expected `name` to be a Python identifier.* Received: name='is training'\.",
        ),
        (
            hk.transform(batchnorm_net),
            {"name": "training"},
            TypeError,
            r"Expected `transformed.apply` to take a keyword argument `training`\. Received: apply "
            r"with parameters \(params, rng, x, is_training\)\. Pass the name",
        ),
    ],
)
def test_with_is_training_bad_arguments(transformed, kwargs, error, message):
    with pytest.raises(error, match=message):
        with_is_training(transformed, **kwargs)


def test_docstring_examples_run():
    assert doctest.testmod(_forward).failed == 0
