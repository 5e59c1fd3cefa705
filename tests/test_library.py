"""torch.library integration: every op is a custom op under torch.ops.l2m with a fake kernel and
registered autograd (checked by torch.library.opcheck), and a function calling every op compiles
under torch.compile(fullgraph=True) on CPU, forward and backward."""
import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels import _ext
from l2m_kernels.testing import assert_close, rand, rand_lse, rand_unit

B, H, Hm, T, N, D, Dv = 2, 4, 2, 5, 13, 8, 6
F64 = torch.float64


def g(*shape, dtype=F64, requires_grad=True):
    return rand(*shape, dtype=dtype, requires_grad=requires_grad)


def merge_backends():
    names = ["reference"]
    if _ext.cpu_extension() is not None:
        names.append("cpu")
    return names


def op_cases():
    cases = []
    for backend in merge_backends():
        cases.append((f"merge_attention-{backend}", torch.ops.l2m.merge_attention.default,
                      (g(B, H, T, D), g(B, H, T), g(B, H, T, D), g(B, H, T), backend)))
        cases.append((f"gated_merge-{backend}", torch.ops.l2m.gated_merge.default,
                      (g(B, H, T, D), g(B, H, T, D), g(H, 1, 1), backend)))
    if _ext.cpu_extension() is not None and hasattr(_ext.cpu_extension(), "topk_read_fwd"):
        cases.append(("topk_memory_read-cpu", torch.ops.l2m.topk_memory_read.default,
                      (g(B, H, T, D), g(B, Hm, N, D), g(B, Hm, N, Dv), 3, D ** -0.5, torch.tensor([N, 4]), False,
                       "cpu")))
    cases += [
        ("topk_memory_read", torch.ops.l2m.topk_memory_read.default,
         (g(B, H, T, D), g(B, Hm, N, D), g(B, Hm, N, Dv), 3, D ** -0.5, None, False, "reference")),
        ("topk_memory_read-valid_len-shared", torch.ops.l2m.topk_memory_read.default,
         (g(B, H, T, D), g(Hm, N, D), g(Hm, N, Dv), 4, 0.3, torch.tensor([2, N]), True, "reference")),
        ("product_key_read", torch.ops.l2m.product_key_read.default,
         (g(B, H, T, D), g(H, 2, 4, D // 2), g(16, Dv), 3, 3, D ** -0.5, False, False, False, "reference")),
        ("product_key_read-sum_heads", torch.ops.l2m.product_key_read.default,
         (g(B, H, T, D), g(H, 2, 4, D // 2), g(16, Dv), 5, 4, 0.5, True, False, False, "reference")),
        ("gated_memory_write", torch.ops.l2m.gated_memory_write.default,
         (g(B, Hm, N, D), torch.randint(-1, N, (B, Hm, T, 2)), rand_unit(B, Hm, T, 2, dtype=F64).requires_grad_(),
          g(B, Hm, T, D), rand_unit(B, Hm, T, 1, dtype=F64).requires_grad_(), "reference")),
        ("gated_memory_write_", torch.ops.l2m.gated_memory_write_.default,
         (g(B, N, D, requires_grad=False), torch.randint(-1, N, (B, T, 3), dtype=torch.int32),
          rand_unit(B, T, 3, dtype=F64), g(B, T, D, requires_grad=False), rand_unit(B, T, D, dtype=F64),
          "reference")),
        ("gated_dense_update", torch.ops.l2m.gated_dense_update.default,
         (g(B, N, D), g(B, N, D), g(B, 1, D), g(1, N, 1), "reference")),
        ("memory_attention-joint", torch.ops.l2m.memory_attention.default,
         (g(B, H, T, D), g(B, 2, 7, D), g(B, 2, 7, Dv), g(B, Hm, N, D), g(B, Hm, N, Dv), 3, 4, "joint", None,
          D ** -0.5, None, False, "reference")),
        ("memory_attention-gate", torch.ops.l2m.memory_attention.default,
         (g(B, H, T, D), g(B, 2, 7, D), g(B, 2, 7, Dv), g(Hm, N, D), g(Hm, N, Dv), 2, None, "gate", g(H, 1, 1),
          0.4, torch.tensor([N, 1]), False, "reference")),
    ]
    return cases


CASES = op_cases()


@pytest.mark.parametrize("name,op,args", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_every_public_op_has_a_custom_op():
    for name in ("topk_memory_read", "product_key_read", "gated_memory_write", "gated_memory_write_",
                 "gated_dense_update", "merge_attention", "gated_merge", "memory_attention"):
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
    return (blended.sum() + lse.sum() + dense.square().sum() + attn.out.sum() + attn.lse_mem.sum()
            + read.weights.sum())


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
