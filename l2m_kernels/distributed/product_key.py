"""Exact product-key memory read with replicated sub-keys and values sharded across a
``torch.distributed`` group, by rows (slots) or by columns (feature ranges).

Every rank holds the same queries and sub-keys, so every rank computes the same selection with the
single-device op itself: :func:`l2m_kernels.product_key_read` on a zero-width ``(n_sub ** 2, 0)``
values tensor returns the indices, weights and lse of the whole memory (selection and weights do
not depend on the values) and stays differentiable in ``q`` and ``subkeys``. Only the weighted sum
of the value rows is split:

- ``shard="rows"``: rank r holds slots ``[offset_r, offset_r + N_r)``; it sums ``weights x values``
  over the selected slots it holds, and one all-reduce of the partial outputs gives ``out``.
- ``shard="columns"``: rank r holds features ``[c_r, c_r + Dv_r)`` of every slot; it forms those
  columns of ``out``, and one all-gather along the feature dimension gives the whole ``out``.

Backward: ``dvalues`` stays on the rank holding the rows or columns. The one term of the selection's
gradient that depends on the values, ``dL/dweights_j += dout . v_j``, is a partial sum on each rank
(its slots or its columns); one all-reduce of these ``k`` numbers per query and head completes it,
and every rank then runs the single-device op's backward for ``dq`` and ``dsubkeys`` on the same
numbers. (All-reducing ``dq`` and ``dsubkeys`` instead would send ``Dk`` numbers per query plus the
whole ``H x n_sub x Dk`` sub-key gradient.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validation as v
from ..ops._common import MemoryRead, acc_dtype, autocast_promote
from ..ops.product_key import product_key_read
from ..ops.product_key.validate import check_args
from . import _meta
from ._meta import (MISSING, Field, ShardLayout, bits_checksum, dtype_code, float_code, shape_code,
                    show_dtype, show_flag, show_float, show_shape)

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
    Field("scale", 1, show_float),
    Field("sum_heads", 1, show_flag),
    Field("selection requires grad", 1, show_flag),
    Field("q checksum", 1),
    Field("subkeys checksum", 1),
)


@dataclass(frozen=True)
class _Plan:
    """The non-tensor arguments of one read's weighted sum, agreed by every rank."""

    group: object
    layout: ShardLayout   # row shards (slots) or column shards (features), per ``by_rows``
    by_rows: bool
    sum_heads: bool
    out_dtype: torch.dtype


def sharded_product_key_read(q, subkeys, values, k, *, k_sub=None, group=None, shard="rows", scale=None,
                             sum_heads=False, check=True, backend=None, deterministic=False,
                             sparse_grad=False) -> MemoryRead:
    """Exact product-key read of a memory whose values are split across the ranks of ``group``.

    Every rank passes the same ``q`` and ``subkeys`` (replicated, as in a tensor-parallel group) and
    its own shard of ``values``; every rank gets :func:`l2m_kernels.product_key_read` of the whole
    memory, and each shard's gradient is that of the one loss (computed alike on every rank).

    Args:
        q:       (B, H, T, Dk) queries, Dk even, the same on every rank.
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
        scale:   score scale, default Dk ** -0.5.
        sum_heads: sum the heads' reads into one (B, T, Dv) output.
        check:   compare every rank's shapes, dtype, k, k_sub, shard mode, scale, sum_heads, grad
                 requirement and checksums of q and subkeys in one small all-gather, raising the same
                 ``ValueError`` on every rank on a mismatch instead of hanging in a later collective.
                 False: only the shard sizes are gathered.
        backend, deterministic: of the selection (``product_key_read``'s arguments).
        sparse_grad: not supported (raises ``NotImplementedError``); the shard's gradient is dense.

    Returns:
        MemoryRead(out (B, H, T, Dv) or (B, T, Dv) in the input dtype with the whole Dv in both
        modes, indices (B, H, T, k) int64 slot ids ``i * n_sub + j``, weights (B, H, T, k) and
        lse (B, H, T) float32, float64 for float64), the same on every rank.

    Equivalent PyTorch (``values_full``: the row shards concatenated along dim 0, or the column
    shards along dim 1):
        l2m_kernels.product_key_read(q, subkeys, values_full, k, k_sub=k_sub, scale=scale,
                                     sum_heads=sum_heads)
    """
    if sparse_grad:
        raise NotImplementedError(f"{OP}: sparse_grad=True is not supported; the values shard's "
                                  "gradient is dense (N_r, Dv) or (n_sub ** 2, Dv_r)")
    q, subkeys, values = autocast_promote(q, subkeys, values)
    _, world_size = _meta.group_rank(group)
    local_error = None
    try:
        k, k_sub, scale = _check_local(q, subkeys, values, k, k_sub, shard, scale, sum_heads,
                                       deterministic, backend)
    except (TypeError, ValueError, NotImplementedError) as error:
        local_error = error
    by_rows = shard == "rows"
    shard_size = 0
    if local_error is None:
        shard_size = values.shape[0] if by_rows else values.shape[1]
    codes = _codes(q, subkeys, values, k, k_sub, shard, scale, sum_heads,
                   local_error is None) if check else {}
    layout, _ = _meta.exchange(OP, group, q.device, shard_size, _FIELDS, codes, local_error, check)
    num_slots = subkeys.shape[2] ** 2
    if by_rows and layout.total != num_slots:
        raise ValueError(f"values: the row shards hold N_0 + ... + N_{world_size - 1} = {layout.total} "
                         f"slots ({list(layout.sizes)}), expected n_sub ** 2 = {num_slots}")

    # The selection, alike on every rank: values enter only through the weighted sum below.
    selection = product_key_read(q, subkeys, values.new_zeros((num_slots, 0)), k, k_sub=k_sub,
                                 scale=scale, deterministic=deterministic, backend=backend)
    plan = _Plan(group, layout, by_rows, bool(sum_heads), q.dtype)
    out = _ShardedWeightedSum.apply(plan, selection.weights, selection.indices, values)
    return MemoryRead(out, selection.indices, selection.weights, selection.lse)


def _check_local(q, subkeys, values, k, k_sub, shard, scale, sum_heads, deterministic, backend):
    """This rank's arguments, before any collective; returns ``(k, k_sub, scale)``."""
    if not isinstance(shard, str) or shard not in SHARD_MODES:
        raise ValueError(f"shard: expected one of {SHARD_MODES}, got {shard!r}")
    v.require_ndim("subkeys", subkeys, (4,), "(H, 2, n_sub, Dk // 2)")
    v.require_ndim("values", values, (2,), "(N_r, Dv)" if shard == "rows" else "(n_sub ** 2, Dv_r)")
    n_sub = subkeys.shape[2]
    if shard == "columns":
        v.require_shape("values", values, (n_sub * n_sub, None), "(n_sub ** 2, Dv_r)")
    v.require_same_dtype("q", q, subkeys=subkeys, values=values)
    v.require_same_device(q=q, subkeys=subkeys, values=values)
    # The single-device op's checks of q, subkeys, k, k_sub, scale and backend (values: a stand-in).
    k, k_sub, scale, *_ = check_args(q, subkeys, values.new_empty((n_sub * n_sub, 0)), k, k_sub, scale,
                                     sum_heads, False, deterministic, backend)
    return k, k_sub, scale


def _codes(q, subkeys, values, k, k_sub, shard, scale, sum_heads, local_ok: bool):
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
        "scale": float_code(scale) if scale_ok else (MISSING,),
        "sum_heads": (int(bool(sum_heads)),),
        "selection requires grad": (int(selection_grad),),
        "q checksum": (bits_checksum(q) if local_ok else 0,),
        "subkeys checksum": (bits_checksum(subkeys) if local_ok else 0,),
    }


# ---- the weighted sum of the value shards ------------------------------------------------------

def _held_entries(indices: Tensor, plan: _Plan):
    """``(mine (B, H, T, k) bool, local row ids (B, H, T, k))``: the selected slots this rank's
    shard holds (every slot with column shards) and their rows in ``values`` (0 elsewhere)."""
    if not plan.by_rows:
        return torch.ones_like(indices, dtype=torch.bool), indices
    local = indices - plan.layout.offset
    mine = (local >= 0) & (local < plan.layout.size)
    return mine, torch.where(mine, local, 0)


def _held_rows(values: Tensor, local_ids: Tensor, mine: Tensor, acc: torch.dtype) -> Tensor:
    """(B, H, T, k, D) value rows of the held entries, 0 for the others."""
    rows = values.index_select(0, local_ids.reshape(-1)).to(acc)
    rows = rows.reshape(*local_ids.shape, values.shape[-1])
    return torch.where(mine.unsqueeze(-1), rows, 0.0)


def _gather_columns(local_out: Tensor, plan: _Plan) -> Tensor:
    """Every rank's ``(..., Dv_r)`` columns concatenated in rank order: ``(..., Dv)``; the shards
    are padded to the widest for the all-gather."""
    widest = max(plan.layout.sizes)
    padded = torch.nn.functional.pad(local_out, (0, widest - local_out.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(plan.layout.world_size)]
    dist.all_gather(parts, padded, group=plan.group)
    return torch.cat([part[..., :width] for part, width in zip(parts, plan.layout.sizes)], -1)


def _head_dout(dout: Tensor, plan: _Plan, acc: torch.dtype) -> Tensor:
    """The output gradient per head, (B, H or 1, T, D) in ``acc`` (with sum_heads every head read
    into the same output); only this rank's columns with column shards."""
    if not plan.by_rows:
        dout = dout.narrow(-1, plan.layout.offset, plan.layout.size)
    dout = dout.to(acc)
    return dout.unsqueeze(1) if plan.sum_heads else dout


class _ShardedWeightedSum(torch.autograd.Function):
    """``out = sum_j weights[..., j] * values_full[indices[..., j]]`` (summed over heads with
    sum_heads) from this rank's value shard; differentiable in weights and values."""

    @staticmethod
    def forward(ctx, plan: _Plan, weights, indices, values):
        acc = weights.dtype
        B, H, T, _ = weights.shape
        width = values.shape[-1]
        mine, local_ids = _held_entries(indices, plan)
        if values.shape[0] and width:
            rows = _held_rows(values, local_ids, mine, acc)
            partial = torch.matmul(weights.unsqueeze(-2), rows).squeeze(-2)  # [B, H, T, D]
        else:
            partial = weights.new_zeros((B, H, T, width))
        if plan.sum_heads:
            partial = partial.sum(1)
        if plan.by_rows:
            dist.all_reduce(partial, group=plan.group)
            out = partial.to(plan.out_dtype)
        else:
            out = _gather_columns(partial.to(plan.out_dtype), plan)
        ctx.plan = plan
        ctx.save_for_backward(weights, indices, values)
        return out

    @staticmethod
    def backward(ctx, dout):
        plan = ctx.plan
        weights, indices, values = ctx.saved_tensors
        acc = weights.dtype
        _, need_weights, _, need_values = ctx.needs_input_grad
        mine, local_ids = _held_entries(indices, plan)
        head_dout = _head_dout(dout, plan, acc)  # [B, H or 1, T, D]
        held = bool(values.shape[0] and values.shape[-1])
        dweights = dvalues = None
        if need_weights:
            # dL/dweights_j = dout . v_j, summed over the shards holding v_j's rows or columns.
            if held:
                rows = _held_rows(values, local_ids, mine, acc)
                dweights = torch.matmul(rows, head_dout.unsqueeze(-1)).squeeze(-1)  # [B, H, T, k]
            else:
                dweights = torch.zeros_like(weights)
            dist.all_reduce(dweights, group=plan.group)
        if need_values:
            grad = torch.zeros(values.shape, dtype=acc, device=values.device)
            if held:
                contributions = weights.unsqueeze(-1) * head_dout.unsqueeze(-2)  # [B, H, T, k, D]
                grad.index_add_(0, local_ids[mine], contributions[mine])
            dvalues = grad.to(values.dtype)
        return None, dweights, None, dvalues
