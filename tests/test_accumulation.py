"""Gradient accumulation: ``fit(..., gradient_accumulation_steps=N)`` and hkfit._accumulate.

One optimizer step consumes N micro-batches of ``batch_size`` rows; for a model without
Haiku state it equals a step on one batch of ``N * batch_size`` rows, including the short
last batch of an epoch; steps are counted in optimizer steps.
"""

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkfit
from hkfit import _accumulate as accumulate
from hkfit import callbacks as C
from hkfit import step as step_lib
from hkfit.step import Batch, TrainState

RNG = np.random.default_rng(0)
N_ROWS = 41  # with micro-batches of 4 and N = 4: 2 macro-batches of 16, then 9 rows
X = RNG.normal(size=(N_ROWS, 3)).astype(np.float32)
Y = (X @ RNG.normal(size=(3, 2))).astype(np.float32)
W = RNG.uniform(0.5, 2.0, size=N_ROWS).astype(np.float32)


def mlp(x):
    return hk.Linear(2)(jax.nn.relu(hk.Linear(8)(x)))


def bn_mlp(x, is_training):
    h = hk.BatchNorm(True, True, 0.5)(hk.Linear(8)(x), is_training)
    return hk.Linear(2)(jax.nn.relu(h))


def fit(forward=mlp, optimizer=lambda: optax.adam(0.01), *, epochs=2, distribution=None, **kw):
    model = hkfit.Model(
        forward,
        loss="mse",
        optimizer=optimizer(),
        metrics=["mae"],
        seed=0,
        distribution=distribution,
    )
    kw.setdefault("x", X)
    kw.setdefault("y", Y)
    history = model.fit(epochs=epochs, verbose=0, **kw)
    return model, history


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_same_training(a, b, atol=1e-6):
    (ma, ha), (mb, hb) = a, b
    assert ma.step == mb.step
    chex.assert_trees_all_close(host(ma.params), host(mb.params), atol=atol, rtol=0)
    assert ha.history.keys() == hb.history.keys()
    chex.assert_trees_all_close(ha.history, hb.history, atol=atol, rtol=1e-6)


# --- Equal to training on N-times-larger batches --------------------------------------------


@pytest.mark.parametrize("steps_per_execution", [1, 3], ids=["tail-call", "fused-padded"])
def test_equals_larger_batches(steps_per_execution):
    """Shuffled, weighted, 41 rows: the last macro-batch has 9 rows (3 of 4 micro-batches)."""
    kw = dict(sample_weight=W, shuffle=True, steps_per_execution=steps_per_execution)
    large = fit(batch_size=16, **kw)
    accumulated = fit(batch_size=4, gradient_accumulation_steps=4, **kw)
    assert accumulated[0].step == 2 * 3  # optimizer steps: 3 per epoch
    assert_same_training(large, accumulated)


def test_equals_larger_batches_with_sgd_and_a_validation_split():
    kw = dict(optimizer=lambda: optax.sgd(0.1), validation_split=0.2, epochs=3)
    assert_same_training(
        fit(batch_size=6, **kw), fit(batch_size=3, gradient_accumulation_steps=2, **kw)
    )


def test_default_is_one_step_per_batch_bit_for_bit():
    a, b = fit(batch_size=8), fit(batch_size=8, gradient_accumulation_steps=1)
    assert a[0].step == b[0].step == 2 * 6
    chex.assert_trees_all_equal(host(a[0].params), host(b[0].params))
    assert a[1].history == b[1].history


def test_data_parallel_equals_one_device():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    kw = dict(sample_weight=W, steps_per_execution=2)
    single = fit(batch_size=16, **kw)
    parallel = fit(
        batch_size=8,
        gradient_accumulation_steps=2,
        distribution=hkfit.DataParallel(data_placement="replicated"),
        **kw,
    )
    assert_same_training(single, parallel, atol=1e-5)


# --- Iterables: N consecutive batches per step ---------------------------------------------------


def test_iterable_groups_consecutive_batches():
    batches = [(X[i : i + 4], Y[i : i + 4]) for i in range(0, N_ROWS, 4)]  # 11 batches
    grouped = fit(x=batches, y=None, gradient_accumulation_steps=4)
    assert grouped[0].step == 2 * 3  # groups of 4, 4 and 3 batches
    assert_same_training(fit(batch_size=16, shuffle=False), grouped)


def test_iterable_steps_per_epoch_counts_optimizer_steps():
    taken = []

    def forever():
        i = 0
        while True:
            taken.append(i)
            yield X[i % 40 : i % 40 + 4], Y[i % 40 : i % 40 + 4]
            i += 4

    model, history = fit(x=forever(), y=None, steps_per_epoch=2, gradient_accumulation_steps=3)
    assert model.step == 4 and history.epoch == [0, 1]
    assert len(taken) >= 12  # 2 epochs x 2 steps x 3 batches (the prefetcher reads ahead)


# --- Counting optimizer steps ---------------------------------------------------------------------


class Recorder(C.Callback):
    def on_train_begin(self, logs=None):
        self.steps, self.batches = self.params["steps"], []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((batch, self.model.step))


def test_steps_hooks_and_checkpoints_count_optimizer_steps(tmp_path):
    recorder = Recorder()
    every_two = C.ModelCheckpoint(str(tmp_path / "e{epoch}-b{batch}.npz"), save_freq=2)
    fit(batch_size=4, gradient_accumulation_steps=4, callbacks=[recorder, every_two])
    assert recorder.steps == 3  # the progress bar's total
    assert recorder.batches == [(0, 1), (1, 2), (2, 3), (0, 4), (1, 5), (2, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1-b2.npz", "e2-b1.npz", "e2-b3.npz"]

    limited, _ = fit(batch_size=4, gradient_accumulation_steps=4, steps_per_epoch=2)
    assert limited.step == 4


# --- Haiku state, learning rate, resume -----------------------------------------------------------


def test_haiku_state_updates_on_every_micro_batch():
    """With a zero learning rate, one step over 2 micro-batches moves the BatchNorm
    statistics exactly as 2 steps of one micro-batch each do, and unlike 1 large batch."""
    kw = dict(forward=bn_mlp, optimizer=lambda: optax.sgd(0.0), epochs=1, shuffle=False)
    kw.update(x=X[:8], y=Y[:8])
    accumulated, _ = fit(batch_size=4, gradient_accumulation_steps=2, **kw)
    micro, _ = fit(batch_size=4, **kw)
    large, _ = fit(batch_size=8, **kw)
    assert (accumulated.step, micro.step) == (1, 2)
    chex.assert_trees_all_close(host(accumulated.state), host(micro.state), atol=1e-6)
    mean = jax.tree_util.tree_leaves(host(accumulated.state))[0]
    assert np.abs(mean - jax.tree_util.tree_leaves(host(large.state))[0]).max() > 1e-3


def test_learning_rate_is_found_and_set():
    model, history = fit(optimizer=lambda: "adam", batch_size=4, gradient_accumulation_steps=2)
    assert model.learning_rate == pytest.approx(1e-3)
    assert history.history["learning_rate"] == pytest.approx([1e-3, 1e-3])
    assert hkfit.optimizers.learning_rates(model.opt_state) == pytest.approx({"": 1e-3})
    model.learning_rate = 0.0
    before = host(model.params)
    model.fit(X, Y, epochs=3, batch_size=4, gradient_accumulation_steps=2, verbose=0)
    chex.assert_trees_all_equal(host(model.params), before)


def test_save_load_resume_is_bit_identical(tmp_path):
    kw = dict(batch_size=4, gradient_accumulation_steps=3, sample_weight=W)
    clean, clean_history = fit(epochs=3, **kw)

    first, _ = fit(epochs=1, **kw)
    first.save(tmp_path / "model.npz")
    resumed = hkfit.Model(mlp, loss="mse", optimizer=optax.adam(0.01), metrics=["mae"], seed=0)
    resumed.load(tmp_path / "model.npz")
    history = resumed.fit(X, Y, epochs=3, initial_epoch=1, verbose=0, **kw)

    assert resumed.step == clean.step
    chex.assert_trees_all_equal(host(resumed.params), host(clean.params))
    chex.assert_trees_all_equal(host(resumed.opt_state), host(clean.opt_state))
    assert history.history["loss"] == clean_history.history["loss"][1:]


# --- Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -2, 1.5, "2", True, None])
def test_bad_gradient_accumulation_steps(value):
    model = hkfit.Model(mlp, loss="mse")
    with pytest.raises((ValueError, TypeError), match="gradient_accumulation_steps") as info:
        model.fit(X, Y, gradient_accumulation_steps=value, verbose=0)
    assert repr(value) in str(info.value) and "int >= 1" in str(info.value)
    assert not model.built  # refused before any step (or initialization)


# --- The pure step ------------------------------------------------------------------------------


def _noisy_linear(params, state, key, x):
    """A forward whose output depends on its key, as dropout does."""
    return x @ params["w"] + 0.1 * jax.random.normal(key, (x.shape[0], 2)), state


def _mse(y_true, y_pred):
    return jnp.mean((y_true - y_pred) ** 2, axis=-1)


class AccumulatingStepTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        params = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32)}
        self.optimizer = optax.adam(0.1)
        self.ts = TrainState(
            params, {}, self.optimizer.init(params), jax.random.key(1), jnp.asarray(5, jnp.int32)
        )
        self.batch = Batch(X[:10], Y[:10], W[:10])

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_one_step_over_the_macro_batch(self):
        """Deterministic forward: 10 rows as micro-batches 4 + 4 + 2 (and one missing)."""

        def linear(params, state, key, x):
            return x @ params["w"], state

        plain = step_lib.make_train_step(linear, _mse, self.optimizer)
        expected, _ = plain(self.ts, step_lib.empty_logs([]), self.batch)
        for steps in (3, 4):
            step = accumulate.make_accumulating_step(
                linear, _mse, self.optimizer, steps=steps, micro_batch_size=4
            )
            got, logs = self.variant(step)(self.ts, step_lib.empty_logs([]), self.batch)
            assert int(got.step) == 6
            chex.assert_trees_all_close(got.params, expected.params, atol=1e-6)
            chex.assert_trees_all_close(got.opt_state, expected.opt_state, atol=1e-6)
            loss = step_lib.compute_logs(jax.device_get(logs), [])["loss"]
            assert loss == pytest.approx(
                float(np.sum(W[:10] * _mse(Y[:10], X[:10] @ self.ts.params["w"])) / W[:10].sum()),
                rel=1e-5,
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_micro_batch_keys(self):
        """Micro-batch i of step s draws from fold_in(fold_in(rng, s), i)."""
        step = accumulate.make_accumulating_step(
            _noisy_linear, _mse, optax.sgd(1.0), steps=3, micro_batch_size=4
        )
        got, _ = self.variant(step)(self.ts, step_lib.empty_logs([]), self.batch)

        key = jax.random.fold_in(self.ts.rng, self.ts.step)
        total = W[:10].sum()

        def objective(params):
            parts = []
            for i, rows in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
                y_pred, _ = _noisy_linear(params, {}, jax.random.fold_in(key, i), X[rows])
                parts.append(jnp.sum(W[rows] * _mse(Y[rows], y_pred)))
            return sum(parts) / total

        grads = jax.grad(objective)(self.ts.params)
        expected = jax.tree_util.tree_map(lambda p, g: p - g, self.ts.params, grads)
        chex.assert_trees_all_close(got.params, expected, atol=1e-6)

    def test_grouped_step_equals_the_concatenation(self):
        def linear(params, state, key, x):
            return x @ params["w"], state

        plain = step_lib.make_train_step(linear, _mse, self.optimizer)
        expected, _ = plain(self.ts, step_lib.empty_logs([]), self.batch)
        step = jax.jit(accumulate.make_grouped_step(linear, _mse, self.optimizer, steps=4))
        parts = tuple(Batch(X[r], Y[r], W[r]) for r in (slice(0, 4), slice(4, 8), slice(8, 10)))
        got, _ = step(self.ts, step_lib.empty_logs([]), parts)
        chex.assert_trees_all_close(got.params, expected.params, atol=1e-6)
        with pytest.raises(ValueError, match="1 to 4 batches"):
            step(self.ts, step_lib.empty_logs([]), parts * 2)


def test_convolutional_model():
    """On CPU, where convolutions run slowly inside loops, the micro-batches are unrolled."""

    def conv(x):
        return hk.Linear(2)(hk.Flatten()(jax.nn.relu(hk.Conv2D(2, 3)(x))))

    images = RNG.normal(size=(10, 4, 4, 1)).astype(np.float32)
    kw = dict(forward=conv, x=images, y=Y[:10], optimizer=lambda: optax.sgd(0.1))
    large = fit(batch_size=4, **kw)
    accumulated = fit(batch_size=2, gradient_accumulation_steps=2, **kw)
    assert_same_training(large, accumulated)
