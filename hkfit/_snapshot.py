"""A host copy of what ``Model.save`` writes, to write later (from another thread).

Taking the copy is the only part of an asynchronous save on the training thread: the
arrays are copied off the device (so a later training step that donates their buffers
cannot change them), and the file is then written from the copy, atomically, while
training goes on.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hkfit import _saving as saving
from hkfit.step import TrainState


def _host_copy(leaf: Any) -> Any:
    if not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable:
        return leaf  # numbers; arrays spread over processes are written by process 0 as is
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jnp.asarray(np.array(jax.random.key_data(leaf)))  # a new buffer
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return np.array(leaf)  # a copy, not a view of the device buffer


class Snapshot(NamedTuple):
    """What one model checkpoint holds, with its arrays copied to the host.

    Attributes:
      ts: the train state (host arrays).
      weights_only: a ``save_weights`` file rather than a full ``save``.
      input_spec: the model's input spec.
      seed: the model's seed key.
      progress: epoch, history and (inside an epoch) the position.
    """

    ts: TrainState
    weights_only: bool
    input_spec: Any
    seed: jax.Array
    progress: saving.Progress

    @classmethod
    def take(cls, ts: TrainState, **kwargs: Any) -> Snapshot:
        """Copies ``ts`` to the host now (this waits for the running step to finish)."""
        return cls(jax.tree_util.tree_map(_host_copy, ts), **kwargs)

    def write(self, path: str | os.PathLike) -> None:
        """Writes the checkpoint file atomically (only process 0 writes)."""
        saving.save(
            path,
            self.ts,
            weights_only=self.weights_only,
            input_spec=self.input_spec,
            seed=self.seed,
            progress=self.progress,
        )
