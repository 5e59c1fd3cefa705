"""Sparse top-k memory read over dense keys (SPEC section 1)."""
from __future__ import annotations

import torch

from ... import _validation as v
from ...backends import resolve_deterministic, select_backend
from .._common import MemoryRead
from .function import topk_memory_read_op
from .reference import topk_memory_read_ref

__all__ = ["topk_memory_read", "topk_memory_read_ref", "validate_memory"]

MAX_K = 256


def validate_memory(q, keys, values, *, q_name="q", keys_name="keys", values_name="values"):
    """Check a (B, H, T, Dk) query against a (B, Hm, N, Dk) / (Hm, N, Dk) memory; returns N."""
    v.require_ndim(q_name, q, (4,), "(B, H, T, Dk)")
    B, H, T, Dk = q.shape
    v.require_ndim(keys_name, keys, (3, 4), "(B, Hm, N, Dk) or (Hm, N, Dk)")
    if keys.dim() == 4:
        v.require_shape(keys_name, keys, (B, None, None, Dk), "(B, Hm, N, Dk)")
    else:
        v.require_shape(keys_name, keys, (None, None, Dk), "(Hm, N, Dk)")
    Hm, N = keys.shape[-3], keys.shape[-2]
    if Hm == 0 or H % Hm != 0:
        raise ValueError(f"{keys_name}: the memory head count Hm must divide H (grouped heads), got "
                         f"H={H}, Hm={Hm} (shape {tuple(keys.shape)})")
    lead = tuple(keys.shape[:-1])
    v.require_ndim(values_name, values, (keys.dim(),), f"{keys_name}'s leading shape + (Dv,)")
    v.require_shape(values_name, values, lead + (None,),
                    "(B, Hm, N, Dv)" if keys.dim() == 4 else "(Hm, N, Dv)")
    v.require_same_dtype(q_name, q, **{keys_name: keys, values_name: values})
    return N


def validate_valid_len(valid_len, B: int, N: int):
    if valid_len is None:
        return None
    v.require_shape("valid_len", valid_len, (B,), "(B,)")
    v.require_index_dtype("valid_len", valid_len)
    if not torch.compiler.is_compiling() and valid_len.numel():
        low, high = int(valid_len.min()), int(valid_len.max())
        if low < 0 or high > N:
            raise ValueError(f"valid_len: expected 0 <= valid_len[b] <= N = {N}, got values in "
                             f"[{low}, {high}]")
    return valid_len


def resolve_scale(scale, Dk: int) -> float:
    if scale is None:
        return float(Dk) ** -0.5
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale: expected a Python float, got a Tensor")
    return float(scale)


def topk_memory_read(q, keys, values, k, *, scale=None, valid_len=None, deterministic=False, backend=None):
    """Content-based sparse read: each query softmax-reads its k best-scoring memory slots.

    Args:
        q:      (B, H, T, Dk) queries.
        keys:   (B, Hm, N, Dk) or shared (Hm, N, Dk) memory keys, H % Hm == 0 (query head h uses
                memory head h // (H // Hm)). Same dtype as q.
        values: (B, Hm, N, Dv) or (Hm, N, Dv), the leading shape of keys.
        k:      number of slots read per query, 1 <= k <= min(N, 256).
        scale:  score scale, default Dk ** -0.5.
        valid_len: optional int (B,) tensor, 0 <= valid_len[b] <= N: slots n >= valid_len[b] do not
                exist for batch element b.
        deterministic: bitwise-reproducible gradients for keys and values (also switched on by
                torch.are_deterministic_algorithms_enabled()). The default (False) lets the GPU
                backends (triton, cuda) scatter dkeys/dvalues with float32 atomics, whose
                summation order varies from run to run; True groups the selected entries by slot
                (a stable sort) and sums each slot's entries in a fixed order. The reference and
                cpu backends are always deterministic. dq never uses atomics.
        backend: None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        MemoryRead(out (B, H, T, Dv) input dtype, indices (B, H, T, k) int64, weights (B, H, T, k)
        float32, lse (B, H, T) float32; float64 for float64 input). Slots are ordered by
        descending score, ties broken by the smaller slot; with fewer than k existing slots the
        missing entries have index -1 and weight 0, and with none out = 0 and lse = -inf.
        Differentiable in q, keys and values through out, weights and lse.

    Equivalent PyTorch (up to exact tie-breaking):
        s = scale * q @ keys.transpose(-1, -2)          # keys repeated to H heads, invalid = -inf
        top, idx = s.topk(k)
        weights = top.softmax(-1); lse = top.logsumexp(-1)
        out = (weights[..., None] * values.gather(idx)).sum(-2)
    """
    N = validate_memory(q, keys, values)
    B, H, T, Dk = q.shape
    k = v.require_int("k", k, 1, min(N, MAX_K), f" (N = {N}, at most {MAX_K})")
    valid_len = validate_valid_len(valid_len, B, N)
    device = v.require_same_device(q=q, keys=keys, values=values, valid_len=valid_len)
    scale = resolve_scale(scale, Dk)
    deterministic = resolve_deterministic(deterministic)
    name = select_backend("topk_memory_read", device, q.dtype, backend,
                          sizes=dict(Dk=Dk, Dv=values.shape[-1], N=N, rows=B * H * T))
    if name == "reference":
        return MemoryRead(*topk_memory_read_ref(q, keys, values, k, scale=scale, valid_len=valid_len))
    return MemoryRead(*topk_memory_read_op(q, keys, values, k, scale, valid_len, deterministic, name))
