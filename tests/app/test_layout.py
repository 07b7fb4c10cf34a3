"""The package layout: `app.engine` runs models, `app.loading` gets them ready. Dependencies go one
way: `app.loading` may import `app.engine` (it builds runners), never the reverse. Checked on the
source with `ast` (imports inside functions count too), so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("app.engine", "app.loading")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = REPO) -> set[str]:
    """Every module `path` imports, absolute (`from . import x` resolved), including the `x` of
    `from pkg import x` as `pkg.x` in case it is a module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return out


def modules() -> dict[str, set[str]]:
    """{module: the modules of either package it imports}, for every module of both packages."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted(REPO.joinpath(*pkg.split(".")).rglob("*.py")):
            found[module_name(path)] = imported(path)
    names = set(found)
    return {m: {i for i in deps if i in names} for m, deps in found.items()}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_both_packages_are_found() -> None:
    found = modules()
    assert "app.engine.engine" in found and "app.loading.loader" in found, sorted(found)


def test_the_engine_never_imports_loading() -> None:
    bad = {m: sorted(i for i in deps if in_package(i, "app.loading"))
           for m, deps in modules().items() if in_package(m, "app.engine")}
    assert not {m: d for m, d in bad.items() if d}, "app.engine must not import app.loading"


def test_no_import_cycle_between_the_packages() -> None:
    """No chain of imports leads from a module back to itself through the other package."""
    graph = modules()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for m in graph:
        home = next(p for p in PACKAGES if in_package(m, p))
        back = [o for o in reachable(m) if not in_package(o, home) and m in reachable(o)]
        assert not back, f"import cycle between the packages: {m} <-> {sorted(back)}"


@pytest.mark.parametrize("line", ["from app.loading.loader import load", "import app.loading.loader",
                                  "from app.loading import loader", "from ..loading import loader"])
def test_the_check_sees_an_engine_import_of_loading(line: str, tmp_path: Path) -> None:
    """What the checks above rely on: each spelling of such an import is seen."""
    engine = tmp_path / "app" / "engine" / "engine.py"
    engine.parent.mkdir(parents=True)
    engine.write_text(f"def f():\n    {line}\n", encoding="utf-8")
    assert any(in_package(i, "app.loading") for i in imported(engine, tmp_path))
