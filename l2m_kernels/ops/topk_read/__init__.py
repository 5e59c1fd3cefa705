"""Sparse top-k memory read over dense keys (SPEC section 1)."""
from __future__ import annotations

from .._common import MemoryRead, autocast_promote
from .function import topk_memory_read_op
from .reference import topk_memory_read_ref
from .validate import (MAX_K, check_args, check_values, resolve_scale, shared_if_broadcast,
                       validate_memory)

__all__ = ["topk_memory_read", "topk_memory_read_ref", "validate_memory", "resolve_scale", "MAX_K"]


def topk_memory_read(q, keys, values, k, *, scale=None, valid_len=None, deterministic=False, backend=None):
    """Content-based sparse read: each query softmax-reads its k best-scoring memory slots.

    Args:
        q:      (B, H, T, Dk) queries.
        keys:   (B, Hm, N, Dk) or shared (Hm, N, Dk) memory keys, H % Hm == 0 (query head h uses
                memory head h // (H // Hm)). Same dtype as q.
        values: (B, Hm, N, Dv) or (Hm, N, Dv), the leading shape of keys.
        k:      number of slots read per query, 1 <= k <= min(N, 256).
        scale:  score scale, default Dk ** -0.5.
        valid_len: optional int (B,) tensor, 0 <= valid_len[b] <= N: slots n >= valid_len[b] do not
                exist for batch element b.
        deterministic: bitwise-reproducible gradients for keys and values (also switched on by
                torch.are_deterministic_algorithms_enabled()). The default (False) lets the GPU
                backends (triton, cuda) scatter dkeys/dvalues with float32 atomics, whose
                summation order varies from run to run; True groups the selected entries by slot
                (a stable sort) and sums each slot's entries in a fixed order. The reference and
                cpu backends are always deterministic. dq never uses atomics.
        backend: None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        MemoryRead(out (B, H, T, Dv) input dtype, indices (B, H, T, k) int64, weights (B, H, T, k)
        float32, lse (B, H, T) float32; float64 for float64 input). Slots are ordered by
        descending score, ties broken by the smaller slot; with fewer than k existing slots the
        missing entries have index -1 and weight 0, and with none out = 0 and lse = -inf.
        Differentiable in q, keys and values through out, weights and lse.

    Equivalent PyTorch (up to exact tie-breaking):
        s = scale * q @ keys.transpose(-1, -2)          # keys repeated to H heads, invalid = -inf
        top, idx = s.topk(k)
        weights = top.softmax(-1); lse = top.logsumexp(-1)
        out = (weights[..., None] * values.gather(idx)).sum(-2)
    """
    q, keys, values = autocast_promote(q, keys, values)
    k, scale, valid_len, deterministic, name = check_args(q, keys, values, k, scale, valid_len,
                                                          deterministic, backend)
    keys, values = shared_if_broadcast(keys, values)
    if name == "reference":
        check_values(q, keys, values, k, scale, valid_len, deterministic, name)
        return MemoryRead(*topk_memory_read_ref(q, keys, values, k, scale=scale, valid_len=valid_len))
    # The custom op checks valid_len's values itself, at call time (also inside compiled graphs).
    return MemoryRead(*topk_memory_read_op(q, keys, values, k, scale, valid_len, deterministic, name))
