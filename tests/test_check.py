"""``l2m-check``: runs, reports in its table and JSON, and cannot pass a wrong backend silently."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from l2m_kernels import backends
from l2m_kernels.check import main
from l2m_kernels.ops.memory_write import function as write_function
from l2m_kernels.ops.topk_read import function as topk_function
from l2m_kernels.ops.topk_read.reference import topk_read_gather, topk_read_select
from l2m_kernels.testing import TOLERANCE

_CPU_REASONS = backends.BACKENDS["cpu"].not_supported_reasons("merge_attention", torch.device("cpu"),
                                                              torch.float32)
pytestmark = pytest.mark.skipif(bool(_CPU_REASONS), reason="cpu: " + "; ".join(_CPU_REASONS))

BASE = ["--quick", "--device", "cpu", "--backends", "cpu", "--no-progress"]


def _run(tmp_path, *options):
    path = tmp_path / "check.json"
    status = main(BASE + list(options) + ["--json", str(path)])
    return status, json.loads(path.read_text())


def test_check_passes_and_writes_json(tmp_path, capsys):
    ops = ["merge_attention", "gated_dense_update", "topk_memory_read"]
    status, report = _run(tmp_path, "--ops", ",".join(ops))
    table = capsys.readouterr().out
    assert status == 0, table
    assert report["summary"]["ok"] and report["summary"]["failed"] == 0
    results = report["results"]
    dtypes = {"float32", "float16", "bfloat16", "float64"}  # everything the cpu backend serves
    for op in ops:
        rows = [r for r in results if r["op"] == op]
        assert {r["dtype"] for r in rows} == dtypes
        assert len(rows) == 3 * len(dtypes)  # --quick: 2 edge cases + 1 random shape per dtype
        for r in rows:
            assert r["backend"] == "cpu" and r["status"] == "PASS"
            assert r["tolerance"] >= TOLERANCE[getattr(torch, r["dtype"])]
            assert r["max_error"] <= r["tolerance"] and r["worst"] in r["errors"]
            assert all(r["errors"][name] <= r["limits"][name] for name in r["errors"])
    topk_names = set(next(r for r in results if r["op"] == "topk_memory_read")["errors"])
    assert topk_names == {"selection", "out", "weights", "lse", "dq", "dkeys", "dvalues"}
    merge_names = set(next(r for r in results if r["op"] == "merge_attention")["errors"])
    assert merge_names == {"out", "lse", "dout_a", "dlse_a", "dout_b", "dlse_b"}
    assert "merge_attention" in table and "PASS" in table and "FAIL" not in table


def test_perturbed_backend_fails(tmp_path, monkeypatch, capsys):
    fused = write_function.DENSE_FWD["cpu"]
    monkeypatch.setitem(write_function.DENSE_FWD, "cpu", lambda *args: fused(*args) + 1e-3)
    status, report = _run(tmp_path, "--ops", "gated_dense_update,merge_attention", "--dtypes", "float32")
    out = capsys.readouterr().out
    assert status == 1
    assert not report["summary"]["ok"]
    dense = [r for r in report["results"] if r["op"] == "gated_dense_update"]
    assert dense and all(r["status"] == "FAIL" and r["worst"] == "out" for r in dense)
    assert all(r["max_error"] > r["tolerance"] for r in dense)
    # The gradients come from the untouched backward and still match.
    assert all(r["errors"]["dmemory"] <= r["limits"]["dmemory"] for r in dense)
    assert all(r["status"] == "PASS" for r in report["results"] if r["op"] == "merge_attention")
    assert "FAIL" in out and "failures (3)" in out


def test_perturbed_gradient_fails(tmp_path, monkeypatch):
    fused = write_function.DENSE_BWD["cpu"]

    def wrong_backward(*args):
        dmemory, *rest = fused(*args)
        return (dmemory * 1.001, *rest)

    monkeypatch.setitem(write_function.DENSE_BWD, "cpu", wrong_backward)
    status, report = _run(tmp_path, "--ops", "gated_dense_update", "--dtypes", "float32")
    assert status == 1
    assert all(r["status"] == "FAIL" and r["worst"] == "dmemory" for r in report["results"])


def test_wrong_selection_fails(tmp_path, monkeypatch):
    """Slots that are not the top-k fail, even when out/weights/lse are right for those slots."""
    def wrong_forward(q, keys, values, k, scale, valid_len, deterministic):
        g = torch.Generator().manual_seed(0)
        noisy_q = q + torch.randn(q.shape, generator=g).to(q.dtype)
        indices = topk_read_select(noisy_q, keys, k, scale, valid_len)
        out, weights, lse = topk_read_gather(q, keys, values, indices, scale)
        return out.contiguous(), indices.contiguous(), weights.contiguous(), lse.contiguous()

    monkeypatch.setitem(topk_function.FWD, "cpu", wrong_forward)
    status, report = _run(tmp_path, "--ops", "topk_memory_read", "--dtypes", "float32,float64")
    assert status == 1
    failed = [r for r in report["results"] if r["status"] == "FAIL"]
    # testing.assert_valid_topk refuses the selection before any value is compared (evaluated at
    # the fused selection, the values themselves would agree).
    assert failed and all(r["message"].startswith(("FuzzFailure: indices: not a top-k",
                                                    "FuzzFailure: indices: wrong order")) for r in failed), failed


def test_crashing_backend_is_reported_and_the_check_goes_on(tmp_path, monkeypatch, capsys):
    def crash(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(write_function.DENSE_FWD, "cpu", crash)
    status, report = _run(tmp_path, "--ops", "gated_dense_update,merge_attention", "--dtypes", "float32")
    out = capsys.readouterr().out
    assert status == 1
    dense = [r for r in report["results"] if r["op"] == "gated_dense_update"]
    assert all(r["status"] == "FAIL" and "RuntimeError: kernel exploded" in r["message"] for r in dense)
    assert all(r["status"] == "PASS" for r in report["results"] if r["op"] == "merge_attention")
    assert "kernel exploded" in out


def test_unservable_backend_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest sets it for the test suite
    path = tmp_path / "check.json"
    status = main(["--quick", "--device", "cpu", "--backends", "cpu,triton", "--ops", "gated_merge",
                   "--dtypes", "float32", "--no-progress", "--json", str(path)])
    report = json.loads(path.read_text())
    assert status == 0
    skipped = [r for r in report["results"] if r["status"] == "SKIP"]
    assert [r["backend"] for r in skipped] == ["triton"]
    assert "TRITON_INTERPRET=1" in skipped[0]["message"]
    assert "SKIP" in capsys.readouterr().out
    # Nothing checkable at all is not a pass.
    assert main(["--device", "cpu", "--backends", "triton", "--ops", "gated_merge", "--no-progress"]) == 1


def test_check_runs_without_hypothesis():
    """hypothesis is a test dependency: l2m-check builds and judges cases without it."""
    code = textwrap.dedent('''
        import importlib.abc, importlib.machinery, sys

        class Missing(importlib.abc.Loader):
            def create_module(self, spec):
                return None

            def exec_module(self, module):
                raise ImportError("No module named 'hypothesis'")

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hypothesis":
                    return importlib.machinery.ModuleSpec(name, Missing())

        sys.meta_path.insert(0, Hide())
        from l2m_kernels import check, fuzz
        assert fuzz.st is None
        sys.exit(check.main(["--quick", "--device", "cpu", "--backends", "cpu", "--ops", "gated_merge",
                             "--dtypes", "float32", "--no-progress"]))
    ''')
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "3 passed, 0 failed" in completed.stdout
