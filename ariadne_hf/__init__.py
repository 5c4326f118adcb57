"""ariadne_hf: training-free routing of prompts to LoRA adapters, as a transformers/PEFT plugin.

`import ariadne_hf` registers model_type "ariadne" with AutoConfig, AutoModel and AutoModelForCausalLM, so a
bundle loads with `AutoModelForCausalLM.from_pretrained(path_or_repo)` and works in `pipeline("text-generation")`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ._version import __version__
from .bundle.errors import AdapterError, BundleError, BundleFilesError
from .configuration_ariadne import AriadneConfig
from .constants import BASE_ADAPTER
from .modeling_ariadne import AriadneRoutedModel
from .routing.router import RoutingDecision

AutoConfig.register("ariadne", AriadneConfig, exist_ok=True)
AutoModel.register(AriadneConfig, AriadneRoutedModel, exist_ok=True)
AutoModelForCausalLM.register(AriadneConfig, AriadneRoutedModel, exist_ok=True)

__all__ = [
    "AdapterError",
    "AriadneConfig",
    "AriadneRoutedModel",
    "BASE_ADAPTER",
    "BundleError",
    "BundleFilesError",
    "RoutingDecision",
    "__version__",
]
