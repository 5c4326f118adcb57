"""The demo's task-score table: a fixed sample rule, columns equal to independently scored hits, rendering."""

import pytest

from ariadne_hf.evaluation.demo_scores import (
    METHODS,
    demo_task_scores,
    plot_task_scores,
    sample_rule,
    scored_sample,
    scores_console,
    scores_markdown,
)
from ariadne_hf.evaluation.task_metrics import choice_hits
from ariadne_hf.evaluation.token_eval import prompt_mixture


def _rows(task, n, with_choices=lambda i: True):
    return [{"task": task, "text": f"{task} {i}", **({"choices": ["a", "b"], "answer": i % 2} if with_choices(i)
                                                    else {"targets": ["a"]})} for i in range(n)]


def test_the_sample_is_the_first_n_multiple_choice_rows_of_each_task_in_file_order():
    test = {"t1": _rows("t1", 6, lambda i: i != 1), "t2": _rows("t2", 2)}
    picked = scored_sample(test, 3)
    assert [r["text"] for r in picked] == ["t1 0", "t1 2", "t1 3", "t2 0", "t2 1"]
    assert len(scored_sample(test, None)) == 5 + 2  # every row with choices
    assert "first 3" in sample_rule(3) and "every" in sample_rule(None)
    with pytest.raises(ValueError, match="--full"):
        scored_sample(test, 0)


def test_demo_task_scores_equal_hits_scored_independently(tiny_model, tiny_assets):
    rows = [{"task": n, "text": p, "choices": ["plus", "moon", "sonnet"], "answer": i % 3}
            for n in ("math", "poetry", "code") for i, p in enumerate(tiny_assets["test"][n][:4])]
    scores = demo_task_scores(tiny_model, rows, per_task=4)
    tok = tiny_model.tokenizer
    routed = tiny_model.route([r["text"] for r in rows]).adapter_names  # raw text routes like its chat form
    mixture = prompt_mixture(tiny_model, rows, top_k=2, temperature=tiny_model.config.routing_temperature)
    expected = {"routed": choice_hits(tiny_model, tok, rows, routed, fast=False),
                "oracle": choice_hits(tiny_model, tok, rows, [r["task"] for r in rows], fast=False),
                "base": choice_hits(tiny_model, tok, rows, ["__base__"] * len(rows), fast=False),
                "token_top2": choice_hits(tiny_model, tok, rows, None, adapter_weights=mixture)}
    assert scores["rows"] == 12 and scores["token_top_k"] == 2 and list(scores["per_task"]) == ["code", "math", "poetry"]
    for key, hits in expected.items():
        assert scores["overall"][key] == pytest.approx(sum(hits) / 12)
        assert scores["per_task"]["math"][key] == pytest.approx(sum(hits[:4]) / 4)
    assert scores["overall"]["questions"] == 12 and scores["per_task"]["code"]["questions"] == 4
    assert (mixture > 0).sum(dim=1).eq(2).all()  # the token column really mixes two adapters


def test_the_table_states_rule_sample_size_and_every_method(tmp_path):
    cell = {"routed": 0.5, "token_top2": 0.5, "oracle": 0.75, "base": 0.25}
    scores = {"metric": "multiple_choice", "questions_per_task": 4, "rows": 8, "token_top_k": 2,
              "rule": sample_rule(4), "per_task": {"a": {"questions": 4, **cell}, "b": {"questions": 4, **cell}},
              "overall": {"questions": 8, **cell}}
    text = scores_markdown(scores)
    assert "the first 4 multiple-choice test questions of each task, in file order (8 questions)" in text
    assert all(title in text for _, title in METHODS) and "| **all** | 8 | **50.0%** | **50.0%** | **75.0%** |" in text
    assert "--full" in text  # a sample: the report says how to score everything
    assert "all" in scores_console(scores).splitlines()[-1]
    pytest.importorskip("matplotlib")
    assert plot_task_scores(str(tmp_path / "s.png"), scores) and (tmp_path / "s.png").stat().st_size > 1000
