"""Routed LoRA layers: weights held once, one gate per step, PEFT as file format and oracle."""

import filecmp
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ariadne_hf import BASE_ADAPTER, AriadneRoutedModel
from ariadne_hf.bundle.errors import AdapterError
from ariadne_hf.call_planning import sequence_plan
from ariadne_hf.lora import RoutedLoraLinear, use_plan
from ariadne_hf.lora.gate import BASE, MIXTURE, SINGLE

GREEDY = {"max_new_tokens": 5, "do_sample": False}


def _save_peft_adapter(backbone_dir, directory, seed, **config):
    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(backbone_dir),
                          LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)
    peft.save_pretrained(directory)
    return str(directory)


def _build(tiny_assets, adapters):
    prompts = {name: tiny_assets["train"][list(tiny_assets["train"])[i % 3]] for i, name in enumerate(adapters)}
    return AriadneRoutedModel.from_adapters(tiny_assets["backbone"], adapters, prompts, progress=False)


def test_lora_weights_live_once_in_buffers_that_follow_the_model(tiny_assets, mixed_batch):
    _, labels, batch = mixed_batch
    model = _build(tiny_assets, tiny_assets["adapters"])
    assert not any("peft" in type(m).__module__ for m in model.modules())  # no PEFT module at run time
    layers = [m for m in model.modules() if isinstance(m, RoutedLoraLinear)]
    assert len(layers) == 2 * 7  # every module any adapter targets, in both decoder layers
    buffers = dict(model.named_buffers())
    assert any(name.endswith("q_proj.lora_A") for name in buffers)
    assert not any("lora" in key for key in model.backbone.state_dict())  # not part of the backbone's weights
    before = model(**batch, adapter_names=labels).logits
    model.half()
    for layer in layers:
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.base_layer.weight.dtype == torch.float16
    half = model(**batch, adapter_names=labels).logits
    torch.testing.assert_close(half.float(), before, rtol=0.05, atol=0.05)


def test_memory_is_the_adapters_bytes_for_same_shaped_adapters(tiny_assets, tmp_path):
    adapters = {f"a{i}": _save_peft_adapter(tiny_assets["backbone"], tmp_path / f"a{i}", seed=i, r=4,
                                            target_modules=["q_proj", "v_proj"]) for i in range(3)}
    model = _build(tiny_assets, adapters)
    weights = sum(t.numel() * t.element_size() for d in adapters.values() for t in _tensors(d).values())
    assert weights <= model.lora.memory_bytes() <= 1.1 * weights  # the weights once, plus scaling [A] per layer


def test_gate_is_single_for_one_adapter_and_mixture_for_several(tiny_model):
    def gate_of(adapters, rows):
        plan = sequence_plan(tiny_model.lora, tiny_model.device, adapters)
        plan.begin_forward(None, rows, 3)
        return plan.gate

    assert gate_of([1, 1, 1], 6).kind == SINGLE and gate_of([1, 1, 1], 6).adapter == 1
    assert gate_of([-1, -1], 2).kind == BASE
    mixed = gate_of([0, 2, -1], 6)
    assert mixed.kind == MIXTURE and mixed.indices.tolist() == [[0], [0], [2], [2], [0], [0]]
    assert mixed.coefs[0][4:].abs().sum() == 0  # base rows add nothing


@pytest.mark.parametrize("adapters", [[1, 1], [0, 2], [0, -1]])
def test_layers_only_read_the_gate_without_host_syncs(tiny_model, monkeypatch, adapters):
    plan = sequence_plan(tiny_model.lora, tiny_model.device, adapters)
    plan.begin_forward(None, 2, 1)
    layer = next(m for m in tiny_model.modules() if isinstance(m, RoutedLoraLinear))
    x = torch.randn(2, 1, layer.in_features)
    with use_plan(plan):
        expected = layer(x)  # first call of a gate gathers (no sync either)

        def refuse(*args, **kwargs):
            raise AssertionError("a routed LoRA layer synchronised with the host")

        for name in ("item", "tolist", "__bool__", "nonzero", "unique"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        monkeypatch.setattr(torch, "unique", refuse)
        monkeypatch.setattr(torch, "nonzero", refuse)
        again = layer(x)
    monkeypatch.undo()
    assert torch.equal(again, expected)


def test_kv_cache_equals_no_cache_for_mixed_batches_and_weights(tiny_model, mixed_batch):
    _, labels, batch = mixed_batch
    names = labels[:-1] + [BASE_ADAPTER]
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]).repeat(3, 1)
    for kwargs in ({"adapter_names": names}, {"adapter_weights": weights}):
        cached = tiny_model.generate(**batch, use_cache=True, **kwargs, **GREEDY)
        uncached = tiny_model.generate(**batch, use_cache=False, **kwargs, **GREEDY)
        assert torch.equal(cached, uncached)


def test_lm_head_and_mlp_lora_with_rank_and_alpha_patterns_equal_peft(tiny_assets, tmp_path, mixed_batch):
    _, _, batch = mixed_batch
    patterned = _save_peft_adapter(
        tiny_assets["backbone"], tmp_path / "patterned", seed=3, r=4, lora_alpha=8,
        target_modules=["q_proj", "down_proj", "lm_head"], rank_pattern={"down_proj": 2}, alpha_pattern={"lm_head": 3})
    rslora = _save_peft_adapter(tiny_assets["backbone"], tmp_path / "rslora", seed=4, r=6, lora_alpha=5,
                                use_rslora=True, target_modules=["k_proj", "up_proj"])
    model = _build(tiny_assets, {"patterned": patterned, "rslora": rslora})
    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"]), patterned,
                                       adapter_name="patterned").eval()
    oracle.load_adapter(rslora, adapter_name="rslora")
    rows = batch["input_ids"].shape[0]
    for names in (["patterned"] * rows, ["rslora"] * rows, ["patterned", "rslora", BASE_ADAPTER] * (rows // 3)):
        ours = model(**batch, adapter_names=names).logits
        torch.testing.assert_close(ours, oracle(**batch, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"]).eval()(**batch).logits
    assert (model(**batch, adapter_names=["patterned"] * rows).logits - plain).abs().max() > 1e-3  # not a no-op


def test_lora_on_an_embedding_layer_is_refused_when_building(tiny_assets, tmp_path):
    embedding = _save_peft_adapter(tiny_assets["backbone"], tmp_path / "emb", seed=5, r=2,
                                   target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match="embed_tokens.*embedding layer"):
        _build(tiny_assets, {"emb": embedding})


def test_lora_bias_modules_to_save_and_dora_are_refused_naming_the_feature(tiny_assets, tmp_path):
    bias = _save_peft_adapter(tiny_assets["backbone"], tmp_path / "bias", seed=6, r=2, target_modules=["q_proj"],
                              lora_bias=True)
    with pytest.raises(AdapterError, match="lora_bias"):
        _build(tiny_assets, {"bias": bias})
    saved = _save_peft_adapter(tiny_assets["backbone"], tmp_path / "mts", seed=7, r=2, target_modules=["q_proj"],
                               modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="modules_to_save"):
        _build(tiny_assets, {"mts": saved})
    dora = _save_peft_adapter(tiny_assets["backbone"], tmp_path / "dora", seed=8, r=2, target_modules=["q_proj"],
                              use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        _build(tiny_assets, {"dora": dora})


def _tensors(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_saved_adapters_are_bit_identical_whether_copied_or_written_from_the_layers(tiny_assets, tmp_path):
    model = _build(tiny_assets, tiny_assets["adapters"])
    model.save_pretrained(tmp_path / "copied")  # unchanged sources: the files are copied
    for name, source in tiny_assets["adapters"].items():
        copied = tmp_path / "copied" / "adapters" / name / "adapter_model.safetensors"
        assert filecmp.cmp(copied, os.path.join(source, "adapter_model.safetensors"), shallow=False)
    reloaded = AriadneRoutedModel.from_pretrained(tmp_path / "copied")
    for name in model.adapter_names:  # its sources vanish: saving must write the weights from the layers
        os.remove(tmp_path / "copied" / "adapters" / name / "adapter_model.safetensors")
    reloaded.save_pretrained(tmp_path / "written")
    for name, source in tiny_assets["adapters"].items():
        original, written = _tensors(source), _tensors(tmp_path / "written" / "adapters" / name)
        assert written.keys() == original.keys()
        for key, tensor in original.items():
            assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), (name, key)
    again = AriadneRoutedModel.from_pretrained(tmp_path / "written")  # the recorded sha256 match the written files
    assert again.adapter_names == model.adapter_names


@pytest.mark.parametrize(("rows", "tokens", "per_token", "strategy", "cached"), [
    (3, 7, False, "gather", False),  # prefill: gathered once
    (3, 7, True, "gather", False),  # per-token gates (token routing without a KV cache)
    (4, 1, False, "gather", True),  # decode, G*k <= max(A, 16): gathered once per gate, reused
    (9, 1, False, "dense", False),  # decode, G*k > max(A, 16): all adapters' shrink, masked
])
def test_mixture_layer_equals_the_kernel_specification(rows, tokens, per_token, strategy, cached):
    """Every torch MIXTURE strategy of the layer computes kernels.mixture_torch.mixture_lora_ref (the specification)."""
    from torch import nn

    from ariadne_hf.kernels.mixture_torch import mixture_lora_ref
    from ariadne_hf.lora.gate import GateFactory
    from ariadne_hf.lora.plans import FixedGatePlan

    torch.manual_seed(0)
    adapters, rank = 5, 4
    layer = RoutedLoraLinear(nn.Linear(24, 40), "proj")
    layer.lora_A, layer.lora_B = torch.randn(adapters, rank, 24), torch.randn(adapters, 40, rank)
    layer.scaling = torch.rand(adapters) + 0.5
    layer.ranks, layer.scalings = [rank] * adapters, layer.scaling.tolist()
    gates = rows * tokens if per_token else rows
    indices = torch.randint(-1, adapters, (gates, 2))
    weights = torch.rand(gates, 2)
    gate = GateFactory([layer.scaling]).mixture(indices, weights, tokens=tokens, per_token=per_token)
    assert (gate.strategy, gate.cache_gathered) == (strategy, cached)

    plan = FixedGatePlan(gate)
    x = torch.randn(rows, tokens, 24)
    with use_plan(plan):
        ours = layer(x) - layer.base_layer(x)
        assert torch.equal(layer(x) - layer.base_layer(x), ours)  # again, from what the gate kept
    token_indices = indices if per_token else indices.repeat_interleave(tokens, dim=0)
    token_weights = weights if per_token else weights.repeat_interleave(tokens, dim=0)
    expected = mixture_lora_ref(x.reshape(-1, 24), layer.lora_A, layer.lora_B, layer.scaling, token_indices,
                                token_weights)
    torch.testing.assert_close(ours.reshape(-1, 40), expected, rtol=1e-5, atol=1e-5)


def test_add_adapter_grows_stacks_with_headroom_and_stays_exact(tiny_assets, tmp_path, mixed_batch):
    _, _, batch = mixed_batch
    model = _build(tiny_assets, dict(tiny_assets["adapters"]))
    layer = model.lora.layers["model.layers.0.self_attn.q_proj"]
    pointers = []
    for i in range(4):
        extra = _save_peft_adapter(tiny_assets["backbone"], tmp_path / f"x{i}", seed=20 + i, r=8,
                                   target_modules=["q_proj", "v_proj"])
        model.add_adapter(f"x{i}", extra, tiny_assets["train"]["math"], progress=False)
        pointers.append(layer.lora_A.data_ptr())
    assert layer.lora_A.shape[0] == 7 and pointers[2] == pointers[1]  # the 6th fit in the 5th's headroom: no copy
    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"]), extra).eval()
    rows = batch["input_ids"].shape[0]
    torch.testing.assert_close(model(**batch, adapter_names=["x3"] * rows).logits, oracle(**batch).logits,
                               rtol=1e-5, atol=1e-5)
    per_layer = {name: model.lora._groups[layer.scaling_group] for name, layer in model.lora.layers.items()}
    model.lora._refresh_groups()  # the incremental grouping of add_adapter equals a full regrouping
    assert per_layer == {name: model.lora._groups[layer.scaling_group] for name, layer in model.lora.layers.items()}
    mixed = ["x0", "math", "x3", "code", BASE_ADAPTER, "x1"]
    single = torch.stack([model(**batch, adapter_names=[n] * rows).logits[i] for i, n in enumerate(mixed)])
    torch.testing.assert_close(model(**batch, adapter_names=mixed).logits, single, rtol=1e-5, atol=1e-5)


def test_lm_head_adapter_round_trips_when_written_from_the_layers(tiny_assets, tmp_path):
    source = _save_peft_adapter(tiny_assets["backbone"], tmp_path / "head", seed=8, r=2,
                                target_modules=["lm_head", "q_proj"])
    model = _build(tiny_assets, {"head": source})
    assert model.lora.layout("head").base_copies  # PEFT stored the lm_head's own weight beside its LoRA
    model.save_pretrained(tmp_path / "first")
    reloaded = AriadneRoutedModel.from_pretrained(tmp_path / "first")
    os.remove(tmp_path / "first" / "adapters" / "head" / "adapter_model.safetensors")
    reloaded.save_pretrained(tmp_path / "second")
    original, written = _tensors(source), _tensors(tmp_path / "second" / "adapters" / "head")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)


def test_plans_follow_the_plan_protocol_and_the_hook_writes_nothing_on_the_backbone(tiny_model):
    from ariadne_hf.lora.gate import BASE_GATE
    from ariadne_hf.lora.plans import FixedGatePlan, LoraPlan, install_pregate_hook

    assert isinstance(sequence_plan(tiny_model.lora, tiny_model.device, [0, 1]), LoraPlan) and isinstance(FixedGatePlan(BASE_GATE), LoraPlan)
    before = set(vars(tiny_model.backbone))
    handle = install_pregate_hook(tiny_model.backbone)
    assert install_pregate_hook(tiny_model.backbone) is handle  # idempotent: one hook per backbone
    assert set(vars(tiny_model.backbone)) == before

    class CountingPlan(FixedGatePlan):
        calls = 0

        def begin_forward(self, input_ids, rows, tokens):
            CountingPlan.calls += 1

    with use_plan(CountingPlan(BASE_GATE)), torch.no_grad():
        tiny_model.backbone(input_ids=torch.tensor([[1, 2, 3]]))
    assert CountingPlan.calls == 1  # one pre-gating hook per backbone, however often it was installed
