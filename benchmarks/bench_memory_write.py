"""Benchmark gated_memory_write: fused backends vs the reference, eager and compiled, plus the
in-place forward's bandwidth against a memory copy measured in the same run.

    python benchmarks/bench_memory_write.py [--quick] [--device cpu|cuda] [--out bench_out]

Shape (SPEC): ``write-cpu`` B=2, Hm=4, N=4096, D=128, T=256, kw=4, float32; on CUDA ``write-gpu``
(B*8, bfloat16). ``--quick`` divides T by 4. The eager reference runs only where its autograd graph (one memory
copy per write) fits in half of the device's memory, the compiled one only up to 256 write steps (it
unrolls them); a skipped row says why. The in-place rows count, as the issue defines, each
written slot read and written once plus the inputs read once (indices, weights, add, erase); the
out-of-place rows add one read and one write of the whole memory (the copy).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import l2m_kernels as l2m
from l2m_kernels import benchmark as bm
from l2m_kernels.ops.memory_write.reference import gated_memory_write_ref

SHAPES = {"write-cpu": dict(B=2, Hm=4, N=4096, D=128, T=256, kw=4)}
MAX_COMPILED_STEPS = 256  # the quick shape (T = 64, kw = 4) compiles in a few minutes on 2 cores


def _memory_budget(device: torch.device) -> int:
    """Half of the device's memory: the most the reference's autograd graph may take."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def fused_backends(device, dtype):
    return [name for name in ("cpu", "triton", "cuda")
            if not l2m.backends.BACKENDS[name].not_supported_reasons("gated_memory_write", device, dtype)]


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None) -> list:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elt = torch.finfo(dtype).bits // 8
    for name, s in SHAPES.items():
        s = dict(s)
        if device.type == "cuda":
            s["B"] *= 8
            name = name.replace("-cpu", "-gpu")
        if quick:
            s["T"] //= 4
        B, Hm, N, D, T, kw = (s[x] for x in ("B", "Hm", "N", "D", "T", "kw"))
        shape = f"{name} B={B} Hm={Hm} N={N} D={D} T={T} kw={kw}"
        gen = torch.Generator(device="cpu").manual_seed(0)
        # Distinct written slots per memory, as the fused path touches them (collisions included).
        slots = torch.randint(0, N, (B, Hm, T, kw), generator=gen)
        touched = sum(int(torch.unique(slots[b, h]).numel()) for b in range(B) for h in range(Hm))
        inputs_bytes = B * Hm * T * (kw * (8 + elt) + 2 * D * elt)
        inplace_bytes = 2 * touched * D * elt + inputs_bytes
        copy_bytes = 2 * B * Hm * N * D * elt + inplace_bytes

        def make_inputs(requires_grad):
            def rnd(*sh, low=False):
                x = torch.rand(*sh, device=device, dtype=dtype) if low else torch.randn(*sh, device=device, dtype=dtype)
                return x.requires_grad_(requires_grad)
            return dict(memory=rnd(B, Hm, N, D), indices=slots.to(device), weights=rnd(B, Hm, T, kw, low=True),
                        add=rnd(B, Hm, T, D), erase=rnd(B, Hm, T, D, low=True))

        def reference(memory, indices, weights, add, erase):
            return gated_memory_write_ref(memory, indices, weights, add, erase)

        fused = {b: (lambda b_: lambda memory, indices, weights, add, erase: l2m.gated_memory_write(
            memory, indices, weights, add, erase, backend=b_))(b) for b in fused_backends(device, dtype)}
        kw_args = dict(reps=5, warmup=1)
        # The step-by-step reference keeps one copy of the memory per write under autograd, and
        # torch.compile unrolls its T * kw steps: measure each only where that is practical.
        ref_bytes = T * kw * B * Hm * N * D * elt
        budget = _memory_budget(device)
        if ref_bytes > budget:
            for b, forward in fused.items():
                rows.append(bm.run_variant("gated_memory_write", shape, dtype, b, forward, make_inputs, device,
                                           fwd_bytes=copy_bytes, **kw_args))
            rows.append(bm.Row("gated_memory_write", shape, str(dtype).replace("torch.", ""), "reference",
                               float("nan"), None, None, None,
                               note=f"skipped: its autograd graph needs ~{ref_bytes / 2**30:.0f} GiB, "
                                    f"more than half of this device's {2 * budget / 2**30:.0f} GiB"))
        else:
            rows += bm.compare("gated_memory_write", shape, dtype, fused, reference, make_inputs, device,
                               fwd_bytes=copy_bytes, compile_reference=T * kw <= MAX_COMPILED_STEPS, **kw_args)
            if T * kw > MAX_COMPILED_STEPS:
                rows.append(bm.Row("gated_memory_write", shape, str(dtype).replace("torch.", ""),
                                   "reference+compile", float("nan"), None, None, None,
                                   note=f"skipped: torch.compile would unroll {T * kw} write steps "
                                        f"(over {MAX_COMPILED_STEPS}: minutes of compilation)"))
        for b in fused_backends(device, dtype):
            def inplace(memory, indices, weights, add, erase, b_=b):
                return l2m.gated_memory_write(memory, indices, weights, add, erase, inplace=True, backend=b_)
            rows.append(bm.run_variant("gated_memory_write", shape, dtype, f"{b} inplace (fwd)", inplace,
                                       make_inputs, device, backward=False, fwd_bytes=inplace_bytes, **kw_args))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T / 4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ceilings = bm.measure_ceilings(device, quick=args.quick)
    rows = run(device, args.quick, ceilings)
    bm.save(rows, ceilings, device, args.out, "bench_memory_write")
    print(f"device: {bm.device_name(device)}; ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    print(bm.format_table(rows, ceilings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
