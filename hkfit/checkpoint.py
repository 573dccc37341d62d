"""Safe checkpoints: pytrees of arrays in one ``.npz`` file with JSON metadata, never pickle.

One checkpoint is one file, written atomically (a temporary file in the same directory,
flushed, ``fsync``-ed, then ``os.replace``-d over the target), so a crash while saving
leaves the previous checkpoint intact. The file is a plain ``np.savez`` archive:

* one array per leaf (``a0``, ``a1``, ...), in the flattening order of the saved tree;
* ``__hkfit_meta__``: UTF-8 JSON bytes with the format name and version, the hkfit
  version, and for every leaf its tree path (``jax.tree_util.keystr``), shape and dtype,
  plus whatever the caller adds (for a model: epoch, step, history, input spec).

This module does pytree IO only; ``Model.save`` / ``Model.load`` build model checkpoints
on top of it.

Loading reads arrays with ``allow_pickle=False`` and parses JSON, so it never executes
code from the file; object arrays are refused. Leaves are matched to the live structure
by tree path, so optimizer states (NamedTuples) restore into the optimizer that was
passed to the model. Typed PRNG keys are stored as ``jax.random.key_data`` and restored
with ``jax.random.wrap_key_data``; dtypes numpy does not know natively (``bfloat16``...)
are stored as their raw bits.

>>> import tempfile, os, jax.numpy as jnp
>>> path = os.path.join(tempfile.mkdtemp(), "tree.npz")
>>> save_tree(path, {"w": jnp.ones(3)}, metadata={"note": "hi"})
>>> tree, meta = load_tree(path, {"w": jnp.zeros(3)})
>>> float(tree["w"].sum()), meta["note"]
(3.0, 'hi')
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "hkfit-checkpoint"
FORMAT_VERSION = 1
META_KEY = "__hkfit_meta__"
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
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # jax's own dependency; knows bfloat16, float8_*, int4...

        return np.dtype(getattr(ml_dtypes, name))


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
    """A host copy of ``leaf`` that ``np.load(allow_pickle=False)`` reads back, and its entry."""
    entry: dict[str, Any] = {"shape": list(_leaf_shape(leaf)), "dtype": _dtype_name(leaf)}
    if _is_key(leaf):
        entry["key_impl"] = str(jax.random.key_impl(leaf))
        leaf = jax.random.key_data(leaf)
    array = np.array(_host_value(leaf), copy=True)
    if array.dtype.hasobject:
        raise TypeError(
            f"Expected numeric array leaves. Received: an object array of shape {array.shape}."
        )
    if entry["dtype"] != "prng_key" and array.dtype.name != entry["dtype"]:
        array = array.astype(_dtype_from_name(entry["dtype"]))  # Python scalars: as JAX sees them
    if array.dtype.isbuiltin != 1:  # ml_dtypes (bfloat16, ...): store the raw bits
        array = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        entry["bits"] = True
    return array, entry


# --- Writing -------------------------------------------------------------------------------


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
    atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # numpy stub


def atomic_write(path: str, write) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it over ``path``.

    The data is flushed and ``fsync``-ed before ``os.replace``, so ``path`` holds either
    its old content or the complete new one, never a partial file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); harmless to skip elsewhere
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# --- Reading -------------------------------------------------------------------------------


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _member(npz, key: str) -> np.ndarray:
    value = npz[key]  # numpy hands back raw bytes for a member that is not a .npy array
    if not isinstance(value, np.ndarray):
        raise ValueError(f"its member {key!r} is not a .npy array (hkfit never unpickles)")
    return value


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a checkpoint file: ``(metadata, {entry key: array})``, nothing restored yet.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not an hkfit checkpoint, is truncated or corrupted, or
        holds pickled objects (which are never loaded).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path!r}.")
    try:
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("it is a single .npy array, not an .npz archive")
            with loaded as npz:
                if META_KEY not in npz.files:
                    raise ValueError(f"it has no {META_KEY!r} entry")
                arrays = {k: _member(npz, k) for k in npz.files}
                meta = json.loads(bytes(arrays.pop(META_KEY).astype(np.uint8)).decode("utf-8"))
    except ValueError as e:
        message = str(e)
        if "pickle" in message.lower() and _is_zip(path):
            raise ValueError(
                f"Refusing to load {path!r}: it holds a pickled Python object (an "
                "object array). hkfit checkpoints hold numeric arrays and JSON only, "
                "and loading never unpickles."
            ) from None
        if "pickle" in message.lower():
            raise ValueError(
                f"Refusing to load {path!r}: it is not an .npz archive (a pickle "
                "file or unknown data). hkfit never unpickles files."
            ) from None
        raise ValueError(f"{path!r} is not a valid hkfit checkpoint: {message}.") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path!r} is not a readable hkfit checkpoint (truncated or corrupted "
            f"file): {type(e).__name__}: {e}."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} is not an hkfit checkpoint (format {found!r}).")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} uses checkpoint format version {meta['format_version']}; this "
            f"hkfit reads versions <= {FORMAT_VERSION}. Upgrade hkfit."
        )
    for entry in meta.get("entries", []):
        array = arrays.get(entry.get("key"))
        if array is None:
            raise ValueError(f"{path!r} is corrupted: the array of {entry.get('path')} is missing.")
        if array.dtype.hasobject:
            raise ValueError(f"Refusing to load {path!r}: it holds an object array.")
    return meta, arrays


def _entry_array(entry: dict, arrays: dict[str, np.ndarray]) -> np.ndarray:
    array = arrays[entry["key"]]
    if entry.get("bits"):
        array = array.view(_dtype_from_name(entry["dtype"]))
    return array


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


def restore(
    target: Any,
    meta: dict,
    arrays: dict[str, np.ndarray],
    *,
    path: str = "checkpoint",
    ignore_extra_prefixes: tuple[str, ...] = (),
) -> Any:
    """Fills the structure of ``target`` with the arrays of a checkpoint read by :func:`read`.

    Leaves are matched by tree path. Arrays are placed like the ``target`` leaves (same
    sharding) when those are JAX arrays.

    Args:
      target: a pytree with the expected structure, shapes and dtypes.
      meta, arrays: the output of :func:`read`.
      path: the file name, for error messages.
      ignore_extra_prefixes: checkpoint paths starting with one of these may be absent
        from ``target`` (to load the weights of a full checkpoint).

    Raises:
      ValueError: naming the first tree path whose presence, shape or dtype differs.
    """
    saved = {entry["path"]: entry for entry in meta.get("entries", [])}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    wanted = set()
    restored = []
    for key_path, leaf in leaves:
        name = jax.tree_util.keystr(key_path)
        wanted.add(name)
        entry = saved.get(name)
        shape, dtype = _leaf_shape(leaf), _dtype_name(leaf)
        if entry is None or tuple(entry["shape"]) != shape or entry["dtype"] != dtype:
            got = None if entry is None else entry["shape"]
            raise ValueError(
                f"The checkpoint {path!r} does not match the model at {name}: the checkpoint "
                f"has {_describe(got, entry and entry['dtype'])}, the model has "
                f"{_describe(shape, dtype)}. Load it into a model built from the same forward "
                "function, optimizer and input shapes."
            )
        array = _entry_array(entry, arrays)
        if _is_key(leaf):
            expected = _leaf_shape(jax.eval_shape(jax.random.key_data, leaf))
            if array.shape != expected:
                raise ValueError(
                    f"The checkpoint {path!r} does not match the model at {name}: "
                    f"its key data has shape {array.shape}, the model's key "
                    f"{expected} ({entry.get('key_impl')} vs "
                    f"{jax.random.key_impl(leaf)})."
                )
        elif array.shape != shape:
            raise ValueError(
                f"{path!r} is corrupted: the array of {name} has shape "
                f"{array.shape}, its metadata says {shape}."
            )
        restored.append(array)
    for name, entry in saved.items():
        if name not in wanted and not name.startswith(ignore_extra_prefixes):
            raise ValueError(
                f"The checkpoint {path!r} does not match the model at {name}: the checkpoint "
                f"has {_describe(entry['shape'], entry['dtype'])}, the model has "
                f"{_describe(None, None)}. Load it into a model built from the same forward "
                "function, optimizer and input shapes."
            )
    return jax.tree_util.tree_unflatten(
        treedef, _placed_like(restored, [leaf for _, leaf in leaves])
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
