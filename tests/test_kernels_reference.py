"""The torch reference is the spec: check it against independent oracles (float64 per-row loops, nn.EmbeddingBag).

Also holds the case builders the Triton kernel tests reuse (``import test_kernels_reference as cases``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ariadne_hf.kernels.reference import (
    dense_to_topk,
    embed_pool_distance_ref,
    incremental_pool_distance_ref,
    mixture_lora_ref,
    pool_embeddings_ref,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def triton_interpreter_module(name: str):
    """Import ``ariadne_hf.kernels.<name>`` with its kernels running in Triton's interpreter (CPU tensors).

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


# ---- embed_pool_distance_ref vs oracles ---------------------------------------------------------------------

REF_CASES = [
    dict(batch=1, tokens=1, vocab=11, dim=32, num_centroids=1, num_adapters=1),
    dict(batch=3, tokens=7, vocab=50, dim=123, num_centroids=5, num_adapters=3, padding="left", empty_rows=(1,)),
    dict(batch=5, tokens=30, vocab=97, dim=64, num_centroids=20, num_adapters=6, center=True),
    dict(batch=4, tokens=12, vocab=40, dim=48, num_centroids=9, num_adapters=4, token_weights=True, padding="none"),
    dict(batch=6, tokens=9, vocab=33, dim=40, num_centroids=7, num_adapters=5, token_weights=True, center=True,
         empty_rows=(0, 5), id_dtype=torch.int32),
    dict(batch=5, tokens=11, vocab=60, dim=32, num_centroids=24, num_adapters=6, sorted_groups=True, empty_rows=(2,)),
]


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("spec", REF_CASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reference_matches_row_loop_oracle(spec, distance, dtype):
    case = make_case(**spec, dtype=DTYPES[dtype])
    scores, best, pooled = call(embed_pool_distance_ref, case, distance=distance, return_pooled=True)
    o_scores, o_best, o_pooled, _ = oracle_route(case, distance)
    assert scores.dtype == torch.float32 and best.dtype == torch.int64 and pooled.dtype == torch.float32
    assert scores.shape == (spec["batch"], spec["num_adapters"]) and best.shape == (spec["batch"],)
    # Pooled is exact fp32 accumulation of the table's values, whatever the table dtype.
    torch.testing.assert_close(pooled.double(), o_pooled, rtol=1e-6, atol=1e-6)
    tol = score_tolerance(torch.float32, distance, scores)
    assert_routes_match(o_scores, o_best, scores, best, tol)
    for b in spec.get("empty_rows", ()):
        assert best[b] == -1 and torch.isinf(scores[b]).all()


@pytest.mark.parametrize("center", [False, True])
def test_reference_matches_embedding_bag_cosine(center):
    case = make_case(7, 25, 120, 96, 30, 8, center=center, padding="left", empty_rows=(3,), seed=4)
    scores, best = call(embed_pool_distance_ref, case)
    expected = oracle_embedding_bag(case)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_tables_accumulate_in_fp32(dtype):
    """A half-precision sum would be off by ~1e-3 (bf16); the reference must match float64 to fp32 precision."""
    case = make_case(4, 300, 500, 576, 4, 2, dtype=DTYPES[dtype], padding="none", seed=1)
    pooled, weight_sum = pool_embeddings_ref(case["input_ids"], case["attention_mask"], case["embed_weight"])
    expected = case["embed_weight"].double()[case["input_ids"]].mean(dim=1)
    assert weight_sum.tolist() == [300.0] * 4
    assert (pooled.double() - expected).abs().max() < 1e-6


def test_half_table_chunking_crosses_rows(monkeypatch):
    """Chunks smaller than a row and than the batch give the same sums (rows split across chunks)."""
    import ariadne_hf.kernels.reference as reference

    case = make_case(5, 40, 60, 32, 3, 2, dtype=torch.bfloat16, token_weights=True, seed=2)
    full = pool_embeddings_ref(case["input_ids"], case["attention_mask"], case["embed_weight"], case["token_weights"])
    monkeypatch.setattr(reference, "_HALF_CHUNK_ELEMENTS", 32 * 7)
    chunked = pool_embeddings_ref(case["input_ids"], case["attention_mask"], case["embed_weight"], case["token_weights"])
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked[1], full[1])


def test_left_and_right_padding_route_identically():
    right = make_case(6, 20, 80, 64, 12, 4, padding="right", seed=3)
    left = dict(right)
    lengths = right["attention_mask"].sum(1).tolist()
    left["attention_mask"] = make_mask(lengths, 20, "left")
    ids = torch.full_like(right["input_ids"], 80 + 7)
    for b, n in enumerate(lengths):
        ids[b, 20 - n:] = right["input_ids"][b, :n]
    left["input_ids"] = ids
    s_r, b_r = call(embed_pool_distance_ref, right)
    s_l, b_l = call(embed_pool_distance_ref, left)
    torch.testing.assert_close(s_l, s_r, rtol=0, atol=1e-6)
    assert torch.equal(b_l, b_r)


def test_empty_rows_missing_adapters_ties_and_no_centroids():
    table = torch.eye(4)
    ids = torch.tensor([[0, 1], [2, 2], [3, 3]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 0]])
    centroids = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    c2a = torch.tensor([3, 1, 0])  # adapter 2 has no centroid; adapters 1 and 3 tie on row 1
    scores, best = embed_pool_distance_ref(ids, mask, table, centroids, c2a, 4)
    assert best.tolist() == [0, 1, -1]
    assert torch.isinf(scores[:, 2]).all() and torch.isinf(scores[2]).all()
    assert scores[1, 1] == scores[1, 3] == 1.0
    empty_k = embed_pool_distance_ref(ids, mask, table, centroids[:0], c2a[:0], 2)
    assert empty_k[1].tolist() == [-1, -1, -1] and torch.isinf(empty_k[0]).all()


def test_zero_token_weights_make_a_row_empty():
    case = make_case(3, 5, 20, 16, 4, 2, token_weights=True, padding="none", seed=5)
    case["token_weights"] = case["token_weights"].clone()
    case["token_weights"][case["input_ids"][1].long()] = 0.0
    scores, best, pooled = call(embed_pool_distance_ref, case, return_pooled=True)
    assert best[1] == -1 and torch.isinf(scores[1]).all() and (pooled[1] == 0).all()


def test_out_of_range_ids_raise_only_where_masked_in():
    case = make_case(2, 6, 30, 16, 3, 2, padding="right", seed=6)
    call(embed_pool_distance_ref, case)  # garbage ids at padded positions are fine
    case["input_ids"] = case["input_ids"].clone()
    case["input_ids"][0, 0] = 30
    with pytest.raises(ValueError, match=r"token id 30 .*V=30"):
        call(embed_pool_distance_ref, case)
    case["input_ids"][0, 0] = -3
    with pytest.raises(ValueError, match=r"token id -3"):
        call(embed_pool_distance_ref, case)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(distance="dot"), "distance"),
        (dict(num_adapters=0), "num_adapters"),
        (dict(centroid_adapter=torch.tensor([0, 5, 1])), "centroid_adapter"),
        (dict(center=torch.zeros(3)), "center"),
        (dict(token_weights=torch.ones(3)), "token_weights"),
        (dict(centroids=torch.zeros(3, 5)), "centroids"),
        (dict(embed_weight=torch.zeros(30, 16, dtype=torch.float64)), "embed_weight"),
        (dict(attention_mask=torch.ones(2, 5)), "attention_mask"),
    ],
)
def test_bad_arguments_raise(change, message):
    case = make_case(2, 6, 30, 16, 3, 2, seed=7)
    distance = change.pop("distance", "cosine")
    case.update(change)
    with pytest.raises(ValueError, match=message):
        call(embed_pool_distance_ref, case, distance=distance)


# ---- incremental --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_incremental_matches_full_prompt(distance, dtype):
    case = make_case(4, 9, 50, 40, 8, 3, dtype=DTYPES[dtype], padding="left", empty_rows=(2,),
                     token_weights=True, center=True, seed=8)
    batch, dim = 4, 40
    running_sum, running_weight = torch.zeros(batch, dim), torch.zeros(batch)
    for t in range(9):
        scores, best = incremental_pool_distance_ref(
            case["input_ids"][:, t], running_sum, running_weight, case["embed_weight"], case["centroids"],
            case["centroid_adapter"], 3, new_mask=case["attention_mask"][:, t], center=case["center"],
            token_weights=case["token_weights"], distance=distance,
        )
    full_scores, full_best, pooled = call(embed_pool_distance_ref, case, distance=distance, return_pooled=True)
    assert_routes_match(full_scores, full_best, scores, best, score_tolerance(torch.float32, distance, full_scores))
    _, _, _, o_wsum = oracle_route(case, distance)
    torch.testing.assert_close(running_weight.double(), o_wsum, rtol=1e-6, atol=1e-6)
    live = running_weight > 0
    torch.testing.assert_close(running_sum[live] / running_weight[live, None], pooled[live], rtol=1e-5, atol=1e-6)
    assert best[2] == -1


def test_incremental_rejects_bad_state_and_ids():
    table, cents, c2a = torch.randn(10, 8), torch.randn(3, 8), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="running_sum"):
        incremental_pool_distance_ref(torch.tensor([1]), torch.zeros(1, 8, dtype=torch.float64), torch.zeros(1),
                                      table, cents, c2a, 2)
    with pytest.raises(ValueError, match="token id 10"):
        incremental_pool_distance_ref(torch.tensor([10]), torch.zeros(1, 8), torch.zeros(1), table, cents, c2a, 2)
    # masked-out rows may hold anything
    scores, best = incremental_pool_distance_ref(torch.tensor([99]), torch.zeros(1, 8), torch.zeros(1), table, cents,
                                                 c2a, 2, new_mask=torch.tensor([0]))
    assert best.tolist() == [-1]


# ---- mixture_lora_ref ---------------------------------------------------------------------------------------


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


MIX_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize("strategy", [None, "gather", "grouped", "dense"])
@pytest.mark.parametrize(
    "n, k, dtype",
    [(1, 1, "fp32"), (5, 2, "fp32"), (37, 4, "fp32"), (33, 1, "bf16"), (9, 2, "fp16"), (70, 2, "bf16")],
)
def test_mixture_reference_matches_row_loop(n, k, dtype, strategy):
    x, lora_a, lora_b, scaling, idx, weights = make_lora(n, 24, 19, 5, 8, k, dtype=DTYPES[dtype], seed=n + k)
    delta = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights, strategy=strategy)
    assert delta.dtype == x.dtype and delta.shape == (n, 19)
    expected = oracle_mixture(x, lora_a, lora_b, scaling, idx, weights)
    rtol, atol = MIX_TOL[x.dtype]
    torch.testing.assert_close(delta.double(), expected, rtol=rtol, atol=atol)


def test_mixture_reference_rows_without_adapters_are_zero():
    x, lora_a, lora_b, scaling, idx, weights = make_lora(6, 16, 16, 3, 4, 2, seed=3)
    idx[2] = -1
    weights[4] = 0.0
    for strategy in ("gather", "grouped", "dense"):
        delta = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights, strategy=strategy)
        assert (delta[2] == 0).all() and (delta[4] == 0).all()


def test_mixture_reference_rejects_bad_indices():
    x, lora_a, lora_b, scaling, idx, weights = make_lora(4, 16, 16, 3, 4, 2, seed=4)
    idx[1, 0] = 3
    with pytest.raises(ValueError, match=r"\[-1, A=3\)"):
        mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights)
    with pytest.raises(ValueError, match="lora_B"):
        mixture_lora_ref(x, lora_a, lora_b[:, :, :2], scaling, idx.clamp(max=2), weights)


def test_dense_to_topk():
    weights = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    idx, values = dense_to_topk(weights, 2)
    assert idx.tolist() == [[1, 2], [2, -1], [0, 1]]
    torch.testing.assert_close(values, torch.tensor([[0.6, 0.3], [1.0, 0.0], [0.25, 0.25]]))
    x, lora_a, lora_b, scaling, _, _ = make_lora(3, 8, 8, 4, 4, 1, seed=5)
    dense_idx, dense_w = dense_to_topk(weights, 4)
    torch.testing.assert_close(mixture_lora_ref(x, lora_a, lora_b, scaling, dense_idx, dense_w),
                               oracle_mixture(x, lora_a, lora_b, scaling, dense_idx, dense_w).float(),
                               rtol=1e-5, atol=1e-5)


def test_mixture_reference_duplicate_slots_add_up():
    """The same adapter twice in a row's top-k contributes twice (the delta is linear in the weights)."""
    x, lora_a, lora_b, scaling, idx, weights = make_lora(4, 16, 12, 3, 4, 2, seed=6, minus_one=0.0)
    idx[0] = torch.tensor([1, 1])
    expected = oracle_mixture(x, lora_a, lora_b, scaling, idx, weights)
    for strategy in ("gather", "grouped", "dense"):
        delta = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights, strategy=strategy)
        torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)
