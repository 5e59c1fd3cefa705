"""The test helpers themselves: a check that cannot fail is worse than none."""
import math

import pytest
import torch

from l2m_kernels import _alloc
from l2m_kernels.testing import (SELECTION_TOLERANCE, TOLERANCE, assert_close, assert_valid_topk, bits_equal,
                                 nan_filled, placed, poisoned_outputs, product_key_scores, rand, rand_unit,
                                 read_scores, rel_rms_error)


def test_rel_rms_error_basics():
    x = torch.randn(100, dtype=torch.float64)
    assert rel_rms_error(x, x) == 0.0
    assert rel_rms_error(x * 1.01, x) == pytest.approx(0.01, rel=1e-6)
    assert rel_rms_error(torch.empty(0), torch.empty(0)) == 0.0


def test_nan_where_reference_has_none_fails():
    x = torch.randn(10)
    y = x.clone()
    y[3] = float("nan")
    assert rel_rms_error(y, x) == math.inf
    with pytest.raises(AssertionError, match="out"):
        assert_close("out", y, x)


def test_matching_infinities_and_nans_count_as_equal():
    x = torch.tensor([1.0, float("-inf"), float("nan"), 2.0])
    assert rel_rms_error(x.clone(), x) == 0.0
    y = x.clone()
    y[1] = 0.0
    assert rel_rms_error(y, x) == math.inf


def test_tolerance_is_per_dtype():
    x = torch.randn(1000, dtype=torch.float64)
    noisy = x * (1 + 1e-3)
    assert_close("bf16 ok", noisy, x, dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_close("fp32 too far", noisy, x, dtype=torch.float32)
    assert TOLERANCE[torch.float64] < TOLERANCE[torch.float32] < TOLERANCE[torch.float16] < TOLERANCE[torch.bfloat16]


def test_poisoned_outputs_fill_nan_and_sentinel():
    with poisoned_outputs():
        f = _alloc.empty((4,), dtype=torch.float32, device="cpu")
        i = _alloc.empty((4,), dtype=torch.int64, device="cpu")
    assert torch.isnan(f).all() and (i == _alloc._INT_SENTINEL).all()
    with poisoned_outputs(False):
        assert not _alloc._POISON


def test_random_factories_never_give_zeros():
    assert (rand(1000) != 0).all()
    u = rand_unit(1000, dtype=torch.bfloat16)
    assert (u > 0).all() and (u <= 1).all() and u.dtype == torch.bfloat16


# -- assert_valid_topk -------------------------------------------------------------------------

def _read_case(valid=(20, 5), shared=True):
    """A grouped read (H 4 over Hm 2) of a shared memory with valid_len, and its reference slots."""
    from l2m_kernels.ops.topk_read.reference import topk_read_select

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, 8, generator=gen)
    keys = torch.randn(*((2,) if shared else (2, 2)), 20, 8, generator=gen)
    valid_len = torch.tensor(valid)
    slot_ids = topk_read_select(q.double(), keys.double(), 6, 0.5, valid_len)
    return read_scores(q, keys, 0.5), slot_ids, valid_len


def test_valid_topk_passes_the_reference_selection():
    for shared in (True, False):
        scores, slot_ids, valid_len = _read_case(shared=shared)
        assert (slot_ids[1] == -1).sum() > 0  # valid_len 5 < k 6: a missing entry per row
        assert_valid_topk(slot_ids, scores, valid_len=valid_len)
    # The scores as read_scores builds them: query head h reads memory head h // 2.
    q, keys = torch.randn(1, 4, 2, 3), torch.randn(1, 2, 5, 3)
    assert torch.allclose(read_scores(q, keys, 1.0)[0, 3], (q[0, 3] @ keys[0, 1].T).double())


@pytest.mark.parametrize("mutation,message", [
    ("wrong_slot", "not a top-k"),
    ("duplicate", "selected twice"),
    ("beyond_valid_len", "does not exist"),
    ("wrong_order", "wrong order"),
    ("out_of_range", "outside"),
    ("missing_first", "missing entry"),
    ("too_few", "real entries"),
])
def test_valid_topk_fails_a_broken_selection(mutation, message):
    scores, slot_ids, valid_len = _read_case()
    bad = slot_ids.clone()
    row = bad[0, 2, 1]
    if mutation == "wrong_slot":  # the worst existing slot instead of the last one selected
        row[-1] = int(scores[0, 2, 1].argmin())
    elif mutation == "duplicate":
        row[-1] = row[0]
    elif mutation == "beyond_valid_len":
        bad[1, 0, 0, 0] = 7  # batch 1 has valid_len 5
    elif mutation == "wrong_order":
        row[[0, 1]] = row[[1, 0]].clone()
    elif mutation == "out_of_range":
        row[-1] = 20
    elif mutation == "missing_first":
        bad[1, 0, 0, [0, -1]] = bad[1, 0, 0, [-1, 0]].clone()
    elif mutation == "too_few":
        row[-1] = -1
    with pytest.raises(AssertionError, match=message) as error:
        assert_valid_topk(bad, scores, valid_len=valid_len, name="indices")
    assert "indices:" in str(error.value) and "row (" in str(error.value)


def test_valid_topk_exact_ties_go_to_the_smaller_slot():
    # Slots 1, 3 and 4 score exactly 2; k = 3 keeps 0 (score 5) and then 1 and 3, in that order.
    scores = torch.tensor([[5.0, 2.0, 0.0, 2.0, 2.0, -1.0]], dtype=torch.float64)
    assert_valid_topk(torch.tensor([[0, 1, 3]]), scores)
    with pytest.raises(AssertionError, match="wrong tie: slots 3 and 4"):
        assert_valid_topk(torch.tensor([[0, 1, 4]]), scores)
    with pytest.raises(AssertionError, match="wrong tie order"):
        assert_valid_topk(torch.tensor([[0, 3, 1]]), scores)
    # A near tie (within the float32 slack) may go either way; beyond the slack it may not.
    near = torch.tensor([[1.0, 1.0 + 1e-6, 0.0]], dtype=torch.float64)
    assert_valid_topk(torch.tensor([[0]]), near)
    with pytest.raises(AssertionError, match="not a top-k"):
        assert_valid_topk(torch.tensor([[0]]), near, score_dtype=torch.float64)


def test_valid_topk_nan_rows_rank_nan_first_and_by_slot():
    # A NaN query row scores NaN everywhere: ranked as +inf, all tied, so slots 0, 1, 2 in order.
    scores = torch.full((1, 5), float("nan"), dtype=torch.float64)
    assert_valid_topk(torch.tensor([[0, 1, 2]]), scores)
    with pytest.raises(AssertionError, match="wrong tie"):
        assert_valid_topk(torch.tensor([[0, 1, 3]]), scores)
    # A NaN slot among finite ones is ranked first.
    scores = torch.tensor([[1.0, float("nan"), 3.0]], dtype=torch.float64)
    assert_valid_topk(torch.tensor([[1, 2]]), scores)
    with pytest.raises(AssertionError, match="not a top-k"):
        assert_valid_topk(torch.tensor([[2, 0]]), scores)


def test_valid_topk_tolerance_follows_dtype_and_magnitude():
    # The same gap of 5e-4: within the float32 slack at magnitude 100 (2e-5 * 100), not at 1.
    assert_valid_topk(torch.tensor([[0]]), torch.tensor([[100.0, 100.0 + 5e-4, 0.0]], dtype=torch.float64))
    small = torch.tensor([[1.0, 1.0 + 5e-4, 0.0]], dtype=torch.float64)
    with pytest.raises(AssertionError, match="not a top-k"):
        assert_valid_topk(torch.tensor([[0]]), small)
    assert_valid_topk(torch.tensor([[0]]), small, score_dtype=torch.bfloat16)
    assert_valid_topk(torch.tensor([[0]]), small, tol=1e-3)
    assert SELECTION_TOLERANCE[torch.float64] < SELECTION_TOLERANCE[torch.float32] < SELECTION_TOLERANCE[torch.bfloat16]


def test_valid_topk_product_key_candidates():
    from l2m_kernels.ops.product_key.reference import product_key_select

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 3, 8, generator=gen)
    subkeys = torch.randn(2, 2, 7, 4, generator=gen)
    k, k_sub = 5, 3
    scores, selectable, candidates = product_key_scores(q, subkeys, k_sub, 0.5)
    assert int(candidates[0, 0, 0].sum()) == k_sub * k_sub
    slot_ids = product_key_select(q.double(), subkeys.double(), k, k_sub, 0.5)
    assert_valid_topk(slot_ids, scores, selectable=selectable, competitors=candidates)
    # The best slot overall, which a sub-key outside its half's top k_sub makes no candidate.
    outside = (~selectable[0, 0, 0]).nonzero().flatten()
    bad = slot_ids.clone()
    bad[0, 0, 0, -1] = outside[scores[0, 0, 0, outside].argmax()]
    with pytest.raises(AssertionError, match="not selectable"):
        assert_valid_topk(bad, scores, selectable=selectable, competitors=candidates)
    # Without the candidate masks the same reference selection is no top-k of all slots.
    if not (slot_ids[..., :1] == scores.argmax(-1, keepdim=True)).all():
        with pytest.raises(AssertionError, match="not a top-k"):
            assert_valid_topk(slot_ids, scores)


def test_nan_filled_placed_and_bits_equal():
    buffer = nan_filled((3, 5), torch.float16, misalign=1)
    assert buffer.shape == (3, 5) and torch.isnan(buffer).all() and buffer.storage_offset() == 1
    x = torch.randn(4, 6)
    y = placed(x, 3)
    assert y.storage_offset() == 3 and torch.equal(x, y) and y.is_contiguous()
    nan = torch.tensor([float("nan"), 1.0])
    assert bits_equal(nan, nan.clone()) and not torch.equal(nan, nan.clone())
    assert not bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))


def test_assert_close_baseline_and_scale():
    x = torch.randn(100, dtype=torch.float64)
    off = x * (1 + 1e-4)
    with pytest.raises(AssertionError):
        assert_close("fp32", off, x, dtype=torch.float32)
    # The same computation at the input dtype is as far off: twice its error is allowed.
    assert_close("fp32", off, x, dtype=torch.float32, baseline=x * (1 + 6e-5))
    tiny = torch.full((4,), 1e-9, dtype=torch.float64)
    assert rel_rms_error(tiny * 2, tiny) == pytest.approx(1.0)
    assert rel_rms_error(tiny * 2, tiny, scale=1.0) == pytest.approx(1e-9)
