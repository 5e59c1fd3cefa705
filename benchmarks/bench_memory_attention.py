"""Benchmark memory_attention: fused backends vs the reference, eager and compiled.

    python benchmarks/bench_memory_attention.py [--quick] [--device cpu|cuda] [--out bench_out]
                                                [--merge joint|gate]

The benchmark itself (shape attn-cpu, variants, what GFLOP/s counts) is
:mod:`l2m_kernels.bench.memory_attention`; this script runs it alone and writes
``bench_memory_attention.json``, ``.md`` and ``.png`` into ``--out``. ``l2m-bench`` runs it with the
others (``merge="joint"``).
"""
import sys

from l2m_kernels.bench import memory_attention
from l2m_kernels.bench._common import run_standalone, standalone_parser


def main(argv=None):
    parser = standalone_parser(memory_attention.__doc__, quick_help="T, S and N divided by 4")
    parser.add_argument("--merge", default="joint", choices=("joint", "gate"),
                        help="merge mode of the benchmarked call (default joint)")
    args = parser.parse_args(argv)
    return run_standalone("bench_memory_attention", memory_attention.run, args, merge=args.merge)


if __name__ == "__main__":
    sys.exit(main())
