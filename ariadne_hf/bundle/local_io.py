"""Local save and read of a bundle: write, read (the files checked by `layout`, then integrity (sha256), router
tensors, adapters), backbone checks. Turning the files into a model is `ariadne_hf.loading`.

The layout (which files, which are required, pickles) and its validator are in `layout`; the errors in `errors`.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..configuration_ariadne import AriadneConfig
from ..constants import (
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BASE_DIR,
    CONFIG_NAME,
    ROUTER_CENTROID_ADAPTER,
    ROUTER_CENTROIDS,
    ROUTER_OOD_STATS,
    ROUTER_TOKEN_COUNTS,
    ROUTER_TOKEN_KEYS,
    ROUTER_TOKEN_VALUES,
    ROUTER_TRANSFORM,
    ROUTER_WEIGHTS_NAME,
)
from ..routing.route import router_tensors, token_router_tensors
from .adapters import check_adapter_dir, file_sha256
from .errors import BundleError
from .layout import FIX_SAVE_AGAIN, check_bundle_folder

__all__ = [
    "backbone_state_dict", "check_backbone_matches", "pin_backbone", "read_bundle", "resolve_bundle_directory",
    "write_bundle",
]

logger = logging.getLogger(__name__)


# ---- backbone reference --------------------------------------------------------------------------------------
def pin_backbone(name_or_path: str, revision: str | None, *, token: str | None = None) -> tuple[str, str | None]:
    """Return (reference, pinned revision) for a backbone: an absolute path for a local folder (no revision),
    or the Hub id with the commit sha of `revision` (from the Hub, or the local cache when offline)."""
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path), None
    try:
        from huggingface_hub import HfApi

        return name_or_path, HfApi(token=token).model_info(name_or_path, revision=revision).sha
    except Exception:  # offline or unreachable: fall back to the cache
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, CONFIG_NAME, revision=revision)
        if isinstance(cached, str) and "/snapshots/" in cached:
            return name_or_path, cached.split("/snapshots/")[1].split("/")[0]
        logger.warning("Could not pin the revision of backbone %r; recording %r.", name_or_path, revision)
        return name_or_path, revision


# ---- writing ------------------------------------------------------------------------------------------------
def backbone_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The backbone's own weights, without LoRA (keys as in the plain transformers model: the routed layers'
    LoRA buffers are not persistent, and each wrapped linear's `base_layer.` is dropped from its keys)."""
    return {key.replace(".base_layer.", "."): value for key, value in backbone.state_dict().items()}


def write_bundle(model, directory: str | os.PathLike, *, include_backbone: bool = False) -> None:
    """Write `model` (an AriadneRoutedModel) as a bundle folder.

    Guarantees: the folder holds exactly the bundle files (stale adapter folders of removed adapters are
    deleted); no adapter_config.json at the root; weights are safetensors only; config.json records the
    sha256 of every adapter's and the router's weights, which loading verifies.
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise BundleError(f"save_pretrained: {directory} is a file, not a folder.")
    os.makedirs(directory, exist_ok=True)
    config: AriadneConfig = model.config
    if include_backbone:
        reference, revision = BASE_DIR, None
    else:
        reference, revision = config.backbone_name_or_path, config.backbone_revision
        if not reference or reference == BASE_DIR and not os.path.isdir(os.path.join(directory, BASE_DIR)):
            raise BundleError(
                "The backbone has no Hub id or path to reference (it was built in code, or came from base/): "
                "save with include_backbone=True to store it in the bundle."
            )
        if os.path.isabs(reference):
            logger.warning("The bundle references the backbone by local path %s; it will not load on another "
                           "machine. Use include_backbone=True or a Hub id for a portable bundle.", reference)

    adapters_root = os.path.join(directory, ADAPTERS_DIR)
    if os.path.isdir(adapters_root):
        for stale in set(os.listdir(adapters_root)) - set(config.adapter_names):
            shutil.rmtree(os.path.join(adapters_root, stale))
    summaries = {}
    for name in config.adapter_names:
        weights, copied = model.lora.export(name, os.path.join(adapters_root, name), base_model_name_or_path=reference)
        known = model.lora.layout(name).sha256
        summaries[name] = {**config.adapters.get(name, {}), "sha256": known if copied and known else file_sha256(weights)}

    tensors = router_tensors(model.router)
    if getattr(model, "embedding_router", None) is not None and model.config.routing_layer:
        tensors.update(token_router_tensors(model.embedding_router))
    router_path = os.path.join(directory, ROUTER_WEIGHTS_NAME)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, router_path, metadata={"format": "pt"})

    if include_backbone:
        backbone = model.backbone
        backbone.save_pretrained(os.path.join(directory, BASE_DIR), state_dict=backbone_state_dict(backbone))
    saved = AriadneConfig.from_dict(config.to_dict())
    saved.backbone_name_or_path, saved.backbone_revision = reference, revision
    saved.adapters = summaries
    saved.router_sha256 = file_sha256(router_path)
    saved.architectures = [type(model).__name__]
    saved.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    else:
        logger.warning("The model has no tokenizer; the bundle will not work with pipeline() or AutoTokenizer.")
    _write_card(model, directory, saved)


def _write_card(model, directory: str, config: AriadneConfig) -> None:
    from .model_card import write_model_card

    write_model_card(directory, config, model.router.centroids.cpu(), model.router.centroid_adapter.cpu(),
                     routing_report=getattr(config, "routing_report", None))


# ---- reading ------------------------------------------------------------------------------------------------
def read_bundle(directory: str) -> tuple[AriadneConfig, dict[str, torch.Tensor]]:
    """Read and validate a bundle folder without loading any model.

    Checks, each with an error naming the file or adapter: first the files (`layout.check_bundle_folder`, the
    validator a pull runs on a Hub repo: config.json present and an ariadne config of a supported version, router
    weights and every listed adapter's files present as safetensors, base/ when the config says so), then the
    content: config fields valid, router weights intact (sha256) with consistent shapes, every adapter a valid LoRA
    config with intact weights (sha256).
    """
    where = f"Bundle {directory}"
    raw, _ = check_bundle_folder(directory, where, fix=FIX_SAVE_AGAIN)
    try:
        config = AriadneConfig.from_dict(raw)
    except ValueError as err:
        raise BundleError(f"{where}: {CONFIG_NAME} is not a valid ariadne config: {err}") from err
    router = _read_router(directory, config)
    for name in config.adapter_names:
        folder = os.path.join(directory, ADAPTERS_DIR, name)
        check_adapter_dir(folder, name)
        expected = (config.adapters or {}).get(name, {}).get("sha256")
        if expected and file_sha256(os.path.join(folder, ADAPTER_WEIGHTS_NAME)) != expected:
            raise BundleError(
                f"Bundle {directory}: adapter {name!r} weights ({ADAPTERS_DIR}/{name}/{ADAPTER_WEIGHTS_NAME}) do not "
                "match the checksum in config.json: the file is corrupt or was changed. Re-download or re-save."
            )
    return config, router


def _read_router(directory: str, config: AriadneConfig) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, ROUTER_WEIGHTS_NAME)  # present: read_bundle checked the files
    expected = getattr(config, "router_sha256", None)
    if expected and file_sha256(path) != expected:
        raise BundleError(f"Bundle {directory}: {ROUTER_WEIGHTS_NAME} does not match its checksum in config.json; "
                          "the file is corrupt or was changed.")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"Bundle {directory}: {ROUTER_WEIGHTS_NAME} is not a readable safetensors file ({err}).") from err
    for key in (ROUTER_CENTROIDS, ROUTER_CENTROID_ADAPTER):
        if key not in tensors:
            raise BundleError(f"Bundle {directory}: {ROUTER_WEIGHTS_NAME} has no tensor {key!r}.")
    centroids = tensors[ROUTER_CENTROIDS]
    if centroids.ndim != 2 or (config.embedding_dim is not None and centroids.shape[1] != config.embedding_dim):
        raise BundleError(
            f"Bundle {directory}: centroids have shape {tuple(centroids.shape)} but config.json says embedding_dim "
            f"{config.embedding_dim}; the router file belongs to another bundle."
        )
    transform = tensors.get(ROUTER_TRANSFORM)
    dim = centroids.shape[1]
    if transform is not None and (transform.shape != (dim, dim) or not bool(torch.isfinite(transform).all())):
        raise BundleError(
            f"Bundle {directory}: {ROUTER_WEIGHTS_NAME} holds a whitening matrix of shape {tuple(transform.shape)} "
            f"(expected finite [{dim}, {dim}]); the router file is corrupt or belongs to another bundle."
        )
    if (transform is None) != (getattr(config, "whitening", "none") == "none"):
        raise BundleError(
            f"Bundle {directory}: config.json says whitening={getattr(config, 'whitening', 'none')!r} but "
            f"{ROUTER_WEIGHTS_NAME} {'has no' if transform is None else 'has a'} whitening matrix "
            f"({ROUTER_TRANSFORM!r}); the files come from different bundles. Re-save or rebuild the bundle."
        )
    _check_ood_tensors(directory, config, tensors)
    return tensors


def _check_ood_tensors(directory: str, config: AriadneConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The out-of-distribution tables come as a pair, fit the adapter list and vocabulary, and match the config."""
    counts, stats = tensors.get(ROUTER_TOKEN_COUNTS), tensors.get(ROUTER_OOD_STATS)
    keys, values = tensors.get(ROUTER_TOKEN_KEYS), tensors.get(ROUTER_TOKEN_VALUES)
    where = f"Bundle {directory}: {ROUTER_WEIGHTS_NAME}"
    if (keys is None) != (values is None):
        raise BundleError(f"{where} holds only one of {ROUTER_TOKEN_KEYS!r} and {ROUTER_TOKEN_VALUES!r}; the router "
                          "file is corrupt. Rebuild the bundle with from_adapters.")
    tables = counts if keys is None else keys
    if (tables is None) != (stats is None):
        raise BundleError(f"{where} holds only one of the token counts ({ROUTER_TOKEN_KEYS!r}, or "
                          f"{ROUTER_TOKEN_COUNTS!r} before 1.3) and {ROUTER_OOD_STATS!r}; the router file is corrupt. "
                          "Rebuild the bundle with from_adapters.")
    if tables is None:
        if getattr(config, "reject", None) == "auto":
            raise BundleError(f"{where} has no out-of-distribution tables but config.json says reject='auto'. Set "
                              "reject to null in config.json or rebuild the bundle with from_adapters.")
        return
    from ..routing.ood import SparseTokenCounts, ood_stats_problem

    vocab = config.embedding_vocab_size
    if keys is not None:
        try:
            SparseTokenCounts(keys, values, len(config.adapter_names), int(vocab))
        except (ValueError, TypeError) as err:
            raise BundleError(f"{where}: the sparse token counts do not fit {len(config.adapter_names)} adapters x "
                              f"{vocab} tokens ({err}); the router file belongs to another bundle.") from err
    elif (counts.ndim != 2 or counts.shape[0] != len(config.adapter_names)
            or (vocab is not None and counts.shape[1] != vocab) or counts.dtype.is_floating_point
            or bool((counts < 0).any())):
        raise BundleError(f"{where}: {ROUTER_TOKEN_COUNTS!r} has shape {tuple(counts.shape)} and dtype {counts.dtype} "
                          f"(expected non-negative integers [{len(config.adapter_names)}, {vocab}]: one row per "
                          "adapter); the router file belongs to another bundle.")
    problem = ood_stats_problem(stats)
    if problem:
        raise BundleError(f"{where}: {ROUTER_OOD_STATS!r} {problem}; the router file is corrupt.")
    threshold = getattr(config, "ood_threshold", None)
    if threshold is None or not isinstance(getattr(config, "ood_calibration", None), dict):
        raise BundleError(f"{where} holds out-of-distribution tables but config.json has no ood_threshold / "
                          "ood_calibration; the files come from different bundles. Re-save or rebuild the bundle.")


def check_backbone_matches(config: AriadneConfig, embed_weight: torch.Tensor, where: str) -> None:
    """Refuse a backbone whose input embedding table is not the one the centroids were computed in."""
    from ..routing.router import embedding_fingerprint, fingerprints_match

    vocab, dim = embed_weight.shape
    if (config.embedding_vocab_size, config.embedding_dim) != (vocab, dim):
        raise BundleError(
            f"{where}: the centroids were computed for an embedding table of shape "
            f"[{config.embedding_vocab_size}, {config.embedding_dim}] but the backbone "
            f"{config.backbone_name_or_path!r} has [{vocab}, {dim}]. The bundle's centroid table comes from another "
            "backbone: rebuild the bundle with from_adapters on this backbone."
        )
    if config.embedding_fingerprint and not fingerprints_match(config.embedding_fingerprint,
                                                               embedding_fingerprint(embed_weight)):
        raise BundleError(
            f"{where}: the backbone's embedding table differs from the one the centroids were computed in "
            f"(same shape, other values): wrong backbone or revision for {config.backbone_name_or_path!r}. "
            "Load the backbone the bundle pins, or rebuild the bundle."
        )


def resolve_bundle_directory(name_or_path: str, hub_kwargs: dict) -> str:
    """A local bundle folder as is, else a Hub repo id downloaded (validated, pinned) by `hub.resolve_bundle`.

    `hub_kwargs` are `resolve_bundle`'s keyword arguments (revision, token, cache_dir, ...).
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from .hub import resolve_bundle
    except ImportError as err:
        raise BundleError(f"{name_or_path!r} is not a local bundle folder.") from err
    return resolve_bundle(name_or_path, **hub_kwargs)
