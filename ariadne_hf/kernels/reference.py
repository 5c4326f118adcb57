"""Torch reference implementations: the specification of every kernel, and the CPU path.

Shape letters: B batch, T tokens, V vocab, D hidden, K centroids, A adapters, N flattened rows,
R LoRA rank, IN/OUT the in/out features of a LoRA-targeted linear layer.

Routing semantics (shared by every backend):

* A position ``t`` of row ``b`` is *in* when ``attention_mask[b, t] != 0``; its weight is
  ``w[b, t] = token_weights[ids[b, t]]`` (``1`` without ``token_weights``), and ``0`` when out.
* ``pooled[b] = sum_t w[b, t] * E[ids[b, t]] / sum_t w[b, t]`` accumulated in fp32; a row whose weight
  sum is ``0`` ("no weighted tokens") has ``pooled[b] = 0``.
* ``x[b] = W (pooled[b] - center)``: ``center`` [D] optional, subtracted after pooling; ``W = transform``
  [D, D] optional (a whitening matrix, ``x = (pooled - center) @ transform.T``), identity when absent.
* ``sim(x, c)`` is the cosine similarity ``x.c / (max(|x|, eps) * max(|c|, eps))`` (``eps = 1e-12``, as
  ``F.normalize``) for ``"cosine"`` and the negated euclidean distance ``-|x - c|`` for ``"l2"``,
  computed as ``-sqrt(max(|x|^2 - 2 x.c + |c|^2, 0))`` (one matmul; like ``torch.cdist``).
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

EPS = 1e-12
"""Norm clamp of the cosine similarity (the ``eps`` of ``F.normalize``)."""

DISTANCES = ("cosine", "l2")
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_HALF_CHUNK_ELEMENTS = 1 << 21
"""Gathered half-precision rows are upcast to fp32 in chunks of about this many elements (8 MB fp32)."""


# --------------------------------------------------------------------------------------------------
# Argument checks shared by every backend
# --------------------------------------------------------------------------------------------------


def check_token_ids_in_range(input_ids: torch.Tensor, keep: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` if an id at a kept position lies outside ``[0, vocab_size)``.

    ``input_ids`` and ``keep`` (bool) have the same shape; one device sync.
    """
    bad = keep & ((input_ids < 0) | (input_ids >= vocab_size))  # same shape as input_ids
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0].tolist())
        token = int(input_ids[position])
        raise ValueError(
            f"input_ids holds token id {token} at position {position} (a masked-in position), outside the "
            f"embedding table [0, V={vocab_size}); check the tokenizer matches the backbone"
        )


def check_routing_args(
    embed_weight: torch.Tensor,
    centroids: torch.Tensor,
    centroid_adapter: torch.Tensor,
    num_adapters: int,
    center: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    distance: str,
    transform: torch.Tensor | None = None,
) -> None:
    """Validate the arguments shared by the full and the incremental routing functions (no sync)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if embed_weight.dim() != 2 or embed_weight.dtype not in TABLE_DTYPES:
        raise ValueError(
            f"embed_weight must be a [V, D] float32/float16/bfloat16 table, got {tuple(embed_weight.shape)} "
            f"{embed_weight.dtype}"
        )
    vocab, dim = embed_weight.shape
    if centroids.dim() != 2 or centroids.shape[1] != dim or not centroids.is_floating_point():
        raise ValueError(f"centroids must be a float [K, D={dim}] tensor, got {tuple(centroids.shape)}")
    if centroid_adapter.shape != (centroids.shape[0],) or centroid_adapter.is_floating_point():
        raise ValueError(
            f"centroid_adapter must be an integer [K={centroids.shape[0]}] tensor, got "
            f"{tuple(centroid_adapter.shape)} {centroid_adapter.dtype}"
        )
    if int(num_adapters) < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if center is not None and center.shape != (dim,):
        raise ValueError(f"center must be [D={dim}], got {tuple(center.shape)}")
    if token_weights is not None and token_weights.shape != (vocab,):
        raise ValueError(f"token_weights must be [V={vocab}], got {tuple(token_weights.shape)}")
    if transform is not None and (transform.shape != (dim, dim) or transform.dtype != torch.float32):
        raise ValueError(f"transform must be an fp32 [D={dim}, D={dim}] matrix, got {tuple(transform.shape)} "
                         f"{transform.dtype}")
    tensors = (embed_weight, centroids, centroid_adapter, center, token_weights, transform)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def check_centroid_adapter_range(centroid_adapter: torch.Tensor, num_adapters: int) -> None:
    """Raise ``ValueError`` if a centroid maps outside ``[0, num_adapters)`` (one device sync)."""
    if centroid_adapter.numel() and bool(((centroid_adapter < 0) | (centroid_adapter >= num_adapters)).any()):
        lo, hi = int(centroid_adapter.min()), int(centroid_adapter.max())
        raise ValueError(f"centroid_adapter values must lie in [0, {num_adapters}), got range [{lo}, {hi}]")


def _check_batch_args(input_ids: torch.Tensor, attention_mask: torch.Tensor, embed_weight: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an int32/int64 [B, T] tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if input_ids.device != embed_weight.device or attention_mask.device != embed_weight.device:
        raise ValueError("input_ids, attention_mask and embed_weight must be on one device")


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
    _check_batch_args(input_ids, attention_mask, embed_weight)
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
    c = centroids if centroids.dtype == torch.float32 else centroids.to(torch.float32)  # [K, D]
    dots = x @ c.T  # [B, K]
    c_norm = torch.linalg.vector_norm(c, dim=-1)  # [K], a reduction: no [K, D] temporary
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [B, 1]
    if distance == "cosine":
        return dots.div_(x_norm.clamp_min(EPS)).div_(c_norm.clamp_min(EPS).unsqueeze(0))
    if distance == "l2":
        sq = dots.mul_(-2.0).add_(x_norm.square()).add_(c_norm.square().unsqueeze(0))  # [B, K]
        return sq.clamp_min_(0.0).sqrt_().neg_()
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


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
    transform: torch.Tensor | None = None,
    distance: str = "cosine",
    return_pooled: bool = False,
):
    """Semantics: scores[b, a] = max_k sim(W (mean_t w E[ids[b,t]] - center), C[k]) over adapter a's centroids.

    The torch specification of the fused kernel (module docstring for every rule) and the CPU path.
    ``input_ids`` [B, T] int32/int64, ``attention_mask`` [B, T], ``embed_weight`` [V, D] fp32/fp16/bf16,
    ``centroids`` [K, D], ``centroid_adapter`` [K] int in [0, A), ``center`` [D], ``token_weights`` [V],
    ``transform`` [D, D] fp32 (whitening ``W``). Returns (scores [B, A] fp32, best [B] int64) and, with
    ``return_pooled``, also the pooled embedding [B, D] fp32 (before centering and whitening).
    """
    check_routing_args(embed_weight, centroids, centroid_adapter, num_adapters, center, token_weights, distance,
                       transform)
    check_centroid_adapter_range(centroid_adapter, num_adapters)
    pooled, weight_sum = pool_embeddings_ref(input_ids, attention_mask, embed_weight, token_weights)
    scores, best = centroid_scores_ref(
        pooled, weight_sum, centroids, centroid_adapter, num_adapters, center=center, transform=transform,
        distance=distance,
    )
    if return_pooled:
        return scores, best, pooled
    return scores, best


def incremental_pool_distance_ref(
    new_ids: torch.Tensor,
    running_sum: torch.Tensor,
    running_weight: torch.Tensor,
    embed_weight: torch.Tensor,
    centroids: torch.Tensor,
    centroid_adapter: torch.Tensor,
    num_adapters: int,
    *,
    new_mask: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    transform: torch.Tensor | None = None,
    distance: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: S[b] += w[b] E[new_ids[b]]; W[b] += w[b]; then score S[b] / W[b] like ``embed_pool_distance``.

    Token-level routing while decoding. ``new_ids`` [B] int32/int64 (the newest token of every row),
    ``running_sum`` [B, D] fp32 and ``running_weight`` [B] fp32 are the weighted sum and weight sum of
    the context so far and are UPDATED IN PLACE; ``w[b] = (new_mask[b] != 0) * token_weights[new_ids[b]]``
    (``new_mask`` [B] optional, default all in; ``token_weights`` [V] optional, default 1). The update is
    O(D) per row; scoring is then exactly ``centroid_scores_ref(S / W, W, ...)``, so after feeding a
    prompt token by token the scores equal ``embed_pool_distance`` on the whole prompt up to fp32
    summation order. Returns (scores [B, A] fp32, best [B] int64); rows with W == 0 get -inf / -1.
    """
    check_routing_args(embed_weight, centroids, centroid_adapter, num_adapters, center, token_weights, distance,
                       transform)
    check_centroid_adapter_range(centroid_adapter, num_adapters)
    pooled, weight_sum = incremental_pool_update_ref(
        new_ids, running_sum, running_weight, embed_weight, new_mask=new_mask, token_weights=token_weights
    )
    return centroid_scores_ref(
        pooled, weight_sum, centroids, centroid_adapter, num_adapters, center=center, transform=transform,
        distance=distance,
    )


def check_incremental_args(
    new_ids: torch.Tensor,
    running_sum: torch.Tensor,
    running_weight: torch.Tensor,
    embed_weight: torch.Tensor,
    new_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validate the incremental state; returns the keep mask [B] bool (no sync)."""
    batch = new_ids.shape[0] if new_ids.dim() == 1 else -1
    if new_ids.dim() != 1 or new_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"new_ids must be an int32/int64 [B] tensor, got {tuple(new_ids.shape)} {new_ids.dtype}")
    dim = embed_weight.shape[1]
    if running_sum.shape != (batch, dim) or running_sum.dtype != torch.float32:
        raise ValueError(f"running_sum must be fp32 [B={batch}, D={dim}], got {tuple(running_sum.shape)} {running_sum.dtype}")
    if running_weight.shape != (batch,) or running_weight.dtype != torch.float32:
        raise ValueError(
            f"running_weight must be fp32 [B={batch}], got {tuple(running_weight.shape)} {running_weight.dtype}"
        )
    if new_mask is not None and new_mask.shape != (batch,):
        raise ValueError(f"new_mask must be [B={batch}], got {tuple(new_mask.shape)}")
    for name, t in (("new_ids", new_ids), ("running_sum", running_sum), ("running_weight", running_weight)):
        if t.device != embed_weight.device:
            raise ValueError(f"{name} must be on {embed_weight.device}, got {t.device}")
    return torch.ones_like(new_ids, dtype=torch.bool) if new_mask is None else new_mask.to(new_ids.device) != 0


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


# --------------------------------------------------------------------------------------------------
# Weighted multi-LoRA delta
# --------------------------------------------------------------------------------------------------

MIXTURE_STRATEGIES = ("gather", "grouped", "dense")


def check_mixture_lora_args(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    """Validate shapes, dtypes, devices and the index range [-1, A) (one device sync); raise ``ValueError``."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [N, IN] tensor, got {tuple(x.shape)} {x.dtype}")
    n, in_features = x.shape
    if lora_A.dim() != 3 or lora_A.shape[2] != in_features:
        raise ValueError(f"lora_A must be [A, R, IN={in_features}], got {tuple(lora_A.shape)}")
    adapters, rank, _ = lora_A.shape
    if lora_B.dim() != 3 or lora_B.shape[0] != adapters or lora_B.shape[2] != rank:
        raise ValueError(f"lora_B must be [A={adapters}, OUT, R={rank}], got {tuple(lora_B.shape)}")
    if scaling.shape != (adapters,):
        raise ValueError(f"scaling must be [A={adapters}], got {tuple(scaling.shape)}")
    if topk_indices.dim() != 2 or topk_indices.shape[0] != n or topk_indices.is_floating_point():
        raise ValueError(f"topk_indices must be an integer [N={n}, k] tensor, got {tuple(topk_indices.shape)} {topk_indices.dtype}")
    if topk_weights.shape != topk_indices.shape or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float {tuple(topk_indices.shape)} tensor, got {tuple(topk_weights.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("scaling", scaling), ("topk_indices", topk_indices),
                    ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    if topk_indices.numel() and bool(((topk_indices < -1) | (topk_indices >= adapters)).any()):
        lo, hi = int(topk_indices.min()), int(topk_indices.max())
        raise ValueError(f"topk_indices must lie in [-1, A={adapters}) (-1 = no adapter), got range [{lo}, {hi}]")


def dense_to_topk(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: the k largest entries of each row of ``weights`` [N, A] as (indices [N, k] int64, values [N, k]).

    Entries whose value is 0 get index -1 (no adapter); values are not renormalised. ``k`` is clamped to A.
    Ties go to the lowest adapter index (stable sort).
    """
    k = min(int(k), weights.shape[-1])
    order = torch.sort(weights, dim=-1, descending=True, stable=True)  # values/indices [N, A]
    values = order.values[:, :k]  # [N, k]
    indices = torch.where(values != 0, order.indices[:, :k], torch.full_like(order.indices[:, :k], -1))
    return indices, values


def _mixture_coefficients(
    scaling: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(safe indices [N, k] int64 with -1 -> 0, coef [N, k] fp32 = w * scaling[idx], 0 where idx == -1 or w == 0)."""
    live = topk_indices >= 0  # [N, k]
    safe = torch.where(live, topk_indices, torch.zeros_like(topk_indices)).long()  # [N, k]
    coef = topk_weights.to(torch.float32) * scaling.to(torch.float32)[safe]  # [N, k]
    return safe, coef.masked_fill(~live, 0.0)


def _mixture_gather(x32, lora_A, lora_B, safe, coef) -> torch.Tensor:
    """Decode strategy: gather every (row, j) adapter's A and B and use two bmm's. Cost ~ N*k*R*(IN+OUT) copies."""
    n, k = safe.shape
    rank = lora_A.shape[1]
    a_sel = lora_A[safe.reshape(-1)].to(torch.float32)  # [N*k, R, IN]
    h = torch.bmm(a_sel.view(n, k * rank, -1), x32.unsqueeze(-1)).view(n, k, rank)  # [N, k, R]
    h = h * coef.unsqueeze(-1)  # [N, k, R]
    b_sel = lora_B[safe.reshape(-1)].to(torch.float32)  # [N*k, OUT, R]
    out = torch.bmm(b_sel, h.reshape(n * k, rank, 1))  # [N*k, OUT, 1]
    return out.view(n, k, -1).sum(dim=1)  # [N, OUT]


def _mixture_grouped(x32, lora_A, lora_B, safe, coef) -> torch.Tensor:
    """Prefill strategy: one (shrink, expand) matmul pair per UNIQUE adapter present; rows gathered per adapter."""
    n, k = safe.shape
    out = torch.zeros(n, lora_B.shape[1], dtype=torch.float32, device=x32.device)  # [N, OUT]
    flat_adapter = safe.reshape(-1)  # [N*k]
    flat_coef = coef.reshape(-1)  # [N*k]
    flat_row = torch.arange(n, device=x32.device).repeat_interleave(k)  # [N*k]
    live = flat_coef != 0  # [N*k]
    flat_adapter, flat_coef, flat_row = flat_adapter[live], flat_coef[live], flat_row[live]
    order = torch.argsort(flat_adapter, stable=True)  # [P]
    flat_adapter, flat_coef, flat_row = flat_adapter[order], flat_coef[order], flat_row[order]
    adapters, counts = torch.unique_consecutive(flat_adapter, return_counts=True)
    start = 0
    for adapter, count in zip(adapters.tolist(), counts.tolist(), strict=True):
        rows = flat_row[start:start + count]  # [n_a]
        coef_a = flat_coef[start:start + count]  # [n_a]
        start += count
        x_a = x32 if count == n and k == 1 else x32.index_select(0, rows)  # [n_a, IN] (rows sorted when k == 1)
        h = (x_a @ lora_A[adapter].to(torch.float32).T) * coef_a.unsqueeze(-1)  # [n_a, R]
        out.index_add_(0, rows, h @ lora_B[adapter].to(torch.float32).T)
    return out


def _mixture_dense(x32, lora_A, lora_B, safe, coef) -> torch.Tensor:
    """Dense strategy: shrink by ALL adapters in one matmul, weight per (row, adapter), expand in one matmul.

    Cost ~ N*A*R*(IN+OUT) flops whatever k: wins when most adapters are used by most rows.
    """
    n = safe.shape[0]
    adapters, rank, in_features = lora_A.shape
    dense = torch.zeros(n, adapters, dtype=torch.float32, device=x32.device).scatter_add_(1, safe, coef)  # [N, A]
    h = x32 @ lora_A.reshape(adapters * rank, in_features).to(torch.float32).T  # [N, A*R]
    h = h.view(n, adapters, rank) * dense.unsqueeze(-1)  # [N, A, R]
    if n * adapters * lora_B.shape[1] <= (1 << 20):  # bmm + sum over A: no relayout of B, small temporary
        return torch.bmm(h.transpose(0, 1), lora_B.to(torch.float32).transpose(1, 2)).sum(dim=0)  # [N, OUT]
    b_stack = lora_B.to(torch.float32).permute(1, 0, 2).reshape(-1, adapters * rank)  # [OUT, A*R]
    return h.reshape(n, adapters * rank) @ b_stack.T  # [N, OUT]


def pick_mixture_strategy(n: int, k: int, adapters: int, unique: int, rank: int, in_features: int,
                          out_features: int, half_weights: bool = False) -> str:
    """Cheapest torch strategy by a cost model fitted on a 2-core AVX-512 CPU (benchmarks/bench_mixture_lora.py).

    Units of ~0.4 ns; ``el`` = elements of one adapter's A and B, ``flop`` = one row through one adapter.
    ``gather`` copies every (row, slot) adapter; ``grouped`` pays a fixed ~80 us, ~25 us + the weights per
    unique adapter, and 1.8x the row flops (row gathers, ``index_add``; 1x for one adapter on every row);
    ``dense`` reads (upcasts) every adapter once and runs N*A row-adapter products in two matmuls.
    """
    el = rank * (in_features + out_features)
    flop = el / 12.0
    gather = 3.2 * n * k * el
    grouped = 200_000 + unique * (60_000 + el) + (1.0 if k == 1 and unique == 1 else 1.8) * n * k * flop
    dense = 150_000 + (0.6 if half_weights else 0.3) * adapters * el + 0.8 * n * adapters * flop
    costs = {"gather": gather, "grouped": grouped, "dense": dense}
    return min(costs, key=costs.get)


def mixture_lora_ref(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    strategy: str | None = None,
) -> torch.Tensor:
    """Semantics: delta[n] = sum_j w[n,j] * scaling[i] * B_i (A_i x[n]) with i = topk_indices[n, j]; i == -1 adds 0.

    ``x`` [N, IN], ``lora_A`` [A, R, IN], ``lora_B`` [A, OUT, R] (ranks zero-padded to R; an adapter that
    does not target the module has all-zero A/B), ``scaling`` [A], ``topk_indices`` [N, k] int in [-1, A),
    ``topk_weights`` [N, k]. Returns delta [N, OUT] in x's dtype; products and sums in fp32 (x, A, B
    upcast; no half-precision matmul). No Python loop over rows. ``strategy``: "gather" (bmm over the
    gathered per-row weights: a single row), "grouped" (one matmul pair per UNIQUE adapter present, rows
    gathered: prefill, k << A), "dense" (shrink by all adapters in one matmul, weight, expand in one
    matmul: k close to A, or small N with few adapters); None picks "grouped" for k == 1 (a selection:
    the rows of each adapter go through exactly PEFT's two matmuls) and ``pick_mixture_strategy`` otherwise.
    """
    check_mixture_lora_args(x, lora_A, lora_B, scaling, topk_indices, topk_weights)
    n, k = topk_indices.shape
    out_features = lora_B.shape[1]
    if n == 0 or k == 0 or lora_A.shape[1] == 0:
        return torch.zeros(n, out_features, dtype=x.dtype, device=x.device)
    safe, coef = _mixture_coefficients(scaling, topk_indices, topk_weights)  # [N, k], [N, k]
    x32 = x if x.dtype == torch.float32 else x.to(torch.float32)  # [N, IN]
    if strategy is None and k == 1:
        strategy = "grouped"  # pure selection: PEFT's own computation (a matmul pair per adapter present)
    if strategy is None:
        unique = int(torch.unique(topk_indices[topk_indices >= 0]).numel())
        strategy = pick_mixture_strategy(n, k, lora_A.shape[0], unique, lora_A.shape[1], x.shape[1], out_features,
                                         half_weights=lora_A.dtype != torch.float32)
    if strategy == "gather":
        out = _mixture_gather(x32, lora_A, lora_B, safe, coef)
    elif strategy == "grouped":
        out = _mixture_grouped(x32, lora_A, lora_B, safe, coef)
    elif strategy == "dense":
        out = _mixture_dense(x32, lora_A, lora_B, safe, coef)
    else:
        raise ValueError(f"strategy must be one of {MIXTURE_STRATEGIES} or None, got {strategy!r}")
    return out.to(x.dtype)
