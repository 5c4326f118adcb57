"""Routing inside vLLM's own API server: an ASGI middleware for ``vllm ... --middleware``.

Start vLLM with ``ARIADNE_BUNDLE=<bundle>`` in its environment and
``--middleware ariadne_hf.serving.vllm.AriadneRouting`` (``ariadne serve BUNDLE --engine vllm`` does both, with
``--lora-modules`` for every adapter). The middleware loads the bundle's router-only state with the loader gateway
mode uses (``routing_only.load_routing_only``: tokenizer, router tables, the input-embedding tensor; no model, no
adapter) when vLLM builds its middleware stack, then:

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` with ``"model": "auto"``: the prompt is tokenized exactly
  as the local server tokenizes it (``engine.request_prompts``: chat through the bundle's chat template, completions
  with special tokens; token-id prompts are routed as given), routed (``engine.route_id_lists``, so the bundle's
  rejection settings apply: a rejected prompt goes to the base model), ``model`` is rewritten to the adapter's served
  name (``ARIADNE_MODEL_TEMPLATE``, default ``{adapter}``; the base model: ``ARIADNE_BASE_MODEL``, default ``base``)
  and the response carries ``x-ariadne-adapter`` (and ``x-ariadne-route-ms``, the routing time). Every other field
  of the body is forwarded as received (re-serialized JSON, engine-specific fields included).
- A multi-prompt completion whose prompts route to different adapters is a 400 naming the fix (gateway mode, or one
  prompt per request): vLLM serves one LoRA per request, so answering would silently use a wrong adapter.
- ``GET /v1/models`` lists ``auto`` in addition to vLLM's models.
- Every other request (including those naming a model) passes through untouched, body and response.

Routing runs on vLLM's event loop (a few milliseconds of tokenization and one embedding-table lookup per request);
the per-request routing time is measured by ``benchmarks/bench_serve.py``.
"""

from __future__ import annotations

import json
import os
import time

from .engine import request_prompts, route_id_lists
from .prompts import pad_id_of, text_ids
from .protocol import ADAPTER_HEADER, AUTO_MODEL, ChatMessage, ChatRequest, OpenAIError, public_name

BUNDLE_ENV = "ARIADNE_BUNDLE"
TEMPLATE_ENV = "ARIADNE_MODEL_TEMPLATE"
BASE_ENV = "ARIADNE_BASE_MODEL"
REVISION_ENV = "ARIADNE_REVISION"
ROUTED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
TIMING_HEADER = "x-ariadne-route-ms"


class AriadneRouting:
    """ASGI middleware (see the module docstring). ``router`` may be given directly (tests); else it is loaded from
    ``$ARIADNE_BUNDLE`` with ``load_routing_only``."""

    def __init__(self, app, router=None, *, model_template: str | None = None, base_model: str | None = None):
        self.app = app
        if router is None:
            bundle = os.environ.get(BUNDLE_ENV)
            if not bundle:
                raise RuntimeError(f"ariadne_hf.serving.vllm.AriadneRouting needs the bundle to route with: set "
                                   f"{BUNDLE_ENV}=<bundle folder or Hub id> in vLLM's environment (`ariadne serve "
                                   "BUNDLE --engine vllm` sets it).")
            from .routing_only import load_routing_only

            router = load_routing_only(bundle, revision=os.environ.get(REVISION_ENV) or None)
        self.router, self.tokenizer = router, router.tokenizer
        self.pad_id = pad_id_of(self.tokenizer)
        self.template = model_template or os.environ.get(TEMPLATE_ENV) or "{adapter}"
        if "{adapter}" not in self.template:
            raise ValueError(f"{TEMPLATE_ENV}={self.template!r} must contain '{{adapter}}'.")
        self.base_model = base_model if base_model is not None else os.environ.get(BASE_ENV, "base")

    def served_name(self, adapter: str) -> str:
        return self.base_model if adapter == "__base__" else self.template.format(adapter=adapter)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "POST" and path in ROUTED_PATHS:
            return await self._routed(ROUTED_PATHS[path], scope, receive, send)
        if method == "GET" and path == "/v1/models":
            return await self._models(scope, receive, send)
        return await self.app(scope, receive, send)

    # ---- POST completions / chat ----------------------------------------------------------------------------
    async def _routed(self, kind: str, scope, receive, send):
        body, more = await _read_body(receive)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("model") != AUTO_MODEL:
            return await self.app(scope, _replay(body, more, receive), send)  # not ours: untouched
        started = time.perf_counter()
        try:
            adapter = self.route(kind, data)
        except OpenAIError as err:
            return await _send_json(send, err.status, err.body())
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        new_body = json.dumps({**data, "model": self.served_name(adapter)}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_body)).encode()))
        extra = [(ADAPTER_HEADER.encode(), public_name(adapter).encode()),
                 (TIMING_HEADER.encode(), f"{elapsed_ms:.3f}".encode())]

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return await self.app({**scope, "headers": headers}, _replay(new_body, more, receive), send_with_header)

    def route(self, kind: str, data: dict) -> str:
        """The adapter (or ``__base__``) a ``model: "auto"`` request goes to; OpenAIError 400 when it cannot be
        routed to one adapter."""
        prompts = self._prompt_ids(kind, data)
        adapters = list(dict.fromkeys(info.adapter for info in route_id_lists(self.router, prompts, self.pad_id)))
        if len(adapters) > 1:
            raise OpenAIError(400, "These prompts route to different adapters ("
                                   f"{', '.join(map(public_name, adapters))}), and vLLM serves one adapter per "
                                   "request. Send one prompt per request, or use gateway mode (`ariadne serve BUNDLE "
                                   "--upstream URL`), which splits a request over adapters.",
                              param="prompt", code="prompts_route_to_different_adapters")
        return adapters[0]

    def _prompt_ids(self, kind: str, data: dict) -> list[list[int]]:
        """Token ids of each prompt, as the local server builds them (engine.request_prompts)."""
        if kind == "chat":
            messages = data.get("messages")
            if not isinstance(messages, list) or not messages:
                raise OpenAIError(400, "'messages' must be a non-empty list of chat messages.", param="messages")
            try:
                parsed = [ChatMessage.model_validate(m) for m in messages]
            except ValueError as err:
                raise OpenAIError(400, f"Cannot route these messages: {err}. Routing reads text content only; "
                                       "name the model to send other content.", param="messages") from err
            return request_prompts("chat", ChatRequest.model_construct(messages=parsed), self.tokenizer)
        prompt = data.get("prompt")
        if isinstance(prompt, str):
            return [text_ids(self.tokenizer, prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]  # one prompt given as token ids
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [text_ids(self.tokenizer, p) for p in prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and
                                                       all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
        raise OpenAIError(400, "'prompt' must be a string, a non-empty list of strings, or token ids to be routed.",
                          param="prompt")

    # ---- GET /v1/models ---------------------------------------------------------------------------------------
    async def _models(self, scope, receive, send):
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                if start.get("status") == 200:
                    body = self._with_auto(body)
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, capture)

    def _with_auto(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list) or any(m.get("id") == AUTO_MODEL for m in models if isinstance(m, dict)):
            return body
        entry = {"id": AUTO_MODEL, "object": "model", "created": int(time.time()), "owned_by": "ariadne",
                 "root": AUTO_MODEL, "parent": None}
        return json.dumps({**data, "data": [entry, *models]}).encode()


async def _read_body(receive) -> tuple[bytes, bool]:
    """The whole request body; (body, False) normally, (partial body, True) if the client disconnected."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, disconnected: bool, receive):
    """A `receive` that yields `body` once, then defers to the real one (disconnect notifications)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            if disconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
