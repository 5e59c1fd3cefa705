"""Merging attention over two key sets: ``merge_attention`` (exact log-sum-exp) and ``gated_merge``."""
from __future__ import annotations

import torch

from ... import _validation as v
from ...backends import select_backend
from .function import gated_merge_op, merge_attention_op
from .reference import gated_merge_ref, merge_attention_ref

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
    v.require_ndim("out_a", out_a, (4,), "(B, H, T, D)")
    B, H, T, D = out_a.shape
    v.require_shape("out_b", out_b, (B, H, T, D), "(B, H, T, D)")
    v.require_shape("lse_a", lse_a, (B, H, T), "(B, H, T)")
    v.require_shape("lse_b", lse_b, (B, H, T), "(B, H, T)")
    v.require_same_dtype("out_a", out_a, out_b=out_b)
    v.require_lse_dtype("lse_a", lse_a, out_a.dtype)
    v.require_lse_dtype("lse_b", lse_b, out_a.dtype)
    device = v.require_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    name = select_backend("merge_attention", device, out_a.dtype, backend)
    if name == "reference":
        return merge_attention_ref(out_a, lse_a, out_b, lse_b)
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
    v.require_ndim("out_local", out_local, (4,), "(B, H, T, D)")
    B, H, T, D = out_local.shape
    v.require_shape("out_mem", out_mem, (B, H, T, D), "(B, H, T, D)")
    v.require_broadcastable("gate", gate, (B, H, T, 1), "(B, H, T, 1)")
    v.require_same_dtype("out_local", out_local, out_mem=out_mem, gate=gate)
    device = v.require_same_device(out_local=out_local, out_mem=out_mem, gate=gate)
    name = select_backend("gated_merge", device, out_local.dtype, backend)
    if name == "reference":
        return gated_merge_ref(out_local, out_mem, gate)
    return gated_merge_op(out_local, out_mem, gate, name)
