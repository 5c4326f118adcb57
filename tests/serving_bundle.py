"""A tiny saved bundle for the serving tests (tokenizer with a chat template, three adapters), and helpers."""

from __future__ import annotations

import os

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def build_serving_bundle(assets: dict, directory: str) -> str:
    """Save a bundle of the tiny backbone + adapters whose tokenizer has a chat template; returns its folder."""
    from tiny_models import make_tokenizer

    from ariadne_hf import AriadneRoutedModel

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = AriadneRoutedModel.from_adapters(assets["backbone"], assets["adapters"], assets["train"],
                                             tokenizer=tokenizer, num_centroids=2, progress=False)
    model.save_pretrained(directory)
    return os.fspath(directory)


def load_bundle(directory: str):
    from transformers import AutoModelForCausalLM

    import ariadne_hf  # noqa: F401  (registers the Auto classes)

    return AutoModelForCausalLM.from_pretrained(directory)


def reference_completion(model, prompt_ids: list[int], adapter: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens of one prompt generated alone (no padding, no batching): the oracle of the server."""
    import torch

    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter],
                         max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens
