"""Benchmark topk_memory_read: fused backends vs the reference, eager and compiled, and the bare
matmul that computes the same T x N scores.

    python benchmarks/bench_topk_read.py [--quick] [--device cpu|cuda] [--out bench_out]

Shapes (SPEC): ``read-cpu`` B=1, H=1, T=4096, N=65536, Dk=Dv=64, k=32 and ``read-heads`` B=2, H=8,
Hm=8, T=512, N=16384, Dk=Dv=64, k=32, float32; on CUDA the ``-gpu`` variants (B*8, bfloat16).
``--quick`` divides T and N by 4. GFLOP/s counts the scoring matmul (2·B·H·T·N·Dk).
"""
from __future__ import annotations

import argparse
import sys

import torch

import l2m_kernels as l2m
from l2m_kernels import benchmark as bm
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref

SHAPES = {
    "read-cpu": dict(B=1, H=1, Hm=1, T=4096, N=65536, Dk=64, Dv=64, k=32),
    "read-heads": dict(B=2, H=8, Hm=8, T=512, N=16384, Dk=64, Dv=64, k=32),
}


def fused_backends(device, dtype):
    return [name for name in ("cpu", "triton", "cuda")
            if not l2m.backends.BACKENDS[name].not_supported_reasons("topk_memory_read", device, dtype)]


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None) -> list:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, s in SHAPES.items():
        s = dict(s)
        if device.type == "cuda":
            s["B"] *= 8
            name = name.replace("-cpu", "") + "-gpu"  # read-cpu -> read-gpu, read-heads -> read-heads-gpu
        if quick:
            s["T"] //= 4
            s["N"] //= 4
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

        fused = {b: fused_variant(b) for b in fused_backends(device, dtype)}
        kw = dict(fwd_flops=flops, reps=3 if not quick else 3, warmup=1)
        rows += bm.compare("topk_memory_read", shape, dtype, fused, reference, make_inputs, device, **kw)

        def scores(q, keys, values):
            return torch.matmul(q.view(B, Hm, H // Hm * T, Dk), keys.transpose(-1, -2))

        rows.append(bm.run_variant("topk_memory_read", shape, dtype, "bare matmul (scores)", scores,
                                   make_inputs, device, backward=False, **kw))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T and N divided by 4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ceilings = bm.measure_ceilings(device, quick=args.quick)
    rows = run(device, args.quick, ceilings)
    bm.save(rows, ceilings, device, args.out, "bench_topk_read")
    print(f"device: {bm.device_name(device)}; ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    print(bm.format_table(rows, ceilings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
