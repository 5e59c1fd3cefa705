"""The write plan of the GPU backends: the ``(t, j)`` writes of every memory grouped by slot.

Each slot's writes compose into an affine chain ``m <- (1 - w * e) * m + w * add`` that only that slot
sees, so the GPU kernels give one program (or warp) to each touched slot and walk its chain in order:
no races, no atomics, deterministic by construction. This module builds that grouping with torch
ops on the device, without a host synchronisation (no data-dependent sizes): a stable sort of the
keys ``g * N + slot`` (skipped entries, ``-1``, sort last with the key ``G * N``) and, at the first
position of every run of one slot, the run's length.

The kernels launch one program per sorted position; a program whose ``run_length`` is 0 (not the
first write of its slot, or a skipped entry) exits at once, the others own their slot's run
``order[i : i + run_length[i]]``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class WritePlan(NamedTuple):
    """The writes of ``indices (G, P)`` (``P = T * kw``) grouped by ``(g, slot)``, E = G * P entries.

    order:      (E,) int64, entry ids ``e = g * P + t * kw + j`` sorted by ``(g, slot)``, stably
                (so in ``(t, j)`` order within a slot); skipped entries last.
    run_length: (E,) int32; at the first position of each slot's run its number of writes, else 0
                (also 0 for every skipped entry).
    """
    order: Tensor
    run_length: Tensor


def write_plan(indices: Tensor, num_slots: int) -> WritePlan:
    """Group the writes of ``indices (G, P)`` (int32 or int64 slot ids in ``[-1, num_slots)``).

    Equivalent PyTorch (with a host loop):
        key = torch.where(indices >= 0, g * num_slots + indices, G * num_slots).flatten()
        order = key.sort(stable=True).indices
        run_length[i] = number of equal keys from i on, where i starts a run of a valid key
    """
    groups, per_group = indices.shape
    device = indices.device
    count = groups * per_group
    if count == 0:
        return WritePlan(torch.empty(0, dtype=torch.int64, device=device),
                         torch.empty(0, dtype=torch.int32, device=device))
    slots = indices.to(torch.int64)
    group_base = torch.arange(groups, device=device, dtype=torch.int64)[:, None] * num_slots
    skipped_key = groups * num_slots
    key = torch.where(slots >= 0, group_base + slots, skipped_key).reshape(count)
    sorted_key, order = torch.sort(key, stable=True)
    valid = sorted_key < skipped_key
    starts = torch.ones(count, dtype=torch.bool, device=device)
    starts[1:] = sorted_key[1:] != sorted_key[:-1]
    heads = starts & valid
    # Run id of every position (a run is a maximal span of one key, skipped entries included), and
    # the number of positions per run, gathered back to each run's first position.
    run_id = torch.cumsum(starts.to(torch.int64), 0) - 1
    lengths = torch.zeros(count, dtype=torch.int64, device=device)
    lengths.scatter_add_(0, run_id, torch.ones_like(run_id))
    run_length = torch.where(heads, lengths[run_id], 0).to(torch.int32)
    return WritePlan(order, run_length)
