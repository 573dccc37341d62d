"""Losses: names, and Keras-compatible loss objects, built on ``optax.losses``.

Every loss maps ``(y_true, y_pred) -> per-example losses``: shape ``[batch]``, or
``[batch, ...]`` when the labels have more axes than the loss reduces (per-token losses
``[batch, seq]`` of a language model). The training step applies sample weights (``[batch]``
or per token) and padding masks itself, so losses never reduce over the batch (the optax
convention); the objective is ``sum(w * loss) / sum(w)`` over every element.

The crossentropy NAMES take *logits* (Keras's ``from_logits=True``). The loss objects
(``SparseCategoricalCrossentropy(from_logits=False, label_smoothing=0.1)``, ...) take
Keras's arguments and defaults, so code ported from Keras with a softmax output keeps its
meaning; a model built with a crossentropy name whose forward ends in a softmax or a sigmoid
gets a warning naming ``from_logits=False``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from hkfit import _eager as eager
from hkfit._loss_objects import (
    BinaryCrossentropy,
    BinaryFocalCrossentropy,
    CategoricalCrossentropy,
    CategoricalFocalCrossentropy,
    CategoricalHinge,
    CosineSimilarity,
    Hinge,
    Huber,
    KLDivergence,
    LogCosh,
    MeanAbsoluteError,
    MeanSquaredError,
    MeanSquaredLogarithmicError,
    Poisson,
    SparseCategoricalCrossentropy,
    SquaredHinge,
    looks_like_probabilities,
)

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _mean_last(values: jax.Array) -> jax.Array:
    """Averages the feature (last) axis, as Keras does; ``[batch]`` values stay as they are.

    Other axes are kept: ``[batch, seq, features]`` gives one loss per token, which the
    training step averages with per-token (or per-row) weights.
    """
    if values.ndim <= 1:
        return values
    return jnp.mean(values, axis=-1)


def match_trailing_unit(y_true: jax.Array, y_pred: jax.Array):
    """Lets ``y_true`` of shape ``[b]`` meet ``y_pred`` of shape ``[b, 1]`` (and back)."""
    if y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
        y_true = y_true[..., None]
    elif y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
        y_true = y_true[..., 0]
    return y_true


def sparse_categorical_crossentropy(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    """Softmax crossentropy from logits ``[b, ..., classes]`` and integer labels ``[b, ...]``."""
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(
        y_pred, jnp.asarray(y_true).astype(jnp.int32)
    )
    return losses


def categorical_crossentropy(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    """Softmax crossentropy from logits and one-hot (or soft) labels of the same shape."""
    return optax.losses.softmax_cross_entropy(y_pred, y_true)


def binary_crossentropy(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    """Sigmoid crossentropy from logits; labels in ``[0, 1]``."""
    y_true = match_trailing_unit(y_true, y_pred).astype(y_pred.dtype)
    return _mean_last(optax.losses.sigmoid_binary_cross_entropy(y_pred, y_true))


def mse(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    """Mean squared error per example."""
    y_true = match_trailing_unit(y_true, y_pred)
    return _mean_last(optax.losses.squared_error(y_pred, y_true.astype(y_pred.dtype)))


def mae(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    """Mean absolute error per example."""
    y_true = match_trailing_unit(y_true, y_pred)
    return _mean_last(jnp.abs(y_pred - y_true.astype(y_pred.dtype)))


def huber(y_true: jax.Array, y_pred: jax.Array, delta: float = 1.0) -> jax.Array:
    """Huber loss per example (``delta=1``, as Keras)."""
    y_true = match_trailing_unit(y_true, y_pred)
    return _mean_last(optax.losses.huber_loss(y_pred, y_true.astype(y_pred.dtype), delta=delta))


_LOSSES: dict[str, LossFn] = {
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "binary_crossentropy": binary_crossentropy,
    "binary_focal_crossentropy": BinaryFocalCrossentropy(from_logits=True),
    "categorical_focal_crossentropy": CategoricalFocalCrossentropy(from_logits=True),
    "mse": mse,
    "mean_squared_error": mse,
    "mae": mae,
    "mean_absolute_error": mae,
    "msle": MeanSquaredLogarithmicError(),
    "mean_squared_logarithmic_error": MeanSquaredLogarithmicError(),
    "huber": huber,
    "log_cosh": LogCosh(),
    "hinge": Hinge(),
    "squared_hinge": SquaredHinge(),
    "categorical_hinge": CategoricalHinge(),
    "kl_divergence": KLDivergence(),
    "poisson": Poisson(),
    "cosine_similarity": CosineSimilarity(),
}

#: The loss names that take logits (Keras's ``from_logits=True``).
LOGIT_NAMES = frozenset(name for name in _LOSSES if name.endswith("crossentropy"))


def takes_logits(loss: object) -> bool:
    """Whether ``loss`` (a name, a loss object or a callable) reads logits.

    Names of crossentropies do; a loss object says so with ``from_logits``; other
    callables are taken to read logits when they say nothing.
    """
    if isinstance(loss, str):
        return loss in LOGIT_NAMES
    return bool(getattr(loss, "from_logits", True))


def get(loss: str | LossFn) -> LossFn:
    """Resolves a loss name or callable to a per-example loss function.

    Args:
        loss: one of the names in ``hkfit.losses.names()`` or a callable
            ``(y_true, y_pred) -> per-example losses`` of shape ``[batch]``.

    Returns:
        The per-example loss function.

    Raises:
        ValueError: for an unknown name.
        TypeError: for anything that is neither a string nor a callable.

    >>> get("mse")(jnp.zeros((2, 3)), jnp.ones((2, 3))).shape
    (2,)
    """
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(
                f"Unknown `loss` name. Expected one of {sorted(_LOSSES)} or a "
                f"callable (y_true, y_pred) -> per-example losses. Received: loss={loss!r}."
            )
        return _LOSSES[loss]
    if callable(loss):
        return loss
    raise TypeError(
        "Expected `loss` to be a loss name or a callable (y_true, y_pred) -> "
        f"per-example losses. Received: loss={loss!r} of type {type(loss).__name__}."
    )


def names() -> list[str]:
    """The loss names that :func:`get` accepts."""
    return sorted(_LOSSES)


def _shape_problem(name: str | None, y_shape, out_shape) -> str | None:
    """What a named loss needs that these label / output shapes do not give, if anything."""
    if name is None or y_shape is None or out_shape is None:
        return None
    y_shape, out_shape = tuple(y_shape), tuple(out_shape)
    if name == "sparse_categorical_crossentropy":
        if out_shape[:-1] != y_shape:
            return "integer labels of shape [batch, ...] and logits of shape [batch, ..., classes]"
        return None
    if y_shape == out_shape or (
        name != "categorical_crossentropy"
        and (y_shape + (1,) == out_shape or y_shape == out_shape + (1,))
    ):
        return None
    return "labels and outputs of the same shape"


def check_output(loss: str | LossFn, y_pred, y_true) -> None:
    """Checks that ``loss`` accepts a forward output like ``y_pred`` for labels ``y_true``.

    Args:
      loss: the loss as given to the model (a name or a callable).
      y_pred: the forward's output for a few rows (arrays or ``jax.ShapeDtypeStruct``).
      y_true: the labels of the same rows.

    Raises:
      ValueError: naming both shapes and what the loss needs.
    """
    y_shape = getattr(y_true, "shape", None)
    out_shape = getattr(y_pred, "shape", None)
    rows = jax.tree_util.tree_leaves(y_true)[0].shape[0]
    problem = _shape_problem(loss if isinstance(loss, str) else None, y_shape, out_shape)
    if problem is None:
        try:
            result = eager.shape_of(get(loss), y_true, y_pred)
            if tuple(getattr(result, "shape", ()))[:1] != (rows,):
                problem = (
                    "a loss of shape [batch] (or [batch, ...] per token); it returned "
                    f"{getattr(result, 'shape', result)}"
                )
        except Exception as e:  # the loss rejected the shapes
            problem = f"shapes the loss accepts ({type(e).__name__}: {e})"
    if problem:
        raise ValueError(
            f"The output of `forward` does not match `y` for loss={loss!r}: it needs {problem}. "
            f"Received: forward output shape {out_shape} for {rows} rows, y shape {y_shape}. "
            "Change the last layer or the labels (e.g. one-hot vs integer labels)."
        )


__all__ = [
    "BinaryCrossentropy",
    "BinaryFocalCrossentropy",
    "CategoricalCrossentropy",
    "CategoricalFocalCrossentropy",
    "CategoricalHinge",
    "CosineSimilarity",
    "Hinge",
    "Huber",
    "KLDivergence",
    "LogCosh",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "MeanSquaredLogarithmicError",
    "Poisson",
    "SparseCategoricalCrossentropy",
    "SquaredHinge",
    "LOGIT_NAMES",
    "binary_crossentropy",
    "categorical_crossentropy",
    "check_output",
    "get",
    "huber",
    "looks_like_probabilities",
    "mae",
    "match_trailing_unit",
    "mse",
    "names",
    "sparse_categorical_crossentropy",
    "takes_logits",
]
