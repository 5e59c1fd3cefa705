"""The benchmark suite: ceilings first, then every op benchmark and one model training step, one table.

    python benchmarks/run_suite.py [--quick] [--device cpu|cuda] [--out bench_out] [--only merge,topk_read,...]

The same command as ``l2m-bench`` (``python -m l2m_kernels.bench``), kept for this checkout's
scripts (``benchmarks/gpu_suite.sh``) and the README. Writes ``suite.json``, ``suite.md`` and
``suite.png`` into ``--out`` and prints the table; ``--only`` also takes the script names
(``bench_topk_read``). See :mod:`l2m_kernels.bench` for the options.
"""
import sys

from l2m_kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
