"""Weighted multi-LoRA delta benchmark: prints ratios measured in ONE run.

    python benchmarks/bench_mixture_lora.py            # fp32 and bf16 weights
    python benchmarks/bench_mixture_lora.py --repeats 20

One LoRA-targeted linear layer, IN = OUT = 2048, rank 16, A = 8 stacked adapters, per-row top-k
mixtures: decode (N = 1, 8, 64 rows) and prefill (N = 2048 rows), k in {1, 2, 4}. Per case it prints our
torch path (``mixture_lora(..., backend="torch")``: the strategy chosen by the cost model, named in the
output) against the naive per-adapter loop a mixing layer would otherwise run (every adapter applied
to all N rows, then weighted), as naive/torch; on a CUDA machine also the fused Triton kernel
(torch/triton). Times are minima over ``--repeats`` runs after a warm-up; default thread count.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ariadne_hf.kernels import mixture_lora
from ariadne_hf.kernels.mixture_torch import pick_mixture_strategy


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


def make_case(n, k, adapters, rank, features, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g).to(dtype)  # [N, IN]
    lora_a = (torch.randn(adapters, rank, features, generator=g) / features ** 0.5).to(dtype)  # [A, R, IN]
    lora_b = torch.randn(adapters, features, rank, generator=g).to(dtype)  # [A, OUT, R]
    scaling = torch.rand(adapters, generator=g) + 0.5  # [A]
    idx = torch.stack([torch.randperm(adapters, generator=g)[:k] for _ in range(n)])  # [N, k]
    weights = torch.softmax(torch.randn(n, k, generator=g), dim=-1)  # [N, k]
    return [t.to(device) for t in (x, lora_a, lora_b, scaling, idx, weights)]


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
    header = f"{'dtype':9} {'N':>5} {'k':>2} {'strategy':>8} {'naive ms':>9} {'torch ms':>9} {'naive/torch':>11}"
    if has_triton:
        header += f" {'triton ms':>9} {'torch/triton':>12}"
    print(header)
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 8, 64, 2048):
            for k in (1, 2, 4):
                case = make_case(n, k, adapters, rank, features, dtype, device, seed=n * 10 + k)
                idx = case[4]
                strategy = "grouped" if k == 1 else pick_mixture_strategy(
                    n, k, adapters, int(torch.unique(idx).numel()), rank, features, features,
                    half_weights=dtype != torch.float32)
                ours = best_time(lambda c=case: mixture_lora(*c, backend="torch"), device, args.repeats)
                naive = best_time(lambda c=case: naive_mixture(*c), device, args.repeats)
                err = (mixture_lora(*case, backend="torch").float() - naive_mixture(*case).float()).abs().max()
                line = (f"{str(dtype).split('.')[-1]:9} {n:5d} {k:2d} {strategy:>8} {naive * 1e3:9.3f} "
                        f"{ours * 1e3:9.3f} {naive / ours:11.2f}")
                if has_triton:
                    tri = best_time(lambda c=case: mixture_lora(*c, backend="triton"), device, args.repeats)
                    line += f" {tri * 1e3:9.3f} {ours / tri:12.2f}"
                if float(err) > (1e-3 if dtype == torch.float32 else 0.1):
                    line += f"  (max |ours - naive| = {float(err):.3g})"
                print(line, flush=True)


if __name__ == "__main__":
    main()
