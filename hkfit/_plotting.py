"""Plots of training curves, drawn with matplotlib (the ``plot`` extra).

matplotlib is imported only inside these functions, so a core install of hkfit never
needs it; without it they raise an ``ImportError`` that names the extra to install.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

INSTALL = 'pip install "hkfit[plot]"'
_COLUMNS = 3  # subplots per row of a figure of several metrics


def pyplot(feature: str) -> Any:
    """``matplotlib.pyplot``, or an ImportError saying how to install it for ``feature``."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            f"{feature} draws with matplotlib, which is not installed. Install it with "
            f"`{INSTALL}` (or `pip install matplotlib`)."
        ) from err
    return plt


def loss_limits(*curves: Any) -> tuple[float, float] | None:
    """y limits that show the finite values of ``curves[0]`` with a margin (``None``: none).

    The lower limit also shows the other curves' lowest finite value; their peaks (a
    diverging raw loss) may leave the plot.
    """
    main = np.asarray(curves[0], float)
    main = main[np.isfinite(main)]
    if not main.size:
        return None
    others = [np.asarray(c, float) for c in curves[1:]]
    low = min([main.min()] + [c[np.isfinite(c)].min() for c in others if np.isfinite(c).any()])
    high = main.max()
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - margin, high + margin


def metric_groups(history: Mapping[str, Sequence[float]]) -> dict[str, list[str]]:
    """``{metric: [its keys]}``: each key with its ``val_`` twin, in the logs' order.

    A ``val_`` key without a training twin is a metric of its own (named without the
    prefix).

    >>> metric_groups({"loss": [1.0], "val_loss": [2.0], "learning_rate": [0.1]})
    {'loss': ['loss', 'val_loss'], 'learning_rate': ['learning_rate']}
    """
    groups: dict[str, list[str]] = {}
    for key in history:
        name = key[len("val_") :] if key.startswith("val_") and len(key) > 4 else key
        groups.setdefault(name, []).append(key)
    return {name: sorted(keys, key=lambda k: k.startswith("val_")) for name, keys in groups.items()}


def epochs_of(
    key: str, values: Sequence[float], epochs: Sequence[int], recorded: Mapping[str, list[int]]
) -> list[int]:
    """The epochs at which ``key``'s ``values`` were logged.

    Every epoch when the lengths agree; else the epochs recorded for that key (a key
    logged only on some epochs, such as ``val_loss`` with ``validation_freq=2``); else,
    for a history restored without them, the last ``len(values)`` epochs.
    """
    if len(values) == len(epochs):
        return list(epochs)
    mine = recorded.get(key, [])
    if len(mine) == len(values):
        return list(mine)
    if len(values) > len(epochs):  # edited by hand: positions are all that is known
        return list(range(len(values)))
    return list(epochs)[len(epochs) - len(values) :]


def plot_history(
    epochs: Sequence[int],
    history: Mapping[str, Sequence[float]],
    recorded: Mapping[str, list[int]],
    metrics: Sequence[str] | str | None = None,
    ax: Any = None,
) -> Any:
    """Draws ``history`` (see :meth:`hkfit.callbacks.History.plot`); returns the figure."""
    groups = metric_groups(history)
    if not groups:
        raise ValueError(
            "History.plot needs recorded epochs. Received: an empty History (call `fit` "
            "first, or plot `model.history` after training)."
        )
    names = [metrics] if isinstance(metrics, str) else list(groups if metrics is None else metrics)
    if not names or any(name not in groups for name in names):
        raise ValueError(
            f"Expected `metrics` to name some of {list(groups)} (each drawn with its "
            f"`val_` curve), or None for all. Received: metrics={metrics!r}."
        )
    plt = pyplot("History.plot")
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        columns = min(_COLUMNS, len(names))
        rows = math.ceil(len(names) / columns)
        figure, grid = plt.subplots(
            rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False, layout="constrained"
        )
        axes = list(grid.flat)
        for unused in axes[len(names) :]:
            unused.remove()
        panels = [(axis, [name]) for axis, name in zip(axes, names)]
    else:
        figure, panels = ax.figure, [(ax, names)]
    for axis, shown in panels:
        for name in shown:
            for key in groups[name]:
                values = list(history[key])
                x = epochs_of(key, values, epochs, recorded)
                axis.plot(x, values, marker=".", label=key)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(", ".join(shown))
        axis.grid(True, alpha=0.3)
        axis.legend()
    return figure
