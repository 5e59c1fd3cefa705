"""The collectives the sharded ops share, over a batch dimension split across the ranks.

Each takes the group and its layout (:class:`~l2m_kernels.distributed._meta.ShardLayout`: rank,
world size); the tensors are the same shape on every rank, and "batch" is dim 0.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ._meta import ShardLayout


def all_gather_batch(tensor: Tensor, group, layout: ShardLayout) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order: ``(P·B, ...)``."""
    parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
             for _ in range(layout.world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, 0)


def reduce_scatter_batch(tensor: Tensor, group, layout: ShardLayout) -> Tensor:
    """This rank's slice ``[r·B, (r + 1)·B)`` of the sum of every rank's ``(P·B, ...)`` tensor."""
    pieces = split_batch(tensor, layout)
    mine = torch.empty_like(pieces[0], memory_format=torch.contiguous_format)
    dist.reduce_scatter(mine, [piece.contiguous() for piece in pieces], group=group)
    return mine


def own_slice(tensor: Tensor, layout: ShardLayout) -> Tensor:
    """This rank's slice ``[r·B, (r + 1)·B)`` of a ``(P·B, ...)`` tensor."""
    batch = tensor.shape[0] // layout.world_size
    return tensor[layout.rank * batch:(layout.rank + 1) * batch]


def split_batch(tensor: Tensor, layout: ShardLayout) -> List[Tensor]:
    """A ``(P·B, ...)`` tensor as its P slices ``(B, ...)``, in rank order."""
    return list(tensor.reshape(layout.world_size, tensor.shape[0] // layout.world_size,
                               *tensor.shape[1:]).unbind(0))


def all_to_all_pieces(pieces: Sequence[Tensor], width: int, group, layout: ShardLayout) -> List[Tensor]:
    """Send ``pieces[s]`` to rank s and receive rank s's piece for this rank, for every s, in one
    ``all_to_all_single``. The pieces have one shape but for the last dimension; they travel padded
    to ``width`` (the same on every rank) and come back padded: the caller cuts each received piece
    to the width its sender gave it."""
    padded = torch.stack([torch.nn.functional.pad(piece, (0, width - piece.shape[-1]))
                          for piece in pieces]).contiguous()
    received = torch.empty_like(padded)
    dist.all_to_all_single(received, padded, group=group)
    return list(received.unbind(0))


def pack_entries(weights: Tensor, ids: Tensor, wide_ids: bool) -> Tensor:
    """``weights (..., k)`` float and ``ids (..., k)`` int64 as int32 words ``(..., w·k + i·k)``
    (the weights' bits, then the ids: one int32 word each, two with ``wide_ids``), for one
    collective of both."""
    id_words = ids.to(torch.int64).contiguous().view(torch.int32) if wide_ids else ids.to(torch.int32)
    return torch.cat([weights.contiguous().view(torch.int32), id_words], -1)


def unpack_entries(packed: Tensor, dtype: torch.dtype, k: int, wide_ids: bool):
    """The inverse of :func:`pack_entries`: ``(weights (..., k) dtype, ids (..., k) int64)``."""
    weight_words = k * (torch.empty((), dtype=dtype).element_size() // 4)
    # Fresh row-major copies: viewing int32 words as wider types needs aligned, even strides.
    weights = packed[..., :weight_words].clone(memory_format=torch.contiguous_format).view(dtype)
    ids = packed[..., weight_words:].clone(memory_format=torch.contiguous_format)
    return weights, ids.view(torch.int64) if wide_ids else ids.to(torch.int64)
