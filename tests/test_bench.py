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
    # Spawned gloo groups of 1 and 2 processes; the bytes of the sharded reads (replicated and
    # sharded queries) and write are counted, the naive reads' are the whole memory (top-k) or the
    # whole values (product-key, in both shard modes), the naive write's the whole memory (and every
    # rank's writes). Not in the --quick suite unless named.
    from l2m_kernels.bench import NOT_IN_QUICK, build_parser
    from l2m_kernels.bench import _names as bench_names
    from l2m_kernels.bench.distributed import DIM, K, KW, OP, PK_OP, PK_SHARDS, TINY, WRITE_OP
    from l2m_kernels.distributed.write import _FIELDS as WRITE_FIELDS

    status = main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--only", "distributed"])
    assert status == 0
    rows = json.loads((tmp_path / "suite.json").read_text())["rows"]
    # Per P: the top-k read's 4 rows (2 query layouts), the product-key read's 8 (2 shard modes x 2
    # query layouts), the write's 4.
    assert [results.problems(r) for r in rows] == [[]] * len(rows) == [[]] * 16 * len(TINY["ranks"])
    for row in rows:
        assert row["fwd_ms"] > 0 and row["both_ms"] > 0, row
    world_size = TINY["ranks"][-1]
    topk = [r for r in rows if r["op"] == OP and r["shape"].startswith(f"P={world_size} N=")]
    sharded = next(r for r in topk if r["variant"] == "cpu sharded")
    candidates = world_size * K * 12 * TINY["queries"]
    assert f"all_gather {candidates + 29 * 8 * world_size:,}" in sharded["notes"], sharded["notes"]
    assert f"all_reduce {TINY['queries'] * DIM * 4:,}" in sharded["notes"], sharded["notes"]
    naive = next(r for r in topk if r["variant"].startswith("naive"))
    assert f"forward {TINY['slots'] * 2 * DIM * 4:,} " in naive["notes"], naive["notes"]
    # Sharded queries (each rank T / P of its own, the group's P·(T / P) = T): the forward all-gathers
    # every rank's queries and the candidates of all of them from every rank, and reduce-scatters the
    # partial outputs; its backward all-gathers the cotangents (dout, dweights and the shift) and
    # reduce-scatters dq. Bytes per query of the group: Dk·4 + P·k·12 + Dv·4 and the metadata's share.
    group = TINY["queries"]
    shape = f"P={world_size} queries=sharded N={TINY['slots']} T={group // world_size} "
    topk = {r["variant"].split()[0]: r for r in rows if r["op"] == OP and r["shape"].startswith(shape)}
    assert len(topk) == 2, topk
    notes = topk["cpu"]["notes"]
    gathered = 29 * 8 * world_size + group * DIM * 4 + world_size * group * K * 12
    forward = gathered + group * DIM * 4
    assert notes.startswith("each rank its own queries"), notes
    assert (f"forward {forward:,} (all_gather {gathered:,}, reduce_scatter {group * DIM * 4:,}), "
            f"{forward / group:,.0f} per query of the group") in notes, notes
    assert f"backward {group * (DIM + K + 1) * 4 + group * DIM * 4:,} " in notes, notes
    notes, whole_memory = topk["naive:"]["notes"], TINY["slots"] * 2 * DIM * 4
    assert f"forward {whole_memory:,} " in notes and f"backward {whole_memory:,} " in notes, notes
    pk = [r for r in rows if r["op"] == PK_OP and r["shape"].startswith(f"P={world_size} queries=sharded ")]
    assert len(pk) == 4 and all("each rank its own queries" in r["notes"] for r in pk), pk
    # With sharded queries the columns travel by all-to-all: this rank's columns of every rank's
    # queries out (T / P of each, Dv / P wide), every rank's columns of its own back, each way.
    columns = next(r for r in pk if "shard=columns" in r["shape"] and r["variant"] == "cpu sharded")
    exchanged = world_size * (group // world_size) * (DIM // world_size) * 4
    assert f"all_to_all_single {exchanged:,}" in columns["notes"].split("; backward")[0], columns["notes"]
    assert f"all_to_all_single {exchanged:,}" in columns["notes"].split("; backward")[1], columns["notes"]
    # Product-key read: the sharded forward sends T x Dv x 4 (an all-reduce by rows, an all-gather
    # of the columns, with the metadata), its backward the k numbers dout . v_j per query; the naive
    # read gathers the whole (n_sub ** 2, Dv) values and sends as much back in its backward.
    values_bytes, out_bytes = TINY["n_sub"] ** 2 * DIM * 4, TINY["queries"] * DIM * 4
    for shard in PK_SHARDS:
        pk = [r for r in rows if r["op"] == PK_OP and r["shape"].startswith(f"P={world_size} shard={shard} ")]
        sharded, naive = (next(r for r in pk if r["variant"].startswith(v)) for v in ("cpu sharded", "naive"))
        if shard == "rows":
            assert f"all_reduce {out_bytes:,}" in sharded["notes"], sharded["notes"]
        else:
            forward = sharded["notes"].split("; backward")[0]
            assert "all_gather " in forward and "all_reduce" not in forward, sharded["notes"]
        assert f"backward {TINY['queries'] * TINY['pk_k'] * 4:,} " in sharded["notes"], sharded["notes"]
        assert f"forward {values_bytes:,} " in naive["notes"], naive["notes"]
        assert f"backward {values_bytes:,} " in naive["notes"], naive["notes"]
    # Gated write: replicated writes send only the metadata in the forward (the error flag, the
    # shard size and the fields, int64, from every rank), their backward one all-reduce of the
    # packed (weights, add, erase) gradients; sharded writes all-gather those and the int64 slot ids
    # too, and reduce-scatter their gradients back. The naive write gathers the whole memory
    # (P batch rows of it with sharded writes), and every rank's writes.
    steps = TINY["writes"]
    metadata = (2 + sum(field.width for field in WRITE_FIELDS)) * 8 * world_size
    packed, ids = steps * (KW + 2 * DIM) * 4, steps * KW * 8
    memory_bytes = TINY["slots"] * DIM * 4
    write = {(r["shape"].split()[1], r["variant"].split()[0]): r for r in rows
             if r["op"] == WRITE_OP and r["shape"].startswith(f"P={world_size} ")}
    assert len(write) == 4 and all("per write step" in r["notes"] for r in write.values()), write
    notes = write["queries=replicated", "cpu"]["notes"]
    assert f"forward {metadata:,} (all_gather {metadata:,})" in notes, notes
    assert f"backward {packed:,} (all_reduce {packed:,})" in notes, notes
    notes = write["queries=sharded", "cpu"]["notes"]
    sent = metadata + world_size * (packed + ids)
    assert f"forward {sent:,} (all_gather {sent:,})" in notes, notes
    assert f"backward {world_size * packed:,} (reduce_scatter {world_size * packed:,})" in notes, notes
    notes = write["queries=replicated", "naive:"]["notes"]
    assert f"forward {memory_bytes:,} " in notes and f"backward {memory_bytes + packed:,} " in notes, notes
    notes = write["queries=sharded", "naive:"]["notes"]
    assert f"forward {world_size * (memory_bytes + packed + ids):,} " in notes, notes
    parser = build_parser()
    assert set(NOT_IN_QUICK) & set(bench_names("", parser, quick=True)) == set()
    assert "distributed" in bench_names("", parser) and bench_names("distributed", parser, quick=True) == ["distributed"]
