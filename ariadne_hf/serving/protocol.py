"""OpenAI wire format: request schemas (validation), error bodies, and response / stream-chunk builders.

Guarantees: every error the server returns has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``
with a message that names the problem; request bodies are validated here before any work is queued, so a
malformed request never reaches the batcher.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

AUTO_MODEL = "auto"
"""Model id that asks the router to pick the adapter."""
BASE_MODEL = "base"
"""Model id of the plain backbone (no adapter); routed rows that go to ``"__base__"`` answer as this."""
ADAPTER_HEADER = "x-ariadne-adapter"
MAX_STOP_SEQUENCES = 4
MAX_N = 16


class OpenAIError(Exception):
    """An error to return as an OpenAI-style body with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    """Fields common to /v1/completions and /v1/chat/completions. Other fields are accepted by the parser (gateway
    mode forwards them); the local engine decides what they mean (openai_params.py)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions. `prompt` is a string or a list of strings (one choice block per prompt)."""

    prompt: str | list[str]
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: prompt logprobs only

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    """A content part; only text parts have a meaning locally (others are refused by openai_params.py, and
    forwarded unchanged in gateway mode)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(_Request):
    """POST /v1/chat/completions (text content only)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def as_template_messages(self) -> list[dict]:
        """Messages for the chat template: role (developer -> system), text content, and the message's other
        fields (name, tool_calls, tool_call_id, ...) unchanged, for templates that use them."""
        return [{**(m.model_extra or {}), "role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class RouteRequest(BaseModel):
    """POST /v1/route: routing only."""

    input: str | list[str]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message (and the offending parameter) from pydantic/FastAPI validation errors."""
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))}).", None
    where = f"'{param}'" if param else "the request body"
    return f"Invalid value for {where}: {first.get('msg')}.", param


# ---- responses --------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def public_name(adapter: str) -> str:
    """The model id a row answered as: the adapter name, or ``base`` for the plain backbone."""
    return BASE_MODEL if adapter == "__base__" else adapter


def response_model_name(adapters: list[str]) -> str:
    """The `model` field of a response: the adapter that answered (comma-joined if prompts went to several)."""
    names = list(dict.fromkeys(public_name(a) for a in adapters))
    return ",".join(names)


def completion_body(kind: str, request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    """choices: [{"index", "text", "finish_reason", "adapter", optional "logprobs"}] -> the OpenAI response object
    of `kind`."""
    created = int(time.time())
    if kind == "chat":
        out = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs"), "adapter": c["adapter"]}
               for c in choices]
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": out, "usage": usage_}
    out = [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs"),
            "adapter": c["adapter"]} for c in choices]
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": out, "usage": usage_}


def chunk_body(kind: str, request_id: str, model: str, index: int, text: str | None,
               finish_reason: str | None, *, first: bool = False, usage_: dict | None = None,
               logprobs: dict | None = None) -> dict:
    """One streamed event. Chat: `delta` (role on the first chunk); completions: `text`."""
    created = int(time.time())
    if kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choices = [] if usage_ is not None else [
            {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}
    else:
        choices = [] if usage_ is not None else [
            {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}]
        body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(data: dict | str) -> bytes:
    """One server-sent event line pair."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
