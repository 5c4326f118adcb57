"""Which OpenAI request parameters the local engine implements, which have no effect by definition, which it refuses.

Guarantees (local and Ray modes; gateway mode and the vLLM middleware forward bodies unchanged and never call this):
- every parameter of OpenAI's chat and completions requests is IMPLEMENTED, or has NO_EFFECT by definition, or is
  REFUSED; a few (response_format, modalities, best_of, suffix) have no effect with their default value and are
  refused with any other (tests/serving/test_serving_openai_params.py walks the installed `openai` package's request types
  to enforce it);
- a refused parameter (with a value that would change the output) is answered with a 400 whose message names the
  parameter and the way out, before anything is queued;
- a field outside the three lists (an engine-specific extra, a typo) is accepted, named in the response header
  `x-ariadne-ignored`, and logged once per field name per process;
- per-row values (logit_bias, penalties, logprobs, echo) are range-checked here and become a `RowOptions`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .protocol import OpenAIError

logger = logging.getLogger(__name__)

IGNORED_HEADER = "x-ariadne-ignored"
MAX_TOP_LOGPROBS = 20
"""Largest `top_logprobs` (chat) / `logprobs` (completions) accepted: OpenAI's chat limit (vLLM's default too)."""
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0

VLLM_WAY_OUT = ("serve the bundle with `ariadne serve BUNDLE --engine vllm`, or run `ariadne serve BUNDLE "
                "--upstream URL` (gateway mode) in front of a vLLM server, which implements it")

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
           "logit_bias", "presence_penalty", "frequency_penalty", "logprobs"}
IMPLEMENTED = {
    "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
    "completions": _COMMON | {"prompt", "echo"},
}
"""Parameters with their OpenAI meaning (tests in test_serving.py / test_serving_openai_params.py show each effect)."""

NO_EFFECT = {
    "chat": {
        "user": "an end-user id for the provider's abuse monitoring",
        "safety_identifier": "an end-user id for the provider's abuse monitoring",
        "metadata": "tags stored with the completion by the provider",
        "store": "asks the provider to store the completion; nothing is stored here",
        "service_tier": "the provider's billing/latency tier",
        "prompt_cache_key": "a cache-routing hint; outputs do not depend on caching",
        "prompt_cache_retention": "a cache-retention hint; outputs do not depend on caching",
        "prompt_cache_options": "cache options; outputs do not depend on caching",
        "prediction": "predicted outputs only speed decoding up; the output is the same by definition",
        "parallel_tool_calls": "only meaningful with `tools`, which are refused",
        "modalities": "accepted when it is [\"text\"] (the only output modality)",
        "response_format": "accepted when its type is \"text\" (the default)",
    },
    "completions": {
        "user": "an end-user id for the provider's abuse monitoring",
        "best_of": "accepted when it is 1 (or equal to n with n=1): one sample per choice",
        "suffix": "accepted when empty",
    },
}
"""Fields accepted because they cannot change the output (some only with their default value: see REFUSED)."""

REFUSED = {
    "chat": {
        "tools": "tool calls are not implemented by the local engine; " + VLLM_WAY_OUT
                 + " (with --enable-auto-tool-choice and a --tool-call-parser)",
        "tool_choice": "tool calls are not implemented by the local engine; " + VLLM_WAY_OUT
                       + " (with --enable-auto-tool-choice and a --tool-call-parser)",
        "functions": "the deprecated function calling is not implemented (nor are `tools`); " + VLLM_WAY_OUT,
        "function_call": "the deprecated function calling is not implemented (nor are `tools`); " + VLLM_WAY_OUT,
        "response_format": "only {\"type\": \"text\"} is implemented by the local engine (no constrained "
                           "decoding); for JSON output " + VLLM_WAY_OUT + " (structured outputs)",
        "audio": "audio output is not supported (text-only models)",
        "modalities": "only [\"text\"] output is supported (text-only models)",
        "reasoning_effort": "the bundle's backbone is not a reasoning model with an effort setting; drop it",
        "verbosity": "no verbosity control exists for these models; drop it or ask for brevity in the prompt",
        "web_search_options": "web search is not available; drop it",
        "moderation": "no moderation model runs here; moderate outputs in your application",
    },
    "completions": {
        "best_of": "best_of > 1 is not implemented; request n choices with logprobs and pick the best yourself",
        "suffix": "suffix (insertion) is not supported by these models (vLLM refuses it too); drop it",
    },
}
"""Parameters answered with a 400 (naming the parameter and the reason / way out) when their value matters."""

_logged: set[str] = set()


@dataclass(frozen=True)
class RowOptions:
    """Per-row decoding options; rows with different options still share a generate call.

    logit_bias: ((token id, bias), ...) added to the logits; penalties: OpenAI's presence/frequency penalties over
    the row's generated tokens; logprobs: None (off) or the number of top alternatives per token (0 = only the
    chosen token's); echo: the prompt is returned before the completion (with its logprobs when logprobs is set).
    """

    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    echo: bool = False

    @property
    def processes_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _fields_set(req) -> dict:
    """Every field the client sent (declared ones and extras), with its value."""
    sent = {name: getattr(req, name) for name in req.model_fields_set if name in type(req).model_fields}
    sent.update(req.model_extra or {})
    return sent


def _refuse(param: str, kind: str, detail: str | None = None) -> OpenAIError:
    reason = REFUSED[kind][param]
    return OpenAIError(400, f"The parameter '{param}' is not supported by this server{detail or ''}: {reason}.",
                       param=param, code="unsupported_parameter")


def _number(sent: dict, name: str, low: float, high: float) -> float:
    value = sent.get(name)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise OpenAIError(400, f"Invalid value for '{name}': {value!r}; expected a number in [{low:g}, {high:g}].",
                          param=name, code="invalid_value")
    return float(value)


def _logit_bias(sent: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = sent.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise OpenAIError(400, "Invalid value for 'logit_bias': expected an object mapping token ids to biases.",
                          param="logit_bias", code="invalid_value")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = None
        if token is None or str(token) != str(key).strip():
            raise OpenAIError(400, f"Invalid key in 'logit_bias': {key!r} is not a token id (use integer token ids "
                                   "of the bundle's tokenizer).", param="logit_bias", code="invalid_value")
        if not 0 <= token < vocab_size:
            raise OpenAIError(400, f"Invalid key in 'logit_bias': token id {token} is out of range; the vocabulary "
                                   f"has ids 0..{vocab_size - 1}.", param="logit_bias", code="invalid_value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > MAX_LOGIT_BIAS:
            raise OpenAIError(400, f"Invalid value in 'logit_bias' for token id {token}: {value!r}; expected a "
                                   f"number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}].",
                              param="logit_bias", code="invalid_value")
        out[token] = float(value)
    return tuple(sorted(out.items()))


def _logprobs(kind: str, sent: dict) -> int | None:
    if kind == "chat":
        enabled, top = sent.get("logprobs"), sent.get("top_logprobs")
        if enabled is not None and not isinstance(enabled, bool):
            raise OpenAIError(400, f"Invalid value for 'logprobs': {enabled!r}; expected true or false (chat).",
                              param="logprobs", code="invalid_value")
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise OpenAIError(400, f"Invalid value for 'top_logprobs': {top!r}; expected an integer in "
                                       f"[0, {MAX_TOP_LOGPROBS}].", param="top_logprobs", code="invalid_value")
            if not enabled:
                raise OpenAIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs",
                                  code="invalid_value")
        return (top or 0) if enabled else None
    count = sent.get("logprobs")
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TOP_LOGPROBS:
        raise OpenAIError(400, f"Invalid value for 'logprobs': {count!r}; expected an integer in "
                               f"[0, {MAX_TOP_LOGPROBS}] (completions: the number of top alternatives).",
                          param="logprobs", code="invalid_value")
    return count


def _check_refused(kind: str, sent: dict, req) -> None:
    for name in REFUSED[kind]:
        value = sent.get(name)
        if value is None:
            continue
        if name == "response_format" and isinstance(value, dict) and value.get("type", "text") == "text":
            continue
        if name == "modalities" and list(value) in ([], ["text"]):
            continue
        if name == "best_of" and value == 1:
            continue
        if name == "suffix" and value == "":
            continue
        if name in ("tools", "functions") and value == []:
            continue
        if name in ("tool_choice", "function_call") and value == "none":
            continue
        raise _refuse(name, kind)
    if kind == "chat":
        for i, message in enumerate(req.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                if part.type != "text":
                    raise OpenAIError(
                        400, f"The content part messages[{i}].content[{j}] has type '{part.type}': only text parts "
                             "are supported (the bundle's backbone is a text model).",
                        param=f"messages[{i}].content[{j}].type", code="unsupported_parameter")


def row_options(kind: str, req, vocab_size: int) -> tuple[RowOptions, list[str]]:
    """(the request's per-row options, the sent fields outside every list) — OpenAIError 400 for a refused
    parameter or a bad value. Logs each unknown field name once per process."""
    sent = _fields_set(req)
    _check_refused(kind, sent, req)
    options = RowOptions(
        logit_bias=_logit_bias(sent, vocab_size),
        presence_penalty=_number(sent, "presence_penalty", -MAX_PENALTY, MAX_PENALTY),
        frequency_penalty=_number(sent, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY),
        logprobs=_logprobs(kind, sent),
        echo=bool(sent.get("echo")) if kind == "completions" else False,
    )
    return options, ignored_fields(kind, req)


def ignored_fields(kind: str, req) -> list[str]:
    """The sent fields outside IMPLEMENTED, NO_EFFECT and REFUSED (sorted); each name is logged once per process."""
    known = IMPLEMENTED[kind] | set(NO_EFFECT[kind]) | set(REFUSED[kind])
    ignored = sorted(name for name in _fields_set(req) if name not in known)
    for name in ignored:
        if name not in _logged:
            _logged.add(name)
            logger.warning("request field %r is not an OpenAI parameter this server knows: ignored (it is listed in "
                           "the %s response header)", name, IGNORED_HEADER)
    return ignored
