"""Data helpers: row counting, weights, finiteness, iterables and prefetching."""

import jax
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
    x, y, w = data.device_batch((np.ones((3, 2)), np.zeros(3)))
    np.testing.assert_array_equal(w, np.ones(3))
    with pytest.raises(ValueError, match="same number of rows"):
        data.device_batch((np.ones((3, 2)), np.zeros(2)))
    with pytest.raises(ValueError, match=r"tuple \(x, y\) or"):
        data.device_batch(np.ones((3, 2)))
