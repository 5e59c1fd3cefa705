"""A thin decoder-only Large Memory Model: local attention over segments plus a per-layer memory.

The model reads long inputs segment by segment (``segment_len`` tokens). In every layer the tokens
of a segment attend to their local context (the cached keys/values of the last ``window - 1``
earlier positions plus the segment so far, sliding ``window``) and read the ``topk`` best entries
of that layer's memory, both in one :func:`l2m_kernels.memory_attention` call. When a segment is
complete, each memory layer writes it into its memory with :func:`l2m_kernels.gated_memory_write`:

- ``memory_mode="append"`` (Memorizing Transformers): the segment's keys and values (rotary
  applied, detached) go to the next slots of a ring buffer of ``memory_slots`` entries, weight 1
  and erase 1; ``valid_len`` counts the filled slots.
- ``memory_mode="store"``: as "append", into a :class:`l2m_kernels.memory.MemoryStore` per layer
  (``store_options``: tiers, int8 keys, eviction policy, consolidation; ``store_blocks``: two-level
  reads) instead of a ring buffer: a full store frees slots with its eviction policy (default
  FIFO, which keeps what the ring buffer keeps). The local attention and the store read are merged
  exactly by log-sum-exp (or by the gate). The store is mutable state, like a key-value cache: a
  returned state's store keeps changing with later calls that are passed that state.
- ``memory_mode="slots"``: a learned slot memory (fixed learned keys, written values). Each token
  of the segment addresses its ``write_topk`` best slots by the similarity of a learned write key
  to the slot keys (:func:`l2m_kernels.topk_memory_read`, softmax weights) and updates their
  values with a learned erase gate and add vector; differentiable across the segments of a call.

Everything a later call needs (memory, local cache, positions) is an :class:`L2MState`, returned
by ``forward`` and accepted back, so a long document can be fed over several calls; the returned
state is detached (truncated backpropagation between calls). Segment boundaries sit at absolute
multiples of ``segment_len``, so the results do not depend on how the input is split over calls.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..modules.memory_attention import MemoryAttention
from ..ops.memory_write import gated_memory_write
from ..ops.topk_read import topk_memory_read

MEMORY_MODES = ("append", "slots", "store")


@dataclass
class L2MConfig:
    """Configuration of :class:`L2MModel`. ``None`` fields are resolved in ``__post_init__``.

    Attributes:
        vocab_size, d_model, n_layers, n_heads: the usual.
        n_kv_heads:    key/value heads (grouped attention; default ``n_heads``). The memory of a
                       layer has ``n_kv_heads`` heads.
        head_dim:      default ``d_model // n_heads``.
        mlp_hidden:    MLP hidden size (default ``4 * d_model``).
        segment_len:   tokens per segment: the unit of memory writes.
        window:        local sliding window, ``1 <= window <= segment_len`` (default ``segment_len``).
        memory_slots:  N, memory entries per layer and key/value head.
        topk:          memory entries read per query and head.
        memory_mode:   "append" (ring buffer of past keys/values), "store" (past keys/values in a
                       MemoryStore) or "slots" (learned gated writes).
        store_options: "store" mode: keyword arguments of :class:`l2m_kernels.memory.MemoryStore`
                       (``block_size`` (default ``min(segment_len, 256)``, must divide
                       ``memory_slots``), ``tiers``, ``key_format``, ``value_format``,
                       ``eviction`` (default ``"fifo"``), ``usage_decay``, ``consolidate``, ...).
        store_blocks:  "store" mode: blocks per query of a two-level read (None: exact reads).
        write_topk:    slots written per token in "slots" mode.
        merge:         "joint" (one softmax over local keys and memory entries) or "gate"
                       (learned per-head gate).
        memory_layers: indices of the layers with a memory (negative counts from the end);
                       None: every layer; ``()``: no memory at all (a local-attention baseline).
        rotary_dims:   features per head with rotary position embedding (default ``head_dim // 2``:
                       the other half carries no position, so memory entries can be matched at any
                       distance); 0: none.
        rope_base:     rotary base.
        norm_eps:      RMSNorm epsilon.
        tie_embeddings: the LM head shares the token embedding.
        backend:       backend of every op (None: automatic); ``forward(backend=...)`` overrides.
        deterministic: bitwise-reproducible gradients on the GPU backends.
        memory_group:  a ``torch.distributed`` process group whose ranks split every memory's
                       ``memory_slots`` ("append" and "slots" modes): rank r holds the slots of
                       :func:`l2m_kernels.distributed.shard_sizes` (an even split), every rank runs
                       the same tokens (replicated queries), and the memory is read and written
                       exactly with :func:`l2m_kernels.distributed.sharded_topk_memory_read` and
                       :func:`~l2m_kernels.distributed.sharded_gated_memory_write`, so every rank
                       gets the single-process model's loss and the gradients of the parameters it
                       holds ("slots" mode: ``slot_keys`` and ``initial_values`` are this rank's
                       slots). None: the whole memory on this process.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    mlp_hidden: Optional[int] = None
    segment_len: int = 64
    window: Optional[int] = None
    memory_slots: int = 1024
    topk: int = 8
    memory_mode: str = "append"
    store_options: Optional[dict] = None
    store_blocks: Optional[int] = None
    write_topk: int = 4
    merge: str = "joint"
    memory_layers: Optional[Tuple[int, ...]] = None
    rotary_dims: Optional[int] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    backend: Optional[str] = None
    deterministic: bool = False
    memory_group: Optional[object] = None

    def __post_init__(self):
        if min(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.segment_len,
               self.memory_slots, self.topk, self.write_topk) < 1:
            raise ValueError(f"L2MConfig: sizes must be >= 1, got {self}")
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.head_dim = self.d_model // self.n_heads if self.head_dim is None else self.head_dim
        self.mlp_hidden = 4 * self.d_model if self.mlp_hidden is None else self.mlp_hidden
        self.window = self.segment_len if self.window is None else self.window
        self.rotary_dims = 2 * (self.head_dim // 4) if self.rotary_dims is None else self.rotary_dims
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: must divide n_heads = {self.n_heads}, got {self.n_kv_heads}")
        if not 1 <= self.window <= self.segment_len:
            raise ValueError(f"window: expected 1 <= window <= segment_len = {self.segment_len}, "
                             f"got {self.window}")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode: expected one of {MEMORY_MODES}, got {self.memory_mode!r}")
        if self.merge not in ("joint", "gate"):
            raise ValueError(f"merge: expected 'joint' or 'gate', got {self.merge!r}")
        if self.topk > self.memory_slots or self.write_topk > self.memory_slots:
            raise ValueError(f"topk, write_topk: expected <= memory_slots = {self.memory_slots}, "
                             f"got {self.topk}, {self.write_topk}")
        if self.memory_mode == "store":
            options = dict(self.store_options or {})
            options.setdefault("block_size", min(self.segment_len, 256))
            options.setdefault("eviction", "fifo")
            if self.memory_slots % options["block_size"]:
                raise ValueError(f"memory_slots: must be a multiple of the store's block_size = "
                                 f"{options['block_size']}, got {self.memory_slots}")
            self.store_options = options
        if self.memory_group is not None and self.memory_mode == "store":
            raise ValueError("memory_group: a sharded memory is supported in the 'append' and 'slots' "
                             "memory modes, not in 'store'")
        layers = range(self.n_layers) if self.memory_layers is None else self.memory_layers
        for i in layers:
            if not -self.n_layers <= i < self.n_layers:
                raise ValueError(f"memory_layers: layer {i} out of range for n_layers = {self.n_layers}")
        self.memory_layers = tuple(sorted({i % self.n_layers for i in layers}))


@dataclass
class L2MLayerState:
    """One layer's state (B batch, Hkv key/value heads, Dh head_dim, N memory_slots).

    Attributes:
        cache_keys, cache_values: (B, Hkv, P, Dh) keys/values (rotary applied) of the last
            ``window - 1`` positions before the current segment plus the current segment so far.
        mem_keys:   (B, Hkv, N, Dh) "append" memory keys; None otherwise (slot keys are parameters).
        mem_values: (B, Hkv, N, Dh) memory values ("append" and "slots"); None without memory.
        valid_len:  (B,) int64 filled slots ("append"); None otherwise.
        pending:    (B, position % segment_len, d_model) "slots" mode: the normalised inputs of the
                    current, not yet written segment; None otherwise.
        store:      "store" mode: the layer's :class:`l2m_kernels.memory.MemoryStore` (B * Hkv
                    heads, one memory per batch element); None otherwise. Mutable, shared by the
                    states that hold it.
    """

    cache_keys: torch.Tensor
    cache_values: torch.Tensor
    mem_keys: Optional[torch.Tensor] = None
    mem_values: Optional[torch.Tensor] = None
    valid_len: Optional[torch.Tensor] = None
    pending: Optional[torch.Tensor] = None
    store: Optional[object] = None

    def detach(self) -> "L2MLayerState":
        def detached(value):
            return value.detach() if isinstance(value, torch.Tensor) else value
        return L2MLayerState(**{field.name: detached(getattr(self, field.name))
                                for field in dataclasses.fields(self)})


@dataclass
class L2MState:
    """What a later call needs: ``position`` (tokens processed so far), ``write_pos`` (next slot
    of the "append" ring buffer) and one :class:`L2MLayerState` per layer."""

    position: int
    write_pos: int
    layers: List[L2MLayerState]

    def detach(self) -> "L2MState":
        return L2MState(self.position, self.write_pos, [layer.detach() for layer in self.layers])

    @property
    def batch_size(self) -> int:
        return self.layers[0].cache_keys.shape[0]


class L2MOutput(NamedTuple):
    """``logits (B, L, vocab_size)``; ``loss`` (scalar, or None without labels); the new ``state``."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    state: L2MState


class Generation(NamedTuple):
    """``tokens (B, L + max_new_tokens)``: prompt and greedy continuation; ``state`` after all."""

    tokens: torch.Tensor
    state: L2MState


def memory_shard(config: L2MConfig) -> Tuple[int, int]:
    """``(offset, size)``: the global id of this rank's first slot of each memory and its slot count
    (``(0, memory_slots)`` without ``memory_group``)."""
    if config.memory_group is None:
        return 0, config.memory_slots
    import torch.distributed as dist

    from ..distributed import shard_sizes
    sizes = shard_sizes(config.memory_slots, dist.get_world_size(config.memory_group))
    rank = dist.get_rank(config.memory_group)
    return sum(sizes[:rank]), sizes[rank]


class SlotMemory(nn.Module):
    """A layer's learned slot memory ("slots" mode): ``slot_keys`` and ``initial_values``
    ``(heads, N, head_dim)`` parameters, and the write projections of hidden states. With ``group``
    the ``N`` slots are this rank's share of a memory sharded across the process group."""

    def __init__(self, d_model: int, heads: int, head_dim: int, slots: int, write_topk: int, group=None):
        super().__init__()
        self.heads, self.head_dim, self.write_topk, self.group = heads, head_dim, write_topk, group
        self.slot_keys = nn.Parameter(torch.randn(heads, slots, head_dim))
        self.initial_values = nn.Parameter(torch.zeros(heads, slots, head_dim))
        self.key_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.erase_proj = nn.Linear(d_model, heads * head_dim)
        self.add_proj = nn.Linear(d_model, heads * head_dim)

    def keys(self, batch_size: int) -> torch.Tensor:
        """(B, heads, N, head_dim): the slot keys, shared by every batch element (a view)."""
        return self.slot_keys.expand(batch_size, *self.slot_keys.shape)

    def write(self, values: torch.Tensor, x: torch.Tensor, *, backend=None, deterministic=False) -> torch.Tensor:
        """Write the tokens ``x (B, T, d_model)`` in order into ``values (B, heads, N, head_dim)``.

        Each token's write key ``(B, heads, T, head_dim)`` addresses its ``write_topk`` best slots
        (softmax weights ``w`` of the top-k read); each addressed slot becomes
        ``value * (1 - w * erase) + w * add`` with ``erase = sigmoid(erase_proj(x))`` and
        ``add = add_proj(x)``. Returns the new values, differentiable in ``values``, ``x`` and the
        parameters.
        """
        B, T, _ = x.shape

        def heads(t):
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

        write_keys = heads(self.key_proj(x))
        erase = torch.sigmoid(heads(self.erase_proj(x)))
        add = heads(self.add_proj(x))
        if self.group is not None:
            from ..distributed import sharded_gated_memory_write, sharded_topk_memory_read
            read = sharded_topk_memory_read(write_keys, self.keys(B), values, self.write_topk,
                                            group=self.group, backend=backend)
            return sharded_gated_memory_write(values, read.indices, read.weights.to(values.dtype), add,
                                              erase, group=self.group, backend=backend)
        read = topk_memory_read(write_keys, self.keys(B), values, self.write_topk,
                                deterministic=deterministic, backend=backend)
        return gated_memory_write(values, read.indices, read.weights.to(values.dtype), add, erase,
                                  backend=backend)


class L2MBlock(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` (local attention + memory read), then
    ``x + mlp(norm(x))``; ``slots`` is the layer's :class:`SlotMemory` in "slots" mode."""

    def __init__(self, config: L2MConfig, has_memory: bool):
        super().__init__()
        c = config
        self.has_memory = has_memory
        self.attn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        # Without a memory the module reads nothing and is plain local attention; no gate needed.
        self.attn = MemoryAttention(c.d_model, c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                                    topk=c.topk, window=c.window, merge=c.merge if has_memory else "joint",
                                    rotary_dims=c.rotary_dims, rope_base=c.rope_base,
                                    deterministic=c.deterministic, backend=c.backend)
        self.mlp_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, c.mlp_hidden, bias=False), nn.GELU(),
                                 nn.Linear(c.mlp_hidden, c.d_model, bias=False))
        self.slots = (SlotMemory(c.d_model, c.n_kv_heads, c.head_dim, memory_shard(c)[1], c.write_topk,
                                 c.memory_group)
                      if has_memory and c.memory_mode == "slots" else None)


class L2MModel(nn.Module):
    """Decoder-only Transformer with a memory per layer, run segment by segment.

    ``input_ids (B, L)`` -> :class:`L2MOutput` ``(logits (B, L, vocab_size), loss, state)``.
    See the module docstring for the segments and memory modes, :class:`L2MConfig` for the sizes.

    Example::

        model = L2MModel(L2MConfig(vocab_size=256, d_model=128, segment_len=64, memory_slots=4096))
        state = None
        for chunk in document.split(512, dim=1):         # (B, 512) token ids
            out = model(chunk, state, labels=targets_of(chunk))
            out.loss.backward(); opt.step(); opt.zero_grad()
            state = out.state                            # memory carried over, detached
        tokens, state = model.generate(prompt, max_new_tokens=20, state=state)
    """

    def __init__(self, config: L2MConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(L2MBlock(config, i in config.memory_layers) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ---- state ----

    def init_state(self, batch_size: int, device=None, dtype=None) -> L2MState:
        """The state before any token: empty caches and memories (defaults: the model's device
        and dtype). In "slots" mode the memory values start from the learned ``initial_values``."""
        c = self.config
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype if dtype is None else dtype
        empty = torch.zeros(batch_size, c.n_kv_heads, 0, c.head_dim, device=device, dtype=dtype)
        layers = []
        for block in self.blocks:
            layer = L2MLayerState(empty, empty)
            if block.has_memory and c.memory_mode == "append":
                memory = torch.zeros(batch_size, c.n_kv_heads, memory_shard(c)[1], c.head_dim, device=device,
                                     dtype=dtype)
                layer.mem_keys, layer.mem_values = memory, memory
                layer.valid_len = torch.zeros(batch_size, dtype=torch.int64, device=device)
            elif block.has_memory and c.memory_mode == "store":
                from ..memory import MemoryStore
                layer.store = MemoryStore(batch_size * c.n_kv_heads, c.head_dim, c.head_dim,
                                          c.memory_slots, device=device, **c.store_options)
            elif block.slots is not None:
                layer.mem_values = block.slots.initial_values.to(device, dtype).expand(batch_size, -1, -1, -1)
                layer.pending = torch.zeros(batch_size, 0, c.d_model, device=device, dtype=dtype)
            layers.append(layer)
        return L2MState(0, 0, layers)

    def clear_memory(self, state: L2MState) -> L2MState:
        """``state`` with every memory reset to its initial contents (local cache and position kept)."""
        fresh = self.init_state(state.batch_size, state.layers[0].cache_keys.device,
                                state.layers[0].cache_keys.dtype)
        layers = [dataclasses.replace(old, mem_keys=new.mem_keys, mem_values=new.mem_values,
                                      valid_len=new.valid_len, store=new.store)
                  for old, new in zip(state.layers, fresh.layers)]
        return L2MState(state.position, 0, layers)

    # ---- forward ----

    def forward(self, input_ids: torch.Tensor, state: Optional[L2MState] = None, *,
                labels: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> L2MOutput:
        """Run ``input_ids (B, L)`` (int64) after ``state`` (None: a fresh start).

        Args:
            input_ids: (B, L) token ids; may span any number of segments, and start or end inside
                one (the state keeps the unfinished segment).
            state:     the state returned by an earlier call, or None.
            labels:    optional (B, L) int64 targets aligned with ``input_ids`` (``labels[:, t]`` is
                       the token that position ``t`` should predict, i.e. already shifted); -100 is
                       ignored. Gives ``loss``, the mean cross-entropy.
            backend:   overrides ``config.backend`` for this call.

        Returns:
            :class:`L2MOutput` (logits (B, L, vocab_size), loss or None, state (detached)).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (B, L), got {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        if state is None:
            state = self.init_state(B)
        elif state.batch_size != B:
            raise ValueError(f"state: holds batch size {state.batch_size}, input_ids has {B}")
        else:
            state = state.detach()
        backend = self.config.backend if backend is None else backend
        hidden = self.embed(input_ids)
        outputs, start = [], 0
        while start < L:  # pieces that never cross a segment boundary
            length = min(L - start, self.config.segment_len - state.position % self.config.segment_len)
            piece, state = self._run_piece(hidden[:, start:start + length], state, backend)
            outputs.append(piece)
            start += length
        hidden = torch.cat(outputs, dim=1) if outputs else hidden
        logits = self.lm_head(self.norm(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return L2MOutput(logits, loss, state.detach())

    def _run_piece(self, hidden: torch.Tensor, state: L2MState, backend) -> Tuple[torch.Tensor, L2MState]:
        """All layers on ``hidden (B, T, d_model)``, tokens of one segment; writes the memories
        when the segment is complete."""
        c = self.config
        B, T, _ = hidden.shape
        completes = (state.position + T) % c.segment_len == 0
        layers = []
        for block, layer in zip(self.blocks, state.layers):
            normed = block.attn_norm(hidden)
            mem_keys, mem_values, valid_len = None, None, None
            if block.slots is not None:
                mem_keys, mem_values = block.slots.keys(B), layer.mem_values
            elif block.has_memory:
                mem_keys, mem_values, valid_len = layer.mem_keys, layer.mem_values, layer.valid_len
            if block.has_memory and c.memory_group is not None:
                attended = block.attn.attend_read(normed, self._sharded_read(block, mem_keys, mem_values, valid_len),
                                                  past_kv=(layer.cache_keys, layer.cache_values),
                                                  start_pos=state.position, backend=backend)
            elif layer.store is not None:
                attended = block.attn.attend_store(normed, layer.store, blocks=c.store_blocks,
                                                   past_kv=(layer.cache_keys, layer.cache_values),
                                                   start_pos=state.position, backend=backend)
            else:
                attended = block.attn.attend(normed, mem_keys, mem_values, valid_len=valid_len,
                                             past_kv=(layer.cache_keys, layer.cache_values),
                                             start_pos=state.position, backend=backend)
            hidden = hidden + attended.out
            hidden = hidden + block.mlp(block.mlp_norm(hidden))
            layer = dataclasses.replace(layer, cache_keys=attended.context_keys,
                                        cache_values=attended.context_values)
            if block.slots is not None:
                layer.pending = torch.cat([layer.pending, normed], dim=1)
            if completes:
                if block.has_memory:
                    layer = self._write_segment(block, layer, state.write_pos, backend)
                # The next segment's queries see at most window - 1 earlier positions.
                drop = layer.cache_keys.shape[2] - (c.window - 1)
                layer.cache_keys = layer.cache_keys[:, :, drop:]
                layer.cache_values = layer.cache_values[:, :, drop:]
            layers.append(layer)
        write_pos = state.write_pos
        if completes and c.memory_layers and c.memory_mode == "append":
            write_pos = (write_pos + c.segment_len) % c.memory_slots
        return hidden, L2MState(state.position + T, write_pos, layers)

    def _sharded_read(self, block: L2MBlock, mem_keys, mem_values, valid_len):
        """The read of :meth:`MemoryAttention.attend_read` for a memory sharded across
        ``memory_group``."""
        from ..distributed import sharded_topk_memory_read

        def read(q):
            result = sharded_topk_memory_read(q, mem_keys, mem_values, block.attn.topk, scale=block.attn.scale,
                                              valid_len=valid_len, group=self.config.memory_group)
            return result.out, result.lse, result.indices
        return read

    def _write_segment(self, block: L2MBlock, layer: L2MLayerState, write_pos: int, backend) -> L2MLayerState:
        """Write the just-completed segment into the layer's memory."""
        c = self.config
        if block.slots is not None:
            values = block.slots.write(layer.mem_values, layer.pending, backend=backend,
                                       deterministic=c.deterministic)
            return dataclasses.replace(layer, mem_values=values, pending=layer.pending[:, :0])
        if layer.store is not None:
            # "store": the segment's keys/values appended (detached); a full store evicts.
            B, H = layer.cache_keys.shape[:2]
            keys = layer.cache_keys[:, :, -c.segment_len:].reshape(B * H, c.segment_len, -1)
            values = layer.cache_values[:, :, -c.segment_len:].reshape(B * H, c.segment_len, -1)
            layer.store.append(keys.detach(), values.detach())
            return layer
        # "append": the segment's keys/values to the next ring slots (in order: with more tokens
        # than slots the later ones win), weight 1 and erase 1; detached, as in Memorizing Transformers.
        B, H = layer.cache_keys.shape[:2]
        seg = c.segment_len
        device = layer.cache_keys.device
        slot_ids = (write_pos + torch.arange(seg, device=device)) % c.memory_slots
        indices = slot_ids.view(1, 1, seg, 1).expand(B, H, seg, 1).contiguous()
        ones = torch.ones(B, H, seg, 1, device=device, dtype=layer.mem_values.dtype)
        write = gated_memory_write
        if c.memory_group is not None:  # global slot ids; each rank writes those it holds
            from ..distributed import sharded_gated_memory_write
            write = functools.partial(sharded_gated_memory_write, group=c.memory_group)
        with torch.no_grad():
            mem_keys = write(layer.mem_keys, indices, ones, layer.cache_keys[:, :, -seg:], ones, backend=backend)
            mem_values = write(layer.mem_values, indices, ones, layer.cache_values[:, :, -seg:], ones,
                               backend=backend)
        valid_len = (layer.valid_len + seg).clamp_max(c.memory_slots)
        return dataclasses.replace(layer, mem_keys=mem_keys, mem_values=mem_values, valid_len=valid_len)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, state: Optional[L2MState] = None, *,
                 backend: Optional[str] = None) -> Generation:
        """Greedy decoding with the memory: the prompt ``input_ids (B, L >= 1)`` in one call, then
        one token per call through the local cache and the memory (segments complete and are
        written as they fill). Returns :class:`Generation` ``(tokens (B, L + max_new_tokens), state)``,
        the state covering every returned token."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected shape (B, L) with L >= 1, got {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        out = self(input_ids, state, backend=backend)
        tokens = [input_ids]
        for _ in range(max_new_tokens):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_token)
            out = self(next_token, out.state, backend=backend)
        return Generation(torch.cat(tokens, dim=1), out.state)
