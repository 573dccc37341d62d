"""Where training stands inside an epoch, in the JSON form a checkpoint stores.

A full save made while an epoch runs (``BackupAndRestore(save_freq=N)``, a preemption,
``ModelCheckpoint(save_freq=N)``) records the epoch, how many of its batches are done,
the epoch's running metric states (so the resumed epoch's logs cover every batch) and,
for an iterable that has ``get_state``, its iterator state. A resumed ``fit`` starts at
the next batch of that epoch.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np


class Position(NamedTuple):
    """A point inside an epoch of ``fit``.

    Attributes:
      epoch: the 0-based index of the running epoch.
      batch: how many of its batches (optimizer steps) are done.
      logs: the epoch's metric states (a pytree of device arrays), or their JSON form.
      iterator: the ``get_state()`` of the training iterable after those batches, or None.
    """

    epoch: int
    batch: int
    logs: Any = None
    iterator: Any = None


def _leaf_json(leaf: Any) -> dict:
    array = np.asarray(jax.device_get(leaf))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "values": array.ravel().tolist()}


def encode(position: Position) -> dict:
    """``position`` as JSON (metric states are small: sums, counts, confusion tables)."""
    leaves = jax.tree_util.tree_leaves(position.logs)
    iterator = position.iterator
    try:
        json.dumps(iterator)
    except (TypeError, ValueError):
        warnings.warn(
            "The training iterator's get_state() is not JSON-serializable, so the "
            "checkpoint does not hold it; a resumed run reads the iterable from where "
            f"a new iterator starts. Received a state of type {type(iterator).__name__}.",
            stacklevel=2,
        )
        iterator = None
    return {
        "epoch": int(position.epoch),
        "batch": int(position.batch),
        "logs": [_leaf_json(leaf) for leaf in leaves],
        "iterator": iterator,
    }


def _int(value: Any, name: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{path!r} is corrupted: its position's {name} should be an int >= 0. "
            f"Received: {value!r}."
        )
    return value


def decode(encoded: Any, path: str) -> Position:
    """The position of a checkpoint's metadata (``logs`` still JSON).

    Raises:
      ValueError: naming ``path`` if the entry is malformed.
    """
    if not isinstance(encoded, dict) or not isinstance(encoded.get("logs", []), list):
        raise ValueError(f"{path!r} is corrupted: its position is {encoded!r}.")
    return Position(
        _int(encoded.get("epoch"), "epoch", path),
        _int(encoded.get("batch"), "batch", path),
        encoded.get("logs") or [],
        encoded.get("iterator"),
    )


def restore_logs(encoded: list, template: Any) -> Any:
    """Metric states of the structure of ``template`` from their JSON form, or None.

    None when they do not fit (the metrics changed): the epoch's logs then cover the
    batches after the resume point only.
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(encoded):
        return None
    restored = []
    for leaf, entry in zip(leaves, encoded):
        dtype = np.dtype(getattr(leaf, "dtype", np.float32))
        shape = tuple(np.shape(leaf))
        if not isinstance(entry, dict) or entry.get("dtype") != dtype.name:
            return None
        if list(shape) != entry.get("shape"):
            return None
        values = entry.get("values")
        if not isinstance(values, list) or len(values) != math.prod(shape):
            return None
        restored.append(np.asarray(values, dtype).reshape(shape))
    return jax.tree_util.tree_unflatten(treedef, restored)
