"""Keras-compatible loss objects built on ``optax.losses``.

Each object is a callable ``(y_true, y_pred) -> per-example losses``, following hkfit's loss
convention: the batch is never reduced (the training step applies sample weights and masks).
Only the axis a loss is defined over is reduced, as Keras does with ``axis=-1``: the class
axis of crossentropies, the feature axis of elementwise losses (averaged). Any other axes are
kept, so ``[batch, seq]`` labels with ``[batch, seq, vocab]`` outputs give ``[batch, seq]``
losses, ready for per-token weights. Elementwise losses on ``[batch]`` arrays treat each row
as one value and return ``[batch]``.

As in Keras, the crossentropies take probabilities unless ``from_logits=True``;
probabilities are clipped to ``[1e-7, 1 - 1e-7]`` before their logarithm is taken.

>>> import jax.numpy as jnp
>>> loss = SparseCategoricalCrossentropy(from_logits=True)
>>> loss
SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.0, ignore_class=None)
>>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
>>> [round(float(v), 4) for v in loss(jnp.array([0, 1]), logits)]
[0.1269, 0.1269]
>>> MeanSquaredError()(jnp.zeros((2, 3, 4)), jnp.ones((2, 3, 4))).shape
(2, 3)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

EPSILON = 1e-7
"""Keras's ``backend.epsilon()``: the clipping bound for probabilities."""

__all__ = [
    "SparseCategoricalCrossentropy",
    "CategoricalCrossentropy",
    "BinaryCrossentropy",
    "BinaryFocalCrossentropy",
    "CategoricalFocalCrossentropy",
    "Hinge",
    "SquaredHinge",
    "CategoricalHinge",
    "KLDivergence",
    "Poisson",
    "CosineSimilarity",
    "LogCosh",
    "Huber",
    "MeanSquaredError",
    "MeanAbsoluteError",
    "MeanSquaredLogarithmicError",
    "is_loss_object",
    "looks_like_probabilities",
]


# ----------------------------------------------------------------------------- argument checks


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Expected `{name}` to be a bool. Received: {name}={value!r} of type "
            f"{type(value).__name__}."
        )
    return bool(value)


def _check_number(
    name: str, value: Any, *, low: float, high: float | None = None, open_low: bool = False
) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Expected `{name}` to be a number. Received: {name}={value!r} of type "
            f"{type(value).__name__}."
        )
    number = float(value)
    too_low = number <= low if open_low else number < low
    if too_low or (high is not None and number > high) or number != number:
        if high is not None:
            expected = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
        else:
            expected = f"{'>' if open_low else '>='} {low:g}"
        raise ValueError(f"Expected `{name}` {expected}. Received: {name}={value!r}.")
    return number


# ----------------------------------------------------------------------------- array helpers


def _floats(y_pred: jax.typing.ArrayLike) -> jax.Array:
    """``y_pred`` as a floating array (integers become the default float dtype)."""
    y_pred = jnp.asarray(y_pred)
    if not jnp.issubdtype(y_pred.dtype, jnp.floating):
        y_pred = jnp.asarray(y_pred, dtype=float)
    return y_pred


def _pair(
    loss: _LossObject, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Casts ``y_true`` to ``y_pred``'s dtype and lines up a trailing unit axis.

    ``[batch]`` labels meet ``[batch, 1]`` outputs (and back); any other shape difference
    is an error rather than a silent broadcast.
    """
    y_pred = _floats(y_pred)
    y_true = jnp.asarray(y_true).astype(y_pred.dtype)
    if y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
        y_true = y_true[..., None]
    elif y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
        y_true = y_true[..., 0]
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"Expected `y_true` and `y_pred` of the same shape for {loss.name}. Received: "
            f"y_true.shape={tuple(y_true.shape)}, y_pred.shape={tuple(y_pred.shape)}."
        )
    return y_true, y_pred


def _check_class_axis(loss: _LossObject, y_pred: jax.Array) -> None:
    if y_pred.ndim < 2:
        raise ValueError(
            f"Expected `y_pred` of shape [batch, ..., classes] for {loss.name}. Received: "
            f"y_pred.shape={tuple(y_pred.shape)}."
        )


def _mean_last(values: jax.Array) -> jax.Array:
    """Averages the feature axis; ``[batch]`` values are one value per row already."""
    return values if values.ndim <= 1 else jnp.mean(values, axis=-1)


def _clipped_log_probs(probs: jax.Array) -> jax.Array:
    """Keras's categorical path: renormalize rows, clip to ``[eps, 1 - eps]``, take logs."""
    probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return jnp.log(jnp.clip(probs, EPSILON, 1.0 - EPSILON))


def _categorical_crossentropy(
    targets: jax.Array, y_pred: jax.Array, from_logits: bool
) -> jax.Array:
    if from_logits:
        return optax.losses.softmax_cross_entropy(y_pred, targets)
    return -jnp.sum(targets * _clipped_log_probs(y_pred), axis=-1)


def _binary_crossentropy(y_true: jax.Array, y_pred: jax.Array, from_logits: bool) -> jax.Array:
    if from_logits:
        return optax.losses.sigmoid_binary_cross_entropy(y_pred, y_true)
    probs = jnp.clip(y_pred, EPSILON, 1.0 - EPSILON)
    return -(y_true * jnp.log(probs) + (1.0 - y_true) * jnp.log(1.0 - probs))


def _hinge_labels(y_true: jax.Array) -> jax.Array:
    """Keras's conversion: labels that are all in {0, 1} become {-1, 1}; others stay."""
    is_binary = jnp.all((y_true == 0) | (y_true == 1))
    return jnp.where(is_binary, 2.0 * y_true - 1.0, y_true)


# ----------------------------------------------------------------------------- base class


class _LossObject:
    """Shared ``name``, ``__repr__``, ``get_config`` and equality of the loss objects."""

    name: str = ""
    _fields: tuple[str, ...] = ()

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self._fields}

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments and ``name``, as Keras's ``Loss.get_config``."""
        return {"name": self.name, **self._config()}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.get_config() == other.get_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self._config().items())))


class _ProbabilisticLoss(_LossObject):
    _fields: tuple[str, ...] = ("from_logits", "label_smoothing")

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0) -> None:
        self.from_logits = _check_bool("from_logits", from_logits)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing, low=0, high=1)


# ----------------------------------------------------------------------------- crossentropies


class SparseCategoricalCrossentropy(_ProbabilisticLoss):
    """Crossentropy between integer labels and class probabilities (or logits).

    Labels of shape ``[batch, ...]`` (or ``[batch, ..., 1]``) meet outputs of shape
    ``[batch, ..., classes]``; the result has the labels' shape ``[batch, ...]``.

    Args:
        from_logits: whether ``y_pred`` holds logits; by default (as in Keras) it holds
            probabilities, which are renormalized and clipped to ``[1e-7, 1 - 1e-7]``.
        label_smoothing: in ``[0, 1]``; the one-hot targets become
            ``onehot * (1 - label_smoothing) + label_smoothing / classes``.
        ignore_class: a label value (e.g. ``-100`` for padding tokens) whose rows or tokens
            get loss 0. For an exact mean over the other tokens, also give those tokens
            weight 0, since the step divides by the sum of weights.

    Raises:
        TypeError: for a non-bool ``from_logits``, a non-number ``label_smoothing`` or a
            non-int ``ignore_class``.
        ValueError: for ``label_smoothing`` outside ``[0, 1]``, and at call time for labels
            whose shape is not ``y_pred.shape[:-1]``.
    """

    name = "sparse_categorical_crossentropy"
    _fields = ("from_logits", "label_smoothing", "ignore_class")

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        ignore_class: int | None = None,
    ) -> None:
        super().__init__(from_logits, label_smoothing)
        if ignore_class is not None and (
            isinstance(ignore_class, (bool, np.bool_))
            or not isinstance(ignore_class, numbers.Integral)
        ):
            raise TypeError(
                "Expected `ignore_class` to be an int or None. Received: "
                f"ignore_class={ignore_class!r} of type {type(ignore_class).__name__}."
            )
        self.ignore_class = None if ignore_class is None else int(ignore_class)

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_pred = _floats(y_pred)
        _check_class_axis(self, y_pred)
        labels = jnp.asarray(y_true)
        if labels.ndim == y_pred.ndim and labels.shape[-1] == 1:
            labels = labels[..., 0]
        if labels.shape != y_pred.shape[:-1]:
            raise ValueError(
                "Expected integer labels of shape y_pred.shape[:-1] for "
                f"{self.name}. Received: y_true.shape={tuple(jnp.shape(y_true))}, "
                f"y_pred.shape={tuple(y_pred.shape)}."
            )
        labels = labels.astype(jnp.int32)
        if self.ignore_class is not None:
            valid = labels != self.ignore_class
            labels = jnp.where(valid, labels, 0)
        if self.label_smoothing:
            targets = jax.nn.one_hot(labels, y_pred.shape[-1], dtype=y_pred.dtype)
            targets = jnp.asarray(optax.losses.smooth_labels(targets, self.label_smoothing))
            losses = _categorical_crossentropy(targets, y_pred, self.from_logits)
        elif self.from_logits:
            losses = optax.losses.softmax_cross_entropy_with_integer_labels(y_pred, labels)
        else:
            log_probs = _clipped_log_probs(y_pred)
            losses = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        if self.ignore_class is not None:
            losses = jnp.where(valid, losses, 0.0)
        return losses


class CategoricalCrossentropy(_ProbabilisticLoss):
    """Crossentropy between one-hot (or soft) labels and class probabilities (or logits).

    Args:
        from_logits: whether ``y_pred`` holds logits; by default it holds probabilities,
            which are renormalized and clipped to ``[1e-7, 1 - 1e-7]``.
        label_smoothing: in ``[0, 1]``; labels become
            ``y_true * (1 - label_smoothing) + label_smoothing / classes``.

    Returns ``[batch, ...]`` losses for ``[batch, ..., classes]`` inputs of equal shape.
    """

    name = "categorical_crossentropy"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        _check_class_axis(self, y_pred)
        if self.label_smoothing:
            y_true = jnp.asarray(optax.losses.smooth_labels(y_true, self.label_smoothing))
        return _categorical_crossentropy(y_true, y_pred, self.from_logits)


class BinaryCrossentropy(_ProbabilisticLoss):
    """Crossentropy of independent binary predictions, averaged over the last axis.

    ``[batch]``, ``[batch, 1]`` and ``[batch, k]`` inputs give ``[batch]`` losses (a
    ``[batch]`` array is one value per row); ``[batch, seq, k]`` gives ``[batch, seq]``.

    Args:
        from_logits: whether ``y_pred`` holds logits; by default it holds probabilities,
            clipped to ``[1e-7, 1 - 1e-7]``.
        label_smoothing: in ``[0, 1]``; labels become
            ``y_true * (1 - label_smoothing) + 0.5 * label_smoothing``.
    """

    name = "binary_crossentropy"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        if self.label_smoothing:
            y_true = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return _mean_last(_binary_crossentropy(y_true, y_pred, self.from_logits))


class BinaryFocalCrossentropy(_ProbabilisticLoss):
    """Binary crossentropy scaled by ``(1 - p_t) ** gamma``, averaged over the last axis.

    Shapes as :class:`BinaryCrossentropy`. With ``gamma=0`` and no class balancing it equals
    :class:`BinaryCrossentropy`.

    Args:
        gamma: the focusing exponent, ``>= 0``.
        alpha: the weight of class 1 (class 0 gets ``1 - alpha``), in ``[0, 1]``; used only
            when ``apply_class_balancing`` is true, as in Keras.
        apply_class_balancing: whether to weight the classes by ``alpha``.
        from_logits: whether ``y_pred`` holds logits rather than probabilities.
        label_smoothing: in ``[0, 1]``, applied as in :class:`BinaryCrossentropy`.
    """

    name = "binary_focal_crossentropy"
    _fields = ("gamma", "alpha", "apply_class_balancing", "from_logits", "label_smoothing")

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float = 0.25,
        apply_class_balancing: bool = False,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(from_logits, label_smoothing)
        self.gamma = _check_number("gamma", gamma, low=0)
        self.alpha = _check_number("alpha", alpha, low=0, high=1)
        self.apply_class_balancing = _check_bool("apply_class_balancing", apply_class_balancing)

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        if self.label_smoothing:
            y_true = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        alpha = self.alpha if self.apply_class_balancing else None
        if self.from_logits:
            losses = optax.losses.sigmoid_focal_loss(y_pred, y_true, alpha=alpha, gamma=self.gamma)
        else:
            probs = jnp.clip(y_pred, EPSILON, 1.0 - EPSILON)
            one_minus_p_t = y_true * (1.0 - probs) + (1.0 - y_true) * probs
            losses = jnp.power(one_minus_p_t, self.gamma) * _binary_crossentropy(
                y_true, probs, from_logits=False
            )
            if alpha is not None:
                losses = (y_true * alpha + (1.0 - y_true) * (1.0 - alpha)) * losses
        return _mean_last(losses)


class CategoricalFocalCrossentropy(_ProbabilisticLoss):
    """Categorical crossentropy scaled by ``alpha * (1 - p) ** gamma`` per class (Keras).

    Shapes as :class:`CategoricalCrossentropy`. With ``gamma=0`` it equals ``alpha`` times
    :class:`CategoricalCrossentropy`. From logits the log-probabilities are exact
    (``log_softmax``); only the focusing factor uses clipped probabilities.

    Args:
        alpha: a weight ``>= 0`` for all classes, or a sequence of one weight per class.
        gamma: the focusing exponent, ``>= 0``.
        from_logits: whether ``y_pred`` holds logits rather than probabilities.
        label_smoothing: in ``[0, 1]``, applied as in :class:`CategoricalCrossentropy`.
    """

    name = "categorical_focal_crossentropy"
    _fields = ("alpha", "gamma", "from_logits", "label_smoothing")

    def __init__(
        self,
        alpha: float | Sequence[float] = 0.25,
        gamma: float = 2.0,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(from_logits, label_smoothing)
        self.alpha: float | tuple[float, ...]
        if isinstance(alpha, (Sequence, np.ndarray)) and np.ndim(alpha) == 1:
            self.alpha = tuple(_check_number("alpha", a, low=0) for a in alpha)
        else:
            self.alpha = _check_number("alpha", alpha, low=0)
        self.gamma = _check_number("gamma", gamma, low=0)

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        _check_class_axis(self, y_pred)
        if isinstance(self.alpha, tuple) and len(self.alpha) != y_pred.shape[-1]:
            raise ValueError(
                f"Expected one `alpha` per class ({y_pred.shape[-1]} classes). Received: "
                f"alpha={self.alpha!r}."
            )
        if self.label_smoothing:
            y_true = jnp.asarray(optax.losses.smooth_labels(y_true, self.label_smoothing))
        if self.from_logits:
            log_probs = jax.nn.log_softmax(y_pred, axis=-1)
            probs = jnp.clip(jnp.exp(log_probs), EPSILON, 1.0 - EPSILON)
        else:
            log_probs = _clipped_log_probs(y_pred)
            probs = jnp.exp(log_probs)
        alpha = jnp.asarray(self.alpha, dtype=y_pred.dtype)
        focal = alpha * jnp.power(1.0 - probs, self.gamma) * -(y_true * log_probs)
        return jnp.sum(focal, axis=-1)


# ----------------------------------------------------------------------------- hinge losses


class Hinge(_LossObject):
    """``mean(max(1 - y_true * y_pred, 0))`` over the last axis.

    Labels are in ``{-1, 1}``; labels that are all in ``{0, 1}`` are converted to
    ``{-1, 1}`` first, as Keras does.
    """

    name = "hinge"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        return _mean_last(optax.losses.hinge_loss(y_pred, _hinge_labels(y_true)))


class SquaredHinge(_LossObject):
    """``mean(max(1 - y_true * y_pred, 0) ** 2)`` over the last axis; labels as :class:`Hinge`."""

    name = "squared_hinge"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        return _mean_last(jnp.square(optax.losses.hinge_loss(y_pred, _hinge_labels(y_true))))


class CategoricalHinge(_LossObject):
    """Keras's ``max(neg - pos + 1, 0)`` with ``pos = sum(y_true * y_pred)`` and
    ``neg = max((1 - y_true) * y_pred)`` over the class axis; one-hot labels."""

    name = "categorical_hinge"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        _check_class_axis(self, y_pred)
        pos = jnp.sum(y_true * y_pred, axis=-1)
        neg = jnp.max((1.0 - y_true) * y_pred, axis=-1)
        return jnp.maximum(neg - pos + 1.0, 0.0)


# ----------------------------------------------------------------------------- other losses


class KLDivergence(_LossObject):
    """``sum(y_true * log(y_true / y_pred))`` over the class axis.

    Both arguments are probabilities, clipped to ``[1e-7, 1]`` as in Keras.
    """

    name = "kl_divergence"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        _check_class_axis(self, y_pred)
        targets = jnp.clip(y_true, EPSILON, 1.0)
        return optax.losses.kl_divergence(jnp.log(jnp.clip(y_pred, EPSILON, 1.0)), targets)


class Poisson(_LossObject):
    """``mean(y_pred - y_true * log(y_pred + 1e-7))`` over the last axis."""

    name = "poisson"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        return _mean_last(y_pred - y_true * jnp.log(y_pred + EPSILON))


class CosineSimilarity(_LossObject):
    """The NEGATIVE cosine similarity along ``axis`` (so lower is better), as in Keras.

    Vectors are normalized with their norm floored at ``1e-7``, so a zero vector gives 0.

    Args:
        axis: the axis holding the vectors; it may not be the batch axis 0.
    """

    name = "cosine_similarity"
    _fields = ("axis",)
    axis: int

    def __init__(self, axis: int = -1) -> None:
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(
                f"Expected `axis` to be an int. Received: axis={axis!r} of type "
                f"{type(axis).__name__}."
            )
        self.axis = int(axis)

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        ndim = y_pred.ndim
        if not -ndim <= self.axis < ndim or self.axis % ndim == 0:
            raise ValueError(
                "Expected `axis` to name a non-batch axis of y_pred (0 is the batch axis). "
                f"Received: axis={self.axis} for y_pred.shape={tuple(y_pred.shape)}."
            )
        similarity = optax.losses.cosine_similarity(
            y_pred, y_true, epsilon=EPSILON**2, axis=self.axis
        )
        return -similarity


class LogCosh(_LossObject):
    """``mean(log(cosh(y_pred - y_true)))`` over the last axis."""

    name = "log_cosh"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        return _mean_last(optax.losses.log_cosh(y_pred, y_true))


class Huber(_LossObject):
    """Huber loss averaged over the last axis: quadratic for ``|error| <= delta``, then linear.

    Args:
        delta: where the loss turns linear, ``> 0``.
    """

    name = "huber_loss"
    _fields = ("delta",)

    def __init__(self, delta: float = 1.0) -> None:
        self.delta = _check_number("delta", delta, low=0, open_low=True)

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        return _mean_last(optax.losses.huber_loss(y_pred, y_true, delta=self.delta))


class MeanSquaredError(_LossObject):
    """``mean((y_pred - y_true) ** 2)`` over the last axis."""

    name = "mean_squared_error"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        return _mean_last(optax.losses.squared_error(y_pred, y_true))


class MeanAbsoluteError(_LossObject):
    """``mean(|y_pred - y_true|)`` over the last axis."""

    name = "mean_absolute_error"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        return _mean_last(jnp.abs(y_pred - y_true))


class MeanSquaredLogarithmicError(_LossObject):
    """``mean((log(max(y_pred, eps) + 1) - log(max(y_true, eps) + 1)) ** 2)`` over the last
    axis, with ``eps = 1e-7``."""

    name = "mean_squared_logarithmic_error"

    def __call__(self, y_true: jax.typing.ArrayLike, y_pred: jax.typing.ArrayLike) -> jax.Array:
        y_true, y_pred = _pair(self, y_true, y_pred)
        first = jnp.log1p(jnp.maximum(y_pred, EPSILON))
        second = jnp.log1p(jnp.maximum(y_true, EPSILON))
        return _mean_last(jnp.square(first - second))


# ----------------------------------------------------------------------------- heuristics


def is_loss_object(loss: object) -> bool:
    """Whether ``loss`` is one of the Keras-style loss objects of this module."""
    return isinstance(loss, _LossObject)


def looks_like_probabilities(y_pred: jax.typing.ArrayLike) -> bool:
    """Whether a concrete output sample looks like probabilities rather than logits.

    A host-side heuristic (it reads the values, so call it outside ``jit`` on a sample of
    outputs): every value is finite and in ``[0, 1]`` and, for outputs of shape
    ``[batch, ..., k]`` with ``k > 1``, every row sums to 1 within ``1e-3``. A ``[batch]``
    output counts as one value per row. Empty outputs do not look like probabilities.

    Args:
        y_pred: model outputs, e.g. a NumPy or JAX array.

    Returns:
        True when the outputs look like (softmax or sigmoid) probabilities.

    Raises:
        TypeError: for outputs that are not numeric arrays.

    >>> import numpy as np
    >>> looks_like_probabilities(np.array([[0.2, 0.8], [0.5, 0.5]]))
    True
    >>> looks_like_probabilities(np.array([[2.0, -1.0], [0.5, 0.5]]))
    False
    """
    values = np.asarray(y_pred)
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                "Expected `y_pred` to be a numeric array. Received: y_pred of type "
                f"{type(y_pred).__name__} with dtype {values.dtype}."
            ) from None
    values = values.astype(np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        return False
    if values.min() < 0.0 or values.max() > 1.0:
        return False
    if values.ndim >= 2 and values.shape[-1] > 1:
        return bool(np.all(np.abs(values.sum(axis=-1) - 1.0) <= 1e-3))
    return True
