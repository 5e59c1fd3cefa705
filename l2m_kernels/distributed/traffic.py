"""Counting what the sharded ops send: the buffer bytes of every collective they call."""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
import torch.distributed as dist

# Collective -> the bytes of its buffer: the all-gathers' output (what every rank receives), the
# all-reduce's tensor, the reduce-scatter's input list (the whole buffer being reduced), the
# all-to-all's output (what this rank receives).
_BUFFERS = {
    "all_gather": lambda output, tensor, *a, **k: sum(_nbytes(t) for t in output),
    "all_gather_into_tensor": lambda output, tensor, *a, **k: _nbytes(output),
    "all_reduce": lambda tensor, *a, **k: _nbytes(tensor),
    "reduce_scatter": lambda output, inputs, *a, **k: sum(_nbytes(t) for t in inputs),
    "reduce_scatter_tensor": lambda output, tensor, *a, **k: _nbytes(tensor),
    "all_to_all": lambda outputs, inputs, *a, **k: sum(_nbytes(t) for t in outputs),
    "all_to_all_single": lambda output, tensor, *a, **k: _nbytes(output),
    "broadcast": lambda tensor, *a, **k: _nbytes(tensor),
}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextlib.contextmanager
def collective_bytes() -> Iterator[Counter]:
    """Within the block, count per collective of ``torch.distributed`` the bytes of its buffer
    (an all-gather's output, an all-reduce's tensor, a reduce-scatter's whole input; per rank).

    Yields a ``Counter`` ``{collective name: bytes}``, filled as the block runs. It replaces the
    functions of ``torch.distributed`` for the duration of the block (in this process only), so
    it counts every caller's collectives, not only the sharded ops'.

    Example:
        with collective_bytes() as sent:
            sharded_topk_memory_read(q, keys, values, k=32)
        sent["all_gather"], sent["all_reduce"]
    """
    counts: Counter = Counter()
    originals = {name: getattr(dist, name) for name in _BUFFERS if hasattr(dist, name)}

    def counted(name, original):
        def call(*args, **kwargs):
            counts[name] += _BUFFERS[name](*args, **kwargs)
            return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(dist, name, counted(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
