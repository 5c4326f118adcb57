"""`RoutedLoraLinear`: a backbone linear (or GPT-2 `Conv1D`, or quantized linear) layer plus every adapter's LoRA weights on it, applying this step's gate.

Compared with PEFT's `lora.Linear` (one `nn.Linear` pair per adapter in `ModuleDict`s, adapter names resolved and
validated in every forward) and vLLM's `BaseLinearLayerWithLoRA` (stacked slots + a punica wrapper that holds the
per-batch metadata), this keeps vLLM's split with less machinery: the weights are stacked buffers here, and the
per-step metadata is a `LoraGate` built once per forward pass by the call's plan (`ariadne_hf.lora.plans`).
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from .gate import MIXTURE, SINGLE

try:  # transformers' GPT-2-style layer: weight [IN, OUT], y = x @ W + b (PEFT wraps it with fan_in_fan_out=True)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always provides it
    Conv1D = ()


def base_features(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer routed LoRA can wrap, or None if it cannot.

    `nn.Linear` and its subclasses (bitsandbytes `Linear4bit`/`Linear8bitLt`, torchao-quantized linears keep the
    class and replace only the weight tensor) report them as attributes; transformers' `Conv1D` stores its weight
    as [IN, OUT] (``nx``, ``nf``). The LoRA delta is the same for both: PEFT's A is [r, IN] and B [OUT, r] either
    way (``fan_in_fan_out`` only changes how PEFT merges into the base weight, which routed layers never do)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D and isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return None

ACTIVE_PLAN: contextvars.ContextVar = contextvars.ContextVar("ariadne_lora_plan", default=None)
"""The LoRA plan of the current call (`ariadne_hf.lora.plans`); None = the plain backbone. One per context, so
concurrent calls on one model (threads) never see each other's routes."""


class RoutedLoraLinear(nn.Module):
    """``base_layer(x) + sum_j coef[g, j] * B_a (A_a x)`` with the adapters and coefficients of the active gate.

    Buffers (non-persistent: they follow ``.to(device|dtype)``, ``.half()`` and ``device_map`` moves, and stay out
    of the backbone's state dict): ``lora_A`` [A, R, IN], ``lora_B`` [A, OUT, R] (ranks zero-padded to R, the
    largest rank on this layer; an adapter that does not target this layer has zero rows), ``scaling`` [A] fp32.
    Host metadata: ``ranks[a]`` (0 = adapter a does not target this layer), ``scalings[a]`` (python floats),
    ``scaling_group`` (index of this layer's scaling vector in the bank's `GateFactory`).

    Guarantees: with no active plan the output is exactly ``base_layer(x)``; with a SINGLE gate on adapter a it
    is exactly PEFT's ``base(x) + lora_B(lora_A(x)) * scaling`` (same operations in the same order).
    """

    def __init__(self, base_layer: nn.Module, module_name: str):
        super().__init__()
        features = base_features(base_layer)
        if features is None:
            raise TypeError(f"{module_name} is a {type(base_layer).__name__}; routed LoRA wraps nn.Linear (and its "
                            "quantized subclasses) and transformers' Conv1D only.")
        self.base_layer = base_layer
        self.module_name = module_name
        self.in_features, self.out_features = features
        weight = base_layer.weight  # quantized weights (uint8/int8 storage) get fp32 LoRA stacks
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.register_buffer("lora_A", torch.zeros(0, 0, self.in_features, dtype=dtype, device=weight.device),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(0, self.out_features, 0, dtype=dtype, device=weight.device),
                             persistent=False)
        self.register_buffer("scaling", torch.zeros(0, dtype=torch.float32, device=weight.device), persistent=False)
        self.ranks: list[int] = []
        self.scalings: list[float] = []
        self.scaling_group = 0

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that inspects `module.weight` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"{self.module_name}: adapters={len(self.ranks)}, rank={self.lora_A.shape[1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        plan = ACTIVE_PLAN.get()
        if plan is None:
            return result
        gate = plan.gate
        if gate.kind == SINGLE:
            rank = self.ranks[gate.adapter]
            if not rank:
                return result
            lora_a, lora_b = self.lora_A[gate.adapter], self.lora_B[gate.adapter]  # [R, IN], [OUT, R]
            if rank != lora_a.shape[0]:
                lora_a, lora_b = lora_a[:rank], lora_b[:, :rank]
            x = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
            return result + F.linear(F.linear(x, lora_a), lora_b) * self.scalings[gate.adapter]
        if gate.kind == MIXTURE:
            return result + self._mixture_delta(x, gate).to(result.dtype)
        return result

    def _mixture_delta(self, x: torch.Tensor, gate) -> torch.Tensor:
        """sum_j coef[g, j] * B_a (A_a x) for every token; x [..., IN] -> [..., OUT]."""
        lora_a, lora_b = self.lora_A, self.lora_B  # [A, R, IN], [A, OUT, R]
        x = x if x.dtype == lora_a.dtype else x.to(lora_a.dtype)
        if gate.backend == "triton":
            from ..kernels.mixture_triton import mixture_lora_triton

            flat = x.reshape(-1, self.in_features)  # [N, IN]
            delta = mixture_lora_triton(flat, lora_a, lora_b, self.scaling, gate.raw_indices, gate.weights,
                                        checked=False)  # [N, OUT]
            return delta.view(*x.shape[:-1], self.out_features)
        if gate.strategy == "dense":
            return self._dense_delta(x, gate)
        gathered = gate.gathered.get(self)
        if gathered is None:
            gathered = self._gather(gate, x.device)
            if gate.cache_gathered:
                gate.gathered[self] = gathered
        lora_a_rows, lora_b_rows = gathered  # [G, IN, kR], [G, kR, OUT] (coefficients folded into B)
        rows = x.reshape(lora_a_rows.shape[0], -1, self.in_features)  # [G, T', IN]  (T' = tokens per gate row)
        delta = torch.bmm(torch.bmm(rows, lora_a_rows), lora_b_rows)  # [G, T', OUT]
        return delta.view(*x.shape[:-1], self.out_features)

    def _dense_delta(self, x: torch.Tensor, gate) -> torch.Tensor:
        """Every adapter's shrink in one matmul, masked per row by the dense coefficients, one expand matmul."""
        adapters, rank = self.lora_A.shape[0], self.lora_A.shape[1]
        coef = gate.dense_coefs[self.scaling_group]  # [G, A]
        lora_b_flat = gate.gathered.get(self)
        if lora_b_flat is None:  # [OUT, A*R]: B of every adapter side by side, laid out once per gate
            lora_b_flat = gate.gathered[self] = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)
        coef = coef if coef.device == x.device else coef.to(x.device)
        hidden = F.linear(x.reshape(-1, self.in_features), self.lora_A.reshape(adapters * rank, -1))  # [N, A*R]
        hidden = hidden.view(coef.shape[0], -1, adapters, rank) * coef.view(coef.shape[0], 1, adapters, 1).to(
            hidden.dtype)  # [G, T', A, R]
        delta = F.linear(hidden.view(-1, adapters * rank), lora_b_flat)  # [N, OUT]
        return delta.view(*x.shape[:-1], self.out_features)

    def _gather(self, gate, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each gate row's adapters, side by side: A [G, IN, k*R] and coef-scaled B [G, k*R, OUT]."""
        indices, coef = gate.indices, gate.coefs[self.scaling_group]  # [G, k], [G, k, 1]
        if indices.device != device:  # layers spread over devices (device_map)
            indices, coef = indices.to(device), coef.to(device)
        groups, k = indices.shape
        rank = self.lora_A.shape[1]
        flat_index = indices.view(-1)  # [G*k]
        lora_a_rows = self.lora_A.index_select(0, flat_index).view(groups, k * rank, self.in_features)
        lora_b_rows = self.lora_B.transpose(1, 2).index_select(0, flat_index).view(groups, k, rank, self.out_features)
        lora_b_rows = lora_b_rows * coef.view(groups, k, 1, 1).to(lora_b_rows.dtype)
        return lora_a_rows.transpose(1, 2), lora_b_rows.view(groups, k * rank, self.out_features)
