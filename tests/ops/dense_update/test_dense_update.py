"""gated_dense_update: every fused backend against the reference, the output and every gradient.

The reference runs in float64 on the same (rounded) inputs; the fused output and the four gradients
(each reduced to its input's shape) are compared with it by relative RMS error at the input dtype's
tolerance. Fused outputs are NaN-poisoned (conftest), so an element a kernel forgets to write fails
the comparison.
"""
import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.memory_write.reference import gated_dense_update_ref
from l2m_kernels.testing import assert_close, fused_backend_params, rand, skip_unless_served

BACKENDS = fused_backend_params("gated_dense_update")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
NAMES = ("dmemory", "dupdate", "dinput_gate", "dforget_gate")

# (memory, update, input_gate, forget_gate) shapes; odd row sizes 7, 63, 129.
CASES = [
    ((2, 3, 5, 7), (2, 3, 5, 7), (2, 3, 5, 7), (2, 3, 5, 7)),
    ((2, 2, 3, 129), (2, 2, 3, 129), (2, 2, 3, 1), (2, 2, 3, 1)),   # per-slot gates
    ((2, 2, 5, 63), (1, 63), (2, 2, 5, 1), (2, 2, 5, 1)),           # (1, D) update
    ((3, 7), (7,), (3, 1), (1, 1)),
    ((2, 1, 4, 129), (1, 3, 1, 129), (3, 1, 1), ()),                # memory broadcast too
    ((1, 63), (5, 63), (63,), (5, 1)),
]


def _case_id(case):
    return "-".join("x".join(map(str, s)) or "scalar" for s in case)


def _inputs(case, dtype, device):
    return tuple(rand(*shape, dtype=dtype, device=device, scale=2.0, requires_grad=True)
                 for shape in case)


def _reference64(inputs, dout):
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    out = gated_dense_update_ref(*leaves)
    return out, torch.autograd.grad(out, leaves, dout.double().cpu())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_update_matches_reference(backend, device, case, dtype):
    skip_unless_served(backend, dtype)
    inputs = _inputs(case, dtype, device)
    out = l2m.gated_dense_update(*inputs, backend=backend)
    shape = torch.broadcast_shapes(*case)
    assert out.dtype == dtype and out.shape == shape
    dout = rand(*shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_out, ref_grads = _reference64(inputs, dout)
    assert_close("out", out, ref_out, dtype)
    for name, grad, ref_grad, leaf in zip(NAMES, grads, ref_grads, inputs):
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert_close(name, grad, ref_grad, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_update_saturated_and_nonfinite(backend, device):
    # Saturated gates give exact 0/1 weights (no NaN from exp overflow); NaN inputs stay NaN.
    memory = torch.tensor([1.0, 2.0, 3.0, float("nan")], device=device)
    update = torch.tensor([0.5, 50.0, -50.0, 0.0], device=device)
    input_gate = torch.tensor([-200.0, 200.0, 200.0, 0.0], device=device)
    forget_gate = torch.tensor([200.0, -200.0, 0.0, 0.0], device=device)
    out = l2m.gated_dense_update(memory, update, input_gate, forget_gate, backend=backend)
    assert out.device == memory.device
    expected = gated_dense_update_ref(memory.double(), update.double(), input_gate.double(),
                                      forget_gate.double()).float()
    assert torch.allclose(out, expected, equal_nan=True, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_update_tanh_within_a_few_ulp(backend, device):
    # Input gate saturated at 1 and forget gate at 0: out = tanh(update) exactly as the kernel computes
    # it, over every magnitude (the cpu kernel's rational tanh: within 5 ulp of the float64 tanh,
    # +-1 at +-inf, NaN for NaN), and dupdate = dout * (1 - tanh**2).
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    tiny = torch.logspace(-30, 1, 20001, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 8.999, 9.0, 7.905, -7.906])
    update = torch.cat([grid, tiny, -tiny, special.double()]).float().to(device).requires_grad_(True)
    memory = torch.randn(update.shape, device=device)
    input_gate = torch.full((1,), 200.0, device=device)
    forget_gate = torch.full((1,), -200.0, device=device)
    out = l2m.gated_dense_update(memory, update, input_gate, forget_gate, backend=backend)
    exact = torch.tanh(update.detach().double())
    ulp = (out.detach().double() - exact).abs() / torch.finfo(torch.float32).eps / exact.abs().clamp_min(2 ** -126)
    finite = ~exact.isnan()
    assert float(ulp[finite].max()) <= 5.0 * 2  # eps is 2 ulp of values in [1/2, 1)
    assert out[~finite].isnan().all()
    assert torch.equal(out.detach()[-9:-5].cpu(), torch.tensor([0.0, -0.0, 1.0, -1.0]))
    dout = torch.randn(update.shape, device=device)
    out.backward(dout)
    th = out.detach().double()
    expected = dout.double() * (1 - th * th)
    assert_close("dupdate", update.grad[finite], expected[finite].float(), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shapes", [((0, 5), (0, 5), (0, 1), (1,)), ((2, 0, 3), (3,), (1, 1, 3), ())],
                         ids=["rows0", "mid0"])
def test_dense_update_empty(backend, device, shapes):
    inputs = _inputs(shapes, torch.float32, device)
    out = l2m.gated_dense_update(*inputs, backend=backend)
    assert out.shape == torch.broadcast_shapes(*shapes) and out.numel() == 0
    grads = torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
    for grad, leaf in zip(grads, inputs):
        assert grad.shape == leaf.shape and torch.equal(grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_update_deterministic(backend, device, dtype):
    case = ((2, 4, 33, 129), (1, 129), (2, 4, 33, 1), (2, 4, 1, 1))  # > one parallel chunk
    inputs = _inputs(case, dtype, device)
    dout = rand(*torch.broadcast_shapes(*case), dtype=dtype, device=device)
    runs = []
    for _ in range(2):
        out = l2m.gated_dense_update(*inputs, backend=backend)
        runs.append((out,) + torch.autograd.grad(out, inputs, dout))
    for first, second in zip(*runs):
        assert torch.equal(first.view(torch.uint8) if first.numel() else first,
                           second.view(torch.uint8) if second.numel() else second)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_update_strided_inputs(backend, device):
    memory = rand(4, 3, 7, device=device).transpose(0, 1).requires_grad_()  # (3, 4, 7) strided
    update = rand(7, 3, device=device).t()[None].requires_grad_()          # (1, 3, 7), strided
    input_gate = rand(3, 4, 1, device=device, requires_grad=True)
    forget_gate = rand(1, device=device, requires_grad=True)
    update_full = update.expand(4, 3, 7).transpose(0, 1)
    inputs = (memory, update_full, input_gate, forget_gate)
    out = l2m.gated_dense_update(*inputs, backend=backend)
    ref = gated_dense_update_ref(*(t.detach() for t in inputs))
    assert_close("out", out, ref)
    dout = rand(*out.shape, device=device)
    grads = torch.autograd.grad(out, (memory, update, input_gate, forget_gate), dout)
    ref_grads = torch.autograd.grad(gated_dense_update_ref(*inputs), (memory, update, input_gate,
                                                                      forget_gate), dout)
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        assert_close(name, grad, ref_grad)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_update_eager_entry_equals_the_custom_op(backend, device):
    # Outside torch.compile the public call runs the launchers under an autograd.Function of the op's
    # own formula; torch.compile traces the custom op. Same bits for the output and every gradient.
    case = CASES[4]  # broadcast memory, update, gates and a 0-d forget gate
    inputs = [t.to(device) for t in _inputs(case, torch.float32, "cpu")]
    out = l2m.gated_dense_update(*inputs, backend=backend)
    assert type(out.grad_fn).__name__.startswith("gated_dense_update_eager")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device)
    grads = torch.autograd.grad(out, inputs, dout)
    op_out = torch.ops.l2m.gated_dense_update(*inputs, backend)
    op_grads = torch.autograd.grad(op_out, inputs, dout)
    assert torch.equal(out, op_out)
    for name, actual, expected in zip(NAMES, grads, op_grads):
        assert actual.shape == expected.shape and torch.equal(actual, expected), name
    with torch.no_grad():
        assert torch.equal(l2m.gated_dense_update(*inputs, backend=backend), out)
