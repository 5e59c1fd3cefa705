#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. build the CPU and CUDA extensions in place (TORCH_CUDA_ARCH_LIST defaults to the local GPU),
#   2. python -m l2m_kernels.info,
#   3. the test suite on the GPU (CUDA and Triton backends against the reference),
#   4. the benchmark suite at the -gpu shapes,
#   5. append the figures, with card and date, to benchmarks/RESULTS.md (and copy logs to $1).
# Usage: bash benchmarks/gpu_suite.sh [output-dir]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  export TORCH_CUDA_ARCH_LIST
fi
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - start )) s (log: $OUT_DIR/build.log)"
[ $build_rc -eq 0 ] || tail -40 "$OUT_DIR/build.log"

echo "== info"
"$PY" -m l2m_kernels.info | tee "$OUT_DIR/info.txt"

echo "== tests"
"$PY" -m pytest -q -ra -p no:cacheprovider tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT_DIR/tests.log" | tail -40
test_rc=${PIPESTATUS[0]}

echo "== benchmarks"
"$PY" benchmarks/run_suite.py --device cuda --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log" | tail -30
bench_rc=${PIPESTATUS[0]}

card=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
versions=$("$PY" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}')")
summary=$(grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT_DIR/tests.log" | tail -1)
{
  echo
  echo "## $(date -u +%Y-%m-%d) — $card ($versions)"
  echo
  echo "Tests on the GPU: ${summary:-see tests.log} (exit $test_rc). Build exit $build_rc."
  echo
  if [ -f "$OUT_DIR/suite.md" ]; then tail -n +3 "$OUT_DIR/suite.md"; else echo "benchmark suite failed (exit $bench_rc)"; fi
} > "$OUT_DIR/RESULTS_entry.md"
cat "$OUT_DIR/RESULTS_entry.md" >> benchmarks/RESULTS.md
echo "== appended to benchmarks/RESULTS.md"
cat "$OUT_DIR/RESULTS_entry.md"
[ $build_rc -eq 0 ] && [ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
