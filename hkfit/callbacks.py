"""Callbacks with Keras hook names, and the built-ins ``History`` and ``ProgressBar``.

Also re-exported here: ``EarlyStopping``, ``TerminateOnNaN``, ``LambdaCallback``,
``LearningRateScheduler``, ``ReduceLROnPlateau`` (from :mod:`hkfit.callbacks_builtin`) and
``ModelCheckpoint``, ``BackupAndRestore``, ``CSVLogger``, ``TensorBoard`` (from
:mod:`hkfit.callbacks_io`).

A callback subclasses :class:`Callback` and overrides any of the hooks. ``self.model``
is the :class:`hkfit.Model` being trained; setting ``model.stop_training = True`` stops
after the current epoch.

Batch hooks fire once per *execution* (a call that runs ``steps_per_execution`` fused
steps), with the batch index of its last step, as Keras does. Their ``logs`` hold the
running means of the epoch so far; reading them costs a device sync, so the model reads
them only when a callback overrides a batch hook, or at the progress bar's refresh
interval (otherwise ``logs`` is empty).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

import numpy as np

from hkfit.distributed import is_main_process

_HOOKS = (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
    "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
    "on_test_batch_begin", "on_test_batch_end", "on_predict_begin", "on_predict_end",
    "on_predict_batch_begin", "on_predict_batch_end",
)
BATCH_HOOKS = tuple(h for h in _HOOKS if "_batch_" in h)


class Callback:
    """Base class: every hook is a no-op. ``self.model`` and ``self.params`` are set by fit."""

    def __init__(self):
        self.model = None
        self.params: dict[str, Any] = {}

    def set_model(self, model) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...
    def on_train_batch_begin(self, batch, logs=None): ...
    def on_train_batch_end(self, batch, logs=None): ...
    def on_test_begin(self, logs=None): ...
    def on_test_end(self, logs=None): ...
    def on_test_batch_begin(self, batch, logs=None): ...
    def on_test_batch_end(self, batch, logs=None): ...
    def on_predict_begin(self, logs=None): ...
    def on_predict_end(self, logs=None): ...
    def on_predict_batch_begin(self, batch, logs=None): ...
    def on_predict_batch_end(self, batch, logs=None): ...

    def wants_batch_logs(self) -> bool:
        """True when this callback overrides a batch hook and so needs fresh batch logs."""
        return any(getattr(type(self), h) is not getattr(Callback, h) for h in BATCH_HOOKS)


class CallbackList(Callback):
    """Calls every hook on each callback in order."""

    def __init__(self, callbacks: Iterable[Callback] = (), model=None, params=None):
        super().__init__()
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError("Expected every entry of `callbacks` to be an hkfit.callbacks."
                                f"Callback. Received: {cb!r} of type {type(cb).__name__}.")
        if model is not None:
            self.set_model(model)
        if params is not None:
            self.set_params(params)

    def set_model(self, model) -> None:
        super().set_model(model)
        for cb in self.callbacks:
            cb.set_model(model)

    def set_params(self, params) -> None:
        super().set_params(params)
        for cb in self.callbacks:
            cb.set_params(params)

    def wants_batch_logs(self) -> bool:
        return any(cb.wants_batch_logs() for cb in self.callbacks)

    def __getattribute__(self, name):
        if name in _HOOKS:
            callbacks = object.__getattribute__(self, "callbacks")

            def dispatch(*args, **kwargs):
                for cb in callbacks:
                    getattr(cb, name)(*args, **kwargs)

            return dispatch
        return object.__getattribute__(self, name)


class History(Callback):
    """Records epoch logs: ``history.history["loss"][i]`` is the loss of ``history.epoch[i]``."""

    def __init__(self):
        super().__init__()
        self.epoch: list[int] = []
        self.history: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(int(epoch))
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))

    def __repr__(self) -> str:
        return f"History(epochs={self.epoch}, keys={sorted(self.history)})"


def format_logs(logs: dict) -> str:
    return " - ".join(f"{k}: {v:.4g}" for k, v in logs.items()
                      if isinstance(v, (float, int, np.floating)))


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except AttributeError:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def resolve_verbose(verbose: Any) -> int:
    """``"auto"`` -> 1 on a terminal or in a notebook, 2 otherwise (log files).

    Always 0 outside process 0 of a multi-process run: only the main process prints.
    """
    if verbose == "auto":
        verbose = 1 if (sys.stderr.isatty() or in_notebook()) else 2
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"Expected `verbose` to be 'auto', 0, 1 or 2. Received: verbose={verbose!r}.")
    return int(verbose) if is_main_process() else 0


def _make_bar(**kwargs):
    """A notebook bar in Jupyter (when ipywidgets works), else a terminal bar on stderr."""
    if in_notebook():
        try:
            from tqdm.notebook import tqdm as notebook_tqdm
            return notebook_tqdm(**kwargs)
        except Exception:  # ipywidgets missing or broken: fall back to text
            pass
    from tqdm.std import tqdm as std_tqdm
    return std_tqdm(file=sys.stderr, **kwargs)


class ProgressBar(Callback):
    """A tqdm bar (``verbose=1``) or one printed line (``verbose=2``) per epoch.

    In ``fit`` the bar shows the running loss and metrics, refreshed at most every
    ``refresh`` seconds, and the epoch's validation results when the epoch ends. In
    ``evaluate`` / ``predict`` (used on their own) it shows one bar over the batches, and
    ``evaluate`` ends with its results.
    """

    def __init__(self, verbose: int = 1, refresh: float = 0.5):
        super().__init__()
        self.verbose = verbose
        self.refresh = refresh
        self._bar = None
        self._seen = 0
        self._start = 0.0

    def _open(self, desc: str) -> None:
        self._start = time.perf_counter()
        self._seen = 0
        if self.verbose == 1:
            self._bar = _make_bar(total=self.params.get("steps"), unit="step", leave=True,
                                  desc=desc, dynamic_ncols=True, mininterval=self.refresh)

    def _advance(self, batch: int, logs) -> None:
        if self._bar is None:
            return
        self._bar.update(batch + 1 - self._seen)
        self._seen = batch + 1
        if logs:
            self._bar.set_postfix_str(format_logs(logs), refresh=False)

    def _close(self, title: str, logs) -> None:
        logs = logs or {}
        if self._bar is not None:
            if self._bar.total is None:
                self._bar.total = self._seen
            if logs:
                self._bar.set_postfix_str(format_logs(logs), refresh=False)
            self._bar.close()
            self._bar = None
        elif self.verbose == 2 and title:
            seconds = time.perf_counter() - self._start
            print(f"{title} - {seconds:.1f}s - {format_logs(logs)}", flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._open(f"Epoch {epoch + 1}/{self.params.get('epochs')}")

    def on_train_batch_end(self, batch, logs=None):
        self._advance(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._close(f"Epoch {epoch + 1}/{self.params.get('epochs')}", logs)

    def on_train_end(self, logs=None):
        self._close("", None)

    def on_test_begin(self, logs=None):
        self._open("evaluate")

    def on_test_batch_end(self, batch, logs=None):
        self._advance(batch, logs)

    def on_test_end(self, logs=None):
        self._close("evaluate", logs)

    def on_predict_begin(self, logs=None):
        self._open("predict")

    def on_predict_batch_end(self, batch, logs=None):
        self._advance(batch, None)

    def on_predict_end(self, logs=None):
        self._close("", None)

    def wants_batch_logs(self) -> bool:
        return False


# The built-ins live in two small modules that import the base classes above; they are
# re-exported here so that ``hkfit.callbacks.X`` is the one public path.
from hkfit.callbacks_builtin import (  # noqa: E402
    EarlyStopping, LambdaCallback, LearningRateScheduler, ReduceLROnPlateau, TerminateOnNaN)
from hkfit.callbacks_io import BackupAndRestore, CSVLogger, ModelCheckpoint, TensorBoard  # noqa: E402
