"""Spawning a group of local processes, one per rank (the benchmark and the tests use it)."""
from __future__ import annotations

import multiprocessing
from typing import Callable, List, Optional


def spawn_processes(target: Callable, world_size: int, args: tuple, timeout_s: float) -> List[Optional[int]]:
    """Run ``target(rank, world_size, *args)`` in ``world_size`` processes started with "spawn"
    and wait for them. Returns their exit codes in rank order; a process still running after
    ``timeout_s`` seconds (each join's limit) is killed and its code is None.

    ``target`` must be importable by name (a module-level function): each process imports it.
    The processes set up their process group themselves (e.g. a ``file://`` rendezvous).
    """
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, world_size, *args)) for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout_s)
    codes = []
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
            codes.append(None)
        else:
            codes.append(process.exitcode)
    return codes
