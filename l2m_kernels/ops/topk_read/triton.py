"""Triton kernels and launchers for the sparse top-k memory read (SPEC section 1, issue 3).

The two launchers implement the low-level ``topk_memory_read`` interface shared with the cpu and
cuda backends (outputs preallocated and passed last, every element written, ``None`` returned):

    topk_read_fwd(q, keys, values, valid_len, k, scale, out, indices, weights, lse)
    topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic,
                  dq, dkeys, dvalues)

Semantics are exactly :func:`l2m_kernels.ops.topk_read.reference.topk_memory_read_ref`: per query
the ``k`` best existing slots by descending score ``(scale * q) . key`` (float32, no TF32), ties
broken by the smaller slot; NaN ranks like +inf; an existing slot scoring -inf keeps its index
with weight 0; missing entries are index -1, weight 0; with no existing slot ``out = 0`` and
``lse = -inf``.

Layout: the ``H // Hm`` query heads that share a memory head are contiguous in ``q``
``(B, H, T, D)``, so each (batch, memory head) owns ``R = (H // Hm) * T`` contiguous query rows
and one program reads every key tile once for all of them. Shared (3-D) memories use a batch
stride of 0.

Forward (no ``T x N`` buffer). Three selection paths write ``indices``, ``weights`` and ``lse``;
``topk_read_fwd_out_kernel`` then forms ``out`` from them. The environment variable
``L2M_TOPK_TRITON_PATH`` picks the path: ``threshold`` (the default), ``threshold-strided``
(opt-in) or ``stream``. The default is the design :mod:`l2m_kernels._gpu_status` marks as such,
one that has run on a GPU: ``threshold``, the design the last GPU run tested and timed;
``threshold-strided`` replaces it only once a GPU run has passed the tests with it and timed it
(``python -m tools.gpu_probe topk-tiles`` times both). The module attribute ``last_forward_path``
records the path taken (its name; ``<path>->stream`` when a threshold path could not start; on CPU
tensors only, where reading the counts back is free, ``<path>+stream`` when some rows overflowed),
for tests.

Both threshold paths are exact and merge nothing in their scoring loops. A threshold ``tau`` per
row bounds its top k from below; a second scoring pass (same tiles, warps and helper as the first,
so the scores are bit-identical) collects each row's existing slots scoring ``>= tau``, as keys,
into ``cand (B*H*T, cap)`` (``cap = CAP_FACTOR * K_PAD``) with their ``count``; then

- ``topk_read_fwd_finish_kernel`` bitonic-sorts each row's candidates (padded with INT64_MIN),
  keeps the first k and writes them exactly as the select kernel's epilogue;
- rows whose ``count`` passed ``cap`` (many exactly tied scores, a NaN query row, fewer than k
  chunks holding existing slots) are left to the streaming select kernel, launched with
  ``ONLY_OVERFLOW``: its blocks without such a row return at once, so no device-to-host sync is
  needed and the fallback costs only the overflowing rows' blocks.

``threshold`` path (the default). Its kernels, and the select, finish, output and backward
kernels, with every function they call, launch configuration and compile-check configuration, have
the source they had in the GPU run that measured them (commit 44f93db), so they compile to the same
code. Keys as below (distinct per row; larger = better). With chunks of ``C = BLOCK_N`` contiguous
slots (one scan tile):

1. ``topk_read_fwd_chunkmax_kernel``: each row's largest key of every chunk into
   ``chunk_max (B*H*T, cdiv(N, C))`` int64.
2. Host: ``tau = torch.topk(chunk_max, k).values[:, k - 1]``. Exactly ``k`` chunks have a maximum
   ``>= tau``, so the row's top k are all ``>= tau`` and at most ``k * C`` keys are (for random
   scores about ``k + k * k * C / N``).
3. ``topk_read_fwd_collect_kernel``: compacts each row's existing keys ``>= tau`` in slot order
   into ``cand`` by a cumulative sum over each tile, and counts them all.

When ``N <= cap`` every existing slot is a candidate (``tau = INT64_MIN``): pass 1 and the fallback
are skipped. When ``N > cap`` and there are fewer than ``k`` chunks, the streaming path runs
(decided on the host, no launch). ``valid_len`` rows with fewer than ``k`` existing chunks get
``tau = INT64_MIN`` (every existing slot a candidate; those rows overflow into the fallback when
``valid_len > cap``). Keys written in sequence, whose neighbouring slots score alike, put a row's
best slots in few chunks: tau drops and the rows overflow (``threshold-strided`` keeps them near
k). Extra memory: ``B*H*T * (cdiv(N, C) + cap + 1) * 8`` bytes (``T * N / C``, not ``T * N``);
bfloat16 B=8 T=4096 N=65536 k=32 (C = 64, cap = 128): 32768 * 1153 * 8 = 302 MB; float32 uses C = 32.

``threshold-strided`` path (opt-in; not yet run on a GPU). A chunk is one column of a group of
``G`` consecutive scan tiles: ``G`` slots, ``BLOCK_N`` apart (``chunk_groups``: ``G = BLOCK_N`` up
to ``N = MAX_CHUNKS * BLOCK_N``, then the fewest tiles that keep ``n_chunks = BLOCK_N * cdiv(N /
BLOCK_N, G) <= MAX_CHUNKS``). Strided, not contiguous, because neighbouring slots often score alike
(keys written in sequence): with contiguous chunks a row's best slots sit in few chunks, tau drops
and the candidates overflow (in a simulation with AR(1) keys, correlation 0.99 between neighbours,
contiguous 64-slot chunks gave ~500 candidates per row, every row over ``cap``; strided chunks ~33,
as for random keys):

1. ``topk_read_fwd_strided_chunkmax_kernel``: each row's largest float32 score of every chunk into
   ``chunk_max (B*H*T, n_chunks)``, an elementwise running maximum over the group's tiles (one
   instruction per score, no reduction), stored once per group.
2. ``topk_read_fwd_kth_kernel``: ``tau = torch.topk(chunk_max, k).values[:, k - 1]`` by a
   bitwise binary search over the row held in registers. At least ``k`` chunks have a maximum
   ``>= tau``, each attained by a slot, so the row's top k all score ``>= tau``; at most about
   ``k * G`` slots do (for random scores about ``k + k * k / n_chunks``).
3. ``topk_read_fwd_strided_collect_kernel``: appends each row's existing slots scoring ``>= tau``
   (NaN ranking as +inf). Per tile, rounds of reductions extract each row's best remaining key
   while it is ``>= tau`` (``_collect_tile``), in the layout the dot produced: no scan, no
   atomics, and only the [BT, COLLECT_BATCH] keys of each batch of rounds cross shared memory for
   their store, never the score tile (the cumulative-sum collect of ``threshold`` took most of its
   forward in a GPU profile: benchmarks/RESULTS.md). A row stops at ``cap + 1`` candidates.

When ``N <= cap`` (every slot would be a candidate) or there are fewer than ``k`` chunks, the
streaming path runs (decided on the host, no launch). ``valid_len`` rows with fewer than ``k``
existing chunks get ``tau = -inf`` (every existing slot a candidate; those rows overflow into
the fallback when they have more than ``cap``). Extra memory: ``B*H*T * (4 * n_chunks + 8 * cap
+ 8)`` bytes, at most ``B*H*T * (4 KB + 8 * cap + 8)`` whatever ``N``; bfloat16 B=8 T=4096
N=65536 k=32 (1024 chunks, cap = 128): 32768 * (4096 + 1032) = 168 MB, and the same for any
larger N.

Streaming path (the exact fallback), two kernels:

1. ``topk_read_fwd_select_kernel``: a program takes ``BLOCK_T`` query rows and streams key tiles
   of ``BLOCK_N`` slots, keeping a running top list of ``K_PAD`` entries per row (``K_PAD`` = next
   power of two of ``k``, at least 16 for ``tl.dot``; ``BLOCK_N <= K_PAD``). Each (query, slot)
   becomes one int64 sort key (``encode_keys`` of :mod:`l2m_kernels.ops._triton_lib`, which
   describes the format), so "larger key" is exactly "higher score, then smaller slot" (NaN
   ranked as +inf) and all keys of a row are distinct.
   Non-existent slots get ``INT64_MIN``. The list ``[BLOCK_T, K_PAD]`` stays sorted descending in
   registers; a key tile is merged only when one of its keys beats its row's current k-th best
   (otherwise the tile is skipped right after the scores). A merge sorts the tile ascending, pads
   it on the left with ``INT64_MIN`` to ``K_PAD`` (still ascending), takes the elementwise maximum
   with the descending list (which holds exactly the ``K_PAD`` largest keys of both, as a bitonic
   sequence) and bitonic-merges that descending (``log2 K_PAD`` layers, not a second full sort).
   The sorting network (``bitonic_sort``, ``bitonic_merge``) is the library's: ``tl.reshape``
   and a pairwise ``tl.sum``, the same code on Triton 3.3 .. 3.9 and under the interpreter (the
   library's docstring says why not ``tl.sort``).
   At the end the keys are decoded into slots and scores, and the softmax,
   log-sum-exp, indices and weights are written (``_store_top_list``, shared with the finish kernel).
2. ``topk_read_fwd_out_kernel``: ``out = sum_j weights_j * values[indices_j]`` from what the
   selection stored (a separate launch, so no cross-thread handoff inside one program is needed).

Backward, per query row (entries with index -1 contribute nothing):
    dw_j = dweights_j + <dout, v_j>;  ds_j = w_j * (dw_j - sum_i w_i dw_i + dlse)
    dq = scale * sum_j ds_j key_j;  dkeys[idx_j] += scale * ds_j * q;  dvalues[idx_j] += w_j * dout

1. ``topk_read_bwd_dweights_kernel`` (one program per ``BLOCK_T`` query rows, walking their
   ``k`` entries): ``dw`` into a float32 scratch buffer; non-deterministic mode also scatters
   ``w_j * dout`` into ``dvalues`` with float32 atomics.
2. ``topk_read_bwd_dq_kernel`` (same rows): ``sum_i w_i dw_i``, then ``ds`` and ``dq``;
   non-deterministic mode scatters ``scale * ds_j * q`` into ``dkeys`` with float32 atomics,
   deterministic mode stores ``ds`` instead. (Two launches rather than one: ``ds_j`` needs the
   whole row's ``dw`` first, and a second launch hands it over without an in-kernel barrier.)
3. Deterministic mode only, ``topk_read_bwd_slot_kernel``: the host groups the entries by slot
   (stable ``torch.sort`` of ``memory * N + slot``, run starts by ``torch.searchsorted``); one
   program owns one slot and sums its entries in that fixed order, writing every row of
   ``dkeys``/``dvalues`` (zeros for untouched slots). Bitwise identical run to run.

Atomic mode accumulates into float32 buffers (the outputs themselves for float32 inputs, zeroed
first) and casts once at the end.

Numerics: loads in the input dtype, computes in float32, stores in the output dtype. float32
scores use ``tl.dot(..., input_precision="ieee")`` (the keyword exists from Triton 3.0 to 3.9) on
``scale * q``, as the reference; float16/bfloat16 scores are ``scale * dot(q, key)`` with the
16-bit operands multiplied exactly and accumulated in float32. float64 is not supported here.

``COMPILE_CONFIGS`` lists the configurations the launchers pick for the production dtypes, head
sizes and ``k``; ``python -m tools.triton_check`` compiles them for sm_80/sm_90.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import _gpu_status
from .._common import f32_accumulator, store_accumulated
from .._triton_lib import (COMPILE_OPTIONS, INT32_MIN, INT64_MIN, MIN_K_PAD, argument_types,
                          bitonic_merge, bitonic_sort, block_d, compile_entry, config_label,
                          constexpr_names, decode_keys, device_guard, encode_key, encode_keys,
                          f32_dot, order_bits, pow2_at_least, row_block, row_block_grid,
                          row_block_rows, weighted_dw_sum)
from .plan import slot_runs, threshold_tau

__all__ = [
    "topk_read_fwd",
    "topk_read_select",
    "topk_read_bwd",
    "select_config",
    "slot_reduce_bwd",
    "COMPILE_CONFIGS",
]

MAX_K = 256
# Widest feature chunk a tile covers; larger D loops over chunks.
MAX_BLOCK_D = 128


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _score_tile(p_q, p_k, o_t, m_t, o_n, m_n, Dk, scale, b_q0,
                F32_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_DK: tl.constexpr, DK_CHUNKS: tl.constexpr):
    """[BT, BN] float32 scores ``scale * <q_t, key_n>``; ``b_q0`` is the preloaded first chunk."""
    o_d = tl.arange(0, BLOCK_DK)
    # [BDK, BN]: keys transposed for the dot.
    b_kt = tl.load(p_k + o_n[None, :] * Dk + o_d[:, None], mask=m_n[None, :] & (o_d < Dk)[:, None], other=0.)
    if F32_DOT:
        b_s = tl.dot(b_q0, b_kt.to(tl.float32), input_precision="ieee")
    else:
        b_s = tl.dot(b_q0, b_kt)
    for i_d in range(1, DK_CHUNKS):
        o_dc = i_d * BLOCK_DK + o_d
        m_dc = o_dc < Dk
        b_qc = tl.load(p_q + o_t[:, None] * Dk + o_dc[None, :], mask=m_t[:, None] & m_dc[None, :], other=0.)
        b_kc = tl.load(p_k + o_n[None, :] * Dk + o_dc[:, None], mask=m_n[None, :] & m_dc[:, None], other=0.)
        if F32_DOT:
            b_s = tl.dot(b_qc.to(tl.float32) * scale, b_kc.to(tl.float32), b_s, input_precision="ieee")
        else:
            b_s = tl.dot(b_qc, b_kc, b_s)
    if not F32_DOT:
        b_s = b_s * scale
    return b_s


@triton.jit
def _store_top_list(b_top, o_row, m_t, k, indices, weights, lse, K_PAD: tl.constexpr):
    """Decode a [BT, K_PAD] descending key list and write its first ``k`` entries at rows ``o_row``.

    Writes ``indices`` (-1 for missing entries), softmax ``weights`` (0 for missing entries and
    for existing slots scoring -inf) and ``lse`` (-inf for a row with no existing slot).
    """
    o_c = tl.arange(0, K_PAD)
    b_exists, b_score, b_slot = decode_keys(b_top)
    b_live = b_exists & (o_c[None, :] < k)
    # Softmax over the live entries. A NaN score was ranked as +inf and decodes as +inf, which
    # makes the row NaN below exactly as the reference's NaN does (exp(inf - inf) = NaN).
    b_max = tl.max(tl.where(b_live, b_score, float("-inf")), axis=1)
    b_empty = b_max == float("-inf")
    b_shift = tl.where(b_empty, 0., b_max)
    b_exp = tl.where(b_live, tl.exp(b_score - b_shift[:, None]), 0.)
    b_total = tl.where(b_empty, 1., tl.sum(b_exp, axis=1))
    b_w = tl.where(b_live, b_exp / b_total[:, None], 0.)
    b_lse = tl.where(b_empty, float("-inf"), b_shift + tl.log(b_total))

    m_tc = m_t[:, None] & (o_c[None, :] < k)
    o_tc = o_row[:, None] * k + o_c[None, :]
    tl.store(indices + o_tc, tl.where(b_exists, b_slot, -1), mask=m_tc)
    tl.store(weights + o_tc, b_w, mask=m_tc)
    tl.store(lse + o_row, b_lse, mask=m_t)


@triton.jit
def topk_read_fwd_select_kernel(
    q,  # [B, H, T, Dk] x
    keys,  # [B, Hm, N, Dk] or [Hm, N, Dk] x
    valid_len,  # [B] int64 (read only when HAS_VALID_LEN)
    indices,  # [B, H, T, k] int64, written
    weights,  # [B, H, T, k] fp32, written
    lse,  # [B, H, T] fp32, written
    R,  # query rows per (batch, memory head) = (H // Hm) * T
    N,
    Dk,
    k,
    scale,
    Hm,
    keys_batch_stride,  # Hm * N * Dk, or 0 for shared memories
    num_row_blocks,  # cdiv(R, BLOCK_T)
    count,  # [B * H * T] int64 candidate counts of the threshold path (read only when ONLY_OVERFLOW)
    cap,  # the threshold path's candidate capacity (used only when ONLY_OVERFLOW)
    HAS_VALID_LEN: tl.constexpr,
    ONLY_OVERFLOW: tl.constexpr,  # serve only the rows whose count passed cap (the fallback)
    F32_DOT: tl.constexpr,  # scale q, then an ieee float32 dot (float32 input; see _triton_lib.f32_dot)
    BLOCK_T: tl.constexpr,
    K_PAD: tl.constexpr,  # top-list width: next_pow2(k), >= 16
    LOG_K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,  # key tile width, a power of two in [16, K_PAD]
    LOG_BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm,): BLOCK_T query rows of one (batch, memory head)."""
    i_bh, i_tb, i_b, i_hm = row_block(num_row_blocks, Hm)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < R
    o_c = tl.arange(0, K_PAD)
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_DK)
    p_q = q + i_bh * R * Dk
    p_k = keys + i_b * keys_batch_stride + i_hm * N * Dk

    n_end = N
    if HAS_VALID_LEN:
        n_end = tl.minimum(tl.maximum(tl.load(valid_len + i_b), 0), N)
    m_rows = m_t
    if ONLY_OVERFLOW:
        # The fallback of the threshold path: a block with no row whose candidates overflowed
        # scans nothing and writes nothing (the finish kernel wrote its rows); a block with one
        # rewrites all its rows, the others with the same values (same keys, same epilogue).
        b_count = tl.load(count + i_bh * R + o_t, mask=m_t, other=0)
        b_any = tl.max(((b_count > cap) & m_t).to(tl.int32), axis=0)  # 0 or 1
        n_end = n_end * b_any
        m_rows = m_t & (tl.zeros([BLOCK_T], dtype=tl.int32) + b_any > 0)

    # [BT, BDK]: first feature chunk of the queries, kept for every key tile.
    b_q0 = tl.load(p_q + o_t[:, None] * Dk + o_d[None, :], mask=m_t[:, None] & (o_d < Dk)[None, :], other=0.)
    if F32_DOT:
        b_q0 = b_q0.to(tl.float32) * scale

    # [BT, K_PAD] running top list, sorted descending; [BT] its k-th best key.
    b_top = tl.full([BLOCK_T, K_PAD], INT64_MIN, dtype=tl.int64)
    b_kth = tl.full([BLOCK_T], INT64_MIN, dtype=tl.int64)
    for n_start in range(0, n_end, BLOCK_N):
        o_n = (n_start + o_bn).to(tl.int64)
        m_n = o_n < n_end
        # [BT, BN]
        b_s = _score_tile(p_q, p_k, o_t, m_t, o_n, m_n, Dk, scale, b_q0,
                          F32_DOT, BLOCK_T, BLOCK_N, BLOCK_DK, DK_CHUNKS)
        b_key = encode_keys(b_s, o_n, m_t[:, None] & m_n[None, :])
        # Keys are distinct, so a key enters a row's top k iff it beats the row's k-th best.
        b_beats = tl.max(tl.max((b_key > b_kth[:, None]).to(tl.int32), axis=1), axis=0)
        if b_beats > 0:
            b_new = bitonic_sort(b_key, 0, BLOCK_T, BLOCK_N, LOG_BLOCK_N)
            if BLOCK_N < K_PAD:
                # [BT, K_PAD]: the ascending tile padded on the left with INT64_MIN, still
                # ascending (at most BLOCK_N keys can enter, displacing the list's tail).
                o_seg = tl.arange(0, K_PAD // BLOCK_N)
                b_new = tl.reshape(tl.where(o_seg[None, :, None] == K_PAD // BLOCK_N - 1, b_new[:, None, :],
                                            INT64_MIN), [BLOCK_T, K_PAD])
            # Descending list vs ascending tile: the elementwise maximum holds exactly the K_PAD
            # largest keys of both, as a bitonic sequence.
            b_top = bitonic_merge(tl.maximum(b_top, b_new), 1, BLOCK_T, K_PAD, LOG_K_PAD)
            b_kth = tl.max(tl.where(o_c[None, :] == k - 1, b_top, INT64_MIN), axis=1)

    _store_top_list(b_top, i_bh * R + o_t, m_rows, k, indices, weights, lse, K_PAD)


# ---------------------------------------------------------------------------------------------
# threshold path (the default): contiguous one-tile chunks, int64 keys, cumulative-sum collect
# ---------------------------------------------------------------------------------------------

@triton.jit
def topk_read_fwd_chunkmax_kernel(
    q,  # [B, H, T, Dk] x
    keys,  # [B, Hm, N, Dk] or [Hm, N, Dk] x
    valid_len,  # [B] int64 (read only when HAS_VALID_LEN)
    chunk_max,  # [B * H * T, n_chunks] int64, written: each row's largest key per chunk
    R,
    N,
    Dk,
    scale,
    Hm,
    keys_batch_stride,
    num_row_blocks,
    n_chunks,  # cdiv(N, BLOCK_N): a chunk is one key tile
    HAS_VALID_LEN: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm,): threshold pass 1, the per-row maximum key of every tile.

    Scores exactly as topk_read_fwd_collect_kernel (same helper and, from the launcher, the same
    tiles and warps), so the keys are bit-identical to the ones pass 2 compares. Chunks past
    ``valid_len`` hold no existing slot and get INT64_MIN.
    """
    i_bh, i_tb, i_b, i_hm = row_block(num_row_blocks, Hm)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < R
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_DK)
    p_q = q + i_bh * R * Dk
    p_k = keys + i_b * keys_batch_stride + i_hm * N * Dk
    p_max = chunk_max + (i_bh * R + o_t) * n_chunks

    n_end = N
    if HAS_VALID_LEN:
        n_end = tl.minimum(tl.maximum(tl.load(valid_len + i_b), 0), N)

    b_q0 = tl.load(p_q + o_t[:, None] * Dk + o_d[None, :], mask=m_t[:, None] & (o_d < Dk)[None, :], other=0.)
    if F32_DOT:
        b_q0 = b_q0.to(tl.float32) * scale

    for n_start in range(0, n_end, BLOCK_N):
        o_n = (n_start + o_bn).to(tl.int64)
        m_n = o_n < n_end
        # [BT, BN]
        b_s = _score_tile(p_q, p_k, o_t, m_t, o_n, m_n, Dk, scale, b_q0,
                          F32_DOT, BLOCK_T, BLOCK_N, BLOCK_DK, DK_CHUNKS)
        b_key = encode_keys(b_s, o_n, m_t[:, None] & m_n[None, :])
        tl.store(p_max + n_start // BLOCK_N, tl.max(b_key, axis=1), mask=m_t)
    b_none = tl.full([BLOCK_T], INT64_MIN, dtype=tl.int64)
    for i_chunk in range(tl.cdiv(n_end, BLOCK_N), n_chunks):
        tl.store(p_max + i_chunk, b_none, mask=m_t)


@triton.jit
def topk_read_fwd_collect_kernel(
    q,  # [B, H, T, Dk] x
    keys,  # [B, Hm, N, Dk] or [Hm, N, Dk] x
    valid_len,  # [B] int64 (read only when HAS_VALID_LEN)
    tau,  # [B * H * T] int64: each row's threshold key
    cand,  # [B * H * T, cap] int64, written: the row's keys >= tau in slot order (first cap)
    count,  # [B * H * T] int64, written: how many keys >= tau the row has (may exceed cap)
    R,
    N,
    Dk,
    scale,
    Hm,
    keys_batch_stride,
    num_row_blocks,
    cap,
    HAS_VALID_LEN: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm,): threshold pass 2, compacts every existing key >= tau."""
    i_bh, i_tb, i_b, i_hm = row_block(num_row_blocks, Hm)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < R
    o_row = i_bh * R + o_t
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_DK)
    p_q = q + i_bh * R * Dk
    p_k = keys + i_b * keys_batch_stride + i_hm * N * Dk
    p_cand = cand + o_row * cap

    n_end = N
    if HAS_VALID_LEN:
        n_end = tl.minimum(tl.maximum(tl.load(valid_len + i_b), 0), N)

    b_q0 = tl.load(p_q + o_t[:, None] * Dk + o_d[None, :], mask=m_t[:, None] & (o_d < Dk)[None, :], other=0.)
    if F32_DOT:
        b_q0 = b_q0.to(tl.float32) * scale
    b_tau = tl.load(tau + o_row, mask=m_t, other=0)

    # [BT] keys >= tau found so far (int32: a count never exceeds N < 2**31).
    b_count = tl.zeros([BLOCK_T], dtype=tl.int32)
    for n_start in range(0, n_end, BLOCK_N):
        o_n = (n_start + o_bn).to(tl.int64)
        m_n = o_n < n_end
        m_exists = m_t[:, None] & m_n[None, :]
        # [BT, BN]
        b_s = _score_tile(p_q, p_k, o_t, m_t, o_n, m_n, Dk, scale, b_q0,
                          F32_DOT, BLOCK_T, BLOCK_N, BLOCK_DK, DK_CHUNKS)
        b_key = encode_keys(b_s, o_n, m_exists)
        # tau may be INT64_MIN (every existing slot a candidate): the existence mask keeps the
        # missing slots, whose key is INT64_MIN too, out.
        m_take = (b_key >= b_tau[:, None]) & m_exists
        b_take = m_take.to(tl.int32)
        # Position of each taken key in its row's list: the count so far plus its rank in the tile.
        b_pos = b_count[:, None] + tl.cumsum(b_take, axis=1) - 1
        tl.store(p_cand[:, None] + b_pos, b_key, mask=m_take & (b_pos < cap))
        b_count += tl.sum(b_take, axis=1)
    tl.store(count + o_row, b_count.to(tl.int64), mask=m_t)


# ---------------------------------------------------------------------------------------------
# threshold-strided path (opt-in): strided chunks, float maxima, k-th kernel, collect rounds
# ---------------------------------------------------------------------------------------------

@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def topk_read_fwd_strided_chunkmax_kernel(
    q,  # [B, H, T, Dk] x
    keys,  # [B, Hm, N, Dk] or [Hm, N, Dk] x
    valid_len,  # [B] int64 (read only when HAS_VALID_LEN)
    chunk_max,  # [B * H * T, n_groups * BLOCK_N] fp32, written: each row's largest score per chunk
    R,
    N,
    Dk,
    scale,
    Hm,
    keys_batch_stride,
    num_row_blocks,
    group_tiles,  # consecutive key tiles per group
    n_groups,  # cdiv(cdiv(N, BLOCK_N), group_tiles)
    HAS_VALID_LEN: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm,): threshold pass 1, the per-row maximum score of every
    chunk. Chunk ``g * BLOCK_N + j`` is column ``j`` of the ``g``-th group of ``group_tiles``
    consecutive key tiles: slots ``(g * group_tiles + i) * BLOCK_N + j``, ``BLOCK_N`` slots apart,
    so neighbouring slots, which often score alike (keys written in sequence), fall in different
    chunks and the threshold stays tight (module docstring).

    Scores exactly as topk_read_fwd_strided_collect_kernel (same helper and, from the launcher,
    the same tiles and warps), so the scores are bit-identical to the ones pass 2 compares. The running
    maximum is elementwise over the group's tiles (one instruction per score, no reduction) and
    is stored once per group. It propagates NaN and stores it as +inf (NaN ranks as +inf, and the
    NaN slot attains it); chunks holding no existing slot (past ``valid_len``) get -inf.
    """
    i_bh, i_tb, i_b, i_hm = row_block(num_row_blocks, Hm)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < R
    o_bn = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_DK)
    p_q = q + i_bh * R * Dk
    p_k = keys + i_b * keys_batch_stride + i_hm * N * Dk
    p_max = chunk_max + (i_bh * R + o_t)[:, None] * (n_groups * BLOCK_N) + o_bn[None, :]

    n_end = N
    if HAS_VALID_LEN:
        n_end = tl.minimum(tl.maximum(tl.load(valid_len + i_b), 0), N)

    b_q0 = tl.load(p_q + o_t[:, None] * Dk + o_d[None, :], mask=m_t[:, None] & (o_d < Dk)[None, :], other=0.)
    if F32_DOT:
        b_q0 = b_q0.to(tl.float32) * scale

    b_none = tl.full([BLOCK_T, BLOCK_N], float("-inf"), dtype=tl.float32)
    group_slots = group_tiles * BLOCK_N
    for g_start in range(0, n_end, group_slots):
        b_run = b_none
        for n_start in range(g_start, tl.minimum(g_start + group_slots, n_end), BLOCK_N):
            o_n = (n_start + o_bn).to(tl.int64)
            m_n = o_n < n_end
            b_s = _score_tile(p_q, p_k, o_t, m_t, o_n, m_n, Dk, scale, b_q0,
                              F32_DOT, BLOCK_T, BLOCK_N, BLOCK_DK, DK_CHUNKS)
            # Slots past the end were scored from zero-filled loads.
            b_run = _max_propagating_nan(b_run, tl.where(m_n[None, :], b_s, float("-inf")))
        tl.store(p_max + (g_start // group_slots) * BLOCK_N, tl.where(b_run != b_run, float("inf"), b_run),
                 mask=m_t[:, None])
    for i_group in range(tl.cdiv(n_end, group_slots), n_groups):
        tl.store(p_max + i_group * BLOCK_N, b_none, mask=m_t[:, None])


@triton.jit
def _collect_tile(b_s, b_tau, o_c, m_n, m_t, n_start, b_count, p_cand, cap, BLOCK_T: tl.constexpr,
                  BLOCK_N: tl.constexpr, BATCH: tl.constexpr):
    """Appends the keys of a [BT, BN] score tile that are >= the rows' ``b_tau`` (NaN ranking as
    +inf) to the rows' candidate lists; returns the new counts ``b_count``.

    A row takes about ``k * BLOCK_N / N`` keys per tile for random scores, rarely more than two,
    so the keys are extracted in descending order, one per row per round, while a row of the
    block still has its best remaining score >= tau: a round is a column minimum (the smallest
    column holding the row's maximum: ties go to the smaller slot), the removal of that key and a
    float maximum, all reductions in the layout the dot produced. The keys of up to ``BATCH``
    rounds stay in registers and go out in one [BT, BATCH] store; on sm_90 a round has 2
    barriers (its "any row live" maximum) and a store of 2 rounds' keys 2 more (storing each
    round's keys cost 8 barriers per round; a cumulative sum over the tile, the compaction
    before, converted [BT, BN] tiles through shared memory five times per tile and cost 3x the
    instructions). A tile where some row's best slots sit together (keys written in sequence)
    takes as many rounds as that row has keys there. A row stops taking keys once its count
    passes ``cap`` (``cap + 1``: the exact streaming fallback redoes it), so all the rounds of a
    row, over the whole scan, are at most ``cap + 1``.

    Removed keys and slots past the end (``m_n`` false) are NaN: the float maximum ignores NaN
    and NaN compares false. A NaN-propagating maximum (at no extra cost) tells whether a tile
    holds any NaN; if it does (the partial last tile, or real NaN scores), the real ones are made
    +inf, as they rank.
    """
    b_s = tl.where(m_n[None, :], b_s, float("nan"))
    b_max = tl.reduce(b_s, 1, _max_propagating_nan)
    if tl.max((b_max != b_max).to(tl.int32), axis=0) > 0:
        b_s = tl.where((b_s != b_s) & m_n[None, :], float("inf"), b_s)
        b_max = tl.max(b_s, axis=1)
    # Rows past R take nothing.
    m_live = (b_max >= b_tau) & m_t & (b_count <= cap)
    b_any = tl.max(m_live.to(tl.int32), axis=0)
    o_b = tl.arange(0, BATCH)[None, :]
    while b_any > 0:
        # Up to BATCH rounds into registers (a row live in a round was live in the ones before,
        # so its i-th key goes to column i), then one store of the [BT, BATCH] keys.
        b_buf = tl.zeros([BLOCK_T, BATCH], dtype=tl.int64)
        b_taken = tl.zeros_like(b_count)
        i_round = 0
        while (i_round < BATCH) & (b_any > 0):
            b_col = tl.min(tl.where(b_s == b_max[:, None], o_c, BLOCK_N), axis=1)
            b_key = encode_key(b_max, n_start + b_col)
            b_buf = tl.where((o_b == i_round) & m_live[:, None], b_key[:, None], b_buf)
            b_taken += m_live.to(tl.int32)
            b_s = tl.where(o_c == b_col[:, None], float("nan"), b_s)
            b_max = tl.max(b_s, axis=1)
            m_live = (b_max >= b_tau) & m_t & (b_count + b_taken <= cap)
            b_any = tl.max(m_live.to(tl.int32), axis=0)
            i_round += 1
        o_pos = b_count[:, None] + o_b
        tl.store(p_cand[:, None] + o_pos, b_buf, mask=(o_b < b_taken[:, None]) & (o_pos < cap))
        b_count += b_taken
    return b_count


@triton.jit
def topk_read_fwd_strided_collect_kernel(
    q,  # [B, H, T, Dk] x
    keys,  # [B, Hm, N, Dk] or [Hm, N, Dk] x
    valid_len,  # [B] int64 (read only when HAS_VALID_LEN)
    tau,  # [B * H * T] fp32: each row's threshold score
    cand,  # [B * H * T, cap] int64, written: keys of the row's first cap scores >= tau (any order)
    count,  # [B * H * T] int64, written: how many scores >= tau the row has (may exceed cap)
    R,
    N,
    Dk,
    scale,
    Hm,
    keys_batch_stride,
    num_row_blocks,
    cap,
    HAS_VALID_LEN: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    DK_CHUNKS: tl.constexpr,
    BATCH: tl.constexpr,  # extraction rounds whose keys are stored together (_collect_tile)
):
    """Grid (num_row_blocks * B * Hm,): threshold pass 2, appends every existing slot whose
    score is >= tau (NaN ranking as +inf) to the row's candidate list (:func:`_collect_tile`).
    The finish kernel sorts, so the order of the candidates does not matter.
    """
    i_bh, i_tb, i_b, i_hm = row_block(num_row_blocks, Hm)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < R
    o_row = i_bh * R + o_t
    o_bn = tl.arange(0, BLOCK_N)
    o_c = o_bn[None, :]
    o_d = tl.arange(0, BLOCK_DK)
    p_q = q + i_bh * R * Dk
    p_k = keys + i_b * keys_batch_stride + i_hm * N * Dk
    p_cand = cand + o_row * cap

    n_end = N
    if HAS_VALID_LEN:
        n_end = tl.minimum(tl.maximum(tl.load(valid_len + i_b), 0), N)

    b_q0 = tl.load(p_q + o_t[:, None] * Dk + o_d[None, :], mask=m_t[:, None] & (o_d < Dk)[None, :], other=0.)
    if F32_DOT:
        b_q0 = b_q0.to(tl.float32) * scale
    # Never NaN: it is one of the row's chunk maxima (a NaN query row has tau = +inf, and its NaN
    # scores, ranking as +inf, are all taken).
    b_tau = tl.load(tau + o_row, mask=m_t, other=float("inf"))

    # [BT] scores >= tau found so far (int32: a count never exceeds N < 2**31).
    b_count = tl.zeros([BLOCK_T], dtype=tl.int32)
    for n_start in range(0, n_end, BLOCK_N):
        o_n = (n_start + o_bn).to(tl.int64)
        m_n = o_n < n_end
        b_s = _score_tile(p_q, p_k, o_t, m_t, o_n, m_n, Dk, scale, b_q0,
                          F32_DOT, BLOCK_T, BLOCK_N, BLOCK_DK, DK_CHUNKS)
        b_count = _collect_tile(b_s, b_tau, o_c, m_n, m_t, n_start, b_count, p_cand, cap, BLOCK_T, BLOCK_N,
                                BATCH)
    tl.store(count + o_row, b_count.to(tl.int64), mask=m_t)


@triton.jit
def topk_read_fwd_kth_kernel(
    chunk_max,  # [R_total, n_chunks] fp32 (never NaN: see the chunkmax kernel)
    tau,  # [R_total] fp32, written: each row's k-th largest chunk maximum
    R_total,
    n_chunks,
    k,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next_pow2(n_chunks): the whole row in registers
):
    """Grid (cdiv(R_total, BLOCK_T),): ``tau = torch.topk(chunk_max, k).values[:, k - 1]``.

    A bitwise binary search, most significant bit first, on the order-preserving int32 images of
    the row's floats (held in registers): the largest T with ``count(image >= T) >= k`` is the
    image of the k-th largest value. 32 compare-and-count passes over registers instead of a
    radix select through global memory.
    """
    o_row = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_row < R_total
    o_c = tl.arange(0, BLOCK_C)
    # Padding is -inf: it can only be the k-th largest when that is -inf anyway.
    b_x = tl.load(chunk_max + o_row[:, None] * n_chunks + o_c[None, :],
                  mask=m_t[:, None] & (o_c < n_chunks)[None, :], other=float("-inf"))
    b_image = order_bits(b_x.to(tl.int32, bitcast=True))
    # The answer in offset binary (t_off = T + 2**31 as a bit pattern; T = t_off ^ INT32_MIN),
    # built bit by bit: keep each bit whose setting still leaves k images >= the candidate.
    b_count = tl.sum((b_image >= 0).to(tl.int32), axis=1)
    b_off = tl.where(b_count >= k, INT32_MIN, tl.zeros([BLOCK_T], dtype=tl.int32))
    for i_bit in tl.static_range(30, -1, -1):
        b_cand = b_off | (1 << i_bit)
        b_count = tl.sum((b_image >= (b_cand ^ INT32_MIN)[:, None]).to(tl.int32), axis=1)
        b_off = tl.where(b_count >= k, b_cand, b_off)
    tl.store(tau + o_row, order_bits(b_off ^ INT32_MIN).to(tl.float32, bitcast=True), mask=m_t)


# ---------------------------------------------------------------------------------------------
# Both threshold paths: the finish kernel; then the output
# ---------------------------------------------------------------------------------------------

@triton.jit
def topk_read_fwd_finish_kernel(
    cand,  # [B * H * T, CAP] int64 from topk_read_fwd_collect_kernel
    count,  # [B * H * T] int64; rows with count > CAP are left to the select kernel's fallback
    indices,  # [B, H, T, k] int64, written
    weights,  # [B, H, T, k] fp32, written
    lse,  # [B, H, T] fp32, written
    R_total,  # B * H * T
    k,
    BLOCK_T: tl.constexpr,
    K_PAD: tl.constexpr,
    CAP: tl.constexpr,  # candidate list width, a power of two >= K_PAD
    LOG_CAP: tl.constexpr,
):
    """Grid (cdiv(R_total, BLOCK_T),): sorts each row's candidates and writes its top k."""
    o_row = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_row < R_total
    o_p = tl.arange(0, CAP)
    b_count = tl.load(count + o_row, mask=m_t, other=0)
    m_t = m_t & (b_count <= CAP)
    # [BT, CAP], padded with INT64_MIN (a missing slot) past the row's count.
    b_cand = tl.load(cand + o_row[:, None] * CAP + o_p[None, :], mask=m_t[:, None] & (o_p[None, :] < b_count[:, None]),
                     other=INT64_MIN)
    b_cand = bitonic_sort(b_cand, 1, BLOCK_T, CAP, LOG_CAP)
    if CAP > K_PAD:
        # [BT, K_PAD]: the first K_PAD columns (every key is >= INT64_MIN, so the max keeps them).
        o_seg = tl.arange(0, CAP // K_PAD)
        b_top = tl.max(tl.where(o_seg[None, :, None] == 0, tl.reshape(b_cand, [BLOCK_T, CAP // K_PAD, K_PAD]),
                                INT64_MIN), axis=1)
    else:
        b_top = b_cand
    _store_top_list(b_top, o_row, m_t, k, indices, weights, lse, K_PAD)


@triton.jit
def topk_read_fwd_out_kernel(
    values,  # [B, Hm, N, Dv] or [Hm, N, Dv] x
    indices,  # [B, H, T, k] int64
    weights,  # [B, H, T, k] fp32
    out,  # [B, H, T, Dv] x, written
    R,
    N,
    Dv,
    k,
    Hm,
    values_batch_stride,
    num_row_blocks,
    BLOCK_T: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm, cdiv(Dv, BLOCK_DV))."""
    i_bh, i_tb, i_b, i_hm = row_block(num_row_blocks, Hm)
    i_dv = tl.program_id(1).to(tl.int64)

    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < R
    o_row = i_bh * R + o_t
    o_d = i_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_d = o_d < Dv
    p_v = values + i_b * values_batch_stride + i_hm * N * Dv

    # [BT, BDV]
    b_out = tl.zeros([BLOCK_T, BLOCK_DV], dtype=tl.float32)
    for j in range(0, k):
        # [BT]
        b_idx = tl.load(indices + o_row * k + j, mask=m_t, other=-1)
        b_w = tl.load(weights + o_row * k + j, mask=m_t, other=0.)
        m_live = (b_idx >= 0) & (b_idx < N)
        b_v = tl.load(p_v + b_idx[:, None] * Dv + o_d[None, :], mask=m_live[:, None] & m_d[None, :], other=0.)
        b_out += b_w[:, None] * b_v.to(tl.float32)
    tl.store(out + o_row[:, None] * Dv + o_d[None, :], b_out.to(out.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def topk_read_bwd_dweights_kernel(
    dout,  # [B, H, T, Dv] x
    values,  # [B, Hm, N, Dv] or [Hm, N, Dv] x
    indices,  # [B, H, T, k] int64
    weights,  # [B, H, T, k] fp32
    dweights,  # [B, H, T, k] fp32
    dw,  # [B, H, T, k] fp32 scratch, written: dweights + <dout, v> (0 for missing entries)
    dvalues_acc,  # like values, fp32, accumulated into (atomic mode only)
    R,
    N,
    Dv,
    k,
    Hm,
    values_batch_stride,
    num_row_blocks,
    ATOMIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm,): BLOCK_T query rows of one (batch, memory head)."""
    _, i_b, i_hm, o_t, m_t, o_row = row_block_rows(num_row_blocks, Hm, R, BLOCK_T)
    p_v = values + i_b * values_batch_stride + i_hm * N * Dv
    p_dv = dvalues_acc + i_b * values_batch_stride + i_hm * N * Dv
    o_d0 = tl.arange(0, BLOCK_DV)
    m_d0 = o_d0 < Dv
    # [BT, BDV]: first feature chunk of dout, kept for every entry.
    b_do0 = tl.load(dout + o_row[:, None] * Dv + o_d0[None, :], mask=m_t[:, None] & m_d0[None, :],
                    other=0.).to(tl.float32)

    for j in range(0, k):
        # [BT]
        b_idx = tl.load(indices + o_row * k + j, mask=m_t, other=-1)
        m_live = m_t & (b_idx >= 0) & (b_idx < N)
        b_w = tl.load(weights + o_row * k + j, mask=m_live, other=0.)
        # [BT, BDV]
        m_vd = m_live[:, None] & m_d0[None, :]
        o_vd = b_idx[:, None] * Dv + o_d0[None, :]
        b_v = tl.load(p_v + o_vd, mask=m_vd, other=0.).to(tl.float32)
        b_dot = tl.sum(b_do0 * b_v, axis=1)
        if ATOMIC:
            tl.atomic_add(p_dv + o_vd, b_w[:, None] * b_do0, mask=m_vd, sem="relaxed")
        for i_d in range(1, tl.cdiv(Dv, BLOCK_DV)):
            o_d = i_d * BLOCK_DV + o_d0
            m_vd = m_live[:, None] & (o_d < Dv)[None, :]
            o_vd = b_idx[:, None] * Dv + o_d[None, :]
            b_do = tl.load(dout + o_row[:, None] * Dv + o_d[None, :], mask=m_vd, other=0.).to(tl.float32)
            b_v = tl.load(p_v + o_vd, mask=m_vd, other=0.).to(tl.float32)
            b_dot += tl.sum(b_do * b_v, axis=1)
            if ATOMIC:
                tl.atomic_add(p_dv + o_vd, b_w[:, None] * b_do, mask=m_vd, sem="relaxed")
        b_dwt = tl.load(dweights + o_row * k + j, mask=m_live, other=0.)
        tl.store(dw + o_row * k + j, tl.where(m_live, b_dwt + b_dot, 0.), mask=m_t)


@triton.jit
def topk_read_bwd_dq_kernel(
    q,  # [B, H, T, Dk] x
    keys,  # [B, Hm, N, Dk] or [Hm, N, Dk] x
    indices,  # [B, H, T, k] int64
    weights,  # [B, H, T, k] fp32
    dw,  # [B, H, T, k] fp32 from topk_read_bwd_dweights_kernel
    dlse,  # [B, H, T] fp32
    dq,  # [B, H, T, Dk] x, written
    dkeys_acc,  # like keys, fp32, accumulated into (atomic mode only)
    ds,  # [B, H, T, k] fp32, written (deterministic mode only)
    R,
    N,
    Dk,
    k,
    scale,
    Hm,
    keys_batch_stride,
    num_row_blocks,
    ATOMIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_KC: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    """Grid (num_row_blocks * B * Hm,): BLOCK_T query rows of one (batch, memory head)."""
    _, i_b, i_hm, o_t, m_t, o_row = row_block_rows(num_row_blocks, Hm, R, BLOCK_T)

    p_k = keys + i_b * keys_batch_stride + i_hm * N * Dk

    # [BT]
    b_wdw = weighted_dw_sum(indices, weights, dw, o_row, m_t, k, N, BLOCK_T, BLOCK_KC)
    b_dlse = tl.load(dlse + o_row, mask=m_t, other=0.)

    for i_d in range(0, tl.cdiv(Dk, BLOCK_DK)):
        o_d = i_d * BLOCK_DK + tl.arange(0, BLOCK_DK)
        m_d = o_d < Dk
        o_qd = o_row[:, None] * Dk + o_d[None, :]
        # [BT, BDK]
        b_q = tl.load(q + o_qd, mask=m_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_dq = tl.zeros([BLOCK_T, BLOCK_DK], dtype=tl.float32)
        for j in range(0, k):
            # [BT]
            b_idx = tl.load(indices + o_row * k + j, mask=m_t, other=-1)
            m_live = m_t & (b_idx >= 0) & (b_idx < N)
            b_w = tl.load(weights + o_row * k + j, mask=m_live, other=0.)
            b_dwj = tl.load(dw + o_row * k + j, mask=m_live, other=0.)
            b_ds = tl.where(m_live, b_w * (b_dwj - b_wdw + b_dlse), 0.)
            m_kd = m_live[:, None] & m_d[None, :]
            o_kd = b_idx[:, None] * Dk + o_d[None, :]
            # [BT, BDK]
            b_key = tl.load(p_k + o_kd, mask=m_kd, other=0.).to(tl.float32)
            b_dq += b_ds[:, None] * b_key
            if ATOMIC:
                tl.atomic_add(dkeys_acc + i_b * keys_batch_stride + i_hm * N * Dk + o_kd,
                              (scale * b_ds)[:, None] * b_q, mask=m_kd, sem="relaxed")
            else:
                tl.store(ds + o_row * k + j, b_ds, mask=m_t & (i_d == 0))
        tl.store(dq + o_qd, (scale * b_dq).to(dq.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def topk_read_bwd_slot_kernel(
    q,  # [B, H, T, Dk] x
    dout,  # [B, H, T, Dv] x
    weights,  # [B, H, T, k] fp32
    ds,  # [B, H, T, k] fp32 from topk_read_bwd_dq_kernel
    entry_order,  # [E] int64: entries sorted by (memory, slot), stably
    entry_rows,  # [E] int64: entry_order // k, the query row of each (no 64-bit division here)
    run_starts,  # [M * N + 1] int64: entry_order[run_starts[s]:run_starts[s + 1]] hit slot s
    dkeys,  # [M, N, Dk] x, written
    dvalues,  # [M, N, Dv] x, written
    Dk,
    Dv,
    scale,
    BLOCK_E: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (M * N,): one program owns one memory slot (M memories: B * Hm, or Hm when shared).

    Sums the slot's entries in ``entry_order`` order, chunk by chunk, with a fixed reduction tree:
    the result depends only on the inputs (deterministic mode).
    """
    i_slot = tl.program_id(0).to(tl.int64)
    e_start = tl.load(run_starts + i_slot)
    e_end = tl.load(run_starts + i_slot + 1)

    for i_d in range(0, tl.cdiv(Dk, BLOCK_DK)):
        o_d = i_d * BLOCK_DK + tl.arange(0, BLOCK_DK)
        m_d = o_d < Dk
        b_acc = tl.zeros([BLOCK_DK], dtype=tl.float32)
        for e_chunk in range(e_start, e_end, BLOCK_E):
            o_e = e_chunk + tl.arange(0, BLOCK_E)
            m_e = o_e < e_end
            # [BE]
            b_entry = tl.load(entry_order + o_e, mask=m_e, other=0)
            b_row = tl.load(entry_rows + o_e, mask=m_e, other=0)
            b_ds = tl.load(ds + b_entry, mask=m_e, other=0.)
            # [BE, BDK]
            b_q = tl.load(q + b_row[:, None] * Dk + o_d[None, :], mask=m_e[:, None] & m_d[None, :],
                          other=0.).to(tl.float32)
            b_acc += tl.sum(b_ds[:, None] * b_q, axis=0)
        tl.store(dkeys + i_slot * Dk + o_d, (scale * b_acc).to(dkeys.dtype.element_ty), mask=m_d)

    for i_d in range(0, tl.cdiv(Dv, BLOCK_DV)):
        o_d = i_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
        m_d = o_d < Dv
        b_acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for e_chunk in range(e_start, e_end, BLOCK_E):
            o_e = e_chunk + tl.arange(0, BLOCK_E)
            m_e = o_e < e_end
            b_entry = tl.load(entry_order + o_e, mask=m_e, other=0)
            b_row = tl.load(entry_rows + o_e, mask=m_e, other=0)
            b_w = tl.load(weights + b_entry, mask=m_e, other=0.)
            b_do = tl.load(dout + b_row[:, None] * Dv + o_d[None, :], mask=m_e[:, None] & m_d[None, :],
                           other=0.).to(tl.float32)
            b_acc += tl.sum(b_w[:, None] * b_do, axis=0)
        tl.store(dvalues + i_slot * Dv + o_d, b_acc.to(dvalues.dtype.element_ty), mask=m_d)


# ---------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and COMPILE_CONFIGS, so the two cannot drift)
# ---------------------------------------------------------------------------------------------

class SelectConfig(NamedTuple):
    block_t: int
    k_pad: int
    block_n: int
    block_dk: int
    dk_chunks: int
    num_warps: int


class _SelectTile(NamedTuple):
    block_t: int
    block_n: int
    num_warps: int
    max_block_dk: int


# Tiles of the select kernel by K_PAD, for 16-bit and float32 inputs. The running list is
# [BLOCK_T, K_PAD] int64 (2 registers per element) and a merge sorts a [BLOCK_T, BLOCK_N] key tile,
# so wide lists get narrower key tiles or more warps; BLOCK_T = 16, the smallest tl.dot allows.
# float32 scores run on the FMA units (no TF32), whose dot operands take more registers than the
# tensor-core path, hence narrower feature chunks at K_PAD >= 128. Chosen by compiling candidates
# for D = 64/128, with and without valid_len, for sm_80 and sm_90 with Triton 3.9 (ptxas 12.9)
# and 3.6 (ptxas 12.8): these have no spills in any of them (ptxas often caps 8-warp kernels at
# 128 registers, so those must stay well below it). Triton 3.3 (ptxas 12.4) needs more registers
# for the same code and spills at 16-bit K_PAD >= 64 and float32 K_PAD 256 (correct, slower).
# Small row blocks and narrow key tiles also help the tile skip, which needs every row of the
# block to reject the whole tile.
_SELECT_TILES = {
    16: _SelectTile(16, 16, 4, MAX_BLOCK_D),
    32: _SelectTile(16, 32, 4, MAX_BLOCK_D),
    64: _SelectTile(16, 64, 4, MAX_BLOCK_D),
    128: _SelectTile(16, 64, 4, MAX_BLOCK_D),
    256: _SelectTile(16, 32, 4, MAX_BLOCK_D),
}
_SELECT_TILES_F32 = {
    16: _SelectTile(16, 16, 4, MAX_BLOCK_D),
    32: _SelectTile(16, 32, 8, MAX_BLOCK_D),
    64: _SelectTile(16, 64, 8, MAX_BLOCK_D),
    128: _SelectTile(16, 64, 8, 32),
    256: _SelectTile(16, 128, 8, 16),
}

class _ScanTile(NamedTuple):
    block_t: int
    block_n: int  # = the chunk size C of the threshold path
    num_warps: int
    max_block_dk: int


# Tiles of the threshold paths' two scoring passes (chunkmax and collect use the same one, so
# their dots compile alike and the scores match bit for bit; both threshold designs use this
# table). They hold no top list, only a score tile, so they are larger than the select kernel's.
# For the threshold path, [128, 64] at 8 warps measured fastest of six tiles on an H200 (bfloat16
# read-gpu and read-heads-gpu, tools/gpu_probe.py topk-tiles, benchmarks/RESULTS.md); its
# cumulative-sum collect takes 255 registers and spills 16-40 bytes (16-bit), allowed. In the
# threshold-strided path [128, 64] takes 128-150 registers in chunkmax (its [128, 64] running
# maximum) and 115-141 in collect (sm_90, Triton 3.9): two blocks per SM. float32 runs on the FMA
# units (no TF32); its dot operands need narrow feature chunks. A larger BLOCK_N shrinks the
# chunk_max buffer (T * N / BLOCK_N; threshold-strided: up to MAX_CHUNKS per row) but raises the
# candidate bound k * BLOCK_N.
_SCAN_TILES = {
    False: _ScanTile(128, 64, 8, MAX_BLOCK_D),   # float16 / bfloat16
    True: _ScanTile(32, 32, 4, 32),              # float32
}
# Candidate capacity per row of both threshold paths: CAP_FACTOR * K_PAD. For random scores a row
# has about k + k * k / n_chunks candidates (k = 32, N = 65536: ~33).
CAP_FACTOR = 4
# threshold-strided: extraction rounds of the collect kernel whose keys stay in registers and go
# out in one store (_collect_tile): random keys take 1-3 rounds per tile, keys written in sequence
# up to ~11. At 4 the 16-bit D=128 collect spills 40 bytes on sm_80 (Triton 3.9); at 2 nothing
# spills.
COLLECT_BATCH = 2
# threshold-strided chunks: column j of a group of G consecutive scan tiles, G slots BLOCK_N
# apart, G = max(BLOCK_N, the fewest that keep n_chunks = BLOCK_N * cdiv(n_tiles, G) <=
# MAX_CHUNKS): BLOCK_N-slot chunks, about one per tile, up to N = MAX_CHUNKS * BLOCK_N (16-bit
# tiles: read-gpu 1024 chunks, read-heads-gpu 256). MAX_CHUNKS bounds the chunk_max scratch (4 KB
# per row whatever N) and keeps a row in registers for topk_read_fwd_kth_kernel; the random-score
# candidates stay below about k + k * k / MAX_CHUNKS (k = 256: 320 of cap 1024).
MAX_CHUNKS = 1024
# The k-th kernel's [BLOCK_T, next_pow2(n_chunks)] tile, in elements.
KTH_TILE = 4096
# Elements of the finish kernel's [BLOCK_T, CAP] candidate tile.
FINISH_TILE = 2048
# Switch of the forward path (module docstring): "threshold" and "threshold-strided" fall back to
# "stream" (the running top-k select kernel only) for rows whose candidates overflow. The default
# is the design l2m_kernels._gpu_status marks as such: one that has run on a GPU.
PATH_ENV = "L2M_TOPK_TRITON_PATH"
PATHS = ("threshold", "threshold-strided", "stream")
DEFAULT_PATH = _gpu_status.default_design(_gpu_status.TOPK_SELECTION, "triton").name
# The path the last topk_read_fwd call took: a name of PATHS, "<threshold path>->stream" when the
# threshold path could not start, or "<threshold path>+stream" (CPU tensors only) when rows
# overflowed into the fallback (tests).
last_forward_path = None

OUT_BLOCK_T = 32
SLOT_BLOCK_E = 32
# Backward row kernels: BLOCK_T rows, each walking its k entries. The float32 atomics take a 64-bit
# address per element, so the atomic mode scatters feature chunks of at most 64 (at 32 x 128 the
# sm_80 build spills).
BWD_BLOCK_T = 16
BWD_BLOCK_KC = 32
BWD_ATOMIC_MAX_BLOCK_D = 64
NUM_WARPS = 4


def _block_d(D: int) -> int:
    return block_d(D, MAX_BLOCK_D)


def select_config(k: int, Dk: int, dtype: torch.dtype) -> SelectConfig:
    """Tiles of the select kernel for ``k`` winners over ``Dk`` features (deterministic choice)."""
    k_pad = pow2_at_least(k, MIN_K_PAD)
    tile = (_SELECT_TILES_F32 if dtype == torch.float32 else _SELECT_TILES)[k_pad]
    block_dk = min(_block_d(Dk), tile.max_block_dk)
    return SelectConfig(tile.block_t, k_pad, tile.block_n, block_dk, max(1, triton.cdiv(int(Dk), block_dk)),
                        tile.num_warps)


def _select_constexprs(k: int, Dk: int, dtype: torch.dtype, has_valid_len: bool, only_overflow: bool = False):
    config = select_config(k, Dk, dtype)
    return {"HAS_VALID_LEN": has_valid_len, "ONLY_OVERFLOW": only_overflow, "F32_DOT": f32_dot(dtype),
            "BLOCK_T": config.block_t, "K_PAD": config.k_pad, "LOG_K_PAD": config.k_pad.bit_length() - 1,
            "BLOCK_N": config.block_n, "LOG_BLOCK_N": config.block_n.bit_length() - 1,
            "BLOCK_DK": config.block_dk,
            "DK_CHUNKS": config.dk_chunks}, config.num_warps


def threshold_capacity(k: int) -> int:
    """Candidate list width per row of the threshold paths (a power of two >= K_PAD)."""
    return CAP_FACTOR * pow2_at_least(k, MIN_K_PAD)


def _scan_constexprs(Dk: int, dtype: torch.dtype, has_valid_len: bool):
    """Constexprs and warps of the chunkmax and collect kernels of both threshold paths (the
    threshold-strided collect adds BATCH: :func:`_collect_constexprs`)."""
    use_f32_dot = f32_dot(dtype)
    tile = _SCAN_TILES[use_f32_dot]
    block_dk = min(_block_d(Dk), tile.max_block_dk)
    return {"HAS_VALID_LEN": has_valid_len, "F32_DOT": use_f32_dot, "BLOCK_T": tile.block_t,
            "BLOCK_N": tile.block_n, "BLOCK_DK": block_dk,
            "DK_CHUNKS": max(1, triton.cdiv(int(Dk), block_dk))}, tile.num_warps


def _collect_constexprs(scan_constexprs: dict) -> dict:
    """Constexprs of topk_read_fwd_strided_collect_kernel: the scan tile's plus its store batch."""
    return dict(scan_constexprs, BATCH=COLLECT_BATCH)


def chunk_groups(N: int, block_n: int) -> tuple[int, int]:
    """(group_tiles, n_groups) of the threshold-strided chunks for ``N`` slots in ``block_n`` tiles:
    ``block_n * n_groups <= max(MAX_CHUNKS, block_n)`` chunks (see MAX_CHUNKS)."""
    n_tiles = triton.cdiv(N, block_n)
    group_tiles = max(block_n, triton.cdiv(n_tiles, max(1, MAX_CHUNKS // block_n)))
    return group_tiles, triton.cdiv(n_tiles, group_tiles)


def _kth_constexprs(n_chunks: int):
    block_c = pow2_at_least(n_chunks, 16)
    return {"BLOCK_T": max(1, KTH_TILE // block_c), "BLOCK_C": block_c}, NUM_WARPS


def _finish_constexprs(k: int):
    k_pad = pow2_at_least(k, MIN_K_PAD)
    cap = threshold_capacity(k)
    return {"BLOCK_T": max(1, FINISH_TILE // cap), "K_PAD": k_pad, "CAP": cap,
            "LOG_CAP": cap.bit_length() - 1}, NUM_WARPS


def _out_constexprs(Dv: int):
    return {"BLOCK_T": OUT_BLOCK_T, "BLOCK_DV": _block_d(Dv)}, NUM_WARPS


def _bwd_block_d(D: int, atomic: bool) -> int:
    return min(_block_d(D), BWD_ATOMIC_MAX_BLOCK_D) if atomic else _block_d(D)


def _dweights_constexprs(Dv: int, atomic: bool):
    return {"ATOMIC": atomic, "BLOCK_T": BWD_BLOCK_T, "BLOCK_DV": _bwd_block_d(Dv, atomic)}, NUM_WARPS


def _dq_constexprs(Dk: int, atomic: bool):
    return {"ATOMIC": atomic, "BLOCK_T": BWD_BLOCK_T, "BLOCK_KC": BWD_BLOCK_KC,
            "BLOCK_DK": _bwd_block_d(Dk, atomic)}, NUM_WARPS


def _slot_constexprs(Dk: int, Dv: int):
    return {"BLOCK_E": SLOT_BLOCK_E, "BLOCK_DK": _block_d(Dk), "BLOCK_DV": _block_d(Dv)}, NUM_WARPS


def _check_dtype(q: torch.Tensor):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: the triton topk_memory_read supports float32/float16/bfloat16, got {q.dtype}")


def _memory_layout(q: torch.Tensor, keys: torch.Tensor):
    """(B, H, T, Hm, N, R = (H // Hm) * T, number of memories M)."""
    B, H, T, _ = q.shape
    Hm, N = keys.shape[-3], keys.shape[-2]
    shared = keys.dim() == 3
    return B, H, T, Hm, N, (H // Hm) * T, (Hm if shared else B * Hm)


# ---------------------------------------------------------------------------------------------
# Launchers (the low-level topk_memory_read interface)
# ---------------------------------------------------------------------------------------------

def topk_read_fwd(q, keys, values, valid_len, k, scale, out, indices, weights, lse) -> None:
    """Sparse top-k memory read into preallocated outputs.

    Args:
        q:         (B, H, T, Dk) x, contiguous; x in {float32, float16, bfloat16}.
        keys:      (B, Hm, N, Dk) or shared (Hm, N, Dk) x, contiguous; H % Hm == 0.
        values:    keys' leading shape + (Dv,), x, contiguous.
        valid_len: None or (B,) int64, contiguous; clamped to [0, N].
        k:         1 <= k <= min(N, 256).   scale: python float.
        out:       (B, H, T, Dv) x, written.   indices: (B, H, T, k) int64, written.
        weights:   (B, H, T, k) float32, written.   lse: (B, H, T) float32, written.

    The threshold paths make no device-to-host sync (rows whose candidates overflow are finished
    by the streaming kernel); their scratch memory is given in the module docstring. The path is
    ``L2M_TOPK_TRITON_PATH`` (default ``DEFAULT_PATH``).

    Equivalent PyTorch:
        out, indices, weights, lse = topk_memory_read_ref(q, keys, values, k, scale, valid_len)
    """
    _check_dtype(q)
    B, H, T, Hm, N, R, M = _memory_layout(q, keys)
    Dv = values.shape[-1]
    if B * H * T == 0:
        return
    values_batch_stride = 0 if values.dim() == 3 else Hm * N * Dv
    with device_guard(q):
        topk_read_select(q, keys, valid_len, k, scale, indices, weights, lse)
        if Dv == 0:
            return
        constexprs, num_warps = _out_constexprs(Dv)
        num_row_blocks, programs = row_block_grid(R, constexprs["BLOCK_T"], B * Hm)
        topk_read_fwd_out_kernel[(programs, triton.cdiv(Dv, constexprs["BLOCK_DV"]))](
            values, indices, weights, out, R, N, Dv, k, Hm, values_batch_stride, num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )


def topk_read_select(q, keys, valid_len, k, scale, indices, weights, lse) -> None:
    """The selection half of :func:`topk_read_fwd`: ``indices``, ``weights`` and ``lse`` only.

    Same arguments and outputs as :func:`topk_read_fwd` without ``values`` and ``out`` (used by
    the fused memory attention, which gathers the values itself). Records the path taken in
    ``last_forward_path``.
    """
    _check_dtype(q)
    B, H, T, Hm, N, R, M = _memory_layout(q, keys)
    Dk = q.shape[-1]
    if B * H * T == 0:
        return
    if not 1 <= k <= min(N, MAX_K):
        raise ValueError(f"k: expected 1 <= k <= min(N, {MAX_K}) = {min(N, MAX_K)}, got {k}")
    path = os.environ.get(PATH_ENV, DEFAULT_PATH) or DEFAULT_PATH
    if path not in PATHS:
        raise ValueError(f"{PATH_ENV}: expected one of {PATHS}, got {path!r}")
    keys_batch_stride = 0 if keys.dim() == 3 else Hm * N * Dk
    global last_forward_path
    with device_guard(q):
        last_forward_path = path  # a threshold path refines it to "<path>+stream" on CPU tensors
        threshold_select = _THRESHOLD_SELECTS.get(path)
        if threshold_select is None or not threshold_select(q, keys, valid_len, k, scale, indices, weights, lse,
                                                            B, Hm, N, R, Dk, keys_batch_stride):
            _stream_select(q, keys, valid_len, k, scale, indices, weights, lse, B, Hm, N, R, Dk,
                           keys_batch_stride)
            last_forward_path = "stream" if path == "stream" else f"{path}->stream"


def _stream_select(q, keys, valid_len, k, scale, indices, weights, lse, B, Hm, N, R, Dk, keys_batch_stride,
                   count=None, cap=0):
    """indices, weights and lse by the running top-k select kernel: every row, or with ``count``
    only the rows whose threshold-path candidate count passed ``cap`` (the exact fallback)."""
    has_valid_len = valid_len is not None
    constexprs, num_warps = _select_constexprs(k, Dk, q.dtype, has_valid_len, count is not None)
    num_row_blocks, programs = row_block_grid(R, constexprs["BLOCK_T"], B * Hm)
    # indices stands in for the valid_len / count pointers when there are none (never read).
    topk_read_fwd_select_kernel[(programs,)](
        q, keys, valid_len if has_valid_len else indices, indices, weights, lse,
        R, N, Dk, k, float(scale), Hm, keys_batch_stride, num_row_blocks,
        indices if count is None else count, int(cap),
        **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
    )


def _scan_launch(q, valid_len, indices, B, Hm, R, Dk):
    """(constexprs, num_warps, num_row_blocks, grid, valid_len argument) of the threshold paths'
    scoring passes; ``indices`` stands in for a missing valid_len (never read then)."""
    constexprs, num_warps = _scan_constexprs(Dk, q.dtype, valid_len is not None)
    num_row_blocks, programs = row_block_grid(R, constexprs["BLOCK_T"], B * Hm)
    valid_len_arg = indices if valid_len is None else valid_len
    return constexprs, num_warps, num_row_blocks, (programs,), valid_len_arg


def _candidate_buffers(R_total, cap, device):
    """(cand, count) of the threshold paths' collect kernels: (R_total, cap) and (R_total,) int64."""
    return (torch.empty((R_total, cap), dtype=torch.int64, device=device),
            torch.empty((R_total,), dtype=torch.int64, device=device))


def _finish_threshold(path, cand, count, cap, q, keys, valid_len, k, scale, indices, weights, lse, B, Hm, N, R,
                      Dk, keys_batch_stride):
    """The end of both threshold paths: the finish kernel sorts each row's candidates and writes its
    top k; when ``N > cap`` rows whose candidates did not fit (many exact ties, a NaN query row,
    fewer than k chunks holding existing slots) are served by the streaming kernel, whose blocks
    without such a row return at once. No device-to-host sync."""
    R_total = cand.shape[0]
    constexprs, num_warps = _finish_constexprs(k)
    topk_read_fwd_finish_kernel[(triton.cdiv(R_total, constexprs["BLOCK_T"]),)](
        cand, count, indices, weights, lse, R_total, k, **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
    )
    if N > cap:
        _stream_select(q, keys, valid_len, k, scale, indices, weights, lse, B, Hm, N, R, Dk,
                       keys_batch_stride, count=count, cap=cap)
        if not q.is_cuda:  # free to read back under the interpreter: record it for the tests
            global last_forward_path
            last_forward_path = f"{path}+stream" if int(count.max()) > cap else path


def _threshold_select(q, keys, valid_len, k, scale, indices, weights, lse, B, Hm, N, R, Dk,
                      keys_batch_stride) -> bool:
    """indices, weights and lse by the ``threshold`` path; False (nothing written) when it cannot.

    tau = the k-th largest of a row's chunk maxima (int64 keys of contiguous one-tile chunks)
    bounds the row's top k from below (exactly k chunks have a maximum >= tau, keys being
    distinct) and leaves at most k * BLOCK_N keys >= tau. When N <= cap every existing slot is a
    candidate (tau = INT64_MIN, no pass 1, no overflow possible). When fewer than k chunks exist
    tau bounds nothing: False before any launch. Otherwise rows whose candidate count passes cap
    are finished by the streaming kernel (no sync).
    """
    constexprs, num_warps, num_row_blocks, grid, valid_len_arg = _scan_launch(q, valid_len, indices, B, Hm, R, Dk)
    n_chunks = triton.cdiv(N, constexprs["BLOCK_N"])
    cap = threshold_capacity(k)
    if N > cap and n_chunks < k:
        return False
    R_total = B * Hm * R
    if N <= cap:
        tau = torch.full((R_total,), -(2**63), dtype=torch.int64, device=q.device)
    else:
        chunk_max = torch.empty((R_total, n_chunks), dtype=torch.int64, device=q.device)
        topk_read_fwd_chunkmax_kernel[grid](
            q, keys, valid_len_arg, chunk_max, R, N, Dk, float(scale), Hm, keys_batch_stride,
            num_row_blocks, n_chunks, **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
        tau = threshold_tau(chunk_max, k)
        del chunk_max
    cand, count = _candidate_buffers(R_total, cap, q.device)
    topk_read_fwd_collect_kernel[grid](
        q, keys, valid_len_arg, tau, cand, count, R, N, Dk, float(scale), Hm, keys_batch_stride,
        num_row_blocks, cap, **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
    )
    _finish_threshold("threshold", cand, count, cap, q, keys, valid_len, k, scale, indices, weights, lse,
                      B, Hm, N, R, Dk, keys_batch_stride)
    return True


def _strided_threshold_select(q, keys, valid_len, k, scale, indices, weights, lse, B, Hm, N, R, Dk,
                              keys_batch_stride) -> bool:
    """indices, weights and lse by the ``threshold-strided`` path; False (nothing written) when it
    cannot.

    tau = the k-th largest of a row's chunk maxima (float scores; :func:`chunk_groups`) bounds the
    row's top k from below: at least k chunks have a maximum >= tau, each attained by a key, so
    the row's k-th best score is >= tau; the scores >= tau are about ``k + k * k / n_chunks`` for
    random scores.
    When ``N <= cap`` or there are fewer than k chunks the streaming path serves better (every
    slot would be a candidate, or tau would bound nothing): False before any launch. Otherwise
    rows whose candidates overflow are finished by the streaming kernel (no sync).
    """
    constexprs, num_warps, num_row_blocks, grid, valid_len_arg = _scan_launch(q, valid_len, indices, B, Hm, R, Dk)
    group_tiles, n_groups = chunk_groups(N, constexprs["BLOCK_N"])
    n_chunks = n_groups * constexprs["BLOCK_N"]
    cap = threshold_capacity(k)
    if N <= cap or n_chunks < k:
        return False
    R_total = B * Hm * R
    chunk_max = torch.empty((R_total, n_chunks), dtype=torch.float32, device=q.device)
    topk_read_fwd_strided_chunkmax_kernel[grid](
        q, keys, valid_len_arg, chunk_max, R, N, Dk, float(scale), Hm, keys_batch_stride,
        num_row_blocks, group_tiles, n_groups, **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
    )
    tau = torch.empty((R_total,), dtype=torch.float32, device=q.device)
    kth_constexprs, kth_warps = _kth_constexprs(n_chunks)
    topk_read_fwd_kth_kernel[(triton.cdiv(R_total, kth_constexprs["BLOCK_T"]),)](
        chunk_max, tau, R_total, n_chunks, k, **kth_constexprs, num_warps=kth_warps, **COMPILE_OPTIONS,
    )
    del chunk_max
    cand, count = _candidate_buffers(R_total, cap, q.device)
    topk_read_fwd_strided_collect_kernel[grid](
        q, keys, valid_len_arg, tau, cand, count, R, N, Dk, float(scale), Hm, keys_batch_stride,
        num_row_blocks, cap, **_collect_constexprs(constexprs), num_warps=num_warps, **COMPILE_OPTIONS,
    )
    _finish_threshold("threshold-strided", cand, count, cap, q, keys, valid_len, k, scale, indices, weights,
                      lse, B, Hm, N, R, Dk, keys_batch_stride)
    return True


_THRESHOLD_SELECTS = {"threshold": _threshold_select, "threshold-strided": _strided_threshold_select}


def slot_reduce_bwd(q, dout, weights, ds, indices, scale, Hm, N, shared, dkeys, dvalues) -> None:
    """Deterministic slot gradients: ``topk_read_bwd_slot_kernel`` sums each slot's entries in a
    fixed order (entries grouped by :func:`.plan.slot_runs`), writing every row of ``dkeys`` and
    ``dvalues`` (zeros for untouched slots). Used by the top-k read and the fused memory attention.

    Args:
        q:       (B, H, T, Dk) x, the queries (Dk may be the kernels' padded width).
        dout:    (B, H, T, Dv) x.
        weights: (B, H, T, k) float32, each entry's coefficient of ``dout`` in ``dvalues``.
        ds:      (B*H*T*k,) float32, each entry's coefficient of ``scale * q`` in ``dkeys``.
        indices: (B, H, T, k) int64, slots in [0, N) (others contribute nothing).
        scale:   python float.   Hm, N: memory heads and slots.   shared: memories (Hm, N, .).
        dkeys:   (B or nothing, Hm, N, Dk) x, written.   dvalues: (B or nothing, Hm, N, Dv) x, written.

    Equivalent PyTorch:
        dkeys.index_add_(slot, scale * ds * q);  dvalues.index_add_(slot, weights * dout)
    """
    B, H, T, Dk = q.shape
    Dv = dout.shape[-1]
    M = Hm if shared else B * Hm
    entry_order, entry_rows, run_starts = slot_runs(indices, Hm, N, shared)
    constexprs, num_warps = _slot_constexprs(Dk, Dv)
    topk_read_bwd_slot_kernel[(M * N,)](
        q, dout, weights, ds, entry_order, entry_rows, run_starts, dkeys, dvalues, Dk, Dv, float(scale),
        **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
    )


def topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic,
                  dq, dkeys, dvalues) -> None:
    """Gradients of :func:`topk_read_fwd` in q, keys and values (sparse: only selected slots).

    Args:
        dout:      (B, H, T, Dv) x.   dweights: (B, H, T, k) float32.   dlse: (B, H, T) float32.
        q, keys, values: as in the forward.   indices, weights: the forward's outputs.
        scale:     python float.
        deterministic: True -> bitwise reproducible (slot-owner reduction, no float atomics);
                   False -> float32 atomics into the slot gradients.
        dq:        like q, written.   dkeys: like keys, written.   dvalues: like values, written
                   (zeros at slots no query selected; shared memories sum over the batch).

    Equivalent PyTorch (rows j with index -1 contribute nothing):
        dw = dweights + (dout[..., None, :] * values_h[indices]).sum(-1)
        ds = weights * (dw - (weights * dw).sum(-1, keepdim=True) + dlse[..., None])
        dq = scale * (ds[..., None] * keys_h[indices]).sum(-2)
        dkeys.index_add_(slot, scale * ds * q);  dvalues.index_add_(slot, weights * dout)
    """
    _check_dtype(q)
    B, H, T, Hm, N, R, M = _memory_layout(q, keys)
    Dk, Dv, k = q.shape[-1], values.shape[-1], indices.shape[-1]
    shared = keys.dim() == 3
    if B * H * T == 0:
        dkeys.zero_()
        dvalues.zero_()
        return
    keys_batch_stride = 0 if shared else Hm * N * Dk
    values_batch_stride = 0 if shared else Hm * N * Dv
    E = B * H * T * k
    device = q.device
    dw = torch.empty(E, dtype=torch.float32, device=device)
    atomic = not deterministic
    if atomic:
        dkeys_acc, dvalues_acc = f32_accumulator(dkeys), f32_accumulator(dvalues)
        ds = dw  # not written in atomic mode
    else:
        ds = torch.empty(E, dtype=torch.float32, device=device)
        dkeys_acc = dvalues_acc = ds  # float32 stand-ins, never touched in this mode

    with device_guard(q):
        constexprs, num_warps = _dweights_constexprs(Dv, atomic)
        num_row_blocks, programs = row_block_grid(R, constexprs["BLOCK_T"], B * Hm)
        topk_read_bwd_dweights_kernel[(programs,)](
            dout, values, indices, weights, dweights, dw, dvalues_acc,
            R, N, Dv, k, Hm, values_batch_stride, num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
        constexprs, num_warps = _dq_constexprs(Dk, atomic)
        num_row_blocks, programs = row_block_grid(R, constexprs["BLOCK_T"], B * Hm)
        topk_read_bwd_dq_kernel[(programs,)](
            q, keys, indices, weights, dw, dlse, dq, dkeys_acc, ds,
            R, N, Dk, k, float(scale), Hm, keys_batch_stride, num_row_blocks,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
        if not atomic:
            slot_reduce_bwd(q, dout, weights, ds, indices, scale, Hm, N, shared, dkeys, dvalues)
    if atomic:
        store_accumulated(dkeys, dkeys_acc)
        store_accumulated(dvalues, dvalues_acc)


# ---------------------------------------------------------------------------------------------
# Production configurations, for the compile check (tools/triton_check.py)
# ---------------------------------------------------------------------------------------------

COMPILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPILE_HEAD_DIMS = (64, 128)
# One k per K_PAD the launcher can pick (16 .. 256).
COMPILE_KS = (16, 32, 64, 128, 256)
# Chunk counts the k-th-largest kernel is compiled for: the float32 scan tile's smallest,
# read-heads-gpu and read-gpu (MAX_CHUNKS, every N beyond).
KTH_COMPILE_CHUNKS = (32, 256, MAX_CHUNKS)

# Integer arguments that production shapes do not make multiples of 16 (the JIT does not specialize
# them), by kernel (None: every other kernel).
_ANY_INTS = {
    None: ("k", "Hm", "num_row_blocks", "group_tiles", "n_groups"),
    topk_read_fwd_chunkmax_kernel: ("k", "Hm", "num_row_blocks", "n_chunks"),
}

# Runtime arguments of each kernel, in order, by role (see _triton_lib.argument_types). The
# launchers pass exactly these positionally; _build_compile_configs checks the names against the
# kernels.
_KERNEL_ARGS = {
    topk_read_fwd_select_kernel: (("q", "x"), ("keys", "x"), ("valid_len", "i64"), ("indices", "i64"),
                                  ("weights", "f32"), ("lse", "f32"), ("R", "int"), ("N", "int"),
                                  ("Dk", "int"), ("k", "int"), ("scale", "float"), ("Hm", "int"),
                                  ("keys_batch_stride", "int"), ("num_row_blocks", "int"),
                                  ("count", "i64"), ("cap", "int")),
    topk_read_fwd_chunkmax_kernel: (("q", "x"), ("keys", "x"), ("valid_len", "i64"), ("chunk_max", "i64"),
                                    ("R", "int"), ("N", "int"), ("Dk", "int"), ("scale", "float"),
                                    ("Hm", "int"), ("keys_batch_stride", "int"), ("num_row_blocks", "int"),
                                    ("n_chunks", "int")),
    topk_read_fwd_collect_kernel: (("q", "x"), ("keys", "x"), ("valid_len", "i64"), ("tau", "i64"),
                                   ("cand", "i64"), ("count", "i64"), ("R", "int"), ("N", "int"),
                                   ("Dk", "int"), ("scale", "float"), ("Hm", "int"),
                                   ("keys_batch_stride", "int"), ("num_row_blocks", "int"), ("cap", "int")),
    topk_read_fwd_strided_chunkmax_kernel: (("q", "x"), ("keys", "x"), ("valid_len", "i64"),
                                            ("chunk_max", "f32"), ("R", "int"), ("N", "int"), ("Dk", "int"),
                                            ("scale", "float"), ("Hm", "int"), ("keys_batch_stride", "int"),
                                            ("num_row_blocks", "int"), ("group_tiles", "int"),
                                            ("n_groups", "int")),
    topk_read_fwd_strided_collect_kernel: (("q", "x"), ("keys", "x"), ("valid_len", "i64"), ("tau", "f32"),
                                           ("cand", "i64"), ("count", "i64"), ("R", "int"), ("N", "int"),
                                           ("Dk", "int"), ("scale", "float"), ("Hm", "int"),
                                           ("keys_batch_stride", "int"), ("num_row_blocks", "int"),
                                           ("cap", "int")),
    topk_read_fwd_kth_kernel: (("chunk_max", "f32"), ("tau", "f32"), ("R_total", "int"), ("n_chunks", "int"),
                               ("k", "int")),
    topk_read_fwd_finish_kernel: (("cand", "i64"), ("count", "i64"), ("indices", "i64"), ("weights", "f32"),
                                  ("lse", "f32"), ("R_total", "int"), ("k", "int")),
    topk_read_fwd_out_kernel: (("values", "x"), ("indices", "i64"), ("weights", "f32"), ("out", "x"),
                               ("R", "int"), ("N", "int"), ("Dv", "int"), ("k", "int"), ("Hm", "int"),
                               ("values_batch_stride", "int"), ("num_row_blocks", "int")),
    topk_read_bwd_dweights_kernel: (("dout", "x"), ("values", "x"), ("indices", "i64"), ("weights", "f32"),
                                    ("dweights", "f32"), ("dw", "f32"), ("dvalues_acc", "f32"),
                                    ("R", "int"), ("N", "int"), ("Dv", "int"), ("k", "int"),
                                    ("Hm", "int"), ("values_batch_stride", "int"), ("num_row_blocks", "int")),
    topk_read_bwd_dq_kernel: (("q", "x"), ("keys", "x"), ("indices", "i64"), ("weights", "f32"),
                              ("dw", "f32"), ("dlse", "f32"), ("dq", "x"), ("dkeys_acc", "f32"),
                              ("ds", "f32"), ("R", "int"), ("N", "int"), ("Dk", "int"), ("k", "int"),
                              ("scale", "float"), ("Hm", "int"), ("keys_batch_stride", "int"),
                              ("num_row_blocks", "int")),
    topk_read_bwd_slot_kernel: (("q", "x"), ("dout", "x"), ("weights", "f32"), ("ds", "f32"),
                                ("entry_order", "i64"), ("entry_rows", "i64"), ("run_starts", "i64"),
                                ("dkeys", "x"), ("dvalues", "x"), ("Dk", "int"), ("Dv", "int"),
                                ("scale", "float")),
}


def _production_constexprs(kernel, dtype):
    """[(constexprs, num_warps, head_dim, k or None)] the launchers pick for production shapes."""
    picks = []
    for D in COMPILE_HEAD_DIMS:
        if kernel is topk_read_fwd_select_kernel:
            for k in COMPILE_KS:
                # valid_len given or not: both are production paths.
                for has_valid_len in (False, True):
                    for only_overflow in (False, True):
                        picks.append((*_select_constexprs(k, D, dtype, has_valid_len, only_overflow), D, k))
        elif kernel in (topk_read_fwd_chunkmax_kernel, topk_read_fwd_collect_kernel,
                        topk_read_fwd_strided_chunkmax_kernel):
            for has_valid_len in (False, True):
                picks.append((*_scan_constexprs(D, dtype, has_valid_len), D, None))
        elif kernel is topk_read_fwd_strided_collect_kernel:
            for has_valid_len in (False, True):
                constexprs, num_warps = _scan_constexprs(D, dtype, has_valid_len)
                picks.append((_collect_constexprs(constexprs), num_warps, D, None))
        elif kernel is topk_read_fwd_kth_kernel:
            # Its tile follows the number of chunks (chunk_groups: BLOCK_N per group of tiles).
            for n_chunks in KTH_COMPILE_CHUNKS:
                picks.append((*_kth_constexprs(n_chunks), D, None))
        elif kernel is topk_read_fwd_finish_kernel:
            for k in COMPILE_KS:
                picks.append((*_finish_constexprs(k), D, k))
        elif kernel is topk_read_fwd_out_kernel:
            picks.append((*_out_constexprs(D), D, None))
        elif kernel is topk_read_bwd_dweights_kernel:
            for atomic in (True, False):
                picks.append((*_dweights_constexprs(D, atomic), D, None))
        elif kernel is topk_read_bwd_dq_kernel:
            for atomic in (True, False):
                picks.append((*_dq_constexprs(D, atomic), D, None))
        else:
            picks.append((*_slot_constexprs(D, D), D, None))
    return picks


_LABELS = {"HAS_VALID_LEN": "VL", "ONLY_OVERFLOW": "OVF", "ATOMIC": "ATOMIC", "BATCH": "BA", "BLOCK_T": "BT",
           "K_PAD": "KP", "BLOCK_N": "BN", "BLOCK_E": "BE", "CAP": "CAP", "BLOCK_C": "BC"}


def _build_compile_configs() -> list[dict]:
    """One entry per distinct (kernel, dtype, constexprs) the launchers pick for production shapes.

    Entry keys: as read by tools.triton_check (kernel, signature, constexprs, num_warps,
    options, divisible_by_16, label, allow_spills). The GPU path never takes the interpreter-only
    bfloat16 upcast, so F32_DOT is set here as on a GPU (float32 only).
    """
    configs = []
    for kernel, args in _KERNEL_ARGS.items():
        names = constexpr_names(kernel, args)
        # Pointers are 16-byte aligned; head sizes, strides and row counts of the production
        # shapes are multiples of 16 (the JIT specializes them so).
        any_ints = _ANY_INTS.get(kernel, _ANY_INTS[None])
        divisible_ints = [name for name, role in args if role == "int" and name not in any_ints]
        # A kernel without input-dtype pointers compiles the same for every dtype.
        dtypes = COMPILE_DTYPES if any(role == "x" for _, role in args) else COMPILE_DTYPES[:1]
        for dtype in dtypes:
            types = argument_types(dtype)
            seen = {}
            for constexprs, num_warps, D, k in _production_constexprs(kernel, dtype):
                if "F32_DOT" in constexprs:
                    constexprs = dict(constexprs, F32_DOT=dtype == torch.float32)
                if sorted(constexprs) != sorted(names):
                    raise AssertionError(f"constexprs {sorted(constexprs)} do not match {kernel.__name__}")
                key = (tuple(constexprs.items()), num_warps)
                if key in seen:
                    seen[key]["head_dims"].append(D)
                    continue
                # The overflow fallback of the threshold paths runs only for rows whose
                # candidates did not fit (ties, sorted scores, NaN rows); a few of its variants
                # spill 8-32 bytes (Triton 3.9: e.g. fp16 D=64 k=64 on sm_80, fp32 D=128 k=128
                # on sm_90): allowed, reported by the compile check. So does the threshold
                # path's 16-bit collect kernel at its [128, 64] tile (16-40 bytes, see
                # _SCAN_TILES), and so do some float32 scan kernels of the threshold-strided
                # path, where ptxas stops at 80-128 registers and spills 8-24 bytes (sm_80,
                # D=64 and D=128, Triton 3.3 to 3.9; float32 scores run on the FMA units, no
                # TF32).
                allow_spills = (bool(constexprs.get("ONLY_OVERFLOW", False))
                                or (kernel is topk_read_fwd_collect_kernel and dtype != torch.float32)
                                or (kernel in (topk_read_fwd_strided_chunkmax_kernel,
                                               topk_read_fwd_strided_collect_kernel)
                                    and dtype == torch.float32))
                seen[key] = compile_entry(kernel, args, types, constexprs, num_warps, divisible_ints=divisible_ints,
                                          head_dims=[D], k=k, allow_spills=allow_spills)
                configs.append(seen[key])
            for entry in seen.values():
                k = entry.pop("k")
                sizes = "D=" + ",".join(map(str, entry.pop("head_dims"))) + ("" if k is None else f" k={k}")
                entry["label"] = config_label(dtype, sizes, entry["constexprs"], _LABELS)
    return configs


# Kernels decorated under the interpreter have no compile path; they still get the list (the
# check refuses them with a clear message) because it is pure data.
COMPILE_CONFIGS = _build_compile_configs()
