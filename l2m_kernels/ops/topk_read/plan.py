"""The host-side plans of the top-k read's GPU backends (triton, cuda), made with torch ops on the
device without a host synchronisation; neither backend's kernels are imported here.

- :func:`slot_runs`: the deterministic backward's grouping of the entries by slot, for the kernel
  that sums each slot's gradient over its entries in a fixed order (no float atomics).
- :func:`threshold_tau`: the forward's threshold from each row's chunk maxima of the int64 sort
  keys (``triton``'s ``threshold`` path and the ``cuda`` pre-pass): a lower bound on the row's
  k-th best key, below which the selection merges nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._common import key_runs


class SlotRuns(NamedTuple):
    """The entries of ``indices (B, H, T, k)`` grouped by slot, E = B * H * T * k, over the
    ``M * N`` slots of the M memories (M = Hm shared, else B * Hm).

    entry_order: (E,) int64, the flat entry ids ``row * k + j`` sorted stably by
                 ``memory * N + slot``; entries outside ``[0, N)`` (e.g. -1) last.
    entry_rows:  (E,) int64, ``entry_order // k``: each sorted entry's query row (b, h, t).
    run_starts:  (M * N + 1,) int64, ``entry_order[run_starts[s] : run_starts[s + 1]]`` are the
                 entries of slot ``s = memory * N + slot``.
    """
    entry_order: Tensor
    entry_rows: Tensor
    run_starts: Tensor


def slot_runs(indices: Tensor, mem_heads: int, num_slots: int, shared: bool) -> SlotRuns:
    """Group the entries of ``indices (B, H, T, k)`` (int64 slots; outside ``[0, num_slots)``: no
    contribution) by slot; query head h reads memory head ``h // (H // mem_heads)``, of batch
    element b unless the memories are ``shared`` (``(Hm, N, D)``, read by every batch element).

    Equivalent Python (a host loop):
        memory(b, h) = (0 if shared else b * Hm) + h // (H // Hm)
        key(b, h, t, j) = memory(b, h) * N + indices[b, h, t, j], or M * N outside [0, N)
        entry_order, run_starts = the stable grouping of the entries by key (_common.key_runs)
    """
    B, H, T, k = indices.shape
    rows = B * H * T
    device = indices.device
    # The (H // Hm) * T query rows of one (b, memory head) are contiguous.
    memory = torch.arange(rows, device=device, dtype=torch.int64) // ((H // mem_heads) * T)
    memories = mem_heads if shared else B * mem_heads
    if shared:
        memory = memory % mem_heads
    flat = indices.reshape(rows, k)
    live = (flat >= 0) & (flat < num_slots)
    slot_key = torch.where(live, memory[:, None] * num_slots + flat, memories * num_slots).reshape(-1)
    entry_order, run_starts = key_runs(slot_key, memories * num_slots)
    return SlotRuns(entry_order, entry_order // k, run_starts)


def threshold_tau(chunk_max: Tensor, k: int) -> Tensor:
    """Each row's k-th largest chunk maximum: ``chunk_max (.., n_chunks)`` int64 sort keys with
    ``n_chunks >= k`` -> ``tau (..,)`` int64, contiguous.

    Exactly k chunks of a row have a maximum >= tau (the keys of a row are distinct), so the row's
    k best keys are all >= tau. Chunks without an existing slot hold INT64_MIN: when fewer than k
    chunks have one, tau is INT64_MIN (no bound).

    Equivalent PyTorch:
        tau = chunk_max.sort(-1, descending=True).values[..., k - 1]
    """
    return torch.topk(chunk_max, k, dim=-1).values[..., k - 1].contiguous()
