"""Pure training, evaluation and prediction steps.

Everything here is a pure function over NamedTuples, built once per model and jitted by
the caller. The *fused* variants run many batches per call: the dataset lives on the
device, each batch is gathered from it inside the compiled loop by row indices, and the
number of batches per call is a traced argument, so changing it never recompiles.

Conventions:
  * ``apply_train(params, state, rng, x) -> (y_pred, new_state)`` runs the forward
    function in training mode; ``apply_eval(params, state, x) -> y_pred`` in inference
    mode (no state update, fixed randomness).
  * ``weights`` has one entry per row: sample weight x class weight, 0 for padding.
    A batch objective is ``sum(w * loss) / sum(w)``.
  * Metric states (``logs``) are a tuple ``(loss_state, *metric_states)`` that stays on
    the device; see :mod:`hkfit.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkfit import metrics as metrics_lib

PyTree = Any
ApplyTrain = Callable[[PyTree, PyTree, jax.Array, PyTree], tuple]
ApplyEval = Callable[[PyTree, PyTree, PyTree], PyTree]


class TrainState(NamedTuple):
    """Everything that changes during training.

    Attributes:
      params: Haiku parameters.
      state: Haiku state (e.g. BatchNorm moving averages).
      opt_state: Optax optimizer state.
      rng: the training key; step ``s`` draws from ``fold_in(rng, s)``.
      step: number of optimizer steps taken (int32 scalar).
    """

    params: PyTree
    state: PyTree
    opt_state: PyTree
    rng: jax.Array
    step: jax.Array


class Batch(NamedTuple):
    """One batch: inputs, targets and per-row weights (0 marks padding), on host or device."""

    x: PyTree
    y: PyTree
    weights: jax.Array | np.ndarray


LOSS_METRIC = metrics_lib.Mean(lambda _, values: values, "loss")


def empty_logs(metrics: Sequence[Any]) -> tuple:
    """Metric states of no example seen: ``(loss_state, *metric_states)``."""
    return (LOSS_METRIC.empty(), *(m.empty() for m in metrics))


def update_logs(
    logs: tuple, metrics: Sequence[Any], batch: Batch, y_pred: PyTree, per_example_loss: jax.Array
) -> tuple:
    """Adds one batch to the metric states."""
    loss_state = LOSS_METRIC.update(logs[0], None, per_example_loss, batch.weights)
    others = tuple(m.update(s, batch.y, y_pred, batch.weights) for m, s in zip(metrics, logs[1:]))
    return (loss_state, *others)


def compute_logs(logs: tuple, metrics: Sequence[Any]) -> dict[str, float]:
    """Turns (host or device) metric states into a dict of Python floats."""
    values = {"loss": LOSS_METRIC.compute(logs[0])}
    values.update({m.name: m.compute(s) for m, s in zip(metrics, logs[1:])})
    return {k: float(v) for k, v in values.items()}


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(w * values) / sum(w)``; rows with ``w == 0`` contribute neither value nor gradient."""
    total = jnp.sum(jnp.where(weights > 0, weights * values, 0.0))
    return total / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)


def gather(tree: PyTree, rows: jax.Array) -> PyTree:
    """Takes ``rows`` along axis 0 of every leaf."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), tree)


def make_train_step(
    apply_train: ApplyTrain,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    metrics: Sequence[Any] = (),
) -> Callable:
    """Builds ``train_step(ts, logs, batch) -> (ts, logs)`` for one batch.

    Args:
      apply_train: the forward function in training mode.
      loss_fn: ``(y_true, y_pred) -> per-example losses``.
      optimizer: the Optax transformation.
      metrics: metric objects (see :mod:`hkfit.metrics`), updated with the train-mode output.

    Returns:
      A pure function; dropout keys are ``fold_in(ts.rng, ts.step)``.
    """

    def train_step(ts: TrainState, logs: tuple, batch: Batch):
        key = jax.random.fold_in(ts.rng, ts.step)

        def objective(params):
            y_pred, new_state = apply_train(params, ts.state, key, batch.x)
            per_example = loss_fn(batch.y, y_pred)
            return weighted_mean(per_example, batch.weights), (y_pred, new_state, per_example)

        grads, (y_pred, new_state, per_example) = jax.grad(objective, has_aux=True)(ts.params)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        logs = update_logs(logs, metrics, batch, y_pred, jax.lax.stop_gradient(per_example))
        return TrainState(params, new_state, opt_state, ts.rng, ts.step + 1), logs

    return train_step


def make_eval_step(
    apply_eval: Callable, loss_fn: Callable, metrics: Sequence[Any] = (), *, keyed: bool = False
) -> Callable:
    """Builds ``eval_step(params, state, logs, batch) -> logs`` for one batch.

    With ``keyed=True``, ``apply_eval`` is ``(params, state, rng, x) -> y_pred`` and the
    step is ``eval_step(params, state, logs, batch, rng)``: each batch may draw its own key.
    """

    def eval_step(params, state, logs: tuple, batch: Batch, *rng):
        y_pred = apply_eval(params, state, *rng, batch.x)
        return update_logs(logs, metrics, batch, y_pred, loss_fn(batch.y, y_pred))

    return eval_step


def make_predict_step(apply_eval: Callable, *, keyed: bool = False) -> Callable:
    """Builds ``predict_step(params, state, x) -> y_pred`` for one batch.

    With ``keyed=True``: ``predict_step(params, state, x, rng)`` and ``apply_eval`` is
    ``(params, state, rng, x) -> y_pred``.
    """

    def predict_step(params, state, x, *rng):
        return apply_eval(params, state, *rng, x)

    return predict_step


def batch_key(rng: jax.Array, batch_index) -> jax.Array:
    """The inference key of batch ``batch_index`` of one evaluate/predict run."""
    return jax.random.fold_in(rng, batch_index)


# --- Fused loops over device-resident data -------------------------------------------------


def _identity(tree: PyTree) -> PyTree:
    return tree


def make_fused_train(
    train_step: Callable, fuse: bool = True, shard_batch: Callable | None = None
) -> Callable:
    """Runs many training steps per call over a dataset that lives on the device.

    The returned ``run(ts, logs, data, idx, start, count)`` takes ``data = Batch(x, y,
    weights)`` holding every row and ``idx[num_batches, batch_size]`` holding the epoch's
    row order, and trains on batches ``start, ..., start + count - 1``. ``start`` and
    ``count`` are traced: one compilation serves any split of an epoch into calls, so K
    fused steps give bit-identical results to K calls of one step. The epoch's last,
    smaller batch is a call of its own with ``idx`` of shape ``[1, rows]``, or, for models
    whose exactness does not depend on the batch's size (no BatchNorm statistics), a full
    batch padded with the index ``len(data)``: such rows get weight 0.

    With ``fuse=False`` no loop is compiled: each call runs the one batch ``start``
    (``count`` must be 1). XLA on CPU runs convolutions inside loop bodies far slower than
    at top level, so convolutional models train faster that way there.

    ``shard_batch`` (from a distribution, see ``DataParallel.step_options``) lays out each
    gathered batch, e.g. ``jax.lax.with_sharding_constraint`` over the devices.
    """
    shard = shard_batch or _identity

    def one(ts, logs, data: Batch, idx, b):
        rows = jax.lax.dynamic_index_in_dim(idx, b, keepdims=False)
        n = num_rows_of(data.x)
        batch = gather(data, jnp.minimum(rows, n - 1))  # rows >= n are zero-weight padding
        valid = (rows < n).reshape(rows.shape + (1,) * (batch.weights.ndim - 1))
        batch = batch._replace(weights=batch.weights * valid)  # a distribution may add axes
        return train_step(ts, logs, shard(batch))

    def run(ts, logs, data: Batch, idx, start, count):
        if not fuse:
            return one(ts, logs, data, idx, start)
        return jax.lax.fori_loop(
            0, count, lambda j, c: one(c[0], c[1], data, idx, start + j), (ts, logs)
        )

    return run


def padded_rows(batch_index, batch_size: int, num_rows: int, width: int | None = None):
    """Rows of batch ``batch_index`` clipped to the data, and 1/0 validity of each.

    ``width`` rows (default ``batch_size``) are returned; those past ``batch_size`` are
    padding with validity 0 (e.g. to make a batch divide the number of devices).
    """
    offsets = jnp.arange(batch_size if width is None else width)
    rows = batch_index * batch_size + offsets
    valid = (offsets < batch_size) & (rows < num_rows)
    return jnp.minimum(rows, num_rows - 1), valid.astype(jnp.float32)


def _padded_width(batch_size: int, multiple: int) -> int:
    return -(-batch_size // multiple) * multiple


def num_rows_of(tree: PyTree) -> int:
    """Leading size shared by every leaf (static under jit)."""
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def make_fused_eval(
    eval_step: Callable,
    batch_size: int,
    fuse: bool = True,
    shard_batch: Callable | None = None,
    multiple: int = 1,
    *,
    keyed: bool = False,
) -> Callable:
    """``run(params, state, logs, data, start, count) -> logs`` over batches of a dataset.

    With ``keyed=True`` (a keyed ``eval_step``) the signature is ``run(params, state, rng,
    offset, logs, data, start, count)`` and batch ``b`` of ``data`` gets the key
    ``batch_key(rng, offset + b)`` (``offset``: the index of ``data``'s first batch in the
    whole run, when the data arrives in chunks).

    The last batch is padded with copies of the last row whose weight is 0, so metrics are
    exact over every row and every call has the same shapes. ``fuse=False``: one batch per
    call, no compiled loop (see :func:`make_fused_train`). With a distribution, batches
    are padded the same way to a multiple of ``multiple`` rows and laid out by
    ``shard_batch``.
    """
    shard = shard_batch or _identity
    width = _padded_width(batch_size, multiple)

    def run_keyed(params, state, rng, offset, logs, data: Batch, start, count):
        n = num_rows_of(data.x)

        def body(j, logs):
            rows, valid = padded_rows(start + j, batch_size, n, width)
            batch = gather(data, rows)
            # a distribution may stack axes after the row axis (weights [rows, ...])
            valid = valid.reshape(valid.shape + (1,) * (batch.weights.ndim - 1))
            batch = shard(batch._replace(weights=batch.weights * valid))
            keys = () if rng is None else (batch_key(rng, offset + start + j),)
            return eval_step(params, state, logs, batch, *keys)

        return jax.lax.fori_loop(0, count, body, logs) if fuse else body(0, logs)

    if keyed:
        return run_keyed
    return lambda params, state, logs, data, start, count: run_keyed(
        params, state, None, 0, logs, data, start, count
    )


def make_fused_predict(
    predict_step: Callable,
    batch_size: int,
    fuse: bool = True,
    shard_batch: Callable | None = None,
    multiple: int = 1,
    *,
    keyed: bool = False,
) -> Callable:
    """``run(params, state, out, x, start, count) -> out`` writing predictions into ``out``.

    With ``keyed=True`` (a keyed ``predict_step``): ``run(params, state, rng, offset, out,
    x, start, count)``, batch ``b`` of ``x`` drawing from ``batch_key(rng, offset + b)``.

    ``out`` is a buffer (pytree) with ``num_batches * batch_size`` rows; the caller keeps
    the first ``len(x)`` rows. ``fuse=False``: one batch per call (see
    :func:`make_fused_train`). With a distribution, batches are padded to a multiple of
    ``multiple`` rows and laid out by ``shard_batch``; the padding rows' outputs are dropped.
    """
    shard = shard_batch or _identity
    width = _padded_width(batch_size, multiple)

    def run_keyed(params, state, rng, offset, out, x, start, count):
        n = num_rows_of(x)

        def body(j, out):
            rows, _ = padded_rows(start + j, batch_size, n, width)
            keys = () if rng is None else (batch_key(rng, offset + start + j),)
            y = predict_step(params, state, shard(gather(x, rows)), *keys)
            first_row = (start + j) * batch_size
            return jax.tree_util.tree_map(
                lambda o, v: jax.lax.dynamic_update_slice_in_dim(
                    o, v[:batch_size].astype(o.dtype), first_row, 0
                ),
                out,
                y,
            )

        return jax.lax.fori_loop(0, count, body, out) if fuse else body(0, out)

    if keyed:
        return run_keyed
    return lambda params, state, out, x, start, count: run_keyed(
        params, state, None, 0, out, x, start, count
    )
