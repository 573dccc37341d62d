"""Profiling a window of training batches with JAX's profiler: :class:`Profile`.

Everything here is re-exported by :mod:`hkfit.callbacks`; import it from there.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax

from hkfit.callbacks.base import Callback
from hkfit.distributed import is_main_process


def batch_window(batches: Any, name: str = "batches") -> tuple[int, int]:
    """``(start, stop)``, 1-based and inclusive, from an int ``n`` or a pair of ints.

    Raises:
      TypeError: if ``batches`` is neither an int nor a pair of ints.
      ValueError: unless ``1 <= start <= stop``.
    """
    expected = (
        f"Expected `{name}` to be an int >= 1 (one batch) or a pair (start, stop) of ints "
        "with 1 <= start <= stop: 1-based batch counts since the start of `fit`, both "
        "included, as Keras's `profile_batch`."
    )
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if is_int(batches):
        window = (batches, batches)
    elif isinstance(batches, (tuple, list)) and len(batches) == 2 and all(map(is_int, batches)):
        window = (batches[0], batches[1])
    else:
        raise TypeError(f"{expected} Received: {name}={batches!r}.")
    if not 1 <= window[0] <= window[1]:
        raise ValueError(f"{expected} Received: {name}={batches!r}.")
    return window


class Profile(Callback):
    """Records a profiler trace of training batches ``start`` to ``stop``.

    The trace covers the ``start``-th to the ``stop``-th training batch of each ``fit``
    call, counted from 1 across epochs and both included, as Keras's
    ``TensorBoard(profile_batch=(start, stop))``: ``batches=(10, 15)`` skips the compiling
    first batch and the warm-up, and records six batches. ``jax.profiler.start_trace``
    starts it before the ``start``-th batch, and ``jax.profiler.stop_trace`` stops it
    after the ``stop``-th, once the device has finished that batch (the train state is
    waited for, so the trace holds the whole window's device work). Each step of the
    window is marked with a ``jax.profiler.StepTraceAnnotation`` named ``"train"``.

    JAX writes the trace to ``log_dir/plugins/profile/<date_time>/`` (``*.xplane.pb``,
    plus ``perfetto_trace.json.gz`` with ``create_perfetto_trace=True``). Open it with
    ``tensorboard --logdir log_dir`` (profile plugin: ``pip install tensorboard-plugin-profile``)
    or load ``perfetto_trace.json.gz`` into https://ui.perfetto.dev.

    Batch granularity: this callback overrides the train batch hooks, so under
    ``steps_per_execution="auto"`` every execution is one step and the window is exact
    (like any callback with batch hooks, it then runs the whole ``fit`` unfused). With
    an explicit ``steps_per_execution=K`` the fused executions are profiled as they run:
    the trace starts before the execution that contains batch ``start`` and stops after
    the one that contains batch ``stop``. It never asks for batch logs, so it adds no
    device sync besides the two at the window's edges.

    If ``fit`` ends before batch ``stop`` (fewer batches, early stopping), the trace is
    stopped in ``on_train_end``; if ``fit`` raises, it is stopped in ``on_exception``,
    so no trace is left running. Only process 0 of a multi-process run records. A trace
    that JAX refuses to start (another one is running) is skipped with a warning.

    Args:
      batches: ``(start, stop)``, or an int ``n`` for the single batch ``(n, n)``.
      log_dir: the directory to give to ``tensorboard --logdir``.
      create_perfetto_trace: also write ``perfetto_trace.json.gz`` for Perfetto.

    Raises:
      TypeError / ValueError: if ``batches`` is not an int >= 1 or a pair of ints with
        ``1 <= start <= stop``.

    >>> Profile(batches=(10, 15), log_dir="runs/profile").batches
    (10, 15)
    """

    def __init__(
        self,
        batches: Any = (10, 15),
        log_dir: str | os.PathLike = "logs",
        create_perfetto_trace: bool = False,
    ):
        super().__init__()
        self.batches = batch_window(batches)
        self.log_dir = os.fspath(log_dir)
        self.create_perfetto_trace = bool(create_perfetto_trace)
        self.tracing = False
        self._reset()

    def _reset(self) -> None:
        self._done = 0  # training batches finished in this fit call
        self._epoch_base = 0  # of them, those of earlier epochs
        self._last_count = 1  # batches in the last execution
        self._finished = False
        self._annotation: Any = None

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        # Every training batch as its own execution (exact window edges), but never the
        # logs of a batch, which would cost a device sync at every batch.
        return hook in (None, "on_train_batch_begin")

    def on_train_begin(self, logs=None):
        self._reset()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_base = self._done

    def on_train_batch_begin(self, batch, logs=None):
        if self._finished or not is_main_process():
            return
        first = self._epoch_base + batch + 1
        start, stop = self.batches
        if not self.tracing and first + self._last_count - 1 >= start and first <= stop:
            self._start()
        if self.tracing:
            self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=first)
            self._annotation.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        last = self._epoch_base + batch + 1
        self._last_count, self._done = max(1, last - self._done), last
        if self.tracing:
            self._end_annotation()
            if last >= self.batches[1]:
                self._stop()

    def on_train_end(self, logs=None):
        if self.tracing:
            self._end_annotation()
            self._stop()
        elif not self._finished and is_main_process():
            warnings.warn(
                f"Profile recorded no trace: `fit` ran {self._done} training batches, "
                f"fewer than batches={self.batches} needs. Lower `batches`.",
                stacklevel=2,
            )

    def on_exception(self, exception):
        if not self.tracing:
            return
        self.tracing, self._finished = False, True
        try:
            self._end_annotation()
            jax.profiler.stop_trace()
        except Exception as e:  # the run already failed: report, do not mask its error
            warnings.warn(f"Profile could not stop its trace: {e}", stacklevel=2)

    def _wait(self) -> None:
        if self.model is not None and self.model.built:
            jax.block_until_ready(self.model.train_state)

    def _start(self) -> None:
        self._wait()  # earlier batches stay out of the window
        try:
            if self.create_perfetto_trace:
                jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            else:
                jax.profiler.start_trace(self.log_dir)
        except Exception as e:
            self._finished = True
            warnings.warn(f"Profile could not start a trace: {e}", stacklevel=3)
            return
        self.tracing = True

    def _stop(self) -> None:
        self.tracing, self._finished = False, True
        try:
            self._wait()
        finally:
            jax.profiler.stop_trace()

    def _end_annotation(self) -> None:
        annotation, self._annotation = self._annotation, None
        if annotation is not None:
            annotation.__exit__(None, None, None)


__all__ = ["Profile", "batch_window"]
