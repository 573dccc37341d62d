"""Rows of host arrays, read a window at a time: the reading side of ``hkfit._stream``.

:class:`HostRows` reads rows ``[start, stop)`` of every leaf of a pytree of arrays into
fresh numpy arrays, so no caller needs the whole arrays in memory. A memory-mapped array
(``np.load(path, mmap_mode="r")``, an ``np.memmap``, or a view of whole rows of one) is
read with plain file reads: slicing it would map its file's pages into the process,
where they count in its resident memory for as long as the map is open. Other arrays
are sliced (an ``h5py`` or ``zarr`` array then reads only the rows asked for).

:func:`placed_row_bytes` sizes a row from shapes and dtypes alone, and :func:`check_rows`
makes ``fit``'s checks of arrays (values, integer ranges, labels, weights) window by
window.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from hkfit import _data as data_lib


class _SlicedRows:
    """Rows of an array read by slicing it."""

    def __init__(self, leaf: Any):
        self.leaf = leaf

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.leaf[start:stop])


class _FileRows:
    """Rows of a C-contiguous memory-mapped array, read from its file into new buffers.

    Slicing a memory map maps its file's pages into the process (they count in its
    resident memory until the map is closed); a file read copies the bytes instead.
    """

    def __init__(self, path: str, position: int, shape: tuple, dtype: np.dtype):
        self.path, self.position, self.shape, self.dtype = path, position, shape, dtype
        self.row_bytes = dtype.itemsize * math.prod(shape[1:])

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        view = out.data.cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.position + start * self.row_bytes)
            while view.nbytes:
                got = f.readinto(view)
                if not got:
                    raise OSError(
                        f"Expected {stop - start} rows of {self.path} from row {start}. "
                        "Received: the end of the file; it is shorter than its array."
                    )
                view = view[got:]
        return out


def file_rows(leaf: Any) -> _FileRows | None:
    """A file reader for ``leaf`` when it is C-contiguous rows of a read-only memory map.

    ``leaf`` may be the map itself (``np.load(path, mmap_mode="r")``, ``np.memmap``) or a
    view of whole rows of one (``mm[1000:]``, ``np.asarray(mm)``). None otherwise: other
    layouts, and copy-on-write maps (``mode="c"``), whose memory may differ from the file.
    """
    if not isinstance(leaf, np.ndarray) or leaf.ndim == 0 or not leaf.flags.c_contiguous:
        return None
    root: Any = leaf
    while isinstance(root, np.ndarray) and not (
        isinstance(root, np.memmap) and isinstance(root.base, mmap.mmap)
    ):
        root = root.base
    if not isinstance(root, np.memmap) or getattr(root, "filename", None) is None:
        return None
    if getattr(root, "mode", "c") not in ("r", "r+"):
        return None
    position = int(root.offset) + (leaf.ctypes.data - root.ctypes.data)
    return _FileRows(str(root.filename), position, tuple(leaf.shape), leaf.dtype)


def _reader(leaf: Any) -> Any:
    if not data_lib.is_array(leaf):
        leaf = np.asarray(leaf)
    return file_rows(leaf) or _SlicedRows(leaf)


def _is_reader(value: Any) -> bool:
    return isinstance(value, (_SlicedRows, _FileRows))


class HostRows:
    """A pytree of arrays (or None) read ``[start, stop)`` rows at a time, never whole."""

    def __init__(self, tree: Any):
        self.readers = jax.tree_util.tree_map(_reader, tree, is_leaf=data_lib.is_array)

    def read(self, start: int, stop: int) -> Any:
        """Rows ``start .. stop - 1`` of every leaf, as numpy arrays in their own dtypes."""
        return jax.tree_util.tree_map(
            lambda r: r.read(start, stop), self.readers, is_leaf=_is_reader
        )


def _nbytes(tree: Any) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree))


def _ones_row(tree: Any) -> Any:
    """Ones shaped like one row of every leaf of ``tree``."""
    return jax.tree_util.tree_map(
        lambda a: np.ones((1, *np.shape(a)[1:]), np.float32), tree, is_leaf=data_lib.is_array
    )


def placed_row_bytes(x: Any, y: Any, sample_weight: Any) -> int:
    """Bytes one training row takes on the device: inputs and targets in the dtypes they
    are placed in, its weights and its metric mask (from shapes and dtypes only)."""
    total = 0
    for tree in (x, y):
        for leaf in jax.tree_util.tree_leaves(tree, is_leaf=data_lib.is_array):
            dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            total += data_lib.device_dtype(dtype).itemsize * math.prod(np.shape(leaf)[1:])
    weights = data_lib.row_weights(1, None, _ones_row(sample_weight), None)
    return total + _nbytes(weights) + _nbytes(data_lib.metric_mask(weights))


def narrows_integers(tree: Any) -> bool:
    """Whether a leaf of ``tree`` holds integers narrowed on the way to the device (whose
    values must then be checked to fit)."""
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=data_lib.is_array):
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if dtype.kind in "iu" and data_lib.device_dtype(dtype) != dtype:
            return True
    return False


def check_rows(
    xs: HostRows,
    ys: HostRows,
    ws: HostRows,
    num_rows: int,
    window_rows: int,
    *,
    labels: Callable[..., Any],
    class_weight: Any,
    check_inputs: bool,
    narrows_x: bool,
) -> None:
    """Checks every training row, ``window_rows`` at a time, as ``fit`` checks arrays.

    ``x`` is read only when its values are checked (``check_inputs``, or integers that
    are narrowed); errors name the rows they were found in, e.g. ``x[1000:2000]``.
    """
    present: set[int] = set()
    for start in range(0, num_rows, window_rows):
        stop = min(start + window_rows, num_rows)
        part = f"[{start}:{stop}]"
        if check_inputs or narrows_x:
            x_rows = xs.read(start, stop)
            if check_inputs:
                data_lib.check_finite(x_rows, "x" + part)
            if narrows_x:
                data_lib.to_device_dtypes(x_rows, "x" + part)  # integers that do not fit
            del x_rows
        y_rows = ys.read(start, stop)
        if check_inputs:
            data_lib.check_finite(y_rows, "y" + part)
        y_rows = labels(data_lib.to_device_dtypes(y_rows, "y" + part), "y" + part)
        data_lib.row_weights(
            stop - start, y_rows, ws.read(start, stop), None, name="sample_weight" + part
        )
        if class_weight is not None:
            data_lib.row_weights(stop - start, y_rows, None, class_weight, require_present=False)
            present |= data_lib.present_classes(y_rows)
    if class_weight is not None:
        data_lib.check_classes_present(class_weight, present)


__all__ = ["HostRows", "check_rows", "file_rows", "narrows_integers", "placed_row_bytes"]
