"""A warm start across processes: JAX's persistent compilation cache, one call away.

Each ``fit`` compiles its steps (one to a few seconds per model and batch shape). With the
cache on, a later process that builds the same model on the same shapes and the same JAX
version loads the compiled programs from disk instead: scripts rerun after a crash, test
suites, notebooks restarted, hyper-parameter sweeps that keep shapes, several hosts
sharing a directory.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import jax

from hkfit import _compat


def default_path() -> pathlib.Path:
    """``$XDG_CACHE_HOME/hkfit/jax`` (``~/.cache/hkfit/jax`` when it is not set)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "hkfit" / "jax"


def enable_compilation_cache(
    path: str | os.PathLike | None = None, *, min_compile_time_secs: float = 0.0
) -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache for this process.

    Call it once, before the first ``fit`` (compilations done before it are not stored).
    Entries are keyed by the program, the shapes, the device and the JAX version, so a
    stale entry is never used: it is simply not found. The directory may be shared by
    processes and hosts.

    Args:
      path: the cache directory; created if missing. Default: :func:`default_path`
        (``$XDG_CACHE_HOME/hkfit/jax``, else ``~/.cache/hkfit/jax``).
      min_compile_time_secs: store only programs that took at least this long to compile.
        JAX's own default is 1 s; hkfit stores every program (0), since the small steps
        of a CPU model compile faster than that, yet add up to most of a short run.

    Returns:
      The cache directory, or None where the cache is left off: on CPU with JAX < 0.5,
      which runs programs loaded from the cache incorrectly (a warning says so).

    Raises:
      ValueError: if ``path`` exists and is not a directory, or
        ``min_compile_time_secs`` is negative.

    Example (at the top of a script)::

        hkfit.enable_compilation_cache()  # later runs of this script start warm
    """
    if min_compile_time_secs < 0:
        raise ValueError(
            "Expected `min_compile_time_secs` >= 0. Received: "
            f"min_compile_time_secs={min_compile_time_secs!r}."
        )
    directory = pathlib.Path(path if path is not None else default_path()).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"Expected `path` to be a directory for the compilation cache. Received: "
            f"path={str(directory)!r}, which is a file."
        )
    if not _compat.cpu_cache_works():
        warnings.warn(
            f"The compilation cache stays off: JAX {jax.__version__} on CPU runs programs "
            "loaded from it incorrectly (it hangs or crashes). Upgrade to JAX >= 0.5 to use it.",
            stacklevel=2,
        )
        return None
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    try:  # every entry, however small (the option is missing from older JAX)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except AttributeError:
        pass
    return directory
