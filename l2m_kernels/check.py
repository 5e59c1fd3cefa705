"""``l2m-check`` (``python -m l2m_kernels.check``): every op on every fused backend of this machine
against the float64 reference, forward and backward, at random and edge-case shapes.

Run it after installing on a new machine (GPU or CPU). For each op, each fused backend that can
serve it on ``--device`` and each dtype that backend supports, it draws inputs at a few shapes
(fixed edge cases plus random shapes seeded by ``--seed``), runs the public function with
``backend=<name>``, backpropagates random cotangents, and compares every output and every gradient
with :mod:`l2m_kernels`' reference evaluated in float64 on the same (rounded) inputs. The error is
the relative RMS error ``rms(fused - ref) / rms(ref)`` (:func:`l2m_kernels.testing.rel_rms_error`),
judged against the per-dtype tolerance :data:`l2m_kernels.testing.TOLERANCE`.

Selections (top-k slots) may legitimately differ from the reference where scores tie up to
rounding, so the reads are judged as the test suite does: the slot ids must be a valid top-k of
the float64 scores (:func:`l2m_kernels.testing.assert_valid_topk`: in range, existing, never twice
in a row, in descending order, up to the rounding of float32 scores), the float64 scores of the
selected slots must match those of the float64 reference's own top-k ("selection"), and the
values, weights, lse and gradients are compared with the reference evaluated at the fused
selection.

Fused outputs are pre-filled with NaN (:func:`l2m_kernels.testing.poisoned_outputs`), so an
element a kernel forgets to write fails. A backend that raises is reported as FAIL with the
exception, and the check goes on. Exit status 1 when anything fails (or nothing could be checked).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import traceback
import warnings
import zlib

import torch

import l2m_kernels as l2m

from . import __version__
from .backends import BACKENDS, OPS, triton_interpret_enabled
from .ops import registry
from .ops.memory_attention.reference import memory_attention_gather
from .ops.memory_write.reference import gated_dense_update_ref, gated_memory_write_ref
from .ops.merge.reference import gated_merge_ref, merge_attention_ref
from .ops.product_key.reference import product_key_gather, product_key_select
from .ops.topk_read.reference import full_scores, topk_read_gather, topk_read_select
from .testing import (TOLERANCE, assert_valid_topk, lse_dtype, poisoned_outputs, product_key_scores, rand,
                      rel_rms_error)

FUSED_BACKENDS = ("cuda", "triton", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in DTYPES}


class CheckError(AssertionError):
    """A structural problem with a fused result: wrong shape, dtype, layout or an invalid selection."""


# ------------------------------------------------------------------------------------------------
# Input factories: drawn on the CPU from one generator (the same inputs for every backend), then
# moved to the device.
# ------------------------------------------------------------------------------------------------

def _normal(gen, shape, dtype, device, scale=1.0, requires_grad=True):
    t = rand(*shape, dtype=dtype, generator=gen, scale=scale).to(device)
    return t.requires_grad_(requires_grad)


def _unit(gen, shape, dtype, device, requires_grad=True):
    """Uniform in (0, 1), never exactly 0: gates, write weights, erase strengths."""
    base = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(tuple(shape), dtype=base, generator=gen).clamp_min(1e-3).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def _lse(gen, shape, dtype, device):
    return (torch.randn(tuple(shape), dtype=lse_dtype(dtype), generator=gen) * 3.0).to(device)


def _cotangent(gen, like):
    return rand(*like.shape, dtype=like.dtype, generator=gen).to(like.device)


def _leaves64(*tensors):
    return [t.detach().to(torch.float64).cpu().requires_grad_() for t in tensors]


def _expect(name, tensor, shape, dtype):
    if tuple(tensor.shape) != tuple(shape):
        raise CheckError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise CheckError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")


def _grad_pairs(names, grads, ref_grads, inputs):
    pairs = []
    for name, grad, ref_grad, leaf in zip(names, grads, ref_grads, inputs):
        if grad is None:
            raise CheckError(f"{name}: no gradient")
        if grad.layout != torch.strided:
            raise CheckError(f"{name}: expected a dense gradient, got layout {grad.layout}")
        _expect(name, grad, leaf.shape, leaf.dtype)
        pairs.append((name, grad, ref_grad))
    return pairs


def _assert_valid_selection(slot_ids, scores, dtype, **masks):
    """:func:`l2m_kernels.testing.assert_valid_topk` (ids in range, existing, never twice, the count
    of real entries, a top-k in descending order up to the rounding of the kernels' float32 scores,
    exact ties to the smaller slot) as a :class:`CheckError`."""
    try:
        assert_valid_topk(slot_ids, scores, score_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          name="indices", **masks)
    except AssertionError as exc:
        raise CheckError(str(exc)) from None


def _selected_scores(slot_scores, slot_ids):
    """The float64 scores of the selected slots, sorted descending (-inf for missing entries)."""
    picked = slot_scores.gather(-1, slot_ids.clamp_min(0))
    picked = torch.where(slot_ids < 0, float("-inf"), picked)
    return picked.sort(dim=-1, descending=True).values


def _topk_selection_pair(q, keys, slot_ids, k, scale, valid_len):
    """("selection", scores of the fused slots, scores of the float64 reference's top-k)."""
    q64, keys64 = q.detach().double().cpu(), keys.detach().double().cpu()
    scores = full_scores(q64, keys64, scale)
    _assert_valid_selection(slot_ids, scores, q.dtype, valid_len=valid_len)
    best = topk_read_select(q64, keys64, k, scale, valid_len)
    return ("selection", _selected_scores(scores, slot_ids), _selected_scores(scores, best))


# ------------------------------------------------------------------------------------------------
# One check per op: run the fused path, return [(name, fused tensor, float64 reference tensor)].
# ------------------------------------------------------------------------------------------------

def check_merge_attention(p, dtype, device, backend, gen):
    B, H, T, D = p["shape"]
    out_a = _normal(gen, (B, H, T, D), dtype, device, requires_grad=False)
    out_b = _normal(gen, (B, H, T, D), dtype, device, requires_grad=False)
    lse_a, lse_b = _lse(gen, (B, H, T), dtype, device), _lse(gen, (B, H, T), dtype, device)
    if T >= 3:  # one side empty, the other side empty, both empty
        lse_a[..., 0] = float("-inf")
        lse_b[..., 1] = float("-inf")
        lse_a[..., 2] = lse_b[..., 2] = float("-inf")
    inputs = [t.requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = l2m.merge_attention(*inputs, backend=backend)
    _expect("out", out, (B, H, T, D), dtype)
    _expect("lse", lse, (B, H, T), lse_dtype(dtype))
    cots = [_cotangent(gen, out), _cotangent(gen, lse)]
    grads = torch.autograd.grad((out, lse), inputs, cots)
    leaves = _leaves64(*inputs)
    ref = merge_attention_ref(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, [c.double().cpu() for c in cots])
    return ([("out", out, ref[0]), ("lse", lse, ref[1])]
            + _grad_pairs(("d_out_a", "d_lse_a", "d_out_b", "d_lse_b"), grads, ref_grads, inputs))


def check_gated_merge(p, dtype, device, backend, gen):
    B, H, T, D = p["shape"]
    inputs = [_normal(gen, (B, H, T, D), dtype, device), _normal(gen, (B, H, T, D), dtype, device),
              _normal(gen, p["gate"], dtype, device, scale=2.0)]
    out = l2m.gated_merge(*inputs, backend=backend)
    _expect("out", out, (B, H, T, D), dtype)
    dout = _cotangent(gen, out)
    grads = torch.autograd.grad(out, inputs, dout)
    leaves = _leaves64(*inputs)
    ref = gated_merge_ref(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double().cpu())
    return [("out", out, ref)] + _grad_pairs(("d_out_local", "d_out_mem", "d_gate"), grads, ref_grads, inputs)


def check_topk_memory_read(p, dtype, device, backend, gen):
    B, H, Hm, T, N, Dk, Dv, k = (p[n] for n in ("B", "H", "Hm", "T", "N", "Dk", "Dv", "k"))
    lead = (Hm, N) if p["shared"] else (B, Hm, N)
    q = _normal(gen, (B, H, T, Dk), dtype, device)
    keys = _normal(gen, lead + (Dk,), dtype, device)
    values = _normal(gen, lead + (Dv,), dtype, device)
    valid_len = None if p["valid_len"] is None else torch.tensor(p["valid_len"], device=device)
    scale = Dk ** -0.5
    read = l2m.topk_memory_read(q, keys, values, k, valid_len=valid_len, backend=backend)
    _expect("out", read.out, (B, H, T, Dv), dtype)
    _expect("indices", read.indices, (B, H, T, k), torch.int64)
    _expect("weights", read.weights, (B, H, T, k), lse_dtype(dtype))
    _expect("lse", read.lse, (B, H, T), lse_dtype(dtype))
    outs = (read.out, read.weights, read.lse)
    cots = [_cotangent(gen, t) for t in outs]
    grads = torch.autograd.grad(outs, (q, keys, values), cots)

    slot_ids = read.indices.cpu()
    valid_cpu = None if valid_len is None else valid_len.cpu()
    pairs = [_topk_selection_pair(q, keys, slot_ids, k, scale, valid_cpu)]
    leaves = _leaves64(q, keys, values)
    ref = topk_read_gather(*leaves, slot_ids, scale)
    ref_grads = torch.autograd.grad(ref, leaves, [c.double().cpu() for c in cots])
    pairs += list(zip(("out", "weights", "lse"), outs, ref))
    return pairs + _grad_pairs(("dq", "dkeys", "dvalues"), grads, ref_grads, (q, keys, values))


def check_product_key_read(p, dtype, device, backend, gen):
    B, H, T, Dk, n_sub, Dv, k, k_sub = (p[n] for n in ("B", "H", "T", "Dk", "n_sub", "Dv", "k", "k_sub"))
    sum_heads, sparse_grad = p["sum_heads"], p["sparse_grad"]
    q = _normal(gen, (B, H, T, Dk), dtype, device)
    subkeys = _normal(gen, (H, 2, n_sub, Dk // 2), dtype, device)
    values = _normal(gen, (n_sub * n_sub, Dv), dtype, device)
    scale = Dk ** -0.5
    read = l2m.product_key_read(q, subkeys, values, k, k_sub=k_sub, sum_heads=sum_heads,
                                sparse_grad=sparse_grad, backend=backend)
    _expect("out", read.out, (B, T, Dv) if sum_heads else (B, H, T, Dv), dtype)
    _expect("indices", read.indices, (B, H, T, k), torch.int64)
    _expect("weights", read.weights, (B, H, T, k), lse_dtype(dtype))
    _expect("lse", read.lse, (B, H, T), lse_dtype(dtype))
    outs = (read.out, read.weights, read.lse)
    cots = [_cotangent(gen, t) for t in outs]
    grads = list(torch.autograd.grad(outs, (q, subkeys, values), cots))
    if sparse_grad:
        if grads[2] is None or not grads[2].is_sparse:
            raise CheckError("dvalues: sparse_grad=True must give a torch.sparse_coo gradient, got "
                             f"{None if grads[2] is None else grads[2].layout}")
        grads[2] = grads[2].to_dense()

    slot_ids = read.indices.cpu()
    candidate_scores, selectable, candidates = product_key_scores(
        q, subkeys, k_sub, scale, torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_valid_selection(slot_ids, candidate_scores, dtype, selectable=selectable, competitors=candidates,
                            ties=False)  # equal candidates come by their sub-keys' ranks, not by slot
    leaves = _leaves64(q, subkeys, values)
    best = product_key_select(leaves[0].detach(), leaves[1].detach(), k, k_sub, scale)
    pairs = [("selection", _selected_scores(candidate_scores, slot_ids), _selected_scores(candidate_scores, best))]
    ref = product_key_gather(*leaves, slot_ids, scale, sum_heads=sum_heads)
    ref_grads = torch.autograd.grad(ref, leaves, [c.double().cpu() for c in cots])
    pairs += list(zip(("out", "weights", "lse"), outs, ref))
    return pairs + _grad_pairs(("dq", "dsubkeys", "dvalues"), grads, ref_grads, (q, subkeys, values))


def _write_slot_ids(gen, lead, N, T, kw, index_dtype):
    """Random slots in [-1, N) with forced repeats: within a step, across steps, and skips."""
    slot_ids = torch.randint(-1, N, (*lead, T, kw), generator=gen)
    if T >= 1 and kw >= 2:
        slot_ids[..., 0, 1] = slot_ids[..., 0, 0]   # the same slot twice in one step
    if T >= 3:
        slot_ids[..., 2, 0] = slot_ids[..., 0, 0]   # and again in a later step
        slot_ids[..., 1, -1] = -1
    return slot_ids.to(index_dtype)


def check_gated_memory_write(p, dtype, device, backend, gen):
    B, Hm, N, D, T, kw = (p[n] for n in ("B", "Hm", "N", "D", "T", "kw"))
    lead = (B,) if Hm is None else (B, Hm)
    memory = _normal(gen, lead + (N, D), dtype, device)
    indices = _write_slot_ids(gen, lead, N, T, kw, getattr(torch, p["index_dtype"])).to(device)
    weights = _unit(gen, lead + (T, kw), dtype, device)
    add = _normal(gen, lead + (T, D), dtype, device)
    erase = _unit(gen, lead + (T, 1 if p["erase_one"] else D), dtype, device)
    inputs = (memory, weights, add, erase)
    out = l2m.gated_memory_write(memory, indices, weights, add, erase, backend=backend)
    _expect("out", out, memory.shape, dtype)
    if out.numel() and out.data_ptr() == memory.data_ptr():
        raise CheckError("out: inplace=False returned the memory tensor itself")
    dnew = _cotangent(gen, out)
    grads = torch.autograd.grad(out, inputs, dnew)
    with torch.no_grad():
        target = memory.detach().clone()
        result = l2m.gated_memory_write(target, indices, weights.detach(), add.detach(), erase.detach(),
                                        inplace=True, backend=backend)
    if result is not target:
        raise CheckError("out(inplace): inplace=True must return the memory tensor it updated")
    leaves = _leaves64(*inputs)
    ref = gated_memory_write_ref(leaves[0], indices.cpu(), *leaves[1:])
    ref_grads = torch.autograd.grad(ref, leaves, dnew.double().cpu())
    return ([("out", out, ref), ("out(inplace)", target, ref)]
            + _grad_pairs(("dmemory", "dweights", "dadd", "derase"), grads, ref_grads, inputs))


def check_gated_dense_update(p, dtype, device, backend, gen):
    inputs = [_normal(gen, shape, dtype, device, scale=2.0) for shape in p["shapes"]]
    out = l2m.gated_dense_update(*inputs, backend=backend)
    _expect("out", out, torch.broadcast_shapes(*p["shapes"]), dtype)
    dout = _cotangent(gen, out)
    grads = torch.autograd.grad(out, inputs, dout)
    leaves = _leaves64(*inputs)
    ref = gated_dense_update_ref(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double().cpu())
    return [("out", out, ref)] + _grad_pairs(("dmemory", "dupdate", "dinput_gate", "dforget_gate"),
                                             grads, ref_grads, inputs)


def check_memory_attention(p, dtype, device, backend, gen):
    B, H, Hkv, Hm, T, S, D, Dv, N, topk = (p[n] for n in ("B", "H", "Hkv", "Hm", "T", "S", "D", "Dv", "N", "topk"))
    mem_lead = (Hm, N) if p["shared"] else (B, Hm, N)
    tensors = dict(q=_normal(gen, (B, H, T, D), dtype, device),
                   k=_normal(gen, (B, Hkv, S, D), dtype, device),
                   v=_normal(gen, (B, Hkv, S, Dv), dtype, device),
                   mem_keys=_normal(gen, mem_lead + (D,), dtype, device),
                   mem_values=_normal(gen, mem_lead + (Dv,), dtype, device))
    if p["merge"] == "gate":
        tensors["gate"] = _normal(gen, p["gate"], dtype, device)
    valid_len = None if p["valid_len"] is None else torch.tensor(p["valid_len"], device=device)
    scale = D ** -0.5
    t = tensors
    res = l2m.memory_attention(t["q"], t["k"], t["v"], t["mem_keys"], t["mem_values"], topk,
                               window=p["window"], merge=p["merge"], gate=t.get("gate"),
                               valid_len=valid_len, backend=backend)
    _expect("out", res.out, (B, H, T, Dv), dtype)
    _expect("lse_local", res.lse_local, (B, H, T), lse_dtype(dtype))
    _expect("lse_mem", res.lse_mem, (B, H, T), lse_dtype(dtype))
    _expect("indices", res.indices, (B, H, T, topk), torch.int64)
    outs = (res.out, res.lse_local, res.lse_mem)
    cots = [_cotangent(gen, o) for o in outs]
    names = list(tensors)
    grads = torch.autograd.grad(outs, [tensors[n] for n in names], cots)

    slot_ids = res.indices.cpu()
    valid_cpu = None if valid_len is None else valid_len.cpu()
    pairs = [_topk_selection_pair(t["q"], t["mem_keys"], slot_ids, topk, scale, valid_cpu)]
    leaves = dict(zip(names, _leaves64(*tensors.values())))
    ref = memory_attention_gather(leaves["q"], leaves["k"], leaves["v"], leaves["mem_keys"],
                                  leaves["mem_values"], slot_ids, p["window"], p["merge"],
                                  leaves.get("gate"), scale)
    ref_grads = torch.autograd.grad(ref, [leaves[n] for n in names], [c.double().cpu() for c in cots])
    pairs += list(zip(("out", "lse_local", "lse_mem"), outs, ref))
    return pairs + _grad_pairs(["d" + n for n in names], grads, ref_grads, [tensors[n] for n in names])


CHECKS = {
    "topk_memory_read": check_topk_memory_read,
    "product_key_read": check_product_key_read,
    "gated_memory_write": check_gated_memory_write,
    "gated_dense_update": check_gated_dense_update,
    "merge_attention": check_merge_attention,
    "gated_merge": check_gated_merge,
    "memory_attention": check_memory_attention,
}
assert tuple(sorted(CHECKS)) == tuple(sorted(OPS)), "every op needs a check"


# ------------------------------------------------------------------------------------------------
# Shapes: each op's declared edge cases (the first two also in --quick) and random shapes from
# --seed (l2m_kernels/ops/registry.py).
# ------------------------------------------------------------------------------------------------

def shape_label(op: str, p: dict) -> str:
    """A short description of a case's shape, for the table (the op's declared label)."""
    return registry.OPS[op].cases.label(p)


def build_cases(op: str, seed: int, quick: bool) -> list[dict]:
    """The shapes checked for ``op``: its declared edge cases (2 with --quick, else all) plus random
    shapes from its declared generator."""
    cases = registry.OPS[op].cases
    rng = random.Random(f"l2m-check/{seed}/{op}")
    edges = cases.edge[:2] if quick else cases.edge
    return [dict(edge) for edge in edges] + [cases.random(rng) for _ in range(1 if quick else 2)]


# ------------------------------------------------------------------------------------------------
# Running and reporting.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    op: str
    backend: str
    dtype: str
    shape: str
    status: str                         # "PASS", "FAIL" or "SKIP"
    max_error: float | None = None      # the largest relative RMS error over outputs and gradients
    worst: str | None = None            # the output or gradient that has it
    tolerance: float | None = None
    errors: dict = dataclasses.field(default_factory=dict)
    message: str = ""                   # exception or skip reason
    seconds: float = 0.0


def _describe_exception(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and not isinstance(exc, CheckError):
        # The innermost frame in the package (not in torch's dispatch machinery) says most.
        ours = [f for f in frames if "l2m_kernels" in f.filename and not f.filename.endswith("check.py")]
        frame = (ours or frames)[-1]
        where = os.path.relpath(frame.filename) if frame.filename.startswith(os.getcwd()) else frame.filename
        text += f" [at {where}:{frame.lineno} in {frame.name}]"
    return text


def run_case(op: str, backend: str, dtype: torch.dtype, device: torch.device, params: dict,
             seed: int, case_index: int) -> Result:
    """Run one op/backend/dtype/shape; any exception becomes a FAIL with its message."""
    dtype_name = str(dtype).replace("torch.", "")
    label = shape_label(op, params)
    tolerance = TOLERANCE[dtype]
    # The same inputs for every backend: the generator depends on op, shape and dtype only.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{op}/{case_index}/{dtype_name}".encode()))
    start = time.perf_counter()
    try:
        with poisoned_outputs():
            pairs = CHECKS[op](params, dtype, device, backend, gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        errors = {}
        for name, actual, expected in pairs:
            try:
                errors[name] = rel_rms_error(actual, expected)
            except AssertionError as exc:
                raise CheckError(f"{name}: {exc}") from None
    except Exception as exc:  # a crashing backend is a failure, and the check goes on
        return Result(op, backend, dtype_name, label, "FAIL", tolerance=tolerance,
                      message=_describe_exception(exc), seconds=time.perf_counter() - start)
    # NaN never compares <= tolerance, so it fails like inf.
    worst = max(errors, key=lambda n: math.inf if math.isnan(errors[n]) else errors[n])
    passed = all(err <= tolerance for err in errors.values())
    return Result(op, backend, dtype_name, label, "PASS" if passed else "FAIL", errors[worst], worst,
                  tolerance, errors, seconds=time.perf_counter() - start)


def plan_runs(ops, backend_names, dtypes, device, seed, quick):
    """(runs, skips): runs are (op, backend, dtype, params, case index); skips are SKIP Results."""
    runs, skips = [], []
    cases = {op: build_cases(op, seed, quick) for op in ops}
    for op in ops:
        for name in backend_names:
            backend = BACKENDS[name]
            wanted = [d for d in dtypes if d in backend.dtypes]
            if not wanted:
                skips.append(Result(op, name, "-", "-", "SKIP", message=f"{name} supports none of the "
                                    f"requested dtypes ({', '.join(str(d)[6:] for d in dtypes)})"))
                continue
            refused = {}
            for dtype in wanted:
                reasons = backend.not_supported_reasons(op, device, dtype)
                if reasons:
                    refused[dtype] = "; ".join(dict.fromkeys(reasons))
                    continue
                runs += [(op, name, dtype, params, i) for i, params in enumerate(cases[op])]
            if refused and len(set(refused.values())) == 1 and len(refused) == len(wanted):
                skips.append(Result(op, name, "all", "-", "SKIP", message=next(iter(refused.values()))))
            else:
                skips += [Result(op, name, str(d)[6:], "-", "SKIP", message=m) for d, m in refused.items()]
    return runs, skips


def _format_error(err) -> str:
    if err is None:
        return "-"
    return f"{err:.1e}" if math.isfinite(err) else str(err)


def _table(headers, rows) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    widths[-1] = len(headers[-1])  # the last column (result and note) is left ragged
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _short(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summary_rows(results):
    """One row per (op, backend, dtype): the worst shape's error, PASS/FAIL counts, or SKIP."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.op, r.backend, r.dtype), []).append(r)
    rows = []
    for (op, backend, dtype), group in groups.items():
        if group[0].status == "SKIP":
            rows.append([op, backend, dtype, "-", "-", "-", "-", "SKIP  " + _short(group[0].message)])
            continue
        measured = [r for r in group if r.max_error is not None]
        worst = max(measured, key=lambda r: r.max_error if not math.isnan(r.max_error) else math.inf,
                    default=None)
        failed = [r for r in group if r.status == "FAIL"]
        crashed = [r for r in failed if r.max_error is None]
        if failed:
            verdict = f"FAIL  {len(failed)}/{len(group)} shapes"
            if crashed:
                verdict += f"; {_short(crashed[0].message, 80)}"
        else:
            verdict = "PASS"
        rows.append([op, backend, dtype, str(len(group)),
                     _format_error(worst.max_error) if worst else "-",
                     f"{worst.worst} @ {worst.shape}" if worst else "-",
                     _format_error(group[0].tolerance), verdict])
    return rows


def detail_rows(results):
    rows = []
    for r in results:
        if r.status == "SKIP":
            verdict = "SKIP  " + _short(r.message)
        elif r.status == "FAIL" and r.max_error is None:
            verdict = "FAIL  " + _short(r.message, 80)
        else:
            verdict = r.status
        rows.append([r.op, r.backend, r.dtype, r.shape, _format_error(r.max_error), r.worst or "-",
                     _format_error(r.tolerance), verdict])
    return rows


def _json_number(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf" / "nan": strict JSON has no infinities
    return x


def _environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the installation
        triton_version = None
    return {
        "l2m_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "L2M_BACKEND": os.environ.get("L2M_BACKEND"),
    }


def _csv(kind, choices):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad) or '(none)'}; choose from "
                                             f"{', '.join(choices)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2m-check",
        description="Check every l2m-kernels op on every fused backend of this machine against the "
                    "float64 reference (outputs and gradients, relative RMS error vs per-dtype "
                    "tolerance). Exit status 1 when anything fails.")
    parser.add_argument("--device", default=None,
                        help="device to check on (default: cuda if available, else cpu)")
    parser.add_argument("--ops", type=_csv("op", OPS), default=list(OPS),
                        help="comma-separated ops (default: all): " + ", ".join(OPS))
    parser.add_argument("--backends", type=_csv("backend", tuple(BACKENDS)), default=None,
                        help="comma-separated backends (default: the fused backends for the device; "
                             "'reference' may be named to check the reference itself)")
    parser.add_argument("--dtypes", type=_csv("dtype", tuple(DTYPE_NAMES)), default=list(DTYPE_NAMES),
                        help="comma-separated dtypes (default: all each backend supports)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random shapes and inputs")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes per op (2 edge cases + 1 random instead of 4-5 + 2)")
    parser.add_argument("--json", metavar="PATH", help="write every result (per shape) as JSON")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="one table row per shape instead of per op/backend/dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _progress(total, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (extra "bench"): no bar then
        return None
    return tqdm(total=total, unit="case", file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"l2m-check: --device {device} but no CUDA device is visible "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})", file=sys.stderr)
        return 2
    if args.backends is None:
        backend_names = [n for n in FUSED_BACKENDS if device.type in BACKENDS[n].device_types]
    else:
        backend_names = args.backends
    dtypes = [DTYPE_NAMES[n] for n in args.dtypes]
    env = _environment(device)

    print(f"l2m-check {__version__}: fused backends vs the float64 reference (relative RMS error of "
          f"every output and gradient)")
    print(f"device {device} ({env['device_name']}), torch {env['torch']}, triton {env['triton'] or 'none'}"
          + (", TRITON_INTERPRET=1" if triton_interpret_enabled() else "")
          + f"; seed {args.seed}{', quick' if args.quick else ''}")

    runs, skips = plan_runs(args.ops, backend_names, dtypes, device, args.seed, args.quick)
    results = list(skips)
    bar = _progress(len(runs), not args.no_progress)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # SPEC: no TF32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback notices: the table says what ran
            for op, backend, dtype, params, index in runs:
                if bar is not None:
                    bar.set_description(f"{op} {backend} {str(dtype)[6:]}")
                results.append(run_case(op, backend, dtype, device, params, args.seed, index))
                if bar is not None:
                    bar.update()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if bar is not None:
            bar.close()

    # Table order: op, then backend, then dtype, as planned (skips in place).
    order = {op: i for i, op in enumerate(args.ops)}
    border = {b: i for i, b in enumerate(backend_names)}
    results.sort(key=lambda r: (order[r.op], border[r.backend]))
    headers_summary = ["op", "backend", "dtype", "shapes", "max err", "worst (output/grad @ shape)", "tol",
                       "result"]
    headers_detail = ["op", "backend", "dtype", "shape", "max err", "worst", "tol", "result"]
    print()
    if args.verbose:
        print(_table(headers_detail, detail_rows(results)))
    else:
        print(_table(headers_summary, summary_rows(results)))

    failed = [r for r in results if r.status == "FAIL"]
    passed = [r for r in results if r.status == "PASS"]
    if failed:
        print(f"\nfailures ({len(failed)}):")
        for r in failed:
            what = (f"{r.worst} error {_format_error(r.max_error)} > tol {_format_error(r.tolerance)}; all: "
                    + ", ".join(f"{n} {_format_error(e)}" for n, e in r.errors.items())
                    if r.max_error is not None else r.message)
            print(f"  {r.op} [{r.backend}, {r.dtype}] {r.shape}: {what}")
    print(f"\n{len(passed)} passed, {len(failed)} failed (op/backend/dtype/shape runs), "
          f"{len(results) - len(passed) - len(failed)} skipped; max err = relative RMS error against the "
          f"float64 reference, tol = l2m_kernels.testing.TOLERANCE[dtype]")
    if not runs:
        print("nothing was checked: no requested backend can run on this device (see SKIP reasons)")

    if args.json:
        payload = {
            "environment": env,
            "seed": args.seed,
            "quick": args.quick,
            "tolerance": {str(d)[6:]: t for d, t in TOLERANCE.items()},
            "summary": {"passed": len(passed), "failed": len(failed),
                        "skipped": len(results) - len(passed) - len(failed), "ok": bool(runs) and not failed},
            "results": [{k: ({n: _json_number(e) for n, e in v.items()} if k == "errors" else _json_number(v))
                         for k, v in dataclasses.asdict(r).items()} for r in results],
        }
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"results written to {args.json}")
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
