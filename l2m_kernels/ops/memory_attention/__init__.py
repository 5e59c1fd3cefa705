"""Fused memory attention (SPEC section 5): local causal attention and a top-k memory read, merged."""
from __future__ import annotations

from .._common import MemoryAttention, autocast_promote
from ..topk_read.validate import shared_if_broadcast
from .function import memory_attention_op
from .reference import local_attention_ref, memory_attention_ref
from .validate import MERGES, check_args, check_values

__all__ = ["memory_attention", "memory_attention_ref", "local_attention_ref", "MERGES"]


def memory_attention(q, k, v, mem_keys, mem_values, topk, *, window=None, merge="joint", gate=None,
                     scale=None, valid_len=None, deterministic=False, backend=None):
    """Local causal (optionally sliding-window) attention and a top-k memory read, merged.

    Args:
        q:          (B, H, T, D) queries; query t sits at position p = S - T + t of the context.
        k:          (B, Hkv, S, D) local keys, S >= T, H % Hkv == 0.
        v:          (B, Hkv, S, Dv) local values.
        mem_keys:   (B, Hm, N, D) or (Hm, N, D) memory keys; mem_values likewise with Dv.
        topk:       memory entries read per query, 1 <= topk <= min(N, 256).
        window:     None (all keys j <= p) or w >= 1 (keys p - w < j <= p).
        merge:      "joint" (one softmax over local keys and selected memory entries) or "gate"
                    (sigmoid-gated blend; ``gate`` logits broadcastable to (B, H, T, 1) required).
        scale:      score scale for both parts, default D ** -0.5.
        valid_len:  optional int (B,) count of existing memory slots per batch element.
        deterministic: bitwise-reproducible gradients.
        backend:    None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        MemoryAttention(out (B, H, T, Dv) input dtype, lse_local (B, H, T) float32,
        lse_mem (B, H, T) float32, indices (B, H, T, topk) int64); float64 lse for float64 input.
        Differentiable in q, k, v, mem_keys, mem_values and gate.

    Equivalent PyTorch:
        local, lse_local = causal_window_attention(q, k, v, window, scale)
        mem = topk_memory_read(q, mem_keys, mem_values, topk, scale=scale, valid_len=valid_len)
        out = merge_attention(local, lse_local, mem.out, mem.lse)[0]     # merge="joint"
        out = gated_merge(local, mem.out, gate)                          # merge="gate"
    """
    q, k, v, mem_keys, mem_values, gate = autocast_promote(q, k, v, mem_keys, mem_values, gate)
    topk, window, scale, valid_len, deterministic, name = check_args(
        q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic, backend)
    mem_keys, mem_values = shared_if_broadcast(mem_keys, mem_values)
    if name == "reference":
        check_values(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic,
                     name)
        return MemoryAttention(*memory_attention_ref(q, k, v, mem_keys, mem_values, topk, window=window,
                                                     merge=merge, gate=gate, scale=scale,
                                                     valid_len=valid_len))
    return MemoryAttention(*memory_attention_op(q, k, v, mem_keys, mem_values, topk, window, merge, gate,
                                                scale, valid_len, deterministic, name))
