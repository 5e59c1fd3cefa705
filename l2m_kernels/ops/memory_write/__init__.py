"""Gated memory writes (SPEC section 3): exact sequential slot writes and the LM2 dense update."""
from __future__ import annotations

import torch

from ... import _validation as v
from ...backends import select_backend
from .function import gated_dense_update_op, gated_memory_write_inplace_op, gated_memory_write_op
from .reference import gated_dense_update_ref, gated_memory_write_ref, gated_memory_write_ref_

__all__ = ["gated_memory_write", "gated_dense_update", "gated_memory_write_ref", "gated_dense_update_ref"]


def check_write_indices(indices: torch.Tensor, N: int) -> None:
    """Every index must lie in [-1, N); raises IndexError (before anything is written)."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(indices.min()), int(indices.max())
    if low < -1 or high >= N:
        raise IndexError(f"indices: expected slot ids in [-1, N) = [-1, {N}) (-1 means no write), "
                         f"got values in [{low}, {high}]")


def _validate_write(memory, indices, weights, add, erase):
    v.require_ndim("memory", memory, (3, 4), "(B, Hm, N, D) or (B, N, D)")
    heads = memory.dim() == 4
    lead = tuple(memory.shape[:-2])  # (B, Hm) or (B,)
    N, D = memory.shape[-2], memory.shape[-1]
    sym = "(B, Hm, T, kw)" if heads else "(B, T, kw)"
    v.require_ndim("indices", indices, (memory.dim(),), sym)
    v.require_shape("indices", indices, lead + (None, None), sym)
    T, kw = indices.shape[-2], indices.shape[-1]
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
    check_write_indices(indices, N)
    return device


def gated_memory_write(memory, indices, weights, add, erase, *, inplace=False, backend=None):
    """Gated, erase-then-add writes into memory slots, applied exactly in sequence.

    Args:
        memory:  (B, Hm, N, D) or (B, N, D) memory.
        indices: (B, Hm, T, kw) or (B, T, kw) int32/int64 slot ids, -1 meaning "no write".
        weights: the shape of indices, write strengths in [0, 1] (memory's dtype).
        add:     (B, Hm, T, D) vectors to add.
        erase:   (B, Hm, T, D) or (B, Hm, T, 1) erase strengths in [0, 1].
        inplace: update ``memory`` itself and return it (touching only the written slots);
                 refused with RuntimeError when a gradient is required.
        backend: None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        The new memory (a new tensor unless ``inplace``). Indices outside [-1, N) raise IndexError
        before anything is written. Differentiable in memory, weights, add and erase;
        deterministic by construction.

    Equivalent PyTorch:
        for t in range(T):
            for j in range(kw):
                s = indices[..., t, j]            # where s >= 0:
                w = weights[..., t, j, None]
                M[s] = M[s] * (1 - w * erase[..., t, :]) + w * add[..., t, :]
    """
    device = _validate_write(memory, indices, weights, add, erase)
    if inplace:
        grad_needed = torch.is_grad_enabled() and any(
            t.requires_grad for t in (memory, weights, add, erase))
        if grad_needed:
            raise RuntimeError("gated_memory_write(inplace=True) cannot be differentiated: a gradient "
                               "is required by one of memory, weights, add, erase (use inplace=False, "
                               "or run under torch.no_grad())")
    name = select_backend("gated_memory_write", device, memory.dtype, backend)
    if inplace:
        if name == "reference":
            return gated_memory_write_ref_(memory, indices, weights, add, erase)
        gated_memory_write_inplace_op(memory, indices, weights, add, erase, name)
        return memory
    if name == "reference":
        return gated_memory_write_ref(memory, indices, weights, add, erase)
    return gated_memory_write_op(memory, indices, weights, add, erase, name)


def gated_dense_update(memory, update, input_gate, forget_gate, *, backend=None):
    """LM2-style whole-memory update with input and forget gates, broadcasting like PyTorch.

    Args:
        memory, update, input_gate, forget_gate: tensors of one floating dtype whose shapes
            broadcast together (for example memory (B, N, D) with gates (B, 1, D)).
        backend: None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        The broadcast shape, in the input dtype; differentiable in all four (gradients reduced to
        each input's shape).

    Equivalent PyTorch:
        torch.sigmoid(forget_gate) * memory + torch.sigmoid(input_gate) * torch.tanh(update)
    """
    tensors = dict(memory=memory, update=update, input_gate=input_gate, forget_gate=forget_gate)
    for name_, t in tensors.items():
        v.require_tensor(name_, t)
    v.require_same_dtype("memory", memory, update=update, input_gate=input_gate, forget_gate=forget_gate)
    device = v.require_same_device(**tensors)
    try:
        torch.broadcast_shapes(*(t.shape for t in tensors.values()))
    except RuntimeError:
        raise ValueError("memory, update, input_gate, forget_gate: shapes do not broadcast together: "
                         + ", ".join(f"{n_}={tuple(t.shape)}" for n_, t in tensors.items())) from None
    name = select_backend("gated_dense_update", device, memory.dtype, backend)
    if name == "reference":
        return gated_dense_update_ref(memory, update, input_gate, forget_gate)
    return gated_dense_update_op(memory, update, input_gate, forget_gate, name)
