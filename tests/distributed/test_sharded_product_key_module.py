"""ShardedProductKeyMemory on 2 and 4 gloo processes: its seeded shards (by rows and by columns)
concatenate to the values drawn whole, and a training step of a small model around it gives the
loss and every gradient of the single-process model around ProductKeyMemory (the values' gradient
sliced to the shard), alone, with DDP around the model (the values shard left out of it) or with
FSDP2 (``fully_shard`` on the model, the values shard in ``ignored_params``; torch >= 2.7), with
replicated queries and with sharded queries (each rank its own batch: the values shard's gradient
sums every rank's, world_size times the gradient of the mean loss), dense and sparse.

Each process group is spawned once per world size and runs every case (``CASES``) in order
(:mod:`harness`).
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from . import harness


def _fsdp2_ignores_params() -> bool:
    """torch >= 2.7: ``fully_shard(..., ignored_params=...)``."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return False
    return "ignored_params" in inspect.signature(fully_shard).parameters


FSDP2_IGNORED_PARAMS = _fsdp2_ignores_params()

WORLD_SIZES = (2, 4)
DIM, N_SUB, KEY_DIM, VALUE_DIM, HEADS, K, B, T = 6, 40, 8, 7, 2, 5, 2, 3  # 1,600 slots: two init chunks
ROWS = {2: [900, 700], 4: [300, 0, 1100, 200]}
COLUMNS = {2: [4, 3], 4: [2, 0, 4, 1]}


def _shares(shard, world_size):
    return (ROWS if shard == "rows" else COLUMNS)[world_size]


def _seeded_shards_concatenate(rank, world_size, shard):
    from l2m_kernels.distributed import ShardedProductKeyMemory, seeded_value_rows

    sizes = _shares(shard, world_size)
    layer, other = (ShardedProductKeyMemory(DIM, N_SUB, KEY_DIM, local_size=sizes[rank], shard=shard,
                                            value_dim=VALUE_DIM, heads=HEADS, k=K, seed=3) for _ in range(2))
    # (The comparisons after every collective of the case: see harness.)
    whole = seeded_value_rows(3, 0, N_SUB * N_SUB, VALUE_DIM)
    start = harness.offsets(sizes)[rank]
    want = whole[start:start + sizes[rank]] if shard == "rows" else whole[:, start:start + sizes[rank]]
    assert torch.equal(layer.values.detach(), want)
    for (name, a), (_, b) in zip(layer.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name   # replicated parameters: the same from the same seed


class _Model(nn.Module):
    def __init__(self, memory):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.memory = memory

    def forward(self, x):
        return self.memory(self.proj(x))


def _training_step(rank, world_size, shard, *, gated=False, ddp=False, fsdp2=False, seed=0,
                   queries="replicated", sparse_grad=False):
    """One step against the single-process model on every rank's batch. ``ddp``: DDP around the
    model (the values shard excluded); ``fsdp2``: ``fully_shard`` on the whole model, the values shard
    in ``ignored_params`` (the memory's replicated parameters sharded and averaged like the rest)."""
    from torch.nn.parallel import DistributedDataParallel

    from l2m_kernels.distributed import ShardedProductKeyMemory, exclude_from_ddp, shard_of
    from l2m_kernels.modules import ProductKeyMemory
    from l2m_kernels.testing import assert_close

    torch.manual_seed(seed)  # the same full model on every rank
    reference = _Model(ProductKeyMemory(DIM, N_SUB, KEY_DIM, value_dim=VALUE_DIM, heads=HEADS, k=K,
                                        gated=gated, sparse_grad=sparse_grad))
    sizes = _shares(shard, world_size)
    model = _Model(ShardedProductKeyMemory.from_full(reference.memory, shard=shard, sizes=sizes,
                                                     queries=queries))
    model.proj.load_state_dict(reference.proj.state_dict())
    runner = model
    if ddp:
        assert exclude_from_ddp(model) == ["memory.values"]
        runner = DistributedDataParallel(model)
    if fsdp2:
        from torch.distributed.fsdp import fully_shard

        from l2m_kernels.distributed import sharded_parameters
        assert sharded_parameters(model) == {model.memory.values}
        fully_shard(model, ignored_params=sharded_parameters(model))
    gen = torch.Generator().manual_seed(seed + 100)
    sharded = queries == "sharded"
    x = torch.randn(B * world_size if sharded else B, T, DIM, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    mine = slice(rank * B, (rank + 1) * B) if sharded else slice(None)
    loss = (runner(x[mine]) - target[mine]).square().mean()
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world_size)]
    torch.distributed.all_gather(losses, loss.detach())
    ref_loss = (reference(x) - target).square().mean()
    ref_loss.backward()
    assert_close("loss", torch.stack(losses).mean(), ref_loss)
    shards = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        grad = param.grad
        got = shards[name].grad
        if fsdp2 and name != "memory.values":  # a DTensor sharded across the ranks
            got = got.full_tensor()
        if name == "memory.values":
            assert got.is_sparse == sparse_grad
            got = got.to_dense() if sparse_grad else got
            grad = shard_of(grad.to_dense() if sparse_grad else grad, sizes=sizes,
                            dim=-2 if shard == "rows" else -1)
            grad = grad * (world_size if sharded else 1)   # every rank's loss, not their mean
        assert_close(name, got, grad)


CASES = {
    "seeded_row_shards_concatenate": lambda r, p: _seeded_shards_concatenate(r, p, "rows"),
    "seeded_column_shards_concatenate": lambda r, p: _seeded_shards_concatenate(r, p, "columns"),
    "step_rows": lambda r, p: _training_step(r, p, "rows"),
    "step_columns_gated": lambda r, p: _training_step(r, p, "columns", gated=True, seed=1),
    "step_rows_with_ddp": lambda r, p: _training_step(r, p, "rows", ddp=True, seed=2),
    "step_columns_with_ddp": lambda r, p: _training_step(r, p, "columns", ddp=True, seed=3),
    "step_sharded_queries_rows_with_ddp": lambda r, p: _training_step(r, p, "rows", ddp=True, seed=4,
                                                                      queries="sharded"),
    "step_sharded_queries_columns_gated_with_ddp": lambda r, p: _training_step(
        r, p, "columns", ddp=True, gated=True, seed=5, queries="sharded"),
    "step_rows_sparse_grad": lambda r, p: _training_step(r, p, "rows", seed=6, sparse_grad=True),
    "step_sharded_queries_columns_sparse_grad_with_ddp": lambda r, p: _training_step(
        r, p, "columns", ddp=True, seed=7, queries="sharded", sparse_grad=True),
}

if FSDP2_IGNORED_PARAMS:
    CASES.update({
        "step_sharded_queries_rows_with_fsdp2": lambda r, p: _training_step(r, p, "rows", fsdp2=True, seed=8,
                                                                            queries="sharded"),
        "step_columns_with_fsdp2": lambda r, p: _training_step(r, p, "columns", fsdp2=True, seed=9),
    })


group_results, test_sharded_product_key_memory = harness.case_tests(__name__, WORLD_SIZES)


def test_fsdp2_cases_run_where_fully_shard_ignores_params():
    if not FSDP2_IGNORED_PARAMS:
        pytest.skip(f"torch {torch.__version__}: fully_shard has no ignored_params (torch >= 2.7), so the "
                    "FSDP2 cases around ShardedProductKeyMemory are not run")
    assert {"step_sharded_queries_rows_with_fsdp2", "step_columns_with_fsdp2"} <= set(CASES)
