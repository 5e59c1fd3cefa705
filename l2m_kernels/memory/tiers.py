"""Storage tiers of a :class:`~l2m_kernels.memory.MemoryStore`.

A tier is one allocation per stored array (keys, values and their scales), holding ``places``
blocks of ``block_size`` entries for every memory head: array ``(Hm, places * block_size, ...)``.
The store's block table says which tier and place each block of slots lives in.

Kinds:
- ``"device"``: memory of the store's device (the fast tier);
- ``"host"``: host memory, pinned when the store's device is a CUDA device (so its blocks copy to
  the device asynchronously); on a CPU store it is the same memory as ``"device"``;
- ``"disk"``: a file per array, memory-mapped (``torch.from_file(shared=True)``): the operating
  system pages blocks in when a read gathers them, and writes them back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

TIER_KINDS = ("device", "host", "disk")


@dataclass(frozen=True)
class TierSpec:
    """A tier's kind and the number of entries it holds (a multiple of the block size; ``None``:
    what the store's capacity leaves after the other tiers)."""

    kind: str
    capacity: Optional[int] = None


def parse_tiers(tiers, capacity: int, block_size: int) -> list[TierSpec]:
    """Normalise the ``tiers`` option: ``"device"``, ``("device", "disk")``, or pairs
    ``(kind, entries)``; exactly one tier may leave its capacity open (the last one by default)."""
    if isinstance(tiers, (str, TierSpec)):
        tiers = (tiers,)
    specs = []
    for item in tiers:
        if isinstance(item, TierSpec):
            spec = item
        elif isinstance(item, str):
            spec = TierSpec(item)
        else:
            kind, entries = item
            spec = TierSpec(kind, None if entries is None else int(entries))
        if spec.kind not in TIER_KINDS:
            raise ValueError(f"tiers: unknown kind {spec.kind!r}; expected one of {TIER_KINDS}")
        if spec.capacity is not None and (spec.capacity < 0 or spec.capacity % block_size):
            raise ValueError(f"tiers: a tier's capacity must be a non-negative multiple of "
                             f"block_size={block_size}, got {spec.capacity} for {spec.kind!r}")
        specs.append(spec)
    if not specs:
        raise ValueError("tiers: at least one tier is needed")
    open_ = [i for i, s in enumerate(specs) if s.capacity is None]
    if len(open_) > 1:
        raise ValueError("tiers: at most one tier may leave its capacity open (None)")
    fixed = sum(s.capacity for s in specs if s.capacity is not None)
    if open_:
        rest = capacity - fixed
        if rest < 0:
            raise ValueError(f"tiers: the fixed tier capacities ({fixed}) exceed capacity={capacity}")
        specs[open_[0]] = TierSpec(specs[open_[0]].kind, rest)
    elif fixed != capacity:
        raise ValueError(f"tiers: the tier capacities add up to {fixed}, not capacity={capacity}")
    return specs


class Tier:
    """The arrays of one tier: ``arrays[name]`` is ``(Hm, places * block_size, *tail)``.

    ``layout`` maps each array's name to ``(dtype, tail)`` or ``(dtype, tail, kind)``: an array
    may live on another kind than its tier (e.g. the float copies of int8 keys on disk)."""

    def __init__(self, kind: str, places: int, block_size: int, heads: int,
                 layout: Dict[str, tuple], device: torch.device, directory: Optional[str]):
        self.kind, self.places, self.block_size = kind, places, block_size
        rows = places * block_size
        self.arrays: Dict[str, torch.Tensor] = {}
        self.files: Dict[str, str] = {}
        for name, entry in layout.items():
            dtype, tail = entry[0], entry[1]
            where = entry[2] if len(entry) > 2 and entry[2] is not None else kind
            shape = (heads, rows) + tuple(tail)
            if where == "disk":
                if directory is None:
                    raise ValueError("a disk tier needs a directory")
                path = os.path.join(directory, f"{name}.bin")
                numel = 1
                for size in shape:
                    numel *= size
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
                with open(path, "wb") as handle:  # a sparse file of zeros
                    handle.truncate(nbytes)
                raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
                self.arrays[name] = raw.view(dtype).view(shape)
                self.files[name] = path
            elif where == "host":
                self.arrays[name] = torch.zeros(shape, dtype=dtype,
                                                pin_memory=device.type == "cuda")
            else:
                self.arrays[name] = torch.zeros(shape, dtype=dtype, device=device)

    def block_view(self, name: str) -> torch.Tensor:
        """``arrays[name]`` as ``(Hm, places, block_size, *tail)``."""
        array = self.arrays[name]
        return array.view(array.shape[0], self.places, self.block_size, *array.shape[2:])
