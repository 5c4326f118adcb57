"""Seeded k-means++ / spherical k-means in torch (each adapter is clustered on its own), and the router tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.distances import Distance, get_distance

DEFAULT_KMEANS_ITERATIONS = 50
DEFAULT_NUM_CENTROIDS = 1
"""Centroids per adapter unless asked otherwise. With within-adapter whitening one centroid (the adapter mean,
the LDA model) was best on single-task adapters and 0.2 points behind 4 on multi-task ones (docs/routing_quality.md)."""


def _kmeans_plus_plus(points: torch.Tensor, k: int, distance: Distance, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: returns k row indices of `points` [N, D], each drawn with probability ~ squared gap."""
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator).item())]
    gap = distance.seed_gap(points, points[chosen[0]])  # [N]
    for _ in range(1, k):
        total = gap.sum()
        if total <= 0:  # every remaining point coincides with a chosen one
            remaining = [i for i in range(n) if i not in set(chosen)]
            chosen.append(remaining[0])
        else:
            chosen.append(int(torch.multinomial(gap / total, 1, generator=generator).item()))
        gap = torch.minimum(gap, distance.seed_gap(points, points[chosen[-1]]))
    return torch.tensor(chosen, dtype=torch.long)


def kmeans(
    points: torch.Tensor,
    num_centroids: int,
    *,
    distance: str = "cosine",
    seed: int = 0,
    iterations: int = DEFAULT_KMEANS_ITERATIONS,
) -> torch.Tensor:
    """Cluster `points` [N, D] into min(num_centroids, N) centroids [K, D] fp32.

    Guarantees: deterministic for a seed (own `torch.Generator`, CPU); k-means++ seeding (`Distance.seed_gap`),
    assignment by `Distance.assign`; for a ``normalized`` distance ("cosine") the points are L2-normalised and the
    centroids are unit-norm means (spherical k-means), otherwise ("l2") plain Lloyd iterations. A cluster that
    empties keeps its previous centroid. K is clipped to N.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, D] matrix, got shape {tuple(points.shape)}.")
    entry = get_distance(distance)
    x = points.detach().to(device="cpu", dtype=torch.float32)  # [N, D]
    if entry.normalized:
        x = F.normalize(x, dim=-1)
    k = max(1, min(int(num_centroids), x.shape[0]))
    generator = torch.Generator().manual_seed(seed)
    centers = x[_kmeans_plus_plus(x, k, entry, generator)].clone()  # [K, D]
    assignment = None
    for _ in range(iterations):
        new_assignment = entry.assign(x, centers).argmax(dim=-1)  # [N]
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centers).index_add_(0, assignment, x)  # [K, D]
        counts = torch.bincount(assignment, minlength=k).to(torch.float32)  # [K]
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled].unsqueeze(-1)
        if entry.normalized:
            centers = F.normalize(centers, dim=-1)
    return centers


@dataclass
class RouterTables:
    """Everything the router scores with, built from the pooled prompt embeddings of every adapter.

    centroids [K, D] fp32 in the scoring space (unit rows for cosine), centroid_adapter [K] int64 (sorted by adapter),
    center [D] fp32 or None, transform [D, D] fp32 or None (whitening W), whitening_info (see `whitening`),
    centroid_counts: centroids per adapter, in adapter order.
    """

    centroids: torch.Tensor
    centroid_adapter: torch.Tensor
    center: torch.Tensor | None
    transform: torch.Tensor | None
    whitening_info: dict | None
    centroid_counts: list[int]


def build_router_tables(
    pooled: Sequence[torch.Tensor],
    *,
    num_centroids: int,
    distance: str = "cosine",
    center: bool = True,
    whitening: str = "within",
    seed: int = 0,
) -> RouterTables:
    """Fit the router state on each adapter's pooled prompt embeddings `pooled[a]` [N_a, D] (adapter order).

    center = mean of all prompts (if `center`); transform = within-adapter whitening (if `whitening == "within"`,
    `whitening.within_adapter_whitening`); then each adapter's prompts are mapped to the scoring space
    x = W (p - center) and clustered on their own into at most `num_centroids` centroids (`kmeans`, seeded).
    Guarantees: deterministic for a seed; adapter a's centroids depend on the shared state (center, W) and on its
    own prompts only; centroid_adapter is sorted (adapter 0's rows first).
    """
    from ..kernels.pool_distance_torch import to_scoring_space
    from .whitening import WHITENING_KINDS, within_adapter_whitening

    if whitening not in WHITENING_KINDS:
        raise ValueError(f"whitening must be one of {WHITENING_KINDS}, got {whitening!r}.")
    if not pooled:
        raise ValueError("build_router_tables needs at least one adapter's embeddings.")
    center_vector = torch.cat(list(pooled)).mean(dim=0) if center else None  # [D]
    transform, info = within_adapter_whitening(pooled) if whitening == "within" else (None, None)
    blocks, owners, counts = [], [], []
    for index, points in enumerate(pooled):
        centroids = kmeans(to_scoring_space(points, center_vector, transform), num_centroids, distance=distance,
                           seed=seed)  # [k, D]
        blocks.append(centroids)
        owners.append(torch.full((centroids.shape[0],), index, dtype=torch.int64))
        counts.append(int(centroids.shape[0]))
    return RouterTables(torch.cat(blocks), torch.cat(owners), center_vector, transform, info, counts)
