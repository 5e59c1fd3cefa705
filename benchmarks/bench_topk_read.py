"""Benchmark topk_memory_read: fused backends vs the reference, eager and compiled.

    python benchmarks/bench_topk_read.py [--quick] [--device cpu|cuda] [--out bench_out]

The benchmark itself (shapes, variants, what GB/s and GFLOP/s count) is
:mod:`l2m_kernels.bench.topk_read`; this script runs it alone and writes ``bench_topk_read.json``, ``.md`` and
``.png`` into ``--out``. ``l2m-bench`` runs it with the others.
"""
import sys

from l2m_kernels.bench import topk_read
from l2m_kernels.bench._common import run_standalone, standalone_parser


def main(argv=None):
    parser = standalone_parser(topk_read.__doc__, quick_help="T and N divided by 4")
    args = parser.parse_args(argv)
    return run_standalone("bench_topk_read", topk_read.run, args)


if __name__ == "__main__":
    sys.exit(main())
