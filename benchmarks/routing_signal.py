"""Routing-signal study: input embedding (k = 0) vs the base hidden state after layer k, on leave-whole-tasks-out
splits of routing-dev (the 24 development tasks only; no other BIG-bench task is read).

Features are the library's own signal (`routing.signal`: routable tokens compacted, base weights, masked mean after
layer k), checked against `HiddenStateSignal` on the first batch, for k in LAYERS, extracted in one pass per batch
(hooks on every studied layer, the pass stops after the deepest). Prompts are cut to --max-tokens routable tokens
(default 96, as the issue's probe; the first --max-train=120 TRAIN prompts per task) to keep each extraction
chunk a few minutes on 2 shared CPU cores.

    python benchmarks/routing_signal.py extract --chunk 0 --chunks 4   # cache features (run every chunk)
    python benchmarks/routing_signal.py study --splits 20 --first 0 --last 5   # run (and cache) splits 0-4
    python benchmarks/routing_signal.py study --splits 20 --first 20           # tables over the cached splits

Split protocol (study): for each of --splits seeded random halvings of the 24 tasks, the "in" half are adapters
(router built from their TRAIN prompts with the library's `build_router_tables`, whitening "within", 1 centroid), the
"out" half are tasks the router never saw. Selection = macro accuracy on the in-tasks' TEST prompts. OOD scores are
calibrated by the library's cross-fitting on the in-tasks' TRAIN prompts only and evaluated on in TEST (false
rejects) vs out TEST prompts (rejects, AUROC).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

LAYERS = (0, 1, 2, 4, 8)
CACHE = Path(os.environ.get("ARIADNE_SIGNAL_CACHE", "/tmp/ariadne_routing_signal"))


def _prompts() -> dict[str, dict[str, list[str]]]:
    from ariadne_hf.data import load_routing_dev

    out: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        out[split] = {}
        for row in load_routing_dev(split):
            out[split].setdefault(row["task"], []).append(row["text"])
    return out


def _backbone():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ariadne_hf.default_backbone import default_backbone_path

    folder = default_backbone_path()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def extract(chunk: int, chunks: int, max_tokens: int, max_train: int = 120, batch_size: int = 32) -> None:
    from ariadne_hf.routing.inputs import special_token_weights
    from ariadne_hf.routing.ood import routing_weights
    from ariadne_hf.routing.signal import (
        _STOP_AT,
        HiddenStateSignal,
        _StopAfterLayer,
        compact,
        decoder_layers,
        decoder_of,
        install_stop_hook,
    )

    model, tokenizer = _backbone()
    model.eval()
    decoder = decoder_of(model)
    layers = decoder_layers(decoder)
    embed = model.get_input_embeddings().weight
    token_weights = special_token_weights(tokenizer, embed.shape[0])
    prompts = _prompts()
    tasks = sorted(prompts["train"])[chunk::chunks]
    captured: dict[int, torch.Tensor] = {}
    for k in LAYERS[1:]:
        layers[k - 1].register_forward_hook(lambda _m, _a, out, k=k: captured.__setitem__(
            k, out[0] if isinstance(out, tuple) else out))
    deepest = layers[max(LAYERS) - 1]
    install_stop_hook(deepest)
    checked = False
    CACHE.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        path = CACHE / f"{task}.pt"
        if path.exists():
            continue
        record = {}
        for split in ("train", "test"):
            texts = prompts[split][task][:max_train] if split == "train" else prompts[split][task]
            feats = {k: [] for k in LAYERS}
            ids_out = []
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt")
                w = routing_weights(batch["input_ids"], batch["attention_mask"], token_weights)  # [B, T]
                ids, mask, wc = compact(batch["input_ids"], w)
                ids, mask, wc = ids[:, :max_tokens], mask[:, :max_tokens], wc[:, :max_tokens]
                total = wc.sum(1).clamp_min(1e-12)  # [B]
                token = _STOP_AT.set(deepest)
                try:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopAfterLayer:
                    pass
                finally:
                    _STOP_AT.reset(token)
                captured[0] = embed[ids]
                for k in LAYERS:
                    feats[k].append((captured[k].float() * wc.unsqueeze(-1)).sum(1) / total.unsqueeze(-1))
                if not checked:  # the study's features are the library's signal
                    ref, _ = HiddenStateSignal(decoder, 2).pooled(ids, wc)
                    assert torch.allclose(ref, feats[2][-1], atol=1e-4), "study features differ from the library"
                    checked = True
                ids_out += [row[m.bool()].tolist() for row, m in zip(ids, wc > 0, strict=True)]
            record[split] = {"features": {k: torch.cat(v) for k, v in feats.items()}, "ids": ids_out}
        torch.save(record, path)
        print("cached", task, flush=True)


def load_cache() -> tuple[list[str], dict]:
    data = {}
    for path in sorted(CACHE.glob("*.pt")):
        data[path.stem] = torch.load(path, weights_only=True)
    return sorted(data), data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract")
    ex.add_argument("--chunk", type=int, default=0)
    ex.add_argument("--chunks", type=int, default=1)
    ex.add_argument("--max-tokens", type=int, default=96)
    ex.add_argument("--max-train", type=int, default=120)
    st = sub.add_parser("study")
    st.add_argument("--splits", type=int, default=20)
    st.add_argument("--first", type=int, default=0)
    st.add_argument("--last", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "extract":
        extract(args.chunk, args.chunks, args.max_tokens, args.max_train)
    else:
        from routing_signal_study import study

        study(*load_cache(), splits=args.splits, first=args.first, last=args.last, out_dir=CACHE / "splits")


if __name__ == "__main__":
    main()
