"""Benchmark utilities of ``l2m-bench`` (:mod:`l2m_kernels.bench`).

Every benchmark compares, in one run: the fused path, the reference in eager mode and the reference
under ``torch.compile``; it reports median times of forward, backward and both, peak memory, and
GB/s or GFLOP/s against ceilings measured in the same run (a large copy, a large matmul).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the call; on
CPU, the maximum of the allocator's running total recorded by ``torch.profiler`` (profile_memory)
during the call — that counts every tensor allocation, also those inside compiled code and the C++
extension. The peak is measured in a separate, untimed run.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import time
from typing import Callable, Optional

import torch

# Inductor's parallel-compile worker processes keep the CPU busy after a compile and slow down the
# rows timed next on a small machine: compile in-process (read when inductor's config first loads).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 7,
                setup: Optional[Callable[[], object]] = None, max_seconds: float = 20.0) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (:func:`time_samples`)."""
    return statistics.median(time_samples(fn, device, warmup=warmup, reps=reps, setup=setup,
                                          max_seconds=max_seconds))


def time_samples(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 7,
                 setup: Optional[Callable[[], object]] = None, max_seconds: float = 20.0) -> list:
    """Seconds of each of ``reps`` timed runs of ``fn()`` after ``warmup`` runs.

    ``setup()`` (untimed) runs before each call and its result is passed to ``fn``; CUDA work is
    timed with events. Stops early (with at least 3 samples) once ``max_seconds`` are spent.
    """
    def once():
        arg = setup() if setup is not None else None
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg) if setup is not None else fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    samples, spent = [], 0.0
    for _ in range(reps):
        t = once()
        samples.append(t)
        spent += t
        if spent > max_seconds and len(samples) >= 3:
            break
    return samples


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_GLIBC_DYNAMIC_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # 64-bit glibc


@contextlib.contextmanager
def _large_allocations_mapped():
    """With glibc, serve allocations of 1 MiB or more with mmap while the block runs.

    Under the profiler, its small event records land in the heap chunks that large temporaries
    free and split them, so a loop that allocates and frees one large temporary per iteration (the
    reference write's backward: one memory-sized gradient per write step) grows the process by one
    temporary per iteration: tens of GB at ``write-cpu``, where nothing but the profiler holds it.
    Mapped allocations go back to the system when freed. Afterwards the threshold is fixed at
    glibc's dynamic maximum, where it settles anyway once a large mapped block has been freed
    (mallopt cannot restore the dynamic mode). A no-op where glibc is not found.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 2 ** 20)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MMAP_THRESHOLD_MAX)


def _cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    # The profiler's memory events carry the allocator's running total of bytes allocated since
    # profiling started: every CPU tensor allocation, including those made inside compiled
    # (inductor) code and inside the C++ extension. Its maximum is the peak the call added.
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with _large_allocations_mapped():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        del result
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    memory = sorted((e for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})
                     and e["args"].get("Device Type", 0) == 0), key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    if not memory:
        return 0
    # The running total carries memory that earlier profiled calls allocated and freed after their
    # profiling ended: measure from the total just before this call's first event.
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - base)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory that ``fn()`` adds above what is live before it.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call. CPU: the
    maximum of the CPU allocator's running total recorded by the profiler during the call.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak
    return _cpu_peak_bytes(fn)


# ----------------------------------------------------------------------------------------------
# ceilings
# ----------------------------------------------------------------------------------------------

def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Measured in this run: matmul GFLOP/s (float32 here; bfloat16 too on CUDA) and copy GB/s."""
    out = {}
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = median_time(lambda: torch.mm(a, b), device, warmup=1, reps=3 if quick else 5)
        out[f"matmul_gflops_{str(dtype).replace('torch.', '')}"] = 2 * n ** 3 / t / 1e9
        del a, b
    numel = (32 if quick else 64) * 2 ** 20 if device.type == "cpu" else 1024 * 2 ** 20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, warmup=1, reps=5)
    out["copy_gbps"] = 2 * src.numel() * src.element_size() / t / 1e9  # bytes read + written
    del src, dst
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"cpu ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------
# one benchmark: fused vs reference eager vs reference compiled
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    variant: str          # fused backend name, "reference", "reference+compile"
    fwd_ms: float
    bwd_ms: Optional[float]
    both_ms: Optional[float]
    peak_mb: Optional[float]
    fwd_gbps: Optional[float] = None
    fwd_gflops: Optional[float] = None
    note: str = ""
    # [fastest, slowest] of the timed runs whose median is the time above (None: not sampled).
    fwd_spread_ms: Optional[list] = None
    bwd_spread_ms: Optional[list] = None
    both_spread_ms: Optional[list] = None


def _spread_ms(samples: list) -> list:
    return [min(samples) * 1e3, max(samples) * 1e3]


def _tensor_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def _input_sets(make_inputs: Callable, requires_grad: bool, rotate_bytes: int) -> list:
    """Enough independent input sets that cycling through them spans ``rotate_bytes``: repeated
    runs then read from memory, not from a cache warmed by the previous run."""
    first = make_inputs(requires_grad)
    count = max(1, min(8, -(-rotate_bytes // max(1, _tensor_bytes(first)))))
    return [first] + [make_inputs(requires_grad) for _ in range(count - 1)]


def run_variant(op: str, shape: str, dtype: torch.dtype, variant: str, forward: Callable, make_inputs: Callable,
                device: torch.device, *, backward: bool = True, fwd_bytes: Optional[float] = None,
                fwd_flops: Optional[float] = None, reps: int = 7, warmup: int = 2,
                rotate_bytes: int = 256 * 2 ** 20) -> Row:
    """Time ``forward(**inputs)`` (which returns a tensor or tuple of tensors) and its backward.

    ``make_inputs(requires_grad)`` returns fresh inputs; successive runs cycle through several input
    sets (at least ``rotate_bytes`` together, at most 8 sets) so that caches do not flatter small
    shapes. The backward seeds every floating output with a fixed random cotangent.
    """
    sets = _input_sets(make_inputs, False, rotate_bytes)
    turn = iter(range(10 ** 9))
    with torch.no_grad():
        fwd_samples = time_samples(lambda: forward(**sets[next(turn) % len(sets)]), device, warmup=warmup,
                                   reps=reps)
    fwd = statistics.median(fwd_samples)
    row = Row(op, shape, str(dtype).replace("torch.", ""), variant, fwd * 1e3, None, None, None,
              fwd_spread_ms=_spread_ms(fwd_samples))
    if fwd_bytes:
        row.fwd_gbps = fwd_bytes / fwd / 1e9
    if fwd_flops:
        row.fwd_gflops = fwd_flops / fwd / 1e9
    del sets

    if backward:
        grad_sets = _input_sets(make_inputs, True, rotate_bytes)

        def outputs(inputs):
            outs = forward(**inputs)
            return [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]

        def leaves(inputs):
            return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

        probe = outputs(grad_sets[0])
        gen = torch.Generator(device=device).manual_seed(0)
        cots = [torch.randn(o.shape, dtype=o.dtype, device=device, generator=gen) for o in probe]
        del probe

        def next_set():
            return grad_sets[next(turn) % len(grad_sets)]

        def backward_and_clear(outs, inputs):
            torch.autograd.backward(outs, cots)
            for leaf in leaves(inputs):
                leaf.grad = None

        def both():
            inputs = next_set()
            backward_and_clear(outputs(inputs), inputs)

        def forward_only():
            inputs = next_set()
            return outputs(inputs), inputs

        both_samples = time_samples(both, device, warmup=warmup, reps=reps)
        bwd_samples = time_samples(lambda prepared: backward_and_clear(*prepared), device, warmup=1, reps=reps,
                                   setup=forward_only)
        row.both_ms, row.both_spread_ms = statistics.median(both_samples) * 1e3, _spread_ms(both_samples)
        row.bwd_ms, row.bwd_spread_ms = statistics.median(bwd_samples) * 1e3, _spread_ms(bwd_samples)

        def keep_graph():
            inputs = grad_sets[0]
            torch.autograd.backward(outputs(inputs), cots)
            return [leaf.grad for leaf in leaves(inputs)]

        peak = peak_memory_bytes(keep_graph, device)
        for leaf in leaves(grad_sets[0]):
            leaf.grad = None
        del grad_sets
    else:
        inputs = make_inputs(False)
        with torch.no_grad():
            peak = peak_memory_bytes(lambda: forward(**inputs), device)
        del inputs
    row.peak_mb = None if peak is None else peak / 2 ** 20
    gc.collect()
    return row


def compare(op: str, shape: str, dtype: torch.dtype, fused: dict, reference: Callable, make_inputs: Callable,
            device: torch.device, *, compile_reference: bool = True, **kw) -> list:
    """Rows for every fused variant in ``fused`` (name -> forward), the eager reference and the
    reference under torch.compile."""
    rows = []
    for name, forward in fused.items():
        rows.append(run_variant(op, shape, dtype, name, forward, make_inputs, device, **kw))
    rows.append(run_variant(op, shape, dtype, "reference", reference, make_inputs, device, **kw))
    if compile_reference:
        torch._dynamo.reset()
        compiled = torch.compile(reference)
        try:
            rows.append(run_variant(op, shape, dtype, "reference+compile", compiled, make_inputs, device, **kw))
        except Exception as exc:  # report, don't hide: the table says why the row is missing
            rows.append(Row(op, shape, str(dtype).replace("torch.", ""), "reference+compile", float("nan"), None,
                            None, None, note=f"torch.compile failed: {type(exc).__name__}: {exc}"[:200]))
    return rows


def format_table(rows: list, ceilings: dict) -> str:
    """A Markdown table; speedups are against the eager reference of the same op/shape/dtype."""
    header = ("| op | shape | dtype | variant | fwd ms | bwd ms | fwd+bwd ms | speedup fwd+bwd | peak MB "
              "| fwd GB/s (% copy) | fwd GFLOP/s (% matmul) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    base = {(r.op, r.shape, r.dtype): r for r in rows if r.variant == "reference"}
    copy = ceilings.get("copy_gbps")
    mm = ceilings.get("matmul_gflops_float32")

    def f(x, spec=".3f"):
        return "-" if x is None or x != x else format(x, spec)

    def measured(x):  # a skipped row holds NaN or None
        return x is not None and x == x and x > 0

    for r in rows:
        ref = base.get((r.op, r.shape, r.dtype))
        speed = None
        if ref is not None and measured(ref.both_ms) and measured(r.both_ms):
            speed = f"{ref.both_ms / r.both_ms:.2f}x"
        elif ref is not None and measured(ref.fwd_ms) and measured(r.fwd_ms):
            speed = f"{ref.fwd_ms / r.fwd_ms:.2f}x (fwd)"
        gbps = "-" if r.fwd_gbps is None else f"{r.fwd_gbps:.1f} ({100 * r.fwd_gbps / copy:.0f}%)" if copy else f"{r.fwd_gbps:.1f}"
        gflops = "-" if r.fwd_gflops is None else f"{r.fwd_gflops:.1f} ({100 * r.fwd_gflops / mm:.0f}%)" if mm else f"{r.fwd_gflops:.1f}"
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.variant} | {f(r.fwd_ms)} | {f(r.bwd_ms)} | "
                     f"{f(r.both_ms)} | {speed or '-'} | {f(r.peak_mb, '.1f')} | "
                     f"{gbps} | {gflops} |" + (f" {r.note}" if r.note else ""))
    return "\n".join(lines)


def save(rows: list, ceilings: dict, device: torch.device, out_dir: str, name: str) -> dict:
    """Write ``<name>.json`` and ``<name>.md`` (and ``<name>.png`` when matplotlib is present)."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": device_name(device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ceilings": ceilings}
    payload = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"{name} on {meta['device']}, torch {meta['torch']}, {meta['date']}\n\n")
        f.write("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()) + "\n\n")
        f.write(format_table(rows, ceilings) + "\n")
    try:
        plot(rows, os.path.join(out_dir, f"{name}.png"), title=f"{name} on {meta['device']}")
    except ImportError:
        pass
    return payload


def plot(rows: list, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.op, r.shape, r.dtype) for r in rows})
    variants = list(dict.fromkeys(r.variant for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(variants) / 3), 4))
    width = 0.8 / max(1, len(variants))
    for vi, variant in enumerate(variants):
        xs, ys = [], []
        for gi, grp in enumerate(groups):
            for r in rows:
                if (r.op, r.shape, r.dtype) == grp and r.variant == variant:
                    xs.append(gi + vi * width)
                    ys.append(r.both_ms if r.both_ms else r.fwd_ms)
        ax.bar(xs, ys, width=width, label=variant)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{o}\n{s}\n{d}" for o, s, d in groups], fontsize=7)
    ax.set_ylabel("fwd+bwd median ms (log)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
