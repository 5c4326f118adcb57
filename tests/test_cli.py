"""The `ariadne` command: build, route, generate, info (each calls the library)."""

import json
import subprocess
import sys

import pytest

from ariadne_hf.cli import main


@pytest.fixture(scope="module")
def cli_bundle(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    args = ["build", "--backbone", tiny_assets["backbone"], "--out", str(root / "bundle"), "--num-centroids", "3"]
    for name, path in tiny_assets["adapters"].items():
        prompt_file = root / f"{name}.jsonl"
        prompt_file.write_text("".join(json.dumps({"text": p}) + "\n" for p in tiny_assets["train"][name]))
        heldout = root / f"{name}.txt"
        heldout.write_text("\n".join(tiny_assets["test"][name]))
        args += ["--adapter", f"{name}={path}", "--prompts", f"{name}={prompt_file}", "--heldout", f"{name}={heldout}"]
    assert main(args) == 0
    return str(root / "bundle")


def test_build_info_route_and_generate_commands_agree_with_the_bundle(cli_bundle, capsys):
    capsys.readouterr()
    assert main(["info", cli_bundle, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["adapters"]) == {"math", "poetry", "code"} and info["centroids"] == 9
    assert info["adapters"]["math"]["heldout_accuracy"] >= 0.75
    assert info["reject"] is None and info["ood_calibration"]["folds"] == 5 and info["ood_threshold"] is not None
    assert main(["info", cli_bundle]) == 0 and "cross-fitted 5 folds" in capsys.readouterr().out
    assert main(["route", cli_bundle, "add seven plus three", "a sonnet about the moon", "--json"]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert routed["adapter_names"] == ["math", "poetry"]
    assert set(routed["scores"][0]) == {"math", "poetry", "code"} and len(routed["ood_scores"]) == 2
    assert main(["generate", cli_bundle, "python function return", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("[code] python function return")


def test_cli_errors_name_the_problem_and_exit_with_2(cli_bundle, capsys, tmp_path):
    assert main(["route", str(tmp_path), "x"]) == 2
    assert "not an ariadne bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="NAME=PATH"):
        main(["build", "--backbone", "x", "--adapter", "oops", "--prompts", "a=b", "--out", str(tmp_path / "o")])


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "ariadne_hf.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "build" in result.stdout


@pytest.mark.parametrize("value", ["abc", "-1", "2.5"])
def test_a_bad_routing_layer_is_a_usage_error_naming_the_accepted_values(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "--backbone", "x", "--adapter", "a=x", "--prompts", "a=x", "--routing-layer", value,
              "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2
    assert f"expected 'auto' or an integer >= 0 (a decoder layer), got {value!r}" in capsys.readouterr().err
