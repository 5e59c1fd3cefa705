"""quantized_topk_read on the reference and cpu backends against the float64 reference: outputs and
the gradient of q by relative RMS error, the selection slot for slot, on inputs as a model and a
memory store produce them (q transposed from a projection and sliced, keys and values narrowed from
a larger buffer), for every value format, and under torch.compile and autocast. Outputs are
pre-filled with NaN (the suite's ``poison`` fixture), so an element a kernel leaves unwritten fails."""
import math

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.quantized_read.reference import quantized_read_gather, quantized_topk_read_ref
from l2m_kernels.testing import assert_close, fused_backend_params, lse_dtype

BACKENDS = [pytest.param("reference", "cpu", id="reference")] + fused_backend_params("quantized_topk_read")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
VALUES = ["int8", "float8", "float32", "bfloat16"]
# (B, H, Hm, T, N, Dk, Dv, k)
SHAPES = [(2, 4, 2, 7, 50, 16, 8, 8), (1, 3, 1, 5, 33, 13, 1, 33), (1, 2, 2, 3, 1, 7, 5, 1),
          (0, 2, 1, 3, 10, 8, 8, 3), (1, 2, 1, 70, 700, 64, 40, 32)]
SHAPE_IDS = ["grouped", "k=N,Dv=1", "N=1", "B=0", "wide"]


def _store(Hm, N, Dk, Dv, values, *, spare=5, seed=0):
    """int8 keys and values as a store holds them: the first N of N + spare rows of its buffers."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-127, 128, (Hm, N + spare, Dk), generator=g).to(torch.int8)[:, :N]
    key_scale = (0.5 + torch.rand(Hm, Dk, generator=g)) * 0.02
    value_scale = None
    if values == "int8":
        stored = torch.randint(-127, 128, (Hm, N + spare, Dv), generator=g).to(torch.int8)[:, :N]
        value_scale = torch.rand(Hm, N + spare, generator=g)[:, :N] + 0.01
    elif values == "float8":
        stored = (torch.randn(Hm, N + spare, Dv, generator=g) * 100).clamp(-448, 448)
        stored = stored.to(torch.float8_e4m3fn)[:, :N]
        value_scale = torch.rand(Hm, N + spare, generator=g)[:, :N] + 0.01
    else:
        stored = torch.randn(Hm, N + spare, Dv, generator=g).to(getattr(torch, values))[:, :N]
    return keys, key_scale, stored, value_scale


def _queries(B, H, T, Dk, dtype, seed=1):
    """(B, H, T, Dk) transposed from a (B, T, H, Dk) projection and sliced from a longer sequence."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T + 2, H, Dk, generator=g).to(dtype)[:, 1:T + 1].transpose(1, 2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, device, shape, values, dtype):
    B, H, Hm, T, N, Dk, Dv, k = shape
    keys, key_scale, stored, value_scale = _store(Hm, N, Dk, Dv, values)
    q = _queries(B, H, T, Dk, dtype).requires_grad_(True)
    read = l2m.quantized_topk_read(q, keys, key_scale, stored, k, value_scale=value_scale, scale=0.3,
                                   backend=backend)
    acc = lse_dtype(dtype)
    assert read.out.dtype == dtype and read.out.shape == (B, H, T, Dv)
    assert read.weights.dtype == acc and read.lse.dtype == acc and read.indices.shape == (B, H, T, k)
    # The selection is the reference's, slot for slot (the float32 qe is the same whatever q's dtype).
    q64 = q.detach().double().requires_grad_(True)
    want_indices = quantized_topk_read_ref(q64, keys, key_scale, stored, k, value_scale, 0.3)[1]
    assert torch.equal(read.indices, want_indices)
    want = quantized_read_gather(q64, keys, key_scale, stored, want_indices, value_scale, 0.3)
    for name, got, ref in zip(("out", "weights", "lse"), (read.out, read.weights, read.lse), want):
        assert_close(name, got, ref, dtype)
    dout = torch.randn(read.out.shape).to(dtype)
    dlse = torch.randn(read.lse.shape, dtype=acc)
    (dq,) = torch.autograd.grad((read.out, read.lse), q, (dout, dlse))
    (want_dq,) = torch.autograd.grad((want[0], want[2]), q64, (dout.double(), dlse.double()))
    assert dq.dtype == dtype and dq.shape == q.shape
    assert_close("dq", dq, want_dq, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_extremes_and_nan(backend, device):
    """Identical key rows are read smaller slot first; keys of +-127 are exact; a NaN query row
    reads the first k slots and is NaN, the other rows are untouched."""
    keys = torch.randint(-127, 128, (1, 40, 32), generator=torch.Generator().manual_seed(2)).to(torch.int8)
    keys[0, 5] = 127
    keys[0, 6] = -127
    keys[0, 20:] = keys[0, :20]                                   # slot 20 + i repeats slot i
    key_scale = torch.full((1, 32), 0.01)
    values = torch.randn(1, 40, 4)
    q = torch.randn(2, 2, 3, 32)
    read = l2m.quantized_topk_read(q, keys, key_scale, values, 40, backend=backend)
    ids = read.indices.tolist()
    for row in (r for b in ids for h in b for r in h):
        for i in range(20):
            assert row.index(i) < row.index(20 + i)
    assert torch.equal(read.indices, quantized_topk_read_ref(q, keys, key_scale, values, 40)[1])
    q[1, 0, 2, 3] = math.nan
    read = l2m.quantized_topk_read(q, keys, key_scale, values, 3, backend=backend)
    assert read.indices[1, 0, 2].tolist() == [0, 1, 2]
    assert torch.isnan(read.out[1, 0, 2]).all() and torch.isnan(read.lse[1, 0, 2])
    finite = torch.ones(2, 2, 3, dtype=torch.bool)
    finite[1, 0, 2] = False
    assert torch.isfinite(read.out[finite]).all() and torch.isfinite(read.lse[finite]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_arguments_raise_naming_them_before_any_kernel_runs(backend, device):
    keys, key_scale, values, value_scale = _store(2, 9, 8, 4, "int8")
    q = torch.randn(1, 4, 3, 8)

    def read(**over):
        args = dict(q=q, keys=keys, key_scale=key_scale, values=values, k=3, value_scale=value_scale)
        args.update(over)
        return l2m.quantized_topk_read(args.pop("q"), args.pop("keys"), args.pop("key_scale"), args.pop("values"),
                                       args.pop("k"), backend=backend, **args)

    bad_keys = keys.clone()
    bad_keys[1, 4, 2] = -128
    with pytest.raises(ValueError, match=r"^keys: .*-128"):
        read(keys=bad_keys)
    with pytest.raises(ValueError, match=r"^keys: .*-128"):
        read(q=torch.randn(0, 4, 3, 8), keys=bad_keys)            # no query: checked all the same
    for bad in (0.0, -1.0, math.inf, math.nan):
        scales = key_scale.clone()
        scales[0, 3] = bad
        with pytest.raises(ValueError, match=r"^key_scale: "):
            read(key_scale=scales)
    with pytest.raises(TypeError, match=r"^keys: "):
        read(keys=keys.float())
    with pytest.raises(ValueError, match=r"^value_scale: "):
        read(value_scale=None)
    with pytest.raises(ValueError, match=r"^value_scale: "):
        read(values=values.float())
    with pytest.raises(ValueError, match=r"^k: "):
        read(k=10)
    with pytest.raises(ValueError, match=r"^keys: .*divide"):
        read(q=torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match=r"^values: .*stored state"):
        read(values=values.float().requires_grad_(True), value_scale=None)
    with torch.no_grad():                                          # nothing to differentiate: accepted
        read(values=values.float().requires_grad_(True), value_scale=None)


def test_backends_agree_bitwise_on_the_selection_and_closely_on_the_read():
    keys, key_scale, values, value_scale = _store(2, 300, 64, 16, "float8")
    q = _queries(2, 4, 9, 64, torch.float32)
    reference = l2m.quantized_topk_read(q, keys, key_scale, values, 16, value_scale=value_scale, backend="reference")
    auto = l2m.quantized_topk_read(q, keys, key_scale, values, 16, value_scale=value_scale)
    assert torch.equal(auto.indices, reference.indices)
    assert_close("out", auto.out, reference.out.double(), torch.float32)


def test_training_step_under_torch_compile_matches_eager():
    """q from a projection (a transposed view) reads a store's int8 memory inside a compiled graph
    with no graph break: the same outputs and projection gradients as eager."""
    torch.manual_seed(3)
    keys, key_scale, values, value_scale = _store(2, 64, 16, 8, "int8")
    proj = torch.nn.Linear(32, 4 * 16)
    x = torch.randn(2, 6, 32)

    def step(x):
        q = proj(x).view(2, 6, 4, 16).transpose(1, 2)
        read = l2m.quantized_topk_read(q, keys, key_scale, values, 5, value_scale=value_scale)
        return read.out.square().sum() + read.lse.sum() + read.weights[..., 0].sum()

    eager = step(x)
    eager_grads = torch.autograd.grad(eager, list(proj.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(proj.parameters()))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_autocast_reads_in_the_wider_of_q_and_float_values():
    keys, key_scale, values, _ = _store(1, 20, 8, 4, "float32")
    q = torch.randn(1, 2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        read = l2m.quantized_topk_read(q.bfloat16(), keys, key_scale, values, 4)     # float32 values: float32
        assert read.out.dtype == torch.float32
        int8 = _store(1, 20, 8, 4, "int8")
        read8 = l2m.quantized_topk_read(q.bfloat16(), *int8[:3], 4, value_scale=int8[3])  # no dtype to promote to
        assert read8.out.dtype == torch.bfloat16
    want = quantized_topk_read_ref(q.bfloat16().double(), keys, key_scale, values, 4)
    assert torch.equal(read.indices, want[1])
    assert_close("out", read.out, want[0], torch.bfloat16)
