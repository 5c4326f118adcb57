"""Routing kernels in torch: the specification of ``embed_pool_distance`` / ``incremental_pool_distance``
and their CPU path. Its steps are public because the rest of the package reuses them: pooling
(``pool_embeddings_ref``: prompt embedding at build time), the scoring space (``to_scoring_space``: the
centroids are built in it), scoring (``centroid_scores_ref``: ood calibration) and the running-sum update
(``incremental_pool_update_ref``: token routing).

Shape letters: B batch, T tokens, V vocab, D hidden, K centroids, A adapters.

Routing semantics (shared by every backend; ``pool_distance_triton`` implements exactly these rules):

* A position ``t`` of row ``b`` is *in* when ``attention_mask[b, t] != 0``; its weight is
  ``w[b, t] = token_weights[ids[b, t]]`` (``1`` without ``token_weights``), and ``0`` when out.
* ``pooled[b] = sum_t w[b, t] * E[ids[b, t]] / sum_t w[b, t]`` accumulated in fp32; a row whose weight
  sum is ``0`` ("no weighted tokens") has ``pooled[b] = 0``.
* ``x[b] = W (pooled[b] - center)``: ``center`` [D] optional, subtracted after pooling; ``W = transform``
  [D, D] optional (a whitening matrix, ``x = (pooled - center) @ transform.T``), identity when absent.
* ``sim(x, c)`` is the ``similarity`` of the distance's entry in ``distances.REGISTRY``, from ``x.c``, ``|x|`` and
  ``|c|`` (one matmul): for ``"cosine"`` ``x.c / (max(|x|, eps) * max(|c|, eps))`` (``eps = 1e-12``, as
  ``F.normalize``), for ``"l2"`` the negated euclidean distance ``-sqrt(max(|x|^2 - 2 x.c + |c|^2, 0))``
  (like ``torch.cdist``).
* ``scores[b, a] = max_{k: centroid_adapter[k] == a} sim(x[b], C[k])``; ``-inf`` for an adapter without
  centroids and for every adapter of a row with no weighted tokens.
* ``best[b] = argmax_a scores[b, a]``, ties to the lowest adapter index; ``-1`` when the row has no
  weighted tokens or no finite score (e.g. ``K == 0``).
* Ids at masked-in positions must lie in ``[0, V)``: anything else raises ``ValueError`` naming the id
  and ``V``; ids at masked-out positions are never read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import (
    RoutingArgs,
    check_batch_args,
    check_incremental_args,
    check_token_ids_in_range,
    routing_args,
)
from .distances import get_distance

_HALF_CHUNK_ELEMENTS = 1 << 21
"""Gathered half-precision rows are upcast to fp32 in chunks of about this many elements (8 MB fp32)."""


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------


def _sum_rows_fp32(
    embed_weight: torch.Tensor,
    flat_ids: torch.Tensor,
    lengths: torch.Tensor,
    flat_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Semantics: out[b] = sum of w[n] * E[flat_ids[n]] over row b's ``lengths[b]`` tokens, in fp32 (w = 1 if None).

    ``flat_ids`` [N] hold the rows' tokens one row after the other (``lengths`` [B]). fp32 tables go through one
    ``F.embedding_bag`` call straight from the table. Half tables are gathered in chunks of about
    ``_HALF_CHUNK_ELEMENTS`` elements, each chunk upcast into a reused fp32 buffer and reduced by
    ``embedding_bag``: the table is never upcast whole, no ``[B, T, D]`` fp32 tensor exists, and the
    accumulation is fp32 (``embedding_bag`` on a half table would round its sums to half).
    """
    dim = embed_weight.shape[1]
    device = embed_weight.device
    batch = lengths.shape[0]
    if embed_weight.dtype == torch.float32:
        offsets = lengths.cumsum(0) - lengths  # [B]
        return F.embedding_bag(flat_ids, embed_weight, offsets, mode="sum", per_sample_weights=flat_weights)
    row_of_token = torch.repeat_interleave(torch.arange(batch, device=device), lengths)  # [N]
    out = torch.zeros(batch, dim, dtype=torch.float32, device=device)  # [B, D]
    total = flat_ids.numel()
    chunk = max(1, _HALF_CHUNK_ELEMENTS // max(dim, 1))
    buf_half = torch.empty(min(chunk, total), dim, dtype=embed_weight.dtype, device=device)  # [C, D]
    buf_fp32 = torch.empty(min(chunk, total), dim, dtype=torch.float32, device=device)  # [C, D]
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        n = stop - start
        torch.index_select(embed_weight, 0, flat_ids[start:stop], out=buf_half[:n])
        buf_fp32[:n].copy_(buf_half[:n])
        rows, counts = torch.unique_consecutive(row_of_token[start:stop], return_counts=True)  # [Rc]
        local_offsets = counts.cumsum(0) - counts  # [Rc]
        weights = None if flat_weights is None else flat_weights[start:stop]  # [n]
        partial = F.embedding_bag(
            torch.arange(n, device=device), buf_fp32[:n], local_offsets, mode="sum", per_sample_weights=weights
        )  # [Rc, D]
        out.index_add_(0, rows, partial)
    return out


def pool_embeddings_ref(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    embed_weight: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: pooled[b] = sum_t w[b,t] E[ids[b,t]] / sum_t w[b,t], w = (mask != 0) * token_weights[ids].

    Returns (pooled [B, D] fp32, weight_sum [B] fp32). Rows with weight_sum == 0 have pooled == 0.
    Only masked-in tokens with a non-zero weight are gathered; the table is read row by row, never
    copied or upcast whole, and all sums are fp32. Raises ``ValueError`` for an out-of-range id at a
    masked-in position.
    """
    check_batch_args(input_ids, attention_mask, embed_weight)
    keep = attention_mask != 0  # [B, T]
    check_token_ids_in_range(input_ids, keep, embed_weight.shape[0])
    safe_ids = torch.where(keep, input_ids, torch.zeros_like(input_ids)).long()  # [B, T]
    if token_weights is None:
        weight_sum = keep.sum(dim=1, dtype=torch.float32)  # [B]
        flat_weights = None
    else:
        weights = token_weights.to(torch.float32)[safe_ids] * keep  # [B, T]
        keep = keep & (weights != 0)
        weight_sum = weights.sum(dim=1)  # [B]
        flat_weights = weights[keep]  # [N]
    flat_ids = safe_ids[keep]  # [N], row-major: grouped by row
    summed = _sum_rows_fp32(embed_weight, flat_ids, keep.sum(dim=1), flat_weights)  # [B, D]
    has_weight = weight_sum != 0  # [B]
    pooled = summed / torch.where(has_weight, weight_sum, torch.ones_like(weight_sum)).unsqueeze(-1)
    pooled = pooled.masked_fill(~has_weight.unsqueeze(-1), 0.0)  # [B, D]
    return pooled, weight_sum


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def centroid_similarity_ref(x: torch.Tensor, centroids: torch.Tensor, distance: str) -> torch.Tensor:
    """Semantics: sim[b, k] = sim(x[b], C[k]) (module docstring); one matmul, C read twice (dot + norms).

    ``x`` [B, D] fp32 (already centered), ``centroids`` [K, D] any float dtype. Returns [B, K] fp32.
    """
    similarity = get_distance(distance).similarity
    c = centroids if centroids.dtype == torch.float32 else centroids.to(torch.float32)  # [K, D]
    dots = x @ c.T  # [B, K]
    c_norm = torch.linalg.vector_norm(c, dim=-1)  # [K], a reduction: no [K, D] temporary
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [B, 1]
    return similarity(dots, x_norm, c_norm)  # [B, K]


def adapter_max_ref(
    sim: torch.Tensor, centroid_adapter: torch.Tensor, num_adapters: int, has_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: scores[b, a] = max_{k: c2a[k]=a} sim[b, k]; best[b] = first argmax, -1 if no finite score.

    ``sim`` [B, K] fp32, ``centroid_adapter`` [K] int, ``has_weight`` [B] bool (False rows: all -inf).
    One ``scatter_reduce(amax)`` (a reshape + ``amax`` when centroids are sorted by adapter in equal groups,
    as the router builds them), no Python loop. Returns (scores [B, A] fp32, best [B] int64).
    """
    batch, num_centroids = sim.shape
    group = num_centroids // num_adapters if num_centroids % num_adapters == 0 else 0
    c2a = centroid_adapter.to(device=sim.device, dtype=torch.int64)  # [K]
    if group and torch.equal(c2a, torch.arange(num_adapters, device=sim.device).repeat_interleave(group)):
        scores = sim.view(batch, num_adapters, group).amax(dim=-1)  # sorted, equal groups: a reshape
    else:
        scores = torch.full((batch, num_adapters), float("-inf"), dtype=torch.float32, device=sim.device)  # [B, A]
        if num_centroids:
            index = c2a.unsqueeze(0).expand(batch, -1)  # [B, K]
            scores = scores.scatter_reduce(1, index, sim, reduce="amax", include_self=True)
    scores = scores.masked_fill(~has_weight.unsqueeze(-1), float("-inf"))
    top, best = scores.max(dim=-1)  # [B], [B]; max returns the first maximal index
    best = torch.where(top > float("-inf"), best, torch.full_like(best, -1))
    return scores, best


def to_scoring_space(x: torch.Tensor, center: torch.Tensor | None, transform: torch.Tensor | None) -> torch.Tensor:
    """Semantics: W (x - center) for rows x [N, D] in fp32 (the space centroids live in); None parts are identity.

    The one definition shared by scoring (every backend's spec) and building (``centroids.build_router_tables``).
    """
    x = x.to(torch.float32)  # [N, D]
    if center is not None:
        x = x - center.to(x)
    if transform is not None:
        x = x @ transform.to(x).T  # [N, D] whitened
    return x


def centroid_scores_ref(
    pooled: torch.Tensor,
    weight_sum: torch.Tensor,
    centroids: torch.Tensor,
    centroid_adapter: torch.Tensor,
    num_adapters: int,
    *,
    center: torch.Tensor | None = None,
    transform: torch.Tensor | None = None,
    distance: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: scores[b, a] = max_{k: c2a[k]=a} sim(W (pooled[b] - center), C[k]); best[b] = argmax_a.

    ``pooled`` [B, D], ``weight_sum`` [B]. Returns (scores [B, A] fp32, best [B] int64) with the rules of the
    module docstring (-inf / -1 for rows with weight_sum == 0, -inf for adapters without centroids, ties
    to the lowest adapter index).
    """
    x = to_scoring_space(pooled, center, transform)  # [B, D]
    sim = centroid_similarity_ref(x, centroids, distance)  # [B, K]
    return adapter_max_ref(sim, centroid_adapter, num_adapters, weight_sum != 0)


def _score_pooled(pooled: torch.Tensor, weight_sum: torch.Tensor,
                  args: RoutingArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """`centroid_scores_ref` on checked arguments: (scores [B, A] fp32, best [B] int64)."""
    return centroid_scores_ref(pooled, weight_sum, args.centroids, args.centroid_adapter, args.num_adapters,
                               center=args.center, transform=args.transform, distance=args.distance.name)


def embed_pool_distance_ref(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            embed_weight: torch.Tensor, centroids: torch.Tensor, centroid_adapter: torch.Tensor,
                            num_adapters: int, *, center: torch.Tensor | None = None,
                            token_weights: torch.Tensor | None = None, transform: torch.Tensor | None = None,
                            distance: str = "cosine", return_pooled: bool = False):
    """Semantics: scores[b, a] = max_k sim(W (mean_t w E[ids[b,t]] - center), C[k]) over adapter a's centroids.

    The torch specification of the fused kernel (module docstring for every rule) and the CPU path.
    ``input_ids`` [B, T] int32/int64, ``attention_mask`` [B, T], ``embed_weight`` [V, D] fp32/fp16/bf16,
    ``centroids`` [K, D], ``centroid_adapter`` [K] int in [0, A), ``center`` [D], ``token_weights`` [V],
    ``transform`` [D, D] fp32 (whitening ``W``). Returns (scores [B, A] fp32, best [B] int64) and, with
    ``return_pooled``, also the pooled embedding [B, D] fp32 (before centering and whitening).
    """
    args = routing_args(embed_weight, centroids, centroid_adapter, num_adapters, center=center,
                        token_weights=token_weights, transform=transform, distance=distance)
    pooled, weight_sum = pool_embeddings_ref(input_ids, attention_mask, embed_weight, token_weights)
    scores, best = _score_pooled(pooled, weight_sum, args)
    return (scores, best, pooled) if return_pooled else (scores, best)


def incremental_pool_distance_ref(new_ids: torch.Tensor, running_sum: torch.Tensor, running_weight: torch.Tensor,
                                  embed_weight: torch.Tensor, centroids: torch.Tensor, centroid_adapter: torch.Tensor,
                                  num_adapters: int, *, new_mask: torch.Tensor | None = None,
                                  center: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                                  transform: torch.Tensor | None = None,
                                  distance: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: S[b] += w[b] E[new_ids[b]]; W[b] += w[b]; then score S[b] / W[b] like ``embed_pool_distance``.

    Token-level routing while decoding. ``new_ids`` [B] int32/int64 (the newest token of every row),
    ``running_sum`` [B, D] fp32 and ``running_weight`` [B] fp32 are the weighted sum and weight sum of
    the context so far and are UPDATED IN PLACE; ``w[b] = (new_mask[b] != 0) * token_weights[new_ids[b]]``
    (``new_mask`` [B] optional, default all in; ``token_weights`` [V] optional, default 1). The update is
    O(D) per row; scoring is then exactly ``centroid_scores_ref(S / W, W, ...)``, so after feeding a
    prompt token by token the scores equal ``embed_pool_distance`` on the whole prompt up to fp32
    summation order. Returns (scores [B, A] fp32, best [B] int64); rows with W == 0 get -inf / -1.
    """
    args = routing_args(embed_weight, centroids, centroid_adapter, num_adapters, center=center,
                        token_weights=token_weights, transform=transform, distance=distance)
    pooled, weight_sum = incremental_pool_update_ref(
        new_ids, running_sum, running_weight, embed_weight, new_mask=new_mask, token_weights=token_weights
    )
    return _score_pooled(pooled, weight_sum, args)


def incremental_pool_update_ref(
    new_ids: torch.Tensor,
    running_sum: torch.Tensor,
    running_weight: torch.Tensor,
    embed_weight: torch.Tensor,
    *,
    new_mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: S[b] += w[b] E[new_ids[b]]; W[b] += w[b] (in place); returns (S / W [B, D] fp32 or 0, W [B])."""
    keep = check_incremental_args(new_ids, running_sum, running_weight, embed_weight, new_mask)  # [B]
    check_token_ids_in_range(new_ids, keep, embed_weight.shape[0])
    safe_ids = torch.where(keep, new_ids, torch.zeros_like(new_ids)).long()  # [B]
    weight = keep.to(torch.float32)  # [B]
    if token_weights is not None:
        weight = weight * token_weights.to(torch.float32)[safe_ids]
    rows = embed_weight.index_select(0, safe_ids).to(torch.float32)  # [B, D] (B rows only)
    running_sum.addcmul_(rows, weight.unsqueeze(-1))
    running_weight.add_(weight)
    has_weight = running_weight != 0  # [B]
    denom = torch.where(has_weight, running_weight, torch.ones_like(running_weight)).unsqueeze(-1)  # [B, 1]
    pooled = (running_sum / denom).masked_fill(~has_weight.unsqueeze(-1), 0.0)  # [B, D]
    return pooled, running_weight

