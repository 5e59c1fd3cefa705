"""Product-key memory read for million-slot memories (SPEC section 2)."""
from __future__ import annotations

from .._common import MemoryRead, autocast_promote
from .function import product_key_read_op
from .reference import product_key_read_ref
from .validate import check_args

__all__ = ["product_key_read", "product_key_read_ref"]


def product_key_read(q, subkeys, values, k, *, k_sub=None, scale=None, sum_heads=False,
                     sparse_grad=False, deterministic=False, backend=None):
    """Sparse read of an ``n_sub ** 2``-slot memory addressed by two halves of the query.

    Args:
        q:       (B, H, T, Dk) queries, Dk even.
        subkeys: (H, 2, n_sub, Dk // 2) sub-keys of the two halves, per head. Same dtype as q.
        values:  (n_sub ** 2, Dv) slot values, shared by all heads.
        k:       slots read per query and head, 1 <= k <= k_sub ** 2.
        k_sub:   candidates kept per half, default k, k_sub <= n_sub.
        scale:   score scale, default Dk ** -0.5.
        sum_heads: sum the heads' reads into one (B, T, Dv) output.
        sparse_grad: the values gradient is a coalesced torch.sparse_coo tensor (as
            nn.EmbeddingBag(sparse=True)) instead of a dense (n_sub ** 2, Dv) tensor.
        deterministic: bitwise-reproducible gradients (also switched on by
            torch.are_deterministic_algorithms_enabled()). The default lets the GPU backends
            (triton, cuda) scatter dsubkeys/dvalues with float32 atomics; True sums each row's
            entries in a fixed order. The reference and cpu backends are always deterministic.
        backend: None (automatic), "reference", "cpu", "triton" or "cuda".

    Returns:
        MemoryRead(out (B, H, T, Dv) or (B, T, Dv), indices (B, H, T, k) int64 slot ids
        i * n_sub + j, weights (B, H, T, k) float32, lse (B, H, T) float32; float64 for float64).

    Equivalent PyTorch:
        s1 = scale * q[..., :Dk//2] @ subkeys[:, 0].mT; s2 = scale * q[..., Dk//2:] @ subkeys[:, 1].mT
        v1, i1 = s1.topk(k_sub); v2, i2 = s2.topk(k_sub)
        cand = v1[..., :, None] + v2[..., None, :]; slot = i1[..., :, None] * n_sub + i2[..., None, :]
        top, j = cand.flatten(-2).topk(k); indices = slot.flatten(-2).gather(-1, j)
        weights = top.softmax(-1); out = (weights[..., None] * values[indices]).sum(-2)
    """
    q, subkeys, values = autocast_promote(q, subkeys, values)
    k, k_sub, scale, sum_heads, sparse_grad, deterministic, name = check_args(
        q, subkeys, values, k, k_sub, scale, sum_heads, sparse_grad, deterministic, backend)
    if name == "reference":
        return MemoryRead(*product_key_read_ref(q, subkeys, values, k, k_sub=k_sub, scale=scale,
                                                sum_heads=sum_heads, sparse_grad=sparse_grad))
    return MemoryRead(*product_key_read_op(q, subkeys, values, k, k_sub, scale, sum_heads, sparse_grad,
                                           deterministic, name))
