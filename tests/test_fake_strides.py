"""The fake kernels (what ``torch.compile`` plans with) and the real kernels agree on every output's
shape, dtype and strides, forward and backward, for inputs of any layout.

``CrossRefFakeMode`` runs each ``torch.ops.l2m`` call twice, on fake and on real tensors, and
raises on any mismatch; a forward and a backward through each op on every backend usable here, with
inputs laid out as models produce them (transposed views, slices, stride-0 expansions), exercises
every forward and backward op. This is the check that catches a fake kernel returning
``torch.empty_like`` of a transposed input while the kernel returns a row-major tensor.
"""
import pytest
import torch
from torch._subclasses import CrossRefFakeMode

import l2m_kernels as l2m
from l2m_kernels.backends import BACKENDS

CPU = torch.device("cpu")
B, H, Hm, T, N, D = 2, 4, 2, 5, 13, 8


def _backends(op):
    params = []
    for name in ("reference", "cpu", "triton"):
        reasons = BACKENDS[name].not_supported_reasons(op, CPU, torch.float32)
        marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(reasons))] if reasons else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _t(*shape):
    """(d0, .., d-3, d-2, d-1) as the transpose of a (.., d-2 and d-3 swapped, ..) tensor: the layout
    of ``proj(x).view(B, T, H, D).transpose(1, 2)``."""
    base = torch.randn(*shape[:-3], shape[-2], shape[-3], shape[-1]) if len(shape) >= 3 else torch.randn(*shape)
    t = base.transpose(-3, -2) if len(shape) >= 3 else base
    return t.requires_grad_()


def _leaf(tensor):
    return tensor.detach().requires_grad_()


def _run(fn):
    with CrossRefFakeMode(ignore_op_fn=lambda op: op.namespace != "l2m"):
        outputs = fn()
        loss = sum(o.float().sum() for o in outputs if o.is_floating_point() and o.requires_grad)
        loss.backward()


@pytest.mark.parametrize("backend", _backends("topk_memory_read"))
def test_topk_memory_read(backend):
    q = _t(B, H, T, D)
    keys = _leaf(torch.randn(Hm, 2 * N, D)[:, ::2])                        # strided slots
    values = _leaf(torch.randn(N, Hm, D)).transpose(0, 1)
    per_batch = _leaf(torch.randn(Hm, N, D)).unsqueeze(0).expand(B, -1, -1, -1)   # stride 0
    _run(lambda: l2m.topk_memory_read(q, keys, values, 4, backend=backend))
    _run(lambda: l2m.topk_memory_read(q, per_batch, per_batch, 3, valid_len=torch.tensor([N, 2]),
                                      backend=backend))
    if backend != "reference":  # its backward op runs torch.func.vjp, which CrossRefFakeMode cannot host
        _run(lambda: torch.ops.l2m.topk_memory_read(q, per_batch, per_batch, 3, backend=backend))


@pytest.mark.parametrize("backend", _backends("product_key_read"))
def test_product_key_read(backend):
    q = _t(B, H, T, D)
    subkeys = _leaf(torch.randn(H, 2, D // 2, 5)).transpose(-1, -2)
    values = _leaf(torch.randn(D, 25)).t()
    _run(lambda: l2m.product_key_read(q, subkeys, values, 4, backend=backend))
    _run(lambda: l2m.product_key_read(q, subkeys, values, 3, sum_heads=True, backend=backend))


@pytest.mark.parametrize("backend", _backends("gated_memory_write"))
def test_gated_memory_write(backend):
    memory = _t(B, Hm, N, D)
    indices = torch.randint(-1, N, (B, T, Hm, 2)).transpose(1, 2)
    weights = _leaf(torch.rand(B, T, Hm, 2)).transpose(1, 2)
    add = _t(B, Hm, T, D)
    erase = _leaf(torch.rand(B, T, Hm, 1)).transpose(1, 2)
    _run(lambda: (l2m.gated_memory_write(memory, indices, weights, add, erase, backend=backend),))
    state = torch.randn(B, N, Hm, D).transpose(1, 2)
    with CrossRefFakeMode(ignore_op_fn=lambda op: op.namespace != "l2m"), torch.no_grad():
        l2m.gated_memory_write(state, indices, weights, add, erase, inplace=True, backend=backend)


@pytest.mark.parametrize("backend", _backends("gated_dense_update"))
def test_gated_dense_update(backend):
    memory = _t(B, Hm, N, D)
    update = _t(B, Hm, N, D)
    input_gate = _leaf(torch.randn(Hm, 1, 1)).expand(B, Hm, N, 1)
    forget_gate = _leaf(torch.randn(D))
    _run(lambda: (l2m.gated_dense_update(memory, update, input_gate, forget_gate, backend=backend),))


@pytest.mark.parametrize("backend", _backends("merge_attention"))
def test_merges(backend):
    out_a, out_b = _t(B, H, T, D), _t(B, H, T, D)
    lse_a = _leaf(torch.randn(B, T, H)).transpose(1, 2)
    lse_b = _leaf(torch.randn(B, H, 2 * T))[..., ::2]
    gate = _leaf(torch.randn(H, 1, 1)).expand(B, H, T, 1)
    _run(lambda: l2m.merge_attention(out_a, lse_a, out_b, lse_b, backend=backend))
    _run(lambda: (l2m.gated_merge(out_a, out_b, gate, backend=backend),))


@pytest.mark.parametrize("merge", ["joint", "gate"])
@pytest.mark.parametrize("backend", _backends("memory_attention"))
def test_memory_attention(backend, merge):
    q, k, v = _t(B, H, T, D), _t(B, Hm, T + 3, D), _t(B, Hm, T + 3, D)
    mem = _leaf(torch.randn(Hm, N, D)).unsqueeze(0).expand(B, -1, -1, -1)
    gate = _leaf(torch.randn(H, 1, 1)) if merge == "gate" else None
    _run(lambda: l2m.memory_attention(q, k, v, mem, _t(B, Hm, N, D), 3, window=4, merge=merge, gate=gate,
                                      backend=backend))
