"""cpu backend of ``memory_attention``: the fused top-k read, a FlashAttention-style local attention
and the merge kernels of the C++ extension ``l2m_kernels._C``, composed (the composition, forward
and backward, is described in ``_compose.py`` and shared with the cuda backend).

The C++ kernels: ``topk_read_fwd`` (scores in registers, running top-k per query),
``local_attention_fwd`` / ``local_attention_bwd`` (csrc/cpu/local_attention.h: register-blocked
tiles, online softmax, FlashAttention-2 backward), ``memory_read_weights`` and the merge kernels.
Every one is deterministic (the read's slot gradients are reduced per slot in a fixed order, the
local ``dk``/``dv`` per key block) and independent of the thread count, so ``deterministic`` needs
nothing more here.
"""
from __future__ import annotations

from . import _compose


def memory_attention_fwd(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len,
                         deterministic):
    return _compose.memory_attention_fwd("cpu", q, k, v, mem_keys, mem_values, topk, window, merge, gate,
                                         scale, valid_len, deterministic)


def memory_attention_bwd(dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values, indices, out, lse_local,
                         lse_mem, window, merge, gate, scale, deterministic):
    return _compose.memory_attention_bwd("cpu", dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values,
                                         indices, out, lse_local, lse_mem, window, merge, gate, scale,
                                         deterministic)
