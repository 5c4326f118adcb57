"""The study half of benchmarks/routing_signal.py: selection and out-of-distribution figures per routing layer on
leave-whole-tasks-out splits, from the cached features (see that file for the protocol).

Every router is the library's: `build_router_tables` (defaults: 1 centroid, center, whitening "within", cosine),
`calibrate_ood` (cross-fitted on the in-tasks' TRAIN prompts, reject_rate 0.02) and `ood_components` / `combine`.
Candidate scores (all "higher = more foreign", computed in the whitened scoring space x = W (p - center)):

    shipped     mean z-score of the 4 shipped components (neg best cosine, neg margin, unseen share, neg unigram llr)
    maha        relative Mahalanobis: min_a |x - mu_a|^2 - |x - mu_all|^2 (W whitens the within-adapter covariance,
                so |.|^2 in x is the Mahalanobis distance with the shared within covariance; mu_all = global mean)
    knn         1 - cosine similarity to the k-th nearest building prompt (k = 5) of the routed adapter, on the unit
                normalised x
    shipped+maha, shipped+knn, shipped+maha+knn   mean z-score of the components together (z-stats cross-fitted)

Thresholds: each score's (1 - rate) quantile of its cross-fitted held-out in-domain TRAIN scores (never test
prompts, never out-tasks). Reported: in-domain false-reject rate on in TEST, out-task rejection on out TEST, AUROC.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ariadne_hf.kernels.pool_distance_torch import centroid_scores_ref, to_scoring_space
from ariadne_hf.routing.calibration import auroc, fold_assignment
from ariadne_hf.routing.centroids import build_router_tables
from ariadne_hf.routing.ood import ood_components, token_counts, token_tables

BUILD = dict(num_centroids=1, distance="cosine", center=True, whitening="within")
KNN = 5
RATE = 0.02


def _pad(token_ids):
    width = max(1, max(len(x) for x in token_ids))
    ids = torch.zeros(len(token_ids), width, dtype=torch.int64)
    w = torch.zeros(len(token_ids), width)
    for i, x in enumerate(token_ids):
        ids[i, :len(x)] = torch.tensor(x)
        w[i, :len(x)] = 1.0
    return ids, w


class Fitted:
    """Everything scored from one set of building prompts (per adapter features + token ids)."""

    def __init__(self, feats, ids, vocab):
        self.tables = build_router_tables(feats, seed=0, **BUILD)
        self.num = len(feats)
        seen, llr = token_tables(torch.stack([token_counts(x, vocab) for x in ids]))
        self.seen, self.llr = seen, llr
        space = [to_scoring_space(f, self.tables.center, self.tables.transform) for f in feats]
        self.means = torch.stack([s.mean(0) for s in space])  # [A, D]
        self.global_mean = torch.cat(space).mean(0)  # [D]
        self.unit = [F.normalize(s, dim=-1) for s in space]

    def components(self, feats, ids):
        """[N, 6]: the 4 shipped components, maha, knn; and the routed adapter [N]."""
        scores, best = centroid_scores_ref(feats, torch.ones(feats.shape[0]), self.tables.centroids,
                                           self.tables.centroid_adapter, self.num, center=self.tables.center,
                                           transform=self.tables.transform, distance="cosine")
        tok, w = _pad(ids)
        shipped = ood_components(tok, w, scores, self.seen, self.llr)  # [N, 4]
        x = to_scoring_space(feats, self.tables.center, self.tables.transform)
        d = torch.cdist(x, self.means).pow(2)  # [N, A]
        maha = d.min(1).values - (x - self.global_mean).pow(2).sum(1)
        xu = F.normalize(x, dim=-1)
        knn = torch.empty(x.shape[0])
        for a in range(self.num):
            rows = best == a
            if rows.any():
                sims = xu[rows] @ self.unit[a].T  # [n, N_a]
                k = min(KNN, sims.shape[1])
                knn[rows] = 1 - sims.topk(k, dim=1).values[:, -1]
        return torch.cat([shipped, maha[:, None], knn[:, None]], 1), best


COMBOS = {"shipped": [0, 1, 2, 3], "maha": [4], "knn": [5], "shipped+maha": [0, 1, 2, 3, 4],
          "shipped+knn": [0, 1, 2, 3, 5], "shipped+maha+knn": [0, 1, 2, 3, 4, 5], "maha+knn": [4, 5],
          "knn+unseen+llr": [2, 3, 5]}


def one_split(feats, ids, vocab, in_tasks, out_tasks, layer, folds=5):
    train_f = [feats[t]["train"][layer] for t in in_tasks]
    train_i = [ids[t]["train"] for t in in_tasks]
    fitted = Fitted(train_f, train_i, vocab)
    # selection on in TEST
    comp_in, best = fitted.components(torch.cat([feats[t]["test"][layer] for t in in_tasks]),
                                      [x for t in in_tasks for x in ids[t]["test"]])
    labels = torch.cat([torch.full((feats[t]["test"][layer].shape[0],), a) for a, t in enumerate(in_tasks)])
    macro = sum(float((best[labels == a] == a).float().mean()) for a in range(len(in_tasks))) / len(in_tasks)
    comp_out, _ = fitted.components(torch.cat([feats[t]["test"][layer] for t in out_tasks]),
                                    [x for t in out_tasks for x in ids[t]["test"]])
    # cross-fitted held-out in-domain components (library's fold assignment)
    assignment = fold_assignment([f.shape[0] for f in train_f], folds, 0)
    held = []
    for fold in range(folds):
        tr = [[i for i, g in enumerate(fa) if g != fold] for fa in assignment]
        ho = [[i for i, g in enumerate(fa) if g == fold] for fa in assignment]
        fit = Fitted([f[i] for f, i in zip(train_f, tr, strict=True)],
                     [[x[j] for j in i] for x, i in zip(train_i, tr, strict=True)], vocab)
        held.append(fit.components(torch.cat([f[i] for f, i in zip(train_f, ho, strict=True)]),
                                   [x[j] for x, i in zip(train_i, ho, strict=True) for j in i])[0])
    held = torch.cat(held)
    mu, sd = held.mean(0), held.std(0).clamp_min(1e-6)
    out = {"macro": macro}
    for name, cols in COMBOS.items():
        z = lambda c, cols=cols: ((c[:, cols] - mu[cols]) / sd[cols]).mean(1)  # noqa: E731
        h, i, o = z(held), z(comp_in), z(comp_out)
        thr = float(torch.quantile(h.double(), 1 - RATE))
        kept = (i <= thr) & (best == labels)  # correct and not rejected
        macro_rej = sum(float(kept[labels == a].float().mean()) for a in range(len(in_tasks))) / len(in_tasks)
        out[name] = {"auroc": auroc(i, o), "false": float((i > thr).float().mean()),
                     "reject": float((o > thr).float().mean()), "macro_reject_on": macro_rej}
    return out


def study(tasks, data, splits: int = 20, first: int = 0, last: int | None = None, out_dir=None) -> None:
    """Run splits [first, last) (each cached as JSON in `out_dir`), then print the tables over every cached split
    below `splits`."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    feats = {t: {s: data[t][s]["features"] for s in ("train", "test")} for t in tasks}
    ids = {t: {s: data[t][s]["ids"] for s in ("train", "test")} for t in tasks}
    vocab = 49152
    layers = sorted(next(iter(feats.values()))["train"])
    rng = random.Random(0)
    orders = []
    for _ in range(splits):
        order = list(tasks)
        rng.shuffle(order)
        orders.append(order)
    for index in range(first, splits if last is None else min(last, splits)):
        path = out_dir / f"split{index}.json"
        if path.exists():
            continue
        order, half = orders[index], len(tasks) // 2
        result = {str(k): one_split(feats, ids, vocab, order[:half], order[half:], k) for k in layers}
        path.write_text(json.dumps(result))
        print("split", index, "done", flush=True)
    results = {k: [] for k in layers}
    for index in range(splits):
        path = out_dir / f"split{index}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            for k in layers:
                results[k].append(cached[str(k)])
    count = len(results[layers[0]])
    print(f"{len(tasks)} tasks, {count} leave-half-the-tasks-out splits (12 in, 12 unseen); mean over splits "
          "(selection: min in brackets)\n")
    print("| layer | selection macro | " + " | ".join(f"{c}: AUROC / unseen rej. / false rej." for c in COMBOS) + " |")
    print("|---|---|" + "---|" * len(COMBOS))
    for k in layers:
        rows = results[k]
        if not rows:
            continue
        mean = lambda f, rows=rows: sum(f(r) for r in rows) / len(rows)  # noqa: E731
        cells = [f"{100 * mean(lambda r: r['macro']):.1f}% ({100 * min(r['macro'] for r in rows):.1f})"]
        for c in COMBOS:
            cells.append(f"{mean(lambda r, c=c: r[c]['auroc']):.3f} / {100 * mean(lambda r, c=c: r[c]['reject']):.0f}% / "
                         f"{100 * mean(lambda r, c=c: r[c]['false']):.1f}%")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("\nSelection with rejection on (rejected in-domain prompts count as errors), macro, mean over splits:\n")
    print("| layer | off | " + " | ".join(COMBOS) + " |")
    print("|---|---|" + "---|" * len(COMBOS))
    for k in layers:
        rows = results[k]
        if rows and "macro_reject_on" in rows[0]["shipped"]:
            mean = lambda f, rows=rows: sum(f(r) for r in rows) / len(rows)  # noqa: E731
            print(f"| {k} | {100 * mean(lambda r: r['macro']):.1f}% | " + " | ".join(
                f"{100 * mean(lambda r, c=c: r[c]['macro_reject_on']):.1f}%" for c in COMBOS) + " |")
