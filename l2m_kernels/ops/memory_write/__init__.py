"""Gated memory writes (SPEC section 3): exact sequential slot writes and the LM2 dense update."""
from __future__ import annotations

import torch

from .._common import autocast_promote, eager_call
from .function import (gated_dense_update_eager, gated_dense_update_op, gated_memory_write_inplace_op,
                       gated_memory_write_op)
from .reference import gated_dense_update_ref, gated_memory_write_ref, gated_memory_write_ref_
from .validate import check_dense_args, check_write_args, check_write_values

__all__ = ["gated_memory_write", "gated_dense_update", "gated_memory_write_ref", "gated_dense_update_ref"]


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
        The new memory (a new tensor unless ``inplace``). Indices outside [-1, N) raise IndexError,
        and weights or erase strengths outside [0, 1] raise ValueError (NaN is let through and
        gives NaN in the slots it writes), before anything is written; the checks read the values
        at call time, inside compiled graphs too (one device synchronisation per call). Differentiable in memory, weights, add and erase;
        deterministic by construction.

    Equivalent PyTorch:
        for t in range(T):
            for j in range(kw):
                s = indices[..., t, j]            # where s >= 0:
                w = weights[..., t, j, None]
                M[s] = M[s] * (1 - w * erase[..., t, :]) + w * add[..., t, :]
    """
    if inplace:  # the memory keeps its dtype
        weights, add, erase = autocast_promote(weights, add, erase, to=memory.dtype)
    else:
        memory, weights, add, erase = autocast_promote(memory, weights, add, erase)
    name = check_write_args(memory, indices, weights, add, erase, backend)
    if inplace:
        grad_needed = torch.is_grad_enabled() and any(
            t.requires_grad for t in (memory, weights, add, erase))
        if grad_needed:
            raise RuntimeError("gated_memory_write(inplace=True) cannot be differentiated: a gradient "
                               "is required by one of memory, weights, add, erase (use inplace=False, "
                               "or run under torch.no_grad())")
    if name == "reference":  # the custom ops check the values themselves, at call time
        check_write_values(memory, indices, weights, add, erase)
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
    memory, update, input_gate, forget_gate = autocast_promote(memory, update, input_gate, forget_gate)
    name = check_dense_args(memory, update, input_gate, forget_gate, backend)
    if name == "reference":
        return gated_dense_update_ref(memory, update, input_gate, forget_gate)
    if eager_call(memory, update, input_gate, forget_gate):
        return gated_dense_update_eager(memory, update, input_gate, forget_gate, name)
    return gated_dense_update_op(memory, update, input_gate, forget_gate, name)
