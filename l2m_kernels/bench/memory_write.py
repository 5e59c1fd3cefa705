"""Benchmark gated_memory_write: fused backends vs the reference, eager and compiled, plus the
in-place forward's bandwidth against a memory copy measured in the same run.

Shape (SPEC): ``write-cpu`` B=2, Hm=4, N=4096, D=128, T=256, kw=4, float32; on CUDA ``write-gpu``
(B*8, bfloat16). ``--quick`` divides T by 4. The compiled reference runs only up to 256 write steps
(it unrolls them); a skipped row says why. The in-place rows count, as the issue defines, each
written slot read and written once plus the inputs read once (indices, weights, add, erase); the
out-of-place rows add one read and one write of the whole memory (the copy); these bytes are the
rows' floor (:class:`l2m_kernels.benchmark.Cost`), and the backward's is reading dnew and writing
dmemory (the whole memory), reading the inputs and the written slots again and writing the inputs'
gradients.
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.benchmark import Cost, Variant
from l2m_kernels.ops import registry
from l2m_kernels.ops.memory_write.reference import gated_dense_update_ref, gated_memory_write_ref

from ._common import bench_dtype, compare, fused_backends, spec_shapes

# The shapes of the op's declaration (l2m_kernels/ops/registry.py); TINY_SHAPES: tests only.
SHAPES = registry.OPS["gated_memory_write"].bench.shapes
TINY_SHAPES = registry.OPS["gated_memory_write"].bench.tiny
DENSE_SHAPES = registry.OPS["gated_dense_update"].bench.shapes
DENSE_TINY_SHAPES = registry.OPS["gated_dense_update"].bench.tiny


MAX_COMPILED_STEPS = 256  # the quick shape (T = 64, kw = 4) compiles in a few minutes on 2 cores


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *, tiny: bool = False,
        skip_compile_note: str | None = None) -> list:
    """``skip_compile_note``: skip the compiled reference whatever the shape, with this note (the
    ``--quick`` suite, whose time budget cannot hold minutes of compilation)."""
    rows = []
    dtype = bench_dtype(device)
    elt = torch.finfo(dtype).bits // 8
    for name, s in spec_shapes(SHAPES, TINY_SHAPES, device, tiny, quick=quick, quick_divisors={"T": 4}):
        B, Hm, N, D, T, kw = (s[x] for x in ("B", "Hm", "N", "D", "T", "kw"))
        shape = f"{name} B={B} Hm={Hm} N={N} D={D} T={T} kw={kw}"
        gen = torch.Generator(device="cpu").manual_seed(0)
        # Distinct written slots per memory, as the fused path touches them (collisions included).
        slots = torch.randint(0, N, (B, Hm, T, kw), generator=gen)
        touched = sum(int(torch.unique(slots[b, h]).numel()) for b in range(B) for h in range(Hm))
        inputs_bytes = B * Hm * T * (kw * (8 + elt) + 2 * D * elt)
        inplace_bytes = 2 * touched * D * elt + inputs_bytes
        copy_bytes = 2 * B * Hm * N * D * elt + inplace_bytes

        def make_inputs(requires_grad):
            def rnd(*sh, low=False):
                x = torch.rand(*sh, device=device, dtype=dtype) if low else torch.randn(*sh, device=device, dtype=dtype)
                return x.requires_grad_(requires_grad)
            return dict(memory=rnd(B, Hm, N, D), indices=slots.to(device), weights=rnd(B, Hm, T, kw, low=True),
                        add=rnd(B, Hm, T, D), erase=rnd(B, Hm, T, D, low=True))

        def reference(memory, indices, weights, add, erase):
            return gated_memory_write_ref(memory, indices, weights, add, erase)

        memory_bytes = 2 * B * Hm * N * D * elt
        copy_cost = Cost(fwd_bytes=copy_bytes, bwd_bytes=memory_bytes + 2 * inputs_bytes + touched * D * elt)
        fused = {}
        for b in fused_backends("gated_memory_write", device, dtype):
            fused[b] = Variant(b, (lambda b_: lambda memory, indices, weights, add, erase: l2m.gated_memory_write(
                memory, indices, weights, add, erase, backend=b_))(b), cost=copy_cost)
        for b in fused_backends("gated_memory_write", device, dtype):
            def inplace(memory, indices, weights, add, erase, b_=b):
                return l2m.gated_memory_write(memory, indices, weights, add, erase, inplace=True, backend=b_)
            fused[f"{b} inplace (fwd)"] = Variant(f"{b} inplace (fwd)", inplace, backward=False,
                                                  cost=Cost(fwd_bytes=inplace_bytes))
        if skip_compile_note is not None:
            compiled, note = False, skip_compile_note
        elif T * kw > MAX_COMPILED_STEPS:
            compiled, note = False, (f"skipped: torch.compile would unroll {T * kw} write steps "
                                     f"(over {MAX_COMPILED_STEPS}: minutes of compilation)")
        else:
            compiled, note = True, ""
        rows += compare("gated_memory_write", shape, dtype, fused, reference, make_inputs, device, cost=copy_cost,
                        compile_reference=compiled, compile_note=note, reps=5, warmup=1, quick=quick, tiny=tiny)
    return rows + run_dense(device, quick, tiny=tiny)


def run_dense(device: torch.device, quick: bool = False, *, tiny: bool = False) -> list:
    """gated_dense_update of a (B, Hm, N, D) memory with per-slot gates (B, Hm, N, 1), the LM2
    layout; ``quick`` divides N by 4. The floor counts reading memory, update and both gates and
    writing the result once (the backward: reading dout, memory, update and the gates, writing the
    four gradients): the traffic of one fused pass."""
    rows = []
    dtype = bench_dtype(device)
    elt = torch.finfo(dtype).bits // 8
    for name, s in spec_shapes(DENSE_SHAPES, DENSE_TINY_SHAPES, device, tiny, quick=quick,
                               quick_divisors={"N": 4}):
        B, Hm, N, D = (s[x] for x in ("B", "Hm", "N", "D"))
        shape = f"{name} B={B} Hm={Hm} N={N} D={D} gates (B,Hm,N,1)"

        def make_inputs(requires_grad):
            def rnd(*sh):
                return torch.randn(*sh, device=device, dtype=dtype).requires_grad_(requires_grad)
            return dict(memory=rnd(B, Hm, N, D), update=rnd(B, Hm, N, D), input_gate=rnd(B, Hm, N, 1),
                        forget_gate=rnd(B, Hm, N, 1))

        fused = {b: (lambda b_: lambda **x: l2m.gated_dense_update(**x, backend=b_))(b)
                 for b in fused_backends("gated_dense_update", device, dtype)}
        M, G = B * Hm * N * D, B * Hm * N
        rows += compare("gated_dense_update", shape, dtype, fused, gated_dense_update_ref, make_inputs, device,
                        cost=Cost(fwd_bytes=(3 * M + 2 * G) * elt, bwd_bytes=(5 * M + 4 * G) * elt), reps=7,
                        warmup=2, quick=quick, tiny=tiny)
    return rows
