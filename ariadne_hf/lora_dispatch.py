"""Per-call LoRA routing plans, and the hooks that make PEFT's LoRA layers obey them.

A plan lives in a `contextvars.ContextVar`, so it belongs to one call in one thread: two threads generating on
the same model at once never see each other's routes. The hooks are installed once per LoRA layer and read the
plan of the current context; with no plan active, PEFT behaves exactly as without ariadne_hf.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from .constants import BASE_ADAPTER


@dataclass(frozen=True)
class LoraPlan:
    """Which adapter each batch row uses. `row_adapters[i]` is the adapter of input row i (``"__base__"`` = none).

    Generation may expand rows contiguously (beams, num_return_sequences): a layer that sees a batch that is an
    exact multiple of the plan's rows gets each name repeated that many times, in order (`repeat_interleave`).
    """

    row_adapters: tuple[str, ...]

    def names_for(self, batch_size: int) -> list[str]:
        """Per-row names for a layer input of `batch_size` rows; raises if it is not a multiple of the plan."""
        rows = len(self.row_adapters)
        if rows == 0 or batch_size % rows:
            raise RuntimeError(
                f"ariadne_hf: a LoRA layer received {batch_size} rows but this call routed {rows}; rows must be "
                "expanded contiguously (as generate does for beams and num_return_sequences)."
            )
        repeat = batch_size // rows
        if repeat == 1:
            return list(self.row_adapters)
        return [name for name in self.row_adapters for _ in range(repeat)]


_ACTIVE_PLAN: contextvars.ContextVar[LoraPlan | None] = contextvars.ContextVar("ariadne_lora_plan", default=None)


@contextlib.contextmanager
def use_plan(plan: LoraPlan | None) -> Iterator[None]:
    """Make `plan` the LoRA plan of the current context for the duration of the block."""
    token = _ACTIVE_PLAN.set(plan)
    try:
        yield
    finally:
        _ACTIVE_PLAN.reset(token)


def active_plan() -> LoraPlan | None:
    return _ACTIVE_PLAN.get()


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("x", kwargs.get("input"))


def _inject_adapter_names(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Pre-hook of every LoRA layer: PEFT's per-row adapter names from the plan (all "__base__" for mixtures)."""
    plan = _ACTIVE_PLAN.get()
    if plan is None:
        return None
    kwargs["adapter_names"] = plan.names_for(_layer_input(args, kwargs).shape[0])
    return args, kwargs


def _add_mixture(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
    """Post-hook of every LoRA layer: add the plan's weighted multi-LoRA delta (stacked path only)."""
    plan = _ACTIVE_PLAN.get()
    if plan is None or not hasattr(plan, "mixture_for"):
        return None
    if not isinstance(module, LoraLinear):
        raise ValueError(f"Weighted/token-level LoRA mixing supports LoRA on linear layers only, not "
                         f"{type(module).__name__}; use routing='sequence' with lora_backend='peft'.")
    from .mixing import add_mixture_delta

    return add_mixture_delta(module, _layer_input(args, kwargs), output, plan, plan.adapter_order)


def _before_backbone_forward(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Pre-hook of the backbone: pre-gating for token-level routing, once per forward, before any layer."""
    plan = _ACTIVE_PLAN.get()
    if plan is not None and hasattr(plan, "before_backbone_forward"):
        plan.before_backbone_forward(kwargs.get("input_ids", args[0] if args else None))
    return None


def install_plan_hooks(model: torch.nn.Module) -> int:
    """Register the plan hooks on every PEFT LoRA layer of `model` that lacks them, and the pre-gating hook on
    the backbone; returns how many LoRA layers were hooked.

    Idempotent: call it again after loading an adapter that wraps new modules.
    """
    added = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "_ariadne_plan_hook", False):
            module.register_forward_pre_hook(_inject_adapter_names, with_kwargs=True)
            module.register_forward_hook(_add_mixture, with_kwargs=True)
            module._ariadne_plan_hook = True
            added += 1
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(backbone, "_ariadne_gate_hook", False):
        backbone.register_forward_pre_hook(_before_backbone_forward, with_kwargs=True)
        backbone._ariadne_gate_hook = True
    return added


__all__ = ["BASE_ADAPTER", "LoraPlan", "active_plan", "install_plan_hooks", "use_plan"]
