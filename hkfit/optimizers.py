"""Optimizers by name, built with ``optax.inject_hyperparams``.

Building named optimizers through ``inject_hyperparams`` keeps the learning rate in the
optimizer state, where callbacks can read it (and log it as ``learning_rate``) or change
it without recompiling.

The learning-rate helpers search the whole optimizer state: through ``optax.chain``'s
tuples, wrapper states (``optax.masked``, ``optax.MultiSteps``, ``optax.apply_if_finite``,
...) and the per-group states of ``optax.partition`` (``optax.multi_transform``), so one
injected rate per parameter group can be read (:func:`learning_rates`), set
(:func:`set_learning_rate`) or scaled (:func:`scale_learning_rates`). Schedule-free
optimizers (``optax.contrib.schedule_free_*``) keep the parameters to evaluate with apart
from the ones they train: :func:`eval_params` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax

_T = TypeVar("_T")

# Present in every supported optax (>= 0.2.5); looked up defensively all the same.
_contrib = getattr(optax, "contrib", None)
_SCHEDULE_FREE_STATE: Any = getattr(_contrib, "ScheduleFreeState", None)
_schedule_free_eval_params: Any = getattr(_contrib, "schedule_free_eval_params", None)

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


NO_LEARNING_RATE = (
    "The optimizer has no injected learning rate to read or change. Build it with "
    "`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)` (any optax optimizer works the "
    "same way; the names 'adam', 'adamw', 'sgd' and 'rmsprop' already are built so)."
)


def learning_rates(opt_state: Any) -> dict[str, float]:
    """Every learning rate injected in ``opt_state``, by parameter group.

    Each ``inject_hyperparams`` state holding a ``learning_rate`` is found, however deep:
    in chains, in wrapper states (masked, multi-steps, ...) and in the per-group states of
    ``optax.partition`` (``optax.multi_transform``). Its label is the path of group names
    leading to it, joined with ``"/"``: ``""`` for an optimizer without groups, ``"head"``
    for the group ``"head"`` of a partition, ``"outer/inner"`` for nested partitions. When
    several rates share a path (two injected optimizers in one chain), the second is
    labelled ``"<path>#2"``, the third ``"<path>#3"``, and so on, in depth-first order.

    Args:
      opt_state: an optimizer state.

    Returns:
      ``{label: learning rate}``, sorted by label; empty when no rate is injected.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> optimizer = optax.partition(
    ...     {
    ...         "body": optax.inject_hyperparams(optax.sgd)(learning_rate=0.5),
    ...         "head": optax.inject_hyperparams(optax.adam)(learning_rate=0.25),
    ...     },
    ...     {"w": "body", "b": "head"},
    ... )
    >>> learning_rates(optimizer.init({"w": jnp.zeros(2), "b": jnp.zeros(())}))
    {'body': 0.5, 'head': 0.25}
    >>> sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    >>> learning_rates(sgd.init({"w": jnp.zeros(2)}))
    {'': 0.5}
    """
    found: dict[str, float] = {}

    def read(label: str, rate: Any) -> None:
        found[label] = float(rate)

    _visit_rates(opt_state, read)
    return dict(sorted(found.items()))


def learning_rate(opt_state: Any) -> float | None:
    """The learning rate injected in ``opt_state``, if one is visible.

    With several injected rates (one per group of ``optax.partition``), the one of the
    first group by label, as :func:`learning_rates` sorts them; read them all with
    :func:`learning_rates`.

    Args:
      opt_state: an optimizer state.

    Returns:
      The learning rate, or ``None`` when the state holds no injected learning rate.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> adam = optax.inject_hyperparams(optax.adam)(learning_rate=0.5)
    >>> learning_rate(adam.init({"w": jnp.zeros(2)}))
    0.5
    >>> learning_rate(optax.adam(0.5).init({"w": jnp.zeros(2)})) is None
    True
    """
    rates = learning_rates(opt_state)
    return next(iter(rates.values())) if rates else None


def set_learning_rate(opt_state: Any, value: float, *, group: str | None = None) -> Any:
    """A copy of ``opt_state`` whose injected learning rates are ``value``.

    Pure: ``opt_state`` is not modified. Each new value keeps the dtype, weak type and
    device placement of the old one, so the jitted training step is not recompiled. A
    learning rate given to ``inject_hyperparams`` as a schedule (a callable) is recomputed
    at every step and overrides this value.

    Args:
      opt_state: an optimizer state holding ``hyperparams["learning_rate"]``, possibly
        inside chains, wrapper states or the groups of ``optax.partition``.
      value: the new learning rate, a finite number >= 0 (checked unless it is traced:
        the function also works under ``jit``).
      group: a label of :func:`learning_rates` (a group name): only that group's rate is
        set. ``None`` (the default) sets every injected learning rate.

    Returns:
      The new optimizer state.

    Raises:
      ValueError: if ``value`` is negative or not finite, if no injected learning rate is
        found, or if ``group`` is not one of the labels of :func:`learning_rates`.

    >>> import jax.numpy as jnp
    >>> state = get("sgd").init({"w": jnp.zeros(2)})
    >>> learning_rate(set_learning_rate(state, 0.5))
    0.5
    """
    number = _checked_number(value, "learning_rate")
    new_value = value if number is None else number
    return _update_rates(opt_state, group, lambda old: _like(old, new_value))


def scale_learning_rates(opt_state: Any, factor: float, *, group: str | None = None) -> Any:
    """A copy of ``opt_state`` whose injected learning rates are multiplied by ``factor``.

    Each group keeps its own rate, scaled (what a plateau schedule does to all groups at
    once). Pure, and like :func:`set_learning_rate` it keeps each rate's dtype, weak type
    and device placement, so the jitted training step is not recompiled.

    Args:
      opt_state: an optimizer state with injected learning rates (see
        :func:`set_learning_rate`).
      factor: a finite number >= 0 (checked unless it is traced).
      group: a label of :func:`learning_rates`: only that group's rate is scaled. ``None``
        (the default) scales every injected learning rate.

    Returns:
      The new optimizer state.

    Raises:
      ValueError: if ``factor`` is negative or not finite, if no injected learning rate is
        found, or if ``group`` is not one of the labels of :func:`learning_rates`.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    >>> learning_rate(scale_learning_rates(sgd.init({"w": jnp.zeros(2)}), 0.5))
    0.25
    """
    number = _checked_number(factor, "factor")
    scale = factor if number is None else number
    return _update_rates(opt_state, group, lambda old: _like(old, old * scale))


def is_schedule_free(opt_state: Any) -> bool:
    """Whether ``opt_state`` is, or holds, an ``optax.contrib.ScheduleFreeState``.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> params = {"w": jnp.zeros(2)}
    >>> is_schedule_free(optax.contrib.schedule_free_sgd(0.1).init(params))
    True
    >>> is_schedule_free(get("sgd").init(params))
    False
    """
    return any(True for _ in _schedule_free_states(opt_state))


def eval_params(opt_state: Any, params: _T) -> _T:
    """The parameters to evaluate (and predict) with.

    A schedule-free optimizer (``optax.contrib.schedule_free``, ``schedule_free_sgd``,
    ``schedule_free_adamw``) trains one sequence of parameters and evaluates another: this
    returns ``optax.contrib.schedule_free_eval_params(state, params)`` for its state,
    wherever it sits in ``opt_state`` (inside ``inject_hyperparams``, a chain, ...). When it
    covers only some parameters (one group of ``optax.partition``, ``optax.masked``), only
    those are converted. Pure; also works under ``jit``.

    Args:
      opt_state: the optimizer state.
      params: the trained parameters, as passed to the optimizer's ``update``.

    Returns:
      The evaluation parameters; ``params`` itself (the same object) when the optimizer is
      not schedule-free.

    >>> import jax.numpy as jnp
    >>> import optax
    >>> params = {"w": jnp.zeros(2)}
    >>> eval_params(get("sgd").init(params), params) is params
    True
    """
    for state in _schedule_free_states(opt_state):
        params = _schedule_free_params(state, params)
    return params


# --- State traversal -------------------------------------------------------------------------


def _checked_number(value: Any, name: str) -> float | None:
    """``value`` as a float, ``None`` when traced; ValueError unless finite and >= 0."""
    try:
        number: float | None = float(value)
    except jax.errors.ConcretizationTypeError:
        number = None  # traced under jit: the caller checks it
    except (TypeError, ValueError):
        number = float("nan")
    if number is not None and (not math.isfinite(number) or number < 0):
        raise ValueError(
            f"Expected `{name}` to be a finite number >= 0. Received: {name}={value!r}."
        )
    return number


def _like(old: Any, new: Any) -> jax.Array:
    """``new`` with the shape, dtype, weak type, sharding and committed-ness of ``old``.

    The jitted step's compilation cache is keyed on all of them; an op on ``old`` keeps them.
    """
    out = jnp.where(True, new, old)
    dtype = jnp.result_type(old)
    return out if out.dtype == dtype else out.astype(dtype)


def _update_rates(opt_state: Any, group: str | None, change: Callable[[Any], Any]) -> Any:
    """``opt_state`` with ``change`` applied to the injected rates that ``group`` selects."""
    labels: list[str] = []
    _visit_rates(opt_state, lambda label, rate: labels.append(label))
    if not labels:
        raise ValueError(
            f"{NO_LEARNING_RATE} Received: an optimizer state of type {type(opt_state).__name__}."
        )
    if group is not None and group not in labels:
        raise ValueError(
            f"Unknown `group`. Expected one of {sorted(labels)} (the labels of "
            "`learning_rates(opt_state)`), or None for every group. "
            f"Received: group={group!r}."
        )

    def visit(label: str, rate: Any) -> Any:
        return change(rate) if group is None or label == group else None

    return _visit_rates(opt_state, visit)


def _visit_rates(tree: Any, visit: Callable[[str, Any], Any]) -> Any:
    """Calls ``visit(label, rate)`` on each injected learning rate of ``tree``, depth first.

    Returns ``tree`` with each rate for which ``visit`` returned a value other than ``None``
    replaced by that value (untouched subtrees are kept as they are). The search stops at
    an injected learning rate: it does not look inside that optimizer's own state.
    """
    seen: dict[str, int] = {}

    def go(node: Any, path: tuple[str, ...]) -> Any:
        hyperparams = getattr(node, "hyperparams", None)
        if (
            _is_namedtuple(node)
            and isinstance(hyperparams, dict)
            and "learning_rate" in hyperparams
        ):
            label = "/".join(path)
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}#{seen[label]}"
            new = visit(label, hyperparams["learning_rate"])
            if new is None:
                return node
            return node._replace(hyperparams={**hyperparams, "learning_rate": new})
        return _map_children(node, path, go)

    return go(tree, ())


def _map_children(
    node: Any, path: tuple[str, ...], fn: Callable[[Any, tuple[str, ...]], Any]
) -> Any:
    """``node`` (a tuple, NamedTuple, list or dict) with ``fn`` applied to its children.

    A dict's keys extend ``path`` (they name ``optax.partition``'s groups); other containers
    keep it. Anything else is returned unchanged, as is a container none of whose children
    changed.
    """
    if isinstance(node, dict):
        items = {key: fn(child, path + (str(key),)) for key, child in node.items()}
        if all(items[key] is child for key, child in node.items()):
            return node
        return items if type(node) is dict else type(node)(items)
    if isinstance(node, (tuple, list)):
        children = [fn(child, path) for child in node]
        if all(new is old for new, old in zip(children, node)):
            return node
        return type(node)(*children) if _is_namedtuple(node) else type(node)(children)
    return node


def _children(node: Any) -> Iterator[Any]:
    """The states directly nested in ``node`` (a tuple, NamedTuple, list or dict)."""
    if isinstance(node, dict):
        yield from node.values()
    elif isinstance(node, (tuple, list)):
        yield from node


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields") and hasattr(node, "_replace")


def _schedule_free_states(tree: Any) -> Iterator[Any]:
    """The schedule-free states in ``tree``, depth first (not looking inside them)."""
    if _SCHEDULE_FREE_STATE is None:
        return
    if isinstance(tree, _SCHEDULE_FREE_STATE):
        yield tree
        return
    for child in _children(tree):
        yield from _schedule_free_states(child)


def _schedule_free_params(state: Any, params: _T) -> _T:
    """``params`` converted by one schedule-free state, on the parameters it covers."""

    def masked(leaf: Any) -> bool:
        return isinstance(leaf, optax.MaskedNode)

    if not any(masked(leaf) for leaf in jax.tree.leaves(state.z, is_leaf=masked)):
        return _schedule_free_eval_params(state, params)
    # Under `optax.partition` or `optax.masked`, `z` has a MaskedNode for each parameter
    # the optimizer does not update: those stay as they are.
    return jax.tree.map(
        lambda z, p: p if masked(z) else _schedule_free_eval_params(state._replace(z=z), p),
        state.z,
        params,
        is_leaf=masked,
    )
