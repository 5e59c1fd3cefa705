#!/usr/bin/env bash
# The CPU tests under AddressSanitizer and UndefinedBehaviorSanitizer: 0 reports or a failure.
#
#   bash scripts/sanitize.sh                 # the CPU tests below
#   bash scripts/sanitize.sh tests/ops/merge -k cpu     # or any pytest arguments
#
# 1. Builds a sanitized copy of the package in build/sanitize/lib: the Python files and the CPU
#    extension compiled with L2M_SANITIZE=address,undefined (every instruction-set variant; objects
#    in build/sanitize/build, so a second run rebuilds only what changed). The in-tree build
#    (l2m_kernels/_C*.so) is neither touched nor used: nothing to restore afterwards.
# 2. Runs pytest on that copy (PYTHONPATH, from build/sanitize so the source tree's package is not
#    imported) with the ASan runtime preloaded, detect_leaks=0 (the interpreter itself never frees
#    some of its memory) and halt_on_error, so any ASan or UBSan report stops the run and fails it.
#
# Environment: PYTHON (default python3), CXX (the compiler torch builds with, default c++),
# MAX_JOBS (parallel compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=$ROOT/build/sanitize

# The CPU-backend tests: the op tests, the extension's own among them (tests/ops/<op>/; their
# triton files and cases need the interpreter, not the extension), the instruction-set variants,
# validation, the fuzzer's reference and cpu cases, the strided-operand tests, the fake-kernel
# cross-check and the thread test (not the memory-growth test: ASan's quarantine holds freed memory
# on purpose).
DEFAULT_TESTS=(tests/ops --ignore-glob="*_triton.py"
               tests/test_cpu_isa.py tests/test_validation.py tests/test_check.py tests/test_fuzz.py
               tests/test_cpu_strides.py tests/test_fake_strides.py tests/test_threads_and_leaks.py
               -k "not triton and not compile and not leave_memory_flat")
if [ "$#" -eq 0 ]; then
  set -- "${DEFAULT_TESTS[@]}"
fi

start=$(date +%s)
# Python files are copied afresh (a file removed from the tree must not linger in the copy).
find "$OUT/lib" -name '*.py' -delete 2>/dev/null || true
mkdir -p "$OUT"
L2M_SANITIZE=address,undefined L2M_SKIP_CUDA=1 "$PY" setup.py -q build \
  --build-base "$OUT/build" --build-lib "$OUT/lib" >"$OUT/build.log" 2>&1 || {
  tail -30 "$OUT/build.log"; echo "sanitize.sh: the sanitized build failed (log: $OUT/build.log)"
  exit 1; }
echo "sanitize.sh: sanitized build in $(( $(date +%s) - start )) s ($OUT/lib)"

LIBASAN=$("${CXX:-c++}" -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
  echo "sanitize.sh: ${CXX:-c++} has no libasan.so ($LIBASAN)"; exit 1
fi
# ASan reports go to files (one per process, test subprocesses included). UBSan's runtime, loaded
# with the extension beside ASan's, ignores log_path and writes to stderr: pytest runs with
# --capture=sys (its fd-level capture would swallow a report written by a process that then exits)
# and its stderr is kept in $REPORTS/stderr.log, where each "runtime error:" counts as a report.
REPORTS=$OUT/reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
# libstdc++ preloaded too: python does not link it, and ASan's __cxa_throw interceptor must find it
# when ASan starts (else the first C++ exception aborts with "CHECK failed ... real___cxa_throw").
export LD_PRELOAD="$LIBASAN $("${CXX:-c++}" -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=$REPORTS/asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH=$OUT/lib${PYTHONPATH:+:$PYTHONPATH}

cd "$OUT"
# Fail rather than test the wrong build.
"$PY" - <<EOF
import l2m_kernels._C as C, os
assert C.__file__.startswith("$OUT/lib/"), f"imported {C.__file__}, not the sanitized copy"
print(f"sanitize.sh: testing {os.path.relpath(C.__file__, '$ROOT')} (variants {C.BUILD_INFO['cpu_isas']})")
EOF

paths=()
for arg in "$@"; do
  case $arg in tests/*|tests) paths+=("$ROOT/$arg") ;; *) paths+=("$arg") ;; esac
done
start=$(date +%s)
status=0
"$PY" -m pytest -q -p no:cacheprovider --capture=sys --rootdir "$ROOT" "${paths[@]}" \
  2> >(tee "$REPORTS/stderr.log" >&2) || status=$?
sleep 1  # let tee finish writing
ubsan_reports=$(grep -c "runtime error:" "$REPORTS/stderr.log" || true)  # grep -c exits 1 on 0
reports=$(( $(find "$REPORTS" -type f -name 'asan*' | wc -l) + ubsan_reports ))
for report in $(find "$REPORTS" -type f -name 'asan*'); do
  echo "==== $report"; head -60 "$report"
done
if grep -q "runtime error:" "$REPORTS/stderr.log"; then
  echo "==== UBSan ($REPORTS/stderr.log)"; grep -A12 "runtime error:" "$REPORTS/stderr.log" | head -60
fi
echo "sanitize.sh: tests in $(( $(date +%s) - start )) s, $reports sanitizer report(s)," \
     "pytest status $status"
[ "$status" -eq 0 ] && [ "$reports" -eq 0 ]
