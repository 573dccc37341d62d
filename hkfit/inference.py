"""Evaluation and prediction loops over arrays (fused, device-resident) or iterables.

The loop bodies of ``Model.evaluate`` / ``Model.predict`` (and of validation inside
``fit``), run by the model's jitted fused functions; the last batch is padded with
zero-weight rows, so results are exact over every row and every call has the same shapes.

Validation data is put on the device once per ``fit`` and reused every epoch. A single
``evaluate`` / ``predict`` call on host arrays instead streams them in chunks of
about ``CHUNK_BYTES``: the copy of chunk ``i + 1`` overlaps the computation on chunk ``i``,
and the device never holds a second copy of the whole dataset.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _data as data_lib
from hkfit.step import Batch


CHUNK_BYTES = 8 << 20


class EvalArrays(NamedTuple):
    """An evaluation dataset, on the device (or on the host, to be streamed)."""
    data: Batch
    num_rows: int
    batch_size: int
    on_host: bool = False

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)


def evaluation_source(model, x: Any, batch_size: int, check_inputs: bool, y: Any = None,
                      sample_weight: Any = None, stream: bool = False):
    """Arrays (:class:`EvalArrays`), or the iterable of batches as given.

    ``x`` may also be a ``(x, y)`` or ``(x, y, sample_weight)`` tuple of arrays, as
    ``validation_data`` is. With ``stream`` (and no distribution) arrays stay on the host
    and are streamed by :func:`evaluate`; otherwise they are put on the device now.
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
    if stream and model.distribution is None:
        return EvalArrays(Batch(x, y, weights), n, min(batch_size, n), on_host=True)
    return EvalArrays(model._place_rows(Batch(x, y, weights)), n, min(batch_size, n))


def num_batches(source, steps: int | None) -> int | None:
    """Batches an evaluation will run (None for an iterable of unknown length)."""
    if isinstance(source, EvalArrays):
        total = source.num_batches
    else:
        total = len(source) if hasattr(source, "__len__") else None
    return total if steps is None or total is None else min(total, steps)


def _chunks(tree: Any, num_rows: int, batch_size: int):
    """Yields ``(first_batch, num_batches, device_chunk)`` over ``tree``'s first ``num_rows``.

    Every chunk has the same number of rows (the last one is padded by repeating its last
    row), so one compilation serves them all. Each chunk is sent to the device before the
    previous one is handed out, so its copy overlaps the work on the previous chunk.
    """
    row_bytes = sum(np.asarray(a[:1]).nbytes for a in jax.tree_util.tree_leaves(tree))
    per_chunk = max(1, min(math.ceil(num_rows / batch_size), CHUNK_BYTES // max(1, row_bytes * batch_size)))
    rows = per_chunk * batch_size

    def put(first_row):
        stop = first_row + rows
        if stop <= num_rows:
            return jax.device_put(jax.tree_util.tree_map(lambda a: a[first_row:stop], tree))
        index = np.arange(first_row, stop)
        part = jax.tree_util.tree_map(lambda a: a[np.minimum(index, num_rows - 1)], tree)
        if isinstance(part, Batch):  # repeated rows must not count
            part = part._replace(weights=np.where(index < num_rows, part.weights, 0).astype(np.float32))
        return jax.device_put(part)

    starts = list(range(0, num_rows, rows))
    ahead = put(0)
    for i, first_row in enumerate(starts):
        current = ahead
        if i + 1 < len(starts):
            ahead = put(starts[i + 1])
        yield first_row // batch_size, math.ceil(min(rows, num_rows - first_row) / batch_size), current


def _evaluate_streamed(model, source: EvalArrays, cbs, steps: int | None,
                       steps_per_execution: Any) -> dict[str, float]:
    ts = model.train_state
    logs = model._empty_logs()
    fused = model._pacer("eval", steps_per_execution).fused  # a chunk per call, if fused
    rows = source.num_rows if steps is None else min(source.num_rows, steps * source.batch_size)
    run = model._fused("eval", source.batch_size, fused)
    for first, count, chunk in _chunks(source.data, rows, source.batch_size):
        if cbs is not None:
            cbs.on_test_batch_begin(first)
        for start, n in ([(0, count)] if fused else [(b, 1) for b in range(count)]):
            logs = run(ts.params, ts.state, logs, chunk, start, n)
        if cbs is not None:
            cbs.on_test_batch_end(first + count - 1, model._read_logs(logs))
    return model._read_logs(logs)


def evaluate(model, source, cbs=None, steps_per_execution: Any = "auto",
             steps: int | None = None) -> dict[str, float]:
    """Loss and metrics over ``source``; test batch hooks fire on ``cbs`` if given."""
    if isinstance(source, EvalArrays) and source.on_host:
        return _evaluate_streamed(model, source, cbs, steps, steps_per_execution)
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
    """Outputs for every row of the host arrays ``x``, streamed to the device in chunks."""
    n = data_lib.num_rows(x, "x")
    if n == 0:
        raise ValueError("Expected at least one row to predict. Received: 0 rows.")
    model.init(x)
    ts = model.train_state
    batch_size = min(batch_size, n)
    if steps is not None:
        n = min(n, steps * batch_size)
    cbs.set_params({**cbs.params, "steps": math.ceil(n / batch_size)})
    if model.distribution is not None:
        return _predict_on_device(model, x, n, batch_size, cbs, steps_per_execution)
    fused = model._pacer("predict", steps_per_execution).fused
    run = model._fused("predict", batch_size, fused)
    spec = jax.eval_shape(model.apply_fn, ts.params, ts.state, data_lib.take_rows(x, 0, batch_size))
    result = jax.tree_util.tree_map(lambda s: np.empty((n, *s.shape[1:]), s.dtype), spec)
    pending = None

    def collect(item):
        first_row, out = item
        for target, values in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(out)):
            values = np.asarray(values)
            target[first_row:first_row + len(values)] = values[:n - first_row]

    for first, count, chunk in _chunks(x, n, batch_size):
        cbs.on_predict_batch_begin(first)
        rows = jax.tree_util.tree_leaves(chunk)[0].shape[0]
        out = jax.tree_util.tree_map(lambda s: jnp.zeros((rows, *s.shape[1:]), s.dtype), spec)
        for start, k in ([(0, count)] if fused else [(b, 1) for b in range(count)]):
            out = run(ts.params, ts.state, out, chunk, start, k)
        if pending is not None:  # fetch the previous chunk while this one computes
            collect(pending)
        pending = (first * batch_size, out)
        cbs.on_predict_batch_end(first + count - 1, {})
    collect(pending)
    return result


def _predict_on_device(model, x, n: int, batch_size: int, cbs, steps_per_execution) -> Any:
    """Predict with the whole input placed once by the model's distribution."""
    ts = model.train_state
    total = math.ceil(n / batch_size)
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
