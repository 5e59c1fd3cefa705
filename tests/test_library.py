"""torch.library integration: every op is a custom op under torch.ops.l2m with a fake kernel and
registered autograd (checked by torch.library.opcheck on valid cases of every declared op, drawn by
its fuzz strategy), and a function calling every op compiles under torch.compile(fullgraph=True) on
CPU, forward and backward."""
import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels import fuzz
from l2m_kernels.ops import registry
from l2m_kernels.testing import assert_close, rand, rand_lse, rand_unit

B, H, Hm, T, N, D, Dv = 2, 4, 2, 5, 13, 8, 6
F64 = torch.float64


def g(*shape, dtype=F64, requires_grad=True):
    return rand(*shape, dtype=dtype, requires_grad=requires_grad)


OPCHECK_BACKENDS = ("reference", "cpu")
PAIRS = [(op, backend) for op in registry.OPS for backend in OPCHECK_BACKENDS]


def _fresh_if_empty(arg):
    # opcheck copies its inputs with torch._dynamo.utils.clone_input, whose storage size of an
    # empty strided view can be negative ("negative dimension -1"); an empty tensor's layout is moot.
    if isinstance(arg, torch.Tensor) and arg.numel() == 0:
        return torch.empty(arg.shape, dtype=arg.dtype, device=arg.device).requires_grad_(arg.requires_grad)
    return arg


# opcheck's test_schema compares each input before and after the call with arithmetic that float8
# tensors do not implement ("mul_cpu_reduced_float"); a call with float8 values (quantized_topk_read)
# runs the other checks.
_FLOAT8_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck(case):
    op, args = fuzz.custom_op_call(case)
    float8 = any(isinstance(arg, torch.Tensor) and arg.dtype == torch.float8_e4m3fn for arg in args)
    torch.library.opcheck(op, tuple(_fresh_if_empty(arg) for arg in args),
                          **(dict(test_utils=_FLOAT8_TESTS) if float8 else {}))


@pytest.mark.parametrize("op,backend", PAIRS, ids=[f"{op}-{backend}" for op, backend in PAIRS])
def test_opcheck(op, backend):
    """torch.library.opcheck (schema, autograd registration, fake kernel, AOT dispatch) of each
    declared op's custom op on valid cases drawn by its fuzz strategy (in-place writes through the
    ``<name>_`` variant)."""
    why = fuzz.backend_unavailable(op, backend)
    if why:
        pytest.skip(why)
    fuzz.each_case(op, backend, _opcheck, examples=4, device=torch.device("cpu"))


def test_every_public_op_has_a_custom_op():
    for name in list(registry.OPS) + ["gated_memory_write_"]:
        assert hasattr(torch.ops.l2m, name), name


def _all_ops(q, keys, values, subkeys, pk_values, memory, w_idx, w_weights, add, erase, k_ctx, v_ctx, gate,
             backend=None):
    read = l2m.topk_memory_read(q, keys, values, 3, backend=backend)
    pk = l2m.product_key_read(q, subkeys, pk_values, 4, backend=backend)
    merged, lse = l2m.merge_attention(read.out, read.lse, pk.out, pk.lse, backend=backend)
    blended = l2m.gated_merge(merged, pk.out, gate, backend=backend)
    new_memory = l2m.gated_memory_write(memory, w_idx, w_weights, add, erase, backend=backend)
    dense = l2m.gated_dense_update(new_memory, memory, erase.mean(-2, keepdim=True), add.mean(-2, keepdim=True),
                                   backend=backend)
    attn = l2m.memory_attention(q, k_ctx, v_ctx, keys, values, 3, window=3, backend=backend)
    quantized = l2m.quantized_topk_read(q, *_INT8_MEMORY, 4, value_scale=_VALUE_SCALE, backend=backend)
    return (blended.sum() + lse.sum() + dense.square().sum() + attn.out.sum() + attn.lse_mem.sum()
            + read.weights.sum() + quantized.out.sum() + quantized.lse.sum())


# An int8 memory (keys, channel scales, int8 values) and its entry scales: stored state, no gradient.
_INT8_MEMORY = (torch.randint(-127, 128, (Hm, N, D), generator=torch.Generator().manual_seed(5)).to(torch.int8),
                torch.full((Hm, D), 0.02), torch.randint(-127, 128, (Hm, N, D), dtype=torch.int8,
                                                         generator=torch.Generator().manual_seed(6)))
_VALUE_SCALE = torch.full((Hm, N), 0.01)


def _inputs():
    torch.manual_seed(3)
    return dict(q=g(B, H, T, D, dtype=torch.float32), keys=g(B, Hm, N, D, dtype=torch.float32),
                values=g(B, Hm, N, D, dtype=torch.float32), subkeys=g(H, 2, 4, D // 2, dtype=torch.float32),
                pk_values=g(16, D, dtype=torch.float32), memory=g(B, Hm, N, D, dtype=torch.float32),
                w_idx=torch.randint(-1, N, (B, Hm, T, 2)),
                w_weights=rand_unit(B, Hm, T, 2).requires_grad_(), add=g(B, Hm, T, D, dtype=torch.float32),
                erase=rand_unit(B, Hm, T, D).requires_grad_(), k_ctx=g(B, 2, 7, D, dtype=torch.float32),
                v_ctx=g(B, 2, 7, D, dtype=torch.float32), gate=g(H, 1, 1, dtype=torch.float32))


def _value_and_grads(fn, inputs):
    leaves = {k: (v.detach().clone().requires_grad_(v.requires_grad)) for k, v in inputs.items()}
    loss = fn(**leaves)
    diff = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in diff])
    return loss.detach(), dict(zip(diff, grads))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_torch_compile_fullgraph_every_op(backend):
    torch._dynamo.reset()
    fn = lambda **kw: _all_ops(**kw, backend=backend)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = _inputs()
    want, want_grads = _value_and_grads(fn, inputs)
    got, got_grads = _value_and_grads(compiled, inputs)
    assert_close("loss", got, want)
    for k in want_grads:
        assert_close(f"d{k}", got_grads[k], want_grads[k], tol=1e-4)


def test_torch_compile_inductor_custom_ops():
    """The custom-op path (opaque kernels) under the default inductor backend, forward and backward."""
    torch._dynamo.reset()

    def fn(q, keys, values, out_b, lse_b, gate):
        read = torch.ops.l2m.topk_memory_read(q, keys, values, 3, 0.5, None, False, "reference")
        out, lse = l2m.merge_attention(read[0], read[3], out_b, lse_b)
        return (l2m.gated_merge(out, out_b, gate) * 2).sum() + lse.sum()

    inputs = dict(q=g(B, H, T, D, dtype=torch.float32), keys=g(B, Hm, N, D, dtype=torch.float32),
                  values=g(B, Hm, N, D, dtype=torch.float32), out_b=g(B, H, T, D, dtype=torch.float32),
                  lse_b=rand_lse(B, H, T).requires_grad_(), gate=g(H, 1, 1, dtype=torch.float32))
    want, want_grads = _value_and_grads(fn, inputs)
    got, got_grads = _value_and_grads(torch.compile(fn, fullgraph=True), inputs)
    assert_close("loss", got, want)
    for k in want_grads:
        assert_close(f"d{k}", got_grads[k], want_grads[k], tol=1e-4)
