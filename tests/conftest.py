import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import build_assets  # noqa: E402


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny random Llama (saved), three LoRA adapters of different ranks/targets, train and test prompts."""
    return build_assets(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_model(tiny_assets):
    """A routed model built from the tiny assets (shared: tests must not mutate it)."""
    from ariadne_hf import AriadneRoutedModel

    return AriadneRoutedModel.from_adapters(
        tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"], num_centroids=4, progress=False
    )
