"""Assembling a model from files: a bundle into `AriadneRoutedModel` (`load_bundle`, behind `from_pretrained`) and
the backbone `from_adapters` builds on (`load_backbone_for_build`).

`bundle` reads, validates and writes the files; this module turns them into live objects. `load_bundle`'s order
guarantees that a broken bundle fails before any weight is loaded and that no half-built model is returned:
split the keyword arguments -> resolve the folder (local or Hub) -> `bundle.local_io.read_bundle` validates every
file -> run-time overrides -> the backbone, checked against the centroids' embedding table -> the LoRA bank from
the adapter folders -> the routers from the router tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .bundle.errors import AdapterError, BundleError
from .bundle.local_io import check_backbone_matches, pin_backbone, read_bundle, resolve_bundle_directory
from .configuration_ariadne import RUN_TIME_FIELDS, AriadneConfig, load_overrides, validate_routing_options
from .constants import ADAPTERS_DIR, BASE_DIR
from .lora import LoraBank
from .routing.route import router_from_tensors, token_router_from_tensors

HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
"""`from_pretrained` arguments that locate the bundle (a Hub download); token/cache_dir/local_files_only also reach
the backbone's own `from_pretrained`."""
BACKBONE_KEYS = ("device_map", "attn_implementation", "low_cpu_mem_usage", "max_memory", "offload_folder")
"""`from_pretrained` arguments passed on to the backbone's `from_pretrained`."""
IGNORED_KEYS = ("_from_auto", "_from_pipeline", "adapter_kwargs", "trust_remote_code", "use_safetensors", "subfolder",
                "proxies", "code_revision")
"""Arguments the Auto classes and pipelines pass that have no meaning for a bundle (safetensors is always used)."""


@dataclass
class LoadRequest:
    """The keyword arguments of one `from_pretrained`, sorted by who consumes them."""

    hub: dict[str, Any] = field(default_factory=dict)
    backbone: dict[str, Any] = field(default_factory=dict)
    run_time: dict[str, Any] = field(default_factory=dict)
    dtype: Any = None
    config: Any = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> LoadRequest:
        """Sort `kwargs` (consumed); raises TypeError naming any argument nobody accepts."""
        request = cls(hub={k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs},
                      backbone={k: kwargs.pop(k) for k in BACKBONE_KEYS if k in kwargs})
        request.dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        kwargs.pop("torch_dtype", None)
        request.config = kwargs.pop("config", None)
        attn = getattr(request.config, "_attn_implementation_internal", None)  # the Auto classes put
        if attn is not None:  # attn_implementation= on the config they pass: it belongs to the backbone
            request.backbone.setdefault("attn_implementation", attn)
        for ignored in IGNORED_KEYS:
            kwargs.pop(ignored, None)
        request.run_time = {key: kwargs.pop(key) for key in RUN_TIME_FIELDS if key in kwargs}
        if kwargs:
            raise TypeError(f"AriadneRoutedModel.from_pretrained got unexpected arguments {sorted(kwargs)}; it accepts "
                            f"hub/backbone loading options and the run-time config fields {list(RUN_TIME_FIELDS)}.")
        return request


def load_bundle(cls, name_or_path, **kwargs: Any):
    """Load a bundle folder or Hub repo into `cls` (AriadneRoutedModel), in the order of the module docstring."""
    request = LoadRequest.from_kwargs(kwargs)
    directory = resolve_bundle_directory(os.fspath(name_or_path), request.hub)
    config, tensors = read_bundle(directory)
    for key, value in load_overrides(config, request.config, request.run_time).items():
        setattr(config, key, value)
    validate_routing_options(config)
    from transformers import AutoTokenizer

    backbone = bundle_backbone(directory, config, request)
    lora = bundle_lora_bank(directory, config, backbone)
    model = cls(config, backbone=backbone, lora=lora, tokenizer=AutoTokenizer.from_pretrained(directory))
    device = backbone.get_input_embeddings().weight.device
    model.router = router_from_tensors(config, tensors).to(device)
    if config.routing_layer:  # token routing's input-embedding router
        embedding_router = token_router_from_tensors(config, tensors)
        model.embedding_router = None if embedding_router is None else embedding_router.to(device)
    model.eval()
    return model


def bundle_backbone(directory: str, config: AriadneConfig, request: LoadRequest):
    """The bundle's backbone (its base/ folder, or the pinned Hub id / path), loaded from safetensors and checked
    against the embedding table the centroids were computed in; BundleError when it cannot load or does not match."""
    from transformers import AutoModelForCausalLM

    if config.backbone_name_or_path == BASE_DIR:
        reference, revision = os.path.join(directory, BASE_DIR), None  # read_bundle checked its files
    else:
        reference, revision = config.backbone_name_or_path, config.backbone_revision
    shared = {k: v for k, v in request.hub.items() if k in ("token", "cache_dir", "local_files_only")}
    try:
        backbone = AutoModelForCausalLM.from_pretrained(
            reference, revision=revision, dtype=request.dtype, use_safetensors=True, **request.backbone, **shared)
    except OSError as err:
        raise BundleError(f"Bundle {directory}: could not load its backbone {reference!r} (revision {revision}): "
                          f"{err}") from err
    check_backbone_matches(config, backbone.get_input_embeddings().weight, f"Bundle {directory}")
    return backbone


def bundle_lora_bank(directory: str, config: AriadneConfig, backbone) -> LoraBank:
    """The LoRA bank of the bundle's adapters (every folder inspected against the backbone before any is loaded;
    the recorded sha256, which `read_bundle` verified, kept so that re-saving copies the files)."""
    lora = LoraBank(backbone, max_resident=config.max_resident_adapters)
    try:
        layouts = [lora.inspect(name, os.path.join(directory, ADAPTERS_DIR, name)) for name in config.adapter_names]
    except AdapterError as err:
        raise BundleError(f"Bundle {directory}: {err}") from err
    for layout in layouts:
        layout.sha256 = (config.adapters.get(layout.name) or {}).get("sha256")
    lora.add(layouts)
    return lora


def load_backbone_for_build(base_model, *, revision, dtype, device_map, token):
    """The backbone `from_adapters` builds on: (model, Hub id or absolute path to record, pinned revision).

    `base_model` is a PreTrainedModel (used as is), a Hub id or a local folder (loaded, safetensors only); a PeftModel
    is refused (adapters are passed separately)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(base_model, PreTrainedModel):
        name = getattr(base_model.config, "_name_or_path", "") or getattr(base_model, "name_or_path", "")
        backbone_id, pinned = pin_backbone(name, revision, token=token) if name else (None, None)
        return base_model, backbone_id, pinned
    if isinstance(base_model, PeftModel):
        raise AdapterError("Pass the plain backbone (not a PeftModel); adapters go in adapters={...}.")
    backbone_id, pinned = pin_backbone(os.fspath(base_model), revision, token=token)
    load_kwargs = {"revision": pinned, "dtype": dtype, "device_map": device_map, "use_safetensors": True}
    if token:
        load_kwargs["token"] = token
    backbone = AutoModelForCausalLM.from_pretrained(backbone_id, **load_kwargs)
    return backbone, backbone_id, pinned
