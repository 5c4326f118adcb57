"""Task metrics with a chosen adapter per row: exact match (greedy generation) and multiple-choice accuracy.

Prompts are one user turn of the tokenizer's chat template when it has one (plain text otherwise), exactly as the
demo adapters were trained (examples/train_demo_adapters.py). Rows follow the routing-dev format:
{"text", "targets": [...], "choices": [...], "answer": index}.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

MAX_PROMPT_TOKENS = 384
METRICS = ("exact_match", "multiple_choice")  # what evaluate_bundle(metric=...) and `ariadne eval --metric` offer


def prompt_ids(tokenizer, text: str, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """Token ids of `text` as one chat user turn plus the assistant header (left-truncated to the budget)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:
        ids = tokenizer(text)["input_ids"]
    return ids[-max_prompt_tokens:]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token that ends an assistant turn (<|im_end|> for ChatML templates, else EOS)."""
    token = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return [token if token is not None else tokenizer.eos_token_id]


def gold_strings(row: dict) -> list[str]:
    """Every string accepted by exact match: all non-empty targets and the answer choice."""
    golds = [t for t in row.get("targets", []) if t.strip()]
    if "choices" in row:
        golds.append(row["choices"][row["answer"]])
    return golds


def normalise(text: str) -> str:
    """First line, stripped, one trailing period removed, case-folded."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip().casefold() if line.endswith(".") else line.casefold()


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T] and mask [B, T]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def exact_match(model, tokenizer, rows: Sequence[dict], adapter_names: Sequence[str], *, batch_size: int = 16,
                max_new_tokens: int = 24) -> tuple[list[bool], list[str]]:
    """Greedy generation with `adapter_names[i]` on row i; hit when the normalised first line equals a gold string.

    Returns (hit per row, generated first line per row).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits, outputs = [], []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        ids, mask = left_pad([prompt_ids(tokenizer, r["text"]) for r in chunk], pad)
        generated = model.generate(input_ids=ids, attention_mask=mask, adapter_names=list(
            adapter_names[start:start + batch_size]), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad)
        for row, out in zip(chunk, generated[:, ids.shape[1]:], strict=True):
            text = tokenizer.decode(out, skip_special_tokens=True)
            outputs.append(text.strip().split("\n", 1)[0])
            hits.append(normalise(text) in {normalise(g) for g in gold_strings(row)})
    return hits, outputs


@torch.no_grad()
def choice_scores_per_row(model, tokenizer, rows: Sequence[dict], adapter_names: Sequence[str]) -> list[list[float]]:
    """Multiple choice, one forward per row over every choice in full: summed log-likelihood of each
    `choice + end-of-turn` after the prompt, with `adapter_names[i]` on row i. The reference the fast path
    (`choice_scores`) is tested against; it runs the prompt once per choice."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    end = end_of_turn_ids(tokenizer)
    out = []
    for row, name in zip(rows, adapter_names, strict=True):
        prompt = prompt_ids(tokenizer, row["text"])
        completions = [tokenizer(c, add_special_tokens=False)["input_ids"] + end for c in row["choices"]]
        ids, mask = left_pad([prompt + c for c in completions], pad)  # completions end-aligned  [C, T]
        keep = max(len(c) for c in completions) + 1
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=[name] * len(completions),
                       logits_to_keep=keep).logits  # [C, keep, V]
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # predicts the last keep-1 tokens
        targets = ids[:, -(keep - 1):]  # [C, keep-1]
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [C, keep-1]
        live = torch.zeros_like(picked, dtype=torch.bool)
        for i, c in enumerate(completions):
            live[i, -len(c):] = True
        out.append((picked * live).sum(dim=1).tolist())  # [C]
    return out


def kv_cache_argument(model) -> str:
    """The forward keyword of a KV cache: transformers >= 5.24 names it `cache` (`past_key_values` is deprecated and
    removed in 5.40), earlier 5.x `past_key_values`."""
    backbone = getattr(model, "backbone", model)
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def kv_cache_of(output):
    """The KV cache of a forward output under either name (see `kv_cache_argument`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def choice_scores(model, tokenizer, rows: Sequence[dict], adapter_names: Sequence[str] | None = None, *,
                  adapter_weights: torch.Tensor | None = None, batch_size: int = 16) -> list[list[float]]:
    """Multiple choice with shared prompts: the same log-likelihoods as `choice_scores_per_row` (up to float
    rounding), each prompt run once.

    Rows are taken `batch_size` at a time, sorted by prompt length: one forward over the left-padded prompts with a
    KV cache (logits of the last position only), the cache expanded to one row per choice (`reorder_cache` with
    repeated indices), then one forward over every choice's `choice + end-of-turn` tokens (right-padded) with each
    row's adapter (`adapter_names[i]`, or the fixed mixture `adapter_weights[i]` [A]) on its expanded rows.
    Cost ~ prompt + C x choice tokens per row instead of C x (prompt + choice), in two calls per batch.
    Left padding shifts a row's absolute positions, as in the per-row path; rotary attention sees only relative ones.
    """
    if (adapter_names is None) == (adapter_weights is None):
        raise ValueError("choice_scores: pass exactly one of adapter_names (one per row) or adapter_weights [N, A].")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    end = end_of_turn_ids(tokenizer)
    prompts = [prompt_ids(tokenizer, row["text"]) for row in rows]
    completions = [[tokenizer(c, add_special_tokens=False)["input_ids"] + end for c in row["choices"]] for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    cache_arg = kv_cache_argument(model)
    out: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        counts = torch.tensor([len(completions[i]) for i in batch])  # [b]
        expand = torch.repeat_interleave(torch.arange(len(batch)), counts)  # [n] batch row of each choice row

        def route(index: torch.Tensor, batch=batch) -> dict:
            if adapter_weights is not None:
                return {"adapter_weights": adapter_weights[torch.tensor(batch)][index]}
            return {"adapter_names": [adapter_names[batch[int(j)]] for j in index]}

        ids, mask = left_pad([prompts[i] for i in batch], pad)  # [b, P]
        first = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                      **route(torch.arange(len(batch))))
        head = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # [b, V] predicts each choice's first token
        flat = [c for i in batch for c in completions[i]]  # n completions
        scores = torch.tensor([float(head[expand[r], tokens[0]]) for r, tokens in enumerate(flat)],
                              dtype=torch.float64)  # [n]
        for chunk in _width_buckets([len(c) for c in flat]):  # similar lengths: little padding per forward
            width = max(len(flat[r]) for r in chunk)
            if width < 2:
                continue
            rows_of = expand[torch.tensor(chunk)]  # [m] batch row of each choice row
            cont = torch.full((len(chunk), width), pad, dtype=torch.long)  # [m, W] right-padded
            cont_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, index in enumerate(chunk):
                cont[r, :len(flat[index])] = torch.tensor(flat[index])
                cont_mask[r, :len(flat[index])] = 1
            cache = copy.deepcopy(kv_cache_of(first))
            cache.reorder_cache(rows_of)  # [b, ...] -> [m, ...]
            attention = torch.cat([mask[rows_of], cont_mask], dim=1)  # [m, P + W]
            logits = model(input_ids=cont[:, :-1], attention_mask=attention[:, :-1], **{cache_arg: cache},
                           use_cache=True, **route(rows_of)).logits  # [m, W-1, V]
            picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, cont[:, 1:].unsqueeze(-1)).squeeze(-1)
            scores[torch.tensor(chunk)] += (picked * cont_mask[:, 1:]).sum(dim=1).double()
        for j, values in zip(batch, scores.split(counts.tolist()), strict=True):
            out[j] = values.tolist()
    return out


def _width_buckets(lengths: list[int], max_rows: int = 64) -> list[list[int]]:
    """Indices grouped by length (ascending): a group closes at `max_rows` or when a length exceeds twice the
    group's first length plus 2, so each forward pads little."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if not groups or len(groups[-1]) >= max_rows or lengths[index] > 2 * lengths[groups[-1][0]] + 2:
            groups.append([])
        groups[-1].append(index)
    return groups


def best_choice_hits(rows: Sequence[dict], scores: Sequence[list[float]]) -> list[bool]:
    """Hit when the gold choice has the highest score (ties to the first, lm-eval-harness "acc")."""
    return [max(range(len(s)), key=lambda c: (s[c], -c)) == row["answer"] for row, s in zip(rows, scores,
                                                                                          strict=True)]


def choice_hits(model, tokenizer, rows: Sequence[dict], adapter_names: Sequence[str], *, fast: bool = True,
                adapter_weights: torch.Tensor | None = None) -> list[bool]:
    """Multiple choice: the gold choice has the highest summed log-likelihood of `choice + end-of-turn` after the
    prompt (lm-eval-harness "acc", ties to the first), scored with `adapter_names[i]` (or the mixture
    `adapter_weights[i]`) on row i; `fast` shares each prompt's KV cache across its choices (`choice_scores`)."""
    if adapter_weights is not None:
        return best_choice_hits(rows, choice_scores(model, tokenizer, rows, adapter_weights=adapter_weights))
    scorer = choice_scores if fast else choice_scores_per_row
    return best_choice_hits(rows, scorer(model, tokenizer, rows, adapter_names))
