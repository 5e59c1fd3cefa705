"""Input validation shared by every public op (SPEC "Common rules").

Everything here runs before any kernel: wrong rank or shape raises ``ValueError`` naming the argument,
the expected shape and the given one; a wrong dtype raises ``TypeError``; tensors on different
devices raise ``ValueError``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def shape_str(names: Sequence) -> str:
    return "(" + ", ".join(str(n) for n in names) + ")"


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def require_ndim(name: str, t: torch.Tensor, ndims: Sequence[int], expected: str) -> None:
    require_tensor(name, t)
    if t.dim() not in tuple(ndims):
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")


def require_shape(name: str, t: torch.Tensor, shape: Sequence[Optional[int]], expected: str) -> None:
    """``shape`` may hold None for "any size"; ``expected`` is the symbolic shape for the message."""
    require_tensor(name, t)
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        raise ValueError(f"{name}: expected shape {expected} = {shape_str(['*' if s is None else s for s in shape])}, "
                         f"got {tuple(t.shape)}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, float16, bfloat16, float64), "
                        f"got {t.dtype}")


def require_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    require_float(reference_name, reference)
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != reference.dtype:
            raise TypeError(f"{name}: expected dtype {reference.dtype} (the dtype of "
                            f"{reference_name}), got {t.dtype}")


def lse_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """log-sum-exp tensors are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_lse_dtype(name: str, t: torch.Tensor, input_dtype: torch.dtype) -> None:
    want = lse_dtype_for(input_dtype)
    if t.dtype != want:
        raise TypeError(f"{name}: log-sum-exp inputs must be {want} for {input_dtype} inputs, "
                        f"got {t.dtype}")


def require_index_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected int32 or int64, got {t.dtype}")


def require_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    device, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of {first}), "
                             f"got {t.device}")
    return device


def require_int(name: str, value, low: int, high: Optional[int], what: str = "") -> int:
    """An int (or 0-d integer tensor) with ``low <= value <= high``; ``high=None``: no upper bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if high is None and value < low:
        raise ValueError(f"{name}: expected {name} >= {low}{what}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name}: expected {low} <= {name} <= {high}{what}, got {value}")
    return value


def require_broadcastable(name: str, t: torch.Tensor, target: Sequence[int], expected: str) -> None:
    """``t`` must broadcast to exactly ``target`` (no dimension of ``t`` may exceed the target's)."""
    require_tensor(name, t)
    ok = t.dim() <= len(target)
    if ok:
        for size, want in zip(reversed(t.shape), reversed(tuple(target))):
            if size != 1 and size != want:
                ok = False
                break
    if not ok:
        raise ValueError(f"{name}: expected a shape broadcastable to {expected} = "
                         f"{tuple(target)}, got {tuple(t.shape)}")


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether a check may read ``tensor``'s values now: not while torch.compile traces (there are
    none), and not while a CUDA graph is being captured (reading them would synchronise the stream
    being captured, which is an error). Such calls skip the value checks, which then hold only for
    the calls made outside the capture."""
    if torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())
