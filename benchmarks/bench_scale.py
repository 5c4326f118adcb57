"""How a routed bundle scales with its adapter count, measured side by side in one run (ratios to 10 adapters).

For A in --counts (default 10 100 1000): A rank-4 LoRA adapters on q_proj/v_proj of SmolLM2-135M-Instruct (or the tiny
random Llama), written as PEFT folders, with 20 prompts each. Each count runs in its own process (so peak memory is
its own) and reports: from_adapters (build), save_pretrained, from_pretrained (load), route() per prompt (batch 64,
after tokenisation), batch-1 decode ms per token (prefill excluded), add_adapter (the first add after a load, which
reserves headroom, and the median of the next four), the routed layers' adapter bytes and the process's peak
resident memory. With --resident N the largest count runs again loaded with max_resident_adapters=N (decode on a
resident adapter, plus the first call of a non-resident one: `cold_call_ms`, a 1-token generate that must load it,
vs `warm_call_ms`). Routing alone is also measured at 10,000 adapters (1 centroid each, whitened), batch 64 and 1.

    python benchmarks/bench_scale.py [--model smollm2|tiny] [--counts 10 100 1000] [--routing-adapters 10000]
                                     [--resident 64] [--ood]
Without --ood the bundles are built with ood=False (routing reads only the centroid table); --ood adds the
out-of-distribution token tables, dense [A, V], to every count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PROMPTS_PER_ADAPTER = 20


def write_adapters(backbone_dir: str, root: str, count: int, rank: int = 4) -> dict[str, str]:
    """`count` PEFT LoRA folders (q_proj/v_proj, random weights), written directly in PEFT's file layout."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(backbone_dir)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for index in range(count):
        tensors = {}
        for layer in range(layers):
            for module, out in (("q_proj", hidden), ("v_proj", kv)):
                stem = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.02
                tensors[f"{stem}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.02
        folder = os.path.join(root, f"a{index:05d}")
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]).save_pretrained(folder)
        folders[f"a{index:05d}"] = folder
    return folders


def prompt_sets(count: int) -> dict[str, list[str]]:
    """20 prompts per adapter, from the bundled routing-dev prompts, each set made distinct by a marker word."""
    from ariadne_hf.data import load_routing_dev

    texts = [row["text"][:300] for row in load_routing_dev("train")]
    return {f"a{i:05d}": [f"{texts[(i * 7 + j) % len(texts)]} topic{i}" for j in range(PROMPTS_PER_ADAPTER)]
            for i in range(count)}


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(backbone_dir: str, count: int, resident: int | None = None, ood: bool = False) -> dict:
    from ariadne_hf import AriadneRoutedModel

    root = tempfile.mkdtemp()
    adapters = write_adapters(backbone_dir, os.path.join(root, "adapters"), count + 5)
    extra = {name: adapters.pop(name) for name in list(adapters)[count:]}
    prompts = prompt_sets(count + 5)
    result = {"adapters": count if resident is None else f"{count} ({resident} res.)"}
    start = time.perf_counter()
    model = AriadneRoutedModel.from_adapters(backbone_dir, adapters, {n: prompts[n] for n in adapters},
                                             ood=ood, progress=False)
    result["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(os.path.join(root, "bundle"))
    result["save_s"] = time.perf_counter() - start
    del model
    start = time.perf_counter()
    model = AriadneRoutedModel.from_pretrained(os.path.join(root, "bundle"), max_resident_adapters=resident)
    result["load_s"] = time.perf_counter() - start
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer([prompts[f"a{i % count:05d}"][i % 20] for i in range(64)], return_tensors="pt", padding=True)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        times.append(time.perf_counter() - start)
    result["route_ms_per_prompt"] = 1000 * min(times) / 64
    one = tokenizer([prompts["a00000"][0]], return_tensors="pt")
    gen = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}

    def generate(n: int) -> float:
        start = time.perf_counter()
        model.generate(**one, max_new_tokens=n, min_new_tokens=n, **gen)
        return time.perf_counter() - start

    generate(2)
    long, short = min(generate(17) for _ in range(3)), min(generate(1) for _ in range(3))
    result["decode_ms_per_token"] = 1000 * (long - short) / 16
    cold = tokenizer([prompts[f"a{count - 1:05d}"][0]], return_tensors="pt")
    start = time.perf_counter()
    model.generate(**cold, adapter_names=[f"a{count - 1:05d}"], max_new_tokens=1, **gen)
    result["cold_call_ms"] = 1000 * (time.perf_counter() - start)
    start = time.perf_counter()
    model.generate(**cold, adapter_names=[f"a{count - 1:05d}"], max_new_tokens=1, **gen)
    result["warm_call_ms"] = 1000 * (time.perf_counter() - start)
    adds = []
    for name, folder in extra.items():
        start = time.perf_counter()
        model.add_adapter(name, folder, prompts[name], progress=False)
        adds.append(time.perf_counter() - start)
    result["add_first_ms"], result["add_next_median_ms"] = 1000 * adds[0], 1000 * statistics.median(adds[1:])
    result["adapter_mb"] = model.lora.memory_bytes() / 1e6
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def routing_only(dim: int, vocab: int, adapters: int) -> dict:
    """route cost with `adapters` adapters of 1 centroid (whitened, centred), batch 64 and batch 1."""
    from ariadne_hf.kernels import embed_pool_distance

    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(vocab, dim, generator=generator)
    centroids = torch.nn.functional.normalize(torch.randn(adapters, dim, generator=generator), dim=-1)
    owner = torch.arange(adapters)
    center, transform = torch.randn(dim, generator=generator) * 0.01, torch.eye(dim)
    out = {}
    for rows in (64, 1):
        ids = torch.randint(0, vocab, (rows, 96), generator=generator)
        mask = torch.ones_like(ids)
        call = lambda ids=ids, mask=mask: embed_pool_distance(  # noqa: E731
            ids, mask, embed, centroids, owner, adapters, center=center, transform=transform)
        call()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[f"batch{rows}_ms_per_prompt"] = 1000 * min(times) / rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--routing-adapters", type=int, default=10_000)
    parser.add_argument("--resident", type=int, help="also run the largest count with max_resident_adapters=N")
    parser.add_argument("--ood", action="store_true", help="build with the out-of-distribution tables ([A, V])")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one count, print JSON
    parser.add_argument("--backbone-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.backbone_dir, args.one, args.resident, args.ood)))
        return
    if args.model == "tiny":
        from common import tiny_backbone_dir

        backbone_dir = tiny_backbone_dir(tempfile.mkdtemp())
    else:
        from ariadne_hf.default_backbone import default_backbone_path

        backbone_dir = default_backbone_path()
    rows = []
    runs = [(count, None) for count in args.counts] + ([(args.counts[-1], args.resident)] if args.resident else [])
    for count, resident in runs:
        command = [sys.executable, __file__, "--one", str(count), "--backbone-dir", backbone_dir] + (
            ["--ood"] if args.ood else [])
        completed = subprocess.run(command + (["--resident", str(resident)] if resident else []),
                                   capture_output=True, text=True, check=True)
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    keys = ["build_s", "save_s", "load_s", "route_ms_per_prompt", "decode_ms_per_token", "cold_call_ms",
            "warm_call_ms", "add_first_ms", "add_next_median_ms", "adapter_mb", "peak_rss_mb"]
    print(f"{args.model}: rank-4 q/v adapters, {PROMPTS_PER_ADAPTER} prompts each, {torch.get_num_threads()} threads, "
          f"ood tables {'on' if args.ood else 'off'}; value (ratio to the first count)")
    print(f"{'':<22}" + "".join(f"{r['adapters']:>20}" for r in rows))
    for key in keys:
        cells = "".join(f"{r[key]:>11.3f} (x{r[key] / rows[0][key]:5.2f})" for r in rows)
        print(f"{key:<22}{cells}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(backbone_dir)
    routing = routing_only(config.hidden_size, config.vocab_size, args.routing_adapters)
    print(f"routing alone at {args.routing_adapters} adapters (D={config.hidden_size}, 96 tokens): "
          + ", ".join(f"{k} {v:.4f}" for k, v in routing.items()))


if __name__ == "__main__":
    main()
