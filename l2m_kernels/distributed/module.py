"""``ShardedTopKMemory`` and ``ShardedProductKeyMemory``: learned memories whose slots (or value
features) are split across the ranks of a process group, their seeded initialisation, and how to
keep the shards out of DDP's gradient averaging."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Set

import numpy as np
import torch
from torch import Tensor, nn

from ..modules.product_key_memory import ProductKeyMemory
from ..ops._common import MemoryRead
from . import _meta
from ._meta import QUERY_LAYOUTS, ShardLayout
from .product_key import SHARD_MODES, sharded_product_key_read
from .topk import sharded_topk_memory_read

INIT_CHUNK = 1024  # slots per seeded chunk of the initial memory


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The generator of chunk ``chunk`` of the initial memory of ``seed``. (A CPU generator keeps
    only the low 32 bits of its seed, so the pair is hashed to 32 bits by numpy's SeedSequence.)"""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0]))


def shard_sizes(num_slots: int, world_size: int) -> List[int]:
    """An even split of ``num_slots`` slots over ``world_size`` ranks, the first ranks one more."""
    if num_slots < 0 or world_size < 1:
        raise ValueError(f"num_slots, world_size: expected >= 0 and >= 1, got {num_slots}, {world_size}")
    base, extra = divmod(num_slots, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def shard_of(full: Tensor, *, sizes: Optional[Sequence[int]] = None, group=None, dim: int = -2) -> Tensor:
    """This rank's slots of a tensor holding the whole memory (a view).

    Args:
        full:  the whole memory, its slots along ``dim``, e.g. keys (Hm, N, Dk).
        sizes: slots per rank, in group order, summing to N (default: :func:`shard_sizes`).
        group: the process group (default: the world); only its rank and size are read.
        dim:   the slot dimension.

    Equivalent PyTorch:
        full.narrow(dim, sum(sizes[:rank]), sizes[rank])
    """
    rank, world_size = _meta.group_rank(group)
    total = full.shape[dim]
    sizes = shard_sizes(total, world_size) if sizes is None else [int(s) for s in sizes]
    if len(sizes) != world_size or sum(sizes) != total or min(sizes) < 0:
        raise ValueError(f"sizes: expected {world_size} non-negative slot counts summing to "
                         f"N = {total}, got {sizes}")
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank])


def seeded_memory(num_slots: int, key_dim: int, value_dim: int, num_heads: int = 1, *, seed: int = 0,
                  start: int = 0, count: Optional[int] = None, dtype=None, device=None):
    """Slots ``[start, start + count)`` of the initial memory of ``seed``: ``(keys (Hm, count, Dk),
    values (Hm, count, Dv))``, keys ~ N(0, 1) and values ~ N(0, 1 / Dv) as in ``TopKMemory``.

    The memory is drawn in chunks of ``INIT_CHUNK`` slots, chunk ``c`` from its own generator
    (seeded with ``seed`` and ``c``), so a slot's initial value depends only on ``seed`` and its
    global slot id: the shards of every rank, each drawn alone, concatenate to the memory drawn
    whole (``num_slots`` only bounds ``start + count``).

    Equivalent PyTorch (whole memory):
        chunks = [randn(Hm, INIT_CHUNK, Dk + Dv, generator=gen(seed, c)) for c in ...]
        keys, values = cat(chunks, 1)[:, :N].split([Dk, Dv], -1); values /= sqrt(Dv)
    """
    count = num_slots - start if count is None else count
    if not 0 <= start <= start + count <= num_slots:
        raise ValueError(f"start, count: expected 0 <= start <= start + count <= num_slots = {num_slots}, "
                         f"got {start}, {count}")
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed: expected an int in [0, 2**31), got {seed}")
    first, last = start // INIT_CHUNK, -(-(start + count) // INIT_CHUNK)
    chunks = [torch.randn(num_heads, INIT_CHUNK, key_dim + value_dim, generator=_chunk_generator(seed, chunk))
              for chunk in range(first, last)]
    rows = torch.cat(chunks, 1) if chunks else torch.empty(num_heads, 0, key_dim + value_dim)
    rows = rows[:, start - first * INIT_CHUNK:start - first * INIT_CHUNK + count]
    keys, values = rows.split([key_dim, value_dim], -1)
    values = values / math.sqrt(value_dim)
    factory = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    return keys.to(**factory).contiguous(), values.to(**factory).contiguous()


class ShardedTopKMemory(nn.Module):
    """A learned key-value memory of ``num_heads`` heads whose slots are split across ``group``,
    read exactly with :func:`sharded_topk_memory_read`.

    This rank holds ``keys (Hm, N_r, Dk)`` and ``values (Hm, N_r, Dv)`` parameters, the global slots
    ``[offset, offset + N_r)``; every rank of the group constructs it together (one all-gather of
    the shard sizes) and calls it together.

    Args:
        num_slots_local: N_r, this rank's slots (may differ across ranks, may be 0).
        key_dim, value_dim: Dk, Dv.
        k:         slots read per query.
        num_heads: Hm; queries may have any H divisible by Hm.
        group:     the process group (default: the world).
        queries:   "replicated" (every rank reads the same queries) or "sharded" (each rank its own
                   batch), as in :func:`sharded_topk_memory_read`.
        scale:     score scale (default Dk ** -0.5).
        seed:      the initial memory (:func:`seeded_memory`), the same on every rank: each rank
                   draws its own slots, and the shards together are the memory a single process
                   draws whole with the same seed.
        check:     the cross-rank argument check of each read.
        backend:   the backend of the local selection.

    ``forward(q (B, H, T, Dk), valid_len=None) -> MemoryRead`` with global slot ids.

    Keep its parameters out of DDP's gradient averaging: ``exclude_from_ddp(model)`` before
    wrapping ``model`` in ``DistributedDataParallel``.

    Example:
        memory = ShardedTopKMemory(16384, 64, 64, k=32, num_heads=8)   # this rank's 16384 slots
        read = memory(q)                                                # q (B, 8, T, 64)
    """

    # The parameters that hold this rank's shard (left out of DDP: exclude_from_ddp).
    SHARDED_PARAMETERS = ("keys", "values")

    def __init__(self, num_slots_local: int, key_dim: int, value_dim: int, k: int, *, num_heads: int = 1,
                 group=None, queries: str = "replicated", scale: Optional[float] = None, seed: int = 0,
                 check: bool = True, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if num_slots_local < 0 or min(key_dim, value_dim, k, num_heads) < 1:
            raise ValueError("num_slots_local >= 0 and key_dim, value_dim, k, num_heads >= 1 expected, got "
                             f"{num_slots_local}, {key_dim}, {value_dim}, {k}, {num_heads}")
        if queries not in QUERY_LAYOUTS:
            raise ValueError(f"queries: expected one of {QUERY_LAYOUTS}, got {queries!r}")
        self.key_dim, self.value_dim, self.k, self.num_heads = key_dim, value_dim, k, num_heads
        self.group, self.queries, self.scale, self.seed = group, queries, scale, seed
        self.check, self.backend = check, backend
        device = torch.device("cpu") if device is None else torch.device(device)
        # The group's shard sizes (a collective), checked like a read's arguments.
        self.layout: ShardLayout = _meta.exchange("ShardedTopKMemory", group, device, num_slots_local,
                                                  (), {}, None, False)[0]
        factory = dict(device=device, dtype=dtype)
        self.keys = nn.Parameter(torch.empty(num_heads, num_slots_local, key_dim, **factory))
        self.values = nn.Parameter(torch.empty(num_heads, num_slots_local, value_dim, **factory))
        self.reset_parameters()

    @property
    def num_slots(self) -> int:
        """N, the slots of every rank together."""
        return self.layout.total

    @property
    def offset(self) -> int:
        """The global id of this rank's first slot."""
        return self.layout.offset

    def reset_parameters(self) -> None:
        """This rank's slots of :func:`seeded_memory` of ``seed``."""
        keys, values = seeded_memory(self.num_slots, self.key_dim, self.value_dim, self.num_heads,
                                     seed=self.seed, start=self.offset, count=self.layout.size)
        with torch.no_grad():
            self.keys.copy_(keys)
            self.values.copy_(values)

    @classmethod
    def from_full(cls, keys: Tensor, values: Tensor, k: int, *, sizes: Optional[Sequence[int]] = None,
                  group=None, **kwargs) -> "ShardedTopKMemory":
        """The module holding this rank's slots of the whole memory ``keys (Hm, N, Dk)``, ``values
        (Hm, N, Dv)`` (the same on every rank), split by ``sizes`` (default :func:`shard_sizes`);
        ``kwargs``: the constructor's."""
        if keys.dim() != 3 or values.dim() != 3 or keys.shape[:2] != values.shape[:2]:
            raise ValueError(f"keys, values: expected (Hm, N, Dk) and (Hm, N, Dv), got {tuple(keys.shape)} "
                             f"and {tuple(values.shape)}")
        key_shard = shard_of(keys, sizes=sizes, group=group)
        memory = cls(key_shard.shape[1], keys.shape[2], values.shape[2], k, num_heads=keys.shape[0],
                     group=group, device=keys.device, dtype=keys.dtype, **kwargs)
        with torch.no_grad():
            memory.keys.copy_(key_shard)
            memory.values.copy_(shard_of(values, sizes=sizes, group=group))
        return memory

    def forward(self, q: Tensor, valid_len: Optional[Tensor] = None) -> MemoryRead:
        """The exact read of the whole memory for ``q (B, H, T, Dk)``: see
        :func:`sharded_topk_memory_read`."""
        return sharded_topk_memory_read(q, self.keys, self.values, self.k, group=self.group,
                                        queries=self.queries, scale=self.scale, valid_len=valid_len,
                                        check=self.check, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"slots {self.offset}..{self.offset + self.layout.size} of {self.num_slots}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, k={self.k}, "
                f"num_heads={self.num_heads}, queries={self.queries!r}")


def seeded_value_rows(seed: int, start: int, count: int, value_dim: int, *, columns=None, dtype=None,
                      device=None) -> Tensor:
    """Rows ``[start, start + count)`` of the initial values of ``seed``, ``(count, Dv)`` ~ N(0, 1 / Dv)
    (or their ``columns``, a ``slice``), drawn in chunks of ``INIT_CHUNK`` rows, chunk ``c`` from its
    own generator (seeded with ``seed`` and ``c``): a row depends only on ``seed`` and its slot id,
    so the shards of every rank concatenate to the values drawn whole."""
    first, last = start // INIT_CHUNK, -(-(start + count) // INIT_CHUNK)
    columns = slice(None) if columns is None else columns
    chunks = [torch.randn(INIT_CHUNK, value_dim, generator=_chunk_generator(seed, chunk))[:, columns]
              for chunk in range(first, last)]
    width = len(range(value_dim)[columns])
    rows = torch.cat(chunks, 0) if chunks else torch.empty(0, width)
    rows = rows[start - first * INIT_CHUNK:start - first * INIT_CHUNK + count] * value_dim ** -0.5
    return rows.to(dtype=dtype or torch.get_default_dtype(), device=device).contiguous()


class ShardedProductKeyMemory(ProductKeyMemory):
    """:class:`~l2m_kernels.modules.ProductKeyMemory` with its values split across ``group``, read
    exactly with :func:`sharded_product_key_read`: with ``queries="replicated"`` every rank of the
    group runs the same tokens (a tensor-parallel group); with ``queries="sharded"`` each rank runs
    its own batch (data parallel; the batches must have one shape) and reads every rank's values.

    The query projection, its normalisation, the sub-keys and the output projections are replicated
    (the same on every rank, drawn from ``seed``); ``values`` holds this rank's shard:
    ``shard="rows"``: ``(N_r, value_dim)``, the slots ``[offset, offset + N_r)`` of the ``n_sub ** 2``;
    ``shard="columns"``: ``(n_sub ** 2, Dv_r)``, the value features ``[offset, offset + Dv_r)``. The
    shard sizes (``local_size``: N_r or Dv_r) may differ across ranks and be 0; every rank
    constructs and calls the module together.

    Args: those of :class:`~l2m_kernels.modules.ProductKeyMemory` (``sparse_grad``: the values
    shard's gradient is sparse), and
        local_size: N_r or Dv_r, this rank's share.
        shard:      "rows" or "columns".
        queries:    "replicated" or "sharded", as above.
        group:      the process group (default: the world).
        seed:       the initial parameters, the same on every rank; the values' shards together are
                    the values a single process draws whole with the same seed
                    (:func:`seeded_value_rows`).
        check:      the cross-rank argument check of each read.

    ``exclude_from_ddp(model)`` leaves ``values`` out of DDP; the replicated parameters stay in it.

    Example:
        layer = ShardedProductKeyMemory(512, n_sub=1024, key_dim=256, local_size=1024 ** 2 // P)
    """

    SHARDED_PARAMETERS = ("values",)

    def __init__(self, dim: int, n_sub: int, key_dim: int, *, local_size: int, shard: str = "rows",
                 queries: str = "replicated", group=None, seed: int = 0, check: bool = True,
                 value_dim: Optional[int] = None, device=None, dtype=None, **kwargs):
        if shard not in SHARD_MODES:
            raise ValueError(f"shard: expected one of {SHARD_MODES}, got {shard!r}")
        if queries not in QUERY_LAYOUTS:
            raise ValueError(f"queries: expected one of {QUERY_LAYOUTS}, got {queries!r}")
        if local_size < 0:
            raise ValueError(f"local_size: expected >= 0, got {local_size}")
        # Built on the meta device (the full values are never allocated), then materialised.
        super().__init__(dim, n_sub, key_dim, value_dim=value_dim, device="meta", dtype=dtype, **kwargs)
        self.shard, self.queries_layout, self.group, self.seed, self.check = shard, queries, group, seed, check
        device = torch.device("cpu") if device is None else torch.device(device)
        self.layout: ShardLayout = _meta.exchange("ShardedProductKeyMemory", group, device, local_size,
                                                  (), {}, None, False)[0]
        total = n_sub * n_sub if shard == "rows" else self.value_dim
        if self.layout.total != total:
            raise ValueError(f"local_size: the ranks' shares sum to {self.layout.total} "
                             f"({list(self.layout.sizes)}), expected {total} "
                             f"({'n_sub ** 2 slots' if shard == 'rows' else 'value_dim features'})")
        shape = (local_size, self.value_dim) if shard == "rows" else (n_sub * n_sub, local_size)
        self.values = nn.Parameter(torch.empty(shape, device="meta", dtype=self.subkeys.dtype))
        self.to_empty(device=device)
        self.reset_parameters()

    @property
    def offset(self) -> int:
        """The first slot (rows) or value feature (columns) this rank holds."""
        return self.layout.offset

    def reset_parameters(self) -> None:
        """The replicated parameters from ``seed`` (the same on every rank), and this rank's share
        of the values of ``seed``."""
        if not hasattr(self, "layout"):  # ProductKeyMemory.__init__ on the meta device
            return
        # ProductKeyMemory.reset_parameters draws the values between the sub-keys and the
        # projections: drawing this rank's shard there (its size differs across ranks) would shift
        # the projections' draws, and the replicated parameters would differ across ranks (and the
        # read's q checksum check fail). It draws into an empty stand-in instead; the shard is
        # drawn below, from its own generators.
        shard = self._parameters["values"]
        self._parameters["values"] = nn.Parameter(shard.new_empty((0, shard.shape[1])), requires_grad=False)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                super().reset_parameters()
        finally:
            self._parameters["values"] = shard
        if self.shard == "rows":
            rows = seeded_value_rows(self.seed, self.offset, self.layout.size, self.value_dim)
        else:
            rows = seeded_value_rows(self.seed, 0, self.n_sub * self.n_sub, self.value_dim,
                                     columns=slice(self.offset, self.offset + self.layout.size))
        with torch.no_grad():
            self.values.copy_(rows)

    @classmethod
    def from_full(cls, memory: ProductKeyMemory, *, shard: str = "rows", sizes: Optional[Sequence[int]] = None,
                  group=None, **kwargs) -> "ShardedProductKeyMemory":
        """The module holding this rank's share of ``memory``'s values (the same memory on every
        rank), split by ``sizes`` (default :func:`shard_sizes`), with its other parameters copied."""
        dim = -2 if shard == "rows" else -1
        values = shard_of(memory.values.detach(), sizes=sizes, group=group, dim=dim)
        sharded = cls(memory.dim, memory.n_sub, memory.key_dim, local_size=values.shape[dim], shard=shard,
                      group=group, value_dim=memory.value_dim, heads=memory.heads, k=memory.k,
                      k_sub=memory.k_sub, gated=memory.gated, sparse_grad=memory.sparse_grad,
                      backend=memory.backend,
                      device=memory.values.device, dtype=memory.values.dtype, **kwargs)
        state = {name: tensor for name, tensor in memory.state_dict().items() if name != "values"}
        state["values"] = values
        sharded.load_state_dict(state)
        return sharded

    def read(self, x: Tensor, *, deterministic: bool = False) -> MemoryRead:
        """:meth:`ProductKeyMemory.read` over the values of every rank."""
        return sharded_product_key_read(self.queries(x), self.subkeys, self.values, self.k, k_sub=self.k_sub,
                                        group=self.group, shard=self.shard, queries=self.queries_layout,
                                        scale=(self.key_dim // 2) ** -0.5, sum_heads=True, check=self.check,
                                        backend=self.backend, deterministic=deterministic,
                                        sparse_grad=self.sparse_grad)

    def extra_repr(self) -> str:
        what = "slots" if self.shard == "rows" else "value features"
        return (f"{super().extra_repr()}, {what} {self.offset}..{self.offset + self.layout.size} "
                f"of {self.layout.total}, queries={self.queries_layout!r}")


def ddp_ignored_parameters(model: nn.Module) -> List[str]:
    """The names, in ``model.named_parameters()``, of the sharded parameters (``SHARDED_PARAMETERS``)
    of every :class:`ShardedTopKMemory` and :class:`ShardedProductKeyMemory` inside ``model``."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            for name in getattr(module, "SHARDED_PARAMETERS", ())
            if isinstance(module, (ShardedTopKMemory, ShardedProductKeyMemory))]


def exclude_from_ddp(model: nn.Module) -> List[str]:
    """Keep the shards of every :class:`ShardedTopKMemory` and :class:`ShardedProductKeyMemory` of
    ``model`` out of ``DistributedDataParallel``: call it before wrapping ``model``. DDP then neither
    broadcasts these shards from rank 0, nor checks that their shapes agree, nor averages their
    gradients. Returns the names left out.

    A memory must be a submodule, not ``model`` itself (DDP matches the ignored names with their
    module's prefix, which the root module lacks).

    Equivalent PyTorch:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, ddp_ignored_parameters(model))
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (ShardedTopKMemory, ShardedProductKeyMemory)):
        raise ValueError(f"model: a {type(model).__name__} itself cannot be left out of the DDP that wraps "
                         "it; make it a submodule of the wrapped model, or do not wrap it in DDP")
    names = ddp_ignored_parameters(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def sharded_parameters(model: nn.Module) -> Set[nn.Parameter]:
    """The sharded parameters (``SHARDED_PARAMETERS``) of every :class:`ShardedTopKMemory` and
    :class:`ShardedProductKeyMemory` inside ``model``: FSDP2's ``ignored_params``.

    Example (torch >= 2.7, whose ``fully_shard`` takes ``ignored_params``):
        fully_shard(model, ignored_params=sharded_parameters(model))
    shards and averages every other parameter (the memories' replicated ones included) and leaves
    the memory shards as they are, their gradients summed by the sharded read itself.
    """
    params = dict(model.named_parameters())
    return {params[name] for name in ddp_ignored_parameters(model)}
