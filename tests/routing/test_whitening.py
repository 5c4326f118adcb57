"""Within-adapter whitening: the estimator against independent oracles, and what it buys routing."""

import pytest
import torch
import torch.nn.functional as F

from ariadne_hf.kernels import embed_pool_distance_ref
from ariadne_hf.kernels.pool_distance_torch import centroid_scores_ref, to_scoring_space
from ariadne_hf.routing.centroids import build_router_tables
from ariadne_hf.routing.whitening import ledoit_wolf_shrinkage, within_adapter_whitening


def ledoit_wolf_paper(x: torch.Tensor) -> float:
    """Ledoit & Wolf (2004), Lemma 3.2-3.4, written from the paper with a per-sample loop (float64).

    m = <S, I>, d^2 = ||S - m I||^2, b^2 = min(mean_k ||x_k x_k^T - S||^2 / n, d^2), shrinkage = b^2 / d^2,
    with <A, B> = tr(A B^T) / p and ||A||^2 = <A, A>.
    """
    x = x.double()
    n, p = x.shape
    sample = x.T @ x / n
    inner = lambda a, b: float((a * b).sum()) / p  # noqa: E731
    m = inner(sample, torch.eye(p, dtype=x.dtype))
    d2 = inner(sample - m * torch.eye(p, dtype=x.dtype), sample - m * torch.eye(p, dtype=x.dtype))
    b2_bar = sum(inner(torch.outer(r, r) - sample, torch.outer(r, r) - sample) for r in x) / n**2
    return min(b2_bar, d2) / d2


@pytest.mark.parametrize("n,p", [(10, 3), (40, 12), (7, 20)])
def test_ledoit_wolf_matches_the_paper(n, p):
    x = torch.randn(n, p, generator=torch.Generator().manual_seed(n * p), dtype=torch.float64)
    x = x - x.mean(0)
    assert ledoit_wolf_shrinkage(x) == pytest.approx(ledoit_wolf_paper(x), rel=1e-9, abs=1e-12)


def test_whitening_inverts_the_shrunk_within_covariance():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=gen)
    groups = [torch.randn(n, 16, generator=gen) @ mix + 10 * torch.randn(16, generator=gen) for n in (30, 50, 1)]
    transform, info = within_adapter_whitening(groups)
    centered = torch.cat([g.double() - g.double().mean(0) for g in groups])  # the 1-prompt group adds nothing
    cov = centered.T @ centered / centered.shape[0]
    s = info["shrinkage"]
    shrunk = (1 - s) * cov + s * torch.trace(cov) / 16 * torch.eye(16, dtype=torch.float64)
    w = transform.double()
    assert torch.allclose(w, w.T, atol=1e-6)
    assert torch.allclose(w @ shrunk @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-3)
    assert info["num_prompts"] == 81 and 0.0 <= s <= 1.0
    with pytest.raises(ValueError, match="no spread"):
        within_adapter_whitening([torch.ones(1, 4), torch.zeros(1, 4)])


def _two_tasks(gen, n):
    """Two tasks whose means differ along a low-variance direction, with a huge shared nuisance direction."""
    dim = 8
    base = torch.randn(n, dim, generator=gen) * 0.05
    base[:, 0] += 20.0 * torch.randn(n, generator=gen)  # nuisance: large, shared by both tasks
    base[:, 1] += 3.0  # a common offset
    a, b = base[: n // 2].clone(), base[n // 2 :].clone()
    a[:, 2] += 0.5
    b[:, 2] -= 0.5
    return a, b


def test_whitening_separates_tasks_that_plain_cosine_confuses():
    gen = torch.Generator().manual_seed(1)
    train, test = _two_tasks(gen, 400), _two_tasks(gen, 400)
    labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    accuracy = {}
    for whitening in ("none", "within"):
        tables = build_router_tables(list(train), num_centroids=1, center=True, whitening=whitening)
        x = torch.cat(test)
        scores, best = centroid_scores_ref(x, torch.ones(400), tables.centroids, tables.centroid_adapter, 2,
                                           center=tables.center, transform=tables.transform)
        accuracy[whitening] = float((best == labels).float().mean())
    assert accuracy["none"] < 0.75, accuracy
    assert accuracy["within"] > 0.98, accuracy


def test_tables_are_the_kmeans_of_the_whitened_points_and_scores_follow_the_spec():
    gen = torch.Generator().manual_seed(2)
    pooled = [torch.randn(n, 6, generator=gen) + 3 * torch.randn(6, generator=gen) for n in (12, 20, 9)]
    tables = build_router_tables(pooled, num_centroids=2, whitening="within", seed=3)
    assert tables.centroid_counts == [2, 2, 2] and tables.centroid_adapter.tolist() == [0, 0, 1, 1, 2, 2]
    from ariadne_hf.routing.centroids import kmeans

    again = kmeans(to_scoring_space(pooled[1], tables.center, tables.transform), 2, seed=3)
    assert torch.equal(tables.centroids[2:4], again)
    # the kernel spec: cos(W (x - center), C) -- checked against a direct computation
    table = torch.randn(30, 6, generator=gen)
    ids = torch.randint(0, 30, (4, 5), generator=gen)
    mask = torch.ones_like(ids)
    scores, best = embed_pool_distance_ref(ids, mask, table, tables.centroids, tables.centroid_adapter, 3,
                                           center=tables.center, transform=tables.transform)
    x = (table[ids].mean(1) - tables.center) @ tables.transform.T
    sims = F.normalize(x, dim=-1) @ tables.centroids.T  # [4, 6]
    expected = sims.view(4, 3, 2).amax(-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.equal(best, expected.argmax(-1))


def test_transform_shape_and_dtype_are_checked():
    table = torch.randn(10, 4)
    ids = torch.zeros(1, 2, dtype=torch.long)
    cents, owner = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="transform must be an fp32"):
        embed_pool_distance_ref(ids, torch.ones_like(ids), table, cents, owner, 2, transform=torch.eye(3))
    with pytest.raises(ValueError, match="transform must be an fp32"):
        embed_pool_distance_ref(ids, torch.ones_like(ids), table, cents, owner, 2,
                                transform=torch.eye(4, dtype=torch.float64))
