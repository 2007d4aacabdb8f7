"""The house stands the right way up: every folder imports only from the floors below it (README, "Layout")."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = {"models": 0, "pipelines": 1, "metrics": 1, "datamodules": 2, "callbacks": 2, "modules": 3, "plugguide": 4}


def imported_packages(path: str) -> set[str]:
    """The `plugguide.<package>` names a file imports, at module level or inside functions."""
    packages = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "plugguide":
                packages.add(parts[1] if len(parts) > 1 and parts[1] in FLOORS else "plugguide")
    return packages


def upward_imports(root: str = ROOT) -> list[str]:
    """`file -> package` for every import of a package on the same floor or higher (its own package excepted)."""
    found = []
    for package, floor in FLOORS.items():
        for directory, _, files in os.walk(os.path.join(root, package)):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(directory, name)
                for target in imported_packages(path) - {package}:
                    if FLOORS[target] >= floor:
                        found.append(
                            f"{os.path.relpath(path, root)} (floor {floor}) -> {target} (floor {FLOORS[target]})"
                        )
    return found


def test_no_floor_imports_a_floor_above_or_beside_it():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import_even_inside_a_function(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.py").write_text("def f():\n    from plugguide.modules.jobs import Job\n")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "p.py").write_text(
        "from plugguide.metrics import fid\nfrom plugguide.models import net\n"
    )
    assert upward_imports(str(tmp_path)) == [
        "models/net.py (floor 0) -> modules (floor 3)",
        "pipelines/p.py (floor 1) -> metrics (floor 1)",
    ]


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_every_floor_is_a_folder_of_the_package(package):
    assert os.path.isfile(os.path.join(ROOT, package, "__init__.py"))
