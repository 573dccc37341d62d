"""Built-in callbacks that write files: checkpoints, crash backups and CSV logs.

Everything here is re-exported by :mod:`hkfit.callbacks`; import it from there (TensorBoard
is in :mod:`hkfit.callbacks.loggers`, W&B and MLflow in :mod:`hkfit.callbacks.trackers`).
Model files are written and read through the model's public ``save`` / ``save_weights``
/ ``load`` (one ``.npz`` per checkpoint, atomic, never pickle). In a multi-process run
only process 0 writes; every process restores.
"""

from __future__ import annotations

import csv
import os
import warnings
from typing import Any, TextIO

from hkfit.callbacks.base import Callback
from hkfit.callbacks.monitor import improves, monitored, resolve_mode
from hkfit.distributed import is_main_process


class ModelCheckpoint(Callback):
    """Saves the model (or its weights) every epoch or every ``save_freq`` batches.

    Args:
      filepath: the file to write. Placeholders are filled with ``str.format`` from the
        1-based epoch and the logs: ``"ckpt/model-{epoch:02d}-{val_loss:.4f}.npz"``
        (``{batch}`` is the 1-based batch index when ``save_freq`` is an int).
      monitor: the log key compared when ``save_best_only``.
      verbose: 1 prints a line per save.
      save_best_only: write only when ``monitor`` improves on the best value so far.
      save_weights_only: write params and state (``model.save_weights``) instead of the full
        training state (``model.save``).
      mode: ``"min"``, ``"max"`` or ``"auto"`` (``max`` for accuracy/auc-like names).
      save_freq: ``"epoch"``, or an int: save after that many training batches, with the
        running logs of the epoch. With ``steps_per_execution="auto"`` every batch is then
        its own execution, so saves happen exactly every ``save_freq`` batches; with an
        explicit int K they are checked once per execution of K batches.
      initial_value_threshold: with ``save_best_only``, the value to beat first.

    Every write is atomic: a crash never leaves a truncated checkpoint behind.

    Raises:
      ValueError: if a placeholder of ``filepath`` is not in the logs.
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: Any = "epoch",
        initial_value_threshold: float | None = None,
    ):
        super().__init__()
        if save_freq != "epoch" and (
            not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1
        ):
            raise ValueError(
                "Expected `save_freq` to be 'epoch' or an int >= 1 (batches). "
                f"Received: save_freq={save_freq!r}."
            )
        self.filepath = os.fspath(filepath)
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.mode = resolve_mode(mode, monitor, "ModelCheckpoint")
        self.save_freq = save_freq
        self.best: float | None = initial_value_threshold
        self.last_saved: str | None = None
        self._warned: set = set()
        self._epoch = 0
        self._seen_in_epoch = 0
        self._since_save = 0

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        return self.save_freq != "epoch" and hook in (None, "on_train_batch_end")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._seen_in_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        self._since_save += batch + 1 - self._seen_in_epoch
        self._seen_in_epoch = batch + 1
        if self._since_save >= self.save_freq:
            self._since_save = 0
            self._save(self._epoch, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch, None, logs)

    def format_path(self, epoch: int, batch: int | None, logs: dict | None) -> str:
        """``filepath`` with its placeholders filled (``epoch`` and ``batch`` 1-based)."""
        fields = dict(logs or {})
        fields["epoch"] = epoch + 1
        if batch is not None:
            fields["batch"] = batch + 1
        try:
            return self.filepath.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"Could not fill the placeholders of `filepath`={self.filepath!r} "
                f"({type(e).__name__}: {e}). Available: {sorted(fields)}."
            ) from None

    def _save(self, epoch: int, batch: int | None, logs: dict | None) -> None:
        path = self.format_path(epoch, batch, logs)
        if self.save_best_only:
            current = monitored(logs, self.monitor, "ModelCheckpoint", self._warned)
            if current is None:
                return
            if not improves(self.mode, current, self.best):
                if self.verbose:
                    print(
                        f"Epoch {epoch + 1}: {self.monitor} did not improve from {self.best}.",
                        flush=True,
                    )
                return
            if self.verbose:
                print(
                    f"Epoch {epoch + 1}: {self.monitor} improved to {current:.5g}, saving "
                    f"to {path}.",
                    flush=True,
                )
            self.best = current
        elif self.verbose:
            print(f"Epoch {epoch + 1}: saving the model to {path}.", flush=True)
        if self.save_weights_only:
            self.model.save_weights(path)
        else:
            self.model.save(path)
        self.last_saved = path


class BackupAndRestore(Callback):
    """Backs up the whole training state every epoch, and resumes from it after a crash.

    At the end of every epoch it writes ``backup_dir/training_state.npz`` (params, state,
    optimizer state with its learning rate, rng, step, epoch and history), atomically.
    When ``fit`` starts and that file exists, the model is restored from it and ``fit``
    continues with the epoch after the last completed one, with the history of the
    earlier epochs: a run killed at any point and started again with the same script ends
    with the same parameters and history as an uninterrupted run (bit-identical on CPU).
    That holds for array inputs, whose shuffling is a function of (seed, epoch); an
    iterable ``x`` is read from wherever the new process's iterator starts.

    When ``fit`` completes (including an early stop), the backup is deleted (and
    ``backup_dir`` too if that leaves it empty), as Keras does; pass
    ``delete_checkpoint=False`` to keep it. A crash or exception leaves it in place.

    Put it LAST in ``callbacks`` so that its backup includes what other callbacks change
    at epoch end (e.g. ``ReduceLROnPlateau``). The internal counters of other callbacks
    (``EarlyStopping``'s patience, ``ReduceLROnPlateau``'s wait) are not backed up and
    start afresh on resume, as in Keras.

    Args:
      backup_dir: the directory of the backup (created when needed). Use one per run.
      delete_checkpoint: delete the backup when training completes.

    Attributes:
      restored_epoch: after ``on_train_begin``, the epoch training resumes from, or None.
      path: the backup file.

    >>> backup = BackupAndRestore("runs/backup")
    >>> backup.path
    'runs/backup/training_state.npz'

    """

    FILENAME = "training_state.npz"

    def __init__(self, backup_dir: str | os.PathLike, delete_checkpoint: bool = True):
        super().__init__()
        if not backup_dir:
            raise ValueError(f"Expected a non-empty `backup_dir`. Received: {backup_dir!r}.")
        self.backup_dir = os.fspath(backup_dir)
        self.path = os.path.join(self.backup_dir, self.FILENAME)
        self.delete_checkpoint = delete_checkpoint
        self.restored_epoch: int | None = None

    def on_train_begin(self, logs=None):
        self.restored_epoch = None
        if os.path.exists(self.path):
            self.model.load(self.path)
            self.restored_epoch = int(self.model.epoch)
            # fit reads initial_epoch after on_train_begin: resume after the backup's epoch
            self.model.initial_epoch = max(self.model.initial_epoch, self.restored_epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.model.save(self.path)

    def on_train_end(self, logs=None):
        if not self.delete_checkpoint or not is_main_process():
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        try:
            os.rmdir(self.backup_dir)  # only succeeds when empty
        except OSError:
            pass


class CSVLogger(Callback):
    """Writes one row per epoch (``epoch`` 0-based, then the sorted log keys) to a CSV file.

    Args:
      filename: the CSV file.
      separator: the column separator.
      append: append to an existing file (keeping its columns) instead of overwriting it;
        use it with :class:`BackupAndRestore`.

    Values are written with ``str(float)``, which reads back exactly. Keys missing in an
    epoch are written as ``NA``; when a key first appears in a later epoch (e.g.
    ``val_loss`` with ``validation_freq=2``) the file is rewritten with the new column,
    unless it was appended to (the column is then dropped, with a warning).
    """

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False):
        super().__init__()
        self.filename = os.fspath(filename)
        self.separator = separator
        self.append = append
        self._file: TextIO | None = None
        self._keys: list[str] | None = None
        self._rows: list[dict] = []
        self._appending = False

    def on_train_begin(self, logs=None):
        self._rows, self._keys = [], None
        if not is_main_process():
            return
        self._appending = (
            self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0
        )
        if self._appending:
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f, delimiter=self.separator), [])
            self._keys = [k for k in header if k != "epoch"]
        directory = os.path.dirname(os.path.abspath(self.filename))
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.filename, "a" if self._appending else "w", newline="")

    def _writer(self):
        return csv.writer(self._file, delimiter=self.separator)

    def _write_all(self) -> None:
        keys = self._keys
        if self._file is None or keys is None:
            raise RuntimeError("CSVLogger rewrites its file only after a first epoch was logged.")
        self._file.close()
        self._file = open(self.filename, "w", newline="")
        writer = self._writer()
        writer.writerow(["epoch", *keys])
        for row in self._rows:
            writer.writerow([row["epoch"], *(row["logs"].get(k, "NA") for k in keys)])

    def on_epoch_end(self, epoch, logs=None):
        if not is_main_process():
            return
        logs = dict(logs or {})
        if self._file is None:
            self.on_train_begin()
        if self._keys is None:
            self._keys = sorted(logs)
            self._writer().writerow(["epoch", *self._keys])
        new = sorted(k for k in logs if k not in self._keys)
        self._rows.append({"epoch": int(epoch), "logs": logs})
        if new and not self._appending:
            self._keys = sorted({*self._keys, *new})
            self._write_all()
        else:
            if new:
                warnings.warn(
                    f"CSVLogger is appending to {self.filename!r}, whose columns do not "
                    f"include {new}; those values are not written.",
                    stacklevel=2,
                )
            self._writer().writerow([epoch, *(logs.get(k, "NA") for k in self._keys)])
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["BackupAndRestore", "CSVLogger", "ModelCheckpoint"]
