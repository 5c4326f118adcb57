"""Adapter sources: resolve (local folder or Hub id), validate (LoRA, safetensors only), load into PEFT, save."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from .constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PICKLED_WEIGHT_NAMES


class AdapterError(ValueError):
    """An adapter cannot be used: the message names the adapter, the problem and the fix."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_adapter_dir(source: str | os.PathLike, name: str, **hub_kwargs: Any) -> str:
    """Local folder of adapter `name`: `source` itself if it is a folder, else a Hub download of its two files."""
    path = os.fspath(source)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
        raise AdapterError(f"Adapter {name!r}: {path!r} is not a folder and not a Hub repo id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(
            path, allow_patterns=[ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, *PICKLED_WEIGHT_NAMES], **hub_kwargs
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise AdapterError(f"Adapter {name!r}: could not fetch {path!r} from the Hub ({err}).") from err


def check_adapter_dir(path: str, name: str) -> LoraConfig:
    """Validate adapter folder `path` and return its LoraConfig.

    Guarantees on return: `adapter_config.json` parses as a PEFT LoRA config without DoRA, and weights exist as
    `adapter_model.safetensors` (pickled weights are refused, never loaded).
    """
    config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise AdapterError(f"Adapter {name!r}: {config_path} is missing; a PEFT adapter folder is expected.")
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        pickled = [f for f in PICKLED_WEIGHT_NAMES if os.path.isfile(os.path.join(path, f))]
        if pickled:
            raise AdapterError(
                f"Adapter {name!r}: only pickled weights ({pickled[0]}) found in {path}. ariadne_hf never loads "
                "pickles; convert them once with PEFT (load, then save_pretrained(safe_serialization=True))."
            )
        raise AdapterError(f"Adapter {name!r}: {weights_path} is missing.")
    try:
        with open(config_path, encoding="utf-8") as handle:
            raw = json.load(handle)
        config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise AdapterError(f"Adapter {name!r}: {config_path} is not a valid PEFT config ({err}).") from err
    if raw.get("peft_type") != "LORA" or not isinstance(config, LoraConfig):
        raise AdapterError(f"Adapter {name!r}: peft_type {raw.get('peft_type')!r} is not supported; only LoRA is.")
    if config.use_dora:
        raise AdapterError(f"Adapter {name!r}: DoRA adapters cannot be mixed per row; use a plain LoRA adapter.")
    return config


def load_adapter(model: torch.nn.Module, path: str, name: str) -> PeftModel:
    """Load the LoRA adapter at `path` as `name` into a backbone or PeftModel; returns the PeftModel.

    Raises AdapterError naming the adapter when its weights do not fit the backbone (another base model).
    """
    check_adapter_dir(path, name)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name, is_trainable=False)
            peft_model = model
        else:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise AdapterError(
            f"Adapter {name!r} at {path} does not fit this backbone ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}). It was probably trained for another base model "
            f"(its config says {_declared_base(path)!r})."
        ) from err
    _check_weights_loaded(peft_model, path, name)
    peft_model.eval()
    return peft_model


def _declared_base(path: str) -> str | None:
    try:
        with open(os.path.join(path, ADAPTER_CONFIG_NAME), encoding="utf-8") as handle:
            return json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _check_weights_loaded(peft_model: PeftModel, path: str, name: str) -> None:
    """PEFT only warns about adapter keys it could not place; treat that as an error."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        file_keys = set(handle.keys())
    placed = set(get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False).keys())
    missing = sorted(k for k in file_keys if k not in placed)
    if missing:
        raise AdapterError(
            f"Adapter {name!r} at {path}: {len(missing)} weight(s) match no module of this backbone "
            f"(e.g. {missing[0]}). It was probably trained for another base model."
        )


def adapter_summary(config: LoraConfig, weights_path: str, num_prompts: int, num_centroids: int) -> dict:
    """Metadata recorded in the bundle config for one adapter."""
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {
        "rank": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "target_modules": targets,
        "num_prompts": int(num_prompts),
        "num_centroids": int(num_centroids),
        "heldout_accuracy": None,
        "sha256": file_sha256(weights_path),
    }


def save_adapter(peft_model: PeftModel, name: str, directory: str, base_model_name_or_path: str | None) -> str:
    """Write adapter `name` as a PEFT folder (adapter_config.json + adapter_model.safetensors); returns the weights path."""
    os.makedirs(directory, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    save_file(state, weights_path, metadata={"format": "pt"})
    config = peft_model.peft_config[name]
    previous = (config.base_model_name_or_path, config.inference_mode)
    config.base_model_name_or_path, config.inference_mode = base_model_name_or_path, True
    try:
        config.save_pretrained(directory)
    finally:
        config.base_model_name_or_path, config.inference_mode = previous
    return weights_path
