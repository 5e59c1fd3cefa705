"""Reference (naive PyTorch) quantized top-k memory read: the specification the cpu backend is
checked against.

A memory of int8 keys ``keys (Hm, N, Dk)`` with one float32 scale per (memory head, channel),
``key_scale (Hm, Dk)``, holds the key ``keys[h, n] * key_scale[h]`` in slot ``n`` of memory head
``h``; its values are float, or int8 / float8 (``torch.float8_e4m3fn``) with one float32 scale per
entry, ``value_scale (Hm, N)``: ``values[h, n].float() * value_scale[h, n]``. This is how a
:class:`l2m_kernels.memory.MemoryStore` with ``key_format="int8"`` stores its entries. Each query
reads the ``k`` slots of its memory head whose dequantised keys score best, exactly (the int8
keys are not an approximation of the read: they are the keys).

The read is split as :mod:`l2m_kernels.ops.topk_read.reference` splits the float one:

- :func:`quantized_scores_ref` gives every slot's score and :func:`quantized_topk_select` picks
  the slots (no gradient: the selection is piecewise constant);
- :func:`quantized_read_gather` forms the softmax, log-sum-exp and weighted sum of the selected
  slots, differentiably in ``q`` (the fused backends' backward and the fuzz judge use it);
- :func:`quantized_topk_read_ref` is their composition.

Semantics fixed here (the cpu backend matches):

- Scores: ``qe = (q.float() * scale) * key_scale[h]``, float32, rounded after each product in
  that order (query head ``h'`` reads memory head ``h = h' // (H // Hm)``), then
  ``s[n] = sum_d float64(qe[d]) * float64(keys[h, n, d])`` in float64: each product is exact, the
  sum is rounded in float64. The selection ranks these scores for every input dtype.
- Order: descending score, ties broken by the smaller slot, NaN ranked like ``+inf`` (above every
  finite score, tied with ``+inf``); the ``k`` slots are returned in that order. Identical key
  rows give identical scores, so they are read smaller slot first.
- Softmax: for float32/float16/bfloat16 ``q`` over the selected float64 scores rounded once to
  float32, in float32; for float64 ``q`` over the selected scores recomputed in float64 from ``q``
  itself, ``(q * scale) * key_scale[h] . keys[h, n]``, in float64 (the selection is still that of
  the float32 ``qe``). A NaN score makes its row's weights, lse and out NaN.
- Values: float values are used in their own dtype (converted to the accumulation dtype);
  int8/float8 values are dequantised in the accumulation dtype, ``values * value_scale``.
- Precision: weights and lse are float32 (float64 for float64 ``q``), ``out`` is rounded to
  ``q``'s dtype once.
- Gradients: in ``q`` only. ``d s_j / d q_d = scale * key_scale[h, d] * keys[h, n_j, d]``; the
  keys, scales and values are stored state.

No argument checking here beyond what the math needs; the public function checks.
"""
from __future__ import annotations

import torch

from ..topk_read.reference import gather_slots, masked_softmax_lse


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _default_scale(q: torch.Tensor, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def head_scales(key_scale: torch.Tensor, heads: int) -> torch.Tensor:
    """``key_scale (Hm, Dk)`` -> ``(H, Dk)``: the channel scales of each query head's memory head."""
    return key_scale.repeat_interleave(heads // key_scale.shape[0], dim=0)


def effective_queries(q: torch.Tensor, key_scale: torch.Tensor, scale: float) -> torch.Tensor:
    """``qe = (q.float() * scale) * key_scale[h]``: (B, H, T, Dk) float32, the query rows the
    selection scores the int8 keys with (no gradient)."""
    per_head = head_scales(key_scale.float(), q.shape[1])
    return (q.detach().float() * scale) * per_head[:, None, :]


def quantized_scores_ref(q, keys, key_scale, scale=None) -> torch.Tensor:
    """Every slot's selection score, (B, H, T, N) float64 (no gradient).

    Args:
        q:         (B, H, T, Dk) floating.
        keys:      (Hm, N, Dk) int8, H % Hm == 0.
        key_scale: (Hm, Dk) float32.
        scale:     python float, default Dk ** -0.5.

    Equivalent PyTorch:
        qe = (q.float() * scale) * key_scale.repeat_interleave(H // Hm, 0)[:, None]
        s = qe.double() @ keys.double().repeat_interleave(H // Hm, 0).transpose(-1, -2)
    """
    scale = _default_scale(q, scale)
    batch, heads, length, dim = q.shape
    mem_heads, num_slots = keys.shape[0], keys.shape[1]
    group = heads // mem_heads
    qe = effective_queries(q, key_scale, scale).double()
    # Query head h = hm * group + g: (B, H, T, Dk) -> (B, Hm, group * T, Dk) needs no repeated keys.
    rows = qe.reshape(batch, mem_heads, group * length, dim)
    scores = torch.matmul(rows, keys.to(torch.float64).transpose(-1, -2))
    return scores.reshape(batch, heads, length, num_slots)


def quantized_topk_select(q, keys, key_scale, k: int, scale=None) -> torch.Tensor:
    """The slots the read selects: (B, H, T, k) int64 in [0, N), by descending score, ties to the
    smaller slot, NaN first (no gradient).

    Equivalent PyTorch (per query row; exact because the sort is stable):
        s = quantized_scores_ref(q, keys, key_scale, scale)
        order = torch.sort(torch.where(s.isnan(), inf, s), descending=True, stable=True).indices[:k]
    """
    scores = quantized_scores_ref(q, keys, key_scale, scale)
    rank = scores.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :k]


def dequantize_values(values: torch.Tensor, value_scale, dtype: torch.dtype) -> torch.Tensor:
    """Value rows ``(..., Dv)`` in ``dtype``: float values converted, int8/float8 values times their
    entry scales ``value_scale (...)``.

    Equivalent PyTorch:
        values.to(dtype) if value_scale is None else values.to(dtype) * value_scale.to(dtype)[..., None]
    """
    if value_scale is None:
        return values.to(dtype)
    return values.to(dtype) * value_scale.to(dtype).unsqueeze(-1)


def _gather_values(values: torch.Tensor, safe_ids: torch.Tensor) -> torch.Tensor:
    """``values (Hm, N, Dv)`` rows at ``safe_ids (B, H, T, k)``: (B, H, T, k, Dv). A float8 memory
    is gathered as its bytes (gathers of float8 tensors are not implemented on every device)."""
    if values.dtype == torch.float8_e4m3fn:
        return gather_slots(values.view(torch.uint8), safe_ids).view(torch.float8_e4m3fn)
    return gather_slots(values, safe_ids)


def selected_values(values, value_scale, indices, dtype) -> torch.Tensor:
    """The dequantised values of the selected slots ``indices (B, H, T, k)`` (-1: none, zero rows),
    (B, H, T, k, Dv) in ``dtype``."""
    missing = indices < 0
    safe = indices.clamp_min(0)
    rows = _gather_values(values, safe)
    row_scales = None
    if value_scale is not None:
        row_scales = gather_slots(value_scale.unsqueeze(-1), safe).squeeze(-1)
    return torch.where(missing.unsqueeze(-1), 0.0, dequantize_values(rows, row_scales, dtype))


def selected_scores(q, keys, key_scale, indices, scale) -> torch.Tensor:
    """The scores of the selected slots ``indices (B, H, T, k)`` (-1: none, any value), (B, H, T, k)
    in the accumulation dtype, differentiable in ``q``.

    float32/float16/bfloat16 ``q``: the float64 selection scores rounded to float32, with the
    gradient of ``(q.float() * scale) * key_scale[h] . keys[n]`` (the value is the selection's,
    exactly). float64 ``q``: ``(q * scale) * key_scale[h] . keys[n]`` in float64.
    """
    acc = _acc(q.dtype)
    per_head = head_scales(key_scale, q.shape[1]).to(acc)[:, None, :]      # (H, 1, Dk)
    key_rows = gather_slots(keys, indices.clamp_min(0)).to(acc)           # (B, H, T, k, Dk), exact
    scaled = (q.to(acc) * scale) * per_head                                # differentiable in q
    scores = torch.matmul(key_rows, scaled.unsqueeze(-1)).squeeze(-1)
    if acc == torch.float64:
        return scores
    qe = effective_queries(q, key_scale, scale).double()
    exact = torch.matmul(key_rows.double(), qe.unsqueeze(-1)).squeeze(-1).float()
    # The selection's value, with the float32 recomputation's gradient (zero where that is not
    # finite: inf - inf would turn an infinite score into NaN).
    slope = torch.where(torch.isfinite(scores), scores - scores.detach(), 0.0)
    return exact + slope


def quantized_read_gather(q, keys, key_scale, values, indices, value_scale=None, scale=None):
    """Softmax read of given slots: (out (B, H, T, Dv) in q's dtype, weights (B, H, T, k), lse
    (B, H, T) float32; float64 for float64 q), differentiable in ``q``.

    Args:
        q:           (B, H, T, Dk) floating.
        keys:        (Hm, N, Dk) int8; key_scale: (Hm, Dk) float32.
        values:      (Hm, N, Dv) float, int8 or float8_e4m3fn; value_scale: (Hm, N) float32 for
                     int8/float8 values, else None.
        indices:     (B, H, T, k) int64 slot ids in [0, N), or -1 for no entry (weight 0).
        scale:       python float, default Dk ** -0.5.

    Equivalent PyTorch (per query row, memory head h):
        s = selected_scores(...)                  # the selection's scores (see the module docstring)
        weights, lse = softmax(s), logsumexp(s)
        out = weights @ (values[h, indices].float() * value_scale[h, indices, None])
    """
    scale = _default_scale(q, scale)
    acc = _acc(q.dtype)
    missing = indices < 0
    scores = selected_scores(q, keys, key_scale, indices, scale)
    weights, lse = masked_softmax_lse(scores, missing)
    value_rows = selected_values(values, value_scale, indices, acc)
    out = torch.matmul(weights.unsqueeze(-2), value_rows).squeeze(-2)
    return out.to(q.dtype), weights, lse


def quantized_topk_read_ref(q, keys, key_scale, values, k: int, value_scale=None, scale=None):
    """Reference quantized top-k read.

    Args:
        q:           (B, H, T, Dk) float32/float16/bfloat16/float64; query head h reads memory head
                     h // (H // Hm).
        keys:        (Hm, N, Dk) int8 in [-127, 127], shared by the batch.
        key_scale:   (Hm, Dk) float32, finite and > 0: slot n's key is keys[h, n] * key_scale[h].
        values:      (Hm, N, Dv) float (used as is), int8 or float8_e4m3fn (times value_scale).
        k:           1 <= k <= N.
        value_scale: (Hm, N) float32 for int8/float8 values, else None.
        scale:       python float, default Dk ** -0.5.

    Returns:
        (out (B, H, T, Dv) in q's dtype, indices (B, H, T, k) int64, weights (B, H, T, k) and
        lse (B, H, T) float32, float64 for float64 q). Differentiable in q.

    Equivalent PyTorch:
        qe = (q.float() * scale) * key_scale[h]                     # float32
        s = qe.double() @ keys[h].double().T                        # every slot, float64
        indices = sort(where(s.isnan(), inf, s), descending=True, stable=True).indices[..., :k]
        s_k = s[indices].float()   (float64 q: (q * scale * key_scale[h]) . keys[h, indices])
        weights, lse = s_k.softmax(-1), s_k.logsumexp(-1)
        out = weights @ (values[h, indices].float() * value_scale[h, indices, None])
    """
    scale = _default_scale(q, scale)
    indices = quantized_topk_select(q, keys, key_scale, k, scale)
    out, weights, lse = quantized_read_gather(q, keys, key_scale, values, indices, value_scale, scale)
    return out, indices, weights, lse
