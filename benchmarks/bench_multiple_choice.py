"""Multiple-choice scoring: the shared-prompt path (`choice_scores`, one prompt pass + one pass over all choices
from a KV cache) vs the per-row path it replaces (`choice_scores_per_row`, the prompt re-run for every choice).

Side by side in one run on the demo bundle (default backbone + the six demo adapters), each row scored with its
oracle adapter; prints both times, the ratio, the largest score difference and whether every hit agrees.

    python benchmarks/bench_multiple_choice.py --per-task 3        # 18 rows
    python benchmarks/bench_multiple_choice.py --save-bundle /tmp/ariadne-demo-bundle --data-out /tmp/demo_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def demo_model(bundle: str | None):
    """The demo bundle (built like `ariadne demo`; loaded from `bundle` when it exists, else built and saved)."""
    from ariadne_hf import AriadneRoutedModel
    from ariadne_hf.data import demo_adapters_dir
    from ariadne_hf.default_backbone import default_backbone_path
    from ariadne_hf.evaluation.demo import demo_rows_by_task, demo_tasks

    if bundle and os.path.isdir(bundle):
        return AriadneRoutedModel.from_pretrained(bundle)
    tasks = demo_tasks()
    train = demo_rows_by_task("train", tasks)
    model = AriadneRoutedModel.from_adapters(default_backbone_path(), {t: str(demo_adapters_dir() / t) for t in tasks},
                                             {t: [r["text"] for r in train[t]] for t in tasks}, progress=False)
    if bundle:
        model.save_pretrained(bundle)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=3, help="rows per demo task (first ones in file order)")
    parser.add_argument("--save-bundle", default=None, help="load/save the demo bundle here")
    parser.add_argument("--data-out", default=None, help="also write the demo tasks' test rows as JSON lines here")
    args = parser.parse_args()
    from ariadne_hf.evaluation.demo import demo_rows_by_task, demo_tasks
    from ariadne_hf.evaluation.task_metrics import best_choice_hits, choice_scores, choice_scores_per_row

    torch.set_grad_enabled(False)
    model = demo_model(args.save_bundle)
    tasks = demo_tasks()
    test = demo_rows_by_task("test", tasks)
    if args.data_out:
        with open(args.data_out, "w", encoding="utf-8") as handle:
            for t in tasks:
                for row in test[t]:
                    handle.write(json.dumps(row) + "\n")
    rows = [r for t in tasks for r in [r for r in test[t] if "choices" in r][:args.per_task]]
    names = [r["task"] for r in rows]
    choices = sum(len(r["choices"]) for r in rows)
    start = time.perf_counter()
    slow = choice_scores_per_row(model, model.tokenizer, rows, names)
    slow_time = time.perf_counter() - start
    start = time.perf_counter()
    fast = choice_scores(model, model.tokenizer, rows, names)
    fast_time = time.perf_counter() - start
    diff = max(abs(a - b) for sa, sb in zip(slow, fast, strict=True) for a, b in zip(sa, sb, strict=True))
    same = best_choice_hits(rows, slow) == best_choice_hits(rows, fast)
    print(f"{len(rows)} rows, {choices} choices ({choices / len(rows):.1f} per row), oracle adapters")
    print(f"per-row path (prompt re-run per choice): {slow_time:.1f} s")
    print(f"shared-prompt path (KV cache expanded):  {fast_time:.1f} s")
    print(f"speed-up: {slow_time / fast_time:.2f}x; max |score difference| {diff:.2e}; same hits: {same}")


if __name__ == "__main__":
    main()
