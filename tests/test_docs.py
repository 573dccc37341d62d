"""The documentation cannot drift from the code.

Covered:
  * every public name (the ``__all__`` of ``hkfit`` and of its public modules; for a
    public module without ``__all__``, the functions and classes it defines) has an
    entry on an API page: a ``::: path`` directive under docs/reference/api that names
    the same object;
  * every ``::: path`` directive names an object that exists;
  * every ```` ```python ```` block of every other page under docs/ runs: the blocks of a
    page in order, in one namespace shared by that page, in a fresh temporary directory.
    A block preceded by ``<!-- skip: reason -->`` is not run (each is reported as a
    skipped test with its reason); one preceded by ``<!-- needs: module -->`` runs only
    where that module can be imported (an optional extra).
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "reference" / "api"

#: Modules whose public names must be documented (``hkfit`` itself included).
PUBLIC_MODULES = (
    "hkfit",
    "hkfit.callbacks",
    "hkfit.checkpoint",
    "hkfit.distributed",
    "hkfit.losses",
    "hkfit.metrics",
    "hkfit.multiview",
    "hkfit.optimizers",
    "hkfit.regularizers",
    "hkfit.step",
    "hkfit.testing",
)

DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.M)
BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(skip|needs):\s*(.*?)\s*-->\s*$")


# --- The API pages ---------------------------------------------------------------------


def resolve(path: str):
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module_name
    ]


def directives() -> dict[str, str]:
    """``{path: page}`` for every ``::: path`` of the API pages."""
    found = {}
    for page in sorted(API.glob("*.md")):
        for path in DIRECTIVE.findall(page.read_text()):
            found[path] = page.name
    return found


def test_directives_name_existing_objects():
    assert directives(), f"no ::: directives under {API.relative_to(ROOT)}"
    missing = []
    for path, page in directives().items():
        try:
            resolve(path)
        except (ImportError, AttributeError) as e:
            missing.append(f"{page}: ::: {path} ({type(e).__name__}: {e})")
    assert not missing, "API pages name objects that do not exist:\n" + "\n".join(missing)


def test_every_public_name_has_an_api_entry():
    documented = {id(resolve(path)) for path in directives()}
    undocumented = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module_name):
            if id(getattr(module, name)) not in documented:
                undocumented.append(f"{module_name}.{name}")
    assert not undocumented, (
        "public names without an entry under docs/reference/api (add a `::: <path>` "
        "directive for each):\n" + "\n".join(undocumented)
    )


# --- The guides --------------------------------------------------------------------------


def guide_pages() -> list[pathlib.Path]:
    return sorted(p for p in DOCS.rglob("*.md") if API not in p.parents)


def blocks(page: pathlib.Path) -> list[tuple[int, str, tuple[str, str] | None]]:
    """``(line, code, marker)`` for every python block of ``page``, in order."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        found.append((line, match.group(1), marker.groups() if marker else None))
    return found


def _id(page: pathlib.Path) -> str:
    return page.relative_to(DOCS).as_posix()


PAGES_WITH_CODE = [p for p in guide_pages() if blocks(p)]
SKIPPED = [
    pytest.param(reason, id=f"{_id(page)}:{line}")
    for page in guide_pages()
    for line, _, marker in blocks(page)
    if marker and marker[0] == "skip"
    for reason in [marker[1]]
]


def test_guides_have_code():
    assert len(PAGES_WITH_CODE) >= 10, [p.name for p in PAGES_WITH_CODE]
    assert len(SKIPPED) <= 6, "keep the blocks that cannot run here few"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_id)
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pages write checkpoints, logs and plots
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for line, code, marker in blocks(page):
        if marker and marker[0] == "skip":
            continue
        if marker and marker[0] == "needs":
            absent = [m for m in re.split(r"[,\s]+", marker[1]) if not _importable(m)]
            if absent:
                continue
        name = f"{page.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, name, "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the block at {name} raised {e!r}") from e


@pytest.mark.parametrize("reason", SKIPPED)
def test_skipped_block(reason):
    pytest.skip(f"not run here: {reason}")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def test_markers_are_attached_to_blocks():
    """A marker must sit on the line just before the block it applies to."""
    loose = []
    for page in guide_pages():
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if MARKER.search(line) and (i + 1 >= len(lines) or lines[i + 1] != "```python"):
                loose.append(f"{_id(page)}:{i + 1}")
    assert not loose, f"markers not followed by a ```python block: {loose}"
