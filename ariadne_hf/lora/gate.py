"""The per-step gate (pre-gating): what every routed LoRA layer of one forward pass reads, computed once.

A `LoraGate` is built before the first layer runs (by the call's plan, in the backbone's forward pre-hook) and
is read as-is by every `RoutedLoraLinear`: layers never validate, choose a strategy, or synchronise with the host.
Three kinds:

- ``BASE``: no adapter on any row (the plain backbone).
- ``SINGLE``: every row uses adapter ``adapter`` with weight 1: two small matmuls, exactly PEFT's computation.
- ``MIXTURE``: row (or token) g adds ``sum_j coef[g, j] * B_a (A_a x)`` with a = ``indices[g, j]``, where
  ``coef = weight * scaling[a]`` (0 for no adapter). One adapter per row (``k = 1``, weight 1 or 0) is the
  per-row selection of a mixed batch; ``k > 1`` is a weighted mixture (token routing, ``adapter_weights``).
  ``per_token`` gates have one row per token ([B * T, k], token routing without a KV cache); otherwise one row
  per batch row, shared by all its tokens. The torch strategy is chosen here, once, by size (G rows, k slots,
  A adapters, T tokens per row): ``gather`` (each layer gathers its rows' adapters; kept on the gate for reuse
  by every decoding step while G*k <= max(A, 16), i.e. at most one more copy of the stacks) or, for decode
  steps with more row-slots than that, ``dense`` (every adapter's shrink in one matmul, masked by the per-row
  coefficients [G, A], expand in one matmul: A < G*k, so it reads less than gathering would copy).

`GateFactory` builds gates for one `LoraBank`: it precomputes ``coef`` once per distinct per-module scaling
vector (usually one for the whole model), so a layer does no per-step arithmetic on the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE, SINGLE, MIXTURE = 0, 1, 2


@dataclass(frozen=True, eq=False)
class LoraGate:
    """One forward pass's LoRA routing, in the form the layers consume (see the module docstring).

    Fields by kind: SINGLE uses ``adapter``; MIXTURE uses ``indices`` [G, k] int64 (no-adapter slots hold 0),
    ``coefs`` (one [G, k, 1] fp32 tensor per scaling group, 0 for no-adapter slots), ``per_token``, and for
    the Triton path ``raw_indices`` [N, k] (-1 = none) and ``weights`` [N, k] fp32 with one row per token.
    ``gathered`` is scratch space of the torch MIXTURE path: each layer's per-row adapter weights, gathered and
    scaled once for the lifetime of this gate (one call, or one re-routing interval), then reused every step.
    """

    kind: int
    adapter: int = -1
    indices: torch.Tensor | None = None
    coefs: tuple[torch.Tensor, ...] = ()
    per_token: bool = False
    backend: str = "torch"
    raw_indices: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    strategy: str = "gather"
    dense_coefs: tuple[torch.Tensor, ...] = ()
    cache_gathered: bool = False
    gathered: dict = field(default_factory=dict)


BASE_GATE = LoraGate(BASE)

GATHER_CACHE_MIN_ROWS = 16
"""Decode gates keep each layer's gathered (row, adapter) weights for the gate's lifetime when G * k is at most
max(A, this): a call then holds at most max(one more copy of the stacks, 16 adapter copies) per layer, freed with
the gate. Larger decode gates use the dense strategy; prefill and per-token gates gather once, uncached."""


class GateFactory:
    """Builds `LoraGate`s for the layers of one bank.

    ``scaling_groups``: one [A] fp32 tensor per distinct scaling vector among the bank's layers (each layer
    records the index of its group). ``backend``: "torch" or "triton" (the fused multi-LoRA kernel).
    """

    def __init__(self, scaling_groups: list[torch.Tensor], backend: str = "torch"):
        self.scaling_groups = scaling_groups
        self.backend = backend

    def single(self, adapter: int) -> LoraGate:
        """Every row on adapter `adapter` (-1: the plain backbone)."""
        return BASE_GATE if adapter < 0 else LoraGate(SINGLE, adapter=int(adapter))

    def rows(self, adapters: list[int], rows: int, tokens: int, device: torch.device) -> LoraGate:
        """One adapter per routed row (-1 = none) for a forward of `rows` rows (a multiple of len(adapters):
        generate expands rows contiguously for beams and num_return_sequences) and `tokens` tokens per row."""
        distinct = set(adapters)
        if len(distinct) == 1:
            return self.single(adapters[0])
        if rows % len(adapters):
            raise RuntimeError(
                f"ariadne_hf: the backbone received {rows} rows but this call routed {len(adapters)}; rows must be "
                "expanded contiguously (as generate does for beams and num_return_sequences)."
            )
        index = torch.tensor(adapters, dtype=torch.int64, device=device)  # [B]
        index = index.repeat_interleave(rows // len(adapters))  # [N]
        weights = (index >= 0).to(torch.float32).unsqueeze(-1)  # [N, 1]
        return self.mixture(index.unsqueeze(-1), weights, tokens=tokens)

    def mixture(self, indices: torch.Tensor, weights: torch.Tensor, *, tokens: int = 1,
                per_token: bool = False) -> LoraGate:
        """Weighted adapters per row: `indices` [G, k] int64 (-1 = none), `weights` [G, k] float.

        G is the number of rows (each row's gate applies to its `tokens` tokens) or, with `per_token`, the number
        of tokens (B * T, row-major). Slots with index -1 or weight 0 add nothing.
        """
        indices = indices.to(torch.int64)
        weights = weights.to(torch.float32)
        live = indices >= 0  # [G, k]
        safe = torch.where(live, indices, torch.zeros_like(indices))  # [G, k]
        weights = weights.masked_fill(~live, 0.0)
        coefs = tuple((weights * group.to(weights.device)[safe]).unsqueeze(-1) for group in self.scaling_groups)
        groups, k = indices.shape
        adapters = len(self.scaling_groups[0])
        decode = tokens == 1 and not per_token
        cache = decode and groups * k <= max(adapters, GATHER_CACHE_MIN_ROWS)
        strategy, dense_coefs = "gather", ()
        if decode and not cache:
            strategy = "dense"
            dense_coefs = tuple(torch.zeros(groups, adapters, device=weights.device).scatter_add_(1, safe, c.squeeze(-1))
                                for c in coefs)  # [G, A] each
        raw_indices, token_weights = None, None
        if self.backend == "triton":  # the kernel takes one gate row per token
            repeat = 1 if per_token else tokens
            raw_indices = torch.where(live, indices, torch.full_like(indices, -1)).repeat_interleave(repeat, dim=0)
            token_weights = weights.repeat_interleave(repeat, dim=0)
        return LoraGate(MIXTURE, indices=safe, coefs=coefs, per_token=per_token, backend=self.backend,
                        raw_indices=raw_indices, weights=token_weights, strategy=strategy, dense_coefs=dense_coefs,
                        cache_gathered=cache)
