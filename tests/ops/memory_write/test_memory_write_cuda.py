"""The CUDA gated memory write kernels of ``l2m_kernels._C_cuda`` (gated_memory_write_fwd / _bwd),
called directly as function.py's GPU launchers call them (flat (G, ...) operands, the write
plan of ``plan.py`` and the backward's scratch), against the float64 reference (``l2m_kernels/ops/memory_write/reference.py``).

float32, float16 and bfloat16 with int32 and int64 indices: the forward out of place (every
written slot pre-filled with NaN; unwritten slots bitwise unchanged) and in place (bitwise equal
to out of place), all four gradients (every element the kernel must write pre-filled with NaN;
bitwise repeatable; skipped entries zero), over odd sizes (N 7/63/129/512, D
1/7/64/129/256/300/520: one and several column chunks, vector and scalar paths, unaligned bases),
T 7 and 64, kw 1/3/4, repeated slots within and across steps, -1 skips (with NaN weights), erase
(.., D) and (.., 1), empty B / T / kw / N / D, and bad calls. The forward rounds like the
reference evaluated in float32 (no fused multiply-add), so it is expected to match it bit for bit;
that is reported (a warning), not required.

Shared set-up, and the CPU kernels standing in without a CUDA device: ``tests/ops/_cuda.py``.
"""
from __future__ import annotations

import warnings

import torch

from l2m_kernels.ops.memory_write.plan import write_plan
from l2m_kernels.ops.memory_write.reference import gated_memory_write_ref
from l2m_kernels.testing import assert_close, bits_equal, placed
from .._cuda import (NAN, assert_bad_calls_listed, bad_call_test, cpu_kernels_test,
                     cuda_kernel_test)

# (B, Hm, N, D, T, kw, one erase gate per step, index dtype, special). Column chunks per warp:
# 128 (float32) / 256 (16-bit) columns; vector path when D % 4 (float32) / D % 8 (16-bit) == 0
# and every base pointer is 16-byte aligned, else the scalar path.
CASES = [
    (2, 2, 7, 7, 7, 3, False, torch.int64, None),          # N = 7: many repeated slots
    (1, 3, 63, 129, 7, 1, True, torch.int32, None),       # scalar path, 2 float chunks
    (2, 1, 129, 300, 7, 3, False, torch.int32, "skips"),  # float vector (3 chunks), 16-bit scalar
    (2, 1, 129, 300, 7, 3, True, torch.int64, "skips"),   # multi-chunk sums with one gate
    (2, 2, 7, 1, 7, 3, True, torch.int64, None),          # D = 1
    (1, 2, 63, 1, 7, 1, False, torch.int32, "skips"),     # D = 1, erase (.., D) == (.., 1)
    (2, 2, 129, 64, 7, 3, False, torch.int64, "repeat"),  # same slot within and across steps
    (1, 1, 7, 129, 7, 3, True, torch.int32, "repeat"),
    (2, 2, 63, 520, 7, 3, True, torch.int64, "repeat"),   # vector: 5 float / 3 16-bit chunks
    (2, 2, 63, 520, 7, 3, False, torch.int32, None),
    (2, 2, 63, 256, 7, 3, False, torch.int64, "misaligned"),  # scalar path (unaligned bases)
    (2, 2, 63, 256, 7, 3, True, torch.int64, None),       # vector path, 2 / 1 chunks
    (2, 2, 63, 64, 7, 3, False, torch.int64, "nan_skipped"),  # NaN weights of -1 entries
    (2, 2, 63, 64, 7, 3, True, torch.int64, "all_skipped"),
    (4, 16, 512, 64, 64, 4, False, torch.int64, "skips"),  # 16384 entries, many warps
    (0, 2, 7, 8, 7, 3, False, torch.int64, None),         # empty batch
    (2, 2, 7, 8, 0, 3, False, torch.int64, None),         # T = 0
    (2, 2, 7, 8, 7, 0, True, torch.int32, None),          # kw = 0
    (2, 2, 0, 8, 7, 3, False, torch.int64, "all_skipped"),  # N = 0 (only -1 possible)
    (2, 2, 7, 0, 7, 3, False, torch.int64, None),         # D = 0
    (2, 2, 7, 0, 7, 3, True, torch.int64, None),          # D = 0, one gate
]


def _case_id(case):
    B, Hm, N, D, T, kw, one_gate, index_dtype, special = case
    return (f"B{B}Hm{Hm}N{N}D{D}T{T}kw{kw}-erase{'1' if one_gate else 'D'}-"
            f"{str(index_dtype).removeprefix('torch.')}{'-' + special if special else ''}")


def write_inputs(case, dtype, device):
    """memory (B, Hm, N, D), indices (B, Hm, T, kw) (-1: skipped), weights for the kernel and for
    the reference (0 where skipped: the reference's autograd would turn 0 * NaN into NaN through
    the discarded branch), add (B, Hm, T, D) and erase (B, Hm, T, D or 1)."""
    B, Hm, N, D, T, kw, one_gate, index_dtype, special = case
    memory = torch.randn(B, Hm, N, D, device=device).to(dtype)
    if N > 0:
        indices = torch.randint(0, N, (B, Hm, T, kw), device=device)
    else:
        indices = torch.full((B, Hm, T, kw), -1, dtype=torch.int64, device=device)
    if special in ("skips", "nan_skipped"):
        indices[torch.rand(indices.shape, device=device) < 0.25] = -1
    if special == "all_skipped":
        indices.fill_(-1)
    if special == "repeat" and T >= 3 and kw >= 1 and N > 0:
        indices[..., 0, :] = 0          # every write of step 0 to slot 0 (repeats in one step)
        indices[..., 2, 0] = 0          # and slot 0 again at a later step
        indices[..., 1::2, -1] = N - 1  # slot N - 1 at every other step
    indices = indices.to(index_dtype)
    ref_weights = torch.rand(B, Hm, T, kw, device=device).to(dtype)
    add = torch.randn(B, Hm, T, D, device=device).to(dtype)
    erase = torch.rand(B, Hm, T, 1 if one_gate else D, device=device).to(dtype)
    skipped = indices < 0
    weights = ref_weights.masked_fill(skipped, NAN) if special == "nan_skipped" else ref_weights
    return memory, indices, weights, ref_weights, add, erase


def write_expected(memory, indices, ref_weights, add, erase, dnew):
    """The float64 reference (out and the gradients of memory, weights, add, erase) and the same
    at the input dtype (the baselines)."""
    results = []
    for cast in (torch.Tensor.double, torch.Tensor.clone):
        leaves = [cast(t).requires_grad_() for t in (memory, ref_weights, add, erase)]
        out = gated_memory_write_ref(leaves[0], indices, *leaves[1:])
        grads = torch.autograd.grad(out, leaves, cast(dnew), allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        results.append((out.detach(), grads))
    return results


def check_memory_write(ext, device, case, dtype):
    B, Hm, N, D, T, kw, one_gate, index_dtype, special = case
    G, E = B * Hm, B * Hm * T * kw
    erase_dim = 1 if one_gate else D
    misalign = 1 if special == "misaligned" else 0
    memory, indices, weights, ref_weights, add, erase = write_inputs(case, dtype, device)
    skipped = indices < 0

    def flat(t):
        return t.reshape(G, *t.shape[2:])

    mem_f, idx_f, w_f, add_f, erase_f = (flat(t) for t in (memory, indices, weights, add, erase))
    if misalign:
        mem_f, add_f, erase_f = (placed(t, misalign) for t in (mem_f, add_f, erase_f))
    plan = write_plan(idx_f.reshape(G, T * kw), N)
    written = torch.zeros(G, N, dtype=torch.bool, device=device)  # slots some entry writes
    live = idx_f >= 0
    if live.any():
        group_ids = torch.arange(G, device=device)[:, None, None].expand_as(idx_f)
        written[group_ids[live], idx_f[live].long()] = True

    # Forward, out of place: out is memory's copy with every written slot poisoned (the kernel
    # must store each of them, reading memory, not out).
    out = placed(mem_f, misalign)
    out[written] = NAN
    ext.gated_memory_write_fwd(mem_f, idx_f, w_f, add_f, erase_f, plan.order,
                               plan.run_length, out)
    dnew = torch.randn(B, Hm, N, D, device=device).to(dtype)
    (ref_out, expected), (low_out, baseline) = write_expected(memory, indices, ref_weights, add,
                                                              erase, dnew)
    assert_close("out", out.reshape(memory.shape), ref_out, dtype, baseline=low_out)
    assert bits_equal(out[~written], mem_f[~written]), "an unwritten slot changed"
    if not bits_equal(out.reshape(memory.shape), low_out):
        warnings.warn("gated_memory_write_fwd is not bitwise equal to the reference evaluated in "
                      f"float32 ({_case_id(case)}, {dtype})")
    # In place: the same bits as out of place (same code), untouched slots unchanged.
    in_place = placed(mem_f, misalign)
    ext.gated_memory_write_fwd(in_place, idx_f, w_f, add_f, erase_f, plan.order,
                               plan.run_length, in_place)
    assert bits_equal(in_place, out), "in place differs from out of place"

    # Backward, buffers as _gpu_write_bwd passes them (dmemory = dnew's copy, the rest zeroed),
    # with every element the kernel must write poisoned.
    dnew_f = placed(flat(dnew), misalign)
    live_entries = live.reshape(E)

    def backward():
        dmemory = placed(dnew_f, misalign)
        dweights = torch.zeros(G, T, kw, dtype=dtype, device=device)
        add_parts = placed(torch.zeros(E, D, device=device), misalign)
        erase_parts = placed(torch.zeros(E, erase_dim, device=device), misalign)
        if D > 0:  # with D == 0 the kernel has nothing to do and the zeros are the answer
            dmemory[written] = NAN
            dweights[live] = NAN
            add_parts[live_entries] = NAN
            erase_parts[live_entries] = NAN
        dweight_partial = torch.empty(E, device=device)  # scratch
        ext.gated_memory_write_bwd(dnew_f, mem_f, idx_f, w_f, add_f, erase_f, plan.order,
                                   plan.run_length, dweight_partial, dmemory, dweights, add_parts,
                                   erase_parts)
        dadd = add_parts.view(G, T, kw, D).sum(2).to(dtype)
        derase = erase_parts.view(G, T, kw, erase_dim).sum(2).to(dtype)
        return (dmemory.reshape(memory.shape), dweights.reshape(weights.shape),
                dadd.reshape(add.shape), derase.reshape(erase.shape), add_parts, erase_parts)

    grads = backward()
    assert all(bits_equal(a, b) for a, b in zip(grads, backward())), \
        "backward not bitwise repeatable"
    assert bits_equal(grads[0].reshape(G, N, D)[~written], flat(dnew)[~written]), \
        "dmemory of an unwritten slot is not dnew"
    assert (bits_equal(grads[4][~live_entries], torch.zeros_like(grads[4][~live_entries]))
            and bits_equal(grads[1][skipped], torch.zeros_like(grads[1][skipped]))), \
        "a skipped entry got a nonzero gradient part"
    for name, actual, exp, base in zip(("dmemory", "dweights", "dadd", "derase"), grads, expected,
                                       baseline):
        assert_close(name, actual, exp, dtype, baseline=base)


def _bad_calls(device):
    """Bad gated_memory_write calls and the exception type each raises (TORCH_CHECK_VALUE:
    ValueError, _TYPE: TypeError, overlap: RuntimeError); they never launch."""
    G, N, D, T, kw = 2, 5, 8, 3, 2
    E = G * T * kw
    memory = torch.randn(G, N, D, device=device)
    indices = torch.randint(0, N, (G, T, kw), device=device)
    weights = torch.rand(G, T, kw, device=device)
    add = torch.randn(G, T, D, device=device)
    erase = torch.rand(G, T, D, device=device)
    order = torch.arange(E, device=device)
    run_length = torch.ones(E, dtype=torch.int32, device=device)  # never launched with these

    def fwd(**changes):
        args = dict(memory=memory, indices=indices, weights=weights, add=add, erase=erase,
                    order=order, run_length=run_length, out=torch.empty_like(memory))
        args.update(changes)
        return lambda ext: ext.gated_memory_write_fwd(**args)

    def bwd(**changes):
        args = dict(dnew=torch.randn_like(memory), memory=memory, indices=indices,
                    weights=weights, add=add, erase=erase, order=order, run_length=run_length,
                    dweight_partial=torch.empty(E, device=device),
                    dmemory=torch.empty_like(memory), dweights=torch.zeros_like(weights),
                    add_parts=torch.zeros(E, D, device=device),
                    erase_parts=torch.zeros(E, D, device=device))
        args.update(changes)
        return lambda ext: ext.gated_memory_write_bwd(**args)

    shared = torch.randn(G * N * D + D, device=device)
    buffer = torch.empty(G * N * D, device=device)
    same = torch.randn_like(memory)
    return {
        "float64": (TypeError, fwd(memory=memory.double(), weights=weights.double(),
                                   add=add.double(), erase=erase.double(),
                                   out=torch.empty_like(memory.double()))),
        "weights dtype": (TypeError, fwd(weights=weights.half())),
        "float indices": (TypeError, fwd(indices=indices.float())),
        "order int32": (TypeError, fwd(order=order.int())),
        "run_length int64": (TypeError, fwd(run_length=run_length.long())),
        "order shape": (ValueError, fwd(order=order[:-1])),
        "erase shape": (ValueError, fwd(erase=torch.rand(G, T, 2, device=device))),
        "add shape": (ValueError, fwd(add=add[:, :, :-1].contiguous())),
        "memory 4-D": (ValueError, fwd(memory=memory[None], out=torch.empty_like(memory[None]))),
        "cpu tensor": (ValueError, fwd(memory=memory.cpu(), out=memory.cpu())),
        "non-contiguous": (ValueError, fwd(add=add.transpose(0, 1).contiguous().transpose(0, 1))),
        "out overlaps memory partially": (RuntimeError, fwd(
            memory=shared[:G * N * D].view(G, N, D), out=shared[D:].view(G, N, D))),
        "out overlaps weights": (RuntimeError, fwd(weights=buffer[:G * T * kw].view(G, T, kw),
                                                   out=buffer.view(G, N, D))),
        "bwd add_parts dtype": (TypeError, bwd(add_parts=torch.zeros(E, D, dtype=torch.float16,
                                                                     device=device))),
        "bwd erase_parts shape": (ValueError, bwd(erase_parts=torch.zeros(E, 1, device=device))),
        "bwd dweights shape": (ValueError, bwd(dweights=torch.zeros(G, T, kw + 1, device=device))),
        "bwd dmemory is dnew": (RuntimeError, bwd(dnew=same, dmemory=same)),
    }


test_memory_write_cuda = cuda_kernel_test(check_memory_write, CASES, _case_id)
test_memory_write_bad_call_raises = bad_call_test(_bad_calls)


def test_memory_write_cases_and_reference_side_on_cpu():
    """What the gpu tests run before the kernel, here on CPU tensors (float32): every case's
    inputs, its write plan, the specials doing what they say, and the reference side."""
    assert len({_case_id(case) for case in CASES}) == len(CASES)
    for case in CASES:
        B, Hm, N, D, T, kw, one_gate, index_dtype, special = case
        memory, indices, weights, ref_weights, add, erase = write_inputs(case, torch.float32, "cpu")
        assert indices.dtype == index_dtype and ((indices >= -1) & (indices < max(N, 1))).all()
        assert erase.shape[-1] == (1 if one_gate else D)
        if special == "all_skipped":
            assert (indices == -1).all()
        if special == "nan_skipped" and (indices < 0).any():
            assert weights[indices < 0].isnan().all() and not ref_weights.isnan().any()
        if special == "repeat":
            assert (indices[..., 0, :] == 0).all()
        G = B * Hm
        plan = write_plan(indices.reshape(G, T * kw), N)
        assert plan.order.shape == (G * T * kw,) and plan.run_length.dtype == torch.int32
        assert int(plan.run_length.sum()) == int((indices >= 0).sum())
        if memory.numel() * max(T * kw, 1) > 400_000:  # seconds on a CPU
            continue
        dnew = torch.randn(memory.shape)
        (out, grads), (low_out, low_grads) = write_expected(memory, indices, ref_weights, add,
                                                           erase, dnew)
        assert out.shape == memory.shape and out.dtype == torch.float64
        assert [g.shape for g in grads] == [t.shape for t in (memory, weights, add, erase)]
        assert torch.isfinite(out).all() and low_out.dtype == torch.float32
    assert_bad_calls_listed(_bad_calls)


# A few cases whose bodies also run on CPU tensors with the CPU kernels in the CUDA kernels' place:
# repeated slots, skips, repeats within a step, unaligned bases, NaN weights of skipped entries,
# an empty batch, D = 0.
CPU_CASES = [CASES[i] for i in (0, 2, 6, 10, 12, 15, 19)]


test_memory_write_body_runs_on_cpu_kernels = cpu_kernels_test(check_memory_write, CPU_CASES,
                                                              _case_id)
