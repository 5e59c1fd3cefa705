"""GPU probes for what a GPU run of ``gpu_suite.sh`` leaves open (their runs: benchmarks/RESULTS.md).

    python -m tools.gpu_probe attn-fault            # which kernel faults, under which variants
    python -m tools.gpu_probe topk-tiles [--bench]  # both threshold designs of the top-k read:
                                                    # tiles, paths, profiles; --bench: benchmark

``attn-fault``: l2m-check found an illegal memory access in the triton ``memory_attention`` at
float16, B=2 H=2 Hkv=2 Hm=1 T=13 S=25 D=33 Dv=7 N=6 topk=6, gate (2, 1, 1) (float32 passed; the
CPU interpreter with an out-of-bounds check on every load and store found nothing). Each variant
runs in its own process (a fault poisons the CUDA context) with a synchronize after every Triton
kernel, and prints the kernels that finished: the first one missing is the one that faulted.

``topk-tiles``: the triton top-k read's forward at read-gpu / read-heads-gpu (bfloat16), on both
threshold designs (``L2M_TOPK_TRITON_PATH``): ``threshold``, the default, and ``threshold-strided``,
opt-in until a GPU run has passed the tests with it and timed it (``l2m_kernels._gpu_status``).
It sweeps the tiles of threshold-strided's two scoring passes (``_SCAN_TILES``), times the paths
side by side at the current tile (the default, threshold-strided at two store batches of its
collect kernel, ``COLLECT_BATCH``, and stream) for random keys and for clustered ones (a moving
average over 65 slots: neighbouring slots score alike, as keys written in sequence do), prints a
per-kernel profile of each threshold design, and with ``--bench`` runs the topk_read benchmark
(fused, reference eager and compiled) with each threshold design.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# PROBE_DEVICE=cpu (with TRITON_INTERPRET=1) runs the probes' code paths here, to test the script.
DEVICE = os.environ.get("PROBE_DEVICE", "cuda")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


ATTN_BASE = dict(B=2, H=2, Hkv=2, Hm=1, T=13, S=25, D=33, Dv=7, N=6, topk=6, dtype="float16", merge="gate")
ATTN_VARIANTS = {
    "base": {}, "bfloat16": dict(dtype="bfloat16"), "float32": dict(dtype="float32"),
    "D32": dict(D=32), "D64": dict(D=64), "Dv16": dict(Dv=16), "N64": dict(N=64), "joint": dict(merge="joint"),
    "fwd_stages1": dict(fwd_tile=(128, 64, 8, 1)), "fwd_64x64": dict(fwd_tile=(64, 64, 4, 2)),
    "fwd_128x32": dict(fwd_tile=(128, 32, 8, 2)),
}


def _sync_kernels(module):
    """Replace every ``*_kernel`` launcher of ``module`` by one that synchronizes and reports."""
    class Synced:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launch = self.fn[grid]

            def run(*args, **kwargs):
                result = launch(*args, **kwargs)
                _sync()
                print(f"  finished {self.name}", flush=True)
                return result
            return run

    for name in dir(module):
        if name.endswith("_kernel") and not isinstance(getattr(module, name), Synced):
            setattr(module, name, Synced(name, getattr(module, name)))


def attn_case(variant: str) -> None:
    import l2m_kernels as l2m
    from l2m_kernels.ops.memory_attention import triton as mat
    from l2m_kernels.ops.topk_read import triton as tt
    cfg = dict(ATTN_BASE, **ATTN_VARIANTS[variant])
    if "fwd_tile" in cfg:
        for key in list(mat._FWD_TILES):
            mat._FWD_TILES[key] = mat.Tile(*cfg["fwd_tile"])
    _sync_kernels(mat)
    _sync_kernels(tt)
    dtype = getattr(torch, cfg["dtype"])
    B, H, Hkv, Hm, T, S, D, Dv, N = (cfg[x] for x in ("B", "H", "Hkv", "Hm", "T", "S", "D", "Dv", "N"))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype).requires_grad_()  # noqa: E731
    q, k, v = make(B, H, T, D), make(B, Hkv, S, D), make(B, Hkv, S, Dv)
    mem_keys, mem_values = make(B, Hm, N, D), make(B, Hm, N, Dv)
    gate = make(B, 1, 1) if cfg["merge"] == "gate" else None
    res = l2m.memory_attention(q, k, v, mem_keys, mem_values, cfg["topk"], merge=cfg["merge"], gate=gate,
                               backend="triton")
    out = res.out if hasattr(res, "out") else res[0]
    _sync()
    print("  forward done", flush=True)
    leaves = [t for t in (q, k, v, mem_keys, mem_values, gate) if t is not None]
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    _sync()
    print(f"  backward done; finite: {all(bool(g.isfinite().all()) for g in grads)}", flush=True)


def attn_fault() -> int:
    def one(variant):
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        try:
            # Run as the parent was (python -m tools.gpu_probe from the repository root), so that
            # the child imports the same l2m_kernels.
            proc = subprocess.run([sys.executable, "-m", "tools.gpu_probe", "attn-case", variant], env=env,
                                  cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
            text = proc.stdout + (proc.stderr[-600:] if proc.returncode else "")
            return variant, proc.returncode, text
        except subprocess.TimeoutExpired:
            return variant, -1, "timed out after 120 s"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, ATTN_VARIANTS))
    for variant, rc, text in results:
        print(f"== {variant} {dict(ATTN_VARIANTS[variant])}: {'PASS' if rc == 0 else f'FAIL (exit {rc})'}")
        print(text.rstrip())
    return 0


# Timing repetitions: one call each when testing the script on the CPU (the interpreter is slow).
TIMING = dict(warmup=2, reps=7) if DEVICE == "cuda" else dict(warmup=0, reps=1)
SCAN_VARIANTS = [(64, 64, 4), (64, 64, 8), (128, 64, 8), (64, 128, 8), (128, 128, 8), (128, 32, 8)]
if DEVICE == "cpu":  # testing the script: two tiles exercise the sweep (the interpreter is slow)
    SCAN_VARIANTS = SCAN_VARIANTS[:2]


def _clustered(keys: torch.Tensor, width: int = 65) -> torch.Tensor:
    """Keys of the same shape whose neighbouring slots score alike: a moving average of ``width``
    fresh random slots, rescaled to unit variance (neighbour correlation 1 - 1 / width)."""
    B, Hm, N, D = keys.shape
    g = torch.Generator(device=keys.device).manual_seed(1)
    noise = torch.randn(B * Hm, D, N + width - 1, generator=g, device=keys.device)
    smooth = torch.nn.functional.avg_pool1d(noise, width, stride=1) * width ** 0.5
    return smooth.transpose(1, 2).reshape(B, Hm, N, D).to(keys.dtype).contiguous()


def _path(tt, path: str) -> None:
    """Make ``path`` the triton top-k read's forward path (the launcher reads it at each call)."""
    os.environ[tt.PATH_ENV] = path


def topk_tiles(bench: bool) -> int:
    import l2m_kernels as l2m
    from l2m_kernels import benchmark as bm
    from l2m_kernels.bench import topk_read as bench_topk
    from l2m_kernels.ops.topk_read import triton as tt
    device = torch.device(DEVICE)
    shapes = {"read-gpu": (8, 1, 1, 4096, 65536), "read-heads-gpu": (16, 8, 8, 512, 16384)}
    k = 32
    if DEVICE == "cpu":  # testing the script: tiny shapes, still on the threshold paths (N > cap, >= k chunks)
        shapes, k = {"tiny": (1, 1, 1, 8, 512)}, 4
    inputs = {}
    for name, (B, H, Hm, T, N) in shapes.items():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        inputs[name] = [torch.randn(*s, generator=g, device=device, dtype=torch.bfloat16)
                        for s in ((B, H, T, 64), (B, Hm, N, 64), (B, Hm, N, 64))]
    default_tile, default_batch = tt._SCAN_TILES[False], tt.COLLECT_BATCH
    fn_of = lambda q, keys, values: lambda: l2m.topk_memory_read(q, keys, values, k, backend="triton")  # noqa: E731
    try:
        # The threshold-strided design's scan tile is not chosen by a GPU measurement yet: sweep it
        # (the same sweep chose the threshold design's tile). Indices are compared with the default
        # design's at the current tile.
        _path(tt, tt.DEFAULT_PATH)
        reference = {name: fn_of(*tensors)().indices for name, tensors in inputs.items()}
        _path(tt, "threshold-strided")
        best, best_total = None, float("inf")
        for variant in SCAN_VARIANTS:
            tt._SCAN_TILES[False] = tt._ScanTile(*variant, default_tile.max_block_dk)
            total, line = 0.0, []
            try:
                for name, tensors in inputs.items():
                    fn = fn_of(*tensors)
                    same = torch.equal(fn().indices, reference[name])
                    ms = bm.median_time(fn, device, **TIMING) * 1e3
                    total += ms if same else float("inf")
                    line.append(f"{name} {ms:.3f} ms (path {tt.last_forward_path}, indices equal: {same})")
            except Exception as exc:  # a tile that does not compile or run
                line.append(f"failed: {type(exc).__name__}: {str(exc)[:200]}")
                total = float("inf")
            print(f"threshold-strided, scan tile {variant}: " + "; ".join(line), flush=True)
            if total < best_total:
                best, best_total = variant, total
        tt._SCAN_TILES[False] = default_tile
        # The forward paths at the current tile, side by side, on random and on clustered keys: the
        # default (threshold), threshold-strided at two store batches of its collect kernel
        # (COLLECT_BATCH and 1, a store per round; 4 spills on sm_80) and stream (the fallback of
        # both, which clustered keys send the threshold design's rows to). Every variant must select
        # exactly the default's indices.
        variants = [(tt.DEFAULT_PATH, default_batch), ("threshold-strided", default_batch),
                    ("threshold-strided", 1 if default_batch != 1 else 2), ("stream", default_batch)]
        line = []
        for name, (q, keys, values) in inputs.items():
            for data, memory in (("random", keys), ("clustered", _clustered(keys))):
                fn = fn_of(q, memory, values)
                parts, first = [], None
                for path, batch in variants:
                    _path(tt, path)
                    tt.COLLECT_BATCH = batch
                    indices = fn().indices
                    first = indices if first is None else first
                    ms = bm.median_time(fn, device, **TIMING) * 1e3
                    label = f"{path} batch={batch}" if path == "threshold-strided" else path
                    parts.append(f"{label} {ms:.3f} ms (path {tt.last_forward_path}, "
                                 f"indices equal: {torch.equal(indices, first)})")
                line.append(f"{name} {data} keys: " + ", ".join(parts))
        tt.COLLECT_BATCH = default_batch
        print(f"forward paths at scan tile {tuple(default_tile[:3])}:\n  " + "\n  ".join(line), flush=True)
        activity = torch.profiler.ProfilerActivity.CUDA if DEVICE == "cuda" else torch.profiler.ProfilerActivity.CPU
        for path in (tt.DEFAULT_PATH, "threshold-strided"):
            _path(tt, path)
            for name, (q, keys, values) in inputs.items():
                with torch.profiler.profile(activities=[activity]) as prof:
                    for _ in range(3):
                        l2m.topk_memory_read(q, keys, values, k, backend="triton")
                    _sync()
                print(f"profile of the {path} forward at {name}, current tile, 3 calls:")
                print(prof.key_averages().table(sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total",
                                                row_limit=12))
        print(f"fastest scan tile for threshold-strided: {best} (current {tuple(default_tile[:3])})", flush=True)
        if bench:
            # The topk_read benchmark (fused, reference eager and compiled) with each threshold
            # design: the default at its tile, threshold-strided at its fastest.
            ceilings = bm.measure_ceilings(device, quick=True) if DEVICE == "cuda" else {"copy_gbps": 1.0}
            for path, tile in ((tt.DEFAULT_PATH, tuple(default_tile[:3])), ("threshold-strided", best)):
                if tile is None:
                    continue
                _path(tt, path)
                tt._SCAN_TILES[False] = tt._ScanTile(*tile, default_tile.max_block_dk)
                start = time.perf_counter()
                rows = bench_topk.run(device, quick=False, ceilings=ceilings, tiny=DEVICE == "cpu")
                print(f"topk_read benchmark, path {path}, scan tile {tile} ({time.perf_counter() - start:.0f} s):")
                print(bm.format_table(rows, ceilings), flush=True)
    finally:
        os.environ.pop(tt.PATH_ENV, None)
        tt._SCAN_TILES[False], tt.COLLECT_BATCH = default_tile, default_batch
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["attn-fault", "attn-case", "topk-tiles"])
    parser.add_argument("variant", nargs="?", default="base")
    parser.add_argument("--bench", action="store_true")
    args = parser.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("needs CUDA (PROBE_DEVICE=cpu with TRITON_INTERPRET=1 to test the script)")
    if args.probe == "attn-case":
        attn_case(args.variant)
        return 0
    return attn_fault() if args.probe == "attn-fault" else topk_tiles(args.bench)


if __name__ == "__main__":
    sys.exit(main())
