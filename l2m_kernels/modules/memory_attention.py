"""Causal self-attention that also reads a top-k memory: a drop-in for a Transformer's attention."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..ops._common import MemoryAttention as MemoryAttentionResult
from ..ops.memory_attention import MERGES, memory_attention
from .topk_memory import TopKMemory


class AttentionOutput(NamedTuple):
    """Result of :meth:`MemoryAttention.attend`.

    ``out (B, T, d_model)``; ``context_keys``, ``context_values`` ``(B, Hkv, S, head_dim)``: the
    local context that was attended (``past_kv`` followed by the new tokens' keys/values, rotary
    applied), ready to be passed back as ``past_kv``; ``attention``: the op's
    :class:`l2m_kernels.MemoryAttention` (``lse_local``, ``lse_mem``, memory ``indices``).
    """

    out: torch.Tensor
    context_keys: torch.Tensor
    context_values: torch.Tensor
    attention: MemoryAttentionResult


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dims: int, base: float) -> torch.Tensor:
    """Rotary position embedding on the first ``rotary_dims`` features of ``x (B, H, T, D)``.

    ``positions (T,)`` are absolute token positions. Pairs ``(i, i + rotary_dims / 2)`` are rotated
    (GPT-NeoX layout); features ``>= rotary_dims`` are left unchanged. The angles are computed in
    float64, so a token gets bitwise the same rotation whatever the call's shape.
    """
    if rotary_dims == 0:
        return x
    half = rotary_dims // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[:, None] * inv_freq            # (T, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rotary_dims], x[..., rotary_dims:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class MemoryAttention(nn.Module):
    """Multi-head causal (sliding-window) self-attention merged with a top-k memory read, through
    the fused op :func:`l2m_kernels.memory_attention`.

    ``x (B, T, d_model) -> (B, T, d_model)``:

    1. projections ``q = x Wq`` ``(B, n_heads, T, head_dim)``, ``k = x Wk``, ``v = x Wv``
       ``(B, n_kv_heads, T, head_dim)`` (grouped key/value heads when ``n_kv_heads < n_heads``),
       rotary position embedding on the first ``rotary_dims`` features of q and k;
    2. local context ``k, v = cat(past_kv, new)`` ``(B, Hkv, S, head_dim)``; query ``t`` sits at
       position ``S - T + t`` and sees the keys of the last ``window`` positions (all earlier ones
       with ``window=None``);
    3. the same queries read the ``topk`` best memory slots (``mem_keys``/``mem_values``
       ``(B, Hm, N, head_dim)`` or shared ``(Hm, N, head_dim)``, ``n_heads % Hm == 0``, with
       optional ``valid_len (B,)``), merged with the local result: ``merge="joint"``, one softmax
       over local keys and memory entries together; ``merge="gate"``, ``g * memory + (1 - g) * local``
       with ``g = sigmoid(gate)``, one learned logit per head (``gate`` parameter ``(n_heads, 1, 1)``,
       initialised to 0, i.e. g = 0.5);
    4. output projection ``(B, T, n_heads * head_dim) -> (B, T, d_model)``.

    There is no normalisation inside: the surrounding block normalises ``x`` (pre-norm).

    The memory is either passed to each call (``mem_keys``, ``mem_values``, ``valid_len``: a memory
    that the caller owns and writes, as :class:`l2m_kernels.models.L2MModel` does) or owned: a
    :class:`TopKMemory` given as ``memory`` (its ``keys``, ``values``, ``valid_len``; learned
    parameters or loaded state), used when a call passes no memory. With neither, the module is
    plain causal attention: it reads an empty memory (one slot, ``valid_len = 0``) merged jointly,
    which contributes nothing, so the result is exactly the local attention. That makes it a
    drop-in for a model's attention module that takes hidden states and returns hidden states.

    Args:
        d_model:     model width.
        n_heads:     query heads H.
        n_kv_heads:  key/value heads Hkv (default ``n_heads``); ``n_heads % n_kv_heads == 0``.
        head_dim:    features per head (default ``d_model // n_heads``).
        topk:        memory entries read per query and head.
        window:      local sliding window (None: every earlier position of the local context).
        merge:       "joint" or "gate".
        memory:      optional owned :class:`TopKMemory` (key_dim = value_dim = head_dim).
        rotary_dims: features per head that get rotary position embedding (even, 0 = none).
        rope_base:   rotary base.
        scale:       score scale for local and memory scores (default ``head_dim ** -0.5``).
        bias:        biases in the q/k/v/o projections.
        deterministic: bitwise-reproducible gradients (passed to the op).
        backend:     backend of the op (None: automatic; each call may override it).

    Example (replacing a Llama-style block's attention that maps hidden states to hidden states)::

        block.attn = MemoryAttention(d_model=512, n_heads=8, n_kv_heads=2, topk=32, window=256,
                                     memory=TopKMemory(num_slots=16384, key_dim=64, value_dim=64,
                                                       num_heads=2))
        y = block.attn(x)                               # (B, T, 512)
        r = block.attn.attend(x_next, past_kv=(r.context_keys, r.context_values))  # with a kv cache
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, topk: int = 32, window: Optional[int] = None,
                 merge: str = "joint", memory: Optional[TopKMemory] = None, rotary_dims: int = 0,
                 rope_base: float = 10000.0, scale: Optional[float] = None, bias: bool = False,
                 deterministic: bool = False, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if min(d_model, n_heads, n_kv_heads, head_dim, topk) < 1:
            raise ValueError("d_model, n_heads, n_kv_heads, head_dim and topk must be >= 1, got "
                             f"{d_model}, {n_heads}, {n_kv_heads}, {head_dim}, {topk}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: must divide n_heads = {n_heads}, got {n_kv_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window: expected None or >= 1, got {window}")
        if merge not in MERGES:
            raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
        if rotary_dims < 0 or rotary_dims % 2 or rotary_dims > head_dim:
            raise ValueError(f"rotary_dims: expected an even number in [0, head_dim = {head_dim}], "
                             f"got {rotary_dims}")
        if memory is not None and (memory.key_dim != head_dim or memory.value_dim != head_dim
                                   or n_heads % memory.num_heads):
            raise ValueError(f"memory: expected key_dim = value_dim = head_dim = {head_dim} and heads "
                             f"dividing n_heads = {n_heads}, got {memory}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.topk, self.window, self.merge = topk, window, merge
        self.rotary_dims, self.rope_base = rotary_dims, rope_base
        self.scale = head_dim ** -0.5 if scale is None else float(scale)
        self.deterministic, self.backend = deterministic, backend
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **factory)
        self.gate = nn.Parameter(torch.zeros(n_heads, 1, 1, **factory)) if merge == "gate" else None
        self.register_module("memory", memory)  # None allowed; a TopKMemory may be set later

    def project(self, x: torch.Tensor, start_pos: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, T, d_model)`` -> ``q (B, H, T, head_dim)``, ``k``, ``v (B, Hkv, T, head_dim)``,
        rotary applied at positions ``start_pos .. start_pos + T - 1``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary_dims:
            positions = torch.arange(start_pos, start_pos + T, device=x.device)
            q = apply_rotary(q, positions, self.rotary_dims, self.rope_base)
            k = apply_rotary(k, positions, self.rotary_dims, self.rope_base)
        return q, k, v

    def attend(self, x: torch.Tensor, mem_keys: Optional[torch.Tensor] = None,
               mem_values: Optional[torch.Tensor] = None, *, valid_len: Optional[torch.Tensor] = None,
               past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, start_pos: Optional[int] = None,
               backend: Optional[str] = None) -> AttentionOutput:
        """Attention of ``x (B, T, d_model)`` over its local context and the memory.

        Args:
            x:          (B, T, d_model) the new tokens' (normalised) hidden states.
            mem_keys:   (B, Hm, N, head_dim) or (Hm, N, head_dim); None: the owned memory, or none.
            mem_values: the leading shape of ``mem_keys``, last size head_dim.
            valid_len:  optional int (B,): memory slots ``n >= valid_len[b]`` do not exist.
            past_kv:    optional cached ``(k, v)`` ``(B, Hkv, P, head_dim)`` of the P positions before
                        ``x`` (rotary applied, e.g. an earlier call's ``context_keys/values``).
            start_pos:  absolute position of ``x``'s first token for the rotary embedding
                        (default P).
            backend:    overrides the module's backend for this call.

        Returns:
            :class:`AttentionOutput` ``(out, context_keys, context_values, attention)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        past_len = 0 if past_kv is None else past_kv[0].shape[2]
        q, k, v = self.project(x, past_len if start_pos is None else start_pos)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        merge, gate, topk = self.merge, self.gate, self.topk
        if mem_keys is None and mem_values is None and self.memory is not None:
            mem_keys, mem_values, valid_len = self.memory.keys, self.memory.values, self.memory.valid_len
        if mem_keys is None and mem_values is None:
            # No memory: an empty one (valid_len = 0) merged jointly adds nothing, leaving exactly
            # the local attention, on the same fused op and backends.
            mem_keys = x.new_zeros(1, 1, self.head_dim)
            mem_values = x.new_zeros(1, 1, self.head_dim)
            valid_len = torch.zeros(B, dtype=torch.int64, device=x.device)
            merge, gate, topk = "joint", None, 1
        elif mem_keys is None or mem_values is None:
            raise ValueError("mem_keys, mem_values: pass both or neither")
        result = memory_attention(q, k, v, mem_keys, mem_values, topk, window=self.window, merge=merge,
                                  gate=gate, scale=self.scale, valid_len=valid_len,
                                  deterministic=self.deterministic,
                                  backend=self.backend if backend is None else backend)
        out = self.o_proj(result.out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return AttentionOutput(out, k, v, result)

    def attend_store(self, x: torch.Tensor, store, *, blocks: Optional[int] = None,
                     past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     start_pos: Optional[int] = None, backend: Optional[str] = None) -> AttentionOutput:
        """:meth:`attend` with a :class:`l2m_kernels.memory.MemoryStore` as the memory.

        The store holds one memory per batch element: its ``num_heads`` is ``B * n_kv_heads``
        (batch element ``b``'s key/value head ``g`` is store head ``b * n_kv_heads + g``). The
        local attention runs in the fused op, the store is read with ``store.read(q, topk,
        blocks=blocks)`` (exact when ``blocks`` is None, two-level otherwise), and the two are
        merged exactly by log-sum-exp (``merge="joint"``) or by the gate. Differentiable in the
        projections (the store's entries are state).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if store.num_heads != B * self.n_kv_heads or store.key_dim != self.head_dim:
            raise ValueError(f"store: expected num_heads = B * n_kv_heads = {B * self.n_kv_heads} and "
                             f"key_dim = {self.head_dim}, got {store.num_heads} and {store.key_dim}")

        def read_store(q):
            read = store.read(q.reshape(1, B * self.n_heads, T, self.head_dim), self.topk,
                              blocks=blocks, scale=self.scale)
            return (read.out.view(B, self.n_heads, T, self.head_dim), read.lse.view(B, self.n_heads, T),
                    read.indices.view(B, self.n_heads, T, self.topk))
        return self.attend_read(x, read_store, past_kv=past_kv, start_pos=start_pos, backend=backend)

    def attend_read(self, x: torch.Tensor, read, *, past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    start_pos: Optional[int] = None, backend: Optional[str] = None) -> AttentionOutput:
        """:meth:`attend` with the memory read by ``read``, a callable ``q (B, n_heads, T, head_dim)
        -> (out (B, n_heads, T, head_dim), lse (B, n_heads, T), indices (B, n_heads, T, topk))``,
        e.g. a :class:`l2m_kernels.memory.MemoryStore` read or a read of a memory sharded across
        processes (:func:`l2m_kernels.distributed.sharded_topk_memory_read`).

        The local attention runs in the fused op (with an empty memory) and the two are merged
        exactly by log-sum-exp (``merge="joint"``) or by the gate, as the fused op merges them.

        Equivalent PyTorch:
            local = memory_attention(q, k, v, empty, empty, 1, valid_len=zeros)
            out_mem, lse_mem, _ = read(q)
            out = merge_attention(local.out, local.lse_local, out_mem, lse_mem)[0]   # "joint"
        """
        from ..ops.merge import gated_merge, merge_attention

        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        past_len = 0 if past_kv is None else past_kv[0].shape[2]
        q, k, v = self.project(x, past_len if start_pos is None else start_pos)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        backend = self.backend if backend is None else backend
        empty = x.new_zeros(1, 1, self.head_dim)
        local = memory_attention(q, k, v, empty, empty, 1, window=self.window, merge="joint",
                                 scale=self.scale, valid_len=torch.zeros(B, dtype=torch.int64,
                                                                         device=x.device),
                                 deterministic=self.deterministic, backend=backend)
        out_mem, lse_mem, indices = read(q)
        out_mem = out_mem.to(local.out.dtype)
        if self.merge == "joint":
            out, _ = merge_attention(local.out, local.lse_local, out_mem, lse_mem, backend=backend)
        else:
            out = gated_merge(local.out, out_mem, self.gate, backend=backend)
        result = MemoryAttentionResult(out, local.lse_local, lse_mem, indices)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return AttentionOutput(out, k, v, result)

    def forward(self, x: torch.Tensor, mem_keys: Optional[torch.Tensor] = None,
                mem_values: Optional[torch.Tensor] = None, *, valid_len: Optional[torch.Tensor] = None,
                past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                start_pos: Optional[int] = None) -> torch.Tensor:
        """``x (B, T, d_model) -> (B, T, d_model)``; arguments as in :meth:`attend`."""
        return self.attend(x, mem_keys, mem_values, valid_len=valid_len, past_kv=past_kv,
                           start_pos=start_pos).out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, topk={self.topk}, window={self.window}, merge={self.merge!r}, "
                f"rotary_dims={self.rotary_dims}")
