"""Checkpoints of arrays sharded across processes: who writes which block, the names of
the shard files, how the processes agree, and moving or deleting such a checkpoint.

An array split over the devices of several processes (``param_sharding="fsdp"`` or
sharding rules in a multi-process run) has no process that holds all of it. Its distinct
blocks are then written by the processes that hold them, each into a shard file of its
own next to the main file, and process 0 writes the main file last: the manifest. The
layout is described in :mod:`hkfit.checkpoint` and in the checkpoint format reference.

A shard file is named ``<manifest name>.shard-<k>-of-<n>.<id>`` (``k`` the writing
process, ``n`` the number of processes, ``id`` 16 hex digits drawn for each save), so a
save never overwrites a file that the previous checkpoint at the same path still needs:
a crash before the new manifest is in place leaves the previous checkpoint whole. The
manifest lists its shard files by name; moving the manifest within its directory keeps
it valid (:func:`replace`), and :func:`remove` deletes a checkpoint with its shard files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from hkfit import _checkpoint_file as file_lib


def spans_processes(leaf: Any) -> bool:
    """Whether ``leaf`` is an array split over devices of several processes (no process
    holds its whole value)."""
    return (
        isinstance(leaf, jax.Array)
        and not leaf.is_fully_addressable
        and not leaf.is_fully_replicated
    )


def any_spans_processes(tree: Any) -> bool:
    """Whether some leaf of ``tree`` is split over devices of several processes."""
    return any(spans_processes(leaf) for leaf in jax.tree_util.tree_leaves(tree))


# --- Blocks ----------------------------------------------------------------------------------


def bounds(index: tuple | None, shape: tuple) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, stop)`` of the block that ``index`` (slices, as shardings give them)
    selects in an array of ``shape``; ``None`` selects all of it.

    >>> bounds((slice(None), slice(4, 8)), (3, 16))
    ((0, 4), (3, 8))

    Raises:
      ValueError: for an index that is not a tuple of contiguous slices.
    """
    index = () if index is None else tuple(index)
    if len(index) > len(shape):
        raise ValueError(f"Expected an index of at most {len(shape)} slices. Received: {index}.")
    start, stop = [], []
    for axis, size in enumerate(shape):
        part = index[axis] if axis < len(index) else slice(None)
        if not isinstance(part, slice):
            raise ValueError(f"Expected an index of slices. Received: {index}.")
        first, last, step = part.indices(size)
        if step != 1:
            raise ValueError(f"Expected an index of contiguous slices. Received: {index}.")
        start.append(first)
        stop.append(max(first, last))
    return tuple(start), tuple(stop)


class Block(NamedTuple):
    """One distinct block of a global array, and the device whose copy of it is written."""

    start: tuple[int, ...]
    stop: tuple[int, ...]
    device: Any

    @property
    def process(self) -> int:
        """The process that writes the block (the one of :attr:`device`)."""
        return int(self.device.process_index)


def blocks(array: jax.Array) -> list[Block]:
    """The distinct blocks of ``array``, in the order of their starts.

    A block held by several devices (a replicated axis) is written once, from the device
    of the lowest process index that holds it (and of the lowest device id there). Every
    process computes the same list from the sharding alone, so process 0 knows which
    shard file holds each block without asking the others.
    """
    owners: dict[tuple[tuple[int, ...], tuple[int, ...]], Any] = {}
    device: Any
    for device, index in array.sharding.devices_indices_map(tuple(array.shape)).items():
        block = bounds(index, array.shape)
        best = owners.get(block)
        if best is None or (device.process_index, device.id) < (best.process_index, best.id):
            owners[block] = device
    return [Block(start, stop, device) for (start, stop), device in sorted(owners.items())]


def block_data(array: jax.Array, block: Block) -> np.ndarray:
    """A C-ordered host copy of ``block`` of ``array``, from this process's device that holds it.

    Raises:
      ValueError: if no device of this process holds that block.
    """
    for shard in array.addressable_shards:
        if shard.device == block.device:
            data = np.array(shard.data, copy=True, order="C")
            if data.shape != tuple(b - a for a, b in zip(block.start, block.stop)):
                raise ValueError(
                    f"Expected the shard on {block.device} to be the block {block.start} to "
                    f"{block.stop}. Received: an array of shape {data.shape}."
                )
            return data
    raise ValueError(
        f"Expected a device of process {jax.process_index()} to hold the block {block.start} "
        f"to {block.stop}. Received: it is on {block.device}."
    )


# --- Names -----------------------------------------------------------------------------------


def shard_path(path: str, k: int, n: int, save_id: str) -> str:
    """The shard file that process ``k`` of ``n`` writes for the manifest at ``path``.

    >>> shard_path("/ckpt/model.npz", 1, 2, "0123456789abcdef")
    '/ckpt/model.npz.shard-00001-of-00002.0123456789abcdef'
    """
    return path + file_lib.shard_suffix(k, n, save_id)


def is_shard_name(name: str) -> bool:
    """Whether a file name is that of a shard file (``<name>.shard-<k>-of-<n>.<id>``)."""
    return file_lib.SHARD_NAME.match(name) is not None


def new_save_id() -> str:
    """16 random hex digits naming one save: process 0 draws them, every process gets them."""
    raw = np.frombuffer(os.urandom(8), np.uint8)
    if jax.process_count() > 1:
        raw = np.asarray(multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8)
    return bytes(raw).hex()


def file_digest(path: str) -> tuple[int, str]:
    """``(size, sha256 hex digest)`` of the file at ``path``, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# --- Agreement between processes -------------------------------------------------------------


def agree(ok: bool, payload: bytes = b"") -> list[tuple[bool, bytes]]:
    """Every process's ``(ok, payload)``, in process order; a barrier too.

    Every process must call it, with payloads of the same length. With one process it
    returns ``[(ok, payload)]`` at once.
    """
    if jax.process_count() == 1:
        return [(ok, payload)]
    record = np.frombuffer(bytes([int(ok)]) + payload, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(record)).astype(np.uint8)
    return [(bool(row[0]), bytes(row[1:])) for row in rows.reshape(jax.process_count(), -1)]


def raise_unless_all(
    statuses: list[tuple[bool, bytes]], error: BaseException | None, what: str
) -> None:
    """Raises ``error`` (this process's), or, if another process failed, an OSError
    that names it and ``what`` it could not do."""
    if error is not None:
        raise error
    failed = [k for k, (ok, _) in enumerate(statuses) if not ok]
    if failed:
        raise OSError(
            f"Process {failed[0]} could not {what} (its own error says why); this "
            "process stopped with it."
        )


def on_main(write: Callable[[], None], what: str) -> None:
    """Runs ``write`` in process 0 only; with several processes, no process returns
    before it is done, and every process raises if it failed."""
    if jax.process_count() == 1:
        write()
        return
    ok, error = True, None
    if jax.process_index() == 0:
        try:
            write()
        except BaseException as e:  # re-raised below, once the others know
            ok, error = False, e
    raise_unless_all(agree(ok), error, what)


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing to do with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# --- Files of a checkpoint (each function is for one process: process 0) --------------------


def referenced(path: str) -> list[str]:
    """The shard files that the manifest at ``path`` lists; ``[]`` for a single-file
    checkpoint, or when nothing readable is there."""
    try:
        if not os.path.isfile(path):
            return []
        meta = file_lib.read_meta(path)
    except (OSError, ValueError):
        return []
    if not file_lib.is_manifest(meta):
        return []
    directory = os.path.dirname(path)
    return [os.path.join(directory, record["name"]) for record in meta["shards"]["files"]]


def discard(paths: Any) -> None:
    """Deletes each file of ``paths``, as far as it can (a file that is gone, or cannot be
    deleted, is left as it is: this is clean-up, never a reason to fail a save)."""
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


def remove(path: str) -> None:
    """Deletes the checkpoint at ``path``: the file and the shard files it lists."""
    files = referenced(path)
    discard([path, *files])


def replace(source: str, target: str) -> None:
    """Renames the checkpoint at ``source`` to ``target``, in the same directory.

    Its shard files keep their names (the manifest lists them, so it stays valid); the
    shard files of the checkpoint that was at ``target`` are deleted after the rename.

    Raises:
      ValueError: if the two paths are in different directories.
    """
    if os.path.dirname(os.path.abspath(source)) != os.path.dirname(os.path.abspath(target)):
        raise ValueError(
            "Expected a checkpoint to move within its directory (its manifest names its "
            f"shard files there). Received: {source!r} -> {target!r}."
        )
    stale = set(referenced(target)) - set(referenced(source))
    os.replace(source, target)
    discard(stale)


def leftovers(path: str) -> list[str]:
    """The shard files named after ``path`` in its directory, and their temporary files:
    with those of the checkpoints there, what killed saves may have left."""
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        plain = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else name
        match = file_lib.SHARD_NAME.match(plain)
        if match is not None and match["base"] == base:
            found.append(os.path.join(os.path.dirname(path), name))
    return sorted(found)
