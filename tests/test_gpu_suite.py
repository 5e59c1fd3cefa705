"""benchmarks/gpu_suite.sh, the one-command GPU check, run here on the CPU (DEVICE=cpu, SKIP_BUILD=1)
at its smallest: every step runs (the CUDA build and self-test say why they are skipped) and the
entry it appends to the results file carries the test summary, the l2m-check table and the
l2m-bench table. GPU minutes are scarce: a broken script must fail here, not there."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, **env):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    full_env = dict(os.environ, DEVICE="cpu", SKIP_BUILD="1", RESULTS_FILE=str(results),
                    TEST_PATHS="tests/test_testing.py", PYTEST_ARGS="-q", PYTHON=sys.executable,
                    TRITON_INTERPRET="0")
    full_env.update(env)
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    return proc, results.read_text()


def test_gpu_suite_runs_every_step_and_appends_an_entry(tmp_path):
    proc, results = _run(tmp_path, CHECK_ARGS="--quick --ops gated_merge --backends cpu --dtypes float32",
                         BENCH_ARGS="--quick --only merge")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results.startswith("# results\n")  # appended, not overwritten
    entry = results[len("# results\n"):]
    assert "benchmarks/gpu_suite.sh" in entry
    assert "CUDA self-test: skipped: needs CUDA" in entry
    assert "passed" in entry and "Tests on cpu" in entry
    assert "l2m-check on cpu (exit 0)" in entry
    assert "gated_merge  cpu" in entry and "PASS" in entry
    assert "l2m-bench on cpu" in entry and "(exit 0)" in entry
    assert "| gated_merge |" in entry and "| reference |" in entry
    for name in ("check.json", "suite.json", "suite.md", "RESULTS_entry.md", "tests.log"):
        assert (tmp_path / "out" / name).is_file(), name


def test_gpu_suite_reports_failed_steps(tmp_path):
    proc, results = _run(tmp_path, CHECK_ARGS="--ops no_such_op", BENCH_ARGS="--only no_such_benchmark",
                         TEST_PATHS="tests/test_testing.py::test_no_such_test")
    assert proc.returncode != 0
    entry = results[len("# results\n"):]
    assert "l2m-check on cpu (exit 0)" not in entry
    assert "(exit 0)" not in entry.split("l2m-bench on cpu", 1)[1].splitlines()[0]
    assert "Tests on cpu" in entry and "(exit 0)" not in entry.split("Tests on cpu", 1)[1].splitlines()[0]


def test_gpu_suite_runs_only_the_steps_named(tmp_path):
    proc, results = _run(tmp_path, STEPS="check", CHECK_ARGS="--quick --ops gated_merge --backends cpu --dtypes float32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entry = results[len("# results\n"):]
    assert "Tests on cpu: not run: not in STEPS" in entry
    assert "l2m-check on cpu (exit 0)" in entry and "PASS" in entry
    assert "not run: not in STEPS" in entry.split("l2m-bench on cpu", 1)[1].splitlines()[0]
    assert not (tmp_path / "out" / "tests.log").exists()
    proc, _ = _run(tmp_path, STEPS="check no_such_step")
    assert proc.returncode == 2 and "unknown step 'no_such_step'" in proc.stdout


PROBE = ROOT / "benchmarks" / "gpu_probe.py"


@pytest.mark.parametrize("args", [["attn-case", "base"], ["topk-tiles"]], ids=["attn-case", "topk-tiles"])
def test_gpu_probe_runs_here(args):
    # benchmarks/gpu_probe.py on CPU tensors under the interpreter (PROBE_DEVICE=cpu, tiny shapes).
    env = dict(os.environ, PROBE_DEVICE="cpu", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(PROBE), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if args[0] == "attn-case":
        assert "finished memory_attention_fwd_kernel" in proc.stdout and "backward done; finite: True" in proc.stdout
    else:
        # One line per scan tile (2 on the CPU), then 4 variants at the current tile on random and
        # clustered keys.
        assert proc.stdout.count("indices equal: True") == 2 + 8 and "fastest scan tile" in proc.stdout
        assert "forward paths at scan tile" in proc.stdout and "indices equal: False" not in proc.stdout
