"""Optimizers by name, built with ``optax.inject_hyperparams``.

Building named optimizers through ``inject_hyperparams`` keeps the learning rate in the
optimizer state, where callbacks can read it (and log it as ``learning_rate``) or change
it without recompiling.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
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
            raise ValueError(
                f"Unknown `optimizer` name. Expected one of {names()} or an "
                f"optax.GradientTransformation. Received: optimizer={optimizer!r}."
            )
        make, learning_rate = _OPTIMIZERS[optimizer]
        return optax.inject_hyperparams(make)(learning_rate=learning_rate)
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return optimizer
    raise TypeError(
        "Expected `optimizer` to be a name or an optax.GradientTransformation. "
        f"Received: {optimizer!r} of type {type(optimizer).__name__}."
    )


def learning_rate(opt_state: Any) -> float | None:
    """The learning rate held in an ``inject_hyperparams`` state, if one is visible."""
    for node in _walk(opt_state):
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
            return float(hyperparams["learning_rate"])
    return None


NO_LEARNING_RATE = (
    "The optimizer has no injected learning rate to read or change. Build it with "
    "`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)` (any optax optimizer works the "
    "same way; the names 'adam', 'adamw', 'sgd' and 'rmsprop' already are built so)."
)


def set_learning_rate(opt_state: Any, value: float) -> Any:
    """A copy of ``opt_state`` whose injected learning rate is ``value``.

    Pure: ``opt_state`` is not modified. The new value keeps the dtype (and the device
    placement) of the old one, so the jitted training step is not recompiled. It changes
    the same ``inject_hyperparams`` state that :func:`learning_rate` reads (the first one,
    depth first through chains). A learning rate given to ``inject_hyperparams`` as a
    schedule (a callable) is recomputed at every step and overrides this value.

    Args:
      opt_state: an optimizer state holding ``hyperparams["learning_rate"]``, possibly
        inside a chain's tuple of states.
      value: the new learning rate, a finite number >= 0 (checked unless it is traced:
        the function also works under ``jit``).

    Returns:
      The new optimizer state.

    Raises:
      ValueError: if ``value`` is negative or not finite, or if no injected learning rate
        is found.

    >>> import jax.numpy as jnp
    >>> state = get("sgd").init({"w": jnp.zeros(2)})
    >>> learning_rate(set_learning_rate(state, 0.5))
    0.5
    """
    try:
        number = float(value)
    except jax.errors.ConcretizationTypeError:
        number = None  # traced under jit: the caller checks it
    except (TypeError, ValueError):
        number = float("nan")
    if number is not None and (not math.isfinite(number) or number < 0):
        raise ValueError(
            "Expected `learning_rate` to be a finite number >= 0. "
            f"Received: learning_rate={value!r}."
        )
    new_state, found = _replace_learning_rate(opt_state, value if number is None else number)
    if not found:
        raise ValueError(
            f"{NO_LEARNING_RATE} Received: an optimizer state of type {type(opt_state).__name__}."
        )
    return new_state


def _replace_learning_rate(tree: Any, value: float) -> tuple[Any, bool]:
    """``tree`` with the first injected learning rate (depth first) set to ``value``."""
    hyperparams = getattr(tree, "hyperparams", None)
    if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
        old = hyperparams["learning_rate"]
        # An op on `old` keeps its shape, dtype, weak type, sharding and committed-ness, all
        # of which the jitted step's compilation cache is keyed on.
        new = jnp.where(True, value, old)
        if new.dtype != jnp.result_type(old):
            new = new.astype(jnp.result_type(old))
        return tree._replace(hyperparams={**hyperparams, "learning_rate": new}), True
    if isinstance(tree, tuple):
        children = list(tree)
        for i, child in enumerate(children):
            new_child, found = _replace_learning_rate(child, value)
            if found:
                children[i] = new_child
                return (
                    type(tree)(*children) if hasattr(tree, "_fields") else type(tree)(children)
                ), True
    return tree, False


def _walk(tree: Any):
    """Yields ``tree`` and the states nested in tuples (chain, masked, ...), depth first."""
    yield tree
    if isinstance(tree, tuple):
        for child in tree:
            yield from _walk(child)
