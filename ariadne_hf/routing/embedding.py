"""Prompt sources and streaming prompt embedding (batched, with a progress bar) for building centroids."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..kernels.pool_distance_torch import pool_embeddings_ref
from .ood import routing_weights

logger = logging.getLogger(__name__)

PromptSource = Sequence[str] | str | os.PathLike | Any


def load_prompts(source: PromptSource, *, text_field: str = "text", name: str = "?") -> list[str]:
    """Return the prompts of one adapter as a list of strings.

    Accepts a list/tuple of strings, a path to a ``.jsonl`` file (one JSON object per line, prompt in
    `text_field`), a ``.txt`` file (one prompt per non-empty line), or a ``datasets.Dataset`` (column
    `text_field`). Raises ValueError naming the adapter when the source is empty or malformed.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"Prompts for adapter {name!r}: file {path!r} does not exist.")
        prompts = _read_prompt_file(path, text_field, name)
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        if text_field not in source.column_names:
            raise ValueError(
                f"Prompts for adapter {name!r}: dataset has no column {text_field!r} "
                f"(columns: {source.column_names}); pass text_field=."
            )
        prompts = list(source[text_field])
    elif isinstance(source, Iterable):
        prompts = list(source)
    else:
        raise ValueError(
            f"Prompts for adapter {name!r}: expected a list of strings, a .jsonl/.txt path or a datasets.Dataset, "
            f"got {type(source).__name__}."
        )
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"Prompts for adapter {name!r}: every prompt must be a string, got {type(bad[0]).__name__}.")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(
            f"Adapter {name!r} has no prompts: give a sample of the prompts it was trained on (non-empty strings)."
        )
    return prompts


def _read_prompt_file(path: str, text_field: str, name: str) -> list[str]:
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rt", encoding="utf-8") as handle:
        if path.endswith((".jsonl", ".jsonl.gz")):
            prompts = []
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"Prompts for adapter {name!r}: {path}:{line_number} is not JSON ({err}).") from err
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(
                        f"Prompts for adapter {name!r}: {path}:{line_number} has no field {text_field!r}."
                    )
                prompts.append(record[text_field])
            return prompts
        return [line.rstrip("\n") for line in handle]


@torch.no_grad()
def embed_prompts(
    prompts: Sequence[str],
    tokenizer,
    embed_weight: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    max_length: int = 512,
    batch_size: int = 64,
    desc: str = "embedding prompts",
    progress: bool = True,
    signal=None,
) -> torch.Tensor:
    """Pooled input-embedding of every prompt: returns [N, D] fp32 on CPU, in prompt order.

    Prompts with no routable token (empty after dropping zero-weight tokens) are skipped with a warning.
    Each prompt is tokenized like a routed request (the tokenizer's default special tokens, truncated to
    `max_length`), then pooled as the weighted mean of its token embedding rows (`token_weights` [V]), exactly
    as the router pools at inference. Batches are sorted by length to limit padding. With `signal` (a
    `routing.signal.RoutingSignal` of routing_layer k > 0) the rows are that signal's pooled hidden state instead,
    with the same token weights (`RoutingSignal.pooled`, exactly what routing computes at inference).
    """
    hidden = None if signal is None or signal.layer == 0 else signal
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pooled = None  # [N, D] fp32, allocated at the first batch (D = the signal's width)
    weight_sums = torch.empty(len(prompts), dtype=torch.float32)  # [N]
    device = embed_weight.device
    weights = None if token_weights is None else token_weights.to(device)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [prompts[i] for i in index], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        if hidden is not None:
            rows, sums = hidden.pooled(batch["input_ids"], routing_weights(batch["input_ids"], batch["attention_mask"],
                                                                           weights))  # [b, D], [b]
        else:
            rows, sums = pool_embeddings_ref(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), embed_weight, weights
            )  # [b, D]
        if pooled is None:
            pooled = torch.empty(len(prompts), rows.shape[1], dtype=torch.float32)
        pooled[torch.tensor(index)] = rows.float().cpu()
        weight_sums[torch.tensor(index)] = sums.float().cpu()
        bar.update(len(index))
    bar.close()
    kept = weight_sums > 0
    if not bool(kept.any()):
        raise ValueError(f"{desc}: no prompt has a routable token (all are empty or special tokens only).")
    if not bool(kept.all()):
        logger.warning("%s: %d prompt(s) with no routable token were skipped.", desc, int((~kept).sum()))
    return pooled[kept]
