"""The bundle card: YAML front matter the Hub reads, adapters table, routing report, pictures linked by path."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import yaml

from ariadne_hf import AriadneConfig
from ariadne_hf.bundle.model_card import NO_PLOTS_NOTE, centroid_map, write_model_card
from ariadne_hf.evaluation import routing_report

NAMES = ["math", "poetry", "code"]


def make_config(names=NAMES, backbone="HuggingFaceTB/SmolLM2-135M-Instruct", **kwargs) -> AriadneConfig:
    adapters = {n: {"rank": 4 + i, "target_modules": ["v_proj", "q_proj"], "num_prompts": 40 + i,
                    "num_centroids": 4, "heldout_accuracy": None, "sha256": "0" * 64} for i, n in enumerate(names)}
    return AriadneConfig(backbone_name_or_path=backbone, backbone_revision="a" * 40, adapter_names=list(names),
                         adapters=adapters, embedding_dim=16, embedding_vocab_size=100, **kwargs)


def make_report(names=NAMES) -> dict:
    truth = [n for n in names for _ in range(4)]
    predicted = list(truth)
    predicted[0], predicted[-1] = names[-1], "__base__"
    return routing_report(truth, predicted, names)


def tables(names=NAMES, k_per=2, d=16):
    centroids = torch.randn(len(names) * k_per, d, generator=torch.Generator().manual_seed(0))
    return centroids, torch.arange(len(names)).repeat_interleave(k_per)


def front_matter(readme: str) -> dict:
    match = re.match(r"\A---\n(.*?)\n---\n", readme, flags=re.S)
    assert match, "README.md must start with a YAML front matter block"
    return yaml.safe_load(match.group(1))


def linked_files(readme: str) -> list[str]:
    """Relative targets of markdown links and images."""
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+://", t)]


def table_rows(readme: str, header: str) -> list[list[str]]:
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_card_has_front_matter_routing_table_report_and_images(tmp_path):
    from huggingface_hub import ModelCard

    centroids, owner = tables()
    write_model_card(tmp_path, make_config(), centroids, owner, routing_report=make_report())
    readme = (tmp_path / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "adapter"
    assert meta["base_model_revision"] == "a" * 40
    assert {"ariadne", "lora", "peft", "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct"} <= set(meta["tags"])
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "transformers"  # huggingface_hub parses it

    rows = table_rows(readme, "| adapter |")
    assert [r[0] for r in rows] == [f"`{n}`" for n in NAMES]
    assert rows[1] == ["`poetry`", "5", "q_proj, v_proj", "41", "2", "100.0%"]
    assert rows[0][5] == "75.0%" and rows[2][5] == "75.0%"
    assert "macro accuracy **83.3%**" in readme
    links = linked_files(readme)
    assert set(links) == {"images/routing_confusion.png", "images/centroids_pca.png"}
    for link in links:
        assert (tmp_path / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "import ariadne_hf" in readme and 'bundle = "your-org/your-ariadne-bundle"' in readme
    assert "trust_remote_code" in readme  # says it is not needed


def test_card_without_report_links_no_confusion_image_and_cleans_stale_ones(tmp_path):
    centroids, owner = tables()
    write_model_card(tmp_path, make_config(), centroids, owner, routing_report=make_report())
    write_model_card(tmp_path, make_config(), centroids, owner, routing_report=None)
    readme = (tmp_path / "README.md").read_text()
    assert linked_files(readme) == ["images/centroids_pca.png"]
    assert not (tmp_path / "images" / "routing_confusion.png").exists()
    assert "No held-out prompts" in readme
    assert all(r[5] == "n/a" for r in table_rows(readme, "| adapter |"))


@pytest.mark.parametrize("k_per, d, names", [(1, 16, ["solo"]), (2, 1, NAMES), (1, 1, ["solo"])])
def test_card_renders_for_degenerate_centroids(tmp_path, k_per, d, names):
    centroids, owner = tables(names, k_per, d)
    config = make_config(names)
    config.embedding_dim = d
    write_model_card(tmp_path, config, centroids, owner, routing_report=None)
    readme = (tmp_path / "README.md").read_text()
    assert front_matter(readme)["library_name"] == "transformers"
    for link in linked_files(readme):
        assert (tmp_path / link).is_file()
    assert (tmp_path / "images" / "centroids_pca.png").is_file()


def test_card_without_matplotlib_skips_pictures_with_a_note(tmp_path, monkeypatch):
    centroids, owner = tables()
    write_model_card(tmp_path, make_config(), centroids, owner, routing_report=make_report())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    write_model_card(tmp_path, make_config(), centroids, owner, routing_report=make_report())
    readme = (tmp_path / "README.md").read_text()
    assert NO_PLOTS_NOTE in readme and linked_files(readme) == []
    assert list((tmp_path / "images").iterdir()) == []
    assert "| **math** | 3 | 0 | 1 | 0 |" in readme  # the confusion matrix is still there, as a table


@pytest.mark.parametrize("backbone", ["base", "/abs/local/backbone"])
def test_no_base_model_metadata_for_bundled_or_local_backbones(tmp_path, backbone):
    centroids, owner = tables()
    write_model_card(tmp_path, make_config(backbone=backbone), centroids, owner)
    meta = front_matter((tmp_path / "README.md").read_text())
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert not any(t.startswith("base_model:") for t in meta["tags"])


def test_card_is_deterministic_and_escapes_table_cells(tmp_path):
    centroids, owner = tables(["a|b", "c"])
    for out in ("one", "two"):
        write_model_card(tmp_path / out, make_config(["a|b", "c"]), centroids, owner,
                         routing_report=make_report(["a|b", "c"]))
    for name in ("README.md", "images/centroids_pca.png", "images/routing_confusion.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    rows = table_rows((tmp_path / "one" / "README.md").read_text(), "| adapter |")
    assert rows[0][0] == "`a\\|b`" and len(rows[0]) == 6


def test_centroid_map_is_pca_with_fixed_signs():
    line = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 1.0], [2.0, 4.0, 1.0]])  # points on a line
    coords, explained = centroid_map(line, distance="l2")
    assert explained[0] == pytest.approx(1.0) and explained[1] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(coords[:, 1], torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert coords[2, 0] > 0 > coords[0, 0]  # largest loading positive: fixed orientation
    assert torch.allclose(coords[:, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * 5**0.5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=gen)
    coords, explained = centroid_map(x, distance="l2")
    flipped, _ = centroid_map(-x, distance="l2")
    assert torch.allclose(coords, -flipped)  # same axes whatever the SVD's sign choice
    centered = (x - x.mean(0)).double()
    assert float((coords**2).sum()) == pytest.approx(sum(explained) * float((centered**2).sum()))
    one, _ = centroid_map(torch.ones(1, 4))
    assert one.tolist() == [[0.0, 0.0]]


def test_card_shows_the_ood_calibration(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "bundle")
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "ood calibration" in card and "cross-fitted, 5 folds" in card
    assert "off (ood scores reported" in card and "STALE" not in card


def test_card_routing_table_shows_the_token_routing_options(tmp_path):
    centroids, owner = tables()
    config = make_config(routing="token", reroute_every=3, routing_top_k=3, routing_temperature=0.25)
    write_model_card(tmp_path, config, centroids, owner)
    rows = dict(table_rows((tmp_path / "README.md").read_text(), "| setting |"))
    assert rows["re-route every n new tokens"] == "3"
    assert rows["top-k adapters mixed"] == "3"
    assert rows["softmax temperature"] == "0.25"
