"""The exact top-k softmax read over int8 keys with per-channel scales (``quantized_topk_read``),
the read of a :class:`l2m_kernels.memory.MemoryStore` with int8 keys (see ``reference.py`` for the
semantics)."""
from __future__ import annotations

import torch

from .._common import MemoryRead, autocast_promote, eager_call
from .function import quantized_topk_read_eager, quantized_topk_read_op
from .reference import quantized_topk_read_ref
from ..._validation import FLOAT_DTYPES
from .validate import check_args, check_values

__all__ = ["quantized_topk_read", "quantized_topk_read_ref"]


def quantized_topk_read(q, keys, key_scale, values, k, *, value_scale=None, scale=None, backend=None) -> MemoryRead:
    """Each query softmax-reads the k slots of its memory head whose int8 keys, dequantised, score
    best: exactly, ties to the smaller slot.

    Args:
        q:           (B, H, T, Dk) float32/float16/bfloat16/float64 queries, any strides; query head h
                     reads memory head h // (H // Hm).
        keys:        (Hm, N, Dk) int8, elements in [-127, 127] (-128 raises ValueError), N >= 1;
                     shared by the batch. Slot n's key is keys[h, n] * key_scale[h].
        key_scale:   (Hm, Dk) float32 channel scales, finite and > 0.
        values:      (Hm, N, Dv): float32/float16/bfloat16/float64 (used as is), or int8 /
                     float8_e4m3fn with value_scale.
        k:           slots read per query, 1 <= k <= N.
        value_scale: (Hm, N) float32 entry scales: required for int8/float8 values (value =
                     values.float() * value_scale[..., None]), refused for float values.
        scale:       score scale, default Dk ** -0.5.
        backend:     None (automatic), "reference" or "cpu".

    Returns:
        MemoryRead(out (B, H, T, Dv) in q's dtype, indices (B, H, T, k) int64 slot ids in [0, N) by
        descending score (ties: the smaller slot; NaN first), weights (B, H, T, k) and lse
        (B, H, T) float32; float64 for float64 q). Scores: qe = (q.float() * scale) *
        key_scale[h] in float32, s[n] = qe . keys[h, n] summed in float64; the softmax takes the
        selected scores rounded to float32 (float64 q: recomputed in float64 from q).
        Differentiable in q only: keys, key_scale, values and value_scale are stored state, and one
        that requires grad (with grad mode on) raises ValueError.

    Under torch.autocast, q is promoted to float values' dtype where that is wider (as
    ``topk_memory_read`` does); with int8/float8 values it is used as it comes.

    Equivalent PyTorch:
        qe = (q.float() * scale) * key_scale.repeat_interleave(H // Hm, 0)[:, None]
        s = qe.double() @ keys.double().repeat_interleave(H // Hm, 0).transpose(-1, -2)   # (B, H, T, N)
        indices = torch.sort(s.nan_to_num(nan=inf), -1, descending=True, stable=True).indices[..., :k]
        top = s.gather(-1, indices).float()
        weights, lse = top.softmax(-1), top.logsumexp(-1)
        v = values.float() * value_scale[..., None]                 # dequantised, per memory head
        out = (weights[..., None] * v[h, indices]).sum(-2).to(q.dtype)
    """
    if isinstance(q, torch.Tensor) and q.is_floating_point() and isinstance(values, torch.Tensor) \
            and values.dtype in FLOAT_DTYPES:
        (q,) = autocast_promote(q, to=torch.promote_types(q.dtype, values.dtype))
    k, scale, name = check_args(q, keys, key_scale, values, k, value_scale, scale, backend)
    if name == "reference":
        check_values(q, keys, key_scale, values, k, value_scale, scale, name)
        return MemoryRead(*quantized_topk_read_ref(q, keys, key_scale, values, k, value_scale, scale))
    if eager_call(*(t for t in (q, keys, key_scale, values, value_scale) if t is not None)):
        return MemoryRead(*quantized_topk_read_eager(q, keys, key_scale, values, k, value_scale, scale, name))
    # The custom op checks the keys' and scales' values itself, at call time (also inside compiled graphs).
    return MemoryRead(*quantized_topk_read_op(q, keys, key_scale, values, k, value_scale, scale, name))
