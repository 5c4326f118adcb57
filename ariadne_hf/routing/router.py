"""The router: centroid tables as buffers, scoring through the fused kernel, and routing decisions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..constants import BASE_ADAPTER
from ..kernels import embed_pool_distance
from .ood import SparseTokenCounts, combine, ood_components_sparse, ood_stats_problem, routing_weights


@dataclass
class RoutingDecision:
    """The routes of one call. Rows are in input order; nothing of it is kept on the model.

    Attributes:
        adapter_names: routed adapter per row; ``"__base__"`` for the plain backbone.
        adapter_indices: int64 [B]; index into `adapter_order`, -1 for ``"__base__"``.
        scores: float32 [B, A]; similarity of each row to each adapter (higher = closer; -inf for empty rows).
        margins: float32 [B]; best minus second-best score (inf with one adapter, nan for empty rows).
        adapter_order: column names of `scores`.
        reasons: per row, why it went where it did: "nearest", "override", "empty", "below_threshold",
            "out_of_distribution" (ood score above the calibrated threshold, with `reject="auto"`).
        ood_scores: float32 [B] or None; how foreign each row is to every adapter (higher = more foreign; mean
            z-score of `ood.COMPONENTS`, calibrated on held-out prompts); nan for empty rows; None when the router
            has no out-of-distribution tables (bundles built before them) or the routes were overridden.
    """

    adapter_names: list[str]
    adapter_indices: torch.Tensor
    scores: torch.Tensor
    margins: torch.Tensor
    adapter_order: list[str]
    reasons: list[str] = field(default_factory=list)
    ood_scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.adapter_names)

    def to_dict(self) -> dict:
        """JSON-serialisable form (for the CLI and logs)."""
        out = {
            "adapter_names": list(self.adapter_names),
            "reasons": list(self.reasons),
            "margins": [float(m) for m in self.margins.tolist()],
            "scores": [dict(zip(self.adapter_order, map(float, row), strict=True)) for row in self.scores.tolist()],
        }
        if self.ood_scores is not None:
            out["ood_scores"] = [float(v) for v in self.ood_scores.tolist()]
        return out


def embedding_fingerprint(embed_weight: torch.Tensor, samples: int = 16) -> list[float]:
    """Norms of `samples` evenly spaced rows of the embedding table [V, D]: a cheap identity check."""
    rows = torch.linspace(0, embed_weight.shape[0] - 1, samples).round().long().to(embed_weight.device)
    return [round(float(v), 6) for v in embed_weight[rows].float().norm(dim=-1).cpu().tolist()]


def fingerprints_match(a: list[float], b: list[float], rtol: float = 2e-2) -> bool:
    """True when two fingerprints agree within `rtol` (loose enough for fp16/bf16 copies of one table)."""
    if len(a) != len(b):
        return False
    return all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-6) for x, y in zip(a, b, strict=True))


def chat_template_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer's chat template puts before and after a single user message.

    (The default system prompt and turn markers of e.g. SmolLM2: tens of tokens identical in every request, which
    would otherwise dilute the mean embedding of a short prompt.) Returns ([], []) without a chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return [], []
    marker = "ARIADNE_USER_MESSAGE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that needs more than one user turn: do not strip anything
        return [], []
    if not isinstance(text, str) or text.count(marker) != 1:
        return [], []
    prefix, suffix = text.split(marker)
    encode = lambda part: tokenizer(part, add_special_tokens=False)["input_ids"] if part else []  # noqa: E731
    return list(encode(prefix)), list(encode(suffix))


def strip_template(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: list[int],
                   suffix: list[int]) -> torch.Tensor:
    """Mask [B, T] without the chat-template prefix/suffix tokens of rows that start/end with them exactly.

    Padding-agnostic: positions are counted over real tokens only. Rows that do not carry the exact affix (raw
    text, another system prompt) are left as they are. One vectorised pass, no loop over rows.
    """
    keep = attention_mask.bool()  # [B, T]
    rank = keep.long().cumsum(dim=1) - 1  # [B, T] index among the row's real tokens
    total = keep.long().sum(dim=1, keepdim=True)  # [B, 1]
    for affix, from_end in ((prefix, False), (suffix, True)):
        size = len(affix)
        if not size:
            continue
        table = torch.tensor(affix, dtype=input_ids.dtype, device=input_ids.device)  # [P]
        position = (total - 1 - rank) if from_end else rank  # [B, T]
        inside = keep & (position < size)  # [B, T]
        expected = table[(size - 1 - position if from_end else position).clamp(0, size - 1)]  # [B, T]
        row_matches = ((~inside) | (input_ids == expected)).all(dim=1) & (total.squeeze(1) > size)  # [B]
        keep = keep & ~(inside & row_matches.unsqueeze(1))
    return keep.to(attention_mask.dtype)


class AriadneRouter(nn.Module):
    """Holds the centroid tables and turns token ids into routes.

    Buffers: `centroids` [K, D] fp32 (unit rows for cosine, in the whitened space), `centroid_adapter` [K] int64,
    `center` [D] fp32 or empty [0], `token_weights` [V] fp32 or empty [0], `transform` [D, D] fp32 (whitening W)
    or empty [0], and the out-of-distribution tables (see `ood.py`): `token_table` (`SparseTokenCounts`, host
    memory, only the tokens each adapter's prompts contain) or None, and `ood_stats` [2, C] fp32 (`ood.OOD_STATS_SHAPE`) or empty [0]. Adapter a owns rows with centroid_adapter == a. A prompt is scored as
    sim(W (pooled - center), C[k]).
    """

    def __init__(self, adapter_names: list[str], embedding_dim: int, distance: str = "cosine"):
        super().__init__()
        self.adapter_names = list(adapter_names)
        self.distance = distance
        self.register_buffer("centroids", torch.zeros(0, embedding_dim), persistent=False)
        self.register_buffer("centroid_adapter", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("center", torch.zeros(0), persistent=False)
        self.register_buffer("token_weights", torch.zeros(0), persistent=False)
        self.register_buffer("transform", torch.zeros(0), persistent=False)
        self.register_buffer("ood_stats", torch.zeros(0), persistent=False)
        self.token_table: SparseTokenCounts | None = None

    # ---- tables -------------------------------------------------------------------------------------------
    def set_tables(
        self,
        centroids: torch.Tensor,
        centroid_adapter: torch.Tensor,
        center: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        transform: torch.Tensor | None = None,
    ) -> None:
        """Replace all tables (validated: shapes agree, every adapter owns at least one centroid)."""
        if centroids.ndim != 2 or centroid_adapter.shape != (centroids.shape[0],):
            raise ValueError(
                f"Router tables disagree: centroids {tuple(centroids.shape)} vs centroid_adapter "
                f"{tuple(centroid_adapter.shape)} (expected [K, D] and [K])."
            )
        owners = torch.bincount(centroid_adapter.cpu(), minlength=len(self.adapter_names))
        if owners.numel() != len(self.adapter_names) or bool((owners == 0).any()):
            raise ValueError(
                f"Router tables disagree with the adapter list {self.adapter_names}: centroid counts per adapter "
                f"{owners.tolist()} (each adapter needs >= 1 centroid, indices < {len(self.adapter_names)})."
            )
        device = self.centroids.device
        self.centroids = centroids.to(device=device, dtype=torch.float32).contiguous()
        self.centroid_adapter = centroid_adapter.to(device=device, dtype=torch.int64).contiguous()
        empty = torch.zeros(0, device=device)
        self.center = empty if center is None else center.to(device=device, dtype=torch.float32).contiguous()
        self.token_weights = (
            empty if token_weights is None else token_weights.to(device=device, dtype=torch.float32).contiguous()
        )
        dim = centroids.shape[1]
        if transform is not None and transform.shape != (dim, dim):
            raise ValueError(f"Router whitening matrix has shape {tuple(transform.shape)}, expected [{dim}, {dim}].")
        self.transform = empty if transform is None else transform.to(device=device, dtype=torch.float32).contiguous()

    def set_ood(self, token_counts: torch.Tensor | SparseTokenCounts | None, stats: torch.Tensor | None) -> None:
        """Set the out-of-distribution tables: token counts (sparse, or dense [A, V] int >= 0 as bundles before
        sparse tables stored them) and z-score stats `ood.OOD_STATS_SHAPE` [2, C] (sd > 0), or None for both (no ood score)."""
        device = self.centroids.device
        if token_counts is None or stats is None:
            self.token_table = None
            self.ood_stats = torch.zeros(0, device=device)
            return
        if isinstance(token_counts, torch.Tensor):
            if token_counts.ndim != 2 or token_counts.shape[0] != len(self.adapter_names):
                raise ValueError(f"Router token counts have shape {tuple(token_counts.shape)}, expected "
                                 f"[{len(self.adapter_names)}, V] (one row per adapter).")
            if token_counts.dtype.is_floating_point or bool((token_counts < 0).any()):
                raise ValueError("Router token counts must be non-negative integers.")
            token_counts = SparseTokenCounts.from_dense(token_counts.cpu())
        if token_counts.num_adapters != len(self.adapter_names):
            raise ValueError(f"Router token counts cover {token_counts.num_adapters} adapters, expected "
                             f"{len(self.adapter_names)} (one per adapter).")
        problem = ood_stats_problem(stats)
        if problem:
            raise ValueError(f"Router ood stats {problem}.")
        self.token_table = token_counts
        self.ood_stats = stats.to(device=device, dtype=torch.float32).contiguous()

    @property
    def token_counts(self) -> torch.Tensor:
        """Dense view [A, V] int64 of the token counts (empty [0] without ood tables; small routers and tests)."""
        return torch.zeros(0, dtype=torch.int64) if self.token_table is None else self.token_table.dense()

    def has_ood(self) -> bool:
        return self.token_table is not None and self.ood_stats.numel() > 0

    def append_adapter(self, name: str, centroids: torch.Tensor, prompt_token_ids: list[list[int]] | None = None) -> None:
        """Add one adapter's centroids [k, D] (and, when the router has ood tables, its prompts' routable token ids)
        at the end; other adapters' centroid rows are untouched."""
        index = len(self.adapter_names)
        if self.has_ood() and prompt_token_ids is None:
            raise ValueError(f"append_adapter({name!r}): this router has ood tables; pass the adapter's prompts' "
                             "token ids.")
        self.adapter_names.append(name)
        owner = torch.full((centroids.shape[0],), index, dtype=torch.int64, device=self.centroid_adapter.device)
        self.centroids = torch.cat([self.centroids, centroids.to(self.centroids)])
        self.centroid_adapter = torch.cat([self.centroid_adapter, owner])
        if self.has_ood():
            self.token_table = self.token_table.append(prompt_token_ids)

    def drop_adapter(self, name: str) -> None:
        """Remove one adapter and its centroids; later adapters shift down by one index."""
        index = self.adapter_names.index(name)
        keep = self.centroid_adapter != index
        shifted = self.centroid_adapter[keep]
        self.centroids = self.centroids[keep]
        self.centroid_adapter = torch.where(shifted > index, shifted - 1, shifted)
        self.adapter_names.pop(index)
        if self.has_ood():
            self.token_table = self.token_table.drop(index)

    def optional_center(self) -> torch.Tensor | None:
        return self.center if self.center.numel() else None

    def optional_token_weights(self) -> torch.Tensor | None:
        return self.token_weights if self.token_weights.numel() else None

    def optional_transform(self) -> torch.Tensor | None:
        return self.transform if self.transform.numel() else None

    # ---- routing ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        embed_weight: torch.Tensor,
        *,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused pass: ids [B, T] -> (scores [B, A] fp32, best [B] int64, -1 for rows with no tokens)."""
        device = embed_weight.device
        transform = self.optional_transform()
        return embed_pool_distance(
            input_ids.to(device),
            attention_mask.to(device),
            embed_weight,
            self.centroids.to(device),
            self.centroid_adapter.to(device),
            len(self.adapter_names),
            center=None if self.optional_center() is None else self.center.to(device),
            token_weights=None if self.optional_token_weights() is None else self.token_weights.to(device),
            transform=None if transform is None else transform.to(device),
            distance=self.distance,
            backend=backend,
        )

    @torch.no_grad()
    def score_pooled(self, pooled: torch.Tensor, weight_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score already pooled rows [B, D] (weight sums [B], 0 = empty row): (scores [B, A] fp32, best [B] int64),
        the semantics of `score` after its pooling step (`centroid_scores_ref`)."""
        from ..kernels.pool_distance_torch import centroid_scores_ref

        device = self.centroids.device
        return centroid_scores_ref(pooled.to(device), weight_sum.to(device), self.centroids, self.centroid_adapter,
                                   len(self.adapter_names), center=self.optional_center(),
                                   transform=self.optional_transform(), distance=self.distance)

    @torch.no_grad()
    def context(self, input_ids, attention_mask, embed_weight, *, backend: str | None = None):
        """Score the prompts and return the state token routing continues from.

        Returns (scores [B, A], best [B], running_sum [B, D] fp32, running_weight [B] fp32) where running_sum /
        running_weight is the pooled (un-centered) prompt embedding and running_weight the pooling weight sum.
        """
        device = embed_weight.device
        ids, mask = input_ids.to(device), attention_mask.to(device)
        scores, best, pooled = embed_pool_distance(
            ids, mask, embed_weight, self.centroids.to(device), self.centroid_adapter.to(device),
            len(self.adapter_names), center=self.optional_center(), token_weights=self.optional_token_weights(),
            transform=self.optional_transform(), distance=self.distance, backend=backend, return_pooled=True,
        )
        weight = mask.to(torch.float32)  # [B, T]
        if self.optional_token_weights() is not None:
            safe = torch.where(mask.bool(), ids, torch.zeros_like(ids)).long()
            weight = weight * self.token_weights.to(device)[safe]
        running_weight = weight.sum(dim=-1)  # [B]
        return scores, best, pooled * running_weight.unsqueeze(-1), running_weight

    @torch.no_grad()
    def ood_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   scores: torch.Tensor) -> torch.Tensor | None:
        """Out-of-distribution score [B] fp32 of scored rows (`ood.py`), nan for empty rows; None without tables.

        One extra host step after the routing kernel: [B, T] binary searches in the sparse token counts."""
        if not self.has_ood():
            return None
        weights = routing_weights(input_ids.cpu(), attention_mask.cpu(), self.optional_token_weights())  # [B, T]
        components = ood_components_sparse(input_ids, weights, scores, self.token_table)  # [B, C]
        return combine(components, self.ood_stats.cpu()).float()

    def decide(
        self, scores: torch.Tensor, best: torch.Tensor, reject_threshold: float | None = None,
        ood_scores: torch.Tensor | None = None, ood_threshold: float | None = None,
    ) -> RoutingDecision:
        """Turn scores into a decision: nearest adapter, or ``"__base__"`` for empty rows, rows whose best score is
        below `reject_threshold`, and rows whose `ood_scores` [B] exceed `ood_threshold`."""
        scores = scores.float().cpu()
        best = best.cpu()
        best_score = scores.max(dim=-1).values if scores.shape[1] else torch.full((scores.shape[0],), float("-inf"))
        if scores.shape[1] >= 2:
            top2 = scores.topk(2, dim=-1).values  # [B, 2]
            margins = top2[:, 0] - top2[:, 1]
        else:
            margins = torch.full((scores.shape[0],), float("inf"))
        empty = best < 0
        margins = torch.where(empty, torch.full_like(margins, float("nan")), margins)
        indices = best.clone()
        reasons = ["empty" if e else "nearest" for e in empty.tolist()]
        if reject_threshold is not None:
            low = (~empty) & (best_score < reject_threshold)
            indices[low] = -1
            reasons = ["below_threshold" if lo else r for lo, r in zip(low.tolist(), reasons, strict=True)]
        if ood_threshold is not None and ood_scores is not None:
            foreign = (~empty) & (indices >= 0) & (ood_scores.cpu() > ood_threshold)
            indices[foreign] = -1
            reasons = ["out_of_distribution" if f else r for f, r in zip(foreign.tolist(), reasons, strict=True)]
        names = [BASE_ADAPTER if i < 0 else self.adapter_names[i] for i in indices.tolist()]
        return RoutingDecision(names, indices, scores, margins, list(self.adapter_names), reasons,
                               None if ood_scores is None else ood_scores.float().cpu())
