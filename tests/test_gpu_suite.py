"""tools/gpu_suite.sh, the one-command GPU check, run here on the CPU (DEVICE=cpu, SKIP_BUILD=1)
at its smallest: every step runs (the CUDA build and self-test say why they are skipped) and the
rows it appends to the results file carry every step's outcome, the l2m-check results and the
l2m-bench rows, with the table regenerated from them. GPU minutes are scarce: a broken script must
fail here, not there.

The script runs (and the probe's) only start a command and read its output: they are declared as
background jobs (``tests/_background.py``) and run behind the other tests."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import _background
from l2m_kernels.bench import results as bench_results

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _declare_run(name, tests, **env):
    """Declare a run of the script (DEVICE=cpu) with ``env``; its results files and out-dir live in a
    fresh directory, returned."""
    base = pathlib.Path(_background.scratch_dir("gpu_suite"))
    full_env = dict(os.environ, DEVICE="cpu", SKIP_BUILD="1", RESULTS_FILE=str(base / "results.jsonl"),
                    RESULTS_MD=str(base / "RESULTS.md"), TEST_PATHS="tests/test_testing.py", PYTEST_ARGS="-q",
                    PYTHON=sys.executable, TRITON_INTERPRET="0")
    full_env.update(env)
    # The results file starts with a row: the script must append to it, not overwrite it.
    command = ["bash", "-c", 'printf "%s\\n" "$SEED_ROW" > "$RESULTS_FILE" && exec bash "$0" "$1"',
               str(SCRIPT), str(base / "out")]
    full_env["SEED_ROW"] = SEED_ROW
    _background.declare(name, command, env=full_env, cwd=ROOT, timeout=600,
                        tests=[f"{__name__}::{test}" for test in tests])
    return base


SEED_ROW = (ROOT / "benchmarks" / "results.jsonl").read_text().splitlines()[0]


def _result(name, base):
    """The run's process and the rows it appended, after checking that the table is theirs."""
    proc = _background.result(name)
    rows = bench_results.load(base / "results.jsonl")
    assert rows[0] == json.loads(SEED_ROW)  # appended, not overwritten
    if len(rows) > 1:
        assert (base / "RESULTS.md").read_text() == bench_results.render(rows)
    return proc, rows[1:]


def _step(rows, name):
    """The outcome the run recorded for its step ``name``."""
    return next(r["notes"] for r in rows if r["kind"] == "check" and r["op"] == name)


EVERY_STEP = _declare_run("every-step", ["test_gpu_suite_runs_every_step_and_appends_an_entry"],
                          CHECK_ARGS="--quick --ops gated_merge --backends cpu --dtypes float32",
                          BENCH_ARGS="--quick --only merge")
FAILED_STEPS = _declare_run("failed-steps", ["test_gpu_suite_reports_failed_steps"],
                            CHECK_ARGS="--ops no_such_op", BENCH_ARGS="--only no_such_benchmark",
                            TEST_PATHS="tests/test_testing.py::test_no_such_test")
ONLY_NAMED = _declare_run("only-named", ["test_gpu_suite_runs_only_the_steps_named"], STEPS="check",
                          CHECK_ARGS="--quick --ops gated_merge --backends cpu --dtypes float32")
UNKNOWN_STEP = _declare_run("unknown-step", ["test_gpu_suite_runs_only_the_steps_named"],
                            STEPS="check no_such_step")


def test_gpu_suite_runs_every_step_and_appends_an_entry():
    proc, rows = _result("every-step", EVERY_STEP)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(not bench_results.problems(r) for r in rows)
    assert {r["source"] for r in rows} == {next(iter(rows))["source"]} and "gpu_suite.sh" in rows[0]["source"]
    assert _step(rows, "CUDA self-test").startswith("skipped: needs CUDA")
    assert "passed" in _step(rows, "tests on cpu") and "(exit 0)" in _step(rows, "tests on cpu")
    assert _step(rows, "l2m-check") == "exit 0"
    assert _step(rows, "l2m-bench").endswith("exit 0")
    checked = [r for r in rows if r["op"] == "gated_merge" and r["kind"] == "check"]
    assert checked and all(r["variant"] == "cpu" and r["metrics"]["failed"] == 0 for r in checked)
    timed = {r["variant"]: r for r in rows if r["op"] == "gated_merge" and r["kind"] != "check"}
    assert timed["reference"]["kind"] == "reference eager" and timed["cpu"]["kind"] == "fused"
    assert timed["cpu"]["both_ms"] > 0 and timed["cpu"]["device"] and timed["cpu"]["torch"]
    table = (EVERY_STEP / "RESULTS.md").read_text()
    assert "**gated_merge**" in table and "| reference |" in table
    for name in ("check.json", "suite.json", "suite.md", "RESULTS_entry.md", "tests.log"):
        assert (EVERY_STEP / "out" / name).is_file(), name


def test_gpu_suite_reports_failed_steps():
    proc, rows = _result("failed-steps", FAILED_STEPS)
    assert proc.returncode != 0
    assert _step(rows, "l2m-check") != "exit 0"
    assert not _step(rows, "l2m-bench").endswith("exit 0")
    assert "(exit 0)" not in _step(rows, "tests on cpu")


def test_gpu_suite_runs_only_the_steps_named():
    proc, rows = _result("only-named", ONLY_NAMED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _step(rows, "tests on cpu") == "not run: not in STEPS"
    assert _step(rows, "l2m-check") == "exit 0"
    assert [r["metrics"]["failed"] for r in rows if r["op"] == "gated_merge"] == [0]
    assert _step(rows, "l2m-bench") == "not run: not in STEPS"
    assert not (ONLY_NAMED / "out" / "tests.log").exists()
    proc, _ = _result("unknown-step", UNKNOWN_STEP)
    assert proc.returncode == 2 and "unknown step 'no_such_step'" in proc.stdout


PROBE_RUNS = {"attn-case": ["attn-case", "base"], "topk-tiles": ["topk-tiles"]}
for _name, _args in PROBE_RUNS.items():
    # python -m tools.gpu_probe on CPU tensors under the interpreter (PROBE_DEVICE=cpu, tiny shapes).
    _background.declare(f"probe-{_name}", [sys.executable, "-m", "tools.gpu_probe", *_args], cwd=ROOT, timeout=600,
                        env=dict(os.environ, PROBE_DEVICE="cpu", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT)),
                        tests=[f"{__name__}::test_gpu_probe_runs_here"])


@pytest.mark.parametrize("args", list(PROBE_RUNS.values()), ids=list(PROBE_RUNS))
def test_gpu_probe_runs_here(args):
    proc = _background.result(f"probe-{args[0]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if args[0] == "attn-case":
        assert "finished memory_attention_fwd_kernel" in proc.stdout and "backward done; finite: True" in proc.stdout
    else:
        # One line per scan tile (2 on the CPU), then 4 variants at the current tile on random and
        # clustered keys.
        assert proc.stdout.count("indices equal: True") == 2 + 8 and "fastest scan tile" in proc.stdout
        assert "forward paths at scan tile" in proc.stdout and "indices equal: False" not in proc.stdout
