"""Out-of-distribution score of a routing decision (torch reference: the spec and the only path).

Semantics (higher = more foreign). For a row b with routing weights w[b, t] (mask x token weights: special and
chat-template tokens weigh 0), scores s[b, :] from the router and routed adapter a* = argmax_a s[b, a]:

    c0 = -s[b, a*]                                                  best similarity, negated
    c1 = -(s[b, a*] - second_best)                                  top-2 margin, negated (0 with one adapter)
    c2 = 1 - sum_t w[b,t] seen[a*, ids[b,t]] / sum_t w[b,t]          share of tokens never seen in a*'s prompts
    c3 = -sum_t w[b,t] llr[a*, ids[b,t]] / sum_t w[b,t]              unigram log-likelihood ratio, negated
    ood[b] = mean_j (c_j - mu_j) / sd_j                              z-scores from cross-fitted held-out prompts

``seen[a, v] = counts[a, v] > 0`` and ``llr[a, v] = log p_a(v) - log p_bg(v)`` with add-`ALPHA` smoothed unigram
models of adapter a's building prompts (``p_a``) and of all adapters' prompts (``p_bg``), from ``counts`` [A, V]
(token occurrences per adapter). Everything runs after the routing kernel on its scores: one gather of [B, T]
entries from two [A, V] tables, no backbone layer. Study and choice: docs/routing_quality.md ("Out of distribution").
"""

from __future__ import annotations

import torch

ALPHA = 0.1
"""Additive smoothing of the unigram models (a fixed constant, not tuned)."""

COMPONENTS = ("neg_best", "neg_margin", "unseen_share", "neg_unigram_llr")


def token_counts(token_ids: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id over prompts given as id lists: int64 [V]."""
    flat = [t for ids in token_ids for t in ids]
    if not flat:
        return torch.zeros(vocab_size, dtype=torch.int64)
    return torch.bincount(torch.tensor(flat, dtype=torch.int64), minlength=vocab_size)[:vocab_size]


def token_tables(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen [A, V] bool, llr [A, V] fp32) from per-adapter token counts [A, V] (see the module docstring)."""
    counts = counts.to(torch.float64)
    vocab = counts.shape[1]
    p_adapter = (counts + ALPHA) / (counts.sum(1, keepdim=True) + ALPHA * vocab)  # [A, V]
    background = counts.sum(0)  # [V]
    p_background = (background + ALPHA) / (background.sum() + ALPHA * vocab)  # [V]
    return counts > 0, (p_adapter.log() - p_background.log()).to(torch.float32)


def ood_components(input_ids: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor,
                   llr: torch.Tensor) -> torch.Tensor:
    """The four raw components [B, 4] (COMPONENTS order); rows with no weight or no finite score get nan.

    ``input_ids`` [B, T], ``weights`` [B, T] fp32 (0 = ignored position), ``scores`` [B, A] (higher = closer),
    ``seen`` [A, V] bool, ``llr`` [A, V] fp32.
    """
    scores = scores.float()
    device = scores.device
    ids = input_ids.to(device).long()
    weights = weights.to(device=device, dtype=torch.float32)
    best_score, best = scores.max(dim=1)  # [B]
    if scores.shape[1] >= 2:
        margin = best_score - scores.topk(2, dim=1).values[:, 1]  # [B]
    else:
        margin = torch.zeros_like(best_score)
    safe = torch.where(weights > 0, ids, torch.zeros_like(ids))  # [B, T]
    rows = best.unsqueeze(1).expand_as(safe)  # [B, T]
    total = weights.sum(dim=1)  # [B]
    denominator = total.clamp_min(1e-12)
    seen_share = (seen.to(device)[rows, safe].float() * weights).sum(1) / denominator  # [B]
    mean_llr = (llr.to(device)[rows, safe] * weights).sum(1) / denominator  # [B]
    out = torch.stack([-best_score, -margin, 1.0 - seen_share, -mean_llr], dim=1)  # [B, 4]
    invalid = (total <= 0) | ~torch.isfinite(best_score)
    return torch.where(invalid.unsqueeze(1), torch.full_like(out, float("nan")), out)


def combine(components: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """ood [B] = mean_j (components[:, j] - stats[0, j]) / stats[1, j]; ``stats`` [2, 4] = (mean, sd)."""
    return ((components - stats[0].to(components)) / stats[1].to(components)).mean(dim=1)


def routing_weights(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_weights: torch.Tensor | None) -> torch.Tensor:
    """The pooling weights routing uses, per position [B, T] fp32: mask x token_weights[id]."""
    weights = attention_mask.to(torch.float32)
    if token_weights is not None:
        safe = torch.where(attention_mask.bool(), input_ids, torch.zeros_like(input_ids)).long()
        weights = weights * token_weights.to(weights.device)[safe.to(weights.device)]
    return weights
