"""Output allocation for every fused launcher.

All fused paths allocate their outputs through :func:`empty`, so the test suite can switch on
poisoning (outputs pre-filled with NaN, integer outputs with a sentinel) and catch any element a
kernel forgets to write. In normal use this is exactly ``torch.empty``.
"""
from __future__ import annotations

import contextlib

import torch

_POISON = False
_INT_SENTINEL = -(2**31) + 7  # unlikely to be a legitimate index or count


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        else:
            tensor.fill_(_INT_SENTINEL)
    return tensor


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Fill every output buffer a fused launcher allocates with NaN (ints: a sentinel)."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous
