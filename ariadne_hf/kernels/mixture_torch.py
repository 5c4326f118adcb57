"""Weighted multi-LoRA delta in torch: the specification of ``mixture_lora`` and its CPU path.

Shape letters: N flattened rows, A adapters, R LoRA rank (zero-padded), k adapters per row, IN/OUT the
in/out features of a LoRA-targeted linear layer. ``mixture_lora_ref`` is the spec (``mixture_triton``
computes exactly it); its strategies ("gather", "grouped", "dense") compute the same sum in different
orders, chosen by the cost model ``pick_mixture_strategy``. ``dense_to_topk`` turns dense per-adapter
weights into the (indices, weights) pair every backend takes.
"""

from __future__ import annotations

import torch

from .checks import check_mixture_lora_args

MIXTURE_STRATEGIES = ("gather", "grouped", "dense")


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


def _mixture_coefficients(
    scaling: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(safe indices [N, k] int64 with -1 -> 0, coef [N, k] fp32 = w * scaling[idx], 0 where idx == -1 or w == 0)."""
    live = topk_indices >= 0  # [N, k]
    safe = torch.where(live, topk_indices, torch.zeros_like(topk_indices)).long()  # [N, k]
    coef = topk_weights.to(torch.float32) * scaling.to(torch.float32)[safe]  # [N, k]
    return safe, coef.masked_fill(~live, 0.0)


def _mixture_gather(x32, lora_A, lora_B, safe, coef) -> torch.Tensor:
    """Decode strategy: gather every (row, j) adapter's A and B and use two bmm's. Cost ~ N*k*R*(IN+OUT) copies."""
    n, k = safe.shape
    rank = lora_A.shape[1]
    a_sel = lora_A[safe.reshape(-1)].to(torch.float32)  # [N*k, R, IN]
    h = torch.bmm(a_sel.view(n, k * rank, -1), x32.unsqueeze(-1)).view(n, k, rank)  # [N, k, R]
    h = h * coef.unsqueeze(-1)  # [N, k, R]
    b_sel = lora_B[safe.reshape(-1)].to(torch.float32)  # [N*k, OUT, R]
    out = torch.bmm(b_sel, h.reshape(n * k, rank, 1))  # [N*k, OUT, 1]
    return out.view(n, k, -1).sum(dim=1)  # [N, OUT]


def _mixture_grouped(x32, lora_A, lora_B, safe, coef) -> torch.Tensor:
    """Prefill strategy: one (shrink, expand) matmul pair per UNIQUE adapter present; rows gathered per adapter."""
    n, k = safe.shape
    out = torch.zeros(n, lora_B.shape[1], dtype=torch.float32, device=x32.device)  # [N, OUT]
    flat_adapter = safe.reshape(-1)  # [N*k]
    flat_coef = coef.reshape(-1)  # [N*k]
    flat_row = torch.arange(n, device=x32.device).repeat_interleave(k)  # [N*k]
    live = flat_coef != 0  # [N*k]
    flat_adapter, flat_coef, flat_row = flat_adapter[live], flat_coef[live], flat_row[live]
    order = torch.argsort(flat_adapter, stable=True)  # [P]
    flat_adapter, flat_coef, flat_row = flat_adapter[order], flat_coef[order], flat_row[order]
    adapters, counts = torch.unique_consecutive(flat_adapter, return_counts=True)
    start = 0
    for adapter, count in zip(adapters.tolist(), counts.tolist(), strict=True):
        rows = flat_row[start:start + count]  # [n_a]
        coef_a = flat_coef[start:start + count]  # [n_a]
        start += count
        x_a = x32 if count == n and k == 1 else x32.index_select(0, rows)  # [n_a, IN] (rows sorted when k == 1)
        h = (x_a @ lora_A[adapter].to(torch.float32).T) * coef_a.unsqueeze(-1)  # [n_a, R]
        out.index_add_(0, rows, h @ lora_B[adapter].to(torch.float32).T)
    return out


def _mixture_dense(x32, lora_A, lora_B, safe, coef) -> torch.Tensor:
    """Dense strategy: shrink by ALL adapters in one matmul, weight per (row, adapter), expand in one matmul.

    Cost ~ N*A*R*(IN+OUT) flops whatever k: wins when most adapters are used by most rows.
    """
    n = safe.shape[0]
    adapters, rank, in_features = lora_A.shape
    dense = torch.zeros(n, adapters, dtype=torch.float32, device=x32.device).scatter_add_(1, safe, coef)  # [N, A]
    h = x32 @ lora_A.reshape(adapters * rank, in_features).to(torch.float32).T  # [N, A*R]
    h = h.view(n, adapters, rank) * dense.unsqueeze(-1)  # [N, A, R]
    if n * adapters * lora_B.shape[1] <= (1 << 20):  # bmm + sum over A: no relayout of B, small temporary
        return torch.bmm(h.transpose(0, 1), lora_B.to(torch.float32).transpose(1, 2)).sum(dim=0)  # [N, OUT]
    b_stack = lora_B.to(torch.float32).permute(1, 0, 2).reshape(-1, adapters * rank)  # [OUT, A*R]
    return h.reshape(n, adapters * rank) @ b_stack.T  # [N, OUT]


def pick_mixture_strategy(n: int, k: int, adapters: int, unique: int, rank: int, in_features: int,
                          out_features: int, half_weights: bool = False) -> str:
    """Cheapest torch strategy by a cost model fitted on a 2-core AVX-512 CPU (benchmarks/bench_mixture_lora.py).

    Units of ~0.4 ns; ``el`` = elements of one adapter's A and B, ``flop`` = one row through one adapter.
    ``gather`` copies every (row, slot) adapter; ``grouped`` pays a fixed ~80 us, ~25 us + the weights per
    unique adapter, and 1.8x the row flops (row gathers, ``index_add``; 1x for one adapter on every row);
    ``dense`` reads (upcasts) every adapter once and runs N*A row-adapter products in two matmuls.
    """
    el = rank * (in_features + out_features)
    flop = el / 12.0
    gather = 3.2 * n * k * el
    grouped = 200_000 + unique * (60_000 + el) + (1.0 if k == 1 and unique == 1 else 1.8) * n * k * flop
    dense = 150_000 + (0.6 if half_weights else 0.3) * adapters * el + 0.8 * n * adapters * flop
    costs = {"gather": gather, "grouped": grouped, "dense": dense}
    return min(costs, key=costs.get)


def mixture_lora_ref(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    strategy: str | None = None,
) -> torch.Tensor:
    """Semantics: delta[n] = sum_j w[n,j] * scaling[i] * B_i (A_i x[n]) with i = topk_indices[n, j]; i == -1 adds 0.

    ``x`` [N, IN], ``lora_A`` [A, R, IN], ``lora_B`` [A, OUT, R] (ranks zero-padded to R; an adapter that
    does not target the module has all-zero A/B), ``scaling`` [A], ``topk_indices`` [N, k] int in [-1, A),
    ``topk_weights`` [N, k]. Returns delta [N, OUT] in x's dtype; products and sums in fp32 (x, A, B
    upcast; no half-precision matmul). No Python loop over rows. ``strategy``: "gather" (bmm over the
    gathered per-row weights: a single row), "grouped" (one matmul pair per UNIQUE adapter present, rows
    gathered: prefill, k << A), "dense" (shrink by all adapters in one matmul, weight, expand in one
    matmul: k close to A, or small N with few adapters); None picks "grouped" for k == 1 (a selection:
    the rows of each adapter go through exactly PEFT's two matmuls) and ``pick_mixture_strategy`` otherwise.
    """
    check_mixture_lora_args(x, lora_A, lora_B, scaling, topk_indices, topk_weights)
    n, k = topk_indices.shape
    out_features = lora_B.shape[1]
    if n == 0 or k == 0 or lora_A.shape[1] == 0:
        return torch.zeros(n, out_features, dtype=x.dtype, device=x.device)
    safe, coef = _mixture_coefficients(scaling, topk_indices, topk_weights)  # [N, k], [N, k]
    x32 = x if x.dtype == torch.float32 else x.to(torch.float32)  # [N, IN]
    if strategy is None and k == 1:
        strategy = "grouped"  # pure selection: PEFT's own computation (a matmul pair per adapter present)
    if strategy is None:
        unique = int(torch.unique(topk_indices[topk_indices >= 0]).numel())
        strategy = pick_mixture_strategy(n, k, lora_A.shape[0], unique, lora_A.shape[1], x.shape[1], out_features,
                                         half_weights=lora_A.dtype != torch.float32)
    if strategy == "gather":
        out = _mixture_gather(x32, lora_A, lora_B, safe, coef)
    elif strategy == "grouped":
        out = _mixture_grouped(x32, lora_A, lora_B, safe, coef)
    elif strategy == "dense":
        out = _mixture_dense(x32, lora_A, lora_B, safe, coef)
    else:
        raise ValueError(f"strategy must be one of {MIXTURE_STRATEGIES} or None, got {strategy!r}")
    return out.to(x.dtype)
