"""Rows split into one block per device: the ``data_placement="sharded"`` layout.

A dataset of ``n`` rows is cut into ``blocks`` contiguous blocks whose sizes differ by at
most one (the first ``n % blocks`` blocks hold one row more). Each block is padded to a
common length with zero-weight copies of its last row, and the blocks are stacked into
arrays ``[blocks, rows_per_block, ...]`` whose first axis is split over the devices, so
each device holds only its own rows.

An epoch draws one permutation per block from ``(seed, epoch, block)``. Global batch
``b`` is the concatenation, in block order, of every block's local batch ``b``
(``batch_size / blocks`` rows each), the rule multi-host training follows for processes.
The rows that no full batch takes (fewer than ``batch_size``) form one last, shorter
batch of exactly those rows.

Indices are *local* row positions inside a block; the out-of-range position
``rows_per_block`` marks a padding slot, which the training step gives weight 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from hkfit import _aligned as aligned
from hkfit.step import Batch


class Tail(NamedTuple):
    """The short last batch: local positions ``[1, blocks, width]`` and the ``keep``
    positions of the real rows in the flattened ``[blocks * width]`` batch."""

    local: np.ndarray
    keep: np.ndarray


class BlockPlan:
    """How ``num_rows`` rows are cut into ``blocks`` blocks.

    Args:
      num_rows: rows of the dataset (of this process, with several processes).
      blocks: the number of blocks (devices along the data axis that this process feeds).
      capacity: rows allocated per block (at least the largest block; more rows are
        padding, so datasets of many sizes share one compiled shape).
    """

    def __init__(self, num_rows: int, blocks: int, capacity: int | None = None):
        self.num_rows, self.blocks = num_rows, blocks
        base, extra = divmod(num_rows, blocks)
        self.counts = np.array([base + (b < extra) for b in range(blocks)], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        largest = int(self.counts.max())
        self.capacity = max(largest, 1) if capacity is None else capacity
        if self.capacity < largest:
            raise ValueError(
                f"Expected a block capacity of at least {largest} rows. "
                f"Received: capacity={capacity}."
            )

    def split(self, tree: Any) -> Any:
        """``tree`` (rows on axis 0) as ``[blocks, capacity, ...]``; padding rows repeat
        the block's last row (weights and masks of a :class:`Batch` are set to 0)."""
        positions = np.minimum(
            np.arange(self.capacity)[None, :], np.maximum(self.counts[:, None] - 1, 0)
        )
        rows = (self.offsets[:, None] + positions).reshape(-1)
        real = (np.arange(self.capacity)[None, :] < self.counts[:, None]).reshape(-1)

        def blocked(a: Any, zero: bool = False) -> np.ndarray:
            a = np.asarray(a)
            # an empty block repeats any row; aligned: CPU devices use the blocks in place
            taken = aligned.take(a, np.minimum(rows, len(a) - 1))
            if zero:
                taken[~real] = 0
            return taken.reshape((self.blocks, self.capacity, *a.shape[1:]))

        if isinstance(tree, Batch):
            mask = tree.mask if tree.mask is not None else np.ones(self.num_rows, np.float32)
            return Batch(
                jax.tree_util.tree_map(blocked, tree.x),
                jax.tree_util.tree_map(blocked, tree.y),
                jax.tree_util.tree_map(lambda a: blocked(a, True), tree.weights),
                jax.tree_util.tree_map(lambda a: blocked(a, True), mask),
            )
        return jax.tree_util.tree_map(blocked, tree)

    def epoch_order(
        self,
        key: jax.Array,
        epoch: int,
        *,
        local_batch_size: int,
        shuffle: bool,
        processes: int = 1,
    ) -> tuple[np.ndarray, Tail | None]:
        """Full batches ``[num_batches, blocks * processes, local_batch_size]`` and the tail.

        A function of ``(key, epoch)`` only, so a resumed run sees the same batches. With
        several processes, each cuts its own rows into ``blocks`` blocks the same way, and
        every process draws the order of every block (block ``g`` of the data axis is
        block ``g % blocks`` of its process, seeded by ``g``).
        """
        seed = [int(word) for word in np.ravel(jax.random.key_data(key))] if shuffle else []
        counts = np.tile(self.counts, processes)
        orders = []
        for block, count in enumerate(counts):
            order = np.arange(count, dtype=np.int32)
            if shuffle:
                rng = np.random.default_rng([*seed, int(epoch), block])
                order = rng.permutation(order)
            orders.append(order)
        num_full = int(counts.min()) // local_batch_size
        cut = num_full * local_batch_size
        full = np.stack([order[:cut].reshape(num_full, local_batch_size) for order in orders], 1)
        if len(full) == 0:  # a placeholder batch keeps the fused loop's shapes valid
            full = np.full((1, len(counts), local_batch_size), self.capacity, np.int32)
        leftover = [order[cut:] for order in orders]
        width = max(len(rest) for rest in leftover)
        if width == 0:
            return full.astype(np.int32), None
        local = np.full((1, len(counts), width), self.capacity, np.int32)
        keep: list[int] = []
        for block, rest in enumerate(leftover):
            local[0, block, : len(rest)] = rest
            keep.extend(block * width + j for j in range(len(rest)))
        return full.astype(np.int32), Tail(local, np.asarray(keep, np.int32))
