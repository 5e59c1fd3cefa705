"""Argument checks of ``topk_memory_read``, shared by the public function and the raw custom op.

:func:`check_args` checks ranks, shapes, dtypes, devices and the static arguments and picks the
backend; it runs on fake tensors too (while ``torch.compile`` traces). :func:`check_values` reads
tensor values (``valid_len``), so it runs where the values exist: in the custom op's
implementation, which runs at call time in eager mode and inside compiled graphs alike.
"""
from __future__ import annotations

import torch

from ... import _validation as v
from ...backends import resolve_deterministic, select_backend

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


def shared_if_broadcast(keys, values):
    """A 4-D memory expanded over the batch (stride 0) as the shared 3-D memory it is.

    ``keys.expand(B, -1, -1, -1)`` is one memory read by every batch element: passing it on as
    ``keys[0]`` avoids materialising ``B`` copies, and autograd sums the batch's gradients into it.
    """
    if keys.dim() == 4 and keys.shape[0] > 1 and keys.stride(0) == 0 and values.stride(0) == 0:
        return keys[0], values[0]
    return keys, values


def validate_valid_len(valid_len, B: int):
    """Shape and dtype of the optional (B,) ``valid_len``; its values: :func:`check_valid_len_values`."""
    if valid_len is None:
        return None
    v.require_shape("valid_len", valid_len, (B,), "(B,)")
    v.require_index_dtype("valid_len", valid_len)
    return valid_len


def check_valid_len_values(valid_len, N: int) -> None:
    """0 <= valid_len[b] <= N (reads the values: not while tracing or capturing a CUDA graph)."""
    if valid_len is None or not valid_len.numel() or not v.values_readable(valid_len):
        return
    low, high = torch.stack(torch.aminmax(valid_len)).tolist()  # one device sync
    if low < 0 or high > N:
        raise ValueError(f"valid_len: expected 0 <= valid_len[b] <= N = {N}, got values in "
                         f"[{low}, {high}]")


def resolve_scale(scale, Dk: int) -> float:
    """``scale``, default ``Dk ** -0.5``; with ``Dk == 0`` every score is 0 whatever the scale (1.0)."""
    if scale is None:
        return float(Dk) ** -0.5 if Dk else 1.0
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale: expected a Python float, got a Tensor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    return float(scale)


def check_args(q, keys, values, k, scale, valid_len, deterministic, backend):
    """Everything but tensor values; returns ``(k, scale, valid_len, deterministic, backend name)``."""
    N = validate_memory(q, keys, values)
    B, H, T, Dk = q.shape
    k = v.require_int("k", k, 1, min(N, MAX_K), f" (N = {N}, at most {MAX_K})")
    valid_len = validate_valid_len(valid_len, B)
    device = v.require_same_device(q=q, keys=keys, values=values, valid_len=valid_len)
    scale = resolve_scale(scale, Dk)
    deterministic = resolve_deterministic(deterministic)
    name = select_backend("topk_memory_read", device, q.dtype, backend,
                          sizes=dict(Dk=Dk, Dv=values.shape[-1], N=N, rows=B * H * T))
    return k, scale, valid_len, deterministic, name


def check_values(q, keys, values, k, scale, valid_len, deterministic, backend) -> None:
    check_valid_len_values(valid_len, keys.shape[-2])
