"""Argument checks of ``block_topk`` and ``block_read``, shared by the public functions and the raw
custom ops.

:func:`check_topk_args` and :func:`check_read_args` check ranks, shapes, dtypes, devices and the
static arguments and pick the backend; they read only shapes, so they also run on fake tensors
while ``torch.compile`` traces. :func:`check_read_values` reads ``indices`` (every block id in
``[0, NB)``), so it runs where the values exist: in the custom op's implementation.
"""
from __future__ import annotations

import torch

from ... import _validation as v
from ...backends import select_backend
from ..topk_read.validate import resolve_scale


def _queries_and_heads(q, blocks, blocks_name: str, blocks_shape: str):
    """q (B, H, T, D) against a (B, Hk, NB, X, D) block tensor; returns (B, H, T, D, Hk, NB, X)."""
    v.require_ndim("q", q, (4,), "(B, H, T, D)")
    B, H, T, D = q.shape
    v.require_ndim(blocks_name, blocks, (5,), blocks_shape)
    v.require_shape(blocks_name, blocks, (B, None, None, None, D), blocks_shape)
    kv_heads = blocks.shape[1]
    if kv_heads == 0 or H % kv_heads != 0:
        raise ValueError(f"{blocks_name}: the key-value head count Hk must divide H (grouped heads), got "
                         f"H={H}, Hk={kv_heads} (shape {tuple(blocks.shape)})")
    return B, H, T, D, kv_heads, blocks.shape[2], blocks.shape[3]


def _mask(name: str, mask, shape, expected: str):
    if mask is None:
        return None
    v.require_shape(name, mask, shape, expected)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}")
    return mask


def check_topk_args(q, reprs, k, repr_valid, scale, backend):
    """Returns ``(k, scale, backend name)``."""
    B, H, T, D, _, NB, R = _queries_and_heads(q, reprs, "reprs", "(B, Hk, NB, R, D)")
    v.require_same_dtype("q", q, reprs=reprs)
    k = v.require_int("k", k, 0, NB, f" (NB = {NB} blocks)")
    _mask("repr_valid", repr_valid, (B, NB, R), "(B, NB, R)")
    device = v.require_same_device(q=q, reprs=reprs, repr_valid=repr_valid)
    scale = resolve_scale(scale, D)
    return k, scale, select_backend("block_topk", device, q.dtype, backend)


def check_read_args(q, block_keys, block_values, indices, block_valid, scale, backend):
    """Returns ``(scale, backend name)``."""
    B, H, T, D, Hk, NB, S = _queries_and_heads(q, block_keys, "block_keys", "(B, Hk, NB, S, D)")
    v.require_ndim("block_values", block_values, (5,), "(B, Hk, NB, S, Dv)")
    v.require_shape("block_values", block_values, (B, Hk, NB, S, None), "(B, Hk, NB, S, Dv)")
    v.require_same_dtype("q", q, block_keys=block_keys, block_values=block_values)
    v.require_ndim("indices", indices, (3,), "(B, Hk, K)")
    v.require_shape("indices", indices, (B, Hk, None), "(B, Hk, K)")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices: expected dtype torch.int64, got {indices.dtype}")
    _mask("block_valid", block_valid, (B, NB, S), "(B, NB, S)")
    device = v.require_same_device(q=q, block_keys=block_keys, block_values=block_values, indices=indices,
                                   block_valid=block_valid)
    scale = resolve_scale(scale, D)
    return scale, select_backend("block_read", device, q.dtype, backend)


def check_read_values(block_keys, indices) -> None:
    """Every block id in ``[0, NB)`` (reads the values: not while tracing or capturing a CUDA graph)."""
    if not indices.numel() or not v.values_readable(indices):
        return
    low, high = torch.stack(torch.aminmax(indices)).tolist()  # one device sync
    NB = block_keys.shape[2]
    if low < 0 or high >= NB:
        raise IndexError(f"indices: expected block ids in [0, NB) = [0, {NB}), got values in [{low}, {high}]")
