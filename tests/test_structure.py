"""The shape of the code: core's rooms import only downward, and every project exception has one root."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

from hemafed.core.errors import HemafedError

# Each room may import from the rooms below it (docs/architecture.md); the top files of core/ are the floor.
FLOORS = {"learning": 4, "rounds": 3, "secagg": 2, "trust": 1, "privacy": 1, "data": 1, "": 0}


def _core_dir() -> Path:
    import hemafed.core

    return Path(hemafed.core.__file__).parent


def _room(path: Path, core: Path) -> str:
    parts = path.relative_to(core).parts
    return parts[0] if len(parts) > 1 else ""


def _imported_rooms(path: Path, core: Path) -> set[str]:
    """The core rooms (or "" for core's top files) that `path` imports from, at any depth of the module."""
    package = ["hemafed", "core", *path.relative_to(core).parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[list[str]] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = (node.module or "").split(".")
            targets = [[*module, a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names]
        for t in targets:
            if t[:2] == ["hemafed", "core"] and len(t) > 2:
                out.add(t[2] if (core / t[2]).is_dir() else "")
    return out


def test_core_rooms_import_only_downward() -> None:
    core = _core_dir()
    wrong = []
    for path in sorted(core.rglob("*.py")):
        room = _room(path, core)
        for target in _imported_rooms(path, core) - {room}:
            if FLOORS[target] >= FLOORS[room]:
                wrong.append(f"{path.relative_to(core)} imports from {target or 'core/'}")
    assert not wrong, "imports that run sideways or up:\n" + "\n".join(wrong)


def test_core_imports_no_qt_and_no_network() -> None:
    core = _core_dir()
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert not name.startswith(("PySide6", "hemafed.network", "hemafed.gui")), f"{path} imports {name}"


def _project_modules() -> list[str]:
    names = []
    for sub in ("core", "network"):
        pkg = importlib.import_module(f"hemafed.{sub}")
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, f"hemafed.{sub}.")]
    return names


@pytest.mark.parametrize("module", _project_modules())
def test_every_project_exception_has_the_one_root(module: str) -> None:
    mod = importlib.import_module(module)
    for name, obj in vars(mod).items():
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module:
            assert issubclass(obj, HemafedError), f"{module}.{name} does not derive from HemafedError"
