"""Users' own objectives and train steps, run by the same engine as built-in losses.

Two pure extension points of ``hkfit.Model``:

* ``objective=fn``: ``fn(apply, params, state, rng, batch) -> (loss, (y_pred, new_state))``
  for losses that need the inputs, the params or several forward passes. ``apply(params,
  state, rng, x) -> (y_pred, new_state)`` runs the forward (in training mode in ``fit``,
  in inference mode in ``evaluate``, where ``new_state`` is ``state``). ``loss`` is a
  scalar (the batch's objective) or per-example (or per-token) values, which are averaged
  with ``batch.weights``. Losses the forward adds with ``hkfit.add_loss`` and the
  regularizer are added as usual; metrics get ``y_pred``.
* ``train_step=fn``: ``fn(train_state, batch) -> (train_state, logs)``, a whole step (two
  gradient computations for a GAN, two optimizers...). It returns the new
  :class:`hkfit.TrainState` (params, state and opt_state as it updates them) and a dict of
  scalars (or per-example values) to log; hkfit advances ``step`` by one after it. Logs are
  averaged over an epoch, each batch weighing its number of real rows.

Neither ever sees padding: a batch may couple its rows (a contrastive loss), so the short
last batch of an epoch or an evaluation runs at its real size (one more compilation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hkfit import _eager as eager
from hkfit import metrics as metrics_lib

PyTree = Any


class Objective:
    """A user objective ``fn(apply, params, state, rng, batch) -> (loss, (y_pred, state))``."""

    couples_rows = True

    def __init__(self, fn: Callable):
        self.fn = fn

    def __repr__(self) -> str:
        return f"Objective({self.fn!r})"


def couples_rows(loss: Any) -> bool:
    """Whether a loss (or objective) must never see the padding rows of a short batch.

    A loss that computes something across the rows of a batch (in-batch negatives, a
    contrastive loss, a batch statistic) declares it with ``couples_rows = True`` (an
    attribute of the function or object); custom objectives and train steps always do.
    """
    return bool(getattr(loss, "couples_rows", False))


def checked(fn: Any, arg: str) -> Callable:
    """``fn`` if it is callable; else a TypeError naming ``arg``."""
    if not callable(fn):
        raise TypeError(f"Expected `{arg}` to be a callable. Received: {arg}={fn!r}.")
    return fn


def per_example(loss: jax.Array, batch: Any) -> jax.Array:
    """A custom objective's ``loss`` as values the batch's weights average.

    Per-example (or per-token) values are kept; a scalar is the value of every row, so
    its weighted mean is the scalar itself (and its gradient the scalar's).
    """
    loss = jnp.asarray(loss, jnp.float32)
    if loss.ndim == 0:
        rows = jnp.shape(jax.tree_util.tree_leaves(batch.x)[0])[0]
        return jnp.broadcast_to(loss, (rows,))
    return loss


class StepLog(metrics_lib.Mean):
    """One value a custom train step logs, averaged over batches by their real rows."""

    custom = True

    def __init__(self, name: str):
        super().__init__(lambda _, values: values, name)

    def record(self, state, logs: dict, mask: jax.Array):
        """Adds this batch's value of ``logs[name]``: a scalar, or one value per row."""
        value = jnp.asarray(logs[self.name], jnp.float32)
        rows = mask.reshape(mask.shape[0], -1).max(axis=-1)
        if value.ndim == 0:
            return self.update(state, None, value[None], jnp.sum(rows)[None])
        return self.update(state, None, value.reshape(rows.shape[0], -1).mean(-1), rows)


def log_names(fn: Callable, ts: Any, batch: Any) -> list[str]:
    """The names a custom train step logs (traced once, nothing runs).

    Raises:
      TypeError: if it does not return ``(train_state, dict of values)``.
    """
    out = eager.shape_of(fn, ts, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise TypeError(
            "Expected `train_step` to return (train_state, logs), logs a dict of scalars. "
            f"Received: {jax.tree_util.tree_structure(out)}."
        )
    if str(jax.tree_util.tree_structure(out[0])) != str(jax.tree_util.tree_structure(ts)):
        raise TypeError(
            "Expected `train_step` to return the train state with the structure it was "
            f"given ({jax.tree_util.tree_structure(ts)}). Received: "
            f"{jax.tree_util.tree_structure(out[0])}."
        )
    return [str(k) for k in out[1]]


def make_train_step(fn: Callable, metrics: list, row_mask: Callable) -> Callable:
    """``train_step(ts, logs, batch) -> (ts, logs)`` around a user's ``fn(ts, batch)``."""

    def train_step(ts, logs: tuple, batch):
        new, values = fn(ts, batch)
        new = new._replace(rng=ts.rng, step=ts.step + 1)
        mask = row_mask(batch)
        values = jax.lax.stop_gradient(values)
        updated = tuple(m.record(s, values, mask) for m, s in zip(metrics, logs[1:]))
        return new, (logs[0], *updated)

    return train_step
