"""Task scores with token-level routing (adapters mixed while decoding), for `ariadne eval --routing token`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .task_metrics import choice_hits, gold_strings, left_pad, normalise, prompt_ids


def prompt_mixture(model, rows: Sequence[dict], *, top_k: int, temperature: float) -> torch.Tensor:
    """Mixture weights [N, A] of each row's chat-formatted prompt: softmax(scores / temperature) over its top-k
    adapters, 0 elsewhere (the gate `generate(routing="token")` starts decoding with)."""
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    out = []
    for start in range(0, len(rows), 32):
        ids, mask = left_pad([prompt_ids(model.tokenizer, r["text"]) for r in rows[start:start + 32]], pad)
        scores = model.route(input_ids=ids, attention_mask=mask, reject=None).scores  # [b, A]
        top = scores.topk(top_k, dim=-1)
        weights = torch.zeros_like(scores).scatter_(1, top.indices, torch.softmax(top.values / temperature, dim=-1))
        out.append(weights)
    return torch.cat(out)


@torch.no_grad()
def token_routed_hits(model, rows: Sequence[dict], metric: str, *, reroute_every: int | None = None,
                      top_k: int | None = None, batch_size: int = 16, max_new_tokens: int = 24) -> list[bool]:
    """Hit per row with token-level routing. exact_match: greedy `generate(routing="token")` (re-routed every
    `reroute_every` tokens, `top_k` adapters mixed); multiple_choice: every choice scored under the prompt's
    top-k mixture (`prompt_mixture`). None = the bundle's config."""
    top_k = top_k or model.config.routing_top_k
    top_k = min(top_k, len(model.adapter_names))
    if metric == "multiple_choice":
        weights = prompt_mixture(model, rows, top_k=top_k, temperature=model.config.routing_temperature)
        return choice_hits(model, model.tokenizer, rows, None, adapter_weights=weights)
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits = []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        ids, mask = left_pad([prompt_ids(tokenizer, r["text"]) for r in chunk], pad)
        generated = model.generate(input_ids=ids, attention_mask=mask, routing="token", reroute_every=reroute_every,
                                   routing_top_k=top_k, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=pad)
        for row, out in zip(chunk, generated[:, ids.shape[1]:], strict=True):
            text = tokenizer.decode(out, skip_special_tokens=True)
            hits.append(normalise(text) in {normalise(g) for g in gold_strings(row)})
    return hits
