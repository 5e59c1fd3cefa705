"""``l2m-bench``: runs at tiny shapes, writes JSON, Markdown and PNG, and its table compares the fused
backend with the reference (op benchmarks and the model training step)."""
import importlib
import json

import pytest
import torch

from l2m_kernels import backends
from l2m_kernels.bench import BENCHMARKS, QUICK_WRITE_COMPILE_NOTE, main, results, run_benchmark

_CPU_REASONS = backends.BACKENDS["cpu"].not_supported_reasons("merge_attention", torch.device("cpu"),
                                                              torch.float32)
pytestmark = pytest.mark.skipif(bool(_CPU_REASONS), reason="cpu: " + "; ".join(_CPU_REASONS))


def test_bench_tiny_writes_outputs(tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    # merge: an op benchmark; memory_write: the compiled-reference skip path; model: the training step.
    status = main(["--tiny", "--device", "cpu", "--out", str(out), "--no-progress",
                   "--only", "merge,bench_memory_write,model"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    for name in ("suite.json", "suite.md", "suite.png"):
        assert (out / name).stat().st_size > 0, name

    report = json.loads((out / "suite.json").read_text())
    assert set(report["meta"]["ceilings"]) >= {"matmul_gflops_float32", "copy_gbps"}
    # In the order of the ops' declarations (l2m_kernels/ops/registry.py), the model step last.
    assert report["meta"]["benchmarks"] == ["memory_write", "merge", "model"] and not report["meta"]["failed"]
    rows = report["rows"]
    # The rows are result rows (python -m l2m_kernels.bench.results add suite.json records them).
    assert [results.problems(r) for r in rows] == [[]] * len(rows)
    assert {r["source"] for r in rows} == {"l2m-bench --device cpu --only merge,bench_memory_write,model --tiny"}
    timed = [r for r in rows if r["variant"] == "cpu"]
    assert timed and all(r["both_spread_ms"][0] <= r["both_ms"] <= r["both_spread_ms"][1] for r in timed)
    for op in ("merge_attention", "gated_merge", "gated_memory_write", "gated_dense_update", "L2M train step"):
        variants = {r["variant"] for r in rows if r["op"] == op}
        assert {"cpu", "reference", "reference+compile"} <= variants, (op, variants)
        measured = [r for r in rows if r["op"] == op and r["variant"] in ("cpu", "reference")]
        assert all(r["both_ms"] > 0 and r["peak_mb"] is not None for r in measured), measured
    model = report["model_step"]
    assert {(m["mode"], m["variant"]) for m in model} == {(mode, v) for mode in ("append", "slots")
                                                          for v in ("cpu", "reference")}
    assert all(m["tokens_per_s"] > 0 for m in model)
    assert all(m["speedup"] > 0 for m in model if m["variant"] == "cpu")

    table = (out / "suite.md").read_text()
    assert "| merge_attention |" in table and "| reference |" in table and "| cpu |" in table
    assert "Model training step" in table and "tokens/s" in table
    assert "| L2M train step |" in printed


def test_bench_tiny_compares_with_the_peers(tmp_path, one_thread):
    # Every peer is a row: measured where installed, else a note saying how to install it.
    out = tmp_path / "bench"
    status = main(["--tiny", "--device", "cpu", "--out", str(out), "--no-progress", "--only", "topk_read,product_key"])
    assert status == 0
    rows = json.loads((out / "suite.json").read_text())["rows"]
    variants = {(r["op"], r["variant"]): r for r in rows}
    for op, peer in (("topk_memory_read", "faiss IndexFlatIP (search)"), ("topk_memory_read", "bare matmul (scores)"),
                     ("product_key_read", "plain embedding_bag"), ("ProductKeyMemory", "lucidrains PKM"),
                     ("ProductKeyMemory", "lucidrains PKM sparse")):
        if (op, peer) not in variants:  # a peer that is not installed is one row under its family's name
            peer = "lucidrains PKM"
        row = variants[(op, peer)]
        assert row["kind"] == "peer" and (row["fwd_ms"] or row["notes"].startswith("not installed")), row
    ours = variants[("ProductKeyMemory", "cpu module sparse_grad")]
    assert ours["kind"] == "fused" and ours["both_ms"] > 0 and ours["both_floor_multiple"] > 0


def test_bench_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "merge,nonsense"])
    assert "nonsense" in capsys.readouterr().err
    assert BENCHMARKS[-1] == "model"


@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # a plot of no rows
def test_bench_options_reach_the_benchmarks(tmp_path, monkeypatch):
    # --merge reaches memory_attention; a quick memory_write skips its compiled reference (minutes of
    # compilation) only when other benchmarks run too, so that --only memory_write --quick measures it.
    calls = {}

    def recorder(name):
        def run(device, quick, ceilings, **kwargs):
            calls[name] = dict(kwargs, quick=quick)
            return []
        return run

    for name in ("memory_attention", "memory_write"):
        monkeypatch.setattr(importlib.import_module(f"l2m_kernels.bench.{name}"), "run", recorder(name))
    cpu = torch.device("cpu")
    run_benchmark("memory_write", cpu, True, {})
    assert calls["memory_write"]["skip_compile_note"] == QUICK_WRITE_COMPILE_NOTE
    run_benchmark("memory_write", cpu, True, {}, alone=True)
    assert "skip_compile_note" not in calls["memory_write"]
    run_benchmark("memory_attention", cpu, False, {})
    assert calls["memory_attention"]["merge"] == "joint"

    status = main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
                   "--only", "memory_attention", "--merge", "gate"])
    assert status == 0 and calls["memory_attention"] == dict(merge="gate", tiny=True, quick=False)
    with pytest.raises(SystemExit):
        main(["--merge", "sum"])


def test_bench_distributed_tiny(tmp_path):
    # Spawned gloo groups of 1 and 2 processes; the bytes of the sharded read are counted, the
    # naive read's are the whole memory. Not in the --quick suite unless named.
    from l2m_kernels.bench import NOT_IN_QUICK, build_parser
    from l2m_kernels.bench import _names as bench_names
    from l2m_kernels.bench.distributed import DIM, K, TINY

    status = main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--only", "distributed"])
    assert status == 0
    rows = json.loads((tmp_path / "suite.json").read_text())["rows"]
    assert [results.problems(r) for r in rows] == [[]] * len(rows) == [[]] * 2 * len(TINY["ranks"])
    for row in rows:
        assert row["fwd_ms"] > 0 and row["both_ms"] > 0, row
    world_size = TINY["ranks"][-1]
    sharded = next(r for r in rows if r["variant"] == "cpu sharded" and r["shape"].startswith(f"P={world_size} "))
    candidates = world_size * K * 12 * TINY["queries"]
    assert f"all_gather {candidates + 29 * 8 * world_size:,}" in sharded["notes"], sharded["notes"]
    assert f"all_reduce {TINY['queries'] * DIM * 4:,}" in sharded["notes"], sharded["notes"]
    naive = next(r for r in rows if r["variant"].startswith("naive") and r["shape"].startswith(f"P={world_size} "))
    assert f"forward {TINY['slots'] * 2 * DIM * 4:,} " in naive["notes"], naive["notes"]
    parser = build_parser()
    assert set(NOT_IN_QUICK) & set(bench_names("", parser, quick=True)) == set()
    assert "distributed" in bench_names("", parser) and bench_names("distributed", parser, quick=True) == ["distributed"]
