"""Adapters from what users write (a forward function, or a Haiku transform) to pure functions.

Every forward becomes a :class:`Forward` of three pure functions:

* ``init(rng, x) -> (params, state)``, run in training mode (``hk.BatchNorm`` creates
  its statistics there);
* ``apply_train(params, state, rng, x) -> (y, new_state)``;
* ``apply_eval(params, state, rng, x) -> y`` (the state is left untouched).

A plain function is wrapped with ``hk.transform_with_state``; if it declares a parameter
named ``is_training`` it receives ``True`` in ``apply_train`` and ``False`` in
``apply_eval``. An ``hk.Transformed`` / ``hk.TransformedWithState`` is called as
``apply(params, [state,] [rng,] x)``: the user binds any training flag, or marks the
transform with :func:`with_is_training` to receive it as a keyword argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk

HaikuTransform = hk.Transformed | hk.TransformedWithState


class Forward(NamedTuple):
    init: Callable
    apply_train: Callable
    apply_eval: Callable
    transformed: Any  # what summary() tabulates (a Haiku transform, in training mode)


class TrainingFlag(NamedTuple):
    """A Haiku transform whose init and apply take the boolean keyword ``name``.

    Built by :func:`with_is_training`.
    """

    transformed: HaikuTransform
    name: str = "is_training"


def with_is_training(transformed: HaikuTransform, name: str = "is_training") -> TrainingFlag:
    """Marks a Haiku transform whose ``init`` and ``apply`` take a training flag.

    An ``hk.Transformed`` or ``hk.TransformedWithState`` is otherwise called without
    extra arguments. Marked, it gets the keyword argument ``name``: ``True`` in ``init``
    and in training steps, ``False`` in evaluation and prediction, as a plain forward
    function with an ``is_training`` parameter does. This is what a transform of a
    function like ``f(x, is_training)`` (dm-haiku's ImageNet example) needs, so that
    ``hk.BatchNorm`` uses batch statistics in training and its moving averages in
    evaluation. ``hk.without_apply_rng`` transforms are supported.

    Args:
      transformed: the result of ``hk.transform`` or ``hk.transform_with_state``
        (optionally wrapped in ``hk.without_apply_rng``).
      name: the name of the boolean keyword argument.

    Returns:
      A :class:`TrainingFlag` to pass where a forward function is expected.

    Raises:
      TypeError: if ``transformed`` is not a Haiku transform, ``name`` is not a
        string, or ``transformed.apply`` takes no argument called ``name``.
      ValueError: if ``name`` is not a Python identifier.

    >>> import haiku as hk, jax, jax.numpy as jnp
    >>> from hkfit._forward import wrap
    >>> def f(x, is_training):
    ...     return hk.BatchNorm(True, True, 0.9)(hk.Linear(2)(x), is_training)
    >>> flagged = with_is_training(hk.transform_with_state(f))
    >>> forward = wrap(flagged)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> params, state = forward.init(jax.random.PRNGKey(0), x)
    >>> y, state = forward.apply_train(params, state, None, x)  # batch statistics
    >>> forward.apply_eval(params, state, None, x).shape  # moving averages
    (3, 2)
    """
    if not isinstance(name, str):
        raise TypeError(
            "Expected `name` to be a str, the name of the training flag "
            f"argument. Received: name={name!r}."
        )
    if not name.isidentifier():
        raise ValueError(
            "Expected `name` to be a Python identifier, the name of the training "
            f"flag argument. Received: name={name!r}."
        )
    if isinstance(transformed, TrainingFlag) or not isinstance(
        transformed, (hk.Transformed, hk.TransformedWithState)
    ):
        hint = (
            " A plain function with an `is_training` parameter gets the flag without "
            "with_is_training: pass the function itself."
            if callable(transformed)
            else ""
        )
        raise TypeError(
            "Expected `transformed` to be an hk.Transformed or "
            "hk.TransformedWithState (from hk.transform / hk.transform_with_state)."
            f" Received: transformed of type {type(transformed).__name__}.{hint}"
        )
    parameters = _keyword_parameters(transformed.apply)
    if parameters is not None and name not in parameters:
        raise TypeError(
            f"Expected `transformed.apply` to take a keyword argument `{name}`. "
            f"Received: apply with parameters ({', '.join(parameters)}). Pass the "
            "name of the transformed function's training flag as `name`."
        )
    return TrainingFlag(transformed, name)


def _keyword_parameters(fn: Callable) -> list[str] | None:
    """The names ``fn`` takes by keyword; None if unknown or if it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not p.POSITIONAL_ONLY]


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


def _stateful(transformed: HaikuTransform) -> tuple[Callable, Callable]:
    """Stateful init/apply with an rng argument for any Haiku transform.

    Returns ``init(rng, x, **kw) -> (params, state)`` and
    ``apply(params, state, rng, x, **kw) -> (y, state)``, whether or not ``transformed``
    has state or takes an apply rng; ``**kw`` reaches the transformed function.
    """
    rng_args = (lambda rng: (rng,)) if _takes_rng(transformed.apply) else (lambda rng: ())
    if isinstance(transformed, hk.TransformedWithState):

        def apply(params, state, rng, x, **kwargs):
            return transformed.apply(params, state, *rng_args(rng), x, **kwargs)

        return transformed.init, apply

    def init(rng, x, **kwargs):
        return transformed.init(rng, x, **kwargs), {}

    def apply_stateless(params, state, rng, x, **kwargs):
        return transformed.apply(params, *rng_args(rng), x, **kwargs), state

    return init, apply_stateless


def _with_flag(transformed: HaikuTransform, name: str, summary: Any = None) -> Forward:
    """The Forward of a transform whose init/apply take the boolean keyword ``name``."""
    init, apply = _stateful(transformed)
    on, off = {name: True}, {name: False}
    if summary is None:  # Runs init in training mode; each module appears once.
        summary = hk.transform_with_state(lambda x: init(hk.next_rng_key(), x, **on))
    return Forward(
        lambda rng, x: init(rng, x, **on),
        lambda params, state, rng, x: apply(params, state, rng, x, **on),
        lambda params, state, rng, x: apply(params, state, rng, x, **off)[0],
        summary,
    )


def wrap(forward: Any) -> Forward:
    """Builds the pure init/apply functions for ``forward``.

    Args:
      forward: a function using Haiku modules, a Haiku transform, or a transform marked
        with :func:`with_is_training`.

    Returns:
      The :class:`Forward` of ``forward``.

    Raises:
      TypeError: if ``forward`` is neither callable nor a Haiku transform.
    """
    if isinstance(forward, TrainingFlag):
        return _with_flag(forward.transformed, forward.name)

    if isinstance(forward, (hk.Transformed, hk.TransformedWithState)):
        init, apply = _stateful(forward)
        return Forward(
            init, apply, lambda params, state, rng, x: apply(params, state, rng, x)[0], forward
        )

    if not callable(forward):
        raise TypeError(
            "Expected `forward` to be a function using Haiku modules, or an "
            "hk.Transformed / hk.TransformedWithState. Received: "
            f"{forward!r} of type {type(forward).__name__}."
        )

    if takes_is_training(forward):
        return _with_flag(
            hk.transform_with_state(forward),
            "is_training",
            hk.transform_with_state(lambda x: forward(x, is_training=True)),
        )

    transformed = hk.transform_with_state(forward)
    return Forward(
        transformed.init,
        transformed.apply,
        lambda params, state, rng, x: transformed.apply(params, state, rng, x)[0],
        transformed,
    )


def _producer(jaxpr: Any, var: Any) -> Any:
    for eqn in reversed(jaxpr.eqns):
        if any(out is var for out in eqn.outvars):
            return eqn
    return None


def _ends_in_probabilities(jaxpr: Any, var: Any, depth: int = 0) -> bool:
    eqn = _producer(jaxpr, var)
    if eqn is None or depth > 8:
        return False
    name = eqn.primitive.name
    if name == "logistic" or eqn.params.get("name") in ("softmax", "sigmoid"):
        return True
    if name == "convert_element_type":  # a mixed precision policy's cast of the output
        return _ends_in_probabilities(jaxpr, eqn.invars[0], depth + 1)
    if name == "div":  # softmax inlined: exp(x - max) / sum(...)
        numerator = _producer(jaxpr, eqn.invars[0])
        return numerator is not None and numerator.primitive.name == "exp"
    for value in eqn.params.values():  # a jitted or custom-derivative call: look inside
        inner = getattr(value, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
            index = [i for i, out in enumerate(eqn.outvars) if out is var]
            if index and len(inner.outvars) == len(eqn.outvars):
                return _ends_in_probabilities(inner, inner.outvars[index[0]], depth + 1)
    return False


def emits_probabilities(closed_jaxpr: Any, leaf: int | None = None) -> bool:
    """Whether a forward's output comes straight out of a softmax or a sigmoid.

    Read from the traced program (no computation), so a model built with a crossentropy
    NAME, which means logits, can be warned at build time that it emits probabilities.
    ``leaf`` picks one output array among several (a multi-output model); by default the
    forward must have a single output array.
    """
    if closed_jaxpr is None:  # not traced (eager runs)
        return False
    jaxpr = getattr(closed_jaxpr, "jaxpr", closed_jaxpr)
    if leaf is None:
        if len(jaxpr.outvars) != 1:
            return False
        leaf = 0
    if leaf >= len(jaxpr.outvars):
        return False
    return _ends_in_probabilities(jaxpr, jaxpr.outvars[leaf])
