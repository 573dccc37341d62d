"""``Model.export`` / ``hkfit.load_exported``: the inference function as a StableHLO file.

:func:`export` traces ``x -> apply_fn(params, state, x)`` with the params and state
baked in as constants, and serializes it with ``jax.export`` (by default with a symbolic
batch dimension, so one file serves every batch size). :func:`load_exported` reads it
back into a callable that needs jax and numpy only: not the model's Python code, not
Haiku, not hkfit's model classes.

The file is a zip archive written atomically (see :func:`hkfit.checkpoint.atomic_write`)
with two members:

* ``hkfit_export.json``: the format name and version, the hkfit and JAX versions that
  wrote it, the platforms it was lowered for, the batch size (``null`` when symbolic),
  and every input and output leaf's tree path, shape (``null`` for the batch axis) and
  dtype;
* ``exported.bin``: ``jax.export.Exported.serialize()``, the StableHLO module with the
  calling convention, the input and output trees and shapes.

Reading parses JSON and a flatbuffer; nothing in the file is executed as Python, and
nothing is unpickled. ``Exported.serialize`` needs the ``flatbuffers`` package
(``pip install "hkfit[export]"``); JAX does not install it.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export  # JAX 0.4.30: not imported by `import jax`

from hkfit import _onnx
from hkfit import checkpoint as checkpoint_lib

FORMAT = "hkfit-export"
FORMAT_VERSION = 1
META_NAME = "hkfit_export.json"
MODULE_NAME = "exported.bin"
FORMATS = ("stablehlo", "onnx")


def _hkfit_version() -> str:
    return str(getattr(sys.modules.get("hkfit"), "__version__", "unknown"))


def _require_flatbuffers() -> None:
    try:
        import flatbuffers  # noqa: F401  # jax.export's serialization imports it
    except ImportError:
        raise ImportError(
            "Writing and reading exported models needs the `flatbuffers` package, which "
            "jax.export uses to serialize them: pip install 'hkfit[export]' (or pip "
            "install flatbuffers)."
        ) from None


def _host(tree: Any) -> Any:
    """Arrays fetched to numpy (one copy, whatever their sharding); typed keys kept."""

    def fetch(leaf: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            return leaf
        return np.asarray(jax.device_get(leaf))

    return jax.tree_util.tree_map(fetch, tree)


def _leaf_entries(tree: Any) -> list[dict]:
    """``[{"path", "shape", "dtype"}]`` per leaf; a symbolic dimension is ``None``."""
    return [
        {
            "path": jax.tree_util.keystr(path),
            "shape": [int(d) if isinstance(d, (int, np.integer)) else None for d in leaf.shape],
            "dtype": np.dtype(leaf.dtype).name,
        }
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def check_batch_args(batch_polymorphic: Any, batch_size: Any) -> int | None:
    """The fixed batch size, or ``None`` for a symbolic one.

    Raises:
      TypeError / ValueError: for a non-bool ``batch_polymorphic``, a ``batch_size`` with
        a symbolic batch, or a ``batch_size`` that is not a positive int.
    """
    if not isinstance(batch_polymorphic, (bool, np.bool_)):
        raise TypeError(
            "Expected `batch_polymorphic` to be True or False. Received: "
            f"batch_polymorphic={batch_polymorphic!r}."
        )
    if batch_polymorphic:
        if batch_size is not None:
            raise ValueError(
                "`batch_size` fixes the batch size of an export made with "
                "batch_polymorphic=False; with batch_polymorphic=True the batch size is "
                f"symbolic. Received: batch_size={batch_size!r}. Pass one of the two."
            )
        return None
    if batch_size is None:
        return 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"Expected `batch_size` to be an int. Received: batch_size={batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"Expected `batch_size` > 0. Received: batch_size={batch_size}.")
    return int(batch_size)


def input_specs(row_spec: Any, batch: int | None) -> Any:
    """The input spec with the batch axis set to ``batch``, or to one symbol if None."""
    axis: Any = batch
    if batch is None:
        (axis,) = jax_export.symbolic_shape("batch")  # one symbol shared by every leaf
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((axis, *s.shape[1:]), s.dtype), row_spec
    )


def _traces_with(fn: Callable, spec: Any) -> bool:
    """Whether ``fn`` traces on inputs of ``spec`` (nothing runs)."""
    try:
        jax.eval_shape(fn, spec)
    except Exception:
        return False
    return True


def export(
    path: str | os.PathLike,
    apply_fn: Callable[[Any, Any, Any], Any],
    params: Any,
    state: Any,
    row_spec: Any,
    *,
    format: str = "stablehlo",
    batch_polymorphic: bool = True,
    batch_size: int | None = None,
    platforms: Sequence[str] | None = None,
) -> None:
    """Writes ``x -> apply_fn(params, state, x)`` to ``path`` (see :meth:`hkfit.Model.export`).

    Args:
      path: the file to write (replaced atomically).
      apply_fn: pure inference ``(params, state, x) -> y``.
      params, state: baked into the exported function as constants.
      row_spec: a pytree of ``jax.ShapeDtypeStruct`` with a batch axis of size 1.
      format: ``"stablehlo"`` (read with :func:`load_exported`) or ``"onnx"``.
      batch_polymorphic: a symbolic batch axis (any batch size) or a fixed one.
      batch_size: the fixed batch size when ``batch_polymorphic=False`` (default 1).
      platforms: StableHLO only: the platforms to lower for (``("cpu", "cuda")``...);
        default, the platform of JAX's default backend.
    """
    if format not in FORMATS:
        raise ValueError(f"Expected `format` to be one of {FORMATS}. Received: format={format!r}.")
    batch = check_batch_args(batch_polymorphic, batch_size)
    if isinstance(platforms, str):
        raise TypeError(
            "Expected `platforms` to be a sequence of platform names, such as "
            f"('cpu', 'cuda'). Received: platforms={platforms!r}."
        )
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"Expected `path` to name a file. Received a directory: {path!r}.")
    if not os.path.isdir(directory):
        raise ValueError(
            f"Expected `path` in an existing directory. Received: {path!r}, whose directory "
            f"{directory!r} does not exist."
        )
    params, state = _host(params), _host(state)

    def inference(x: Any) -> Any:
        return apply_fn(params, state, x)

    if format == "onnx":
        if platforms is not None:
            raise ValueError(
                "`platforms` selects the platforms of a StableHLO export; an ONNX file "
                f"runs wherever onnxruntime does. Received: platforms={platforms!r}."
            )
        _onnx.export(path, inference, row_spec, "batch" if batch is None else batch)
        return
    _require_flatbuffers()
    spec = input_specs(row_spec, batch)
    lowering = None if platforms is None else tuple(platforms)
    try:
        exported = jax_export.export(jax.jit(inference), platforms=lowering)(spec)
    except Exception as e:
        if batch is not None or not _traces_with(inference, input_specs(row_spec, 1)):
            raise  # not a matter of the symbolic batch size
        raise ValueError(
            "The model's inference function cannot be exported with a symbolic batch "
            "dimension (it computes with the batch size as a number). Export it with "
            "`batch_polymorphic=False, batch_size=...` for one fixed batch size. "
            f"Error from jax.export: {type(e).__name__}: {e}"
        ) from e
    out_spec = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hkfit_version": _hkfit_version(),
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "batch_size": batch,
        "inputs": _leaf_entries(spec),
        "outputs": _leaf_entries(out_spec),
        "input_structure": str(jax.tree_util.tree_structure(spec)),
        "output_structure": str(jax.tree_util.tree_structure(out_spec)),
    }
    blob = bytes(exported.serialize())

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(META_NAME, json.dumps(meta, indent=1))
            archive.writestr(MODULE_NAME, blob)

    checkpoint_lib.atomic_write(path, write)


# --- Reading ---------------------------------------------------------------------------


def _read(path: str) -> tuple[dict, Any]:
    """``(metadata, jax.export.Exported)`` of an export file, checked."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No exported model at {path!r}.")
    if os.path.isdir(path):
        raise ValueError(
            f"Expected a file written by `Model.export`. Received a directory: {path!r}."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if META_NAME not in names or MODULE_NAME not in names:
                raise ValueError(
                    f"it is a zip archive without the members {META_NAME!r} and {MODULE_NAME!r}"
                )
            meta = json.loads(archive.read(META_NAME).decode("utf-8"))
            blob = archive.read(MODULE_NAME)
    except zipfile.BadZipFile:
        hint = (
            " (it looks like an ONNX file: run it with onnxruntime)"
            if path.endswith(".onnx")
            else ""
        )
        raise ValueError(
            f"{path!r} is not a model exported by `Model.export`: not a zip archive, or a "
            f"truncated or corrupted one{hint}."
        ) from None
    except (ValueError, UnicodeDecodeError, EOFError, OSError, KeyError) as e:
        raise ValueError(f"{path!r} is not a readable exported model: {e}.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path!r} is not a model exported by hkfit (format {found!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} uses export format version {version!r}; this hkfit reads versions "
            f"<= {FORMAT_VERSION}. Upgrade hkfit."
        )
    _require_flatbuffers()
    try:
        exported = jax_export.deserialize(bytearray(blob))
    except Exception as e:  # a flatbuffer that does not parse raises anything
        raise ValueError(
            f"{path!r} holds a StableHLO module that JAX {jax.__version__} cannot read "
            f"(corrupted, or written by a newer JAX: {meta.get('jax_version')}): "
            f"{type(e).__name__}: {e}."
        ) from None
    if len(exported.in_avals) != len(meta.get("inputs", ())):
        raise ValueError(f"{path!r} is corrupted: its input spec does not match its module.")
    return meta, exported


def _describe(entry: dict) -> str:
    dims = ", ".join("batch" if d is None else str(d) for d in entry["shape"])
    return f"shape ({dims}{',' if len(entry['shape']) == 1 else ''}) {entry['dtype']}"


_KINDS = (
    (np.floating, "float"),
    (np.signedinteger, "signed integer"),
    (np.unsignedinteger, "unsigned integer"),
    (np.complexfloating, "complex"),
)


def _kind(dtype: Any) -> str | None:
    """The kind within which inputs are converted (floats to floats...); None for others."""
    for kind, name in _KINDS:
        if jnp.issubdtype(dtype, kind):
            return name
    return None


class ExportedModel:
    """An exported model, loaded by :func:`load_exported`: call it on inputs.

    ``exported(x) -> y`` checks ``x`` (structure, shapes, batch size, dtype kind), runs
    the StableHLO module (compiled once per batch size) and returns JAX arrays in the
    structure the forward returns.

    Attributes:
      metadata: the JSON header of the file (versions, platforms, input and output spec).
      exported: the ``jax.export.Exported`` itself, e.g. for ``exported.call`` under a
        ``jax.jit`` of your own.
      batch_size: the fixed batch size, or ``None`` when it is symbolic.
    """

    def __init__(self, path: str, metadata: dict, exported: Any):
        self.path, self.metadata, self.exported = path, metadata, exported
        self.batch_size: int | None = metadata.get("batch_size")
        args, _ = jax.tree_util.tree_unflatten(
            exported.in_tree, list(range(len(exported.in_avals)))
        )
        self._treedef = jax.tree_util.tree_structure(args[0])
        self._inputs: list[dict] = metadata["inputs"]
        self._call = jax.jit(exported.call)

    def __repr__(self) -> str:
        inputs = ", ".join(f"x{e['path']}: {_describe(e)}" for e in self._inputs)
        return (
            f"ExportedModel({self.path!r}, inputs=[{inputs}], platforms={self.exported.platforms})"
        )

    def _checked(self, x: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(x)
        if treedef != self._treedef:  # type: ignore[operator]  # PyTreeDef: no jaxlib stub
            raise ValueError(
                f"Expected `x` with the structure the model was exported with: "
                f"{self._treedef}. Received: x with structure {treedef}. Pass inputs with "
                "the same keys and nesting as the model's inputs."
            )
        rows = None
        checked = []
        for leaf, entry, aval in zip(leaves, self._inputs, self.exported.in_avals):
            where = f"x{entry['path']}"
            shape, row = tuple(np.shape(leaf)), tuple(entry["shape"][1:])
            if len(shape) != len(entry["shape"]) or shape[1:] != row:
                fix = (
                    f" It looks like one example without its batch axis: pass {where}[None]."
                    if shape == row
                    else ""
                )
                raise ValueError(
                    f"Expected `{where}` with rows of shape {row} ({_describe(entry)}). "
                    f"Received: {where} of shape {shape}.{fix}"
                )
            if rows is not None and shape[0] != rows:
                raise ValueError(
                    f"Expected every input leaf to have the same number of rows. Received: "
                    f"{where} with {shape[0]} rows, and {rows} rows before it."
                )
            rows = shape[0]
            dtype = np.dtype(jnp.result_type(leaf))
            if dtype != aval.dtype:
                kind = _kind(aval.dtype)
                if kind is None or _kind(dtype) != kind:
                    also = f" (or another {kind} dtype, converted)" if kind else ""
                    raise ValueError(
                        f"Expected `{where}` of dtype {aval.dtype}{also}. Received: {where} "
                        f"of dtype {dtype}. Convert it: {where}.astype('{aval.dtype}')."
                    )
                leaf = jnp.asarray(leaf, aval.dtype)
            checked.append(leaf)
        if rows == 0:
            raise ValueError("Expected at least one row. Received: inputs with 0 rows.")
        if self.batch_size is not None and rows is not None and rows != self.batch_size:
            raise ValueError(
                f"This model was exported with a fixed batch size of {self.batch_size} "
                f"(`batch_polymorphic=False`). Received: inputs with {rows} rows. Pass "
                f"batches of exactly {self.batch_size} rows, or export with "
                "`batch_polymorphic=True` for any batch size."
            )
        return jax.tree_util.tree_unflatten(treedef, checked)

    def __call__(self, x: Any) -> Any:
        """The model's outputs for ``x`` (JAX arrays, in the forward's output structure).

        Raises:
          ValueError: if ``x`` does not match the exported input spec.
        """
        return self._call(self._checked(x))


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Loads a model written by :meth:`hkfit.Model.export` as a callable ``f(x) -> y``.

    It runs the serialized StableHLO module with JAX alone: the model's Python code
    (forward function, Haiku) is not needed, and nothing is unpickled. Inputs may be
    numpy or JAX arrays, or the pytree (dict, tuple) the model takes; they are checked
    against the exported spec (structure, per-row shapes, the fixed batch size of a
    ``batch_polymorphic=False`` export), and float (int) inputs of another width are
    converted to the exported dtype.

    Args:
      path: a file written by ``model.export(path)``.

    Returns:
      An :class:`ExportedModel`: call it on a batch; outputs are JAX arrays.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not an hkfit export (or is truncated or corrupted), was
        written by a newer format version, or was lowered for platforms that do not
        include this process's default backend.
      ImportError: if the ``flatbuffers`` package is missing (``pip install "hkfit[export]"``).

    >>> import os, tempfile, haiku as hk, numpy as np, hkfit
    >>> model = hkfit.Model(lambda x: hk.Linear(2)(x), loss="mse").init(np.ones((1, 3), np.float32))
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.zip")
    >>> model.export(path)
    >>> f = hkfit.load_exported(path)
    >>> f(np.ones((5, 3), np.float32)).shape
    (5, 2)
    """
    path = os.fspath(path)
    meta, exported = _read(path)
    platform = jax_export.default_export_platform()
    if platform not in exported.platforms:
        raise ValueError(
            f"{path!r} was exported for the platforms {tuple(exported.platforms)}, and this "
            f"process runs on {platform!r}. Export it with "
            f"`model.export(path, platforms=({platform!r}, ...))`, or run on one of those "
            "platforms (e.g. JAX_PLATFORMS=cpu)."
        )
    return ExportedModel(path, meta, exported)


__all__ = ["ExportedModel", "export", "load_exported"]
