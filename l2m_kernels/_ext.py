"""Loading the compiled extensions, with a precise reason when one cannot be used.

``import l2m_kernels`` never fails because of an extension: a missing extension, or one built
against another torch, only makes its backend unavailable. The automatic backend then falls back
(with one warning), and an explicit ``backend="cpu"`` / ``"cuda"`` raises with the rebuild command.
"""
from __future__ import annotations

import importlib
import threading

import torch

REBUILD_COMMAND = "pip install --no-build-isolation -e .  (run in the l2m-kernels source tree)"

_lock = threading.Lock()
_cache: dict[str, tuple[object, str | None]] = {}


def _torch_version_matches(built: str) -> bool:
    # A local build records torch.__version__ exactly; compare the release and local parts.
    return built == torch.__version__


def _load(module_name: str) -> tuple[object, str | None]:
    with _lock:
        if module_name in _cache:
            return _cache[module_name]
        module, reason = None, None
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or OSError/undefined symbols from a stale build
            message = str(exc).splitlines()[0] if str(exc) else repr(exc)
            # The CPU extension refuses to load when L2M_CPU_ISA names a kernel variant that it
            # lacks or that this CPU cannot run: the fix is the variable, not a rebuild.
            fix = ("unset L2M_CPU_ISA or name a variant this CPU runs"
                   if message.startswith("L2M_CPU_ISA=") else f"rebuild with: {REBUILD_COMMAND}")
            reason = (f"extension {module_name} is not importable ({type(exc).__name__}: "
                      f"{message}); {fix}")
        else:
            built = getattr(module, "TORCH_VERSION", None)
            if built is not None and not _torch_version_matches(built):
                reason = (f"extension {module_name} was built for torch {built} but torch "
                          f"{torch.__version__} is installed; rebuild with: {REBUILD_COMMAND}")
                module = None
        if module is not None and module_name == "l2m_kernels._C":
            _sync_stream_stores(module)
        _cache[module_name] = (module, reason)
        return module, reason


def _sync_stream_stores(module=None) -> None:
    """Tell the CPU extension whether to stream its large outputs (``_alloc.stream_stores_wanted``):
    at its first load, and whenever the output cache's limit changes."""
    from . import _alloc

    module = module if module is not None else _cache.get("l2m_kernels._C", (None, None))[0]
    setter = getattr(module, "_set_stream_stores", None)
    if setter is not None:
        setter(_alloc.stream_stores_wanted())


def cpu_extension():
    """The CPU extension module ``l2m_kernels._C``, or None."""
    return _load("l2m_kernels._C")[0]


def cpu_extension_error() -> str | None:
    """Why the CPU extension cannot be used, or None when it can."""
    return _load("l2m_kernels._C")[1]


def cuda_extension():
    """The CUDA extension module ``l2m_kernels._C_cuda``, or None."""
    return _load("l2m_kernels._C_cuda")[0]


def cuda_extension_error() -> str | None:
    """Why the CUDA extension cannot be used, or None when it can."""
    return _load("l2m_kernels._C_cuda")[1]


def _reset_cache_for_tests():
    with _lock:
        _cache.clear()
