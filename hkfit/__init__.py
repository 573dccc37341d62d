"""hkfit: Keras-style ``fit`` / ``evaluate`` / ``predict`` for Haiku and Optax.

The whole public surface is re-exported here.
"""

from hkfit import callbacks
from hkfit import checkpoint
from hkfit import distributed
from hkfit import losses
from hkfit import metrics
from hkfit import optimizers
from hkfit.callbacks import Callback, History
from hkfit.distributed import DataParallel
from hkfit.model import Model
from hkfit.multiview import multiview
from hkfit.step import Batch, TrainState

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Callback",
    "DataParallel",
    "History",
    "Model",
    "TrainState",
    "callbacks",
    "checkpoint",
    "distributed",
    "losses",
    "metrics",
    "multiview",
    "optimizers",
]
