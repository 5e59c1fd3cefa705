"""Reference (naive PyTorch) block memory ops: the specification the fused kernels are checked
against, and the baseline the benchmarks compare with.

A block memory holds past keys and values in blocks of ``S`` tokens per key-value head,
``block_keys (B, Hk, NB, S, D)`` and ``block_values (B, Hk, NB, S, Dv)``, as InfLLM keeps a long
context. A chunk of queries reads it in two steps:

- :func:`block_topk_ref` scores every block against the chunk with the block's representative keys
  ``reprs (B, Hk, NB, R, D)`` and picks the ``k`` best blocks per (batch, key-value head). The score
  of block n for key-value head g sums, over every query row of the heads that share g and every
  time step, the row's best dot product with the block's valid representatives:

      scores[b, g, n] = scale * sum_{h in group g, t} max_{r : repr_valid[b, n, r]} q[b, h, t] . reprs[b, g, n, r]

  With one representative per block (R = 1, e.g. the mean key) this is the dot product of the
  summed queries with it; with the block's own keys as representatives (R = S) a block is as good
  as its best key for each query. A block with no valid representative scores -inf.
- :func:`block_read_ref` is softmax attention of each query row over the valid tokens of the
  selected blocks of its key-value head, returning the output and its log-sum-exp, so that it
  merges exactly with any other attention over disjoint keys (:func:`l2m_kernels.merge_attention`).

Semantics fixed here (the fused backends match):

- Selection order: descending score, ties broken by the smaller block index, NaN ranked above
  everything (as ``torch.topk`` does), -inf (no valid representative) below every finite score;
  the ``k`` selected indices are returned in increasing block order (the order blocks were
  written), which is the order a read visits them in.
- A block selected more than once is read once per occurrence (its tokens count twice in the
  softmax), like attention over the gathered blocks; the gradients sum over the occurrences.
- A query row with no valid token among its selected blocks (``k = 0``, or only invalid tokens)
  gets ``out = 0``, ``lse = -inf`` and zero gradients.
- Precision: float16/bfloat16/float32 inputs are computed in float32, float64 in float64; outputs
  are rounded to the input dtype once.

No argument checking here beyond what the math needs; the public functions check.
"""
from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hk, H // Hk * T, D): the rows of the query heads sharing a key-value head."""
    batch, heads, length, dim = q.shape
    return q.reshape(batch, kv_heads, heads // kv_heads * length, dim)


def block_scores_ref(q, reprs, repr_valid=None, scale=None):
    """The block scores of :func:`block_topk_ref`, (B, Hk, NB) in the accumulation dtype.

    Equivalent PyTorch:
        s = scale * einsum("bgmd,bgnrd->bgmnr", q grouped per key-value head, reprs)
        s = s.masked_fill(~repr_valid[:, None, None], -inf).amax(-1).sum(2)
    """
    acc = _acc(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, kv_heads, num_blocks, num_reprs, _ = reprs.shape
    rows = _grouped(q.to(acc), kv_heads)
    valid = (torch.ones(batch, num_blocks, num_reprs, dtype=torch.bool, device=q.device)
             if repr_valid is None else repr_valid.to(torch.bool))
    reprs = reprs.to(acc).masked_fill(~valid[:, None, ..., None], 0)   # absent ones never reach a score
    s = torch.einsum("bgmd,bgnrd->bgmnr", rows * scale, reprs)
    s = s.masked_fill(~valid[:, None, None], float("-inf"))
    best = s.amax(dim=-1) if num_reprs else s.new_full(s.shape[:-1], float("-inf"))
    # A block with no valid representative: -inf for every row, and -inf (not NaN) when summed
    # over no rows.
    empty = ~valid.any(dim=-1)[:, None]                                   # (B, 1, NB)
    scores = best.sum(dim=2)
    return scores.masked_fill(empty, float("-inf"))


def select_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best blocks of ``scores`` (B, Hk, NB) by the order of the module docstring, in
    increasing block order, (B, Hk, k) int64."""
    # Descending with NaN first, ties by the smaller index: a stable descending sort does both.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def block_topk_ref(q, reprs, k, repr_valid=None, scale=None):
    """Block scores and the ``k`` best blocks per (batch, key-value head).

    Args:
        q:          (B, H, T, D) queries, H % Hk == 0 (query head h belongs to key-value head
                    h // (H // Hk)).
        reprs:      (B, Hk, NB, R, D) representative keys of each block, q's dtype.
        k:          blocks selected, 0 <= k <= NB.
        repr_valid: optional (B, NB, R) bool: which representatives exist.
        scale:      score scale, default D ** -0.5.

    Returns:
        (indices (B, Hk, k) int64 in increasing order, scores (B, Hk, NB) float32; float64 for
        float64 input). Neither has a gradient: the selection is piecewise constant.
    """
    with torch.no_grad():
        scores = block_scores_ref(q, reprs, repr_valid, scale)
        return select_blocks(scores, k), scores


def gather_blocks(block_keys, block_values, indices, block_valid=None):
    """The selected blocks of each key-value head as token rows: keys (B, Hk, K * S, D), values
    (B, Hk, K * S, Dv) and their validity (B, Hk, K * S) bool (all true without ``block_valid``),
    in the dtypes given; differentiable in the block tensors (a repeated block is gathered again).

    Equivalent PyTorch:
        keys = block_keys.gather(2, indices[..., None, None].expand(-1, -1, -1, S, D)).flatten(2, 3)
    """
    batch, kv_heads, _, size, dim = block_keys.shape
    idx = indices.to(torch.int64)
    keys = block_keys.gather(2, idx[..., None, None].expand(-1, -1, -1, size, dim)).flatten(2, 3)
    values = block_values.gather(
        2, idx[..., None, None].expand(-1, -1, -1, size, block_values.shape[-1])).flatten(2, 3)
    if block_valid is None:
        valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    else:
        valid = block_valid.to(torch.bool)[:, None].expand(-1, kv_heads, -1, -1)
        valid = valid.gather(2, idx[..., None].expand(-1, -1, -1, size)).flatten(2, 3)
    return keys, values, valid


def block_read_ref(q, block_keys, block_values, indices, block_valid=None, scale=None):
    """Softmax attention of each query row over the valid tokens of its key-value head's selected
    blocks, with its log-sum-exp.

    Args:
        q:            (B, H, T, D) queries, H % Hk == 0.
        block_keys:   (B, Hk, NB, S, D) keys in blocks of S tokens, q's dtype.
        block_values: (B, Hk, NB, S, Dv).
        indices:      (B, Hk, K) int64 blocks in [0, NB) each query of key-value head g reads.
        block_valid:  optional (B, NB, S) bool: which tokens exist (padding does not).
        scale:        score scale, default D ** -0.5.

    Returns:
        (out (B, H, T, Dv) in q's dtype, lse (B, H, T) float32; float64 for float64 input).
        Differentiable in q, block_keys and block_values.

    Equivalent PyTorch:
        keys = block_keys.gather(2, indices)             # (B, Hk, K, S, D), flattened to K * S tokens
        s = scale * q @ keys.T  (query heads grouped), invalid tokens -inf
        out, lse = softmax(s) @ values, logsumexp(s)     # rows with no valid token: 0, -inf
    """
    acc = _acc(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads, length, dim = q.shape
    kv_heads = block_keys.shape[1]
    keys, values, valid = gather_blocks(block_keys.to(acc), block_values.to(acc), indices, block_valid)
    # Tokens that do not exist never reach a result, whatever their keys and values hold.
    keys = keys.masked_fill(~valid[..., None], 0)
    values = values.masked_fill(~valid[..., None], 0)
    rows = _grouped(q.to(acc), kv_heads)
    s = torch.einsum("bgmd,bgld->bgml", rows * scale, keys)
    s = s.masked_fill(~valid[:, :, None], float("-inf"))
    top = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), float("-inf"))
    # A row with nothing to attend: its maximum is -inf; shift by 0 so that every exp is 0.
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    p = torch.exp(s - top)
    total = p.sum(dim=-1, keepdim=True)
    nonempty = total != 0      # NaN totals (NaN scores) stay NaN
    out = torch.einsum("bgml,bgld->bgmd", p, values) / torch.where(nonempty, total, torch.ones_like(total))
    # A row with nothing to attend: lse -inf and zero gradients (log(0) would give NaN ones).
    lse = torch.where(nonempty, top + torch.log(torch.where(nonempty, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf"))).squeeze(-1)
    out = out.reshape(batch, heads, length, block_values.shape[-1]).to(q.dtype)
    return out, lse.reshape(batch, heads, length)
