"""Reference (naive PyTorch) product-key memory read: the specification the fused kernels are checked against.

The read is split in two so the fused paths can reuse the halves:

- :func:`product_key_select` picks the slot ids (no gradient; selection is piecewise constant).
- :func:`product_key_gather` recomputes the selected scores from fixed slot ids and forms
  ``weights``, ``lse`` and ``out``, differentiably. It never forms anything of size T x N (its largest
  intermediates are the half scores, T x n_sub, and the gathered rows, T x k x Dv).
- :func:`product_key_read_ref` is ``product_key_gather(product_key_select(...))``.

Scores, softmax and sums are computed in float32 for float16/bfloat16 (float64 for float64); ``out``
is rounded once to the input dtype. Inputs are not validated beyond what the math needs: the public
API (``l2m.product_key_read``) checks shapes, dtypes and ``k``/``k_sub`` ranges before calling in.
"""
from __future__ import annotations

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _half_scores(q, subkeys, scale, acc):
    """Scores of each query half against its subkey table.

    q (B, H, T, Dk), subkeys (H, 2, n_sub, Dk // 2) -> s1, s2 each (B, H, T, n_sub) in ``acc``, with
    ``s = scale * (q_half @ subkeys[:, half]^T)`` (the dot product first, then the scale).
    float32 relies on PyTorch's default of no TF32 in matmul.
    """
    half_dim = q.shape[-1] // 2
    q_acc = q.to(acc)
    subkeys_acc = subkeys.to(acc)
    s1 = torch.matmul(q_acc[..., :half_dim], subkeys_acc[:, 0].transpose(-1, -2)) * scale
    s2 = torch.matmul(q_acc[..., half_dim:], subkeys_acc[:, 1].transpose(-1, -2)) * scale
    return s1, s2


def _default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def product_key_select(q, subkeys, k, k_sub=None, scale=None):
    """Slot ids of the ``k`` best product-key candidates per query and head (no gradient).

    Args:
        q:       (B, H, T, Dk), Dk even.
        subkeys: (H, 2, n_sub, Dk // 2), same dtype as q.
        k:       slots kept, 1 <= k <= k_sub ** 2.
        k_sub:   candidates kept per half, k_sub <= n_sub; defaults to k.
        scale:   score scale, defaults to Dk ** -0.5.

    Returns:
        indices (B, H, T, k) int64, slot ``i * n_sub + j``, ordered by descending candidate score
        ``s1[i] + s2[j]``; equal scores are ordered by the smaller slot.

    Ties are resolved exactly and without data-dependent control flow: each half keeps its
    ``k_sub`` best by a stable descending sort (equal scores keep ascending index order), and the
    candidates are first sorted by slot, then stably by descending score. NaN scores sort as the
    largest (``torch.sort`` semantics); the rows that hold them produce NaN outputs anyway.

    Equivalent PyTorch (per query and head, lists sorted by Python tuple keys):
        top1 = sorted(range(n_sub), key=lambda i: (-s1[i], i))[:k_sub]
        top2 = sorted(range(n_sub), key=lambda j: (-s2[j], j))[:k_sub]
        cands = [(s1[i] + s2[j], i * n_sub + j) for i in top1 for j in top2]
        indices = [slot for _, slot in sorted(cands, key=lambda c: (-c[0], c[1]))[:k]]
    """
    k_sub = k if k_sub is None else k_sub
    scale = _default_scale(q, scale)
    n_sub = subkeys.shape[-2]
    with torch.no_grad():
        s1, s2 = _half_scores(q, subkeys, scale, _acc_dtype(q.dtype))
        best1, sub_ids1 = torch.sort(s1, dim=-1, descending=True, stable=True)
        best2, sub_ids2 = torch.sort(s2, dim=-1, descending=True, stable=True)
        best1, sub_ids1 = best1[..., :k_sub], sub_ids1[..., :k_sub]
        best2, sub_ids2 = best2[..., :k_sub], sub_ids2[..., :k_sub]

        cand_shape = best1.shape[:-1] + (k_sub * k_sub,)
        cand_scores = (best1.unsqueeze(-1) + best2.unsqueeze(-2)).reshape(cand_shape)
        cand_slots = (sub_ids1.unsqueeze(-1) * n_sub + sub_ids2.unsqueeze(-2)).reshape(cand_shape)
        # Candidate slots are distinct, so sorting by slot first and then stably by score puts equal
        # scores in ascending slot order.
        cand_slots, by_slot = torch.sort(cand_slots, dim=-1)
        cand_scores = cand_scores.gather(-1, by_slot)
        _, by_score = torch.sort(cand_scores, dim=-1, descending=True, stable=True)
        return cand_slots.gather(-1, by_score[..., :k])


class _GatherRows(torch.autograd.Function):
    """``values[slot_ids]`` as float32/float64 rows, with a dense (N, Dv) gradient.

    The backward sums the row gradients in the compute dtype (not in float16/bfloat16, as plain
    indexing of half-precision values would) and only then casts to ``values.dtype``.
    """

    # forward/setup_context split: required for torch.func transforms (the custom ops' reference
    # backward runs torch.func.vjp through this Function).
    @staticmethod
    def forward(values, slot_ids, acc):
        rows = values.index_select(0, slot_ids.reshape(-1)).to(acc)
        return rows.reshape(slot_ids.shape + (values.shape[-1],))

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, slot_ids, _ = inputs
        ctx.save_for_backward(slot_ids)
        ctx.values_shape = values.shape
        ctx.values_dtype = values.dtype

    @staticmethod
    def backward(ctx, grad_rows):
        (slot_ids,) = ctx.saved_tensors
        num_slots, value_dim = ctx.values_shape
        flat_grad = grad_rows.reshape(slot_ids.numel(), value_dim)  # (not -1: Dv may be 0)
        grad_values = flat_grad.new_zeros((num_slots, value_dim)).index_add_(
            0, slot_ids.reshape(-1), flat_grad)
        return grad_values.to(ctx.values_dtype), None, None


@torch.compiler.allow_in_graph
class _GatherRowsSparseGrad(_GatherRows):
    """:class:`_GatherRows` whose ``values`` gradient is a coalesced ``torch.sparse_coo`` tensor.

    Only the touched rows are stored (like ``nn.EmbeddingBag(sparse=True)``, whose gradient is not
    coalesced); no dense (N, Dv) gradient is ever formed. Duplicate rows are summed in the compute
    dtype by ``coalesce()``, then the tensor is cast to ``values.dtype``.

    ``allow_in_graph``: Dynamo cannot trace the sparse constructor in the backward, so under
    ``torch.compile`` the Function is put in the graph whole instead (checked with the "eager" and
    "aot_eager" backends).

    Note: ``torch.autograd.grad`` returns this coalesced tensor as is; when it lands in
    ``values.grad`` through ``.backward()``, PyTorch's gradient accumulation re-wraps it and drops
    the ``is_coalesced()`` flag, although its indices stay unique and sorted.
    """

    @staticmethod
    def backward(ctx, grad_rows):
        (slot_ids,) = ctx.saved_tensors
        num_slots, value_dim = ctx.values_shape
        grad_values = torch.sparse_coo_tensor(
            slot_ids.reshape(1, -1), grad_rows.reshape(slot_ids.numel(), value_dim), (num_slots, value_dim),
            check_invariants=False).coalesce()
        return grad_values.to(ctx.values_dtype), None, None


def product_key_gather(q, subkeys, values, indices, scale=None, sum_heads=False, sparse_grad=False):
    """Read fixed product-key slots: weights, lse and out, differentiable in q, subkeys, values.

    Args:
        q:           (B, H, T, Dk), Dk even.
        subkeys:     (H, 2, n_sub, Dk // 2), same dtype as q.
        values:      (n_sub ** 2, Dv), same dtype as q, shared by all heads.
        indices:     (B, H, T, k) int slot ids in [0, n_sub ** 2) (not differentiated).
        scale:       score scale, defaults to Dk ** -0.5.
        sum_heads:   sum ``out`` over heads (in float32) -> (B, T, Dv).
        sparse_grad: make the gradient of ``values`` a coalesced ``torch.sparse_coo`` tensor.

    Returns:
        out (B, H, T, Dv) or (B, T, Dv) in q's dtype; weights (B, H, T, k) and lse (B, H, T) in
        float32 (float64 for float64). ``weights[..., m]`` belongs to ``indices[..., m]``.

    The slot scores are recomputed as ``s1[i] + s2[j]`` with ``i = slot // n_sub``,
    ``j = slot % n_sub``, from the same half-score matmuls :func:`product_key_select` ranks, so the
    selected scores are bitwise those the selection saw.

    Equivalent PyTorch:
        s1, s2 = scale * q[..., :Dk//2] @ subkeys[:, 0].mT, scale * q[..., Dk//2:] @ subkeys[:, 1].mT
        scores = s1.gather(-1, indices // n_sub) + s2.gather(-1, indices % n_sub)
        weights, lse = scores.softmax(-1), scores.logsumexp(-1)
        out = (weights[..., None] * values[indices]).sum(-2)   # .sum(1) over heads if sum_heads
    """
    acc = _acc_dtype(q.dtype)
    scale = _default_scale(q, scale)
    n_sub = subkeys.shape[-2]
    slot_ids = indices.to(torch.int64)
    s1, s2 = _half_scores(q, subkeys, scale, acc)
    scores = s1.gather(-1, slot_ids // n_sub) + s2.gather(-1, slot_ids % n_sub)  # [B, H, T, k]
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.softmax(scores, dim=-1)
    gather_rows = _GatherRowsSparseGrad if sparse_grad else _GatherRows
    rows = gather_rows.apply(values, slot_ids, acc)  # [B, H, T, k, Dv]
    out = (weights.unsqueeze(-1) * rows).sum(dim=-2)
    if sum_heads:
        out = out.sum(dim=1)
    return out.to(q.dtype), weights, lse


def product_key_read_ref(q, subkeys, values, k, k_sub=None, scale=None, sum_heads=False,
                         sparse_grad=False):
    """Product-key memory read (SPEC section 2): select the k best slots, then read them.

    Args:
        q:           (B, H, T, Dk), Dk even.
        subkeys:     (H, 2, n_sub, Dk // 2), one pair of subkey tables per query head.
        values:      (n_sub ** 2, Dv), shared by all heads.
        k:           slots read per query and head, 1 <= k <= k_sub ** 2.
        k_sub:       candidates per half, k_sub <= n_sub; defaults to k.
        scale:       defaults to Dk ** -0.5; ``s = scale * <q_half, subkey>``.
        sum_heads:   return out summed over heads, (B, T, Dv).
        sparse_grad: gradient of ``values`` as a coalesced ``torch.sparse_coo`` tensor.

    Returns:
        (out, indices, weights, lse): out (B, H, T, Dv) or (B, T, Dv) in the input dtype;
        indices (B, H, T, k) int64; weights (B, H, T, k) and lse (B, H, T) float32 (float64 for
        float64). Differentiable in q, subkeys and values through out, weights and lse.

    Ordering and ties are as in :func:`product_key_select`; with k_sub = n_sub (or any
    k_sub >= k) the result is the exact top-k over all n_sub ** 2 slots.

    Equivalent PyTorch:
        indices = product_key_select(q, subkeys, k, k_sub, scale)
        out, weights, lse = product_key_gather(q, subkeys, values, indices, scale, sum_heads, sparse_grad)
    """
    indices = product_key_select(q, subkeys, k, k_sub, scale)
    out, weights, lse = product_key_gather(q, subkeys, values, indices, scale, sum_heads, sparse_grad)
    return out, indices, weights, lse
