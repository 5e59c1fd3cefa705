#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. build the CPU and CUDA extensions in place (TORCH_CUDA_ARCH_LIST defaults to the local GPU),
#   2. python -m l2m_kernels.info,
#   3. the standalone CUDA self-test (csrc/cuda/tests/gpu_selftest.py: raw kernels vs the reference),
#   4. the test suite on the GPU (CUDA and Triton backends against the reference, public API),
#   5. the benchmark suite at the -gpu shapes,
#   6. append the figures, with card and date, to benchmarks/RESULTS.md (logs and JSON in $1).
# Usage: bash benchmarks/gpu_suite.sh [output-dir]
# Every step has a time limit (seconds; environment variables below) so that a slow or hung step
# still leaves the later ones and the logs: BUILD_TIMEOUT, SELFTEST_TIMEOUT, TEST_TIMEOUT,
# BENCH_TIMEOUT. TEST_PATHS replaces the test paths (default: tests); PYTEST_ARGS adds pytest
# arguments; SELFTEST_ARGS replaces the self-test's (default --quick); BENCH_ARGS adds run_suite
# arguments (e.g. --quick, --only bench_topk_read).
# The compile-check tests are left to CI (they need no GPU); pytest-xdist is used when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The extensions are built in place (no pip install on the GPU machine): import from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  export TORCH_CUDA_ARCH_LIST
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} timeout "${BUILD_TIMEOUT:-300}" "$PY" setup.py -q build_ext --inplace \
  > "$OUT_DIR/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(elapsed "$start") (log: $OUT_DIR/build.log)"
[ $build_rc -eq 0 ] || tail -40 "$OUT_DIR/build.log"

echo "== info"
"$PY" -m l2m_kernels.info | tee "$OUT_DIR/info.txt"

echo "== CUDA self-test"
start=$(date +%s)
timeout "${SELFTEST_TIMEOUT:-180}" "$PY" csrc/cuda/tests/gpu_selftest.py --module l2m_kernels._C_cuda \
  ${SELFTEST_ARGS:---quick} --json "$OUT_DIR/selftest.json" > "$OUT_DIR/selftest.log" 2>&1
selftest_rc=$?
grep -iE "problem|FAIL|error" "$OUT_DIR/selftest.log" | head -40
tail -5 "$OUT_DIR/selftest.log"
echo "self-test rc=$selftest_rc in $(elapsed "$start")"

echo "== tests"
start=$(date +%s)
# Verbose, so that a run cut by its time limit still names the failures it saw.
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n ${PYTEST_WORKERS:-8}"
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -v -ra -p no:cacheprovider $xdist ${TEST_PATHS:-tests} \
  --ignore=tests/test_compile_triton.py --ignore=tests/test_compile_cuda.py ${PYTEST_ARGS:-} \
  > "$OUT_DIR/tests.log" 2>&1
test_rc=$?
grep -E "FAILED|ERROR" "$OUT_DIR/tests.log" | head -40
tail -3 "$OUT_DIR/tests.log"
echo "tests rc=$test_rc in $(elapsed "$start")"

echo "== benchmarks"
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-600}" "$PY" benchmarks/run_suite.py --device cuda --out "$OUT_DIR" ${BENCH_ARGS:-} \
  > "$OUT_DIR/bench.log" 2>&1
bench_rc=$?
grep -vE "USDT|it/s\]|s/it\]" "$OUT_DIR/bench.log" | tail -40
echo "benchmarks rc=$bench_rc in $(elapsed "$start")"

card=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
versions=$("$PY" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}')")
summary=$(grep -E "passed|failed" "$OUT_DIR/tests.log" | tail -1)
selftest_summary=$(tail -1 "$OUT_DIR/selftest.log")
{
  echo
  echo "## $(date -u +%Y-%m-%d) — $card ($versions), benchmarks/gpu_suite.sh"
  echo
  echo "Build exit $build_rc (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST). CUDA self-test: ${selftest_summary:-none} (exit $selftest_rc)."
  echo "Tests on the GPU: ${summary:-see tests.log} (exit $test_rc)."
  echo
  if [ -f "$OUT_DIR/suite.md" ] && [ $bench_rc -eq 0 ]; then tail -n +3 "$OUT_DIR/suite.md"; else echo "benchmark suite failed (exit $bench_rc)"; fi
} > "$OUT_DIR/RESULTS_entry.md"
cat "$OUT_DIR/RESULTS_entry.md" >> benchmarks/RESULTS.md
echo "== appended to benchmarks/RESULTS.md"
[ $build_rc -eq 0 ] && [ $selftest_rc -eq 0 ] && [ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
