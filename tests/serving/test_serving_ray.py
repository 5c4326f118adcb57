"""`ariadne serve BUNDLE --ray`: a local Ray instance (2 CPUs, 2 generation replicas, 2 warm adapters each), started
and stopped here. Greedy answers equal the single server's; the answering replica holds the request's adapter."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import openai
import pytest
from serving_bundle import load_bundle, reference_completion

from ariadne_hf.serving.ray_environment import prepare_local_ray_environment

prepare_local_ray_environment()  # before Ray's first import in this process (a local instance on 127.0.0.1)
pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow
PROMPTS = ["add plus seven three sum", "poem rhyme moon love", "python function return loop", "compute eight total",
           "sonnet heart night rose", "class import list bug"]


@pytest.fixture(scope="module")
def ray_server(serving_bundle_dir):
    import ray
    from ray import serve

    from ariadne_hf.serving.ray_app import free_port, start_ray

    url = start_ray(serving_bundle_dir, port=free_port(), num_cpus=2, replicas=2, adapters_per_replica=2, max_wait_ms=20)
    try:
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_local_ray_instance_listens_on_loopback_only(ray_server):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_server.startswith("http://127.0.0.1:")


def api(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_ray_answers_equal_single_server_and_replica_holds_adapter(ray_server, serving_bundle_dir):
    model = load_bundle(serving_bundle_dir)
    routes = model.route(PROMPTS).adapter_names
    replicas = set()
    for prompt, adapter in zip(PROMPTS * 2, routes * 2, strict=True):
        raw = api(ray_server).completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=6)
        answer = raw.parse()
        assert answer.model == raw.headers["x-ariadne-adapter"] == adapter
        resident = raw.headers["x-ariadne-resident"].split(",")
        assert adapter in resident and len(resident) <= 2  # the answering replica holds it, in one of its 2 slots
        replicas.add(raw.headers["x-ariadne-replica"])
        tokens = reference_completion(model, model.tokenizer(prompt)["input_ids"], adapter, 6)
        assert answer.choices[0].text == model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert replicas  # which replicas answered is Ray's (best-effort) choice: not asserted


def test_ray_stream_equals_the_full_answer_and_errors_are_openai_shaped(ray_server):
    messages = [{"role": "user", "content": "poem rhyme moon love"}]
    full = api(ray_server).chat.completions.create(model="auto", messages=messages, max_tokens=5)
    chunks = list(api(ray_server).chat.completions.create(model="auto", messages=messages, max_tokens=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert {c.model for c in chunks} == {full.model}
    assert [m.id for m in api(ray_server).models.list()][:2] == ["auto", "base"]
    with pytest.raises(openai.NotFoundError):
        api(ray_server).completions.create(model="nope", prompt="add", max_tokens=2)
    too_long = httpx.post(ray_server + "/v1/completions", json={"model": "auto", "prompt": "add", "max_tokens": 9999})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    bad = httpx.post(ray_server + "/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    if shutil.which("curl"):
        body = json.dumps({"model": "code", "prompt": "python def", "max_tokens": 3, "stream": True})
        out = subprocess.run(["curl", "-sN", ray_server + "/v1/completions", "-H", "Content-Type: application/json",
                              "-d", body], capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.strip().endswith("data: [DONE]")


def test_ray_implements_logprobs_and_logit_bias_and_refuses_tools(ray_server, serving_bundle_dir):
    """The replicas share the local engine: per-row parameters work, refusals and ignored fields are reported."""
    import torch

    model = load_bundle(serving_bundle_dir)
    prompt = "poem rhyme moon love"
    ids = model.tokenizer(prompt)["input_ids"]
    response = httpx.post(ray_server + "/v1/completions", timeout=120, json={
        "model": "poetry", "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True,
        "logit_bias": {"11": 100}, "bogus_field": 1})
    assert response.status_code == 200, response.text
    assert response.headers["x-ariadne-ignored"] == "bogus_field"
    lp = response.json()["choices"][0]["logprobs"]
    every = ids + [11] * 4  # the bias forces token 11
    assert lp["tokens"] == [model.tokenizer.decode([t]) for t in every]
    t = torch.tensor([every])
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=t, attention_mask=torch.ones_like(t),
                                            adapter_names=["poetry"]).logits[0].float(), dim=-1)
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(reference[j - 1, every[j]]) for j in range(1, len(every))],
                                                     abs=1e-5)
    refused = httpx.post(ray_server + "/v1/chat/completions", timeout=120, json={
        "model": "poetry", "messages": [{"role": "user", "content": prompt}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
