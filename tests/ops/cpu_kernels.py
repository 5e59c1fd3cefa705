"""The CPU kernels of ``l2m_kernels._C`` behind the calling convention of ``l2m_kernels._C_cuda``,
so that the bodies of the gpu tests (``tests/ops/<op>/test_<op>_cuda.py``) also run on a machine
without a GPU, on CPU tensors: their inputs, the calls, the NaN-filled outputs and every judgement
run as on the GPU, with the CPU kernels in the CUDA kernels' place. A test body that is broken
fails here, not on scarce GPU time.

Where the conventions differ, the CPU call gives the same result: the CUDA functions' plan and
scratch arguments are taken and not read (the tests' calls still make them, through the same
launchers and plans as the cuda backend); the top-k read has one (exact, deterministic) selection
and backward, so ``tau``, ``use_threshold`` and ``deterministic`` change nothing (the threshold
pre-pass bounds nothing: its chunk maxima are INT64_MIN); the backwards of both reads write their
atomic mode's float32 accumulators too, and the product-key segment sums have nothing left to do;
the product-key backward's per-entry value rows are the CPU's coalesced rows with one row per
entry; the memory write's per-entry gradient parts carry the CPU's per-step gradient in the first
written entry of each step (their sum over the step is what the tests compare); the dense update
reads contiguous copies of its views.
"""
from __future__ import annotations

import torch

from l2m_kernels import _ext


def cpu_kernels_reason() -> str | None:
    """Why the CPU kernels cannot stand in (None when they can)."""
    error = _ext.cpu_extension_error()
    return None if error is None else f"needs l2m_kernels._C: {error}"


class CpuKernelsAsCuda:
    """``l2m_kernels._C_cuda``'s functions, computed by ``l2m_kernels._C`` on CPU tensors."""

    def __init__(self):
        self.cpu = _ext.cpu_extension()

    def __getattr__(self, name):
        # merge, local_attention_fwd and memory_read_weights share the CUDA signatures.
        return getattr(self.cpu, name)

    def topk_read_num_chunks(self, num_slots):
        return -(-num_slots // 128)  # chunks of 128 slots, as the CUDA kernels' kTopkReadChunkSlots

    def topk_read_chunk_max(self, q, keys, values, valid_len, k, scale, chunk_max):
        chunk_max.fill_(torch.iinfo(torch.int64).min)

    def topk_read_fwd(self, q, keys, values, valid_len, k, scale, tau, out, indices, weights, lse):
        self.cpu.topk_read_fwd(q, keys, values, valid_len, k, scale, out, indices, weights, lse)

    def topk_read_bwd(self, dout, dweights, dlse, q, keys, values, indices, weights, scale,
                      deterministic, entry_order, entry_rows, run_starts, ds, dkeys_acc,
                      dvalues_acc, dq, dkeys, dvalues):
        self.cpu.topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale,
                               dq, dkeys, dvalues)
        _accumulated((dkeys_acc, dkeys), (dvalues_acc, dvalues))

    def product_key_fwd(self, q, subkeys, values, k, k_sub, scale, sum_heads, half_scores,
                        half_ids, out, indices, weights, lse):
        self.cpu.product_key_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, out, indices,
                                 weights, lse)

    def product_key_bwd(self, dout, dweights, dlse, q, subkeys, values, indices, weights, scale,
                        sum_heads, sparse_grad, deterministic, ds, dsubkeys_acc, dvalues_acc, dq,
                        dsubkeys, dvalues):
        # Sparse: (B * H * T * k, Dv), row m = w_m * dout of entry m (one coalesced row each).
        value_rows = torch.arange(indices.numel()).view(indices.shape) if sparse_grad else None
        entry_order = (torch.arange(indices.numel()) if sparse_grad
                       else torch.sort(indices.reshape(-1), stable=True).indices)
        self.cpu.product_key_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale,
                                 sum_heads, sparse_grad, entry_order, dq, dsubkeys, dvalues, value_rows)
        _accumulated((dsubkeys_acc, dsubkeys), (dvalues_acc, dvalues))

    def product_key_segment_sum(self, src, coef, entry_coef, entry_src, run_starts, scale, dst):
        pass  # product_key_bwd wrote dst

    def local_attention_bwd(self, dout, dlse, q, k, v, out, lse, window, scale, delta, dq, dk,
                            dv):
        self.cpu.local_attention_bwd(dout, dlse, q, k, v, out, lse, window, scale, dq, dk, dv)

    def gated_memory_write_fwd(self, memory, indices, weights, add, erase, order, run_length, out):
        self.cpu.gated_memory_write_fwd(memory, indices, weights, add, erase, out)

    def gated_memory_write_bwd(self, dnew, memory, indices, weights, add, erase, order, run_length,
                               dweight_partial, dmemory, dweights, add_parts, erase_parts):
        G, T, kw = indices.shape
        dadd = torch.empty_like(add)
        derase = torch.empty_like(erase)
        self.cpu.gated_memory_write_bwd(dnew, memory, indices, weights, add, erase, dmemory,
                                        dweights, dadd, derase)
        # Each step's gradient in its first written entry, 0 in its other written entries (the
        # caller zeroed the parts of skipped entries).
        live = indices >= 0
        first = live & (live.long().cumsum(-1) == 1)
        for parts, grad in ((add_parts, dadd), (erase_parts, derase)):
            view = parts.view(G, T, kw, parts.shape[-1])
            per_entry = grad.float().unsqueeze(2).expand_as(view)
            view[live] = torch.where(first.unsqueeze(-1), per_entry, 0.0)[live]

    def gated_dense_update_fwd(self, memory, update, input_gate, forget_gate, out):
        self.cpu.gated_dense_update_fwd(*(t.contiguous() for t in (memory, update, input_gate,
                                                                   forget_gate)), out)

    def gated_dense_update_bwd(self, dout, memory, update, input_gate, forget_gate, dmemory,
                               dupdate, dinput_gate, dforget_gate):
        self.cpu.gated_dense_update_bwd(dout, *(t.contiguous() for t in (memory, update, input_gate,
                                                                         forget_gate)),
                                        dmemory, dupdate, dinput_gate, dforget_gate)


def _accumulated(*pairs):
    """The atomic mode's float32 accumulators given (not None) hold their gradients' values, as the
    CUDA kernels leave them for the caller to copy back."""
    for acc, grad in pairs:
        if acc is not None and acc is not grad:
            acc.copy_(grad)


def cpu_kernels_as_cuda() -> CpuKernelsAsCuda:
    """The stand-in, or a skip that says why there is none."""
    import pytest

    reason = cpu_kernels_reason()
    if reason is not None:
        pytest.skip(reason)
    return CpuKernelsAsCuda()
