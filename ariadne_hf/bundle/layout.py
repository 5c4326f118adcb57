"""The bundle layout: which files a bundle is made of, which ones its config requires, what counts as pickled
weights, and the one validator of a bundle's files.

    config.json                       AriadneConfig: model_type "ariadne", bundle_format_version, adapters, sha256s
    model.safetensors                 router tensors (the ROUTER_* keys of ariadne_hf.constants)
    generation_config.json, tokenizer files (TOKENIZER_FILE_NAMES; any root file with a ROOT_FILE_SUFFIXES suffix)
    README.md, images/*.png           the model card
    adapters/<name>/adapter_config.json, adapters/<name>/adapter_model.safetensors   one PEFT folder per adapter
    base/config.json, base/*.safetensors (+ json/txt files)   the backbone, when backbone_name_or_path is "base"

The file names themselves are in `ariadne_hf.constants` (shared with the LoRA and serving code); this module says
how they fit together. The validator (`read_bundle_config` + `check_bundle_files`, or `check_bundle_folder` for a
folder) runs on a set of relative '/'-paths, so the same checks and messages apply to a local folder before it is
loaded or pushed, to a Hub repo's file list before anything is downloaded, and to a cached snapshot offline.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BASE_DIR,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    IMAGES_DIR,
    MODEL_CARD_NAME,
    PICKLED_WEIGHT_NAMES,
    ROUTER_WEIGHTS_NAME,
)
from .errors import BundleError, IncompleteBundleError, NotABundleError, UnsafeBundleError

# ---- which files belong to a bundle ---------------------------------------------------------------------------
ROOT_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
"""Root files of a bundle besides the router and the card: config, generation config and tokenizer files."""
BASE_FILE_SUFFIXES = ROOT_FILE_SUFFIXES + (".safetensors",)
"""Files of the backbone copy in base/."""
BASE_WEIGHTS = f"{BASE_DIR}/*.safetensors"
"""The backbone copy's weights (one file or shards), required when the config says the backbone is in base/."""
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)
"""Root files a push may delete from the repo when the new bundle no longer has them (never a user's own file)."""

# ---- pickles --------------------------------------------------------------------------------------------------
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""A file with one of these suffixes is a pickle: never loaded, never pushed, never downloaded with a bundle."""
_SHARDED_PICKLED_WEIGHTS = re.compile(r"(?:pytorch_model|model|adapter_model)-\d+-of-\d+\.bin")


def is_pickle_file(path: str) -> bool:
    """True for any pickle file (by suffix): it is never loaded, pushed or downloaded."""
    name = path.rsplit("/", 1)[-1]
    return name in PICKLED_WEIGHT_NAMES or name.endswith(PICKLE_SUFFIXES)


def is_pickled_weights(path: str) -> bool:
    """True for pickled model or adapter weights (PICKLED_WEIGHT_NAMES or their shards), the files a checkpoint
    holds instead of the safetensors a bundle requires. (Other pickles, e.g. training_args.bin, are not weights.)"""
    name = path.rsplit("/", 1)[-1]
    return name in PICKLED_WEIGHT_NAMES or bool(_SHARDED_PICKLED_WEIGHTS.fullmatch(name))


def is_bundle_file(path: str, *, adapter_names: Iterable[str] | None = None, include_card: bool = True,
                   include_base: bool = True) -> bool:
    """True if `path` (relative, '/'-separated) is a file a bundle is made of.

    Guarantees: never true for pickles, hidden paths, a root `adapter_config.json`, adapters not in
    `adapter_names` (when given) or any other folder than adapters/, images/ and base/.
    """
    parts = path.split("/")
    if any(part.startswith(".") or not part for part in parts) or is_pickle_file(path):
        return False
    name = parts[-1]
    if len(parts) == 1:
        if name == MODEL_CARD_NAME:
            return include_card
        return name == ROUTER_WEIGHTS_NAME or (name.endswith(ROOT_FILE_SUFFIXES) and name != ADAPTER_CONFIG_NAME)
    if parts[0] == ADAPTERS_DIR and len(parts) == 3:
        wanted = adapter_names is None or parts[1] in set(adapter_names)
        return wanted and name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
    if parts[0] == IMAGES_DIR and len(parts) == 2:
        return include_card and name.endswith(".png")
    if parts[0] == BASE_DIR and len(parts) == 2:
        return include_base and name.endswith(BASE_FILE_SUFFIXES)
    return False


def is_owned_by_bundle(path: str, *, replacing_card: bool) -> bool:
    """True for repo files a push may delete when the new bundle lacks them: they belong to the bundle layout
    (adapters/, base/, known root files; images/*.png when the card is replaced), never to the user."""
    top = path.split("/", 1)[0]
    if top in (ADAPTERS_DIR, BASE_DIR):
        return True
    if top == IMAGES_DIR:
        return replacing_card and path.endswith(".png")
    return path in (CONFIG_NAME, ROUTER_WEIGHTS_NAME, GENERATION_CONFIG_NAME) + TOKENIZER_FILE_NAMES


def list_local_files(directory: str | os.PathLike) -> list[str]:
    """Every non-hidden file under `directory` as sorted relative '/'-paths (symlinks followed)."""
    root = Path(directory)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        files += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(f[2:] if f.startswith("./") else f for f in files)


# ---- which files a bundle needs -------------------------------------------------------------------------------
def adapter_file(name: str, file_name: str) -> str:
    """Relative path of `file_name` in the folder of adapter `name`."""
    return f"{ADAPTERS_DIR}/{name}/{file_name}"


def stores_backbone(config: dict[str, Any]) -> bool:
    """True when the config says the backbone is stored in the bundle (base/)."""
    return config.get("backbone_name_or_path") == BASE_DIR


def required_files(config: dict[str, Any]) -> list[str]:
    """The files a bundle with `config` (its config.json as a dict) must hold, as relative paths (BASE_WEIGHTS is
    a pattern: at least one file matching it): the router, every listed adapter's config and safetensors weights,
    and base/config.json + base/*.safetensors when the backbone is stored in base/."""
    paths = [ROUTER_WEIGHTS_NAME]
    for name in config.get("adapter_names") or []:
        paths += [adapter_file(name, ADAPTER_CONFIG_NAME), adapter_file(name, ADAPTER_WEIGHTS_NAME)]
    if stores_backbone(config):
        paths += [f"{BASE_DIR}/{CONFIG_NAME}", BASE_WEIGHTS]
    return paths


def _present(required: str, files: set[str]) -> bool:
    if required == BASE_WEIGHTS:
        return any(f.startswith(f"{BASE_DIR}/") and f.endswith(".safetensors") for f in files)
    return required in files


def _pickled_instead(required: str, files: set[str]) -> list[str]:
    """Pickled weights beside a missing required safetensors file (in the same folder)."""
    if not required.endswith(".safetensors"):
        return []
    folder = required.rpartition("/")[0]
    return sorted(f for f in files if f.rpartition("/")[0] == folder and is_pickled_weights(f))


def _weights_label(required: str) -> str:
    if required == ROUTER_WEIGHTS_NAME:
        return f"router weights {required}"
    if required == BASE_WEIGHTS:
        return f"backbone weights {required}"
    return f"adapter {required.split('/')[1]!r} weights {required}"


def _missing_label(required: str) -> str:
    if required == ROUTER_WEIGHTS_NAME:
        return f"router weights {required} are missing"
    if required.startswith(f"{ADAPTERS_DIR}/"):
        return f"adapter {required.split('/')[1]!r} is listed in {CONFIG_NAME} but {required} is missing"
    if required == BASE_WEIGHTS:
        return f"{CONFIG_NAME} says the backbone is in {BASE_DIR}/ but it holds no weights ({required})"
    return f"{CONFIG_NAME} says the backbone is in {BASE_DIR}/ but {required} is missing"


# ---- the validator --------------------------------------------------------------------------------------------
FIX_SAVE_AGAIN = "Save the bundle again (save_pretrained), or copy or download it again."
"""The fix of an incomplete bundle folder."""
FIX_PUSH_AGAIN = "Push the complete bundle again (model.push_to_hub or `ariadne push`)."
"""The fix of an incomplete bundle repo."""
_BUNDLE_HINT = " Build a bundle with AriadneRoutedModel.from_adapters(...) and save_pretrained / push_to_hub it."


def read_bundle_config(directory: str | os.PathLike, where: str, files: Iterable[str] = ()) -> dict[str, Any]:
    """The config.json of the bundle folder `directory` as a dict (it need not hold the other files).

    Raises NotABundleError unless config.json exists, is JSON and has model_type "ariadne"; BundleError if the
    bundle's format version is newer than this library reads. `where` starts every message ("Bundle <path>",
    "Hub repo ..."); `files` (the folder's or repo's file list) only improves the message.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        hint = " It holds a single PEFT adapter (adapter_config.json at the root)." \
            if ADAPTER_CONFIG_NAME in set(files) else ""
        raise NotABundleError(f"{where} is not an ariadne bundle: {CONFIG_NAME} is missing.{hint}{_BUNDLE_HINT}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise NotABundleError(f"{where}: {CONFIG_NAME} is not valid JSON ({err}); the bundle is corrupt.") from err
    if not isinstance(config, dict) or config.get("model_type") != "ariadne":
        kind = config.get("model_type") if isinstance(config, dict) else None
        plain = "; a plain transformers model: load it with transformers directly" if kind else ""
        raise NotABundleError(
            f"{where} is not an ariadne bundle ({CONFIG_NAME} has model_type {kind!r}, not 'ariadne'{plain})."
            f"{_BUNDLE_HINT}"
        )
    from ..configuration_ariadne import check_bundle_version

    try:
        check_bundle_version(config.get("bundle_format_version", "1.0"))
    except ValueError as err:
        raise BundleError(f"{where}: {err}") from err
    return config


def check_bundle_files(files: Iterable[str], config: dict[str, Any], where: str, *, fix: str = FIX_SAVE_AGAIN) -> None:
    """Raise unless `files` (a folder's or repo's relative '/'-paths) hold every file `config` requires
    (`required_files`), as safetensors.

    A required safetensors file missing with pickled weights beside it raises UnsafeBundleError; any other missing
    file IncompleteBundleError, whose message ends with `fix`. Every problem is named in one message.
    """
    files = set(files)
    missing, pickled = [], []
    for required in required_files(config):
        if _present(required, files):
            continue
        substitutes = _pickled_instead(required, files)
        if substitutes:
            pickled.append(f"{_weights_label(required)} are missing, only pickled {', '.join(substitutes)} found")
        else:
            missing.append(required)
    if pickled:
        raise UnsafeBundleError(
            f"{where}: {'; '.join(pickled)}; ariadne_hf never loads pickles (they can run arbitrary code). Convert "
            "them to safetensors (load and save_pretrained with safe_serialization=True, or "
            "safetensors.torch.save_file), then save or push the bundle again."
        )
    if missing:
        problems: list[str] = []
        for required in missing:
            parts = required.split("/")
            folder = f"{ADAPTERS_DIR}/{parts[1]}/" if parts[0] == ADAPTERS_DIR else None
            if folder and not any(f.startswith(folder) for f in files):  # the whole folder: one problem
                problem = f"adapter {parts[1]!r} is listed in {CONFIG_NAME} but its folder {folder} is missing or empty"
            else:
                problem = _missing_label(required)
            if problem not in problems:
                problems.append(problem)
        raise IncompleteBundleError(f"{where} is an incomplete ariadne bundle: {'; '.join(problems)}. {fix}".rstrip())


def check_bundle_folder(directory: str | os.PathLike, where: str, *, fix: str = FIX_SAVE_AGAIN,
                        refuse_any_pickle: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Validate the files of the bundle folder `directory` (`read_bundle_config` + `check_bundle_files` over its
    files); return (config dict, its files as relative paths).

    With `refuse_any_pickle` (before a push) any pickle file anywhere in the folder raises UnsafeBundleError, not
    only pickles standing in for required weights.
    """
    if not os.path.isdir(directory):
        raise NotABundleError(f"{where} does not exist or is not a folder.")
    files = [f for f in list_local_files(directory) if os.path.isfile(os.path.join(directory, *f.split("/")))]
    config = read_bundle_config(directory, where, files)
    if refuse_any_pickle:
        pickles = [f for f in files if is_pickle_file(f)]
        if pickles:
            raise UnsafeBundleError(
                f"{where} contains pickled weights ({', '.join(pickles[:5])}); only safetensors are pushed. Convert "
                "them to safetensors or delete them."
            )
    check_bundle_files(files, config, where, fix=fix)
    return config, files
