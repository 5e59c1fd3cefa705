"""The block memory references against brute-force Python loops, float64 gradcheck, and their
documented edge cases (tie order, NaN, -inf blocks, repeated blocks, empty rows)."""
import math

import pytest
import torch

from l2m_kernels.ops.block_memory.reference import block_read_ref, block_scores_ref, block_topk_ref, select_blocks


def _loop_scores(q, reprs, valid, scale):
    B, H, T, _ = q.shape
    Hk, NB, R = reprs.shape[1:4]
    G = H // Hk
    out = torch.empty(B, Hk, NB, dtype=torch.float64)
    for b in range(B):
        for g in range(Hk):
            for n in range(NB):
                ok = [r for r in range(R) if valid[b, n, r]]
                if not ok:
                    out[b, g, n] = -math.inf
                    continue
                out[b, g, n] = sum(max(scale * float(q[b, h, t] @ reprs[b, g, n, r]) for r in ok)
                                   for h in range(g * G, (g + 1) * G) for t in range(T))
    return out


def _loop_read(q, block_keys, block_values, indices, valid, scale):
    B, H, T, _ = q.shape
    Hk, _, S = block_keys.shape[1:4]
    G = H // Hk
    out = torch.zeros(B, H, T, block_values.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, T), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // G
            tokens = [(int(n), s) for n in indices[b, g] for s in range(S) if valid[b, n, s]]
            for t in range(T):
                if not tokens:
                    continue
                s = torch.tensor([scale * float(q[b, h, t] @ block_keys[b, g, n, j]) for n, j in tokens],
                                 dtype=torch.float64)
                w = torch.softmax(s, 0)
                lse[b, h, t] = torch.logsumexp(s, 0)
                out[b, h, t] = sum(w[i] * block_values[b, g, n, j] for i, (n, j) in enumerate(tokens))
    return out, lse


@pytest.mark.parametrize("R", [1, 3])
def test_scores_and_selection_match_loops(R):
    torch.manual_seed(0)
    B, H, Hk, T, NB, D = 2, 4, 2, 3, 7, 5
    q = torch.randn(B, H, T, D, dtype=torch.float64)
    reprs = torch.randn(B, Hk, NB, R, D, dtype=torch.float64)
    valid = torch.rand(B, NB, R) < 0.7
    valid[0] = True
    valid[0, 2] = False                                          # a block with no representative
    scores = block_scores_ref(q, reprs, valid, 0.3)
    torch.testing.assert_close(scores, _loop_scores(q, reprs, valid, 0.3))
    for k in (0, 1, 4, NB):
        indices, got = block_topk_ref(q, reprs, k, valid, 0.3)
        assert torch.equal(got, scores)
        for b in range(B):
            for g in range(Hk):
                best = sorted(range(NB), key=lambda n: (-float(scores[b, g, n]), n))[:k]
                assert indices[b, g].tolist() == sorted(best)
    assert 2 not in block_topk_ref(q, reprs, NB - 1, valid, 0.3)[0][0].flatten().tolist()


def test_selection_order_ties_nan_and_minus_inf():
    scores = torch.tensor([[[1.0, 3.0, 3.0, -math.inf, math.nan, 2.0, 3.0]]])
    assert select_blocks(scores, 1).tolist() == [[[4]]]           # NaN first
    assert select_blocks(scores, 3).tolist() == [[[1, 2, 4]]]     # then ties to the smaller block
    assert select_blocks(scores, 6).tolist() == [[[0, 1, 2, 4, 5, 6]]]   # -inf last
    assert select_blocks(scores, 7).tolist() == [[list(range(7))]]


def test_read_matches_loops_with_repeats_padding_and_empty_rows():
    torch.manual_seed(1)
    B, H, Hk, T, NB, S, D, Dv = 2, 4, 2, 3, 5, 3, 4, 6
    q = torch.randn(B, H, T, D, dtype=torch.float64)
    block_keys = torch.randn(B, Hk, NB, S, D, dtype=torch.float64)
    block_values = torch.randn(B, Hk, NB, S, Dv, dtype=torch.float64)
    valid = torch.rand(B, NB, S) < 0.7
    valid[1] = False
    valid[1, 4, 1] = True                                        # batch 1: one token, in block 4
    indices = torch.tensor([[[0, 3, 3], [1, 2, 4]], [[0, 1, 2], [4, 4, 0]]])   # repeats; batch 1 head 0 empty
    block_keys[1, 0, 0, 0] = math.nan                            # padding: never reaches a result
    block_values[1, 0, 1, 2] = math.inf
    valid[1, 0, 0] = valid[1, 1, 2] = False
    out, lse = block_read_ref(q, block_keys, block_values, indices, valid, 0.7)
    want_out, want_lse = _loop_read(q, block_keys.nan_to_num(0.0, 0.0, 0.0), block_values.nan_to_num(0.0, 0.0, 0.0),
                                    indices, valid, 0.7)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    assert torch.all(out[1, :2] == 0) and torch.all(torch.isneginf(lse[1, :2]))   # no valid token
    assert torch.isfinite(out).all()


def test_read_gradcheck_float64():
    torch.manual_seed(2)
    B, H, Hk, T, NB, S, D, Dv = 1, 4, 2, 3, 4, 3, 5, 2
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    block_keys = torch.randn(B, Hk, NB, S, D, dtype=torch.float64, requires_grad=True)
    block_values = torch.randn(B, Hk, NB, S, Dv, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(B, NB, S) < 0.8
    indices = torch.tensor([[[0, 2, 2], [3, 1, 0]]])
    assert torch.autograd.gradcheck(lambda *x: block_read_ref(*x, indices, valid, 0.5), (q, block_keys, block_values))
    empty = torch.zeros(B, Hk, 0, dtype=torch.int64)                 # K = 0: out 0, lse -inf, zero gradients
    out, lse = block_read_ref(q, block_keys, block_values, empty)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    grads = torch.autograd.grad(out.sum(), (q, block_keys, block_values), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in grads)
