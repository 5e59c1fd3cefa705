"""Argument checks of ``quantized_topk_read``, shared by the public function and the raw custom op.

:func:`check_args` checks ranks, shapes, dtypes, devices and the static arguments and picks the
backend; it reads only shapes, so it also runs on fake tensors while ``torch.compile`` traces.
:func:`check_values` reads tensor values (no key of -128, finite positive channel scales), so it
runs where the values exist: in the custom op's implementation, at call time.
"""
from __future__ import annotations

import torch

from ... import _validation as v
from ...backends import select_backend
from ..topk_read.validate import resolve_scale

# Value dtypes stored with a per-entry scale (value_scale required), and the float ones used as is.
SCALED_VALUE_DTYPES = (torch.int8, torch.float8_e4m3fn)
VALUE_DTYPES = v.FLOAT_DTYPES + SCALED_VALUE_DTYPES


def _require_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def check_args(q, keys, key_scale, values, k, value_scale, scale, backend):
    """Everything but tensor values; returns ``(k, scale, backend name)``."""
    v.require_ndim("q", q, (4,), "(B, H, T, Dk)")
    v.require_float("q", q)
    B, H, T, Dk = q.shape
    v.require_ndim("keys", keys, (3,), "(Hm, N, Dk)")
    v.require_shape("keys", keys, (None, None, Dk), "(Hm, N, Dk)")
    _require_dtype("keys", keys, torch.int8)
    Hm, N = keys.shape[0], keys.shape[1]
    if Hm == 0 or H % Hm != 0:
        raise ValueError(f"keys: the memory head count Hm must divide H (grouped heads), got H={H}, Hm={Hm} "
                         f"(shape {tuple(keys.shape)})")
    if N == 0:
        raise ValueError(f"keys: expected at least one slot (N >= 1), got shape {tuple(keys.shape)}")
    v.require_shape("key_scale", key_scale, (Hm, Dk), "(Hm, Dk)")
    _require_dtype("key_scale", key_scale, torch.float32)
    v.require_ndim("values", values, (3,), "(Hm, N, Dv)")
    v.require_shape("values", values, (Hm, N, None), "(Hm, N, Dv)")
    if values.dtype not in VALUE_DTYPES:
        raise TypeError(f"values: expected a floating dtype (float32, float16, bfloat16, float64), torch.int8 "
                        f"or torch.float8_e4m3fn, got {values.dtype}")
    if values.dtype in SCALED_VALUE_DTYPES:
        if value_scale is None:
            raise ValueError(f"value_scale: required for {values.dtype} values (one float32 scale per entry, "
                             f"shape (Hm, N) = ({Hm}, {N}))")
        v.require_shape("value_scale", value_scale, (Hm, N), "(Hm, N)")
        _require_dtype("value_scale", value_scale, torch.float32)
    elif value_scale is not None:
        raise ValueError(f"value_scale: only for int8 or float8_e4m3fn values; {values.dtype} values are used "
                         f"as they are (pass value_scale=None)")
    k = v.require_int("k", k, 1, N, f" (N = {N} slots)")
    device = v.require_same_device(q=q, keys=keys, key_scale=key_scale, values=values, value_scale=value_scale)
    if torch.is_grad_enabled():
        for name, t in (("keys", keys), ("key_scale", key_scale), ("values", values), ("value_scale", value_scale)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name}: the memory is stored state and gets no gradient (the read is "
                                 f"differentiable in q only); pass {name}.detach()")
    scale = resolve_scale(scale, Dk)
    return k, scale, select_backend("quantized_topk_read", device, q.dtype, backend)


def check_keys(keys) -> None:
    """No int8 key element is -128 (reads the values: not while tracing or capturing a CUDA graph)."""
    if keys.numel() and v.values_readable(keys) and bool((keys == -128).any()):
        raise ValueError("keys: expected int8 elements in [-127, 127], got -128 (the int8 filter of the "
                         "cpu kernel bounds |key| by 127)")


def check_values(q, keys, key_scale, values, k, value_scale, scale, backend, *, keys_checked=False) -> None:
    """The channel scales finite and > 0, and (unless ``keys_checked``: the cpu kernel refuses a
    -128 itself) no key of -128."""
    if key_scale.numel() and v.values_readable(key_scale):
        bad = ~(torch.isfinite(key_scale) & (key_scale > 0))
        if bool(bad.any()):
            first = bad.nonzero()[0].tolist()
            raise ValueError(f"key_scale: expected finite channel scales > 0, got {key_scale[tuple(first)].item()} "
                             f"at {tuple(first)}")
    if not keys_checked:
        check_keys(keys)
