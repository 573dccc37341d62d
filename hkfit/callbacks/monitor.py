"""Built-in callbacks that watch a metric or change training: early stopping, learning-rate
control, NaN termination and callbacks from plain functions.

Everything here is re-exported by :mod:`hkfit.callbacks`; import it from there. These
callbacks change the model only through its public attributes (``params``, ``state``,
``learning_rate``, ``stop_training``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import optimizers as optimizers_lib
from hkfit.callbacks.base import BATCH_HOOKS, HOOKS, Callback

# Substrings of a metric name that mean "higher is better" when mode="auto".
_MAX_WORDS = ("acc", "auc", "precision", "recall", "f1", "iou")


def resolve_mode(mode: str, monitor: str, owner: str) -> str:
    """``"min"`` or ``"max"``; ``"auto"`` reads the monitor name (accuracy, auc -> max)."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(
            f"Expected `mode` of {owner} to be 'auto', 'min' or 'max'. Received: mode={mode!r}."
        )
    if mode != "auto":
        return mode
    name = monitor[4:] if monitor.startswith("val_") else monitor
    return "max" if any(word in name.lower() for word in _MAX_WORDS) else "min"


def improves(mode: str, current: float, reference: float | None, min_delta: float = 0.0) -> bool:
    """True when ``current`` beats ``reference`` by over ``min_delta`` in direction ``mode``."""
    if math.isnan(current):
        return False
    if reference is None:
        return True
    if mode == "min":
        return current < reference - abs(min_delta)
    return current > reference + abs(min_delta)


def monitored(logs: dict | None, monitor: str, owner: str, warned: set) -> float | None:
    """``logs[monitor]`` as a float, or None with a warning (once per callback and key)."""
    value = (logs or {}).get(monitor)
    if value is None:
        if monitor not in warned:
            warned.add(monitor)
            warnings.warn(
                f"{owner} monitors `{monitor}`, which is not in the logs of this epoch. "
                f"Available: {sorted(logs or {})}.",
                stacklevel=3,
            )
        return None
    return float(value)


def _check_nonnegative_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Expected `{name}` to be an int >= 0. Received: {name}={value!r}.")
    return int(value)


def copy_tree(tree: Any) -> Any:
    """A device copy of every leaf, safe from the buffer donation of later training steps."""
    return jax.tree_util.tree_map(jnp.copy, tree)


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has stopped improving.

    Args:
      monitor: the log key to watch (``"val_loss"``, ``"accuracy"``, ...).
      min_delta: the smallest change that counts as an improvement.
      patience: epochs without improvement after which training stops.
      verbose: 1 prints a line when it stops or restores weights.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (``max`` for accuracy/auc-like names).
      baseline: training stops unless ``monitor`` beats this value within ``patience``
        epochs.
      restore_best_weights: at the end of training (whether or not the stop triggered),
        set params and state back to those of the best epoch (and, for a schedule-free
        optimizer or ``Model(ema=...)``, whose evaluation params depend on it, the
        optimizer state). The snapshot is a device copy, safe from the buffer donation
        of the training steps.
      start_from_epoch: epochs to wait before watching (warm-up).

    Attributes:
      stopped_epoch: the epoch index at which training stopped (0 if it did not).
      best, best_epoch: the best monitored value and the epoch index where it was seen.

    >>> stop = EarlyStopping(patience=3, restore_best_weights=True)
    >>> stop.mode   # "auto" reads the monitored name: val_loss is minimized
    'min'
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ):
        super().__init__()
        self.monitor = monitor
        self.min_delta = abs(float(min_delta))
        self.patience = _check_nonnegative_int(patience, "patience")
        self.verbose = verbose
        self.mode = resolve_mode(mode, monitor, "EarlyStopping")
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = _check_nonnegative_int(start_from_epoch, "start_from_epoch")
        self._warned: set = set()
        self.best: float | None = None
        self.on_train_begin()

    def on_train_begin(self, logs=None):
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self.best_epoch = 0
        self.best_weights = None

    def _snapshot(self):
        weights = (self.model.params, self.model.state)
        averaged = getattr(self.model, "ema", None) is not None  # the average is in opt_state
        if averaged or optimizers_lib.is_schedule_free(self.model.opt_state):
            # the evaluation params are a function of params AND optimizer state
            weights = (*weights, self.model.opt_state)
        return copy_tree(weights)

    def on_epoch_end(self, epoch, logs=None):
        current = monitored(logs, self.monitor, "EarlyStopping", self._warned)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self._snapshot()  # the first watched epoch is the fallback
        self.wait += 1
        if improves(self.mode, current, self.best, self.min_delta):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self._snapshot()
            if self.baseline is None or improves(self.mode, current, self.baseline, self.min_delta):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping", flush=True)
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(
                    "Restoring the weights from the end of the best epoch "
                    f"({self.best_epoch + 1}).",
                    flush=True,
                )
            params, state, *opt_state = self.best_weights
            self.model.params, self.model.state = params, state
            if opt_state:
                self.model.opt_state = opt_state[0]
            self.best_weights = None


class TerminateOnNaN(Callback):
    """Stops training as soon as the loss is NaN or infinite.

    The loss is checked after every execution (``steps_per_execution`` fused steps) on the
    running epoch mean, which turns NaN as soon as one batch does, and at epoch end.

    Args:
      raise_error: raise a ``RuntimeError`` instead of setting ``model.stop_training``
        (as in Keras). Either way ``ModelCheckpoint`` and ``BackupAndRestore`` never write
        the non-finite weights, so the last good checkpoint and backup stay intact.
    """

    def __init__(self, raise_error: bool = False):
        super().__init__()
        self.raise_error = raise_error

    def _check(self, where: str, logs) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            if self.raise_error:
                raise RuntimeError(f"{where}: invalid loss ({loss}); training stopped.")
            print(f"{where}: invalid loss ({loss}), terminating training.", flush=True)
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        self._check(f"Batch {batch}", logs)

    def on_epoch_end(self, epoch, logs=None):
        self._check(f"Epoch {epoch + 1}", logs)


class LambdaCallback(Callback):
    """A callback from plain functions, one per hook.

    Epoch hooks are called as ``fn(epoch, logs)``, batch hooks as ``fn(batch, logs)`` and
    the others as ``fn(logs)``. ``logs`` may be ``None`` or empty.

    Args:
      on_epoch_begin: ``fn(epoch, logs)``.
      on_epoch_end: ``fn(epoch, logs)``.
      on_train_begin: ``fn(logs)``.
      on_train_end: ``fn(logs)``.
      on_train_batch_begin: ``fn(batch, logs)``.
      on_train_batch_end: ``fn(batch, logs)``.
      **hooks: functions for any other hook (``on_test_end=...``, ``on_predict_batch_end=...``).

    Raises:
      TypeError: for an unknown hook name or a value that is not callable.

    >>> cb = LambdaCallback(on_epoch_end=lambda epoch, logs: print(epoch, logs["loss"]))
    """

    def __init__(
        self,
        on_epoch_begin: Callable | None = None,
        on_epoch_end: Callable | None = None,
        on_train_begin: Callable | None = None,
        on_train_end: Callable | None = None,
        on_train_batch_begin: Callable | None = None,
        on_train_batch_end: Callable | None = None,
        **hooks: Callable,
    ):
        super().__init__()
        unknown = sorted(set(hooks) - set(HOOKS))
        if unknown:
            raise TypeError(
                f"Unknown hook names {unknown} for LambdaCallback. Expected names "
                f"from {list(HOOKS)}."
            )
        functions: dict[str, Callable | None] = dict(hooks)
        functions.update(
            on_epoch_begin=on_epoch_begin,
            on_epoch_end=on_epoch_end,
            on_train_begin=on_train_begin,
            on_train_end=on_train_end,
            on_train_batch_begin=on_train_batch_begin,
            on_train_batch_end=on_train_batch_end,
        )
        self._given: set[str] = set()
        for name, fn in functions.items():
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"Expected `{name}` to be callable. Received: {fn!r}.")
            self._given.add(name)
            setattr(self, name, _bind(name, fn))

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        hooks = BATCH_HOOKS if hook is None else (hook,)
        return any(name in self._given for name in hooks)


def _bind(name: str, fn: Callable) -> Callable:
    if "epoch_" in name or "batch_" in name:
        return lambda index, logs=None: fn(index, logs)
    return lambda logs=None: fn(logs)


class LearningRateScheduler(Callback):
    """Sets the learning rate at the start of every epoch to ``schedule(epoch, lr)``.

    The learning rate lives in the ``optax.inject_hyperparams`` state of the optimizer, so
    changing it does not recompile the training step. The value in effect during an
    epoch is logged as ``learning_rate`` (History, CSVLogger, TensorBoard).

    Args:
      schedule: ``schedule(epoch, lr) -> new lr`` (0-based epoch, current lr as a float);
        a one-argument ``schedule(epoch)`` is accepted too.
      verbose: 1 prints each change.

    Raises:
      ValueError: (during fit) if the optimizer has no injected learning rate, or the
        schedule returns something that is not a finite number >= 0.

    >>> scheduler = LearningRateScheduler(lambda epoch, lr: lr if epoch < 10 else lr * 0.9)
    """

    def __init__(self, schedule: Callable, verbose: int = 0):
        super().__init__()
        if not callable(schedule):
            raise TypeError(f"Expected `schedule` to be callable. Received: {schedule!r}.")
        self.schedule = schedule
        self.verbose = verbose
        self._pending: int | None = None
        try:
            params = inspect.signature(schedule).parameters.values()
            positional = [
                p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            self._two_args = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        except (TypeError, ValueError):
            self._two_args = True

    def on_train_begin(self, logs=None):
        if self.model.built:
            _ = self.model.learning_rate  # fails early, with the fix, without an injected rate

    def on_epoch_begin(self, epoch, logs=None):
        if self.model.built:
            self._apply(epoch)
        else:  # an iterable source builds the model on its first batch
            self._pending = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._pending is not None:
            epoch, self._pending = self._pending, None
            self._apply(epoch)

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        return False

    def _apply(self, epoch: int) -> None:
        current = self.model.learning_rate
        value = self.schedule(epoch, current) if self._two_args else self.schedule(epoch)
        try:
            new = float(value)
        except (TypeError, ValueError):
            new = float("nan")
        if not math.isfinite(new) or new < 0:
            raise ValueError(
                "Expected `schedule` to return a finite learning rate >= 0. "
                f"Received: {value!r} for epoch {epoch}."
            )
        self.model.learning_rate = new
        if self.verbose:
            print(
                f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {new:.6g}.",
                flush=True,
            )


class ReduceLROnPlateau(Callback):
    """Multiplies the learning rate by ``factor`` when ``monitor`` stops improving.

    Args:
      monitor: the log key to watch.
      factor: the multiplier, in (0, 1).
      patience: epochs without improvement before the learning rate is reduced.
      verbose: 1 prints each reduction.
      mode: ``"min"``, ``"max"`` or ``"auto"``.
      min_delta: the smallest change that counts as an improvement.
      cooldown: epochs to wait after a reduction before counting again.
      min_lr: the learning rate never goes below this.

    The learning rate changes at the end of an epoch, after it has been logged, so each
    epoch's ``learning_rate`` log is the value used during that epoch.

    Raises:
      ValueError: if ``factor`` is not in (0, 1), or (during fit) the optimizer has no
        injected learning rate.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ):
        super().__init__()
        if not 0 < factor < 1:
            raise ValueError(f"Expected `factor` in (0, 1). Received: factor={factor!r}.")
        self.monitor = monitor
        self.factor = float(factor)
        self.patience = _check_nonnegative_int(patience, "patience")
        self.verbose = verbose
        self.mode = resolve_mode(mode, monitor, "ReduceLROnPlateau")
        self.min_delta = abs(float(min_delta))
        self.cooldown = _check_nonnegative_int(cooldown, "cooldown")
        self.min_lr = float(min_lr)
        self._warned: set = set()
        self.best: float | None = None
        self.on_train_begin()

    def on_train_begin(self, logs=None):
        self.best = None
        self.wait = 0
        self.cooldown_counter = 0

    def on_epoch_end(self, epoch, logs=None):
        current = monitored(logs, self.monitor, "ReduceLROnPlateau", self._warned)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if improves(self.mode, current, self.best, self.min_delta):
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = self.model.learning_rate  # raises, with the fix, without a rate
                rates = optimizers_lib.learning_rates(self.model.opt_state)
                if any(rate > float(np.float32(self.min_lr)) for rate in rates.values()):
                    state = self.model.opt_state
                    for group, rate in rates.items():  # each parameter group keeps its ratio
                        state = optimizers_lib.set_learning_rate(
                            state, max(rate * self.factor, self.min_lr), group=group
                        )
                    self.model.opt_state = state
                    new = max(old * self.factor, self.min_lr)
                    if self.verbose:
                        print(
                            f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to "
                            f"{new:.6g}.",
                            flush=True,
                        )
                    self.cooldown_counter = self.cooldown
                    self.wait = 0


__all__ = [
    "EarlyStopping",
    "LambdaCallback",
    "LearningRateScheduler",
    "ReduceLROnPlateau",
    "TerminateOnNaN",
]
