"""topk_memory_read: every fused backend against the reference, outputs and every gradient.

Selection is compared robustly: the fused indices must form a valid top-k of the float64 scores
(every selected score >= every unselected one, up to rounding) and agree exactly with the reference
on exactly representable (integer-valued, tied) data; values, weights, lse and the gradients are
compared with the reference evaluated at the fused selection, by relative RMS error.
"""
import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref, topk_read_gather
from l2m_kernels.testing import (assert_close, assert_outputs_and_grads_close, assert_valid_topk,
                                 fused_backend_params, lse_dtype, rand, read_scores, skip_unless_served)
from .._triton import skip_heavy_case_under_interpreter

BACKENDS = fused_backend_params("topk_memory_read")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (B, H, Hm, T, N, Dk, Dv, k, shared, valid_len)
CASES = [
    (1, 1, 1, 7, 63, 7, 5, 3, False, None),
    (2, 4, 2, 9, 129, 16, 8, 8, False, [129, 40]),
    (2, 4, 1, 5, 64, 8, 63, 64, False, [64, 10]),       # k = N, valid_len < k
    (3, 2, 2, 6, 300, 32, 16, 256, True, [300, 0, 7]),  # k = 256, shared memory, empty batch element
    (1, 2, 2, 33, 1000, 64, 64, 32, False, None),
]

# The largest cases: several seconds each under the Triton interpreter.
INTERPRETER_HEAVY = CASES[3:]


def _inputs(case, dtype, device, requires_grad=True):
    B, H, Hm, T, N, Dk, Dv, k, shared, valid = case
    lead = (Hm, N) if shared else (B, Hm, N)
    q = rand(B, H, T, Dk, dtype=dtype, device=device, requires_grad=requires_grad)
    keys = rand(*lead, Dk, dtype=dtype, device=device, requires_grad=requires_grad)
    values = rand(*lead, Dv, dtype=dtype, device=device, requires_grad=requires_grad)
    valid_len = None if valid is None else torch.tensor(valid, device=device)
    return q, keys, values, k, valid_len


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hm{}T{}N{}D{}k{}".format(*c[:5], c[6], c[7]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_read_matches_reference(backend, device, case, dtype):
    skip_unless_served(backend, dtype)
    skip_heavy_case_under_interpreter(backend, device, dtype, case in INTERPRETER_HEAVY)
    q, keys, values, k, valid_len = _inputs(case, dtype, device)
    scale = q.shape[-1] ** -0.5
    read = l2m.topk_memory_read(q, keys, values, k, valid_len=valid_len, backend=backend)
    assert read.out.dtype == dtype and read.indices.dtype == torch.int64
    assert read.weights.dtype == lse_dtype(dtype) and read.lse.dtype == lse_dtype(dtype)
    assert_valid_topk(read.indices, read_scores(q, keys, scale), valid_len=valid_len, score_dtype=dtype)
    # The reference evaluated at the fused selection, in float64.
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (q, keys, values)]
    ref_out, ref_w, ref_lse = topk_read_gather(*leaves64, read.indices.cpu(), scale)
    assert_outputs_and_grads_close((read.out, read.weights, read.lse), (q, keys, values),
                                   (ref_out, ref_w, ref_lse), leaves64, dtype,
                                   output_names=("out", "weights", "lse"),
                                   input_names=("dq", "dkeys", "dvalues"))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_topk_read_exact_ties_match_reference(backend, device):
    # Integer-valued data: every score is exact, duplicated key rows tie across the k-th position.
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-2, 3, (2, 2, 6, 8), generator=g).float()
    base = torch.randint(-2, 3, (2, 2, 5, 8), generator=g).float()
    keys = base[:, :, torch.randint(0, 5, (40,), generator=g)]
    values = torch.randn(2, 2, 40, 4, generator=g)
    for k in (1, 3, 7, 40):
        read = l2m.topk_memory_read(q.to(device), keys.to(device), values.to(device), k, scale=1.0, backend=backend)
        want = topk_memory_read_ref(q, keys, values, k, scale=1.0)
        assert torch.equal(read.indices.cpu(), want[1]), f"k={k}"
        assert_close("out", read.out, want[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_topk_read_nan_row_empty_and_noncontiguous(backend, device):
    q, keys, values, k, _ = _inputs((1, 2, 2, 6, 50, 8, 8, 4, False, None), torch.float32, device, False)
    q[0, 1, 3, 2] = float("nan")
    read = l2m.topk_memory_read(q, keys, values, k, backend=backend)
    assert torch.isnan(read.out[0, 1, 3]).all() and torch.isnan(read.lse[0, 1, 3])
    mask = torch.ones(1, 2, 6, dtype=torch.bool, device=device)
    mask[0, 1, 3] = False
    assert torch.isfinite(read.out[mask]).all() and torch.isfinite(read.lse[mask]).all()
    for shape in [(0, 2, 6, 8), (1, 2, 0, 8)]:
        empty = l2m.topk_memory_read(torch.randn(shape, device=device),
                                     keys[:shape[0]] if shape[0] == 0 else keys, values[:shape[0]] if shape[0] == 0
                                     else values, k, backend=backend)
        assert empty.out.shape == shape[:3] + (8,) and empty.indices.shape == shape[:3] + (k,)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    kt = keys.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    nc = l2m.topk_memory_read(qt, kt, values, k, backend=backend)
    assert torch.equal(nc.indices, read.indices) and torch.equal(nc.out[mask], read.out[mask])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_topk_read_deterministic_gradients(backend, device):
    case = (2, 4, 2, 16, 60, 8, 8, 16, True, None)  # many queries hit the same slots
    q, keys, values, k, _ = _inputs(case, torch.float32, device)
    runs = []
    for _ in range(2):
        read = l2m.topk_memory_read(q, keys, values, k, deterministic=True, backend=backend)
        runs.append(torch.autograd.grad(read.out.sum() + read.lse.sum(), (q, keys, values)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the GPU backends' plans (topk_read/plan.py), on the CPU against brute-force Python ----

@pytest.mark.parametrize("shared", [False, True], ids=["per-batch", "shared"])
@pytest.mark.parametrize("B,H,Hm,T,N,k", [(1, 1, 1, 5, 1, 1), (2, 4, 2, 3, 6, 4), (3, 2, 1, 4, 17, 9)])
def test_slot_runs_matches_brute_force(B, H, Hm, T, N, k, shared):
    """Entries grouped by (memory, slot), stably, entries outside [0, N) left out of every run."""
    from l2m_kernels.ops.topk_read.plan import slot_runs
    g = torch.Generator().manual_seed(B * 1000 + N * 10 + k + shared)
    indices = torch.randint(-2, N + 2, (B, H, T, k), generator=g)  # -2, -1, N, N + 1 contribute nothing
    runs = slot_runs(indices, Hm, N, shared)
    memories = Hm if shared else B * Hm
    entries = {}  # (memory, slot) -> flat entry ids, in entry order
    for b in range(B):
        for h in range(H):
            memory = (0 if shared else b * Hm) + h // (H // Hm)
            for t in range(T):
                for j in range(k):
                    slot = int(indices[b, h, t, j])
                    if 0 <= slot < N:
                        entries.setdefault(memory * N + slot, []).append(((b * H + h) * T + t) * k + j)
    order, starts = [], []
    for key in range(memories * N):
        starts.append(len(order))
        order += entries.get(key, [])
    starts.append(len(order))
    assert runs.run_starts.tolist() == starts
    assert runs.entry_order[:len(order)].tolist() == order
    assert sorted(runs.entry_order[len(order):].tolist()) == runs.entry_order[len(order):].tolist()
    assert torch.equal(runs.entry_rows, runs.entry_order // k)
    assert sorted(runs.entry_order.tolist()) == list(range(indices.numel()))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_threshold_tau_is_kth_largest(k):
    from l2m_kernels.ops.topk_read.plan import threshold_tau
    g = torch.Generator().manual_seed(k)
    chunk_max = torch.randint(-2**62, 2**62, (2, 3, 4, 8), generator=g)
    chunk_max[0, 0, 0, 2:] = torch.iinfo(torch.int64).min  # two chunks with a slot: no bound for k > 2
    tau = threshold_tau(chunk_max, k)
    assert tau.shape == (2, 3, 4) and tau.is_contiguous()
    for index in torch.cartesian_prod(*(torch.arange(n) for n in (2, 3, 4))).tolist():
        assert int(tau[tuple(index)]) == sorted(chunk_max[tuple(index)].tolist(), reverse=True)[k - 1]
