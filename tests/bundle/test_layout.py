"""The bundle layout (bundle/layout.py): required files, pickle rules and the one file validator, on file sets."""

from __future__ import annotations

import json

import pytest

from ariadne_hf.bundle.errors import BundleError, IncompleteBundleError, NotABundleError, UnsafeBundleError
from ariadne_hf.bundle.layout import (
    check_bundle_files,
    check_bundle_folder,
    is_bundle_file,
    is_pickle_file,
    is_pickled_weights,
    read_bundle_config,
    required_files,
)

CONFIG = {"model_type": "ariadne", "adapter_names": ["math", "code"], "backbone_name_or_path": "org/backbone"}
COMPLETE = {"config.json", "model.safetensors", "tokenizer.json", "adapters/math/adapter_config.json",
            "adapters/math/adapter_model.safetensors", "adapters/code/adapter_config.json",
            "adapters/code/adapter_model.safetensors"}


def test_required_files_follow_the_config():
    assert required_files(CONFIG) == [
        "model.safetensors", "adapters/math/adapter_config.json", "adapters/math/adapter_model.safetensors",
        "adapters/code/adapter_config.json", "adapters/code/adapter_model.safetensors"]
    with_base = required_files({**CONFIG, "adapter_names": [], "backbone_name_or_path": "base"})
    assert with_base == ["model.safetensors", "base/config.json", "base/*.safetensors"]


def test_pickle_rules():
    for name in ("adapter_model.bin", "pytorch_model.bin", "model.pt", "model.bin", "pytorch_model-00001-of-00002.bin"):
        assert is_pickle_file(f"adapters/x/{name}") and is_pickled_weights(f"adapters/x/{name}"), name
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth", "x.pkl", "x.ckpt"):
        assert is_pickle_file(name) and not is_pickled_weights(name), name  # a pickle, but not weights
    for name in ("model.safetensors", "config.json", "bin.json"):
        assert not is_pickle_file(name) and not is_pickled_weights(name), name
    assert not is_bundle_file("adapters/math/adapter_model.bin") and not is_bundle_file("base/pytorch_model.bin")
    assert is_bundle_file("adapters/math/adapter_model.safetensors", adapter_names=["math"])
    assert not is_bundle_file("adapters/math/adapter_model.safetensors", adapter_names=["code"])


def test_a_complete_file_set_passes():
    check_bundle_files(COMPLETE, CONFIG, "Bundle b")
    base = {"base/config.json", "base/model-00001-of-00002.safetensors", "base/model-00002-of-00002.safetensors"}
    check_bundle_files(COMPLETE | base, {**CONFIG, "backbone_name_or_path": "base"}, "Bundle b")


def test_every_missing_file_is_named_in_one_message_with_the_fix():
    files = COMPLETE - {"model.safetensors", "adapters/math/adapter_config.json",
                        "adapters/math/adapter_model.safetensors", "adapters/code/adapter_config.json"}
    config = {**CONFIG, "backbone_name_or_path": "base"}
    with pytest.raises(IncompleteBundleError) as info:
        check_bundle_files(files, config, "Bundle b", fix="Do X.")
    assert str(info.value) == (
        "Bundle b is an incomplete ariadne bundle: router weights model.safetensors are missing; adapter 'math' is "
        "listed in config.json but its folder adapters/math/ is missing or empty; adapter 'code' is listed in "
        "config.json but adapters/code/adapter_config.json is missing; config.json says the backbone is in base/ but "
        "base/config.json is missing; config.json says the backbone is in base/ but it holds no weights "
        "(base/*.safetensors). Do X.")


def test_pickled_weights_instead_of_safetensors_are_unsafe_other_pickles_do_not_count():
    files = (COMPLETE - {"model.safetensors", "adapters/code/adapter_model.safetensors"}) | {
        "pytorch_model.bin", "adapters/code/adapter_model.bin"}
    with pytest.raises(UnsafeBundleError, match=(
            r"router weights model\.safetensors are missing, only pickled pytorch_model\.bin found; adapter 'code' "
            r"weights adapters/code/adapter_model\.safetensors are missing, only pickled adapters/code/adapter_model"
            r"\.bin found; ariadne_hf never loads pickles")):
        check_bundle_files(files, CONFIG, "Bundle b")
    base = {"base/config.json", "base/pytorch_model-00001-of-00002.bin", "base/pytorch_model-00002-of-00002.bin"}
    with pytest.raises(UnsafeBundleError, match=r"backbone weights base/\*\.safetensors .*pytorch_model-00001-of"):
        check_bundle_files(COMPLETE | base, {**CONFIG, "backbone_name_or_path": "base"}, "Bundle b")
    with pytest.raises(IncompleteBundleError, match="router weights model.safetensors are missing"):
        check_bundle_files((COMPLETE - {"model.safetensors"}) | {"training_args.bin"}, CONFIG, "Bundle b")


def test_the_folder_wrapper_reads_the_config_and_lists_the_files(tmp_path):
    with pytest.raises(NotABundleError, match="does not exist or is not a folder"):
        check_bundle_folder(tmp_path / "absent", "Bundle a")
    for path in COMPLETE:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.bin").write_text("hidden: ignored")
    config, files = check_bundle_folder(tmp_path, "Bundle b")
    assert config == CONFIG and set(files) == COMPLETE
    (tmp_path / "adapters" / "math" / "optimizer.pt").write_text("a stray pickle")
    check_bundle_folder(tmp_path, "Bundle b")  # loading ignores it ...
    with pytest.raises(UnsafeBundleError, match=r"contains pickled weights \(adapters/math/optimizer\.pt\)"):
        check_bundle_folder(tmp_path, "Bundle b", refuse_any_pickle=True)  # ... a push refuses it


def test_config_problems(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(NotABundleError, match="config.json is missing. It holds a single PEFT adapter"):
        read_bundle_config(tmp_path, "Bundle b", ["adapter_config.json"])
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(NotABundleError, match=r"not an ariadne bundle \(config.json has model_type 'llama'.*"
                                              r"plain transformers model.*from_adapters"):
        read_bundle_config(tmp_path, "Bundle b")
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(NotABundleError, match="config.json is not valid JSON"):
        read_bundle_config(tmp_path, "Bundle b")
    (tmp_path / "config.json").write_text('{"model_type": "ariadne", "bundle_format_version": "9.0"}')
    with pytest.raises(BundleError, match="Bundle b: This bundle has format version 9.0, newer than") as info:
        read_bundle_config(tmp_path, "Bundle b")
    assert not isinstance(info.value, OSError)
