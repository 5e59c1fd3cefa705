"""``python -m l2m_kernels.info``: versions, what was built, and which backend serves each op here."""
from __future__ import annotations

import os
import platform
import sys
import warnings

import torch

from . import __version__, _ext
from . import _gpu_status
from .backends import BACKENDS, OPS, select_backend


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"not importable ({type(exc).__name__})"
    return triton.__version__


def _serving(op: str, device: torch.device, dtype: torch.dtype) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return select_backend(op, device, dtype)
    except NotImplementedError as exc:
        return f"none ({exc})"


def _cpu_isa_lines(cpu) -> list[str]:
    """The instruction-set variants of the CPU kernels: built, unusable here, in use and why."""
    if not hasattr(cpu, "isa_info"):  # a build from before the variants: one -march for all
        return [f"       -march={cpu.BUILD_INFO.get('cpu_arch', '?') or '(none)'} (single variant)"]
    info = cpu.isa_info()
    built = ", ".join(f"{name} ({'-march=' + march if march else 'no -march'})"
                      for name, march in info["march"].items())
    lines = [f"       variants built:        {built}"]
    for name, why in info["unusable"].items():
        lines.append(f"       cannot run here:       {name}: {why}")
    how = (f"L2M_CPU_ISA={info['requested']}" if info["requested"] != "auto" else
           f"auto: the best variant this CPU runs, within torch's CPU capability "
           f"{info['torch_capability']}")
    lines.append(f"       in use:                {info['active']} ({how})")
    return lines


def report() -> str:
    lines = [
        f"l2m-kernels {__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()})",
        f"triton      {_triton_version()}",
        f"GPU         {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        "",
        "compiled extensions:",
    ]
    cpu = _ext.cpu_extension()
    lines.append("  cpu  (l2m_kernels._C):      " + (
        f"built for torch {getattr(cpu, 'TORCH_VERSION', '?')}, "
        f"OpenMP {getattr(cpu, 'BUILD_INFO', {}).get('openmp', '?')}"
        if cpu is not None else _ext.cpu_extension_error()))
    if cpu is not None:
        lines += _cpu_isa_lines(cpu)
    cuda = _ext.cuda_extension()
    lines.append("  cuda (l2m_kernels._C_cuda): " + (
        f"built for torch {getattr(cuda, 'TORCH_VERSION', '?')}, archs {getattr(cuda, 'CUDA_ARCHS', '?')}"
        if cuda is not None else _ext.cuda_extension_error()))
    lines += ["", "backends:"]
    for name, b in BACKENDS.items():
        why = b.unavailable_reason()
        lines.append(f"  {name:<10} {'available  ' if why is None else 'unavailable'} {b.description}"
                     + ("" if why is None else f" -- {why}"))
    env = {k: os.environ[k] for k in ("L2M_BACKEND", "TRITON_INTERPRET") if k in os.environ}
    lines += ["", "environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "(no overrides)")]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        dtypes = (torch.float32, torch.bfloat16)
        lines += ["", f"backend serving each op on {device.type} (backend=None):"]
        for op in OPS:
            lines.append(f"  {op:<20} " + "   ".join(f"{str(dt).replace('torch.', '')}: {_serving(op, device, dt)}"
                                                   for dt in dtypes))
    lines += ["", *_gpu_status.report_lines()]
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
