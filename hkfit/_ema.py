"""Weight averaging: an exponential moving average (EMA) of the params, in the optimizer state.

``Model(..., ema=0.999)`` wraps the model's optimizer with :func:`wrap`. The wrapper's
state, :class:`EmaState`, holds the inner optimizer's state, the averaged params and the
number of steps averaged. Its ``update`` runs the inner optimizer, forms the new params
``params + updates`` (what the training step is about to apply) and mixes them into the
average. So the average is updated inside the compiled step, with no host round trip,
and being part of ``opt_state`` it is fused, checkpointed, resumed bit-identically and
laid out like the rest of the optimizer state (replicated, or split like its parameter
under ``hkfit.DataParallel``). Under gradient accumulation ``optax.MultiSteps`` calls the
wrapper once per optimizer step, so the average moves once per step too.

The average after ``t`` optimizer steps, with ``p_i`` the params after step ``i`` and
``d`` the decay:

* ``debias=True`` (the default): ``sum_i (1 - d) d^(t-i) p_i / (1 - d^t)``, the weighted
  mean of the params of every step so far (``optax.ema(debias=True)`` applied to the
  params). The initial params weigh nothing, and the first step's average is ``p_1``.
* ``debias=False``: ``avg_1 = p_1``, then ``avg_t = d * avg_(t-1) + (1 - d) * p_t``, the
  formula of Keras's ``use_ema=True`` optimizers.

Both are kept as the average itself, ready to evaluate with: step ``t`` mixes in ``p_t``
with weight ``w_t = (1 - d) / (1 - d^t)`` (debiased) or ``1 - d`` (``w_1 = 1`` in both).
Before the first step the average equals the initial params.

For a schedule-free optimizer the params averaged are its evaluation params
(:func:`hkfit.optimizers.eval_params`), the ones it is meant to be evaluated with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkfit import optimizers as optimizers_lib

PyTree = Any


@dataclass(frozen=True)
class EMA:
    """Options of ``Model(..., ema=...)``: an exponential moving average of the params.

    ``Model(ema=0.999)`` is ``Model(ema=hkfit.EMA(0.999))``.

    Args:
      decay: the weight kept by the average at each optimizer step, in (0, 1); the
        average spans about ``1 / (1 - decay)`` steps.
      debias: ``True`` (the default) averages the params of the steps taken so far with
        weights ``decay^(t - i)``, normalized to sum to 1 (so the initial params weigh
        nothing); ``False`` uses Keras's formula, ``average = decay * average +
        (1 - decay) * params`` after a first step that sets it to the params.

    Raises:
      TypeError: if ``decay`` is not a number or ``debias`` not a bool.
      ValueError: if ``decay`` is not in (0, 1).

    >>> EMA(0.99)
    EMA(decay=0.99, debias=True)
    """

    decay: float
    debias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _checked_decay(self.decay, "decay"))
        if not isinstance(self.debias, (bool, np.bool_)):
            raise TypeError(
                f"Expected `debias` of hkfit.EMA to be True or False. Received: "
                f"debias={self.debias!r}."
            )
        object.__setattr__(self, "debias", bool(self.debias))


def _checked_decay(value: Any, name: str) -> float:
    """``value`` as a float in (0, 1); TypeError / ValueError naming ``name`` otherwise."""
    expected = f"Expected `{name}` to be a decay in (0, 1), e.g. {name}=0.999" + (
        ", or hkfit.EMA(0.999, debias=...)" if name == "ema" else ""
    )
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{expected}. Received: {name}={value!r} of type {type(value).__name__}.")
    decay = float(value)
    if not (math.isfinite(decay) and 0.0 < decay < 1.0):
        raise ValueError(f"{expected}. Received: {name}={value!r}.")
    return decay


def resolve(ema: Any) -> EMA | None:
    """``Model(ema=...)``: None, a decay or an :class:`EMA`, as an :class:`EMA` (or None).

    Raises:
      TypeError / ValueError: naming ``ema``, for anything else or a decay not in (0, 1).

    >>> resolve(0.9)
    EMA(decay=0.9, debias=True)
    >>> resolve(None) is None
    True
    """
    if ema is None or isinstance(ema, EMA):
        return ema
    return EMA(_checked_decay(ema, "ema"))


class EmaState(NamedTuple):
    """The state of an optimizer wrapped by :func:`wrap`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      average: the averaged params (the params' structure, dtypes and layout).
      steps: the number of optimizer steps averaged (int32).
    """

    inner_state: Any
    average: PyTree
    steps: jax.Array


def _copy(params: PyTree) -> PyTree:
    # Own buffers: the train step donates params and optimizer state together.
    return jax.tree_util.tree_map(jnp.copy, params)


def _mix(weight: jax.Array) -> Callable[[Any, Any], Any]:
    def mix(average: Any, new: Any) -> Any:
        if not jnp.issubdtype(jnp.result_type(new), jnp.inexact):
            return new
        w = weight.astype(jnp.result_type(new))
        return (1 - w) * average + w * new  # exactly `new` when w == 1

    return mix


def _weight(ema: EMA, count: jax.Array) -> jax.Array:
    """The weight of the params of step ``count`` (1-based) in the new average (float32)."""
    log_decay = jnp.log1p(jnp.float32(-(1.0 - ema.decay)))  # log(d), accurately
    if ema.debias:  # (1 - d) / (1 - d^t), written so that t = 1 gives exactly 1
        return jnp.expm1(log_decay) / jnp.expm1(count.astype(jnp.float32) * log_decay)
    return jnp.where(count == 1, jnp.float32(1), -jnp.expm1(log_decay))


def wrap(
    optimizer: optax.GradientTransformation, ema: EMA
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` that also keeps an EMA of the params it produces (see module docs).

    Extra arguments of ``update`` (``value=`` for ``optax.contrib.reduce_on_plateau``)
    reach the wrapped optimizer, and the injected learning rates in its state stay
    visible to :mod:`hkfit.optimizers`.

    Args:
      optimizer: the Optax transformation to wrap.
      ema: the averaging options.

    Returns:
      A transformation whose state is an :class:`EmaState`; its ``update`` needs
      ``params``.

    >>> params = {"w": jnp.zeros(2)}
    >>> sgd = wrap(optax.sgd(1.0), EMA(0.5))
    >>> state = sgd.init(params)
    >>> for _ in range(2):
    ...     updates, state = sgd.update({"w": -jnp.ones(2)}, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> float(params["w"][0]), round(float(state.average["w"][0]), 4)  # (0.5 * 1 + 2) / 1.5
    (2.0, 1.6667)
    """
    inner = optax.with_extra_args_support(optimizer)

    def init(params: PyTree) -> EmaState:
        return EmaState(inner.init(params), _copy(params), jnp.zeros((), jnp.int32))

    def update(updates: PyTree, state: EmaState, params: PyTree = None, **extra_args: Any):
        if params is None:
            raise ValueError(
                "The EMA of `Model(ema=...)` averages the params: the optimizer's "
                "`update` needs `params`. Received: params=None."
            )
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        new = optimizers_lib.eval_params(inner_state, optax.apply_updates(params, updates))
        steps = optax.safe_int32_increment(state.steps)
        average = jax.tree_util.tree_map(_mix(_weight(ema, steps)), state.average, new)
        return updates, EmaState(inner_state, average, steps)

    return optax.GradientTransformationExtraArgs(init, update)


def _states(tree: Any) -> Iterator[EmaState]:
    """The EMA states in an optimizer state, depth first (not looking inside them)."""
    if isinstance(tree, EmaState):
        yield tree
    elif isinstance(tree, dict):
        for child in tree.values():
            yield from _states(child)
    elif isinstance(tree, (tuple, list)):
        for child in tree:
            yield from _states(child)


def average(opt_state: Any) -> PyTree | None:
    """The averaged params held in ``opt_state``; None when it holds no EMA.

    >>> params = {"w": jnp.ones(2)}
    >>> average(wrap(optax.sgd(0.1), EMA(0.9)).init(params))
    {'w': Array([1., 1.], dtype=float32)}
    >>> average(optax.sgd(0.1).init(params)) is None
    True
    """
    found = next(_states(opt_state), None)
    return None if found is None else found.average


def restart(opt_state: Any, params: PyTree) -> Any:
    """``opt_state`` whose EMA restarts at ``params`` (0 steps); the rest is kept.

    What ``load_weights`` does: the average then equals the loaded params until the next
    step, as for a model initialized with them.
    """

    def go(node: Any) -> Any:
        if isinstance(node, EmaState):
            return node._replace(average=_copy(params), steps=jnp.zeros_like(node.steps))
        if isinstance(node, dict):
            return type(node)({key: go(child) for key, child in node.items()})
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(go(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(go(child) for child in node)
        return node

    return go(opt_state)
