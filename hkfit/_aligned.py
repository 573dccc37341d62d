"""Host buffers that XLA's CPU client can use in place.

``jax.device_put`` of a numpy array on a CPU copies it unless its data is aligned to
``ALIGNMENT`` bytes; numpy's own large allocations are usually 16-byte aligned, so they
are copied. The host copies that hkfit makes of a dataset anyway (rows padded to a
bucketed count, rows cut into per-device blocks) are allocated aligned, so placing them
on a CPU device adds no second copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The alignment (bytes) at which XLA:CPU aliases a host buffer instead of copying it.
ALIGNMENT = 64


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialized array whose data starts on an ``ALIGNMENT``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)`` along axis 0, into an aligned buffer."""
    first = parts[0]
    out = empty((sum(len(p) for p in parts), *first.shape[1:]), first.dtype)
    np.concatenate(parts, out=out)
    return out


def take(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows]`` into an aligned buffer."""
    out = empty((len(rows), *a.shape[1:]), a.dtype)
    np.take(a, rows, axis=0, out=out)
    return out
