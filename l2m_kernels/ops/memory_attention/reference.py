"""Reference (naive PyTorch) fused memory attention: the specification the fused kernels are
checked against, and the benchmark baseline (SPEC section 5).

- :func:`local_attention_ref`: causal (optionally sliding-window) attention over the local context
  whose last ``T`` positions are the queries; forms the full ``(B, H, T, S)`` score matrix.
- :func:`memory_attention_gather`: local attention plus the softmax read of given memory slots,
  merged; differentiable in q, k, v, mem_keys, mem_values and gate (the recompute-backward of
  fused forwards).
- :func:`memory_attention_ref`: selects the memory slots exactly as
  ``topk_memory_read_ref(q, mem_keys, mem_values, topk, scale=scale, valid_len=valid_len)`` and
  returns ``memory_attention_gather`` on them.

No input validation beyond what the math needs; the public API validates.

Choices made where SPEC section 5 is silent (fused backends should match):

- The local result and the memory read are merged in the accumulation dtype (float32; float64
  for float64) and rounded to the input dtype once, as a fused kernel does; for float32/float64
  this is identical to merging the rounded results.
- The local attention of a query with no visible key (only possible with ``window <= 0``) has
  out = 0, lse = -inf, like an empty memory read.
- A NaN/inf in ``k`` or ``v`` at a position a query cannot see (in its future or outside its
  window) does not reach that query's output, as in a kernel that skips masked positions.
"""
from __future__ import annotations

import torch

from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref
from l2m_kernels.ops.topk_read.reference import (
    _acc_dtype,
    _default_scale,
    _topk_read_gather_acc,
    masked_softmax_lse,
    topk_read_select,
)


def local_visibility(seq_len: int, context_len: int, window=None, device=None) -> torch.Tensor:
    """(T, S) bool: query t (at position p = S - T + t) sees key j iff j <= p and j > p - window."""
    positions = torch.arange(seq_len, device=device) + (context_len - seq_len)
    key_pos = torch.arange(context_len, device=device)
    visible = key_pos.unsqueeze(0) <= positions.unsqueeze(1)
    if window is not None:
        visible = visible & (key_pos.unsqueeze(0) > positions.unsqueeze(1) - window)
    return visible


def _local_attention_acc(q, k, v, window, scale):
    """local_attention_ref with ``out`` left in the accumulation dtype."""
    acc = _acc_dtype(q.dtype)
    batch, heads, seq_len, dim = q.shape
    kv_heads, context_len, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    # Query head h = hkv * group + g: fold the group into the query axis, no repeated k / v.
    q_grouped = (q.to(acc) * scale).reshape(batch, kv_heads, group * seq_len, dim)
    scores = torch.matmul(q_grouped, k.to(acc).transpose(-1, -2))
    scores = scores.reshape(batch, kv_heads, group, seq_len, context_len)
    visible = local_visibility(seq_len, context_len, window, device=q.device)
    weights, lse = masked_softmax_lse(scores, ~visible)

    v_acc = v.to(acc).unsqueeze(2)  # (B, Hkv, 1, S, Dv)
    # out = sum over the visible keys j of weights_j * v_j, exactly as IEEE arithmetic gives it. The
    # weights of invisible keys are exact zeros, but weights @ v would still turn an invisible inf or
    # NaN into NaN (0 * inf): the matmul takes the finite values only, and the non-finite ones are
    # accounted for by counting, per output element, the visible entries that make it NaN (a NaN; an
    # inf with weight 0, as in a row whose scores are all -inf) or +-inf (an inf with a positive
    # weight; both signs give NaN).
    v_finite = torch.isfinite(v_acc)
    out = torch.matmul(weights, torch.where(v_finite, v_acc, 0.0))
    visible_acc = visible.to(acc)
    weighted = (weights > 0).to(acc)  # only visible keys have a positive weight
    zero_weight = (visible & ~(weights > 0)).to(acc)
    nan_hits = (torch.matmul(visible_acc, torch.isnan(v_acc).to(acc))
                + torch.matmul(zero_weight, torch.isinf(v_acc).to(acc)))
    inf_hits = torch.matmul(weighted, torch.cat([torch.isposinf(v_acc), torch.isneginf(v_acc)], -1).to(acc))
    pos_inf, neg_inf = inf_hits[..., :dim_v] > 0, inf_hits[..., dim_v:] > 0
    nan = torch.isnan(out) | (nan_hits > 0) | (pos_inf & neg_inf)
    out = torch.where(pos_inf, float("inf"), torch.where(neg_inf, float("-inf"), out))
    out = torch.where(nan, float("nan"), out)
    return out.reshape(batch, heads, seq_len, dim_v), lse.reshape(batch, heads, seq_len)


def local_attention_ref(q, k, v, window=None, scale=None):
    """Causal, optionally sliding-window attention of the last T positions over the local context.

    Args:
        q:      (B, H, T, D) float16/bfloat16/float32/float64.
        k:      (B, Hkv, S, D), same dtype; S >= T, H % Hkv == 0 (query head h uses kv head
                h // (H // Hkv)).
        v:      (B, Hkv, S, Dv), same dtype.
        window: optional int; query t at position p = S - T + t sees keys j <= p and, with a
                window, j > p - window (window=1: only itself).
        scale:  python float, default D ** -0.5.

    Returns:
        out (B, H, T, Dv) in the input dtype; lse (B, H, T) float32 (float64 for float64 input).

    Equivalent PyTorch:
        k_h, v_h = (x.repeat_interleave(H // Hkv, dim=1).float() for x in (k, v))
        scores = scale * q.float() @ k_h.transpose(-1, -2)
        scores = scores.masked_fill(~local_visibility(T, S, window), -inf)
        out = torch.softmax(scores, -1) @ v_h; lse = torch.logsumexp(scores, -1)
    """
    scale = _default_scale(q, scale)
    out, lse = _local_attention_acc(q, k, v, window, scale)
    return out.to(v.dtype), lse


def _merge_acc(out_local, lse_local, out_mem, lse_mem, merge, gate):
    if merge == "joint":
        out, _ = merge_attention_ref(out_local, lse_local, out_mem, lse_mem)
        return out
    if merge == "gate":
        if gate is None:
            raise ValueError('memory attention: merge="gate" requires gate (logits broadcastable '
                             "to (B, H, T, 1)), got None")
        return gated_merge_ref(out_local, out_mem, gate)
    raise ValueError(f'memory attention: merge must be "joint" or "gate", got {merge!r}')


def memory_attention_gather(q, k, v, mem_keys, mem_values, indices, window=None, merge="joint",
                            gate=None, scale=None):
    """Local attention merged with the read of given memory slots; differentiable in q, k, v,
    mem_keys, mem_values and gate (the selection ``indices`` is fixed).

    Args:
        q, k, v:    as in :func:`local_attention_ref`.
        mem_keys:   (B, Hm, N, D) or shared (Hm, N, D), same dtype; H % Hm == 0.
        mem_values: same leading shape as ``mem_keys``, last size Dv.
        indices:    (B, H, T, topk) int64 slot ids, -1 for "no entry".
        window:     optional int, see :func:`local_attention_ref`.
        merge:      "joint" (one softmax over local keys and memory entries together) or "gate".
        gate:       logits broadcastable to (B, H, T, 1), required for merge="gate".
        scale:      python float, default D ** -0.5, used for local and memory scores alike.

    Returns:
        out (B, H, T, Dv) in the input dtype; lse_local, lse_mem (B, H, T) float32 (float64 for
        float64 input). lse_mem is -inf for rows with no memory entry.

    Equivalent PyTorch:
        local, lse_local = local_attention_ref(q, k, v, window, scale)      # kept in float32
        mem, _, lse_mem = topk_read_gather(q, mem_keys, mem_values, indices, scale)
        out = merge_attention(local, lse_local, mem, lse_mem)[0]  # joint
        out = gated_merge(local, mem, gate)                       # gate
    """
    scale = _default_scale(q, scale)
    out_local, lse_local = _local_attention_acc(q, k, v, window, scale)
    out_mem, _, lse_mem = _topk_read_gather_acc(q, mem_keys, mem_values, indices, scale)
    out = _merge_acc(out_local, lse_local, out_mem, lse_mem, merge, gate)
    return out.to(v.dtype), lse_local, lse_mem


def memory_attention_ref(q, k, v, mem_keys, mem_values, topk: int, window=None, merge="joint",
                         gate=None, scale=None, valid_len=None):
    """Reference fused memory attention (SPEC section 5).

    Args:
        q:          (B, H, T, D) float16/bfloat16/float32/float64.
        k:          (B, Hkv, S, D), S >= T, H % Hkv == 0: the local context, whose last T positions
                    are the queries (query t at position p = S - T + t).
        v:          (B, Hkv, S, Dv).
        mem_keys:   (B, Hm, N, D) or shared (Hm, N, D); H % Hm == 0.
        mem_values: same leading shape as ``mem_keys``, last size Dv.
        topk:       1 <= topk <= N memory entries per query.
        window:     optional int: query p sees local keys p - window < j <= p (else all j <= p).
        merge:      "joint" or "gate".
        gate:       logits broadcastable to (B, H, T, 1) (e.g. (H, 1, 1)), required for "gate".
        scale:      python float, default D ** -0.5, shared by local and memory scores.
        valid_len:  optional (B,) integer tensor: memory slots n >= valid_len[b] do not exist.

    Returns:
        (out, lse_local, lse_mem, indices): out (B, H, T, Dv) in the input dtype; lse_local and
        lse_mem (B, H, T) float32 (float64 for float64 input); indices (B, H, T, topk) int64, the
        memory slots read, exactly as ``topk_memory_read_ref`` selects them (-1: no entry).

    Equivalent PyTorch:
        local, lse_local = local_attention_ref(q, k, v, window, scale)
        mem, indices, _, lse_mem = topk_memory_read_ref(q, mem_keys, mem_values, topk, scale,
                                                        valid_len)
        out = merge_attention_ref(local, lse_local, mem, lse_mem)[0]   # merge="joint"
        out = gated_merge_ref(local, mem, gate)                        # merge="gate"
    (merged in float32 before rounding to the input dtype once).
    """
    scale = _default_scale(q, scale)
    indices = topk_read_select(q, mem_keys, topk, scale, valid_len)
    out, lse_local, lse_mem = memory_attention_gather(q, k, v, mem_keys, mem_values, indices,
                                                      window, merge, gate, scale)
    return out, lse_local, lse_mem, indices
