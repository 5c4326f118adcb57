"""Gateway mode: route each request here, generate on an OpenAI-compatible engine (vLLM, SGLang, LoRAX, ...).

Only what routing needs is loaded (routing_only.py). Each request is tokenized with the bundle's tokenizer exactly as
the local server tokenizes it (chat requests through the chat template), routed, and forwarded with its `model` set
from a template: `{adapter}` (default; vLLM `--lora-modules NAME=PATH`), `BASE_ID:{adapter}` (SGLang
`--lora-paths NAME=PATH`), `org/{adapter}` or a path (LoRAX: the adapter id). Rows routed to the plain backbone
(and `model: "base"`) go to `upstream_base_model` (vLLM/SGLang: the served base model id; LoRAX: "").

Guarantees: the body is forwarded as received (unknown engine-specific fields included) with only `model`
replaced; upstream errors are passed through with their status; an unreachable upstream is a 502 OpenAI-style error;
responses (and each streamed event) carry `model` = the adapter that answered and the `x-ariadne-adapter` header;
a client that disconnects mid-stream closes the upstream stream (the upstream sees the disconnect).
"""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .engine import forced_adapter, request_prompts, route_id_lists
from .prompts import pad_id_of, text_ids
from .protocol import ADAPTER_HEADER, OpenAIError, public_name, response_model_name

PATHS = {"chat": "chat/completions", "completions": "completions"}


class GatewayBackend:
    """Backend of create_app for gateway mode (see the module docstring)."""

    def __init__(self, router, upstream: str, *, model_template: str = "{adapter}", base_model: str = "base",
                 api_key: str | None = None, timeout: float = 600.0):
        if "{adapter}" not in model_template:
            raise ValueError(f"--upstream-model template {model_template!r} must contain '{{adapter}}', e.g. "
                             "'{adapter}' (vLLM), 'BASE_MODEL_ID:{adapter}' (SGLang), 'org/{adapter}' (LoRAX).")
        model_template.format(adapter="x")  # fails early on other placeholders
        if not upstream.startswith(("http://", "https://")):
            raise ValueError(f"--upstream must be an http(s) base URL such as http://127.0.0.1:8001/v1, got {upstream!r}.")
        self.router, self.tokenizer = router, router.tokenizer
        self.adapter_names = list(router.adapter_names)
        self.upstream, self.template, self.base_model = upstream.rstrip("/") + "/", model_template, base_model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.pad_id = pad_id_of(self.tokenizer)
        self.client: httpx.AsyncClient | None = None
        self.counts = {"requests": 0, "upstream_calls": 0, "upstream_errors": 0}

    async def start(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.upstream, headers=self.headers,
                                        timeout=httpx.Timeout(self.timeout, connect=10.0))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def stats(self) -> dict:
        return {"mode": "gateway", "upstream": self.upstream, **self.counts}

    def upstream_model(self, adapter: str) -> str:
        return self.base_model if adapter == "__base__" else self.template.format(adapter=adapter)

    async def route(self, texts):
        return route_id_lists(self.router, [text_ids(self.tokenizer, t) for t in texts], self.pad_id)

    async def complete(self, kind: str, req, raw: dict) -> Response:
        self.counts["requests"] += 1
        forced = forced_adapter(req.model, self.adapter_names)
        count = 1 if kind == "chat" else len(req.prompts())
        if forced is not None:
            adapters = [forced] * count
        else:
            prompts = request_prompts(kind, req, self.tokenizer)
            adapters = [info.adapter for info in route_id_lists(self.router, prompts, self.pad_id)]
        groups: dict[str, list[int]] = {}
        for position, adapter in enumerate(adapters):
            groups.setdefault(adapter, []).append(position)
        if len(groups) == 1:
            body = {**raw, "model": self.upstream_model(adapters[0])}
            if req.stream:
                return await self._stream(kind, body, adapters[0])
            status, data = await self._post(kind, body)
            if status != 200:
                return JSONResponse(data, status_code=status, headers={ADAPTER_HEADER: public_name(adapters[0])})
            data["model"] = public_name(adapters[0])
            return JSONResponse(data, headers={ADAPTER_HEADER: data["model"]})
        if req.stream:
            raise OpenAIError(400, "Gateway mode streams one prompt per request; these prompts route to different "
                                   f"adapters ({', '.join(map(public_name, groups))}). Send them separately.",
                              param="prompt", code="unsupported_stream")
        return await self._fan_out(kind, req, raw, groups)

    async def _post(self, kind: str, body: dict) -> tuple[int, dict]:
        self.counts["upstream_calls"] += 1
        try:
            response = await self.client.post(PATHS[kind], json=body)
        except httpx.HTTPError as err:
            self.counts["upstream_errors"] += 1
            raise OpenAIError(502, f"The upstream engine {self.upstream} did not answer ({type(err).__name__}: "
                                   f"{err}).", type="upstream_error", code="upstream_unreachable") from err
        try:
            data = response.json()
        except ValueError:
            data = {"error": {"message": response.text[:500], "type": "upstream_error", "param": None,
                              "code": str(response.status_code)}}
        if response.status_code != 200:
            self.counts["upstream_errors"] += 1
        return response.status_code, data

    async def _fan_out(self, kind: str, req, raw: dict, groups: dict[str, list[int]]) -> Response:
        """A multi-prompt completion whose prompts route to several adapters: one upstream call per adapter."""
        prompts, n = req.prompts(), req.n
        names = list(groups)
        results = await asyncio.gather(*(
            self._post(kind, {**raw, "model": self.upstream_model(a), "prompt": [prompts[p] for p in groups[a]]})
            for a in names))
        for status, data in results:
            if status != 200:
                return JSONResponse(data, status_code=status)
        choices, totals = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for adapter, (_, data) in zip(names, results, strict=True):
            for choice in data.get("choices", []):
                position, j = divmod(int(choice.get("index", 0)), n)
                choices.append({**choice, "index": groups[adapter][position] * n + j, "adapter": public_name(adapter)})
            for key in totals:
                totals[key] += int((data.get("usage") or {}).get(key, 0))
        first = results[0][1]
        model = response_model_name([a for a in names])
        body = {**first, "model": model, "choices": sorted(choices, key=lambda c: c["index"]), "usage": totals}
        return JSONResponse(body, headers={ADAPTER_HEADER: model})

    async def _stream(self, kind: str, body: dict, adapter: str) -> Response:
        self.counts["upstream_calls"] += 1
        name = public_name(adapter)
        try:
            response = await self.client.send(self.client.build_request("POST", PATHS[kind], json=body), stream=True)
        except httpx.HTTPError as err:
            self.counts["upstream_errors"] += 1
            raise OpenAIError(502, f"The upstream engine {self.upstream} did not answer ({type(err).__name__}: "
                                   f"{err}).", type="upstream_error", code="upstream_unreachable") from err
        if response.status_code != 200:
            self.counts["upstream_errors"] += 1
            content = await response.aread()
            await response.aclose()
            return Response(content, status_code=response.status_code, headers={ADAPTER_HEADER: name},
                            media_type=response.headers.get("content-type", "application/json"))

        async def relay():
            try:
                async for line in response.aiter_lines():
                    yield (_rename(line, name) + "\n").encode()
            finally:
                await response.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream", headers={ADAPTER_HEADER: name})


def _rename(line: str, model: str) -> str:
    """An SSE line with the JSON event's `model` replaced (other lines unchanged)."""
    if not line.startswith("data:"):
        return line
    payload = line[5:].strip()
    if not payload.startswith("{"):
        return line
    try:
        event = json.loads(payload)
    except ValueError:
        return line
    if "model" in event:
        event["model"] = model
    return "data: " + json.dumps(event, separators=(",", ":"))
