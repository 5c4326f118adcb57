"""Kernel dispatch. Public entry points: `embed_pool_distance`."""

from __future__ import annotations

from .reference import embed_pool_distance_ref


def embed_pool_distance(
    input_ids,
    attention_mask,
    embed_weight,
    centroids,
    centroid_adapter,
    num_adapters,
    *,
    center=None,
    token_weights=None,
    distance="cosine",
    backend=None,
    return_pooled=False,
):
    """Route rows to adapters: see `reference.embed_pool_distance_ref` for the exact semantics."""
    return embed_pool_distance_ref(
        input_ids, attention_mask, embed_weight, centroids, centroid_adapter, num_adapters,
        center=center, token_weights=token_weights, distance=distance, return_pooled=return_pooled,
    )


__all__ = ["embed_pool_distance", "embed_pool_distance_ref"]
