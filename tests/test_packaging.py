"""Packaging: every third-party module the package imports comes from a distribution pyproject.toml declares."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import pathlib
import re
import sys

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "ariadne_hf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "ariadne_hf" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    declared = {_normalize(Requirement(r).name) for r in requirements}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in _imported_top_level_modules().items():
        dists = distributions.get(module)
        if dists is None:
            continue  # not installed here (an optional extra); nothing to map it to
        if not {_normalize(d) for d in dists} & declared:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_hub_transport_errors_come_from_the_declared_http_client():
    """hub.py catches httpx2 errors: the huggingface_hub range must be one built on httpx2 (2.x)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_normalize(Requirement(r).name): Requirement(r) for r in project["dependencies"]}
    assert "httpx2" in core
    hub = core["huggingface-hub"]
    assert not hub.specifier.contains("1.33.0") and hub.specifier.contains("2.4.0")


def test_setuptools_package_list_matches_the_source_tree():
    """pyproject lists packages explicitly (for the hub_cards mapping): every package folder must be listed."""
    tools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ariadne_hf").rglob("__init__.py")}
    assert set(tools["packages"]) == on_disk | {"ariadne_hf.bundle.hub_cards"}
    assert tools["package-dir"] == {"ariadne_hf.bundle.hub_cards": "hub_cards"}


RENDER_FROM_WHEEL = """
import sys
import torch
import ariadne_hf
from ariadne_hf.bundle.model_card import write_model_card

site, out = sys.argv[1], sys.argv[2]
assert ariadne_hf.__file__.startswith(site), ariadne_hf.__file__
names = ["math", "poetry"]
adapters = {n: {"rank": 4, "target_modules": ["q_proj"], "num_prompts": 8, "num_centroids": 1} for n in names}
config = ariadne_hf.AriadneConfig(backbone_name_or_path="org/backbone", backbone_revision="a" * 40,
                                  adapter_names=names, adapters=adapters, embedding_dim=4, embedding_vocab_size=10)
write_model_card(out, config, torch.eye(2, 4), torch.arange(2))
"""


def test_a_built_wheel_ships_the_card_templates_and_renders_a_card(tmp_path):
    import shutil
    import subprocess
    import zipfile

    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("ariadne_hf", "hub_cards"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "--no-index", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("ariadne_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ariadne_hf/bundle/hub_cards/bundle_card.md" in names and not any(n.startswith("hub_cards/") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel: unpacking it is installing it
    out = tmp_path / "card"
    rendered = subprocess.run([sys.executable, "-c", RENDER_FROM_WHEEL, str(site), str(out)], capture_output=True,
                              text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert rendered.returncode == 0, rendered.stderr
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n") and "`math`" in readme and "`poetry`" in readme
