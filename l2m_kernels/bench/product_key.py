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

At module level (``ProductKeyMemory``, the op's sizes with dim = value_dim = 512, ``MODULE_DIM``):
our module (sparse and dense values gradient) against lucidrains' ``product_key_memory.PKM`` at the
same configuration (dim, heads, num_keys = n_sub, dim_head = key_dim / 2, topk = k; its values an
``nn.EmbeddingBag``, dense gradient, and with ``sparse=True`` for the sparse rows), and our module on
the reference backend, eager and compiled. Forward + backward include the parameters' gradients.

Peak memory is that of forward + backward with the gradients kept. With a dense values gradient both
the fused path and the reference hold the (N, Dv) gradient (1 GiB at pkm-cpu); the ``sparse_grad``
rows show the memory that grows with the touched rows only.
"""
from __future__ import annotations

import dataclasses

import torch

import l2m_kernels as l2m
from l2m_kernels.benchmark import Cost, Variant
from l2m_kernels.ops import registry
from l2m_kernels.ops.product_key.reference import product_key_read_ref

from ._common import bench_dtype, compare, fused_backends, optional_peer, spec_shapes

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
        rows += run_module(device, dtype, dict(B=B, H=H, T=T, Dk=Dk, n_sub=n_sub, k=k), name, quick=quick, tiny=tiny)
    return rows


MODULE_DIM, TINY_MODULE_DIM = 512, 16


def run_module(device: torch.device, dtype: torch.dtype, sizes: dict, name: str, *, quick: bool = False,
               tiny: bool = False) -> list:
    """Our ``ProductKeyMemory`` against lucidrains' ``PKM`` at one configuration (see the module's
    docstring): x (B, T, dim) -> (B, T, dim), forward + backward into every parameter."""
    from l2m_kernels.modules import ProductKeyMemory

    B, H, T, Dk, n_sub, k = (sizes[x] for x in ("B", "H", "T", "Dk", "n_sub", "k"))
    dim = TINY_MODULE_DIM if tiny else MODULE_DIM
    shape = f"{name} module dim={dim} heads={H} n_sub={n_sub} key_dim={Dk} k={k} B={B} T={T}"
    elt = torch.finfo(dtype).bits // 8
    torch.manual_seed(0)
    ours = ProductKeyMemory(dim, n_sub, Dk, heads=H, k=k).to(device, dtype)
    ours_params = tuple(ours.parameters())

    def make_inputs(requires_grad):
        return dict(x=torch.randn(B, T, dim, device=device, dtype=dtype).requires_grad_(requires_grad))

    def ours_variant(backend, sparse_grad):
        def forward(x):
            ours.backend, ours.sparse_grad = backend, sparse_grad
            return ours(x)
        return forward

    queries = B * H * T
    projections = 2 * B * T * dim * H * Dk
    fwd_bytes = (queries * (Dk + k * dim) + B * T * 2 * dim + H * n_sub * Dk) * elt
    sparse = Cost(fwd_flops=2 * queries * n_sub * Dk + projections, fwd_bytes=fwd_bytes,
                  bwd_flops=2 * projections, bwd_bytes=fwd_bytes + queries * k * dim * elt)
    dense = dataclasses.replace(sparse, bwd_bytes=sparse.bwd_bytes + n_sub * n_sub * dim * elt)
    fused = {}
    for b in fused_backends("product_key_read", device, dtype):
        fused[f"{b} module"] = Variant(f"{b} module", ours_variant(b, False), cost=dense, parameters=ours_params)
        fused[f"{b} module sparse_grad"] = Variant(f"{b} module sparse_grad", ours_variant(b, True), cost=sparse,
                                                   parameters=ours_params)
    peers = _lucidrains_pkm(dim, H, n_sub, Dk, k, device, dtype, dense, sparse)
    return compare("ProductKeyMemory", shape, dtype, fused, Variant("reference", ours_variant("reference", False),
                                                                    parameters=ours_params),
                   make_inputs, device, cost=dense, peers=peers, reps=3, warmup=1, quick=quick, tiny=tiny)


def _lucidrains_pkm(dim, heads, n_sub, key_dim, k, device, dtype, dense, sparse) -> dict:
    """lucidrains' PKM as two peers (dense and sparse values gradient, one weight table), or the
    reason it cannot run."""
    pkm, why = optional_peer("product_key_memory", "product-key-memory")
    if pkm is None:
        return {"lucidrains PKM": why}
    module = pkm.PKM(dim, heads=heads, num_keys=n_sub, topk=k, dim_head=key_dim // 2).to(device, dtype)
    dense_bag = module.values
    sparse_bag = torch.nn.EmbeddingBag(n_sub * n_sub, dim, mode="sum", sparse=True, _weight=dense_bag.weight)
    # One Parameter for both bags (``_weight=`` wraps the tensor in a new one): the benchmark clears
    # its gradient after each backward, or sparse gradients would pile up from call to call.
    sparse_bag.weight = dense_bag.weight
    params = tuple(module.parameters())
    assert any(p is sparse_bag.weight for p in params)

    def variant(bag):
        def forward(x):
            module.values = bag
            return module(x)
        return forward

    return {"lucidrains PKM": Variant("lucidrains PKM", variant(dense_bag), cost=dense, parameters=params),
            "lucidrains PKM sparse": Variant("lucidrains PKM sparse", variant(sparse_bag), cost=sparse,
                                             parameters=params)}


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
