"""Data helpers: row counting, weights, finiteness, iterables and prefetching."""

import doctest
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkfit import _data as data


def test_is_array_tree():
    assert data.is_array_tree(np.ones(3))
    assert data.is_array_tree({"a": np.ones(3), "b": (np.ones(3), jax.numpy.ones(3))})
    assert not data.is_array_tree(iter([np.ones(3)]))
    assert not data.is_array_tree([])
    assert not data.is_array_tree({"a": np.ones(3), "b": "text"})


def test_row_weights_combine_sample_and_class_weights():
    y = np.array([0, 1, 1, 2])
    w = data.row_weights(4, y, np.array([1.0, 2.0, 3.0, 4.0]), {1: 0.5})
    np.testing.assert_allclose(w, [1.0, 1.0, 1.5, 4.0])
    np.testing.assert_allclose(data.class_weights_for(np.eye(3)[y], {2: 3.0}), [1, 1, 1, 3])
    with pytest.raises(ValueError, match="finite values >= 0"):
        data.row_weights(2, y[:2], np.array([1.0, -1.0]), None)
    with pytest.raises(TypeError, match="Expected `class_weight` to be a dict"):
        data.class_weights_for(y, [1.0, 2.0])


def test_check_finite_names_the_leaf_and_index():
    x = {"a": np.ones((2, 2)), "b": np.array([[1.0, 2.0], [np.inf, 0.0]])}
    with pytest.raises(ValueError, match=r"inf at x\['b'\]\[1, 0\]"):
        data.check_finite(x, "x")
    data.check_finite({"ids": np.array([1, 2])}, "x")  # integers are always finite


def test_prefetcher_keeps_order_and_runs_ahead():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield i

    prefetched = data.Prefetcher(source(), lambda v: v * 10, size=2)
    assert next(prefetched) == 0
    assert pulled == [0, 1, 2]  # two batches ahead of the one in use
    assert list(prefetched) == [10, 20, 30, 40]


def test_iterate_stops_after_steps_without_pulling_more():
    it = iter(range(10))
    assert list(data.iterate(it, 3)) == [0, 1, 2]
    assert next(it) == 3


def test_device_batch_fills_weights_and_checks_rows():
    _, _, w, mask = data.device_batch((np.ones((3, 2)), np.zeros(3)))
    np.testing.assert_array_equal(w, np.ones(3))
    np.testing.assert_array_equal(mask, np.ones(3))
    with pytest.raises(ValueError, match="same number of rows"):
        data.device_batch((np.ones((3, 2)), np.zeros(2)))
    with pytest.raises(ValueError, match=r"tuple \(x, y\) or"):
        data.device_batch(np.ones((3, 2)))


@pytest.mark.parametrize("key", ["cat", 1.5, -1, None, True])
def test_class_weight_rejects_keys_that_are_not_class_indices(key):
    with pytest.raises(
        ValueError,
        match=r"Expected `class_weight` keys to be non-negative "
        r"integer class indices\. Received: class_weight keys \[",
    ):
        data.class_weights_for(np.array([0, 1]), {0: 1.0, key: 2.0})


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -0.5, "2", None])
def test_class_weight_rejects_weights_that_are_not_finite_and_non_negative(weight):
    with pytest.raises(
        ValueError,
        match=r"Expected `class_weight` values to be finite numbers "
        r">= 0\. Received: class_weight items \{1: ",
    ):
        data.class_weights_for(np.array([0, 1]), {0: 1.0, 1: weight})


def test_class_weight_accepts_integer_labels_in_any_numeric_form():
    expected = [1.0, 2.0, 2.0]
    for y in (
        np.array([0, 1, 1]),
        np.array([[0], [1], [1]]),
        np.array([0.0, 1.0, 1.0]),
        np.array([False, True, True]),
        np.eye(2, dtype=np.float32)[[0, 1, 1]],
    ):
        np.testing.assert_array_equal(data.class_weights_for(y, {np.int64(1): 2}), expected)


@pytest.mark.parametrize(
    "y, message",
    [
        (
            np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]),
            r"row 0 is not one-hot: \[1\.0, 1\.0, 0\.0\]",
        ),
        (np.array([[0.9, 0.1], [0.1, 0.9]]), r"row 0 is not one-hot"),  # label smoothing
        (np.array([[0.0, 1.0], [0.0, 0.0]]), r"row 1 is not one-hot"),
        (np.array([0.0, 0.5]), r"non-negative integer labels\. Received: y\[1\]=0\.5"),
        (np.array([[0], [-1]]), r"non-negative integer labels\. Received: y\[1\]=-1"),
        (np.array([0.0, np.nan]), r"Received: y\[1\]=nan"),
        (np.zeros((2, 2, 2)), r"class labels\. Received: y of shape \(2, 2, 2\)"),
        (np.array(["a", "b"]), r"class labels\. Received: y of shape \(2,\) and dtype <U1"),
    ],
)
def test_class_weight_needs_integer_or_one_hot_labels(y, message):
    with pytest.raises(
        ValueError,
        match=message + r".*integer class labels \[n\] or one-hot "
        r"labels \[n, classes\]",
    ):
        data.class_weights_for(y, {0: 2.0})


def test_checked_arrays_narrows_64_bit_dtypes_once_on_the_host():
    x = {
        "f": np.ones((4, 3)),
        "c": np.ones(4, np.complex128),
        "u": np.ones(4, np.uint64),
        "keep": np.ones(4, np.float16),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y, n = data.checked_arrays(x, np.arange(4, dtype=np.int64))
        w = data.row_weights(n, y, np.ones(4), {1: 2.0})
        batch = jax.device_put((x, y, w))
        # The engine builds padding and input specs from host dtypes: no truncation warning.
        jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), (x, y, w))
    assert {k: v.dtype for k, v in x.items()} == {
        "f": np.float32,
        "c": np.complex64,
        "u": np.uint32,
        "keep": np.float16,
    }
    assert y.dtype == np.int32 and w.dtype == np.float32
    chex.assert_trees_all_equal(batch, (x, y, w))


def test_to_device_dtypes_keeps_other_dtypes_and_everything_under_x64():
    tree = {
        "bf16": np.ones(2, jnp.bfloat16),
        "i8": np.ones(2, np.int8),
        "b": np.ones(2, bool),
        "jax": jnp.ones(2),
        "f64": np.ones(2),
    }
    narrowed = data.to_device_dtypes(tree)
    for name in ("bf16", "i8", "b", "jax"):
        assert narrowed[name] is tree[name]
    assert narrowed["f64"].dtype == np.float32
    jax.config.update("jax_enable_x64", True)
    try:
        assert data.to_device_dtypes(tree)["f64"].dtype == np.float64
        assert data.to_numpy([1, 2])[0].dtype == np.int64
    finally:
        jax.config.update("jax_enable_x64", False)


def test_to_device_dtypes_rejects_integers_beyond_32_bits():
    with pytest.raises(
        ValueError,
        match=r"Expected the integers in `y\['ids'\]` to fit in "
        r"int32 .* Received: values from 0 to 4294967296\. Enable",
    ):
        data.to_device_dtypes({"ids": np.array([0, 2**32])}, "y")


def test_check_finite_catches_nan_in_bfloat16_and_float8():
    with pytest.raises(
        ValueError,
        match=r"Expected finite values in `x`\. Received: nan at "
        r"x\[1\]",
    ):
        data.check_finite(np.array([1, np.nan], dtype=jnp.bfloat16), "x")
    with pytest.raises(ValueError, match=r"at x\['a'\]\[0\]"):
        data.check_finite({"a": np.array([np.nan, 1], dtype=jnp.float8_e4m3fn)}, "x")
    data.check_finite(np.array([1, 2], dtype=jnp.bfloat16), "x")


SPEC = jax.ShapeDtypeStruct((1, 3), jnp.float32)


def test_check_input_spec_accepts_any_batch_size_and_dtype():
    data.check_input_spec(np.zeros((7, 3)), SPEC)
    data.check_input_spec(np.zeros((1, 3), np.int32), SPEC)  # dtypes are not checked
    data.check_input_spec(
        {"a": np.zeros((2, 3)), "b": np.zeros((2,))},
        {"a": SPEC, "b": jax.ShapeDtypeStruct((1,), jnp.int32)},
    )


def test_check_input_spec_suggests_the_batch_axis_for_one_example():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected `x` with rows of shape (3,) (the model was built on inputs of shape "
            "(None, 3)). Received: x of shape (3,). It looks like one example without its "
            "batch axis: pass x[None] (or np.expand_dims(x, 0))."
        ),
    ):
        data.check_input_spec(np.zeros(3), SPEC)


def test_check_input_spec_names_the_leaf_with_other_rows():
    spec = {"a": SPEC, "b": jax.ShapeDtypeStruct((1, 2, 2), jnp.float32)}
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected `inputs['b']` with rows of shape (2, 2) (the model was built on inputs "
            "of shape (None, 2, 2)). Received: inputs['b'] of shape (4, 2, 3)."
        ),
    ):
        data.check_input_spec({"a": np.zeros((4, 3)), "b": np.zeros((4, 2, 3))}, spec, "inputs")
    with pytest.raises(ValueError, match=r"pass x\['b'\]\[None\]"):
        data.check_input_spec({"a": np.zeros((1, 3)), "b": np.zeros((2, 2))}, spec)
    with pytest.raises(ValueError, match=r"Received: x of shape \(\)\."):
        data.check_input_spec(np.float32(1.0), jax.ShapeDtypeStruct((1,), jnp.float32))


def test_check_input_spec_names_both_structures():
    with pytest.raises(
        ValueError,
        match=r"Expected `x` with the structure the model was built "
        r"on: PyTreeDef\(\{'a': \*\}\)\. Received: x with structure "
        r"PyTreeDef\(\{'b': \*\}\)",
    ):
        data.check_input_spec({"b": np.zeros((2, 3))}, {"a": SPEC})
    with pytest.raises(ValueError, match=r"structure PyTreeDef\(\*\)"):
        data.check_input_spec(np.zeros((2, 3)), (SPEC, SPEC))


def test_docstring_examples_run():
    assert doctest.testmod(data).failed == 0


def test_the_fast_finiteness_pass_falls_back_to_the_exact_check():
    big = np.full((4, 3), 3e38, np.float32)  # finite, but its sum overflows to inf
    data.check_finite(big, "x")
    big[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"x\[2, 1\]"):
        data.check_finite(big, "x")
