"""Pure step functions: they lower the loss, update BatchNorm only in training, mask rows."""

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

from hkfit import losses, metrics
from hkfit import step as step_lib
from hkfit.step import Batch, TrainState


def _bn_forward(x, is_training):
    x = hk.Linear(8)(x)
    x = hk.BatchNorm(True, True, 0.9)(x, is_training)
    return hk.Linear(3)(jax.nn.relu(x))


def _setup(forward=_bn_forward, n=16, seed=0):
    transformed = hk.transform_with_state(forward)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    params, state = transformed.init(jax.random.key(0), x, is_training=True)
    optimizer = optax.sgd(0.1)
    ts = TrainState(
        params, state, optimizer.init(params), jax.random.key(1), jnp.zeros((), jnp.int32)
    )

    def apply_train(p, s, r, x_):
        return transformed.apply(p, s, r, x_, is_training=True)

    def apply_eval(p, s, x_):
        return transformed.apply(p, s, None, x_, is_training=False)[0]

    acc = [metrics.get("accuracy", y_true_shape=(n,), y_pred_shape=(n, 3))]
    train_step = step_lib.make_train_step(
        apply_train, losses.get("sparse_categorical_crossentropy"), optimizer, acc
    )
    eval_step = step_lib.make_eval_step(
        apply_eval, losses.get("sparse_categorical_crossentropy"), acc
    )
    return ts, Batch(x, y, np.ones(n, np.float32)), train_step, eval_step, acc


class StepTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_train_step_lowers_loss(self):
        ts, batch, train_step, eval_step, acc = _setup()
        train = self.variant(train_step)
        evaluate = self.variant(eval_step)
        before = step_lib.compute_logs(
            evaluate(ts.params, ts.state, step_lib.empty_logs(acc), batch), acc
        )
        for _ in range(20):
            ts, _ = train(ts, step_lib.empty_logs(acc), batch)
        after = step_lib.compute_logs(
            evaluate(ts.params, ts.state, step_lib.empty_logs(acc), batch), acc
        )
        self.assertLess(after["loss"], before["loss"] * 0.8)
        self.assertEqual(int(ts.step), 20)

    @chex.variants(with_jit=True, without_jit=True)
    def test_batchnorm_state_updates_in_train_mode_only(self):
        ts, batch, train_step, eval_step, acc = _setup()
        new_ts, _ = self.variant(train_step)(ts, step_lib.empty_logs(acc), batch)
        for name in ("batch_norm/~/mean_ema", "batch_norm/~/var_ema"):
            for leaf in ("hidden", "counter"):  # the moving averages advanced
                self.assertTrue(bool(jnp.any(ts.state[name][leaf] != new_ts.state[name][leaf])))
        # eval_step returns only logs: the state it was given is all it can read
        logs = self.variant(eval_step)(ts.params, ts.state, step_lib.empty_logs(acc), batch)
        self.assertEqual(
            jax.tree_util.tree_structure(logs),
            jax.tree_util.tree_structure(step_lib.empty_logs(acc)),
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_rows_have_zero_gradient(self):
        def forward(x):
            return hk.Linear(3)(x)

        ts, batch, train_step, _, acc = _setup(forward=lambda x, is_training: forward(x))
        x = np.array(batch.x)
        x_corrupt = x.copy()
        x_corrupt[8:] = 1e3  # rows with weight 0: must change nothing
        weights = np.r_[np.ones(8), np.zeros(8)].astype(np.float32)
        train = self.variant(train_step)
        # padding rows: weight 0 and mask 0 (plain metrics see the mask only)
        ts_a, logs_a = train(ts, step_lib.empty_logs(acc), Batch(x, batch.y, weights, weights))
        ts_b, logs_b = train(
            ts, step_lib.empty_logs(acc), Batch(x_corrupt, batch.y, weights, weights)
        )
        chex.assert_trees_all_close(ts_a.params, ts_b.params, atol=0, rtol=0)
        self.assertEqual(step_lib.compute_logs(logs_a, acc), step_lib.compute_logs(logs_b, acc))

    def test_gradient_of_masked_rows_is_exactly_zero(self):
        weights = jnp.array([1.0, 0.0, 2.0])
        grad = jax.grad(lambda v: step_lib.weighted_mean(v, weights))(
            jnp.array([1.0, jnp.nan, 3.0])
        )
        chex.assert_trees_all_close(grad, jnp.array([1 / 3, 0.0, 2 / 3]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_weighted_mean_matches_definition(self):
        values, weights = jnp.array([1.0, 2.0, 4.0]), jnp.array([0.5, 0.0, 1.5])
        got = self.variant(step_lib.weighted_mean)(values, weights)
        chex.assert_trees_all_close(got, (0.5 * 1 + 1.5 * 4) / 2.0)


class FusedTest(parameterized.TestCase):
    def test_fused_steps_equal_single_steps(self):
        ts, batch, train_step, _, acc = _setup(n=32)
        data = jax.device_put(batch)
        idx = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
        run = jax.jit(step_lib.make_fused_train(train_step))
        fused, logs_fused = run(ts, step_lib.empty_logs(acc), data, idx, 0, 4)
        single, logs_single = ts, step_lib.empty_logs(acc)
        for b in range(4):
            single, logs_single = run(single, logs_single, data, idx, b, 1)
        chex.assert_trees_all_equal(fused.params, single.params)
        chex.assert_trees_all_equal(fused.state, single.state)
        chex.assert_trees_all_equal(logs_fused, logs_single)

    def test_loop_free_variant_matches_fused(self):
        ts, batch, train_step, _, acc = _setup(n=32)
        data = jax.device_put(batch)
        idx = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
        fused = jax.jit(step_lib.make_fused_train(train_step))
        stepwise = jax.jit(step_lib.make_fused_train(train_step, fuse=False))
        a, _ = fused(ts, step_lib.empty_logs(acc), data, idx, 0, 4)
        b, logs = ts, step_lib.empty_logs(acc)
        for i in range(4):
            b, logs = stepwise(b, logs, data, idx, i, 1)
        chex.assert_trees_all_close(a.params, b.params, atol=1e-6, rtol=1e-6)

    @parameterized.parameters(True, False)
    def test_fused_eval_is_exact_with_padding(self, fuse):
        ts, batch, _, eval_step, acc = _setup(n=13)
        run = jax.jit(step_lib.make_fused_eval(eval_step, batch_size=5, fuse=fuse))
        logs = step_lib.empty_logs(acc)
        for b in range(3):  # 13 rows = 5 + 5 + 3 (padded to 5)
            logs = run(ts.params, ts.state, logs, jax.device_put(batch), b, 1)
        y_pred = hk.transform_with_state(_bn_forward).apply(
            ts.params, ts.state, None, batch.x, is_training=False
        )[0]
        expected = losses.sparse_categorical_crossentropy(batch.y, y_pred).mean()
        got = step_lib.compute_logs(logs, acc)
        np.testing.assert_allclose(got["loss"], expected, rtol=1e-5)
        np.testing.assert_allclose(got["accuracy"], np.mean(np.argmax(y_pred, -1) == batch.y))

    @parameterized.parameters(True, False)
    def test_fused_predict_writes_every_row(self, fuse):
        ts, batch, _, _, _ = _setup(n=13)
        apply_eval = lambda p, s, x: hk.transform_with_state(_bn_forward).apply(
            p, s, None, x, is_training=False
        )[0]
        run = jax.jit(step_lib.make_fused_predict(step_lib.make_predict_step(apply_eval), 5, fuse))
        out = jnp.zeros((15, 3))
        count = 3 if fuse else 1
        for start in range(0, 3, count):
            out = run(ts.params, ts.state, out, batch.x, start, count)
        chex.assert_trees_all_close(out[:13], apply_eval(ts.params, ts.state, batch.x), atol=1e-6)
