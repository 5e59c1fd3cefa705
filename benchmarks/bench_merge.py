"""Benchmark merge_attention and gated_merge: fused backends vs the reference, eager and compiled.

    python benchmarks/bench_merge.py [--quick] [--device cpu|cuda] [--out bench_out]

Shapes: ``merge-cpu`` B=1, H=8, T=4096, D=64 float32 (``--quick``: T=1024); on CUDA the ``-gpu``
convention of SPEC: B*8 and bfloat16. These ops are memory-bound: the table gives forward GB/s
against a device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import l2m_kernels as l2m
from l2m_kernels import benchmark as bm
from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref


def shapes(device: torch.device, quick: bool):
    B, H, T, D = 1, 8, 1024 if quick else 4096, 64
    dtype = torch.float32
    if device.type == "cuda":
        B, dtype = B * 8, torch.bfloat16
    return (B, H, T, D), dtype


def fused_backends(op: str, device: torch.device, dtype: torch.dtype):
    names = []
    for name in ("cpu", "triton", "cuda"):
        b = l2m.backends.BACKENDS[name]
        if not b.not_supported_reasons(op, device, dtype):
            names.append(name)
    return names


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None) -> list:
    (B, H, T, D), dtype = shapes(device, quick)
    shape = f"B={B} H={H} T={T} D={D}"
    es = torch.empty((), dtype=dtype).element_size()
    R = B * H * T
    reps = 7 if quick else 30
    rows = []

    def merge_inputs(requires_grad):
        gen = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
        lse = lambda: (torch.randn(B, H, T, device=device) * 3).requires_grad_(requires_grad)  # noqa: E731
        return dict(out_a=gen(B, H, T, D), lse_a=lse(), out_b=gen(B, H, T, D), lse_b=lse())

    fused = {name: (lambda n: lambda **x: l2m.merge_attention(**x, backend=n))(name)
             for name in fused_backends("merge_attention", device, dtype)}
    rows += bm.compare("merge_attention", shape, dtype, fused, merge_attention_ref, merge_inputs, device,
                       fwd_bytes=3 * R * D * es + 3 * R * 4, reps=reps)

    def gate_inputs(requires_grad):
        gen = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
        return dict(out_local=gen(B, H, T, D), out_mem=gen(B, H, T, D), gate=gen(H, 1, 1))

    fused = {name: (lambda n: lambda **x: l2m.gated_merge(**x, backend=n))(name)
             for name in fused_backends("gated_merge", device, dtype)}
    rows += bm.compare("gated_merge", shape, dtype, fused, gated_merge_ref, gate_inputs, device,
                       fwd_bytes=3 * R * D * es, reps=reps)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out", help="folder for JSON, Markdown and PNG")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ceilings = bm.measure_ceilings(device, quick=args.quick)
    rows = run(device, args.quick, ceilings)
    bm.save(rows, ceilings, device, args.out, "bench_merge")
    print(f"device: {bm.device_name(device)}; ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    print(bm.format_table(rows, ceilings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
