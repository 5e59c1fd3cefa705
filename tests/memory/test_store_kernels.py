"""The CPU kernels of MemoryStore reads against their brute-force references: the exact top-k over
int8 keys (VNNI filter + exact rescoring) and the top-k within per-row block lists (indices
identical, scores the float64 scores rounded to float32; ties, NaN, missing entries, odd sizes,
strided keys, and thread counts); and the read of a selection, whose values are dequantised in
the kernel (every storage format, against the PyTorch reference)."""
import pytest
import torch

from l2m_kernels import _ext
from l2m_kernels.memory import formats
from l2m_kernels.memory.read import (block_candidates_ref, exact_topk_ref, topk_values_read,
                                     topk_values_read_ref)

ext = _ext.cpu_extension()
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "_store_int8_topk"),
                                reason=f"the CPU extension with the store kernels is not built: "
                                       f"{_ext.cpu_extension_error()}")


def _int8(shape, gen):
    return torch.clamp(torch.round(torch.randn(shape, generator=gen) * 30), -127, 127).to(torch.int8)


def _check(got, ref):
    """Identical slots; scores equal up to the last bit of the float64 sums' association."""
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-30, equal_nan=True)


def _run_int8(q, keys, k):
    wide = keys.int()
    return ext._store_int8_topk(q, keys, wide.abs().sum(-1, dtype=torch.int32).contiguous(),
                                wide.sum(-1, dtype=torch.int32).contiguous(), k)


@pytest.mark.parametrize("H,R,N,D", [(1, 1, 1, 1), (1, 3, 7, 3), (3, 17, 1000, 5), (1, 300, 4099, 64),
                                     (2, 33, 999, 65), (1, 5, 300, 130), (1, 64, 2048, 63)])
@pytest.mark.parametrize("k", [1, 5, 256])
def test_int8_topk_matches_brute_force(H, R, N, D, k):
    gen = torch.Generator().manual_seed(H * 1000 + R + N + D + k)
    q = torch.randn(H, R, D, generator=gen) * 0.01
    keys = _int8((H, N, D), gen)
    _check(_run_int8(q, keys, k), exact_topk_ref(q, keys, k))


def test_int8_topk_ties_nan_zero_rows_and_strides():
    gen = torch.Generator().manual_seed(5)
    H, R, N, D = 2, 40, 777, 24
    buffer = _int8((H + 1, N + 5, D + 8), gen)
    keys = buffer[1:, 3:3 + N, 4:4 + D]  # head and slot strides with gaps
    keys[:, 100:140] = keys[:, 10:11]    # repeated identical keys: ties
    q = torch.randn(H, R, D, generator=gen) * 0.02
    q[0, 1] = 0.0                        # every score 0: the first k slots
    q[1, 2, 3] = float("nan")            # NaN ranks first, smaller slot first
    q[0, 4, 0] = float("inf")
    q[1, 5] = keys[1, 10].float() * 0.01  # a query on the repeated key
    for k in (1, 8, 64, N, N + 9):
        _check(_run_int8(q, keys, k), exact_topk_ref(q, keys, k))


def test_int8_topk_is_thread_count_independent():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 513, 64, generator=gen)
    keys = _int8((1, 5000, 64), gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_int8(q, keys, 32)
        torch.set_num_threads(max(2, threads))
        many = _run_int8(q, keys, 32)
    finally:
        torch.set_num_threads(threads)
    _check(one, many)


def _blocks_case(H, R, U, S, D, KB, gen, int8):
    keys = _int8((U, H, S, D), gen) if int8 else torch.randn(U, H, S, D, generator=gen)
    order = torch.randperm(U, generator=gen)
    block_slot = order * S + 5                                     # distinct, non-overlapping
    block_len = torch.randint(0, S + 1, (U,), generator=gen)
    block_len[0] = S
    choice = torch.stack([torch.randperm(U, generator=gen)[:KB] for _ in range(H * R)]).view(H, R, KB)
    choice = choice[torch.arange(H)[:, None, None], torch.arange(R)[None, :, None],
                    torch.argsort(block_slot[choice], dim=-1)]     # increasing slot order
    if KB > 1:
        choice[0, 0, -1] = -1
    q = torch.randn(H, R, D, generator=gen) * (0.01 if int8 else 1.0)
    return q, keys, choice.contiguous(), block_slot, block_len


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("H,R,U,S,D,KB,k", [(1, 1, 1, 1, 1, 1, 1), (2, 9, 7, 5, 3, 3, 4),
                                            (1, 40, 30, 64, 64, 8, 32), (3, 5, 12, 16, 33, 12, 200)])
def test_block_candidates_match_brute_force(int8, H, R, U, S, D, KB, k):
    gen = torch.Generator().manual_seed(R + U + S + D)
    args = _blocks_case(H, R, U, S, D, KB, gen, int8)
    _check(ext._store_block_candidates_topk(*args, k), block_candidates_ref(*args, k))


def test_block_candidates_ties_and_nan():
    gen = torch.Generator().manual_seed(8)
    q, keys, blocks, slot, length = _blocks_case(1, 6, 8, 16, 8, 4, gen, False)
    keys[:, :, 3:9] = keys[:, :, 2:3]
    q[0, 1, 2] = float("nan")
    _check(ext._store_block_candidates_topk(q, keys, blocks, slot, length, 10),
           block_candidates_ref(q, keys, blocks, slot, length, 10))


def test_block_candidates_refuse_bad_ids():
    gen = torch.Generator().manual_seed(9)
    q, keys, blocks, slot, length = _blocks_case(1, 3, 4, 8, 8, 2, gen, False)
    blocks[0, 0, 0] = 4
    with pytest.raises(ValueError, match="block id"):
        ext._store_block_candidates_topk(q, keys, blocks, slot, length, 3)
    blocks[0, 0, 0] = 0
    length[1] = 9
    with pytest.raises(ValueError, match="length"):
        ext._store_block_candidates_topk(q, keys, blocks, slot, length, 3)


def test_int8_topk_computes_key_sums_and_refuses_minus_128():
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(2, 9, 64, generator=gen)
    keys = _int8((2, 300, 64), gen)
    keys[1, 5, 7] = 127
    assert all(torch.equal(a, b) for a, b in zip(ext._store_int8_topk(q, keys, None, None, 7),
                                                  _run_int8(q, keys, 7)))
    keys[1, 17, 3] = -128
    with pytest.raises(ValueError, match="-128"):
        ext._store_int8_topk(q, keys, None, None, 7)


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16", "float64", "int8", "float8"])
@pytest.mark.parametrize("H,R,k,N,Dv", [(2, 37, 5, 50, 33), (1, 8, 1, 1, 1), (3, 5, 16, 16, 64),
                                        (1, 0, 3, 4, 8)])
def test_values_read_matches_reference(fmt, H, R, k, N, Dv):
    gen = torch.Generator().manual_seed(11)
    values = torch.randn(H, N, Dv, generator=gen) * 3
    if fmt in ("int8", "float8"):
        stored, value_scale = formats.quantize_values(values, fmt)
    else:
        stored, value_scale = values.to(formats.FLOAT_FORMATS[fmt]), None
    scores = torch.randn(H, R, k, generator=gen) * 3
    rows = torch.randint(-1, N, (H, R, k), generator=gen)   # repeated rows and missing entries
    if R > 3:
        rows[:, 0] = -1                       # nothing to read: weights 0, lse -inf, out 0
        scores[:, 1, 0] = float("nan")        # NaN among the live scores: NaN weights and lse
        rows[:, 1, 0] = 0
        scores[:, 2] = float("-inf")          # only -inf scores: read as nothing
        scores[:, 3, 0] = float("-inf")       # one -inf score: weight 0
    got = ext._topk_values_read(scores, rows, stored, value_scale)
    want = topk_values_read_ref(scores, rows, stored, value_scale)
    for name, a, b in zip(("out", "weights", "lse"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, equal_nan=True, msg=name)
    if R > 3:
        assert torch.isneginf(got[2][:, 0]).all() and torch.isneginf(got[2][:, 2]).all()
        assert torch.isnan(got[2][:, 1]).all()
        assert (got[1][:, 3, 0] == 0).all()


def test_values_read_strided_values_and_wrapper():
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(2, 40, 24, generator=gen)
    values = base[:, ::2, 4:20]                   # rows and heads strided, last dim contiguous
    scores = torch.randn(2, 6, 4, generator=gen)
    rows = torch.randint(-1, 20, (2, 6, 4), generator=gen)
    got = topk_values_read(scores, rows, values)
    for a, b in zip(got, topk_values_read_ref(scores, rows, values)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_values_read_refuses_bad_arguments():
    scores = torch.zeros(1, 2, 3)
    values = torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match="outside"):
        ext._topk_values_read(scores, torch.full((1, 2, 3), 5), values, None)
    with pytest.raises(ValueError, match="outside"):
        ext._topk_values_read(scores, torch.full((1, 2, 3), -2), values, None)
    with pytest.raises(ValueError, match="value_scale"):
        ext._topk_values_read(scores, torch.zeros(1, 2, 3, dtype=torch.int64),
                              values.to(torch.int8), None)
    with pytest.raises(ValueError, match="value_scale"):
        ext._topk_values_read(scores, torch.zeros(1, 2, 3, dtype=torch.int64), values,
                              torch.ones(1, 5))
