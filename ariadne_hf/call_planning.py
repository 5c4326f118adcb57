"""Per-call planning for `AriadneRoutedModel`: this call's routing options, its routes, and the LoRA plan applying them.

`plan_call` is the one entry point of `forward` and `generate`. Precedence: ``adapter_weights`` (a fixed weighted
mixture per row) > ``adapter_names`` (one forced adapter per row) > token routing (generate only) > sequence
routing. Every plan pins the adapter slots it uses until its call ends (`lora.use_plan` releases them), so
concurrent calls never evict each other's adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .configuration_ariadne import check_adapter_names, validate_routing_options
from .constants import BASE_ADAPTER
from .kernels import dense_to_topk
from .lora import SequencePlan, TokenRoutingPlan, WeightsPlan
from .lora.token_routing import SlotResolver, TokenRouteTrace
from .routing.inputs import new_tokens_mask, validate_adapter_weights, validate_token_ids
from .routing.route import route_decision, routing_inputs
from .routing.router import RoutingDecision

OPTION_FIELDS = ("routing", "reroute_every", "routing_top_k", "routing_temperature", "generation_strategy",
                 "kernel_backend", "distance", "num_centroids", "routing_layer")


@dataclass
class PlannedCall:
    """What one call runs: `decision` (its prompt routes) and either `plan` (install with `use_plan`) or, for the
    grouped strategy, `plan_for` (adapter index per row -> that group's `SequencePlan`)."""

    decision: RoutingDecision
    plan: SequencePlan | WeightsPlan | TokenRoutingPlan | None
    plan_for: Callable[[list[int]], SequencePlan] | None = None

    @property
    def trace(self) -> TokenRouteTrace | None:
        """The token-routing trace (token routing only)."""
        return getattr(self.plan, "trace", None)


def call_options(config, **overrides) -> SimpleNamespace:
    """The config's routing options with this call's overrides (None = keep the config's), validated."""
    options = SimpleNamespace(**{f: getattr(config, f) for f in OPTION_FIELDS})
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    validate_routing_options(options)
    if options.routing == "token" and options.routing_top_k > len(config.adapter_names):
        raise ValueError(f"routing_top_k={options.routing_top_k} is larger than the number of adapters "
                         f"({len(config.adapter_names)}).")
    return options


def route_ids(model, input_ids, attention_mask, *, threshold, reject, backend) -> RoutingDecision:
    """Route token ids [B, T] with `model`'s router and signal: `routing.route.route_decision` (the one path)."""
    return route_decision(model.config, model.router, model.routing_signal, input_ids, attention_mask,
                          threshold=threshold, reject=reject, backend=backend)


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


def sequence_plan(model, adapters: list[int], kernel_backend: str | None = None) -> SequencePlan:
    """The LoRA plan of one adapter index per row (-1 = the plain backbone); its adapters are made resident and
    pinned until the call ends."""
    used = {a for a in adapters if a >= 0}
    slot = model.lora.acquire(used)
    return SequencePlan(model.lora.factory(model.device, kernel_backend), [slot[a] if a >= 0 else -1 for a in adapters],
                        model.device, release=lambda: model.lora.release(used))


def weights_plan(model, adapter_weights, batch_size: int, kernel_backend: str | None = None) -> WeightsPlan:
    """The LoRA plan of a fixed weighted mixture per row; `adapter_weights` [B, A] is validated here."""
    weights = validate_adapter_weights(adapter_weights, batch_size, len(model.config.adapter_names))  # [B, A]
    k = max(1, int((weights > 0).sum(dim=-1).max()))
    indices, values = dense_to_topk(weights, k)  # [B, k] each; zero weights -> index -1
    used = set(indices[indices >= 0].tolist())
    slot = model.lora.acquire(used)
    slots = indices.apply_(lambda a: slot[a] if a >= 0 else -1)  # [B, k] slot indices
    return WeightsPlan(model.lora.factory(model.device, kernel_backend), slots.to(model.device),
                       values.to(model.device), release=lambda: model.lora.release(used))


def token_routing_call(model, input_ids, attention_mask, options, threshold) -> PlannedCall:
    """Pool the prompt once (the running sums token routing then updates), score it, and build the plan.

    Token routing always routes on the input embedding (`model.token_router`): the running sums are updated with
    one embedding row per generated token, which a layer-k signal could not do without a base pass per token."""
    config, router = model.config, model.token_router  # the input-embedding router (for every routing_layer)
    input_ids, attention_mask = routing_inputs(config, input_ids, attention_mask)
    embed_weight = model.get_input_embeddings().weight.detach()
    scores, best, running_sum, running_weight = router.context(input_ids, attention_mask, embed_weight,
                                                               backend=options.kernel_backend)
    ood = router.ood_scores(input_ids, attention_mask, scores)  # [B] or None (no ood tables on the embedding router
    # of a routing_layer > 0 model: its calibration is the layer-k router's): reported, not applied (the mixture
    decision = router.decide(scores, best, threshold, ood)  # follows the re-routed scores)
    plan = TokenRoutingPlan(
        SlotResolver(model.lora, model.device, options.kernel_backend), router, embed_weight, running_sum,
        running_weight, scores, reroute_every=options.reroute_every, top_k=options.routing_top_k,
        temperature=options.routing_temperature, reject_threshold=threshold, backend=options.kernel_backend,
    )
    return PlannedCall(decision, plan)


def plan_call(model, input_ids, attention_mask, *, adapter_names=None, adapter_weights=None, threshold=None,
              options: SimpleNamespace, generating: bool, num_beams: int = 1) -> PlannedCall:
    """This call's routes and the LoRA plan that applies them (precedence in the module docstring).

    `generating=False` (forward) always plans per sequence: token routing and the grouped strategy are
    generation strategies. Raises ValueError for bad ids, names or weights before any adapter is loaded."""
    if input_ids is None:
        return PlannedCall(empty_decision(model.config), sequence_plan(model, [-1]))
    forced = adapter_names is not None or adapter_weights is not None
    if generating and not forced and options.routing == "token":
        if num_beams > 1:
            raise ValueError("Token-level routing does not support beam search (num_beams > 1): beams are "
                             "reordered every step. Use greedy decoding or sampling.")
        return token_routing_call(model, input_ids, attention_mask, options, threshold)
    if generating and adapter_weights is None and options.generation_strategy == "grouped":
        decision = (forced_decision(model.config, input_ids, attention_mask, adapter_names) if adapter_names is not None
                    else route_ids(model, input_ids, attention_mask, threshold=threshold, reject=model.config.reject,
                                   backend=options.kernel_backend))
        return PlannedCall(decision, None, lambda adapters: sequence_plan(model, adapters, options.kernel_backend))
    attention_mask = new_tokens_mask(input_ids, attention_mask)
    if adapter_weights is not None:  # route_ids validates the ids
        decision = route_ids(model, input_ids, attention_mask, threshold=threshold, reject=model.config.reject,
                             backend=options.kernel_backend)
        return PlannedCall(decision, weights_plan(model, adapter_weights, input_ids.shape[0], options.kernel_backend))
    if adapter_names is not None:
        decision = forced_decision(model.config, input_ids, attention_mask, adapter_names)
    else:
        decision = route_ids(model, input_ids, attention_mask, threshold=threshold, reject=model.config.reject,
                             backend=options.kernel_backend)
    return PlannedCall(decision, sequence_plan(model, decision.adapter_indices.tolist(), options.kernel_backend))
