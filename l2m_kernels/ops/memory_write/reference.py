"""Reference (naive PyTorch) gated memory writes: the specification the fused kernels are checked against.

- :func:`gated_memory_write_ref` applies the writes one ``(t, j)`` step at a time on one working copy,
  differentiable (the forward costs O(T * kw * D) after the copy, but autograd's backward of each
  in-place row write copies the whole memory gradient, so the backward costs O(T * kw * N * D): the
  honest naive baseline the SPEC benchmark shape is sized for).
- :func:`gated_memory_write_ref_` is the in-place form (no autograd) with the same result, bit for bit,
  at O(T * kw * D) cost; it only ever stores to slots that are written.
- :func:`gated_dense_update_ref` is the LM2-style whole-memory update.

All three compute in float32 for float16/bfloat16 inputs (float64 for float64) and round once, at
the end, to the output dtype. Inputs are not validated beyond what the math needs: the public API
(``l2m.gated_memory_write``) checks shapes, dtypes and index ranges before calling in.
"""
from __future__ import annotations

import functools

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _with_head_dim(memory, indices, weights, add, erase):
    """View the 3-D form ``memory (B, N, D)`` as ``(B, 1, N, D)`` (and the others likewise)."""
    if memory.dim() == 3:
        return (memory.unsqueeze(1), indices.unsqueeze(1), weights.unsqueeze(1), add.unsqueeze(1),
                erase.unsqueeze(1), True)
    return memory, indices, weights, add, erase, False


def gated_memory_write_ref(memory, indices, weights, add, erase):
    """Gated erase-and-add writes into memory slots, applied in order (out of place, differentiable).

    Args:
        memory:  (B, Hm, N, D), or (B, N, D); float32, float16, bfloat16 or float64.
        indices: (B, Hm, T, kw), or (B, T, kw); int32 or int64 slot ids in [-1, N), -1 = no write.
        weights: the shape of ``indices``, same dtype as ``memory``; write strengths in [0, 1].
        add:     (B, Hm, T, D), or (B, T, D); the vector written at step t.
        erase:   (B, Hm, T, D) or (B, Hm, T, 1) (or (B, T, D) / (B, T, 1)); erase gates in [0, 1].

    Returns:
        A new tensor shaped and typed like ``memory`` (never ``memory`` itself, even when T == 0).
        Differentiable in memory, weights, add and erase, with the exact sequential semantics: a slot
        written several times sees, and passes gradient through, every write in order.

    Equivalent PyTorch:
        M = memory.clone()
        for b, h, t, j in itertools.product(range(B), range(Hm), range(T), range(kw)):  # t before j
            s = indices[b, h, t, j]
            if s >= 0:
                w = weights[b, h, t, j]
                M[b, h, s] = M[b, h, s] * (1 - w * erase[b, h, t]) + w * add[b, h, t]

    Notes:
        - Computed in float32 for float16/bfloat16 (float64 for float64) and rounded to the memory
          dtype once, after the last write (not after every write).
        - A step touches at most one slot per (b, h), so each step is one row read and one in-place
          row write (``index_copy_``) into a single float32 working copy, over (B, Hm) with no
          collisions. Autograd keeps only indices and the small per-step rows (O(T * kw * D) saved
          memory); its backward of each row write builds the memory gradient anew
          (``grad.index_fill``), so the backward costs about one (B, Hm, N, D) copy per step.
          (An out-of-place ``index_copy`` per step would also copy in the forward, and under glibc
          the freed copies, split by the small saved rows, fragment the heap: the process grew by
          about one memory copy per step.)
        - A skipped entry (-1) reads slot 0 and writes that same value back unchanged
          (``torch.where``), so it neither alters slot 0 nor blocks its gradient, and a NaN/inf in a
          skipped entry's ``add``/``erase``/``weights`` has no effect (and gets a zero gradient).
    """
    dtype = memory.dtype
    acc = _acc_dtype(dtype)
    mem, indices, weights, add, erase, squeeze = _with_head_dim(memory, indices, weights, add, erase)
    batch, mem_heads, _, dim = mem.shape
    steps, writes_per_step = indices.shape[-2], indices.shape[-1]

    num_slots = mem.shape[2]
    if num_slots == 0:  # only -1 entries are possible: nothing to write (and no slot 0 to read)
        return memory.clone()
    # One flat (B * Hm * N, D) table of rows; copy=True: a new tensor even with nothing to write,
    # and not a view (autograd cannot replay an in-place write on a view with the read's sparse
    # gradient).
    state = mem.reshape(batch * mem_heads * num_slots, dim).to(acc, copy=True)
    first_row = (torch.arange(batch * mem_heads, device=mem.device) * num_slots).reshape(batch, mem_heads)
    slot_ids = indices.to(torch.int64)
    write_weights = weights.to(acc)
    add_acc = add.to(acc)
    erase_acc = erase.to(acc)
    for t in range(steps):
        add_t = add_acc[:, :, t].reshape(batch * mem_heads, dim)
        erase_t = erase_acc[:, :, t].reshape(batch * mem_heads, erase.shape[-1])  # [B * Hm, D or 1]
        for j in range(writes_per_step):
            slot = slot_ids[:, :, t, j].reshape(-1)  # [B * Hm]
            row = first_row.reshape(-1) + slot.clamp_min(0)
            # The read's backward is a sparse (B * Hm row) gradient that autograd adds in place into
            # the dense one; plain indexing would build a zero-filled (B*Hm*N, D) tensor per step
            # and torch.gather would also save the whole state per step.
            old_row = torch.nn.functional.embedding(row, state, sparse=True)  # [B * Hm, D]
            w = write_weights[:, :, t, j].reshape(-1, 1)
            new_row = old_row * (1 - w * erase_t) + w * add_t
            kept_row = torch.where((slot >= 0)[:, None], new_row, old_row)
            state.index_copy_(0, row, kept_row)  # autograd keeps only `row`
    out = state.reshape(mem.shape).to(dtype)
    return out.squeeze(1) if squeeze else out


@torch.no_grad()
def gated_memory_write_ref_(memory, indices, weights, add, erase):
    """In-place form of :func:`gated_memory_write_ref`: updates ``memory`` and returns it.

    Same arguments and the same result, bit for bit (same float32/float64 arithmetic, one rounding at
    the end). Runs under ``torch.no_grad()``; refusing the call when a gradient is required is the
    caller's job (the public API raises ``RuntimeError``).

    Only slots named by an index are stored to; a skipped entry (-1) stores slot 0's value back
    unchanged when (b, h) does not write slot 0 itself (a no-op store that keeps the index math
    branch-free; the bits are preserved since the float32 round trip is exact).

    How: the T*kw writes of each (b, h) get one working row each, gathered from memory in float32.
    Writes to the same slot share the row of that slot's first write (skipped entries count as
    slot 0), so the loop over (t, j) updates O(D) values per step instead of rebuilding the memory;
    at the end every write position carries its slot's final value and one scatter stores them
    (duplicates store identical values, so the result does not depend on scatter order).

    Equivalent PyTorch:
        memory.copy_(gated_memory_write_ref(memory, indices, weights, add, erase))
    """
    dtype = memory.dtype
    acc = _acc_dtype(dtype)
    mem, indices, weights, add, erase, _ = _with_head_dim(memory, indices, weights, add, erase)
    batch, mem_heads, _, dim = mem.shape
    steps, writes_per_step = indices.shape[-2], indices.shape[-1]
    num_writes = steps * writes_per_step
    if num_writes == 0 or mem.numel() == 0:  # (N == 0 allows only -1 entries: nothing to do)
        return memory

    slot_ids = indices.reshape(batch, mem_heads, num_writes).to(torch.int64)
    is_write = slot_ids >= 0
    # Skipped entries join slot 0's group: they update nothing, and at the end they store slot 0's
    # final value, the same value its real writes (if any) store.
    target_slot = slot_ids.clamp_min(0)  # [B, Hm, P]

    # first_write[p]: position of the first write, in (t, j) order, whose target is target_slot[p].
    sorted_slot, order = torch.sort(target_slot, dim=-1, stable=True)
    starts_group = torch.ones_like(sorted_slot, dtype=torch.bool)
    starts_group[..., 1:] = sorted_slot[..., 1:] != sorted_slot[..., :-1]
    position = torch.arange(num_writes, device=mem.device).expand_as(order)
    group_start = torch.where(starts_group, position, torch.zeros_like(position)).cummax(dim=-1).values
    first_write = torch.empty_like(order).scatter_(-1, order, order.gather(-1, group_start))

    rows = mem.gather(2, target_slot[..., None].expand(batch, mem_heads, num_writes, dim)).to(acc)
    write_weights = weights.reshape(batch, mem_heads, num_writes).to(acc)
    add_acc = add.to(acc)
    erase_acc = erase.to(acc)
    for t in range(steps):
        add_t = add_acc[:, :, t].unsqueeze(2)  # [B, Hm, 1, D]
        erase_t = erase_acc[:, :, t].unsqueeze(2)  # [B, Hm, 1, D or 1]
        for j in range(writes_per_step):
            p = t * writes_per_step + j
            row_index = first_write[:, :, p, None, None].expand(batch, mem_heads, 1, dim)
            old_row = rows.gather(2, row_index)  # [B, Hm, 1, D]
            w = write_weights[:, :, p, None, None]
            new_row = old_row * (1 - w * erase_t) + w * add_t
            rows.scatter_(2, row_index, torch.where(is_write[:, :, p, None, None], new_row, old_row))

    final_rows = rows.gather(2, first_write[..., None].expand(batch, mem_heads, num_writes, dim))
    mem.scatter_(2, target_slot[..., None].expand(batch, mem_heads, num_writes, dim), final_rows.to(dtype))
    return memory


def gated_dense_update_ref(memory, update, input_gate, forget_gate):
    """LM2-style whole-memory update with PyTorch broadcasting.

    Args:
        memory:      any shape, e.g. (B, Hm, N, D) or (Hm, N, D).
        update:      candidate content, broadcastable with ``memory``.
        input_gate:  logits, broadcastable (e.g. (B, Hm, N, 1) or (Hm, 1, 1)).
        forget_gate: logits, broadcastable.

    Returns:
        Tensor of the broadcast shape of all four. Its dtype is the promotion of the four dtypes
        (``torch.promote_types``; with the SPEC's one-dtype-per-call rule, simply the input dtype).
        Unlike PyTorch's operator promotion, a 0-dim tensor of a wider float dtype does count.
        Computed in float32 (float64 when that dtype is float64), rounded once. Differentiable in all four.

    Equivalent PyTorch:
        torch.sigmoid(forget_gate) * memory + torch.sigmoid(input_gate) * torch.tanh(update)
    """
    out_dtype = functools.reduce(
        torch.promote_types, (memory.dtype, update.dtype, input_gate.dtype, forget_gate.dtype))
    acc = _acc_dtype(out_dtype)
    out = (torch.sigmoid(forget_gate.to(acc)) * memory.to(acc)
           + torch.sigmoid(input_gate.to(acc)) * torch.tanh(update.to(acc)))
    return out.to(out_dtype)
