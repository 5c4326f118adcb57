"""The OpenAI-compatible HTTP API (FastAPI), shared by all serving modes.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/route, GET /stats.
The app talks to a *backend* (local engine, gateway, or Ray ingress) through four async methods: `start`, `stop`,
`route(texts) -> [RouteInfo]`, `complete(kind, request, raw_body) -> Response`, plus `adapter_names` and `stats()`.

Guarantees: a malformed body, an unknown model or an over-long prompt is answered with a 4xx OpenAI-style error
before any work is queued; any unexpected exception becomes a 500 of the same shape and the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import LocalEngine, model_ids
from .protocol import (
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    RouteRequest,
    error_body,
    public_name,
    validation_message,
)

logger = logging.getLogger(__name__)


def _finite(value):
    return None if value is None or not math.isfinite(value) else value


async def parse_body(request: Request, schema):
    """(validated model, raw dict) of a JSON body; OpenAIError 400 naming the problem otherwise."""
    try:
        raw = json.loads(await request.body())
    except ValueError as err:
        raise OpenAIError(400, f"The request body is not valid JSON ({err}).", code="invalid_json") from err
    if not isinstance(raw, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(raw), raw
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise OpenAIError(400, message, param=param, code="invalid_value") from err


def create_app(backend, *, title: str = "ariadne serve") -> FastAPI:
    """The FastAPI app over `backend`; the backend is started and stopped with the app's lifespan.

    Every error leaves as an OpenAI-style body (`_install_error_handlers`); the routes are `_install_routes`."""

    @asynccontextmanager
    async def lifespan(app):
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.backend = backend
    _install_error_handlers(app)
    _install_routes(app, backend)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with an OpenAI error body: OpenAIError with its own status, a request FastAPI could not
    validate 400, Starlette's HTTP errors (404 unknown path, 405 wrong method) with their status naming the method
    and path, and any other exception 500 (logged; the server keeps serving)."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        message, param = validation_message(list(err.errors()))
        return JSONResponse(error_body(message, code="invalid_value", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{err.detail}: {request.method} {request.url.path}", kind),
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"Internal error: {type(err).__name__}: {err}", "server_error",
                                       "internal_error"), status_code=500)


def _install_routes(app: FastAPI, backend) -> None:
    """The API's routes over `backend` (module docstring); a POST body is validated by `parse_body` against its
    protocol.py schema before the backend sees it. Adding an endpoint: its schema in protocol.py, its route here."""

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return backend.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "ariadne"}
                                           for m in model_ids(backend.adapter_names)]}

    @app.post("/v1/route")
    async def route(request: Request):
        req, _ = await parse_body(request, RouteRequest)
        infos = await backend.route(req.texts())
        return {"object": "list", "data": [{"adapter": public_name(i.adapter), "score": _finite(i.score),
                                            "margin": _finite(i.margin)} for i in infos]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req, raw = await parse_body(request, ChatRequest)
        return await backend.complete("chat", req, raw)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req, raw = await parse_body(request, CompletionRequest)
        return await backend.complete("completions", req, raw)


class LocalBackend:
    """`ariadne serve BUNDLE`: the bundle loaded in this process, requests batched by the LocalEngine."""

    def __init__(self, model, *, max_batch_size: int = 16, max_wait_ms: float = 10.0, default_max_tokens: int = 256):
        self.model, self.options = model, dict(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                               default_max_tokens=default_max_tokens)
        self.adapter_names = list(model.adapter_names)
        self.engine: LocalEngine | None = None

    async def start(self) -> None:
        self.engine = LocalEngine(self.model, **self.options)
        self.engine.start()

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()

    def stats(self) -> dict:
        return {"mode": "local", **self.engine.batcher.stats}

    async def route(self, texts):
        return self.engine.route(texts)

    async def complete(self, kind: str, req, raw: dict) -> Response:
        prepared = self.engine.prepare(kind, req)
        if req.stream:
            return StreamingResponse(self.engine.stream(prepared), media_type="text/event-stream",
                                     headers=prepared.headers)
        return JSONResponse(await self.engine.collect(prepared), headers=prepared.headers)
