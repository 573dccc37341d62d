"""Model checkpoints on top of :mod:`hkfit.checkpoint`'s pytree IO.

A model file holds the :class:`ModelTree` (params, state, and for a full save the
optimizer state, rng and step) and JSON metadata: the kind (``"model"`` or
``"weights"``), the input spec (so a fresh model can be initialized before loading), and
for a full save the epoch, the number of epochs trained, the history and the seed.

:func:`read` checks all of that metadata before anything is restored: the types and
ranges of every field, and an input spec whose example batch has at most
:data:`MAX_EXAMPLE_ELEMENTS` elements, so a fresh model never allocates what a file
dictates. A fresh model compares the shapes its initialization would give (computed with
``jax.eval_shape``, see :func:`check_fits`) with the file before allocating any.

In a multi-process run, :func:`save` is called by every process: process 0 writes the
file, or, when arrays are sharded across processes, every process writes its shard file
and process 0 the manifest (see :mod:`hkfit.checkpoint`); no process returns before the
checkpoint is complete.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from hkfit import _checkpoint_file as file_lib
from hkfit import _position as position_lib
from hkfit import _shards
from hkfit import checkpoint as checkpoint_lib
from hkfit.step import TrainState


class ModelTree(NamedTuple):
    """What a model checkpoint holds, in this order (so errors name params first).

    Paths read ``.params['linear']['w']``, ``.opt_state[0].mu['linear']['w']``, ``.rng``.
    A weights-only checkpoint leaves the last three ``None`` (no leaves).
    """

    params: Any
    state: Any
    opt_state: Any = None
    rng: Any = None
    step: Any = None


class Progress(NamedTuple):
    """The training progress a full checkpoint restores besides the arrays."""

    epoch: int
    epochs_trained: int
    history_epoch: list
    history: dict
    position: dict | None = None  # a save inside an epoch: see ``Model.resume_point``


def encode_spec(spec: Any) -> Any:
    """An input spec (a pytree of ShapeDtypeStruct in dicts/lists/tuples) as JSON."""
    if hasattr(spec, "shape") and hasattr(spec, "dtype"):
        return {"shape": list(spec.shape), "dtype": np.dtype(spec.dtype).name}
    if isinstance(spec, dict) and all(isinstance(k, str) for k in spec):
        return {"dict": {k: encode_spec(v) for k, v in spec.items()}}
    if type(spec) in (list, tuple):
        return {type(spec).__name__: [encode_spec(v) for v in spec]}
    raise TypeError(type(spec).__name__)


MAX_EXAMPLE_ELEMENTS = 2**26  # elements of the example batch a fresh model initializes from
_MAX_SPEC_DEPTH = 16
_MAX_SPEC_LEAVES = 4096


def decode_spec(encoded: Any, *, path: str = "checkpoint") -> Any:
    """The input spec (a pytree of ``jax.ShapeDtypeStruct``) of an encoded one, checked.

    >>> decode_spec({"tuple": [{"shape": [1, 3], "dtype": "float32"}]})
    (ShapeDtypeStruct(shape=(1, 3), dtype=float32),)

    Raises:
      ValueError: naming ``path``, for a malformed spec or one whose example batch has
        more than :data:`MAX_EXAMPLE_ELEMENTS` elements.
    """
    leaves: list[jax.ShapeDtypeStruct] = []
    spec = _decode(path, encoded, "input_spec", 0, leaves)
    total = sum(math.prod(leaf.shape) for leaf in leaves)
    if not leaves or total > MAX_EXAMPLE_ELEMENTS:
        raise file_lib.invalid(
            path,
            "input_spec",
            f"an example batch of at most {MAX_EXAMPLE_ELEMENTS} elements",
            f"{total} elements",
        )
    return spec


def _decode(path: str, encoded: Any, field: str, depth: int, leaves: list) -> Any:
    if depth > _MAX_SPEC_DEPTH or len(leaves) > _MAX_SPEC_LEAVES:
        raise file_lib.invalid(
            path, field, f"at most {_MAX_SPEC_DEPTH} levels and {_MAX_SPEC_LEAVES} arrays", "more"
        )
    if isinstance(encoded, dict) and set(encoded) == {"shape", "dtype"}:
        shape = file_lib.check_shape(path, f"{field}.shape", encoded["shape"])
        dtype = file_lib.numeric_dtype(encoded["dtype"])
        if dtype is None:
            raise file_lib.invalid(path, f"{field}.dtype", "a numeric dtype name", encoded["dtype"])
        if not shape or shape[0] < 1 or max(shape) > MAX_EXAMPLE_ELEMENTS:
            raise file_lib.invalid(
                path,
                f"{field}.shape",
                f"a batch shape [rows >= 1, ...], each at most {MAX_EXAMPLE_ELEMENTS} elements",
                list(shape),
            )
        leaves.append(jax.ShapeDtypeStruct(shape, dtype))
        return leaves[-1]
    if isinstance(encoded, dict) and len(encoded) == 1:
        ((kind, value),) = encoded.items()
        if kind == "dict" and isinstance(value, dict):
            return {
                k: _decode(path, v, f"{field}.dict.{k}", depth + 1, leaves)
                for k, v in value.items()
            }
        if kind in ("list", "tuple") and isinstance(value, list):
            items = [
                _decode(path, v, f"{field}.{kind}[{i}]", depth + 1, leaves)
                for i, v in enumerate(value)
            ]
            return items if kind == "list" else tuple(items)
    raise file_lib.invalid(
        path, field, "an input spec ({'shape', 'dtype'}, {'dict'}, {'list'} or {'tuple'})", encoded
    )


def example(spec: Any) -> Any:
    """Zeros (numpy) with the shapes and dtypes of a decoded input spec."""
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), spec)


def _key_json(key: jax.Array) -> dict:
    return {
        "impl": str(jax.random.key_impl(key)),
        "data": np.asarray(jax.random.key_data(key)).tolist(),
    }


def save(
    path: str | os.PathLike,
    ts: TrainState,
    *,
    weights_only: bool,
    input_spec: Any,
    seed: jax.Array,
    progress: Progress,
) -> None:
    """Writes a model checkpoint atomically; in a multi-process run, every process calls it.

    When an array is split over devices of several processes, each process writes its
    shard file and process 0 the manifest (see :func:`hkfit.checkpoint.save_tree`);
    otherwise process 0 writes the one file. Either way no process returns before the
    checkpoint is complete, so a ``load`` that follows in any process finds it, and if
    the writing failed, every process raises.
    """
    try:
        spec = encode_spec(input_spec)
    except TypeError:
        spec = None
    metadata: dict[str, Any] = {"kind": "weights" if weights_only else "model", "input_spec": spec}
    tree = ModelTree(ts.params, ts.state)
    if not weights_only:
        tree = ModelTree(ts.params, ts.state, ts.opt_state, ts.rng, ts.step)
        metadata.update(
            epoch=int(progress.epoch),
            epochs_trained=int(progress.epochs_trained),
            step=int(ts.step),
            history={
                "epoch": [int(e) for e in progress.history_epoch],
                "history": {k: [float(v) for v in vs] for k, vs in progress.history.items()},
            },
            seed=_key_json(seed),
        )
        if progress.position is not None:
            metadata["position"] = progress.position
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if _shards.any_spans_processes(tree):
        os.makedirs(directory, exist_ok=True)
        checkpoint_lib.save_tree(path, tree, metadata=metadata)  # every process writes
        return

    def write() -> None:
        os.makedirs(directory, exist_ok=True)
        checkpoint_lib.save_tree(path, tree, metadata=metadata)

    _shards.on_main(write, f"write {path!r}")


def _check_floats(path: str, field: str, values: Any) -> None:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise file_lib.invalid(path, field, "a list of numbers", values)


def _check_history(path: str, history: Any) -> None:
    """``{"epoch": [int], "history": {name: [float]}}``; NaN and infinities are kept."""
    if not isinstance(history, dict):
        raise file_lib.invalid(path, "history", "an object", history)
    epochs = history.get("epoch", [])
    if not isinstance(epochs, list):
        raise file_lib.invalid(path, "history.epoch", "a list of integers", epochs)
    for i, epoch in enumerate(epochs):
        file_lib.check_int(path, f"history.epoch[{i}]", epoch)
    values = history.get("history", {})
    if not isinstance(values, dict):
        raise file_lib.invalid(path, "history.history", "an object of lists", values)
    for name, series in values.items():
        _check_floats(path, f"history.history.{name}", series)


def _check_seed(path: str, seed: Any) -> None:
    if not isinstance(seed, dict) or not isinstance(seed.get("impl"), str):
        raise file_lib.invalid(path, "seed", "an object with `impl` and `data`", seed)
    data = seed.get("data")
    if not isinstance(data, list) or len(data) > 64:
        raise file_lib.invalid(path, "seed.data", "a list of at most 64 uint32", data)
    for i, word in enumerate(data):
        file_lib.check_int(path, f"seed.data[{i}]", word, 2**32 - 1)


def check_meta(path: str, meta: dict) -> Any:
    """Checks the model fields of checked checkpoint metadata; returns the decoded input spec.

    Raises:
      ValueError: naming ``path`` and the first field of the wrong type or range.
    """
    kind = meta.get("kind")
    if kind is not None and kind not in ("model", "weights"):
        raise file_lib.invalid(path, "kind", "'model' or 'weights'", kind)
    for field in ("epoch", "epochs_trained", "step"):
        if field in meta:
            file_lib.check_int(path, field, meta[field])
    if meta.get("history") is not None:
        _check_history(path, meta["history"])
    if meta.get("seed") is not None:
        _check_seed(path, meta["seed"])
    if meta.get("position") is not None:  # a save inside an epoch
        position_lib.decode(meta["position"], path)
    spec = meta.get("input_spec")
    return None if spec is None else decode_spec(spec, path=path)


def read(path: str | os.PathLike, *, weights_only: bool) -> tuple[dict, dict, Any]:
    """``(meta, arrays, input spec or None)`` of a model checkpoint, all checked.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: for a malformed or corrupted file, a pytree checkpoint, or a
        weights-only file given to a full load.
    """
    path = os.fspath(path)
    meta, arrays = checkpoint_lib.read(path)
    spec = check_meta(path, meta)
    kind = meta.get("kind")
    if kind is None:
        raise ValueError(
            f"{path!r} is an hkfit checkpoint of a pytree, not of a model; read it "
            "with hkfit.checkpoint.load_tree."
        )
    if kind == "weights" and not weights_only:
        raise ValueError(
            f"{path!r} holds weights only (params and state), written by "
            "`save_weights`; load it with `model.load_weights(path)`."
        )
    return meta, arrays, spec


def check_fits(path: str | os.PathLike, meta: dict, params: Any, state: Any) -> None:
    """Checks the file's params and state against the shapes a fresh model would create.

    Only the tree paths and shapes are compared (they decide what is allocated).

    ``params`` and ``state`` may be ``jax.ShapeDtypeStruct`` trees from ``jax.eval_shape``
    of the model's initialization, so nothing is allocated when they differ.

    Raises:
      ValueError: naming the first tree path whose presence, shape or dtype differs.
    """
    checkpoint_lib.check_structure(
        ModelTree(params, state),
        meta,
        path=os.fspath(path),
        ignore_extra_prefixes=(".opt_state", ".rng", ".step"),
        check_dtypes=False,  # the model's init may cast; `restore` checks them exactly
    )


def restore(
    path: str | os.PathLike,
    meta: dict,
    arrays: dict,
    ts: TrainState,
    *,
    weights_only: bool,
    seed: jax.Array,
) -> tuple[TrainState, Progress | None]:
    """The restored train state, and the progress of a full checkpoint (``ts`` untouched).

    ``meta`` and ``arrays`` come from :func:`read`. A full checkpoint whose optimizer state
    does not fit this model's optimizer (saved with another optimizer) restores everything
    else and warns that the optimizer state starts fresh.
    """
    path = os.fspath(path)
    if weights_only:
        tree = checkpoint_lib.restore(
            ModelTree(ts.params, ts.state),
            meta,
            arrays,
            path=path,
            ignore_extra_prefixes=(".opt_state", ".rng", ".step"),
        )
        return ts._replace(params=tree.params, state=tree.state), None
    try:
        tree = checkpoint_lib.restore(ModelTree(*ts), meta, arrays, path=path)
    except ValueError as err:
        if ".opt_state" not in str(err) or isinstance(err, file_lib.Refused):
            raise  # not another optimizer's state: a damaged file
        partial = ModelTree(ts.params, ts.state, None, ts.rng, ts.step)
        tree = checkpoint_lib.restore(
            partial, meta, arrays, path=path, ignore_extra_prefixes=(".opt_state",)
        )
        tree = tree._replace(opt_state=ts.opt_state)
        warnings.warn(
            f"{path!r} holds an optimizer state that does not fit this model's "
            "optimizer (it was saved with another one); params, state, step and "
            "history were restored and the optimizer state starts fresh. Use "
            "`load_weights` to say that only the weights matter.",
            stacklevel=4,
        )
    saved_seed = meta.get("seed")
    if saved_seed is not None and saved_seed["data"] != _key_json(seed)["data"]:
        warnings.warn(
            f"{path!r} was written by a model with a different seed; the shuffle "
            "order of later epochs follows this model's seed, so training does not "
            "continue exactly as the saved run would have.",
            stacklevel=4,
        )
    history = meta.get("history") or {}
    epoch = int(meta.get("epoch", 0))
    progress = Progress(
        epoch,
        int(meta.get("epochs_trained", epoch)),
        [int(e) for e in history.get("epoch", [])],
        {k: [float(v) for v in vs] for k, vs in history.get("history", {}).items()},
        meta.get("position"),
    )
    return TrainState(*tree), progress
