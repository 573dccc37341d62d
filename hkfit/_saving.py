"""Model checkpoints on top of :mod:`hkfit.checkpoint`'s pytree IO.

A model file holds the :class:`ModelTree` (params, state, and for a full save the
optimizer state, rng and step) and JSON metadata: the kind (``"model"`` or
``"weights"``), the input spec (so a fresh model can be initialized before loading), and
for a full save the epoch, the number of epochs trained, the history and the seed.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import checkpoint as checkpoint_lib
from hkfit.distributed import is_main_process
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


def encode_spec(spec: Any) -> Any:
    """An input spec (a pytree of ShapeDtypeStruct in dicts/lists/tuples) as JSON."""
    if hasattr(spec, "shape") and hasattr(spec, "dtype"):
        return {"shape": list(spec.shape), "dtype": np.dtype(spec.dtype).name}
    if isinstance(spec, dict) and all(isinstance(k, str) for k in spec):
        return {"dict": {k: encode_spec(v) for k, v in spec.items()}}
    if type(spec) in (list, tuple):
        return {type(spec).__name__: [encode_spec(v) for v in spec]}
    raise TypeError(type(spec).__name__)


def decode_spec(encoded: Any) -> Any:
    """Zeros with the shapes and dtypes of an encoded input spec."""
    if "shape" in encoded:
        return np.zeros(encoded["shape"], jnp.dtype(encoded["dtype"]))
    if "dict" in encoded:
        return {k: decode_spec(v) for k, v in encoded["dict"].items()}
    if "list" in encoded:
        return [decode_spec(v) for v in encoded["list"]]
    return tuple(decode_spec(v) for v in encoded["tuple"])


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
    """Writes a model checkpoint atomically (only process 0 writes)."""
    if not is_main_process():
        return
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
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    checkpoint_lib.save_tree(path, tree, metadata=metadata)


def read(path: str | os.PathLike, *, weights_only: bool) -> tuple[dict, dict, Any]:
    """``(meta, arrays, example_input or None)`` of a model checkpoint.

    Raises:
      ValueError: for a pytree checkpoint, or a weights-only file given to a full load.
    """
    path = os.fspath(path)
    meta, arrays = checkpoint_lib.read(path)
    kind = meta.get("kind")
    if kind not in ("model", "weights"):
        raise ValueError(
            f"{path!r} is an hkfit checkpoint of a pytree, not of a model; read it "
            "with hkfit.checkpoint.load_tree."
        )
    if kind == "weights" and not weights_only:
        raise ValueError(
            f"{path!r} holds weights only (params and state), written by "
            "`save_weights`; load it with `model.load_weights(path)`."
        )
    spec = meta.get("input_spec")
    return meta, arrays, None if spec is None else decode_spec(spec)


def restore(
    path: str | os.PathLike,
    meta: dict,
    arrays: dict,
    ts: TrainState,
    *,
    weights_only: bool,
    seed: jax.Array,
) -> tuple[TrainState, Progress | None]:
    """The restored train state, and the progress of a full checkpoint.

    A full checkpoint whose optimizer state does not fit this model's optimizer (saved
    with another optimizer) restores everything else and warns that the optimizer state
    starts fresh.
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
        if ".opt_state" not in str(err):
            raise
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
    if saved_seed is not None and saved_seed.get("data") != _key_json(seed)["data"]:
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
    )
    return TrainState(*tree), progress
