"""Mixed precision: ``Model(precision=...)``, on jmp and ``hk.mixed_precision``.

A policy (a ``jmp.Policy``) says in which dtype parameters are stored, computations run
and outputs are returned. ``"mixed_bfloat16"`` and ``"mixed_float16"`` store parameters
in float32, compute in the half type and return float32 outputs, so the loss, the
metrics and ``predict`` see float32. ``"float32"`` (the default) changes nothing: the
forward, the steps and the optimizer state are exactly those of a model without a
precision.

The policy is applied inside the forward function that hkfit transforms (:func:`scoped`):

* the inputs' floating leaves are cast to the compute dtype, the outputs' to the output
  dtype;
* a Haiku parameter creator makes floating parameters in the parameter dtype and a
  parameter getter casts them to the compute dtype where a module reads them (public
  ``hk.custom_creator`` / ``hk.custom_getter``), so parameter names are those of the
  float32 model and its checkpoints load into a mixed model and back;
* normalization modules (``hk.BatchNorm``, ``hk.LayerNorm``, ``hk.InstanceNorm``,
  ``hk.GroupNorm``, ``hk.RMSNorm``) get a float32 policy through
  ``hk.mixed_precision.push_policy``: float32 parameters, state and statistics, and the
  compute dtype as output, so the layers after them still compute in the half type (as
  in dm-haiku's ImageNet example). A class that already has a policy
  (``hk.mixed_precision.set_policy``) keeps it. The policies are pushed around each
  call of the forward and popped after it, so no global policy is left changed for
  other models in the process; the parameter creator and getter leave the modules that
  run under a Haiku policy to that policy (``hk.mixed_precision.current_policy()``).

float16 has a narrow range: small gradients flush to zero and large ones overflow. A
policy that computes in float16 therefore trains with dynamic loss scaling
(:class:`LossScaling`, on ``jmp.DynamicLossScale``): the objective is multiplied by the
loss scale before the gradient, the gradients are divided by it, and a step whose
gradients are not all finite is skipped (params, Haiku state and optimizer state stay as
they were) and halves the scale; after ``period`` finite steps in a row the scale
doubles. The scale lives in the optimizer state (:class:`LossScaleState`, made by
:meth:`LossScaling.wrap`), so it is checkpointed, placed and resumed with it.

jmp is an optional dependency (``pip install "hkfit[mixed]"``), imported only here and
only when a policy other than ``"float32"`` is used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from hkfit import _forward as forward_lib
from hkfit.step import TrainState

PyTree = Any

FLOAT32 = "float32"
NAMES = (FLOAT32, "mixed_bfloat16", "mixed_float16")
_HALF = {"mixed_bfloat16": jnp.bfloat16, "mixed_float16": jnp.float16}

# Normalization layers that compute in float32 under every mixed policy.
NORMALIZATION = ("BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "RMSNorm")


def _jmp() -> Any:
    try:
        import jmp
    except ImportError as e:  # rare: dm-haiku depends on jmp too
        raise ImportError(
            "Mixed precision (`Model(precision=...)` other than 'float32') needs jmp. "
            'Install it with `pip install "hkfit[mixed]"` (or `pip install jmp`).'
        ) from e
    return jmp


class Precision(NamedTuple):
    """A resolved ``precision=``: the policy, and the loss scaling of float16 compute."""

    policy: Any  # jmp.Policy
    loss_scaling: LossScaling | None


def get(precision: Any) -> Precision | None:
    """Resolves ``Model(precision=...)``; ``None`` for ``"float32"`` (nothing changes).

    Args:
      precision: ``"float32"``, ``"mixed_bfloat16"``, ``"mixed_float16"`` or a
        ``jmp.Policy``. A policy whose compute dtype is float16 trains with dynamic loss
        scaling.

    Raises:
      ValueError: for an unknown name.
      TypeError: for anything that is neither a name nor a ``jmp.Policy``.

    >>> get("float32") is None
    True
    >>> str(get("mixed_bfloat16").policy), get("mixed_bfloat16").loss_scaling is None
    ('p=full,c=bf16,o=full', True)
    >>> get("mixed_float16").loss_scaling
    LossScaling(initial=32768.0, period=2000, factor=2, minimum=1.0)
    """
    accepted = f"one of {list(NAMES)} or a jmp.Policy"
    if isinstance(precision, str):
        if precision == FLOAT32:
            return None
        if precision not in _HALF:
            raise ValueError(
                f"Unknown `precision`. Expected {accepted}. Received: precision={precision!r}."
            )
        jmp = _jmp()
        policy = jmp.Policy(
            param_dtype=jnp.float32, compute_dtype=_HALF[precision], output_dtype=jnp.float32
        )
    else:
        try:
            policy_type: Any = _jmp().Policy
        except ImportError:  # no jmp: `precision` cannot be a jmp.Policy
            policy_type = None
        if policy_type is None or not isinstance(precision, policy_type):
            raise TypeError(
                f"Expected `precision` to be {accepted}. Received: precision={precision!r} "
                f"of type {type(precision).__name__}."
            )
        policy = precision
    float16 = jnp.dtype(policy.compute_dtype) == jnp.dtype(jnp.float16)
    return Precision(policy, LossScaling() if float16 else None)


def name(precision: Any) -> str:
    """How ``precision`` is shown in messages."""
    return repr(precision) if isinstance(precision, str) else str(precision)


# --- The forward ------------------------------------------------------------------------


def _floating(dtype: Any) -> bool:
    return dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)


def normalization_policy(policy: Any) -> Any:
    """float32 parameters and compute, the compute dtype of ``policy`` as output."""
    return _jmp().Policy(
        param_dtype=jnp.float32, compute_dtype=jnp.float32, output_dtype=policy.compute_dtype
    )


def _normalization_classes() -> list[type]:
    return [getattr(hk, n) for n in NORMALIZATION if hasattr(hk, n)]


def scoped(forward: Any, precision: Precision, shown: Any = None) -> Callable:
    """``forward`` (a function using Haiku modules) running under ``precision.policy``.

    The result takes the same arguments (its signature is ``forward``'s, so an
    ``is_training`` parameter is still seen) and is transformed by hkfit like any
    forward. See the module docs for what the policy does.

    Raises:
      ValueError: if ``forward`` is a Haiku transform (or :func:`hkfit.with_is_training`
        of one): its parameters are read inside its own ``apply``, out of reach.
    """
    transforms = (hk.Transformed, hk.TransformedWithState, forward_lib.TrainingFlag)
    if isinstance(forward, (*transforms, forward_lib.Forward)):
        raise ValueError(
            f"`precision={name(shown)}` runs the forward function under its policy, so it "
            "needs the function itself, not a Haiku transform. Received: forward of type "
            f"{type(forward).__name__}. Pass the function you transformed (hkfit applies "
            "hk.transform_with_state, and gives `is_training` to a function that declares "
            "it), or keep precision='float32' and set policies on your module classes "
            "with hk.mixed_precision.set_policy."
        )
    policy = precision.policy
    norm_policy = normalization_policy(policy)

    def creator(next_creator, shape, dtype, init, context):
        del context
        if hk.mixed_precision.current_policy() is None and _floating(dtype):
            dtype = policy.param_dtype  # a module under a Haiku policy: left to it
        return next_creator(shape, dtype, init)

    def getter(next_getter, value, context):
        del context
        if hk.mixed_precision.current_policy() is None:
            value = policy.cast_to_compute(value)
        return next_getter(value)

    @functools.wraps(forward)
    def run(x, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for cls in _normalization_classes():
                if hk.mixed_precision.get_policy(cls) is None:  # keep the user's own
                    stack.enter_context(hk.mixed_precision.push_policy(cls, norm_policy))
            stack.enter_context(hk.custom_creator(creator))
            stack.enter_context(hk.custom_getter(getter))
            y = forward(policy.cast_to_compute(x), *args, **kwargs)
            return policy.cast_to_output(y)

    return run


# --- Loss scaling -----------------------------------------------------------------------


class LossScaleState(NamedTuple):
    """Optimizer state of :meth:`LossScaling.wrap`: the loss scale and the wrapped state.

    Attributes:
      loss_scale: the dynamic loss scale (float32 scalar).
      counter: finite steps since the scale last changed (int32 scalar).
      inner_state: the wrapped optimizer's state.
    """

    loss_scale: jax.Array
    counter: jax.Array
    inner_state: PyTree


class LossScaling(NamedTuple):
    """Dynamic loss scaling: Keras's defaults (start at 2**15, double every 2000 steps).

    Attributes:
      initial: the first loss scale.
      period: finite steps in a row after which the scale is multiplied by ``factor``.
      factor: what the scale is multiplied by (after ``period`` finite steps) or divided
        by (after a step with a non-finite gradient).
      minimum: the scale never goes below this.
    """

    initial: float = 2.0**15
    period: int = 2000
    factor: int = 2
    minimum: float = 1.0

    def wrap(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        """``optimizer`` with the loss scale kept in its state (:class:`LossScaleState`).

        Its ``update`` passes through to ``optimizer`` (extra arguments such as
        ``value=`` included) and leaves the scale alone: the training step reads and
        adjusts it (:meth:`current`, :meth:`select`).
        """
        inner = optax.with_extra_args_support(optimizer)

        def init(params):
            return LossScaleState(
                jnp.asarray(self.initial, jnp.float32), jnp.zeros((), jnp.int32), inner.init(params)
            )

        def update(updates, state, params=None, **extra_args):
            updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
            return updates, state._replace(inner_state=inner_state)

        return optax.GradientTransformationExtraArgs(init, update)

    def current(self, opt_state: PyTree) -> Any:
        """The ``jmp.DynamicLossScale`` held in ``opt_state``.

        Raises:
          ValueError: if ``opt_state`` holds no :class:`LossScaleState`.
        """
        state = find_state(opt_state)
        if state is None:
            raise ValueError(
                "Expected an optimizer state made by a loss-scaled optimizer (float16 "
                f"compute). Received: an optimizer state of type {type(opt_state).__name__}."
            )
        return _jmp().DynamicLossScale(
            loss_scale=state.loss_scale,
            counter=state.counter,
            period=self.period,
            factor=self.factor,
            min_loss_scale=jnp.asarray(self.minimum, jnp.float32),
        )

    def finite(self, grads: PyTree) -> jax.Array:
        """Whether every gradient is finite (a boolean scalar)."""
        return _jmp().all_finite(grads)

    def select(self, old: TrainState, new: TrainState, finite: jax.Array) -> TrainState:
        """``new`` if the step's gradients were ``finite``, else ``old``; the scale adjusted.

        A skipped step keeps the params, the Haiku state and the optimizer state of
        ``old`` bit for bit (only the loss scale and its counter change); ``rng`` and
        ``step`` are those of ``new``.
        """
        jmp = _jmp()
        scale = self.current(old.opt_state).adjust(finite)
        params, state, opt_state = jmp.select_tree(
            finite,
            (new.params, new.state, new.opt_state),
            (old.params, old.state, old.opt_state),
        )
        opt_state = _replace_state(
            opt_state, lambda s: s._replace(loss_scale=scale.loss_scale, counter=scale.counter)
        )
        return new._replace(params=params, state=state, opt_state=opt_state)


def find_state(tree: PyTree) -> LossScaleState | None:
    """The first :class:`LossScaleState` in an optimizer state, depth first."""
    if isinstance(tree, LossScaleState):
        return tree
    children = tree.values() if isinstance(tree, dict) else tree
    if isinstance(tree, (dict, tuple, list)):
        for child in children:
            found = find_state(child)
            if found is not None:
                return found
    return None


def _replace_state(tree: PyTree, change: Callable[[LossScaleState], LossScaleState]) -> PyTree:
    """``tree`` with its first :class:`LossScaleState` (depth first) changed."""
    done = False

    def go(node: Any) -> Any:
        nonlocal done
        if done:
            return node
        if isinstance(node, LossScaleState):
            done = True
            return change(node)
        if isinstance(node, dict):
            return type(node)({k: go(v) for k, v in node.items()})
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(go(v) for v in node))
        if isinstance(node, (tuple, list)):
            return type(node)(go(v) for v in node)
        return node

    return go(tree)


def loss_scale(opt_state: PyTree) -> float | None:
    """The loss scale held in ``opt_state`` as a Python float; ``None`` when it has none.

    >>> import jax.numpy as jnp, optax
    >>> optimizer = LossScaling().wrap(optax.sgd(0.1))
    >>> loss_scale(optimizer.init({"w": jnp.zeros(2)}))
    32768.0
    >>> loss_scale(optax.sgd(0.1).init({"w": jnp.zeros(2)})) is None
    True
    """
    state = find_state(opt_state)
    return None if state is None else float(state.loss_scale)
