"""Bad input gets a clear error naming the problem and the fix."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ariadne_hf import AdapterError, AriadneRoutedModel, BundleError


@pytest.fixture()
def bundle_copy(tiny_model, tmp_path):
    path = tmp_path / "bundle"
    tiny_model.save_pretrained(path)
    return str(path)


def _edit_config(bundle, **changes):
    path = os.path.join(bundle, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config.update(changes)
    with open(path, "w") as handle:
        json.dump(config, handle)


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("config.json", "not an ariadne bundle: config.json is missing"),
        ("model.safetensors", "router weights model.safetensors are missing"),
        ("adapters/poetry/adapter_model.safetensors",
         "adapter 'poetry' is listed in config.json but adapters/poetry/adapter_model.safetensors is missing"),
        ("adapters/code/adapter_config.json",
         "adapter 'code' is listed in config.json but adapters/code/adapter_config.json is missing"),
    ],
)
def test_missing_bundle_file_is_named(bundle_copy, relative, message):
    os.remove(os.path.join(bundle_copy, relative))
    with pytest.raises(ValueError, match=message):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_missing_adapter_folder_is_named(bundle_copy):
    shutil.rmtree(os.path.join(bundle_copy, "adapters", "math"))
    with pytest.raises(BundleError, match="adapter 'math' is listed in config.json but .* is missing"):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_corrupt_files_are_named(bundle_copy):
    weights = os.path.join(bundle_copy, "adapters", "code", "adapter_model.safetensors")
    with open(weights, "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="adapter 'code' weights .* do not match the checksum"):
        AriadneRoutedModel.from_pretrained(bundle_copy)
    router = os.path.join(bundle_copy, "model.safetensors")
    with open(router, "wb") as handle:
        handle.write(b"not a safetensors file")
    _edit_config(bundle_copy, router_sha256=None)
    with pytest.raises(BundleError, match="model.safetensors is not a readable safetensors file"):
        AriadneRoutedModel.from_pretrained(bundle_copy)
    with open(os.path.join(bundle_copy, "config.json"), "w") as handle:
        handle.write("{ broken")
    with pytest.raises(BundleError, match="config.json is not valid JSON"):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_centroids_of_another_dimension_or_vocab_are_refused(bundle_copy, tmp_path):
    router_path = os.path.join(bundle_copy, "model.safetensors")
    tensors = load_file(router_path)
    tensors["router.centroids"] = torch.randn(tensors["router.centroids"].shape[0], 32)
    tensors["router.center"], tensors["router.transform"] = torch.zeros(32), torch.eye(32)
    for key in ("router.token_count_keys", "router.token_count_values", "router.ood_stats"):
        tensors.pop(key)  # (their own checks: test_ood.py)
    save_file(tensors, router_path)
    _edit_config(bundle_copy, router_sha256=None)
    with pytest.raises(BundleError, match=r"centroids have shape .*embedding_dim 64"):
        AriadneRoutedModel.from_pretrained(bundle_copy)
    _edit_config(bundle_copy, embedding_dim=32, embedding_vocab_size=500)
    with pytest.raises(BundleError, match=r"centroid table comes from another backbone"):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_whitening_matrix_that_does_not_fit_is_refused(bundle_copy):
    router_path = os.path.join(bundle_copy, "model.safetensors")
    tensors = load_file(router_path)
    transform = tensors.pop("router.transform")
    save_file(tensors, router_path)
    _edit_config(bundle_copy, router_sha256=None)
    with pytest.raises(BundleError, match=r"whitening='within' but model.safetensors has no whitening matrix"):
        AriadneRoutedModel.from_pretrained(bundle_copy)
    tensors["router.transform"] = transform[:10, :10].contiguous()
    save_file(tensors, router_path)
    with pytest.raises(BundleError, match=r"whitening matrix of shape \(10, 10\) \(expected finite \[64, 64\]\)"):
        AriadneRoutedModel.from_pretrained(bundle_copy)
    tensors["router.transform"] = transform.clone().fill_(float("nan"))
    save_file(tensors, router_path)
    with pytest.raises(BundleError, match=r"expected finite"):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_backbone_with_other_weights_is_refused(bundle_copy, tmp_path):
    from tiny_models import save_backbone

    other = save_backbone(str(tmp_path / "other"), seed=7)  # same shapes, other values
    _edit_config(bundle_copy, backbone_name_or_path=other)
    with pytest.raises(BundleError, match="embedding table differs from the one the centroids were computed in"):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_newer_bundle_version_fails_loudly(bundle_copy):
    _edit_config(bundle_copy, bundle_format_version="2.0")
    with pytest.raises(ValueError, match="format version 2.0, newer than .* Upgrade ariadne_hf"):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_not_a_bundle(tiny_assets):
    with pytest.raises(BundleError, match="not an ariadne bundle .*model_type 'llama'"):
        AriadneRoutedModel.from_pretrained(tiny_assets["backbone"])


def test_adapter_for_another_base_model_is_refused(tiny_assets, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    peft = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "alien")
    adapters = {**tiny_assets["adapters"], "alien": str(tmp_path / "alien")}
    prompts = {**tiny_assets["train"], "alien": ["some prompt"]}
    with pytest.raises(AdapterError, match="Adapter 'alien' .* does not fit this backbone"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], adapters, prompts, progress=False)


def test_adapter_targeting_missing_modules_is_refused(tiny_assets, tmp_path):
    alien = tmp_path / "alien"
    shutil.copytree(tiny_assets["adapters"]["math"], alien)
    config = json.loads((alien / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]  # a GPT-2 module name
    (alien / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="Adapter 'alien'"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {"alien": str(alien)}, {"alien": ["x y"]},
                                         progress=False)


def test_prompts_and_adapters_must_match(tiny_assets):
    prompts = dict(tiny_assets["train"])
    del prompts["code"]
    with pytest.raises(ValueError, match="Adapter 'code' has no prompts"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"], prompts, progress=False)
    with pytest.raises(ValueError, match="Adapter 'code' has no prompts"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"],
                                         {**tiny_assets["train"], "code": ["", "   "]}, progress=False)
    with pytest.raises(ValueError, match="unknown adapter 'chess'"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], tiny_assets["adapters"],
                                         {**tiny_assets["train"], "chess": ["e4"]}, progress=False)


def test_pickle_only_adapter_is_refused(tiny_assets, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_assets["adapters"]["math"], pickled)
    os.rename(pickled / "adapter_model.safetensors", pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only pickled weights .*adapter_model.bin.* never loads pickles"):
        AriadneRoutedModel.from_adapters(tiny_assets["backbone"], {"math": str(pickled)},
                                         {"math": tiny_assets["train"]["math"]}, progress=False)


def test_pickle_only_router_is_refused(bundle_copy):
    os.rename(os.path.join(bundle_copy, "model.safetensors"), os.path.join(bundle_copy, "pytorch_model.bin"))
    with pytest.raises(BundleError, match="only pickled pytorch_model.bin found; ariadne_hf never loads pickles"):
        AriadneRoutedModel.from_pretrained(bundle_copy)


def test_bad_token_ids_and_shapes(tiny_model):
    with pytest.raises(ValueError, match=r"Token id 200 is outside the backbone's vocabulary \[0, 200\)"):
        tiny_model.route(input_ids=torch.tensor([[1, 5, 200]]))
    with pytest.raises(ValueError, match=r"Token id -3 is outside"):
        tiny_model.generate(input_ids=torch.tensor([[1, -3]]), max_new_tokens=2)
    # ids under padding are never read, whatever they are
    decision = tiny_model.route(input_ids=torch.tensor([[999, 1, 5]]), attention_mask=torch.tensor([[0, 1, 1]]))
    assert len(decision) == 1
    with pytest.raises(ValueError, match="integer token ids"):
        tiny_model.route(input_ids=torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="2-D tensor"):
        tiny_model.route(input_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny_model.route(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1, 1]]))


def test_invalid_names_and_options(tiny_assets):
    from ariadne_hf import AriadneConfig

    with pytest.raises(ValueError, match="Invalid adapter name '__base__'"):
        AriadneConfig(adapter_names=["__base__"])
    with pytest.raises(ValueError, match="distance must be one of"):
        AriadneConfig(distance="manhattan")
    with pytest.raises(ValueError, match="adapter names must be unique"):
        AriadneConfig(adapter_names=["a", "a"])


def test_one_error_hierarchy_for_bundles():
    """Every bundle error is a BundleError (a ValueError); the not-found / not-a-bundle / not-cached family (and the
    unsafe and incomplete ones, OSErrors before) are OSErrors too, as transformers' loaders expect; the old import
    paths name the same classes."""
    import pickle

    import ariadne_hf
    from ariadne_hf.bundle import errors

    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)}
    assert len(classes) == 9 and all(issubclass(c, BundleError) and issubclass(c, ValueError) for c in classes)
    files_family = [errors.BundleNotFoundError, errors.BundleRevisionNotFoundError, errors.BundleNotCachedError,
                    errors.NotABundleError, errors.UnsafeBundleError, errors.IncompleteBundleError]
    for cls in files_family:
        assert issubclass(cls, errors.BundleFilesError) and issubclass(cls, OSError), cls
        error = pickle.loads(pickle.dumps(cls("Bundle x: message")))  # crosses processes (Ray) intact
        assert type(error) is cls and str(error) == "Bundle x: message"
    assert errors.BundleFilesError is ariadne_hf.BundleFilesError
    assert not issubclass(BundleError, OSError) and not issubclass(AdapterError, OSError)
    assert BundleError is ariadne_hf.BundleError is errors.BundleError
    assert AdapterError is ariadne_hf.AdapterError is errors.AdapterError
