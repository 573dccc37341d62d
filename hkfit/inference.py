"""Evaluation and prediction loops over arrays (fused, device-resident) or iterables.

The loop bodies of ``Model.evaluate`` / ``Model.predict`` (and of validation inside
``fit``). Array data is put on the device once and walked in batches by the model's
jitted fused functions; the last batch is padded with zero-weight rows, so results are
exact over every row and every call has the same shapes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import data as data_lib
from hkfit.step import Batch


class EvalArrays(NamedTuple):
    """An evaluation dataset on the device."""
    data: Batch
    num_rows: int
    batch_size: int

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)


def evaluation_source(model, x: Any, batch_size: int, check_inputs: bool, y: Any = None,
                      sample_weight: Any = None):
    """Arrays on the device (:class:`EvalArrays`), or the iterable of batches as given.

    ``x`` may also be a ``(x, y)`` or ``(x, y, sample_weight)`` tuple of arrays, as
    ``validation_data`` is.
    """
    if y is None and isinstance(x, tuple) and len(x) in (2, 3) and all(
            d is None or data_lib.is_array_tree(d) for d in x):
        x, y, sample_weight = (*x, None)[:3]
    if y is None:
        if isinstance(x, dict) or data_lib.is_array(x):
            raise ValueError("Expected targets `y` to evaluate array inputs. Received: y=None.")
        return x  # an iterable of (x, y[, w]) batches, as in fit
    x, y, n = data_lib.checked_arrays(x, y, check_inputs)
    model._build(x, y)
    weights = data_lib.row_weights(n, y, sample_weight, None)
    return EvalArrays(model._place_rows(Batch(x, y, weights)), n, min(batch_size, n))


def num_batches(source, steps: int | None) -> int | None:
    """Batches an evaluation will run (None for an iterable of unknown length)."""
    if isinstance(source, EvalArrays):
        total = source.num_batches
    else:
        total = len(source) if hasattr(source, "__len__") else None
    return total if steps is None or total is None else min(total, steps)


def evaluate(model, source, cbs=None, steps_per_execution: Any = "auto",
             steps: int | None = None) -> dict[str, float]:
    """Loss and metrics over ``source``; test batch hooks fire on ``cbs`` if given."""
    ts = model.train_state
    logs = model._empty_logs()
    if isinstance(source, EvalArrays):
        pacer = model._pacer("eval", steps_per_execution)
        run = model._fused("eval", source.batch_size, pacer.fused)
        total, start = num_batches(source, steps), 0
        while start < total:
            count = pacer.next(total - start)
            if cbs is not None:
                cbs.on_test_batch_begin(start)
            logs = run(ts.params, ts.state, logs, source.data, start, count)
            pacer.done(count, logs)
            start += count
            if cbs is not None:
                cbs.on_test_batch_end(start - 1, model._read_logs(logs))
        return model._read_logs(logs)
    batches = data_lib.Prefetcher(data_lib.iterate(source, steps), model._device_batch)
    for i, batch in enumerate(batches):
        if model._metrics is None:  # labels seen for the first time: resolve metrics
            model._build(*batch[:2])
            logs = model._empty_logs()
        if cbs is not None:
            cbs.on_test_batch_begin(i)
        logs = model._fn("eval")(ts.params, ts.state, logs, Batch(*batch))
        if cbs is not None:
            cbs.on_test_batch_end(i, model._read_logs(logs))
    return model._read_logs(logs)


def predict_arrays(model, x: Any, batch_size: int, steps: int | None, cbs,
                   steps_per_execution: Any = "auto") -> Any:
    """Outputs for every row of the arrays ``x``, written into one device buffer."""
    n = data_lib.num_rows(x, "x")
    if n == 0:
        raise ValueError("Expected at least one row to predict. Received: 0 rows.")
    model.init(x)
    ts = model.train_state
    batch_size = min(batch_size, n)
    total = math.ceil(n / batch_size)
    if steps is not None:
        total, n = min(total, steps), min(n, steps * batch_size)
    cbs.set_params({**cbs.params, "steps": total})
    spec = jax.eval_shape(model.apply_fn, ts.params, ts.state, data_lib.take_rows(x, 0, batch_size))
    out = model._place(jax.tree_util.tree_map(
        lambda s: jnp.zeros((total * batch_size, *s.shape[1:]), s.dtype), spec))
    x = model._place_rows(x)
    pacer = model._pacer("predict", steps_per_execution)
    run = model._fused("predict", batch_size, pacer.fused)
    start = 0
    while start < total:
        count = pacer.next(total - start)
        cbs.on_predict_batch_begin(start)
        out = run(ts.params, ts.state, out, x, start, count)
        pacer.done(count, out)
        start += count
        cbs.on_predict_batch_end(start - 1, {})
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], jax.device_get(out))


def predict_iterable(model, source, steps: int | None, cbs) -> Any:
    """Outputs for every batch of an iterable, concatenated on the host."""
    outputs = []
    for i, batch in enumerate(data_lib.iterate(source, steps)):
        if isinstance(batch, (tuple, list)):  # (x, y[, w]) batches: keep x
            batch = batch[0]
        batch = data_lib.to_numpy(batch)
        model.init(batch)
        cbs.on_predict_batch_begin(i)
        outputs.append(jax.device_get(model._fn("predict")(model.params, model.state, batch)))
        cbs.on_predict_batch_end(i, {})
    if not outputs:
        raise ValueError("Expected at least one batch to predict. Received: an empty iterable.")
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)
