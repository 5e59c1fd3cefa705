"""The production Triton configurations compile for sm_80 and sm_90 without spilling (no GPU needed;
a configuration its module marks ``allow_spills`` may spill at most 64 bytes).

Runs ``python -m l2m_kernels._triton_check`` in a subprocess with TRITON_INTERPRET removed: the
kernels must be decorated outside the interpreter, which other tests in this session may enable.
Results of configurations whose kernel sources, configuration, arch and Triton version are unchanged
come from ``tests/triton_check_cache.json`` (see the cache in ``l2m_kernels._triton_check``); the
rest compile. Refresh the file after changing kernels with
``python -m l2m_kernels._triton_check --cache tests/triton_check_cache.json --update-cache``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
CACHE = Path(__file__).resolve().parent / "triton_check_cache.json"


def _check_env():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's default-change warning
    return env


def _run(args, env, timeout):
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _configured_kernels(module):
    """Kernel names in the module's COMPILE_CONFIGS, read in a clean subprocess."""
    code = ("from l2m_kernels._triton_check import load_configs\n"
            f"for config in load_configs({module!r}):\n"
            "    print(config['kernel'].__name__)\n")
    listing = _run(["-c", code], _check_env(), timeout=300)
    assert listing.returncode == 0, listing.stderr
    kernels = set(listing.stdout.split())
    assert kernels, "no COMPILE_CONFIGS found"
    return kernels


def _checked_modules():
    # Read without importing triton kernels here (this process may run under the interpreter).
    from l2m_kernels._triton_check import TRITON_MODULES
    return TRITON_MODULES


@pytest.mark.parametrize("module", _checked_modules())
def test_triton_kernels_compile_without_spills(module, tmp_path):
    # One subprocess per kernel module: each stays well inside its timeout on a 2-core machine,
    # and a failure names its module.
    report_path = tmp_path / "triton_check.json"
    result = _run(["-m", "l2m_kernels._triton_check", "--arch", *map(str, ARCHS), "--module", module,
                   "--json", str(report_path), "--cache", str(CACHE)], _check_env(), timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report

    results = json.loads(report_path.read_text())
    for entry in results:
        assert entry["ok"], entry
        assert entry["reg"] and entry["reg"] > 0, f"no register count: {entry}"
        if entry.get("allow_spills"):
            # Declared by a kernel module for a rarely-run variant (the top-k streaming fallback
            # of the threshold path): reported in the table, tolerated only when small.
            assert "merge" not in entry["module"], f"merge kernels may not spill: {entry}"
            assert entry["stack"] + entry["local"] <= 64, f"spills beyond the allowance: {entry}"
        else:
            assert entry["stack"] == 0 and entry["local"] == 0, f"spills: {entry}"
    compiled = {(entry["kernel"], entry["arch"]) for entry in results}
    missing = {(kernel, arch) for kernel in _configured_kernels(module) for arch in ARCHS} - compiled
    assert not missing, f"not compiled: {sorted(missing)}\n{report}"


def test_check_refuses_interpreter_mode():
    result = _run(["-m", "l2m_kernels._triton_check", "--arch", "80"],
                  dict(_check_env(), TRITON_INTERPRET="1"), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "TRITON_INTERPRET" in result.stderr
