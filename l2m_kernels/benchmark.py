"""Benchmark utilities of ``l2m-bench`` (:mod:`l2m_kernels.bench`).

Every benchmark is a comparison (:func:`compare`): the fused path, the reference in eager mode and
under ``torch.compile``, and the peers a user would pick instead, measured in one run and
interleaved: every round times each variant once (forward; forward + backward; backward) and the
ceilings once (a matmul, a copy), the starting variant rotating, so that a change in the machine's
load reaches every variant alike. Rounds go on until every median is known within 2% (or a time
budget is spent). A row reports medians with the range of its timed runs, peak memory, and its time
as a multiple of its hardware floor (:class:`Cost`: what the op must move and compute, at the
ceilings measured in the same rounds). :class:`MachineLoad` tells whether other processes used the
CPU meanwhile.

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

from . import _alloc

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
        return _sample((lambda: fn(arg)) if setup is not None else fn, device)

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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_GLIBC_DYNAMIC_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # 64-bit glibc
_STEADY_TRIM_THRESHOLD = 2 ** 30


def _glibc_mallopt():
    """glibc's ``mallopt``, or None where glibc is not found."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def steady_allocator() -> bool:
    """Puts glibc's allocator in the state a training loop reaches after its first steps, whatever
    ran before in the process: allocations up to 32 MiB from the heap (the largest mmap threshold
    glibc adapts to by itself) and up to 1 GiB of freed memory kept for reuse instead of returned to
    the system. Otherwise each timed call may page-fault its outputs afresh or not, depending on
    what earlier benchmarks of the run freed, and the same suite run twice disagrees by tens of
    percent on allocation-heavy rows. Larger allocations are mapped and faulted in at every call,
    as in any loop. Returns False where glibc is not found (no change)."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MMAP_THRESHOLD_MAX)
    mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM_THRESHOLD)
    return True


@contextlib.contextmanager
def _large_allocations_mapped():
    """With glibc, serve allocations of 1 MiB or more with mmap while the block runs.

    Under the profiler, its small event records land in the heap chunks that large temporaries
    free and split them, so a loop that allocates and frees one large temporary per iteration (the
    reference write's backward: one memory-sized gradient per write step) grows the process by one
    temporary per iteration: tens of GB at ``write-cpu``, where nothing but the profiler holds it.
    Mapped allocations go back to the system when freed. Afterwards the threshold is fixed at
    glibc's dynamic maximum, where it settles anyway once a large mapped block has been freed
    (mallopt cannot restore the dynamic mode), as :func:`steady_allocator` sets it. A no-op where
    glibc is not found.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 2 ** 20)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MMAP_THRESHOLD_MAX)


@contextlib.contextmanager
def _quiet_stderr():
    """The process's standard error (file descriptor 2) sent to /dev/null while the block runs: the
    profiler's C++ side prints a line at each start and stop that would break the progress bar."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    # The profiler's memory events carry the allocator's running total of bytes allocated since
    # profiling started: every CPU tensor allocation, including those made inside compiled
    # (inductor) code and inside the C++ extension. Its maximum is the peak the call added.
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with _large_allocations_mapped(), _quiet_stderr():
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
    # The fused paths' large CPU outputs come from buffers cached between calls: with the cache
    # off (and emptied) the call allocates them, so its peak counts them as torch.empty would.
    with _alloc.cache_limit(0):
        return _cpu_peak_bytes(fn)


# ----------------------------------------------------------------------------------------------
# the machine: ceilings, load
# ----------------------------------------------------------------------------------------------

def _ceiling_probes(device: torch.device, quick: bool) -> dict:
    """name -> a zero-argument call timed for a ceiling, and its work: ``(call, bytes, flops)``.

    On the CPU a 1024-square float32 matmul and a 32 MiB copy (64 MiB without ``quick``); on CUDA
    4096-square float32 and bfloat16 matmuls and a 256 MiB copy (1 GiB without ``quick``): sized so that
    one of each can run in every round of an interleaved comparison.
    """
    probes = {}
    n = 1024 if device.type == "cpu" else 4096
    for dtype in ([torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        probes[f"matmul_gflops_{dtype_name(dtype)}"] = (
            (lambda a=a, b=b: torch.mm(a, b)), 0, 2 * n ** 3)
    mib = (32 if quick else 64) if device.type == "cpu" else (256 if quick else 1024)
    src = torch.randn(mib * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    probes["copy_gbps"] = ((lambda: dst.copy_(src)), 2 * src.numel() * 4, 0)  # bytes read + written
    return probes


def _rate(name: str, seconds: float, work: tuple) -> float:
    _, nbytes, flops = work
    return (nbytes if name == "copy_gbps" else flops) / seconds / 1e9


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Matmul GFLOP/s (float32; bfloat16 too on CUDA) and copy GB/s, each the median of a few runs of
    the probes that :func:`compare` also interleaves with every comparison."""
    out = {}
    for name, work in _ceiling_probes(device, quick).items():
        out[name] = _rate(name, median_time(work[0], device, warmup=1, reps=5), work)
    return out


class MachineLoad:
    """How busy the machine was apart from this process: the load average before and after, and the
    CPU time that other processes used while the block ran (``/proc/stat`` minus this process and
    its children), in cores on average. ``busy`` when the others used more than ``BUSY_CORES``."""

    BUSY_CORES = 0.25

    def __init__(self):
        self.load_before = self.load_after = None
        self.others_cores = None
        self._start = None

    @staticmethod
    def load_average() -> Optional[tuple]:
        try:
            return tuple(round(x, 2) for x in os.getloadavg())
        except OSError:
            return None

    @staticmethod
    def _ticks():
        """(wall seconds, busy ticks of every CPU, ticks of this process and its children)."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        return time.perf_counter(), busy, sum(int(x) for x in own[11:15])       # utime, stime, cutime, cstime

    def __enter__(self):
        self.load_before = self.load_average()
        self._start = self._ticks()
        return self

    def __exit__(self, *exc):
        self.load_after = self.load_average()
        end = self._ticks()
        if self._start is not None and end is not None and end[0] > self._start[0]:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            others = (end[1] - self._start[1]) - (end[2] - self._start[2])
            self.others_cores = max(0.0, others / hz / (end[0] - self._start[0]))
        return False

    @property
    def busy(self) -> bool:
        return self.others_cores is not None and self.others_cores > self.BUSY_CORES

    def describe(self) -> str:
        text = lambda load: "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)  # noqa: E731
        others = "n/a" if self.others_cores is None else f"{self.others_cores:.2f}"
        return (f"load average {text(self.load_before)} before, {text(self.load_after)} after; "
                f"other processes used {others} cores on average")


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
# one comparison: every variant interleaved with the others and with the ceilings
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cost:
    """What one call must read, write and compute at least: its hardware floor is the larger of its
    bytes at the copy ceiling and its flops at the matmul ceiling of its dtype (a perfect kernel
    overlaps the two). ``bwd_*``: the backward alone."""

    fwd_bytes: float = 0.0
    fwd_flops: float = 0.0
    bwd_bytes: float = 0.0
    bwd_flops: float = 0.0

    def floor_s(self, ceilings: dict, dtype: str, backward: bool) -> Optional[float]:
        nbytes = self.fwd_bytes + (self.bwd_bytes if backward else 0.0)
        flops = self.fwd_flops + (self.bwd_flops if backward else 0.0)
        copy = ceilings.get("copy_gbps")
        matmul = ceilings.get(f"matmul_gflops_{dtype}") or ceilings.get("matmul_gflops_float32")
        times = ([nbytes / (copy * 1e9)] if nbytes and copy else []) + \
                ([flops / (matmul * 1e9)] if flops and matmul else [])
        return max(times) if times else None


@dataclasses.dataclass
class Variant:
    """One row of a comparison: ``forward(**inputs)`` returns a tensor or a tuple of tensors.
    ``forward=None``: not run (a peer that is not installed), ``note`` says why. ``backward=False``:
    timed forward only. ``cost``: where it differs from the comparison's (e.g. an in-place write)."""

    name: str
    forward: Optional[Callable]
    backward: bool = True
    cost: Optional[Cost] = None
    note: str = ""
    torch_memory: bool = True  # False: it allocates outside torch's allocator (no peak reported)
    parameters: tuple = ()     # tensors besides the inputs whose gradients each backward clears


class _Timed:
    """The samples of one variant: forward alone (no autograd), forward + backward together, and the
    backward alone (after an untimed forward)."""

    def __init__(self, variant: Variant, sets: list, device: torch.device, turn):
        self.variant, self.sets, self.device, self.turn = variant, sets, device, turn
        self.samples = {"fwd": [], "both": [], "bwd": []}
        self.cots = None
        if variant.backward:
            probe = self._outputs(sets[0])
            gen = torch.Generator(device=device).manual_seed(0)
            self.cots = [torch.randn(o.shape, dtype=o.dtype, device=device, generator=gen) for o in probe]
            del probe
            self._clear(sets[0])

    def _next(self) -> dict:
        return self.sets[next(self.turn) % len(self.sets)]

    def _outputs(self, inputs: dict) -> list:
        outs = self.variant.forward(**inputs)
        return [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,))
                if isinstance(o, torch.Tensor) and o.requires_grad]

    @staticmethod
    def _leaves(inputs: dict) -> list:
        return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def _clear(self, inputs: dict) -> None:
        for leaf in self._leaves(inputs) + list(self.variant.parameters):
            leaf.grad = None

    def _backward(self, outs: list, inputs: dict) -> None:
        torch.autograd.backward(outs, self.cots)
        self._clear(inputs)

    def run_round(self, record: bool = True) -> None:
        def fwd():
            with torch.no_grad():
                self.variant.forward(**self._next())

        def both():
            inputs = self._next()
            self._backward(self._outputs(inputs), inputs)

        self._record("fwd", _sample(fwd, self.device), record)
        if self.variant.backward:
            self._record("both", _sample(both, self.device), record)
            inputs = self._next()
            outs = self._outputs(inputs)
            self._record("bwd", _sample(lambda: self._backward(outs, inputs), self.device), record)
            del outs

    def _record(self, part: str, seconds: float, record: bool) -> None:
        if record:
            self.samples[part].append(seconds)

    def peak_bytes(self) -> Optional[int]:
        inputs = self.sets[0]
        if not self.variant.backward:
            with torch.no_grad():
                return peak_memory_bytes(lambda: self.variant.forward(**inputs), self.device)

        def keep_graph():
            torch.autograd.backward(self._outputs(inputs), self.cots)
            return [leaf.grad for leaf in self._leaves(inputs) + list(self.variant.parameters)]

        peak = peak_memory_bytes(keep_graph, self.device)
        self._clear(inputs)
        return peak


def _sample(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn()``; CUDA work timed with events."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_uncertainty(samples: list) -> float:
    """Half the width of the median's ~95% confidence interval relative to the median: the notch of
    a box plot, 1.57 · IQR / sqrt(n) (McGill, Tukey and Larsen 1978)."""
    if len(samples) < 4:
        return float("inf")
    q1, _, q3 = statistics.quantiles(samples, n=4)
    median = statistics.median(samples)
    return 1.57 * (q3 - q1) / len(samples) ** 0.5 / median if median > 0 else float("inf")


def interleave(timed: list, probes: dict, device: torch.device, *, warmup: int, reps: int, max_reps: int,
               max_seconds: float, tolerance: float) -> dict:
    """Runs rounds of every variant of ``timed`` and every ceiling probe, one sample each per round,
    the starting variant rotating from round to round (so no variant always follows the same one),
    after ``warmup`` unrecorded rounds: at least ``reps`` rounds, then more until every median is
    known within ``tolerance`` (:func:`median_uncertainty`) or ``max_seconds`` are spent or
    ``max_reps`` rounds ran. Returns the probes' samples (name -> seconds)."""
    probe_samples = {name: [] for name in probes}
    jobs = [("variant", t) for t in timed] + [("probe", name) for name in probes]
    for _ in range(warmup):
        for kind, job in jobs:
            job.run_round(record=False) if kind == "variant" else _sample(probes[job][0], device)
    began = time.perf_counter()
    for round_ in range(max_reps):
        shift = round_ % len(jobs)
        for kind, job in jobs[shift:] + jobs[:shift]:
            if kind == "variant":
                job.run_round()
            else:
                probe_samples[job].append(_sample(probes[job][0], device))
        if round_ + 1 < reps:
            continue
        series = [s for t in timed for s in t.samples.values() if s]
        if time.perf_counter() - began > max_seconds or all(median_uncertainty(s) <= tolerance for s in series):
            break
    return probe_samples


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    variant: str          # fused backend name, "reference", "reference+compile", or a peer's name
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
    # The time over the hardware floor (Cost.floor_s) of the forward, and of forward + backward.
    floor_multiple: Optional[float] = None
    both_floor_multiple: Optional[float] = None
    # The ceilings measured interleaved with this row's comparison (None: the run's).
    ceilings: Optional[dict] = None
    reps: Optional[int] = None


def _spread_ms(samples: list) -> Optional[list]:
    return [min(samples) * 1e3, max(samples) * 1e3] if samples else None


def _median_ms(samples: list) -> Optional[float]:
    return statistics.median(samples) * 1e3 if samples else None


def _tensor_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def _input_sets(make_inputs: Callable, requires_grad: bool, rotate_bytes: int) -> list:
    """Enough independent input sets that cycling through them spans ``rotate_bytes``: repeated
    runs then read from memory, not from a cache warmed by the previous run."""
    first = make_inputs(requires_grad)
    count = max(1, min(8, -(-rotate_bytes // max(1, _tensor_bytes(first)))))
    return [first] + [make_inputs(requires_grad) for _ in range(count - 1)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_variant(name: str, entry, backward: bool) -> Variant:
    if isinstance(entry, Variant):
        return entry
    if isinstance(entry, str):  # the reason it cannot run
        return Variant(name, None, backward=backward, note=entry)
    return Variant(name, entry, backward=backward)


def compare(op: str, shape: str, dtype: torch.dtype, fused: dict, reference: Callable, make_inputs: Callable,
            device: torch.device, *, compile_reference: bool = True, compile_note: str = "",
            peers: Optional[dict] = None, cost: Optional[Cost] = None, backward: bool = True, reps: int = 7,
            warmup: int = 2, max_reps: Optional[int] = None, max_seconds: float = 60.0, tolerance: float = 0.02,
            quick: bool = False, rotate_bytes: int = 256 * 2 ** 20) -> list:
    """Rows for every fused variant of ``fused``, the eager ``reference`` (a forward or a
    :class:`Variant`), the reference under
    ``torch.compile`` (or, without ``compile_reference``, a row saying ``compile_note``) and the
    ``peers``, measured interleaved (:func:`interleave`) together with the ceilings.

    ``fused`` and ``peers`` map a row's name to its forward, a :class:`Variant`, or (peers) a
    string saying why the peer cannot run (then a row with that note). Every variant reads the same
    inputs: ``make_inputs(requires_grad)`` returns a fresh set, and successive runs cycle through
    several sets (at least ``rotate_bytes`` together, at most 8) so that caches do not flatter small
    shapes; the backward seeds every floating output with a fixed random cotangent. ``cost``: what a
    call must move and compute (:class:`Cost`), for the rows' floors, GB/s and GFLOP/s. A variant
    that raises becomes a row with the error, and the others go on.
    """
    dtype_text = dtype_name(dtype)
    variants = [_as_variant(name, entry, backward) for name, entry in fused.items()]
    reference = _as_variant("reference", reference, backward)
    variants.append(dataclasses.replace(reference, name="reference"))
    if compile_reference:
        torch._dynamo.reset()
        variants.append(dataclasses.replace(reference, name="reference+compile",
                                            forward=torch.compile(reference.forward)))
    elif compile_note:
        variants.append(Variant("reference+compile", None, note=compile_note))
    variants += [_as_variant(name, entry, backward) for name, entry in (peers or {}).items()]

    failed: dict = {}
    sets = _input_sets(make_inputs, any(v.backward for v in variants), rotate_bytes)
    turn = iter(range(10 ** 12))
    timed = []
    for variant in variants:
        if variant.forward is None:
            continue
        try:  # the first calls (and compilation) outside the timing; they also warm up
            one = _Timed(variant, sets, device, turn)
            one.run_round(record=False)
            timed.append(one)
        except Exception as exc:  # report, don't hide: the table says why the row is missing
            failed[variant.name] = f"failed: {type(exc).__name__}: {exc}"[:200]
    probes = _ceiling_probes(device, quick)
    probe_samples = interleave(timed, probes, device, warmup=max(0, warmup - 1), reps=reps,
                               max_reps=max_reps or max(4 * reps, 40), max_seconds=max_seconds,
                               tolerance=tolerance)
    ceilings = {name: _rate(name, statistics.median(s), probes[name]) for name, s in probe_samples.items() if s}
    del probes

    rows = []
    by_name = {t.variant.name: t for t in timed}
    for variant in variants:
        one = by_name.get(variant.name)
        if one is None:
            rows.append(Row(op, shape, dtype_text, variant.name, float("nan"), None, None, None,
                            note=failed.get(variant.name, variant.note)))
            continue
        s = one.samples
        fwd, both = statistics.median(s["fwd"]), (statistics.median(s["both"]) if s["both"] else None)
        row = Row(op, shape, dtype_text, variant.name, fwd * 1e3, _median_ms(s["bwd"]), _median_ms(s["both"]),
                  None, note=variant.note, fwd_spread_ms=_spread_ms(s["fwd"]), bwd_spread_ms=_spread_ms(s["bwd"]),
                  both_spread_ms=_spread_ms(s["both"]), ceilings=ceilings, reps=len(s["fwd"]))
        work = variant.cost or cost
        if work is not None:
            row.fwd_gbps = work.fwd_bytes / fwd / 1e9 if work.fwd_bytes else None
            row.fwd_gflops = work.fwd_flops / fwd / 1e9 if work.fwd_flops else None
            floor = work.floor_s(ceilings, dtype_text, backward=False)
            row.floor_multiple = fwd / floor if floor else None
            floor = work.floor_s(ceilings, dtype_text, backward=True)
            row.both_floor_multiple = both / floor if floor and both else None
        peak = one.peak_bytes() if variant.torch_memory else None
        row.peak_mb = None if peak is None else peak / 2 ** 20
        rows.append(row)
    del sets, timed
    gc.collect()
    _alloc.empty_cache()  # the next comparison starts without this one's cached output buffers
    return rows


def speedup(ref: Optional[Row], row: Row) -> tuple:
    """``(ref's time / row's time, forward_only)``: forward + backward where both were timed so,
    else forward; ``(None, False)`` where they do not compare."""
    for part in ("both_ms", "fwd_ms"):
        a, b = (getattr(ref, part) if ref is not None else None), getattr(row, part)
        if a and b and a == a and b == b and a > 0 and b > 0:
            return a / b, part == "fwd_ms"
    return None, False


def _references(rows: list) -> dict:
    """(op, shape, dtype, "reference" or "reference+compile") -> that row."""
    return {(r.op, r.shape, r.dtype, r.variant): r for r in rows if r.variant in ("reference", "reference+compile")}


def _speedups(rows: list) -> dict:
    """id(row) -> its speedups over the eager and the compiled reference, as text (``(fwd)`` when
    only forwards compare)."""
    refs = _references(rows)

    def text(ref, row):
        value, forward_only = speedup(ref, row)
        return "-" if value is None else f"{value:.2f}x" + (" (fwd)" if forward_only else "")

    return {id(r): tuple(text(refs.get((r.op, r.shape, r.dtype, base)), r) for base in ("reference", "reference+compile"))
            for r in rows}


def _cell(x, spec=".3f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _with_spread(median, spread) -> str:
    """``12.3 ±4%``: the median and half the range of the timed runs, relative to the median."""
    if median is None or median != median:
        return "-"
    if not spread or median <= 0:
        return _cell(median)
    return f"{median:.3f} ±{50 * (spread[1] - spread[0]) / median:.0f}%"


TABLE_HEADER = ("| op | shape | dtype | variant | fwd ms | bwd ms | fwd+bwd ms | vs eager | vs compiled | peak MB "
                "| x floor fwd | x floor fwd+bwd | notes |")


def format_table(rows: list, ceilings: Optional[dict] = None) -> str:
    """A Markdown table. Times are medians ± half the range of the timed runs; ``vs eager`` and
    ``vs compiled`` are the speedups over the reference of the same op, shape and dtype, eager and
    under torch.compile (forward + backward, or ``(fwd)`` where only forwards compare); ``x floor``
    is the time over the hardware floor from the ceilings measured with the row (:class:`Cost`).
    ``ceilings`` (of the run) is not used: every row carries its own."""
    lines = [TABLE_HEADER, "|" + "---|" * (TABLE_HEADER.count("|") - 1)]
    speed = _speedups(rows)
    for r in rows:
        eager, compiled = speed[id(r)]
        note = r.note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.variant} | {_with_spread(r.fwd_ms, r.fwd_spread_ms)} | "
                     f"{_with_spread(r.bwd_ms, r.bwd_spread_ms)} | {_with_spread(r.both_ms, r.both_spread_ms)} | "
                     f"{eager} | {compiled} | {_cell(r.peak_mb, '.1f')} | {_cell(r.floor_multiple, '.2f')} | "
                     f"{_cell(r.both_floor_multiple, '.2f')} | {note or '-'} |")
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
        f.write("ceilings at the start: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()) + "\n\n")
        f.write(format_table(rows) + "\n")
    try:
        plot(rows, os.path.join(out_dir, f"{name}.png"), title=f"{name} on {meta['device']}")
    except ImportError:
        pass
    return payload


def plot(rows: list, path: str, title: str = "") -> None:
    """Per op, two panels of horizontal bars, one bar per measured row but the eager reference (the
    1x line): its speedup over the eager and the compiled reference, and its time over the hardware
    floor (both log scale, 1x marked). Rows timed forward + backward and rows timed forward only
    ("fwd") are drawn in separate groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    times_label = FuncFormatter(lambda value, _: f"{value:g}x")

    def log_axis(ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(times_label)
        low, high = ax.get_xlim()
        # Over less than two decades the powers of ten alone leave the axis unlabelled: label 2x,
        # 5x (and 0.2x, 0.5x, ...) too.
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda value, _: f"{value:g}x" if f"{value:.1e}"[0] in "25" else "") if high / max(low, 1e-12) < 100
            else NullFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)

    ops = list(dict.fromkeys(r.op for r in rows if r.fwd_ms == r.fwd_ms))
    if not ops:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no measured rows", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    entries = {}
    refs = _references(rows)
    for op in ops:
        lines = []
        for forward_only in (False, True):
            for r in rows:
                if (r.op != op or r.fwd_ms != r.fwd_ms or (r.both_ms is None) != forward_only
                        or r.variant == "reference"):
                    continue
                eager, _ = speedup(refs.get((op, r.shape, r.dtype, "reference")), r)
                compiled, _ = speedup(refs.get((op, r.shape, r.dtype, "reference+compile")), r)
                floor = r.floor_multiple if forward_only else r.both_floor_multiple
                shape = r.shape.split()[0] if len(r.shape) > 24 else r.shape
                lines.append((f"{r.variant} [{shape}]" + (" fwd" if forward_only else ""), eager, compiled, floor))
        entries[op] = lines
    heights = [max(1.6, 0.32 * len(lines) + 0.9) for lines in entries.values()]
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (op, lines), (ax_speed, ax_floor) in zip(entries.items(), axes):
        ys = list(range(len(lines)))[::-1]
        labels = [line[0] for line in lines]
        for offset, index, label, color in ((-0.2, 1, "vs eager reference", "tab:blue"),
                                            (0.2, 2, "vs compiled reference", "tab:orange")):
            values = [line[index] or 0 for line in lines]
            ax_speed.barh([y + offset for y in ys], values, height=0.38, label=label, color=color)
        if any(line[1] or line[2] for line in lines):
            log_axis(ax_speed)
            ax_speed.legend(fontsize=7, loc="best")
        else:
            ax_speed.text(0.5, 0.5, "no reference rows: the times are in the table", ha="center",
                          va="center", fontsize=8, transform=ax_speed.transAxes)
            ax_speed.set_xticks([])
        ax_speed.set_yticks(ys)
        ax_speed.set_yticklabels(labels, fontsize=8)
        ax_speed.set_title(f"{op}: speedup (fwd+bwd; 'fwd': forward only)", fontsize=9)
        floors = [line[3] or 0 for line in lines]
        ax_floor.barh(ys, floors, height=0.6, color="tab:green")
        if any(floors):
            log_axis(ax_floor)
        else:
            ax_floor.text(0.5, 0.5, "no floor: the benchmark counts no bytes or flops", ha="center",
                          va="center", fontsize=8, transform=ax_floor.transAxes)
            ax_floor.set_xticks([])
        ax_floor.set_yticks(ys)
        ax_floor.set_yticklabels([""] * len(ys))
        ax_floor.set_title("time / hardware floor (1 = at the ceiling)", fontsize=9)
        for y, value in zip(ys, floors):
            if value:
                ax_floor.text(value, y, f" {value:.1f}x", va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / sum(heights)))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)
