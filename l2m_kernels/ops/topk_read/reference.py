"""Reference (naive PyTorch) sparse top-k memory read: the specification the fused kernels are
checked against, and the baseline the benchmarks compare with (SPEC section 1).

The read is split in two so that fused backends can reuse the differentiable half:

- :func:`topk_read_select` picks the slots (no gradient: the selection is piecewise constant). It
  forms the full ``(B, H, T, N)`` score matrix, as a naive implementation does.
- :func:`topk_read_gather` recomputes the selected scores from the gathered key rows and forms the
  softmax, log-sum-exp and weighted sum of the gathered value rows. It is differentiable in ``q``,
  ``keys`` and ``values`` and never forms anything of size ``T x N`` (only ``(B, H, T, k, D)``), so a
  fused forward can use it as its recompute-backward.
- :func:`topk_memory_read_ref` is exactly ``topk_read_gather(q, keys, values,
  topk_read_select(q, keys, k, scale, valid_len), scale)``.

No input validation is done here beyond what the math needs; the public API validates.

Semantics fixed here where SPEC section 1 is silent (the fused backends must match):

- Order: the ``k`` best existing slots by descending score, ties broken by the smaller slot index,
  returned in that order. Non-existent slots (``n >= valid_len[b]``) are never selected; when
  fewer than ``k`` slots exist the tail entries are ``-1`` with weight 0, and with none the row has
  ``out = 0``, ``lse = -inf`` and zero (finite) gradients.
- NaN scores rank like ``+inf`` (above every finite score, tied with each other and with ``+inf``,
  ties by smaller slot). So a NaN query row selects the first ``k`` existing slots and its ``out``,
  ``weights`` (at the selected entries) and ``lse`` are NaN; a NaN in an existing key row is
  selected by every query of that (batch, memory head) and makes those rows NaN, because every such
  row depends on it. NaN in non-existent slots is ignored. Other rows are never affected.
- An existing slot whose score is ``-inf`` (overflow) ranks after every finite score and before
  non-existent slots; it keeps its index and gets weight 0.
- Exact ties need exactly equal scores. Scores are ``(scale * q) @ keys^T`` in the accumulation
  dtype; identical key rows give identical scores whenever the matmul rounds their columns alike
  (always for exactly representable data, e.g. small integers with a power-of-two scale).
- Precision: float16/bfloat16/float32 inputs are upcast and computed in float32 (the matmuls run
  in float32; on CUDA this assumes ``torch.backends.cuda.matmul.allow_tf32`` is False, the
  PyTorch default); float64 in float64.
"""
from __future__ import annotations

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _default_scale(q: torch.Tensor, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def _slot_exists(valid_len, num_slots: int, device) -> torch.Tensor | None:
    """(B, 1, 1, N) bool: slot n exists for batch b; None when every slot exists."""
    if valid_len is None:
        return None
    slot_ids = torch.arange(num_slots, device=device)
    return slot_ids < valid_len.to(device=device).reshape(-1, 1, 1, 1)


def full_scores(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """All scores ``scale * <q, keys_n>`` in the accumulation dtype, for grouped/shared memories.

    Args:
        q:     (B, H, T, Dk).
        keys:  (B, Hm, N, Dk) or shared (Hm, N, Dk); H % Hm == 0.
        scale: python float.

    Returns:
        (B, H, T, N) float32 (float64 for float64 input).

    Equivalent PyTorch:
        keys_h = keys.repeat_interleave(H // Hm, dim=-3)
        scores = (scale * q.float()) @ keys_h.float().transpose(-1, -2)
    """
    acc = _acc_dtype(q.dtype)
    batch, heads, seq_len, dim_k = q.shape
    mem_heads, num_slots = keys.shape[-3], keys.shape[-2]
    group = heads // mem_heads
    # Query head h = hm * group + g, so (B, H, T, Dk) -> (B, Hm, group * T, Dk) needs no repeated keys.
    # Scaling q (not the scores) saves a pass over the (T, N) matrix.
    q_grouped = (q.to(acc) * scale).reshape(batch, mem_heads, group * seq_len, dim_k)
    scores = torch.matmul(q_grouped, keys.to(acc).transpose(-1, -2))
    return scores.reshape(batch, heads, seq_len, num_slots)


def topk_read_select(q, keys, k: int, scale=None, valid_len=None) -> torch.Tensor:
    """The slots a top-k memory read selects (no gradient).

    Args:
        q:         (B, H, T, Dk) float16/bfloat16/float32/float64.
        keys:      (B, Hm, N, Dk) or shared (Hm, N, Dk), same dtype; H % Hm == 0.
        k:         1 <= k <= N.
        scale:     python float, default Dk ** -0.5.
        valid_len: optional (B,) integer tensor, 0 <= valid_len[b] <= N.

    Returns:
        indices (B, H, T, k) int64: per query the k best existing slots by descending score, ties
        broken by the smaller slot index, in that order; -1 for the entries beyond the number of
        existing slots. NaN scores rank like +inf (see the module docstring).

    Equivalent PyTorch (per query row; exact because the sort is stable):
        scores = scale * keys_h @ q_row                   # float32 / float64
        scores[valid_len[b]:] = -inf
        scores = torch.where(scores.isnan(), inf, scores)
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        indices = torch.where(order < valid_len[b], order, -1)

    Implemented without data-dependent control flow, so it traces under
    ``torch.compile(fullgraph=True)``: ``torch.topk`` gives the k-th best score ``kth`` and every
    slot strictly above it (``num_above < k`` of them); a second top-k over the integer key
    ``slot if score == kth else N`` gives the smallest ``k - num_above`` tied slots (``torch.topk``
    alone may return any of the tied ones); the k picked slots are sorted ascending and then
    stably by descending score.
    """
    scale = _default_scale(q, scale)
    # A fresh tensor, so the masking below can run in place (it is the largest buffer here).
    rank_scores = full_scores(q.detach(), keys.detach(), scale)
    num_slots = rank_scores.shape[-1]
    inf = float("inf")
    rank_scores.nan_to_num_(nan=inf, posinf=inf, neginf=-inf)  # NaN ranks like +inf
    exists = _slot_exists(valid_len, num_slots, rank_scores.device)
    if exists is not None:
        rank_scores.masked_fill_(~exists, -inf)

    # topk returns every entry above the k-th best score but an arbitrary subset of the entries
    # tied with it: replace those by the smallest tied slot ids.
    top_scores, top_slots = torch.topk(rank_scores, k, dim=-1, sorted=True)
    kth_best = top_scores[..., k - 1:k]
    # int32 keys halve the (B, H, T, N) buffer.
    key_dtype = torch.int32 if num_slots < 2**31 - 1 else torch.int64
    slot_ids = torch.arange(num_slots, device=rank_scores.device, dtype=key_dtype)
    tied_key = torch.where(rank_scores == kth_best, slot_ids, num_slots)
    tied_slots = torch.topk(tied_key, k, dim=-1, largest=False, sorted=True).values.to(torch.int64)
    num_above = (top_scores > kth_best).sum(dim=-1, keepdim=True)
    position = torch.arange(k, device=rank_scores.device)
    from_tied = torch.gather(tied_slots, -1, (position - num_above).clamp_min(0))
    picked_slots = torch.where(position < num_above, top_slots, from_tied)

    # Ascending slots, then a stable descending sort on score: ties go to the smaller slot.
    picked_slots = torch.sort(picked_slots, dim=-1).values
    picked_scores = torch.gather(rank_scores, -1, picked_slots)
    order = torch.sort(picked_scores, dim=-1, descending=True, stable=True).indices
    indices = torch.gather(picked_slots, -1, order)
    if valid_len is not None:
        valid = valid_len.to(device=indices.device).reshape(-1, 1, 1, 1)
        indices = torch.where(indices < valid, indices, -1)
    return indices


def gather_slots(memory: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Rows of a (grouped, possibly shared) memory at per-query slot ids (differentiable).

    Args:
        memory:   (B, Hm, N, D) or shared (Hm, N, D).
        slot_ids: (B, H, T, k) int64 in [0, N); H % Hm == 0, query head h reads head h // (H // Hm).

    Returns:
        (B, H, T, k, D) in the dtype of ``memory``.

    Equivalent PyTorch:
        memory_h = memory.expand(B, Hm, N, D).repeat_interleave(H // Hm, dim=1)
        rows = memory_h[b, h, slot_ids[b, h, t, j]]  for every (b, h, t, j)
    """
    batch, heads, seq_len, k = slot_ids.shape
    mem_heads, dim = memory.shape[-3], memory.shape[-1]
    per_head = (heads // mem_heads) * seq_len * k
    if memory.dim() == 3:
        # Shared memory: gather per memory head over all batch elements, no batch expansion.
        ids = slot_ids.reshape(batch, mem_heads, per_head).transpose(0, 1)
        ids = ids.reshape(mem_heads, batch * per_head)
        rows = torch.gather(memory, 1, ids.unsqueeze(-1).expand(-1, -1, dim))
        rows = rows.reshape(mem_heads, batch, per_head, dim).transpose(0, 1)
    else:
        ids = slot_ids.reshape(batch, mem_heads, per_head)
        rows = torch.gather(memory, 2, ids.unsqueeze(-1).expand(-1, -1, -1, dim))
    return rows.reshape(batch, heads, seq_len, k, dim)


def masked_softmax_lse(scores: torch.Tensor, dead: torch.Tensor):
    """Softmax and log-sum-exp over the last dim, skipping ``dead`` entries, with safe gradients.

    Args:
        scores: (..., L) float32/float64; values at dead entries are ignored (may be NaN/inf).
        dead:   bool, broadcastable to ``scores``: entries that do not take part.

    Returns:
        weights (..., L), 0 at dead entries; lse (...), -inf for rows with no live entry (those rows
        get weights 0 and exactly zero gradients: no exp(-inf - -inf)). NaN among live entries makes
        the row's weights and lse NaN.

    Equivalent PyTorch:
        masked = scores.masked_fill(dead, -inf)
        lse = torch.logsumexp(masked, -1); weights = torch.softmax(masked, -1)  # 0 / -inf if empty
    """
    neg_inf = float("-inf")
    if scores.shape[-1] == 0:
        # No entries at all (an empty local context, S == 0): every row is empty. amax would
        # refuse the empty reduction; the sum keeps lse in the autograd graph.
        return scores, scores.sum(dim=-1) + neg_inf
    safe_scores = torch.where(dead, 0.0, scores)
    row_max = torch.where(dead, neg_inf, scores).detach().amax(dim=-1, keepdim=True)
    row_empty = torch.isneginf(row_max)
    shift = torch.where(row_empty, 0.0, row_max)
    exp_terms = torch.where(dead, 0.0, torch.exp(safe_scores - shift))
    total = torch.where(row_empty, 1.0, exp_terms.sum(dim=-1, keepdim=True))
    weights = torch.where(dead, 0.0, exp_terms / total)
    lse = torch.where(row_empty, neg_inf, shift + torch.log(total)).squeeze(-1)
    return weights, lse


def _topk_read_gather_acc(q, keys, values, indices, scale):
    """topk_read_gather with ``out`` left in the accumulation dtype."""
    acc = _acc_dtype(q.dtype)
    missing = indices < 0
    safe_ids = indices.clamp_min(0)
    # Missing entries read slot 0, which may hold garbage (NaN) or not exist: zero those rows so
    # nothing leaks into out or into the gradients.
    missing_rows = missing.unsqueeze(-1)
    key_rows = torch.where(missing_rows, 0.0, gather_slots(keys, safe_ids).to(acc))
    value_rows = torch.where(missing_rows, 0.0, gather_slots(values, safe_ids).to(acc))
    # (B, H, T, k, Dk) @ (B, H, T, Dk, 1): the k selected scores of each query.
    scores = torch.matmul(key_rows, (q.to(acc) * scale).unsqueeze(-1)).squeeze(-1)
    weights, lse = masked_softmax_lse(scores, missing)
    out = torch.matmul(weights.unsqueeze(-2), value_rows).squeeze(-2)
    return out, weights, lse


def topk_read_gather(q, keys, values, indices, scale=None):
    """Softmax read of given memory slots; differentiable in q, keys and values.

    Args:
        q:       (B, H, T, Dk) float16/bfloat16/float32/float64.
        keys:    (B, Hm, N, Dk) or shared (Hm, N, Dk), same dtype; H % Hm == 0.
        values:  same leading shape as ``keys``, last size Dv, same dtype.
        indices: (B, H, T, k) int64 slot ids in [0, N), or -1 for "no entry" (contributes nothing,
                 weight 0, zero gradient).
        scale:   python float, default Dk ** -0.5.

    Returns:
        out (B, H, T, Dv) in the input dtype; weights (B, H, T, k) and lse (B, H, T) float32
        (float64 for float64 input). A row with no entry has out = 0, lse = -inf.

    Never forms anything of size T x N: it gathers the k selected key and value rows
    ((B, H, T, k, D)) and recomputes their scores, so it serves as the recompute-backward of fused
    forwards.

    Equivalent PyTorch (per query row, rows with index -1 dropped):
        scores = scale * keys_h[indices].float() @ q_row.float()
        weights = torch.softmax(scores, -1); lse = torch.logsumexp(scores, -1)
        out = weights @ values_h[indices].float()
    """
    scale = _default_scale(q, scale)
    out, weights, lse = _topk_read_gather_acc(q, keys, values, indices, scale)
    return out.to(values.dtype), weights, lse


def topk_memory_read_ref(q, keys, values, k: int, scale=None, valid_len=None):
    """Reference sparse top-k memory read (SPEC section 1).

    Args:
        q:         (B, H, T, Dk) float16/bfloat16/float32/float64.
        keys:      (B, Hm, N, Dk) or shared (Hm, N, Dk), same dtype; H % Hm == 0, query head h
                   reads memory head h // (H // Hm).
        values:    same leading shape as ``keys``, last size Dv, same dtype.
        k:         1 <= k <= N.
        scale:     python float, default Dk ** -0.5.
        valid_len: optional (B,) integer tensor; slots n >= valid_len[b] do not exist for batch b.

    Returns:
        (out, indices, weights, lse): out (B, H, T, Dv) in the input dtype; indices (B, H, T, k)
        int64 (-1 for missing entries); weights (B, H, T, k) and lse (B, H, T) float32 (float64 for
        float64 input). Differentiable in q, keys and values through out, weights and lse; the
        selection itself is constant. Tie, NaN and -inf rules: see the module docstring.

    Equivalent PyTorch (per query row):
        scores = scale * keys_h.float() @ q_row.float(); scores[valid_len[b]:] = -inf
        sel = torch.sort(scores, descending=True, stable=True).indices[:k]   # ties: smaller slot
        live = sel < valid_len[b]
        weights = softmax(scores[sel][live]) (0 elsewhere); lse = logsumexp(scores[sel][live])
        out = weights @ values_h[sel].float(); indices = where(live, sel, -1)
    """
    scale = _default_scale(q, scale)
    indices = topk_read_select(q, keys, k, scale, valid_len)
    out, weights, lse = topk_read_gather(q, keys, values, indices, scale)
    return out, indices, weights, lse
