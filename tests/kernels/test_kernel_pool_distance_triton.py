"""The fused Triton routing kernels (pool_distance_triton) against the torch spec, in Triton's interpreter (CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module (and, ideally, triton) is imported

import kernel_cases as cases  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ariadne_hf.kernels import DISTANCES, embed_pool_distance, incremental_pool_distance, routing_args  # noqa: E402
from ariadne_hf.kernels.pool_distance_torch import embed_pool_distance_ref, incremental_pool_distance_ref  # noqa: E402

pytest.importorskip("triton")

SMALL_BLOCKS = {"BLOCK_T": 16, "BLOCK_DP": 32, "BLOCK_B": 16, "BLOCK_K": 16, "BLOCK_D": 32, "BLOCK_A": 16}


@pytest.fixture(scope="module")
def kernels():
    """The Triton module, its kernels (and triton's standard library) created for the interpreter."""
    return cases.triton_interpreter_module("pool_distance_triton")


# A covering set (not the cross product) of B 1/3/33, T 1/7/300, D 32/123/576, K 1/5/257, A 1/3/40, paddings,
# table dtypes, distances, center and token weights.
KERNEL_CASES = [
    dict(batch=1, tokens=1, dim=32, num_centroids=1, num_adapters=1, dtype="fp32", padding="none", distance="cosine"),
    dict(batch=3, tokens=7, dim=123, num_centroids=5, num_adapters=3, dtype="bf16", padding="left", distance="l2",
         center=True, empty_rows=(1,)),
    dict(batch=33, tokens=300, dim=576, num_centroids=257, num_adapters=40, dtype="fp16", padding="right",
         distance="cosine", token_weights=True, empty_rows=(0, 32)),
    dict(batch=33, tokens=7, dim=32, num_centroids=257, num_adapters=1, dtype="fp32", padding="left", distance="l2",
         token_weights=True, center=True),
    dict(batch=3, tokens=300, dim=123, num_centroids=1, num_adapters=40, dtype="bf16", padding="none",
         distance="cosine", center=True),
    dict(batch=1, tokens=300, dim=576, num_centroids=5, num_adapters=3, dtype="fp32", padding="right", distance="l2"),
    dict(batch=33, tokens=1, dim=123, num_centroids=5, num_adapters=40, dtype="bf16", padding="right",
         distance="cosine", empty_rows=(5,)),
    dict(batch=3, tokens=7, dim=576, num_centroids=257, num_adapters=3, dtype="fp16", padding="left", distance="l2",
         token_weights=True),
    dict(batch=33, tokens=7, dim=123, num_centroids=120, num_adapters=40, dtype="fp32", padding="left",
         distance="cosine", sorted_groups=True),
]


def _case_id(spec):
    return "B{batch}-T{tokens}-D{dim}-K{num_centroids}-A{num_adapters}-{dtype}-{padding}-{distance}".format(**spec) + (
        "-center" if spec.get("center") else "") + ("-tokw" if spec.get("token_weights") else "")


def _check_against_reference(case, distance, dtype, **kwargs):
    ref = cases.call(embed_pool_distance_ref, case, distance=distance, return_pooled=True)
    got = cases.call(embed_pool_distance, case, distance=distance, backend="triton", return_pooled=True, **kwargs)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64 and got[2].dtype == torch.float32
    assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape and got[2].shape == ref[2].shape
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)  # pooled, un-centered
    tol = cases.score_tolerance(dtype, distance, ref[0])
    decided = cases.assert_routes_match(ref[0], ref[1], got[0], got[1], tol)
    return decided


@pytest.mark.parametrize("spec", KERNEL_CASES, ids=_case_id)
def test_kernel_scores_best_and_pooled_match_the_torch_reference(kernels, spec):
    spec = dict(spec)
    dtype = cases.DTYPES[spec.pop("dtype")]
    distance = spec.pop("distance")
    case = cases.make_case(**spec, vocab=97, dtype=dtype, seed=spec["batch"] + spec["tokens"])
    decided = _check_against_reference(case, distance, dtype)
    assert decided >= spec["batch"] - len(spec.get("empty_rows", ())) - 2  # most routes are actually compared
    for b in spec.get("empty_rows", ()):
        got = cases.call(embed_pool_distance, case, distance=distance, backend="triton")
        assert got[1][b] == -1 and torch.isinf(got[0][b]).all()


@pytest.mark.parametrize("distance", DISTANCES)
def test_kernel_with_small_blocks_looping_over_every_tile_matches_the_reference(kernels, distance):
    """Blocks of 16/32 force loops over T, D (pool and score), K and A tiles and several row blocks."""
    case = cases.make_case(35, 40, 60, 123, 70, 37, dtype=torch.bfloat16, padding="left", center=True,
                           token_weights=True, empty_rows=(16, 34), seed=11)
    ref = cases.call(embed_pool_distance_ref, case, distance=distance, return_pooled=True)
    args = routing_args(case["embed_weight"], case["centroids"], case["centroid_adapter"], case["num_adapters"],
                        center=case["center"], token_weights=case["token_weights"], distance=distance)
    got = kernels.embed_pool_distance_triton(case["input_ids"], case["attention_mask"], args, return_pooled=True,
                                             block_sizes=SMALL_BLOCKS)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    cases.assert_routes_match(ref[0], ref[1], got[0], got[1], cases.score_tolerance(torch.bfloat16, distance, ref[0]))


def test_kernel_rows_without_tokens_or_centroids_get_minus_one_and_ties_go_to_the_lowest_adapter(kernels):
    table = torch.eye(32)[:4]  # [V=4, D=32]
    ids = torch.tensor([[0, 1], [2, 2], [3, 3]], dtype=torch.int32)
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    centroids = torch.zeros(3, 32)
    centroids[0, 2] = centroids[1, 2] = 1.0
    centroids[2, :2] = 1.0
    c2a = torch.tensor([3, 1, 0])
    scores, best = embed_pool_distance(ids, mask, table, centroids, c2a, 4, backend="triton")
    assert best.tolist() == [0, 1, -1]
    assert torch.isinf(scores[:, 2]).all() and torch.isinf(scores[2]).all()
    assert scores[1, 1] == scores[1, 3]
    scores, best = embed_pool_distance(ids, mask, table, centroids[:0], c2a[:0], 2, backend="triton")
    assert best.tolist() == [-1, -1, -1] and torch.isinf(scores).all()


def test_kernel_routes_strided_id_and_mask_views_like_contiguous_ones(kernels):
    case = cases.make_case(5, 12, 40, 64, 9, 4, padding="left", seed=12)
    wide = torch.full((5, 24), 40 + 7, dtype=torch.int64)
    wide[:, ::2] = case["input_ids"]
    wide_mask = torch.zeros(5, 24, dtype=torch.int64)
    wide_mask[:, ::2] = case["attention_mask"]
    strided = dict(case, input_ids=wide[:, ::2], attention_mask=wide_mask[:, ::2])  # non-contiguous views
    assert not strided["input_ids"].is_contiguous()
    a = cases.call(embed_pool_distance, case, backend="triton")
    b = cases.call(embed_pool_distance, strided, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kernel_rejects_out_of_range_ids_strided_tables_and_non_power_of_two_blocks(kernels):
    case = cases.make_case(2, 6, 30, 32, 3, 2, seed=13)
    case["input_ids"] = case["input_ids"].clone()
    case["input_ids"][1, 0] = 1000
    with pytest.raises(ValueError, match=r"token id 1000 .*V=30"):
        cases.call(embed_pool_distance, case, backend="triton")
    case = cases.make_case(2, 6, 30, 32, 3, 2, seed=13)
    case["embed_weight"] = torch.randn(32, 30).T  # [V, D] with stride (1, 30)
    with pytest.raises(ValueError, match="contiguous"):
        cases.call(embed_pool_distance, case, backend="triton")
    case = cases.make_case(2, 6, 30, 32, 3, 2, seed=13)
    with pytest.raises(ValueError, match="power of two"):
        kernels.embed_pool_distance_triton(case["input_ids"], case["attention_mask"],
                                           routing_args(case["embed_weight"], case["centroids"],
                                                        case["centroid_adapter"], 2),
                                           block_sizes={"BLOCK_K": 24})


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("blocks", [None, SMALL_BLOCKS], ids=["default-blocks", "small-blocks"])
def test_incremental_kernel_state_and_routes_match_the_reference_at_every_step(kernels, distance, blocks):
    case = cases.make_case(17, 6, 50, 123, 40, 5, dtype=torch.bfloat16, padding="left", token_weights=True,
                           center=True, empty_rows=(3,), seed=14)
    batch, dim = 17, 123
    state_ref = (torch.zeros(batch, dim), torch.zeros(batch))
    state_tri = (torch.zeros(batch, dim), torch.zeros(batch))
    common = dict(center=case["center"], token_weights=case["token_weights"], distance=distance)
    for t in range(6):
        step = (case["input_ids"][:, t],)
        tail = (case["embed_weight"], case["centroids"], case["centroid_adapter"], 5)
        ref = incremental_pool_distance_ref(*step, *state_ref, *tail, new_mask=case["attention_mask"][:, t], **common)
        if blocks is None:
            got = incremental_pool_distance(*step, *state_tri, *tail, new_mask=case["attention_mask"][:, t],
                                            backend="triton", **common)
        else:
            got = kernels.incremental_pool_distance_triton(*step, *state_tri, routing_args(*tail, **common),
                                                           new_mask=case["attention_mask"][:, t],
                                                           block_sizes=blocks)
        torch.testing.assert_close(state_tri[0], state_ref[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(state_tri[1], state_ref[1])
        cases.assert_routes_match(ref[0], ref[1], got[0], got[1], cases.score_tolerance(torch.float32, distance, ref[0]))
    assert got[1][3] == -1


@pytest.mark.parametrize(
    "tokens, dim, num_centroids, num_adapters",
    [(600, 8192, 5, 3), (3, 32, 100_000, 10_000)],
    ids=["T600-D8192", "K100k-A10k"],
)
def test_kernel_matches_the_reference_at_the_largest_extents(kernels, tokens, dim, num_centroids, num_adapters):
    """The upper ends of the issue: D = 8192 (loops over D tiles), K = 100k centroids and A = 10k adapters."""
    case = cases.make_case(2, tokens, 300, dim, num_centroids, num_adapters, dtype=torch.bfloat16, padding="left",
                           seed=15)
    _check_against_reference(case, "cosine", torch.bfloat16)


# ---- whitening transform W [D, D]: x = (pooled - center) @ W.T, in the same launch -----------------------------


def random_transform(dim, kind, seed):
    """fp32 [D, D] with O(1) effect on x: "spd" = M M^T / D + 0.5 I (symmetric positive definite, as a
    whitening matrix is), "general" = I + M / sqrt(D) (not symmetric: using W instead of W.T changes x)."""
    g = torch.Generator().manual_seed(1000 + seed)
    m = torch.randn(dim, dim, generator=g)
    if kind == "spd":
        return m @ m.T / dim + 0.5 * torch.eye(dim)
    return torch.eye(dim) + m / dim ** 0.5


# A covering set of B 1/3/33, D 32/123/576 (never a multiple of the interpreter's D block but for 32), K 1/5/257,
# table dtypes, distances, center, token weights, all-padding rows and both kinds of transform.
TRANSFORM_CASES = [
    dict(batch=1, tokens=1, dim=32, num_centroids=1, num_adapters=1, dtype="fp32", padding="none", distance="cosine",
         kind="general"),
    dict(batch=3, tokens=7, dim=123, num_centroids=5, num_adapters=3, dtype="bf16", padding="left", distance="l2",
         center=True, empty_rows=(1,), kind="general"),
    dict(batch=33, tokens=12, dim=576, num_centroids=257, num_adapters=40, dtype="fp16", padding="right",
         distance="cosine", token_weights=True, empty_rows=(0, 32), kind="spd"),
    dict(batch=33, tokens=7, dim=123, num_centroids=257, num_adapters=5, dtype="fp32", padding="left", distance="l2",
         center=True, token_weights=True, kind="general"),
    dict(batch=3, tokens=30, dim=576, num_centroids=5, num_adapters=3, dtype="bf16", padding="none",
         distance="cosine", center=True, kind="spd"),
    dict(batch=1, tokens=12, dim=123, num_centroids=1, num_adapters=1, dtype="fp16", padding="right", distance="l2",
         kind="general"),
    dict(batch=33, tokens=5, dim=32, num_centroids=5, num_adapters=3, dtype="fp32", padding="right",
         distance="cosine", center=True, token_weights=True, empty_rows=(7,), kind="spd"),
    dict(batch=3, tokens=9, dim=576, num_centroids=257, num_adapters=40, dtype="fp16", padding="left",
         distance="l2", center=True, kind="general"),
]


def _check_transform_against_reference(case, transform, distance, dtype, call=None):
    """The Triton path with a transform against embed_pool_distance_ref; returns the number of compared routes."""
    ref = cases.call(embed_pool_distance_ref, case, transform=transform, distance=distance, return_pooled=True)
    if call is None:
        got = cases.call(embed_pool_distance, case, transform=transform, distance=distance, backend="triton",
                         return_pooled=True)
    else:
        got = call(case, transform, distance)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64 and got[0].shape == ref[0].shape
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)  # pooled: un-centered, un-whitened
    tol = cases.score_tolerance(dtype, distance, ref[0])
    plain = cases.call(embed_pool_distance_ref, case, distance=distance)[0]  # the case must be sensitive to W
    finite = torch.isfinite(ref[0])
    assert bool(((plain - ref[0]).abs()[finite] > 10 * tol[finite]).any())
    return cases.assert_routes_match(ref[0], ref[1], got[0], got[1], tol)


@pytest.mark.parametrize("spec", TRANSFORM_CASES, ids=lambda s: _case_id(s) + "-" + s["kind"])
def test_kernel_with_a_whitening_transform_matches_the_reference(kernels, spec):
    spec = dict(spec)
    dtype = cases.DTYPES[spec.pop("dtype")]
    distance = spec.pop("distance")
    kind = spec.pop("kind")
    case = cases.make_case(**spec, vocab=97, dtype=dtype, seed=spec["batch"] + spec["dim"])
    transform = random_transform(spec["dim"], kind, spec["dim"])
    decided = _check_transform_against_reference(case, transform, distance, dtype)
    assert decided >= spec["batch"] - len(spec.get("empty_rows", ())) - 2  # most routes are actually compared
    got = cases.call(embed_pool_distance, case, transform=transform, distance=distance, backend="triton")
    for b in spec.get("empty_rows", ()):
        assert got[1][b] == -1 and torch.isinf(got[0][b]).all() and (got[0][b] < 0).all()


@pytest.mark.parametrize("distance", DISTANCES)
def test_kernel_transform_with_small_blocks_looping_over_every_tile_matches_the_reference(kernels, distance):
    """Blocks of 16/32: several row blocks, output d-tiles and input d-tiles of the whitening phase, k-tiles."""
    case = cases.make_case(18, 5, 40, 70, 20, 5, dtype=torch.bfloat16, padding="left", center=True,
                           token_weights=True, empty_rows=(16,), seed=21)

    def call(case, transform, distance):
        args = routing_args(case["embed_weight"], case["centroids"], case["centroid_adapter"], case["num_adapters"],
                            center=case["center"], token_weights=case["token_weights"], transform=transform,
                            distance=distance)
        return kernels.embed_pool_distance_triton(case["input_ids"], case["attention_mask"], args,
                                                  return_pooled=True, block_sizes=SMALL_BLOCKS)

    decided = _check_transform_against_reference(case, random_transform(70, "general", 21), distance,
                                                 torch.bfloat16, call=call)
    assert decided >= 18 - 1 - 2


def test_kernel_identity_transform_is_exactly_no_transform(kernels):
    """W = I: the whitening phase (centering moved into it) gives bitwise the scores of the plain path."""
    case = cases.make_case(5, 9, 40, 123, 17, 4, padding="left", center=True, token_weights=True, empty_rows=(2,),
                           seed=22)
    for distance in DISTANCES:
        plain = cases.call(embed_pool_distance, case, distance=distance, backend="triton")
        eye = cases.call(embed_pool_distance, case, transform=torch.eye(123), distance=distance, backend="triton")
        assert torch.equal(plain[0], eye[0]) and torch.equal(plain[1], eye[1])


def test_kernel_transform_handles_empty_batches_no_centroids_strided_w_and_rejects_bad_w(kernels):
    """All-padding batch, no centroids, a strided transform (copied), and bad transforms rejected."""
    case = cases.make_case(3, 6, 30, 48, 7, 3, center=True, empty_rows=(0, 1, 2), seed=23)
    transform = random_transform(48, "general", 23)
    scores, best = cases.call(embed_pool_distance, case, transform=transform, backend="triton")
    assert best.tolist() == [-1, -1, -1] and torch.isinf(scores).all()
    case = cases.make_case(3, 6, 30, 48, 7, 3, center=True, seed=23)
    no_centroids = dict(case, centroids=case["centroids"][:0], centroid_adapter=case["centroid_adapter"][:0])
    scores, best = cases.call(embed_pool_distance, no_centroids, transform=transform, backend="triton")
    assert best.tolist() == [-1, -1, -1] and torch.isinf(scores).all()
    strided = transform.T.contiguous().T  # same values, strides (1, 48)
    assert not strided.is_contiguous()
    a = cases.call(embed_pool_distance, case, transform=transform, backend="triton")
    b = cases.call(embed_pool_distance, case, transform=strided, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for bad in (torch.eye(48, 47), torch.eye(48, dtype=torch.float64), torch.eye(48, dtype=torch.float16)):
        with pytest.raises(ValueError, match="transform"):
            cases.call(embed_pool_distance, case, transform=bad, backend="triton")
        with pytest.raises(ValueError, match="transform"):
            incremental_pool_distance(
                case["input_ids"][:, 0], torch.zeros(3, 48), torch.zeros(3), case["embed_weight"], case["centroids"],
                case["centroid_adapter"], 3, transform=bad, backend="triton")


@pytest.mark.parametrize("distance, blocks", [("cosine", None), ("l2", SMALL_BLOCKS)],
                         ids=["cosine-default-blocks", "l2-small-blocks"])
def test_incremental_kernel_with_a_transform_matches_the_reference_at_every_step(kernels, distance, blocks):
    """Fed token by token: every step equals incremental_pool_distance_ref, the last one embed_pool_distance_ref."""
    batch, tokens, dim = 18, 4, 70
    case = cases.make_case(batch, tokens, 50, dim, 20, 5, dtype=torch.bfloat16, padding="left", token_weights=True,
                           center=True, empty_rows=(3,), seed=24)
    transform = random_transform(dim, "general", 24)
    state_ref = (torch.zeros(batch, dim), torch.zeros(batch))
    state_tri = (torch.zeros(batch, dim), torch.zeros(batch))
    common = dict(center=case["center"], token_weights=case["token_weights"], transform=transform, distance=distance)
    tail = (case["embed_weight"], case["centroids"], case["centroid_adapter"], 5)
    for t in range(tokens):
        step = (case["input_ids"][:, t],)
        mask = case["attention_mask"][:, t]
        ref = incremental_pool_distance_ref(*step, *state_ref, *tail, new_mask=mask, **common)
        if blocks is None:
            got = incremental_pool_distance(*step, *state_tri, *tail, new_mask=mask, backend="triton", **common)
        else:
            got = kernels.incremental_pool_distance_triton(*step, *state_tri, routing_args(*tail, **common),
                                                           new_mask=mask, block_sizes=blocks)
        torch.testing.assert_close(state_tri[0], state_ref[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(state_tri[1], state_ref[1])
        cases.assert_routes_match(ref[0], ref[1], got[0], got[1], cases.score_tolerance(torch.float32, distance, ref[0]))
    full = cases.call(embed_pool_distance_ref, case, transform=transform, distance=distance)
    decided = cases.assert_routes_match(full[0], full[1], got[0], got[1],
                                        cases.score_tolerance(torch.bfloat16, distance, full[0]))
    assert decided >= batch - 1 - 2 and got[1][3] == -1
