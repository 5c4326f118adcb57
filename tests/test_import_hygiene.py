"""Module boundaries: no private name imported across modules, no submodule importing the package __init__."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ariadne_hf"


def _relative_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                yield path, node


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_from_another_module():
    offenders = [f"{path.relative_to(PACKAGE)}:{node.lineno} {alias.name}"
                 for path, node in _relative_imports() for alias in node.names if _is_private(alias.name)]
    assert not offenders, offenders


def test_no_submodule_imports_names_from_a_package_init():
    """`from . import x` may only name submodules; anything else would read the package __init__ (a cycle)."""
    offenders = []
    for path, node in _relative_imports():
        if node.module is not None:
            continue
        package = path.parent
        for _ in range(node.level - 1):
            package = package.parent
        for alias in node.names:
            if not ((package / f"{alias.name}.py").is_file() or (package / alias.name / "__init__.py").is_file()):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {alias.name}")
    assert not offenders, offenders


def test_version_has_one_source():
    import importlib.metadata

    import ariadne_hf
    from ariadne_hf._version import __version__

    assert ariadne_hf.__version__ == __version__ == importlib.metadata.version("ariadne_hf")
