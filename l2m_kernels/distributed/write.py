"""Gated memory writes into a memory sharded by slots across a ``torch.distributed`` group.

Rank r holds the contiguous global slots ``[offset_r, offset_r + N_r)``. Each rank turns the global
slot ids of the writes into local ones (``-1``, no write, for a slot another rank holds, so the
order of the writes within the shard is kept) and applies them with
:func:`l2m_kernels.gated_memory_write`, whose semantics and gradients it inherits. With replicated
writes no tensor crosses the wire in the forward; with sharded writes each rank's writes are
all-gathered first. The backward sums the gradients of the writes over the ranks (an all-reduce,
or a reduce-scatter back to each write's rank); the memory's gradient stays local.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation as v
from ..ops._common import acc_dtype, autocast_promote
from ..ops.memory_write import gated_memory_write
from ..ops.memory_write.validate import check_write_args
from . import _comm, _meta
from ._meta import (MISSING, QUERY_LAYOUTS, Field, ShardLayout, bits_checksum, dtype_code,
                    field_values, shape_code, show_dtype, show_flag, show_layout, show_shape)

OP = "sharded_gated_memory_write"

_INDEX_DTYPES = (torch.int32, torch.int64)


def _show_index_dtype(code: Tuple[int, ...]) -> str:
    return str(_INDEX_DTYPES[code[0]]) if 0 <= code[0] < len(_INDEX_DTYPES) else "not int32 or int64"


_FIELDS = (
    Field("memory.shape", 5, show_shape),
    Field("indices.shape", 5, show_shape),
    Field("weights.shape", 5, show_shape),
    Field("add.shape", 5, show_shape),
    Field("erase.shape", 5, show_shape),
    Field("dtype", 1, show_dtype),
    Field("indices.dtype", 1, _show_index_dtype),
    Field("queries", 1, show_layout),
    Field("writes require grad", 1, show_flag),
    # (present, min, max): checked against the total slot count, not compared.
    Field("indices range", 3, compare=False),
    # Replicated writes only: the same writes on every rank.
    Field("indices checksum", 1, compare=False),
    Field("weights checksum", 1, compare=False),
    Field("add checksum", 1, compare=False),
    Field("erase checksum", 1, compare=False),
)
_CHECKSUMS = ("indices checksum", "weights checksum", "add checksum", "erase checksum")


@dataclass(frozen=True)
class _Plan:
    group: object
    layout: ShardLayout
    sharded_writes: bool


# Called eagerly also from compiled code (a graph break): see _meta.eager_only.
@_meta.eager_only
def sharded_gated_memory_write(memory, indices, weights, add, erase, *, group=None,
                               queries="replicated", check=True, backend=None) -> Tensor:
    """Gated, erase-then-add writes, in order, into a memory whose slots are split across ``group``.

    Every rank of the group calls it with the same ``queries`` and shapes (but for the slot count);
    each rank's result is its shard of :func:`l2m_kernels.gated_memory_write` applied to the
    concatenated memory.

    Args:
        memory:  (B, Hm, N_r, D) or (B, N_r, D): this rank's slots, global slots
                 ``[offset_r, offset_r + N_r)`` with ``offset_r = N_0 + ... + N_{r-1}`` (ranks in
                 group order); N_r may differ across ranks and may be 0. With
                 ``queries="sharded"`` the memory holds every rank's batch: (P·B, Hm, N_r, D), rank
                 r's writes going to batch elements ``[r·B, (r + 1)·B)``.
        indices: (B, Hm, T, kw) or (B, T, kw) int32/int64 *global* slot ids in
                 ``[-1, N_0 + ... + N_{P-1})``, -1 meaning "no write".
        weights: the shape of indices, write strengths in [0, 1] (memory's dtype).
        add:     (B, Hm, T, D) or (B, T, D) vectors to add.
        erase:   (B, Hm, T, D) or (B, Hm, T, 1) (or (B, T, D) / (B, T, 1)) erase strengths in [0, 1].
        group:   the process group (default: the world).
        queries: "replicated": every rank passes the same writes (indices, weights, add, erase);
                 nothing but the metadata crosses the wire. "sharded": each rank passes its own
                 batch of writes; they are all-gathered in rank order and each rank applies those
                 that fall in its slots.
        check:   compare every rank's shapes, dtypes, query layout and grad requirement (and, with
                 replicated writes, checksums of the four write tensors) in one small all-gather,
                 raising the same ``ValueError`` on every rank on a mismatch instead of hanging in
                 a later collective; the slot ids' range is checked against the whole memory either
                 way (``IndexError`` on every rank). False: only the shard sizes (and the slot ids'
                 range) are gathered.
        backend: the backend of the local write (``gated_memory_write``'s ``backend``).

    Returns:
        This rank's new shard, shaped and typed like ``memory`` (a new tensor). Weights or erase
        strengths outside [0, 1] raise ``ValueError`` as in ``gated_memory_write`` (on every rank:
        every rank checks the same writes). Differentiable in memory, weights, add and erase: the
        memory's gradient is this shard's; the gradients of weights, add and erase sum the
        contributions of every shard's slots, i.e. with replicated writes every rank holds the full
        gradient of the one loss every rank computes alike (an all-reduce), and with sharded writes
        each rank holds the full gradient of its own writes (a reduce-scatter). Every rank must run
        the backward of a write whose writes require grad.

    Under ``torch.compile`` it runs eagerly, a graph break in the compiled function (its collectives
    and cross-rank checks stay out of the graphs; the code around it compiles).

    Equivalent PyTorch (``gather`` = all-gather along dim ``-2`` of the memory, in rank order;
    ``cat_writes`` = all-gather of each write tensor along dim 0, in rank order):
        w = (indices, weights, add, erase)
        if queries == "sharded":
            w = cat_writes(w)                                   # (P·B, ...)
        new = gated_memory_write(gather(memory), *w)            # global slot ids
        new[..., offset_r:offset_r + N_r, :]                    # this rank's shard
    """
    v.require_tensor("memory", memory)
    memory, weights, add, erase = autocast_promote(memory, weights, add, erase)
    _, world_size = _meta.group_rank(group)
    local_error = None
    try:
        if not isinstance(queries, str) or queries not in QUERY_LAYOUTS:
            raise ValueError(f"queries: expected one of {QUERY_LAYOUTS}, got {queries!r}")
        backend = _check_local(memory, indices, weights, add, erase, queries, world_size, backend)
    except (TypeError, ValueError, NotImplementedError) as error:
        local_error = error
    local_ok = local_error is None
    shard_size = memory.shape[-2] if local_ok else 0
    codes = (_codes(memory, indices, weights, add, erase, queries, local_ok) if check
             else {"indices range": _index_range(indices) if local_ok else (0, 0, 0)})
    fields = _FIELDS if check else tuple(f for f in _FIELDS if f.name == "indices range")
    # Without check only the slot ids' range joins the sizes: the range check must raise on every
    # rank alike, and with sharded writes each rank sees only its own ids.
    layout, rows = _meta.exchange(OP, group, memory.device, shard_size, fields, codes, local_error, True)
    if check and queries == "replicated":
        _meta.require_agreement(OP, _FIELDS, rows, _CHECKSUMS)
    _require_index_ranges([field_values(fields, row, "indices range") for row in rows], layout.total)

    plan = _Plan(group, layout, queries == "sharded")
    widths = [weights.shape[-1], add.shape[-1], erase.shape[-1]]
    # One buffer for the three float operands: one collective in each direction.
    packed = torch.cat([weights, add, erase], -1)
    dtype = memory.dtype
    if torch.is_grad_enabled() and packed.requires_grad and acc_dtype(dtype) != dtype:
        # float16/bfloat16 writes that need gradients: the shard's write runs in float32, so that
        # the writes' gradients are summed over the ranks before they are rounded, once, as on one
        # device (rounding each rank's part first could lose the sum where the parts cancel).
        memory, packed = memory.to(acc_dtype(dtype)), packed.to(acc_dtype(dtype))
    if plan.sharded_writes:
        packed = _GatherWrites.apply(packed, plan)
        indices = _all_gather_batch(indices, plan)
    elif torch.is_grad_enabled() and packed.requires_grad:
        packed = _SumGradients.apply(packed, plan)
    weights, add, erase = packed.split(widths, -1)
    local_ids = _local_slot_ids(indices, layout)
    if layout.size == 0:
        return _EmptyShard.apply(memory, packed).to(dtype)
    return gated_memory_write(memory, local_ids, weights, add, erase, backend=backend).to(dtype)


def _check_local(memory, indices, weights, add, erase, queries, world_size: int, backend):
    """This rank's arguments, before any collective; returns the local write's backend."""
    v.require_ndim("memory", memory, (3, 4), "(B, Hm, N_r, D) or (B, N_r, D)")
    v.require_ndim("indices", indices, (memory.dim(),),
                   "(B, Hm, T, kw)" if memory.dim() == 4 else "(B, T, kw)")
    batch = indices.shape[0]
    local_memory = memory
    if queries == "sharded":
        if memory.shape[0] != world_size * batch:
            raise ValueError(f"memory: with queries='sharded' the memory holds the batch of every "
                             f"rank: expected a leading size world_size * B = {world_size} * {batch} "
                             f"= {world_size * batch}, got {tuple(memory.shape)}")
        local_memory = memory.narrow(0, 0, batch)  # the shapes of this rank's batch
    return check_write_args(local_memory, indices, weights, add, erase, backend)


def _index_range(indices) -> Tuple[int, int, int]:
    if not isinstance(indices, Tensor) or not indices.numel() or not v.values_readable(indices):
        return (0, 0, 0)
    low, high = torch.stack(torch.aminmax(indices)).tolist()
    return (1, int(low), int(high))


def _require_index_ranges(ranges, total: int) -> None:
    """``ranges``: per rank ``(present, min, max)`` of its slot ids."""
    bad = [f"[{low}, {high}] on rank {rank}" for rank, (present, low, high) in enumerate(ranges)
           if present and (low < -1 or high >= total)]
    if bad:
        raise IndexError(f"indices: expected global slot ids in [-1, N) = [-1, {total}) (-1 means no "
                         f"write; N: the slots of every rank together), got values in " + ", ".join(bad))


def _codes(memory, indices, weights, add, erase, queries, local_ok: bool):
    """The metadata codes of this rank's arguments (never raises, whatever the arguments)."""
    grad_on = torch.is_grad_enabled()
    writes_grad = grad_on and any(isinstance(t, Tensor) and t.requires_grad for t in (weights, add, erase))
    replicated = local_ok and queries == "replicated"
    index_dtype = getattr(indices, "dtype", None)
    return {
        "memory.shape": shape_code(memory, shard_dim=-2),
        "indices.shape": shape_code(indices),
        "weights.shape": shape_code(weights),
        "add.shape": shape_code(add),
        "erase.shape": shape_code(erase),
        "dtype": dtype_code(memory),
        "indices.dtype": (_INDEX_DTYPES.index(index_dtype) if index_dtype in _INDEX_DTYPES else MISSING,),
        "queries": (QUERY_LAYOUTS.index(queries) if isinstance(queries, str) and queries in QUERY_LAYOUTS
                    else MISSING,),
        "writes require grad": (int(writes_grad),),
        "indices range": _index_range(indices) if local_ok else (0, 0, 0),
        "indices checksum": (bits_checksum(indices) if replicated else 0,),
        "weights checksum": (bits_checksum(weights) if replicated else 0,),
        "add checksum": (bits_checksum(add) if replicated else 0,),
        "erase checksum": (bits_checksum(erase) if replicated else 0,),
    }


def _local_slot_ids(indices: Tensor, layout: ShardLayout) -> Tensor:
    """Global slot ids -> this shard's (-1 for the slots of other ranks), in the input's dtype."""
    local = indices - layout.offset
    held = (indices >= 0) & (local >= 0) & (local < layout.size)
    return torch.where(held, local, torch.full_like(local, -1))


def _all_gather_batch(tensor: Tensor, plan: _Plan) -> Tensor:
    return _comm.all_gather_batch(tensor, plan.group, plan.layout)


class _GatherWrites(torch.autograd.Function):
    """All-gather along dim 0; the backward hands each rank the sum of every rank's gradient of
    its slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, packed, plan: _Plan):
        ctx.plan = plan
        return _all_gather_batch(packed, plan)

    @staticmethod
    def backward(ctx, grad):
        return _comm.reduce_scatter_batch(grad, ctx.plan.group, ctx.plan.layout), None


class _SumGradients(torch.autograd.Function):
    """The identity; the backward sums the gradient over the ranks (an all-reduce)."""

    @staticmethod
    def forward(ctx, packed, plan: _Plan):
        ctx.plan = plan
        return packed.view_as(packed)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.plan.group)
        return grad, None


class _EmptyShard(torch.autograd.Function):
    """A shard of no slots: a copy of the (empty) memory that still depends on the writes, so
    that this rank's backward reaches the writes' collective as the other ranks' do."""

    @staticmethod
    def forward(ctx, memory, packed):
        ctx.packed_shape = packed.shape
        return memory.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.packed_shape)
