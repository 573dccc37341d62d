"""Metrics protocol: empty / update / merge / compute, exact under masks and merges."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkfit import metrics


class MetricsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_update_in_pieces_and_merge_equals_one_update(self):
        m = metrics.get("accuracy", y_true_shape=(6,), y_pred_shape=(6, 3))
        y_true = jnp.array([0, 1, 2, 0, 1, 2])
        y_pred = jax.nn.one_hot(jnp.array([0, 1, 1, 0, 2, 2]), 3)
        w = jnp.array([1.0, 1.0, 2.0, 0.0, 1.0, 1.0])
        update = self.variant(m.update)
        whole = update(m.empty(), y_true, y_pred, w)
        a = update(m.empty(), y_true[:3], y_pred[:3], w[:3])
        b = update(m.empty(), y_true[3:], y_pred[3:], w[3:])
        chex.assert_trees_all_close(m.merge(a, b), whole)
        np.testing.assert_allclose(
            m.compute(whole), (1 + 1 + 0 + 0 + 0 + 1) / 6
        )  # weighted hits / weights

    @chex.variants(with_jit=True, without_jit=True)
    def test_nan_in_a_padding_row_does_not_leak(self):
        m = metrics.get("mae")
        state = self.variant(m.update)(
            m.empty(), jnp.zeros((2, 1)), jnp.array([[1.0], [jnp.nan]]), jnp.array([1.0, 0.0])
        )
        np.testing.assert_allclose(m.compute(state), 1.0)


@pytest.mark.parametrize(
    "y_true_shape,y_pred_shape,loss,expected",
    [
        ((4,), (4, 3), None, metrics.sparse_categorical_accuracy),
        ((4, 3), (4, 3), None, metrics.categorical_accuracy),
        ((4,), (4, 1), "binary_crossentropy", metrics.binary_accuracy),
    ],
)
def test_accuracy_resolves_from_shapes(y_true_shape, y_pred_shape, loss, expected):
    assert (
        metrics.get(
            "accuracy", y_true_shape=y_true_shape, y_pred_shape=y_pred_shape, loss_name=loss
        ).fn
        is expected
    )


def test_binary_accuracy_threshold_follows_the_loss():
    logits_like = metrics.get(
        "accuracy", y_true_shape=(2,), y_pred_shape=(2, 1), loss_name="binary_crossentropy"
    )
    probability_like = metrics.get(
        "accuracy", y_true_shape=(2,), y_pred_shape=(2, 1), loss_name="mse"
    )
    y_true, y_pred = jnp.array([1.0, 0.0]), jnp.array([[0.3], [-0.2]])
    assert (
        float(
            logits_like.compute(
                logits_like.update(logits_like.empty(), y_true, y_pred, jnp.ones(2))
            )
        )
        == 1.0
    )
    assert (
        float(
            probability_like.compute(
                probability_like.update(probability_like.empty(), y_true, y_pred, jnp.ones(2))
            )
        )
        == 0.5
    )


def test_top_k_accuracy():
    y_pred = jnp.array([[0.1, 0.5, 0.4, 0.0], [0.9, 0.05, 0.03, 0.02]])
    np.testing.assert_allclose(metrics.top_k_accuracy(jnp.array([2, 3]), y_pred, k=2), [1.0, 0.0])
    m = metrics.TopKAccuracy(3)
    assert m.name == "top_3_accuracy"
    np.testing.assert_allclose(
        m.compute(m.update(m.empty(), jnp.array([2, 3]), y_pred, jnp.ones(2))), 0.5
    )
    # k larger than the number of classes counts every label as a hit
    np.testing.assert_allclose(metrics.top_k_accuracy(jnp.array([3, 3]), y_pred, k=10), [1.0, 1.0])


def test_callables_and_objects():
    def hits(t, p):
        return (t == p).astype(jnp.float32)

    m = metrics.get(hits)
    assert m.name == "hits"
    custom = metrics.Mean(hits, "my_hits")
    assert metrics.get(custom) is custom
