"""sharded_product_key_read on 2 and 4 gloo processes against product_key_read on the whole values:
outputs, indices, weights, lse and every gradient (q, subkeys, the values shard, dense or sparse),
values sharded by rows (uneven, with empty shards) and by columns (uneven, with an empty one),
replicated and sharded queries, sum_heads, k_sub, ties, empty batches, float32, float64, float16
and bfloat16, and mismatched arguments raising on every rank.

Each process group is spawned once per world size and runs every case (``CASES``) in order
(:mod:`harness`).
"""
from __future__ import annotations

import torch

from . import harness
from .harness import expect_error as _expect_error
from .harness import leaf as _leaf
from .harness import offsets as _offsets

WORLD_SIZES = (2, 4)
N_SUB = 5  # 25 slots


def _shard_sizes(world_size: int, shard: str, pattern: str):
    """Rows per rank (summing to N_SUB ** 2) or value features per rank (summing to Dv = 7)."""
    return {
        ("rows", 2, "uneven"): [11, 14],
        ("rows", 4, "uneven"): [3, 0, 13, 9],
        ("rows", 2, "empty"): [25, 0],
        ("rows", 4, "empty"): [0, 0, 24, 1],
        ("columns", 2, "uneven"): [3, 4],
        ("columns", 4, "uneven"): [2, 0, 4, 1],
        ("columns", 2, "empty"): [0, 7],
        ("columns", 4, "empty"): [7, 0, 0, 0],
    }[(shard, world_size, pattern)]


def _shard_of(full, shard, sizes, rank):
    offset, size = _offsets(sizes)[rank], sizes[rank]
    return full[offset:offset + size] if shard == "rows" else full[:, offset:offset + size]


def _check_read(rank, world_size, *, shard="rows", sizes="uneven", B=2, H=3, T=4, Dk=8, k=4, k_sub=None,
                sum_heads=False, dtype=torch.float32, integer=False, check=True, seed=0,
                selection_grads=True, queries="replicated", sparse_grad=False):
    """One read, compared with product_key_read of the whole values run in this process (with
    sharded queries: of every rank's queries, this rank's slice of it)."""
    import torch.distributed as dist

    import l2m_kernels as l2m
    from l2m_kernels.distributed import sharded_product_key_read
    from l2m_kernels.testing import assert_close

    gen = torch.Generator().manual_seed(seed)
    Dv = 7
    num_slots = N_SUB * N_SUB
    shard_sizes = _shard_sizes(world_size, shard, sizes)
    sharded = queries == "sharded"
    batch_all = B * world_size if sharded else B
    if integer:  # exact score ties within and across shards
        q_full = torch.randint(-1, 2, (batch_all, H, T, Dk), generator=gen).to(dtype)
        subkeys_full = torch.randint(-1, 2, (H, 2, N_SUB, Dk // 2), generator=gen).to(dtype)
    else:
        q_full = torch.randn(batch_all, H, T, Dk, generator=gen, dtype=dtype)
        subkeys_full = torch.randn(H, 2, N_SUB, Dk // 2, generator=gen, dtype=dtype)
    values_full = torch.randn(num_slots, Dv, generator=gen, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cot_out = torch.randn((batch_all, T, Dv) if sum_heads else (batch_all, H, T, Dv), generator=gen, dtype=dtype)
    cot_weights = torch.randn(batch_all, H, T, k, generator=gen, dtype=acc)
    cot_lse = torch.randn(batch_all, H, T, generator=gen, dtype=acc)

    def own(t):  # this rank's slice of every rank's batch (sharded queries)
        return t[rank * B:(rank + 1) * B] if sharded else t

    def inputs(q, values):
        if selection_grads:
            return _leaf(q), _leaf(subkeys_full), _leaf(values)
        return q.clone(), subkeys_full.clone(), _leaf(values)

    q_ref, subkeys_ref, values_ref = inputs(q_full, values_full)
    expected = l2m.product_key_read(q_ref, subkeys_ref, values_ref, k, k_sub=k_sub, sum_heads=sum_heads)

    q, subkeys, values = inputs(own(q_full), _shard_of(values_full, shard, shard_sizes, rank))
    read = sharded_product_key_read(q, subkeys, values, k, k_sub=k_sub, shard=shard, sum_heads=sum_heads,
                                    check=check, queries=queries, sparse_grad=sparse_grad)
    wrt = (q, subkeys, values) if selection_grads else (values,)
    outputs = (read.out, read.weights, read.lse) if selection_grads else (read.out,)
    cotangents = (cot_out, cot_weights, cot_lse) if selection_grads else (cot_out,)
    grads = list(torch.autograd.grad(outputs, wrt, [own(c) for c in cotangents]))
    if sharded and selection_grads:  # dsubkeys of this rank's queries: summed, the whole batch's
        dist.all_reduce(grads[1])
    # Every collective happened before the comparisons.

    full = expected
    expected = type(full)(*(own(t) for t in full))
    assert torch.equal(read.indices, expected.indices), (read.indices, expected.indices)
    assert read.out.dtype == dtype and read.weights.dtype == acc and read.lse.dtype == acc
    assert read.out.shape == expected.out.shape
    assert torch.equal(read.weights, expected.weights)
    assert torch.equal(read.lse, expected.lse)
    assert_close("out", read.out, expected.out, dtype)
    ref_wrt = (q_ref, subkeys_ref, values_ref) if selection_grads else (values_ref,)
    ref_outputs = (full.out, full.weights, full.lse) if selection_grads else (full.out,)
    ref_grads = torch.autograd.grad(ref_outputs, ref_wrt, cotangents)
    if selection_grads:
        assert_close("dq", grads[0], own(ref_grads[0]), dtype)
        assert_close("dsubkeys", grads[1], ref_grads[1], dtype)
    dvalues = grads[-1]
    assert dvalues.dtype == dtype and dvalues.shape == values.shape
    ref_dvalues = _shard_of(ref_grads[-1], shard, shard_sizes, rank)
    if sparse_grad:  # one row per slot of the shard that was read: those with a gradient, at most
        assert dvalues.is_sparse and dvalues.is_coalesced()
        rows = set(dvalues.indices()[0].tolist())
        assert len(rows) == dvalues.indices().shape[1] <= values.shape[0]
        assert set(ref_dvalues.abs().sum(-1).nonzero().flatten().tolist()) <= rows
        dvalues = dvalues.to_dense()
    assert_close("dvalues", dvalues, ref_dvalues, dtype)


def _small_inputs(dtype=torch.float32, rows=None, columns=3):
    """q (1, 2, 3, 8), subkeys (2, 2, 4, 4) and values (rows or 16, columns), the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=gen, dtype=dtype)
    subkeys = torch.randn(2, 2, 4, 4, generator=gen, dtype=dtype)
    values = torch.randn(16 if rows is None else rows, columns, generator=gen, dtype=dtype)
    return q, subkeys, values


def _row_share(rank, world_size):
    """This rank's rows of an even split of the 16 slots of :func:`_small_inputs`."""
    return 16 // world_size + (rank < 16 % world_size)


def _mismatched_query_shape(rank, world_size):
    from l2m_kernels.distributed import sharded_product_key_read
    q, subkeys, values = _small_inputs(rows=_row_share(rank, world_size))
    if rank == world_size - 1:
        q = torch.cat([q, q[:, :, :1]], 2)
    _expect_error(["q.shape differs across ranks", f"rank {world_size - 1}: (1, 2, 4, 8)"],
                  lambda: sharded_product_key_read(q, subkeys, values, 2))


def _mismatched_mode_k_sub_and_dtype(rank, world_size):
    from l2m_kernels.distributed import sharded_product_key_read
    dtype = torch.float64 if rank == 1 else torch.float32
    q, subkeys, values = _small_inputs(dtype=dtype)
    shard = "columns" if rank == 0 else "rows"
    _expect_error(["shard differs across ranks", "k_sub differs across ranks", "dtype differs across ranks",
                   "rank 1: torch.float64", "rank 0: 'columns'"],
                  lambda: sharded_product_key_read(q, subkeys, values, 2, k_sub=2 + rank % 2, shard=shard))


def _one_rank_bad_values(rank, world_size):
    """A rank whose own arguments fail: it raises its error, the others name it."""
    from l2m_kernels.distributed import sharded_product_key_read
    q, subkeys, values = _small_inputs()
    values = values[:15] if rank == 1 else values
    expected = ["values: expected shape"] if rank == 1 else ["arguments of rank 1 failed their check"]
    _expect_error(expected, lambda: sharded_product_key_read(q, subkeys, values, 2, shard="columns"))


def _rows_not_the_memory(rank, world_size):
    from l2m_kernels.distributed import sharded_product_key_read
    q, subkeys, values = _small_inputs(rows=3)
    _expect_error([f"hold N_0 + ... + N_{world_size - 1} = {3 * world_size} slots",
                   "expected n_sub ** 2 = 16"],
                  lambda: sharded_product_key_read(q, subkeys, values, 2))


def _subkeys_differ(rank, world_size):
    from l2m_kernels.distributed import sharded_product_key_read
    q, subkeys, values = _small_inputs(rows=_row_share(rank, world_size))
    subkeys = subkeys + rank
    _expect_error(["subkeys checksum differs across ranks"],
                  lambda: sharded_product_key_read(q, subkeys, values, 2))


def _sharded_query_batches_differ(rank, world_size):
    """Sharded queries: each rank its own batch, but of one shape."""
    from l2m_kernels.distributed import sharded_product_key_read
    q, subkeys, values = _small_inputs()
    q = q.expand(1 + rank % 2, -1, -1, -1)
    _expect_error(["q.shape differs across ranks", ": (2, 2, 3, 8)"],
                  lambda: sharded_product_key_read(q, subkeys, values, 2, shard="columns", queries="sharded"))


def _unknown_query_layout(rank, world_size):
    from l2m_kernels.distributed import sharded_product_key_read
    q, subkeys, values = _small_inputs()
    _expect_error(["queries: expected one of ('replicated', 'sharded'), got 'data'"],
                  lambda: sharded_product_key_read(q, subkeys, values, 2, shard="columns", queries="data"))


CASES = {
    "rows_float32": lambda r, p: _check_read(r, p),
    "rows_float64_k_sub": lambda r, p: _check_read(r, p, dtype=torch.float64, k=6, k_sub=3, seed=1),
    "rows_empty_shards_sum_heads": lambda r, p: _check_read(r, p, sizes="empty", sum_heads=True, seed=2),
    "rows_ties_float64": lambda r, p: _check_read(r, p, integer=True, dtype=torch.float64, k=9, k_sub=5, seed=3),
    "rows_values_grad_only": lambda r, p: _check_read(r, p, selection_grads=False, seed=4),
    "columns_float32": lambda r, p: _check_read(r, p, shard="columns", seed=5),
    "columns_float64_sum_heads": lambda r, p: _check_read(
        r, p, shard="columns", dtype=torch.float64, sum_heads=True, k=5, k_sub=4, seed=6),
    "columns_empty_shards": lambda r, p: _check_read(r, p, shard="columns", sizes="empty", seed=7),
    "columns_ties_float32": lambda r, p: _check_read(r, p, shard="columns", integer=True, k=8, k_sub=4, seed=8),
    "columns_values_grad_only_sum_heads": lambda r, p: _check_read(
        r, p, shard="columns", sum_heads=True, selection_grads=False, seed=9),
    "no_queries": lambda r, p: _check_read(r, p, T=0, seed=10),
    "sharded_queries_rows": lambda r, p: _check_read(r, p, queries="sharded", seed=13),
    "sharded_queries_rows_float64_ties_sum_heads": lambda r, p: _check_read(
        r, p, queries="sharded", dtype=torch.float64, integer=True, sum_heads=True, sizes="empty", k=6,
        k_sub=3, seed=14),
    "sharded_queries_columns": lambda r, p: _check_read(r, p, queries="sharded", shard="columns", seed=15),
    "sharded_queries_columns_float64_sum_heads": lambda r, p: _check_read(
        r, p, queries="sharded", shard="columns", sizes="empty", dtype=torch.float64, sum_heads=True, seed=16),
    "sharded_queries_values_grad_only": lambda r, p: _check_read(
        r, p, queries="sharded", selection_grads=False, seed=17),
    "sharded_queries_empty_batch": lambda r, p: _check_read(r, p, queries="sharded", shard="columns", B=0,
                                                            seed=18),
    "sharded_queries_without_check": lambda r, p: _check_read(r, p, queries="sharded", check=False, seed=19),
    "rows_float16_sharded_queries": lambda r, p: _check_read(r, p, queries="sharded", dtype=torch.float16,
                                                             seed=23),
    "columns_bfloat16_sharded_queries_sum_heads": lambda r, p: _check_read(
        r, p, shard="columns", queries="sharded", dtype=torch.bfloat16, sum_heads=True, seed=24),
    "columns_bfloat16": lambda r, p: _check_read(r, p, shard="columns", dtype=torch.bfloat16, seed=25),
    "sparse_grad_rows": lambda r, p: _check_read(r, p, sparse_grad=True, seed=20),
    "sparse_grad_columns_sharded_queries": lambda r, p: _check_read(
        r, p, shard="columns", queries="sharded", sparse_grad=True, seed=21),
    "sparse_grad_empty_shard": lambda r, p: _check_read(r, p, sizes="empty", sparse_grad=True,
                                                        dtype=torch.float64, seed=22),
    "without_check": lambda r, p: _check_read(r, p, shard="columns", check=False, seed=11),
    "mismatched_query_shape_raises_everywhere": _mismatched_query_shape,
    "mismatched_mode_k_sub_and_dtype_raise_everywhere": _mismatched_mode_k_sub_and_dtype,
    "one_rank_bad_values_raises_everywhere": _one_rank_bad_values,
    "rows_not_the_whole_memory_raise": _rows_not_the_memory,
    "replicated_subkeys_that_differ_raise": _subkeys_differ,
    "sharded_query_batches_of_different_shapes_raise": _sharded_query_batches_differ,
    "unknown_query_layout_raises": _unknown_query_layout,
    # After the refusals the group still works.
    "read_after_the_refusals": lambda r, p: _check_read(r, p, sum_heads=True, seed=12),
}


group_results, test_sharded_product_key_read = harness.case_tests(__name__, WORLD_SIZES)
