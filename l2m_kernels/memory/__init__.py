"""Large memories: :class:`MemoryStore`, a key-value memory with storage tiers (device, host,
memory-mapped disk), compressed storage (int8 keys, int8 / float8 values), exact and two-level
top-k reads, usage statistics, eviction and consolidation (docs/memory-store.md)."""
from ..ops._common import MemoryRead
from .formats import KEY_FORMATS, VALUE_FORMATS, key_score_error_bound
from .store import EVICTION_POLICIES, MemoryStore
from .tiers import TIER_KINDS, TierSpec

__all__ = ["MemoryStore", "MemoryRead", "TierSpec", "KEY_FORMATS", "VALUE_FORMATS", "TIER_KINDS",
           "EVICTION_POLICIES", "key_score_error_bound"]
