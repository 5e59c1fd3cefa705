"""The fake kernels (what ``torch.compile`` plans with) and the real kernels agree on every output's
shape, dtype and strides, forward and backward, for inputs of any layout.

``CrossRefFakeMode`` runs each ``torch.ops.l2m`` call twice, on fake and on real tensors, and
raises on any mismatch. Every declared op runs on every backend usable here, forward and backward,
on valid cases drawn by its fuzz strategy with at least one input laid out as models produce them
(a transposed view, a slice, a stride-0 expansion): the check that catches a fake kernel returning
``torch.empty_like`` of a transposed input while the kernel returns a row-major tensor. A new op is
covered by its declaration and its fuzz strategy, without an edit here.
"""
import pytest
import torch
from torch._subclasses import CrossRefFakeMode

from l2m_kernels import fuzz
from l2m_kernels.backends import OPS

BACKENDS = ("reference", "cpu", "triton")
PAIRS = [(op, backend) for op in OPS for backend in BACKENDS]


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in (result if isinstance(result, tuple) else ()) if isinstance(t, torch.Tensor)]


def _fake_and_real_agree(case):
    with CrossRefFakeMode(ignore_op_fn=lambda op: op.namespace != "l2m"):
        if not case.check_grad:
            with torch.no_grad():
                case.call()
            return
        outputs = [t for t in _tensors(case.call()) if t.is_floating_point() and t.requires_grad]
        if outputs:
            sum(t.float().sum() for t in outputs).backward()


@pytest.mark.parametrize("op,backend", PAIRS, ids=[f"{op}-{backend}" for op, backend in PAIRS])
def test_fake_kernels_match_the_real_ones_on_strided_inputs(op, backend):
    why = fuzz.backend_unavailable(op, backend)
    if why:
        pytest.skip(why)
    fuzz.each_case(op, backend, _fake_and_real_agree, examples=6, strided=True, device=torch.device("cpu"))
