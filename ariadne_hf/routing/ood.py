"""Out-of-distribution score of a routing decision (torch reference: the spec and the only path).

Semantics (higher = more foreign). For a row b with routing weights w[b, t] (mask x token weights: special and
chat-template tokens weigh 0), scores s[b, :] from the router and routed adapter a* = argmax_a s[b, a]:

    c0 = -s[b, a*]                                                  best similarity, negated
    c1 = -(s[b, a*] - second_best)                                  top-2 margin, negated (0 with one adapter)
    c2 = 1 - sum_t w[b,t] seen[a*, ids[b,t]] / sum_t w[b,t]          share of tokens never seen in a*'s prompts
    c3 = -sum_t w[b,t] llr[a*, ids[b,t]] / sum_t w[b,t]              unigram log-likelihood ratio, negated
    ood[b] = mean_j (c_j - mu_j) / sd_j                              z-scores from cross-fitted held-out prompts

The components are the entries of `COMPONENT_REGISTRY` (one `OodComponent` each, computed from the per-row
`RowEvidence`); `COMPONENTS` (their names) and `OOD_STATS_SHAPE` ([2, C]: mean and sd per component, the bundle's
``router.ood_stats``) follow from it, and `ood_stats_problem` is the one check of those statistics (router and bundle
loading). Adding a component: an `OodComponent` entry below (and, when it needs a per-row quantity not in
`RowEvidence` yet, a field there and its line in `_evidence`); calibration, scoring and the checks follow. Bundles
store the statistics of the components they were calibrated with: a bundle saved with other components fails
loading with a clear error (rebuild it).

``seen[a, v] = counts[a, v] > 0`` and ``llr[a, v] = log p_a(v) - log p_bg(v)`` with add-`ALPHA` smoothed unigram
models of adapter a's building prompts (``p_a``) and of all adapters' prompts (``p_bg``), from ``counts`` [A, V]
(token occurrences per adapter). Everything runs after the routing kernel on its scores: one gather of [B, T]
entries from two [A, V] tables, no backbone layer. Study and choice: docs/routing_quality.md ("Out of distribution").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ALPHA = 0.1
"""Additive smoothing of the unigram models (a fixed constant, not tuned)."""


@dataclass(frozen=True)
class RowEvidence:
    """What the components are computed from, per scored row (each [B] fp32; `_evidence`)."""

    best_score: torch.Tensor  # s[b, a*]
    margin: torch.Tensor  # s[b, a*] - second best (0 with one adapter)
    seen_share: torch.Tensor  # sum_t w seen[a*, id] / sum_t w
    mean_llr: torch.Tensor  # sum_t w llr[a*, id] / sum_t w


@dataclass(frozen=True)
class OodComponent:
    """One raw component of the ood score: ``name`` and ``value(evidence)`` [B] (higher = more foreign)."""

    name: str
    value: Callable[[RowEvidence], torch.Tensor]


COMPONENT_REGISTRY: tuple[OodComponent, ...] = (
    OodComponent("neg_best", lambda e: -e.best_score),
    OodComponent("neg_margin", lambda e: -e.margin),
    OodComponent("unseen_share", lambda e: 1.0 - e.seen_share),
    OodComponent("neg_unigram_llr", lambda e: -e.mean_llr),
)
"""The components, in the column order of the statistics (module docstring)."""

COMPONENTS = tuple(c.name for c in COMPONENT_REGISTRY)
OOD_STATS_SHAPE = (2, len(COMPONENTS))
"""Shape of the z-score statistics: row 0 the mean, row 1 the sd of each component (``router.ood_stats``)."""


def ood_stats_problem(stats: torch.Tensor) -> str | None:
    """What is wrong with z-score statistics (``"must be finite [2, C] with positive sd, got (...)"``), or None."""
    if (tuple(stats.shape) == OOD_STATS_SHAPE and bool(torch.isfinite(stats).all())
            and bool((stats[1] > 0).all())):
        return None
    return f"must be finite {list(OOD_STATS_SHAPE)} with positive sd, got {tuple(stats.shape)}"


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


def _evidence(input_ids: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor,
              lookup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The raw components [B, C] (COMPONENTS order); rows with no weight or no finite score get nan.

    ``input_ids`` [B, T], ``weights`` [B, T] fp32 on the device of ``scores`` [B, A]; ``lookup(adapters, ids)``
    ([B, T] each) returns (seen [B, T] bool, llr [B, T] fp32) of the dense or the sparse token tables.
    """
    ids = input_ids.long()
    best_score, best = scores.max(dim=1)  # [B]
    if scores.shape[1] >= 2:
        margin = best_score - scores.topk(2, dim=1).values[:, 1]  # [B]
    else:
        margin = torch.zeros_like(best_score)
    safe = torch.where(weights > 0, ids, torch.zeros_like(ids))  # [B, T]
    seen, llr = lookup(best.unsqueeze(1).expand_as(safe), safe)  # [B, T] each
    total = weights.sum(dim=1)  # [B]
    denominator = total.clamp_min(1e-12)
    evidence = RowEvidence(best_score=best_score, margin=margin,
                           seen_share=(seen.float() * weights).sum(1) / denominator,
                           mean_llr=(llr * weights).sum(1) / denominator)
    out = torch.stack([c.value(evidence) for c in COMPONENT_REGISTRY], dim=1)  # [B, C]
    invalid = (total <= 0) | ~torch.isfinite(best_score)
    return torch.where(invalid.unsqueeze(1), torch.full_like(out, float("nan")), out)


def ood_components(input_ids: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor,
                   llr: torch.Tensor) -> torch.Tensor:
    """The raw components [B, C] (COMPONENTS order) from dense token tables; nan rows as `_evidence`.

    ``input_ids`` [B, T], ``weights`` [B, T] fp32 (0 = ignored position), ``scores`` [B, A] (higher = closer),
    ``seen`` [A, V] bool, ``llr`` [A, V] fp32.
    """
    scores = scores.float()
    device = scores.device
    seen, llr = seen.to(device), llr.to(device)
    return _evidence(input_ids.to(device), weights.to(device=device, dtype=torch.float32), scores,
                     lambda rows, safe: (seen[rows, safe], llr[rows, safe]))


def combine(components: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """ood [B] = mean_j (components[:, j] - stats[0, j]) / stats[1, j]; ``stats`` OOD_STATS_SHAPE = (mean, sd)."""
    return ((components - stats[0].to(components)) / stats[1].to(components)).mean(dim=1)


def routing_weights(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_weights: torch.Tensor | None) -> torch.Tensor:
    """The pooling weights routing uses, per position [B, T] fp32: mask x token_weights[id]."""
    weights = attention_mask.to(torch.float32)
    if token_weights is not None:
        safe = torch.where(attention_mask.bool(), input_ids, torch.zeros_like(input_ids)).long()
        weights = weights * token_weights.to(weights.device)[safe.to(weights.device)]
    return weights


class SparseTokenCounts:
    """Per-adapter token counts stored sparse: only the tokens an adapter's prompts contain.

    ``keys`` [nnz] int64, sorted and unique, ``adapter * vocab + token``; ``values`` [nnz] int64 > 0 (occurrences).
    Memory is 16 bytes per (adapter, distinct token) pair instead of 8 * V per adapter; `seen_llr` answers the
    [B, T] lookups of `ood_components` by binary search (O(B T log nnz), flat in the adapter count) and gives
    exactly the dense `token_tables` values (tested).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_adapters: int, vocab: int):
        if keys.ndim != 1 or values.shape != keys.shape:
            raise ValueError(f"Sparse token counts: keys {tuple(keys.shape)} and values {tuple(values.shape)} must be "
                             "[nnz] each.")
        if keys.dtype.is_floating_point or values.dtype.is_floating_point:
            raise ValueError("Sparse token counts must be integers.")
        keys, values = keys.long().contiguous(), values.long().contiguous()
        if keys.numel() and (bool((keys[1:] <= keys[:-1]).any()) or int(keys[0]) < 0
                             or int(keys[-1]) >= num_adapters * vocab or bool((values <= 0).any())):
            raise ValueError("Sparse token counts: keys must be sorted, unique and in [0, A * V); values > 0.")
        self.keys, self.values, self.num_adapters, self.vocab = keys, values, int(num_adapters), int(vocab)
        adapters = keys // vocab  # [nnz]
        self.totals = torch.zeros(num_adapters, dtype=torch.float64).index_add_(0, adapters, values.double())  # [A]
        self.background = torch.zeros(vocab, dtype=torch.float64).index_add_(0, keys % vocab, values.double())  # [V]

    @classmethod
    def from_dense(cls, counts: torch.Tensor) -> SparseTokenCounts:
        """From dense counts [A, V] (bundles written before sparse tables)."""
        flat = counts.reshape(-1)
        keys = (flat > 0).nonzero().squeeze(1)
        return cls(keys, flat[keys], counts.shape[0], counts.shape[1])

    @classmethod
    def from_token_ids(cls, per_adapter: list[list[list[int]]], vocab: int) -> SparseTokenCounts:
        """From each adapter's prompts as token-id lists (`per_adapter[a]`)."""
        keys, values = [], []
        for adapter, prompts in enumerate(per_adapter):
            row = sparse_row([t for ids in prompts for t in ids])
            keys.append(row[0] + adapter * vocab)
            values.append(row[1])
        return cls(torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64),
                   torch.cat(values) if values else torch.zeros(0, dtype=torch.int64), len(per_adapter), vocab)

    def dense(self) -> torch.Tensor:
        """Counts [A, V] int64 (tests and small routers only)."""
        out = torch.zeros(self.num_adapters * self.vocab, dtype=torch.int64)
        out[self.keys] = self.values
        return out.reshape(self.num_adapters, self.vocab)

    def nbytes(self) -> int:
        return self.keys.numel() * 8 + self.values.numel() * 8

    def lookup(self, adapters: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Counts [B, T] int64 of token ids [B, T] in the rows' adapters [B, T]."""
        query = adapters.long().cpu() * self.vocab + ids.long().cpu()  # [B, T]
        if not self.keys.numel():
            return torch.zeros_like(query)
        position = torch.searchsorted(self.keys, query.reshape(-1)).clamp_max(self.keys.numel() - 1)
        found = self.keys[position] == query.reshape(-1)
        return torch.where(found, self.values[position], torch.zeros_like(position)).reshape(query.shape)

    def seen_llr(self, adapters: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen [B, T] bool, llr [B, T] fp32) at (adapter, token) pairs: `token_tables`' entries."""
        counts = self.lookup(adapters, ids).double()  # [B, T]
        ids = ids.long().cpu()
        p_adapter = (counts + ALPHA) / (self.totals[adapters.long().cpu()] + ALPHA * self.vocab)
        p_background = (self.background[ids] + ALPHA) / (self.background.sum() + ALPHA * self.vocab)
        return counts > 0, (p_adapter.log() - p_background.log()).to(torch.float32)

    def append(self, prompts: list[list[int]]) -> SparseTokenCounts:
        """These counts plus one adapter (its prompts' token ids) at the end."""
        keys, values = sparse_row([t for ids in prompts for t in ids])
        return SparseTokenCounts(torch.cat([self.keys, keys + self.num_adapters * self.vocab]),
                                 torch.cat([self.values, values]), self.num_adapters + 1, self.vocab)

    def drop(self, index: int) -> SparseTokenCounts:
        """These counts without adapter `index` (later adapters shift down by one)."""
        adapters = self.keys // self.vocab
        keep = adapters != index
        keys = self.keys[keep]
        keys = torch.where(keys // self.vocab > index, keys - self.vocab, keys)
        return SparseTokenCounts(keys, self.values[keep], self.num_adapters - 1, self.vocab)


def sparse_row(token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct token ids [n] int64 sorted, their counts [n] int64) of one adapter's tokens."""
    if not token_ids:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    ids, counts = torch.unique(torch.tensor(token_ids, dtype=torch.int64), return_counts=True)
    return ids, counts


def ood_components_sparse(input_ids: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor,
                          tables: SparseTokenCounts) -> torch.Tensor:
    """`ood_components` with the token tables looked up in sparse counts (on CPU): the same [B, C] values."""
    return _evidence(input_ids.cpu(), weights.cpu().to(torch.float32), scores.float().cpu(), tables.seen_llr)
