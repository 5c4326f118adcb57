"""Kernel test cases shared by the torch, Triton and dispatch kernel tests: case builders, float64 oracles,
tolerances and route comparison, and the import of a Triton file in Triton's interpreter. No tests here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def triton_interpreter_module(name: str):
    """Import the Triton file ``ariadne_hf.kernels.<name>`` with its kernels running in Triton's interpreter.

    ``TRITON_INTERPRET=1`` only takes effect for ``@triton.jit`` functions created after it is set, and
    triton's own standard library (``tl.sum``, ``tl.zeros``...) is created when triton is first imported.
    When something (a conftest importing transformers) imported triton earlier, reload triton's standard
    library and the kernel module so that everything is interpreted. Setting ``TRITON_INTERPRET=1`` at the
    top of ``tests/conftest.py`` makes this a no-op.
    """
    import importlib
    import os
    import sys

    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        importlib.reload(sys.modules["triton.language.standard"])
        importlib.reload(sys.modules["triton.language"])
    module = importlib.import_module(f"ariadne_hf.kernels.{name}")
    if not module.INTERPRETED:
        module = importlib.reload(module)
    assert module.INTERPRETED and isinstance(tl.sum, InterpretedFunction)
    return module


# ---- case builders ------------------------------------------------------------------------------------------


def make_mask(lengths: list[int], tokens: int, padding: str) -> torch.Tensor:
    """[B, T] int64 mask with ``lengths[b]`` ones, at the right end ("left" padding) or the left end ("right")."""
    mask = torch.zeros(len(lengths), tokens, dtype=torch.int64)
    for b, n in enumerate(lengths):
        if n:
            if padding == "left":
                mask[b, tokens - n:] = 1
            else:
                mask[b, :n] = 1
    return mask


def make_case(
    batch, tokens, vocab, dim, num_centroids, num_adapters, *, dtype=torch.float32, padding="right",
    empty_rows=(), center=False, token_weights=False, seed=0, id_dtype=torch.int64, sorted_groups=False,
):
    """A routing problem with random shapes; masked-out positions hold ids outside [0, V) (must never be read).

    ``sorted_groups``: centroids sorted by adapter in equal groups (as the router builds them; K % A == 0).
    """
    g = torch.Generator().manual_seed(seed)
    if padding == "none":
        lengths = [tokens] * batch
    else:
        lengths = torch.randint(1, tokens + 1, (batch,), generator=g).tolist()
    for b in empty_rows:
        lengths[b] = 0
    mask = make_mask(lengths, tokens, "left" if padding == "left" else "right")
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, vocab + 7)).to(id_dtype)  # garbage at pads
    table = torch.randn(vocab, dim, generator=g).to(dtype)
    # Centroids near some pooled rows so that routes are meaningful, plus noise.
    centroids = torch.randn(num_centroids, dim, generator=g) * 0.3
    centroids += torch.randn(1, dim, generator=g)
    c2a = torch.randint(0, num_adapters, (num_centroids,), generator=g)
    if sorted_groups:
        c2a = torch.arange(num_adapters).repeat_interleave(num_centroids // num_adapters)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "embed_weight": table,
        "centroids": centroids,
        "centroid_adapter": c2a,
        "num_adapters": num_adapters,
        "center": torch.randn(dim, generator=g) * 0.5 if center else None,
        "token_weights": torch.rand(vocab, generator=g) * (torch.rand(vocab, generator=g) > 0.2) if token_weights else None,
    }


def call(fn, case, **kwargs):
    args = (case["input_ids"], case["attention_mask"], case["embed_weight"], case["centroids"],
            case["centroid_adapter"], case["num_adapters"])
    return fn(*args, center=case["center"], token_weights=case["token_weights"], **kwargs)


# ---- oracles ------------------------------------------------------------------------------------------------


def oracle_route(case, distance="cosine"):
    """Per-row Python loop in float64: (scores [B, A], best [B], pooled [B, D], weight_sum [B])."""
    ids, mask, table = case["input_ids"], case["attention_mask"], case["embed_weight"].double()
    cents, c2a, num_adapters = case["centroids"].double(), case["centroid_adapter"].tolist(), case["num_adapters"]
    tokw = case["token_weights"]
    batch, dim = ids.shape[0], table.shape[1]
    scores = torch.full((batch, num_adapters), -math.inf, dtype=torch.float64)
    best = torch.full((batch,), -1, dtype=torch.int64)
    pooled = torch.zeros(batch, dim, dtype=torch.float64)
    weight_sums = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        total = torch.zeros(dim, dtype=torch.float64)
        wsum = 0.0
        for t in range(ids.shape[1]):
            if mask[b, t] == 0:
                continue
            w = 1.0 if tokw is None else float(tokw[int(ids[b, t])])
            total += w * table[int(ids[b, t])]
            wsum += w
        weight_sums[b] = wsum
        if wsum == 0:
            continue
        pooled[b] = total / wsum
        x = pooled[b] - (0 if case["center"] is None else case["center"].double())
        for k in range(cents.shape[0]):
            c = cents[k]
            if distance == "cosine":
                sim = float(x @ c) / (max(float(x.norm()), 1e-12) * max(float(c.norm()), 1e-12))
            else:
                sim = -float((x - c).norm())
            scores[b, c2a[k]] = max(float(scores[b, c2a[k]]), sim)
        row = scores[b].tolist()
        top = max(row)
        if top > -math.inf:
            best[b] = row.index(top)
    return scores, best, pooled, weight_sums


def oracle_embedding_bag(case):
    """nn.EmbeddingBag(mode="mean") over the kept ids, then cosine to every centroid and a per-adapter max."""
    table = case["embed_weight"].float()
    bag = torch.nn.EmbeddingBag(table.shape[0], table.shape[1], mode="mean", _weight=table)
    keep = case["attention_mask"].bool()
    flat = case["input_ids"][keep].long()
    lengths = keep.sum(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    pooled = bag(flat, offsets)  # [B, D]
    x = pooled - (0 if case["center"] is None else case["center"])
    sim = F.cosine_similarity(x.unsqueeze(1), case["centroids"].unsqueeze(0), dim=-1)  # [B, K]
    scores = torch.full((x.shape[0], case["num_adapters"]), -math.inf)
    for k, a in enumerate(case["centroid_adapter"].tolist()):
        scores[:, a] = torch.maximum(scores[:, a], sim[:, k])
    scores[lengths == 0] = -math.inf
    return scores


def score_tolerance(dtype: torch.dtype, distance: str, scores: torch.Tensor) -> torch.Tensor:
    """Precision-scaled tolerance: fp32 sums of the table's values; relative for l2 (scores scale with |x|)."""
    base = {torch.float32: 2e-5, torch.float16: 5e-5, torch.bfloat16: 1e-4}[dtype]
    finite = torch.where(torch.isfinite(scores), scores.abs(), torch.zeros_like(scores))
    return base * (1.0 + finite) if distance == "l2" else torch.full_like(scores, base)


def assert_routes_match(scores_a, best_a, scores_b, best_b, tol):
    """Same -inf pattern, finite scores within tol, identical best wherever the top-2 gap exceeds the tolerance."""
    scores_a, scores_b = scores_a.double(), scores_b.double()
    assert torch.equal(torch.isinf(scores_a), torch.isinf(scores_b)), (scores_a, scores_b)
    finite = torch.isfinite(scores_a)
    diff = (scores_a - scores_b).abs()
    assert bool((diff[finite] <= tol.double()[finite]).all()), f"max diff {diff[finite].max()}"
    assert torch.equal(best_a == -1, best_b == -1)
    top2 = torch.topk(scores_a.nan_to_num(neginf=-1e30), min(2, scores_a.shape[1]), dim=1).values
    gap = top2[:, 0] - top2[:, -1] if scores_a.shape[1] > 1 else torch.full_like(top2[:, 0], math.inf)
    decided = gap > 2 * tol.double().max(dim=1).values
    assert torch.equal(best_a[decided], best_b[decided]), (best_a, best_b, gap)
    return int(decided.sum())


# ---- mixture_lora cases ---------------------------------------------------------------------------------------


def make_lora(n, in_features, out_features, adapters, rank, k, *, dtype=torch.float32, seed=0, minus_one=0.2,
              ranks=None):
    """Stacked, rank-padded LoRA weights (adapter a uses ranks[a] <= rank; the last adapter is all zero)."""
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(adapters, rank, in_features, generator=g) / math.sqrt(in_features)
    lora_b = torch.randn(adapters, out_features, rank, generator=g)
    ranks = ranks or [max(1, rank - a) for a in range(adapters)]
    for a, r in enumerate(ranks):
        lora_a[a, r:] = 0
        lora_b[a, :, r:] = 0
    if adapters > 1:
        lora_a[-1] = 0
        lora_b[-1] = 0
    scaling = torch.rand(adapters, generator=g) + 0.5
    x = torch.randn(n, in_features, generator=g)
    idx = torch.stack([torch.randperm(adapters, generator=g)[:k] for _ in range(n)]) if k <= adapters else \
        torch.randint(0, adapters, (n, k), generator=g)
    idx = torch.where(torch.rand(n, k, generator=g) < minus_one, torch.full_like(idx, -1), idx)
    weights = torch.rand(n, k, generator=g)
    return x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), scaling, idx, weights


def oracle_mixture(x, lora_a, lora_b, scaling, idx, weights):
    """Per-row, per-slot Python loop in float64."""
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            a = int(idx[n, j])
            if a < 0:
                continue
            h = lora_a[a].double() @ x[n].double()
            out[n] += float(weights[n, j]) * float(scaling[a]) * (lora_b[a].double() @ h)
    return out

