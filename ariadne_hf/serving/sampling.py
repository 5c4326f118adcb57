"""Per-row logits processing and log-probabilities for the dynamic batcher (OpenAI semantics).

- `RowLogitsProcessor`: one transformers LogitsProcessor for the whole batch that applies each row's own
  `logit_bias` and presence/frequency penalties, so requests that differ in them share one generate call:
  ``logits[b, j] += bias[b, j] - c[b, j] * frequency_penalty[b] - (c[b, j] > 0) * presence_penalty[b]`` where
  ``c[b, j]`` counts token j among row b's *generated* tokens (OpenAI's definition; vLLM's too: its
  presence/frequency penalties count output tokens only, its repetition_penalty, not exposed here, also counts the
  prompt). It runs before generate's temperature / top_p warpers (transformers appends user processors before them).
- `LogitsRecorder`: a forward hook on the backbone keeping the last position's logits of every decoding step, i.e.
  exactly the tensor generate's `output_logits` returns (the model's raw logits, before any logits processor).
  Log-probabilities are ``log_softmax`` of those (vLLM's default "raw" logprobs, before sampling processors).
- `prompt_entries`: the prompt's log-probabilities (echo with logprobs) from the routed model's forward over the
  prompt alone with the row's adapter; the first token has none.
An entry is ``(token_id, logprob, ((alt_id, alt_logprob), ...top-k))`` (logprob and alternatives None for the
first prompt token).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .openai_params import RowOptions

Entry = tuple[int, float | None, tuple[tuple[int, float], ...] | None]


class RowLogitsProcessor(LogitsProcessor):
    """Each row's logit_bias and presence/frequency penalties (see the module docstring); rows without them are
    left untouched (bit for bit)."""

    def __init__(self, options: list[RowOptions], prompt_length: int):
        self.options, self.prompt_length = options, prompt_length
        self.bias: torch.Tensor | None = None  # [B, V], built on the first call (V = the logits' width)
        self.presence = torch.tensor([o.presence_penalty for o in options], dtype=torch.float32)  # [B]
        self.frequency = torch.tensor([o.frequency_penalty for o in options], dtype=torch.float32)  # [B]
        self.penalize = bool(self.presence.any() or self.frequency.any())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, vocab = scores.shape  # [B, V]
        if self.bias is None:
            self.bias = torch.zeros(batch, vocab, dtype=scores.dtype, device=scores.device)
            for b, option in enumerate(self.options):
                for token, value in option.logit_bias:
                    self.bias[b, token] = value
        scores = scores + self.bias
        generated = input_ids[:, self.prompt_length:]  # [B, t]
        if self.penalize and generated.shape[1]:
            counts = torch.zeros(batch, vocab, dtype=scores.dtype, device=scores.device)
            counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))  # [B, V]
            scores = scores - counts * self.frequency.to(scores)[:, None] \
                - (counts > 0).to(scores.dtype) * self.presence.to(scores)[:, None]
        return scores


class LogitsRecorder:
    """Keeps the backbone's last-position logits (fp32, as generate reads them) of the latest forward."""

    def __init__(self, module: torch.nn.Module):
        self.last: torch.Tensor | None = None  # [B, V]
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        logits = output.logits if hasattr(output, "logits") else output[0]
        self.last = logits[:, -1].to(dtype=torch.float32)

    def close(self) -> None:
        self.handle.remove()


def entries_at(logprobs: torch.Tensor, tokens: list[int], tops: list[int]) -> list[Entry]:
    """logprobs [N, V] (log_softmax rows), the token chosen at each row and the top-k wanted per row -> entries."""
    k = max(tops, default=0)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()  # [N]
    if k:
        values, indices = logprobs.topk(k, dim=-1)  # [N, k]
        values, indices = values.tolist(), indices.tolist()
    out = []
    for i, (token, top) in enumerate(zip(tokens, tops, strict=True)):
        alts = tuple(zip(indices[i][:top], values[i][:top], strict=True)) if top else ()
        out.append((token, chosen[i], alts))
    return out


@torch.no_grad()
def prompt_entries(model, prompt_ids: list[int], adapter: str, top: int) -> list[Entry]:
    """Log-probabilities of each prompt token given the ones before it, from the routed model's forward over the
    prompt alone with `adapter` ("__base__" = plain backbone); the first token has none: (id, None, None)."""
    first = (prompt_ids[0], None, None)
    if len(prompt_ids) < 2:
        return [first]
    ids = torch.tensor([prompt_ids])  # [1, T]
    output = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter])
    logprobs = torch.log_softmax(output.logits[0, :-1].to(torch.float32), dim=-1)  # [T-1, V]
    return [first, *entries_at(logprobs, prompt_ids[1:], [top] * (len(prompt_ids) - 1))]


# ---- OpenAI response shapes ---------------------------------------------------------------------------------
def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, entries: list[Entry]) -> dict:
    """Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}``."""
    def one(token, logprob):
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in alts]}
               for token, logprob, alts in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list[Entry], start_offset: int = 0) -> dict:
    """Completions: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``; the first prompt
    token (echo) has logprob and top_logprobs None. text_offset counts characters of the
    returned text, adding each token's own decoded text (vLLM does the same)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = start_offset
    for token, logprob, alts in entries:
        text = _token_text(tokenizer, token)
        tokens.append(text)
        token_logprobs.append(logprob)
        tops.append(None if alts is None else {_token_text(tokenizer, t): lp for t, lp in alts})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
