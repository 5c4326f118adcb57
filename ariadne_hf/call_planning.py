"""Per-call planning for `AriadneRoutedModel`: one call's options, its routes, and the LoRA plan applying them.

A call is typed end to end: `CallOptions.resolve` turns the config and the call's overrides into one frozen object
(threshold, `reject` and the resolved kernel backend included); `plan_call` reads only that object and a
`CallContext` (router, signal, LoRA bank, device: never the model) and returns a `PlannedCall` that runs itself
(`forward`, `generate`), so the model never branches on the strategy.

Precedence: ``adapter_weights`` (a fixed weighted mixture per row) > ``adapter_names`` (one forced adapter per row)
> token routing (generate only) > sequence routing. Every plan pins the adapter slots it uses until its call ends
(`lora.use_plan` releases them), so concurrent calls never evict each other's adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from .configuration_ariadne import AriadneConfig, check_adapter_names, validate_call_options
from .constants import BASE_ADAPTER, UNSET
from .kernels import dense_to_topk, resolve_backend
from .lora import LoraBank, LoraPlan, SequencePlan, TokenRoutingPlan, WeightsPlan, use_plan
from .lora.strategies import generate_grouped
from .lora.token_routing import SlotResolver, TokenRouteTrace
from .routing.inputs import new_tokens_mask, validate_adapter_weights, validate_token_ids
from .routing.route import route_decision, routing_inputs
from .routing.router import AriadneRouter, RoutingDecision
from .routing.signal import RoutingSignal


@dataclass(frozen=True)
class CallOptions:
    """Every run-time option of one call, resolved once: the config's values, overridden by the call's."""

    routing: str
    reroute_every: int
    routing_top_k: int
    routing_temperature: float
    generation_strategy: str
    reject_threshold: float | None
    reject: str | None
    kernel_backend: str  # "torch" | "triton": resolved for the call's device (argument > ARIADNE_KERNEL > auto)

    @classmethod
    def resolve(cls, config: AriadneConfig, device: torch.device, **overrides: Any) -> CallOptions:
        """`overrides` name fields of this class; None (and `UNSET`) keep the config's value, except for
        `reject_threshold` and `reject`, where only `UNSET` does (None switches them off). Raises ValueError for
        any value out of range, or a `routing_top_k` above the adapter count under token routing."""
        nullable = ("reject_threshold", "reject")
        values = {}
        for f in fields(cls):
            value = overrides.pop(f.name, UNSET)
            keep = value is UNSET or (value is None and f.name not in nullable)
            values[f.name] = getattr(config, f.name) if keep else value
        if overrides:
            raise TypeError(f"Unknown call options {sorted(overrides)}.")
        unresolved = cls(**values)
        validate_call_options(unresolved)
        if unresolved.routing == "token" and unresolved.routing_top_k > len(config.adapter_names):
            raise ValueError(f"routing_top_k={unresolved.routing_top_k} is larger than the number of adapters "
                             f"({len(config.adapter_names)}).")
        backend = resolve_backend(device, unresolved.kernel_backend, op="routed call")
        return cls(**{**values, "kernel_backend": backend})


@dataclass(frozen=True)
class CallContext:
    """What planning reads of a model: its config, router and signal, the LoRA bank and the device. `token_router`
    builds token routing's input-embedding router on demand (it raises when the model has none)."""

    config: AriadneConfig
    router: AriadneRouter
    signal: RoutingSignal
    lora: LoraBank
    device: torch.device
    token_router: Callable[[], AriadneRouter]

    def route(self, input_ids, attention_mask, options: CallOptions) -> RoutingDecision:
        """Route token ids [B, T] (mask [B, T] or None): `routing.route.route_decision` (the one path)."""
        return route_decision(self.config, self.router, self.signal, input_ids, attention_mask,
                              threshold=options.reject_threshold, reject=options.reject, backend=options.kernel_backend)


@dataclass
class PlannedCall:
    """What one call runs: `decision` (its prompt routes) and `plan` (the LoRA plan installed while it runs)."""

    decision: RoutingDecision
    plan: LoraPlan | None

    @property
    def trace(self) -> TokenRouteTrace | None:
        """The token-routing trace (token routing only)."""
        return self.plan.trace if isinstance(self.plan, TokenRoutingPlan) else None

    def forward(self, backbone, **kwargs):
        """The backbone's forward under this call's plan."""
        with use_plan(self.plan):
            return backbone(**kwargs)

    def generate(self, backbone, input_ids, attention_mask, kwargs: dict):
        """The backbone's `generate` under this call's plan (`input_ids` None: e.g. the pipeline's empty prompt)."""
        ids = {} if input_ids is None else {"input_ids": input_ids}
        with use_plan(self.plan):
            return backbone.generate(**ids, attention_mask=attention_mask, **kwargs)


@dataclass
class GroupedCall(PlannedCall):
    """The grouped generation strategy: one `generate` per routed adapter group (`lora.strategies`), each under its
    own `SequencePlan` from `plan_for(adapter index per row)`."""

    plan_for: Callable[[list[int]], SequencePlan] | None = None

    def generate(self, backbone, input_ids, attention_mask, kwargs: dict):
        return generate_grouped(backbone, self.decision.adapter_indices.tolist(), input_ids, attention_mask, kwargs,
                                self.plan_for)


def forced_decision(config, input_ids, attention_mask, adapter_names) -> RoutingDecision:
    """The decision of a call that names one adapter per row ("override" reason, no scores)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    check_adapter_names(config, names)
    if len(names) != input_ids.shape[0]:
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {input_ids.shape[0]} rows.")
    validate_token_ids(input_ids, attention_mask, config.embedding_vocab_size)
    order = list(config.adapter_names)
    indices = torch.tensor([order.index(n) if n in order else -1 for n in names], dtype=torch.int64)
    nan = torch.full((len(names),), float("nan"))
    return RoutingDecision(names, indices, torch.zeros(len(names), len(order)), nan, order, ["override"] * len(names))


def empty_decision(config) -> RoutingDecision:
    """The decision of a call without prompt ids (e.g. the pipeline's empty prompt): the plain backbone."""
    return RoutingDecision([BASE_ADAPTER], torch.tensor([-1]), torch.zeros(1, len(config.adapter_names)),
                           torch.tensor([float("nan")]), list(config.adapter_names), ["empty"])


def sequence_plan(lora: LoraBank, device: torch.device, adapters: list[int],
                  kernel_backend: str | None = None) -> SequencePlan:
    """The LoRA plan of one adapter index per row (-1 = the plain backbone); its adapters are made resident and
    pinned until the call ends."""
    used = {a for a in adapters if a >= 0}
    slot = lora.acquire(used)
    return SequencePlan(lora.factory(device, kernel_backend), [slot[a] if a >= 0 else -1 for a in adapters], device,
                        release=lambda: lora.release(used))


def weights_plan(context: CallContext, adapter_weights, batch_size: int, kernel_backend: str) -> WeightsPlan:
    """The LoRA plan of a fixed weighted mixture per row; `adapter_weights` [B, A] is validated here."""
    lora, device = context.lora, context.device
    weights = validate_adapter_weights(adapter_weights, batch_size, len(context.config.adapter_names))  # [B, A]
    k = max(1, int((weights > 0).sum(dim=-1).max()))
    indices, values = dense_to_topk(weights, k)  # [B, k] each; zero weights -> index -1
    used = set(indices[indices >= 0].tolist())
    slot = lora.acquire(used)
    slots = indices.apply_(lambda a: slot[a] if a >= 0 else -1)  # [B, k] slot indices
    return WeightsPlan(lora.factory(device, kernel_backend), slots.to(device), values.to(device),
                       release=lambda: lora.release(used))


def token_routing_call(context: CallContext, input_ids, attention_mask, options: CallOptions) -> PlannedCall:
    """Pool the prompt once (the running sums token routing then updates), score it, and build the plan.

    Token routing always routes on the input embedding (`context.token_router()`): the running sums are updated
    with one embedding row per generated token, which a layer-k signal could not do without a base pass per token."""
    router, embed_weight = context.token_router(), context.signal.embed_weight
    input_ids, attention_mask = routing_inputs(context.config, input_ids, attention_mask)
    scores, best, running_sum, running_weight = router.context(input_ids, attention_mask, embed_weight,
                                                               backend=options.kernel_backend)
    ood = router.ood_scores(input_ids, attention_mask, scores)  # [B] or None (no ood tables on the embedding router
    # of a routing_layer > 0 model: its calibration is the layer-k router's): reported, not applied (the mixture
    decision = router.decide(scores, best, options.reject_threshold, ood)  # follows the re-routed scores)
    plan = TokenRoutingPlan(
        SlotResolver(context.lora, context.device, options.kernel_backend), router, embed_weight, running_sum,
        running_weight, scores, reroute_every=options.reroute_every, top_k=options.routing_top_k,
        temperature=options.routing_temperature, reject_threshold=options.reject_threshold,
        backend=options.kernel_backend,
    )
    return PlannedCall(decision, plan)


def plan_call(context: CallContext, options: CallOptions, input_ids, attention_mask, *, adapter_names=None,
              adapter_weights=None, generating: bool, num_beams: int = 1) -> PlannedCall:
    """This call's routes and the LoRA plan that applies them (precedence in the module docstring).

    `generating=False` (forward) always plans per sequence: token routing and the grouped strategy are
    generation strategies. Raises ValueError for bad ids, names or weights before any adapter is loaded."""
    backend, config = options.kernel_backend, context.config
    if input_ids is None:
        return PlannedCall(empty_decision(config), sequence_plan(context.lora, context.device, [-1], backend))
    forced = adapter_names is not None or adapter_weights is not None
    if generating and not forced and options.routing == "token":
        if num_beams > 1:
            raise ValueError("Token-level routing does not support beam search (num_beams > 1): beams are "
                             "reordered every step. Use greedy decoding or sampling.")
        return token_routing_call(context, input_ids, attention_mask, options)
    if generating and adapter_weights is None and options.generation_strategy == "grouped":
        decision = (forced_decision(config, input_ids, attention_mask, adapter_names) if adapter_names is not None
                    else context.route(input_ids, attention_mask, options))
        return GroupedCall(decision, None, lambda rows: sequence_plan(context.lora, context.device, rows, backend))
    attention_mask = new_tokens_mask(input_ids, attention_mask)
    if adapter_weights is not None:  # context.route validates the ids
        decision = context.route(input_ids, attention_mask, options)
        return PlannedCall(decision, weights_plan(context, adapter_weights, input_ids.shape[0], backend))
    decision = (forced_decision(config, input_ids, attention_mask, adapter_names) if adapter_names is not None
                else context.route(input_ids, attention_mask, options))
    return PlannedCall(decision, sequence_plan(context.lora, context.device, decision.adapter_indices.tolist(), backend))
