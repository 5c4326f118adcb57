"""Run-time LoRA: routed LoRA layers holding every adapter once, per-call plans and the per-step gate.

Data path: a call builds a plan (`plans.SequencePlan`, `plans.WeightsPlan`, `token_routing.TokenRoutingPlan`) and
makes it active (`plans.use_plan`); the backbone's forward pre-hook asks the plan for this pass's `gate.LoraGate`
once, before the first layer (pre-gating); every `layer.RoutedLoraLinear` reads that gate. `bank.LoraBank` owns
the adapters (PEFT folders read straight into the layers' stacked buffers, `peft_files`).
"""

from .bank import LoraBank
from .gate import GateFactory, LoraGate
from .layer import RoutedLoraLinear
from .plans import (
    FixedGatePlan,
    LoraPlan,
    SequencePlan,
    WeightsPlan,
    base_weights_only,
    install_pregate_hook,
    use_plan,
)
from .token_routing import TokenRouteTrace, TokenRoutingPlan, mixture_from_scores

__all__ = [
    "FixedGatePlan",
    "GateFactory",
    "LoraBank",
    "LoraGate",
    "LoraPlan",
    "RoutedLoraLinear",
    "SequencePlan",
    "TokenRouteTrace",
    "TokenRoutingPlan",
    "WeightsPlan",
    "base_weights_only",
    "install_pregate_hook",
    "mixture_from_scores",
    "use_plan",
]
