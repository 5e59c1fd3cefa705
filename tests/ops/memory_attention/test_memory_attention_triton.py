"""Triton fused memory attention launchers against the float64 reference, on CUDA when present, else
under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).

Calls ``memory_attention_fwd`` / ``memory_attention_bwd`` directly (their outputs NaN-poisoned by the
conftest fixture) with the production tiles and with small tiles (``tiles`` fixture), so that tiny
shapes cross query and key tile boundaries, the window's lower edge, the unmasked middle range and
the grouped-head loop of the dk/dv kernel. Every output and gradient is compared with the float64
reference evaluated at the selection (``memory_attention_gather``); the selection itself must equal
the reference's at the input dtype.
"""

import pytest
import torch

pytest.importorskip("triton")

from l2m_kernels.ops._triton_lib import block_d  # noqa: E402
from l2m_kernels.ops.memory_attention import triton as ma_triton  # noqa: E402
from l2m_kernels.ops.memory_attention.reference import memory_attention_gather, memory_attention_ref  # noqa: E402
from l2m_kernels.ops.topk_read.reference import topk_read_select  # noqa: E402
from l2m_kernels.testing import assert_close  # noqa: E402
from .._triton import DEVICE, INTERPRETER_WARNINGS, skip_module_unless_interpreted  # noqa: E402

skip_module_unless_interpreted(ma_triton, "memory_attention_fwd_kernel")
pytestmark = INTERPRETER_WARNINGS

Tile = ma_triton.Tile
# Tile sets: the production table; 16 x 16 everywhere; and tiles that differ between the kernels
# (the forward / dq walk keys in tiles of 16 / 32 for 32 / 16 queries, dk/dv keys of 32 for
# queries of 16), with the inf/NaN fix-up taking fewer rows than a forward block.
SMALL = {"fwd": Tile(16, 16, 4, 1), "dkdv": Tile(16, 16, 4, 1), "dq": Tile(16, 16, 4, 1),
         "nonfinite": Tile(16, 0, 4, 1)}
MIXED = {"fwd": Tile(32, 16, 4, 1), "dkdv": Tile(16, 32, 4, 1), "dq": Tile(16, 32, 4, 1),
         "nonfinite": Tile(16, 0, 4, 1)}
TILE_SETS = {"production": None, "small": SMALL, "mixed": MIXED}


def _use_tiles(monkeypatch, tiles):
    if tiles is None:
        return
    for table, name in ((ma_triton._FWD_TILES, "fwd"), (ma_triton._DKDV_TILES, "dkdv"),
                        (ma_triton._DQ_TILES, "dq")):
        for key in list(table):
            monkeypatch.setitem(table, key, tiles[name])
    monkeypatch.setattr(ma_triton, "NONFINITE_TILE", tiles["nonfinite"])


@pytest.fixture(params=list(TILE_SETS))
def tiles(request, monkeypatch):
    _use_tiles(monkeypatch, TILE_SETS[request.param])
    return request.param


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def _inputs(B, H, Hkv, Hm, T, S, D, Dv, N, dtype, shared=False, gate_shape=None):
    lead = (Hm, N) if shared else (B, Hm, N)
    tensors = dict(q=_randn(B, H, T, D, dtype=dtype), k=_randn(B, Hkv, S, D, dtype=dtype),
                   v=_randn(B, Hkv, S, Dv, dtype=dtype), mem_keys=_randn(*lead, D, dtype=dtype),
                   mem_values=_randn(*lead, Dv, dtype=dtype))
    tensors["gate"] = None if gate_shape is None else _randn(*gate_shape, dtype=dtype, scale=2.0)
    return tensors


def _fwd(t, topk, window, merge, valid_len=None, deterministic=False):
    scale = t["q"].shape[-1] ** -0.5
    vl = None if valid_len is None else torch.tensor(valid_len, dtype=torch.int64, device=DEVICE)
    return ma_triton.memory_attention_fwd(t["q"], t["k"], t["v"], t["mem_keys"], t["mem_values"], topk, window,
                                          merge, t["gate"], scale, vl, deterministic)


def _bwd(t, fwd_out, cotangents, window, merge, deterministic=False):
    out, lse_local, lse_mem, indices = fwd_out
    scale = t["q"].shape[-1] ** -0.5
    dout, dlse_local, dlse_mem = cotangents
    return ma_triton.memory_attention_bwd(dout, dlse_local, dlse_mem, t["q"], t["k"], t["v"], t["mem_keys"],
                                          t["mem_values"], indices, out, lse_local, lse_mem, window, merge,
                                          t["gate"], scale, deterministic)


def _cotangents(t, lse_only=False):
    B, H, T, _ = t["q"].shape
    dout = _randn(B, H, T, t["v"].shape[-1], dtype=t["q"].dtype)
    if lse_only:
        dout = torch.zeros_like(dout)
    return dout, _randn(B, H, T, dtype=torch.float32), _randn(B, H, T, dtype=torch.float32)


def _check(t, topk, window, merge, valid_len=None, deterministic=False, lse_only=False):
    """Forward and backward against the float64 reference; returns (forward outputs, gradients)."""
    dtype = t["q"].dtype
    scale = t["q"].shape[-1] ** -0.5
    res = _fwd(t, topk, window, merge, valid_len, deterministic)
    out, lse_local, lse_mem, indices = res
    B, H, T, _ = t["q"].shape
    assert out.shape == (B, H, T, t["v"].shape[-1]) and out.dtype == dtype
    assert lse_local.dtype == lse_mem.dtype == torch.float32 and lse_local.shape == lse_mem.shape == (B, H, T)
    vl = None if valid_len is None else torch.tensor(valid_len, dtype=torch.int64, device=DEVICE)
    expected_indices = topk_read_select(t["q"], t["mem_keys"], topk, scale, vl)
    assert torch.equal(indices, expected_indices), "indices differ from the reference selection"

    names = [n for n in ("q", "k", "v", "mem_keys", "mem_values", "gate") if t[n] is not None]
    leaves = {n: t[n].detach().double().requires_grad_() for n in names}
    ref = memory_attention_gather(leaves["q"], leaves["k"], leaves["v"], leaves["mem_keys"], leaves["mem_values"],
                                  indices, window, merge, leaves.get("gate"), scale)
    for name, got, want in zip(("out", "lse_local", "lse_mem"), res[:3], ref):
        assert_close(name, got, want, dtype=dtype)

    cotangents = _cotangents(t, lse_only)
    grads = _bwd(t, res, cotangents, window, merge, deterministic)
    ref_grads = torch.autograd.grad(ref, [leaves[n] for n in names], [c.double() for c in cotangents])
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad.shape == t[name].shape and grad.dtype == t[name].dtype, name
        assert_close("d" + name, grad, ref_grad, dtype=dtype)
    if t["gate"] is None:
        assert grads[5].numel() == 0
    return res, grads


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------

# (B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, merge, gate shape, shared, valid_len)
CASES = [
    # Windows around the 16 / 32 tile sizes: 1, 15, 16, 17, 33, 60 (unmasked dk/dv blocks), none.
    (1, 2, 1, 1, 70, 70, 16, 16, 40, 4, 17, "joint", None, False, None),
    (1, 2, 2, 2, 37, 70, 24, 40, 50, 5, 1, "joint", None, False, None),
    (1, 2, 1, 2, 45, 64, 16, 8, 33, 3, 15, "gate", (2, 1, 1), False, None),
    (2, 2, 1, 1, 20, 50, 16, 16, 24, 4, 16, "joint", None, True, [24, 5]),
    (1, 4, 2, 1, 33, 66, 8, 16, 30, 6, 33, "gate", (1, 4, 33, 1), True, None),
    (1, 2, 1, 1, 48, 64, 16, 16, 20, 2, 60, "joint", None, False, None),
    (1, 4, 1, 2, 40, 70, 16, 24, 64, 8, None, "gate", (), False, None),
    (2, 2, 2, 1, 5, 50, 32, 16, 20, 20, None, "joint", None, False, [20, 0]),  # S >> T, topk = N, empty memory
]


def _case_id(case):
    B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, merge, gate_shape, shared, valid_len = case
    return (f"B{B}H{H}Hkv{Hkv}Hm{Hm}T{T}S{S}D{D}Dv{Dv}N{N}k{topk}w{window}-{merge}"
            f"{'' if gate_shape is None else 'g' + 'x'.join(map(str, gate_shape))}"
            f"{'-shared' if shared else ''}{'-vl' if valid_len else ''}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_float32(case, tiles):
    B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, merge, gate_shape, shared, valid_len = case
    t = _inputs(B, H, Hkv, Hm, T, S, D, Dv, N, torch.float32, shared, gate_shape)
    _check(t, topk, window, merge, valid_len)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_matches_reference_half(dtype, merge, tiles):
    gate_shape = (1, 2, 50, 1) if merge == "gate" else None
    t = _inputs(1, 2, 1, 2, 50, 66, 16, 24, 40, dtype, False, gate_shape)
    _check(t, 4, 20, merge)


@pytest.mark.parametrize("merge", ["joint", "gate"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gradients_through_lse_only(merge, deterministic, tiles):
    # dout = 0: every gradient comes from dlse_local and dlse_mem.
    gate_shape = (2, 1, 1) if merge == "gate" else None
    t = _inputs(1, 2, 1, 1, 40, 56, 16, 16, 30, torch.float32, False, gate_shape)
    _check(t, 4, 9, merge, deterministic=deterministic, lse_only=True)


# 16-bit head sizes whose rows are not 16-byte aligned run at the tile width with zero columns
# (a Triton 3.6 fault on an H200 at float16 D = 33); the gradients come back at the caller's D.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [7, 33])
def test_half_unaligned_head_dim_runs_padded(dtype, D):
    assert ma_triton._padded_head_dim(D, dtype) == block_d(D) > D
    assert ma_triton._padded_head_dim(D, torch.float32) == D
    assert ma_triton._padded_head_dim(40, dtype) == 40
    t = _inputs(2, 2, 2, 1, 13, 25, D, 7, 6, dtype, False, (2, 2, 13, 1))
    _, grads = _check(t, 6, None, "gate")
    assert all(g.is_contiguous() for g in grads)


# Production tiles of every (float32 dot, padded head size) row: D / Dv that pick each BLOCK size,
# non-powers of two padded and masked. float16 takes the tensor-core path (bfloat16 upcasts under
# the interpreter), float32 the ieee one.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("D,Dv", [(16, 16), (24, 32), (64, 48), (72, 128)])
def test_production_launch_configs(dtype, D, Dv):
    config = ma_triton.launch_config(D, Dv, dtype)
    assert config.block_d >= max(D, 16) and config.block_dv >= max(Dv, 16)
    t = _inputs(1, 2, 1, 1, 40, 60, D, Dv, 24, dtype, False, None)
    _check(t, 3, 25, "joint")


# ---------------------------------------------------------------------------------------------
# Determinism, inf/NaN context values, edge cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_deterministic_backward_is_bitwise_repeatable(merge, monkeypatch):
    _use_tiles(monkeypatch, SMALL)
    # A shared memory of 6 slots read by every query (topk = 5): every slot collects many entries.
    gate_shape = (1, 4, 1, 1) if merge == "gate" else None
    t = _inputs(2, 4, 2, 2, 24, 30, 16, 16, 6, torch.float32, True, gate_shape)
    res = _fwd(t, 5, 12, merge, deterministic=True)
    cotangents = _cotangents(t)
    first = _bwd(t, res, cotangents, 12, merge, deterministic=True)
    second = _bwd(t, res, cotangents, 12, merge, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = _bwd(t, res, cotangents, 12, merge, deterministic=False)
    for a, b in zip(first, atomic):
        assert_close("deterministic vs atomic", a, b, dtype=torch.float32)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("window", [None, 7])
def test_nonfinite_values_reach_only_queries_that_see_them(bad, window, tiles):
    # A masked (diagonal or window-edge) tile holds each bad value for queries that do not see it.
    T, S = 40, 50
    t = _inputs(1, 2, 1, 1, T, S, 16, 16, 20, torch.float32, False, None)
    clean = _fwd(t, 3, window, "joint")
    for position, column in ((S - 1, 3), (S - T + 20, 5)):
        t["v"][0, 0, position, column] = bad
    res = _fwd(t, 3, window, "joint")
    ref = memory_attention_ref(t["q"].cpu(), t["k"].cpu(), t["v"].cpu(), t["mem_keys"].cpu(),
                               t["mem_values"].cpu(), 3, window=window)
    out, ref_out = res[0].cpu(), ref[0]
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out))
    assert torch.equal(torch.isinf(out), torch.isinf(ref_out))
    assert torch.equal(out[torch.isinf(out)], ref_out[torch.isinf(ref_out)])
    finite = torch.isfinite(ref_out).all(-1)
    assert (~finite).any() and finite.any()
    # Rows that see no bad value are bitwise those of the clean run.
    assert torch.equal(out[finite], clean[0].cpu()[finite])
    assert torch.equal(res[1], clean[1])


def test_empty_query_batch():
    t = _inputs(2, 2, 1, 1, 0, 9, 16, 16, 12, torch.float32, False, (2, 1, 1))
    res = _fwd(t, 3, 4, "gate")
    assert [tuple(x.shape) for x in res] == [(2, 2, 0, 16), (2, 2, 0), (2, 2, 0), (2, 2, 0, 3)]
    B, H, T, Dv = res[0].shape
    cotangents = (torch.zeros(B, H, T, Dv, device=DEVICE), torch.zeros(B, H, T, device=DEVICE),
                  torch.zeros(B, H, T, device=DEVICE))
    grads = _bwd(t, res, cotangents, 4, "gate")
    for name, grad in zip(("q", "k", "v", "mem_keys", "mem_values", "gate"), grads):
        assert grad.shape == t[name].shape
        assert not grad.any(), name


def test_public_op_uses_triton_and_matches_reference():
    import l2m_kernels as l2m

    t = _inputs(1, 2, 1, 1, 24, 30, 16, 16, 20, torch.float32, False, (2, 1, 1))
    leaves = {n: x.clone().requires_grad_() for n, x in t.items()}
    got = l2m.memory_attention(leaves["q"], leaves["k"], leaves["v"], leaves["mem_keys"], leaves["mem_values"], 4,
                               window=6, merge="gate", gate=leaves["gate"], backend="triton")
    ref_leaves = {n: x.detach().double().requires_grad_() for n, x in t.items()}
    want = memory_attention_ref(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], ref_leaves["mem_keys"],
                                ref_leaves["mem_values"], 4, window=6, merge="gate", gate=ref_leaves["gate"])
    assert torch.equal(got.indices, want[3])
    assert_close("out", got.out, want[0], dtype=torch.float32)
    (got.out.sum() + got.lse_local.sum() + got.lse_mem.sum()).backward()
    (want[0].sum() + want[1].sum() + want[2].sum()).backward()
    for name in t:
        assert_close("d" + name, leaves[name].grad, ref_leaves[name].grad, dtype=torch.float32)


def test_compile_configs_cover_every_kernel():
    kernels = {config["kernel"] for config in ma_triton.COMPILE_CONFIGS}
    assert kernels == set(ma_triton._KERNEL_ARGS)
    for config in ma_triton.COMPILE_CONFIGS:
        assert config["constexprs"]["BLOCK_D"] in (64, 128)
        assert config["options"]["num_stages"] >= 1


@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_opcheck_triton_backend(merge):
    # Schema, fake kernel, autograd registration and aot dispatch of the custom op on this backend.
    import l2m_kernels  # noqa: F401  (registers torch.ops.l2m)

    t = _inputs(1, 2, 1, 2, 9, 12, 16, 16, 10, torch.float32, merge == "joint", None)
    for x in t.values():
        if x is not None:
            x.requires_grad_()
    gate = _randn(2, 1, 1, dtype=torch.float32).requires_grad_() if merge == "gate" else None
    args = (t["q"], t["k"], t["v"], t["mem_keys"], t["mem_values"], 3, 5, merge, gate, 0.25,
            torch.tensor([7], device=DEVICE), False, "triton")
    torch.library.opcheck(torch.ops.l2m.memory_attention.default, args)
