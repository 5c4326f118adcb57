"""Report folders for `ariadne eval` and `ariadne demo`: markdown, JSON and pictures (matplotlib optional)."""

from __future__ import annotations

import json
import math
import os


def matplotlib_figure_class():
    """matplotlib's headless `Figure` class, or None when matplotlib is not installed (plots are optional)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def plot_confusion(path: str, report: dict) -> bool:
    """Confusion matrix of a routing report as a PNG; False when matplotlib is missing."""
    figure = matplotlib_figure_class()
    if figure is None:
        return False
    from ..bundle.model_card import plot_confusion_matrix

    plot_confusion_matrix(figure, path, report)
    return True


def plot_margins(path: str, margins: list[float]) -> bool:
    """Histogram of best-minus-second-best score margins as a PNG; False when matplotlib is missing."""
    figure = matplotlib_figure_class()
    finite = [m for m in margins if math.isfinite(m)]
    if figure is None or not finite:
        return False
    fig = figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    ax.hist(finite, bins=40, color="#4c72b0", edgecolor="white")
    ax.set_xlabel("score margin (best - second best)")
    ax.set_ylabel("prompts")
    ax.set_title("Routing confidence on held-out prompts")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return True


def plot_ood_histograms(path: str, in_domain: list[float], ood: list[float], threshold: float | None) -> bool:
    """Overlaid histograms of the ood score of in-domain and out-of-distribution prompts (and the calibrated
    threshold) as a PNG; False when matplotlib is missing or there is nothing to plot."""
    figure = matplotlib_figure_class()
    a = [v for v in in_domain if math.isfinite(v)]
    b = [v for v in ood if math.isfinite(v)]
    if figure is None or not a or not b:
        return False
    fig = figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    low, high = min(a + b), max(a + b)
    bins = [low + (high - low) * i / 40 for i in range(41)] if high > low else 40
    ax.hist(a, bins=bins, alpha=0.6, color="#4c72b0", label=f"in-domain ({len(a)})", density=True)
    ax.hist(b, bins=bins, alpha=0.6, color="#dd8452", label=f"out-of-distribution ({len(b)})", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label="calibrated threshold")
    ax.set_xlabel("ood score (higher = more foreign)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return True


def ood_table(summary: dict) -> list[str]:
    """Markdown lines of `calibration.ood_summary`."""
    lines = [f"In-domain prompts: {summary['in_domain_prompts']}; out-of-distribution prompts: {summary['ood_prompts']}.",
             "", "| AUROC | FPR at 95% TPR | in-domain false rejects | out-of-distribution rejects | threshold |",
             "|---|---|---|---|---|"]
    threshold = summary.get("threshold")
    lines.append(f"| {summary['auroc']:.3f} | {percent(summary['fpr_at_95_tpr'])} | "
                 f"{percent(summary.get('in_domain_false_reject_rate'))} | {percent(summary.get('ood_reject_rate'))} | "
                 f"{'-' if threshold is None else f'{threshold:.3f}'} |")
    return lines


def percent(value) -> str:
    """A fraction as a percentage with one decimal; "-" for None."""
    return "-" if value is None else f"{100 * value:.1f}%"


def routing_table(report: dict) -> list[str]:
    lines = ["| adapter | prompts | selection accuracy |", "|---|---|---|"]
    for name in report["labels"]:
        if name in report["accuracy"]:
            lines.append(f"| {name} | {report['num_prompts'][name]} | {percent(report['accuracy'][name])} |")
    lines.append(f"| **macro / micro** | {sum(report['num_prompts'].values())} | "
                 f"**{percent(report['macro_accuracy'])}** / {percent(report['micro_accuracy'])} |")
    return lines


def scores_table(scores: dict) -> list[str]:
    lines = [f"Task metric: `{scores['metric']}` on {scores['rows']} prompts; routed column: "
             f"{scores.get('routing', 'sequence')} routing.", "",
             "| task | routed | oracle adapter | base model |", "|---|---|---|---|"]
    for task, row in scores["per_task"].items():
        lines.append(f"| {task} | {percent(row['routed'])} | {percent(row['oracle'])} | {percent(row['base'])} |")
    lines.append(f"| **all** | **{percent(scores['routed'])}** | {percent(scores['oracle'])} | "
                 f"{percent(scores['base'])} |")
    lines += ["", f"Routed / oracle: **{percent(scores['recovery'])}** of the oracle's task score."]
    return lines


def write_eval_report(out_dir: str, report: dict, *, title: str = "Routing evaluation",
                      extra_sections: list[str] | None = None) -> str:
    """Write report.md, report.json, confusion.png and margins.png into `out_dir`; returns report.md's path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    lines = [f"# {title}", "", "## Selection accuracy", ""] + routing_table(report)
    if report.get("skipped_rows"):
        lines += ["", f"{report['skipped_rows']} rows of tasks without an adapter were not scored."]
    if plot_confusion(os.path.join(out_dir, "confusion.png"), report):
        lines += ["", "![confusion matrix](confusion.png)"]
    if plot_margins(os.path.join(out_dir, "margins.png"), report.get("margins", [])):
        lines += ["", "![score margins](margins.png)"]
    if report.get("task_scores"):
        lines += ["", "## Task scores", ""] + scores_table(report["task_scores"])
    if report.get("ood"):
        lines += ["", "## Out-of-distribution prompts", ""] + ood_table(report["ood"])
        scores = report.get("ood_scores", {})
        if plot_ood_histograms(os.path.join(out_dir, "ood_scores.png"), scores.get("in_domain", []),
                               scores.get("ood", []), report["ood"].get("threshold")):
            lines += ["", "![ood score histograms](ood_scores.png)"]
    for section in extra_sections or []:
        lines += ["", section]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path
