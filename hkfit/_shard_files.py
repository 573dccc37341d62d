"""Reading the shard files of a manifest defensively, and assembling blocks from them.

A manifest (a checkpoint of format version 2, see :mod:`hkfit.checkpoint`) lists its shard
files with their sizes and sha256 digests, and for each array stored in them its
``pieces``: which file holds which block. :func:`open_pieces` checks every shard file
before anything is restored: it is a regular file of the recorded size, its metadata
(bounded, schema-checked) belongs to this save (the same ``id``, file index and count) and
lists exactly the blocks the manifest places in it, and its members fit in it. Blocks are
then read on demand, when an array is assembled: the first read of a file checks its
whole sha256 against the manifest, and each block's ``.npy`` header and own sha256 are
checked before it is used. Every problem is a ``ValueError`` naming the shard file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from hkfit import _checkpoint_file as file_lib
from hkfit import _shards

SHARD_FORMAT_VERSION = 1


class ShardFileError(file_lib.Refused):
    """A missing or damaged shard file; ``index`` is its index in the manifest."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


class ShardFile:
    """One shard file of a manifest, checked against it; reads its blocks on demand."""

    def __init__(self, manifest: str, meta: dict, index: int):
        shards = meta["shards"]
        record = shards["files"][index]
        self.manifest = manifest
        self.index = index
        self.path = os.path.join(os.path.dirname(manifest), record["name"])
        self.size: int = record["size"]
        self.sha256: str = record["sha256"]
        self._save_id: str = shards["id"]
        self._count = len(shards["files"])
        self._expected = {
            piece["key"]: (entry["path"], tuple(piece["start"]), tuple(piece["stop"]))
            for entry in meta["entries"]
            if entry.get("sharded")
            for piece in entry["pieces"]
            if piece["file"] == index
        }
        self._entries: dict[str, dict] = {}
        self._digest_checked = False
        self._file: BinaryIO | None = None
        self._archive: Any = None
        self._cache: dict[str, np.ndarray] = {}

    def error(self, problem: str) -> ShardFileError:
        """The error for this file: ``problem`` follows its name."""
        return ShardFileError(
            f"The shard file {self.path!r} of the checkpoint {self.manifest!r} {problem}",
            self.index,
        )

    # --- checks ---

    def check(self) -> None:
        """Checks the file's size and metadata against the manifest (nothing else is read)."""
        with self._open() as f, self._reading():
            size = os.fstat(f.fileno()).st_size
            if size != self.size:
                raise self.error(
                    f"is {size} bytes long; the manifest records {self.size} bytes (a "
                    "truncated file, or one from another save)."
                )
            with file_lib.open_archive(self.path, f) as archive:
                meta = file_lib.read_meta_member(self.path, archive, check=self._check_meta)
                file_lib.check_sizes(self.path, archive, meta["entries"], size)
        self._entries = {entry["key"]: entry for entry in meta["entries"]}

    def _open(self) -> BinaryIO:
        try:
            return file_lib.open_regular(self.path)
        except FileNotFoundError:
            raise self.error(
                "is missing. A checkpoint sharded across processes is its manifest and "
                "every shard file it lists: copy or move them together."
            ) from None
        except file_lib.Refused as e:
            raise self.error(f"cannot be read: {e}") from None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Any error while reading the file: a :class:`ShardFileError` naming it."""
        try:
            with file_lib.reading(self.path):
                yield
        except ShardFileError:
            raise
        except file_lib.Refused as e:
            raise ShardFileError(f"{e} (a shard file of {self.manifest!r})", self.index) from None

    def _check_meta(self, path: str, meta: Any) -> dict:
        if not isinstance(meta, dict) or meta.get("format") != file_lib.SHARD_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise self.error(f"is not a shard file (format {file_lib.describe(found)}).")
        version = file_lib.check_int(path, "format_version", meta.get("format_version"))
        if version > SHARD_FORMAT_VERSION:
            raise self.error(
                f"uses shard format version {version}; this hkfit reads versions <= "
                f"{SHARD_FORMAT_VERSION}. Upgrade hkfit."
            )
        if not isinstance(meta.get("hkfit_version", ""), str):
            raise file_lib.invalid(path, "hkfit_version", "a string", meta["hkfit_version"])
        found = (meta.get("id"), meta.get("file"), meta.get("files"))
        if found != (self._save_id, self.index, self._count):
            raise self.error(
                f"is not part of this save: it says it is file {file_lib.describe(found[1])} "
                f"of {file_lib.describe(found[2])} of the save {file_lib.describe(found[0])}, "
                f"the manifest expects file {self.index} of {self._count} of the save "
                f"{self._save_id!r}."
            )
        entries = meta.get("entries")
        if not isinstance(entries, list):
            raise file_lib.invalid(path, "entries", "a list of objects", entries)
        held = {}
        for i, entry in enumerate(entries):
            _check_piece_entry(path, i, entry)
            held[entry["key"]] = (entry["path"], entry["start"], entry["stop"])
        if len(held) != len(entries) or held != self._expected:
            raise self.error(
                f"does not hold the blocks its manifest places in it ({len(entries)} "
                f"blocks, the manifest expects {len(self._expected)})."
            )
        return meta

    def _check_digest(self) -> None:
        if self._digest_checked:
            return
        with self._reading():
            size, digest = _shards.file_digest(self.path)
        if (size, digest) != (self.size, self.sha256):
            raise self.error(
                "does not match the size and sha256 its manifest records: it was changed "
                "or damaged after the save."
            )
        self._digest_checked = True

    # --- blocks ---

    def block(self, key: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """The block stored as member ``key``, checked against its header and sha256."""
        if key in self._cache:
            return self._cache[key]
        self._check_digest()
        with self._reading():
            if self._archive is None:
                self._file = self._open()
                self._archive = file_lib.open_archive(self.path, self._file)
            array, raw = file_lib.read_member(self.path, self._archive, key + ".npy", shape, dtype)
            file_lib.verify(self.path, self._entries[key], raw)
        self._cache[key] = array
        return array

    def close(self) -> None:
        """Closes the file and drops the blocks read (a later read opens it again)."""
        if self._archive is not None:
            self._archive.close()
        if self._file is not None:
            self._file.close()
        self._archive = self._file = None
        self._cache.clear()


def _check_piece_entry(path: str, i: int, entry: Any) -> None:
    """Checks one entry of a shard file's metadata (its start and stop become tuples)."""
    field = f"entries[{i}]"
    if not isinstance(entry, dict):
        raise file_lib.invalid(path, field, "an object", entry)
    for name in ("path", "key"):
        if not isinstance(entry.get(name), str):
            raise file_lib.invalid(path, f"{field}.{name}", "a string", entry.get(name))
    if entry["key"] == file_lib.META_KEY:
        raise file_lib.invalid(path, f"{field}.key", "an array name", entry["key"])
    entry["start"] = file_lib.check_shape(path, f"{field}.start", entry.get("start"))
    entry["stop"] = file_lib.check_shape(path, f"{field}.stop", entry.get("stop"))
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and file_lib.SHA256.match(digest)):
        raise file_lib.invalid(path, f"{field}.sha256", "64 lowercase hex digits", digest)


class Pieces:
    """The stored value of one sharded entry, assembled on demand from its blocks.

    Attributes:
      shape: the shape of the stored array (key data for PRNG keys).
      dtype: its stored dtype (unsigned ints for ``bits`` entries).
    """

    def __init__(self, entry: dict, files: list[ShardFile]):
        self.shape, self.dtype = file_lib.stored_spec(entry)
        self.files = files
        self._blocks = [
            (files[piece["file"]], piece["key"], tuple(piece["start"]), tuple(piece["stop"]))
            for piece in entry["pieces"]
        ]

    def __repr__(self) -> str:
        return f"Pieces(shape={self.shape}, dtype={self.dtype}, blocks={len(self._blocks)})"

    def assemble(self, index: tuple | None = None) -> np.ndarray:
        """The block ``index`` (a tuple of slices; ``None``: the whole array) of the value.

        Only the blocks that overlap it are read.

        Raises:
          ValueError: naming the shard file, if one is missing or damaged.
        """
        start, stop = _shards.bounds(index, self.shape)
        out = np.empty(tuple(b - a for a, b in zip(start, stop)), self.dtype)
        if out.size == 0:
            return out
        for file, key, first, last in self._blocks:
            low = tuple(max(a, b) for a, b in zip(start, first))
            high = tuple(min(a, b) for a, b in zip(stop, last))
            if any(lo >= hi for lo, hi in zip(low, high)):
                continue
            shape = tuple(b - a for a, b in zip(first, last))
            block = file.block(key, shape, self.dtype)
            target = tuple(slice(lo - a, hi - a) for lo, hi, a in zip(low, high, start))
            source = tuple(slice(lo - a, hi - a) for lo, hi, a in zip(low, high, first))
            out[target] = block[source]
        return out


def open_pieces(path: str, meta: dict) -> dict[str, Pieces]:
    """``{entry key: Pieces}`` for the sharded entries of the manifest at ``path``.

    Every shard file is checked first (see the module docstring); no block is read yet.

    Raises:
      ValueError: naming the shard file, if one is missing, of another size, not a shard
        file of this save, or does not hold what the manifest says.
    """
    files = [ShardFile(path, meta, k) for k in range(len(meta["shards"]["files"]))]
    for file in files:
        file.check()
    return {entry["key"]: Pieces(entry, files) for entry in meta["entries"] if entry.get("sharded")}


def close(arrays: dict) -> None:
    """Closes the shard files behind the :class:`Pieces` values of ``arrays``."""
    closed: set[int] = set()
    for value in arrays.values():
        if isinstance(value, Pieces):
            for file in value.files:
                if id(file) not in closed:
                    closed.add(id(file))
                    file.close()
