"""Serving benchmark on loopback: N concurrent clients over 8 adapters, dynamic batching vs one at a time.

    python benchmarks/bench_serve.py [--model smollm2|tiny] [--clients 16] [--requests 64] [--new-tokens 32]
                                     [--ray] [--vllm]

Modes, each a real `ariadne serve` app (uvicorn on 127.0.0.1) over the same loaded bundle, the same prompts (8
routing-dev tasks, one random rank-8 LoRA adapter each, `model: "auto"`), greedy, `max_tokens` new tokens:
  batched        --max-batch-size 16 --max-wait-ms 10 (or --max-wait-ms), N concurrent clients
  unbatched      --max-batch-size 1, N concurrent clients (queueing, no dynamic batching)
  one-at-a-time  --max-batch-size 1, one client, requests back to back
  ray (--ray)    Ray Serve, 2 generation replicas x 1 CPU, 4 warm adapters each, N clients; warm-hit rate
With --vllm, instead (see engine_comparison): in-process `ariadne serve`, vLLM direct (clients name the adapter),
gateway -> vLLM, and routing inside vLLM (the middleware), side by side, plus the routing time added per request.
Prints requests/s, generated tokens/s, p50/p99 latency, mean rows per generate call, lost requests (non-200 or
exceptions; must be 0), and whether greedy answers are identical across modes. Bounded: `--requests` per mode
(one-at-a-time runs `--requests // 4`), a per-request timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
from common import dev_prompts, random_adapters, tiny_backbone_dir  # noqa: E402


def build_bundle(model_name: str, root: str, prompt_chars: int):
    from ariadne_hf import AriadneRoutedModel

    if model_name == "smollm2":
        from ariadne_hf.default_backbone import default_backbone_path

        backbone = default_backbone_path()
    else:
        backbone = tiny_backbone_dir(root)
    train, test = dev_prompts(8, 40, 8)
    adapters = random_adapters(backbone, list(train), root)
    model = AriadneRoutedModel.from_adapters(backbone, adapters, train, num_centroids=4, progress=False)
    bundle = os.path.join(root, "bundle")
    model.save_pretrained(bundle)
    prompts = [text[:prompt_chars] for name in sorted(test) for text in test[name]]  # 8 tasks x 8 prompts
    return model, bundle, prompts


async def run_load(base_url: str, prompts: list[str], clients: int, requests: int, new_tokens: int,
                   timeout: float, model_of: dict[str, str] | None = None) -> dict:
    """`clients` workers send `requests` completions in total (`model: "auto"`, or `model_of[prompt]`: clients
    naming the adapter themselves); returns timings, answers, losses and the mean `x-ariadne-route-ms`."""
    order = [prompts[(i * 7) % len(prompts)] for i in range(requests)]  # interleave tasks
    latencies, answers, lost, warm, next_index, route_ms = [], {}, 0, [], 0, []
    tokens = 0

    async def worker(http: httpx.AsyncClient):
        nonlocal lost, next_index, tokens
        while next_index < len(order):
            prompt = order[next_index]
            next_index += 1
            model = model_of[prompt] if model_of else "auto"
            body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
            start = time.perf_counter()
            try:
                response = await http.post(base_url + "/v1/completions", json=body)
                if response.status_code != 200:
                    lost += 1
                    continue
                data = response.json()
            except Exception:
                lost += 1
                continue
            latencies.append(time.perf_counter() - start)
            answers[prompt] = data["choices"][0]["text"]
            tokens += data["usage"]["completion_tokens"]
            if "x-ariadne-route-ms" in response.headers:
                route_ms.append(float(response.headers["x-ariadne-route-ms"]))
            if "x-ariadne-warm" in response.headers:
                warm.append(response.headers["x-ariadne-warm"] == "1")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        for prompt in dict.fromkeys(order[:8]):  # warm-up: every adapter once (vLLM loads a LoRA on first use)
            model = model_of[prompt] if model_of else "auto"
            await http.post(base_url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"requests": requests, "answered": len(latencies), "lost": lost, "seconds": elapsed,
            "rps": len(latencies) / elapsed, "tokens_per_s": tokens / elapsed, "p50": statistics.median(latencies),
            "p99": pick(0.99), "answers": answers, "warm_rate": (sum(warm) / len(warm)) if warm else None,
            "mean_latency": statistics.fmean(latencies) if latencies else float("nan"),
            "route_ms": statistics.fmean(route_ms) if route_ms else None}


def local_mode(model, prompts, *, clients, requests, new_tokens, max_batch_size, timeout, max_wait_ms=10.0) -> dict:
    from ariadne_hf.serving.launch import build_local_app
    from ariadne_hf.serving.runner import ServerThread

    app = build_local_app("", model=model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    with ServerThread(app) as server:
        result = asyncio.run(run_load(server.url, prompts, clients, requests, new_tokens, timeout))
        stats = httpx.get(server.url + "/stats").json()
    result["rows_per_call"] = stats["rows"] / max(1, stats["batches"])
    return result


def ray_mode(bundle, prompts, *, clients, requests, new_tokens, timeout) -> dict:
    import ray
    from ray import serve

    from ariadne_hf.serving.ray_app import free_port, start_ray

    start = time.perf_counter()
    url = start_ray(bundle, port=free_port(), num_cpus=2, replicas=2, adapters_per_replica=4, max_batch_size=16,
                    max_wait_ms=10)
    print(f"  (ray started and deployed in {time.perf_counter() - start:.1f} s)")
    try:
        return asyncio.run(run_load(url, prompts, clients, requests, new_tokens, timeout))
    finally:
        serve.shutdown()
        ray.shutdown()


def engine_comparison(args) -> int:
    """`--vllm`: in-process `ariadne serve`, vLLM direct (clients name the adapter the in-process router picks),
    gateway -> vLLM and the routing middleware inside vLLM, on the same bundle (SmolLM2-135M-Instruct, 4 of the
    packaged demo adapters, tests/serving/vllm_bundle.py) and the same held-out prompts (chat-templated completions, so
    the adapters answer instead of stopping at once), one after the other, each server alone on the machine.

    vLLM is started once (`ariadne serve BUNDLE --engine vllm`, fp32, the cached CPU venv) and serves the three
    vLLM modes; the in-process server runs before it starts."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "serving"))
    from vllm_bundle import VllmServer, build_smol_bundle, heldout_prompts, prepare_vllm_python

    from ariadne_hf.serving.launch import build_gateway_app, build_local_app
    from ariadne_hf.serving.runner import ServerThread

    common = dict(clients=args.clients, requests=args.requests, new_tokens=args.new_tokens, timeout=args.timeout)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        python = prepare_vllm_python()
        bundle = os.path.join(root, "bundle")
        model = build_smol_bundle(bundle)
        texts = heldout_prompts(8)  # 4 tasks x 8
        prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                       add_generation_prompt=True) for t in texts]
        routes = dict(zip(prompts, model.route(prompts).adapter_names, strict=True))
        model_of = {p: "base" if a == "__base__" else a for p, a in routes.items()}
        with ServerThread(build_local_app(bundle, model=model, max_batch_size=16, max_wait_ms=10)) as local:
            results["in-process"] = asyncio.run(run_load(local.url, prompts, **common))
        del model
        engine = VllmServer(bundle, python, log_path=os.path.join(root, "vllm.log"))
        try:
            started = time.perf_counter()
            engine.wait()
            print(f"  (vLLM started in {time.perf_counter() - started:.0f} s)")
            results["vllm direct"] = asyncio.run(run_load(engine.url, prompts, model_of=model_of, **common))
            with ServerThread(build_gateway_app(bundle, engine.base_url)) as gateway:
                results["gateway->vllm"] = asyncio.run(run_load(gateway.url, prompts, **common))
            results["middleware"] = asyncio.run(run_load(engine.url, prompts, **common))
        finally:
            engine.stop()

    direct = results["vllm direct"]
    print(f"\n{'mode':<15}{'answered':>9}{'lost':>6}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}"
          f"{'vs vLLM direct':>16}{'routing ms/req':>16}")
    for name, r in results.items():
        if r["route_ms"] is not None:
            routing = f"{r['route_ms']:.2f}"  # measured inside vLLM by the middleware (x-ariadne-route-ms)
        elif name == "gateway->vllm":
            routing = f"{(r['mean_latency'] - direct['mean_latency']) * 1000:+.0f}*"  # routing + second hop
        else:
            routing = "-"
        print(f"{name:<15}{r['answered']:>5}/{r['requests']:<3}{r['lost']:>6}{r['rps']:>8.2f}{r['tokens_per_s']:>8.1f}"
              f"{r['p50']:>8.2f}{r['p99']:>8.2f}{r['tokens_per_s'] / direct['tokens_per_s']:>15.2f}x{routing:>16}")
    print("* gateway: mean latency minus vLLM direct's (routing + the extra HTTP hop, under load)")
    reference = results["in-process"]["answers"]
    for name, r in results.items():
        shared = [p for p in r["answers"] if p in reference]
        same = sum(r["answers"][p] == reference[p] for p in shared)
        print(f"greedy answers of {name} identical to in-process: {same}/{len(shared)}")
    lost = sum(r["lost"] for r in results.values())
    print(f"lost requests: {lost}")
    return 0 if lost == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=300, help="prompts cut to this many characters")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="batched mode's --max-wait-ms")
    parser.add_argument("--ray", action="store_true", help="also run Ray Serve mode (2 replicas)")
    parser.add_argument("--skip-unbatched", action="store_true")
    parser.add_argument("--vllm", action="store_true",
                        help="instead: in-process vs vLLM direct vs gateway->vLLM vs middleware-in-vLLM (4 adapters)")
    args = parser.parse_args()
    if args.vllm:
        return engine_comparison(args)

    import torch

    print(f"torch threads: {torch.get_num_threads()}; model {args.model}; {args.clients} clients; "
          f"{args.new_tokens} new tokens; 8 adapters")
    with tempfile.TemporaryDirectory() as root:
        model, bundle, prompts = build_bundle(args.model, root, args.prompt_chars)
        common = dict(new_tokens=args.new_tokens, timeout=args.timeout)
        results = {"batched": local_mode(model, prompts, clients=args.clients, requests=args.requests,
                                         max_batch_size=16, max_wait_ms=args.max_wait_ms, **common)}
        if not args.skip_unbatched:
            results["unbatched"] = local_mode(model, prompts, clients=args.clients, requests=args.requests // 2,
                                              max_batch_size=1, **common)
        results["one-at-a-time"] = local_mode(model, prompts, clients=1, requests=max(4, args.requests // 4),
                                              max_batch_size=1, **common)
        if args.ray:
            results["ray"] = ray_mode(bundle, prompts, clients=args.clients, requests=args.requests, **common)

    base = results["one-at-a-time"]["rps"]
    print(f"\n{'mode':<14}{'answered':>9}{'lost':>6}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}"
          f"{'rows/call':>10}{'vs 1-at-a-time':>16}{'warm hits':>10}")
    for name, r in results.items():
        rows = r.get("rows_per_call")
        warm = r.get("warm_rate")
        print(f"{name:<14}{r['answered']:>5}/{r['requests']:<3}{r['lost']:>6}{r['rps']:>8.2f}{r['tokens_per_s']:>8.1f}"
              f"{r['p50']:>8.2f}{r['p99']:>8.2f}{'' if rows is None else f'{rows:.1f}':>10}"
              f"{r['rps'] / base:>15.2f}x{'' if warm is None else f'{warm:.0%}':>10}")
    reference = results["one-at-a-time"]["answers"]
    for name, r in results.items():
        shared = [p for p in r["answers"] if p in reference]
        same = sum(r["answers"][p] == reference[p] for p in shared)
        print(f"greedy answers of {name} identical to one-at-a-time: {same}/{len(shared)}")
    lost = sum(r["lost"] for r in results.values())
    print(f"lost requests: {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
