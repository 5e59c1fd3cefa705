"""Benchmark merge_attention and gated_merge: fused backends vs the reference, eager and compiled.

    python benchmarks/bench_merge.py [--quick] [--device cpu|cuda] [--out bench_out]

The benchmark itself (shapes, variants, what GB/s and GFLOP/s count) is
:mod:`l2m_kernels.bench.merge`; this script runs it alone and writes ``bench_merge.json``, ``.md`` and
``.png`` into ``--out``. ``l2m-bench`` runs it with the others.
"""
import sys

from l2m_kernels.bench import merge
from l2m_kernels.bench._common import run_standalone, standalone_parser


def main(argv=None):
    parser = standalone_parser(merge.__doc__, quick_help="smaller shapes and fewer repetitions")
    args = parser.parse_args(argv)
    return run_standalone("bench_merge", merge.run, args)


if __name__ == "__main__":
    sys.exit(main())
