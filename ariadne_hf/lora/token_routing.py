"""Token-level routing while decoding: the running context embedding, re-scored on schedule, gives each step's gate.

Pre-gating (AdaFuse): the backbone's forward pre-hook calls `TokenRoutingPlan.begin_forward` once per decoding
step, before any layer. It folds the newest token into each row's running embedding sum (O(D) per row) and,
every `reroute_every` tokens, re-scores the context and recomputes the top-k softmax weights; the resulting
`LoraGate` is what every routed LoRA layer reads. Each position keeps the gate that was in force when its token
was fed, so generation with and without a KV cache computes exactly the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels import incremental_pool_distance
from ..kernels.pool_distance_torch import incremental_pool_update_ref
from .gate import GateFactory, LoraGate


def mixture_from_scores(
    scores: torch.Tensor, top_k: int, temperature: float, reject_threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-routing gate: softmax over each row's top-k scores / temperature.

    scores [B, A] -> (indices [B, k] int64, weights [B, k] fp32). Rows with no routable token, and rows whose
    best score is under `reject_threshold`, get index -1 and weight 0 everywhere (the plain backbone).
    """
    k = min(top_k, scores.shape[-1])
    values, indices = scores.float().topk(k, dim=-1)  # [B, k]
    weights = F.softmax(values / temperature, dim=-1)
    dead = ~torch.isfinite(values[:, :1]).squeeze(-1)  # [B] empty rows (-inf scores)
    if reject_threshold is not None:
        dead = dead | (values[:, 0] < reject_threshold)
    weights = torch.where(dead.unsqueeze(-1), torch.zeros_like(weights), weights.nan_to_num(0.0))
    indices = torch.where(dead.unsqueeze(-1), torch.full_like(indices, -1), indices)
    return indices, weights


@dataclass
class TokenRouteTrace:
    """Routes of one token-routed call: at each reroute, the generated-token index and each row's top-k.

    `steps[i]` is how many new tokens the context held at the i-th decision (0 = the prompt alone);
    `indices[i]` [B', k] and `weights[i]` [B', k] (B' = rows after num_return_sequences expansion).
    """

    adapter_order: list[str]
    steps: list[int] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)

    def record(self, step: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.steps.append(step)
        self.indices.append(indices.detach().cpu().clone())
        self.weights.append(weights.detach().cpu().clone())


def _expand_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if rows % tensor.shape[0]:
        raise RuntimeError(f"ariadne_hf: the backbone received {rows} rows but this call routed {tensor.shape[0]}; "
                           "rows must be expanded contiguously (as generate does for num_return_sequences).")
    return tensor.repeat_interleave(rows // tensor.shape[0], dim=0)


class SlotResolver:
    """Adapter indices -> slot indices for one call, pinning adapters as the call first needs them.

    With every adapter resident (the default) slots are adapter indices and nothing is pinned. With resident
    slots (`max_resident_adapters`), a re-routing step that picks a non-resident adapter loads it then (one host
    read of the new top-k per re-routing step, never per layer)."""

    def __init__(self, bank, device: torch.device, kernel_backend: str | None):
        self.bank, self.device, self.kernel_backend = bank, device, kernel_backend
        self.acquired: set[int] = set()

    def resolve(self, indices: torch.Tensor) -> tuple[torch.Tensor, GateFactory]:
        """indices [G, k] adapter indices (-1 = none) -> (slot indices [G, k], the gate factory to use)."""
        if not self.bank.slots.unlimited:
            needed = set(indices[indices >= 0].tolist()) - self.acquired
            if needed:
                self.bank.acquire(needed)
                self.acquired |= needed
            table = self.bank.slot_table(indices.device)  # [A]
            indices = torch.where(indices >= 0, table[indices.clamp(min=0)], torch.full_like(indices, -1))
        return indices, self.bank.factory(self.device, self.kernel_backend)

    def release(self) -> None:
        self.bank.release(self.acquired)
        self.acquired = set()


class TokenRoutingPlan:
    """The per-call state of token-level routing (owned by one generate call; never shared)."""

    def __init__(self, slots: SlotResolver, router, embed_weight, running_sum, running_weight, scores, *,
                 reroute_every: int, top_k: int, temperature: float, reject_threshold: float | None,
                 backend: str | None):
        self.slots = slots
        self.router = router
        self.embed_weight = embed_weight  # [V, D]
        self.running_sum = running_sum  # [B, D] fp32
        self.running_weight = running_weight  # [B] fp32
        self.reroute_every, self.top_k, self.temperature = reroute_every, top_k, temperature
        self.reject_threshold, self.backend = reject_threshold, backend
        self.calls = 0
        self.generated = 0
        self.prompt_len = 0
        self.trace = TokenRouteTrace(list(router.adapter_names))
        self.topk_indices, self.topk_weights = self._weights_from(scores)  # [B, k] each
        self.prompt_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.position_weights: list[tuple[torch.Tensor, torch.Tensor]] = []  # the gate of each generated token
        self._set_gate(self.topk_indices, self.topk_weights, 1)

    def _weights_from(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices, weights = mixture_from_scores(scores, self.top_k, self.temperature, self.reject_threshold)
        self.trace.record(self.generated, indices, weights)
        return indices, weights

    def begin_forward(self, input_ids: torch.Tensor | None, rows: int, tokens: int) -> None:
        """Pre-gating, once per forward of the backbone: fold in the newest token, re-score on schedule, and set
        the gate. With a KV cache a step feeds one token (the current gate, [B, k]); without a cache every step
        re-feeds the whole sequence and the gate is per position: the prompt's gate on prompt positions, then each
        generated token's own gate."""
        if input_ids is None:
            raise ValueError("Token-level routing needs input_ids in every forward (inputs_embeds is not supported).")
        self.calls += 1
        if self.calls == 1:  # the prompt (prefill): already pooled; expand rows for num_return_sequences
            if rows != self.running_sum.shape[0]:
                self.running_sum = _expand_rows(self.running_sum, rows).clone()
                self.running_weight = _expand_rows(self.running_weight, rows).clone()
                self.topk_indices = _expand_rows(self.topk_indices, rows)
                self.topk_weights = _expand_rows(self.topk_weights, rows)
            self.prompt_len = tokens
            self.prompt_weights = (self.topk_indices, self.topk_weights)
            self._set_gate(self.topk_indices, self.topk_weights, tokens)
            return
        if rows != self.running_sum.shape[0]:
            raise ValueError("Token-level routing does not support beam search (num_beams > 1): beams are "
                             "reordered every step. Use greedy decoding or sampling.")
        self.generated += 1
        rerouted = False
        if self.reroute_every:
            rerouted = self._fold_in(input_ids[:, -1].to(self.embed_weight.device))  # [B]
        self.position_weights.append((self.topk_indices, self.topk_weights))
        if tokens == 1:
            if rerouted or self._gate_tokens != 1 or self.gate.per_token:
                self._set_gate(self.topk_indices, self.topk_weights, 1)
            return
        if tokens != self.prompt_len + len(self.position_weights):
            raise RuntimeError(f"ariadne_hf: token routing got {tokens} positions; expected 1 (KV cache) or the "
                               f"whole sequence ({self.prompt_len + len(self.position_weights)}).")
        prompt_idx, prompt_w = self.prompt_weights
        idx = torch.cat([prompt_idx.unsqueeze(1).expand(-1, self.prompt_len, -1),
                         torch.stack([g[0] for g in self.position_weights], dim=1)], dim=1)  # [B, T, k]
        w = torch.cat([prompt_w.unsqueeze(1).expand(-1, self.prompt_len, -1),
                       torch.stack([g[1] for g in self.position_weights], dim=1)], dim=1)  # [B, T, k]
        self._set_gate(idx.reshape(rows * tokens, -1), w.reshape(rows * tokens, -1), tokens, per_token=True)

    def _set_gate(self, indices: torch.Tensor, weights: torch.Tensor, tokens: int, per_token: bool = False) -> None:
        slots, factory = self.slots.resolve(indices)
        self.gate: LoraGate = factory.mixture(slots, weights, tokens=tokens, per_token=per_token)
        self._gate_tokens = tokens

    def release(self) -> None:
        """Unpin the adapters this call made resident (called when the call's plan is deactivated)."""
        self.slots.release()

    def _fold_in(self, newest: torch.Tensor) -> bool:
        """Add the newest token of every row to its running sum; re-score every `reroute_every` tokens.

        Returns whether the weights were recomputed."""
        router = self.router
        token_weights = router.optional_token_weights()
        if self.generated % self.reroute_every:
            incremental_pool_update_ref(newest, self.running_sum, self.running_weight, self.embed_weight,
                                        token_weights=token_weights)
            return False
        scores, _ = incremental_pool_distance(
            newest, self.running_sum, self.running_weight, self.embed_weight, router.centroids,
            router.centroid_adapter, len(router.adapter_names), center=router.optional_center(),
            token_weights=token_weights, transform=router.optional_transform(), distance=router.distance,
            backend=self.backend,
        )
        self.topk_indices, self.topk_weights = self._weights_from(scores)
        return True
