"""Instruction-set variants of the CPU kernels (``default``, ``avx2``, ``avx512``; csrc/cpu/isa.h).

Each variant this CPU runs is switched in (``l2m_kernels._C._set_isa``) and every op's cpu backend
is compared, outputs and every gradient, with the float64 reference at the ``l2m-check --quick``
shapes (two edge cases, one random) plus a wider shape that fills several SIMD vectors and tails,
judged by ``l2m-check``'s rules (relative RMS error against ``l2m_kernels.testing.TOLERANCE``;
top-k selections compared by score). A variant that was not built here or that this CPU cannot
run is skipped with the reason. Subprocesses check the import-time choice: ``L2M_CPU_ISA`` forces
a variant over the automatic choice, which follows torch's CPU capability (``ATEN_CPU_CAPABILITY``),
and a name that cannot be honoured leaves the cpu backend unavailable with a clear reason.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from l2m_kernels import _ext, info
from l2m_kernels.backends import OPS
from l2m_kernels.check import build_cases, run_case
from l2m_kernels.ops import registry

VARIANTS = ("default", "avx2", "avx512")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU = torch.device("cpu")

cpu_ext = _ext.cpu_extension()
if cpu_ext is None:
    pytest.skip(f"cpu extension unavailable: {_ext.cpu_extension_error()}", allow_module_level=True)
if not hasattr(cpu_ext, "isa_info"):
    pytest.skip("the cpu extension predates the instruction-set variants: rebuild it "
                f"({_ext.REBUILD_COMMAND})", allow_module_level=True)

# Each op is checked at l2m-check's quick cases and at its declared wide cases (registry
# Cases.wide): several 16-lane vectors of queries and rows, dims with tails past a 64-byte vector,
# a local-attention window over several key blocks.


def variant_params():
    info_now = cpu_ext.isa_info()
    params = []
    for name in VARIANTS:
        if name not in cpu_ext.BUILD_INFO["cpu_isas"]:
            reason = (f"the {name} variant was not built here (built: "
                      f"{', '.join(cpu_ext.BUILD_INFO['cpu_isas'])})")
        elif name in info_now["unusable"]:
            reason = f"this CPU cannot run the {name} variant: {info_now['unusable'][name]}"
        else:
            reason = None
        params.append(pytest.param(name, id=name,
                                   marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


@pytest.fixture
def variant(request):
    previous = cpu_ext.isa()
    assert cpu_ext._set_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        cpu_ext._set_isa(previous)


@pytest.mark.parametrize("variant", variant_params(), indirect=True)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variant_matches_reference(variant, op, dtype):
    cases = build_cases(op, seed=0, quick=True) + list(registry.OPS[op].cases.wide)
    failures = []
    for index, params in enumerate(cases):
        result = run_case(op, "cpu", dtype, CPU, params, seed=0, case_index=index)
        assert cpu_ext.isa() == variant
        if result.status != "PASS":
            failures.append(f"{result.shape}: worst {result.worst} {result.max_error} > "
                            f"{result.tolerance} {result.message}")
    assert not failures, f"{variant} variant, {op}, {dtype}:\n" + "\n".join(failures)


def test_info_reports_variants():
    text = info.report()
    built = cpu_ext.BUILD_INFO["cpu_isas"]
    assert built[0] == "default" and set(built) <= set(VARIANTS)
    assert "variants built:" in text and all(name in text for name in built)
    assert f"in use:                {cpu_ext.isa()} (" in text


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown or unbuilt CPU kernel variant 'sse9'"):
        cpu_ext._set_isa("sse9")


def _in_subprocess(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("L2M_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                          text=True, timeout=300)


def test_environment_forces_a_variant_over_torch_capability():
    # One interpreter: L2M_CPU_ISA wins over the automatic choice, which follows torch's capability
    # (lowered here by ATEN_CPU_CAPABILITY).
    usable = [n for n in cpu_ext.BUILD_INFO["cpu_isas"] if n not in cpu_ext.isa_info()["unusable"]]
    forced = "avx2" if "avx2" in usable else "default"
    code = ("import torch, l2m_kernels._C as C; info = C.isa_info(); print(C.isa(), "
            "info['requested'], info['auto'], torch.backends.cpu.get_cpu_capability())")
    run = _in_subprocess(code, L2M_CPU_ISA=forced.upper(), ATEN_CPU_CAPABILITY="default")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [forced, forced.upper(), "default", "DEFAULT"]


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "default"])
def test_variant_this_cpu_cannot_run_is_refused(name):
    unusable = cpu_ext.isa_info()["unusable"]
    if name not in unusable:
        pytest.skip(f"this CPU runs the {name} variant (or it was not built): nothing to refuse")
    message = f"the {name} variant of the CPU kernels cannot run here"
    with pytest.raises(RuntimeError, match=message):
        cpu_ext._set_isa(name)
    assert cpu_ext.isa() != name
    run = _in_subprocess("import l2m_kernels._C", L2M_CPU_ISA=name)
    assert run.returncode != 0 and f"L2M_CPU_ISA={name}: {message}" in run.stderr, run.stderr


def test_environment_with_unknown_name_leaves_a_clear_error():
    code = """
import warnings, torch, l2m_kernels as l2m
from l2m_kernels import _ext
print(_ext.cpu_extension_error())
a, b = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
la, lb = torch.randn(1, 1, 2), torch.randn(1, 1, 2)
try:
    l2m.merge_attention(a, la, b, lb, backend="cpu")
except Exception as exc:
    print(type(exc).__name__, exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    l2m.merge_attention(a, la, b, lb)   # falls back to the reference, with one warning
print("fallback warned:", any("L2M_CPU_ISA=avx9" in str(w.message) for w in caught))
"""
    run = _in_subprocess(code, L2M_CPU_ISA="avx9")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("extension l2m_kernels._C is not importable (ImportError: "
                               "L2M_CPU_ISA=avx9: unknown or unbuilt CPU kernel variant 'avx9'")
    assert lines[0].endswith("unset L2M_CPU_ISA or name a variant this CPU runs")
    assert "rebuild" not in lines[0]
    assert "L2M_CPU_ISA=avx9" in lines[1] and "Error" in lines[1].split()[0]
    assert lines[2] == "fallback warned: True"


def test_automatic_choice_is_the_best_usable_variant_within_torch_capability():
    usable = [n for n in cpu_ext.BUILD_INFO["cpu_isas"] if n not in cpu_ext.isa_info()["unusable"]]
    cap = {"DEFAULT": 0, "AVX2": 1}.get(torch.backends.cpu.get_cpu_capability(), 2)
    expected = [name for name in usable if VARIANTS.index(name) <= cap][-1]
    assert cpu_ext.isa_info()["auto"] == expected
    previous = cpu_ext.isa()
    try:
        assert cpu_ext._set_isa("auto") == expected
    finally:
        cpu_ext._set_isa(previous)
