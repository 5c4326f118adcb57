"""The distance registry: well-formed entries, each one's functions against an independent formula, every reader."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from ariadne_hf.cli import build_parser
from ariadne_hf.configuration_ariadne import AriadneConfig
from ariadne_hf.kernels import DISTANCES, embed_pool_distance_ref, get_distance
from ariadne_hf.kernels.distances import REGISTRY
from ariadne_hf.routing.centroids import kmeans

ORACLES = {
    # sim(x, c) in float64, written without the registry's one-matmul identities
    "cosine": lambda x, c: F.cosine_similarity(x[:, None, :], c[None, :, :], dim=-1, eps=1e-12),
    "l2": lambda x, c: -torch.cdist(x, c),
}


def test_entries_are_well_formed_and_the_names_are_the_registry_order():
    assert DISTANCES == tuple(REGISTRY) and DISTANCES[0] == "cosine"
    assert all(name == entry.name for name, entry in REGISTRY.items())
    codes = [entry.code for entry in REGISTRY.values()]
    assert sorted(codes) == list(range(len(codes)))  # fresh consecutive constexpr codes, one kernel branch each
    assert set(ORACLES) == set(DISTANCES), "a new distance needs an oracle here"


def test_unknown_distance_names_the_known_ones():
    for bad in ("dot", None, 3):
        with pytest.raises(ValueError, match=r"distance must be one of \('cosine', 'l2'\)"):
            get_distance(bad)


@pytest.mark.parametrize("name", DISTANCES)
def test_similarity_from_dots_and_norms_matches_a_float64_oracle(name):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(7, 24, generator=g), torch.randn(5, 24, generator=g)
    x[3] = 0.0  # a zero row: the norm clamp
    dots = x @ c.T
    got = get_distance(name).similarity(dots, x.norm(dim=-1, keepdim=True), c.norm(dim=-1))
    torch.testing.assert_close(got.double(), ORACLES[name](x.double(), c.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DISTANCES)
def test_kmeans_assignment_and_seeding_agree_with_the_similarity(name):
    """assign ranks centers like similarity; seed_gap is 0 at the chosen point and >= 0 elsewhere."""
    entry = get_distance(name)
    g = torch.Generator().manual_seed(2)
    points, centers = torch.randn(40, 8, generator=g), torch.randn(6, 8, generator=g)
    if entry.normalized:
        points, centers = F.normalize(points, dim=-1), F.normalize(centers, dim=-1)
    ranked = entry.similarity(points @ centers.T, points.norm(dim=-1, keepdim=True), centers.norm(dim=-1))
    assert torch.equal(entry.assign(points, centers).argmax(-1), ranked.argmax(-1))
    gap = entry.seed_gap(points, points[5])
    assert gap.shape == (40,) and bool((gap >= 0).all()) and float(gap[5]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", DISTANCES)
def test_every_reader_accepts_every_registered_distance(name):
    """CLI choices, configuration validation, k-means and the torch kernel path all read the registry."""
    assert _cli_choices() == list(DISTANCES)
    assert AriadneConfig(distance=name).distance == name
    centers = kmeans(torch.randn(30, 6, generator=torch.Generator().manual_seed(3)), 3, distance=name)
    assert centers.shape == (3, 6)
    if get_distance(name).normalized:
        torch.testing.assert_close(centers.norm(dim=-1), torch.ones(3))
    table = torch.randn(10, 6)
    scores, best = embed_pool_distance_ref(torch.tensor([[1, 2, 3]]), torch.ones(1, 3), table, centers,
                                           torch.tensor([0, 1, 1]), 2, distance=name)
    assert scores.shape == (1, 2) and 0 <= int(best[0]) < 2


def _cli_choices() -> list[str]:
    """The choices of ``ariadne build --distance`` (argparse keeps a subcommand's parser in its subparsers action)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    action = next(a for a in sub.choices["build"]._actions if "--distance" in a.option_strings)  # noqa: SLF001
    return list(action.choices)


def test_unknown_distance_is_refused_by_config_and_kmeans():
    with pytest.raises(ValueError, match="distance must be one of"):
        AriadneConfig(distance="dot")
    with pytest.raises(ValueError, match="distance must be one of"):
        kmeans(torch.randn(4, 3), 2, distance="dot")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "--distance", "dot"])
