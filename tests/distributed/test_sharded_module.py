"""ShardedTopKMemory on 2 and 4 gloo processes: its seeded shards concatenate to the memory drawn
whole, and a training step of a small model (a projection, the memory, a loss) gives the loss and
gradients of the single-process model reading the whole memory with ``topk_memory_read``, alone
and with DDP around the model or FSDP2 (``fully_shard``) on the rest of it (replicated and sharded
queries).

Each process group is spawned once per world size and runs every case (``CASES``) in order
(:mod:`harness`).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from . import harness

WORLD_SIZES = (2, 4)
UNEVEN = {2: [700, 1500], 4: [300, 0, 1100, 650]}  # across the 1024-slot chunks of the init
D_MODEL, HEADS, MEM_HEADS, DK, DV, K, T = 6, 4, 2, 8, 5, 6, 3


def _initial_shards_concatenate(rank, world_size):
    from l2m_kernels.distributed import ShardedTopKMemory, seeded_memory

    sizes = UNEVEN[world_size]
    memory = ShardedTopKMemory(sizes[rank], DK, DV, K, num_heads=MEM_HEADS, seed=5)
    keys, values = seeded_memory(sum(sizes), DK, DV, MEM_HEADS, seed=5)
    offset = harness.offsets(sizes)[rank]
    assert memory.num_slots == sum(sizes) and memory.offset == offset
    assert torch.equal(memory.keys, keys[:, offset:offset + sizes[rank]])
    assert torch.equal(memory.values, values[:, offset:offset + sizes[rank]])


class _Model(nn.Module):
    """x (B, T, D_MODEL) -> projection -> memory read -> out (B, HEADS, T, DV)."""

    def __init__(self, memory: nn.Module, proj_weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(D_MODEL, HEADS * DK, bias=False)
        self.proj.weight.data.copy_(proj_weight)
        self.memory = memory

    def forward(self, x):
        q = self.proj(x).view(x.shape[0], T, HEADS, DK).transpose(1, 2)
        return self.memory(q).out


class _WholeMemory(nn.Module):
    """The single-process reference: topk_memory_read of the whole memory."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values = nn.Parameter(keys.clone()), nn.Parameter(values.clone())

    def forward(self, q):
        import l2m_kernels as l2m
        return l2m.topk_memory_read(q, self.keys, self.values, K)


def _training_step(rank, world_size, *, queries="replicated", wrap=None, B=2, seed=0):
    """One step on this rank against the same step of the single-process model on every rank's
    batch; with sharded queries the loss is the mean over the ranks' batches, and the memory's
    gradient (summed over the ranks' queries, outside DDP's or FSDP2's averaging) is world_size
    times its gradient. ``wrap``: None, "ddp" (DDP around the model, the memory excluded) or
    "fsdp2" (``fully_shard`` on the projection only)."""
    from torch.nn.parallel import DistributedDataParallel

    from l2m_kernels.distributed import ShardedTopKMemory, exclude_from_ddp, shard_of
    from l2m_kernels.testing import assert_close

    gen = torch.Generator().manual_seed(seed)
    total = sum(UNEVEN[world_size])
    keys = torch.randn(MEM_HEADS, total, DK, generator=gen)
    values = torch.randn(MEM_HEADS, total, DV, generator=gen)
    proj_weight = torch.randn(HEADS * DK, D_MODEL, generator=gen)
    batch_all = B * world_size if queries == "sharded" else B
    x = torch.randn(batch_all, T, D_MODEL, generator=gen)
    target = torch.randn(batch_all, HEADS, T, DV, generator=gen)

    sizes = UNEVEN[world_size]
    model = _Model(ShardedTopKMemory.from_full(keys, values, K, sizes=sizes, queries=queries), proj_weight)
    runner = model
    if wrap == "ddp":
        names = exclude_from_ddp(model)
        assert names == ["memory.keys", "memory.values"], names
        runner = DistributedDataParallel(model)
    elif wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.proj)
    own = slice(rank * B, (rank + 1) * B) if queries == "sharded" else slice(None)
    loss = (runner(x[own]) - target[own]).square().mean()
    loss.backward()

    reference = _Model(_WholeMemory(keys, values), proj_weight)
    ref_loss = (reference(x) - target).square().mean()
    ref_loss.backward()
    memory_factor = world_size if queries == "sharded" else 1
    if queries == "replicated":
        assert_close("loss", loss, ref_loss)
    proj_grad = model.proj.weight.grad
    if wrap == "fsdp2":  # a DTensor sharded across the ranks
        proj_grad = proj_grad.full_tensor()
    assert_close("proj", proj_grad, reference.proj.weight.grad)
    assert_close("dkeys", model.memory.keys.grad / memory_factor,
                 shard_of(reference.memory.keys.grad, sizes=sizes))
    assert_close("dvalues", model.memory.values.grad / memory_factor,
                 shard_of(reference.memory.values.grad, sizes=sizes))


def _root_memory_refused(rank, world_size):
    from l2m_kernels.distributed import ShardedTopKMemory, exclude_from_ddp

    memory = ShardedTopKMemory(3, DK, DV, 2)
    harness.expect_error(["make it a submodule"], lambda: exclude_from_ddp(memory))


CASES = {
    "initial_shards_concatenate": _initial_shards_concatenate,
    "step_replicated_queries": lambda r, p: _training_step(r, p),
    "step_replicated_queries_with_ddp": lambda r, p: _training_step(r, p, wrap="ddp", seed=1),
    "step_sharded_queries_with_ddp": lambda r, p: _training_step(r, p, queries="sharded", wrap="ddp", seed=2),
    "step_sharded_queries_with_fsdp2": lambda r, p: _training_step(r, p, queries="sharded", wrap="fsdp2",
                                                                   seed=3),
    "step_replicated_queries_with_fsdp2": lambda r, p: _training_step(r, p, wrap="fsdp2", seed=4),
    "root_memory_refused_by_exclude_from_ddp": _root_memory_refused,
}


group_results, test_sharded_topk_memory_module = harness.case_tests(__name__, WORLD_SIZES)


def test_seeded_memory_slices_equal_the_whole():
    from l2m_kernels.distributed import INIT_CHUNK, seeded_memory, shard_sizes

    keys, values = seeded_memory(2 * INIT_CHUNK + 7, 3, 4, 2, seed=1)
    part = seeded_memory(2 * INIT_CHUNK + 7, 3, 4, 2, seed=1, start=INIT_CHUNK - 5, count=INIT_CHUNK + 9)
    assert torch.equal(part[0], keys[:, INIT_CHUNK - 5:2 * INIT_CHUNK + 4])
    assert torch.equal(part[1], values[:, INIT_CHUNK - 5:2 * INIT_CHUNK + 4])
    assert shard_sizes(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="start, count"):
        seeded_memory(10, 3, 4, start=8, count=3)


def test_seeds_draw_different_memories():
    from l2m_kernels.distributed import INIT_CHUNK, seeded_memory, seeded_value_rows

    for start in (0, INIT_CHUNK + 3):  # the first chunk and a later one
        a = seeded_memory(3 * INIT_CHUNK, 4, 4, seed=1, start=start, count=8)
        b = seeded_memory(3 * INIT_CHUNK, 4, 4, seed=2, start=start, count=8)
        assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
        assert not torch.equal(seeded_value_rows(1, start, 8, 4), seeded_value_rows(2, start, 8, 4))
    # Chunks of one seed differ from each other.
    whole = seeded_value_rows(1, 0, 2 * INIT_CHUNK, 4)
    assert not torch.equal(whole[:INIT_CHUNK], whole[INIT_CHUNK:])
