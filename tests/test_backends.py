"""Backend machinery: declared support, automatic order, L2M_BACKEND, explicit failures, the missing
extension fallback, and python -m l2m_kernels.info."""
import subprocess
import sys
import warnings

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels import _ext, backends
from l2m_kernels.testing import rand, rand_lse

CPU = torch.device("cpu")


def test_every_backend_declares_and_reference_serves_everything():
    assert set(backends.BACKENDS) == {"reference", "cpu", "triton", "cuda"}
    for op in backends.OPS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            assert backends.BACKENDS["reference"].not_supported_reasons(op, CPU, dtype) == []


def test_reasons_are_specific():
    reasons = backends.BACKENDS["cuda"].not_supported_reasons("topk_memory_read", CPU, torch.float64)
    text = " ".join(reasons)
    assert "cuda" in text and "float64" in text and "cpu" in text


def test_available_backends_lists_reference():
    names = l2m.available_backends()
    assert "reference" in names
    assert "reference" in l2m.available_backends("cpu")


def test_auto_prefers_cpu_extension_for_merge_when_built():
    name = backends.select_backend("merge_attention", CPU, torch.float32)
    assert name == ("cpu" if _ext.cpu_extension() is not None else "reference")


def test_env_override(monkeypatch):
    monkeypatch.setenv("L2M_BACKEND", "reference")
    assert backends.select_backend("merge_attention", CPU, torch.float32) == "reference"
    # A preferred backend that cannot serve the call falls through to the automatic order.
    monkeypatch.delenv("L2M_BACKEND")
    automatic = backends.select_backend("product_key_read", CPU, torch.float32)
    monkeypatch.setenv("L2M_BACKEND", "cuda")
    assert backends.select_backend("product_key_read", CPU, torch.float32) == automatic
    monkeypatch.setenv("L2M_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="L2M_BACKEND"):
        backends.select_backend("merge_attention", CPU, torch.float32)


def test_explicit_backend_raises_not_implemented_with_reasons():
    with pytest.raises(NotImplementedError, match="cuda"):
        backends.select_backend("merge_attention", CPU, torch.float32, "cuda")
    with pytest.raises(ValueError, match="backend"):
        backends.select_backend("merge_attention", CPU, torch.float32, "gpu")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(_ext._cache, "l2m_kernels._C", (None, "extension l2m_kernels._C is not importable "
                                                        "(simulated); rebuild with: " + _ext.REBUILD_COMMAND))
    monkeypatch.setattr(backends, "_warned_fallback", set())
    args = (rand(1, 2, 3, 4), rand_lse(1, 2, 3), rand(1, 2, 3, 4), rand_lse(1, 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l2m.merge_attention(*args)
        l2m.merge_attention(*args)
    fallback = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallback) == 1 and "pip install --no-build-isolation -e ." in str(fallback[0].message)
    with pytest.raises(NotImplementedError) as info:
        l2m.merge_attention(*args, backend="cpu")
    assert "pip install --no-build-isolation -e ." in str(info.value)


def test_extension_built_for_other_torch_is_refused(monkeypatch):
    class Stale:
        TORCH_VERSION = "1.0.0"

    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: Stale)
    monkeypatch.setattr(_ext, "_cache", {})
    module, reason = _ext._load("l2m_kernels._C")
    assert module is None and "built for torch 1.0.0" in reason and "pip install" in reason


def test_info_command_reports_backends():
    out = subprocess.run([sys.executable, "-m", "l2m_kernels.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "cpu  (l2m_kernels._C)", "reference", "merge_attention", "topk_memory_read"):
        assert word in out.stdout


def test_cpu_extension_records_its_build():
    module = _ext.cpu_extension()
    if module is None:
        pytest.skip(f"CPU extension not usable: {_ext.cpu_extension_error()}")
    assert module.TORCH_VERSION == torch.__version__


def test_size_limits_are_reasons():
    cuda = backends.BACKENDS["cuda"]
    device = torch.device("cuda")
    big = cuda.not_supported_reasons("topk_memory_read", device, torch.float32, {"Dk": 300, "Dv": 64})
    assert any("Dk <= 256, got 300" in r for r in big)
    assert not any("Dv" in r for r in big)
    fine = cuda.not_supported_reasons("topk_memory_read", device, torch.float32, {"Dk": 256, "Dv": 256})
    assert not any("<=" in r for r in fine)
    # Without CUDA the automatic choice for CPU tensors ignores the cuda limits entirely.
    assert backends.select_backend("topk_memory_read", torch.device("cpu"), torch.float32,
                                   sizes={"Dk": 300}) in ("cpu", "reference")


def test_cuda_order_puts_triton_first_for_memory_attention_only(monkeypatch):
    """On CUDA tensors the cuda backend comes first, except for memory_attention, where triton's fused
    kernel does (the cuda composition serves when named or when triton cannot)."""
    served = {"cuda", "triton"}
    for name in ("cuda", "triton"):
        monkeypatch.setattr(backends.BACKENDS[name], "not_supported_reasons",
                            lambda op, device, dtype, sizes=None, name=name: [] if name in served else ["off"])
    cuda = torch.device("cuda")
    assert backends.select_backend("topk_memory_read", cuda, torch.float32) == "cuda"
    assert backends.select_backend("memory_attention", cuda, torch.float32) == "triton"
    assert backends.select_backend("memory_attention", cuda, torch.float32, "cuda") == "cuda"
    served.discard("triton")
    assert backends.select_backend("memory_attention", cuda, torch.float32) == "cuda"
