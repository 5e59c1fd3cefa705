"""Benchmark memory_attention: fused backends vs the reference, eager and compiled.

Shape (SPEC): ``attn-cpu`` B=1, H=8, T=S=1024, window=256, D=Dv=64, N=16384, topk=32, float32, with
Hkv = Hm = H (SPEC leaves them open); on CUDA ``attn-gpu`` (B*8, bfloat16). ``--quick`` divides T, S
and N by 4. The backward seeds out, lse_local and lse_mem, so the gradients flow through all three.
GFLOP/s counts the memory scoring (2·B·H·T·N·D) plus the local attention's two products over the
visible keys (2·B·H·(D + Dv)·sum_t min(window, p_t + 1)).

On CUDA a ``flash SDPA`` row times PyTorch's flash attention (``scaled_dot_product_attention``,
causal, flash backend only) on the same q, k, v: the local attention alone, over every causal key
(SDPA has no sliding window). The SPEC target compares throughput with the memory entries counted
as extra keys: key visits per second, where a query of the fused op visits its visible local keys
plus the N memory entries it scores, and a query of SDPA its causal keys. Each fused row's note gives
its forward+backward key visits per second as a multiple of flash SDPA's (target: at least 0.5).
"""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels.ops import registry
from l2m_kernels import benchmark as bm
from l2m_kernels.ops.memory_attention.reference import memory_attention_ref

from ._common import bench_dtype, compare, fused_backends, run_variant, spec_shapes

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
        kw = dict(fwd_flops=flops, reps=5, warmup=1)
        op_rows = compare("memory_attention", shape, dtype, fused, reference, make_inputs, device, tiny=tiny, **kw)
        if device.type == "cuda":
            causal = sum(S - T + t + 1 for t in range(T))
            sdpa = _flash_sdpa_row(shape, dtype, make_inputs, device, causal_flops=2 * B * H * causal * (D + Dv),
                                   tiny=tiny)
            op_rows.append(sdpa)
            _note_key_rate(op_rows, sdpa, fused_visits=B * H * (visible + T * N), sdpa_visits=B * H * causal)
        rows += op_rows
    return rows


def _flash_sdpa_row(shape, dtype, make_inputs, device, causal_flops, tiny):
    """PyTorch's flash attention, causal, on the benchmark's q, k, v (the memory ignored)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward(q, k, v, mem_keys, mem_values, gate=None):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        return run_variant("memory_attention", shape, dtype, "flash SDPA (local keys, causal)", forward, make_inputs,
                           device, fwd_flops=causal_flops, reps=10, warmup=3, tiny=tiny)
    except RuntimeError as exc:  # e.g. no flash kernel for this GPU or dtype: say so in the table
        return bm.Row("memory_attention", shape, str(dtype).replace("torch.", ""), "flash SDPA (local keys, causal)",
                      float("nan"), None, None, None, note=f"flash SDPA unavailable: {exc}"[:200])


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
