"""``Model.export(path, format="onnx")``: the inference function as an ONNX model.

The conversion is jax2onnx's (``pip install "hkfit[onnx]"``, which installs jax2onnx and
onnxruntime); it is imported only here, when an ONNX export is asked for. The inference
function's inputs and outputs are flattened into ONNX graph inputs and outputs named
after their tree paths: ``x`` and ``y`` for a single array, dict keys (``image``,
``meta``) or tuple positions (``0``, ``1``) joined with ``/`` for pytrees. The batch axis
is the symbolic dimension ``batch``, or a fixed size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from hkfit import checkpoint as checkpoint_lib


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def names(tree: Any, single: str) -> list[str]:
    """One ONNX name per leaf of ``tree``: ``single`` for a bare array, else its path."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if paths == [()]:
        return [single]
    found = ["/".join(_key_name(k) for k in path) for path in paths]
    if len(set(found)) < len(found):  # keys that collide once joined: full tree paths
        found = [single + jax.tree_util.keystr(path) for path in paths]
    return found


def _import() -> Any:
    try:
        import jax2onnx
    except ImportError:
        raise ImportError(
            "Exporting to ONNX needs jax2onnx (and onnxruntime to run the result): "
            "pip install 'hkfit[onnx]'."
        ) from None
    return jax2onnx


def export(path: str, inference: Callable[[Any], Any], row_spec: Any, batch: int | str) -> None:
    """Converts ``inference`` (``x -> y``) with jax2onnx and writes it to ``path`` atomically."""
    jax2onnx = _import()
    leaves, treedef = jax.tree_util.tree_flatten(row_spec)
    specs = [jax.ShapeDtypeStruct((batch, *s.shape[1:]), s.dtype) for s in leaves]
    out_spec = jax.eval_shape(inference, row_spec)

    def flat(*arrays: Any) -> Any:
        return tuple(
            jax.tree_util.tree_leaves(inference(jax.tree_util.tree_unflatten(treedef, arrays)))
        )

    try:
        model = jax2onnx.to_onnx(
            flat,
            specs,
            model_name="hkfit_model",
            input_names=names(row_spec, "x"),
            output_names=names(out_spec, "y"),
        )
    except Exception as e:
        raise ValueError(
            "jax2onnx could not convert the model's inference function to ONNX "
            f"(jax2onnx {getattr(jax2onnx, '__version__', '?')}, JAX {jax.__version__}): "
            f"{type(e).__name__}: {e}. Export it as StableHLO instead (the default "
            "format), which runs every JAX operation."
        ) from e
    data = model.SerializeToString()
    checkpoint_lib.atomic_write(os.fspath(path), lambda f: f.write(data))


__all__ = ["export", "names"]
