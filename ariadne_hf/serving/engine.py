"""The local engine: OpenAI requests -> routed, tokenized rows -> the dynamic batcher -> OpenAI responses.

Shared by `ariadne serve BUNDLE` (app.py) and the generation replicas of Ray mode (ray_app.py). Requests are
validated, tokenized and routed here, in the handler, before anything is queued (routing is one embedding lookup,
well under a millisecond), so the adapter that answers is known before the first streamed byte and is sent as the
`x-ariadne-adapter` header. OpenAI parameters are checked here too (openai_params.py: implemented, no effect by
definition, or refused with a 400); fields outside those lists are named in the `x-ariadne-ignored` header.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .batcher import BASE, DynamicBatcher, Job, Row, Sampling
from .openai_params import IGNORED_HEADER, row_options
from .prompts import chat_ids, check_length, context_length, pad_id_of, pad_left, text_ids
from .protocol import (
    ADAPTER_HEADER,
    AUTO_MODEL,
    BASE_MODEL,
    SSE_DONE,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    chunk_body,
    completion_body,
    new_id,
    public_name,
    response_model_name,
    sse,
    usage,
)
from .sampling import chat_logprobs, completion_logprobs

DEFAULT_COMPLETION_TOKENS = 16
"""max_tokens of /v1/completions when omitted (OpenAI's default)."""


@dataclass
class RouteInfo:
    adapter: str  # "__base__" for the plain backbone
    score: float | None
    margin: float | None


def route_id_lists(router, id_lists: list[list[int]], pad_id: int) -> list[RouteInfo]:
    """Route token-id lists with anything that has `route(input_ids=, attention_mask=)` -> RoutingDecision
    (an AriadneRoutedModel, or the gateway's RoutingOnlyModel)."""
    input_ids, attention_mask = pad_left(id_lists, pad_id)  # [B, T]
    decision = router.route(input_ids=input_ids, attention_mask=attention_mask)
    infos = []
    for i, name in enumerate(decision.adapter_names):
        score = float(decision.scores[i].max()) if decision.scores.shape[1] else None
        infos.append(RouteInfo(name, score, float(decision.margins[i])))
    return infos


def model_ids(adapter_names: list[str]) -> list[str]:
    return [AUTO_MODEL, BASE_MODEL, *adapter_names]


def forced_adapter(model: str, adapter_names: list[str]) -> str | None:
    """The adapter a request's `model` forces (None = route it); 404 for an unknown model id."""
    if model == AUTO_MODEL:
        return None
    if model == BASE_MODEL:
        return BASE
    if model in adapter_names:
        return model
    raise OpenAIError(404, f"The model '{model}' does not exist. Available models: "
                           f"{', '.join(model_ids(adapter_names))} (GET /v1/models).",
                      code="model_not_found", param="model")


def request_prompts(kind: str, req, tokenizer) -> list[list[int]]:
    """Token ids of each prompt of a request (one for chat, one per string for completions)."""
    if kind == "chat":
        return [chat_ids(tokenizer, req.as_template_messages())]
    return [text_ids(tokenizer, p) for p in req.prompts()]


@dataclass
class Prepared:
    kind: str
    request_id: str
    job: Job
    prompt_tokens: int
    include_usage: bool
    ignored: list[str]

    @property
    def model_name(self) -> str:
        return response_model_name([r.adapter for r in self.job.rows])

    @property
    def headers(self) -> dict:
        return {ADAPTER_HEADER: self.model_name, **({IGNORED_HEADER: ",".join(self.ignored)} if self.ignored else {})}


class LocalEngine:
    """A loaded AriadneRoutedModel behind a DynamicBatcher. Create and use inside one running asyncio loop."""

    def __init__(self, model, *, max_batch_size: int = 16, max_wait_ms: float = 10.0,
                 default_max_tokens: int = 256):
        self.model, self.tokenizer = model, model.tokenizer
        if self.tokenizer is None:
            raise ValueError("The bundle has no tokenizer; a server needs one to read prompts.")
        self.adapter_names = list(model.adapter_names)
        self.context = context_length(model.backbone.config, self.tokenizer)
        self.default_max_tokens = default_max_tokens
        self.pad_id = pad_id_of(self.tokenizer, model.generation_config)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]  # the logits' width (logit_bias ids)
        self.batcher = DynamicBatcher(model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    def route(self, texts: list[str]) -> list[RouteInfo]:
        return route_id_lists(self.model, [text_ids(self.tokenizer, t) for t in texts], self.pad_id)

    def prepare(self, kind: str, req: ChatRequest | CompletionRequest) -> Prepared:
        """Validate, tokenize, route and queue a request (errors raise OpenAIError before anything is queued)."""
        forced = forced_adapter(req.model, self.adapter_names)
        options, ignored = row_options(kind, req, self.vocab_size)
        prompts = request_prompts(kind, req, self.tokenizer)
        limit = req.limit() if kind == "chat" else req.max_tokens
        if limit == 0 and not options.echo:
            raise OpenAIError(400, "max_tokens 0 generates nothing: use it with echo (prompt logprobs) or ask for "
                                   "at least 1 token.", param="max_tokens", code="invalid_value")
        budgets = [limit if limit is not None else (
            DEFAULT_COMPLETION_TOKENS if kind == "completions"
            else max(1, min(self.default_max_tokens, self.context - len(ids)))) for ids in prompts]
        for ids, budget in zip(prompts, budgets, strict=True):
            check_length(len(ids), budget, self.context)
        routes = (route_id_lists(self.model, prompts, self.pad_id) if forced is None
                  else [RouteInfo(forced, None, None)] * len(prompts))
        texts = req.prompts() if kind == "completions" else [""]
        rows = [Row(ids, info.adapter, budget, req.stop_list(), index=p * req.n + j, score=info.score,
                    margin=info.margin, options=options, echo_text=texts[p] if options.echo else "")
                for p, (ids, budget, info) in enumerate(zip(prompts, budgets, routes, strict=True))
                for j in range(req.n)]
        sampling = Sampling.resolve(req.temperature, req.top_p, req.seed, self.model.generation_config)
        job = Job(rows, sampling, asyncio.get_running_loop())
        self.batcher.submit(job)
        return Prepared(kind, new_id("chatcmpl" if kind == "chat" else "cmpl"), job,
                        sum(len(p) for p in prompts), req.include_usage(), ignored)

    def _logprobs(self, kind: str, row: Row, entries) -> dict | None:
        """A row's logprobs object in the response shape of `kind` (None when the request did not ask)."""
        if row.options.logprobs is None or entries is None:
            return None
        return chat_logprobs(self.tokenizer, entries) if kind == "chat" else completion_logprobs(self.tokenizer,
                                                                                                 entries)

    async def collect(self, prepared: Prepared) -> dict:
        """Wait for a non-streamed request and return its OpenAI response body."""
        job = prepared.job
        try:
            while True:
                kind, _, payload = await job.queue.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    break
        except BaseException:
            job.cancel()
            raise
        choices = [{"index": r.index, "text": r.echo_text + r.text, "finish_reason": r.finish_reason,
                    "adapter": public_name(r.adapter),
                    "logprobs": self._logprobs(prepared.kind, r, r.prompt_logprobs + r.logprobs)} for r in job.rows]
        tokens = sum(len(r.tokens) for r in job.rows)
        return completion_body(prepared.kind, prepared.request_id, prepared.model_name, choices,
                               usage(prepared.prompt_tokens, tokens))

    async def stream(self, prepared: Prepared) -> AsyncIterator[bytes]:
        """Server-sent events of a streamed request, ending with ``data: [DONE]``. If the consumer stops early
        (client disconnect), the request is cancelled (see batcher.py for what that frees)."""
        job, kind, rid, model = prepared.job, prepared.kind, prepared.request_id, prepared.model_name
        finished = False
        offsets: dict[int, int] = {}  # completions text_offset so far, per choice
        try:
            if kind == "chat":
                for row in job.rows:
                    yield sse(chunk_body(kind, rid, model, row.index, None, None, first=True))
            while True:
                event, row, payload = await job.queue.get()
                if event == "delta":
                    text, entries = payload
                    logprobs = self._logprobs(kind, row, entries)
                    if logprobs is not None and kind == "completions":
                        start = offsets.get(row.index, 0)
                        logprobs["text_offset"] = [start + o for o in logprobs["text_offset"]]
                        offsets[row.index] = start + sum(len(t) for t in logprobs["tokens"])
                    yield sse(chunk_body(kind, rid, model, row.index, text, None, logprobs=logprobs))
                elif event == "finish":
                    yield sse(chunk_body(kind, rid, model, row.index, None, payload))
                elif event == "error":
                    yield sse(payload.body())
                    break
                else:  # done
                    if prepared.include_usage:
                        tokens = sum(len(r.tokens) for r in job.rows)
                        yield sse(chunk_body(kind, rid, model, 0, None, None,
                                             usage_=usage(prepared.prompt_tokens, tokens)))
                    break
            finished = True
            yield SSE_DONE
        finally:
            if not finished:
                job.cancel()
