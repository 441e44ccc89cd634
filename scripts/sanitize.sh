#!/usr/bin/env bash
# `make sanitize`: build fusedattn._C with AddressSanitizer and UndefinedBehaviorSanitizer
# into its own build dir (build/sanitize; the editable build is untouched) and run a subset
# of the CPU kernel tests against it, then a fixed slice of the fuzz campaign (seed and chunk
# count fixed; FUSEDATTN_FUZZ_SECONDS=0 skips it). Exits nonzero on any sanitizer report, test
# failure, crash or wrong result.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
# Absolute, but not resolved: a venv's python is a symlink to the base interpreter.
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
BUILD_DIR=${FUSEDATTN_SANITIZE_BUILD_DIR:-build/sanitize}
LOG="$BUILD_DIR/sanitize.log"
# The subset: every feature in float32 and bfloat16, varlen, decoding splits, masked rows,
# strided inputs, every compiled instruction-set variant, and the native operators' own
# checks of metadata and sizes (tests/test_metadata.py).
SUBSET=${FUSEDATTN_SANITIZE_TESTS:-"(features and not float16) or varlen or decode or fully_masked or non_contiguous or instruction_set or head_dims or value_head_dim or native_cpu_operator or direct_op_calls"}

generator=()
if "$PY" -c "import ninja" 2>/dev/null; then generator=(-G Ninja); fi
cmake -S . -B "$BUILD_DIR" "${generator[@]}" \
  -DPython_EXECUTABLE="$PY" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$(realpath -m "$BUILD_DIR/lib")" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFUSEDATTN_CUDA=OFF \
  -DFUSEDATTN_SANITIZE=ON >/dev/null
PATH="$(dirname "$PY"):$PATH" cmake --build "$BUILD_DIR" --parallel "${MAX_JOBS:-$(nproc)}"
library=$(ls "$BUILD_DIR"/lib/_C*.so)

compiler=${CXX:-c++}
preload="$($compiler -print-file-name=libasan.so) $($compiler -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# OpenMP threads as in normal runs (2 keeps the test time down on small machines).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

status=0
# --capture=sys: sanitizer reports go to the real stderr (fd capture would swallow them).
LD_PRELOAD="$preload" "$PY" tests/sanitize/run_sanitized.py "$library" -q -p no:cacheprovider --capture=sys \
  tests/test_cpu_backend.py tests/test_metadata.py -k "$SUBSET" 2>&1 | tee "$LOG" || status=$?
# Then the fuzz campaign (tests/fuzz) for FUSEDATTN_FUZZ_SECONDS against the same sanitized
# extension: its workers load it too (run_sanitized.py passes the path on), and a worker
# that a sanitizer stops is reported as a crash of the case it was running.
# A fixed set of cases (seed and chunk count), so CI judges the same inputs on every run;
# FUSEDATTN_FUZZ_SECONDS only caps the time.
FUZZ_SECONDS=${FUSEDATTN_FUZZ_SECONDS:-600}
fuzz_status=0
if [ "$FUZZ_SECONDS" != "0" ]; then
  LD_PRELOAD="$preload" "$PY" tests/sanitize/run_sanitized.py "$library" --module tests.fuzz \
    --seconds "$FUZZ_SECONDS" --seed "${FUSEDATTN_FUZZ_SEED:-2026}" --chunks "${FUSEDATTN_FUZZ_CHUNKS:-180}" \
    --compiled-fraction "${FUSEDATTN_FUZZ_COMPILED_FRACTION:-0.02}" \
    --json "$BUILD_DIR/fuzz.json" 2>&1 | tee -a "$LOG" || fuzz_status=$?
fi
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$LOG"; then
  echo "sanitize: sanitizer report found (see $LOG)" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize: tests failed under the sanitizers (exit $status, see $LOG)" >&2
  exit "$status"
fi
if [ "$fuzz_status" -ne 0 ]; then
  echo "sanitize: the fuzz campaign found crashes or wrong results (exit $fuzz_status, see $BUILD_DIR/fuzz.json)" >&2
  exit "$fuzz_status"
fi
echo "sanitize: no sanitizer report"
