"""The callback protocol: :class:`Callback`, :class:`CallbackList` and :class:`History`.

A callback subclasses :class:`Callback` and overrides any of the hooks. ``self.model``
is the :class:`hkfit.Model` being trained; setting ``model.stop_training = True`` stops
after the current epoch.

Hooks receive what Keras passes: begin hooks get ``logs={}``; epoch-end hooks the epoch's
logs (with ``val_*`` keys after validation); ``on_predict_batch_end`` gets
``{"outputs": ...}``, the outputs of that execution's batches. ``on_batch_begin`` /
``on_batch_end`` are the Keras aliases of the train batch hooks and fire with them.

Batch hooks fire once per *execution* (a call that runs ``steps_per_execution`` fused
steps), with the batch index of its last step, as Keras does. Their ``logs`` hold the
running means of the epoch (or evaluation) so far; reading them costs a device sync, so
they are read only when a callback overrides that batch-end hook, or at the progress
bar's refresh interval (otherwise ``logs`` is empty).

With the default ``steps_per_execution="auto"``, a callback that overrides a batch hook
of the running mode (or a ``ModelCheckpoint`` with an integer ``save_freq``) makes every
execution one step, so ported per-batch callbacks see every batch as in Keras. An
explicit integer ``steps_per_execution`` is kept as given.

Validation inside ``fit`` fires ``on_test_begin``, ``on_test_batch_*`` and
``on_test_end`` on every callback, every time it runs, as Keras does.

One hook is hkfit's own: when ``fit`` raises (``KeyboardInterrupt`` included), every
callback gets ``on_exception(exception)`` instead of ``on_train_end``, then the exception
propagates. Keras has no such hook (its callbacks get nothing); it is where a callback
releases what it holds (a profiler trace, an experiment-tracker run).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from hkfit import _plotting

_HOOKS = (
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_begin",
    "on_predict_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
)
BATCH_HOOKS = tuple(h for h in _HOOKS if "_batch_" in h)
#: Keras aliases of the train batch hooks.
ALIASES = {"on_train_batch_begin": "on_batch_begin", "on_train_batch_end": "on_batch_end"}
HOOKS = _HOOKS


class Callback:
    """Base class: every hook is a no-op. ``self.model`` and ``self.params`` are set by fit."""

    def __init__(self) -> None:
        self.model: Any = None
        self.params: dict[str, Any] = {}

    def set_model(self, model) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...
    def on_train_batch_begin(self, batch, logs=None):
        self.on_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs)

    def on_batch_begin(self, batch, logs=None): ...
    def on_batch_end(self, batch, logs=None): ...
    def on_test_begin(self, logs=None): ...
    def on_test_end(self, logs=None): ...
    def on_test_batch_begin(self, batch, logs=None): ...
    def on_test_batch_end(self, batch, logs=None): ...
    def on_predict_begin(self, logs=None): ...
    def on_predict_end(self, logs=None): ...
    def on_predict_batch_begin(self, batch, logs=None): ...
    def on_predict_batch_end(self, batch, logs=None): ...
    def on_exception(self, exception: BaseException) -> None:
        """Called instead of ``on_train_end`` when ``fit`` raises ``exception``."""

    def _overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Callback, hook)

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        """True when this callback overrides batch hook ``hook`` (any batch hook if None),
        or its Keras alias, and so needs every batch and fresh batch logs."""
        hooks = BATCH_HOOKS if hook is None else (hook,)
        return any(
            self._overrides(h) or (h in ALIASES and self._overrides(ALIASES[h])) for h in hooks
        )


class CallbackList(Callback):
    """Calls every hook on each callback in order."""

    def __init__(self, callbacks: Iterable[Callback] = (), model=None, params=None):
        super().__init__()
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    "Expected every entry of `callbacks` to be an hkfit.callbacks."
                    f"Callback. Received: {cb!r} of type {type(cb).__name__}."
                )
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

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        return any(cb.wants_batch_logs(hook) for cb in self.callbacks)

    def on_exception(self, exception: BaseException) -> None:
        """Calls every callback's ``on_exception``; one that raises is reported (a
        warning) and the others still run, so ``exception`` is the one that propagates."""
        for cb in self.callbacks:
            try:
                cb.on_exception(exception)
            except Exception as e:
                warnings.warn(
                    f"{type(cb).__name__}.on_exception raised {type(e).__name__}: {e}",
                    stacklevel=2,
                )

    def __getattribute__(self, name):
        if name in _HOOKS:
            callbacks = object.__getattribute__(self, "callbacks")

            def dispatch(*args: Any, **kwargs: Any) -> None:
                for cb in callbacks:
                    getattr(cb, name)(*args, **kwargs)

            return dispatch
        return object.__getattribute__(self, name)


class History(Callback):
    """Records epoch logs: ``history.history["loss"][i]`` is the loss of ``history.epoch[i]``."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch: list[int] = []
        self.history: dict[str, list[float]] = {}
        self._key_epochs: dict[str, list[int]] = {}  # a key missing from some epochs' logs

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(int(epoch))
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
            self._key_epochs.setdefault(key, []).append(int(epoch))

    def including(self, epoch: int | None, logs: dict | None) -> tuple[list, dict]:
        """Copies of ``(epoch, history)`` with epoch ``epoch``'s ``logs`` recorded too.

        Nothing is added when ``epoch`` is None or already the last one recorded (History
        runs after the other callbacks, so an epoch's logs reach it last).
        """
        epochs, history = list(self.epoch), {k: list(v) for k, v in self.history.items()}
        if epoch is None or (epochs and epochs[-1] == epoch):
            return epochs, history
        epochs.append(int(epoch))
        for key, value in (logs or {}).items():
            history.setdefault(key, []).append(float(value))
        return epochs, history

    def plot(self, metrics: Sequence[str] | str | None = None, ax: Any = None) -> Any:
        """Draws the training and validation curves of each metric against ``epoch``.

        Needs matplotlib (``pip install "hkfit[plot]"``), imported only here. Each metric
        is drawn with its ``val_`` twin (``loss`` with ``val_loss``); a key logged on some
        epochs only (``val_loss`` with ``validation_freq=2``) is drawn at those epochs.

        Args:
          metrics: the metric names to draw (``"loss"``, ``"accuracy"``, ...; the
            ``val_`` curves come with them), or ``None`` for every key of ``history``.
          ax: a matplotlib ``Axes`` to draw every selected metric on. ``None`` (the
            default) makes a new figure with one subplot per metric (three per row).

        Returns:
          The matplotlib ``Figure`` drawn on (``ax.figure`` when ``ax`` is given): save it
          with ``figure.savefig(path)``, or show it with ``matplotlib.pyplot.show()``.

        Raises:
          ValueError: if nothing is recorded yet, or ``metrics`` names a metric that
            ``history`` lacks (the message lists those it has).
          ImportError: if matplotlib is not installed.
        """
        return _plotting.plot_history(self.epoch, self.history, self._key_epochs, metrics, ax)

    def __repr__(self) -> str:
        return f"History(epochs={self.epoch}, keys={sorted(self.history)})"
