"""Benchmark :class:`l2m_kernels.memory.MemoryStore` reads: compressed keys, two-level reads, memory
size and tiers, recall, and the cost of the usage statistics.

1. **int8 against float32 keys, exact read** at ``read-cpu`` (one memory head, T=4096 queries,
   N=65536 entries, Dk=Dv=64, k=32; ``--quick``: T=1024, N=16384), interleaved
   (:func:`l2m_kernels.benchmark.compare`): the store with int8 keys (the VNNI-filtered kernel, then
   the kernel that reads the selected values), the op ``quantized_topk_read`` on the same int8 keys,
   the store with int8 keys refined by float32 copies on disk (``key_refine="disk"``: the float32
   selection), with the default ``key_margin=2`` and with ``key_margin=1`` (the int8 range fitted to
   the keys, as when every key is known up front), the store with float32 keys (which is
   ``topk_memory_read``'s fused kernel), the reference read of
   the float32 keys (eager and compiled), and faiss (``IndexScalarQuantizer`` with 8-bit codes,
   inner product: faiss's own int8 exact search, selection only) when installed. The shape gives
   the share of queries whose top-k set equals the float32 read's, for int8 and for int8+refine.
2. **Read time against memory size** with most of the memory in slower tiers: memories of 64K to
   16M entries (``--quick``: to 1M) of clustered keys (below), int8 keys and int8 values, Dk=Dv=64,
   blocks of 256, the first 1M entries in the device tier and the rest on disk (memory-mapped
   files) or in host memory; 1,024 queries, k=32, ``blocks=32``. Rows: the two-level read
   (median of 3 after one warm-up, the disk pages then in the page cache), the bytes it moved (the
   summaries, the staged blocks' keys, the selected values), the exact read of the whole memory
   (once), and the recall of the two-level read: the share of the exact top-k it found and of
   the exact top-k's softmax mass it holds.
3. **Usage statistics**: the same read with ``track=True`` and ``track=False``, interleaved.

Clustered keys are what a model writes: a document's consecutive tokens share a topic. The
memory is written in runs of 512 entries, each run around one of 4,096 random centres (unit
norm, per-entry noise 0.35), and the queries sit near the centres (noise 0.35), like a model's
queries about what it read before. Random keys (no structure) are the worst case of a two-level
read, which the rows named ``random`` show at the smallest size.
"""
from __future__ import annotations

import statistics
import time

import torch

import l2m_kernels as l2m
from l2m_kernels import benchmark as bm
from l2m_kernels.memory import MemoryStore
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref

from ._common import compare, optional_peer

OP = "memory_store"
DIM, K, QUERIES, BLOCK, SELECTED = 64, 32, 1024, 256, 32
FAST_ENTRIES = 1 << 20
SIZES = (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
QUICK_SIZES = (1 << 16, 1 << 18, 1 << 20)
TINY = dict(sizes=(1 << 12,), queries=64, fast=1 << 11, block=64, selected=4, read_T=64, read_N=2048)


def clustered(num: int, dim: int, gen: torch.Generator, *, centres: int = 4096, run: int = 512,
              noise: float = 0.35, centre_table: torch.Tensor | None = None):
    """``num`` keys written in runs of ``run`` around random unit centres (plus the centres)."""
    if centre_table is None:
        centre_table = torch.nn.functional.normalize(torch.randn(centres, dim, generator=gen), dim=-1)
    runs = -(-num // run)
    which = torch.randint(0, centre_table.shape[0], (runs,), generator=gen)
    keys = centre_table[which].repeat_interleave(run, 0)[:num]
    keys = keys + noise / dim ** 0.5 * torch.randn(num, dim, generator=gen)
    return keys, centre_table


def queries_near(centre_table: torch.Tensor, count: int, gen: torch.Generator, noise: float = 0.35):
    dim = centre_table.shape[1]
    pick = torch.randint(0, centre_table.shape[0], (count,), generator=gen)
    return centre_table[pick] + noise / dim ** 0.5 * torch.randn(count, dim, generator=gen)


def _row(shape: str, variant: str, samples: list, note: str, peak_mb=None) -> bm.Row:
    ms = [s * 1e3 for s in samples]
    return bm.Row(OP, shape, "float32", variant, statistics.median(ms), None, None, peak_mb,
                  note=note, fwd_spread_ms=[min(ms), max(ms)], reps=len(ms))


def _timed(fn, reps: int) -> list:
    fn()
    samples = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return samples


def _build(size: int, fast: int, cold: str, block: int, gen, centre_table, *, kind="clustered"):
    tiers = "device" if size <= fast else (("device", fast), (cold, None))
    store = MemoryStore(1, DIM, DIM, size, block_size=block, tiers=tiers, key_format="int8",
                        value_format="int8")
    chunk = 1 << 20
    for start in range(0, size, chunk):
        count = min(chunk, size - start)
        if kind == "clustered":
            keys, _ = clustered(count, DIM, gen, centre_table=centre_table)
        else:
            keys = torch.randn(count, DIM, generator=gen) / DIM ** 0.5 * 3
        values = torch.randn(count, DIM, generator=gen)
        store.append(keys[None] * 3, values[None])  # scores of a few units: a peaked softmax
    return store


def _recall(two: l2m.memory.MemoryRead, exact: l2m.memory.MemoryRead):
    """Share of the exact top-k found, and of its softmax mass (over the exact top-k) held."""
    found = (two.indices.unsqueeze(-1) == exact.indices.unsqueeze(-2)).any(-2)  # exact's entries found
    share = found.float().mean().item()
    mass = (exact.weights * found).sum(-1).mean().item()
    return share, mass


def _size_rows(sizes, queries, fast, block, selected, quick, gen) -> list:
    rows = []
    centre_table = None
    _, centre_table = clustered(1, DIM, gen)
    q = queries_near(centre_table, queries, gen).mul(3).view(1, 1, queries, DIM)
    reps = 3
    for size in sizes:
        for cold in (("disk",) if size > fast else ("device",)) + (("host",) if size == sizes[-1] and size > fast else ()):
            store = _build(size, fast, cold, block, gen, centre_table)
            shape = (f"N={size} Dk=Dv=64 int8 keys+values, T={queries} k={K} blocks={selected}, "
                     + (f"{fast} device + {size - fast} {cold}" if size > fast else "device"))
            read = lambda: store.read(q, K, blocks=selected, track=False)  # noqa: E731
            two_samples = _timed(read, reps)
            two = read()
            stats = store.last_read_stats
            began = time.perf_counter()
            exact = store.read(q, K, track=False)
            exact_s = time.perf_counter() - began
            share, mass = _recall(two, exact)
            rows.append(_row(shape, "two-level read", two_samples,
                             f"{stats['bytes'] / 2**20:.1f} MiB moved ({stats['blocks']} blocks staged); "
                             f"recall of the exact top-{K}: {share:.3f} of entries, {mass:.3f} of "
                             f"softmax mass"))
            rows.append(_row(shape, "exact read", [exact_s], "once (the reference of the recall)"))
            if size == sizes[0]:
                tracked = lambda: store.read(q, K, blocks=selected, track=True)  # noqa: E731
                on, off = [], []
                for _ in range(5):
                    on += _timed(tracked, 1)
                    off += _timed(read, 1)
                rows.append(_row(shape, "two-level read, usage tracked", on,
                                 f"untracked median {statistics.median(off) * 1e3:.2f} ms in the "
                                 f"same rounds: tracking costs "
                                 f"{(statistics.median(on) / statistics.median(off) - 1) * 100:+.1f}%"))
                rand = _build(size, fast, "device", block, gen, None, kind="random")
                qr = torch.randn(1, 1, queries, DIM, generator=gen) / DIM ** 0.5 * 3
                two_r = rand.read(qr, K, blocks=selected, track=False)
                share_r, mass_r = _recall(two_r, rand.read(qr, K, track=False))
                rows.append(_row(shape + " random keys", "two-level read",
                                 _timed(lambda: rand.read(qr, K, blocks=selected, track=False), reps),
                                 f"recall of the exact top-{K}: {share_r:.3f} of entries, "
                                 f"{mass_r:.3f} of softmax mass (no structure to find)"))
                del rand
            del store
    return rows


def _format_rows(T, N, device, quick, tiny) -> list:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, N, DIM, generator=gen)
    values = torch.randn(1, N, DIM, generator=gen)
    stores = {}
    for name, options in (("int8", dict(key_format="int8")),
                          ("int8+refine", dict(key_format="int8", key_refine="disk")),
                          ("int8+refine m1", dict(key_format="int8", key_refine="disk", key_margin=1.0)),
                          ("float32", dict(key_format="float32"))):
        store = MemoryStore(1, DIM, DIM, N, block_size=256 if N % 256 == 0 else 64,
                            value_format="float32", **options)
        store.append(keys, values)
        stores[name] = store
    stored_keys = stores["int8"].keys()
    int8_keys = stores["int8"].tiers[0].arrays["keys"][:, :N]
    key_scales = stores["int8"].key_scales

    def inputs(requires_grad):
        return dict(q=torch.randn(1, 1, T, DIM, generator=gen))

    fused = {
        "store int8 keys": lambda q: tuple(stores["int8"].read(q, K, track=False)),
        "store int8 keys + float32 refine (disk)":
            lambda q: tuple(stores["int8+refine"].read(q, K, track=False)),
        "store int8 keys (key_margin=1) + float32 refine (disk)":
            lambda q: tuple(stores["int8+refine m1"].read(q, K, track=False)),
        "store float32 keys": lambda q: tuple(stores["float32"].read(q, K, track=False)),
        "quantized_topk_read (the op on the store's int8 keys)":
            lambda q: tuple(l2m.quantized_topk_read(q, int8_keys, key_scales, values, K)),
    }
    peers = {}
    faiss, why = optional_peer("faiss", "faiss-cpu")
    if faiss is None:
        peers["faiss SQ8 (int8 codes)"] = why
    else:
        index = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
        index.train(keys[0].numpy())
        index.add(keys[0].numpy())

        def faiss_search(q):
            scores, ids = index.search(q.reshape(-1, DIM).numpy(), K)
            return torch.from_numpy(scores), torch.from_numpy(ids)
        peers["faiss SQ8 (int8 codes)"] = bm.Variant("faiss SQ8 (int8 codes)", faiss_search,
                                                     backward=False, torch_memory=False,
                                                     note="selection only; its own quantiser")
    probe = torch.randn(1, 1, T, DIM, generator=gen)
    float_set = torch.sort(stores["float32"].read(probe, K, track=False).indices, -1).values

    def same_set(name):
        got = torch.sort(stores[name].read(probe, K, track=False).indices, -1).values
        return (got == float_set).all(-1).float().mean().item()

    int8_exact = stores["int8"].read(probe, K, track=False).indices
    ref_exact = l2m.topk_memory_read(probe.double(), stored_keys.double(), values.double(), K).indices
    shape = (f"read-cpu B=1 H=1 T={T} N={N} D=64 k={K}; queries with the float32 keys' top-{K} set: "
             f"int8 {same_set('int8'):.3f}, int8+refine {same_set('int8+refine'):.3f} (key_margin=1: "
             f"{same_set('int8+refine m1'):.3f}); int8 = exact "
             f"read of the stored int8 keys: {bool(torch.equal(int8_exact, ref_exact))}")
    flops = 2 * T * N * DIM
    cost = bm.Cost(fwd_flops=flops, fwd_bytes=N * DIM * 4 + T * DIM * 8)
    return compare(OP, shape, torch.float32, fused,
                   bm.Variant("reference", lambda q: topk_memory_read_ref(q, keys, values, K),
                              backward=False),
                   inputs, device, peers=peers, cost=cost, backward=False,
                   reps=3 if quick else 5, quick=quick, tiny=tiny)


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *,
        tiny: bool = False) -> list:
    if device.type != "cpu":
        from ._common import skipped_row
        return [skipped_row(OP, "-", torch.float32, "MemoryStore",
                            "skipped: the store's kernels are CPU kernels; on CUDA it runs the "
                            "reference selection (see docs/memory-store.md)")]
    gen = torch.Generator().manual_seed(0)
    if tiny:
        rows = _format_rows(TINY["read_T"], TINY["read_N"], device, True, True)
        return rows + _size_rows(TINY["sizes"], TINY["queries"], TINY["fast"], TINY["block"],
                                 TINY["selected"], True, gen)
    T, N = (1024, 16384) if quick else (4096, 65536)
    rows = _format_rows(T, N, device, quick, tiny)
    return rows + _size_rows(QUICK_SIZES if quick else SIZES, QUERIES, FAST_ENTRIES, BLOCK,
                             SELECTED, quick, gen)
