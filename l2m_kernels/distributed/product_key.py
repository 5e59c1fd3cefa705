"""Exact product-key memory read with replicated sub-keys and values sharded across a
``torch.distributed`` group, by rows (slots) or by columns (feature ranges).

Every rank holds the same sub-keys, so each rank computes the selection of its queries with the
single-device op itself: :func:`l2m_kernels.product_key_read` on a zero-width ``(n_sub ** 2, 0)``
values tensor returns the indices, weights and lse (selection and weights do not depend on the
values) and stays differentiable in ``q`` and ``subkeys``. Only the weighted sum of the value rows
is split:

- ``shard="rows"``: rank r holds slots ``[offset_r, offset_r + N_r)``; it sums ``weights x values``
  over the selected slots it holds, and the partial outputs are summed across the ranks.
- ``shard="columns"``: rank r holds features ``[c_r, c_r + Dv_r)`` of every slot; it forms those
  columns of ``out``, and the columns are gathered along the feature dimension.

With replicated queries every rank selects the same slots for the same queries, the sum is one
all-reduce and the gather one all-gather. With sharded queries (each rank its own batch) the ranks
first all-gather every rank's selection (``k`` weights and slot ids per query and head), form their
part of every rank's output, and send each rank its own: a reduce-scatter (rows) or an all-to-all
(columns).

Backward: ``dvalues`` stays on the rank holding the rows or columns. The one term of the selection's
gradient that depends on the values, ``dL/dweights_j += dout . v_j``, is a partial sum on each rank
(its slots or its columns); one all-reduce (replicated queries) or reduce-scatter (sharded queries)
of these ``k`` numbers per query and head completes it, and each rank then runs the single-device
op's backward for ``dq`` and ``dsubkeys`` of its own queries. (Reducing ``dq`` and ``dsubkeys``
instead would send ``Dk`` numbers per query plus the whole ``H x n_sub x Dk`` sub-key gradient.)
With sharded queries the output gradients travel first: an all-gather of ``dout`` (rows) or an
all-to-all of its columns (columns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation as v
from ..ops._common import MemoryRead, autocast_promote
from ..ops.product_key import product_key_read
from ..ops.product_key.function import coalesce_rows
from ..ops.product_key.validate import check_args
from . import _comm, _meta
from ._meta import (MISSING, QUERY_LAYOUTS, Field, ShardLayout, bits_checksum, dtype_code, float_code,
                    shape_code, show_dtype, show_flag, show_float, show_layout, show_shape)

OP = "sharded_product_key_read"
SHARD_MODES = ("rows", "columns")


def _show_mode(code) -> str:
    return repr(SHARD_MODES[code[0]]) if 0 <= code[0] < len(SHARD_MODES) else "invalid"


_FIELDS = (
    Field("q.shape", 5, show_shape),
    Field("subkeys.shape", 5, show_shape),
    Field("values.shape", 5, show_shape),
    Field("dtype", 1, show_dtype),
    Field("k", 1),
    Field("k_sub", 1),
    Field("shard", 1, _show_mode),
    Field("queries", 1, show_layout),
    Field("scale", 1, show_float),
    Field("sum_heads", 1, show_flag),
    Field("selection requires grad", 1, show_flag),
    Field("subkeys checksum", 1),
    # Replicated queries only: the same q on every rank.
    Field("q checksum", 1, compare=False),
)


@dataclass(frozen=True)
class _Plan:
    """The non-tensor arguments of one read's weighted sum, agreed by every rank."""

    group: object
    layout: ShardLayout   # row shards (slots) or column shards (features), per ``by_rows``
    by_rows: bool
    sum_heads: bool
    out_dtype: torch.dtype
    sharded_queries: bool
    sparse_grad: bool
    num_slots: int


@_meta.eager_only
def sharded_product_key_read(q, subkeys, values, k, *, k_sub=None, group=None, shard="rows",
                             queries="replicated", scale=None, sum_heads=False, check=True, backend=None,
                             deterministic=False, sparse_grad=False) -> MemoryRead:
    """Exact product-key read of a memory whose values are split across the ranks of ``group``.

    Every rank passes the same ``subkeys`` and its own shard of ``values``. With
    ``queries="replicated"`` every rank passes the same ``q`` (a tensor-parallel group) and gets
    :func:`l2m_kernels.product_key_read` of the whole memory; each shard's gradient is that of the
    one loss (computed alike on every rank). With ``queries="sharded"`` each rank passes its own
    batch (data parallel) and gets the read of its own queries; each values shard's gradient sums
    the contributions of every rank's queries, while ``dq`` and ``dsubkeys`` are those of this
    rank's queries (summed over the ranks, they are the whole batch's: DDP averages them).

    Args:
        q:       (B, H, T, Dk) queries, Dk even: the same on every rank (replicated), or this rank's
                 batch with the same shape on every rank (sharded).
        subkeys: (H, 2, n_sub, Dk // 2) sub-keys, the same on every rank. Same dtype as q.
        values:  ``shard="rows"``: (N_r, Dv), this rank's slots ``[offset_r, offset_r + N_r)`` of the
                 ``n_sub ** 2`` slots, ``offset_r = N_0 + ... + N_{r-1}`` (ranks in group order);
                 N_r may differ across ranks and be 0, and the N_r sum to ``n_sub ** 2``.
                 ``shard="columns"``: (n_sub ** 2, Dv_r), this rank's features ``[c_r, c_r + Dv_r)``
                 of every slot, ``c_r = Dv_0 + ... + Dv_{r-1}``; Dv_r may differ and be 0.
                 Same dtype as q.
        k:       slots read per query and head, 1 <= k <= k_sub ** 2.
        k_sub:   candidates kept per half, default k, k_sub <= n_sub.
        group:   the process group (default: the world).
        shard:   "rows" or "columns", as above.
        queries: "replicated" or "sharded", as above.
        scale:   score scale, default Dk ** -0.5.
        sum_heads: sum the heads' reads into one (B, T, Dv) output.
        check:   compare every rank's shapes, dtype, k, k_sub, shard mode, query layout, scale,
                 sum_heads, grad requirement and checksums of subkeys (and, replicated, of q) in one
                 small all-gather, raising the same ``ValueError`` on every rank on a mismatch
                 instead of hanging in a later collective. False: only the shard sizes are gathered.
        backend, deterministic: of the selection (``product_key_read``'s arguments).
        sparse_grad: the values shard's gradient is a coalesced ``torch.sparse_coo`` tensor of its
                 shape, one row per slot of the shard that was read (as ``product_key_read``'s).

    Returns:
        MemoryRead(out (B, H, T, Dv) or (B, T, Dv) in the input dtype with the whole Dv in both
        modes, indices (B, H, T, k) int64 slot ids ``i * n_sub + j``, weights (B, H, T, k) and
        lse (B, H, T) float32, float64 for float64): the same on every rank with replicated queries.

    Equivalent PyTorch (``values_full``: the row shards concatenated along dim 0, or the column
    shards along dim 1):
        q_all = q if queries == "replicated" else torch.cat(all_gather(q))   # (P·B, ...)
        read = l2m_kernels.product_key_read(q_all, subkeys, values_full, k, k_sub=k_sub,
                                            scale=scale, sum_heads=sum_heads)
        # queries == "sharded": this rank's slice [r·B, (r + 1)·B) of every output
    """
    q, subkeys, values = autocast_promote(q, subkeys, values)
    _, world_size = _meta.group_rank(group)
    local_error = None
    try:
        k, k_sub, scale = _check_local(q, subkeys, values, k, k_sub, shard, queries, scale, sum_heads,
                                       deterministic, sparse_grad, backend)
    except (TypeError, ValueError, NotImplementedError) as error:
        local_error = error
    by_rows = shard == "rows"
    shard_size = 0
    if local_error is None:
        shard_size = values.shape[0] if by_rows else values.shape[1]
    codes = _codes(q, subkeys, values, k, k_sub, shard, queries, scale, sum_heads,
                   local_error is None) if check else {}
    layout, rows = _meta.exchange(OP, group, q.device, shard_size, _FIELDS, codes, local_error, check)
    if check and queries == "replicated":
        _meta.require_agreement(OP, _FIELDS, rows, ["q checksum"])
    num_slots = subkeys.shape[2] ** 2
    if by_rows and layout.total != num_slots:
        raise ValueError(f"values: the row shards hold N_0 + ... + N_{world_size - 1} = {layout.total} "
                         f"slots ({list(layout.sizes)}), expected n_sub ** 2 = {num_slots}")

    # The selection of this rank's queries (with replicated queries, alike on every rank): values
    # enter only through the weighted sum below.
    selection = product_key_read(q, subkeys, values.new_zeros((num_slots, 0)), k, k_sub=k_sub,
                                 scale=scale, deterministic=deterministic, backend=backend)
    plan = _Plan(group, layout, by_rows, bool(sum_heads), q.dtype, queries == "sharded", bool(sparse_grad),
                 num_slots)
    out = _ShardedWeightedSum.apply(plan, selection.weights, selection.indices, values)
    return MemoryRead(out, selection.indices, selection.weights, selection.lse)


def _check_local(q, subkeys, values, k, k_sub, shard, queries, scale, sum_heads, deterministic, sparse_grad,
                 backend):
    """This rank's arguments, before any collective; returns ``(k, k_sub, scale)``."""
    if not isinstance(shard, str) or shard not in SHARD_MODES:
        raise ValueError(f"shard: expected one of {SHARD_MODES}, got {shard!r}")
    if not isinstance(queries, str) or queries not in QUERY_LAYOUTS:
        raise ValueError(f"queries: expected one of {QUERY_LAYOUTS}, got {queries!r}")
    v.require_ndim("subkeys", subkeys, (4,), "(H, 2, n_sub, Dk // 2)")
    v.require_ndim("values", values, (2,), "(N_r, Dv)" if shard == "rows" else "(n_sub ** 2, Dv_r)")
    n_sub = subkeys.shape[2]
    if shard == "columns":
        v.require_shape("values", values, (n_sub * n_sub, None), "(n_sub ** 2, Dv_r)")
    v.require_same_dtype("q", q, subkeys=subkeys, values=values)
    v.require_same_device(q=q, subkeys=subkeys, values=values)
    # The single-device op's checks of q, subkeys, k, k_sub, scale and backend (values: a stand-in).
    k, k_sub, scale, *_ = check_args(q, subkeys, values.new_empty((n_sub * n_sub, 0)), k, k_sub, scale,
                                     sum_heads, sparse_grad, deterministic, backend)
    return k, k_sub, scale


def _codes(q, subkeys, values, k, k_sub, shard, queries, scale, sum_heads, local_ok: bool):
    """The metadata codes of this rank's arguments (never raises, whatever the arguments)."""
    def int_code(value):
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**62
        return (value if ok else MISSING,)

    grad_on = torch.is_grad_enabled()
    selection_grad = grad_on and any(isinstance(t, Tensor) and t.requires_grad for t in (q, subkeys))
    scale_ok = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    return {
        "q.shape": shape_code(q),
        "subkeys.shape": shape_code(subkeys),
        "values.shape": shape_code(values, shard_dim=-2 if shard == "rows" else -1),
        "dtype": dtype_code(q),
        "k": int_code(k),
        "k_sub": int_code(k_sub),
        "shard": (SHARD_MODES.index(shard) if isinstance(shard, str) and shard in SHARD_MODES
                  else MISSING,),
        "queries": (QUERY_LAYOUTS.index(queries) if isinstance(queries, str) and queries in QUERY_LAYOUTS
                    else MISSING,),
        "scale": float_code(scale) if scale_ok else (MISSING,),
        "sum_heads": (int(bool(sum_heads)),),
        "selection requires grad": (int(selection_grad),),
        "subkeys checksum": (bits_checksum(subkeys) if local_ok else 0,),
        "q checksum": (bits_checksum(q) if local_ok and queries == "replicated" else 0,),
    }


# ---- the weighted sum of the value shards ------------------------------------------------------

def _held_entries(indices: Tensor, plan: _Plan):
    """``(mine (..., k) bool, local row ids (..., k))``: the selected slots this rank's shard holds
    (every slot with column shards) and their rows in ``values`` (0 elsewhere)."""
    if not plan.by_rows:
        return torch.ones_like(indices, dtype=torch.bool), indices
    local = indices - plan.layout.offset
    mine = (local >= 0) & (local < plan.layout.size)
    return mine, torch.where(mine, local, 0)


def _held_rows(values: Tensor, local_ids: Tensor, mine: Tensor, acc: torch.dtype) -> Tensor:
    """(..., k, D) value rows of the held entries, 0 for the others."""
    rows = values.index_select(0, local_ids.reshape(-1)).to(acc)
    rows = rows.reshape(*local_ids.shape, values.shape[-1])
    return torch.where(mine.unsqueeze(-1), rows, 0.0)


def _gather_selection(weights: Tensor, indices: Tensor, plan: _Plan):
    """Every rank's selection ``(weights, indices)`` concatenated along the batch (sharded
    queries), in one all-gather of ``k`` weights and slot ids per query and head."""
    if not plan.sharded_queries:
        return weights, indices
    wide = plan.num_slots >= 2**31
    packed = _comm.all_gather_batch(_comm.pack_entries(weights, indices, wide), plan.group, plan.layout)
    return _comm.unpack_entries(packed, weights.dtype, weights.shape[-1], wide)


def _finish_out(partial: Tensor, plan: _Plan) -> Tensor:
    """``out`` of this rank's queries from the partial outputs of every rank's queries (replicated:
    the same queries) over this rank's rows (a sum over the ranks) or columns (a concatenation)."""
    group, layout = plan.group, plan.layout
    if plan.by_rows:
        if plan.sharded_queries:
            return _comm.reduce_scatter_batch(partial, group, layout)
        dist.all_reduce(partial, group=group)
        return partial
    widest = max(layout.sizes)
    if plan.sharded_queries:
        # Rank s gets its queries' slice of these columns; every rank's columns of ours come back.
        parts = _comm.all_to_all_pieces(_comm.split_batch(partial, layout), widest, group, layout)
    else:
        padded = torch.nn.functional.pad(partial, (0, widest - partial.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(layout.world_size)]
        dist.all_gather(parts, padded, group=group)
    return torch.cat([part[..., :width] for part, width in zip(parts, layout.sizes)], -1)


def _dout_of_held(dout: Tensor, plan: _Plan) -> Tensor:
    """The output gradient of every query this rank's partial sums served: all (replicated) or
    every rank's (sharded), over the whole Dv (rows) or this rank's columns (columns)."""
    layout = plan.layout
    if plan.by_rows:
        return _comm.all_gather_batch(dout, plan.group, layout) if plan.sharded_queries else dout
    if not plan.sharded_queries:
        return dout.narrow(-1, layout.offset, layout.size)
    # Rank s gets our queries' gradient at its columns; our columns of every rank's queries come back.
    columns = [dout.narrow(-1, offset, width) for offset, width in zip(layout.offsets, layout.sizes)]
    parts = _comm.all_to_all_pieces(columns, max(layout.sizes), plan.group, layout)
    return torch.cat([part[..., :layout.size] for part in parts], 0)


def _values_grad(contributions: Tensor, local_ids: Tensor, values: Tensor, plan: _Plan, acc):
    """The values shard's gradient from ``contributions (E, D)`` at rows ``local_ids (E,)``: dense,
    or a coalesced sparse COO tensor with ``sparse_grad``."""
    if plan.sparse_grad:  # summed per distinct row in ``acc``, rounded once, as product_key_read's
        summed, slots = coalesce_rows(local_ids, contributions, values.shape[0])
        return torch.sparse_coo_tensor(slots.unsqueeze(0), summed.to(values.dtype), values.shape,
                                       check_invariants=False, is_coalesced=True)
    grad = torch.zeros(values.shape, dtype=acc, device=values.device)
    grad.index_add_(0, local_ids, contributions)
    return grad.to(values.dtype)


class _ShardedWeightedSum(torch.autograd.Function):
    """``out = sum_j weights[..., j] * values_full[indices[..., j]]`` (summed over heads with
    sum_heads) from this rank's value shard; differentiable in weights and values."""

    @staticmethod
    def forward(ctx, plan: _Plan, weights, indices, values):
        acc = weights.dtype
        all_weights, all_indices = _gather_selection(weights, indices, plan)
        width = values.shape[-1]
        mine, local_ids = _held_entries(all_indices, plan)
        if values.shape[0] and width:
            rows = _held_rows(values, local_ids, mine, acc)
            partial = torch.matmul(all_weights.unsqueeze(-2), rows).squeeze(-2)  # [B', H, T, D]
        else:
            partial = all_weights.new_zeros((*all_weights.shape[:-1], width))
        if plan.sum_heads:
            partial = partial.sum(1)
        if not plan.by_rows:  # finished columns: they travel in the output dtype
            partial = partial.to(plan.out_dtype)
        out = _finish_out(partial.contiguous(), plan)
        ctx.plan = plan
        ctx.save_for_backward(all_weights, all_indices, values)
        return out.to(plan.out_dtype)

    @staticmethod
    def backward(ctx, dout):
        plan = ctx.plan
        all_weights, all_indices, values = ctx.saved_tensors
        acc = all_weights.dtype
        _, need_weights, _, need_values = ctx.needs_input_grad
        mine, local_ids = _held_entries(all_indices, plan)
        head_dout = _dout_of_held(dout.contiguous(), plan).to(acc)  # travels in its own dtype
        if plan.sum_heads:
            head_dout = head_dout.unsqueeze(1)  # every head read into the same output
        held = bool(values.shape[0] and values.shape[-1])
        dweights = dvalues = None
        if need_weights:
            # dL/dweights_j = dout . v_j, summed over the shards holding v_j's rows or columns.
            if held:
                rows = _held_rows(values, local_ids, mine, acc)
                dweights = torch.matmul(rows, head_dout.unsqueeze(-1)).squeeze(-1)  # [B', H, T, k]
            else:
                dweights = torch.zeros_like(all_weights)
            if plan.sharded_queries:
                dweights = _comm.reduce_scatter_batch(dweights, plan.group, plan.layout)
            else:
                dist.all_reduce(dweights, group=plan.group)
        if need_values:
            contributions = (all_weights.unsqueeze(-1) * head_dout.unsqueeze(-2))[mine]  # [E, D]
            dvalues = _values_grad(contributions, local_ids[mine], values, plan, acc)
        return None, dweights, None, dvalues
