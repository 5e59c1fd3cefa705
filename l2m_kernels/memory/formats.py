"""Storage formats of a :class:`~l2m_kernels.memory.MemoryStore`: how keys and values are encoded.

Keys:
- a float dtype (``"float32"``, ``"float16"``, ``"bfloat16"``, ``"float64"``): stored as is;
- ``"int8"``: ``key = k8 * channel_scale`` with one float32 scale per (memory head, channel),
  ``k8`` in [-127, 127]. The scales are fixed when the store first sees keys (``max |key|`` per
  channel over that first append, times ``key_margin``) or given by the user; a later key beyond
  the range saturates. Each entry also keeps ``sum |k8|`` and ``sum k8`` (int32), which the exact
  int8 read uses to bound its filter.

Values:
- a float dtype: stored as is;
- ``"int8"``: ``value = v8 * entry_scale`` with one float32 scale per (memory head, entry),
  ``max |value| / 127``;
- ``"float8"``: ``torch.float8_e4m3fn`` with a per-entry scale ``max |value| / 448`` (kept as its
  bytes, uint8, because gathers and scatters of float8 tensors are not implemented on every
  device).

Error of int8 keys: each stored key element is within ``channel_scale / 2`` of the float key, so a
score ``scale * <q, key>`` is within ``scale * sum_d |q_d| * channel_scale_d / 2`` of the score of
the float key (:func:`key_score_error_bound`); the reads rank the stored (dequantised) keys
exactly.
"""
from __future__ import annotations

import torch

FLOAT_FORMATS = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
KEY_FORMATS = tuple(FLOAT_FORMATS) + ("int8",)
VALUE_FORMATS = tuple(FLOAT_FORMATS) + ("int8", "float8")

_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def storage_dtype(fmt: str) -> torch.dtype:
    """The dtype a format stores its elements in."""
    if fmt in FLOAT_FORMATS:
        return FLOAT_FORMATS[fmt]
    if fmt == "int8":
        return torch.int8
    if fmt == "float8":
        return torch.uint8  # the bytes of float8_e4m3fn
    raise ValueError(f"unknown storage format {fmt!r}")


def channel_scales(keys: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-(head, channel) int8 scales from a first batch of keys ``(Hm, n, Dk)``: ``(Hm, Dk)``
    float32, ``margin * max |key| / 127`` (a channel that is all zero gets scale 1)."""
    top = keys.detach().abs().amax(dim=1).float() * (margin / _INT8_MAX)
    return torch.where(top > 0, top, torch.ones_like(top))


def quantize_keys(keys: torch.Tensor, scales: torch.Tensor):
    """``keys (Hm, n, Dk)`` float -> ``(k8 int8, key_abs int32 (Hm, n), key_sum int32 (Hm, n))``.

    Equivalent PyTorch:
        k8 = clamp(round(keys / scales[:, None]), -127, 127)
    """
    k8 = torch.clamp(torch.round(keys.float() / scales.unsqueeze(1)), -_INT8_MAX, _INT8_MAX)
    k8 = k8.to(torch.int8)
    wide = k8.to(torch.int32)
    return k8, wide.abs().sum(-1, dtype=torch.int32), wide.sum(-1, dtype=torch.int32)


def dequantize_keys(k8: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``k8 (Hm, n, Dk)`` or gathered ``(..., Hm?, Dk)`` rows times their channel scales."""
    return (k8.to(torch.float32) * scales).to(dtype)


def quantize_values(values: torch.Tensor, fmt: str):
    """``values (Hm, n, Dv)`` float -> ``(stored, entry_scale float32 (Hm, n))`` for ``int8`` or
    ``float8``."""
    top = values.detach().abs().amax(dim=-1).float()
    limit = _INT8_MAX if fmt == "int8" else _FP8_MAX
    scale = torch.where(top > 0, top / limit, torch.ones_like(top))
    scaled = values.float() / scale.unsqueeze(-1)
    if fmt == "int8":
        stored = torch.clamp(torch.round(scaled), -_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        stored = torch.clamp(scaled, -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return stored, scale


def dequantize_values(stored: torch.Tensor, scale: torch.Tensor | None,
                      dtype=torch.float32) -> torch.Tensor:
    """Stored value rows ``(..., Dv)`` with their entry scales ``(...)`` (None: a float format)."""
    if scale is None:
        return stored.to(dtype)
    if stored.dtype == torch.uint8:
        stored = stored.view(torch.float8_e4m3fn)
    return (stored.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


def key_score_error_bound(q: torch.Tensor, scales: torch.Tensor, scale: float) -> torch.Tensor:
    """Largest difference between a score on an int8-stored key and on the float key it stores.

    ``q (B, H, T, Dk)``, ``scales (Hm, Dk)`` -> ``(B, H, T)``: ``scale * sum_d |q_d| * s_d / 2``
    with ``s`` the channel scales of the query's memory head (keys inside the quantisation range;
    a saturated key can be further off).
    """
    heads, mem_heads = q.shape[1], scales.shape[0]
    per_head = scales.repeat_interleave(heads // mem_heads, dim=0)  # (H, Dk)
    return scale * 0.5 * (q.abs().float() * per_head[:, None, :]).sum(-1)
