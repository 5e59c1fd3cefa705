"""``python -m l2m_kernels.bench``: the benchmark suite (same as ``l2m-bench``)."""
import sys

from . import main

sys.exit(main())
