#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (`make cuda-check`): builds the torch-free sources
# in csrc/cuda as an OBJECT library with nvcc for sm_80 and sm_90, in its own build dir.
# Needs nvcc (and cmake, ninja from .venv when present); needs neither torch nor a GPU.
# Fails on any compile error or warning, or on a failed resource report (see below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${FUSEDATTN_CUDA_CHECK_DIR:-$ROOT/build/cuda-check}"
ARCHITECTURES="${FUSEDATTN_CUDA_CHECK_ARCHITECTURES:-80;90}"
JOBS="${MAX_JOBS:-$(nproc)}"

# Prefer the project's virtual environment for cmake and ninja.
if [ -x "$ROOT/.venv/bin/cmake" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
NVCC="${CUDACXX:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "cuda-check: nvcc not found (set CUDACXX or put nvcc on PATH)" >&2
  exit 2
fi
GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi

start=$(date +%s)
cmake -S "$ROOT/csrc/cuda" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$ARCHITECTURES" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" --parallel "$JOBS" --clean-first
echo "cuda-check: csrc/cuda compiled for sm_${ARCHITECTURES//;/, sm_} with $("$NVCC" --version | tail -n 2 | head -n 1) in $(( $(date +%s) - start ))s"

# Resource report (scripts/cuda_resource_report.py): no spills anywhere, HMMA/LDGSTS/LDSM in the
# fp16/bf16 forward and backward, shared memory for two blocks per sm_90 SM at D <= 128 for
# every kernel. Written to the build dir; FUSEDATTN_CUDA_REPORT_DIR=
# benchmarks/results/cuda-resource-report refreshes the committed copy.
PYTHON="python3"
if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; fi
CUDACXX="$NVCC" "$PYTHON" "$ROOT/scripts/cuda_resource_report.py" "$BUILD_DIR" \
  "${FUSEDATTN_CUDA_REPORT_DIR:-$BUILD_DIR/resource-report}"
