"""Benchmark merge_attention and gated_merge: fused backends vs the reference, eager and compiled.

Shapes: ``merge-cpu`` B=1, H=8, T=4096, D=64 float32, with and without ``--quick`` (the pair takes
about 15 s on 2 cores; at a quarter of T, 2 MB operands, a call's fixed costs are as long as its
memory traffic and the bandwidth target would measure those); on CUDA the ``-gpu`` convention of
SPEC: B*8 and bfloat16. These ops are memory-bound: the table gives forward GB/s
against a device copy measured in the same run. Their floor (:class:`l2m_kernels.benchmark.Cost`)
is the bytes they must read and write once: merge_attention reads out_a, out_b and both lse and
writes out and lse (backward: reads dout, dlse, out_a, out_b and the three lse, writes the four
gradients); gated_merge reads out_local and out_mem and writes out (backward: reads dout and both
inputs, writes two gradients; the gate's are negligible).
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.benchmark import Cost
from l2m_kernels.ops import registry
from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref

from ._common import bench_dtype, compare, fused_backends


def shapes(device: torch.device, quick: bool, tiny: bool = False):
    """The (B, H, T, D) of merge_attention's declared shape (gated_merge runs at the same), and the
    dtype; ``quick`` changes nothing but the repetitions (see the module docstring)."""
    bench = registry.OPS["merge_attention"].bench
    (_, sizes), = (bench.tiny if tiny else bench.shapes).items()
    B, H, T, D = (sizes[n] for n in ("B", "H", "T", "D"))
    dtype = bench_dtype(device)
    if device.type == "cuda":
        B *= 8
    return (B, H, T, D), dtype


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *, tiny: bool = False) -> list:
    (B, H, T, D), dtype = shapes(device, quick, tiny)
    shape = f"B={B} H={H} T={T} D={D}"
    es = torch.empty((), dtype=dtype).element_size()
    R = B * H * T
    reps = 7 if quick else 15
    rows = []

    def merge_inputs(requires_grad):
        gen = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
        lse = lambda: (torch.randn(B, H, T, device=device) * 3).requires_grad_(requires_grad)  # noqa: E731
        return dict(out_a=gen(B, H, T, D), lse_a=lse(), out_b=gen(B, H, T, D), lse_b=lse())

    fused = {name: (lambda n: lambda **x: l2m.merge_attention(**x, backend=n))(name)
             for name in fused_backends("merge_attention", device, dtype)}
    lse_bytes = 4 if dtype != torch.float64 else 8
    cost = Cost(fwd_bytes=3 * R * D * es + 3 * R * lse_bytes, bwd_bytes=5 * R * D * es + 6 * R * lse_bytes)
    rows += compare("merge_attention", shape, dtype, fused, merge_attention_ref, merge_inputs, device, cost=cost,
                    reps=reps, quick=quick, tiny=tiny)

    def gate_inputs(requires_grad):
        gen = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
        return dict(out_local=gen(B, H, T, D), out_mem=gen(B, H, T, D), gate=gen(H, 1, 1))

    fused = {name: (lambda n: lambda **x: l2m.gated_merge(**x, backend=n))(name)
             for name in fused_backends("gated_merge", device, dtype)}
    rows += compare("gated_merge", shape, dtype, fused, gated_merge_ref, gate_inputs, device,
                    cost=Cost(fwd_bytes=3 * R * D * es, bwd_bytes=5 * R * D * es), reps=reps, quick=quick, tiny=tiny)
    return rows
