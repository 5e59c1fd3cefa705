"""Spawned gloo process groups for the tests of ``l2m_kernels.distributed``, and their helpers.

A test module defines ``CASES`` (name -> ``case(rank, world_size)``); :func:`group_results` spawns
one process group per world size that runs every case in order. Each rank records per case either
nothing or its traceback, and one pytest test per (world size, case) reports them. The comparisons
of a case run after its collectives, so a rank goes on after a failed comparison; after any other
error it stops, and the others fail in their next collective (the process group's timeout) rather
than hang.
"""
from __future__ import annotations

import importlib
import json
import os
import traceback
from datetime import timedelta

import pytest
import torch

COLLECTIVE_TIMEOUT_S = 30
JOIN_TIMEOUT_S = 150


def offsets(sizes):
    """The first global slot of each shard."""
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    return starts


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def expect_error(fragments, call, error=ValueError):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def _worker(rank: int, world_size: int, folder: str, module: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    cases = importlib.import_module(module).CASES
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        for name, case in cases.items():
            try:
                case(rank, world_size)
                results[name] = None
            except AssertionError:  # raised after the case's collectives: the ranks are in step
                results[name] = traceback.format_exc()
            except BaseException:  # noqa: BLE001 - every failure is reported to pytest
                results[name] = traceback.format_exc()
                break  # the other ranks' collectives may no longer match this rank's
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        results["<process group>"] = traceback.format_exc()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


def run_group(world_size: int, folder: str, module: str):
    """Per case of ``module``'s ``CASES``, the failures of the ranks: ``{case: ["rank r: ...", ...]}``."""
    from l2m_kernels.distributed.spawn import spawn_processes

    names = list(importlib.import_module(module).CASES)
    codes = spawn_processes(_worker, world_size, (folder, module), JOIN_TIMEOUT_S)
    failures = {name: [] for name in names}
    for rank, code in enumerate(codes):
        path = os.path.join(folder, f"rank{rank}.json")
        if not os.path.exists(path):
            for name in names:
                failures[name].append(f"rank {rank}: the process ended (exit code {code}; None: killed) "
                                      f"without reporting, within {JOIN_TIMEOUT_S} s")
            continue
        with open(path) as handle:
            results = json.load(handle)
        group_error = results.pop("<process group>", None)
        for name in names:
            if name not in results:
                failures[name].append(f"rank {rank}: not run (an earlier case failed on this rank)"
                                      + (f"\n{group_error}" if group_error else ""))
            elif results[name] is not None:
                failures[name].append(f"rank {rank}:\n{results[name]}")
    return failures


def group_results(module: str):
    """A module-scoped fixture: ``results(world_size)`` runs ``module``'s cases once per world size."""

    @pytest.fixture(scope="module")
    def results_fixture(tmp_path_factory):
        cache = {}

        def results(world_size):
            if world_size not in cache:
                folder = str(tmp_path_factory.mktemp(f"gloo{world_size}"))
                cache[world_size] = run_group(world_size, folder, module)
            return cache[world_size]
        return results
    return results_fixture


def case_tests(module: str, world_sizes):
    """``(fixture, test)`` for a test module: bind them at module level as ``group_results`` (the
    fixture's name) and ``test_<name>``; the test runs once per (world size, case of ``CASES``)
    and reports the ranks' failures."""
    cases = list(importlib.import_module(module).CASES)

    @pytest.mark.parametrize("world_size", world_sizes)
    @pytest.mark.parametrize("case", cases)
    def test(group_results, world_size, case):
        failures = group_results(world_size)[case]
        if failures:
            pytest.fail(f"{case} on {world_size} gloo processes:\n" + "\n".join(failures), pytrace=False)
    return group_results(module), test
