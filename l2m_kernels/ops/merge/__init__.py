"""Merging attention over two key sets: ``merge_attention`` (exact log-sum-exp) and ``gated_merge``."""
from __future__ import annotations

from .._common import autocast_promote, eager_call
from .function import gated_merge_eager, gated_merge_op, merge_attention_eager, merge_attention_op
from .reference import gated_merge_ref, merge_attention_ref
from .validate import check_gated_merge_args, check_merge_args

__all__ = ["merge_attention", "gated_merge", "merge_attention_ref", "gated_merge_ref"]


def merge_attention(out_a, lse_a, out_b, lse_b, *, backend=None):
    """Attention over the union of two disjoint key sets, from the attention over each.

    Args:
        out_a, out_b: (B, H, T, D) attention outputs over key sets A and B (one floating dtype).
        lse_a, lse_b: (B, H, T) log-sum-exp of the scores of each set; float32, or float64 for
            float64 outputs (as attention kernels return them).
        backend: None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        ``(out, lse)``: out (B, H, T, D) in the input dtype, lse (B, H, T) float32 (float64).
        A side with lse = -inf contributes nothing; both -inf give out = 0, lse = -inf.
        Differentiable in all four inputs; deterministic on every backend (no atomics).

    Equivalent PyTorch:
        lse = torch.logaddexp(lse_a, lse_b)
        out = (lse_a - lse).exp()[..., None] * out_a + (lse_b - lse).exp()[..., None] * out_b
    """
    out_a, out_b = autocast_promote(out_a, out_b)
    name = check_merge_args(out_a, lse_a, out_b, lse_b, backend)
    if name == "reference":
        return merge_attention_ref(out_a, lse_a, out_b, lse_b)
    if eager_call(out_a, lse_a, out_b, lse_b):
        return merge_attention_eager(out_a, lse_a, out_b, lse_b, name)
    return merge_attention_op(out_a, lse_a, out_b, lse_b, name)


def gated_merge(out_local, out_mem, gate, *, backend=None):
    """Blend local attention and memory read with a learned gate.

    Args:
        out_local: (B, H, T, D) attention over the local context.
        out_mem:   (B, H, T, D) read from memory (same dtype).
        gate:      logits broadcastable to (B, H, T, 1), e.g. (H, 1, 1) one per head; same dtype.
        backend:   None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        (B, H, T, D) in the input dtype. Differentiable in all three; the gate gradient is reduced to
        the gate's own shape (accumulated in float32, float64 for float64).

    Equivalent PyTorch:
        g = torch.sigmoid(gate); out = g * out_mem + (1 - g) * out_local
    """
    out_local, out_mem, gate = autocast_promote(out_local, out_mem, gate)
    name = check_gated_merge_args(out_local, out_mem, gate, backend)
    if name == "reference":
        return gated_merge_ref(out_local, out_mem, gate)
    if eager_call(out_local, out_mem, gate):
        return gated_merge_eager(out_local, out_mem, gate, name)
    return gated_merge_op(out_local, out_mem, gate, name)
