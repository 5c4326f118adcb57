"""A bundle on the real default backbone (SmolLM2-135M-Instruct) for tests and benchmarks against a real vLLM, and a
vLLM OpenAI server started from it (`ariadne serve --engine vllm`'s command) on a free loopback port.

The bundle: four of the packaged demo adapters (trained on this backbone), centroids from their routing-dev training
prompts. Held-out prompts: the routing-dev test rows of those four tasks (`heldout_prompts`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

TASKS = ("fact_checker", "physics", "social_support", "logical_fallacy_detection")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))  # tests/serving -> the checkout


def build_smol_bundle(directory: str):
    """Save the bundle under `directory` and return the in-process routed model (fp32) it was built as."""
    from ariadne_hf import AriadneRoutedModel
    from ariadne_hf.data import demo_adapters_dir
    from ariadne_hf.default_backbone import default_backbone_path
    from ariadne_hf.evaluation.demo import demo_rows_by_task

    train = demo_rows_by_task("train", list(TASKS))
    model = AriadneRoutedModel.from_adapters(default_backbone_path(progress=False),
                                             {t: str(demo_adapters_dir() / t) for t in TASKS},
                                             {t: [r["text"] for r in train[t]] for t in TASKS}, progress=False)
    model.save_pretrained(directory)
    return model.eval()


def heldout_prompts(per_task: int) -> list[str]:
    """The shortest `per_task` held-out prompts of each task, interleaved (so consecutive prompts differ in task)."""
    from ariadne_hf.evaluation.demo import demo_rows_by_task

    test = demo_rows_by_task("test", list(TASKS))
    columns = [sorted((r["text"] for r in test[t]), key=len)[:per_task] for t in TASKS]
    return [column[i] for i in range(per_task) for column in columns if i < len(column)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_vllm_python() -> str:
    """The cached vLLM venv's python (built by `vllm_env.ensure_vllm_venv` when missing, ~4 min once per machine).

    This checkout of ariadne_hf is made importable in it with PYTHONPATH (see `VllmServer`), not installed: the venv
    is shared by every checkout on the machine, so installing one checkout into it would change what another
    checkout's tests run. `unmet_requirements` checks what `pip install ariadne_hf` would need: that ariadne_hf's
    declared dependency ranges admit the versions vLLM pinned in that venv."""
    from ariadne_hf.serving.vllm_env import ensure_vllm_venv

    return str(ensure_vllm_venv(log=lambda s: print("+", s, file=sys.stderr, flush=True)))


UNMET_PROBE = r"""
import sys, tomllib
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
with open(sys.argv[1], "rb") as handle:
    project = tomllib.load(handle)["project"]
wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["serve"])
for line in wanted:
    req = Requirement(line)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        print(f"{req} (not installed)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        print(f"{req} (installed: {have})")
"""


def unmet_requirements(python: str) -> list[str]:
    """ariadne_hf's requirements (core + the `serve` extra, from pyproject.toml) that `python`'s installed
    distributions do not satisfy (e.g. a transformers range that excludes the one vLLM pins)."""
    proc = subprocess.run([python, "-c", UNMET_PROBE, os.path.join(REPO, "pyproject.toml")], capture_output=True,
                          text=True, check=True)
    return proc.stdout.split("\n")[:-1] if proc.stdout else []


class VllmServer:
    """`ariadne serve BUNDLE --engine vllm` run as a user runs it: the CLI in this venv, vLLM in the venv of
    `python`, on 127.0.0.1 and a free port (fp32, 1024-token context, 2 GiB KV cache), this checkout of ariadne_hf
    importable there through PYTHONPATH. `wait()` blocks until /health answers; `stop()` ends the process group
    (the CLI, vLLM's API server and its engine core). `log_path` holds their output."""

    def __init__(self, bundle: str, python: str, *, log_path: str, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        argv = [sys.executable, "-m", "ariadne_hf.cli", "serve", bundle, "--engine", "vllm", "--engine-python", python,
                "--host", "127.0.0.1", "--port", str(self.port), "--", "--dtype", "float32", "--max-model-len", "1024",
                *extra_args]
        env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd="/",
                                        start_new_session=True)

    def wait(self, timeout: float = 900.0) -> VllmServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.process.returncode}) while starting:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM did not answer /health within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.log.close()
