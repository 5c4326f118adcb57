"""routing_layer > 0 (the base hidden state after layer k), and one routing path for every front end."""

import asyncio

import pytest
import torch
from tiny_models import make_prompts

from ariadne_hf import AriadneRoutedModel
from ariadne_hf.routing.signal import HiddenStateSignal, compact, decoder_of

LEGAL = make_prompts("legal", 16, seed=3)  # a task no adapter covers


@pytest.fixture(scope="module")
def layer_model(tiny_assets):
    """The tiny routed model built on the state after layer 1, with the ood calibration and reject='auto'."""
    return AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                            num_centroids=2, routing_layer=1, reject="auto", reject_rate=0.05,
                                            progress=False)


@pytest.fixture(scope="module")
def layer_bundle(layer_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("layer_bundle") / "bundle"
    layer_model.save_pretrained(directory)
    return str(directory)


def _oracle_pooled(model, prompt: str, layer: int) -> torch.Tensor:
    """Independent oracle: the prompt's non-special tokens alone through the plain backbone, transformers'
    hidden_states[layer] (the output of decoder layer `layer`), plain mean."""
    tokenizer = model.tokenizer
    ids = [t for t in tokenizer(prompt)["input_ids"] if t not in tokenizer.all_special_ids]
    out = model.backbone(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0].float().mean(dim=0)  # [D]


def test_signal_is_the_mean_hidden_state_after_layer_k_of_the_routable_tokens(layer_model, tiny_assets):
    prompts = [p for items in tiny_assets["test"].values() for p in items[:2]]
    signal = layer_model.routing_signal
    assert signal.layer == 1
    for side in ("left", "right"):
        batch = layer_model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side=side)
        weights = batch["attention_mask"].float() * (batch["input_ids"] != 1)  # <s> is special (weight 0)
        pooled, total = signal.pooled(batch["input_ids"], weights)
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(pooled[row], _oracle_pooled(layer_model, prompt, 1), atol=1e-5, rtol=1e-5)
        assert torch.equal(total, weights.sum(dim=1))


def test_routing_pass_bypasses_the_routed_lora_layers(layer_model, tiny_assets):
    from ariadne_hf.call_planning import sequence_plan
    from ariadne_hf.lora import base_weights_only, use_plan

    batch = layer_model.tokenizer(tiny_assets["test"]["math"][:3], return_tensors="pt", padding=True)
    ids, mask, weights = compact(batch["input_ids"], batch["attention_mask"].float())
    signal = HiddenStateSignal(decoder_of(layer_model.backbone), 1, base_weights=base_weights_only)
    unguarded = HiddenStateSignal(decoder_of(layer_model.backbone), 1)  # no base_weights: a plain decoder's signal
    plain = signal.hidden(ids, mask)
    with use_plan(sequence_plan(layer_model.lora, layer_model.device, [1, 1, 1])):  # poetry targets every projection of layer 0
        under_plan = signal.hidden(ids, mask)
        unguarded_under_plan = unguarded.hidden(ids, mask)
        lora_out = layer_model.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    assert torch.equal(plain, under_plan)
    assert not torch.allclose(lora_out, plain)  # the adapter does change layer 1 when it is active
    assert torch.allclose(unguarded_under_plan, lora_out)  # so base_weights is what bypasses it
    assert layer_model.routing_signal.hidden.base_weights is base_weights_only  # the model's own signal is guarded


def test_layer_routed_generation_equals_peft_with_the_routed_adapter(layer_model, peft_oracle, tiny_assets):
    prompts = [tiny_assets["test"][n][0] for n in ("math", "poetry", "code")]
    batch = layer_model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = layer_model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                               pad_token_id=0)
    for row, adapter in enumerate(out.routes.adapter_names):
        assert adapter in tiny_assets["adapters"]
        peft_oracle.set_adapter(adapter)
        single = {k: v[row:row + 1] for k, v in batch.items()}
        expected = peft_oracle.generate(**single, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out.sequences[row], expected[0])


def test_layer_routing_selects_and_rejects(layer_model, tiny_assets):
    truth = [n for n, items in tiny_assets["test"].items() for _ in items]
    decision = layer_model.route([p for items in tiny_assets["test"].values() for p in items])
    accuracy = sum(a == b for a, b in zip(decision.adapter_names, truth, strict=True)) / len(truth)
    assert accuracy >= 0.9
    foreign = layer_model.route(LEGAL)
    assert foreign.reasons.count("out_of_distribution") >= len(LEGAL) // 2


def test_every_front_end_gives_identical_decisions_rejections_included(layer_model, layer_bundle, tiny_assets):
    from ariadne_hf.serving.engine import route_id_lists
    from ariadne_hf.serving.routing_only import load_routing_only

    prompts = [p for items in tiny_assets["test"].values() for p in items[:4]] + LEGAL[:8]
    loaded = AriadneRoutedModel.from_pretrained(layer_bundle)
    router_only = load_routing_only(layer_bundle)
    reference = layer_model.route(prompts)
    assert "out_of_distribution" in reference.reasons and "nearest" in reference.reasons
    batch = layer_model.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    seen = []
    layer_model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=0, on_route=seen.append)
    forward = layer_model(**batch).routes
    ids = [layer_model.tokenizer(p)["input_ids"] for p in prompts]
    decisions = {
        "route": reference, "loaded": loaded.route(prompts), "router_only": router_only.route(prompts),
        "router_only_ids": router_only.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
        "generate": seen[0], "forward": forward,
    }
    for name, decision in decisions.items():
        assert decision.adapter_names == reference.adapter_names, name
        assert decision.reasons == reference.reasons, name
        torch.testing.assert_close(decision.ood_scores, reference.ood_scores, atol=1e-4, rtol=1e-4, msg=name)
    for front in (layer_model, router_only):  # the serving engine, gateway and Ray ingress route through this
        infos = route_id_lists(front, ids, pad_id=0)
        assert [i.adapter for i in infos] == reference.adapter_names
    assert asyncio.run(_gateway_routes(router_only, prompts)) == reference.adapter_names


async def _gateway_routes(router_only, prompts):
    from ariadne_hf.serving.gateway import GatewayBackend

    backend = GatewayBackend(router_only, "http://127.0.0.1:9")  # never contacted: route() only
    return [info.adapter for info in await backend.route(prompts)]


def test_router_only_reads_the_table_and_exactly_k_layers(layer_bundle, tiny_assets):
    from safetensors import safe_open

    from ariadne_hf.serving.routing_only import load_routing_only

    router_only = load_routing_only(layer_bundle)
    with safe_open(f"{tiny_assets['backbone']}/model.safetensors", "pt") as handle:
        sizes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    wanted = [k for k in sizes if k == "model.embed_tokens.weight" or k.startswith("model.layers.0.")]
    expected = sum(4 * torch.Size(sizes[k]).numel() for k in wanted)  # fp32
    assert router_only.signal_bytes == expected
    held = {n for n, _ in router_only.signal.hidden.decoder.named_parameters()}
    assert not any(n.startswith("layers.1.") for n in held)


def test_routing_layer_errors(tiny_assets, layer_model):
    with pytest.raises(ValueError, match="routing_layer=2 must be below"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                         routing_layer=2, progress=False)
    with pytest.raises(ValueError, match="routing_layer must be an integer"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                         routing_layer=-1, progress=False)


def test_token_routing_re_routes_on_the_input_embedding_at_any_routing_layer(layer_model, layer_bundle, tiny_model,
                                                                            tiny_assets):
    """A routing_layer=1 model token-routes exactly like a routing_layer=0 model of the same prompts (its input-
    embedding table is built alongside, saved and reloaded), while sequence routing uses the layer-1 signal."""
    batch = tiny_model.tokenizer([tiny_assets["test"][n][1] for n in ("math", "poetry", "code")], return_tensors="pt",
                                 padding=True, padding_side="left")
    gen = dict(routing="token", max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    plain = AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                             num_centroids=2, progress=False)
    expected = plain.generate(**batch, **gen)
    loaded = AriadneRoutedModel.from_pretrained(layer_bundle)
    for model in (layer_model, loaded):
        out = model.generate(**batch, **gen)
        assert torch.equal(out.sequences, expected.sequences)
        assert out.token_routes.steps == expected.token_routes.steps
        for got, want in zip(out.token_routes.indices, expected.token_routes.indices, strict=True):
            assert torch.equal(got, want)
    assert not torch.equal(layer_model.router.centroids, plain.router.centroids[:, :])  # sequence routing: layer 1


def test_add_and_remove_adapter_keep_both_routers_in_step(tiny_assets):
    names = ["math", "poetry"]
    model = AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {n: tiny_assets["adapters"][n] for n in names},
                                             {n: tiny_assets["train"][n] for n in names}, routing_layer=1,
                                             progress=False)
    model.add_adapter("code", tiny_assets["adapters"]["code"], tiny_assets["train"]["code"], progress=False)
    assert model.router.adapter_names == model.embedding_router.adapter_names == ["math", "poetry", "code"]
    decision = model.route(tiny_assets["test"]["code"])
    assert decision.adapter_names.count("code") >= len(decision) - 1
    model.remove_adapter("poetry")
    assert model.embedding_router.adapter_names == ["math", "code"]
    assert int(model.embedding_router.centroid_adapter.max()) == 1


def test_auto_routing_layer_is_a_fixed_share_of_the_depth(tiny_model):
    from ariadne_hf.routing.signal import auto_routing_layer

    assert [auto_routing_layer(n) for n in (2, 11, 12, 18, 30, 32)] == [0, 0, 3, 5, 8, 9]
    assert tiny_model.config.routing_layer == 0  # the 2-layer test backbone keeps the input embedding
