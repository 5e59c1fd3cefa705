"""Benchmark memory_attention: fused backends vs the reference, eager and compiled.

Shape (SPEC): ``attn-cpu`` B=1, H=8, T=S=1024, window=256, D=Dv=64, N=16384, topk=32, float32, with
Hkv = Hm = H (SPEC leaves them open); on CUDA ``attn-gpu`` (B*8, bfloat16). ``--quick`` divides T, S
and N by 4. The backward seeds out, lse_local and lse_mem, so the gradients flow through all three.
GFLOP/s counts the memory scoring (2·B·H·T·N·D) plus the local attention's two products over the
visible keys (2·B·H·(D + Dv)·sum_t min(window, p_t + 1)).

Floor (:class:`l2m_kernels.benchmark.Cost`): the flops above (the backward: twice the local
attention's, the memory part's recomputed weights being negligible) or reading q, k, v, the memory
once and the selected rows, and writing out and the lse (the backward: the same again, and the
dense memory gradients), whichever takes longer.

Peer on the CPU: ``SDPA (local keys)``, PyTorch's ``scaled_dot_product_attention`` of the local part
alone, with the sliding window as a boolean mask (the memory ignored). On CUDA a ``flash SDPA`` row
times PyTorch's flash attention (``scaled_dot_product_attention``,
causal, flash backend only) on the same q, k, v: the local attention alone, over every causal key
(SDPA has no sliding window). The SPEC target compares throughput with the memory entries counted
as extra keys: key visits per second, where a query of the fused op visits its visible local keys
plus the N memory entries it scores, and a query of SDPA its causal keys. Each fused row's note gives
its forward+backward key visits per second as a multiple of flash SDPA's (target: at least 0.5).
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.benchmark import Cost, Variant
from l2m_kernels.ops import registry
from l2m_kernels.ops.memory_attention.reference import memory_attention_ref

from ._common import bench_dtype, compare, fused_backends, spec_shapes

# The shapes of the op's declaration (l2m_kernels/ops/registry.py); TINY_SHAPES: tests only.
SHAPES = registry.OPS["memory_attention"].bench.shapes
TINY_SHAPES = registry.OPS["memory_attention"].bench.tiny


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, merge: str = "joint", *,
        tiny: bool = False) -> list:
    rows = []
    dtype = bench_dtype(device)
    for name, s in spec_shapes(SHAPES, TINY_SHAPES, device, tiny, quick=quick,
                               quick_divisors={"T": 4, "S": 4, "N": 4}):
        B, H, Hkv, Hm, T, S, window, D, Dv, N, topk = (
            s[x] for x in ("B", "H", "Hkv", "Hm", "T", "S", "window", "D", "Dv", "N", "topk"))
        shape = (f"{name} B={B} H={H} Hkv={Hkv} Hm={Hm} T={T} S={S} w={window} D={D} N={N} "
                 f"k={topk} {merge}")
        visible = sum(min(window, S - T + t + 1) for t in range(T))
        flops = 2 * B * H * (T * N * D + visible * (D + Dv))

        def make_inputs(requires_grad):
            gen = lambda *sh: torch.randn(*sh, device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
            inputs = dict(q=gen(B, H, T, D), k=gen(B, Hkv, S, D), v=gen(B, Hkv, S, Dv),
                          mem_keys=gen(B, Hm, N, D), mem_values=gen(B, Hm, N, Dv))
            if merge == "gate":
                inputs["gate"] = gen(H, 1, 1)
            return inputs

        def reference(q, k, v, mem_keys, mem_values, gate=None):
            out, lse_local, lse_mem, _ = memory_attention_ref(q, k, v, mem_keys, mem_values, topk, window=window,
                                                              merge=merge, gate=gate)
            return out, lse_local, lse_mem

        def fused_variant(backend):
            def forward(q, k, v, mem_keys, mem_values, gate=None):
                res = l2m.memory_attention(q, k, v, mem_keys, mem_values, topk, window=window, merge=merge,
                                           gate=gate, backend=backend)  # one call
                return res.out, res.lse_local, res.lse_mem
            return forward

        fused = {b: fused_variant(b) for b in fused_backends("memory_attention", device, dtype)}
        elt = torch.finfo(dtype).bits // 8
        local_flops = 2 * B * H * visible * (D + Dv)
        io = (B * H * T * (2 * D + Dv) + B * Hkv * S * (D + Dv) + B * H * T * topk * (D + Dv)) * elt
        memory = B * Hm * N * (D + Dv) * elt
        cost = Cost(fwd_flops=flops, fwd_bytes=io + memory, bwd_flops=2 * local_flops, bwd_bytes=2 * io + memory)
        peers = {}
        if device.type == "cuda":
            causal = sum(S - T + t + 1 for t in range(T))
            peers["flash SDPA (local keys, causal)"] = Variant(
                "flash SDPA (local keys, causal)", _flash_sdpa, cost=Cost(fwd_flops=2 * B * H * causal * (D + Dv),
                                                                         bwd_flops=4 * B * H * causal * (D + Dv)))
        else:
            peers["SDPA (local keys)"] = Variant("SDPA (local keys)", _windowed_sdpa(T, S, window),
                                                 cost=Cost(fwd_flops=local_flops, bwd_flops=2 * local_flops))
        op_rows = compare("memory_attention", shape, dtype, fused, reference, make_inputs, device, cost=cost,
                          peers=peers, reps=5, warmup=1, quick=quick, tiny=tiny)
        sdpa = [r for r in op_rows if r.variant.startswith("flash SDPA")]
        if sdpa:
            causal = sum(S - T + t + 1 for t in range(T))
            _note_key_rate(op_rows, sdpa[0], fused_visits=B * H * (visible + T * N), sdpa_visits=B * H * causal)
        rows += op_rows
    return rows


def _flash_sdpa(q, k, v, mem_keys, mem_values, gate=None):
    """PyTorch's flash attention, causal, on the benchmark's q, k, v (the memory ignored)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _windowed_sdpa(T: int, S: int, window: int):
    """``scaled_dot_product_attention`` of the local part: query t (position S - T + t) sees the keys
    j with p - window < j <= p, as a boolean mask."""
    def forward(q, k, v, mem_keys, mem_values, gate=None):
        positions = torch.arange(S - T, S, device=q.device)[:, None]
        keys = torch.arange(S, device=q.device)[None, :]
        mask = (keys <= positions) & (keys > positions - window)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return forward


def _note_key_rate(rows, sdpa, fused_visits, sdpa_visits):
    """Note on every fused row: its fwd+bwd key visits per second against flash SDPA's."""
    if not sdpa.both_ms or sdpa.both_ms != sdpa.both_ms:
        return
    sdpa_rate = sdpa_visits / sdpa.both_ms
    sdpa.note = f"{sdpa_rate / 1e6:.1f} G key visits/s fwd+bwd"
    for row in rows:
        if row is sdpa or row.variant.startswith("reference") or not row.both_ms:
            continue
        rate = fused_visits / row.both_ms
        row.note = (f"{rate / 1e6:.1f} G key visits/s fwd+bwd (local + N memory keys) = "
                    f"{rate / sdpa_rate:.2f}x flash SDPA")
