"""Exact top-k memory read over a memory sharded by slots across a ``torch.distributed`` group.

Rank r of the group holds the contiguous global slots ``[offset_r, offset_r + N_r)``. A read:

1. every rank selects its own best ``min(k, N_r)`` slots with :func:`l2m_kernels.topk_memory_read`
   (no gradient) and rescores them in float64;
2. one all-gather of the ``P x k`` candidate ``(score, global slot)`` pairs per query;
3. every rank ranks the same candidates the same way (descending score, ties to the smaller global
   slot, NaN first: :func:`l2m_kernels.memory.read.rank_top`) and forms the softmax weights and
   log-sum-exp of the global top-k itself;
4. each rank sums ``weights x values`` over the selected slots it holds; one all-reduce (replicated
   queries) or reduce-scatter (sharded queries) of these partial outputs.

The backward keeps ``dkeys`` and ``dvalues`` on the rank holding the slots and reduces the partial
``dq`` of every rank. Nothing of size ``N`` crosses the wire.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation as v
from ..backends import select_backend
from ..memory.read import _NO_SLOT as NO_SLOT
from ..memory.read import rank_top
from ..ops._common import MemoryRead, acc_dtype, autocast_promote
from ..ops.topk_read import MAX_K, resolve_scale, topk_memory_read
from ..ops.topk_read.reference import gather_slots, masked_softmax_lse
from ..ops.topk_read.validate import shared_if_broadcast, validate_memory, validate_valid_len
from . import _comm, _meta
from ._meta import (MISSING, QUERY_LAYOUTS, Field, ShardLayout, bits_checksum, dtype_code,
                    field_values, float_code, shape_code, show_dtype, show_flag, show_float,
                    show_layout, show_shape)

OP = "sharded_topk_memory_read"

_FIELDS = (
    Field("q.shape", 5, show_shape),
    Field("keys.shape", 5, show_shape),
    Field("values.shape", 5, show_shape),
    Field("dtype", 1, show_dtype),
    Field("k", 1),
    Field("queries", 1, show_layout),
    Field("scale", 1, show_float),
    Field("valid_len given", 1, show_flag),
    Field("q requires grad", 1, show_flag),
    Field("output requires grad", 1, show_flag),
    # (present, min, max): checked against the total slot count, not compared.
    Field("valid_len range", 3, compare=False),
    # Replicated queries only: the same q and valid_len on every rank.
    Field("q checksum", 1, compare=False),
    Field("valid_len checksum", 1, compare=False),
)


@dataclass(frozen=True)
class _Plan:
    """The non-tensor arguments of one read, agreed by every rank."""

    group: object
    layout: ShardLayout
    k: int
    scale: float
    sharded_queries: bool
    valid_len: Optional[Tensor]
    backend: Optional[str]


# Called eagerly also from compiled code (a graph break): see _meta.eager_only.
@_meta.eager_only
def sharded_topk_memory_read(q, keys, values, k, *, group=None, queries="replicated", scale=None,
                             valid_len=None, check=True, backend=None) -> MemoryRead:
    """Exact top-k memory read of a memory whose slots are split across the ranks of ``group``.

    Every rank of the group calls it with the same ``k``, ``scale``, ``queries`` and shapes (but
    for the slot count); the result is :func:`l2m_kernels.topk_memory_read` of the concatenated
    memory, with global slot ids.

    Args:
        q:      (B, H, T, Dk) queries. ``queries="replicated"``: the same on every rank (a
                tensor-parallel group; every rank gets the read of every query). ``"sharded"``:
                this rank's own batch (data parallel; the same shape on every rank, and each rank
                gets the read of its own queries).
        keys:   (B, Hm, N_r, Dk) or shared (Hm, N_r, Dk): this rank's slots, global slots
                ``[offset_r, offset_r + N_r)`` with ``offset_r = N_0 + ... + N_{r-1}`` (ranks in
                group order). N_r may differ across ranks and may be 0. With ``queries="sharded"``
                a batched memory holds every rank's batch: (P·B, Hm, N_r, Dk), rank r's queries
                reading batch elements ``[r·B, (r + 1)·B)``. H % Hm == 0. Same dtype as q.
        values: (B, Hm, N_r, Dv) or (Hm, N_r, Dv) (P·B leading with sharded queries), the leading
                shape of keys.
        k:      slots read per query, 1 <= k <= min(N_0 + ... + N_{P-1}, 256); may exceed N_r.
        group:  the process group (default: the world).
        queries: "replicated" or "sharded", as above.
        scale:  score scale, default Dk ** -0.5.
        valid_len: optional int (B,) tensor over the global slots: slots n >= valid_len[b] do not
                exist for batch element b (0 <= valid_len[b] <= total N). With sharded queries it
                belongs to this rank's batch, like q.
        check:  compare every rank's shapes, dtype, k, scale, query layout, valid_len presence and
                grad requirements (and, with replicated queries, checksums of q and valid_len) in
                one small all-gather, raising the same ``ValueError`` on every rank on a mismatch
                instead of hanging in a later collective. False: only the shard sizes are gathered.
        backend: the backend of the local selection (``topk_memory_read``'s ``backend``).

    Returns:
        MemoryRead(out (B, H, T, Dv) input dtype, indices (B, H, T, k) int64 global slot ids,
        weights (B, H, T, k) and lse (B, H, T) float32, float64 for float64 input), as
        ``topk_memory_read`` defines them: descending score, ties to the smaller global slot, NaN
        first; -1 / weight 0 where fewer than k slots exist. Differentiable in q, keys and values
        through out, weights and lse; ``dkeys``/``dvalues`` are this shard's gradients (with
        replicated queries, of the one loss every rank computes alike; with sharded queries,
        summed over every rank's queries). Every rank must run the backward of a read whose
        output requires grad.

    Under ``torch.compile`` it runs eagerly, a graph break in the compiled function (its collectives
    and cross-rank checks stay out of the graphs; the code around it compiles).

    Equivalent PyTorch (``gather`` = all-gather along dim ``-2`` of the memory, in rank order):
        q_all = q if queries == "replicated" else torch.cat(all_gather(q))       # (P·B, ...)
        valid_all = valid_len if queries == "replicated" else torch.cat(all_gather(valid_len))
        read = topk_memory_read(q_all, gather(keys), gather(values), k, scale=scale,
                                valid_len=valid_all)                             # global ids
        # queries == "sharded": this rank's slice [r·B, (r + 1)·B) of every output
    """
    v.require_tensor("q", q)
    q, keys, values = autocast_promote(q, keys, values)
    _, world_size = _meta.group_rank(group)
    local_error = None
    try:
        scale, valid_len = _check_local(q, keys, values, k, queries, scale, valid_len, world_size,
                                        backend)
    except (TypeError, ValueError, NotImplementedError) as error:
        local_error = error
    shard_size = keys.shape[-2] if local_error is None else 0
    codes = _codes(q, keys, values, k, queries, scale, valid_len, local_error is None) if check else {}
    layout, rows = _meta.exchange(OP, group, q.device, shard_size, _FIELDS, codes, local_error, check)
    v.require_int("k", k, 1, min(layout.total, MAX_K),
                  f" (N = {layout.total} slots over {layout.world_size} ranks, at most {MAX_K})")
    if check:
        if queries == "replicated":
            _meta.require_agreement(OP, _FIELDS, rows, ["q checksum", "valid_len checksum"])
        _require_valid_len_ranges([field_values(_FIELDS, row, "valid_len range") for row in rows],
                                  layout.total)
    else:
        _require_valid_len_ranges([_valid_len_range(valid_len)], layout.total)

    keys, values = shared_if_broadcast(keys, values)
    plan = _Plan(group, layout, k, scale, queries == "sharded", valid_len, backend)
    return MemoryRead(*_ShardedTopKRead.apply(plan, q, keys, values))


def _check_local(q, keys, values, k, queries, scale, valid_len, world_size: int, backend):
    """This rank's arguments, before any collective; returns ``(scale, valid_len)``."""
    if not isinstance(queries, str) or queries not in QUERY_LAYOUTS:
        raise ValueError(f"queries: expected one of {QUERY_LAYOUTS}, got {queries!r}")
    v.require_ndim("q", q, (4,), "(B, H, T, Dk)")
    B, H, T, Dk = q.shape
    q_batch = q
    if queries == "sharded":
        if isinstance(keys, Tensor) and keys.dim() == 4 and keys.shape[0] != world_size * B:
            raise ValueError(f"keys: with queries='sharded' a batched memory holds the batch of every "
                             f"rank: expected (world_size * B, Hm, N_r, Dk) with world_size * B = "
                             f"{world_size} * {B} = {world_size * B}, got {tuple(keys.shape)}")
        q_batch = torch.empty((world_size * B, H, T, Dk), dtype=q.dtype, device="meta")
    N = validate_memory(q_batch, keys, values)
    v.require_int("k", k, 1, MAX_K, f" (at most {MAX_K})")
    valid_len = validate_valid_len(valid_len, B)
    device = v.require_same_device(q=q, keys=keys, values=values, valid_len=valid_len)
    read_batch = world_size * B if queries == "sharded" else B
    select_backend("topk_memory_read", device, q.dtype, backend,
                   sizes=dict(Dk=Dk, Dv=0, N=N, rows=read_batch * H * T))
    return resolve_scale(scale, Dk), valid_len


def _valid_len_range(valid_len) -> Tuple[int, int, int]:
    if not isinstance(valid_len, Tensor) or not valid_len.numel() or not v.values_readable(valid_len):
        return (0, 0, 0)
    low, high = torch.stack(torch.aminmax(valid_len)).tolist()
    return (1, int(low), int(high))


def _require_valid_len_ranges(ranges, total: int) -> None:
    """``ranges``: per rank ``(present, min, max)`` of its valid_len (one entry: this rank's)."""
    bad = []
    for rank, (present, low, high) in enumerate(ranges):
        if present and (low < 0 or high > total):
            bad.append(f"[{low}, {high}] on rank {rank}" if len(ranges) > 1 else f"[{low}, {high}]")
    if bad:
        raise ValueError(f"valid_len: expected 0 <= valid_len[b] <= N = {total} (the slots of every "
                         f"rank together), got values in " + ", ".join(bad))


def _codes(q, keys, values, k, queries, scale, valid_len, local_ok: bool):
    """The metadata codes of this rank's arguments (never raises, whatever the arguments)."""
    grad_on = torch.is_grad_enabled()

    def needs_grad(t):
        return grad_on and isinstance(t, Tensor) and t.requires_grad

    k_ok = isinstance(k, int) and not isinstance(k, bool) and abs(k) < 2**62
    scale_ok = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    replicated = queries == "replicated"
    return {
        "q.shape": shape_code(q),
        "keys.shape": shape_code(keys, shard_dim=-2),
        "values.shape": shape_code(values, shard_dim=-2),
        "dtype": dtype_code(q),
        "k": (k if k_ok else MISSING,),
        "queries": (QUERY_LAYOUTS.index(queries) if isinstance(queries, str) and queries in QUERY_LAYOUTS
                    else MISSING,),
        "scale": float_code(scale) if scale_ok else (MISSING,),
        "valid_len given": (int(valid_len is not None),),
        "q requires grad": (int(needs_grad(q)),),
        "output requires grad": (int(any(needs_grad(t) for t in (q, keys, values))),),
        "valid_len range": _valid_len_range(valid_len) if local_ok else (0, 0, 0),
        "q checksum": (bits_checksum(q) if local_ok and replicated else 0,),
        "valid_len checksum": (bits_checksum(valid_len)
                               if local_ok and replicated and valid_len is not None else 0,),
    }


# ---- collectives ------------------------------------------------------------------------------

def _all_gather_batch(tensor: Tensor, plan: _Plan) -> Tensor:
    return _comm.all_gather_batch(tensor, plan.group, plan.layout)


def _reduce_batch(partial: Tensor, plan: _Plan) -> Tensor:
    """Sum of every rank's ``partial``: all of it (replicated queries), or this rank's slice of
    dim 0 (sharded queries: a reduce-scatter)."""
    if not plan.sharded_queries:
        dist.all_reduce(partial, group=plan.group)
        return partial
    return _comm.reduce_scatter_batch(partial, plan.group, plan.layout)


def _own_slice(tensor: Tensor, plan: _Plan) -> Tensor:
    return _comm.own_slice(tensor, plan.layout) if plan.sharded_queries else tensor


def _all_gather_candidates(scores: Tensor, slot_ids: Tensor, plan: _Plan) -> Tuple[Tensor, Tensor]:
    """All-gather of ``(scores (..., k) float64, slot_ids (..., k) int64)`` into ``(..., P·k)``.

    One collective of 12 bytes a candidate: the float64 score's bits as two int32 words and the
    slot id as int32 (int64 words, 16 bytes, when the memory has 2**31 slots or more).
    """
    wide = plan.layout.total >= 2**31
    packed = _comm.pack_entries(scores, slot_ids, wide)
    parts = [torch.empty_like(packed) for _ in range(plan.layout.world_size)]
    dist.all_gather(parts, packed, group=plan.group)
    unpacked = [_comm.unpack_entries(part, torch.float64, scores.shape[-1], wide) for part in parts]
    return torch.cat([u[0] for u in unpacked], -1), torch.cat([u[1] for u in unpacked], -1)


# ---- forward pieces ---------------------------------------------------------------------------

def _local_candidates(q: Tensor, keys: Tensor, plan: _Plan, valid_len: Optional[Tensor]):
    """This shard's best ``min(k, N_r)`` slots per query, padded to k: ``(scores (..., k) float64,
    global slot ids (..., k) int64)``, ``-inf`` / ``-1`` for no candidate."""
    layout, k = plan.layout, plan.k
    scores = q.new_full((*q.shape[:-1], k), float("-inf"), dtype=torch.float64)
    slot_ids = q.new_full((*q.shape[:-1], k), -1, dtype=torch.int64)
    if layout.size == 0:
        return scores, slot_ids
    local_k = min(k, layout.size)
    local_valid = None
    if valid_len is not None:
        local_valid = (valid_len.to(torch.int64) - layout.offset).clamp(0, layout.size)
    with torch.no_grad():
        # Dv = 0: the local read only selects (its out, weights and lse are not used).
        local_ids = topk_memory_read(q, keys, keys.narrow(-1, 0, 0), local_k, scale=plan.scale,
                                     valid_len=local_valid, backend=plan.backend).indices
        missing = local_ids < 0
        key_rows = gather_slots(keys, local_ids.clamp_min(0)).to(torch.float64)
        rescored = torch.matmul(key_rows, (q.to(torch.float64) * plan.scale).unsqueeze(-1)).squeeze(-1)
    scores[..., :local_k] = rescored.masked_fill(missing, float("-inf"))
    slot_ids[..., :local_k] = torch.where(missing, -1, local_ids + layout.offset)
    return scores, slot_ids


def _merge(scores: Tensor, slot_ids: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The global top-k of the gathered candidates ``(..., P·k)``: ``(scores (..., k) float64,
    slot ids (..., k) int64)`` in the selection order."""
    keys = torch.where(slot_ids < 0, NO_SLOT, slot_ids)
    _, top_ids = rank_top(scores, keys, k)
    # rank_top returns float32 scores; look the float64 ones up by slot id (unique in a row).
    sorted_keys, by_key = torch.sort(keys, dim=-1)
    position = torch.searchsorted(sorted_keys, torch.where(top_ids < 0, NO_SLOT, top_ids))
    position = position.clamp_max(keys.shape[-1] - 1)
    top_scores = torch.gather(scores, -1, torch.gather(by_key, -1, position))
    return top_scores.masked_fill(top_ids < 0, float("-inf")), top_ids


def _held(top_ids: Tensor, layout: ShardLayout) -> Tuple[Tensor, Tensor]:
    """Which selected entries this rank holds, and their local slot ids (0 elsewhere)."""
    local = top_ids - layout.offset
    mine = (top_ids >= 0) & (local >= 0) & (local < layout.size)
    return mine, torch.where(mine, local, 0)


def _held_rows(memory: Tensor, local_ids: Tensor, mine: Tensor, dtype: torch.dtype) -> Tensor:
    """(..., k, D) rows of the selected slots this rank holds, 0 for the others."""
    rows = gather_slots(memory, local_ids).to(dtype)
    return torch.where(mine.unsqueeze(-1), rows, 0.0)


def _scatter_rows(contributions: Tensor, local_ids: Tensor, mine: Tensor, memory: Tensor) -> Tensor:
    """Sum of ``contributions (E, D)`` (one per held entry, ``mine``'s order) into a zero gradient
    of ``memory``'s shape; query head h adds into memory head h // (H // Hm), and a shared memory
    sums over the batch."""
    batch, heads = local_ids.shape[:2]
    mem_heads, num_slots, dim = memory.shape[-3:]
    device = local_ids.device
    rows = (torch.arange(heads, device=device) // (heads // mem_heads)).view(1, heads, 1, 1) * num_slots
    rows = rows + local_ids
    if memory.dim() == 4:
        rows = rows + torch.arange(batch, device=device).view(batch, 1, 1, 1) * (mem_heads * num_slots)
    grad = torch.zeros(memory.numel() // max(dim, 1), dim, dtype=contributions.dtype, device=device)
    grad.index_add_(0, rows[mine], contributions)
    return grad.view(memory.shape)


def _entries(rows: Tensor, mine: Tensor) -> Tensor:
    """(..., D) per-query rows repeated for the held entries of ``mine (..., k)``: (E, D)."""
    return rows.unsqueeze(-2).expand(*mine.shape, rows.shape[-1])[mine]


class _ShardedTopKRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, keys, values):
        acc = acc_dtype(q.dtype)
        layout = plan.layout
        q_all, valid_len = q, plan.valid_len
        if plan.sharded_queries:
            q_all = _all_gather_batch(q, plan)
            if valid_len is not None:
                valid_len = _all_gather_batch(valid_len.to(torch.int64), plan)
        scores, slot_ids = _local_candidates(q_all, keys, plan, valid_len)
        scores, slot_ids = _all_gather_candidates(scores, slot_ids, plan)
        top_scores, top_ids = _merge(scores, slot_ids, plan.k)
        weights, lse = masked_softmax_lse(top_scores.to(acc), top_ids < 0)

        partial = q.new_zeros((*q_all.shape[:-1], values.shape[-1]), dtype=acc)
        if layout.size:
            mine, local_ids = _held(top_ids, layout)
            value_rows = _held_rows(values, local_ids, mine, acc)
            held_weights = torch.where(mine, weights, 0.0)
            partial = torch.matmul(held_weights.unsqueeze(-2), value_rows).squeeze(-2)
        out_acc = _reduce_batch(partial, plan)

        ctx.plan = plan
        ctx.save_for_backward(q_all, keys, values, top_ids, weights, out_acc)
        indices, own_weights, lse = (_own_slice(t, plan) for t in (top_ids, weights, lse))
        if plan.sharded_queries:
            indices, own_weights, lse = indices.clone(), own_weights.clone(), lse.clone()
        ctx.mark_non_differentiable(indices)
        return out_acc.to(q.dtype), indices, own_weights, lse

    @staticmethod
    def backward(ctx, dout, _dindices, dweights, dlse):
        plan = ctx.plan
        layout = plan.layout
        q_all, keys, values, top_ids, weights, out_acc = ctx.saved_tensors
        acc = weights.dtype
        dout, dweights, dlse = dout.to(acc), dweights.to(acc), dlse.to(acc)
        # dL/ds_j = w_j (dweights_j + dout . v_j - shift) with
        # shift = sum_i w_i dweights_i + dout . out - dlse (softmax, weighted sum and lse together).
        shift = (_own_slice(weights, plan) * dweights).sum(-1) + (dout * out_acc).sum(-1) - dlse
        if plan.sharded_queries:
            cotangents = _all_gather_batch(torch.cat([dout, dweights, shift.unsqueeze(-1)], -1), plan)
            dout, dweights, shift = cotangents.split([dout.shape[-1], plan.k, 1], -1)
            shift = shift.squeeze(-1)

        _, need_q, need_keys, need_values = ctx.needs_input_grad
        dq = q_all.new_zeros(q_all.shape, dtype=acc) if need_q else None
        dkeys = torch.zeros_like(keys) if need_keys else None
        dvalues = torch.zeros_like(values) if need_values else None
        if layout.size:
            mine, local_ids = _held(top_ids, layout)
            value_rows = _held_rows(values, local_ids, mine, acc)
            g = dweights + torch.matmul(value_rows, dout.unsqueeze(-1)).squeeze(-1)
            dscores = torch.where(mine, weights * (g - shift.unsqueeze(-1)), 0.0)
            if need_values:
                contributions = weights[mine].unsqueeze(-1) * _entries(dout, mine)
                dvalues = _scatter_rows(contributions, local_ids, mine, values).to(values.dtype)
            if need_keys:
                contributions = (plan.scale * dscores[mine]).unsqueeze(-1) * _entries(q_all.to(acc), mine)
                dkeys = _scatter_rows(contributions, local_ids, mine, keys).to(keys.dtype)
            if need_q:
                key_rows = _held_rows(keys, local_ids, mine, acc)
                dq = plan.scale * torch.matmul(dscores.unsqueeze(-2), key_rows).squeeze(-2)
        if need_q:
            dq = _reduce_batch(dq, plan).to(q_all.dtype)
        return None, dq, dkeys, dvalues
