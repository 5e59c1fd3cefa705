"""Property-based fuzzing (hypothesis) of every op on every backend against the float64 reference.

The strategies and the property live in :mod:`l2m_kernels.fuzz` (its docstring says what is drawn
and what is judged). Profile: ``L2M_FUZZ_PROFILE=ci`` (the default: a fixed seed per op and
backend, >= 2,000 cases) or ``long`` (fresh seeds, >= 50,000 cases). The cases that need no Triton
(reference and cpu, e.g. under a sanitizer build): ``-k "not triton"``.
"""
import os
import time

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels import _validation, fuzz

PROFILE = os.environ.get("L2M_FUZZ_PROFILE", "ci")
BACKENDS = ("reference", "cpu", "triton", "cuda")
TARGET = {"ci": 2000, "long": 50000}
STATS = fuzz.Stats()
PAIRS = [(op, backend) for op in fuzz.OPS for backend in BACKENDS]
_STARTED = {}


def _skip_reason(op, backend):
    return fuzz.backend_unavailable(op, backend)


@pytest.mark.parametrize("op,backend", PAIRS, ids=[f"{op}-{backend}" for op, backend in PAIRS])
def test_fuzz(op, backend):
    why = _skip_reason(op, backend)
    if why:
        pytest.skip(why)
    _STARTED.setdefault("t", time.perf_counter())
    fuzz.fuzz(op, backend, profile=PROFILE, stats=STATS)


def test_fuzz_case_count(capsys):
    """Every op/backend pair that can run here ran its profile's cases; the total meets the target.
    Prints the case counts per op, backend and outcome (also without -s)."""
    runnable = [(op, b) for op, b in PAIRS if not _skip_reason(op, b)]
    ran = {(op, b) for op, b, _ in STATS.counts}
    if not ran:
        pytest.skip("no fuzz case ran in this pytest run (test_fuzz deselected)")
    seconds = time.perf_counter() - _STARTED.get("t", time.perf_counter())
    with capsys.disabled():
        print(f"\nfuzz profile {PROFILE}: {STATS.total()} cases in {seconds:.0f} s\n{STATS.table()}")
    short = {p: STATS.total(*p) for p in ran if STATS.total(*p) < fuzz.PROFILES[PROFILE][p[1]]}
    assert not short, f"op/backend pairs that ran fewer cases than the profile asks: {short}"
    missing = sorted(set(runnable) - ran)
    if missing:
        pytest.skip(f"{len(missing)} of {len(runnable)} runnable op/backend pairs were not selected "
                    f"(e.g. {missing[0]}): the {TARGET[PROFILE]}-case target applies to the whole file")
    if all(not _skip_reason(op, b) for op in fuzz.OPS for b in ("reference", "cpu", "triton")):
        assert STATS.total() >= TARGET[PROFILE]


# One reproducer per known failure (bugs found by the fuzzer, fix pending elsewhere): strict, so the
# fix turns it into a failure until the entry is removed from l2m_kernels.fuzz.KNOWN_FAILURES.
@pytest.mark.parametrize("entry", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=k.description),
                                                id=k.name) for k in fuzz.KNOWN_FAILURES])
def test_known_failure_reproduces(entry):
    op, backend, params = entry.reproducer
    why = _skip_reason(op, backend)
    if why:
        pytest.skip(why)
    fuzz.run_case(op, backend, params, known=False)


@pytest.mark.parametrize("name,what,case", fuzz.REGRESSIONS, ids=[r[0] for r in fuzz.REGRESSIONS])
def test_fixed_reproducer(name, what, case):
    op, backend, params = case
    why = _skip_reason(op, backend)
    if why:
        pytest.skip(why)
    assert fuzz.run_case(op, backend, params, known=False) in fuzz.OUTCOMES, what


# The property must catch broken kernels and broken validation.

def _broken(monkeypatch, op, backend, change):
    """Make the public ``op`` on ``backend`` pass its result through ``change``."""
    original = getattr(l2m, op)

    def patched(*args, **kwargs):
        result = original(*args, **kwargs)
        return change(result) if kwargs.get("backend") == backend else result
    monkeypatch.setattr(l2m, op, patched)


def test_fuzz_catches_a_wrong_output(monkeypatch):
    _broken(monkeypatch, "topk_memory_read", "cpu", lambda r: r._replace(out=r.out + 1e-2))
    with pytest.raises(AssertionError, match="out"):
        fuzz.fuzz("topk_memory_read", "cpu", max_examples=60, shrink=False)


def test_fuzz_catches_lost_nans(monkeypatch):
    _broken(monkeypatch, "gated_merge", "cpu", lambda out: out.nan_to_num())
    with pytest.raises(AssertionError, match="out"):
        fuzz.fuzz("gated_merge", "cpu", max_examples=200, shrink=False)


def test_fuzz_catches_a_wrong_selection(monkeypatch):
    # The second-best slot instead of the best: values are compared at the fused selection, so only
    # the selection check can see it.
    def swap(r):
        if r.indices.shape[-1] < 2:
            return r
        order = torch.arange(r.indices.shape[-1]).roll(1)
        return r._replace(indices=r.indices[..., order].contiguous(), weights=r.weights[..., order].contiguous())
    _broken(monkeypatch, "topk_memory_read", "cpu", swap)
    with pytest.raises(AssertionError, match="indices"):
        fuzz.fuzz("topk_memory_read", "cpu", max_examples=100, shrink=False)


class _SkewedGradient(torch.autograd.Function):
    """Identity whose backward is 0.1% off."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.001


def test_fuzz_catches_a_wrong_gradient(monkeypatch):
    _broken(monkeypatch, "gated_dense_update", "cpu", _SkewedGradient.apply)
    with pytest.raises(AssertionError, match="dmemory|dupdate|dinput_gate|dforget_gate"):
        fuzz.fuzz("gated_dense_update", "cpu", max_examples=100, shrink=False)


def test_fuzz_catches_a_missing_check(monkeypatch):
    def unchecked_int(name, value, low, high, what=""):
        return value
    monkeypatch.setattr(_validation, "require_int", unchecked_int)
    params = {"dtype": "float32", "seed": 1, "layouts": {}, "specials": [], "mode": "normal", "grad": False,
              "mutation": "k-over", "B": 1, "Hm": 1, "H": 2, "T": 3, "N": 5, "Dk": 4, "Dv": 3, "shared": False,
              "deterministic": False, "k": 2, "valid_len": None, "scale": None}
    with pytest.raises(AssertionError, match="k"):
        fuzz.run_case("topk_memory_read", "cpu", params)


def test_fuzz_catches_a_modified_input(monkeypatch):
    original = l2m.gated_dense_update

    def patched(memory, update, input_gate, forget_gate, *, backend=None):
        out = original(memory, update, input_gate, forget_gate, backend=backend)
        with torch.no_grad():
            update.add_(1)   # an op that writes into one of its inputs
        return out
    monkeypatch.setattr(l2m, "gated_dense_update", patched)
    params = {"dtype": "float32", "seed": 3, "layouts": {}, "specials": [], "mode": "normal", "grad": False,
              "mutation": None, "full": (2, 3), "shapes": {"memory": (2, 3), "update": (2, 3),
                                                          "input_gate": (1, 3), "forget_gate": (2, 1)}}
    with pytest.raises(AssertionError, match="modified an input"):
        fuzz.run_case("gated_dense_update", "cpu", params)
