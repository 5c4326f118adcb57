"""Package data: the routing-dev prompt set (24 BIG-bench tasks, Apache-2.0) and the demo LoRA adapters.

`routing-dev/README.md` holds the source, licence and BIG-bench canary; keep it next to the data.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

ROUTING_DEV = "routing-dev"
DEMO_ADAPTERS = "demo_adapters"
SPLITS = ("train", "test")


def load_routing_dev(split: str) -> list[dict]:
    """Rows of routing-dev's `split` ("train" or "test"), in file order (grouped by task, tasks in name order).

    Each row is `{"task": str, "text": str, "targets": list[str]}` plus `"choices": list[str]` and
    `"answer": int` on multiple-choice examples (see routing-dev/README.md). Reads the gzip'd JSON lines shipped
    inside the installed package (importlib.resources), so it works from a wheel as well as a checkout.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = resources.files(__name__).joinpath(ROUTING_DEV, f"{split}.jsonl.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def demo_adapters_dir() -> Path:
    """Folder of the demo adapters (`<task>/adapter_config.json` + `adapter_model.safetensors` per task).

    The adapters were trained on the default backbone (`ariadne_hf.default_backbone`) by
    examples/train_demo_adapters.py. Requires the package to be installed as files (a normal wheel install).
    """
    return Path(str(resources.files(__name__).joinpath(DEMO_ADAPTERS)))


__all__ = ["load_routing_dev", "demo_adapters_dir", "ROUTING_DEV", "DEMO_ADAPTERS"]
