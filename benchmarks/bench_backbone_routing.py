"""Routing cost and bundle size per backbone, SmolLM2-135M (49k vocabulary) and Gemma 3 270M (262k) side by side.

For each backbone: 8 random LoRA adapters (rank 8, q/k/v/o), a router built from the routing-dev prompts
(4 centroids per adapter), then `model.route(input_ids=..., attention_mask=...)` on a left-padded batch of 64
routing-dev prompts (best of `--repeats` after a warm-up): ms per call and per prompt. Then the saved bundle's
bytes split into adapter files and everything else (router, token tables, config). Gemma 3: the Gemma Terms of Use
apply to its weights.

    python benchmarks/bench_backbone_routing.py [--models smollm2 gemma3] [--batch 64] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from common import dev_prompts, random_adapters

from ariadne_hf import AriadneRoutedModel


def backbone_dir(name: str) -> str:
    if name == "gemma3":
        from ariadne_hf.gemma3_backbone import gemma3_backbone_path

        return gemma3_backbone_path()
    from ariadne_hf.default_backbone import default_backbone_path

    return default_backbone_path()


def folder_bytes(folder: str) -> tuple[int, int]:
    """(bytes of adapter_model.safetensors files, bytes of every other file) under `folder`."""
    adapters = other = 0
    for root, _, files in os.walk(folder):
        for file in files:
            size = os.path.getsize(os.path.join(root, file))
            if file == "adapter_model.safetensors":
                adapters += size
            else:
                other += size
    return adapters, other


@torch.no_grad()
def measure(name: str, batch_size: int, repeats: int) -> None:
    root = tempfile.mkdtemp()
    path = backbone_dir(name)
    train, test = dev_prompts(8, 40, 8)
    adapters = random_adapters(path, list(train), root, uniform=True)
    model = AriadneRoutedModel.from_adapters(path, adapters, train, num_centroids=4, progress=False)
    prompts = [p for items in test.values() for p in items]
    prompts = (prompts * (batch_size // len(prompts) + 1))[:batch_size]
    tokenizer = model.tokenizer
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", truncation=True,
                      max_length=256)
    model.route(**batch)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.route(**batch)
        best = min(best, time.perf_counter() - start)
    bundle = os.path.join(root, "bundle")
    model.save_pretrained(bundle)  # the backbone is referenced, not stored (include_backbone=False)
    adapter_bytes, other_bytes = folder_bytes(bundle)
    vocab = model.backbone.get_input_embeddings().weight.shape[0]
    print(f"{name}: vocab {vocab}, batch {batch_size} x {batch['input_ids'].shape[1]} tokens: route "
          f"{best * 1e3:.2f} ms per call, {best * 1e3 / batch_size:.3f} ms per prompt; bundle: adapters "
          f"{adapter_bytes / 1e6:.2f} MB, the rest (router, token tables, tokenizer, config) "
          f"{other_bytes / 1e6:.2f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["smollm2", "gemma3"], default=["smollm2", "gemma3"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    for name in args.models:
        measure(name, args.batch, args.repeats)


if __name__ == "__main__":
    main()
