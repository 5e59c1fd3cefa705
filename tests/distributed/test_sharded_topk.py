"""sharded_topk_memory_read on 2 and 4 gloo processes against topk_memory_read on the concatenated
memory: outputs, indices and every gradient, both query layouts, ties across shards, uneven and
empty shards, valid_len, k larger than a shard, grouped heads, shared and batched memories, and
mismatched arguments raising on every rank.

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


# ---- inputs -------------------------------------------------------------------------------------

def _shard_sizes(world_size: int, pattern: str):
    """Slot counts per rank: uneven, with an empty shard and one smaller than k."""
    return {
        (2, "uneven"): [5, 11],
        (4, "uneven"): [3, 0, 7, 6],
        (2, "empty_first"): [0, 9],
        (4, "empty_first"): [0, 4, 0, 5],
        (2, "tiny"): [2, 3],
        (4, "tiny"): [1, 2, 0, 3],
    }[(world_size, pattern)]


def _memory(lead, num_slots, dim_k, dim_v, dtype, gen, integer=False):
    """Full keys and values ``lead + (N, D)``; ``integer``: small integers with every other key
    row repeated further on, so that exact score ties span the shards."""
    if integer:
        keys = torch.randint(-2, 3, (*lead, num_slots, dim_k), generator=gen).to(dtype)
        half = num_slots // 2
        keys[..., num_slots - half:, :] = keys[..., :half, :]
        values = torch.randint(-3, 4, (*lead, num_slots, dim_v), generator=gen).to(dtype)
    else:
        keys = torch.randn(*lead, num_slots, dim_k, generator=gen, dtype=dtype)
        values = torch.randn(*lead, num_slots, dim_v, generator=gen, dtype=dtype)
    return keys, values


def _check_read(rank, world_size, *, sizes="uneven", B=2, H=2, Hm=2, T=3, Dk=8, Dv=6, k=4,
                dtype=torch.float32, shared=True, queries="replicated", valid_len=None,
                integer=False, scale=None, check=True, seed=0, grads=True, nan_query=False):
    """One read, compared with topk_memory_read of the whole memory run in this process."""
    import l2m_kernels as l2m
    from l2m_kernels.distributed import sharded_topk_memory_read
    from l2m_kernels.testing import assert_close

    gen = torch.Generator().manual_seed(seed)
    shard_sizes = _shard_sizes(world_size, sizes)
    total = sum(shard_sizes)
    offset, size = _offsets(shard_sizes)[rank], shard_sizes[rank]
    batch_all = B * world_size if queries == "sharded" else B
    lead = (Hm,) if shared else (batch_all, Hm)
    keys_full, values_full = _memory(lead, total, Dk, Dv, dtype, gen, integer)
    if integer:
        q_full = torch.randint(-2, 3, (batch_all, H, T, Dk), generator=gen).to(dtype)
    else:
        q_full = torch.randn(batch_all, H, T, Dk, generator=gen, dtype=dtype)
    if nan_query:
        q_full[0, 0, 1, 2] = float("nan")
    valid_full = None
    if valid_len is not None:
        valid_full = torch.tensor(valid_len(total, batch_all), dtype=torch.int64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cot_out = torch.randn(batch_all, H, T, Dv, generator=gen, dtype=dtype)
    cot_weights = torch.randn(batch_all, H, T, k, generator=gen, dtype=acc)
    cot_lse = torch.randn(batch_all, H, T, generator=gen, dtype=acc)

    # The single-process read of the concatenated memory.
    q_ref, keys_ref, values_ref = _leaf(q_full), _leaf(keys_full), _leaf(values_full)
    expected = l2m.topk_memory_read(q_ref, keys_ref, values_ref, k, scale=scale, valid_len=valid_full)

    own = slice(rank * B, (rank + 1) * B) if queries == "sharded" else slice(None)
    q = _leaf(q_full[own])
    keys = _leaf(keys_full[..., offset:offset + size, :])
    values = _leaf(values_full[..., offset:offset + size, :])
    read = sharded_topk_memory_read(q, keys, values, k, queries=queries, scale=scale, check=check,
                                    valid_len=None if valid_full is None else valid_full[own])

    if grads:  # every collective first: a failed comparison below leaves the ranks in step
        dq, dkeys, dvalues = torch.autograd.grad((read.out, read.weights, read.lse), (q, keys, values),
                                                 (cot_out[own], cot_weights[own], cot_lse[own]))

    assert torch.equal(read.indices, expected.indices[own]), (read.indices, expected.indices[own])
    assert read.out.dtype == dtype and read.weights.dtype == acc and read.lse.dtype == acc
    assert_close("out", read.out, expected.out[own], dtype)
    assert_close("weights", read.weights, expected.weights[own], dtype)
    assert_close("lse", read.lse, expected.lse[own], dtype)
    if not grads:
        return
    ref_dq, ref_dkeys, ref_dvalues = torch.autograd.grad(
        (expected.out, expected.weights, expected.lse), (q_ref, keys_ref, values_ref),
        (cot_out, cot_weights, cot_lse))
    assert dq.dtype == dtype and dkeys.dtype == dtype and dvalues.dtype == dtype
    assert_close("dq", dq, ref_dq[own], dtype)
    assert_close("dkeys", dkeys, ref_dkeys[..., offset:offset + size, :], dtype)
    assert_close("dvalues", dvalues, ref_dvalues[..., offset:offset + size, :], dtype)


def _ddp_step_with_a_sharded_memory(rank, world_size):
    """DDP over a model whose memory shard is left out of DDP's gradient averaging: the projection's
    gradient is that of the mean loss; each shard's gradient sums every rank's queries, so it is
    world_size times that of the mean loss."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import l2m_kernels as l2m
    from l2m_kernels.distributed import sharded_topk_memory_read
    from l2m_kernels.testing import assert_close

    gen = torch.Generator().manual_seed(11)
    B, T, H, Dk, Dv, D_model, k = 2, 3, 2, 8, 6, 5, 4
    sizes = _shard_sizes(world_size, "uneven")
    offset, size = _offsets(sizes)[rank], sizes[rank]
    keys_full = torch.randn(H, sum(sizes), Dk, generator=gen)
    values_full = torch.randn(H, sum(sizes), Dv, generator=gen)
    proj_weight = torch.randn(H * Dk, D_model, generator=gen)
    x = torch.randn(world_size * B, T, D_model, generator=gen)
    target = torch.randn(world_size * B, H, T, Dv, generator=gen)

    class Reader(nn.Module):
        def __init__(self, keys, values, sharded):
            super().__init__()
            self.proj = nn.Linear(D_model, H * Dk, bias=False)
            self.proj.weight.data.copy_(proj_weight)
            self.memory = nn.Module()  # a submodule: DDP matches ignored names with its prefix
            self.memory.keys = nn.Parameter(keys.clone())
            self.memory.values = nn.Parameter(values.clone())
            self.sharded = sharded

        def forward(self, x):
            q = self.proj(x).view(x.shape[0], T, H, Dk).transpose(1, 2)
            read = sharded_topk_memory_read if self.sharded else l2m.topk_memory_read
            kwargs = dict(queries="sharded") if self.sharded else {}
            return read(q, self.memory.keys, self.memory.values, k, **kwargs).out

    model = Reader(keys_full[:, offset:offset + size], values_full[:, offset:offset + size], True)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["memory.keys", "memory.values"])
    ddp_model = DistributedDataParallel(model)
    own = slice(rank * B, (rank + 1) * B)
    (ddp_model(x[own]) - target[own]).square().mean().backward()

    reference = Reader(keys_full, values_full, False)
    (reference(x) - target).square().mean().backward()
    assert_close("proj", model.proj.weight.grad, reference.proj.weight.grad)
    assert_close("dkeys", model.memory.keys.grad / world_size,
                 reference.memory.keys.grad[:, offset:offset + size])
    assert_close("dvalues", model.memory.values.grad / world_size,
                 reference.memory.values.grad[:, offset:offset + size])


def _valid_len_mixed(total, batch):
    """0 slots, a prefix ending in the first non-empty shard, every slot, and the rest in between."""
    choices = [0, 2, total, total - 1, 1, total // 2]
    return [choices[b % len(choices)] for b in range(batch)]


def _small_read_inputs(T=3, Dk=8, slots=4, dtype=torch.float32, seed=0):
    """q (1, 2, T, Dk), shared keys (2, slots, Dk) and values (2, slots, 6), the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen, dtype=dtype)
                 for shape in ((1, 2, T, Dk), (2, slots, Dk), (2, slots, 6)))


def _mismatched_query_shape(rank, world_size):
    from l2m_kernels.distributed import sharded_topk_memory_read
    q, keys, values = _small_read_inputs(T=3 + (rank == world_size - 1))
    ranks = ", ".join(str(r) for r in range(world_size - 1))
    _expect_error(["q.shape differs across ranks", f"{ranks}: (1, 2, 3, 8)",
                   f"rank {world_size - 1}: (1, 2, 4, 8)"],
                  lambda: sharded_topk_memory_read(q, keys, values, 2))


def _mismatched_k_and_dtype(rank, world_size):
    from l2m_kernels.distributed import sharded_topk_memory_read
    dtype = torch.float64 if rank == 1 else torch.float32
    q, keys, values = _small_read_inputs(dtype=dtype)
    _expect_error(["k differs across ranks", "dtype differs across ranks", "rank 1: torch.float64"],
                  lambda: sharded_topk_memory_read(q, keys, values, 2 + rank % 2, queries="sharded"))


def _one_rank_bad_keys(rank, world_size):
    """A rank whose own arguments fail: it raises its error, the others name it."""
    from l2m_kernels.distributed import sharded_topk_memory_read
    q, keys, values = _small_read_inputs()
    keys = keys[..., :7] if rank == 1 else keys
    expected = ["keys: expected shape"] if rank == 1 else ["arguments of rank 1 failed their check"]
    _expect_error(expected, lambda: sharded_topk_memory_read(q, keys, values, 2))


def _replicated_queries_differ(rank, world_size):
    from l2m_kernels.distributed import sharded_topk_memory_read
    q, keys, values = _small_read_inputs()
    q = q + rank
    _expect_error(["q checksum differs across ranks"],
                  lambda: sharded_topk_memory_read(q, keys, values, 2))


def _k_beyond_the_memory(rank, world_size):
    from l2m_kernels.distributed import sharded_topk_memory_read
    q, keys, values = _small_read_inputs(slots=2)
    _expect_error([f"expected 1 <= k <= {2 * world_size}", f"over {world_size} ranks"],
                  lambda: sharded_topk_memory_read(q, keys, values, 2 * world_size + 1))


def _valid_len_beyond_the_memory(rank, world_size):
    from l2m_kernels.distributed import sharded_topk_memory_read
    q, keys, values = _small_read_inputs(slots=2)
    valid_len = torch.tensor([2 * world_size + rank])
    _expect_error([f"valid_len: expected 0 <= valid_len[b] <= N = {2 * world_size}",
                   f"on rank {world_size - 1}"],
                  lambda: sharded_topk_memory_read(q, keys, values, 1, queries="sharded",
                                                   valid_len=valid_len))


CASES = {
    "replicated_shared_float32": lambda r, p: _check_read(r, p),
    "replicated_batched_grouped_float64": lambda r, p: _check_read(
        r, p, dtype=torch.float64, shared=False, H=4, Hm=2, seed=1),
    "k_beyond_a_shard_with_valid_len": lambda r, p: _check_read(
        r, p, sizes="tiny", k=5, valid_len=_valid_len_mixed, B=6, H=4, Hm=1, seed=2),
    "empty_shards_float64": lambda r, p: _check_read(
        r, p, sizes="empty_first", dtype=torch.float64, k=6, seed=3),
    "ties_across_shards_float32": lambda r, p: _check_read(
        r, p, integer=True, scale=0.25, k=7, seed=4),
    "ties_across_shards_float64_batched": lambda r, p: _check_read(
        r, p, integer=True, scale=1.0, k=9, shared=False, dtype=torch.float64, H=4, seed=5),
    "sharded_queries_shared_valid_len": lambda r, p: _check_read(
        r, p, queries="sharded", valid_len=_valid_len_mixed, H=4, Hm=2, k=5, seed=6),
    "sharded_queries_batched_float64_ties": lambda r, p: _check_read(
        r, p, queries="sharded", shared=False, dtype=torch.float64, integer=True, scale=0.5, k=6,
        sizes="empty_first", seed=7),
    "replicated_bfloat16_grouped": lambda r, p: _check_read(
        r, p, dtype=torch.bfloat16, H=4, Hm=2, k=5, seed=12),
    "no_queries": lambda r, p: _check_read(r, p, T=0, queries="sharded", seed=13),
    "without_check": lambda r, p: _check_read(r, p, check=False, queries="sharded", seed=8),
    "ddp_step_with_the_memory_ignored": _ddp_step_with_a_sharded_memory,
    "nan_query_row": lambda r, p: _check_read(r, p, nan_query=True, grads=False, k=6, seed=9),
    "mismatched_query_shape_raises_everywhere": _mismatched_query_shape,
    "mismatched_k_and_dtype_raise_everywhere": _mismatched_k_and_dtype,
    "one_rank_bad_keys_raises_everywhere": _one_rank_bad_keys,
    "replicated_queries_that_differ_raise": _replicated_queries_differ,
    "k_beyond_the_memory_raises": _k_beyond_the_memory,
    "valid_len_beyond_the_memory_raises": _valid_len_beyond_the_memory,
    # After the refusals the group still works.
    "read_after_the_refusals": lambda r, p: _check_read(r, p, queries="sharded", seed=10),
}


group_results, test_sharded_topk_read = harness.case_tests(__name__, WORLD_SIZES)
