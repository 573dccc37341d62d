"""One training epoch over arrays (fused, device-resident) or over an iterable of batches.

These are the loop bodies of ``Model.fit``: they own the data of one ``fit`` call and
advance ``model.train_state`` through the model's jitted steps, calling the batch hooks.
"""

from __future__ import annotations

import time
import warnings
from typing import Iterable

import jax
import numpy as np

from hkfit import _data as data_lib
from hkfit.step import Batch

REFRESH_SECONDS = 0.5


class _LogReader:
    """Decides when batch hooks get fresh logs (each read is a device sync)."""

    def __init__(self, model, every_batch: bool, progress: bool):
        self.model, self.every_batch, self.progress = model, every_batch, progress
        self._last = time.perf_counter()

    def __call__(self, logs) -> dict:
        now = time.perf_counter()
        if self.every_batch or (self.progress and now - self._last >= REFRESH_SECONDS):
            self._last = now
            return self.model._read_logs(logs)
        return {}


class ArraySource:
    """Arrays put on the device once; each epoch is one device permutation plus fused calls."""

    def __init__(self, model, x, y, sample_weight, class_weight, batch_size: int, shuffle: bool,
                 steps_per_epoch: int | None, validation_split: float, check_inputs: bool,
                 steps_per_execution):
        if model.distribution is not None:  # a global batch size -> this process's rows of it
            batch_size = model.distribution.check_batch_size(batch_size)
        x, y, n = data_lib.checked_arrays(x, y, check_inputs)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, np.float32)
        self.validation = None
        if validation_split:
            split_at = int(n * (1 - validation_split))
            if split_at == 0 or split_at == n:
                raise ValueError(f"`validation_split`={validation_split} leaves "
                                 f"{split_at} training and {n - split_at} validation rows out of "
                                 f"{n}. Expected at least one of each.")
            take = lambda t, a, b: None if t is None else data_lib.take_rows(t, a, b)
            self.validation = (take(x, split_at, None), take(y, split_at, None),
                               take(sample_weight, split_at, None))
            x, y, sample_weight = take(x, 0, split_at), take(y, 0, split_at), take(sample_weight, 0, split_at)
            n = split_at
        weights = data_lib.row_weights(n, y, sample_weight, class_weight)
        model._build(x, y)

        self.model, self.n, self.batch_size, self.shuffle = model, n, batch_size, shuffle
        self.pacer = model._pacer("train", steps_per_execution)
        self.num_full = n // batch_size
        self.has_tail = n % batch_size > 0
        if steps_per_epoch is not None and steps_per_epoch < self.num_full + self.has_tail:
            self.num_full, self.has_tail = steps_per_epoch, False
        self.steps = self.num_full + self.has_tail
        self.data = model._place_rows(Batch(x, y, weights))
        self.exhausted = False

    def run_epoch(self, epoch: int, cbs, every_batch: bool, progress: bool) -> dict | None:
        model = self.model
        # Without Haiku state (no BatchNorm statistics) a zero-weight-padded last batch
        # trains exactly like the short one, so it joins the fused call: no second compile.
        # Random draws (dropout) match the short batch's only with partitionable threefry
        # (the default from JAX 0.5; off in JAX 0.4.x), where bits do not depend on shape.
        pad = (self.has_tail and self.pacer.fused and model.distribution is None
               and not jax.tree_util.tree_leaves(model.state)
               and bool(getattr(jax.config, "jax_threefry_partitionable", False)))
        full, tail = data_lib.epoch_order(model._stream_shuffle(), epoch, num_rows=self.n,
                                          batch_size=self.batch_size, shuffle=self.shuffle,
                                          pad_tail=pad)
        full, tail = model._place((full, tail))  # on the distribution's devices, if any
        run = model._fn("train_fused" if self.pacer.fused else "train_stepwise")
        logs = model._empty_logs()
        read = _LogReader(model, every_batch, progress)
        calls = [(full, self.num_full + pad)] + ([(tail, 1)] if tail is not None else [])
        done = 0
        for idx, num_batches in calls:
            start = 0
            while start < num_batches and not model.stop_training:
                count = self.pacer.next(num_batches - start)
                cbs.on_train_batch_begin(done)
                ts, logs = run(model.train_state, logs, self.data, idx, start, count)
                model.train_state = ts
                self.pacer.done(count, ts.step, timed=idx is full)  # not the odd-shaped tail
                start, done = start + count, done + count
                cbs.on_train_batch_end(done - 1, read(logs))
        return model._read_logs(logs)


class IterableSource:
    """Batches drawn from an iterable, moved to the device two batches ahead.

    Without ``steps_per_epoch`` each epoch is one pass (``iter(source)`` again each epoch);
    with it, one iterator is shared by all epochs and an epoch is ``steps_per_epoch``
    batches, so infinite generators work.
    """

    def __init__(self, model, source: Iterable, steps_per_epoch: int | None):
        if not isinstance(source, Iterable):
            raise TypeError("Expected `x` to be arrays (with `y`) or an iterable of (x, y[, w]) "
                            f"batches. Received: {type(source).__name__}.")
        self.model, self.source, self.steps_per_epoch = model, source, steps_per_epoch
        self.steps = steps_per_epoch or (len(source) if hasattr(source, "__len__") else None)
        self._shared = None if steps_per_epoch is None else iter(source)
        self.exhausted = False

    def run_epoch(self, epoch: int, cbs, every_batch: bool, progress: bool) -> dict | None:
        model = self.model
        iterator = self._shared if self._shared is not None else iter(self.source)
        batches = data_lib.Prefetcher(data_lib.iterate(iterator, self.steps_per_epoch),
                                      model._device_batch)
        read = _LogReader(model, every_batch, progress)
        logs, done = None, 0
        for batch in batches:
            if logs is None:
                model._build(batch[0], batch[1])
                logs = model._empty_logs()
            cbs.on_train_batch_begin(done)
            ts, logs = model._fn("train")(model.train_state, logs, Batch(*batch))
            model.train_state = ts
            cbs.on_train_batch_end(done, read(logs))
            done += 1
            if model.stop_training:
                break
        if logs is None and not model.built:
            raise ValueError("Expected a non-empty dataset. Received: an iterable `x` that "
                             "yielded no batch.")
        if self.steps_per_epoch is not None and done < self.steps_per_epoch and not model.stop_training:
            warnings.warn(f"The iterable ran out after {done} of {self.steps_per_epoch} steps in "
                          f"epoch {epoch + 1}; training stops here and keeps every completed "
                          "step. Make it yield steps_per_epoch * epochs batches (e.g. repeat it).",
                          stacklevel=3)
            self.exhausted = True
        return None if logs is None else model._read_logs(logs)
