"""The production Triton configurations compile for sm_80 and sm_90 without spilling (no GPU needed;
a configuration its module marks ``allow_spills`` may spill at most 64 bytes).

Runs ``python -m tools.triton_check`` in a subprocess with TRITON_INTERPRET removed: the
kernels must be decorated outside the interpreter, which other tests in this session may enable.
Results of configurations whose kernel sources, configuration, arch and Triton version are unchanged
come from ``tests/triton_check_cache.json`` (see the cache in ``tools/triton_check.py``); the
rest compile. Refresh the file after changing kernels with
``python -m tools.triton_check --cache tests/triton_check_cache.json --update-cache``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _background

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


def _checked_modules():
    # Read without importing triton kernels here (this process may run under the interpreter).
    from tools.triton_check import TRITON_MODULES
    return TRITON_MODULES


# One run of the check over every module and one listing of the configured kernels, started behind
# the other tests (tests/_background.py): with the results cache they take seconds; a cold cache
# (another Triton release, changed kernels) compiles, which the time limit allows for.
_REPORT = Path(_background.scratch_dir("triton_check")) / "triton_check.json"
_TESTS = [f"{__name__}::test_triton_kernels_compile_without_spills"]
_background.declare("triton-check", [sys.executable, "-m", "tools.triton_check", "--arch", *map(str, ARCHS),
                                     "--module", *_checked_modules(), "--json", str(_REPORT), "--cache", str(CACHE)],
                    env=_check_env(), cwd=REPO_ROOT, timeout=1800, tests=_TESTS)
_background.declare("triton-configs", [sys.executable, "-c",
                                       "from tools.triton_check import TRITON_MODULES, load_configs\n"
                                       "for module in TRITON_MODULES:\n"
                                       "    for config in load_configs(module):\n"
                                       "        print(module, config['kernel'].__name__)\n"],
                    env=_check_env(), cwd=REPO_ROOT, timeout=300, tests=_TESTS)


def _configured_kernels(module):
    """Kernel names in the module's COMPILE_CONFIGS, read in a clean subprocess."""
    listing = _background.result("triton-configs")
    assert listing.returncode == 0, listing.stderr
    kernels = {kernel for line in listing.stdout.splitlines() for name, kernel in [line.split()] if name == module}
    assert kernels, f"no COMPILE_CONFIGS found in {module}"
    return kernels


@pytest.mark.parametrize("module", _checked_modules())
def test_triton_kernels_compile_without_spills(module):
    # One run for every module (above); a failure names its module.
    result = _background.result("triton-check")
    report = result.stdout + result.stderr
    # exit 1 when any module fails: each module's test judges its own entries below
    assert result.returncode in (0, 1) and _REPORT.exists(), report

    results = [entry for entry in json.loads(_REPORT.read_text()) if entry["module"] == module]
    assert results, f"no results for {module}\n{report}"
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
    result = _run(["-m", "tools.triton_check", "--arch", "80"],
                  dict(_check_env(), TRITON_INTERPRET="1"), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "TRITON_INTERPRET" in result.stderr


def test_cache_key_follows_the_configuration():
    """A cached result is used only for the same kernel, configuration, arch and Triton."""
    code = ("import copy\n"
            "from tools.triton_check import config_key, load_configs\n"
            "config = load_configs('l2m_kernels.ops.merge.triton')[0]\n"
            "key = config_key(config, 90)\n"
            "other = copy.copy(config); other['num_warps'] = config['num_warps'] * 2\n"
            "changed = dict(config, constexprs={k: v * 2 if isinstance(v, int) and not isinstance(v, bool) else v\n"
            "                                   for k, v in config['constexprs'].items()})\n"
            "print(key == config_key(config, 90), key != config_key(config, 80), key != config_key(other, 90),\n"
            "      key != config_key(changed, 90))\n")
    result = _run(["-c", code], _check_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 4, result.stdout
