"""Fused memory attention (SPEC section 5): local causal attention and a top-k memory read, merged."""
from __future__ import annotations

from ... import _validation as check
from ...backends import resolve_deterministic, select_backend
from .._common import MemoryAttention
from ..topk_read import MAX_K, resolve_scale, validate_memory, validate_valid_len
from .function import memory_attention_op
from .reference import local_attention_ref, memory_attention_ref

__all__ = ["memory_attention", "memory_attention_ref", "local_attention_ref"]

MERGES = ("joint", "gate")


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
    check.require_ndim("q", q, (4,), "(B, H, T, D)")
    B, H, T, D = q.shape
    check.require_ndim("k", k, (4,), "(B, Hkv, S, D)")
    check.require_shape("k", k, (B, None, None, D), "(B, Hkv, S, D)")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k: the key/value head count Hkv must divide H, got H={H}, Hkv={Hkv} "
                         f"(shape {tuple(k.shape)})")
    if S < T:
        raise ValueError(f"k: expected S >= T (the queries are the last T of S positions), got "
                         f"S={S}, T={T} (shape {tuple(k.shape)})")
    check.require_ndim("v", v, (4,), "(B, Hkv, S, Dv)")
    check.require_shape("v", v, (B, Hkv, S, None), "(B, Hkv, S, Dv)")
    N = validate_memory(q, mem_keys, mem_values, keys_name="mem_keys", values_name="mem_values")
    if mem_values.shape[-1] != v.shape[-1]:
        raise ValueError(f"mem_values: expected the value size Dv of v ({v.shape[-1]}), got shape "
                         f"{tuple(mem_values.shape)}")
    check.require_same_dtype("q", q, k=k, v=v, mem_keys=mem_keys, mem_values=mem_values, gate=gate)
    topk = check.require_int("topk", topk, 1, min(N, MAX_K), f" (N = {N}, at most {MAX_K})")
    if window is not None:
        window = check.require_int("window", window, 1, 2**62, " (window >= 1, or None)")
    if merge not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
    if merge == "gate":
        if gate is None:
            raise ValueError("gate: required when merge='gate' (logits broadcastable to (B, H, T, 1))")
        check.require_broadcastable("gate", gate, (B, H, T, 1), "(B, H, T, 1)")
    elif gate is not None:
        raise ValueError("gate: only used with merge='gate'; pass gate=None with merge='joint'")
    valid_len = validate_valid_len(valid_len, B, N)
    device = check.require_same_device(q=q, k=k, v=v, mem_keys=mem_keys, mem_values=mem_values, gate=gate,
                                   valid_len=valid_len)
    scale = resolve_scale(scale, D)
    deterministic = resolve_deterministic(deterministic)
    name = select_backend("memory_attention", device, q.dtype, backend,
                          sizes=dict(Dk=D, Dv=v.shape[-1], N=N, rows=B * H * T, S=S))
    if name == "reference":
        return MemoryAttention(*memory_attention_ref(q, k, v, mem_keys, mem_values, topk, window=window,
                                                     merge=merge, gate=gate, scale=scale,
                                                     valid_len=valid_len))
    return MemoryAttention(*memory_attention_op(q, k, v, mem_keys, mem_values, topk, window, merge, gate,
                                                scale, valid_len, deterministic, name))
