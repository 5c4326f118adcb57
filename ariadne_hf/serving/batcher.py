"""Dynamic batching: concurrent requests gathered into one routed `generate` with per-row adapters.

Guarantees:
- Requests are gathered for at most `max_wait_ms` after the oldest waiting one arrived (no wait at all while a
  batch is running: what queued meanwhile forms the next batch), up to `max_batch_size` rows.
- Only requests with the same sampling parameters (do_sample, temperature, top_p) share a call. A request with a
  `seed` that samples runs alone, right after `torch.manual_seed(seed)`, so it is reproducible. `n`, `max_tokens`
  and `stop` are per row (a request with n=3 is three rows), so they never split batches; so are `logit_bias`,
  the presence/frequency penalties, `logprobs` and `echo` (sampling.py: one logits processor applies each row's
  own values), and a row's answer does not depend on the other rows of its batch.
- One worker thread runs every `generate` (one at a time); the asyncio loop only queues, so it never blocks.
- An exception inside a batch fails that batch's requests with a 500 error and nothing else; the loop goes on.
- A cancelled request (client gone) is dropped if still queued; if running, its rows stop at the next decoding
  step (their StoppingCriteria verdict turns true, no more tokens are decoded or sent) and the call returns as soon
  as every live row of the batch is done. The rows' places in the already-built batch tensor are not reclaimed
  mid-call (transformers' generate has a fixed batch), but the next batch is formed without them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .openai_params import RowOptions
from .prompts import pad_id_of, pad_left
from .protocol import OpenAIError
from .sampling import Entry, LogitsRecorder, RowLogitsProcessor, entries_at, prompt_entries

logger = logging.getLogger(__name__)

BASE = "__base__"


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters; requests share a generate call only when these are equal."""

    do_sample: bool
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def resolve(cls, temperature, top_p, seed, generation_config) -> Sampling:
        """OpenAI parameters -> generate parameters. temperature 0 = greedy; omitted = the bundle's
        generation_config (greedy unless it sets do_sample)."""
        if temperature is None:
            do_sample = bool(getattr(generation_config, "do_sample", False))
            temperature = getattr(generation_config, "temperature", None) or 1.0
        else:
            do_sample = temperature > 0
        if not do_sample:
            return cls(False)
        top_p = top_p if top_p is not None else (getattr(generation_config, "top_p", None) or 1.0)
        return cls(True, float(temperature), float(top_p), seed)

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class Row:
    """One completion choice: a prompt, its adapter ("__base__" = none) and its limits; filled while decoding."""

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    index: int = 0
    job: Job | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    score: float | None = None
    margin: float | None = None
    options: RowOptions = field(default_factory=RowOptions)
    echo_text: str = ""  # the prompt as sent, returned before the completion when options.echo
    logprobs: list[Entry] = field(default_factory=list)  # one per token of `tokens` when options.logprobs is set
    prompt_logprobs: list[Entry] = field(default_factory=list)  # echo with logprobs: one per prompt token
    emitted_logprobs: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Job:
    """One request: its rows, sampling parameters, and an event queue the handler reads.

    Events (put from the worker thread through the loop): ("delta", row, (text, [Entry] or None)),
    ("finish", row, reason), ("done", None, None), ("error", None, OpenAIError). With echo, a row's first delta is
    its prompt text (and the prompt's entries with logprobs); the entries of a delta are those of the tokens
    decoded since the previous delta."""

    rows: list[Row]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        for row in self.rows:
            row.job = self

    def emit(self, kind: str, row: Row | None, payload) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, row, payload))

    def cancel(self) -> None:
        """Mark the request abandoned (safe from any thread); see the module docstring for what it frees."""
        self.cancelled = True


class RowTracker(StoppingCriteria):
    """Per-row bookkeeping as a StoppingCriteria: it sees every new token of every row each step.

    For each live row it appends the token, decodes the row's text incrementally (the emitted text only grows by
    whole characters: a trailing U+FFFD of an unfinished multi-byte character is held back, and so are the last
    characters that could still start a stop string), and finishes the row on EOS ("stop"), a stop string
    ("stop", text cut before it), its own max_tokens ("length") or cancellation. Returns done [B] bool, which makes
    generate pad finished rows and return once all rows are done. With a `recorder` (sampling.LogitsRecorder), live
    rows that asked for logprobs get the entry of their new token (log_softmax of the step's raw logits).
    """

    def __init__(self, rows: list[Row], tokenizer, eos_ids: set[int], recorder: LogitsRecorder | None = None):
        self.rows, self.tokenizer, self.eos_ids, self.recorder = rows, tokenizer, eos_ids, recorder

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()  # [B]
        if self.recorder is not None:
            self._record(new)
        for row, token in zip(self.rows, new, strict=True):
            if row.done:
                continue
            if row.job.cancelled:
                row.finish_reason = "cancelled"
                continue
            if token in self.eos_ids:
                self.finish(row, "stop")
                continue
            row.tokens.append(token)
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in row.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text = text[:cut]
                self.finish(row, "stop")
            elif len(row.tokens) >= row.max_tokens:
                row.text = text
                self.finish(row, "length")
            else:
                row.text = text
                hold = max((len(s) - 1 for s in row.stop), default=0)
                safe = len(text.rstrip("\ufffd")) - hold
                self.flush(row, safe)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _record(self, new: list[int]) -> None:
        """Entries of this step's tokens for the live rows with logprobs (EOS included: dropped if it ends the row)."""
        wanted = [b for b, row in enumerate(self.rows) if row.options.logprobs is not None and not row.done
                  and not row.job.cancelled and new[b] not in self.eos_ids]
        if not wanted:
            return
        logprobs = torch.log_softmax(self.recorder.last[wanted], dim=-1)  # [N, V]
        entries = entries_at(logprobs, [new[b] for b in wanted], [self.rows[b].options.logprobs for b in wanted])
        for b, entry in zip(wanted, entries, strict=True):
            self.rows[b].logprobs.append(entry)

    def flush(self, row: Row, upto: int, force: bool = False) -> None:
        entries = row.logprobs[row.emitted_logprobs:] if row.options.logprobs is not None else None
        if upto > row.emitted or (force and entries):
            row.job.emit("delta", row, (row.text[row.emitted:upto], entries))
            row.emitted = max(upto, row.emitted)
            row.emitted_logprobs = len(row.logprobs)

    def finish(self, row: Row, reason: str) -> None:
        self.flush(row, len(row.text), force=True)
        row.finish_reason = reason
        row.job.emit("finish", row, reason)


class DynamicBatcher:
    """Gathers jobs into routed `generate` calls on one worker thread. Use from one asyncio loop.

    Rows arrive routed (engine.py routes in the handler). `model` needs the public AriadneRoutedModel API:
    `generate(input_ids=, attention_mask=, adapter_names=[per row], ...)`, `tokenizer`, `generation_config`.
    """

    def __init__(self, model, *, max_batch_size: int = 16, max_wait_ms: float = 10.0,
                 on_batch: Callable[[list[Job]], None] | None = None):
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0.")
        self.model, self.tokenizer = model, model.tokenizer
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        # with resident adapter slots, one generate may use at most that many distinct adapters
        self.max_adapters = getattr(getattr(model, "config", None), "max_resident_adapters", None)
        self.pad_id = pad_id_of(self.tokenizer, model.generation_config)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.pending: deque[Job] = deque()
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ariadne-generate")
        self.on_batch = on_batch
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "max_rows": 0, "cancelled_rows": 0,
                      "failed_batches": 0, "generated_tokens": 0}
        self.lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> None:
        self.stats["requests"] += 1
        self.pending.append(job)
        self.wakeup.set()

    # ---- batch formation ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            deadline = self.pending[0].arrived + self.max_wait
            while self._ready_rows() < self.max_batch_size and time.monotonic() < deadline:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:  # (not the builtin before Python 3.11)
                    break
            jobs = self._take()
            if jobs:
                await loop.run_in_executor(self.executor, self._run_batch, jobs)

    def _ready_rows(self) -> int:
        key = self.pending[0].sampling
        return sum(len(j.rows) for j in self.pending if j.sampling == key)

    def _take(self) -> list[Job]:
        """The oldest job plus later jobs with equal sampling, up to max_batch_size rows and (with resident slots)
        at most `max_resident_adapters` distinct adapters; drops cancelled ones."""
        while self.pending and self.pending[0].cancelled:
            self._drop(self.pending.popleft())
        if not self.pending:
            return []
        first = self.pending.popleft()
        taken, rows, adapters = [first], len(first.rows), _adapters_of(first)
        if first.sampling.seed is None:
            kept: deque[Job] = deque()
            while self.pending:
                job = self.pending.popleft()
                union = adapters | _adapters_of(job)
                if job.cancelled:
                    self._drop(job)
                elif job.sampling == first.sampling and rows + len(job.rows) <= self.max_batch_size and (
                        self.max_adapters is None or len(union) <= self.max_adapters):
                    taken.append(job)
                    rows += len(job.rows)
                    adapters = union
                else:
                    kept.append(job)
            self.pending = kept
        return taken

    def _drop(self, job: Job) -> None:
        self.stats["cancelled_rows"] += len(job.rows)
        job.emit("done", None, None)

    # ---- the worker thread --------------------------------------------------------------------------------
    def _run_batch(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        try:
            self._generate(rows, jobs[0].sampling)
        except Exception as err:  # one broken batch must not take the server down
            logger.exception("generate failed for a batch of %d rows", len(rows))
            self.stats["failed_batches"] += 1
            failure = OpenAIError(500, f"Generation failed: {type(err).__name__}: {err}", type="server_error",
                                  code="generation_failed")
            for job in jobs:
                job.emit("error", None, failure)
            return
        with self.lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(rows)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
            self.stats["cancelled_rows"] += sum(r.finish_reason == "cancelled" for r in rows)
            self.stats["generated_tokens"] += sum(len(r.tokens) for r in rows)
        if self.on_batch is not None:
            self.on_batch(jobs)
        for job in jobs:
            job.emit("done", None, None)

    def _generate(self, rows: list[Row], sampling: Sampling) -> None:
        for row in rows:  # echo: the prompt (with its log-probabilities) comes first
            if row.options.echo and not row.job.cancelled:
                if row.options.logprobs is not None:
                    row.prompt_logprobs = prompt_entries(self.model, row.prompt_ids, row.adapter, row.options.logprobs)
                row.job.emit("delta", row, (row.echo_text,
                                            row.prompt_logprobs if row.options.logprobs is not None else None))
        live = [r for r in rows if r.max_tokens > 0 and not r.job.cancelled]  # max_tokens 0: echo only
        tracker = RowTracker(live, self.tokenizer, self.eos_ids)
        if live:
            input_ids, attention_mask = pad_left([r.prompt_ids for r in live], self.pad_id)  # [B, T]
            processors = LogitsProcessorList()
            if any(r.options.processes_logits for r in live):
                processors.append(RowLogitsProcessor([r.options for r in live], input_ids.shape[1]))
            if any(r.options.logprobs is not None for r in live):
                tracker.recorder = LogitsRecorder(self.model.backbone)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            try:
                self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, adapter_names=[r.adapter for r in live],
                    max_new_tokens=max(r.max_tokens for r in live), stopping_criteria=StoppingCriteriaList([tracker]),
                    logits_processor=processors, pad_token_id=self.pad_id, return_dict_in_generate=True,
                    **sampling.generate_kwargs(),
                )
            finally:
                if tracker.recorder is not None:
                    tracker.recorder.close()
        for row in rows:  # rows still live when generate returned (e.g. the backbone's max_length), max_tokens 0
            if not row.done:
                tracker.finish(row, "cancelled" if row.job.cancelled else "length")


def _adapters_of(job: Job) -> set[str]:
    """The adapters a job's rows use (the plain backbone needs no slot)."""
    return {row.adapter for row in job.rows} - {BASE}
