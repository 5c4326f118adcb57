"""Gateway mode against a real upstream (a second `ariadne serve` on another loopback port), and the router-only
loader (embedding table read from safetensors, for two architectures and a sharded checkpoint)."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import openai
import pytest
import torch

from ariadne_hf.bundle.errors import BundleError
from ariadne_hf.serving.launch import build_gateway_app
from ariadne_hf.serving.routing_only import load_routing_only, read_input_embeddings
from ariadne_hf.serving.runner import ServerThread

PROMPTS = ["add plus seven three sum", "poem rhyme moon love", "python function return loop", "compute eight total"]


@pytest.fixture(scope="module")
def upstream(server):
    """The upstream engine the gateway forwards to: this module's local-mode server."""
    return server


@pytest.fixture(scope="module")
def gateway(serving_bundle_dir, upstream):
    with ServerThread(build_gateway_app(serving_bundle_dir, upstream.base_url, upstream_model="{adapter}")) as running:
        yield running


def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def _held(obj, path: str = "", seen: set | None = None) -> tuple[dict[str, torch.Tensor], list[torch.nn.Module]]:
    """Every tensor (by path, each once) and every nn.Module reachable from `obj`'s attributes, tokenizer aside."""
    seen = set() if seen is None else seen
    tensors, modules = {}, []
    if id(obj) in seen:
        return tensors, modules
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {path: obj}, modules
    if isinstance(obj, torch.nn.Module):
        modules.append(obj)
    if isinstance(obj, dict):
        children = obj.items()
    elif isinstance(obj, (list, tuple, set)):
        children = enumerate(obj)
    else:
        children = getattr(obj, "__dict__", {}).items()
    for key, child in children:
        if key != "tokenizer":
            more, sub = _held(child, f"{path}.{key}", seen)
            tensors.update(more)
            modules += sub
    return tensors, modules


def test_router_only_holds_the_embedding_table_and_the_router_alone(serving_bundle_dir, serving_model):
    """Gateway mode's guarantee, measured on the object: of the backbone only the input-embedding table, no decoder
    layer and no LoRA weight (routing_layer 0); everything else it holds is the router's tables."""
    router = load_routing_only(serving_bundle_dir)
    assert serving_model.config.routing_layer == 0 and router.signal.hidden is None
    tensors, modules = _held(router)
    assert modules == [router.router]  # no decoder, no layer, no LoRA module
    outside = {name: t for name, t in tensors.items() if not name.startswith(".router.")}
    assert list(outside) == [".embed_weight"] and router.embed_weight.shape == (200, 64)
    assert router.signal_bytes == router.embed_weight.numel() * router.embed_weight.element_size()
    torch.testing.assert_close(router.embed_weight, serving_model.backbone.get_input_embeddings().weight,
                               rtol=0, atol=0)


def test_router_only_routes_equal_the_full_model(serving_bundle_dir, serving_model):
    router = load_routing_only(serving_bundle_dir)
    expected, got = serving_model.route(PROMPTS), router.route(PROMPTS)
    assert got.adapter_names == expected.adapter_names
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.margins, expected.margins)


def test_embedding_key_for_other_architectures_and_shards(tmp_path):
    from tiny_models import make_backbone
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = make_backbone()
    llama.save_pretrained(tmp_path / "llama-sharded", max_shard_size="40KB")  # model.safetensors.index.json
    assert (tmp_path / "llama-sharded" / "model.safetensors.index.json").is_file()
    weight = read_input_embeddings(str(tmp_path / "llama-sharded"), None)
    assert torch.equal(weight, llama.get_input_embeddings().weight)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")  # key transformer.wte.weight
    assert torch.equal(read_input_embeddings(str(tmp_path / "gpt2"), None), gpt2.get_input_embeddings().weight)


def test_router_only_refuses_the_wrong_backbone(serving_bundle_dir, tmp_path):
    from tiny_models import save_backbone

    other = save_backbone(str(tmp_path / "other"), seed=5)
    config = json.loads((open(f"{serving_bundle_dir}/config.json")).read())
    shutil.copytree(serving_bundle_dir, tmp_path / "moved")
    config["backbone_name_or_path"] = other
    (tmp_path / "moved" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="differs from the one the centroids were computed in"):
        load_routing_only(str(tmp_path / "moved"))


def test_gateway_answers_equal_the_upstream_with_the_routed_adapter(gateway, upstream, serving_model):
    routes = serving_model.route(PROMPTS).adapter_names
    for prompt, adapter in zip(PROMPTS, routes, strict=True):
        raw = api(gateway).completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=6)
        via_gateway = raw.parse()
        direct = api(upstream).completions.create(model=adapter, prompt=prompt, max_tokens=6)
        assert raw.headers["x-ariadne-adapter"] == via_gateway.model == adapter
        assert via_gateway.choices[0].text == direct.choices[0].text
    forced = api(gateway).completions.create(model="code", prompt=PROMPTS[0], max_tokens=4)
    assert forced.model == "code"
    assert forced.choices[0].text == api(upstream).completions.create(model="code", prompt=PROMPTS[0],
                                                                      max_tokens=4).choices[0].text
    assert api(gateway).completions.create(model="base", prompt=PROMPTS[0], max_tokens=2).model == "base"


def test_gateway_chat_stream_passthrough(gateway, upstream):
    messages = [{"role": "user", "content": "python function return loop"}]
    chunks = list(api(gateway).chat.completions.create(model="auto", messages=messages, max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = api(upstream).chat.completions.create(model="code", messages=messages, max_tokens=6)
    assert {c.model for c in chunks} == {"code"} and text == direct.choices[0].message.content


def test_gateway_fans_out_prompts_of_different_adapters(gateway, upstream, serving_model):
    answer = api(gateway).completions.create(model="auto", prompt=PROMPTS, max_tokens=3, n=2)
    routes = serving_model.route(PROMPTS).adapter_names
    assert [c.index for c in answer.choices] == list(range(8))
    for choice in answer.choices:
        prompt, adapter = PROMPTS[choice.index // 2], routes[choice.index // 2]
        assert choice.adapter == adapter
        direct = api(upstream).completions.create(model=adapter, prompt=prompt, max_tokens=3)
        assert choice.text == direct.choices[0].text
    with pytest.raises(openai.BadRequestError, match="streams one prompt"):
        api(gateway).completions.create(model="auto", prompt=PROMPTS, max_tokens=3, stream=True)


def test_gateway_errors_are_openai_404_400_and_502(gateway, serving_bundle_dir):
    with pytest.raises(openai.NotFoundError):
        api(gateway).completions.create(model="nope", prompt="add", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # the upstream's 400, passed through
        api(gateway).completions.create(model="auto", prompt="add " * 300, max_tokens=2)
    bad = httpx.post(gateway.base_url + "/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    with ServerThread(build_gateway_app(serving_bundle_dir, "http://127.0.0.1:9/v1")) as orphan:  # nothing listens on :9
        with pytest.raises(openai.APIStatusError) as err:
            api(orphan).completions.create(model="auto", prompt="add", max_tokens=2)
        assert err.value.status_code == 502


def test_gateway_template_is_applied(serving_bundle_dir, upstream):
    """An SGLang-style template: the upstream (our server) must then answer to 'tiny:{adapter}' names; it does
    not, so the upstream's 404 comes back naming the templated model: proof of what was sent."""
    with ServerThread(build_gateway_app(serving_bundle_dir, upstream.base_url, upstream_model="tiny:{adapter}")) as gw:
        with pytest.raises(openai.NotFoundError, match="tiny:poetry"):
            api(gw).completions.create(model="auto", prompt="poem rhyme moon", max_tokens=2)
    with pytest.raises(ValueError, match="must contain"):
        build_gateway_app(serving_bundle_dir, upstream.base_url, upstream_model="no-placeholder")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_streams_through_the_gateway_from_the_routed_adapter(gateway):
    body = json.dumps({"model": "auto", "prompt": "poem rhyme moon", "max_tokens": 3, "stream": True})
    out = subprocess.run(["curl", "-sN", gateway.base_url + "/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and {json.loads(e)["model"] for e in events[:-1]} == {"poetry"}
