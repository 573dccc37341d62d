"""Metrics as pure state machines: ``empty / update / merge / compute``.

A metric object has a ``name`` and four pure methods over a NamedTuple state:

* ``empty() -> state``: the state of no examples seen;
* ``update(state, y_true, y_pred, weights) -> state``: adds one batch; ``weights`` has
  shape ``[batch]`` and is 0 for padding rows, so metrics are exact on partial batches;
* ``merge(a, b) -> state``: combines two states (across batches or devices);
* ``compute(state) -> scalar``: the value to report.

Everything is jit-friendly, so metric states stay on the device for a whole epoch and
are read only when a log is needed. Any object with these four methods (and a ``name``)
can be passed in ``Model(metrics=[...])``.

Weights may also be per token (``[batch, seq]``): a mean metric is then a mean over
tokens (per-token accuracy of a language model).

Streaming metrics whose states are counts, so they merge exactly across batches and
devices, follow Keras's arguments: :class:`AUC` (ROC and PR), :class:`Precision`,
:class:`Recall`, :class:`F1Score`, :class:`FBetaScore`, :class:`MeanIoU`,
:class:`R2Score`. The names ``"auc"``, ``"precision"``, ``"recall"`` and ``"f1"`` build
binary-classification versions that read logits when the loss does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hkfit import _streaming_metrics as streaming
from hkfit import losses as losses_lib
from hkfit._streaming_metrics import AUC, F1Score, FBetaScore, MeanIoU, Precision, R2Score, Recall

MetricFn = Callable[[jax.Array, jax.Array], jax.Array]


class MeanState(NamedTuple):
    """Running weighted sum of values and of weights."""

    total: jax.Array
    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, on purpose


class Mean:
    """Weighted mean of a per-example function: ``sum(w * fn) / sum(w)``.

    Args:
      fn: ``(y_true, y_pred) -> per-example values`` of shape ``[batch]``.
      name: the key under which the value is logged.

    >>> m = Mean(lambda t, p: jnp.abs(t - p), "mae")
    >>> s = m.update(m.empty(), jnp.zeros(2), jnp.array([1., 3.]), jnp.ones(2))
    >>> float(m.compute(s))
    2.0
    """

    def __init__(self, fn: MetricFn, name: str):
        self.fn = fn
        self.name = name

    def empty(self) -> MeanState:
        return MeanState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def update(self, state: MeanState, y_true, y_pred, weights) -> MeanState:
        values = jnp.asarray(self.fn(y_true, y_pred), jnp.float32)
        weights = align_weights(weights, values)  # per example, or per token
        # where(): a NaN in a padding row must not leak into the sum.
        total = jnp.sum(jnp.where(weights > 0, weights * values, 0.0))
        return MeanState(state.total + total, state.count + jnp.sum(weights))

    def merge(self, a: MeanState, b: MeanState) -> MeanState:
        return MeanState(a.total + b.total, a.count + b.count)

    def compute(self, state: MeanState) -> jax.Array:
        return state.total / jnp.maximum(state.count, jnp.finfo(jnp.float32).tiny)

    def __repr__(self) -> str:
        return f"Mean({self.name!r})"


def align_weights(weights: jax.typing.ArrayLike, values: jax.Array) -> jax.Array:
    """``weights`` broadcast to the shape of ``values`` (float32).

    Weights ``[batch]`` spread over any further axes of ``values`` (every element of a row
    weighs the row's weight); weights with more axes than ``values`` (per-token weights
    ``[batch, seq]`` meeting one value per row) are summed over the extra axes first.
    """
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim > values.ndim:
        w = w.reshape((*w.shape[: values.ndim], -1)).sum(axis=-1)
    w = w.reshape(w.shape + (1,) * (values.ndim - w.ndim))
    return jnp.broadcast_to(w, values.shape)


class Weighted:
    """A metric of ``Model(weighted_metrics=...)``: weighed by sample and class weights.

    Plain ``metrics=`` see only which rows (or tokens) are real, as in Keras; a weighted
    metric gets the same weights as the loss. It delegates everything else to ``metric``.
    """

    weighted = True

    def __init__(self, metric: Any, name: str | None = None):
        self.metric = metric
        self.name = name or metric.name

    def empty(self) -> Any:
        return self.metric.empty()

    def update(self, state: Any, y_true: Any, y_pred: Any, weights: Any) -> Any:
        return self.metric.update(state, y_true, y_pred, weights)

    def merge(self, a: Any, b: Any) -> Any:
        return self.metric.merge(a, b)

    def compute(self, state: Any) -> Any:
        return self.metric.compute(state)

    def __repr__(self) -> str:
        return f"Weighted({self.metric!r}, name={self.name!r})"


def _per_example(values: jax.Array) -> jax.Array:
    """Values as float32, one per example or per token (no axis is reduced)."""
    return values.astype(jnp.float32)


def sparse_categorical_accuracy(y_true, y_pred):
    """1.0 where ``argmax(y_pred)`` equals the integer label."""
    return _per_example(jnp.argmax(y_pred, axis=-1) == jnp.asarray(y_true).astype(jnp.int32))


def categorical_accuracy(y_true, y_pred):
    """1.0 where ``argmax(y_pred)`` equals ``argmax(y_true)`` (one-hot labels)."""
    return _per_example(jnp.argmax(y_pred, axis=-1) == jnp.argmax(y_true, axis=-1))


def binary_accuracy(y_true, y_pred, threshold: float = 0.0):
    """1.0 where ``y_pred > threshold`` matches ``y_true > 0.5``.

    The default threshold 0 suits logits (as ``binary_crossentropy`` takes); pass 0.5 for
    probabilities. With ``"accuracy"`` the threshold is chosen from the loss.
    """
    y_true = losses_lib.match_trailing_unit(jnp.asarray(y_true), y_pred)
    return _per_example((y_pred > threshold) == (y_true > 0.5))


def top_k_accuracy(y_true, y_pred, k: int = 5):
    """1.0 where the integer label is among the ``k`` largest predictions (all, if fewer)."""
    _, top = jax.lax.top_k(y_pred, min(k, y_pred.shape[-1]))
    labels = jnp.asarray(y_true).astype(jnp.int32)
    return _per_example(jnp.any(top == labels[..., None], axis=-1))


def sparse_top_k_categorical_accuracy(y_true, y_pred):
    """``top_k_accuracy`` with ``k=5`` (the Keras default)."""
    return top_k_accuracy(y_true, y_pred, 5)


def top_k_categorical_accuracy(y_true, y_pred, k: int = 5):
    """Top-k accuracy for one-hot labels."""
    return top_k_accuracy(jnp.argmax(y_true, axis=-1), y_pred, k)


def TopKAccuracy(k: int = 5, name: str | None = None) -> Mean:  # pylint: disable=invalid-name
    """A top-``k`` accuracy metric over integer labels, logged as ``top_{k}_accuracy``."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"Expected `k` to be an int >= 1. Received: k={k!r}.")
    return Mean(lambda t, p: top_k_accuracy(t, p, k), name or f"top_{k}_accuracy")


_NAMED: dict[str, MetricFn] = {
    "sparse_categorical_accuracy": sparse_categorical_accuracy,
    "categorical_accuracy": categorical_accuracy,
    "binary_accuracy": binary_accuracy,
    "top_k_accuracy": sparse_top_k_categorical_accuracy,
    "sparse_top_k_categorical_accuracy": sparse_top_k_categorical_accuracy,
    "top_k_categorical_accuracy": top_k_categorical_accuracy,
    "mse": losses_lib.mse,
    "mean_squared_error": losses_lib.mse,
    "mae": losses_lib.mae,
    "mean_absolute_error": losses_lib.mae,
    "sparse_categorical_crossentropy": losses_lib.sparse_categorical_crossentropy,
    "categorical_crossentropy": losses_lib.categorical_crossentropy,
    "binary_crossentropy": losses_lib.binary_crossentropy,
}
_ACCURACY_ALIASES = ("accuracy", "acc")


def names() -> list[str]:
    """The metric names that :func:`get` accepts."""
    return sorted([*_NAMED, *_ACCURACY_ALIASES, *streaming.NAMED])


def _resolve_accuracy(
    y_true_shape: Sequence[int], y_pred_shape: Sequence[int], loss_name: str | None
) -> MetricFn:
    """Picks sparse / categorical / binary accuracy from the label and output shapes."""
    if len(y_pred_shape) >= 2 and y_pred_shape[-1] > 1:
        if tuple(y_true_shape) == tuple(y_pred_shape):
            return categorical_accuracy
        return sparse_categorical_accuracy
    if loss_name in (None, "binary_crossentropy"):
        return binary_accuracy
    return lambda t, p: binary_accuracy(t, p, threshold=0.5)


def get(
    metric: Any,
    *,
    y_true_shape: Sequence[int] = (),
    y_pred_shape: Sequence[int] = (),
    loss_name: str | None = None,
    from_logits: bool = True,
):
    """Resolves one entry of ``Model(metrics=...)`` to a metric object.

    Args:
      metric: a name from :func:`names`, a callable ``(y_true, y_pred) -> per-example
        values`` (logged under its ``__name__``), or an object following the protocol.
      y_true_shape: shape of a batch of labels, used to resolve ``"accuracy"``.
      y_pred_shape: shape of a batch of model outputs, used to resolve ``"accuracy"``.
      loss_name: the loss name, if any; a non-crossentropy loss with ``"accuracy"`` on a
        single output thresholds at 0.5 instead of at logit 0.
      from_logits: whether the outputs are logits, for ``"auc"``, ``"precision"``,
        ``"recall"`` and ``"f1"`` (a sigmoid is applied first).

    Returns:
      An object with ``name``, ``empty``, ``update``, ``merge`` and ``compute``.

    Raises:
      ValueError: for an unknown name.
      TypeError: for an unsupported kind of value.
    """
    if isinstance(metric, str):
        if metric in _ACCURACY_ALIASES:
            return Mean(_resolve_accuracy(y_true_shape, y_pred_shape, loss_name), metric)
        if metric in streaming.NAMED:
            return streaming.named(metric, from_logits=from_logits)
        if metric not in _NAMED:
            raise ValueError(
                f"Unknown metric name in `metrics`. Expected one of {names()}, a "
                "callable or a metric object. Received: "
                f"{metric!r}."
            )
        return Mean(_NAMED[metric], metric)
    if all(hasattr(metric, attr) for attr in ("empty", "update", "merge", "compute")):
        if not hasattr(metric, "name"):
            raise TypeError(f"Metric object {metric!r} in `metrics` needs a `name` attribute.")
        return metric
    if callable(metric):
        return Mean(metric, getattr(metric, "__name__", type(metric).__name__))
    raise TypeError(
        "Expected each entry of `metrics` to be a name, a callable (y_true, y_pred) "
        "-> per-example values, or an object with empty/update/merge/compute. "
        f"Received: {metric!r} of type {type(metric).__name__}."
    )


__all__ = [
    "AUC",
    "F1Score",
    "FBetaScore",
    "Mean",
    "MeanIoU",
    "MeanState",
    "Precision",
    "R2Score",
    "Recall",
    "TopKAccuracy",
    "Weighted",
    "align_weights",
    "binary_accuracy",
    "categorical_accuracy",
    "get",
    "names",
    "sparse_categorical_accuracy",
    "sparse_top_k_categorical_accuracy",
    "top_k_accuracy",
    "top_k_categorical_accuracy",
]
