"""Test helpers shared by the test suite, the numerics check and the benchmarks.

- :func:`assert_close` judges a fused result against a reference by relative RMS error,
  ``rms(actual - expected) / rms(expected)``, with a per-dtype tolerance (:data:`TOLERANCE`).
- :func:`poisoned_outputs` pre-fills every output buffer of the fused launchers with NaN.
- :func:`rand`, :func:`rand_lse` and friends draw fresh random inputs (never zeros).
"""
from __future__ import annotations

import math

import torch

from ._alloc import poisoned_outputs  # noqa: F401  (re-exported for tests)

# Relative RMS error allowed for a fused path against the reference computed in float64, per input
# dtype. float32 runs accumulate in float32 (no TF32); half types load/store in 16 bits.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``rms(actual - expected) / rms(expected)``, computed in float64; 0 for two empty tensors.

    Positions where both are equal (including matching infinities) count as zero error; a NaN in
    ``actual`` where ``expected`` has none gives ``inf``.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return math.inf
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    diff = torch.where(same, torch.zeros_like(a), a - e)
    if not torch.isfinite(diff).all():
        return math.inf
    finite_e = torch.where(torch.isfinite(e), e, torch.zeros_like(e))
    denom = finite_e.square().mean().sqrt().item()
    num = diff.square().mean().sqrt().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype=None, tol=None):
    """Fail unless ``actual`` matches ``expected`` within the relative RMS tolerance of ``dtype``.

    ``dtype`` defaults to ``actual.dtype`` (float32 for integer/float32 tensors such as lse);
    ``tol`` overrides the table.
    """
    if dtype is None:
        dtype = actual.dtype if actual.is_floating_point() else torch.float32
    limit = TOLERANCE[dtype] if tol is None else tol
    err = rel_rms_error(actual, expected)
    if not err <= limit:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} exceeds {limit:.1e} ({dtype})")
    return err


def rand(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0, requires_grad=False,
         generator=None) -> torch.Tensor:
    """Standard normal data times ``scale``, in ``dtype`` (drawn in float32, then cast)."""
    t = torch.randn(tuple(shape), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                    device=device, generator=generator) * scale
    t = t.to(dtype)
    return t.requires_grad_(requires_grad)


def rand_unit(*shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    """Uniform data in (0, 1), never exactly 0: for gates, weights and erase vectors."""
    base = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(tuple(shape), dtype=base, device=device).clamp_min(1e-3).to(dtype)
    return t.requires_grad_(requires_grad)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of log-sum-exp tensors for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand_lse(*shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    """Random log-sum-exp values (float32, or float64 for float64 inputs) around 0 +- 3."""
    t = torch.randn(tuple(shape), dtype=lse_dtype(dtype), device=device) * 3.0
    return t.requires_grad_(requires_grad)


def fresh_like(tensor: torch.Tensor, requires_grad=None) -> torch.Tensor:
    """A detached copy (same dtype, device, values) that is a new autograd leaf."""
    rg = tensor.requires_grad if requires_grad is None else requires_grad
    return tensor.detach().clone().requires_grad_(rg)


def fused_backend_params(op: str):
    """pytest params ``(backend, device)`` for every fused backend of ``op``: cpu on CPU tensors,
    triton on CUDA tensors (or on CPU tensors through the interpreter when there is no GPU), cuda on
    CUDA tensors. Unavailable ones are skipped with the backend's own reasons (e.g. "needs CUDA")."""
    import pytest

    from . import backends

    params = []
    has_cuda = torch.cuda.is_available()
    for name, device in (("cpu", "cpu"), ("triton", "cuda" if has_cuda else "cpu"), ("cuda", "cuda")):
        b = backends.BACKENDS[name]
        if op not in b.ops:
            continue
        if device == "cuda" and not has_cuda:
            reasons = ["needs CUDA"]
        else:
            reasons = b.not_supported_reasons(op, torch.device(device), torch.float32)
        marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(reasons))] if reasons else []
        params.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return params
