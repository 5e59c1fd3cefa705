"""A product-key memory layer (Lample et al. 2019; Memory Layers at Scale, Berges et al. 2024)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.product_key import product_key_read


class ProductKeyMemory(nn.Module):
    """A key-value memory of ``n_sub ** 2`` slots addressed by product keys; a drop-in for an MLP.

    ``x (B, T, dim) -> (B, T, dim)``:

    1. query projection ``dim -> heads * key_dim``, normalised per head (LayerNorm over ``key_dim``,
       the query normalisation that keeps the two half scores on a common scale);
    2. :func:`l2m_kernels.product_key_read` per head over the shared ``values (n_sub ** 2, value_dim)``,
       the ``heads`` reads summed (``sum_heads=True``, in the same kernel);
    3. with ``gated=True`` the output of Memory Layers at Scale's "memory+" layer,
       ``out_proj(read * silu(gate_proj(x)))``; else ``out_proj(read)``
       (``out_proj`` is the identity when ``value_dim == dim`` and ``gated=False``).

    The values are the bulk of the parameters (``n_sub ** 2 * value_dim``). With ``sparse_grad=True``
    their gradient is a ``torch.sparse_coo`` tensor holding only the rows the batch touched (as
    ``nn.EmbeddingBag(sparse=True)``); use an optimizer that takes sparse gradients for them
    (``torch.optim.SGD``, ``torch.optim.SparseAdam``, ``torch.optim.Adagrad``) and a dense one for the
    other parameters, for example::

        sparse = [layer.values]; dense = [p for n, p in model.named_parameters() if p is not layer.values]
        opts = [torch.optim.SparseAdam(sparse, lr=1e-3), torch.optim.AdamW(dense, lr=1e-3)]

    Args:
        dim:        model width (input and output size).
        n_sub:      sub-keys per half; the memory has ``n_sub ** 2`` slots.
        key_dim:    query/key size per head (even); each half has ``key_dim // 2``.
        value_dim:  size of a value row (default ``dim``).
        heads:      query heads, each with its own sub-keys, reading the shared values.
        k:          slots read per head and token.
        k_sub:      candidates kept per half (default ``k``).
        gated:      SiLU-gated output (Memory Layers at Scale).
        sparse_grad: sparse gradient for ``values``.
        backend:    backend of every read (None: automatic).

    Example (replacing a Transformer block's MLP)::

        block.mlp = ProductKeyMemory(dim=512, n_sub=1024, key_dim=256, heads=4, k=32)
    """

    def __init__(self, dim: int, n_sub: int, key_dim: int, *, value_dim: Optional[int] = None,
                 heads: int = 4, k: int = 32, k_sub: Optional[int] = None, gated: bool = False,
                 sparse_grad: bool = False, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        value_dim = dim if value_dim is None else value_dim
        if min(dim, n_sub, key_dim, value_dim, heads, k) < 1:
            raise ValueError("dim, n_sub, key_dim, value_dim, heads and k must be >= 1, got "
                             f"{dim}, {n_sub}, {key_dim}, {value_dim}, {heads}, {k}")
        if key_dim % 2:
            raise ValueError(f"key_dim: must be even (two halves of the query), got {key_dim}")
        k_sub = k if k_sub is None else k_sub
        if not 1 <= k_sub <= n_sub or k > k_sub * k_sub:
            raise ValueError(f"k, k_sub: expected 1 <= k_sub <= n_sub = {n_sub} and k <= k_sub ** 2, "
                             f"got k={k}, k_sub={k_sub}")
        self.dim, self.n_sub, self.key_dim, self.value_dim = dim, n_sub, key_dim, value_dim
        self.heads, self.k, self.k_sub = heads, k, k_sub
        self.gated, self.sparse_grad, self.backend = gated, sparse_grad, backend
        factory = dict(device=device, dtype=dtype)
        self.query_proj = nn.Linear(dim, heads * key_dim, bias=False, **factory)
        self.query_norm = nn.LayerNorm(key_dim, **factory)
        self.subkeys = nn.Parameter(torch.empty(heads, 2, n_sub, key_dim // 2, **factory))
        self.values = nn.Parameter(torch.empty(n_sub * n_sub, value_dim, **factory))
        self.gate_proj = nn.Linear(dim, value_dim, bias=False, **factory) if gated else None
        self.out_proj = (nn.Linear(value_dim, dim, bias=False, **factory) if gated or value_dim != dim
                         else nn.Identity())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # Unit-variance sub-keys against layer-normalised query halves: half scores of order one.
            nn.init.normal_(self.subkeys, std=1.0)
            nn.init.normal_(self.values, std=self.value_dim ** -0.5)
            self.query_proj.reset_parameters()
            self.query_norm.reset_parameters()
            if self.gate_proj is not None:
                self.gate_proj.reset_parameters()
            if isinstance(self.out_proj, nn.Linear):
                self.out_proj.reset_parameters()

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, dim) -> q (B, heads, T, key_dim)``, normalised per head."""
        B, T, _ = x.shape
        q = self.query_norm(self.query_proj(x).view(B, T, self.heads, self.key_dim))
        return q.transpose(1, 2)

    def read(self, x: torch.Tensor, *, deterministic: bool = False):
        """The raw :class:`MemoryRead` of ``x``: out ``(B, T, value_dim)`` summed over heads, and the
        per-head ``indices``, ``weights``, ``lse`` ``(B, heads, T, ...)``."""
        # Each half score is a dot product over key_dim // 2 features: scale by its inverse root
        # so that both halves, and their sum, stay of order one.
        return product_key_read(self.queries(x), self.subkeys, self.values, self.k, k_sub=self.k_sub,
                                scale=(self.key_dim // 2) ** -0.5, sum_heads=True,
                                sparse_grad=self.sparse_grad, deterministic=deterministic,
                                backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (B, T, {self.dim}), got {tuple(x.shape)}")
        out = self.read(x).out
        if self.gate_proj is not None:
            out = out * nn.functional.silu(self.gate_proj(x))
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, slots={self.n_sub ** 2} (n_sub={self.n_sub}), key_dim={self.key_dim}, "
                f"value_dim={self.value_dim}, heads={self.heads}, k={self.k}, k_sub={self.k_sub}, "
                f"gated={self.gated}, sparse_grad={self.sparse_grad}")
