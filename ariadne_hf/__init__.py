"""ariadne_hf: training-free routing of prompts to LoRA adapters, as a transformers/PEFT plugin."""

from .configuration_ariadne import AriadneConfig
from .constants import BASE_ADAPTER

__version__ = "0.1.0"

__all__ = ["AriadneConfig", "BASE_ADAPTER", "__version__"]
