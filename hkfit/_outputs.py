"""Models with several outputs: one loss, weight, metrics and sample weights per output.

A forward that returns a dict (or a tuple/list) of arrays is a multi-output model when
``Model(loss=...)`` is a matching dict (or list). Each output with a loss is a
:class:`Head`. The objective is ``sum_k loss_weight_k * mean_k``, where ``mean_k`` is the
head's loss averaged with the head's own weights (``sum(w_k * l_k) / sum(w_k)``), exactly as
Keras combines the losses of its outputs; the logs hold that total as ``loss``, each head's
mean as ``<output>_loss`` and each head's metrics as ``<output>_<metric>``.

Outputs are named by their dict keys, and tuple/list outputs ``output_1``, ``output_2``,
... in order (as Keras names the outputs of a model that gives them no names). ``y`` and
``sample_weight`` are matched to the outputs the same way: dicts by key, lists by position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _loss_objects as loss_objects
from hkfit import losses as losses_lib
from hkfit import metrics as metrics_lib

PyTree = Any


def is_multi(loss: Any) -> bool:
    """Whether ``Model(loss=...)`` gives one loss per output (a dict, list or tuple)."""
    return isinstance(loss, (Mapping, list, tuple))


def output_name(index: int) -> str:
    """The name of output ``index`` (0-based) of a tuple/list output: ``output_<index+1>``."""
    return f"output_{index + 1}"


def _structure(loss: Any) -> dict[str, Any]:
    """``{name: key}`` of the outputs the spec ``loss`` (dict or list) refers to."""
    if isinstance(loss, Mapping):
        return {str(k): k for k in loss}
    return {output_name(i): i for i in range(len(loss))}


class Head(NamedTuple):
    """One output of a multi-output model.

    Attributes:
      name: the output's name in the logs (its dict key, or ``output_<i+1>``).
      key: where it sits in the forward's output (a dict key or a position).
      loss: the loss as given (a name, a loss object or a callable); ``None`` when the
        output is not trained (it may still have metrics).
      loss_fn: ``(y_true, y_pred) -> per-example losses``, or ``None``.
      weight: its ``loss_weights`` entry (1.0 by default).
    """

    name: str
    key: Any
    loss: Any
    loss_fn: Callable | None
    weight: float


class Heads(NamedTuple):
    """The heads of a multi-output model, in the forward's output order."""

    heads: tuple[Head, ...]

    def trained(self) -> tuple[Head, ...]:
        """The heads that have a loss."""
        return tuple(h for h in self.heads if h.loss_fn is not None)


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(
            f"Expected each entry of `loss_weights` to be a number. Received: "
            f"loss_weights[{name!r}]={value!r} of type {type(value).__name__}."
        )
    if not np.isfinite(value) or value < 0:
        raise ValueError(
            f"Expected each entry of `loss_weights` to be finite and >= 0. Received: "
            f"loss_weights[{name!r}]={value!r}."
        )
    return float(value)


def heads(loss: Any, loss_weights: Any = None) -> Heads:
    """Checks ``Model(loss=..., loss_weights=...)`` of a multi-output model.

    Args:
      loss: a dict ``{output_key: loss}`` or a list with one loss (or ``None``) per output.
      loss_weights: ``None``, or a dict / list matching ``loss``.

    Raises:
      ValueError / TypeError: for an unknown loss name, mismatched ``loss_weights`` or
        a weight that is not a number >= 0.
    """
    names = _structure(loss)
    entries = loss if isinstance(loss, Mapping) else dict(zip(names.values(), loss))
    if not any(value is not None for value in entries.values()):
        raise ValueError(f"Expected at least one output with a loss. Received: loss={loss!r}.")
    weights = {name: 1.0 for name in names}
    if loss_weights is not None:
        if isinstance(loss_weights, Mapping) != isinstance(loss, Mapping) or (
            not isinstance(loss_weights, (Mapping, list, tuple))
        ):
            raise TypeError(
                "Expected `loss_weights` to have the structure of `loss` (a dict of the same "
                f"keys, or a list of the same length). Received: loss={loss!r}, "
                f"loss_weights={loss_weights!r}."
            )
        given = _structure(loss_weights)
        if isinstance(loss_weights, Mapping):
            unknown = sorted(set(given) - set(names))
            values = {str(k): v for k, v in loss_weights.items()}
        else:
            unknown = [] if len(loss_weights) == len(names) else ["(length)"]
            values = dict(zip(names, loss_weights))
        if unknown:
            raise ValueError(
                f"Expected `loss_weights` for the outputs of `loss` {sorted(names)}. Received: "
                f"loss_weights={loss_weights!r}."
            )
        weights.update({name: _check_weight(name, v) for name, v in values.items()})
    built = []
    for name, key in names.items():
        spec = entries[key]
        fn = None if spec is None else losses_lib.get(spec)
        built.append(Head(name, key, spec, fn, weights[name]))
    return Heads(tuple(built))


def _keys_of(tree: Any) -> list[str] | None:
    """Output names of a dict / tuple / list output; ``None`` for a single array."""
    return list(_structure(tree)) if isinstance(tree, (Mapping, list, tuple)) else None


def _describe(keys: list[str] | None) -> str:
    return "a single array" if keys is None else f"the outputs {keys}"


def check_structure(found: Heads, out: PyTree, y: PyTree) -> None:
    """Checks that the forward's output and the labels have every output ``found`` names.

    Raises:
      ValueError: naming the outputs, the labels and what to pass.
    """
    out_keys = _keys_of(out)
    names = [h.name for h in found.heads]
    if out_keys is None or set(names) - set(out_keys):
        raise ValueError(
            f"`loss` names the outputs {names}, but the forward returns "
            f"{_describe(out_keys)}. Expected one loss per output name (dict keys; "
            "output_1, output_2, ... for a tuple or list)."
        )
    y_keys = _keys_of(y)
    if y_keys is None:
        raise ValueError(
            f"Expected `y` to be a dict (or a list) of targets, one per output {names}. "
            "Received: a single array."
        )
    unknown = sorted(set(y_keys) - set(out_keys))
    if unknown:
        raise ValueError(
            f"`y` has targets for {unknown}, which the forward does not output. Expected "
            f"targets for the outputs {out_keys}."
        )
    missing = [h.name for h in found.trained() if h.name not in y_keys or at(y, h) is None]
    if missing:
        raise ValueError(
            f"Expected `y` to hold targets for every output with a loss. Missing: {missing}."
        )


def at(tree: PyTree, head: Head) -> Any:
    """``tree[head.key]`` of a dict, tuple or list."""
    if isinstance(tree, Mapping):
        return tree.get(head.key, tree.get(head.name))
    return tree[head.key] if head.key < len(tree) else None


def leaf_indices(found: Heads, out: PyTree) -> dict[str, int | None]:
    """``{output name: index of its array among the output's leaves}`` (None if nested)."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
    indices: dict[str, int | None] = {}
    for head in found.heads:
        key = (
            jax.tree_util.DictKey(head.key)
            if isinstance(out, Mapping)
            else jax.tree_util.SequenceKey(head.key)
        )
        indices[head.name] = paths.index((key,)) if (key,) in paths else None
    return indices


def require_matching_loss(loss: Any, out: PyTree) -> None:
    """A single loss name (or loss object) cannot take several outputs: says what to pass.

    Plain callables may take the whole output pytree and pass.
    """
    keys = _keys_of(out)
    if keys is None or not (isinstance(loss, str) or loss_objects.is_loss_object(loss)):
        return
    example = (
        "{" + ", ".join(f"{k!r}: {loss!r}" for k in keys) + "}"
        if isinstance(out, Mapping)
        else "[" + ", ".join(repr(loss) for _ in keys) + "]"
    )
    raise ValueError(
        f"The forward returns {len(keys)} outputs {keys}, and loss={loss!r} takes one "
        f"array. Expected one loss per output, e.g. loss={example} (loss_weights= weighs "
        "them; None leaves an output untrained), or a callable taking the whole output "
        "pytree."
    )


# --- Weights --------------------------------------------------------------------------


def named_weights(sample_weight: Any) -> dict[str, Any] | None:
    """A dict / list ``sample_weight`` as ``{output name: weights}``; None otherwise."""
    if isinstance(sample_weight, Mapping):
        return {str(k): v for k, v in sample_weight.items()}
    if isinstance(sample_weight, (list, tuple)):
        return {output_name(i): v for i, v in enumerate(sample_weight) if v is not None}
    return None


def head_weights(weights: Any, head: Head, mask: jax.Array) -> jax.Array:
    """What head ``head``'s loss (and weighted metrics) weigh its rows by.

    ``weights`` is the batch's weights: one array for every output, or a dict of
    per-output weights, where an output without weights gets ``mask`` (its real rows).
    """
    if isinstance(weights, Mapping):
        return weights.get(head.name, mask)
    return weights


def check_weight_names(weights: Any, found: Heads) -> None:
    """Refuses per-output weights for outputs that do not exist (at trace time)."""
    if not isinstance(weights, Mapping):
        return
    unknown = sorted(set(weights) - {h.name for h in found.heads})
    if unknown:
        raise ValueError(
            f"`sample_weight` has weights for {unknown}, which are not outputs of the model. "
            f"Expected keys among {[h.name for h in found.heads]}."
        )


def head_losses(found: Heads, y_true: PyTree, y_pred: PyTree) -> dict[str, jax.Array]:
    """Each trained head's per-example (or per-token) losses."""
    losses = {}
    for h in found.trained():
        assert h.loss_fn is not None  # trained heads have one
        losses[h.name] = h.loss_fn(at(y_true, h), at(y_pred, h))
    return losses


def objective(
    found: Heads, losses: dict[str, jax.Array], weights: Any, mask: jax.Array, mean: Callable
) -> jax.Array:
    """``sum_k loss_weight_k * mean(losses_k, weights_k)`` over the trained heads."""
    total = jnp.zeros((), jnp.float32)
    for h in found.trained():
        total = total + h.weight * mean(losses[h.name], head_weights(weights, h, mask))
    return total


# --- Logs -----------------------------------------------------------------------------


class HeadLoss(metrics_lib.Mean):
    """The running mean of one head's loss, logged as ``<output>_loss``.

    It enters the total ``loss`` times its ``loss_weight`` (see ``step.compute_logs``).
    """

    def __init__(self, head: Head):
        super().__init__(lambda _, values: values, f"{head.name}_loss")
        self.head = head
        self.loss_weight = head.weight

    def observe(self, state, batch, y_pred, losses, aux, mask):
        del y_pred, aux
        weights = head_weights(batch.weights, self.head, mask)
        return self.update(state, None, losses[self.head.name], weights)


class HeadMetric:
    """A metric of one output, logged as ``<output>_<metric>``.

    Plain metrics see the real rows (and per-token masks) of the head; weighted ones
    (``weighted_metrics=``) the head's sample weights.
    """

    def __init__(self, metric: Any, head: Head, weighted: bool, name: str):
        self.metric, self.head, self.weighted, self.name = metric, head, weighted, name

    def observe(self, state, batch, y_pred, losses, aux, mask):
        del losses, aux
        weights = head_weights(batch.weights, self.head, mask)
        if not self.weighted:
            weights = (
                (jnp.asarray(weights) > 0).astype(jnp.float32) if jnp.ndim(weights) > 1 else mask
            )
        return self.metric.update(state, at(batch.y, self.head), at(y_pred, self.head), weights)

    def empty(self) -> Any:
        return self.metric.empty()

    def merge(self, a: Any, b: Any) -> Any:
        return self.metric.merge(a, b)

    def compute(self, state: Any) -> Any:
        return self.metric.compute(state)

    def __repr__(self) -> str:
        return f"HeadMetric({self.metric!r}, name={self.name!r})"


def metric_specs(metrics: Any, arg: str, names: Sequence[str] | None = None) -> Any:
    """Checks the ``metrics=`` of a multi-output model: a dict, a list of lists or a list.

    A dict maps an output name to a metric or a list of metrics; a list of lists gives
    each output (in order) its metrics; a flat list gives every trained output the same
    metrics. Returns the spec as given (names are resolved once the outputs are known).
    """
    if isinstance(metrics, Mapping):
        for key, value in metrics.items():
            if names is not None and str(key) not in names:
                raise ValueError(
                    f"`{arg}` has metrics for {key!r}, which is not an output of `loss` "
                    f"{list(names)}. Expected keys among them."
                )
            for spec in _as_list(value):
                metrics_lib.get(spec)
        return metrics
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, (list, tuple)):
        raise TypeError(
            f"Expected `{arg}` of a multi-output model to be a dict {{output: metrics}}, a "
            f"list of lists (one per output) or a list. Received: {arg}={metrics!r}."
        )
    for entry in metrics:
        for spec in _as_list(entry):
            metrics_lib.get(spec)
    return metrics


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_head(metrics: Any, found: Heads) -> dict[str, list]:
    """``{output name: [metric specs]}`` from any accepted form of ``metrics``."""
    if isinstance(metrics, Mapping):
        return {str(k): _as_list(v) for k, v in metrics.items()}
    if metrics and all(isinstance(m, (list, tuple)) or m is None for m in metrics):
        if len(metrics) != len(found.heads):
            raise ValueError(
                f"Expected one list of metrics per output {[h.name for h in found.heads]}. "
                f"Received {len(metrics)} lists."
            )
        return {h.name: _as_list(m) for h, m in zip(found.heads, metrics)}
    return {h.name: list(metrics) for h in found.trained()}


def resolve_metrics(
    found: Heads, metrics: Any, weighted_metrics: Any, sample_y: PyTree, out: PyTree
) -> list:
    """The :class:`HeadLoss` of every trained head, then every head's metric objects."""
    resolved: list = [HeadLoss(h) for h in found.trained()]
    taken = {m.name for m in resolved}
    by_name = {h.name: h for h in found.heads}
    for weighted, spec in ((False, metrics), (True, weighted_metrics)):
        for name, entries in _per_head(spec, found).items():
            head = by_name[name]
            labels, outputs = at(sample_y, head), at(out, head)
            if labels is None:
                raise ValueError(
                    f"Metrics for output {name!r} need its targets: `y` has none for it."
                )
            for entry in entries:
                metric = metrics_lib.get(
                    entry,
                    y_true_shape=np.shape(labels),
                    y_pred_shape=getattr(outputs, "shape", ()),
                    loss_name=head.loss if isinstance(head.loss, str) else None,
                    from_logits=losses_lib.takes_logits(head.loss),
                )
                full = f"{name}_{metric.name}"
                if full in taken:
                    full = f"{name}_weighted_{metric.name}"
                taken.add(full)
                resolved.append(HeadMetric(metric, head, weighted, full))
    return resolved
