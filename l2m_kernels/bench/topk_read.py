"""Benchmark topk_memory_read: fused backends vs the reference, eager and compiled, and the bare
matmul that computes the same T x N scores.

Shapes (SPEC): ``read-cpu`` B=1, H=1, T=4096, N=65536, Dk=Dv=64, k=32 and ``read-heads`` B=2, H=8,
Hm=8, T=512, N=16384, Dk=Dv=64, k=32, float32; on CUDA the ``-gpu`` variants (B*8, bfloat16).
``--quick`` divides T and N by 4. GFLOP/s counts the scoring matmul (2·B·H·T·N·Dk).

Floor (:class:`l2m_kernels.benchmark.Cost`): the forward computes the scores (2·B·H·T·N·Dk flops)
and reads the keys once, q, and the k selected value rows per query, writing out, indices, weights
and lse; the backward reads dout, q and the selected key and value rows and writes dq and the dense
dkeys and dvalues.

Peers, each in its own row: the bare matmul that computes the same scores (forward only), and on
the CPU faiss's exact inner-product search (``IndexFlatIP``, one index per memory; forward only:
faiss builds the index from the keys and returns the ids and scores of the k best, without the
softmax and the read of the values). A peer that is not installed is a row that says so.
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.benchmark import Cost, Variant
from l2m_kernels.ops import registry
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref

from ._common import bench_dtype, compare, fused_backends, optional_peer, spec_shapes

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
        es = torch.finfo(dtype).bits // 8
        queries = B * H * T
        cost = Cost(fwd_flops=flops,
                    fwd_bytes=(B * Hm * N * Dk + queries * (Dk + k * Dv + Dv)) * es + queries * (12 * k + 4),
                    bwd_bytes=(queries * (Dv + Dk + k * (Dk + Dv) + Dk) + B * Hm * N * (Dk + Dv)) * es
                    + queries * (12 * k + 4))

        def scores(q, keys, values):
            return torch.matmul(q.view(B, Hm, H // Hm * T, Dk), keys.transpose(-1, -2))

        peers = {"bare matmul (scores)": Variant("bare matmul (scores)", scores, backward=False,
                                                 cost=Cost(fwd_flops=flops))}
        if device.type == "cpu":
            peers["faiss IndexFlatIP (search)"] = _faiss_search(B, H, Hm, T, N, Dk, k, dtype)
        timing = dict(reps=5, warmup=1) if device.type == "cpu" else dict(reps=10, warmup=3)
        rows += compare("topk_memory_read", shape, dtype, fused, reference, make_inputs, device, cost=cost,
                        peers=peers, quick=quick, tiny=tiny, **timing)
    return rows


def _faiss_search(B, H, Hm, T, N, Dk, k, dtype):
    """faiss's exact search of every memory (b, h) for the queries of its heads, as a forward-only
    peer, or the reason it cannot run."""
    faiss, why = optional_peer("faiss", "faiss-cpu")
    if faiss is None:
        return why
    if dtype != torch.float32:
        return "faiss searches float32 only"
    faiss.omp_set_num_threads(torch.get_num_threads())

    def search(q, keys, values):
        queries = q.detach().reshape(B, Hm, H // Hm * T, Dk)
        found = []
        for b in range(B):
            for h in range(Hm):
                index = faiss.IndexFlatIP(Dk)
                index.add(keys[b, h].detach().contiguous().numpy())
                found.append(index.search(queries[b, h].contiguous().numpy(), k))
        return found

    return Variant("faiss IndexFlatIP (search)", search, backward=False, torch_memory=False,
                   cost=Cost(fwd_flops=2 * B * H * T * N * Dk))
