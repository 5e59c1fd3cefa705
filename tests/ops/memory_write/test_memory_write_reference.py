"""The gated memory write references against brute-force Python loops (SPEC section 3)."""
from __future__ import annotations

import pytest
import torch

from l2m_kernels.ops.memory_write.reference import (
    gated_dense_update_ref,
    gated_memory_write_ref,
    gated_memory_write_ref_,
)
from l2m_kernels.testing import assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def brute_force_write(memory, indices, weights, add, erase):
    """SPEC 3 read literally: every (b, h, t, j) in order, one slot at a time, in float64."""
    three_d = memory.dim() == 3
    if three_d:
        memory, indices, weights, add, erase = (
            x.unsqueeze(1) for x in (memory, indices, weights, add, erase))
    state = memory.detach().to(torch.float64).clone()
    weights, add, erase = (x.detach().to(torch.float64) for x in (weights, add, erase))
    batch, mem_heads, steps, writes_per_step = indices.shape
    for b in range(batch):
        for h in range(mem_heads):
            for t in range(steps):
                for j in range(writes_per_step):
                    slot = int(indices[b, h, t, j])
                    if slot < 0:
                        continue
                    w = weights[b, h, t, j]
                    state[b, h, slot] = state[b, h, slot] * (1 - w * erase[b, h, t]) + w * add[b, h, t]
    return state.squeeze(1) if three_d else state


def make_write_inputs(batch=2, mem_heads=3, num_slots=7, dim=63, steps=5, writes_per_step=3,
                      dtype=torch.float64, index_dtype=torch.int64, erase_dim=None, three_d=False,
                      seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (batch,) if three_d else (batch, mem_heads)
    erase_dim = dim if erase_dim is None else erase_dim
    memory = torch.randn(*lead, num_slots, dim, generator=gen, dtype=torch.float64).to(dtype)
    indices = torch.randint(-1, num_slots, (*lead, steps, writes_per_step), generator=gen).to(index_dtype)
    weights = torch.rand(*lead, steps, writes_per_step, generator=gen, dtype=torch.float64).to(dtype)
    add = torch.randn(*lead, steps, dim, generator=gen, dtype=torch.float64).to(dtype)
    erase = torch.rand(*lead, steps, erase_dim, generator=gen, dtype=torch.float64).to(dtype)
    return memory, indices, weights, add, erase


def check_write(memory, indices, weights, add, erase):
    """Out-of-place against brute force; in-place equal to out-of-place, bit for bit."""
    before = memory.clone()
    out = gated_memory_write_ref(memory, indices, weights, add, erase)
    assert out.dtype == memory.dtype and out.shape == memory.shape
    assert out.data_ptr() != memory.data_ptr() or memory.numel() == 0
    assert torch.equal(memory, before), "out-of-place form modified its input"
    assert_close("memory", out, brute_force_write(memory, indices, weights, add, erase), dtype=memory.dtype)

    target = memory.clone()
    returned = gated_memory_write_ref_(target, indices, weights, add, erase)
    assert returned is target
    assert torch.equal(target, out), "in-place and out-of-place forms differ"
    # Slots no (b, h) writes keep their bits.
    if memory.shape[-2] > 0:
        write_count = torch.zeros(memory.shape[:-1], dtype=torch.int64)
        flat = indices.long().flatten(-2)
        write_count.scatter_add_(-1, flat.clamp_min(0), (flat >= 0).long())
        unwritten = write_count == 0
        assert torch.equal(target[unwritten], before[unwritten])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_writes_odd_sizes(dtype):
    check_write(*make_write_inputs(dtype=dtype))


def test_repeated_slots_within_and_across_steps():
    memory, indices, weights, add, erase = make_write_inputs(steps=4, writes_per_step=3)
    indices[:, :, 0] = 2  # the same slot three times within one step
    indices[:, :, 1, 0] = 2  # and again in the next steps
    indices[:, :, 2, 1:] = torch.tensor([2, 2])
    indices[:, :, 3] = torch.tensor([5, 5, -1])
    check_write(memory, indices, weights, add, erase)


def test_minus_one_does_not_touch_slot_zero():
    memory, indices, weights, add, erase = make_write_inputs(num_slots=4, dim=5, steps=3, writes_per_step=2)
    indices.copy_(torch.tensor([[-1, 0], [0, -1], [-1, -1]]))
    add[:] = float("nan")  # NaN/inf in entries that are skipped must not leak
    add[:, :, 0:2] = 1.5
    check_write(memory, indices, weights, add, erase)
    indices.fill_(-1)
    add.fill_(float("inf"))
    out = check_write(memory, indices, weights, add, erase)
    assert torch.equal(out, memory)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_erase_broadcast_int32_indices(dtype):
    check_write(*make_write_inputs(dtype=dtype, erase_dim=1, index_dtype=torch.int32))


@pytest.mark.parametrize("erase_dim", [None, 1])
def test_three_d_memory(erase_dim):
    check_write(*make_write_inputs(three_d=True, erase_dim=erase_dim, index_dtype=torch.int32))


@pytest.mark.parametrize(
    "shape", [dict(steps=0), dict(writes_per_step=0), dict(batch=0), dict(num_slots=0)])
def test_empty(shape):
    inputs = make_write_inputs(**shape)  # num_slots=0 draws only -1 indices
    out = check_write(*inputs)
    assert torch.equal(out, inputs[0])


def test_non_contiguous_memory_in_place():
    memory, indices, weights, add, erase = make_write_inputs()
    base = memory.transpose(1, 2).contiguous()  # (B, N, Hm, D)
    view = base.transpose(1, 2)  # (B, Hm, N, D), not contiguous
    expected = gated_memory_write_ref(memory, indices, weights, add, erase)
    gated_memory_write_ref_(view, indices, weights, add, erase)
    assert torch.equal(base.transpose(1, 2), expected)


@pytest.mark.parametrize("erase_dim,three_d", [(None, False), (1, False), (None, True)])
def test_write_gradcheck(erase_dim, three_d):
    memory, indices, weights, add, erase = make_write_inputs(
        batch=2, mem_heads=2, num_slots=4, dim=3, steps=3, writes_per_step=2, erase_dim=erase_dim,
        three_d=three_d, seed=1)
    lead = indices.shape[:-2]
    # Repeated slots within and across steps, and skipped entries.
    indices.copy_(torch.tensor([[1, 1], [-1, 1], [0, 3]]).expand(*lead, 3, 2))
    inputs = [x.clone().requires_grad_() for x in (memory, weights, add, erase)]

    def fn(memory, weights, add, erase):
        return gated_memory_write_ref(memory, indices, weights, add, erase)

    assert torch.autograd.gradcheck(fn, inputs)


def test_write_under_compile():
    memory, indices, weights, add, erase = make_write_inputs(steps=2, writes_per_step=2, dim=4)
    compiled = torch.compile(gated_memory_write_ref, fullgraph=True, backend="eager")
    leaves = [x.clone().requires_grad_() for x in (memory, weights, add, erase)]
    out = compiled(leaves[0], indices, *leaves[1:])
    assert torch.equal(out, gated_memory_write_ref(memory, indices, weights, add, erase))
    out.square().sum().backward()
    eager = [x.clone().requires_grad_() for x in (memory, weights, add, erase)]
    gated_memory_write_ref(eager[0], indices, *eager[1:]).square().sum().backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)

    target = memory.clone()
    compiled_ = torch.compile(gated_memory_write_ref_, fullgraph=True, backend="eager")
    compiled_(target, indices, weights, add, erase)
    assert torch.equal(target, out.detach())


DENSE_SHAPES = [
    # memory, update, input_gate, forget_gate
    ((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 1), (3, 1, 1)),
    ((3, 5, 4), (1, 5, 4), (), (3, 5, 4)),
]


def make_dense_inputs(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


@pytest.mark.parametrize("shapes", DENSE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_update(shapes, dtype):
    memory, update, input_gate, forget_gate = make_dense_inputs(shapes, dtype)
    out = gated_dense_update_ref(memory, update, input_gate, forget_gate)
    m, u, i, f = (x.to(torch.float64) for x in (memory, update, input_gate, forget_gate))
    expected = torch.sigmoid(f) * m + torch.sigmoid(i) * torch.tanh(u)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close("dense update", out, expected, dtype=dtype)


def test_dense_update_dtype_promotion():
    memory, update, input_gate, forget_gate = make_dense_inputs(DENSE_SHAPES[0], torch.bfloat16)
    assert gated_dense_update_ref(memory, update.float(), input_gate, forget_gate).dtype == torch.float32


@pytest.mark.parametrize("shapes", DENSE_SHAPES)
def test_dense_update_gradcheck(shapes):
    inputs = [x.requires_grad_() for x in make_dense_inputs(shapes, torch.float64)]
    assert torch.autograd.gradcheck(gated_dense_update_ref, inputs)


def test_dense_update_under_compile():
    inputs = make_dense_inputs(DENSE_SHAPES[0], torch.float32)
    compiled = torch.compile(gated_dense_update_ref, fullgraph=True, backend="eager")
    assert torch.equal(compiled(*inputs), gated_dense_update_ref(*inputs))
