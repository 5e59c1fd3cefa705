"""The cpu kernels write outputs of 8 MiB or more with streaming stores (``stream_row`` in
csrc/cpu/convert.h; smaller ones as usual). Rows are independent in the merges and the dense
update, so an op over a batch large enough to stream gives, bitwise, the results of the same op run
on slices of that batch that are too small to stream: every output and every gradient, with row
lengths whose rows start at any alignment."""
import pytest
import torch

import l2m_kernels as l2m

STREAM_MIN_BYTES = 8 * 2**20  # kStreamMinBytes

pytestmark = pytest.mark.skipif("cpu" not in l2m.available_backends("cpu"), reason="cpu backend unavailable")


def _run(fn, inputs, cotangents):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, cotangents)
    return [o.detach() for o in outs] + [t.grad for t in inputs]


def _streamed_equals_sliced(fn, inputs, cotangents, pieces=4):
    whole = _run(fn, inputs, cotangents)
    parts = [_run(fn, [t.chunk(pieces)[i] for t in inputs], [c.chunk(pieces)[i] for c in cotangents])
             for i in range(pieces)]
    for i, tensor in enumerate(whole):
        torch.testing.assert_close(tensor, torch.cat([p[i] for p in parts]), rtol=0, atol=0)


def _batch(dim):
    """A batch whose (batch, 2, 256, dim) float32 output streams, a quarter of which does not."""
    batch = -(-STREAM_MIN_BYTES // (2 * 256 * dim * 4))
    assert batch * 2 * 256 * dim * 4 >= STREAM_MIN_BYTES > batch // 4 * 2 * 256 * dim * 4
    return batch + (-batch) % 4


@pytest.mark.parametrize("dim", [64, 67])
def test_merges_stream_bitwise_as_unstreamed(dim):
    gen = torch.Generator().manual_seed(dim)
    shape = (_batch(dim), 2, 256, dim)
    a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    lse_a, lse_b = torch.randn(shape[:-1], generator=gen), torch.randn(shape[:-1], generator=gen)
    gate = torch.randn(shape[:-1] + (1,), generator=gen)
    dout, dlse = torch.randn(shape, generator=gen), torch.randn(shape[:-1], generator=gen)
    _streamed_equals_sliced(lambda a_, la, b_, lb: l2m.merge_attention(a_, la, b_, lb, backend="cpu"),
                            [a, lse_a, b, lse_b], [dout, dlse])
    _streamed_equals_sliced(lambda a_, b_, g: l2m.gated_merge(a_, b_, g, backend="cpu"), [a, b, gate], [dout])


@pytest.mark.parametrize("dim,gate_dim", [(64, 1), (67, 67)])
def test_dense_update_streams_bitwise_as_unstreamed(dim, gate_dim):
    gen = torch.Generator().manual_seed(dim)
    shape = (_batch(dim), 2, 256, dim)
    memory, update = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    gates = [torch.randn(shape[:-1] + (gate_dim,), generator=gen) for _ in range(2)]
    _streamed_equals_sliced(lambda m, u, i, f: l2m.gated_dense_update(m, u, i, f, backend="cpu"),
                            [memory, update, *gates], [torch.randn(shape, generator=gen)])
