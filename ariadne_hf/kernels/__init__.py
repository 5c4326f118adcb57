"""Kernel dispatch. Public entry points: `embed_pool_distance`, `incremental_pool_distance`, `mixture_lora`.

Backend choice, first match wins:

1. the explicit ``backend=`` argument (``"torch"`` or ``"triton"``; ``None`` = not explicit);
2. the environment variable ``ARIADNE_KERNEL`` (``"torch"``, ``"triton"``; ``"auto"`` or empty = not set);
3. auto: ``"triton"`` for CUDA tensors when triton is importable, ``"torch"`` otherwise.

An explicitly requested backend (1 or 2) that cannot run raises ``RuntimeError`` saying why (triton not
installed; CPU tensors without ``TRITON_INTERPRET=1`` set before triton is imported). ``backend="triton"``
on CPU tensors runs the kernels in Triton's interpreter (slow; for tests). Triton is an optional extra:
it is imported only when the triton backend is chosen. The chosen path is logged once per
(operation, backend, device type) at INFO level on the ``ariadne_hf.kernels`` logger.

Files, per kernel a torch file (the specification and the CPU path) and a Triton file (fused kernels and
host wrappers; imported on first use), plus shared checks and helpers:

* ``distances``: the distance registry (one ``Distance`` entry per name, read by every other place);
* ``checks``: argument checks of both paths (``routing_args``: the checked ``RoutingArgs``); ``triton_common``: interpreter flag, device check, blocks;
* ``pool_distance_torch`` / ``pool_distance_triton``: ``embed_pool_distance``, ``incremental_pool_distance``;
* ``mixture_torch`` / ``mixture_triton``: ``mixture_lora``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from ..constants import ENV_KERNEL
from .checks import RoutingArgs, routing_args
from .distances import DISTANCES, Distance, get_distance
from .mixture_torch import dense_to_topk, mixture_lora_ref
from .pool_distance_torch import (
    centroid_scores_ref,
    embed_pool_distance_ref,
    incremental_pool_distance_ref,
    pool_embeddings_ref,
)
from .triton_common import interpreter_requested

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "triton")
_logged: set[tuple[str, str, str]] = set()


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (only asked when the triton backend is a candidate)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _requested_backend(backend: str | None) -> tuple[str | None, str]:
    """(backend or None for auto, where it came from)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend, "argument"
    env = os.environ.get(ENV_KERNEL, "").strip().lower()
    if env in ("", "auto"):
        return None, "auto"
    if env not in BACKENDS:
        raise ValueError(f"{ENV_KERNEL} must be one of {BACKENDS} or 'auto', got {env!r}")
    return env, f"env {ENV_KERNEL}"


def resolve_backend(device: torch.device, backend: str | None = None, *, op: str = "kernel") -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device`` (rules in the module docstring).

    Raises ``RuntimeError`` when an explicitly requested backend cannot run, ``ValueError`` for an
    unknown backend name.
    """
    device = torch.device(device)
    chosen, source = _requested_backend(backend)
    if chosen is None:
        chosen = "triton" if device.type == "cuda" and triton_available() else "torch"
    elif chosen == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op}: backend 'triton' requested ({source}) but triton is not installed: "
                "pip install 'ariadne_hf[triton]', or use backend='torch'"
            )
        if device.type == "cpu" and not interpreter_requested():
            raise RuntimeError(
                f"{op}: backend 'triton' requested ({source}) for CPU tensors, which needs Triton's interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'"
            )
    key = (op, chosen, device.type)
    if key not in _logged:
        _logged.add(key)
        logger.info("ariadne_hf.kernels: %s runs on the %s backend (%s, %s tensors)", op, chosen, source, device.type)
    return chosen


def _triton_module(name: str):
    """Import the Triton file ``ariadne_hf.kernels.<name>`` (which imports triton) on first use."""
    return importlib.import_module(f"{__name__}.{name}")


def embed_pool_distance(
    input_ids,
    attention_mask,
    embed_weight,
    centroids,
    centroid_adapter,
    num_adapters,
    *,
    center=None,
    token_weights=None,
    transform=None,
    distance="cosine",
    backend=None,
    return_pooled=False,
):
    """Route rows to adapters: scores[b, a] = max_k sim(W (mean_t w E[ids[b,t]] - center), C[k]) over adapter a's centroids.

    ``input_ids`` [B, T] int32/int64, ``attention_mask`` [B, T], ``embed_weight`` [V, D] fp32/fp16/bf16 (read
    in place), ``centroids`` [K, D], ``centroid_adapter`` [K] int in [0, A), ``num_adapters`` A,
    ``center`` [D] optional, ``token_weights`` [V] optional, ``transform`` [D, D] fp32 optional (whitening W),
    ``distance`` a name in ``distances.DISTANCES`` ("cosine", "l2").
    Returns (scores [B, A] fp32, higher = closer; best [B] int64, -1 for a row without weighted tokens)
    and, with ``return_pooled``, pooled [B, D] fp32 (un-centered). Exact rules:
    ``pool_distance_torch.embed_pool_distance_ref``. ``backend``: None | "torch" | "triton" (module docstring).
    """
    tables = (embed_weight, centroids, centroid_adapter, num_adapters)
    options = dict(center=center, token_weights=token_weights, transform=transform, distance=distance)
    if resolve_backend(embed_weight.device, backend, op="embed_pool_distance") == "triton":
        return _triton_module("pool_distance_triton").embed_pool_distance_triton(
            input_ids, attention_mask, routing_args(*tables, **options), return_pooled=return_pooled)
    return embed_pool_distance_ref(input_ids, attention_mask, *tables, **options, return_pooled=return_pooled)


def incremental_pool_distance(
    new_ids,
    running_sum,
    running_weight,
    embed_weight,
    centroids,
    centroid_adapter,
    num_adapters,
    *,
    new_mask=None,
    center=None,
    token_weights=None,
    transform=None,
    distance="cosine",
    backend=None,
):
    """Token-level routing step: S[b] += w[b] E[new_ids[b]]; W[b] += w[b] (IN PLACE); score S[b]/W[b].

    ``new_ids`` [B] int32/int64, ``running_sum`` [B, D] fp32, ``running_weight`` [B] fp32 (both updated in
    place; start from zeros), ``new_mask`` [B] optional (0 = this row takes no token this step),
    ``token_weights`` [V] optional. O(D) per row for the update. Returns (scores [B, A] fp32, best [B]
    int64) exactly as ``embed_pool_distance`` would for the whole context so far (up to fp32 summation
    order). Exact rules: ``pool_distance_torch.incremental_pool_distance_ref``; backend rules as above.
    """
    tables = (embed_weight, centroids, centroid_adapter, num_adapters)
    options = dict(center=center, token_weights=token_weights, transform=transform, distance=distance)
    if resolve_backend(embed_weight.device, backend, op="incremental_pool_distance") == "triton":
        return _triton_module("pool_distance_triton").incremental_pool_distance_triton(
            new_ids, running_sum, running_weight, routing_args(*tables, **options), new_mask=new_mask)
    return incremental_pool_distance_ref(new_ids, running_sum, running_weight, *tables, new_mask=new_mask, **options)


def mixture_lora(x, lora_A, lora_B, scaling, topk_indices, topk_weights, *, backend=None, checked: bool = True):
    """Weighted multi-LoRA delta: delta[n] = sum_j w[n,j] * scaling[i] * B_i (A_i x[n]), i = idx[n,j] (-1 = none).

    ``x`` [N, IN], ``lora_A`` [A, R, IN], ``lora_B`` [A, OUT, R], ``scaling`` [A], ``topk_indices`` [N, k]
    int64, ``topk_weights`` [N, k]. Returns delta [N, OUT] in x's dtype, fp32 accumulation. Exact rules:
    ``mixture_torch.mixture_lora_ref``; backend rules as above. ``checked=False`` skips the Triton path's argument
    checks (for callers that built the arguments themselves, as the routed LoRA layers do every step); the torch
    specification always checks.
    """
    args = (x, lora_A, lora_B, scaling, topk_indices, topk_weights)
    if resolve_backend(x.device, backend, op="mixture_lora") == "triton":
        return mixture_lora_kernel("triton")(*args, checked=checked)
    return mixture_lora_ref(*args)


def _mixture_lora_ref_unchecked_flag(*args, checked: bool = True):
    return mixture_lora_ref(*args)


def mixture_lora_kernel(resolved_backend: str):
    """The `mixture_lora` implementation of a backend already resolved by `resolve_backend` (no per-call checks).

    For callers that resolve once and call every step (the routed LoRA layers: their bank resolves the backend
    when it is built). A dictionary lookup, not a cache: the function is looked up in its module on every call. "triton" -> ``mixture_triton.mixture_lora_triton`` (keyword ``checked``), "torch" -> the
    specification ``mixture_lora_ref`` wrapped to accept and ignore ``checked``.
    """
    if resolved_backend == "triton":
        return _triton_module("mixture_triton").mixture_lora_triton
    if resolved_backend == "torch":
        return _mixture_lora_ref_unchecked_flag
    raise ValueError(f"resolved_backend must be one of {BACKENDS}, got {resolved_backend!r}")


__all__ = [
    "BACKENDS",
    "DISTANCES",
    "Distance",
    "RoutingArgs",
    "centroid_scores_ref",
    "dense_to_topk",
    "embed_pool_distance",
    "embed_pool_distance_ref",
    "get_distance",
    "incremental_pool_distance",
    "incremental_pool_distance_ref",
    "mixture_lora",
    "mixture_lora_kernel",
    "mixture_lora_ref",
    "pool_embeddings_ref",
    "resolve_backend",
    "routing_args",
    "triton_available",
]
