"""Cost of the out-of-distribution score: route() with and without it vs a 32-token greedy generate, on the demo
bundle (SmolLM2-135M-Instruct + six adapters), batch 1 and 8, prompts from the demo tasks' test rows.

    python benchmarks/bench_ood_cost.py --bundle /tmp/ariadne-demo-bundle
"""

from __future__ import annotations

import argparse

import torch
from common import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="/tmp/ariadne-demo-bundle")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from bench_multiple_choice import demo_model

    from ariadne_hf.evaluation.demo import demo_rows_by_task, demo_tasks
    from ariadne_hf.evaluation.task_metrics import left_pad, prompt_ids

    torch.set_grad_enabled(False)
    model = demo_model(args.bundle)
    tok = model.tokenizer
    rows = [r for t in demo_tasks() for r in demo_rows_by_task("test", [t])[t][:2]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    counts, stats = model.router.token_counts, model.router.ood_stats
    for batch in (1, 8):
        ids, mask = left_pad([prompt_ids(tok, r["text"]) for r in rows[:batch]], pad)
        with_ood = timed(lambda ids=ids, mask=mask: model.route(input_ids=ids, attention_mask=mask), repeats=20)
        model.router.set_ood(None, None)
        without = timed(lambda ids=ids, mask=mask: model.route(input_ids=ids, attention_mask=mask), repeats=20)
        model.router.set_ood(counts, stats)
        generate = timed(lambda ids=ids, mask=mask: model.generate(input_ids=ids, attention_mask=mask,
                                                                   max_new_tokens=args.new_tokens, do_sample=False,
                                                                   min_new_tokens=args.new_tokens, pad_token_id=pad),
                         repeats=2)
        print(f"batch {batch}: route() {1e3 * without:.2f} ms without the ood score, {1e3 * with_ood:.2f} ms with it "
              f"(+{1e3 * (with_ood - without):.2f} ms); {args.new_tokens}-token generate {generate:.2f} s; routing + "
              f"score = {100 * with_ood / generate:.2f}% of the generate")


if __name__ == "__main__":
    main()
