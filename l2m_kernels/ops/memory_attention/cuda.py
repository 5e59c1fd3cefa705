"""cuda backend of ``memory_attention``: the CUDA top-k read, a FlashAttention-style local attention
that returns its log-sum-exp, and the CUDA merge kernels of the extension ``l2m_kernels._C_cuda``,
composed (the composition, forward and backward, is described in ``_compose.py`` and shared with
the cpu backend).

The CUDA kernels:

- ``topk_read_fwd`` / ``topk_read_bwd`` (csrc/cuda/topk_read.cu): the memory read and its
  backward at the forward's selection; the slot gradients use float32 atomics unless
  ``deterministic`` (then a fixed-order per-slot reduction, bitwise reproducible).
- ``local_attention_fwd`` / ``local_attention_bwd`` (csrc/cuda/local_attention.cu): tiles of
  32 queries x 32 keys on CUDA cores, online softmax in float32, FlashAttention-2 backward with
  ``dq`` per query tile and ``dk``/``dv`` per key tile (no atomics: deterministic); the backward
  through :func:`local_attention_bwd`, which gives it its scratch.
- ``memory_read_weights`` (csrc/cuda/memory_attention.cu): the read's weights recomputed from the
  selected key rows, one warp per query row.
- ``merge_attention_fwd`` / ``gated_merge_fwd`` / ``gated_merge_bwd`` (csrc/cuda): row kernels.

Served: float32, float16 and bfloat16 (the CUDA top-k read does not serve float64), D and Dv up to
256 (the read's limit).
"""
from __future__ import annotations

from functools import partial

import torch

from . import _compose

# The signatures of function.py's _reference_fwd and _reference_bwd.
memory_attention_fwd = partial(_compose.memory_attention_fwd, "cuda")
memory_attention_bwd = partial(_compose.memory_attention_bwd, "cuda")


def local_attention_bwd(ext, dout, dlse, q, k, v, out, lse, window, scale, dq, dk, dv):
    """``ext.local_attention_bwd`` (``l2m_kernels._C_cuda``) with the cpu extension's arguments and
    its scratch: delta (B, H, T) in lse's dtype, ``<dout, out> - dlse`` per row, written by its
    first kernel and read by the others."""
    delta = torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    ext.local_attention_bwd(dout, dlse, q, k, v, out, lse, window, scale, delta, dq, dk, dv)
