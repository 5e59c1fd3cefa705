"""Argument checks of ``product_key_read``, shared by the public function and the raw custom op."""
from __future__ import annotations

from ... import _validation as v
from ...backends import resolve_deterministic, select_backend
from ..topk_read.validate import resolve_scale


def check_args(q, subkeys, values, k, k_sub, scale, sum_heads, sparse_grad, deterministic, backend):
    """Returns ``(k, k_sub, scale, sum_heads, sparse_grad, deterministic, backend name)``.

    Every check reads only shapes and arguments, so it runs while ``torch.compile`` traces too.
    """
    v.require_ndim("q", q, (4,), "(B, H, T, Dk)")
    B, H, T, Dk = q.shape
    if Dk % 2:
        raise ValueError(f"q: the feature size Dk must be even (two halves), got q shape {tuple(q.shape)}")
    v.require_ndim("subkeys", subkeys, (4,), "(H, 2, n_sub, Dk // 2)")
    n_sub = subkeys.shape[2]
    v.require_shape("subkeys", subkeys, (H, 2, None, Dk // 2), "(H, 2, n_sub, Dk // 2)")
    v.require_ndim("values", values, (2,), "(n_sub ** 2, Dv)")
    v.require_shape("values", values, (n_sub * n_sub, None), "(n_sub ** 2, Dv)")
    v.require_same_dtype("q", q, subkeys=subkeys, values=values)
    device = v.require_same_device(q=q, subkeys=subkeys, values=values)
    if n_sub == 0:
        raise ValueError("subkeys: n_sub must be at least 1, got shape " + str(tuple(subkeys.shape)))
    k = v.require_int("k", k, 1, n_sub * n_sub, f" (n_sub ** 2 = {n_sub * n_sub})")
    k_sub = v.require_int("k_sub", k if k_sub is None else k_sub, 1, n_sub, f" (n_sub = {n_sub})")
    if k > k_sub * k_sub:
        raise ValueError(f"k: expected 1 <= k <= k_sub ** 2 = {k_sub * k_sub}, got {k}")
    scale = resolve_scale(scale, Dk)
    deterministic = resolve_deterministic(deterministic)
    name = select_backend("product_key_read", device, q.dtype, backend,
                          sizes=dict(k=k, k_sub=k_sub, N=n_sub * n_sub, Dk=Dk))
    return k, k_sub, scale, bool(sum_heads), bool(sparse_grad), deterministic, name
