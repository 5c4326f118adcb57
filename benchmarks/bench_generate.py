"""Routed generation vs the paths it replaces, measured side by side in one run (ratios, not absolute claims).

For a tiny random Llama and SmolLM2-135M-Instruct (the embedded default): 32 prompts over 8 adapters,
32 new tokens (greedy, min_new_tokens=32 so every path generates the same amount):
  - routed generate, batched (our routed LoRA layers, per-row adapters in one generate; routing included)
  - routed generate, grouped (one generate per adapter group)
  - PEFT's mixed batch with the same per-row adapters (adapter_names=..., what the routed layers replace)
  - the same batch on a single adapter (PEFT, set_adapter: the cost floor of any LoRA path)
  - a per-prompt loop, each prompt alone with its adapter
and route() time as a fraction of generate time.

Routing cost per routing layer (`--routing-layers 0 1 2 4 8`, SmolLM2 and tiny): for a batch of 8 prompts, route()
(the early layers included for k > 0) next to the prefill of that batch with its routed adapters (forward with the
routes forced, so routing is not counted twice) and next to the routed 32-token generate of the batch (routing
included). The routing cost does not depend on the centroid values, so one router is built and the model's
`routing_layer` is switched for each k (the signal's width is the hidden size, equal to the table's for these models).

    python benchmarks/bench_generate.py [--models tiny smollm2] [--repeats 3] [--routing-layers 0 2] [--cost-only]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import dev_prompts, random_adapters, timed, tiny_backbone_dir
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ariadne_hf import AriadneRoutedModel


def bench(backbone_dir: str, label: str, repeats: int, new_tokens: int = 32) -> None:
    root = tempfile.mkdtemp()
    train, test = dev_prompts(8, 40, 4)
    adapters = random_adapters(backbone_dir, list(train), root)
    model = AriadneRoutedModel.from_adapters(backbone_dir, adapters, train, num_centroids=4, progress=False)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [p[:300] for items in test.values() for p in items]  # 32 prompts
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
           "pad_token_id": tokenizer.pad_token_id}
    decision = model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    single = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir),
                                       adapters[decision.adapter_names[0]]).eval()
    names = model.adapter_names
    peft_all = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir), adapters[names[0]],
                                         adapter_name=names[0]).eval()
    for name in names[1:]:
        peft_all.load_adapter(adapters[name], adapter_name=name)
    with torch.no_grad():
        results = {
            "routed batched": timed(lambda: model.generate(**batch, **gen), repeats),
            "routed grouped": timed(lambda: model.generate(**batch, **gen, generation_strategy="grouped"), repeats),
            "PEFT mixed batch, same routes": timed(
                lambda: peft_all.generate(**batch, **gen, adapter_names=decision.adapter_names), repeats),
            "single adapter, same batch": timed(lambda: single.generate(**batch, **gen), repeats),
        }

        def per_prompt_loop():
            for prompt in prompts:
                model.generate(**tokenizer([prompt], return_tensors="pt"), **gen)

        results["per-prompt loop"] = timed(per_prompt_loop, repeats=1, warmup=0)
        route_time = timed(lambda: model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                           repeats=10)
    floor = results["single adapter, same batch"]
    print(f"\n== {label}: {len(prompts)} prompts, {len(adapters)} adapters, {new_tokens} new tokens, "
          f"prompt length {batch['input_ids'].shape[1]} (padded), {torch.get_num_threads()} threads")
    for name, seconds in results.items():
        print(f"{name:<30} {seconds * 1000:9.1f} ms   x{seconds / floor:5.2f} of single adapter")
    print(f"routed batched / PEFT mixed batch: x{results['routed batched'] / results['PEFT mixed batch, same routes']:.2f}")
    best = min(("routed batched", "routed grouped"), key=results.get)
    print(f"fastest routed strategy: {best}; per-prompt loop / fastest routed: "
          f"x{results['per-prompt loop'] / results[best]:.2f}")
    print(f"route() {route_time * 1000:.2f} ms = {route_time / results[best]:.4%} of routed generate")


def routing_cost(backbone_dir: str, label: str, repeats: int, layers: list[int], new_tokens: int = 32) -> None:
    root = tempfile.mkdtemp()
    train, test = dev_prompts(8, 40, 1)
    adapters = random_adapters(backbone_dir, list(train), root)
    model = AriadneRoutedModel.from_adapters(backbone_dir, adapters, train, progress=False)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer([p[:300] for items in test.values() for p in items], return_tensors="pt", padding=True)
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
           "pad_token_id": tokenizer.pad_token_id}
    print(f"\n== routing cost, {label}: batch of {batch['input_ids'].shape[0]}, prompt length "
          f"{batch['input_ids'].shape[1]} (padded), {torch.get_num_threads()} threads, fp32")
    print("| routing_layer | route() ms | prefill (routed, forced) ms | route / prefill | 32-token generate ms "
          "| route / generate |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for layer in layers:
            model.config.routing_layer = layer
            route = lambda: model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # noqa: E731
            names = route().adapter_names
            route_s = timed(route, repeats=max(5, repeats))
            prefill_s = timed(lambda names=names: model(**batch, adapter_names=names), repeats=max(5, repeats))
            generate_s = timed(lambda: model.generate(**batch, **gen), repeats)
            print(f"| {layer} | {route_s * 1e3:.1f} | {prefill_s * 1e3:.1f} | {route_s / prefill_s:.1%} | "
                  f"{generate_s * 1e3:.0f} | {route_s / generate_s:.2%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--routing-layers", nargs="*", type=int, default=[0, 1, 2, 4, 8])
    parser.add_argument("--cost-only", action="store_true", help="only the routing-cost table")
    args = parser.parse_args()
    for name in args.models:
        if name == "tiny":
            directory, label = tiny_backbone_dir(tempfile.mkdtemp()), "tiny random Llama (2 layers, D=64)"
            layers = [k for k in args.routing_layers if k < 2]
        else:
            from ariadne_hf.default_backbone import default_backbone_path

            directory, label, layers = default_backbone_path(), "SmolLM2-135M-Instruct", args.routing_layers
        if not args.cost_only:
            bench(directory, label, args.repeats)
        if layers:
            routing_cost(directory, label, args.repeats, layers)


if __name__ == "__main__":
    main()
