"""Benchmark product_key_read: fused backends vs the reference, eager and compiled.

    python benchmarks/bench_product_key.py [--quick] [--device cpu|cuda] [--out bench_out]

The benchmark itself (shapes, variants, what GB/s and GFLOP/s count) is
:mod:`l2m_kernels.bench.product_key`; this script runs it alone and writes ``bench_product_key.json``, ``.md`` and
``.png`` into ``--out``. ``l2m-bench`` runs it with the others.
"""
import sys

from l2m_kernels.bench import product_key
from l2m_kernels.bench._common import run_standalone, standalone_parser


def main(argv=None):
    parser = standalone_parser(product_key.__doc__, quick_help="T / 4 and n_sub / 2")
    args = parser.parse_args(argv)
    return run_standalone("bench_product_key", product_key.run, args)


if __name__ == "__main__":
    sys.exit(main())
