"""The routing signal: what a prompt is pooled from before it is scored against the centroids.

``routing_layer = 0`` (the paper's space): the weighted mean of the prompt's input-embedding rows (the fused
`embed_pool_distance` kernel does the lookup, pooling and scoring in one pass).

``routing_layer = k > 0``: the weighted mean of the backbone's hidden state after decoder layer k, computed with the
base weights only. Semantics, for a row with token ids ``ids[t]`` and routing weights ``w[t]`` (mask x special-token
weights x chat-template strip, exactly the weights of the k = 0 signal):

    kept       = the positions with w[t] > 0, in order (the routable tokens)
    h          = layers[0..k-1](embed(ids[kept]))           a fresh causal pass over the routable tokens alone,
                                                             positions 0..n-1, no LoRA, no cache
    pooled     = sum_j w[kept_j] h[j] / sum_j w[kept_j]       fp32

Running the layers on the routable tokens alone (the batch is compacted, right-padded) makes the signal independent
of padding side, of the chat template around the message and of special tokens, as the k = 0 signal is. The pass
stops right after layer k (a forward hook raises `_StopAfterLayer`), so nothing past layer k runs. The pass runs
inside the signal's `base_weights()` context: a model with routed LoRA layers passes `lora.plans.base_weights_only`
(no plan active: every routed layer's output is exactly its base layer's); a plain decoder needs none. This module
knows nothing of LoRA (routing sits below lora in the package's layers, docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable

import torch
from torch import nn


class _StopAfterLayer(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the hook on layer k to end the base pass there; carries that layer's hidden state."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def text_config(config):
    """The text (decoder) config of a possibly multimodal config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def decoder_of(backbone: nn.Module) -> nn.Module:
    """The backbone's base decoder (the module that embeds and runs the layers, without the LM head)."""
    prefix = getattr(backbone, "base_model_prefix", "") or ""
    inner = getattr(backbone, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else backbone


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer layers: its ModuleList child (searched one level deep as well) whose length
    is `num_hidden_layers`. Raises ValueError naming the architecture when there is none or several."""
    count = int(getattr(text_config(decoder.config), "num_hidden_layers", -1))
    found = [m for _, m in decoder.named_children() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not found:
        for _, child in decoder.named_children():
            found += [m for _, m in child.named_children() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(f"Cannot find the decoder layers of {type(decoder).__name__} (a ModuleList of "
                         f"num_hidden_layers={count} modules; found {len(found)}): routing_layer > 0 is not supported "
                         "for this architecture. Use routing_layer=0.")
    return found[0]


AUTO_DEPTH = 8 / 30
"""`routing_layer="auto"`: the state after the first 8/30 of the decoder layers (layer 8 of SmolLM2-135M's 30, the
depth measured in docs/routing_quality.md: best selection and rejection of k in {0, 1, 2, 4, 8} on leave-whole-tasks-out
splits of routing-dev, routing cost 20% of a routed batch-8 prefill and 6% of a 32-token generate)."""
AUTO_MIN_LAYERS = 12
"""Backbones with fewer decoder layers keep the input embedding under "auto" (nothing measured there)."""


def auto_routing_layer(num_layers: int) -> int:
    """The routing layer `routing_layer="auto"` picks for a backbone of `num_layers` decoder layers."""
    return round(num_layers * AUTO_DEPTH) if num_layers >= AUTO_MIN_LAYERS else 0


def check_routing_layer(routing_layer, num_layers: int | None) -> int:
    """`routing_layer` as an int in [0, num_layers) (a clear error otherwise)."""
    if isinstance(routing_layer, bool) or not isinstance(routing_layer, int) or routing_layer < 0:
        raise ValueError(f"routing_layer must be an integer >= 0 (0 = the input embedding), got {routing_layer!r}.")
    if num_layers is not None and routing_layer >= num_layers:
        raise ValueError(f"routing_layer={routing_layer} must be below the backbone's {num_layers} layers "
                         "(the state after the last layer is the LM head's input, not a routing signal).")
    return routing_layer


def compact(input_ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routable tokens of each row moved to the front: (ids [B, n], mask [B, n], weights [B, n]) right-padded,
    n = the most routable tokens of any row (>= 1). Rows without any get one masked-in dummy token of weight 0
    (so no row is fully masked inside attention); their pooled weight sum stays 0 ("empty")."""
    keep = weights > 0  # [B, T]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # [B, T] kept positions first, in order
    width = max(1, int(keep.sum(dim=1).max()) if keep.numel() else 1)
    order = order[:, :width]
    ids = input_ids.gather(1, order)  # [B, n]
    mask = keep.gather(1, order)  # [B, n]
    w = torch.where(mask, weights.gather(1, order), torch.zeros_like(weights[:, :width]))  # [B, n]
    mask[:, 0] = True  # the dummy token of empty rows (weight 0)
    return ids, mask.to(torch.long), w


BaseWeights = Callable[[], contextlib.AbstractContextManager]
"""A context-manager factory inside which the decoder computes with its base weights only."""


class HiddenStateSignal:
    """The k > 0 signal over one backbone's base decoder (see the module docstring).

    Holds the stop hook on layer k by its handle; the hook is removed when the signal is garbage collected (it is
    inert outside this signal's passes, so other forwards through the layer are unaffected meanwhile)."""

    def __init__(self, decoder: nn.Module, layer: int, *, base_weights: BaseWeights = contextlib.nullcontext):
        self.decoder = decoder
        self.layer = check_routing_layer(layer, None)
        layers = decoder_layers(decoder)
        check_routing_layer(layer, len(layers) + 1)
        if layer == 0:
            raise ValueError("HiddenStateSignal needs routing_layer >= 1 (0 is the input-embedding signal).")
        self.base_weights = base_weights
        self._target = layers[layer - 1]
        handle = self._target.register_forward_hook(_stop_hook)
        weakref.finalize(self, handle.remove)

    @torch.no_grad()
    def pooled(self, input_ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T], routing weights [B, T] -> (pooled state [B, D] fp32, weight sums [B] fp32; 0 = empty row)."""
        device = next(self.decoder.parameters()).device
        ids, mask, w = compact(input_ids.to(device), weights.to(device=device, dtype=torch.float32))
        hidden = self.hidden(ids, mask)  # [B, n, D]
        total = w.sum(dim=1)  # [B]
        pooled = (hidden.float() * w.unsqueeze(-1)).sum(dim=1) / total.clamp_min(1e-12).unsqueeze(-1)  # [B, D]
        return pooled, total

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The base-weights hidden state after layer k of right-padded ids [B, n] with mask [B, n]: [B, n, D]."""
        stop = _STOP_AT.set(self._target)
        try:
            with self.base_weights():
                self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        except _StopAfterLayer as stopped:
            return stopped.hidden
        finally:
            _STOP_AT.reset(stop)
        raise RuntimeError(f"{type(self.decoder).__name__} ran without reaching layer {self.layer}.")


_STOP_AT: contextvars.ContextVar = contextvars.ContextVar("ariadne_stop_after_layer", default=None)
"""The layer whose output ends the current context's pass (None: no routing pass in this context). A context
variable, so a routing pass never stops another thread's or task's forward through the same layer."""


def _stop_hook(module: nn.Module, _args, output):
    if _STOP_AT.get() is module:
        raise _StopAfterLayer(output[0] if isinstance(output, tuple) else output)
    return None


class RoutingSignal:
    """What a router pools prompts from: the embedding table [V, D] (always: the k = 0 signal, token routing and the
    ood token components read token ids only) and, for k > 0, the base hidden-state pass of `HiddenStateSignal`.

    One object per model (or router-only model); `pooled` is the build-time and run-time definition of the signal.
    """

    def __init__(self, embed_weight: torch.Tensor, hidden: HiddenStateSignal | None = None):
        self.embed_weight, self.hidden = embed_weight, hidden

    @property
    def layer(self) -> int:
        return 0 if self.hidden is None else self.hidden.layer

    @torch.no_grad()
    def pooled(self, input_ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T], routing weights [B, T] -> (pooled [B, D] fp32, weight sums [B] fp32; 0 = no routable token)."""
        if self.hidden is not None:
            return self.hidden.pooled(input_ids, weights)
        device = self.embed_weight.device
        weights = weights.to(device=device, dtype=torch.float32)  # [B, T]
        safe = torch.where(weights > 0, input_ids.to(device), torch.zeros_like(input_ids, device=device)).long()
        total = weights.sum(dim=1)  # [B]
        summed = (self.embed_weight[safe].float() * weights.unsqueeze(-1)).sum(dim=1)  # [B, D]
        return summed / total.clamp_min(1e-12).unsqueeze(-1), total


def signal_for(backbone: nn.Module, routing_layer: int, *,
               base_weights: BaseWeights = contextlib.nullcontext) -> RoutingSignal:
    """The routing signal of a full backbone (a causal LM) at `routing_layer`; `base_weights` as `HiddenStateSignal`'s
    (pass `lora.plans.base_weights_only` when the backbone holds routed LoRA layers)."""
    embed_weight = backbone.get_input_embeddings().weight.detach()
    if not routing_layer:
        return RoutingSignal(embed_weight)
    return RoutingSignal(embed_weight, HiddenStateSignal(decoder_of(backbone), routing_layer, base_weights=base_weights))
