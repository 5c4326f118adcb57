"""The one router build pipeline: prompts -> pooled embeddings -> router tables -> (optional) ood calibration.

Used by `AriadneRoutedModel.from_adapters` and `evaluation.router_only_report` (so the report measures exactly the
router a bundle would get), and, for one new adapter in an existing space, by `add_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.pool_distance_torch import to_scoring_space
from .calibration import OodCalibration, calibrate_for_build
from .centroids import RouterTables, build_router_tables, kmeans
from .embedding import embed_prompts
from .inputs import special_token_weights
from .router import AriadneRouter

OOD_AUTO_MAX_ADAPTERS = None
"""No adapter-count limit on the out-of-distribution tables any more: they are sparse (16 bytes per distinct token
of an adapter's prompts, `ood.SparseTokenCounts`) and their lookup is a binary search, flat in the adapter count.
`ood=None` builds them whenever the prompts allow a calibration; `ood=False` skips them."""


@dataclass
class BuiltRouter:
    """A router filled with its tables (and ood tables when calibrated), what it was built from, and how."""

    router: AriadneRouter
    tables: RouterTables
    token_weights: torch.Tensor | None  # [V] pooling weights (0 for special tokens) or None
    calibration: OodCalibration | None


def build_router(prompt_lists: dict[str, list[str]], tokenizer, embed_weight: torch.Tensor, *, num_centroids: int,
                 distance: str = "cosine", center: bool = True, whitening: str = "within",
                 ignore_special_tokens: bool = True, reject: str | None = None, reject_rate: float = 0.02,
                 ood: bool | None = None, seed: int = 0, max_length: int = 512, batch_size: int = 64,
                 progress: bool = False, signal=None) -> BuiltRouter:
    """Build the router of adapters `prompt_lists` {name: prompts} (router order = dict order) in the embedding
    space of `embed_weight` [V, D], or of `signal` (a `routing.signal.RoutingSignal`; routing_layer k > 0 pools the
    base hidden state after layer k, and the tables, whitening and ood statistics live in that space): pooled prompts (special tokens weighted 0 if `ignore_special_tokens`),
    `build_router_tables`, and the cross-fitted ood calibration for `reject_rate` unless `ood=False` (None: whenever
    the prompts allow it; required with `reject="auto"`). Raises ValueError for `ood=False` with
    `reject="auto"`, or when `reject="auto"` cannot be calibrated."""
    names = list(prompt_lists)
    if ood is False and reject == "auto":
        raise ValueError("reject='auto' needs the out-of-distribution score: drop ood=False.")
    token_weights = special_token_weights(tokenizer, embed_weight.shape[0]) if ignore_special_tokens else None
    pooled = {n: embed_prompts(prompt_lists[n], tokenizer, embed_weight, token_weights=token_weights,
                               max_length=max_length, batch_size=batch_size, desc=f"embedding {n}", progress=progress,
                               signal=signal)
              for n in names}
    options = dict(num_centroids=num_centroids, distance=distance, center=center, whitening=whitening)
    tables = build_router_tables([pooled[n] for n in names], seed=seed, **options)
    router = AriadneRouter(names, int(tables.centroids.shape[1]), distance)
    router.set_tables(tables.centroids, tables.centroid_adapter, tables.center, token_weights, tables.transform)
    want_ood = ood if ood is not None else True
    calibration = None if not want_ood else calibrate_for_build(
        prompt_lists, pooled, tokenizer, token_weights, int(embed_weight.shape[0]), max_length=max_length,
        build_kwargs=options, reject_rate=reject_rate, seed=seed, required=reject == "auto")
    if calibration is not None:
        router.set_ood(calibration.token_counts, calibration.stats)
    return BuiltRouter(router, tables, token_weights, calibration)


def centroids_in_space(router: AriadneRouter, prompts: list[str], tokenizer, embed_weight: torch.Tensor, *,
                       num_centroids: int, distance: str, seed: int = 0, max_length: int = 512, batch_size: int = 64,
                       desc: str = "embedding", progress: bool = False, signal=None) -> torch.Tensor:
    """Centroids [k, D] of one new adapter's prompts in `router`'s existing scoring space (its center and whitening
    kept as built): what `add_adapter` appends, touching no other adapter."""
    points = embed_prompts(prompts, tokenizer, embed_weight, token_weights=router.optional_token_weights(),
                           max_length=max_length, batch_size=batch_size, desc=desc, progress=progress,
                           signal=signal)  # [N, D]
    transform = router.optional_transform()
    points = to_scoring_space(points, router.optional_center(), None if transform is None else transform.cpu())
    return kmeans(points, num_centroids, distance=distance, seed=seed)
