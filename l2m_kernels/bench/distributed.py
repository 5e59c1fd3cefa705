"""Benchmark the sharded memory reads and write (:mod:`l2m_kernels.distributed`: the top-k read,
the product-key read and the gated write) against the number of ranks.

For P = 1, 2 and 4 gloo processes on the CPU (``torch.set_num_threads(1)`` each; ``--tiny``: 1 and
2), one memory head, float32, T = 1,024 queries per read in the group (``--quick``: 256;
``--tiny``: 32), and three memories, every variant below interleaved rep by rep with every other.
The reads run in each of the two query layouts: ``queries="replicated"`` (every rank the same T
queries) and ``queries="sharded"`` (data parallel: each rank its own T / P queries, seeded per
rank, so that the group reads P·(T / P) = T queries as with replicated ones; the shape of these
rows says ``queries=sharded`` and gives the T of one rank).

Top-k read: a shared (Hm, N_r, Dk) memory of N = 65,536 slots in total (N / P per rank;
``--quick``: 16,384; ``--tiny``: 1,024), Dk = Dv = 64, k = 32, two variants per query layout:

- ``cpu sharded``: :func:`~l2m_kernels.distributed.sharded_topk_memory_read` (the local selection
  on the cpu backend), forward alone and forward + backward (gradients of q, keys and values);
  with sharded queries it all-gathers every rank's queries, selects candidates for all of them and
  reduce-scatters the partial outputs, and its keys' and values' gradients sum every rank's
  queries' contributions;
- ``naive: gather the memory``: all-gather the keys and values of every rank, then
  :func:`l2m_kernels.topk_memory_read` of the whole memory (with sharded queries, of this rank's
  own queries); its backward reduce-scatters the gradients of the gathered memory back to the
  shards (with sharded queries: every rank's gradient of its own queries, summed over the ranks,
  the sharded read's gradient).

Product-key read: a memory of n_sub = 256 sub-keys per half, N = n_sub ** 2 = 65,536 slots
(``--quick``: n_sub = 128, N = 16,384; ``--tiny``: n_sub = 32, N = 1,024), replicated sub-keys,
Dk = Dv = 64, k = k_sub = 32 (``--tiny``: 8), the values split in each of the two shard modes
(``shard="rows"``: N / P slots per rank; ``shard="columns"``: Dv / P features of every slot per
rank), two variants per mode and query layout:

- ``cpu sharded``: :func:`~l2m_kernels.distributed.sharded_product_key_read` (the selection on the
  cpu backend), forward alone and forward + backward (gradients of q, subkeys and values); with
  sharded queries each rank selects for its own queries and the selections are all-gathered;
- ``naive: gather the values``: all-gather the value shards of every rank (rows: along dim 0;
  columns: along dim 1), then :func:`l2m_kernels.product_key_read` of the whole memory (with
  sharded queries, of this rank's own queries); its backward sends the gradient of the gathered
  values back to its owners: reduce-scattered by rows (rows), or all-reduced, each rank keeping its
  own columns of the sum (columns), in both layouts (with sharded queries the sum over the ranks
  is the sharded read's values gradient).

Gated write: a memory of N = 65,536 slots in total (N / P per rank; ``--quick``: 16,384;
``--tiny``: 1,024), B = 1, D = 64, T = 256 write steps (``--quick``: 64; ``--tiny``: 8) of kw = 4
slots each, at random global slot ids (seeded, the same on every rank), in each of the two query
layouts (``queries="replicated"``: every rank passes the same writes; ``queries="sharded"``: each
rank passes its own batch of writes, its own weights, add and erase vectors, and the memory holds
every rank's batch, (P·B, Hm, N_r, D) per rank), two variants per layout:

- ``cpu sharded``: :func:`~l2m_kernels.distributed.sharded_gated_memory_write`, forward alone and
  forward + backward (gradients of memory, weights, add and erase);
- ``naive: gather the memory``: all-gather the memory shards of every rank along the slot dim (and,
  with sharded writes, every rank's writes along the batch dim), then
  :func:`l2m_kernels.gated_memory_write` of the whole memory, keeping this rank's slots; its
  backward reduce-scatters the gradient of the gathered memory back to the shards and sums the
  gradients of the writes over the ranks as the sharded write does (weights, add and erase in one
  buffer, as the sharded write packs them; replicated: an all-reduce; sharded: a reduce-scatter
  back to each write's rank).

Times: the median over the reps of rank 0's time between two barriers (the collectives keep the
ranks in step). Bytes: counted while one read or write runs
(:func:`l2m_kernels.distributed.collective_bytes`: the buffer of every collective, per rank: an
all-gather's output, an all-reduce's tensor, a reduce-scatter's whole input), forward and backward
apart, and per query for the reads, per write step (of this rank's T) for the write. With sharded
queries a read's bytes are per query of the group: a rank's bytes divided by the P·(T / P) = T
queries of every rank together (the notes say "per query of the group"), comparable with the
replicated rows' per query (an all-to-all counts what the rank receives). (Each rank reads T / P sharded queries rather than T: the group then
serves as many queries as in the replicated rows, on the same memory, and the sharded read's
selection per rank, over all P·(T / P) queries, is as large as the replicated read's: the run grows
by about the replicated reads' time instead of P times it.) With P processes on fewer cores the
processes share them; the times then show the cost of the exchange on one machine, not the speed
of P machines.
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
PK_OP = "sharded_product_key_read"
PK_SHARDS = ("rows", "columns")
WRITE_OP = "sharded_gated_memory_write"
WRITE_LAYOUTS = ("replicated", "sharded")
READ_LAYOUTS = ("replicated", "sharded")  # the reads' query layouts (sharded: T / P per rank)
DIM, K, SEED = 64, 32, 0
KW = 4  # the write's slots per step
# slots, K: the top-k read's (and the write's slot count); n_sub, pk_k (= k_sub): the product-key
# read's (n_sub ** 2 slots); writes: the write's steps T.
FULL = dict(ranks=(1, 2, 4), slots=65536, queries=1024, reps=5, n_sub=256, pk_k=32, writes=256)
QUICK = dict(ranks=(1, 2, 4), slots=16384, queries=256, reps=3, n_sub=128, pk_k=32, writes=64)
TINY = dict(ranks=(1, 2), slots=1024, queries=32, reps=1, n_sub=32, pk_k=8, writes=8)
TIMEOUT_S = 300


def _gather_slots(tensor, world_size, dim=-2):
    """Every rank's ``tensor`` concatenated along ``dim`` in rank order (one all-gather)."""
    import torch.distributed as dist
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim)


def _scatter_slot_grads(grad, world_size, dim=-2):
    """This rank's slots (its part along ``dim``) of the sum of every rank's ``grad`` (the naive
    read's backward: one reduce-scatter)."""
    import torch.distributed as dist
    pieces = list(grad.contiguous().chunk(world_size, dim))
    mine = torch.empty_like(pieces[0]).contiguous()
    dist.reduce_scatter(mine, [p.contiguous() for p in pieces])
    return mine


def _narrow_column_grads(grad, rank, world_size):
    """This rank's columns of the sum of every rank's ``grad`` (the naive column read's backward:
    one all-reduce of the whole gradient, then each rank keeps its own columns)."""
    import torch.distributed as dist
    summed = grad.contiguous()
    dist.all_reduce(summed)
    width = summed.shape[-1] // world_size
    return summed.narrow(-1, rank * width, width)


def _read_queries(sizes: dict, world_size: int, layout: str) -> int:
    """A read's queries per rank: all T of them (replicated), or T / P (sharded: each rank its own,
    P·(T / P) = T in the group, the replicated rows' count)."""
    return sizes["queries"] if layout == "replicated" else sizes["queries"] // world_size


def _layout_prefix(layout: str) -> str:
    """The query layout in a read's shape string and result names: nothing for replicated queries
    (their rows' names as before), ``"queries=sharded "`` for sharded ones."""
    return "" if layout == "replicated" else f"queries={layout} "


def _own_queries(rank: int, world_size: int, sizes: dict):
    """Sharded queries: this rank's own (q, cotangent of out), (1, 1, T / P, DIM) each, seeded per
    rank."""
    count = _read_queries(sizes, world_size, "sharded")
    gen = torch.Generator().manual_seed(SEED + 300 + rank)
    return torch.randn(1, 1, count, DIM, generator=gen), torch.randn(1, 1, count, DIM, generator=gen)


def _topk_variants(rank: int, world_size: int, sizes: dict, layout: str) -> dict:
    """The top-k read's timed functions for one query layout, by name (the names of the recorded
    results). The fwd + bwd functions return ``(out, (dq, dkeys, dvalues))`` of this rank: its
    queries' ``dq``, its shard's ``dkeys`` and ``dvalues``."""
    import l2m_kernels as l2m
    from l2m_kernels.distributed import sharded_topk_memory_read

    slots_local = sizes["slots"] // world_size
    gen = torch.Generator().manual_seed(SEED + rank)
    keys = torch.randn(1, slots_local, DIM, generator=gen)  # shared (Hm, N_r, Dk)
    values = torch.randn(1, slots_local, DIM, generator=gen)
    if layout == "replicated":
        q = torch.randn(1, 1, sizes["queries"], DIM, generator=torch.Generator().manual_seed(SEED))
        cotangent = torch.randn(1, 1, sizes["queries"], DIM,
                                generator=torch.Generator().manual_seed(SEED + 1))
    else:
        q, cotangent = _own_queries(rank, world_size, sizes)
    leaves = [t.clone().requires_grad_(True) for t in (q, keys, values)]

    def sharded_fwd():
        with torch.no_grad():
            return sharded_topk_memory_read(q, keys, values, K, queries=layout).out

    def sharded_both():
        read = sharded_topk_memory_read(*leaves, K, queries=layout)
        return read.out, torch.autograd.grad(read.out, leaves, cotangent)

    def naive_fwd():
        with torch.no_grad():
            return l2m.topk_memory_read(q, _gather_slots(keys, world_size), _gather_slots(values, world_size),
                                        K).out

    def naive_both():
        # Sharded queries: the reduce-scatter sums every rank's queries' gradient of the gathered
        # memory, as the sharded read's dkeys and dvalues do.
        full = [_gather_slots(t, world_size).requires_grad_(True) for t in (keys, values)]
        q_leaf = q.clone().requires_grad_(True)
        read = l2m.topk_memory_read(q_leaf, *full, K)
        grads = torch.autograd.grad(read.out, [q_leaf, *full], cotangent)
        return read.out, (grads[0], *(_scatter_slot_grads(grad, world_size) for grad in grads[1:]))

    prefix = _layout_prefix(layout)
    return {f"{prefix}sharded fwd": sharded_fwd, f"{prefix}sharded both": sharded_both,
            f"{prefix}naive fwd": naive_fwd, f"{prefix}naive both": naive_both}


def _pk_variants(rank: int, world_size: int, sizes: dict, shard: str, layout: str = "replicated") -> dict:
    """The product-key read's timed functions for one shard mode and query layout, by name. The fwd
    + bwd functions return ``(out, (dq, dsubkeys, dvalues))`` of this rank: its queries' ``dq`` and
    ``dsubkeys``, its shard's ``dvalues``."""
    import l2m_kernels as l2m
    from l2m_kernels.distributed import sharded_product_key_read

    n_sub, k = sizes["n_sub"], sizes["pk_k"]
    by_rows = shard == "rows"
    shape = (n_sub * n_sub // world_size, DIM) if by_rows else (n_sub * n_sub, DIM // world_size)
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(SEED + 100 + rank))
    replicated = torch.Generator().manual_seed(SEED + 2)
    q = torch.randn(1, 1, sizes["queries"], DIM, generator=replicated)
    subkeys = torch.randn(1, 2, n_sub, DIM // 2, generator=replicated)  # replicated in both layouts
    cotangent = torch.randn(1, 1, sizes["queries"], DIM, generator=replicated)
    if layout == "sharded":
        q, cotangent = _own_queries(rank, world_size, sizes)
    leaves = [t.clone().requires_grad_(True) for t in (q, subkeys, values)]
    gather_dim = 0 if by_rows else 1

    def sharded_fwd():
        with torch.no_grad():
            return sharded_product_key_read(q, subkeys, values, k, k_sub=k, shard=shard, queries=layout).out

    def sharded_both():
        read = sharded_product_key_read(*leaves, k, k_sub=k, shard=shard, queries=layout)
        return read.out, torch.autograd.grad(read.out, leaves, cotangent)

    def naive_fwd():
        with torch.no_grad():
            return l2m.product_key_read(q, subkeys, _gather_slots(values, world_size, gather_dim), k,
                                        k_sub=k).out

    def naive_both():
        # Both send every rank's gradient of the gathered values to its owners summed over the
        # ranks: with sharded queries, every rank's queries' contributions, as the sharded read's.
        full = _gather_slots(values, world_size, gather_dim).requires_grad_(True)
        q_leaf, subkeys_leaf = (t.clone().requires_grad_(True) for t in (q, subkeys))
        read = l2m.product_key_read(q_leaf, subkeys_leaf, full, k, k_sub=k)
        grads = torch.autograd.grad(read.out, [q_leaf, subkeys_leaf, full], cotangent)
        if by_rows:
            mine = _scatter_slot_grads(grads[2], world_size)
        else:
            mine = _narrow_column_grads(grads[2], rank, world_size)
        return read.out, (grads[0], grads[1], mine)

    prefix = f"pk {_layout_prefix(layout)}{shard}"
    return {f"{prefix} sharded fwd": sharded_fwd, f"{prefix} sharded both": sharded_both,
            f"{prefix} naive fwd": naive_fwd, f"{prefix} naive both": naive_both}


def _write_variants(rank: int, world_size: int, sizes: dict, layout: str) -> dict:
    """The gated write's timed functions for one query layout, by name."""
    import torch.distributed as dist

    import l2m_kernels as l2m
    from l2m_kernels.distributed import sharded_gated_memory_write

    slots, steps = sizes["slots"], sizes["writes"]
    slots_local = slots // world_size
    by_batch = layout == "sharded"
    rows = world_size if by_batch else 1  # the memory's batch: every rank's with sharded writes
    own = torch.Generator().manual_seed(SEED + 200 + rank)
    memory = torch.randn(rows, 1, slots_local, DIM, generator=own)
    cotangent = torch.randn(rows, 1, slots_local, DIM, generator=own)
    replicated = torch.Generator().manual_seed(SEED + 3)
    indices = torch.randint(0, slots, (1, 1, steps, KW), generator=replicated)
    writes_gen = own if by_batch else replicated  # sharded writes: each rank its own
    weights = torch.rand(1, 1, steps, KW, generator=writes_gen)
    add = torch.randn(1, 1, steps, DIM, generator=writes_gen)
    erase = torch.rand(1, 1, steps, DIM, generator=writes_gen)
    leaves = [t.clone().requires_grad_(True) for t in (memory, weights, add, erase)]
    widths = [KW, DIM, DIM]

    def sharded_fwd():
        with torch.no_grad():
            sharded_gated_memory_write(memory, indices, weights, add, erase, queries=layout)

    def sharded_both():
        new = sharded_gated_memory_write(*leaves[:1], indices, *leaves[1:], queries=layout)
        torch.autograd.grad(new, leaves, cotangent)

    def naive_inputs():
        """The gathered memory and the writes (every rank's with sharded writes: one all-gather
        of the slot ids, one of the three float operands together)."""
        full = _gather_slots(memory, world_size)
        packed = torch.cat([weights, add, erase], -1)
        if by_batch:
            return full, _gather_slots(indices, world_size, 0), _gather_slots(packed, world_size, 0)
        return full, indices, packed

    def naive_write(full, ids, packed):
        """The whole memory written, this rank's slots kept."""
        new = l2m.gated_memory_write(full, ids, *packed.split(widths, -1))
        return new.narrow(-2, rank * slots_local, slots_local)

    def naive_fwd():
        with torch.no_grad():
            naive_write(*naive_inputs())

    def naive_both():
        full, ids, packed = naive_inputs()
        full, packed = full.requires_grad_(True), packed.requires_grad_(True)
        grad_full, grad_packed = torch.autograd.grad(naive_write(full, ids, packed), [full, packed], cotangent)
        _scatter_slot_grads(grad_full, world_size)
        if by_batch:  # gathered along the batch dim: the sum of every rank's gradient of its writes
            _scatter_slot_grads(grad_packed, world_size, 0)
        else:
            dist.all_reduce(grad_packed)

    return {f"write {layout} sharded fwd": sharded_fwd, f"write {layout} sharded both": sharded_both,
            f"write {layout} naive fwd": naive_fwd, f"write {layout} naive both": naive_both}


def _worker(rank: int, world_size: int, folder: str, sizes: dict) -> None:
    import torch.distributed as dist

    from l2m_kernels.distributed import collective_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))
    timed = {}
    for layout in READ_LAYOUTS:
        timed.update(_topk_variants(rank, world_size, sizes, layout))
    for shard in PK_SHARDS:
        for layout in READ_LAYOUTS:
            timed.update(_pk_variants(rank, world_size, sizes, shard, layout))
    for layout in WRITE_LAYOUTS:
        timed.update(_write_variants(rank, world_size, sizes, layout))
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


def _bytes_note(fwd: dict, both: dict, count: int, call: str = "read", unit: str = "query") -> str:
    """The bytes of one call's forward and backward, by collective, and per ``unit`` (``count`` of
    them in one call: the queries of a read, the write steps of a write)."""
    fwd_total = sum(fwd.values())
    bwd = {name: sent - fwd.get(name, 0) for name, sent in both.items()}
    bwd_total = sum(bwd.values())

    def by_name(sent):
        return ", ".join(f"{name} {n:,}" for name, n in sorted(sent.items()) if n) or "none"

    return (f"bytes per rank per {call}: forward {fwd_total:,} ({by_name(fwd)}), {fwd_total / count:,.0f} "
            f"per {unit}; backward {bwd_total:,} ({by_name(bwd)}), {bwd_total / count:,.0f} per {unit}")


def _row(op: str, shape: str, variant: str, extra: str, key: str, result: dict, queries: int,
         call: str = "read", unit: str = "query") -> bm.Row:
    samples, traffic = result["samples"], result["traffic"]
    fwd_ms = [s * 1e3 for s in samples[f"{key} fwd"]]
    both_ms = [s * 1e3 for s in samples[f"{key} both"]]
    note = f"{extra}; " + _bytes_note(traffic[f"{key} fwd"], traffic[f"{key} both"], queries, call, unit)
    return bm.Row(op, shape, "float32", variant, statistics.median(fwd_ms), None,
                  statistics.median(both_ms), None, note=note,
                  fwd_spread_ms=[min(fwd_ms), max(fwd_ms)],
                  both_spread_ms=[min(both_ms), max(both_ms)], reps=len(fwd_ms))


def _layout_text(world_size: int, sizes: dict, layout: str):
    """A read's (shape prefix, T, note, queries its bytes are divided by, their unit) per layout:
    sharded queries are normalised per query of the group, P·T of them."""
    if layout == "replicated":
        return "", sizes["queries"], "replicated queries", sizes["queries"], "query"
    per_rank = _read_queries(sizes, world_size, layout)
    group = world_size * per_rank
    note = f"each rank its own queries (T per rank, P·T = {group:,} in the group)"
    return _layout_prefix(layout), per_rank, note, group, "query of the group"


def _topk_rows(world_size: int, sizes: dict, result: dict, layout: str = "replicated") -> list:
    slots = sizes["slots"]
    prefix, queries, own, count, unit = _layout_text(world_size, sizes, layout)
    shape = f"P={world_size} {prefix}N={slots} T={queries} Dk=Dv={DIM} k={K}"
    naive_bytes = world_size * (slots // world_size) * 2 * DIM * 4
    naive = f"all-gather of P·N_r·(Dk+Dv)·4 = {naive_bytes:,} bytes per rank per read"
    if layout == "sharded":
        naive = (f"{own}; {naive}, its own queries read, its backward a reduce-scatter of the gathered "
                 "memory's gradient (every rank's queries' summed)")
    return [_row(OP, shape, variant, extra, f"{prefix}{name}", result, count, unit=unit)
            for variant, name, extra in (("cpu sharded", "sharded", own),
                                         ("naive: gather the memory", "naive", naive))]


def _pk_rows(world_size: int, sizes: dict, result: dict, shard: str, layout: str = "replicated") -> list:
    n_sub, k = sizes["n_sub"], sizes["pk_k"]
    prefix, queries, own, count, unit = _layout_text(world_size, sizes, layout)
    slots = n_sub * n_sub
    shape = (f"P={world_size} {prefix}shard={shard} n_sub={n_sub} N={slots} T={queries} Dk=Dv={DIM} "
             f"k=k_sub={k}")
    if shard == "rows":
        naive = (f"all-gather of P·N_r·Dv·4 = {world_size * (slots // world_size) * DIM * 4:,} bytes per rank "
                 "per read, its backward a reduce-scatter of the gathered values' gradient")
    else:
        naive = (f"all-gather of P·N·Dv_r·4 = {world_size * slots * (DIM // world_size) * 4:,} bytes per rank "
                 "per read, its backward an all-reduce of the gathered values' gradient, each rank keeping "
                 "its columns")
    if layout == "replicated":
        sharded = f"{own} and sub-keys"
    else:
        sharded = f"{own}, replicated sub-keys"
        naive = f"{own}; {naive} (every rank's queries' summed)"
    return [_row(PK_OP, shape, variant, extra, f"pk {prefix}{shard} {name}", result, count, unit=unit)
            for variant, name, extra in (("cpu sharded", "sharded", sharded),
                                         ("naive: gather the values", "naive", naive))]


def _write_rows(world_size: int, sizes: dict, result: dict, layout: str) -> list:
    slots, steps = sizes["slots"], sizes["writes"]
    shape = f"P={world_size} queries={layout} N={slots} B=1 Hm=1 T={steps} kw={KW} D={DIM}"
    memory = "P·N_r·D·4" if layout == "replicated" else "P·(P·B)·N_r·D·4"
    memory_bytes = slots * DIM * 4 * (world_size if layout == "sharded" else 1)
    if layout == "replicated":
        sharded = "replicated writes (metadata only in the forward)"
        naive = (f"all-gather of {memory} = {memory_bytes:,} bytes per rank per write, its backward a "
                 "reduce-scatter of the gathered memory's gradient and an all-reduce of the writes'")
    else:
        sharded = "each rank its own batch of writes (all-gathered in the forward)"
        naive = (f"all-gather of {memory} = {memory_bytes:,} bytes per rank per write and of every rank's "
                 "writes, its backward a reduce-scatter of the gathered memory's gradient and of the "
                 "writes'")
    return [_row(WRITE_OP, shape, variant, extra, key, result, steps, "write", "write step")
            for variant, key, extra in (
                ("cpu sharded", f"write {layout} sharded", sharded),
                ("naive: gather the memory", f"write {layout} naive", naive))]


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *,
        tiny: bool = False) -> list:
    if device.type != "cpu":
        return [skipped_row(op, "-", torch.float32, "cpu sharded",
                            "skipped: this benchmark runs gloo processes on the CPU "
                            "(l2m-bench --device cpu --only distributed); NCCL is not measured")
                for op in (OP, PK_OP, WRITE_OP)]
    sizes = TINY if tiny else QUICK if quick else FULL
    results = {world_size: _run_group(world_size, sizes) for world_size in sizes["ranks"]}
    # The top-k read's rows for every P, by query layout, then the product-key read's, by shard mode
    # and query layout, then the write's, by query layout.
    rows = []
    for layout in READ_LAYOUTS:
        for world_size, result in results.items():
            rows += _topk_rows(world_size, sizes, result, layout)
    for shard in PK_SHARDS:
        for layout in READ_LAYOUTS:
            for world_size, result in results.items():
                rows += _pk_rows(world_size, sizes, result, shard, layout)
    for layout in WRITE_LAYOUTS:
        for world_size, result in results.items():
            rows += _write_rows(world_size, sizes, result, layout)
    return rows
