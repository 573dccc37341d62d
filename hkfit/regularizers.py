"""Parameter regularizers: penalties on the weights added to the training objective.

A regularizer is a pure function ``params -> scalar``; ``Model(..., regularizer=fn)`` adds
its value to the loss of every training batch. The penalties follow Keras's formulas:

* :func:`l2`: ``factor * sum(w ** 2)`` (not ``0.5 * ...``), so its gradient is
  ``2 * factor * w``;
* :func:`l1`: ``factor * sum(|w|)``;
* :func:`l1_l2`: ``l1 * sum(|w|) + l2 * sum(w ** 2)``.

Keras attaches a regularizer to one layer (``kernel_regularizer=``); here one regularizer
sees the whole Haiku params tree and picks its parameters by path. A path is
``"module_name/param_name"``, e.g. ``"mlp/~/linear_1/w"``. By default every parameter is
penalised, biases and normalisation scales included; ``include=r"/w$"`` keeps the weight
matrices and kernels only, the usual choice (Keras's ``kernel_regularizer``).

``include`` and ``exclude`` each take a regular expression (matched with :func:`re.search`
against the path), a list of them (any match counts), or a predicate
``(module_name, param_name, value) -> bool`` as in ``hk.data_structures.filter``. A
parameter is penalised when it matches ``include`` (or ``include`` is ``None``) and does not
match ``exclude``. Regularizers combine with ``+``.

>>> import jax, jax.numpy as jnp
>>> params = {"linear": {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0])}}
>>> float(l2(0.1, include=r"/w$")(params))  # 0.1 * (1 + 4); the bias is left alone
0.5
>>> reg = l2(0.1, include=r"/w$") + l1(0.01)
>>> reg
l2(factor=0.1, include='/w$') + l1(factor=0.01)
>>> round(float(jax.jit(reg)(params)), 4)  # 0.5 + 0.01 * (1 + 2 + 3)
0.56

Note that an L2 penalty in the loss is not the decoupled weight decay of AdamW: with an
adaptive optimizer the two differ. For weight decay use ``optax.adamw`` (or
``optimizer="adamw"``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Regularizer", "l1", "l2", "l1_l2", "get"]

Params = Any  # a Haiku params mapping ``{module_name: {param_name: array}}`` or any pytree
Predicate = Callable[[str, str, jax.Array], bool]
Selector = str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | Predicate | None

_MAX_LISTED_PATHS = 40


def _key_name(key: Any) -> str:
    """The name of one step of a ``jax.tree_util`` key path."""
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves_with_names(params: Params) -> list[tuple[str, str, jax.Array]]:
    """``(module_name, param_name, value)`` for every leaf, in tree order.

    For a Haiku params tree these are exactly the module and parameter names; for a deeper
    pytree the module name joins every key but the last with ``"/"``.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, value in flat:
        names = [_key_name(k) for k in path]
        out.append(("/".join(names[:-1]), names[-1] if names else "", value))
    return out


def _path(module_name: str, param_name: str) -> str:
    return f"{module_name}/{param_name}" if module_name else param_name


@dataclasses.dataclass(frozen=True)
class _Selector:
    """A compiled ``include`` / ``exclude`` argument."""

    arg: str
    spec: Any
    patterns: tuple[re.Pattern[str], ...] | None
    predicate: Predicate | None

    @classmethod
    def build(cls, arg: str, spec: Selector) -> _Selector | None:
        if spec is None:
            return None
        if isinstance(spec, (str, re.Pattern)):
            return cls(
                arg, spec if isinstance(spec, str) else spec.pattern, (_compile(arg, spec),), None
            )
        if isinstance(spec, Sequence):
            items = tuple(spec)
            if not items:
                raise ValueError(
                    f"Expected `{arg}` to hold at least one regular expression. "
                    f"Received: {arg}={spec!r}. Pass None to select every parameter."
                )
            patterns = tuple(_compile(arg, item) for item in items)
            return cls(arg, tuple(p.pattern for p in patterns), patterns, None)
        if callable(spec):
            return cls(arg, spec, None, spec)
        raise TypeError(
            f"Expected `{arg}` to be None, a regular expression string, a list of them, or a "
            "predicate (module_name, param_name, value) -> bool. "
            f"Received: {arg}={spec!r} of type {type(spec).__name__}."
        )

    def matches(self, module_name: str, param_name: str, value: jax.Array) -> bool:
        if self.patterns is not None:
            path = _path(module_name, param_name)
            return any(p.search(path) for p in self.patterns)
        assert self.predicate is not None
        try:
            return bool(self.predicate(module_name, param_name, value))
        except jax.errors.ConcretizationTypeError as e:
            raise TypeError(
                f"The `{self.arg}` predicate must return a Python bool decided from the names, "
                f"shape or dtype, not from the values of the parameter. It returned a traced "
                f"value for {_path(module_name, param_name)!r}."
            ) from e

    def __repr__(self) -> str:
        if self.predicate is not None:
            return getattr(self.predicate, "__qualname__", None) or repr(self.predicate)
        return repr(list(self.spec)) if isinstance(self.spec, tuple) else repr(self.spec)


def _compile(arg: str, pattern: Any) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(
            f"Expected every item of `{arg}` to be a regular expression string. "
            f"Received: {pattern!r} of type {type(pattern).__name__}."
        )
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"Expected `{arg}` to be a valid regular expression. Received: {arg}={pattern!r} ({e})."
        ) from e


def _check_factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Expected `{name}` to be a float >= 0. "
            f"Received: {name}={value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected `{name}` to be a finite float >= 0. Received: {name}={value}.")
    return value


@dataclasses.dataclass(frozen=True, repr=False)
class _Penalty:
    """``l1 * sum(|w|) + l2 * sum(w ** 2)`` over the selected parameters."""

    kind: str  # "l1", "l2" or "l1_l2": how the penalty prints
    l1: float
    l2: float
    include: _Selector | None
    exclude: _Selector | None

    def select(self, params: Params) -> list[jax.Array]:
        leaves = _leaves_with_names(params)
        chosen = [
            value
            for module, name, value in leaves
            if (self.include is None or self.include.matches(module, name, value))
            and (self.exclude is None or not self.exclude.matches(module, name, value))
        ]
        if not chosen and self.include is not None:
            paths = [_path(m, n) for m, n, _ in leaves]
            listed = ", ".join(repr(p) for p in paths[:_MAX_LISTED_PATHS])
            if len(paths) > _MAX_LISTED_PATHS:
                listed += f", ... ({len(paths) - _MAX_LISTED_PATHS} more)"
            selection = f"include={self.include!r}"
            if self.exclude is not None:
                selection += f", exclude={self.exclude!r}"
            raise ValueError(
                f"Expected {self!r} to select at least one parameter, but {selection} matched "
                f"none. Paths are 'module_name/param_name'; available paths: "
                f"[{listed or 'none: the params tree is empty'}]."
            )
        return chosen

    def __call__(self, params: Params) -> jax.Array:
        total = jnp.zeros((), jnp.float32)
        for w in self.select(params):
            w = jnp.asarray(w).astype(jnp.float32)
            if self.l1:
                total = total + self.l1 * jnp.sum(jnp.abs(w))
            if self.l2:
                total = total + self.l2 * jnp.sum(jnp.square(w))
        return total

    def __repr__(self) -> str:
        if self.kind == "l1_l2":
            args = [f"l1={self.l1}", f"l2={self.l2}"]
        else:
            args = [f"factor={self.l1 if self.kind == 'l1' else self.l2}"]
        if self.include is not None:
            args.append(f"include={self.include!r}")
        if self.exclude is not None:
            args.append(f"exclude={self.exclude!r}")
        return f"{self.kind}({', '.join(args)})"


RegularizerFn = Callable[[Params], jax.typing.ArrayLike]


@dataclasses.dataclass(frozen=True, repr=False)
class Regularizer:
    """A sum of penalties on a params tree: ``regularizer(params) -> float32 scalar``.

    Built by :func:`l1`, :func:`l2` and :func:`l1_l2`; ``a + b`` is the regularizer whose
    value is ``a(params) + b(params)``, and a plain callable ``params -> scalar`` may take
    part in the sum. Calling it is pure, jit-able and differentiable.

    Attributes:
      terms: the penalties that are summed, each a callable ``params -> scalar``.

    >>> params = {"linear": {"w": jnp.array([1.0, 2.0])}}
    >>> reg = l1(0.5) + (lambda p: 1.0)
    >>> float(reg(params))  # 0.5 * 3 + 1
    2.5
    >>> float(sum([l1(0.5), l2(0.5)])(params))  # sum() works too: 1.5 + 2.5
    4.0
    """

    terms: tuple[RegularizerFn, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.terms, tuple) or not all(callable(t) for t in self.terms):
            raise TypeError(
                "Expected `terms` to be a tuple of callables params -> scalar. "
                f"Received: terms={self.terms!r}."
            )

    def __call__(self, params: Params) -> jax.Array:
        """Returns the sum of the penalties on ``params`` as a float32 scalar."""
        total = jnp.zeros((), jnp.float32)
        for term in self.terms:
            value = jnp.asarray(term(params), jnp.float32)
            if value.shape != ():
                raise ValueError(
                    f"Expected the regularizer term {_term_repr(term)} to return a scalar. "
                    f"Received: a value of shape {value.shape}."
                )
            total = total + value
        return total

    def __add__(self, other: Any) -> Regularizer:
        if isinstance(other, Regularizer):
            return Regularizer(self.terms + other.terms)
        if callable(other):
            return Regularizer(self.terms + (other,))
        return NotImplemented

    def __radd__(self, other: Any) -> Regularizer:
        if type(other) is int and other == 0:  # the start value of sum()
            return self
        if callable(other):
            return Regularizer((other,) + self.terms)
        return NotImplemented

    def __repr__(self) -> str:
        if not self.terms:
            return "Regularizer(terms=())"
        return " + ".join(_term_repr(t) for t in self.terms)


def _term_repr(term: Any) -> str:
    if isinstance(term, (_Penalty, Regularizer)):
        return repr(term)
    return getattr(term, "__qualname__", None) or repr(term)


def _penalty(kind: str, l1: float, l2: float, include: Selector, exclude: Selector) -> Regularizer:
    penalty = _Penalty(
        kind, l1, l2, _Selector.build("include", include), _Selector.build("exclude", exclude)
    )
    return Regularizer((penalty,))


def l2(factor: float = 0.01, *, include: Selector = None, exclude: Selector = None) -> Regularizer:
    """L2 penalty ``factor * sum(w ** 2)`` over the selected parameters (Keras's ``L2``).

    Its gradient is ``2 * factor * w`` on the selected parameters and 0 elsewhere.

    Args:
      factor: the weight of the penalty, a finite float >= 0.
      include: which parameters to penalise, by path ``"module_name/param_name"``: a regular
        expression (:func:`re.search`), a list of them (any match), or a predicate
        ``(module_name, param_name, value) -> bool``. ``None`` (default) selects every
        parameter; ``r"/w$"`` selects weights only, leaving biases out.
      exclude: parameters to leave out, in the same forms; applied after ``include``.

    Returns:
      A :class:`Regularizer`. Calling it raises ``ValueError`` listing the available paths
      when ``include`` (with ``exclude``) selects no parameter.

    Raises:
      TypeError: if ``factor`` is not a real number, or ``include`` / ``exclude`` has
        another type.
      ValueError: if ``factor`` is negative or not finite, or a pattern is not a valid
        regular expression.

    >>> params = {"mlp/~/linear_0": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}}
    >>> float(l2(0.5)(params))  # 0.5 * (6 + 3)
    4.5
    >>> float(l2(0.5, exclude=r"/b$")(params))  # weights only
    3.0
    """
    return _penalty("l2", 0.0, _check_factor("factor", factor), include, exclude)


def l1(factor: float = 0.01, *, include: Selector = None, exclude: Selector = None) -> Regularizer:
    """L1 penalty ``factor * sum(|w|)`` over the selected parameters (Keras's ``L1``).

    Args:
      factor: the weight of the penalty, a finite float >= 0.
      include: which parameters to penalise; see :func:`l2`. ``None`` selects every
        parameter, ``r"/w$"`` weights only.
      exclude: parameters to leave out; see :func:`l2`.

    Returns:
      A :class:`Regularizer`.

    Raises:
      TypeError: if ``factor`` is not a real number, or ``include`` / ``exclude`` has
        another type.
      ValueError: if ``factor`` is negative or not finite, or a pattern is not a valid
        regular expression.

    >>> params = {"linear": {"w": jnp.array([-1.0, 2.0]), "b": jnp.array([4.0])}}
    >>> float(l1(0.5, include=lambda module, name, value: name == "w")(params))
    1.5
    """
    return _penalty("l1", _check_factor("factor", factor), 0.0, include, exclude)


def l1_l2(
    l1: float = 0.01, l2: float = 0.01, *, include: Selector = None, exclude: Selector = None
) -> Regularizer:
    """Both penalties: ``l1 * sum(|w|) + l2 * sum(w ** 2)`` (Keras's ``L1L2``).

    Args:
      l1: the weight of the L1 penalty, a finite float >= 0.
      l2: the weight of the L2 penalty, a finite float >= 0.
      include: which parameters to penalise; see :func:`l2`.
      exclude: parameters to leave out; see :func:`l2`.

    Returns:
      A :class:`Regularizer`.

    Raises:
      TypeError: if ``l1`` or ``l2`` is not a real number, or ``include`` / ``exclude`` has
        another type.
      ValueError: if ``l1`` or ``l2`` is negative or not finite, or a pattern is not a valid
        regular expression.

    >>> params = {"linear": {"w": jnp.array([-1.0, 2.0])}}
    >>> float(l1_l2(0.5, 0.25)(params))  # 0.5 * 3 + 0.25 * 5
    2.75
    """
    return _penalty("l1_l2", _check_factor("l1", l1), _check_factor("l2", l2), include, exclude)


def get(regularizer: Regularizer | RegularizerFn | None) -> Regularizer | RegularizerFn | None:
    """Resolves the ``regularizer`` argument of ``Model``.

    Args:
      regularizer: ``None`` (no penalty), a :class:`Regularizer`, or any callable
        ``params -> scalar``.

    Returns:
      ``regularizer`` itself.

    Raises:
      TypeError: for anything else.

    >>> get(None) is None
    True
    >>> reg = l2(1e-4)
    >>> get(reg) is reg
    True
    """
    if regularizer is None or callable(regularizer):
        return regularizer
    hint = ""
    if isinstance(regularizer, str) and regularizer in ("l1", "l2", "l1_l2"):
        hint = f" Use hkfit.regularizers.{regularizer}() instead of the name."
    raise TypeError(
        "Expected `regularizer` to be None, a Regularizer (e.g. hkfit.regularizers.l2(1e-4)) "
        "or a callable params -> scalar. "
        f"Received: regularizer={regularizer!r} of type {type(regularizer).__name__}.{hint}"
    )
