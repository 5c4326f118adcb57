"""Shared benchmark helpers: timing, random LoRA adapters on a backbone, prompts from the bundled dev data."""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def tiny_backbone_dir(root: str) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny_models import save_backbone

    return save_backbone(os.path.join(root, "tiny-backbone"))


def random_adapters(backbone_dir: str, names: list[str], root: str, rank: int = 8,
                    uniform: bool = False) -> dict[str, str]:
    """LoRA adapters with random (non-zero) weights, saved as PEFT folders; returns name -> folder.

    Targets alternate between q/k/v/o and q/v, unless `uniform` (all q/k/v/o: what PEFT's
    add_weighted_adapter(..., "linear") requires)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for index, name in enumerate(names):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(backbone_dir)
        targets = ["q_proj", "v_proj"] if index % 2 and not uniform else ["q_proj", "k_proj", "v_proj", "o_proj"]
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                init_lora_weights=False))
        folders[name] = os.path.join(root, "adapters", name)
        model.save_pretrained(folders[name])
    return folders


def dev_prompts(tasks: int, per_task_train: int, per_task_test: int) -> tuple[dict, dict]:
    """Train/test prompts of the first `tasks` tasks of the bundled routing-dev data."""
    from ariadne_hf.data import load_routing_dev

    train, test = {}, {}
    for row in load_routing_dev("train"):
        train.setdefault(row["task"], []).append(row["text"])
    for row in load_routing_dev("test"):
        test.setdefault(row["task"], []).append(row["text"])
    names = sorted(train)[:tasks]
    short = {n: n.split(".")[-1][:24].replace(".", "_") for n in names}
    return ({short[n]: train[n][:per_task_train] for n in names},
            {short[n]: test[n][:per_task_test] for n in names})
