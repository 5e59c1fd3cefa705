"""The declared cases of the sharded ops, built and judged on one rank of a process group.

A case (``registry.SHARDED_OPS[op].cases``: ``l2m-check --distributed``'s edge cases and random
shapes) is a dict of sizes and switches. :func:`run_case` draws the whole memory and inputs from a
seed (the same on every rank), hands this rank its shard (and, with sharded queries, its batch),
runs the sharded op and its backward with random cotangents, and runs the single-device op the
sharded one is declared to equal (``SHARDED_OPS[op].of``) on the whole inputs in this process.
Every collective comes before the comparisons, so a failed comparison leaves the ranks in step.

The judgement: slot ids identical to the single-device op's (ties broken alike across shards);
every output and gradient (this rank's shard of the memory's; this rank's slice of the batch with
sharded queries) within the relative RMS tolerance of the dtype
(:data:`l2m_kernels.testing.TOLERANCE`).
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops._common import acc_dtype
from ..testing import TOLERANCE, rel_rms_error
from .module import shard_sizes

SHARD_PATTERNS = ("even", "uneven", "empty_first", "one_holds_all")


def pattern_sizes(pattern: str, total: int, world_size: int) -> List[int]:
    """The shard sizes of ``total`` slots (or features) over ``world_size`` ranks:

    - ``"even"``: as equal as can be, the first ranks one more;
    - ``"uneven"``: in proportion to 1, 2, ..., P (rounded down; the last rank the rest);
    - ``"empty_first"``: rank 0 none, the others ``"uneven"``;
    - ``"one_holds_all"``: the last rank all of them, the others none.

    One rank holds everything whatever the pattern.
    """
    if world_size == 1:
        return [total]
    if pattern == "even":
        return shard_sizes(total, world_size)
    if pattern == "uneven":
        parts = world_size * (world_size + 1) // 2
        sizes = [total * (rank + 1) // parts for rank in range(world_size - 1)]
        return sizes + [total - sum(sizes)]
    if pattern == "empty_first":
        return [0] + pattern_sizes("uneven", total, world_size - 1)
    if pattern == "one_holds_all":
        return [0] * (world_size - 1) + [total]
    raise ValueError(f"sizes: expected one of {SHARD_PATTERNS}, got {pattern!r}")


def _offset(sizes: List[int], rank: int) -> int:
    return sum(sizes[:rank])


def _leaf(tensor: Tensor) -> Tensor:
    return tensor.detach().clone().requires_grad_(True)


class Judge:
    """The comparisons of one case: ``errors[name] = (error, allowed)``; ``failures[name]``."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.errors: Dict[str, tuple] = {}
        self.failures: Dict[str, str] = {}

    def close(self, name: str, actual: Tensor, expected: Tensor) -> None:
        if actual.shape != expected.shape:
            self.failures[name] = f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
            return
        error = rel_rms_error(actual, expected)
        allowed = TOLERANCE[self.dtype]
        self.errors[name] = (error, allowed)
        if not error <= allowed:
            self.failures[name] = f"relative RMS error {error:.3e} exceeds {allowed:.1e}"

    def equal(self, name: str, actual: Tensor, expected: Tensor) -> None:
        self.errors[name] = (0.0 if torch.equal(actual, expected) else float("inf"), 0.0)
        if not torch.equal(actual, expected):
            differ = (actual != expected).sum().item() if actual.shape == expected.shape else "shape"
            self.failures[name] = f"not identical ({differ} entries differ)"


def _read_grads(read, inputs, cotangents, mine):
    """The gradients of ``inputs`` of a read's (out, weights, lse) for this rank's slice of the
    cotangents."""
    return list(torch.autograd.grad((read.out, read.weights, read.lse), inputs,
                                    tuple(c[mine] for c in cotangents)))


def _reference_grads(expected, inputs, cotangents):
    return torch.autograd.grad((expected.out, expected.weights, expected.lse), inputs, cotangents)


def _judge_read(judge: Judge, read, expected, mine) -> None:
    """Slot ids identical and (out, weights, lse) close to this rank's slice of ``expected``."""
    judge.equal("indices", read.indices, expected.indices[mine])
    for name in ("out", "weights", "lse"):
        judge.close(name, getattr(read, name), getattr(expected, name)[mine])


def _draw(gen: torch.Generator, shape, dtype, ties: bool, low=-2, high=3) -> Tensor:
    """Normal data, or with ``ties`` small integers (exact score ties)."""
    if ties:
        return torch.randint(low, high, shape, generator=gen).to(dtype)
    return torch.randn(*shape, generator=gen, dtype=dtype)


# ---- sharded_topk_memory_read -----------------------------------------------------------------

def _valid_lens(kind: Optional[str], batch: int, total: int, k: int, gen: torch.Generator):
    if kind is None:
        return None
    if kind == "short":   # fewer slots than k for every batch element
        high = max(min(k, total), 1)
        return torch.randint(0, high, (batch,), generator=gen)
    return torch.randint(0, total + 1, (batch,), generator=gen)


def _topk(p: dict, dtype, seed: int, rank: int, world_size: int, group) -> Judge:
    import l2m_kernels as l2m

    from .topk import sharded_topk_memory_read

    gen = torch.Generator().manual_seed(seed)
    B, H, Hm, T, N, Dk, Dv, k = (p[name] for name in ("B", "H", "Hm", "T", "N", "Dk", "Dv", "k"))
    sharded = p["queries"] == "sharded"
    sizes = pattern_sizes(p["sizes"], N, world_size)
    offset, size = _offset(sizes, rank), sizes[rank]
    batch_all = B * world_size if sharded else B
    lead = (Hm,) if p["shared"] else (batch_all, Hm)
    keys = _draw(gen, (*lead, N, Dk), dtype, p["ties"])
    if p["ties"]:   # the second half of the slots repeats the first: ties across shards
        half = N // 2
        keys[..., N - half:, :] = keys[..., :half, :]
    values = _draw(gen, (*lead, N, Dv), dtype, False)
    q = _draw(gen, (batch_all, H, T, Dk), dtype, p["ties"])
    valid_len = _valid_lens(p["valid_len"], batch_all, N, k, gen)
    acc = acc_dtype(dtype)
    cotangents = (torch.randn(batch_all, H, T, Dv, generator=gen, dtype=dtype),
                  torch.randn(batch_all, H, T, k, generator=gen, dtype=acc),
                  torch.randn(batch_all, H, T, generator=gen, dtype=acc))
    mine = slice(rank * B, (rank + 1) * B) if sharded else slice(None)
    # Ties: small integers and a power-of-two scale, so that every score is exact in float32 (the
    # single-device op's) and float64 (the merge's): equal scores are equal in both, and so are
    # their orders. (Scores that differ only by float32 rounding may be ordered otherwise by the
    # merge's float64 scores: docs/distributed.md.)
    scale = 0.25 if p["ties"] else None

    inputs = (_leaf(q[mine]), _leaf(keys[..., offset:offset + size, :]),
              _leaf(values[..., offset:offset + size, :]))
    read = sharded_topk_memory_read(*inputs, k, group=group, queries=p["queries"], scale=scale,
                                    valid_len=None if valid_len is None else valid_len[mine])
    grads = _read_grads(read, inputs, cotangents, mine)

    ref_inputs = tuple(_leaf(t) for t in (q, keys, values))
    expected = l2m.topk_memory_read(*ref_inputs, k, scale=scale, valid_len=valid_len)
    ref_grads = _reference_grads(expected, ref_inputs, cotangents)
    judge = Judge(dtype)
    _judge_read(judge, read, expected, mine)
    judge.close("dq", grads[0], ref_grads[0][mine])
    judge.close("dkeys", grads[1], ref_grads[1][..., offset:offset + size, :])
    judge.close("dvalues", grads[2], ref_grads[2][..., offset:offset + size, :])
    return judge


# ---- sharded_product_key_read -----------------------------------------------------------------

def _product_key(p: dict, dtype, seed: int, rank: int, world_size: int, group) -> Judge:
    import l2m_kernels as l2m

    from .product_key import sharded_product_key_read

    gen = torch.Generator().manual_seed(seed)
    B, H, T, Dk, n_sub, Dv, k, k_sub = (p[name] for name in ("B", "H", "T", "Dk", "n_sub", "Dv", "k", "k_sub"))
    by_rows, sharded = p["shard"] == "rows", p["queries"] == "sharded"
    num_slots = n_sub * n_sub
    sizes = pattern_sizes(p["sizes"], num_slots if by_rows else Dv, world_size)
    offset, size = _offset(sizes, rank), sizes[rank]
    batch_all = B * world_size if sharded else B
    q = _draw(gen, (batch_all, H, T, Dk), dtype, p["ties"], -1, 2)
    subkeys = _draw(gen, (H, 2, n_sub, Dk // 2), dtype, p["ties"], -1, 2)
    values = torch.randn(num_slots, Dv, generator=gen, dtype=dtype)
    acc = acc_dtype(dtype)
    cotangents = (torch.randn((batch_all, T, Dv) if p["sum_heads"] else (batch_all, H, T, Dv), generator=gen,
                              dtype=dtype),
                  torch.randn(batch_all, H, T, k, generator=gen, dtype=acc),
                  torch.randn(batch_all, H, T, generator=gen, dtype=acc))
    mine = slice(rank * B, (rank + 1) * B) if sharded else slice(None)

    def shard_of(full):
        return full[offset:offset + size] if by_rows else full[:, offset:offset + size]

    inputs = (_leaf(q[mine]), _leaf(subkeys), _leaf(shard_of(values)))
    read = sharded_product_key_read(*inputs, k, k_sub=k_sub, group=group, shard=p["shard"], queries=p["queries"],
                                    sum_heads=p["sum_heads"], sparse_grad=p["sparse_grad"])
    grads = _read_grads(read, inputs, cotangents, mine)
    if sharded:   # this rank's queries' sub-key gradient: summed over the ranks, the whole batch's
        dist.all_reduce(grads[1], group=group)

    ref_inputs = tuple(_leaf(t) for t in (q, subkeys, values))
    expected = l2m.product_key_read(*ref_inputs, k, k_sub=k_sub, sum_heads=p["sum_heads"])
    ref_grads = _reference_grads(expected, ref_inputs, cotangents)
    judge = Judge(dtype)
    _judge_read(judge, read, expected, mine)
    judge.close("dq", grads[0], ref_grads[0][mine])
    judge.close("dsubkeys", grads[1], ref_grads[1])
    dvalues = grads[2]
    if p["sparse_grad"]:
        if not dvalues.is_sparse:
            judge.failures["dvalues"] = "sparse_grad=True gave a dense gradient"
        dvalues = dvalues.to_dense()
    judge.close("dvalues", dvalues, shard_of(ref_grads[2]))
    return judge


# ---- sharded_gated_memory_write ---------------------------------------------------------------

def _write(p: dict, dtype, seed: int, rank: int, world_size: int, group) -> Judge:
    import l2m_kernels as l2m

    from .write import sharded_gated_memory_write

    gen = torch.Generator().manual_seed(seed)
    B, Hm, T, kw, N, D = (p[name] for name in ("B", "Hm", "T", "kw", "N", "D"))
    sharded = p["queries"] == "sharded"
    sizes = pattern_sizes(p["sizes"], N, world_size)
    offset, size = _offset(sizes, rank), sizes[rank]
    batch_all = B * world_size if sharded else B
    lead = (batch_all, Hm) if Hm else (batch_all,)
    memory = torch.randn(*lead, N, D, generator=gen, dtype=dtype)
    # Slot ids: -1 (no write) and repeats within a step, across steps and across shards.
    indices = torch.randint(-1, N, (*lead, T, kw), generator=gen)
    if T >= 2 and kw >= 2:
        indices[..., 1, 0] = indices[..., 0, 0]
        indices[..., 0, -1] = indices[..., 0, 0]
    indices = indices.to(torch.int32 if p["int32_ids"] else torch.int64)
    weights = torch.rand(*lead, T, kw, generator=gen, dtype=dtype)
    add = torch.randn(*lead, T, D, generator=gen, dtype=dtype)
    erase = torch.rand(*lead, T, D if p["erase_per_feature"] else 1, generator=gen, dtype=dtype)
    cotangent = torch.randn(*lead, N, D, generator=gen, dtype=dtype)
    mine = slice(rank * B, (rank + 1) * B) if sharded else slice(None)

    memory_shard = _leaf(memory[..., offset:offset + size, :])
    writes = tuple(_leaf(t[mine]) for t in (weights, add, erase))
    new = sharded_gated_memory_write(memory_shard, indices[mine], *writes, group=group, queries=p["queries"])
    grads = torch.autograd.grad(new, (memory_shard, *writes), cotangent[..., offset:offset + size, :])

    ref_inputs = tuple(_leaf(t) for t in (memory, weights, add, erase))
    expected = l2m.gated_memory_write(ref_inputs[0], indices, *ref_inputs[1:])
    ref_grads = torch.autograd.grad(expected, ref_inputs, cotangent)
    judge = Judge(dtype)
    judge.close("memory", new, expected[..., offset:offset + size, :])
    judge.close("dmemory", grads[0], ref_grads[0][..., offset:offset + size, :])
    for name, got, want in zip(("dweights", "dadd", "derase"), grads[1:], ref_grads[1:]):
        judge.close(name, got, want[mine])
    return judge


RUNNERS = {
    "sharded_topk_memory_read": _topk,
    "sharded_product_key_read": _product_key,
    "sharded_gated_memory_write": _write,
}

# The switches every case leaves to these defaults (the registry's cases give only what differs).
DEFAULTS = {
    "sharded_topk_memory_read": dict(shared=False, valid_len=None, queries="replicated", sizes="uneven",
                                     ties=False),
    "sharded_product_key_read": dict(k_sub=None, sum_heads=False, shard="rows", queries="replicated",
                                     sizes="uneven", sparse_grad=False, ties=False),
    "sharded_gated_memory_write": dict(queries="replicated", sizes="uneven", int32_ids=False,
                                       erase_per_feature=True),
}


def full_case(op: str, params: dict) -> dict:
    """A case with every switch: the op's defaults, overridden by ``params``."""
    return dict(DEFAULTS[op], **params)


def run_case(op: str, params: dict, dtype: torch.dtype, seed: int, rank: int, world_size: int,
             group=None) -> Judge:
    """Run one declared case of ``op`` on this rank (every rank of ``group`` calls it alike)."""
    return RUNNERS[op](full_case(op, params), dtype, seed, rank, world_size, group)


def case_seed(seed: int, op: str, index: int, dtype: torch.dtype) -> int:
    """The data seed of case ``index`` of ``op`` at ``dtype`` (the same on every rank)."""
    return random.Random(f"{seed}/{op}/{index}/{dtype}").randrange(2**31)
