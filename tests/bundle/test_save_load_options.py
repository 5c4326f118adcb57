"""Options given when saving or loading a bundle: run-time config fields applied, content fields refused, nothing dropped."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import ariadne_hf  # noqa: F401  (registers the Auto classes)
from ariadne_hf import AriadneRoutedModel


def _prompt(model):
    ids = model.tokenizer(["please add seven and five"], return_tensors="pt")
    return ids["input_ids"], ids["attention_mask"]


def test_run_time_keywords_through_the_auto_class_reach_the_model_and_its_generate(serving_bundle_dir):
    model = AutoModelForCausalLM.from_pretrained(serving_bundle_dir, routing="token", reroute_every=3,
                                                 max_resident_adapters=2)
    assert (model.config.routing, model.config.reroute_every, model.config.max_resident_adapters) == ("token", 3, 2)
    assert model.lora.slots.capacity == 2
    input_ids, attention_mask = _prompt(model)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True)
    assert out.token_routes is not None  # token routing ran: the override was not dropped
    with open(os.path.join(serving_bundle_dir, "config.json")) as f:
        assert json.load(f)["routing"] == "sequence"  # loading never writes the bundle


def test_run_time_keywords_of_the_model_class_override_the_bundle_config(serving_bundle_dir):
    model = AriadneRoutedModel.from_pretrained(serving_bundle_dir, generation_strategy="grouped", reject_threshold=0.5)
    assert (model.config.generation_strategy, model.config.reject_threshold) == ("grouped", 0.5)


def test_explicit_keyword_wins_over_the_passed_config(serving_bundle_dir):
    config = AutoConfig.from_pretrained(serving_bundle_dir)
    config.routing_top_k = 3
    model = AriadneRoutedModel.from_pretrained(serving_bundle_dir, config=config, routing_top_k=1)
    assert model.config.routing_top_k == 1


@pytest.mark.parametrize("field, value", [("num_centroids", 7), ("distance", "l2"), ("output_hidden_states", True)])
def test_config_field_describing_the_bundle_content_is_refused_naming_it(serving_bundle_dir, field, value):
    with pytest.raises(ValueError, match=rf"{field}.*Only run-time options"):
        AutoModelForCausalLM.from_pretrained(serving_bundle_dir, **{field: value})


def test_config_of_another_adapter_set_is_refused(serving_bundle_dir):
    config = AutoConfig.from_pretrained(serving_bundle_dir)
    config.adapter_names = config.adapter_names[:1]
    with pytest.raises(ValueError, match="adapter_names"):
        AriadneRoutedModel.from_pretrained(serving_bundle_dir, config=config)


def test_config_of_another_model_type_is_a_type_error(serving_bundle_dir):
    with pytest.raises(TypeError, match="must be an AriadneConfig"):
        AriadneRoutedModel.from_pretrained(serving_bundle_dir, config=LlamaConfig())


def test_unknown_loading_argument_is_an_error_naming_it(serving_bundle_dir):
    with pytest.raises(TypeError, match="unexpected arguments \\['not_an_option'\\]"):
        AriadneRoutedModel.from_pretrained(serving_bundle_dir, not_an_option=1)
    with pytest.raises(TypeError, match="positional"):
        AriadneRoutedModel.from_pretrained(serving_bundle_dir, "extra")


def test_invalid_run_time_value_is_refused_when_loading(serving_bundle_dir):
    with pytest.raises(ValueError, match="routing must be one of"):
        AriadneRoutedModel.from_pretrained(serving_bundle_dir, routing="paragraph")


def test_attn_implementation_through_the_auto_class_reaches_the_backbone(serving_bundle_dir):
    model = AutoModelForCausalLM.from_pretrained(serving_bundle_dir, attn_implementation="eager")
    assert model.backbone.config._attn_implementation == "eager"
    input_ids, attention_mask = _prompt(model)
    assert torch.isfinite(model(input_ids=input_ids, attention_mask=attention_mask).logits).all()


def test_unknown_save_argument_is_an_error_naming_it_and_writes_nothing(tiny_model, tmp_path):
    with pytest.raises(TypeError, match="max_shard_size"):
        tiny_model.save_pretrained(tmp_path / "bundle", max_shard_size="1GB")
    with pytest.raises(ValueError, match="safetensors only"):
        tiny_model.save_pretrained(tmp_path / "bundle", safe_serialization=False)
    assert not (tmp_path / "bundle").exists()
