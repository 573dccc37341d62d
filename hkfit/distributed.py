"""Multi-host helpers on JAX's own runtime, and the data-parallel strategy.

``DataParallel`` (defined in the layout module, re-exported here and as
``hkfit.DataParallel``) replicates the model state on every device of a
:class:`jax.sharding.Mesh`, splits every batch along its ``"data"`` axis, and compiles
the steps once for the whole mesh (SPMD: XLA inserts the gradient all-reduce, and
``hk.BatchNorm`` sees global batch statistics).

Multi-host: call :func:`initialize` first in every process, then run the same script,
each process passing ITS OWN shard of the data (the same number of rows everywhere).
Logs, ``History`` and metrics are global and identical on every process; only process 0
prints and writes files (see :func:`is_main_process`).
"""

from __future__ import annotations

from typing import Any

import jax

from hkfit import _compat
from hkfit._layout import DataParallel, ShardingRules

__all__ = ["DataParallel", "ShardingRules", "initialize", "is_main_process"]

# --- Multi-host ----------------------------------------------------------------------------


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = "gloo",
    **kwargs: Any,
) -> None:
    """Joins this process to a multi-process run (``jax.distributed.initialize``).

    Call it at the start of every process, before any other JAX call. On CPU it also
    selects the ``cpu_collectives`` implementation (gloo), which cross-process
    computations on CPU need; pass ``None`` to leave JAX's setting alone.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable by every process.
      num_processes: the number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      cpu_collectives: ``"gloo"``, ``"mpi"`` or ``None``.
      **kwargs: passed on to ``jax.distributed.initialize`` (e.g. ``local_device_ids``).

    In each of 2 processes (``i`` = 0 or 1), before anything else touches JAX::

        hkfit.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=i)

    >>> is_main_process()   # a single-process run is its own main process
    True
    """
    if cpu_collectives is not None:
        _compat.set_cpu_collectives(cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )


def is_main_process() -> bool:
    """True in process 0 (and in any single-process run): the one that prints and saves."""
    return jax.process_index() == 0
