"""Argument checks of every kernel, shared by the torch and the Triton paths (no triton import).

Each raises ``ValueError`` naming the argument, its expected shape/dtype and what it got. The range checks
(``check_token_ids_in_range``, ``check_centroid_adapter_range``, ``check_mixture_lora_args``) cost one
device sync each; the others read only shapes, dtypes, devices and strides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distances import Distance, get_distance

TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Routing: embed_pool_distance, incremental_pool_distance
# --------------------------------------------------------------------------------------------------


def check_token_ids_in_range(input_ids: torch.Tensor, keep: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` if an id at a kept position lies outside ``[0, vocab_size)``.

    ``input_ids`` and ``keep`` (bool) have the same shape; one device sync.
    """
    bad = keep & ((input_ids < 0) | (input_ids >= vocab_size))  # same shape as input_ids
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0].tolist())
        token = int(input_ids[position])
        raise ValueError(
            f"input_ids holds token id {token} at position {position} (a masked-in position), outside the "
            f"embedding table [0, V={vocab_size}); check the tokenizer matches the backbone"
        )


def check_routing_args(
    embed_weight: torch.Tensor,
    centroids: torch.Tensor,
    centroid_adapter: torch.Tensor,
    num_adapters: int,
    center: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    distance: str,
    transform: torch.Tensor | None = None,
) -> None:
    """Validate the arguments shared by the full and the incremental routing functions (no sync)."""
    get_distance(distance)  # ValueError naming the known distances
    if embed_weight.dim() != 2 or embed_weight.dtype not in TABLE_DTYPES:
        raise ValueError(
            f"embed_weight must be a [V, D] float32/float16/bfloat16 table, got {tuple(embed_weight.shape)} "
            f"{embed_weight.dtype}"
        )
    vocab, dim = embed_weight.shape
    if centroids.dim() != 2 or centroids.shape[1] != dim or not centroids.is_floating_point():
        raise ValueError(f"centroids must be a float [K, D={dim}] tensor, got {tuple(centroids.shape)}")
    if centroid_adapter.shape != (centroids.shape[0],) or centroid_adapter.is_floating_point():
        raise ValueError(
            f"centroid_adapter must be an integer [K={centroids.shape[0]}] tensor, got "
            f"{tuple(centroid_adapter.shape)} {centroid_adapter.dtype}"
        )
    if int(num_adapters) < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if center is not None and center.shape != (dim,):
        raise ValueError(f"center must be [D={dim}], got {tuple(center.shape)}")
    if token_weights is not None and token_weights.shape != (vocab,):
        raise ValueError(f"token_weights must be [V={vocab}], got {tuple(token_weights.shape)}")
    if transform is not None and (transform.shape != (dim, dim) or transform.dtype != torch.float32):
        raise ValueError(f"transform must be an fp32 [D={dim}, D={dim}] matrix, got {tuple(transform.shape)} "
                         f"{transform.dtype}")
    tensors = (embed_weight, centroids, centroid_adapter, center, token_weights, transform)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


@dataclass(frozen=True)
class RoutingArgs:
    """The checked arguments both routing kernels share, on every backend (built by `routing_args`).

    The tensors are the caller's, neither copied nor converted; ``distance`` is the registry entry.
    """

    embed_weight: torch.Tensor  # [V, D] fp32/fp16/bf16
    centroids: torch.Tensor  # [K, D] float
    centroid_adapter: torch.Tensor  # [K] int in [0, A)
    num_adapters: int  # A >= 1
    center: torch.Tensor | None  # [D]
    token_weights: torch.Tensor | None  # [V]
    transform: torch.Tensor | None  # [D, D] fp32
    distance: Distance


def routing_args(embed_weight: torch.Tensor, centroids: torch.Tensor, centroid_adapter: torch.Tensor,
                 num_adapters: int, *, center: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                 transform: torch.Tensor | None = None, distance: str = "cosine") -> RoutingArgs:
    """`check_routing_args` and `check_centroid_adapter_range` (one device sync), then the checked `RoutingArgs`."""
    check_routing_args(embed_weight, centroids, centroid_adapter, num_adapters, center, token_weights, distance,
                       transform)
    check_centroid_adapter_range(centroid_adapter, num_adapters)
    return RoutingArgs(embed_weight, centroids, centroid_adapter, int(num_adapters), center, token_weights, transform,
                       get_distance(distance))


def check_centroid_adapter_range(centroid_adapter: torch.Tensor, num_adapters: int) -> None:
    """Raise ``ValueError`` if a centroid maps outside ``[0, num_adapters)`` (one device sync)."""
    if centroid_adapter.numel() and bool(((centroid_adapter < 0) | (centroid_adapter >= num_adapters)).any()):
        lo, hi = int(centroid_adapter.min()), int(centroid_adapter.max())
        raise ValueError(f"centroid_adapter values must lie in [0, {num_adapters}), got range [{lo}, {hi}]")


def check_batch_shapes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """``input_ids`` an int32/int64 [B, T] tensor and ``attention_mask`` of the same shape."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an int32/int64 [B, T] tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )


def check_batch_args(input_ids: torch.Tensor, attention_mask: torch.Tensor, embed_weight: torch.Tensor) -> None:
    """``check_batch_shapes``, and the ids, the mask and the table on one device."""
    check_batch_shapes(input_ids, attention_mask)
    if input_ids.device != embed_weight.device or attention_mask.device != embed_weight.device:
        raise ValueError("input_ids, attention_mask and embed_weight must be on one device")


def check_incremental_args(
    new_ids: torch.Tensor,
    running_sum: torch.Tensor,
    running_weight: torch.Tensor,
    embed_weight: torch.Tensor,
    new_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Validate the incremental state; returns the keep mask [B] bool (no sync)."""
    batch = new_ids.shape[0] if new_ids.dim() == 1 else -1
    if new_ids.dim() != 1 or new_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"new_ids must be an int32/int64 [B] tensor, got {tuple(new_ids.shape)} {new_ids.dtype}")
    dim = embed_weight.shape[1]
    if running_sum.shape != (batch, dim) or running_sum.dtype != torch.float32:
        raise ValueError(f"running_sum must be fp32 [B={batch}, D={dim}], got {tuple(running_sum.shape)} {running_sum.dtype}")
    if running_weight.shape != (batch,) or running_weight.dtype != torch.float32:
        raise ValueError(
            f"running_weight must be fp32 [B={batch}], got {tuple(running_weight.shape)} {running_weight.dtype}"
        )
    if new_mask is not None and new_mask.shape != (batch,):
        raise ValueError(f"new_mask must be [B={batch}], got {tuple(new_mask.shape)}")
    for name, t in (("new_ids", new_ids), ("running_sum", running_sum), ("running_weight", running_weight)):
        if t.device != embed_weight.device:
            raise ValueError(f"{name} must be on {embed_weight.device}, got {t.device}")
    return torch.ones_like(new_ids, dtype=torch.bool) if new_mask is None else new_mask.to(new_ids.device) != 0


# --------------------------------------------------------------------------------------------------
# Weighted multi-LoRA delta: mixture_lora
# --------------------------------------------------------------------------------------------------


def check_mixture_lora_args(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                            topk_indices: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """Validate shapes, dtypes, devices and the index range [-1, A) (one device sync); raise ``ValueError``.

    The arguments of ``mixture_torch.mixture_lora_ref`` (shapes there), in its order.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [N, IN] tensor, got {tuple(x.shape)} {x.dtype}")
    n, in_features = x.shape
    if lora_A.dim() != 3 or lora_A.shape[2] != in_features:
        raise ValueError(f"lora_A must be [A, R, IN={in_features}], got {tuple(lora_A.shape)}")
    adapters, rank, _ = lora_A.shape
    if lora_B.dim() != 3 or lora_B.shape[0] != adapters or lora_B.shape[2] != rank:
        raise ValueError(f"lora_B must be [A={adapters}, OUT, R={rank}], got {tuple(lora_B.shape)}")
    if scaling.shape != (adapters,):
        raise ValueError(f"scaling must be [A={adapters}], got {tuple(scaling.shape)}")
    if topk_indices.dim() != 2 or topk_indices.shape[0] != n or topk_indices.is_floating_point():
        raise ValueError(f"topk_indices must be an integer [N={n}, k] tensor, got {tuple(topk_indices.shape)} {topk_indices.dtype}")
    if topk_weights.shape != topk_indices.shape or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float {tuple(topk_indices.shape)} tensor, got {tuple(topk_weights.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("scaling", scaling), ("topk_indices", topk_indices),
                    ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    if topk_indices.numel() and bool(((topk_indices < -1) | (topk_indices >= adapters)).any()):
        lo, hi = int(topk_indices.min()), int(topk_indices.max())
        raise ValueError(f"topk_indices must lie in [-1, A={adapters}) (-1 = no adapter), got range [{lo}, {hi}]")


# --------------------------------------------------------------------------------------------------
# Layout (the Triton wrappers read their large inputs in place, never copying them)
# --------------------------------------------------------------------------------------------------


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """``t`` has stride 1 in its last dimension (a row of it is one contiguous read)."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")
