"""Every bad input to fit/evaluate/predict is refused clearly, before any step.

One test per kind of defect. Each error names the argument, and the parameters stay
bit-identical (a shared, compiled model checks that); a call that fails on a fresh model
leaves it fresh.
"""

import re

import haiku as hk
import jax
import numpy as np
import pytest

import hkfit

ROWS, FEATURES, CLASSES = 24, 4, 3


def forward(x):
    return hk.Linear(CLASSES)(x)


def new_model(**kwargs):
    return hkfit.Model(
        forward, loss="sparse_categorical_crossentropy", metrics=["accuracy"], **kwargs
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    return x, rng.integers(0, CLASSES, ROWS)


@pytest.fixture(scope="module")
def model(data):
    """A built and compiled model that the failing calls must leave untouched."""
    model = new_model()
    model.fit(*data, batch_size=8, verbose=0)
    return model


def params_of(model):
    return jax.tree_util.tree_map(np.array, (model.params, model.opt_state)), model.step


def assert_same(before, model):
    after = params_of(model)
    assert before[1] == after[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, before[0], after[0])


def refused(model, call, error, pattern):
    """``call()`` raises ``error`` matching ``pattern``; params and step are unchanged."""
    before = params_of(model)
    with pytest.raises(error, match=pattern):
        call()
    assert_same(before, model)


def batches(x, y, w=None, size=8):
    for i in range(0, len(x), size):
        part = (x[i : i + size], y[i : i + size])
        yield part if w is None else (*part, w[i : i + size])


# --- labels --------------------------------------------------------------------------


@pytest.mark.parametrize("label", [12, -1, 1.5, np.nan])
def test_sparse_labels_outside_the_classes_are_refused(model, data, label):
    x, y = data
    y = y.astype(np.float64 if isinstance(label, float) else np.int64)
    y[5] = label
    pattern = r"Expected `y` to hold integer class indices in \[0, 3\).*Received: y\[5\]="
    if label is np.nan:
        pattern = r"Expected finite values in `y`"
    refused(model, lambda: model.fit(x, y, verbose=0), ValueError, pattern)
    refused(model, lambda: model.evaluate(x, y, verbose=0), ValueError, pattern)


def test_sparse_labels_of_shape_n_1_train_like_flat_labels(data):
    x, y = data
    flat, column = new_model(), new_model()
    h1 = flat.fit(x, y, batch_size=8, verbose=0)
    h2 = column.fit(x, y[:, None], batch_size=8, verbose=0, validation_data=(x, y[:, None]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, flat.params, column.params)
    assert h1.history["loss"] == h2.history["loss"]
    assert h1.history["accuracy"] == h2.history["accuracy"]
    assert column.evaluate(x, y[:, None], verbose=0) == flat.evaluate(x, y, verbose=0)


def test_out_of_range_labels_in_an_iterable_stop_before_their_step(data):
    x, y = data
    bad = y.copy()
    bad[17] = CLASSES  # in the third batch of 8
    model = new_model()
    with pytest.raises(ValueError, match=r"Expected `y` to hold integer class indices"):
        model.fit(batches(x, bad), verbose=0)
    assert model.step < 2  # the bad batch never ran
    with pytest.raises(ValueError, match=r"`validation_data` to hold integer class indices"):
        model.fit(x, y, verbose=0, validation_data=batches(x, bad))


# --- weights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_weight,pattern",
    [
        ({0: -1.0}, r"class_weight` values to be finite numbers >= 0.*\{0: -1.0\}"),
        ({0: float("nan")}, r"class_weight` values to be finite numbers >= 0"),
        ({1: np.inf}, r"class_weight` values to be finite numbers >= 0"),
        ({1.5: 2.0}, r"class_weight` keys to be non-negative integer class indices.*1.5"),
        ({0: "heavy"}, r"class_weight` values to be finite numbers >= 0"),
    ],
)
def test_class_weight_follows_the_sample_weight_rules(model, data, class_weight, pattern):
    refused(
        model, lambda: model.fit(*data, class_weight=class_weight, verbose=0), ValueError, pattern
    )


def test_class_weight_absent_classes_refused_by_fit_only(model, data):
    x, y = data
    refused(
        model,
        lambda: model.fit(x, y, class_weight={7: 2.0}, verbose=0),
        ValueError,
        r"absent classes \[7\]",
    )
    zeros = np.zeros(4, np.int64)  # a batch without class 1
    logs = model.train_on_batch(x[:4], zeros, class_weight={0: 1.0, 1: 2.0})
    assert np.isfinite(logs["loss"])


@pytest.mark.parametrize(
    "weights,pattern",
    [
        (-np.ones(ROWS), r"`sample_weight` to hold finite values >= 0.*Received: -1.0"),
        (np.full(ROWS, np.nan), r"`sample_weight` to hold finite values >= 0"),
        (np.full(ROWS, 1e39), r"`sample_weight` to hold finite values >= 0"),
    ],
)
def test_weights_from_an_iterable_are_checked(model, data, weights, pattern):
    x, y = data
    refused(model, lambda: model.fit(batches(x, y, weights), verbose=0), ValueError, pattern)
    refused(model, lambda: model.evaluate(batches(x, y, weights), verbose=0), ValueError, pattern)


def test_weights_of_the_wrong_length_and_ignored_weights_are_refused(model, data):
    x, y = data
    short = ((x[:8], y[:8], np.ones(3)),)
    refused(
        model,
        lambda: model.fit(iter(short), verbose=0),
        ValueError,
        r"sample weights of a batch \(`sample_weight`.*8 rows.*Received: shape \(3,\)",
    )
    refused(
        model,
        lambda: model.evaluate(batches(x, y), sample_weight=np.ones(ROWS), verbose=0),
        ValueError,
        r"Expected `sample_weight=None` with an iterable `x`",
    )
    refused(
        model,
        lambda: model.fit(x, y, sample_weight=-np.ones(ROWS), verbose=0),
        ValueError,
        r"`sample_weight` to hold finite values >= 0",
    )


# --- values and dtypes -----------------------------------------------------------------


def test_float64_values_beyond_float32_are_refused(model, data):
    x, y = data
    wide = x.astype(np.float64)
    wide[2, 1] = 1e39
    refused(
        model,
        lambda: model.fit(wide, y, verbose=0),
        ValueError,
        r"Expected finite values in `x`\. Received: 1e\+39 at x\[2, 1\]\. It overflows float32",
    )


def test_one_row_without_its_batch_axis_is_refused(model, data):
    x = data[0]
    pattern = r"pass x\[None\]"
    refused(model, lambda: model.predict(x[0]), ValueError, pattern)
    fresh = new_model()
    with pytest.raises(ValueError, match=r"Expected `x` with a batch axis first.*pass x\[None\]"):
        fresh.predict(x[0])
    assert not fresh.built


def test_low_precision_and_integer_inputs_initialize_clearly(data):
    x, y = data
    half = new_model()
    half.fit(x.astype(np.float16), y, epochs=2, verbose=0)
    for leaf in jax.tree_util.tree_leaves(half.params):
        assert leaf.dtype == np.float32 and np.isfinite(leaf).all()
    for images in ((x * 40 + 128).clip(0, 255).astype(np.uint8), x > 0):
        fresh = new_model()
        with pytest.raises(TypeError, match=r"floating-point `x`.*x\.astype\(np\.float32\) / 255"):
            fresh.fit(images, y, verbose=0)
        assert not fresh.built
    tokens = hkfit.Model(
        lambda ids: hk.Linear(CLASSES)(hk.Embed(10, 4)(ids).mean(axis=1)),
        loss="sparse_categorical_crossentropy",
    )
    tokens.fit(np.arange(ROWS * 5).reshape(ROWS, 5) % 10, y, verbose=0)  # ids stay integers
    assert tokens.step == 1


# --- transactions ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(data):
    """A model that saw only the good call."""
    model = new_model()
    model.fit(*data, batch_size=8, verbose=0)
    return jax.tree_util.tree_map(np.array, model.params)


@pytest.mark.parametrize(
    "bad_call",
    [
        lambda m, x, y: m.predict(x[0]),
        lambda m, x, y: m.fit(x.astype(str), y, verbose=0),
        lambda m, x, y: m.fit(x, y + CLASSES, verbose=0),
        lambda m, x, y: m.fit(x[:, :2], y, verbose=0, sample_weight=np.ones(3)),
        lambda m, x, y: m.evaluate(x[:, :2], y, verbose=0, callbacks="oops"),
        lambda m, x, y: m.train_on_batch(x[:, 0], y),
    ],
    ids=["predict-row", "str-x", "labels", "weights", "callbacks", "train-on-batch"],
)
def test_a_failed_first_call_leaves_the_model_fresh(data, reference, bad_call):
    x, y = data
    model = new_model()
    with pytest.raises((ValueError, TypeError)):
        bad_call(model, x, y)
    assert not model.built and model._input_spec is None and model.metrics == []
    model.fit(x, y, batch_size=8, verbose=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reference, model.params)


# --- validation_data, batch_size, argument rules -----------------------------------------


@pytest.mark.parametrize(
    "validation_data,pattern",
    [
        (lambda x, y: (x[:5, :2], y[:5]), r"`validation_data\[0\]` with rows of shape \(4,\)"),
        (lambda x, y: (x[:5], y[:4]), r"`validation_data\[0\]` and `validation_data\[1\]`"),
        (lambda x, y: (x[:5] * np.nan, y[:5]), r"finite values in `validation_data\[0\]`"),
        (lambda x, y: [x[:5], y[:5] + 9], r"`validation_data\[1\]` to hold integer class"),
        (lambda x, y: (x[:5], y[:5], -np.ones(5)), r"`validation_data\[2\]` to hold finite"),
        (lambda x, y: x[:5], r"`validation_data` to be a tuple \(x, y\)"),
    ],
)
def test_validation_data_is_checked_before_any_step(model, data, validation_data, pattern):
    x, y = data
    call = lambda: model.fit(x, y, verbose=0, validation_data=validation_data(x, y))
    refused(model, call, ValueError, pattern)


def test_validation_data_may_be_a_list(data):
    x, y = data
    a, b = new_model(), new_model()
    ha = a.fit(x, y, verbose=0, validation_data=(x[:6], y[:6]))
    hb = b.fit(x, y, verbose=0, validation_data=[x[:6], y[:6]])
    assert ha.history == hb.history


def test_a_batch_size_above_the_row_count_is_capped(data):
    x, y = data
    exact, huge = new_model(), new_model()
    exact.fit(x, y, batch_size=ROWS, epochs=2, verbose=0)
    history = huge.fit(x, y, batch_size=10**12, epochs=2, verbose=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, exact.params, huge.params)
    assert history.params["batch_size"] == ROWS


def test_numpy_scalars_and_bools_are_accepted_and_bad_flags_refused(model, data):
    x, y = data
    model.fit(x, y, verbose=0, validation_split=np.float32(0.25), shuffle=np.bool_(False))
    cases = [
        ({"shuffle": "no"}, TypeError, r"Expected `shuffle` to be True or False.*'no'"),
        ({"shuffle": 1}, TypeError, r"Expected `shuffle` to be True or False"),
        ({"validation_freq": [0]}, ValueError, r"`validation_freq` to list 1-based epochs"),
        ({"validation_freq": [1.5]}, ValueError, r"`validation_freq` to list 1-based epochs"),
        ({"validation_split": np.float64(1.0)}, ValueError, r"`validation_split` in \[0, 1\)"),
        ({"validation_split": np.True_}, ValueError, r"`validation_split` in \[0, 1\)"),
    ]
    for kwargs, error, pattern in cases:
        refused(model, lambda: model.fit(x, y, verbose=0, **kwargs), error, pattern)
    refused(
        model,
        lambda: model.predict(iter([x[:4]]), steps_per_execution=0),
        ValueError,
        r"Expected `steps_per_execution`",
    )


# --- one input check at every entry point --------------------------------------------------

BAD_X = {
    "none": (lambda x: None, ValueError, r"Expected `x` to hold data.*Received: x=None"),
    "empty-dict": (lambda x: {}, ValueError, r"Expected `x` to hold data.*Received: x=\{\}"),
    "str": (lambda x: x.astype(str), TypeError, r"Expected numbers in `x`.*dtype <U"),
    "object": (lambda x: x.astype(object), TypeError, r"Expected numbers in `x`.*object"),
    "datetime": (
        lambda x: x.astype("datetime64[s]"),
        TypeError,
        r"Expected numbers in `x`.*datetime64",
    ),
    "complex": (lambda x: x.astype(complex), TypeError, r"Expected real numbers in `x`"),
    "shape": (lambda x: x[:, :2], ValueError, r"`x` with rows of shape \(4,\).*of shape \(24, 2\)"),
    "structure": (
        lambda x: {"image": x},
        ValueError,
        r"`x` with the structure the model was built on",
    ),
}

ENTRY_POINTS = {
    "fit": lambda m, x, y: m.fit(x, y, verbose=0),
    "evaluate": lambda m, x, y: m.evaluate(x, y, verbose=0),
    "predict": lambda m, x, y: m.predict(x),
    "train_on_batch": lambda m, x, y: m.train_on_batch(x, y),
    "test_on_batch": lambda m, x, y: m.test_on_batch(x, y),
    "predict_on_batch": lambda m, x, y: m.predict_on_batch(x),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("kind", sorted(BAD_X))
def test_unusable_inputs_are_refused_at_every_entry_point(model, data, entry, kind):
    x, y = data
    make, error, pattern = BAD_X[kind]
    bad = make(x)
    refused(model, lambda: ENTRY_POINTS[entry](model, bad, y), error, pattern)


def test_unusable_labels_are_refused_naming_y(model, data):
    x, y = data
    refused(
        model,
        lambda: model.fit(x, y.astype(str), verbose=0),
        TypeError,
        re.escape("Expected numbers in `y`"),
    )
