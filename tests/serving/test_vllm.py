"""Against a real vLLM (the CPU build, in its own cached venv): gateway mode in front of it, and content routing
inside it (the `ariadne_hf.serving.vllm` middleware). ONE vLLM server serves the whole module: it is started by
`ariadne serve BUNDLE --engine vllm` (so the launcher, the engine-python check and the middleware are the real
ones), on 127.0.0.1 and a free port, with this checkout of ariadne_hf importable in its venv (PYTHONPATH).

The oracle is the in-process routed model, served by the local `ariadne serve` (fp32, greedy): answers through vLLM
must route to the same adapter (100%) and give the same text on >= 95% of held-out prompts of the bundle's tasks
(vLLM's CPU kernels are not bit-identical to PyTorch's: a near-tie between two tokens may flip).

The vLLM venv is built by `vllm_env.ensure_vllm_venv` on the first run of a machine (~4 minutes, needs the package
index) and reused afterwards.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from vllm_bundle import (
    TASKS,
    VllmServer,
    build_smol_bundle,
    heldout_prompts,
    prepare_vllm_python,
    unmet_requirements,
)

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
PER_TASK = 5  # 20 held-out prompts


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/{path}", json=body, timeout=600)


def chat(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0}


def answer(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    return data["model"], choice["message"]["content"] if "message" in choice else choice["text"]


def in_parallel(fn, items, workers: int = 8) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(bundle folder, vLLM engine, the local oracle server, the gateway -> vLLM server, held-out prompts, oracle
    chat answers). vLLM starts first; the oracle answers are computed while it boots."""
    from ariadne_hf.serving.launch import build_gateway_app, build_local_app
    from ariadne_hf.serving.runner import ServerThread

    root = tmp_path_factory.mktemp("vllm")
    python = prepare_vllm_python()
    bundle = str(root / "bundle")
    model = build_smol_bundle(bundle)
    engine = VllmServer(bundle, python, log_path=str(root / "vllm.log"))
    try:
        prompts = heldout_prompts(PER_TASK)
        with ServerThread(build_local_app(bundle, model=model, max_batch_size=8)) as local:
            oracle = in_parallel(lambda p: answer(post(local.base_url, "chat/completions", {"model": "auto",
                                                                                              **chat(p)})), prompts)
            engine.wait()
            with ServerThread(build_gateway_app(bundle, engine.base_url)) as gateway:
                yield {"bundle": bundle, "engine": engine, "local": local, "gateway": gateway, "prompts": prompts,
                       "oracle": oracle, "model": model, "python": python}
    finally:
        engine.stop()


def agreement(got: list[tuple[str, str]], oracle: list[tuple[str, str]]) -> tuple[float, float]:
    routes = sum(g[0] == o[0] for g, o in zip(got, oracle, strict=True)) / len(oracle)
    texts = sum(g == o for g, o in zip(got, oracle, strict=True)) / len(oracle)
    return routes, texts


def test_the_vllm_venv_satisfies_ariadne_hf_requirements(setup):
    assert unmet_requirements(setup["python"]) == []


@pytest.mark.parametrize("mode", ["gateway", "middleware"])
def test_auto_chat_routes_and_greedy_texts_equal_the_in_process_model(setup, mode):
    base_url = setup["gateway"].base_url if mode == "gateway" else setup["engine"].base_url
    got = in_parallel(lambda p: answer(post(base_url, "chat/completions", {"model": "auto", **chat(p)})),
                      setup["prompts"])
    routes, texts = agreement(got, setup["oracle"])
    print(f"\n{mode}: routes equal {routes:.0%}, greedy texts equal {texts:.0%} of {len(got)} held-out prompts")
    assert {o[0] for o in setup["oracle"]} >= set(TASKS[:3])  # the prompts exercise several adapters
    assert all(o[1] for o in setup["oracle"])  # real answers, not empty strings
    assert routes == 1.0 and texts >= 0.95, [(g, o) for g, o in zip(got, setup["oracle"], strict=True) if g != o]


def templated(setup, prompt: str) -> str:
    tokenizer = setup["model"].tokenizer
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.mark.parametrize("mode", ["gateway", "middleware"])
def test_auto_completions_equal_the_in_process_model(setup, mode):
    base_url = setup["gateway"].base_url if mode == "gateway" else setup["engine"].base_url
    prompts = [templated(setup, p) for p in setup["prompts"][:8]]
    body = {"model": "auto", "max_tokens": MAX_TOKENS, "temperature": 0}
    oracle = in_parallel(lambda p: answer(post(setup["local"].base_url, "completions", {**body, "prompt": p})), prompts)
    got = in_parallel(lambda p: answer(post(base_url, "completions", {**body, "prompt": p})), prompts)
    routes, texts = agreement(got, oracle)
    print(f"\n{mode} completions: routes equal {routes:.0%}, greedy texts equal {texts:.0%} of {len(got)}")
    assert all(o[1] for o in oracle) and routes == 1.0 and texts >= 0.95


def stream_events(base_url: str, path: str, body: dict) -> tuple[httpx.Headers, list[dict]]:
    events = []
    with httpx.stream("POST", f"{base_url}/{path}", json={**body, "stream": True}, timeout=600) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
        return response.headers, events


@pytest.mark.parametrize("mode", ["gateway", "middleware"])
def test_streaming_gives_the_same_text_and_names_the_adapter(setup, mode):
    base_url = setup["gateway"].base_url if mode == "gateway" else setup["engine"].base_url
    adapter, text = setup["oracle"][1]
    headers, events = stream_events(base_url, "chat/completions", {"model": "auto", **chat(setup["prompts"][1])})
    assert headers["x-ariadne-adapter"] == adapter and {e["model"] for e in events} == {adapter}
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == text


def test_gateway_n_base_and_forced_adapter(setup):
    gateway, engine = setup["gateway"].base_url, setup["engine"].base_url
    prompt = setup["prompts"][0]
    routed = setup["oracle"][0][0]
    sampled = post(gateway, "chat/completions", {"model": "auto", **chat(prompt), "n": 2, "temperature": 0.8,
                                                 "seed": 3}).json()
    assert sampled["model"] == routed and len(sampled["choices"]) == 2
    base = answer(post(gateway, "chat/completions", {"model": "base", **chat(prompt)}))
    assert base == answer(post(engine, "chat/completions", {"model": "base", **chat(prompt)}))
    assert base[0] == "base" and base == answer(post(setup["local"].base_url, "chat/completions",
                                                     {"model": "base", **chat(prompt)}))
    other = next(t for t in TASKS if t != routed)
    forced = answer(post(gateway, "chat/completions", {"model": other, **chat(prompt)}))
    assert forced[0] == other and forced == answer(post(engine, "chat/completions", {"model": other, **chat(prompt)}))


def test_gateway_splits_a_multi_prompt_completion_and_the_middleware_refuses_it(setup):
    gateway, engine = setup["gateway"].base_url, setup["engine"].base_url
    prompts = [templated(setup, p) for p in setup["prompts"][:4]]  # one per task, interleaved
    routes = setup["model"].route(prompts).adapter_names
    assert len(set(routes)) > 1
    body = {"model": "auto", "prompt": prompts, "max_tokens": 12, "temperature": 0}
    split = post(gateway, "completions", body)
    assert split.status_code == 200
    choices = split.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3] and [c["adapter"] for c in choices] == routes
    alone = [answer(post(engine, "completions", {**body, "model": r, "prompt": p}))[1]
             for p, r in zip(prompts, routes, strict=True)]
    assert [c["text"] for c in choices] == alone
    refused = post(engine, "completions", body)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "prompts_route_to_different_adapters" and "gateway mode" in error["message"]


def test_upstream_errors_pass_through_the_gateway(setup):
    response = post(setup["gateway"].base_url, "completions", {"model": "auto", "prompt": "hi", "max_tokens": 5000})
    assert response.status_code == 400 and "max_model_len" in response.json()["error"]["message"]
    missing = post(setup["gateway"].base_url, "completions", {"model": "nope", "prompt": "hi"})
    assert missing.status_code == 404


def test_middleware_lists_auto_and_leaves_named_models_untouched(setup):
    engine = setup["engine"].base_url
    ids = [m["id"] for m in httpx.get(engine + "/models", timeout=30).json()["data"]]
    assert ids[0] == "auto" and set(ids[1:]) == {"base", *TASKS}
    named = post(engine, "chat/completions", {"model": TASKS[2], **chat(setup["prompts"][0])})
    assert named.status_code == 200 and named.json()["model"] == TASKS[2]
    assert "x-ariadne-adapter" not in named.headers and "x-ariadne-route-ms" not in named.headers
    routed = post(engine, "chat/completions", {"model": "auto", **chat(setup["prompts"][0])})
    assert routed.headers["x-ariadne-adapter"] == setup["oracle"][0][0]
    assert float(routed.headers["x-ariadne-route-ms"]) > 0.0
    unknown = post(engine, "completions", {"model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404  # vLLM's own answer: the middleware did not touch it
