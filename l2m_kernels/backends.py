"""Backends and automatic dispatch.

Each backend is a small class that declares what it supports (ops, device types, dtypes) and answers
``not_supported_reasons(op, device, dtype)`` with a list of human-readable reasons (empty when it can
serve the call). Dispatch (:func:`select_backend`) asks each backend in priority order and takes the
first with no reasons; an explicit backend that cannot serve raises ``NotImplementedError`` listing
why, and when nothing fits the error lists every backend's reasons.

Priority with ``backend=None``: the backend named by the environment variable ``L2M_BACKEND`` first
(when it can serve the call), then ``cuda, triton, reference`` for CUDA tensors and
``cpu, reference`` for CPU tensors. Triton serves CPU tensors only under ``TRITON_INTERPRET=1`` and
only when asked for explicitly (or through ``L2M_BACKEND``): the interpreter is a debugging tool.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from . import _ext
from .ops import registry

logger = logging.getLogger("l2m_kernels")

# The ops, in the order of their declarations (l2m_kernels/ops/registry.py).
OPS = tuple(registry.OPS)

_HALF_AND_SINGLE = frozenset({torch.float32, torch.float16, torch.bfloat16})
_ALL_FLOATS = _HALF_AND_SINGLE | {torch.float64}


class Backend:
    """What a backend declares. Subclasses set the class attributes and may extend the checks."""

    name: str = ""
    ops: frozenset = frozenset()
    device_types: frozenset = frozenset()
    dtypes: frozenset = frozenset()
    description: str = ""

    def __init__(self):
        # What each op's declaration says of this backend: the ops it serves, and per op
        # {size name: largest value served}, checked against the sizes a call passes to
        # select_backend (e.g. the cuda top-k read keeps a head's query/key rows in shared memory).
        self.ops = registry.served_by(self.name)
        self.size_limits = registry.size_limits(self.name)

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all on this installation, or None."""
        return None

    def not_supported_reasons(self, op: str, device: torch.device, dtype: torch.dtype,
                              sizes: dict | None = None) -> list[str]:
        reasons = []
        for size, limit in self.size_limits.get(op, {}).items():
            if sizes is not None and sizes.get(size, 0) > limit:
                reasons.append(f"{self.name} serves {op} with {size} <= {limit}, got {sizes[size]}")
        if op not in self.ops:
            reasons.append(f"{self.name} has no kernel for {op} (it implements: "
                           f"{', '.join(sorted(self.ops)) or 'nothing yet'})")
        if device.type not in self.device_types:
            reasons.append(f"{self.name} runs on {'/'.join(sorted(self.device_types))} tensors, "
                           f"got {device.type}")
        if dtype not in self.dtypes:
            reasons.append(f"{self.name} does not support {dtype}")
        unavailable = self.unavailable_reason()
        if unavailable:
            reasons.append(unavailable)
        return reasons


class ReferenceBackend(Backend):
    name = "reference"
    device_types = frozenset({"cpu", "cuda"})
    dtypes = _ALL_FLOATS
    description = "naive PyTorch (differentiable with plain autograd, float64-capable)"


def _missing_entry(module, op: str, name: str) -> list[str]:
    # The extension function the op needs: an extension built from older sources lacks newer ones.
    serving = registry.OPS[op].backends.get(name) if op in registry.OPS else None
    entry = serving.entry if serving is not None else None
    if module is None or entry is None or hasattr(module, entry):
        return []
    return [f"the {name} extension was built from older sources without {entry}; rebuild with: "
            f"{_ext.REBUILD_COMMAND}"]


class CpuBackend(Backend):
    name = "cpu"
    device_types = frozenset({"cpu"})
    dtypes = _ALL_FLOATS
    description = "C++/OpenMP extension l2m_kernels._C"

    def unavailable_reason(self):
        return _ext.cpu_extension_error()

    def not_supported_reasons(self, op, device, dtype, sizes=None):
        reasons = super().not_supported_reasons(op, device, dtype, sizes)
        return reasons + _missing_entry(_ext.cpu_extension(), op, "cpu")


class CudaBackend(Backend):
    name = "cuda"
    device_types = frozenset({"cuda"})
    dtypes = _HALF_AND_SINGLE
    description = "CUDA C++ extension l2m_kernels._C_cuda"

    def not_supported_reasons(self, op, device, dtype, sizes=None):
        reasons = super().not_supported_reasons(op, device, dtype, sizes)
        return reasons + _missing_entry(_ext.cuda_extension(), op, "cuda")

    def unavailable_reason(self):
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return _ext.cuda_extension_error()


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_STATE: dict[str, str | None] = {}


def _triton_import_error() -> str | None:
    if "error" not in _TRITON_STATE:
        try:
            import triton  # noqa: F401
        except Exception as exc:
            _TRITON_STATE["error"] = f"triton is not importable ({type(exc).__name__}: {exc})"
        else:
            _TRITON_STATE["error"] = None
    return _TRITON_STATE["error"]


class TritonBackend(Backend):
    name = "triton"
    device_types = frozenset({"cuda", "cpu"})
    dtypes = _HALF_AND_SINGLE
    description = "Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)"

    def unavailable_reason(self):
        return _triton_import_error()

    def not_supported_reasons(self, op, device, dtype, sizes=None):
        reasons = super().not_supported_reasons(op, device, dtype, sizes)
        if device.type == "cpu" and not triton_interpret_enabled():
            reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1")
        return reasons


BACKENDS: dict[str, Backend] = {b.name: b for b in
                                (CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend())}

# Automatic order per device type. Triton on CPU (the interpreter) is never picked automatically.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# Per-op exceptions to AUTO_ORDER, from the ops' declarations (``auto_order``).
AUTO_ORDER_BY_OP = {(device_type, name): order for name, decl in registry.OPS.items()
                    for device_type, order in decl.auto_order.items()}

_warned_fallback: set[str] = set()


def _env_backend() -> str | None:
    name = os.environ.get("L2M_BACKEND", "").strip()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"L2M_BACKEND={name!r} is not a backend; choose one of "
                         f"{', '.join(BACKENDS)}")
    return name


AUTO = "auto"  # the raw custom ops' default; the same as backend=None


def _check_name(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected None, {AUTO!r} (automatic) or one of "
                         f"{', '.join(map(repr, BACKENDS))}, got {backend!r}")


def _constant_at_trace_time(fn):
    # Under torch.compile the choice is made once, while tracing, and baked into the graph: the
    # dispatch logic (environment, extension state, warnings) is not traceable and need not be.
    assume = getattr(getattr(torch, "_dynamo", None), "assume_constant_result", None)
    return assume(fn) if assume is not None else fn


def select_backend(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None,
                   sizes: dict | None = None) -> str:
    """The name of the backend that serves ``op`` for tensors on ``device`` of ``dtype``.

    Explicit ``backend``: that backend or ``NotImplementedError`` with its reasons; an unknown name
    raises ``ValueError`` listing the valid ones.
    ``None`` or ``"auto"``: ``L2M_BACKEND`` when it can serve, else the first of
    :data:`AUTO_ORDER` (or the op's entry in :data:`AUTO_ORDER_BY_OP`) that can.
    ``sizes`` (name -> int) are checked against each backend's ``size_limits``.
    """
    if backend == AUTO:
        backend = None
    if sizes is not None:
        # Only the sizes over some backend's limit matter. Comparing (rather than reading) them keeps
        # a dimension that torch.compile traces as dynamic symbolic: the comparison becomes a guard
        # such as "B * H * T <= 2**31 - 1" instead of specialising the graph to one value.
        over = {}
        for candidate in BACKENDS.values():
            for name, limit in candidate.size_limits.get(op, {}).items():
                if name in sizes and name not in over and sizes[name] > limit:
                    over[name] = int(sizes[name])
        sizes = tuple((name, over[name]) for name in sorted(over))
    return _select_backend(op, device.type, dtype, backend, sizes)


@_constant_at_trace_time
def _select_backend(op: str, device_type: str, dtype: torch.dtype, backend: str | None,
                    size_items: tuple | None = None) -> str:
    device = torch.device(device_type)
    sizes = None if size_items is None else dict(size_items)
    if backend is not None:
        _check_name(backend)
        reasons = BACKENDS[backend].not_supported_reasons(op, device, dtype, sizes)
        if reasons:
            raise NotImplementedError(f"backend {backend!r} cannot serve {op} on {device.type} "
                                      f"{dtype}: " + "; ".join(reasons))
        return backend
    order = list(AUTO_ORDER_BY_OP.get((device.type, op), AUTO_ORDER.get(device.type, ("reference",))))
    preferred = _env_backend()
    if preferred is not None:
        order = [preferred] + [name for name in order if name != preferred]
    all_reasons = {}
    for name in order:
        reasons = BACKENDS[name].not_supported_reasons(op, device, dtype, sizes)
        if not reasons:
            _note_fallback(op, name, all_reasons)
            logger.debug("%s on %s %s -> backend %s", op, device.type, dtype, name)
            return name
        all_reasons[name] = reasons
    raise NotImplementedError(f"no backend can serve {op} on {device.type} {dtype}: " +
                              " | ".join(f"{n}: {'; '.join(r)}" for n, r in all_reasons.items()))


def _note_fallback(op: str, chosen: str, skipped: dict) -> None:
    # One warning per process when a compiled extension that should have served is unusable.
    for name, reasons in skipped.items():
        ext_error = BACKENDS[name].unavailable_reason()
        if ext_error and name in ("cpu", "cuda") and name not in _warned_fallback and op in BACKENDS[name].ops:
            _warned_fallback.add(name)
            warnings.warn(f"l2m_kernels: backend {name!r} is unavailable ({ext_error}); "
                          f"falling back to {chosen!r}.", RuntimeWarning, stacklevel=4)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable on this installation (for ``device`` type when given), in priority order."""
    device_type = None if device is None else torch.device(device).type
    names = []
    for name, b in BACKENDS.items():
        if b.unavailable_reason() is not None:
            continue
        if device_type is not None and device_type not in b.device_types:
            continue
        if name == "triton" and device_type == "cpu" and not triton_interpret_enabled():
            continue
        if name == "cuda" and not torch.cuda.is_available():
            continue
        if name == "triton" and device_type != "cpu" and not torch.cuda.is_available() and not triton_interpret_enabled():
            continue
        names.append(name)
    return names


def resolve_deterministic(deterministic: bool) -> bool:
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()
