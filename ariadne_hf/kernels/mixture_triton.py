"""Fused weighted multi-LoRA delta in one Triton launch per layer (punica/S-LoRA bgmv style).

Importing this module imports triton; the dispatcher in ``ariadne_hf.kernels`` imports it lazily.
For CPU tensors (Triton's interpreter) set ``TRITON_INTERPRET=1`` before triton itself is first imported
and before this module is imported (``INTERPRETED``).

Design: program ``(row tile, out split)`` owns ``BLOCK_N`` rows. The k selected adapters of a row and
their ranks are laid out along ONE axis ``jr = j * BLOCK_R + r`` (``JR = KP * BLOCK_R`` lanes, KP = next
power of two >= k), so both LoRA matmuls of all k adapters are a single broadcast-multiply-reduce:

* shrink, once per program: ``h[n, jr] = sum_in x[n, in] * A[idx[n, j], r, in]`` (loop over IN tiles;
  the per-row adapter rows are gathered, ``-1`` / padded lanes masked to 0), then
  ``h[n, jr] *= w[n, j] * scaling[idx[n, j]]``;
* expand, per OUT tile of this program's split: ``delta[n, o] = sum_jr B[idx[n, j], o, r] * h[n, jr]``.

All products and sums are fp32 (every load is upcast right after it); the store casts to x's dtype.
The rank padding (R) and the k slots are masked, so zero-padded ranks cost lanes but no memory reads
beyond R. Rows that share an adapter read the same A/B rows (served by L1/L2 on a GPU): the kernel is
meant for decode and mixed batches; for very long single-adapter prefills a segmented (sgmv) variant
with ``tl.dot`` would use tensor cores (not needed by the callers today).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_last_dim_contiguous, check_mixture_lora_args
from .triton_common import check_triton_device, interpreter_requested, next_pow2, pow2_floor, resolve_blocks

INTERPRETED = interpreter_requested()
"""Whether the kernel below was created for Triton's interpreter (CPU tensors)."""

TILE_ELEMENTS_PER_WARP = 1024
"""GPU register budget: elements of a 3D tile (BLOCK_N * JR * BLOCK_IN or BLOCK_N * BLOCK_OUT * JR) per warp."""

BLOCK_FLOORS = {"BLOCK_N": 1, "KP": 1}
"""Smallest allowed value of the blocks that are not ``tl.dot`` extents (every other block: 16)."""


@triton.jit
def _mixture_lora_kernel(
    x_ptr, a_ptr, b_ptr, scaling_ptr, idx_ptr, w_ptr, out_ptr,
    N, IN, OUT, R, TOPK, stride_xn, stride_on, n_out_splits,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
    BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    """Semantics: delta[n] = sum_j w[n,j] * scaling[i] * B_i (A_i x[n]), i = idx[n,j] (-1: nothing); fp32 accumulation.

    Grid: (cdiv(N, BLOCK_N), n_out_splits). The host wrapper has checked shapes, dtypes and index range.
    """
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    jr = tl.arange(0, KP * BLOCK_R)  # [JR]
    slot = jr // BLOCK_R  # [JR]
    rank = jr % BLOCK_R  # [JR]
    lane_ok = (slot < TOPK) & (rank < R)  # [JR]
    sel_ok = row_ok[:, None] & lane_ok[None, :]  # [BN, JR]
    idx = tl.load(idx_ptr + rows64[:, None] * TOPK + slot[None, :], mask=sel_ok, other=-1).to(tl.int64)  # [BN, JR]
    live = sel_ok & (idx >= 0)
    idx = tl.where(live, idx, 0)
    w = tl.load(w_ptr + rows64[:, None] * TOPK + slot[None, :], mask=live, other=0.0).to(tl.float32)  # [BN, JR]
    coef = w * tl.load(scaling_ptr + idx, mask=live, other=0.0).to(tl.float32)  # [BN, JR]
    live = live & (coef != 0.0)

    # shrink: h[n, jr] = A[idx, r, :] . x[n, :]
    h = tl.zeros([BLOCK_N, KP * BLOCK_R], dtype=tl.float32)  # [BN, JR]
    a_row = idx * R * IN + rank[None, :].to(tl.int64) * IN  # [BN, JR]
    for i0 in range(0, IN, BLOCK_IN):
        ins = i0 + tl.arange(0, BLOCK_IN)  # [BI]
        in_ok = ins < IN
        x = tl.load(x_ptr + rows64[:, None] * stride_xn + ins[None, :], mask=row_ok[:, None] & in_ok[None, :],
                    other=0.0).to(tl.float32)  # [BN, BI]
        a = tl.load(a_ptr + a_row[:, :, None] + ins[None, None, :], mask=live[:, :, None] & in_ok[None, None, :],
                    other=0.0).to(tl.float32)  # [BN, JR, BI]
        h += tl.sum(a * x[:, None, :], axis=2)
    h = h * coef  # [BN, JR]

    # expand: delta[n, o] = sum_jr B[idx, o, r] * h[n, jr]
    b_row = idx * OUT * R + rank[None, :].to(tl.int64)  # [BN, JR]
    n_out_tiles = tl.cdiv(OUT, BLOCK_OUT)
    for ot in range(pid_o, n_out_tiles, n_out_splits):
        outs = ot * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # [BO]
        out_ok = outs < OUT
        b = tl.load(b_ptr + b_row[:, None, :] + outs[None, :, None].to(tl.int64) * R,
                    mask=live[:, None, :] & out_ok[None, :, None], other=0.0).to(tl.float32)  # [BN, BO, JR]
        delta = tl.sum(b * h[:, None, :], axis=2)  # [BN, BO]
        tl.store(out_ptr + rows64[:, None] * stride_on + outs[None, :],
                 delta.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


def mixture_lora_blocks(n: int, in_features: int, out_features: int, rank: int, k: int, device) -> dict:
    """Block sizes (and num_warps): register-bounded 3D tiles on a GPU; large tiles in the interpreter.

    GPU: a 3D tile holds at most ``TILE_ELEMENTS_PER_WARP * num_warps`` elements (compiled for sm_80 with
    ptxas: no spills for k*R <= 64; mild spills beyond). ``BLOCK_N`` is 4 for decode-sized N (< 64 rows),
    else 16; it is not a ``tl.dot`` dimension, so it may be below 16. Interpreter: few, large block ops.
    """
    block_r = next_pow2(rank)
    kp = next_pow2(k, floor=1)
    jr = kp * block_r
    if device.type == "cpu":  # interpreter: numpy handles big tiles, op count is what costs
        block_n = min(next_pow2(n), 64)
        budget = max(16, (1 << 20) // (block_n * jr))
        block_in = min(next_pow2(in_features), pow2_floor(budget))
        block_out = min(next_pow2(out_features), pow2_floor(budget))
        return {"BLOCK_N": block_n, "BLOCK_R": block_r, "KP": kp, "BLOCK_IN": block_in, "BLOCK_OUT": block_out,
                "num_warps": 4}
    num_warps = 8 if jr >= 64 else 4
    block_n = 4 if n < 64 else 16
    budget = max(16, TILE_ELEMENTS_PER_WARP * num_warps // (block_n * jr))
    block_in = max(16, min(pow2_floor(budget), 128, next_pow2(in_features)))
    block_out = max(16, min(pow2_floor(budget), 128, next_pow2(out_features)))
    return {"BLOCK_N": block_n, "BLOCK_R": block_r, "KP": kp, "BLOCK_IN": block_in, "BLOCK_OUT": block_out,
            "num_warps": num_warps}


def _out_splits(n_row_tiles: int, n_out_tiles: int, device) -> int:
    """Split OUT across programs until there are ~4 programs per SM (GPU); 1 in the interpreter."""
    if device.type == "cpu":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64
    return max(1, min(n_out_tiles, triton.cdiv(4 * sms, max(n_row_tiles, 1))))


def mixture_lora_triton(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,  # the LoRA stacks
    topk_indices: torch.Tensor, topk_weights: torch.Tensor,  # the rows' adapters and weights
    *,
    block_sizes: dict | None = None,
    out_splits: int | None = None,
    checked: bool = True,
) -> torch.Tensor:
    """Semantics: delta[n] = sum_j w[n,j] * scaling[i] * B_i (A_i x[n]), i = topk_indices[n, j]; -1 adds nothing.

    Exactly ``mixture_torch.mixture_lora_ref`` (shapes: x [N, IN], lora_A [A, R, IN], lora_B [A, OUT, R],
    scaling [A], topk_indices [N, k] in [-1, A), topk_weights [N, k]; returns [N, OUT] in x's dtype,
    fp32 accumulation) in ONE launch. Checks (``ValueError``) before launch: shapes, dtypes, devices,
    the index range, x contiguous in its last dimension, lora_A/lora_B contiguous (never copied).
    Bytes it must touch: x (N*IN), delta (N*OUT) and the selected adapters' A and B (<= k*N*R*(IN+OUT)
    elements, far less when rows share adapters). ``block_sizes`` overrides ``mixture_lora_blocks``;
    ``out_splits`` overrides the number of programs sharing a row tile's OUT tiles (``_out_splits``).
    ``checked=False`` skips the argument checks (one device sync): for callers whose arguments are valid by
    construction, such as the routed LoRA layers reading a gate built once per step.
    """
    if checked:
        check_mixture_lora_args(x, lora_A, lora_B, scaling, topk_indices, topk_weights)
    check_last_dim_contiguous("x", x)
    if not (lora_A.is_contiguous() and lora_B.is_contiguous()):
        raise ValueError("lora_A and lora_B must be contiguous (stack them once and cache them)")
    check_triton_device(INTERPRETED, x)
    n, in_features = x.shape
    adapters, rank, _ = lora_A.shape
    out_features = lora_B.shape[1]
    k = topk_indices.shape[1]
    out = torch.empty(n, out_features, dtype=x.dtype, device=x.device)  # [N, OUT]
    if n == 0 or out_features == 0:
        return out
    if k == 0 or rank == 0 or in_features == 0:
        return out.zero_()
    blocks = resolve_blocks(mixture_lora_blocks(n, in_features, out_features, rank, k, x.device), block_sizes,
                            BLOCK_FLOORS)
    num_warps = blocks.pop("num_warps")
    if blocks["BLOCK_R"] < rank or blocks["KP"] < k:
        raise ValueError(f"BLOCK_R must be >= R={rank} and KP >= k={k}, got {blocks}")
    idx = topk_indices.to(torch.int64).contiguous()  # [N, k]
    weights = topk_weights.to(torch.float32).contiguous()  # [N, k]
    scale = scaling.to(device=x.device, dtype=torch.float32).contiguous()  # [A]
    n_row_tiles = triton.cdiv(n, blocks["BLOCK_N"])
    splits = out_splits or _out_splits(n_row_tiles, triton.cdiv(out_features, blocks["BLOCK_OUT"]), x.device)
    _mixture_lora_kernel[(n_row_tiles, splits)](
        x, lora_A, lora_B, scale, idx, weights, out,
        n, in_features, out_features, rank, k, x.stride(0), out.stride(0), splits,
        num_warps=num_warps, **blocks,
    )
    return out
