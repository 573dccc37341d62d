"""Where training stands inside an epoch, in the JSON form a checkpoint stores.

A full save made while an epoch runs (``BackupAndRestore(save_freq=N)``, a preemption,
``ModelCheckpoint(save_freq=N)``) records the epoch, how many of its batches are done,
the epoch's running metric states (so the resumed epoch's logs cover every batch) and,
for an iterable that has ``get_state``, its iterator state. A resumed ``fit`` starts at
the next batch of that epoch.

An iterator state that is ``bytes`` (a ``grain.python.DataLoader`` iterator's) is stored
in base64 under ``iterator_bytes``, and is ``bytes`` again when decoded. With several
processes, each process's state is stored (``iterators``) and each restores its own.
"""

from __future__ import annotations

import base64
import json
import math
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from hkfit import _shards


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


def _iterator_json(iterator: Any, stacklevel: int) -> dict:
    """An iterator state as position entries: ``iterator``, and ``iterator_bytes`` for bytes."""
    if isinstance(iterator, bytes):
        return {"iterator": None, "iterator_bytes": base64.b64encode(iterator).decode("ascii")}
    try:
        json.dumps(iterator)
    except (TypeError, ValueError):
        warnings.warn(
            "The training iterator's get_state() is not JSON-serializable, so the "
            "checkpoint does not hold it; a resumed run reads the iterable from where "
            f"a new iterator starts. Received a state of type {type(iterator).__name__}.",
            stacklevel=stacklevel + 1,
        )
        iterator = None
    return {"iterator": iterator}


def _every_process(entries: dict) -> list[dict]:
    """``entries`` of every process, in process order (every process must call this)."""
    mine = json.dumps(entries).encode()
    sizes = _shards.agree(True, len(mine).to_bytes(8, "little"))
    width = max(int.from_bytes(size, "little") for _, size in sizes)
    return [json.loads(row) for _, row in _shards.agree(True, mine.ljust(width))]


def encode(position: Position) -> dict:
    """``position`` as JSON (metric states are small: sums, counts, confusion tables).

    With several processes, an iterator state is every process's own (a feed sharded by
    process stands at another place in each): they are gathered under ``iterators``, in
    process order, so every process must call this.
    """
    leaves = jax.tree_util.tree_leaves(position.logs)
    own = _iterator_json(position.iterator, stacklevel=2)
    encoded = {
        "epoch": int(position.epoch),
        "batch": int(position.batch),
        "logs": [_leaf_json(leaf) for leaf in leaves],
        **own,
    }
    if position.iterator is not None and jax.process_count() > 1:
        encoded["iterators"] = _every_process(own)
    return encoded


def _int(value: Any, name: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{path!r} is corrupted: its position's {name} should be an int >= 0. "
            f"Received: {value!r}."
        )
    return value


def _iterator(entries: dict, path: str) -> Any:
    if entries.get("iterator_bytes") is None:
        return entries.get("iterator")
    try:
        return base64.b64decode(entries["iterator_bytes"], validate=True)
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        raise ValueError(
            f"{path!r} is corrupted: its position's iterator_bytes is not base64. "
            f"Received: {entries['iterator_bytes']!r}."
        ) from None


def decode(encoded: Any, path: str) -> Position:
    """The position of a checkpoint's metadata (``logs`` still JSON), with this process's
    iterator state (process 0's when the checkpoint was saved by another number of
    processes).

    Raises:
      ValueError: naming ``path`` if the entry is malformed.
    """
    if not isinstance(encoded, dict) or not isinstance(encoded.get("logs", []), list):
        raise ValueError(f"{path!r} is corrupted: its position is {encoded!r}.")
    iterator = _iterator(encoded, path)
    per_process = encoded.get("iterators")
    if per_process is not None:
        if not isinstance(per_process, list) or not all(isinstance(e, dict) for e in per_process):
            raise ValueError(
                f"{path!r} is corrupted: its position's iterators are {per_process!r}."
            )
        if len(per_process) == jax.process_count():
            iterator = _iterator(per_process[jax.process_index()], path)
    return Position(
        _int(encoded.get("epoch"), "epoch", path),
        _int(encoded.get("batch"), "batch", path),
        encoded.get("logs") or [],
        iterator,
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
