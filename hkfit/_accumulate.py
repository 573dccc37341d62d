"""Gradient accumulation: one optimizer step over several micro-batches.

``fit(..., gradient_accumulation_steps=N)`` trains on macro-batches of ``N * batch_size``
rows. The steps built here split a macro-batch into micro-batches of ``batch_size`` rows
and run the forward and backward pass on one micro-batch at a time (a ``jax.lax.scan``,
so only one micro-batch's activations are alive at once; unrolled where loops are slow,
for convolutions on CPU). Each micro-gradient is fed to
``optax.MultiSteps(optimizer, every_k_schedule=N)``, which applies the optimizer once,
to their mean, after the N-th.

Exactness. Micro-batch ``i`` holds the share ``s_i = W_i / W`` of the macro-batch's total
row weight ``W`` (padding rows weigh 0), and its objective is its own weighted mean
``L_i``; the macro-batch's objective is ``sum_i s_i * L_i``. So the gradient fed to
MultiSteps is ``N * s_i * grad L_i``, and their mean is the gradient of the macro-batch's
objective: the step equals a step on the whole macro-batch (for a model without Haiku
state; Haiku state, e.g. ``hk.BatchNorm`` statistics, is threaded through the
micro-batches and updated on each). A short macro-batch (the last of an epoch, or a short
group of an iterable's batches) has fewer real micro-batches: MultiSteps gets a zero
gradient for each missing one, which keeps the mean exact. ``W_i`` sums the row weights of
:func:`hkfit.step.row_weights_of`, which every term of the objective uses (one weight per
row or token); per-output sample weights of a multi-output model would spread differently
over the outputs, so they are refused.

Dropout keys: micro-batch ``i`` of optimizer step ``s`` draws from
``fold_in(fold_in(rng, s), i)``.

Loss scaling (float16 compute, see ``hkfit._precision``): every micro-gradient is taken of
the objective times the step's loss scale and unscaled; if any micro-gradient is not
finite, the whole optimizer step is skipped (params, Haiku state and optimizer state stay
as before it) and the scale is adjusted once, as for a step without accumulation.

The MultiSteps state lives only inside a step: every step completes an accumulation, so
between steps it would hold zeros and counters. The train state keeps the wrapped
optimizer's own state, so checkpoints, ``model.learning_rate`` and the learning-rate
callbacks do not depend on N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hkfit import step as step_lib
from hkfit.step import Batch, TrainState

PyTree = Any


class _Carry(NamedTuple):
    """What one micro-batch passes to the next within an optimizer step."""

    params: PyTree
    state: PyTree
    multi_state: optax.MultiStepsState
    logs: tuple
    objective: jax.Array  # the macro-batch objective of the micro-batches seen so far
    finite: jax.Array  # whether every micro-gradient so far was finite (loss scaling)


def _weight(batch: Batch) -> jax.Array:
    """The total row weight of a batch (padding rows weigh 0).

    Raises:
      ValueError: for per-output sample weights, whose outputs would each need their
        own share (refused at trace time, before any step runs).
    """
    if isinstance(batch.weights, dict):
        raise ValueError(
            "`gradient_accumulation_steps` needs one sample weight per row (or token) for "
            "every output: with per-output `sample_weight` the accumulated step would not "
            f"equal one larger batch. Received: sample_weight for {sorted(batch.weights)}."
        )
    return jnp.sum(step_lib.row_weights_of(batch))


def _identity(tree: PyTree) -> PyTree:
    return tree


class _Accumulator:
    """The pieces of an accumulating step: start, one micro-batch, a missing one, finish."""

    def __init__(
        self,
        apply_train: step_lib.ApplyTrain,
        loss_fn: Callable,
        optimizer: optax.GradientTransformation,
        metrics: Sequence[Any],
        steps: int,
        regularizer: Callable[[PyTree], jax.Array] | None,
        shard_batch: Callable | None,
        unroll: bool = False,
        loss_scaling: Any = None,
    ):
        self.steps, self.unroll, self.loss_scaling = steps, unroll, loss_scaling
        self.multi = optax.MultiSteps(optimizer, every_k_schedule=steps)
        self.gradient = step_lib.make_batch_gradient(
            apply_train, loss_fn, metrics, regularizer=regularizer
        )
        self.shard = shard_batch or _identity

    def start(self, ts: TrainState, logs: tuple) -> _Carry:
        multi_state = self.multi.init(ts.params)._replace(inner_opt_state=ts.opt_state)
        zero, finite = jnp.zeros((), jnp.float32), jnp.ones((), jnp.bool_)
        return _Carry(ts.params, ts.state, multi_state, logs, zero, finite)

    def _feed(self, carry: _Carry, grads: PyTree) -> _Carry:
        # `value=` reaches transforms that need the loss (optax.contrib.reduce_on_plateau);
        # the optimizer uses the one of the last call, the whole macro-batch's objective.
        updates, multi_state = self.multi.update(
            grads, carry.multi_state, carry.params, value=carry.objective
        )
        # Zeros until the last micro-batch: the params change once per step.
        params = optax.apply_updates(carry.params, updates)
        return carry._replace(params=params, multi_state=multi_state)

    def micro(
        self, carry: _Carry, key: jax.Array, total: jax.Array, index: Any, batch: Batch
    ) -> _Carry:
        """Adds micro-batch ``index`` (a share of ``total`` weight) to the step."""
        batch = self.shard(batch)
        share = _weight(batch) / total
        scaling = self.loss_scaling  # the scale stays put until the step ends
        scale = None if scaling is None else scaling.current(carry.multi_state.inner_opt_state)
        loss, grads, state, logs = self.gradient(
            carry.params, carry.state, jax.random.fold_in(key, index), carry.logs, batch, scale
        )
        if scaling is not None:
            carry = carry._replace(finite=carry.finite & scaling.finite(grads))
        scale = share * self.steps  # MultiSteps averages: N * share_i sums to the objective's
        grads = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads)
        carry = carry._replace(state=state, logs=logs, objective=carry.objective + share * loss)
        return self._feed(carry, grads)

    def stacked(
        self, carry: _Carry, key: jax.Array, total: jax.Array, first: int, batches: Batch
    ) -> _Carry:
        """Adds the micro-batches stacked on axis 0 of ``batches``, numbered from ``first``."""
        count = jax.tree_util.tree_leaves(batches.x)[0].shape[0]

        def body(carry: _Carry, item: tuple) -> tuple[_Carry, None]:
            index, batch = item
            return self.micro(carry, key, total, index, batch), None

        carry, _ = jax.lax.scan(
            body, carry, (first + jnp.arange(count), batches), unroll=count if self.unroll else 1
        )
        return carry

    def finish(self, carry: _Carry, ts: TrainState, used: int) -> tuple[TrainState, tuple]:
        """Feeds a zero gradient for each missing micro-batch; the new train state."""
        if used < self.steps:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, carry.params)
            carry = jax.lax.fori_loop(
                0, self.steps - used, lambda _, c: self._feed(c, zeros), carry
            )
        opt_state = carry.multi_state.inner_opt_state
        new = TrainState(carry.params, carry.state, opt_state, ts.rng, ts.step + 1)
        if self.loss_scaling is not None:  # a non-finite micro-gradient skips the step
            new = self.loss_scaling.select(ts, new, carry.finite)
        return new, carry.logs


def _total(weight: jax.Array) -> jax.Array:
    return jnp.maximum(weight, jnp.finfo(jnp.float32).tiny)


def make_accumulating_step(
    apply_train: step_lib.ApplyTrain,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    metrics: Sequence[Any] = (),
    *,
    steps: int,
    micro_batch_size: int,
    regularizer: Callable[[PyTree], jax.Array] | None = None,
    shard_batch: Callable | None = None,
    unroll: bool = False,
    loss_scaling: Any = None,
) -> Callable:
    """Builds ``train_step(ts, logs, macro_batch) -> (ts, logs)``: one optimizer step.

    The macro-batch (at most ``steps * micro_batch_size`` rows; its size is static) is cut
    into micro-batches of ``micro_batch_size`` rows, the last one smaller when the size
    does not divide. See the module docs for the maths.

    Args:
      apply_train: the forward function in training mode.
      loss_fn: ``(y_true, y_pred) -> per-example losses``.
      optimizer: the Optax transformation applied once per macro-batch.
      metrics: metric objects, updated with every micro-batch.
      steps: micro-batches per optimizer step (``every_k_schedule`` of MultiSteps).
      micro_batch_size: rows per micro-batch.
      regularizer: ``params -> scalar`` added to the objective.
      shard_batch: lays out each micro-batch (a distribution's ``shard_batch``).
      unroll: unroll the loop over micro-batches (XLA on CPU runs convolutions inside
        loop bodies far slower than at top level; see ``hkfit._pacing``).
      loss_scaling: dynamic loss scaling for float16 compute (``hkfit._precision``):
        every micro-gradient is taken of the scaled objective; if any is not finite,
        the whole step is skipped and the scale adjusted once.

    Returns:
      A pure function; ``ts.step`` advances by one per macro-batch.
    """
    acc = _Accumulator(
        apply_train,
        loss_fn,
        optimizer,
        metrics,
        steps,
        regularizer,
        shard_batch,
        unroll,
        loss_scaling=loss_scaling,
    )

    def train_step(ts: TrainState, logs: tuple, batch: Batch):
        rows = step_lib.num_rows_of(batch.x)
        full, rest = divmod(rows, micro_batch_size)
        if full + (rest > 0) > steps:
            raise ValueError(
                f"Expected a macro-batch of at most {steps * micro_batch_size} rows. "
                f"Received: {rows} rows."
            )
        key = jax.random.fold_in(ts.rng, ts.step)
        total = _total(_weight(batch))
        carry = acc.start(ts, logs)
        if full:
            cut = full * micro_batch_size
            stacked = jax.tree_util.tree_map(
                lambda a: a[:cut].reshape(full, micro_batch_size, *a.shape[1:]), batch
            )
            carry = acc.stacked(carry, key, total, 0, stacked)
        if rest:
            last = jax.tree_util.tree_map(lambda a: a[full * micro_batch_size :], batch)
            carry = acc.micro(carry, key, total, full, last)
        return acc.finish(carry, ts, full + (rest > 0))

    return train_step


def make_grouped_step(
    apply_train: step_lib.ApplyTrain,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    metrics: Sequence[Any] = (),
    *,
    steps: int,
    regularizer: Callable[[PyTree], jax.Array] | None = None,
    loss_scaling: Any = None,
) -> Callable:
    """Builds ``train_step(ts, logs, batches) -> (ts, logs)`` over up to ``steps`` batches.

    ``batches`` is a tuple of :class:`Batch` es (an iterable's consecutive batches, each
    one micro-batch, of any sizes). Consecutive batches of the same shapes are stacked
    and scanned, so a group of equal batches compiles one forward and backward pass.
    ``loss_scaling``: as in :func:`make_accumulating_step`.
    """
    acc = _Accumulator(
        apply_train,
        loss_fn,
        optimizer,
        metrics,
        steps,
        regularizer,
        None,
        loss_scaling=loss_scaling,
    )

    def train_step(ts: TrainState, logs: tuple, batches: tuple):
        if not 1 <= len(batches) <= steps:
            raise ValueError(
                f"Expected 1 to {steps} batches per optimizer step. Received: {len(batches)}."
            )
        key = jax.random.fold_in(ts.rng, ts.step)
        total = _total(jnp.sum(jnp.stack([_weight(b) for b in batches])))
        carry = acc.start(ts, logs)
        index = 0
        for run in _runs_of_equal_shapes(batches):
            if len(run) == 1:
                carry = acc.micro(carry, key, total, index, run[0])
            else:
                stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *run)
                carry = acc.stacked(carry, key, total, index, stacked)
            index += len(run)
        return acc.finish(carry, ts, len(batches))

    return train_step


def _runs_of_equal_shapes(batches: Sequence[Batch]) -> list[list[Batch]]:
    """Consecutive batches grouped while their structure, shapes and dtypes agree."""

    def signature(batch: Batch) -> tuple:
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        return treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves)

    runs: list[list[Batch]] = []
    for batch in batches:
        if runs and signature(runs[-1][0]) == signature(batch):
            runs[-1].append(batch)
        else:
            runs.append([batch])
    return runs
