"""Data sources: in-memory arrays (pytrees) and iterables of batches.

Arrays that fit in memory are checked once, put on the device once per ``fit``, and
batched there by row indices (see :mod:`hkfit.step`): an epoch's shuffle is one device
permutation, never a copy of the dataset. Iterables (generators, ``tf.data`` numpy
iterators, torch ``DataLoader``, grain loaders) yield ``(x, y)`` or ``(x, y, sample_weight)``
batches that are moved to the device two batches ahead of the step that uses them.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

PyTree = Any


def is_array(value: Any) -> bool:
    """True for numpy/JAX arrays (anything with a shape and a dtype)."""
    return isinstance(value, (np.ndarray, jax.Array)) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__array__"))


def is_array_tree(value: Any) -> bool:
    """True for an array or a (nested) dict/list/tuple whose leaves are all arrays."""
    if is_array(value):
        return True
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple)):
        children = list(value)
    else:
        return False
    return bool(children) and all(is_array_tree(child) for child in children)


def num_rows(tree: PyTree, name: str) -> int:
    """The common length of every leaf of ``tree``.

    Raises:
      ValueError: if the leaves differ in length or one is a scalar.
    """
    paths_leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_array)
    lengths = {}
    for path, leaf in paths_leaves:
        shape = np.shape(leaf)
        where = f"{name}{jax.tree_util.keystr(path)}"
        if not shape:
            raise ValueError(f"Expected every array in `{name}` to have a batch axis. "
                             f"Received: a scalar at {where}.")
        lengths[where] = shape[0]
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Expected every array in `{name}` to have the same number of rows. "
                         f"Received: {', '.join(f'{k}: {v}' for k, v in lengths.items())}.")
    return next(iter(lengths.values()))


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError naming ``name`` if it is not an int >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}. Received: {name}={value!r}.")
    return int(value)


def checked_arrays(x: PyTree, y: PyTree, check_inputs: bool = True) -> tuple[PyTree, PyTree, int]:
    """``x`` and ``y`` as numpy pytrees with the same, non-zero number of rows.

    Raises:
      ValueError: for different row counts, no rows, or (with ``check_inputs``) NaN/Inf.
    """
    x, y = to_numpy(x), to_numpy(y)
    n, n_y = num_rows(x, "x"), num_rows(y, "y")
    if n != n_y:
        raise ValueError("Expected `x` and `y` to have the same number of rows. Received: "
                         f"x has {n} rows, y has {n_y}.")
    if n == 0:
        raise ValueError("Expected a non-empty dataset. Received: x and y with 0 rows.")
    if check_inputs:
        check_finite(x, "x")
        check_finite(y, "y")
    return x, y, n


def to_numpy(tree: PyTree) -> PyTree:
    """Converts every leaf (numpy, JAX, torch CPU tensors, lists) to a numpy array."""
    return jax.tree_util.tree_map(np.asarray, tree, is_leaf=is_array)


def check_finite(tree: PyTree, name: str) -> None:
    """Raises ValueError naming the first leaf of ``tree`` that holds NaN or Inf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_array):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
            bad = np.argwhere(~np.isfinite(leaf))[0]
            raise ValueError(
                f"Expected finite values in `{name}`. Received: {leaf[tuple(bad)]} at "
                f"{name}{jax.tree_util.keystr(path)}[{', '.join(map(str, bad))}]. "
                "Clean the data, or pass check_inputs=False to skip this check.")


def take_rows(tree: PyTree, start: int | None, stop: int | None) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree, is_leaf=is_array)


def class_weights_for(y: np.ndarray, class_weight: Mapping[int, float]) -> np.ndarray:
    """Per-row weights from a ``{class: weight}`` dict; classes not in the dict weigh 1.

    Labels may be integers ``[n]`` (or ``[n, 1]``) or one-hot ``[n, classes]``.

    Raises:
      ValueError: if ``class_weight`` names a class that never occurs in ``y``.
    """
    if not isinstance(class_weight, Mapping):
        raise TypeError("Expected `class_weight` to be a dict {class index: weight}. "
                        f"Received: {type(class_weight).__name__}.")
    y = np.asarray(y)
    labels = np.argmax(y, axis=-1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(len(y))
    labels = labels.astype(np.int64)
    present = set(np.unique(labels).tolist())
    absent = sorted(int(c) for c in class_weight if int(c) not in present)
    if absent:
        raise ValueError(f"Expected `class_weight` to name classes that occur in `y` "
                         f"({sorted(present)}). Received weights for absent classes {absent}.")
    table = np.ones(max(present | set(map(int, class_weight))) + 1, np.float32)
    for cls, weight in class_weight.items():
        table[int(cls)] = float(weight)
    return table[labels]


def row_weights(n: int, y: PyTree, sample_weight: Any, class_weight: Mapping | None) -> np.ndarray:
    """``sample_weight * class_weight[y]`` as a float32 vector of length ``n``."""
    weights = np.ones(n, np.float32)
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, np.float32)
        if sample_weight.shape != (n,):
            raise ValueError(f"Expected `sample_weight` of shape ({n},), one weight per row. "
                             f"Received: shape {sample_weight.shape}.")
        if (sample_weight < 0).any() or not np.isfinite(sample_weight).all():
            raise ValueError("Expected `sample_weight` to hold finite values >= 0. "
                             f"Received: min={sample_weight.min()}.")
        weights = weights * sample_weight
    if class_weight is not None:
        if not is_array(y):
            raise ValueError("`class_weight` needs `y` to be one array of class labels. "
                             f"Received: y of type {type(y).__name__}.")
        weights = weights * class_weights_for(y, class_weight)
    return weights


def epoch_order(key: jax.Array, epoch: int, *, num_rows: int, batch_size: int, shuffle: bool,
                pad_tail: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The epoch's row order as full batches ``[num_batches, batch_size]`` and a tail.

    The order is a function of ``(key, epoch)`` only, so a resumed run sees the same
    batches. It is drawn with numpy on the host (a device permutation costs a compilation
    and more time than the upload of ``num_rows`` indices). The tail
    ``[1, num_rows % batch_size]`` holds the leftover rows (``None`` if there are none).
    With ``pad_tail`` the leftover rows become one more full batch instead, padded with
    the out-of-range index ``num_rows``, which the fused step treats as a zero-weight row.
    """
    order = np.arange(num_rows, dtype=np.int32)
    if shuffle:
        seed = [int(word) for word in np.ravel(jax.random.key_data(key))]
        order = np.random.default_rng([*seed, int(epoch)]).permutation(order)
    num_full = num_rows // batch_size
    cut = num_full * batch_size
    full = order[:cut].reshape(num_full, batch_size)
    tail = order[None, cut:] if cut < num_rows else None
    if pad_tail and tail is not None:
        padded = np.full((1, batch_size), num_rows, np.int32)
        padded[0, :tail.shape[1]] = tail[0]
        full, tail = np.concatenate([full, padded]), None
    if len(full) == 0:  # a placeholder row keeps the fused loop's shapes valid
        full = np.zeros((1, batch_size), np.int32)
    return full, tail


# --- Iterables ---------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[PyTree, PyTree, Any]:
    """Splits an ``(x, y)`` or ``(x, y, sample_weight)`` batch."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        w = batch[2] if len(batch) == 3 else None
        return x, y, w
    raise ValueError("Expected each batch of an iterable `x` to be a tuple (x, y) or "
                     f"(x, y, sample_weight). Received: {type(batch).__name__}"
                     f"{f' of length {len(batch)}' if hasattr(batch, '__len__') else ''}.")


class Prefetcher:
    """Moves the batches of an iterator to the device ``size`` batches ahead.

    ``jax.device_put`` is asynchronous, so the copy of batch ``i + 1`` overlaps the step
    on batch ``i``.
    """

    def __init__(self, iterator: Iterator, convert, size: int = 2):
        self._iterator = iterator
        self._convert = convert
        self._queue: collections.deque = collections.deque()
        self._size = size
        self._done = False

    def _fill(self):
        while not self._done and len(self._queue) < self._size:
            try:
                self._queue.append(self._convert(next(self._iterator)))
            except StopIteration:
                self._done = True

    def __iter__(self):
        return self

    def __next__(self):
        self._fill()
        if not self._queue:
            raise StopIteration
        item = self._queue.popleft()
        self._fill()
        return item


def device_batch(batch: Any, sharding=None):
    """``(x, y, w)`` of numpy arrays on the device, with ``w`` filled with ones when absent."""
    x, y, w = split_batch(batch)
    x, y = to_numpy(x), to_numpy(y)
    n = num_rows(x, "x")
    if y is not None and num_rows(y, "y") != n:
        raise ValueError(f"Expected `x` and `y` of a batch to have the same number of rows. "
                         f"Received: {n} and {num_rows(y, 'y')}.")
    w = np.ones(n, np.float32) if w is None else np.asarray(w, np.float32).reshape(n)
    return jax.device_put((x, y, w), sharding)


def iterate(source: Iterable, steps: int | None):
    """Yields up to ``steps`` items of ``source`` (all of them when ``steps`` is None)."""
    for i, item in enumerate(source):
        yield item
        if steps is not None and i + 1 >= steps:
            return
