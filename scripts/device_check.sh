#!/usr/bin/env bash
# One-call GPU check for a bare H100/H200 machine (torch 2.11, triton 3.6, nothing to download).
#
#   scripts/device_check.sh OUTDIR
#
# Builds and installs fusedattn with the CUDA backend, runs the GPU tests, the parity
# harness on cuda for every backend that serves cuda, and the benchmark against torch
# SDPA. Every step is time-boxed so the whole run ends within TOTAL_S (default 450 s,
# under the 8-minute call limit). OUTDIR receives at most 7 files (the device tool
# returns at most 8): steps.log, install.log, tests.log, parity.log, parity.json,
# bench.log, bench.json. A failing step is logged and the next one still runs.
set -u
OUT_DIR=${1:?usage: scripts/device_check.sh OUTDIR}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-450}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fusedattn-triton-cache}
unset TRITON_INTERPRET

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((TOTAL_S - $(elapsed))); }
log() { echo "[device_check +$(elapsed)s] $*" | tee -a "$OUT_DIR/steps.log"; }

# run_step NAME LIMIT_S LOGFILE COMMAND...: at most LIMIT_S seconds, and never past TOTAL_S minus RESERVE_S.
run_step() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  local budget=$(($(remaining) - ${RESERVE_S:-0}))
  ((budget < limit)) && limit=$budget
  if ((limit < 5)); then
    log "skip $name (no time left)"
    return 1
  fi
  log "start $name (limit ${limit}s)"
  echo "===== $name: $*" >>"$logfile"
  timeout --kill-after=5 "$limit" "$@" >>"$logfile" 2>&1
  local rc=$?
  log "end $name rc=$rc"
  return $rc
}

log "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
log "versions: $($PYTHON -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1)"
log "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"

# ---- 1. build and install (CUDA backend on; fall back to no CUDA, then to a source path) ----
export MAX_JOBS=${MAX_JOBS:-16}
RESERVE_S=240 run_step install_cuda 200 "$OUT_DIR/install.log" \
  env FUSEDATTN_CMAKE_ARGS="-DFUSEDATTN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" \
  $PYTHON -m pip install --no-build-isolation --no-deps -e .
if ! $PYTHON -c 'import fusedattn' >>"$OUT_DIR/install.log" 2>&1; then
  log "install with CUDA failed: trying without the CUDA backend"
  RESERVE_S=220 run_step install_nocuda 90 "$OUT_DIR/install.log" \
    env FUSEDATTN_CMAKE_ARGS="-DFUSEDATTN_CUDA=OFF" $PYTHON -m pip install --no-build-isolation --no-deps -e .
fi
if ! $PYTHON -c 'import fusedattn.kernels' >>"$OUT_DIR/install.log" 2>&1; then
  log "install failed: using the sources through PYTHONPATH (no native extension)"
  SOURCE_ROOT=/tmp/fusedattn-source
  rm -rf "$SOURCE_ROOT" && mkdir -p "$SOURCE_ROOT"
  cp -r python/fusedattn "$SOURCE_ROOT/fusedattn" && rm -rf "$SOURCE_ROOT/fusedattn/kernels"
  cp -r kernels "$SOURCE_ROOT/fusedattn/kernels"
  export PYTHONPATH="$SOURCE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
log "backends: $($PYTHON -c 'import fusedattn.dispatch as d; print({n: b.availability() for n, b in d.registry().items()}, d.import_errors())' 2>&1 | tail -1)"

# ---- 2. GPU tests: the Triton backend's file (all of it runs on CUDA), then every gpu-marked test ----
# Sized from scripts/count_test_compiles.py (2026-12-06): the file compiles about 262
# distinct kernels without bf16, ~350 on a GPU (its bf16 cases add ~90), each a few
# seconds single-threaded: one xdist worker per core keeps the step near 2 minutes.
RESERVE_S=200 run_step tests_triton 150 "$OUT_DIR/tests.log" \
  $PYTHON -m pytest -q -n 16 -p no:cacheprovider --durations=10 tests/test_triton_backend.py
RESERVE_S=180 run_step tests_gpu 60 "$OUT_DIR/tests.log" \
  $PYTHON -m pytest -q -n 8 -p no:cacheprovider -m gpu tests --ignore=tests/test_triton_backend.py
# Issue 7: a tiny Llama with attn_implementation="fusedattn" under torch.compile(fullgraph=True) on cuda.
RESERVE_S=170 run_step tests_compile_llama 45 "$OUT_DIR/tests.log" \
  $PYTHON -m pytest -q -p no:cacheprovider tests/test_compile_llama.py
# Issue 17: ring attention over NCCL (one GPU: the single-rank path) against one process.
RESERVE_S=160 run_step tests_distributed_nccl 45 "$OUT_DIR/tests.log" \
  $PYTHON -m pytest -q -p no:cacheprovider tests/test_distributed.py -k test_nccl_on_gpus

# ---- 3. parity harness on cuda, one backend at a time, merged into one JSON ----
# The GPU backends first (the reference last: it is the oracle itself), in case time runs out.
BACKENDS=$($PYTHON -c 'import fusedattn.dispatch as d; names = [n for n, b in d.registry().items() if "cuda" in b.capabilities.devices and b.availability()[0]]; print(" ".join(sorted(names, key=lambda n: (n == "reference", n != "triton", n))))' 2>>"$OUT_DIR/parity.log")
PARITY_DIR=/tmp/fusedattn-parity
rm -rf "$PARITY_DIR" && mkdir -p "$PARITY_DIR"
for backend in $BACKENDS; do
  RESERVE_S=150 run_step "parity_$backend" 50 "$OUT_DIR/parity.log" \
    $PYTHON -m fusedattn parity --device cuda --backend "$backend" --json "$PARITY_DIR/$backend.json"
done
$PYTHON - "$PARITY_DIR" "$OUT_DIR/parity.json" <<'EOF' >>"$OUT_DIR/parity.log" 2>&1
import json, pathlib, sys
merged = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        merged[path.stem] = json.loads(path.read_text())
    except ValueError as error:
        merged[path.stem] = {"error": f"unreadable JSON: {error}"}
pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1))
print("parity backends:", list(merged))
EOF

# ---- 4. benchmark: whatever time is left, minus a margin to write the JSON ----
BENCH_BUDGET=$(($(remaining) - 45))
((BENCH_BUDGET > 200)) && BENCH_BUDGET=200
if ((BENCH_BUDGET > 20)); then
  RESERVE_S=5 run_step bench $((BENCH_BUDGET + 40)) "$OUT_DIR/bench.log" \
    env TRITON_PRINT_AUTOTUNING=1 $PYTHON scripts/device_bench.py --json "$OUT_DIR/bench.json" --budget-s "$BENCH_BUDGET"
else
  log "skip bench (no time left)"
fi
log "done in $(elapsed)s"
