"""Routing kernel benchmark: prints ratios measured in ONE run (never compare figures across runs or machines).

    python benchmarks/bench_routing.py                 # fp32 table (bf16 too with --dtype both)
    python benchmarks/bench_routing.py --dtype bf16 --repeats 20

Setup: B=64 prompts, T=256 positions (right padding, lengths uniform in [T/2, T]), D in {576, 2048}
(vocab 49152 / 128256, the sizes of SmolLM2-135M and Llama-3.2-1B), A in {8, 64, 512} adapters with 16
centroids each (K = 16 A), cosine distance. Per configuration it prints:

* naive/torch: a naive baseline (embedding lookup to [B, T, D] fp32, masked mean, ``torch.cdist`` on
  normalised vectors, a Python loop of per-adapter minima) over our torch path;
* torch/mem-floor: our torch path over the memory floor = bytes it must touch (embedding rows of the
  masked-in tokens, ids and mask, centroids and map, outputs) / copy bandwidth measured here (a 256 MB
  tensor copy, read + write);
* torch/roofline: over max(memory floor, compute floor), the compute floor being the 2*B*K*D distance
  flops / fp32 matmul throughput measured here (on a 2-core CPU the B x D x K matmul is compute-bound
  for large K);
* white/plain: our torch path with a whitening matrix W [D, D] (the default router: x = W (pooled - center))
  over the same call without one, i.e. what whitening costs per routing call;
* on a CUDA machine also triton ms and torch/triton (the same script, unchanged; whitened for triton too).

Times are the minimum over ``--repeats`` runs after a warm-up (robust to other processes on a shared
machine); ``torch.set_num_threads`` is left at its default. The load average is printed for context.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ariadne_hf.kernels import embed_pool_distance

VOCAB = {576: 49152, 2048: 128256}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Minimum wall time of ``fn()`` in seconds over ``repeats`` runs, after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes per second of a 256 MB tensor copy (read + write counted)."""
    src = torch.randn(64 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds


def matmul_throughput(device: torch.device, repeats: int) -> float:
    """fp32 flop/s of a [64, 2048] x [2048, 8192] matmul (the shape of the distance step)."""
    x = torch.randn(64, 2048, device=device)
    c = torch.randn(8192, 2048, device=device)
    seconds = best_time(lambda: x @ c.T, device, repeats)
    return 2 * 64 * 2048 * 8192 / seconds


def naive_route(input_ids, attention_mask, embed_weight, centroids, centroid_adapter, num_adapters):
    """The baseline the fused path replaces: materialise [B, T, D] fp32, mean, cdist, loop over adapters."""
    emb = F.embedding(input_ids, embed_weight).float()  # [B, T, D]
    mask = attention_mask.unsqueeze(-1).float()  # [B, T, 1]
    pooled = (emb * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [B, D]
    dist = torch.cdist(F.normalize(pooled, dim=-1), F.normalize(centroids, dim=-1))  # [B, K]
    per_adapter = torch.stack(
        [dist[:, centroid_adapter == a].min(dim=1).values for a in range(num_adapters)], dim=1
    )  # [B, A]
    return per_adapter.argmin(dim=1)


def make_inputs(dim: int, num_adapters: int, dtype: torch.dtype, device: torch.device, table=None):
    g = torch.Generator().manual_seed(dim + num_adapters)
    batch, tokens, vocab = 64, 256, VOCAB[dim]
    if table is None:
        table = (torch.randn(vocab, dim, generator=g) * 0.02).to(dtype).to(device)
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()  # [B, T]
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)  # [B, T]
    num_centroids = 16 * num_adapters
    centroids = torch.randn(num_centroids, dim, generator=g) * 0.02  # [K, D]
    c2a = torch.arange(num_adapters).repeat_interleave(16)  # [K]
    return table, ids.to(device), mask.to(device), centroids.to(device), c2a.to(device)


def must_touch_bytes(mask, table, centroids, num_adapters) -> int:
    """Bytes any implementation must read or write once."""
    tokens = int(mask.sum())
    batch = mask.shape[0]
    return (tokens * table.shape[1] * table.element_size()  # embedding rows of masked-in tokens
            + 2 * mask.numel() * 8  # ids + mask (int64)
            + centroids.numel() * centroids.element_size() + centroids.shape[0] * 8  # centroids + map
            + batch * num_adapters * 4 + batch * 8)  # scores + best


def run(dtypes, repeats: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    has_triton = device.type == "cuda"
    bandwidth = copy_bandwidth(device, repeats)
    flops = matmul_throughput(device, repeats)
    print(f"device={device} threads={torch.get_num_threads()} loadavg={os.getloadavg()[0]:.2f} "
          f"copy-bandwidth={bandwidth / 1e9:.1f} GB/s fp32-matmul={flops / 1e9:.0f} GFLOP/s repeats={repeats}")
    header = f"{'dtype':6} {'D':>5} {'A':>4} {'K':>5} {'naive ms':>9} {'torch ms':>9} {'naive/torch':>11} " \
             f"{'torch/mem-floor':>15} {'torch/roofline':>14} {'white ms':>9} {'white/plain':>11}"
    if has_triton:
        header += f" {'triton ms':>9} {'torch/triton':>12} {'triton/mem-floor':>16}"  # triton runs whitened
    print(header)
    for dtype in dtypes:
        for dim in (576, 2048):
            table = None
            for num_adapters in (8, 64, 512):
                table, ids, mask, cents, c2a = make_inputs(dim, num_adapters, dtype, device, table)
                args = (ids, mask, table, cents, c2a, num_adapters)
                white = {"center": torch.zeros(dim, device=device),
                         "transform": torch.eye(dim, device=device) + 0.01 * torch.randn(dim, dim, device=device)}
                ours = best_time(lambda args=args: embed_pool_distance(*args, backend="torch"), device, repeats)
                whitened = best_time(lambda args=args, white=white: embed_pool_distance(*args, backend="torch", **white),
                                     device, repeats)
                naive = best_time(lambda args=args: naive_route(*args), device, repeats)
                _, best = embed_pool_distance(*args, backend="torch")
                agree = float((best == naive_route(*args)).float().mean())
                mem_floor = must_touch_bytes(mask, table, cents, num_adapters) / bandwidth
                roofline = max(mem_floor, 2 * ids.shape[0] * cents.shape[0] * dim / flops)
                line = (f"{str(dtype).split('.')[-1]:6} {dim:5d} {num_adapters:4d} {cents.shape[0]:5d} "
                        f"{naive * 1e3:9.2f} {ours * 1e3:9.2f} {naive / ours:11.2f} {ours / mem_floor:15.2f} "
                        f"{ours / roofline:14.2f} {whitened * 1e3:9.2f} {whitened / ours:11.2f}")
                if has_triton:
                    tri = best_time(lambda args=args, white=white: embed_pool_distance(*args, backend="triton", **white),
                                    device, repeats)
                    line += f" {tri * 1e3:9.3f} {whitened / tri:12.2f} {tri / mem_floor:16.2f}"  # both whitened
                if agree < 0.98:
                    line += f"  (routes agree with naive on {agree:.0%} only)"
                print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="fp32", help="embedding table dtype")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own default; 1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[args.dtype]
    run(dtypes, args.repeats)


if __name__ == "__main__":
    main()
