"""Benchmark results as data (``l2m_kernels.bench.results``): every row of ``benchmarks/results.jsonl``
has the required fields, ``benchmarks/RESULTS.md`` is what the rows generate, and ``add`` appends a
run's rows and regenerates the table."""
import json

import pytest
import torch

from l2m_kernels import benchmark as bm
from l2m_kernels.bench import results


def test_results_file_rows_are_complete():
    rows = results.load()
    assert rows
    for number, row in enumerate(rows, 1):
        assert list(row) == list(results.FIELDS), number
        assert not results.problems(row), (number, row["op"], row["variant"], results.problems(row))


def test_results_markdown_is_generated_from_the_rows():
    # Regenerating gives the same text: python -m l2m_kernels.bench.results render after editing the rows.
    assert results.MARKDOWN_FILE.read_text() == results.render(results.load())
    assert results.main(["check"]) == 0


def _row(**fields):
    env = {"date": "2026-12-06", "device": "test cpu", "torch": "2.0", "triton": None, "cuda": None,
           "l2m_kernels": "0.1.0", "commit": "abc1234"}
    base = dict(run="a run", source="a command", op="merge_attention", shape="B=1", dtype="float32",
                variant="cpu", fwd_ms=1.0)
    return results.make_row(env, **dict(base, **fields))


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.pop("date"), "missing field 'date'"),
    (lambda r: r.update(extra=1), "unknown field 'extra'"),
    (lambda r: r.update(date="26-11-2026"), "date"),
    (lambda r: r.update(device=""), "device"),
    (lambda r: r.update(kind="fast"), "kind"),
    (lambda r: r.update(fwd_ms=-1.0), "fwd_ms"),
    (lambda r: r.update(peak_mb="12 MB"), "peak_mb"),
    (lambda r: r.update(both_spread_ms=[2.0, 1.0]), "both_spread_ms"),
    (lambda r: r.update(metrics=[]), "metrics"),
    (lambda r: r.update(fwd_ms=None, floor_multiple=None), "no measurement"),
])
def test_problems_names_what_is_wrong(change, problem):
    row = _row()
    assert results.problems(row) == []
    change(row)
    found = results.problems(row)
    assert any(problem in p for p in found), found


def test_a_row_without_times_needs_a_note_or_metrics():
    assert results.problems(_row(fwd_ms=None, notes="skipped: compile time")) == []
    assert results.problems(_row(fwd_ms=None, kind="check", metrics={"passed": 3})) == []


@pytest.mark.parametrize("variant, kind", [
    ("cpu", "fused"), ("triton sparse_grad", "fused"), ("cuda inplace (fwd)", "fused"), ("cpu+triton", "fused"),
    ("reference", "reference eager"), ("reference sparse_grad", "reference eager"),
    ("reference+compile", "reference compiled"), ("bare matmul (scores)", "peer"),
    ("flash SDPA (local keys, causal)", "peer"),
])
def test_variant_kind(variant, kind):
    assert results.variant_kind(variant) == kind


def test_floor_multiple_is_the_larger_floor():
    ceilings = {"copy_gbps": 40.0, "matmul_gflops_float32": 100.0, "matmul_gflops_bfloat16": 1000.0}
    assert results.floor_multiple(10.0, None, "float32", ceilings) == pytest.approx(4.0)
    # bfloat16 flops against the bfloat16 matmul; the floor is the larger of the two lower bounds.
    assert results.floor_multiple(None, 100.0, "bfloat16", ceilings) == pytest.approx(10.0)
    assert results.floor_multiple(20.0, 50.0, "float32", ceilings) == pytest.approx(2.0)
    assert results.floor_multiple(None, None, "float32", ceilings) is None


def test_bench_rows_carry_the_run_and_the_measurement():
    row = bm.Row("gated_merge", "B=1", "float32", "cpu", 1.5, 2.0, 3.0, 4.0, fwd_gbps=8.0, note="a note",
                 fwd_spread_ms=[1.0, 2.0], bwd_spread_ms=[1.5, 2.5], both_spread_ms=[2.5, 3.5])
    skipped = bm.Row("gated_merge", "B=1", "float32", "reference+compile", float("nan"), None, None, None,
                     note="skipped: test")
    env = results.environment(torch.device("cpu"))
    made = results.bench_rows([row, skipped], {"copy_gbps": 16.0}, env, run="r", source="s", conditions="c")
    assert [results.problems(r) for r in made] == [[], []]
    first = made[0]
    assert first["device"] == bm.device_name(torch.device("cpu")) and first["torch"] == torch.__version__
    assert first["date"] == env["date"] and first["l2m_kernels"]
    assert (first["run"], first["source"], first["conditions"], first["kind"]) == ("r", "s", "c", "fused")
    assert (first["fwd_ms"], first["both_spread_ms"], first["floor_multiple"]) == (1.5, [2.5, 3.5], 2.0)
    assert made[1]["fwd_ms"] is None and made[1]["kind"] == "reference compiled"
    json.dumps(made, allow_nan=False)  # NaN never reaches the file


def test_add_appends_a_run_and_regenerates_the_table(tmp_path):
    rows_path, markdown = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    first = _row()
    rows_path.write_text(json.dumps(first) + "\n")
    env = results.environment(torch.device("cpu"))
    suite_rows = results.bench_rows([bm.Row("merge_attention", "B=1", "float32", variant, t, t, 2 * t, 1.0)
                                     for variant, t in (("cpu", 1.0), ("reference", 4.0))],
                                    {}, env, run="l2m-bench, tiny", source="l2m-bench --tiny", conditions="quiet")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"meta": {}, "rows": suite_rows}))
    check = tmp_path / "check.json"
    check.write_text(json.dumps({"results": [
        {"op": "gated_merge", "backend": "cpu", "dtype": "float32", "status": "PASS", "max_error": 1e-7},
        {"op": "gated_merge", "backend": "cpu", "dtype": "float32", "status": "FAIL", "max_error": None,
         "message": "RuntimeError: boom"}]}))
    args = ["--results", str(rows_path), "--markdown", str(markdown)]
    step = "tests=3 passed (exit 0)"
    assert results.main(["add", str(suite), "--check-json", str(check), "--step", step] + args) == 0

    rows = results.load(rows_path)
    assert rows[0] == first and len(rows) == 1 + 2 + 1 + 1
    assert {(r["run"], r["source"], r["conditions"]) for r in rows[1:]} == {("l2m-bench, tiny", "l2m-bench --tiny",
                                                                             "quiet")}
    checked = rows[3]
    assert (checked["op"], checked["variant"], checked["kind"]) == ("gated_merge", "cpu", "check")
    assert checked["metrics"] == {"shapes": 2, "failed": 1, "skipped": 0, "max_rel_rms": 1e-7}
    assert "boom" in checked["notes"]
    assert (rows[4]["op"], rows[4]["notes"]) == ("tests", "3 passed (exit 0)")
    table = markdown.read_text()
    assert table == results.render(rows)
    assert "| B=1 | float32 | cpu | 1 | 1 | 2 |" in table and "4.00x" in table  # speedup over the eager reference
    assert results.main(["check"] + args) == 0

    markdown.write_text(table.replace("4.00x", "5.00x"))
    assert results.main(["check"] + args) == 1
    with pytest.raises(ValueError):  # a row with a problem is not appended, nor any of its run
        results.append([_row(), dict(_row(), kind="fast")], rows_path)
    assert len(results.load(rows_path)) == 5


def test_speedup_needs_the_same_run_op_shape_and_dtype():
    rows = [_row(variant="reference", fwd_ms=4.0), _row(fwd_ms=2.0), _row(fwd_ms=1.0, shape="B=2")]
    table = results.render(rows)
    assert "2.00x (fwd)" in table and table.count("x (fwd)") == 1


def test_compare_puts_two_runs_speedups_side_by_side():
    env = results.environment(torch.device("cpu"))

    def run(fused_ms):
        rows = [bm.Row("gated_merge", "B=1", "float32", variant, t, t, 2 * t, 1.0)
                for variant, t in (("cpu", fused_ms), ("reference", 4.0), ("reference+compile", 2.0))]
        return results.bench_rows(rows, {}, env, run="r", source="s")

    table, differing = results.compare_runs(run(1.0), run(1.1))
    assert "| gated_merge | B=1 | cpu | eager | 4.00x | 3.64x | 10% |" in table and differing == []
    assert "| gated_merge | B=1 | reference+compile | eager | 2.00x | 2.00x | 0% |" in table
    table, differing = results.compare_runs(run(1.0), run(1.5), tolerance=0.15)
    assert ("gated_merge", "B=1", "float32", "cpu", "reference") in differing and "**over**" in table
