"""hkfit: Keras-style ``fit`` / ``evaluate`` / ``predict`` for Haiku and Optax.

The public surface is this module plus the documented submodules ``callbacks``,
``checkpoint``, ``distributed``, ``losses``, ``metrics``, ``optimizers``,
``regularizers``, ``step`` and ``testing``. Modules whose names start with an underscore
are internal.
"""

from hkfit import (
    callbacks,
    checkpoint,
    distributed,
    losses,
    metrics,
    optimizers,
    regularizers,
    step,
)
from hkfit._auxiliary import add_loss
from hkfit._compilation_cache import enable_compilation_cache
from hkfit._ema import EMA
from hkfit._export import load_exported
from hkfit._forward import with_is_training
from hkfit._layout import DataParallel
from hkfit._lr_finder import LearningRateSweep, find_learning_rate
from hkfit.callbacks import Callback, History
from hkfit.model import Model
from hkfit.multiview import ModelView, multiview
from hkfit.step import Batch, TrainState

__version__ = "0.2.0"

__all__ = [
    "Batch",
    "add_loss",
    "enable_compilation_cache",
    "Callback",
    "DataParallel",
    "EMA",
    "find_learning_rate",
    "History",
    "LearningRateSweep",
    "load_exported",
    "Model",
    "ModelView",
    "TrainState",
    "callbacks",
    "checkpoint",
    "distributed",
    "losses",
    "metrics",
    "multiview",
    "optimizers",
    "regularizers",
    "step",
    "with_is_training",
]
