"""`AriadneRoutedModel`: a backbone, its LoRA adapters and a router, behaving as one causal LM."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .building import BuildingMixin
from .bundle import local_io as bundle_io
from .call_planning import CallContext, CallOptions, plan_call
from .configuration_ariadne import AriadneConfig
from .constants import UNSET
from .loading import load_bundle
from .lora import LoraBank, base_weights_only, install_pregate_hook
from .routing.inputs import prompt_ids
from .routing.router import AriadneRouter, RoutingDecision
from .routing.signal import RoutingSignal, signal_for


class AriadneRoutedModel(BuildingMixin, PreTrainedModel, GenerationMixin):
    """A causal LM that routes every prompt to one of its LoRA adapters (ARIADNE nearest-centroid routing).

    Build one with `from_adapters`, load one with `from_pretrained` (or the Auto classes after
    `import ariadne_hf`). `generate` and `forward` route each row themselves; `route` shows the decision.
    Per-call state lives in the call (a context variable), so concurrent calls on one model are independent.
    """

    config_class = AriadneConfig
    base_model_prefix = "ariadne"
    main_input_name = "input_ids"
    _keys_to_ignore_on_save = None

    def __init__(self, config: AriadneConfig, backbone: PreTrainedModel | None = None, lora: LoraBank | None = None,
                 tokenizer=None):
        super().__init__(config)
        if backbone is None or lora is None:
            raise ValueError(
                "AriadneRoutedModel needs its backbone and adapters: build it with AriadneRoutedModel.from_adapters("
                "...) or load a bundle with from_pretrained(path_or_repo_id); from_config() is not supported."
            )
        if lora.names != list(config.adapter_names):
            raise ValueError(f"The LoRA bank holds {lora.names} but the config routes to {config.adapter_names}.")
        self.router = AriadneRouter(config.adapter_names, config.embedding_dim, config.distance)
        self.embedding_router: AriadneRouter | None = None  # token routing's input-embedding router (routing_layer > 0)
        self.backbone = backbone  # the transformers model, with RoutedLoraLinear layers swapped in
        self.lora = lora
        self.tokenizer = tokenizer
        backbone_generation = getattr(backbone, "generation_config", None)
        if backbone_generation is not None:
            self.generation_config = backbone_generation
        install_pregate_hook(backbone)
        self.post_init()

    def init_weights(self):
        """No-op: the backbone and adapters arrive loaded, and the router is filled by its builder or loader.

        (PreTrainedModel.post_init would otherwise re-initialise the freshly loaded LoRA weights.)"""

    def _init_weights(self, module):
        """No-op, see `init_weights`."""

    # ---- loading and saving ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a bundle (local folder or Hub repo id) and its backbone; see `loading.load_bundle`.

        Accepts the usual `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `dtype`
        (or `torch_dtype`), `device_map` and `attn_implementation`; the last three reach the backbone.
        Run-time config fields override the bundle's for this model (`configuration_ariadne.RUN_TIME_FIELDS`:
        e.g. `routing="token"`, `max_resident_adapters=N`), given as keywords or through `config=` (as the Auto
        classes pass them); a `config=` that changes any other field, and any unknown argument, is an error.
        """
        if model_args:
            raise TypeError(f"AriadneRoutedModel.from_pretrained takes no positional model arguments, got {model_args}.")
        return load_bundle(cls, pretrained_model_name_or_path, config=config, **kwargs)

    def save_pretrained(self, save_directory, *, include_backbone: bool = False, push_to_hub: bool = False,
                        is_main_process: bool = True, safe_serialization: bool = True, **kwargs) -> None:
        """Write the bundle: config, router safetensors, adapters/<name>/, tokenizer, generation config, card.

        With `include_backbone=True` the backbone is stored under base/ and the bundle is self-contained.
        `is_main_process=False` writes nothing (distributed saving); bundles are safetensors only. Any other
        argument is an error naming it (transformers' sharding/format options do not apply to a bundle).
        """
        if kwargs:
            raise TypeError(
                f"AriadneRoutedModel.save_pretrained got unexpected argument(s) {sorted(kwargs)}; it accepts "
                "save_directory, include_backbone, is_main_process and safe_serialization=True."
            )
        if push_to_hub:
            raise ValueError("Use model.push_to_hub(repo_id) to upload a bundle.")
        if not safe_serialization:
            raise ValueError("ARIADNE bundles are written as safetensors only (safe_serialization=False is refused).")
        if not is_main_process:
            return
        bundle_io.write_bundle(self, save_directory, include_backbone=include_backbone)

    def push_to_hub(self, repo_id: str, *, include_backbone: bool = False, **kwargs):
        """Upload the whole bundle in one commit (see `hub.push_bundle` for the keyword arguments)."""
        from .bundle.hub import push_bundle

        return push_bundle(lambda d: self.save_pretrained(d, include_backbone=include_backbone), repo_id, **kwargs)

    # ---- accessors ---------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.config.adapter_names)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self):
        return self.backbone.get_output_embeddings()

    @property
    def token_router(self) -> AriadneRouter:
        """The router token routing scores with: it re-routes on the input embedding while decoding, so for
        routing_layer > 0 it is the input-embedding router built alongside (`embedding_router`), else `router`."""
        if not self.config.routing_layer:
            return self.router
        if self.embedding_router is None:
            raise ValueError(f"Token-level routing re-routes on the input embedding, and this routing_layer="
                             f"{self.config.routing_layer} model has no input-embedding router. Rebuild it with "
                             "from_adapters, or use routing='sequence'.")
        return self.embedding_router

    @property
    def routing_signal(self) -> RoutingSignal:
        """What this model routes on (`config.routing_layer`, see `routing.signal`), over its own backbone."""
        layer = self.config.routing_layer
        cached = getattr(self, "_routing_signal_cache", None)
        if cached is None or cached[0] != layer:
            cached = (layer, signal_for(self.backbone, layer, base_weights=base_weights_only).hidden)
            self._routing_signal_cache = cached
        return RoutingSignal(self.get_input_embeddings().weight.detach(), cached[1])

    def call_context(self) -> CallContext:
        """What one call's planning reads of this model (router, signal, LoRA bank, device), as it is now."""
        return CallContext(self.config, self.router, self.routing_signal, self.lora, self.device,
                           lambda: self.token_router)

    # ---- routing ------------------------------------------------------------------------------------------
    def route(
        self,
        prompts: str | list[str] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        reject_threshold: float | None = UNSET,
        reject: str | None = UNSET,
        backend: str | None = None,
    ) -> RoutingDecision:
        """Route prompts (strings, tokenized with the bundle's tokenizer) or token ids [B, T] with mask [B, T].

        Guarantees: one vectorised pass (pooled lookup + one matmul); left, right or no padding give identical
        routes; rows with no routable token and rows whose best score is below the reject threshold go to
        ``"__base__"``; with `reject="auto"` (default: the config's `reject`) so do rows whose `ood_scores` exceed
        the calibrated threshold. Raises ValueError for malformed ids or ids outside the backbone's vocabulary.
        """
        input_ids, attention_mask = prompt_ids(self.tokenizer, prompts, input_ids, attention_mask)
        options = CallOptions.resolve(self.config, self.device, reject_threshold=reject_threshold, reject=reject,
                                      kernel_backend=backend)
        return self.call_context().route(input_ids, attention_mask, options)

    # ---- inference ------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, *, adapter_names=None, adapter_weights=None,
                reject_threshold=UNSET, **kwargs):
        """Route each row, then run the backbone with each row's adapter; returns the backbone's output with
        `.routes` (this call's RoutingDecision). `adapter_weights` [B, A] applies a fixed weighted mixture.

        `adapter_names` may list one name per row of `input_ids`, or one per routed row when the batch holds
        each routed row repeated contiguously (as after expanding a KV cache per answer choice)."""
        if input_ids is None:
            raise ValueError("AriadneRoutedModel.forward needs input_ids (routing reads the token ids).")
        options = CallOptions.resolve(self.config, self.device, reject_threshold=reject_threshold)
        call = plan_call(self.call_context(), options, input_ids, attention_mask, adapter_names=adapter_names,
                         adapter_weights=adapter_weights, generating=False)
        output = call.forward(self.backbone, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if isinstance(output, ModelOutput):
            output.routes = call.decision
        return output

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        adapter_names: list[str] | str | None = None,
        adapter_weights: torch.Tensor | None = None,
        routing: str | None = None,
        reroute_every: int | None = None,
        routing_top_k: int | None = None,
        routing_temperature: float | None = None,
        generation_strategy: str | None = None,
        reject_threshold: float | None = UNSET,
        on_route: Callable[[RoutingDecision], None] | None = None,
        **kwargs,
    ):
        """Route every row, then generate with each row's adapter(s); rows come back in input order.

        Routing arguments (each overrides the config for this call only):
          `routing` "sequence" (one adapter per prompt) or "token" (re-mix adapters while decoding, with
          `reroute_every`, `routing_top_k`, `routing_temperature`); `adapter_names` forces one adapter per row
          ("__base__" allowed); `adapter_weights` [B, A] forces a fixed weighted mixture per row;
          `generation_strategy` "batched" | "grouped"; `reject_threshold`; `on_route(decision)` is called with
          this call's prompt routes before decoding starts.
        With `return_dict_in_generate=True` the output has `.routes` (and `.token_routes` for token routing).
        All other arguments go to transformers' `generate` (greedy, sampling, beams, num_return_sequences, ...).
        """
        options = CallOptions.resolve(self.config, self.device, routing=routing, reroute_every=reroute_every,
                                      routing_top_k=routing_top_k, routing_temperature=routing_temperature,
                                      generation_strategy=generation_strategy, reject_threshold=reject_threshold)
        input_ids = inputs if input_ids is None else input_ids
        if kwargs.get("generation_config") is None:
            kwargs.pop("generation_config", None)
            self.backbone.generation_config = self.generation_config  # the bundle's config is the one in force
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        call = plan_call(self.call_context(), options, input_ids, attention_mask, adapter_names=adapter_names,
                         adapter_weights=adapter_weights, generating=True,
                         num_beams=kwargs.get("num_beams", self.generation_config.num_beams or 1))
        if on_route is not None:
            on_route(call.decision)
        output = call.generate(self.backbone, input_ids, attention_mask, kwargs)
        if isinstance(output, ModelOutput):
            output.routes = call.decision
            if call.trace is not None:
                output.token_routes = call.trace
        return output

