"""Adapter sources: resolve (local folder or Hub id), validate (LoRA, safetensors only), summarise for the config."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from peft import LoraConfig, PeftConfig

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PICKLED_WEIGHT_NAMES
from .errors import AdapterError
from .layout import is_pickled_weights

__all__ = ["adapter_summary", "check_adapter_dir", "declared_base", "file_sha256", "resolve_adapter_dir"]


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
        pickled = sorted(f for f in os.listdir(path) if is_pickled_weights(f) and os.path.isfile(os.path.join(path, f)))
        if pickled:
            raise AdapterError(
                f"Adapter {name!r}: only pickled weights ({', '.join(pickled)}) found in {path}. ariadne_hf never loads "
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


def declared_base(path: str) -> str | None:
    try:
        with open(os.path.join(path, ADAPTER_CONFIG_NAME), encoding="utf-8") as handle:
            return json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


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
