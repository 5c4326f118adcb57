"""`ariadne serve BUNDLE` (local mode): OpenAI API with the real `openai` client and curl over loopback, dynamic
batching equal to one-at-a-time generation, errors, streaming, cancellation, and a mixed good/bad load."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving_bundle import load_bundle, reference_completion

from ariadne_hf.serving.app import LocalBackend, create_app
from ariadne_hf.serving.runner import ServerThread

PROMPTS = ["add plus seven three sum", "poem rhyme moon love", "python function return loop", "the a of and",
           "compute total digits eight", "sonnet heart night rose", "class import list bug", "please write me about"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def stats(server) -> dict:
    return httpx.get(server.url + "/stats").json()


def test_models_health_and_route_endpoints_answer(server, serving_model):
    ids = [m.id for m in client(server).models.list()]
    assert ids == ["auto", "base", *serving_model.adapter_names]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    data = httpx.post(server.base_url + "/route", json={"input": PROMPTS[:3]}).json()["data"]
    expected = serving_model.route(PROMPTS[:3])
    assert [d["adapter"] for d in data] == expected.adapter_names
    for row, margin in zip(data, expected.margins.tolist(), strict=True):
        assert row["margin"] == pytest.approx(margin, abs=1e-5)


def test_batched_greedy_equals_one_at_a_time(server, serving_model):
    """Concurrent requests (auto and forced adapters) are batched, and every answer equals the prompt generated
    alone with its adapter (no padding, no other rows)."""
    tokenizer = serving_model.tokenizer
    jobs = [(p, m) for p in PROMPTS for m in ("auto", "poetry")]
    before = stats(server)

    def ask(job):
        prompt, model = job
        return client(server).completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    after = stats(server)
    assert after["max_rows"] > 1 and after["batches"] - before["batches"] < len(jobs)  # really batched
    routes = serving_model.route(PROMPTS).adapter_names
    for (prompt, model), answer in zip(jobs, answers, strict=True):
        adapter = routes[PROMPTS.index(prompt)] if model == "auto" else model
        assert answer.model == adapter and answer.choices[0].adapter == adapter
        tokens = reference_completion(serving_model, tokenizer(prompt)["input_ids"], adapter, 10)
        assert answer.choices[0].text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert answer.usage.completion_tokens == len(tokens)
        assert answer.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])


def test_chat_sync_and_stream_agree(server, serving_model):
    messages = [{"role": "user", "content": "poem rhyme moon love"}]
    api = client(server)
    raw = api.chat.completions.with_raw_response.create(model="auto", messages=messages, max_tokens=8)
    answer = raw.parse()
    assert raw.headers["x-ariadne-adapter"] == answer.model == "poetry"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason in ("stop", "length")
    text, models, usage = "", set(), None
    for chunk in api.chat.completions.create(model="auto", messages=messages, max_tokens=8, stream=True,
                                             stream_options={"include_usage": True}):
        models.add(chunk.model)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
    assert text == answer.choices[0].message.content and models == {"poetry"}
    ids = serving_model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = serving_model.tokenizer(ids, add_special_tokens=False)["input_ids"]
    tokens = reference_completion(serving_model, ids, "poetry", 8)
    assert text == serving_model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert usage.completion_tokens == answer.usage.completion_tokens == len(tokens)


def test_n_stop_seed_and_base_model_behave_as_in_openai(server):
    api = client(server)
    full = api.completions.create(model="math", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    words = full.split(" ")
    stop = " " + words[3]
    cut = api.completions.create(model="math", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop], n=2)
    assert [c.index for c in cut.choices] == [0, 1]
    for choice in cut.choices:
        assert choice.text == full[: full.index(stop)] and choice.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="math", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].text  # the stop string is never leaked into the stream
    sampled = [api.completions.create(model="code", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, seed=7)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    base = api.completions.create(model="base", prompt=PROMPTS[2], max_tokens=4)
    assert base.model == "base" and base.choices[0].adapter == "base"


def test_multiple_prompts_route_separately(server, serving_model):
    answer = client(server).completions.create(model="auto", prompt=PROMPTS[:3], max_tokens=3, n=2)
    routes = serving_model.route(PROMPTS[:3]).adapter_names
    assert [c.index for c in answer.choices] == list(range(6))
    assert [c.adapter for c in answer.choices] == [r for r in routes for _ in range(2)]
    assert answer.model == ",".join(dict.fromkeys(routes))


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (json.dumps({"prompt": "add"}).encode(), 400, "invalid_value"),                       # no model
    (json.dumps({"model": "auto", "prompt": "add", "temperature": 9}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "auto", "prompt": "add", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "nope", "prompt": "add"}).encode(), 404, "model_not_found"),
    (json.dumps({"model": "auto", "prompt": "add " * 300}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"model": "auto", "prompt": "add", "max_tokens": 10_000}).encode(), 400, "context_length_exceeded"),
])
def test_errors_are_openai_shaped(server, body, status, code):
    response = httpx.post(server.base_url + "/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_openai_client_errors_and_unknown_route(server):
    api = client(server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        api.chat.completions.create(model="auto", messages=[{"role": "user", "content": "add " * 300}])
    missing = httpx.get(server.base_url + "/nothing")
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_gets_json_and_sse_answers_from_the_routed_adapter(server):
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "add plus seven"}], "max_tokens": 4})
    out = subprocess.run(["curl", "-s", server.base_url + "/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out)["model"] == "math"
    stream = json.loads(body) | {"stream": True}
    out = subprocess.run(["curl", "-sN", server.base_url + "/chat/completions", "-H",
                          "Content-Type: application/json", "-d", json.dumps(stream)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(json.loads(e)["model"] == "math" for e in events[:-1])


def test_disconnect_mid_stream_frees_the_row(serving_model):
    """A client that drops a stream: its row stops at the next step, the call ends early, a concurrent request in the
    same batch is unaffected."""
    with ServerThread(create_app(LocalBackend(serving_model, max_batch_size=4, max_wait_ms=200))) as srv:
        body = {"model": "poetry", "prompt": PROMPTS[1], "max_tokens": 200, "stream": True}
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(lambda: client(srv).completions.create(model="code", prompt=PROMPTS[2], max_tokens=6))
            with httpx.Client(timeout=60) as http, http.stream("POST", srv.base_url + "/completions", json=body) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        break  # leaving the block closes the connection mid-stream
            answer = other.result(timeout=60)
        tokens = reference_completion(serving_model, serving_model.tokenizer(PROMPTS[2])["input_ids"], "code", 6)
        assert answer.choices[0].text == serving_model.tokenizer.decode(tokens, skip_special_tokens=True)
        deadline = time.monotonic() + 30
        while stats(srv)["cancelled_rows"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        final = stats(srv)
        assert final["cancelled_rows"] == 1
        assert final["generated_tokens"] < 200  # the dropped row stopped long before its 200 tokens


def test_mixed_load_good_answered_bad_rejected(server):
    """64 concurrent clients, 200 requests, a tenth malformed: every good one answered, every bad one a 4xx."""
    bad_bodies = [b"{", json.dumps({"model": "nope", "prompt": "x"}).encode(),
                  json.dumps({"model": "auto", "prompt": "add " * 400}).encode(),
                  json.dumps({"model": "auto", "messages": "not a list"}).encode()]

    def one(i: int):
        with httpx.Client(timeout=120) as http:
            if i % 10 == 0:
                path = "/chat/completions" if i % 20 == 0 else "/completions"
                r = http.post(server.base_url + path, content=bad_bodies[(i // 10) % 4],
                              headers={"content-type": "application/json"})
                return "bad", r.status_code, r.json()
            if i % 2:
                body = {"model": "auto", "prompt": PROMPTS[i % 8], "max_tokens": 3}
                r = http.post(server.base_url + "/completions", json=body)
            else:
                body = {"model": "auto", "messages": [{"role": "user", "content": PROMPTS[i % 8]}], "max_tokens": 3}
                r = http.post(server.base_url + "/chat/completions", json=body)
            return "good", r.status_code, r.json()

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(200)))
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] == "bad"]
    assert len(good) == 180 and all(status == 200 and body["choices"] for _, status, body in good)
    assert len(bad) == 20 and all(400 <= status < 500 and body["error"]["message"] for _, status, body in bad)
    assert httpx.get(server.url + "/health").status_code == 200


def test_batches_use_at_most_the_resident_slots(serving_bundle_dir):
    """With max_resident_adapters=2 the batcher never puts more than 2 distinct adapters in one generate."""
    import asyncio

    from ariadne_hf.serving.batcher import DynamicBatcher, Job, Row, Sampling

    model = load_bundle(serving_bundle_dir)
    model.config.max_resident_adapters = 2
    batcher = DynamicBatcher(model, max_batch_size=16)
    loop = asyncio.new_event_loop()
    names = model.adapter_names
    for adapter in [names[0], names[1], names[2], names[0], "__base__", names[2]]:
        batcher.pending.append(Job([Row([1, 2], adapter, 4)], Sampling(False), loop))
    first = {row.adapter for job in batcher._take() for row in job.rows}
    second = {row.adapter for job in batcher._take() for row in job.rows}
    loop.close()
    assert first == {names[0], names[1], "__base__"} and second == {names[2]}
