"""Reading one checkpoint file defensively (the format is documented in :mod:`hkfit.checkpoint`).

Everything here treats the file as untrusted input: nothing is read before it is known to
be a regular file, no member is decompressed, no array is allocated before its ``.npy``
header, its declared size and the metadata agree, and every error is a ``ValueError``
that names the file.

A manifest (format version 2: some arrays are stored in per-process shard files) is read
here like any checkpoint file, with its ``shards`` record and the ``pieces`` of its
sharded entries checked too (bounds, and blocks that tile each array exactly); the shard
files themselves are read by :mod:`hkfit._shard_files`, with the helpers below.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import reprlib
import stat
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO

import jax
import numpy as np

FORMAT = "hkfit-checkpoint"
FORMAT_VERSION = 1
SHARDED_VERSION = 2  # a manifest: some arrays are stored in per-process shard files
SHARD_FORMAT = "hkfit-checkpoint-shard"
META_KEY = "__hkfit_meta__"
META_LIMIT = 64 * 2**20  # bytes of metadata JSON read at most
MAX_NDIM = 32
MAX_DIM = 2**62
_HEADER_LIMIT = 10_000  # bytes of one .npy header, numpy's own default limit
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
SAVE_ID = re.compile(r"[0-9a-f]{16}\Z")
#: Shard file ``k`` of ``n`` of the save ``id``: ``<name>.shard-<k>-of-<n>.<id>``.
SHARD_NAME = re.compile(
    r"(?P<base>[^/\\\x00]+)\.shard-(?P<k>\d{5,})-of-(?P<n>\d{5,})\.(?P<id>[0-9a-f]{16})\Z"
)
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


class Refused(ValueError):
    """A file refused with a message that already names it."""


def describe(value: Any) -> str:
    """A short, bounded ``repr`` of a value read from a file."""
    return _REPR.repr(value)


def invalid(path: str, field: str, expected: str, value: Any) -> Refused:
    """The error for a metadata field of the wrong type or range."""
    return Refused(
        f"{path!r} is not a valid hkfit checkpoint: expected `{field}` to be {expected}. "
        f"Received: {describe(value)}."
    )


# --- Metadata schema -----------------------------------------------------------------------


def check_int(path: str, field: str, value: Any, high: int = 2**62) -> int:
    """``value`` if it is an int in ``[0, high]`` (not a bool), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise invalid(path, field, f"an integer in [0, {high}]", value)
    return value


def check_shape(path: str, field: str, value: Any) -> tuple[int, ...]:
    """A shape: a list of at most ``MAX_NDIM`` non-negative ints."""
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise invalid(path, field, f"a list of at most {MAX_NDIM} non-negative integers", value)
    return tuple(check_int(path, f"{field}[{i}]", d, MAX_DIM) for i, d in enumerate(value))


@functools.lru_cache(maxsize=64)
def _numeric_dtype(name: str) -> np.dtype | None:
    if not _NAME.match(name):
        return None
    try:
        dtype = np.dtype(name)
    except TypeError:
        import ml_dtypes  # jax's own dependency; knows bfloat16, float8_*, int4...

        kind = getattr(ml_dtypes, name, None)
        if not isinstance(kind, type):
            return None
        try:
            dtype = np.dtype(kind)
        except TypeError:
            return None
    extension = dtype.kind == "V" and dtype.isbuiltin == 2 and dtype.names is None
    return dtype if dtype.name == name and (dtype.kind in "biufc" or extension) else None


def numeric_dtype(name: Any) -> np.dtype | None:
    """The numeric dtype spelled ``name`` (``"float32"``, ``"bfloat16"``...), else ``None``."""
    return _numeric_dtype(name) if isinstance(name, str) else None


_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@functools.cache
def _impl_name(impl: str) -> str | None:
    """The name ``jax.random.key(impl=...)`` takes for the implementation printed as
    ``impl`` (JAX < 0.5 prints threefry as ``"fry"``), or None if this JAX lacks it."""
    for name in _KEY_IMPLS:
        try:
            if impl == name or str(jax.random.key_impl(jax.random.key(0, impl=name))) == impl:
                return name
        except Exception:  # an implementation this JAX does not have
            continue
    return None


@functools.lru_cache(maxsize=16)
def key_data_spec(impl: str) -> jax.ShapeDtypeStruct | None:
    """Shape and dtype of the data of one key of the PRNG implementation ``impl``."""
    if not _NAME.match(impl):
        return None
    name = _impl_name(impl)
    if name is None:
        return None
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=name)))


def _check_dtype(path: str, field: str, entry: dict) -> None:
    name, bits = entry.get("dtype"), entry.get("bits", False)
    if not isinstance(bits, bool):
        raise invalid(path, f"{field}.bits", "a boolean", bits)
    if name == "prng_key":
        impl = entry.get("key_impl")
        if bits or not isinstance(impl, str) or key_data_spec(impl) is None:
            raise invalid(path, f"{field}.key_impl", "a PRNG implementation JAX knows", impl)
        return
    dtype = numeric_dtype(name)
    if dtype is None:
        raise invalid(path, f"{field}.dtype", "a numeric dtype name or 'prng_key'", name)
    if bits != (dtype.isbuiltin != 1):  # dtypes numpy does not know are stored as raw bits
        raise invalid(path, f"{field}.bits", f"{not bits} for dtype {name}", bits)


def _check_entry(path: str, i: int, entry: Any, files: int) -> None:
    """One entry; ``files`` is the number of shard files (0: a single-file checkpoint)."""
    field = f"entries[{i}]"
    if not isinstance(entry, dict):
        raise invalid(path, field, "an object", entry)
    for name in ("path", "key"):
        if not isinstance(entry.get(name), str):
            raise invalid(path, f"{field}.{name}", "a string", entry.get(name))
    if entry["key"] == META_KEY:
        raise invalid(path, f"{field}.key", "an array name", entry["key"])
    check_shape(path, f"{field}.shape", entry.get("shape"))
    _check_dtype(path, field, entry)
    digest = entry.get("sha256")
    if digest is not None and not (isinstance(digest, str) and SHA256.match(digest)):
        raise invalid(path, f"{field}.sha256", "64 lowercase hex digits", digest)
    sharded = entry.get("sharded", False)
    if sharded is not False and (sharded is not True or not files):
        raise invalid(
            path, f"{field}.sharded", "false, or true in a file of format version 2", sharded
        )
    if sharded:
        _check_pieces(path, field, entry, files)


def _check_pieces(path: str, field: str, entry: dict, files: int) -> None:
    """The blocks of a sharded entry: each in a shard file, together tiling its array."""
    pieces = entry.get("pieces")
    if not isinstance(pieces, list):
        raise invalid(path, f"{field}.pieces", "a list of objects", pieces)
    shape = stored_spec(entry)[0]
    blocks = []
    for j, piece in enumerate(pieces):
        where = f"{field}.pieces[{j}]"
        if not isinstance(piece, dict):
            raise invalid(path, where, "an object", piece)
        check_int(path, f"{where}.file", piece.get("file"), files - 1)
        if not isinstance(piece.get("key"), str) or piece["key"] == META_KEY:
            raise invalid(path, f"{where}.key", "an array name", piece.get("key"))
        start = check_shape(path, f"{where}.start", piece.get("start"))
        stop = check_shape(path, f"{where}.stop", piece.get("stop"))
        if not len(start) == len(stop) == len(shape) or not all(
            0 <= a < b <= d for a, b, d in zip(start, stop, shape)
        ):
            raise invalid(
                path,
                where,
                f"a block inside the stored shape {list(shape)} (start < stop on every axis)",
                {"start": list(start), "stop": list(stop)},
            )
        blocks.append((start, stop))
    check_tiling(path, f"{field}.pieces", shape, blocks)


def check_tiling(path: str, field: str, shape: tuple, blocks: list[tuple[tuple, tuple]]) -> None:
    """Checks that ``blocks`` (``(start, stop)`` pairs inside ``shape``) cover it exactly once.

    The cuts of every axis make a grid: each block must be one cell of it, no cell may
    come twice, and every cell must be there. It costs O(blocks x axes) and allocates
    nothing whose size ``shape`` sets.

    Raises:
      ValueError: naming ``path`` and ``field``, for an overlap, a block that is not one
        cell of the grid, or a gap.
    """
    grid = []
    for axis, size in enumerate(shape):
        cuts = sorted({0, size, *(b[0][axis] for b in blocks), *(b[1][axis] for b in blocks)})
        grid.append({cut: i for i, cut in enumerate(cuts)})
    cells = set()
    for start, stop in blocks:
        cell = tuple(grid[axis][a] for axis, a in enumerate(start))
        whole = all(grid[axis][b] == cell[axis] + 1 for axis, b in enumerate(stop))
        if not whole or cell in cells:
            raise invalid(
                path,
                field,
                "blocks of a grid that do not overlap",
                {"start": list(start), "stop": list(stop)},
            )
        cells.add(cell)
    expected = math.prod(len(cuts) - 1 for cuts in grid)
    if len(cells) != expected:
        raise invalid(
            path,
            field,
            f"blocks covering the stored shape {list(shape)}",
            f"{len(cells)} of {expected} blocks",
        )


def shard_suffix(k: int, n: int, save_id: str) -> str:
    """What the name of shard file ``k`` of ``n`` of the save ``save_id`` ends with.

    >>> shard_suffix(0, 2, "0123456789abcdef")
    '.shard-00000-of-00002.0123456789abcdef'
    """
    return f".shard-{k:05d}-of-{n:05d}.{save_id}"


def _check_shards(path: str, meta: dict) -> int:
    """The ``shards`` object of a manifest; returns the number of shard files."""
    shards = meta.get("shards")
    if not isinstance(shards, dict):
        raise invalid(path, "shards", "an object with `id` and `files`", shards)
    save_id = shards.get("id")
    if not (isinstance(save_id, str) and SAVE_ID.match(save_id)):
        raise invalid(path, "shards.id", "16 lowercase hex digits", save_id)
    files = shards.get("files")
    if not isinstance(files, list) or not files:
        raise invalid(path, "shards.files", "a non-empty list of objects", files)
    for k, record in enumerate(files):
        where = f"shards.files[{k}]"
        if not isinstance(record, dict):
            raise invalid(path, where, "an object", record)
        name = record.get("name")
        if not (isinstance(name, str) and SHARD_NAME.match(name)) or not name.endswith(
            shard_suffix(k, len(files), save_id)
        ):
            suffix = shard_suffix(k, len(files), save_id)
            raise invalid(path, f"{where}.name", f"a file name ending in {suffix!r}", name)
        check_int(path, f"{where}.size", record.get("size"))
        digest = record.get("sha256")
        if not (isinstance(digest, str) and SHA256.match(digest)):
            raise invalid(path, f"{where}.sha256", "64 lowercase hex digits", digest)
    return len(files)


def check_meta(path: str, meta: Any) -> dict:
    """``meta`` if it follows the checkpoint schema (format, version, entries), else a ValueError.

    Unknown keys are allowed (the caller's metadata); the model keys are checked by
    :mod:`hkfit._saving`. A manifest (format version 2) also has ``shards``, and its
    sharded entries list their ``pieces``.
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise Refused(f"{path!r} is not an hkfit checkpoint (format {describe(found)}).")
    version = check_int(path, "format_version", meta.get("format_version", FORMAT_VERSION))
    if version > SHARDED_VERSION:
        raise Refused(
            f"{path!r} uses checkpoint format version {version}; this hkfit reads versions "
            f"<= {SHARDED_VERSION}. Upgrade hkfit."
        )
    if not isinstance(meta.get("hkfit_version", ""), str):
        raise invalid(path, "hkfit_version", "a string", meta["hkfit_version"])
    files = _check_shards(path, meta) if version >= SHARDED_VERSION else 0
    entries = meta.get("entries")
    if not isinstance(entries, list):
        raise invalid(path, "entries", "a list of objects", entries)
    for i, entry in enumerate(entries):
        _check_entry(path, i, entry, files)
    for name in ("path", "key"):
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            if entry[name] in seen:
                raise invalid(path, f"entries[{i}].{name}", "unique", entry[name])
            seen.add(entry[name])
    stored: set[tuple[int, str]] = set()
    for i, entry in enumerate(entries):
        for j, piece in enumerate(entry["pieces"] if entry.get("sharded") else ()):
            if (piece["file"], piece["key"]) in stored:
                field = f"entries[{i}].pieces[{j}].key"
                raise invalid(path, field, "unique in its shard file", piece["key"])
            stored.add((piece["file"], piece["key"]))
    return meta


def is_manifest(meta: dict) -> bool:
    """Whether checked metadata is a manifest (some arrays are in shard files)."""
    return meta.get("format_version", FORMAT_VERSION) >= SHARDED_VERSION


def stored_spec(entry: dict) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the ``.npy`` array of a checked entry, as written."""
    shape = tuple(entry["shape"])
    if entry["dtype"] == "prng_key":
        spec = key_data_spec(entry["key_impl"])
        assert spec is not None  # checked by check_meta
        return shape + tuple(spec.shape), np.dtype(spec.dtype)
    dtype = numeric_dtype(entry["dtype"])
    assert dtype is not None  # checked by check_meta
    return shape, np.dtype(f"u{dtype.itemsize}") if entry.get("bits") else dtype


# --- The file -------------------------------------------------------------------------------


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (never blocks on a FIFO).

    Raises:
      FileNotFoundError: if nothing is at ``path``.
      ValueError: if it is a directory, FIFO, socket or device.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"No checkpoint at {path!r}.") from None
    if stat.S_ISREG(mode):
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
        if stat.S_ISREG(os.fstat(fd).st_mode):  # still a file: not swapped since the stat
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise Refused(
        f"Expected a checkpoint file at {path!r}. Received: {_kind(path)}; hkfit reads "
        "regular files only."
    )


def _kind(path: str) -> str:
    mode = os.stat(path).st_mode
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_head(path: str, head: bytes) -> None:
    """Refuses what is not a zip archive (a pickle, a single ``.npy``...)."""
    if head.startswith(b"PK\x03\x04"):
        return
    if head.startswith(b"\x93NUMPY"):
        raise Refused(
            f"{path!r} is not a valid hkfit checkpoint: it is a single .npy array, "
            "not an .npz archive."
        )
    raise Refused(
        f"Refusing to load {path!r}: it is not an .npz archive (a pickle file or unknown "
        "data). hkfit never unpickles files."
    )


def _member_header(path: str, member: IO[bytes], name: str) -> tuple[tuple, bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, header bytes)`` of one ``.npy`` member."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(member, max_header_size=_HEADER_LIMIT)
    elif version == (2, 0):
        header = np.lib.format.read_array_header_2_0(member, max_header_size=_HEADER_LIMIT)
    else:
        raise Refused(
            f"{path!r} is not a valid hkfit checkpoint: its member {name!r} has "
            f".npy format version {version}; hkfit writes 1.0 or 2.0."
        )
    shape, fortran, dtype = header
    if dtype.hasobject:
        raise Refused(
            f"Refusing to load {path!r}: it holds a pickled Python object (an object array). "
            "hkfit checkpoints hold numeric arrays and JSON only, and loading never unpickles."
        )
    return tuple(shape), bool(fortran), dtype, member.tell()


def read_member(
    path: str, archive: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(array, its bytes in C order)`` of member ``name``, checked before allocating."""
    info = archive.getinfo(name)
    with archive.open(info) as member:
        got_shape, fortran, got_dtype, offset = _member_header(path, member, name)
        if got_shape != shape or got_dtype != dtype:
            raise Refused(
                f"{path!r} is corrupted: its member {name!r} holds an array of shape "
                f"{got_shape} {got_dtype}, its metadata says shape {shape} {dtype}."
            )
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if offset + nbytes != info.file_size:
            raise Refused(
                f"{path!r} is corrupted: its member {name!r} is {info.file_size} bytes long, "
                f"its header declares {offset + nbytes}."
            )
        raw = np.empty(nbytes, np.uint8)
        if member.readinto(raw) != nbytes:  # type: ignore[attr-defined]  # ZipExtFile
            raise Refused(f"{path!r} is truncated: its member {name!r} ends early.")
    if fortran:
        array = raw.view(dtype).reshape(shape[::-1]).T
        return array, np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return raw.view(dtype).reshape(shape), raw


def _info(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo | None:
    try:
        return archive.getinfo(name)
    except KeyError:
        return None


def check_compression(path: str, archive: zipfile.ZipFile) -> None:
    """Refuses an archive with a compressed member (nothing is ever decompressed)."""
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise Refused(
                f"{path!r} is not a readable hkfit checkpoint: its member {info.filename!r} "
                f"is compressed (method {info.compress_type}); hkfit writes uncompressed "
                "archives, so the file is corrupted or was not written by hkfit."
            )


def _meta_too_big(path: str, size: int) -> Refused:
    return Refused(
        f"{path!r} is not a valid hkfit checkpoint: its metadata is {size} bytes, more "
        f"than the {META_LIMIT} bytes hkfit reads."
    )


def read_meta_member(
    path: str, archive: zipfile.ZipFile, check: Callable[[str, Any], dict] = check_meta
) -> dict:
    """The metadata member of an open archive, checked by ``check(path, meta)``."""
    name = META_KEY + ".npy"
    info = _info(archive, name)
    if info is None:
        raise Refused(f"{path!r} is not a valid hkfit checkpoint: it has no {META_KEY!r} entry.")
    if info.file_size > META_LIMIT + _HEADER_LIMIT:  # too big to even read its header
        raise _meta_too_big(path, info.file_size)
    with archive.open(info) as member:
        shape, _, dtype, _ = _member_header(path, member, name)
    if len(shape) != 1 or dtype != np.uint8:
        raise Refused(f"{path!r} is corrupted: its metadata is not a 1-D uint8 array.")
    if shape[0] > META_LIMIT:
        raise _meta_too_big(path, shape[0])
    _, raw = read_member(path, archive, name, shape, dtype)
    try:
        return check(path, json.loads(raw.tobytes().decode("utf-8")))
    except Refused:
        raise
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise Refused(
            f"{path!r} is not a valid hkfit checkpoint: its metadata is not JSON hkfit "
            f"reads ({type(e).__name__}: {describe(str(e))})."
        ) from None


def check_sizes(path: str, archive: zipfile.ZipFile, entries: list[dict], size: int) -> None:
    """Every entry has its member, and together they fit in the file (no overlaps)."""
    total = archive.getinfo(META_KEY + ".npy").file_size
    for entry in entries:
        info = _info(archive, entry["key"] + ".npy")
        if info is None:
            raise Refused(f"{path!r} is corrupted: the array of {entry['path']} is missing.")
        total += info.file_size
    if total > size:
        raise Refused(
            f"{path!r} is corrupted: its members declare {total} bytes, more than the "
            f"{size} bytes of the file."
        )


def refuse_unread_objects(path: str, archive: zipfile.ZipFile, read: set[str]) -> None:
    """Peeks at the headers (only) of the members no entry names: pickles are refused."""
    for info in archive.infolist():
        if info.filename in read or not info.filename.endswith(".npy"):
            continue
        try:
            with archive.open(info) as member:
                _member_header(path, member, info.filename)
        except Refused:
            raise
        except Exception:  # not an array: never read, so never a risk
            continue


def verify(path: str, entry: dict, raw: np.ndarray) -> None:
    """Refuses an array whose bytes do not match the ``sha256`` its entry records."""
    digest = entry.get("sha256")
    if digest is not None and hashlib.sha256(raw.data).hexdigest() != digest:
        raise Refused(
            f"{path!r} is corrupted: the array of {entry['path']} (member {entry['key']!r}) "
            "does not match the sha256 its metadata records."
        )


def _in_file(meta: dict) -> list[dict]:
    """The entries whose arrays are in the file itself (not in shard files)."""
    return [entry for entry in meta["entries"] if not entry.get("sharded")]


def _read_archive(path: str, f: BinaryIO) -> tuple[dict, dict[str, np.ndarray]]:
    size = os.fstat(f.fileno()).st_size
    with open_archive(path, f) as archive:
        meta = read_meta_member(path, archive)
        entries = _in_file(meta)
        check_sizes(path, archive, entries, size)
        arrays = {}
        for entry in entries:
            shape, dtype = stored_spec(entry)
            array, raw = read_member(path, archive, entry["key"] + ".npy", shape, dtype)
            verify(path, entry, raw)
            arrays[entry["key"]] = array
        read = {META_KEY + ".npy"} | {key + ".npy" for key in arrays}
        refuse_unread_objects(path, archive, read)
    return meta, arrays


def open_archive(path: str, f: BinaryIO) -> zipfile.ZipFile:
    """The zip archive in ``f``, once its head and members' compression are checked."""
    check_head(path, f.read(6))
    f.seek(0)
    archive = zipfile.ZipFile(f)
    try:
        check_compression(path, archive)
    except BaseException:
        archive.close()
        raise
    return archive


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Turns any error but a :class:`Refused` into one naming ``path``."""
    try:
        yield
    except Refused:
        raise
    except Exception as e:  # zipfile, numpy or OS errors: a bad file
        raise Refused(
            f"{path!r} is not a readable hkfit checkpoint (truncated or corrupted "
            f"file): {type(e).__name__}: {describe(str(e))}."
        ) from None


def read_file(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The checked metadata and ``{entry key: array as stored}`` of a checkpoint file.

    The arrays of a manifest's sharded entries are not in it (see :mod:`hkfit._shard_files`).

    Raises:
      FileNotFoundError: if nothing is at ``path``.
      ValueError: naming ``path``, for anything but a well-formed hkfit checkpoint.
    """
    with open_regular(path) as f, reading(path):
        return _read_archive(path, f)


def read_meta(path: str) -> dict:
    """The checked metadata of a checkpoint file, without reading its arrays.

    Raises:
      FileNotFoundError: if nothing is at ``path``.
      ValueError: naming ``path``, for anything but a well-formed hkfit checkpoint.
    """
    with open_regular(path) as f, reading(path), open_archive(path, f) as archive:
        return read_meta_member(path, archive)
