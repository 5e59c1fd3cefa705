"""``nn.Module`` wrappers that own memory state and parameters (SPEC section 6)."""
from .memory_attention import AttentionOutput, MemoryAttention
from .product_key_memory import ProductKeyMemory
from .topk_memory import MemoryWriter, TopKMemory

__all__ = ["AttentionOutput", "MemoryAttention", "MemoryWriter", "ProductKeyMemory", "TopKMemory"]
