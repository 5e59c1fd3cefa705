#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. build the CPU and CUDA extensions in place (TORCH_CUDA_ARCH_LIST defaults to the local GPU),
#   2. python -m l2m_kernels.info,
#   3. the CUDA self-test: python -m pytest -m gpu tests (every CUDA kernel called directly, against
#      the reference: tests/ops/<op>/test_<op>_cuda.py),
#   4. the test suite on the GPU (CUDA and Triton backends against the reference, public API;
#      without the gpu tests when step 3 runs them),
#   5. l2m-check (python -m l2m_kernels.check): every op on every backend of the GPU against the
#      float64 reference, forward and backward,
#   6. l2m-bench (python -m l2m_kernels.bench) at the -gpu shapes: ceilings, every op, the model step,
#   7. record the run as result rows (python -m l2m_kernels.bench.results add): the benchmark rows, one
#      row per op, backend and dtype of l2m-check, one per step with its outcome; appended with card,
#      versions, commit and date to benchmarks/results.jsonl, whose table benchmarks/RESULTS.md is
#      regenerated (logs, JSON, the plot and a summary, RESULTS_entry.md, in the output folder).
# Usage: bash tools/gpu_suite.sh [output-dir]
# Every step has a time limit (seconds; environment variables below) so that a slow or hung step
# still leaves the later ones and the logs: BUILD_TIMEOUT, SELFTEST_TIMEOUT, TEST_TIMEOUT,
# CHECK_TIMEOUT, BENCH_TIMEOUT. TEST_PATHS replaces the test paths (default: tests); PYTEST_ARGS
# adds pytest arguments (to both pytest steps); SELFTEST_ARGS adds the self-test's (e.g. -k topk);
# CHECK_ARGS adds l2m-check arguments (e.g. --quick); BENCH_ARGS adds l2m-bench arguments (e.g.
# --quick, --only topk_read). RESULTS_FILE is where the rows are appended (default
# benchmarks/results.jsonl) and RESULTS_MD the table regenerated from them (default
# benchmarks/RESULTS.md); L2M_COMMIT names the commit measured where the checkout has no git metadata.
# DEVICE=cpu runs the same steps on the CPU (no CUDA build or self-test: they say so) and
# SKIP_BUILD=1 uses the extensions already importable: together they let the script itself be
# tested on a machine without a GPU (tests/test_gpu_suite.py).
# STEPS picks the steps after the build, in the order they run (default "selftest tests check bench");
# a step left out is reported as such. With a few GPU minutes, put first what matters most, e.g.
# STEPS="selftest bench tests check".
# The tests step also runs OPT_IN_TEST_PATHS (on cuda: the top-k read and memory attention tests)
# with L2M_TOPK_TRITON_PATH=threshold-strided, the triton top-k design that has not run on a GPU
# yet (empty: skip); python -m tools.gpu_probe topk-tiles times it against the default.
# The compile-check tests are left to CI (they need no GPU); pytest-xdist is used when present.
# Exit status 0 only when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_out}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/suite.json" "$OUT_DIR/suite.md" "$OUT_DIR/check.json"  # an earlier run's are not this run's
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RESULTS_FILE=${RESULTS_FILE:-benchmarks/results.jsonl}
RESULTS_MD=${RESULTS_MD:-benchmarks/RESULTS.md}
export PYTHONUNBUFFERED=1
# The extensions are built in place (no pip install on the GPU machine): import from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

if [ "$DEVICE" = cuda ]; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
    export TORCH_CUDA_ARCH_LIST
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  card=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
else
  card=$("$PY" -c "from l2m_kernels.benchmark import device_name; import torch; print(device_name(torch.device('cpu')))")
fi
versions=$("$PY" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}')")
echo "$card; $versions"

echo "== build"
start=$(date +%s)
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  build_rc=0
  build_summary="skipped (SKIP_BUILD=1: the extensions already importable)"
else
  # The CPU extension as one -march=native variant (L2M_CPU_ARCH): this run is about the GPU
  # kernels, and the portable three-variant CPU build would take the build step's time.
  L2M_CPU_ARCH=${L2M_CPU_ARCH-native} MAX_JOBS=${MAX_JOBS:-16} timeout "${BUILD_TIMEOUT:-300}" \
    "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1
  build_rc=$?
  [ $build_rc -eq 0 ] || tail -40 "$OUT_DIR/build.log"
  build_summary="exit $build_rc (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}, L2M_CPU_ARCH=${L2M_CPU_ARCH-native}, log build.log)"
fi
echo "build: $build_summary in $(elapsed "$start")"

echo "== info"
"$PY" -m l2m_kernels.info | tee "$OUT_DIR/info.txt"

step_selftest() {
  echo "== CUDA self-test"
  start=$(date +%s)
  if [ "$DEVICE" = cuda ]; then
    xdist=""
    "$PY" -c "import xdist" 2>/dev/null && xdist="-n ${PYTEST_WORKERS:-8}"
    selftest_summary=$(TEST_TIMEOUT=${SELFTEST_TIMEOUT:-600} run_pytest "$OUT_DIR/selftest.log" \
      -m gpu tests ${SELFTEST_ARGS:-})
    selftest_rc=$?
  else
    selftest_rc=0
    selftest_summary="skipped: needs CUDA (DEVICE=$DEVICE)"
  fi
  echo "self-test: $selftest_summary in $(elapsed "$start")"
}

# pytest on the given paths into the given log; prints its summary line (or, when cut by its time
# limit, the counts so far) and returns pytest's exit status.
run_pytest() {
  local log=$1 rc summary
  shift
  # Verbose, so that a run cut by its time limit still names the failures it saw.
  timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -v -ra -p no:cacheprovider $xdist "$@" \
    --ignore=tests/test_compile_triton.py --ignore=tests/test_compile_cuda.py ${PYTEST_ARGS:-} > "$log" 2>&1
  rc=$?
  grep -E "FAILED|ERROR" "$log" | head -40 >&2
  tail -3 "$log" >&2
  summary="$(grep -E "[0-9]+ (passed|failed|errors?)(,.*)? in [0-9.]+s" "$log" | tail -1 | sed -E "s/^=+ | =+$//g")"
  if [ -z "$summary" ]; then  # cut by its time limit, or stopped early: count the verbose lines it wrote
    if [ $rc -eq 124 ]; then summary="cut at ${TEST_TIMEOUT:-300} s"; else summary="no pytest summary"; fi
    summary="$summary: $(grep -c " PASSED" "$log") passed, $(grep -c " FAILED" "$log") failed so far"
  fi
  echo "$summary (exit $rc)"
  return $rc
}

step_tests() {
  echo "== tests"
  start=$(date +%s)
  xdist=""
  "$PY" -c "import xdist" 2>/dev/null && xdist="-n ${PYTEST_WORKERS:-8}"
  not_gpu=()
  case " ${STEPS:-selftest tests check bench} " in *" selftest "*) not_gpu=(-m "not gpu") ;; esac
  test_summary=$(run_pytest "$OUT_DIR/tests.log" ${TEST_PATHS:-tests} "${not_gpu[@]}")
  test_rc=$?
  # Both designs of the triton top-k selection are tested on a GPU run:
  # tests/ops/topk_read/test_topk_read_triton.py (in the default TEST_PATHS) runs each path's
  # kernels, and OPT_IN_TEST_PATHS run again through the
  # public API with L2M_TOPK_TRITON_PATH set to the opt-in design (threshold-strided: not yet run
  # on a GPU, l2m_kernels._gpu_status); on CUDA by default, empty to skip.
  default_opt_in="tests/ops/topk_read/test_topk_read.py tests/ops/memory_attention/test_memory_attention.py
    tests/ops/memory_attention/test_memory_attention_triton.py"
  [ "$DEVICE" = cuda ] || default_opt_in=""
  if [ -n "${OPT_IN_TEST_PATHS-$default_opt_in}" ]; then
    opt_in_summary=$(L2M_TOPK_TRITON_PATH=threshold-strided run_pytest "$OUT_DIR/tests_threshold_strided.log" \
      ${OPT_IN_TEST_PATHS-$default_opt_in})
    opt_in_rc=$?
    [ $test_rc -ne 0 ] || test_rc=$opt_in_rc
    test_summary="$test_summary; with L2M_TOPK_TRITON_PATH=threshold-strided: $opt_in_summary"
  fi
  echo "tests: $test_summary in $(elapsed "$start")"
}

step_check() {
  echo "== l2m-check"
  start=$(date +%s)
  timeout "${CHECK_TIMEOUT:-300}" "$PY" -m l2m_kernels.check --device "$DEVICE" --no-progress \
    --json "$OUT_DIR/check.json" ${CHECK_ARGS:-} > "$OUT_DIR/check.log" 2>&1
  check_rc=$?
  check_note="exit $check_rc"
  cat "$OUT_DIR/check.log"
  echo "l2m-check: exit $check_rc in $(elapsed "$start")"
}

step_bench() {
  echo "== l2m-bench"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-600}" "$PY" -m l2m_kernels.bench --device "$DEVICE" --no-progress --out "$OUT_DIR" \
    ${BENCH_ARGS:-} > "$OUT_DIR/bench.log" 2>&1
  bench_rc=$?
  bench_note="exit $bench_rc"
  grep -vE "USDT|it/s\]|s/it\]" "$OUT_DIR/bench.log" | tail -40
  echo "l2m-bench: exit $bench_rc in $(elapsed "$start")"
}

selftest_rc=0; selftest_summary="not run: not in STEPS"
test_rc=0; test_summary="not run: not in STEPS"
check_rc=0; check_note="not run: not in STEPS"
bench_rc=0; bench_note="not run: not in STEPS"
for step in ${STEPS:-selftest tests check bench}; do
  case "$step" in
    selftest|tests|check|bench) "step_$step" ;;
    *) echo "unknown step '$step' in STEPS (selftest, tests, check, bench)"; exit 2 ;;
  esac
done

{
  echo
  echo "## $(date -u +%Y-%m-%d) — $card ($versions), tools/gpu_suite.sh"
  echo
  echo "Build: $build_summary. CUDA self-test: $selftest_summary."
  echo "Tests on $DEVICE: $test_summary."
  echo
  echo "l2m-check on $DEVICE ($check_note):"
  echo
  echo '```'
  if [ -s "$OUT_DIR/check.log" ]; then grep -vE "USDT" "$OUT_DIR/check.log" | tail -n 80; else echo "(no output)"; fi
  echo '```'
  echo
  echo "l2m-bench on $DEVICE ${BENCH_ARGS:-} ($bench_note):"
  echo
  if [ -f "$OUT_DIR/suite.md" ]; then tail -n +3 "$OUT_DIR/suite.md"; else echo "no benchmark table (see bench.log)"; fi
} > "$OUT_DIR/RESULTS_entry.md"
echo "== result rows"
record=()
[ -f "$OUT_DIR/suite.json" ] && record+=("$OUT_DIR/suite.json")
[ -f "$OUT_DIR/check.json" ] && record+=(--check-json "$OUT_DIR/check.json")
"$PY" -m l2m_kernels.bench.results add ${record[@]+"${record[@]}"} --device "$DEVICE" \
  --run "tools/gpu_suite.sh on $DEVICE: ${STEPS:-selftest tests check bench}" \
  --source "STEPS=\"${STEPS:-selftest tests check bench}\" BENCH_ARGS=\"${BENCH_ARGS:-}\" \
CHECK_ARGS=\"${CHECK_ARGS:-}\" bash tools/gpu_suite.sh" \
  --step "build=$build_summary" --step "CUDA self-test=$selftest_summary" --step "tests on $DEVICE=$test_summary" \
  --step "l2m-check=$check_note" --step "l2m-bench=${BENCH_ARGS:+$BENCH_ARGS: }$bench_note" \
  --results "$RESULTS_FILE" --markdown "$RESULTS_MD"
results_rc=$?
[ $build_rc -eq 0 ] && [ $selftest_rc -eq 0 ] && [ $test_rc -eq 0 ] && [ $check_rc -eq 0 ] && [ $bench_rc -eq 0 ] \
  && [ $results_rc -eq 0 ]
