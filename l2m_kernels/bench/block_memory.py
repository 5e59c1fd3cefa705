"""Benchmark block_topk and block_read: fused backends vs the reference, eager and compiled, and the
PyTorch a user would write instead.

Shape (the ops' declaration): ``blocks-cpu`` B=1, H=8 query heads over Hk=2 key-value heads, a chunk
of T=512 queries, NB=128 blocks of S=64 tokens (8192 past tokens), D=Dv=128, k=16 blocks read per
key-value head (1024 tokens), float32; ``--quick`` halves T and NB. On CUDA the ``-gpu`` variant
(B*8, bfloat16), served by the reference only.

- ``block_topk`` with one representative per block (R=1, the mean key: InfLLM's cheap scoring) and
  with every key of the block (R=S: a block scored by its best key per query), forward only (the
  op has no gradient). Peer for R=1: the summed queries times the representatives and
  ``torch.topk`` (the algebraic shortcut of R=1, in two PyTorch calls).
- ``block_read`` forward and backward. Peers: the selected blocks gathered and read by
  ``F.scaled_dot_product_attention`` with a boolean mask (no log-sum-exp, so it cannot be merged
  exactly), and by PyTorch's CPU flash kernel, which returns one (forward only: its log-sum-exp
  has no gradient).

Floors (:class:`l2m_kernels.benchmark.Cost`): block_topk computes 2·B·H·T·NB·R·D flops (R = 1: the
summed queries, B·H·T·D, times the representatives, 2·B·Hk·NB·D) and reads q and the
representatives; block_read computes 2·B·H·T·k·S·(D + Dv) flops and reads q and the k
selected blocks, writing out and lse; its backward computes 2·B·H·T·k·S·(3·D + 2·Dv) flops (the
scores again, dP, dq, dk, dv), reads q, dout, out and the selected blocks and writes dq and the
dense gradients of every block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import l2m_kernels as l2m
from l2m_kernels.benchmark import Cost, Variant
from l2m_kernels.ops import registry
from l2m_kernels.ops.block_memory.reference import block_read_ref, block_topk_ref, gather_blocks

from ._common import bench_dtype, compare, fused_backends, spec_shapes

SHAPES = registry.OPS["block_topk"].bench.shapes
TINY_SHAPES = registry.OPS["block_topk"].bench.tiny


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *, tiny: bool = False) -> list:
    rows = []
    dtype = bench_dtype(device)
    es = torch.finfo(dtype).bits // 8
    for name, s in spec_shapes(SHAPES, TINY_SHAPES, device, tiny, quick=quick, quick_divisors={"T": 2, "NB": 2}):
        B, H, Hk, T, NB, S, D, Dv, k = (s[x] for x in ("B", "H", "Hk", "T", "NB", "S", "D", "Dv", "k"))
        G = H // Hk
        shape = f"{name} B={B} H={H} Hk={Hk} T={T} NB={NB} S={S} D={D} k={k}"
        gen = torch.Generator().manual_seed(0)

        def randn(*sh, requires_grad=False):
            return torch.randn(*sh, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

        def valid_mask(R):
            mask = torch.ones(B, NB, R, dtype=torch.bool)
            mask[:, 0, : R // 2] = False  # some padding, as a left-padded batch leaves in the first block
            return mask.to(device)

        # ---- block_topk ----
        for R, label in ((1, "R=1"), (S, f"R={S}")):
            def topk_inputs(requires_grad, R=R):
                return dict(q=randn(B, H, T, D), reprs=randn(B, Hk, NB, R, D), repr_valid=valid_mask(R))

            def topk_reference(q, reprs, repr_valid):
                return block_topk_ref(q, reprs, k, repr_valid)[1]

            fused = {b: (lambda b: lambda q, reprs, repr_valid: l2m.block_topk(
                q, reprs, k, repr_valid=repr_valid, backend=b).scores)(b)
                for b in fused_backends("block_topk", device, dtype)}
            peers = {}
            if R == 1:
                def summed(q, reprs, repr_valid):
                    rows_sum = q.float().reshape(B, Hk, G * T, D).sum(2) * D ** -0.5
                    scores = torch.einsum("bgd,bgnd->bgn", rows_sum, reprs[:, :, :, 0].float())
                    scores = scores.masked_fill(~repr_valid[:, None, :, 0], float("-inf"))
                    return scores, scores.topk(k, dim=-1).indices
                peers["sum+matmul+topk"] = Variant("sum+matmul+topk", summed, backward=False)
            # With one representative the scores are the summed queries times it: that is the work.
            flops = B * H * T * D + 2 * B * Hk * NB * D if R == 1 else 2 * B * H * T * NB * R * D
            cost = Cost(fwd_flops=flops, fwd_bytes=(B * H * T * D + B * Hk * NB * R * D) * es)
            rows += compare("block_topk", f"{shape} {label}", dtype, fused, Variant("reference", topk_reference,
                                                                                     backward=False),
                            topk_inputs, device, peers=peers, cost=cost, backward=False, reps=5 if quick else 9,
                            quick=quick, tiny=tiny)

        # ---- block_read ----
        def read_inputs(requires_grad):
            indices = torch.stack([torch.randperm(NB, generator=gen)[:k].sort().values
                                   for _ in range(B * Hk)]).reshape(B, Hk, k).to(device)
            return dict(q=randn(B, H, T, D, requires_grad=requires_grad),
                        block_keys=randn(B, Hk, NB, S, D, requires_grad=requires_grad),
                        block_values=randn(B, Hk, NB, S, Dv, requires_grad=requires_grad),
                        indices=indices, block_valid=valid_mask(S))

        def read_reference(q, block_keys, block_values, indices, block_valid):
            return block_read_ref(q, block_keys, block_values, indices, block_valid)

        fused = {b: (lambda b: lambda q, block_keys, block_values, indices, block_valid: tuple(l2m.block_read(
            q, block_keys, block_values, indices, block_valid=block_valid, backend=b)))(b)
            for b in fused_backends("block_read", device, dtype)}

        def sdpa(q, block_keys, block_values, indices, block_valid):
            keys, values, valid = gather_blocks(block_keys, block_values, indices, block_valid)
            out = F.scaled_dot_product_attention(q.reshape(B, Hk, G * T, D), keys, values,
                                                 attn_mask=valid[:, :, None])
            return out.reshape(B, H, T, Dv)

        peers = {"gather+sdpa": sdpa}
        flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if device.type == "cpu" and flash is not None:
            def gather_flash(q, block_keys, block_values, indices, block_valid):
                keys, values, valid = gather_blocks(block_keys, block_values, indices, block_valid)
                bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
                out, lse = flash(q.reshape(B, Hk, G * T, D), keys, values, 0.0, False, attn_mask=bias[:, :, None])
                return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)
            peers["gather+flash-cpu"] = Variant("gather+flash-cpu", gather_flash, backward=False)
        tokens = k * S
        pairs = B * H * T * tokens
        block_bytes = B * Hk * tokens * (D + Dv) * es
        cost = Cost(fwd_flops=2 * pairs * (D + Dv), bwd_flops=2 * pairs * (3 * D + 2 * Dv),
                    fwd_bytes=B * H * T * (D + Dv) * es + block_bytes,
                    bwd_bytes=B * H * T * (2 * D + 2 * Dv) * es + block_bytes + B * Hk * NB * S * (D + Dv) * es)
        rows += compare("block_read", shape, dtype, fused, read_reference, read_inputs, device, peers=peers,
                        cost=cost, reps=5 if quick else 9, quick=quick, tiny=tiny)
    return rows
