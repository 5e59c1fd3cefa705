"""Triton kernels and launchers for the product-key memory read (SPEC section 2, issue 4).

The two launchers implement the low-level ``product_key_read`` interface shared with the cpu and
cuda backends (outputs preallocated and passed last, every element written, ``None`` returned):

    product_key_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, out, indices, weights, lse)
    product_key_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                    sparse_grad, deterministic, dq, dsubkeys, dvalues)

Semantics are exactly :func:`l2m_kernels.ops.product_key.reference.product_key_read_ref`: per query
row and head, the half scores ``s1 = (q[:Dh] . subkeys[h, 0]) * scale`` and
``s2 = (q[Dh:] . subkeys[h, 1]) * scale`` (float32, no TF32; the dot first, then the scale), the
``k_sub`` best of each (ties: smaller sub-key index), the ``k_sub ** 2`` candidates
``s1[i] + s2[j]`` at slot ``i * n_sub + j``, and the ``k`` best candidates (ties: smaller slot);
then ``weights = softmax``, ``lse = logsumexp`` and ``out = sum_j weights_j * values[slot_j]``,
summed over heads when ``sum_heads``.

Selection uses the sort keys and sorting network of :mod:`l2m_kernels.ops._triton_lib`, as the
top-k read does: every (score, slot) becomes one int64 sort key (order-preserving image of the
float32 score in the high word, ``2**31 - 1 - slot`` in the low word, NaN ranked as +inf), and a
running top list per row is kept sorted in registers with the bitonic sort/merge helpers (Triton
3.3 .. 3.9 and the interpreter). Slots must fit the low word: ``n_sub ** 2 < 2**31``.

Forward, three launches (each hands its results to the next through global memory, so no
in-kernel barrier is needed), nothing of size ``T x n_sub``:

1. ``product_key_fwd_select_kernel``, grid (row blocks x B x H, 2 halves): ``BLOCK_T`` query rows
   of one (batch, head) stream the ``n_sub`` sub-keys of one half in tiles of ``BLOCK_N`` with
   ``tl.dot`` and keep the ``k_sub`` best (``KS_PAD`` = next power of two, >= 16); their scores
   (float32) and sub-key ids (int32) go to a scratch buffer ``(B*H*T, 2, k_sub)``.
2. ``product_key_fwd_topk_kernel`` (same rows): streams the ``k_sub x k_sub`` candidates in tiles
   of one first-half entry ``i`` x ``BLOCK_J`` second-half entries (sums of the scratch scores),
   merges them into a running top list of ``K_PAD`` (next power of two of ``k``, >= 16), then
   writes indices, weights and lse. Because both half lists are sorted descending and float
   addition is monotone, ``s1[i] + s2[j0]`` bounds every candidate of the tile starting at
   (i, j0); a tile whose bound is strictly below every row's current k-th score cannot contribute
   (even through a slot tie after rounding) and is skipped before any candidate is formed. This
   prunes the ``k_sub ** 2`` candidates to roughly the ``k`` best plus one tile per ``i``.
3. ``product_key_fwd_out_kernel``: ``out = sum_j weights_j * values[indices_j]`` in float32. With
   ``sum_heads`` one program owns a (batch, row block, feature block) and sums the heads' reads in
   head order, as the reference does: exact and deterministic, no float atomics.

Backward, per (row, head) entry ``j`` with slot ``idx_j = i_j * n_sub + jj_j`` (``dout`` of the
row is ``dout[b, h, t]``, or ``dout[b, t]`` with ``sum_heads``):
    dw_j = dweights_j + <dout, values[idx_j]>;  ds_j = w_j * (dw_j - sum_i w_i dw_i + dlse)
    dq[:Dh] = scale * sum_j ds_j subkeys[h, 0, i_j];  dq[Dh:] = scale * sum_j ds_j subkeys[h, 1, jj_j]
    dsubkeys[h, 0, i_j] += scale * ds_j * q[:Dh];    dsubkeys[h, 1, jj_j] += scale * ds_j * q[Dh:]
    dvalues[idx_j] += w_j * dout

1. ``product_key_bwd_dweights_kernel`` (row blocks): ``dw`` into a float32 scratch; the values
   gradient is scattered with float32 atomics (dense, default), stored as one row ``w_j * dout``
   per entry (``sparse_grad``: ``(B*H*T*k, Dv)`` in the values dtype, no reduction), or left to
   step 3 (dense and deterministic).
2. ``product_key_bwd_dq_kernel`` (same rows): ``sum_i w_i dw_i``, ``ds`` and ``dq``; scatters
   ``scale * ds_j * q_half`` into ``dsubkeys`` with float32 atomics, or stores ``ds``
   (deterministic).
3. Deterministic only, ``product_key_bwd_segment_kernel``: the host groups the entries by
   destination row (stable ``torch.sort``, run starts by ``torch.searchsorted``) and one program per
   destination row sums its entries in that fixed order (zeros for untouched rows): once over the
   ``2 * H * n_sub`` sub-key rows, once over the ``n_sub ** 2`` value rows (dense only). Bitwise
   identical run to run.

Numerics: loads in the input dtype, computes in float32, stores in the output dtype. float32 scores
use ``tl.dot(..., input_precision="ieee")`` on float32 operands; float16/bfloat16 scores use the
16-bit operands (products exact in float32) with a float32 accumulator. float64 is not supported.

Limits: ``1 <= k <= 256``, ``1 <= k_sub <= 256``, ``n_sub ** 2 < 2**31`` (ValueError beyond).

``COMPILE_CONFIGS`` lists the configurations the launchers pick for the production shapes;
``python -m tools.triton_check`` compiles them for sm_80/sm_90.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import f32_accumulator, store_accumulated
from .._triton_lib import (COMPILE_OPTIONS, INT64_MIN, MIN_K_PAD, argument_types, bitonic_merge,
                          bitonic_sort, block_d, compile_entry, config_label, constexpr_names,
                          decode_keys, device_guard, encode_key, encode_keys, f32_dot,
                          pow2_at_least, row_block, row_block_grid, row_block_rows)
from .plan import half_scratch, subkey_segments, value_segments
from ..topk_read.triton import MAX_BLOCK_D, select_config

__all__ = ["product_key_fwd", "product_key_bwd", "COMPILE_CONFIGS", "MAX_K", "MAX_K_SUB"]

MAX_K = 256
MAX_K_SUB = 256
# Slot ids live in the low 31 bits of a sort key.
MAX_SLOTS = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _merge_tile(b_top, b_key, K_PAD: tl.constexpr, LOG_K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_C: tl.constexpr, LOG_BLOCK_C: tl.constexpr):
    """Merge a [BT, BLOCK_C] key tile into the descending [BT, K_PAD] list (BLOCK_C <= K_PAD).

    As in the top-k read: sort the tile ascending, pad it on the left with INT64_MIN to K_PAD
    (still ascending), take the elementwise maximum with the descending list (exactly the K_PAD
    largest keys of both, as a bitonic sequence) and bitonic-merge that descending.
    """
    b_new = bitonic_sort(b_key, 0, BLOCK_T, BLOCK_C, LOG_BLOCK_C)
    if BLOCK_C < K_PAD:
        o_seg = tl.arange(0, K_PAD // BLOCK_C)
        b_new = tl.reshape(tl.where(o_seg[None, :, None] == K_PAD // BLOCK_C - 1, b_new[:, None, :],
                                    INT64_MIN), [BLOCK_T, K_PAD])
    return bitonic_merge(tl.maximum(b_top, b_new), 1, BLOCK_T, K_PAD, LOG_K_PAD)


@triton.jit
def _kth(b_top, k, K_PAD: tl.constexpr):
    """[BT] k-th best key of each row and its score (-inf while the list holds fewer than k)."""
    o_c = tl.arange(0, K_PAD)
    b_kth = tl.max(tl.where(o_c[None, :] == k - 1, b_top, INT64_MIN), axis=1)
    b_exists, b_score, _ = decode_keys(b_kth)
    return b_kth, tl.where(b_exists, b_score, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def product_key_fwd_select_kernel(
    q,  # [B, H, T, Dk] x, Dk = 2 * Dh
    subkeys,  # [H, 2, n_sub, Dh] x
    sub_scores,  # [B * H * T, 2, k_sub] fp32, written
    sub_ids,  # [B * H * T, 2, k_sub] int32, written
    T,
    H,
    n_sub,
    Dh,
    k_sub,
    scale,
    num_row_blocks,  # cdiv(T, BLOCK_T)
    F32_DOT: tl.constexpr,  # float32 operands, ieee dot (float32 input; see _triton_lib.f32_dot)
    BLOCK_T: tl.constexpr,
    KS_PAD: tl.constexpr,  # top-list width: next_pow2(k_sub), >= 16
    LOG_KS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,  # sub-key tile width, a power of two in [16, KS_PAD]
    LOG_BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr,
):
    """Grid (num_row_blocks * B * H, 2): BLOCK_T query rows of one (batch, head), one half."""
    i_bh, i_tb, i_b, i_h = row_block(num_row_blocks, H)
    i_half = tl.program_id(1).to(tl.int64)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_row = i_bh * T + o_t
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_DK)
    # [BT] start of each row's query half (row stride Dk = 2 * Dh).
    p_q = q + o_row * (2 * Dh) + i_half * Dh
    p_sk = subkeys + (i_h * 2 + i_half) * n_sub * Dh

    # [BT, BDK]: first feature chunk of the query halves, kept for every sub-key tile.
    b_q0 = tl.load(p_q[:, None] + o_d[None, :], mask=m_t[:, None] & (o_d < Dh)[None, :], other=0.)
    if F32_DOT:
        b_q0 = b_q0.to(tl.float32)

    # [BT, KS_PAD] running top list, sorted descending; [BT] its k_sub-th best key.
    b_top = tl.full([BLOCK_T, KS_PAD], INT64_MIN, dtype=tl.int64)
    b_kth = tl.full([BLOCK_T], INT64_MIN, dtype=tl.int64)
    b_has_nan = tl.zeros([BLOCK_T], dtype=tl.int32)
    for n_start in range(0, n_sub, BLOCK_N):
        o_n = (n_start + o_bn).to(tl.int64)
        m_n = o_n < n_sub
        # [BDK, BN]: sub-keys transposed for the dot.
        b_kt = tl.load(p_sk + o_n[None, :] * Dh + o_d[:, None], mask=m_n[None, :] & (o_d < Dh)[:, None], other=0.)
        # [BT, BN]
        if F32_DOT:
            b_s = tl.dot(b_q0, b_kt.to(tl.float32), input_precision="ieee")
        else:
            b_s = tl.dot(b_q0, b_kt)
        for i_d in range(1, DK_CHUNKS):
            o_dc = i_d * BLOCK_DK + o_d
            m_dc = o_dc < Dh
            b_qc = tl.load(p_q[:, None] + o_dc[None, :], mask=m_t[:, None] & m_dc[None, :], other=0.)
            b_kc = tl.load(p_sk + o_n[None, :] * Dh + o_dc[:, None], mask=m_n[None, :] & m_dc[:, None], other=0.)
            if F32_DOT:
                b_s = tl.dot(b_qc.to(tl.float32), b_kc.to(tl.float32), b_s, input_precision="ieee")
            else:
                b_s = tl.dot(b_qc, b_kc, b_s)
        # The dot first, then the scale, as the reference.
        b_s = b_s * scale
        b_has_nan = tl.maximum(b_has_nan, tl.max((m_n[None, :] & (b_s != b_s)).to(tl.int32), axis=1))
        b_key = encode_keys(b_s, o_n, m_t[:, None] & m_n[None, :])
        # Keys are distinct, so a key enters a row's top k_sub iff it beats the row's k_sub-th best.
        b_beats = tl.max(tl.max((b_key > b_kth[:, None]).to(tl.int32), axis=1), axis=0)
        if b_beats > 0:
            b_top = _merge_tile(b_top, b_key, KS_PAD, LOG_KS_PAD, BLOCK_T, BLOCK_N, LOG_BLOCK_N)
            b_kth, _ = _kth(b_top, k_sub, KS_PAD)

    # NaN scores were ranked as +inf and decode as +inf: their candidates rank first and make the
    # row's weights NaN, as the reference's NaN does. A row with a NaN stores its +inf entries as
    # NaN (its NaN ranks first in the reference too), so the second stage tells NaN from +inf.
    _, b_score, b_sub = decode_keys(b_top)
    b_score = tl.where((b_has_nan > 0)[:, None] & (b_score == float("inf")), float("nan"), b_score)
    o_c = tl.arange(0, KS_PAD)
    o_tc = (o_row[:, None] * 2 + i_half) * k_sub + o_c[None, :]
    m_tc = m_t[:, None] & (o_c < k_sub)[None, :]
    tl.store(sub_scores + o_tc, b_score, mask=m_tc)
    tl.store(sub_ids + o_tc, b_sub.to(tl.int32), mask=m_tc)


@triton.jit
def product_key_fwd_topk_kernel(
    sub_scores,  # [B * H * T, 2, k_sub] fp32 from product_key_fwd_select_kernel
    sub_ids,  # [B * H * T, 2, k_sub] int32
    indices,  # [B, H, T, k] int64, written
    weights,  # [B, H, T, k] fp32, written
    lse,  # [B, H, T] fp32, written
    T,
    H,
    n_sub,
    k_sub,
    k,
    num_row_blocks,
    BLOCK_T: tl.constexpr,
    K_PAD: tl.constexpr,  # top-list width: next_pow2(k), >= 16
    LOG_K_PAD: tl.constexpr,
    BLOCK_J: tl.constexpr,  # candidate tile: one first-half entry x BLOCK_J second-half entries
    LOG_BLOCK_J: tl.constexpr,
):
    """Grid (num_row_blocks * B * H,): BLOCK_T query rows of one (batch, head)."""
    _, _, _, o_t, m_t, o_row = row_block_rows(num_row_blocks, H, T, BLOCK_T)

    # [BT] each row's two half lists (scores and ids at the same offsets).
    o_half1 = o_row * 2 * k_sub
    o_half2 = o_half1 + k_sub
    o_bj = tl.arange(0, BLOCK_J)

    b_top = tl.full([BLOCK_T, K_PAD], INT64_MIN, dtype=tl.int64)
    b_kth = tl.full([BLOCK_T], INT64_MIN, dtype=tl.int64)
    b_kth_score = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    b_has_nan = tl.zeros([BLOCK_T], dtype=tl.int32)
    for i in range(0, k_sub):
        # [BT]: the i-th best first-half entry of each row.
        b_s1 = tl.load(sub_scores + o_half1 + i, mask=m_t, other=0.)
        b_id1 = tl.load(sub_ids + o_half1 + i, mask=m_t, other=0).to(tl.int64)
        for j_start in range(0, k_sub, BLOCK_J):
            # Every candidate of the tile scores at most s1[i] + s2[j_start] (the lists are sorted
            # descending and float addition is monotone); strictly below the row's k-th best it
            # cannot enter, not even through a slot tie, so the tile is skipped when that holds
            # for every row of the block.
            b_bound = b_s1 + tl.load(sub_scores + o_half2 + j_start, mask=m_t, other=0.)
            b_open = m_t & ~(b_bound < b_kth_score)
            if tl.max(b_open.to(tl.int32), axis=0) > 0:
                o_j = j_start + o_bj
                m_tj = m_t[:, None] & (o_j < k_sub)[None, :]
                # [BT, BJ]
                b_s2 = tl.load(sub_scores + o_half2[:, None] + o_j[None, :], mask=m_tj, other=0.)
                b_id2 = tl.load(sub_ids + o_half2[:, None] + o_j[None, :], mask=m_tj, other=0).to(tl.int64)
                b_s = b_s1[:, None] + b_s2
                b_has_nan = tl.maximum(b_has_nan, tl.max((m_tj & (b_s != b_s)).to(tl.int32), axis=1))
                b_slot = b_id1[:, None] * n_sub + b_id2
                b_key = tl.where(m_tj, encode_key(b_s, b_slot), INT64_MIN)
                b_beats = tl.max(tl.max((b_key > b_kth[:, None]).to(tl.int32), axis=1), axis=0)
                if b_beats > 0:
                    b_top = _merge_tile(b_top, b_key, K_PAD, LOG_K_PAD, BLOCK_T, BLOCK_J, LOG_BLOCK_J)
                    b_kth, b_kth_score = _kth(b_top, k, K_PAD)

    # k <= k_sub ** 2: every one of the first k entries exists.
    _, b_score, b_slot = decode_keys(b_top)
    o_c = tl.arange(0, K_PAD)
    b_live = (o_c < k)[None, :]
    # A NaN candidate decodes as +inf: exp(inf - inf) = NaN makes the row NaN, as in the reference.
    b_max = tl.max(tl.where(b_live, b_score, float("-inf")), axis=1)
    b_empty = b_max == float("-inf")
    b_shift = tl.where(b_empty, 0., b_max)
    b_exp = tl.where(b_live, tl.exp(b_score - b_shift[:, None]), 0.)
    b_total = tl.sum(b_exp, axis=1)
    # All k scores -inf: the reference's softmax gives NaN and its logsumexp -inf.
    b_w = tl.where(b_live, b_exp / b_total[:, None], 0.)
    b_lse = tl.where(b_empty, float("-inf"), b_shift + tl.log(b_total))
    # logsumexp is +inf with a +inf score (exp(inf - inf) made it NaN), NaN with a NaN candidate
    # (one reaches the top k: NaN sorts first in the reference).
    b_lse = tl.where(b_max == float("inf"), float("inf"), b_lse)
    b_lse = tl.where(b_has_nan > 0, float("nan"), b_lse)

    m_tc = m_t[:, None] & b_live
    o_tc = o_row[:, None] * k + o_c[None, :]
    tl.store(indices + o_tc, b_slot, mask=m_tc)
    tl.store(weights + o_tc, b_w, mask=m_tc)
    tl.store(lse + o_row, b_lse, mask=m_t)


@triton.jit
def product_key_fwd_out_kernel(
    values,  # [N, Dv] x
    indices,  # [B, H, T, k] int64
    weights,  # [B, H, T, k] fp32
    out,  # [B, H, T, Dv] or [B, T, Dv] (SUM_HEADS) x, written
    T,
    H,
    N,
    Dv,
    k,
    num_row_blocks,
    SUM_HEADS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_row_blocks * B * (1 if SUM_HEADS else H), cdiv(Dv, BLOCK_DV))."""
    if SUM_HEADS:
        i_b, i_tb, _, _ = row_block(num_row_blocks, 1)
        h_start = 0
        h_end = H
        o_out_row = i_b * T + i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    else:
        i_bh, i_tb, i_b, i_h = row_block(num_row_blocks, H)
        h_start = i_h
        h_end = i_h + 1
        o_out_row = i_bh * T + i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    i_dv = tl.program_id(1).to(tl.int64)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_d = i_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_d = o_d < Dv

    # [BT, BDV]: the heads' reads summed in head order (the reference's out.sum(dim=1)).
    b_out = tl.zeros([BLOCK_T, BLOCK_DV], dtype=tl.float32)
    for i_head in range(h_start, h_end):
        o_row = (i_b * H + i_head) * T + o_t
        b_head = tl.zeros([BLOCK_T, BLOCK_DV], dtype=tl.float32)
        for j in range(0, k):
            # [BT]
            b_idx = tl.load(indices + o_row * k + j, mask=m_t, other=-1)
            b_w = tl.load(weights + o_row * k + j, mask=m_t, other=0.)
            m_live = (b_idx >= 0) & (b_idx < N)
            b_v = tl.load(values + b_idx[:, None] * Dv + o_d[None, :], mask=m_live[:, None] & m_d[None, :],
                          other=0.)
            b_head += b_w[:, None] * b_v.to(tl.float32)
        b_out += b_head
    tl.store(out + o_out_row[:, None] * Dv + o_d[None, :], b_out.to(out.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def product_key_bwd_dweights_kernel(
    dout,  # [B, H, T, Dv] or [B, T, Dv] (SUM_HEADS) x
    values,  # [N, Dv] x
    indices,  # [B, H, T, k] int64
    weights,  # [B, H, T, k] fp32
    dweights,  # [B, H, T, k] fp32
    dw,  # [B, H, T, k] fp32 scratch, written: dweights + <dout, v>
    dvalues_acc,  # [N, Dv] fp32, accumulated into (VALUES_GRAD == 1)
    dvalue_rows,  # [B * H * T * k, Dv] x, written (VALUES_GRAD == 2)
    T,
    H,
    N,
    Dv,
    k,
    num_row_blocks,
    SUM_HEADS: tl.constexpr,
    VALUES_GRAD: tl.constexpr,  # 0: none here (deterministic dense), 1: atomics, 2: per-entry rows
    BLOCK_T: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_row_blocks * B * H,): BLOCK_T query rows of one (batch, head)."""
    _, i_b, _, o_t, m_t, o_row = row_block_rows(num_row_blocks, H, T, BLOCK_T)
    # Every head's read went into the same output row when summed.
    o_dout_row = i_b * T + o_t if SUM_HEADS else o_row
    o_d0 = tl.arange(0, BLOCK_DV)
    m_d0 = o_d0 < Dv
    # [BT, BDV]: first feature chunk of dout, kept for every entry.
    b_do0 = tl.load(dout + o_dout_row[:, None] * Dv + o_d0[None, :], mask=m_t[:, None] & m_d0[None, :],
                    other=0.).to(tl.float32)

    for j in range(0, k):
        # [BT]
        o_entry = o_row * k + j
        b_idx = tl.load(indices + o_entry, mask=m_t, other=-1)
        m_live = m_t & (b_idx >= 0) & (b_idx < N)
        b_w = tl.load(weights + o_entry, mask=m_live, other=0.)
        # [BT, BDV]
        m_vd = m_live[:, None] & m_d0[None, :]
        o_vd = b_idx[:, None] * Dv + o_d0[None, :]
        b_v = tl.load(values + o_vd, mask=m_vd, other=0.).to(tl.float32)
        b_dot = tl.sum(b_do0 * b_v, axis=1)
        if VALUES_GRAD == 1:
            tl.atomic_add(dvalues_acc + o_vd, b_w[:, None] * b_do0, mask=m_vd, sem="relaxed")
        elif VALUES_GRAD == 2:
            tl.store(dvalue_rows + o_entry[:, None] * Dv + o_d0[None, :],
                     (b_w[:, None] * b_do0).to(dvalue_rows.dtype.element_ty), mask=m_t[:, None] & m_d0[None, :])
        for i_d in range(1, tl.cdiv(Dv, BLOCK_DV)):
            o_d = i_d * BLOCK_DV + o_d0
            m_d = o_d < Dv
            m_vd = m_live[:, None] & m_d[None, :]
            o_vd = b_idx[:, None] * Dv + o_d[None, :]
            b_do = tl.load(dout + o_dout_row[:, None] * Dv + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                           other=0.).to(tl.float32)
            b_v = tl.load(values + o_vd, mask=m_vd, other=0.).to(tl.float32)
            b_dot += tl.sum(b_do * b_v, axis=1)
            if VALUES_GRAD == 1:
                tl.atomic_add(dvalues_acc + o_vd, b_w[:, None] * b_do, mask=m_vd, sem="relaxed")
            elif VALUES_GRAD == 2:
                tl.store(dvalue_rows + o_entry[:, None] * Dv + o_d[None, :],
                         (b_w[:, None] * b_do).to(dvalue_rows.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
        b_dwt = tl.load(dweights + o_entry, mask=m_live, other=0.)
        tl.store(dw + o_entry, tl.where(m_live, b_dwt + b_dot, 0.), mask=m_t)


@triton.jit
def product_key_bwd_dq_kernel(
    q,  # [B, H, T, Dk] x, Dk = 2 * Dh
    subkeys,  # [H, 2, n_sub, Dh] x
    indices,  # [B, H, T, k] int64
    weights,  # [B, H, T, k] fp32
    dw,  # [B, H, T, k] fp32 from product_key_bwd_dweights_kernel
    dlse,  # [B, H, T] fp32
    dq,  # [B, H, T, Dk] x, written
    dsubkeys_acc,  # [H, 2, n_sub, Dh] fp32, accumulated into (ATOMIC)
    ds,  # [B, H, T, k] fp32, written (not ATOMIC)
    T,
    H,
    n_sub,
    Dh,
    k,
    scale,
    num_row_blocks,
    ATOMIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_KC: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    """Grid (num_row_blocks * B * H,): BLOCK_T query rows of one (batch, head)."""
    i_bh, i_tb, _, i_h = row_block(num_row_blocks, H)
    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_row = i_bh * T + o_t
    N = n_sub * n_sub

    # [BT] sum_i w_i dw_i, in column chunks of BLOCK_KC: _triton_lib.weighted_dw_sum's loop, kept inline
    # because the call compiles to other SASS in this kernel.
    b_wdw = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c_start in range(0, k, BLOCK_KC):
        o_c = c_start + tl.arange(0, BLOCK_KC)
        m_tc = m_t[:, None] & (o_c < k)[None, :]
        o_tc = o_row[:, None] * k + o_c[None, :]
        # [BT, BKC]
        b_idx = tl.load(indices + o_tc, mask=m_tc, other=-1)
        m_live = m_tc & (b_idx >= 0) & (b_idx < N)
        b_w = tl.load(weights + o_tc, mask=m_live, other=0.)
        b_dw = tl.load(dw + o_tc, mask=m_live, other=0.)
        b_wdw += tl.sum(tl.where(m_live, b_w * b_dw, 0.), axis=1)
    b_dlse = tl.load(dlse + o_row, mask=m_t, other=0.)

    for i_half in tl.static_range(2):
        p_sk = subkeys + (i_h * 2 + i_half) * n_sub * Dh
        p_dsk = dsubkeys_acc + (i_h * 2 + i_half) * n_sub * Dh
        for i_d in range(0, tl.cdiv(Dh, BLOCK_DK)):
            o_d = i_d * BLOCK_DK + tl.arange(0, BLOCK_DK)
            m_d = o_d < Dh
            o_qd = o_row[:, None] * (2 * Dh) + i_half * Dh + o_d[None, :]
            # [BT, BDK]
            b_q = tl.load(q + o_qd, mask=m_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
            b_dq = tl.zeros([BLOCK_T, BLOCK_DK], dtype=tl.float32)
            for j in range(0, k):
                # [BT]
                o_entry = o_row * k + j
                b_idx = tl.load(indices + o_entry, mask=m_t, other=-1)
                m_live = m_t & (b_idx >= 0) & (b_idx < N)
                # Slots are < 2**31: divide in int32 (a 64-bit division is a subroutine call).
                b_slot = tl.where(m_live, b_idx, 0).to(tl.int32)
                if i_half == 0:
                    b_sub = b_slot // n_sub
                else:
                    b_sub = b_slot % n_sub
                b_w = tl.load(weights + o_entry, mask=m_live, other=0.)
                b_dwj = tl.load(dw + o_entry, mask=m_live, other=0.)
                b_ds = tl.where(m_live, b_w * (b_dwj - b_wdw + b_dlse), 0.)
                m_kd = m_live[:, None] & m_d[None, :]
                o_kd = b_sub.to(tl.int64)[:, None] * Dh + o_d[None, :]
                # [BT, BDK]
                b_sk = tl.load(p_sk + o_kd, mask=m_kd, other=0.).to(tl.float32)
                b_dq += b_ds[:, None] * b_sk
                if ATOMIC:
                    tl.atomic_add(p_dsk + o_kd, (scale * b_ds)[:, None] * b_q, mask=m_kd, sem="relaxed")
                else:
                    if i_half == 0:
                        tl.store(ds + o_entry, b_ds, mask=m_t & (i_d == 0))
            tl.store(dq + o_qd, (scale * b_dq).to(dq.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def product_key_bwd_segment_kernel(
    src,  # x: q (sub-key gradients) or dout (value gradients)
    coef,  # [E] fp32: ds or weights
    entry_coef,  # [S_E] int64: coef index of each grouped entry
    entry_src,  # [S_E] int64: element offset of each grouped entry's source row in src
    run_starts,  # [S + 1] int64: entries run_starts[s] .. run_starts[s + 1] belong to row s
    dst,  # [S, D] x, written
    D,
    scale,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (S,): ``dst[s] = scale * sum_e coef[entry_coef[e]] * src[entry_src[e] : + D]`` over row
    ``s``'s entries, in their order, chunk by chunk with a fixed reduction tree (deterministic)."""
    i_slot = tl.program_id(0).to(tl.int64)
    e_start = tl.load(run_starts + i_slot)
    e_end = tl.load(run_starts + i_slot + 1)
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for e_chunk in range(e_start, e_end, BLOCK_E):
            o_e = e_chunk + tl.arange(0, BLOCK_E)
            m_e = o_e < e_end
            # [BE]
            b_coef = tl.load(coef + tl.load(entry_coef + o_e, mask=m_e, other=0), mask=m_e, other=0.)
            b_src_row = tl.load(entry_src + o_e, mask=m_e, other=0)
            # [BE, BD]
            b_src = tl.load(src + b_src_row[:, None] + o_d[None, :], mask=m_e[:, None] & m_d[None, :],
                            other=0.).to(tl.float32)
            b_acc += tl.sum(b_coef[:, None] * b_src, axis=0)
        tl.store(dst + i_slot * D + o_d, (scale * b_acc).to(dst.dtype.element_ty), mask=m_d)


# ---------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and COMPILE_CONFIGS, so the two cannot drift)
# ---------------------------------------------------------------------------------------------

# Candidate tiles of product_key_fwd_topk_kernel by K_PAD: (BLOCK_J, num_warps). Its list is
# [BLOCK_T, K_PAD] int64 and a merge sorts a [BLOCK_T, BLOCK_J] tile, as in the top-k select.
# Chosen by compiling every K_PAD for sm_80/sm_90 (Triton 3.9): no spills (several neighbours,
# e.g. K_PAD 32 with 16-wide tiles or K_PAD 256 with 16-wide tiles on 8 warps, spill on sm_80).
_TOPK_TILES = {16: (16, 4), 32: (32, 4), 64: (32, 8), 128: (32, 4), 256: (32, 8)}
TOPK_BLOCK_T = 16
OUT_BLOCK_T = 32
SEGMENT_BLOCK_E = 32
BWD_BLOCK_T = 16
BWD_BLOCK_KC = 32
# The float32 atomics take a 64-bit address per element (see the top-k read).
BWD_ATOMIC_MAX_BLOCK_D = 64
NUM_WARPS = 4


def _block_d(D: int) -> int:
    return block_d(D, MAX_BLOCK_D)


def _select_constexprs(k_sub: int, Dh: int, dtype: torch.dtype):
    # The half selection is the top-k select over n_sub keys of width Dh: same tiles.
    config = select_config(k_sub, max(Dh, 1), dtype)
    block_n = config.block_n
    if dtype != torch.float32 and config.k_pad == 64:
        # Post-scaled scores keep the raw 16-bit operands live a little longer than the top-k
        # select: at 64-wide tiles the sm_90 build spilled 8 bytes.
        block_n = 32
    return {"F32_DOT": f32_dot(dtype), "BLOCK_T": config.block_t, "KS_PAD": config.k_pad,
            "LOG_KS_PAD": config.k_pad.bit_length() - 1, "BLOCK_N": block_n,
            "LOG_BLOCK_N": block_n.bit_length() - 1, "BLOCK_DK": config.block_dk,
            "DK_CHUNKS": config.dk_chunks}, config.num_warps


def _topk_constexprs(k: int):
    k_pad = pow2_at_least(k, MIN_K_PAD)
    # One tile width per K_PAD whatever k_sub (lanes past k_sub are masked): every width/K_PAD
    # pair the launcher can pick is one the compile check covers.
    block_j, num_warps = _TOPK_TILES[k_pad]
    return {"BLOCK_T": TOPK_BLOCK_T, "K_PAD": k_pad, "LOG_K_PAD": k_pad.bit_length() - 1,
            "BLOCK_J": block_j, "LOG_BLOCK_J": block_j.bit_length() - 1}, num_warps


def _out_constexprs(Dv: int, sum_heads: bool):
    return {"SUM_HEADS": sum_heads, "BLOCK_T": OUT_BLOCK_T, "BLOCK_DV": _block_d(Dv)}, NUM_WARPS


def _bwd_block_d(D: int, scatter: bool) -> int:
    return min(_block_d(D), BWD_ATOMIC_MAX_BLOCK_D) if scatter else _block_d(D)


def _dweights_constexprs(Dv: int, sum_heads: bool, values_grad: int):
    return {"SUM_HEADS": sum_heads, "VALUES_GRAD": values_grad, "BLOCK_T": BWD_BLOCK_T,
            "BLOCK_DV": _bwd_block_d(Dv, values_grad != 0)}, NUM_WARPS


def _dq_constexprs(Dh: int, atomic: bool):
    return {"ATOMIC": atomic, "BLOCK_T": BWD_BLOCK_T, "BLOCK_KC": BWD_BLOCK_KC,
            "BLOCK_DK": _bwd_block_d(Dh, atomic)}, NUM_WARPS


def _segment_constexprs(D: int):
    return {"BLOCK_E": SEGMENT_BLOCK_E, "BLOCK_D": _block_d(D)}, NUM_WARPS


def _check_args(q: torch.Tensor, subkeys: torch.Tensor, k: int, k_sub):
    """dtype and size limits of this backend (k_sub None: the backward, which only needs k)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: the triton product_key_read supports float32/float16/bfloat16, got {q.dtype}")
    n_sub = subkeys.shape[-2]
    if n_sub * n_sub > MAX_SLOTS:
        raise ValueError(f"subkeys: the triton product_key_read needs n_sub ** 2 < 2**31 slots, got "
                         f"n_sub = {n_sub}")
    if k_sub is None:
        if not 1 <= k <= MAX_K:
            raise ValueError(f"indices: the triton product_key_read needs 1 <= k <= {MAX_K}, got k = {k}")
        return
    if not 1 <= k_sub <= min(n_sub, MAX_K_SUB):
        raise ValueError(f"k_sub: the triton product_key_read needs 1 <= k_sub <= min(n_sub, {MAX_K_SUB}) = "
                         f"{min(n_sub, MAX_K_SUB)}, got {k_sub}")
    if not 1 <= k <= min(k_sub * k_sub, MAX_K):
        raise ValueError(f"k: the triton product_key_read needs 1 <= k <= min(k_sub ** 2, {MAX_K}) = "
                         f"{min(k_sub * k_sub, MAX_K)}, got {k}")


# ---------------------------------------------------------------------------------------------
# Launchers (the low-level product_key_read interface)
# ---------------------------------------------------------------------------------------------

def product_key_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, out, indices, weights, lse) -> None:
    """Product-key memory read into preallocated outputs.

    Args:
        q:         (B, H, T, Dk) x, contiguous, Dk even; x in {float32, float16, bfloat16}.
        subkeys:   (H, 2, n_sub, Dk // 2) x, contiguous.
        values:    (n_sub ** 2, Dv) x, contiguous.
        k, k_sub:  1 <= k <= min(k_sub ** 2, 256), 1 <= k_sub <= min(n_sub, 256).
        scale:     python float.   sum_heads: bool.
        out:       (B, H, T, Dv), or (B, T, Dv) with sum_heads, x, written.
        indices:   (B, H, T, k) int64, written.   weights: (B, H, T, k) float32, written.
        lse:       (B, H, T) float32, written.

    Equivalent PyTorch:
        out, indices, weights, lse = product_key_read_ref(q, subkeys, values, k, k_sub, scale, sum_heads)
    """
    _check_args(q, subkeys, k, k_sub)
    B, H, T, Dk = q.shape
    n_sub, Dh = subkeys.shape[-2], subkeys.shape[-1]
    N, Dv = values.shape
    if B * H * T == 0:
        if out.numel():  # sum over no heads
            out.zero_()
        return
    sub_scores, sub_ids = half_scratch(q, k_sub)
    with device_guard(q):
        constexprs, num_warps = _select_constexprs(k_sub, Dh, q.dtype)
        num_row_blocks, programs = row_block_grid(T, constexprs["BLOCK_T"], B * H)
        product_key_fwd_select_kernel[(programs, 2)](
            q, subkeys, sub_scores, sub_ids, T, H, n_sub, Dh, k_sub, float(scale), num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
        constexprs, num_warps = _topk_constexprs(k)
        num_row_blocks, programs = row_block_grid(T, constexprs["BLOCK_T"], B * H)
        product_key_fwd_topk_kernel[(programs,)](
            sub_scores, sub_ids, indices, weights, lse, T, H, n_sub, k_sub, k, num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
        if Dv == 0:
            return
        constexprs, num_warps = _out_constexprs(Dv, bool(sum_heads))
        num_row_blocks, programs = row_block_grid(T, constexprs["BLOCK_T"], B * (1 if sum_heads else H))
        product_key_fwd_out_kernel[(programs, triton.cdiv(Dv, constexprs["BLOCK_DV"]))](
            values, indices, weights, out, T, H, N, Dv, k, num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )


def _segment_reduce(src, coef, segments, dst, scale):
    """``product_key_bwd_segment_kernel`` over the rows of ``dst (S, D)`` grouped by ``segments``
    (plan.py), whose source rows are rows of ``src`` of width D (the kernel takes their element
    offsets)."""
    num_rows, D = dst.shape
    if num_rows == 0:
        return
    constexprs, num_warps = _segment_constexprs(D)
    product_key_bwd_segment_kernel[(num_rows,)](
        src, coef, segments.entry_coef, segments.entry_src * D, segments.run_starts, dst, D, float(scale),
        **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
    )


def product_key_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                    sparse_grad, deterministic, dq, dsubkeys, dvalues) -> None:
    """Gradients of :func:`product_key_fwd` in q, subkeys and values (only selected rows touched).

    Args:
        dout:      (B, H, T, Dv), or (B, T, Dv) with sum_heads, x.
        dweights:  (B, H, T, k) float32.   dlse: (B, H, T) float32.
        q, subkeys, values: as in the forward.   indices, weights: the forward's outputs.
        scale:     python float.   sum_heads: bool, as in the forward.
        sparse_grad: dvalues holds one row per entry, ``(B*H*T*k, Dv)``, ``w * dout`` (no reduction).
        deterministic: True -> bitwise reproducible (fixed-order reductions, no float atomics);
                   False -> float32 atomics into dsubkeys and the dense dvalues.
        dq:        like q, written.   dsubkeys: like subkeys, written (zeros where unselected).
        dvalues:   like values (dense) or (B*H*T*k, Dv) (sparse_grad), values' dtype, written.

    Equivalent PyTorch:
        dq, dsubkeys, dvalues = autograd of product_key_gather(q, subkeys, values, indices, scale,
                                                               sum_heads) at (dout, dweights, dlse)
        (sparse_grad: dvalues = (weights[..., None] * dout_per_head[..., None, :]).reshape(-1, Dv))
    """
    _check_args(q, subkeys, indices.shape[-1], None)
    B, H, T, Dk = q.shape
    n_sub, Dh = subkeys.shape[-2], subkeys.shape[-1]
    N, Dv = values.shape
    k = indices.shape[-1]
    if B * H * T == 0:
        dsubkeys.zero_()
        if not sparse_grad:
            dvalues.zero_()
        return
    device = q.device
    E = B * H * T * k
    dw = torch.empty(E, dtype=torch.float32, device=device)
    atomic = not deterministic

    dsubkeys_acc = f32_accumulator(dsubkeys) if atomic else dw  # dw: a never-touched stand-in
    if sparse_grad:
        values_grad, dvalues_acc, dvalue_rows = 2, dw, dvalues
    elif atomic:
        values_grad, dvalues_acc, dvalue_rows = 1, f32_accumulator(dvalues), dvalues
    else:
        values_grad, dvalues_acc, dvalue_rows = 0, dw, dvalues
    ds = dw if atomic else torch.empty(E, dtype=torch.float32, device=device)

    with device_guard(q):
        constexprs, num_warps = _dweights_constexprs(Dv, bool(sum_heads), values_grad)
        num_row_blocks, programs = row_block_grid(T, constexprs["BLOCK_T"], B * H)
        product_key_bwd_dweights_kernel[(programs,)](
            dout, values, indices, weights, dweights, dw, dvalues_acc, dvalue_rows,
            T, H, N, Dv, k, num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
        constexprs, num_warps = _dq_constexprs(Dh, atomic)
        num_row_blocks, programs = row_block_grid(T, constexprs["BLOCK_T"], B * H)
        product_key_bwd_dq_kernel[(programs,)](
            q, subkeys, indices, weights, dw, dlse, dq, dsubkeys_acc, ds,
            T, H, n_sub, Dh, k, float(scale), num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
        if not atomic:
            if Dh:  # Dk = 0: dsubkeys has no element to reduce into (and no (-1, 0) view)
                _segment_reduce(q, ds, subkey_segments(indices, n_sub), dsubkeys.view(-1, Dh), scale)
            if not sparse_grad:
                _segment_reduce(dout, weights, value_segments(indices, N, bool(sum_heads)), dvalues, 1.0)
    if atomic:
        store_accumulated(dsubkeys, dsubkeys_acc)
        if not sparse_grad:
            store_accumulated(dvalues, dvalues_acc)


# ---------------------------------------------------------------------------------------------
# Production configurations, for the compile check (tools/triton_check.py)
# ---------------------------------------------------------------------------------------------

COMPILE_DTYPES = (torch.float32, torch.bfloat16)
# (Dk, Dv, k, k_sub): the pkm benchmark shape and a smaller layer.
COMPILE_SHAPES = ((256, 256, 32, 32), (128, 128, 16, 16))

# Runtime arguments of each kernel, in order, by role (see _triton_lib.argument_types). The
# launchers pass exactly these positionally; _build_compile_configs checks the names against the
# kernels.
_KERNEL_ARGS = {
    product_key_fwd_select_kernel: (("q", "x"), ("subkeys", "x"), ("sub_scores", "f32"), ("sub_ids", "i32"),
                                    ("T", "int"), ("H", "int"), ("n_sub", "int"), ("Dh", "int"),
                                    ("k_sub", "int"), ("scale", "float"), ("num_row_blocks", "int")),
    product_key_fwd_topk_kernel: (("sub_scores", "f32"), ("sub_ids", "i32"), ("indices", "i64"),
                                  ("weights", "f32"), ("lse", "f32"), ("T", "int"), ("H", "int"),
                                  ("n_sub", "int"), ("k_sub", "int"), ("k", "int"), ("num_row_blocks", "int")),
    product_key_fwd_out_kernel: (("values", "x"), ("indices", "i64"), ("weights", "f32"), ("out", "x"),
                                 ("T", "int"), ("H", "int"), ("N", "int"), ("Dv", "int"), ("k", "int"),
                                 ("num_row_blocks", "int")),
    product_key_bwd_dweights_kernel: (("dout", "x"), ("values", "x"), ("indices", "i64"), ("weights", "f32"),
                                      ("dweights", "f32"), ("dw", "f32"), ("dvalues_acc", "f32"),
                                      ("dvalue_rows", "x"), ("T", "int"), ("H", "int"), ("N", "int"),
                                      ("Dv", "int"), ("k", "int"), ("num_row_blocks", "int")),
    product_key_bwd_dq_kernel: (("q", "x"), ("subkeys", "x"), ("indices", "i64"), ("weights", "f32"),
                                ("dw", "f32"), ("dlse", "f32"), ("dq", "x"), ("dsubkeys_acc", "f32"),
                                ("ds", "f32"), ("T", "int"), ("H", "int"), ("n_sub", "int"), ("Dh", "int"),
                                ("k", "int"), ("scale", "float"), ("num_row_blocks", "int")),
    product_key_bwd_segment_kernel: (("src", "x"), ("coef", "f32"), ("entry_coef", "i64"), ("entry_src", "i64"),
                                     ("run_starts", "i64"), ("dst", "x"), ("D", "int"), ("scale", "float")),
}
# Sizes the JIT would not see as multiples of 16 in production (counts that may be small or odd).
_NOT_DIVISIBLE = {"H", "k", "k_sub", "num_row_blocks"}


def _production_picks(kernel, dtype, shape):
    """[(constexprs, num_warps)] the launchers pick for ``shape`` = (Dk, Dv, k, k_sub)."""
    Dk, Dv, k, k_sub = shape
    if kernel is product_key_fwd_select_kernel:
        return [_select_constexprs(k_sub, Dk // 2, dtype)]
    if kernel is product_key_fwd_topk_kernel:
        return [_topk_constexprs(k)]
    if kernel is product_key_fwd_out_kernel:
        return [_out_constexprs(Dv, sum_heads) for sum_heads in (False, True)]
    if kernel is product_key_bwd_dweights_kernel:
        return [_dweights_constexprs(Dv, sum_heads, values_grad)
                for sum_heads in (False, True) for values_grad in (0, 1, 2)]
    if kernel is product_key_bwd_dq_kernel:
        return [_dq_constexprs(Dk // 2, atomic) for atomic in (True, False)]
    return [_segment_constexprs(D) for D in (Dk // 2, Dv)]


_LABELS = {"SUM_HEADS": "SH", "VALUES_GRAD": "VG", "ATOMIC": "ATOMIC", "KS_PAD": "KSP", "K_PAD": "KP",
           "BLOCK_N": "BN", "BLOCK_J": "BJ", "BLOCK_D": "BD", "BLOCK_DV": "BDV", "BLOCK_DK": "BDK"}


def _build_compile_configs() -> list[dict]:
    """One entry per distinct (kernel, dtype, constexprs) the launchers pick for COMPILE_SHAPES.

    Entry keys as read by tools.triton_check. F32_DOT is set as on a GPU (float32 only).
    """
    configs = []
    for kernel, args in _KERNEL_ARGS.items():
        names = constexpr_names(kernel, args)
        divisible_ints = [name for name, role in args if role == "int" and name not in _NOT_DIVISIBLE]
        for dtype in COMPILE_DTYPES:
            types = argument_types(dtype)
            seen = set()
            for shape in COMPILE_SHAPES:
                for constexprs, num_warps in _production_picks(kernel, dtype, shape):
                    if "F32_DOT" in constexprs:
                        constexprs = dict(constexprs, F32_DOT=dtype == torch.float32)
                    if sorted(constexprs) != sorted(names):
                        raise AssertionError(f"constexprs {sorted(constexprs)} do not match {kernel.__name__}")
                    key = (tuple(constexprs.items()), num_warps)
                    if key in seen:
                        continue
                    seen.add(key)
                    sizes = "Dk={} Dv={} k={} ks={}".format(*shape)
                    configs.append(compile_entry(kernel, args, types, constexprs, num_warps,
                                                 divisible_ints=divisible_ints,
                                                 label=config_label(dtype, sizes, constexprs, _LABELS)))
    return configs


COMPILE_CONFIGS = _build_compile_configs()
