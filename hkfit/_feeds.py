"""Feeds: user data turned into segments of batches that the executor runs.

A feed never sees the model. It checks its own arguments, places its data through the
layout, and describes each run as :class:`Segment` s: ``num_batches`` consecutive batches
that one compiled function can run in any split, ``run(carry, start, count)``. The
executor (``hkfit._engine``) decides how many batches each execution takes.

Three kinds of data:

* arrays resident on the device (training data, and validation data inside ``fit``):
  placed once, batched by row indices inside the compiled loop;
* host arrays streamed in chunks of about ``CHUNK_BYTES`` (``evaluate`` / ``predict`` on
  one device): the copy of chunk ``i + 1`` overlaps the computation on chunk ``i``, and
  the device never holds a second copy of the whole dataset;
* iterables of batches, moved to the device two batches ahead.

The last partial batch of evaluation and prediction is padded with zero-weight rows, so
results are exact over every row. In training it is its own call (so BatchNorm
statistics see exactly its rows), except for models without Haiku state, where a
zero-weight-padded last batch trains exactly like the short one and joins the fused call.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _aligned as aligned
from hkfit import _compat
from hkfit import _data as data_lib
from hkfit import _row_blocks as row_blocks
from hkfit.step import Batch

CHUNK_BYTES = 8 << 20
#: Training arrays up to this size are padded to a bucketed row count (see `bucket`).
BUCKET_MAX_BYTES = 64 << 20


class Segment(NamedTuple):
    """Consecutive batches that one compiled function runs in any split.

    Attributes:
      first: the index of the segment's first batch in its epoch or run.
      num_batches: how many batches it holds.
      run: ``(carry, start, count) -> carry`` runs batches ``start .. start + count - 1``
        of the segment.
      fusable: whether ``count`` may exceed 1.
      timed: whether its executions are representative for pacing (an odd-shaped last
        batch compiles on first use, so it is not).
      outputs: for prediction, ``(carry, start, count) -> outputs`` of those batches.
      single: a loop-free compiled function running the one batch ``start`` (``count``
        is 1), which ``"auto"`` pacing may prefer to the fused ``run``.
    """

    first: int
    num_batches: int
    run: Callable[[Any, int, int], Any]
    fusable: bool = True
    timed: bool = True
    outputs: Callable[[Any, int, int], Any] | None = None
    single: Callable[[Any, int, int], Any] | None = None


def skip(segments: Iterable[Segment], count: int) -> list[Segment]:
    """``segments`` without their first ``count`` batches (to resume inside an epoch)."""
    kept = []
    for segment in segments:
        if count >= segment.num_batches:
            count -= segment.num_batches
            continue
        if count:
            segment = segment._replace(
                first=segment.first + count,
                num_batches=segment.num_batches - count,
                run=_shifted(segment.run, count),
                single=None if segment.single is None else _shifted(segment.single, count),
            )
            count = 0
        kept.append(segment)
    return kept


def _shifted(run: Callable[[Any, int, int], Any], offset: int) -> Callable[[Any, int, int], Any]:
    def shifted(carry: Any, start: int, count: int) -> Any:
        return run(carry, start + offset, count)

    return shifted


def split_validation(data: Batch, fraction: float) -> tuple[Batch, Batch]:
    """Splits off the LAST ``fraction`` of the rows (before any shuffling), as Keras does.

    Raises:
      ValueError: if either part would be empty.
    """
    n = data_lib.num_rows(data.x, "x")
    split_at = int(n * (1 - fraction))
    if split_at in (0, n):
        raise ValueError(
            f"`validation_split`={fraction} leaves {split_at} training and "
            f"{n - split_at} validation rows out of {n}. Expected at least one "
            "of each."
        )
    return data_lib.take_rows(data, 0, split_at), data_lib.take_rows(data, split_at, None)


# --- Training ---------------------------------------------------------------------------


def _nbytes(tree: Any) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree))


def bucket(n: int) -> int:
    """The smallest of 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ... (``c * 2**k``, c in 4..7) >= n.

    Training arrays are padded to this many rows, and the epoch's row order to this
    many batches, so that fits on many dataset sizes (cross-validation folds, growing
    buffers, active learning) share a few compilations: at most four per doubling of
    the size, for at most 25% more rows. Datasets over ``BUCKET_MAX_BYTES`` are not
    padded: their epochs take far longer than a compilation.
    """
    if n <= 4:
        return max(n, 1)
    k = (n - 1).bit_length() - 3  # n - 1 < 8 * 2**k
    return -(-n // 2**k) * 2**k


def pad_rows(data: Batch, rows: int) -> Batch:
    """``data`` with copies of its last row appended up to ``rows`` rows, weighted 0.

    The training step never gathers them as real rows: a batch reads them only through
    the out-of-range padding index, with weight and mask 0. They are copies of a real
    row, so a forward that misbehaves on zeros (a log, a division) stays finite there.
    """
    n = data_lib.num_rows(data.x, "x")
    if rows == n:
        return data
    extra = rows - n

    def repeat_last(a):  # aligned: a CPU device uses the padded copy in place
        a = np.asarray(a)
        return aligned.concatenate([a, np.repeat(a[-1:], extra, axis=0)])

    def zeros(a):
        a = np.asarray(a)
        return aligned.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])

    mask = data.mask if data.mask is not None else np.ones(n, np.float32)
    return Batch(
        jax.tree_util.tree_map(repeat_last, data.x),
        jax.tree_util.tree_map(repeat_last, data.y),
        jax.tree_util.tree_map(zeros, data.weights),
        jax.tree_util.tree_map(zeros, mask),
    )


class TrainArrays:
    """Training arrays put on the device once; an epoch is a row order plus fused calls.

    Args:
      data: the checked host arrays with their per-row weights.
      batch_size: the GLOBAL batch size (the layout says how many rows are local).
      layout: where the rows live.
      shuffle: shuffle the rows each epoch (deterministic from the key and epoch index).
      steps_per_epoch: at most this many batches per epoch.
      accumulation_steps: with N > 1, each batch is a macro-batch of N * batch_size rows
        (one optimizer step; the step cuts it into micro-batches of ``batch_size``).
    """

    def __init__(
        self,
        data: Batch,
        batch_size: int,
        layout: Any,
        *,
        shuffle: bool,
        steps_per_epoch: int | None,
        accumulation_steps: int = 1,
    ):
        micro_batch_size = layout.local_batch_size(batch_size)
        self.n = data_lib.num_rows(data.x, "x")
        self.shuffle, self.layout = shuffle, layout
        small = _nbytes(data) <= BUCKET_MAX_BYTES
        self.blocks: row_blocks.BlockPlan | None = None
        if layout.shards_rows:  # one block of rows per device
            _, count = layout.local_blocks()
            largest = max(-(-self.n // count), 1)  # the rows of the largest block
            self.blocks = row_blocks.BlockPlan(self.n, count, bucket(largest) if small else None)
            self.local_batch_size = micro_batch_size // count * accumulation_steps
            micro_batch_size = batch_size  # the gathered batch is the global batch
        self.accumulation = (
            (accumulation_steps, micro_batch_size) if accumulation_steps > 1 else None
        )
        self.batch_size = micro_batch_size * accumulation_steps
        if self.blocks is not None:
            self.num_full = int(self.blocks.counts.min()) // self.local_batch_size
            self.has_tail = self.num_full * self.local_batch_size * count < self.n
        else:
            self.num_full = self.n // self.batch_size
            self.has_tail = self.n % self.batch_size > 0
        if steps_per_epoch is not None and steps_per_epoch < self.num_full + self.has_tail:
            self.num_full, self.has_tail = steps_per_epoch, False
        self.steps: int | None = self.num_full + self.has_tail
        if self.blocks is not None:
            self.rows = self.blocks.capacity
            self.data = layout.place_blocks(self.blocks.split(data))
        else:
            # rows on the device: a few shapes serve many sizes (small datasets only, where
            # a padded host copy costs little and compilation dominates a fit)
            self.rows = bucket(self.n) if small else self.n
            self.data = layout.place_rows(pad_rows(data, self.rows))
        self.exhausted = False

    def _blocked_order(self, key: jax.Array, epoch_index: int) -> tuple[np.ndarray, Any]:
        assert self.blocks is not None
        full, tail = self.blocks.epoch_order(
            key,
            epoch_index,
            local_batch_size=self.local_batch_size,
            shuffle=self.shuffle,
            processes=jax.process_count(),
        )
        full = full[: self.num_full] if self.num_full else full[:1]
        if not self.has_tail:
            tail = None  # steps_per_epoch cut the epoch before the leftover rows
        filler = np.full((bucket(len(full)) - len(full), *full.shape[1:]), self.rows, np.int32)
        return np.concatenate([full, filler]), None if tail is None else tuple(tail)

    def segments(
        self,
        program: Any,
        ts: Any,
        key: jax.Array,
        epoch_index: int,
        fused: bool,
        single: bool = False,
    ) -> list[Segment]:
        """The epoch's segments; the carry is ``(train_state, logs)``.

        ``single``: also offer a loop-free one-step function (``Segment.single``).
        """
        pad = (
            self.has_tail
            and fused
            and self.layout.pads_train_tail
            and not jax.tree_util.tree_leaves(ts.state)
            and not program.couples_rows
            and _compat.threefry_partitionable()
        )
        if self.blocks is not None:
            full, tail = self._blocked_order(key, epoch_index)
        else:
            full, tail = data_lib.epoch_order(
                key,
                epoch_index,
                num_rows=self.n,
                batch_size=self.batch_size,
                shuffle=self.shuffle,
                pad_tail=pad,
            )
            if not self.has_tail:
                tail = None  # steps_per_epoch cut the epoch before the leftover rows
            num_batches = len(full)
            full = np.where(full >= self.n, self.rows, full)  # padding: past the padded rows
            full = np.concatenate(  # never-run batches: one shape serves many batch counts
                [full, np.full((bucket(num_batches) - num_batches, self.batch_size), self.rows)]
            ).astype(np.int32)
        full, tail = self.layout.place_state((full, tail))
        blocked = self.blocks is not None
        fn = program.train_run(ts, fused, self.accumulation, blocked=blocked)
        one = (
            program.train_run(ts, False, self.accumulation, blocked=blocked)
            if single and fused
            else None
        )

        def runner(idx, f=fn):
            return lambda carry, start, count: f(*carry, self.data, idx, start, count)

        def single_runner(idx):
            return None if one is None else runner(idx, one)

        segments = [
            Segment(0, self.num_full + pad, runner(full), fusable=fused, single=single_runner(full))
        ]
        if tail is not None:
            segments.append(
                Segment(
                    self.num_full,
                    1,
                    runner(tail),
                    fusable=fused,
                    timed=False,
                    single=single_runner(tail),
                )
            )
        return segments


class Batches:
    """An iterable of ``(x, y[, w])`` (or input-only) batches, moved to the device ahead.

    Without ``steps`` each pass is ``iter(source)`` again; with it, one iterator is shared
    by all passes and a pass is at most ``steps`` batches, so infinite generators work.

    With ``group=N`` (gradient accumulation) a step is N consecutive batches: ``steps``
    and :attr:`steps` count groups, and a pass reads at most ``N * steps`` batches.
    """

    def __init__(
        self,
        source: Iterable,
        steps: int | None,
        convert: Callable,
        *,
        name: str = "x",
        shared: bool = True,
        group: int = 1,
    ):
        if not isinstance(source, Iterable) or data_lib.is_array(source):
            raise TypeError(
                f"Expected `{name}` to be arrays or an iterable of batches. "
                f"Received: {type(source).__name__}."
            )
        self.source, self.steps_per_pass, self.convert = source, steps, convert
        self.group = group
        self.steps = steps or (
            math.ceil(len(source) / group) if isinstance(source, Sized) else None
        )
        self._shared = iter(source) if (steps is not None and shared) else None
        self._restore: Any = None
        self._last: Pass | None = None
        self.exhausted = False

    @property
    def shared_state(self) -> Any:
        """The state of the iterator that all passes share, after the last batch handed out.

        None when each pass starts a new iterator or the iterator has no ``get_state``. A
        save between epochs keeps it, so that a resumed run reads on from there.
        """
        return None if self._shared is None or self._last is None else self._last.state

    def restore(self, state: Any) -> None:
        """Makes the next pass's iterator continue from ``state`` (see :meth:`open`)."""
        self._restore = state

    def open(self, steps: int | None = None, offset: int = 0) -> Pass:
        """One pass: a prefetching iterator of device batches, ``.first`` peeked.

        ``offset`` steps of the pass were run before (a resumed epoch): the pass reads
        the rest and numbers its batches from ``offset``. An iterator with ``get_state``
        / ``set_state`` (a grain iterator) is first set to the state given to
        :meth:`restore`, and the pass tracks its state after each batch it hands out.
        """
        iterator = self._shared if self._shared is not None else iter(self.source)
        if self._restore is not None and hasattr(iterator, "set_state"):
            iterator.set_state(self._restore)
        self._restore = None
        limit = self.steps_per_pass if steps is None else steps
        limit = None if limit is None else max(limit - offset, 0) * self.group
        states: collections.deque | None = None
        items: Iterator = data_lib.iterate(iterator, limit)
        if hasattr(iterator, "get_state"):
            states = collections.deque()
            items = _recording_states(items, iterator, states)
        self._last = Pass(data_lib.Prefetcher(items, self.convert), offset, states)
        return self._last


def _recording_states(items: Iterator, iterator: Any, states: collections.deque) -> Iterator:
    """Yields ``items``, appending ``iterator.get_state()`` after each to ``states``."""
    for item in items:
        states.append(iterator.get_state())
        yield item


class Pass:
    """The device batches of one pass over an iterable, with the first one peeked."""

    def __init__(self, batches: Iterator, offset: int = 0, states: collections.deque | None = None):
        self._batches = batches
        self._states = states
        self.offset = offset
        self.state: Any = None  # the iterator's state after the last batch handed out
        self.first = next(batches, None)
        self.count = 0

    def _handed_out(self, batch: Any) -> Any:
        self.count += 1
        if self._states:
            self.state = self._states.popleft()
        return batch

    def __iter__(self) -> Iterator:
        if self.first is not None:
            first, self.first = self.first, None
            yield self._handed_out(first)
        for batch in self._batches:
            yield self._handed_out(batch)

    def segments(
        self, step: Callable[[Any, Any, int], Any], outputs: Callable | None = None
    ) -> Iterator[Segment]:
        """One segment per batch: ``step(carry, batch, index) -> carry``."""
        for i, batch in enumerate(self, self.offset):

            def run(carry: Any, _start: int, _count: int, b: Any = batch, i: int = i) -> Any:
                return step(carry, b, i)

            yield Segment(i, 1, run, fusable=False, outputs=outputs)

    def groups(self, size: int, step: Callable[[Any, tuple], Any]) -> Iterator[Segment]:
        """One segment per ``size`` consecutive batches (the last may hold fewer).

        Each segment runs ``step(carry, batches) -> carry`` on its tuple of batches.
        """
        group: list = []
        index = self.offset

        def segment(batches: tuple, i: int) -> Segment:
            def run(carry: Any, _start: int, _count: int) -> Any:
                return step(carry, batches)

            return Segment(i, 1, run, fusable=False)

        for batch in self:
            group.append(batch)
            if len(group) == size:
                yield segment(tuple(group), index)
                group, index = [], index + 1
        if group:
            yield segment(tuple(group), index)


# --- Evaluation and prediction over arrays ----------------------------------------------


def chunks(tree: Any, num_rows: int, batch_size: int, place: Callable = jax.device_put):
    """Yields ``(first_batch, num_batches, device_chunk)`` over ``tree``'s first ``num_rows``.

    Every chunk has the same number of rows (the last one is padded by repeating its last
    row, with weight 0 in a :class:`Batch`), so one compilation serves them all. Each chunk
    is sent to the device (by ``place``) before the previous one is handed out, so its
    copy overlaps the work on the previous chunk.
    """
    row_bytes = sum(np.asarray(a[:1]).nbytes for a in jax.tree_util.tree_leaves(tree))
    per_chunk = max(
        1, min(math.ceil(num_rows / batch_size), CHUNK_BYTES // max(1, row_bytes * batch_size))
    )
    rows = per_chunk * batch_size

    def put(first_row):
        stop = first_row + rows
        if stop <= num_rows:
            return place(jax.tree_util.tree_map(lambda a: a[first_row:stop], tree))
        index = np.arange(first_row, stop)
        part = jax.tree_util.tree_map(lambda a: a[np.minimum(index, num_rows - 1)], tree)
        if isinstance(part, Batch):  # repeated rows must not count (weights may be per token)
            valid = index < num_rows

            def zeroed(values):
                real = valid.reshape((-1,) + (1,) * (np.ndim(values) - 1))
                return np.where(real, values, 0).astype(np.float32)

            part = part._replace(weights=jax.tree_util.tree_map(zeroed, part.weights))
            if part.mask is not None:
                part = part._replace(mask=zeroed(part.mask))
        return place(part)

    starts = list(range(0, num_rows, rows))
    ahead = put(0)
    for i, first_row in enumerate(starts):
        current = ahead
        if i + 1 < len(starts):
            ahead = put(starts[i + 1])
        yield (
            first_row // batch_size,
            math.ceil(min(rows, num_rows - first_row) / batch_size),
            current,
        )


class EvalArrays:
    """Evaluation arrays: on the device (placed once) or on the host (streamed in chunks).

    Args:
      data: the checked host arrays with their per-row weights.
      batch_size: rows per batch (capped at the number of rows).
      layout: where arrays live; streaming is used only where it allows it.
      resident: put the rows on the device now (validation data reused every epoch).
    """

    def __init__(self, data: Batch, batch_size: int, layout: Any, *, resident: bool):
        self.n = data_lib.num_rows(data.x, "x")
        self.batch_size = min(batch_size, self.n)
        self.on_host = not resident and layout.streams_inference
        self.layout = layout
        self._host: Batch | None = None  # kept only while the rows may need re-placing
        self.blocks: row_blocks.BlockPlan | None = None
        if self.on_host:
            self.data = data
        elif layout.shards_rows:  # one block of rows per device
            self._host = data
            self.blocks = row_blocks.BlockPlan(self.n, layout.local_blocks()[1])
            self.data = layout.place_blocks(self.blocks.split(data))
            self.local_width = -(-self.batch_size // layout.num_replicas)
        else:
            self.data = layout.place_rows(data)

    def num_batches(self, steps: int | None = None) -> int:
        if self.blocks is not None:
            total = math.ceil(self.blocks.capacity / self.local_width)
        else:
            total = math.ceil(self.n / self.batch_size)
        return total if steps is None else min(total, steps)

    def _replicated(self) -> None:
        """Places the rows on every device instead of in blocks (for coupled rows)."""
        if self.blocks is not None:
            self.blocks, self.data = None, self.layout.place_rows(self._host)
            self._host = None

    def segments(
        self, program: Any, params: Any, state: Any, fused: bool, steps: int | None = None
    ) -> Iterator[Segment]:
        """The run's segments; the carry is the metric states (``logs``).

        A program whose batches couple their rows (``program.couples_rows``) runs a short
        last batch at its real size instead of padding it (and takes its batches in the
        one-device order, so rows in per-device blocks are first placed on every device).
        """
        if program.couples_rows:
            self._replicated()
        fn = program.eval_run(self.batch_size, fused, blocked=self.blocks is not None)
        batches = self.num_batches(steps)
        tail = None
        if program.couples_rows and batches * self.batch_size > self.n:
            batches -= 1
            tail = data_lib.take_rows(self.data, batches * self.batch_size, None)
        if not self.on_host:
            if batches:
                yield Segment(
                    0,
                    batches,
                    lambda logs, start, count: fn(params, state, 0, logs, self.data, start, count),
                    fusable=fused,
                )
        else:
            rows = min(self.n, batches * self.batch_size)
            for first, count, chunk in chunks(self.data, rows, self.batch_size) if rows else ():

                def run(
                    logs: Any, start: int, k: int, chunk: Any = chunk, first: int = first
                ) -> Any:
                    return fn(params, state, first, logs, chunk, start, k)

                yield Segment(first, count, run, fusable=fused)
        if tail is not None:
            step, batch = program.eval_step(), Batch(*jax.device_put(tuple(tail)))
            yield Segment(
                batches,
                1,
                lambda logs, _start, _count: step(params, state, logs, batch, batches),
                fusable=False,
                timed=False,
            )


class PredictArrays:
    """Prediction over arrays: streamed from the host in chunks (each placed by the layout),
    or, with several processes, placed once by the layout.

    The carry is a :class:`Collector` that writes each chunk's outputs into one host
    buffer of exactly ``n`` rows, fetching a chunk while the next one computes.
    """

    def __init__(self, x: Any, batch_size: int, layout: Any, steps: int | None):
        self.x, self.layout = x, layout
        n = data_lib.num_rows(x, "x")
        if n == 0:
            raise ValueError("Expected at least one row to predict. Received: 0 rows.")
        self.batch_size = min(batch_size, n)
        self.n = n if steps is None else min(n, steps * self.batch_size)
        self.steps = math.ceil(self.n / self.batch_size)

    def collector(self, spec: Any) -> Collector:
        return Collector(spec, self.n, self.batch_size)

    def segments(self, program: Any, params: Any, state: Any, fused: bool) -> Iterator[Segment]:
        fn = program.predict_run(self.batch_size, fused)

        def outputs(collector, start, count):
            return collector.rows(start, count)

        if not self.layout.streams_inference and jax.process_count() > 1:
            x = self.layout.place_rows(self.x)  # checked to be the same in every process

            def run_placed(collector, start, count):
                if collector.buffer is None:
                    collector.open(0, self.steps * self.batch_size, self.layout)
                collector.buffer = fn(params, state, 0, collector.buffer, x, start, count)
                return collector

            yield Segment(0, self.steps, run_placed, fusable=fused, outputs=outputs)
            return
        # one process: chunks of the inputs, each placed on every device in turn
        for first, count, chunk in chunks(self.x, self.n, self.batch_size, self.layout.place_rows):
            rows = jax.tree_util.tree_leaves(chunk)[0].shape[0]

            def run_chunk(collector, start, k, chunk=chunk, first=first, rows=rows):
                if start == 0:
                    collector.open(first, rows, self.layout)
                collector.buffer = fn(params, state, first, collector.buffer, chunk, start, k)
                return collector

            yield Segment(first, count, run_chunk, fusable=fused, outputs=outputs)


class Collector:
    """Host buffer of ``n`` output rows, filled chunk by chunk (one chunk fetched late)."""

    def __init__(self, spec: Any, n: int, batch_size: int):
        self.spec, self.n, self.batch_size = spec, n, batch_size
        self.result = jax.tree_util.tree_map(lambda s: np.empty((n, *s.shape[1:]), s.dtype), spec)
        self.buffer: Any = None
        self._first_batch = 0
        self._pending: tuple | None = None

    def open(self, first_batch: int, rows: int, layout: Any) -> None:
        """Starts a chunk buffer of ``rows`` rows whose first batch is ``first_batch``."""
        if self.buffer is not None:  # fetch the previous chunk while this one computes
            self._flush()
            self._pending = (self._first_batch, self.buffer)
        self._first_batch = first_batch
        self.buffer = layout.place_state(
            jax.tree_util.tree_map(lambda s: jnp.zeros((rows, *s.shape[1:]), s.dtype), self.spec)
        )

    def _flush(self) -> None:
        if self._pending is None:
            return
        first_batch, out = self._pending
        first_row = first_batch * self.batch_size
        for target, values in zip(
            jax.tree_util.tree_leaves(self.result), jax.tree_util.tree_leaves(jax.device_get(out))
        ):
            values = np.asarray(values)
            target[first_row : first_row + len(values)] = values[: self.n - first_row]
        self._pending = None

    def rows(self, start: int, count: int) -> Any:
        """The device outputs of batches ``start .. start + count - 1`` of the open chunk."""
        lo = start * self.batch_size
        hi = min((start + count) * self.batch_size, self.n - self._first_batch * self.batch_size)
        return jax.tree_util.tree_map(lambda a: a[lo:hi], self.buffer)

    def finish(self) -> Any:
        """The full host result (numpy), exactly ``n`` rows."""
        self._flush()
        if self.buffer is not None:
            self._pending, self.buffer = (self._first_batch, self.buffer), None
            self._flush()
        return self.result
