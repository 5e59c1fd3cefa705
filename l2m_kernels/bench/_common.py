"""Helpers shared by the op benchmarks of :mod:`l2m_kernels.bench`."""
from __future__ import annotations

import torch

import l2m_kernels as l2m
from l2m_kernels import benchmark as bm

FUSED_ORDER = ("cpu", "triton", "cuda")


def fused_backends(op: str, device: torch.device, dtype: torch.dtype) -> list:
    """The fused backends that can serve ``op`` on ``device``/``dtype``, in a fixed order.

    Triton on CPU tensors runs only through its interpreter (``TRITON_INTERPRET=1``), whose speed
    says nothing about the kernels: it is never benchmarked.
    """
    names = []
    for name in FUSED_ORDER:
        if name == "triton" and device.type != "cuda":
            continue
        if not l2m.backends.BACKENDS[name].not_supported_reasons(op, device, dtype):
            names.append(name)
    return names


def bench_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; bfloat16 for the ``-gpu`` shapes of SPEC."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def spec_shapes(shapes: dict, tiny_shapes: dict, device: torch.device, tiny: bool, *,
                quick: bool = False, quick_divisors: dict | None = None):
    """``(name, sizes)`` for each shape of ``shapes`` (``tiny_shapes`` with ``tiny``: tests), each
    ``sizes`` a fresh dict. ``quick`` (``--quick``, not with ``tiny``): each size named in
    ``quick_divisors`` divided by its divisor. On CUDA the SPEC ``-gpu`` variant: B * 8, and the
    name ends in ``-gpu`` (``read-cpu`` -> ``read-gpu``, ``read-heads`` -> ``read-heads-gpu``)."""
    for name, sizes in (tiny_shapes if tiny else shapes).items():
        sizes = dict(sizes)
        if quick and not tiny:
            for key, divisor in (quick_divisors or {}).items():
                sizes[key] //= divisor
        if device.type == "cuda":
            sizes["B"] *= 8
            name = name.replace("-cpu", "") + "-gpu"
        yield name, sizes


dtype_name = bm.dtype_name


def skipped_row(op: str, shape: str, dtype: torch.dtype, variant: str, note: str) -> bm.Row:
    """A row that was not measured; the table shows ``-`` and the note says why."""
    return bm.Row(op, shape, dtype_name(dtype), variant, float("nan"), None, None, None, note=note)


def measure_ceilings(device: torch.device, quick: bool = False, tiny: bool = False) -> dict:
    """:func:`l2m_kernels.benchmark.measure_ceilings`; with ``tiny`` (tests) a small, fast version
    of the same two measurements."""
    if not tiny:
        return bm.measure_ceilings(device, quick=quick)
    n, numel = 256, 2 ** 20
    a = torch.randn(n, n, device=device)
    t = bm.median_time(lambda: torch.mm(a, a), device, warmup=1, reps=3)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t_copy = bm.median_time(lambda: dst.copy_(src), device, warmup=1, reps=3)
    return {"matmul_gflops_float32": 2 * n ** 3 / t / 1e9, "copy_gbps": 2 * numel * 4 / t_copy / 1e9}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compare(op, shape, dtype, fused, reference, make_inputs, device, *, tiny: bool = False,
            compile_reference: bool = True, compile_note: str = "", **kw) -> list:
    """:func:`l2m_kernels.benchmark.compare`; with ``tiny`` (tests) one round on one input set, and
    the compiled reference skipped (its compilation alone takes longer than a test may)."""
    if tiny:
        kw = dict(kw, reps=1, max_reps=1, warmup=0, rotate_bytes=0, quick=True)
        compile_reference, compile_note = False, "skipped: --tiny (tests)"
    return bm.compare(op, shape, dtype, fused, reference, make_inputs, device, compile_reference=compile_reference,
                      compile_note=compile_note, **kw)


def optional_peer(module: str, package: str):
    """``(module, None)``, or ``(None, why)`` when the peer is not installed: its row then says so."""
    import importlib

    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, f"not installed: pip install {package} ({type(exc).__name__}: {exc})"[:200]
