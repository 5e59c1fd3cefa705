"""The block memory of :func:`attach_memory` (see the package docstring): its configuration, its
cache (one :class:`MemoryLayer` per attention layer), the attention and mask functions registered
with transformers, and attaching/detaching them."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch

from l2m_kernels.ops.block_memory import block_read, block_read_ref, block_topk
from l2m_kernels.ops.block_memory.reference import gather_blocks
from l2m_kernels.ops.merge import merge_attention

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # an optional dependency
    raise ImportError("l2m_kernels.integrations.transformers needs transformers >= 5.0 "
                      "(pip install 'transformers>=5')") from exc

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"l2m_kernels.integrations.transformers needs transformers >= 5.0 (found "
                      f"{transformers.__version__}): it builds on its Cache layers and mask interface")


# The name under which the attention (and its mask) is registered with transformers.
IMPLEMENTATION = "l2m_memory"
_BLOCK_REPRS = ("mean", "max")
# Keyword arguments some models pass to their attention function that change what it computes and
# that the memory attention does not implement: refused rather than ignored.
_UNSUPPORTED_ARGUMENTS = {"s_aux": "learned attention sinks, as in gpt-oss", "sinks": "learned attention sinks"}
_POSITION_MODES = ("original", "fixed")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """How a model's attention keeps and reads its past (see the module docstring).

    sink:           first tokens of the sequence every query reads (memory side), >= 0
    window:         at least this many most recent tokens are attended locally, >= 1
    block_size:     tokens per memory block, >= 1
    topk_blocks:    blocks read per chunk of queries and key-value head, >= 0
    capacity:       most tokens kept in blocks (whole blocks; the oldest evicted first), None: no limit
    block_repr:     "mean" (a block is scored by its mean key) or "max" (by its best key)
    position_mode:  "original" (memory keeps true positions) or "fixed" (memory at fixed_distance)
    chunk_size:     queries processed together when one call brings more tokens, >= 1
    fixed_distance: "fixed" mode: the distance memory tokens are read at (None: window)
    store:          None (blocks), or the keyword arguments of a
                    :class:`l2m_kernels.memory.MemoryStore` (``capacity`` required; ``block_size``,
                    ``tiers``, ``key_format``, ``value_format``, ``eviction`` (default "fifo"),
                    ...): the tokens past the sink go into one store per layer (one memory per batch
                    element and key-value head) and each query reads its ``store_topk`` best
                    entries (Memorizing Transformers' kNN memory) instead of blocks; ``capacity``,
                    ``topk_blocks`` and ``block_repr`` then do not apply
    store_topk:     entries each query reads from the store, >= 1
    store_blocks:   blocks per query of a two-level store read (None: exact)
    """
    sink: int = 4
    window: int = 512
    block_size: int = 64
    topk_blocks: int = 8
    capacity: Optional[int] = None
    block_repr: str = "mean"
    position_mode: str = "original"
    chunk_size: int = 512
    fixed_distance: Optional[int] = None
    store: Optional[dict] = None
    store_topk: int = 32
    store_blocks: Optional[int] = None

    def __post_init__(self):
        for name, low in (("sink", 0), ("window", 1), ("block_size", 1), ("topk_blocks", 0), ("chunk_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MemoryConfig.{name} must be an int >= {low}, got {value!r}")
        for name in ("capacity", "fixed_distance"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"MemoryConfig.{name} must be None or an int >= 0, got {value!r}")
        if self.block_repr not in _BLOCK_REPRS:
            raise ValueError(f"MemoryConfig.block_repr must be one of {_BLOCK_REPRS}, got {self.block_repr!r}")
        if self.position_mode not in _POSITION_MODES:
            raise ValueError(f"MemoryConfig.position_mode must be one of {_POSITION_MODES}, "
                             f"got {self.position_mode!r}")
        if self.store is not None and (not isinstance(self.store, dict) or "capacity" not in self.store):
            raise ValueError(f"MemoryConfig.store must be None or a dict of MemoryStore options with a "
                             f"'capacity', got {self.store!r}")
        if isinstance(self.store_topk, bool) or not isinstance(self.store_topk, int) or self.store_topk < 1:
            raise ValueError(f"MemoryConfig.store_topk must be an int >= 1, got {self.store_topk!r}")

    @property
    def distance(self) -> int:
        return self.window if self.fixed_distance is None else self.fixed_distance


# ---- rotary positions ("fixed" mode) ----

def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by the rotary angles of ``positions`` (B, T) (may be negative), in the
    rotate-half convention of Llama, Mistral and Qwen2. Rotations compose: rotating a key the model
    rotated at p by -p gives the key without position."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)
    emb = torch.cat((angles, angles), dim=-1)[:, None]          # (B, 1, T, D)
    half = x.shape[-1] // 2
    xf = x.to(torch.float32)
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * emb.cos() + rotated * emb.sin()).to(x.dtype)


# ---- attention with its log-sum-exp ----

def _attend(q, k, v, allowed, scale, dropout, training, softcap=None):
    """Softmax attention of q (B, Hk, G, C, D) over k, v (B, Hk, L, D) in float32, with ``allowed``
    (bool, broadcast to (B, Hk, G, C, L)) or None. Returns out (B, Hk, G, C, Dv), zero where a query
    may attend nothing, and lse (B, Hk, G, C), -inf there. One exponential per score: the row
    maximum is subtracted, the normalisation is applied to the output rows."""
    scores = torch.einsum("bhgcd,bhld->bhgcl", q.to(torch.float32) * scale, k.to(torch.float32))
    if softcap:  # logit soft-capping (Gemma 2), applied to the scaled scores as transformers does
        scores = softcap * torch.tanh(scores / softcap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with nothing allowed
    probs = torch.exp(scores - top)
    total = probs.sum(dim=-1, keepdim=True)
    if dropout and training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.einsum("bhgcl,bhld->bhgcd", probs, v.to(torch.float32))
    out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out, (top + torch.log(total)).squeeze(-1)


def _flash_cpu():
    """PyTorch's CPU flash-attention kernel that also returns the log-sum-exp (None where this torch
    lacks it). Its log-sum-exp has no gradient, so it serves calls without autograd only."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_any(q, k, v, allowed, scale, dropout, training, softcap=None):
    """:func:`_attend`, through PyTorch's CPU flash-attention kernel where it can serve the call (a
    CPU tensor, no autograd, no dropout, no soft-capping): the same results, without forming the
    scores in memory."""
    kernel = _flash_cpu()
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (kernel is None or q.device.type != "cpu" or grad or (dropout and training) or q.dtype != k.dtype
            or softcap):
        return _attend(q, k, v, allowed, scale, dropout, training, softcap)
    batch, kv_heads, group, length, dim = q.shape
    if allowed.shape[2] == 1 and allowed.shape[3] == 1:
        # The mask is the same for every query of a key-value head (memory reads, decoding): the
        # group's queries become rows of one head, and the keys and values are read as they are.
        rows, keys, values = q.reshape(batch, kv_heads, group * length, dim), k, v
        allowed = allowed[:, :, 0]                                                 # (B, 1 or Hk, 1, L)
    else:  # a mask per query row: one head per query head, the keys and values repeated per group
        rows = q.reshape(batch, kv_heads * group, length, dim)
        keys = k[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads * group, -1, dim)
        values = v[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads * group, -1, v.shape[-1])
        if allowed.shape[1] == 1 and allowed.shape[2] == 1:                        # (B, 1, C, L)
            allowed = allowed[:, 0]
        else:                                                                      # (B, H, C, L)
            allowed = allowed.expand(-1, kv_heads, group, -1, -1).reshape(batch, kv_heads * group,
                                                                          *allowed.shape[3:])
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    out, lse = kernel(rows, keys, values, 0.0, False, attn_mask=bias, scale=scale)
    # A query that may attend nothing: the kernel gives 0 and lse 0; lse is -inf there.
    lse = torch.where(allowed.any(dim=-1).expand_as(lse), lse, torch.full_like(lse, float("-inf")))
    return (out.view(batch, kv_heads, group, length, -1).to(torch.float32),
            lse.view(batch, kv_heads, group, length))


def _merge(out_a, lse_a, out_b, lse_b):
    """The exact merge of two attention parts over disjoint keys (l2m_kernels.merge_attention):
    (out, lse) in the shapes of out_a and lse_a."""
    shape = out_a.shape
    out, lse = merge_attention(out_a.reshape(shape[0], -1, shape[-2], shape[-1]),
                               lse_a.reshape(shape[0], -1, shape[-2]),
                               out_b.reshape(shape[0], -1, shape[-2], shape[-1]),
                               lse_b.reshape(shape[0], -1, shape[-2]))
    return out.reshape(shape), lse.reshape(lse_a.shape)


# ---- the cache ----

class _Grown:
    """A tensor that grows at the back and drops rows near the front along one dimension: the rows
    ``start .. start + length`` of a storage that doubles when full (appends and drops amortised
    O(1): a drop moves ``start`` and the few rows kept before the dropped ones, and the storage is
    compacted when it next grows)."""

    def __init__(self, dim: int):
        self.dim, self.data, self.start, self.length = dim, None, 0, 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[self.dim]
        if torch.is_grad_enabled() and (x.requires_grad or (self.data is not None and self.data.requires_grad)):
            # Under autograd, out of place: earlier reads of the storage are saved for the backward.
            self.data = x if self.data is None else torch.cat([self.view(), x], dim=self.dim)
            self.start, self.length = 0, self.data.shape[self.dim]
            return
        if self.data is None or self.start + self.length + n > self.data.shape[self.dim]:
            shape = list(x.shape)
            shape[self.dim] = max(2 * self.length, self.length + n, 4)
            grown = x.new_empty(shape)
            if self.length:
                grown.narrow(self.dim, 0, self.length).copy_(self.view())
            self.data, self.start = grown, 0
        self.data.narrow(self.dim, self.start + self.length, n).copy_(x)
        self.length += n

    def view(self) -> Optional[torch.Tensor]:
        return None if self.data is None else self.data.narrow(self.dim, self.start, self.length)

    def drop_after(self, keep: int, n: int) -> None:
        """Drops the n rows after the first ``keep`` (which move up by n)."""
        n = min(n, self.length - keep)
        if n <= 0:
            return
        if torch.is_grad_enabled() and self.data.requires_grad:  # out of place, as append
            view = self.view()
            self.data = torch.cat([view.narrow(self.dim, 0, keep), view.narrow(self.dim, keep + n,
                                                                             self.length - keep - n)], dim=self.dim)
            self.start, self.length = 0, self.data.shape[self.dim]
            return
        if keep:
            kept = self.data.narrow(self.dim, self.start, keep).clone()
            self.data.narrow(self.dim, self.start + n, keep).copy_(kept)
        self.start, self.length = self.start + n, self.length - n

    def map_batch(self, fn) -> None:
        if self.data is not None:
            self.data = fn(self.view())
            self.start, self.length = 0, self.data.shape[self.dim]


class MemoryLayer(CacheLayerMixin):
    """One attention layer's memory: ``keys``/``values`` (B, Hk, L, D) are the local segment, the
    tokens from position ``local_start`` to ``seen``; older tokens are in the sink (the first
    ``config.sink``) and in blocks. transformers sees the local segment as the layer's cache (its
    masks cover it: ``get_mask_sizes``)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, config: MemoryConfig, inv_freq: Optional[torch.Tensor] = None):
        super().__init__()
        self.config, self.inv_freq = config, inv_freq
        self._clear()

    def _clear(self):
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0             # tokens of the sequence so far
        self.local_start = 0      # position of keys[..., 0, :]
        self.local_valid = None   # (B, L) bool: the local keys that are not padding
        self.local_pos = None     # (B, L) position ids of the local tokens ("fixed" mode)
        # The sink, padded to whole blocks, then the memory blocks: the first sink_blocks blocks of
        # block_keys (B, Hk, nb, bs, D), block_values, block_valid (B, nb, bs) and, with
        # block_repr="mean", block_repr (B, Hk, nb, D) and block_has_token (B, nb, 1): whether the
        # block holds a token that exists (its representative's validity for block_topk).
        self.block_keys, self.block_values = _Grown(2), _Grown(2)
        self.block_valid, self.block_repr, self.block_has_token = _Grown(1), _Grown(2), _Grown(1)
        self.sink_blocks = 0
        self.evicted_blocks = 0
        self.store = None  # config.store: the MemoryStore of the tokens past the sink

    # CacheLayerMixin
    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        batch = key_states.shape[0]
        self.local_valid = torch.ones(batch, 0, dtype=torch.bool, device=self.device)
        self.local_pos = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.seen - self.local_start + query_length, self.local_start

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a MemoryCache cannot be cropped: tokens already moved into memory blocks "
                                  "are not taken back (assisted decoding and similar rollbacks need a DynamicCache)")

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        if self.store is not None:
            raise NotImplementedError(
                "attach_memory(store=...): the batch cannot be reordered or repeated (beam search): "
                "a MemoryStore keeps each batch element's memory in its heads; use blocks (store=None)")
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.local_valid, self.local_pos = fn(self.local_valid), fn(self.local_pos)
        for grown in self._blocks():
            grown.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # memory
    def _blocks(self) -> tuple:
        """The block storage, every tensor indexed by block."""
        return self.block_keys, self.block_values, self.block_valid, self.block_repr, self.block_has_token

    @property
    def num_blocks(self) -> int:
        """Memory blocks (the sink's aside)."""
        return self.block_keys.length - self.sink_blocks

    def note_inputs(self, valid: torch.Tensor, positions: torch.Tensor) -> None:
        """The validity of the local segment (B, L) and the position ids of the call's tokens (B, C)."""
        self.local_valid = valid
        self.local_pos = torch.cat([self.local_pos, positions], dim=1)

    def roll(self, chunk_start: int) -> None:
        """Moves the local tokens older than ``window`` before ``chunk_start`` into the sink (positions
        below ``sink``) and into whole blocks, then evicts the oldest blocks past ``capacity``."""
        cfg = self.config
        while True:
            # The sink, then blocks that start at multiples of block_size (the first one after the
            # sink partial): the local segment then starts there too, and its length is the same
            # with or without a sink.
            n = (cfg.sink - self.local_start if self.local_start < cfg.sink
                 else cfg.block_size - self.local_start % cfg.block_size)
            if chunk_start - (self.local_start + n) < cfg.window or self.keys.shape[-2] < n:
                break
            keys, values = self.keys[:, :, :n], self.values[:, :, :n]
            valid = self.local_valid[:, :n]
            if cfg.position_mode == "fixed":
                keys = _rotate(keys, -self.local_pos[:, :n], self.inv_freq)
            # Whole blocks, padded with tokens that do not exist (the sink's, read with every
            # chunk's selected blocks in the same call, and the first memory block).
            blocks = -(-n // cfg.block_size)
            pad = blocks * cfg.block_size - n
            if pad:
                keys = torch.nn.functional.pad(keys, (0, 0, 0, pad))
                values = torch.nn.functional.pad(values, (0, 0, 0, pad))
                valid = torch.nn.functional.pad(valid, (0, pad), value=False)
            if self.local_start < cfg.sink:
                self.sink_blocks += blocks
            elif cfg.store is not None:
                self._to_store(keys[:, :, :n], values[:, :, :n], valid[:, :n])
                self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
                self.local_valid, self.local_pos = self.local_valid[:, n:], self.local_pos[:, n:]
                self.local_start += n
                continue
            batch, heads = keys.shape[:2]
            self.block_keys.append(keys.reshape(batch, heads, blocks, cfg.block_size, -1))
            self.block_values.append(values.reshape(batch, heads, blocks, cfg.block_size, -1))
            self.block_valid.append(valid.reshape(batch, blocks, cfg.block_size))
            if cfg.block_repr == "mean":
                weight = valid.reshape(batch, 1, blocks, cfg.block_size, 1).to(torch.float32)
                blocked = keys.to(torch.float32).reshape(batch, heads, blocks, cfg.block_size, -1)
                mean = (blocked * weight).sum(3) / weight.sum(3).clamp(min=1)
                self.block_repr.append(mean.to(keys.dtype))
                self.block_has_token.append(valid.reshape(batch, blocks, cfg.block_size).any(-1, keepdim=True))
            self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
            self.local_valid, self.local_pos = self.local_valid[:, n:], self.local_pos[:, n:]
            self.local_start += n
        if cfg.capacity is not None and cfg.store is None:
            excess = self.num_blocks - cfg.capacity // cfg.block_size
            if excess > 0:
                for grown in self._blocks():
                    grown.drop_after(self.sink_blocks, excess)
                self.evicted_blocks += excess

    def _to_store(self, keys, values, valid) -> None:
        """Appends tokens (B, Hk, n, D) to the layer's MemoryStore (created at the first)."""
        from l2m_kernels.memory import MemoryStore

        if not bool(valid.all()):
            raise NotImplementedError("attach_memory(store=...): padded inputs are not supported (a "
                                      "MemoryStore entry has no per-batch-element validity); use blocks "
                                      "(store=None) or unpadded inputs")
        batch, heads, n, dim = keys.shape
        if self.store is None:
            options = dict(self.config.store)
            options.setdefault("eviction", "fifo")
            options.setdefault("block_size", self.config.block_size)
            self.store = MemoryStore(batch * heads, dim, values.shape[-1], device=keys.device, **options)
        elif self.store.num_heads != batch * heads:
            raise ValueError(f"attach_memory(store=...): the batch changed ({self.store.num_heads} "
                             f"memories, {batch * heads} now); start a new cache")
        self.store.append(keys.reshape(batch * heads, n, dim).detach(),
                          values.reshape(batch * heads, n, -1).detach())

    def _read_store(self, q: torch.Tensor, scale: float):
        """The store's part of the read: each query's ``store_topk`` best entries. q (B, Hk, G, C, D)
        -> (out (B, Hk, G, C, Dv) float32, lse (B, Hk, G, C)), or None when the store is empty."""
        if self.store is None or len(self.store) == 0:
            return None
        batch, heads, group, length, dim = q.shape
        read = self.store.read(q.reshape(1, batch * heads * group, length, dim), self.config.store_topk,
                               blocks=self.config.store_blocks, scale=scale)
        return (read.out.to(torch.float32).view(batch, heads, group, length, -1),
                read.lse.view(batch, heads, group, length))

    def select(self, q: torch.Tensor, scale: float, take: int) -> torch.Tensor:
        """The blocks the queries q (B, Hk, G, C, D) of one chunk read, per (batch, key-value head),
        in increasing order: the sink's, then the ``take`` best memory blocks
        (``l2m_kernels.block_topk``; every block when ``take`` is their number).
        ``block_repr="mean"`` scores a block by its mean valid key, ``"max"`` by its best valid key
        for each query; a block of padding only scores -inf."""
        batch, heads, group, length, dim = q.shape
        sinks, blocks = self.sink_blocks, self.num_blocks
        if take >= blocks:
            return torch.arange(sinks + blocks, device=q.device).expand(batch, heads, sinks + blocks)
        if self.config.block_repr == "mean":
            reprs = self.block_repr.view().narrow(2, sinks, blocks).unsqueeze(3)
            repr_valid = self.block_has_token.view().narrow(1, sinks, blocks)
        else:
            reprs = self.block_keys.view().narrow(2, sinks, blocks)
            repr_valid = self.block_valid.view().narrow(1, sinks, blocks)
        rows = q.reshape(batch, heads * group, length, dim)
        chosen = block_topk(rows, reprs, take, repr_valid=repr_valid, scale=scale).indices
        if not sinks:
            return chosen
        return torch.cat([torch.arange(sinks, device=q.device).expand(batch, heads, sinks), chosen + sinks], dim=-1)

    def read(self, q: torch.Tensor, scale: float, dropout: float, training: bool, softcap=None):
        """The memory part of the attention of the queries q (B, Hk, G, C, D) of one chunk: the sink
        and the ``topk_blocks`` best blocks (:meth:`select`), read by ``l2m_kernels.block_read``.
        Returns (out (B, Hk, G, C, Dv) float32, lse (B, Hk, G, C)), or None when the memory holds
        nothing."""
        batch, heads, group, length, dim = q.shape
        if self.config.store is not None:
            if (dropout and training) or softcap:
                raise NotImplementedError("attach_memory(store=...): attention dropout in training and "
                                          "logit soft-capping are not implemented by the store read")
            stored = self._read_store(q, scale)
            if not self.sink_blocks:
                return stored
            sink = block_read(q.reshape(batch, heads * group, length, dim), self.block_keys.view(),
                              self.block_values.view(),
                              torch.arange(self.sink_blocks, device=q.device).expand(batch, heads, -1),
                              block_valid=self.block_valid.view(), scale=scale) \
                if q.device.type == "cpu" else block_read_ref(
                    q.reshape(batch, heads * group, length, dim), self.block_keys.view(),
                    self.block_values.view(),
                    torch.arange(self.sink_blocks, device=q.device).expand(batch, heads, -1),
                    self.block_valid.view(), scale)
            sink = (sink[0].to(torch.float32).view(batch, heads, group, length, -1),
                    sink[1].view(batch, heads, group, length))
            return sink if stored is None else _merge(*sink, *stored)
        take = min(self.config.topk_blocks, self.num_blocks)
        if not (take or self.sink_blocks):
            return None
        block_keys, block_values = self.block_keys.view(), self.block_values.view()
        block_valid = self.block_valid.view()
        chosen = self.select(q, scale, take)
        if (dropout and training) or softcap:
            # What block_read does not implement: the selected blocks gathered and read by _attend.
            keys, values, valid = gather_blocks(block_keys, block_values, chosen, block_valid)
            return _attend(q, keys, values, valid[:, :, None, None], scale, dropout, training, softcap)
        if torch.is_grad_enabled() and (q.requires_grad or block_keys.requires_grad or block_values.requires_grad):
            # The read saves what its backward needs, and the storage grows in place for the
            # tensors that need no gradient: those are passed as copies.
            block_valid = block_valid.clone()
            block_keys = block_keys if block_keys.requires_grad else block_keys.clone()
            block_values = block_values if block_values.requires_grad else block_values.clone()
        rows = q.reshape(batch, heads * group, length, dim)           # (B, H, C, D), a view
        if rows.device.type == "cpu":
            out, lse = block_read(rows, block_keys, block_values, chosen, block_valid=block_valid, scale=scale)
        else:
            # block_read checks its block ids' values, a host synchronisation on a GPU; these come
            # from select() and are in range. The op's reference serves other devices anyway.
            out, lse = block_read_ref(rows, block_keys, block_values, chosen, block_valid, scale)
        return out.to(torch.float32).view(batch, heads, group, length, -1), lse.view(batch, heads, group, length)


class MemoryCache(Cache):
    """The cache of a model with memory attached: one :class:`MemoryLayer` per layer.
    ``attach_memory`` swaps one in where a call has none (or an empty cache of another kind); pass one
    yourself (``MemoryCache.for_model(model)``) to prefill in chunks of your own:

        cache = MemoryCache.for_model(model)
        for chunk in input_ids.split(1024, dim=1):
            out = model(chunk, past_key_values=cache, use_cache=True)
    """

    def __init__(self, config: MemoryConfig, num_layers: int, inv_freq: Optional[torch.Tensor] = None):
        super().__init__(layers=[MemoryLayer(config, inv_freq) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model) -> "MemoryCache":
        state = getattr(model, "_l2m_memory", None)
        if state is None:
            raise ValueError("MemoryCache.for_model: the model has no memory attached (attach_memory(model) first)")
        return cls(state.config, state.num_layers, state.inv_freq)


# ---- transformers' extension points ----

def memory_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask our attention takes: the 2D padding mask's columns of the keys the layer attends
    locally, (B, kv_length) bool, or None without padding mask. Causality and the memory are the
    attention's own: no (q_length, kv_length) mask is formed."""
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise ValueError(f"attach_memory: the attention mask must be a 2D padding mask (batch, keys), got shape "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] < kv_offset + kv_length:
        raise ValueError(f"attach_memory: the attention mask covers {attention_mask.shape[-1]} tokens, but the "
                         f"sequence has {kv_offset + kv_length} (it must cover past and current tokens)")
    return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


def memory_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention transformers calls for ``IMPLEMENTATION``: query (B, H, C, D), key and value
    (B, Hk, L, D) as the layer's cache returned them, ``attention_mask`` from :func:`memory_mask`.
    Returns (out (B, C, H, Dv), None)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"attach_memory: {heads} query heads are not a multiple of {kv_heads} key-value heads")
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    training = module.training
    softcap = kwargs.get("softcap")
    for name, what in _UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attach_memory: {type(module).__name__} passes {name}= to its attention "
                                      f"({what}), which the memory attention does not implement")
    if attention_mask is not None and (attention_mask.ndim != 2 or attention_mask.shape[-1] != key.shape[-2]):
        raise ValueError("attach_memory: the attention received a mask it did not make (expected a 2D padding "
                         f"mask of {key.shape[-2]} keys, got shape {tuple(attention_mask.shape)})")
    state = getattr(module, "_l2m_state", None)
    cache = getattr(module, "_l2m_cache", None)
    layer = cache.layers[module.layer_idx] if isinstance(cache, MemoryCache) else None
    config = state.config if state is not None else MemoryConfig()
    q = query.reshape(batch, kv_heads, group, length, dim)
    valid = (attention_mask if attention_mask is not None
             else torch.ones(batch, key.shape[-2], dtype=torch.bool, device=key.device))

    if layer is None:  # no memory: exact causal attention over every key given, in chunks of queries
        past = key.shape[-2] - length
        outs = []
        for a in range(0, length, config.chunk_size):
            b = min(length, a + config.chunk_size)
            allowed = _causal(a + past, b - a, key.shape[-2], key.device) & valid[:, None, None, None, :]
            outs.append(_attend_any(q[:, :, :, a:b], key, value, allowed, scale, dropout, training, softcap)[0])
        out = torch.cat(outs, dim=3)
    else:
        start = layer.seen - length                    # position of the call's first query
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(start, layer.seen, device=key.device)[None]
        layer.note_inputs(valid, positions.to(key.device).expand(batch, length))
        outs = []
        for a in range(0, length, config.chunk_size):
            b = min(length, a + config.chunk_size)
            layer.roll(start + a)
            visible = start + b - layer.local_start
            allowed = (_causal(start + a - layer.local_start, b - a, visible, key.device)
                       & layer.local_valid[:, None, None, None, :visible])
            q_chunk = q[:, :, :, a:b]
            out_local, lse_local = _attend_any(q_chunk, layer.keys[:, :, :visible], layer.values[:, :, :visible],
                                           allowed, scale, dropout, training, softcap)
            q_memory = q_chunk
            if config.position_mode == "fixed":
                shift = config.distance - layer.local_pos[:, start + a - layer.local_start:visible]
                q_memory = _rotate(q_chunk.flatten(1, 2), shift, layer.inv_freq).view_as(q_chunk)
            memory = layer.read(q_memory, scale, dropout, training, softcap)
            if memory is not None:
                out_local = _merge(out_local, lse_local, *memory)[0]
            outs.append(out_local)
        out = torch.cat(outs, dim=3)
    out = out.to(query.dtype).reshape(batch, heads, length, -1)
    return out.transpose(1, 2).contiguous(), None


def _causal(first_query: int, queries: int, keys: int, device) -> torch.Tensor:
    """(queries, keys) bool: query i (at key index first_query + i) may see keys 0 .. first_query + i."""
    rows = torch.arange(queries, device=device)[:, None] + first_query
    return torch.arange(keys, device=device)[None, :] <= rows


AttentionInterface.register(IMPLEMENTATION, memory_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, memory_mask)


@dataclasses.dataclass
class _Attached:
    config: MemoryConfig
    num_layers: int
    inv_freq: Optional[torch.Tensor]
    previous_implementation: object
    handles: list


def _cache_argument(module) -> str:
    parameters = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if name in parameters:
            return name
    raise TypeError(f"attach_memory: {type(module).__name__}.forward takes no cache argument "
                    "(cache / past_key_values): the memory cannot reach it")


def _dispatches_through_interface(module) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def attach_memory(model, config: Optional[MemoryConfig] = None, **overrides):
    """Gives a transformers decoder-only model a block memory of its past keys and values, in place
    (see the module docstring). ``config``: a :class:`MemoryConfig` (default ``MemoryConfig()``);
    keyword overrides take its field names. Returns the model. Raises TypeError naming what is
    missing for a model that is not supported, ValueError for a bad configuration or a model that
    already has memory attached."""
    config = dataclasses.replace(config or MemoryConfig(), **overrides)
    if getattr(model, "_l2m_memory", None) is not None:
        raise ValueError("attach_memory: the model already has memory attached (detach_memory(model) first)")
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"attach_memory: {type(model).__name__} is not a transformers PreTrainedModel")
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if getattr(model_config, "is_encoder_decoder", False):
        raise TypeError(f"attach_memory: {type(model).__name__} is an encoder-decoder model; only decoder-only "
                        "models are supported")
    base = model.base_model
    cache_name = _cache_argument(base)
    attention = [m for m in base.modules() if hasattr(m, "layer_idx") and _dispatches_through_interface(m)]
    if not attention:
        raise TypeError(f"attach_memory: no attention layer of {type(model).__name__} dispatches through "
                        "transformers' AttentionInterface (layers with a layer_idx whose forward calls "
                        "ALL_ATTENTION_FUNCTIONS)")
    num_layers = getattr(text_config, "num_hidden_layers", None) or (max(m.layer_idx for m in attention) + 1)
    inv_freq = None
    if config.position_mode == "fixed":
        rotary = [m for m in base.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        head_dim = getattr(attention[0], "head_dim", None)
        if not rotary:
            raise TypeError(f"attach_memory: position_mode='fixed' needs rotary position embeddings, and "
                            f"{type(model).__name__} has none (a module with inv_freq); use position_mode='original'")
        inv_freq = rotary[0].inv_freq.detach().clone()
        if head_dim is not None and 2 * inv_freq.numel() != head_dim:
            raise TypeError(f"attach_memory: position_mode='fixed' needs rotary embeddings over the whole head "
                            f"({head_dim}), {type(model).__name__} rotates {2 * inv_freq.numel()} dimensions")
    previous = model_config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    if model_config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(previous)
        raise TypeError(f"attach_memory: {type(model).__name__} does not let its attention implementation be set "
                        "(transformers' set_attn_implementation refused it)")
    state = _Attached(config, num_layers, inv_freq, previous, [])

    def swap_cache(module, args, kwargs):
        cache = kwargs.get(cache_name)
        if isinstance(cache, MemoryCache):
            return None
        if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
            kwargs[cache_name] = MemoryCache(config, num_layers, inv_freq)
            return args, kwargs
        return None  # a filled cache of another kind: exact attention over it

    state.handles.append(base.register_forward_pre_hook(swap_cache, with_kwargs=True))
    for module in attention:
        name = _cache_argument(module)
        position = list(inspect.signature(module.forward).parameters).index(name)

        def hand_cache(module, args, kwargs, name=name, position=position):
            module._l2m_cache = kwargs.get(name, args[position] if len(args) > position else None)

        def release_cache(module, args, output):
            module._l2m_cache = None

        module._l2m_state = state
        state.handles.append(module.register_forward_pre_hook(hand_cache, with_kwargs=True))
        state.handles.append(module.register_forward_hook(release_cache))
    model._l2m_memory = state
    model._l2m_attention = attention
    return model


def detach_memory(model):
    """Undoes :func:`attach_memory`: removes the hooks and restores the attention implementation the
    model had. Returns the model. Raises ValueError when no memory is attached."""
    state = getattr(model, "_l2m_memory", None)
    if state is None:
        raise ValueError("detach_memory: the model has no memory attached")
    for handle in state.handles:
        handle.remove()
    for module in model._l2m_attention:
        for name in ("_l2m_state", "_l2m_cache"):
            if hasattr(module, name):
                delattr(module, name)
    model.set_attn_implementation(state.previous_implementation)
    del model._l2m_memory, model._l2m_attention
    return model
