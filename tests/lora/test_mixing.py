"""Token-level routing and weighted LoRA mixing: exact equivalences and clear errors."""

import copy

import pytest
import torch

from ariadne_hf import BASE_ADAPTER
from ariadne_hf.lora import mixture_from_scores

GREEDY = {"max_new_tokens": 6, "do_sample": False}


def test_mixed_batch_equals_peft_mixed_batch_with_beams(tiny_model, peft_oracle, mixed_batch):
    _, labels, batch = mixed_batch
    names = labels[:-1] + [BASE_ADAPTER]
    ours = tiny_model(**batch, adapter_names=names).logits
    peft = peft_oracle(**batch, adapter_names=names).logits
    torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-5)
    beams = dict(num_beams=2, num_return_sequences=2, **GREEDY)
    out_ours = tiny_model.generate(**batch, adapter_names=names, **beams)
    out_peft = peft_oracle.generate(**batch, adapter_names=names, num_beams=2, **GREEDY)
    assert torch.equal(out_ours[::2], out_peft)  # the first of each row's 2 returned beams is its best


def test_one_hot_weights_equal_peft_with_that_adapter(tiny_model, peft_oracle, mixed_batch):
    _, _, batch = mixed_batch
    rows = batch["input_ids"].shape[0]
    for index, name in enumerate(tiny_model.adapter_names):
        weights = torch.zeros(rows, 3)
        weights[:, index] = 1.0
        ours = tiny_model(**batch, adapter_weights=weights).logits
        peft_oracle.set_adapter(name)
        torch.testing.assert_close(ours, peft_oracle(**batch).logits, rtol=1e-5, atol=1e-5)


def test_half_half_weights_equal_manually_merged_weights(tiny_model, tiny_assets, mixed_batch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, batch = mixed_batch
    weights = torch.tensor([[0.5, 0.5, 0.0]]).repeat(batch["input_ids"].shape[0], 1)  # math + poetry
    ours = tiny_model(**batch, adapter_weights=weights).logits
    merged = AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"]).eval()
    params = dict(merged.named_parameters())
    for name in ("math", "poetry"):  # W + 0.5 * scale * B @ A, computed by hand from the adapter files
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"]),
                                         tiny_assets["adapters"][name], adapter_name=name)
        for module_name, module in peft.base_model.model.named_modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                delta = module.lora_B[name].weight @ module.lora_A[name].weight * module.scaling[name]
                with torch.no_grad():
                    params[f"{module_name}.weight"].add_(0.5 * delta)
    expected = merged(**batch).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # and it is not PEFT's "linear" add_weighted_adapter, which mixes A and B separately
    assert (ours - tiny_model(**batch, adapter_names=["math"] * batch["input_ids"].shape[0]).logits).abs().max() > 1e-3


def test_top1_without_rerouting_equals_sequence_routing(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    sequence = tiny_model.generate(**batch, routing="sequence", **GREEDY)
    token = tiny_model.generate(**batch, routing="token", routing_top_k=1, reroute_every=0, **GREEDY)
    assert torch.equal(sequence, token)


@pytest.mark.parametrize("reroute_every", [1, 2])
def test_kv_cache_equals_no_cache(tiny_model, mixed_batch, reroute_every):
    _, _, batch = mixed_batch
    kwargs = dict(routing="token", routing_top_k=2, reroute_every=reroute_every, max_new_tokens=7, do_sample=False)
    with_cache = tiny_model.generate(**batch, use_cache=True, return_dict_in_generate=True, **kwargs)
    without = tiny_model.generate(**batch, use_cache=False, return_dict_in_generate=True, **kwargs)
    assert torch.equal(with_cache.sequences, without.sequences)
    assert with_cache.token_routes.steps == without.token_routes.steps


def test_rerouting_follows_the_growing_context(tiny_model, mixed_batch):
    """Every decision equals routing the whole context so far from scratch (the incremental state is exact)."""
    _, _, batch = mixed_batch
    out = tiny_model.generate(**batch, routing="token", routing_top_k=2, reroute_every=2, max_new_tokens=8,
                              do_sample=False, return_dict_in_generate=True)
    trace = out.token_routes
    assert trace.steps == [0, 2, 4, 6]  # the 8th token is produced by the last forward, never fed back
    width = batch["input_ids"].shape[1]
    for step, indices, weights in zip(trace.steps, trace.indices, trace.weights, strict=True):
        prefix = out.sequences[:, : width + step]
        mask = torch.cat([batch["attention_mask"], torch.ones(prefix.shape[0], step, dtype=torch.long)], dim=1)
        scores = tiny_model.route(input_ids=prefix, attention_mask=mask).scores
        expected_idx, expected_w = mixture_from_scores(scores, 2, tiny_model.config.routing_temperature)
        assert torch.equal(indices, expected_idx)
        torch.testing.assert_close(weights, expected_w, rtol=1e-4, atol=1e-5)


def test_token_routing_mixes_adapters_and_changes_outputs(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    soft = tiny_model.generate(**batch, routing="token", routing_top_k=3, routing_temperature=1.0, reroute_every=1,
                               max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    first = soft.token_routes.weights[0]
    assert bool(((first > 0.2).sum(dim=-1) >= 2).all())  # a real mixture at temperature 1
    assert not torch.equal(soft.sequences, tiny_model.generate(**batch, **GREEDY))


def test_token_routing_with_sampling_is_seeded_and_routes_every_returned_sequence(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    kwargs = dict(routing="token", reroute_every=1, max_new_tokens=5, do_sample=True, num_return_sequences=2,
                  return_dict_in_generate=True)
    torch.manual_seed(0)
    a = tiny_model.generate(**batch, **kwargs)
    torch.manual_seed(0)
    b = tiny_model.generate(**batch, **kwargs)
    assert a.sequences.shape[0] == 12 and torch.equal(a.sequences, b.sequences)
    assert a.token_routes.indices[-1].shape[0] == 12


def test_config_default_routing_is_used(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    model = copy.copy(tiny_model)
    model.config = copy.deepcopy(tiny_model.config)
    model.config.routing = "token"
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    assert hasattr(out, "token_routes")


def test_bad_mixing_options_are_refused(tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    with pytest.raises(ValueError, match="routing_top_k=4 is larger than the number of adapters"):
        tiny_model.generate(**batch, routing="token", routing_top_k=4, **GREEDY)
    with pytest.raises(ValueError, match="routing_temperature must be a number > 0"):
        tiny_model.generate(**batch, routing="token", routing_temperature=0.0, **GREEDY)
    with pytest.raises(ValueError, match="reroute_every must be an integer >= 0"):
        tiny_model.generate(**batch, routing="token", reroute_every=-1, **GREEDY)
    with pytest.raises(ValueError, match="does not support beam search"):
        tiny_model.generate(**batch, routing="token", num_beams=2, **GREEDY)
    rows = batch["input_ids"].shape[0]
    with pytest.raises(ValueError, match=r"adapter_weights has shape \(6, 2\)"):
        tiny_model.generate(**batch, adapter_weights=torch.full((rows, 2), 0.5), **GREEDY)
    with pytest.raises(ValueError, match="row 0 sums to 0.9000"):
        tiny_model.generate(**batch, adapter_weights=torch.full((rows, 3), 0.3), **GREEDY)


def test_routed_layers_follow_adapter_changes(tiny_assets, tmp_path, mixed_batch):
    """Removing an adapter and adding another under the same name: the routed layers use the new weights,
    exactly as PEFT does with that adapter file."""
    from peft import PeftModel
    from tiny_models import save_adapter
    from transformers import AutoModelForCausalLM

    from ariadne_hf import AriadneRoutedModel

    model = AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                             num_centroids=2, progress=False)
    _, _, batch = mixed_batch
    names = ["code"] * batch["input_ids"].shape[0]
    before = model(**batch, adapter_names=names).logits
    model.remove_adapter("code")
    other = save_adapter(tiny_assets["backbone"], "legal", str(tmp_path / "other"), seed=11)
    model.add_adapter("code", other, tiny_assets["train"]["code"], progress=False)
    ours = model(**batch, adapter_names=names).logits
    oracle = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["backbone"]), other).eval()
    torch.testing.assert_close(ours, oracle(**batch).logits, rtol=1e-5, atol=1e-5)
    assert (ours - before).abs().max() > 1e-3
