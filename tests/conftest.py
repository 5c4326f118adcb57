import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in the interpreter (set before import)
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


@pytest.fixture(scope="session")
def peft_oracle(tiny_assets):
    """An independent PEFT model with the same backbone and adapters (the reference the routed model must match)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"])
    names = list(tiny_assets["adapters"])
    model = PeftModel.from_pretrained(base, tiny_assets["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tiny_assets["adapters"][name], adapter_name=name)
    return model.eval()


@pytest.fixture()
def mixed_batch(tiny_assets, tiny_model):
    """Left-padded batch of prompts from every task (two per task) with their true adapters."""
    prompts, labels = [], []
    for name, items in tiny_assets["test"].items():
        prompts += items[:2]
        labels += [name, name]
    batch = tiny_model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")  # shared: not mutated
    return prompts, labels, batch


@pytest.fixture(scope="session")
def serving_bundle_dir(tiny_assets, tmp_path_factory):
    """A saved tiny bundle whose tokenizer has a chat template (read-only: shared by every serving test)."""
    from serving_bundle import build_serving_bundle

    return build_serving_bundle(tiny_assets, str(tmp_path_factory.mktemp("serving") / "bundle"))


@pytest.fixture(scope="session")
def serving_model(serving_bundle_dir):
    """The serving bundle loaded through the Auto classes (shared: tests must not mutate it)."""
    from serving_bundle import load_bundle

    return load_bundle(serving_bundle_dir)

