"""Losses by name: per-example values that match optax and the textbook formulas."""

import chex
import jax.numpy as jnp
import optax
import pytest

from hkfit import losses


class LossesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sparse_and_categorical_crossentropy_agree(self):
        logits = jnp.array([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
        labels = jnp.array([0, 2])
        sparse = self.variant(losses.sparse_categorical_crossentropy)(labels, logits)
        dense = self.variant(losses.categorical_crossentropy)(jnp.eye(3)[labels], logits)
        chex.assert_shape(sparse, (2,))
        chex.assert_trees_all_close(sparse, dense, atol=1e-6)
        expected = -jnp.take_along_axis(jax_log_softmax(logits), labels[:, None], 1)[:, 0]
        chex.assert_trees_all_close(sparse, expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_regression_losses_average_features(self):
        y_true = jnp.zeros((2, 3))
        y_pred = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, -3.0]])
        chex.assert_trees_all_close(
            self.variant(losses.mse)(y_true, y_pred), jnp.array([14 / 3, 3.0])
        )
        chex.assert_trees_all_close(self.variant(losses.mae)(y_true, y_pred), jnp.array([2.0, 1.0]))
        huber = self.variant(losses.huber)(y_true, y_pred)
        chex.assert_trees_all_close(huber, jnp.array([(0.5 + 1.5 + 2.5) / 3, 2.5 / 3]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_binary_crossentropy_accepts_flat_labels_for_one_logit(self):
        logits = jnp.array([[0.0], [3.0]])
        flat = self.variant(losses.binary_crossentropy)(jnp.array([1.0, 0.0]), logits)
        expected = optax.losses.sigmoid_binary_cross_entropy(logits[:, 0], jnp.array([1.0, 0.0]))
        chex.assert_trees_all_close(flat, expected, atol=1e-6)


def jax_log_softmax(x):
    return x - jnp.log(jnp.sum(jnp.exp(x), axis=-1, keepdims=True))


def test_names_and_callables():
    assert losses.get("mean_squared_error") is losses.mse
    custom = lambda t, p: jnp.abs(t - p).sum(-1)
    assert losses.get(custom) is custom
    assert set(losses.names()) >= {
        "sparse_categorical_crossentropy",
        "categorical_crossentropy",
        "binary_crossentropy",
        "mse",
        "mae",
        "huber",
    }
    with pytest.raises(ValueError, match="Unknown `loss` name"):
        losses.get("hinged")
