"""`AriadneConfig`: the routing bundle's configuration (fields and validation only, no tensors)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .constants import BASE_ADAPTER, BUNDLE_FORMAT_VERSION
from .kernels.distances import DISTANCES

ROUTING_GRANULARITIES = ("sequence", "token")
GENERATION_STRATEGIES = ("batched", "grouped")
KERNEL_BACKENDS = (None, "torch", "triton")
REJECT_MODES = (None, "auto")
WHITENINGS = ("within", "none")
# Fields a loader may override (run-time choices); every other field describes the bundle's content.
RUN_TIME_FIELDS = ("routing", "reroute_every", "routing_top_k", "routing_temperature", "generation_strategy",
                   "kernel_backend", "reject_threshold", "reject", "max_resident_adapters")
# PreTrainedConfig bookkeeping that differs between two loads of one config.json.
_LOAD_BOOKKEEPING = ("_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype",
                     "_attn_implementation_autoset", "_attn_implementation_internal", "_experts_implementation_internal",
                     "architectures", "auto_map")


class AriadneConfig(PreTrainedConfig):
    r"""Configuration of a routed bundle: which backbone, which adapters, and how prompts are routed.

    Guarantees: every field is JSON-serialisable, `AriadneConfig.from_dict(c.to_dict())` round-trips, unknown keys
    are kept (forward compatibility within a major bundle version), and a config whose
    `bundle_format_version` has a newer major version than this library understands is refused.

    Args:
        backbone_name_or_path: Hub id or path of the backbone, or ``"base"`` for a backbone stored in the bundle.
        backbone_revision: the pinned revision (commit sha or tag) of the backbone on the Hub, if any.
        adapter_names: adapter names in router order (column ``a`` of every score matrix is ``adapter_names[a]``).
        adapters: per-adapter metadata (rank, target modules, prompt and centroid counts, file sha256).
        embedding_dim: D of the backbone's input embedding table the centroids were computed in.
        embedding_vocab_size: V (rows) of that table; token ids must be below it.
        embedding_fingerprint: norms of a fixed sample of embedding rows; detects a different backbone of equal shape.
        num_centroids: centroids requested per adapter (clipped to its number of prompts).
        distance: ``"cosine"`` (spherical k-means, cosine similarity) or ``"l2"`` (negated euclidean distance).
        center: subtract the mean of all building prompts' embeddings before scoring.
        whitening: ``"within"`` (multiply by the inverse square root of the shrunk within-adapter covariance before
            scoring; `from_adapters`' default) or ``"none"`` (the default here, so bundles written before whitening
            existed load unchanged).
        whitening_info: statistics of the whitening matrix (Ledoit-Wolf shrinkage, prompt count, condition number).
        ignore_special_tokens: give special tokens (BOS, chat markers, padding) zero weight in the pooled embedding.
        routing_layer: the routing signal (`routing.signal`): 0 = the masked mean of the input embedding (the paper's
            space), k > 0 = the masked mean of the backbone's base hidden state after decoder layer k (routable
            tokens only, no LoRA). Centroids, center, whitening and ood statistics live in that space. Token routing
            re-routes on the input embedding, so it needs routing_layer 0.
        reject_threshold: rows whose best score is below it are routed to ``"__base__"`` (the plain backbone).
        reject: ``None`` (no out-of-distribution rejection, the default) or ``"auto"`` (rows whose ood score exceeds
            the calibrated `ood_threshold` go to ``"__base__"``).
        reject_rate: the target in-domain false-reject rate `ood_threshold` was calibrated for.
        ood_threshold: the calibrated ood-score threshold (cross-fitted, see `calibration.py`), or None.
        ood_calibration: what the threshold was calibrated for: method, score, target rate, folds, seed, held-out
            prompt count and rate, and `adapters` (the adapter list it is valid for; any other list = stale).
        routing: ``"sequence"`` (one adapter per prompt) or ``"token"`` (re-mix adapters while decoding).
        reroute_every: for token routing, re-score the context every this many new tokens (0: only the prompt).
        routing_top_k: for token routing, how many adapters are mixed per row (not `top_k`: that is sampling's).
        routing_temperature: for token routing, softmax temperature over the top-k scores.
        generation_strategy: ``"batched"`` (one generate with per-row adapters) or ``"grouped"`` (one generate per
            routed adapter group, rows restored to input order).
        kernel_backend: routing kernel, ``None`` for automatic (Triton on CUDA, torch otherwise).
        max_resident_adapters: how many adapters' LoRA weights sit in the routed layers at once (``None``: all).
            The others stay in their safetensors files and are loaded when a call routes to them (LRU eviction).
        max_prompt_tokens: prompts are truncated to this many tokens when centroids are built.
        template_prefix_ids, template_suffix_ids: the tokens the chat template puts around one user message; routing
            ignores them in prompts that carry them exactly (so chat-formatted and raw prompts route alike).
        routing_report: selection accuracy on held-out prompts, when they were given at build time.
        router_sha256: checksum of model.safetensors, verified on load.
    """

    model_type = "ariadne"

    backbone_name_or_path: str | None = None
    backbone_revision: str | None = None
    adapter_names: list[str] | None = None
    adapters: dict[str, Any] | None = None
    embedding_dim: int | None = None
    embedding_vocab_size: int | None = None
    embedding_fingerprint: list[float] | None = None
    num_centroids: int = 1  # centroids.DEFAULT_NUM_CENTROIDS
    distance: str = "cosine"
    center: bool = True
    whitening: str = "none"
    whitening_info: dict[str, Any] | None = None
    ignore_special_tokens: bool = True
    routing_layer: int = 0
    reject_threshold: float | None = None
    reject: str | None = None
    reject_rate: float = 0.02
    ood_threshold: float | None = None
    ood_calibration: dict[str, Any] | None = None
    routing: str = "sequence"
    reroute_every: int = 2
    routing_top_k: int = 2
    routing_temperature: float = 0.05
    generation_strategy: str = "batched"
    kernel_backend: str | None = None
    max_resident_adapters: int | None = None
    max_prompt_tokens: int = 512
    template_prefix_ids: list[int] | None = None
    template_suffix_ids: list[int] | None = None
    routing_report: dict[str, Any] | None = None
    router_sha256: str | None = None
    bundle_format_version: str = BUNDLE_FORMAT_VERSION

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.adapter_names is None:
            self.adapter_names = []
        if self.adapters is None:
            self.adapters = {}
        self.adapter_names = list(self.adapter_names)
        check_bundle_version(self.bundle_format_version)
        validate_routing_options(self)
        names = self.adapter_names
        if len(set(names)) != len(names):
            raise ValueError(f"AriadneConfig: adapter names must be unique, got {names}.")
        for name in names:
            validate_adapter_name(name)


def check_bundle_version(version: str) -> None:
    """Raise if `version` has a newer major number than this library reads."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError as err:
        raise ValueError(f"AriadneConfig: bundle_format_version {version!r} is not 'MAJOR.MINOR'.") from err
    supported = int(BUNDLE_FORMAT_VERSION.split(".")[0])
    if major > supported:
        raise ValueError(
            f"This bundle has format version {version}, newer than the {BUNDLE_FORMAT_VERSION} this ariadne_hf "
            "understands. Upgrade ariadne_hf (pip install -U ariadne_hf) to load it."
        )


def validate_adapter_name(name: str) -> None:
    """Raise unless `name` can be used as an adapter name and a folder name."""
    if not isinstance(name, str) or not name or name == BASE_ADAPTER:
        raise ValueError(f"Invalid adapter name {name!r}: use a non-empty string other than {BASE_ADAPTER!r}.")
    if "/" in name or "\\" in name or name.startswith(".") or "." in name:
        raise ValueError(
            f"Invalid adapter name {name!r}: it names a folder under adapters/ and a PEFT adapter, so it may not "
            "contain '/', '\\' or '.'. Use e.g. letters, digits, '-' and '_'."
        )


def load_overrides(bundle_config: AriadneConfig, passed_config: Any, explicit: dict[str, Any]) -> dict[str, Any]:
    """The run-time fields a `from_pretrained` call overrides: those of `passed_config` and `explicit` (keywords).

    `passed_config` is what transformers' Auto classes always pass: the bundle's own config.json, with any keyword
    argument naming a config attribute already set on it (so ``AutoModelForCausalLM.from_pretrained(b, routing=
    "token")`` arrives as a config). A run-time field (`RUN_TIME_FIELDS`) that differs from the bundle's is an
    override; `explicit` (run-time keyword arguments) wins over `passed_config`. Any other difference raises ValueError naming the
    field, because it describes what the bundle holds (adapters, centroids, backbone) and cannot be changed by
    loading: rebuild with `from_adapters` instead. Nothing is dropped silently.
    """
    unknown = [key for key in explicit if key not in RUN_TIME_FIELDS]
    if unknown:
        raise TypeError(f"{unknown} are not run-time config fields; those are {list(RUN_TIME_FIELDS)}.")
    if passed_config is None:
        return dict(explicit)
    if not isinstance(passed_config, AriadneConfig):
        raise TypeError(f"from_pretrained(config=...) must be an AriadneConfig (or omitted), got "
                        f"{type(passed_config).__name__}: a bundle's config.json describes its adapters and router.")
    ours, theirs = bundle_config.to_dict(), passed_config.to_dict()
    changed = sorted(k for k in set(ours) | set(theirs) if k not in _LOAD_BOOKKEEPING and ours.get(k) != theirs.get(k))
    fixed = [k for k in changed if k not in RUN_TIME_FIELDS]
    if fixed:
        raise ValueError(
            f"from_pretrained: config field(s) {fixed} differ from the bundle's ({', '.join(f'{k}={ours.get(k)!r}' for k in fixed)}). "
            f"Only run-time options may be overridden when loading: {list(RUN_TIME_FIELDS)}. Backbone options "
            "(e.g. output_hidden_states) go to forward()/generate(); to change the adapters or the router, rebuild "
            "with AriadneRoutedModel.from_adapters."
        )
    return {**{k: theirs[k] for k in changed}, **explicit}


def check_adapter_names(config: Any, names: list[str]) -> None:
    """Raise a ValueError naming the first of `names` that is neither an adapter of `config` nor "__base__"."""
    known = set(config.adapter_names) | {BASE_ADAPTER}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown adapter name {unknown[0]!r}; this model has {list(config.adapter_names)} "
                         f"(and {BASE_ADAPTER!r} for the plain backbone).")


def validate_routing_options(config: Any) -> None:
    """Raise a clear error for any option of `config` out of its range: the build-time fields, then
    `validate_call_options` (the run-time ones a call may override)."""
    if config.distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {config.distance!r}.")
    if getattr(config, "whitening", "none") not in WHITENINGS:
        raise ValueError(f"whitening must be one of {WHITENINGS}, got {config.whitening!r}.")
    rate = getattr(config, "reject_rate", 0.02)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 0.5:
        raise ValueError(f"reject_rate must be a number in (0, 0.5] (target in-domain false-reject rate), got {rate!r}.")
    layer = getattr(config, "routing_layer", 0)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"routing_layer must be an integer >= 0 (0 = the input embedding), got {layer!r}.")
    if isinstance(config.num_centroids, bool) or not isinstance(config.num_centroids, int) or config.num_centroids < 1:
        raise ValueError(f"num_centroids must be a positive integer, got {config.num_centroids!r}.")
    resident = getattr(config, "max_resident_adapters", None)
    if resident is not None and (isinstance(resident, bool) or not isinstance(resident, int) or resident < 1):
        raise ValueError(f"max_resident_adapters must be a positive integer or None (all resident), got {resident!r}.")
    validate_call_options(config)


def validate_call_options(options: Any) -> None:
    """Raise a clear error for any run-time routing option of `options` (a config or one call's options) out of
    its range: routing, generation_strategy, reject, kernel_backend, reroute_every, routing_top_k,
    routing_temperature."""
    if options.routing not in ROUTING_GRANULARITIES:
        raise ValueError(f"routing must be one of {ROUTING_GRANULARITIES}, got {options.routing!r}.")
    if options.generation_strategy not in GENERATION_STRATEGIES:
        raise ValueError(
            f"generation_strategy must be one of {GENERATION_STRATEGIES}, got {options.generation_strategy!r}."
        )
    if getattr(options, "reject", None) not in REJECT_MODES:
        raise ValueError(f"reject must be None or 'auto' (reject out-of-distribution prompts at the calibrated "
                         f"threshold), got {options.reject!r}. For a fixed best-score threshold use reject_threshold=.")
    if options.kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {options.kernel_backend!r}.")
    if not isinstance(options.reroute_every, int) or options.reroute_every < 0:
        raise ValueError(
            f"reroute_every must be an integer >= 0 (0 = route once from the prompt), got {options.reroute_every!r}."
        )
    if not isinstance(options.routing_top_k, int) or options.routing_top_k < 1:
        raise ValueError(f"routing_top_k must be a positive integer, got {options.routing_top_k!r}.")
    if not (isinstance(options.routing_temperature, (int, float)) and options.routing_temperature > 0):
        raise ValueError(f"routing_temperature must be a number > 0, got {options.routing_temperature!r}.")
