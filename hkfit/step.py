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

from hkfit import _auxiliary as auxiliary
from hkfit import _custom as custom_lib
from hkfit import _outputs as outputs_lib
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
    """One batch, on the host or the device.

    Attributes:
      x: inputs.
      y: targets.
      weights: what the loss and ``weighted_metrics`` weigh each row (or token) by: sample
        weight x class weight, 0 for padding.
      mask: 1 for real rows (or tokens), 0 for padding: all that plain ``metrics`` see,
        as in Keras. ``None`` means every row is real.
    """

    x: PyTree
    y: PyTree
    weights: jax.Array | np.ndarray
    mask: jax.Array | np.ndarray | None = None


def num_weight_rows(weights: PyTree) -> int:
    """Rows of a batch's weights: one array, or a dict of per-output arrays."""
    return jnp.shape(jax.tree_util.tree_leaves(weights)[0])[0]


def row_mask(batch: Batch) -> jax.Array:
    """The batch's padding mask (ones when it has none)."""
    if batch.mask is not None:
        return jnp.asarray(batch.mask, jnp.float32)
    return jnp.ones((num_weight_rows(batch.weights),), jnp.float32)


LOSS_METRIC = metrics_lib.Mean(lambda _, values: values, "loss")


def empty_logs(metrics: Sequence[Any]) -> tuple:
    """Metric states of no example seen: ``(loss_state, *metric_states)``."""
    return (LOSS_METRIC.empty(), *(m.empty() for m in metrics))


class AuxLoss(metrics_lib.Mean):
    """The running mean of one added loss (``hkfit.add_loss`` or a regularizer).

    It is part of the reported ``loss`` (see :func:`compute_logs`) and logged under its
    own name too. Its values are one per row; rows weigh what they weigh in the loss.
    """

    aux = True

    def __init__(self, name: str):
        super().__init__(lambda _, values: values, name)


def row_weights_of(batch: Batch) -> jax.Array:
    """One weight per row: per-token weights are summed over each row's tokens.

    With per-output weights (a dict, see ``hkfit._outputs``) every real row weighs 1.
    """
    if isinstance(batch.weights, dict):
        return row_mask(batch)
    weights = jnp.asarray(batch.weights, jnp.float32)
    return weights.reshape(weights.shape[0], -1).sum(axis=-1) if weights.ndim > 1 else weights


def update_logs(
    logs: tuple,
    metrics: Sequence[Any],
    batch: Batch,
    y_pred: PyTree,
    per_example_loss: jax.Array | dict[str, jax.Array],
    aux: dict[str, jax.Array] | None = None,
) -> tuple:
    """Adds one batch to the metric states.

    The loss is weighted by ``batch.weights``; a metric is weighted the same way when it is
    marked ``weighted`` (``Model(weighted_metrics=...)``), and sees only the padding mask
    otherwise, as Keras's ``metrics=`` do. An :class:`AuxLoss` reads its per-row values
    from ``aux`` (zeros when this batch added none under its name). A metric with an
    ``observe`` method (the per-output losses and metrics of ``hkfit._outputs``) reads
    what it needs itself; ``per_example_loss`` is then a dict of per-output losses, and
    the total loss is made of those (see :func:`compute_logs`).
    """
    mask = row_mask(batch)
    if isinstance(per_example_loss, dict):
        loss_state = logs[0]
    else:
        loss_state = LOSS_METRIC.update(logs[0], None, per_example_loss, batch.weights)
    rows = row_weights_of(batch)
    aux = aux or {}

    def update(m, s):
        if hasattr(m, "observe"):
            return m.observe(s, batch, y_pred, per_example_loss, aux, mask)
        if getattr(m, "aux", False):
            return m.update(s, None, aux.get(m.name, jnp.zeros_like(rows)), rows)
        return m.update(
            s, batch.y, y_pred, batch.weights if getattr(m, "weighted", False) else mask
        )

    return (loss_state, *(update(m, s) for m, s in zip(metrics, logs[1:])))


def objective_terms(
    loss_fn: Callable,
    batch: Batch,
    y_pred: PyTree,
    added: dict[str, jax.Array],
    regularization: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | dict[str, jax.Array], dict[str, jax.Array]]:
    """``(objective, per-example loss, aux)`` of one batch.

    The objective is the weighted mean loss plus every loss the forward added with
    ``hkfit.add_loss`` (and the regularization of the params), each as a weighted mean
    over rows; ``aux`` holds those added losses, one value per row. For a multi-output
    model (``loss_fn`` is ``hkfit._outputs.Heads``) the loss part is the weighted sum of
    the outputs' means, and the per-example loss a dict of each output's losses.
    """
    if isinstance(loss_fn, outputs_lib.Heads):
        outputs_lib.check_weight_names(batch.weights, loss_fn)
        per_example: Any = outputs_lib.head_losses(loss_fn, batch.y, y_pred)
        total = outputs_lib.objective(
            loss_fn, per_example, batch.weights, row_mask(batch), weighted_mean
        )
    else:
        per_example = loss_fn(batch.y, y_pred)
        total = weighted_mean(per_example, single_weights(batch))
    total, aux = with_added_losses(total, batch, added, regularization)
    return total, per_example, aux


def single_weights(batch: Batch) -> jax.Array | np.ndarray:
    """The batch's weights of a one-loss objective (refusing per-output weights)."""
    if isinstance(batch.weights, dict):
        raise ValueError(
            "`sample_weight` is a dict of per-output weights, but the model has one loss. "
            "Expected one array of weights, or `loss` as a dict of per-output losses."
        )
    return batch.weights


def with_added_losses(
    total: jax.Array,
    batch: Batch,
    added: dict[str, jax.Array],
    regularization: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``total`` plus the added losses (and regularization) as weighted row means; ``aux``."""
    rows = row_weights_of(batch)
    if regularization is not None:
        added = {**added, REGULARIZATION: regularization}
    aux = {name: auxiliary.per_row(value, rows.shape[0]) for name, value in added.items()}
    for value in aux.values():
        total = total + weighted_mean(value, rows)
    return total, aux


REGULARIZATION = "regularization_loss"


def compute_logs(logs: tuple, metrics: Sequence[Any]) -> dict[str, float]:
    """Turns (host or device) metric states into a dict of Python floats.

    ``loss`` is the total objective: the weighted mean loss (for a multi-output model,
    each output's ``<output>_loss`` times its loss weight) plus every added loss
    (:class:`AuxLoss`), each of which is also logged under its own name.
    """
    custom = any(getattr(m, "custom", False) for m in metrics)  # logs what it returns
    values = {} if custom else {"loss": LOSS_METRIC.compute(logs[0])}
    for m, s in zip(metrics, logs[1:]):
        values[m.name] = m.compute(s)
        if getattr(m, "aux", False):
            values["loss"] = values["loss"] + values[m.name]
        elif getattr(m, "loss_weight", None) is not None:  # one output's loss
            values["loss"] = values["loss"] + m.loss_weight * values[m.name]
    return {k: float(v) for k, v in values.items()}


def weighted_mean(values: jax.Array, weights: jax.typing.ArrayLike) -> jax.Array:
    """``sum(w * values) / sum(w)``; rows with ``w == 0`` contribute neither value nor gradient.

    ``values`` may hold one loss per example ``[batch]`` or per token ``[batch, seq]``;
    ``weights`` ``[batch]`` or the same shape (see ``hkfit.metrics.align_weights``).
    """
    weights = metrics_lib.align_weights(weights, values)
    total = jnp.sum(jnp.where(weights > 0, weights * values, 0.0))
    return total / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)


def gather(tree: PyTree, rows: jax.Array) -> PyTree:
    """Takes ``rows`` along axis 0 of every leaf."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), tree)


def forward_terms(
    apply: Callable,
    loss_fn: Any,
    regularizer: Callable[[PyTree], jax.Array] | None,
    params: PyTree,
    state: PyTree,
    key: jax.Array | None,
    batch: Batch,
) -> tuple:
    """``(y_pred, new_state, objective, per-example loss, aux)`` of one batch.

    ``apply(params, state, [key,] x) -> (y_pred, new_state)`` is the forward (``key`` is
    left out when None); ``loss_fn`` a loss, the heads of a multi-output model, or a user
    objective (``hkfit._custom.Objective``), which calls the forward itself.
    """
    keys = () if key is None else (key,)
    regularization = None if regularizer is None else regularizer(params)
    if isinstance(loss_fn, custom_lib.Objective):

        def user_apply(params, state, rng, x):
            return apply(params, state, *(() if rng is None else (rng,)), x)

        (loss, (y_pred, new_state)), added = auxiliary.collect(
            loss_fn.fn, user_apply, params, state, key, batch
        )
        per_example: Any = custom_lib.per_example(loss, batch)
        total = weighted_mean(per_example, single_weights(batch))
        total, aux = with_added_losses(total, batch, added, regularization)
        return y_pred, new_state, total, per_example, aux
    (y_pred, new_state), added = auxiliary.collect(apply, params, state, *keys, batch.x)
    total, per_example, aux = objective_terms(loss_fn, batch, y_pred, added, regularization)
    return y_pred, new_state, total, per_example, aux


def make_batch_gradient(
    apply_train: ApplyTrain,
    loss_fn: Callable,
    metrics: Sequence[Any] = (),
    *,
    regularizer: Callable[[PyTree], jax.Array] | None = None,
) -> Callable:
    """Builds the forward and backward pass of one batch in training mode.

    Args:
      apply_train: the forward function in training mode.
      loss_fn: ``(y_true, y_pred) -> per-example losses``.
      metrics: metric objects (see :mod:`hkfit.metrics`), updated with the train-mode output.
      regularizer: ``params -> scalar`` added to the objective (see
        :mod:`hkfit.regularizers`); losses the forward adds with ``hkfit.add_loss`` are
        added too (see :func:`objective_terms`).

    Returns:
      A pure ``gradient(params, state, key, logs, batch, loss_scale=None) -> (objective,
      grads, new_state, logs)``: the batch objective, its gradient with respect to
      ``params``, the forward's new Haiku state, and the metric states with the batch
      added. With a ``loss_scale`` (a ``jmp`` loss scale, for float16 compute) the
      gradient is taken of the scaled objective and unscaled, so small gradients do not
      flush to zero in the half type; the objective returned is unscaled.
    """

    def gradient(
        params: PyTree,
        state: PyTree,
        key: jax.Array,
        logs: tuple,
        batch: Batch,
        loss_scale: Any = None,
    ):
        def objective(params):
            y_pred, new_state, total, per_example, aux = forward_terms(
                apply_train, loss_fn, regularizer, params, state, key, batch
            )
            scaled = total if loss_scale is None else loss_scale.scale(total)
            return scaled, (total, y_pred, new_state, per_example, aux)

        (_, (loss, y_pred, new_state, per_example, aux)), grads = jax.value_and_grad(
            objective, has_aux=True
        )(params)
        if loss_scale is not None:
            grads = loss_scale.unscale(grads)
        logs = update_logs(
            logs,
            metrics,
            batch,
            y_pred,
            jax.lax.stop_gradient(per_example),
            jax.lax.stop_gradient(aux),
        )
        return loss, grads, new_state, logs

    return gradient


def make_train_step(
    apply_train: ApplyTrain,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    metrics: Sequence[Any] = (),
    *,
    regularizer: Callable[[PyTree], jax.Array] | None = None,
    loss_scaling: Any = None,
) -> Callable:
    """Builds ``train_step(ts, logs, batch) -> (ts, logs)`` for one batch.

    Args:
      apply_train: the forward function in training mode.
      loss_fn: ``(y_true, y_pred) -> per-example losses``.
      optimizer: the Optax transformation; its update also gets the batch objective as
        ``value=`` (for transforms such as ``optax.contrib.reduce_on_plateau``).
      metrics: metric objects (see :mod:`hkfit.metrics`), updated with the train-mode output.
      regularizer: ``params -> scalar`` added to the objective (see
        :func:`make_batch_gradient`).
      loss_scaling: dynamic loss scaling for float16 compute (``hkfit._precision``): the
        loss scale is read from ``ts.opt_state``, and a step whose gradients are not all
        finite keeps the old params, state and optimizer state (the scale adjusted).

    Returns:
      A pure function; dropout keys are ``fold_in(ts.rng, ts.step)``.
    """

    optimizer = optax.with_extra_args_support(optimizer)
    gradient = make_batch_gradient(apply_train, loss_fn, metrics, regularizer=regularizer)

    def train_step(ts: TrainState, logs: tuple, batch: Batch):
        key = jax.random.fold_in(ts.rng, ts.step)
        scale = None if loss_scaling is None else loss_scaling.current(ts.opt_state)
        loss, grads, new_state, logs = gradient(ts.params, ts.state, key, logs, batch, scale)
        # `value=` reaches transforms that need the loss (optax.contrib.reduce_on_plateau)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params, value=loss)
        params = optax.apply_updates(ts.params, updates)
        new = TrainState(params, new_state, opt_state, ts.rng, ts.step + 1)
        if loss_scaling is not None:
            new = loss_scaling.select(ts, new, loss_scaling.finite(grads))
        return new, logs

    return train_step


def make_eval_step(
    apply_eval: Callable,
    loss_fn: Callable,
    metrics: Sequence[Any] = (),
    *,
    keyed: bool = False,
    regularizer: Callable[[PyTree], jax.Array] | None = None,
) -> Callable:
    """Builds ``eval_step(params, state, logs, batch) -> logs`` for one batch.

    With ``keyed=True``, ``apply_eval`` is ``(params, state, rng, x) -> y_pred`` and the
    step is ``eval_step(params, state, logs, batch, rng)``: each batch may draw its own key.
    """

    def eval_step(params, state, logs: tuple, batch: Batch, *rng):
        def apply(params, state, *args):  # as in training: (y_pred, state)
            return apply_eval(params, state, *args), state

        y_pred, _, _, per_example, aux = forward_terms(
            apply, loss_fn, regularizer, params, state, rng[0] if rng else None, batch
        )
        return update_logs(logs, metrics, batch, y_pred, per_example, aux)

    return eval_step


def make_predict_step(apply_eval: Callable, *, keyed: bool = False) -> Callable:
    """Builds ``predict_step(params, state, x) -> y_pred`` for one batch.

    With ``keyed=True``: ``predict_step(params, state, x, rng)`` and ``apply_eval`` is
    ``(params, state, rng, x) -> y_pred``.
    """

    def predict_step(params, state, x, *rng):
        y_pred, _ = auxiliary.collect(apply_eval, params, state, *rng, x)  # added losses: dropped
        return y_pred

    return predict_step


def batch_key(rng: jax.Array, batch_index) -> jax.Array:
    """The inference key of batch ``batch_index`` of one evaluate/predict run."""
    return jax.random.fold_in(rng, batch_index)


# --- Fused loops over device-resident data -------------------------------------------------


def _identity(tree: PyTree) -> PyTree:
    return tree


def make_fused_train(
    train_step: Callable,
    fuse: bool = True,
    shard_batch: Callable | None = None,
    *,
    blocked: bool = False,
    groups: int = 1,
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

    ``blocked=True``: ``data`` holds one block of rows per device, ``[blocks, rows, ...]``
    (see :mod:`hkfit._row_blocks`), and ``idx[num_batches, blocks, local_rows]`` holds
    local row positions; each device gathers from its own block, and the batch is the
    concatenation of the blocks' rows. The short last batch's ``idx`` is a pair ``(local
    [1, blocks, width], keep)`` that keeps only the real rows. With ``groups=N``
    (gradient accumulation) each block's rows are cut into N parts, and the batch is
    ordered part-major, so that every micro-batch takes rows from every block.
    """
    shard = shard_batch or _identity

    def one(ts, logs, data: Batch, idx, b):
        if blocked:
            return train_step(ts, logs, shard(_blocked_batch(data, idx, b, groups)))
        rows = jax.lax.dynamic_index_in_dim(idx, b, keepdims=False)
        n = num_rows_of(data.x)
        batch = gather(data, jnp.minimum(rows, n - 1))  # rows >= n are zero-weight padding
        batch = _masked(batch, rows < n)
        return train_step(ts, logs, shard(batch))

    def run(ts, logs, data: Batch, idx, start, count):
        if not fuse:
            return one(ts, logs, data, idx, start)
        return jax.lax.fori_loop(
            0, count, lambda j, c: one(c[0], c[1], data, idx, start + j), (ts, logs)
        )

    return run


def _blocked_batch(data: Batch, idx: Any, b: Any, groups: int = 1) -> Batch:
    """Batch ``b`` of data laid out in per-device blocks (see :func:`make_fused_train`)."""
    local, keep = idx if isinstance(idx, tuple) else (idx, None)
    rows = jax.lax.dynamic_index_in_dim(local, b, keepdims=False)  # [blocks, local_rows]
    capacity = jax.tree_util.tree_leaves(data.x)[0].shape[1]
    safe = jnp.minimum(rows, capacity - 1)  # rows >= capacity are zero-weight padding
    blocks, width = rows.shape
    part_major = keep is None and groups > 1

    def take(a):
        taken = jax.vmap(lambda block, r: jnp.take(block, r, axis=0))(a, safe)
        if part_major:  # [blocks, groups * w] -> [groups, blocks, w]
            taken = taken.reshape((blocks, groups, width // groups, *taken.shape[2:]))
            taken = jnp.swapaxes(taken, 0, 1)
        return taken.reshape((-1, *taken.shape[(3 if part_major else 2) :]))

    valid = rows < capacity
    if part_major:
        valid = jnp.swapaxes(valid.reshape((blocks, groups, width // groups)), 0, 1)
    batch = _masked(jax.tree_util.tree_map(take, data), valid.reshape(-1))
    return batch if keep is None else gather(batch, keep)


def _masked(batch: Batch, valid: jax.Array) -> Batch:
    """Zeroes the weights (and mask) of padding rows; ``valid`` is ``[rows]``.

    Weights and masks may have more axes (per token, or processes stacked by a
    distribution): ``valid`` is broadcast over them.
    """

    def apply(values):
        values = jnp.asarray(values)
        return values * valid.astype(values.dtype).reshape(valid.shape + (1,) * (values.ndim - 1))

    if batch.mask is None and not isinstance(batch.weights, dict):
        mask = apply(jnp.ones_like(batch.weights))
    else:
        mask = apply(row_mask(batch))
    return batch._replace(weights=jax.tree_util.tree_map(apply, batch.weights), mask=mask)


def make_fused_train_batches(
    train_step: Callable, fuse: bool = True, shard_batch: Callable | None = None
) -> Callable:
    """Runs many training steps per call over batches already cut, e.g. a streamed chunk.

    The returned ``run(ts, logs, batches, start, count)`` takes ``batches = Batch(x, y,
    weights, mask)`` whose leaves are ``[k, batch_size, ...]``: ``k`` whole batches, in the
    order they are trained on (a chunk of training data streamed from the host, see
    ``hkfit._stream``), and trains on batches ``start, ..., start + count - 1``. As in
    :func:`make_fused_train`, ``start`` and ``count`` are traced: one compilation serves
    every split of a chunk into calls, and every chunk of the same shape. Rows the caller
    padded carry weight 0 and mask 0 already; batches past the real ones are never run.

    With ``fuse=False`` no loop is compiled: each call runs the one batch ``start``
    (``count`` must be 1). ``shard_batch`` lays out each batch (see
    :func:`make_fused_train`).
    """
    shard = shard_batch or _identity

    def one(ts, logs, batches: Batch, b):
        batch = jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, b, keepdims=False), batches
        )
        return train_step(ts, logs, shard(batch))

    def run(ts, logs, batches: Batch, start, count):
        if not fuse:
            return one(ts, logs, batches, start)
        return jax.lax.fori_loop(
            0, count, lambda j, c: one(c[0], c[1], batches, start + j), (ts, logs)
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
    blocks: int = 0,
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

    ``blocks=N``: ``data`` holds one block of rows per device, ``[N, rows, ...]`` (see
    :mod:`hkfit._row_blocks`); batch ``b`` takes rows ``b * w .. (b + 1) * w - 1`` of
    every block, ``w = ceil(batch_size / N)``.
    """
    shard = shard_batch or _identity
    width = _padded_width(batch_size, multiple)
    local_width = -(-batch_size // max(blocks, 1))

    def gathered(data: Batch, b) -> Batch:
        if blocks:
            positions = b * local_width + jnp.arange(local_width, dtype=jnp.int32)
            local = jnp.broadcast_to(positions, (blocks, local_width))[None]
            return _blocked_batch(data, local, 0)
        rows, valid = padded_rows(b, batch_size, num_rows_of(data.x), width)
        # a distribution may stack axes after the row axis (weights [rows, ...])
        return _masked(gather(data, rows), valid)

    def run_keyed(params, state, rng, offset, logs, data: Batch, start, count):
        def body(j, logs):
            batch = shard(gathered(data, start + j))
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
