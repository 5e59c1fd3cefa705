"""The cpu kernels read strided operands in place.

Queries, keys, values and output gradients come out of models as views: a projection viewed as
(B, T, H, D) and transposed to (B, H, T, D), a slice of a longer sequence, a tensor broadcast over
heads with stride 0. The cpu backend's top-k read, product-key read and memory attention take such
operands as they are when their last dimension is contiguous (l2m_kernels.ops._common.rows_for), and
so does its gated memory write for its weights, add and erase.
For each op and layout: the launcher makes no copy of a strided operand (every aten op it runs is
recorded), and its outputs and gradients are bitwise those of the same call on row-major copies.
A layout whose last dimension is strided is copied once and gives the same results too.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import l2m_kernels as l2m
from l2m_kernels import _ext
from l2m_kernels.ops.memory_attention import function as memory_attention_function
from l2m_kernels.ops.memory_write import function as memory_write_function
from l2m_kernels.ops.product_key import function as product_key_function
from l2m_kernels.ops.quantized_read import function as quantized_read_function
from l2m_kernels.ops.topk_read import function as topk_read_function
from l2m_kernels.testing import rand

pytestmark = pytest.mark.skipif(_ext.cpu_extension() is None,
                                reason=f"the cpu extension is unavailable: {_ext.cpu_extension_error()}")

aten = torch.ops.aten
COPIES = (aten.clone.default, aten.copy_.default, aten._to_copy.default, aten.contiguous.default)
B, H, T, D = 2, 4, 7, 8
# layout -> (makes a (B, H, T, d) tensor of that layout from a generator, read in place?)
LAYOUTS = {
    "transposed": (lambda g, d, dtype: rand(B, T, H, d, generator=g, dtype=dtype).transpose(1, 2), True),
    "sliced": (lambda g, d, dtype: rand(B, H, T + 3, d, generator=g, dtype=dtype)[:, :, 2:T + 2], True),
    "head-broadcast": (lambda g, d, dtype: rand(B, 1, T, d, generator=g, dtype=dtype).expand(B, H, T, d), True),
    "batch-broadcast": (lambda g, d, dtype: rand(1, H, T, d, generator=g, dtype=dtype).expand(B, H, T, d), True),
    "last-dim-strided": (lambda g, d, dtype: rand(B, H, T, 2 * d, generator=g, dtype=dtype)[..., ::2], False),
}
DTYPES = [torch.float32, torch.bfloat16]


class CopyRecorder(TorchDispatchMode):
    """Records every copy (clone, copy_, _to_copy) whose source shares storage with a watched tensor."""

    def __init__(self, *watched):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched}
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in COPIES:
            source = args[1] if func is aten.copy_.default else args[0]
            if isinstance(source, torch.Tensor) and source.untyped_storage().data_ptr() in self.storages:
                self.copies.append(str(func))
        return func(*args, **kwargs)


def _layout(name, seed, d, dtype):
    make, in_place = LAYOUTS[name]
    tensor = make(torch.Generator().manual_seed(seed), d, dtype)
    assert not tensor.is_contiguous()
    return tensor, in_place


def _unit_layout(name, seed, d, dtype):
    """A layout of values in (0, 1), as write weights and erase strengths are: the layout's base
    tensor squashed in place, so the view keeps its strides."""
    tensor, in_place = _layout(name, seed, d, dtype)
    tensor._base.sigmoid_()
    return tensor, in_place


def _check(launch, strided, expect_in_place):
    """launch(*operands) on the strided operands (recording copies of them) and on row-major copies."""
    with CopyRecorder(*strided) as recorder:
        got = launch(*strided)
    want = launch(*(t.contiguous() for t in strided))
    if expect_in_place:
        assert recorder.copies == [], f"strided operands were copied: {recorder.copies}"
    else:
        assert recorder.copies, "an operand with a strided last dimension must be copied once"
    for g_, w_ in zip(got, want):
        if isinstance(g_, torch.Tensor):
            assert g_.is_contiguous()
            torch.testing.assert_close(g_, w_, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_topk_read_reads_strided_rows(layout, dtype):
    g = torch.Generator().manual_seed(1)
    keys, values = rand(B, 2, 40, D, generator=g, dtype=dtype), rand(B, 2, 40, 6, generator=g, dtype=dtype)
    q, in_place = _layout(layout, 2, D, dtype)
    dout, _ = _layout(layout, 3, 6, dtype)
    k, scale = 5, D ** -0.5
    fwd, bwd = topk_read_function.FWD["cpu"], topk_read_function.BWD["cpu"]
    _check(lambda q_: fwd(q_, keys, values, k, scale, None, False), [q], in_place)
    _, indices, weights, _ = fwd(q.contiguous(), keys, values, k, scale, None, False)
    dweights = rand(*weights.shape, generator=g, dtype=weights.dtype)
    dlse = rand(B, H, T, generator=g, dtype=weights.dtype)
    _check(lambda dout_, q_: bwd(dout_, dweights, dlse, q_, keys, values, indices, weights, scale, False),
           [dout, q], in_place)


@pytest.mark.parametrize("value_format", ["int8", "float8", "float32"])
@pytest.mark.parametrize("layout", ["store-prefix", "every-other-slot", "channels-strided"])
def test_quantized_read_reads_store_buffers_in_place(layout, value_format):
    """A memory store's int8 keys and its values are the first N rows of larger buffers (or any
    slots of them): read in place; a buffer whose channels are strided is copied once."""
    g = torch.Generator().manual_seed(4)
    Hm, N, Dv = 2, 40, 6

    def buffer(last, convert):
        if layout == "channels-strided":
            return convert(torch.randn(Hm, last, N, generator=g)).transpose(1, 2)
        full = convert(torch.randn(Hm, 2 * N + 3, last, generator=g))
        return full[:, :N] if layout == "store-prefix" else full[:, :2 * N:2]

    def to_int8(t):
        return (t * 40).clamp(-127, 127).to(torch.int8)

    keys = buffer(D, to_int8)
    values = buffer(Dv, {"int8": to_int8, "float8": lambda t: t.to(torch.float8_e4m3fn),
                         "float32": lambda t: t}[value_format])
    key_scale = torch.rand(Hm, D, generator=g) * 0.05 + 0.01
    value_scale = None if value_format == "float32" else torch.rand(Hm, N, generator=g) + 0.1
    q = rand(B, H, T, D, generator=g)
    k, scale = 5, D ** -0.5
    fwd, bwd = quantized_read_function.FWD["cpu"], quantized_read_function.BWD["cpu"]
    in_place = layout != "channels-strided"
    _check(lambda keys_, values_: fwd(q, keys_, key_scale, values_, k, value_scale, scale), [keys, values], in_place)
    out, indices, weights, lse = fwd(q, keys.contiguous(), key_scale, values.contiguous(), k, value_scale, scale)
    dout, dweights = rand(*out.shape, generator=g), rand(*weights.shape, generator=g)
    dlse = rand(*lse.shape, generator=g)
    _check(lambda keys_, values_: (bwd(dout, dweights, dlse, q, keys_, key_scale, values_, value_scale, indices,
                                       weights, scale),), [keys, values], True)


@pytest.mark.parametrize("sum_heads", [False, True], ids=["per-head", "sum-heads"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_product_key_reads_strided_rows(layout, sum_heads):
    dtype = torch.float32
    g = torch.Generator().manual_seed(4)
    n_sub, k, k_sub, Dv, scale = 6, 5, 3, 6, 0.5
    subkeys, values = rand(H, 2, n_sub, D // 2, generator=g), rand(n_sub ** 2, Dv, generator=g)
    q, in_place = _layout(layout, 5, D, dtype)
    dout, _ = _layout(layout, 6, Dv, dtype)
    if sum_heads:  # (B, T, Dv): the transposed case is a (T, B, Dv) tensor transposed
        dout = dout[:, 0] if layout != "head-broadcast" else rand(T, B, Dv, generator=g).transpose(0, 1)
        assert not dout.is_contiguous()
    fwd, bwd = product_key_function.FWD["cpu"], product_key_function.BWD["cpu"]
    _check(lambda q_: fwd(q_, subkeys, values, k, k_sub, scale, sum_heads, False), [q], in_place)
    _, indices, weights, _ = fwd(q.contiguous(), subkeys, values, k, k_sub, scale, sum_heads, False)
    dweights = rand(*weights.shape, generator=g)
    dlse = rand(B, H, T, generator=g)
    for sparse in (False, True):
        _check(lambda dout_, q_: bwd(dout_, dweights, dlse, q_, subkeys, values, indices, weights, scale,
                                     sum_heads, sparse, False), [dout, q], in_place)


@pytest.mark.parametrize("merge", ["joint", "gate"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_attention_reads_strided_rows(layout, merge):
    dtype = torch.float32
    g = torch.Generator().manual_seed(7)
    mem_keys, mem_values = rand(B, 2, 30, D, generator=g), rand(B, 2, 30, D, generator=g)
    q, in_place = _layout(layout, 8, D, dtype)
    k, _ = _layout(layout, 9, D, dtype)
    v, _ = _layout(layout, 10, D, dtype)
    dout, _ = _layout(layout, 11, D, dtype)
    gate = rand(1, H, 1, 1, generator=g) if merge == "gate" else None
    topk, window, scale = 4, 5, D ** -0.5
    fwd, bwd = memory_attention_function.FWD["cpu"], memory_attention_function.BWD["cpu"]
    _check(lambda q_, k_, v_: fwd(q_, k_, v_, mem_keys, mem_values, topk, window, merge, gate, scale, None,
                                  False), [q, k, v], in_place)
    out, lse_local, lse_mem, indices = fwd(q.contiguous(), k.contiguous(), v.contiguous(), mem_keys, mem_values,
                                           topk, window, merge, gate, scale, None, False)
    dlse_local, dlse_mem = rand(B, H, T, generator=g), rand(B, H, T, generator=g)
    _check(lambda dout_, q_, k_, v_: bwd(dout_, dlse_local, dlse_mem, q_, k_, v_, mem_keys, mem_values, indices,
                                         out, lse_local, lse_mem, window, merge, gate, scale, False),
           [dout, q, k, v], in_place and merge == "joint")


def _write_indices(lead, N, kw, generator, dtype):
    """Slots in [-1, N) with the same slot twice in a step, again in a later step, and skips (-1)."""
    indices = torch.randint(-1, N, (*lead, T, kw), generator=generator)
    indices[..., 0, 0] = indices[..., 0, 0].clamp_min(0)
    indices[..., 0, 1] = indices[..., 0, 0]
    indices[..., 2, 0] = indices[..., 0, 0]
    indices[..., 1, -1] = -1
    return indices.to(dtype)


@pytest.mark.parametrize("erase_one", [False, True], ids=["erase-D", "erase-1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_write_reads_strided_rows(layout, dtype, erase_one):
    g = torch.Generator().manual_seed(13)
    N, kw = 5, 3
    memory = rand(B, H, N, D, generator=g, dtype=dtype)
    indices = _write_indices((B, H), N, kw, g, torch.int32 if erase_one else torch.int64)
    weights, in_place = _unit_layout(layout, 14, kw, dtype)
    add, _ = _layout(layout, 15, D, dtype)
    erase, _ = _unit_layout(layout, 16, 1 if erase_one else D, dtype)
    fwd = memory_write_function.WRITE_FWD["cpu"]
    inplace = memory_write_function.WRITE_INPLACE["cpu"]
    bwd = memory_write_function.WRITE_BWD["cpu"]
    operands = [weights, add, erase]
    _check(lambda w, a, e: (fwd(memory, indices, w, a, e),), operands, in_place)
    _check(lambda w, a, e: (inplace(memory.clone(), indices, w, a, e),), operands, in_place)
    dnew = rand(B, H, N, D, generator=g, dtype=dtype)
    _check(lambda w, a, e: bwd(dnew, memory, indices, w, a, e), operands, in_place)
    out = fwd(memory, indices, weights, add, erase)
    assert not torch.equal(out, memory)  # the writes landed


def test_memory_write_reads_strided_rows_3d():
    """The (B, N, D) memory form: add a transposed (T, B, D), erase a slice of last size 1,
    weights broadcast over the batch."""
    g = torch.Generator().manual_seed(17)
    N, kw, dtype = 5, 3, torch.float32
    memory = rand(B, N, D, generator=g)
    indices = _write_indices((B,), N, kw, g, torch.int64)
    weights = torch.rand(1, T, kw, generator=g).expand(B, T, kw)
    add = rand(T, B, D, generator=g, dtype=dtype).transpose(0, 1)
    erase = torch.rand(B, T + 2, 1, generator=g)[:, 1:T + 1]
    operands = [weights, add, erase]
    assert not any(t.is_contiguous() for t in operands)
    fwd = memory_write_function.WRITE_FWD["cpu"]
    inplace = memory_write_function.WRITE_INPLACE["cpu"]
    bwd = memory_write_function.WRITE_BWD["cpu"]
    _check(lambda w, a, e: (fwd(memory, indices, w, a, e),), operands, True)
    _check(lambda w, a, e: (inplace(memory.clone(), indices, w, a, e),), operands, True)
    dnew = rand(B, N, D, generator=g)
    _check(lambda w, a, e: bwd(dnew, memory, indices, w, a, e), operands, True)


def test_memory_write_binding_checks_strided_operands():
    """The raw cpu kernel takes strided weights, add and erase but still refuses what it cannot
    read: a strided last dimension, a strided memory or indices, wrong leading dimensions, indices
    out of range, all before anything runs."""
    ext = _ext.cpu_extension()
    g = torch.Generator().manual_seed(18)
    N, kw = 5, 3
    memory = rand(B, H, N, D, generator=g)
    indices = _write_indices((B, H), N, kw, g, torch.int64)
    weights = torch.rand(B, T, H, kw, generator=g).transpose(1, 2)
    add = rand(B, T, H, D, generator=g).transpose(1, 2)
    erase = torch.rand(B, T, H, 1, generator=g).transpose(1, 2)
    out = torch.empty_like(memory)
    ext.gated_memory_write_fwd(memory, indices, weights, add, erase, out)
    with pytest.raises(ValueError, match="add must have a contiguous last dimension"):
        ext.gated_memory_write_fwd(memory, indices, weights, rand(B, H, T, 2 * D)[..., ::2], erase, out)
    with pytest.raises(ValueError, match="memory must be contiguous"):
        ext.gated_memory_write_fwd(memory.transpose(0, 1).contiguous().transpose(0, 1), indices, weights,
                                   add, erase, out)
    with pytest.raises(ValueError, match="indices must be contiguous"):
        ext.gated_memory_write_fwd(memory, indices.transpose(1, 2).contiguous().transpose(1, 2), weights,
                                   add, erase, out)
    with pytest.raises(ValueError, match=r"indices must have shape \(B, Hm, T, kw\)"):
        ext.gated_memory_write_fwd(memory, indices[:, :2].contiguous(), weights, add, erase, out)
    with pytest.raises(ValueError, match=r"add must have shape \(B, Hm, T, D\)"):
        ext.gated_memory_write_fwd(memory, indices, weights, add[:, :2], erase, out)
    with pytest.raises(ValueError, match="out must be contiguous"):
        ext.gated_memory_write_fwd(memory, indices, weights, add, erase,
                                   torch.empty(B, N, H, D).transpose(1, 2))
    bad = indices.clone()
    bad[0, 0, 0, 0] = N
    with pytest.raises(IndexError, match="indices must be -1 or in"):
        ext.gated_memory_write_fwd(memory, bad, weights, add, erase, out)
    grads = [torch.empty(t.shape) for t in (memory, weights, add, erase)]
    ext.gated_memory_write_bwd(torch.ones_like(memory), memory, indices, weights, add, erase, *grads)
    with pytest.raises(ValueError, match="dadd must be contiguous"):
        ext.gated_memory_write_bwd(torch.ones_like(memory), memory, indices, weights, add, erase, grads[0],
                                   grads[1], torch.empty(B, T, H, D).transpose(1, 2), grads[3])


def test_memory_write_operand_viewing_the_memory_written_in_place():
    """An add that is a slice of the memory written in place: the kernel, reading it in place,
    refuses it (even though a slice is not dense, where at::assert_no_overlap cannot tell); the
    in-place write reads it from a copy, as before, with the results of a separate add."""
    g = torch.Generator().manual_seed(19)
    N, kw = T + 3, 3
    memory = rand(B, H, N, D, generator=g)
    indices = _write_indices((B, H), N, kw, g, torch.int64)
    weights = torch.rand(B, H, T, kw, generator=g)
    erase = torch.rand(B, H, T, D, generator=g)
    add = memory[:, :, 2:T + 2]
    assert not add.is_contiguous()
    with pytest.raises(RuntimeError, match="out overlaps add"):
        _ext.cpu_extension().gated_memory_write_fwd(memory, indices, weights, add, erase, memory)
    want = l2m.gated_memory_write(memory, indices, weights, add.clone(), erase, backend="cpu")
    l2m.gated_memory_write(memory, indices, weights, add, erase, inplace=True, backend="cpu")
    torch.testing.assert_close(memory, want, rtol=0, atol=0)


DENSE_INPUTS = {  # name -> the four inputs of gated_dense_update (B, Hm, N, D) = (2, 3, 5, 37)
    "broadcast-gates": lambda g, dtype: (
        rand(2, 3, 5, 37, generator=g, dtype=dtype), rand(2, 3, 5, 37, generator=g, dtype=dtype),
        rand(2, 3, 5, 1, generator=g, dtype=dtype), rand(1, 3, 1, 37, generator=g, dtype=dtype)),
    "transposed-update": lambda g, dtype: (
        rand(2, 3, 5, 37, generator=g, dtype=dtype),
        rand(2, 5, 3, 37, generator=g, dtype=dtype).transpose(1, 2),
        rand(2, 3, 5, 1, generator=g, dtype=dtype), rand(2, 3, 5, 1, generator=g, dtype=dtype)),
    "scalar-gates-3d": lambda g, dtype: (
        rand(4, 9, 37, generator=g, dtype=dtype), rand(4, 9, 37, generator=g, dtype=dtype),
        rand(generator=g, dtype=dtype), rand(4, 1, 1, generator=g, dtype=dtype)),
    "last-dim-strided": lambda g, dtype: (
        rand(2, 3, 37, 5, generator=g, dtype=dtype).transpose(-1, -2),
        rand(2, 3, 5, 37, generator=g, dtype=dtype), rand(2, 3, 5, 1, generator=g, dtype=dtype),
        rand(2, 3, 5, 1, generator=g, dtype=dtype)),
}


def _dense_flat(inputs, dout):
    """The flat path (every input materialised contiguous at the broadcast shape, as the launcher
    did before it read strides): the output and the four gradients at the broadcast shape, in acc."""
    ext = _ext.cpu_extension()
    full = tuple(t.contiguous() for t in torch.broadcast_tensors(*inputs))
    out = torch.empty_like(full[0])
    ext.gated_dense_update_fwd(*full, out)
    acc = torch.float64 if full[0].dtype == torch.float64 else torch.float32
    grads = tuple(torch.empty(full[0].shape, dtype=acc) for _ in full)
    ext.gated_dense_update_bwd(dout.contiguous(), *full, *grads)
    return out, grads


def _summed_along_rows(t, shape):
    """Whether the cpu kernel sums t's gradient along the last dimension (t broadcast along it)."""
    return len(shape) > 0 and shape[-1] > 1 and (t.dim() == 0 or t.shape[-1] == 1)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", DENSE_INPUTS)
def test_dense_update_reads_broadcast_and_strided_inputs(case, dtype):
    """Gates broadcast over any dimension (stride 0) and transposed inputs are read where they lie,
    not materialised at the broadcast shape; the output and the gradients that torch reduces are
    bitwise the flat path's, and a gate broadcast along the last dimension has its gradient summed
    along the rows by the kernel, to within a few roundings of the same elementwise gradients'
    float64 sum."""
    inputs = DENSE_INPUTS[case](torch.Generator().manual_seed(13), dtype)
    shape = torch.broadcast_shapes(*(t.shape for t in inputs))
    dout = rand(*shape, generator=torch.Generator().manual_seed(14), dtype=dtype)
    fwd, bwd = memory_write_function.DENSE_FWD["cpu"], memory_write_function.DENSE_BWD["cpu"]
    with CopyRecorder(*inputs) as recorder:
        out = fwd(*inputs)
        grads = bwd(dout, *inputs)
    if case == "last-dim-strided":  # memory's last dimension has stride 5: copied once per call
        assert recorder.copies and all("clone" in c for c in recorder.copies), recorder.copies
    else:
        assert recorder.copies == [], f"inputs were copied: {recorder.copies}"
    want_out, full_grads = _dense_flat(inputs, dout)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0, equal_nan=True)
    names = ("dmemory", "dupdate", "dinput_gate", "dforget_gate")
    for name, got, full, t in zip(names, grads, full_grads, inputs):
        assert got.shape == t.shape, name
        if not _summed_along_rows(t, shape):  # summed by torch, as the flat path does: bitwise
            want = full.sum_to_size(t.shape).to(t.dtype)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)
            continue
        # Summed along the rows by the kernel in its own order: within a few roundings of the float64
        # sum of the same elementwise gradients, relative to the sum of their magnitudes.
        want = full.double().sum_to_size(t.shape)
        scale = full.double().abs().sum_to_size(t.shape)
        ulp = torch.finfo(t.dtype).eps
        error = (got.double() - want).abs()
        assert (error <= 8 * torch.finfo(full.dtype).eps * scale + ulp * want.abs()).all(), \
            f"{name}: {(error / scale).max().item():.2e} of the magnitudes"


def test_dense_update_binding_checks_strided_inputs():
    """The binding takes 4-D views whose last dimension has stride 1 or 0, and nothing else."""
    ext = _ext.cpu_extension()
    m = rand(2, 3, 4, 5)
    gate = rand(2, 3, 4, 1).expand(2, 3, 4, 5)
    out = torch.empty(2, 3, 4, 5)
    ext.gated_dense_update_fwd(m, m, gate, gate, out)
    torch.testing.assert_close(out, torch.sigmoid(gate) * m + torch.sigmoid(gate) * torch.tanh(m))
    with pytest.raises(ValueError, match="update must have a contiguous last dimension"):
        ext.gated_dense_update_fwd(m, m.transpose(-1, -2).contiguous().transpose(-1, -2), gate, gate, out)
    with pytest.raises(ValueError, match="4-D views"):
        ext.gated_dense_update_fwd(m.view(6, 4, 5), m.view(6, 4, 5), gate.reshape(6, 4, 5)[:, :, :1].expand(6, 4, 5),
                                   m.view(6, 4, 5), out.view(6, 4, 5))
    # The gradient of a gate broadcast along the last dimension may be its row sums (S0, S1, S2, 1);
    # an input that is not broadcast along it must get the full gradient.
    dout = rand(2, 3, 4, 5)
    full = [torch.empty(2, 3, 4, 5) for _ in range(4)]
    ext.gated_dense_update_bwd(dout, m, m, gate, gate, *full)
    rows = [torch.full((2, 3, 4, 1), float("nan")) for _ in range(2)]
    ext.gated_dense_update_bwd(dout, m, m, gate, gate, full[0], full[1], *rows)
    for summed, elementwise in zip(rows, full[2:]):
        torch.testing.assert_close(summed, elementwise.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="dmemory must have shape like memory"):
        ext.gated_dense_update_bwd(dout, m, m, gate, gate, rows[0], *full[1:])
    # A broadcast gate that views the output's own storage: read while written, so refused before
    # the kernel runs, and the storage is left as it was.
    storage = rand(2, 3, 4, 5)
    before = storage.clone()
    with pytest.raises(RuntimeError, match="out overlaps input_gate"):
        ext.gated_dense_update_fwd(m, m, storage[..., :1].expand(2, 3, 4, 5), gate, storage)
    assert torch.equal(storage, before)


def test_model_layout_end_to_end():
    """Through the public function: a transposed projection's q gives the gradients of the row-major
    call (tests/test_compile_training.py trains such inputs under torch.compile)."""
    g = torch.Generator().manual_seed(12)
    base = rand(1, 64, 4, 16, generator=g)
    keys, values = rand(1, 4, 128, 16, generator=g), rand(1, 4, 128, 16, generator=g)

    def grads(transpose):
        q = base.transpose(1, 2) if transpose else base.transpose(1, 2).contiguous()
        q = q.detach().requires_grad_()
        out = l2m.topk_memory_read(q, keys, values, 8, backend="cpu").out.transpose(1, 2)  # (1, 64, 4, 16)
        (out.reshape(1, 64, 64) * torch.arange(64.0).view(1, 64, 1)).sum().backward()  # dout is transposed
        return q.grad

    want = grads(transpose=False)
    assert want.abs().sum() > 0
    torch.testing.assert_close(grads(transpose=True), want, rtol=0, atol=0)
