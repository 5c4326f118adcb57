"""Cost of the out-of-distribution score: route() with and without it vs a 32-token greedy generate, on the demo
bundle (SmolLM2-135M-Instruct + six adapters), batch 1 and 8, prompts from the demo tasks' test rows.

    python benchmarks/bench_ood_cost.py --bundle /tmp/ariadne-demo-bundle
    python benchmarks/bench_ood_cost.py --scale     # sparse token tables: memory and lookup time vs adapter count

`--scale`: synthetic sparse token counts at a 49,152-token vocabulary, 2,000 distinct tokens per adapter (the order of
a few hundred routing-dev prompts), for 10 / 100 / 1,000 / 4,000 adapters: bytes per adapter (dense [A, V] int64 would
be 393 KB per adapter) and the time of the ood components of a batch of 8 x 128 tokens, side by side in one run.
"""

from __future__ import annotations

import argparse

import torch
from common import timed


def scale(vocab: int = 49152, distinct: int = 2000, batch: int = 8, tokens: int = 128) -> None:
    from ariadne_hf.routing.ood import SparseTokenCounts, ood_components_sparse

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=gen)
    weights = torch.ones(batch, tokens)
    print("| adapters | sparse bytes / adapter | dense bytes / adapter | ood components, 8 x 128 tokens |")
    print("|---|---|---|---|")
    for adapters in (10, 100, 1000, 4000):
        rows = [torch.randperm(vocab, generator=gen)[:distinct].sort().values + a * vocab for a in range(adapters)]
        keys = torch.cat(rows)
        table = SparseTokenCounts(keys, torch.randint(1, 20, keys.shape, generator=gen), adapters, vocab)
        scores = torch.randn(batch, adapters, generator=gen)
        seconds = timed(lambda table=table, scores=scores: ood_components_sparse(ids, weights, scores, table),
                        repeats=20)
        print(f"| {adapters} | {table.nbytes() / adapters:,.0f} | {8 * vocab:,} | {1e3 * seconds:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="/tmp/ariadne-demo-bundle")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--scale", action="store_true")
    args = parser.parse_args()
    if args.scale:
        scale()
        return
    from bench_multiple_choice import demo_model

    from ariadne_hf.evaluation.demo import demo_rows_by_task, demo_tasks
    from ariadne_hf.evaluation.task_metrics import left_pad, prompt_ids

    torch.set_grad_enabled(False)
    model = demo_model(args.bundle)
    tok = model.tokenizer
    rows = [r for t in demo_tasks() for r in demo_rows_by_task("test", [t])[t][:2]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    counts, stats = model.router.token_table, model.router.ood_stats
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
