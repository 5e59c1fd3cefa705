"""tools/gpu_suite.sh, the one-command GPU check, run here on the CPU (DEVICE=cpu, SKIP_BUILD=1)
at its smallest: every step runs (the CUDA build and self-test say why they are skipped) and the
entry it appends to the results file carries the test summary, the l2m-check table and the
l2m-bench table. GPU minutes are scarce: a broken script must fail here, not there.

The script runs (and the probe's) only start a command and read its output: they are declared as
background jobs (``tests/_background.py``) and run behind the other tests."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import _background

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _declare_run(name, tests, **env):
    """Declare a run of the script (DEVICE=cpu) with ``env``; its RESULTS file and out-dir live in a
    fresh directory, returned."""
    base = pathlib.Path(_background.scratch_dir("gpu_suite"))
    results = base / "RESULTS.md"
    full_env = dict(os.environ, DEVICE="cpu", SKIP_BUILD="1", RESULTS_FILE=str(results),
                    TEST_PATHS="tests/test_testing.py", PYTEST_ARGS="-q", PYTHON=sys.executable,
                    TRITON_INTERPRET="0")
    full_env.update(env)
    # The RESULTS file starts as "# results\n": the script must append to it, not overwrite it.
    command = ["bash", "-c", 'printf "# results\\n" > "$RESULTS_FILE" && exec bash "$0" "$1"',
               str(SCRIPT), str(base / "out")]
    _background.declare(name, command, env=full_env, cwd=ROOT, timeout=600,
                        tests=[f"{__name__}::{test}" for test in tests])
    return base


def _result(name, base):
    proc = _background.result(name)
    return proc, (base / "RESULTS.md").read_text()


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
    proc, results = _result("every-step", EVERY_STEP)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results.startswith("# results\n")  # appended, not overwritten
    entry = results[len("# results\n"):]
    assert "tools/gpu_suite.sh" in entry
    assert "CUDA self-test: skipped: needs CUDA" in entry
    assert "passed" in entry and "Tests on cpu" in entry
    assert "l2m-check on cpu (exit 0)" in entry
    assert "gated_merge  cpu" in entry and "PASS" in entry
    assert "l2m-bench on cpu" in entry and "(exit 0)" in entry
    assert "| gated_merge |" in entry and "| reference |" in entry
    for name in ("check.json", "suite.json", "suite.md", "RESULTS_entry.md", "tests.log"):
        assert (EVERY_STEP / "out" / name).is_file(), name


def test_gpu_suite_reports_failed_steps():
    proc, results = _result("failed-steps", FAILED_STEPS)
    assert proc.returncode != 0
    entry = results[len("# results\n"):]
    assert "l2m-check on cpu (exit 0)" not in entry
    assert "(exit 0)" not in entry.split("l2m-bench on cpu", 1)[1].splitlines()[0]
    assert "Tests on cpu" in entry and "(exit 0)" not in entry.split("Tests on cpu", 1)[1].splitlines()[0]


def test_gpu_suite_runs_only_the_steps_named():
    proc, results = _result("only-named", ONLY_NAMED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entry = results[len("# results\n"):]
    assert "Tests on cpu: not run: not in STEPS" in entry
    assert "l2m-check on cpu (exit 0)" in entry and "PASS" in entry
    assert "not run: not in STEPS" in entry.split("l2m-bench on cpu", 1)[1].splitlines()[0]
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
