"""PEFT adapter folders as the file format: inspect one against a backbone, read its tensors, write it back.

An adapter is read straight from its ``adapter_model.safetensors`` (memory-mapped, one pass), never injected into
a PEFT model: loading cost is O(that adapter), whatever else is loaded. What it targets is what its file holds
(``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` per module); the scaling of each module follows
PEFT's own rule (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; ``rank_pattern`` / ``alpha_pattern`` matched with
PEFT's `get_pattern_key`).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..bundle.adapters import AdapterError, check_adapter_dir, declared_base
from ..constants import ADAPTER_WEIGHTS_NAME
from .layer import base_features

PEFT_PREFIX = "base_model.model."
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass
class ModuleLora:
    """One module of one adapter: its rank, PEFT scaling and the file keys of its A [r, IN] and B [OUT, r]."""

    rank: int
    scaling: float
    key_a: str
    key_b: str


@dataclass
class AdapterLayout:
    """What an adapter holds, validated against a backbone before any weight is read.

    ``modules`` maps the backbone module name to its `ModuleLora`; ``dtype`` is the file's weight dtype (used to
    write the adapter back bit-identically); ``source`` is the weights file and ``source_stat`` its (size,
    mtime_ns) when it was inspected (an unchanged file is copied on save instead of re-serialised).
    ``base_copies`` maps file keys that hold a copy of a backbone weight (PEFT stores a targeted ``lm_head``'s own
    weight next to its LoRA) to that backbone parameter's name; they were checked equal to the backbone's.
    """

    name: str
    config: LoraConfig
    source: str
    source_stat: tuple[int, int]
    dtype: torch.dtype
    modules: dict[str, ModuleLora] = field(default_factory=dict)
    sha256: str | None = None
    base_copies: dict[str, str] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        """Bytes of this adapter's weights file."""
        return self.source_stat[0]


_UNSUPPORTED_CONFIG = (  # (attribute, "is set" test, what to tell the user)
    ("lora_bias", bool, "lora_bias=True (a bias on lora_B)"),
    ("modules_to_save", bool, "modules_to_save (full copies of modules, not LoRA)"),
    ("trainable_token_indices", bool, "trainable_token_indices (embedding rows)"),
    ("layer_replication", bool, "layer_replication"),
    ("target_parameters", bool, "target_parameters (LoRA on raw parameters)"),
)


def _check_config(config: LoraConfig, name: str) -> None:
    for attribute, is_set, what in _UNSUPPORTED_CONFIG:
        if is_set(getattr(config, attribute, None)):
            raise AdapterError(
                f"Adapter {name!r} uses {what}, which routed LoRA layers do not support: only LoRA A/B matrices on "
                "linear layers can be routed per row. Retrain or re-save the adapter without it."
            )


def _module_scaling(config: LoraConfig, module_name: str, rank: int, name: str) -> float:
    """PEFT's scaling of `module_name` (LoraModel._create_and_replace + LoraLayer.update_layer)."""
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_name), config.lora_alpha)
    if int(r) != rank:
        raise AdapterError(
            f"Adapter {name!r}: module {module_name} holds rank-{rank} weights but adapter_config.json gives it rank "
            f"{r}; the folder's config and weights come from different adapters. Re-save the adapter with PEFT."
        )
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def inspect_adapter(path: str, name: str, linear_modules: dict[str, nn.Module],
                    module_types: dict[str, str] | None = None) -> AdapterLayout:
    """Validate adapter folder `path` against the backbone's modules without reading weights.

    `linear_modules` maps the names of the layers LoRA can target (nn.Linear, quantized linears, transformers'
    Conv1D) to them; `module_types` (optional) maps every backbone module name to its class name, so an adapter
    targeting a module of another type is told that type, not "another base model".

    Raises AdapterError naming the adapter, the module or file key, and the fix, when: the folder is not a PEFT
    LoRA adapter with safetensors weights (`check_adapter_dir`); it uses a LoRA feature that cannot be routed per
    row (DoRA, lora_bias, modules_to_save, trainable tokens); a key is not a LoRA A/B weight; a module it targets
    does not exist in the backbone (another base model) or is not a linear layer (embedding, conv); a shape does
    not fit the module; A and B disagree on the rank.
    """
    config = check_adapter_dir(path, name)
    _check_config(config, name)
    module_types = module_types or {}
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    stat = os.stat(weights_path)
    pairs: dict[str, dict[str, tuple[str, list[int]]]] = {}
    dtype = None
    base_copies = {}
    with safe_open(weights_path, framework="pt") as handle:
        for key in handle.keys():
            if ".base_layer." in key and key.startswith(PEFT_PREFIX):
                base_copies[key] = _check_base_copy(handle, key, linear_modules, name, path, module_types)
                continue
            module_name, part = _split_key(key, name, path)
            shape = list(handle.get_slice(key).get_shape())
            pairs.setdefault(module_name, {})[part] = (key, shape)
            if dtype is None:
                dtype = handle.get_slice(key).get_dtype()
    if not pairs:
        raise AdapterError(f"Adapter {name!r}: {weights_path} holds no LoRA weights.")
    layout = AdapterLayout(name, config, weights_path, (stat.st_size, stat.st_mtime_ns), _torch_dtype(dtype, name),
                           base_copies=base_copies)
    for module_name, parts in sorted(pairs.items()):
        layout.modules[module_name] = _check_module(module_name, parts, linear_modules, name, path, config,
                                                    module_types)
    return layout


def _refused_type(module_name: str, module_types: dict[str, str], name: str, path: str, example: str) -> None:
    """Raise the error for LoRA on a backbone module that exists but is not a layer routed LoRA can wrap."""
    type_name = module_types.get(module_name)
    if type_name is None:
        return
    if "Embedding" in type_name:
        why = "LoRA on an embedding layer looks up rows instead of multiplying the input"
    elif "Conv" in type_name:
        why = "LoRA on a convolution needs a convolution per adapter"
    elif "Expert" in type_name or "MoE" in type_name or "Moe" in type_name:
        why = "fused MoE expert weights are raw parameters (PEFT's target_parameters), not linear layers"
    else:
        why = "it is not a linear layer"
    raise AdapterError(
        f"Adapter {name!r} at {path}: it puts LoRA on {module_name} (e.g. {example}), a {type_name} of this backbone. "
        f"Routed LoRA layers wrap nn.Linear (quantized subclasses included) and transformers' Conv1D only: {why}. "
        "Use an adapter whose target_modules are linear layers."
    )


def _check_base_copy(handle, key: str, linear_modules: dict[str, nn.Module], name: str, path: str,
                     module_types: dict[str, str]) -> str:
    """A backbone weight PEFT saved beside the LoRA (e.g. a targeted lm_head's): accepted only if it is the
    backbone's own, unchanged (an adapter that changes base weights cannot be routed per row)."""
    module_name, _, attribute = key[len(PEFT_PREFIX):].partition(".base_layer.")
    module = linear_modules.get(module_name)
    if module is None:
        _refused_type(module_name, module_types, name, path, key)
        raise AdapterError(
            f"Adapter {name!r} at {path}: {key!r} belongs to LoRA on {module_name}, which is not a linear layer of this "
            "backbone (an embedding layer, a conv layer, or a module of another base model). Routed LoRA layers "
            "support LoRA on linear layers only: use an adapter whose target_modules are linear layers."
        )
    current = getattr(getattr(module, "base_layer", module), attribute, None)
    stored = handle.get_tensor(key)
    if current is None or current.shape != stored.shape or not torch.equal(current.detach().cpu().to(stored.dtype),
                                                                            stored):
        raise AdapterError(
            f"Adapter {name!r} at {path}: {key!r} is a copy of the backbone's {module_name}.{attribute} that differs "
            "from this backbone's (a resized vocabulary or a fine-tuned base layer). Routed LoRA layers apply LoRA "
            "deltas only; use an adapter trained on this exact backbone without changing its weights."
        )
    return f"{module_name}.{attribute}"


def _split_key(key: str, name: str, path: str) -> tuple[str, str]:
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"Adapter {name!r} at {path}: weight {key!r} does not start with {PEFT_PREFIX!r}; this is "
                           "not a file PEFT's save_pretrained wrote for a causal LM.")
    stem = key[len(PEFT_PREFIX):]
    for suffix, part in ((_A_SUFFIX, "A"), (_B_SUFFIX, "B")):
        if stem.endswith(suffix):
            return stem[: -len(suffix)], part
    if "lora_embedding" in stem:
        what = "LoRA on an embedding layer"
    elif "lora_magnitude" in stem:
        what = "DoRA magnitudes"
    elif ".lora_A." in stem or ".lora_B." in stem:
        what = "a LoRA bias"
    else:
        what = "a full module weight (modules_to_save)"
    raise AdapterError(
        f"Adapter {name!r} at {path}: weight {key!r} is {what}, which routed LoRA layers do not support (only "
        "lora_A/lora_B weights of linear layers). Use an adapter trained with LoRA on linear layers only."
    )


def _check_module(module_name: str, parts: dict, linear_modules: dict[str, nn.Module], name: str, path: str,
                  config: LoraConfig, module_types: dict[str, str]) -> ModuleLora:
    if set(parts) != {"A", "B"}:
        missing = "lora_B" if "A" in parts else "lora_A"
        raise AdapterError(f"Adapter {name!r} at {path}: module {module_name} has no {missing} weight; the file is "
                           "incomplete. Re-save the adapter with PEFT.")
    module = linear_modules.get(module_name)
    if module is None:
        _refused_type(module_name, module_types, name, path, parts["A"][0])
        raise AdapterError(
            f"Adapter {name!r} at {path}: its weights for {module_name} match no module of this backbone "
            f"(e.g. {parts['A'][0]}): it was trained for another base model (its config says "
            f"{declared_base(path)!r}). Use an adapter trained on this backbone."
        )
    if config.target_modules != "all-linear" and not check_target_module_exists(config, module_name):
        raise AdapterError(
            f"Adapter {name!r} at {path}: its file holds weights for {module_name}, which its adapter_config.json does "
            f"not target (target_modules={config.target_modules!r}); the config and weights come from different "
            "adapters. Re-save the adapter with PEFT."
        )
    (key_a, shape_a), (key_b, shape_b) = parts["A"], parts["B"]
    rank = shape_a[0] if len(shape_a) == 2 else -1
    in_features, out_features = base_features(getattr(module, "base_layer", module))
    if len(shape_a) != 2 or len(shape_b) != 2 or shape_b[1] != rank or shape_a[1] != in_features \
            or shape_b[0] != out_features:
        raise AdapterError(
            f"Adapter {name!r} at {path} does not fit this backbone: module {module_name} has lora_A {shape_a} and "
            f"lora_B {shape_b}, the layer maps {in_features} -> {out_features} features (expected "
            f"[r, {in_features}] and [{out_features}, r]). It was probably trained for another base "
            f"model (its config says {declared_base(path)!r})."
        )
    return ModuleLora(rank, _module_scaling(config, module_name, rank, name), key_a, key_b)


def _torch_dtype(name: str, adapter: str) -> torch.dtype:
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    if name not in dtypes:
        raise AdapterError(f"Adapter {adapter!r}: weights of dtype {name} are not supported (float32/16, bfloat16).")
    return dtypes[name]


def read_module_weights(layout: AdapterLayout):
    """Yield (module name, A [r, IN], B [OUT, r]) for every module of the adapter, read from its file once."""
    with safe_open(layout.source, framework="pt") as handle:
        for module_name, module in layout.modules.items():
            yield module_name, handle.get_tensor(module.key_a), handle.get_tensor(module.key_b)


def write_adapter(layout: AdapterLayout, directory: str, base_model_name_or_path: str | None,
                  tensors: dict[str, torch.Tensor] | None) -> tuple[str, bool]:
    """Write the adapter as a PEFT folder; returns (weights path, whether the source file was copied).

    If its source file is unchanged since it was inspected, the file is copied (bit-identical, no
    re-serialisation); otherwise `tensors` (key -> tensor, in the file's keys) are saved in the file's dtype.
    """
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    copied = _unchanged(layout.source, layout.source_stat)
    if copied:
        if not (os.path.exists(target) and os.path.samefile(layout.source, target)):
            shutil.copyfile(layout.source, target)
    else:
        if tensors is None:
            raise AdapterError(f"Adapter {layout.name!r}: its source file {layout.source} changed or vanished and no "
                               "weights were given to write.")
        save_file({k: v.detach().to("cpu", layout.dtype).contiguous() for k, v in tensors.items()}, target,
                  metadata={"format": "pt"})
    config = layout.config
    previous = (config.base_model_name_or_path, config.inference_mode)
    config.base_model_name_or_path, config.inference_mode = base_model_name_or_path, True
    try:
        config.save_pretrained(directory)
    finally:
        config.base_model_name_or_path, config.inference_mode = previous
    return target, copied


def _unchanged(path: str, stat: tuple[int, int]) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_size, now.st_mtime_ns) == stat
