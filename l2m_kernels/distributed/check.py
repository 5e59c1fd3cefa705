"""``l2m-check --distributed P``: every sharded op (``registry.SHARDED_OPS``) on P gloo processes of
this machine against the single-device op it is declared to equal, run whole in each process.

The cases are the op's declared edge cases and random shapes (``l2m-check``'s ``build_cases``), each
at float32, float16, bfloat16 and float64 (``--dtypes`` narrows them); :func:`l2m_kernels.distributed.cases.run_case`
builds and judges one on every rank. A case passes when it passes on every rank; its error is the
largest over the ranks. A rank whose case raised stops there (the others' next collective fails
within the group's timeout rather than hanging), and the cases not run are reported as failures.
"""
from __future__ import annotations

import json
import os
import tempfile
import traceback
from datetime import timedelta
from typing import List, Optional, Sequence

import torch

from ..check import DTYPES  # every dtype l2m-check knows

COLLECTIVE_TIMEOUT_S = 60


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _plan(ops: Sequence[str], dtypes, seed: int, quick: bool):
    """``[(op, dtype name, params, case index)]`` in run order (the same on every rank)."""
    from ..check import build_cases

    runs = []
    for op in ops:
        for index, params in enumerate(build_cases(op, seed, quick)):
            runs += [(op, _dtype_name(dtype), params, index) for dtype in dtypes]
    return runs


def _worker(rank: int, world_size: int, folder: str, ops: List[str], dtype_names: List[str], seed: int,
            quick: bool) -> None:
    import torch.distributed as dist

    from .cases import case_seed, run_case

    torch.set_num_threads(1)
    dtypes = [getattr(torch, name) for name in dtype_names]
    outcomes = []
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        for op, dtype_name, params, index in _plan(ops, dtypes, seed, quick):
            dtype = getattr(torch, dtype_name)
            try:
                judge = run_case(op, params, dtype, case_seed(seed, op, index, dtype), rank, world_size)
                outcomes.append({"errors": judge.errors, "failures": judge.failures})
            except BaseException:  # noqa: BLE001 - reported; the ranks may be out of step now
                outcomes.append({"exception": traceback.format_exc()})
                break
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        outcomes.append({"exception": traceback.format_exc()})
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(outcomes, handle)


def run(world_size: int, ops: Sequence[str], dtypes=DTYPES, seed: int = 0, quick: bool = False,
        timeout_s: float = 600):
    """Check ``ops`` on ``world_size`` gloo processes; returns :class:`l2m_kernels.check.Result` s,
    one per (op, dtype, case), with ``backend`` ``"gloo xP"``."""
    from ..check import Result, shape_label
    from .spawn import spawn_processes

    if world_size < 1:
        raise ValueError(f"--distributed: expected at least 1 process, got {world_size}")
    names = [_dtype_name(dtype) for dtype in dtypes]
    runs = _plan(ops, dtypes, seed, quick)
    with tempfile.TemporaryDirectory(prefix="l2m-check-gloo") as folder:
        codes = spawn_processes(_worker, world_size, (folder, list(ops), names, seed, quick), timeout_s)
        per_rank = []
        for rank, code in enumerate(codes):
            path = os.path.join(folder, f"rank{rank}.json")
            if os.path.exists(path):
                with open(path) as handle:
                    per_rank.append(json.load(handle))
            else:
                per_rank.append([{"exception": f"rank {rank} ended (exit code {code}; None: killed after "
                                               f"{timeout_s} s) without reporting"}])

    backend = f"gloo x{world_size}"
    results = []
    for position, (op, dtype_name, params, _) in enumerate(runs):
        label = shape_label(op, params)
        tolerance = None
        errors, limits, messages, raised = {}, {}, [], False
        for rank, outcomes in enumerate(per_rank):
            if position >= len(outcomes) or "exception" in outcomes[position]:
                raised = True
                messages.append(f"rank {rank}: " + (outcomes[position]["exception"].strip().splitlines()[-1]
                                                    if position < len(outcomes) else
                                                    "not run (an earlier case raised)"))
                continue
            outcome = outcomes[position]
            for name, (error, allowed) in outcome["errors"].items():
                errors[name] = max(errors.get(name, 0.0), error)
                limits[name] = allowed
                tolerance = allowed if allowed else tolerance
            messages += [f"rank {rank}: {name}: {why}" for name, why in outcome["failures"].items()]
        measured = {n: e for n, e in errors.items() if limits[n]}
        worst = max(measured, key=lambda n: measured[n] / limits[n], default=None)
        results.append(Result(op, backend, dtype_name, label, "FAIL" if messages else "PASS",
                              None if worst is None or raised else errors[worst], worst, tolerance, errors,
                              limits, "; ".join(messages)))
    return results


def sharded_ops(requested: Optional[Sequence[str]] = None) -> List[str]:
    """The sharded ops among ``requested`` (all of them when None)."""
    from ..ops import registry

    names = list(registry.SHARDED_OPS)
    return names if requested is None else [op for op in requested if op in registry.SHARDED_OPS]
