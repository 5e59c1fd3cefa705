"""The registry of GPU kernel designs (l2m_kernels._gpu_status): no default design that never ran on
a GPU, every Triton and CUDA kernel registered, and ``python -m l2m_kernels.info`` listing the
designs that have not run on a GPU and those changed since their GPU run."""
from __future__ import annotations

import dataclasses
import importlib
import pathlib

import pytest

from l2m_kernels import _gpu_status
from l2m_kernels.backends import BACKENDS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_default_design_is_unmeasured():
    """The rule: a default design has run on a GPU (a new design stays opt-in until a GPU run passed
    the tests with it and timed it, and the registry records that run). Each family has exactly one
    default, and every other design says how it is selected."""
    for family, backend in _gpu_status.families():
        default = _gpu_status.default_design(family, backend)
        assert default.gpu_run is not None, f"{backend} {family}: the default {default.name!r} never ran on a GPU"
        for design in _gpu_status.designs_of(family, backend):
            assert design.default or design.opt_in, f"{backend} {family} {design.name}: how is it selected?"


def test_rule_fails_for_an_unmeasured_default(monkeypatch):
    """The check above fails when a default never ran on a GPU (here: threshold-strided made the
    default of the Triton top-k selection)."""
    designs = tuple(dataclasses.replace(d, default=d.name == "threshold-strided")
                    if d.family == _gpu_status.TOPK_SELECTION else d for d in _gpu_status.DESIGNS)
    monkeypatch.setattr(_gpu_status, "DESIGNS", designs)
    with pytest.raises(AssertionError, match="threshold-strided"):
        test_no_default_design_is_unmeasured()


def _section(text, header):
    """The indented lines under ``header`` in the info report."""
    lines = text.split(header + "\n", 1)[1].splitlines()
    return [line.strip() for line in lines[:next((i for i, line in enumerate(lines) if not line.startswith("  ")),
                                                  len(lines))]]


def test_info_lists_the_unmeasured_designs(monkeypatch):
    """python -m l2m_kernels.info lists exactly the designs that never ran on a GPU, and those whose
    kernels changed since their GPU run, from the registry; defaults are marked with their run."""
    from l2m_kernels.info import report

    text = report()
    listed = _section(text, "kernel designs not yet run on a GPU:")
    unmeasured = _gpu_status.unmeasured()
    assert listed == ([f"{d.backend} {d.family}: {d.name} (opt-in: {d.opt_in})" if not d.default else
                       f"{d.backend} {d.family}: {d.name} (the default)" for d in unmeasured] or ["none"])
    for design in unmeasured:
        assert f"{design.name}  never ran on a GPU" in text
    changed = _section(text, "kernel designs changed since their GPU run (not yet run on a GPU in this form):")
    assert changed == ([f"{d.backend} {d.family}: {d.name} ({c})" for d in _gpu_status.changed_since_run()
                        for c in d.changed] or ["none"])
    for family, backend in _gpu_status.families():
        default = _gpu_status.default_design(family, backend)
        assert f"* {default.name}" in text and str(default.gpu_run) in text
    # The report follows the registry: an added unmeasured design appears in the list.
    extra = _gpu_status.Design("merge", "triton", "merge-vector", ("merge_attention",), ("merge_attention_fwd_kernel",),
                               None, default=False, opt_in="(test)")
    monkeypatch.setattr(_gpu_status, "DESIGNS", _gpu_status.DESIGNS + (extra,))
    assert "triton merge: merge-vector (opt-in: (test))" in _section(report(), "kernel designs not yet run on a GPU:")


def test_every_gpu_kernel_is_registered():
    """Every Triton kernel the compile check knows (COMPILE_CONFIGS) and every CUDA source belongs to
    a registered design, every registered kernel exists, and every op the triton and cuda backends
    serve has a family there."""
    pytest.importorskip("triton")
    from l2m_kernels._triton_check import TRITON_MODULES

    compiled = set()
    for module in TRITON_MODULES:
        compiled |= {config["kernel"].__name__ for config in importlib.import_module(module).COMPILE_CONFIGS}
    registered = {kernel for d in _gpu_status.DESIGNS if d.backend == "triton" for kernel in d.kernels}
    assert compiled - registered == set(), "Triton kernels without a design in l2m_kernels._gpu_status"
    assert registered - compiled == set(), "registered Triton kernels that the compile check does not know"

    sources = {path.name for path in (ROOT / "csrc" / "cuda").glob("*.cu")}
    cuda_kernels = [kernel for d in _gpu_status.DESIGNS if d.backend == "cuda" for kernel in d.kernels]
    assert sorted(cuda_kernels) == sorted(sources), "each csrc/cuda/*.cu in exactly one design"

    for backend in ("triton", "cuda"):
        covered = {op for d in _gpu_status.DESIGNS if d.backend == backend for op in d.ops}
        assert set(BACKENDS[backend].ops) <= covered, f"{backend} ops without a design"


def test_topk_selection_designs_are_the_triton_paths():
    """The Triton top-k selection designs are exactly the launcher's paths, each opt-in design
    selected by its own L2M_TOPK_TRITON_PATH value, and the launcher's default is the registry's."""
    pytest.importorskip("triton")
    from l2m_kernels.ops.topk_read import triton as topk_triton

    designs = _gpu_status.designs_of(_gpu_status.TOPK_SELECTION, "triton")
    assert sorted(d.name for d in designs) == sorted(topk_triton.PATHS)
    assert topk_triton.DEFAULT_PATH == _gpu_status.default_design(_gpu_status.TOPK_SELECTION, "triton").name
    for design in designs:
        if not design.default:
            assert design.opt_in == f"{topk_triton.PATH_ENV}={design.name}"
