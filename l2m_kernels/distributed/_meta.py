"""Shard layout and the cross-rank argument check of the sharded ops.

Every rank contributes one fixed-length int64 row to one all-gather: its shard size and, with
``check=True``, a code of each argument that must agree across ranks (shapes, dtype, ``k``, the
query layout, the scale's bits, ...). Every rank then holds the same table and reaches the same
verdict, so a mismatch raises the same ``ValueError`` on every rank instead of leaving some ranks
waiting in a later collective whose sizes disagree.

:func:`eager_only` keeps the sharded ops out of ``torch.compile``'s graphs (see there).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

MISSING = -1          # padding of a shape code beyond the tensor's rank
SHARD_DIM = -2        # marks the slot dimension, whose size may differ across ranks

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
QUERY_LAYOUTS = ("replicated", "sharded")


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's slots sit in the concatenated memory.

    ``sizes[r]`` is rank r's slot count (ranks in group order); rank r holds global slots
    ``[offsets[r], offsets[r] + sizes[r])``.
    """

    rank: int
    world_size: int
    sizes: Tuple[int, ...]

    @property
    def offsets(self) -> Tuple[int, ...]:
        starts = [0]
        for size in self.sizes[:-1]:
            starts.append(starts[-1] + size)
        return tuple(starts)

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class Field:
    """One entry of the metadata row: ``width`` int64 codes; ``compare``: must agree across ranks;
    ``show`` turns a code back into text for the error message."""

    name: str
    width: int
    show: Callable[[Tuple[int, ...]], str] = lambda code: str(code[0])
    compare: bool = True


def shape_code(value, shard_dim: Optional[int] = None, width: int = 4) -> Tuple[int, ...]:
    """``(ndim, size_0, ..., size_{width-1})`` padded with MISSING; the dimension ``shard_dim``
    (counted from the end) coded SHARD_DIM; all MISSING for a non-tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() > width:
        return (MISSING,) * (width + 1)
    sizes = list(value.shape)
    if shard_dim is not None and value.dim() >= -shard_dim:
        sizes[shard_dim] = SHARD_DIM
    return (value.dim(),) + tuple(sizes) + (MISSING,) * (width - value.dim())


def show_shape(code: Tuple[int, ...]) -> str:
    ndim = code[0]
    if ndim == MISSING:
        return "not a tensor of at most 4 dims"
    sizes = ["N_r" if size == SHARD_DIM else str(size) for size in code[1:1 + ndim]]
    return "(" + ", ".join(sizes) + ("," if ndim == 1 else "") + ")"


def dtype_code(value) -> Tuple[int]:
    dtype = getattr(value, "dtype", None)
    return (_DTYPES.index(dtype) if dtype in _DTYPES else MISSING,)


def show_dtype(code: Tuple[int, ...]) -> str:
    return str(_DTYPES[code[0]]) if code[0] != MISSING else "not a floating dtype"


def float_code(value) -> Tuple[int]:
    """The bits of a float as one int64 (so NaN and -0.0 compare exactly); MISSING-coded None."""
    if value is None:
        return (MISSING,)
    return (struct.unpack("<q", struct.pack("<d", float(value)))[0],)


def show_float(code: Tuple[int, ...]) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", code[0]))[0])


def show_flag(code: Tuple[int, ...]) -> str:
    return str(bool(code[0]))


def show_layout(code: Tuple[int, ...]) -> str:
    return repr(QUERY_LAYOUTS[code[0]]) if 0 <= code[0] < len(QUERY_LAYOUTS) else "invalid"


def bits_checksum(tensor: torch.Tensor) -> int:
    """Wrapping int64 sum of a tensor's bit patterns: exact and order-independent, so two ranks
    holding equal tensors agree whatever their thread counts."""
    bits_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype.is_floating_point or flat.dtype == torch.bool:
        flat = flat.view(bits_dtype) if flat.dtype != torch.bool else flat.to(torch.int8)
    return int(flat.sum(dtype=torch.int64))


def _compiler_disable():
    """``torch.compiler.disable`` (torch >= 2.1), else ``torch._dynamo.disable``."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:
        import torch._dynamo as dynamo
        disable = dynamo.disable
    return disable


def eager_only(fn: Callable) -> Callable:
    """``fn`` (a sharded op's public function) run eagerly, never traced by ``torch.compile``.

    A compiled function calling it breaks its graph there and calls it as it is, like any eager
    autograd op: the code before and after it compiles, and autograd runs its backward (with its
    collectives) eagerly. Traced, the op goes wrong in several ways (seen with torch 2.13), so the
    whole call (argument checks, metadata exchange, the autograd.Function and its collectives)
    stays out of the graphs:

    - the cross-rank checks turn tensors into Python ints (checksums, shard sizes, valid_len
      ranges: ``int()``, ``.tolist()``), each a graph break after which Dynamo specialises the
      resumed code on these ints: with replicated queries every new q (a new checksum) recompiles
      the rest of the read, until the recompile limit sends it back to eager;
    - the metadata row is baked into a graph as a constant;
    - Dynamo cannot trace the autograd.Function and compiles its forward as separate frames, with
      the collectives turned into functional collectives.

    Recursive: nothing the call runs (the local selection, the collectives) is compiled either.
    """
    disable = _compiler_disable()
    try:
        return disable(fn, recursive=True,
                       reason=f"{fn.__name__}: runs collectives and cross-rank checks eagerly")
    except TypeError:  # older torch: no ``reason``
        return disable(fn, recursive=True)


def group_rank(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first (torchrun sets up the "
                           "environment it reads)")
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather_rows(row: torch.Tensor, group, world_size: int) -> torch.Tensor:
    rows = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows)


def _rank_list(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def exchange(op: str, group, device, shard_size: int, fields: Sequence[Field],
             codes: Dict[str, Tuple[int, ...]], local_error: Optional[BaseException],
             check: bool) -> Tuple[ShardLayout, List[Tuple[int, ...]]]:
    """One all-gather of every rank's shard size (and, with ``check``, its argument codes).

    Returns the layout and, per rank, its row of codes after the size (empty rows without
    ``check``). Raises on every rank alike when a rank's local argument check failed (that rank
    re-raises its own error, the others name it) or when a compared field differs.
    """
    rank, world_size = group_rank(group)
    if not check:
        if local_error is not None:
            raise local_error
        sizes = _all_gather_rows(torch.tensor([shard_size], dtype=torch.int64, device=device), group,
                                 world_size)
        return ShardLayout(rank, world_size, tuple(int(s) for s in sizes[:, 0].tolist())), [()] * world_size

    values: List[int] = [int(local_error is not None), shard_size]
    for field in fields:
        code = codes[field.name]
        if len(code) != field.width:
            raise AssertionError(f"metadata field {field.name}: {len(code)} codes for width {field.width}")
        values.extend(code)
    table = _all_gather_rows(torch.tensor(values, dtype=torch.int64, device=device), group,
                             world_size).cpu().tolist()

    failed = [r for r in range(world_size) if table[r][0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"{op}: the arguments of {_rank_list(failed)} failed their check (that "
                         f"rank raised the error saying why); every rank stops here")

    rows = [tuple(row[2:]) for row in table]
    require_agreement(op, fields, rows, [field.name for field in fields if field.compare])
    return ShardLayout(rank, world_size, tuple(int(row[1]) for row in table)), rows


def require_agreement(op: str, fields: Sequence[Field], rows: Sequence[Tuple[int, ...]],
                      names: Sequence[str]) -> None:
    """Raise one ``ValueError`` naming every field of ``names`` whose codes differ across the
    ranks' ``rows`` (as :func:`exchange` returns them), with each value and the ranks holding it."""
    by_name = {field.name: field for field in fields}
    mismatches = []
    for name in names:
        by_code: Dict[Tuple[int, ...], List[int]] = {}
        for rank, row in enumerate(rows):
            by_code.setdefault(field_values(fields, row, name), []).append(rank)
        if len(by_code) > 1:
            seen = "; ".join(f"{_rank_list(ranks)}: {by_name[name].show(code)}"
                             for code, ranks in by_code.items())
            mismatches.append(f"{name} differs across ranks ({seen})")
    if mismatches:
        raise ValueError(f"{op}: the ranks of the group disagree, so the collectives would not "
                         "match: " + "; ".join(mismatches))


def field_values(fields: Sequence[Field], row: Tuple[int, ...], name: str) -> Tuple[int, ...]:
    """The codes of field ``name`` in one rank's row as :func:`exchange` returns it."""
    start = 0
    for field in fields:
        if field.name == name:
            return row[start:start + field.width]
        start += field.width
    raise KeyError(name)
