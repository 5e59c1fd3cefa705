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

from functools import partial

from . import _compose

# The signatures of function.py's _reference_fwd and _reference_bwd.
memory_attention_fwd = partial(_compose.memory_attention_fwd, "cpu")
memory_attention_bwd = partial(_compose.memory_attention_bwd, "cpu")
