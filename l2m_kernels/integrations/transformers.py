"""A block memory of past keys and values for Hugging Face ``transformers`` decoder-only models.

    from l2m_kernels.integrations.transformers import attach_memory, detach_memory, MemoryConfig

    model = AutoModelForCausalLM.from_pretrained(...)
    attach_memory(model, window=512, block_size=64, topk_blocks=8, sink=4)
    out = model.generate(long_input_ids, max_new_tokens=32)     # or model(...) with a cache
    detach_memory(model)                                        # the original attention, exactly

What attaching does (InfLLM's scheme, after Xiao et al. 2024): every attention layer keeps the
first ``sink`` tokens, a local segment of at least the last ``window`` tokens, and every older token
in blocks of ``block_size`` (at most ``capacity`` tokens of blocks: the oldest blocks go first). The
queries of a chunk of at most ``chunk_size`` tokens attend, causally, to the local segment, and to
the sink plus the ``topk_blocks`` blocks whose representative keys score best against the chunk's
queries (``block_repr``: ``"mean"``, the mean key of the block, or ``"max"``, every key of the block,
the block scoring its best key); the two parts are merged exactly by their log-sum-exp
(:func:`l2m_kernels.merge_attention`). The selection is per key-value head (a group of query heads
shares it), by the sum of the chunk's query scores, and stays on the device.

``position_mode``:
  ``"original"``: memory keys keep their true positions (the keys the model rotated), so that with
  ``topk_blocks`` at least the number of blocks the output is the unpatched model's.
  ``"fixed"``: memory keys (sink and blocks) are stored without their rotary position and read as if
  at ``fixed_distance`` (default: ``window``) before every query, as InfLLM does, so that inputs far
  longer than the trained length never show the model a larger distance than about ``window`` plus
  ``block_size`` plus ``chunk_size``. Needs rotary position embeddings (Llama, Mistral, Qwen2).

The model's own ``model(...)`` and ``model.generate(...)`` work after attaching: the memory lives in a
:class:`MemoryCache`, which attaching swaps in for an empty cache (or none) at the model's input; a
call that brings many tokens is processed in chunks of ``chunk_size`` queries inside each layer, so a
long prompt in one call uses the memory as a chunked prefill does. Padding masks (a 2D
``attention_mask``) are honoured: a padded key is never attended, locally or from memory. Without
a cache of ours (a cache of another kind passed in, or the memory detached) the layers attend exactly.

Hooks only, no forward method rewritten: the attention is registered with transformers'
``AttentionInterface`` (and its mask with ``AttentionMaskInterface``), and forward pre-hooks hand each
attention layer the call's cache. Supported: decoder-only models whose attention layers dispatch
through ``AttentionInterface`` (Llama, Mistral, Qwen2, GPT-2 and most current families), with
transformers >= 5.0; anything else is refused with the missing piece named.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch

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

__all__ = ["MemoryConfig", "MemoryCache", "attach_memory", "detach_memory", "IMPLEMENTATION",
           "replace_mlp_with_memory", "add_memory_attention", "HFMemoryAttention", "from_pretrained"]

# The name under which the attention (and its mask) is registered with transformers.
IMPLEMENTATION = "l2m_memory"
_BLOCK_REPRS = ("mean", "max")
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

def _attend(q, k, v, allowed, scale, dropout, training):
    """Softmax attention of q (B, Hk, G, C, D) over k, v (B, Hk, L, D) in float32, with ``allowed``
    (bool, broadcast to (B, Hk, G, C, L)) or None. Returns out (B, Hk, G, C, Dv), zero where a query
    may attend nothing, and lse (B, Hk, G, C), -inf there. One exponential per score: the row
    maximum is subtracted, the normalisation is applied to the output rows."""
    scores = torch.einsum("bhgcd,bhld->bhgcl", q.to(torch.float32) * scale, k.to(torch.float32))
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


def _attend_any(q, k, v, allowed, scale, dropout, training):
    """:func:`_attend`, through PyTorch's CPU flash-attention kernel where it can serve the call (a
    CPU tensor, no autograd, no dropout): the same results, without forming the scores in memory."""
    kernel = _flash_cpu()
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if kernel is None or q.device.type != "cpu" or grad or (dropout and training) or q.dtype != k.dtype:
        return _attend(q, k, v, allowed, scale, dropout, training)
    batch, kv_heads, group, length, dim = q.shape
    keys = k[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads * group, -1, dim)
    values = v[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads * group, -1, v.shape[-1])
    if allowed.shape[1] == 1 and allowed.shape[2] == 1:                            # (B, 1, C or 1, L)
        allowed = allowed[:, 0]
    else:                                                                          # (B, H, C or 1, L)
        allowed = allowed.expand(-1, kv_heads, group, -1, -1).reshape(batch, kv_heads * group, *allowed.shape[3:])
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    out, lse = kernel(q.reshape(batch, kv_heads * group, length, dim), keys, values, 0.0, False,
                      attn_mask=bias, scale=scale)
    # A query that may attend nothing: the kernel gives 0 and lse 0; lse is -inf there.
    lse = torch.where(allowed.any(dim=-1).expand_as(lse), lse, torch.full_like(lse, float("-inf")))
    return (out.view(batch, kv_heads, group, length, -1).to(torch.float32),
            lse.view(batch, kv_heads, group, length))


def _merge(out_a, lse_a, out_b, lse_b):
    """The exact merge of two attention parts over disjoint keys (l2m_kernels.merge_attention)."""
    from l2m_kernels import merge_attention
    shape = out_a.shape
    out, _ = merge_attention(out_a.reshape(shape[0], -1, shape[-2], shape[-1]),
                             lse_a.reshape(shape[0], -1, shape[-2]),
                             out_b.reshape(shape[0], -1, shape[-2], shape[-1]),
                             lse_b.reshape(shape[0], -1, shape[-2]))
    return out.reshape(shape)


# ---- the cache ----

class _Grown:
    """A tensor that grows along one dimension by doubling its storage (appends are amortised O(1))."""

    def __init__(self, dim: int):
        self.dim, self.data, self.length = dim, None, 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[self.dim]
        if torch.is_grad_enabled() and (x.requires_grad or (self.data is not None and self.data.requires_grad)):
            # Under autograd, out of place: earlier reads of the storage are saved for the backward.
            self.data = x if self.data is None else torch.cat([self.view(), x], dim=self.dim)
            self.length = self.data.shape[self.dim]
            return
        if self.data is None:
            shape = list(x.shape)
            shape[self.dim] = max(n, 4)
            self.data = x.new_empty(shape)
        elif self.length + n > self.data.shape[self.dim]:
            shape = list(self.data.shape)
            shape[self.dim] = max(2 * shape[self.dim], self.length + n)
            grown = self.data.new_empty(shape)
            grown.narrow(self.dim, 0, self.length).copy_(self.view())
            self.data = grown
        self.data.narrow(self.dim, self.length, n).copy_(x)
        self.length += n

    def view(self) -> Optional[torch.Tensor]:
        return None if self.data is None else self.data.narrow(self.dim, 0, self.length)

    def drop_front(self, n: int) -> None:
        if n:
            kept = self.view().narrow(self.dim, n, self.length - n).clone()
            self.data, self.length = None, 0
            if kept.shape[self.dim]:
                self.append(kept)

    def map_batch(self, fn) -> None:
        if self.data is not None:
            self.data = fn(self.view())
            self.length = self.data.shape[self.dim]


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
        self.sink_keys, self.sink_values, self.sink_valid = _Grown(2), _Grown(2), _Grown(1)
        self.block_keys, self.block_values = _Grown(2), _Grown(2)     # (B, Hk, nb, bs, D)
        self.block_valid, self.block_repr = _Grown(1), _Grown(2)      # (B, nb, bs), (B, Hk, nb, D)
        self.evicted_blocks = 0

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
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.local_valid, self.local_pos = fn(self.local_valid), fn(self.local_pos)
        for grown in (self.sink_keys, self.sink_values, self.sink_valid, self.block_keys, self.block_values,
                      self.block_valid, self.block_repr):
            grown.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # memory
    @property
    def num_blocks(self) -> int:
        return self.block_keys.length

    def note_inputs(self, valid: torch.Tensor, positions: torch.Tensor) -> None:
        """The validity of the local segment (B, L) and the position ids of the call's tokens (B, C)."""
        self.local_valid = valid
        self.local_pos = torch.cat([self.local_pos, positions], dim=1)

    def roll(self, chunk_start: int) -> None:
        """Moves the local tokens older than ``window`` before ``chunk_start`` into the sink (positions
        below ``sink``) and into whole blocks, then evicts the oldest blocks past ``capacity``."""
        cfg = self.config
        while True:
            n = cfg.sink - self.local_start if self.local_start < cfg.sink else cfg.block_size
            if chunk_start - (self.local_start + n) < cfg.window or self.keys.shape[-2] < n:
                break
            keys, values = self.keys[:, :, :n], self.values[:, :, :n]
            valid = self.local_valid[:, :n]
            if cfg.position_mode == "fixed":
                keys = _rotate(keys, -self.local_pos[:, :n], self.inv_freq)
            if self.local_start < cfg.sink:
                self.sink_keys.append(keys)
                self.sink_values.append(values)
                self.sink_valid.append(valid)
            else:
                self.block_keys.append(keys.unsqueeze(2))
                self.block_values.append(values.unsqueeze(2))
                self.block_valid.append(valid.unsqueeze(1))
                if cfg.block_repr == "mean":
                    weight = valid[:, None, :, None].to(torch.float32)
                    mean = (keys.to(torch.float32) * weight).sum(2) / weight.sum(2).clamp(min=1)
                    self.block_repr.append(mean.to(keys.dtype).unsqueeze(2))
            self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
            self.local_valid, self.local_pos = self.local_valid[:, n:], self.local_pos[:, n:]
            self.local_start += n
        if cfg.capacity is not None:
            excess = self.num_blocks - cfg.capacity // cfg.block_size
            if excess > 0:
                for grown in (self.block_keys, self.block_values, self.block_repr):
                    grown.drop_front(excess)
                self.block_valid.drop_front(excess)
                self.evicted_blocks += excess

    def memory(self, q: torch.Tensor, scale: float):
        """The memory keys, values and validity that the queries q (B, Hk, G, C, D) of one chunk
        read: the sink and the selected blocks in the order they were written, (B, Hk, M, D) and
        (B, Hk, M); None when there are none."""
        keys, values, valid = [], [], []
        batch, heads = q.shape[0], q.shape[1]
        if self.sink_keys.length:
            keys.append(self.sink_keys.view())
            values.append(self.sink_values.view())
            valid.append(self.sink_valid.view()[:, None].expand(batch, heads, -1))
        blocks = self.num_blocks
        take = min(self.config.topk_blocks, blocks)
        if take:
            block_keys, block_values = self.block_keys.view(), self.block_values.view()
            block_valid = self.block_valid.view()[:, None].expand(batch, heads, -1, -1)
            if take < blocks:
                chosen = self._select(q, scale, take)                        # (B, Hk, take)
                size, dim, dim_v = block_keys.shape[3], block_keys.shape[4], block_values.shape[4]
                block_keys = block_keys.gather(2, chosen[..., None, None].expand(-1, -1, -1, size, dim))
                block_values = block_values.gather(2, chosen[..., None, None].expand(-1, -1, -1, size, dim_v))
                block_valid = block_valid.gather(2, chosen[..., None].expand(-1, -1, -1, size))
            keys.append(block_keys.flatten(2, 3))
            values.append(block_values.flatten(2, 3))
            valid.append(block_valid.flatten(2, 3))
        if not keys:
            return None
        return torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(valid, dim=2)

    def _select(self, q: torch.Tensor, scale: float, take: int) -> torch.Tensor:
        """The ``take`` best blocks per (batch, key-value head), in increasing block order."""
        qf = q.to(torch.float32)
        if self.config.block_repr == "mean":
            scores = torch.einsum("bhgcd,bhnd->bhn", qf, self.block_repr.view().to(torch.float32))
        else:  # "max": each query scores a block by its best valid key; slabs of blocks bound the memory
            block_keys, block_valid = self.block_keys.view(), self.block_valid.view()
            per_block = q.shape[2] * q.shape[3] * block_keys.shape[3]
            step = max(1, (1 << 21) // max(1, per_block * q.shape[0] * q.shape[1]))  # 8 MB of scores
            parts = []
            for start in range(0, block_keys.shape[2], step):
                keys = block_keys[:, :, start:start + step].to(torch.float32)
                s = torch.einsum("bhgcd,bhntd->bhgcnt", qf, keys)
                s = s.masked_fill(~block_valid[:, None, None, None, start:start + step], float("-inf"))
                best = s.amax(dim=-1)
                parts.append(torch.where(torch.isfinite(best), best, torch.zeros_like(best)).sum(dim=(2, 3)))
            scores = torch.cat(parts, dim=-1)
        return (scores * scale).topk(take, dim=-1).indices.sort(dim=-1).values


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
        self.memory_config = config

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
            outs.append(_attend_any(q[:, :, :, a:b], key, value, allowed, scale, dropout, training)[0])
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
                                           allowed, scale, dropout, training)
            q_memory = q_chunk
            if config.position_mode == "fixed":
                shift = config.distance - layer.local_pos[:, start + a - layer.local_start:visible]
                q_memory = _rotate(q_chunk.flatten(1, 2), shift, layer.inv_freq).view_as(q_chunk)
            memory = layer.memory(q_memory, scale)
            if memory is not None:
                mem_keys, mem_values, mem_valid = memory
                out_memory, lse_memory = _attend_any(q_memory, mem_keys, mem_values, mem_valid[:, :, None, None, :],
                                                 scale, dropout, training)
                out_local = _merge(out_local, lse_local, out_memory, lse_memory)
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


# ---- product-key memory layers in place of MLPs ----

_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# The ProductKeyMemory arguments a checkpoint records (config.l2m_memory): everything but device/dtype.
_PKM_ARGUMENTS = ("n_sub", "key_dim", "value_dim", "heads", "k", "k_sub", "gated", "sparse_grad", "backend")


def _decoder_layers(model):
    """The base model's list of decoder layers: its nn.ModuleList of num_hidden_layers modules."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module, config
    raise TypeError(f"replace_mlp_with_memory: no list of {count} decoder layers found in "
                    f"{type(model.base_model).__name__}")


def _sublayer(layer, names: tuple, index: int, caller: str, what: str):
    """(attribute name, module) of the first of ``names`` that decoder layer ``index`` has."""
    name = next((n for n in names if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
    if name is None:
        raise TypeError(f"{caller}: decoder layer {index} ({type(layer).__name__}) has no {what} attribute "
                        f"(one of {', '.join(names)})")
    return name, getattr(layer, name)


def _layer_indices(decoder, layers, default: int, caller: str) -> list:
    """The sorted distinct decoder-layer indices of ``layers`` (negative ones from the end), or [default]."""
    if layers is None:
        return [default]
    layers = [int(i) for i in layers]
    if not layers or any(not -len(decoder) <= i < len(decoder) for i in layers):
        raise ValueError(f"{caller}: layers must be indices of the {len(decoder)} decoder layers, got {layers}")
    return sorted({i % len(decoder) for i in layers})


def _put_memory_layers(model, spec: dict) -> None:
    from l2m_kernels.modules import ProductKeyMemory
    layers, config = _decoder_layers(model)
    replacements = []  # every memory layer built before any is put in: a bad argument changes nothing
    for index in spec["layers"]:
        layer = layers[index]
        name, mlp = _sublayer(layer, _MLP_NAMES, index, "replace_mlp_with_memory", "MLP")
        reference = next(mlp.parameters(), None)
        factory = {} if reference is None else dict(device=reference.device, dtype=reference.dtype)
        replacements.append((layer, name, ProductKeyMemory(config.hidden_size, **spec["args"], **factory)))
    for layer, name, memory in replacements:
        setattr(layer, name, memory)


def replace_mlp_with_memory(model, layers=None, **pkm_args):
    """Replaces the MLP of decoder layers ``layers`` (indices; default: the middle layer) of a
    transformers model by :class:`l2m_kernels.modules.ProductKeyMemory` ``(dim=hidden_size,
    **pkm_args)`` (``n_sub`` and ``key_dim`` required), in place, on the MLP's device and dtype, and
    records the replacement in ``model.config.l2m_memory`` so that :func:`from_pretrained` rebuilds
    it from a ``save_pretrained`` checkpoint. Returns the model.

        replace_mlp_with_memory(model, layers=[4], n_sub=512, key_dim=256, heads=4, k=32, gated=True)
        model.save_pretrained(path)
        model = from_pretrained(path)                 # the same model, memory layers included
    """
    unknown = sorted(set(pkm_args) - set(_PKM_ARGUMENTS))
    if unknown:
        raise TypeError(f"replace_mlp_with_memory: unknown ProductKeyMemory argument(s) {', '.join(unknown)} "
                        f"(known: {', '.join(_PKM_ARGUMENTS)}; dim is the model's hidden size)")
    for name in ("n_sub", "key_dim"):
        if name not in pkm_args:
            raise TypeError(f"replace_mlp_with_memory: the ProductKeyMemory argument {name} is required")
    decoder, _ = _decoder_layers(model)
    layers = _layer_indices(decoder, layers, len(decoder) // 2, "replace_mlp_with_memory")
    recorded = dict(getattr(model.config, "l2m_memory", None) or {})
    spec = {"layers": layers, "args": dict(pkm_args)}
    _put_memory_layers(model, spec)
    recorded.setdefault("mlp", []).append(spec)
    model.config.l2m_memory = recorded
    return model


# ---- the package's MemoryAttention in place of a layer's attention ----

_ATTENTION_NAMES = ("self_attn", "attn", "attention")


class HFMemoryAttention(torch.nn.Module):
    """:class:`l2m_kernels.modules.MemoryAttention` as a transformers attention layer: it takes the
    keyword arguments decoder layers pass (``hidden_states``, ``attention_mask``, the cache, ...) and
    returns ``(out, None)``; the layer's keys and values go into the call's transformers cache
    (``cache.update``), so ``generate`` works. ``inner`` is the MemoryAttention (its projections,
    rotary embedding, sliding window and memory)."""

    def __init__(self, inner, layer_idx: int):
        super().__init__()
        self.inner, self.layer_idx = inner, layer_idx

    def forward(self, hidden_states, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        past, length = None, 0
        if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
            layer = cache.layers[self.layer_idx]
            past, length = (layer.keys, layer.values), layer.keys.shape[-2]
        result = self.inner.attend(hidden_states, past_kv=past)
        if cache is not None:
            cache.update(result.context_keys[:, :, length:], result.context_values[:, :, length:], self.layer_idx)
        return result.out, None


def _split_projections(attention, hidden: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """The original attention's q/k/v/o weights and biases as nn.Linear tensors (out, in)."""
    if all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        linear = {n: getattr(attention, f"{n}_proj") for n in "qkvo"}
        return {n: (m.weight, m.bias) for n, m in linear.items()}
    if hasattr(attention, "c_attn") and hasattr(attention, "c_proj"):  # GPT-2: Conv1D, weight (in, out)
        weight, bias = attention.c_attn.weight.t(), attention.c_attn.bias
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        parts = dict(zip("qkv", zip(weight.split(sizes, dim=0), bias.split(sizes, dim=0))))
        parts["o"] = (attention.c_proj.weight.t(), attention.c_proj.bias)
        return parts
    raise TypeError(f"add_memory_attention: {type(attention).__name__} has neither q_proj/k_proj/v_proj/o_proj "
                    "nor GPT-2's c_attn/c_proj: its weights cannot be carried over")


def add_memory_attention(model, layers=None, *, num_slots: Optional[int] = 4096, topk: int = 32, merge: str = "joint",
                         memory_heads: Optional[int] = None, trainable: bool = True, deterministic: bool = False,
                         backend: Optional[str] = None):
    """Replaces the attention of decoder layers ``layers`` (indices; default: the last layer) by the
    package's :class:`l2m_kernels.modules.MemoryAttention` with an owned
    :class:`~l2m_kernels.modules.TopKMemory` of ``num_slots`` slots per memory head
    (``memory_heads``, default the key-value heads; ``trainable``: learned keys and values, else
    state to ``load_``), read ``topk`` per query and merged with the local attention (``merge``:
    "joint" or "gate"); ``num_slots=None``: no memory yet (``layer.inner.memory`` may be set later).
    The original projections' weights (and biases) are carried over, with the model's rotary
    embedding (default rotary type, its ``rope_theta``), sliding window and attention scale, so that
    without memory the model computes what it did, through the fused op. Recorded in
    ``model.config.l2m_memory`` for :func:`from_pretrained`. Returns the model.

    Padding masks are refused (ValueError at the call): the fused op has no key padding mask.
    Supported: Llama, Mistral, Qwen2 (q/k/v/o projections, rotate-half rotary) and GPT-2 (c_attn,
    absolute positions)."""
    spec = {"layers": layers, "args": dict(num_slots=num_slots, topk=topk, merge=merge, memory_heads=memory_heads,
                                           trainable=trainable, deterministic=deterministic, backend=backend)}
    decoder, _ = _decoder_layers(model)
    spec["layers"] = _layer_indices(decoder, layers, len(decoder) - 1, "add_memory_attention")
    _put_memory_attention(model, spec, copy_weights=True)
    recorded = dict(getattr(model.config, "l2m_memory", None) or {})
    recorded.setdefault("attention", []).append(spec)
    model.config.l2m_memory = recorded
    return model


def _refuse_padding(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 2 and not bool(mask.all()):
        raise ValueError("add_memory_attention: this model's MemoryAttention layers take no padding mask "
                         "(memory_attention has no key padding mask); pass unpadded inputs")


def _put_memory_attention(model, spec: dict, copy_weights: bool) -> None:
    from l2m_kernels.modules import MemoryAttention, TopKMemory
    decoder, config = _decoder_layers(model)
    args = dict(spec["args"])
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    rope = getattr(config, "rope_parameters", None) or {}
    replacements = []
    for index in spec["layers"]:
        layer = decoder[index]
        name, attention = _sublayer(layer, _ATTENTION_NAMES, index, "add_memory_attention", "attention")
        head_dim = getattr(attention, "head_dim", None) or config.hidden_size // heads
        parts = _split_projections(attention, config.hidden_size, heads, kv_heads, head_dim)
        rotary = hasattr(attention, "q_proj")
        if rotary and rope.get("rope_type", "default") != "default":
            raise TypeError(f"add_memory_attention: rotary type {rope.get('rope_type')!r}: MemoryAttention "
                            "implements the default rotary embedding only")
        reference = parts["q"][0]
        memory = None if args["num_slots"] is None else TopKMemory(
            args["num_slots"], head_dim, head_dim, args["memory_heads"] or kv_heads, trainable=args["trainable"],
            backend=args["backend"], device=reference.device, dtype=reference.dtype)
        inner = MemoryAttention(config.hidden_size, heads, n_kv_heads=kv_heads, head_dim=head_dim,
                                topk=args["topk"], window=getattr(config, "sliding_window", None) if rotary else None,
                                merge=args["merge"], memory=memory, rotary_dims=head_dim if rotary else 0,
                                rope_base=float(rope.get("rope_theta", 10000.0)),
                                scale=getattr(attention, "scaling", None),
                                bias=any(bias is not None for _, bias in parts.values()),
                                deterministic=args["deterministic"], backend=args["backend"],
                                device=reference.device, dtype=reference.dtype)
        if copy_weights:
            with torch.no_grad():
                for n, (weight, bias) in parts.items():
                    target = getattr(inner, f"{n}_proj")
                    target.weight.copy_(weight)
                    if target.bias is not None:
                        target.bias.copy_(bias) if bias is not None else target.bias.zero_()
        replacements.append((layer, name, HFMemoryAttention(inner, index)))
    for layer, name, module in replacements:
        setattr(layer, name, module)
    if not getattr(model, "_l2m_padding_hook", None):
        model._l2m_padding_hook = model.base_model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)


def from_pretrained(path, model_class=None, **kwargs):
    """Loads a ``save_pretrained`` checkpoint of a model with product-key memory layers
    (:func:`replace_mlp_with_memory`) or memory attention (:func:`add_memory_attention`): the class of ``config.architectures[0]`` (or ``model_class``),
    extended so that construction puts the memory layers where ``config.l2m_memory`` records them,
    then transformers' own ``from_pretrained`` (``**kwargs``: its options) loads every weight. A
    checkpoint without memory layers loads as the plain class does."""
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"from_pretrained: the checkpoint's config names no transformers architecture "
                             f"({names}); pass model_class")

    class WithMemory(model_class):
        def __init__(self, config, *args, **init_kwargs):
            super().__init__(config, *args, **init_kwargs)
            recorded = getattr(config, "l2m_memory", None) or {}
            for spec in recorded.get("mlp", []):
                _put_memory_layers(self, spec)
            for spec in recorded.get("attention", []):
                _put_memory_attention(self, spec, copy_weights=False)

    WithMemory.__name__ = WithMemory.__qualname__ = model_class.__name__
    return WithMemory.from_pretrained(path, **kwargs)
