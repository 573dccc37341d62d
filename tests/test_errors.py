"""Bad input: a clear ValueError/TypeError before any step, and the parameters untouched."""

import re

import haiku as hk
import jax
import numpy as np
import pytest

import hkfit


def forward(x):
    return hk.Linear(3)(x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 3, size=20)


@pytest.fixture
def model(data):
    model = hkfit.Model(forward, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.init(data[0])
    return model


def snapshot(model):
    return jax.tree_util.tree_map(np.array, (model.params, model.opt_state)), model.step


def assert_untouched(model, before):
    after = snapshot(model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before[0], after[0])
    assert before[1] == after[1] == 0


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (
            {"batch_size": 0},
            ValueError,
            "Expected `batch_size` to be an int >= 1. Received: batch_size=0",
        ),
        ({"batch_size": 2.5}, ValueError, "Received: batch_size=2.5"),
        ({"batch_size": True}, ValueError, "Received: batch_size=True"),
        ({"epochs": 2, "initial_epoch": 3}, ValueError, "epochs=2, initial_epoch=3"),
        ({"epochs": -1}, ValueError, "Expected `epochs` to be an int >= 0"),
        (
            {"validation_split": 1.0},
            ValueError,
            r"Expected `validation_split` in \[0, 1\). Received: validation_split=1.0",
        ),
        ({"validation_split": -0.1}, ValueError, "validation_split=-0.1"),
        (
            {"validation_split": 0.99},
            ValueError,
            "leaves 0 training and 20 validation rows out of 20",
        ),
        ({"class_weight": {0: 1.0, 7: 2.0}}, ValueError, r"absent classes \[7\]"),
        ({"sample_weight": np.ones(5)}, ValueError, r"Expected `sample_weight` of shape \(20,\)"),
        ({"verbose": 3}, ValueError, "Expected `verbose` to be 'auto', 0, 1 or 2"),
        (
            {"steps_per_execution": 0},
            ValueError,
            "Expected `steps_per_execution` to be 'auto' or an int >= 1",
        ),
        ({"validation_freq": "often"}, TypeError, "Expected `validation_freq`"),
        ({"steps_per_epoch": 0}, ValueError, "Expected `steps_per_epoch` to be an int >= 1"),
    ],
)
def test_bad_fit_arguments(model, data, kwargs, error, pattern):
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        model.fit(*data, **{"verbose": 0, **kwargs})
    assert_untouched(model, before)


def test_x_and_y_of_different_lengths(model, data):
    before = snapshot(model)
    with pytest.raises(ValueError, match="x has 20 rows, y has 19"):
        model.fit(data[0], data[1][:19], verbose=0)
    with pytest.raises(ValueError, match="same number of rows"):
        model.evaluate(data[0], data[1][:19], verbose=0)
    assert_untouched(model, before)


def test_pytree_inputs_of_different_lengths():
    def two(x):
        return hk.Linear(3)(x["a"]) + hk.Linear(3)(x["b"])

    model = hkfit.Model(two, loss="mse")
    x = {"a": np.ones((10, 2), np.float32), "b": np.ones((9, 2), np.float32)}
    with pytest.raises(ValueError, match=re.escape("x['a']: 10, x['b']: 9")):
        model.fit(x, np.ones((10, 3), np.float32), verbose=0)
    assert not model.built


def test_empty_dataset(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="Expected a non-empty dataset"):
        model.fit(np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), verbose=0)
    with pytest.raises(ValueError, match="Expected a non-empty dataset"):
        hkfit.Model(forward, loss="mse").fit(iter([]), verbose=0)
    with pytest.raises(ValueError, match="at least one row"):
        model.predict(np.zeros((0, 4), np.float32))
    assert_untouched(model, before)


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_refused(model, data, where, bad):
    x, y = data[0].copy(), data[1].astype(np.float32)
    (x if where == "x" else y)[3] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"Expected finite values in `{where}`.*{where}\[3"):
        model.fit(x, y, verbose=0)
    assert_untouched(model, before)
    # the check can be turned off (then NaN simply flows through the maths)
    if where == "x":
        hkfit.Model(forward, loss="sparse_categorical_crossentropy").fit(
            x, data[1], verbose=0, check_inputs=False
        )


def test_validation_split_with_an_iterable(model, data):
    batches = [(data[0][:10], data[1][:10])]
    with pytest.raises(ValueError, match="`validation_split` needs array inputs"):
        model.fit(batches, validation_split=0.2, verbose=0)
    with pytest.raises(ValueError, match="`class_weight` and `sample_weight` need array inputs"):
        model.fit(batches, class_weight={0: 1.0}, verbose=0)


def test_missing_targets(model, data):
    with pytest.raises(ValueError, match="Expected targets `y`"):
        model.fit(data[0], verbose=0)
    with pytest.raises(ValueError, match="Expected targets `y`"):
        model.evaluate(data[0], verbose=0)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (
            {"loss": "crossentropy"},
            ValueError,
            "Unknown `loss` name. Expected one of .*'mse'.*Received: loss='crossentropy'",
        ),
        ({"loss": 3}, TypeError, "Expected `loss` to be a loss name or a callable"),
        (
            {"loss": "mse", "optimizer": "adamax"},
            ValueError,
            r"Unknown `optimizer` name. Expected one of \['adam', 'adamw', 'rmsprop', 'sgd'\]",
        ),
        (
            {"loss": "mse", "optimizer": 0.1},
            TypeError,
            "Expected `optimizer` to be a name or an optax.GradientTransformation",
        ),
        (
            {"loss": "mse", "metrics": ["acuracy"]},
            ValueError,
            "Unknown metric name in `metrics`. Expected one of .*'accuracy'.*Received: 'acuracy'",
        ),
        ({"loss": "mse", "metrics": "accuracy"}, TypeError, "Expected `metrics` to be a list"),
        ({"loss": "mse", "metrics": [42]}, TypeError, "Expected each entry of `metrics`"),
        (
            {"loss": "mse", "seed": "zero"},
            TypeError,
            "Expected `seed` to be an int or a JAX PRNG key",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        hkfit.Model(forward, **kwargs)


def test_forward_that_is_not_callable():
    with pytest.raises(TypeError, match="Expected `forward` to be a function using Haiku modules"):
        hkfit.Model("not a function", loss="mse")


@pytest.mark.parametrize(
    "loss,y,pattern",
    [
        ("sparse_categorical_crossentropy", np.zeros((20, 3), np.int32), "integer labels of shape"),
        (
            "categorical_crossentropy",
            np.zeros((20,), np.float32),
            "labels and outputs of the same shape",
        ),
        ("mse", np.zeros((20, 5), np.float32), r"forward output shape \(2, 3\).*y shape \(2, 5\)"),
        # a loss must keep the batch axis (per-token [batch, ...] losses are fine)
        (lambda t, p: ((t - p) ** 2).sum(), np.zeros((20, 3), np.float32), r"a loss of shape"),
    ],
)
def test_forward_output_that_does_not_match_y(data, loss, y, pattern):
    model = hkfit.Model(forward, loss=loss)
    model.init(data[0])
    before = snapshot(model)
    with pytest.raises(ValueError, match="The output of `forward` does not match `y`.*" + pattern):
        model.fit(data[0], y, verbose=0)
    assert_untouched(model, before)


def test_params_needed_before_use():
    model = hkfit.Model(forward, loss="mse")
    with pytest.raises(ValueError, match="`params` needs parameters: call `fit`, `init"):
        model.params
    with pytest.raises(ValueError, match="`summary` needs parameters"):
        model.summary()


def test_callbacks_must_be_callbacks(model, data):
    with pytest.raises(TypeError, match="Expected every entry of `callbacks`"):
        model.fit(*data, verbose=0, callbacks=[print])


def test_bad_metric_and_optimizer_names_list_valid_choices():
    assert "sparse_categorical_crossentropy" in hkfit.losses.names()
    assert {"accuracy", "top_k_accuracy", "mae"} <= set(hkfit.metrics.names())
    assert hkfit.optimizers.names() == ["adam", "adamw", "rmsprop", "sgd"]
    with pytest.raises(ValueError, match="Expected `k` to be an int >= 1"):
        hkfit.metrics.TopKAccuracy(0)
