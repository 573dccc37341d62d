"""The learning-rate range test: :func:`find_learning_rate`.

The test (L. Smith, "Cyclical Learning Rates for Training Neural Networks", 2017, as
popularised by fastai) trains for a few steps while the learning rate grows exponentially
from ``min_lr`` to ``max_lr``, and records the loss of each batch. The loss first barely
moves (the rate is too small), then falls, then blows up (the rate is too large); a good
rate lies on the falling part.

The sweep trains a copy of the model's train state with the model's own compiled training
step (``Model.train_on_batch``): the rate is written into the optimizer state's injected
``learning_rate`` before each step, so it is a runtime value and the step compiles once.
The model's own params, state, optimizer state, step, epoch and history are restored
untouched afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _data as data_lib
from hkfit import _plotting
from hkfit import optimizers as optimizers_lib

if TYPE_CHECKING:
    from hkfit.model import Model


@dataclasses.dataclass(frozen=True)
class LearningRateSweep:
    """What :func:`find_learning_rate` measured.

    Attributes:
      learning_rates: the rate of each step run, ``[steps_run]`` (exponentially spaced).
      losses: the training loss of each step's batch, before that step's update.
      smoothed_losses: ``losses`` smoothed by an exponential moving average with bias
        correction (as fastai does): ``avg_i = beta * avg_{i-1} + (1 - beta) * loss_i``
        and ``smoothed_i = avg_i / (1 - beta ** (i + 1))``.
      suggestion: the suggested learning rate: the rate at the minimum of
        ``smoothed_losses``, divided by 10 (see :func:`find_learning_rate`).
      diverged: whether the sweep stopped early because the loss diverged (the arrays
        then end with the step that diverged).
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    smoothed_losses: np.ndarray
    suggestion: float
    diverged: bool

    def plot(self, ax: Any = None) -> Any:
        """Draws the smoothed loss (and the raw loss, faintly) against the rate, log scale.

        A dashed vertical line marks :attr:`suggestion`. Needs matplotlib
        (``pip install "hkfit[plot]"``), imported only here.

        Args:
          ax: a matplotlib ``Axes`` to draw on; ``None`` makes a new figure.

        Returns:
          The matplotlib ``Figure`` drawn on (``ax.figure`` when ``ax`` is given), as
          :meth:`hkfit.callbacks.History.plot` returns.

        Raises:
          ImportError: if matplotlib is not installed.
        """
        plt = _plotting.pyplot("find_learning_rate(...).plot")
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        ax.plot(self.learning_rates, self.losses, alpha=0.3, label="loss")
        ax.plot(self.learning_rates, self.smoothed_losses, label="smoothed loss")
        if math.isfinite(self.suggestion):
            ax.axvline(
                self.suggestion,
                color="k",
                linestyle="--",
                label=f"suggestion {self.suggestion:.2g}",
            )
        ax.set_xscale("log")
        limits = _plotting.loss_limits(self.smoothed_losses, self.losses)
        if limits is not None:  # the raw loss of a diverging sweep may leave the top
            ax.set_ylim(*limits)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        return ax.figure


def _positive_float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ValueError(
            f"Expected `{name}` to be a finite number > 0. Received: {name}={value!r}."
        )
    return number


def _batches(num_rows: int, batch_size: int, steps: int, shuffle: bool, seed: int):
    """Row indices of ``steps`` full batches: epochs of the rows, each reshuffled."""
    rng = np.random.default_rng(seed)
    per_pass = num_rows // batch_size
    emitted = 0
    while emitted < steps:
        order = rng.permutation(num_rows) if shuffle else np.arange(num_rows)
        for b in range(min(per_pass, steps - emitted)):
            yield order[b * batch_size : (b + 1) * batch_size]
        emitted += per_pass


def _take(tree: Any, rows: np.ndarray) -> Any:
    return jax.tree_util.tree_map(lambda a: a[rows], tree, is_leaf=data_lib.is_array)


def _check_first_step(model: Model, logs: dict[str, float], rate: float) -> None:
    """The step logs a loss, and trained with ``rate`` (not with a schedule's rate)."""
    if "loss" not in logs:
        raise ValueError(
            "find_learning_rate reads the `loss` that the training step logs. "
            f"Received: logs with the keys {sorted(logs)}."
        )
    used = optimizers_lib.learning_rate(model.opt_state)
    if used is None or not math.isclose(used, rate, rel_tol=1e-4):
        raise ValueError(
            "find_learning_rate sets the optimizer's injected learning rate before each "
            "step, but this optimizer recomputes it from a schedule at every step, which "
            "overrides the sweep. Build the optimizer with a constant rate, such as "
            "`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`. Received: the "
            f"rate {rate:g} was set and the step used {used!r}."
        )


def find_learning_rate(
    model: Model,
    x: Any,
    y: Any,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    steps: int = 100,
    batch_size: int = 32,
    sample_weight: Any = None,
    beta: float = 0.98,
    diverge_factor: float = 4.0,
    shuffle: bool = True,
    seed: int = 0,
) -> LearningRateSweep:
    """Sweeps the learning rate exponentially and records the loss (a range test).

    Step ``i`` of ``steps`` trains on one batch with the rate
    ``min_lr * (max_lr / min_lr) ** (i / (steps - 1))``, starting from the model's current
    weights. The sweep stops early when the smoothed loss exceeds ``diverge_factor`` times
    its lowest value so far, or the loss is not finite. It runs on a copy of
    ``model.train_state``: the model's params, state, optimizer state (its learning rate
    included), step, epoch and history are left exactly as they were, and the arrays they
    hold stay valid. A model without parameters is built from ``x`` first, as ``fit``
    would.

    The suggestion is the rate at the minimum of the smoothed loss divided by 10 (fastai's
    "minimum / 10" rule). The minimum is the most stable point of the curve: the steepest
    descent, the other common choice, is a derivative of a noisy, smoothed curve and moves
    a lot from run to run. The smoothed minimum lies where the loss is about to blow up
    (smoothing lags behind the raw loss, towards larger rates), so a tenth of it is a rate
    at which the loss still falls fast and training is stable. Read it as a starting point
    and look at :meth:`LearningRateSweep.plot`.

    Args:
      model: an :class:`hkfit.Model` whose optimizer has an injected learning rate (the
        named optimizers, or ``optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)``).
        With several injected rates (the groups of ``optax.partition``), each step sets
        all of them to the swept rate.
      x: inputs, an array or a pytree of arrays.
      y: targets, an array or a pytree of arrays with the same number of rows.
      min_lr: the first rate, > 0.
      max_lr: the last rate, > ``min_lr``.
      steps: the number of steps (one batch each), >= 2. Batches are drawn from ``x``
        without replacement; when ``steps`` needs more batches than ``x`` holds, the rows
        are reshuffled and drawn again. Every batch has ``batch_size`` rows (leftover rows
        of a pass are skipped), so the step compiles once.
      batch_size: rows per batch (at most the number of rows).
      sample_weight: optional weights of the rows, as in ``fit``.
      beta: the smoothing factor of ``smoothed_losses``, in [0, 1).
      diverge_factor: the sweep stops when the smoothed loss exceeds this many times its
        minimum so far, > 1.
      shuffle: draw the batches in a random order (from ``seed``) rather than in order.
      seed: the seed of the batch order.

    Returns:
      A :class:`LearningRateSweep` with ``learning_rates``, ``losses``,
      ``smoothed_losses``, ``suggestion``, ``diverged`` and ``plot(ax=None)``.

    Raises:
      ValueError: if the optimizer has no injected learning rate (the message says how to
        build one), if an argument is out of range, or if the model's training step logs
        no ``loss``.
      TypeError: if ``x`` or ``y`` is not an array or a pytree of arrays.
    """
    min_lr, max_lr = _positive_float(min_lr, "min_lr"), _positive_float(max_lr, "max_lr")
    if max_lr <= min_lr:
        raise ValueError(
            "Expected `max_lr` > `min_lr`: the sweep goes from min_lr up to max_lr. "
            f"Received: min_lr={min_lr!r}, max_lr={max_lr!r}."
        )
    steps = data_lib.positive_int(steps, "steps", minimum=2)
    batch_size = data_lib.positive_int(batch_size, "batch_size")
    beta = float(beta)
    if not 0 <= beta < 1:
        raise ValueError(f"Expected `beta` in [0, 1). Received: beta={beta!r}.")
    if not float(diverge_factor) > 1:
        raise ValueError(
            f"Expected `diverge_factor` > 1. Received: diverge_factor={diverge_factor!r}."
        )
    for name, value in (("x", x), ("y", y)):
        if not data_lib.is_array_tree(value):
            raise TypeError(
                f"Expected `{name}` to be an array or a pytree of arrays (find_learning_rate "
                "draws its batches from arrays). Received: "
                f"{name} of type {type(value).__name__}."
            )
    x, y, num_rows = data_lib.checked_arrays(x, y)
    weights = (
        None if sample_weight is None else data_lib.row_weights(num_rows, y, sample_weight, None)
    )
    batch_size = min(batch_size, num_rows)

    model.init(x)
    if optimizers_lib.learning_rate(model.opt_state) is None:
        raise ValueError(
            f"{optimizers_lib.NO_LEARNING_RATE} Received: Model(optimizer={model.optimizer!r})."
        )

    rates = np.geomspace(min_lr, max_lr, steps)
    losses: list[float] = []
    smoothed: list[float] = []
    average, best, diverged = 0.0, math.inf, False
    original = model.train_state
    # The steps donate the train state they get: the sweep trains a copy.
    model.train_state = jax.tree_util.tree_map(jnp.copy, original)
    try:
        for i, rows in enumerate(_batches(num_rows, batch_size, steps, shuffle, seed)):
            model.learning_rate = rates[i]
            logs = model.train_on_batch(
                _take(x, rows), _take(y, rows), sample_weight=_take(weights, rows)
            )
            if i == 0:
                _check_first_step(model, logs, rates[0])
            loss = float(logs["loss"])
            average = beta * average + (1 - beta) * loss
            losses.append(loss)
            smoothed.append(average / (1 - beta ** (i + 1)))
            if not math.isfinite(smoothed[-1]) or smoothed[-1] > diverge_factor * best:
                diverged = True
                break
            best = min(best, smoothed[-1])
    finally:
        model.train_state = original
    run = len(losses)
    smoothed_losses = np.asarray(smoothed)
    finite = np.where(np.isfinite(smoothed_losses), smoothed_losses, np.inf)
    lowest = int(np.argmin(finite))
    suggestion = float(rates[lowest] / 10) if math.isfinite(finite[lowest]) else math.nan
    if lowest == 0:
        warnings.warn(
            "The smoothed loss was lowest at the first rate of the sweep, min_lr="
            f"{min_lr:g}: the suggestion is below the rates tried. Lower `min_lr`, or check "
            "the model and data.",
            stacklevel=2,
        )
    return LearningRateSweep(
        learning_rates=rates[:run],
        losses=np.asarray(losses),
        smoothed_losses=smoothed_losses,
        suggestion=suggestion,
        diverged=diverged,
    )


__all__ = ["LearningRateSweep", "find_learning_rate"]
