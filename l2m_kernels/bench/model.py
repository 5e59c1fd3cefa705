"""Benchmark one training step of :class:`l2m_kernels.models.L2MModel`: fused backends vs the
reference backend, with the same weights and config.

A step is forward + backward + ``torch.optim.AdamW`` step over ``SEGMENTS`` segments of
``segment_len`` tokens (each segment attends locally, reads the top-k of every layer's memory, then
writes itself into the memory), for both memory modes:

- ``append``: the step starts from a full memory (``memory_slots`` random keys and values,
  ``valid_len = N``), as in the middle of a long document; the segment writes are not
  differentiated (as in Memorizing Transformers).
- ``slots``: the learned slot memory (all ``N`` slots exist by construction); the writes are
  differentiable, so the backward runs through them.

Config (``CPU_CONFIG``), float32: vocab 256, d_model 256, 2 layers (both with memory), 4 query
heads of 64 and one key/value head (so one memory of N x 64 per layer), segment_len = window = 256,
memory_slots N = 4096, topk 32, write_topk 2, joint merge; batch 1, 4 segments (1024 tokens) per
step. ``--quick``: N = 2048, 2 segments (512 tokens). On CUDA the same with batch 8 and bfloat16
(``GPU_BATCH``).

Why this size: the reference's slots-mode write (:func:`gated_memory_write_ref`) rebuilds the
whole memory at every (token, slot) write, L * write_topk * layers = 4096 rebuilds of the
(B, Hkv, N, 64) memory per step, in the forward and again in the backward. Under autograd the small
tensors it saves land in the holes its freed memory copies leave in glibc's heap, so the process
RSS grows by about one memory copy per rebuild (benchmarks/RESULTS.md has the growth at this config;
with 4 key/value heads, write_topk 4 and N = 16384 the same count gives ~128 GB). The allocator-level
peak below counts live tensors only and does not see that growth.

Variants: ``config.backend = None`` (automatic: the fused backend of each op on this device; the row
is named after the backends chosen) and ``backend="reference"`` (the naive PyTorch ops). The
reference under ``torch.compile`` is not run: compiling the whole step would unroll every segment
and, in the reference write, every (token, slot) write step (minutes to hours of compilation).
Each variant starts from the same initial weights (each its own copy of the initial model) with a fresh optimizer,
and every step starts from the same memory state, so every step does the same work.

Reported per row: ``fwd ms`` = forward with autograd, ``bwd ms`` = backward + optimizer step,
``fwd+bwd ms`` = the whole step (medians over the timed steps), tokens/s in the note (tokens per
step / step time), and ``peak MB``: :func:`l2m_kernels.benchmark.peak_memory_bytes` of one whole step,
i.e. the activations, gradients and temporaries above what lives before it (weights, optimizer
state, the memory state).
"""
from __future__ import annotations

import copy
import re
import statistics
import time

import torch

from l2m_kernels import benchmark as bm
from l2m_kernels.backends import select_backend
from l2m_kernels.models import L2MConfig, L2MModel

from ._common import dtype_name, skipped_row

OP = "L2M train step"
MODES = ("append", "slots")
CPU_CONFIG = dict(vocab_size=256, d_model=256, n_layers=2, n_heads=4, segment_len=256, window=256,
                  n_kv_heads=1, memory_slots=4096, topk=32, write_topk=2, merge="joint")
SEGMENTS = 4
CPU_BATCH, GPU_BATCH = 1, 8
QUICK = dict(memory_slots=2048, segments=2)
TINY_CONFIG = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, segment_len=16, window=16,
                   memory_slots=64, topk=4, write_topk=2, merge="joint")  # tests only
TARGET_SPEEDUP, TARGET_MEMORY_RATIO = 2.5, 1 / 3  # issue 7, on the 2-core CPU


def setup(device: torch.device, quick: bool = False, tiny: bool = False):
    """``(config kwargs without memory_mode, batch, segments, dtype)`` of the benchmark."""
    config = dict(TINY_CONFIG if tiny else CPU_CONFIG)
    segments = 2 if tiny else SEGMENTS
    if quick and not tiny:
        config["memory_slots"], segments = QUICK["memory_slots"], QUICK["segments"]
    batch = GPU_BATCH if device.type == "cuda" else CPU_BATCH
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return config, batch, segments, dtype


def _fused_name(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    ops = ["memory_attention", "gated_memory_write"] + (["topk_memory_read"] if mode == "slots" else [])
    chosen = sorted({select_backend(op, device, dtype) for op in ops})
    return "+".join(chosen)


def _initial_state(model: L2MModel, mode: str, batch: int, device, dtype):
    """``append``: a full memory of random keys/values; ``slots``: None (the model starts from its
    learned initial slot values, which then get gradients)."""
    if mode == "slots":
        return None
    gen = torch.Generator(device="cpu").manual_seed(1)
    state = model.init_state(batch, device=device, dtype=dtype)
    for layer in state.layers:
        if layer.mem_keys is not None:
            shape = layer.mem_keys.shape
            layer.mem_keys = torch.randn(shape, generator=gen).to(device, dtype)
            layer.mem_values = torch.randn(shape, generator=gen).to(device, dtype)
            layer.valid_len = torch.full_like(layer.valid_len, shape[2])
    return state


def run_mode(mode: str, device: torch.device, quick: bool = False, tiny: bool = False,
             max_seconds: float | None = None) -> list:
    """The rows of one memory mode: fused, reference, and the skipped compiled reference."""
    config_kw, batch, segments, dtype = setup(device, quick, tiny)
    config = L2MConfig(memory_mode=mode, **config_kw)
    tokens = segments * config.segment_len
    shape = (f"{mode} B={batch} L={tokens} ({segments} seg x {config.segment_len}) d={config.d_model} "
             f"layers={config.n_layers} H={config.n_heads} Hkv={config.n_kv_heads} N={config.memory_slots} "
             f"k={config.topk}"
             + (f" kw={config.write_topk}" if mode == "slots" else ""))
    torch.manual_seed(0)
    model = L2MModel(config).to(device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, tokens + 1), generator=gen).to(device)
    inputs, labels = input_ids[:, :-1], input_ids[:, 1:]
    state = _initial_state(model, mode, batch, device, dtype)
    warmup, reps = (1, 1) if tiny else (1, 3) if quick else (2, 5)
    # Timed steps stop at ``reps`` or, with at least ``min_steps`` timed, once ``max_seconds`` are spent.
    min_steps = 1 if quick or tiny else 2
    max_seconds = (5.0 if quick else 30.0) if max_seconds is None else max_seconds

    variants = ((_fused_name(mode, device, dtype), None), ("reference", "reference"))
    steps = {}
    for variant, backend in variants:
        own = copy.deepcopy(model)  # each variant its own copy of the initial weights, its own optimizer
        optimizer = torch.optim.AdamW(own.parameters(), lr=1e-4)

        def step(times=None, own=own, optimizer=optimizer, backend=backend):
            bm.synchronize(device)
            start = time.perf_counter()
            loss = own(inputs, state, labels=labels, backend=backend).loss
            bm.synchronize(device)
            forward_done = time.perf_counter()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bm.synchronize(device)
            if times is not None:
                times.append((forward_done - start, time.perf_counter() - forward_done))

        for _ in range(warmup):  # also creates the optimizer state, which the peak then excludes
            step()
        steps[variant] = step
    del model
    # The variants' steps interleaved (fused, reference, reference, fused, ...), so that a change of
    # the machine's load reaches both alike.
    times = {variant: [] for variant in steps}
    order = list(steps)
    while min(len(t) for t in times.values()) < reps:
        for variant in order:
            steps[variant](times[variant])
        order.reverse()
        spent = sum(f + b for t in times.values() for f, b in t)
        if spent > max_seconds * len(steps) and min(len(t) for t in times.values()) >= min_steps:
            break

    rows = []
    for variant, step in steps.items():
        peak = bm.peak_memory_bytes(step, device)
        timed = times[variant]
        fwd = statistics.median(f for f, _ in timed)
        bwd = statistics.median(b for _, b in timed)
        both = statistics.median(f + b for f, b in timed)
        samples = {"fwd": [f for f, _ in timed], "bwd": [b for _, b in timed], "both": [f + b for f, b in timed]}
        spreads = {f"{name}_spread_ms": [min(s) * 1e3, max(s) * 1e3] for name, s in samples.items()}
        rows.append(bm.Row(OP, shape, dtype_name(dtype), variant, fwd * 1e3, bwd * 1e3, both * 1e3,
                           None if peak is None else peak / 2 ** 20, reps=len(timed),
                           note=f"{batch * tokens / both:.0f} tokens/s ({len(timed)} step{'s' * (len(timed) > 1)} "
                                f"timed after {warmup} warm-up, interleaved with the other variant)", **spreads))
    rows.append(skipped_row(OP, shape, dtype, "reference+compile",
                            "skipped: torch.compile of the whole step unrolls every segment and every "
                            "reference write step (minutes to hours of compilation)"))
    return rows


def run(device: torch.device, quick: bool = False, ceilings: dict | None = None, *, tiny: bool = False) -> list:
    rows = []
    for mode in MODES:
        rows += run_mode(mode, device, quick, tiny)
    return rows


def tokens_per_second(row: bm.Row) -> float | None:
    match = re.match(r"([0-9.]+) tokens/s", row.note or "")
    return float(match.group(1)) if match else None


def summary(rows: list) -> tuple:
    """``(markdown, records)``: per memory mode, fused vs reference tokens/s and peak memory, and
    the issue's targets (fused tokens/s >= 2.5x the reference, peak memory <= 1/3)."""
    records = []
    lines = ["| memory mode | variant | tokens/s | step ms | fwd ms | bwd + optimizer ms | peak MB "
             "| tokens/s vs reference | peak vs reference |", "|" + "---|" * 9]
    for shape in dict.fromkeys(r.shape for r in rows if r.op == OP):
        group = [r for r in rows if r.op == OP and r.shape == shape and r.both_ms]
        ref = next((r for r in group if r.variant == "reference"), None)
        for r in group:
            tps = tokens_per_second(r)
            speed = mem = None
            if ref is not None and r is not ref:
                speed = ref.both_ms / r.both_ms
                mem = r.peak_mb / ref.peak_mb if r.peak_mb is not None and ref.peak_mb else None
            record = dict(mode=shape.split()[0], shape=shape, variant=r.variant, tokens_per_s=tps,
                          step_ms=r.both_ms, fwd_ms=r.fwd_ms, bwd_opt_ms=r.bwd_ms, peak_mb=r.peak_mb,
                          speedup=speed, peak_ratio=mem)
            if speed is not None:
                record["meets_target"] = bool(speed >= TARGET_SPEEDUP and mem is not None
                                              and mem <= TARGET_MEMORY_RATIO)
            records.append(record)
            lines.append(f"| {record['mode']} | {r.variant} | {tps:.0f} | {r.both_ms:.0f} | {r.fwd_ms:.0f} | "
                         f"{r.bwd_ms:.0f} | {'-' if r.peak_mb is None else f'{r.peak_mb:.1f}'} | "
                         f"{'-' if speed is None else f'{speed:.2f}x'} | "
                         f"{'-' if mem is None else f'{mem:.2f}'} |")
    return "\n".join(lines), records
