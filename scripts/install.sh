#!/usr/bin/env bash
# Everything a fresh machine needs to build, test and benchmark l2m-kernels (CPU; idempotent).
# torch is pinned to the CPU build 2.13.0 when torch is missing; an existing torch (>= 2.6) is kept,
# and nothing here may pull another torch (the package installs with --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q "triton>=3.3" numpy ninja pybind11 pytest hypothesis matplotlib tqdm
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
echo "install.sh: package built in $(( $(date +%s) - start )) s"
