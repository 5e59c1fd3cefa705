"""The host-side plans and scratch of the product-key read's GPU backends (triton, cuda), made with
torch ops on the device without a host synchronisation; neither backend's kernels are imported here.

- :func:`half_scratch`: the forward's buffers between its half selection and its candidate top-k.
- :func:`subkey_segments`, :func:`value_segments`: the deterministic backward's grouping of the
  entries by the gradient row they add to, for the segment-sum kernel, which sums each row's
  entries in the order given (no float atomics)::

      dst[s] = scale * sum_{e in run s} coef[entry_coef[e]] * src[entry_src[e]]

Within a run the entries keep their (b, h, t, j) order.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from .._common import key_runs


def half_scratch(q: Tensor, k_sub: int) -> Tuple[Tensor, Tensor]:
    """The forward's scratch for ``q (B, H, T, Dk)``: each query row's ``k_sub`` best sub-keys of
    both halves, sorted, as scores ``(B*H*T, 2, k_sub)`` float32 and sub-key ids ``(B*H*T, 2, k_sub)``
    int32 (written by the half selection, read by the candidate top-k)."""
    rows = q.shape[:-1].numel()
    return (torch.empty((rows, 2, k_sub), dtype=torch.float32, device=q.device),
            torch.empty((rows, 2, k_sub), dtype=torch.int32, device=q.device))


class Segments(NamedTuple):
    """Entries grouped by destination row, for ``num_rows`` rows.

    entry_coef: (X,) int64, each grouped entry's coefficient index (into ``ds`` or ``weights``,
                flat (B*H*T*k,)).
    entry_src:  (X,) int64, each grouped entry's source row (of ``src`` viewed as rows of the
                destination's width).
    run_starts: (num_rows + 1,) int64, row ``s``'s entries are ``[run_starts[s], run_starts[s + 1])``;
                entries of no row (indices outside ``[0, n_sub ** 2)``) lie after ``run_starts[-1]``.
    """
    entry_coef: Tensor
    entry_src: Tensor
    run_starts: Tensor


def _live_slots(indices: Tensor, num_slots: int) -> Tuple[Tensor, Tensor]:
    """``indices (B, H, T, k)`` as (B*H*T, k) and whether each entry is a slot in [0, num_slots)."""
    B, H, T, k = indices.shape
    flat = indices.reshape(B * H * T, k).to(torch.int64)
    return flat, (flat >= 0) & (flat < num_slots)


def subkey_segments(indices: Tensor, n_sub: int) -> Segments:
    """The sub-key gradient rows of ``indices (B, H, T, k)`` (int64 slots ``i * n_sub + j``): entry
    (row, m) adds ``scale * ds[row * k + m]`` times the first half of q's row to the sub-key row
    ``(h, 0, i)`` and times the second half to ``(h, 1, j)``. Rows: the ``H * 2 * n_sub`` rows of
    ``dsubkeys (H, 2, n_sub, Dk / 2)``; sources: the ``B*H*T*2`` rows of ``q`` viewed as
    ``(B*H*T*2, Dk / 2)``, ``row * 2 + half``.

    Equivalent Python (a host loop), per entry (row, m) and half, h = row // T % H:
        add ds[row * k + m] * q_halves[row * 2 + half] to dsubkeys row
            (h * 2 + half) * n_sub + (i if half == 0 else j)
    """
    _, H, T, k = indices.shape
    flat, live = _live_slots(indices, n_sub * n_sub)
    num_rows = H * 2 * n_sub
    head_base = (torch.arange(flat.shape[0], device=indices.device, dtype=torch.int64) // T % H)[:, None] * (2 * n_sub)
    first = torch.where(live, head_base + flat // n_sub, num_rows)
    second = torch.where(live, head_base + n_sub + flat % n_sub, num_rows)
    # Entry (row, m, half) at position (row * k + m) * 2 + half.
    order, run_starts = key_runs(torch.stack((first, second), dim=2).reshape(-1), num_rows)
    entry_coef = order // 2
    return Segments(entry_coef, entry_coef // k * 2 + order % 2, run_starts)


def value_segments(indices: Tensor, num_slots: int, sum_heads: bool) -> Segments:
    """The value gradient rows of ``indices (B, H, T, k)``: entry (row, m) adds ``weights[row * k + m]``
    times dout's row to the slot ``indices[row, m]`` of ``dvalues (num_slots, Dv)``. Sources: the
    rows of ``dout`` viewed as (B*H*T, Dv), or with ``sum_heads`` (B*T, Dv) (every head of (b, t)
    reads row ``b * T + t``).

    Equivalent Python (a host loop), per entry (row, m) with row = (b * H + h) * T + t:
        add weights[row * k + m] * dout_rows[b * T + t if sum_heads else row] to dvalues
            row indices[row, m]
    """
    _, H, T, k = indices.shape
    flat, live = _live_slots(indices, num_slots)
    order, run_starts = key_runs(torch.where(live, flat, num_slots).reshape(-1), num_slots)
    row = order // k
    return Segments(order, row // (H * T) * T + row % T if sum_heads else row, run_starts)
