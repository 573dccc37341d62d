"""Callbacks with Keras hook names, and the built-in callbacks.

``hkfit.callbacks`` is the one public path for all of them:

* the protocol: :class:`Callback`, :class:`CallbackList`, :class:`History`
  (``hkfit.callbacks.base``, which documents what hooks receive and when they fire);
* the display: :class:`ProgressBar` (tqdm);
* watching and steering: :class:`EarlyStopping`, :class:`TerminateOnNaN`,
  :class:`LambdaCallback`, :class:`LearningRateScheduler`, :class:`ReduceLROnPlateau`,
  :class:`MemoryUsage`;
* files: :class:`ModelCheckpoint`, :class:`BackupAndRestore`, :class:`CSVLogger`,
  :class:`TensorBoard`;
* profiling and experiment trackers: :class:`Profile`, :class:`WandbLogger`,
  :class:`MLflowLogger` (each imports its optional library only when created).

>>> import hkfit
>>> class Printer(hkfit.callbacks.Callback):
...     def on_epoch_end(self, epoch, logs=None):
...         print(epoch, sorted(logs))
>>> Printer().wants_batch_logs()   # no batch hook overridden: no per-batch syncs
False
"""

from hkfit.callbacks.base import Callback, CallbackList, History
from hkfit.callbacks.io import BackupAndRestore, CSVLogger, ModelCheckpoint, Preempted
from hkfit.callbacks.loggers import TensorBoard
from hkfit.callbacks.memory import MemoryUsage
from hkfit.callbacks.monitor import (
    EarlyStopping,
    LambdaCallback,
    LearningRateScheduler,
    ReduceLROnPlateau,
    TerminateOnNaN,
)
from hkfit.callbacks.profile import Profile
from hkfit.callbacks.progress import ProgressBar, resolve_verbose
from hkfit.callbacks.trackers import MLflowLogger, WandbLogger

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "History",
    "LambdaCallback",
    "LearningRateScheduler",
    "MLflowLogger",
    "MemoryUsage",
    "ModelCheckpoint",
    "Preempted",
    "Profile",
    "ProgressBar",
    "ReduceLROnPlateau",
    "TensorBoard",
    "TerminateOnNaN",
    "WandbLogger",
    "resolve_verbose",
]
