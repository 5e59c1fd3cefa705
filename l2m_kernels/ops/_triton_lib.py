"""The Triton library the ops' kernels share: jit helpers, launch helpers and compile-check metadata.

Each op's ``triton.py`` keeps its kernels and launchers; what more than one op needs lives here,
under public names, and no op module imports another op's private names.

- **Sorting and selection** (the top-k read, the product-key read): a bitonic sorting network on
  the last dimension of a ``[ROWS, W]`` integer tile (:func:`bitonic_sort`, :func:`bitonic_merge`),
  and int64 sort keys that order (score descending, slot ascending) as one integer
  (:func:`encode_keys`, :func:`encode_key`, :func:`decode_keys`).
- **Merge math** (the merge ops, the fused memory attention): the merged log-sum-exp of two sides,
  each side's weight, and the sigmoid pair of a gate.
- **Top-k backward** (the top-k read, the product-key read): each row's sum of w_j dw_j over its
  selection, which every ds_j subtracts.
- **Row blocks**: the (batch * memory head, row block) a program of a row-blocked grid owns, and
  that block's rows.
- **Launch helpers** (host side): the device guard, power-of-two tile widths, the interpreter test
  and the float32-dot choice, and the compile options every launch passes (the float32 gradient
  accumulators for atomics and the grouping of entries by key, which the cuda launchers share,
  are in ``ops/_common.py``).
- **Compile-check metadata**: the argument types and the ``COMPILE_CONFIGS`` entries that
  ``python -m tools.triton_check`` reads (:func:`compile_entry`).

The jit functions are decorated at import time, so Triton decides then whether they run under the
interpreter (``TRITON_INTERPRET=1``, CPU tensors) or compile for the GPU, as the kernels do.

Sort keys. Each (query, slot) becomes one int64 key: the order-preserving int32 image of the
float32 score in the high word (NaN mapped to +inf, -0.0 to +0.0) and ``2**31 - 1 - slot`` in the
low word, so "larger key" is exactly "higher score, then smaller slot" and all keys of a row are
distinct. Non-existent slots get ``INT64_MIN``. Slots must fit the low word (``< 2**31``).

Sorting network. Written with ``tl.reshape`` and a pairwise ``tl.sum`` (the formulation of
``tl.sort``, which in Triton 3.3 only offers a full sort of one tensor; ``tl.topk`` and
``tl.bitonic_merge`` are newer), so the same code runs on Triton 3.3 .. 3.9 and under the
interpreter.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - the interpreter module has always existed in 3.x
    InterpretedFunction = ()

__all__ = [
    "INT64_MIN", "INT32_MIN", "INT32_MAX", "MIN_K_PAD", "COMPILE_OPTIONS", "SIGNATURE_DTYPE",
    "compare_swap", "bitonic_sort", "bitonic_merge", "order_bits", "encode_key", "encode_keys",
    "decode_keys", "row_block", "row_block_rows", "log1p", "merged_lse", "side_weight", "sigmoid_pair",
    "weighted_dw_sum",
    "row_block_grid", "device_guard", "pow2_at_least", "block_d",
    "interpreted", "f32_dot",
    "argument_types", "constexpr_names", "compile_entry", "config_label",
]

INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))
INT32_MIN: tl.constexpr = tl.constexpr(-(2**31))
INT32_MAX: tl.constexpr = tl.constexpr(2**31 - 1)

# Smallest score tile: tl.dot needs every dimension >= 16.
MIN_K_PAD = 16

# Pinned rather than left to the Triton default, which 3.9 warns is about to change: fused
# multiply-adds are both faster and more accurate for the blends, dot products and write chains.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


# ---------------------------------------------------------------------------------------------
# Sorting network on the last dimension of a [ROWS, W] tile (W a power of two)
# ---------------------------------------------------------------------------------------------

@triton.jit
def compare_swap(b_x, b_flip, LOG_DIST: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr):
    """One compare-and-swap layer between columns ``c`` and ``c ^ 2**LOG_DIST``.

    ``b_flip`` (0/1, broadcastable to [ROWS, W]) is 1 where the pair should end descending.
    """
    # [ROWS * W / (2 DIST), 2, DIST] with DIST = 2**LOG_DIST: axis 1 holds the two partners; the
    # pair's sum minus an element is its partner (exact: integer arithmetic wraps modulo 2**64 and
    # the partner is representable). tl.sort uses xor_sum the same way; a sum runs as one numpy
    # call under the interpreter, where xor_sum runs element by element in Python.
    b_pairs = tl.reshape(b_x, [ROWS * W // (2 << LOG_DIST), 2, 1 << LOG_DIST])
    b_partner = tl.reshape(tl.sum(b_pairs, axis=1, keep_dims=True) - b_pairs, [ROWS, W])
    # The right element of a pair takes the larger one in ascending order.
    b_is_right = (tl.arange(0, W)[None, :] >> LOG_DIST) & 1
    b_take = (b_x > b_partner) != ((b_is_right ^ b_flip) != 0)
    return tl.where(b_take, b_partner, b_x)


@triton.jit
def bitonic_sort(b_x, DESCENDING: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr, LOG_W: tl.constexpr):
    """Sort each row of an integer [ROWS, W = 2**LOG_W] tile (DESCENDING: 0 or 1)."""
    b_col = tl.arange(0, W)[None, :]
    for stage in tl.static_range(1, LOG_W + 1):
        # Blocks of 2**stage alternate direction, so that pairs of them form bitonic sequences;
        # the last stage sorts the whole row the requested way.
        if stage == LOG_W:
            b_flip = tl.zeros([1, W], dtype=tl.int32) + DESCENDING
        else:
            b_flip = (b_col >> stage) & 1
        for step in tl.static_range(stage):
            b_x = compare_swap(b_x, b_flip, stage - 1 - step, ROWS, W)
    return b_x


@triton.jit
def bitonic_merge(b_x, DESCENDING: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr, LOG_W: tl.constexpr):
    """Sort each row of an integer [ROWS, W = 2**LOG_W] tile whose rows are bitonic sequences."""
    b_flip = tl.zeros([1, W], dtype=tl.int32) + DESCENDING
    for step in tl.static_range(LOG_W):
        b_x = compare_swap(b_x, b_flip, LOG_W - 1 - step, ROWS, W)
    return b_x


# ---------------------------------------------------------------------------------------------
# Sort keys: (score desc, slot asc) as one int64
# ---------------------------------------------------------------------------------------------

# The top-k kernels that ran on a GPU (select, finish, the threshold path's chunkmax and collect)
# call encode_keys and decode_keys in their source of then, so that they compile to the same code;
# order_bits and encode_key are the same maps for the newer kernels (the threshold-strided path
# and the product-key read). Calling encode_key from encode_keys would change the select kernel's
# SASS: the nested call reorders ptxas's schedule.

@triton.jit
def order_bits(b_bits):
    """Float32 bit patterns (as int32) <-> order-preserving int32 images, both ways (the map is its
    own inverse): a negative pattern keeps its sign bit and has the others flipped."""
    return tl.where(b_bits < 0, b_bits ^ INT32_MAX, b_bits)


@triton.jit
def encode_key(b_s, b_slot):
    """int64 sort keys of float32 scores ``b_s`` at slots ``b_slot`` (integers; shapes broadcast):
    as :func:`encode_keys`, without the existence mask."""
    b_s = tl.where(b_s != b_s, float("inf"), b_s)
    b_s = tl.where(b_s == 0., 0., b_s)
    b_ordered = order_bits(b_s.to(tl.int32, bitcast=True))
    return (b_ordered.to(tl.int64) << 32) | (-b_slot + INT32_MAX).to(tl.int64)


@triton.jit
def encode_keys(b_s, o_n, m_exists):
    """[BT, BN] int64 keys of float32 scores ``b_s`` at slots ``o_n`` [BN] (int64).

    High word: the float's bits mapped to an order-preserving int32 (NaN first mapped to +inf, so
    it ties with it; -0.0 to +0.0, so they tie). Low word: ``2**31 - 1 - slot``, so among equal
    scores the smaller slot has the larger key. ``m_exists`` false -> INT64_MIN (below every
    real key: the image of -inf is -2**31 + 2**23 - 1 > -2**31).
    """
    b_s = tl.where(b_s != b_s, float("inf"), b_s)
    b_s = tl.where(b_s == 0., 0., b_s)
    b_bits = b_s.to(tl.int32, bitcast=True)
    b_ordered = tl.where(b_bits < 0, b_bits ^ INT32_MAX, b_bits)
    b_low = (-o_n + INT32_MAX).to(tl.int64)
    b_key = (b_ordered.to(tl.int64) << 32) | b_low[None, :]
    return tl.where(m_exists, b_key, INT64_MIN)


@triton.jit
def decode_keys(b_key):
    """Inverse of :func:`encode_keys`: (exists, float32 score, int64 slot)."""
    b_high = (b_key >> 32).to(tl.int32)
    b_exists = b_high != INT32_MIN
    b_bits = tl.where(b_high < 0, b_high ^ INT32_MAX, b_high)
    b_score = b_bits.to(tl.float32, bitcast=True)
    b_slot = -(b_key & INT32_MAX) + INT32_MAX
    return b_exists, b_score, b_slot


# ---------------------------------------------------------------------------------------------
# Row blocks
# ---------------------------------------------------------------------------------------------

@triton.jit
def row_block(num_row_blocks, Hm):
    """(b * Hm + hm, row block, b, hm) of this program, as int64.

    Divided in int32 (program ids fit): a 64-bit division is a subroutine call whose saved
    registers ptxas puts in the stack frame.
    """
    i_prog = tl.program_id(0)
    i_bh = i_prog // num_row_blocks
    i_tb = i_prog - i_bh * num_row_blocks
    i_b = i_bh // Hm
    i_hm = i_bh - i_b * Hm
    return i_bh.to(tl.int64), i_tb.to(tl.int64), i_b.to(tl.int64), i_hm.to(tl.int64)


@triton.jit
def row_block_rows(num_row_blocks, Hm, R, BLOCK_T: tl.constexpr):
    """(b * Hm + hm, b, hm, o_t, m_t, o_row) of this program: :func:`row_block`'s pair and the
    block's rows, ``o_t`` [BLOCK_T] within the pair's ``R`` rows, ``m_t`` those that exist and
    ``o_row`` their global row numbers (int64)."""
    i_bh, i_tb, i_b, i_hm = row_block(num_row_blocks, Hm)
    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < R
    o_row = i_bh * R + o_t
    return i_bh, i_b, i_hm, o_t, m_t, o_row


# ---------------------------------------------------------------------------------------------
# Merge math: two attention results by their log-sum-exps, or by a gate
# ---------------------------------------------------------------------------------------------

@triton.jit
def log1p(b_x):
    # log(1 + x) without losing the low bits of small x (Goldberg's trick): with u = fl(1 + x),
    # log(u) * x / (u - 1) cancels the rounding error of u. Avoids libdevice, whose module path
    # differs across Triton versions and under the interpreter.
    b_u = 1. + b_x
    return tl.where(b_u == 1., b_x, tl.log(b_u) * (b_x / (b_u - 1.)))


@triton.jit
def merged_lse(b_la, b_lb):
    # m = la if la > lb else lb: a select, not tl.maximum, so a NaN in lb propagates and a NaN in
    # la reaches lse through |la - lb|.
    b_m = tl.where(b_la > b_lb, b_la, b_lb)
    b_lse = b_m + log1p(tl.exp(-tl.abs(b_la - b_lb)))
    # Both sides empty: -inf. Tested on the inputs rather than on m == -inf so that (NaN, -inf)
    # still gives NaN, as the reference (torch.maximum) does.
    b_both_empty = (b_la == float("-inf")) & (b_lb == float("-inf"))
    # A +inf side (and no NaN) gives +inf: exp(-|inf - inf|) made it NaN.
    b_inf = (b_m == float("inf")) & (b_la == b_la) & (b_lb == b_lb)
    return tl.where(b_both_empty, float("-inf"), tl.where(b_inf, float("inf"), b_lse))


@triton.jit
def side_weight(b_l, b_lse):
    # exp(l - lse), and exactly 0 for an empty side even when lse is -inf as well.
    return tl.where(b_l == float("-inf"), 0., tl.exp(b_l - b_lse))


@triton.jit
def sigmoid_pair(b_gate):
    # (sigmoid(x), 1 - sigmoid(x)); the second as sigmoid(-x) so it keeps its precision when
    # sigmoid(x) is close to 1.
    b_g = 1. / (1. + tl.exp(-b_gate))
    b_one_minus_g = 1. / (1. + tl.exp(b_gate))
    return b_g, b_one_minus_g


# ---------------------------------------------------------------------------------------------
# Top-k read backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def weighted_dw_sum(indices, weights, dw, o_row, m_t, k, N, BLOCK_T: tl.constexpr, BLOCK_KC: tl.constexpr):
    """[BT] sum_j w_j dw_j over the live entries (slot in [0, N)) of rows ``o_row`` of a [rows, k]
    selection, in column chunks of BLOCK_KC: the softmax term of ds_j = w_j (dw_j - sum + dlse)."""
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
    return b_wdw


# ---------------------------------------------------------------------------------------------
# Launch helpers (host side)
# ---------------------------------------------------------------------------------------------

def row_block_grid(rows: int, block_rows: int, groups: int) -> tuple[int, int]:
    """(num_row_blocks, programs) of a row-blocked grid: ``rows`` rows of each of ``groups``
    (batch, head) pairs in blocks of ``block_rows``, one program per block (the kernel finds its
    block with :func:`row_block`)."""
    num_row_blocks = triton.cdiv(rows, block_rows)
    return num_row_blocks, num_row_blocks * groups


def device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def pow2_at_least(value: int, floor: int = 1) -> int:
    """The next power of two of ``value`` (1 for ``value <= 1``), at least ``floor``."""
    return max(floor, triton.next_power_of_2(max(int(value), 1)))


def block_d(D: int, max_block_d: int | None = None, min_block_d: int = 16) -> int:
    """Tile width over a feature dimension of ``D``: its next power of two, at least
    ``min_block_d`` (tl.dot and ordinary tile layouts want 16), at most ``max_block_d``."""
    width = pow2_at_least(D, min_block_d)
    return width if max_block_d is None else min(width, max_block_d)


def interpreted() -> bool:
    """Whether the jit functions were decorated for Triton's CPU interpreter (``TRITON_INTERPRET``
    set at import)."""
    return isinstance(bitonic_sort, InterpretedFunction)


def f32_dot(dtype: torch.dtype) -> bool:
    """Whether scores use float32 operands (``scale * q`` in float32, ieee dot).

    Always for float32 (no TF32: a selection depends on the scores). 16-bit inputs use the tensor
    cores on their own operands instead, except bfloat16 under the interpreter: Triton 3.9's
    interpreter multiplies the raw bfloat16 bit patterns in ``tl.dot`` (numpy has no bfloat16), so
    there the operands are upcast first (same products: a 16-bit product is exact in float32).
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted())


# ---------------------------------------------------------------------------------------------
# Compile-check metadata: COMPILE_CONFIGS entries (read by tools.triton_check)
# ---------------------------------------------------------------------------------------------

SIGNATURE_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def argument_types(dtype: torch.dtype, **extra: str) -> dict[str, str]:
    """{argument role: Triton type} for kernels run on ``dtype`` inputs.

    Roles: ``"x"`` a pointer of the input dtype; ``"i64"``, ``"i32"``, ``"f32"`` pointers of those
    types; ``"int"`` a size or count (i32); ``"float"`` a scalar (fp32); ``extra`` adds or
    replaces roles, e.g. ``acc="*fp64"``.
    """
    return {"x": "*" + SIGNATURE_DTYPE[dtype], "i64": "*i64", "i32": "*i32", "f32": "*fp32", "int": "i32",
            "float": "fp32", **extra}


def constexpr_names(kernel, args) -> list[str]:
    """The kernel's constexpr argument names, after checking that ``args`` ((name, role), ...) are
    its runtime arguments in order, ahead of the constexprs (the launchers pass them positionally).
    """
    names = [name for name in kernel.arg_names if name not in dict(args)]
    if [name for name, _ in args] + names != list(kernel.arg_names):
        raise AssertionError(f"kernel arguments out of date for {kernel.__name__}: {kernel.arg_names}")
    return names


def compile_entry(kernel, args, types: dict, constexprs: dict, num_warps: int, *, divisible_ints=(),
                  options: dict | None = None, label: str = "", **extra) -> dict:
    """One ``COMPILE_CONFIGS`` entry, in the format ``tools.triton_check`` reads.

    Args:
        kernel:         the @triton.jit function.
        args:           its runtime arguments ((name, role), ...), roles as in ``types``.
        types:          {role: Triton type}, e.g. from :func:`argument_types`.
        constexprs:     {constexpr argument name: value}; with ``args``, every argument exactly once.
        num_warps:      int.
        divisible_ints: names of integer (``"i32"``) arguments the JIT would specialize as
                        multiples of 16 in the calls checked; every pointer is marked 16-divisible
                        too (torch's allocations are 16-byte aligned).
        options:        compile options beyond :data:`COMPILE_OPTIONS` (e.g. ``num_stages``).
        label:          short text for the table.
        extra:          further keys (``allow_spills``, or the caller's own bookkeeping).
    """
    signature = {name: types[role] for name, role in args}
    if sorted(list(signature) + list(constexprs)) != sorted(kernel.arg_names):
        raise AssertionError(f"compile config out of date for {kernel.__name__}: {kernel.arg_names}")
    divisible = [name for name, type_ in signature.items() if type_.startswith("*")]
    divisible += [name for name, type_ in signature.items() if type_ == "i32" and name in divisible_ints]
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "options": {**(options or {}), **COMPILE_OPTIONS}, "divisible_by_16": tuple(divisible),
            "label": label, **extra}


def config_label(dtype: torch.dtype, sizes: str, constexprs: dict, short: dict[str, str]) -> str:
    """``"<dtype> <sizes> NAME=value ..."`` for the constexprs named in ``short`` (as its abbreviations)."""
    return " ".join([SIGNATURE_DTYPE[dtype], sizes]
                    + [f"{short[name]}={int(value)}" for name, value in constexprs.items() if name in short])
