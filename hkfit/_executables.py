"""Compiled steps shared by program text, so a rebuilt model does not compile again.

Every ``Model`` builds its steps as new Python closures, and ``jax.jit`` keys its cache
on the function object: a second model of the same architecture (a notebook cell run
again, cross-validation folds, a sweep over settings that keep the shapes) would compile
every step again, which is most of the time its first epoch takes on a CPU.

:class:`SharedJit` wraps a ``jax.jit`` function. The first call with new argument shapes
lowers it (a trace, no compile) and looks the program up by its text, its argument
shapes and its input/output trees; only a new program is compiled. The last
``CACHE_SIZE`` executables are kept for the process.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable
from typing import Any

import jax

#: Executables kept for the process (the most recently used).
CACHE_SIZE = 32

_CACHE: collections.OrderedDict[str, tuple[Any, float]] = collections.OrderedDict()

#: Seconds the compilation of the program last looked up took (when it was compiled, also
#: if it came from the cache now): what compiling a program of this size costs here.
last_compile_seconds = 0.0

#: While one of these JAX settings is on, calls go through ``jax.jit`` itself.
_JIT_ONLY_FLAGS = ("jax_disable_jit", "jax_debug_nans", "jax_debug_infs")


def _leaf_signature(leaf: Any) -> tuple:
    """What picks an executable for an argument leaf (cheap: runs on every call)."""
    return (
        type(leaf),
        getattr(leaf, "shape", None),
        getattr(leaf, "dtype", None),
        getattr(leaf, "sharding", None),
    )


def program_key(lowered: Any, args: tuple) -> str:
    """The cache key of a lowered program: its text, argument shapes and trees."""
    avals = [
        (getattr(a, "shape", None), str(getattr(a, "dtype", type(a).__name__)))
        for a in jax.tree_util.tree_leaves(args)
    ]
    trees = f"{lowered.in_tree}\n{lowered.out_tree}"
    text = f"{avals}\n{trees}\n{lowered.as_text()}"
    return hashlib.sha256(text.encode()).hexdigest()


def compiled_for(jitted: Any, args: tuple) -> Any:
    """The executable of ``jitted`` for ``args``: from the process cache, or compiled."""
    global last_compile_seconds
    lowered = jitted.lower(*args)
    key = program_key(lowered, args)
    entry = _CACHE.pop(key, None)
    if entry is None:
        started = time.perf_counter()
        entry = (lowered.compile(), time.perf_counter() - started)
    _CACHE[key] = entry  # the most recently used last
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    compiled, last_compile_seconds = entry
    return compiled


class SharedJit:
    """A ``jax.jit`` function whose executables are shared by program text.

    Args:
      jitted: the ``jax.jit``-wrapped function (with its donation and shardings).
      fixed: how many leading arguments keep their shapes for the life of this object
        (the train state and the logs of a step); only the other arguments are
        looked at on each call to pick an executable.

    Under ``jax.disable_jit()`` (``run_eagerly=True``), ``jax.debug_nans`` or
    ``jax.debug_infs`` calls go to ``jitted``, so they run op by op or re-run to find the
    failing operation. ``lower`` is ``jitted.lower``.
    """

    def __init__(self, jitted: Any, fixed: int = 0):
        self._jitted, self._fixed = jitted, fixed
        self._executables: dict[tuple, Any] = {}

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._jitted.lower(*args, **kwargs)

    def __call__(self, *args: Any) -> Any:
        if any(getattr(jax.config, flag, False) for flag in _JIT_ONLY_FLAGS):
            return self._jitted(*args)  # op by op, or jit's own NaN hunt
        varying = args[self._fixed :]
        leaves, tree = jax.tree_util.tree_flatten(varying)
        signature = (tree, *map(_leaf_signature, leaves))
        compiled = self._executables.get(signature)
        try:
            if compiled is None:
                compiled = self._executables[signature] = compiled_for(self._jitted, args)
            return compiled(*args)
        except TypeError:  # traced arguments (called inside a transformation), or a train
            return self._jitted(*args)  # state of other shapes: jit handles (or explains) it


def shared(fn: Callable, *, fixed: int = 0, **jit_kwargs: Any) -> SharedJit:
    """``SharedJit(jax.jit(fn, **jit_kwargs), fixed)``."""
    return SharedJit(jax.jit(fn, **jit_kwargs), fixed)
