"""OpenAI request parameters on the local server: logprobs (chat, completions, streamed, echo), logit_bias and
presence/frequency penalties against reference implementations written here, batched == one at a time, refusals,
unknown fields, and a conformance walk over the installed `openai` package's request parameter types."""

from __future__ import annotations

import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from ariadne_hf.serving.openai_params import IGNORED_HEADER, IMPLEMENTED, NO_EFFECT, REFUSED
from ariadne_hf.serving.runner import ServerThread

PROMPT = "poem rhyme moon love"
MESSAGES = [{"role": "user", "content": PROMPT}]
TOL = 1e-5


def post(server, kind: str, **body) -> httpx.Response:
    path = "/chat/completions" if kind == "chat" else "/completions"
    defaults = {"model": "auto", **({"messages": MESSAGES} if kind == "chat" else {"prompt": PROMPT})}
    return httpx.post(server.base_url + path, json={**defaults, **body}, timeout=60)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def text_of(kind: str, body: dict, i: int = 0) -> str:
    choice = body["choices"][i]
    return choice["message"]["content"] if kind == "chat" else choice["text"]


def prompt_ids(model, kind: str, prompt: str = PROMPT) -> list[int]:
    if kind == "chat":
        from ariadne_hf.serving.prompts import chat_ids

        return chat_ids(model.tokenizer, [{"role": "user", "content": prompt}])
    return model.tokenizer(prompt)["input_ids"]


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


# ---- reference implementations (independent of serving/sampling.py) ---------------------------------------------
@torch.no_grad()
def forward_logprobs(model, ids: list[int], adapter: str) -> torch.Tensor:
    """log_softmax of the routed model's logits over `ids` alone, with `adapter`: [T, V]."""
    t = torch.tensor([ids])
    return torch.log_softmax(model(input_ids=t, attention_mask=torch.ones_like(t), adapter_names=[adapter])
                             .logits[0].float(), dim=-1)


@torch.no_grad()
def reference_greedy(model, ids: list[int], adapter: str, steps: int, *, bias: dict[int, float] | None = None,
                     presence: float = 0.0, frequency: float = 0.0) -> list[int]:
    """Greedy decoding by full forwards, with OpenAI's definitions written out token by token:
    logit[j] += bias[j]; logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c = counts among generated tokens."""
    generated: list[int] = []
    for _ in range(steps):
        t = torch.tensor([ids + generated])
        logits = model(input_ids=t, attention_mask=torch.ones_like(t), adapter_names=[adapter]).logits[0, -1].float()
        logits = logits.clone()
        for token, value in (bias or {}).items():
            logits[token] += value
        for token in set(generated):
            count = generated.count(token)
            logits[token] -= count * frequency + presence
        token = int(logits.argmax())
        if token in eos_ids(model):
            break
        generated.append(token)
    return generated


def answer_adapter(body: dict) -> str:
    name = body["choices"][0]["adapter"]
    return "__base__" if name == "base" else name


# ---- logprobs -------------------------------------------------------------------------------------------------
def test_chat_logprobs_equal_log_softmax_of_the_routed_model(server, serving_model):
    body = ok(post(server, "chat", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3))
    content = body["choices"][0]["logprobs"]["content"]
    tokenizer, adapter = serving_model.tokenizer, answer_adapter(body)
    ids = prompt_ids(serving_model, "chat")
    generated = reference_greedy(serving_model, ids, adapter, 6)
    assert len(content) == len(generated) == body["usage"]["completion_tokens"]
    reference = forward_logprobs(serving_model, ids + generated, adapter)  # [T, V]
    for j, (entry, token) in enumerate(zip(content, generated, strict=True)):
        row = reference[len(ids) + j - 1]
        assert entry["token"] == tokenizer.decode([token]) and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=TOL)
        top = row.topk(3)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=TOL)
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([i]) for i in top.indices.tolist()]


def test_completion_logprobs_echo_and_prompt_logprobs(server, serving_model):
    tokenizer = serving_model.tokenizer
    ids = prompt_ids(serving_model, "completions")
    body = ok(post(server, "completions", max_tokens=5, temperature=0, logprobs=2, echo=True))
    adapter = answer_adapter(body)
    generated = reference_greedy(serving_model, ids, adapter, 5)
    choice = body["choices"][0]
    assert choice["text"] == PROMPT + tokenizer.decode(generated, skip_special_tokens=True)
    lp = choice["logprobs"]
    every = ids + generated
    assert lp["tokens"] == [tokenizer.decode([t]) for t in every]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first prompt token
    reference = forward_logprobs(serving_model, every, adapter)
    for j in range(1, len(every)):
        assert lp["token_logprobs"][j] == pytest.approx(float(reference[j - 1, every[j]]), abs=TOL)
        top = reference[j - 1].topk(2)
        assert sorted(lp["top_logprobs"][j].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=TOL)
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    # echo without logprobs, and max_tokens 0 (prompt logprobs only: the scoring use of echo)
    plain = ok(post(server, "completions", max_tokens=5, temperature=0, echo=True))["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None
    scored = ok(post(server, "completions", max_tokens=0, logprobs=0, echo=True))["choices"][0]
    assert scored["text"] == PROMPT and scored["finish_reason"] == "length"
    assert scored["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:len(ids)], abs=TOL)
    assert scored["logprobs"]["top_logprobs"][1:] == [{}] * (len(ids) - 1)
    assert post(server, "completions", max_tokens=0).status_code == 400


def stream_events(server, kind: str, **body) -> list[dict]:
    path = "/chat/completions" if kind == "chat" else "/completions"
    defaults = {"model": "auto", **({"messages": MESSAGES} if kind == "chat" else {"prompt": PROMPT})}
    with httpx.stream("POST", server.base_url + path, json={**defaults, **body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_logprobs_equal_the_full_answer(server):
    full = ok(post(server, "chat", max_tokens=7, temperature=0, logprobs=True, top_logprobs=2))
    events = stream_events(server, "chat", max_tokens=7, temperature=0, logprobs=True, top_logprobs=2)
    streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert streamed == full["choices"][0]["logprobs"]["content"]
    assert "".join(c["delta"].get("content") or "" for ev in events for c in ev["choices"]) == text_of("chat", full)

    full = ok(post(server, "completions", max_tokens=7, temperature=0, logprobs=1, echo=True))["choices"][0]
    events = stream_events(server, "completions", max_tokens=7, temperature=0, logprobs=1, echo=True)
    parts = [c["logprobs"] for ev in events for c in ev["choices"] if c.get("logprobs")]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == full["logprobs"][key], key
    assert "".join(c["text"] for ev in events for c in ev["choices"]) == full["text"]


# ---- logit_bias and penalties ----------------------------------------------------------------------------------
def test_logit_bias_and_penalties_equal_the_reference(server, serving_model):
    tokenizer = serving_model.tokenizer
    ids = prompt_ids(serving_model, "completions")
    base = ok(post(server, "completions", max_tokens=8, temperature=0))
    adapter = answer_adapter(base)
    target = next(t for t in range(5, 100) if t not in eos_ids(serving_model) and tokenizer.decode([t]).strip())
    cases = [
        ({"logit_bias": {str(target): 100}}, {"bias": {target: 100.0}}),
        ({"logit_bias": {str(target): 3.5, "7": -100}}, {"bias": {target: 3.5, 7: -100.0}}),
        ({"presence_penalty": 2.0}, {"presence": 2.0}),
        ({"frequency_penalty": 1.5}, {"frequency": 1.5}),
        ({"presence_penalty": -2.0, "frequency_penalty": -1.0}, {"presence": -2.0, "frequency": -1.0}),
    ]
    plain = reference_greedy(serving_model, ids, adapter, 8)
    assert base["choices"][0]["text"] == tokenizer.decode(plain, skip_special_tokens=True)
    changed = 0
    for params, reference_args in cases:
        expected = reference_greedy(serving_model, ids, adapter, 8, **reference_args)
        got = ok(post(server, "completions", model=adapter if adapter != "__base__" else "base", max_tokens=8,
                      temperature=0, logprobs=0, **params))["choices"][0]
        assert got["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in expected], params
        changed += expected != plain
    assert changed >= 3  # the parameters really change these answers (so the equalities above can fail)
    forced = reference_greedy(serving_model, ids, adapter, 8, bias={target: 100.0})
    assert forced == [target] * 8


@pytest.mark.parametrize("body, param, words", [
    ({"logit_bias": {"999999": 1}}, "logit_bias", "999999"),
    ({"logit_bias": {"5": 150}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "'x'"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": "a"}, "frequency_penalty", "[-2, 2]"),
    ({"logprobs": 21}, "logprobs", "[0, 20]"),
])
def test_bad_per_row_values_are_400s_naming_the_parameter(server, body, param, words):
    response = post(server, "completions", max_tokens=2, **body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and words in error["message"]


def test_chat_logprob_flags_are_checked(server):
    for body, param in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21},
                                                                 "top_logprobs"), ({"logprobs": 3}, "logprobs")]:
        response = post(server, "chat", max_tokens=2, **body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_batched_requests_with_different_per_row_parameters_equal_one_at_a_time(server, serving_model):
    """Requests that differ in logit_bias / penalties / logprobs / echo share batches, and every answer (text and
    logprobs) equals the same request sent alone."""
    prompts = ["add plus seven three sum", PROMPT, "python function return loop", "sonnet heart night rose"]
    variants = [{}, {"logit_bias": {"11": 4.0}}, {"presence_penalty": 1.5}, {"frequency_penalty": -1.0, "logprobs": 3},
                {"logprobs": 0, "echo": True, "presence_penalty": 0.5}]
    jobs = [(p, v) for p in prompts for v in variants]

    def ask(job):
        prompt, variant = job
        return ok(post(server, "completions", prompt=prompt, max_tokens=6, temperature=0, **variant))

    alone = [ask(job) for job in jobs]
    before = httpx.get(server.url + "/stats").json()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    after = httpx.get(server.url + "/stats").json()
    assert after["max_rows"] > 1 and after["batches"] - before["batches"] < len(jobs)  # really batched
    for a, b in zip(alone, together, strict=True):
        ca, cb = a["choices"][0], b["choices"][0]
        assert ca["text"] == cb["text"] and ca["adapter"] == cb["adapter"]
        if ca["logprobs"] is None:
            assert cb["logprobs"] is None
            continue
        assert ca["logprobs"]["tokens"] == cb["logprobs"]["tokens"]
        for x, y in zip(ca["logprobs"]["token_logprobs"], cb["logprobs"]["token_logprobs"], strict=True):
            assert (x is None and y is None) or x == pytest.approx(y, abs=TOL)


# ---- refusals, no-effect fields, unknown fields, conformance -----------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
REFUSED_VALUES = {
    "chat": {"tools": TOOLS, "tool_choice": "auto", "functions": [{"name": "f", "parameters": {}}],
             "function_call": "auto", "response_format": {"type": "json_object"},
             "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
             "reasoning_effort": "low", "verbosity": "low", "web_search_options": {}, "moderation": {"model": "m"}},
    "completions": {"best_of": 2, "suffix": " end"},
}
NO_EFFECT_VALUES = {
    "chat": {"user": "u1", "safety_identifier": "s", "metadata": {"k": "v"}, "store": True, "service_tier": "auto",
             "prompt_cache_key": "k", "prompt_cache_retention": "24h", "prompt_cache_options": {},
             "prediction": {"type": "content", "content": "moon"}, "parallel_tool_calls": True,
             "modalities": ["text"], "response_format": {"type": "text"}},
    "completions": {"user": "u1", "best_of": 1, "suffix": ""},
}
VLLM_IMPLEMENTS = {"tools", "tool_choice", "functions", "function_call", "response_format"}


def effect_checks(server, serving_model, kind: str) -> dict:
    """For every implemented parameter: a check that sending it changes the answer as OpenAI defines."""
    tokenizer = serving_model.tokenizer
    greedy = ok(post(server, kind, max_tokens=8, temperature=0))
    text = text_of(kind, greedy)
    assert len(text) >= 4
    adapter = answer_adapter(greedy)
    target = next(t for t in range(5, 100) if t not in eos_ids(serving_model) and tokenizer.decode([t]).strip())
    ids = prompt_ids(serving_model, kind)

    def sampled(**body):
        return {text_of(kind, ok(post(server, kind, max_tokens=8, temperature=1.5, seed=s, **body)))
                for s in range(4)}

    def lp_key(body):
        lp = body["choices"][0]["logprobs"]
        return lp["content"] if kind == "chat" else lp["tokens"]

    checks = {
        "model": lambda: ok(post(server, kind, model="base", max_tokens=2))["model"] == "base"
        and ok(post(server, kind, model="code", max_tokens=2))["model"] == "code",
        "max_tokens": lambda: ok(post(server, kind, max_tokens=2, temperature=0))["usage"]["completion_tokens"] <= 2,
        "n": lambda: len(ok(post(server, kind, max_tokens=2, n=3))["choices"]) == 3,
        "stop": lambda: text_of(kind, ok(post(server, kind, max_tokens=8, temperature=0, stop=text[2:4])))
        == text[:text.index(text[2:4])],
        "seed": lambda: len({text_of(kind, ok(post(server, kind, max_tokens=8, temperature=1.5, seed=7)))
                             for _ in range(2)}) == 1 and len(sampled()) > 1,
        "temperature": lambda: text not in sampled() or len(sampled()) > 1,
        "top_p": lambda: sampled(top_p=1e-6) == {text},
        "stream": lambda: stream_events(server, kind, max_tokens=3)[0]["object"].endswith(
            "chunk" if kind == "chat" else "completion"),
        "stream_options": lambda: "usage" in stream_events(server, kind, max_tokens=3,
                                                           stream_options={"include_usage": True})[-1],
        "logit_bias": lambda: text_of(kind, ok(post(server, kind, max_tokens=4, temperature=0,
                                                    logit_bias={str(target): 100})))
        == tokenizer.decode([target] * 4, skip_special_tokens=True),
        "presence_penalty": lambda: text_of(kind, ok(post(server, kind, model=_model(adapter), max_tokens=8,
                                                          temperature=0, presence_penalty=2.0)))
        == tokenizer.decode(reference_greedy(serving_model, ids, adapter, 8, presence=2.0), skip_special_tokens=True),
        "frequency_penalty": lambda: text_of(kind, ok(post(server, kind, model=_model(adapter), max_tokens=8,
                                                           temperature=0, frequency_penalty=2.0)))
        == tokenizer.decode(reference_greedy(serving_model, ids, adapter, 8, frequency=2.0), skip_special_tokens=True),
    }
    if kind == "chat":
        checks |= {
            "messages": lambda: ok(post(server, kind, max_tokens=2, messages=[
                {"role": "user", "content": "a b"}]))["usage"]["prompt_tokens"] != greedy["usage"]["prompt_tokens"],
            "max_completion_tokens": lambda: ok(post(server, kind, max_completion_tokens=2, temperature=0))[
                "usage"]["completion_tokens"] <= 2,
            "logprobs": lambda: len(lp_key(ok(post(server, kind, max_tokens=3, temperature=0, logprobs=True))))
            == 3 or greedy["choices"][0]["finish_reason"] == "stop",
            "top_logprobs": lambda: all(len(e["top_logprobs"]) == 2 for e in lp_key(ok(post(
                server, kind, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)))),
        }
    else:
        checks |= {
            "prompt": lambda: ok(post(server, kind, max_tokens=2, prompt=["a b", "c d"]))["usage"]["prompt_tokens"]
            != greedy["usage"]["prompt_tokens"],
            "echo": lambda: text_of(kind, ok(post(server, kind, max_tokens=2, echo=True))).startswith(PROMPT),
            "logprobs": lambda: all(len(t) == 2 for t in ok(post(server, kind, max_tokens=3, logprobs=2))[
                "choices"][0]["logprobs"]["top_logprobs"]),
        }
    return checks


def _model(adapter: str) -> str:
    return "base" if adapter == "__base__" else adapter


def openai_parameters(kind: str) -> set[str]:
    """The parameter names of the installed openai client's request types (streaming and non-streaming)."""
    module = chat_create_params if kind == "chat" else completion_create_params
    names: set[str] = set()
    for cls in (module.CompletionCreateParamsNonStreaming, module.CompletionCreateParamsStreaming):
        names |= set(cls.__required_keys__) | set(cls.__optional_keys__)
    return names


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_conformance_no_openai_parameter_is_silently_ignored(server, serving_model, kind):
    """Every parameter of the openai client's request type is implemented (its effect is checked here), has no
    effect by definition (200, same answer, not reported as ignored), or is refused (400 naming it)."""
    params = openai_parameters(kind)
    assert {"model", "temperature", "logprobs"} <= params  # the walk found the real lists
    listed = IMPLEMENTED[kind] | set(NO_EFFECT[kind]) | set(REFUSED[kind])
    assert params - listed == set(), f"parameters in no list: {sorted(params - listed)}"
    assert listed - params == set(), f"listed but not OpenAI parameters: {sorted(listed - params)}"
    assert set(REFUSED_VALUES[kind]) == set(REFUSED[kind]) and set(NO_EFFECT_VALUES[kind]) == set(NO_EFFECT[kind])

    checks = effect_checks(server, serving_model, kind)
    assert set(checks) == IMPLEMENTED[kind]
    for name, check in checks.items():
        assert check(), f"{name}: no effect seen"

    baseline = text_of(kind, ok(post(server, kind, max_tokens=6, temperature=0)))
    for name, value in NO_EFFECT_VALUES[kind].items():
        response = post(server, kind, max_tokens=6, temperature=0, **{name: value})
        assert text_of(kind, ok(response)) == baseline and IGNORED_HEADER not in response.headers, name

    for name, value in REFUSED_VALUES[kind].items():
        response = post(server, kind, max_tokens=2, **{name: value})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == name and f"'{name}'" in error["message"], name
        assert ("--engine vllm" in error["message"]) == (name in VLLM_IMPLEMENTS), name


def test_non_text_content_parts_are_refused(server):
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                             {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    response = post(server, "chat", messages=messages, max_tokens=2)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[1].type"
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "poem rhyme "}, {"type": "text",
                                                                                           "text": "moon love"}]}]
    assert text_of("chat", ok(post(server, "chat", messages=text_parts, max_tokens=4, temperature=0))) == text_of(
        "chat", ok(post(server, "chat", max_tokens=4, temperature=0)))


def test_unknown_fields_are_answered_listed_in_a_header_and_logged_once(server, caplog):
    name = f"bogus_{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="ariadne_hf.serving.openai_params"):
        for kind in ("chat", "completions", "chat"):
            response = post(server, kind, max_tokens=2, **{name: 1, "top_k": 5})
            ok(response)
            assert response.headers[IGNORED_HEADER] == ",".join(sorted([name, "top_k"]))
    assert sum(name in record.getMessage() for record in caplog.records) == 1
    assert IGNORED_HEADER not in post(server, "chat", max_tokens=2).headers


def test_gateway_forwards_every_parameter_unchanged(serving_bundle_dir):
    """Gateway mode refuses nothing and reports nothing as ignored: the upstream engine gets the body as sent
    (only `model` rewritten), tools, image parts, response_format and unknown fields included."""
    from ariadne_hf.serving.launch import build_gateway_app

    received: list[dict] = []
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def chat(request: Request):
        received.append(await request.json())
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop",
             "logprobs": None}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    body = {"model": "poetry", "max_tokens": 3, "tools": TOOLS, "tool_choice": "auto", "logprobs": True,
            "response_format": {"type": "json_object"}, "bogus_field": 1, "top_logprobs": 30,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                      {"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    with ServerThread(upstream) as up, ServerThread(build_gateway_app(serving_bundle_dir, up.base_url)) as gateway:
        response = httpx.post(gateway.base_url + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert IGNORED_HEADER not in response.headers
    assert received == [body]
