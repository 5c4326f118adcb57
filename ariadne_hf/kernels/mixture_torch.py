"""Weighted multi-LoRA delta in torch: the specification of ``mixture_lora``.

Shape letters: N flattened rows, A adapters, R LoRA rank (zero-padded), k adapters per row, IN/OUT the in/out
features of a LoRA-targeted linear layer. ``mixture_lora_ref`` is the spec that ``mixture_triton`` and the routed
LoRA layers' torch strategies (``lora/layer.py``: gather, dense, chosen once per step by ``lora/gate.py``) are
tested against; it is written for clarity (one gather, two einsums), not speed: production runs the layers' path.
``dense_to_topk`` turns dense per-adapter weights into the (indices, weights) pair every path takes.
"""

from __future__ import annotations

import torch

from .checks import check_mixture_lora_args


def dense_to_topk(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: the k largest entries of each row of ``weights`` [N, A] as (indices [N, k] int64, values [N, k]).

    Entries whose value is 0 get index -1 (no adapter); values are not renormalised. ``k`` is clamped to A.
    Ties go to the lowest adapter index (stable sort).
    """
    k = min(int(k), weights.shape[-1])
    order = torch.sort(weights, dim=-1, descending=True, stable=True)  # values/indices [N, A]
    values = order.values[:, :k]  # [N, k]
    indices = torch.where(values != 0, order.indices[:, :k], torch.full_like(order.indices[:, :k], -1))
    return indices, values


def mixture_lora_ref(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Semantics: delta[n] = sum_j w[n,j] * scaling[i] * B_i (A_i x[n]) with i = topk_indices[n, j]; i == -1 adds 0.

    ``x`` [N, IN], ``lora_A`` [A, R, IN], ``lora_B`` [A, OUT, R] (ranks zero-padded to R; an adapter that does not
    target the module has all-zero A/B), ``scaling`` [A], ``topk_indices`` [N, k] int in [-1, A), ``topk_weights``
    [N, k]. Returns delta [N, OUT] in x's dtype; products and sums in fp32 (x, A, B upcast). Duplicate slots add up.
    """
    check_mixture_lora_args(x, lora_A, lora_B, scaling, topk_indices, topk_weights)
    live = topk_indices >= 0  # [N, k]
    safe = torch.where(live, topk_indices, torch.zeros_like(topk_indices)).long()  # [N, k]
    coef = (topk_weights.float() * scaling.float()[safe]).masked_fill(~live, 0.0)  # [N, k]
    shrunk = torch.einsum("nkri,ni->nkr", lora_A.float()[safe], x.float())  # [N, k, R]
    delta = torch.einsum("nkor,nkr->no", lora_B.float()[safe], shrunk * coef.unsqueeze(-1))  # [N, OUT]
    return delta.to(x.dtype)
