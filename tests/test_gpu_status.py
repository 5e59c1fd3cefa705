"""The registry of GPU kernel designs (l2m_kernels._gpu_status): no default design that never ran on
a GPU, every Triton and CUDA kernel registered, no change to a kernel that ran on a GPU without its
entry saying what changed, and ``python -m l2m_kernels.info`` listing the designs that have not run
on a GPU and those changed since their GPU run."""
from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re
import subprocess

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
    hosts = _section(text, "host code (bindings, launchers) changed since the last GPU run:")
    assert hosts == ([f"{c.backend}: {c.commit}: {c.what}" for c in _gpu_status.HOST_CHANGES] or ["none"])
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
    from tools.triton_check import TRITON_MODULES

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


def test_kernels_that_ran_are_unchanged_or_say_what_changed():
    """Each design that ran on a GPU records the fingerprint of its kernels' code then; the code in
    this tree has that fingerprint (or one shown to compile to the same machine code), or the entry's
    ``changed`` says what changed since, so that ``python -m l2m_kernels.info`` lists it. A change to
    a measured kernel cannot go unlisted."""
    for d in _gpu_status.DESIGNS:
        name = f"{d.backend} {d.family} {d.name}"
        if d.gpu_run is None:
            assert not d.ran and not d.equivalent and not d.changed, f"{name}: never ran, so nothing ran or changed"
            continue
        assert re.fullmatch("[0-9a-f]{12}", d.ran), f"{name}: record the fingerprint of the code that ran"
        now = _gpu_status.fingerprint(d)
        assert now is not None, f"{name}: its kernel sources are missing from the checkout"
        if d.code_as_run():
            assert not d.changed, f"{name}: lists changes, but its code is the code that ran ({now})"
        else:
            assert d.changed, (f"{name}: its kernels differ from the code that ran on {d.gpu_run} (fingerprint "
                               f"{d.ran} -> {now}); say what changed in its `changed` (then it is listed as "
                               f"not yet run in this form), or record a new GPU run")


def test_a_kernel_change_is_caught(tmp_path):
    """The fingerprint follows the code, not its layout: a changed operation in a kernel (or in a
    jit function it calls, here one in the shared Triton library) changes it, a changed comment
    does not."""
    design = next(d for d in _gpu_status.DESIGNS if d.backend == "triton" and d.name == "stream")
    module = ROOT / "l2m_kernels" / "ops" / "topk_read" / "triton.py"
    library = ROOT / _gpu_status.TRITON_LIBRARY
    tree = _gpu_status.SourceTree(root=tmp_path)
    target, target_library = (tmp_path / path.relative_to(ROOT) for path in (module, library))
    target.parent.mkdir(parents=True)
    text, library_text = module.read_text(), library.read_text()
    target.write_text(text)
    target_library.write_text(library_text)
    base = _gpu_status.fingerprint(design, tree)
    assert base == _gpu_status.fingerprint(design)
    select = text.index("def topk_read_fwd_select_kernel(")
    body = text.index("\n", text.index(":\n", select) + 2) + 1  # the line after the signature
    target.write_text(text[:body] + "    # a comment\n" + text[body:])
    assert _gpu_status.fingerprint(design, tree) == base
    target.write_text(text)
    called = "encode_keys"  # a jit function of the library the select kernel calls
    assert f" {called}(" in text[select:text.index("\n@triton.jit", select + 1)]
    definition = library_text.index(f"def {called}(")
    ret = library_text.index("    return ", definition)
    target_library.write_text(library_text[:ret] + "    b_s = b_s + 0\n" + library_text[ret:])
    assert _gpu_status.fingerprint(design, tree) != base


def test_recorded_fingerprints_are_those_of_the_run_commit():
    """``ran`` is the fingerprint of the sources at the GPU run's commit (read from git history)."""
    commits = {d.gpu_run.commit for d in _gpu_status.DESIGNS if d.gpu_run is not None}
    for commit in sorted(commits):
        try:
            probe = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                                   capture_output=True)
        except FileNotFoundError:
            pytest.skip("git is not installed: cannot read the sources of the GPU run's commit")
        if probe.returncode != 0:
            pytest.skip(f"commit {commit} is not in this clone's history (a shallow clone?): cannot "
                        "recompute the recorded fingerprints")
    for d in _gpu_status.DESIGNS:
        if d.gpu_run is not None:
            assert _gpu_status.fingerprint(d, _gpu_status.SourceTree(d.gpu_run.commit)) == d.ran, (
                f"{d.backend} {d.family} {d.name}")
