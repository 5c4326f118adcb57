"""Routed generation vs the paths it replaces, measured side by side in one run (ratios, not absolute claims).

For a tiny random Llama and SmolLM2-135M-Instruct (the embedded default): 32 prompts over 8 adapters,
32 new tokens (greedy, min_new_tokens=32 so every path generates the same amount):
  - routed generate, batched (our routed LoRA layers, per-row adapters in one generate; routing included)
  - routed generate, grouped (one generate per adapter group)
  - PEFT's mixed batch with the same per-row adapters (adapter_names=..., what the routed layers replace)
  - the same batch on a single adapter (PEFT, set_adapter: the cost floor of any LoRA path)
  - a per-prompt loop, each prompt alone with its adapter
and route() time as a fraction of generate time.

    python benchmarks/bench_generate.py [--models tiny smollm2] [--repeats 3]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.models:
        if name == "tiny":
            bench(tiny_backbone_dir(tempfile.mkdtemp()), "tiny random Llama (2 layers, D=64)", args.repeats)
        else:
            from ariadne_hf.default_backbone import default_backbone_path

            bench(default_backbone_path(), "SmolLM2-135M-Instruct", args.repeats)


if __name__ == "__main__":
    main()
