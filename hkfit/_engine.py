"""The executor: runs every execution of fit, evaluate, predict and validation.

It owns three things, for every loop of the library:

* pacing: a feed describes :class:`~hkfit._feeds.Segment` s of batches and the executor
  splits them into executions of ``steps_per_execution`` batches (``"auto"``: timed);
* gated log reads: metric states stay on the device and are read (a device sync) only
  at the progress bar's refresh interval, when a callback overrides the batch-end hook
  of the running mode, and at the end of an epoch or run;
* callback hooks: every hook is fired from here, once per execution for batch hooks,
  with the index of the execution's last batch, as Keras does.

It never sees the model: it gets the callbacks, the segments and small functions (read
the logs, publish the train state, should training stop).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from hkfit.callbacks.base import CallbackList

REFRESH_SECONDS = 0.5


class Mode(NamedTuple):
    """The hook names of one kind of run."""

    begin: str
    end: str
    batch_begin: str
    batch_end: str


TRAIN = Mode("on_train_begin", "on_train_end", "on_train_batch_begin", "on_train_batch_end")
TEST = Mode("on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end")
PREDICT = Mode(
    "on_predict_begin", "on_predict_end", "on_predict_batch_begin", "on_predict_batch_end"
)


def steps_per_execution_for(callbacks: CallbackList, mode: Mode, requested: Any) -> Any:
    """``"auto"`` becomes 1 when a callback needs every batch (see the callbacks docs).

    A callback that overrides a batch hook of ``mode`` (or a ``ModelCheckpoint`` with an
    integer ``save_freq``) then sees every batch, as it would in Keras. An explicit int
    stays the user's choice.
    """
    if requested == "auto" and (
        callbacks.wants_batch_logs(mode.batch_begin) or callbacks.wants_batch_logs(mode.batch_end)
    ):
        return 1
    return requested


class Executor:
    """Runs segments as executions and fires the batch hooks of one mode.

    Args:
      callbacks: the callbacks of the run.
      mode: which hooks to fire.
      pacer: sizes the executions (``hkfit._pacing.Pacer``).
      read_logs: metric-state carry -> dict of floats, or None (prediction).
      commit: called with the carry and the number of the segment's batches done (the
        index of the next batch) after every execution: fit publishes the train state
        and its position in the epoch there, so callbacks see the current parameters.
      should_stop: checked before every execution (``model.stop_training``).
      progress: a progress bar is shown: read logs at most every ``REFRESH_SECONDS``.
      logs_of: the metric states inside a carry (default: the carry itself).
      load: refreshes the carry after the batch-begin hooks (fit reloads the train
        state, so a callback may change parameters or the learning rate there).
    """

    def __init__(
        self,
        callbacks: CallbackList,
        mode: Mode,
        pacer: Any,
        *,
        read_logs: Callable[[Any], dict] | None = None,
        commit: Callable[[Any, int], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        progress: bool = False,
        logs_of: Callable[[Any], Any] = lambda carry: carry,
        load: Callable[[Any], Any] | None = None,
    ):
        self.callbacks, self.mode, self.pacer = callbacks, mode, pacer
        self.read_logs, self.commit, self.should_stop = read_logs, commit, should_stop
        self.logs_of, self.load = logs_of, load
        self.every_batch = callbacks.wants_batch_logs(mode.batch_end)
        self.progress = progress
        self._last_read = time.perf_counter()
        self.batches = 0

    def _batch_logs(self, carry: Any, segment: Any, start: int, count: int) -> dict:
        if segment.outputs is not None:  # prediction: the execution's outputs
            return {"outputs": segment.outputs(carry, start, count)} if self.every_batch else {}
        now = time.perf_counter()
        if self.read_logs is not None and (
            self.every_batch or (self.progress and now - self._last_read >= REFRESH_SECONDS)
        ):
            self._last_read = now
            return self.read_logs(self.logs_of(carry))
        return {}

    def run(self, segments: Iterable[Any], carry: Any) -> Any:
        """Runs every batch of ``segments`` (until ``should_stop``); returns the carry."""
        begin = getattr(self.callbacks, self.mode.batch_begin)
        end = getattr(self.callbacks, self.mode.batch_end)
        for segment in segments:
            start = 0
            while start < segment.num_batches and not self.should_stop():
                remaining = segment.num_batches - start
                count = self.pacer.next(remaining)
                run = segment.run
                if self.pacer.single and segment.single is not None:
                    run = segment.single  # "auto" chose (or is timing) one loop-free step
                if not segment.fusable or run is segment.single:
                    count = min(count, 1)
                index = segment.first + start
                begin(index, {})
                if self.load is not None:
                    carry = self.load(carry)
                carry = run(carry, start, count)
                if self.commit is not None:
                    self.commit(carry, index + count)
                self.pacer.done(count, self.logs_of(carry), timed=segment.timed)
                self.batches += count
                end(index + count - 1, self._batch_logs(carry, segment, start, count))
                start += count
            if self.should_stop():
                break
        return carry


def warn_no_validation(epoch: int) -> None:
    warnings.warn(
        f"The validation data yielded no batch in epoch {epoch + 1} (a one-shot "
        "iterator is used up after one pass); this epoch's logs have no `val_*` "
        "values. Pass arrays, a re-iterable source (a list, a Dataset), or a "
        "generator factory's fresh iterator every epoch.",
        stacklevel=4,
    )


def warn_out_of_data(epoch: int) -> None:
    warnings.warn(
        f"The data ran out before epoch {epoch + 1} could start; training stops "
        "here. Pass a re-iterable source, or set `steps_per_epoch` and make the "
        "iterable yield enough batches for all epochs.",
        stacklevel=4,
    )


class FitPlan(NamedTuple):
    """What :func:`fit` runs; built by the model from its checked arguments.

    Attributes:
      callbacks: every callback of the run (History, the user's, the progress bar).
      epochs: the epoch count to reach.
      initial_epoch: () -> the first epoch to run, read after ``on_train_begin`` (a
        callback such as ``BackupAndRestore`` may have restored a later one).
      train_epoch: (epoch) -> the epoch's logs, or None if the data ran out first.
      validate: (epoch) -> ``val_*`` logs, None when it yielded no batch, or {} if not
        due this epoch.
      end_epoch: (epoch, logs) -> None, called before ``on_epoch_end`` (counts the
        epoch and adds the learning rate to the logs).
      should_stop: () -> whether a callback asked to stop.
      exhausted: () -> whether the training data ran out for good.
    """

    callbacks: CallbackList
    epochs: int
    initial_epoch: Callable[[], int]
    train_epoch: Callable[[int], dict | None]
    validate: Callable[[int], dict | None]
    end_epoch: Callable[[int, dict], None]
    should_stop: Callable[[], bool]
    exhausted: Callable[[], bool]


def fit(plan: FitPlan) -> dict:
    """The epoch loop of ``Model.fit``: every epoch and train hook fires here.

    If anything raises, the callbacks get ``on_exception`` (not ``on_train_end``) and
    the exception propagates.
    """
    try:
        return _fit(plan)
    except BaseException as exception:
        plan.callbacks.on_exception(exception)
        raise


def _fit(plan: FitPlan) -> dict:
    cbs = plan.callbacks
    cbs.on_train_begin({})
    epoch_logs: dict = {}
    warned = False
    for epoch in range(plan.initial_epoch(), plan.epochs):
        if plan.should_stop():
            break
        cbs.on_epoch_begin(epoch, {})
        logs = plan.train_epoch(epoch)
        if logs is None:
            warn_out_of_data(epoch)
            break
        val_logs = plan.validate(epoch)
        if val_logs is None:
            if not warned:
                warn_no_validation(epoch)
                warned = True
        else:
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        plan.end_epoch(epoch, logs)
        epoch_logs = logs
        cbs.on_epoch_end(epoch, logs)
        if plan.exhausted():
            break
    cbs.on_train_end(epoch_logs)
    return epoch_logs


def evaluate(
    callbacks: CallbackList,
    executor: Executor,
    segments: Iterable[Any],
    empty_logs: Callable[[], Any],
    read_logs: Callable[[Any], dict],
    hooks: bool = True,
) -> dict | None:
    """One evaluation run; None when it saw no batch. Fires the test hooks."""
    if hooks:
        callbacks.on_test_begin({})
    logs = executor.run(segments, empty_logs())
    result = read_logs(logs) if executor.batches else None
    if hooks:
        callbacks.on_test_end(dict(result or {}))
    return result
