"""Launchers, custom op and autograd of ``quantized_topk_read``.

``torch.ops.l2m.quantized_topk_read`` returns ``(out, indices, weights, lse)``; its backward op
``torch.ops.l2m.quantized_topk_read_backward`` gives ``dq`` (the keys, their scales and the values
are stored state: no gradient). Each backend plugs its launchers into :data:`FWD` and :data:`BWD`.

The cpu forward runs two kernels of the compiled extension on the query rows of each memory head
(``(Hm, R, Dk)``, ``R = B * (H // Hm) * T``): ``_store_int8_topk`` (``csrc/cpu/int8_topk.cpp``: an
int8 dot-product filter that proves which slots cannot enter the top-k, and exact float64
rescoring of the rest) selects, and for float32/float16/bfloat16 queries ``_topk_values_read``
forms the softmax and the weighted sum of the selected values in float32; for float64 queries the
read of the selection is computed in float64 by PyTorch. Its backward is PyTorch on the gathered
selected keys and values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _ext
from .._common import (acc_dtype, contiguous_like, declared_op, read_outputs_like, reference_vjp, register_autograd,
                       rows_of_queries, to_queries)
from ..topk_read.reference import gather_slots
from .reference import (effective_queries, head_scales, quantized_read_gather, quantized_topk_read_ref,
                        selected_values)
from .validate import check_args, check_keys, check_values


def _cpu():
    ext = _ext.cpu_extension()
    if ext is None:
        raise NotImplementedError(f"backend 'cpu' is unavailable: {_ext.cpu_extension_error()}")
    return ext


# ---- reference ----

def _reference_fwd(q, keys, key_scale, values, k, value_scale, scale):
    return tuple(t.contiguous() for t in quantized_topk_read_ref(q, keys, key_scale, values, k, value_scale, scale))


def _reference_bwd(dout, dweights, dlse, q, keys, key_scale, values, value_scale, indices, weights, scale):
    (dq,) = reference_vjp(lambda q_: quantized_read_gather(q_, keys, key_scale, values, indices, value_scale, scale),
                          (q,), (dout, dweights, dlse), (True,))
    return dq


# ---- cpu ----

def _cpu_select(q, keys, key_scale, k, scale):
    """The selection kernel: ``(scores (Hm, R, k) float32, slots (Hm, R, k) int64)``; it checks the
    keys' values itself."""
    ext = _cpu()
    q_rows = rows_of_queries(effective_queries(q, key_scale, scale), keys.shape[0])
    key_rows = keys if keys.stride(-1) == 1 else keys.contiguous()
    # The kernel computes the keys' sum |k| and sum k (its bound) and refuses a -128, before any work.
    return ext._store_int8_topk(q_rows, key_rows, None, None, k)


def _cpu_fwd(q, keys, key_scale, values, k, value_scale, scale):
    B, H, T, _ = q.shape
    if B * H * T == 0:
        check_keys(keys)    # no kernel runs to check them
        return read_outputs_like(q, values.shape[-1], k, fill=0)
    scores, slots = _cpu_select(q, keys, key_scale, k, scale)
    indices = to_queries(slots, B, H, T)
    if q.dtype == torch.float64:
        out, weights, lse = quantized_read_gather(q.detach(), keys, key_scale, values, indices, value_scale, scale)
        return out.contiguous(), indices, weights.contiguous(), lse.contiguous()
    value_rows = values if values.stride(-1) == 1 else values.contiguous()
    if value_rows.dtype == torch.float8_e4m3fn:
        value_rows = value_rows.view(torch.uint8)   # the kernel reads float8_e4m3fn as its bytes
    row_scales = None if value_scale is None else value_scale.contiguous()
    out, weights, lse = _cpu()._topk_values_read(scores, slots, value_rows, row_scales)
    return (to_queries(out.to(q.dtype), B, H, T), indices, to_queries(weights, B, H, T),
            to_queries(lse.unsqueeze(-1), B, H, T).squeeze(-1))


def _cpu_bwd(dout, dweights, dlse, q, keys, key_scale, values, value_scale, indices, weights, scale):
    """dq from the gathered selected keys and values, in the accumulation dtype.

    Equivalent PyTorch (per query row; g_j = dout . v_j + dweights_j):
        ds_j = w_j * (g_j - sum_i w_i g_i + dlse)
        dq = scale * key_scale[h] * sum_j ds_j * keys[h, n_j]
    """
    acc = acc_dtype(q.dtype)
    missing = indices < 0
    value_rows = selected_values(values, value_scale, indices, acc)               # (B, H, T, k, Dv)
    w = weights.to(acc)
    g = torch.matmul(value_rows, dout.to(acc).unsqueeze(-1)).squeeze(-1) + dweights.to(acc)
    delta = (w * g).sum(-1, keepdim=True)
    ds = torch.where(missing, 0.0, w * (g - delta + dlse.to(acc).unsqueeze(-1)))
    key_rows = gather_slots(keys, indices.clamp_min(0)).to(acc)                   # (B, H, T, k, Dk)
    per_head = head_scales(key_scale, q.shape[1]).to(acc)[:, None, :] * scale
    dq = torch.matmul(ds.unsqueeze(-2), key_rows).squeeze(-2) * per_head
    return dq.to(q.dtype).contiguous()


FWD = {"reference": _reference_fwd, "cpu": _cpu_fwd}
BWD = {"reference": _reference_bwd, "cpu": _cpu_bwd}


def quantized_read_fwd(q, keys, key_scale, values, k, value_scale, scale, backend):
    """The forward of ``backend`` on checked arguments: the values' checks first, then the kernels."""
    check_values(q, keys, key_scale, values, k, value_scale, scale, backend, keys_checked=backend == "cpu")
    return FWD[backend](q, keys, key_scale, values, k, value_scale, scale)


def quantized_read_bwd(dout, dweights, dlse, q, keys, key_scale, values, value_scale, indices, weights, scale,
                       backend):
    return BWD[backend](dout, dweights, dlse, q, keys, key_scale, values, value_scale, indices, weights, scale)


@declared_op("quantized_topk_read")
def quantized_topk_read_op(q: Tensor, keys: Tensor, key_scale: Tensor, values: Tensor, k: int,
                           value_scale: Optional[Tensor] = None, scale: Optional[float] = None,
                           backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    k, scale, backend = check_args(q, keys, key_scale, values, k, value_scale, scale, backend)
    return quantized_read_fwd(q, keys, key_scale, values, k, value_scale, scale, backend)


@quantized_topk_read_op.register_fake
def _(q, keys, key_scale, values, k, value_scale, scale, backend):
    return read_outputs_like(q, values.shape[-1], k)


@torch.library.custom_op("l2m::quantized_topk_read_backward", mutates_args=())
def quantized_topk_read_backward_op(dout: Tensor, dweights: Tensor, dlse: Tensor, q: Tensor, keys: Tensor,
                                    key_scale: Tensor, values: Tensor, value_scale: Optional[Tensor],
                                    indices: Tensor, weights: Tensor, scale: float, backend: str) -> Tensor:
    return quantized_read_bwd(dout, dweights, dlse, q, keys, key_scale, values, value_scale, indices, weights,
                              scale, backend)


@quantized_topk_read_backward_op.register_fake
def _(dout, dweights, dlse, q, keys, key_scale, values, value_scale, indices, weights, scale, backend):
    return contiguous_like(q)


def _setup(ctx, inputs, output):
    q, keys, key_scale, values, k, value_scale, scale, backend = inputs
    if scale is None or backend == "auto":  # the default scale and "auto", as the forward resolved them
        _, scale, backend = check_args(*inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, keys, key_scale, values, value_scale, output[1], output[2])
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, dindices, dweights, dlse, *, kernel):
    q, keys, key_scale, values, value_scale, indices, weights = ctx.saved_tensors
    B, H, T, k = indices.shape
    acc = acc_dtype(q.dtype)
    dout = q.new_zeros((B, H, T, values.shape[-1])) if dout is None else dout
    dweights = q.new_zeros((B, H, T, k), dtype=acc) if dweights is None else dweights
    dlse = q.new_zeros((B, H, T), dtype=acc) if dlse is None else dlse
    dq = kernel(dout, dweights, dlse, q, keys, key_scale, values, value_scale, indices, weights, ctx.scale,
                ctx.backend)
    return (dq if ctx.needs_input_grad[0] else None,) + (None,) * 7


# The eager entry (ops/_common.register_autograd): the same launchers and gradient without the
# dispatcher, whose cost matters at one query per head (decoding).
quantized_topk_read_eager = register_autograd(quantized_topk_read_op, quantized_read_fwd, _setup, _backward,
                                              backward_op=torch.ops.l2m.quantized_topk_read_backward,
                                              backward_launcher=quantized_read_bwd)
