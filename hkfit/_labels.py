"""Sparse labels: which outputs take class indices, and the check of those indices.

A model whose loss (or one of whose outputs' losses) is a sparse categorical
crossentropy takes integer class indices as labels. Once the forward's output shapes are
known, the class count is the size of the output's last axis, and every label must be an
integer in ``[0, classes)`` (or the loss's ``ignore_class``): out-of-range labels would
train to NaN or wrap to another class, fractional ones would be truncated. Labels of
shape ``[n, 1]`` are squeezed to ``[n]``, as Keras does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from hkfit import _data as data_lib
from hkfit import _outputs as outputs_lib
from hkfit import losses as losses_lib


class SparseSpec(NamedTuple):
    """One sparse crossentropy: its output (None for a single-output model), class count,
    the number of axes of its output, and its ``ignore_class``."""

    head: Any
    classes: int
    ndim: int
    ignore_class: int | None


def _is_sparse(loss: Any) -> bool:
    return loss == "sparse_categorical_crossentropy" or isinstance(
        loss, losses_lib.SparseCategoricalCrossentropy
    )


def sparse_specs(loss: Any, heads: Any, out: Any) -> list[SparseSpec]:
    """The sparse crossentropies of ``loss`` (per output when ``heads``) on outputs ``out``."""
    if loss is None:
        return []
    pairs: list[tuple[Any, Any, Any]] = [(None, loss, out)]
    if heads is not None:
        kind = dict if isinstance(heads.heads[0].key, str) else (list, tuple)
        if not isinstance(out, kind):
            return []  # the wrong kind of outputs: the output check says so
        pairs = [(h, h.loss, outputs_lib.at(out, h)) for h in heads.trained()]
    specs = []
    for head, head_loss, leaf in pairs:
        shape: tuple[int, ...] = tuple(getattr(leaf, "shape", ()))
        if _is_sparse(head_loss) and len(shape) >= 2:
            ignore = getattr(head_loss, "ignore_class", None)
            specs.append(SparseSpec(head, shape[-1], len(shape), ignore))
    return specs


def _replaced(tree: Any, head: Any, value: Any) -> Any:
    """``tree`` (a dict, tuple or list of outputs) with ``head``'s entry set to ``value``."""
    if isinstance(tree, dict):
        key = head.key if head.key in tree else head.name
        return {**tree, key: value}
    items = list(tree)
    items[head.key] = value
    return type(tree)(items) if isinstance(tree, tuple) else items


def checked(y: Any, specs: list[SparseSpec], name: str = "y", check: bool = True) -> Any:
    """``y`` with its sparse labels checked against the class count (and squeezed).

    With ``check=False`` the labels are only squeezed.

    Raises:
      ValueError: naming ``name`` for a label outside ``[0, classes)`` or a fractional one.
    """
    for head, classes, ndim, ignore in specs:
        if head is None:
            return data_lib.sparse_labels(y, classes, ndim, name, ignore, check)
        labels = outputs_lib.at(y, head)
        where = f"{name}[{head.key!r}]"
        fixed = data_lib.sparse_labels(labels, classes, ndim, where, ignore, check)
        if fixed is not labels:
            y = _replaced(y, head, fixed)
    return y
