"""Triton kernels and launchers for ``gated_memory_write`` and ``gated_dense_update`` (SPEC section 3).

The launchers implement the GPU interface that ``function.py`` documents above ``_gpu_kernels`` and
``_fused_dense_fwd`` (shared with the cuda and cpu backends): inputs flat and contiguous (the write) or 4-D
strided views (the dense update), outputs preallocated and passed last, ``None`` returned.

Gated memory write
------------------
Shapes (``G = B * Hm`` memories, ``P = T * kw`` writes per memory, ``E = G * P`` entries, entry
``e = g * P + t * kw + j``): memory / out ``(G, N, D)``, indices and weights ``(G, T, kw)``, add
``(G, T, D)``, erase ``(G, T, D)`` or ``(G, T, 1)``.

The writes of one slot compose into a chain ``m <- m * (1 - w * e) + w * add`` that no other slot
sees, so the work is split by slot, never by step: ``plan.write_plan`` sorts the entries by
``(g, slot)`` on the device (stably, so in ``(t, j)`` order within a slot) and marks the first
position of each slot's run with the run's length. Both kernels launch one program per sorted
position (axis 0, ``E``) and per ``BLOCK_D`` column tile (axis 1); a program at a position whose
``run_length`` is 0 does nothing, the others own their slot: they load its row once, walk the run
in order in float32 and store the row once. Programs own disjoint (slot, columns) tiles: no
races, no atomics, bitwise deterministic. Unwritten slots are never stored to (``out`` is a copy of
memory, or memory itself in the in-place path).

Forward, equivalent PyTorch (per run, ``row = g * N + slot``)::

    m = memory[row].float()
    for e in order[i : i + run_length[i]]:
        m = m * (1 - weights.flat[e] * erase_row(e)) + weights.flat[e] * add_row(e)   # same op order
    out[row] = m.to(out.dtype)

Backward. Each program recomputes its run's chain for its column tile, storing the state before
each write (``m_prev``) in the entry's row of ``add_parts`` (float32 scratch that the launcher
receives zeroed), then walks the run in reverse from ``dm = dnew[row]``::

    dweights[e]   = sum_d dm * (add - erase * m_prev)
    add_parts[e]  = w * dm                                   # overwrites m_prev
    erase_parts[e] = -w * m_prev * dm   (erase (G, T, D));   -w * sum_d m_prev * dm   (erase (G, T, 1))
    dm            = (1 - w * erase) * dm
    dmemory[row]  = dm                                       # after the first write of the run

``function.py`` then sums the parts over the ``kw`` entries of each step, in ``j`` order. The
reverse walk reads back rows that the forward walk of the same program stored; a barrier between
the two walks makes those stores visible to every thread of the program (a thread may read an
element another thread stored when the row tile is narrower than the program's threads).

``dweights`` and the erase part of a per-slot erase gate need the sum over all of ``D``. Up to
``MAX_BLOCK_D`` columns one program covers the row and writes them directly; wider rows are split
over column tiles (``SPLIT_D``), each program writes its partial sums into float32 scratch
``(E, tiles)`` and the launcher sums them over the tiles with ``torch.sum`` (a fixed reduction:
still deterministic, and no float atomics). Skipped entries (``-1``) belong to no run: their
``dweights`` and parts stay at the zeros they arrive with, and their weights are never read (a NaN
there has no effect).

Gated dense update
------------------
``out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update)`` on 4-D views of the
broadcast shape, each operand read through its own strides (0 where broadcast), so nothing is
materialised. The launcher first drops size-1 dimensions and merges adjacent dimensions wherever
every operand's strides allow (``_dense_layout``: all-contiguous operands become one row of
``numel`` elements, memory ``(B, Hm, N, D)`` with gates ``(B, Hm, N, 1)`` becomes
``(B * Hm * N, D)``), giving sizes ``(S0, S1, S2, S3)``. A program covers one ``(i0, i1)`` plane's
``BLOCK_R`` rows of ``S2`` by ``BLOCK_C`` columns of ``S3``; the program id is decomposed once,
in scalars, so no lane divides, and every operand's offset is
``i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3`` in int64. ``out`` and the four float32 gradients are
contiguous (their flat index survives the merges). Backward::

    dmemory = dout * sf;  dupdate = dout * si * sech^2(u)
    dinput_gate = dout * tanh(u) * si * (1 - si);  dforget_gate = dout * memory * sf * (1 - sf)

with ``s`` and ``1 - s`` both from ``z = exp(-|x|)`` (no cancellation in ``1 - s``) and
``tanh``/``sech^2`` from ``t = exp(-2|u|)``: no overflow for any input, a few ulp from the exact
values (Triton has no ``tanh`` in every supported version, and libdevice's module path differs
across versions and the interpreter).

Numerics: loads in the input dtype, computes in float32 (the triton backend serves float32,
float16 and bfloat16 only), stores in the output dtype (float32 for gradients and scratch).
Offsets are int64 (``G * N * D`` and the dense shapes can pass 2**31 elements). The write chain
follows the reference's operation order and rounds once at the end; compiled for a GPU, fused
multiply-adds (``enable_fp_fusion``) may change the last bits of a step against the reference
(under the interpreter float32 results match it bit for bit; the interpreter truncates float32
to bfloat16 where the GPU rounds to nearest).

``COMPILE_CONFIGS`` lists the configurations the launchers pick for the production dtypes and row
sizes; ``python -m tools.triton_check`` compiles them for sm_80/sm_90 without a GPU.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._triton_lib import COMPILE_OPTIONS, SIGNATURE_DTYPE, block_d, compile_entry, device_guard, pow2_at_least

__all__ = [
    "gated_memory_write_fwd",
    "gated_memory_write_bwd",
    "gated_dense_update_fwd",
    "gated_dense_update_bwd",
    "write_config",
    "dense_config",
    "COMPILE_CONFIGS",
]

# Widest column tile of one write program; wider rows use several column tiles (and, backward,
# partial sums). At 4 warps a 1024-wide tile is 8 float32 per thread and vector.
MAX_BLOCK_D = 1024
# Narrowest column tile (keeps the tile layouts ordinary for tiny D; masked lanes are free).
MIN_BLOCK_D = 16
# Column elements per thread a write program aims for: 8 (two 16-byte float32 vectors) keeps the
# per-step loads wide while leaving the small rows (D = 64, 128) one warp, so more runs are in
# flight per SM; the chains are latency bound, not bandwidth bound.
WRITE_ELEMENTS_PER_THREAD = 8
MAX_WRITE_WARPS = 4
# Elements per (BLOCK_R, BLOCK_C) tile of the dense update kernels at DENSE_WARPS warps: 8 per
# thread and tensor forward, 4 backward (five input and four output tiles; at 8 ptxas (Triton 3.9,
# sm_80) spills 16 bytes for the (B, Hm, N, 64) float32 layout). A strided operand needs one int64
# address per element.
DENSE_TILE_ELEMENTS_FWD = 1024
DENSE_TILE_ELEMENTS_BWD = 512
DENSE_WARPS = 4

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Kernels: gated memory write
# ---------------------------------------------------------------------------------------------

@triton.jit
def _write_step(entry, weights, add, erase, o_d, m_d, D, KW, ERASE_PER_SLOT: tl.constexpr):
    """(w, erase, add) of one entry in float32: erase [BD], or a scalar for an erase (G, T, 1)."""
    b_w = tl.load(weights + entry).to(tl.float32)
    step_row = entry // KW  # the (g, t) row of add and erase
    # [BD]
    b_add = tl.load(add + step_row * D + o_d, mask=m_d, other=0.).to(tl.float32)
    if ERASE_PER_SLOT:
        b_erase = tl.load(erase + step_row).to(tl.float32)
    else:
        b_erase = tl.load(erase + step_row * D + o_d, mask=m_d, other=0.).to(tl.float32)
    return b_w, b_erase, b_add


@triton.jit
def _run_position(run_length):
    """(plan position, column tile, run length there: 0 unless a run starts at it) of this program."""
    i_pos = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    return i_pos, i_d, tl.load(run_length + i_pos)


@triton.jit
def _run_columns(order, indices, i_pos, i_d, N, D, P, BLOCK_D: tl.constexpr):
    """(element offset of the run's memory row, columns o_d [BD] of the tile, their mask)."""
    first_entry = tl.load(order + i_pos)
    slot = tl.load(indices + first_entry).to(tl.int64)
    row = (first_entry // P * N + slot) * D
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return row, o_d, o_d < D


@triton.jit
def _apply_run(memory, weights, add, erase, order, pre_states, i_pos, length, row, o_d, m_d, D, KW,
               ERASE_PER_SLOT: tl.constexpr, KEEP_PRE_STATES: tl.constexpr):
    """[BD] float32: the run's slot after its writes in plan order, from memory's row. With
    KEEP_PRE_STATES each entry's row of ``pre_states`` gets the slot as that write found it;
    without, ``pre_states`` is not touched."""
    b_m = tl.load(memory + row + o_d, mask=m_d, other=0.).to(tl.float32)
    for k in range(0, length):
        entry = tl.load(order + i_pos + k)
        b_w, b_erase, b_add = _write_step(entry, weights, add, erase, o_d, m_d, D, KW, ERASE_PER_SLOT)
        if KEEP_PRE_STATES:
            tl.store(pre_states + entry * D + o_d, b_m, mask=m_d)
        # The reference's operation order: m * (1 - w * e) + w * add.
        b_m = b_m * (1. - b_w * b_erase) + b_w * b_add
    return b_m


@triton.jit
def gated_memory_write_fwd_kernel(
    memory,  # [G, N, D] x
    indices,  # [G, T, kw] int32 / int64
    weights,  # [G, T, kw] x
    add,  # [G, T, D] x
    erase,  # [G, T, D] or [G, T, 1] x
    order,  # [E] int64, entries sorted by (g, slot)
    run_length,  # [E] int32, the run's length at its first position, else 0
    out,  # [G, N, D] x, the written slots stored (may be memory itself)
    N,
    D,
    P,  # T * kw, entries per memory
    KW,
    ERASE_PER_SLOT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (E, cdiv(D, BLOCK_D)): position i of the plan, column tile i_d."""
    i_pos, i_d, length = _run_position(run_length)
    if length > 0:
        row, o_d, m_d = _run_columns(order, indices, i_pos, i_d, N, D, P, BLOCK_D)
        # Read from memory, not out: the same values (out is a copy, or memory itself) and no
        # dependence on the copy having reached this row.
        b_m = _apply_run(memory, weights, add, erase, order, out, i_pos, length, row, o_d, m_d, D, KW,
                         ERASE_PER_SLOT, False)
        tl.store(out + row + o_d, b_m.to(out.dtype.element_ty), mask=m_d)


@triton.jit
def gated_memory_write_bwd_kernel(
    dnew,  # [G, N, D] x
    memory,  # [G, N, D] x
    indices,  # [G, T, kw] int32 / int64
    weights,  # [G, T, kw] x
    add,  # [G, T, D] x
    erase,  # [G, T, D] or [G, T, 1] x
    order,  # [E] int64
    run_length,  # [E] int32
    dmemory,  # [G, N, D] x, a copy of dnew; the written slots stored
    dweights,  # [G, T, kw] x, zeroed; written when not SPLIT_D
    add_parts,  # [E, D] fp32, zeroed: m_prev, then w * dm
    erase_parts,  # [E, D] or [E, 1] fp32, zeroed
    dweight_partials,  # [E, tiles] fp32, zeroed (SPLIT_D only)
    erase_partials,  # [E, tiles] fp32, zeroed (SPLIT_D and ERASE_PER_SLOT only)
    N,
    D,
    P,
    KW,
    ERASE_PER_SLOT: tl.constexpr,
    SPLIT_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (E, cdiv(D, BLOCK_D)); SPLIT_D when that is more than one column tile."""
    i_pos, i_d, length = _run_position(run_length)
    if length > 0:
        row, o_d, m_d = _run_columns(order, indices, i_pos, i_d, N, D, P, BLOCK_D)
        # The chain forward, keeping each write's pre-state in its entry's add_parts row.
        _apply_run(memory, weights, add, erase, order, add_parts, i_pos, length, row, o_d, m_d, D, KW,
                   ERASE_PER_SLOT, True)
        # Makes the pre-states visible to every thread of the program (a replicated element is
        # stored by one thread and loaded by all of its holders).
        tl.debug_barrier()

        # The chain in reverse, carrying dm.
        # [BD]
        b_dm = tl.load(dnew + row + o_d, mask=m_d, other=0.).to(tl.float32)
        for k in range(0, length):
            entry = tl.load(order + i_pos + (length - 1 - k))
            b_w, b_erase, b_add = _write_step(entry, weights, add, erase, o_d, m_d, D, KW, ERASE_PER_SLOT)
            p_part = add_parts + entry * D + o_d
            b_m_prev = tl.load(p_part, mask=m_d, other=0.)
            # Masked columns hold zeros in every operand: they add nothing to the sums.
            b_dweight = tl.sum(b_dm * (b_add - b_erase * b_m_prev), axis=0)
            if ERASE_PER_SLOT:
                b_derase = -b_w * tl.sum(b_m_prev * b_dm, axis=0)
                if SPLIT_D:
                    tl.store(erase_partials + entry * tl.num_programs(1) + i_d, b_derase)
                else:
                    tl.store(erase_parts + entry, b_derase)
            else:
                tl.store(erase_parts + entry * D + o_d, -b_w * b_m_prev * b_dm, mask=m_d)
            if SPLIT_D:
                tl.store(dweight_partials + entry * tl.num_programs(1) + i_d, b_dweight)
            else:
                tl.store(dweights + entry, b_dweight.to(dweights.dtype.element_ty))
            tl.store(p_part, b_w * b_dm, mask=m_d)
            b_dm = (1. - b_w * b_erase) * b_dm
        tl.store(dmemory + row + o_d, b_dm.to(dmemory.dtype.element_ty), mask=m_d)


# ---------------------------------------------------------------------------------------------
# Kernels: gated dense update
# ---------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid_pair(b_x):
    # (sigmoid(x), 1 - sigmoid(x)) from z = exp(-|x|) in (0, 1]: one exp, no overflow for any x,
    # and 1 - sigmoid(x) without the cancellation of subtracting from 1. NaN stays NaN.
    b_z = tl.exp(-tl.abs(b_x))
    b_r = 1. / (1. + b_z)
    b_positive = b_x >= 0.
    return tl.where(b_positive, b_r, b_z * b_r), tl.where(b_positive, b_z * b_r, b_r)


@triton.jit
def _tanh_sech2(b_x):
    """(tanh(x), 1 - tanh(x)^2) from t = exp(-2|x|) in (0, 1]: no overflow, a few ulp.

    tanh|x| = (1 - t) / (1 + t) and sech^2 x = 4 t / (1 + t)^2. For small |x| (t > 1/2) the
    difference 1 - t cancels, so it is taken as -expm1(-2|x|) with Kahan's correction
    (1 - t) * y / log(t), y = -2|x|, which cancels the rounding error of t (and is 2|x| when t
    rounds to 1). NaN stays NaN; |x| = inf gives exactly +-1 and 0.
    """
    b_a = tl.abs(b_x)
    b_y = -2. * b_a
    b_t = tl.exp(b_y)
    b_one_minus_t = 1. - b_t
    # The log only of t in (1/2, 1), so no lane divides by log(1) = 0 or takes log(0).
    b_log_t = tl.log(tl.where((b_t > 0.5) & (b_t < 1.), b_t, 0.5))
    b_small = tl.where(b_t == 1., -b_y, b_one_minus_t * (b_y / b_log_t))
    b_num = tl.where(b_t > 0.5, b_small, b_one_minus_t)
    b_one_plus_t = 1. + b_t
    b_tanh_abs = b_num / b_one_plus_t
    b_tanh = tl.where(b_x < 0., -b_tanh_abs, b_tanh_abs)
    b_sech2 = 4. * b_t / (b_one_plus_t * b_one_plus_t)
    return b_tanh, b_sech2


@triton.jit
def _dense_tile(S1, S2, S3, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: (i0, i1) scalars, rows o_r of S2 and columns o_c of S3, the mask.

    The 1-D grid enumerates (i0, i1, row block, column block), column blocks fastest. The
    decomposition is scalar and in 32 bits (the grid has fewer than 2**31 programs), so no lane
    divides: each operand's offset is then i0 * s0 + i1 * s1 + o_r * s2 + o_c * s3 (int64).
    """
    i_prog = tl.program_id(0)
    num_col_blocks = tl.cdiv(S3, BLOCK_C)
    num_row_blocks = tl.cdiv(S2, BLOCK_R)
    i_c = i_prog % num_col_blocks
    i_rest = i_prog // num_col_blocks
    i_r = i_rest % num_row_blocks
    i_plane = i_rest // num_row_blocks
    i0 = (i_plane // S1).to(tl.int64)
    i1 = (i_plane % S1).to(tl.int64)
    o_r = i_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_c = i_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_rc = (o_r < S2)[:, None] & (o_c < S3)[None, :]
    return i0, i1, o_r, o_c, m_rc


@triton.jit
def _dense_load(base, i0, i1, o_r, o_c, m_rc, s0, s1, s2, s3):
    # [BR, BC] tile of one operand by its own strides (0 where broadcast), as float32.
    p_tile = base + (i0 * s0 + i1 * s1) + (o_r[:, None] * s2 + o_c[None, :] * s3)
    return tl.load(p_tile, mask=m_rc, other=0.).to(tl.float32)


@triton.jit
def gated_dense_update_fwd_kernel(
    memory,  # [S0, S1, S2, S3] x, strides m_s*
    update,  # x, strides u_s*
    input_gate,  # x, strides i_s*
    forget_gate,  # x, strides f_s*
    out,  # [S0, S1, S2, S3] x, contiguous, written
    S1,
    S2,
    S3,
    m_s0, m_s1, m_s2, m_s3,
    u_s0, u_s1, u_s2, u_s3,
    i_s0, i_s1, i_s2, i_s3,
    f_s0, f_s1, f_s2, f_s3,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (S0 * S1 * cdiv(S2, BLOCK_R) * cdiv(S3, BLOCK_C),)."""
    i0, i1, o_r, o_c, m_rc = _dense_tile(S1, S2, S3, BLOCK_R, BLOCK_C)
    # [BR, BC]
    b_m = _dense_load(memory, i0, i1, o_r, o_c, m_rc, m_s0, m_s1, m_s2, m_s3)
    b_u = _dense_load(update, i0, i1, o_r, o_c, m_rc, u_s0, u_s1, u_s2, u_s3)
    b_i = _dense_load(input_gate, i0, i1, o_r, o_c, m_rc, i_s0, i_s1, i_s2, i_s3)
    b_f = _dense_load(forget_gate, i0, i1, o_r, o_c, m_rc, f_s0, f_s1, f_s2, f_s3)
    b_sf, _ = _sigmoid_pair(b_f)
    b_si, _ = _sigmoid_pair(b_i)
    b_tanh, _ = _tanh_sech2(b_u)
    b_out = b_sf * b_m + b_si * b_tanh
    o_flat = ((i0 * S1 + i1) * S2 + o_r)[:, None] * S3 + o_c[None, :]
    tl.store(out + o_flat, b_out.to(out.dtype.element_ty), mask=m_rc)


@triton.jit
def gated_dense_update_bwd_kernel(
    dout,  # [S0, S1, S2, S3] x, contiguous
    memory,  # x, strides m_s*
    update,  # x, strides u_s*
    input_gate,  # x, strides i_s*
    forget_gate,  # x, strides f_s*
    dmemory,  # [S0, S1, S2, S3] fp32, contiguous, written
    dupdate,  # fp32, contiguous, written
    dinput_gate,  # fp32, contiguous, written
    dforget_gate,  # fp32, contiguous, written
    S1,
    S2,
    S3,
    m_s0, m_s1, m_s2, m_s3,
    u_s0, u_s1, u_s2, u_s3,
    i_s0, i_s1, i_s2, i_s3,
    f_s0, f_s1, f_s2, f_s3,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (S0 * S1 * cdiv(S2, BLOCK_R) * cdiv(S3, BLOCK_C),)."""
    i0, i1, o_r, o_c, m_rc = _dense_tile(S1, S2, S3, BLOCK_R, BLOCK_C)
    o_flat = ((i0 * S1 + i1) * S2 + o_r)[:, None] * S3 + o_c[None, :]
    # [BR, BC]
    b_do = tl.load(dout + o_flat, mask=m_rc, other=0.).to(tl.float32)
    b_m = _dense_load(memory, i0, i1, o_r, o_c, m_rc, m_s0, m_s1, m_s2, m_s3)
    b_u = _dense_load(update, i0, i1, o_r, o_c, m_rc, u_s0, u_s1, u_s2, u_s3)
    b_i = _dense_load(input_gate, i0, i1, o_r, o_c, m_rc, i_s0, i_s1, i_s2, i_s3)
    b_f = _dense_load(forget_gate, i0, i1, o_r, o_c, m_rc, f_s0, f_s1, f_s2, f_s3)
    b_sf, b_one_minus_sf = _sigmoid_pair(b_f)
    b_si, b_one_minus_si = _sigmoid_pair(b_i)
    b_tanh, b_sech2 = _tanh_sech2(b_u)
    tl.store(dmemory + o_flat, b_do * b_sf, mask=m_rc)
    tl.store(dupdate + o_flat, b_do * b_si * b_sech2, mask=m_rc)
    tl.store(dinput_gate + o_flat, b_do * b_tanh * b_si * b_one_minus_si, mask=m_rc)
    tl.store(dforget_gate + o_flat, b_do * b_m * b_sf * b_one_minus_sf, mask=m_rc)


# ---------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and COMPILE_CONFIGS, so the two cannot drift)
# ---------------------------------------------------------------------------------------------

class WriteConfig(NamedTuple):
    block_d: int
    num_d_tiles: int
    num_warps: int


def write_config(D: int) -> WriteConfig:
    """Column tiling of the write kernels (forward and backward alike) for rows of ``D`` elements.

    ``BLOCK_D`` is the next power of two of ``D`` in ``[MIN_BLOCK_D, MAX_BLOCK_D]``; rows wider
    than ``MAX_BLOCK_D`` take several column tiles. Warps: enough for about
    ``WRITE_ELEMENTS_PER_THREAD`` columns per thread, 1 to ``MAX_WRITE_WARPS``. Deterministic (no
    autotuning): a fixed choice keeps runs reproducible, and each column is computed by the same
    code whichever tile holds it.
    """
    block_cols = block_d(D, MAX_BLOCK_D, MIN_BLOCK_D)
    num_warps = max(1, min(MAX_WRITE_WARPS, block_cols // (32 * WRITE_ELEMENTS_PER_THREAD)))
    return WriteConfig(block_cols, triton.cdiv(max(int(D), 1), block_cols), num_warps)


def _write_constexprs(D: int, erase_per_slot: bool, backward: bool) -> tuple[dict, int, int]:
    """(constexprs, num_warps, column tiles) every write kernel launch uses."""
    config = write_config(D)
    constexprs = {"ERASE_PER_SLOT": bool(erase_per_slot)}
    if backward:
        constexprs["SPLIT_D"] = config.num_d_tiles > 1
    constexprs["BLOCK_D"] = config.block_d
    return constexprs, config.num_warps, config.num_d_tiles


class DenseConfig(NamedTuple):
    block_r: int
    block_c: int
    num_warps: int


def dense_config(S2: int, S3: int, backward: bool = False) -> DenseConfig:
    """Tile of the dense update kernels for (coalesced) inner sizes ``S2`` (rows) and ``S3``.

    A tile holds ``DENSE_TILE_ELEMENTS_FWD`` (``_BWD``) elements: ``BLOCK_C`` is the next power
    of two of ``S3`` (at least ``MIN_BLOCK_D``, at most the tile), ``BLOCK_R`` the rest, capped at
    the next power of two of ``S2`` (a tile's rows share (i0, i1)). Memory bound and read once: a
    fixed heuristic, no autotuning.
    """
    tile_elements = DENSE_TILE_ELEMENTS_BWD if backward else DENSE_TILE_ELEMENTS_FWD
    block_c = block_d(S3, tile_elements, MIN_BLOCK_D)
    block_r = min(tile_elements // block_c, pow2_at_least(S2))
    return DenseConfig(block_r, block_c, DENSE_WARPS)


def _dense_constexprs(S2: int, S3: int, backward: bool) -> tuple[dict, int]:
    config = dense_config(S2, S3, backward)
    return {"BLOCK_R": config.block_r, "BLOCK_C": config.block_c}, config.num_warps


def _dense_layout(views) -> tuple[list[int], list[int]]:
    """(sizes (S0, S1, S2, S3), every operand's four strides) of 4-D views of one shape, with
    size-1 dimensions dropped and adjacent dimensions merged wherever every operand allows it
    (outer stride = inner stride * inner size), padded back to 4-D in front.

    A contiguous operand allows every merge, so the contiguous outputs keep their flat index. The
    common cases get long rows: all operands contiguous become (1, 1, 1, numel); memory
    (B, Hm, N, D) with gates (B, Hm, N, 1) becomes (1, 1, B * Hm * N, D).
    """
    merged = []  # [(size, strides per operand)], outer to inner
    for dim, size in enumerate(views[0].shape):
        if size == 1:
            continue
        strides = tuple(view.stride(dim) for view in views)
        if merged and all(outer == inner * size for outer, inner in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, strides)
        else:
            merged.append((size, strides))
    merged = [(1, (0,) * len(views))] * (4 - len(merged)) + merged
    return ([size for size, _ in merged],
            [merged[dim][1][operand] for operand in range(len(views)) for dim in range(4)])


def _dense_launch(views, backward: bool):
    """(sizes, strides, grid, constexprs, num_warps) of a dense update launch."""
    (S0, S1, S2, S3), strides = _dense_layout(views)
    constexprs, num_warps = _dense_constexprs(S2, S3, backward)
    programs = S0 * S1 * triton.cdiv(S2, constexprs["BLOCK_R"]) * triton.cdiv(S3, constexprs["BLOCK_C"])
    if programs >= 2 ** 31:
        raise ValueError(f"gated_dense_update: shape {tuple(views[0].shape)} needs {programs} programs, "
                         "more than the triton kernels' 1-D grid allows")
    return (S1, S2, S3), strides, (programs,), constexprs, num_warps


def _check_dtype(name: str, tensor: torch.Tensor):
    if tensor.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the triton backend supports float32/float16/bfloat16, got {tensor.dtype}")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def gated_memory_write_fwd(memory, indices, weights, add, erase, order, run_length, out) -> None:
    """Apply the writes of the plan ``(order, run_length)`` and store the written slots of ``out``.

    Args:
        memory:  (G, N, D) x, contiguous.   indices, weights: (G, T, kw) int32/int64 and x.
        add:     (G, T, D) x.   erase: (G, T, D) or (G, T, 1) x.
        order, run_length: (E,) int64 and int32, ``plan.write_plan(indices.view(G, T * kw), N)``.
        out:     (G, N, D) x, a copy of memory or memory itself; only written slots are stored.

    Equivalent PyTorch:
        out.copy_(gated_memory_write_ref(memory, indices, weights, add, erase))
    """
    _check_dtype("memory", memory)
    _, N, D = memory.shape
    T, kw = indices.shape[1:]
    num_entries = order.numel()
    if num_entries == 0 or D == 0:
        return
    constexprs, num_warps, num_d_tiles = _write_constexprs(D, erase.shape[-1] == 1, backward=False)
    with device_guard(memory):
        gated_memory_write_fwd_kernel[(num_entries, num_d_tiles)](
            memory, indices, weights, add, erase, order, run_length, out, N, D, T * kw, kw,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )


def gated_memory_write_bwd(dnew, memory, indices, weights, add, erase, order, run_length,
                           dmemory, dweights, add_parts, erase_parts) -> None:
    """Gradients of :func:`gated_memory_write_fwd` per entry.

    Args:
        dnew, memory: (G, N, D) x.   indices, weights: (G, T, kw).   add: (G, T, D) x.
        erase: (G, T, D) or (G, T, 1) x.   order, run_length: the plan (see the forward).
        dmemory:     (G, N, D) x, arrives as a copy of dnew; the written slots are stored.
        dweights:    (G, T, kw) x, arrives zeroed; every entry of a run is stored.
        add_parts:   (E, D) float32, zeroed; entry e gets w * dm (dm: the gradient after write e).
        erase_parts: (E, D) or (E, 1) float32, zeroed; entry e gets -w * m_prev * dm (summed over
                     D for a (G, T, 1) erase).

    Equivalent PyTorch: see the module docstring (the reverse walk of each slot's chain).
    """
    _check_dtype("memory", memory)
    _, N, D = memory.shape
    T, kw = indices.shape[1:]
    num_entries = order.numel()
    if num_entries == 0 or D == 0:
        return
    erase_per_slot = erase.shape[-1] == 1
    constexprs, num_warps, num_d_tiles = _write_constexprs(D, erase_per_slot, backward=True)
    if constexprs["SPLIT_D"]:
        # Per column tile sums, added up below: float32 and in a fixed order (no atomics).
        dweight_partials = torch.zeros((num_entries, num_d_tiles), dtype=torch.float32, device=memory.device)
        erase_partials = (torch.zeros_like(dweight_partials) if erase_per_slot else dweight_partials)
    else:
        dweight_partials = erase_partials = add_parts  # not read: placeholders of the right type
    with device_guard(memory):
        gated_memory_write_bwd_kernel[(num_entries, num_d_tiles)](
            dnew, memory, indices, weights, add, erase, order, run_length, dmemory, dweights,
            add_parts, erase_parts, dweight_partials, erase_partials, N, D, T * kw, kw,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )
    if constexprs["SPLIT_D"]:
        dweights.view(-1).copy_(dweight_partials.sum(1))
        if erase_per_slot:
            erase_parts.view(-1).copy_(erase_partials.sum(1))


def gated_dense_update_fwd(memory, update, input_gate, forget_gate, out) -> None:
    """``out = sigmoid(forget_gate) * memory + sigmoid(input_gate) * tanh(update)``, elementwise.

    Args:
        memory, update, input_gate, forget_gate: 4-D x views of one shape (S0, S1, S2, S3), any
            strides (0 where broadcast).
        out: (S0, S1, S2, S3) x, contiguous, written.

    Equivalent PyTorch:
        out.copy_(torch.sigmoid(forget_gate.float()) * memory.float()
                  + torch.sigmoid(input_gate.float()) * torch.tanh(update.float()))
    """
    _check_dtype("memory", memory)
    if out.numel() == 0:
        return
    sizes, strides, grid, constexprs, num_warps = _dense_launch((memory, update, input_gate, forget_gate),
                                                                backward=False)
    with device_guard(memory):
        gated_dense_update_fwd_kernel[grid](
            memory, update, input_gate, forget_gate, out, *sizes, *strides,
            **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )


def gated_dense_update_bwd(dout, memory, update, input_gate, forget_gate,
                           dmemory, dupdate, dinput_gate, dforget_gate) -> None:
    """Elementwise gradients of :func:`gated_dense_update_fwd` (not yet summed over broadcasts).

    Args:
        dout: (S0, S1, S2, S3) x, contiguous.
        memory, update, input_gate, forget_gate: 4-D x views of that shape, any strides.
        dmemory, dupdate, dinput_gate, dforget_gate: (S0, S1, S2, S3) float32, contiguous, written.

    Equivalent PyTorch (float32, sf = sigmoid(forget_gate), si = sigmoid(input_gate)):
        dmemory = dout * sf;  dupdate = dout * si * (1 - tanh(update) ** 2)
        dinput_gate = dout * tanh(update) * si * (1 - si);  dforget_gate = dout * memory * sf * (1 - sf)
    """
    _check_dtype("memory", memory)
    if dout.numel() == 0:
        return
    sizes, strides, grid, constexprs, num_warps = _dense_launch((memory, update, input_gate, forget_gate),
                                                                backward=True)
    with device_guard(memory):
        gated_dense_update_bwd_kernel[grid](
            dout, memory, update, input_gate, forget_gate, dmemory, dupdate, dinput_gate, dforget_gate,
            *sizes, *strides, **constexprs, num_warps=num_warps, **COMPILE_OPTIONS,
        )


# ---------------------------------------------------------------------------------------------
# Production configurations, for the compile check (tools/triton_check.py)
# ---------------------------------------------------------------------------------------------

COMPILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Row sizes D; 2048 exercises the split-D backward (more than MAX_BLOCK_D columns).
COMPILE_HEAD_DIMS = (64, 128, 256, 1024, 2048)
# Sizes the JIT sees in a production call, for its divisibility specialization: N slots and
# P = T * kw writes per memory multiples of 16, kw = 4 (not 16-divisible).
_COMPILE_N, _COMPILE_P, _COMPILE_KW = 4096, 2048, 4

_WRITE_FWD_ARGS = (("memory", "x"), ("indices", "idx"), ("weights", "x"), ("add", "x"), ("erase", "x"),
                   ("order", "i64"), ("run_length", "i32"), ("out", "x"),
                   ("N", "int"), ("D", "int"), ("P", "int"), ("KW", "int"))
_WRITE_BWD_ARGS = (("dnew", "x"), ("memory", "x"), ("indices", "idx"), ("weights", "x"), ("add", "x"),
                   ("erase", "x"), ("order", "i64"), ("run_length", "i32"), ("dmemory", "x"),
                   ("dweights", "x"), ("add_parts", "f32"), ("erase_parts", "f32"),
                   ("dweight_partials", "f32"), ("erase_partials", "f32"),
                   ("N", "int"), ("D", "int"), ("P", "int"), ("KW", "int"))
_DENSE_STRIDE_NAMES = tuple(f"{p}_s{d}" for p in "muif" for d in range(4))
_DENSE_FWD_ARGS = (("memory", "x"), ("update", "x"), ("input_gate", "x"), ("forget_gate", "x"),
                   ("out", "x"), ("S1", "int"), ("S2", "int"), ("S3", "int"))
_DENSE_BWD_ARGS = (("dout", "x"), ("memory", "x"), ("update", "x"), ("input_gate", "x"),
                   ("forget_gate", "x"), ("dmemory", "f32"), ("dupdate", "f32"), ("dinput_gate", "f32"),
                   ("dforget_gate", "f32"), ("S1", "int"), ("S2", "int"), ("S3", "int"))


def _dense_patterns(D: int) -> dict[str, tuple[dict, tuple[int, int]]]:
    """{pattern: ({size or stride name: value, None for a runtime value}, (S2, S3))} of the dense
    launches compile-checked, laid out by the launchers' own ``_dense_layout`` (on meta tensors).

    lm2: memory and update (B, Hm, N, D), gates (B, Hm, N, 1). contiguous: four full operands.
    shared: update (Hm, N, D) shared over the batch, input gate (Hm, 1, 1), forget gate a scalar.
    strided: every size and stride a runtime value not divisible by 16 (the worst case for
    registers: no vector loads).
    """
    B, Hm, N = 2, 4, _COMPILE_N
    shape = (B, Hm, N, D)
    operand_shapes = {
        "lm2": (shape, shape, (B, Hm, N, 1), (B, Hm, N, 1)),
        "contiguous": (shape, shape, shape, shape),
        "shared": (shape, (Hm, N, D), (Hm, 1, 1), ()),
    }
    patterns = {}
    for name, shapes in operand_shapes.items():
        views = tuple(torch.empty(s, device="meta").expand(shape) for s in shapes)
        (_, S1, S2, S3), strides = _dense_layout(views)
        values = dict(zip(_DENSE_STRIDE_NAMES, strides), S1=S1, S2=S2, S3=S3)
        patterns[name] = (values, (S2, S3))
    patterns["strided"] = ({name: None for name in _DENSE_STRIDE_NAMES + ("S1", "S2", "S3")}, (N, D))
    return patterns


def _entry(kernel, args, types, int_values, constexprs, num_warps, label):
    """One COMPILE_CONFIGS entry; ``int_values`` {name: value or None} mirrors the JIT's int
    specialization (1 becomes a constexpr, multiples of 16 (and 0) are marked divisible)."""
    constexprs, runtime_args = dict(constexprs), []
    for name, role in args:
        if role == "int" and int_values.get(name) == 1:
            constexprs[name] = 1
        else:
            runtime_args.append((name, role))
    divisible = [name for name, value in int_values.items() if value is not None and value % 16 == 0]
    return compile_entry(kernel, runtime_args, dict(types, int="i32"), constexprs, num_warps,
                         divisible_ints=divisible, label=label)


def _build_compile_configs() -> list[dict]:
    """Every (kernel, dtype, launch config) the launchers pick for COMPILE_HEAD_DIMS.

    Entry keys: as read by tools.triton_check (kernel, signature, constexprs, num_warps,
    options, divisible_by_16, label). The write kernels are listed for int64 indices (int32 too
    at D = 128: the same launch configs, only the index loads differ) and both erase layouts; the dense kernels for the layouts of ``_dense_patterns``.
    """
    configs = []
    for dtype in COMPILE_DTYPES:
        x = SIGNATURE_DTYPE[dtype]
        for D in COMPILE_HEAD_DIMS:
            write_ints = {"N": _COMPILE_N, "D": D, "P": _COMPILE_P, "KW": _COMPILE_KW}
            # int32 indices change only the index loads: one head size stands for them.
            for index_type in ("i32", "i64") if D == 128 else ("i64",):
                types = {"x": "*" + x, "idx": "*" + index_type, "i64": "*i64", "i32": "*i32", "f32": "*fp32"}
                for erase_per_slot in (False, True):
                    for kernel, args, backward in ((gated_memory_write_fwd_kernel, _WRITE_FWD_ARGS, False),
                                                   (gated_memory_write_bwd_kernel, _WRITE_BWD_ARGS, True)):
                        constexprs, num_warps, _ = _write_constexprs(D, erase_per_slot, backward)
                        label = (f"{x} D={D} idx={index_type} erase={'1' if erase_per_slot else 'D'} "
                                 f"BD={constexprs['BLOCK_D']}" + (" split" if constexprs.get("SPLIT_D") else ""))
                        configs.append(_entry(kernel, args, types, write_ints, constexprs, num_warps, label))
            types = {"x": "*" + x, "f32": "*fp32"}
            for pattern, (dense_ints, (S2, S3)) in _dense_patterns(D).items():
                rows = f"D={D}" if S3 == D else "D=any"  # long-row patterns: the same for every D
                for kernel, args, backward in ((gated_dense_update_fwd_kernel, _DENSE_FWD_ARGS, False),
                                               (gated_dense_update_bwd_kernel, _DENSE_BWD_ARGS, True)):
                    constexprs, num_warps = _dense_constexprs(S2, S3, backward)
                    label = f"{x} {rows} {pattern} BR={constexprs['BLOCK_R']} BC={constexprs['BLOCK_C']}"
                    full_args = args + tuple((name, "int") for name in _DENSE_STRIDE_NAMES)
                    configs.append(_entry(kernel, full_args, types, dense_ints, constexprs, num_warps, label))
    # The long-row patterns launch the same way for every D: keep one entry each.
    unique = {}
    for entry in configs:
        key = (entry["kernel"].__name__, tuple(entry["signature"].items()),
               tuple(sorted(entry["constexprs"].items())), entry["num_warps"], entry["divisible_by_16"])
        unique.setdefault(key, entry)
    return list(unique.values())


# Kernels decorated under the interpreter have no compile path; they still get the list (the
# check refuses them with a clear message) because it is pure data.
COMPILE_CONFIGS = _build_compile_configs()
