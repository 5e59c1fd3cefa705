"""memory_attention: every fused backend against the reference, outputs and every gradient.

The memory selection is checked robustly (the fused indices must be a valid top-k of the float64
scores; exactly the reference's for float64 input); out, lse_local, lse_mem and the gradients of q,
k, v, mem_keys, mem_values and gate (through all three outputs) are compared by relative RMS error
with the float64 reference evaluated at the fused selection (``memory_attention_gather``). Fused
outputs are NaN-poisoned (conftest), so an element a kernel forgets to write fails the comparison.
"""
import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.memory_attention.reference import memory_attention_gather, memory_attention_ref
from l2m_kernels.ops.topk_read.reference import topk_read_select
from l2m_kernels.testing import (assert_close, assert_valid_topk, fused_backend_params, lse_dtype, rand,
                                 read_scores, skip_unless_served)

BACKENDS = fused_backend_params("memory_attention")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, shared, valid_len, merge, gate shape)
CASES = [
    (2, 4, 2, 2, 7, 7, 7, 5, 33, 4, None, False, None, "joint", None),        # S = T, odd sizes, Dv != D
    (1, 4, 1, 1, 63, 100, 64, 64, 70, 8, 5, True, None, "gate", "H11"),       # S > T, shared, Hm < H
    (2, 4, 4, 2, 7, 20, 16, 8, 24, 24, 1, False, [24, 3], "joint", None),     # window 1, topk = N > valid_len
    (2, 4, 2, 4, 9, 9, 8, 7, 16, 1, 1000, True, [16, 0], "gate", "BHT1"),     # huge window, topk 1, empty memory
    (1, 4, 4, 1, 63, 63, 64, 32, 40, 16, 5, False, None, "joint", None),      # T = 63 x D = 64, Hkv = H
]


def _case_id(case):
    B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, shared, valid, merge, gate = case
    return (f"B{B}H{H}Hkv{Hkv}Hm{Hm}T{T}S{S}D{D}Dv{Dv}N{N}k{topk}w{window}"
            f"{'shared' if shared else ''}{'vl' if valid else ''}-{merge}{gate or ''}")


def _inputs(case, dtype, device, requires_grad=True):
    B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, shared, valid, merge, gate_shape = case
    mem_lead = (Hm, N) if shared else (B, Hm, N)
    tensors = dict(q=rand(B, H, T, D, dtype=dtype, device=device),
                   k=rand(B, Hkv, S, D, dtype=dtype, device=device),
                   v=rand(B, Hkv, S, Dv, dtype=dtype, device=device),
                   mem_keys=rand(*mem_lead, D, dtype=dtype, device=device),
                   mem_values=rand(*mem_lead, Dv, dtype=dtype, device=device))
    if merge == "gate":
        shape = (H, 1, 1) if gate_shape == "H11" else (B, H, T, 1)
        tensors["gate"] = rand(*shape, dtype=dtype, device=device)
    for t in tensors.values():
        t.requires_grad_(requires_grad)
    valid_len = None if valid is None else torch.tensor(valid, device=device)
    return tensors, dict(topk=topk, window=window, merge=merge, valid_len=valid_len)


def _call(tensors, options, backend, **extra):
    t = tensors
    return l2m.memory_attention(t["q"], t["k"], t["v"], t["mem_keys"], t["mem_values"], options["topk"],
                                window=options["window"], merge=options["merge"], gate=t.get("gate"),
                                valid_len=options["valid_len"], backend=backend, **extra)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_memory_attention_matches_reference(backend, device, case, dtype):
    skip_unless_served(backend, dtype)
    tensors, options = _inputs(case, dtype, device)
    scale = tensors["q"].shape[-1] ** -0.5
    res = _call(tensors, options, backend)
    B, H, T = tensors["q"].shape[:3]
    Dv, topk = tensors["v"].shape[-1], options["topk"]
    assert res.out.shape == (B, H, T, Dv) and res.out.dtype == dtype
    assert res.lse_local.shape == res.lse_mem.shape == (B, H, T)
    assert res.lse_local.dtype == res.lse_mem.dtype == lse_dtype(dtype)
    assert res.indices.shape == (B, H, T, topk) and res.indices.dtype == torch.int64
    assert_valid_topk(res.indices, read_scores(tensors["q"], tensors["mem_keys"], scale),
                      valid_len=options["valid_len"], score_dtype=dtype)
    if dtype == torch.float64:
        expected = topk_read_select(tensors["q"].detach(), tensors["mem_keys"].detach(), topk, scale,
                                    options["valid_len"])
        assert torch.equal(res.indices.cpu(), expected.cpu())

    # The reference at the fused selection, in float64 on the same (rounded) input values.
    names = list(tensors)
    leaves64 = {n: t.detach().double().cpu().requires_grad_() for n, t in tensors.items()}
    ref = memory_attention_gather(leaves64["q"], leaves64["k"], leaves64["v"], leaves64["mem_keys"],
                                  leaves64["mem_values"], res.indices.cpu(), options["window"], options["merge"],
                                  leaves64.get("gate"), scale)
    for name, got, want in zip(("out", "lse_local", "lse_mem"), res[:3], ref):
        assert_close(name, got, want, dtype)
    if options["valid_len"] is not None:
        empty_rows = (options["valid_len"].cpu() == 0)[:, None, None].expand(B, H, T)
        assert torch.isneginf(res.lse_mem.cpu()[empty_rows]).all()

    cots = [rand(*t.shape, dtype=t.dtype, device=device) for t in res[:3]]
    grads = torch.autograd.grad(res[:3], [tensors[n] for n in names], cots)
    ref_grads = torch.autograd.grad(ref, [leaves64[n] for n in names], [c.double().cpu() for c in cots])
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad.shape == tensors[name].shape and grad.dtype == dtype, name
        assert_close("d" + name, grad, ref_grad, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_memory_attention_deterministic_gradients(backend, device, merge):
    # Many queries read the same few slots of a shared memory, and every key is seen by many queries.
    case = (2, 4, 1, 2, 40, 48, 16, 8, 12, 6, 20, True, None, merge, "H11")
    tensors, options = _inputs(case, torch.float32, device)
    runs = []
    for _ in range(2):
        res = _call(tensors, options, backend, deterministic=True)
        loss = res.out.sum() + res.lse_local.sum() + (res.lse_mem * 0.5).sum()
        runs.append((res.out.detach(), res.lse_local.detach(), res.lse_mem.detach())
                    + torch.autograd.grad(loss, list(tensors.values())))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_memory_attention_nan_query_row_is_isolated(backend, device):
    case = (1, 4, 2, 2, 12, 16, 8, 8, 20, 4, 3, False, None, "joint", None)
    tensors, options = _inputs(case, torch.float32, device, requires_grad=False)
    clean = _call(tensors, options, backend)
    tensors["q"][0, 1, 5, 3] = float("nan")
    res = _call(tensors, options, backend)
    assert torch.isnan(res.out[0, 1, 5]).all()
    assert torch.isnan(res.lse_local[0, 1, 5]) and torch.isnan(res.lse_mem[0, 1, 5])
    others = torch.ones(res.lse_local.shape, dtype=torch.bool, device=device)
    others[0, 1, 5] = False
    for got, want in zip(res, clean):
        assert torch.equal(got[others], want[others])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("window", [3, None])
def test_memory_attention_nonfinite_context_reaches_only_queries_that_see_it(backend, device, window):
    # S = T + 4 = 16: query t sits at position t + 4. Non-finite k / v at positions 9 and 10 (in the
    # future of some queries of the same tiles, and, with the window, behind others) and, with the
    # window, at 0 and 1 (seen by no query).
    case = (1, 4, 2, 2, 12, 16, 8, 8, 20, 4, window, False, None, "joint", None)
    tensors, options = _inputs(case, torch.float32, device, requires_grad=False)
    clean = _call(tensors, options, backend)
    bad = {(9, 0): "v", (10, 1): "k"}  # (position, kv head) -> tensor
    if window is not None:
        bad.update({(0, 0): "k", (1, 1): "v"})
    for (position, kv_head), name in bad.items():
        tensors[name][0, kv_head, position, 1] = float("nan") if name == "k" else float("inf")
    res = _call(tensors, options, backend)
    t = tensors
    ref = memory_attention_ref(t["q"].cpu(), t["k"].cpu(), t["v"].cpu(), t["mem_keys"].cpu(),
                               t["mem_values"].cpu(), options["topk"], window=window)
    T, S = 12, 16
    sees = torch.zeros(1, 4, T, dtype=torch.bool)
    for (position, kv_head), _ in bad.items():
        for t_ in range(T):
            p = S - T + t_
            if position <= p and (window is None or position > p - window):
                sees[0, 2 * kv_head:2 * kv_head + 2, t_] = True
    assert sees.any() and (~sees).any()
    others = ~sees.to(device)
    for got, want in zip(res, clean):
        assert torch.equal(got[others], want[others])
    # Where a query does see one, its result is non-finite exactly where the reference's is.
    for got, want in zip(res[:3], ref[:3]):
        assert torch.equal(torch.isfinite(got.cpu()), torch.isfinite(want))
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_memory_attention_noncontiguous_inputs(backend, device):
    case = CASES[0]
    tensors, options = _inputs(case, torch.float32, device, requires_grad=False)
    expected = _call(tensors, options, backend)
    strided = {n: t.transpose(-1, -2).contiguous().transpose(-1, -2) for n, t in tensors.items()}
    assert not strided["q"].is_contiguous()
    got = _call(strided, options, backend)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B0", "T0"])
@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_memory_attention_empty_batch(backend, device, shape, merge):
    B, T = shape
    H, Hkv, S, D, Dv, N, topk = 2, 1, 6, 4, 3, 8, 2
    q = rand(B, H, T, D, device=device, requires_grad=True)
    k = rand(B, Hkv, S, D, device=device, requires_grad=True)
    v = rand(B, Hkv, S, Dv, device=device, requires_grad=True)
    mem_keys = rand(H, N, D, device=device, requires_grad=True)
    mem_values = rand(H, N, Dv, device=device, requires_grad=True)
    gate = rand(H, 1, 1, device=device, requires_grad=True) if merge == "gate" else None
    res = l2m.memory_attention(q, k, v, mem_keys, mem_values, topk, window=2, merge=merge, gate=gate,
                               backend=backend)
    assert res.out.shape == (B, H, T, Dv) and res.indices.shape == (B, H, T, topk)
    assert res.lse_local.shape == res.lse_mem.shape == (B, H, T)
    leaves = [q, k, v, mem_keys, mem_values] + ([gate] if gate is not None else [])
    grads = torch.autograd.grad(res.out.sum() + res.lse_local.sum() + res.lse_mem.sum(), leaves,
                                allow_unused=True)
    for grad, leaf in zip(grads, leaves):
        assert grad is None or (grad.shape == leaf.shape and (grad == 0).all())


def test_memory_attention_cpu_matches_reference_api():
    """The public reference path and the cpu backend agree on a float64 call end to end."""
    if l2m.backends.BACKENDS["cpu"].not_supported_reasons("memory_attention", torch.device("cpu"), torch.float64):
        pytest.skip("cpu backend unavailable")
    tensors, options = _inputs(CASES[1], torch.float64, "cpu", requires_grad=False)
    t = tensors
    want = memory_attention_ref(t["q"], t["k"], t["v"], t["mem_keys"], t["mem_values"], options["topk"],
                                window=options["window"], merge=options["merge"], gate=t["gate"],
                                valid_len=options["valid_len"])
    got = _call(tensors, options, "cpu")
    assert torch.equal(got.indices, want[3])
    for name, a, b in zip(("out", "lse_local", "lse_mem"), got[:3], want[:3]):
        assert_close(name, a, b, torch.float64)


@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_memory_attention_cpu_independent_of_thread_count(merge):
    """The cpu kernels own every output row in one work unit and reduce it in a fixed order (no
    atomics, no per-thread partial sums): results and gradients are bitwise the same for any
    number of threads."""
    if l2m.backends.BACKENDS["cpu"].not_supported_reasons("memory_attention", torch.device("cpu"), torch.float32):
        pytest.skip("cpu backend unavailable")
    case = (2, 4, 2, 2, 70, 90, 16, 8, 40, 6, 33, True, None, merge, "H11")
    tensors, options = _inputs(case, torch.float32, "cpu", requires_grad=False)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            leaves = {n: t.clone().requires_grad_() for n, t in tensors.items()}
            res = _call(leaves, options, "cpu")
            loss = res.out.square().sum() + res.lse_local.sum() + res.lse_mem.sum()
            runs.append(tuple(res[:3]) + torch.autograd.grad(loss, list(leaves.values())))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memory_attention_saturated_gate_gradients(backend, device, dtype):
    # sigmoid(gate) near 1: the local part's share (1 - g) is small. The triton backward took
    # (1 - g) <dout, out_local> as Delta - g <dout, out_mem> with Delta from the rounded out (found by
    # the fuzzer: dgate and dk lost every digit in bfloat16), and the cpu merge took 1 - g as
    # 1 - sigmoid(gate) (1e-4 off in float32 at gate 8).
    B, H, Hkv, T, S, D, N, topk = 2, 4, 2, 16, 24, 16, 32, 4
    g = torch.Generator().manual_seed(7)
    draw = lambda *shape: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
    inputs = dict(q=draw(B, H, T, D), k=draw(B, Hkv, S, D), v=draw(B, Hkv, S, D), mem_keys=draw(B, Hkv, N, D),
                  mem_values=draw(B, Hkv, N, D), gate=(8.0 + 0.1 * torch.randn(H, 1, 1, generator=g)).to(dtype))
    dout = draw(B, H, T, D)

    def grads(tensors, name):
        t = {n: x.to(device).requires_grad_() for n, x in tensors.items()}
        out = l2m.memory_attention(t["q"], t["k"], t["v"], t["mem_keys"], t["mem_values"], topk, merge="gate",
                                   gate=t["gate"], backend=name).out
        return torch.autograd.grad(out, list(t.values()), dout.to(out.dtype).to(device))

    fused = grads(inputs, backend)
    ref = grads({n: x.double() for n, x in inputs.items()}, "reference")
    for name, a, e in zip(inputs, fused, ref):
        assert_close("d" + name, a, e, dtype)
