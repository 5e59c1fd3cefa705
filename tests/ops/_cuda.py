"""What the CUDA kernel tests (``tests/ops/<op>/test_<op>_cuda.py``) share: their dtypes and special
values, and the three tests each op's module makes from its own pieces.

Each module calls the kernels of ``l2m_kernels._C_cuda`` directly and gives a
``check_<op>(ext, device, case, dtype)`` that runs one case against the float64 reference, and a
``_bad_calls(device)`` table of calls that must raise. Without a CUDA device the gpu tests skip,
saying so; a few cases' test bodies then run on CPU tensors with the CPU kernels standing in for
the CUDA ones (``tests/ops/cpu_kernels.py``), and the whole case matrix's inputs and reference side
are built on the CPU.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import pytest
import torch

from .cpu_kernels import cpu_kernels_as_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_KERNEL_DTYPES = [torch.float32, torch.bfloat16]  # the stand-in runs: float32 and one half type
NAN = float("nan")
NEG_INF = float("-inf")
INDEX_SENTINEL = -7  # indices are pre-filled with it: an unwritten entry fails the checks

Check = Callable[..., None]  # check(ext, device, case, dtype)
BadCalls = Callable[[str], Dict[str, Tuple[type, Callable]]]  # device -> {name: (error, call)}


def cuda_kernel_test(check: Check, cases: Sequence, case_id: Callable) -> Callable:
    """A gpu test: ``check(cuda_ext, "cuda", case, dtype)`` for every case and every dtype of
    DTYPES. Bound to a ``test_*`` name in the op's module."""
    @pytest.mark.gpu
    @pytest.mark.parametrize("case", cases, ids=case_id)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test(cuda_ext, case, dtype):
        check(cuda_ext, "cuda", case, dtype)

    return test


def cpu_kernels_test(check: Check, cases: Sequence, case_id: Callable) -> Callable:
    """A test that runs the gpu test's body, ``check(ext, "cpu", case, dtype)``, on CPU tensors
    with the CPU kernels in the CUDA kernels' place, for the given cases in CPU_KERNEL_DTYPES."""
    @pytest.mark.parametrize("case", cases, ids=case_id)
    @pytest.mark.parametrize("dtype", CPU_KERNEL_DTYPES, ids=str)
    def test(case, dtype):
        check(cpu_kernels_as_cuda(), "cpu", case, dtype)

    return test


def bad_call_test(bad_calls: BadCalls) -> Callable:
    """A gpu test: each call of ``bad_calls("cuda")`` raises its exception type (before or at the
    launch: the device is synchronized inside the check)."""
    @pytest.mark.gpu
    @pytest.mark.parametrize("name", list(bad_calls("cpu")))
    def test(cuda_ext, name):
        error_type, call = bad_calls("cuda")[name]
        with pytest.raises(error_type):
            call(cuda_ext)
            torch.cuda.synchronize()

    return test


def assert_bad_calls_listed(bad_calls: BadCalls) -> None:
    """The bad-call table builds on CPU tensors: each entry an exception type and a call."""
    for name, (error_type, call) in bad_calls("cpu").items():
        assert issubclass(error_type, Exception) and callable(call), name
