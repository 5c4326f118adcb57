"""`AriadneRoutedModel`: a backbone, its LoRA adapters and a router, behaving as one causal LM."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .bundle import local_io as bundle_io
from .bundle.adapters import adapter_summary, resolve_adapter_dir
from .configuration_ariadne import AriadneConfig, validate_adapter_name, validate_routing_options
from .constants import BASE_ADAPTER
from .kernels import dense_to_topk
from .lora import LoraBank, SequencePlan, TokenRoutingPlan, WeightsPlan, install_pregate_hook, use_plan
from .lora.strategies import generate_grouped
from .lora.token_routing import SlotResolver
from .routing.build import build_router, centroids_in_space
from .routing.calibration import auto_threshold, routable_token_ids
from .routing.centroids import DEFAULT_NUM_CENTROIDS
from .routing.embedding import load_prompts
from .routing.inputs import new_tokens_mask, validate_adapter_weights, validate_token_ids
from .routing.ood import token_counts
from .routing.router import (
    AriadneRouter,
    RoutingDecision,
    chat_template_affixes,
    embedding_fingerprint,
    strip_template,
)

logger = logging.getLogger(__name__)

_UNSET: Any = object()


class AriadneRoutedModel(PreTrainedModel, GenerationMixin):
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

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_adapters(
        cls,
        base_model: str | os.PathLike | PreTrainedModel,
        adapters: Mapping[str, str | os.PathLike],
        prompts: Mapping[str, Any],
        *,
        tokenizer=None,
        num_centroids: int = DEFAULT_NUM_CENTROIDS,
        distance: str = "cosine",
        center: bool = True,
        whitening: str = "within",
        ignore_special_tokens: bool = True,
        reject_threshold: float | None = None,
        reject: str | None = None,
        reject_rate: float = 0.02,
        ood: bool | None = None,
        seed: int = 0,
        max_length: int = 512,
        batch_size: int = 64,
        text_field: str = "text",
        heldout_prompts: Mapping[str, Any] | None = None,
        revision: str | None = None,
        dtype: Any = None,
        device_map: Any = None,
        token: str | None = None,
        progress: bool = True,
        **config_kwargs: Any,
    ) -> AriadneRoutedModel:
        """Build a routed model from a backbone, PEFT LoRA adapters and a sample of each adapter's prompts.

        Training-free: each adapter's prompts are embedded in the backbone's input-embedding space (masked mean
        of token embeddings), centered on the mean of all prompts, whitened with the shrunk within-adapter
        covariance (`whitening="within"`, see `ariadne_hf.routing.whitening`) and clustered into at most `num_centroids`
        centroids (seeded k-means++; spherical for cosine). Everything is validated before the heavy work: every adapter needs prompts and vice versa,
        adapters must be LoRA folders with safetensors weights that fit the backbone.

        `heldout_prompts` (same form as `prompts`) are routed once to measure selection accuracy; the result is
        stored in the config (`routing_report`) and shown on the model card.

        The out-of-distribution threshold is always calibrated (cross-fitted on held-out folds of the prompts for
        an in-domain false-reject rate of `reject_rate`, see `ariadne_hf.routing.calibration`); `reject="auto"` applies it
        by default (rows above it go to ``"__base__"``), `reject=None` only reports `RoutingDecision.ood_scores`.
        The score's token tables are dense [A, V] (A x vocabulary int64): `ood=None` computes them for at most
        `routing.build.OOD_AUTO_MAX_ADAPTERS` (256) adapters (or when `reject="auto"`), `ood=True` always, `ood=False` never (then
        routing reads only the centroid table, as a bundle of thousands of adapters should).
        """
        adapter_order = list(adapters)
        for name in adapter_order:
            validate_adapter_name(name)
        missing_prompts = [n for n in adapter_order if n not in prompts]
        if missing_prompts:
            raise ValueError(
                f"Adapter {missing_prompts[0]!r} has no prompts: pass prompts={{{missing_prompts[0]!r}: [...]}} with "
                "a sample of the prompts it was trained on."
            )
        unknown = [n for n in prompts if n not in adapters]
        if unknown:
            raise ValueError(f"Prompts given for unknown adapter {unknown[0]!r}; adapters are {adapter_order}.")
        if not adapter_order:
            raise ValueError("from_adapters needs at least one adapter.")
        prompt_lists = {n: load_prompts(prompts[n], text_field=text_field, name=n) for n in adapter_order}
        hub_kwargs = {"token": token} if token else {}
        adapter_dirs = {n: resolve_adapter_dir(adapters[n], n, **hub_kwargs) for n in adapter_order}

        backbone, backbone_id, backbone_revision = bundle_io.load_backbone_for_build(
            base_model, revision=revision, dtype=dtype, device_map=device_map, token=token
        )
        lora = LoraBank(backbone, max_resident=config_kwargs.get("max_resident_adapters"))
        layouts = [lora.inspect(n, adapter_dirs[n]) for n in adapter_order]  # all validated before any is loaded
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(backbone_id, revision=backbone_revision, token=token)

        embed_weight = backbone.get_input_embeddings().weight.detach()  # [V, D]
        config = AriadneConfig(
            backbone_name_or_path=backbone_id,
            backbone_revision=backbone_revision,
            adapter_names=adapter_order,
            embedding_dim=int(embed_weight.shape[1]),
            embedding_vocab_size=int(embed_weight.shape[0]),
            embedding_fingerprint=embedding_fingerprint(embed_weight),
            num_centroids=num_centroids,
            distance=distance,
            center=center,
            whitening=whitening,
            ignore_special_tokens=ignore_special_tokens,
            reject_threshold=reject_threshold,
            reject=reject,
            reject_rate=reject_rate,
            max_prompt_tokens=max_length,
            **config_kwargs,
        )
        config.template_prefix_ids, config.template_suffix_ids = chat_template_affixes(tokenizer)
        built = build_router(prompt_lists, tokenizer, embed_weight, num_centroids=num_centroids, distance=distance,
                             center=center, whitening=whitening, ignore_special_tokens=ignore_special_tokens,
                             reject=reject, reject_rate=reject_rate, ood=ood, seed=seed, max_length=max_length,
                             batch_size=batch_size, progress=progress)
        tables = built.tables
        config.whitening_info = tables.whitening_info
        for layout, count in zip(layouts, tables.centroid_counts, strict=True):
            config.adapters[layout.name] = adapter_summary(layout.config, layout.source, len(prompt_lists[layout.name]),
                                                           count)
            layout.sha256 = config.adapters[layout.name]["sha256"]
        lora.add(layouts)
        model = cls(config, backbone=backbone, lora=lora, tokenizer=tokenizer)
        model.router = built.router
        if built.calibration is not None:
            config.ood_threshold, config.ood_calibration = built.calibration.threshold, built.calibration.info
        model.router.to(embed_weight.device)
        if heldout_prompts is not None:
            model.evaluate_heldout(heldout_prompts, text_field=text_field, batch_size=batch_size)
        return model

    def add_adapter(
        self,
        name: str,
        adapter: str | os.PathLike,
        prompts: Any,
        *,
        num_centroids: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        text_field: str = "text",
        progress: bool = True,
    ) -> None:
        """Add one adapter and compute only its own centroids; existing adapters and centroids are untouched.

        The shared state is kept as built: the new adapter's prompts are centered and whitened with the bundle's
        center and whitening matrix (measured cost of not refreshing them: docs/routing_quality.md). To refresh
        them, rebuild with `from_adapters` from every adapter's prompts.
        """
        validate_adapter_name(name)
        if name in self.config.adapter_names:
            raise ValueError(f"Adapter {name!r} already exists; remove_adapter({name!r}) first to replace it.")
        prompt_list = load_prompts(prompts, text_field=text_field, name=name)
        layout = self.lora.inspect(name, resolve_adapter_dir(adapter, name))  # validated; nothing changed yet
        embed_weight = self.get_input_embeddings().weight.detach()
        centroids = centroids_in_space(
            self.router, prompt_list, self.tokenizer, embed_weight, num_centroids=num_centroids or
            self.config.num_centroids, distance=self.config.distance, seed=seed, max_length=self.config.max_prompt_tokens,
            batch_size=batch_size, desc=f"embedding {name}", progress=progress)
        summary = adapter_summary(layout.config, layout.source, len(prompt_list), centroids.shape[0])
        layout.sha256 = summary["sha256"]
        counts = None
        if self.router.has_ood():  # the new adapter's token counts; the calibration becomes stale (not refit)
            counts = token_counts(routable_token_ids(prompt_list, self.tokenizer, self.router.optional_token_weights(),
                                                     max_length=self.config.max_prompt_tokens), embed_weight.shape[0])
            logger.warning("add_adapter(%r): the out-of-distribution calibration is now stale (the new adapter's "
                           "prompts were not held out); rebuild with from_adapters to recalibrate.", name)
        self.lora.add([layout])
        self.router.append_adapter(name, centroids, counts)
        self.config.adapter_names = list(self.router.adapter_names)
        self.config.adapters[name] = summary

    def remove_adapter(self, name: str) -> None:
        """Remove one adapter, its LoRA weights and its centroids; the other adapters are untouched."""
        self._check_adapter_names([name])
        if len(self.config.adapter_names) == 1:
            raise ValueError(f"Cannot remove {name!r}: a routed model needs at least one adapter.")
        self.router.drop_adapter(name)
        self.lora.remove(name)
        self.config.adapter_names = list(self.router.adapter_names)
        self.config.adapters.pop(name, None)

    # ---- loading and saving ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a bundle (local folder or Hub repo id) and its backbone; see `bundle.load_bundle`.

        Accepts the usual `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `dtype`
        (or `torch_dtype`), `device_map` and `attn_implementation`; the last three reach the backbone.
        `max_resident_adapters=N` keeps only N adapters' weights in the layers (the rest load on demand).
        """
        return bundle_io.load_bundle(cls, pretrained_model_name_or_path, **kwargs)

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

    # ---- routing ------------------------------------------------------------------------------------------
    def route(
        self,
        prompts: str | list[str] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        reject_threshold: float | None = _UNSET,
        reject: str | None = _UNSET,
        backend: str | None = None,
    ) -> RoutingDecision:
        """Route prompts (strings, tokenized with the bundle's tokenizer) or token ids [B, T] with mask [B, T].

        Guarantees: one vectorised pass (pooled lookup + one matmul); left, right or no padding give identical
        routes; rows with no routable token and rows whose best score is below the reject threshold go to
        ``"__base__"``; with `reject="auto"` (default: the config's `reject`) so do rows whose `ood_scores` exceed
        the calibrated threshold. Raises ValueError for malformed ids or ids outside the backbone's vocabulary.
        """
        if prompts is not None:
            if input_ids is not None:
                raise ValueError("route(): pass either prompts or input_ids, not both.")
            input_ids, attention_mask = self._tokenize(prompts)
        elif input_ids is None:
            raise ValueError("route(): pass prompts (list of strings) or input_ids=[B, T].")
        input_ids, attention_mask = validate_token_ids(input_ids, attention_mask, self.config.embedding_vocab_size)
        attention_mask = self._routing_mask(input_ids, attention_mask)
        embed_weight = self.get_input_embeddings().weight.detach()
        scores, best = self.router.score(
            input_ids, attention_mask, embed_weight, backend=backend or self.config.kernel_backend
        )
        threshold = self.config.reject_threshold if reject_threshold is _UNSET else reject_threshold
        reject = self.config.reject if reject is _UNSET else reject
        if reject not in (None, "auto"):
            raise ValueError(f"reject must be None or 'auto', got {reject!r}.")
        ood_threshold = auto_threshold(self.config, self.router.has_ood()) if reject == "auto" else None
        ood = self.router.ood_scores(input_ids, attention_mask, scores)  # [B] or None
        return self.router.decide(scores, best, threshold, ood, ood_threshold)

    def _routing_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The tokens routing reads: the mask minus the chat template's fixed prefix/suffix (if configured)."""
        prefix, suffix = self.config.template_prefix_ids or [], self.config.template_suffix_ids or []
        if not (prefix or suffix):
            return attention_mask
        return strip_template(input_ids, attention_mask, prefix, suffix)

    def _tokenize(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer: pass input_ids= and attention_mask= instead of strings.")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("route(): prompts must be a non-empty list of strings.")
        batch = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def _check_adapter_names(self, names: list[str]) -> None:
        known = set(self.config.adapter_names) | {BASE_ADAPTER}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"Unknown adapter name {unknown[0]!r}; this model has {self.config.adapter_names} "
                f"(and {BASE_ADAPTER!r} for the plain backbone)."
            )

    def _decision_for_call(self, input_ids, attention_mask, adapter_names, reject_threshold) -> RoutingDecision:
        if adapter_names is None:
            return self.route(input_ids=input_ids, attention_mask=attention_mask, reject_threshold=reject_threshold)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_adapter_names(names)
        if len(names) != input_ids.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {input_ids.shape[0]} rows.")
        validate_token_ids(input_ids, attention_mask, self.config.embedding_vocab_size)
        order = self.config.adapter_names
        indices = torch.tensor([order.index(n) if n in order else -1 for n in names], dtype=torch.int64)
        empty = torch.zeros(len(names), len(order))
        nan = torch.full((len(names),), float("nan"))
        return RoutingDecision(names, indices, empty, nan, list(order), ["override"] * len(names))

    # ---- inference ------------------------------------------------------------------------------------------
    def _call_options(self, **overrides) -> SimpleNamespace:
        """The config's routing options with this call's overrides (None = keep), validated."""
        fields = ("routing", "reroute_every", "routing_top_k", "routing_temperature", "generation_strategy",
                  "distance", "num_centroids", "kernel_backend")
        options = SimpleNamespace(**{f: getattr(self.config, f) for f in fields})
        for key, value in overrides.items():
            if value is not None:
                setattr(options, key, value)
        validate_routing_options(options)
        if options.routing == "token" and options.routing_top_k > len(self.adapter_names):
            raise ValueError(f"routing_top_k={options.routing_top_k} is larger than the number of adapters "
                             f"({len(self.adapter_names)}).")
        return options

    def _gate_factory(self, kernel_backend: str | None = None):
        return self.lora.factory(self.device, kernel_backend)

    def _sequence_plan(self, adapters: list[int], kernel_backend: str | None = None) -> SequencePlan:
        """The LoRA plan of one adapter index per row (-1 = the plain backbone); its adapters are made resident
        and pinned until the call ends."""
        used = {a for a in adapters if a >= 0}
        slot = self.lora.acquire(used)
        return SequencePlan(self._gate_factory(kernel_backend), [slot[a] if a >= 0 else -1 for a in adapters],
                            self.device, release=lambda: self.lora.release(used))

    def _weights_plan(self, adapter_weights, batch_size: int, kernel_backend: str | None = None) -> WeightsPlan:
        weights = validate_adapter_weights(adapter_weights, batch_size, len(self.adapter_names))  # [B, A]
        k = max(1, int((weights > 0).sum(dim=-1).max()))
        indices, values = dense_to_topk(weights, k)  # [B, k] each; zero weights -> index -1
        used = set(indices[indices >= 0].tolist())
        slot = self.lora.acquire(used)
        slots = indices.apply_(lambda a: slot[a] if a >= 0 else -1)  # [B, k] slot indices
        return WeightsPlan(self._gate_factory(kernel_backend), slots.to(self.device), values.to(self.device),
                           release=lambda: self.lora.release(used))

    def _call_plan(self, input_ids, attention_mask, adapter_names, adapter_weights, threshold, kernel_backend):
        """This call's routes and the LoRA plan that applies them (adapter_weights > adapter_names > routing)."""
        attention_mask = new_tokens_mask(input_ids, attention_mask)
        if adapter_weights is not None:
            validate_token_ids(input_ids, attention_mask, self.config.embedding_vocab_size)
            decision = self._decision_for_call(input_ids, attention_mask, None, threshold)
            return decision, self._weights_plan(adapter_weights, input_ids.shape[0], kernel_backend)
        decision = self._decision_for_call(input_ids, attention_mask, adapter_names, threshold)
        return decision, self._sequence_plan(decision.adapter_indices.tolist(), kernel_backend)

    def forward(self, input_ids=None, attention_mask=None, *, adapter_names=None, adapter_weights=None,
                reject_threshold=_UNSET, **kwargs):
        """Route each row, then run the backbone with each row's adapter; returns the backbone's output with
        `.routes` (this call's RoutingDecision). `adapter_weights` [B, A] applies a fixed weighted mixture.

        `adapter_names` may list one name per row of `input_ids`, or one per routed row when the batch holds
        each routed row repeated contiguously (as after expanding a KV cache per answer choice)."""
        if input_ids is None:
            raise ValueError("AriadneRoutedModel.forward needs input_ids (routing reads the token ids).")
        _refuse_removed_options(kwargs)
        threshold = self.config.reject_threshold if reject_threshold is _UNSET else reject_threshold
        decision, plan = self._call_plan(input_ids, attention_mask, adapter_names, adapter_weights, threshold,
                                         self.config.kernel_backend)
        with use_plan(plan):
            output = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if isinstance(output, ModelOutput):
            output.routes = decision
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
        reject_threshold: float | None = _UNSET,
        on_route: Callable[[RoutingDecision], None] | None = None,
        **kwargs,
    ):
        """Route every row, then generate with each row's adapter(s); rows come back in input order.

        Routing arguments (each overrides the config for this call only):
          `routing` "sequence" (one adapter per prompt) or "token" (re-mix adapters while decoding, with
          `reroute_every`, `routing_top_k`, `routing_temperature`); `adapter_names` forces one adapter per row
          ("__base__" allowed); `adapter_weights` [B, A] forces a fixed weighted mixture per row;
          `generation_strategy` "batched" | "grouped"; `reject_threshold`; `on_route(decision)` is called with
          this call's prompt routes.
        With `return_dict_in_generate=True` the output has `.routes` (and `.token_routes` for token routing).
        All other arguments go to transformers' `generate` (greedy, sampling, beams, num_return_sequences, ...).
        """
        _refuse_removed_options(kwargs)
        options = self._call_options(routing=routing, reroute_every=reroute_every, routing_top_k=routing_top_k,
                                     routing_temperature=routing_temperature,
                                     generation_strategy=generation_strategy)
        if input_ids is None:
            input_ids = inputs
        if kwargs.get("generation_config") is None:
            kwargs.pop("generation_config", None)
            self.backbone.generation_config = self.generation_config  # the bundle's config is the one in force
        threshold = self.config.reject_threshold if reject_threshold is _UNSET else reject_threshold
        if input_ids is None:  # e.g. the pipeline's empty prompt: nothing to route
            decision = RoutingDecision([BASE_ADAPTER], torch.tensor([-1]), torch.zeros(1, len(self.adapter_names)),
                                       torch.tensor([float("nan")]), self.adapter_names, ["empty"])
            with use_plan(self._sequence_plan([-1])):
                output = self.backbone.generate(attention_mask=attention_mask, **kwargs)
            return self._attach(output, decision, None, on_route)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        token_routing = options.routing == "token" and adapter_names is None and adapter_weights is None
        grouped = options.generation_strategy == "grouped" and adapter_weights is None and not token_routing
        if token_routing:
            if kwargs.get("num_beams", self.generation_config.num_beams or 1) > 1:
                raise ValueError("Token-level routing does not support beam search (num_beams > 1): beams are "
                                 "reordered every step. Use greedy decoding or sampling.")
            plan, decision = self._start_token_routing(input_ids, attention_mask, options, threshold)
        elif grouped:  # one plan per adapter group, made by generate_grouped
            plan, decision = None, self._decision_for_call(input_ids, attention_mask, adapter_names, threshold)
        else:
            decision, plan = self._call_plan(input_ids, attention_mask, adapter_names, adapter_weights, threshold,
                                             options.kernel_backend)
        if on_route is not None:
            on_route(decision)
        if grouped:
            output = generate_grouped(self.backbone, decision.adapter_indices.tolist(), input_ids, attention_mask,
                                      kwargs, lambda adapters: self._sequence_plan(adapters, options.kernel_backend))
        else:
            with use_plan(plan):
                output = self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self._attach(output, decision, plan.trace if token_routing else None, None)

    @staticmethod
    def _attach(output, decision, trace, on_route):
        if on_route is not None:
            on_route(decision)
        if isinstance(output, ModelOutput):
            output.routes = decision
            if trace is not None:
                output.token_routes = trace
        return output

    def _start_token_routing(self, input_ids, attention_mask, options, threshold):
        """Pool the prompt once (the running sums token routing then updates), score it, and build the plan."""
        input_ids, attention_mask = validate_token_ids(input_ids, attention_mask, self.config.embedding_vocab_size)
        attention_mask = self._routing_mask(input_ids, attention_mask)
        embed_weight = self.get_input_embeddings().weight.detach()
        scores, best, running_sum, running_weight = self.router.context(
            input_ids, attention_mask, embed_weight, backend=options.kernel_backend)
        ood = self.router.ood_scores(input_ids, attention_mask, scores)  # [B] or None: reported, not applied (the
        decision = self.router.decide(scores, best, threshold, ood)  # mixture follows the re-routed scores)
        plan = TokenRoutingPlan(
            SlotResolver(self.lora, self.device, options.kernel_backend), self.router, embed_weight, running_sum, running_weight,
            scores, reroute_every=options.reroute_every, top_k=options.routing_top_k,
            temperature=options.routing_temperature, reject_threshold=threshold, backend=options.kernel_backend,
        )
        return plan, decision

    # ---- evaluation ----------------------------------------------------------------------------------------
    def evaluate_heldout(self, prompts: Mapping[str, Any], *, text_field: str = "text", batch_size: int = 64) -> dict:
        """Route held-out prompts of known adapters; store and return the routing report (selection accuracy)."""
        from .evaluation import routing_report

        texts, labels = [], []
        for name, source in prompts.items():
            self._check_adapter_names([name])
            items = load_prompts(source, text_field=text_field, name=name)
            texts += items
            labels += [name] * len(items)
        predicted = []
        for start in range(0, len(texts), batch_size):
            predicted += self.route(texts[start : start + batch_size]).adapter_names
        report = routing_report(labels, predicted, self.adapter_names)
        self.config.routing_report = report
        for name, accuracy in report["accuracy"].items():
            self.config.adapters[name]["heldout_accuracy"] = accuracy
        return report


def _refuse_removed_options(kwargs: dict) -> None:
    if "lora_backend" in kwargs:
        raise ValueError("lora_backend was removed: every LoRA layer now runs through ariadne_hf's routed LoRA layers "
                         "(PEFT folders stay the file format). Drop the argument.")
