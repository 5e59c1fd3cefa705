"""Output allocation for every fused launcher.

All fused paths allocate their outputs through :func:`empty`, so the test suite can switch on
poisoning (outputs pre-filled with NaN, integer outputs with a sentinel) and catch any element a
kernel forgets to write.

Large CPU outputs come from a small cache of buffers (:class:`BufferCache`): the CPU allocator
keeps no freed memory above glibc's largest mmap threshold (32 MiB), so without it every call maps
its large outputs afresh and the kernel page-faults them in as it writes (the dense values gradient
of a product-key memory, hundreds of MB per training step). A cached buffer is handed out again only
once nothing but the cache holds its storage: the storage's use count and the Python references to
its storage object say so. Everything else, and every output on another device, is exactly
``torch.empty``. While the cache is on, the cpu kernels write their large float32 outputs with
streaming stores (:func:`stream_stores_wanted`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Optional

import torch

_POISON = False
_INT_SENTINEL = -(2**31) + 7  # unlikely to be a legitimate index or count

_MIB = 2**20
CACHED_MIN_BYTES = 32 * _MIB  # glibc's largest mmap threshold: smaller blocks stay in its heap
DEFAULT_CACHE_LIMIT = 4 * 2**30
_GRANULE = 2 * _MIB  # buffers are rounded up to 2 MiB (and by 1/8, below) to serve sizes that vary


class BufferCache:
    """Large CPU buffers kept between calls, like CUDA's caching allocator, for the CPU.

    - A request of ``nbytes >= min_bytes`` (default ``CACHED_MIN_BYTES``) takes the smallest held
      buffer that nothing else references (its storage's use count and Python references back to
      the cache's own) and whose size is ``nbytes`` to ``2 * nbytes`` (or one 2 MiB granule);
      otherwise a new buffer of ``nbytes * 9 / 8`` rounded up to 2 MiB, so that sizes which vary
      a little from call to call (a sparse gradient's distinct rows) find it again. Pages no call
      has written are not resident: the slack costs address space until a larger request uses it.
    - The handed-out tensor is a plain tensor on the buffer's storage (no view, no ``_base``); it
      lives as long as the caller keeps it, and the buffer is not handed out again before then.
    - At most ``limit`` bytes are held: over it, unreferenced buffers go first (least recently
      used), and a new buffer that still does not fit is not kept. ``limit = 0`` turns caching off.
    - Off, and plain ``torch.empty``, when torch lacks ``torch._C._storage_Use_Count``, under a
      ``TorchDispatchMode`` (fake tensors, flop counters), or for another device.
    """

    def __init__(self, limit: int = DEFAULT_CACHE_LIMIT, min_bytes: int = CACHED_MIN_BYTES):
        self.limit, self.min_bytes = limit, min_bytes
        self._lock = threading.Lock()
        self._held: list = []  # [storage, its counts when idle, last use] (storage's bytes: its size)
        self._clock = 0
        self.hits = self.misses = 0
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)
        self._dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)

    @property
    def enabled(self) -> bool:
        """A limit above 0, and a torch that lets the cache tell whether a buffer is referenced."""
        return self.limit > 0 and self._use_count is not None and self._dispatch_depth is not None

    def usable(self, nbytes: int, device) -> bool:
        return (nbytes >= max(self.min_bytes, 1) and self.enabled and torch.device(device).type == "cpu"
                and self._dispatch_depth() == 0)

    def _counts(self, storage) -> tuple:
        # The storage's references from tensors (its use count), and from Python: a user's
        # ``t.untyped_storage()`` is this very object (torch keeps one Python object per storage),
        # which the use count does not see.
        return self._use_count(storage._cdata), sys.getrefcount(storage)

    def _idle(self, entry) -> bool:
        return self._counts(entry[0]) == entry[1]

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype`` on a cached buffer."""
        nbytes = _numel(shape) * dtype.itemsize
        with self._lock:
            self._clock += 1
            most = max(2 * nbytes, _GRANULE)
            fits = [e for e in self._held if nbytes <= e[0].nbytes() <= most and self._idle(e)]
            if fits:
                entry = min(fits, key=lambda e: e[0].nbytes())
                self.hits += 1
            else:
                entry = self._new(nbytes)
                self.misses += 1
            entry[2] = self._clock
            with torch.no_grad():
                return torch.empty((0,), dtype=dtype).set_(entry[0], 0, tuple(shape))

    def _new(self, nbytes: int) -> list:
        size = -(-(nbytes + nbytes // 8) // _GRANULE) * _GRANULE
        with torch.inference_mode(False):
            entry = [torch.UntypedStorage(size), None, 0]
        entry[1] = self._counts(entry[0])  # referenced by the cache alone (the same call as _idle's)
        held = sum(e[0].nbytes() for e in self._held)
        for old in sorted((e for e in self._held if self._idle(e)), key=lambda e: e[2]):
            if held + size <= self.limit:
                break
            self._held.remove(old)
            held -= old[0].nbytes()
        if held + size <= self.limit:
            self._held.append(entry)
        return entry

    def clear(self) -> None:
        """Drop every held buffer: those still in use live on with their tensors."""
        with self._lock:
            self._held.clear()

    def info(self) -> dict:
        with self._lock:
            idle = [e for e in self._held if self._idle(e)]
            return dict(held_bytes=sum(e[0].nbytes() for e in self._held),
                        idle_bytes=sum(e[0].nbytes() for e in idle), buffers=len(self._held),
                        hits=self.hits, misses=self.misses, limit=self.limit)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _limit_from_environment() -> int:
    text = os.environ.get("L2M_CPU_CACHE_LIMIT", "").strip()
    if not text:
        return DEFAULT_CACHE_LIMIT
    try:
        limit = int(text)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"L2M_CPU_CACHE_LIMIT must be a number of bytes >= 0 (0: no cache), got {text!r}")
    return limit


CACHE = BufferCache(_limit_from_environment())


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    if CACHE.usable(_numel(shape) * dtype.itemsize, device):
        tensor = CACHE.empty(shape, dtype)
    else:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        else:
            tensor.fill_(_INT_SENTINEL)
    return tensor


def empty_cache() -> None:
    """Release the large CPU buffers l2m-kernels keeps for its outputs between calls (those still
    referenced are freed when their last tensor goes), like ``torch.cuda.empty_cache``."""
    CACHE.clear()


def stream_stores_wanted() -> bool:
    """Whether the cpu kernels should write their large float32 outputs with streaming stores
    (csrc/cpu/convert.h): only while this cache keeps large outputs' pages mapped between calls.
    Into freshly mapped pages, which the page fault has just zeroed through the CPU caches, a
    streaming store first evicts the zeroed line, and plain stores are faster."""
    return CACHE.enabled


def set_cache_limit(nbytes: int) -> int:
    """Hold at most ``nbytes`` of cached CPU output buffers (default 4 GiB, or
    ``L2M_CPU_CACHE_LIMIT`` bytes; 0 turns the cache off and releases it). Returns the previous
    limit."""
    if nbytes < 0:
        raise ValueError(f"set_cache_limit: nbytes must be >= 0, got {nbytes}")
    previous, CACHE.limit = CACHE.limit, int(nbytes)
    if nbytes == 0:
        CACHE.clear()
    from . import _ext

    _ext._sync_stream_stores()
    return previous


def cache_info() -> dict:
    """The CPU output cache: ``held_bytes``, ``idle_bytes`` (not referenced outside the cache),
    ``buffers``, ``hits``, ``misses`` and ``limit``."""
    return CACHE.info()


@contextlib.contextmanager
def cache_limit(nbytes: Optional[int]):
    """:func:`set_cache_limit` for the duration of the block (``None``: unchanged)."""
    if nbytes is None:
        yield
        return
    previous = set_cache_limit(nbytes)
    try:
        yield
    finally:
        set_cache_limit(previous)


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Fill every output buffer a fused launcher allocates with NaN (ints: a sentinel)."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous
