"""The package's shape: no import cycle, no reads of a model's private members outside
``model.py``, no imports of another module's private names, and the documented public
surface."""

import ast
import pathlib

import hkfit

PACKAGE = pathlib.Path(hkfit.__file__).parent
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make"}  # public despite the underscore


def modules() -> dict[str, ast.Module]:
    """``{"hkfit.x.y": parsed source}`` for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports (at any depth of its code)."""
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    edges.add(full)
                elif node.module in known:
                    edges.add(node.module)
    edges.discard(name)
    return edges


def test_no_import_cycle():
    mods = modules()
    known = set(mods)
    graph = {name: imported_modules(name, tree, known) - {"hkfit"} for name, tree in mods.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_only_model_reads_private_members_of_other_objects():
    offenders = []
    for name, tree in modules().items():
        if name == "hkfit.model":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in NAMEDTUPLE_API
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    submodules = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir()}
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hkfit"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and alias.name not in submodules:  # private modules are fine
                        offenders.append(f"{name}: from {node.module} import {alias.name}")
    assert not offenders, offenders


def test_distribution_none_is_nowhere():
    hits = [
        str(path)
        for path in PACKAGE.rglob("*.py")
        if "distribution is None" in path.read_text()
        or "distribution is not None" in path.read_text()
    ]
    assert not hits, hits


def test_public_surface():
    import types

    assert all(hasattr(hkfit, name) for name in hkfit.__all__)
    exported = {
        name
        for name in dir(hkfit)
        if not name.startswith("_") and not isinstance(getattr(hkfit, name), types.ModuleType)
    }
    assert exported <= set(hkfit.__all__), exported - set(hkfit.__all__)
    for module in (
        "callbacks",
        "checkpoint",
        "distributed",
        "losses",
        "metrics",
        "optimizers",
        "step",
        "testing",
    ):
        __import__(f"hkfit.{module}")
    assert (PACKAGE / "py.typed").exists()
