"""sharded_gated_memory_write on 2 and 4 gloo processes against gated_memory_write on the
concatenated memory: the new memory and the gradients of memory, weights, add and erase, both write
layouts, slots written several times within and across shards, uneven and empty shards, -1 ids,
int32 ids, 3-D and 4-D memories, and mismatched arguments raising on every rank.

Each process group is spawned once per world size and runs every case (``CASES``) in order
(:mod:`harness`).
"""
from __future__ import annotations

import torch

from . import harness

WORLD_SIZES = (2, 4)

SHARD_SIZES = {
    (2, "uneven"): [5, 11],
    (4, "uneven"): [3, 0, 7, 6],
    (2, "empty_first"): [0, 9],
    (4, "empty_first"): [0, 4, 0, 5],
}


def _writes(batch, heads, total, T, kw, D, erase_width, dtype, index_dtype, gen):
    """Writes with slots repeated within a step's row, across steps and across shards, and -1s."""
    lead = (batch, heads) if heads else (batch,)
    indices = torch.randint(-1, total, (*lead, T, kw), generator=gen)
    if T >= 2:
        indices[..., 1, 0] = indices[..., 0, 0]          # the same slot at two steps
        indices[..., 0, -1] = indices[..., 0, 0]         # twice in one step
        indices[..., -1, 0] = total - 1                  # the last slot (the last non-empty shard)
        indices[..., -1, -1] = -1
    weights = torch.rand(*lead, T, kw, generator=gen, dtype=dtype)
    add = torch.randn(*lead, T, D, generator=gen, dtype=dtype)
    erase = torch.rand(*lead, T, erase_width, generator=gen, dtype=dtype)
    return indices.to(index_dtype), weights, add, erase


def _check_write(rank, world_size, *, sizes="uneven", B=2, Hm=2, T=5, kw=3, D=4, erase_width=4,
                 dtype=torch.float32, index_dtype=torch.int64, queries="replicated", check=True,
                 grads=True, seed=0):
    """One write, compared with gated_memory_write of the whole memory run in this process."""
    import l2m_kernels as l2m
    from l2m_kernels.distributed import sharded_gated_memory_write
    from l2m_kernels.testing import assert_close

    gen = torch.Generator().manual_seed(seed)
    shard_sizes = SHARD_SIZES[(world_size, sizes)]
    total = sum(shard_sizes)
    offset, size = harness.offsets(shard_sizes)[rank], shard_sizes[rank]
    batch_all = B * world_size if queries == "sharded" else B
    lead = (batch_all, Hm) if Hm else (batch_all,)
    memory_full = torch.randn(*lead, total, D, generator=gen, dtype=dtype)
    writes_full = _writes(batch_all, Hm, total, T, kw, D, erase_width, dtype, index_dtype, gen)
    cotangent = torch.randn(*lead, total, D, generator=gen, dtype=dtype)

    float_ref = [harness.leaf(t) for t in (memory_full, *writes_full[1:])]
    expected = l2m.gated_memory_write(float_ref[0], writes_full[0], *float_ref[1:])

    own = slice(rank * B, (rank + 1) * B) if queries == "sharded" else slice(None)
    memory = harness.leaf(memory_full[..., offset:offset + size, :])
    weights, add, erase = (harness.leaf(t[own]) for t in writes_full[1:])
    indices = writes_full[0][own]
    new = sharded_gated_memory_write(memory, indices, weights, add, erase, queries=queries, check=check)
    if grads:  # every collective first: a failed comparison below leaves the ranks in step
        grads_got = torch.autograd.grad(new, (memory, weights, add, erase),
                                        cotangent[..., offset:offset + size, :])

    assert new.dtype == dtype and new.shape == memory.shape
    assert_close("memory", new, expected[..., offset:offset + size, :], dtype)
    if not grads:
        return
    grads_ref = torch.autograd.grad(expected, float_ref, cotangent)
    assert_close("dmemory", grads_got[0], grads_ref[0][..., offset:offset + size, :], dtype)
    for name, got, ref in zip(("dweights", "dadd", "derase"), grads_got[1:], grads_ref[1:]):
        assert got.dtype == dtype
        assert_close(name, got, ref[own], dtype)


def _no_grad_write(rank, world_size):
    with torch.no_grad():
        _check_write(rank, world_size, queries="sharded", grads=False, seed=9)


def _small_write_inputs(slots=3, dtype=torch.float32):
    """memory (1, 2, slots, 4) and one step of writes (1, 2, 1, 1), the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(1, 2, slots, 4, generator=gen, dtype=dtype)
    indices = torch.zeros(1, 2, 1, 1, dtype=torch.int64)
    weights = torch.full((1, 2, 1, 1), 0.5, dtype=dtype)
    add = torch.randn(1, 2, 1, 4, generator=gen, dtype=dtype)
    erase = torch.full((1, 2, 1, 4), 0.5, dtype=dtype)
    return memory, indices, weights, add, erase


def _slot_beyond_the_memory(rank, world_size):
    """A slot id past the last shard on one rank only (sharded writes): IndexError on every rank."""
    from l2m_kernels.distributed import sharded_gated_memory_write
    memory, indices, weights, add, erase = _small_write_inputs()
    memory = memory.expand(world_size, -1, -1, -1)
    if rank == 1:
        indices = indices + 3 * world_size
    harness.expect_error([f"expected global slot ids in [-1, N) = [-1, {3 * world_size})",
                          f"[{3 * world_size}, {3 * world_size}] on rank 1"],
                         lambda: sharded_gated_memory_write(memory, indices, weights, add, erase,
                                                            queries="sharded", check=False),
                         error=IndexError)


def _slot_below_minus_one(rank, world_size):
    from l2m_kernels.distributed import sharded_gated_memory_write
    memory, indices, weights, add, erase = _small_write_inputs()
    harness.expect_error(["[-2, -2] on rank 0"],
                         lambda: sharded_gated_memory_write(memory, indices - 2, weights, add, erase),
                         error=IndexError)


def _replicated_writes_differ(rank, world_size):
    from l2m_kernels.distributed import sharded_gated_memory_write
    memory, indices, weights, add, erase = _small_write_inputs()
    harness.expect_error(["add checksum differs across ranks"],
                         lambda: sharded_gated_memory_write(memory, indices, weights, add + rank, erase))


def _mismatched_width_and_index_dtype(rank, world_size):
    from l2m_kernels.distributed import sharded_gated_memory_write
    memory, indices, weights, add, erase = _small_write_inputs()
    memory = memory.expand(world_size, -1, -1, -1)
    if rank == world_size - 1:
        erase = erase[..., :1]
        indices = indices.int()
    harness.expect_error(["erase.shape differs across ranks", f"rank {world_size - 1}: (1, 2, 1, 1)",
                          "indices.dtype differs across ranks", "torch.int32"],
                         lambda: sharded_gated_memory_write(memory, indices, weights, add, erase,
                                                            queries="sharded"))


def _one_rank_bad_memory_batch(rank, world_size):
    """A rank whose own arguments fail: it raises its error, the others name it."""
    from l2m_kernels.distributed import sharded_gated_memory_write
    memory, indices, weights, add, erase = _small_write_inputs()
    memory = memory.expand(world_size - (rank == 1), -1, -1, -1)
    expected = (["memory: with queries='sharded'", f"world_size * B = {world_size} * 1"] if rank == 1
                else ["arguments of rank 1 failed their check"])
    harness.expect_error(expected, lambda: sharded_gated_memory_write(memory, indices, weights, add, erase,
                                                                      queries="sharded"))


def _grad_requirement_differs(rank, world_size):
    from l2m_kernels.distributed import sharded_gated_memory_write
    memory, indices, weights, add, erase = _small_write_inputs()
    add.requires_grad_(rank == 0)
    harness.expect_error(["writes require grad differs across ranks", "rank 0: True"],
                         lambda: sharded_gated_memory_write(memory, indices, weights, add, erase))


def _weights_outside_zero_one(rank, world_size):
    """Weights beyond 1 on one rank (sharded writes): every rank checks the gathered writes."""
    from l2m_kernels.distributed import sharded_gated_memory_write
    memory, indices, weights, add, erase = _small_write_inputs()
    memory = memory.expand(world_size, -1, -1, -1)
    harness.expect_error(["weights: expected values in [0, 1]"],
                         lambda: sharded_gated_memory_write(memory, indices, weights + (rank == 0), add,
                                                            erase, queries="sharded"))


def _half_precision_gradients(rank, world_size):
    """float16/bfloat16 writes: the writes' gradients are summed over the ranks before they are
    rounded (a case where the ranks' parts cancel, found by fuzzing)."""
    from l2m_kernels.distributed.cases import run_case

    params = dict(B=2, Hm=1, T=1, kw=3, N=2, D=1, queries="replicated", sizes="even", int32_ids=True,
                  erase_per_feature=False)
    failures = {dtype: run_case("sharded_gated_memory_write", params, dtype, 70, rank, world_size).failures
                for dtype in (torch.float16, torch.bfloat16)}
    assert not any(failures.values()), failures


CASES = {
    "half_precision_gradients_summed_before_rounding": _half_precision_gradients,
    "replicated_4d_float32": lambda r, p: _check_write(r, p),
    "replicated_3d_float64_int32_ids": lambda r, p: _check_write(
        r, p, Hm=0, dtype=torch.float64, index_dtype=torch.int32, erase_width=1, seed=1),
    "replicated_empty_shards": lambda r, p: _check_write(r, p, sizes="empty_first", T=7, seed=2),
    "sharded_4d_float32_erase_width_1": lambda r, p: _check_write(
        r, p, queries="sharded", erase_width=1, seed=3),
    "sharded_3d_float64_empty_shards_int32_ids": lambda r, p: _check_write(
        r, p, queries="sharded", Hm=0, dtype=torch.float64, sizes="empty_first",
        index_dtype=torch.int32, seed=4),
    "no_steps": lambda r, p: _check_write(r, p, T=0, queries="sharded", seed=5),
    "without_check": lambda r, p: _check_write(r, p, check=False, seed=6),
    "sharded_without_check": lambda r, p: _check_write(r, p, check=False, queries="sharded", seed=7),
    "bfloat16": lambda r, p: _check_write(r, p, dtype=torch.bfloat16, queries="sharded", seed=8),
    "no_grad": _no_grad_write,
    "slot_beyond_the_memory_raises_everywhere": _slot_beyond_the_memory,
    "slot_below_minus_one_raises_everywhere": _slot_below_minus_one,
    "replicated_writes_that_differ_raise": _replicated_writes_differ,
    "mismatched_erase_width_and_index_dtype_raise": _mismatched_width_and_index_dtype,
    "one_rank_bad_memory_batch_raises_everywhere": _one_rank_bad_memory_batch,
    "grad_requirement_that_differs_raises": _grad_requirement_differs,
    "weights_outside_zero_one_raise_everywhere": _weights_outside_zero_one,
    # After the refusals the group still works.
    "write_after_the_refusals": lambda r, p: _check_write(r, p, queries="sharded", seed=10),
}


group_results, test_sharded_gated_memory_write = harness.case_tests(__name__, WORLD_SIZES)
