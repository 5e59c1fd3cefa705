"""MemoryStore: a large key-value memory with tiers, compressed storage, usage statistics, eviction
and consolidation (docs/memory-store.md)."""
from __future__ import annotations

import math
import os
import tempfile
from typing import Callable, Optional, Union

import torch

from ..ops._common import MemoryRead, rows_of_queries, to_queries
from ..ops.memory_write import gated_memory_write
from ..ops.topk_read import topk_memory_read
from ..ops.topk_read.reference import masked_softmax_lse
from . import formats
from .read import (_NO_SLOT, block_candidates_topk, exact_topk_ref, int8_topk, rank_top,
                   topk_values_read)
from .tiers import TIER_KINDS, Tier, parse_tiers

EVICTION_POLICIES = ("fifo", "lru", "usage")
# Rows of a two-level read's second level handled at once: bounds its staging buffer.
_STAGE_ROWS = 512


class MemoryStore:
    """A memory of ``(key, value)`` entries per memory head, addressed by global slot ids.

    Every slot holds one entry per memory head (``append`` adds entries to all heads at once).
    Slots ``[0, len(store))`` are in use; appends fill them in order, and once the store is full
    an eviction policy frees slots for new entries (without one, a full store refuses appends).
    Slots are grouped in blocks of ``block_size``; each block keeps a summary key (the mean of its
    keys), which the first level of a two-level read ranks.

    Args:
        num_heads:   Hm, memory heads; queries may have any H divisible by Hm (grouped heads).
        key_dim:     Dk.
        value_dim:   Dv.
        capacity:    slots, a multiple of ``block_size``.
        block_size:  S, slots per block (the unit of tiers and of two-level reads).
        tiers:       ``"device"`` (default), or a sequence of kinds ``"device"`` / ``"host"`` /
                     ``"disk"`` with their capacities, e.g. ``(("device", 1 << 20), ("disk", None))``
                     (``None``: the rest of ``capacity``). Blocks of slots go to the tiers in
                     order; ``rebalance()`` moves the most-read blocks into the faster tiers.
        key_format:  ``"float32"`` (default), ``"float16"``, ``"bfloat16"``, ``"float64"`` or
                     ``"int8"`` (per-channel scales, see :mod:`l2m_kernels.memory.formats`).
        value_format: a float format (default: the key format when it is one, else float32),
                     ``"int8"`` or ``"float8"`` (per-entry scales).
        key_scales:  int8 keys: ``(Hm, Dk)`` channel scales; default: ``key_margin`` times the
                     largest magnitude per channel of the first append, over 127.
        key_margin:  headroom of the automatic int8 key scales (keys up to ``key_margin`` times the
                     first append's range are represented; larger ones saturate).
        eviction:    ``None`` (a full store refuses appends), ``"fifo"`` (oldest entry first),
                     ``"lru"`` (least recently read or written first), ``"usage"`` (least read
                     weight, decayed by ``usage_decay`` per read), or a callable
                     ``fn(store) -> (capacity,) tensor`` of keep scores (lowest evicted first;
                     e.g. a learned scorer of ``store.keys()``).
        usage_decay: the per-read decay of the usage statistic (``"usage"`` eviction).
        consolidate: ``None``, or a group size ``c >= 2``: evicted entries are merged, ``c`` at a
                     time, into summary entries (usage-weighted mean of keys and of values, as the
                     Compressive Transformer's compression), which stay in the store.
        device:      the device of the fast tier, of the block table and of the statistics.
        directory:   where a disk tier keeps its files (default: a temporary directory removed with
                     the store).

    Example:
        store = MemoryStore(8, 64, 64, capacity=1 << 20, key_format="int8", eviction="usage")
        store.append(keys, values)                    # (Hm, n, 64) each
        read = store.read(q, k=32, blocks=16)         # q (B, H, T, 64) -> MemoryRead, global ids
    """

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, capacity: int, *,
                 block_size: int = 256, tiers="device", key_format: str = "float32",
                 value_format: Optional[str] = None, key_scales: Optional[torch.Tensor] = None,
                 key_margin: float = 2.0,
                 eviction: Union[None, str, Callable[["MemoryStore"], torch.Tensor]] = None,
                 usage_decay: float = 0.99, consolidate: Optional[int] = None,
                 key_refine: Optional[str] = None, device=None, directory: Optional[str] = None):
        if min(num_heads, key_dim, value_dim, block_size) < 1:
            raise ValueError("num_heads, key_dim, value_dim and block_size must be >= 1, got "
                             f"{num_heads}, {key_dim}, {value_dim}, {block_size}")
        if capacity < block_size or capacity % block_size:
            raise ValueError(f"capacity must be a positive multiple of block_size={block_size}, "
                             f"got {capacity}")
        if key_format not in formats.KEY_FORMATS:
            raise ValueError(f"key_format must be one of {formats.KEY_FORMATS}, got {key_format!r}")
        if value_format is None:
            value_format = key_format if key_format in formats.FLOAT_FORMATS else "float32"
        if value_format not in formats.VALUE_FORMATS:
            raise ValueError(f"value_format must be one of {formats.VALUE_FORMATS}, "
                             f"got {value_format!r}")
        if not (isinstance(eviction, str) and eviction in EVICTION_POLICIES
                or eviction is None or callable(eviction)):
            raise ValueError(f"eviction must be None, one of {EVICTION_POLICIES} or a callable, "
                             f"got {eviction!r}")
        if not 0.0 < usage_decay <= 1.0:
            raise ValueError(f"usage_decay must be in (0, 1], got {usage_decay}")
        if consolidate is not None and (consolidate < 2 or eviction is None):
            raise ValueError("consolidate needs an eviction policy and a group size >= 2, got "
                             f"consolidate={consolidate}, eviction={eviction!r}")
        if key_margin < 1.0:
            raise ValueError(f"key_margin must be >= 1, got {key_margin}")
        if key_refine is not None and (key_format != "int8" or key_refine not in TIER_KINDS):
            raise ValueError(f"key_refine is for key_format='int8' and names where the float32 keys "
                             f"are kept, one of {TIER_KINDS}; got key_refine={key_refine!r} with "
                             f"key_format={key_format!r}")
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self._capacity, self.block_size = capacity, block_size
        self.key_format, self.value_format = key_format, value_format
        self.key_margin = key_margin
        self.key_refine = key_refine
        # The largest |key / channel_scale - k8| of the entries written (refinement's bound).
        self.key_residual = 0.0
        self.eviction, self.usage_decay, self.consolidate = eviction, usage_decay, consolidate
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._tier_specs = parse_tiers(tiers, capacity, block_size)
        self._tempdir = None
        if directory is None and (key_refine == "disk"
                                  or any(spec.kind == "disk" for spec in self._tier_specs)):
            self._tempdir = tempfile.TemporaryDirectory(prefix="l2m-store-")
            directory = self._tempdir.name
        self.directory = directory

        layout = {"keys": (formats.storage_dtype(key_format), (key_dim,)),
                  "values": (formats.storage_dtype(value_format), (value_dim,))}
        if key_format == "int8":
            layout["key_abs"] = (torch.int32, ())
            layout["key_sum"] = (torch.int32, ())
        if key_refine is not None:
            layout["keys_float"] = (torch.float32, (key_dim,), key_refine)
        if value_format in ("int8", "float8"):
            layout["value_scale"] = (torch.float32, ())
        self.tiers: list[Tier] = []
        for index, spec in enumerate(self._tier_specs):
            sub = None
            if spec.kind == "disk" or key_refine == "disk":
                sub = os.path.join(directory, f"tier{index}")
                os.makedirs(sub, exist_ok=True)
            self.tiers.append(Tier(spec.kind, spec.capacity // block_size, block_size, num_heads,
                                   layout, self.device, sub))

        num_blocks = capacity // block_size
        dev = self.device
        # The block table: tier and place of every block of slots, and its inverse per tier.
        tier_of = torch.cat([torch.full((t.places,), i, dtype=torch.int64)
                             for i, t in enumerate(self.tiers)])
        place_of = torch.cat([torch.arange(t.places, dtype=torch.int64) for t in self.tiers])
        self.block_tier = tier_of.to(dev)
        self.block_place = place_of.to(dev)
        self.place_block = [torch.arange(t.places, dtype=torch.int64, device=dev) + first
                            for t, first in zip(self.tiers, self._tier_first_blocks())]
        self.block_len = torch.zeros(num_blocks, dtype=torch.int64, device=dev)
        self.summaries = torch.zeros(num_heads, num_blocks, key_dim, dtype=torch.float32,
                                     device=dev)
        # Statistics per slot: read weight (decayed), read step of the last read or write, and
        # the append sequence number of the entry.
        self.usage = torch.zeros(capacity, dtype=torch.float64, device=dev)
        self.last_used = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.written = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.key_scales = None
        if key_scales is not None:
            if key_format != "int8":
                raise ValueError("key_scales is for key_format='int8'")
            if tuple(key_scales.shape) != (num_heads, key_dim):
                raise ValueError(f"key_scales: expected ({num_heads}, {key_dim}), got "
                                 f"{tuple(key_scales.shape)}")
            if not bool((key_scales > 0).all()):
                raise ValueError("key_scales must be positive")
            self.key_scales = key_scales.detach().float().to(dev).clone()
        self._length = 0
        self.step = 0        # reads so far
        self.appended = 0    # entries appended so far
        self._zero_values = None
        self._side_stream = None  # CUDA: the stream of the copies from host memory and disk (_fetch)
        # What the last two-level read moved: blocks staged, bytes of summaries, staged keys and
        # the selected values.
        self.last_read_stats: dict = {}

    # ---- sizes ----

    def __len__(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_blocks(self) -> int:
        return self._capacity // self.block_size

    def _tier_first_blocks(self):
        first, out = 0, []
        for tier in self.tiers:
            out.append(first)
            first += tier.places
        return out

    # ---- placement ----

    def _rows(self, slots: torch.Tensor):
        """Tier index and row of every slot (any shape)."""
        block = torch.div(slots, self.block_size, rounding_mode="floor")
        return self.block_tier[block], self.block_place[block] * self.block_size + slots % self.block_size

    def _gather(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        """``arrays[name]`` at per-head slots ``(Hm, M)`` (each in ``[0, len)``) -> ``(Hm, M, *tail)``
        on the store's device: one row gather per tier (heads folded into the rows)."""
        tier_of, rows = self._rows(slots)
        heads, count = slots.shape
        first = self.tiers[0].arrays[name]
        tail = first.shape[2:]
        head_base = torch.arange(heads, device=rows.device).unsqueeze(1)
        if len(self.tiers) == 1:
            flat = (rows + head_base * first.shape[1]).reshape(-1).to(first.device)
            out = first.reshape(-1, *tail).index_select(0, flat)
            return self._fetch(out.view(heads, count, *tail))
        out = torch.empty((heads * count, *tail), dtype=first.dtype, device=self.device)
        tier_flat = tier_of.reshape(-1)
        for index, tier in enumerate(self.tiers):
            pos = (tier_flat == index).nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            array = tier.arrays[name]
            flat = (rows + head_base * array.shape[1]).reshape(-1)[pos].to(array.device)
            out.index_copy_(0, pos, self._fetch(array.reshape(-1, *tail).index_select(0, flat)))
        return out.view(heads, count, *tail)

    def _fetch(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows gathered from a tier, on the store's device. From host memory or disk to a CUDA
        device the copy goes through pinned memory on the store's side stream, which the current
        stream then waits for: the host thread goes on to the next tier's gather while the copy
        runs (no host synchronisation)."""
        if rows.device == self.device or self.device.type != "cuda":
            return rows.to(self.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        staged = rows if rows.is_pinned() else rows.pin_memory()
        with torch.cuda.stream(self._side_stream):
            out = staged.to(self.device, non_blocking=True)
        current.wait_stream(self._side_stream)
        out.record_stream(current)  # allocated on the side stream, used on the current one
        return out

    def _scatter(self, name: str, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Writes ``data (Hm, M, *tail)`` at slots ``(M,)`` (every head)."""
        tier_of, rows = self._rows(slots)
        for index, tier in enumerate(self.tiers):
            mine = (tier_of == index).nonzero().squeeze(1)
            if mine.numel() == 0:
                continue
            array = tier.arrays[name]
            array.index_copy_(1, rows[mine].to(array.device), data[:, mine].to(array.device))

    def _stored_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """Keys at per-head slots ``(Hm, M)`` as float32 (dequantised)."""
        if self.key_refine is not None:
            return self._gather("keys_float", slots)
        keys = self._gather("keys", slots)
        if self.key_format == "int8" and self.key_scales is not None:  # else nothing stored yet
            return formats.dequantize_keys(keys, self.key_scales.unsqueeze(1))
        return keys.float()

    def _stored_values(self, slots: torch.Tensor) -> torch.Tensor:
        values = self._gather("values", slots)
        scale = self._gather("value_scale", slots) if "value_scale" in self.tiers[0].arrays else None
        return formats.dequantize_values(values, scale)

    def keys(self) -> torch.Tensor:
        """The stored keys ``(Hm, len, Dk)`` as float32 (int8 keys dequantised)."""
        slots = torch.arange(self._length, device=self.device).expand(self.num_heads, -1)
        return self._stored_keys(slots)

    def values(self) -> torch.Tensor:
        """The stored values ``(Hm, len, Dv)`` as float32 (dequantised)."""
        slots = torch.arange(self._length, device=self.device).expand(self.num_heads, -1)
        return self._stored_values(slots)

    def _put(self, slots: torch.Tensor, keys: Optional[torch.Tensor],
             values: Optional[torch.Tensor]) -> None:
        """Stores entries ``(Hm, M, D)`` at distinct slots ``(M,)`` in the store's formats
        (``None``: leave that part as it is)."""
        if keys is not None and self.key_format == "int8":
            k8, key_abs, key_sum = formats.quantize_keys(keys, self.key_scales)
            if self.key_refine is not None:
                self._scatter("keys_float", slots, keys.float())
                residual = (keys.float() / self.key_scales.unsqueeze(1) - k8.float()).abs()
                if residual.numel():
                    self.key_residual = max(self.key_residual, float(residual.max()))
            self._scatter("keys", slots, k8)
            self._scatter("key_abs", slots, key_abs)
            self._scatter("key_sum", slots, key_sum)
        elif keys is not None:
            self._scatter("keys", slots, keys.to(formats.storage_dtype(self.key_format)))
        if values is not None and self.value_format in ("int8", "float8"):
            stored, scale = formats.quantize_values(values, self.value_format)
            self._scatter("values", slots, stored)
            self._scatter("value_scale", slots, scale)
        elif values is not None:
            self._scatter("values", slots, values.to(formats.storage_dtype(self.value_format)))

    def _refresh_summaries(self, blocks: torch.Tensor) -> None:
        """Recomputes the summary key (mean of the valid keys) of the given blocks."""
        blocks = torch.unique(blocks)
        if blocks.numel() == 0:
            return
        size = self.block_size
        slots = (blocks.unsqueeze(1) * size + torch.arange(size, device=self.device)).reshape(-1)
        keys = self._stored_keys(slots.expand(self.num_heads, -1))
        keys = keys.view(self.num_heads, blocks.numel(), size, self.key_dim)
        count = self.block_len[blocks]
        live = torch.arange(size, device=self.device) < count.unsqueeze(1)     # (nb, S)
        total = torch.where(live.unsqueeze(-1), keys, 0.0).sum(2)
        self.summaries[:, blocks] = total / count.clamp_min(1).unsqueeze(-1).to(total.dtype)

    # ---- append, eviction, consolidation ----

    @staticmethod
    def _entries(tensor: torch.Tensor, name: str, heads: int, dim: int) -> torch.Tensor:
        if tensor.dim() == 4:  # (B, Hm, n, D): the batch elements' entries in order
            tensor = tensor.transpose(0, 1).reshape(tensor.shape[1], -1, tensor.shape[-1])
        if tensor.dim() != 3 or tensor.shape[0] != heads or tensor.shape[2] != dim:
            raise ValueError(f"{name}: expected (Hm={heads}, n, {dim}) or (B, {heads}, n, {dim}), "
                             f"got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got {tensor.dtype}")
        return tensor

    @torch.no_grad()
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Adds entries: ``keys (Hm, n, Dk)``, ``values (Hm, n, Dv)`` (or with a batch dimension in
        front, appended batch element after batch element). Returns their slot ids ``(n,)``.

        Free slots are filled in order; past capacity, the eviction policy frees slots (and with
        ``consolidate`` merges the evicted entries into summary entries first). Without a policy,
        an append that does not fit raises ``RuntimeError`` and changes nothing.
        """
        keys = self._entries(keys, "keys", self.num_heads, self.key_dim)
        values = self._entries(values, "values", self.num_heads, self.value_dim)
        if keys.shape[1] != values.shape[1]:
            raise ValueError(f"keys and values hold {keys.shape[1]} and {values.shape[1]} entries")
        count = keys.shape[1]
        if count > self._capacity:
            raise ValueError(f"append of {count} entries exceeds capacity={self._capacity}")
        free = self._capacity - self._length
        if count > free and self.eviction is None:
            raise RuntimeError(f"MemoryStore is full ({self._length} of {self._capacity} slots) and "
                               "has no eviction policy; pass eviction=... or read less")
        keys = keys.detach().to(self.device)
        values = values.detach().to(self.device)
        if self.key_format == "int8" and self.key_scales is None:
            self.key_scales = formats.channel_scales(keys.float(), self.key_margin)
        slots_fresh = torch.arange(self._length, self._length + min(count, free),
                                   device=self.device)
        self._length += slots_fresh.numel()
        evicted = count - slots_fresh.numel()
        slots = slots_fresh
        touched = [slots_fresh]
        if evicted > 0:
            reused, merged = self._evict(evicted)
            slots = torch.cat([slots_fresh, reused])
            touched.append(reused)
            touched.append(merged)
        size = self.block_size
        blocks_fresh = torch.div(slots_fresh, size, rounding_mode="floor")
        self.block_len.scatter_reduce_(0, blocks_fresh, (slots_fresh % size) + 1, reduce="amax")
        self._put(slots, keys, values)
        self.usage[slots] = 0.0
        self.last_used[slots] = self.step
        self.written[slots] = self.appended + torch.arange(count, device=self.device)
        self.appended += count
        self._refresh_summaries(torch.div(torch.cat(touched), size, rounding_mode="floor"))
        return slots

    def keep_scores(self) -> torch.Tensor:
        """The eviction policy's keep score of every used slot ``(len,)`` (lowest: evicted first;
        ties: the older entry first)."""
        length = self._length
        if self.eviction == "fifo":
            return self.written[:length].double()
        if self.eviction == "lru":
            return self.last_used[:length].double()
        if self.eviction == "usage":
            return self.decayed_usage()
        scores = self.eviction(self)
        if not isinstance(scores, torch.Tensor) or scores.shape != (length,):
            raise ValueError(f"the eviction callable must return a ({length},) tensor of keep "
                             f"scores, got {getattr(scores, 'shape', type(scores))}")
        return scores.detach().to(self.device).double()

    def decayed_usage(self) -> torch.Tensor:
        """Read weight of every used slot, decayed by ``usage_decay`` per read since its last
        update: ``usage * decay ** (step - last_used)``."""
        length = self._length
        age = (self.step - self.last_used[:length]).double()
        return self.usage[:length] * torch.pow(torch.tensor(self.usage_decay, dtype=torch.float64,
                                                            device=self.device), age)

    def _victims(self, count: int) -> torch.Tensor:
        """The ``count`` slots to evict: lowest keep score, ties to the older entry."""
        keep = self.keep_scores()
        by_age = torch.argsort(self.written[:self._length], stable=True)
        order = torch.argsort(keep[by_age], stable=True)
        return by_age[order[:count]]

    def _evict(self, needed: int):
        """Frees ``needed`` slots; returns ``(freed slots (needed,), slots of merged entries)``."""
        if self.consolidate is None:
            return torch.sort(self._victims(needed)).values, self.block_len.new_empty(0)
        group = self.consolidate
        # v victims make ceil(v / group) merged entries, which stay: v - ceil(v / group) >= needed.
        victims_count = needed
        while victims_count - math.ceil(victims_count / group) < needed:
            victims_count += 1
        victims_count = min(victims_count, self._length)
        victims = self._victims(victims_count)       # lowest keep score first
        merged_count = math.ceil(victims.numel() / group)
        pad = merged_count * group - victims.numel()
        groups = torch.cat([victims, victims[-1:].expand(pad)]).view(merged_count, group)
        usage_all = self.decayed_usage()
        member = torch.ones(merged_count, group, dtype=torch.float64, device=self.device)
        if pad:
            member[-1, group - pad:] = 0.0
        weight = usage_all[groups] * member                          # (m, c)
        # A group never read merges with equal weights.
        weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, member)
        norm = (weight / weight.sum(1, keepdim=True)).float()          # (m, c)
        flat = groups.reshape(-1).expand(self.num_heads, -1)
        keys = self._stored_keys(flat).view(self.num_heads, merged_count, group, self.key_dim)
        values = self._stored_values(flat).view(self.num_heads, merged_count, group, self.value_dim)
        merged_keys = (keys * norm[None, :, :, None]).sum(2)
        merged_values = (values * norm[None, :, :, None]).sum(2)
        usage = (usage_all[groups] * member).sum(1)
        born = self.written[groups].amax(1)
        ordered = torch.sort(victims).values
        merged_slots, freed = ordered[:merged_count], ordered[merged_count:]
        self._put(merged_slots, merged_keys, merged_values)
        self.usage[merged_slots] = usage
        self.last_used[merged_slots] = self.step
        self.written[merged_slots] = born
        return freed[:needed], merged_slots

    # ---- gated writes ----

    @torch.no_grad()
    def write(self, indices: torch.Tensor, weights: torch.Tensor, add: torch.Tensor,
              erase: torch.Tensor, *, key_add: Optional[torch.Tensor] = None,
              key_erase: Optional[torch.Tensor] = None) -> None:
        """Gated writes at slot ids, with the meaning of :func:`l2m_kernels.gated_memory_write`:
        for ``t`` in order and ``j`` in order, with ``s = indices[h, t, j] >= 0``,
        ``values[h, s] <- values[h, s] * (1 - weights[h, t, j] * erase[h, t]) + weights[h, t, j] *
        add[h, t]``; and the same for the keys with ``key_add`` / ``key_erase`` when given.

        Args:
            indices: (Hm, T, kw) or (B, Hm, T, kw) int slot ids in [-1, len) (-1: no write); a
                     batch dimension is flattened into T, batch element after batch element.
            weights: the shape of indices, in [0, 1].
            add:     (Hm, T, Dv) (or with B); erase: (Hm, T, Dv) or (Hm, T, 1), in [0, 1].
            key_add, key_erase: the same for the keys (Dk), optional.

        Compressed entries are written back re-quantised. The statistics count a write as a use
        (LRU). Raises IndexError for a slot outside [-1, len) before anything is written.
        """
        def flat(tensor, name):
            if tensor is None:
                return None
            if tensor.dim() == 4:
                tensor = tensor.transpose(0, 1).reshape(tensor.shape[1], -1, tensor.shape[-1])
            if tensor.dim() != 3 or tensor.shape[0] != self.num_heads:
                raise ValueError(f"{name}: expected (Hm={self.num_heads}, T, .) or "
                                 f"(B, {self.num_heads}, T, .), got {tuple(tensor.shape)}")
            return tensor.to(self.device)

        indices, weights = flat(indices, "indices"), flat(weights, "weights")
        add, erase = flat(add, "add"), flat(erase, "erase")
        key_add, key_erase = flat(key_add, "key_add"), flat(key_erase, "key_erase")
        if (key_add is None) != (key_erase is None):
            raise ValueError("key_add and key_erase go together")
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices: expected int32 or int64, got {indices.dtype}")
        if weights.shape != indices.shape:
            raise ValueError(f"weights: expected {tuple(indices.shape)}, got {tuple(weights.shape)}")
        if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= self._length):
            raise IndexError(f"indices: slot ids must be in [-1, {self._length}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        indices = indices.long()
        live = indices >= 0
        slots = torch.unique(indices[live])
        if slots.numel() == 0:
            return
        compact = torch.where(live, torch.searchsorted(slots, indices.clamp_min(0)), -1)
        per_head = slots.expand(self.num_heads, -1)

        def update(memory, add_, erase_):
            return gated_memory_write(memory.unsqueeze(0), compact.unsqueeze(0),
                                      weights.unsqueeze(0).to(memory.dtype),
                                      add_.unsqueeze(0).to(memory.dtype),
                                      erase_.unsqueeze(0).to(memory.dtype))[0]

        values = update(self._stored_values(per_head), add, erase)
        keys = None
        if key_add is not None:
            keys = update(self._stored_keys(per_head), key_add, key_erase)
        self._put(slots, keys, values)
        self.last_used[slots] = self.step
        if keys is not None:
            self._refresh_summaries(torch.div(slots, self.block_size, rounding_mode="floor"))

    # ---- tiers ----

    @torch.no_grad()
    def rebalance(self, max_blocks: Optional[int] = None) -> int:
        """Moves the most-read full blocks of the slower tiers into the first tier, in exchange for
        its least-read full blocks (read weight: the decayed usage summed over a block). Returns the
        number of blocks exchanged. Slot ids do not change; only the block table does."""
        if len(self.tiers) < 2:
            return 0
        size = self.block_size
        heat = torch.zeros(self.num_blocks, dtype=torch.float64, device=self.device)
        heat.index_add_(0, torch.arange(self._length, device=self.device) // size,
                        self.decayed_usage())
        full = self.block_len == size
        fast = full & (self.block_tier == 0)
        slow = full & (self.block_tier != 0)
        fast_ids = fast.nonzero().squeeze(1)
        slow_ids = slow.nonzero().squeeze(1)
        fast_ids = fast_ids[torch.argsort(heat[fast_ids], stable=True)]
        slow_ids = slow_ids[torch.argsort(heat[slow_ids], descending=True, stable=True)]
        count = min(fast_ids.numel(), slow_ids.numel())
        if max_blocks is not None:
            count = min(count, max_blocks)
        gain = heat[slow_ids[:count]] > heat[fast_ids[:count]]
        count = int(gain.sum())  # both sorted: the gainful pairs are a prefix
        if count == 0:
            return 0
        up, down = slow_ids[:count], fast_ids[:count]
        moved = torch.cat([up, down])
        slots = (moved.unsqueeze(1) * size + torch.arange(size, device=self.device)).reshape(-1)
        names = list(self.tiers[0].arrays)
        data = {name: self._gather(name, slots.expand(self.num_heads, -1)) for name in names}
        tier_up, place_up = self.block_tier[up].clone(), self.block_place[up].clone()
        self.block_tier[up], self.block_place[up] = self.block_tier[down], self.block_place[down]
        self.block_tier[down], self.block_place[down] = tier_up, place_up
        for name in names:
            self._scatter(name, slots, data[name])
        for index in range(len(self.tiers)):
            mine = (self.block_tier == index).nonzero().squeeze(1)
            self.place_block[index][self.block_place[mine]] = mine
        return count

    # ---- state ----

    def _config(self) -> dict:
        return {"num_heads": self.num_heads, "key_dim": self.key_dim, "value_dim": self.value_dim,
                "capacity": self._capacity, "block_size": self.block_size,
                "key_format": self.key_format, "value_format": self.value_format,
                "key_refine": self.key_refine, "tiers": [(spec.kind, spec.capacity) for spec in self._tier_specs]}

    def state_dict(self) -> dict:
        """Everything needed to restore the store bitwise: configuration, counters, block table,
        statistics, summaries and every tier's used rows (copied to CPU tensors)."""
        state = {"config": self._config(), "length": self._length, "step": self.step,
                 "appended": self.appended, "key_residual": self.key_residual,
                 "key_scales": None if self.key_scales is None else self.key_scales.cpu().clone()}
        for name in ("block_tier", "block_place", "block_len", "summaries", "usage", "last_used",
                     "written"):
            state[name] = getattr(self, name).cpu().clone()
        for index, tier in enumerate(self.tiers):
            used = int((self.block_len[self.place_block[index]] > 0).sum()) * self.block_size
            for name, array in tier.arrays.items():
                state[f"tier{index}.{name}"] = array[:, :used].cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output into a store built with the same configuration
        (ValueError otherwise); a disk tier's files are rewritten."""
        if state.get("config") != self._config():
            raise ValueError(f"load_state_dict: the state was saved from a store configured as "
                             f"{state.get('config')}, this one is {self._config()}")
        self._length, self.step, self.appended = state["length"], state["step"], state["appended"]
        self.key_residual = state["key_residual"]
        scales = state["key_scales"]
        self.key_scales = None if scales is None else scales.to(self.device).clone()
        for name in ("block_tier", "block_place", "block_len", "summaries", "usage", "last_used",
                     "written"):
            getattr(self, name).copy_(state[name])
        for index, tier in enumerate(self.tiers):
            mine = (self.block_tier == index).nonzero().squeeze(1)
            self.place_block[index][self.block_place[mine]] = mine
            for name, array in tier.arrays.items():
                saved = state[f"tier{index}.{name}"]
                array.zero_()
                array[:, :saved.shape[1]].copy_(saved)

    # ---- reads ----

    def _check_query(self, q: torch.Tensor, k: int):
        if q.dim() != 4 or q.shape[-1] != self.key_dim or q.shape[1] % self.num_heads:
            raise ValueError(f"q: expected (B, H, T, {self.key_dim}) with H a multiple of "
                             f"num_heads={self.num_heads}, got {tuple(q.shape)}")
        if not q.is_floating_point():
            raise TypeError(f"q: expected a floating tensor, got {q.dtype}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")

    def _rows_of_queries(self, q: torch.Tensor) -> torch.Tensor:
        """``q (B, H, T, D)`` -> ``(Hm, B * g * T, D)``: the rows each memory head serves."""
        return rows_of_queries(q, self.num_heads)

    @property
    def _rank_keys(self) -> str:
        """The array the exact scores use: the float copies when refining, else the keys."""
        return "keys_float" if self.key_refine is not None else "keys"


    def _slack(self, q_rows: torch.Tensor) -> torch.Tensor:
        """Per row, a bound on |score on the float key - score on the int8 key| over every entry:
        ``residual * sum_d |q_eff_d|``, rounded up."""
        residual = (self.key_residual + 1e-6) * (1 + 1e-5)
        return (q_rows.abs().sum(-1) * residual + 1e-30).float().contiguous()

    def _query_rows(self, q: torch.Tensor, scale: float):
        """``(q_rows, q_exact)`` ``(Hm, R, Dk)`` float32: the rows the selection kernels score
        (times the int8 channel scales for int8 keys), and those of the exact scores
        (``_rank_keys``: without the channel scales when refining on float keys)."""
        scaled = self._rows_of_queries(q.detach().float()) * scale
        if self.key_format != "int8":
            return scaled, scaled
        q_rows = (scaled * self.key_scales.unsqueeze(1)).contiguous()
        return q_rows, (scaled if self.key_refine is not None else q_rows)

    def read(self, q: torch.Tensor, k: int, *, blocks: Optional[int] = None,
             scale: Optional[float] = None, track: bool = True) -> MemoryRead:
        """Top-k softmax read of the stored entries.

        Args:
            q:      (B, H, T, Dk), H a multiple of num_heads; query head h reads memory head
                    h // (H // Hm).
            k:      entries read per query.
            blocks: None: exact over every entry. An int: two-level read, the ``blocks`` blocks
                    with the best summary score per query, then the exact top-k within them.
            scale:  score scale, default Dk ** -0.5.
            track:  accumulate the read weights into the usage statistics (and advance the read
                    step).

        Returns:
            MemoryRead(out (B, H, T, Dv) in q's dtype, indices (B, H, T, k) global slot ids, -1
            where fewer than k entries exist, weights (B, H, T, k) float32, lse (B, H, T) float32).
            Differentiable in q (the stored entries are state, not parameters).

        With one tier and float keys, ``blocks=None`` is exactly
        ``topk_memory_read(q, keys, values, k)`` over the stored entries in slot order.
        """
        self._check_query(q, k)
        scale = self.key_dim ** -0.5 if scale is None else float(scale)
        batch, heads, seq, _ = q.shape
        if blocks is not None and (not isinstance(blocks, int) or blocks < 1):
            raise ValueError(f"blocks must be None or a positive int, got {blocks!r}")
        self.last_read_stats = {}
        if self._length == 0 or q.numel() == 0:
            empty = torch.full((batch, heads, seq, k), -1, dtype=torch.int64, device=q.device)
            result = self._finish(q, empty, scale, None)
        elif blocks is None and len(self.tiers) == 1 and self.key_format != "int8" and k <= min(
                self._length, 256):
            result = self._read_dense(q, k, scale)
        else:
            if blocks is None:
                scores, slots = self._select_exact(q, k, scale)
            else:
                scores, slots = self._select_two_level(q, k, blocks, scale)
            if self.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad):
                result = self._read_selection(q, scores, slots)
            else:
                scores = to_queries(scores, batch, heads, seq)
                slots = to_queries(slots, batch, heads, seq)
                result = self._finish(q, slots, scale, scores)
        if blocks is not None and self.last_read_stats:
            per_entry = self.value_dim * formats.storage_dtype(self.value_format).itemsize + (
                4 if self.value_format in ("int8", "float8") else 0)
            self.last_read_stats["bytes"] += result.indices.numel() * per_entry
        if track:
            self._track(result.indices, result.weights)
        return result

    def _read_dense(self, q, k, scale) -> MemoryRead:
        """One tier of float keys: the fused read over the stored entries in slot order. Under
        autograd only its selection is used and the k selected rows are gathered (copies), so a
        later append or write never touches what the backward saved."""
        tier = self.tiers[0]
        keys = tier.arrays["keys"][:, :self._length]
        values = tier.arrays["values"][:, :self._length]
        if self.value_format not in formats.FLOAT_FORMATS or values.dtype != keys.dtype:
            values = self.values().to(keys.dtype)
        if torch.is_grad_enabled() and q.requires_grad:
            with torch.no_grad():
                indices = topk_memory_read(q.to(keys.dtype), keys, values, k, scale=scale).indices
            return self._finish(q, indices, scale, None)
        read = topk_memory_read(q.to(keys.dtype), keys, values, k, scale=scale)
        return MemoryRead(read.out.to(q.dtype), read.indices, read.weights, read.lse)

    def _tier_rows(self, index: int) -> int:
        """Rows in use at the front of tier ``index`` (its used places are a prefix)."""
        tier = self.tiers[index]
        blocks = self.place_block[index]
        lens = self.block_len[blocks]
        used = int((lens > 0).sum())
        if used == 0:
            return 0
        return (used - 1) * self.block_size + int(lens[used - 1])

    def _select_exact(self, q, k, scale):
        """Exact top-k over every entry: per tier, then merged. Returns ``(Hm, R, k)`` float32
        scores and global slots."""
        q_rows, q_exact = self._query_rows(q, scale)
        size = self.block_size
        parts_scores, parts_slots = [], []
        rescore = len(self.tiers) > 1
        for index, tier in enumerate(self.tiers):
            rows = self._tier_rows(index)
            if rows == 0:
                continue
            keys = tier.arrays["keys"][:, :rows]
            if self.key_format == "int8":
                refine = None
                if self.key_refine is not None:
                    refine = (q_exact, tier.arrays["keys_float"][:, :rows], self._slack(q_rows))
                scores, local = int8_topk(q_rows, keys, tier.arrays["key_abs"][:, :rows],
                                          tier.arrays["key_sum"][:, :rows], k, refine)
            elif k <= 256 and keys.device == q_rows.device:
                # The fused float read selects; its scores are recomputed below in float64.
                local = topk_memory_read(q_rows.unsqueeze(0).to(keys.dtype), keys,
                                         self._zeros(rows), min(k, rows), scale=1.0).indices[0]
                scores = torch.zeros(local.shape, dtype=torch.float64, device=local.device)
                rescore = True
            else:
                scores, local = exact_topk_ref(q_rows, keys.to(self.device), k)
            if len(self.tiers) == 1:  # blocks move only between tiers: a slot is its row
                slots = torch.where(local >= 0, local, _NO_SLOT) if rescore else local
            else:
                block = self.place_block[index][torch.div(local.clamp_min(0), size,
                                                          rounding_mode="floor")]
                slots = torch.where(local >= 0, block * size + local % size, _NO_SLOT)
            parts_scores.append(scores)
            parts_slots.append(slots)
        if len(parts_scores) == 1 and not rescore:  # one kernel's ranking, already final
            scores, slots = parts_scores[0].float(), parts_slots[0]
            if len(self.tiers) == 1:
                return scores, slots
            return scores, torch.where(slots == _NO_SLOT, -1, slots)
        scores = torch.cat([part.double() for part in parts_scores], -1)
        slots = torch.cat(parts_slots, -1)
        if rescore:
            # The candidates of every tier ranked alike: float64 scores of the stored keys.
            safe = torch.where(slots == _NO_SLOT, 0, slots)
            keys = self._gather(self._rank_keys, safe.reshape(self.num_heads, -1)).double()
            keys = keys.view(*slots.shape, self.key_dim)
            scores = torch.einsum("hrd,hrcd->hrc", q_exact.double(), keys)
        return rank_top(scores, slots, k)

    def _zeros(self, rows: int) -> torch.Tensor:
        """``(Hm, rows, 1)`` zeros: the values of a read that only selects."""
        if self._zero_values is None or self._zero_values.shape[1] < rows:
            self._zero_values = torch.zeros(self.num_heads, self._capacity, 1, device=self.device)
        return self._zero_values[:, :rows]

    def _select_two_level(self, q, k, blocks, scale):
        used_blocks = int((self.block_len > 0).sum())
        blocks = min(blocks, used_blocks)
        size = self.block_size
        # First level: the best blocks by summary score, exact top-k over the summaries.
        summaries = self.summaries[:, :used_blocks]
        q32 = q.detach().float()
        if blocks <= 256:
            first = topk_memory_read(q32, summaries, self._zeros(used_blocks), blocks,
                                     scale=scale).indices
            first = self._rows_of_queries(first)
        else:
            _, first = block_candidates_topk(
                self._rows_of_queries(q32) * scale, summaries.transpose(0, 1).unsqueeze(2)
                .contiguous(), torch.arange(used_blocks, device=self.device).expand(
                    self.num_heads, q.shape[0] * q.shape[1] // self.num_heads * q.shape[2],
                    used_blocks).contiguous(),
                torch.arange(used_blocks, device=self.device),
                torch.ones(used_blocks, dtype=torch.int64, device=self.device), blocks)
        first = torch.sort(first, dim=-1).values                      # (Hm, R, KB) ascending
        q_rows = self._query_rows(q, scale)[1]
        out_scores, out_slots = [], []
        staged = 0
        for start in range(0, q_rows.shape[1], _STAGE_ROWS):
            chosen = first[:, start:start + _STAGE_ROWS]
            units = torch.unique(chosen)
            staged += units.numel()
            stage = self._stage_blocks(units)
            local = torch.searchsorted(units, chosen)
            scores, slots = block_candidates_topk(
                q_rows[:, start:start + _STAGE_ROWS], stage, local.contiguous(), units * size,
                self.block_len[units], k)
            out_scores.append(scores)
            out_slots.append(slots)
        key_bytes = (1 if self._rank_keys == "keys" and self.key_format == "int8" else
                     4 if self._rank_keys == "keys_float" else
                     formats.storage_dtype(self.key_format).itemsize)
        self.last_read_stats = {
            "blocks": staged,
            "bytes": (self.num_heads * used_blocks * self.key_dim * 4
                      + staged * self.num_heads * size * self.key_dim * key_bytes)}
        return torch.cat(out_scores, 1), torch.cat(out_slots, 1)

    def _stage_blocks(self, units: torch.Tensor) -> torch.Tensor:
        """The keys of blocks ``units (U,)`` as one ``(U, Hm, S, Dk)`` buffer: one gather per tier."""
        size = self.block_size
        name = self._rank_keys
        dtype = torch.int8 if name == "keys" and self.key_format == "int8" else torch.float32
        stage = torch.empty(units.numel(), self.num_heads, size, self.key_dim, dtype=dtype,
                            device=self.device)
        tier_of = self.block_tier[units]
        places = self.block_place[units]
        for index, tier in enumerate(self.tiers):
            mine = (tier_of == index).nonzero().squeeze(1)
            if mine.numel() == 0:
                continue
            view = tier.block_view(name)
            gathered = view.index_select(1, places[mine].to(view.device))  # (Hm, u, S, D)
            stage[mine] = self._fetch(gathered).transpose(0, 1).to(dtype)
        return stage

    def _read_selection(self, q, scores, slots) -> MemoryRead:
        """Weights, lse and out of a selection ``(Hm, R, k)`` (scores, global slots, -1: none)
        without autograd: the value rows are read, and dequantised, by one kernel
        (:func:`~l2m_kernels.memory.read.topk_values_read`), in place in a single tier, else
        from one gather per tier of the selected rows in their stored format."""
        batch, heads, seq, _ = q.shape
        scaled = "value_scale" in self.tiers[0].arrays
        if len(self.tiers) == 1:  # a slot is its row (see _select_exact)
            arrays = self.tiers[0].arrays
            values, value_scale = arrays["values"], arrays["value_scale"] if scaled else None
            rows = slots
        else:
            live = slots >= 0
            flat = slots.clamp_min(0).reshape(self.num_heads, -1)
            values = self._gather("values", flat)
            value_scale = self._gather("value_scale", flat) if scaled else None
            rows = torch.arange(flat.shape[1], device=slots.device).view(slots.shape[1:])
            rows = torch.where(live, rows, -1)
        out, weights, lse = topk_values_read(scores, rows, values, value_scale)
        return MemoryRead(to_queries(out, batch, heads, seq).to(q.dtype),
                          to_queries(slots, batch, heads, seq),
                          to_queries(weights, batch, heads, seq),
                          to_queries(lse.unsqueeze(-1), batch, heads, seq).squeeze(-1))

    def _finish(self, q, slots, scale, scores) -> MemoryRead:
        """Weights, lse and out of the selected global ``slots (B, H, T, k)`` (-1: none).

        Without autograd the selection's scores are used as they are; with it, the selected keys
        are gathered and the scores recomputed, differentiably in q."""
        batch, heads, seq, k = slots.shape
        missing = slots < 0
        safe = slots.clamp_min(0)
        rows = self._rows_of_queries(safe)                                   # (Hm, R, k)
        flat = rows.reshape(self.num_heads, -1)
        values = self._stored_values(flat).view(*rows.shape, self.value_dim)
        if scores is None or (torch.is_grad_enabled() and q.requires_grad):
            keys = self._stored_keys(flat).view(*rows.shape, self.key_dim)
            q_rows = self._rows_of_queries(q.float()) * scale
            scores = torch.einsum("hrd,hrkd->hrk", q_rows, keys)
            scores = to_queries(scores, batch, heads, seq)
        else:
            scores = scores.float()
        values = to_queries(values.reshape(self.num_heads, rows.shape[1], k * self.value_dim),
                                  batch, heads, seq).view(batch, heads, seq, k, self.value_dim)
        weights, lse = masked_softmax_lse(scores, missing)
        if bool(missing.any()):
            values = torch.where(missing.unsqueeze(-1), 0.0, values)
        out = torch.matmul(weights.unsqueeze(-2), values).squeeze(-2)
        return MemoryRead(out.to(q.dtype), slots, weights, lse)

    @torch.no_grad()
    def _track(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Usage statistics from a read's selection: O(reads x k) gathers and scatters, no pass
        over the memory and no sort (a slot read several times gets the same decayed value
        written several times, then every weight added)."""
        self.step += 1
        flat = indices.reshape(-1)
        live = flat >= 0
        if not bool(live.all()):
            flat = flat[live]
            read_weights = weights.reshape(-1)[live]
        else:
            read_weights = weights.reshape(-1)
        if flat.numel() == 0:
            return
        flat = flat.to(self.device)
        age = (self.step - self.last_used[flat]).double()
        decay = torch.pow(torch.tensor(self.usage_decay, dtype=torch.float64, device=self.device),
                          age)
        self.usage[flat] = self.usage[flat] * decay
        self.usage.index_add_(0, flat, read_weights.to(self.device, torch.float64))
        self.last_used[flat] = self.step
