"""``nn.Module`` wrappers that own memory state and parameters (SPEC section 6)."""
from .topk_memory import TopKMemory

__all__ = ["TopKMemory"]
