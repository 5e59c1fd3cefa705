"""The selection steps of a :class:`~l2m_kernels.memory.MemoryStore` read, with their references.

Both steps work per memory head on query rows ``q (Hm, R, D)`` that already carry every factor of
the score (the softmax scale and, for int8 keys, the channel scales), and return per row the ``k``
best ``(score, slot)`` pairs: descending score, ties to the smaller slot, NaN ranked like +inf;
``-inf`` / ``-1`` where fewer than ``k`` candidates exist. Scores are accumulated in float64 and
returned as float32.

- :func:`int8_topk`: exact over every slot of int8 keys ``(Hm, N, D)``. CPU kernel
  (``csrc/cpu/int8_topk.cpp``): an int8 dot-product filter (AVX-512 VNNI where the CPU has it) with
  a bound that proves which slots cannot enter the top-k, and exact float64 rescoring of the rest.
- :func:`block_candidates_topk`: exact within each row's list of blocks of a staging buffer
  ``(U, Hm, S, D)`` (float32 or int8): the second level of a two-level read (CPU kernel
  ``csrc/cpu/store_read.cpp``).

Elsewhere (CUDA tensors, or no compiled extension) both run the brute-force references below in
chunks of rows, which never hold more than ``chunk x candidates`` scores.

:func:`topk_values_read` then reads a selection: the softmax weights and log-sum-exp of the ``k``
selected scores and the weighted sum of the selected value rows, dequantised inside the CPU kernel
(``csrc/cpu/store_read.cpp``); its reference is :func:`topk_values_read_ref`.
"""
from __future__ import annotations

import torch

from .._ext import cpu_extension
from ..ops.topk_read.reference import masked_softmax_lse
from . import formats

_NO_SLOT = torch.iinfo(torch.int64).max


def _kernels(*tensors):
    """The CPU extension when every tensor is on the CPU and it has the store kernels."""
    if all(t.device.type == "cpu" for t in tensors):
        ext = cpu_extension()
        if ext is not None and hasattr(ext, "_store_int8_topk"):
            return ext
    return None


def rank_top(scores: torch.Tensor, slots: torch.Tensor, k: int):
    """The k best of candidate ``scores (..., C)`` float64 with their ``slots (..., C)`` int64
    (``_NO_SLOT``: not a candidate), in the selection order.

    Equivalent PyTorch:
        order by slot ascending, then stably by rank descending (NaN ranked like +inf,
        a non-candidate below everything); take k; pad with (-inf, -1).
    """
    by_slot = torch.sort(slots, dim=-1, stable=True)
    slots = by_slot.values
    scores = torch.gather(scores, -1, by_slot.indices)
    rank = torch.where(torch.isnan(scores), float("inf"), scores)
    rank = torch.where(slots == _NO_SLOT, float("-inf"), rank)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    count = scores.shape[-1]
    order = order[..., :k]
    top_scores = torch.gather(scores, -1, order)
    top_slots = torch.gather(slots, -1, order)
    missing = top_slots == _NO_SLOT
    top_scores = torch.where(missing, float("-inf"), top_scores)
    top_slots = torch.where(missing, -1, top_slots)
    if count < k:
        pad = list(top_scores.shape[:-1]) + [k - count]
        top_scores = torch.cat([top_scores, top_scores.new_full(pad, float("-inf"))], -1)
        top_slots = torch.cat([top_slots, top_slots.new_full(pad, -1)], -1)
    return top_scores.float(), top_slots


def exact_topk_ref(q: torch.Tensor, keys: torch.Tensor, k: int, *, chunk: int = 256):
    """Brute-force exact top-k of ``q (Hm, R, D)`` over ``keys (Hm, N, D)`` (any real dtype, used
    as stored), float64 scores; rows in chunks.

    Equivalent PyTorch:
        scores = q.double() @ keys.double().transpose(-1, -2)       # (Hm, R, N)
        then rank_top(scores, arange(N), k)
    """
    heads, rows, _ = q.shape
    num_slots = keys.shape[1]
    keys64 = keys.double()
    slot_ids = torch.arange(num_slots, device=q.device)
    scores_out = torch.empty(heads, rows, k, dtype=torch.float32, device=q.device)
    slots_out = torch.empty(heads, rows, k, dtype=torch.int64, device=q.device)
    for start in range(0, rows, chunk):
        part = q[:, start:start + chunk].double()
        scores = part @ keys64.transpose(-1, -2)
        slots = slot_ids.expand(scores.shape)
        top_scores, top_slots = rank_top(scores, slots, k)
        scores_out[:, start:start + chunk] = top_scores
        slots_out[:, start:start + chunk] = top_slots
    return scores_out, slots_out


def int8_topk(q: torch.Tensor, keys: torch.Tensor, key_abs: torch.Tensor, key_sum: torch.Tensor,
              k: int, refine=None):
    """Exact top-k of ``q (Hm, R, D)`` float32 over int8 ``keys (Hm, N, D)``; ``key_abs`` /
    ``key_sum`` ``(Hm, N)`` int32 are each key's ``sum |k8|`` / ``sum k8``. Returns
    ``(scores (Hm, R, k) float32, slots (Hm, R, k) int64)``.

    ``refine = (q_refine (Hm, R, D), refine_keys (Hm, N, D) float32, slack (Hm, R))``: the scores
    are ``q_refine . refine_keys`` (exact over the float keys), the int8 keys only filtering;
    ``slack`` bounds, per row, the difference of the two scores over every slot."""
    ext = _kernels(q, keys)
    if ext is not None and keys.shape[1] > 0:
        extra = {}
        if refine is not None:
            q_refine, refine_keys, slack = refine
            extra = dict(q_refine=q_refine.float().contiguous(), refine_keys=refine_keys,
                         slack=slack.float().contiguous())
        return ext._store_int8_topk(q.float().contiguous(), keys, key_abs.contiguous(),
                                    key_sum.contiguous(), k, **extra)
    if refine is not None:
        return exact_topk_ref(refine[0], refine[1], k)
    return exact_topk_ref(q, keys, k)


def block_candidates_ref(q, keys, blocks, block_slot, block_len, k, *, chunk: int = 64):
    """Brute-force :func:`block_candidates_topk`, rows in chunks of ``chunk``.

    Equivalent PyTorch (per head h and row r):
        candidates = [(q[h, r] . keys[u, h, s], block_slot[u] + s)
                      for u in blocks[h, r] if u >= 0 for s in range(block_len[u])]
        then rank_top over the candidates
    """
    heads, rows, dim = q.shape
    size = keys.shape[2]
    selected = blocks.shape[2]
    scores_out = torch.empty(heads, rows, k, dtype=torch.float32, device=q.device)
    slots_out = torch.empty(heads, rows, k, dtype=torch.int64, device=q.device)
    offsets = torch.arange(size, device=q.device)
    head_ids = torch.arange(heads, device=q.device)[:, None, None]
    for start in range(0, rows, chunk):
        ids = blocks[:, start:start + chunk]                              # (Hm, c, KB)
        safe = ids.clamp_min(0)
        rows_keys = keys[safe, head_ids].double()                        # (Hm, c, KB, S, D)
        scores = torch.einsum("hcd,hcbsd->hcbs", q[:, start:start + chunk].double(), rows_keys)
        live = (ids >= 0).unsqueeze(-1) & (offsets < block_len[safe].unsqueeze(-1))
        slots = torch.where(live, block_slot[safe].unsqueeze(-1) + offsets, _NO_SLOT)
        count = ids.shape[1]
        top_scores, top_slots = rank_top(scores.reshape(heads, count, selected * size),
                                         slots.reshape(heads, count, selected * size), k)
        scores_out[:, start:start + chunk] = top_scores
        slots_out[:, start:start + chunk] = top_slots
    return scores_out, slots_out


def block_candidates_topk(q, keys, blocks, block_slot, block_len, k):
    """Exact top-k of each row of ``q (Hm, R, D)`` float32 within its blocks ``blocks (Hm, R, KB)``
    (ids into the staging buffer ``keys (U, Hm, S, D)``, -1: none, in increasing slot order);
    block ``u`` holds ``block_len[u]`` valid rows with slots ``block_slot[u] + 0, 1, ...``."""
    ext = _kernels(q, keys, blocks)
    if ext is not None:
        return ext._store_block_candidates_topk(q.float().contiguous(), keys.contiguous(),
                                                blocks.contiguous(), block_slot.contiguous(),
                                                block_len.contiguous(), k)
    return block_candidates_ref(q, keys, blocks, block_slot, block_len, k)


def topk_values_read_ref(scores: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                         value_scale=None):
    """The read of a selection: ``scores (Hm, R, k)`` float32, ``rows (Hm, R, k)`` int64 rows of
    ``values (Hm, N, Dv)`` (-1: no entry), stored as a float dtype, int8 or uint8 (float8 bytes)
    with ``value_scale (Hm, N)`` for the last two. Returns ``(out (Hm, R, Dv), weights (Hm, R, k),
    lse (Hm, R))`` float32.

    Equivalent PyTorch:
        weights, lse = masked_softmax_lse(scores, rows < 0)
        out = (weights[..., None] * dequantised values[h, rows]).sum(-2)
    """
    heads, count, k = rows.shape
    missing = rows < 0
    flat = rows.clamp_min(0).reshape(heads, -1, 1)
    gathered = values.gather(1, flat.expand(-1, -1, values.shape[-1]))
    scale = None if value_scale is None else value_scale.gather(1, flat.squeeze(-1))
    stored = formats.dequantize_values(gathered, scale).view(heads, count, k, values.shape[-1])
    weights, lse = masked_softmax_lse(scores.float(), missing)
    stored = torch.where(missing.unsqueeze(-1), 0.0, stored)
    out = torch.matmul(weights.unsqueeze(-2), stored).squeeze(-2)
    return out, weights, lse


def topk_values_read(scores: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                     value_scale=None):
    """:func:`topk_values_read_ref` by the CPU kernel where the tensors allow it (values with a
    contiguous last dimension on the CPU)."""
    ext = _kernels(scores, rows, values)
    if ext is not None and hasattr(ext, "_topk_values_read") and (
            values.shape[-1] <= 1 or values.stride(-1) == 1):
        if value_scale is not None and value_scale.stride(-1) != 1:
            value_scale = value_scale.contiguous()
        return tuple(ext._topk_values_read(scores.float().contiguous(), rows.contiguous(), values,
                                           value_scale))
    return topk_values_read_ref(scores, rows, values, value_scale)
