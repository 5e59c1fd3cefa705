"""What the Triton kernel tests (``tests/ops/<op>/test_<op>_triton.py``) share: the device their
kernels run on, the check that those kernels run under the interpreter when there is no GPU, and
the warning filters for the interpreter's numpy arithmetic.

Triton picks the interpreter when a kernel is *decorated*, so ``TRITON_INTERPRET=1`` must be set
before an op's ``triton`` module is first imported; ``tests/conftest.py`` sets it when there is no
GPU, before the package is imported.
"""
from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# numpy's warnings for the deliberate inf/NaN rows when the interpreter evaluates the kernels.
INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                                  "ignore:divide by zero encountered:RuntimeWarning",
                                                  "ignore:overflow encountered:RuntimeWarning",
                                                  "ignore:All-NaN slice encountered:RuntimeWarning")


def skip_module_unless_interpreted(kernels, kernel_name: str) -> None:
    """Without a GPU, skip the calling test module (saying why) when the kernel ``kernel_name`` of
    the module ``kernels`` was decorated before ``TRITON_INTERPRET=1`` was set: it would not run."""
    if DEVICE != "cpu":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(getattr(kernels, kernel_name), InterpretedFunction):
        pytest.skip(f"{kernels.__name__} was imported before TRITON_INTERPRET=1 was set",
                    allow_module_level=True)


def skip_heavy_case_under_interpreter(backend: str, device: str, dtype: torch.dtype,
                                      heavy: bool) -> None:
    """Skip a large case of the triton backend in float16 under the interpreter (CPU tensors), for
    the interpreter's time: such cases run in float32 and bfloat16, and float16 takes bfloat16's
    kernel path."""
    if backend == "triton" and device == "cpu" and dtype == torch.float16 and heavy:
        pytest.skip("Triton interpreter time: this large case runs in float32 and bfloat16 (float16 takes "
                    "bfloat16's kernel path; it runs the smaller cases)")
