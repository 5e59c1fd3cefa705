"""The sharded ops inside ``torch.compile`` (fullgraph=False) on 2 gloo processes: a compiled
training step gives the loss and every gradient (parameters and inputs) of the same step run
eagerly, float32.

The sharded ops run eagerly, their collectives and cross-rank checks outside the compiled graphs
(a graph break at each call: ``l2m_kernels.distributed._meta.eager_only``); the projections and
losses around them compile. Each case starts from ``torch._dynamo.reset()``; the module steps run
twice, the second time with ``error_on_recompile`` (a new q, hence new checksums in the cross-rank
check, must reuse the graphs of the first step). ``ShardedProductKeyMemory`` is built on each rank
with uneven row shards (its replicated parameters must still agree across ranks).

Compiles are slow on a 2-core machine, so the sizes are tiny, inductor compiles in-process, and
three cases use the ``aot_eager`` backend (the graph breaks and autograd around the eager ops are
what they test); the other two go through inductor.

Each process group is spawned once and runs every case (``CASES``) in order (:mod:`harness`).
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from . import harness

# Inductor's parallel-compile workers would compete with the two ranks for the two cores: compile
# in-process (read when inductor's config first loads, in each spawned rank).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

WORLD_SIZES = (2,)
SIZES = [9, 14]                                   # uneven slot shards of the top-k memory
D_MODEL, HEADS, MEM_HEADS, DK, DV, K, B, T = 6, 2, 1, 4, 3, 4, 2, 3
PK_DIM, PK_N_SUB, PK_KEY_DIM, PK_VALUE_DIM, PK_HEADS, PK_K = 6, 5, 4, 3, 2, 3
PK_ROWS = [11, 14]                                # uneven row shards of the 25 product-key slots


def _compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend)


def _grads(named, x):
    """Every parameter's gradient and the input's, cleared for the next step."""
    grads = {name: param.grad.clone() for name, param in named}
    grads["x"] = x.grad.clone()
    for _, param in named:
        param.grad = None
    return grads


def _compare_steps(step, model, twin, inputs, backend):
    """``step(model, x, target)`` eagerly on ``model`` and compiled on ``twin`` (its copy), once per
    ``(x, target)`` of ``inputs``: the compiled runs after the first may not recompile."""
    compiled_step = _compiled(step, backend)
    results = []
    for number, (x, target) in enumerate(inputs):
        runs = []
        for runner, net in ((step, model), (compiled_step, twin)):
            leaf = harness.leaf(x)
            with torch._dynamo.config.patch(error_on_recompile=number > 0):
                loss = runner(net, leaf, target)
            loss.backward()
            runs.append((loss, _grads(list(net.named_parameters()), leaf)))
        results.append(runs)
    # (The comparisons after every collective of the case: see harness.)
    for number, (eager, compiled) in enumerate(results):
        _compare(f"step {number}", eager, compiled)


def _compare(step_name, eager, compiled):
    from l2m_kernels.testing import assert_close

    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = eager, compiled
    assert_close(f"{step_name} loss", compiled_loss.detach(), eager_loss.detach())
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        assert_close(f"{step_name} grad of {name}", compiled_grads[name], grad)


class _TopKModel(nn.Module):
    """x (B, T, D_MODEL) -> projection -> transposed (B, HEADS, T, DK) view -> sharded read."""

    def __init__(self, memory: nn.Module):
        super().__init__()
        self.proj = nn.Linear(D_MODEL, HEADS * DK)
        self.memory = memory

    def forward(self, x):
        q = self.proj(x).view(x.shape[0], x.shape[1], HEADS, DK).transpose(1, 2)
        read = self.memory(q)
        return read.out, read.lse


def _step(model, x, target):
    out, lse = model(x)
    return (out - target).square().mean() + 0.1 * lse.mean()


def _module_step(rank, world_size, queries, backend, seed):
    from l2m_kernels.distributed import ShardedTopKMemory

    torch.manual_seed(seed)  # the same replicated parameters and inputs on every rank
    keys = torch.randn(MEM_HEADS, sum(SIZES), DK)
    values = torch.randn(MEM_HEADS, sum(SIZES), DV)
    model = _TopKModel(ShardedTopKMemory.from_full(keys, values, K, sizes=SIZES, queries=queries))
    twin = copy.deepcopy(model)
    if queries == "sharded":  # each rank its own batch
        torch.manual_seed(seed + 1 + rank)
    inputs = [(torch.randn(B, T, D_MODEL), torch.randn(B, HEADS, T, DV)) for _ in range(2)]

    _compare_steps(_step, model, twin, inputs, backend)


def _direct_read(rank, world_size, backend):
    """``sharded_topk_memory_read`` called in a compiled function on a transposed q view, strided
    keys sliced out of a larger bank, and valid_len, every differentiable output in the loss."""
    from l2m_kernels.distributed import sharded_topk_memory_read

    torch.manual_seed(7)
    size = SIZES[rank]
    x = torch.randn(B, T, HEADS * DK)
    bank_keys = torch.randn(MEM_HEADS, 2 * size, DK)
    values = torch.randn(MEM_HEADS, size, DV)
    valid_len = torch.tensor([sum(SIZES), sum(SIZES) - 5])
    weights_target = torch.randn(B, HEADS, T, K)

    def read_loss(x, bank_keys, values):
        q = x.view(B, T, HEADS, DK).transpose(1, 2)              # non-contiguous
        keys = bank_keys[:, ::2]                                  # strided slots
        read = sharded_topk_memory_read(q, keys, values, K, valid_len=valid_len)
        return (read.out.sin().sum() + (read.weights * weights_target).sum() + read.lse.square().sum(),
                read.indices)

    runs, indices = [], []
    for fn in (read_loss, _compiled(read_loss, backend)):
        leaves = [harness.leaf(t) for t in (x, bank_keys, values)]
        loss, ids = fn(*leaves)
        loss.backward()
        runs.append((loss, {name: leaf.grad for name, leaf in zip(("x", "bank_keys", "values"), leaves)}))
        indices.append(ids)
    assert torch.equal(indices[1], indices[0])
    _compare("read", *runs)


def _write(rank, world_size, backend):
    """``sharded_gated_memory_write`` (replicated writes) called in a compiled function, its
    weights, add and erase projected from ``x`` there; the loss on the new shard."""
    from l2m_kernels.distributed import sharded_gated_memory_write

    torch.manual_seed(11)  # the same writes on every rank
    total, width = sum(SIZES), 2 + 2 * DV
    indices = torch.randint(-1, total, (B, MEM_HEADS, T, 2))
    x, proj = torch.randn(B, T, D_MODEL), torch.randn(D_MODEL, MEM_HEADS * width)
    memory = torch.randn(B, MEM_HEADS, total, DV).narrow(2, harness.offsets(SIZES)[rank], SIZES[rank])

    def write_loss(x, proj, memory):
        h = (x @ proj).view(B, T, MEM_HEADS, width).transpose(1, 2)
        weights, add, erase = h.split([2, DV, DV], -1)
        new = sharded_gated_memory_write(memory, indices, weights.sigmoid(), add, erase.sigmoid())
        return new.square().sum()

    runs = []
    for fn in (write_loss, _compiled(write_loss, backend)):
        leaves = [harness.leaf(t) for t in (x, proj, memory)]
        loss = fn(*leaves)
        loss.backward()
        runs.append((loss, {name: leaf.grad for name, leaf in zip(("x", "proj", "memory"), leaves)}))
    _compare("write", *runs)


class _PKModel(nn.Module):
    def __init__(self, memory):
        super().__init__()
        self.proj = nn.Linear(PK_DIM, PK_DIM)
        self.memory = memory

    def forward(self, x):
        return self.memory(self.proj(x))


def _pk_step(model, x, target):
    return (model(x) - target).square().mean()


def _product_key_step(rank, world_size, backend, seed):
    from l2m_kernels.distributed import ShardedProductKeyMemory

    model = _PKModel(ShardedProductKeyMemory(PK_DIM, PK_N_SUB, PK_KEY_DIM, local_size=PK_ROWS[rank],
                                             shard="rows", value_dim=PK_VALUE_DIM, heads=PK_HEADS,
                                             k=PK_K, seed=seed))
    torch.manual_seed(seed)  # the same projection and inputs on every rank (replicated queries)
    model.proj.reset_parameters()
    twin = copy.deepcopy(model)
    inputs = [(torch.randn(B, T, PK_DIM), torch.randn(B, T, PK_DIM)) for _ in range(2)]
    _compare_steps(_pk_step, model, twin, inputs, backend)


CASES = {
    "module_step_replicated_queries_inductor": lambda r, p: _module_step(r, p, "replicated", "inductor", 0),
    "module_step_sharded_queries_aot_eager": lambda r, p: _module_step(r, p, "sharded", "aot_eager", 1),
    "direct_read_transposed_q_inductor": lambda r, p: _direct_read(r, p, "inductor"),
    "write_replicated_aot_eager": lambda r, p: _write(r, p, "aot_eager"),
    "product_key_module_rows_aot_eager": lambda r, p: _product_key_step(r, p, "aot_eager", 2),
}


group_results, test_sharded_compile = harness.case_tests(__name__, WORLD_SIZES)
