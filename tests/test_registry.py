"""The op registry (l2m_kernels/ops/registry.py) is the one declaration of every op: each consumer
is checked to derive from it, so an op declared there is served, checked, fuzzed and benchmarked,
and an op missing there is none of these."""
from __future__ import annotations

import importlib
import inspect
import pathlib
import random
import re

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels import backends, check, fuzz
from l2m_kernels.bench import BENCHMARKS
from l2m_kernels.ops import registry

DECLS = list(registry.OPS.values())
IDS = [decl.name for decl in DECLS]


def test_op_order_is_the_declaration_order():
    assert backends.OPS == tuple(registry.OPS)
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_custom_op_is_registered_with_the_declared_schema(decl):
    schema = getattr(torch.ops.l2m, decl.name).default._schema
    assert str(schema) == decl.qualname + decl.schema
    assert [a.name for a in schema.arguments] == [a.name for a in decl.args]
    assert len(schema.returns) == len(decl.outputs)


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_public_function_takes_the_declared_arguments_in_order(decl):
    params = list(inspect.signature(getattr(l2m, decl.name)).parameters)
    declared = [a.name for a in decl.args]
    # The public function may add keyword-only switches of its own (gated_memory_write's inplace).
    assert [p for p in params if p in declared] == declared, (params, declared)
    assert decl.args[-1].name == "backend"


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_declared_reference_and_triton_module_exist(decl):
    reference = importlib.import_module(f"l2m_kernels.ops.{decl.package}.reference")
    assert callable(getattr(reference, decl.reference))
    if decl.triton_module is not None:
        module = importlib.import_module(decl.triton_module)
        assert module.COMPILE_CONFIGS if hasattr(module, "COMPILE_CONFIGS") else module.compile_configs()


@pytest.mark.parametrize("name", registry.BACKEND_NAMES)
def test_backends_serve_what_the_declarations_say(name):
    backend = backends.BACKENDS[name]
    assert backend.ops == registry.served_by(name)
    for op, decl in registry.OPS.items():
        serving = decl.backends.get(name)
        assert backend.size_limits.get(op, {}) == (dict(serving.size_limits) if serving else {})


def test_a_size_over_a_declared_limit_is_a_reason():
    limit = registry.OPS["product_key_read"].backends["cuda"].size_limits["Dk"]
    reasons = backends.BACKENDS["cuda"].not_supported_reasons(
        "product_key_read", torch.device("cuda"), torch.float32, {"Dk": limit + 1})
    assert any(f"Dk <= {limit}" in r for r in reasons), reasons


def test_declared_auto_order_is_dispatch_order():
    for op, decl in registry.OPS.items():
        for device_type, order in decl.auto_order.items():
            assert backends.AUTO_ORDER_BY_OP[(device_type, op)] == order
    assert len(backends.AUTO_ORDER_BY_OP) == sum(len(d.auto_order) for d in DECLS)


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_check_fuzz_and_bench_cover_the_op(decl):
    assert decl.name in fuzz.STRATEGIES and decl.name in fuzz.BUILDERS
    # l2m-check builds its cases with the fuzz builders: every declared case is a valid call.
    cases = decl.cases
    for params in cases.edge + cases.wide + (cases.random(random.Random(1)),):
        case = fuzz.declared_case(decl.name, "reference", params, torch.float32, seed=0)
        assert case.must_raise is None and not case.may_raise and case.check_grad, params
    assert decl.bench.module in BENCHMARKS
    bench = importlib.import_module(f"l2m_kernels.bench.{decl.bench.module}")
    assert decl.name in inspect.getsource(bench), f"{bench.__name__} does not time {decl.name}"


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_check_cases_come_from_the_declaration(decl):
    quick = check.build_cases(decl.name, seed=3, quick=True)
    assert quick[:2] == [dict(c) for c in decl.cases.edge[:2]]
    full = check.build_cases(decl.name, seed=3, quick=False)
    assert full[:len(decl.cases.edge)] == [dict(c) for c in decl.cases.edge]
    assert full == check.build_cases(decl.name, seed=3, quick=False)          # reproducible per seed
    rng = random.Random(0)
    labels = {decl.cases.label(decl.cases.random(rng)) for _ in range(20)}
    assert len(labels) > 1                                                       # the generator varies
    assert all(check.shape_label(decl.name, c) == decl.cases.label(c) for c in full)
    if "cpu" in decl.backends:                  # tests/test_cpu_isa.py checks every variant on them
        assert decl.cases.wide, f"{decl.name}: the cpu backend serves it, so it needs a wide case"
        assert all(decl.cases.label(c) for c in decl.cases.wide)


def test_unknown_argument_lookup_names_the_op():
    with pytest.raises(KeyError, match="topk_memory_read has no argument 'nope'"):
        registry.OPS["topk_memory_read"].arg("nope")


def test_every_declared_op_is_exported_and_every_design_names_declared_ops():
    from l2m_kernels import _gpu_status

    assert set(registry.OPS) <= set(l2m.__all__)
    for design in _gpu_status.DESIGNS:
        assert set(design.ops) <= set(registry.OPS), design
        assert design.backend in registry.BACKEND_NAMES
        for op in design.ops:
            assert design.backend in registry.OPS[op].backends, (design, op)


DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_docs_page_documents_every_declared_argument_and_output(decl):
    """docs/ops/<name>.md is the users' contract of the op: it must cover the declaration."""
    page = DOCS / "ops" / f"{decl.name}.md"
    if not page.is_file():
        pytest.skip(f"no docs/ in this installation ({page} missing): docs are checked from the source tree")
    text = page.read_text()
    assert text.startswith(f"# `{decl.name}`")
    # Every argument in the first cell of a table row; every output (where there are several) named
    # in the Outputs section.
    first_cells = re.findall(r"^\| ([^|]*) \|", text, flags=re.M)
    for arg in decl.args:
        assert any(f"`{arg.name}`" in cell for cell in first_cells), f"{page.name}: no row for {arg.name!r}"
    outputs = text.split("\n## Output", 1)[1].split("\n## ", 1)[0]
    for output in decl.outputs if len(decl.outputs) > 1 else ():
        assert f"`{output.name}`" in outputs, f"{page.name}: its outputs do not name {output.name!r}"
    for backend in decl.backends:
        assert backend in text, f"{page.name} does not say whether {backend} serves it"
    assert f"ops/{decl.name}.md" in (DOCS / "README.md").read_text()


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_declared_entries_are_registered(decl):
    """The compiled function each backend's declaration names (to refuse an extension built from
    older sources) is one the bindings register: an L2M_DEF line of csrc/common/binding.h (the cuda
    extension is not built here), and a function of the built cpu extension."""
    from l2m_kernels import _ext

    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    registered = set(re.findall(r"L2M_DEF\((\w+),", (csrc / "common" / "binding.h").read_text()))
    # The cpu extension's own functions (the memory store's kernels) are registered in its bindings.cpp.
    cpu_only = set(re.findall(r'm\.def\("(\w+)"', (csrc / "cpu" / "bindings.cpp").read_text()))
    for name in ("cpu", "cuda"):
        if name not in decl.backends:  # an op that backend does not serve
            continue
        entry = decl.backends[name].entry
        assert entry in registered | (cpu_only if name == "cpu" else set()), (name, entry)
    cpu = _ext.cpu_extension()
    if cpu is not None:
        assert hasattr(cpu, decl.backends["cpu"].entry)
