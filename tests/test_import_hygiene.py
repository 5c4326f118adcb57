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


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports (top-level and function-level imports alike)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def test_no_import_cycle_between_modules():
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


LAYERS = (
    ("_version", "constants", "data"),
    ("kernels",),
    ("configuration_ariadne",),
    ("routing",),
    ("bundle",),
    ("default_backbone",),
    ("gemma3_backbone",),
    ("lora",),
    ("loading",),
    ("call_planning",),
    ("building",),
    ("modeling_ariadne",),
    ("evaluation", "serving"),
    ("cli",),
    ("ariadne_hf",),
)
"""The package's units (subpackages and top-level modules) from the bottom up, as in docs/architecture.md: a unit
imports only units of lower layers (and its own modules). Units sharing a layer import neither each other."""


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_units_import_one_way_down_the_layers():
    rank = {unit: level for level, units in enumerate(LAYERS) for unit in units}
    graph = _import_graph()
    unknown = sorted({_unit(m) for m in graph} - set(rank))
    assert not unknown, f"add {unknown} to LAYERS (and to the layer table in docs/architecture.md)"
    upward = sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                    if _unit(source) != _unit(target) and rank[_unit(target)] >= rank[_unit(source)])
    assert not upward, upward


def test_the_import_graph_includes_function_level_imports():
    """The direction test reads function-level imports too (a lazy import is still an arrow)."""
    graph = _import_graph()
    assert "ariadne_hf.lora.peft_files" in graph and "ariadne_hf.bundle.adapters" in graph["ariadne_hf.lora.peft_files"]
    assert "ariadne_hf.bundle.hub" in graph["ariadne_hf.bundle.local_io"]  # imported inside a function


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at top level, except ``from . import x`` (which binds the submodule x itself)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not (node.level > 0 and node.module is None):
            names.update(a.asname or a.name for a in node.names)
    return names


def test_no_module_shares_its_name_with_a_function_of_its_own_or_of_its_package():
    """Importing a submodule sets it as a package attribute: a same-named function there would be replaced.

    (kernels/ once needed a ModuleType subclass to keep ``ariadne_hf.kernels.embed_pool_distance`` the function.)
    """
    offenders = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        package = init.parent
        package_names = _top_level_names(ast.parse(init.read_text(encoding="utf-8")))
        children = [p for p in package.glob("*.py") if p.name != "__init__.py"]
        children += [p for p in package.iterdir() if (p / "__init__.py").is_file()]
        for child in sorted(children):
            name = child.stem if child.suffix == ".py" else child.name
            if name in package_names:
                offenders.append(f"{child.relative_to(PACKAGE)}: {init.relative_to(PACKAGE)} binds {name!r}")
            if child.suffix == ".py":
                tree = ast.parse(child.read_text(encoding="utf-8"))
                if any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name for node in tree.body):
                    offenders.append(f"{child.relative_to(PACKAGE)} defines {name!r}")
    assert not offenders, offenders
