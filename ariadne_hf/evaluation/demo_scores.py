"""The demo's task-score table: what routing buys, in numbers, on a fixed sample of each task's test questions.

Four ways to answer the same multiple-choice questions (summed log-likelihood of each choice, the shared-prompt
scorer of `task_metrics.choice_scores`): the routed adapter (sequence routing, the bundle's defaults), token-level
mixing (the top-2 softmax mixture of the prompt's route scores, `token_eval`), the oracle adapter (the task's own)
and the base model. The sample is fixed before anything is scored: the first N multiple-choice rows of each task's
test split in file order (all of them with N=None), never chosen by the result.
"""

from __future__ import annotations

import math

from .reports import matplotlib_figure_class, percent

DEFAULT_QUESTIONS_PER_TASK = 6
"""Questions per task scored by `ariadne demo` (36 for the six demo tasks): what fits the demo's one-minute budget
on 2 CPU cores (measured in docs/demo_adapters.md); `--full` scores all 538."""

METHODS = (("routed", "routed adapter"), ("token_top2", "token-level, top-2 mix"), ("oracle", "oracle adapter"),
           ("base", "base model"))
"""(key, column title) of the table, in column order."""

TOKEN_TOP_K = 2


def sample_rule(per_task: int | None) -> str:
    """The sampling rule in words, as the report states it."""
    if per_task is None:
        return "every multiple-choice test question of each task"
    return f"the first {per_task} multiple-choice test questions of each task, in file order"


def scored_sample(test: dict[str, list[dict]], per_task: int | None) -> list[dict]:
    """The first `per_task` rows with choices of each task's test rows, in file order (every such row for None);
    tasks in the order of `test`. Raises ValueError for per_task < 1."""
    if per_task is not None and per_task < 1:
        raise ValueError(f"questions per task must be >= 1, got {per_task} (use --full for all of them).")
    out = []
    for rows in test.values():
        choice_rows = [r for r in rows if "choices" in r and "answer" in r]
        out += choice_rows if per_task is None else choice_rows[:per_task]
    return out


def demo_task_scores(model, rows: list[dict], *, per_task: int | None, progress: bool = False) -> dict:
    """Accuracy of each method of `METHODS` on `rows` (each row's task is its oracle adapter), per task and
    overall (micro: every question counts once).

    Returns {"metric": "multiple_choice", "rule", "questions_per_task", "rows", "per_task": {task: {"questions",
    routed, token_top2, oracle, base}}, "overall": {same keys}, "token_top_k"}. Rows routed to their oracle adapter
    are scored once for both columns (`runs.task_scores`)."""
    from .runs import route_rows, task_scores
    from .token_eval import token_routed_hits

    if not rows:
        raise ValueError("No multiple-choice question to score.")
    oracle = [r["task"] for r in rows]
    routed = route_rows(model, rows)[0]
    sequence = task_scores(model, rows, routed, oracle, "multiple_choice", progress=progress, return_hits=True)
    top_k = min(TOKEN_TOP_K, len(model.adapter_names))
    columns = {"routed": sequence["hits"]["routed"], "token_top2": token_routed_hits(
        model, rows, "multiple_choice", top_k=top_k), "oracle": sequence["hits"]["oracle"],
        "base": sequence["hits"]["base"]}

    def mean(values: list[bool]) -> float:
        return sum(values) / len(values)

    by_task = {}
    for task in sorted(set(oracle)):
        index = [i for i, t in enumerate(oracle) if t == task]
        by_task[task] = {"questions": len(index), **{k: mean([columns[k][i] for i in index]) for k in columns}}
    overall = {"questions": len(rows), **{k: mean(v) for k, v in columns.items()}}
    return {"metric": "multiple_choice", "rule": sample_rule(per_task), "questions_per_task": per_task,
            "rows": len(rows), "per_task": by_task, "overall": overall, "token_top_k": top_k}


def scores_markdown(scores: dict) -> str:
    """The report section: rule, table (tasks x methods + all), plot reference added by the caller."""
    lines = ["## What routing buys: task scores", "",
             f"Multiple-choice accuracy (summed log-likelihood of each choice after the chat prompt; the choices are "
             f"not shown in the prompt) on {sample_rule(scores['questions_per_task'])} ({scores['rows']} questions). "
             "The sample is fixed by that rule before anything is scored. Token-level: the top-"
             f"{scores['token_top_k']} softmax mixture of the adapters the prompt routes to (`routing=\"token\"`).",
             "", "| task | questions | " + " | ".join(title for _, title in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for task, row in scores["per_task"].items():
        lines.append(f"| {task} | {row['questions']} | " + " | ".join(percent(row[k]) for k, _ in METHODS) + " |")
    total = scores["overall"]
    lines.append(f"| **all** | {total['questions']} | " + " | ".join(f"**{percent(total[k])}**" for k, _ in METHODS)
                 + " |")
    if scores["questions_per_task"] is not None:
        half = 100 * 1.96 * math.sqrt(0.25 / total["questions"])
        lines += ["", f"A sample this size measures the overall column to about ±{half:.0f} points (95%, worst "
                  f"case) and each task to about ±{100 * 1.96 * math.sqrt(0.25 / scores['questions_per_task']):.0f}: "
                  "read the overall row; `ariadne demo --full` scores every question (about 8 minutes on 2 CPU cores)."]
    return "\n".join(lines)


def scores_console(scores: dict) -> str:
    """The same table for the terminal."""
    width = max(len(t) for t in scores["per_task"]) + 2
    head = "".join(f"{key:>12}" for key, _ in METHODS)
    lines = [f"  {'task':<{width}}{'n':>4}{head}"]
    for task, row in list(scores["per_task"].items()) + [("all", scores["overall"])]:
        lines.append(f"  {task:<{width}}{row['questions']:>4}" + "".join(f"{percent(row[k]):>12}" for k, _ in METHODS))
    return "\n".join(lines)


def plot_task_scores(path: str, scores: dict) -> bool:
    """Grouped bars (one group per task and one for all, one bar per method) as a PNG; False without matplotlib."""
    figure = matplotlib_figure_class()
    if figure is None:
        return False
    groups = list(scores["per_task"].items()) + [("all", scores["overall"])]
    colors = ("#4c72b0", "#8172b3", "#55a868", "#c44e52")
    fig = figure(figsize=(9.0, 4.2))
    ax = fig.subplots()
    width = 0.8 / len(METHODS)
    for j, ((key, title), color) in enumerate(zip(METHODS, colors, strict=True)):
        ax.bar([i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(groups))],
               [100 * row[key] for _, row in groups], width, label=title, color=color)
    ax.set_xticks(range(len(groups)), [task.replace("_", "\n", 2) for task, _ in groups], fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Multiple-choice accuracy, {scores['rows']} questions ({sample_rule(scores['questions_per_task'])})",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=len(METHODS), loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return True
