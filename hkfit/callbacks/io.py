"""Built-in callbacks that write files: checkpoints, crash backups and CSV logs.

Everything here is re-exported by :mod:`hkfit.callbacks`; import it from there (TensorBoard
is in :mod:`hkfit.callbacks.loggers`, W&B and MLflow in :mod:`hkfit.callbacks.trackers`).
Model files are written and read through the model's public ``save`` / ``save_weights``
/ ``load`` (one ``.npz`` per checkpoint, atomic, never pickle). In a multi-process run
every process takes part in each save: process 0 writes the file, or, for arrays sharded
across processes, each process writes its shard file and process 0 the manifest (see
:mod:`hkfit.checkpoint`); files are moved and deleted by process 0 only, a checkpoint
with its shard files; every process restores.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import string
import threading
import warnings
from typing import Any, TextIO

import jax
import jax.numpy as jnp

from hkfit import _shards
from hkfit import checkpoint as checkpoint_lib
from hkfit.callbacks._writer import BackgroundWriter
from hkfit.callbacks.base import Callback
from hkfit.callbacks.monitor import improves, monitored, resolve_mode
from hkfit.distributed import is_main_process


def params_finite(model: Any) -> bool:
    """Whether every floating-point parameter of ``model`` is finite (one device sync)."""
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(model.params)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return bool(jnp.all(jnp.stack(leaves))) if leaves else True


def _warn_not_finite(path: str) -> None:
    warnings.warn(
        f"Not saving to {path!r}: the model's parameters are not finite (NaN or inf), "
        "and a checkpoint never replaces finite weights with them.",
        stacklevel=3,
    )


def _check_save_freq(save_freq: Any) -> None:
    if save_freq != "epoch" and (
        not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1
    ):
        raise ValueError(
            "Expected `save_freq` to be 'epoch' or an int >= 1 (batches). "
            f"Received: save_freq={save_freq!r}."
        )


class _BatchCounter:
    """Counts training batches across executions; due every ``save_freq`` batches."""

    def __init__(self, save_freq: Any):
        self.save_freq = save_freq
        self.seen_in_epoch = 0
        self.since_save = 0

    def start_epoch(self) -> None:
        self.seen_in_epoch = 0

    def due(self, batch: int) -> bool:
        """Counts the batches up to index ``batch``; True when a save is due."""
        self.since_save += batch + 1 - self.seen_in_epoch
        self.seen_in_epoch = batch + 1
        if self.save_freq != "epoch" and self.since_save >= self.save_freq:
            self.since_save = 0
            return True
        return False


class _Periodic(Callback):
    """What ModelCheckpoint and BackupAndRestore share: saves every epoch or every
    ``save_freq`` batches (counted across epochs, as in Keras), and a background writer."""

    def __init__(self, save_freq: Any):
        super().__init__()
        _check_save_freq(save_freq)
        self.save_freq = save_freq
        self._counter = _BatchCounter(save_freq)
        self._writer = BackgroundWriter()
        self._epoch = 0
        self._warned_synchronous = False

    def wants_batch_logs(self, hook: str | None = None) -> bool:
        return self.save_freq != "epoch" and hook in (None, "on_train_batch_end")

    def _in_background(self, asynchronous: bool) -> bool:
        """Whether this save may be written in the background thread.

        With several processes every save is written on the training thread: the
        processes must agree that the checkpoint is complete (a collective), which must
        not run beside the training step's own collectives. Said once, by process 0.
        """
        if not asynchronous or jax.process_count() == 1:
            return asynchronous
        if not self._warned_synchronous and is_main_process():
            warnings.warn(
                f"{type(self).__name__}(asynchronous=True) writes synchronously in a "
                f"run of {jax.process_count()} processes: every process takes part in "
                "each save, and no process goes on before the checkpoint is complete.",
                stacklevel=4,
            )
        self._warned_synchronous = True
        return False

    def on_epoch_begin(self, epoch, logs=None):
        self._writer.check()
        self._epoch = epoch
        self._counter.start_epoch()


def _pattern(filepath: str) -> tuple[re.Pattern, dict[str, str]] | None:
    """A regex matching the files ``filepath`` names and the group of each field, or
    None when a field is in the directory part (such files are not rediscovered)."""
    if "{" in os.path.dirname(filepath):
        return None
    regex, groups = "", {}  # type: tuple[str, dict[str, str]]
    for literal, field, _spec, _conversion in string.Formatter().parse(filepath):
        regex += re.escape(literal)
        if field is None:
            continue
        if field in groups:
            regex += f"(?P={groups[field]})"
        else:
            groups[field] = f"f{len(groups)}"
            regex += f"(?P<{groups[field]}>.+?)"
    return re.compile(regex + r"\Z"), groups


class ModelCheckpoint(_Periodic):
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
      max_to_keep: keep only this many of the files this callback wrote: the newest, or
        with ``save_best_only`` the best by ``monitor``; older (worse) ones are deleted.
        Files are recognized by ``filepath``'s pattern, so after a restart the callback
        finds the files an earlier run wrote (and no others). With ``save_best_only``,
        ``filepath`` must contain the ``{monitor}`` field, so that a restarted run can
        rank those files.
      asynchronous: copy the arrays to the host and write the file in a background
        thread while training goes on. At most one write is in flight; all are waited
        for when ``fit`` ends or raises, and a failed write is raised at the next hook.
        In a multi-process run, saves are written synchronously all the same (with a
        warning, once): every process takes part in each save.

    Every write is atomic: a crash never leaves a truncated checkpoint behind. Weights
    that are not finite (after a divergence) are never written: the save is skipped with
    a warning, so the last good file stays.

    In a multi-process run every process must run the callback (as ``fit`` does). A
    checkpoint of arrays sharded across processes is a manifest at the formatted path
    plus one shard file per process next to it; ``max_to_keep`` deletes each with its
    shard files.

    Raises:
      ValueError: if a placeholder of ``filepath`` is not in the logs, or an argument is
        invalid.
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
        max_to_keep: int | None = None,
        asynchronous: bool = False,
    ):
        super().__init__(save_freq)
        if max_to_keep is not None and (
            not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 1
        ):
            raise ValueError(
                f"Expected `max_to_keep` to be None or an int >= 1. Received: {max_to_keep!r}."
            )
        self.filepath = os.fspath(filepath)
        if max_to_keep is not None and save_best_only:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.filepath) if f}
            if monitor not in fields:
                raise ValueError(
                    "With `save_best_only` and `max_to_keep`, `filepath` must contain the "
                    f"monitored value, e.g. '{{{monitor}:.4f}}', so that the best files can "
                    f"be ranked after a restart. Received: filepath={self.filepath!r}."
                )
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.mode = resolve_mode(mode, monitor, "ModelCheckpoint")
        self.best: float | None = initial_value_threshold
        self.max_to_keep = max_to_keep
        self.asynchronous = asynchronous
        self.last_saved: str | None = None
        self.kept: list[tuple[str, float | None]] | None = None  # (path, value), oldest first
        self._warned: set = set()

    def on_train_begin(self, logs=None):
        if self.max_to_keep is not None and self.kept is None:
            self.kept = self._rediscover()

    def on_train_batch_end(self, batch, logs=None):
        self._writer.check()
        if self._counter.due(batch):
            self._save(self._epoch, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._writer.check()
        if self.save_freq == "epoch":
            self._save(epoch, None, logs)

    def on_train_end(self, logs=None):
        self._writer.close(raising=True)

    def on_exception(self, exception):
        self._writer.close(raising=False)

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
        current = None
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
            if not params_finite(self.model):
                _warn_not_finite(path)
                return
            if self.verbose:
                print(
                    f"Epoch {epoch + 1}: {self.monitor} improved to {current:.5g}, saving "
                    f"to {path}.",
                    flush=True,
                )
            self.best = current
        else:
            if not params_finite(self.model):
                _warn_not_finite(path)
                return
            if self.verbose:
                print(f"Epoch {epoch + 1}: saving the model to {path}.", flush=True)
        if self._in_background(self.asynchronous):
            snapshot = self.model.snapshot(weights_only=self.save_weights_only)
            self._writer.submit(lambda: snapshot.write(path))
        elif self.save_weights_only:
            self.model.save_weights(path)
        else:
            self.model.save(path)
        self.last_saved = path
        self._retain(path, current)

    def _retain(self, path: str, value: float | None) -> None:
        """Records ``path`` and deletes the files beyond ``max_to_keep``."""
        if self.max_to_keep is None:
            return
        kept = [item for item in (self.kept or []) if item[0] != path] + [(path, value)]
        if self.save_best_only:
            sign = 1.0 if self.mode == "min" else -1.0
            ranked = sorted(kept, key=lambda item: sign * item[1])  # type: ignore[operator]
            keep = {p for p, _ in ranked[: self.max_to_keep]}
        else:
            keep = {p for p, _ in kept[-self.max_to_keep :]}
        for old, _ in kept:
            if old not in keep:
                self._writer.wait()  # never delete while a write is in flight
                if is_main_process():
                    _shards.remove(old)  # the file, and the shard files it lists
        self.kept = [item for item in kept if item[0] in keep]

    def _rediscover(self) -> list[tuple[str, float | None]]:
        """The files an earlier run of this callback left, oldest first (by mtime)."""
        pattern = _pattern(self.filepath)
        if pattern is None:
            return []
        regex, groups = pattern
        directory = os.path.dirname(self.filepath) or "."
        try:
            names = os.listdir(directory)
        except OSError:
            return []
        found = []
        for name in names:
            path = os.path.join(os.path.dirname(self.filepath), name)
            match = regex.match(path)
            if match is None or _shards.is_shard_name(name) or not os.path.isfile(path):
                continue
            value = None
            if self.save_best_only:
                try:
                    value = float(match.group(groups[self.monitor]))
                except (KeyError, ValueError):
                    continue  # not one of ours: its monitored value does not parse
            found.append((os.stat(path).st_mtime_ns, path, value))
        found.sort()
        if self.save_best_only and found:
            values = [v for _, _, v in found if v is not None]
            if values and self.best is None:
                self.best = min(values) if self.mode == "min" else max(values)
        return [(path, value) for _, path, value in found]


class Preempted(SystemExit):
    """Raised by ``fit`` after a SIGTERM, once :class:`BackupAndRestore` saved a backup.

    It ends the script (it is a ``SystemExit``, so ``except Exception`` does not catch
    it) with its message; running the same script again resumes at the next batch.
    """


class BackupAndRestore(_Periodic):
    """Backs up the whole training state, and resumes from it after a crash or preemption.

    It writes ``backup_dir/training_state.npz`` (params, state, optimizer state with its
    learning rate, rng, step, epoch, history and, inside an epoch, the position) at the
    end of every epoch, or every ``save_freq`` batches, atomically. When ``fit`` starts
    and a backup exists, the model is restored from it and ``fit`` continues after the
    last completed epoch, or at the next batch of a backup written inside an epoch, with
    the history (and the running metrics) of what was done: a run killed at any point
    and started again with the same script ends with the same parameters and history as
    an uninterrupted run (bit-identical on CPU).

    That holds for array inputs, whose shuffling is a function of (seed, epoch). For an
    iterable ``x`` whose iterator has ``get_state`` / ``set_state`` (a grain iterator),
    the iterator's state is saved with the backup and set again on resume, so the run
    continues with exactly the next batch. Any other iterable is read from wherever the
    new process's iterator starts.

    **Preemption.** While ``fit`` runs, a SIGTERM (what schedulers and cloud VMs send
    before they stop a job) ends the current execution, writes a backup at that batch,
    and stops training by raising :class:`Preempted` with a message; the previous
    SIGTERM handler is restored when ``fit`` ends. The handler is installed only when
    ``fit`` runs in the main thread.

    **Double checkpoint.** With ``double_checkpoint=True`` (the default) the previous
    backup is kept as ``training_state.prev.npz``; if the newest one cannot be read
    (truncated, corrupted), the previous one is restored, with a warning naming the
    damaged file, which is then deleted.

    **Several processes.** Every process runs the callback and takes part in each backup;
    process 0 moves and deletes the files. With arrays sharded across processes (FSDP) a
    backup is a manifest plus one shard file per process next to it (see
    :mod:`hkfit.checkpoint`): the previous backup keeps its shard files when it becomes
    ``training_state.prev.npz``, and each is deleted with its manifest. Every process
    restores from the same backup, onto its own devices. A SIGTERM backup is collective
    too: it is written when every process gets the signal before the same batch ends;
    otherwise the processes do not meet in it, and the run fails or hangs until the
    scheduler stops it. A restart then resumes from the last complete backup.

    When ``fit`` completes (including an early stop), the backups are deleted (and
    ``backup_dir`` too if that leaves it empty), as Keras does; pass
    ``delete_checkpoint=False`` to keep them. A crash or exception leaves them in place.
    Weights that are not finite are never written over a backup (``TerminateOnNaN``
    then leaves the last good one).

    Put it LAST in ``callbacks`` so that its backup includes what other callbacks change
    at epoch end (e.g. ``ReduceLROnPlateau``). The internal counters of other callbacks
    (``EarlyStopping``'s patience, ``ReduceLROnPlateau``'s wait) are not backed up and
    start afresh on resume, as in Keras.

    Args:
      backup_dir: the directory of the backup (created when needed). Use one per run.
      save_freq: ``"epoch"``, or an int: back up every that many training batches (with
        ``steps_per_execution="auto"``, every batch is then its own execution).
      double_checkpoint: keep the previous backup too, to fall back on.
      delete_checkpoint: delete the backup when training completes.
      asynchronous: write backups in a background thread (see :class:`ModelCheckpoint`;
        synchronous in a multi-process run).

    Attributes:
      restored_epoch: after ``on_train_begin``, the epoch training resumes from, or None.
      restored_batch: the batch of that epoch it resumes after (0: the epoch's start).
      path: the backup file.

    >>> backup = BackupAndRestore("runs/backup")
    >>> backup.path
    'runs/backup/training_state.npz'

    """

    FILENAME = "training_state.npz"
    PREVIOUS = "training_state.prev.npz"

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        save_freq: Any = "epoch",
        double_checkpoint: bool = True,
        delete_checkpoint: bool = True,
        asynchronous: bool = False,
    ):
        super().__init__(save_freq)
        if not backup_dir:
            raise ValueError(f"Expected a non-empty `backup_dir`. Received: {backup_dir!r}.")
        self.backup_dir = os.fspath(backup_dir)
        self.path = os.path.join(self.backup_dir, self.FILENAME)
        self.previous_path = os.path.join(self.backup_dir, self.PREVIOUS)
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.asynchronous = asynchronous
        self.restored_epoch: int | None = None
        self.restored_batch = 0
        self._sigterm = False
        self._previous_handler: Any = None
        self._handler_installed = False

    # --- restore ---

    def on_train_begin(self, logs=None):
        self.restored_epoch, self.restored_batch = None, 0
        self._install_handler()
        restored = self._restore()
        if restored:
            self.restored_epoch = int(self.model.epoch)
            point = self.model.resume_point
            # fit reads initial_epoch after on_train_begin: resume after the backup's epoch
            if point is not None:
                epoch, batch = point
                self.model.initial_epoch = max(self.model.initial_epoch, epoch)
                if self.model.initial_epoch == epoch:
                    self.model.initial_batch = batch
                    self.restored_epoch, self.restored_batch = epoch, batch
            else:
                self.model.initial_epoch = max(self.model.initial_epoch, self.restored_epoch)

    def _restore(self) -> bool:
        """Loads the newest readable backup; True if one was loaded."""
        candidates = [p for p in (self.path, self.previous_path) if os.path.lexists(p)]
        failure: ValueError | None = None
        for path in candidates:
            try:
                self.model.load(path)
            except ValueError as e:
                failure = e
                warnings.warn(
                    f"The backup {path!r} could not be read and is skipped: {e}",
                    stacklevel=3,
                )
                continue
            if failure is not None:  # the newest was damaged: the previous one is now newest
                _shards.barrier("hkfit BackupAndRestore restored")  # every process read it
                if is_main_process():
                    _shards.remove(self.path)
                    _shards.replace(path, self.path)
            return True
        if failure is not None:
            raise ValueError(
                f"No backup in {self.backup_dir!r} could be read (see the warnings); "
                "move the directory away to start training afresh."
            ) from failure
        return False

    # --- back up ---

    def on_train_batch_end(self, batch, logs=None):
        self._writer.check()
        if self._sigterm:
            self._backup()
            self._preempted(f"epoch {self._epoch + 1} after batch {batch + 1}")
        if self._counter.due(batch):
            self._backup()

    def on_epoch_end(self, epoch, logs=None):
        self._writer.check()
        self._backup()
        if self._sigterm:
            self._preempted(f"at the end of epoch {epoch + 1}")

    def _backup(self) -> None:
        if not params_finite(self.model):
            _warn_not_finite(self.path)
            return
        if not self._sigterm and self._in_background(self.asynchronous):
            snapshot = self.model.snapshot()
            self._writer.submit(lambda: self._write(snapshot.write))
        else:
            self._writer.wait()
            self._write(self.model.save)

    def _write(self, save: Any) -> None:
        if self.double_checkpoint and is_main_process() and os.path.isfile(self.path):
            _shards.replace(self.path, self.previous_path)  # its shard files stay where they are
        save(self.path)  # in every process: each may write its shard file

    # --- preemption ---

    def _install_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._sigterm = False
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._handler_installed = True

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def _restore_handler(self) -> None:
        if self._handler_installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._handler_installed = False

    def _preempted(self, where: str) -> None:
        self._writer.close(raising=True)
        raise Preempted(
            f"Training was stopped by SIGTERM in {where}; the backup {self.path!r} holds "
            "its state. Run the same script again to resume where it stopped."
        )

    # --- end ---

    def on_train_end(self, logs=None):
        self._restore_handler()
        self._writer.close(raising=True)
        if not self.delete_checkpoint:
            return
        if is_main_process():
            paths = (self.path, self.previous_path)
            for path in paths:
                _shards.remove(path)  # with its shard files
            leftovers = [checkpoint_lib.temp_path(p) for p in paths]  # left by killed saves
            leftovers += [name for p in paths for name in _shards.leftovers(p)]
            _shards.discard(leftovers)
            try:
                os.rmdir(self.backup_dir)  # only succeeds when empty
            except OSError:
                pass
        _shards.barrier("hkfit BackupAndRestore deleted")  # a next fit sees no backup

    def on_exception(self, exception):
        self._restore_handler()
        self._writer.close(raising=False)


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


__all__ = ["BackupAndRestore", "CSVLogger", "ModelCheckpoint", "Preempted"]
