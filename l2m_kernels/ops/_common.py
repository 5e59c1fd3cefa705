"""Pieces shared by the op packages: result tuples, per-backend launcher tables, the reference vjp."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from . import registry


class MemoryRead(NamedTuple):
    """Result of a top-k or product-key memory read."""

    out: Tensor
    indices: Tensor
    weights: Tensor
    lse: Tensor


class MemoryAttention(NamedTuple):
    """Result of :func:`l2m_kernels.memory_attention`."""

    out: Tensor
    lse_local: Tensor
    lse_mem: Tensor
    indices: Tensor


def contiguous_like(tensor: Tensor) -> Tensor:
    """An uninitialised row-major tensor with ``tensor``'s shape, dtype and device.

    Every output of every ``torch.ops.l2m`` op, forward and backward, is row-major whatever the
    strides of its inputs; the fake kernels say so through this helper, so that the strides
    ``torch.compile`` plans for agree with what the real kernels return (``torch.empty_like``
    would keep a transposed input's strides).
    """
    return tensor.new_empty(tensor.shape)


def read_outputs_like(q: Tensor, value_dim: int, k: int, *, fill=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The row-major outputs of a top-k read by ``q (B, H, T, Dk)``: ``out (B, H, T, value_dim)`` in
    q's dtype, ``indices (B, H, T, k)`` int64, ``weights (B, H, T, k)`` and ``lse (B, H, T)`` in the
    accumulation dtype; uninitialised (fake kernels), or filled with ``fill``."""
    B, H, T, _ = q.shape
    acc = acc_dtype(q.dtype)
    specs = (((B, H, T, value_dim), q.dtype), ((B, H, T, k), torch.int64), ((B, H, T, k), acc), ((B, H, T), acc))
    if fill is None:
        return tuple(q.new_empty(shape, dtype=dtype) for shape, dtype in specs)
    return tuple(q.new_full(shape, fill, dtype=dtype) for shape, dtype in specs)


def rows_of_queries(x: Tensor, mem_heads: int) -> Tensor:
    """``x (B, H, T, D)`` -> ``(Hm, B * (H // Hm) * T, D)``: the query rows each memory head serves
    (query head h reads memory head h // (H // Hm)), row-major.

    Equivalent PyTorch:
        x.reshape(B, Hm, H // Hm * T, D).transpose(0, 1).reshape(Hm, -1, D)
    """
    batch, heads, length, dim = x.shape
    group = heads // mem_heads
    return x.reshape(batch, mem_heads, group * length, dim).transpose(0, 1).reshape(
        mem_heads, batch * group * length, dim).contiguous()


def to_queries(x: Tensor, batch: int, heads: int, length: int) -> Tensor:
    """Inverse of :func:`rows_of_queries` for ``x (Hm, R, last)`` -> ``(B, H, T, last)``, row-major."""
    mem_heads, last = x.shape[0], x.shape[-1]
    group = heads // mem_heads
    return x.reshape(mem_heads, batch, group * length, last).transpose(0, 1).reshape(
        batch, heads, length, last).contiguous()


def rows_for(backend: str) -> Callable[[Tensor], Tensor]:
    """How ``backend``'s kernels take a (B, H, T, D) operand that may be strided.

    The cpu kernels read queries, keys, values and output gradients (and product_key_read's
    (B, T, Dv) ``dout`` with ``sum_heads``, and gated_memory_write's (B, Hm, T, .) or (B, T, .)
    ``weights``, ``add`` and ``erase``) in place when the last
    dimension is contiguous (stride 1), whatever the strides of the other dimensions: a projection
    viewed as (B, T, H, D) and transposed, a slice, a stride-0 broadcast over heads or batch. Such
    a tensor is passed as it is; any other is copied to row-major once. The triton and cuda
    kernels (and the reference's outputs) take row-major operands: always ``.contiguous()``.
    """
    return _unit_stride_rows if backend == "cpu" else Tensor.contiguous


def _unit_stride_rows(tensor: Tensor) -> Tensor:
    if tensor.dim() in (3, 4) and tensor.numel() and (tensor.stride(-1) == 1 or tensor.shape[-1] == 1):
        return tensor
    return tensor.contiguous()


def autocast_promote(*tensors, to=None):
    """Under ``torch.autocast``, the floating tensors among ``tensors`` cast to the widest of their
    dtypes, or to ``to`` when given (anything else passes through, for the argument checks to
    name); outside autocast, ``tensors`` unchanged.

    This is autocast's "promote" policy (as for ``torch.cat``): in an autocast region a model's
    projections return bfloat16 or float16 while memory banks, gates and states stay in the dtype
    they were created in, and the ops need one dtype. Promoting keeps every selection as exact as
    the most precise input and never casts a whole memory down on every call; a memory kept in
    bfloat16 (the module's ``dtype``) makes the op run in bfloat16.
    """
    present = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if not present or not torch.is_autocast_enabled(present[0].device.type):
        return tensors
    dtype = present[0].dtype if to is None else to
    for t in present if to is None else ():
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (and the dtype of weights/lse outputs) for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def f32_accumulator(grad: Tensor) -> Tensor:
    """A zeroed float32 tensor of ``grad``'s shape for float32 atomics to add into: ``grad`` itself
    when it is float32, else a new one (:func:`store_accumulated` writes it back)."""
    acc = grad if grad.dtype == torch.float32 else torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    return acc.zero_()


def store_accumulated(grad: Tensor, acc: Tensor) -> None:
    """Write an :func:`f32_accumulator` back into its gradient (a no-op when it is the gradient)."""
    if acc is not grad:
        grad.copy_(acc)


def key_runs(keys: Tensor, num_keys: int) -> Tuple[Tensor, Tensor]:
    """Entries grouped by key for the GPU backends' fixed-order reductions: ``(order, run_starts)``.

    ``keys`` (E,) int64 in ``[0, num_keys]``, the key ``num_keys`` marking an entry of no run (sorted
    last). ``order`` (E,) int64: the entry ids sorted stably by key; ``run_starts`` (num_keys + 1,)
    int64: ``order[run_starts[s] : run_starts[s + 1]]`` are the entries of key ``s``, in entry
    order. A stable sort and a binary search: deterministic on every device, no host
    synchronisation.

    Equivalent Python:
        order = sorted(range(E), key=lambda e: keys[e])
        run_starts = [sum(1 for e in range(E) if keys[e] < s) for s in range(num_keys + 1)]
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    run_starts = torch.searchsorted(sorted_keys, torch.arange(num_keys + 1, device=keys.device, dtype=keys.dtype))
    return order, run_starts


def unavailable(op: str, backend: str):
    """A launcher for a backend that the dispatcher should never have picked for ``op``."""
    def launcher(*args, **kwargs):
        raise NotImplementedError(f"backend {backend!r} has no kernel for {op}")
    return launcher


def reference_vjp(fn: Callable, primals: Sequence[Tensor], cotangents, differentiable: Sequence[bool]):
    """Gradients of ``fn(*primals)`` (a tuple of outputs) for the primals flagged ``differentiable``.

    Runs ``torch.func.vjp``, which works inside a custom op's implementation (below autograd). Output
    cotangents given as None are taken as zeros; integer outputs get no cotangent.
    """
    primals = list(primals)
    idx = [i for i, d in enumerate(differentiable) if d]

    def partial(*diff_args):
        args = list(primals)
        for i, a in zip(idx, diff_args):
            args[i] = a
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return tuple(o for o in outs if o.is_floating_point())

    outs, vjp = torch.func.vjp(partial, *[primals[i] for i in idx])
    cot = [torch.zeros_like(o) if c is None else c.to(o.dtype) for o, c in zip(outs, cotangents)]
    grads = vjp(tuple(cot))
    result = [None] * len(primals)
    for i, g in zip(idx, grads):
        result[i] = g.contiguous()  # row-major, as the fake kernels declare (contiguous_like)
    return result


def declared_op(name: str):
    """``torch.library.custom_op`` for the public op ``name``, with the name and schema of its
    declaration in :mod:`l2m_kernels.ops.registry` (the decorated function's annotations are not
    read: the declaration is the one source of the schema)."""
    decl = registry.OPS[name]
    return torch.library.custom_op(decl.qualname, mutates_args=(), schema=decl.schema)


def eager_call(*tensors) -> bool:
    """Whether a public call may take its op's eager entry (:func:`register_autograd`) rather than
    the custom op: not while ``torch.compile`` traces, and only for plain tensors (fake, functional
    and other subclass tensors go through the dispatcher, whose fake kernels serve them)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is Tensor for t in tensors)  # noqa: E721 (subclasses excluded on purpose)


def register_autograd(op, forward: Callable, setup_context: Callable, backward: Callable,
                      backward_op: Callable, backward_launcher: Callable) -> Callable:
    """Autograd of the custom op ``op``, and the same formula as an eager entry point.

    ``backward(ctx, *grads, kernel=...)`` computes the input gradients by calling
    ``kernel(...)``: ``backward_op`` (the custom backward op, which ``torch.compile`` traces) when
    autograd runs through ``op``, ``backward_launcher`` (the launcher that op calls) in the eager
    entry. ``forward(*inputs)`` is the launcher ``op`` runs once its arguments are checked.

    Returns ``apply(*inputs)``: ``forward`` under a ``torch.autograd.Function`` with the same
    ``setup_context`` and ``backward`` (``forward`` alone when no input requires a gradient or
    gradients are disabled). A public function whose arguments it has already checked
    calls it when :func:`eager_call` allows: the same kernels and gradients as ``op``, without the
    dispatcher's and the second check's cost, which at the sizes of the row-wise ops (a few MB)
    is as long as the kernel.
    """
    torch.library.register_autograd(op, lambda ctx, *grads: backward(ctx, *grads, kernel=backward_op),
                                    setup_context=setup_context)

    def forward_with_context(ctx, *inputs):
        # The ctx-first form: with a separate setup_context staticmethod, Function.apply binds the
        # arguments through inspect.signature on every call (tens of microseconds).
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    name = getattr(op, "_name", str(op)).split("::")[-1]
    function = type(f"{name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_context),
        "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads, kernel=backward_launcher)),
    })

    def apply(*inputs):
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
            return function.apply(*inputs)
        return forward(*inputs)  # nothing to differentiate: no graph node, nothing saved

    return apply
