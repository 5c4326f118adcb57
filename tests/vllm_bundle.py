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
REPO = os.path.dirname(HERE)


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
    """The cached vLLM venv's python (built when missing), with this checkout of ariadne_hf installed into it with
    its dependencies resolved by pip (so its metadata ranges must admit what vLLM pins)."""
    from filelock import FileLock

    from ariadne_hf.serving.vllm_env import ensure_vllm_venv, vllm_venv_dir

    python = str(ensure_vllm_venv(log=lambda s: print("+", s, file=sys.stderr, flush=True)))
    with FileLock(str(vllm_venv_dir()) + ".install.lock"):
        subprocess.run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", REPO],
                       check=True, capture_output=True, text=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0", REPO],
                       check=True, capture_output=True, text=True)  # resolves ariadne_hf's requirements
    return python


class VllmServer:
    """vLLM's OpenAI server for `bundle` with the routing middleware (fp32, 1024-token context, 2 GiB KV cache),
    started on a free port; `stop()` terminates it. `log` holds its output."""

    def __init__(self, bundle: str, python: str, *, log_path: str, startup_timeout: float = 900.0,
                 extra_args: tuple[str, ...] = ()):
        from ariadne_hf.serving.engine_launch import vllm_command

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.command = vllm_command(bundle, python=python, port=self.port,
                                    extra_args=["--dtype", "float32", "--max-model-len", "1024", *extra_args])
        env = {**os.environ, **self.command.env, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # the middleware must come from the ariadne_hf installed in the vLLM venv
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(self.command.argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd="/", start_new_session=True)
        self.startup_timeout = startup_timeout

    def wait(self) -> VllmServer:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.process.returncode}) while starting:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM did not answer /health within {self.startup_timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:  # its own session: signal the group (the API server and its engine core)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.log.close()
