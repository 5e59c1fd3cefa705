"""l2m-kernels: fused kernels for Large Memory Models (sparse memory reads, gated writes, merging).

Every op is a plain function here and a custom op under ``torch.ops.l2m``; each op's contract is in
the repository's ``docs/ops/<name>.md`` (index ``docs/README.md``).
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._alloc import cache_info, empty_cache, set_cache_limit  # noqa: F401
from .backends import available_backends, select_backend  # noqa: F401
from .ops.merge import gated_merge, merge_attention  # noqa: F401
from .ops._common import MemoryAttention, MemoryRead  # noqa: F401,E402
from .ops.memory_attention import memory_attention  # noqa: F401,E402
from .ops.block_memory import BlockRead, BlockSelection, block_read, block_topk  # noqa: F401,E402
from .ops.memory_write import gated_dense_update, gated_memory_write  # noqa: F401,E402
from .ops.product_key import product_key_read  # noqa: F401,E402
from .ops.quantized_read import quantized_topk_read  # noqa: F401,E402
from .ops.topk_read import topk_memory_read  # noqa: F401,E402
from . import modules  # noqa: F401,E402

__all__ = [
    "topk_memory_read", "product_key_read", "gated_memory_write", "gated_dense_update",
    "merge_attention", "gated_merge", "memory_attention", "block_topk", "block_read", "quantized_topk_read", "MemoryRead",
    "MemoryAttention", "BlockSelection", "BlockRead",
    "available_backends", "select_backend", "empty_cache", "set_cache_limit", "cache_info",
]
