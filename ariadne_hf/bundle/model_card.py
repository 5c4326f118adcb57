"""The bundle's model card: README.md rendered from hub_cards/bundle_card.md, plus routing pictures in images/.

Front matter (what the Hub reads): ``library_name: transformers`` — the bundle is a transformers model folder
(config.json with a model_type, loaded by AutoModelForCausalLM after ``import ariadne_hf``), so the Hub's
transformers integration fits; ``peft`` would make the Hub expect a root adapter_config.json and show a
``PeftModel.from_pretrained`` snippet that cannot load a multi-adapter bundle. The adapter nature is stated the
Hub's way: ``base_model`` + ``base_model_relation: adapter`` (the model tree) and the tags ``lora``, ``peft``,
``base_model:adapter:<id>``; ``ariadne`` / ``ariadne_hf`` tags make bundles findable.

Pictures (optional dependency matplotlib, extras "plots"): a confusion matrix of routing on held-out prompts and a
2-D PCA map of the centroids, linked by relative path. Without matplotlib the card says so and links no picture.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

import torch

from .._version import __version__
from ..constants import BASE_ADAPTER, BASE_DIR, IMAGES_DIR, MODEL_CARD_NAME, REPO_ID_PLACEHOLDER
from ..kernels.distances import get_distance

TEMPLATE = "bundle_card.md"
CARD_TEMPLATES_PACKAGE = "ariadne_hf.bundle.hub_cards"
"""The top-level hub_cards/ folder, shipped as this package (pyproject.toml package-dir)."""
CONFUSION_IMAGE = f"{IMAGES_DIR}/routing_confusion.png"
CENTROIDS_IMAGE = f"{IMAGES_DIR}/centroids_pca.png"
CARD_IMAGES = (CONFUSION_IMAGE, CENTROIDS_IMAGE)
NO_PLOTS_NOTE = "Pictures were skipped: matplotlib is not installed (pip install 'ariadne_hf[plots]')."


def write_model_card(
    save_directory: str | os.PathLike,
    config: Any,
    centroids: torch.Tensor,
    centroid_adapter: torch.Tensor,
    *,
    routing_report: dict | None = None,
    repo_id: str | None = None,
) -> None:
    """Write README.md and images/*.png into `save_directory`.

    `config` is an AriadneConfig (or its dict); `centroids` [K, D] and `centroid_adapter` [K] (index into
    config.adapter_names) are the router tables; `routing_report` is `evaluation.routing_report(...)` or None.
    Guarantees: never fails for lack of matplotlib (pictures are skipped with a note), renders for K=1 and D=1,
    links only images it wrote, removes its own stale images, and is deterministic (same inputs, same bytes).
    Without `repo_id` the usage snippet names a placeholder that `hub.push_bundle` replaces by the repo id.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    os.makedirs(save_directory, exist_ok=True)
    images = write_card_images(save_directory, cfg, centroids, centroid_adapter, routing_report)
    card = render_model_card(cfg, centroids, centroid_adapter, routing_report=routing_report, images=images,
                             repo_id=repo_id)
    card.save(os.path.join(save_directory, MODEL_CARD_NAME))


# ---- rendering ------------------------------------------------------------------------------------------------
def card_metadata(cfg: dict) -> Any:
    """The card's YAML front matter as a huggingface_hub ModelCardData."""
    from huggingface_hub import ModelCardData

    base = hub_base_model(cfg.get("backbone_name_or_path"))
    tags = ["ariadne", "ariadne_hf", "lora", "peft", "adapter-routing"]
    if base:
        tags.append(f"base_model:adapter:{base}")
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base,
        base_model_relation="adapter" if base else None,
        base_model_revision=cfg.get("backbone_revision") if base else None,
        tags=tags,
    )


def hub_base_model(reference: str | None) -> str | None:
    """`reference` if it is a Hub repo id (not a local path, not the bundled base/), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not reference or reference == BASE_DIR or os.path.isabs(reference) or os.path.exists(reference):
        return None
    try:
        validate_repo_id(reference)
    except HFValidationError:
        return None
    return reference


def render_model_card(cfg: dict, centroids: torch.Tensor, centroid_adapter: torch.Tensor, *,
                      routing_report: dict | None, images: dict[str, str | None], repo_id: str | None) -> Any:
    """Render the template into a huggingface_hub ModelCard (not written anywhere)."""
    from huggingface_hub import ModelCard

    names = list(cfg.get("adapter_names") or [])
    counts = torch.bincount(centroid_adapter.to(torch.int64).flatten(), minlength=len(names)).tolist() if names \
        else []
    backbone = cfg.get("backbone_name_or_path") or "unknown"
    short = "the bundled backbone" if backbone == BASE_DIR else backbone.rstrip("/").rsplit("/", 1)[-1]
    template = resources.files(CARD_TEMPLATES_PACKAGE).joinpath(TEMPLATE).read_text(encoding="utf-8")
    has_plots = images.get("plots", False)
    return ModelCard.from_template(
        card_metadata(cfg),
        template_str=template,
        ariadne_version=__version__,
        title=f"ARIADNE bundle: {len(names)} LoRA adapter{'s' if len(names) != 1 else ''} on {short}",
        num_adapters=len(names),
        num_centroids=int(centroids.shape[0]),
        distance=cfg.get("distance", "cosine"),
        reject_threshold=cfg.get("reject_threshold"),
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        example_prompt="Write a short poem about the sea.",
        backbone_text=_backbone_text(cfg),
        embedding_shape=f"V={cfg.get('embedding_vocab_size')} rows, D={cfg.get('embedding_dim')}",
        adapter_rows=_adapter_rows(cfg, names, counts, routing_report),
        routing_rows=_routing_rows(cfg),
        report=_report_view(routing_report) if routing_report else None,
        images=images,
        centroid_caption=_centroid_caption(cfg, centroids, has_plots),
        plots_note=None if has_plots else NO_PLOTS_NOTE,
        has_base=backbone == BASE_DIR,
    )


def _cell(value: Any) -> str:
    """A markdown table cell: pipes escaped, one line."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * float(value):.1f}%"


def _backbone_text(cfg: dict) -> str:
    backbone, revision = cfg.get("backbone_name_or_path"), cfg.get("backbone_revision")
    if backbone == BASE_DIR:
        return "Stored in this repo under `base/` (self-contained bundle)."
    if hub_base_model(backbone):
        pinned = f" at revision `{revision}`" if revision else " (revision not pinned)"
        return f"[`{backbone}`](https://huggingface.co/{backbone}){pinned}, downloaded on first load."
    return f"`{_cell(backbone)}` (a local path on the machine that built the bundle)."


def _adapter_rows(cfg: dict, names: list[str], counts: list[int], report: dict | None) -> list[dict]:
    meta = cfg.get("adapters") or {}
    accuracy = (report or {}).get("accuracy") or {}
    rows = []
    for index, name in enumerate(names):
        info = meta.get(name) or {}
        targets = info.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, (list, tuple, set)) else targets
        rows.append({
            "name": f"`{_cell(name)}`",
            "rank": _cell(info.get("rank", "n/a")),
            "targets": _cell(targets or "n/a"),
            "prompts": _cell(info.get("num_prompts", "n/a")),
            "centroids": counts[index] if index < len(counts) else _cell(info.get("num_centroids", "n/a")),
            "accuracy": _percent(accuracy.get(name, info.get("heldout_accuracy"))),
        })
    return rows


def _routing_rows(cfg: dict) -> list[tuple[str, str]]:
    threshold = cfg.get("reject_threshold")
    layer = int(cfg.get("routing_layer") or 0)
    rows = [
        ("routing signal", "input embedding (masked mean of the prompt's token embeddings; routing_layer 0)" if not layer
         else f"masked mean of the backbone's base hidden state after decoder layer {layer} (routing_layer {layer}; "
              "token routing re-routes on the input embedding)"),
        ("distance", cfg.get("distance", "cosine")),
        ("centering (subtract the mean prompt embedding)", "on" if cfg.get("center", True) else "off"),
        ("whitening (shrunk within-adapter covariance)", cfg.get("whitening", "none")),
        ("special tokens ignored when pooling", "yes" if cfg.get("ignore_special_tokens", True) else "no"),
        ("reject threshold (below it: plain backbone)", "none" if threshold is None else threshold),
        ("centroids requested per adapter", cfg.get("num_centroids", "n/a")),
        ("routing granularity", cfg.get("routing", "sequence")),
    ]
    calibration = cfg.get("ood_calibration")
    if calibration:
        stale = list(calibration.get("adapters", [])) != list(cfg.get("adapter_names") or [])
        rows += [
            ("out-of-distribution rejection", "on (reject='auto')" if cfg.get("reject") == "auto" else
             "off (ood scores reported; enable with reject='auto')"),
            ("ood threshold (above it: plain backbone)", round(float(cfg.get("ood_threshold")), 4)),
            ("ood calibration", f"cross-fitted, {calibration.get('folds')} folds over {calibration.get('heldout_prompts')} "
             f"held-out building prompts; target in-domain false rejects {calibration.get('target_reject_rate'):.1%} "
             f"(held out: {calibration.get('heldout_reject_rate', 0.0):.1%})"
             + ("; STALE: adapters changed since, rebuild to recalibrate" if stale else "")),
        ]
    if cfg.get("routing") == "token":
        rows += [("re-route every n new tokens", cfg.get("reroute_every")), ("top-k adapters mixed", cfg.get("routing_top_k")),
                 ("softmax temperature", cfg.get("routing_temperature"))]
    return [(key, _cell(value)) for key, value in rows]


def _report_view(report: dict) -> dict:
    columns = list(report.get("predicted_labels") or [])
    rows = [{"label": _cell(label), "counts": [int(c) for c in counts]}
            for label, counts in zip(report.get("labels") or [], report.get("confusion") or [], strict=False)]
    total = sum((report.get("num_prompts") or {}).values()) or sum(sum(r["counts"]) for r in rows)
    return {"columns": [_cell(c) for c in columns], "rows": rows, "num_prompts": total,
            "macro": _percent(report.get("macro_accuracy")), "micro": _percent(report.get("micro_accuracy"))}


def _centroid_caption(cfg: dict, centroids: torch.Tensor, has_plots: bool) -> str:
    k, d = (int(s) for s in centroids.shape)
    space = get_distance(cfg.get("distance", "cosine")).card_space
    text = f"{k} centroid{'s' if k != 1 else ''} in D={d}"
    if not has_plots:
        return f"{text}; no map was drawn."
    return f"{text}, {space}projected on their first two principal components; one colour per adapter."


# ---- pictures -------------------------------------------------------------------------------------------------
def write_card_images(save_directory: str | os.PathLike, cfg: dict, centroids: torch.Tensor,
                      centroid_adapter: torch.Tensor, routing_report: dict | None) -> dict[str, Any]:
    """Draw the card's pictures; returns {"confusion": path|None, "centroids": path|None, "plots": bool}.

    Stale pictures of ours are deleted first, so a card never links a picture from an earlier save.
    """
    for name in CARD_IMAGES:
        path = os.path.join(save_directory, *name.split("/"))
        if os.path.exists(path):
            os.remove(path)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return {"confusion": None, "centroids": None, "plots": False}
    os.makedirs(os.path.join(save_directory, IMAGES_DIR), exist_ok=True)
    names = list(cfg.get("adapter_names") or [])
    coords, explained = centroid_map(centroids, cfg.get("distance", "cosine"))
    _plot_centroids(Figure, os.path.join(save_directory, CENTROIDS_IMAGE), coords, explained, centroid_adapter, names)
    confusion = None
    if routing_report and routing_report.get("confusion"):
        plot_confusion_matrix(Figure, os.path.join(save_directory, CONFUSION_IMAGE), routing_report)
        confusion = CONFUSION_IMAGE
    return {"confusion": confusion, "centroids": CENTROIDS_IMAGE, "plots": True}


def centroid_map(centroids: torch.Tensor, distance: str = "cosine") -> tuple[torch.Tensor, list[float]]:
    """2-D PCA coordinates [K, 2] of the centroids and the explained variance ratio of both axes.

    Centroids of a ``normalized`` distance (cosine) are unit-normalised first. Deterministic: each component's largest loading is positive.
    Degenerate inputs are fine: K=1 gives the origin, D=1 or rank 1 gives a zero second axis.
    """
    x = centroids.detach().to(torch.float64).cpu().reshape(centroids.shape[0], -1)  # [K, D]
    if get_distance(distance).normalized:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x - x.mean(dim=0, keepdim=True)
    coords = torch.zeros(x.shape[0], 2, dtype=torch.float64)
    explained = [0.0, 0.0]
    if x.shape[0] < 2 or x.shape[1] < 1:
        return coords, explained
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)  # vh [min(K, D), D]
    n = min(2, vh.shape[0])
    components = vh[:n]
    largest = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(n), largest])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    coords[:, :n] = x @ components.T
    total = float((singular**2).sum())
    if total > 0:
        explained[:n] = [float(s**2) / total for s in singular[:n]]
    return coords, explained


def _save(fig: Any, path: str) -> None:
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def _plot_centroids(figure_cls: Any, path: str, coords: torch.Tensor, explained: list[float],
                    centroid_adapter: torch.Tensor, names: list[str]) -> None:
    fig = figure_cls(figsize=(6.0, 4.8))
    ax = fig.subplots()
    owner = centroid_adapter.to(torch.int64).flatten().tolist()
    cmap = _colormap(len(names))
    markers = "osD^vP*Xph"
    for index, name in enumerate(names):
        rows = [k for k, a in enumerate(owner) if a == index]
        if rows:
            ax.scatter(coords[rows, 0].numpy(), coords[rows, 1].numpy(), s=60, color=cmap(index),
                       marker=markers[index % len(markers)], label=name, edgecolors="black", linewidths=0.5)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% of variance)")
    ax.set_title("Routing centroids (PCA)")
    ax.grid(True, alpha=0.3)
    if 0 < len(names) <= 20:
        ax.legend(loc="best", fontsize="small", framealpha=0.8)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion_matrix(figure_cls: Any, path: str, report: dict) -> None:
    """Draw a routing report's confusion matrix (row shares, counts) with matplotlib's `figure_cls`; save a PNG."""
    labels = list(report["labels"])
    columns = [c if c != BASE_ADAPTER else "base" for c in report["predicted_labels"]]
    counts = torch.tensor(report["confusion"], dtype=torch.float64).reshape(len(labels), len(columns))
    shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    width, height = max(5.0, 0.6 * len(columns) + 2.5), max(3.0, 0.5 * len(labels) + 2.0)
    fig = figure_cls(figsize=(width, height))
    ax = fig.subplots()
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    if counts.numel() <= 900:
        for i in range(len(labels)):
            for j in range(len(columns)):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true adapter")
    macro = report.get("macro_accuracy")
    ax.set_title("Routing on held-out prompts" + (f" (macro accuracy {100 * macro:.1f}%)" if macro is not None
                                                  else ""))
    fig.colorbar(image, ax=ax, label="share of the true adapter's prompts")
    fig.tight_layout()
    _save(fig, path)


def _colormap(n: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"]
