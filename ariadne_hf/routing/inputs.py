"""Routing inputs: prompt tokenization, token-id and mask checks, the mask of a cached forward's new tokens, special-token weights."""

from __future__ import annotations

import torch


def special_token_weights(tokenizer, vocab_size: int) -> torch.Tensor:
    """Per-token-id pooling weights [V]: 1, and 0 for the tokenizer's special tokens (BOS, EOS, pad, chat markers)."""
    weights = torch.ones(vocab_size, dtype=torch.float32)
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab_size]
    if special:
        weights[torch.tensor(special)] = 0.0
    return weights


def new_tokens_mask(input_ids, attention_mask):
    """The mask of `input_ids`' own positions: a cached forward (past_key_values) passes a mask [B, past + T] that
    also covers the cached tokens; routing and validation read only its last T columns [B, T]."""
    if (isinstance(attention_mask, torch.Tensor) and isinstance(input_ids, torch.Tensor) and attention_mask.ndim == 2
            and input_ids.ndim == 2 and attention_mask.shape[0] == input_ids.shape[0]
            and attention_mask.shape[1] > input_ids.shape[1]):
        return attention_mask[:, -input_ids.shape[1]:]
    return attention_mask


def validate_token_ids(input_ids, attention_mask, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ids [B, T] (integer) and mask [B, T]; ids at unmasked positions must lie in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a 2-D tensor [B, T], got {getattr(input_ids, 'shape', type(input_ids))}.")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}."
        )
    if vocab_size is not None and input_ids.numel():
        live = input_ids[attention_mask.bool()]
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= vocab_size):
            bad = int(live.max()) if int(live.max()) >= vocab_size else int(live.min())
            raise ValueError(
                f"Token id {bad} is outside the backbone's vocabulary [0, {vocab_size}); the ids were probably made "
                "by another tokenizer. Tokenize with this bundle's tokenizer (model.tokenizer)."
            )
    return input_ids, attention_mask


def validate_adapter_weights(weights, batch_size: int, num_adapters: int) -> torch.Tensor:
    """Check a caller's mixture [B, A]: float, finite, >= 0, rows summing to 1 (or all zero = plain backbone)."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise ValueError("adapter_weights must be a float tensor [B, A] (one row of adapter weights per prompt).")
    if weights.shape != (batch_size, num_adapters):
        raise ValueError(
            f"adapter_weights has shape {tuple(weights.shape)}, expected [B={batch_size}, A={num_adapters}] "
            "(columns in model.adapter_names order)."
        )
    weights = weights.detach().to(torch.float32).cpu()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("adapter_weights must be finite and non-negative.")
    sums = weights.sum(dim=-1)
    bad = ~(((sums - 1).abs() <= 1e-4) | (sums == 0))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"adapter_weights row {row} sums to {float(sums[row]):.4f}; each row must sum to 1 "
                         "(or be all zero for the plain backbone).")
    return weights


def tokenize_prompts(tokenizer, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and mask [B, T] of one prompt or a non-empty list of prompts (padded to the longest)."""
    if tokenizer is None:
        raise ValueError("This model has no tokenizer: pass input_ids= and attention_mask= instead of strings.")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("route(): prompts must be a non-empty list of strings.")
    batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def prompt_ids(tokenizer, prompts, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ids [B, T] and mask [B, T] (or None) a `route()` call routes: its prompts tokenized, or its ids as given.
    Raises ValueError unless exactly one of `prompts` and `input_ids` is given."""
    if prompts is not None:
        if input_ids is not None:
            raise ValueError("route(): pass either prompts or input_ids, not both.")
        return tokenize_prompts(tokenizer, prompts)
    if input_ids is None:
        raise ValueError("route(): pass prompts (list of strings) or input_ids=[B, T].")
    return input_ids, attention_mask
