"""Keras-style streaming metrics whose states merge exactly across batches and devices.

Each class follows the :mod:`hkfit.metrics` protocol (``name``, ``empty``, ``update``,
``merge``, ``compute``) and mirrors the Keras 3 metric of the same name and arguments:
``AUC``, ``Precision``, ``Recall``, ``F1Score``, ``FBetaScore``, ``MeanIoU`` and
``R2Score``. A state is a NamedTuple of weighted sums (counts per threshold, confusion
matrices, sums of values), never an average, so ``merge`` is an element-wise sum: states
built batch by batch, or on several devices and then merged, equal the state of a single
update over all rows (up to float rounding). ``update`` and ``compute`` are pure and run
under ``jax.jit``.

``weights`` act like Keras's ``sample_weight``: shape ``[batch]`` (or any shape that
broadcasts against the leading axes of ``y_true``) and every count is weighted. Rows of
weight 0 (padding) contribute nothing, even when they hold NaN or out-of-range labels.

Differences from Keras, all deliberate:

* ``from_logits=False`` is added to ``Precision``, ``Recall``, ``F1Score`` and
  ``FBetaScore`` (``AUC`` already has it): hkfit models emit logits, and ``True`` applies
  a sigmoid to ``y_pred`` first.
* State shapes are fixed when the metric is made, because ``empty()`` is called before the
  first batch: ``AUC(multi_label=True)`` needs ``num_labels`` (or ``label_weights``);
  ``F1Score`` / ``FBetaScore`` with ``average`` other than ``"micro"`` need
  ``num_classes``; ``R2Score`` takes ``num_outputs`` (default 1).
* ``MeanIoU`` defaults to ``sparse_y_pred=False`` (Keras: ``True``): ``y_pred`` are logits
  or probabilities and the class is their argmax over ``axis``.
* There is no ``dtype`` argument (states are float32); options after ``name`` are
  keyword-only, so a Keras call that passes ``dtype`` by position fails loudly.
* ``F1Score``, ``FBetaScore`` and ``MeanIoU`` divide exactly (0 where a denominator is 0)
  instead of adding Keras's ``epsilon`` of 1e-7 to denominators.
* ``compute`` never warns (it runs under ``jit``): ``R2Score`` with ``num_regressors``
  falls back to the plain R² without a warning when there are too few samples.
* Names are not made unique (a second ``AUC()`` is also ``"auc"``, not ``"auc_1"``).
* Thresholds are applied as ``y_pred > t`` exactly, for any thresholds; Keras's fast path
  for evenly spaced ones buckets ``y_pred * (n - 1)``, which float rounding can move
  across a threshold.
* ``F1Score``, ``FBetaScore`` and ``R2Score`` also take 1-D ``y_true`` / ``y_pred`` as a
  single column.
* ``compute`` of ``F1Score`` / ``FBetaScore`` with ``average=None``, of ``R2Score`` with
  ``class_aggregation=None`` and of ``Precision`` / ``Recall`` with several thresholds is a
  vector, as in Keras; hkfit logs scalars, so pick an average (or one threshold) for
  ``Model(metrics=...)``.

Example:

>>> import jax.numpy as jnp
>>> auc = AUC(num_thresholds=3)
>>> y_true, y_pred = jnp.array([0, 0, 1, 1]), jnp.array([0.0, 0.5, 0.3, 0.9])
>>> whole = auc.update(auc.empty(), y_true, y_pred, jnp.ones(4))
>>> float(auc.compute(whole))
0.75
>>> first = auc.update(auc.empty(), y_true[:2], y_pred[:2], jnp.ones(2))
>>> second = auc.update(auc.empty(), y_true[2:], y_pred[2:], jnp.ones(2))
>>> float(auc.compute(auc.merge(first, second)))
0.75
>>> metric = named("f1", from_logits=True)
>>> state = metric.update(metric.empty(), y_true, jnp.array([-2.0, 1.0, 3.0, 0.5]), jnp.ones(4))
>>> round(float(metric.compute(state)), 4)
0.8
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "AUC",
    "Precision",
    "Recall",
    "F1Score",
    "FBetaScore",
    "MeanIoU",
    "R2Score",
    "ConfusionState",
    "FBetaState",
    "ConfusionMatrixState",
    "R2State",
    "NAMED",
    "named",
]

_EPSILON = 1e-7  # keras.backend.epsilon(): the AUC end-point thresholds are -eps and 1 + eps.
_NEG_INF = -1e10  # Keras's NEG_INF: predictions outside the top k, and the top_k threshold.


class ConfusionState(NamedTuple):
    """Weighted confusion counts per threshold, ``[thresholds]`` or ``[thresholds, labels]``."""

    true_positives: jax.Array
    false_positives: jax.Array
    true_negatives: jax.Array
    false_negatives: jax.Array


class FBetaState(NamedTuple):
    """Weighted counts per class (scalars for ``average="micro"``); Keras's variables."""

    true_positives: jax.Array
    false_positives: jax.Array
    false_negatives: jax.Array
    intermediate_weights: jax.Array  # weighted support: sum of w * y_true


class ConfusionMatrixState(NamedTuple):
    """Weighted confusion matrix ``[num_classes, num_classes]``: rows true, columns predicted."""

    total_cm: jax.Array


class R2State(NamedTuple):
    """Weighted sums per output ``[num_outputs]`` and the count of rows with weight != 0."""

    sum: jax.Array  # sum of w * y
    squared_sum: jax.Array  # sum of w * y**2
    total_mse: jax.Array  # sum of w * (y - y_pred)**2
    weighted_count: jax.Array  # sum of w
    num_samples: jax.Array  # rows with a nonzero weight (scalar)


State = TypeVar("State", bound=tuple)


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_bool(value: Any, arg: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Expected `{arg}` to be a bool. Received: {arg}={value!r}.")
    return bool(value)


def _check_name(name: Any, default: str) -> str:
    if name is None:
        return default
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Expected `name` to be a non-empty string or None. Received: name={name!r}."
        )
    return name


def _check_thresholds(thresholds: Any, arg: str = "thresholds") -> list[float]:
    values = [thresholds] if _is_real(thresholds) else thresholds
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(
            f"Expected `{arg}` to be a float or a list of floats in [0, 1]. "
            f"Received: {arg}={thresholds!r}."
        )
    values = list(np.asarray(values).ravel()) if isinstance(values, np.ndarray) else list(values)
    if any(not _is_real(t) or not 0.0 <= float(t) <= 1.0 for t in values):
        raise ValueError(
            f"Expected `{arg}` to hold floats in [0, 1]. Received: {arg}={thresholds!r}."
        )
    return [float(t) for t in values]


# ------------------------------------------------------------------------- array helpers


def _floats(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _same_rank(y_true: jax.Array, y_pred: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keras's ``squeeze_or_expand_to_same_rank``: ``[b]`` meets ``[b, 1]`` as ``[b, 1]``."""
    if y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
        if y_pred.ndim == 1:
            y_pred = y_pred[:, None]
        else:
            y_true = y_true[..., 0]
    elif y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
        if y_true.ndim == 1:
            y_true = y_true[:, None]
        else:
            y_pred = y_pred[..., 0]
    return y_true, y_pred


def _check_same_shape(y_true: jax.Array, y_pred: jax.Array, what: str) -> None:
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"Expected `y_true` and `y_pred` of the same shape ({what}). "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}."
        )


def _broadcast_weights(weights: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array:
    """Per-row (or per-element) weights broadcast over the trailing axes of ``shape``."""
    if weights is None:
        return jnp.ones(shape, jnp.float32)
    w = _floats(weights)
    fits = w.ndim <= len(shape) and all(a in (1, b) for a, b in zip(w.shape, shape))
    if not fits:
        raise ValueError(
            f"Expected `weights` of shape [batch] or broadcastable to the leading axes of "
            f"{tuple(shape)}. Received: weights.shape={w.shape}."
        )
    return jnp.broadcast_to(w.reshape(w.shape + (1,) * (len(shape) - w.ndim)), shape)


def _masked(weights: jax.Array, values: jax.Array) -> jax.Array:
    """``weights * values``, exactly 0 where the weight is 0 (even if the value is NaN)."""
    return jnp.where(weights != 0, weights * values, 0.0)


def _divide_no_nan(a: jax.Array, b: jax.Array) -> jax.Array:
    nonzero = b != 0
    return jnp.where(nonzero, a / jnp.where(nonzero, b, 1.0), 0.0)


_DIRECT_LIMIT = 1 << 20  # up to this many (prediction, threshold) pairs, compare them all


@functools.partial(jax.jit, static_argnames="per_label")  # one compile, also when eager
def _threshold_counts(
    positive: jax.Array,
    weights: jax.Array,
    y_pred: jax.Array,
    thresholds: ArrayLike,
    *,
    per_label: bool,
) -> ConfusionState:
    """Weighted confusion counts of ``y_pred > t`` for each of the sorted ``thresholds``.

    Up to ``_DIRECT_LIMIT`` pairs, every prediction is compared with every threshold, as
    Keras's general path does. Beyond, each prediction goes to the bucket ``b`` = number
    of thresholds strictly below it (it is positive exactly for the thresholds ``t_j``
    with ``j < b``), and cumulative sums of a weighted histogram of buckets give every
    count in O(N + T) memory, for any sorted thresholds (Keras's fast path needs evenly
    spaced ones). Both give the same counts.

    Args:
      positive: boolean labels, same shape as ``y_pred``.
      weights: float weights, same shape as ``y_pred``.
      y_pred: float predictions; ``[batch, labels]`` when ``per_label``.
      thresholds: sorted float32 thresholds ``[T]``.
      per_label: counts per label (last axis) instead of over all elements.

    Returns:
      A ``ConfusionState`` of arrays ``[T]``, or ``[T, labels]`` when ``per_label``.
    """
    th = jnp.asarray(thresholds, jnp.float32)
    num = th.shape[0]
    # [N, 2] (or [N, labels, 2]): weighted positives and negatives of every element.
    signed = jnp.stack([positive, ~positive], axis=-1).astype(jnp.float32)
    values = _masked(weights[..., None], signed)
    if not per_label:
        y_pred, values = y_pred.ravel(), values.reshape(-1, 2)
    if y_pred.size * num <= _DIRECT_LIMIT:
        above = (y_pred[None] > th.reshape((num,) + (1,) * y_pred.ndim))[..., None]
        pos_neg_above = jnp.sum(jnp.where(above, values[None], 0.0), axis=1)
        pos_neg_below = jnp.sum(jnp.where(above, 0.0, values[None]), axis=1)
    else:
        bucket = jnp.clip(jnp.searchsorted(th, y_pred, side="left"), 0, num).astype(jnp.int32)
        if per_label:
            labels = y_pred.shape[-1]
            ids = (bucket + (num + 1) * jnp.arange(labels, dtype=jnp.int32)).ravel()
            flat = jax.ops.segment_sum(values.reshape(-1, 2), ids, (num + 1) * labels)
            hist = flat.reshape(labels, num + 1, 2).swapaxes(0, 1)
        else:
            hist = jax.ops.segment_sum(values, bucket, num + 1)
        # One cumulative sum, forwards (buckets <= j) and backwards (buckets > j), so a count
        # over empty buckets is exactly 0.
        both = jnp.cumsum(jnp.concatenate([hist, jnp.flip(hist, 0)], axis=-1), axis=0)
        pos_neg_below = both[:-1, ..., :2]
        pos_neg_above = jnp.flip(both[:-1, ..., 2:], 0)
    return ConfusionState(
        pos_neg_above[..., 0], pos_neg_above[..., 1], pos_neg_below[..., 1], pos_neg_below[..., 0]
    )


def _array(x: Any) -> Any:
    """Lists and scalars as NumPy arrays (``jit`` would read a list as a pytree)."""
    return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def _row_weights(weights: Any, y_true: Any) -> Any:
    """``weights``, or ones per row when ``None`` (one compiled shape for both cases)."""
    return np.ones(np.shape(y_true)[:1], np.float32) if weights is None else _array(weights)


@jax.jit
def _add_states(a: State, b: State) -> State:
    return jax.tree_util.tree_map(jnp.add, a, b)


class _StreamingMetric:
    """Shared ``merge`` (an element-wise sum of states) and ``repr``.

    The maths lives in module-level pure functions, jitted with the metric's settings as
    static arguments: compiled once per setting and shape, inlined under an outer ``jit``.
    """

    name: str

    def merge(self, a: State, b: State) -> State:
        """Combines two states (of two batches, or of two devices) by summing them."""
        return _add_states(a, b)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# -------------------------------------------------------------------------------------- AUC


@functools.partial(jax.jit, static_argnames=("from_logits", "num_labels", "label_weights"))
def _auc_counts(
    y_true: jax.Array,
    y_pred: jax.Array,
    weights: jax.Array | None,
    thresholds: jax.Array,
    *,
    from_logits: bool,
    num_labels: int | None,
    label_weights: tuple[float, ...] | None,
) -> ConfusionState:
    """The counts of one batch for :class:`AUC` (``num_labels`` only when multi-label)."""
    y_true, y_pred = _same_rank(jnp.asarray(y_true), _floats(y_pred))
    _check_same_shape(y_true, y_pred, "AUC")
    if from_logits:
        y_pred = jax.nn.sigmoid(y_pred)
    y_pred = jnp.clip(y_pred, 0.0, 1.0)
    w = _broadcast_weights(weights, y_pred.shape)
    if num_labels is not None:
        if y_pred.ndim != 2 or y_pred.shape[1] != num_labels:
            raise ValueError(
                f"Expected `y_pred` of shape [batch, num_labels={num_labels}] with "
                f"multi_label=True. Received: y_pred.shape={y_pred.shape}."
            )
    elif label_weights is not None:
        if y_pred.ndim < 1 or y_pred.shape[-1] != len(label_weights):
            raise ValueError(
                f"Expected the last axis of `y_pred` to have {len(label_weights)} labels, "
                f"one per `label_weights`. Received: y_pred.shape={y_pred.shape}."
            )
        w = w * jnp.asarray(label_weights, jnp.float32)
    return _threshold_counts(y_true != 0, w, y_pred, thresholds, per_label=num_labels is not None)


@functools.partial(
    jax.jit, static_argnames=("curve", "summation_method", "multi_label", "label_weights")
)
def _auc_value(
    state: ConfusionState,
    *,
    curve: str,
    summation_method: str,
    multi_label: bool,
    label_weights: tuple[float, ...] | None,
) -> jax.Array:
    """Keras's ``AUC.result``: a Riemann sum over thresholds, averaged over labels."""
    tp, fp = state.true_positives, state.false_positives
    tn, fn = state.true_negatives, state.false_negatives

    def average_labels(per_threshold: jax.Array) -> jax.Array:
        by_label = jnp.sum(per_threshold, axis=0)
        if not multi_label:
            return by_label
        if label_weights is None:
            return jnp.mean(by_label)
        lw = jnp.asarray(label_weights, jnp.float32)
        return _divide_no_nan(jnp.sum(by_label * lw), jnp.sum(lw))

    if curve == "PR" and summation_method == "interpolation":
        # Davis & Goadrich (2006): interpolate true and false positives, not precision.
        dtp = tp[:-1] - tp[1:]
        p = tp + fp
        dp = p[:-1] - p[1:]
        prec_slope = _divide_no_nan(dtp, jnp.maximum(dp, 0.0))
        intercept = tp[1:] - prec_slope * p[1:]
        safe_p_ratio = jnp.where(
            (p[:-1] > 0) & (p[1:] > 0), _divide_no_nan(p[:-1], jnp.maximum(p[1:], 0.0)), 1.0
        )
        return average_labels(
            _divide_no_nan(
                prec_slope * (dtp + intercept * jnp.log(safe_p_ratio)),
                jnp.maximum(tp[1:] + fn[1:], 0.0),
            )
        )
    recall = _divide_no_nan(tp, tp + fn)
    if curve == "ROC":
        x, y = _divide_no_nan(fp, fp + tn), recall
    elif curve == "PR":
        x, y = recall, _divide_no_nan(tp, tp + fp)
    else:  # PRGAIN
        scaling = _divide_no_nan(tp + fn, tn + fp)
        recall_gain = 1.0 - scaling * _divide_no_nan(fn, tp)
        precision_gain = 1.0 - scaling * _divide_no_nan(fp, tp)
        x = jnp.maximum(jnp.where(tp == 0, 0.0, recall_gain), 0.0)
        y = jnp.where(tp == 0, 1.0, precision_gain)
    if summation_method == "interpolation":
        heights = (y[:-1] + y[1:]) / 2.0
    elif summation_method == "minoring":
        heights = jnp.minimum(y[:-1], y[1:])
    else:
        heights = jnp.maximum(y[:-1], y[1:])
    return average_labels((x[:-1] - x[1:]) * heights)


class AUC(_StreamingMetric):
    """Area under the ROC or PR curve, from weighted confusion counts per threshold.

    As ``keras.metrics.AUC``: predictions are compared with ``num_thresholds`` thresholds
    (``y_pred > t``) — ``-eps``, ``i / (num_thresholds - 1)`` for ``i = 1 …
    num_thresholds - 2``, and ``1 + eps`` with ``eps = 1e-7`` — and the area is a Riemann
    sum over them. Labels count as positive when nonzero; predictions are clipped to
    ``[0, 1]`` (after the sigmoid when ``from_logits``).

    Args:
      num_thresholds: number of thresholds, > 1; ignored when ``thresholds`` is given.
      curve: ``"ROC"`` (default), ``"PR"`` (precision-recall) or ``"PRGAIN"``.
      summation_method: ``"interpolation"`` (trapezoids for ROC; Davis & Goadrich
        interpolation of true and false positives for PR), ``"minoring"`` or
        ``"majoring"`` (lower and upper Riemann sums).
      name: the key under which the value is logged; default ``"auc"``.
      thresholds: explicit thresholds in ``[0, 1]``; ``-eps`` and ``1 + eps`` are added,
        so ``num_thresholds`` becomes ``len(thresholds) + 2``.
      multi_label: ``True`` computes one AUC per label (last axis of ``[batch, labels]``
        data) and averages them; ``False`` flattens all labels into one binary problem.
      num_labels: number of labels; required when ``multi_label`` (hkfit states have a
        fixed shape), unless ``label_weights`` gives it.
      label_weights: non-negative weights per label: the weights of the label AUCs'
        average when ``multi_label``, else multipliers of each label's example weights.
      from_logits: apply a sigmoid to ``y_pred`` first.

    Raises:
      ValueError: for an invalid argument; the message names it.

    >>> m = AUC(num_thresholds=3)
    >>> s = m.update(m.empty(), jnp.array([0, 0, 1, 1]), jnp.array([0, 0.5, 0.3, 0.9]),
    ...              jnp.array([1.0, 0.0, 0.0, 1.0]))
    >>> float(m.compute(s))
    1.0
    """

    def __init__(
        self,
        num_thresholds: int = 200,
        curve: str = "ROC",
        summation_method: str = "interpolation",
        name: str | None = None,
        *,
        thresholds: Sequence[float] | None = None,
        multi_label: bool = False,
        num_labels: int | None = None,
        label_weights: Sequence[float] | None = None,
        from_logits: bool = False,
    ):
        self.name = _check_name(name, "auc")
        if thresholds is not None:
            inner = sorted(_check_thresholds(thresholds))
            self.num_thresholds = len(inner) + 2
        else:
            if not _is_int(num_thresholds) or num_thresholds <= 1:
                raise ValueError(
                    "Expected `num_thresholds` to be an integer > 1. "
                    f"Received: num_thresholds={num_thresholds!r}."
                )
            self.num_thresholds = int(num_thresholds)
            inner = [(i + 1) / (self.num_thresholds - 1) for i in range(self.num_thresholds - 2)]
        self._thresholds = np.array([0.0 - _EPSILON, *inner, 1.0 + _EPSILON], np.float32)
        curves = {"roc": "ROC", "pr": "PR", "prgain": "PRGAIN"}
        if not isinstance(curve, str) or curve.lower() not in curves:
            raise ValueError(
                f'Expected `curve` to be one of "ROC", "PR", "PRGAIN". Received: curve={curve!r}.'
            )
        self.curve = curves[curve.lower()]
        methods = ("interpolation", "minoring", "majoring")
        if not isinstance(summation_method, str) or summation_method.lower() not in methods:
            raise ValueError(
                f"Expected `summation_method` to be one of {methods}. "
                f"Received: summation_method={summation_method!r}."
            )
        self.summation_method = summation_method.lower()
        self.multi_label = _check_bool(multi_label, "multi_label")
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.label_weights: tuple[float, ...] | None = None
        if label_weights is not None:
            lw = np.asarray(label_weights, np.float32)
            if lw.ndim != 1 or lw.size == 0 or not np.all(lw >= 0):
                raise ValueError(
                    "Expected `label_weights` to be a non-empty list of non-negative floats. "
                    f"Received: label_weights={label_weights!r}."
                )
            self.label_weights = tuple(float(v) for v in lw)
        self.num_labels: int | None = None
        if not self.multi_label and num_labels is not None:
            raise ValueError(
                "`num_labels` is needed only when `multi_label` is True. "
                f"Received: num_labels={num_labels!r} with multi_label=False."
            )
        if self.multi_label:
            if num_labels is None and self.label_weights is not None:
                num_labels = len(self.label_weights)
            if num_labels is None or not _is_int(num_labels) or num_labels < 1:
                raise ValueError(
                    "Expected `num_labels` (an integer >= 1) when `multi_label` is True: "
                    "hkfit creates metric states before the first batch. "
                    f"Received: num_labels={num_labels!r}."
                )
            if self.label_weights is not None and len(self.label_weights) != num_labels:
                raise ValueError(
                    f"Expected `label_weights` to have `num_labels`={num_labels} entries. "
                    f"Received: label_weights={label_weights!r}."
                )
            self.num_labels = int(num_labels)

    @property
    def thresholds(self) -> list[float]:
        """The thresholds, end points included."""
        return [float(t) for t in self._thresholds]

    def empty(self) -> ConfusionState:
        """Zero counts, ``[num_thresholds]`` (or ``[num_thresholds, num_labels]``)."""
        shape = (self.num_thresholds,) + ((self.num_labels,) if self.multi_label else ())
        zeros = jnp.zeros(shape, jnp.float32)
        return ConfusionState(zeros, zeros, zeros, zeros)

    def update(
        self,
        state: ConfusionState,
        y_true: ArrayLike,
        y_pred: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> ConfusionState:
        """Adds one batch: labels ``[batch]``, ``[batch, 1]`` or ``[batch, labels]``.

        Args:
          state: the counts so far.
          y_true: labels (nonzero means positive), the shape of ``y_pred``.
          y_pred: probabilities (or logits with ``from_logits``).
          weights: ``[batch]`` (0 for padding) or per element; ``None`` means ones.

        Returns:
          The new state.
        """
        counts = _auc_counts(
            _array(y_true),
            _array(y_pred),
            _row_weights(weights, y_true),
            self._thresholds,
            from_logits=self.from_logits,
            num_labels=self.num_labels,
            label_weights=None if self.multi_label else self.label_weights,
        )
        return self.merge(state, counts)

    def compute(self, state: ConfusionState) -> jax.Array:
        """The AUC (averaged over labels when ``multi_label``), a scalar."""
        return _auc_value(
            state,
            curve=self.curve,
            summation_method=self.summation_method,
            multi_label=self.multi_label,
            label_weights=self.label_weights if self.multi_label else None,
        )

    def __repr__(self) -> str:
        return (
            f"AUC(name={self.name!r}, curve={self.curve!r}, "
            f"num_thresholds={self.num_thresholds}, multi_label={self.multi_label})"
        )


# ------------------------------------------------------------------- precision and recall


@functools.partial(jax.jit, static_argnames=("thresholds", "from_logits", "top_k", "class_id"))
def _rate_counts(
    y_true: jax.Array,
    y_pred: jax.Array,
    weights: jax.Array | None,
    *,
    thresholds: tuple[float, ...],
    from_logits: bool,
    top_k: int | None,
    class_id: int | None,
) -> ConfusionState:
    """The counts of one batch for :class:`Precision` and :class:`Recall`, pooled."""
    y_true, y_pred = _same_rank(jnp.asarray(y_true), _floats(y_pred))
    _check_same_shape(y_true, y_pred, "Precision and Recall")
    w = _broadcast_weights(weights, y_pred.shape)
    if from_logits:
        y_pred = jax.nn.sigmoid(y_pred)
    if top_k is not None:
        if y_pred.ndim < 1 or y_pred.shape[-1] < top_k:
            raise ValueError(
                "Expected `top_k` <= the size of the last axis of y_pred. "
                f"Received: top_k={top_k}, y_pred.shape={y_pred.shape}."
            )
        _, top = jax.lax.top_k(y_pred, top_k)
        in_top = jnp.any(jax.nn.one_hot(top, y_pred.shape[-1], dtype=bool), axis=-2)
        y_pred = jnp.where(in_top, y_pred, _NEG_INF)
    if class_id is not None:
        if y_pred.ndim < 2 or class_id >= y_pred.shape[-1]:
            raise ValueError(
                "Expected `class_id` to index the last axis of a y_pred of shape "
                f"[batch, classes]. Received: class_id={class_id}, y_pred.shape={y_pred.shape}."
            )
        y_true, y_pred, w = (a[..., class_id, None] for a in (y_true, y_pred, w))
    order = np.argsort(np.asarray(thresholds), kind="stable")
    ordered = np.asarray(thresholds, np.float32)[order]
    counts = _threshold_counts(y_true != 0, w, y_pred, ordered, per_label=False)
    unsort = np.argsort(order, kind="stable")  # back to the order the thresholds were given
    return ConfusionState(*(c[unsort] for c in counts))


@functools.partial(jax.jit, static_argnames="single")
def _rate_value(hits: jax.Array, misses: jax.Array, *, single: bool) -> jax.Array:
    rate = _divide_no_nan(hits, hits + misses)
    return rate[0] if single else rate


class _ThresholdedRate(_StreamingMetric):
    """Precision or recall at one or more thresholds (Keras's shared update)."""

    _default_name = ""

    def __init__(
        self,
        thresholds: float | Sequence[float] | None = None,
        top_k: int | None = None,
        class_id: int | None = None,
        name: str | None = None,
        *,
        from_logits: bool = False,
    ):
        self.name = _check_name(name, self._default_name)
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(
                f"Expected `top_k` to be an integer >= 1 or None. Received: top_k={top_k!r}."
            )
        if class_id is not None and (not _is_int(class_id) or class_id < 0):
            raise ValueError(
                "Expected `class_id` to be an integer >= 0 or None. "
                f"Received: class_id={class_id!r}."
            )
        self.top_k = None if top_k is None else int(top_k)
        self.class_id = None if class_id is None else int(class_id)
        self.from_logits = _check_bool(from_logits, "from_logits")
        if thresholds is None:
            self.thresholds = [0.5 if top_k is None else _NEG_INF]
        else:
            self.thresholds = _check_thresholds(thresholds)
            if not self.thresholds:
                raise ValueError(
                    "Expected `thresholds` to hold at least one value. "
                    f"Received: thresholds={thresholds!r}."
                )

    def empty(self) -> ConfusionState:
        """Zero counts, one per threshold."""
        zeros = jnp.zeros((len(self.thresholds),), jnp.float32)
        return ConfusionState(zeros, zeros, zeros, zeros)

    def update(
        self,
        state: ConfusionState,
        y_true: ArrayLike,
        y_pred: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> ConfusionState:
        """Adds one batch; all elements are pooled (micro), as Keras does.

        Args:
          state: the counts so far.
          y_true: labels (nonzero means positive), the shape of ``y_pred``; ``[batch]``
            also meets ``[batch, 1]``.
          y_pred: probabilities (or logits with ``from_logits``); ``[batch, classes]`` for
            ``top_k`` and ``class_id``.
          weights: ``[batch]`` (0 for padding) or per element; ``None`` means ones.

        Returns:
          The new state.
        """
        counts = _rate_counts(
            _array(y_true),
            _array(y_pred),
            _row_weights(weights, y_true),
            thresholds=tuple(self.thresholds),
            from_logits=self.from_logits,
            top_k=self.top_k,
            class_id=self.class_id,
        )
        return self.merge(state, counts)


class Precision(_ThresholdedRate):
    """Weighted precision ``tp / (tp + fp)`` of ``y_pred > threshold``, as Keras.

    Args:
      thresholds: a float or a list of floats in ``[0, 1]``; default 0.5 (no threshold
        with ``top_k``: exactly the top ``k`` predictions are positive).
      top_k: only the ``k`` largest predictions of each row (last axis) may be positive.
      class_id: restrict to this class (column of ``[batch, classes]`` data).
      name: the key under which the value is logged; default ``"precision"``.
      from_logits: apply a sigmoid to ``y_pred`` first (hkfit addition, not in Keras).

    Raises:
      ValueError: for an invalid argument; the message names it.

    >>> m = Precision()
    >>> s = m.update(m.empty(), jnp.array([0, 1, 1, 1]), jnp.array([1.0, 0, 1, 1]))
    >>> round(float(m.compute(s)), 4)
    0.6667
    """

    _default_name = "precision"

    def compute(self, state: ConfusionState) -> jax.Array:
        """A scalar for one threshold, else one precision per threshold (as given)."""
        single = len(self.thresholds) == 1
        return _rate_value(state.true_positives, state.false_positives, single=single)


class Recall(_ThresholdedRate):
    """Weighted recall ``tp / (tp + fn)`` of ``y_pred > threshold``, as Keras.

    Args:
      thresholds: a float or a list of floats in ``[0, 1]``; default 0.5 (no threshold
        with ``top_k``: exactly the top ``k`` predictions are positive).
      top_k: only the ``k`` largest predictions of each row (last axis) may be positive.
      class_id: restrict to this class (column of ``[batch, classes]`` data).
      name: the key under which the value is logged; default ``"recall"``.
      from_logits: apply a sigmoid to ``y_pred`` first (hkfit addition, not in Keras).

    Raises:
      ValueError: for an invalid argument; the message names it.

    >>> m = Recall()
    >>> s = m.update(m.empty(), jnp.array([0, 1, 1, 1]), jnp.array([1.0, 0, 1, 1]))
    >>> round(float(m.compute(s)), 4)
    0.6667
    """

    _default_name = "recall"

    def compute(self, state: ConfusionState) -> jax.Array:
        """A scalar for one threshold, else one recall per threshold (as given)."""
        single = len(self.thresholds) == 1
        return _rate_value(state.true_positives, state.false_negatives, single=single)


# --------------------------------------------------------------------------------- F-scores


@functools.partial(jax.jit, static_argnames=("threshold", "micro", "from_logits", "num_classes"))
def _fbeta_counts(
    y_true: jax.Array,
    y_pred: jax.Array,
    weights: jax.Array | None,
    *,
    threshold: float | None,
    micro: bool,
    from_logits: bool,
    num_classes: int | None,
) -> FBetaState:
    """The counts of one batch for :class:`FBetaScore`: per class, or pooled if ``micro``."""
    y_true, y_pred = _floats(y_true), _floats(y_pred)
    y_true = y_true[:, None] if y_true.ndim == 1 else y_true
    y_pred = y_pred[:, None] if y_pred.ndim == 1 else y_pred
    if y_pred.ndim != 2 or y_true.shape != y_pred.shape:
        raise ValueError(
            "F1Score and FBetaScore expect one-hot `y_true` and `y_pred` of the same shape "
            f"[batch, num_classes]. Received: y_true.shape={y_true.shape}, "
            f"y_pred.shape={y_pred.shape}."
        )
    if num_classes is not None and y_pred.shape[1] != num_classes:
        raise ValueError(
            f"Expected `y_pred` with num_classes={num_classes} columns. "
            f"Received: y_pred.shape={y_pred.shape}."
        )
    if from_logits:
        y_pred = jax.nn.sigmoid(y_pred)
    if threshold is None:  # Keras: the row's maximum, unless it is 0
        top = jnp.max(y_pred, axis=-1, keepdims=True)
        hit = (y_pred >= top) & (jnp.abs(y_pred) > 1e-9)
    else:
        hit = y_pred > threshold
    pred = hit.astype(jnp.float32)
    w = _broadcast_weights(weights, y_true.shape)

    def total(values: jax.Array) -> jax.Array:
        return jnp.sum(_masked(w, values), axis=None if micro else 0)

    return FBetaState(
        total(pred * y_true),
        total(pred * (1.0 - y_true)),
        total((1.0 - pred) * y_true),
        total(y_true),
    )


@functools.partial(jax.jit, static_argnames="average")
def _fbeta_value(state: FBetaState, beta: jax.Array, *, average: str | None) -> jax.Array:
    """Keras's ``FBetaScore.result``, dividing exactly (0 where undefined)."""
    tp = state.true_positives
    precision = _divide_no_nan(tp, tp + state.false_positives)
    recall = _divide_no_nan(tp, tp + state.false_negatives)
    b2 = beta**2
    score = _divide_no_nan((1.0 + b2) * precision * recall, b2 * precision + recall)
    if average == "weighted":
        support = state.intermediate_weights
        return jnp.sum(score * _divide_no_nan(support, jnp.sum(support)))
    if average is not None:
        return jnp.mean(score)
    return score


class FBetaScore(_StreamingMetric):
    """F-beta score of multi-class or multi-label predictions, as ``keras.metrics.FBetaScore``.

    ``y_true`` is one-hot (or multi-hot) ``[batch, num_classes]``, ``y_pred`` the same
    shape. With ``threshold=None`` the largest prediction of each row is the predicted
    class (ties all count, and a prediction of exactly 0 never does); otherwise
    ``y_pred > threshold`` is. ``F = (1 + beta²) P R / (beta² P + R)``, 0 where undefined.

    Args:
      average: ``None`` (one score per class: ``compute`` returns a vector, which hkfit
        cannot log as one float), ``"micro"`` (counts pooled over classes), ``"macro"``
        (unweighted mean of the class scores) or ``"weighted"`` (mean weighted by each
        class's weighted support).
      beta: weight of recall, > 0.
      threshold: ``None`` (argmax) or a float in ``(0, 1]``.
      name: the key under which the value is logged; default ``"fbeta_score"``.
      from_logits: apply a sigmoid to ``y_pred`` first (hkfit addition, not in Keras).
        With ``threshold=None`` only the argmax matters, so softmax logits work too.
      num_classes: the size of the last axis; required unless ``average="micro"``
        (hkfit states have a fixed shape). Not a Keras argument.

    Raises:
      ValueError: for an invalid argument; the message names it.

    >>> m = FBetaScore(beta=2.0, threshold=0.5, num_classes=3)
    >>> y_true = jnp.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    >>> y_pred = jnp.array([[0.2, 0.6, 0.7], [0.2, 0.6, 0.6], [0.6, 0.8, 0.0]])
    >>> [round(float(v), 4) for v in m.compute(m.update(m.empty(), y_true, y_pred))]
    [0.3846, 0.9091, 0.8333]
    """

    _default_name = "fbeta_score"

    def __init__(
        self,
        average: str | None = None,
        beta: float = 1.0,
        threshold: float | None = None,
        name: str | None = None,
        *,
        from_logits: bool = False,
        num_classes: int | None = None,
    ):
        self.name = _check_name(name, self._default_name)
        if average not in (None, "micro", "macro", "weighted"):
            raise ValueError(
                "Expected `average` to be one of None, 'micro', 'macro', 'weighted'. "
                f"Received: average={average!r}."
            )
        if not _is_real(beta) or not beta > 0:
            raise ValueError(f"Expected `beta` to be a float > 0. Received: beta={beta!r}.")
        if threshold is not None and (not _is_real(threshold) or not 0.0 < threshold <= 1.0):
            raise ValueError(
                "Expected `threshold` to be None or a float with 0 < threshold <= 1. "
                f"Received: threshold={threshold!r}."
            )
        if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
            raise ValueError(
                "Expected `num_classes` to be an integer >= 1. "
                f"Received: num_classes={num_classes!r}."
            )
        if average != "micro" and num_classes is None:
            raise ValueError(
                f"Expected `num_classes` (the size of the last axis of y_pred) with "
                f"average={average!r}: hkfit creates metric states before the first batch. "
                "Pass num_classes=..., or average='micro'. Received: num_classes=None."
            )
        self.average = average
        self.beta = float(beta)
        self.threshold = None if threshold is None else float(threshold)
        self.from_logits = _check_bool(from_logits, "from_logits")
        self.num_classes = None if num_classes is None else int(num_classes)

    def empty(self) -> FBetaState:
        """Zero counts: scalars for ``"micro"``, else ``[num_classes]``."""
        shape = () if self.average == "micro" else (self.num_classes,)
        zeros = jnp.zeros(shape, jnp.float32)
        return FBetaState(zeros, zeros, zeros, zeros)

    def update(
        self,
        state: FBetaState,
        y_true: ArrayLike,
        y_pred: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> FBetaState:
        """Adds one batch.

        Args:
          state: the counts so far.
          y_true: one-hot labels ``[batch, num_classes]`` (``[batch]`` means one column).
          y_pred: predictions of the same shape.
          weights: ``[batch]`` (0 for padding) or ``[batch, num_classes]``.

        Returns:
          The new state.
        """
        counts = _fbeta_counts(
            _array(y_true),
            _array(y_pred),
            _row_weights(weights, y_true),
            threshold=self.threshold,
            micro=self.average == "micro",
            from_logits=self.from_logits,
            num_classes=self.num_classes,
        )
        return self.merge(state, counts)

    def compute(self, state: FBetaState) -> jax.Array:
        """The score: a vector ``[num_classes]`` for ``average=None``, else a scalar."""
        return _fbeta_value(state, jnp.float32(self.beta), average=self.average)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, average={self.average!r})"


class F1Score(FBetaScore):
    """F1 score (``FBetaScore`` with ``beta=1``), as ``keras.metrics.F1Score``.

    Args:
      average: ``None`` (a vector of class scores), ``"micro"``, ``"macro"`` or
        ``"weighted"``; see :class:`FBetaScore`.
      threshold: ``None`` (argmax) or a float in ``(0, 1]``.
      name: the key under which the value is logged; default ``"f1_score"``.
      from_logits: apply a sigmoid to ``y_pred`` first (hkfit addition, not in Keras).
      num_classes: the size of the last axis; required unless ``average="micro"``.

    Raises:
      ValueError: for an invalid argument; the message names it.

    >>> m = F1Score(threshold=0.5, num_classes=3)
    >>> y_true = jnp.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    >>> y_pred = jnp.array([[0.2, 0.6, 0.7], [0.2, 0.6, 0.6], [0.6, 0.8, 0.0]])
    >>> [round(float(v), 4) for v in m.compute(m.update(m.empty(), y_true, y_pred))]
    [0.5, 0.8, 0.6667]
    """

    _default_name = "f1_score"

    def __init__(
        self,
        average: str | None = None,
        threshold: float | None = None,
        name: str | None = None,
        *,
        from_logits: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__(
            average,
            1.0,
            threshold,
            name,
            from_logits=from_logits,
            num_classes=num_classes,
        )


# ----------------------------------------------------------------------------------- MeanIoU


@functools.partial(
    jax.jit,
    static_argnames=("num_classes", "ignore_class", "sparse_y_true", "sparse_y_pred", "axis"),
)
def _iou_confusion(
    y_true: jax.Array,
    y_pred: jax.Array,
    weights: jax.Array | None,
    *,
    num_classes: int,
    ignore_class: int | None,
    sparse_y_true: bool,
    sparse_y_pred: bool,
    axis: int,
) -> ConfusionMatrixState:
    """The weighted confusion matrix of one batch for :class:`MeanIoU`."""
    y_true, y_pred = jnp.asarray(y_true), jnp.asarray(y_pred)
    if not sparse_y_true:
        y_true = jnp.argmax(y_true, axis=axis)
    if not sparse_y_pred:
        y_pred = jnp.argmax(y_pred, axis=axis)
    if y_true.size != y_pred.size:
        raise ValueError(
            "Expected as many class ids in `y_true` as in `y_pred` (after any argmax). "
            f"Received: y_true.shape={y_true.shape}, y_pred class ids of shape {y_pred.shape}."
        )
    w = _broadcast_weights(weights, y_true.shape).ravel()
    t, p, n = _floats(y_true).ravel(), _floats(y_pred).ravel(), num_classes
    valid = (w != 0) & (t >= 0) & (t < n) & (p >= 0) & (p < n)
    if ignore_class is not None:
        valid &= t != ignore_class
    ids = jnp.where(valid, t.astype(jnp.int32) * n + p.astype(jnp.int32), 0)
    cm = jax.ops.segment_sum(jnp.where(valid, w, 0.0), ids, num_segments=n * n)
    return ConfusionMatrixState(cm.reshape(n, n))


@jax.jit
def _mean_iou_value(state: ConfusionMatrixState) -> jax.Array:
    cm = state.total_cm
    tp = jnp.diagonal(cm)
    denominator = jnp.sum(cm, axis=0) + jnp.sum(cm, axis=1) - tp
    num_valid = jnp.sum((denominator > 0).astype(jnp.float32))
    return _divide_no_nan(jnp.sum(_divide_no_nan(tp, denominator)), num_valid)


class MeanIoU(_StreamingMetric):
    """Mean intersection-over-union from a weighted confusion matrix, as Keras.

    ``IoU_c = tp_c / (tp_c + fp_c + fn_c)``; the result is the mean over the classes
    whose denominator is not 0 (classes never seen nor predicted are left out). Pixels
    (elements) are pooled, so segmentation maps ``[batch, H, W]`` work, and per-row
    weights spread over every element of their row.

    Args:
      num_classes: the number of classes (the confusion matrix is ``num_classes²``).
      name: the key under which the value is logged; default ``"mean_io_u"`` (Keras 3's
        automatic name for this class).
      ignore_class: a label whose elements are left out (e.g. a "void" class).
      sparse_y_true: ``y_true`` holds class ids; ``False`` takes its argmax over ``axis``.
      sparse_y_pred: ``y_pred`` holds class ids. Default ``False`` (Keras: ``True``): hkfit
        models emit logits, and the class is their argmax over ``axis``.
      axis: the class axis for the argmax.

    Labels or predicted ids outside ``[0, num_classes)`` contribute nothing.

    Raises:
      ValueError: for an invalid argument; the message names it.

    >>> m = MeanIoU(num_classes=2, sparse_y_pred=True)
    >>> s = m.update(m.empty(), jnp.array([0, 0, 1, 1]), jnp.array([0, 1, 0, 1]),
    ...              jnp.array([0.3, 0.3, 0.3, 0.1]))
    >>> round(float(m.compute(s)), 6)
    0.238095
    """

    def __init__(
        self,
        num_classes: int,
        name: str | None = None,
        *,
        ignore_class: int | None = None,
        sparse_y_true: bool = True,
        sparse_y_pred: bool = False,
        axis: int = -1,
    ):
        if not _is_int(num_classes) or num_classes < 1:
            raise ValueError(
                "Expected `num_classes` to be an integer >= 1. "
                f"Received: num_classes={num_classes!r}."
            )
        if ignore_class is not None and not _is_int(ignore_class):
            raise ValueError(
                "Expected `ignore_class` to be an integer or None. "
                f"Received: ignore_class={ignore_class!r}."
            )
        if not _is_int(axis):
            raise ValueError(f"Expected `axis` to be an integer. Received: axis={axis!r}.")
        self.name = _check_name(name, "mean_io_u")
        self.num_classes = int(num_classes)
        self.ignore_class = None if ignore_class is None else int(ignore_class)
        self.sparse_y_true = _check_bool(sparse_y_true, "sparse_y_true")
        self.sparse_y_pred = _check_bool(sparse_y_pred, "sparse_y_pred")
        self.axis = int(axis)

    def empty(self) -> ConfusionMatrixState:
        """A zero confusion matrix."""
        return ConfusionMatrixState(jnp.zeros((self.num_classes,) * 2, jnp.float32))

    def update(
        self,
        state: ConfusionMatrixState,
        y_true: ArrayLike,
        y_pred: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> ConfusionMatrixState:
        """Adds one batch.

        Args:
          state: the confusion matrix so far.
          y_true: class ids ``[batch, ...]`` (one-hot if not ``sparse_y_true``).
          y_pred: scores ``[batch, ..., num_classes]`` (class ids if ``sparse_y_pred``).
          weights: ``[batch]`` (0 for padding), or per element of the class-id labels.

        Returns:
          The new state.
        """
        counts = _iou_confusion(
            _array(y_true),
            _array(y_pred),
            _row_weights(weights, y_true),
            num_classes=self.num_classes,
            ignore_class=self.ignore_class,
            sparse_y_true=self.sparse_y_true,
            sparse_y_pred=self.sparse_y_pred,
            axis=self.axis,
        )
        return self.merge(state, counts)

    def compute(self, state: ConfusionMatrixState) -> jax.Array:
        """The mean IoU over the classes with a nonzero denominator; 0 if none."""
        return _mean_iou_value(state)

    def __repr__(self) -> str:
        return f"MeanIoU(num_classes={self.num_classes}, name={self.name!r})"


# ------------------------------------------------------------------------------------ R2Score


@functools.partial(jax.jit, static_argnames="num_outputs")
def _r2_sums(
    y_true: jax.Array, y_pred: jax.Array, weights: jax.Array | None, *, num_outputs: int
) -> R2State:
    """The sums of one batch for :class:`R2Score`."""
    y_true, y_pred = _same_rank(_floats(y_true), _floats(y_pred))
    y_true = y_true[:, None] if y_true.ndim == 1 else y_true
    y_pred = y_pred[:, None] if y_pred.ndim == 1 else y_pred
    if y_true.ndim != 2 or y_true.shape != y_pred.shape or y_true.shape[1] != num_outputs:
        raise ValueError(
            f"Expected `y_true` and `y_pred` of shape [batch, num_outputs={num_outputs}]. "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}."
        )
    w = _broadcast_weights(weights, y_true.shape)
    return R2State(
        jnp.sum(_masked(w, y_true), axis=0),
        jnp.sum(_masked(w, y_true * y_true), axis=0),
        jnp.sum(_masked(w, (y_true - y_pred) ** 2), axis=0),
        jnp.sum(w, axis=0),
        jnp.sum(jnp.any(w != 0, axis=-1).astype(jnp.float32)),
    )


@functools.partial(jax.jit, static_argnames=("class_aggregation", "num_regressors"))
def _r2_value(state: R2State, *, class_aggregation: str | None, num_regressors: int) -> jax.Array:
    """Keras's ``R2Score.result``, falling back to the plain R² without a warning."""
    mean = state.sum / state.weighted_count
    total = state.squared_sum - state.sum * mean
    raw = 1.0 - state.total_mse / total
    raw = jnp.where(jnp.isinf(raw), 0.0, raw)
    if class_aggregation == "uniform_average":
        r2 = jnp.mean(raw)
    elif class_aggregation == "variance_weighted_average":
        r2 = jnp.sum(total * raw) / jnp.sum(total)
    else:
        r2 = raw
    if num_regressors:
        n, p = state.num_samples, float(num_regressors)
        adjusted = 1.0 - (1.0 - r2) * (n - 1.0) / jnp.where(p < n - 1.0, n - p - 1.0, 1.0)
        r2 = jnp.where(p < n - 1.0, adjusted, r2)
    return r2


class R2Score(_StreamingMetric):
    """Coefficient of determination R² (optionally adjusted), as ``keras.metrics.R2Score``.

    Per output: ``1 - sum w (y - y_pred)² / sum w (y - mean_w(y))²``, from running sums
    of ``w y``, ``w y²``, ``w (y - y_pred)²`` and ``w``; an infinite score becomes 0 and a
    0/0 one stays NaN, as in Keras.

    Args:
      class_aggregation: ``"uniform_average"`` (mean over outputs),
        ``"variance_weighted_average"`` (weighted by each output's variance) or ``None``
        (a vector ``[num_outputs]``).
      num_regressors: ``p`` for the adjusted R² ``1 - (1 - R²)(n - 1) / (n - p - 1)``,
        with ``n`` the number of rows of nonzero weight; the plain R² is returned (without
        Keras's warning) when ``p >= n - 1``. 0 means no adjustment.
      name: the key under which the value is logged; default ``"r2_score"``.
      num_outputs: the size of the last axis of ``y_true`` (Keras reads it from the first
        batch; hkfit states have a fixed shape). ``[batch]`` data is one output.

    Raises:
      ValueError: for an invalid argument; the message names it.

    >>> m = R2Score()
    >>> s = m.update(m.empty(), jnp.array([[1.0], [4.0], [3.0]]), jnp.array([[2.0], [4.0], [4.0]]))
    >>> round(float(m.compute(s)), 5)
    0.57143
    """

    def __init__(
        self,
        class_aggregation: str | None = "uniform_average",
        num_regressors: int = 0,
        name: str | None = None,
        *,
        num_outputs: int = 1,
    ):
        valid = (None, "uniform_average", "variance_weighted_average")
        if class_aggregation not in valid:
            raise ValueError(
                f"Expected `class_aggregation` to be one of {valid}. "
                f"Received: class_aggregation={class_aggregation!r}."
            )
        if not _is_int(num_regressors) or num_regressors < 0:
            raise ValueError(
                "Expected `num_regressors` to be an integer >= 0. "
                f"Received: num_regressors={num_regressors!r}."
            )
        if not _is_int(num_outputs) or num_outputs < 1:
            raise ValueError(
                "Expected `num_outputs` to be an integer >= 1. "
                f"Received: num_outputs={num_outputs!r}."
            )
        self.name = _check_name(name, "r2_score")
        self.class_aggregation = class_aggregation
        self.num_regressors = int(num_regressors)
        self.num_outputs = int(num_outputs)

    def empty(self) -> R2State:
        """Zero sums."""
        zeros = jnp.zeros((self.num_outputs,), jnp.float32)
        return R2State(zeros, zeros, zeros, zeros, jnp.zeros((), jnp.float32))

    def update(
        self,
        state: R2State,
        y_true: ArrayLike,
        y_pred: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> R2State:
        """Adds one batch.

        Args:
          state: the sums so far.
          y_true: targets ``[batch, num_outputs]`` (or ``[batch]``).
          y_pred: predictions of the same shape.
          weights: ``[batch]`` (0 for padding) or ``[batch, num_outputs]``.

        Returns:
          The new state.
        """
        sums = _r2_sums(
            _array(y_true),
            _array(y_pred),
            _row_weights(weights, y_true),
            num_outputs=self.num_outputs,
        )
        return self.merge(state, sums)

    def compute(self, state: R2State) -> jax.Array:
        """The (adjusted) R²: a scalar, or ``[num_outputs]`` for ``class_aggregation=None``."""
        return _r2_value(
            state, class_aggregation=self.class_aggregation, num_regressors=self.num_regressors
        )

    def __repr__(self) -> str:
        return f"R2Score(name={self.name!r}, class_aggregation={self.class_aggregation!r})"


# -------------------------------------------------------------------------------- by name

NAMED: dict[str, Callable[..., Any]] = {
    "auc": AUC,
    "precision": Precision,
    "recall": Recall,
    "f1": functools.partial(F1Score, average="micro", threshold=0.5, name="f1"),
}
"""Factories of the metrics :func:`named` knows, each called as ``factory(from_logits=...)``."""


def named(name: str, *, from_logits: bool) -> AUC | Precision | Recall | F1Score:
    """A binary-classification metric by name, logged under that name.

    ``"auc"`` is ``AUC()`` (ROC, 200 thresholds), ``"precision"`` / ``"recall"`` threshold
    at 0.5, and ``"f1"`` is ``F1Score(average="micro", threshold=0.5)``: the F1 score of the
    positive class for ``[batch]`` or ``[batch, 1]`` outputs.

    Args:
      name: one of ``"auc"``, ``"precision"``, ``"recall"``, ``"f1"``.
      from_logits: whether the model outputs logits (a sigmoid is applied first).

    Returns:
      A fresh metric object.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in NAMED:
        raise ValueError(f"Expected `name` to be one of {sorted(NAMED)}. Received: name={name!r}.")
    return NAMED[name](from_logits=_check_bool(from_logits, "from_logits"))
