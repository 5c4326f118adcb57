"""Torch reference implementations: the specification of every kernel, and the CPU path.

Shape letters: B batch, T tokens, V vocab, D hidden, K centroids, A adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_embeddings_ref(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    embed_weight: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: pooled[b] = sum_t w[b,t] E[ids[b,t]] / sum_t w[b,t], w = mask * token_weights[ids] (fp32).

    Returns (pooled [B, D] fp32, weight_sum [B] fp32). Rows with weight_sum == 0 have pooled == 0.
    The embedding table is read row by row (never copied or upcast whole).
    """
    mask = attention_mask.to(torch.float32)  # [B, T]
    safe_ids = torch.where(attention_mask.bool(), input_ids, torch.zeros_like(input_ids)).long()  # [B, T]
    weights = mask
    if token_weights is not None:
        weights = weights * token_weights.to(torch.float32)[safe_ids]  # [B, T]
    summed = F.embedding_bag(
        safe_ids, embed_weight, per_sample_weights=weights.to(embed_weight.dtype), mode="sum"
    ) if embed_weight.dtype == torch.float32 else (
        embed_weight[safe_ids].to(torch.float32) * weights.unsqueeze(-1)
    ).sum(dim=1)  # [B, D]
    weight_sum = weights.sum(dim=1)  # [B]
    pooled = summed / weight_sum.clamp_min(1e-12).unsqueeze(-1)  # [B, D]
    pooled = torch.where((weight_sum > 0).unsqueeze(-1), pooled, torch.zeros_like(pooled))
    return pooled, weight_sum


def centroid_scores_ref(
    pooled: torch.Tensor,
    weight_sum: torch.Tensor,
    centroids: torch.Tensor,
    centroid_adapter: torch.Tensor,
    num_adapters: int,
    *,
    center: torch.Tensor | None = None,
    distance: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: scores[b, a] = max_{k: c2a[k]=a} sim(pooled[b] - center, C[k]); best[b] = argmax_a scores[b, a].

    sim is cosine similarity for "cosine" and the negated euclidean distance for "l2". Returns
    (scores [B, A] fp32, best [B] int64). Rows with weight_sum == 0 get scores -inf and best -1; an adapter
    without centroids scores -inf. Ties go to the lowest adapter index.
    """
    x = pooled.to(torch.float32)  # [B, D]
    if center is not None:
        x = x - center.to(torch.float32)
    c = centroids.to(torch.float32)  # [K, D]
    if distance == "cosine":
        sim = F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).T  # [B, K]
    elif distance == "l2":
        sq = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(-1).unsqueeze(0)  # [B, K]
        sim = -sq.clamp_min(0.0).sqrt()
    else:
        raise ValueError(f"distance must be 'cosine' or 'l2', got {distance!r}")
    batch = x.shape[0]
    scores = torch.full((batch, num_adapters), float("-inf"), dtype=torch.float32, device=x.device)  # [B, A]
    index = centroid_adapter.to(device=x.device, dtype=torch.int64).unsqueeze(0).expand(batch, -1)  # [B, K]
    scores = scores.scatter_reduce(1, index, sim, reduce="amax", include_self=True)
    empty = weight_sum <= 0  # [B]
    scores = scores.masked_fill(empty.unsqueeze(-1), float("-inf"))
    best = scores.argmax(dim=-1)  # [B]
    best = torch.where(empty, torch.full_like(best, -1), best)
    return scores, best


def embed_pool_distance_ref(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    embed_weight: torch.Tensor,
    centroids: torch.Tensor,
    centroid_adapter: torch.Tensor,
    num_adapters: int,
    *,
    center: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    distance: str = "cosine",
    return_pooled: bool = False,
):
    """Semantics: scores[b, a] = max_k sim(mean_t w E[ids[b,t]] - center, C[k]) over adapter a's centroids.

    The torch specification of the fused kernel. Returns (scores [B, A] fp32, best [B] int64) and, with
    `return_pooled`, also the pooled embedding [B, D] fp32 (before centering).
    """
    pooled, weight_sum = pool_embeddings_ref(input_ids, attention_mask, embed_weight, token_weights)
    scores, best = centroid_scores_ref(
        pooled, weight_sum, centroids, centroid_adapter, num_adapters, center=center, distance=distance
    )
    if return_pooled:
        return scores, best, pooled
    return scores, best
