"""Adapters from what users write (a forward function, or a Haiku transform) to pure functions.

Every forward becomes a :class:`Forward` of three pure functions:

* ``init(rng, x) -> (params, state)``, run in training mode (``hk.BatchNorm`` creates
  its statistics there);
* ``apply_train(params, state, rng, x) -> (y, new_state)``;
* ``apply_eval(params, state, rng, x) -> y`` (the state is left untouched).

A plain function is wrapped with ``hk.transform_with_state``; if it declares a parameter
named ``is_training`` it receives ``True`` in ``apply_train`` and ``False`` in
``apply_eval``. An ``hk.Transformed`` / ``hk.TransformedWithState`` is called as
``apply(params, [state,] [rng,] x)``: the user binds any training flag.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import haiku as hk


class Forward(NamedTuple):
    init: Callable
    apply_train: Callable
    apply_eval: Callable
    transformed: Any  # what summary() tabulates (a Haiku transform, in training mode)


def _takes_rng(apply: Callable) -> bool:
    """False for the apply of ``hk.without_apply_rng`` (its signature has no ``rng``)."""
    try:
        return "rng" in inspect.signature(apply).parameters
    except (TypeError, ValueError):
        return True


def takes_is_training(fn: Callable) -> bool:
    """True when ``fn`` declares a parameter (or keyword) named ``is_training``."""
    try:
        return "is_training" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def wrap(forward: Any) -> Forward:
    """Builds the pure init/apply functions for ``forward``.

    Raises:
      TypeError: if ``forward`` is neither callable nor a Haiku transform.
    """
    if isinstance(forward, hk.TransformedWithState):
        with_rng = _takes_rng(forward.apply)

        def apply_train(params, state, rng, x):
            return forward.apply(params, state, rng, x) if with_rng else forward.apply(params, state, x)

        return Forward(forward.init, apply_train,
                       lambda params, state, rng, x: apply_train(params, state, rng, x)[0], forward)

    if isinstance(forward, hk.Transformed):
        with_rng = _takes_rng(forward.apply)

        def apply_plain(params, state, rng, x):
            return forward.apply(params, rng, x) if with_rng else forward.apply(params, x)

        def init(rng, x):
            return forward.init(rng, x), {}

        return Forward(init, lambda p, s, r, x: (apply_plain(p, s, r, x), s), apply_plain, forward)

    if not callable(forward):
        raise TypeError("Expected `forward` to be a function using Haiku modules, or an "
                        "hk.Transformed / hk.TransformedWithState. Received: "
                        f"{forward!r} of type {type(forward).__name__}.")

    if takes_is_training(forward):
        transformed = hk.transform_with_state(forward)
        train_transformed = hk.transform_with_state(lambda x: forward(x, is_training=True))

        def init(rng, x):
            return transformed.init(rng, x, is_training=True)

        def apply_train(params, state, rng, x):
            return transformed.apply(params, state, rng, x, is_training=True)

        def apply_eval(params, state, rng, x):
            return transformed.apply(params, state, rng, x, is_training=False)[0]

        return Forward(init, apply_train, apply_eval, train_transformed)

    transformed = hk.transform_with_state(forward)
    return Forward(transformed.init, transformed.apply,
                   lambda params, state, rng, x: transformed.apply(params, state, rng, x)[0],
                   transformed)
