"""Building a routed model from PEFT adapters and changing its adapter set: `BuildingMixin` of `AriadneRoutedModel`.

`from_adapters` validates everything before the heavy work (names, prompts, every adapter folder against the
backbone), then runs the one router build pipeline (`routing.build.build_router`) and fills the LoRA bank.
`add_adapter` embeds only the new adapter's prompts in the existing routing space (`routing.build.centroids_in_space`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from transformers import AutoTokenizer

from .bundle.adapters import adapter_summary, resolve_adapter_dir
from .configuration_ariadne import AriadneConfig, check_adapter_names, validate_adapter_name
from .loading import load_backbone_for_build
from .lora import LoraBank, base_weights_only
from .routing.build import build_router, centroids_in_space
from .routing.calibration import routable_token_ids
from .routing.centroids import DEFAULT_NUM_CENTROIDS
from .routing.embedding import load_prompts
from .routing.report import routing_report
from .routing.router import chat_template_affixes, embedding_fingerprint
from .routing.signal import auto_routing_layer, check_routing_layer, signal_for, text_config

logger = logging.getLogger(__name__)


def _check_adapters_and_prompts(adapters: Mapping[str, Any], prompts: Mapping[str, Any]) -> list[str]:
    """The adapter order; raises ValueError unless every adapter has prompts and every prompt set an adapter."""
    order = list(adapters)
    for name in order:
        validate_adapter_name(name)
    missing = [n for n in order if n not in prompts]
    if missing:
        raise ValueError(f"Adapter {missing[0]!r} has no prompts: pass prompts={{{missing[0]!r}: [...]}} with a sample "
                         "of the prompts it was trained on.")
    unknown = [n for n in prompts if n not in adapters]
    if unknown:
        raise ValueError(f"Prompts given for unknown adapter {unknown[0]!r}; adapters are {order}.")
    if not order:
        raise ValueError("from_adapters needs at least one adapter.")
    return order


class BuildingMixin:
    """`from_adapters`, `add_adapter`, `remove_adapter`, `evaluate_heldout` (mixed into `AriadneRoutedModel`)."""

    @classmethod
    def from_adapters(
        cls,
        base_model: str | os.PathLike | Any,
        adapters: Mapping[str, str | os.PathLike],
        prompts: Mapping[str, Any],
        *,
        tokenizer=None,
        num_centroids: int = DEFAULT_NUM_CENTROIDS,
        distance: str = "cosine",
        center: bool = True,
        whitening: str = "within",
        ignore_special_tokens: bool = True,
        routing_layer: int | str = "auto",
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
    ):
        """Build a routed model from a backbone, PEFT LoRA adapters and a sample of each adapter's prompts.

        Training-free: each adapter's prompts are embedded in the routing signal's space (`routing_layer` 0: the
        masked mean of the backbone's input token embeddings; k > 0: the masked mean of its base hidden state after
        decoder layer k over the routable tokens, see `ariadne_hf.routing.signal`; "auto", the default: layer
        round(8/30 x depth), e.g. 8 for SmolLM2-135M's 30 layers, 0 for backbones under 12 layers), centered on the mean of all prompts, whitened with the shrunk within-adapter
        covariance (`whitening="within"`, see `ariadne_hf.routing.whitening`) and clustered into at most
        `num_centroids` centroids (seeded k-means++; spherical for cosine). Everything is validated before the heavy
        work: every adapter needs prompts and vice versa, adapters must be LoRA folders with safetensors weights that
        fit the backbone. Other keyword arguments are `AriadneConfig` fields (e.g. `routing="token"`,
        `max_resident_adapters=64`).

        `heldout_prompts` (same form as `prompts`) are routed once to measure selection accuracy; the result is
        stored in the config (`routing_report`) and shown on the model card.

        The out-of-distribution threshold is always calibrated (cross-fitted on held-out folds of the prompts for
        an in-domain false-reject rate of `reject_rate`, see `ariadne_hf.routing.calibration`); `reject="auto"`
        applies it by default (rows above it go to ``"__base__"``), `reject=None` only reports
        `RoutingDecision.ood_scores`. The score's token tables are sparse (only the tokens each adapter's prompts
        contain, `routing.ood.SparseTokenCounts`; looked up by binary search, flat in the adapter count): `ood=None`
        and `ood=True` compute them, `ood=False` never (then routing reads only the centroid table).
        """
        order = _check_adapters_and_prompts(adapters, prompts)
        if routing_layer != "auto":
            check_routing_layer(routing_layer, None)
        prompt_lists = {n: load_prompts(prompts[n], text_field=text_field, name=n) for n in order}
        adapter_dirs = {n: resolve_adapter_dir(adapters[n], n, **({"token": token} if token else {})) for n in order}
        backbone, backbone_id, backbone_revision = load_backbone_for_build(
            base_model, revision=revision, dtype=dtype, device_map=device_map, token=token)
        lora = LoraBank(backbone, max_resident=config_kwargs.get("max_resident_adapters"))
        layouts = [lora.inspect(n, adapter_dirs[n]) for n in order]  # all validated before any is loaded
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(backbone_id, revision=backbone_revision, token=token)
        embed_weight = backbone.get_input_embeddings().weight.detach()  # [V, D]
        num_layers = int(text_config(backbone.config).num_hidden_layers)
        routing_layer = auto_routing_layer(num_layers) if routing_layer == "auto" else routing_layer
        check_routing_layer(routing_layer, num_layers)
        config = AriadneConfig(
            backbone_name_or_path=backbone_id, backbone_revision=backbone_revision, adapter_names=order,
            embedding_dim=int(embed_weight.shape[1]), embedding_vocab_size=int(embed_weight.shape[0]),
            embedding_fingerprint=embedding_fingerprint(embed_weight), num_centroids=num_centroids, distance=distance,
            center=center, whitening=whitening, ignore_special_tokens=ignore_special_tokens,
            routing_layer=routing_layer, reject_threshold=reject_threshold, reject=reject, reject_rate=reject_rate, max_prompt_tokens=max_length,
            **config_kwargs,
        )
        config.template_prefix_ids, config.template_suffix_ids = chat_template_affixes(tokenizer)
        signal = signal_for(backbone, routing_layer, base_weights=base_weights_only)
        built = build_router(prompt_lists, tokenizer, embed_weight, num_centroids=num_centroids, distance=distance,
                             center=center, whitening=whitening, ignore_special_tokens=ignore_special_tokens,
                             reject=reject, reject_rate=reject_rate, ood=ood, seed=seed, max_length=max_length,
                             batch_size=batch_size, progress=progress, signal=signal)
        config.whitening_info = built.tables.whitening_info
        for layout, count in zip(layouts, built.tables.centroid_counts, strict=True):
            summary = adapter_summary(layout.config, layout.source, len(prompt_lists[layout.name]), count)
            config.adapters[layout.name], layout.sha256 = summary, summary["sha256"]
        if built.calibration is not None:
            config.ood_threshold, config.ood_calibration = built.calibration.threshold, built.calibration.info
        lora.add(layouts)
        model = cls(config, backbone=backbone, lora=lora, tokenizer=tokenizer)
        model.router = built.router.to(embed_weight.device)
        if routing_layer:  # token routing re-routes on the input embedding: its own table in that space
            model.embedding_router = build_router(
                prompt_lists, tokenizer, embed_weight, num_centroids=num_centroids, distance=distance, center=center,
                whitening=whitening, ignore_special_tokens=ignore_special_tokens, ood=False, seed=seed,
                max_length=max_length, batch_size=batch_size, progress=False).router.to(embed_weight.device)
        if heldout_prompts is not None:
            model.evaluate_heldout(heldout_prompts, text_field=text_field, batch_size=batch_size)
        return model

    def add_adapter(self, name: str, adapter: str | os.PathLike, prompts: Any, *, num_centroids: int | None = None,
                    seed: int = 0, batch_size: int = 64, text_field: str = "text", progress: bool = True) -> None:
        """Add one adapter and compute only its own centroids; existing adapters and centroids are untouched.

        The shared state is kept as built: the new adapter's prompts are centered and whitened with the bundle's
        center and whitening matrix (measured cost of not refreshing them: docs/routing_quality.md). To refresh
        them, rebuild with `from_adapters` from every adapter's prompts. Everything is validated before anything
        changes; an error leaves the model as it was.
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
            batch_size=batch_size, desc=f"embedding {name}", progress=progress, signal=self.routing_signal)
        summary = adapter_summary(layout.config, layout.source, len(prompt_list), centroids.shape[0])
        layout.sha256 = summary["sha256"]
        counts = None
        if self.router.has_ood():  # the new adapter's token counts; the calibration becomes stale (not refit)
            counts = routable_token_ids(prompt_list, self.tokenizer, self.router.optional_token_weights(),
                                        max_length=self.config.max_prompt_tokens)
            logger.warning("add_adapter(%r): the out-of-distribution calibration is now stale (the new adapter's "
                           "prompts were not held out); rebuild with from_adapters to recalibrate.", name)
        embedding_centroids = None if self.embedding_router is None else centroids_in_space(
            self.embedding_router, prompt_list, self.tokenizer, embed_weight, num_centroids=num_centroids or
            self.config.num_centroids, distance=self.config.distance, seed=seed, max_length=self.config.max_prompt_tokens,
            batch_size=batch_size, progress=False)
        self.lora.add([layout])
        self.router.append_adapter(name, centroids, counts)
        if embedding_centroids is not None:
            self.embedding_router.append_adapter(name, embedding_centroids)
        self.config.adapter_names = list(self.router.adapter_names)
        self.config.adapters[name] = summary

    def remove_adapter(self, name: str) -> None:
        """Remove one adapter, its LoRA weights and its centroids; the other adapters are untouched."""
        check_adapter_names(self.config, [name])
        if len(self.config.adapter_names) == 1:
            raise ValueError(f"Cannot remove {name!r}: a routed model needs at least one adapter.")
        self.router.drop_adapter(name)
        if self.embedding_router is not None:
            self.embedding_router.drop_adapter(name)
        self.lora.remove(name)
        self.config.adapter_names = list(self.router.adapter_names)
        self.config.adapters.pop(name, None)

    def evaluate_heldout(self, prompts: Mapping[str, Any], *, text_field: str = "text", batch_size: int = 64) -> dict:
        """Route held-out prompts of known adapters; store and return the routing report (selection accuracy)."""
        texts, labels = [], []
        for name, source in prompts.items():
            check_adapter_names(self.config, [name])
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
