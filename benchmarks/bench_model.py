"""Benchmark one L2MModel training step (forward + backward + AdamW), both memory modes: fused
backends vs the reference backend, same weights and config.

    python benchmarks/bench_model.py [--quick] [--device cpu|cuda] [--out bench_out]

The benchmark itself (config, what is timed, how peak memory is measured) is
:mod:`l2m_kernels.bench.model`; this script runs it alone and writes ``bench_model.json``, ``.md`` and
``.png`` into ``--out``, then prints the tokens/s and peak-memory summary. ``l2m-bench`` runs it
with the others.
"""
import sys

from l2m_kernels.bench import model
from l2m_kernels.bench._common import run_standalone, standalone_parser


def main(argv=None):
    parser = standalone_parser(model.__doc__, quick_help="memory_slots 4096 and 2 segments per step")
    args = parser.parse_args(argv)
    rows = []

    def run(*a, **kw):
        rows.extend(model.run(*a, **kw))
        return rows

    status = run_standalone("bench_model", run, args)
    print(model.summary(rows)[0])
    return status


if __name__ == "__main__":
    sys.exit(main())
