"""Benchmark gated_memory_write: fused backends vs the reference, eager and compiled.

    python benchmarks/bench_memory_write.py [--quick] [--device cpu|cuda] [--out bench_out]

The benchmark itself (shapes, variants, what GB/s and GFLOP/s count) is
:mod:`l2m_kernels.bench.memory_write`; this script runs it alone and writes ``bench_memory_write.json``, ``.md`` and
``.png`` into ``--out``. ``l2m-bench`` runs it with the others.
"""
import sys

from l2m_kernels.bench import memory_write
from l2m_kernels.bench._common import run_standalone, standalone_parser


def main(argv=None):
    parser = standalone_parser(memory_write.__doc__, quick_help="T / 4")
    args = parser.parse_args(argv)
    return run_standalone("bench_memory_write", memory_write.run, args)


if __name__ == "__main__":
    sys.exit(main())
