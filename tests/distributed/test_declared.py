"""The sharded ops are declared once (``registry.SHARDED_OPS``), and what users and checks see is
derived from it: the public functions take the declared arguments in order, docs/distributed.md has
a row for each, each sharded op names the single-device op it equals, and ``l2m-check
--distributed P`` runs every declared edge case and random shapes on P gloo processes, every case
passing against that op run whole (slot ids identical; outputs and every gradient within the
dtype's tolerance), on 2, 3 and 4 processes.
"""
from __future__ import annotations

import inspect
import pathlib
import random
import re

import pytest
import torch

import l2m_kernels.distributed as distributed
from l2m_kernels import check
from l2m_kernels.distributed import cases
from l2m_kernels.distributed import check as distributed_check
from l2m_kernels.ops import registry

DECLS = list(registry.SHARDED_OPS.values())
IDS = [decl.name for decl in DECLS]
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_public_function_takes_the_declared_arguments_in_order(decl):
    function = getattr(distributed, decl.name)
    assert decl.name in distributed.__all__
    assert function.__module__ == f"l2m_kernels.distributed.{decl.module}"
    assert list(inspect.signature(function).parameters) == [arg.name for arg in decl.args]
    assert decl.of in registry.OPS
    assert not hasattr(torch.ops.l2m, decl.name)   # collectives: no custom op of its own


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_docs_section_has_a_row_for_every_declared_argument(decl):
    if not DOCS.is_file():
        pytest.skip(f"no docs/ in this installation ({DOCS} missing): docs are checked from the source tree")
    text = DOCS.read_text()
    heading = f"\n## `{decl.name}`\n"
    assert heading in text, f"docs/distributed.md has no section {heading.strip()}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| ([^|]*) \|", section, flags=re.M)
    for arg in decl.args:
        assert any(f"`{arg.name}`" in cell for cell in first_cells), f"{decl.name}: no row for {arg.name!r}"


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_declared_cases_are_complete_and_reproducible(decl):
    for params in decl.cases.edge + (decl.cases.random(random.Random(3)),):
        full = cases.full_case(decl.name, params)
        assert set(full) >= set(cases.DEFAULTS[decl.name]) and decl.cases.label(params)
        assert full["sizes"] in cases.SHARD_PATTERNS
    quick = check.build_cases(decl.name, seed=5, quick=True)
    assert quick[:2] == [dict(c) for c in decl.cases.edge[:2]]
    assert check.build_cases(decl.name, seed=5, quick=False) == check.build_cases(decl.name, seed=5, quick=False)
    labels = {decl.cases.label(decl.cases.random(random.Random(seed))) for seed in range(20)}
    assert len(labels) > 1
    assert decl.bench.module == "distributed"
    source = inspect.getsource(__import__(f"l2m_kernels.bench.{decl.bench.module}", fromlist=["_"]))
    assert decl.name in source, f"l2m_kernels.bench.{decl.bench.module} does not time {decl.name}"


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("pattern", cases.SHARD_PATTERNS)
def test_shard_patterns_cover_the_memory(pattern, world_size):
    for total in (0, 1, 7, 25):
        sizes = cases.pattern_sizes(pattern, total, world_size)
        assert len(sizes) == world_size and sum(sizes) == total and min(sizes) >= 0, (pattern, total, sizes)
    if world_size > 1 and pattern in ("empty_first", "one_holds_all"):
        assert cases.pattern_sizes(pattern, 9, world_size)[0] == 0


def test_unknown_shard_pattern_raises():
    with pytest.raises(ValueError, match="sizes: expected one of"):
        cases.pattern_sizes("random", 5, 2)


# (world size, seed, quick, dtypes): every declared edge case with random shapes of two seeds on 2
# and 4 processes in float32 and float64, and the quick set on 3 (a world size that divides nothing
# evenly) in every dtype.
FULL = (torch.float32, torch.float64)
RUNS = [(2, 0, False, FULL), (4, 1, False, FULL), (3, 2, True, distributed_check.DTYPES)]


@pytest.fixture(scope="module")
def check_results():
    cache = {}

    def results(world_size, seed, quick, dtypes):
        key = (world_size, seed, quick, dtypes)
        if key not in cache:
            cache[key] = distributed_check.run(world_size, list(registry.SHARDED_OPS), dtypes, seed=seed,
                                               quick=quick, timeout_s=240)
        return cache[key]
    return results


@pytest.mark.parametrize("world_size, seed, quick, dtypes", RUNS)
@pytest.mark.parametrize("op", IDS)
def test_l2m_check_distributed_passes_every_declared_case(check_results, op, world_size, seed, quick, dtypes):
    results = [r for r in check_results(world_size, seed, quick, dtypes) if r.op == op]
    expected = len(check.build_cases(op, seed, quick)) * len(dtypes)
    assert len(results) == expected
    failed = [f"{r.dtype} {r.shape}: {r.message}" for r in results if r.status != "PASS"]
    assert not failed, "\n".join(failed)
    assert all(r.errors and r.max_error is not None and r.max_error <= r.tolerance for r in results)
    assert {"indices" if op != "sharded_gated_memory_write" else "memory"} <= set(results[0].errors)


def test_l2m_check_distributed_command(capsys):
    code = check.main(["--distributed", "2", "--quick", "--ops", "sharded_gated_memory_write",
                       "--dtypes", "float64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sharded_gated_memory_write  gloo x2  float64" in out and "PASS" in out
    assert "sharded_topk_memory_read" not in out
