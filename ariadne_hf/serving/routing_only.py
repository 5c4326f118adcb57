"""Router-only loading for gateway mode, the Ray ingress and the vLLM middleware: tokenizer + what the routing
signal needs of the backbone + the router (ood tables included).

Nothing else of the backbone is loaded, and no adapter. What the signal needs (`config.routing_layer`, see
`routing.signal`): for routing_layer 0 the input-embedding table alone, one tensor read with `safetensors.safe_open`;
for k > 0 the table plus exactly the tensors of the first k decoder layers, assembled into a base decoder built from
the backbone's config truncated to k layers (the final norm it allocates is never run: the pass stops after layer
k). Tensors come from the backbone's checkpoint (local folder, the bundle's `base/`, or the Hub id at its pinned
revision through the cache). The table is checked against the bundle exactly as a full load checks it
(`bundle.check_backbone_matches`: shape and fingerprint), and routing goes through the same function as the full
model (`routing.route.route_decision`), so decisions, rejections included, equal `AriadneRoutedModel.route`'s.

How tensor keys are found: the backbone's config is instantiated as a model on the *meta* device (no memory, no
weights), and the name of the parameter behind `get_input_embeddings()` is taken from it (e.g.
`model.embed_tokens.weight` for Llama, `transformer.wte.weight` for GPT-2). The checkpoint's keys (from
`model.safetensors.index.json` when sharded) are searched for that name, then for it without/with the
architecture's `base_model_prefix`, then for a unique key ending in the same two components with shape [V, D]. A
decoder layer's tensors are its parameter names under the decoder, with the same prefix rules.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors import safe_open

from ..bundle.errors import BundleError
from ..bundle.local_io import check_backbone_matches, read_bundle, resolve_bundle_directory
from ..constants import BASE_DIR, UNSET
from ..routing.inputs import prompt_ids
from ..routing.route import route_decision, router_from_tensors
from ..routing.router import AriadneRouter, RoutingDecision
from ..routing.signal import HiddenStateSignal, RoutingSignal, decoder_layers, text_config

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class RoutingOnlyModel:
    """Routes like `AriadneRoutedModel.route`, holding only the tokenizer, the signal's backbone part and the router.

    `signal_bytes` is the memory of the backbone tensors held (the embedding table, plus the first k decoder
    layers for routing_layer k > 0)."""

    def __init__(self, config, tokenizer, embed_weight: torch.Tensor, router: AriadneRouter,
                 signal: RoutingSignal | None = None, signal_bytes: int | None = None):
        self.config, self.tokenizer, self.embed_weight, self.router = config, tokenizer, embed_weight, router
        self.signal = signal if signal is not None else RoutingSignal(embed_weight)
        self.signal_bytes = (embed_weight.numel() * embed_weight.element_size()) if signal_bytes is None else signal_bytes

    @property
    def adapter_names(self) -> list[str]:
        return list(self.config.adapter_names)

    @torch.no_grad()
    def route(self, prompts: str | list[str] | None = None, *, input_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, reject_threshold=UNSET, reject=UNSET) -> RoutingDecision:
        """Same contract as AriadneRoutedModel.route (strings, or ids [B, T] + mask [B, T]); `reject_threshold` and
        `reject` default to the bundle's config (so `reject="auto"` bundles reject here as they do locally)."""
        input_ids, attention_mask = prompt_ids(self.tokenizer, prompts, input_ids, attention_mask)
        return route_decision(
            self.config, self.router, self.signal, input_ids, attention_mask,
            threshold=self.config.reject_threshold if reject_threshold is UNSET else reject_threshold,
            reject=self.config.reject if reject is UNSET else reject)


def load_routing_only(bundle: str, *, revision: str | None = None, token: str | None = None) -> RoutingOnlyModel:
    """Read a bundle's router (ood tables included) and tokenizer, and the part of its backbone the routing signal
    needs (the embedding table; plus the first `routing_layer` decoder layers). No full model, no adapters."""
    from transformers import AutoTokenizer

    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v}
    directory = resolve_bundle_directory(os.fspath(bundle), hub)
    config, tables = read_bundle(directory)
    if config.backbone_name_or_path == BASE_DIR:
        reference, backbone_revision = os.path.join(directory, BASE_DIR), None
    else:
        reference, backbone_revision = config.backbone_name_or_path, config.backbone_revision
    layer = int(getattr(config, "routing_layer", 0) or 0)
    if layer:
        embed_weight, decoder, nbytes = read_decoder_trunk(reference, backbone_revision, layer, token=token)
        signal = RoutingSignal(embed_weight, HiddenStateSignal(decoder, layer))
    else:
        embed_weight = read_input_embeddings(reference, backbone_revision, token=token)
        signal, nbytes = RoutingSignal(embed_weight), embed_weight.numel() * embed_weight.element_size()
    check_backbone_matches(config, embed_weight, f"Bundle {directory}")
    router = router_from_tensors(config, tables)
    return RoutingOnlyModel(config, AutoTokenizer.from_pretrained(directory), embed_weight, router, signal, nbytes)


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


def _checkpoint(reference: str, revision: str | None, token: str | None):
    """(checkpoint keys, key -> local file path) of the backbone's safetensors (sharded or single)."""
    index_path = _fetch(reference, SAFE_INDEX, revision, token)
    if index_path is not None:  # sharded: the index maps each tensor to its shard
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]

        def path_of(key: str) -> str:
            path = os.path.join(os.path.dirname(index_path), weight_map[key])
            return path if os.path.isfile(path) else _fetch(reference, weight_map[key], revision, token)

        return list(weight_map), path_of
    path = _fetch(reference, SAFE_WEIGHTS, revision, token)
    if path is None:
        raise BundleError(f"Backbone {reference!r} has no {SAFE_WEIGHTS} or {SAFE_INDEX}: router-only loading reads the "
                          "backbone's tensors from safetensors only. Re-save the backbone with save_pretrained.")
    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
    return keys, lambda _key: path


def _read_tensors(keys: list[str], path_of) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(path_of(key), []).append(key)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for name in names:
                out[name] = handle.get_tensor(name)
    return out


def read_input_embeddings(reference: str, revision: str | None, *, token: str | None = None) -> torch.Tensor:
    """The backbone's input embedding table [V, D], read as one tensor from its safetensors checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(reference, revision=revision, token=token)
    name, prefix = embedding_parameter_name(config)
    keys, path_of = _checkpoint(reference, revision, token)
    key = _match_key(name, prefix, keys)
    return _read_tensors([key], path_of)[key]  # [V, D], the checkpoint's dtype


def read_decoder_trunk(reference: str, revision: str | None, layers: int, *,
                       token: str | None = None) -> tuple[torch.Tensor, torch.nn.Module, int]:
    """(embedding table [V, D], base decoder holding the first `layers` decoder layers, bytes read) from the
    backbone's safetensors: exactly the table and those layers' tensors are read (checkpoint dtype; the decoder's
    other tensors are cast to it). The decoder is the architecture's base model (`AutoModel`) built from its config
    truncated to `layers` layers with a 1-row placeholder table, then given the real table and layers."""
    from transformers import AutoConfig, AutoModel
    from transformers.initialization import no_init_weights

    full = AutoConfig.from_pretrained(reference, revision=revision, token=token)
    embed_name, prefix = embedding_parameter_name(full)
    total = int(text_config(full).num_hidden_layers)
    if not 0 < layers < total:
        raise BundleError(f"routing_layer={layers} is outside the backbone's {total} decoder layers.")
    trunk_config = copy.deepcopy(text_config(full))
    trunk_config.num_hidden_layers = layers
    if isinstance(getattr(trunk_config, "layer_types", None), list):
        trunk_config.layer_types = trunk_config.layer_types[:layers]
    trunk_config.vocab_size, trunk_config.pad_token_id = 1, None
    with no_init_weights():
        decoder = AutoModel.from_config(trunk_config)
    decoder.eval()
    layer_list = decoder_layers(decoder)
    layer_prefix = next(n for n, m in decoder.named_modules() if m is layer_list)
    keys, path_of = _checkpoint(reference, revision, token)
    embed_key = _match_key(embed_name, prefix, keys)
    wanted = {name: _match_key(name, prefix, keys) for name, _ in decoder.named_parameters()
              if name.startswith(layer_prefix + ".")}
    tensors = _read_tensors([embed_key, *wanted.values()], path_of)
    table = tensors[embed_key]  # [V, D]
    embedding = decoder.get_input_embeddings()
    embedding.weight = torch.nn.Parameter(table, requires_grad=False)
    embedding.num_embeddings = int(table.shape[0])
    decoder.to(table.dtype)
    missing = decoder.load_state_dict({name: tensors[key] for name, key in wanted.items()}, strict=False, assign=True)
    if missing.unexpected_keys:
        raise BundleError(f"Backbone {reference!r}: unexpected decoder tensors {missing.unexpected_keys[:4]}.")
    decoder.requires_grad_(False)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return embedding.weight, decoder, nbytes


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
