"""gated_memory_write: every fused backend against the reference, the output and every gradient.

The reference runs in float64 on the same (rounded) inputs; the fused output and gradients are
compared with it by relative RMS error at the input dtype's tolerance. Fused outputs are
NaN-poisoned (conftest), so an element a kernel forgets to write fails the comparison.
"""
import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.memory_write.reference import gated_memory_write_ref, gated_memory_write_ref_
from l2m_kernels.testing import assert_close, fused_backend_params, rand, skip_unless_served

BACKENDS = fused_backend_params("gated_memory_write")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (B, Hm or None for the 3-D form, N, D, T, kw, erase last size 1, index dtype)
CASES = [
    (2, 3, 7, 7, 7, 3, False, torch.int64),
    (1, 2, 63, 129, 7, 1, True, torch.int32),
    (2, None, 129, 1, 7, 3, False, torch.int64),
    (1, 1, 7, 129, 7, 3, True, torch.int64),
    (2, 2, 63, 7, 7, 3, False, torch.int32),
]


def _case_id(case):
    B, Hm, N, D, T, kw, erase_one, index_dtype = case
    heads = f"Hm{Hm}" if Hm else "3d"
    return f"B{B}{heads}N{N}D{D}T{T}kw{kw}{'e1' if erase_one else ''}{str(index_dtype)[6:]}"


def _indices(lead, N, T, kw, index_dtype):
    """Random slots in [-1, N) with forced repeats: within a step, across steps, and skips."""
    indices = torch.randint(-1, N, (*lead, T, kw))
    if T >= 2 and kw >= 2:
        indices[..., 0, 1] = indices[..., 0, 0]  # the same slot twice in one step
    if T >= 3 and kw >= 1:
        indices[..., 2, 0] = indices[..., 0, 0]  # and again in a later step
        indices[..., 1, -1] = -1
    return indices.to(index_dtype)


def _inputs(case, dtype, device, requires_grad=True):
    B, Hm, N, D, T, kw, erase_one, index_dtype = case
    lead = (B,) if Hm is None else (B, Hm)
    memory = rand(*lead, N, D, dtype=dtype, device=device)
    indices = _indices(lead, N, T, kw, index_dtype).to(device)
    weights = torch.rand(*lead, T, kw, device=device).to(dtype)
    add = rand(*lead, T, D, dtype=dtype, device=device)
    erase = torch.rand(*lead, T, 1 if erase_one else D, device=device).to(dtype)
    tensors = [memory, weights, add, erase]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    memory, weights, add, erase = tensors
    return memory, indices, weights, add, erase


def _reference64(memory, indices, weights, add, erase, dnew):
    """The reference's output and gradients in float64, on the same input values."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (memory, weights, add, erase)]
    m, w, a, e = leaves
    out = gated_memory_write_ref(m, indices.cpu(), w, a, e)
    grads = torch.autograd.grad(out, leaves, dnew.double().cpu())
    return out, grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_matches_reference(backend, device, case, dtype):
    skip_unless_served(backend, dtype)
    memory, indices, weights, add, erase = _inputs(case, dtype, device)
    out = l2m.gated_memory_write(memory, indices, weights, add, erase, backend=backend)
    assert out.dtype == dtype and out.shape == memory.shape and out.data_ptr() != memory.data_ptr()
    dnew = rand(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, (memory, weights, add, erase), dnew)
    ref_out, ref_grads = _reference64(memory, indices, weights, add, erase, dnew)
    assert_close("out", out, ref_out, dtype)
    for name, grad, ref_grad in zip(("dmemory", "dweights", "dadd", "derase"), grads, ref_grads):
        assert grad.dtype == dtype and grad.shape == ref_grad.shape, name
        assert_close(name, grad, ref_grad, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES[:3], ids=_case_id)
def test_inplace_matches_and_touches_only_written_slots(backend, device, case):
    memory, indices, weights, add, erase = _inputs(case, torch.float32, device, requires_grad=False)
    original = memory.clone()
    expected = l2m.gated_memory_write(memory, indices, weights, add, erase, backend=backend)
    result = l2m.gated_memory_write(memory, indices, weights, add, erase, inplace=True,
                                    backend=backend)
    assert result is memory
    assert torch.equal(memory, expected)  # the same kernel arithmetic, bit for bit
    assert_close("inplace", memory, gated_memory_write_ref_(original.clone(), indices, weights, add,
                                                            erase))
    # Slots no index names keep their bits.
    lead = memory.shape[:-2]
    flat_idx = indices.reshape(-1, indices.shape[-2] * indices.shape[-1]).long()
    written = torch.zeros(flat_idx.shape[0], memory.shape[-2] + 1, dtype=torch.bool, device=memory.device)
    written.scatter_(1, flat_idx + 1, True)  # column 0 collects the skips
    untouched = ~written[:, 1:].reshape(*lead, memory.shape[-2])
    assert untouched.any()
    assert torch.equal(memory[untouched].view(torch.int32), original[untouched].view(torch.int32))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inplace_strided_memory(backend, device):
    case = CASES[0]
    memory, indices, weights, add, erase = _inputs(case, torch.float32, device, requires_grad=False)
    strided = memory.transpose(0, 1).contiguous().transpose(0, 1)  # (B, Hm, N, D), not contiguous
    assert not strided.is_contiguous()
    expected = l2m.gated_memory_write(memory, indices, weights, add, erase, backend=backend)
    result = l2m.gated_memory_write(strided, indices, weights, add, erase, inplace=True,
                                    backend=backend)
    assert result is strided and torch.equal(strided, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad_slot", [-2, 7])
def test_refused_inplace_write_leaves_memory_unchanged(backend, device, bad_slot):
    memory, indices, weights, add, erase = _inputs(CASES[0], torch.float32, device, requires_grad=False)
    original = memory.clone()
    indices[1, 2, 4, 1] = bad_slot  # N = 7
    with pytest.raises(IndexError):
        l2m.gated_memory_write(memory, indices, weights, add, erase, inplace=True, backend=backend)
    assert torch.equal(memory, original)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inplace_refused_when_grad_required(backend, device):
    memory, indices, weights, add, erase = _inputs(CASES[0], torch.float32, device)
    with pytest.raises(RuntimeError, match="inplace"):
        l2m.gated_memory_write(memory, indices, weights, add, erase, inplace=True, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("empty_dim", ["T", "B", "kw"])
def test_empty_writes(backend, device, empty_dim):
    B, T, kw = (0 if empty_dim == "B" else 2), (0 if empty_dim == "T" else 3), (0 if empty_dim == "kw" else 2)
    case = (B, 2, 7, 5, T, kw, False, torch.int64)
    memory, indices, weights, add, erase = _inputs(case, torch.float32, device)
    out = l2m.gated_memory_write(memory, indices, weights, add, erase, backend=backend)
    assert out.data_ptr() != memory.data_ptr() or memory.numel() == 0
    assert torch.equal(out, memory.detach())
    dnew = rand(*out.shape, device=device)
    grads = torch.autograd.grad(out, (memory, weights, add, erase), dnew)
    assert torch.equal(grads[0], dnew)
    for grad, leaf in zip(grads[1:], (weights, add, erase)):
        assert grad.shape == leaf.shape and torch.equal(grad, torch.zeros_like(leaf))
    with torch.no_grad():
        target = memory.detach().clone()
        assert l2m.gated_memory_write(target, indices, weights, add, erase, inplace=True,
                                      backend=backend) is target
        assert torch.equal(target, memory.detach())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_skipped_entries_have_no_effect(backend, device):
    """A NaN weight on a -1 entry changes neither the memory nor any gradient."""
    memory, indices, weights, add, erase = _inputs(CASES[0], torch.float32, device, requires_grad=False)
    weights = torch.where(indices < 0, torch.full_like(weights, float("nan")), weights)
    leaves = [t.clone().requires_grad_() for t in (memory, weights, add, erase)]
    out = l2m.gated_memory_write(leaves[0], indices, *leaves[1:], backend=backend)
    dnew = rand(*out.shape, device=device)
    grads = torch.autograd.grad(out, leaves, dnew)
    # The reference itself lets NaN reach dmemory through its where(); compare with finite
    # weights on the skipped entries, which must give the same result.
    clean = [leaves[0], torch.where(indices < 0, 0.0, leaves[1]), leaves[2], leaves[3]]
    ref_out, ref_grads = _reference64(clean[0], indices, *clean[1:], dnew)
    assert torch.isfinite(out).all()
    assert_close("out", out, ref_out)
    for name, grad, ref_grad in zip(("dmemory", "dweights", "dadd", "derase"), grads, ref_grads):
        assert torch.isfinite(grad).all(), name
        assert_close(name, grad, ref_grad)
    assert (grads[1][indices < 0] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_across_runs_and_threads(backend, device):
    """Heavy slot collisions (N = 3): repeated runs and 1 vs all threads agree bit for bit."""
    case = (2, 2, 3, 33, 64, 4, False, torch.int64)
    memory, indices, weights, add, erase = _inputs(case, torch.float32, device)
    dnew = rand(*memory.shape, device=device)

    def run():
        out = l2m.gated_memory_write(memory, indices, weights, add, erase, backend=backend)
        return (out,) + torch.autograd.grad(out, (memory, weights, add, erase), dnew)

    first, second = run(), run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)
