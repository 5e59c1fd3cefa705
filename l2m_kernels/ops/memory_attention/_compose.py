"""The ``memory_attention`` of the compiled backends (cpu, cuda): the fused top-k read, a
FlashAttention-style local attention and the merge kernels of one extension module
(``l2m_kernels._C`` or ``l2m_kernels._C_cuda``, which export the same functions; the cuda local
backward takes a scratch tensor more), composed.

Forward (nothing of size ``T x S`` or ``T x N`` is ever held):

1. ``topk_read_fwd``: the memory read (scores in registers, running top-k) -> ``out_mem``,
   ``indices``, ``lse_mem``.
2. ``local_attention_fwd``: causal / sliding-window attention with an online softmax ->
   ``out_local``, ``lse_local``.
3. ``merge_attention_fwd`` (``merge="joint"``) or ``gated_merge_fwd`` (``merge="gate"``, the gate
   broadcast to one logit per (b, h, t) row) -> ``out``.

Backward. The autograd function saves ``out``, ``lse_local``, ``lse_mem`` and ``indices`` only, so
the read's softmax weights are recomputed from the ``topk`` selected key rows
(``w_j = exp(scale * <q, key_j> - lse_mem)``, the extension's ``memory_read_weights``), which costs
``B·H·T·topk·(D + Dv)`` operations against the ``B·H·T·N·D`` of the scoring.

- ``merge="joint"`` is one softmax over the local keys and the memory entries, so, as in
  FlashAttention, ``out_local`` and ``out_mem`` need not be recomputed: with
  ``wa = exp(lse_local - lse)``, ``wb = exp(lse_mem - lse)`` (``lse`` the merged log-sum-exp) and
  ``dot = <dout, out>``, the local part is the local backward of ``(wa * dout, dlse_local)`` with the
  merged ``out`` standing in for ``out_local`` (it enters only through
  ``<wa * dout, out> - dlse_local``), and the memory part is the read's backward of
  ``wb * dout`` with ``dlse = dlse_mem + wb * (<dout, out_mem> - dot)``, where
  ``<dout, out_mem> = sum_j w_j <dout, v_j>`` comes from the gathered value rows.
- ``merge="gate"``: ``out_local`` is recomputed (the local forward, cheap next to the scoring),
  ``out_mem`` from the gathered rows, then ``gated_merge_bwd`` gives ``d_local``, ``d_mem`` and the
  per-row gate gradient, reduced to the gate's shape.

The two parts' ``dq`` are summed. The local attention, the read weights and the merges are
deterministic on both backends (rows independent; the local ``dk``/``dv`` reduced per key block).
The read's slot gradients: the cpu ``topk_read_bwd`` always reduces them per slot in a fixed
order; the cuda one scatters them with float32 atomics unless ``deterministic`` is set (then a
fixed-order per-slot reduction, bitwise reproducible), which is passed through.
"""
from __future__ import annotations

from functools import partial

import torch

from ... import _ext
from ..._alloc import empty
from .._common import acc_dtype, rows_for
from ..topk_read import function as topk_read_function

BACKENDS = ("cpu", "cuda")


def extension(backend: str):
    """The extension module of ``backend`` ("cpu" or "cuda"); NotImplementedError when unusable."""
    if backend == "cpu":
        module, error = _ext.cpu_extension(), _ext.cpu_extension_error
    elif backend == "cuda":
        module, error = _ext.cuda_extension(), _ext.cuda_extension_error
    else:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if module is None:
        raise NotImplementedError(f"backend {backend!r} is unavailable: {error()}")
    return module


def _local_attention_bwd(backend: str, ext):
    """``backend``'s local attention backward, with the cpu extension's arguments: the cuda kernels
    also take a scratch tensor (``cuda.local_attention_bwd``)."""
    if backend == "cuda":
        from .cuda import local_attention_bwd
        return partial(local_attention_bwd, ext)
    return ext.local_attention_bwd


def _window_arg(window) -> int:
    return -1 if window is None else int(window)


def _gate_rows(gate, B, H, T):
    # gate broadcasts to (B, H, T, 1); the row kernels take one logit per (b, h, t).
    return gate.expand(B, H, T, 1).reshape(-1).contiguous()


def _reduce_gate_grad(d_gate_rows, gate):
    """The per-row gate gradient (B, H, T) summed over the dimensions the gate was broadcast along."""
    if gate.dim() == 0:
        return d_gate_rows.sum().to(gate.dtype)
    return d_gate_rows.unsqueeze(-1).sum_to_size(gate.shape).to(gate.dtype).reshape(gate.shape)


def memory_attention_fwd(backend, q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len,
                         deterministic):
    B, H, T, _ = q.shape
    Dv = v.shape[-1]
    acc = acc_dtype(q.dtype)
    device = q.device
    ext = extension(backend)
    out = empty((B, H, T, Dv), dtype=q.dtype, device=device)
    lse_local = empty((B, H, T), dtype=acc, device=device)
    # The top-k read's own launcher: it allocates its outputs and launches nothing without rows.
    # Its weights are not returned (the backward recomputes them).
    out_mem, indices, _, lse_mem = topk_read_function.FWD[backend](q, mem_keys, mem_values, topk, scale, valid_len,
                                                                   deterministic)
    if B * H * T == 0:
        return out, lse_local, lse_mem, indices
    rows_of = rows_for(backend)
    q, k, v = rows_of(q), rows_of(k), rows_of(v)

    out_local = empty((B, H, T, Dv), dtype=q.dtype, device=device)
    ext.local_attention_fwd(q, k, v, _window_arg(window), scale, out_local, lse_local)

    rows = B * H * T
    if merge == "joint":
        merged_lse = empty((rows,), dtype=acc, device=device)
        ext.merge_attention_fwd(out_local.view(rows, Dv), lse_local.view(rows), out_mem.view(rows, Dv),
                                lse_mem.view(rows), out.view(rows, Dv), merged_lse)
    else:
        ext.gated_merge_fwd(out_local.view(rows, Dv), out_mem.view(rows, Dv), _gate_rows(gate, B, H, T),
                            out.view(rows, Dv))
    return out, lse_local, lse_mem, indices


def _read_weights(ext, q, mem_keys, mem_values, indices, lse_mem, scale, dout=None):
    """The read's softmax weights recomputed at the forward's selection
    (``w_j = exp(<scale * q, key_j> - lse_mem)``, one pass over the ``topk`` selected rows per
    query), and per query row either ``sum_j w_j <dout, v_j>`` (given ``dout``; accumulation dtype)
    or ``out_mem = sum_j w_j v_j`` (input dtype).

    Returns (weights (B, H, T, topk) acc, dots (B, H, T) acc or out_mem (B, H, T, Dv)).
    """
    B, H, T, _ = q.shape
    acc = acc_dtype(q.dtype)
    weights = empty(indices.shape, dtype=acc, device=q.device)
    if dout is not None:
        dots = empty((B, H, T), dtype=acc, device=q.device)
        ext.memory_read_weights(q, mem_keys, mem_values, indices, lse_mem, scale, dout, weights, dots, None)
        return weights, dots
    out_mem = empty((B, H, T, mem_values.shape[-1]), dtype=q.dtype, device=q.device)
    ext.memory_read_weights(q, mem_keys, mem_values, indices, lse_mem, scale, None, weights, None, out_mem)
    return weights, out_mem


def _joint_weights(lse_local, lse_mem):
    """Merged lse and the weights of the local and memory parts in the joint softmax (per row)."""
    neg_inf = float("-inf")
    top = torch.maximum(lse_local, lse_mem)  # NaN-propagating
    lse = torch.where(top == neg_inf, neg_inf, top + torch.log1p(torch.exp(-(lse_local - lse_mem).abs())))
    w_local = torch.where(lse_local == neg_inf, 0.0, torch.exp(lse_local - lse))
    w_mem = torch.where(lse_mem == neg_inf, 0.0, torch.exp(lse_mem - lse))
    return w_local, w_mem


def memory_attention_bwd(backend, dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values, indices, out,
                         lse_local, lse_mem, window, merge, gate, scale, deterministic):
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    topk = indices.shape[-1]
    acc = acc_dtype(q.dtype)
    device = q.device
    dtype = q.dtype
    rows_of = rows_for(backend)  # q, k, v and dout as they come where the kernels read strides
    q, k, v = rows_of(q), rows_of(k), rows_of(v)
    mem_keys, mem_values = mem_keys.contiguous(), mem_values.contiguous()
    dout, out = rows_of(dout), out.contiguous()
    dlse_local, dlse_mem = dlse_local.to(acc).contiguous(), dlse_mem.to(acc).contiguous()
    lse_local, lse_mem, indices = lse_local.contiguous(), lse_mem.contiguous(), indices.contiguous()
    ext = extension(backend)
    local_bwd = _local_attention_bwd(backend, ext)
    w = _window_arg(window)

    def read_bwd(dout_read, dweights, dlse_read, weights):
        """The top-k read's own backward launcher: (dq, dmem_keys, dmem_values)."""
        return topk_read_function.BWD[backend](dout_read, dweights, dlse_read, q, mem_keys, mem_values, indices,
                                               weights, scale, deterministic)

    dq = empty(q.shape, dtype=dtype, device=device)
    dk = empty(k.shape, dtype=dtype, device=device)
    dv = empty(v.shape, dtype=dtype, device=device)
    no_gate = q.new_empty(0)

    rows = B * H * T
    if rows == 0:
        # No query: every gradient is zero (the kernels zero dk / dv and the memory gradients).
        dlse_rows = torch.zeros((B, H, T), dtype=acc, device=device)
        local_bwd(dout, dlse_rows, q, k, v, out, dlse_rows, w, scale, dq, dk, dv)
        no_weights = torch.zeros((B, H, T, topk), dtype=acc, device=device)
        _, dmem_keys, dmem_values = read_bwd(dout, no_weights, dlse_rows, no_weights.clone())
        dgate = torch.zeros_like(gate) if gate is not None else no_gate
        return dq, dk, dv, dmem_keys, dmem_values, dgate

    dweights = torch.zeros((B, H, T, topk), dtype=acc, device=device)  # the read's weights are not outputs
    if merge == "joint":
        weights, mem_dots = _read_weights(ext, q, mem_keys, mem_values, indices, lse_mem, scale, dout=dout)
        w_local, w_mem = _joint_weights(lse_local, lse_mem)
        dout_acc = dout.to(acc)
        out_dots = (dout_acc * out.to(acc)).sum(-1)
        dout_local = (dout_acc * w_local.unsqueeze(-1)).to(dtype)
        dout_mem = (dout_acc * w_mem.unsqueeze(-1)).to(dtype)
        del dout_acc
        local_bwd(dout_local, dlse_local, q, k, v, out, lse_local, w, scale, dq, dk, dv)
        dlse_read = dlse_mem + w_mem * (mem_dots - out_dots)
        dq_mem, dmem_keys, dmem_values = read_bwd(dout_mem, dweights, dlse_read, weights)
        dgate = no_gate
    else:
        weights, out_mem = _read_weights(ext, q, mem_keys, mem_values, indices, lse_mem, scale)
        out_local = empty((B, H, T, Dv), dtype=dtype, device=device)
        lse_again = empty((B, H, T), dtype=acc, device=device)
        ext.local_attention_fwd(q, k, v, w, scale, out_local, lse_again)
        del lse_again
        d_local = empty((B, H, T, Dv), dtype=dtype, device=device)
        d_mem = empty((B, H, T, Dv), dtype=dtype, device=device)
        d_gate_rows = empty((B, H, T), dtype=acc, device=device)
        ext.gated_merge_bwd(dout.contiguous().view(rows, Dv), out_local.view(rows, Dv), out_mem.view(rows, Dv),
                            _gate_rows(gate, B, H, T), d_local.view(rows, Dv), d_mem.view(rows, Dv),
                            d_gate_rows.view(rows))
        del out_mem
        local_bwd(d_local, dlse_local, q, k, v, out_local, lse_local, w, scale, dq, dk, dv)
        dq_mem, dmem_keys, dmem_values = read_bwd(d_mem, dweights, dlse_mem, weights)
        dgate = _reduce_gate_grad(d_gate_rows, gate)
    dq.add_(dq_mem)
    return dq, dk, dv, dmem_keys, dmem_values, dgate
