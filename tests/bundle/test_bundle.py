"""Bundles: exact file set, faithful reload, Auto classes, pipeline, dtype/device_map, self-contained base/."""

import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, pipeline

from ariadne_hf import AriadneConfig, AriadneRoutedModel


def _files(root):
    found = set()
    for folder, _, names in os.walk(root):
        for name in names:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


@pytest.fixture(scope="module")
def bundle_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle")
    tiny_model.save_pretrained(path)
    return str(path)


def test_bundle_holds_exactly_the_bundle_files(bundle_dir, tiny_model):
    files = {f for f in _files(bundle_dir) if not f.startswith("images/")}
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"}
    for name in tiny_model.adapter_names:
        expected |= {f"adapters/{name}/adapter_config.json", f"adapters/{name}/adapter_model.safetensors"}
    files.discard("README.md")  # the model card (its content is tested with the Hub card tests)
    files -= {f for f in files if f.startswith("special_tokens_map")}
    assert files == expected
    assert not os.path.exists(os.path.join(bundle_dir, "adapter_config.json"))


def test_reload_gives_identical_centroids_routes_and_logits(bundle_dir, tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    loaded = AriadneRoutedModel.from_pretrained(bundle_dir)
    assert tiny_model.router.transform.shape == (64, 64)  # whitened by default
    for buffer in ("centroids", "centroid_adapter", "center", "token_weights", "transform"):
        assert torch.equal(getattr(loaded.router, buffer), getattr(tiny_model.router, buffer)), buffer
    assert loaded.adapter_names == tiny_model.adapter_names
    a, b = tiny_model(**batch), loaded(**batch)
    assert a.routes.adapter_names == b.routes.adapter_names
    assert torch.equal(a.routes.scores, b.routes.scores)
    assert torch.equal(a.logits, b.logits)
    config = AutoConfig.from_pretrained(bundle_dir)
    assert isinstance(config, AriadneConfig) and config.backbone_name_or_path == tiny_model.config.backbone_name_or_path


def test_unwhitened_bundle_has_no_transform_and_reloads(tiny_assets, tmp_path, mixed_batch):
    from safetensors import safe_open

    _, _, batch = mixed_batch
    model = AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], tiny_assets["train"],
                                             whitening="none", progress=False)
    model.save_pretrained(tmp_path / "plain")
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == {"router.centroids", "router.centroid_adapter", "router.center",
                                      "router.token_weights", "router.token_count_keys", "router.token_count_values",
                                      "router.ood_stats"}
    loaded = AriadneRoutedModel.from_pretrained(tmp_path / "plain")
    assert loaded.config.whitening == "none" and loaded.router.optional_transform() is None
    assert torch.equal(loaded.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).scores,
                       model.route(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).scores)


def test_auto_classes_load_the_routed_model(bundle_dir, tiny_model, mixed_batch):
    _, _, batch = mixed_batch
    for auto in (AutoModelForCausalLM, AutoModel):
        model = auto.from_pretrained(bundle_dir)
        assert isinstance(model, AriadneRoutedModel)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False),
                           tiny_model.generate(**batch, max_new_tokens=4, do_sample=False))


def test_dtype_and_device_map_reach_the_backbone(bundle_dir, monkeypatch):
    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):  # records what reaches the backbone's loader, then loads for real
        seen.append((name, kwargs))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model = AutoModelForCausalLM.from_pretrained(bundle_dir, dtype=torch.bfloat16, device_map="cpu")
    monkeypatch.undo()
    backbone_calls = [kw for name, kw in seen if name != bundle_dir]
    assert backbone_calls and backbone_calls[0]["device_map"] == "cpu"
    assert backbone_calls[0]["use_safetensors"] is True
    assert model.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.router.centroids.dtype == torch.float32
    legacy = AriadneRoutedModel.from_pretrained(bundle_dir, torch_dtype=torch.float16)
    assert legacy.backbone.get_input_embeddings().weight.dtype == torch.float16
    decision = model.route(["add seven plus three", "a sonnet about the moon"])
    assert decision.adapter_names == ["math", "poetry"]


def test_pipeline_routes_every_prompt(bundle_dir, tiny_model, tiny_assets):
    prompts = [tiny_assets["test"][n][i] for i in range(2) for n in ("math", "poetry", "code")]
    generator = pipeline("text-generation", model=bundle_dir, batch_size=4)
    assert isinstance(generator.model, AriadneRoutedModel)
    outputs = generator(prompts, max_new_tokens=5, do_sample=False, return_full_text=False)
    tokenizer = tiny_model.tokenizer
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = tokenizer([prompt], return_tensors="pt")
        expected = tiny_model.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert output[0]["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_self_contained_bundle_with_base_folder(tiny_assets, tmp_path, mixed_batch):
    backbone_copy = str(tmp_path / "backbone")
    shutil.copytree(tiny_assets["backbone"], backbone_copy)
    model = AriadneRoutedModel.from_adapters(backbone_copy, tiny_assets["adapters"], tiny_assets["train"],
                                             num_centroids=2, progress=False)
    bundle = str(tmp_path / "bundle")
    model.save_pretrained(bundle, include_backbone=True)
    shutil.rmtree(backbone_copy)  # the bundle must not need the original backbone any more
    assert AutoConfig.from_pretrained(bundle).backbone_name_or_path == "base"
    assert "base/model.safetensors" in _files(bundle) and "base/config.json" in _files(bundle)
    assert not any(".lora_" in k for k in _safetensor_keys(os.path.join(bundle, "base", "model.safetensors")))
    loaded = AutoModelForCausalLM.from_pretrained(bundle)
    _, _, batch = mixed_batch
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_backbone_revision_is_recorded(tiny_model, bundle_dir):
    config = AutoConfig.from_pretrained(bundle_dir)
    assert os.path.isabs(config.backbone_name_or_path) and config.backbone_revision is None
    assert config.embedding_vocab_size == 200 and config.embedding_dim == 64
    assert set(config.adapters) == set(tiny_model.adapter_names)
    assert config.adapters["math"]["rank"] == 4 and config.adapters["poetry"]["rank"] == 8


def _safetensor_keys(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return list(handle.keys())


def test_save_pretrained_refuses_unknown_arguments_by_name(tiny_model, tmp_path):
    with pytest.raises(TypeError, match="max_shard_size"):
        tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    with pytest.raises(ValueError, match="safetensors only"):
        tiny_model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "sharded").exists() and not (tmp_path / "pickled").exists()


def test_save_pretrained_writes_nothing_off_the_main_process(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker").exists()
    tiny_model.save_pretrained(tmp_path / "main", safe_serialization=True)
    assert (tmp_path / "main" / "config.json").is_file()
