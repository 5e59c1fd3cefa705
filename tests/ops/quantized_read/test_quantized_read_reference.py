"""The quantized read's reference against brute-force Python loops, float64 gradcheck, and its
documented edge cases (tie order, NaN first, k = N, N = 1, keys of +-127, the float32 qe)."""
import math

import pytest
import torch

from l2m_kernels.ops.quantized_read.reference import (quantized_read_gather, quantized_scores_ref,
                                                      quantized_topk_read_ref, quantized_topk_select, selected_scores)


def _memory(Hm, N, Dk, Dv, values="float32", seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-127, 128, (Hm, N, Dk), generator=g).to(torch.int8)
    key_scale = (0.5 + torch.rand(Hm, Dk, generator=g)) * 0.02
    value_scale = None
    if values == "int8":
        stored = torch.randint(-127, 128, (Hm, N, Dv), generator=g).to(torch.int8)
        value_scale = torch.rand(Hm, N, generator=g) + 0.1
    elif values == "float8":
        stored = (torch.randn(Hm, N, Dv, generator=g) * 50).to(torch.float8_e4m3fn)
        value_scale = torch.rand(Hm, N, generator=g) + 0.1
    else:
        stored = torch.randn(Hm, N, Dv, generator=g).to(getattr(torch, values))
    return keys, key_scale, stored, value_scale


def _loop_read(q, keys, key_scale, values, value_scale, k, scale):
    """Per query row: float32 qe, float64 scores of every slot, a sorted list, the softmax."""
    B, H, T, Dk = q.shape
    Hm, N = keys.shape[:2]
    G = H // Hm
    float64 = q.dtype == torch.float64
    out = torch.zeros(B, H, T, values.shape[-1], dtype=torch.float64)
    indices = torch.zeros(B, H, T, k, dtype=torch.int64)
    weights = torch.zeros(B, H, T, k, dtype=torch.float64)
    lse = torch.zeros(B, H, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            m = h // G
            for t in range(T):
                qe = [float(torch.tensor(float(q[b, h, t, d]), dtype=torch.float32) * torch.tensor(scale)
                            * key_scale[m, d]) for d in range(Dk)]
                s = [math.fsum(qe[d] * int(keys[m, n, d]) for d in range(Dk)) for n in range(N)]
                order = sorted(range(N), key=lambda n: (-(math.inf if math.isnan(s[n]) else s[n]), n))[:k]
                if float64:
                    top = [math.fsum(float(q[b, h, t, d]) * scale * float(key_scale[m, d]) * int(keys[m, n, d])
                                     for d in range(Dk)) for n in order]
                else:
                    top = [float(torch.tensor(s[n], dtype=torch.float32)) for n in order]
                top = torch.tensor(top, dtype=torch.float64)
                w = torch.softmax(top, 0)
                indices[b, h, t] = torch.tensor(order)
                weights[b, h, t] = w
                lse[b, h, t] = torch.logsumexp(top, 0)
                for j, n in enumerate(order):
                    v = values[m, n].double() * (1.0 if value_scale is None else float(value_scale[m, n]))
                    out[b, h, t] += w[j] * v
    return out, indices, weights, lse


@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8", "float8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 3, 11, 5, 3, 4), (1, 3, 1, 2, 7, 9, 1, 7), (1, 2, 2, 1, 1, 4, 2, 1)],
                         ids=["grouped", "k=N,Dv=1", "N=1"])
def test_reference_matches_loops(shape, dtype, values):
    B, H, Hm, T, N, Dk, Dv, k = shape
    keys, key_scale, stored, value_scale = _memory(Hm, N, Dk, Dv, values)
    q = torch.randn(B, H, T, Dk).to(dtype)
    out, indices, weights, lse = quantized_topk_read_ref(q, keys, key_scale, stored, k, value_scale, 0.7)
    want_out, want_indices, want_weights, want_lse = _loop_read(q, keys, key_scale, stored, value_scale, k, 0.7)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and weights.dtype == acc and lse.dtype == acc
    assert torch.equal(indices, want_indices)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(weights.double(), want_weights, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=tol, atol=tol)
    out_tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2) \
        if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want_out, **out_tol)


def test_scores_use_the_float32_qe():
    """s = sum float64(qe) * keys with qe = (q.float() * scale) * key_scale rounded in float32: the
    selection of a float64 query is that of its float32 qe."""
    keys, key_scale, _, _ = _memory(1, 20, 6, 1)
    q = torch.randn(1, 1, 4, 6, dtype=torch.float64)
    qe = (q.float() * 0.3) * key_scale[0]
    want = qe.double() @ keys[0].double().T
    torch.testing.assert_close(quantized_scores_ref(q, keys, key_scale, 0.3), want, rtol=1e-15, atol=0)
    assert torch.equal(quantized_topk_select(q, keys, key_scale, 5, 0.3),
                       quantized_topk_select(q.float(), keys, key_scale, 5, 0.3))


def test_ties_go_to_the_smaller_slot_and_nan_first():
    keys = torch.tensor([[[1, 2], [3, 4], [1, 2], [3, 4], [-127, 127], [127, 127]]], dtype=torch.int8)
    key_scale = torch.ones(1, 2)
    q = torch.tensor([[[[1.0, 1.0], [1.0, -1.0]]]])
    # Row 2 scores -1 at slots 0-3 (two pairs of identical rows and two other keys): smaller first.
    assert quantized_topk_select(q, keys, key_scale, 6, 1.0).tolist() == [[[[5, 1, 3, 0, 2, 4], [5, 0, 1, 2, 3, 4]]]]
    q[0, 0, 1, 0] = math.nan                                   # a NaN row: every score NaN, slot order
    assert quantized_topk_select(q, keys, key_scale, 3, 1.0)[0, 0, 1].tolist() == [0, 1, 2]
    q[0, 0, 1] = torch.tensor([math.inf, 1.0])                 # +inf scores tie (smaller first), -inf last
    assert quantized_topk_select(q, keys, key_scale, 6, 1.0)[0, 0, 1].tolist() == [0, 1, 2, 3, 5, 4]
    out, _, weights, lse = quantized_topk_read_ref(q, keys, key_scale, torch.ones(1, 6, 3), 2, None, 1.0)
    assert torch.isnan(lse[0, 0, 1]) and torch.isnan(weights[0, 0, 1]).all() and torch.isnan(out[0, 0, 1]).all()
    assert torch.isfinite(out[0, 0, 0]).all()                  # other rows untouched


def test_k_equal_to_n_reads_every_slot_and_n_one():
    keys, key_scale, values, value_scale = _memory(1, 5, 4, 3, "int8")
    q = torch.randn(2, 1, 3, 4)
    out, indices, weights, _ = quantized_topk_read_ref(q, keys, key_scale, values, 5, value_scale)
    assert torch.equal(indices.sort(-1).values, torch.arange(5).expand(2, 1, 3, 5))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1, 3))
    keys, key_scale, values, value_scale = _memory(1, 1, 4, 3, "float8")
    out, indices, weights, lse = quantized_topk_read_ref(q, keys, key_scale, values, 1, value_scale)
    assert (indices == 0).all() and (weights == 1).all()
    torch.testing.assert_close(out, (values[0, 0].float() * value_scale[0, 0]).expand(2, 1, 3, 3))


def test_empty_batch():
    keys, key_scale, values, _ = _memory(1, 6, 4, 3)
    out, indices, weights, lse = quantized_topk_read_ref(torch.randn(0, 2, 3, 4), keys, key_scale, values, 2)
    assert out.shape == (0, 2, 3, 3) and indices.shape == weights.shape == (0, 2, 3, 2) and lse.shape == (0, 2, 3)


@pytest.mark.parametrize("values", ["float64", "int8"])
def test_gradcheck_float64(values):
    """d s_j / d q = scale * key_scale[h] * keys[h, n_j] through the softmax and the values, at a
    fixed selection (the selection is piecewise constant)."""
    keys, key_scale, stored, value_scale = _memory(2, 9, 5, 3, values)
    q = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    indices = quantized_topk_select(q, keys, key_scale, 4, 0.6)
    torch.autograd.gradcheck(lambda q_: quantized_read_gather(q_, keys, key_scale, stored, indices, value_scale, 0.6),
                             (q,))
    # The full read has the same gradient where the selection does not move.
    out, _, weights, lse = quantized_topk_read_ref(q, keys, key_scale, stored, 4, value_scale, 0.6)
    grad = torch.autograd.grad((out.sum() + weights[..., 0].sum() + lse.sum()), q)[0]
    out2, weights2, lse2 = quantized_read_gather(q, keys, key_scale, stored, indices, value_scale, 0.6)
    torch.testing.assert_close(grad, torch.autograd.grad(out2.sum() + weights2[..., 0].sum() + lse2.sum(), q)[0])


def test_float32_scores_are_the_selections_rounded_once_with_the_q_gradient():
    keys, key_scale, values, _ = _memory(1, 12, 7, 2)
    q = torch.randn(1, 1, 2, 7, requires_grad=True)
    indices = quantized_topk_select(q, keys, key_scale, 3, 0.5)
    top = quantized_scores_ref(q, keys, key_scale, 0.5).gather(-1, indices).float()
    assert torch.equal(selected_scores(q, keys, key_scale, indices, 0.5).detach(), top)
    _, weights, lse = quantized_read_gather(q, keys, key_scale, values, indices, None, 0.5)
    torch.testing.assert_close(lse.detach(), top.logsumexp(-1))
    (grad,) = torch.autograd.grad(lse.sum(), q)
    want = (weights.detach()[0, 0, :, :, None] * keys[0][indices[0, 0]].float()).sum(-2) * key_scale[0] * 0.5
    torch.testing.assert_close(grad[0, 0], want)
