"""Optimizers by name, built with ``optax.inject_hyperparams``.

Building named optimizers through ``inject_hyperparams`` keeps the learning rate in the
optimizer state, where callbacks can read it (and log it as ``learning_rate``) or change
it without recompiling.
"""

from __future__ import annotations

from typing import Any

import optax

# name -> (optax constructor, default learning rate as in Keras)
_OPTIMIZERS = {
    "adam": (optax.adam, 1e-3),
    "adamw": (optax.adamw, 1e-3),
    "sgd": (optax.sgd, 1e-2),
    "rmsprop": (optax.rmsprop, 1e-3),
}


def names() -> list[str]:
    """The optimizer names that :func:`get` accepts."""
    return sorted(_OPTIMIZERS)


def get(optimizer: Any) -> optax.GradientTransformation:
    """Resolves ``optimizer`` (a name or an Optax transformation).

    Raises:
      ValueError: for an unknown name.
      TypeError: for anything that is neither a name nor a GradientTransformation.

    >>> get("sgd")  # doctest: +ELLIPSIS
    GradientTransformation...
    """
    if isinstance(optimizer, str):
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"Unknown `optimizer` name. Expected one of {names()} or an "
                             f"optax.GradientTransformation. Received: optimizer={optimizer!r}.")
        make, learning_rate = _OPTIMIZERS[optimizer]
        return optax.inject_hyperparams(make)(learning_rate=learning_rate)
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return optimizer
    raise TypeError("Expected `optimizer` to be a name or an optax.GradientTransformation. "
                    f"Received: {optimizer!r} of type {type(optimizer).__name__}.")


def learning_rate(opt_state: Any) -> float | None:
    """The learning rate held in an ``inject_hyperparams`` state, if one is visible."""
    for node in _walk(opt_state):
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
            return float(hyperparams["learning_rate"])
    return None


def _walk(tree: Any):
    """Yields ``tree`` and the states nested in tuples (chain, masked, ...), depth first."""
    yield tree
    if isinstance(tree, tuple):
        for child in tree:
            yield from _walk(child)
