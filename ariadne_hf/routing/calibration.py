"""Cross-fitted calibration of the out-of-distribution score, and the metrics that judge it.

The reject threshold is never fit on the prompts that built the router: each adapter's prompts are split into
`folds` parts (seeded); for each fold the router state (center, whitening, centroids, token tables) is rebuilt
from the other parts exactly as `build_router_tables` builds it, and the held-out part is scored. The z-score
statistics of `ood.COMPONENTS` and the threshold (the (1 - reject_rate) quantile of the held-out ood scores) come
from these held-out scores only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels.pool_distance_torch import centroid_scores_ref
from .ood import COMPONENTS, SparseTokenCounts, combine, ood_components_sparse

DEFAULT_FOLDS = 5
DEFAULT_REJECT_RATE = 0.02


@dataclass
class OodCalibration:
    """token_counts (sparse per-adapter counts), stats [2, C] fp32 (mean, sd per component: `ood.OOD_STATS_SHAPE`), threshold, info."""

    token_counts: SparseTokenCounts
    stats: torch.Tensor
    threshold: float
    info: dict


def routable_token_ids(prompts: Sequence[str], tokenizer, token_weights: torch.Tensor | None, *,
                       max_length: int) -> list[list[int]]:
    """Each prompt's token ids with weight > 0, tokenized as `embedding.embed_prompts` does; prompts without a
    routable token are dropped (as `embed_prompts` drops them), so the result aligns with its rows."""
    out = []
    for start in range(0, len(prompts), 256):
        encoded = tokenizer(list(prompts[start:start + 256]), truncation=True, max_length=max_length)["input_ids"]
        for ids in encoded:
            kept = [t for t in ids if token_weights is None or float(token_weights[t]) > 0]
            if kept:
                out.append(kept)
    return out


def _pad(token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, T] and 0/1 weights [N, T]."""
    width = max(1, max((len(x) for x in token_ids), default=1))
    ids = torch.zeros(len(token_ids), width, dtype=torch.int64)
    weights = torch.zeros(len(token_ids), width)
    for i, x in enumerate(token_ids):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.int64)
        weights[i, :len(x)] = 1.0
    return ids, weights


def fold_assignment(sizes: Sequence[int], folds: int, seed: int) -> list[list[int]]:
    """Per adapter, a fold index for each prompt (shuffled with random.Random(seed), round-robin); adapters with
    one prompt get fold -1 (never held out: their adapter would have no prompt left)."""
    rng = random.Random(seed)
    out = []
    for size in sizes:
        if size < 2:
            out.append([-1] * size)
            continue
        order = list(range(size))
        rng.shuffle(order)
        assignment = [0] * size
        for position, index in enumerate(order):
            assignment[index] = position % min(folds, size)
        out.append(assignment)
    return out


def calibrate_ood(pooled: Sequence[torch.Tensor], token_ids: Sequence[list[list[int]]], vocab_size: int, *,
                  build_kwargs: dict, reject_rate: float = DEFAULT_REJECT_RATE, folds: int = DEFAULT_FOLDS,
                  seed: int = 0) -> OodCalibration:
    """Cross-fitted calibration from each adapter's pooled prompts `pooled[a]` [N_a, D] and the matching routable
    token ids `token_ids[a]` (N_a lists). `build_kwargs` are `build_router_tables`' options (the router's own).

    Guarantees: deterministic for a seed; no held-out prompt is used to build the state that scores it; the returned
    token counts are those of all prompts (the final router's tables). Raises ValueError when fewer than 2 prompts
    per adapter leave nothing to hold out, or when reject_rate is outside (0, 0.5].
    """
    from .centroids import build_router_tables

    if not 0.0 < float(reject_rate) <= 0.5:
        raise ValueError(f"reject_rate must be in (0, 0.5] (a target in-domain false-reject rate), got {reject_rate}.")
    if folds < 2:
        raise ValueError(f"Calibration needs at least 2 folds, got {folds}.")
    sizes = [int(p.shape[0]) for p in pooled]
    if [len(t) for t in token_ids] != sizes:
        raise ValueError("calibrate_ood: token_ids and pooled disagree in prompt counts per adapter.")
    assignment = fold_assignment(sizes, folds, seed)
    if all(max(a, default=-1) < 0 for a in assignment):
        raise ValueError("Cannot calibrate the reject threshold: every adapter has a single prompt. Give each adapter "
                         "several prompts, or pass an explicit reject_threshold.")
    held_components = []
    for fold in range(folds):
        train = [[i for i, f in enumerate(fa) if f != fold] for fa in assignment]
        held = [[i for i, f in enumerate(fa) if f == fold] for fa in assignment]
        if not any(held):
            continue
        tables = build_router_tables([p[idx] for p, idx in zip(pooled, train, strict=True)], seed=seed,
                                     **build_kwargs)
        counts = SparseTokenCounts.from_token_ids([[ids[i] for i in idx] for ids, idx in zip(token_ids, train,
                                                                                               strict=True)], vocab_size)
        rows = torch.cat([p[idx] for p, idx in zip(pooled, held, strict=True) if idx])  # [n, D]
        scores, _ = centroid_scores_ref(rows, torch.ones(rows.shape[0]), tables.centroids, tables.centroid_adapter,
                                        len(pooled), center=tables.center, transform=tables.transform,
                                        distance=build_kwargs.get("distance", "cosine"))  # [n, A]
        ids, weights = _pad([ids[i] for ids, idx in zip(token_ids, held, strict=True) for i in idx])
        held_components.append(ood_components_sparse(ids, weights, scores, counts))
    components = torch.cat(held_components)  # [N_held, C]
    components = components[torch.isfinite(components).all(dim=1)]
    mean = components.mean(dim=0)
    sd = components.std(dim=0) if components.shape[0] > 1 else torch.ones_like(mean)
    sd = torch.where(torch.isfinite(sd) & (sd > 1e-6), sd, torch.ones_like(sd))  # constant component: no scale
    stats = torch.stack([mean, sd]).float()  # [2, C]
    held_scores = combine(components, stats)  # [N_held]
    threshold = float(torch.quantile(held_scores.double(), 1.0 - float(reject_rate)))
    final_counts = SparseTokenCounts.from_token_ids(list(token_ids), vocab_size)
    info = {
        "method": "cross_fit",
        "score": "mean z-score of " + ", ".join(COMPONENTS),
        "target_reject_rate": float(reject_rate),
        "folds": int(folds),
        "seed": int(seed),
        "heldout_prompts": int(held_scores.numel()),
        "heldout_reject_rate": float((held_scores > threshold).float().mean()),
        "threshold": threshold,
    }
    return OodCalibration(final_counts, stats, threshold, info)


# ---- metrics ---------------------------------------------------------------------------------------------------
def auroc(in_domain: torch.Tensor, ood: torch.Tensor) -> float:
    """P(an out-of-distribution score > an in-domain score), ties counted half (Mann-Whitney U / (n_in n_ood))."""
    a, b = in_domain.double().flatten(), ood.double().flatten()
    if not a.numel() or not b.numel():
        raise ValueError("AUROC needs at least one in-domain and one out-of-distribution score.")
    values = torch.cat([a, b])
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    counts = counts.double()
    first_rank = torch.cumsum(counts, 0) - counts + 1  # rank of the first element of each tie group
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]  # average ranks, 1-based
    n_b = b.numel()
    return float((ranks[a.numel():].sum() - n_b * (n_b + 1) / 2) / (a.numel() * n_b))


def fpr_at_tpr(in_domain: torch.Tensor, ood: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of out-of-distribution prompts accepted at the threshold that accepts `tpr` of in-domain prompts
    (in-domain = positives, accepted = score <= threshold)."""
    threshold = torch.quantile(in_domain.double().flatten(), tpr)
    return float((ood.double() <= threshold).double().mean())


def ood_summary(in_domain: torch.Tensor, ood: torch.Tensor, threshold: float | None) -> dict:
    """AUROC, FPR at 95% TPR and, at `threshold`, in-domain false rejects and out-of-distribution rejects."""
    in_domain = in_domain[torch.isfinite(in_domain)]
    ood = ood[torch.isfinite(ood)]
    out = {"auroc": auroc(in_domain, ood), "fpr_at_95_tpr": fpr_at_tpr(in_domain, ood, 0.95),
           "in_domain_prompts": int(in_domain.numel()), "ood_prompts": int(ood.numel()), "threshold": threshold}
    if threshold is not None:
        out["in_domain_false_reject_rate"] = float((in_domain > threshold).double().mean())
        out["ood_reject_rate"] = float((ood > threshold).double().mean())
    return out


# ---- glue for the model (kept here so modeling_ariadne.py only calls in) -----------------------------------------
def calibrate_for_build(prompt_lists: dict[str, list[str]], pooled: dict[str, torch.Tensor], tokenizer,
                        token_weights: torch.Tensor | None, vocab_size: int, *, max_length: int, build_kwargs: dict,
                        reject_rate: float, seed: int, required: bool) -> OodCalibration | None:
    """`calibrate_ood` for `from_adapters`: tokenizes each adapter's prompts like `embed_prompts` and records the
    adapter list in `info["adapters"]`. Returns None (with a warning) when calibration is impossible and not
    `required` (reject="auto" was not asked for); raises ValueError otherwise."""
    import logging

    names = list(prompt_lists)
    try:
        token_ids = [routable_token_ids(prompt_lists[n], tokenizer, token_weights, max_length=max_length)
                     for n in names]
        calibration = calibrate_ood([pooled[n] for n in names], token_ids, vocab_size, build_kwargs=build_kwargs,
                                    reject_rate=reject_rate, seed=seed)
    except ValueError as err:
        if required:
            raise ValueError(f"reject='auto' needs a calibrated threshold: {err}") from err
        logging.getLogger(__name__).warning("No out-of-distribution calibration: %s", err)
        return None
    calibration.info["adapters"] = names
    return calibration


def calibration_stale(config) -> str | None:
    """Why the stored calibration does not match the model's adapters (None when it is current or absent)."""
    info = getattr(config, "ood_calibration", None)
    if not info:
        return None
    if list(info.get("adapters", [])) != list(config.adapter_names):
        return (f"calibrated for adapters {info.get('adapters')} but the model now has {list(config.adapter_names)} "
                "(add_adapter/remove_adapter since)")
    return None


def auto_threshold(config, has_tables: bool) -> float:
    """The ood threshold `reject="auto"` applies; a clear error when the bundle has no calibration."""
    if not has_tables or getattr(config, "ood_threshold", None) is None:
        raise ValueError("reject='auto' needs a calibrated out-of-distribution threshold, and this model has none "
                         "(built before ariadne_hf calibrated it, or from prompts too few to hold any out). Rebuild it "
                         "with AriadneRoutedModel.from_adapters(..., reject='auto'), or pass reject_threshold=.")
    return float(config.ood_threshold)
