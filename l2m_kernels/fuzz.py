"""Property-based fuzzing of every op on every backend against the float64 reference (hypothesis).

One *case* is one call of a public op (``l2m.topk_memory_read`` ...) on one backend. Hypothesis draws
its parameters as plain Python values (sizes, dtype, layouts, flags, the seed of the tensor data,
where NaN/inf go, an invalid argument to plant), so a case prints as a dict and
:func:`run_case` replays it. What is drawn:

- shapes with zero sizes (``B``, ``T``, ``H``...), odd and size-1 feature dims, grouped heads
  (``Hm | H``, ``Hkv | H``), shared 3-D memories, 3-D write memories;
- layouts as models produce them: transposed views (``x.view(B, T, H, D).transpose(1, 2)``), the
  last two dims swapped, strided slices whose padding holds NaN (float) or out-of-range ids (int),
  so a kernel that ignores strides reads poison, and stride-0 expands where broadcasting/sharing
  is allowed;
- dtypes float32/float16/bfloat16/float64 (a backend without float64 must refuse it with
  ``NotImplementedError``), ``k``/``topk``/``k_sub`` and ``N`` at their edges (1, N, 256),
  ``valid_len`` of 0, below ``k`` and equal to ``N``, repeated write slots and ``-1`` skips;
- data: normal, or small integers with a power-of-two scale (exact scores, so ties are exact and
  the slot ids must equal the reference's), with NaN/+inf/-inf sprinkled into some inputs;
- now and then one invalid argument (wrong rank, size, dtype, out-of-range ``k``, index,
  ``valid_len``, ``window``...).

The property: either the call returns, and its outputs (and, for a random subset, the gradients of a
random linear functional of them, with respect to the autograd leaves behind the views) equal the
reference evaluated in float64 on the same input values within :data:`l2m_kernels.testing.TOLERANCE`
of the input dtype (relative RMS error; NaN and inf must sit at the same positions), or it raises
the documented exception type with a message whose subject (the text before the first ``:``) names
the offending argument. Any other exception, an accepted invalid argument, a modified input, a
wrong shape/dtype or a mismatch fails the case. Tiny tensors make one rounding of a sum whose terms
cancel a large relative error, so the allowed error is the tolerance or twice the error of the same
computation in PyTorch at the input dtype, whichever is larger (STYLE.md's flash-attention rule;
:func:`compare` lists the baselines: the reference run at the input dtype, outputs a composition
stores in the input dtype, and FlashAttention-style backwards that read the stored output). Top-k selections are
judged as in ``l2m-check``: valid slot ids (in range, existing, never twice, -1 only at the tail),
the float64 scores of the selected slots equal those of the reference's selection (NaN ranks like
+inf), slots with infinite scores and all slots of exact (integer) data equal the reference's
exactly, and the values are compared with the reference read at the fused selection. Outputs are
NaN-poisoned (:func:`l2m_kernels.testing.poisoned_outputs`), so an unwritten element fails.

Runs: ``tests/test_fuzz.py`` (the CI profile, >= 2,000 cases); the long profile (>= 50,000) with
``L2M_FUZZ_PROFILE=long python3 -m pytest -q tests/test_fuzz.py`` or
``python3 -m l2m_kernels.fuzz --profile long`` (this module, no pytest needed; ``--help``).
"""
from __future__ import annotations

import argparse
import ast
import collections
import contextvars
import dataclasses
import functools
import math
import os
import re
import sys
import time
import warnings
import zlib
from typing import Callable

import torch

try:
    from hypothesis import HealthCheck, Phase, assume, given, note, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
except ImportError:  # drawing cases needs hypothesis (a test dependency); building and judging them
    st = None        # (l2m-check) does not

import l2m_kernels as l2m

from .backends import BACKENDS, OPS
from .ops import registry
from .ops.block_memory.reference import block_read_ref, block_scores_ref, gather_blocks, select_blocks
from .ops.memory_attention.reference import _local_attention_acc, _merge_acc, memory_attention_gather
from .ops.memory_write.reference import gated_dense_update_ref, gated_memory_write_ref
from .ops.merge.reference import gated_merge_ref, merge_attention_ref
from .ops.product_key.reference import product_key_gather, product_key_select
from .ops.quantized_read.reference import dequantize_values, quantized_read_gather, quantized_scores_ref
from .ops.topk_read.reference import _topk_read_gather_acc, full_scores, topk_read_gather, topk_read_select
from .ops.topk_read.validate import resolve_scale
from .testing import (TOLERANCE, assert_close, assert_valid_topk, lse_dtype, poisoned_outputs, product_key_scores,
                      rel_rms_error)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in DTYPES}
NAMED_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
MAX_K = 256

# Cases per (op, backend) and profile. The interpreter runs a Triton call in 0.1-1 s, so the
# triton share is small; reference and cpu calls at these sizes take about a millisecond.
PROFILES = {
    "ci": {"reference": 110, "cpu": 170, "triton": 14, "cuda": 170},
    "long": {"reference": 2600, "cpu": 4200, "triton": 400, "cuda": 4200},
}
# The argument names a refusal for an unsupported backend must mention.
BACKEND_NAMES = ("backend",)


class FuzzFailure(AssertionError):
    """A case broke the property; the message says how."""


# ------------------------------------------------------------------------------------------------
# Building tensors: a base tensor in a physical layout, and the view passed to the op.
# ------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "last_swapped", "sliced", "expanded")


def _swap_dims(rank: int, layout: str):
    if layout == "transposed" and rank >= 2:
        return (1, 2) if rank >= 3 else (0, 1)   # (B, H, T, D) stored as (B, T, H, D)
    if layout == "last_swapped" and rank >= 2:
        return (rank - 2, rank - 1)               # the feature dim is not the unit-stride one
    return None


def _physical_shape(shape, layout, bdims):
    p = list(shape)
    swap = _swap_dims(len(p), layout)
    if swap:
        p[swap[0]], p[swap[1]] = p[swap[1]], p[swap[0]]
    elif layout == "sliced" and p:
        p[-1] += 2                                # [..., 1:1+D] of a wider row
        if len(p) >= 2:
            p[0] *= 2                             # and every other entry of dim 0
    elif layout == "expanded":
        p = [1 if i in bdims else s for i, s in enumerate(p)]
    return tuple(p)


def _view(base, shape, layout):
    swap = _swap_dims(base.dim(), layout)
    if swap:
        return base.transpose(*swap)
    if layout == "sliced" and base.dim():
        v = base[..., 1:1 + shape[-1]]
        return v[::2] if base.dim() >= 2 else v
    if layout == "expanded":
        return base.expand(shape)
    return base


def _layout_for(shape, layout, bdims):
    """The layout actually used: expanded needs a dim that may be broadcast."""
    if layout == "expanded" and not bdims:
        return "contiguous"
    if not shape:
        return "contiguous"
    return layout


def _data(gen, shape, kind, mode, dtype):
    base = torch.float64 if dtype == torch.float64 else torch.float32
    shape = tuple(shape)
    if mode == "int":
        if kind == "unit":
            t = torch.randint(0, 3, shape, generator=gen).to(base) / 2       # 0, 0.5, 1
        else:
            t = torch.randint(-2, 3, shape, generator=gen).to(base)
    elif kind == "unit":
        t = torch.rand(shape, generator=gen, dtype=base)
        if t.numel():                                                        # the edges 0 and 1
            t = torch.where(torch.rand(shape, generator=gen) < 0.1, t.round(), t)
    elif kind == "lse":
        t = torch.randn(shape, generator=gen, dtype=base) * 3.0
    elif kind == "gate":
        t = torch.randn(shape, generator=gen, dtype=base) * 2.0
    else:
        t = torch.randn(shape, generator=gen, dtype=base)
    return t.to(dtype)


_SPECIAL_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _sprinkle(gen, core, kind, count):
    """Put ``count`` special values at random positions of ``core`` (in place, through the view)."""
    if core.numel() == 0:
        return
    flat = torch.randint(0, core.numel(), (count,), generator=gen)
    for pos in flat.tolist():
        index = []
        for size in reversed(core.shape):
            index.append(pos % size)
            pos //= size
        core[tuple(reversed(index))] = _SPECIAL_VALUES[kind]


@dataclasses.dataclass
class Built:
    """The tensors of one case: views passed to the op, and their bases (the autograd leaves)."""

    views: dict = dataclasses.field(default_factory=dict)
    bases: dict = dataclasses.field(default_factory=dict)
    layouts: dict = dataclasses.field(default_factory=dict)


def _float_tensor(built, gen, name, shape, dtype, params, device, *, kind="normal", bdims=()):
    layout = _layout_for(shape, params["layouts"].get(name, "contiguous"), bdims)
    physical = _physical_shape(shape, layout, bdims)
    mode = params.get("mode", "normal")
    if layout == "sliced":
        base = torch.full(physical, float("nan"), dtype=dtype)
        core = _view(base, shape, layout)
        core.copy_(_data(gen, shape, kind, mode, dtype))
    else:
        base = _data(gen, physical, kind, mode, dtype)
        core = base if layout == "expanded" else _view(base, shape, layout)
    for target, special, count in params.get("specials", ()):
        if target == name:
            _sprinkle(gen, core, special, count)
    base = base.to(device)
    built.bases[name], built.layouts[name] = base, layout
    built.views[name] = _view(base, shape, layout)
    return built.views[name]


def _int_tensor(built, name, values, params, device, pad_value):
    """An integer tensor with the given values, in a drawn layout (padding holds ``pad_value``)."""
    shape = tuple(values.shape)
    layout = _layout_for(shape, params["layouts"].get(name, "contiguous"), ())
    if layout == "expanded":
        layout = "contiguous"
    physical = _physical_shape(shape, layout, ())
    base = torch.full(physical, pad_value, dtype=values.dtype)
    if layout in ("transposed", "last_swapped"):
        base = _view(values, shape, layout).contiguous()     # stored transposed; the view is `values`
    else:
        _view(base, shape, layout).copy_(values)
    base = base.to(device)
    built.bases[name], built.layouts[name] = base, layout
    built.views[name] = _view(base, shape, layout)
    return built.views[name]


def _differentiable(built, names):
    """Make the bases of ``names`` autograd leaves and rebuild their views from them."""
    for name in names:
        base = built.bases[name]
        base.requires_grad_(True)
        shape = built.views[name].shape
        built.views[name] = _view(base, shape, built.layouts[name])


# ------------------------------------------------------------------------------------------------
# A case: how to call the op, what may or must be raised, and how to judge the result.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Expected:
    """An acceptable exception: its types and the argument names its subject may name."""

    types: tuple
    names: tuple
    why: str


@dataclasses.dataclass
class Case:
    op: str
    backend: str
    dtype: torch.dtype
    args: dict                      # name -> value, in the op's positional order first
    positional: tuple               # names passed positionally
    diff_inputs: tuple = ()         # names of differentiable tensor inputs (gradient check)
    must_raise: Expected | None = None
    may_raise: list = dataclasses.field(default_factory=list)
    check_grad: bool = False
    judge: Callable | None = None   # judge(case, result, gen) raises FuzzFailure / AssertionError
    built: Built | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def call(self):
        fn = getattr(l2m, self.op)
        pos = [self.args[n] for n in self.positional]
        kw = {n: v for n, v in self.args.items() if n not in self.positional}
        return fn(*pos, **kw)


def _f64(t):
    """A float64 CPU copy (never an alias: in-place writes must not reach it)."""
    return t.detach().to(device="cpu", dtype=torch.float64, copy=True)


class _Leaves(dict):
    """name -> a copy of an input in ``dtype`` on the CPU, in the input's own layout (a view of a
    copy of its base); ``bases`` holds those base copies, the autograd leaves of the reference."""

    bases: dict


def _leaves(case, names, dtype=torch.float64):
    """``dtype=None``: each input keeps its own dtype."""
    leaves = _Leaves()
    leaves.bases = {}
    for name in names:
        arg, built = case.args[name], case.built
        want = arg.dtype if dtype is None else dtype
        if built is not None and built.views.get(name) is arg:
            base = built.bases[name].detach().to(device="cpu", dtype=want, copy=True).requires_grad_(True)
            leaves[name] = _view(base, arg.shape, built.layouts[name])
        else:
            base = leaves[name] = arg.detach().to(device="cpu", dtype=want, copy=True).requires_grad_(True)
        leaves.bases[name] = base
    return leaves


def _expect_tensor(name, t, shape, dtype):
    if not isinstance(t, torch.Tensor):
        raise FuzzFailure(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise FuzzFailure(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise FuzzFailure(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _subject(message: str) -> str:
    return message.split(": ", 1)[0] if ": " in message else message


def names_argument(message: str, names) -> bool:
    """Whether the subject of ``message`` (before the first ': ') names one of ``names``."""
    subject = _subject(message)
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", subject) for n in names)


def _finite_inputs(case) -> bool:
    """No NaN/inf in the differentiable inputs (log-sum-exp inputs may be -inf: an empty side)."""
    for name in case.diff_inputs:
        t = case.args[name].detach()
        ok = ~torch.isnan(t) & ~torch.isposinf(t) if name.startswith("lse") else torch.isfinite(t)
        if t.numel() and not ok.all():
            return False
    return True


def _cotangents(gen, outputs):
    cots = []
    for o in outputs:
        base = torch.float64 if o.dtype == torch.float64 else torch.float32
        cots.append(torch.randn(tuple(o.shape), generator=gen, dtype=base).to(o.dtype).to(o.device))
    return cots


def _grads(outputs, inputs, cots):
    pairs = [(o, c) for o, c in zip(outputs, cots) if o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs],
                                    allow_unused=True))


def _round_trip(t, dtype):
    """``t`` stored in ``dtype`` and read back as float64 (differentiable; the gradient is rounded
    the same way on its way back)."""
    return t if dtype == torch.float64 else t.to(dtype).to(torch.float64)


def _limit(dtype, exact, *baselines):
    """The relative RMS error allowed against ``exact``: the dtype's tolerance, or twice the error of
    a baseline (the same computation in PyTorch at the input dtype: the flash-attention rule of
    STYLE.md), whichever is larger. The baselines matter where a tiny tensor holds a sum of terms
    that cancel: one rounding of a term is then a large relative error of the sum."""
    limit = TOLERANCE[dtype]
    for baseline in baselines:
        if baseline is not None:
            if baseline.layout != torch.strided:
                baseline = baseline.to_dense()
            err = rel_rms_error(baseline, exact)
            if math.isfinite(err):
                limit = max(limit, 2 * err)
    return limit


@dataclasses.dataclass
class Judged:
    """One output or gradient as :func:`run_judged` reports it: its error (relative RMS; absolute
    where the reference is zero up to rounding), the error allowed, and why it failed (None: it
    passed)."""

    error: float
    allowed: float
    failure: str | None = None


# While run_judged runs a case: every compared output and gradient, name -> Judged.
_JUDGED = contextvars.ContextVar("l2m_fuzz_judged", default=None)


def _check(name, actual, expected, dtype, tol, *, zero_absolute=True):
    """:func:`assert_close` at ``tol``; with ``zero_absolute``, a reference that is zero up to
    float64 rounding (RMS below 1e-12: the fuzz data are of order 1) is compared absolutely, since
    the relative error against rounding noise means nothing (terms that cancel exactly, e.g. a gate
    between equal values). Under :func:`run_judged`, the comparison is recorded and a mismatch does
    not raise."""
    e = expected.detach().to(torch.float64).cpu()
    judged = _JUDGED.get()
    if zero_absolute and e.numel() and bool(torch.isfinite(e).all()) and e.square().mean().sqrt() < 1e-12:
        a = _dense64(actual)
        if a.shape == e.shape and bool(torch.isfinite(a).all()):
            error = float((a - e).square().mean().sqrt())
            if error <= max(tol, 1e-12):
                if judged is not None:
                    judged[name] = Judged(error, max(tol, 1e-12))
                return
    try:
        assert_close(name, actual, expected, dtype, tol=tol)
    except AssertionError as exc:
        if judged is None:
            raise
        judged[name] = Judged(_error(actual, e), tol, str(exc))
        return
    if judged is not None:
        judged[name] = Judged(_error(actual, e), tol)


def _dense64(t):
    t = t.detach().to(torch.float64).cpu()
    return t.to_dense() if t.layout != torch.strided else t


def _error(actual, expected) -> float:
    """The relative RMS error of ``actual`` against float64 ``expected`` (NaN: shapes differ)."""
    try:
        return rel_rms_error(_dense64(actual), expected)
    except AssertionError:
        return math.nan


# Roundings a kernel may make computing one term in its accumulation dtype (float32; float64
# for float64 input), besides storing it once in the input dtype. A term is often itself a sum
# whose terms cancel (a query row's dq sums k products, and the softmax backward's
# sum_i w_i dw_i enters every one of them), so this is a budget, not a count: 8 was exceeded by
# 1.4% on a stride-0 query's gradient at k = 256 with integer data (fuzz.REGRESSIONS).
ROUNDINGS = 16


def _term_error(dtype) -> float:
    """The relative error budget of one term: one rounding to ``dtype`` and ``ROUNDINGS`` in the
    accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.finfo(dtype).eps / 2 + ROUNDINGS * torch.finfo(acc).eps / 2


def _stored_error(cot, exact, dtype):
    """Per row, the most ``Delta = <dout, out>`` can move when ``out`` is read back as a kernel
    stored it (as FlashAttention-style backwards read it): :func:`_term_error` times
    ``sum_d |dout_d * out_d|``."""
    return _term_error(dtype) * (cot * exact.detach()).abs().sum(-1)


def compare(case, names, fused, reference, gen, modelled=None, model_cotangents=None, output_terms=None,
            gradient_terms=None):
    """Judge the fused outputs ``fused`` (a tuple named ``names``) and, when ``case.check_grad``, the
    gradients of a random linear functional of them, against ``reference(leaves)`` evaluated on
    float64 copies of the inputs.

    Baselines for the allowed error (:func:`_limit`):

    - ``reference`` evaluated at the input dtype: the naive PyTorch computation (which the
      reference backend is: its numerics at a low precision are PyTorch's, what it is checked for
      is the rest);
    - ``modelled(leaves)`` when given, a computation with the roundings of intermediate results a
      composition of kernels makes (``reference`` when only ``model_cotangents`` is given), whose
      gradients take the cotangents ``model_cotangents(outputs, cotangents)`` when given (a
      backward that reads a stored output moves the log-sum-exp cotangents);
    - for each gradient, the sums it is made of: the terms are the float64 gradients with respect
      to the input as the op uses it (expanded to the shapes in ``case.extra["broadcast"]``, for
      inputs the op broadcasts, and through the input's view), each allowed :func:`_term_error`;
      where terms cancel (a gate between close values, a stride-0
      input read by rows that pull apart) that is far more than the tolerance of the sum.

    - for an output that is a sum (``output_terms``: name -> float64 ``sum |terms|`` per element,
      e.g. ``sum_j w_j |v_j|`` for a read's ``out``), those terms, each allowed :func:`_term_error`:
      a kernel that sums k entries in order in float32 may round differently from PyTorch's
      pairwise sum, by far more than the tolerance of a result whose terms cancel;
    - for a gradient that is a difference of sums (``gradient_terms(cotangents)``: input name ->
      float64 ``sum |terms|`` like its leaf, e.g. a gate's ``g (1 - g) sum |dout| (|out_mem| +
      |out_local|)``), those terms, each allowed :func:`_term_error`: the parts enter as a kernel
      computed them (an attention output whose probabilities were rounded to the input dtype
      before the product with the values, as FlashAttention does), and their difference can be far
      smaller than either.

    Gradients are taken with respect to the autograd leaves, the bases of the (transposed, sliced,
    expanded) inputs: a stride-0 input's own gradient depends on how the op reads it, its leaf's
    does not.
    """
    diff = list(case.diff_inputs)
    oracle_leaves = _leaves(case, diff)
    oracle = reference(oracle_leaves)
    naive_leaves = naive = None
    if case.dtype != torch.float64:
        naive_leaves = _leaves(case, diff, None)
        naive = reference(naive_leaves)
    model_leaves = model = None
    if modelled is not None or model_cotangents is not None:
        model_leaves = _leaves(case, diff)
        model = (modelled or reference)(model_leaves)
    for i, name in enumerate(names):
        baselines = [None if naive is None else naive[i],
                     None if model is None else _round_trip(model[i], case.dtype)]
        if output_terms and name in output_terms:
            baselines.append(oracle[i].detach() + _term_error(case.dtype) * output_terms[name])
        _check(name, fused[i], oracle[i], case.dtype, _limit(case.dtype, oracle[i], *baselines))
    if not case.check_grad:
        return
    cots = _cotangents(gen, fused)
    cots64 = [c.detach().to(torch.float64).cpu() for c in cots]
    leaves = [case.built.bases[n] for n in diff]
    grads = _grads(fused, leaves, cots)
    live = [i for i, o in enumerate(oracle) if o.requires_grad]

    def grads_of(outputs, leaves_, cotangents):
        return torch.autograd.grad([outputs[i] for i in live], [leaves_.bases[n] for n in diff],
                                   [cotangents[i] for i in live], allow_unused=True)

    oracle_grads = grads_of(oracle, oracle_leaves, cots64)
    naive_grads = [None] * len(diff) if naive is None else grads_of(
        naive, naive_leaves, [c.to(o.dtype) for c, o in zip(cots64, naive)])
    model_cots = cots64 if model_cotangents is None else model_cotangents(model, cots64)
    model_grads = [None] * len(diff) if model is None else grads_of(model, model_leaves, model_cots)
    spreads = _term_spreads(case, diff, reference, cots64, live)
    differences = {} if gradient_terms is None else gradient_terms(cots64)
    for name, g, rg, ng, mg, spread, x in zip(diff, grads, oracle_grads, naive_grads, model_grads, spreads,
                                              leaves):
        if g is not None and g.layout != torch.strided:
            g = g.to_dense()
        g = torch.zeros_like(x) if g is None else g
        rg = torch.zeros(x.shape, dtype=torch.float64) if rg is None else rg
        _expect_tensor("d" + name, g, x.shape, x.dtype)
        terms = differences.get(name)
        _check("d" + name, g, rg, case.dtype, _limit(case.dtype, rg, ng, mg, spread if spread is None else rg + spread,
                                                     None if terms is None else rg + _term_error(case.dtype) * terms))


def _term_spreads(case, diff, reference, cots64, live):
    """Per leaf, ``_term_error(dtype) * sum |terms|`` (see :func:`compare`), or None."""
    leaves = _leaves(case, diff)
    broadcast = case.extra.get("broadcast", {})
    used = _Leaves({n: (leaves[n].expand(broadcast[n]) if n in broadcast else leaves[n]) for n in diff})
    used.bases = leaves.bases
    outputs = reference(used)
    terms = torch.autograd.grad([outputs[i] for i in live], [used[n] for n in diff],
                                [cots64[i] for i in live], allow_unused=True, retain_graph=True)
    spreads = []
    for name, term in zip(diff, terms):
        if term is None:
            spreads.append(None)
            continue
        if term.layout != torch.strided:
            term = term.to_dense()
        magnitude = torch.autograd.grad(used[name], leaves.bases[name], term.abs(), retain_graph=True)[0]
        spreads.append(_term_error(case.dtype) * magnitude)
    return spreads


# -- selections ------------------------------------------------------------------------------------

def _rank(scores):
    """float64 scores as the selection ranks them: NaN like +inf."""
    return scores.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _picked(rank, slot_ids):
    picked = rank.gather(-1, slot_ids.clamp_min(0))
    return torch.where(slot_ids < 0, -math.inf, picked)


def _check_selection(name, slot_ids, best, rank, k, dtype, exact, *, valid_len=None, selectable=None,
                     competitors=None, ties=True):
    """Fused ``slot_ids`` against the reference's ``best`` over float64 ``rank`` scores (B, H, T, N).

    :func:`l2m_kernels.testing.assert_valid_topk` judges the selection (ids in [-1, N), existing
    below ``valid_len``, never twice, min(k, existing competitors) real entries, -1 only at the
    tail, a top-k in descending order up to the rounding of float32 scores, exact ties to the
    smaller slot); then the selected scores must equal the reference's, and where scores are
    exactly tied (exact data, or +inf/-inf scores) the very same slots.
    """
    try:
        assert_valid_topk(slot_ids, rank, valid_len=valid_len, selectable=selectable, competitors=competitors,
                          score_dtype=torch.float64 if dtype == torch.float64 else torch.float32, name=name,
                          ties=ties)
    except AssertionError as exc:
        raise FuzzFailure(str(exc)) from None
    picked, want = _picked(rank, slot_ids), _picked(rank, best)
    _check("selection", picked.sort(-1, descending=True).values, want.sort(-1, descending=True).values, dtype,
           TOLERANCE[dtype], zero_absolute=False)
    if exact:
        if not torch.equal(slot_ids, best):
            raise FuzzFailure(f"{name}: exact data (exact ties), expected the reference's slots "
                              f"{best.flatten().tolist()[:16]}, got {slot_ids.flatten().tolist()[:16]}")
    else:
        tied = torch.isinf(want) & (best >= 0)
        if not torch.equal(slot_ids[tied], best[tied]):
            raise FuzzFailure(f"{name}: slots with infinite scores (exact ties, smaller slot first) "
                              f"differ from the reference's")


def _check_read_selection(case, indices, q, keys, k, scale, valid_len):
    """The selection ``indices`` (B, H, T, k) of a top-k read of ``keys`` (.., N, Dk) by ``q``
    (B, H, T, Dk), judged by :func:`_check_selection` against the float64 scores and the reference's
    selection. Returns the indices on the CPU, and q and keys in float64."""
    slot_ids = indices.detach().cpu()
    q64, keys64 = _f64(q), _f64(keys)
    vl = None if valid_len is None else valid_len.detach().cpu()
    rank = _rank(full_scores(q64, keys64, scale))
    best = topk_read_select(q64, keys64, k, scale, vl)
    _check_selection("indices", slot_ids, best, rank, k, case.dtype, case.extra["exact"], valid_len=vl)
    return slot_ids, q64, keys64


# -- judges: one per op ---------------------------------------------------------------------------

def judge_topk(case, read, gen):
    q, keys, values = (case.args[n] for n in ("q", "keys", "values"))
    k, valid_len = case.args["k"], case.args.get("valid_len")
    B, H, T, Dk = q.shape
    scale = case.args.get("scale")
    scale = resolve_scale(scale, Dk)
    acc = lse_dtype(case.dtype)
    _expect_tensor("out", read.out, (B, H, T, values.shape[-1]), case.dtype)
    _expect_tensor("indices", read.indices, (B, H, T, k), torch.int64)
    _expect_tensor("weights", read.weights, (B, H, T, k), acc)
    _expect_tensor("lse", read.lse, (B, H, T), acc)
    slot_ids, q64, keys64 = _check_read_selection(case, read.indices, q, keys, k, scale, valid_len)
    terms = topk_read_gather(q64, keys64, _f64(values).abs(), slot_ids, scale)[0]   # sum_j w_j |v_j|
    compare(case, ("out", "weights", "lse"), (read.out, read.weights, read.lse),
            lambda x: topk_read_gather(x["q"], x["keys"], x["values"], slot_ids, scale), gen,
            model_cotangents=lambda outs, cots: _read_cotangents(outs, cots, case.dtype),
            output_terms={"out": terms})


def _read_cotangents(outs, cots, dtype):
    """A read's backward with ``Delta`` from the stored ``out``: as if ``dlse`` moved by -error."""
    dout, dweights, dlse = cots
    return dout, dweights, dlse - _stored_error(dout, outs[0], dtype)


def judge_product_key(case, read, gen):
    q, subkeys, values = (case.args[n] for n in ("q", "subkeys", "values"))
    k = case.args["k"]
    k_sub = case.args.get("k_sub") or k
    sum_heads = case.args.get("sum_heads", False)
    B, H, T, Dk = q.shape
    scale = case.args.get("scale")
    scale = resolve_scale(scale, Dk)
    acc = lse_dtype(case.dtype)
    _expect_tensor("out", read.out, (B, T, values.shape[-1]) if sum_heads else (B, H, T, values.shape[-1]),
                   case.dtype)
    _expect_tensor("indices", read.indices, (B, H, T, k), torch.int64)
    _expect_tensor("weights", read.weights, (B, H, T, k), acc)
    _expect_tensor("lse", read.lse, (B, H, T), acc)
    slot_ids = read.indices.detach().cpu()
    q64, sub64 = _f64(q), _f64(subkeys)
    # float64 scores of every slot (B, H, T, n_sub ** 2), the candidates the selection must beat
    # (both sub-keys among their half's k_sub best) and the slots it may pick (within rounding of it).
    slot_scores, selectable, candidates = product_key_scores(
        q, subkeys, k_sub, scale, torch.float64 if case.dtype == torch.float64 else torch.float32)
    best = product_key_select(q64, sub64, k, k_sub, scale)
    rank = _rank(slot_scores)
    # NaN candidates sort above +inf in the reference (torch.sort) and tie with it in a kernel that
    # ranks NaN like +inf; rows holding one are NaN either way, so exact slots are not required there.
    nan_rows = torch.isnan(slot_scores).any(-1, keepdim=True)
    exact = case.extra["exact"] and not bool(nan_rows.any())
    # Rows with a NaN candidate rank it above +inf in the reference and like +inf in a kernel: there
    # the selection only competes with itself, and the scores of its slots are compared below.
    selected = torch.zeros_like(candidates).scatter_(-1, slot_ids.clamp_min(0), slot_ids >= 0)
    candidates = torch.where(nan_rows, selected, candidates)
    selectable = torch.where(nan_rows, selected, selectable)
    # Candidates of equal score come in the order of their sub-keys' ranks, not by slot: the exact
    # tie rules of a top-k read do not apply (ties with the reference are checked below).
    _check_selection("indices", slot_ids, torch.where(nan_rows, slot_ids, best), rank, k, case.dtype, exact,
                     selectable=selectable, competitors=candidates, ties=False)
    if nan_rows.any():   # the count of NaN/inf-scored slots must still match the reference's
        assert_close("indices (scores of the selected slots, NaN rows)",
                     _picked(rank, slot_ids).sort(-1, descending=True).values,
                     _picked(rank, best).sort(-1, descending=True).values, case.dtype)
    # A row with a NaN candidate is NaN in the reference (whose selection puts NaN first): judged
    # at the reference's selection; the others at the fused one.
    read_at = torch.where(nan_rows, best, slot_ids)
    terms = product_key_gather(q64, sub64, _f64(values).abs(), read_at, scale, sum_heads=sum_heads)[0]
    compare(case, ("out", "weights", "lse"), (read.out, read.weights, read.lse),
            lambda x: product_key_gather(x["q"], x["subkeys"], x["values"], read_at, scale, sum_heads=sum_heads),
            gen, model_cotangents=None if sum_heads else lambda outs, cots: _read_cotangents(outs, cots, case.dtype),
            output_terms={"out": terms})


def judge_write(case, out, gen):
    memory = case.args["memory"]
    names = ("memory", "weights", "add", "erase")
    indices = case.args["indices"].detach().cpu()
    if case.args.get("inplace"):
        if out is not memory:
            raise FuzzFailure("inplace=True must return the memory tensor it updated")
        before = case.extra["memory_before"]
        _expect_tensor("memory", memory, before.shape, case.dtype)
        compare(case, ("memory (in place)",), (memory,),
                lambda x: (gated_memory_write_ref(before.to(x["add"].dtype), indices, x["weights"], x["add"],
                                                  x["erase"]),), gen)
        return
    _expect_tensor("out", out, memory.shape, case.dtype)
    if out.numel() and out.data_ptr() == memory.data_ptr():
        raise FuzzFailure("inplace=False returned the memory tensor itself")
    compare(case, ("out",), (out,),
            lambda x: (gated_memory_write_ref(x["memory"], indices, x["weights"], x["add"], x["erase"]),), gen)


def judge_dense(case, out, gen):
    names = ("memory", "update", "input_gate", "forget_gate")
    shape = torch.broadcast_shapes(*(case.args[n].shape for n in names))
    _expect_tensor("out", out, shape, case.dtype)
    compare(case, ("out",), (out,), lambda x: (gated_dense_update_ref(*(x[n] for n in names)),), gen)


def judge_merge(case, result, gen):
    out_a = case.args["out_a"]
    out, lse = result
    _expect_tensor("out", out, out_a.shape, case.dtype)
    _expect_tensor("lse", lse, out_a.shape[:3], lse_dtype(case.dtype))
    names = ("out_a", "lse_a", "out_b", "lse_b")
    compare(case, ("out", "lse"), (out, lse), lambda x: merge_attention_ref(*(x[n] for n in names)), gen,
            model_cotangents=lambda outs, cots: (cots[0], cots[1] - _stored_error(cots[0], outs[0], case.dtype)))


def judge_gated_merge(case, out, gen):
    _expect_tensor("out", out, case.args["out_local"].shape, case.dtype)
    names = ("out_local", "out_mem", "gate")
    compare(case, ("out",), (out,), lambda x: (gated_merge_ref(*(x[n] for n in names)),), gen)


def judge_attention(case, res, gen):
    q, k, v, mem_keys = (case.args[n] for n in ("q", "k", "v", "mem_keys"))
    topk, valid_len = case.args["topk"], case.args.get("valid_len")
    window, merge = case.args.get("window"), case.args.get("merge", "joint")
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    scale = case.args.get("scale")
    scale = resolve_scale(scale, D)
    acc = lse_dtype(case.dtype)
    _expect_tensor("out", res.out, (B, H, T, Dv), case.dtype)
    _expect_tensor("lse_local", res.lse_local, (B, H, T), acc)
    _expect_tensor("lse_mem", res.lse_mem, (B, H, T), acc)
    _expect_tensor("indices", res.indices, (B, H, T, topk), torch.int64)
    slot_ids = _check_read_selection(case, res.indices, q, mem_keys, topk, scale, valid_len)[0]

    def reference(x):
        return memory_attention_gather(x["q"], x["k"], x["v"], x["mem_keys"], x["mem_values"], slot_ids, window,
                                       merge, x.get("gate"), scale)

    parts = {}

    def rounded_parts(x):
        # The compositions (cpu, cuda) store the local and the memory part in the input dtype
        # before merging them.
        out_local, lse_local = _local_attention_acc(x["q"], x["k"], x["v"], window, scale)
        out_mem, _, lse_mem = _topk_read_gather_acc(x["q"], x["mem_keys"], x["mem_values"], slot_ids, scale)
        out = _merge_acc(_round_trip(out_local, case.dtype), lse_local, _round_trip(out_mem, case.dtype), lse_mem,
                         merge, x.get("gate"))
        parts.update(out=out, out_local=out_local, out_mem=out_mem, lse_local=lse_local, lse_mem=lse_mem,
                     gate=x.get("gate"))
        return out, lse_local, lse_mem

    def stored_outputs(outs, cots):
        # FlashAttention-style backwards take Delta from stored outputs: joint, <dout, out> for both
        # parts (weighted by their merge weights); gate, each part's own output.
        dout, dlse_local, dlse_mem = cots
        lse_local, lse_mem = parts["lse_local"].detach(), parts["lse_mem"].detach()
        if merge == "joint":
            error = _stored_error(dout, parts["out"], case.dtype)
            top = torch.maximum(lse_local, lse_mem)
            total = torch.where(torch.isneginf(top), top, top + torch.log(torch.exp(lse_local - top)
                                                                           + torch.exp(lse_mem - top)))
            a = torch.where(torch.isneginf(lse_local), 0.0, torch.exp(lse_local - total))
            b = torch.where(torch.isneginf(lse_mem), 0.0, torch.exp(lse_mem - total))
            return dout, dlse_local - a * error, dlse_mem - b * error
        g = torch.sigmoid(parts["gate"].detach()).expand(dout.shape[:-1] + (1,)).squeeze(-1)
        return (dout, dlse_local - (1 - g) * _stored_error(dout, parts["out_local"], case.dtype),
                dlse_mem - g * _stored_error(dout, parts["out_mem"], case.dtype))

    def gate_terms(cots):
        # dgate = g (1 - g) sum_d dout_d (out_mem_d - out_local_d), summed as the gate broadcasts.
        if merge != "gate":
            return {}
        leaves = _leaves(case, ("gate",))
        size = (cots[0].abs() * (parts["out_mem"].detach().abs() + parts["out_local"].detach().abs()))
        (terms,) = torch.autograd.grad((size * torch.sigmoid(leaves["gate"])).sum(), leaves.bases["gate"])
        return {"gate": terms}

    compare(case, ("out", "lse_local", "lse_mem"), (res.out, res.lse_local, res.lse_mem), reference, gen,
            modelled=rounded_parts, model_cotangents=stored_outputs, gradient_terms=gate_terms)


def judge_block_topk(case, res, gen):
    q, reprs, k = case.args["q"], case.args["reprs"], case.args["k"]
    B, Hk, NB = reprs.shape[:3]
    scale = resolve_scale(case.args.get("scale"), q.shape[-1])
    valid = case.args.get("repr_valid")
    _expect_tensor("indices", res.indices, (B, Hk, k), torch.int64)
    _expect_tensor("scores", res.scores, (B, Hk, NB), lse_dtype(case.dtype))
    want = block_scores_ref(_f64(q), _f64(reprs), None if valid is None else valid.cpu(), scale)
    scores, ids = res.scores.detach().cpu(), res.indices.detach().cpu()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isneginf(scores), torch.isneginf(want) & ~torch.isnan(want)) and not want.isnan().any():
        raise FuzzFailure("scores: the blocks scoring -inf (no valid representative) differ from the reference's")
    # A score is a sum over the query rows of each row's best dot product: those terms may cancel,
    # each rounded once or more by a kernel that sums them in another order. (Compared also when no
    # score is finite, e.g. an empty batch: the comparison is recorded.)
    q64, reprs64 = _f64(q), _f64(reprs)
    rows = q.shape[1] // Hk * q.shape[2]
    s = torch.einsum("bgmd,bgnrd->bgmnr", q64.reshape(B, Hk, rows, q.shape[-1]) * scale, reprs64)
    if valid is not None:
        s = s.masked_fill(~valid.cpu()[:, None, None], float("-inf"))
    terms = s.amax(-1).abs().nan_to_num(0.0, 0.0, 0.0).sum(2) if s.shape[-1] else torch.zeros_like(want)
    allowed = _limit(case.dtype, want[finite], (want + _term_error(case.dtype) * terms)[finite])
    _check("scores", scores[finite], want[finite], case.dtype, allowed, zero_absolute=False)
    # The selection follows the op's own scores by the documented order (NaN first, then
    # descending, ties to the smaller block, returned in increasing order) ...
    if not torch.equal(ids, select_blocks(scores, k)):
        raise FuzzFailure(f"indices: {ids.flatten().tolist()[:16]} are not the k best of the returned scores "
                          f"by the documented order ({select_blocks(scores, k).flatten().tolist()[:16]})")
    # ... and those agree with the float64 reference's up to rounding; exact data: the same blocks.
    if case.extra["exact"] and not want.isnan().any() and not torch.equal(ids, select_blocks(want, k)):
        raise FuzzFailure("indices: exact data, expected the reference's blocks "
                          f"{select_blocks(want, k).flatten().tolist()[:16]}, got {ids.flatten().tolist()[:16]}")
    if k and finite.all():
        picked = want.gather(-1, ids).amin(-1)
        left = want.scatter(-1, ids, float("-inf")).amax(-1)
        slack = 8 * TOLERANCE[case.dtype] * want.abs().amax(-1).clamp_min(1.0)
        if bool((left > picked + slack).any()):
            raise FuzzFailure("indices: a block left out scores above a selected one (float64 reference scores)")


def judge_block_read(case, res, gen):
    q, block_values, indices = case.args["q"], case.args["block_values"], case.args["indices"]
    B, H, T, _ = q.shape
    scale = resolve_scale(case.args.get("scale"), q.shape[-1])
    valid = case.args.get("block_valid")
    valid = None if valid is None else valid.cpu()
    ids = indices.cpu()
    _expect_tensor("out", res.out, (B, H, T, block_values.shape[-1]), case.dtype)
    _expect_tensor("lse", res.lse, (B, H, T), lse_dtype(case.dtype))
    terms = block_read_ref(_f64(q), _f64(case.args["block_keys"]), _f64(block_values).abs(), ids, valid, scale)[0]

    def softmax_grad_terms(cots):
        # dq and dk are sums of dS_j = p_j (dP_j - delta) times k_j (q): each dS_j is itself a
        # difference, of terms of size p_j (|dP_j| + |delta|), which the sums then carry
        # (cancellation in dP_j - delta moves them by far more than the tolerance of the sum).
        names = ("q", "block_keys", "block_values")
        leaves = _leaves(case, names)
        q64, keys64, values64 = (leaves[n] for n in names)
        B, Hk, _, S, D = keys64.shape
        if not (q64.numel() and ids.numel() and S):
            return {}
        keys, values, ok = gather_blocks(keys64, values64.detach(), ids, valid)
        rows = q64.reshape(B, Hk, -1, D)
        with torch.no_grad():
            s = torch.einsum("bgmd,bgld->bgml", rows * scale, keys).masked_fill(~ok[:, :, None], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            dp = torch.einsum("bgmd,bgld->bgml", cots[0].reshape(B, Hk, -1, cots[0].shape[-1]), values)
            delta = (p * dp).sum(-1, keepdim=True) - cots[1].reshape(B, Hk, -1, 1)
            size = (p * (dp.abs() + delta.abs())).nan_to_num(0.0)
        dq_sum = scale * torch.einsum("bgml,bgmd,bgld->", size, rows, keys.detach().abs())
        dk_sum = scale * torch.einsum("bgml,bgmd,bgld->", size, rows.detach().abs(), keys)
        terms = {}
        for name, total in (("q", dq_sum), ("block_keys", dk_sum)):
            (grad,) = torch.autograd.grad(total, leaves.bases[name], allow_unused=True)
            if grad is not None:
                terms[name] = grad.abs()
        return terms

    compare(case, ("out", "lse"), (res.out, res.lse),
            lambda x: block_read_ref(x["q"], x["block_keys"], x["block_values"], ids, valid, scale), gen,
            model_cotangents=lambda outs, cots: (cots[0], cots[1] - _stored_error(cots[0], outs[0], case.dtype)),
            output_terms={"out": terms}, gradient_terms=softmax_grad_terms)


def judge_quantized_read(case, read, gen):
    q, keys, key_scale, values = (case.args[n] for n in ("q", "keys", "key_scale", "values"))
    value_scale, k = case.args.get("value_scale"), case.args["k"]
    B, H, T, Dk = q.shape
    scale = resolve_scale(case.args.get("scale"), Dk)
    acc = lse_dtype(case.dtype)
    _expect_tensor("out", read.out, (B, H, T, values.shape[-1]), case.dtype)
    _expect_tensor("indices", read.indices, (B, H, T, k), torch.int64)
    _expect_tensor("weights", read.weights, (B, H, T, k), acc)
    _expect_tensor("lse", read.lse, (B, H, T), acc)
    slot_ids = read.indices.detach().cpu()
    keys, key_scale = keys.cpu(), key_scale.cpu()
    # The selection ranks float64 sums of the float32 qe = (q * scale) * key_scale for every dtype,
    # float64 q too: judged against exactly those scores (a near-tie within their float64 rounding).
    rank = _rank(quantized_scores_ref(q.detach().cpu(), keys, key_scale, scale))
    best = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :k]
    _check_selection("indices", slot_ids, best, rank, k, case.dtype, case.extra["exact"])
    values = values.cpu()
    value_scale = None if value_scale is None else value_scale.cpu()
    magnitudes = dequantize_values(values, value_scale, torch.float64).abs()
    terms = quantized_read_gather(_f64(q), keys, key_scale, magnitudes, slot_ids, None, scale)[0]  # sum w_j |v_j|
    compare(case, ("out", "weights", "lse"), (read.out, read.weights, read.lse),
            lambda x: quantized_read_gather(x["q"], keys, key_scale, values, slot_ids, value_scale, scale), gen,
            model_cotangents=lambda outs, cots: _read_cotangents(outs, cots, case.dtype),
            output_terms={"out": terms})


# ------------------------------------------------------------------------------------------------
# Strategies: one per op, drawing plain parameters (the tensors are built from them).
# ------------------------------------------------------------------------------------------------

def _strategy(draw_params):
    """``draw_params(draw, backend)`` as a function of the backend returning a hypothesis strategy
    (``st.composite``), made when called: only drawing needs hypothesis."""

    @functools.wraps(draw_params)
    def strategy(backend):
        if st is None:
            raise ImportError("drawing fuzz cases needs hypothesis: pip install hypothesis")
        return st.composite(draw_params)(backend)
    return strategy


def _tiny(backend: str) -> bool:
    """The interpreter is slow: Triton cases keep every size small."""
    return backend == "triton"


def _dtype(draw, backend):
    """float32/float16/bfloat16 alike; float64 as often on reference/cpu, one case in ten on triton
    and cuda (which must refuse it)."""
    if backend in ("triton", "cuda"):
        return "float64" if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(("float32", "float16", "bfloat16")))
    return draw(st.sampled_from(("float32", "float16", "bfloat16", "float64")))


def _sizes(draw, ranges: dict, zeroable=()):
    """Sizes from ``ranges`` (name -> (low, high), low >= 1); in about one case in eight one of the
    ``zeroable`` sizes is 0 (an empty batch, no heads, no queries, an empty feature dim)."""
    sizes = {name: draw(st.integers(low, high)) for name, (low, high) in ranges.items()}
    if zeroable and draw(st.integers(0, 7)) == 0:
        sizes[draw(st.sampled_from(zeroable))] = 0
    return sizes


def _layouts(draw, names):
    return {n: draw(st.sampled_from(LAYOUTS)) for n in names}


def _specials(draw, names, kinds=("nan", "inf", "-inf")):
    """Usually none; in about one case in five one or two (tensor, kind, count) entries."""
    if draw(st.integers(0, 4)) != 0:
        return []
    out = []
    for _ in range(draw(st.integers(1, 2))):
        out.append((draw(st.sampled_from(names)), draw(st.sampled_from(kinds)), draw(st.integers(1, 3))))
    return out


def _rarely(draw, usual, rare):
    """A draw from ``usual``, or in about one case in ten from ``rare`` (large sizes: k = 256 needs
    N >= 256, and such cases cost 10-100 small ones)."""
    return draw(rare) if draw(st.integers(0, 9)) == 0 else draw(usual)


def _edge_int(draw, low, high):
    """An int in [low, high], at an edge as often as not."""
    return draw(st.one_of(st.sampled_from(sorted({low, high})), st.integers(low, high)))


def _mutation(draw, names):
    """Usually None; about one case in six plants an invalid argument."""
    return None if draw(st.integers(0, 5)) else draw(st.sampled_from(names))


def _common(draw, backend, tensor_names, mutations, special_names=None):
    return dict(dtype=_dtype(draw, backend), seed=draw(st.integers(0, 2**32 - 1)),
                layouts=_layouts(draw, tensor_names),
                specials=_specials(draw, special_names or tensor_names),
                mode=draw(st.sampled_from(("normal", "int"))),
                grad=draw(st.booleans()), mutation=_mutation(draw, mutations))


def _scale(draw, mode):
    # Exact (integer) data keeps its scores exact only with a power-of-two scale.
    return draw(st.sampled_from((None, 0.5, 1.0) if mode == "normal" else (0.5, 1.0)))


def _valid_len(draw, B, N, k):
    if draw(st.booleans()):
        return None
    choices = sorted({0, N, max(0, k - 1), min(N, k)})
    return [draw(st.one_of(st.sampled_from(choices), st.integers(0, N))) for _ in range(B)]


def _non_divisor(heads: int) -> int:
    """A head count that does not divide ``heads``: heads + 1, or 0 when heads is 0 (which every
    positive count divides)."""
    return heads + 1 if heads else 0


TOPK_MUTATIONS = ("q-rank", "keys-dk", "keys-heads", "values-n", "values-rank", "keys-dtype", "q-int",
                  "k-zero", "k-over", "k-float", "valid_len-high", "valid_len-neg", "valid_len-dtype",
                  "valid_len-shape", "scale-tensor", "backend-name", "n-zero")


@_strategy
def topk_params(draw, backend):
    tiny = _tiny(backend)
    p = _common(draw, backend, ("q", "keys", "values", "valid_len"), TOPK_MUTATIONS, ("q", "keys", "values"))
    wide = (1, 9) if tiny else (1, 33)
    p.update(_sizes(draw, dict(B=(1, 2 if tiny else 3), Hm=(1, 2 if tiny else 3), group=(1, 2 if tiny else 3),
                               T=(1, 3 if tiny else 5), Dk=wide, Dv=wide), ("B", "group", "T", "Dk", "Dv")))
    p["H"] = p["Hm"] * p.pop("group")
    p["N"] = draw(st.integers(1, 9)) if tiny else _rarely(draw, st.integers(1, 12), st.sampled_from((255, 256, 300)))
    p.update(shared=draw(st.booleans()), deterministic=draw(st.booleans()))
    p["k"] = _edge_int(draw, 1, min(p["N"], MAX_K))
    p["valid_len"] = _valid_len(draw, p["B"], p["N"], p["k"])
    p["scale"] = _scale(draw, p["mode"])
    return p


PK_MUTATIONS = ("q-odd", "q-rank", "subkeys-heads", "subkeys-half", "values-n", "values-rank", "values-dtype",
                "k-zero", "k-over", "k_sub-over", "k_sub-zero", "n_sub-zero", "backend-name")


@_strategy
def product_key_params(draw, backend):
    tiny = _tiny(backend)
    p = _common(draw, backend, ("q", "subkeys", "values"), PK_MUTATIONS)
    p.update(_sizes(draw, dict(B=(1, 2), H=(1, 3), T=(1, 3 if tiny else 4), half=(1, 5), Dv=(1, 7)),
                    ("B", "H", "T", "half", "Dv")))
    n_sub = draw(st.integers(1, 5)) if tiny else _rarely(draw, st.integers(1, 6), st.just(17))
    k_sub = _edge_int(draw, 1, n_sub)
    p.update(n_sub=n_sub, k_sub=k_sub, k=_edge_int(draw, 1, k_sub * k_sub), sum_heads=draw(st.booleans()),
             sparse_grad=draw(st.booleans()), pass_k_sub=draw(st.booleans()), deterministic=draw(st.booleans()))
    if not p["pass_k_sub"]:
        p["k_sub"] = p["k"] if p["k"] <= n_sub else k_sub   # the default k_sub = k needs k <= n_sub
        p["pass_k_sub"] = p["k_sub"] != p["k"]
    p["scale"] = _scale(draw, p["mode"])
    return p


WRITE_MUTATIONS = ("memory-rank", "indices-shape", "indices-dtype", "index-high", "index-low", "weights-shape",
                   "weights-dtype", "add-d", "erase-shape", "backend-name")


@_strategy
def write_params(draw, backend):
    tiny = _tiny(backend)
    p = _common(draw, backend, ("memory", "indices", "weights", "add", "erase"), WRITE_MUTATIONS,
                ("memory", "weights", "add", "erase"))
    p.update(_sizes(draw, dict(B=(1, 2), Hm=(1, 2 if tiny else 3), N=(1, 5 if tiny else 7),
                               D=(1, 9 if tiny else 33), T=(1, 3 if tiny else 5), kw=(1, 4)),
                    ("B", "Hm", "N", "D", "T", "kw")))
    p.update(heads=draw(st.booleans()), index_dtype=draw(st.sampled_from(("int64", "int32"))),
             slots=draw(st.sampled_from(("random", "collide", "same", "skip"))),
             erase_one=draw(st.booleans()), inplace=draw(st.booleans()))
    return p


DENSE_MUTATIONS = ("shape-mismatch", "dtype", "not-a-tensor", "int-tensor", "backend-name")


@_strategy
def dense_params(draw, backend):
    p = _common(draw, backend, ("memory", "update", "input_gate", "forget_gate"), DENSE_MUTATIONS)
    rank = draw(st.integers(0, 4))
    full = list(_sizes(draw, {str(i): (1, 5) for i in range(rank)}, tuple(str(i) for i in range(rank))).values())
    shapes = {}
    for name in ("memory", "update", "input_gate", "forget_gate"):
        drop = draw(st.integers(0, rank))
        shapes[name] = tuple(1 if draw(st.booleans()) else s for s in full[drop:])
    p.update(full=tuple(full), shapes=shapes)
    return p


MERGE_MUTATIONS = ("out_a-rank", "out_b-shape", "lse_a-shape", "lse_b-dtype", "out_b-dtype", "backend-name")


@_strategy
def merge_params(draw, backend):
    tiny = _tiny(backend)
    p = _common(draw, backend, ("out_a", "lse_a", "out_b", "lse_b"), MERGE_MUTATIONS)
    p.update(_sizes(draw, dict(B=(1, 2), H=(1, 3), T=(1, 4 if tiny else 7), D=(1, 9 if tiny else 70)),
                    ("B", "H", "T", "D")))
    p["empty"] = draw(st.sampled_from(("none", "a", "b", "both", "mixed")))
    return p


GATED_MERGE_MUTATIONS = ("gate-wide", "gate-rank", "out_mem-shape", "gate-dtype", "backend-name")


@_strategy
def gated_merge_params(draw, backend):
    tiny = _tiny(backend)
    p = _common(draw, backend, ("out_local", "out_mem", "gate"), GATED_MERGE_MUTATIONS)
    p.update(_sizes(draw, dict(B=(1, 2), H=(1, 3), T=(1, 4 if tiny else 7), D=(1, 9 if tiny else 70)),
                    ("B", "H", "T", "D")))
    B, H, T = p["B"], p["H"], p["T"]
    p["gate"] = draw(st.sampled_from(((), (1,), (H, 1, 1), (B, H, T, 1), (T, 1), (B, 1, 1, 1), (1, H, 1, 1),
                                      (B, H, 1, 1))))
    return p


ATTN_MUTATIONS = ("q-rank", "k-short", "k-heads", "v-dv", "mem_values-dv", "mem_keys-dtype", "topk-zero",
                  "topk-over", "window-zero", "window-float", "merge-bad", "gate-missing", "gate-unused",
                  "gate-wide", "valid_len-high", "backend-name")


@_strategy
def attention_params(draw, backend):
    tiny = _tiny(backend)
    p = _common(draw, backend, ("q", "k", "v", "mem_keys", "mem_values", "gate", "valid_len"), ATTN_MUTATIONS,
                ("q", "k", "v", "mem_keys", "mem_values", "gate"))
    p.update(_sizes(draw, dict(B=(1, 2), Hkv=(1, 2), Hm=(1, 2), group=(1, 2), T=(1, 3 if tiny else 4),
                               D=(1, 8 if tiny else 16), Dv=(1, 6)), ("B", "group", "T", "D", "Dv")))
    p["H"] = math.lcm(p["Hkv"], p["Hm"]) * p.pop("group")
    p["S"] = p["T"] + draw(st.integers(0, 3 if tiny else 5))
    p["N"] = N = draw(st.integers(1, 8)) if tiny else _rarely(draw, st.integers(1, 9), st.sampled_from((256, 257)))
    B, H, T = p["B"], p["H"], p["T"]
    merge = draw(st.sampled_from(("joint", "gate")))
    p.update(shared=draw(st.booleans()), merge=merge, window=draw(st.sampled_from((None, 1, 2, 3, 1000))),
             gate=draw(st.sampled_from(((H, 1, 1), (B, H, T, 1), (), (1, H, 1, 1)))) if merge == "gate" else None,
             deterministic=draw(st.booleans()))
    p["topk"] = _edge_int(draw, 1, min(N, MAX_K))
    p["valid_len"] = _valid_len(draw, B, N, p["topk"])
    p["scale"] = _scale(draw, p["mode"])
    return p


BLOCK_TOPK_MUTATIONS = ("q-rank", "reprs-rank", "reprs-heads", "reprs-dim", "k-over", "repr_valid-shape",
                        "repr_valid-dtype", "reprs-dtype", "backend-name")
BLOCK_READ_MUTATIONS = ("q-rank", "block_keys-heads", "block_values-size", "indices-shape", "indices-dtype",
                        "indices-high", "indices-low", "block_valid-shape", "block_keys-dtype", "backend-name")


def _blocks_params(draw, backend, tensors, mutations):
    tiny = _tiny(backend)
    p = _common(draw, backend, tensors, mutations, special_names=tensors[:2])
    Hk = draw(st.integers(1, 2))
    p.update(_sizes(draw, dict(B=(1, 2), T=(1, 4 if tiny else 9), NB=(1, 12), S=(1, 9), D=(1, 9 if tiny else 40),
                               Dv=(1, 9 if tiny else 33)), ("B", "T", "D")))
    p.update(Hk=Hk, H=Hk * draw(st.integers(1, 3)), k=_edge_int(draw, 0, p["NB"]),
             valid=draw(st.sampled_from((None, "random", "sparse"))), repeats=draw(st.booleans()),
             strided=False, ties=draw(st.integers(0, 4)) == 0, scale=_scale(draw, p["mode"]))
    p["R"] = draw(st.sampled_from((1, p["S"])))
    return p


@_strategy
def block_topk_params(draw, backend):
    return _blocks_params(draw, backend, ("q", "reprs"), BLOCK_TOPK_MUTATIONS)


@_strategy
def block_read_params(draw, backend):
    return _blocks_params(draw, backend, ("q", "block_keys", "block_values"), BLOCK_READ_MUTATIONS)


QUANTIZED_READ_MUTATIONS = ("q-rank", "q-int", "keys-rank", "keys-dk", "keys-heads", "keys-dtype", "keys-min",
                            "n-zero", "key_scale-shape", "key_scale-dtype", "key_scale-zero", "key_scale-nan",
                            "values-n", "values-int32", "value_scale-missing", "value_scale-extra",
                            "value_scale-shape", "value_scale-dtype", "k-zero", "k-over", "k-float", "scale-tensor",
                            "backend-name")
# Value formats: "q" (q's dtype), a float dtype used as is, or int8/float8 with per-entry scales.
QUANTIZED_VALUE_FORMATS = ("q", "float32", "bfloat16", "float64", "int8", "float8")


@_strategy
def quantized_read_params(draw, backend):
    tiny = _tiny(backend)
    # NaN/inf only where a float tensor can hold them: q and float values (int8 keys cannot; the
    # channel scales must be finite and positive, which a mutation checks).
    p = _common(draw, backend, ("q", "keys", "key_scale", "values", "value_scale"), QUANTIZED_READ_MUTATIONS,
                ("q", "values"))
    p.update(_sizes(draw, dict(B=(1, 3), Hm=(1, 3), group=(1, 3), T=(1, 5), Dk=(1, 9 if tiny else 40),
                               Dv=(1, 9 if tiny else 33)), ("B", "group", "T", "Dv")))
    p["H"] = p["Hm"] * p.pop("group")
    p["N"] = draw(st.integers(1, 9)) if tiny else _rarely(draw, st.integers(1, 12), st.sampled_from((63, 64, 300)))
    p["k"] = _edge_int(draw, 1, p["N"])
    p.update(values=draw(st.sampled_from(QUANTIZED_VALUE_FORMATS)),
             keys=draw(st.sampled_from(("random", "random", "extremes", "ties"))), scale=_scale(draw, p["mode"]))
    return p


STRATEGIES = {
    "topk_memory_read": topk_params,
    "product_key_read": product_key_params,
    "gated_memory_write": write_params,
    "gated_dense_update": dense_params,
    "merge_attention": merge_params,
    "gated_merge": gated_merge_params,
    "memory_attention": attention_params,
    "block_topk": block_topk_params,
    "block_read": block_read_params,
    "quantized_topk_read": quantized_read_params,
}
assert tuple(sorted(STRATEGIES)) == tuple(sorted(OPS)), "every op needs a strategy"
# The invalid arguments each op's cases draw (tests/test_validation.py checks every one).
MUTATIONS = {
    "topk_memory_read": TOPK_MUTATIONS,
    "product_key_read": PK_MUTATIONS,
    "gated_memory_write": WRITE_MUTATIONS,
    "gated_dense_update": DENSE_MUTATIONS,
    "merge_attention": MERGE_MUTATIONS,
    "gated_merge": GATED_MERGE_MUTATIONS,
    "memory_attention": ATTN_MUTATIONS,
    "block_topk": BLOCK_TOPK_MUTATIONS,
    "block_read": BLOCK_READ_MUTATIONS,
    "quantized_topk_read": QUANTIZED_READ_MUTATIONS,
}
assert tuple(sorted(MUTATIONS)) == tuple(sorted(OPS)), "every op needs its invalid arguments"


# ------------------------------------------------------------------------------------------------
# Builders: parameters -> Case.
# ------------------------------------------------------------------------------------------------

def _other_float(dtype):
    return torch.float64 if dtype != torch.float64 else torch.float32


# Mutations that build_case applies to an op's own case (built without them): one float argument
# in another float dtype, which must raise TypeError naming it; and an unknown backend name.
OTHER_DTYPE_MUTATIONS = {  # mutation: (argument, why)
    "keys-dtype": ("keys", "keys in another float dtype"),
    "values-dtype": ("values", "values in another dtype"),
    "weights-dtype": ("weights", "weights in another dtype"),
    "dtype": ("forget_gate", "forget_gate in another dtype"),
    "out_b-dtype": ("out_b", "out_b in another dtype"),
    "gate-dtype": ("gate", "gate in another dtype"),
    "mem_keys-dtype": ("mem_keys", "mem_keys in another dtype"),
    "reprs-dtype": ("reprs", "reprs in another dtype"),
    "block_keys-dtype": ("block_keys", "block_keys in another dtype"),
}


def _bad(types, names, why):
    return Expected(tuple(types), tuple(names), why)


def _memory_bdims(shared):
    return () if shared else (0,)   # a per-batch memory may be one memory expanded over the batch


def build_topk(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    B, H, Hm, T, N, Dk, Dv, k = (p[n] for n in ("B", "H", "Hm", "T", "N", "Dk", "Dv", "k"))
    lead = (Hm, N) if p["shared"] else (B, Hm, N)
    b = Built()
    q = _float_tensor(b, gen, "q", (B, H, T, Dk), dtype, p, device, bdims=(0,))
    keys = _float_tensor(b, gen, "keys", lead + (Dk,), dtype, p, device, bdims=_memory_bdims(p["shared"]))
    values = _float_tensor(b, gen, "values", lead + (Dv,), dtype, p, device, bdims=_memory_bdims(p["shared"]))
    valid_len = None
    if p["valid_len"] is not None:
        valid_len = _int_tensor(b, "valid_len", torch.tensor(p["valid_len"], dtype=torch.int64), p, device, -7)
    args = dict(q=q, keys=keys, values=values, k=k, scale=p["scale"], valid_len=valid_len,
                deterministic=p["deterministic"], backend=backend)
    case = Case("topk_memory_read", backend, dtype, args, ("q", "keys", "values", "k"),
                diff_inputs=("q", "keys", "values"), judge=judge_topk, built=b,
                extra=dict(exact=p["mode"] == "int"))
    m = p["mutation"]
    if m == "q-rank":
        args["q"], case.must_raise = q.flatten(0, 1), _bad([ValueError], ["q"], "q is 3-D")
    elif m == "keys-dk":
        args["keys"] = torch.zeros(lead + (Dk + 1,), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["keys"], "keys has Dk + 1")
    elif m == "keys-heads":
        bad = _non_divisor(H)
        args["keys"] = torch.zeros(lead[:-2] + (bad, N, Dk), dtype=dtype, device=device)
        args["values"] = torch.zeros(lead[:-2] + (bad, N, Dv), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["keys"], f"Hm = {bad} does not divide H = {H}")
    elif m == "values-n":
        args["values"] = torch.zeros(lead[:-1] + (N + 1, Dv), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["values"], "values has N + 1 slots")
    elif m == "values-rank":
        args["values"] = values.unsqueeze(0)
        case.must_raise = _bad([ValueError], ["values"], "values has one more dim than keys")
    elif m == "q-int":
        args["q"] = torch.ones(q.shape, dtype=torch.int64, device=device)
        case.must_raise = _bad([TypeError], ["q"], "q is int64")
    elif m == "k-zero":
        args["k"], case.must_raise = 0, _bad([ValueError], ["k"], "k = 0")
    elif m == "k-over":
        args["k"], case.must_raise = min(N, MAX_K) + 1, _bad([ValueError], ["k"], "k > min(N, 256)")
    elif m == "k-float":
        args["k"], case.must_raise = float(k), _bad([TypeError], ["k"], "k is a float")
    elif m == "valid_len-high" and B:
        bad = torch.tensor(p["valid_len"] or [N] * B, dtype=torch.int64)
        bad[B - 1] = N + 1
        args["valid_len"], case.must_raise = bad.to(device), _bad([ValueError], ["valid_len"], "valid_len > N")
    elif m == "valid_len-neg" and B:
        bad = torch.tensor(p["valid_len"] or [N] * B, dtype=torch.int64)
        bad[0] = -1
        args["valid_len"], case.must_raise = bad.to(device), _bad([ValueError], ["valid_len"], "valid_len < 0")
    elif m == "valid_len-dtype":
        args["valid_len"] = torch.full((B,), float(N), device=device)
        case.must_raise = _bad([TypeError], ["valid_len"], "valid_len is float")
    elif m == "valid_len-shape":
        args["valid_len"] = torch.full((B + 1,), N, dtype=torch.int64, device=device)
        case.must_raise = _bad([ValueError], ["valid_len"], "valid_len has B + 1 entries")
    elif m == "scale-tensor":
        args["scale"], case.must_raise = torch.tensor(0.5), _bad([TypeError], ["scale"], "scale is a tensor")
    elif m == "n-zero":
        args["keys"] = torch.zeros(lead[:-1] + (0, Dk), dtype=dtype, device=device)
        args["values"] = torch.zeros(lead[:-1] + (0, Dv), dtype=dtype, device=device)
        args["valid_len"] = None
        case.must_raise = _bad([ValueError], ["k", "keys"], "N = 0 leaves no valid k")
    elif m is not None:
        args["k"], case.must_raise = 0, _bad([ValueError], ["k"], "k = 0")
    return case


def build_product_key(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    B, H, T, half, n_sub, Dv, k, k_sub = (p[n] for n in ("B", "H", "T", "half", "n_sub", "Dv", "k", "k_sub"))
    Dk = 2 * half
    b = Built()
    q = _float_tensor(b, gen, "q", (B, H, T, Dk), dtype, p, device, bdims=(0,))
    subkeys = _float_tensor(b, gen, "subkeys", (H, 2, n_sub, half), dtype, p, device, bdims=(0,))
    if p["sparse_grad"]:
        # A sparse gradient cannot flow back through a view (autograd has no sparse as_strided or
        # transpose of dense dims), so with sparse_grad the values are the leaf itself, as an
        # nn.Embedding(sparse=True) weight is.
        p = dict(p, layouts=dict(p["layouts"], values="contiguous"))
    values = _float_tensor(b, gen, "values", (n_sub * n_sub, Dv), dtype, p, device)
    args = dict(q=q, subkeys=subkeys, values=values, k=k, scale=p["scale"], sum_heads=p["sum_heads"],
                sparse_grad=p["sparse_grad"], deterministic=p["deterministic"], backend=backend)
    if p["pass_k_sub"]:
        args["k_sub"] = k_sub
    case = Case("product_key_read", backend, dtype, args, ("q", "subkeys", "values", "k"),
                diff_inputs=("q", "subkeys", "values"), judge=judge_product_key, built=b,
                extra=dict(exact=p["mode"] == "int"))
    m = p["mutation"]
    if m == "q-odd":
        args["q"] = torch.zeros(B, H, T, Dk + 1, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["q"], "odd Dk")
    elif m == "q-rank":
        args["q"], case.must_raise = q.flatten(0, 1), _bad([ValueError], ["q"], "q is 3-D")
    elif m == "subkeys-heads":
        args["subkeys"] = torch.zeros(H + 1, 2, n_sub, half, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["subkeys"], "subkeys for H + 1 heads")
    elif m == "subkeys-half":
        args["subkeys"] = torch.zeros(H, 2, n_sub, half + 1, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["subkeys"], "subkeys of size Dk/2 + 1")
    elif m == "values-n":
        args["values"] = torch.zeros(n_sub * n_sub + 1, Dv, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["values"], "values has n_sub ** 2 + 1 rows")
    elif m == "values-rank":
        args["values"], case.must_raise = values.unsqueeze(0), _bad([ValueError], ["values"], "3-D values")
    elif m == "k-zero":
        args["k"], case.must_raise = 0, _bad([ValueError], ["k"], "k = 0")
    elif m == "k-over":
        args["k"], args["k_sub"] = k_sub * k_sub + 1, k_sub
        case.must_raise = _bad([ValueError], ["k"], "k > k_sub ** 2")
    elif m == "k_sub-over":
        args["k_sub"], case.must_raise = n_sub + 1, _bad([ValueError], ["k_sub"], "k_sub > n_sub")
        args["k"] = 1
    elif m == "k_sub-zero":
        args["k_sub"], case.must_raise = 0, _bad([ValueError], ["k_sub"], "k_sub = 0")
    elif m == "n_sub-zero":
        args["subkeys"] = torch.zeros(H, 2, 0, half, dtype=dtype, device=device)
        args["values"] = torch.zeros(0, Dv, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["subkeys", "k", "k_sub"], "n_sub = 0")
    elif m is not None:
        args["k"], case.must_raise = 0, _bad([ValueError], ["k"], "k = 0")
    return case


def _write_slots(gen, shape, N, pattern):
    if N == 0 or pattern == "skip":   # an empty memory admits only -1 ("no write")
        return torch.full(shape, -1, dtype=torch.int64)
    if pattern == "same":
        slot = int(torch.randint(0, N, (1,), generator=gen))
        return torch.full(shape, slot, dtype=torch.int64)
    if pattern == "collide":
        return torch.randint(-1, min(N, 2), shape, generator=gen)
    return torch.randint(-1, N, shape, generator=gen)


def build_write(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    B, Hm, N, D, T, kw = (p[n] for n in ("B", "Hm", "N", "D", "T", "kw"))
    lead = (B, Hm) if p["heads"] else (B,)
    inplace = p["inplace"]
    b = Built()
    # Out of place, one memory may serve the whole batch (stride 0); in place, the memory must not
    # alias itself.
    memory = _float_tensor(b, gen, "memory", lead + (N, D), dtype, p, device, bdims=() if inplace else (0,))
    index_dtype = torch.int32 if p["index_dtype"] == "int32" else torch.int64
    slots = _write_slots(gen, lead + (T, kw), N, p["slots"]).to(index_dtype)
    indices = _int_tensor(b, "indices", slots, p, device, N + 1000)
    weights = _float_tensor(b, gen, "weights", lead + (T, kw), dtype, p, device, kind="unit", bdims=(0,))
    add = _float_tensor(b, gen, "add", lead + (T, D), dtype, p, device, bdims=(0, len(lead)))
    erase_d = 1 if p["erase_one"] else D
    erase = _float_tensor(b, gen, "erase", lead + (T, erase_d), dtype, p, device, kind="unit",
                          bdims=(0, len(lead) + 1))
    args = dict(memory=memory, indices=indices, weights=weights, add=add, erase=erase, inplace=inplace,
                backend=backend)
    case = Case("gated_memory_write", backend, dtype, args, ("memory", "indices", "weights", "add", "erase"),
                diff_inputs=("memory", "weights", "add", "erase"), judge=judge_write, built=b)
    # Weights and erase gates outside [0, 1] (here: NaN/inf) may be refused, naming the argument.
    for target, _, _ in p["specials"]:
        if target in ("weights", "erase"):
            case.may_raise.append(_bad([ValueError], [target], f"{target} outside [0, 1]"))
    m = p["mutation"]
    sym = lead + (T, kw)
    if m == "memory-rank":
        args["memory"] = memory.reshape(-1)
        case.must_raise = _bad([ValueError], ["memory"], "1-D memory")
    elif m == "indices-shape":
        args["indices"] = torch.zeros((B + 1,) + lead[1:] + (T, kw), dtype=index_dtype, device=device)
        case.must_raise = _bad([ValueError], ["indices"], "indices with B + 1 rows")
    elif m == "indices-dtype":
        args["indices"] = slots.to(torch.float32).to(device)
        case.must_raise = _bad([TypeError], ["indices"], "float indices")
    elif m == "index-high" and slots.numel():
        bad = slots.clone().reshape(-1)
        bad[int(torch.randint(0, bad.numel(), (1,), generator=gen))] = N
        args["indices"] = bad.reshape(sym).to(device)
        case.must_raise = _bad([IndexError], ["indices"], "an index = N")
    elif m == "index-low" and slots.numel():
        bad = slots.clone().reshape(-1)
        bad[int(torch.randint(0, bad.numel(), (1,), generator=gen))] = -2
        args["indices"] = bad.reshape(sym).to(device)
        case.must_raise = _bad([IndexError], ["indices"], "an index = -2")
    elif m == "weights-shape":
        args["weights"] = torch.zeros(lead + (T, kw + 1), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["weights"], "weights with kw + 1")
    elif m == "add-d":
        args["add"] = torch.zeros(lead + (T, D + 1), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["add"], "add with D + 1")
    elif m == "erase-shape":
        args["erase"] = torch.zeros(lead + (T, D + 2), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["erase"], "erase with D + 2")
    elif m is not None:
        args["weights"] = torch.zeros(lead + (T, kw + 1), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["weights"], "weights with kw + 1")
    if inplace:
        case.extra["memory_before"] = _f64(memory)
        case.check_grad = False
    return case


def build_dense(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    b = Built()
    args = {}
    for name, shape in p["shapes"].items():
        bdims = tuple(i for i, s in enumerate(shape) if s != 1)
        kind = "gate" if name.endswith("gate") else "normal"
        args[name] = _float_tensor(b, gen, name, shape, dtype, p, device, kind=kind, bdims=bdims)
    names = ("memory", "update", "input_gate", "forget_gate")
    args["backend"] = backend
    full = torch.broadcast_shapes(*(tuple(p["shapes"][n]) for n in names))
    case = Case("gated_dense_update", backend, dtype, args, names, diff_inputs=names, judge=judge_dense,
                built=b, extra=dict(broadcast={n: full for n in names}))
    m = p["mutation"]
    if m == "shape-mismatch":
        args["memory"] = torch.zeros(2, dtype=dtype, device=device)
        args["update"] = torch.zeros(3, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["update", "memory"], "shapes do not broadcast")
    elif m == "not-a-tensor":
        args["input_gate"], case.must_raise = 0.5, _bad([TypeError], ["input_gate"], "a Python float")
    elif m == "int-tensor":
        args["memory"] = torch.ones(p["shapes"]["memory"], dtype=torch.int32, device=device)
        case.must_raise = _bad([TypeError], ["memory"], "int32 memory")
    return case


def build_merge(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    B, H, T, D = (p[n] for n in ("B", "H", "T", "D"))
    ldt = lse_dtype(dtype)
    b = Built()
    out_a = _float_tensor(b, gen, "out_a", (B, H, T, D), dtype, p, device, bdims=(0, 1))
    out_b = _float_tensor(b, gen, "out_b", (B, H, T, D), dtype, p, device, bdims=(0, 1))
    lse = {}
    for side in ("a", "b"):
        name = "lse_" + side
        t = _float_tensor(b, gen, name, (B, H, T), ldt, p, device, kind="lse", bdims=(0, 1))
        empty = p["empty"]
        rows = torch.zeros((B, H, T), dtype=torch.bool)
        if empty in (side, "both"):
            rows[..., ::2] = True
        elif empty == "mixed":
            rows = torch.rand((B, H, T), generator=gen) < 0.4
        if rows.any():
            # -inf rows: a side with no keys. Written through the base (the view may be expanded).
            base = b.bases[name]
            with torch.no_grad():
                view = _view(base, (B, H, T), b.layouts[name])
                if b.layouts[name] == "expanded":
                    base.fill_(float("-inf"))
                else:
                    view[rows.to(device)] = float("-inf")
            b.views[name] = _view(base, (B, H, T), b.layouts[name])
        lse[side] = b.views[name]
    args = dict(out_a=out_a, lse_a=lse["a"], out_b=out_b, lse_b=lse["b"], backend=backend)
    names = ("out_a", "lse_a", "out_b", "lse_b")
    case = Case("merge_attention", backend, dtype, args, names, diff_inputs=names, judge=judge_merge, built=b)
    m = p["mutation"]
    if m == "out_a-rank":
        args["out_a"], case.must_raise = out_a.flatten(0, 1), _bad([ValueError], ["out_a"], "3-D out_a")
    elif m == "out_b-shape":
        args["out_b"] = torch.zeros(B, H, T, D + 1, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["out_b"], "out_b with D + 1")
    elif m == "lse_a-shape":
        args["lse_a"] = torch.zeros(B, H, T + 1, dtype=ldt, device=device)
        case.must_raise = _bad([ValueError], ["lse_a"], "lse_a with T + 1")
    elif m == "lse_b-dtype":
        args["lse_b"] = torch.zeros(B, H, T, dtype=torch.float16, device=device)
        case.must_raise = _bad([TypeError], ["lse_b"], "float16 lse_b")
    return case


def build_gated_merge(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    B, H, T, D = (p[n] for n in ("B", "H", "T", "D"))
    gate_shape = tuple(p["gate"])
    b = Built()
    out_local = _float_tensor(b, gen, "out_local", (B, H, T, D), dtype, p, device, bdims=(0, 3))
    out_mem = _float_tensor(b, gen, "out_mem", (B, H, T, D), dtype, p, device, bdims=(0, 1))
    gate = _float_tensor(b, gen, "gate", gate_shape, dtype, p, device, kind="gate",
                         bdims=tuple(i for i, s in enumerate(gate_shape) if s != 1))
    args = dict(out_local=out_local, out_mem=out_mem, gate=gate, backend=backend)
    names = ("out_local", "out_mem", "gate")
    case = Case("gated_merge", backend, dtype, args, names, diff_inputs=names, judge=judge_gated_merge, built=b,
                extra=dict(broadcast=dict(gate=(B, H, T, D))))
    m = p["mutation"]
    if m == "gate-wide":
        args["gate"] = torch.zeros(B, H, T, max(D + 1, 2), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["gate"], "gate with a last size > 1")
    elif m == "gate-rank":
        args["gate"] = torch.zeros(1, B, H, T, 1, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["gate"], "5-D gate")
    elif m == "out_mem-shape":
        args["out_mem"] = torch.zeros(B, H, T + 1, D, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["out_mem"], "out_mem with T + 1")
    return case


def build_attention(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    B, H, Hkv, Hm, T, S, D, Dv, N, topk = (p[n] for n in ("B", "H", "Hkv", "Hm", "T", "S", "D", "Dv", "N", "topk"))
    mem_lead = (Hm, N) if p["shared"] else (B, Hm, N)
    b = Built()
    q = _float_tensor(b, gen, "q", (B, H, T, D), dtype, p, device, bdims=(0,))
    k = _float_tensor(b, gen, "k", (B, Hkv, S, D), dtype, p, device, bdims=(0,))
    v = _float_tensor(b, gen, "v", (B, Hkv, S, Dv), dtype, p, device, bdims=(0,))
    mem_keys = _float_tensor(b, gen, "mem_keys", mem_lead + (D,), dtype, p, device,
                             bdims=_memory_bdims(p["shared"]))
    mem_values = _float_tensor(b, gen, "mem_values", mem_lead + (Dv,), dtype, p, device,
                               bdims=_memory_bdims(p["shared"]))
    gate = None
    if p["gate"] is not None:
        gate_shape = tuple(p["gate"])
        gate = _float_tensor(b, gen, "gate", gate_shape, dtype, p, device, kind="gate",
                             bdims=tuple(i for i, s in enumerate(gate_shape) if s != 1))
    valid_len = None
    if p["valid_len"] is not None:
        valid_len = _int_tensor(b, "valid_len", torch.tensor(p["valid_len"], dtype=torch.int64), p, device, -7)
    args = dict(q=q, k=k, v=v, mem_keys=mem_keys, mem_values=mem_values, topk=topk, window=p["window"],
                merge=p["merge"], gate=gate, scale=p["scale"], valid_len=valid_len,
                deterministic=p["deterministic"], backend=backend)
    diff = ("q", "k", "v", "mem_keys", "mem_values") + (("gate",) if gate is not None else ())
    case = Case("memory_attention", backend, dtype, args, ("q", "k", "v", "mem_keys", "mem_values", "topk"),
                diff_inputs=diff, judge=judge_attention, built=b,
                extra=dict(exact=p["mode"] == "int", broadcast=dict(gate=(B, H, T, Dv)) if gate is not None else {}))
    m = p["mutation"]
    if m == "q-rank":
        args["q"], case.must_raise = q.flatten(0, 1), _bad([ValueError], ["q"], "3-D q")
    elif m == "k-short":
        args["k"] = torch.zeros(B, Hkv, T - 1, D, dtype=dtype, device=device) if T else \
            torch.zeros(B, Hkv, S, D + 1, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["k"], "S < T (or k with D + 1 when T = 0)")
    elif m == "k-heads":
        bad = _non_divisor(H)
        args["k"] = torch.zeros(B, bad, S, D, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["k"], f"Hkv = {bad} does not divide H = {H}")
    elif m == "v-dv":
        args["v"] = torch.zeros(B, Hkv, S + 1, Dv, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["v"], "v with S + 1")
    elif m == "mem_values-dv":
        args["mem_values"] = torch.zeros(mem_lead + (Dv + 1,), dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["mem_values"], "mem_values with Dv + 1")
    elif m == "topk-zero":
        args["topk"], case.must_raise = 0, _bad([ValueError], ["topk"], "topk = 0")
    elif m == "topk-over":
        args["topk"], case.must_raise = min(N, MAX_K) + 1, _bad([ValueError], ["topk"], "topk > min(N, 256)")
    elif m == "window-zero":
        args["window"], case.must_raise = 0, _bad([ValueError], ["window"], "window = 0")
    elif m == "window-float":
        args["window"], case.must_raise = 2.5, _bad([TypeError], ["window"], "window = 2.5")
    elif m == "merge-bad":
        args["merge"], case.must_raise = "sum", _bad([ValueError], ["merge"], "merge='sum'")
    elif m == "gate-missing":
        args["merge"], args["gate"] = "gate", None
        case.must_raise = _bad([ValueError], ["gate"], "merge='gate' without gate")
    elif m == "gate-unused":
        args["merge"], args["gate"] = "joint", torch.zeros(H, 1, 1, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["gate"], "gate with merge='joint'")
    elif m == "gate-wide":
        args["merge"], args["gate"] = "gate", torch.zeros(B, H, T, 2, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["gate"], "gate with last size 2")
    elif m == "valid_len-high" and B:
        args["valid_len"] = torch.full((B,), N + 1, dtype=torch.int64, device=device)
        case.must_raise = _bad([ValueError], ["valid_len"], "valid_len > N")
    elif m is not None:
        args["topk"], case.must_raise = 0, _bad([ValueError], ["topk"], "topk = 0")
    return case


def _block_mask(p, gen, shape, device):
    """A (B, NB, X) validity mask as ``p["valid"]`` asks (see registry.blocks_case), or None."""
    if p["valid"] is None:
        return None
    mask = torch.rand(shape, generator=gen) < (0.75 if p["valid"] == "random" else 0.5)
    if p["valid"] == "sparse" and mask.numel():
        mask[:, 0] = False              # a block with no valid token
        if shape[0] > 1:
            mask[-1] = False            # a batch element whose every token is padding
    return mask.to(device)


def _block_layouts(p, names):
    """``strided`` (declared cases): q transposed from (B, T, H, D), the blocks from (B, NB, Hk, S, D)."""
    if p.get("strided") and not p["layouts"]:
        return dict(p, layouts={n: "transposed" for n in names})
    return p


def _blocks(p, b, gen, name, dtype, device, last):
    """A (B, Hk, NB, S or R, last) block tensor; with ``ties`` the odd blocks repeat the even ones."""
    B, Hk, NB = p["B"], p["Hk"], p["NB"]
    rows = p["R"] if name == "reprs" else p["S"]
    t = _float_tensor(b, gen, name, (B, Hk, NB, rows, last), dtype, p, device, bdims=(0,))
    if p.get("ties") and NB > 1 and b.layouts[name] != "expanded":
        with torch.no_grad():
            pairs = NB // 2 * 2
            t[:, :, 1:pairs:2] = t[:, :, 0:pairs:2]   # written through the view into its base
    return t


def build_block_topk(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    p = _block_layouts(p, ("q", "reprs"))
    B, H, Hk, T, NB, R, D, k = (p[n] for n in ("B", "H", "Hk", "T", "NB", "R", "D", "k"))
    b = Built()
    q = _float_tensor(b, gen, "q", (B, H, T, D), dtype, p, device, bdims=(0,))
    reprs = _blocks(p, b, gen, "reprs", dtype, device, D)
    valid = _block_mask(p, gen, (B, NB, R), device)
    args = dict(q=q, reprs=reprs, k=k, repr_valid=valid, scale=p["scale"], backend=backend)
    case = Case("block_topk", backend, dtype, args, ("q", "reprs", "k"), judge=judge_block_topk, built=b,
                extra=dict(exact=p["mode"] == "int"))
    m = p["mutation"]
    if m == "q-rank":
        args["q"], case.must_raise = q.flatten(0, 1), _bad([ValueError], ["q"], "3-D q")
    elif m == "reprs-rank":
        args["reprs"], case.must_raise = reprs.flatten(2, 3), _bad([ValueError], ["reprs"], "4-D reprs")
    elif m == "reprs-heads":
        bad = _non_divisor(H)
        args["reprs"] = torch.zeros(B, bad, NB, R, D, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["reprs"], f"Hk = {bad} does not divide H = {H}")
    elif m == "reprs-dim":
        args["reprs"] = torch.zeros(B, Hk, NB, R, D + 1, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["reprs"], "reprs with D + 1")
    elif m == "k-over":
        args["k"], case.must_raise = NB + 1, _bad([ValueError], ["k"], "k = NB + 1")
    elif m == "repr_valid-shape":
        args["repr_valid"] = torch.ones(B, NB + 1, R, dtype=torch.bool, device=device)
        case.must_raise = _bad([ValueError], ["repr_valid"], "repr_valid with NB + 1 blocks")
    elif m == "repr_valid-dtype":
        args["repr_valid"] = torch.ones(B, NB, R, dtype=torch.int32, device=device)
        case.must_raise = _bad([TypeError], ["repr_valid"], "int32 repr_valid")
    return case


def build_block_read(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    p = _block_layouts(p, ("q", "block_keys", "block_values"))
    B, H, Hk, T, NB, S, D, Dv, K = (p[n] for n in ("B", "H", "Hk", "T", "NB", "S", "D", "Dv", "k"))
    b = Built()
    q = _float_tensor(b, gen, "q", (B, H, T, D), dtype, p, device, bdims=(0,))
    block_keys = _blocks(p, b, gen, "block_keys", dtype, device, D)
    block_values = _blocks(p, b, gen, "block_values", dtype, device, Dv)
    if p["repeats"] or K > NB:
        ids = torch.randint(0, max(NB, 1), (B, Hk, K), generator=gen)
    else:
        ids = torch.rand(B, Hk, NB, generator=gen).argsort(-1)[..., :K].sort(-1).values
    indices = _int_tensor(b, "indices", ids.to(torch.int64), p, device, -7)
    valid = _block_mask(p, gen, (B, NB, S), device)
    names = ("q", "block_keys", "block_values")
    args = dict(q=q, block_keys=block_keys, block_values=block_values, indices=indices, block_valid=valid,
                scale=p["scale"], backend=backend)
    case = Case("block_read", backend, dtype, args, names + ("indices",), diff_inputs=names,
                judge=judge_block_read, built=b)
    m = p["mutation"]
    if m == "q-rank":
        args["q"], case.must_raise = q.flatten(0, 1), _bad([ValueError], ["q"], "3-D q")
    elif m == "block_keys-heads":
        bad = _non_divisor(H)
        args["block_keys"] = torch.zeros(B, bad, NB, S, D, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["block_keys"], f"Hk = {bad} does not divide H = {H}")
    elif m == "block_values-size":
        args["block_values"] = torch.zeros(B, Hk, NB, S + 1, Dv, dtype=dtype, device=device)
        case.must_raise = _bad([ValueError], ["block_values"], "block_values with S + 1 tokens")
    elif m == "indices-shape":
        args["indices"] = torch.zeros(B, Hk + 1, K, dtype=torch.int64, device=device)
        case.must_raise = _bad([ValueError], ["indices"], "indices with Hk + 1 heads")
    elif m == "indices-dtype":
        args["indices"] = ids.to(torch.int32).to(device)
        case.must_raise = _bad([TypeError], ["indices"], "int32 indices")
    elif m in ("indices-high", "indices-low"):
        # (With B = 0 there is no id to check: the batch size of the indices is then the error.)
        bad = NB if m == "indices-high" else -1
        args["indices"] = torch.full((max(B, 1), Hk, max(K, 1)), bad, dtype=torch.int64, device=device)
        case.must_raise = _bad([IndexError, ValueError], ["indices"], f"a block id = {bad}")
    elif m == "block_valid-shape":
        args["block_valid"] = torch.ones(B, NB, S + 1, dtype=torch.bool, device=device)
        case.must_raise = _bad([ValueError], ["block_valid"], "block_valid with S + 1 tokens")
    return case


def _quantized_keys(p, gen):
    """int8 keys (Hm, N, Dk) as ``p["keys"]`` asks (see registry.quantized_case); small integers for
    exact data."""
    Hm, N, Dk = p["Hm"], p["N"], p["Dk"]
    if p["mode"] == "int":
        keys = torch.randint(-3, 4, (Hm, N, Dk), generator=gen)
    elif p["keys"] == "extremes":
        keys = torch.where(torch.rand(Hm, N, Dk, generator=gen) < 0.5, -127, 127)
        keys = torch.where(torch.rand(Hm, N, Dk, generator=gen) < 0.2, torch.randint(-127, 128, (Hm, N, Dk),
                                                                                     generator=gen), keys)
    else:
        keys = torch.randint(-127, 128, (Hm, N, Dk), generator=gen)
    if p["keys"] == "ties" and N > 1:
        pairs = N // 2 * 2
        keys[:, 1:pairs:2] = keys[:, 0:pairs:2]
    return keys.to(torch.int8)


def _positive_scales(p, gen, shape, spread):
    """float32 scales > 0: around ``spread``, or powers of two with exact data (exact scores)."""
    if p["mode"] == "int":
        return torch.pow(2.0, -torch.randint(0, 3, shape, generator=gen).float())
    return (0.5 + torch.rand(shape, generator=gen)) * spread


def build_quantized_read(p, backend, device, gen):
    dtype = NAMED_DTYPES[p["dtype"]]
    B, H, Hm, T, N, Dk, Dv, k = (p[n] for n in ("B", "H", "Hm", "T", "N", "Dk", "Dv", "k"))
    b = Built()
    q = _float_tensor(b, gen, "q", (B, H, T, Dk), dtype, p, device, bdims=(0,))
    # Integer and scale tensors in the drawn layouts (their padding poisons: -128 keys, NaN scales,
    # NaN float8 bytes); stride-0 expansion applies to none of them (each slot is its own entry).
    keys = _int_tensor(b, "keys", _quantized_keys(p, gen), p, device, -128)
    # Keys of a few units: 127 * scale(1/100) = 1.3 per channel.
    key_scale = _int_tensor(b, "key_scale", _positive_scales(p, gen, (Hm, Dk), 0.01), p, device, float("nan"))
    fmt = p["values"]
    value_scale = None
    if fmt == "int8":
        stored = torch.randint(-4, 5, (Hm, N, Dv), generator=gen) if p["mode"] == "int" else \
            torch.randint(-127, 128, (Hm, N, Dv), generator=gen)
        values = _int_tensor(b, "values", stored.to(torch.int8), p, device, -128)
    elif fmt == "float8":
        floats = (_data(gen, (Hm, N, Dv), "normal", p["mode"], torch.float32) * 100).clamp(-448, 448)
        stored = floats.to(torch.float8_e4m3fn).view(torch.uint8)
        values = _int_tensor(b, "values", stored, p, device, 0x7F).view(torch.float8_e4m3fn)  # 0x7F: NaN
    else:
        values = _float_tensor(b, gen, "values", (Hm, N, Dv), dtype if fmt == "q" else NAMED_DTYPES[fmt], p, device)
    if fmt in ("int8", "float8"):
        value_scale = _int_tensor(b, "value_scale", _positive_scales(p, gen, (Hm, N), 0.01), p, device,
                                  float("nan"))
    args = dict(q=q, keys=keys, key_scale=key_scale, values=values, k=k, value_scale=value_scale, scale=p["scale"],
                backend=backend)
    case = Case("quantized_topk_read", backend, dtype, args, ("q", "keys", "key_scale", "values", "k"),
                diff_inputs=("q",), judge=judge_quantized_read, built=b, extra=dict(exact=p["mode"] == "int"))
    m = p["mutation"]
    i8 = dict(dtype=torch.int8, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    if m == "q-rank":
        args["q"], case.must_raise = q.flatten(0, 1), _bad([ValueError], ["q"], "3-D q")
    elif m == "q-int":
        args["q"] = torch.ones(q.shape, dtype=torch.int64, device=device)
        case.must_raise = _bad([TypeError], ["q"], "q is int64")
    elif m == "keys-rank":
        args["keys"], case.must_raise = keys.unsqueeze(0), _bad([ValueError], ["keys"], "4-D keys")
    elif m == "keys-dk":
        args["keys"] = torch.zeros(Hm, N, Dk + 1, **i8)
        case.must_raise = _bad([ValueError], ["keys"], "keys with Dk + 1")
    elif m == "keys-heads":
        bad = _non_divisor(H)
        args.update(keys=torch.zeros(bad, N, Dk, **i8), key_scale=torch.ones(bad, Dk, **f32),
                    values=torch.zeros(bad, N, Dv, device=device), value_scale=None)
        case.must_raise = _bad([ValueError], ["keys"], f"Hm = {bad} does not divide H = {H}")
    elif m == "keys-min":
        bad = keys.clone()
        bad[-1, -1, -1] = -128
        args["keys"], case.must_raise = bad, _bad([ValueError], ["keys"], "a key element is -128")
    elif m == "n-zero":
        args.update(keys=torch.zeros(Hm, 0, Dk, **i8), values=torch.zeros(Hm, 0, Dv, device=device),
                    value_scale=None)
        case.must_raise = _bad([ValueError], ["keys", "k"], "N = 0 leaves no valid k")
    elif m == "key_scale-shape":
        args["key_scale"] = torch.ones(Hm, Dk + 1, **f32)
        case.must_raise = _bad([ValueError], ["key_scale"], "key_scale with Dk + 1 channels")
    elif m == "key_scale-dtype":
        args["key_scale"] = key_scale.double()
        case.must_raise = _bad([TypeError], ["key_scale"], "float64 key_scale")
    elif m in ("key_scale-zero", "key_scale-nan"):
        bad = key_scale.clone()
        bad[-1, -1] = 0.0 if m == "key_scale-zero" else float("nan")
        args["key_scale"], case.must_raise = bad, _bad([ValueError], ["key_scale"], f"a channel scale is {bad[-1, -1]}")
    elif m == "values-n":
        args.update(values=torch.zeros(Hm, N + 1, Dv, device=device), value_scale=None)
        case.must_raise = _bad([ValueError], ["values"], "values with N + 1 slots")
    elif m == "values-int32":
        args.update(values=torch.zeros(Hm, N, Dv, dtype=torch.int32, device=device), value_scale=None)
        case.must_raise = _bad([TypeError], ["values"], "int32 values")
    elif m == "value_scale-missing":
        args.update(values=torch.zeros(Hm, N, Dv, **i8), value_scale=None)
        case.must_raise = _bad([ValueError], ["value_scale"], "int8 values without value_scale")
    elif m == "value_scale-extra":
        args.update(values=torch.zeros(Hm, N, Dv, device=device), value_scale=torch.ones(Hm, N, **f32))
        case.must_raise = _bad([ValueError], ["value_scale"], "float values with a value_scale")
    elif m == "value_scale-shape":
        args.update(values=torch.zeros(Hm, N, Dv, **i8), value_scale=torch.ones(Hm, N + 1, **f32))
        case.must_raise = _bad([ValueError], ["value_scale"], "value_scale with N + 1 entries")
    elif m == "value_scale-dtype":
        args.update(values=torch.zeros(Hm, N, Dv, **i8), value_scale=torch.ones(Hm, N, dtype=torch.float64,
                                                                                device=device))
        case.must_raise = _bad([TypeError], ["value_scale"], "float64 value_scale")
    elif m == "k-zero":
        args["k"], case.must_raise = 0, _bad([ValueError], ["k"], "k = 0")
    elif m == "k-over":
        args["k"], case.must_raise = N + 1, _bad([ValueError], ["k"], "k = N + 1")
    elif m == "k-float":
        args["k"], case.must_raise = float(k), _bad([TypeError], ["k"], "k is a float")
    elif m == "scale-tensor":
        args["scale"], case.must_raise = torch.tensor(0.5), _bad([TypeError], ["scale"], "scale is a tensor")
    return case


BUILDERS = {
    "topk_memory_read": build_topk,
    "product_key_read": build_product_key,
    "gated_memory_write": build_write,
    "gated_dense_update": build_dense,
    "merge_attention": build_merge,
    "gated_merge": build_gated_merge,
    "memory_attention": build_attention,
    "block_topk": build_block_topk,
    "block_read": build_block_read,
    "quantized_topk_read": build_quantized_read,
}


# ------------------------------------------------------------------------------------------------
# Running one case.
# ------------------------------------------------------------------------------------------------

def backend_device(backend: str) -> torch.device:
    """The device a backend's fuzz cases run on: CUDA for cuda (and for triton when there is a GPU)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def backend_unavailable(op: str, backend: str) -> str | None:
    """Why ``backend`` cannot run ``op`` here at all (None when it can, for some dtype)."""
    b = BACKENDS[backend]
    if backend == "cuda" and not torch.cuda.is_available():
        return "cuda: needs a CUDA device"
    reasons = b.not_supported_reasons(op, backend_device(backend), torch.float32)
    return "; ".join(reasons) or None


def build_case(op: str, backend: str, params: dict, device=None) -> Case:
    """The case the parameters describe (deterministic: the tensor data come from ``params['seed']``)."""
    device = backend_device(backend) if device is None else torch.device(device)
    gen = torch.Generator().manual_seed(int(params["seed"]))
    mutation = params.get("mutation")
    shared_mutation = mutation == "backend-name" or mutation in OTHER_DTYPE_MUTATIONS
    case = BUILDERS[op](dict(params, mutation=None) if shared_mutation else params, backend, device, gen)
    if mutation == "backend-name":
        case.args["backend"] = "no-such-backend"
        case.must_raise = _bad([ValueError], ["backend"], "unknown backend")
    elif shared_mutation:
        name, why = OTHER_DTYPE_MUTATIONS[mutation]
        case.args[name] = case.args[name].detach().to(_other_float(case.dtype))
        case.must_raise = _bad([TypeError], [name], why)
    case.extra["gen"] = gen
    dtype_ok = case.dtype in BACKENDS[backend].dtypes
    if not dtype_ok:
        refusal = _bad([NotImplementedError], BACKEND_NAMES + (backend,), f"{backend} has no {case.dtype}")
        if case.must_raise is None:
            case.must_raise = refusal
        else:   # validation may come first or not: either clear error will do
            case.may_raise.append(refusal)
    if case.must_raise is None and params.get("grad") and _finite_inputs(case):
        case.check_grad = case.check_grad or not case.args.get("inplace", False)
    if case.check_grad:
        _differentiable(case.built, case.diff_inputs)
        for name in case.diff_inputs:
            case.args[name] = case.built.views[name]
    return case


# ------------------------------------------------------------------------------------------------
# Valid calls of every op, for the suites derived from the declarations (the fake kernels' strides,
# torch.library.opcheck): no test lists an op's inputs by hand.
# ------------------------------------------------------------------------------------------------

def drawn_params(op: str, backend: str, *, mutation: str | None = None, strided: bool = False):
    """The strategy of ``op``'s calls on ``backend`` with no NaN or infinity and gradients wanted:
    valid ones, or with ``mutation`` (one of ``MUTATIONS[op]``) the invalid argument it
    names; ``strided``: at least one tensor is not contiguous (a transposed, sliced or stride-0
    view, as models produce them)."""
    drawn = STRATEGIES[op](backend).map(
        lambda p: dict(p, mutation=mutation, specials=[], mode="normal", grad=True))
    return drawn.filter(lambda p: any(v != "contiguous" for v in p["layouts"].values())) if strided else drawn


def each_case(op: str, backend: str, check: Callable, *, examples: int, mutation: str | None = None,
              strided: bool = False, device=None):
    """Build ``examples`` cases of ``op`` on ``backend`` from :func:`drawn_params` (the same ones on
    every run) and call ``check(case)`` on each; a valid case the backend refuses (e.g. its dtype)
    is drawn again."""

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(params=drawn_params(op, backend, mutation=mutation, strided=strided))
    def holds(params):
        note(f"case: l2m_kernels.fuzz.build_case({op!r}, {backend!r}, {params!r})")
        case = build_case(op, backend, params, device)
        assume(mutation is not None or case.must_raise is None)
        check(case)

    holds()


def custom_op_call(case: Case):
    """The ``torch.ops.l2m`` overload a built case reaches and its arguments in the declared schema's
    order (the in-place variant ``<name>_`` for an in-place write)."""
    values = tuple(case.args[arg.name] if arg.name in case.args else ast.literal_eval(arg.default)
                   for arg in registry.OPS[case.op].args)
    name = case.op + ("_" if case.args.get("inplace") else "")
    return getattr(torch.ops.l2m, name).default, values


@dataclasses.dataclass
class KnownFailure:
    """A bug the fuzzer found whose fix is pending: its cases count as "known" instead of failing.

    ``matches(op, backend, params)`` selects the cases it can affect; such a case still runs, and
    counts as ok when it passes. Remove the entry with the fix (tests/test_fuzz.py keeps one strict
    xfail reproducer per entry, which then starts to pass and fails the suite as a reminder).
    """

    name: str
    description: str
    matches: Callable
    reproducer: tuple   # (op, backend, params) that fails until the fix


KNOWN_FAILURES: list = []

# Cases that once failed, kept as fixed reproducers: (name, what was wrong, (op, backend, params)).
REGRESSIONS: list = [
    ("block-read-dq-cancelling",
     "a tolerance too tight for the fuzzer's own check: block_read's dq at D = 1 over 11 repeated "
     "one-token blocks is a sum of dS_j k_j whose dS_j = p_j (dP_j - delta) cancel; the kernel's "
     "float32 rounding of them exceeded 1e-5 by 7%; the allowed error of dq and dblock_keys now counts "
     "the terms p_j (|dP_j| + |delta|) of each dS_j",
     ("block_read", "cpu", {"dtype": "float32", "seed": 548, "layouts": {}, "specials": [], "mode": "normal",
                            "grad": True, "mutation": None, "B": 1, "T": 1, "NB": 11, "S": 1, "D": 1, "Dv": 1,
                            "Hk": 1, "H": 1, "k": 11, "valid": None, "repeats": True, "strided": False,
                            "ties": True, "scale": 0.5, "R": 1})),
    ("pk-inf-tie-order",
     "a rule too strict in the fuzzer's own check: a product-key read orders candidates of equal "
     "(here infinite) score by their sub-keys' ranks, not by slot, so the top-k read's exact-tie "
     "rule of testing.assert_valid_topk does not apply to it (ties=False)",
     ("product_key_read", "cpu", {"dtype": "float32", "seed": 0, "layouts": {"q": "contiguous", "subkeys": "contiguous",
                                                                          "values": "contiguous"},
                                  "specials": [("q", "inf", 1)], "mode": "int", "grad": False, "mutation": None,
                                  "B": 1, "H": 1, "T": 1, "half": 1, "Dv": 1, "n_sub": 17, "k_sub": 17, "k": 289,
                                  "sum_heads": False, "sparse_grad": False, "pass_k_sub": True,
                                  "deterministic": False, "scale": 0.5})),
    ("pk-out-cancelling-sum",
     "a tolerance too tight for the fuzzer's own check: out = sum of k = 289 entries over 2 heads whose "
     "terms cancel (|out| = sum |terms| / 36), summed in order in float32 by the kernel, pairwise by "
     "PyTorch; the allowed error of a read's out now counts its terms, as a gradient's does",
     ("product_key_read", "cpu", {"dtype": "float32", "seed": 1, "layouts": {}, "specials": [], "mode": "int",
                                  "grad": False, "mutation": None, "B": 1, "H": 2, "T": 1, "half": 1, "Dv": 1,
                                  "n_sub": 17, "k_sub": 17, "k": 289, "sum_heads": True, "sparse_grad": False,
                                  "pass_k_sub": True, "deterministic": False, "scale": 0.5})),
    ("pk-triton-dk0-deterministic",
     "product_key_read's deterministic triton backward with Dk = 0 raised a RuntimeError viewing the "
     "empty sub-key gradient as (-1, 0)",
     ("product_key_read", "triton", {"dtype": "float32", "seed": 0, "layouts": {}, "specials": [],
                                     "mode": "normal", "grad": True, "mutation": None, "B": 1, "H": 1, "T": 1,
                                     "half": 0, "Dv": 1, "n_sub": 1, "k_sub": 1, "k": 1, "sum_heads": False,
                                     "sparse_grad": False, "pass_k_sub": False, "deterministic": True,
                                     "scale": None})),
    ("topk-expanded-q-k256",
     "a tolerance too tight for the fuzzer's own check: the gradient of a stride-0 query at k = N = "
     "256 with integer data (ties, so dq's k products cancel) exceeded the 8-rounding term budget "
     "by 1.4% (1.014e-05 against 1e-05); the budget is 16 roundings",
     ("topk_memory_read", "cpu", {"dtype": "float32", "seed": 1, "layouts": {"q": "expanded"}, "specials": [],
                                  "mode": "int", "grad": True, "mutation": None, "B": 2, "Hm": 3, "T": 1,
                                  "Dk": 1, "Dv": 20, "H": 3, "N": 256, "shared": True, "deterministic": False,
                                  "k": 256, "valid_len": None, "scale": 0.5})),
    ("zero-heads-divisor",
     "the fuzzer's own bug: with H = 0 its 'Hm = H + 1' mutation was a valid call (1 divides 0), "
     "taken for an accepted invalid argument; a zero head count is the invalid one there",
     ("memory_attention", "cpu", {"dtype": "float32", "seed": 0, "layouts": {}, "specials": [], "mode": "normal",
                                  "grad": False, "mutation": "k-heads", "B": 1, "Hkv": 1, "Hm": 1, "T": 1, "D": 1,
                                  "Dv": 1, "H": 0, "S": 1, "N": 256, "shared": False, "merge": "joint",
                                  "window": None, "gate": None, "deterministic": False, "topk": 1,
                                  "valid_len": None, "scale": None})),
    ("dk0-default-scale",
     "a query/key size of 0 with the default scale raised ZeroDivisionError (0 ** -0.5)",
     ("topk_memory_read", "cpu", {"dtype": "float32", "seed": 0, "layouts": {}, "specials": [], "mode": "normal",
                                  "grad": False, "mutation": None, "B": 1, "Hm": 1, "H": 1, "T": 1, "N": 2,
                                  "Dk": 0, "Dv": 1, "shared": False, "deterministic": False, "k": 1,
                                  "valid_len": None, "scale": None})),
    ("autocast-promote-non-tensor",
     "gated_dense_update with a Python float for a tensor raised AttributeError, not a TypeError naming it",
     ("gated_dense_update", "cpu", {"dtype": "float32", "seed": 0, "layouts": {}, "specials": [],
                                    "mode": "normal", "grad": False, "mutation": "not-a-tensor", "full": (3,),
                                    "shapes": {"memory": (3,), "update": (3,), "input_gate": (3,),
                                               "forget_gate": (3,)}})),
    ("attn-gate-cancelling-parts",
     "a tolerance too tight for the fuzzer's own check: with merge='gate', dgate = g (1 - g) <dout, "
     "out_mem - out_local>, and the fused triton kernels compute out_local with bfloat16 probabilities "
     "(as FlashAttention does), one ulp of out_local; the parts here are 8 times their difference, so "
     "that ulp was 2.7% of dgate (allowed 1.6%); the allowed error of a gate's gradient now counts "
     "the parts' sizes",
     ("memory_attention", "triton", {"dtype": "bfloat16", "seed": 504291,
                                     "layouts": {"q": "contiguous", "k": "expanded", "v": "contiguous",
                                                 "mem_keys": "transposed", "mem_values": "contiguous",
                                                 "gate": "contiguous", "valid_len": "contiguous"},
                                     "specials": [], "mode": "normal", "grad": True, "mutation": None, "B": 2,
                                     "Hkv": 2, "Hm": 1, "T": 1, "D": 7, "Dv": 1, "H": 2, "S": 2, "N": 3,
                                     "shared": True, "merge": "gate", "window": None, "gate": (2, 2, 1, 1),
                                     "deterministic": False, "topk": 1, "valid_len": None, "scale": None})),
    ("pk-sparse-grad-one-entry",
     "product_key_read's sparse values gradient of one entry aliased the backward op's indices input",
     ("product_key_read", "triton", {"dtype": "float32", "seed": 0, "layouts": {}, "specials": [],
                                     "mode": "normal", "grad": True, "mutation": None, "B": 1, "H": 1,
                                     "T": 1, "half": 1, "n_sub": 2, "Dv": 1, "k_sub": 1, "k": 1,
                                     "sum_heads": False, "sparse_grad": True, "pass_k_sub": False,
                                     "deterministic": False, "scale": None})),
]


def _known_failure(op, backend, params):
    return next((k for k in KNOWN_FAILURES if k.matches(op, backend, params)), None)


def _describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a contiguous tensor (NaN compares equal to itself)."""
    t = t.detach()
    return t.view(_BITS[t.element_size()]).cpu().clone() if t.is_floating_point() else t.cpu().clone()


def _snapshot(case) -> dict:
    return {name: _bits(base) for name, base in case.built.bases.items()}


def _check_untouched(case, snapshot, written: bool):
    """Inputs are read-only; an in-place write (``written``) changes its memory only inside the view."""
    for name, before in snapshot.items():
        base = case.built.bases[name]
        after = _bits(base)
        if written and name == "memory":
            inside = torch.zeros(base.shape, dtype=torch.bool)
            _view(inside, case.args["memory"].shape, case.built.layouts[name]).fill_(True)
            if not torch.equal(before[~inside], after[~inside]):
                raise FuzzFailure("memory: the in-place write changed elements outside the memory view "
                                  f"(layout {case.built.layouts[name]})")
        elif not torch.equal(before, after):
            raise FuzzFailure(f"{name}: the op modified an input (layout {case.built.layouts[name]})")


def run_case(op: str, backend: str, params: dict, device=None, known: bool = True) -> str:
    """Build and run one case; return its outcome ("ok", "ok+grad", "refused", "rejected", or
    "known" for a failure listed in :data:`KNOWN_FAILURES` when ``known``) or raise
    :class:`FuzzFailure` (or the AssertionError of a mismatch) when the property does not hold."""
    entry = _known_failure(op, backend, params) if known else None
    if entry is None:
        return _run_case(op, backend, params, device)
    try:
        return _run_case(op, backend, params, device)
    except Exception:  # the listed bug (or one hiding behind it): reported by the summary
        return "known:" + entry.name


def _run_case(op, backend, params, device):
    return run_built(build_case(op, backend, params, device))


def run_built(case: Case) -> str:
    """Run a built case and judge it as :func:`run_case` does (its outcome, or FuzzFailure)."""
    op, backend = case.op, case.backend
    gen = case.extra["gen"]
    expected = ([case.must_raise] if case.must_raise else []) + case.may_raise
    snapshot = _snapshot(case)
    with warnings.catch_warnings(), poisoned_outputs():
        # The interpreter's numpy warns on inf - inf; the values are judged below.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        try:
            if case.check_grad:
                result = case.call()
            else:
                with torch.no_grad():
                    result = case.call()
        except Exception as exc:  # judged below: only the documented errors pass
            message = str(exc)
            for want in expected:
                if isinstance(exc, want.types) and names_argument(message, want.names):
                    _check_untouched(case, snapshot, written=False)   # refused before any write
                    return "refused" if isinstance(exc, NotImplementedError) else "rejected"
            wants = "; ".join(f"{'/'.join(t.__name__ for t in w.types)} naming {' or '.join(w.names)} "
                              f"({w.why})" for w in expected) or "no exception"
            raise FuzzFailure(f"{op} on {backend} raised {_describe_exception(exc)}; expected {wants}") from exc
        if case.must_raise is not None:
            w = case.must_raise
            raise FuzzFailure(f"{op} on {backend} accepted an invalid argument ({w.why}); expected "
                              f"{'/'.join(t.__name__ for t in w.types)} naming {' or '.join(w.names)}")
        _check_untouched(case, snapshot, written=bool(case.args.get("inplace")))
        case.judge(case, result, gen)
    return "ok+grad" if case.check_grad else "ok"


def run_judged(case: Case) -> dict:
    """Run a valid built case as :func:`run_built` does, but judge every output and gradient rather
    than stop at the first mismatch: ``{name: Judged}`` (``l2m-check``'s table). A wrong shape,
    dtype or selection, an exception or a modified input still raises."""
    judged = {}
    token = _JUDGED.set(judged)
    try:
        run_built(case)
    finally:
        _JUDGED.reset(token)
    return judged


# The parameters every declared case (registry ``Cases``: l2m-check's edge and random cases, the
# wide cases) leaves to these defaults: contiguous tensors of normal data, no NaN/inf, gradients
# checked, no invalid argument, the default scale, atomic (non-deterministic) gradients.
DECLARED_DEFAULTS = dict(layouts={}, specials=(), mode="normal", grad=True, mutation=None, scale=None,
                         deterministic=False)


def declared_case(op: str, backend: str, params: dict, dtype: torch.dtype, seed: int, device=None) -> Case:
    """The case of a declared shape (``registry.OPS[op].cases``, written in this module's parameter
    names) at ``dtype``, its data from ``seed``."""
    full = dict(DECLARED_DEFAULTS, **params, dtype=DTYPE_NAMES[dtype], seed=seed)
    return build_case(op, backend, full, device)


# ------------------------------------------------------------------------------------------------
# Hypothesis runs and statistics.
# ------------------------------------------------------------------------------------------------

OUTCOMES = ("ok", "ok+grad", "rejected", "refused", "known")


class Stats:
    """Case counts per (op, backend, outcome) and seconds per (op, backend)."""

    def __init__(self):
        self.counts = collections.Counter()
        self.seconds = collections.Counter()
        self.known = collections.Counter()   # (op, backend, known failure name) -> cases

    def add(self, op, backend, outcome, seconds=0.0):
        if outcome.startswith("known:"):
            self.known[(op, backend, outcome[len("known:"):])] += 1
            outcome = "known"
        self.counts[(op, backend, outcome)] += 1
        self.seconds[(op, backend)] += seconds

    def total(self, op=None, backend=None) -> int:
        return sum(n for (o, b, _), n in self.counts.items()
                   if (op is None or o == op) and (backend is None or b == backend))

    def table(self) -> str:
        pairs = sorted({(o, b) for o, b, _ in self.counts}, key=lambda p: (OPS.index(p[0]), p[1]))
        head = ["op", "backend", "cases"] + list(OUTCOMES) + ["seconds"]
        rows = [[o, b, str(self.total(o, b))] + [str(self.counts[(o, b, c)]) for c in OUTCOMES]
                + [f"{self.seconds[(o, b)]:.1f}"] for o, b in pairs]
        rows.append(["total", "", str(self.total())] + [str(sum(self.counts[(o, b, c)] for o, b in pairs))
                                                         for c in OUTCOMES]
                    + [f"{sum(self.seconds.values()):.1f}"])
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        descriptions = {k.name: k.description for k in KNOWN_FAILURES}
        for (o, b, name), n in sorted(self.known.items()):
            lines.append(f"known failure {name} ({o} on {b}): {n} cases: {descriptions.get(name, '')}")
        return "\n".join(lines)


def profile_settings(profile: str, backend: str, seed: int | None = None) -> settings:
    """Hypothesis settings of a profile ("ci": fixed seeds; "long": random seeds) for ``backend``."""
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
    return settings(max_examples=PROFILES[profile][backend], deadline=None, database=None,
                    derandomize=False, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def fuzz(op: str, backend: str, *, profile: str = "ci", seed: int | None = None, stats: Stats | None = None,
         max_examples: int | None = None, shrink: bool = True, device=None) -> Stats:
    """Run the property over hypothesis-drawn cases of ``op`` on ``backend``; raises on the first
    failure (shrunk to a minimal case unless ``shrink=False``; the message holds the reproducer).

    ``profile="ci"`` uses a fixed seed per (op, backend) unless ``seed`` is given; ``"long"`` draws
    a fresh one. ``max_examples`` overrides the profile's count.
    """
    stats = Stats() if stats is None else stats
    config = profile_settings(profile, backend)
    if max_examples is not None:
        config = settings(config, max_examples=max_examples)
    if not shrink:
        config = settings(config, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    if seed is None and profile == "ci":
        seed = zlib.crc32(f"l2m-fuzz/{op}/{backend}".encode())

    @config
    @given(params=STRATEGIES[op](backend))
    def property_holds(params):
        note(f"reproduce: l2m_kernels.fuzz.run_case({op!r}, {backend!r}, {params!r})")
        start = time.perf_counter()
        outcome = run_case(op, backend, params, device)
        stats.add(op, backend, outcome, time.perf_counter() - start)

    if seed is not None:
        property_holds = hypothesis_seed(seed)(property_holds)
    property_holds()
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2m_kernels.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="long",
                        help="cases per op and backend: " + "; ".join(
                            f"{name}: " + ", ".join(f"{b} {n}" for b, n in counts.items())
                            for name, counts in PROFILES.items()))
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all)")
    parser.add_argument("--backends", default="reference,cpu,triton,cuda",
                        help="comma-separated backends; unavailable ones are reported and skipped")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: ci fixed, long random)")
    parser.add_argument("--examples", type=int, default=None, help="cases per op and backend (overrides the profile)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and argv is None:
        # Triton decorates its own kernels (triton.language) when it is imported, which importing
        # this package has done: the interpreter needs the variable before that, so start afresh.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "l2m_kernels.fuzz", *sys.argv[1:]])
    stats, failures = Stats(), []
    start = time.perf_counter()
    for op in args.ops.split(","):
        for backend in args.backends.split(","):
            why = backend_unavailable(op, backend)
            if why:
                print(f"{op} / {backend}: skipped ({why})", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                fuzz(op, backend, profile=args.profile, seed=args.seed, stats=stats, max_examples=args.examples)
                status = "passed"
            except Exception as exc:  # report and go on with the other ops
                failures.append((op, backend, exc))
                status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"{op} / {backend}: {stats.total(op, backend)} cases, {time.perf_counter() - t0:.0f} s, "
                  f"{status}", flush=True)
    print()
    print(stats.table())
    print(f"\n{stats.total()} cases in {time.perf_counter() - start:.0f} s, {len(failures)} failing op/backend pairs")
    for op, backend, exc in failures:
        print(f"\n=== {op} / {backend}")
        for error in getattr(exc, "exceptions", [exc]):   # hypothesis groups distinct failures
            print(f"{type(error).__name__}: {error}")
            for line in getattr(error, "__notes__", []):
                if line.startswith("reproduce:"):
                    print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
