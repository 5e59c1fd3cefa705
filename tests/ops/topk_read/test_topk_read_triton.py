"""Triton top-k memory read launchers against the reference, on CUDA when present, else under the
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).

Calls ``topk_read_fwd`` / ``topk_read_bwd`` directly with outputs pre-filled with NaN (indices with
a sentinel), so any element a kernel forgets to write fails. Shapes are tiny: the interpreter runs
every program in Python.

A test runs on each forward path (the autouse ``forward_path`` fixture) unless it names its own:
``stream`` (the running top-k select kernel); ``threshold`` (the default: contiguous chunks, int64
chunk maxima, cumulative-sum collect, finish; production tiles, so tiny N mostly takes its N <= cap
shortcut) and ``threshold-strided`` (opt-in: strided chunks, float chunk maxima, k-th kernel,
collect rounds; production tiles, so tiny N mostly goes to the select kernel); and each threshold
path with 16-slot chunks and a small candidate capacity (``-small``), so tiny shapes run the chunk
pass, the threshold and the overflow fallback. The backward tests run on the production paths; the
tests after them check each threshold design's own kernels.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from l2m_kernels import _gpu_status  # noqa: E402
from l2m_kernels.ops.topk_read import triton as topk_triton  # noqa: E402
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref, topk_read_gather  # noqa: E402
from l2m_kernels.testing import assert_close  # noqa: E402
from .._triton import DEVICE, INTERPRETER_WARNINGS, skip_module_unless_interpreted  # noqa: E402

skip_module_unless_interpreted(topk_triton, "topk_read_fwd_select_kernel")
pytestmark = INTERPRETER_WARNINGS

NAN = float("nan")
INDEX_SENTINEL = -(2**31) + 7
THRESHOLD_DESIGNS = [path for path in topk_triton.PATHS if path != "stream"]
SMALL_PATHS = [design + "-small" for design in THRESHOLD_DESIGNS]

# Chunks of 16 slots and capacity 2 * K_PAD: tiny shapes exercise every branch of the threshold paths.
SMALL_TILE = topk_triton._ScanTile(16, 16, 4, 128)
SMALL_CAP_FACTOR = 2
PATHS = ["stream", *THRESHOLD_DESIGNS, *SMALL_PATHS]


def _overflowed(design):
    """The path recorded when rows overflowed into the streaming fallback: only on CPU tensors
    (reading the counts back would cost a device sync on a GPU, which the threshold paths never make)."""
    return f"{design}+stream" if DEVICE == "cpu" else design


def _use_path(monkeypatch, path):
    monkeypatch.setenv(topk_triton.PATH_ENV, path.removesuffix("-small"))
    if path.endswith("-small"):
        for f32 in (False, True):
            monkeypatch.setitem(topk_triton._SCAN_TILES, f32, SMALL_TILE)
        monkeypatch.setattr(topk_triton, "CAP_FACTOR", SMALL_CAP_FACTOR)


@pytest.fixture(autouse=True, params=PATHS)
def forward_path(request, monkeypatch):
    _use_path(monkeypatch, request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def _inputs(B, H, Hm, T, N, Dk, Dv, dtype=torch.float32, shared=False):
    lead = (Hm, N) if shared else (B, Hm, N)
    return _randn(B, H, T, Dk, dtype=dtype), _randn(*lead, Dk, dtype=dtype), _randn(*lead, Dv, dtype=dtype)


def _fwd(q, keys, values, k, scale, valid_len=None):
    """Run the triton forward into NaN/sentinel-filled outputs."""
    B, H, T, _ = q.shape
    out = torch.full((B, H, T, values.shape[-1]), NAN, dtype=q.dtype, device=DEVICE)
    indices = torch.full((B, H, T, k), INDEX_SENTINEL, dtype=torch.int64, device=DEVICE)
    weights = torch.full((B, H, T, k), NAN, dtype=torch.float32, device=DEVICE)
    lse = torch.full((B, H, T), NAN, dtype=torch.float32, device=DEVICE)
    vl = None if valid_len is None else torch.tensor(valid_len, dtype=torch.int64, device=DEVICE)
    topk_triton.topk_read_fwd(q, keys, values, vl, k, scale, out, indices, weights, lse)
    return out, indices, weights, lse


def _bwd(q, keys, values, indices, weights, scale, cotangents, deterministic):
    """Run the triton backward into NaN-filled gradients."""
    dout, dweights, dlse = cotangents
    grads = [torch.full_like(t, NAN) for t in (q, keys, values)]
    topk_triton.topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic,
                              *grads)
    return grads


def _cotangents(q, values, k):
    B, H, T, _ = q.shape
    return (_randn(B, H, T, values.shape[-1], dtype=q.dtype), _randn(B, H, T, k, dtype=torch.float32),
            _randn(B, H, T, dtype=torch.float32))


def _check_fwd(q, keys, values, k, scale, valid_len=None):
    """Forward against the reference (same input dtype); returns the triton outputs."""
    out, indices, weights, lse = _fwd(q, keys, values, k, scale, valid_len)
    vl = None if valid_len is None else torch.tensor(valid_len, dtype=torch.int64, device=DEVICE)
    ref_out, ref_indices, ref_weights, ref_lse = topk_memory_read_ref(q, keys, values, k, scale, vl)
    assert torch.equal(indices, ref_indices), f"indices differ:\n{indices}\nvs\n{ref_indices}"
    assert_close("out", out, ref_out, dtype=q.dtype)
    assert_close("weights", weights, ref_weights, dtype=q.dtype)
    assert_close("lse", lse, ref_lse, dtype=q.dtype)
    return out, indices, weights, lse


def _check_bwd(q, keys, values, k, scale, valid_len=None, deterministic=False):
    """Backward against torch.autograd.grad of the float64 reference at the selected slots."""
    out, indices, weights, lse = _check_fwd(q, keys, values, k, scale, valid_len)
    cotangents = _cotangents(q, values, k)
    grads = _bwd(q, keys, values, indices, weights, scale, cotangents, deterministic)
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, keys, values)]
    ref = topk_read_gather(*leaves, indices, scale)
    ref_grads = torch.autograd.grad(ref, leaves, [c.to(torch.float64) for c in cotangents])
    for name, grad, ref_grad in zip(("dq", "dkeys", "dvalues"), grads, ref_grads):
        assert grad.dtype == q.dtype
        assert_close(name, grad, ref_grad, dtype=q.dtype)
    return grads, indices, weights, cotangents


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

# (B, H, Hm, T, N, Dk, Dv, k, shared)
FWD_CASES = [
    (1, 1, 1, 7, 63, 7, 5, 3, False),       # odd sizes, D < 16 (padded inside the kernel)
    (1, 1, 1, 7, 129, 20, 9, 32, False),    # several key tiles, partial last tile
    (1, 1, 1, 7, 63, 16, 8, 1, False),      # k = 1
    (1, 1, 1, 5, 40, 16, 8, 40, False),     # k = N (K_PAD 64 > N)
    (2, 4, 2, 7, 70, 16, 8, 5, False),      # grouped heads
    (2, 4, 2, 3, 50, 12, 6, 4, True),       # shared (3-D) memories, grouped
    (1, 2, 1, 3, 300, 8, 4, 200, False),    # K_PAD 256
    (1, 1, 1, 3, 33, 150, 140, 2, False),   # D > 128: feature chunk loops
]


def _case_id(case):
    B, H, Hm, T, N, Dk, Dv, k, shared = case
    return f"B{B}H{H}Hm{Hm}T{T}N{N}Dk{Dk}Dv{Dv}k{k}" + ("-shared" if shared else "")


@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_forward_matches_reference(case):
    B, H, Hm, T, N, Dk, Dv, k, shared = case
    q, keys, values = _inputs(B, H, Hm, T, N, Dk, Dv, shared=shared)
    _check_fwd(q, keys, values, k, Dk ** -0.5)


@pytest.mark.parametrize("Dk", [24, 136], ids=["Dk24", "Dk136"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_forward_half(dtype, Dk):
    q, keys, values = _inputs(2, 2, 1, 5, 45, Dk, 10, dtype=dtype)
    _check_fwd(q, keys, values, 6, Dk ** -0.5)


def test_valid_len_zero_and_below_k():
    B, H, T, N, k = 3, 2, 4, 37, 5
    q, keys, values = _inputs(B, H, H, T, N, 16, 8)
    # A NaN in a slot that does not exist must be ignored.
    keys[1, :, 3] = NAN
    out, indices, weights, lse = _check_fwd(q, keys, values, k, 0.25, valid_len=[0, 3, N])
    assert torch.all(indices[0] == -1) and torch.all(weights[0] == 0) and torch.all(out[0] == 0)
    assert torch.all(lse[0] == float("-inf"))
    assert torch.all(indices[1, ..., 3:] == -1) and torch.all(weights[1, ..., 3:] == 0)
    assert torch.all(indices[1, ..., :3] >= 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_exact_ties_follow_the_smaller_slot(dtype):
    """Integer data with a power-of-two scale: many exactly equal scores (also +0.0 vs -0.0)."""
    B, H, T, N, D = 1, 2, 9, 77, 8
    q = torch.randint(-2, 3, (B, H, T, D), device=DEVICE).to(dtype)
    distinct = torch.randint(-1, 2, (6, D), device=DEVICE)
    keys = distinct[torch.randint(0, 6, (B * H * N,), device=DEVICE)].reshape(B, H, N, D).to(dtype)
    values = _randn(B, H, N, 5, dtype=dtype)
    for k in (1, 7, 32, 77):
        _check_fwd(q, keys, values, k, 0.5)


@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_tile_skip_paths(order):
    """Scores monotone in the slot: later tiles are all skipped (descending) or all merged."""
    N, D = 150, 16
    q = torch.ones(1, 1, 6, D, device=DEVICE)
    ramp = torch.arange(N, dtype=torch.float32, device=DEVICE) / N
    if order == "descending":
        ramp = ramp.flip(0)
    keys = (ramp[:, None] + 0.01 * _randn(N, D, dtype=torch.float32)).reshape(1, 1, N, D)
    values = _randn(1, 1, N, 4, dtype=torch.float32)
    _check_fwd(q, keys, values, 20, 1.0)


def test_nan_rows_are_isolated():
    B, H, T, N, k = 2, 2, 5, 40, 4
    q, keys, values = _inputs(B, H, H, T, N, 16, 8)
    q[0, 1, 2, 5] = NAN                 # one NaN query row: selects the first k slots, its row is NaN
    keys[1, 0, 17, 3] = NAN             # a NaN key row: every query of (b=1, hm=0) selects it
    out, indices, weights, lse = _check_fwd(q, keys, values, k, 0.25)
    assert torch.equal(indices[0, 1, 2], torch.arange(k, device=DEVICE))
    assert torch.isnan(out[0, 1, 2]).all() and torch.isnan(lse[0, 1, 2])
    assert torch.all(indices[1, 0, :, 0] == 17) and torch.isnan(lse[1, 0]).all()
    clean = torch.ones(B, H, T, dtype=torch.bool, device=DEVICE)
    clean[0, 1, 2] = False
    clean[1, 0] = False
    assert torch.isfinite(out[clean]).all() and torch.isfinite(weights[clean]).all()
    assert torch.isfinite(lse[clean]).all()


def test_infinite_scores():
    """An existing slot scoring -inf keeps its index with weight 0; +inf makes its rows NaN."""
    N, D, k = 20, 16, 20
    q = torch.full((1, 1, 3, D), 1e20, device=DEVICE)
    q[0, 0, :, 2] = torch.tensor([0.0, 0.0, 1e10])
    keys = torch.rand(1, 1, N, D, device=DEVICE)
    keys[0, 0, 4, 0] = -1e30            # slot 4 scores -inf (float32 overflow) in every row
    keys[0, 0, 9, 2] = 1e30             # slot 9 scores +inf in row 2 only
    values = _randn(1, 1, N, 4, dtype=torch.float32)
    out, indices, weights, lse = _check_fwd(q, keys, values, k, 1.0)
    assert torch.all(indices[0, 0, :2, -1] == 4) and torch.all(weights[0, 0, :2, -1] == 0)
    assert torch.isfinite(lse[0, 0, :2]).all()
    assert indices[0, 0, 2, 0] == 9 and torch.isnan(lse[0, 0, 2]) and torch.isnan(out[0, 0, 2]).all()


def test_empty_batch_launches_nothing():
    for B, T in ((0, 3), (2, 0)):
        q, keys, values = _inputs(B, 2, 1, T, 9, 8, 4)
        out, indices, weights, lse = _fwd(q, keys, values, 3, 0.5)
        assert out.numel() == 0 and indices.numel() == 0
        grads = _bwd(q, keys, values, indices, weights, 0.5, _cotangents(q, values, 3), False)
        assert all(torch.all(g == 0) for g in grads[1:])


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

# The backward kernels do not depend on the forward path: the backward tests run after the
# forward of each production path (the -small variants select the same indices).
BWD_PATHS = ["stream", *THRESHOLD_DESIGNS]

# (B, H, Hm, T, N, Dk, Dv, k, shared, valid_len)
BWD_CASES = [
    (1, 1, 1, 7, 63, 7, 5, 3, False, None),
    (2, 4, 2, 5, 33, 16, 8, 6, False, [0, 20]),     # grouped, an empty batch element
    (2, 2, 1, 3, 40, 12, 6, 4, True, [2, 40]),      # shared memory: slot grads sum over the batch
    (1, 1, 1, 5, 20, 16, 8, 20, False, None),       # k = N
    (1, 1, 1, 3, 21, 140, 130, 3, False, None),     # feature chunk loops
]


def _bwd_case_id(case):
    return _case_id(case[:9]) + ("" if case[9] is None else f"-vl{'_'.join(map(str, case[9]))}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", BWD_CASES, ids=_bwd_case_id)
@pytest.mark.parametrize("forward_path", BWD_PATHS, indirect=True)
def test_backward_matches_autograd(forward_path, case, deterministic):
    B, H, Hm, T, N, Dk, Dv, k, shared, valid_len = case
    q, keys, values = _inputs(B, H, Hm, T, N, Dk, Dv, shared=shared)
    grads, indices, _, _ = _check_bwd(q, keys, values, k, Dk ** -0.5, valid_len, deterministic)
    # Slots nobody selected get exact zeros.
    lead = keys.shape[:-1]
    touched = torch.zeros(lead.numel(), dtype=torch.bool, device=DEVICE)
    if not shared:
        memory = torch.arange(B * Hm, device=DEVICE).repeat_interleave(H // Hm * T * k).reshape(indices.shape)
    else:
        memory = torch.arange(Hm, device=DEVICE).repeat_interleave(H // Hm * T * k).repeat(B).reshape(indices.shape)
    live = indices >= 0
    touched[(memory * N + indices)[live]] = True
    assert torch.all(grads[1].reshape(-1, Dk)[~touched] == 0)
    assert torch.all(grads[2].reshape(-1, Dv)[~touched] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("forward_path", BWD_PATHS, indirect=True)
def test_backward_half(forward_path, dtype, deterministic):
    q, keys, values = _inputs(1, 2, 1, 4, 30, 24, 10, dtype=dtype)
    _check_bwd(q, keys, values, 5, 24 ** -0.5, None, deterministic)


@pytest.mark.parametrize("forward_path", BWD_PATHS, indirect=True)
def test_backward_nan_row_isolated(forward_path):
    B, H, T, N, k = 1, 1, 5, 24, 3
    q, keys, values = _inputs(B, H, H, T, N, 16, 8)
    q[0, 0, 1, 0] = NAN
    grads, indices, _, _ = _check_bwd(q, keys, values, k, 0.25)
    dq = grads[0]
    assert torch.isnan(dq[0, 0, 1]).all()
    assert torch.isfinite(dq[0, 0, [0, 2, 3, 4]]).all()


@pytest.mark.parametrize("forward_path", BWD_PATHS, indirect=True)
def test_deterministic_is_bitwise_reproducible(forward_path):
    B, H, Hm, T, N, k = 2, 4, 2, 6, 12, 5     # few slots: many entries share each slot
    q, keys, values = _inputs(B, H, Hm, T, N, 16, 8)
    out, indices, weights, lse = _fwd(q, keys, values, k, 0.25)
    cotangents = _cotangents(q, values, k)
    first = _bwd(q, keys, values, indices, weights, 0.25, cotangents, True)
    second = _bwd(q, keys, values, indices, weights, 0.25, cotangents, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = _bwd(q, keys, values, indices, weights, 0.25, cotangents, False)
    for name, a, b in zip(("dq", "dkeys", "dvalues"), atomic, first):
        assert_close(name, a, b, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Threshold paths: which branch ran, fallbacks
# ---------------------------------------------------------------------------------------------

def _small_threshold(monkeypatch, design, cap_factor=SMALL_CAP_FACTOR):
    _use_path(monkeypatch, design + "-small")
    monkeypatch.setattr(topk_triton, "CAP_FACTOR", cap_factor)


@pytest.mark.parametrize("forward_path", ["stream"], indirect=True)
def test_default_path_is_the_registry_default(forward_path, monkeypatch):
    """Without L2M_TOPK_TRITON_PATH the launcher takes the default that l2m_kernels._gpu_status
    records (a design that ran on a GPU), here at a size where each threshold design runs its
    chunk pass with the production tiles."""
    monkeypatch.delenv(topk_triton.PATH_ENV)
    assert topk_triton.DEFAULT_PATH == _gpu_status.default_design(_gpu_status.TOPK_SELECTION, "triton").name
    q, keys, values = _inputs(1, 1, 1, 3, 200, 16, 4)
    _check_fwd(q, keys, values, 4, 0.25)
    assert topk_triton.last_forward_path == topk_triton.DEFAULT_PATH


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("forward_path", SMALL_PATHS, indirect=True)
def test_threshold_chunk_pass_without_fallback(forward_path, monkeypatch, dtype):
    """N > cap and n_chunks >= k: chunk maxima, threshold, compaction and finish, no fallback;
    valid_len 0 and < k (fewer existing chunks than k: tau is INT64_MIN, or -inf) in the same call."""
    design = forward_path.removesuffix("-small")
    q, keys, values = _inputs(3, 2, 1, 21, 300, 24, 6, dtype=dtype)
    for valid_len in (None, [300, 0, 3]):
        _check_fwd(q, keys, values, 4, 24 ** -0.5, valid_len)
        assert topk_triton.last_forward_path == design


@pytest.mark.parametrize("forward_path", SMALL_PATHS, indirect=True)
def test_threshold_fallback_on_overflow(forward_path, monkeypatch):
    """Rows with more candidates than cap are finished by the select kernel (only their blocks), exactly."""
    design = forward_path.removesuffix("-small")
    _small_threshold(monkeypatch, design, cap_factor=1)
    N, D, k = 160, 16, 5
    q = torch.ones(1, 1, 5, D, device=DEVICE)
    values = _randn(1, 1, N, 4, dtype=torch.float32)
    # Every score tied (integer data): every slot scores tau, far more than cap.
    keys = torch.ones(1, 1, N, D, device=DEVICE)
    _check_fwd(q, keys, values, k, 0.5)
    assert topk_triton.last_forward_path == _overflowed(design)
    # A NaN query row ranks every slot like +inf: the same overflow, NaN outputs in that row only.
    q, keys, values = _inputs(1, 2, 1, 4, N, 16, 4)
    q[0, 1, 2, 3] = NAN
    out, indices, _, lse = _check_fwd(q, keys, values, k, 0.25)
    assert topk_triton.last_forward_path == _overflowed(design)
    assert torch.equal(indices[0, 1, 2], torch.arange(k, device=DEVICE)) and torch.isnan(lse[0, 1, 2])
    assert torch.isfinite(lse[0, 0]).all()


@pytest.mark.parametrize("forward_path", SMALL_PATHS, indirect=True)
def test_threshold_sorted_and_clustered_keys(forward_path, monkeypatch):
    """Keys whose neighbours score alike: slots sorted by score put a row's whole top k in one tile,
    and keys of a slowly varying sequence cluster each row's best slots. Both are exact on both
    designs; contiguous chunks (threshold) let tau drop and rows overflow into the fallback,
    strided chunks (threshold-strided) keep them under cap (k + 1 rounds in the top tile)."""
    design = forward_path.removesuffix("-small")
    expected = _overflowed(design) if design == "threshold" else design
    N, D, k = 400, 16, 8
    ramp = torch.arange(N, dtype=torch.float32, device=DEVICE) / N
    keys = (ramp[:, None] + 0.001 * _randn(N, D, dtype=torch.float32)).reshape(1, 1, N, D)
    q = torch.rand(1, 2, 5, D, device=DEVICE) + 0.5
    _check_fwd(q, keys, _randn(1, 1, N, 4, dtype=torch.float32), k, 1.0)
    assert topk_triton.last_forward_path == expected
    gen = torch.Generator().manual_seed(11)
    steps = torch.randn(N, D, generator=gen)
    walk = torch.empty(N, D)
    walk[0] = steps[0]
    for n in range(1, N):               # AR(1), correlation 0.99 between neighbouring slots
        walk[n] = 0.99 * walk[n - 1] + 0.141 * steps[n]
    q = torch.randn(1, 2, 7, D, generator=gen).to(DEVICE)
    _check_fwd(q, walk.reshape(1, 1, N, D).to(DEVICE), _randn(1, 1, N, 4, dtype=torch.float32), k, 0.25)
    assert topk_triton.last_forward_path == expected


@pytest.mark.parametrize("forward_path", ["threshold"], indirect=True)
def test_threshold_few_chunks_and_small_n(forward_path, monkeypatch):
    """threshold: n_chunks < k with N > cap goes straight to the select kernel; N <= cap needs no
    pass 1 (every existing slot a candidate)."""
    q, keys, values = _inputs(1, 2, 2, 5, 100, 16, 4)
    _check_fwd(q, keys, values, 5, 0.25)        # production tiles: 4 chunks < k = 5, cap 64 < N
    assert topk_triton.last_forward_path == "threshold->stream"
    _check_fwd(q, keys[:, :, :50].contiguous(), values[:, :, :50].contiguous(), 4, 0.25)   # N <= cap
    assert topk_triton.last_forward_path == "threshold"
    _small_threshold(monkeypatch, "threshold", cap_factor=1)
    _check_fwd(q, keys, values, 9, 0.25)        # 7 chunks of 16 < k = 9, cap 16 < N
    assert topk_triton.last_forward_path == "threshold->stream"


@pytest.mark.parametrize("forward_path", ["threshold-strided"], indirect=True)
def test_strided_few_chunks_and_small_n(forward_path, monkeypatch):
    """threshold-strided: n_chunks < k or N <= cap goes straight to the select kernel (before any
    launch)."""
    q, keys, values = _inputs(1, 2, 2, 5, 100, 16, 4)
    _check_fwd(q, keys[:, :, :50].contiguous(), values[:, :, :50].contiguous(), 4, 0.25)   # N <= cap
    assert topk_triton.last_forward_path == "threshold-strided->stream"
    q, keys, values = _inputs(1, 2, 2, 5, 300, 16, 4)
    _check_fwd(q, keys, values, 40, 0.25)       # production float32 tiles: 32 chunks < k = 40 (cap 256)
    assert topk_triton.last_forward_path == "threshold-strided->stream"
    _small_threshold(monkeypatch, "threshold-strided", cap_factor=1)
    _check_fwd(q, keys[:, :, :100].contiguous(), values[:, :, :100].contiguous(), 17, 0.25)
    # ^ one group of 7 tiles: 16 chunks < k = 17, cap 32 < N
    assert topk_triton.last_forward_path == "threshold-strided->stream"


@pytest.mark.parametrize("forward_path", SMALL_PATHS, indirect=True)
def test_threshold_infinite_scores_and_nan_key(forward_path, monkeypatch):
    """Chunk path: an existing slot scoring -inf keeps its index with weight 0; a NaN key row is
    selected first by every query of its memory and makes those rows NaN."""
    N, D, k = 200, 16, 8
    q = torch.rand(2, 1, 6, D, device=DEVICE) + 0.5
    keys = torch.rand(2, 1, N, D, device=DEVICE)
    keys[0, 0, 4, 0] = -1e30            # slot 4 of batch 0 scores -inf in every row
    keys[1, 0, 150, 1] = NAN            # slot 150 of batch 1 scores NaN
    values = _randn(2, 1, N, 4, dtype=torch.float32)
    out, indices, weights, lse = _check_fwd(q, keys, values, k, 1.0, valid_len=[6, N])
    assert topk_triton.last_forward_path == forward_path.removesuffix("-small")
    assert torch.all(indices[0, 0, :, 5] == 4) and torch.all(weights[0, 0, :, 5] == 0)
    assert torch.all(indices[0, 0, :, 6:] == -1) and torch.isfinite(lse[0]).all()
    assert torch.all(indices[1, 0, :, 0] == 150) and torch.isnan(lse[1]).all()


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32, marks=pytest.mark.skipif(DEVICE == "cpu", reason="interpreter time; the "
                                                         "float32 tiles run the chunk pass in other tests")),
    torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("forward_path", THRESHOLD_DESIGNS, indirect=True)
def test_threshold_production_tiles(forward_path, dtype):
    """Each threshold design with its production tiles and capacity, at an N where its chunk pass
    runs: exact on random keys and on keys written in sequence (AR(1), correlation 0.99), where
    threshold's contiguous chunks overflow into the fallback and threshold-strided's do not. On a
    GPU this runs the compiled production configurations of both dtypes."""
    B, H, T, N, D, k = 1, 1, 8, 1024, 64, 16     # cap 64; 16 (bfloat16) or 32 (float32) chunks
    q, keys, values = _inputs(B, H, H, T, N, D, 16, dtype=dtype)
    _check_fwd(q, keys, values, k, D ** -0.5)
    assert topk_triton.last_forward_path in (forward_path, _overflowed(forward_path))
    gen = torch.Generator().manual_seed(5)
    walk = torch.empty(H, N, D)
    walk[:, 0] = torch.randn(H, D, generator=gen)
    for n in range(1, N):
        walk[:, n] = 0.99 * walk[:, n - 1] + 0.141 * torch.randn(H, D, generator=gen)
    _check_fwd(q, walk[None].to(dtype).to(DEVICE), values, k, D ** -0.5)
    assert topk_triton.last_forward_path == (_overflowed(forward_path) if forward_path == "threshold" else forward_path)


@pytest.mark.parametrize("forward_path", ["threshold-small"], indirect=True)
def test_unknown_path_is_refused(forward_path, monkeypatch):
    monkeypatch.setenv(topk_triton.PATH_ENV, "bogus")
    q, keys, values = _inputs(1, 1, 1, 2, 9, 8, 4)
    with pytest.raises(ValueError, match=topk_triton.PATH_ENV):
        _fwd(q, keys, values, 3, 0.5)


# ---------------------------------------------------------------------------------------------
# Threshold paths: the chunk maxima, the threshold and the collect kernels' candidates
# ---------------------------------------------------------------------------------------------

# (B, H, Hm, T, N, Dk, Dv, k, valid_len)
THRESHOLD_CASES = [
    (1, 2, 1, 7, 300, 7, 5, 3, None),           # odd sizes, partial last chunk
    (3, 2, 1, 5, 200, 16, 6, 6, [200, 4, 0]),   # valid_len < k and 0 (every existing slot a candidate)
    (1, 1, 1, 5, 40, 16, 8, 40, None),          # k = N (N <= cap)
    (1, 1, 1, 4, 150, 16, 8, 16, None),         # cap 32; k = n_chunks (strided), k > n_chunks (threshold)
    (2, 4, 2, 3, 130, 12, 6, 5, None),          # grouped heads
]


def _threshold_case_id(case):
    return _case_id((*case[:8], False)) + ("" if case[8] is None else f"-vl{'_'.join(map(str, case[8]))}")


@pytest.mark.parametrize("case", THRESHOLD_CASES, ids=_threshold_case_id)
@pytest.mark.parametrize("forward_path", SMALL_PATHS, indirect=True)
def test_threshold_cases_match_reference(forward_path, case):
    B, H, Hm, T, N, Dk, Dv, k, valid_len = case
    design = forward_path.removesuffix("-small")
    q, keys, values = _inputs(B, H, Hm, T, N, Dk, Dv)
    _check_fwd(q, keys, values, k, Dk ** -0.5, valid_len)
    cap = topk_triton.threshold_capacity(k)
    if design == "threshold":   # one-tile chunks; N <= cap collects every slot without a chunk pass
        starts = N <= cap or -(-N // SMALL_TILE.block_n) >= k
    else:                       # strided chunks; N <= cap is left to the select kernel
        n_chunks = topk_triton.chunk_groups(N, SMALL_TILE.block_n)[1] * SMALL_TILE.block_n
        starts = N > cap and n_chunks >= k
    if starts:   # the collect kernel ran (rows may overflow: k * BLOCK_N > cap)
        assert topk_triton.last_forward_path in (design, _overflowed(design))
    else:
        assert topk_triton.last_forward_path == f"{design}->stream"


def _record(monkeypatch, name, *positions):
    """Wrap kernel ``name`` so each launch's arguments at ``positions`` are kept (after it ran)."""
    launches = []
    kernel = getattr(topk_triton, name)

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernel[grid](*args, **kwargs)
                launches.append(tuple(args[i].clone() if torch.is_tensor(args[i]) else args[i] for i in positions))
            return launch

    monkeypatch.setattr(topk_triton, name, Recorded())
    return launches


def _record_collect(monkeypatch, kernel):
    """Each launch of collect kernel ``kernel``: (tau, cand, count)."""
    return _record(monkeypatch, kernel, 3, 4, 5)


def _integer_inputs(B, H, T, N, D, dtype, seed, low=-3, high=3):
    """Small-integer q and shared-head keys (in [low, high]): every score is exact whatever the
    summation order."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(low, high + 1, (B, H, T, D), generator=gen).to(dtype).to(DEVICE)
    keys = torch.randint(low, high + 1, (B, 1, N, D), generator=gen).to(dtype).to(DEVICE)
    scores = torch.einsum("bhtd,bnd->bhtn", q.double().cpu(), keys[:, 0].double().cpu()).reshape(B * H * T, N)
    return q, keys, _randn(B, 1, N, 4, dtype=dtype), scores


def _decode(keys):
    """(score, slot) of int64 sort keys (the inverse of the kernels' encoding), on the host."""
    high = (keys >> 32).to(torch.int32)
    bits = torch.where(high < 0, high ^ (2**31 - 1), high)
    return bits.view(torch.float32), (2**31 - 1) - (keys & (2**31 - 1))


def _chunk_maxima(scores, valid_len, rows_per_batch, block_n, group_tiles, n_groups):
    """Brute-force chunk maxima: chunk g * block_n + j = max over slots (g * group_tiles + i) *
    block_n + j that exist; -inf for none."""
    rows, N = scores.shape
    exists = torch.arange(N)[None, :] < torch.tensor(valid_len).repeat_interleave(rows_per_batch)[:, None]
    padded = torch.nn.functional.pad(scores.masked_fill(~exists, float("-inf")),
                                     (0, n_groups * group_tiles * block_n - N), value=float("-inf"))
    return padded.reshape(rows, n_groups, group_tiles, block_n).amax(2).reshape(rows, n_groups * block_n)


def _encode(scores, slots):
    """int64 sort keys of float32 ``scores`` at ``slots`` (the kernels' encoding), on the host."""
    bits = torch.where(scores == 0, 0.0, scores).to(torch.float32).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ (2**31 - 1), bits).to(torch.int64)
    return (ordered << 32) | ((2**31 - 1) - slots)


@pytest.mark.parametrize("low", [-3, 0], ids=["range7", "binary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("forward_path", ["threshold-small"], indirect=True)
def test_contiguous_collect_takes_exactly_the_keys_above_tau(forward_path, monkeypatch, dtype, low):
    """threshold. Small-integer data, so every score is exact whatever the summation order: the
    chunk maxima are exactly each one-tile chunk's largest key (INT64_MIN past valid_len), tau
    exactly their k-th largest, and each row's candidates exactly its existing keys >= tau, in slot
    order, the first cap of them, with the full count even past cap (0/1 data: many ties, some
    rows overflow)."""
    _small_threshold(monkeypatch, "threshold", cap_factor=1)
    chunk_launches = _record(monkeypatch, "topk_read_fwd_chunkmax_kernel", 3, 11)
    launches = _record_collect(monkeypatch, "topk_read_fwd_collect_kernel")
    B, H, T, N, D, k = 2, 2, 9, 197, 8, 5
    q, keys, values, scores = _integer_inputs(B, H, T, N, D, dtype, seed=7, low=low, high=min(3, low + 1))
    valid_len = [N, 150]
    _check_fwd(q, keys, values, k, 1.0, valid_len)
    (chunk_max, n_chunks), = chunk_launches
    (tau, cand, count), = launches
    tile = SMALL_TILE.block_n
    assert n_chunks == -(-N // tile)
    exists = torch.arange(N)[None, :] < torch.tensor(valid_len).repeat_interleave(H * T)[:, None]
    keys_host = torch.where(exists, _encode(scores.float(), torch.arange(N)), -(2**63))
    padded = torch.nn.functional.pad(keys_host, (0, n_chunks * tile - N), value=-(2**63))
    expected_max = padded.reshape(B * H * T, n_chunks, tile).amax(-1)
    assert torch.equal(chunk_max.cpu(), expected_max)
    assert torch.equal(tau.cpu(), expected_max.topk(k, dim=1).values[:, -1])
    cap = cand.shape[1]
    taken = (keys_host >= tau.cpu()[:, None]) & exists
    count, cand = count.cpu(), cand.cpu()
    overflowed = 0
    for row in range(B * H * T):
        expected = keys_host[row][taken[row]]
        assert int(count[row]) == len(expected), f"row {row}"
        assert torch.equal(cand[row, :min(len(expected), cap)], expected[:cap]), f"row {row}"
        overflowed += len(expected) > cap
    # 0/1 data: some rows overflow (3 of 36), their counts exact past cap.
    assert low < 0 or overflowed >= 1


@pytest.mark.parametrize("low,batch", [(-3, 2), (0, 2), (0, 1), (0, 4)],
                         ids=["range7", "binary", "binary-batch1", "binary-batch4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("forward_path", ["threshold-strided-small"], indirect=True)
def test_strided_collect_takes_exactly_the_scores_above_tau(forward_path, monkeypatch, dtype, low, batch):
    """threshold-strided. Small-integer data, so every score is exact whatever the summation order:
    the chunk maxima are exactly the strided chunks' maxima, tau exactly their k-th largest, and each row's
    candidates exactly its existing slots scoring >= tau, with their exact scores, however many
    sit in one tile; a row with more than cap of them stops at cap + 1 (the fallback's signal):
    with 0/1 data most scores tie, and about half the rows do. Several stores per tile (up to 12
    keys of a row in one tile, COLLECT_BATCH keys per store), down to one store per round."""
    _small_threshold(monkeypatch, "threshold-strided", cap_factor=1)
    monkeypatch.setattr(topk_triton, "COLLECT_BATCH", batch)
    chunk_launches = _record(monkeypatch, "topk_read_fwd_strided_chunkmax_kernel", 3, 11, 12)
    launches = _record_collect(monkeypatch, "topk_read_fwd_strided_collect_kernel")
    B, H, T, N, D, k = 2, 2, 9, 197, 8, 5
    q, keys, values, scores = _integer_inputs(B, H, T, N, D, dtype, seed=7, low=low, high=min(3, low + 1))
    valid_len = [N, 150]
    _check_fwd(q, keys, values, k, 1.0, valid_len)
    (chunk_max, group_tiles, n_groups), = chunk_launches
    (tau, cand, count), = launches
    expected_max = _chunk_maxima(scores, valid_len, H * T, SMALL_TILE.block_n, group_tiles, n_groups)
    assert torch.equal(chunk_max.cpu().double(), expected_max)
    assert torch.equal(tau.cpu().double(), expected_max.topk(k, dim=1).values[:, -1])
    cap, tile = cand.shape[1], SMALL_TILE.block_n
    exists = torch.arange(N)[None, :] < torch.tensor(valid_len).repeat_interleave(H * T)[:, None]
    taken = (scores >= tau.double().cpu()[:, None]) & exists
    per_tile = torch.nn.functional.pad(taken, (0, -N % tile)).reshape(B * H * T, -1, tile).sum(-1)
    count, cand = count.cpu(), cand.cpu()
    checked = overflowed = 0
    for row in range(B * H * T):
        expected = taken[row].nonzero().flatten()
        if len(expected) > cap:
            assert int(count[row]) == cap + 1, f"row {row}"
            overflowed += 1
            continue
        assert int(count[row]) == len(expected), f"row {row}"
        got_score, got_slot = _decode(cand[row, :len(expected)])
        order = got_slot.argsort()
        assert torch.equal(got_slot[order], expected), f"row {row}"
        assert torch.equal(got_score[order].double(), scores[row, expected]), f"row {row}"
        checked += 1
    # Several rounds in some tile (many with 0/1 data).
    assert int(per_tile.max()) >= (2 if low < 0 else 8)
    # 0/1 data: about half the rows overflow (17 of 36), the rest are checked exactly.
    assert checked >= B * H * T // 4 and (low < 0 or overflowed >= B * H * T // 4)


@pytest.mark.parametrize("forward_path", ["threshold-strided-small"], indirect=True)
def test_chunk_groups_past_max_chunks(forward_path, monkeypatch):
    """Past MAX_CHUNKS, groups take more tiles: 63 tiles of 16 slots, at most 48 chunks -> groups
    of 21 tiles (not 16); each stored maximum is exactly its strided chunk's, -inf past valid_len
    (an end inside the first group, inside a tile, and 0), and the read is exact."""
    monkeypatch.setattr(topk_triton, "MAX_CHUNKS", 48)
    chunk_launches = _record(monkeypatch, "topk_read_fwd_strided_chunkmax_kernel", 3, 11, 12)
    B, H, T, N, D, k = 4, 1, 3, 1000, 8, 4
    q, keys, values, scores = _integer_inputs(B, H, T, N, D, torch.float32, seed=3)
    valid_len = [N, 70, 0, 997]
    _check_fwd(q, keys, values, k, 1.0, valid_len)
    (chunk_max, group_tiles, n_groups), = chunk_launches
    assert (group_tiles, n_groups) == (21, 3) == topk_triton.chunk_groups(N, SMALL_TILE.block_n)
    expected = _chunk_maxima(scores, valid_len, H * T, SMALL_TILE.block_n, group_tiles, n_groups)
    assert torch.equal(chunk_max.cpu().double(), expected)


@pytest.mark.parametrize("n_chunks,k", [(37, 1), (37, 37), (256, 32), (1000, 17)])
@pytest.mark.parametrize("forward_path", ["threshold-strided"], indirect=True)
def test_kth_kernel_matches_torch_topk(forward_path, n_chunks, k):
    """threshold-strided: the k-th largest chunk maximum, bitwise equal to torch.topk's, with duplicates,
    +-inf and signed zeros among the values."""
    R = 9
    gen = torch.Generator().manual_seed(n_chunks + k)
    chunk_max = torch.randn(R, n_chunks, generator=gen)
    chunk_max[0] = torch.randint(-2, 3, (n_chunks,), generator=gen).float()   # many duplicates
    chunk_max[1, ::3] = float("-inf")
    chunk_max[2, ::5] = float("inf")
    chunk_max[3] = float("-inf")
    chunk_max[4, ::2] = -0.0
    chunk_max[4, 1::2] = 0.0
    chunk_max[5] *= 1e-40                                                       # subnormals
    chunk_max = chunk_max.to(DEVICE)
    tau = torch.full((R,), NAN, device=DEVICE)
    constexprs, num_warps = topk_triton._kth_constexprs(n_chunks)
    topk_triton.topk_read_fwd_kth_kernel[(triton.cdiv(R, constexprs["BLOCK_T"]),)](
        chunk_max, tau, R, n_chunks, k, **constexprs, num_warps=num_warps)
    expected = torch.topk(chunk_max, k, dim=1).values[:, k - 1]
    # Bitwise, except that a -0.0 / +0.0 answer may come back with either sign (they tie).
    same = (tau.view(torch.int32) == expected.view(torch.int32)) | ((tau == 0) & (expected == 0))
    assert same.all(), f"{tau}\nvs\n{expected}"


@pytest.mark.parametrize("forward_path", ["threshold-strided"], indirect=True)
def test_strided_chunks_keep_clustered_rows_under_cap(forward_path):
    """tools/topk_threshold_sim.py at read-heads-gpu's N: with keys written in sequence
    (AR(1), correlation 0.99), contiguous one-tile chunks put every row over cap (all fall back);
    the strided chunks of chunk_groups keep them near k, as for random keys."""
    from tools import topk_threshold_sim as sim
    stats = sim.simulate(16384, 0.99, 128, torch.Generator().manual_seed(0))
    assert stats["contiguous"]["over_cap"] > 0.9
    assert stats["strided"]["over_cap"] == 0 and stats["strided"]["mean"] < 1.5 * sim.K
