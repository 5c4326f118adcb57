"""Fixtures of the evaluation tests (tiny_model and tiny_assets are the session fixtures of tests/conftest.py)."""

import json

import pytest


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_model, tmp_path_factory) -> str:
    """The shared tiny model saved once as a bundle folder (read-only: tests load it, none writes into it)."""
    path = tmp_path_factory.mktemp("evaluation") / "bundle"
    tiny_model.save_pretrained(path)
    return str(path)


@pytest.fixture()
def write_jsonl(tmp_path):
    """`write_jsonl(name, rows) -> path`: the rows as a .jsonl file `name` in this test's own tmp_path."""

    def write(name: str, rows: list[dict]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    return write
