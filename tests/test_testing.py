"""The test helpers themselves: a check that cannot fail is worse than none."""
import math

import pytest
import torch

from l2m_kernels import _alloc
from l2m_kernels.testing import TOLERANCE, assert_close, poisoned_outputs, rand, rand_unit, rel_rms_error


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
