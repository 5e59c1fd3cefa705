"""Memory sharded across the ranks of a ``torch.distributed`` process group (SPEC section 9).

Each rank holds a contiguous range of the memory's slots (or, for the product-key read, of its
value features); the reads are exact (the result of the single-device op on the concatenated
memory, with global slot ids) and exchange ``O(P x k + Dv)`` numbers per query, never the memory;
the writes apply, on each rank, those that fall in its slots.
Guide: ``docs/distributed.md``.

Imported on demand (``import l2m_kernels.distributed``), not by ``import l2m_kernels``.
"""
from __future__ import annotations

from .module import (INIT_CHUNK, ShardedProductKeyMemory, ShardedTopKMemory, ddp_ignored_parameters,
                     exclude_from_ddp, seeded_memory, seeded_value_rows, shard_of, shard_sizes,
                     sharded_parameters)
from .product_key import sharded_product_key_read
from .topk import sharded_topk_memory_read
from .traffic import collective_bytes
from .write import sharded_gated_memory_write

__all__ = ["sharded_topk_memory_read", "sharded_product_key_read", "sharded_gated_memory_write", "ShardedTopKMemory",
           "ShardedProductKeyMemory", "seeded_value_rows",
           "exclude_from_ddp", "ddp_ignored_parameters", "sharded_parameters", "shard_of", "shard_sizes", "seeded_memory",
           "collective_bytes"]
