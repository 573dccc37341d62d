"""Testing a custom Haiku layer with hkfit.testing.

The layer is a gated residual MLP block:

    h = dropout(gelu(hidden(LayerNorm(x))))        # dropout in training only
    y = x + sigmoid(gate(h)) * value(h)            # hidden, gate, value: hk.Linear

The value projection starts at zero, so a fresh block is the identity: a common
choice for deep residual stacks. Run with:

    pytest examples/test_custom_layer.py
"""

import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import optax
import pytest

from hkfit.testing import LayerTestCase, assert_compiles_once, check_layer

FEATURES = 8


class GatedResidualBlock(hk.Module):
    """Pre-norm MLP block whose update is scaled by a learned sigmoid gate."""

    def __init__(self, hidden_size: int, dropout_rate: float = 0.1, name: str | None = None):
        super().__init__(name=name)
        self.hidden_size = hidden_size
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        features = x.shape[-1]
        h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
        h = jax.nn.gelu(hk.Linear(self.hidden_size, name="hidden")(h))
        if is_training:
            h = hk.dropout(hk.next_rng_key(), self.dropout_rate, h)
        gate = jax.nn.sigmoid(hk.Linear(features, name="gate")(h))
        value = hk.Linear(features, w_init=jnp.zeros, name="value")(h)
        return x + gate * value


def forward(x, is_training):
    return GatedResidualBlock(hidden_size=16)(x, is_training)


# unittest style: LayerTestCase is a chex.TestCase with layer assertions.
class GatedResidualBlockTest(LayerTestCase):
    def setUp(self):
        super().setUp()
        self.x = jax.random.normal(jax.random.PRNGKey(1), (4, FEATURES))
        self.model = hk.transform_with_state(forward)
        self.params, self.state = self.model.init(jax.random.PRNGKey(2), self.x, is_training=True)

    def test_block_is_a_well_formed_layer(self):
        # One call checks every property, in eval mode and in train mode.
        report = self.assertLayer(
            forward, self.x, output_shape=(None, FEATURES), output_dtype=jnp.float32
        )
        print(report)  # Shown with `pytest -s`.
        self.assertIn("batch_independent[is_training=False]", report.checked)
        # Dropout draws random numbers in training, so rows are not compared there.
        self.assertIn("batch_independent[is_training=True]", report.skipped)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fresh_block_is_identity(self):
        apply = self.variant(functools.partial(self.model.apply, is_training=False))
        y, _ = apply(self.params, self.state, None, self.x)
        chex.assert_trees_all_close(y, self.x)

    def test_train_step_compiles_once(self):
        optimizer = optax.sgd(0.1)

        def train_step(params, opt_state, rng, x):
            def loss_fn(p):
                y, _ = self.model.apply(p, self.state, rng, x, is_training=True)
                return jnp.mean((y - 1.0) ** 2)

            grads = jax.grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state

        opt_state = optimizer.init(self.params)
        rng = jax.random.PRNGKey(3)
        args = (self.params, opt_state, rng)
        self.assertCompilesOnce(train_step, (*args, self.x), (*args, 2.0 * self.x))
        # A smaller last batch would compile a second program: pad it instead.
        with self.assertRaisesRegex(AssertionError, "traced 2 times"):
            assert_compiles_once(train_step, (*args, self.x), (*args, self.x[:2]))


# pytest style: plain functions work too.
def test_wrong_expected_width_is_reported():
    x = jnp.ones((4, FEATURES))
    with pytest.raises(
        AssertionError,
        match=r"output_shape\[is_training=False\] failed: "
        r"output has shape \(4, 8\), expected \(None, 9\)",
    ):
        check_layer(forward, x, output_shape=(None, FEATURES + 1))
