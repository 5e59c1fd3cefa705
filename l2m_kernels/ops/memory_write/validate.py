"""Argument checks of ``gated_memory_write`` and ``gated_dense_update``, shared by the public
functions and the raw custom ops.

:func:`check_write_args` reads only shapes (it runs while ``torch.compile`` traces);
:func:`check_write_values` reads the indices, weights and erase strengths, and runs in the custom
op at call time (in compiled graphs too), before anything is written.
"""
from __future__ import annotations

import torch

from ... import _validation as v
from ...backends import select_backend


def check_write_args(memory, indices, weights, add, erase, backend):
    """Shapes, dtypes and devices; returns the backend name."""
    v.require_ndim("memory", memory, (3, 4), "(B, Hm, N, D) or (B, N, D)")
    heads = memory.dim() == 4
    lead = tuple(memory.shape[:-2])  # (B, Hm) or (B,)
    D = memory.shape[-1]
    sym = "(B, Hm, T, kw)" if heads else "(B, T, kw)"
    v.require_ndim("indices", indices, (memory.dim(),), sym)
    v.require_shape("indices", indices, lead + (None, None), sym)
    T = indices.shape[-2]
    v.require_index_dtype("indices", indices)
    v.require_shape("weights", weights, tuple(indices.shape), sym)
    sym_d = "(B, Hm, T, D)" if heads else "(B, T, D)"
    v.require_shape("add", add, lead + (T, D), sym_d)
    v.require_ndim("erase", erase, (memory.dim(),), sym_d + " or (..., 1)")
    if erase.shape[-1] == 1 and D != 1:
        v.require_shape("erase", erase, lead + (T, 1), sym_d[:-2] + "1)")
    else:
        v.require_shape("erase", erase, lead + (T, D), sym_d)
    v.require_same_dtype("memory", memory, weights=weights, add=add, erase=erase)
    device = v.require_same_device(memory=memory, indices=indices, weights=weights, add=add, erase=erase)
    return select_backend("gated_memory_write", device, memory.dtype, backend)


def check_write_values(memory, indices, weights, add, erase) -> None:
    """Indices in [-1, N) (``IndexError``), weights and erase in [0, 1] (``ValueError``; NaN is let
    through and propagates as documented). One device synchronisation; nothing while tracing or
    capturing a CUDA graph."""
    if indices.numel() == 0 or not v.values_readable(indices):
        return
    N = memory.shape[-2]
    low, high = torch.aminmax(indices)
    stats = torch.stack([low.long(), high.long(), ((weights < 0) | (weights > 1)).any().long(),
                         ((erase < 0) | (erase > 1)).any().long()]).tolist()
    low, high, weights_out, erase_out = stats
    if low < -1 or high >= N:
        raise IndexError(f"indices: expected slot ids in [-1, N) = [-1, {N}) (-1 means no write), "
                         f"got values in [{low}, {high}]")
    for name, tensor, outside in (("weights", weights, weights_out), ("erase", erase, erase_out)):
        if outside:
            low_value, high_value = (float(x) for x in torch.aminmax(tensor.float()))
            raise ValueError(f"{name}: expected values in [0, 1] (write and erase strengths), got values "
                             f"in [{low_value:g}, {high_value:g}]")


def check_dense_args(memory, update, input_gate, forget_gate, backend):
    """Dtypes, devices and broadcasting; returns the backend name."""
    tensors = dict(memory=memory, update=update, input_gate=input_gate, forget_gate=forget_gate)
    for name, tensor in tensors.items():
        v.require_tensor(name, tensor)
    v.require_same_dtype("memory", memory, update=update, input_gate=input_gate, forget_gate=forget_gate)
    device = v.require_same_device(**tensors)
    try:
        torch.broadcast_shapes(*(t.shape for t in tensors.values()))
    except RuntimeError:
        raise ValueError("memory, update, input_gate, forget_gate: shapes do not broadcast together: "
                         + ", ".join(f"{n}={tuple(t.shape)}" for n, t in tensors.items())) from None
    return select_backend("gated_dense_update", device, memory.dtype, backend)
