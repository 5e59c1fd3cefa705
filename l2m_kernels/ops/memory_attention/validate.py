"""Argument checks of ``memory_attention``, shared by the public function and the raw custom op.

As for the top-k read (:mod:`..topk_read.validate`): :func:`check_args` needs only shapes and
picks the backend; :func:`check_values` reads ``valid_len`` and runs in the custom op at call time.
"""
from __future__ import annotations

from ... import _validation as check
from ...backends import resolve_deterministic, select_backend
from ..topk_read.validate import (MAX_K, check_valid_len_values, resolve_scale, validate_memory,
                                  validate_valid_len)

MERGES = ("joint", "gate")


def check_args(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic,
               backend):
    """Everything but tensor values; returns ``(topk, window, scale, valid_len, deterministic, name)``."""
    check.require_ndim("q", q, (4,), "(B, H, T, D)")
    B, H, T, D = q.shape
    check.require_ndim("k", k, (4,), "(B, Hkv, S, D)")
    check.require_shape("k", k, (B, None, None, D), "(B, Hkv, S, D)")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k: the key/value head count Hkv must divide H, got H={H}, Hkv={Hkv} "
                         f"(shape {tuple(k.shape)})")
    if S < T:
        raise ValueError(f"k: expected S >= T (the queries are the last T of S positions), got "
                         f"S={S}, T={T} (shape {tuple(k.shape)})")
    check.require_ndim("v", v, (4,), "(B, Hkv, S, Dv)")
    check.require_shape("v", v, (B, Hkv, S, None), "(B, Hkv, S, Dv)")
    N = validate_memory(q, mem_keys, mem_values, keys_name="mem_keys", values_name="mem_values")
    if mem_values.shape[-1] != v.shape[-1]:
        raise ValueError(f"mem_values: expected the value size Dv of v ({v.shape[-1]}), got shape "
                         f"{tuple(mem_values.shape)}")
    check.require_same_dtype("q", q, k=k, v=v, mem_keys=mem_keys, mem_values=mem_values, gate=gate)
    topk = check.require_int("topk", topk, 1, min(N, MAX_K), f" (N = {N}, at most {MAX_K})")
    if window is not None:
        window = check.require_int("window", window, 1, None,
                                   " (the number of most recent local keys each query sees, itself "
                                   "included; None for all of them)")
    if merge not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
    if merge == "gate":
        if gate is None:
            raise ValueError("gate: required when merge='gate' (logits broadcastable to (B, H, T, 1))")
        check.require_broadcastable("gate", gate, (B, H, T, 1), "(B, H, T, 1)")
    elif gate is not None:
        raise ValueError("gate: only used with merge='gate'; pass gate=None with merge='joint'")
    valid_len = validate_valid_len(valid_len, B)
    device = check.require_same_device(q=q, k=k, v=v, mem_keys=mem_keys, mem_values=mem_values, gate=gate,
                                   valid_len=valid_len)
    scale = resolve_scale(scale, D)
    deterministic = resolve_deterministic(deterministic)
    name = select_backend("memory_attention", device, q.dtype, backend,
                          sizes=dict(Dk=D, Dv=v.shape[-1], N=N, rows=B * H * T, S=S))
    return topk, window, scale, valid_len, deterministic, name


def check_values(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic,
                 backend) -> None:
    check_valid_len_values(valid_len, mem_keys.shape[-2])
