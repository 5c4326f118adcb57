"""Per-call LoRA plans: which adapters each row uses, turned into one `LoraGate` per forward pass (pre-gating).

A plan (the `LoraPlan` protocol) belongs to one call (`generate`, `forward`) and is made active for it with
`use_plan` (the context variable `ACTIVE_PLAN`, so concurrent calls never share one). The backbone's forward
pre-hook (`install_pregate_hook`, kept by its handle) calls ``plan.begin_forward(input_ids, rows, tokens)`` once
per forward pass, before the first layer; the plan sets ``plan.gate``, which every `RoutedLoraLinear` then reads.
When the call ends, `use_plan` calls ``plan.release()`` (unpin the adapter slots the call pinned).

- `SequencePlan`: one adapter per routed row (sequence routing, ``adapter_names=``, the grouped strategy).
- `WeightsPlan`: a fixed weighted mixture per row (``adapter_weights=``).
- `TokenRoutingPlan` (`ariadne_hf.lora.token_routing`): gates recomputed while decoding.
- `FixedGatePlan`: one given gate for every forward pass (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch.utils.hooks import RemovableHandle

from .gate import BASE_GATE, GateFactory, LoraGate


@runtime_checkable
class LoraPlan(Protocol):
    """What the routed LoRA layers and the pre-gating hook need of a call's plan."""

    gate: LoraGate  # read by every RoutedLoraLinear during a forward pass

    def begin_forward(self, input_ids: torch.Tensor | None, rows: int, tokens: int) -> None:
        """Set `gate` for the forward pass that is about to run (rows [B'], tokens per row [T])."""

    def release(self) -> None:
        """The call is over: unpin what it pinned (adapter slots)."""


ACTIVE_PLAN: contextvars.ContextVar[LoraPlan | None] = contextvars.ContextVar("ariadne_lora_plan", default=None)
"""The LoRA plan of the current call; None = the plain backbone. One per context, so concurrent calls on one model
(threads) never see each other's routes."""


@contextlib.contextmanager
def use_plan(plan: LoraPlan | None) -> Iterator[None]:
    """Make `plan` the LoRA plan of the current context for the duration of the block (None: the plain backbone,
    every routed layer returns its base layer's output); on exit the plan's `release` runs."""
    token = ACTIVE_PLAN.set(plan)
    try:
        yield
    finally:
        ACTIVE_PLAN.reset(token)
        if plan is not None:
            plan.release()


def base_weights_only() -> contextlib.AbstractContextManager:
    """A block in which every routed LoRA layer computes exactly its base layer (no plan active), whatever the
    enclosing call's plan: e.g. the routing signal's base pass (`routing.signal.HiddenStateSignal`)."""
    return use_plan(None)


def _no_release() -> None:
    return None


class FixedGatePlan:
    """One gate for every forward pass (nothing pinned): drives the layers directly in tests and benchmarks."""

    def __init__(self, gate: LoraGate):
        self.gate = gate

    def begin_forward(self, input_ids, rows: int, tokens: int) -> None:
        return None

    def release(self) -> None:
        return None


def _pregate(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the backbone: the active plan computes this pass's gate before any layer runs."""
    plan = ACTIVE_PLAN.get()
    if plan is None:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if reference is None:
        raise ValueError("ariadne_hf: the backbone was called without input_ids or inputs_embeds.")
    plan.begin_forward(input_ids, reference.shape[0], reference.shape[1])
    return None


_PREGATE_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def install_pregate_hook(backbone: torch.nn.Module) -> RemovableHandle:
    """Register the pre-gating hook on the backbone once (idempotent: a second call returns the first handle).

    Nothing is written on the backbone: the handle is kept here, keyed weakly by the backbone."""
    handle = _PREGATE_HOOKS.get(backbone)
    if handle is None:
        handle = _PREGATE_HOOKS[backbone] = backbone.register_forward_pre_hook(_pregate, with_kwargs=True)
    return handle


class SequencePlan:
    """One adapter per routed row: `adapters[i]` is the slot index of row i's adapter (-1 = the plain backbone).

    Gates are cached per (rows, prefill or decode) seen, so decoding reuses one gate object for every step. All rows on one
    adapter give a SINGLE gate (PEFT's two matmuls); several adapters give a per-row MIXTURE gate with k = 1.
    """

    def __init__(self, factory: GateFactory, adapters: list[int], device: torch.device,
                 release: Callable[[], None] = _no_release):
        self.factory, self.adapters, self.device = factory, list(adapters), device
        self._release = release
        self._gates: dict[tuple[int, int], LoraGate] = {}
        self._uniform = len(set(self.adapters)) == 1  # one gate for every forward: set here, never rebuilt
        self.gate: LoraGate = factory.single(self.adapters[0]) if self._uniform else BASE_GATE

    def begin_forward(self, input_ids, rows: int, tokens: int) -> None:
        if self._uniform:
            return
        key = (rows, tokens if self.factory.backend == "triton" else min(tokens, 2))  # prefill and decode gates
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = self.factory.rows(self.adapters, rows, tokens, self.device)
        self.gate = gate

    def release(self) -> None:
        self._release()


class WeightsPlan:
    """A fixed weighted mixture per routed row: slot `indices` [B, k] int64 (-1 = none), `weights` [B, k] fp32."""

    def __init__(self, factory: GateFactory, indices: torch.Tensor, weights: torch.Tensor,
                 release: Callable[[], None] = _no_release):
        self.factory, self.indices, self.weights = factory, indices, weights
        self._release = release
        self._gates: dict[tuple[int, int], LoraGate] = {}
        self.gate: LoraGate = BASE_GATE

    def begin_forward(self, input_ids, rows: int, tokens: int) -> None:
        key = (rows, tokens if self.factory.backend == "triton" else min(tokens, 2))
        gate = self._gates.get(key)
        if gate is None:
            routed = self.indices.shape[0]
            if rows % routed:
                raise RuntimeError(f"ariadne_hf: the backbone received {rows} rows but this call routed {routed}.")
            repeat = rows // routed
            gate = self._gates[key] = self.factory.mixture(
                self.indices.repeat_interleave(repeat, dim=0), self.weights.repeat_interleave(repeat, dim=0),
                tokens=tokens)
        self.gate = gate

    def release(self) -> None:
        self._release()
