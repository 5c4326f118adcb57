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


def _inject_adapter_names(module: torch.nn.Module, args: tuple, kwargs: dict):
    plan = _ACTIVE_PLAN.get()
    if plan is None:
        return None
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    kwargs["adapter_names"] = plan.names_for(x.shape[0])
    return args, kwargs


def install_plan_hooks(model: torch.nn.Module) -> int:
    """Register the plan hook on every PEFT LoRA layer of `model` that lacks it; returns how many were added.

    Idempotent: call it again after loading an adapter that wraps new modules.
    """
    added = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "_ariadne_plan_hook", False):
            module.register_forward_pre_hook(_inject_adapter_names, with_kwargs=True)
            module._ariadne_plan_hook = True
            added += 1
    return added


def uniform_plan(name: str, rows: int) -> LoraPlan:
    return LoraPlan(tuple([name] * rows))


__all__ = ["BASE_ADAPTER", "LoraPlan", "active_plan", "install_plan_hooks", "uniform_plan", "use_plan"]
