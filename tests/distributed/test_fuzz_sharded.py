"""Property-based fuzzing of the sharded ops on 2 and 3 gloo processes: hypothesis draws each case
from the op's declared random generator (``registry.SHARDED_OPS[op].cases.random``, fed by a
hypothesis-controlled ``Random``), a dtype and a data seed, and
:func:`l2m_kernels.distributed.cases.run_case` runs it on every rank against the single-device op
on the whole memory (slot ids identical; outputs and every gradient within the dtype's tolerance).

Rank 0 runs hypothesis (derandomized) and broadcasts each drawn case; every rank runs it, and the
ranks' verdicts are all-gathered, so a failure on any rank fails the example on rank 0, and
hypothesis shrinks it with every rank running each attempt. When hypothesis is done, rank 0
broadcasts the end.

Each process group is spawned once per world size and runs every case (``CASES``) in order
(:mod:`harness`).
"""
from __future__ import annotations

import os

import torch

from . import harness

WORLD_SIZES = (2, 3)
# Per op and world size; L2M_FUZZ_EXAMPLES sets more for a longer sweep.
EXAMPLES = int(os.environ.get("L2M_FUZZ_EXAMPLES", "60"))
DTYPES = ("float32", "float64", "float16", "bfloat16")


def _run_everywhere(op, case, rank, world_size):
    """Run ``case = (params, dtype name, seed)`` on this rank; every rank's failures, by rank."""
    import torch.distributed as dist

    from l2m_kernels.distributed.cases import run_case

    params, dtype_name, seed = case
    failures = run_case(op, params, getattr(torch, dtype_name), seed, rank, world_size).failures
    every = [None] * world_size
    dist.all_gather_object(every, failures)
    return {r: f for r, f in enumerate(every) if f}


def _fuzz(rank, world_size, op):
    import random

    import torch.distributed as dist
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from l2m_kernels.ops import registry

    if rank != 0:   # run what rank 0 draws until it sends None
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                return
            _run_everywhere(op, message[0], rank, world_size)

    decl = registry.SHARDED_OPS[op]
    ran = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(rng=st.randoms(use_true_random=False), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
    def fuzz(rng, dtype, seed):
        params = decl.cases.random(random.Random(rng.getrandbits(64)))
        case = (params, dtype, seed)
        dist.broadcast_object_list([case], src=0)
        failed = _run_everywhere(op, case, rank, world_size)
        ran.append(case)
        assert not failed, f"{decl.cases.label(params)} {dtype} seed {seed}: failures by rank {failed}"

    try:
        fuzz()
    finally:
        dist.broadcast_object_list([None], src=0)
    assert len(ran) >= EXAMPLES, (len(ran), ran[-3:])


CASES = {op: (lambda r, p, op=op: _fuzz(r, p, op)) for op in
         ("sharded_topk_memory_read", "sharded_product_key_read", "sharded_gated_memory_write")}


group_results, test_fuzz_sharded_op = harness.case_tests(__name__, WORLD_SIZES)


def test_every_sharded_op_is_fuzzed():
    from l2m_kernels.ops import registry

    assert set(CASES) == set(registry.SHARDED_OPS)
