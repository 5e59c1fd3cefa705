"""Benchmark product_key_read: fused backends (dense and sparse values gradient) vs the reference,
eager and compiled.

Shape (SPEC): ``pkm-cpu`` B=1, H=4, T=2048, Dk=256, n_sub=1024 (N = 1,048,576 slots), Dv=256, k=32
(k_sub = k), float32; on CUDA ``pkm-gpu`` (B*8, bfloat16). ``--quick`` divides T by 4 and n_sub by 2.
GFLOP/s counts the half-score matmuls (2·B·H·T·n_sub·Dk); GB/s counts the forward's value gather
(B·H·T·k rows of Dv) plus q and out, the traffic an embedding bag cannot avoid.

Peak memory is that of forward + backward with the gradients kept. With a dense values gradient both
the fused path and the reference hold the (N, Dv) gradient (1 GiB at pkm-cpu); the ``sparse_grad``
rows show the memory that grows with the touched rows only.
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.ops import registry
from l2m_kernels.ops.product_key.reference import product_key_read_ref

from ._common import bench_dtype, compare, fused_backends, run_variant, spec_shapes

# The shapes of the op's declaration (l2m_kernels/ops/registry.py); TINY_SHAPES: tests only.
SHAPES = registry.OPS["product_key_read"].bench.shapes
TINY_SHAPES = registry.OPS["product_key_read"].bench.tiny


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *, tiny: bool = False) -> list:
    rows = []
    dtype = bench_dtype(device)
    elt = torch.finfo(dtype).bits // 8
    for name, s in spec_shapes(SHAPES, TINY_SHAPES, device, tiny, quick=quick,
                               quick_divisors={"T": 4, "n_sub": 2}):
        B, H, T, Dk, n_sub, Dv, k = (s[x] for x in ("B", "H", "T", "Dk", "n_sub", "Dv", "k"))
        shape = f"{name} B={B} H={H} T={T} Dk={Dk} n_sub={n_sub} (N={n_sub * n_sub}) Dv={Dv} k={k}"
        flops = 2 * B * H * T * n_sub * Dk
        gather_bytes = (B * H * T * k * Dv + B * H * T * Dk + B * H * T * Dv) * elt

        def make_inputs(requires_grad):
            def gen(*sh, std=1.0):
                return (torch.randn(*sh, device=device, dtype=dtype) * std).requires_grad_(requires_grad)
            return dict(q=gen(B, H, T, Dk), subkeys=gen(H, 2, n_sub, Dk // 2),
                        values=gen(n_sub * n_sub, Dv, std=Dv ** -0.5))

        def reference(q, subkeys, values):
            out, _, weights, lse = product_key_read_ref(q, subkeys, values, k)
            return out, weights, lse

        def fused_variant(backend, sparse_grad):
            def forward(q, subkeys, values):
                read = l2m.product_key_read(q, subkeys, values, k, sparse_grad=sparse_grad, backend=backend)
                return read.out, read.weights, read.lse
            return forward

        fused = {}
        for b in fused_backends("product_key_read", device, dtype):
            fused[b] = fused_variant(b, False)
            fused[f"{b} sparse_grad"] = fused_variant(b, True)
        kw = dict(fwd_flops=flops, fwd_bytes=gather_bytes, reps=3, warmup=1)
        rows += compare("product_key_read", shape, dtype, fused, reference, make_inputs, device, tiny=tiny, **kw)

        def reference_sparse(q, subkeys, values):
            out, _, weights, lse = product_key_read_ref(q, subkeys, values, k, sparse_grad=True)
            return out, weights, lse

        rows.append(run_variant("product_key_read", shape, dtype, "reference sparse_grad", reference_sparse,
                                make_inputs, device, tiny=tiny, **kw))
    return rows
