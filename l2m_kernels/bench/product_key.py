"""Benchmark product_key_read: fused backends (dense and sparse values gradient) vs the reference,
eager and compiled.

Shape (SPEC): ``pkm-cpu`` B=1, H=4, T=2048, Dk=256, n_sub=1024 (N = 1,048,576 slots), Dv=256, k=32
(k_sub = k), float32; on CUDA ``pkm-gpu`` (B*8, bfloat16). ``--quick`` divides T by 4 and n_sub by 2.
GFLOP/s counts the half-score matmuls (2·B·H·T·n_sub·Dk); GB/s counts the forward's value gather
(B·H·T·k rows of Dv) plus q and out, the traffic an embedding bag cannot avoid.

Floor (:class:`l2m_kernels.benchmark.Cost`): the forward computes the half scores (2·B·H·T·n_sub·Dk
flops) and moves q, the sub-keys, the k value rows of every query and out; the backward reads dout
and the selected value rows again (for the weights' gradient) and writes each selected row's
gradient (sparse), or the dense (N, Dv) gradient besides (``dense``), plus dq and dsubkeys.

Peer: the plain PyTorch a user would write (``plain embedding_bag``): the two half-score matmuls,
``topk`` of each half, ``topk`` of the k_sub x k_sub sums, softmax, and ``F.embedding_bag`` with
per-sample weights (``sparse=True`` for the sparse gradient).

Peak memory is that of forward + backward with the gradients kept. With a dense values gradient both
the fused path and the reference hold the (N, Dv) gradient (1 GiB at pkm-cpu); the ``sparse_grad``
rows show the memory that grows with the touched rows only.
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.benchmark import Cost, Variant
from l2m_kernels.ops import registry
from l2m_kernels.ops.product_key.reference import product_key_read_ref

from ._common import bench_dtype, compare, fused_backends, spec_shapes

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

        queries = B * H * T
        fwd_bytes = (queries * (Dk + k * Dv + Dv) + H * n_sub * Dk) * elt + queries * k * 12
        sparse_bwd = (queries * (Dv + 2 * k * Dv + Dk) + H * n_sub * Dk) * elt + queries * k * 12
        sparse_cost = Cost(fwd_flops=flops, fwd_bytes=fwd_bytes, bwd_bytes=sparse_bwd)
        dense_cost = Cost(fwd_flops=flops, fwd_bytes=fwd_bytes, bwd_bytes=sparse_bwd + n_sub * n_sub * Dv * elt)

        fused = {}
        for b in fused_backends("product_key_read", device, dtype):
            fused[b] = Variant(b, fused_variant(b, False), cost=dense_cost)
            fused[f"{b} sparse_grad"] = Variant(f"{b} sparse_grad", fused_variant(b, True), cost=sparse_cost)

        def reference_sparse(q, subkeys, values):
            out, _, weights, lse = product_key_read_ref(q, subkeys, values, k, sparse_grad=True)
            return out, weights, lse

        peers = {"reference sparse_grad": Variant("reference sparse_grad", reference_sparse, cost=sparse_cost),
                 "plain embedding_bag": Variant("plain embedding_bag", plain_pytorch(k, k, False), cost=dense_cost),
                 "plain embedding_bag sparse": Variant("plain embedding_bag sparse", plain_pytorch(k, k, True),
                                                       cost=sparse_cost)}
        rows += compare("product_key_read", shape, dtype, fused, reference, make_inputs, device, cost=dense_cost,
                        peers=peers, reps=3, warmup=1, quick=quick, tiny=tiny)
    return rows


def plain_pytorch(k: int, k_sub: int, sparse: bool):
    """The product-key read as plain PyTorch: half scores by matmul, ``topk`` per half and of the
    k_sub x k_sub candidate sums, softmax, then ``F.embedding_bag`` with per-sample weights. Returns
    ``forward(q, subkeys, values) -> (out, weights)``."""
    def forward(q, subkeys, values):
        B, H, T, Dk = q.shape
        n_sub = subkeys.shape[2]
        half = Dk // 2
        s1 = torch.matmul(q[..., :half], subkeys[:, 0].transpose(-1, -2)) * Dk ** -0.5   # (B, H, T, n_sub)
        s2 = torch.matmul(q[..., half:], subkeys[:, 1].transpose(-1, -2)) * Dk ** -0.5
        top1, ids1 = s1.topk(k_sub, dim=-1)
        top2, ids2 = s2.topk(k_sub, dim=-1)
        candidates = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)            # (B, H, T, k_sub ** 2)
        scores, best = candidates.topk(k, dim=-1)
        slots = (ids1.gather(-1, best // k_sub) * n_sub + ids2.gather(-1, best % k_sub))
        weights = torch.softmax(scores, dim=-1)
        out = torch.nn.functional.embedding_bag(slots.reshape(-1, k), values, per_sample_weights=weights.reshape(-1, k),
                                                mode="sum", sparse=sparse)
        return out.view(B, H, T, -1), weights
    return forward
