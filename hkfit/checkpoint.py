"""Safe checkpoints: pytrees of arrays in one ``.npz`` file with JSON metadata, never pickle.

One checkpoint is one file, written atomically (into ``.<name>.tmp`` in the same
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

    Args:
      path: the file to (over)write; its directory must exist.
      tree: a pytree of arrays (JAX or numpy), typed PRNG keys or numbers.
      metadata: JSON-serializable extra information, returned by :func:`load_tree`.

    Raises:
      TypeError: if a leaf is not numeric or ``metadata`` is not JSON-serializable.
      ValueError: if ``metadata`` uses a reserved key.
      OSError: if the file cannot be written (see :func:`atomic_write`).
    """
    path = os.fspath(path)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, entries = {}, []
    for i, (key_path, leaf) in enumerate(leaves):
        array, entry = _to_numpy(leaf)
        arrays[f"a{i}"] = array
        entries.append({"path": jax.tree_util.keystr(key_path), "key": f"a{i}", **entry})
    meta = dict(metadata or {})
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise ValueError(
            f"Expected `metadata` without the reserved keys {list(_RESERVED)}. Received: {clash}."
        )
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        hkfit_version=_hkfit_version(),
        entries=entries,
    )
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"Expected JSON-serializable `metadata`. Received an error: {e}.") from None
    arrays[META_KEY] = np.frombuffer(text.encode("utf-8"), np.uint8)
    size = sum(a.nbytes + _MEMBER_OVERHEAD for a in arrays.values())
    atomic_write(path, lambda f: np.savez(f, **arrays), size=size)  # type: ignore[arg-type]


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


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a checkpoint file: ``(metadata, {entry key: array})``, nothing restored yet.

    The file is checked before anything of size dictated by it is allocated (see the
    module docstring): its metadata schema, and for every entry the member's ``.npy``
    header, size, and ``sha256`` when recorded. Only the members the entries name are
    read; their arrays are as stored (raw bits for ``bits`` entries, key data for keys).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming ``path``, if it is not a regular file, not an hkfit checkpoint,
        is truncated or corrupted, or holds pickled objects (which are never loaded).
    """
    return read_file(os.fspath(path))


def _adopt(new: np.ndarray, old: Any) -> jax.Array:
    if _is_key(old):
        data = jnp.where(True, new, jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(old))
    return jnp.where(True, new, old)


@jax.jit
def _adopt_all(new: list, old: list) -> list:
    return [_adopt(n, o) for n, o in zip(new, old)]


def _placed_like(arrays: list[np.ndarray], leaves: list[Any]) -> list:
    """``arrays`` as leaves placed like ``leaves`` (sharding and committed-ness).

    The values are selected by one jitted op that also takes the live leaves, so the
    restored arrays sit where those were and a jitted training step that took the live
    tree hits its compilation cache (committed and uncommitted arrays compile separately).
    """
    live = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
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


def _checked_array(path: str, name: str, leaf: Any, entry: dict, array: np.ndarray) -> np.ndarray:
    """The checkpoint's value of one ``leaf``, with exactly the leaf's shape and dtype."""
    if _is_key(leaf):
        want = jax.eval_shape(jax.random.key_data, leaf)
        impl = str(jax.random.key_impl(leaf))
        if entry.get("key_impl") != impl or (array.shape, array.dtype) != (want.shape, want.dtype):
            raise ValueError(
                f"The checkpoint {path!r} does not match the model at {name}: its key data "
                f"has shape {array.shape} {array.dtype} ({entry.get('key_impl')}), the "
                f"model's {tuple(want.shape)} {np.dtype(want.dtype)} ({impl})."
            )
        return array
    if entry.get("bits"):
        array = array.view(_dtype_from_name(entry["dtype"]))
    if array.shape != _leaf_shape(leaf) or array.dtype.name != _dtype_name(leaf):
        raise ValueError(
            f"{path!r} is corrupted: the array of {name} has shape {array.shape} "
            f"{array.dtype}, its metadata says {tuple(entry['shape'])} {entry['dtype']}."
        )
    return array


def restore(
    target: Any,
    meta: dict,
    arrays: dict[str, np.ndarray],
    *,
    path: str = "checkpoint",
    ignore_extra_prefixes: tuple[str, ...] = (),
) -> Any:
    """Fills the structure of ``target`` with the arrays of a checkpoint read by :func:`read`.

    Leaves are matched by tree path, and every array must have exactly its target leaf's
    shape and dtype. Arrays are placed like the ``target`` leaves (same sharding) when
    those are JAX arrays. ``target`` itself is left untouched.

    Args:
      target: a pytree with the expected structure, shapes and dtypes.
      meta: the metadata returned by :func:`read`.
      arrays: the arrays returned by :func:`read`.
      path: the file name, for error messages.
      ignore_extra_prefixes: checkpoint paths starting with one of these may be absent
        from ``target`` (to load the weights of a full checkpoint).

    Raises:
      ValueError: naming the first tree path whose presence, shape or dtype differs.
    """
    matched, treedef = _matched(target, meta, path, ignore_extra_prefixes)
    restored = []
    for name, leaf, entry in matched:
        if entry["key"] not in arrays:
            raise ValueError(f"{path!r} is corrupted: the array of {name} is missing.")
        restored.append(_checked_array(path, name, leaf, entry, arrays[entry["key"]]))
    return jax.tree_util.tree_unflatten(
        treedef, _placed_like(restored, [leaf for _, leaf, _ in matched])
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
    return tree, {k: v for k, v in meta.items() if k not in _RESERVED}
