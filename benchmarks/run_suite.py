"""The benchmark suite: ceilings first, then every op benchmark, one table.

    python benchmarks/run_suite.py [--quick] [--device cpu|cuda] [--out bench_out] [--only bench_merge,...]

Writes ``suite.json``, ``suite.md`` and ``suite.png`` into ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from l2m_kernels import benchmark as bm  # noqa: E402

BENCHMARKS = ("bench_merge", "bench_topk_read", "bench_product_key")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    device = torch.device(args.device)
    try:
        from tqdm import tqdm
    except ImportError:  # the table still prints
        tqdm = lambda it, **kw: it  # noqa: E731
    print(f"measuring ceilings on {bm.device_name(device)} ...", flush=True)
    ceilings = bm.measure_ceilings(device, quick=args.quick)
    rows = []
    for name in tqdm(names, desc="benchmarks"):
        rows += importlib.import_module(name).run(device, args.quick, ceilings)
    bm.save(rows, ceilings, device, args.out, "suite")
    print(f"device: {bm.device_name(device)}, torch {torch.__version__}; ceilings: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    print(bm.format_table(rows, ceilings))
    print(f"written: {os.path.join(args.out, 'suite.json')}, suite.md, suite.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
