"""Triton kernels and launchers for the fused memory attention (SPEC section 5, issue 6).

Two launchers with the signatures of ``_reference_fwd`` / ``_reference_bwd`` in ``function.py``:

    memory_attention_fwd(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len,
                         deterministic) -> (out, lse_local, lse_mem, indices)
    memory_attention_bwd(dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values, indices, out,
                         lse_local, lse_mem, window, merge, gate, scale, deterministic)
        -> (dq, dk, dv, dmem_keys, dmem_values, dgate)

Query ``t`` sits at position ``p = S - T + t`` and sees local keys ``p - window < j <= p``
(``window=None`` is ``window = S``); query head ``h`` uses kv head ``h // (H // Hkv)`` and memory
head ``h // (H // Hm)``; shared (3-D) memories use a batch stride of 0.

Forward
-------
1. Selection: :func:`l2m_kernels.ops.topk_read.triton.topk_read_select` (the triton top-k read's
   own selection, so ``indices`` are exactly the top-k read's) writes ``indices``, the memory
   softmax ``weights`` (float32 scratch) and ``lse_mem``.
2. ``memory_attention_fwd_kernel``, one program per (batch, head, block of ``BLOCK_M`` queries),
   FlashAttention style: an online softmax (base-2, running max and sum in float32) over the key
   tiles of ``BLOCK_N`` that intersect the block's window, then the block's selected memory rows
   (``out_mem = sum_j weights_j * mem_values[indices_j]``, gathered in float32) merged in the same
   kernel: ``merge="joint"`` as one softmax over both sets (``lse = logaddexp(lse_local, lse_mem)``,
   each side weighted by ``exp(lse_side - lse)``), ``merge="gate"`` as
   ``sigmoid(gate) * out_mem + (1 - sigmoid(gate)) * out_local``. ``out`` is rounded to the input
   dtype once. No ``T x S`` or ``T x N`` tensor exists.

   Key tiles are walked in three ranges: tiles every query of the block sees entirely need no
   mask; the tiles at the window's lower edge and on the causal diagonal are masked.
3. inf/NaN context values: a tile-wide ``p @ v`` would turn ``0 * inf`` at a masked position into
   NaN for queries that cannot see it (the reference keeps them finite). Masked tiles therefore
   zero such values for the dot and flag the block; ``memory_attention_fwd_nonfinite_kernel``
   (same grid, every unflagged program returns at once, no host sync) then adds
   ``c_local * P_n * v_n`` (inf or NaN, as IEEE gives) for the visible ones. A separate kernel,
   because the key-by-key loop inside the forward cost it registers enough to spill.

Backward (FlashAttention-2 style; per query row, with ``Delta = <dout, out>``)
-----------------------------------------------------------------------------
The local scores ``s_n`` get ``ds_n = P_n * (c_L * dp_n - delta_L)`` with ``P_n = exp(s_n -
lse_local)`` and ``dp_n = <dout, v_n>``; the memory scores ``ds_j = W_j * (c_M * dw_j - delta_M)``
with ``W_j = exp(s_j - lse_mem)`` and ``dw_j = <dout, mem_values[idx_j]>``, where

- joint (``lse = logaddexp(lse_local, lse_mem)``, ``a = exp(lse_local - lse)``,
  ``b = exp(lse_mem - lse)``; ``out`` is the softmax over the union, so ``d out / d s_n =
  a P_n (v_n - out)``; ``lse_local`` and ``lse_mem`` add ``dlse_local * P_n``, ``dlse_mem * W_j``):
  ``c_L = a, delta_L = a * Delta - dlse_local;  c_M = b, delta_M = b * Delta - dlse_mem``.
- gate (``g = sigmoid(gate)``, ``X_M = <dout, out_mem> = sum_j W_j dw_j``, ``Y_L = <dout,
  out_local>`` with ``out_local`` recomputed by the forward kernels with the memory part switched
  off): ``c_L = 1 - g, delta_L = (1 - g) Y_L - dlse_local;  c_M = g, delta_M = g X_M - dlse_mem``;
  ``dgate = g (1 - g) (X_M - Y_L)``, summed to the gate's shape. (``(1 - g) Y_L = Delta - g X_M``
  would need no recompute, but ``Delta`` comes from the rounded ``out``, whose error is divided by
  ``1 - g`` there: a saturated gate lost every digit of ``dgate`` and ``dk`` in bfloat16.)

Then ``dv_n += c_L P_n dout``, ``dk_n += scale ds_n q``, ``dq += scale ds_n k_n`` (local) and
``dmem_values[idx_j] += c_M W_j dout``, ``dmem_keys[idx_j] += scale ds_j q``,
``dq += scale ds_j mem_keys[idx_j]`` (memory). Kernels:

1. ``memory_attention_bwd_mem_kernel`` (``BLOCK_T`` query rows of one (batch, memory head), as
   the top-k read's backward): ``Delta``, the per-row ``c_L``, ``delta_L`` (float32 scratch for
   the two local kernels), ``dgate`` rows, and the memory part: ``W_j`` recomputed from the
   gathered keys (the forward's weights are not saved), ``ds_j``, the memory share of ``dq``
   (float32 scratch) and the scatter into the slot gradients: float32 atomics by default; with
   ``deterministic`` it stores ``ds_j`` and ``c_M W_j`` per entry instead and the top-k read's
   ``topk_read_bwd_slot_kernel`` sums every slot's entries in a fixed order (no float atomics,
   bitwise reproducible). In gate mode a first pass over the entries computes ``X_M``.
2. ``memory_attention_bwd_dkdv_kernel``: one program per (batch, kv head, key block of
   ``BLOCK_N``) walks the query blocks that see the block, for every query head of its group
   (one flat loop in a fixed order, no atomics; every tile masked), accumulating ``dk`` and ``dv``.
3. ``memory_attention_bwd_dq_kernel``: one program per (batch, head, query block) walks its key
   tiles (the forward's ranges), adds the memory share and writes ``dq``.

The local part is deterministic in both modes; only the memory slot scatter uses atomics.

Numerics: loads in the input dtype, float32 softmax statistics and accumulators, stores in the
output dtype. float32 inputs use ``tl.dot(..., input_precision="ieee")`` (no TF32); 16-bit inputs
use the tensor cores with float32 accumulation, ``P`` and ``dS`` rounded to the input dtype for
their dots as in FlashAttention. bfloat16 under the interpreter upcasts the dot operands (its
``tl.dot`` multiplies raw bfloat16 bits; see ``_triton_lib.f32_dot``). Feature sizes are
padded to a power of two >= 16 (``tl.dot``) and masked. Offsets that can pass 2**31 elements are
int64 (per-head bases, gathered memory rows); offsets inside a tile are int32.

``COMPILE_CONFIGS`` lists every kernel at the configurations :func:`launch_config` picks for the
production dtypes and head sizes (D = Dv = 64, 128); ``python -m tools.triton_check
--module l2m_kernels.ops.memory_attention.triton`` compiles them for sm_80/sm_90.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..._alloc import empty
from .._common import f32_accumulator, store_accumulated
from .._triton_lib import (COMPILE_OPTIONS, argument_types, block_d, compile_entry, config_label,
                          constexpr_names, device_guard, f32_dot, merged_lse, row_block_rows,
                          row_block_grid, side_weight, sigmoid_pair)
from ..topk_read import triton as topk_triton

__all__ = [
    "memory_attention_fwd",
    "memory_attention_bwd",
    "launch_config",
    "COMPILE_CONFIGS",
]

LOG2E_PY = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(LOG2E_PY)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

@triton.jit
def _key_tile_ranges(p_first, p_last, window, BLOCK_N: tl.constexpr):
    """Key tiles of queries at positions [p_first, p_last]: (lo, a, b, hi), multiples of BLOCK_N
    apart from lo. Tiles in [a, b) are visible from every position (no mask); [lo, a) (window's
    lower edge) and [b, hi) (the diagonal) need masks. Every division has a non-negative operand."""
    lo = tl.maximum(p_first - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = lo + tl.cdiv(p_last + 1 - lo, BLOCK_N) * BLOCK_N
    # First tile starting at or after the last position's window start.
    a = lo + tl.cdiv(tl.maximum(p_last - window + 1 - lo, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(a, hi)
    # Tiles ending at or before the first position are causal for every query.
    b = lo + (p_first + 1 - lo) // BLOCK_N * BLOCK_N
    b = tl.maximum(b, a)
    return lo, a, b, hi


@triton.jit
def _is_finite(b_x):
    return (b_x == b_x) & (tl.abs(b_x) != float("inf"))


@triton.jit
def _fwd_tile(b_q, b_acc, b_m, b_l, b_bad, p_kb, p_vb, n0, pos, window, S, D, Dv, qk_scale,
              MASKED: tl.constexpr, F32_DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key tile of the online softmax; ``p_kb`` / ``p_vb`` point at the head's key/value 0.

    Masked tiles zero inf/NaN values for the dot (``0 * inf`` at a masked position would reach
    queries that cannot see it) and raise ``b_bad``; memory_attention_fwd_nonfinite_kernel then
    adds those values exactly for the queries that see them.
    """
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_n = n0 + o_bn
    m_n = o_n < S
    p_k = p_kb + tl.cast(n0, tl.int64) * D
    p_v = p_vb + tl.cast(n0, tl.int64) * Dv
    # [BD, BN] keys transposed for the dot; [BN, BDV] values.
    b_kt = tl.load(p_k + o_bn[None, :] * D + o_d[:, None], mask=m_n[None, :] & (o_d < D)[:, None], other=0.)
    b_v = tl.load(p_v + o_bn[:, None] * Dv + o_dv[None, :], mask=m_n[:, None] & (o_dv < Dv)[None, :], other=0.)
    # [BM, BN] scores in base-2 units.
    if F32_DOT:
        b_s = tl.dot(b_q.to(tl.float32), b_kt.to(tl.float32), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, b_kt)
    b_s = b_s * qk_scale
    if MASKED:
        m_vis = (o_n[None, :] <= pos[:, None]) & (o_n[None, :] > pos[:, None] - window)
        b_s = tl.where(m_vis, b_s, float("-inf"))
        m_bad = ~_is_finite(b_v.to(tl.float32))
        b_bad = tl.maximum(b_bad, tl.max(tl.max(m_bad.to(tl.int32), axis=1), axis=0))
        b_v = tl.where(m_bad, 0., b_v)
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    # A row that has seen nothing yet keeps m = -inf: shift by 0 so exp2(-inf - shift) = 0, not NaN.
    b_shift = tl.where(b_m_new == float("-inf"), 0., b_m_new)
    b_p = tl.exp2(b_s - b_shift[:, None])
    b_alpha = tl.exp2(b_m - b_shift)
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    if F32_DOT:
        b_pv = tl.dot(b_p, b_v.to(tl.float32), input_precision="ieee")
    else:
        b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
    b_acc = b_acc * b_alpha[:, None] + b_pv
    return b_acc, b_m_new, b_l, b_bad


@triton.jit
def _fwd_block(i_prog, num_t_blocks, H, Hkv, Hm):
    """(i_bh, i_tb, i_b, i_hkv, i_hm) of a forward program (int32); the latest query blocks run
    first (without a window they see the most keys)."""
    i_bh = i_prog // num_t_blocks
    i_tb = num_t_blocks - 1 - (i_prog - i_bh * num_t_blocks)
    i_b = i_bh // H
    i_h = i_bh - i_b * H
    return i_bh, i_tb, i_b, i_h // (H // Hkv), i_h // (H // Hm)


@triton.jit
def _merge_coefficients(lse_mem, gate, o_row, m_m, b_lse_local, MERGE_GATE: tl.constexpr):
    """[BM] (c_local, c_mem): out = c_local * out_local + c_mem * out_mem for either merge."""
    if MERGE_GATE:
        b_gate = tl.load(gate + o_row, mask=m_m, other=0.).to(tl.float32)
        b_c_mem, b_c_local = sigmoid_pair(b_gate)
    else:
        b_lse_mem = tl.load(lse_mem + o_row, mask=m_m, other=float("-inf"))
        b_lse = merged_lse(b_lse_local, b_lse_mem)
        b_c_local = side_weight(b_lse_local, b_lse)
        b_c_mem = side_weight(b_lse_mem, b_lse)
    return b_c_local, b_c_mem


# ---------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def memory_attention_fwd_kernel(
    q,  # [B, H, T, D] x
    k,  # [B, Hkv, S, D] x
    v,  # [B, Hkv, S, Dv] x
    mem_values,  # [B, Hm, N, Dv] or [Hm, N, Dv] x
    indices,  # [B, H, T, topk] int64, from the selection
    weights,  # [B, H, T, topk] fp32, from the selection
    lse_mem,  # [B, H, T] fp32, from the selection
    gate,  # [B, H, T] x logits (read only when MERGE_GATE)
    out,  # [B, H, T, Dv] x, written
    lse_local,  # [B, H, T] fp32, written
    nonfinite,  # [B * H * num_t_blocks] int32, written: 1 where a masked tile held an inf/NaN value
    T,
    S,
    D,
    Dv,
    N,
    topk,
    H,
    Hkv,
    Hm,
    window,  # min(window, S); S for window=None
    qk_scale,  # scale * log2(e)
    mem_batch_stride,  # Hm * N * Dv, or 0 for shared memories
    num_t_blocks,  # cdiv(T, BLOCK_M)
    MERGE_GATE: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_t_blocks * B * H,): BLOCK_M queries of one (batch, head)."""
    i_bh, i_tb, i_b, i_hkv, i_hm = _fwd_block(tl.program_id(0), num_t_blocks, H, Hkv, Hm)
    i_bh = i_bh.to(tl.int64)

    t0 = i_tb * BLOCK_M
    o_bm = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_m = t0 + o_bm
    m_m = o_m < T
    m_dv = o_dv < Dv
    pos = S - T + o_m
    row0 = i_bh * T + t0  # int64 global row of the block's first query
    o_row = row0 + o_bm

    # [BM, BD]
    b_q = tl.load(q + row0 * D + o_bm[:, None] * D + o_d[None, :], mask=m_m[:, None] & (o_d < D)[None, :], other=0.)
    p_kb = k + (i_b.to(tl.int64) * Hkv + i_hkv) * S * D
    p_vb = v + (i_b.to(tl.int64) * Hkv + i_hkv) * S * Dv

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_bad = tl.zeros([], dtype=tl.int32)
    p_first = S - T + t0
    p_last = S - T + tl.minimum(t0 + BLOCK_M, T) - 1
    lo, a, b, hi = _key_tile_ranges(p_first, p_last, window, BLOCK_N)
    for n0 in range(lo, a, BLOCK_N):
        b_acc, b_m, b_l, b_bad = _fwd_tile(b_q, b_acc, b_m, b_l, b_bad, p_kb, p_vb, n0, pos, window, S, D, Dv,
                                           qk_scale, True, F32_DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    for n0 in range(a, b, BLOCK_N):
        b_acc, b_m, b_l, b_bad = _fwd_tile(b_q, b_acc, b_m, b_l, b_bad, p_kb, p_vb, n0, pos, window, S, D, Dv,
                                           qk_scale, False, F32_DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    for n0 in range(b, hi, BLOCK_N):
        b_acc, b_m, b_l, b_bad = _fwd_tile(b_q, b_acc, b_m, b_l, b_bad, p_kb, p_vb, n0, pos, window, S, D, Dv,
                                           qk_scale, True, F32_DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    tl.store(nonfinite + i_bh * num_t_blocks + i_tb, b_bad)

    # [BM]: a row whose scores are all -inf has lse = -inf and out_local = 0; l is NaN (not 0) when
    # a visible score is NaN, and at least 1 otherwise (the maximum's own term).
    b_empty = b_l == 0.
    b_lse_local = tl.where(b_empty, float("-inf"), (b_m + tl.log2(b_l)) * LN2)
    b_c_local, b_c_mem = _merge_coefficients(lse_mem, gate, o_row, m_m, b_lse_local, MERGE_GATE)
    # out = c_local * out_local + c_mem * sum_j weights_j * mem_values[indices_j], accumulated in
    # place (one [BM, BDV] tile live, not separate local and memory results).
    b_acc = b_acc * (b_c_local / tl.where(b_empty, 1., b_l))[:, None]
    p_mv = mem_values + i_b.to(tl.int64) * mem_batch_stride + i_hm.to(tl.int64) * N * Dv
    for j in range(0, topk):
        # [BM]
        b_idx = tl.load(indices + o_row * topk + j, mask=m_m, other=-1)
        b_w = tl.load(weights + o_row * topk + j, mask=m_m, other=0.)
        m_live = (b_idx >= 0) & (b_idx < N)
        # [BM, BDV]
        b_mv = tl.load(p_mv + b_idx[:, None] * Dv + o_dv[None, :], mask=m_live[:, None] & m_dv[None, :], other=0.)
        b_acc += (b_c_mem * b_w)[:, None] * b_mv.to(tl.float32)
    tl.store(out + o_row[:, None] * Dv + o_dv[None, :], b_acc.to(out.dtype.element_ty),
             mask=m_m[:, None] & m_dv[None, :])
    tl.store(lse_local + o_row, b_lse_local, mask=m_m)


@triton.jit
def _nonfinite_keys(b_corr, b_q, b_lse_local, m_m, pos, p_kb, p_vb, n_start, n_end, window, S, D, Dv, qk_scale,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """b_corr [BR, BDV] += P_n * v_n over the keys n in [n_start, n_end) whose value row holds an
    inf/NaN, for the queries that see n (P_n = exp(s_n - lse_local))."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for n in range(n_start, n_end):
        # [BDV]
        # (n as a tensor in the masks: under the interpreter a loop index is a Python int.)
        b_v_row = tl.load(p_vb + tl.cast(n, tl.int64) * Dv + o_dv, mask=(o_dv * 0 + n < S) & (o_dv < Dv),
                          other=0.).to(tl.float32)
        m_row_bad = ~_is_finite(b_v_row)
        if tl.max(m_row_bad.to(tl.int32), axis=0) > 0:
            # [BD]
            b_k_row = tl.load(p_kb + tl.cast(n, tl.int64) * D + o_d, mask=(o_d * 0 + n < S) & (o_d < D),
                              other=0.).to(tl.float32)
            # [BR]
            m_sees = m_m & (n <= pos) & (n > pos - window)
            b_p = tl.exp(tl.sum(b_q * b_k_row[None, :], axis=1) * (qk_scale * LN2) - b_lse_local)
            b_corr += tl.where(m_sees[:, None] & m_row_bad[None, :], b_p[:, None] * b_v_row[None, :], 0.)
    return b_corr


@triton.jit
def memory_attention_fwd_nonfinite_kernel(
    q,  # [B, H, T, D] x
    k,  # [B, Hkv, S, D] x
    v,  # [B, Hkv, S, Dv] x
    lse_mem,  # [B, H, T] fp32
    gate,  # [B, H, T] x logits (read only when MERGE_GATE)
    lse_local,  # [B, H, T] fp32, the forward's
    nonfinite,  # [B * H * num_t_blocks] int32 from memory_attention_fwd_kernel
    out,  # [B, H, T, Dv] x, updated where a query sees an inf/NaN value of a masked tile
    T,
    S,
    D,
    Dv,
    H,
    Hkv,
    Hm,
    window,
    qk_scale,
    num_t_blocks,  # of the forward kernel
    MERGE_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the forward kernel's tiles, whose masked tiles this revisits
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # query rows handled at a time
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_t_blocks * B * H,), as the forward. A program whose forward block zeroed an inf/NaN
    value in a masked tile adds ``c_local * exp(s_n - lse_local) * v_n`` (IEEE: inf or NaN) for the
    visible such values to ``out``; every other program returns at once (the usual case)."""
    i_bh, i_tb, i_b, i_hkv, i_hm = _fwd_block(tl.program_id(0), num_t_blocks, H, Hkv, Hm)
    i_bh = i_bh.to(tl.int64)
    b_flag = tl.load(nonfinite + i_bh * num_t_blocks + i_tb)
    if b_flag != 0:
        t0 = i_tb * BLOCK_M
        p_first = S - T + t0
        p_last = S - T + tl.minimum(t0 + BLOCK_M, T) - 1
        lo, a, b, hi = _key_tile_ranges(p_first, p_last, window, BLOCK_N)
        p_kb = k + (i_b.to(tl.int64) * Hkv + i_hkv) * S * D
        p_vb = v + (i_b.to(tl.int64) * Hkv + i_hkv) * S * Dv
        o_d = tl.arange(0, BLOCK_D)
        o_dv = tl.arange(0, BLOCK_DV)
        t_end = tl.minimum(t0 + BLOCK_M, T)
        for r0 in range(t0, t_end, BLOCK_R):
            o_m = r0 + tl.arange(0, BLOCK_R)
            m_m = o_m < t_end
            pos = S - T + o_m
            o_row = i_bh * T + o_m
            # [BR, BD]
            b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_m[:, None] & (o_d < D)[None, :],
                          other=0.).to(tl.float32)
            b_lse_local = tl.load(lse_local + o_row, mask=m_m, other=0.)
            b_corr = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
            # The masked tiles [lo, a) and [b, hi), one key at a time.
            b_corr = _nonfinite_keys(b_corr, b_q, b_lse_local, m_m, pos, p_kb, p_vb, lo, a, window, S, D, Dv,
                                     qk_scale, BLOCK_D, BLOCK_DV)
            b_corr = _nonfinite_keys(b_corr, b_q, b_lse_local, m_m, pos, p_kb, p_vb, b, hi, window, S, D, Dv,
                                     qk_scale, BLOCK_D, BLOCK_DV)
            b_c_local, b_c_mem = _merge_coefficients(lse_mem, gate, o_row, m_m, b_lse_local, MERGE_GATE)
            m_fix = (b_corr != 0.) & m_m[:, None] & (o_dv < Dv)[None, :]
            p_out = out + o_row[:, None] * Dv + o_dv[None, :]
            b_out = tl.load(p_out, mask=m_fix, other=0.).to(tl.float32)
            tl.store(p_out, (b_out + b_c_local[:, None] * b_corr).to(out.dtype.element_ty), mask=m_fix)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def memory_attention_bwd_mem_kernel(
    q,  # [B, H, T, D] x
    mem_keys,  # [B, Hm, N, D] or [Hm, N, D] x
    mem_values,  # [B, Hm, N, Dv] or [Hm, N, Dv] x
    dout,  # [B, H, T, Dv] x
    out,  # [B, H, T, Dv] x, the forward's (MERGE_GATE: out_local, recomputed)
    indices,  # [B, H, T, topk] int64
    lse_local,  # [B, H, T] fp32
    lse_mem,  # [B, H, T] fp32
    dlse_local,  # [B, H, T] fp32
    dlse_mem,  # [B, H, T] fp32
    gate,  # [B, H, T] x logits (read only when MERGE_GATE)
    dscale,  # [B, H, T] fp32, written: c_L
    delta,  # [B, H, T] fp32, written: delta_L
    dq_mem,  # [B, H, T, D] fp32, written: the memory share of dq
    dgate_rows,  # [B, H, T] fp32, written when MERGE_GATE
    dmem_keys_acc,  # like mem_keys, fp32, accumulated into (ATOMIC only)
    dmem_values_acc,  # like mem_values, fp32, accumulated into (ATOMIC only)
    ds,  # [B, H, T, topk] fp32, written unless ATOMIC: ds_j
    cw,  # [B, H, T, topk] fp32, written unless ATOMIC: c_M * W_j
    R,  # query rows per (batch, memory head) = (H // Hm) * T
    N,
    D,
    Dv,
    topk,
    scale,
    Hm,
    mk_batch_stride,  # Hm * N * D, or 0 for shared memories
    mv_batch_stride,  # Hm * N * Dv, or 0 for shared memories
    num_row_blocks,  # cdiv(R, BLOCK_T)
    MERGE_GATE: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm,): BLOCK_T query rows of one (batch, memory head).

    The memory side of the backward and of the merge: c_L and delta_L for the local kernels, the
    memory share of dq, the gate's per-row gradient (MERGE_GATE), and each entry's terms of the
    memory slot gradients (float32 atomics, or ds_j and c_M * W_j stored for the deterministic
    slot reduction).
    """
    _, i_b, i_hm, o_t, m_t, o_row = row_block_rows(num_row_blocks, Hm, R, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < Dv
    p_mk = mem_keys + i_b * mk_batch_stride + i_hm * N * D
    p_mv = mem_values + i_b * mv_batch_stride + i_hm * N * Dv

    # [BT, BD], [BT, BDV]
    b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
    m_tdv = m_t[:, None] & m_dv[None, :]
    b_do = tl.load(dout + o_row[:, None] * Dv + o_dv[None, :], mask=m_tdv, other=0.).to(tl.float32)
    b_o = tl.load(out + o_row[:, None] * Dv + o_dv[None, :], mask=m_tdv, other=0.).to(tl.float32)
    # [BT]
    b_delta_out = tl.sum(b_do * b_o, axis=1)
    b_lse_local = tl.load(lse_local + o_row, mask=m_t, other=0.)
    b_lse_mem = tl.load(lse_mem + o_row, mask=m_t, other=float("-inf"))
    b_dlse_local = tl.load(dlse_local + o_row, mask=m_t, other=0.)
    b_dlse_mem = tl.load(dlse_mem + o_row, mask=m_t, other=0.)
    m_has_mem = b_lse_mem != float("-inf")
    b_q_scaled = b_q * scale

    if MERGE_GATE:
        b_g, b_one_minus_g = sigmoid_pair(tl.load(gate + o_row, mask=m_t, other=0.).to(tl.float32))
        # X_M = <dout, out_mem> = sum_j W_j dw_j: a first pass over the entries.
        b_xm = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in range(0, topk):
            b_idx = tl.load(indices + o_row * topk + j, mask=m_t, other=-1)
            m_live = m_t & (b_idx >= 0) & (b_idx < N)
            b_mk = tl.load(p_mk + b_idx[:, None] * D + o_d[None, :], mask=m_live[:, None] & m_d[None, :],
                           other=0.).to(tl.float32)
            b_mv = tl.load(p_mv + b_idx[:, None] * Dv + o_dv[None, :], mask=m_live[:, None] & m_dv[None, :],
                           other=0.).to(tl.float32)
            b_w = tl.where(m_live & m_has_mem, tl.exp(tl.sum(b_q_scaled * b_mk, axis=1) - b_lse_mem), 0.)
            b_xm += tl.where(m_live, b_w * tl.sum(b_do * b_mv, axis=1), 0.)
        # Here `out` is out_local: b_delta_out is Y_L = <dout, out_local>.
        b_c_local = b_one_minus_g
        b_delta_local = b_one_minus_g * b_delta_out - b_dlse_local
        b_c_mem = b_g
        b_delta_mem = b_g * b_xm - b_dlse_mem
        tl.store(dgate_rows + o_row, b_g * b_one_minus_g * (b_xm - b_delta_out), mask=m_t)
    else:
        b_lse = merged_lse(b_lse_local, b_lse_mem)
        b_a = side_weight(b_lse_local, b_lse)
        b_b = side_weight(b_lse_mem, b_lse)
        b_c_local = b_a
        b_delta_local = b_a * b_delta_out - b_dlse_local
        b_c_mem = b_b
        b_delta_mem = b_b * b_delta_out - b_dlse_mem
    tl.store(dscale + o_row, b_c_local, mask=m_t)
    tl.store(delta + o_row, b_delta_local, mask=m_t)

    # [BT, BD]
    b_dq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(0, topk):
        # [BT]
        b_idx = tl.load(indices + o_row * topk + j, mask=m_t, other=-1)
        m_live = m_t & (b_idx >= 0) & (b_idx < N)
        m_kd = m_live[:, None] & m_d[None, :]
        m_vd = m_live[:, None] & m_dv[None, :]
        o_kd = b_idx[:, None] * D + o_d[None, :]
        o_vd = b_idx[:, None] * Dv + o_dv[None, :]
        # [BT, BD], [BT, BDV]
        b_mk = tl.load(p_mk + o_kd, mask=m_kd, other=0.).to(tl.float32)
        b_mv = tl.load(p_mv + o_vd, mask=m_vd, other=0.).to(tl.float32)
        b_w = tl.where(m_live & m_has_mem, tl.exp(tl.sum(b_q_scaled * b_mk, axis=1) - b_lse_mem), 0.)
        b_dw = tl.sum(b_do * b_mv, axis=1)
        b_ds = tl.where(m_live, b_w * (b_c_mem * b_dw - b_delta_mem), 0.)
        b_cw = tl.where(m_live, b_c_mem * b_w, 0.)
        b_dq += b_ds[:, None] * b_mk
        if ATOMIC:
            tl.atomic_add(dmem_keys_acc + i_b * mk_batch_stride + i_hm * N * D + o_kd, b_ds[:, None] * b_q_scaled,
                          mask=m_kd, sem="relaxed")
            tl.atomic_add(dmem_values_acc + i_b * mv_batch_stride + i_hm * N * Dv + o_vd, b_cw[:, None] * b_do,
                          mask=m_vd, sem="relaxed")
        else:
            tl.store(ds + o_row * topk + j, b_ds, mask=m_t)
            tl.store(cw + o_row * topk + j, b_cw, mask=m_t)
    tl.store(dq_mem + o_row[:, None] * D + o_d[None, :], scale * b_dq, mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _dkdv_tile(b_k, b_v, b_dk, b_dv, p_qb, p_dob, p_lse, p_c, p_delta, t0, o_n, T, S, D, Dv, window, qk_scale,
               F32_DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One query block's contribution to a key block's dk (unscaled) and dv (always masked)."""
    o_bm = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_m = t0 + o_bm
    m_m = o_m < T
    p_q = p_qb + tl.cast(t0, tl.int64) * D
    p_do = p_dob + tl.cast(t0, tl.int64) * Dv
    # [BM, BD], [BM, BDV]
    b_q = tl.load(p_q + o_bm[:, None] * D + o_d[None, :], mask=m_m[:, None] & (o_d < D)[None, :], other=0.)
    b_do = tl.load(p_do + o_bm[:, None] * Dv + o_dv[None, :], mask=m_m[:, None] & (o_dv < Dv)[None, :], other=0.)
    # [BM]; rows past T get lse = +inf, so P = 0 there.
    b_lse2 = tl.load(p_lse + t0 + o_bm, mask=m_m, other=float("inf")) * LOG2E
    b_c = tl.load(p_c + t0 + o_bm, mask=m_m, other=0.)
    b_delta = tl.load(p_delta + t0 + o_bm, mask=m_m, other=0.)
    # [BN, BM]
    if F32_DOT:
        b_st = tl.dot(b_k.to(tl.float32), tl.trans(b_q.to(tl.float32)), input_precision="ieee")
    else:
        b_st = tl.dot(b_k, tl.trans(b_q))
    pos = S - T + o_m
    m_vis = (o_n[:, None] <= pos[None, :]) & (o_n[:, None] > pos[None, :] - window)
    b_pt = tl.where(m_vis, tl.exp2(b_st * qk_scale - b_lse2[None, :]), 0.)
    b_pct = b_pt * b_c[None, :]
    if F32_DOT:
        b_dv += tl.dot(b_pct, b_do.to(tl.float32), input_precision="ieee")
        b_dpt = tl.dot(b_v.to(tl.float32), tl.trans(b_do.to(tl.float32)), input_precision="ieee")
    else:
        b_dv += tl.dot(b_pct.to(b_do.dtype), b_do)
        b_dpt = tl.dot(b_v, tl.trans(b_do))
    # dp at a masked position may be inf/NaN (from v): keep it out.
    b_dst = tl.where(m_vis, b_pt * (b_c[None, :] * b_dpt - b_delta[None, :]), 0.)
    if F32_DOT:
        b_dk += tl.dot(b_dst, b_q.to(tl.float32), input_precision="ieee")
    else:
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q)
    return b_dk, b_dv


@triton.jit
def memory_attention_bwd_dkdv_kernel(
    q,  # [B, H, T, D] x
    k,  # [B, Hkv, S, D] x
    v,  # [B, Hkv, S, Dv] x
    dout,  # [B, H, T, Dv] x
    lse_local,  # [B, H, T] fp32
    dscale,  # [B, H, T] fp32: c_L
    delta,  # [B, H, T] fp32: delta_L
    dk,  # [B, Hkv, S, D] x, written
    dv,  # [B, Hkv, S, Dv] x, written
    T,
    S,
    D,
    Dv,
    H,
    Hkv,
    window,  # min(window, S); S for window=None
    scale,
    qk_scale,  # scale * log2(e)
    num_n_blocks,  # cdiv(S, BLOCK_N)
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_n_blocks * B * Hkv,): BLOCK_N keys of one (batch, kv head), summed over the
    query heads of its group in order (no atomics)."""
    i_prog = tl.program_id(0)
    i_bkv = i_prog // num_n_blocks
    i_nb = i_prog - i_bkv * num_n_blocks
    i_b = i_bkv // Hkv
    i_hkv = i_bkv - i_b * Hkv
    group = H // Hkv

    n0 = i_nb * BLOCK_N
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_n = n0 + o_bn
    m_n = o_n < S
    m_nd = m_n[:, None] & (o_d < D)[None, :]
    m_ndv = m_n[:, None] & (o_dv < Dv)[None, :]
    kv_row0 = i_bkv.to(tl.int64) * S + n0
    # [BN, BD], [BN, BDV]
    b_k = tl.load(k + kv_row0 * D + o_bn[:, None] * D + o_d[None, :], mask=m_nd, other=0.)
    b_v = tl.load(v + kv_row0 * Dv + o_bn[:, None] * Dv + o_dv[None, :], mask=m_ndv, other=0.)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Queries t whose position p = S - T + t sees a key of the block: n0 <= p <= n_last + window - 1.
    n_last = tl.minimum(n0 + BLOCK_N, S) - 1
    shift = S - T
    t_lo = tl.maximum(n0 - shift, 0)
    t_end = tl.minimum(n_last + window - shift, T)
    lo = t_lo // BLOCK_M * BLOCK_M
    num_blocks = tl.cdiv(tl.maximum(t_end - lo, 0), BLOCK_M)
    # One flat loop over (query head of the group, query block), every tile masked: nested loops,
    # or separate loops for the unmasked tiles, cost ptxas 50+ registers here and made it spill.
    for i_it in range(0, group * num_blocks):
        i_g = i_it // num_blocks
        t0 = lo + (i_it - i_g * num_blocks) * BLOCK_M
        i_bh = (i_b * H + i_hkv * group + i_g).to(tl.int64)
        b_dk, b_dv = _dkdv_tile(b_k, b_v, b_dk, b_dv, q + i_bh * T * D, dout + i_bh * T * Dv, lse_local + i_bh * T,
                                dscale + i_bh * T, delta + i_bh * T, t0, o_n, T, S, D, Dv, window, qk_scale,
                                F32_DOT, BLOCK_M, BLOCK_D, BLOCK_DV)

    tl.store(dk + kv_row0 * D + o_bn[:, None] * D + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty), mask=m_nd)
    tl.store(dv + kv_row0 * Dv + o_bn[:, None] * Dv + o_dv[None, :], b_dv.to(dv.dtype.element_ty), mask=m_ndv)


@triton.jit
def _dq_tile(b_q, b_do, b_lse2, b_c, b_delta, b_dq, p_kb, p_vb, n0, pos, window, S, D, Dv, qk_scale,
             MASKED: tl.constexpr, F32_DOT: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key tile's contribution to a query block's dq (unscaled)."""
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_n = n0 + o_bn
    m_n = o_n < S
    p_k = p_kb + tl.cast(n0, tl.int64) * D
    p_v = p_vb + tl.cast(n0, tl.int64) * Dv
    # [BN, BD], [BN, BDV]
    b_k = tl.load(p_k + o_bn[:, None] * D + o_d[None, :], mask=m_n[:, None] & (o_d < D)[None, :], other=0.)
    b_v = tl.load(p_v + o_bn[:, None] * Dv + o_dv[None, :], mask=m_n[:, None] & (o_dv < Dv)[None, :], other=0.)
    # [BM, BN]
    if F32_DOT:
        b_s = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision="ieee")
        b_dp = tl.dot(b_do.to(tl.float32), tl.trans(b_v.to(tl.float32)), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
        b_dp = tl.dot(b_do, tl.trans(b_v))
    b_p = tl.exp2(b_s * qk_scale - b_lse2[:, None])
    b_ds = b_p * (b_c[:, None] * b_dp - b_delta[:, None])
    if MASKED:
        m_vis = (o_n[None, :] <= pos[:, None]) & (o_n[None, :] > pos[:, None] - window)
        b_ds = tl.where(m_vis, b_ds, 0.)
    if F32_DOT:
        b_dq += tl.dot(b_ds, b_k.to(tl.float32), input_precision="ieee")
    else:
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    return b_dq


@triton.jit
def memory_attention_bwd_dq_kernel(
    q,  # [B, H, T, D] x
    k,  # [B, Hkv, S, D] x
    v,  # [B, Hkv, S, Dv] x
    dout,  # [B, H, T, Dv] x
    lse_local,  # [B, H, T] fp32
    dscale,  # [B, H, T] fp32: c_L
    delta,  # [B, H, T] fp32: delta_L
    dq_mem,  # [B, H, T, D] fp32: the memory share of dq
    dq,  # [B, H, T, D] x, written
    T,
    S,
    D,
    Dv,
    H,
    Hkv,
    window,  # min(window, S); S for window=None
    scale,
    qk_scale,  # scale * log2(e)
    num_t_blocks,  # cdiv(T, BLOCK_M)
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_t_blocks * B * H,): BLOCK_M queries of one (batch, head)."""
    i_prog = tl.program_id(0)
    i_bh = i_prog // num_t_blocks
    i_tb = num_t_blocks - 1 - (i_prog - i_bh * num_t_blocks)
    i_b = i_bh // H
    i_h = i_bh - i_b * H
    i_hkv = i_h // (H // Hkv)
    i_bh = i_bh.to(tl.int64)

    t0 = i_tb * BLOCK_M
    o_bm = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_m = t0 + o_bm
    m_m = o_m < T
    m_md = m_m[:, None] & (o_d < D)[None, :]
    pos = S - T + o_m
    row0 = i_bh * T + t0
    o_row = row0 + o_bm

    # [BM, BD], [BM, BDV]
    b_q = tl.load(q + row0 * D + o_bm[:, None] * D + o_d[None, :], mask=m_md, other=0.)
    b_do = tl.load(dout + row0 * Dv + o_bm[:, None] * Dv + o_dv[None, :], mask=m_m[:, None] & (o_dv < Dv)[None, :],
                   other=0.)
    # [BM]
    b_lse2 = tl.load(lse_local + o_row, mask=m_m, other=0.) * LOG2E
    b_c = tl.load(dscale + o_row, mask=m_m, other=0.)
    b_delta = tl.load(delta + o_row, mask=m_m, other=0.)
    p_kb = k + (i_b.to(tl.int64) * Hkv + i_hkv) * S * D
    p_vb = v + (i_b.to(tl.int64) * Hkv + i_hkv) * S * Dv

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_first = S - T + t0
    p_last = S - T + tl.minimum(t0 + BLOCK_M, T) - 1
    lo, a, b, hi = _key_tile_ranges(p_first, p_last, window, BLOCK_N)
    for n0 in range(lo, a, BLOCK_N):
        b_dq = _dq_tile(b_q, b_do, b_lse2, b_c, b_delta, b_dq, p_kb, p_vb, n0, pos, window, S, D, Dv, qk_scale,
                        True, F32_DOT, BLOCK_N, BLOCK_D, BLOCK_DV)
    for n0 in range(a, b, BLOCK_N):
        b_dq = _dq_tile(b_q, b_do, b_lse2, b_c, b_delta, b_dq, p_kb, p_vb, n0, pos, window, S, D, Dv, qk_scale,
                        False, F32_DOT, BLOCK_N, BLOCK_D, BLOCK_DV)
    for n0 in range(b, hi, BLOCK_N):
        b_dq = _dq_tile(b_q, b_do, b_lse2, b_c, b_delta, b_dq, p_kb, p_vb, n0, pos, window, S, D, Dv, qk_scale,
                        True, F32_DOT, BLOCK_N, BLOCK_D, BLOCK_DV)

    b_dq_mem = tl.load(dq_mem + row0 * D + o_bm[:, None] * D + o_d[None, :], mask=m_md, other=0.)
    tl.store(dq + row0 * D + o_bm[:, None] * D + o_d[None, :], (b_dq * scale + b_dq_mem).to(dq.dtype.element_ty),
             mask=m_md)


# ---------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and COMPILE_CONFIGS, so the two cannot drift)
# ---------------------------------------------------------------------------------------------

class Tile(NamedTuple):
    block_m: int  # queries per tile (rows per block of the memory kernel)
    block_n: int  # keys per tile (unused by the memory kernel)
    num_warps: int
    num_stages: int


class LaunchConfig(NamedTuple):
    """Constexprs, warps and stages of every kernel for one (D, Dv, dtype)."""

    f32_dot: bool
    block_d: int
    block_dv: int
    fwd: Tile
    dkdv: Tile
    dq: Tile
    mem: Tile


# Tiles by (float32 dot, padded head size = max(BLOCK_D, BLOCK_DV) capped at 128). 16-bit inputs
# run on the tensor cores: FlashAttention-2 shapes (a wide query tile in the forward and dq, a wide
# key tile in dk/dv). float32 runs on the FMA units (no TF32), whose dot operands take more
# registers: narrower tiles. Chosen by compiling candidates for D = Dv = 64 and 128 for sm_80 and
# sm_90 with Triton 3.9 (ptxas 12.9); every entry here compiles without spills with room to spare
# (the largest take 213-230 registers), while e.g. a 16-bit forward of [128, 64] at 4 warps, dq of
# [128, 32] at D = 128, or dk/dv of [128 keys, 32 queries] spill or sit at 255. Head sizes above
# 128 use the 128 row (correct; they may spill).
_FWD_TILES = {
    (False, 16): Tile(128, 64, 8, 3), (False, 32): Tile(128, 64, 8, 3),
    (False, 64): Tile(128, 64, 8, 3), (False, 128): Tile(128, 32, 8, 3),
    (True, 16): Tile(64, 32, 8, 2), (True, 32): Tile(64, 32, 8, 2),
    (True, 64): Tile(64, 32, 8, 2), (True, 128): Tile(32, 16, 4, 2),
}
_DKDV_TILES = {
    (False, 16): Tile(32, 64, 4, 2), (False, 32): Tile(32, 64, 4, 2),
    (False, 64): Tile(32, 64, 4, 2), (False, 128): Tile(32, 64, 8, 2),
    (True, 16): Tile(32, 32, 8, 2), (True, 32): Tile(32, 32, 8, 2),
    (True, 64): Tile(32, 32, 8, 2), (True, 128): Tile(16, 32, 8, 2),
}
_DQ_TILES = {
    (False, 16): Tile(128, 32, 8, 2), (False, 32): Tile(128, 32, 8, 2),
    (False, 64): Tile(128, 32, 8, 2), (False, 128): Tile(128, 16, 8, 2),
    (True, 16): Tile(32, 32, 4, 2), (True, 32): Tile(32, 32, 4, 2),
    (True, 64): Tile(32, 32, 4, 2), (True, 128): Tile(32, 16, 4, 2),
}
# The memory kernel walks each row's entries with gathers: 16 rows, as the top-k read's backward.
MEM_TILE = Tile(16, 0, 4, 1)
# The forward's inf/NaN fix-up walks 32 query rows at a time, one key at a time (rarely runs).
NONFINITE_TILE = Tile(32, 0, 8, 1)


def launch_config(D: int, Dv: int, dtype: torch.dtype) -> LaunchConfig:
    """Tiles of every kernel for head sizes ``D``, ``Dv`` and ``dtype`` (a fixed choice)."""
    use_f32_dot = f32_dot(dtype)
    block_dk, block_dv = block_d(D), block_d(Dv)
    key = (use_f32_dot, min(max(block_dk, block_dv), 128))
    return LaunchConfig(use_f32_dot, block_dk, block_dv, _FWD_TILES[key], _DKDV_TILES[key], _DQ_TILES[key],
                        MEM_TILE)


def _attention_constexprs(config: LaunchConfig, tile: Tile) -> dict:
    return {"F32_DOT": config.f32_dot, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
            "BLOCK_D": config.block_d, "BLOCK_DV": config.block_dv}


def _fwd_constexprs(config: LaunchConfig, merge_gate: bool) -> tuple[dict, Tile]:
    return {"MERGE_GATE": merge_gate, **_attention_constexprs(config, config.fwd)}, config.fwd


def _nonfinite_constexprs(config: LaunchConfig, merge_gate: bool) -> tuple[dict, Tile]:
    return {"MERGE_GATE": merge_gate, "BLOCK_M": config.fwd.block_m, "BLOCK_N": config.fwd.block_n,
            "BLOCK_R": NONFINITE_TILE.block_m, "BLOCK_D": config.block_d, "BLOCK_DV": config.block_dv}, NONFINITE_TILE


def _dkdv_constexprs(config: LaunchConfig) -> tuple[dict, Tile]:
    return _attention_constexprs(config, config.dkdv), config.dkdv


def _dq_constexprs(config: LaunchConfig) -> tuple[dict, Tile]:
    return _attention_constexprs(config, config.dq), config.dq


def _mem_constexprs(config: LaunchConfig, merge_gate: bool, atomic: bool) -> tuple[dict, Tile]:
    return {"MERGE_GATE": merge_gate, "ATOMIC": atomic, "BLOCK_T": config.mem.block_m,
            "BLOCK_D": config.block_d, "BLOCK_DV": config.block_dv}, config.mem


def _launch_options(tile: Tile) -> dict:
    return {"num_warps": tile.num_warps, "num_stages": tile.num_stages, **COMPILE_OPTIONS}


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _check_dtype(q: torch.Tensor):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: the triton memory_attention supports float32/float16/bfloat16, got {q.dtype}")


def _window(window, S: int) -> int:
    """The window as the kernels take it: ``None`` or anything >= S is S (every j <= p)."""
    return S if window is None else max(1, min(int(window), S))


def _padded_head_dim(D: int, dtype: torch.dtype) -> int:
    """The head size the kernels run at: D, except 16-bit rows that are not 16-byte aligned
    (D % 8 != 0) run at the tile width with zero columns. On an H200 with Triton 3.6 the forward
    kernel faulted (illegal address, not every run) at float16 D = 33 and never at D = 32 or 64;
    zero columns change no score and their gradients are sliced off."""
    if dtype in (torch.float16, torch.bfloat16) and D % 8:
        return block_d(D)
    return D


def _pad_head_dim(D_run: int, *tensors: torch.Tensor) -> list:
    return [t if t.shape[-1] == D_run else torch.nn.functional.pad(t, (0, D_run - t.shape[-1])) for t in tensors]


def _gate_rows(gate: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    # gate broadcasts to (B, H, T, 1); the kernels take one logit per query row.
    return gate.expand(B, H, T, 1).reshape(B * H * T).contiguous()


def memory_attention_fwd(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len,
                         deterministic):
    """Fused memory attention forward (SPEC section 5) on CUDA tensors (CPU under the interpreter).

    Args:
        q:          (B, H, T, D) x, x in {float32, float16, bfloat16}.
        k, v:       (B, Hkv, S, D), (B, Hkv, S, Dv) x; S >= T, H % Hkv == 0.
        mem_keys:   (B, Hm, N, D) or shared (Hm, N, D) x; mem_values the same with Dv; H % Hm == 0.
        topk:       1 <= topk <= min(N, 256).   window: None or int >= 1.
        merge:      "joint" or "gate".   gate: logits broadcastable to (B, H, T, 1) for "gate".
        scale:      python float.   valid_len: None or (B,) integer tensor.
        deterministic: unused (the forward is deterministic).

    Returns:
        out (B, H, T, Dv) x; lse_local, lse_mem (B, H, T) float32; indices (B, H, T, topk) int64.

    Equivalent PyTorch:
        out, lse_local, lse_mem, indices = memory_attention_ref(q, k, v, mem_keys, mem_values, topk,
                                                                window, merge, gate, scale, valid_len)
    """
    _check_dtype(q)
    q, k, mem_keys = _pad_head_dim(_padded_head_dim(q.shape[-1], q.dtype), q, k, mem_keys)
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Hm, N = mem_keys.shape[-3], mem_keys.shape[-2]
    device = q.device
    out = empty((B, H, T, Dv), dtype=q.dtype, device=device)
    lse_local = empty((B, H, T), dtype=torch.float32, device=device)
    lse_mem = empty((B, H, T), dtype=torch.float32, device=device)
    indices = empty((B, H, T, topk), dtype=torch.int64, device=device)
    if B * H * T == 0:
        return out, lse_local, lse_mem, indices
    merge_gate = merge == "gate"
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mem_keys, mem_values = mem_keys.contiguous(), mem_values.contiguous()
    vl = None if valid_len is None else valid_len.to(device=device, dtype=torch.int64).contiguous()
    weights = torch.empty((B, H, T, topk), dtype=torch.float32, device=device)
    gate_rows = _gate_rows(gate, B, H, T) if merge_gate else q  # never read without a gate

    with device_guard(q):
        topk_triton.topk_read_select(q, mem_keys, vl, topk, float(scale), indices, weights, lse_mem)
        _attention_fwd(q, k, v, mem_values, indices, weights, lse_mem, gate_rows, out, lse_local, window,
                       scale, merge_gate)
    return out, lse_local, lse_mem, indices


def _attention_fwd(q, k, v, mem_values, indices, weights, lse_mem, gate_rows, out, lse_local, window, scale,
                   merge_gate):
    """The forward kernels on contiguous inputs and a given selection: out, lse_local written."""
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Hm, N = mem_values.shape[-3], mem_values.shape[-2]
    topk = indices.shape[-1]
    config = launch_config(D, Dv, q.dtype)
    constexprs, tile = _fwd_constexprs(config, merge_gate)
    num_t_blocks = triton.cdiv(T, tile.block_m)
    nonfinite = torch.empty(num_t_blocks * B * H, dtype=torch.int32, device=q.device)
    window_arg, qk_scale = _window(window, S), float(scale) * LOG2E_PY
    memory_attention_fwd_kernel[(num_t_blocks * B * H,)](
        q, k, v, mem_values, indices, weights, lse_mem, gate_rows, out, lse_local, nonfinite,
        T, S, D, Dv, N, topk, H, Hkv, Hm, window_arg, qk_scale,
        0 if mem_values.dim() == 3 else Hm * N * Dv, num_t_blocks,
        **constexprs, **_launch_options(tile),
    )
    # Returns at once unless a masked tile held an inf/NaN value (no host sync to find out).
    constexprs, tile = _nonfinite_constexprs(config, merge_gate)
    memory_attention_fwd_nonfinite_kernel[(num_t_blocks * B * H,)](
        q, k, v, lse_mem, gate_rows, lse_local, nonfinite, out,
        T, S, D, Dv, H, Hkv, Hm, window_arg, qk_scale, num_t_blocks,
        **constexprs, **_launch_options(tile),
    )


def _local_out(q, k, v, mem_values, indices, lse_mem, window, scale):
    """out_local (input dtype), recomputed by the forward kernels in gate mode with a gate of -inf
    (sigmoid 0: the local part alone) and no memory entry (indices -1)."""
    B, H, T, _ = q.shape
    out_local = torch.empty((B, H, T, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse_scratch = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    gate_off = torch.full((B * H * T,), float("-inf"), dtype=q.dtype, device=q.device)
    no_entries = torch.full_like(indices, -1)
    weights = torch.zeros(indices.shape, dtype=torch.float32, device=q.device)
    _attention_fwd(q, k, v, mem_values, no_entries, weights, lse_mem, gate_off, out_local, lse_scratch, window,
                   scale, True)
    return out_local


def memory_attention_bwd(dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values, indices, out, lse_local,
                         lse_mem, window, merge, gate, scale, deterministic):
    """Gradients of :func:`memory_attention_fwd` in q, k, v, mem_keys, mem_values and gate.

    Args:
        dout:       (B, H, T, Dv) x.   dlse_local, dlse_mem: (B, H, T) float32.
        q, k, v, mem_keys, mem_values, window, merge, gate, scale: as in the forward.
        indices, out, lse_local, lse_mem: the forward's outputs.
        deterministic: True -> bitwise reproducible (slot-owner reduction of the memory gradients,
                   no float atomics); False -> float32 atomics into the memory slot gradients.

    Returns:
        dq, dk, dv, dmem_keys, dmem_values (shapes and dtypes of their inputs; memory slots no query
        selected get 0, shared memories sum over the batch), dgate (gate's shape and dtype, or an
        empty tensor without a gate).

    Equivalent PyTorch:
        grads = torch.autograd.grad(memory_attention_gather(q, k, v, mem_keys, mem_values, indices,
                                                            window, merge, gate, scale),
                                    (q, k, v, mem_keys, mem_values, gate),
                                    (dout, dlse_local, dlse_mem))
    """
    _check_dtype(q)
    D_in = q.shape[-1]
    q, k, mem_keys = _pad_head_dim(_padded_head_dim(D_in, q.dtype), q, k, mem_keys)
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Hm, N = mem_keys.shape[-3], mem_keys.shape[-2]
    topk = indices.shape[-1]
    shared = mem_keys.dim() == 3
    device = q.device
    merge_gate = merge == "gate"
    dq = empty(q.shape, dtype=q.dtype, device=device)
    dk = empty(k.shape, dtype=k.dtype, device=device)
    dv = empty(v.shape, dtype=v.dtype, device=device)
    dmem_keys = empty(mem_keys.shape, dtype=mem_keys.dtype, device=device)
    dmem_values = empty(mem_values.shape, dtype=mem_values.dtype, device=device)
    dgate = q.new_empty(0)
    if B * H * T == 0:
        for grad in (dk, dv, dmem_keys, dmem_values):
            grad.zero_()
        if merge_gate:
            dgate = torch.zeros_like(gate)
        dq, dk, dmem_keys = _unpad(D_in, dq, dk, dmem_keys)
        return dq, dk, dv, dmem_keys, dmem_values, dgate

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mem_keys, mem_values = mem_keys.contiguous(), mem_values.contiguous()
    dout, indices, out = dout.contiguous(), indices.contiguous(), out.contiguous()
    dlse_local, dlse_mem = dlse_local.float().contiguous(), dlse_mem.float().contiguous()
    lse_local, lse_mem = lse_local.float().contiguous(), lse_mem.float().contiguous()
    rows = B * H * T
    dscale = torch.empty(rows, dtype=torch.float32, device=device)
    delta = torch.empty(rows, dtype=torch.float32, device=device)
    dq_mem = torch.empty((rows, D), dtype=torch.float32, device=device)
    gate_rows = _gate_rows(gate, B, H, T) if merge_gate else q  # never read without a gate
    dgate_rows = torch.empty(rows, dtype=torch.float32, device=device) if merge_gate else dscale
    atomic = not deterministic
    if atomic:
        dmk_acc, dmv_acc = f32_accumulator(dmem_keys), f32_accumulator(dmem_values)
        ds = cw = dscale  # float32 stand-ins, never written in this mode
    else:
        ds = torch.empty(rows * topk, dtype=torch.float32, device=device)
        cw = torch.empty(rows * topk, dtype=torch.float32, device=device)
        dmk_acc = dmv_acc = dscale  # float32 stand-ins, never touched in this mode

    config = launch_config(D, Dv, q.dtype)
    window_arg = _window(window, S)
    R = (H // Hm) * T
    with device_guard(q):
        if merge_gate:   # the memory kernel takes <dout, out_local> from out_local (see the module doc)
            out = _local_out(q, k, v, mem_values, indices, lse_mem, window, scale)
        constexprs, tile = _mem_constexprs(config, merge_gate, atomic)
        num_row_blocks, programs = row_block_grid(R, tile.block_m, B * Hm)
        memory_attention_bwd_mem_kernel[(programs,)](
            q, mem_keys, mem_values, dout, out, indices, lse_local, lse_mem, dlse_local, dlse_mem, gate_rows,
            dscale, delta, dq_mem, dgate_rows, dmk_acc, dmv_acc, ds, cw,
            R, N, D, Dv, topk, float(scale), Hm, 0 if shared else Hm * N * D, 0 if shared else Hm * N * Dv,
            num_row_blocks, **constexprs, **_launch_options(tile),
        )
        constexprs, tile = _dkdv_constexprs(config)
        num_n_blocks = triton.cdiv(S, tile.block_n)
        memory_attention_bwd_dkdv_kernel[(num_n_blocks * B * Hkv,)](
            q, k, v, dout, lse_local, dscale, delta, dk, dv,
            T, S, D, Dv, H, Hkv, window_arg, float(scale), float(scale) * LOG2E_PY, num_n_blocks,
            **constexprs, **_launch_options(tile),
        )
        constexprs, tile = _dq_constexprs(config)
        num_t_blocks = triton.cdiv(T, tile.block_m)
        memory_attention_bwd_dq_kernel[(num_t_blocks * B * H,)](
            q, k, v, dout, lse_local, dscale, delta, dq_mem, dq,
            T, S, D, Dv, H, Hkv, window_arg, float(scale), float(scale) * LOG2E_PY, num_t_blocks,
            **constexprs, **_launch_options(tile),
        )
        if not atomic:
            topk_triton.slot_reduce_bwd(q, dout, cw, ds, indices, scale, Hm, N, shared, dmem_keys, dmem_values)
    if atomic:
        store_accumulated(dmem_keys, dmk_acc)
        store_accumulated(dmem_values, dmv_acc)
    if merge_gate:
        # The per-row gate gradient summed over the dimensions the gate was broadcast along
        # (a fixed-order torch reduction: deterministic).
        rows_grad = dgate_rows.view(B, H, T, 1)
        dgate = (rows_grad.sum_to_size(gate.shape) if gate.dim() else rows_grad.sum()).to(gate.dtype)
        dgate = dgate.reshape(gate.shape)
    dq, dk, dmem_keys = _unpad(D_in, dq, dk, dmem_keys)
    return dq, dk, dv, dmem_keys, dmem_values, dgate


def _unpad(D_in: int, *grads: torch.Tensor) -> tuple:
    """Gradients at the caller's head size (see _padded_head_dim)."""
    return tuple(g if g.shape[-1] == D_in else g[..., :D_in].contiguous() for g in grads)


# ---------------------------------------------------------------------------------------------
# Production configurations, for the compile check (tools/triton_check.py)
# ---------------------------------------------------------------------------------------------

COMPILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPILE_HEAD_DIMS = (64, 128)

# Runtime arguments of each kernel, in order, by role (see _triton_lib.argument_types). The
# launchers pass exactly these positionally; _build_compile_configs checks the names against the
# kernels.
_KERNEL_ARGS = {
    memory_attention_fwd_kernel: (
        ("q", "x"), ("k", "x"), ("v", "x"), ("mem_values", "x"), ("indices", "i64"), ("weights", "f32"),
        ("lse_mem", "f32"), ("gate", "x"), ("out", "x"), ("lse_local", "f32"), ("nonfinite", "i32"),
        ("T", "int"), ("S", "int"), ("D", "int"), ("Dv", "int"), ("N", "int"), ("topk", "int"), ("H", "int"),
        ("Hkv", "int"), ("Hm", "int"), ("window", "int"), ("qk_scale", "float"), ("mem_batch_stride", "int"),
        ("num_t_blocks", "int")),
    memory_attention_fwd_nonfinite_kernel: (
        ("q", "x"), ("k", "x"), ("v", "x"), ("lse_mem", "f32"), ("gate", "x"), ("lse_local", "f32"),
        ("nonfinite", "i32"), ("out", "x"),
        ("T", "int"), ("S", "int"), ("D", "int"), ("Dv", "int"), ("H", "int"), ("Hkv", "int"), ("Hm", "int"),
        ("window", "int"), ("qk_scale", "float"), ("num_t_blocks", "int")),
    memory_attention_bwd_mem_kernel: (
        ("q", "x"), ("mem_keys", "x"), ("mem_values", "x"), ("dout", "x"), ("out", "x"), ("indices", "i64"),
        ("lse_local", "f32"), ("lse_mem", "f32"), ("dlse_local", "f32"), ("dlse_mem", "f32"), ("gate", "x"),
        ("dscale", "f32"), ("delta", "f32"), ("dq_mem", "f32"), ("dgate_rows", "f32"),
        ("dmem_keys_acc", "f32"), ("dmem_values_acc", "f32"), ("ds", "f32"), ("cw", "f32"),
        ("R", "int"), ("N", "int"), ("D", "int"), ("Dv", "int"), ("topk", "int"), ("scale", "float"),
        ("Hm", "int"), ("mk_batch_stride", "int"), ("mv_batch_stride", "int"), ("num_row_blocks", "int")),
    memory_attention_bwd_dkdv_kernel: (
        ("q", "x"), ("k", "x"), ("v", "x"), ("dout", "x"), ("lse_local", "f32"), ("dscale", "f32"),
        ("delta", "f32"), ("dk", "x"), ("dv", "x"),
        ("T", "int"), ("S", "int"), ("D", "int"), ("Dv", "int"), ("H", "int"), ("Hkv", "int"),
        ("window", "int"), ("scale", "float"), ("qk_scale", "float"), ("num_n_blocks", "int")),
    memory_attention_bwd_dq_kernel: (
        ("q", "x"), ("k", "x"), ("v", "x"), ("dout", "x"), ("lse_local", "f32"), ("dscale", "f32"),
        ("delta", "f32"), ("dq_mem", "f32"), ("dq", "x"),
        ("T", "int"), ("S", "int"), ("D", "int"), ("Dv", "int"), ("H", "int"), ("Hkv", "int"),
        ("window", "int"), ("scale", "float"), ("qk_scale", "float"), ("num_t_blocks", "int")),
}
# Integer arguments the production shapes make multiples of 16 (head sizes, lengths, strides);
# counts of heads, entries and blocks are not.
_DIVISIBLE_INTS = ("D", "Dv", "T", "S", "N", "R", "mem_batch_stride", "mk_batch_stride", "mv_batch_stride")


def _production_constexprs(kernel, dtype):
    """[(constexprs, tile, head_dim)] the launchers pick for production shapes on a GPU."""
    picks = []
    for D in COMPILE_HEAD_DIMS:
        config = launch_config(D, D, dtype)
        # The GPU path never takes the interpreter-only bfloat16 upcast.
        config = config._replace(f32_dot=dtype == torch.float32)
        if kernel is memory_attention_fwd_kernel:
            for merge_gate in (False, True):
                picks.append((*_fwd_constexprs(config, merge_gate), D))
        elif kernel is memory_attention_fwd_nonfinite_kernel:
            for merge_gate in (False, True):
                picks.append((*_nonfinite_constexprs(config, merge_gate), D))
        elif kernel is memory_attention_bwd_mem_kernel:
            for merge_gate in (False, True):
                for atomic in (True, False):
                    picks.append((*_mem_constexprs(config, merge_gate, atomic), D))
        elif kernel is memory_attention_bwd_dkdv_kernel:
            picks.append((*_dkdv_constexprs(config), D))
        else:
            picks.append((*_dq_constexprs(config), D))
    return picks


_LABELS = {"MERGE_GATE": "GATE", "ATOMIC": "ATOMIC", "BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_T": "BT"}


def _build_compile_configs() -> list[dict]:
    """One entry per distinct (kernel, dtype, constexprs, warps, stages) the launchers pick for the
    production shapes (entry format: tools.triton_check). The deterministic slot reduction
    is the top-k read's kernel, checked with that module."""
    configs = []
    for kernel, args in _KERNEL_ARGS.items():
        names = constexpr_names(kernel, args)
        for dtype in COMPILE_DTYPES:
            types = argument_types(dtype)
            seen = {}
            for constexprs, tile, D in _production_constexprs(kernel, dtype):
                if sorted(constexprs) != sorted(names):
                    raise AssertionError(f"constexprs {sorted(constexprs)} do not match {kernel.__name__}")
                key = (tuple(constexprs.items()), tile.num_warps, tile.num_stages)
                if key in seen:
                    seen[key]["head_dims"].append(D)
                    continue
                seen[key] = compile_entry(kernel, args, types, constexprs, tile.num_warps,
                                          divisible_ints=_DIVISIBLE_INTS, options={"num_stages": tile.num_stages},
                                          head_dims=[D])
                configs.append(seen[key])
            for entry in seen.values():
                entry["label"] = config_label(dtype, "D=" + ",".join(map(str, entry.pop("head_dims"))),
                                              entry["constexprs"], _LABELS)
    return configs


# Kernels decorated under the interpreter have no compile path; they still get the list (the
# check refuses them with a clear message) because it is pure data.
COMPILE_CONFIGS = _build_compile_configs()
