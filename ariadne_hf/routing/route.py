"""The one routing path: token ids -> routing inputs -> scores -> decision, for every front end.

`AriadneRoutedModel.route`, `forward` and `generate` (through `call_planning`), token routing's prompt step, the
serving engine (which calls `model.route`), and `RoutingOnlyModel.route` (gateway mode, the Ray ingress, the vLLM
middleware) all call `route_decision`; token routing shares `routing_inputs` and `score`. The router itself is built
from a bundle's tensors in one place (`router_from_tensors`) and written to them in one place (`router_tensors`).
"""

from __future__ import annotations

import torch

from .. import constants
from .calibration import auto_threshold
from .inputs import validate_token_ids
from .ood import SparseTokenCounts, routing_weights
from .router import AriadneRouter, RoutingDecision, strip_template
from .signal import RoutingSignal


def routing_inputs(config, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ids [B, T] and the mask routing reads [B, T]: the given mask (all ones if None) minus the chat
    template's fixed prefix/suffix tokens (`config.template_prefix_ids` / `template_suffix_ids`) of rows that carry
    them exactly. Raises ValueError for malformed ids or ids outside the backbone's vocabulary."""
    input_ids, attention_mask = validate_token_ids(input_ids, attention_mask, config.embedding_vocab_size)
    prefix, suffix = config.template_prefix_ids or [], config.template_suffix_ids or []
    if prefix or suffix:
        attention_mask = strip_template(input_ids, attention_mask, prefix, suffix)
    return input_ids, attention_mask


@torch.no_grad()
def score(router: AriadneRouter, signal: RoutingSignal, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B, A] fp32, best [B] int64, -1 for empty rows) of routing inputs in the signal's space: the fused
    embedding kernel for routing_layer 0, the base hidden-state pass then the centroid scores for k > 0."""
    if signal.layer == 0:
        return router.score(input_ids, attention_mask, signal.embed_weight, backend=backend)
    weights = routing_weights(input_ids, attention_mask, router.optional_token_weights())  # [B, T]
    pooled, total = signal.pooled(input_ids, weights)  # [B, D], [B]
    return router.score_pooled(pooled, total)


def route_decision(config, router: AriadneRouter, signal: RoutingSignal, input_ids, attention_mask, *,
                   threshold: float | None, reject: str | None, backend: str | None = None) -> RoutingDecision:
    """Route token ids [B, T] (mask [B, T] or None): validate, strip the template, score, ood-score, decide.

    `threshold` is the best-score floor (None: none); `reject` None or "auto" (rows whose ood score exceeds the
    calibrated `config.ood_threshold` go to "__base__"; a clear error when the router has no calibration)."""
    if reject not in (None, "auto"):
        raise ValueError(f"reject must be None or 'auto', got {reject!r}.")
    input_ids, attention_mask = routing_inputs(config, input_ids, attention_mask)
    scores, best = score(router, signal, input_ids, attention_mask, backend=backend or config.kernel_backend)
    ood_threshold = auto_threshold(config, router.has_ood()) if reject == "auto" else None
    ood = router.ood_scores(input_ids, attention_mask, scores)  # [B] or None
    return router.decide(scores, best, threshold, ood, ood_threshold)


def token_router_from_tensors(config, tensors: dict[str, torch.Tensor]) -> AriadneRouter | None:
    """The token-routing router of a routing_layer > 0 bundle (tensors under `constants.TOKEN_ROUTER_PREFIX`: centroids,
    center, whitening in the input-embedding space; no ood tables), None when the bundle has none."""
    inner = {k[len(constants.TOKEN_ROUTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(constants.TOKEN_ROUTER_PREFIX)}
    if constants.ROUTER_CENTROIDS not in inner:
        return None
    if constants.ROUTER_TOKEN_WEIGHTS in tensors:
        inner[constants.ROUTER_TOKEN_WEIGHTS] = tensors[constants.ROUTER_TOKEN_WEIGHTS]
    return router_from_tensors(config, inner)


def router_tensors(router: AriadneRouter, *, tables_only: bool = False) -> dict[str, torch.Tensor]:
    """What `router_from_tensors` reads back: the centroid table, its center and whitening when set, and unless
    `tables_only` the special-token weights and the sparse ood tables when the router has them."""
    out = {constants.ROUTER_CENTROIDS: router.centroids, constants.ROUTER_CENTROID_ADAPTER: router.centroid_adapter}
    optional = {constants.ROUTER_CENTER: router.optional_center(), constants.ROUTER_TRANSFORM: router.optional_transform()}
    if not tables_only:
        optional[constants.ROUTER_TOKEN_WEIGHTS] = router.optional_token_weights()
    out.update({key: value for key, value in optional.items() if value is not None})
    if not tables_only and router.has_ood():
        out.update({constants.ROUTER_TOKEN_KEYS: router.token_table.keys, constants.ROUTER_TOKEN_VALUES: router.token_table.values,
                    constants.ROUTER_OOD_STATS: router.ood_stats})
    return out


def token_router_tensors(router: AriadneRouter) -> dict[str, torch.Tensor]:
    """What `token_router_from_tensors` reads back (the token weights are the main router's)."""
    return {constants.TOKEN_ROUTER_PREFIX + k: v for k, v in router_tensors(router, tables_only=True).items()}


def router_from_tensors(config, tensors: dict[str, torch.Tensor]) -> AriadneRouter:
    """The router of a bundle: its config (adapter order, distance) and its router tensors (centroids, center,
    token weights, whitening, ood tables), validated by `AriadneRouter.set_tables` / `set_ood`."""
    router = AriadneRouter(config.adapter_names, int(tensors[constants.ROUTER_CENTROIDS].shape[1]), config.distance)
    router.set_tables(tensors[constants.ROUTER_CENTROIDS], tensors[constants.ROUTER_CENTROID_ADAPTER], tensors.get(constants.ROUTER_CENTER),
                      tensors.get(constants.ROUTER_TOKEN_WEIGHTS), tensors.get(constants.ROUTER_TRANSFORM))
    counts = tensors.get(constants.ROUTER_TOKEN_COUNTS)  # dense [A, V] (bundles 1.2) or the sparse pair (1.3)
    if tensors.get(constants.ROUTER_TOKEN_KEYS) is not None:
        counts = SparseTokenCounts(tensors[constants.ROUTER_TOKEN_KEYS], tensors[constants.ROUTER_TOKEN_VALUES], len(config.adapter_names),
                                   int(config.embedding_vocab_size))
    router.set_ood(counts, tensors.get(constants.ROUTER_OOD_STATS))
    return router
