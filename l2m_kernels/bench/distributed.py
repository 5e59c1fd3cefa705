"""Benchmark the sharded memory read (:mod:`l2m_kernels.distributed`) against the number of ranks.

For P = 1, 2 and 4 gloo processes on the CPU (``torch.set_num_threads(1)`` each; ``--tiny``: 1 and
2), a memory of N = 65,536 slots in total (N / P per rank; ``--quick``: 16,384; ``--tiny``: 1,024),
one memory head, Dk = Dv = 64, k = 32, T = 1,024 replicated queries (``--quick``: 256; ``--tiny``:
32), float32, two variants, interleaved rep by rep:

- ``cpu sharded``: :func:`~l2m_kernels.distributed.sharded_topk_memory_read` (the local selection
  on the cpu backend), forward alone and forward + backward (gradients of q, keys and values);
- ``naive: gather the memory``: all-gather the keys and values of every rank, then
  :func:`l2m_kernels.topk_memory_read` of the whole memory; its backward reduce-scatters the
  gradients of the gathered memory back to the shards.

Times: the median over the reps of rank 0's time between two barriers (the collectives keep the
ranks in step). Bytes: counted while one read runs (:func:`l2m_kernels.distributed.collective_bytes`:
the buffer of every collective, per rank: an all-gather's output, an all-reduce's tensor, a
reduce-scatter's whole input), forward and backward apart, and per query. With P processes on
fewer cores the processes share them; the times then show the cost of the exchange on one machine,
not the speed of P machines.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch

from l2m_kernels import benchmark as bm

from ._common import skipped_row

OP = "sharded_topk_memory_read"
DIM, K, SEED = 64, 32, 0
FULL = dict(ranks=(1, 2, 4), slots=65536, queries=1024, reps=5)
QUICK = dict(ranks=(1, 2, 4), slots=16384, queries=256, reps=3)
TINY = dict(ranks=(1, 2), slots=1024, queries=32, reps=1)
TIMEOUT_S = 300


def _gather_slots(tensor, world_size):
    import torch.distributed as dist
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, -2)


def _scatter_slot_grads(grad, world_size):
    """This rank's slots of the sum of every rank's ``grad`` (the naive read's backward)."""
    import torch.distributed as dist
    pieces = list(grad.contiguous().chunk(world_size, -2))
    mine = torch.empty_like(pieces[0]).contiguous()
    dist.reduce_scatter(mine, [p.contiguous() for p in pieces])
    return mine


def _worker(rank: int, world_size: int, folder: str, sizes: dict) -> None:
    import torch.distributed as dist

    import l2m_kernels as l2m
    from l2m_kernels.distributed import collective_bytes, sharded_topk_memory_read

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))
    slots_local, queries = sizes["slots"] // world_size, sizes["queries"]
    gen = torch.Generator().manual_seed(SEED + rank)
    keys = torch.randn(1, slots_local, DIM, generator=gen)
    values = torch.randn(1, slots_local, DIM, generator=gen)
    q = torch.randn(1, 1, queries, DIM, generator=torch.Generator().manual_seed(SEED))
    cotangent = torch.randn(1, 1, queries, DIM, generator=torch.Generator().manual_seed(SEED + 1))
    leaves = [t.clone().requires_grad_(True) for t in (q, keys, values)]

    def sharded_fwd():
        with torch.no_grad():
            sharded_topk_memory_read(q, keys, values, K)

    def sharded_both():
        read = sharded_topk_memory_read(*leaves, K)
        torch.autograd.grad(read.out, leaves, cotangent)

    def naive_fwd():
        with torch.no_grad():
            l2m.topk_memory_read(q, _gather_slots(keys, world_size), _gather_slots(values, world_size), K)

    def naive_both():
        full = [_gather_slots(t, world_size).requires_grad_(True) for t in (keys, values)]
        q_leaf = q.clone().requires_grad_(True)
        read = l2m.topk_memory_read(q_leaf, *full, K)
        grads = torch.autograd.grad(read.out, [q_leaf, *full], cotangent)
        for grad in grads[1:]:
            _scatter_slot_grads(grad, world_size)

    timed = {"sharded fwd": sharded_fwd, "sharded both": sharded_both, "naive fwd": naive_fwd,
             "naive both": naive_both}
    traffic = {}
    for name, fn in timed.items():  # a warm-up each, the bytes of the forward and of fwd + bwd
        with collective_bytes() as sent:
            fn()
        traffic[name] = dict(sent)
    samples = {name: [] for name in timed}
    for _ in range(sizes["reps"]):
        for name, fn in timed.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            samples[name].append(time.perf_counter() - start)
    if rank == 0:
        with open(os.path.join(folder, "result.json"), "w") as handle:
            json.dump({"samples": samples, "traffic": traffic}, handle)
    dist.destroy_process_group()


def _run_group(world_size: int, sizes: dict) -> dict:
    from l2m_kernels.distributed.spawn import spawn_processes

    with tempfile.TemporaryDirectory() as folder:
        codes = spawn_processes(_worker, world_size, (folder, sizes), TIMEOUT_S)
        path = os.path.join(folder, "result.json")
        if any(code != 0 for code in codes) or not os.path.exists(path):
            raise RuntimeError(f"the benchmark's {world_size} gloo processes failed (exit codes {codes}; "
                               f"None: still running after {TIMEOUT_S} s)")
        with open(path) as handle:
            return json.load(handle)


def _bytes_note(fwd: dict, both: dict, queries: int) -> str:
    fwd_total = sum(fwd.values())
    bwd_total = sum(both.values()) - fwd_total
    per = ", ".join(f"{name} {count:,}" for name, count in sorted(fwd.items()))
    return (f"bytes per rank per read: forward {fwd_total:,} ({per}), {fwd_total / queries:,.0f} per "
            f"query; backward {bwd_total:,} ({bwd_total / queries:,.0f} per query)")


def _rows(world_size: int, sizes: dict, result: dict) -> list:
    samples, traffic = result["samples"], result["traffic"]
    queries, slots = sizes["queries"], sizes["slots"]
    shape = f"P={world_size} N={slots} T={queries} Dk=Dv={DIM} k={K}"
    naive_bytes = world_size * (slots // world_size) * 2 * DIM * 4
    rows = []
    for variant, key, extra in (
            ("cpu sharded", "sharded", "replicated queries"),
            ("naive: gather the memory", "naive",
             f"all-gather of P·N_r·(Dk+Dv)·4 = {naive_bytes:,} bytes per rank per read")):
        fwd_ms = [s * 1e3 for s in samples[f"{key} fwd"]]
        both_ms = [s * 1e3 for s in samples[f"{key} both"]]
        note = f"{extra}; " + _bytes_note(traffic[f"{key} fwd"], traffic[f"{key} both"], queries)
        rows.append(bm.Row(OP, shape, "float32", variant, statistics.median(fwd_ms), None,
                           statistics.median(both_ms), None, note=note,
                           fwd_spread_ms=[min(fwd_ms), max(fwd_ms)],
                           both_spread_ms=[min(both_ms), max(both_ms)], reps=len(fwd_ms)))
    return rows


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *,
        tiny: bool = False) -> list:
    if device.type != "cpu":
        return [skipped_row(OP, "-", torch.float32, "cpu sharded",
                            "skipped: this benchmark runs gloo processes on the CPU "
                            "(l2m-bench --device cpu --only distributed); NCCL is not measured")]
    sizes = TINY if tiny else QUICK if quick else FULL
    rows = []
    for world_size in sizes["ranks"]:
        rows += _rows(world_size, sizes, _run_group(world_size, sizes))
    return rows
