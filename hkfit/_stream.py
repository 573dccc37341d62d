"""Training arrays larger than a memory budget, streamed from the host in chunks.

``fit(x, y)`` on arrays normally puts every training row on the device once and gathers
each batch by row index (``hkfit._feeds.TrainArrays``). When the rows, in the dtypes
they are placed in (with their weights and mask), take more than
``fit(device_data_budget=...)`` bytes (default :data:`DEFAULT_BUDGET`), ``fit`` streams
them instead: the host never holds the whole arrays, and the device holds a few chunks.

* The training rows are cut into *windows* of ``window_batches * batch_size``
  consecutive rows, about ``budget / CHUNKS_PER_BUDGET`` bytes each (at least one batch).
  An epoch reads the windows in a shuffled order; each window is read contiguously,
  its rows are permuted, and its whole batches are copied to the device as one chunk
  ``[window_batches, batch_size, ...]``, trained on by one compiled loop over them
  (:func:`hkfit.step.make_fused_train_batches`).
* The order is a function of ``(seed, epoch)`` only, drawn with numpy on the host
  (see :class:`EpochPlan`): a resumed run sees the same batches. It is not a full
  permutation of the rows: a batch only holds rows of one window, and the windows are
  whole stretches of the arrays. ``shuffle=False`` reads every row in order.
* The rows that no whole batch takes (fewer than ``batch_size``, all in the last
  window) are the epoch's last batch, trained on exactly as a call of its own.
* Chunk ``i + 1`` is read and sent to the device right after the computation on chunk
  ``i`` is dispatched, so the copy overlaps that computation.
* Rows are read by :class:`hkfit._host_rows.HostRows`: a memory-mapped array with
  plain file reads into fresh buffers, so its pages are never mapped into the process.

Before the first step the streamed rows are checked window by window as arrays are
(values, labels, weights); with ``validation_split`` the held-out rows are read into
memory and validated as ``validation_data`` arrays are. Streaming is single-process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hkfit import _data as data_lib
from hkfit import _feeds as feeds
from hkfit import _host_rows as host_rows
from hkfit.step import Batch

#: The default ``fit(device_data_budget=...)``: training arrays above 2 GiB are streamed.
DEFAULT_BUDGET = 2 << 30
#: A window (one chunk on the device) is at most ``budget / CHUNKS_PER_BUDGET`` bytes, so
#: the chunk being trained on, the next one and their host copies fit in the budget.
CHUNKS_PER_BUDGET = 4


def check_budget(value: Any) -> int | None:
    """``device_data_budget`` checked: ``None`` (the default budget) or an int >= 1.

    Raises:
      TypeError: for anything but None or an int (``bool`` included).
      ValueError: for an int < 1.
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            "Expected `device_data_budget` to be None or an int, a number of bytes. "
            f"Received: device_data_budget={value!r} of type {type(value).__name__}."
        )
    if value < 1:
        raise ValueError(
            "Expected `device_data_budget` to be a number of bytes >= 1. "
            f"Received: device_data_budget={value!r}."
        )
    return int(value)


def exceeds_budget(
    x: Any, y: Any, sample_weight: Any, validation_split: float, budget: int | None
) -> bool:
    """Whether ``fit``'s training rows of arrays ``x``, ``y`` take more than ``budget``.

    Only shapes and dtypes are read. Inputs it cannot size (rows that differ, scalars,
    weights of another shape) give False: the resident path then raises its usual error.
    ``budget=None`` is :data:`DEFAULT_BUDGET` in one process; with several, where
    streaming is refused, it places the arrays whatever their size.
    """
    if budget is None:
        if jax.process_count() > 1:
            return False
        budget = DEFAULT_BUDGET
    try:
        n = data_lib.num_rows(x, "x")
        if data_lib.num_rows(y, "y") != n:
            return False
        rows = int(n * (1 - validation_split)) if validation_split else n
        return rows * host_rows.placed_row_bytes(x, y, sample_weight) > budget
    except (TypeError, ValueError, IndexError):
        return False


# --- The order of an epoch -----------------------------------------------------------


class EpochPlan:
    """Which rows an epoch of streamed training takes, in which order.

    The rows are cut into windows of ``window_batches * batch_size`` consecutive rows (the
    last may be shorter). With ``shuffle``, the epoch visits the windows in an order drawn
    from ``(key, epoch)``, and permutes the rows of each window with a generator seeded by
    ``(key, epoch, window)``; without, both are in order. Window ``w`` gives the whole
    batches of its permuted rows, in order; the rows left over (only the last window has
    any, fewer than ``batch_size``) form the epoch's last, short batch.

    Every row is in exactly one batch of the epoch, but this is not a uniform permutation:
    rows of different windows never share a batch, and a window's batches are consecutive.

    Args:
      key: the shuffle key (numpy generators are seeded with its raw words).
      epoch: the epoch's index.
      num_rows: the training rows.
      batch_size: rows per batch.
      window_batches: whole batches per window, >= 1.
      shuffle: whether to shuffle.
    """

    def __init__(
        self,
        key: jax.Array,
        epoch: int,
        *,
        num_rows: int,
        batch_size: int,
        window_batches: int,
        shuffle: bool,
    ):
        self.num_rows, self.batch_size, self.shuffle = num_rows, batch_size, shuffle
        self.window_rows = window_batches * batch_size
        self.num_windows = max(1, math.ceil(num_rows / self.window_rows))
        self._seed = [int(w) for w in np.ravel(jax.random.key_data(key))] + [int(epoch)]
        self.order = np.arange(self.num_windows)
        if shuffle:
            self.order = np.random.default_rng([*self._seed, 0]).permutation(self.num_windows)

    def bounds(self, window: int) -> tuple[int, int]:
        """The first row of ``window`` and the row after its last."""
        start = window * self.window_rows
        return start, min(start + self.window_rows, self.num_rows)

    def batches(self, window: int) -> int:
        """The whole batches of ``window``."""
        start, stop = self.bounds(window)
        return (stop - start) // self.batch_size

    def permutation(self, window: int) -> np.ndarray | None:
        """The order of ``window``'s rows (positions inside it); None: in order."""
        if not self.shuffle:
            return None
        start, stop = self.bounds(window)
        return np.random.default_rng([*self._seed, 1, int(window)]).permutation(stop - start)

    def rows(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The epoch's rows as whole batches ``[num_batches, batch_size]`` and the short
        last batch ``[1, rows]`` (None when there is none), like ``_data.epoch_order``."""
        full = []
        for window in self.order:
            start, stop = self.bounds(int(window))
            order = self.permutation(int(window))
            rows = start + (np.arange(stop - start) if order is None else order)
            full.append(rows[: self.batches(int(window)) * self.batch_size])
        last = self.num_windows - 1
        start, stop = self.bounds(last)
        order = self.permutation(last)
        rows = start + (np.arange(stop - start) if order is None else order)
        tail = rows[self.batches(last) * self.batch_size :]
        batches = np.concatenate(full).reshape(-1, self.batch_size)
        return batches, (tail[None] if len(tail) else None)


# --- The feed ------------------------------------------------------------------------


def _select(a: np.ndarray, order: np.ndarray | None, count: int, capacity: int) -> np.ndarray:
    """The first ``count`` rows of ``a`` in ``order`` (None: in order), as ``capacity``
    rows: the rest are zeros, which no step reads."""
    a = np.asarray(a)
    if order is None and count == capacity == len(a):
        return a
    out = np.zeros((capacity, *a.shape[1:]), a.dtype)
    if order is None:
        out[:count] = a[:count]
    else:
        np.take(a, order[:count], axis=0, out=out[:count], mode="clip")
    return out


class TrainStream:
    """Training rows read from the host chunk by chunk; the feed of a streamed ``fit``.

    It offers what the executor uses of :class:`hkfit._feeds.TrainArrays`: ``segments``,
    ``steps``, ``n``, ``batch_size`` and ``exhausted``.

    Args:
      read: ``(start, stop) -> Batch`` of those training rows on the host, in the dtypes
        they are placed in, with their weights and metric mask.
      num_rows: the training rows.
      row_bytes: bytes one row of ``read`` takes.
      batch_size: the global batch size.
      layout: where arrays live (``hkfit._layout``): a layout with a ``mesh`` gets each
        chunk split over its ``axis_name`` axis.
      budget: the device memory, in bytes, the data may take: a chunk holds about
        ``budget / CHUNKS_PER_BUDGET`` bytes (at least one batch).
      shuffle: shuffle as :class:`EpochPlan` does.
      steps_per_epoch: at most this many batches per epoch.
      accumulation_steps: with N > 1 a batch is a macro-batch of N micro-batches.

    Raises:
      ValueError: with several processes (streaming is single-process).
    """

    def __init__(
        self,
        read: Callable[[int, int], Batch],
        num_rows: int,
        row_bytes: int,
        batch_size: int,
        layout: Any,
        *,
        budget: int,
        shuffle: bool,
        steps_per_epoch: int | None,
        accumulation_steps: int = 1,
    ):
        if jax.process_count() > 1:
            raise ValueError(
                "Streaming training arrays larger than `device_data_budget` works in one "
                f"process. Received: {jax.process_count()} processes. Pass an iterable of "
                "batches (each process its own), or a `device_data_budget` the arrays fit in."
            )
        micro_batch_size = layout.local_batch_size(batch_size)
        self.accumulation = (
            (accumulation_steps, micro_batch_size) if accumulation_steps > 1 else None
        )
        self.batch_size = micro_batch_size * accumulation_steps
        self.read, self.n, self.layout, self.shuffle = read, num_rows, layout, shuffle
        self.num_full = num_rows // self.batch_size
        self.has_tail = num_rows % self.batch_size > 0
        if steps_per_epoch is not None and steps_per_epoch < self.num_full + self.has_tail:
            self.num_full, self.has_tail = steps_per_epoch, False
        self.steps: int | None = self.num_full + self.has_tail
        per_batch = max(1, row_bytes * self.batch_size)
        self.window_batches = max(
            1, min(max(1, num_rows // self.batch_size), budget // CHUNKS_PER_BUDGET // per_batch)
        )
        mesh = getattr(layout, "mesh", None)
        self._replicas = 1
        self._split: Any = None
        self._whole: Any = None
        if mesh is not None:
            self._replicas = int(mesh.shape[layout.axis_name])
            self._split = NamedSharding(mesh, PartitionSpec(None, layout.axis_name))
            self._whole = NamedSharding(mesh, PartitionSpec())
        self.exhausted = False

    def plan(self, key: jax.Array, epoch_index: int) -> EpochPlan:
        """The order of epoch ``epoch_index``."""
        return EpochPlan(
            key,
            epoch_index,
            num_rows=self.n,
            batch_size=self.batch_size,
            window_batches=self.window_batches,
            shuffle=self.shuffle,
        )

    def put(self, host: Batch) -> Any:
        """``[k, rows, ...]`` host batches on the device, split over the data axis."""
        rows = jax.tree_util.tree_leaves(host.x)[0].shape[1]
        return jax.device_put(host, self._split if rows % self._replicas == 0 else self._whole)

    def segments(
        self,
        program: Any,
        ts: Any,
        key: jax.Array,
        epoch_index: int,
        fused: bool,
        single: bool = False,
    ) -> list[feeds.Segment]:
        """The epoch's segments, one per chunk, then the short last batch; the carry is
        ``(train_state, logs)``. Nothing is read until a segment runs.

        ``single``: also offer a loop-free one-step function (``Segment.single``).
        """
        plan = self.plan(key, epoch_index)
        windows, left = [], self.num_full
        for window in plan.order:
            count = min(plan.batches(int(window)), left)
            if count:
                windows.append((int(window), count))
                left -= count
        chunks = _EpochChunks(self, plan, [w for w, _ in windows])
        fn = program.train_batches_run(ts, fused, self.accumulation)
        one = program.train_batches_run(ts, False, self.accumulation) if single and fused else None

        def runners(position: int) -> tuple[Callable, Callable | None]:
            def run(f: Callable) -> Callable:
                def execute(carry: Any, start: int, count: int) -> Any:
                    carry = f(*carry, chunks.get(position, carry), start, count)
                    chunks.send_ahead(position + 1)  # its copy overlaps this computation
                    return carry

                return execute

            return run(fn), None if one is None else run(one)

        segments, first = [], 0
        for position, (_, count) in enumerate(windows):
            run, single_run = runners(position)
            segments.append(feeds.Segment(first, count, run, fusable=fused, single=single_run))
            first += count
        if self.has_tail:
            run, single_run = runners(len(windows))
            segments.append(
                feeds.Segment(first, 1, run, fusable=fused, timed=False, single=single_run)
            )
        return segments


class _EpochChunks:
    """The device chunks of one epoch, read on first use; the next one sent ahead.

    Position ``p < len(windows)`` is the chunk of window ``windows[p]``; position
    ``len(windows)`` is the short last batch. Only the chunk in use and the one sent
    ahead are kept, and the host stays at most one chunk ahead of the device: the first
    execution of a chunk waits for the previous chunk's work to finish (dispatch is
    asynchronous, and would otherwise read every chunk while the steps queue up).
    """

    def __init__(self, stream: TrainStream, plan: EpochPlan, windows: list[int]):
        self.stream, self.plan, self.windows = stream, plan, windows
        self._device: dict[int, Any] = {}
        self._tail: Batch | None = None  # host rows of the short last batch, once read
        self._current: int | None = None  # the position of the last execution

    def get(self, position: int, carry: Any) -> Any:
        """The chunk at ``position``, for an execution whose input is ``carry``."""
        if position != self._current:
            if self._current is not None:
                jax.block_until_ready(carry)  # the work on the previous chunk is done
            self._current = position
            for old in [p for p in self._device if p < position]:
                del self._device[old]
        if position not in self._device:
            self._device[position] = self._load(position)
        return self._device[position]

    def send_ahead(self, position: int) -> None:
        last = len(self.windows) + (1 if self.stream.has_tail else 0)
        if position < last and position not in self._device:
            self._device[position] = self._load(position)

    def _read(self, window: int, *, batches: bool) -> Batch | None:
        """Reads ``window``: its whole batches ``[window_batches, batch_size, ...]`` when
        ``batches``; the rows of the short last batch are kept aside when it has them."""
        plan, size = self.plan, self.stream.batch_size
        start, stop = plan.bounds(window)
        data = self.stream.read(start, stop)
        order = plan.permutation(window)
        full = plan.batches(window) * size
        if self.stream.has_tail and window == plan.num_windows - 1 and self._tail is None:
            rest = np.arange(full, stop - start) if order is None else order[full:]
            self._tail = jax.tree_util.tree_map(
                lambda a: _select(a, rest, len(rest), len(rest)), data
            )
        if not batches:
            return None
        capacity = plan.window_rows

        def batched(a: Any) -> np.ndarray:
            rows = _select(a, order, full, capacity)
            return rows.reshape((capacity // size, size, *rows.shape[1:]))

        return jax.tree_util.tree_map(batched, data)

    def _load(self, position: int) -> Any:
        if position < len(self.windows):
            host = self._read(self.windows[position], batches=True)
            return self.stream.put(host)  # type: ignore[arg-type]
        if self._tail is None:  # the last window was skipped (a resumed epoch) or is short
            self._read(self.plan.num_windows - 1, batches=False)
        tail, self._tail = self._tail, None
        return self.stream.put(jax.tree_util.tree_map(lambda a: np.asarray(a)[None], tail))


# --- fit's wiring --------------------------------------------------------------------


def fit_feed(
    context: Any,
    x: Any,
    y: Any,
    args: Any,
    *,
    shuffle: bool,
    class_weight: Any,
    sample_weight: Any,
    check_inputs: bool,
    cap_batch_size: Callable[[int], int],
) -> tuple[TrainStream, Any, Any]:
    """The streamed training feed of ``fit``, its ``validation_split`` data, and its args.

    Everything is checked before the first step, window by window: the values of ``x``
    and ``y`` (with ``check_inputs``), integers that must fit in 32 bits, the labels
    against the model's outputs, the weights, and that ``class_weight`` names classes
    that occur. Errors name the rows they were found in (``x[1000:2000]``).

    Args:
      context: the run's ``hkfit._runs.Context``.
      x, y: the array pytrees (host arrays, memory maps, lists).
      args: the checked ``hkfit._args.FitArgs``.
      shuffle, class_weight, sample_weight, check_inputs: as ``fit`` takes them.
      cap_batch_size: ``rows -> batch size`` used for that many training rows.

    Returns:
      ``(train, validation_data, args)``: ``validation_data`` is ``(x, y, w)`` host arrays
      of the rows ``validation_split`` holds out (read into memory), else None; ``args``
      holds the batch size used.

    Raises:
      ValueError / TypeError: for invalid data, naming it; for held-out validation rows
        larger than the budget.
    """
    budget = args.device_data_budget or DEFAULT_BUDGET
    data_lib.check_numeric(x, "x")
    data_lib.check_numeric(y, "y")
    n = data_lib.num_rows(x, "x")
    if data_lib.num_rows(y, "y") != n:
        raise ValueError(
            "Expected `x` and `y` to have the same number of rows. Received: x has "
            f"{n} rows, y has {data_lib.num_rows(y, 'y')}."
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(sample_weight, is_leaf=data_lib.is_array):
        shape = np.shape(leaf)
        if not shape or shape[0] != n:
            where = f"sample_weight{jax.tree_util.keystr(path)}"
            raise ValueError(
                f"Expected `{where}` of shape ({n},), one weight per row, or ({n}, ...) "
                f"per token. Received: shape {shape}."
            )
    context.layout.local_batch_size(args.batch_size)  # refused before building
    data, held_out = Batch(x, y, sample_weight), None
    if args.validation_split:
        data, held_out = feeds.split_validation(data, args.validation_split)
    rows = data_lib.num_rows(data.x, "x")
    xs, ys, ws = (
        host_rows.HostRows(data.x),
        host_rows.HostRows(data.y),
        host_rows.HostRows(data.weights),
    )

    def read(start: int, stop: int) -> Batch:
        part = f"[{start}:{stop}]"
        x_rows = data_lib.to_device_dtypes(xs.read(start, stop), "x" + part)
        y_rows = data_lib.to_device_dtypes(ys.read(start, stop), "y" + part)
        y_rows = context.labels(y_rows, "y" + part)
        weights = data_lib.row_weights(
            stop - start, y_rows, ws.read(start, stop), None, name="sample_weight" + part
        )
        mask = data_lib.metric_mask(weights)
        if class_weight is not None:
            weights = weights * data_lib.row_weights(
                stop - start, y_rows, None, class_weight, require_present=False
            )
        return Batch(x_rows, y_rows, weights, mask)

    first = min(8, rows)
    context.build(
        data_lib.to_device_dtypes(xs.read(0, first), f"x[0:{first}]"),
        data_lib.to_device_dtypes(ys.read(0, first), f"y[0:{first}]"),
        train=True,
    )
    row_bytes = host_rows.placed_row_bytes(data.x, data.y, data.weights)
    args = args._replace(batch_size=cap_batch_size(rows))
    train = TrainStream(
        read,
        rows,
        row_bytes,
        args.batch_size,
        context.layout,
        budget=budget,
        shuffle=shuffle,
        steps_per_epoch=args.steps_per_epoch,
        accumulation_steps=args.gradient_accumulation_steps,
    )
    host_rows.check_rows(
        xs,
        ys,
        ws,
        rows,
        train.window_batches * train.batch_size,
        labels=context.labels,
        class_weight=class_weight,
        check_inputs=check_inputs,
        narrows_x=host_rows.narrows_integers(x),
    )
    validation_data = None
    if held_out is not None:
        held_rows = data_lib.num_rows(held_out.x, "x")
        if held_rows * row_bytes > budget:
            raise ValueError(
                "Expected the rows `validation_split` holds out to fit in "
                "`device_data_budget`: validation arrays are placed on the device whole. "
                f"Received: validation_split={args.validation_split}, {held_rows} rows of "
                f"{held_rows * row_bytes} bytes, device_data_budget={budget}. Pass a smaller "
                "validation_split, or `validation_data` as an iterable of batches."
            )
        validation_data = host_rows.HostRows((held_out.x, held_out.y, held_out.weights)).read(
            0, held_rows
        )
    return train, validation_data, args


__all__ = ["DEFAULT_BUDGET", "EpochPlan", "TrainStream", "check_budget", "fit_feed"]
