"""Shared test set-up: 8 virtual CPU devices, and a persistent compilation cache.

Both are set through environment variables before JAX is imported anywhere (which is why
they live here); subprocesses started by the tests inherit them.

The cache: many tests compile the same small programs, so the suite keeps JAX's
persistent compilation cache in ``.pytest-xla-cache/`` at the repository root (git
ignores it). A program compiled by one test is then loaded by the next, and a second run
(or the next tox env with the same JAX) loads nearly everything. Results do not change:
a cached executable is the one XLA compiled. Set ``HKFIT_TEST_XLA_CACHE`` to another
folder, or to ``off``. It stays off for JAX < 0.5, whose cached CPU programs can hang.
"""

import os
import pathlib
from importlib import metadata

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _jax_at_least(major: int, minor: int) -> bool:
    try:
        version = tuple(int(part) for part in metadata.version("jax").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (major, minor)


_CACHE = os.environ.get(
    "HKFIT_TEST_XLA_CACHE", str(pathlib.Path(__file__).resolve().parents[1] / ".pytest-xla-cache")
)
if _CACHE != "off" and _jax_at_least(0, 5) and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _drop_modules_without_a_file() -> None:
    """Hypothesis reads ``__file__`` of every entry of ``sys.modules``. dm-haiku 0.0.13 puts
    a stand-in for its flax extras there (``haiku.experimental.flax`` when flax is not
    installed) that raises ImportError for any attribute, which would abort collection;
    such entries are dropped (``haiku.experimental.flax`` itself still holds it)."""
    import sys

    for name, module in list(sys.modules.items()):
        try:
            getattr(module, "__file__", None)
        except Exception:
            del sys.modules[name]


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    _drop_modules_without_a_file()
