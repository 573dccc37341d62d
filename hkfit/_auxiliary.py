"""Auxiliary losses added from inside a forward: :func:`add_loss`.

A Haiku module calls ``hkfit.add_loss(value, name=None)`` while the forward runs (a KL
term of a VAE, an activity penalty). The training and evaluation steps run the forward
under :func:`collect`, which gathers those values (traced, under ``jit``) and returns them
beside the output, so they never enter Haiku state, checkpoints or ``predict`` outputs.

A value is a scalar (one number for the batch) or one value per example ``[batch]``.
Unnamed values are summed into ``aux_loss``; named ones are logged under their name. All
are added to the training objective and to the reported ``loss``, as Keras does.

Outside an hkfit step (plain ``hk.transform`` use, ``model.apply_fn``) ``add_loss`` does
nothing, so modules that call it stay reusable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

AUX_NAME = "aux_loss"

_local = threading.local()


def _stack() -> list[list[tuple[str, jax.Array]]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def add_loss(value: jax.typing.ArrayLike, name: str | None = None) -> None:
    """Adds ``value`` to the training objective of the running hkfit step.

    Args:
      value: a scalar, or one value per example (shape ``[batch]``).
      name: the log key; unnamed values are summed under ``"aux_loss"``.

    Raises:
      TypeError: if ``name`` is not a string.
      ValueError: if ``name`` is ``"loss"`` (the total).

    >>> import haiku as hk, jax, jax.numpy as jnp
    >>> def forward(x):
    ...     h = hk.Linear(2)(x)
    ...     add_loss(1e-3 * jnp.sum(h**2, axis=-1), name="activity")
    ...     return h
    >>> f = hk.transform(forward)
    >>> params = f.init(jax.random.key(0), jnp.ones((3, 4)))
    >>> y, losses = collect(lambda: f.apply(params, None, jnp.ones((3, 4))))
    >>> list(losses), losses["activity"].shape
    (['activity'], (3,))
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"Expected `name` to be a str or None. Received: name={name!r}.")
    if name == "loss":
        raise ValueError("Expected `name` other than 'loss' (the total). Received: name='loss'.")
    stack = _stack()
    if stack:
        stack[-1].append((name or AUX_NAME, jnp.asarray(value, jnp.float32)))


def collect(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, jax.Array]]:
    """Runs ``fn(*args)`` and returns ``(its output, {name: summed added losses})``."""
    stack = _stack()
    stack.append([])
    try:
        out = fn(*args)
    finally:
        added = stack.pop()
    losses: dict[str, jax.Array] = {}
    for name, value in added:
        losses[name] = losses[name] + value if name in losses else value
    return out, losses


def per_row(value: jax.Array, rows: int) -> jax.Array:
    """A scalar or ``[batch]`` added loss as one value per row."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return jnp.broadcast_to(value, (rows,))
    if value.shape[0] != rows:
        raise ValueError(
            "Expected each value given to hkfit.add_loss to be a scalar or one value per "
            f"example, shape ({rows},). Received: shape {value.shape}."
        )
    return value.reshape(rows, -1).mean(axis=-1)
