"""Weighted LoRA mixing per row (the stacked path) and token-level routing while decoding.

Every LoRA-targeted linear computes ``W x + sum_j w[b,j] * scale_a * B_a (A_a x)`` with a = idx[b, j]: an exact
weighted sum of the adapters' deltas (PEFT's ``add_weighted_adapter(..., "linear")`` mixes A and B separately
and is not this). The weights come from a per-call plan in a context variable (see lora_dispatch):

- `MixturePlan`: fixed per-row top-k adapters and weights (sequence routing on the stacked path, or a caller's
  `adapter_weights`).
- `TokenRoutingState`: pre-gating for token-level routing. A hook on the backbone runs once per decoding step,
  before any layer: it folds the newest token into each row's running embedding sum (O(D) per row) and, every
  `reroute_every` tokens, re-scores the context and recomputes the weights that every LoRA layer then reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from .constants import BASE_ADAPTER
from .kernels import dense_to_topk, incremental_pool_distance, mixture_lora
from .kernels.reference import incremental_pool_update_ref


def _expand_rows(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    rows = tensor.shape[0]
    if rows == batch_size:
        return tensor
    if rows == 0 or batch_size % rows:
        raise RuntimeError(
            f"ariadne_hf: a layer received {batch_size} rows but this call routed {rows}; rows must be expanded "
            "contiguously (as generate does for num_return_sequences)."
        )
    return tensor.repeat_interleave(batch_size // rows, dim=0)


@dataclass
class MixturePlan:
    """Per-row mixture: `topk_indices` [B, k] int64 (-1 = no adapter) and `topk_weights` [B, k] fp32."""

    topk_indices: torch.Tensor
    topk_weights: torch.Tensor
    adapter_order: tuple[str, ...]

    def names_for(self, batch_size: int) -> list[str]:
        """PEFT computes only the base layer; the mixture delta is added by our forward hook."""
        return [BASE_ADAPTER] * batch_size

    def mixture_for(self, batch_size: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates for a layer input of [batch_size, tokens]: [B, k] each (the same for every token)."""
        return _expand_rows(self.topk_indices, batch_size), _expand_rows(self.topk_weights, batch_size)

    @classmethod
    def one_hot(cls, adapter_indices: torch.Tensor, adapter_order: list[str]) -> MixturePlan:
        """Sequence routing on the stacked path: each row's adapter with weight 1 (-1 = base)."""
        indices = adapter_indices.to(torch.int64).reshape(-1, 1)  # [B, 1]
        return cls(indices, (indices >= 0).to(torch.float32), tuple(adapter_order))

    @classmethod
    def from_dense(cls, weights: torch.Tensor, adapter_order: list[str]) -> MixturePlan:
        """A caller's per-row weights [B, A] (non-negative, rows summing to 1); zero entries are skipped."""
        k = max(1, int((weights > 0).sum(dim=-1).max()))
        indices, values = dense_to_topk(weights.to(torch.float32), k)
        return cls(indices, values, tuple(adapter_order))


def validate_adapter_weights(weights, batch_size: int, num_adapters: int) -> torch.Tensor:
    """Check a caller's mixture [B, A]: float, finite, >= 0, rows summing to 1 (or all zero = plain backbone)."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise ValueError("adapter_weights must be a float tensor [B, A] (one row of adapter weights per prompt).")
    if weights.shape != (batch_size, num_adapters):
        raise ValueError(
            f"adapter_weights has shape {tuple(weights.shape)}, expected [B={batch_size}, A={num_adapters}] "
            "(columns in model.adapter_names order)."
        )
    weights = weights.detach().to(torch.float32).cpu()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("adapter_weights must be finite and non-negative.")
    sums = weights.sum(dim=-1)
    bad = ~(((sums - 1).abs() <= 1e-4) | (sums == 0))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"adapter_weights row {row} sums to {float(sums[row]):.4f}; each row must sum to 1 "
                         "(or be all zero for the plain backbone).")
    return weights


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

    def names_at(self, i: int) -> list[list[tuple[str, float]]]:
        """Readable form of decision i: per row, [(adapter, weight), ...] (weight-0 entries dropped)."""
        rows = []
        for idx_row, w_row in zip(self.indices[i].tolist(), self.weights[i].tolist(), strict=True):
            rows.append([(self.adapter_order[a], w) for a, w in zip(idx_row, w_row, strict=True) if a >= 0 and w > 0])
        return rows


class TokenRoutingState:
    """The per-call state of token-level routing (owned by one generate call; never shared)."""

    def __init__(self, router, embed_weight, running_sum, running_weight, scores, *, reroute_every: int,
                 top_k: int, temperature: float, reject_threshold: float | None, backend: str | None):
        self.router = router
        self.embed_weight = embed_weight  # [V, D]
        self.running_sum = running_sum  # [B, D] fp32
        self.running_weight = running_weight  # [B] fp32
        self.reroute_every, self.top_k, self.temperature = reroute_every, top_k, temperature
        self.reject_threshold, self.backend = reject_threshold, backend
        self.calls = 0
        self.generated = 0
        self.prompt_len = 0
        self.prompt_gate: tuple[torch.Tensor, torch.Tensor] | None = None
        self.position_gates: list[tuple[torch.Tensor, torch.Tensor]] = []  # gate of each generated token
        self.adapter_order = tuple(router.adapter_names)
        self.trace = TokenRouteTrace(list(router.adapter_names))
        self._set_weights(scores)

    def _set_weights(self, scores: torch.Tensor) -> None:
        self.topk_indices, self.topk_weights = mixture_from_scores(
            scores, self.top_k, self.temperature, self.reject_threshold
        )
        self.trace.record(self.generated, self.topk_indices, self.topk_weights)

    def names_for(self, batch_size: int) -> list[str]:
        return [BASE_ADAPTER] * batch_size

    def mixture_for(self, batch_size: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates for a layer input of [batch_size, tokens].

        Each position keeps the gate that was in force when its token was fed: with a KV cache a step feeds one
        token ([B, k] gates, the current ones); without a cache every step re-feeds the whole sequence, and
        the gates are [B, T, k]: the prompt's gate on prompt positions, then each generated token's own gate.
        So generation with and without a KV cache computes exactly the same thing.
        """
        if batch_size != self.topk_indices.shape[0]:
            raise RuntimeError(f"ariadne_hf: token routing state has {self.topk_indices.shape[0]} rows, a layer got "
                               f"{batch_size}.")
        if tokens == 1 or not self.position_gates:
            return self.topk_indices, self.topk_weights
        if tokens != self.prompt_len + len(self.position_gates):
            raise RuntimeError(f"ariadne_hf: token routing got {tokens} positions; expected 1 (KV cache) or the "
                               f"whole sequence ({self.prompt_len + len(self.position_gates)}).")
        prompt_idx, prompt_w = self.prompt_gate
        idx = torch.cat([prompt_idx.unsqueeze(1).expand(-1, self.prompt_len, -1),
                         torch.stack([g[0] for g in self.position_gates], dim=1)], dim=1)  # [B, T, k]
        w = torch.cat([prompt_w.unsqueeze(1).expand(-1, self.prompt_len, -1),
                       torch.stack([g[1] for g in self.position_gates], dim=1)], dim=1)  # [B, T, k]
        return idx, w

    def before_backbone_forward(self, input_ids: torch.Tensor | None) -> None:
        """Pre-gating, once per forward of the backbone: fold in the newest token, re-score on schedule."""
        if input_ids is None:
            raise ValueError("Token-level routing needs input_ids in every forward (inputs_embeds is not supported).")
        self.calls += 1
        if self.calls == 1:  # the prompt (prefill): already pooled; expand rows for num_return_sequences
            batch = input_ids.shape[0]
            if batch != self.running_sum.shape[0]:
                self.running_sum = _expand_rows(self.running_sum, batch).clone()
                self.running_weight = _expand_rows(self.running_weight, batch).clone()
                self.topk_indices = _expand_rows(self.topk_indices, batch)
                self.topk_weights = _expand_rows(self.topk_weights, batch)
            self.prompt_len = input_ids.shape[1]
            self.prompt_gate = (self.topk_indices, self.topk_weights)
            return
        if input_ids.shape[0] != self.running_sum.shape[0]:
            raise ValueError("Token-level routing does not support beam search (num_beams > 1): beams are "
                             "reordered every step. Use greedy decoding or sampling.")
        self.generated += 1
        if self.reroute_every:
            self._fold_in(input_ids[:, -1].to(self.embed_weight.device))  # [B]
        self.position_gates.append((self.topk_indices, self.topk_weights))

    def _fold_in(self, newest: torch.Tensor) -> None:
        """Add the newest token of every row to its running sum; re-score every `reroute_every` tokens."""
        router = self.router
        token_weights = router.optional_token_weights()
        if self.generated % self.reroute_every:
            incremental_pool_update_ref(newest, self.running_sum, self.running_weight, self.embed_weight,
                                        token_weights=token_weights)
            return
        scores, _ = incremental_pool_distance(
            newest, self.running_sum, self.running_weight, self.embed_weight, router.centroids,
            router.centroid_adapter, len(router.adapter_names), center=router.optional_center(),
            token_weights=token_weights, transform=router.optional_transform(), distance=router.distance,
            backend=self.backend,
        )
        self._set_weights(scores)


# ---- stacked LoRA weights -------------------------------------------------------------------------------------
def lora_stack(module: LoraLinear, adapter_order: list[str]):
    """Stacked, rank-padded weights of one LoRA linear: (A [A, R, IN], B [A, OUT, R], scaling [A] fp32).

    An adapter that does not target this module has zero rows (contributes nothing). Cached on the module per
    adapter order; `clear_lora_stacks` drops the caches (called when adapters are added or removed; call it
    yourself after editing LoRA weights in place).
    """
    key = tuple(adapter_order)  # O(A) in C; invalidated explicitly by clear_lora_stacks when adapters change
    cached = getattr(module, "_ariadne_stack", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    present = [n for n in adapter_order if n in module.lora_A]
    rank = max(module.lora_A[n].weight.shape[0] for n in present)
    ref = module.lora_A[present[0]].weight
    out_features = module.lora_B[present[0]].weight.shape[0]
    count, in_features = len(adapter_order), ref.shape[1]
    stack_a = ref.new_zeros(count, rank, in_features)  # [A, R, IN]
    stack_b = ref.new_zeros(count, out_features, rank)  # [A, OUT, R]
    scaling = torch.zeros(count, dtype=torch.float32, device=ref.device)  # [A]
    for index, name in enumerate(adapter_order):
        if name not in module.lora_A:
            continue
        weight_a, weight_b = module.lora_A[name].weight, module.lora_B[name].weight  # [r, IN], [OUT, r]
        stack_a[index, : weight_a.shape[0]] = weight_a.detach()
        stack_b[index, :, : weight_b.shape[1]] = weight_b.detach()
        scaling[index] = float(module.scaling[name])
    stacks = (stack_a, stack_b, scaling)
    module._ariadne_stack = (key, stacks)
    return stacks


def clear_lora_stacks(model: torch.nn.Module) -> None:
    """Forget every cached stack, so the next forward rebuilds them from the current LoRA weights."""
    for module in model.modules():
        if hasattr(module, "_ariadne_stack"):
            del module._ariadne_stack


def add_mixture_delta(module: LoraLinear, x: torch.Tensor, result: torch.Tensor, plan, adapter_order) -> torch.Tensor:
    """result + sum_j w[b,j] * scale * B (A x) for every token of every row; x [B, T, IN] or [B, IN]."""
    stack_a, stack_b, scaling = lora_stack(module, adapter_order)
    tokens = x.shape[1] if x.ndim == 3 else 1
    indices, weights = plan.mixture_for(x.shape[0], tokens)  # [B, k] or [B, T, k]
    flat = x.reshape(-1, x.shape[-1]).to(stack_a.dtype)  # [N, IN], N = B * T
    if indices.ndim == 3:
        indices, weights = indices.reshape(flat.shape[0], -1), weights.reshape(flat.shape[0], -1)  # [N, k]
    elif tokens != 1:
        indices = indices.repeat_interleave(tokens, dim=0)  # [N, k]
        weights = weights.repeat_interleave(tokens, dim=0)
    delta = mixture_lora(flat, stack_a, stack_b, scaling, indices.to(flat.device),
                         weights.to(device=flat.device, dtype=torch.float32))  # [N, OUT]
    return result + delta.reshape(*result.shape[:-1], -1).to(result.dtype)
