"""The progress display: a tqdm bar (``verbose=1``) or one line per epoch (``verbose=2``)."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from hkfit.callbacks.base import Callback
from hkfit.distributed import is_main_process


def format_logs(logs: dict) -> str:
    return " - ".join(
        f"{k}: {v:.4g}" for k, v in logs.items() if isinstance(v, (float, int, np.floating))
    )


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except AttributeError:
        return False
    # Jupyter's kernel shell, or a subclass of it (Google Colab's)
    return ip is not None and any(c.__name__ == "ZMQInteractiveShell" for c in type(ip).__mro__)


def resolve_verbose(verbose: Any) -> int:
    """``"auto"`` -> 1 on a terminal or in a notebook, 2 otherwise (log files).

    Always 0 outside process 0 of a multi-process run: only the main process prints.
    """
    if verbose == "auto":
        verbose = 1 if (sys.stderr.isatty() or in_notebook()) else 2
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(
            f"Expected `verbose` to be 'auto', 0, 1 or 2. Received: verbose={verbose!r}."
        )
    return int(verbose) if is_main_process() else 0


def _notebook_bar() -> Any:
    """tqdm's notebook (widget) bar class in a Jupyter kernel with ipywidgets, else None.

    Checked before a bar is made: without ipywidgets ``tqdm.notebook`` raises halfway
    through building a bar (and ``tqdm.auto`` warns on every import), so the text bar is
    chosen up front instead.
    """
    if not in_notebook():
        return None
    try:
        from tqdm import notebook
    except Exception:
        return None
    if getattr(notebook, "IProgress", None) is None:  # ipywidgets is missing
        return None
    return notebook.tqdm


def _make_bar(**kwargs):
    """A notebook bar in Jupyter (when ipywidgets works), else a text bar on stderr."""
    notebook_bar = _notebook_bar()
    if notebook_bar is not None:
        try:
            return notebook_bar(**kwargs)
        except Exception:  # a broken widget install: fall back to text
            pass
    from tqdm.std import tqdm as std_tqdm

    return std_tqdm(file=sys.stderr, **kwargs)


class ProgressBar(Callback):
    """A tqdm bar (``verbose=1``) or one printed line (``verbose=2``) per epoch.

    In ``fit`` the bar shows the running loss and metrics, refreshed at most every
    ``refresh`` seconds, and the epoch's validation results when the epoch ends. In
    ``evaluate`` / ``predict`` (used on their own) it shows one bar over the batches, and
    ``evaluate`` ends with its results.

    In a Jupyter notebook (Google Colab included) the bar is tqdm's notebook widget when
    ipywidgets is installed, and otherwise the text bar on stderr, with no warning.
    """

    def __init__(self, verbose: int = 1, refresh: float = 0.5):
        super().__init__()
        self.verbose = verbose
        self.refresh = refresh
        self._bar = None
        self._seen = 0
        self._start = 0.0
        self._training = False

    def _open(self, desc: str) -> None:
        self._start = time.perf_counter()
        self._seen = 0
        if self.verbose == 1:
            self._bar = _make_bar(
                total=self.params.get("steps"),
                unit="step",
                leave=True,
                desc=desc,
                dynamic_ncols=True,
                mininterval=self.refresh,
            )

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

    def on_train_begin(self, logs=None):
        self._training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._open(f"Epoch {epoch + 1}/{self.params.get('epochs')}")

    def on_train_batch_end(self, batch, logs=None):
        self._advance(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._close(f"Epoch {epoch + 1}/{self.params.get('epochs')}", logs)

    def on_train_end(self, logs=None):
        self._close("", None)
        self._training = False

    # Validation inside fit shows in the epoch's bar and line, not as a bar of its own.

    def on_test_begin(self, logs=None):
        if not self._training:
            self._open("evaluate")

    def on_test_batch_end(self, batch, logs=None):
        if not self._training:
            self._advance(batch, logs)

    def on_test_end(self, logs=None):
        if not self._training:
            self._close("evaluate", logs)

    def on_predict_begin(self, logs=None):
        self._open("predict")

    def on_predict_batch_end(self, batch, logs=None):
        self._advance(batch, None)

    def on_predict_end(self, logs=None):
        self._close("", None)

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        return False
