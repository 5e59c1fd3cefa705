"""A memory bank read by sparse top-k addressing."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops._common import MemoryRead
from ..ops.memory_write import gated_memory_write
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
    def load_(self, keys: torch.Tensor, values: torch.Tensor, valid_len: Optional[torch.Tensor] = None, *,
              resize: bool = False) -> "TopKMemory":
        """Replace the bank's state (buffers only): keys ``(Hm, N, Dk)`` or ``(B, Hm, N, Dk)``,
        values with the same leading shape and last size ``Dv``, optional int ``valid_len (B,)``.

        The sizes must be the bank's own (``num_heads``, ``num_slots``, ``key_dim``,
        ``value_dim``); a partly filled bank keeps ``num_slots`` and passes ``valid_len``.
        ``resize=True`` lets the state change ``num_slots`` (the bank takes the new size).
        """
        if isinstance(self.keys, nn.Parameter):
            raise RuntimeError("load_ replaces stored state; this TopKMemory has trainable=True parameters")
        if keys.dim() not in (3, 4) or keys.shape[:-1] != values.shape[:-1]:
            raise ValueError(f"keys/values: expected (Hm, N, D) or (B, Hm, N, D) with matching leading "
                             f"shapes, got {tuple(keys.shape)} and {tuple(values.shape)}")
        Hm, N, Dk, Dv = keys.shape[-3], keys.shape[-2], keys.shape[-1], values.shape[-1]
        if (Hm, Dk, Dv) != (self.num_heads, self.key_dim, self.value_dim):
            raise ValueError(f"keys/values: this TopKMemory has num_heads={self.num_heads}, "
                             f"key_dim={self.key_dim}, value_dim={self.value_dim}; got keys "
                             f"{tuple(keys.shape)} and values {tuple(values.shape)}")
        if N != self.num_slots and not resize:
            raise ValueError(f"keys: this TopKMemory has num_slots={self.num_slots}, got N={N} (shape "
                             f"{tuple(keys.shape)}); pass valid_len for a partly filled bank, or "
                             f"resize=True to change num_slots")
        if valid_len is not None and (valid_len.dim() != 1 or (keys.dim() == 4 and len(valid_len) != keys.shape[0])):
            raise ValueError(f"valid_len: expected shape (B,) (B = the batch of the read queries"
                             f"{'' if keys.dim() == 3 else f', {keys.shape[0]} here'}), "
                             f"got {tuple(valid_len.shape)}")
        self.keys, self.values = keys.detach(), values.detach()
        self.valid_len = None if valid_len is None else valid_len.detach()
        self.num_slots = N
        return self

    def read(self, q: torch.Tensor, k: int, *, scale: Optional[float] = None,
             deterministic: bool = False) -> MemoryRead:
        """Read the ``k`` best slots for each query ``q (B, H, T, Dk)``; see :func:`topk_memory_read`."""
        return topk_memory_read(q, self.keys, self.values, k, scale=scale, valid_len=self.valid_len,
                                deterministic=deterministic, backend=self.backend)

    forward = read

    def write(self, write_keys: torch.Tensor, erase: torch.Tensor, add: torch.Tensor, k: int, *,
              scale: Optional[float] = None) -> MemoryRead:
        """Content-addressed gated write into the stored values (buffers only).

        Each write key ``(B, Hm, T, Dk)`` addresses its ``k`` best slots through the top-k read of
        the bank's keys; every addressed slot's value is updated, in time order, with the read's
        softmax weight ``w``: ``value <- value * (1 - w * erase_t) + w * add_t``
        (:func:`gated_memory_write`). ``erase`` is ``(B, Hm, T, Dv)`` or ``(B, Hm, T, 1)`` in
        ``[0, 1]``, ``add`` ``(B, Hm, T, Dv)``. The new values become the bank's state (a shared
        ``(Hm, N, Dv)`` bank becomes per batch element on its first write), carried to the next
        call; while autograd records, the state stays differentiable in ``erase``, ``add`` and the
        write keys (through the weights) until :meth:`detach_` cuts it, e.g. between segments.
        Returns the addressing read.
        """
        if isinstance(self.values, nn.Parameter):
            raise RuntimeError("write updates stored state; this TopKMemory has trainable=True parameters "
                               "(create it with trainable=False and load_ its state)")
        B = write_keys.shape[0]
        if write_keys.dim() != 4 or write_keys.shape[1] != self.num_heads:
            raise ValueError(f"write_keys: expected (B, Hm={self.num_heads}, T, Dk), got {tuple(write_keys.shape)}")
        keys, values = self.keys, self.values
        if keys.dim() == 3:  # shared bank: give every batch element its own copy to write into
            keys = keys.unsqueeze(0).expand(B, *keys.shape).contiguous()
            values = values.unsqueeze(0).expand(B, *values.shape).contiguous()
        read = topk_memory_read(write_keys, keys, values, k, scale=scale, valid_len=self.valid_len,
                                backend=self.backend)
        self.keys = keys
        self.values = gated_memory_write(values, read.indices, read.weights.to(values.dtype), add, erase,
                                         backend=self.backend)
        return read

    @torch.no_grad()
    def detach_(self) -> "TopKMemory":
        """Cut the autograd history of the stored state (keep its values)."""
        if not isinstance(self.values, nn.Parameter):
            self.keys, self.values = self.keys.detach(), self.values.detach()
        return self

    def extra_repr(self) -> str:
        return (f"num_slots={self.num_slots}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"num_heads={self.num_heads}, trainable={isinstance(self.keys, nn.Parameter)}")


class MemoryWriter(nn.Module):
    """Learned writes into a :class:`TopKMemory`: hidden states ``x (B, T, dim)`` give per-head
    write keys, erase gates (sigmoid) and add vectors through linear projections, then
    :meth:`TopKMemory.write` stores them in the ``k`` best-matching slots.

    Example (Memorizing-Transformer style state carried across segments):
        bank = TopKMemory(num_slots=4096, key_dim=64, value_dim=64, num_heads=4, trainable=False)
        bank.load_(torch.randn(4, 4096, 64), torch.zeros(4, 4096, 64))
        writer = MemoryWriter(dim=256, key_dim=64, value_dim=64, num_heads=4, k=4)
        for segment in segments:               # (B, T, 256) hidden states
            writer(segment, bank)              # the bank's values now hold the segment
            read = bank(q, k=32)
            bank.detach_()                     # truncate backpropagation between segments
    """

    def __init__(self, dim: int, key_dim: int, value_dim: int, num_heads: int = 1, k: int = 1, *,
                 erase_per_feature: bool = True, device=None, dtype=None):
        super().__init__()
        if min(dim, key_dim, value_dim, num_heads, k) < 1:
            raise ValueError("dim, key_dim, value_dim, num_heads and k must be >= 1, got "
                             f"{dim}, {key_dim}, {value_dim}, {num_heads}, {k}")
        self.key_dim, self.value_dim, self.num_heads, self.k = key_dim, value_dim, num_heads, k
        factory = dict(device=device, dtype=dtype)
        self.key_proj = nn.Linear(dim, num_heads * key_dim, bias=False, **factory)
        self.erase_proj = nn.Linear(dim, num_heads * (value_dim if erase_per_feature else 1), **factory)
        self.add_proj = nn.Linear(dim, num_heads * value_dim, **factory)

    def _heads(self, x: torch.Tensor, size: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, size).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: TopKMemory) -> MemoryRead:
        """Write ``x (B, T, dim)`` into ``memory``; returns the addressing read."""
        if memory.num_heads != self.num_heads:
            raise ValueError(f"memory: has {memory.num_heads} heads, this writer {self.num_heads}")
        erase_size = self.erase_proj.out_features // self.num_heads
        write_keys = self._heads(self.key_proj(x), self.key_dim)
        erase = torch.sigmoid(self._heads(self.erase_proj(x), erase_size))
        add = self._heads(self.add_proj(x), self.value_dim)
        return memory.write(write_keys, erase.contiguous(), add.contiguous(), self.k)
