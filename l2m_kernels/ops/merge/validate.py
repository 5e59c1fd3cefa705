"""Argument checks of ``merge_attention`` and ``gated_merge``, shared by the public functions and the
raw custom ops (shapes only: they run while ``torch.compile`` traces too)."""
from __future__ import annotations

from ... import _validation as v
from ...backends import select_backend


def check_merge_args(out_a, lse_a, out_b, lse_b, backend):
    """Returns the backend name."""
    v.require_ndim("out_a", out_a, (4,), "(B, H, T, D)")
    B, H, T, D = out_a.shape
    v.require_shape("out_b", out_b, (B, H, T, D), "(B, H, T, D)")
    v.require_shape("lse_a", lse_a, (B, H, T), "(B, H, T)")
    v.require_shape("lse_b", lse_b, (B, H, T), "(B, H, T)")
    v.require_same_dtype("out_a", out_a, out_b=out_b)
    v.require_lse_dtype("lse_a", lse_a, out_a.dtype)
    v.require_lse_dtype("lse_b", lse_b, out_a.dtype)
    device = v.require_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return select_backend("merge_attention", device, out_a.dtype, backend)


def check_gated_merge_args(out_local, out_mem, gate, backend):
    """Returns the backend name."""
    v.require_ndim("out_local", out_local, (4,), "(B, H, T, D)")
    B, H, T, D = out_local.shape
    v.require_shape("out_mem", out_mem, (B, H, T, D), "(B, H, T, D)")
    v.require_broadcastable("gate", gate, (B, H, T, 1), "(B, H, T, 1)")
    v.require_same_dtype("out_local", out_local, out_mem=out_mem, gate=gate)
    device = v.require_same_device(out_local=out_local, out_mem=out_mem, gate=gate)
    return select_backend("gated_merge", device, out_local.dtype, backend)
