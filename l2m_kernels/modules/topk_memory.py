"""A memory bank read by sparse top-k addressing."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops._common import MemoryRead
from ..ops.topk_read import topk_memory_read


class TopKMemory(nn.Module):
    """A bank of ``num_slots`` key/value slots per memory head, read with :func:`topk_memory_read`.

    The keys and values are either learned parameters shared by every batch element (``(Hm, N, D)``,
    the default, as in a learned key-value memory), or non-trainable state loaded with
    :meth:`load_` — shared ``(Hm, N, D)`` or per batch element ``(B, Hm, N, D)`` — for memories that
    store a model's own intermediate representations (Memorizing Transformers style). ``valid_len``
    marks how many slots of each batch element exist (for example a partly filled ring buffer).

    Args:
        num_slots:  N, slots per memory head.
        key_dim:    Dk.
        value_dim:  Dv.
        num_heads:  Hm, memory heads; queries may have any H divisible by Hm (grouped heads).
        trainable:  learned keys and values (parameters) rather than loaded state (buffers).
        backend:    backend for every read (None: automatic).

    Example:
        memory = TopKMemory(num_slots=16384, key_dim=64, value_dim=64, num_heads=8)
        read = memory(q, k=32)                 # q (B, H, T, 64) -> MemoryRead, read.out (B, H, T, 64)
    """

    def __init__(self, num_slots: int, key_dim: int, value_dim: int, num_heads: int = 1, *,
                 trainable: bool = True, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if min(num_slots, key_dim, value_dim, num_heads) < 1:
            raise ValueError("num_slots, key_dim, value_dim and num_heads must be >= 1, got "
                             f"{num_slots}, {key_dim}, {value_dim}, {num_heads}")
        self.num_slots, self.key_dim, self.value_dim, self.num_heads = num_slots, key_dim, value_dim, num_heads
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        keys = torch.empty(num_heads, num_slots, key_dim, **factory)
        values = torch.empty(num_heads, num_slots, value_dim, **factory)
        if trainable:
            self.keys = nn.Parameter(keys)
            self.values = nn.Parameter(values)
        else:
            self.register_buffer("keys", keys)
            self.register_buffer("values", values)
        self.register_buffer("valid_len", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.keys, std=1.0)
            nn.init.normal_(self.values, std=1.0 / math.sqrt(self.value_dim))

    @torch.no_grad()
    def load_(self, keys: torch.Tensor, values: torch.Tensor, valid_len: Optional[torch.Tensor] = None) -> "TopKMemory":
        """Replace the bank's state (buffers only): keys ``(Hm, N, Dk)`` or ``(B, Hm, N, Dk)``,
        values with the same leading shape and last size ``Dv``, optional int ``valid_len (B,)``."""
        if isinstance(self.keys, nn.Parameter):
            raise RuntimeError("load_ replaces stored state; this TopKMemory has trainable=True parameters")
        if keys.shape[:-1] != values.shape[:-1] or keys.dim() not in (3, 4):
            raise ValueError(f"keys/values: expected (Hm, N, D) or (B, Hm, N, D) with matching leading "
                             f"shapes, got {tuple(keys.shape)} and {tuple(values.shape)}")
        self.keys, self.values = keys.detach(), values.detach()
        self.valid_len = None if valid_len is None else valid_len.detach()
        self.num_heads, self.num_slots = keys.shape[-3], keys.shape[-2]
        return self

    def read(self, q: torch.Tensor, k: int, *, scale: Optional[float] = None,
             deterministic: bool = False) -> MemoryRead:
        """Read the ``k`` best slots for each query ``q (B, H, T, Dk)``; see :func:`topk_memory_read`."""
        return topk_memory_read(q, self.keys, self.values, k, scale=scale, valid_len=self.valid_len,
                                deterministic=deterministic, backend=self.backend)

    forward = read

    def extra_repr(self) -> str:
        return (f"num_slots={self.num_slots}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"num_heads={self.num_heads}, trainable={isinstance(self.keys, nn.Parameter)}")
