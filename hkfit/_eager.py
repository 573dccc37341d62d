"""Eager execution for debugging: ``fit / evaluate / predict(..., run_eagerly=True)``.

Inside :func:`running`, ``jax.disable_jit`` makes every jitted step run op by op (and
``lax.fori_loop`` / ``scan`` as Python loops), so ``print``, ``pdb.set_trace()`` and
``float(x)`` work inside a forward or a loss. The few places that inspect a function
without running it (output shapes, the losses a forward adds) go through
:func:`shape_of`, which runs the function on real values instead while eager, since an
abstract trace is exactly what such debugging code cannot go through.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

_STATE = threading.local()


def active() -> bool:
    """Whether this thread runs eagerly now (``run_eagerly``, or ``jax.disable_jit()``)."""
    disabled = getattr(jax.config, "jax_disable_jit", False)  # a user's jax.disable_jit()
    return bool(getattr(_STATE, "eager", False)) or bool(disabled)


@contextlib.contextmanager
def running(eagerly: bool) -> Iterator[None]:
    """Runs the block eagerly (no jit) when ``eagerly``; does nothing otherwise."""
    if not eagerly or getattr(_STATE, "eager", False):
        yield
        return
    _STATE.eager = True
    try:
        with jax.disable_jit():
            yield
    finally:
        _STATE.eager = False


def shape_of(fn: Callable, *args: Any) -> Any:
    """``jax.eval_shape(fn, *args)``; while eager, ``fn`` runs on the values instead."""
    if not active():
        return jax.eval_shape(fn, *args)
    out = fn(*args)
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), out
    )


def check_flag(value: Any) -> bool:
    """``run_eagerly`` checked: a bool.

    Raises:
      TypeError: for anything else.
    """
    if not isinstance(value, bool):
        raise TypeError(
            f"Expected `run_eagerly` to be True or False. Received: run_eagerly={value!r}."
        )
    return value
