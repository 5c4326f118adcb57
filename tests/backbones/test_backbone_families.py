"""The family matrix: tiny random Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, GPT-2 (Conv1D) and GPT-NeoX
backbones (built in code) through build, route, mixed-batch generate == PEFT, token routing, save/load and
`pipeline`; and the layer types routed LoRA refuses, with errors naming the module and its type."""

import pytest
import torch
from peft import PeftModel
from tiny_models import FAMILY_TARGETS, build_family_assets, make_tokenizer
from transformers import AutoModelForCausalLM, pipeline

from ariadne_hf import BASE_ADAPTER, AriadneRoutedModel
from ariadne_hf.bundle.errors import AdapterError

GREEDY = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module", params=sorted(FAMILY_TARGETS))
def family(request, tmp_path_factory):
    """(family, assets, routed model, PEFT model with the same adapters)."""
    assets = build_family_assets(str(tmp_path_factory.mktemp(request.param)), request.param)
    # The word-level test tokenizer is passed as an object: for model_type "qwen2", transformers' AutoTokenizer
    # replaces a saved TokenizersBackend with Qwen2Tokenizer, which turns these words into <unk>.
    model = AriadneRoutedModel.from_adapters(assets["backbone"], assets["adapters"], assets["train"],
                                             num_centroids=4, tokenizer=make_tokenizer(), progress=False)
    names = list(assets["adapters"])
    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["backbone"]),
                                       assets["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        oracle.load_adapter(assets["adapters"][name], adapter_name=name)
    return request.param, assets, model, oracle.eval()


def _batch(model, assets):
    prompts = [assets["test"][name][i] for name in assets["adapters"] for i in range(2)]
    return prompts, model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")


def test_mixed_batch_equals_peft_and_adapters_differ(family):
    name, assets, model, oracle = family
    _, batch = _batch(model, assets)
    forced = ["math", "poetry", "code", BASE_ADAPTER, "code", "math"]
    logits = {a: model(**batch, adapter_names=[a] * 6).logits for a in [*assets["adapters"], BASE_ADAPTER]}
    keys = list(logits)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (logits[a] - logits[b]).abs().max() > 1e-3, (name, a, b)
    peft_logits = oracle(**batch, adapter_names=forced).logits
    torch.testing.assert_close(model(**batch, adapter_names=forced).logits, peft_logits, rtol=1e-4, atol=1e-5)
    out = model.generate(**batch, **GREEDY, adapter_names=forced)
    assert torch.equal(out, oracle.generate(**batch, adapter_names=forced, **GREEDY)), name


def test_routing_then_generate_equals_peft_with_the_routed_adapters(family):
    name, assets, model, oracle = family
    _, batch = _batch(model, assets)
    out = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
    routed = out.routes.adapter_names
    assert set(routed) <= {*assets["adapters"], BASE_ADAPTER}
    assert torch.equal(out.sequences, oracle.generate(**batch, adapter_names=routed, **GREEDY)), (name, routed)
    train = [p for items in assets["train"].values() for p in items]
    labels = [n for n, items in assets["train"].items() for _ in items]
    accuracy = sum(a == b for a, b in zip(model.route(train).adapter_names, labels, strict=True)) / len(labels)
    assert accuracy > 0.5, (name, accuracy)  # the router separates the tasks on this backbone's hidden states


def test_token_routing_runs_and_mixes(family):
    name, assets, model, _ = family
    _, batch = _batch(model, assets)
    soft = model.generate(**batch, routing="token", routing_top_k=3, routing_temperature=1.0, reroute_every=1,
                          max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    weights = soft.token_routes.weights[0]  # [B, k]; all-zero rows = prompts with no routable token (base)
    routed = weights[weights.sum(dim=-1) > 0]
    assert weights.shape[0] == 6 and routed.shape[0] >= 2, name
    assert bool(((routed > 0.05).sum(dim=-1) >= 2).all()), name  # a real mixture at temperature 1


def test_save_load_and_pipeline(family, tmp_path):
    name, assets, model, _ = family
    prompts, batch = _batch(model, assets)
    model.save_pretrained(tmp_path / "bundle")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bundle")
    assert isinstance(loaded, AriadneRoutedModel)
    assert loaded.route(prompts).adapter_names == model.route(prompts).adapter_names
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    generator = pipeline("text-generation", model=str(tmp_path / "bundle"), batch_size=3)
    outputs = generator(prompts[:3], max_new_tokens=3, do_sample=False, return_full_text=False)
    for prompt, output in zip(prompts[:3], outputs, strict=True):
        ids = model.tokenizer([prompt], return_tensors="pt")
        expected = model.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert output[0]["generated_text"] == model.tokenizer.decode(expected, skip_special_tokens=True), name


def _renamed_adapter(source: str, target: str, old: str, new: str) -> str:
    """A copy of adapter `source` whose module names have `old` replaced by `new` (config and weights)."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = os.path.join(target, "adapter_model.safetensors")
    tensors = {k.replace(old, new): v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = os.path.join(target, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["target_modules"] = [new.strip(".")]
    with open(config_path, "w") as f:
        json.dump(config, f)
    return target


def test_refused_layer_types_are_named(tiny_assets, tmp_path):
    norm = _renamed_adapter(tiny_assets["adapters"]["math"], str(tmp_path / "norm"), ".self_attn.q_proj.",
                            ".input_layernorm.")
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.input_layernorm .*a LlamaRMSNorm of this backbone"
                                           r".*not a linear layer") as error:
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {"norm": norm}, {"norm": ["a b c"]},
                                         progress=False)
    assert "another base model" not in str(error.value)
    alien = _renamed_adapter(tiny_assets["adapters"]["math"], str(tmp_path / "alien"), ".self_attn.q_proj.",
                             ".self_attn.c_attn.")
    with pytest.raises(AdapterError, match=r"match no module of this backbone.*another base model"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {"alien": alien}, {"alien": ["a b c"]},
                                         progress=False)


def test_embedding_lora_and_target_parameters_are_refused(tiny_assets, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False)).save_pretrained(
        tmp_path / "embedding")
    with pytest.raises(AdapterError, match="LoRA on an embedding layer"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {"emb": str(tmp_path / "embedding")},
                                         {"emb": ["a b c"]}, progress=False)
    experts = _renamed_adapter(tiny_assets["adapters"]["math"], str(tmp_path / "experts"), "q_proj", "q_proj")
    config_path = tmp_path / "experts" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_parameters"] = ["mlp.experts.gate_up_proj"]  # fused MoE expert weights (PEFT's LoRA on params)
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"target_parameters \(LoRA on raw parameters\)"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {"experts": experts}, {"experts": ["a b c"]},
                                         progress=False)
