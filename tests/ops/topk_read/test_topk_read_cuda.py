"""The CUDA top-k read kernels of ``l2m_kernels._C_cuda`` (topk_read_fwd / topk_read_bwd, with the
threshold pre-pass and the plans the cuda launchers make: ``cuda_topk_read_fwd`` /
``cuda_topk_read_bwd``), called directly, against the float64 reference
(``l2m_kernels/ops/topk_read/reference.py``).

float32, float16 and bfloat16 with outputs pre-filled with NaN (indices with a sentinel): the
selection must be a valid top-k of the float64 scores (``assert_valid_topk``: descending order,
exact ties and NaN rows to the smaller slot, hence exactly the reference's there); out / weights /
lse and dq / dkeys / dvalues by relative RMS error against the float64 reference evaluated at the
kernel's selection, over odd sizes, k in {1 .. 256, N}, valid_len < k and 0, grouped heads, shared
memories, ties, NaN query rows, -inf scores, empty batches, both backward modes (deterministic:
bitwise repeatable), and bad calls. Every case runs the forward with and without the threshold
pre-pass (the two must agree bitwise), plus cases where the threshold matters: N >= 128 * k,
valid_len < k and 0, N < 128, fewer chunks than k, k = N = 1, exact ties across chunks, sorted
score ramps.

Shared set-up, and the CPU kernels standing in without a CUDA device: ``tests/ops/_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch

from l2m_kernels.ops.topk_read.function import cuda_topk_read_bwd, cuda_topk_read_fwd
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref, topk_read_gather
from l2m_kernels.testing import assert_close, assert_valid_topk, bits_equal, nan_filled, read_scores
from .._cuda import DTYPES, INDEX_SENTINEL, NAN, NEG_INF, cpu_kernels_test

# (B, H, Hm, T, N, Dk, Dv, k, shared, valid_len, special)
CASES = [
    (1, 1, 1, 7, 63, 7, 7, 5, False, None, None),
    (1, 1, 1, 7, 63, 1, 1, 1, False, None, None),
    (2, 3, 1, 7, 63, 7, 5, 3, False, None, None),
    (2, 4, 2, 7, 129, 64, 64, 32, False, [129, 40], None),
    (2, 4, 2, 7, 129, 64, 64, 1, False, [129, 40], None),
    (2, 2, 1, 7, 63, 64, 64, 63, False, [63, 5], None),           # k = N, valid_len < k
    (2, 4, 2, 7, 129, 129, 129, 129, False, None, None),          # k = N (K_PAD 256), D = 129
    (3, 2, 2, 6, 300, 32, 16, 256, True, [300, 0, 7], None),      # k = 256, shared, valid_len 0
    (1, 2, 2, 33, 1000, 64, 64, 32, False, None, None),
    (2, 4, 2, 9, 2100, 16, 24, 100, False, [2100, 1500], None),   # many tiles, K_PAD 128
    (2, 4, 2, 7, 129, 256, 256, 64, True, None, None),            # the largest Dk, Dv
    (2, 4, 2, 16, 60, 8, 8, 16, True, None, None),                # many queries per slot
    (2, 2, 2, 6, 40, 8, 4, 7, False, None, "ties"),
    (2, 2, 2, 6, 40, 8, 4, 40, False, [40, 13], "ties"),
    (1, 2, 2, 6, 50, 8, 8, 4, False, None, "nan"),
    (1, 1, 1, 5, 20, 8, 8, 20, False, None, "neginf"),
    (0, 2, 2, 5, 20, 8, 8, 4, False, None, None),                 # empty batch
    (0, 2, 2, 5, 20, 8, 8, 4, True, None, None),                  # empty batch, shared memory
    (2, 2, 2, 0, 20, 8, 8, 4, True, None, None),                  # T = 0
    # Threshold pre-pass (chunks of 128 slots; tau applies when N >= 128 * k, i.e. n_chunks >= k).
    (2, 2, 1, 9, 1000, 64, 32, 4, False, None, None),             # 8 chunks >= k
    (2, 2, 2, 7, 1000, 16, 16, 8, False, [1000, 5], None),        # valid_len < k (tau INT64_MIN)
    (2, 2, 2, 5, 1000, 16, 16, 8, True, [0, 1000], None),         # valid_len 0, shared
    (2, 2, 2, 6, 1000, 16, 16, 4, False, [385, 1000], None),      # exactly k chunks exist
    (1, 2, 1, 7, 100, 16, 16, 1, False, None, None),              # N < C, k = 1: tau = row max
    (1, 2, 1, 7, 100, 16, 16, 4, False, None, None),              # N < C, n_chunks < k
    (1, 1, 1, 5, 600, 16, 16, 8, False, None, None),              # n_chunks (5) < k
    (1, 2, 2, 5, 1, 8, 8, 1, False, None, None),                  # k = N = 1 (1 chunk)
    (2, 2, 2, 6, 1200, 8, 4, 7, False, None, "ties"),             # exact ties across chunks
    (2, 2, 2, 6, 1200, 8, 4, 1, False, [1200, 700], "ties"),
    (2, 2, 2, 5, 3000, 8, 8, 20, False, [3000, 2900], "ramp_up"),  # sorted ramps
    (2, 2, 2, 5, 3000, 8, 8, 20, False, None, "ramp_down"),
    (1, 2, 2, 5, 6000, 8, 8, 40, True, None, "ramp_up"),          # K_PAD 64
    (1, 2, 1, 4, 13000, 16, 8, 100, False, None, None),           # K_PAD 128, 102 chunks
    (1, 1, 1, 3, 33000, 8, 8, 256, True, None, "ramp_up"),        # K_PAD 256, 258 chunks
    (1, 2, 2, 6, 1000, 8, 8, 4, False, None, "nan"),
    (1, 2, 2, 7, 1100, 256, 256, 8, True, None, None),            # the largest Dk with tau
    (1, 2, 1, 7, 1000, 7, 5, 3, False, None, None),               # Dk % 8 != 0 (scalar loads)
    (1, 1, 1, 40, 4100, 64, 64, 32, False, None, None),           # 33 chunks, partial last
]


def _case_id(case):
    B, H, Hm, T, N, Dk, Dv, k, shared, valid, special = case
    return (f"B{B}H{H}Hm{Hm}T{T}N{N}Dk{Dk}Dv{Dv}k{k}{'-shared' if shared else ''}"
            f"{'-vl' + '_'.join(map(str, valid)) if valid else ''}{'-' + special if special else ''}")


def topk_inputs(case, dtype, device):
    """q (B, H, T, Dk), keys / values ((B,) Hm, N, Dk / Dv) in dtype, k, scale, valid_len (B,)."""
    B, H, Hm, T, N, Dk, Dv, k, shared, valid, special = case
    lead = (Hm, N) if shared else (B, Hm, N)
    scale = Dk ** -0.5
    if special == "ties":
        # Integer-valued data: every score is exact (also in 16 bits, scale 1), and duplicated key
        # rows tie across the k-th position.
        q = torch.randint(-2, 3, (B, H, T, Dk), device=device).to(dtype)
        base = torch.randint(-2, 3, (*lead[:-1], 5, Dk), device=device)
        keys = base[..., torch.randint(0, 5, (N,), device=device), :].to(dtype).contiguous()
        scale = 1.0
    else:
        q = torch.randn(B, H, T, Dk, device=device).to(dtype)
        keys = torch.randn(*lead, Dk, device=device).to(dtype)
    if special in ("ramp_up", "ramp_down"):
        # Scores monotone in the slot (an online top-k sees a new best at every slot for
        # ramp_up): q[..., 0] > 0 against keys[..., n, 0] = +-n / N, other features 0.
        q = torch.zeros(B, H, T, Dk, device=device)
        q[..., 0] = torch.rand(B, H, T, device=device) + 0.5
        q = q.to(dtype)
        ramp = torch.arange(N, device=device, dtype=torch.float32) / N
        keys = torch.zeros(*lead, Dk, device=device)
        keys[..., 0] = ramp if special == "ramp_up" else -ramp
        keys = keys.to(dtype)
    values = torch.randn(*lead, Dv, device=device).to(dtype)
    if special == "nan" and B * T:
        q[0, H - 1, T // 2, 0] = NAN
    if special == "neginf":
        # Slot 3 scores exactly -inf for every query: q[..., 0] > 0 against [-inf, 0, ...].
        q[..., 0] = q[..., 0].abs() + 0.5
        keys[..., 3, :] = 0.0
        keys[..., 3, 0] = NEG_INF
    valid_len = None if valid is None else torch.tensor(valid, dtype=torch.int64, device=device)
    return q, keys, values, k, scale, valid_len


def nan_row_slot_mask(keys, indices, nan_rows, group):
    """keys.shape[:-1] bool: False at the memory rows a NaN query row selected (their gradients are
    NaN in every backend)."""
    mask = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
    for b, h, t in nan_rows.nonzero().tolist():
        selected = indices[b, h, t]
        selected = selected[selected >= 0]
        if keys.dim() == 3:
            mask[h // group, selected] = False
        else:
            mask[b, h // group, selected] = False
    return mask


@pytest.mark.gpu
@pytest.mark.parametrize("use_threshold", [True, False], ids=["tau", "no-tau"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_read_cuda(cuda_ext, case, dtype, use_threshold):
    check_topk_read(cuda_ext, "cuda", case, dtype, use_threshold)


def check_topk_read(ext, device, case, dtype, use_threshold):
    B, H, Hm, T, N, Dk, Dv, k, shared, valid, special = case
    q, keys, values, k, scale, valid_len = topk_inputs(case, dtype, device)

    def forward(threshold=use_threshold):
        out = nan_filled((B, H, T, Dv), dtype, device)
        indices = torch.full((B, H, T, k), INDEX_SENTINEL, dtype=torch.int64, device=device)
        weights = nan_filled((B, H, T, k), torch.float32, device)
        lse = nan_filled((B, H, T), torch.float32, device)
        cuda_topk_read_fwd(ext, q, keys, values, valid_len, k, scale, out, indices, weights, lse,
                           threshold)
        return out, indices, weights, lse

    out, indices, weights, lse = forward()
    assert all(bits_equal(a, b) for a, b in zip((out, indices, weights, lse), forward())), \
        "forward not bitwise repeatable"
    # Both paths score with the same code and select the same keys: identical outputs.
    assert all(bits_equal(a, b) for a, b in zip((out, indices, weights, lse),
                                                forward(not use_threshold))), \
        "forward with and without the threshold differ"

    dout = torch.randn(B, H, T, Dv, device=device).to(dtype)
    dweights = torch.randn(B, H, T, k, device=device)
    dlse = torch.randn(B, H, T, device=device)

    def backward(deterministic):
        grads = (nan_filled(q.shape, dtype, device), nan_filled(keys.shape, dtype, device),
                 nan_filled(values.shape, dtype, device))
        cuda_topk_read_bwd(ext, dout, dweights, dlse, q, keys, values, indices, weights, scale,
                           deterministic, *grads)
        return grads

    grads_atomic = backward(False)
    grads_det = backward(True)
    assert all(bits_equal(a, b) for a, b in zip(grads_det, backward(True))), \
        "deterministic backward not bitwise repeatable"
    if B * H * T == 0:
        for name, grad in zip(("dkeys", "dvalues") * 2, (*grads_atomic[1:], *grads_det[1:])):
            assert (grad == 0).all(), f"{name} of an empty batch is not all zeros"
        return

    # A valid top-k of the float64 scores (NaN rows: exactly the reference's, by the tie rule).
    assert_valid_topk(indices, read_scores(q, keys, scale), valid_len=valid_len, name="indices")
    nan_rows = q.isnan().any(-1)  # (B, H, T)
    ref_indices = topk_memory_read_ref(q.double(), keys.double(), values.double(), k, scale,
                                       valid_len)[1]
    if special == "ties":
        assert torch.equal(indices, ref_indices), "indices differ from the reference on exact ties"
    if nan_rows.any():
        assert torch.equal(indices[nan_rows], ref_indices[nan_rows]), \
            "NaN row indices differ from the reference"
    if special == "neginf":
        assert (indices == 3).any(-1).all(), "the -inf slot was not kept (k = N)"
        assert (weights[indices == 3] == 0).all(), "the -inf slot has a nonzero weight"

    # The reference evaluated at the kernel's selection, in float64 with autograd, and the same at
    # the input dtype (the baseline error).
    leaves = [t.double().requires_grad_() for t in (q, keys, values)]
    gathered = topk_read_gather(*leaves, indices, scale)
    baseline = topk_read_gather(q, keys, values, indices, scale)
    keep = ~nan_rows
    if nan_rows.any():
        assert out[nan_rows].isnan().all() and lse[nan_rows].isnan().all(), \
            "NaN row did not give NaN out / lse"
        assert out[keep].isfinite().all() and (lse[keep].isfinite() | lse[keep].isneginf()).all(), \
            "NaN leaked into another row"
    for name, actual, expected, base, check_dtype in (
            ("out", out, gathered[0], baseline[0], dtype),
            ("weights", weights, gathered[1], baseline[1], torch.float32),
            ("lse", lse, gathered[2], baseline[2], torch.float32)):
        assert_close(name, actual[keep], expected.detach()[keep], check_dtype, baseline=base[keep])
    empty_rows = (indices < 0).all(-1)
    if empty_rows.any():
        assert ((out[empty_rows] == 0).all() and lse[empty_rows].isneginf().all()
                and (weights[empty_rows] == 0).all()), \
            "a row without slots is not out = 0, lse = -inf, w = 0"

    cotangents = (dout, dweights, dlse)
    expected = torch.autograd.grad(gathered, leaves, [c.double() for c in cotangents],
                                   allow_unused=True)
    low_leaves = [t.detach().clone().requires_grad_() for t in (q, keys, values)]
    low = topk_read_gather(*low_leaves, indices, scale)
    low_grads = torch.autograd.grad(low, low_leaves, cotangents, allow_unused=True)
    # Memory rows a NaN query selected are NaN in every backend; compare the others.
    slot_mask = nan_row_slot_mask(keys, indices, nan_rows, H // Hm)
    masks = (keep, slot_mask, slot_mask)
    for mode, grads in (("atomic", grads_atomic), ("deterministic", grads_det)):
        for name, actual, exp, base, mask in zip(("dq", "dkeys", "dvalues"), grads, expected,
                                                 low_grads, masks):
            exp = torch.zeros_like(actual, dtype=torch.float64) if exp is None else exp
            base = None if base is None else base[mask]
            if special == "neginf" and name == "dq":
                # 0 * (-inf) at feature 0 is NaN in every backend; compare the other features.
                actual, exp, base = actual[..., 1:], exp[..., 1:], None
            assert_close(f"{name} ({mode})", actual[mask], exp[mask], dtype, baseline=base)
            if nan_rows.any():
                assert actual[~mask].isnan().all(), f"{name} ({mode}): NaN row's gradient not NaN"
    # Deterministic and atomic modes agree (both are also checked against the reference).
    for name, atomic, det, mask in zip(("dq", "dkeys", "dvalues"), grads_atomic, grads_det, masks):
        if special == "neginf" and name == "dq":
            atomic, det = atomic[..., 1:], det[..., 1:]
        assert_close(f"{name} deterministic vs atomic", det[mask], atomic[mask].double(), dtype)


def _bad_calls(device):
    """Bad topk calls through the cuda launchers, each a function of the extension; they raise and
    never launch."""
    B, H, T, N, D, k = 2, 2, 3, 16, 8, 4

    def outputs(dtype=torch.float32, k=k, Dv=D, on=device):
        return (torch.empty(B, H, T, Dv, dtype=dtype, device=on),
                torch.empty(B, H, T, k, dtype=torch.int64, device=on),
                torch.empty(B, H, T, k, device=on), torch.empty(B, H, T, device=on))

    q = torch.randn(B, H, T, D, device=device)
    keys = torch.randn(B, H, N, D, device=device)
    values = torch.randn(B, H, N, D, device=device)

    def fwd(*args):
        return lambda ext: cuda_topk_read_fwd(ext, *args)

    def bwd(indices_dtype=torch.int64, dkeys_rows=N, deterministic=False):
        return lambda ext: cuda_topk_read_bwd(
            ext,
            torch.randn(B, H, T, D, device=device), torch.randn(B, H, T, k, device=device),
            torch.randn(B, H, T, device=device), q, keys, values,
            torch.zeros(B, H, T, k, dtype=indices_dtype, device=device),
            torch.rand(B, H, T, k, device=device), 1.0, deterministic, torch.empty_like(q),
            torch.empty(B, H, dkeys_rows, D, device=device), torch.empty_like(values))

    return {
        "cpu tensor": fwd(q.cpu(), keys.cpu(), values.cpu(), None, k, 1.0, *outputs(on="cpu")),
        "float64": fwd(q.double(), keys.double(), values.double(), None, k, 1.0,
                       *outputs(torch.float64)),
        "k > N": fwd(q, keys, values, None, N + 1, 1.0, *outputs(k=N + 1)),
        "k = 0": fwd(q, keys, values, None, 0, 1.0, *outputs(k=0)),
        "out shape": fwd(q, keys, values, None, k, 1.0, *outputs(Dv=D + 1)),
        "keys shape": fwd(q, keys[:, :, :, :-1].contiguous(), values, None, k, 1.0, *outputs()),
        "heads": fwd(torch.randn(B, 3, T, D, device=device), keys, values, None, k, 1.0,
                     *outputs()),
        "Dk > 256": fwd(torch.randn(B, H, T, 300, device=device),
                        torch.randn(B, H, N, 300, device=device), values, None, k, 1.0,
                        *outputs()),
        "valid_len int32": fwd(q, keys, values, torch.full((B,), N, dtype=torch.int32, device=device),
                               k, 1.0, *outputs()),
        "valid_len shape": fwd(q, keys, values,
                               torch.full((B + 1,), N, dtype=torch.int64, device=device), k, 1.0,
                               *outputs()),
        "non-contiguous": fwd(q.transpose(2, 3).contiguous().transpose(2, 3), keys, values, None,
                              k, 1.0, *outputs()),
        "bwd dkeys shape": bwd(dkeys_rows=N - 1),
        "bwd indices dtype": bwd(indices_dtype=torch.int32, deterministic=True),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_bad_calls("cpu")))
def test_topk_read_bad_call_raises(cuda_ext, name):
    with pytest.raises((RuntimeError, ValueError, TypeError, NotImplementedError)):
        _bad_calls("cuda")[name](cuda_ext)
    torch.cuda.synchronize()


def test_topk_read_cases_and_reference_side_on_cpu():
    """What the gpu tests run before the kernel, here on CPU tensors (float32): every case's
    inputs, the specials doing what they say, and the reference side the kernel is judged by
    (the reference's own selection passes assert_valid_topk)."""
    assert len({_case_id(case) for case in CASES}) == len(CASES)
    for case in CASES:
        B, H, Hm, T, N, Dk, Dv, k, shared, valid, special = case
        q, keys, values, k, scale, valid_len = topk_inputs(case, torch.float32, "cpu")
        lead = (Hm, N) if shared else (B, Hm, N)
        assert q.shape == (B, H, T, Dk) and keys.shape == (*lead, Dk) and values.shape == (*lead, Dv)
        assert 1 <= k <= N and H % Hm == 0
        if special in ("ramp_up", "ramp_down"):
            ramp = keys[..., 0].diff(dim=-1)
            assert ((ramp > 0) if special == "ramp_up" else (ramp < 0)).all() and (q[..., 0] > 0).all()
        if B * H * T == 0 or B * H * T * N > 30_000:  # the largest cost seconds on a CPU
            continue
        scores = read_scores(q, keys, scale)
        if special == "ties":
            top = scores.sort(-1, descending=True).values
            assert (top[..., k - 1] == top[..., min(k, N - 1)]).any() or k == N, "no tie at k"
        if special == "neginf":
            assert scores[..., 3].isneginf().all() and scores[..., :3].isfinite().all()
        ref = topk_memory_read_ref(q.double(), keys.double(), values.double(), k, scale, valid_len)
        nan_rows = q.isnan().any(-1)
        assert nan_rows.any() == (special == "nan")
        assert_valid_topk(ref[1], scores, valid_len=valid_len, score_dtype=torch.float64)
        leaves = [t.double().requires_grad_() for t in (q, keys, values)]
        gathered = topk_read_gather(*leaves, ref[1], scale)
        grads = torch.autograd.grad(gathered, leaves, [torch.ones_like(g) for g in gathered],
                                    allow_unused=True)
        assert grads[0].shape == q.shape
        slot_mask = nan_row_slot_mask(keys, ref[1], nan_rows, H // Hm)
        assert (~slot_mask).any() == bool(nan_rows.any())
    for name, call in _bad_calls("cpu").items():
        assert callable(call), name


# A few cases whose bodies also run on CPU tensors with the CPU kernels in the CUDA kernels' place:
# odd sizes, grouped heads with valid_len, k = 256 shared with valid_len 0, exact ties, a NaN row,
# a -inf slot, an empty batch, T = 0, the threshold pre-pass (8 chunks of slots, k = 3).
CPU_CASES = [CASES[i] for i in (0, 3, 7, 12, 14, 15, 16, 18, 36)]


def check_topk_read_with_threshold(ext, device, case, dtype):
    check_topk_read(ext, device, case, dtype, use_threshold=True)


test_topk_read_body_runs_on_cpu_kernels = cpu_kernels_test(check_topk_read_with_threshold,
                                                           CPU_CASES, _case_id)
