"""TensorBoard, and when loggers write batch-level values.

:class:`TensorBoard` is re-exported by :mod:`hkfit.callbacks`; import it from there. It
(like the experiment trackers of :mod:`hkfit.callbacks.trackers`) imports its library, an
optional extra, only when it is created. In a multi-process run only process 0 writes.

Batch-level values (``update_freq``) cost no extra device sync: a batch's logs are read
from the device only when some callback overrides ``on_train_batch_end`` or the
progress bar refreshes (see :mod:`hkfit.callbacks.base`). So:

* ``update_freq="epoch"`` (the default): epoch values only.
* ``update_freq=N``: at the end of an execution whose logs were read anyway, if a
  multiple of N batches was passed since the last write. With a progress bar
  (``verbose=1``) that is at most every N batches and at most twice a second; with
  ``verbose=0`` or ``2`` and no other batch callback, nothing is written between epochs.
  It never changes ``steps_per_execution``.
* ``update_freq="batch"``: the logger asks for the logs of every execution, as any
  callback overriding ``on_train_batch_end`` does: under ``steps_per_execution="auto"``
  every execution is then one step, so a value is written at every batch, as in Keras,
  at the cost of one device sync per batch; with an explicit ``steps_per_execution=K``,
  once per execution of K batches.

The step of a batch-level value is ``model.step`` after that batch: the optimizer step
count, which continues across ``fit`` calls and resumed runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from hkfit.callbacks.base import Callback
from hkfit.callbacks.profile import Profile, batch_window
from hkfit.distributed import is_main_process


def check_update_freq(update_freq: Any) -> Any:
    """``update_freq`` if it is ``"epoch"``, ``"batch"`` or an int >= 1; else ValueError."""
    if update_freq in ("epoch", "batch") and isinstance(update_freq, str):
        return update_freq
    if isinstance(update_freq, int) and not isinstance(update_freq, bool) and update_freq >= 1:
        return update_freq
    raise ValueError(
        "Expected `update_freq` to be 'epoch', 'batch' or an int >= 1 (batches). "
        f"Received: update_freq={update_freq!r}."
    )


class BatchCadence:
    """When a logger writes batch-level values (see the module docstring)."""

    def __init__(self, update_freq: Any):
        self.update_freq = check_update_freq(update_freq)
        self.every = 1 if update_freq == "batch" else update_freq
        self._base = 0
        self._last: int | None = None

    def wants_batch_logs(self, hook: str | None) -> bool:
        return self.update_freq == "batch" and hook in (None, "on_train_batch_end")

    def reset(self) -> None:
        self._last = None

    def epoch_begin(self, model: Any) -> None:
        if self.update_freq == "epoch":
            return
        self._base = model.step  # one read per epoch: the count continues across fits
        if self._last is None:
            self._last = self._base

    def due(self, batch: int, logs: dict | None) -> int | None:
        """The step to write ``logs`` at, or None when they are empty or not due yet."""
        if self.update_freq == "epoch" or not logs or self._last is None:
            return None
        step = self._base + batch + 1
        if step // self.every <= self._last // self.every:
            return None
        self._last = step
        return step


def scalars(logs: dict | None) -> dict[str, float]:
    """The numeric entries of ``logs`` as Python floats."""
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def fit_params(params: dict) -> dict[str, Any]:
    """What a ``fit`` call's callbacks learn about it, under tracker-friendly names."""
    names = {
        "epochs": "epochs",
        "steps": "steps_per_epoch",
        "batch_size": "batch_size",
        "optimizer": "optimizer",
    }
    return {names[k]: params[k] for k in names if params.get(k) is not None}


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_arrays(tree: Any) -> Iterator[tuple[str, np.ndarray]]:
    """``(path, host array)`` for every leaf: ``"linear/w"``, ``"mlp/~/linear_0/b"``.

    Arrays split across processes (not replicated) have no value on one host; they are
    skipped.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                continue
            leaf = leaf.addressable_shards[0].data
        yield "/".join(_key_name(k) for k in path), np.asarray(leaf).astype(np.float64)


class TensorBoard(Callback):
    """Writes the logs as TensorBoard scalars (needs ``pip install hkfit[tensorboard]``).

    Training logs go to the run ``log_dir/train`` and validation logs to
    ``log_dir/validation`` with the ``val_`` prefix removed, as TensorFlow's Keras does, so
    ``loss`` and ``val_loss`` share one chart. Epoch tags are ``epoch_<name>``
    (``epoch_loss``, ``epoch_accuracy``, ``epoch_learning_rate``) and their step is the
    0-based epoch; batch tags (``update_freq``) are ``batch_<name>``, the running means of
    the epoch so far, at step ``model.step``.

    Args:
      log_dir: the directory to give to ``tensorboard --logdir``.
      histogram_freq: every N epochs (epochs 0, N, 2N, ...), a histogram of every
        parameter in the train run, tagged with its Haiku path (``"linear/w"``), at the
        0-based epoch. 0 (default): none.
      update_freq: ``"epoch"``, ``"batch"`` or N: batch-level scalars, written without
        extra device syncs as :mod:`hkfit.callbacks.loggers` explains (``"batch"`` asks
        for every batch's logs).
      profile_batch: 0 (default) or Keras's ``profile_batch``: an int or a pair
        ``(start, stop)`` of 1-based batches to profile, written to ``log_dir/train``
        by a :class:`hkfit.callbacks.Profile` (see there).

    Raises:
      ImportError: if tensorboardX is not installed.
      ValueError / TypeError: for a bad ``histogram_freq``, ``update_freq`` or
        ``profile_batch``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike = "logs",
        histogram_freq: int = 0,
        *,
        update_freq: Any = "epoch",
        profile_batch: Any = 0,
    ):
        super().__init__()
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "The TensorBoard callback needs tensorboardX: "
                "`pip install hkfit[tensorboard]` (or `pip install tensorboardX`)."
            ) from e
        if (
            not isinstance(histogram_freq, int)
            or isinstance(histogram_freq, bool)
            or histogram_freq < 0
        ):
            raise ValueError(
                "Expected `histogram_freq` to be an int >= 0 (epochs; 0 for none). "
                f"Received: histogram_freq={histogram_freq!r}."
            )
        self._summary_writer = SummaryWriter
        self.log_dir = os.fspath(log_dir)
        self.histogram_freq = histogram_freq
        self.update_freq = check_update_freq(update_freq)
        self._cadence = BatchCadence(update_freq)
        self._profile: Profile | None = None
        if not (isinstance(profile_batch, int) and profile_batch == 0):
            window = batch_window(profile_batch, "profile_batch")
            self._profile = Profile(window, log_dir=os.path.join(self.log_dir, "train"))
        self._writers: dict[str, Any] = {}

    def set_model(self, model) -> None:
        super().set_model(model)
        if self._profile is not None:
            self._profile.set_model(model)

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        profile = self._profile is not None and self._profile.wants_batch_logs(hook)
        return profile or self._cadence.wants_batch_logs(hook)

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = self._summary_writer(os.path.join(self.log_dir, run))
        return self._writers[run]

    def on_train_begin(self, logs=None):
        self._cadence.reset()
        if self._profile is not None:
            self._profile.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._cadence.epoch_begin(self.model)
        if self._profile is not None:
            self._profile.on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        if self._profile is not None:
            self._profile.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        step = self._cadence.due(batch, logs)
        if step is not None and is_main_process():
            writer = self._writer("train")
            for key, value in scalars(logs).items():
                writer.add_scalar(f"batch_{key}", value, step)
        if self._profile is not None:
            self._profile.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if not is_main_process():
            return
        for key, value in scalars(logs).items():
            run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            self._writer(run).add_scalar(f"epoch_{name}", value, int(epoch))
        if self.histogram_freq and epoch % self.histogram_freq == 0 and self.model.built:
            writer = self._writer("train")
            for tag, values in named_arrays(self.model.params):
                writer.add_histogram(tag, values, int(epoch))
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        if self._profile is not None:
            self._profile.on_train_end(logs)
        self._close()

    def on_exception(self, exception):
        if self._profile is not None:
            self._profile.on_exception(exception)
        self._close()

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


__all__ = [
    "BatchCadence",
    "TensorBoard",
    "check_update_freq",
    "fit_params",
    "named_arrays",
    "scalars",
]
