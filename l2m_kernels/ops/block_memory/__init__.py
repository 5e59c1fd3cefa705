"""Block memory reads: scoring and selecting blocks of past keys (``block_topk``) and attention
over the selected blocks with its log-sum-exp (``block_read``), the two steps of an InfLLM-style
memory (see ``reference.py`` for the semantics)."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .._common import autocast_promote, eager_call
from .function import block_read_eager, block_read_op, block_topk_eager, block_topk_op
from .reference import block_read_ref, block_topk_ref
from .validate import check_read_args, check_read_values, check_topk_args

__all__ = ["block_topk", "block_read", "block_topk_ref", "block_read_ref", "BlockSelection", "BlockRead"]


class BlockSelection(NamedTuple):
    """Result of :func:`block_topk`."""

    indices: Tensor
    scores: Tensor


class BlockRead(NamedTuple):
    """Result of :func:`block_read`."""

    out: Tensor
    lse: Tensor


def block_topk(q, reprs, k, *, repr_valid=None, scale=None, backend=None) -> BlockSelection:
    """Scores every memory block against a chunk of queries and selects the ``k`` best per (batch,
    key-value head).

    Args:
        q:          (B, H, T, D) queries (any strides with a contiguous last dimension are read in
                    place by the cpu backend); query head h belongs to key-value head h // (H // Hk).
        reprs:      (B, Hk, NB, R, D) the representative keys of each block, q's dtype: one per block
                    (R = 1, e.g. its mean key) or several (e.g. all S of its keys). The dimensions
                    before the last two may have any strides.
        k:          blocks selected, 0 <= k <= NB.
        repr_valid: optional (B, NB, R) bool: which representatives exist (padding does not).
        scale:      score scale, default D ** -0.5.
        backend:    None (automatic), "reference" or "cpu".

    Returns:
        BlockSelection(indices (B, Hk, k) int64 in increasing block order, scores (B, Hk, NB)
        float32; float64 for float64 input). No gradient flows through either.

        scores[b, g, n] = scale * sum over the query rows (h, t) of head group g of
        max over the valid r of q[b, h, t] . reprs[b, g, n, r]; -inf for a block with no valid
        representative. The selection takes the highest scores, NaN first, ties broken by the
        smaller block index.

    Equivalent PyTorch:
        rows = q.reshape(B, Hk, H // Hk * T, D)
        s = scale * torch.einsum("bgmd,bgnrd->bgmnr", rows, reprs)
        scores = s.masked_fill(~repr_valid[:, None, None], -inf).amax(-1).sum(2)
        indices = scores.topk(k).indices.sort(-1).values
    """
    q, reprs = autocast_promote(q, reprs)
    k, scale, name = check_topk_args(q, reprs, k, repr_valid, scale, backend)
    if name == "reference":
        return BlockSelection(*block_topk_ref(q, reprs, k, repr_valid, scale))
    if eager_call(*(t for t in (q, reprs, repr_valid) if t is not None)):
        return BlockSelection(*block_topk_eager(q, reprs, k, repr_valid, scale, name))
    return BlockSelection(*block_topk_op(q, reprs, k, repr_valid, scale, name))


def block_read(q, block_keys, block_values, indices, *, block_valid=None, scale=None, backend=None) -> BlockRead:
    """Attention of each query over the valid tokens of its key-value head's selected blocks, with
    the log-sum-exp that merges it exactly with attention over other keys
    (:func:`l2m_kernels.merge_attention`).

    Args:
        q:            (B, H, T, D) queries, H % Hk == 0.
        block_keys:   (B, Hk, NB, S, D) keys in blocks of S tokens, q's dtype; the dimensions before
                      the last two may have any strides (read in place by the cpu backend).
        block_values: (B, Hk, NB, S, Dv) values, likewise.
        indices:      (B, Hk, K) int64 block ids in [0, NB) read by every query of key-value head g;
                      K >= 0, a repeated id is read once per occurrence.
        block_valid:  optional (B, NB, S) bool: which tokens exist (padding does not).
        scale:        score scale, default D ** -0.5.
        backend:      None (automatic), "reference" or "cpu".

    Returns:
        BlockRead(out (B, H, T, Dv) in q's dtype, lse (B, H, T) float32; float64 for float64
        input). A query with no valid token to read gets out = 0 and lse = -inf.
        Differentiable in q, block_keys and block_values (dense gradients, zero at unread blocks).

    Equivalent PyTorch:
        keys = block_keys.gather(2, indices[..., None, None].expand(-1, -1, -1, S, D)).flatten(2, 3)
        values = block_values.gather(2, ...).flatten(2, 3)        # (B, Hk, K * S, .)
        s = scale * q.reshape(B, Hk, -1, D) @ keys.transpose(-1, -2)   # invalid tokens: -inf
        out = s.softmax(-1) @ values; lse = s.logsumexp(-1)          # reshaped to (B, H, T, .)
    """
    q, block_keys, block_values = autocast_promote(q, block_keys, block_values)
    scale, name = check_read_args(q, block_keys, block_values, indices, block_valid, scale, backend)
    if name == "reference":
        check_read_values(block_keys, indices)
        return BlockRead(*block_read_ref(q, block_keys, block_values, indices, block_valid, scale))
    if eager_call(*(t for t in (q, block_keys, block_values, indices, block_valid) if t is not None)):
        return BlockRead(*block_read_eager(q, block_keys, block_values, indices, block_valid, scale, name))
    # The custom op checks the block ids itself, at call time (also inside compiled graphs).
    return BlockRead(*block_read_op(q, block_keys, block_values, indices, block_valid, scale, name))
