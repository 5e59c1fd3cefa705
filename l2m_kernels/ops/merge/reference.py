"""Reference (naive PyTorch) merge ops: the specification the fused kernels are checked against.

Both functions are plain differentiable PyTorch, work in float64, and compute in float32 for
half-precision inputs (float64 for float64).
"""
from __future__ import annotations

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_attention_ref(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the two partial results.

    Args:
        out_a, out_b: (B, H, T, D) attention outputs over key sets A and B.
        lse_a, lse_b: (B, H, T) their log-sum-exp of scores (float32; float64 for float64 input).

    Returns:
        out (B, H, T, D) in the dtype of ``out_a``; lse (B, H, T) float32 (float64).

    Equivalent PyTorch:
        lse = torch.logaddexp(lse_a, lse_b)
        out = exp(lse_a - lse)[..., None] * out_a + exp(lse_b - lse)[..., None] * out_b
    A side with lse = -inf contributes nothing; both -inf give out = 0 and lse = -inf.
    """
    acc = _acc_dtype(out_a.dtype)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    # Written with explicit -inf guards (not torch.logaddexp) so that rows where a side, or both,
    # is -inf have exact zero gradients instead of NaN from exp(-inf - (-inf)).
    a_empty, b_empty = torch.isneginf(la), torch.isneginf(lb)
    m = torch.maximum(la, lb)
    both_empty = torch.isneginf(m)
    m_safe = torch.where(both_empty, torch.zeros_like(m), m)
    total = torch.exp(la - m_safe) + torch.exp(lb - m_safe)
    total = torch.where(both_empty, torch.ones_like(total), total)
    lse = torch.where(both_empty, torch.full_like(m, float("-inf")), m_safe + torch.log(total))
    # logaddexp with a +inf side is +inf (exp(inf - inf) made it NaN); m is NaN with a NaN side.
    lse = torch.where(torch.isposinf(m), m, lse)
    wa = torch.where(a_empty, torch.zeros_like(la), torch.exp(torch.where(a_empty, torch.zeros_like(la), la - lse)))
    wb = torch.where(b_empty, torch.zeros_like(lb), torch.exp(torch.where(b_empty, torch.zeros_like(lb), lb - lse)))
    out = wa.unsqueeze(-1) * out_a.to(acc) + wb.unsqueeze(-1) * out_b.to(acc)
    return out.to(out_a.dtype), lse


def gated_merge_ref(out_local, out_mem, gate):
    """Blend local attention and memory read with a learned gate.

    Args:
        out_local: (B, H, T, D) attention over the local context.
        out_mem:   (B, H, T, D) read from memory.
        gate:      logits broadcastable to (B, H, T, 1), e.g. (H, 1, 1).

    Returns:
        (B, H, T, D) in the input dtype.

    Equivalent PyTorch:
        g = torch.sigmoid(gate); out = g * out_mem + (1 - g) * out_local
    """
    acc = _acc_dtype(out_local.dtype)
    logits = gate.to(acc)
    # 1 - g as sigmoid(-gate): 1 - sigmoid(gate) loses its digits when the gate saturates.
    out = torch.sigmoid(logits) * out_mem.to(acc) + torch.sigmoid(-logits) * out_local.to(acc)
    return out.to(out_local.dtype)
