"""A quantized backbone (torchao int8 weight-only, runs on CPU): routed LoRA wraps the quantized linears and a mixed
batch equals PEFT on the same quantized model."""

import pytest
import torch

pytest.importorskip("torchao")
from peft import PeftModel  # noqa: E402
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ariadne_hf import BASE_ADAPTER, AriadneRoutedModel  # noqa: E402

GREEDY = {"max_new_tokens": 4, "do_sample": False}


def _quantized(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    quantize_(model, Int8WeightOnlyConfig())
    return model.eval()


def _peft_oracle(base, adapters: dict[str, str]) -> PeftModel:
    """PEFT holding every adapter on `base` (the reference the routed model must equal on the same base)."""
    names = list(adapters)
    oracle = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        oracle.load_adapter(adapters[name], adapter_name=name)
    return oracle


def _assert_equals_peft(model, oracle, tiny_assets, *, atol: float) -> None:
    """Forward logits of a mixed batch (forced adapters, base included) equal PEFT's, the adapters change them, and
    greedy generation equals PEFT's, forced and routed."""
    names = list(tiny_assets["adapters"])
    prompts = [tiny_assets["test"][n][i] for n in names for i in range(2)]
    batch = model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    forced = ["math", "poetry", "code", BASE_ADAPTER, "code", "math"]
    routed = model(**batch, adapter_names=forced).logits
    torch.testing.assert_close(routed, oracle(**batch, adapter_names=forced).logits, rtol=1e-4, atol=atol)
    assert (routed - model(**batch, adapter_names=[BASE_ADAPTER] * 6).logits).abs().max() > 1e-2
    assert torch.equal(model.generate(**batch, **GREEDY, adapter_names=forced),
                       oracle.generate(**batch, adapter_names=forced, **GREEDY))
    out = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
    assert torch.equal(out.sequences, oracle.generate(**batch, adapter_names=out.routes.adapter_names, **GREEDY))


def test_int8_weight_only_backbone_equals_peft_on_the_same_quantized_model(tiny_assets):
    backbone = _quantized(tiny_assets["backbone"])
    weight = backbone.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor"  # really quantized (int8 data + scales)
    model = AriadneRoutedModel.from_adapters(backbone, tiny_assets["adapters"], tiny_assets["train"],
                                             tokenizer=AutoTokenizer.from_pretrained(tiny_assets["backbone"]), num_centroids=4, progress=False)
    assert type(model.backbone.model.layers[0].self_attn.q_proj.base_layer.weight).__name__ == "Int8Tensor"
    oracle = _peft_oracle(_quantized(tiny_assets["backbone"]), tiny_assets["adapters"])
    _assert_equals_peft(model, oracle, tiny_assets, atol=1e-5)


def _nf4(path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bitsandbytes.nn.Linear4bit)
    return model


@torch.no_grad()  # inference, as generate runs: bitsandbytes' CPU path repacks 4-bit weights on the first such call
def test_bitsandbytes_nf4_backbone_equals_peft_on_the_same_quantized_model(tiny_assets):
    """QLoRA serving: adapters on a 4-bit NF4 base (bitsandbytes' CPU build), routed == PEFT's bnb LoRA layers."""
    model = AriadneRoutedModel.from_adapters(_nf4(tiny_assets["backbone"]), tiny_assets["adapters"],
                                             tiny_assets["train"], num_centroids=4, progress=False,
                                             tokenizer=AutoTokenizer.from_pretrained(tiny_assets["backbone"]))
    base_layer = model.backbone.model.layers[0].self_attn.q_proj.base_layer
    assert type(base_layer).__name__ == "Linear4bit"
    oracle = _peft_oracle(_nf4(tiny_assets["backbone"]), tiny_assets["adapters"])
    assert type(oracle.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    _assert_equals_peft(model, oracle, tiny_assets, atol=1e-4)
