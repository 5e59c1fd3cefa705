"""Benchmark topk_memory_read: fused backends vs the reference, eager and compiled, and the bare
matmul that computes the same T x N scores.

Shapes (SPEC): ``read-cpu`` B=1, H=1, T=4096, N=65536, Dk=Dv=64, k=32 and ``read-heads`` B=2, H=8,
Hm=8, T=512, N=16384, Dk=Dv=64, k=32, float32; on CUDA the ``-gpu`` variants (B*8, bfloat16).
``--quick`` divides T and N by 4. GFLOP/s counts the scoring matmul (2·B·H·T·N·Dk).
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.ops import registry
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref

from ._common import bench_dtype, compare, fused_backends, run_variant, spec_shapes

# The shapes of the op's declaration (l2m_kernels/ops/registry.py); TINY_SHAPES: tests only.
SHAPES = registry.OPS["topk_memory_read"].bench.shapes
TINY_SHAPES = registry.OPS["topk_memory_read"].bench.tiny


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *, tiny: bool = False) -> list:
    rows = []
    dtype = bench_dtype(device)
    for name, s in spec_shapes(SHAPES, TINY_SHAPES, device, tiny, quick=quick,
                               quick_divisors={"T": 4, "N": 4}):
        B, H, Hm, T, N, Dk, Dv, k = (s[x] for x in ("B", "H", "Hm", "T", "N", "Dk", "Dv", "k"))
        shape = f"{name} B={B} H={H} Hm={Hm} T={T} N={N} D={Dk} k={k}"
        flops = 2 * B * H * T * N * Dk

        def make_inputs(requires_grad):
            gen = lambda *sh: torch.randn(*sh, device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
            return dict(q=gen(B, H, T, Dk), keys=gen(B, Hm, N, Dk), values=gen(B, Hm, N, Dv))

        def reference(q, keys, values):
            out, indices, weights, lse = topk_memory_read_ref(q, keys, values, k)
            return out, weights, lse

        def fused_variant(backend):
            def forward(q, keys, values):
                read = l2m.topk_memory_read(q, keys, values, k, backend=backend)  # one call
                return read.out, read.weights, read.lse
            return forward

        fused = {b: fused_variant(b) for b in fused_backends("topk_memory_read", device, dtype)}
        # A GPU repetition takes milliseconds (the compiled reference's compile dominates the run):
        # more of them there, for a median that holds at the 5x line.
        kw = dict(fwd_flops=flops, **(dict(reps=3, warmup=1) if device.type == "cpu" else dict(reps=10, warmup=3)))
        rows += compare("topk_memory_read", shape, dtype, fused, reference, make_inputs, device, tiny=tiny, **kw)

        def scores(q, keys, values):
            return torch.matmul(q.view(B, Hm, H // Hm * T, Dk), keys.transpose(-1, -2))

        rows.append(run_variant("topk_memory_read", shape, dtype, "bare matmul (scores)", scores,
                                make_inputs, device, backward=False, tiny=tiny, **kw))
    return rows
