"""Evaluation: selection accuracy reports, task metrics (exact match, multiple choice), `ariadne eval`."""

import json
import os

import torch

from ariadne_hf.cli import main
from ariadne_hf.evaluation import routing_report, task_scores
from ariadne_hf.evaluation.task_metrics import choice_hits, left_pad, prompt_ids


def test_routing_report_counts_the_confusion_and_macro_and_micro_accuracy():
    report = routing_report(["a", "a", "b", "b"], ["a", "b", "b", "__base__"], ["a", "b"])
    assert report["confusion"] == [[1, 1, 0], [0, 1, 1]]
    assert report["accuracy"] == {"a": 0.5, "b": 0.5}
    assert report["micro_accuracy"] == 0.5 and report["macro_accuracy"] == 0.5


def test_choice_hits_equal_a_brute_force_log_likelihood(tiny_model):
    tokenizer = tiny_model.tokenizer
    row = {"text": "add seven plus three", "choices": ["ten", "seven eight", "moon"], "answer": 0}
    expected = []
    for choice in row["choices"]:
        prompt = prompt_ids(tokenizer, row["text"])
        completion = tokenizer(choice, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        logprobs = torch.log_softmax(tiny_model(input_ids=ids, adapter_names=["math"]).logits[0].float(), -1)
        expected.append(sum(float(logprobs[len(prompt) + i - 1, t]) for i, t in enumerate(completion)))
    best = max(range(3), key=lambda i: expected[i])
    for answer in range(3):
        assert choice_hits(tiny_model, tokenizer, [{**row, "answer": answer}], ["math"]) == [answer == best]


def test_task_scores_are_the_mean_hits_of_routed_oracle_and_base_adapters(tiny_model, tiny_assets):
    rows = [{"task": n, "text": p, "targets": ["plus"], "choices": ["plus", "moon"], "answer": 0}
            for n in ("math", "poetry") for p in tiny_assets["test"][n][:3]]
    oracle = [r["task"] for r in rows]
    routed = list(oracle)
    routed[0] = "code"
    scores = task_scores(tiny_model, rows, routed, oracle, "multiple_choice", progress=False)

    def hits(names):  # the per-row reference path, scored independently of task_scores' reuse of oracle rows
        return [float(h) for h in choice_hits(tiny_model, tiny_model.tokenizer, rows, names, fast=False)]

    expected = {"routed": hits(routed), "oracle": hits(oracle), "base": hits(["__base__"] * len(rows))}
    assert scores["rows"] == 6 and set(scores["per_task"]) == {"math", "poetry"}
    for column, column_hits in expected.items():
        assert scores[column] == sum(column_hits) / 6
        assert scores["per_task"]["math"][column] == sum(column_hits[:3]) / 3
    assert scores["recovery"] == (scores["routed"] / scores["oracle"] if scores["oracle"] else None)
    same = task_scores(tiny_model, rows, oracle, oracle, "exact_match", progress=False)
    assert same["routed"] == same["oracle"]


def test_left_pad_aligns_the_prompt_ends():
    ids, mask = left_pad([[5, 6], [7]], 0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]


def test_eval_cli_writes_a_report(tiny_bundle_dir, tiny_assets, write_jsonl, tmp_path, capsys):
    rows = [{"prompt": p, "label": name, "choices": ["plus", "moon"], "answer": 1}
            for name, prompts in tiny_assets["test"].items() for p in prompts]
    data = write_jsonl("test.jsonl", rows + [{"prompt": "x", "label": "unknown-task"}])
    out = tmp_path / "report"
    assert main(["eval", tiny_bundle_dir, "--data", data, "--text-field", "prompt", "--task-field", "label",
                 "--metric", "multiple_choice", "--max-per-task", "4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sum(report["num_prompts"].values()) == 12 and report["skipped_rows"] == 1
    assert report["macro_accuracy"] >= 0.75
    assert report["task_scores"]["rows"] == 12
    assert {"report.md", "confusion.png", "margins.png"} <= set(os.listdir(out))
    assert "Routed / oracle" in (out / "report.md").read_text()
    assert "selection accuracy" in capsys.readouterr().out


def test_fast_choice_scores_equal_the_per_row_path(tiny_model, tiny_assets):
    from ariadne_hf.evaluation.task_metrics import choice_scores, choice_scores_per_row

    rows = [{"text": p, "choices": ["plus", "seven eight moon", "ten", "add sum"], "answer": 1}
            for n in ("math", "poetry") for p in tiny_assets["test"][n][:2]]
    rows.append({"text": "add seven", "choices": ["moon", "x"], "answer": 0})  # one-token choices too
    names = ["math", "poetry", "__base__", "code", "math"]
    fast = choice_scores(tiny_model, tiny_model.tokenizer, rows, names)
    slow = choice_scores_per_row(tiny_model, tiny_model.tokenizer, rows, names)
    flat = lambda scores: torch.tensor([v for row in scores for v in row])  # noqa: E731
    assert [len(r) for r in fast] == [4, 4, 4, 4, 2]
    assert torch.allclose(flat(fast), flat(slow), atol=1e-4), (fast, slow)
    assert choice_hits(tiny_model, tiny_model.tokenizer, rows, names) == choice_hits(
        tiny_model, tiny_model.tokenizer, rows, names, fast=False)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 2, 0]), 3).float()
    mixed = choice_scores(tiny_model, tiny_model.tokenizer, rows[:2] + rows[3:], adapter_weights=one_hot[[0, 1, 3, 4]])
    assert torch.allclose(flat(mixed), flat(slow[:2] + slow[3:]), atol=1e-4)


def test_eval_cli_reports_ood_and_token_routing(tiny_bundle_dir, tiny_assets, write_jsonl, tmp_path):
    from tiny_models import make_prompts

    data = write_jsonl("test.jsonl", [{"text": p, "task": name, "choices": ["plus", "moon"], "answer": 1}
                                      for name, prompts in tiny_assets["test"].items() for p in prompts[:4]])
    ood = write_jsonl("ood.jsonl", [{"text": p} for p in make_prompts("legal", 12, seed=5)])
    out = tmp_path / "report"
    assert main(["eval", tiny_bundle_dir, "--data", data, "--ood", ood, "--metric", "multiple_choice",
                 "--routing", "token", "--top-k", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ood"]["auroc"] > 0.8 and report["ood"]["ood_prompts"] == 12
    assert set(report["ood"]) >= {"fpr_at_95_tpr", "in_domain_false_reject_rate", "ood_reject_rate"}
    assert report["task_scores"]["routing"] == "token" and report["calibration"]["folds"] == 5
    assert "ood_scores.png" in os.listdir(out) and "Out-of-distribution" in (out / "report.md").read_text()
    assert main(["eval", tiny_bundle_dir, "--data", data, "--reroute-every", "2"]) == 2
