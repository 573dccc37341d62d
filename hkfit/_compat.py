"""Every difference between the JAX versions hkfit supports, in one place.

* ``jax.make_mesh`` appears in 0.4.35 (before: a ``Mesh`` over the devices in order);
* ``jax.sharding.AxisType`` / ``axis_types=`` appear in 0.5.3, and from 0.9
  ``make_mesh`` makes Explicit axes by default: hkfit asks for Auto axes (shardings
  propagate through XLA);
* the CPU collectives option (gloo) is set through ``jax.config`` where it exists;
* ``compiler_options=`` of ``Lowered.compile`` is missing in some older versions;
* partitionable threefry (random bits that do not depend on the batch shape) is the
  default from JAX 0.5 and off in 0.4.x;
* the persistent compilation cache runs programs it loads on CPU correctly from JAX 0.5
  (0.4.30 hangs in them, 0.4.35 crashes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from hkfit import _executables as executables

_AXIS_TYPE = getattr(jax.sharding, "AxisType", None)


def make_mesh(
    shape: Sequence[int], names: Sequence[str], devices: Sequence[Any] | None = None
) -> Mesh:
    """A mesh of ``shape`` with axis ``names`` over ``devices`` (default: all), Auto axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape, names = tuple(int(s) for s in shape), tuple(names)
    if hasattr(jax, "make_mesh"):
        kwargs = {} if _AXIS_TYPE is None else {"axis_types": (_AXIS_TYPE.Auto,) * len(shape)}
        try:
            return jax.make_mesh(shape, names, devices=devices, **kwargs)
        except TypeError:  # a make_mesh without `devices=` or `axis_types=`
            pass
    return Mesh(np.array(devices, dtype=object).reshape(shape), names)


def set_cpu_collectives(implementation: str) -> None:
    """Selects the CPU collectives (e.g. gloo) where this JAX has the option."""
    # Older configs have no attribute for it (only update() knows it): set it then.
    current = getattr(jax.config, "jax_cpu_collectives_implementation", None)
    if current in (None, "none", ""):  # never override a user's choice such as "mpi"
        try:
            jax.config.update("jax_cpu_collectives_implementation", implementation)
        except (AttributeError, KeyError, ValueError):  # a JAX without the option
            pass


def cpu_cache_works() -> bool:
    """Whether programs loaded from the persistent compilation cache run on this backend."""
    if jax.default_backend() != "cpu":
        return True
    major, minor = (int(part) for part in jax.__version__.split(".")[:2])
    return (major, minor) >= (0, 5)


def threefry_partitionable() -> bool:
    """Whether random bits are independent of the batch shape (default from JAX 0.5)."""
    return bool(getattr(jax.config, "jax_threefry_partitionable", False))


def run_compiled_once(fn: Callable, *args: Any) -> Any:
    """Runs ``fn(*args)`` jitted; on CPU compiled with few optimizations (it runs once).

    Initialization runs once per model, so its compile time matters more than its speed:
    XLA's backend optimizations make it about 3x slower to compile on CPU. Only the
    missing-option error of an older JAX falls back to a normal compile; errors of ``fn``
    itself propagate from the single trace.

    The executables are kept by program text (the last ``_ONCE_CACHE_SIZE``): a process
    that builds the same model again (a notebook cell run twice, cross-validation folds,
    a sweep over settings that keep the shapes) initializes it without compiling.
    """
    jitted = jax.jit(fn)
    if jax.default_backend() != "cpu":
        return jitted(*args)
    lowered = jitted.lower(*args)  # traces fn once; its errors propagate from here
    # the argument shapes (unused ones are pruned from the text, but the executable checks
    # them) and trees (two forwards may compile to the same text with other param names)
    key = executables.program_key(lowered, args)
    compiled = _ONCE_CACHE.pop(key, None)
    if compiled is None:
        try:
            # JAX annotates the values as str | bool; XLA takes this option as an int.
            options = {"xla_backend_optimization_level": 0}
            compiled = lowered.compile(compiler_options=options)  # type: ignore[arg-type]
        except (TypeError, RuntimeError):  # a JAX without that option: compile normally
            compiled = lowered.compile()
    _ONCE_CACHE[key] = compiled  # the most recent last
    while len(_ONCE_CACHE) > _ONCE_CACHE_SIZE:
        _ONCE_CACHE.pop(next(iter(_ONCE_CACHE)))
    return compiled(*args)


_ONCE_CACHE: dict[str, Any] = {}
_ONCE_CACHE_SIZE = 16
