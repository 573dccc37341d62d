"""Fuzzing fit/evaluate/predict: every case is refused cleanly or trains to finite params.

For each generated case, either the call raises ValueError/TypeError and the parameters,
optimizer state and step are bit-identical to before, or it succeeds with finite
parameters and a finite loss. Cases known to be invalid (bad labels, weights, values or
arguments) must raise: nothing is accepted silently. The cases run on one small shared
model, with few distinct shapes so that compilations stay few; ``derandomize=True``
makes the run the same everywhere.
"""

import haiku as hk
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hkfit

ROWS, FEATURES, CLASSES = 12, 4, 3
FIT_EXAMPLES = 2000

DTYPES = ["float32", "float16", "float64", "int32", "uint8", "bool", "complex64"]
LABELS = ["valid", "column", "negative", "too_large", "fractional"]
WEIGHTS = ["none", "ones", "negative", "nan", "short"]

# fit's inputs: the values that must train, and those that must be refused.
VALID = {
    "dtype": DTYPES[:-1],
    "values": ["plain"],
    "labels": LABELS[:2],
    "weights": WEIGHTS[:2],
    "class_weight": [None, {0: 2.0}, {np.int64(2): 0.5}],
    "batch_size": [4, np.int64(5), 10**6],
    "validation_split": [0.0, np.float32(0.25)],
    "shuffle": [True, False, np.bool_(True)],
    "validation_freq": [1, [1], 2],
}
INVALID = {
    "dtype": ["complex64"],
    "values": ["nan", "inf", "huge"],
    "labels": LABELS[2:],
    "weights": WEIGHTS[2:],
    "class_weight": [{0: -1.0}, {1: float("nan")}, {1: np.inf}, {1.5: 1.0}, {7: 1.0}, [1.0]],
    "batch_size": [0, -1, 2.5, True],
    "validation_split": [1.0, -0.1, np.float64(1.5), "0.2", np.True_],
    "shuffle": ["no", 1, None],
    "validation_freq": [[0], 0, "often", [1.5]],
}


@st.composite
def fit_cases(draw):
    """A case with at most one invalid field (which one, if any, comes first)."""
    corrupt = draw(st.sampled_from([None, None, None, *VALID]))
    case = {
        field: draw(st.sampled_from(INVALID[field] if field == corrupt else VALID[field]))
        for field in VALID
    }
    if corrupt == "values":  # NaN, Inf and 1e39 need a floating-point dtype
        case["dtype"] = draw(st.sampled_from(["float32", "float16", "float64"]))
    return corrupt, case


@pytest.fixture(scope="module")
def model():
    model = hkfit.Model(
        lambda x: hk.Linear(CLASSES)(x),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.init(np.zeros((ROWS, FEATURES), np.float32))
    return model


def snapshot(model):
    return jax.tree_util.tree_map(np.array, (model.params, model.opt_state)), model.step


def assert_unchanged(before, model):
    after = snapshot(model)
    assert before[1] == after[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, before[0], after[0])


def assert_finite(model):
    for leaf in jax.tree_util.tree_leaves(model.params):
        assert np.isfinite(np.asarray(leaf)).all()


def make_x(dtype, values="plain", seed=0):
    x = np.random.default_rng(seed).normal(size=(ROWS, FEATURES))
    x = {"uint8": np.abs(x) * 50, "int32": x * 10}.get(dtype, x)
    x = x.astype(dtype) if dtype != "bool" else x > 0
    if values != "plain":
        x = x.astype(np.float64 if values == "huge" else x.dtype)
        x[3, 1] = {"nan": np.nan, "inf": np.inf, "huge": 1e39}[values]
    return x


def make_y(kind):
    y = np.arange(ROWS) % CLASSES  # every class in any part of a split
    if kind == "column":
        return y[:, None], False
    if kind == "valid":
        return y, False
    y = y.astype(np.float64 if kind == "fractional" else np.int64)
    y[5] = {"negative": -1, "too_large": CLASSES, "fractional": 1.5}[kind]
    return y, True


def make_weights(kind):
    weights = {
        "none": None,
        "ones": np.ones(ROWS),
        "negative": -np.ones(ROWS),
        "nan": np.full(ROWS, np.nan),
        "short": np.ones(ROWS - 1),
    }[kind]
    return weights, kind not in ("none", "ones")


@settings(
    max_examples=FIT_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(fit_cases())
def test_fit_refuses_or_trains_finite(model, corrupted_case):
    corrupt, case = corrupted_case
    event(f"invalid {corrupt}" if corrupt else "valid")  # see --hypothesis-show-statistics
    x = make_x(case["dtype"], case["values"])
    y, _ = make_y(case["labels"])
    w, _ = make_weights(case["weights"])
    before = snapshot(model)
    try:
        history = model.fit(
            x,
            y,
            batch_size=case["batch_size"],
            validation_split=case["validation_split"],
            shuffle=case["shuffle"],
            validation_freq=case["validation_freq"],
            sample_weight=w,
            class_weight=case["class_weight"],
            verbose=0,
        )
    except (ValueError, TypeError):
        assert corrupt is not None, f"a valid case was refused: {case}"
        assert_unchanged(before, model)
        return
    assert corrupt is None, f"an invalid {corrupt!r} was accepted: {case}"
    assert_finite(model)
    assert np.isfinite(history.history["loss"]).all()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    call=st.sampled_from(["evaluate", "predict", "test_on_batch", "predict_on_batch"]),
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from(["rows", "one_row", "features", "extra_axis", "dict"]),
    labels=st.sampled_from(LABELS),
    weights=st.sampled_from(WEIGHTS),
    batch_size=st.sampled_from([5, 10**6, 0]),
)
def test_inference_refuses_or_returns_finite(
    model, call, dtype, shape, labels, weights, batch_size
):
    x = make_x(dtype)
    x = {
        "rows": x,
        "one_row": x[0],
        "features": x[:, :2],
        "extra_axis": x[..., None],
        "dict": {"x": x},
    }[shape]
    y, bad_y = make_y(labels)
    w, bad_w = make_weights(weights)
    takes_y = call in ("evaluate", "test_on_batch")
    must_fail = shape != "rows" or dtype == "complex64" or (takes_y and (bad_y or bad_w))
    must_fail |= batch_size == 0 and call in ("evaluate", "predict")
    before = snapshot(model)
    try:
        if call == "evaluate":
            result = model.evaluate(x, y, sample_weight=w, batch_size=batch_size, verbose=0)
        elif call == "test_on_batch":
            result = model.test_on_batch(x, y, sample_weight=w)
        elif call == "predict":
            result = model.predict(x, batch_size=batch_size)
        else:
            result = model.predict_on_batch(x)
    except (ValueError, TypeError):
        assert_unchanged(before, model)
        return
    assert not must_fail, "an invalid case was accepted"
    assert_unchanged(before, model)
    values = list(result.values()) if isinstance(result, dict) else [result]
    assert all(np.isfinite(v).all() for v in values)
    if not takes_y:
        assert np.shape(result) == (ROWS, CLASSES)
