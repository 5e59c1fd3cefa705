"""Property-based fuzzing of the sharded ops on 2 and 3 gloo processes: hypothesis draws each case
from the op's declared random generator (``registry.SHARDED_OPS[op].cases.random``, fed by a
hypothesis-controlled ``Random``) and a dtype, and :func:`l2m_kernels.distributed.cases.run_case`
runs it against the single-device op on the whole memory (slot ids identical; outputs and every
gradient within the dtype's tolerance).

Every rank runs the same hypothesis loop, derandomized and generation only (no shrinking, which
would follow one rank's failure alone), so every rank draws the same cases in the same order; each
example first all-gathers a checksum of the drawn case and fails on every rank if the ranks drew
different ones. A failing example raises on its rank after the collectives of its case; that rank
stops there and the others fail in their next collective (the group's timeout).

Each process group is spawned once per world size and runs every case (``CASES``) in order
(:mod:`harness`).
"""
from __future__ import annotations

import os
import zlib

import torch

from . import harness

WORLD_SIZES = (2, 3)
# Per op and world size; L2M_FUZZ_EXAMPLES sets more for a longer sweep.
EXAMPLES = int(os.environ.get("L2M_FUZZ_EXAMPLES", "60"))


def _fuzz(rank, world_size, op):
    import random

    import torch.distributed as dist
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from l2m_kernels.distributed.cases import run_case
    from l2m_kernels.ops import registry

    decl = registry.SHARDED_OPS[op]
    drawn = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck), print_blob=False)
    @given(rng=st.randoms(use_true_random=False), dtype=st.sampled_from([torch.float32, torch.float64]),
           seed=st.integers(0, 2**31 - 1))
    def fuzz(rng, dtype, seed):
        params = decl.cases.random(random.Random(rng.getrandbits(64)))
        label = f"{decl.cases.label(params)} {dtype} seed {seed}"
        # Every rank must run the same case: compare a checksum of it before anything else.
        mine = torch.tensor([zlib.crc32(label.encode())], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(every, mine)
        if len({int(t) for t in every}) != 1:
            raise RuntimeError(f"the ranks drew different cases (rank {rank}: {label})")
        judge = run_case(op, params, dtype, seed, rank, world_size)
        drawn.append(label)
        assert not judge.failures, f"{label}: {judge.failures}"

    fuzz()
    assert len(drawn) == EXAMPLES, (len(drawn), drawn[-3:])


CASES = {op: (lambda r, p, op=op: _fuzz(r, p, op)) for op in
         ("sharded_topk_memory_read", "sharded_product_key_read", "sharded_gated_memory_write")}


group_results, test_fuzz_sharded_op = harness.case_tests(__name__, WORLD_SIZES)


def test_every_sharded_op_is_fuzzed():
    from l2m_kernels.ops import registry

    assert set(CASES) == set(registry.SHARDED_OPS)
