"""Weighted multi-LoRA delta benchmark: prints ratios measured in ONE run.

    python benchmarks/bench_mixture_lora.py            # fp32 and bf16 weights
    python benchmarks/bench_mixture_lora.py --repeats 20

One LoRA-targeted linear layer, IN = OUT = 2048, rank 16, A = 8 stacked adapters, per-row top-k mixtures:
decode (G = 1, 8, 64 rows of one token) and prefill (G = 8 rows of 256 tokens), k in {1, 2, 4}. Per case it
prints the LoRA delta of the path production runs, a `RoutedLoraLinear` reading a `LoraGate`
(``lora/layer.py``; the torch strategy the gate chose is named: gather, gathered once and kept by a decode gate
for its lifetime as in decoding, or dense), against the naive per-adapter loop a mixing layer would otherwise run
(every adapter applied to all rows, then weighted), as naive/ours; on a CUDA machine also the same layer on the
fused Triton kernel (torch/triton). Both include the base layer's matmul (``base(x) + delta``). Times are minima
over ``--repeats`` runs after a warm-up; default thread count.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from ariadne_hf.lora.gate import GateFactory
from ariadne_hf.lora.layer import RoutedLoraLinear
from ariadne_hf.lora.plans import FixedGatePlan, use_plan


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def naive_mixture(x, lora_a, lora_b, scaling, topk_indices, topk_weights):
    """Loop over every adapter: its delta on all rows (fp32), weighted by that adapter's per-row weight."""
    x32 = x.float()  # [N, IN]
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32, device=x.device)  # [N, OUT]
    for a in range(lora_a.shape[0]):
        w = (topk_weights * (topk_indices == a)).sum(dim=1) * scaling[a]  # [N]
        out += w.unsqueeze(-1) * ((x32 @ lora_a[a].float().T) @ lora_b[a].float().T)
    return out.to(x.dtype)


def make_case(groups, tokens, k, adapters, rank, features, dtype, device, seed=0):
    """x [G, T, IN], stacks A [A, R, IN] / B [A, OUT, R], scaling [A], per-row idx [G, k] and weights [G, k]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, tokens, features, generator=g).to(dtype)  # [G, T, IN]
    lora_a = (torch.randn(adapters, rank, features, generator=g) / features ** 0.5).to(dtype)  # [A, R, IN]
    lora_b = torch.randn(adapters, features, rank, generator=g).to(dtype)  # [A, OUT, R]
    scaling = torch.rand(adapters, generator=g) + 0.5  # [A]
    idx = torch.stack([torch.randperm(adapters, generator=g)[:k] for _ in range(groups)])  # [G, k]
    weights = torch.softmax(torch.randn(groups, k, generator=g), dim=-1)  # [G, k]
    return [t.to(device) for t in (x, lora_a, lora_b, scaling, idx, weights)]


def routed_layer(base: nn.Linear, lora_a, lora_b, scaling) -> RoutedLoraLinear:
    layer = RoutedLoraLinear(base, "bench")
    layer.lora_A, layer.lora_B, layer.scaling = lora_a, lora_b, scaling
    layer.ranks, layer.scalings = [lora_a.shape[1]] * lora_a.shape[0], scaling.tolist()
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own default; 1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    has_triton = device.type == "cuda"
    adapters, rank, features = 8, 16, 2048
    print(f"device={device} threads={torch.get_num_threads()} loadavg={os.getloadavg()[0]:.2f} "
          f"IN=OUT={features} R={rank} A={adapters} repeats={args.repeats}")
    header = (f"{'dtype':9} {'G':>3} {'T':>4} {'k':>2} {'strategy':>8} {'naive ms':>9} {'ours ms':>9} "
              f"{'naive/ours':>10}")
    if has_triton:
        header += f" {'triton ms':>9} {'torch/triton':>12}"
    print(header)
    for dtype in (torch.float32, torch.bfloat16):
        base = nn.Linear(features, features, bias=False).to(device=device, dtype=dtype).eval()
        for groups, tokens in ((1, 1), (8, 1), (64, 1), (8, 256)):
            for k in (1, 2, 4):
                x, lora_a, lora_b, scaling, idx, weights = make_case(groups, tokens, k, adapters, rank, features,
                                                                     dtype, device, seed=groups * 10 + k + tokens)
                layer = routed_layer(base, lora_a, lora_b, scaling)
                flat_idx, flat_w = idx.repeat_interleave(tokens, 0), weights.repeat_interleave(tokens, 0)  # [N, k]

                def naive(x=x, base=base, c=(lora_a, lora_b, scaling, flat_idx, flat_w)):
                    flat = x.reshape(-1, features)  # [N, IN]
                    return base(flat) + naive_mixture(flat, *c)

                def ours(plan, layer=layer, x=x):
                    with use_plan(plan):
                        return layer(x)

                with torch.no_grad():
                    torch_plan = FixedGatePlan(GateFactory([scaling], "torch").mixture(idx, weights, tokens=tokens))
                    strategy = torch_plan.gate.strategy + ("*" if torch_plan.gate.cache_gathered else "")
                    ours_s = best_time(lambda p=torch_plan: ours(p), device, args.repeats)
                    naive_s = best_time(naive, device, args.repeats)
                    err = (ours(torch_plan).reshape(-1, features).float() - naive().float()).abs().max()
                    line = (f"{str(dtype).split('.')[-1]:9} {groups:3d} {tokens:4d} {k:2d} {strategy:>8} "
                            f"{naive_s * 1e3:9.3f} {ours_s * 1e3:9.3f} {naive_s / ours_s:10.2f}")
                    if has_triton:
                        triton_plan = FixedGatePlan(GateFactory([scaling], "triton").mixture(idx, weights, tokens=tokens))
                        tri = best_time(lambda p=triton_plan: ours(p), device, args.repeats)
                        line += f" {tri * 1e3:9.3f} {ours_s / tri:12.2f}"
                if float(err) > (1e-2 if dtype == torch.float32 else 1.0):
                    line += f"  (max |ours - naive| = {float(err):.3g})"
                print(line, flush=True)
    print("strategy* = gathered once and kept by the gate (a decode gate lives for a re-routing interval)")


if __name__ == "__main__":
    main()
