"""Evaluation runs: records, row routing, task scores routed / oracle / base, the eval driver, the router-only
report (selection accuracy itself is `routing.report.routing_report`)."""

from __future__ import annotations

from ..constants import BASE_ADAPTER
from ..routing.report import routing_report


def read_records(path: str, *, text_field: str = "text", task_field: str | None = "task") -> list[dict]:
    """Rows of a .jsonl / .jsonl.gz file; each must have `text_field` and `task_field` (error names the line);
    `task_field=None` (out-of-distribution prompts) needs the text only."""
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number} is not JSON ({err}).") from err
            for field in (text_field, task_field):
                if field is not None and field not in row:
                    raise ValueError(f"{path}:{number} has no field {field!r} (use --text-field/--task-field).")
            rows.append({**row, "text": row[text_field], "task": row.get(task_field) if task_field else None})
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    return rows


def route_rows(model, rows: list[dict], *, batch_size: int = 32, as_chat: bool = True, with_ood: bool = False):
    """Route each row's text as `generate` would see it (chat-formatted when the tokenizer has a template).

    Returns (adapter names per row, margins per row as floats, scores [N, A]) and, with `with_ood`, the ood
    scores [N] (nan when the bundle has no ood tables) as a fourth item."""
    import torch

    from .task_metrics import left_pad, prompt_ids

    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    names, margins, scores, ood = [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if as_chat:
            ids, mask = left_pad([prompt_ids(tokenizer, r["text"]) for r in chunk], pad)
        else:
            batch = tokenizer([r["text"] for r in chunk], return_tensors="pt", padding=True, truncation=True,
                              max_length=model.config.max_prompt_tokens)
            ids, mask = batch["input_ids"], batch["attention_mask"]
        decision = model.route(input_ids=ids, attention_mask=mask)
        names += decision.adapter_names
        margins += decision.margins.tolist()
        scores.append(decision.scores)
        ood.append(decision.ood_scores if decision.ood_scores is not None else torch.full((len(chunk),), float("nan")))
    if with_ood:
        return names, margins, torch.cat(scores), torch.cat(ood)
    return names, margins, torch.cat(scores)


def _scorable_rows(rows: list[dict], routed: list[str], oracle: list[str], metric: str):
    """(rows, routed, oracle) restricted to the rows `metric` can score (multiple choice needs "choices"), in
    order; ValueError for an unknown metric or when no row is left."""
    from .task_metrics import METRICS

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    keep = [i for i, r in enumerate(rows) if metric == "exact_match" or "choices" in r]
    if not keep:
        raise ValueError(f"No row can be scored with {metric!r} (multiple choice needs 'choices' and 'answer').")
    return [rows[i] for i in keep], [routed[i] for i in keep], [oracle[i] for i in keep]


def _hits_under(model, metric: str, names: list[str], rows: list[dict], *, fast: bool) -> list[bool]:
    """One bool per row: is row i answered correctly under adapter names[i] (`metric`)."""
    from .task_metrics import choice_hits, exact_match

    if not rows:
        return []
    if metric == "exact_match":
        return exact_match(model, model.tokenizer, rows, names)[0]
    return choice_hits(model, model.tokenizer, rows, names, fast=fast)


def _column_hits(model, rows: list[dict], routed: list[str], oracle: list[str], metric: str, *, progress: bool,
                 routing: str, reroute_every: int | None, top_k: int | None, fast: bool) -> dict[str, list[bool]]:
    """{"routed", "oracle", "base": one bool per row}; sequence routing scores only the rows whose routed adapter
    differs from the oracle again (the others reuse the oracle's hit), token routing mixes (`token_routed_hits`)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=3, desc=f"scoring {len(rows)} rows ({metric})", disable=not progress)
    oracle_hits = _hits_under(model, metric, oracle, rows, fast=fast)
    bar.update()
    if routing == "token":
        from .token_eval import token_routed_hits

        routed_hits = token_routed_hits(model, rows, metric, reroute_every=reroute_every, top_k=top_k)
    else:
        differ = [i for i in range(len(rows)) if routed[i] != oracle[i]]
        routed_hits = list(oracle_hits)
        rescored = _hits_under(model, metric, [routed[i] for i in differ], [rows[i] for i in differ], fast=fast)
        for i, hit in zip(differ, rescored, strict=True):
            routed_hits[i] = hit
    bar.update()
    base_hits = _hits_under(model, metric, [BASE_ADAPTER] * len(rows), rows, fast=fast)
    bar.update()
    bar.close()
    return {"routed": routed_hits, "oracle": oracle_hits, "base": base_hits}


def _mean(values) -> float:
    return sum(values) / len(values) if values else 0.0


def task_scores(model, rows: list[dict], routed: list[str], oracle: list[str], metric: str,
                *, progress: bool = True, routing: str = "sequence", reroute_every: int | None = None,
                top_k: int | None = None, fast: bool = True, return_hits: bool = False) -> dict:
    """Task score with routed adapters vs the oracle adapter per prompt vs the base model.

    `metric` "exact_match" (greedy generation) or "multiple_choice" (log-likelihood of each choice; rows without
    choices are skipped; `fast` shares each prompt's KV cache across its choices). Rows routed to their oracle
    adapter are scored once and reused for both columns. With `routing="token"` the "routed" column mixes
    adapters: exact match generates with `generate(routing="token", reroute_every=, routing_top_k=)`; multiple
    choice scores every choice under the top-k softmax mixture of the prompt's route scores (the gate token routing
    starts from; choices are too short to re-route inside them).
    Returns {"metric", "routing", "rows", "routed", "oracle", "base", "recovery" (routed / oracle), "per_task"},
    and with `return_hits` "hits" {"routed", "oracle", "base": one bool per scored row}.
    """
    rows, routed, oracle = _scorable_rows(rows, routed, oracle, metric)
    hits = _column_hits(model, rows, routed, oracle, metric, progress=progress, routing=routing,
                        reroute_every=reroute_every, top_k=top_k, fast=fast)
    per_task = {}
    for task in sorted({r["task"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        per_task[task] = {k: _mean([hits[k][i] for i in idx]) for k in ("routed", "oracle", "base")}
    result = {"metric": metric, "routing": routing, "rows": len(rows), "routed": _mean(hits["routed"]),
              "oracle": _mean(hits["oracle"]), "base": _mean(hits["base"]), "per_task": per_task}
    result["recovery"] = result["routed"] / result["oracle"] if result["oracle"] else None
    if return_hits:
        result["hits"] = hits
    return result


def evaluate_bundle(model, rows: list[dict], *, task_to_adapter: dict[str, str] | None = None,
                    metric: str | None = None, out_dir: str | None = None, as_chat: bool = True,
                    progress: bool = True, ood_rows: list[dict] | None = None, routing: str = "sequence",
                    reroute_every: int | None = None, top_k: int | None = None) -> dict:
    """Selection accuracy (macro, micro, per task, confusion matrix, margins) and optionally task scores.

    Each row's task maps to an adapter (`task_to_adapter`, default: the same name); rows of tasks with no adapter
    are ignored (reported as `skipped_rows`). Routes follow the bundle's config (with `reject="auto"`, rejected
    rows count as errors). With `ood_rows` (prompts no adapter covers), "ood" holds AUROC, FPR at 95% TPR, and the
    in-domain false rejects and ood rejects at the bundle's calibrated threshold (`calibration.ood_summary`).
    `routing`/`reroute_every`/`top_k` choose how the "routed" task-score column is produced (`task_scores`).
    With `out_dir`, writes report.md, report.json, confusion.png, margins.png (and ood_scores.png) there.
    """
    mapping = dict(task_to_adapter or {})
    known = set(model.adapter_names)
    kept = [r for r in rows if mapping.get(r["task"], r["task"]) in known]
    if not kept:
        raise ValueError(f"No row's task matches an adapter of this bundle ({sorted(known)}); map tasks to adapters "
                         "with --task-map TASK=ADAPTER.")
    oracle = [mapping.get(r["task"], r["task"]) for r in kept]
    routed, margins, _, in_scores = route_rows(model, kept, as_chat=as_chat, with_ood=True)
    report = routing_report(oracle, routed, model.adapter_names)
    report["skipped_rows"] = len(rows) - len(kept)
    report["margins"] = margins
    report["calibration"] = model.config.ood_calibration
    if ood_rows:
        if not model.router.has_ood():
            raise ValueError("This bundle has no out-of-distribution score (built before ariadne_hf 1.2 bundles); "
                             "rebuild it with from_adapters to evaluate --ood.")
        from ..routing.calibration import ood_summary

        out_scores = route_rows(model, ood_rows, as_chat=as_chat, with_ood=True)[3]
        report["ood"] = ood_summary(in_scores, out_scores, model.config.ood_threshold)
        report["ood_scores"] = {"in_domain": in_scores.tolist(), "ood": out_scores.tolist()}
    if metric:
        report["task_scores"] = task_scores(model, kept, routed, oracle, metric, progress=progress, routing=routing,
                                            reroute_every=reroute_every, top_k=top_k)
    if out_dir:
        from .reports import write_eval_report

        write_eval_report(out_dir, report)
    return report


def router_only_report(tokenizer, embed_weight, train: dict[str, list[str]], test: dict[str, list[str]], *,
                       ood_test: list[str] | None = None, reject: str | None = None, reject_rate: float = 0.02,
                       max_length: int = 512, batch_size: int = 64, progress: bool = False, signal=None,
                       **build_kwargs) -> dict:
    """Selection accuracy of a router built from prompt sets alone (no LoRA weights needed).

    Builds the router exactly as `AriadneRoutedModel.from_adapters` does (special tokens weighted 0,
    `build_router_tables(**build_kwargs)`, defaults = the library's, the cross-fitted out-of-distribution
    calibration for `reject_rate`) from `train` {adapter: prompts}, routes the `test` prompts (raw text, the
    tokenizer's default special tokens) through `AriadneRouter.score`/`decide` and returns `routing_report`
    (macro/micro/per adapter/confusion) plus "calibration" (what the threshold was fit for). With `reject="auto"`
    rows above the calibrated threshold go to "__base__" (false rejects count as errors). With `ood_test`
    (prompts of tasks no adapter covers), "ood" holds `calibration.ood_summary` (AUROC, FPR at 95% TPR, in-domain
    false rejects and ood rejects at the calibrated threshold) and the two score lists for histograms.
    Selection accuracy does not depend on adapter weights, so this answers "would these prompt sets be told
    apart, and would foreign prompts be recognised?" before any adapter is trained. `signal` (a
    `routing.signal.RoutingSignal`, e.g. `signal_for(backbone, k)`) routes on the base hidden state after layer k
    instead of the input embedding `embed_weight`.
    """
    import torch

    from ..routing.build import build_router
    from ..routing.calibration import ood_summary
    from ..routing.centroids import DEFAULT_NUM_CENTROIDS

    names = list(train)
    build_kwargs.setdefault("num_centroids", DEFAULT_NUM_CENTROIDS)
    from ..routing.route import score
    from ..routing.signal import RoutingSignal

    signal = RoutingSignal(embed_weight) if signal is None else signal
    built = build_router({n: list(train[n]) for n in names}, tokenizer, embed_weight, reject=reject,
                         reject_rate=reject_rate, max_length=max_length, batch_size=batch_size, progress=progress,
                         signal=signal, **build_kwargs)
    router, calibration = built.router, built.calibration
    threshold = calibration.threshold if calibration is not None and reject == "auto" else None

    def route(texts: list[str]) -> tuple[list[str], torch.Tensor]:
        predicted, ood = [], []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            scores, best = score(router, signal, batch["input_ids"], batch["attention_mask"])
            ood_scores = router.ood_scores(batch["input_ids"], batch["attention_mask"], scores)
            predicted += router.decide(scores, best, None, ood_scores, threshold).adapter_names
            ood.append(ood_scores if ood_scores is not None else torch.full((len(best),), float("nan")))
        return predicted, torch.cat(ood) if ood else torch.zeros(0)

    truth = [n for n in names for _ in test.get(n, [])]
    predicted, in_scores = route([t for n in names for t in test.get(n, [])])
    report = routing_report(truth, predicted, names)
    report["calibration"] = None if calibration is None else dict(calibration.info)
    if ood_test is not None and calibration is not None:
        _, out_scores = route(list(ood_test))
        report["ood"] = ood_summary(in_scores, out_scores, calibration.threshold)
        report["ood_scores"] = {"in_domain": in_scores.tolist(), "ood": out_scores.tolist()}
    return report
