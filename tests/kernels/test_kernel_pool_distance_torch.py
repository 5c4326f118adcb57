"""The torch routing path is the spec: check it against independent oracles (float64 per-row loops, nn.EmbeddingBag)."""

from __future__ import annotations

import kernel_cases as cases
import pytest
import torch

from ariadne_hf.kernels import DISTANCES, pool_distance_torch
from ariadne_hf.kernels.pool_distance_torch import (
    embed_pool_distance_ref,
    incremental_pool_distance_ref,
    pool_embeddings_ref,
)

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


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("spec", REF_CASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reference_scores_best_and_pooled_match_a_float64_row_loop(spec, distance, dtype):
    case = cases.make_case(**spec, dtype=cases.DTYPES[dtype])
    scores, best, pooled = cases.call(embed_pool_distance_ref, case, distance=distance, return_pooled=True)
    o_scores, o_best, o_pooled, _ = cases.oracle_route(case, distance)
    assert scores.dtype == torch.float32 and best.dtype == torch.int64 and pooled.dtype == torch.float32
    assert scores.shape == (spec["batch"], spec["num_adapters"]) and best.shape == (spec["batch"],)
    # Pooled is exact fp32 accumulation of the table's values, whatever the table dtype.
    torch.testing.assert_close(pooled.double(), o_pooled, rtol=1e-6, atol=1e-6)
    tol = cases.score_tolerance(torch.float32, distance, scores)
    cases.assert_routes_match(o_scores, o_best, scores, best, tol)
    for b in spec.get("empty_rows", ()):
        assert best[b] == -1 and torch.isinf(scores[b]).all()


@pytest.mark.parametrize("center", [False, True])
def test_reference_cosine_scores_match_nn_embedding_bag_mean_pooling(center):
    case = cases.make_case(7, 25, 120, 96, 30, 8, center=center, padding="left", empty_rows=(3,), seed=4)
    scores, best = cases.call(embed_pool_distance_ref, case)
    expected = cases.oracle_embedding_bag(case)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_tables_accumulate_in_fp32(dtype):
    """A half-precision sum would be off by ~1e-3 (bf16); the reference must match float64 to fp32 precision."""
    case = cases.make_case(4, 300, 500, 576, 4, 2, dtype=cases.DTYPES[dtype], padding="none", seed=1)
    pooled, weight_sum = pool_embeddings_ref(case["input_ids"], case["attention_mask"], case["embed_weight"])
    expected = case["embed_weight"].double()[case["input_ids"]].mean(dim=1)
    assert weight_sum.tolist() == [300.0] * 4
    assert (pooled.double() - expected).abs().max() < 1e-6


def test_half_table_chunks_smaller_than_a_row_give_the_same_sums(monkeypatch):
    """Chunks smaller than a row and than the batch give the same sums (rows split across chunks)."""
    case = cases.make_case(5, 40, 60, 32, 3, 2, dtype=torch.bfloat16, token_weights=True, seed=2)
    full = pool_embeddings_ref(case["input_ids"], case["attention_mask"], case["embed_weight"], case["token_weights"])
    monkeypatch.setattr(pool_distance_torch, "_HALF_CHUNK_ELEMENTS", 32 * 7)
    chunked = pool_embeddings_ref(case["input_ids"], case["attention_mask"], case["embed_weight"], case["token_weights"])
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked[1], full[1])


def test_left_and_right_padding_route_identically():
    right = cases.make_case(6, 20, 80, 64, 12, 4, padding="right", seed=3)
    left = dict(right)
    lengths = right["attention_mask"].sum(1).tolist()
    left["attention_mask"] = cases.make_mask(lengths, 20, "left")
    ids = torch.full_like(right["input_ids"], 80 + 7)
    for b, n in enumerate(lengths):
        ids[b, 20 - n:] = right["input_ids"][b, :n]
    left["input_ids"] = ids
    s_r, b_r = cases.call(embed_pool_distance_ref, right)
    s_l, b_l = cases.call(embed_pool_distance_ref, left)
    torch.testing.assert_close(s_l, s_r, rtol=0, atol=1e-6)
    assert torch.equal(b_l, b_r)


def test_rows_without_tokens_or_centroids_get_minus_one_and_ties_go_to_the_lowest_adapter():
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
    case = cases.make_case(3, 5, 20, 16, 4, 2, token_weights=True, padding="none", seed=5)
    case["token_weights"] = case["token_weights"].clone()
    case["token_weights"][case["input_ids"][1].long()] = 0.0
    scores, best, pooled = cases.call(embed_pool_distance_ref, case, return_pooled=True)
    assert best[1] == -1 and torch.isinf(scores[1]).all() and (pooled[1] == 0).all()


def test_out_of_range_ids_raise_only_where_masked_in():
    case = cases.make_case(2, 6, 30, 16, 3, 2, padding="right", seed=6)
    cases.call(embed_pool_distance_ref, case)  # garbage ids at padded positions are fine
    case["input_ids"] = case["input_ids"].clone()
    case["input_ids"][0, 0] = 30
    with pytest.raises(ValueError, match=r"token id 30 .*V=30"):
        cases.call(embed_pool_distance_ref, case)
    case["input_ids"][0, 0] = -3
    with pytest.raises(ValueError, match=r"token id -3"):
        cases.call(embed_pool_distance_ref, case)


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
def test_bad_arguments_raise_value_error_naming_the_argument(change, message):
    case = cases.make_case(2, 6, 30, 16, 3, 2, seed=7)
    distance = change.pop("distance", "cosine")
    case.update(change)
    with pytest.raises(ValueError, match=message):
        cases.call(embed_pool_distance_ref, case, distance=distance)


# ---- incremental --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_incremental_steps_end_at_the_full_prompt_routes_and_pooled_sums(distance, dtype):
    case = cases.make_case(4, 9, 50, 40, 8, 3, dtype=cases.DTYPES[dtype], padding="left", empty_rows=(2,),
                     token_weights=True, center=True, seed=8)
    batch, dim = 4, 40
    running_sum, running_weight = torch.zeros(batch, dim), torch.zeros(batch)
    for t in range(9):
        scores, best = incremental_pool_distance_ref(
            case["input_ids"][:, t], running_sum, running_weight, case["embed_weight"], case["centroids"],
            case["centroid_adapter"], 3, new_mask=case["attention_mask"][:, t], center=case["center"],
            token_weights=case["token_weights"], distance=distance,
        )
    full_scores, full_best, pooled = cases.call(embed_pool_distance_ref, case, distance=distance, return_pooled=True)
    cases.assert_routes_match(full_scores, full_best, scores, best, cases.score_tolerance(torch.float32, distance, full_scores))
    _, _, _, o_wsum = cases.oracle_route(case, distance)
    torch.testing.assert_close(running_weight.double(), o_wsum, rtol=1e-6, atol=1e-6)
    live = running_weight > 0
    torch.testing.assert_close(running_sum[live] / running_weight[live, None], pooled[live], rtol=1e-5, atol=1e-6)
    assert best[2] == -1


def test_incremental_rejects_bad_state_and_out_of_range_ids_of_masked_in_rows():
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

