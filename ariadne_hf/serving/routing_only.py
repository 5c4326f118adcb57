"""Router-only loading for gateway mode: tokenizer + the backbone's input-embedding table + the router.

Nothing else of the backbone is loaded: the embedding table is one tensor read with `safetensors.safe_open` from
the backbone's checkpoint (local folder, the bundle's `base/`, or the Hub id at its pinned revision through the
cache), and no adapter is loaded. The table is checked against the bundle exactly as a full load checks it
(`bundle.check_backbone_matches`: shape and fingerprint), so routes equal `AriadneRoutedModel.route`'s.

How the tensor's key is found: the backbone's config is instantiated as a model on the *meta* device (no memory, no
weights), and the name of the parameter behind `get_input_embeddings()` is taken from it (e.g.
`model.embed_tokens.weight` for Llama, `transformer.wte.weight` for GPT-2). The checkpoint's keys (from
`model.safetensors.index.json` when sharded) are searched for that name, then for it without/with the
architecture's `base_model_prefix`, then for a unique key ending in the same two components with shape [V, D].
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from ..bundle.errors import BundleError
from ..bundle.local_io import check_backbone_matches, read_bundle, resolve_bundle_directory
from ..constants import (
    BASE_DIR,
    ROUTER_CENTER,
    ROUTER_CENTROID_ADAPTER,
    ROUTER_CENTROIDS,
    ROUTER_TOKEN_WEIGHTS,
    ROUTER_TRANSFORM,
)
from ..routing.inputs import validate_token_ids
from ..routing.router import AriadneRouter, RoutingDecision, strip_template

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_UNSET = object()


class RoutingOnlyModel:
    """Routes like `AriadneRoutedModel.route`, holding only the tokenizer, embedding table [V, D] and router."""

    def __init__(self, config, tokenizer, embed_weight: torch.Tensor, router: AriadneRouter):
        self.config, self.tokenizer, self.embed_weight, self.router = config, tokenizer, embed_weight, router

    @property
    def adapter_names(self) -> list[str]:
        return list(self.config.adapter_names)

    @torch.no_grad()
    def route(self, prompts: str | list[str] | None = None, *, input_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, reject_threshold=_UNSET) -> RoutingDecision:
        """Same contract as AriadneRoutedModel.route (strings, or ids [B, T] + mask [B, T])."""
        if prompts is not None:
            batch = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts), padding=True,
                                   return_tensors="pt")
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        input_ids, attention_mask = validate_token_ids(input_ids, attention_mask, self.config.embedding_vocab_size)
        prefix, suffix = self.config.template_prefix_ids or [], self.config.template_suffix_ids or []
        if prefix or suffix:
            attention_mask = strip_template(input_ids, attention_mask, prefix, suffix)
        scores, best = self.router.score(input_ids, attention_mask, self.embed_weight,
                                         backend=self.config.kernel_backend)
        threshold = self.config.reject_threshold if reject_threshold is _UNSET else reject_threshold
        return self.router.decide(scores, best, threshold)


def load_routing_only(bundle: str, *, revision: str | None = None, token: str | None = None) -> RoutingOnlyModel:
    """Read a bundle's router and tokenizer and its backbone's embedding table (no model, no adapters)."""
    from transformers import AutoTokenizer

    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v}
    directory = resolve_bundle_directory(os.fspath(bundle), hub)
    config, tables = read_bundle(directory)
    if config.backbone_name_or_path == BASE_DIR:
        reference, backbone_revision = os.path.join(directory, BASE_DIR), None
    else:
        reference, backbone_revision = config.backbone_name_or_path, config.backbone_revision
    embed_weight = read_input_embeddings(reference, backbone_revision, token=token)
    check_backbone_matches(config, embed_weight, f"Bundle {directory}")
    router = AriadneRouter(config.adapter_names, config.embedding_dim, config.distance)
    router.set_tables(tables[ROUTER_CENTROIDS], tables[ROUTER_CENTROID_ADAPTER], tables.get(ROUTER_CENTER),
                      tables.get(ROUTER_TOKEN_WEIGHTS), tables.get(ROUTER_TRANSFORM))
    return RoutingOnlyModel(config, AutoTokenizer.from_pretrained(directory), embed_weight, router)


def _fetch(reference: str, filename: str, revision: str | None, token: str | None) -> str | None:
    """Path of one backbone file (local folder or Hub cache/download), None if the backbone has no such file."""
    if os.path.isdir(reference):
        path = os.path.join(reference, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(reference, filename, revision=revision, token=token)
    except EntryNotFoundError:
        return None


def embedding_parameter_name(config) -> tuple[str, str]:
    """(parameter name of get_input_embeddings().weight, base_model_prefix) of the architecture, on meta."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weight = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if param is weight:
            return name, getattr(model, "base_model_prefix", "") or ""
    raise BundleError(f"Cannot find the input embedding parameter of {type(model).__name__}.")


def read_input_embeddings(reference: str, revision: str | None, *, token: str | None = None) -> torch.Tensor:
    """The backbone's input embedding table [V, D], read as one tensor from its safetensors checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(reference, revision=revision, token=token)
    name, prefix = embedding_parameter_name(config)
    index_path = _fetch(reference, SAFE_INDEX, revision, token)
    if index_path is not None:  # sharded: the index maps each tensor to its shard
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        key = _match_key(name, prefix, list(weight_map))
        path = os.path.join(os.path.dirname(index_path), weight_map[key])
        if not os.path.isfile(path):
            path = _fetch(reference, weight_map[key], revision, token)
    else:
        path = _fetch(reference, SAFE_WEIGHTS, revision, token)
        if path is None:
            raise BundleError(f"Backbone {reference!r} has no {SAFE_WEIGHTS} or {SAFE_INDEX}: gateway mode reads the "
                              "embedding table from safetensors only. Re-save the backbone with save_pretrained.")
        with safe_open(path, framework="pt") as handle:
            key = _match_key(name, prefix, list(handle.keys()))
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor(key)  # [V, D], the checkpoint's dtype


def _match_key(name: str, prefix: str, keys: list[str]) -> str:
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        if candidate in keys:
            return candidate
    tail = ".".join(name.split(".")[-2:])
    matches = [k for k in keys if k == tail or k.endswith("." + tail)]
    if len(matches) == 1:
        return matches[0]
    raise BundleError(f"The backbone checkpoint has no tensor for the input embeddings {name!r} (looked for "
                      f"{candidates} and keys ending in {tail!r}; found {matches or 'none'}).")
