"""The CUDA kernels of the memory_attention cuda backend in ``l2m_kernels._C_cuda``, called
directly (local_attention_bwd with its scratch, through ``cuda.local_attention_bwd``):
local_attention_fwd / _bwd against the float64 reference
(``l2m_kernels/ops/memory_attention/reference.py``) and memory_read_weights against the top-k
read's reference gather.

local attention in float32, float16, bfloat16 and (some cases) float64 with outputs pre-filled with
NaN: out / lse and dq / dk / dv by relative RMS error against the float64 reference and its autograd
gradients, over odd sizes (T 1/7/33/63/129, S >= T, D 7/16/64/129/256, Dv != D, several column
slices), grouped heads, window 1/5/S/> S/0 (out 0, lse -inf, zero gradients), bitwise repeatable
backward, exact zeros in dk / dv of keys no query sees, empty B and T (dk, dv zeroed), NaN / inf k
and v at masked positions and a NaN query row (rows that do not see them unchanged, the others
non-finite exactly where the reference is). memory_read_weights (weights, dots, out) against the
reference gather at the given lse, with shared memories, grouped heads, missing (-1) and
out-of-range slots (weight 0), k = 0 / 1, T = 0, Dk / Dv up to 256. And bad calls.

Shared set-up, and the CPU kernels standing in without a CUDA device: ``tests/ops/_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch

from l2m_kernels.ops.memory_attention.cuda import local_attention_bwd
from l2m_kernels.ops.memory_attention.reference import local_attention_ref
from l2m_kernels.ops.topk_read.reference import topk_read_gather
from l2m_kernels.testing import assert_close, bits_equal, lse_dtype, nan_filled
from .._cuda import (NAN, NEG_INF, assert_bad_calls_listed, bad_call_test, cpu_kernels_test)

# (B, H, Hkv, T, S, D, Dv, window, special): window None = no window (passed as -1). Slices of the
# feature columns: 64 (float64, or <= 64 columns) or 128, so D / Dv 65, 129, 130, 256 take several.
ATTN_CASES = [
    (1, 1, 1, 1, 1, 7, 7, None, None),              # T = S = 1
    (2, 4, 2, 7, 7, 7, 5, None, None),              # S = T, odd D, Dv != D, grouped heads
    (1, 2, 1, 7, 20, 64, 64, 5, None),              # S > T, window 5
    (2, 2, 2, 63, 63, 64, 32, 1, None),             # window 1: only itself
    (1, 4, 2, 63, 100, 129, 65, 5, None),           # D 129 / Dv 65: several column slices
    (1, 2, 1, 129, 129, 64, 129, None, None),       # T 129: 5 query tiles, one partial
    (1, 4, 1, 129, 160, 7, 130, 160, None),         # window = S, Dv 130
    (1, 2, 1, 33, 40, 16, 16, 1000, None),          # window > S
    (1, 2, 1, 33, 40, 16, 16, 0, None),             # window 0: nothing visible
    (1, 2, 1, 40, 300, 256, 256, 64, None),         # large D = Dv, long context
    (1, 2, 1, 20, 40, 16, 24, 5, "nonfinite"),      # NaN / inf k, v at masked positions
    (1, 2, 1, 20, 40, 16, 24, None, "nonfinite"),
    (2, 2, 1, 7, 9, 8, 8, None, "nan_query"),       # one NaN query row
    (0, 2, 1, 5, 8, 8, 8, None, None),              # empty batch
    (2, 2, 1, 0, 8, 8, 8, 3, None),                 # T = 0: dk, dv zero
]
ATTN_FLOAT64 = {1, 4, 6, 10}  # cases also run in float64
ATTN_PARAMS = [pytest.param(case, dtype, id=f"{str(dtype).removeprefix('torch.')}-{number}")
               for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
               for number, case in enumerate(ATTN_CASES)
               if dtype != torch.float64 or number in ATTN_FLOAT64]

# (B, H, Hm, T, N, Dk, Dv, k, shared, special) for memory_read_weights
READ_WEIGHT_CASES = [
    (2, 4, 2, 7, 63, 7, 5, 3, False, None),
    (1, 2, 2, 9, 40, 64, 64, 33, True, "missing"),     # slots -1 (weight 0, never read)
    (2, 4, 1, 5, 129, 129, 256, 8, False, "missing"),  # Dk 129, Dv 256
    (1, 2, 1, 6, 20, 256, 7, 1, True, None),           # k = 1, Dk 256
    (1, 2, 2, 6, 20, 8, 8, 4, False, "out_of_range"),  # indices >= N or < -1: weight 0
    (2, 2, 1, 0, 20, 8, 8, 4, False, None),            # T = 0
    (2, 2, 1, 5, 20, 8, 8, 0, False, None),            # k = 0: dots and out zero
]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _local(ext, q, k, v, window, scale):
    B, H, T, _ = q.shape
    out = nan_filled((B, H, T, v.shape[-1]), q.dtype, q.device)
    lse = nan_filled((B, H, T), lse_dtype(q.dtype), q.device)
    ext.local_attention_fwd(q, k, v, -1 if window is None else window, scale, out, lse)
    return out, lse


def _local_bwd(ext, dout, dlse, q, k, v, out, lse, window, scale):
    grads = tuple(nan_filled(t.shape, t.dtype, t.device) for t in (q, k, v))
    local_attention_bwd(ext, dout, dlse, q, k, v, out, lse, -1 if window is None else window,
                        scale, *grads)
    return grads


def attention_inputs(case, dtype, device):
    """q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), dout in dtype; dlse in lse_dtype."""
    B, H, Hkv, T, S, D, Dv, window, special = case
    q = torch.randn(B, H, T, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, device=device).to(dtype)
    dout = torch.randn(B, H, T, Dv, device=device).to(dtype)
    dlse = torch.randn(B, H, T, device=device, dtype=lse_dtype(dtype))
    return q, k, v, dout, dlse


def poison(q, k, v, window, special):
    """Poisoned copies of q, k, v and ``seeing`` (B, H, T): the query rows that see a poisoned
    position (or are poisoned)."""
    B, H, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    q, k, v = q.clone(), k.clone(), v.clone()
    seeing = torch.zeros(B, H, T, dtype=torch.bool, device=q.device)
    if special == "nan_query":
        q[0, H - 1, T // 2, 0] = NAN
        seeing[0, H - 1, T // 2] = True
        return q, k, v, seeing
    # NaN k at the last position (seen by the last query only), inf v one before (the last two
    # queries) in column 1 of kv head 0; with a window also at position 0 (seen by no query when
    # S - T >= window), NaN v in column 0.
    poisoned = [(S - 1, 0, "k", 0), (S - 2, 0, "v", 1)]
    if window is not None:
        poisoned.append((0, Hkv - 1, "v", 0))
    for position, kv_head, name, column in poisoned:
        tensor = k if name == "k" else v
        tensor[:, kv_head, position, column] = NAN if name == "k" or column == 0 else float("inf")
        for t in range(T):
            p = S - T + t
            if position <= p and (window is None or position > p - window):
                seeing[:, kv_head * group:(kv_head + 1) * group, t] = True
    return q, k, v, seeing


def keys_seen(seeing, num_kv_heads, context_len, window):
    """(B, Hkv, S) bool: the keys some ``seeing`` query row sees (their dk / dv may change)."""
    B, H, T = seeing.shape
    group = H // num_kv_heads
    touched = torch.zeros(B, num_kv_heads, context_len, dtype=torch.bool, device=seeing.device)
    for b, h, t in seeing.nonzero().tolist():
        p = context_len - T + t
        first = 0 if window is None else max(0, p - window + 1)
        touched[b, h // group, first:p + 1] = True
    return touched


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", ATTN_PARAMS)
def test_local_attention_cuda(cuda_ext, case, dtype):
    check_local_attention(cuda_ext, "cuda", case, dtype)


def check_local_attention(ext, device, case, dtype):
    B, H, Hkv, T, S, D, Dv, window, special = case
    scale = D ** -0.5
    q, k, v, dout, dlse = attention_inputs(case, dtype, device)
    out, lse = _local(ext, q, k, v, window, scale)
    if special in ("nonfinite", "nan_query") and B * T:
        clean = (out, lse) + _local_bwd(ext, dout, dlse, q, k, v, out, lse, window, scale)
        q, k, v, seeing = poison(q, k, v, window, special)
        out, lse = _local(ext, q, k, v, window, scale)
        poisoned = (out, lse) + _local_bwd(ext, dout, dlse, q, k, v, out, lse, window, scale)
        # Rows that see no poisoned value are unchanged: out, lse, dq exactly, and dk / dv of
        # every key no poisoned query sees.
        others = ~seeing
        for name, a, b in zip(("out", "lse", "dq"), clean[:3], poisoned[:3]):
            assert torch.equal(a[others], b[others]), \
                f"{name} of a row that sees no poisoned value changed"
        untouched = ~keys_seen(seeing, Hkv, S, window)
        for name, a, b in (("dk", clean[3], poisoned[3]), ("dv", clean[4], poisoned[4])):
            assert torch.equal(a[untouched], b[untouched]), \
                f"{name} of a key no poisoned query sees changed"
        ref_out, ref_lse = local_attention_ref(q.double(), k.double(), v.double(), window, scale)
        for name, got, want in (("out", out, ref_out), ("lse", lse, ref_lse)):
            assert (torch.equal(got.isnan(), want.isnan())
                    and torch.equal(got.isfinite(), want.isfinite())), \
                f"{name} non-finite pattern differs from the reference"
        return

    # The float64 reference takes the window as given (0: nothing visible; >= S: no window).
    leaves = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = local_attention_ref(*leaves, window, scale)
    low_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low_out, low_lse = local_attention_ref(*low_leaves, window, scale)
    assert_close("out", out, ref_out, dtype, baseline=low_out)
    assert_close("lse", lse, ref_lse, lse_dtype(dtype))
    if window == 0 and B * H * T:
        assert (out == 0).all() and (lse == NEG_INF).all(), "window 0 must give out 0, lse -inf"

    grads = _local_bwd(ext, dout, dlse, q, k, v, out, lse, window, scale)
    again = _local_bwd(ext, dout, dlse, q, k, v, out, lse, window, scale)
    assert all(bits_equal(a, b) for a, b in zip(grads, again)), "backward not bitwise repeatable"
    if B * H * T:
        expected = torch.autograd.grad((ref_out, ref_lse), leaves, (dout.double(), dlse.double()))
        low = torch.autograd.grad((low_out, low_lse), low_leaves, (dout, dlse.to(low_lse.dtype)))
        for name, got, exp, base in zip(("dq", "dk", "dv"), grads, expected, low):
            assert_close(name, got, exp, dtype, baseline=base)
    else:
        assert all((g == 0).all() for g in grads[1:]), "dk / dv not zero without queries"
    # Keys that no query sees (j <= S - T - window) get exact zeros.
    offset = S - T
    if window is not None and B * Hkv and offset - window >= 0:
        unseen = slice(0, offset - window + 1)
        assert (grads[1][:, :, unseen] == 0).all() and (grads[2][:, :, unseen] == 0).all(), \
            "dk / dv of keys no query sees are not zero"


def read_weights_inputs(case, dtype, device):
    """q, keys, values, dout in dtype; indices (B, H, T, k) as given to the kernel and ``valid``:
    the same with the entries the reference treats as missing set to -1."""
    B, H, Hm, T, N, Dk, Dv, k, shared, special = case
    lead = (Hm, N) if shared else (B, Hm, N)
    q = torch.randn(B, H, T, Dk, device=device).to(dtype)
    keys = torch.randn(*lead, Dk, device=device).to(dtype)
    values = torch.randn(*lead, Dv, device=device).to(dtype)
    dout = torch.randn(B, H, T, Dv, device=device).to(dtype)
    if B * H * T and k:
        indices = torch.stack([torch.randperm(N, device=device)[:k] for _ in range(B * H * T)])
    else:
        indices = torch.zeros(B * H * T, k, dtype=torch.int64, device=device)
    indices = indices.reshape(B, H, T, k)
    if special == "missing" and indices.numel():
        indices[..., k // 2:] = -1  # missing entries come last, as the read returns them
    valid = indices.clone()
    if special == "out_of_range" and indices.numel():
        indices[..., 0] = N + 5     # never read, weight 0
        indices[..., 1] = -7
        valid[..., :2] = -1         # the reference treats them as missing
    return q, keys, values, dout, indices, valid


def read_weights_expected(q, keys, values, dout, valid, scale, acc):
    """The reference gather's weights, dots and out, at the lse the kernel gets (the reference's,
    rounded to ``acc``): the weights (and what depends on them) move with it. Returns
    (lse, weights, dots, out)."""
    B, H, T, k = valid.shape
    if k:
        ref_out, ref_weights, ref_lse = topk_read_gather(q.double(), keys.double(),
                                                         values.double(), valid, scale)
    else:  # no entry (the reference's reductions need one): out 0, lse -inf
        ref_out = torch.zeros(B, H, T, values.shape[-1], dtype=torch.float64, device=q.device)
        ref_weights = torch.zeros(B, H, T, 0, dtype=torch.float64, device=q.device)
        ref_lse = torch.full((B, H, T), NEG_INF, dtype=torch.float64, device=q.device)
    lse = ref_lse.to(acc).contiguous()
    shift = torch.where(ref_lse.isfinite(), torch.exp(ref_lse - lse.double()),
                        torch.ones_like(ref_lse)).unsqueeze(-1)
    ref_out = ref_out * shift
    return lse, ref_weights * shift, (dout.double() * ref_out).sum(-1), ref_out


@pytest.mark.gpu
@pytest.mark.parametrize("case", READ_WEIGHT_CASES, ids=lambda c: "B{}H{}Hm{}T{}N{}Dk{}Dv{}k{}".format(*c[:8])
                         + ("-shared" if c[8] else "") + (f"-{c[9]}" if c[9] else ""))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_memory_read_weights_cuda(cuda_ext, case, dtype):
    check_memory_read_weights(cuda_ext, "cuda", case, dtype)


def check_memory_read_weights(ext, device, case, dtype):
    B, H, Hm, T, N, Dk, Dv, k, shared, special = case
    acc = lse_dtype(dtype)
    scale = Dk ** -0.5
    q, keys, values, dout, indices, valid = read_weights_inputs(case, dtype, device)
    lse, ref_weights, ref_dots, ref_out = read_weights_expected(q, keys, values, dout, valid,
                                                                scale, acc)

    def run(with_dout):
        weights = nan_filled((B, H, T, k), acc, device)
        dots = nan_filled((B, H, T), acc, device) if with_dout else None
        out = None if with_dout else nan_filled((B, H, T, Dv), dtype, device)
        ext.memory_read_weights(q, keys, values, indices, lse, scale,
                                dout if with_dout else None, weights, dots, out)
        return weights, dots if with_dout else out

    weights, dots = run(True)
    weights_again, out = run(False)
    assert bits_equal(weights, weights_again), "weights differ between the two modes"
    assert all(bits_equal(a, b) for a, b in zip((weights, dots), run(True))), \
        "not bitwise repeatable"
    assert_close("weights", weights, ref_weights, acc)
    assert_close("dots", dots, ref_dots, acc)
    assert_close("out", out, ref_out, dtype, baseline=ref_out.to(dtype))
    if indices.numel():
        assert (weights[valid < 0] == 0).all(), "a missing or out-of-range entry has a nonzero weight"


def _bad_calls(device):
    """Bad local_attention / memory_read_weights calls and the exception type each raises
    (TORCH_CHECK_VALUE: ValueError, _TYPE: TypeError, _NOT_IMPLEMENTED: NotImplementedError,
    overlap: RuntimeError); they never launch."""
    B, H, Hkv, T, S, D, Dv, N, k = 2, 4, 2, 5, 8, 8, 6, 10, 3
    q = torch.randn(B, H, T, D, device=device)
    kk = torch.randn(B, Hkv, S, D, device=device)
    v = torch.randn(B, Hkv, S, Dv, device=device)
    keys = torch.randn(H, N, D, device=device)
    values = torch.randn(H, N, Dv, device=device)
    indices = torch.zeros(B, H, T, k, dtype=torch.int64, device=device)

    def fwd(**changes):
        args = dict(q=q, k=kk, v=v, window=-1, scale=1.0,
                    out=torch.empty(B, H, T, Dv, device=device),
                    lse=torch.empty(B, H, T, device=device))
        args.update(changes)
        return lambda ext: ext.local_attention_fwd(**args)

    def bwd(**changes):
        args = dict(dout=torch.randn(B, H, T, Dv, device=device),
                    dlse=torch.zeros(B, H, T, device=device), q=q, k=kk, v=v,
                    out=torch.randn(B, H, T, Dv, device=device),
                    lse=torch.zeros(B, H, T, device=device), window=-1, scale=1.0,
                    dq=torch.empty_like(q), dk=torch.empty_like(kk), dv=torch.empty_like(v))
        args.update(changes)
        return lambda ext: local_attention_bwd(ext, **args)

    def weights(**changes):
        args = dict(q=q, keys=keys, values=values, indices=indices,
                    lse=torch.zeros(B, H, T, device=device), scale=1.0, dout=None,
                    weights=torch.empty(B, H, T, k, device=device), dots=None,
                    out=torch.empty(B, H, T, Dv, device=device))
        args.update(changes)
        return lambda ext: ext.memory_read_weights(**args)

    buffer = torch.randn(B * H * T * D, device=device)
    return {
        "cpu tensor": (ValueError, fwd(q=q.cpu())),
        "k half": (TypeError, fwd(k=kk.half())),
        "int q": (TypeError, fwd(q=q.int(), k=kk.int(), v=v.int())),
        "lse float64": (TypeError, fwd(lse=torch.empty(B, H, T, dtype=torch.float64,
                                                       device=device))),
        "float64 lse float32": (TypeError, fwd(q=q.double(), k=kk.double(), v=v.double(),
                                               out=torch.empty(B, H, T, Dv, dtype=torch.float64,
                                                               device=device))),
        "Hkv not dividing H": (ValueError, fwd(k=torch.randn(B, 3, S, D, device=device),
                                               v=torch.randn(B, 3, S, Dv, device=device))),
        "S < T": (ValueError, fwd(k=kk[:, :, :T - 1].contiguous(), v=v[:, :, :T - 1].contiguous())),
        "v shape": (ValueError, fwd(v=v[:, :, :-1].contiguous())),
        "k 3-D": (ValueError, fwd(k=kk[0])),
        "out shape": (ValueError, fwd(out=torch.empty(B, H, T, Dv + 1, device=device))),
        "window -2": (ValueError, fwd(window=-2)),
        "non-contiguous q": (ValueError, fwd(q=q.transpose(2, 3).contiguous().transpose(2, 3))),
        "out overlaps q": (RuntimeError, fwd(q=buffer.view(B, H, T, D),
                                             out=buffer[:B * H * T * Dv].view(B, H, T, Dv))),
        "bwd dk shape": (ValueError, bwd(dk=torch.empty(B, Hkv, S, D + 1, device=device))),
        "bwd dlse half": (TypeError, bwd(dlse=torch.zeros(B, H, T, dtype=torch.half,
                                                          device=device))),
        "bwd dq is q": (RuntimeError, bwd(dq=q)),
        "bwd cpu dv": (ValueError, bwd(dv=torch.empty_like(v).cpu())),
        "weights dout without dots": (ValueError, weights(dout=torch.randn(B, H, T, Dv,
                                                                           device=device),
                                                          out=None)),
        "weights float indices": (TypeError, weights(indices=indices.float())),
        "weights shape": (ValueError, weights(weights=torch.empty(B, H, T, k + 1, device=device))),
        "weights Dk > 256": (NotImplementedError, weights(
            q=torch.randn(B, H, T, 300, device=device), keys=torch.randn(H, N, 300, device=device))),
        "weights lse float64": (TypeError, weights(lse=torch.zeros(B, H, T, dtype=torch.float64,
                                                                   device=device))),
    }


test_memory_attention_bad_call_raises = bad_call_test(_bad_calls)


def test_memory_attention_cases_and_reference_side_on_cpu():
    """What the gpu tests run before the kernels, here on CPU tensors: every case's inputs, the
    poisoned copies and the rows / keys they reach, and the reference side (float32 and the
    float64 cases)."""
    assert len(ATTN_PARAMS) == 3 * len(ATTN_CASES) + len(ATTN_FLOAT64)
    for case, dtype in (p.values for p in ATTN_PARAMS):
        if dtype not in (torch.float32, torch.float64):
            continue
        B, H, Hkv, T, S, D, Dv, window, special = case
        q, k, v, dout, dlse = attention_inputs(case, dtype, "cpu")
        assert q.shape == (B, H, T, D) and v.shape == (B, Hkv, S, Dv) and dlse.dtype == lse_dtype(dtype)
        if special and B * T:
            q_p, k_p, v_p, seeing = poison(q, k, v, window, special)
            assert seeing.any() and not seeing.all()
            ref_out, ref_lse = local_attention_ref(q_p.double(), k_p.double(), v_p.double(),
                                                   window, D ** -0.5)
            # The poison reaches exactly the rows that see it.
            assert torch.isfinite(ref_out[~seeing]).all() and not torch.isfinite(ref_out[seeing]).all()
            assert keys_seen(seeing, Hkv, S, window).any()
            continue
        if B * H * T * S * D > 200_000:  # seconds on a CPU
            continue
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = local_attention_ref(*leaves, window, D ** -0.5)
        if B * H * T:
            grads = torch.autograd.grad((ref_out, ref_lse), leaves, (dout.double(), dlse.double()))
            assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]
        if window == 0 and B * H * T:
            assert (ref_out == 0).all() and ref_lse.isneginf().all()
    for case in READ_WEIGHT_CASES:
        B, H, Hm, T, N, Dk, Dv, k, shared, special = case
        q, keys, values, dout, indices, valid = read_weights_inputs(case, torch.float32, "cpu")
        assert indices.shape == (B, H, T, k) and ((valid >= -1) & (valid < N)).all()
        if special == "out_of_range" and indices.numel():
            assert (indices[..., 0] >= N).all() and (indices[..., 1] < -1).all()
        lse, weights, dots, out = read_weights_expected(q, keys, values, dout, valid, Dk ** -0.5,
                                                        torch.float32)
        assert weights.shape == (B, H, T, k) and dots.shape == lse.shape == (B, H, T)
        assert out.shape == (B, H, T, Dv) and (weights[valid < 0] == 0).all()
    assert_bad_calls_listed(_bad_calls)


# A few cases whose bodies also run on CPU tensors with the CPU kernels in the CUDA kernels' place:
# grouped heads, window 5, window 0, non-finite k / v, a NaN query row, empty B and T; and every
# memory_read_weights case but out-of-range slots (the CPU kernel raises IndexError for them, the
# CUDA kernel gives them weight 0).
CPU_ATTN_CASES = [ATTN_CASES[i] for i in (1, 2, 8, 10, 12, 13, 14)]
CPU_READ_WEIGHT_CASES = [case for case in READ_WEIGHT_CASES if case[-1] != "out_of_range"]

test_local_attention_body_runs_on_cpu_kernels = cpu_kernels_test(check_local_attention,
                                                                 CPU_ATTN_CASES, str)
test_memory_read_weights_body_runs_on_cpu_kernels = cpu_kernels_test(check_memory_read_weights,
                                                                     CPU_READ_WEIGHT_CASES, str)
