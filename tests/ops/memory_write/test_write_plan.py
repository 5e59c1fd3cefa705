"""write_plan (the GPU backends' grouping of writes by slot) against a brute-force Python grouping.

The plan is exact integer bookkeeping, so the comparison is exact: ``order`` must be the stable
sort of the entries by ``(g, slot)`` with skipped entries (-1) last in entry order, and
``run_length`` the number of writes of each slot at the first position of its run, 0 elsewhere.
"""
import pytest
import torch

from l2m_kernels.ops.memory_write.plan import write_plan

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INDEX_DTYPES = [torch.int32, torch.int64]


def _brute_force_plan(indices, num_slots):
    """(order, run_length) as Python lists, from a plain dictionary grouping."""
    groups, per_group = indices.shape
    rows = indices.tolist()
    runs = {}  # (g, slot) -> entries in (t, j) order
    skipped = []
    for g in range(groups):
        for p in range(per_group):
            slot = rows[g][p]
            entry = g * per_group + p
            if slot < 0:
                skipped.append(entry)
            else:
                assert slot < num_slots
                runs.setdefault((g, slot), []).append(entry)
    order, run_length = [], []
    for key in sorted(runs):
        entries = runs[key]
        order += entries
        run_length += [len(entries)] + [0] * (len(entries) - 1)
    order += skipped
    run_length += [0] * len(skipped)
    return order, run_length


def _check(indices, num_slots):
    plan = write_plan(indices, num_slots)
    order, run_length = _brute_force_plan(indices.cpu(), num_slots)
    assert plan.order.dtype == torch.int64 and plan.run_length.dtype == torch.int32
    assert plan.order.device == indices.device and plan.run_length.device == indices.device
    assert plan.order.shape == plan.run_length.shape == (indices.numel(),)
    assert plan.order.cpu().tolist() == order
    assert plan.run_length.cpu().tolist() == run_length


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("num_slots,per_group", [(1, 5), (4, 12), (7, 40), (300, 64)])
def test_plan_matches_brute_force(device, index_dtype, groups, num_slots, per_group):
    """Random slots in [-1, N): repeats within and across groups, skips, untouched slots."""
    generator = torch.Generator().manual_seed(groups * 1000 + num_slots * 10 + per_group)
    indices = torch.randint(-1, num_slots, (groups, per_group), generator=generator)
    _check(indices.to(index_dtype).to(device), num_slots)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["all_skipped", "one_slot", "distinct", "descending"])
def test_plan_special_patterns(device, index_dtype, kind):
    groups, num_slots, per_group = 3, 8, 8
    if kind == "all_skipped":
        indices = torch.full((groups, per_group), -1)
    elif kind == "one_slot":  # one long run per group
        indices = torch.full((groups, per_group), 5)
    elif kind == "distinct":  # every run of length 1
        indices = torch.randperm(num_slots)[:per_group].repeat(groups, 1)
    else:  # the sort must reorder, and stay stable among the repeats
        indices = torch.tensor([7, 7, 3, -1, 3, 0, -1, 0]).repeat(groups, 1)
    _check(indices.to(index_dtype).to(device), num_slots)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=lambda s: f"G{s[0]}P{s[1]}")
def test_plan_empty(device, index_dtype, shape):
    indices = torch.empty(shape, dtype=index_dtype, device=device)
    plan = write_plan(indices, 4)
    assert plan.order.shape == plan.run_length.shape == (0,)
    assert plan.order.dtype == torch.int64 and plan.run_length.dtype == torch.int32


def test_plan_no_slots_only_skips():
    """N == 0 allows only -1 entries: every entry is skipped, no run."""
    indices = torch.full((2, 3), -1, dtype=torch.int64)
    plan = write_plan(indices, 0)
    assert plan.order.tolist() == list(range(6))
    assert plan.run_length.tolist() == [0] * 6
