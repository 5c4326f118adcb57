"""Fused Triton routing kernels: embedding gather -> masked (weighted) mean -> distances -> per-adapter max.

Importing this module imports triton; the dispatcher in ``ariadne_hf.kernels`` imports it lazily.
To run the kernels on CPU tensors (Triton's interpreter) set ``TRITON_INTERPRET=1`` before triton itself
is first imported (triton's own ``tl.sum``/``tl.zeros``... are created then) and before this module is
imported (``INTERPRETED`` records what was in effect for the kernels below).

Design (one launch, two or three phases, work claimed by ticket)
-----------------------------------------------------------------
Every program first takes a ticket with ``atomic_add(sync[0], 1)``. Tickets ``< n_pool`` are *pooling*
items; with a whitening matrix (``HAS_TRANSFORM``) the next ``n_white`` tickets are *whitening* items;
the others are *scoring* items. ``sync`` [3 + cdiv(B, BLOCK_B)] int32: ``sync[0]`` the ticket counter,
``sync[1]`` the finished pooling items, ``sync[2]`` the finished whitening items, ``sync[3 + rb]`` the
row-block counters.

* pooling item ``(b, d-tile)``: loops over T tiles, gathers ``E[ids[b, t], d-tile]`` (upcast to fp32 right
  after the load), accumulates the weighted sum and the weight sum, stores the mean into ``pooled``
  [B, D] fp32 (the ``return_pooled`` output, un-centered and un-whitened). The ``d-tile == 0`` item also
  stores ``wsum[b]``, fills ``scores[b, :]`` with -inf and ``best[b]`` with -1. It then increments
  ``sync[1]`` (release).
* whitening item ``(row-block of BLOCK_B rows, output d-tile of BLOCK_D columns)``, only with
  ``HAS_TRANSFORM``: waits until ``sync[1]`` reaches ``n_pool`` (acquire), then computes
  ``whitened[rows, d-tile] = sum over input d-tiles e of (pooled[rows, e] - center[e]) @ W[d-tile, e]^T``
  with ``tl.dot`` (ieee fp32; centering is applied here), stores it into the fp32 scratch ``whitened``
  [B, D] and increments ``sync[2]`` (release). ``n_white = cdiv(B, BLOCK_B) * cdiv(D, BLOCK_D)``, row
  block varying fastest so the programs reading the same ``BLOCK_D`` rows of W run together (L2).
* scoring item ``(row-block of BLOCK_B rows, k-tile of BLOCK_K centroids)``: waits until ``sync[1]``
  reaches ``n_pool`` (without a transform) or ``sync[2]`` reaches ``n_white`` (with one; acquire), loops
  over D tiles accumulating ``x . c`` with ``tl.dot`` (ieee fp32), ``|x|^2`` and ``|c|^2`` (x read from
  ``pooled`` with centering applied on the fly, or from ``whitened``, already centered), turns them into the
  similarity of the constexpr ``DISTANCE`` (``distances.REGISTRY`` code: one compile-time branch each), and scatters the tile into the per-adapter maximum with
  ``atomic_max(scores[b, c2a[k]], sim)``. It then increments the row-block counter ``sync[3 + rb]``; the
  program that arrives last for a row block (``n_k_tiles - 1`` before it) computes ``best`` = first
  argmax over A for those rows (the second tiny reduction, O(BLOCK_B * A), inside the same launch).

Why tickets: tickets are ordered pooling < whitening < scoring, and every program only waits for items
with LOWER tickets: whitening waits for pooling, scoring for whitening (or for pooling without a
transform); pooling programs never wait. A ticket is only taken by a program that is already running,
so every ticket a waiter depends on is held by a resident program, and by induction over the phases
(pooling finishes unconditionally, then whitening, then scoring) every wait ends on a GPU whatever the
scheduling order and however few programs are resident. In the sequential interpreter tickets equal
program ids, so each phase has run to completion before the next one starts.
Pooling is parallel over ``B * cdiv(D, BLOCK_DP)`` items. Whitening and scoring items are ordered with
the row block varying fastest, so the ``cdiv(B, BLOCK_B)`` programs reading the same W or centroid tile
run together and share it through L2: W and the centroid table come from DRAM about once.

Memory floor
------------
``embed_pool_distance_triton`` must touch the ids and mask (B*T each), the embedding rows of the masked-in tokens
(n_tokens * D * elem_size of the table: fp32 4, fp16/bf16 2), the centroids (K*D*elem) and the map (K*4), with a
transform W (D*D*4), plus the outputs (B*A*4 + B*8, B*D*4 for pooled). Expected time ~ those bytes / memory
bandwidth: the kernel reads each needed table row once per D tile (no upcast copy), and W and the centroids about
once from DRAM (the ``cdiv(B, BLOCK_B)`` row blocks of a W or centroid tile are scheduled together and share it
through L2). The only extra traffic is the pooled scratch (B*D*4 written once, re-read per k-tile from L2, or per
output d-tile with a transform, which also writes and re-reads the whitened scratch, B*D*4) and the B*K
``atomic_max`` updates. On a GPU, with B <= 64, the distance step is memory-bound (8 flop per centroid byte with
BLOCK_B = 16), so the floor is those bytes / HBM bandwidth. The whitening step costs B*D*D*2 flops for D*D*4 bytes
(B/2 flop per byte of W): it is memory-bound for small B, but its ieee fp32 ``tl.dot`` (FMA, no TF32) makes it
compute-bound from roughly B >= 16-32 on an A100-class GPU. One host sync: the id range check (and the centroid map
check, in ``checks.routing_args``). ``incremental_pool_distance_triton`` touches B*D*(elem + 8) bytes for the update
plus K*D*elem for the centroids, plus D*D*4 for a transform (B*D*D*2 flops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import (
    TABLE_DTYPES,
    RoutingArgs,
    check_batch_shapes,
    check_incremental_args,
    check_last_dim_contiguous,
    check_token_ids_in_range,
)
from .triton_common import check_triton_device, interpreter_requested, next_pow2, resolve_blocks

INTERPRETED = interpreter_requested()
"""Whether the kernels below were created for Triton's interpreter (CPU tensors)."""

GPU_BLOCKS = {"BLOCK_T": 32, "BLOCK_DP": 128, "BLOCK_B": 16, "BLOCK_K": 64, "BLOCK_D": 32, "BLOCK_A": 256}
"""Default block sizes on a GPU (powers of two >= 16). Compiled for sm_80 (4 warps) both kernels use 168
registers and no spills (BLOCK_D = 64 needs 255), with or without HAS_TRANSFORM (the whitening tile, a
BLOCK_B x BLOCK_D accumulator fed by BLOCK_D x BLOCK_D tiles of W, needs fewer than the scoring tile; the
whitening items reuse BLOCK_B and BLOCK_D). Picked without a GPU to time them: tune on hardware."""


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _init_row_outputs(b, scores_ptr, best_ptr, A, BLOCK_A: tl.constexpr):
    """scores[b, :] = -inf; best[b] = -1."""
    b64 = b.to(tl.int64)
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)  # [BA]
        tl.store(scores_ptr + b64 * A + offs_a, tl.full([BLOCK_A], float("-inf"), tl.float32), mask=offs_a < A)
    tl.store(best_ptr + b64, -1)


@triton.jit
def _signal_done(counter_ptr):
    """Publish this program's stores: barrier, then release-increment of the phase counter (sync[1] or sync[2])."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def _wait_done(counter_ptr, n_items):
    """Spin until ``n_items`` items have signalled the phase counter (acquire); they hold lower tickets."""
    done = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while done < n_items:
        done = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _pool_tile(
    b, dt, ids_ptr, mask_ptr, emb_ptr, tokw_ptr, pooled_ptr, wsum_ptr,
    T, D, stride_ib, stride_it, stride_mb, stride_mt, stride_ev,
    HAS_TOKW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DP: tl.constexpr,
):
    """pooled[b, d-tile] = sum_t w E[ids[b,t], d-tile] / sum_t w (0 if the sum is 0); dt == 0 stores wsum[b]."""
    b64 = b.to(tl.int64)
    offs_d = dt * BLOCK_DP + tl.arange(0, BLOCK_DP)  # [BDP]
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_DP], dtype=tl.float32)  # [BDP]
    wacc = tl.zeros([BLOCK_T], dtype=tl.float32)  # [BT]
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BT]
        t_ok = offs_t < T
        m = tl.load(mask_ptr + b64 * stride_mb + offs_t * stride_mt, mask=t_ok, other=0)
        keep = t_ok & (m != 0)
        ids = tl.load(ids_ptr + b64 * stride_ib + offs_t * stride_it, mask=keep, other=0).to(tl.int64)  # [BT]
        w = keep.to(tl.float32)  # [BT]
        if HAS_TOKW:
            w = w * tl.load(tokw_ptr + ids, mask=keep, other=0.0).to(tl.float32)
        live = w != 0.0
        e_ptrs = emb_ptr + ids[:, None] * stride_ev + offs_d[None, :]  # [BT, BDP]
        e = tl.load(e_ptrs, mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(e * w[:, None], axis=0)
        wacc += w
    wsum = tl.sum(wacc, axis=0)
    denom = tl.where(wsum != 0.0, wsum, 1.0)
    pooled = tl.where(wsum != 0.0, acc / denom, 0.0)  # [BDP]
    tl.store(pooled_ptr + b64 * D + offs_d, pooled, mask=d_ok)
    if dt == 0:
        tl.store(wsum_ptr + b64, wsum)


@triton.jit
def _whiten_tile(
    item, pooled_ptr, center_ptr, transform_ptr, whitened_ptr, B, D,
    HAS_CENTER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """whitened[rows, d-tile] = (pooled[rows] - center) @ W[d-tile, :]^T over a BLOCK_B x BLOCK_D tile (fp32 ieee dot)."""
    n_rb = tl.cdiv(B, BLOCK_B)
    rb = item % n_rb  # row blocks vary fastest: programs running together share a slab of W (L2)
    dt = item // n_rb
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    offs_o = dt * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD] output columns = rows of W
    o_ok = offs_o < D
    offs_o64 = offs_o.to(tl.int64)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)  # [BB, BD]
    for e0 in range(0, D, BLOCK_D):
        offs_e = e0 + tl.arange(0, BLOCK_D)  # [BD] input columns
        e_ok = offs_e < D
        x_ok = row_ok[:, None] & e_ok[None, :]
        x = tl.load(pooled_ptr + rows64[:, None] * D + offs_e[None, :], mask=x_ok, other=0.0,
                    volatile=True)  # [BB, BD] written by other programs of this launch
        if HAS_CENTER:
            cen = tl.load(center_ptr + offs_e, mask=e_ok, other=0.0)  # [BD]
            x = tl.where(x_ok, x - cen[None, :], 0.0)
        w = tl.load(transform_ptr + offs_o64[:, None] * D + offs_e[None, :],
                    mask=o_ok[:, None] & e_ok[None, :], other=0.0)  # [BD(out), BD(in)] = W[d-tile, e-tile]
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    tl.store(whitened_ptr + rows64[:, None] * D + offs_o[None, :], acc, mask=row_ok[:, None] & o_ok[None, :])


@triton.jit
def _finalize_best(rb, scores_ptr, best_ptr, B, A, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr):
    """best[b] = first argmax_a scores[b, a] for the rows of block rb; -1 when every score is -inf."""
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)  # [BB]
    run_arg = tl.full([BLOCK_B], -1, tl.int64)  # [BB]
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)  # [BA]
        ok = row_ok[:, None] & (offs_a < A)[None, :]
        s = tl.load(scores_ptr + rows64[:, None] * A + offs_a[None, :], mask=ok, other=float("-inf"),
                    volatile=True)  # [BB, BA]
        tile_max = tl.max(s, axis=1)  # [BB]
        tile_arg = tl.min(tl.where(s == tile_max[:, None], offs_a[None, :], A), axis=1)  # [BB]
        better = tile_max > run_max  # strict: an earlier tile keeps a tie
        run_arg = tl.where(better, tile_arg.to(tl.int64), run_arg)
        run_max = tl.where(better, tile_max, run_max)
    tl.store(best_ptr + rows64, run_arg, mask=row_ok)


@triton.jit
def _score_tile(
    item, x_ptr, wsum_ptr, center_ptr, cent_ptr, c2a_ptr, scores_ptr, best_ptr, rb_sync_ptr,
    B, D, K, A, stride_ck,
    HAS_CENTER: tl.constexpr, DISTANCE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """atomic_max(scores[b, c2a[k]], sim(x[b] - center, C[k])) over a BLOCK_B x BLOCK_K tile; last one finalizes best.

    ``x_ptr`` [B, D] fp32: ``pooled`` (centered here when HAS_CENTER) or ``whitened`` (already centered, HAS_CENTER
    off). ``rb_sync_ptr[rb]`` counts the finished k-tiles of row block rb.
    """
    n_kt = tl.cdiv(K, BLOCK_K)
    n_rb = tl.cdiv(B, BLOCK_B)
    rb = item % n_rb  # row blocks vary fastest: programs running together share a centroid tile (L2)
    kt = item // n_rb
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    k_ok = ks < K
    ks64 = ks.to(tl.int64)
    dots = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)  # [BB, BK]
    x_sq = tl.zeros([BLOCK_B], dtype=tl.float32)  # [BB]
    c_sq = tl.zeros([BLOCK_K], dtype=tl.float32)  # [BK]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)  # [BD]
        d_ok = offs_d < D
        x_ok = row_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + rows64[:, None] * D + offs_d[None, :], mask=x_ok, other=0.0,
                    volatile=True)  # [BB, BD]
        if HAS_CENTER:
            cen = tl.load(center_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)  # [BD]
            x = tl.where(x_ok, x - cen[None, :], 0.0)
        c = tl.load(cent_ptr + ks64[:, None] * stride_ck + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BK, BD]
        dots += tl.dot(x, tl.trans(c), input_precision="ieee")
        x_sq += tl.sum(x * x, axis=1)
        c_sq += tl.sum(c * c, axis=1)
    # One compile-time branch per distances.REGISTRY code: sim from x.c, |x|^2 and |c|^2 (Distance.similarity).
    if DISTANCE == 0:  # "cosine"
        x_norm = tl.maximum(tl.sqrt_rn(x_sq), 1e-12)  # [BB] (distances.EPS)
        c_norm = tl.maximum(tl.sqrt_rn(c_sq), 1e-12)  # [BK]
        sim = dots / (x_norm[:, None] * c_norm[None, :])  # [BB, BK]
    else:
        tl.static_assert(DISTANCE == 1, "pool_distance_triton has no branch for this DISTANCE code")
        sim = -tl.sqrt_rn(tl.maximum(x_sq[:, None] - 2.0 * dots + c_sq[None, :], 0.0))  # [BB, BK] "l2"
    wsum = tl.load(wsum_ptr + rows64, mask=row_ok, other=0.0, volatile=True)  # [BB]
    live = row_ok & (wsum != 0.0)
    adapter = tl.load(c2a_ptr + ks64, mask=k_ok, other=0).to(tl.int64)  # [BK]
    tl.atomic_max(scores_ptr + rows64[:, None] * A + adapter[None, :], sim, mask=live[:, None] & k_ok[None, :])
    tl.debug_barrier()
    arrived = tl.atomic_add(rb_sync_ptr + rb, 1, sem="acq_rel")
    if arrived == n_kt - 1:
        _finalize_best(rb, scores_ptr, best_ptr, B, A, BLOCK_B, BLOCK_A)


@triton.jit
def _after_pooling(
    item, n_pool, n_white, pooled_ptr, whitened_ptr, wsum_ptr, center_ptr, transform_ptr, cent_ptr, c2a_ptr,
    scores_ptr, best_ptr, sync_ptr, B, D, K, A, stride_ck,
    HAS_CENTER: tl.constexpr, HAS_TRANSFORM: tl.constexpr, DISTANCE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Post-pooling item ``item`` (ticket - n_pool) of both kernels: whitening items first (with HAS_TRANSFORM),
    then scoring items; each waits for the phase before it (module docstring)."""
    if HAS_TRANSFORM:
        if item < n_white:
            _wait_done(sync_ptr + 1, n_pool)
            _whiten_tile(item, pooled_ptr, center_ptr, transform_ptr, whitened_ptr, B, D,
                         HAS_CENTER, BLOCK_B, BLOCK_D)
            _signal_done(sync_ptr + 2)
        else:
            _wait_done(sync_ptr + 2, n_white)
            _score_tile(item - n_white, whitened_ptr, wsum_ptr, center_ptr, cent_ptr, c2a_ptr,
                        scores_ptr, best_ptr, sync_ptr + 3, B, D, K, A, stride_ck, False, DISTANCE,
                        BLOCK_B, BLOCK_K, BLOCK_D, BLOCK_A)
    else:
        _wait_done(sync_ptr + 1, n_pool)
        _score_tile(item, pooled_ptr, wsum_ptr, center_ptr, cent_ptr, c2a_ptr, scores_ptr, best_ptr,
                    sync_ptr + 3, B, D, K, A, stride_ck, HAS_CENTER, DISTANCE,
                    BLOCK_B, BLOCK_K, BLOCK_D, BLOCK_A)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _embed_pool_distance_kernel(
    ids_ptr, mask_ptr, emb_ptr, tokw_ptr, center_ptr, transform_ptr, cent_ptr, c2a_ptr,
    pooled_ptr, whitened_ptr, wsum_ptr, scores_ptr, best_ptr, sync_ptr,
    B, T, D, K, A,
    stride_ib, stride_it, stride_mb, stride_mt, stride_ev, stride_ck,
    n_dtiles, n_pool, n_white,
    HAS_TOKW: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_TRANSFORM: tl.constexpr, DISTANCE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Semantics: scores[b, a] = max_{k: c2a[k]=a} sim(W (mean_t w E[ids[b,t]] - center), C[k]); best = argmax_a.

    W = transform [D, D] (contiguous fp32) when HAS_TRANSFORM, identity otherwise. Grid: n_pool + n_white +
    n_score programs (module docstring; n_white = 0 without a transform). The host wrapper has checked
    everything.
    """
    ticket = tl.atomic_add(sync_ptr, 1)
    if ticket < n_pool:
        b = ticket // n_dtiles
        dt = ticket % n_dtiles
        _pool_tile(b, dt, ids_ptr, mask_ptr, emb_ptr, tokw_ptr, pooled_ptr, wsum_ptr,
                   T, D, stride_ib, stride_it, stride_mb, stride_mt, stride_ev,
                   HAS_TOKW, BLOCK_T, BLOCK_DP)
        if dt == 0:
            _init_row_outputs(b, scores_ptr, best_ptr, A, BLOCK_A)
        _signal_done(sync_ptr + 1)
    else:
        _after_pooling(ticket - n_pool, n_pool, n_white, pooled_ptr, whitened_ptr, wsum_ptr, center_ptr,
                       transform_ptr, cent_ptr, c2a_ptr, scores_ptr, best_ptr, sync_ptr, B, D, K, A, stride_ck,
                       HAS_CENTER, HAS_TRANSFORM, DISTANCE, BLOCK_B, BLOCK_K, BLOCK_D, BLOCK_A)


@triton.jit
def _incremental_pool_distance_kernel(
    new_ids_ptr, new_mask_ptr, emb_ptr, tokw_ptr, center_ptr, transform_ptr, cent_ptr, c2a_ptr,
    sum_ptr, wsum_ptr, pooled_ptr, whitened_ptr, scores_ptr, best_ptr, sync_ptr,
    B, D, K, A, stride_ev, stride_sb, stride_ck, n_white,
    HAS_MASK: tl.constexpr, HAS_TOKW: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_TRANSFORM: tl.constexpr,
    DISTANCE: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Semantics: S[b] += w[b] E[new_ids[b]]; W[b] += w[b] (in place); scores[b, a] = max_k sim(M (S[b]/W[b] - center), C[k]).

    M = transform [D, D] (contiguous fp32) when HAS_TRANSFORM, identity otherwise. Pooling items are whole
    rows (tickets < B; O(D) each, they own S[b] and W[b] and write ``pooled`` = S/W); then, with
    HAS_TRANSFORM, the ``n_white`` whitening items of ``_whiten_tile``; then the scoring items of
    ``_score_tile`` (module docstring for the phases and the waits).
    """
    ticket = tl.atomic_add(sync_ptr, 1)
    if ticket < B:
        b64 = ticket.to(tl.int64)
        tid = tl.load(new_ids_ptr + b64).to(tl.int64)
        w = tl.load(wsum_ptr + b64) * 0.0 + 1.0  # fp32 scalar 1
        if HAS_MASK:
            keep = tl.load(new_mask_ptr + b64) != 0
            tid = tl.where(keep, tid, 0)
            w = tl.where(keep, w, 0.0)
        if HAS_TOKW:
            w = w * tl.load(tokw_ptr + tid).to(tl.float32)
        wsum = tl.load(wsum_ptr + b64) + w
        denom = tl.where(wsum != 0.0, wsum, 1.0)
        for d0 in range(0, D, BLOCK_DP):
            offs_d = d0 + tl.arange(0, BLOCK_DP)  # [BDP]
            d_ok = offs_d < D
            live = (tl.zeros([BLOCK_DP], tl.float32) + w) != 0.0  # [BDP]: skip the row read when w == 0
            e = tl.load(emb_ptr + tid * stride_ev + offs_d, mask=d_ok & live, other=0.0).to(tl.float32)
            s = tl.load(sum_ptr + b64 * stride_sb + offs_d, mask=d_ok, other=0.0) + w * e  # [BDP]
            tl.store(sum_ptr + b64 * stride_sb + offs_d, s, mask=d_ok)
            tl.store(pooled_ptr + b64 * D + offs_d, tl.where(wsum != 0.0, s / denom, 0.0), mask=d_ok)
        tl.store(wsum_ptr + b64, wsum)
        _init_row_outputs(ticket, scores_ptr, best_ptr, A, BLOCK_A)
        _signal_done(sync_ptr + 1)
    else:
        _after_pooling(ticket - B, B, n_white, pooled_ptr, whitened_ptr, wsum_ptr, center_ptr, transform_ptr,
                       cent_ptr, c2a_ptr, scores_ptr, best_ptr, sync_ptr, B, D, K, A, stride_ck,
                       HAS_CENTER, HAS_TRANSFORM, DISTANCE, BLOCK_B, BLOCK_K, BLOCK_D, BLOCK_A)


# --------------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------------


def pool_distance_blocks(batch: int, tokens: int, dim: int, num_centroids: int, num_adapters: int, device) -> dict:
    """Block sizes: ``GPU_BLOCKS`` on a GPU; in the interpreter large blocks (few block ops, fast on numpy)."""
    if device.type != "cpu":
        return dict(GPU_BLOCKS)
    return {
        "BLOCK_T": next_pow2(tokens, cap=256),
        "BLOCK_DP": next_pow2(dim, cap=1024),
        "BLOCK_B": next_pow2(batch, cap=64),
        "BLOCK_K": next_pow2(num_centroids, cap=256),
        "BLOCK_D": next_pow2(dim, cap=1024),
        "BLOCK_A": next_pow2(num_adapters, cap=1024),
    }


@dataclass
class _Launch:
    """What both host wrappers hand their kernel: converted tables, outputs, scratch, block sizes and item counts.

    ``c2a`` int32 [K]; ``center`` fp32 [D], ``tokw`` fp32 [V], ``transform`` fp32 [D, D] contiguous, each or None;
    ``pooled`` [B, D] fp32 (output or scratch), ``whitened`` [B, D] fp32 scratch (with a transform), ``scores``
    [B, A] fp32, ``best`` [B] int64, ``sync`` [3 + cdiv(B, BLOCK_B)] int32 zeros (module docstring).
    """

    c2a: torch.Tensor
    center: torch.Tensor | None
    tokw: torch.Tensor | None
    transform: torch.Tensor | None
    pooled: torch.Tensor
    whitened: torch.Tensor | None
    scores: torch.Tensor
    best: torch.Tensor
    sync: torch.Tensor
    blocks: dict
    n_white: int
    n_score: int

    def tables(self) -> tuple[torch.Tensor, ...]:
        """(tokw, center, transform) pointers, ``pooled`` standing in for an absent one (never dereferenced)."""
        return tuple(self.pooled if t is None else t for t in (self.tokw, self.center, self.transform))

    def flags(self, args: RoutingArgs) -> dict:
        """The constexpr switches shared by both kernels, and the block sizes."""
        return dict(HAS_TOKW=self.tokw is not None, HAS_CENTER=self.center is not None,
                    HAS_TRANSFORM=self.transform is not None, DISTANCE=args.distance.code, **self.blocks)


def _prepare_launch(args: RoutingArgs, batch: int, tokens: int | None, block_sizes: dict | None) -> _Launch:
    """Layout and device checks of the tables (``ValueError`` / ``RuntimeError``), then the `_Launch` of a batch.

    ``tokens`` is T for the full kernel and None for the incremental one (no ``BLOCK_T``). Never copies the table
    or the centroids (they must be contiguous in their last dimension); a strided transform is copied contiguous.
    """
    emb, centroids = args.embed_weight, args.centroids
    check_last_dim_contiguous("embed_weight", emb)
    check_last_dim_contiguous("centroids", centroids)
    if centroids.dtype not in TABLE_DTYPES:
        raise ValueError(f"centroids must be fp32/fp16/bf16, got {centroids.dtype}")
    check_triton_device(INTERPRETED, emb)
    dim, num_centroids, num_adapters, device = emb.shape[1], centroids.shape[0], args.num_adapters, emb.device
    blocks = resolve_blocks(
        pool_distance_blocks(batch, tokens or 1, dim, num_centroids, num_adapters, device), block_sizes)
    if tokens is None:
        blocks.pop("BLOCK_T")
    transform = None if args.transform is None else args.transform.contiguous()  # [D, D] (fp32 checked; small)
    n_rb = triton.cdiv(batch, blocks["BLOCK_B"])
    n_white = 0 if transform is None or num_centroids == 0 else n_rb * triton.cdiv(dim, blocks["BLOCK_D"])
    return _Launch(
        c2a=args.centroid_adapter.to(torch.int32).contiguous(),  # [K]
        center=None if args.center is None else args.center.to(torch.float32).contiguous(),  # [D]
        tokw=None if args.token_weights is None else args.token_weights.to(torch.float32).contiguous(),  # [V]
        transform=transform,
        pooled=torch.empty(batch, dim, dtype=torch.float32, device=device),  # [B, D]
        whitened=None if transform is None else torch.empty(batch, dim, dtype=torch.float32, device=device),
        scores=torch.empty(batch, num_adapters, dtype=torch.float32, device=device),  # [B, A]
        best=torch.empty(batch, dtype=torch.int64, device=device),  # [B]
        sync=torch.zeros(3 + n_rb, dtype=torch.int32, device=device),  # tickets, pooled, whitened, row blocks
        blocks=blocks, n_white=n_white, n_score=n_rb * triton.cdiv(num_centroids, blocks["BLOCK_K"]),
    )


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (same bytes, no copy); other dtypes unchanged."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def embed_pool_distance_triton(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    args: RoutingArgs,
    *,
    return_pooled: bool = False,
    block_sizes: dict | None = None,
):
    """Semantics: scores[b, a] = max_k sim(W (mean_t w E[ids[b,t]] - center), C[k]) over adapter a's centroids;
    best[b] = first argmax_a, -1 for a row with no weighted tokens.

    Exactly the rules of ``pool_distance_torch.embed_pool_distance_ref`` (its tables and options arrive checked as
    ``args``, from ``checks.routing_args``; same returns) in ONE Triton launch (module docstring: ticketed pooling
    items, with a transform whitening tiles, then scoring tiles with ``tl.dot`` and ``atomic_max`` into a
    -inf-initialised ``scores`` [B, A], and a last-arriver argmax for ``best``). ``return_pooled`` returns the
    pooled embedding before centering and whitening. Cost: module docstring ("Memory floor").

    Checks before launch (``ValueError``): ``input_ids`` / ``attention_mask`` shapes and device, last-dim contiguity
    of the table and centroids (never copied), and every id at a masked-in position in [0, V) (the error names the
    id and V; one host sync). ``block_sizes`` overrides any of ``GPU_BLOCKS``' keys.
    """
    check_batch_shapes(input_ids, attention_mask)
    emb = args.embed_weight
    devices = {input_ids.device, attention_mask.device, emb.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    check_token_ids_in_range(input_ids, attention_mask != 0, emb.shape[0])
    batch, tokens = input_ids.shape
    run = _prepare_launch(args, batch, tokens, block_sizes)
    mask = _mask_view(attention_mask)  # [B, T]
    wsum = torch.empty(batch, dtype=torch.float32, device=emb.device)  # [B]
    n_dtiles = triton.cdiv(emb.shape[1], run.blocks["BLOCK_DP"])
    n_pool = batch * n_dtiles
    if batch:
        _embed_pool_distance_kernel[(n_pool + run.n_white + run.n_score,)](
            input_ids, mask, emb, *run.tables(), args.centroids, run.c2a,
            run.pooled, run.pooled if run.whitened is None else run.whitened, wsum, run.scores, run.best, run.sync,
            batch, tokens, emb.shape[1], args.centroids.shape[0], args.num_adapters,
            input_ids.stride(0), input_ids.stride(1), mask.stride(0), mask.stride(1),
            emb.stride(0), args.centroids.stride(0), n_dtiles, n_pool, run.n_white, **run.flags(args),
        )
    return (run.scores, run.best, run.pooled) if return_pooled else (run.scores, run.best)


def incremental_pool_distance_triton(
    new_ids: torch.Tensor,
    running_sum: torch.Tensor,
    running_weight: torch.Tensor,
    args: RoutingArgs,
    *,
    new_mask: torch.Tensor | None = None,
    block_sizes: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: S[b] += w[b] E[new_ids[b]]; W[b] += w[b] (in place); scores[b, a] = max_k sim(M (S[b]/W[b] - center), C[k]).

    M = ``args.transform`` [D, D] fp32 (``x = (S/W - center) @ transform.T``), identity when None. Exactly
    ``pool_distance_torch.incremental_pool_distance_ref`` (tables and options checked as ``args``) in one launch: B row
    items (O(D) each: one table row read, S[b] read and written), with a transform the whitening tiles, then the
    scoring tiles of ``embed_pool_distance_triton``. Cost: module docstring ("Memory floor"). ``running_sum`` must be
    contiguous in its last dimension and ``running_weight`` contiguous (updated in place, never copied).
    """
    emb = args.embed_weight
    keep = check_incremental_args(new_ids, running_sum, running_weight, emb, new_mask)  # [B]
    check_last_dim_contiguous("running_sum", running_sum)
    if not running_weight.is_contiguous():
        raise ValueError("running_weight must be contiguous")
    check_token_ids_in_range(new_ids, keep, emb.shape[0])
    batch = new_ids.shape[0]
    run = _prepare_launch(args, batch, None, block_sizes)
    mask = None if new_mask is None else _mask_view(new_mask.to(emb.device)).contiguous()  # [B]
    if batch:
        _incremental_pool_distance_kernel[(batch + run.n_white + run.n_score,)](
            new_ids.contiguous(), run.pooled if mask is None else mask, emb, *run.tables(), args.centroids, run.c2a,
            running_sum, running_weight, run.pooled, run.pooled if run.whitened is None else run.whitened,
            run.scores, run.best, run.sync, batch, emb.shape[1], args.centroids.shape[0], args.num_adapters,
            emb.stride(0), running_sum.stride(0), args.centroids.stride(0), run.n_white,
            HAS_MASK=mask is not None, **run.flags(args),
        )
    return run.scores, run.best
