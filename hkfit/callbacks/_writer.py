"""Background checkpoint writes: at most one in flight, its error re-raised later."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable


class BackgroundWriter:
    """Runs one write at a time in a thread; a failure is re-raised by :meth:`check`.

    ``submit`` first waits for the write in flight, so at most one is pending and files
    are written in the order they were submitted.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Waits for the pending write (re-raising its error), then starts ``write``."""
        self.wait()
        self.check()

        def run() -> None:
            try:
                write()
            except BaseException as e:  # re-raised on the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="hkfit-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Blocks until the write in flight (if any) is done."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> None:
        """Re-raises the error of a finished background write, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self, raising: bool) -> None:
        """Waits for the pending write; its error is raised, or only warned about when
        another exception is already propagating (``raising=False``)."""
        self.wait()
        if raising:
            self.check()
        elif self._error is not None:
            error, self._error = self._error, None
            warnings.warn(
                f"A background checkpoint write failed: {type(error).__name__}: {error}",
                stacklevel=3,
            )
