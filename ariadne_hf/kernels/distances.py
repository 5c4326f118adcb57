"""The routing distances: one entry per distance, read by every place that needs one (no triton import).

A `Distance` holds everything the package needs to know about a distance:

* ``name``: the value of ``AriadneConfig.distance``, the CLI's ``--distance`` and the kernels' ``distance=``;
* ``code``: the integer passed to the Triton kernels as the constexpr ``DISTANCE`` (``pool_distance_triton`` has one
  compile-time branch per code in ``_score_tile``);
* ``normalized``: rows and centroids are compared on the unit sphere: k-means normalises the points and every
  centroid update (spherical k-means), the stored centroids are unit rows, and the model card's centroid map
  normalises them before its PCA;
* ``similarity(dots, x_norm, c_norm)``: the scoring specification. ``dots`` [B, K] fp32 = x . c (may be updated in
  place), ``x_norm`` [B, 1] fp32 = |x|, ``c_norm`` [K] fp32 = |c|; returns sim [B, K] fp32, higher = closer. Both
  backends compute exactly these three statistics (one matmul, the centroids read once);
* ``assign(points, centers)``: k-means' assignment score [N, K] (higher = closer; argmax picks the cluster);
* ``seed_gap(points, point)``: k-means++'s squared gap [N] of every point to a chosen one (sampling weight);
* ``card_space``: the model card's words for the space the centroid map is drawn in ("" when nothing to say).

Adding a distance: one `Distance` entry in `REGISTRY` below (a fresh ``code``), and the ``DISTANCE == code`` branch
of ``pool_distance_triton._score_tile``. Everything else (argument checks, the torch path, k-means, the model card,
the CLI choices, ``AriadneConfig`` validation, the tests parametrised over `DISTANCES`) reads this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EPS = 1e-12
"""Norm clamp of the cosine similarity (the ``eps`` of ``F.normalize``); the Triton kernel uses the same literal."""


@dataclass(frozen=True)
class Distance:
    """One routing distance (module docstring for every field)."""

    name: str
    code: int
    normalized: bool
    similarity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    assign: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    seed_gap: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    card_space: str


def _cosine_similarity(dots: torch.Tensor, x_norm: torch.Tensor, c_norm: torch.Tensor) -> torch.Tensor:
    """x.c / (max(|x|, eps) * max(|c|, eps)): the cosine similarity, as ``F.normalize`` clamps norms."""
    return dots.div_(x_norm.clamp_min(EPS)).div_(c_norm.clamp_min(EPS).unsqueeze(0))  # [B, K]


def _l2_similarity(dots: torch.Tensor, x_norm: torch.Tensor, c_norm: torch.Tensor) -> torch.Tensor:
    """-sqrt(max(|x|^2 - 2 x.c + |c|^2, 0)): the negated euclidean distance from one matmul (like ``torch.cdist``)."""
    sq = dots.mul_(-2.0).add_(x_norm.square()).add_(c_norm.square().unsqueeze(0))  # [B, K]
    return sq.clamp_min_(0.0).sqrt_().neg_()


REGISTRY: dict[str, Distance] = {
    d.name: d
    for d in (
        Distance(
            name="cosine",
            code=0,
            normalized=True,
            similarity=_cosine_similarity,
            assign=lambda points, centers: points @ centers.T,  # [N, K], unit rows
            seed_gap=lambda points, point: (1.0 - points @ point).clamp_min(0.0),  # [N]
            card_space="unit-normalised (cosine), ",
        ),
        Distance(
            name="l2",
            code=1,
            normalized=False,
            similarity=_l2_similarity,
            assign=lambda points, centers: -torch.cdist(points, centers).square(),  # [N, K]
            seed_gap=lambda points, point: (points - point).square().sum(-1),  # [N]
            card_space="",
        ),
    )
}
"""Every distance, by name; the first one is the default."""

DISTANCES: tuple[str, ...] = tuple(REGISTRY)
"""The distance names, in registry order (argument checks, CLI choices, configuration validation)."""


def get_distance(name: str) -> Distance:
    """The registry entry of ``name``; ``ValueError`` naming the known distances for anything else."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"distance must be one of {DISTANCES}, got {name!r}") from None
