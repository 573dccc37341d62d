"""Safe checkpoints: pytrees of arrays in one ``.npz`` file with JSON metadata, never pickle.

One checkpoint is one file (arrays sharded across processes add one shard file per
process, see below), written atomically (into ``.<name>.tmp`` in the same
directory, flushed, ``fsync``-ed, then ``os.replace``-d over the target), so a crash while
saving leaves the previous checkpoint intact; the next save overwrites a temporary file
left by a killed writer. A new file gets the mode ``0o666 & ~umask``, as ``open`` gives;
an overwritten file keeps its mode. A failed write (a full disk...) raises an ``OSError``
of the same errno that names the file and about how many bytes it needs. The file is a
plain, uncompressed ``np.savez`` archive:

* one array per leaf (``a0``, ``a1``, ...), in the flattening order of the saved tree;
* ``__hkfit_meta__``: UTF-8 JSON bytes with the format name and version, the hkfit
  version, and for every leaf an entry: its tree path (``jax.tree_util.keystr``), member
  ``key``, ``shape``, ``dtype``, ``bits`` (stored as raw bits), ``key_impl`` (typed PRNG
  keys) and ``sha256`` (of the stored array's bytes in C order; optional, files written
  before it was added load without the check); plus whatever the caller adds (for a
  model: epoch, step, history, input spec).

**Arrays sharded across processes.** When a leaf is split over the devices of several
processes (``param_sharding="fsdp"`` or sharding rules in a multi-process run), no process
holds its value, and the checkpoint takes the shard layout. Every process then calls
:func:`save_tree`; each writes the distinct blocks it owns (a block held by several
devices is written once, by the lowest process holding it) to its own shard file
``<name>.shard-<k>-of-<n>.<id>`` next to ``path`` (``k`` the process, ``n`` their number,
``id`` 16 hex digits drawn per save), atomically; the processes agree that every shard
file is complete, and process 0 writes ``path`` last, atomically: the manifest. It is the
file above with ``format_version`` 2, where a sharded leaf's entry has ``"sharded":
true`` and, instead of a member and a digest, its ``pieces``: for each block, the index
of the shard file that holds it, its member ``key`` there, and its ``start`` and ``stop``
on every axis; and ``shards`` records the save's ``id`` and every shard file's ``name``,
``size`` and ``sha256``. A shard file is an archive of the same kind, of format
``"hkfit-checkpoint-shard"``, whose metadata repeats the save ``id``, its index
``file``, the count ``files``, and for each block its tree path, ``key``, ``start``,
``stop`` and ``sha256``. A save never overwrites a shard file that a checkpoint still
lists, so a crash before the manifest is written leaves the previous checkpoint whole;
saving over a manifest deletes the shard files it listed.

Loading a manifest checks every shard file first (size, metadata, save id, the blocks it
holds) and then reads blocks on demand: the first read of a shard file checks its whole
sha256 against the manifest, and each block its own. A target leaf on devices of several
processes is made with ``jax.make_array_from_callback`` and its own sharding, so each
process reads only the blocks its devices need, and a checkpoint loads whatever the
sharding, or the number of processes, it was saved with (one process assembles whole
arrays). A missing or damaged shard file is a ``ValueError`` naming it.

This module does pytree IO only; ``Model.save`` / ``Model.load`` build model checkpoints
on top of it.

Loading treats the file as untrusted and never executes code from it: only regular
files are opened (a FIFO, directory or device is refused, so loading never blocks); the
metadata is at most :data:`META_LIMIT` bytes and its whole schema is checked first;
compressed members are refused (nothing is decompressed); only the members the entries
name are read, each after its ``.npy`` header, declared size and the entry agree (shape
and exact dtype), so no allocation exceeds the file's size; object arrays are refused;
and a recorded ``sha256`` must match. Any problem is a ``ValueError`` naming the file.
Leaves are matched to the live structure by tree path, so optimizer states (NamedTuples)
restore into the optimizer that was passed to the model. Typed PRNG keys are stored as
``jax.random.key_data`` and restored with ``jax.random.wrap_key_data``; dtypes numpy does
not know natively (``bfloat16``...) are stored as their raw bits.

>>> import tempfile, os, jax.numpy as jnp
>>> path = os.path.join(tempfile.mkdtemp(), "tree.npz")
>>> save_tree(path, {"w": jnp.ones(3)}, metadata={"note": "hi"})
>>> tree, meta = load_tree(path, {"w": jnp.zeros(3)})
>>> float(tree["w"].sum()), meta["note"]
(3.0, 'hi')
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _checkpoint_file as file_lib
from hkfit import _shard_files, _shards
from hkfit._checkpoint_file import (
    FORMAT,
    FORMAT_VERSION,
    META_KEY,
    META_LIMIT,
    numeric_dtype,
    read_file,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_KEY",
    "META_LIMIT",
    "atomic_write",
    "check_structure",
    "load_tree",
    "read",
    "restore",
    "save_tree",
    "temp_path",
]

_RESERVED = ("format", "format_version", "hkfit_version", "entries")


# --- Leaves <-> numpy ----------------------------------------------------------------------


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _dtype_name(leaf: Any) -> str:
    return "prng_key" if _is_key(leaf) else np.dtype(jnp.result_type(leaf)).name


def _leaf_shape(leaf: Any) -> tuple:
    return tuple(int(d) for d in np.shape(leaf))


def _dtype_from_name(name: str) -> np.dtype:
    dtype = numeric_dtype(name)
    if dtype is None:
        raise TypeError(f"Expected numeric array leaves. Received: a leaf of dtype {name}.")
    return dtype


def _host_value(leaf: Any) -> Any:
    """The value of ``leaf`` on this host, also for arrays replicated across processes."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise ValueError(
                "Cannot save an array sharded across processes; hkfit checkpoints "
                f"hold replicated values. Received: an array of shape {leaf.shape} "
                f"with sharding {leaf.sharding}."
            )
        return leaf.addressable_shards[0].data
    return jax.device_get(leaf)


def _to_numpy(leaf: Any) -> tuple[np.ndarray, dict]:
    """A C-ordered host copy of ``leaf`` as the file stores it, and its entry."""
    entry: dict[str, Any] = {"shape": list(_leaf_shape(leaf)), "dtype": _dtype_name(leaf)}
    if _is_key(leaf):
        entry["key_impl"] = str(jax.random.key_impl(leaf))
        leaf = jax.random.key_data(leaf)
    array = np.array(_host_value(leaf), copy=True, order="C")
    if array.dtype.hasobject:
        raise TypeError(
            f"Expected numeric array leaves. Received: an object array of shape {array.shape}."
        )
    if entry["dtype"] != "prng_key" and array.dtype.name != entry["dtype"]:
        array = array.astype(_dtype_from_name(entry["dtype"]))  # Python scalars: as JAX sees them
    elif entry["dtype"] != "prng_key":
        _dtype_from_name(entry["dtype"])  # a numeric dtype the reader accepts
    if array.dtype.isbuiltin != 1:  # ml_dtypes (bfloat16, ...): store the raw bits
        array = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        entry["bits"] = True
    entry["sha256"] = hashlib.sha256(array.reshape(-1).view(np.uint8).data).hexdigest()
    return array, entry


# --- Writing -------------------------------------------------------------------------------


_MEMBER_OVERHEAD = 384  # bytes around one member: .npy header, zip64 local and central headers


def _hkfit_version() -> str:
    return str(getattr(sys.modules.get("hkfit"), "__version__", "unknown"))


def save_tree(path: str | os.PathLike, tree: Any, *, metadata: dict | None = None) -> None:
    """Writes every leaf of ``tree`` and JSON ``metadata`` to ``path``, atomically.

    When a leaf is an array split over the devices of several processes (FSDP or sharding
    rules in a multi-process run), the checkpoint is written in the shard layout (see the
    module docstring): every process must then call ``save_tree`` with the same tree,
    each writes the blocks it holds to its own shard file, and process 0 writes the
    manifest at ``path`` last. No process returns before the manifest is in place, and if
    one process fails, every process raises. Otherwise whoever calls it writes one file.

    Args:
      path: the file to (over)write; its directory must exist.
      tree: a pytree of arrays (JAX or numpy), typed PRNG keys or numbers.
      metadata: JSON-serializable extra information, returned by :func:`load_tree`.

    Raises:
      TypeError: if a leaf is not numeric or ``metadata`` is not JSON-serializable.
      ValueError: if ``metadata`` uses a reserved key.
      OSError: if the file cannot be written (see :func:`atomic_write`), or, in the shard
        layout, if another process could not write its part.
    """
    path = os.fspath(path)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if any(_shards.spans_processes(leaf) for _, leaf in leaves):
        _save_sharded(path, leaves, dict(metadata or {}))
        return
    arrays, entries = {}, []
    for i, (key_path, leaf) in enumerate(leaves):
        array, entry = _to_numpy(leaf)
        arrays[f"a{i}"] = array
        entries.append({"path": jax.tree_util.keystr(key_path), "key": f"a{i}", **entry})
    meta = dict(metadata or {})
    _check_reserved(meta, _RESERVED)
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        hkfit_version=_hkfit_version(),
        entries=entries,
    )
    stale = _shards.referenced(path)  # a manifest replaced by one file: its shard files go
    _write_archive(path, arrays, meta)
    _shards.discard(stale)


def _check_reserved(meta: dict, reserved: tuple[str, ...]) -> None:
    clash = sorted(set(meta) & set(reserved))
    if clash:
        raise ValueError(
            f"Expected `metadata` without the reserved keys {list(reserved)}. Received: {clash}."
        )


def _json(meta: dict) -> str:
    try:
        return json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"Expected JSON-serializable `metadata`. Received an error: {e}.") from None


def _write_archive(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """One ``.npz`` of ``arrays`` and the JSON ``meta``, written atomically."""
    text = _json(meta)
    arrays = {**arrays, META_KEY: np.frombuffer(text.encode("utf-8"), np.uint8)}
    size = sum(a.nbytes + _MEMBER_OVERHEAD for a in arrays.values())
    atomic_write(path, lambda f: np.savez(f, **arrays), size=size)  # type: ignore[arg-type]


# --- Writing across processes --------------------------------------------------------------


def _spec_of_spanning(leaf: jax.Array) -> tuple[jax.Array, dict]:
    """The array whose blocks are stored (key data for keys) and the entry of ``leaf``."""
    entry: dict[str, Any] = {"shape": list(_leaf_shape(leaf)), "dtype": _dtype_name(leaf)}
    if _is_key(leaf):
        entry["key_impl"] = str(jax.random.key_impl(leaf))
        return jax.random.key_data(leaf), entry
    if _dtype_from_name(entry["dtype"]).isbuiltin != 1:
        entry["bits"] = True  # ml_dtypes (bfloat16, ...): the raw bits
    return leaf, entry


def _stored_block(data: np.ndarray, entry: dict) -> np.ndarray:
    if entry.get("bits"):
        return data.view(np.dtype(f"u{data.dtype.itemsize}"))
    return data


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(array.reshape(-1).view(np.uint8).data).hexdigest()


def _save_sharded(path: str, leaves: list, metadata: dict) -> None:
    """The shard layout: each process writes the blocks it owns to its shard file, all
    agree, then process 0 writes the manifest (every process calls this)."""
    _check_reserved(metadata, (*_RESERVED, "shards"))
    _json(metadata)  # the same answer in every process: before any process writes
    n, me = jax.process_count(), jax.process_index()
    save_id = _shards.new_save_id()
    shard = _shards.shard_path(path, me, n, save_id)
    entries: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    ok, error, record = True, None, bytes(40)
    try:
        blocks: dict[str, np.ndarray] = {}
        held: list[dict] = []
        counts = [0] * n
        for i, (key_path, leaf) in enumerate(leaves):
            entry: dict[str, Any] = {"path": jax.tree_util.keystr(key_path), "key": f"a{i}"}
            entries.append(entry)
            if not _shards.spans_processes(leaf):
                if me == 0:  # only process 0 writes the manifest
                    array, spec = _to_numpy(leaf)
                    arrays[entry["key"]] = array
                    entry.update(spec)
                continue
            stored, spec = _spec_of_spanning(leaf)
            entry.update(spec, sharded=True, pieces=[])
            for block in _shards.blocks(stored) if stored.size else ():  # no block if empty
                key = f"p{counts[block.process]}"
                counts[block.process] += 1
                bounds = {"start": list(block.start), "stop": list(block.stop)}
                entry["pieces"].append({"file": block.process, "key": key, **bounds})
                if block.process == me:
                    data = _stored_block(_shards.block_data(stored, block), entry)
                    blocks[key] = data
                    digest = _sha256(data)
                    held.append({"path": entry["path"], "key": key, **bounds, "sha256": digest})
        shard_meta = {
            "format": file_lib.SHARD_FORMAT,
            "format_version": _shard_files.SHARD_FORMAT_VERSION,
            "hkfit_version": _hkfit_version(),
            "id": save_id,
            "file": me,
            "files": n,
            "entries": held,
        }
        _write_archive(shard, blocks, shard_meta)
        size, digest = _shards.file_digest(shard)
        record = size.to_bytes(8, "little") + bytes.fromhex(digest)
    except BaseException as e:  # raised below, once every process knows
        ok, error = False, e
    statuses = _shards.agree(ok, record)
    try:
        _shards.raise_unless_all(statuses, error, f"write its shard file of {path!r}")
    except BaseException:
        _remove_quietly(shard)
        raise
    ok, error = True, None
    if me == 0:
        try:
            files = [
                {
                    "name": os.path.basename(_shards.shard_path(path, k, n, save_id)),
                    "size": int.from_bytes(status[:8], "little"),
                    "sha256": status[8:].hex(),
                }
                for k, (_, status) in enumerate(statuses)
            ]
            meta = dict(metadata)
            meta.update(
                format=FORMAT,
                format_version=file_lib.SHARDED_VERSION,
                hkfit_version=_hkfit_version(),
                entries=entries,
                shards={"id": save_id, "files": files},
            )
            stale = set(_shards.referenced(path))
            _write_archive(path, arrays, meta)
            _shards.discard(stale - {_shards.shard_path(path, k, n, save_id) for k in range(n)})
        except BaseException as e:
            ok, error = False, e
    statuses = _shards.agree(ok)
    try:
        _shards.raise_unless_all(statuses, error, f"write the manifest {path!r}")
    except BaseException:
        _remove_quietly(shard)
        raise


def temp_path(path: str | os.PathLike) -> str:
    """The temporary file :func:`atomic_write` writes before renaming it to ``path``.

    >>> temp_path("/ckpt/model.npz")
    '/ckpt/.model.npz.tmp'
    """
    path = os.fspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _mode_to_keep(path: str) -> int | None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return stat.S_IMODE(mode) if stat.S_ISREG(mode) else None


def _write_error(err: OSError, path: str, size: int | None) -> OSError:
    """``err`` (same errno, so the same OSError subclass) with a message naming ``path``."""
    needed = "" if size is None else f" (it needs about {size} bytes)"
    message = (
        f"Could not write {path!r}{needed}: {err.strerror or err}. The file at that path, "
        "if any, is unchanged."
    )
    return OSError(err.errno, message) if err.errno is not None else OSError(message)


def _sync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX); harmless to skip elsewhere."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _write_temp(tmp: str, write: Callable[[BinaryIO], Any], mode: int | None) -> os.stat_result:
    """Writes and syncs ``tmp`` (created afresh); its ``fstat``, to rename it safely."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask, as for any new file
    with os.fdopen(fd, "wb") as f:
        if mode is not None:  # overwriting: keep the mode the file had
            os.chmod(f.fileno() if os.chmod in os.supports_fd else tmp, mode)
        write(f)
        f.flush()
        os.fsync(f.fileno())
        return os.fstat(f.fileno())


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, size: int | None = None
) -> None:
    """Calls ``write(file)`` on :func:`temp_path` ``(path)``, then renames it over ``path``.

    The data is flushed and ``fsync``-ed before ``os.replace``, so ``path`` holds either
    its old content or the complete new one, never a partial file. A temporary file left
    by a writer that was killed is replaced. A new file gets the mode ``0o666 & ~umask``;
    an overwritten one keeps its mode. One writer per path at a time.

    Args:
      path: the file to (over)write; its directory must exist.
      write: writes the content to the binary file object it is given.
      size: about how many bytes ``write`` writes, for the message of a failed write.

    Raises:
      OSError: with the errno of the failure (``ENOSPC`` for a full disk...) and a
        message naming ``path`` and ``size``; the temporary file is removed and ``path``
        is unchanged.
    """
    path = os.fspath(path)
    tmp = temp_path(os.path.abspath(path))
    mode = _mode_to_keep(path)
    try:
        _remove(tmp)
        written = _write_temp(tmp, write, mode)
        current = os.lstat(tmp)
        ours = (current.st_dev, current.st_ino) == (written.st_dev, written.st_ino)
        if ours:
            os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _write_error(e, path, size) from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    if not ours:  # the temporary file is another writer's now: leave it to that one
        raise OSError(
            errno.EBUSY,
            f"Could not write {path!r}: another writer was writing it at the same time, "
            "and its file is kept. Write one path from one place at a time.",
        )
    _sync_directory(os.path.dirname(os.path.abspath(path)))


# --- Reading -------------------------------------------------------------------------------


def read(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """Reads a checkpoint file: ``(metadata, {entry key: array})``, nothing restored yet.

    The file is checked before anything of size dictated by it is allocated (see the
    module docstring): its metadata schema, and for every entry the member's ``.npy``
    header, size, and ``sha256`` when recorded. Only the members the entries name are
    read; their arrays are as stored (raw bits for ``bits`` entries, key data for keys).

    For a manifest (the shard layout), every shard file it lists is checked too (size,
    metadata, the blocks it holds), and each sharded entry's value is a reader of its
    blocks rather than an array: it has the stored ``shape`` and ``dtype``, and
    ``assemble(index)`` returns the block ``index`` selects (a tuple of slices; ``None``
    for the whole array), reading only the shard files that hold it. :func:`restore`
    reads that way only what the devices of this process need.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming ``path`` (or the shard file), if it is not a regular file, not
        an hkfit checkpoint, is missing, truncated or corrupted, or holds pickled objects
        (which are never loaded).
    """
    path = os.fspath(path)
    meta, arrays = read_file(path)
    values: dict[str, Any] = dict(arrays)
    if file_lib.is_manifest(meta):
        values.update(_shard_files.open_pieces(path, meta))
    return meta, values


def _adopt(new: np.ndarray, old: Any) -> jax.Array:
    if _is_key(old):
        data = jnp.where(True, new, jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(old))
    return jnp.where(True, new, old)


@jax.jit
def _adopt_all(new: list, old: list) -> list:
    return [_adopt(n, o) for n, o in zip(new, old)]


def _placed_like(arrays: list[Any], leaves: list[Any]) -> list:
    """``arrays`` as leaves placed like ``leaves`` (sharding and committed-ness).

    The values are selected by one jitted op that also takes the live leaves, so the
    restored arrays sit where those were and a jitted training step that took the live
    tree hits its compilation cache (committed and uncommitted arrays compile separately).
    """
    live = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array) and not isinstance(arrays[i], jax.Array)  # placed already
    ]
    out: list[Any] = list(arrays)
    if live:
        placed = _adopt_all([arrays[i] for i in live], [leaves[i] for i in live])
        for i, value in zip(live, placed):
            out[i] = value
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, jax.Array):
            out[i] = (
                jax.random.wrap_key_data(jnp.asarray(arrays[i]), impl=jax.random.key_impl(leaf))
                if _is_key(leaf)
                else jnp.asarray(arrays[i])
            )
    return out


def _describe(shape, dtype) -> str:
    return "absent" if shape is None else f"shape {tuple(shape)} {dtype}"


def _mismatch(path: str, name: str, entry: dict | None, shape: Any, dtype: Any) -> ValueError:
    got = (None, None) if entry is None else (entry["shape"], entry["dtype"])
    return ValueError(
        f"The checkpoint {path!r} does not match the model at {name}: the checkpoint "
        f"has {_describe(*got)}, the model has {_describe(shape, dtype)}. Load it into a "
        "model built from the same forward function, optimizer and input shapes."
    )


def _matched(
    target: Any,
    meta: dict,
    path: str,
    ignore_extra_prefixes: tuple[str, ...],
    check_dtypes: bool = True,
) -> tuple[list[tuple[str, Any, dict]], Any]:
    """``([(tree path, target leaf, entry)], treedef)``, or the error naming the first
    tree path whose presence, shape or dtype differs."""
    saved = {entry["path"]: entry for entry in meta.get("entries", [])}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    matched = []
    for key_path, leaf in leaves:
        name = jax.tree_util.keystr(key_path)
        entry = saved.pop(name, None)
        shape, dtype = _leaf_shape(leaf), _dtype_name(leaf)
        if (
            entry is None
            or tuple(entry["shape"]) != shape
            or (check_dtypes and entry["dtype"] != dtype)
        ):
            raise _mismatch(path, name, entry, shape, dtype)
        matched.append((name, leaf, entry))
    for name, entry in saved.items():
        if not name.startswith(ignore_extra_prefixes):
            raise _mismatch(path, name, entry, None, None)
    return matched, treedef


def check_structure(
    target: Any,
    meta: dict,
    *,
    path: str = "checkpoint",
    ignore_extra_prefixes: tuple[str, ...] = (),
    check_dtypes: bool = True,
) -> None:
    """Checks that ``meta``'s entries fit ``target`` without reading or allocating arrays.

    Args:
      target: a pytree whose leaves may be ``jax.ShapeDtypeStruct`` (from
        ``jax.eval_shape``).
      meta: the metadata returned by :func:`read`.
      path: the file name, for error messages.
      ignore_extra_prefixes: as for :func:`restore`.
      check_dtypes: compare dtypes too, not only tree paths and shapes.

    Raises:
      ValueError: the error :func:`restore` would raise for a tree path whose presence,
        shape (or dtype) differs.
    """
    _matched(target, meta, path, ignore_extra_prefixes, check_dtypes)


def _check_stored(path: str, name: str, leaf: Any, entry: dict, shape: tuple, dtype: Any) -> None:
    """Checks that a stored array of ``shape`` and ``dtype`` is the value of ``leaf``."""
    if _is_key(leaf):
        want = jax.eval_shape(jax.random.key_data, leaf)
        impl = str(jax.random.key_impl(leaf))
        if entry.get("key_impl") != impl or (shape, dtype) != (want.shape, want.dtype):
            raise ValueError(
                f"The checkpoint {path!r} does not match the model at {name}: its key data "
                f"has shape {shape} {dtype} ({entry.get('key_impl')}), the "
                f"model's {tuple(want.shape)} {np.dtype(want.dtype)} ({impl})."
            )
        return
    if entry.get("bits"):
        dtype = _dtype_from_name(entry["dtype"])
    if shape != _leaf_shape(leaf) or np.dtype(dtype).name != _dtype_name(leaf):
        raise ValueError(
            f"{path!r} is corrupted: the array of {name} has shape {shape} "
            f"{np.dtype(dtype)}, its metadata says {tuple(entry['shape'])} {entry['dtype']}."
        )


def _checked_array(path: str, name: str, leaf: Any, entry: dict, array: np.ndarray) -> np.ndarray:
    """The checkpoint's value of one ``leaf``, with exactly the leaf's shape and dtype."""
    _check_stored(path, name, leaf, entry, array.shape, array.dtype)
    if entry.get("bits") and not _is_key(leaf):
        array = array.view(_dtype_from_name(entry["dtype"]))
    return array


def _global_array(path: str, name: str, leaf: jax.Array, entry: dict, value: Any) -> jax.Array:
    """The checkpoint's value of ``leaf``, an array on devices of several processes, made
    with ``leaf``'s sharding: each process assembles only the blocks its devices hold."""
    shape, dtype = tuple(value.shape), value.dtype
    _check_stored(path, name, leaf, entry, shape, dtype)
    key = _is_key(leaf)
    sharding = jax.random.key_data(leaf).sharding if key else leaf.sharding
    view = _dtype_from_name(entry["dtype"]) if entry.get("bits") and not key else None

    def block(index: Any) -> np.ndarray:
        part = value.assemble(index) if isinstance(value, _shard_files.Pieces) else value[index]
        return part if view is None else part.view(view)

    array = jax.make_array_from_callback(shape, sharding, block)
    return jax.random.wrap_key_data(array, impl=jax.random.key_impl(leaf)) if key else array


def _values(path: str, matched: list[tuple[str, Any, dict]], arrays: dict[str, Any]) -> list:
    """The checkpoint's value of every matched leaf: an array to place, or (for a leaf
    on devices of several processes) a placed global array."""
    values: list[Any] = []
    for name, leaf, entry in matched:
        if entry["key"] not in arrays:
            raise ValueError(f"{path!r} is corrupted: the array of {name} is missing.")
        value = arrays[entry["key"]]
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            values.append(_global_array(path, name, leaf, entry, value))
            continue
        if isinstance(value, _shard_files.Pieces):
            value = value.assemble()
        values.append(_checked_array(path, name, leaf, entry, value))
    return values


def _agreed_values(path: str, matched: list, arrays: dict[str, Any]) -> list:
    """:func:`_values`, read in every process of a multi-process run together: if one
    process finds a shard file damaged, every process raises, so none loads alone."""
    ok, error, values, index = True, None, [], -1
    try:
        values = _values(path, matched, arrays)
    except Exception as e:  # raised below, once every process knows
        ok, error = False, e
        index = e.index if isinstance(e, _shard_files.ShardFileError) else -1
    finally:
        _shard_files.close(arrays)
    statuses = _shards.agree(ok, index.to_bytes(8, "little", signed=True))
    if error is not None:
        raise error
    for k, (good, status) in enumerate(statuses):
        if not good:
            index = int.from_bytes(status, "little", signed=True)
            which = f" (the shard file {_shard_name(arrays, index)!r})" if index >= 0 else ""
            raise file_lib.Refused(
                f"{path!r} could not be loaded: process {k} found part of it missing or "
                f"damaged{which}; its own error says which. Nothing was loaded."
            )
    return values


def _shard_name(arrays: dict[str, Any], index: int) -> str:
    for value in arrays.values():
        if isinstance(value, _shard_files.Pieces):
            return value.files[index].path
    return ""


def restore(
    target: Any,
    meta: dict,
    arrays: dict[str, Any],
    *,
    path: str = "checkpoint",
    ignore_extra_prefixes: tuple[str, ...] = (),
) -> Any:
    """Fills the structure of ``target`` with the arrays of a checkpoint read by :func:`read`.

    Leaves are matched by tree path, and every array must have exactly its target leaf's
    shape and dtype. Arrays are placed like the ``target`` leaves (same sharding) when
    those are JAX arrays. ``target`` itself is left untouched.

    A target leaf on devices of several processes is made with
    ``jax.make_array_from_callback`` and its own sharding, so each process reads only the
    blocks its devices hold, whatever the sharding the checkpoint was saved with. Restoring
    a manifest in a multi-process run is then collective: every process must call it, and
    if one cannot read a shard file, all raise.

    Args:
      target: a pytree with the expected structure, shapes and dtypes.
      meta: the metadata returned by :func:`read`.
      arrays: the arrays returned by :func:`read`.
      path: the file name, for error messages.
      ignore_extra_prefixes: checkpoint paths starting with one of these may be absent
        from ``target`` (to load the weights of a full checkpoint).

    Raises:
      ValueError: naming the first tree path whose presence, shape or dtype differs, or
        the shard file that is missing or damaged.
    """
    matched, treedef = _matched(target, meta, path, ignore_extra_prefixes)
    if file_lib.is_manifest(meta) and jax.process_count() > 1:
        values = _agreed_values(path, matched, arrays)
    else:
        try:
            values = _values(path, matched, arrays)
        finally:
            _shard_files.close(arrays)
    return jax.tree_util.tree_unflatten(
        treedef, _placed_like(values, [leaf for _, leaf, _ in matched])
    )


def load_tree(path: str | os.PathLike, target: Any) -> tuple[Any, dict]:
    """Loads a file written by :func:`save_tree` into the structure of ``target``.

    Returns:
      ``(tree, metadata)``: the restored pytree and the caller's metadata (without the
      format keys).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: on a structure mismatch, a corrupted file or pickled content.
    """
    meta, arrays = read(path)
    tree = restore(target, meta, arrays, path=os.fspath(path))
    reserved = (*_RESERVED, "shards") if file_lib.is_manifest(meta) else _RESERVED
    return tree, {k: v for k, v in meta.items() if k not in reserved}
