"""Triton kernels and launchers for the merge ops (``merge_attention`` and ``gated_merge``).

The four launchers implement the low-level merge interface shared with the cpu and cuda backends:
inputs are contiguous ``(R, D)`` row tensors (``(R,)`` per-row scalars), outputs are preallocated
and passed last, every element of every output is written, and the functions return ``None``.

Each program handles a tile of ``BLOCK_R`` rows by ``BLOCK_D`` columns. The forwards have no
reduction along ``D``, so they also spread ``D`` over a second grid axis; the backwards need the
full-row dot product for ``d_lse`` / ``d_gate``, so one program walks its rows' ``D`` chunks,
writing the elementwise gradients as it goes and the per-row gradient after the loop. Every input
is read once and every output written once.

Numerics: loads in the input dtype, computes in ``ACC_DTYPE`` (float32; float64 for float64 input,
which only the interpreter sees), stores in the output dtype.

The kernels are decorated at import time, so Triton decides then whether they run under the
interpreter (``TRITON_INTERPRET=1``, CPU tensors) or compile for the GPU. This module never sets
that variable itself.

``COMPILE_CONFIGS`` lists the configurations the launchers pick for the production dtypes and head
sizes; ``python -m tools.triton_check`` compiles them for sm_80/sm_90 without a GPU.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._triton_lib import (COMPILE_OPTIONS, argument_types, block_d, compile_entry, config_label,
                          constexpr_names, device_guard, merged_lse, side_weight, sigmoid_pair)

__all__ = [
    "merge_attention_fwd",
    "merge_attention_bwd",
    "gated_merge_fwd",
    "gated_merge_bwd",
    "tile_config",
    "COMPILE_CONFIGS",
]

# Widest D chunk one tile covers; larger D loops (backward) or uses more programs (forward).
MAX_BLOCK_D = 256
# Elements per (BLOCK_R, BLOCK_D) tile at 4 warps: 32 per thread and tensor in the forwards (two
# input tiles), 16 in the backwards, which hold three input tiles plus the per-row dot products: at
# 4096 they need up to 254 registers (fp32) and ptxas 12.4 (Triton 3.3) spills; at 2048 they run at the same
# bandwidth on an H100 (tile sweep, bf16/fp32, D = 64..256, R = 65536).
TILE_ELEMENTS_FWD = 4096
TILE_ELEMENTS_BWD = 2048
NUM_WARPS = 4


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_tile(R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(column block i_d, rows o_r [BR], row mask, columns o_d [BD], [BR, BD] mask) of a forward
    program: row block program_id(0), column block program_id(1)."""
    i_r = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_r = o_r < R
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    return i_d, o_r, m_r, o_d, m_rd


@triton.jit
def _bwd_chunk(dout, x_a, x_b, d_a, d_b, b_ca, b_cb, o_r, m_r, i_d, D, ACC_DTYPE: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Column chunk ``i_d`` of the backward of ``out = c_a * x_a + c_b * x_b`` (c_a, c_b: [BR] per row):
    stores ``d_a = c_a * dout`` and ``d_b = c_b * dout`` and returns the [BR, BD] tiles (dout, x_a,
    x_b) for the caller's per-row dot products."""
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    o_rd = o_r[:, None] * D + o_d[None, :]
    b_do = tl.load(dout + o_rd, mask=m_rd, other=0.).to(ACC_DTYPE)
    b_a = tl.load(x_a + o_rd, mask=m_rd, other=0.).to(ACC_DTYPE)
    b_b = tl.load(x_b + o_rd, mask=m_rd, other=0.).to(ACC_DTYPE)
    tl.store(d_a + o_rd, (b_ca[:, None] * b_do).to(d_a.dtype.element_ty), mask=m_rd)
    tl.store(d_b + o_rd, (b_cb[:, None] * b_do).to(d_b.dtype.element_ty), mask=m_rd)
    return b_do, b_a, b_b


@triton.jit
def merge_attention_fwd_kernel(
    out_a,  # [R, D] x
    lse_a,  # [R] acc
    out_b,  # [R, D] x
    lse_b,  # [R] acc
    out,  # [R, D] x, written
    lse,  # [R] acc, written
    R,
    D,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_R), cdiv(D, BLOCK_D)); the programs with i_d == 0 also write lse."""
    i_d, o_r, m_r, o_d, m_rd = _row_tile(R, D, BLOCK_R, BLOCK_D)

    # [BR]
    b_la = tl.load(lse_a + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_lb = tl.load(lse_b + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_lse = merged_lse(b_la, b_lb)
    b_wa = side_weight(b_la, b_lse)
    b_wb = side_weight(b_lb, b_lse)
    if i_d == 0:
        tl.store(lse + o_r, b_lse.to(lse.dtype.element_ty), mask=m_r)

    o_rd = o_r[:, None] * D + o_d[None, :]
    # [BR, BD]
    b_a = tl.load(out_a + o_rd, mask=m_rd, other=0.).to(ACC_DTYPE)
    b_b = tl.load(out_b + o_rd, mask=m_rd, other=0.).to(ACC_DTYPE)
    b_out = b_wa[:, None] * b_a + b_wb[:, None] * b_b
    tl.store(out + o_rd, b_out.to(out.dtype.element_ty), mask=m_rd)


@triton.jit
def merge_attention_bwd_kernel(
    dout,  # [R, D] x
    dlse,  # [R] acc
    out_a,  # [R, D] x
    lse_a,  # [R] acc
    out_b,  # [R, D] x
    lse_b,  # [R] acc
    lse,  # [R] acc, the forward's output
    d_out_a,  # [R, D] x, written
    d_lse_a,  # [R] acc, written
    d_out_b,  # [R, D] x, written
    d_lse_b,  # [R] acc, written
    R,
    D,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_R),); each program walks all D chunks of its rows."""
    i_r = tl.program_id(0).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R

    # [BR]
    b_la = tl.load(lse_a + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_lb = tl.load(lse_b + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_lse = tl.load(lse + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_dlse = tl.load(dlse + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_wa = side_weight(b_la, b_lse)
    b_wb = side_weight(b_lb, b_lse)
    # <dout, out_a> and <dout, out_b> per row, accumulated over the D chunks.
    b_pa = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    b_pb = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)

    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        # [BR, BD]
        b_do, b_a, b_b = _bwd_chunk(dout, out_a, out_b, d_out_a, d_out_b, b_wa, b_wb, o_r, m_r, i_d, D,
                                    ACC_DTYPE, BLOCK_D)
        b_pa += tl.sum(b_do * b_a, axis=1)
        b_pb += tl.sum(b_do * b_b, axis=1)

    # [BR]; d lse / d la = wa and d wa / d la = wa (1 - wa), d wb / d la = -wa wb.
    # wa (dlse + pa - (wa pa + wb pb)) with wa + wb = 1, without the cancelling difference.
    b_diff = b_pa - b_pb
    b_dla = b_wa * (b_dlse + b_wb * b_diff)
    b_dlb = b_wb * (b_dlse - b_wa * b_diff)
    tl.store(d_lse_a + o_r, b_dla.to(d_lse_a.dtype.element_ty), mask=m_r)
    tl.store(d_lse_b + o_r, b_dlb.to(d_lse_b.dtype.element_ty), mask=m_r)


@triton.jit
def gated_merge_fwd_kernel(
    out_local,  # [R, D] x
    out_mem,  # [R, D] x
    gate,  # [R] x, logits
    out,  # [R, D] x, written
    R,
    D,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_R), cdiv(D, BLOCK_D))."""
    i_d, o_r, m_r, o_d, m_rd = _row_tile(R, D, BLOCK_R, BLOCK_D)

    # [BR]
    b_gate = tl.load(gate + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_g, b_one_minus_g = sigmoid_pair(b_gate)

    o_rd = o_r[:, None] * D + o_d[None, :]
    # [BR, BD]
    b_local = tl.load(out_local + o_rd, mask=m_rd, other=0.).to(ACC_DTYPE)
    b_mem = tl.load(out_mem + o_rd, mask=m_rd, other=0.).to(ACC_DTYPE)
    b_out = b_g[:, None] * b_mem + b_one_minus_g[:, None] * b_local
    tl.store(out + o_rd, b_out.to(out.dtype.element_ty), mask=m_rd)


@triton.jit
def gated_merge_bwd_kernel(
    dout,  # [R, D] x
    out_local,  # [R, D] x
    out_mem,  # [R, D] x
    gate,  # [R] x, logits
    d_local,  # [R, D] x, written
    d_mem,  # [R, D] x, written
    d_gate,  # [R] acc, written
    R,
    D,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_R),); each program walks all D chunks of its rows."""
    i_r = tl.program_id(0).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R

    # [BR]
    b_gate = tl.load(gate + o_r, mask=m_r, other=0.).to(ACC_DTYPE)
    b_g, b_one_minus_g = sigmoid_pair(b_gate)
    # <dout, out_mem - out_local> per row, accumulated over the D chunks.
    b_dot = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)

    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        # [BR, BD]
        b_do, b_local, b_mem = _bwd_chunk(dout, out_local, out_mem, d_local, d_mem, b_one_minus_g, b_g, o_r, m_r,
                                          i_d, D, ACC_DTYPE, BLOCK_D)
        b_dot += tl.sum(b_do * (b_mem - b_local), axis=1)

    # [BR]
    b_dgate = b_g * b_one_minus_g * b_dot
    tl.store(d_gate + o_r, b_dgate.to(d_gate.dtype.element_ty), mask=m_r)


# ---------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and COMPILE_CONFIGS, so the two cannot drift)
# ---------------------------------------------------------------------------------------------

class TileConfig(NamedTuple):
    block_r: int
    block_d: int
    num_warps: int


def tile_config(D: int, dtype: torch.dtype, backward: bool = False) -> TileConfig:
    """Deterministic tile choice for rows of ``D`` elements of ``dtype``.

    These ops are memory bound and read each element once, so a fixed heuristic is as good as
    autotuning (a sweep of tile sizes and warp counts on an H100 found no consistent winner) and
    keeps runs reproducible: ``BLOCK_D`` is the next power of two of ``D`` capped at
    ``MAX_BLOCK_D``; ``BLOCK_R`` fills a tile of ``TILE_ELEMENTS_FWD`` / ``TILE_ELEMENTS_BWD``
    elements (half that for float64, which takes two registers per element).
    """
    block_cols = block_d(D, MAX_BLOCK_D, min_block_d=1)
    tile_elements = TILE_ELEMENTS_BWD if backward else TILE_ELEMENTS_FWD
    if dtype == torch.float64:
        tile_elements //= 2
    block_r = max(1, tile_elements // block_cols)
    return TileConfig(block_r, block_cols, NUM_WARPS)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _constexprs(D: int, dtype: torch.dtype, backward: bool) -> tuple[dict, int]:
    """The constexpr arguments and num_warps every merge kernel is launched with."""
    config = tile_config(D, dtype, backward)
    constexprs = {"ACC_DTYPE": _acc_dtype(dtype), "BLOCK_R": config.block_r, "BLOCK_D": config.block_d}
    return constexprs, config.num_warps


# ---------------------------------------------------------------------------------------------
# Launchers (the low-level merge interface)
# ---------------------------------------------------------------------------------------------

def _launch(kernel, rows: torch.Tensor, tensors: tuple, backward: bool) -> None:
    """Launch a merge kernel on ``tensors`` for the (R, D) rows of ``rows``: a forward over row and
    column blocks, a backward over row blocks (each program walks its rows' D chunks)."""
    R, D = rows.shape
    if R == 0:
        return
    constexprs, num_warps = _constexprs(D, rows.dtype, backward)
    num_row_blocks = triton.cdiv(R, constexprs["BLOCK_R"])
    # A forward has at least one D program, so merge_attention writes lse even for a degenerate D == 0.
    grid = (num_row_blocks,) if backward else (num_row_blocks, max(1, triton.cdiv(D, constexprs["BLOCK_D"])))
    with device_guard(rows):
        kernel[grid](*tensors, R, D, **constexprs, num_warps=num_warps, **COMPILE_OPTIONS)


def merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, lse) -> None:
    """Merge two partial attention results over disjoint key sets, per row.

    Args:
        out_a, out_b: (R, D) x, contiguous.   lse_a, lse_b: (R,) acc.
        out: (R, D) x, written.   lse: (R,) acc, written.

    Equivalent PyTorch:
        lse = torch.logaddexp(lse_a, lse_b)   # -inf when both are -inf
        wa = exp(lse_a - lse) (0 where lse_a == -inf); wb likewise
        out = wa[:, None] * out_a + wb[:, None] * out_b
    """
    _launch(merge_attention_fwd_kernel, out_a, (out_a, lse_a, out_b, lse_b, out, lse), backward=False)


def merge_attention_bwd(dout, dlse, out_a, lse_a, out_b, lse_b, lse,
                        d_out_a, d_lse_a, d_out_b, d_lse_b) -> None:
    """Gradients of :func:`merge_attention_fwd`.

    Args:
        dout, out_a, out_b: (R, D) x.   dlse, lse_a, lse_b, lse: (R,) acc (``lse`` from the forward).
        d_out_a, d_out_b: (R, D) x, written.   d_lse_a, d_lse_b: (R,) acc, written.

    Equivalent PyTorch:
        pa = (dout * out_a).sum(-1); pb = (dout * out_b).sum(-1)
        d_out_a = wa[:, None] * dout;  d_lse_a = wa * (dlse + wb * (pa - pb))
        d_out_b = wb[:, None] * dout;  d_lse_b = wb * (dlse - wa * (pa - pb))
    """
    _launch(merge_attention_bwd_kernel, out_a,
            (dout, dlse, out_a, lse_a, out_b, lse_b, lse, d_out_a, d_lse_a, d_out_b, d_lse_b), backward=True)


def gated_merge_fwd(out_local, out_mem, gate, out) -> None:
    """Blend two row sets with one gate logit per row.

    Args:
        out_local, out_mem: (R, D) x.   gate: (R,) x logits.   out: (R, D) x, written.

    Equivalent PyTorch:
        g = torch.sigmoid(gate)[:, None]; out = g * out_mem + (1 - g) * out_local
    """
    _launch(gated_merge_fwd_kernel, out_local, (out_local, out_mem, gate, out), backward=False)


def gated_merge_bwd(dout, out_local, out_mem, gate, d_local, d_mem, d_gate) -> None:
    """Gradients of :func:`gated_merge_fwd`.

    Args:
        dout, out_local, out_mem: (R, D) x.   gate: (R,) x.
        d_local, d_mem: (R, D) x, written.   d_gate: (R,) acc, written.

    Equivalent PyTorch:
        d_local = (1 - g) * dout;  d_mem = g * dout
        d_gate = g * (1 - g) * (dout * (out_mem - out_local)).sum(-1)
    """
    _launch(gated_merge_bwd_kernel, out_local, (dout, out_local, out_mem, gate, d_local, d_mem, d_gate),
            backward=True)


# ---------------------------------------------------------------------------------------------
# Production configurations, for the compile check (tools/triton_check.py)
# ---------------------------------------------------------------------------------------------

# Dtypes and head sizes the GPU path is compile-checked for.
COMPILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPILE_HEAD_DIMS = (64, 128, 256, 512)

# Runtime arguments of each kernel, in order, by role: "x" a pointer of the input dtype, "acc" a
# pointer of the accumulation dtype, "int" a row count or size. The launchers
# pass exactly these positionally; _build_compile_configs checks the names against the kernels.
_KERNEL_ARGS = {
    merge_attention_fwd_kernel: (("out_a", "x"), ("lse_a", "acc"), ("out_b", "x"), ("lse_b", "acc"),
                                 ("out", "x"), ("lse", "acc"), ("R", "int"), ("D", "int")),
    merge_attention_bwd_kernel: (("dout", "x"), ("dlse", "acc"), ("out_a", "x"), ("lse_a", "acc"),
                                 ("out_b", "x"), ("lse_b", "acc"), ("lse", "acc"),
                                 ("d_out_a", "x"), ("d_lse_a", "acc"), ("d_out_b", "x"),
                                 ("d_lse_b", "acc"), ("R", "int"), ("D", "int")),
    gated_merge_fwd_kernel: (("out_local", "x"), ("out_mem", "x"), ("gate", "x"), ("out", "x"),
                             ("R", "int"), ("D", "int")),
    gated_merge_bwd_kernel: (("dout", "x"), ("out_local", "x"), ("out_mem", "x"), ("gate", "x"),
                             ("d_local", "x"), ("d_mem", "x"), ("d_gate", "acc"),
                             ("R", "int"), ("D", "int")),
}

_BACKWARD_KERNELS = (merge_attention_bwd_kernel, gated_merge_bwd_kernel)


def _build_compile_configs() -> list[dict]:
    """One entry per distinct (kernel, dtype, constexprs) the launchers pick for COMPILE_HEAD_DIMS
    (entry format: tools.triton_check; ``D`` marked 16-divisible where it is)."""
    configs = []
    for kernel, args in _KERNEL_ARGS.items():
        if sorted(constexpr_names(kernel, args)) != ["ACC_DTYPE", "BLOCK_D", "BLOCK_R"]:
            raise AssertionError(f"_KERNEL_ARGS out of date for {kernel.__name__}: {kernel.arg_names}")
        for dtype in COMPILE_DTYPES:
            types = argument_types(dtype, acc="*fp64" if dtype == torch.float64 else "*fp32")
            seen = {}
            for D in COMPILE_HEAD_DIMS:
                constexprs, num_warps = _constexprs(D, dtype, backward=kernel in _BACKWARD_KERNELS)
                key = (tuple(constexprs.items()), num_warps, D % 16 == 0)
                if key in seen:
                    seen[key]["head_dims"].append(D)
                    continue
                seen[key] = compile_entry(kernel, args, types, constexprs, num_warps,
                                          divisible_ints=("D",) if D % 16 == 0 else (), head_dims=[D])
                configs.append(seen[key])
            for entry in seen.values():
                entry["label"] = config_label(dtype, "D=" + ",".join(map(str, entry.pop("head_dims"))),
                                              entry["constexprs"], {"BLOCK_R": "BR", "BLOCK_D": "BD"})
    return configs


# Kernels decorated under the interpreter have no compile path; they still get the list (the
# check refuses them with a clear message) because it is pure data.
COMPILE_CONFIGS = _build_compile_configs()
