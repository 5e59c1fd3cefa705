"""How tight the triton top-k read's threshold is, for random keys and for keys written in sequence.

    python -m tools.topk_threshold_sim [--rows 256] [--seed 0]

The threshold path (``l2m_kernels/ops/topk_read/triton.py``) bounds each row's top k from below by
tau, the k-th largest of its chunk maxima, and collects every slot scoring >= tau; a row with more
than ``cap`` such candidates falls back to the streaming kernel. This script counts, exactly and in
plain torch on the CPU (no kernel, no timing), the candidates per row for two chunkings of the
same scores:

- ``contiguous``: a chunk is one scan tile of ``BLOCK_N`` consecutive slots (the earlier design);
- ``strided``: a chunk is one column of a group of ``G`` consecutive tiles, slots ``BLOCK_N``
  apart (the current one, ``chunk_groups``).

Keys follow an AR(1) sequence along the slots, ``key[n] = rho * key[n-1] + sqrt(1 - rho^2) * e[n]``:
``rho = 0`` is random keys; ``rho = 0.9`` or ``0.99`` are keys written in sequence (hidden states of
neighbouring tokens), where a row's best slots sit together. It also reports the collect
kernel's loop iterations per tile, averaged over the tiles: the most candidates a row of a
128-row block has in the tile (its extraction rounds) plus the final check. bfloat16 production
tiles: ``BLOCK_N = 64``, k = 32, cap = 128.
"""
from __future__ import annotations

import argparse
import math

import torch

from l2m_kernels.ops.topk_read.triton import chunk_groups

BLOCK_N, BLOCK_T, D, K, CAP = 64, 128, 64, 32, 128


def ar1_keys(N: int, rho: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(N, D, generator=gen)
    keys = noise.clone()
    for n in range(1, N):
        keys[n] = rho * keys[n - 1] + math.sqrt(1 - rho * rho) * noise[n]
    return keys


def chunk_stats(scores: torch.Tensor, chunk_max: torch.Tensor) -> dict:
    """Candidates (scores >= tau) per row for these chunk maxima, and the collect rounds per tile."""
    rows = scores.shape[0]
    tau = chunk_max.topk(K, dim=1).values[:, -1:]
    taken = scores >= tau
    count = taken.sum(1).float()
    per_tile = taken.reshape(rows // BLOCK_T, BLOCK_T, -1, BLOCK_N).sum(-1).amax(1).float()
    return {"chunks": chunk_max.shape[1], "mean": count.mean().item(), "max": count.max().item(),
            "over_cap": (count > CAP).float().mean().item(), "rounds": per_tile.mean().item() + 1}


def simulate(N: int, rho: float, rows: int, gen: torch.Generator) -> dict:
    """{"contiguous": chunk_stats, "strided": chunk_stats} for one draw of AR(1) keys and queries."""
    keys = ar1_keys(N, rho, gen)
    scores = torch.randn(rows, D, generator=gen) @ keys.T / math.sqrt(D)
    group_tiles, _ = chunk_groups(N, BLOCK_N)
    contiguous = scores.reshape(rows, -1, BLOCK_N).amax(-1)
    strided = scores.reshape(rows, -1, group_tiles, BLOCK_N).amax(2).reshape(rows, -1)
    return {"contiguous": chunk_stats(scores, contiguous), "strided": chunk_stats(scores, strided)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="query rows (a multiple of 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    for N in (16384, 65536):
        for rho in (0.0, 0.9, 0.99):
            parts = [f"{name} {st['chunks']} chunks: {st['mean']:.0f} mean / {st['max']:.0f} max candidates, "
                     f"{st['over_cap'] * 100:.0f}% of rows over cap, {st['rounds']:.1f} rounds/tile"
                     for name, st in simulate(N, rho, args.rows, gen).items()]
            print(f"N={N} rho={rho}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
