"""Host-side helpers shared by the Triton files: interpreter flag, device check, power-of-two block sizes.

Imports no triton (the dispatcher reads ``interpreter_requested`` too, and triton is an optional extra).
``pool_distance_triton`` and ``mixture_triton`` each record ``INTERPRETED = interpreter_requested()``
when they are imported, i.e. when their ``@triton.jit`` kernels are created.
"""

from __future__ import annotations

import os

import torch

LAUNCH_OPTIONS = ("num_warps",)
"""Keys of a block-size dict that are launch options, not block sizes (not checked as powers of two)."""


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton then runs kernels created from now on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(interpreted: bool, *tensors: torch.Tensor | None) -> None:
    """Raise ``RuntimeError`` if the tensors cannot run here: CPU tensors need kernels created for the interpreter.

    ``interpreted``: the calling module's ``INTERPRETED`` (whether its kernels were created for the interpreter).
    """
    for t in tensors:
        if t is not None and t.device.type == "cpu" and not interpreted:
            raise RuntimeError(
                "the Triton backend got CPU tensors but Triton's interpreter is off: set TRITON_INTERPRET=1 "
                "before triton is first imported, or use backend='torch'"
            )


def next_pow2(n: int, floor: int = 16, cap: int | None = None) -> int:
    """The smallest power of two >= n, clamped to [floor, cap] (``triton.next_power_of_2`` for n >= 1)."""
    block = 1 << (max(int(n), 1) - 1).bit_length()
    if cap is not None:
        block = min(cap, block)
    return max(floor, block)


def pow2_floor(n: int) -> int:
    """The largest power of two <= n (1 for n <= 1)."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def resolve_blocks(defaults: dict, overrides: dict | None, floors: dict | None = None) -> dict:
    """``defaults`` with ``overrides`` applied; raise ``ValueError`` for an unknown name or a bad block size.

    Every block size must be a power of two >= its floor (``floors[name]``, 16 when absent: the smallest
    ``tl.dot`` extent); ``LAUNCH_OPTIONS`` keys pass through unchecked.
    """
    blocks = dict(defaults)
    for name, value in (overrides or {}).items():
        if name not in blocks:
            raise ValueError(f"unknown block size {name!r}; known: {sorted(blocks)}")
        blocks[name] = int(value)
    for name, value in blocks.items():
        if name in LAUNCH_OPTIONS:
            continue
        floor = (floors or {}).get(name, 16)
        if value < floor or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {floor}, got {value}")
    return blocks
